//! Rate-limited log lines of the queue: a failure that repeats (every attempt of a call that
//! keeps failing, every commit on a full disk) must not flood the log, and the log itself must
//! not fill the disk it is reporting about (issue 12 #5). Each kind of line may be written a few
//! times per window; the next one written after a quiet spell says how many were left out.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The window over which lines of one kind are counted.
pub const WINDOW: Duration = Duration::from_secs(10);
/// Lines of one kind written per window; more are counted and left out.
pub const PER_WINDOW: u32 = 5;
/// Kinds remembered at once; older ones are forgotten (they only hold counters).
const MAX_KINDS: usize = 1024;

struct Window {
    start: Instant,
    shown: u32,
    /// Lines left out since the last one written.
    suppressed: u64,
}

#[derive(Default)]
pub struct Limiter {
    kinds: Mutex<HashMap<String, Window>>,
}

impl Limiter {
    /// Whether a line of `kind` may be written now. When it may, the returned text is empty or
    /// says how many lines of that kind were left out before it (append it to the line).
    pub fn allow(&self, kind: &str) -> Option<String> {
        self.allow_at(kind, Instant::now())
    }

    fn allow_at(&self, kind: &str, now: Instant) -> Option<String> {
        let mut kinds = self.kinds.lock().unwrap_or_else(|p| p.into_inner());
        if kinds.len() >= MAX_KINDS && !kinds.contains_key(kind) {
            kinds.retain(|_, w| now.duration_since(w.start) < WINDOW);
        }
        let w = kinds.entry(kind.to_string()).or_insert(Window { start: now, shown: 0, suppressed: 0 });
        if now.duration_since(w.start) >= WINDOW {
            w.start = now;
            w.shown = 0;
        }
        if w.shown >= PER_WINDOW {
            w.suppressed += 1;
            return None;
        }
        w.shown += 1;
        let note = match std::mem::take(&mut w.suppressed) {
            0 => String::new(),
            n => format!(" ({n} similar lines left out before this one)"),
        };
        Some(note)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_few_lines_per_window_then_a_count_of_those_left_out() {
        let l = Limiter::default();
        let t0 = Instant::now();
        for _ in 0..PER_WINDOW {
            assert_eq!(l.allow_at("a", t0).as_deref(), Some(""));
        }
        for _ in 0..1000 {
            assert_eq!(l.allow_at("a", t0 + Duration::from_secs(1)), None);
        }
        assert_eq!(l.allow_at("b", t0).as_deref(), Some(""), "kinds are counted apart");
        let next = l.allow_at("a", t0 + WINDOW).unwrap();
        assert_eq!(next, " (1000 similar lines left out before this one)");
        assert_eq!(l.allow_at("a", t0 + WINDOW).as_deref(), Some(""));
    }
}
