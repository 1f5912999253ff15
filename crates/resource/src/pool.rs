//! A pool of connections of one resource on one worker thread, and the circuit breaker of the
//! resource, shared by every worker of the process: after `breaker_failures` connect failures in
//! a row (on any workers), connects fail at once on every worker for `breaker_cooldown`, then one
//! probe connect is let through; its success closes the breaker.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::{Connection, Error, Resource};

/// Pool keys of `[resources.NAME]`.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolSettings {
    /// Connections per process, split evenly over the worker threads (each gets at least one).
    pub size: usize,
    /// Idle connections each worker keeps ready (standby), when the server is reachable.
    pub min_idle: usize,
    /// An idle connection older than this (since its last use) is closed.
    pub idle_timeout: Duration,
    /// A connection older than this (since it was opened) is closed when it comes back.
    pub max_age: Duration,
    pub connect_timeout: Duration,
    pub breaker_failures: u32,
    pub breaker_cooldown: Duration,
    /// Bytes (estimated) the read cache of the resource may hold, over every worker of the
    /// process (`cache_size`, docs/decisions/143).
    pub cache_size: u64,
    /// A result bigger than this is not kept in the read cache (`cache_max_value`).
    pub cache_max_value: u64,
}

impl Default for PoolSettings {
    fn default() -> Self {
        PoolSettings {
            size: 8,
            min_idle: 0,
            idle_timeout: Duration::from_secs(60),
            max_age: Duration::from_secs(1800),
            connect_timeout: Duration::from_secs(5),
            breaker_failures: 5,
            breaker_cooldown: Duration::from_secs(5),
            cache_size: 16 << 20,
            cache_max_value: 1 << 20,
        }
    }
}

/// Why a call to a resource failed: the label `cause` of `pmnc_resource_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// A new connection could not be opened (refused, unreachable, no answer in `connect_timeout`).
    Connect,
    /// The breaker was open: no connect was tried.
    BreakerOpen,
    /// Every connection of the worker's share of the pool stayed in use until the deadline.
    PoolTimeout,
    /// The transaction had more participants on the resource than the worker's share of its pool,
    /// so it was refused before any call.
    PoolSize,
    /// The call itself failed (the server's error, a lost connection).
    Query,
    /// The request's deadline passed during the connect or the call.
    Deadline,
}

impl Cause {
    pub const ALL: [Cause; 6] = [Cause::Connect, Cause::BreakerOpen, Cause::PoolTimeout, Cause::PoolSize, Cause::Query, Cause::Deadline];

    /// The value of the `cause` label.
    pub fn label(self) -> &'static str {
        match self {
            Cause::Connect => "connect",
            Cause::BreakerOpen => "breaker_open",
            Cause::PoolTimeout => "pool_timeout",
            Cause::PoolSize => "pool_size",
            Cause::Query => "query",
            Cause::Deadline => "deadline",
        }
    }
}

/// Counters of one resource over every worker, for monitoring.
#[derive(Debug, Default)]
pub struct PoolStats {
    /// Every call a module made, whether or not it got a connection.
    pub calls: AtomicU64,
    /// Calls that failed, whatever the cause (the sum of `errors_by_cause`).
    pub errors: AtomicU64,
    /// Failed calls by cause, indexed like `Cause::ALL`.
    pub errors_by_cause: [AtomicU64; 6],
    /// Sum of call latencies in microseconds.
    pub latency_us: AtomicU64,
    pub in_use: AtomicUsize,
    pub idle: AtomicUsize,
    pub waiting: AtomicUsize,
    pub connect_failures: AtomicU64,
    /// Call latencies from the checkout on, for the monitor's percentiles and Prometheus buckets.
    pub latency: rustomnic_core::metrics::Histogram,
}

