//! The boundary between Lua transactions and resources: what `xa.execute()` hands to the
//! resources of the cage, and what comes back.
//!
//! A transaction runs in two steps so that Lua can decide in between (`accept`): [`Resources::run`]
//! checks out a connection per participant, begins and makes every call in parallel, and returns
//! a [`Prepared`] transaction holding the outcomes; [`Prepared::finish`] then commits or rolls
//! back every participant.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Instant;

use futures_util::future::LocalBoxFuture;
use rustomnic_core::Value;

/// One recorded call of a transaction: `xa.db.execute(sql, ...)`.
#[derive(Debug, Clone, PartialEq)]
pub struct Participant {
    pub resource: String,
    pub method: String,
    pub args: Vec<Value>,
    /// `xa.db.cached{key = ..., ttl = ...}.execute(...)`: the result may come from (and goes to)
    /// the resource's read cache (docs/decisions/143).
    pub cached: Option<CachedRead>,
    /// `xa.db.invalidates{...}.execute(...)`: cache keys (a trailing `*` for a prefix) dropped
    /// from the resource's read cache once this participant commits.
    pub invalidates: Vec<String>,
}

impl Participant {
    /// A plain call: not cached, invalidating nothing.
    pub fn new(resource: impl Into<String>, method: impl Into<String>, args: Vec<Value>) -> Participant {
        Participant { resource: resource.into(), method: method.into(), args, cached: None, invalidates: Vec::new() }
    }
}

/// The `cached{...}` table of a participant, checked by the prelude.
#[derive(Debug, Clone, PartialEq)]
pub struct CachedRead {
    pub key: String,
    /// How long a result stays fresh.
    pub ttl: std::time::Duration,
}

/// Longest cache key (bytes) `cached` and `invalidates` accept; the prelude says so too.
pub const MAX_CACHE_KEY: usize = 1024;

/// Why a participant failed; becomes the Lua error table of `xa.execute()`.
#[derive(Debug, Clone, PartialEq)]
pub struct ParticipantError {
    pub resource: String,
    /// 1-based position of the participant in the transaction.
    pub participant: usize,
    /// The protocol's error code (SQLSTATE, ...), when there is one.
    pub code: Option<String>,
    pub message: String,
    /// True when everything was rolled back before any irreversible step.
    pub recoverable: bool,
}

impl std::fmt::Display for ParticipantError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "resource {} (participant {}): {}", self.resource, self.participant, self.message)?;
        if let Some(code) = &self.code {
            write!(f, " [{code}]")?;
        }
        Ok(())
    }
}

/// A transaction whose calls have been made, waiting for commit or rollback.
pub trait Prepared {
    /// The result of every participant, in the order they were added.
    fn outcomes(&self) -> &[Result<Value, ParticipantError>];
    /// Commits (when `commit`) or rolls back every participant; a participant that failed is
    /// always rolled back. With `wait` false a commit is started and not waited for.
    fn finish(self: Box<Self>, commit: bool, wait: bool, deadline: Instant) -> LocalBoxFuture<'static, Result<(), ParticipantError>>;
    /// True when a participant's call had effects that a rollback does not undo (a Redis write,
    /// an HTTP request): then a transaction that does not commit is not recoverable.
    fn effects_stay(&self) -> bool {
        false
    }
    /// True when finishing has nothing to do (every participant was answered without a
    /// connection, e.g. from the read cache, and none invalidates): Lua then skips `finish`.
    fn idle(&self) -> bool {
        false
    }
}

/// The resources of the cages on this worker thread.
pub trait Resources {
    /// Runs the calls of a transaction of `cage` in parallel under `deadline`.
    fn run(&self, cage: &str, participants: Vec<Participant>, deadline: Instant) -> LocalBoxFuture<'static, Result<Box<dyn Prepared>, ParticipantError>>;

    /// `pmnc.cache.invalidate(resource, keys)`: drops `keys` (a trailing `*` for a prefix) from
    /// the read cache of `resource` of `cage` at once. The default knows no cache.
    fn invalidate(&self, cage: &str, resource: &str, _keys: &[String]) -> Result<(), String> {
        Err(format!("cage {cage} has no resource {resource} with a read cache"))
    }
}

thread_local! {
    static RESOURCES: RefCell<Option<Rc<dyn Resources>>> = const { RefCell::new(None) };
}

/// Installs the resources of this worker thread.
pub fn set_resources(resources: Rc<dyn Resources>) {
    RESOURCES.with(|r| *r.borrow_mut() = Some(resources));
}

pub(crate) fn resources() -> Option<Rc<dyn Resources>> {
    RESOURCES.with(|r| r.borrow().clone())
}

pub(crate) fn clear() {
    RESOURCES.with(|r| r.borrow_mut().take());
}
