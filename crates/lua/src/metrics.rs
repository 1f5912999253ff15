//! Recording of every request's outcome and latency per cage and interface (the monitor's
//! figures), and the sampling of each VM's memory on its worker thread.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustomnic_core::fnv::FnvBuild;
use rustomnic_core::metrics::{self, InterfaceMetrics};

use crate::request::{RequestCtx, RunError};

thread_local! {
    /// This thread's handles to the shared figures, so a request finds its interface's figures
    /// without taking the process-wide lock. FNV, as the names come from the configuration
    /// (the standard library's SipHash of the two names was ~400 instructions of every request).
    static CACHE: RefCell<Figures> = RefCell::new(Figures::default());
}

type Figures = HashMap<Box<str>, HashMap<Box<str>, Arc<InterfaceMetrics>, FnvBuild>, FnvBuild>;

fn figures(cage: &str, interface: &str) -> Arc<InterfaceMetrics> {
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        if let Some(m) = c.get(cage).and_then(|i| i.get(interface)) {
            return m.clone();
        }
        let m = metrics::interface(cage, interface);
        c.entry(cage.into()).or_default().insert(interface.into(), m.clone());
        m
    })
}

/// One request being counted: in flight from [`Recording::start`] until it ends or is dropped.
pub struct Recording {
    figures: Arc<InterfaceMetrics>,
    started: Instant,
    done: bool,
}

impl Recording {
    pub fn start(ctx: &RequestCtx) -> Recording {
        let figures = figures(&ctx.cage, &ctx.interface);
        figures.in_flight.fetch_add(1, Ordering::Relaxed);
        Recording { figures, started: Instant::now(), done: false }
    }

    pub fn finish<T>(&mut self, ctx: &RequestCtx, result: &Result<T, RunError>) {
        if self.done {
            return;
        }
        self.done = true;
        let f = &self.figures;
        f.in_flight.fetch_sub(1, Ordering::Relaxed);
        f.requests.fetch_add(1, Ordering::Relaxed);
        f.latency.observe_us(self.started.elapsed().as_micros() as u64);
        if let Err(e) = result {
            f.errors.fetch_add(1, Ordering::Relaxed);
            if matches!(e, RunError::Deadline) {
                f.timeouts.fetch_add(1, Ordering::Relaxed);
            }
            metrics::record_request_error(&ctx.cage, &ctx.interface, &ctx.id, &e.to_string());
        }
    }
}

/// A request that could not start (its handler is missing) still counts, as an error.
pub(crate) fn not_started(ctx: &RequestCtx, error: &RunError) {
    Recording::start(ctx).finish::<()>(ctx, &Err(error.clone()));
}

impl Drop for Recording {
    fn drop(&mut self) {
        if !self.done {
            let f = &self.figures;
            f.in_flight.fetch_sub(1, Ordering::Relaxed);
            f.requests.fetch_add(1, Ordering::Relaxed);
            f.cancelled.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Stores the memory of every VM of this worker thread once a second, for the monitor (a VM
/// belongs to its thread, so only this thread can read it). Runs until the worker ends.
pub async fn sample_memory(worker: usize) {
    let mut slots: HashMap<String, Arc<std::sync::atomic::AtomicU64>> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for vm in crate::worker::cages() {
            let slot = slots.entry(vm.cage().to_string()).or_insert_with(|| metrics::vm_memory_slot(vm.cage(), worker));
            slot.store(vm.memory() as u64, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_counted_by_outcome() {
        let ctx = RequestCtx::new("rec-test", "http", Duration::from_secs(1));
        let figures = metrics::interface("rec-test", "http");
        let mut ok = Recording::start(&ctx);
        let failed = Recording::start(&ctx);
        let dropped = Recording::start(&ctx);
        assert_eq!(figures.in_flight.load(Ordering::Relaxed), 3);
        ok.finish::<()>(&ctx, &Ok(()));
        ok.finish::<()>(&ctx, &Err(RunError::Deadline)); // a second finish is ignored
        let mut failed = failed;
        failed.finish::<()>(&ctx, &Err(RunError::Deadline));
        drop(dropped);
        drop(ok);
        drop(failed);
        assert_eq!(figures.in_flight.load(Ordering::Relaxed), 0);
        assert_eq!(figures.requests.load(Ordering::Relaxed), 3);
        assert_eq!(figures.errors.load(Ordering::Relaxed), 1);
        assert_eq!(figures.timeouts.load(Ordering::Relaxed), 1);
        assert_eq!(figures.cancelled.load(Ordering::Relaxed), 1);
        assert_eq!(*figures.latency.cumulative().last().unwrap_or(&0), 2);
        assert!(metrics::events().iter().any(|e| e.request_id == ctx.id && e.message == "deadline exceeded"));
        not_started(&ctx, &RunError::NotFound("cage rec-test has no module m".into()));
        assert_eq!(figures.requests.load(Ordering::Relaxed), 4);
        assert_eq!(figures.errors.load(Ordering::Relaxed), 2);
        assert_eq!(figures.in_flight.load(Ordering::Relaxed), 0);
    }
}
