//! `[queues.NAME]` of cage.toml: the queues a cage accepts durable calls on.
//!
//! ```toml
//! [queues.retry]
//! concurrency = 16          # calls of this queue running at once in this process
//! keep_order = false        # true: one at a time, in enqueue order (a failing call holds the rest)
//! rate_limit = 0            # calls started per second, 0 = no limit
//! expires_in = "1d"         # default time a call is tried before it goes to dead letters
//! dedup_window = "3d"       # how long a done call's id keeps refusing the same id
//! result_ttl = "1h"         # how long pmnc.calls.result(id) keeps a done call's value
//! timeout = "30s"           # deadline of one attempt (default: the cage's request_timeout)
//! max_attempts = 0          # attempts before a failing call goes to dead letters, 0 = no limit
//!
//! [queues.retry.backoff]
//! initial = "1s"            # wait before the first retry
//! max = "10m"               # longest wait between attempts
//! multiplier = 2            # each wait is this many times the last (a number, "1.5" as text)
//! jitter = 20               # percent of random spread around each wait
//! ```

use std::time::Duration;

use rustomnic_core::Section;

const DAY: Duration = Duration::from_secs(86_400);
/// The largest `max_attempts` a queue or a call may set.
pub const MAX_ATTEMPTS: u32 = 1_000_000;
const YEAR: Duration = Duration::from_secs(366 * 86_400);

/// One configured queue.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueConfig {
    pub name: String,
    pub concurrency: usize,
    pub keep_order: bool,
    /// Calls started per second; 0 is unlimited.
    pub rate_limit: u32,
    pub expires_in: Duration,
    pub dedup_window: Duration,
    pub result_ttl: Duration,
    /// Deadline of one attempt; None means the cage's request_timeout.
    pub timeout: Option<Duration>,
    /// Attempts after which a failing call is dead (a call's own `max_attempts` wins); None is
    /// no limit but the expiry.
    pub max_attempts: Option<u32>,
    pub backoff: Backoff,
}

/// How long to wait before retry n.
#[derive(Debug, Clone, PartialEq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
    pub multiplier: f64,
    /// 0.0 ..= 1.0
    pub jitter: f64,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { initial: Duration::from_secs(1), max: Duration::from_secs(600), multiplier: 2.0, jitter: 0.2 }
    }
}

impl Backoff {
    /// The wait before the attempt after `attempts` failed ones; `random` is uniform in [0, 1).
    pub fn wait(&self, attempts: u32, random: f64) -> Duration {
        let base = self.initial.as_secs_f64() * self.multiplier.powi(attempts.saturating_sub(1).min(1000) as i32);
        let base = base.min(self.max.as_secs_f64());
        let spread = 1.0 + self.jitter * (2.0 * random - 1.0);
        Duration::from_secs_f64((base * spread).clamp(0.0, self.max.as_secs_f64()))
    }
}

impl QueueConfig {
    pub fn new(name: &str) -> QueueConfig {
        QueueConfig {
            name: name.to_string(),
            concurrency: 16,
            keep_order: false,
            rate_limit: 0,
            expires_in: DAY,
            dedup_window: 3 * DAY,
            result_ttl: Duration::from_secs(3600),
            timeout: None,
            max_attempts: None,
            backoff: Backoff::default(),
        }
    }
}

