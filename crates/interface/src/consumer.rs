//! What the interfaces that consume from a broker share: a thread of their own with a
//! single-threaded runtime, and sessions one after another with backoff, each outage said once
//! when it starts and once when it ends, not at every retry.

use std::future::Future;
use std::time::{Duration, Instant};

use crate::{Host, InterfaceSpec};

/// The first wait before connecting again, doubled after each failure up to [`MAX_BACKOFF`].
pub const FIRST_BACKOFF: Duration = Duration::from_millis(200);
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Runs the future `make` builds on a thread named `pmnc-<protocol>-<interface>` with a runtime of
/// its own (the consumer's I/O never waits behind a worker's Lua); a thread or runtime that
/// cannot start is logged with the interface's name.
pub fn spawn<F, M>(spec: &InterfaceSpec, make: M)
where
    F: Future<Output = ()> + 'static,
    M: FnOnce() -> F + Send + 'static,
{
    let (cage, name, protocol) = (spec.cage.clone(), spec.name.clone(), spec.protocol.clone());
    let thread = format!("pmnc-{protocol}-{name}");
    let (c, n, p) = (cage.clone(), name.clone(), protocol.clone());
    let started = std::thread::Builder::new().name(thread).spawn(move || match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt.block_on(make()),
        Err(e) => tracing::error!(cage = %c, interface = %n, "cannot start the {p} consumer: {e}"),
    });
    if let Err(e) = started {
        tracing::error!(cage = %cage, interface = %name, "cannot start the {protocol} consumer's thread: {e}");
    }
}

/// The outage under way, if any. A session that has connected calls [`Outage::end`] to learn
/// whether it ended one (and say so).
#[derive(Debug, Default)]
pub struct Outage {
    since: Option<Instant>,
}

impl Outage {
    /// Ends the outage under way: how long it lasted, or `None` when there was none.
    pub fn end(&mut self) -> Option<Duration> {
        self.since.take().map(|s| s.elapsed())
    }
}

/// Runs `session` until the interface's shutdown: `Ok` is a session ended by the shutdown, `Err`
/// a failure, after which another session starts once the backoff has passed (0.2 s doubling to
/// 5 s, from 0.2 s again for each new outage). The first failure of an outage is
/// logged as a warning; the next ones, until a session connects, at debug level.
pub async fn reconnecting(host: &Host, mut session: impl AsyncFnMut(&mut Outage) -> Result<(), String>) {
    let spec = host.spec();
    let mut shutdown = host.shutdown();
    let mut outage = Outage::default();
    let mut backoff = FIRST_BACKOFF;
    loop {
        if *shutdown.borrow() {
            return;
        }
        let Err(e) = session(&mut outage).await else { return };
        match outage.since {
            // A new outage (the session connected and then failed, or the first never did).
            None => {
                tracing::warn!(cage = %spec.cage, interface = %spec.name, "{e}; connecting again with backoff (this is said once until it works)");
                outage.since = Some(Instant::now());
                backoff = FIRST_BACKOFF;
            }
            Some(_) => tracing::debug!(cage = %spec.cage, interface = %spec.name, "still unavailable: {e}"),
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.changed() => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}