impl PoolStats {
    /// Counts one call that took `took` (checkout included) and failed with `failed`, if it did.
    pub fn record(&self, took: Duration, failed: Option<Cause>) {
        let us = took.as_micros() as u64;
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.latency_us.fetch_add(us, Ordering::Relaxed);
        self.latency.observe_us(us);
        if let Some(cause) = failed {
            self.errors.fetch_add(1, Ordering::Relaxed);
            self.errors_by_cause[cause as usize].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Failed calls of one cause.
    pub fn errors_of(&self, cause: Cause) -> u64 {
        self.errors_by_cause[cause as usize].load(Ordering::Relaxed)
    }
}

/// The circuit breaker of one configured resource, shared by the pools of every worker (one per
/// `ResourceConfig`, so a changed config starts with a closed breaker).
#[derive(Debug, Default)]
pub struct Breaker {
    state: Mutex<BreakerState>,
}

#[derive(Debug, Default)]
struct BreakerState {
    /// Connect failures in a row, over every worker.
    failures: u32,
    last_failure: String,
    open_until: Option<Instant>,
    /// When the probe connect after a cooldown started. A probe whose request was dropped
    /// mid-connect never reports back; after `connect_timeout` another probe may go.
    probe_since: Option<Instant>,
}

impl Breaker {
    fn lock(&self) -> std::sync::MutexGuard<'_, BreakerState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// May a connect be tried now? Past the cooldown the caller becomes the probe.
    fn check(&self, settings: &PoolSettings) -> Result<(), Error> {
        let mut s = self.lock();
        let Some(until) = s.open_until else { return Ok(()) };
        let now = Instant::now();
        let probe_running = s.probe_since.is_some_and(|t| now.duration_since(t) < settings.connect_timeout);
        if now < until || probe_running {
            return Err(Error::new(format!(
                "unavailable after {} failed connects in a row (last: {}); retrying in {:.1}s",
                s.failures,
                s.last_failure,
                until.saturating_duration_since(now).as_secs_f64()
            )));
        }
        s.probe_since = Some(now);
        Ok(())
    }

    fn succeeded(&self) {
        let mut s = self.lock();
        s.failures = 0;
        s.open_until = None;
        s.probe_since = None;
    }

    fn failed(&self, settings: &PoolSettings, message: &str) {
        let mut s = self.lock();
        s.failures = s.failures.saturating_add(1);
        s.last_failure = message.to_string();
        s.probe_since = None;
        if s.failures >= settings.breaker_failures {
            s.open_until = Some(Instant::now() + settings.breaker_cooldown);
        }
    }

    /// Whether connects are refused now (open, or a probe is out).
    pub fn is_open(&self) -> bool {
        self.lock().open_until.is_some()
    }

    /// Connect failures in a row, over every worker.
    pub fn failures(&self) -> u32 {
        self.lock().failures
    }
}

/// Every resource's counters in this process, by (cage, resource), for monitoring.
static STATS: std::sync::Mutex<std::collections::BTreeMap<(String, String), Arc<PoolStats>>> = std::sync::Mutex::new(std::collections::BTreeMap::new());

/// The counters of a cage's resource, shared by every worker (made on first use).
pub fn stats_for(cage: &str, resource: &str) -> Arc<PoolStats> {
    let mut all = STATS.lock().unwrap_or_else(|e| e.into_inner());
    all.entry((cage.to_string(), resource.to_string())).or_default().clone()
}

/// A snapshot of every resource's counters: (cage, resource, counters).
pub fn all_stats() -> Vec<(String, String, Arc<PoolStats>)> {
    let all = STATS.lock().unwrap_or_else(|e| e.into_inner());
    all.iter().map(|((c, r), s)| (c.clone(), r.clone(), s.clone())).collect()
}

struct Idle {
    conn: Box<dyn Connection>,
    opened: Instant,
    last_used: Instant,
}

/// See the module docs. Lives on one worker thread.
pub struct Pool {
    pub name: String,
    resource: Arc<dyn Resource>,
    settings: PoolSettings,
    /// This worker's share of `settings.size`.
    size: usize,
    idle: RefCell<VecDeque<Idle>>,
    open: Cell<usize>,
    freed: tokio::sync::Notify,
    breaker: Arc<Breaker>,
    pub stats: Arc<PoolStats>,
}

/// A connection checked out of its pool; it goes back when dropped.
pub struct Pooled {
    conn: Box<dyn Connection>,
    /// It sat idle in the pool before this checkout (so the server may have closed it meanwhile).
    reused: bool,
    opened: Instant,
    pool: Rc<Pool>,
    broken: bool,
    /// A transaction was begun on it and has not ended: dropped now (its request abandoned
    /// mid-way), it is closed, never handed to another request inside that transaction.
    in_transaction: bool,
}

impl Pooled {
    pub fn conn(&mut self) -> &mut dyn Connection {
        &mut *self.conn
    }

    /// The connection may be in an unknown state: close it instead of reusing it.
    pub fn mark_broken(&mut self) {
        self.broken = true;
    }

    pub fn is_broken(&self) -> bool {
        self.broken
    }

    pub fn is_reused(&self) -> bool {
        self.reused
    }

    /// Marks a transaction begun (true) or ended by a commit or rollback that succeeded (false).
    pub fn set_in_transaction(&mut self, yes: bool) {
        self.in_transaction = yes;
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        let conn = std::mem::replace(&mut self.conn, Box::new(Gone));
        self.pool.checkin(conn, self.opened, self.broken || self.in_transaction);
    }
}

/// Stands in for a connection that went back to its pool.
struct Gone;

impl Connection for Gone {
    fn begin(&mut self) -> futures_util::future::LocalBoxFuture<'_, Result<(), Error>> {
        Box::pin(async { Err(Error::broken("connection returned to its pool")) })
    }
    fn call<'a>(&'a mut self, _: &'a str, _: Vec<rustomnic_core::Value>) -> futures_util::future::LocalBoxFuture<'a, Result<rustomnic_core::Value, Error>> {
        Box::pin(async { Err(Error::broken("connection returned to its pool")) })
    }
    fn commit(&mut self) -> futures_util::future::LocalBoxFuture<'_, Result<(), Error>> {
        Box::pin(async { Err(Error::broken("connection returned to its pool")) })
    }
    fn rollback(&mut self) -> futures_util::future::LocalBoxFuture<'_, Result<(), Error>> {
        Box::pin(async { Err(Error::broken("connection returned to its pool")) })
    }
    fn is_healthy(&mut self) -> futures_util::future::LocalBoxFuture<'_, bool> {
        Box::pin(async { false })
    }
}