/// Reads every `[queues.NAME]` of the `queues` table; problems are recorded in the sections.
pub fn read_queues(queues: &Section) -> Vec<QueueConfig> {
    let mut out = Vec::new();
    for (name, s) in queues.tables() {
        if !rustomnic_core::is_identifier(&name) {
            queues.error(&name, "queue names are identifiers (letters, digits and _)");
            continue;
        }
        let mut q = QueueConfig::new(&name);
        if let Some(n) = s.integer("concurrency", 1, 10_000) {
            q.concurrency = n.value as usize;
        }
        if let Some(b) = s.bool("keep_order") {
            q.keep_order = b.value;
        }
        if let Some(n) = s.integer("rate_limit", 0, 1_000_000) {
            q.rate_limit = n.value as u32;
        }
        if let Some(n) = s.integer("max_attempts", 0, MAX_ATTEMPTS as i64) {
            q.max_attempts = (n.value > 0).then_some(n.value as u32);
        }
        if let Some(d) = s.duration("expires_in", YEAR) {
            q.expires_in = d.value;
        }
        if let Some(d) = s.duration("dedup_window", YEAR) {
            q.dedup_window = d.value;
        }
        if let Some(d) = s.duration("result_ttl", YEAR) {
            q.result_ttl = d.value;
        }
        if let Some(d) = s.duration("timeout", Duration::from_secs(3600)) {
            q.timeout = Some(d.value);
        }
        if let Some(b) = s.table("backoff") {
            if let Some(d) = b.duration("initial", DAY) {
                q.backoff.initial = d.value;
            }
            if let Some(d) = b.duration("max", 7 * DAY) {
                q.backoff.max = d.value;
            }
            let multiplier = match b.kind_of("multiplier") {
                Some("integer") => b.integer("multiplier", 1, 100).map(|n| n.value as f64),
                Some(_) => b.string("multiplier").and_then(|m| match m.value.trim().parse::<f64>() {
                    Ok(f) if (1.0..=100.0).contains(&f) => Some(f),
                    _ => {
                        b.error("multiplier", format!("{:?} is not a number from 1 to 100", m.value));
                        None
                    }
                }),
                None => None,
            };
            if let Some(m) = multiplier {
                q.backoff.multiplier = m;
            }
            if let Some(j) = b.integer("jitter", 0, 100) {
                q.backoff.jitter = j.value as f64 / 100.0;
            }
            if q.backoff.initial > q.backoff.max {
                b.error("initial", "is longer than max");
            }
            b.finish();
        }
        s.finish();
        out.push(q);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_max_with_bounded_jitter() {
        let b = Backoff { initial: Duration::from_millis(100), max: Duration::from_secs(1), multiplier: 2.0, jitter: 0.5 };
        assert_eq!(b.wait(1, 0.5), Duration::from_millis(100));
        assert_eq!(b.wait(3, 0.5), Duration::from_millis(400));
        assert_eq!(b.wait(30, 0.5), Duration::from_secs(1));
        assert!(b.wait(2, 0.0) >= Duration::from_millis(100) && b.wait(2, 0.0) < Duration::from_millis(200));
        assert!(b.wait(2, 0.999) > Duration::from_millis(200));
    }

    #[test]
    fn queues_are_read_and_bad_keys_named() {
        let text = "[queues.retry]\nconcurrency = 4\nkeep_order = true\nexpires_in = \"2s\"\nmax_attempts = 5\n[queues.retry.backoff]\ninitial = \"10ms\"\nmultiplier = \"1.5\"\njitter = 10\n[queues.bad]\nconcurrency = 0\nwhat = 1\nmax_attempts = -1\n";
        let file = rustomnic_core::SourceFile::parse(std::path::Path::new("cage.toml"), text.to_string()).unwrap();
        let root = file.root();
        let qs = read_queues(&root.table("queues").unwrap());
        assert_eq!(qs.len(), 2);
        assert_eq!((qs[0].name.as_str(), qs[1].name.as_str()), ("retry", "bad"));
        assert_eq!((qs[0].concurrency, qs[0].keep_order, qs[0].expires_in), (4, true, Duration::from_secs(2)));
        assert_eq!((qs[0].backoff.multiplier, qs[0].backoff.jitter), (1.5, 0.1));
        assert_eq!((qs[0].max_attempts, qs[1].max_attempts), (Some(5), None));
        let errors: Vec<String> = file.take_errors().iter().map(|e| e.to_string()).collect();
        assert!(errors.iter().any(|e| e.contains("queues.bad.concurrency")), "{errors:?}");
        assert!(errors.iter().any(|e| e.contains("queues.bad.what")), "{errors:?}");
        assert!(errors.iter().any(|e| e.contains("queues.bad.max_attempts")), "{errors:?}");
    }
}
