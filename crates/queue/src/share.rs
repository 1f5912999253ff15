//! The flock-wide `rate_limit` of a clustered queue (docs/decisions/153): every copy of the cage
//! starts at most its share of the queue's budget, `rate_limit / live copies`, the live copies
//! counted from the flock's heartbeats (crates/cluster/src/presence.rs), in which each copy also
//! announces the calls of the queue it runs now.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often a copy counts the live copies again: often enough to take a dead copy's share
/// within a second of the roster marking it down, rarely enough to cost nothing.
const RECOUNT: Duration = Duration::from_millis(500);

/// A token bucket whose rate is this copy's share of the queue's `rate_limit`.
pub(crate) struct FlockRate {
    limit: u32,
    copies: Box<dyn Fn() -> usize + Send>,
    /// (live copies, when counted).
    counted: Option<(usize, Instant)>,
    tokens: f64,
    at: Instant,
}

impl FlockRate {
    /// The share of queue `queue` of `cage` in the flock this process joined.
    pub(crate) fn new(cage: &str, queue: &str, limit: u32) -> FlockRate {
        let (cage, queue) = (cage.to_string(), queue.to_string());
        FlockRate::with_copies(limit, move || rustomnic_cluster::roster().map_or(1, |r| r.live_copies(&cage, &queue)))
    }

    /// With the live copies counted by `copies` (tests).
    pub(crate) fn with_copies(limit: u32, copies: impl Fn() -> usize + Send + 'static) -> FlockRate {
        // An empty bucket at the start: a copy that has just joined counts only itself until it
        // hears the others' heartbeats (within one interval), and would otherwise start with a
        // whole second of the flock's budget at once.
        FlockRate { limit, copies: Box::new(copies), counted: None, tokens: 0.0, at: Instant::now() }
    }

    /// The starts per second this copy may make now.
    fn share(&mut self) -> f64 {
        let copies = match self.counted {
            Some((n, at)) if at.elapsed() < RECOUNT => n,
            _ => {
                let n = (self.copies)().max(1);
                if self.counted.is_some_and(|(was, _)| was != n) {
                    tracing::debug!("clustered queue: {n} live copies share a rate_limit of {}/s", self.limit);
                }
                self.counted = Some((n, Instant::now()));
                n
            }
        };
        self.limit.max(1) as f64 / copies as f64
    }

    /// At least one start, so that a share under 1/s still starts a call now and then.
    fn capacity(&self, share: f64) -> f64 {
        share.max(1.0)
    }

    /// Refills the bucket for the time since the last look at this copy's share; the share.
    fn refill(&mut self) -> f64 {
        let share = self.share();
        let capacity = self.capacity(share);
        self.tokens = (self.tokens + self.at.elapsed().as_secs_f64() * share).min(capacity);
        self.at = Instant::now();
        share
    }

    /// How many of `want` starts the bucket holds now, without taking them, and how long until
    /// the next one when it holds none.
    pub(crate) fn available(&mut self, want: usize) -> (usize, Duration) {
        let share = self.refill();
        let n = (self.tokens.floor() as usize).min(want);
        let wait = if n == 0 { Duration::from_secs_f64(((1.0 - self.tokens) / share).max(0.001)) } else { Duration::ZERO };
        (n, wait)
    }

    /// Takes up to `want` starts now: (how many, how long until the next one when none).
    pub(crate) fn take(&mut self, want: usize) -> (usize, Duration) {
        let (n, wait) = self.available(want);
        self.tokens -= n as f64;
        (n, wait)
    }

    /// Takes one start, waiting for it when the bucket is empty (a call that arrived is held
    /// meanwhile; the pull asked only for the starts [`available`](Self::available) said).
    pub(crate) async fn start(&mut self) {
        loop {
            let (n, wait) = self.take(1);
            if n == 1 {
                return;
            }
            tokio::time::sleep(wait).await;
        }
    }
}

/// A call of a clustered queue held by this copy: counted in its heartbeats while it lives.
pub(crate) struct Running(Arc<AtomicUsize>);

impl Running {
    pub(crate) fn new(count: &Arc<AtomicUsize>) -> Running {
        count.fetch_add(1, Ordering::Relaxed);
        Running(count.clone())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The announcement of a consumed queue in this process's heartbeats, withdrawn when the
/// consumer ends.
pub(crate) struct Consuming {
    cage: String,
    queue: String,
    pub(crate) running: Arc<AtomicUsize>,
}

impl Consuming {
    pub(crate) fn new(cage: &str, queue: &str) -> Consuming {
        Consuming { cage: cage.to_string(), queue: queue.to_string(), running: rustomnic_cluster::presence::consume_queue(cage, queue) }
    }
}

impl Drop for Consuming {
    fn drop(&mut self) {
        rustomnic_cluster::presence::stop_consuming(&self.cage, &self.queue);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Starts made over `for_` when taking as fast as allowed.
    fn starts(rate: &mut FlockRate, for_: Duration) -> usize {
        let until = Instant::now() + for_;
        let mut n = 0;
        while Instant::now() < until {
            let (got, wait) = rate.take(100);
            n += got;
            std::thread::sleep(wait.min(Duration::from_millis(5)));
        }
        n
    }

    #[test]
    fn each_copy_takes_its_share_and_a_departed_copys_share_comes_back() {
        let copies = Arc::new(AtomicUsize::new(2));
        let c = copies.clone();
        let mut rate = FlockRate::with_copies(20, move || c.load(Ordering::Relaxed));
        // 10/s over 2 s from an empty bucket.
        let two = starts(&mut rate, Duration::from_secs(2));
        assert!((18..=21).contains(&two), "{two} starts in 2 s with 2 copies sharing 20/s");
        copies.store(1, Ordering::Relaxed);
        // Within RECOUNT it is counted again: the whole 20/s.
        std::thread::sleep(RECOUNT);
        // Empties the bucket refilled meanwhile, then measures the rate alone.
        rate.take(1000);
        let one = starts(&mut rate, Duration::from_secs(1));
        assert!((17..=22).contains(&one), "{one} starts alone with 20/s");
    }

    #[test]
    fn a_share_under_one_per_second_still_starts_calls() {
        let mut rate = FlockRate::with_copies(1, || 4);
        let (n, wait) = rate.take(5);
        assert_eq!(n, 0, "the bucket starts empty");
        assert!(wait > Duration::from_millis(3500) && wait <= Duration::from_secs(4), "{wait:?}: one start every 4 s");
        // Four seconds later the bucket holds one start, and never more than one.
        rate.at -= Duration::from_secs(20);
        assert_eq!(rate.take(5).0, 1, "a share of 0.25/s holds one start at most");
        assert_eq!(rate.take(5).0, 0);
    }

    #[test]
    fn a_running_call_counts_while_it_lives() {
        let count = Arc::new(AtomicUsize::new(0));
        let a = Running::new(&count);
        let b = Running::new(&count);
        assert_eq!(count.load(Ordering::Relaxed), 2);
        drop(a);
        drop(b);
        assert_eq!(count.load(Ordering::Relaxed), 0);
    }
}
