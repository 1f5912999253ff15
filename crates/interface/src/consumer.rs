//! What the interfaces that consume from a broker share: a thread of their own with a
//! single-threaded runtime, and sessions one after another with backoff, each outage said once
//! when it starts and once when it ends, not at every retry.

use std::future::Future;
use std::sync::{Arc, Mutex};
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
///
/// Several sessions of one interface (one per worker) share what is said: made with
/// [`Outage::shared`], an outage is said once by the first session to fail, and its end by the
/// first to connect again; each session still keeps its own backoff.
#[derive(Debug, Default)]
pub struct Outage {
    /// This session's outage: its backoff starts again at each new one.
    since: Option<Instant>,
    /// The outage the sessions share, when there are several.
    shared: Option<SharedOutage>,
}

impl Outage {
    /// An outage shared with the sessions that were given clones of `said`.
    pub fn shared(said: &SharedOutage) -> Outage {
        Outage { since: None, shared: Some(said.clone()) }
    }

    /// Ends the outage under way: how long it lasted, or `None` when there was none (or another
    /// session of a shared outage has said its end already).
    pub fn end(&mut self) -> Option<Duration> {
        let mine = self.since.take().map(|s| s.elapsed());
        match &self.shared {
            Some(shared) => shared.end(),
            None => mine,
        }
    }

    /// Records a failure: whether it starts this session's outage, and whether it is to be said
    /// (it starts the outage the sessions share).
    fn begin(&mut self) -> (bool, bool) {
        let new = self.since.is_none();
        if new {
            self.since = Some(Instant::now());
        }
        let said = match &self.shared {
            Some(shared) => shared.begin(),
            None => new,
        };
        (new, said)
    }
}

/// The outage under way as several sessions of one interface see it (one per worker; see
/// [`Outage::shared`]): its start, said once when it starts and once when it ends. Clones share
/// it.
#[derive(Debug, Default, Clone)]
pub struct SharedOutage(Arc<Mutex<Option<Instant>>>);

impl SharedOutage {
    /// Records the start of an outage; true when it is new (to be said).
    pub fn begin(&self) -> bool {
        let mut since = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let new = since.is_none();
        if new {
            *since = Some(Instant::now());
        }
        new
    }

    /// Ends the outage: how long it lasted, or `None` when none was under way (or its end was
    /// said already).
    pub fn end(&self) -> Option<Duration> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take().map(|t| t.elapsed())
    }
}

/// Runs `session` until the interface's shutdown: `Ok` is a session ended by the shutdown, `Err`
/// a failure, after which another session starts once the backoff has passed (0.2 s doubling to
/// 5 s, from 0.2 s again for each new outage). The first failure of an outage is
/// logged as a warning; the next ones, until a session connects, at debug level.
pub async fn reconnecting(host: &Host, session: impl AsyncFnMut(&mut Outage) -> Result<(), String>) {
    reconnecting_with(host, Outage::default(), session).await
}

/// [`reconnecting`] with `outage` given, e.g. one shared with other sessions
/// ([`Outage::shared`]).
pub async fn reconnecting_with(host: &Host, mut outage: Outage, mut session: impl AsyncFnMut(&mut Outage) -> Result<(), String>) {
    let spec = host.spec();
    let mut shutdown = host.shutdown();
    let mut backoff = FIRST_BACKOFF;
    loop {
        if *shutdown.borrow() {
            return;
        }
        let Err(e) = session(&mut outage).await else { return };
        // A new outage: the session connected and then failed, or the first never did.
        let (new, said) = outage.begin();
        if new {
            backoff = FIRST_BACKOFF;
        }
        if said {
            tracing::warn!(cage = %spec.cage, interface = %spec.name, "{e}; connecting again with backoff (this is said once until it works)");
        } else {
            tracing::debug!(cage = %spec.cage, interface = %spec.name, "still unavailable: {e}");
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.changed() => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shared_outage_is_said_once_and_ended_once() {
        let said = SharedOutage::default();
        let (mut a, mut b) = (Outage::shared(&said), Outage::shared(&said));
        assert_eq!(a.begin(), (true, true), "the first session to fail says the outage");
        assert_eq!(b.begin(), (true, false), "the second starts its own backoff but says nothing");
        assert_eq!(a.begin(), (false, false), "a failure again is the same outage");
        assert!(b.end().is_some(), "the first to connect again says the end");
        assert!(a.end().is_none(), "the second does not say it again");
        assert_eq!(a.begin(), (true, true), "a failure after connecting is a new outage");
        let mut alone = Outage::default();
        assert_eq!(alone.begin(), (true, true));
        assert_eq!(alone.begin(), (false, false));
        assert!(alone.end().is_some());
        assert!(alone.end().is_none());
    }
}