impl Pool {
    /// `breaker` is the resource's, shared with the pools of the other workers.
    pub fn new(name: &str, resource: Arc<dyn Resource>, settings: PoolSettings, workers: usize, stats: Arc<PoolStats>, breaker: Arc<Breaker>) -> Rc<Pool> {
        let size = settings.size.div_ceil(workers.max(1)).max(1);
        Rc::new(Pool {
            name: name.to_string(),
            resource,
            settings,
            size,
            idle: RefCell::new(VecDeque::new()),
            open: Cell::new(0),
            freed: tokio::sync::Notify::new(),
            breaker,
            stats,
        })
    }

    /// A connection, waiting at most until `deadline` for one to be free.
    pub async fn checkout(self: &Rc<Self>, deadline: Instant) -> Result<Pooled, Error> {
        self.checkout_why(deadline).await.map_err(|(e, _)| e)
    }

    /// Like [`Pool::checkout`], saying why it failed.
    pub async fn checkout_why(self: &Rc<Self>, deadline: Instant) -> Result<Pooled, (Error, Cause)> {
        loop {
            if let Some(mut idle) = self.take_idle() {
                let healthy = tokio::time::timeout_at(deadline.into(), idle.conn.is_healthy()).await.unwrap_or(false);
                if healthy {
                    return Ok(self.hand_out(idle.conn, idle.opened, true));
                }
                self.forget_one();
                continue;
            }
            if self.open.get() < self.size {
                self.breaker.check(&self.settings).map_err(|e| (e, Cause::BreakerOpen))?;
                self.open.set(self.open.get() + 1);
                let started = Instant::now();
                let by_deadline = deadline < started + self.settings.connect_timeout;
                let limit = deadline.min(started + self.settings.connect_timeout);
                let connected = tokio::time::timeout_at(limit.into(), self.resource.connect()).await;
                return match connected {
                    Ok(Ok(conn)) => {
                        self.breaker.succeeded();
                        Ok(self.hand_out(conn, Instant::now(), false))
                    }
                    Ok(Err(e)) => Err((self.connect_failed(e), Cause::Connect)),
                    Err(_) => {
                        let e = self.connect_failed(Error::new(format!("no answer within {:?}", limit.saturating_duration_since(started))));
                        Err((e, if by_deadline { Cause::Deadline } else { Cause::Connect }))
                    }
                };
            }
            self.stats.waiting.fetch_add(1, Ordering::Relaxed);
            let waited = tokio::time::timeout_at(deadline.into(), self.freed.notified()).await;
            self.stats.waiting.fetch_sub(1, Ordering::Relaxed);
            if waited.is_err() {
                let e = Error::new(format!("no connection became free before the deadline (pool of {} per worker, all in use)", self.size));
                return Err((e, Cause::PoolTimeout));
            }
        }
    }

