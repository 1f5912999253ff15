//! Resources: how module code reaches the outside world. A protocol plugin reads its config and
//! makes connections; this crate pools them per worker thread (with a circuit breaker shared by
//! the workers) and runs transactions: every participant on its own connection, in parallel,
//! then commit or rollback.
//!
//! Stages of a protocol, in order: `configure` (main thread, also `pmnc check`; problems are
//! recorded in the section) → `connect` (on a worker thread, bounded by `connect_timeout` and the
//! request's deadline) → per transaction `begin`, `call`..., `commit` or `rollback` → `is_healthy`
//! at every checkout of an idle connection → drop (disconnect).

pub mod cache;
mod pool;
pub mod testing;
#[cfg(feature = "test-tls")]
pub mod testing_tls;
#[cfg(feature = "tls")]
pub mod tls;
mod transaction;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::LocalBoxFuture;
use rustomnic_core::{Section, Value};

pub use cache::{all_cache_stats, CacheStats, ReadCache};
pub use pool::{all_stats, stats_for, Breaker, Cause, Pool, PoolSettings, PoolStats};
pub use transaction::{install, CageResources};

/// What went wrong in a resource; `code` is the protocol's own (SQLSTATE, ...).
#[derive(Debug, Clone, PartialEq)]
pub struct Error {
    pub message: String,
    pub code: Option<String>,
    /// The connection cannot be used again (lost, or in an unknown state).
    pub broken: bool,
}

impl Error {
    pub fn new(message: impl Into<String>) -> Error {
        Error { message: message.into(), code: None, broken: false }
    }

    /// An error after which the connection must be dropped.
    pub fn broken(message: impl Into<String>) -> Error {
        Error { message: message.into(), code: None, broken: true }
    }

    pub fn with_code(mut self, code: impl Into<String>) -> Error {
        self.code = Some(code.into());
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.message)
    }
}

impl std::error::Error for Error {}

/// An error and its causes on one line ("outer: inner"), each said once: drivers often keep the
/// reason ("Connection refused") in a source of a general error ("error connecting to server").
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let more = c.to_string();
        if !text.contains(&more) {
            text = format!("{text}: {more}");
        }
        cause = c.source();
    }
    text
}

/// One protocol of outbound calls (postgresql, redis, ...).
pub trait ResourceProtocol: Send + Sync {
    fn name(&self) -> &'static str;

    /// Reads this protocol's own keys from `section` (the pool keys are read by the runtime).
    fn configure(&self, resource: &str, section: &Section) -> Option<Arc<dyn Resource>>;
}

/// A configured resource, shared by every worker; it makes connections.
pub trait Resource: Send + Sync {
    /// Opens a connection on the current worker thread.
    fn connect(&self) -> LocalBoxFuture<'static, Result<Box<dyn Connection>, Error>>;

    /// Pool defaults for this protocol (a file or shell resource needs no real pool).
    fn default_pool_size(&self) -> usize {
        8
    }
}

/// One connection, owned by one worker thread.
pub trait Connection {
    /// Starts a transaction on this connection.
    fn begin(&mut self) -> LocalBoxFuture<'_, Result<(), Error>>;
    /// Makes one call (`xa.db.execute(sql, ...)` is method "execute").
    fn call<'a>(&'a mut self, method: &'a str, args: Vec<Value>) -> LocalBoxFuture<'a, Result<Value, Error>>;
    /// Ends the transaction keeping its effects. The default does nothing: for a protocol whose
    /// calls act at once (Redis, HTTP, commands) there is nothing left to commit.
    fn commit(&mut self) -> LocalBoxFuture<'_, Result<(), Error>> {
        Box::pin(async { Ok(()) })
    }
    /// Ends the transaction undoing what it can. The default does nothing: such a protocol says
    /// through `effects_stay` that its calls are not undone.
    fn rollback(&mut self) -> LocalBoxFuture<'_, Result<(), Error>> {
        Box::pin(async { Ok(()) })
    }
    /// Cheap check made before an idle connection is handed out again. The default trusts the
    /// connection: right for one that reconnects by itself or holds no link at all.
    fn is_healthy(&mut self) -> LocalBoxFuture<'_, bool> {
        Box::pin(async { true })
    }
    /// Whether the call just made (`method`, ending in `outcome`) may have left effects that
    /// `rollback` does not undo. Transactional protocols keep the default (false); a protocol
    /// whose calls act at once (Redis, HTTP, commands) says true whenever it may have acted, and
    /// the transaction's failure is then not recoverable (docs/decisions/009).
    fn effects_stay(&self, _method: &str, _outcome: &Result<Value, Error>) -> bool {
        false
    }
}

/// The config of one `[resources.NAME]` table.
#[derive(Clone)]
pub struct ResourceConfig {
    pub name: String,
    pub protocol: String,
    pub pool: PoolSettings,
    pub resource: Arc<dyn Resource>,
    /// The table as written (see `Section::fingerprint`): a reload rebuilds the pool only when
    /// this changes.
    pub fingerprint: String,
    /// The circuit breaker, one per config and shared by the pools of every worker (a clone of
    /// the config shares it).
    pub breaker: Arc<Breaker>,
}

impl fmt::Debug for ResourceConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResourceConfig").field("name", &self.name).field("protocol", &self.protocol).field("pool", &self.pool).finish()
    }
}

/// Reads the keys every resource has (protocol aside): the pool settings.
pub fn read_pool_settings(section: &Section, default_size: usize) -> PoolSettings {
    let d = PoolSettings::default();
    PoolSettings {
        size: section.integer("pool_size", 1, 10_000).map(|v| v.value as usize).unwrap_or(default_size),
        min_idle: section.integer("min_idle", 0, 10_000).map(|v| v.value as usize).unwrap_or(d.min_idle),
        idle_timeout: section.duration("idle_timeout", Duration::from_secs(86400)).map(|v| v.value).unwrap_or(d.idle_timeout),
        max_age: section.duration("max_age", Duration::from_secs(86400 * 30)).map(|v| v.value).unwrap_or(d.max_age),
        connect_timeout: section.duration("connect_timeout", Duration::from_secs(600)).map(|v| v.value).unwrap_or(d.connect_timeout),
        breaker_failures: section.integer("breaker_failures", 1, 1_000_000).map(|v| v.value as u32).unwrap_or(d.breaker_failures),
        breaker_cooldown: section.duration("breaker_cooldown", Duration::from_secs(3600)).map(|v| v.value).unwrap_or(d.breaker_cooldown),
        cache_size: section.size("cache_size", MAX_CACHE_SIZE).map(|v| v.value).unwrap_or(d.cache_size),
        cache_max_value: section.size("cache_max_value", MAX_CACHE_SIZE).map(|v| v.value).unwrap_or(d.cache_max_value),
    }
}

/// The largest `cache_size` (and `cache_max_value`) accepted: 64 GiB.
pub const MAX_CACHE_SIZE: u64 = 64 << 30;

/// The pool keys, for "unknown key" messages.
pub const POOL_KEYS: &[&str] =
    &["pool_size", "min_idle", "idle_timeout", "max_age", "connect_timeout", "breaker_failures", "breaker_cooldown", "cache_size", "cache_max_value"];
