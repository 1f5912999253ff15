//! A pool of connections of one resource on one worker thread, with a circuit breaker: after
//! `breaker_failures` connect failures in a row, checkouts fail at once for `breaker_cooldown`,
//! then one probe connect is let through; its success closes the breaker.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
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
        }
    }
}

/// Counters of one resource over every worker, for monitoring.
#[derive(Debug, Default)]
pub struct PoolStats {
    pub calls: AtomicU64,
    pub errors: AtomicU64,
    /// Sum of call latencies in microseconds.
    pub latency_us: AtomicU64,
    pub in_use: AtomicUsize,
    pub idle: AtomicUsize,
    pub waiting: AtomicUsize,
    pub connect_failures: AtomicU64,
    /// Call latencies, for the monitor's percentiles and Prometheus buckets.
    pub latency: rustomnic_core::metrics::Histogram,
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
    failures: Cell<u32>,
    last_failure: RefCell<String>,
    open_until: Cell<Option<Instant>>,
    probing: Cell<bool>,
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
}

impl Drop for Pooled {
    fn drop(&mut self) {
        let conn = std::mem::replace(&mut self.conn, Box::new(Gone));
        self.pool.checkin(conn, self.opened, self.broken);
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
    pub fn new(name: &str, resource: Arc<dyn Resource>, settings: PoolSettings, workers: usize, stats: Arc<PoolStats>) -> Rc<Pool> {
        let size = settings.size.div_ceil(workers.max(1)).max(1);
        Rc::new(Pool {
            name: name.to_string(),
            resource,
            settings,
            size,
            idle: RefCell::new(VecDeque::new()),
            open: Cell::new(0),
            freed: tokio::sync::Notify::new(),
            failures: Cell::new(0),
            last_failure: RefCell::new(String::new()),
            open_until: Cell::new(None),
            probing: Cell::new(false),
            stats,
        })
    }

    /// A connection, waiting at most until `deadline` for one to be free.
    pub async fn checkout(self: &Rc<Self>, deadline: Instant) -> Result<Pooled, Error> {
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
                self.breaker_check()?;
                self.open.set(self.open.get() + 1);
                let started = Instant::now();
                let limit = deadline.min(started + self.settings.connect_timeout);
                let connected = tokio::time::timeout_at(limit.into(), self.resource.connect()).await;
                return match connected {
                    Ok(Ok(conn)) => {
                        self.failures.set(0);
                        self.open_until.set(None);
                        self.probing.set(false);
                        Ok(self.hand_out(conn, Instant::now(), false))
                    }
                    Ok(Err(e)) => Err(self.connect_failed(e)),
                    Err(_) => Err(self.connect_failed(Error::new(format!("no answer within {:?}", limit.saturating_duration_since(started))))),
                };
            }
            self.stats.waiting.fetch_add(1, Ordering::Relaxed);
            let waited = tokio::time::timeout_at(deadline.into(), self.freed.notified()).await;
            self.stats.waiting.fetch_sub(1, Ordering::Relaxed);
            if waited.is_err() {
                return Err(Error::new(format!(
                    "no connection became free before the deadline (pool of {} per worker, all in use)",
                    self.size
                )));
            }
        }
    }

    fn hand_out(self: &Rc<Self>, conn: Box<dyn Connection>, opened: Instant, reused: bool) -> Pooled {
        self.stats.in_use.fetch_add(1, Ordering::Relaxed);
        Pooled { conn, reused, opened, pool: self.clone(), broken: false }
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

    fn breaker_check(&self) -> Result<(), Error> {
        if let Some(until) = self.open_until.get() {
            if Instant::now() < until || self.probing.get() {
                return Err(Error::new(format!(
                    "unavailable after {} failed connects in a row (last: {}); retrying in {:.1}s",
                    self.failures.get(),
                    self.last_failure.borrow(),
                    until.saturating_duration_since(Instant::now()).as_secs_f64()
                )));
            }
            // Cooldown over: this connect is the probe.
            self.probing.set(true);
        }
        Ok(())
    }

    fn connect_failed(&self, error: Error) -> Error {
        let message = error.message;
        self.open.set(self.open.get().saturating_sub(1));
        self.probing.set(false);
        self.stats.connect_failures.fetch_add(1, Ordering::Relaxed);
        let n = self.failures.get() + 1;
        self.failures.set(n);
        *self.last_failure.borrow_mut() = message.clone();
        if n >= self.settings.breaker_failures {
            self.open_until.set(Some(Instant::now() + self.settings.breaker_cooldown));
        }
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
        while self.idle.borrow().len() < wanted && self.open.get() < self.size && self.open_until.get().is_none() {
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
}