    fn hand_out(self: &Rc<Self>, conn: Box<dyn Connection>, opened: Instant, reused: bool) -> Pooled {
        self.stats.in_use.fetch_add(1, Ordering::Relaxed);
        Pooled { conn, reused, opened, pool: self.clone(), broken: false, in_transaction: false }
    }

    fn take_idle(&self) -> Option<Idle> {
        let mut idle = self.idle.borrow_mut();
        let now = Instant::now();
        while let Some(c) = idle.pop_back() {
            self.stats.idle.fetch_sub(1, Ordering::Relaxed);
            if now.duration_since(c.last_used) < self.settings.idle_timeout && now.duration_since(c.opened) < self.settings.max_age {
                return Some(c);
            }
            self.open.set(self.open.get().saturating_sub(1));
        }
        None
    }

    fn forget_one(&self) {
        self.open.set(self.open.get().saturating_sub(1));
        self.freed.notify_one();
    }

    fn checkin(&self, conn: Box<dyn Connection>, opened: Instant, broken: bool) {
        self.stats.in_use.fetch_sub(1, Ordering::Relaxed);
        if broken || opened.elapsed() >= self.settings.max_age {
            drop(conn);
            self.forget_one();
            return;
        }
        self.idle.borrow_mut().push_back(Idle { conn, opened, last_used: Instant::now() });
        self.stats.idle.fetch_add(1, Ordering::Relaxed);
        self.freed.notify_one();
    }

    fn connect_failed(&self, error: Error) -> Error {
        let message = error.message;
        self.open.set(self.open.get().saturating_sub(1));
        self.stats.connect_failures.fetch_add(1, Ordering::Relaxed);
        self.breaker.failed(&self.settings, &message);
        self.freed.notify_one();
        Error { message: format!("cannot connect: {message}"), code: error.code, broken: false }
    }

    /// Closes idle connections past their time and opens standby ones up to `min_idle`.
    pub async fn maintain(self: &Rc<Self>) {
        let now = Instant::now();
        {
            let mut idle = self.idle.borrow_mut();
            let before = idle.len();
            idle.retain(|c| now.duration_since(c.last_used) < self.settings.idle_timeout && now.duration_since(c.opened) < self.settings.max_age);
            let closed = before - idle.len();
            self.open.set(self.open.get().saturating_sub(closed));
            self.stats.idle.fetch_sub(closed, Ordering::Relaxed);
        }
        let wanted = self.settings.min_idle.min(self.size);
        while self.idle.borrow().len() < wanted && self.open.get() < self.size && !self.breaker.is_open() {
            match self.checkout(Instant::now() + self.settings.connect_timeout).await {
                Ok(c) => drop(c),
                Err(_) => break,
            }
        }
    }

    /// This worker's share of the pool.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Connections open on this worker (in use and idle).
    pub fn open_connections(&self) -> usize {
        self.open.get()
    }

    pub fn idle_connections(&self) -> usize {
        self.idle.borrow().len()
    }

    /// The resource's breaker, shared by every worker.
    pub fn breaker(&self) -> &Breaker {
        &self.breaker
    }
}
