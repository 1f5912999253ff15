//! Liveness and readiness of the process, for `/healthz`, `/readyz` and the service manager's
//! watchdog (docs/decisions/144-liveness-health-endpoints-and-drain-delay.md).
//!
//! Liveness: each worker thread runs a small task on its own event loop that records the time
//! every [`BEAT`]; a worker whose loop has not turned for [`LIVENESS_BOUND`] (stuck in a long C
//! or Rust call, or in a tight loop no hook reaches) is not alive. Reading it costs the reader
//! nothing but a few atomic loads, so the probe answers at once even when a worker is stuck.
//!
//! Readiness: the interfaces listen, the cluster's NATS is connected (when the process has a
//! cluster), and the process is not draining.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// How often a worker's heartbeat task records that its loop turns.
pub const BEAT: Duration = Duration::from_millis(200);

/// A worker whose loop has not turned for this long does not answer the liveness probe.
pub const LIVENESS_BOUND: Duration = Duration::from_secs(1);

/// A check of readiness beyond the process's own: `Some(reason)` when not ready.
pub type ReadyCheck = Arc<dyn Fn() -> Option<String> + Send + Sync>;

/// What the health endpoints and the watchdog read.
pub struct Health {
    origin: Instant,
    /// Per worker: milliseconds after `origin` of its loop's last turn (0: not started).
    beats: Vec<AtomicU64>,
    listening: AtomicBool,
    draining: AtomicBool,
    /// Set once `/readyz` has been asked: someone (a balancer, an orchestrator) watches it, so a
    /// stop waits `drain_delay` for it to see the 503.
    watched: AtomicBool,
    cluster: RwLock<Option<ReadyCheck>>,
}

impl Health {
    /// The health of a process with `workers` worker threads, none of which has beaten yet.
    pub fn new(workers: usize) -> Health {
        Health {
            origin: Instant::now(),
            beats: (0..workers).map(|_| AtomicU64::new(0)).collect(),
            listening: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            watched: AtomicBool::new(false),
            cluster: RwLock::new(None),
        }
    }

    fn now_ms(&self) -> u64 {
        // +1 so that a beat in the first millisecond is not taken for "never".
        self.origin.elapsed().as_millis() as u64 + 1
    }

    /// Records that worker `n`'s event loop turned now.
    pub fn beat(&self, n: usize) {
        if let Some(b) = self.beats.get(n) {
            b.store(self.now_ms(), Ordering::Relaxed);
        }
    }

    /// Why the process is not alive: one reason per worker whose loop has not turned within
    /// [`LIVENESS_BOUND`]; empty when every worker answers.
    pub fn liveness(&self) -> Vec<String> {
        let now = self.now_ms();
        let bound = LIVENESS_BOUND.as_millis() as u64;
        let mut reasons = Vec::new();
        for (n, b) in self.beats.iter().enumerate() {
            let last = b.load(Ordering::Relaxed);
            if last == 0 {
                // The monitor starts after every worker has loaded its cages and beaten once.
                reasons.push(format!("worker {n} has not started"));
            } else if now.saturating_sub(last) > bound {
                reasons.push(format!("worker {n} did not answer within {}s (its loop last turned {} ms ago)", bound as f64 / 1000.0, now - last));
            }
        }
        reasons
    }

    /// The interfaces listen (the moment the process says READY=1).
    pub fn set_listening(&self) {
        self.listening.store(true, Ordering::Relaxed);
    }

    /// A stop has begun: `/readyz` answers 503 from now on.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Whether `/readyz` has been asked since the start.
    pub fn watched(&self) -> bool {
        self.watched.load(Ordering::Relaxed)
    }

    /// The cluster's part of readiness.
    pub fn set_cluster_check(&self, check: ReadyCheck) {
        *self.cluster.write().unwrap_or_else(|e| e.into_inner()) = Some(check);
    }

    /// Why the process is not ready to take traffic; empty when it is.
    pub fn readiness(&self) -> Vec<String> {
        self.watched.store(true, Ordering::Relaxed);
        let mut reasons = Vec::new();
        if self.draining.load(Ordering::Relaxed) {
            reasons.push("draining: the process is stopping".to_string());
        }
        if !self.listening.load(Ordering::Relaxed) {
            reasons.push("starting: the interfaces do not listen yet".to_string());
        }
        let check = self.cluster.read().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(reason) = check.and_then(|c| c()) {
            reasons.push(reason);
        }
        reasons.extend(self.liveness());
        reasons
    }
}

static HEALTH: RwLock<Option<Arc<Health>>> = RwLock::new(None);

/// Makes `health` what the monitor's endpoints answer from (the runtime sets it at start).
pub fn set(health: Option<Arc<Health>>) {
    *HEALTH.write().unwrap_or_else(|e| e.into_inner()) = health;
}

/// The health of this process, when the runtime has set one.
pub fn get() -> Option<Arc<Health>> {
    HEALTH.read().unwrap_or_else(|e| e.into_inner()).clone()
}

/// The body of `/healthz` or `/readyz`: `{"status":"ok"}` or `{"status":"fail","reasons":[...]}`.
pub fn body(reasons: &[String]) -> serde_json::Value {
    if reasons.is_empty() {
        serde_json::json!({ "status": "ok" })
    } else {
        serde_json::json!({ "status": "fail", "reasons": reasons })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_that_stops_beating_is_named() {
        let h = Health::new(2);
        h.beat(0);
        h.beat(1);
        assert!(h.liveness().is_empty());
        std::thread::sleep(LIVENESS_BOUND + Duration::from_millis(100));
        h.beat(1);
        let reasons = h.liveness();
        assert_eq!(reasons.len(), 1, "{reasons:?}");
        assert!(reasons[0].starts_with("worker 0 did not answer within 1s"), "{reasons:?}");
    }

    #[test]
    fn readiness_needs_listening_and_no_drain() {
        let h = Health::new(1);
        h.beat(0);
        assert!(!h.watched());
        assert_eq!(h.readiness(), vec!["starting: the interfaces do not listen yet".to_string()]);
        assert!(h.watched(), "asking /readyz marks it watched");
        h.set_listening();
        assert!(h.readiness().is_empty());
        h.set_cluster_check(Arc::new(|| Some("cluster: not joined".into())));
        assert_eq!(h.readiness(), vec!["cluster: not joined".to_string()]);
        h.set_cluster_check(Arc::new(|| None));
        h.set_draining();
        assert_eq!(h.readiness(), vec!["draining: the process is stopping".to_string()]);
        assert_eq!(body(&[]), serde_json::json!({"status": "ok"}));
        assert_eq!(body(&["x".into()]), serde_json::json!({"status": "fail", "reasons": ["x"]}));
    }
}
