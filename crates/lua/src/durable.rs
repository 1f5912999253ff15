//! Durable calls as Lua sees them: `pmnc("<cage>", {queue = ...}).m.f(...)` and
//! `pmnc.calls.result(id)`. The Lua host only parses options and hands the call to the
//! installed [`Calls`] service (the task queue, crates/queue), which it cannot depend on.

use std::sync::{Arc, RwLock};

use futures_util::future::LocalBoxFuture;
use mlua::{Lua, MultiValue, Table, Value as LuaValue};
use rustomnic_core::Value;

use crate::convert::to_lua;
use crate::transaction::ParticipantError;

/// A call to be stored and delivered later.
#[derive(Debug, Clone, PartialEq)]
pub struct DurableCall {
    pub from_cage: String,
    pub cage: String,
    pub module: String,
    pub function: String,
    pub args: Vec<Value>,
    pub options: CallOptions,
}

/// The options table of `pmnc("<cage>", options)`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CallOptions {
    pub queue: String,
    /// De-duplication id; a new unique one when absent.
    pub id: Option<String>,
    /// Seconds from now after which the call is no longer tried (it goes to dead letters).
    pub expires_in: Option<f64>,
    /// Seconds from now before the first attempt.
    pub delay: Option<f64>,
    /// Unix time (seconds) of the first attempt.
    pub at: Option<f64>,
    /// Unix time (seconds) after which the call is no longer tried (wins over expires_in).
    pub expires_at: Option<f64>,
}

/// What `pmnc.calls.result(id)` reports.
#[derive(Debug, Clone, PartialEq)]
pub struct CallStatus {
    /// pending, running, failed (waiting for a retry), done or dead.
    pub status: String,
    pub cage: String,
    pub attempts: i64,
    /// The values returned, while kept (done calls, for the queue's result_ttl).
    pub value: Option<Vec<Value>>,
    pub error: Option<String>,
}

/// Commits (true) or rolls back (false) the other participants of a transaction.
pub type Finish = Box<dyn FnOnce(bool) -> LocalBoxFuture<'static, Result<(), ParticipantError>>>;

/// Why a transaction with durable calls failed.
#[derive(Debug, Clone, PartialEq)]
pub enum CommitFailure {
    /// A participant failed to commit; the calls were not stored.
    Participant(ParticipantError),
    /// The calls were refused (unknown queue, full disk); the participants were rolled back
    /// when the refusal came before their commit.
    Calls(String),
}

/// The service that stores and delivers durable calls.
pub trait Calls: Send + Sync {
    /// Stores the call durably; resolves to its id once it is on disk.
    fn enqueue(&self, call: DurableCall) -> LocalBoxFuture<'static, Result<String, String>>;
    /// Commits a transaction's participants through `finish` together with its durable calls:
    /// the calls are stored in the same SQLite commit as the cage's state writes of the
    /// transaction. Resolves to the calls' ids.
    fn commit_with_calls(&self, from_cage: &str, calls: Vec<DurableCall>, finish: Finish) -> LocalBoxFuture<'static, Result<Vec<String>, CommitFailure>>;
    /// The status of call `id` (stored in `cage`, or in any cage of this process when None).
    fn result(&self, cage: Option<&str>, id: &str) -> Result<Option<CallStatus>, String>;
}

static CALLS: RwLock<Option<Arc<dyn Calls>>> = RwLock::new(None);

/// Installs the durable call service of this process.
pub fn set_calls(calls: Arc<dyn Calls>) {
    if let Ok(mut c) = CALLS.write() {
        *c = Some(calls);
    }
}

fn calls() -> Option<Arc<dyn Calls>> {
    CALLS.read().ok().and_then(|c| c.clone())
}

const KNOWN: &str = "queue, id, expires_in, expires_at, delay, at";

fn seconds(target: &str, key: &str, v: LuaValue) -> Result<Option<f64>, String> {
    let n = match v {
        LuaValue::Nil => return Ok(None),
        LuaValue::Integer(i) => i as f64,
        LuaValue::Number(n) => n,
        other => return Err(format!("calling {target}: option {key} must be a number of seconds, got {}", other.type_name())),
    };
    if !n.is_finite() || n < 0.0 {
        return Err(format!("calling {target}: option {key} must be zero or more, got {n}"));
    }
    Ok(Some(n))
}

/// Reads the options table of a durable call.
pub fn options_from(target: &str, opts: &Table) -> Result<CallOptions, String> {
    let mut o = CallOptions::default();
    let mut queue = None;
    for pair in opts.pairs::<LuaValue, LuaValue>() {
        let (k, v) = pair.map_err(|e| format!("calling {target}: options: {e}"))?;
        let LuaValue::String(k) = k else {
            return Err(format!("calling {target}: option names are strings (known: {KNOWN})"));
        };
        let key = k.to_string_lossy();
        match key.as_str() {
            "queue" => match v {
                LuaValue::String(s) => queue = Some(s.to_string_lossy()),
                other => return Err(format!("calling {target}: option queue must be a string, got {}", other.type_name())),
            },
            "id" => match v {
                LuaValue::String(s) if !s.as_bytes().is_empty() && s.as_bytes().len() <= 256 => o.id = Some(s.to_string_lossy()),
                LuaValue::Integer(i) => o.id = Some(i.to_string()),
                LuaValue::String(_) => return Err(format!("calling {target}: option id must be 1 to 256 bytes")),
                other => return Err(format!("calling {target}: option id must be a string, got {}", other.type_name())),
            },
            "expires_in" => o.expires_in = seconds(target, "expires_in", v)?,
            "delay" => o.delay = seconds(target, "delay", v)?,
            "at" => o.at = seconds(target, "at", v)?,
            "expires_at" => o.expires_at = seconds(target, "expires_at", v)?,
            other => return Err(format!("calling {target}: unknown option {other:?} (known: {KNOWN})")),
        }
    }
    o.queue = queue.ok_or_else(|| format!("calling {target}: durable calls need option queue (the name of a [queues.NAME] of the target cage)"))?;
    if o.delay.is_some() && o.at.is_some() {
        return Err(format!("calling {target}: give delay or at, not both"));
    }
    Ok(o)
}

/// Stores a durable call through the installed service.
pub async fn enqueue(call: DurableCall) -> Result<String, String> {
    let Some(calls) = calls() else {
        return Err(format!("calling {}.{}.{}: durable calls are not available in this process", call.cage, call.module, call.function));
    };
    calls.enqueue(call).await
}

/// Commits a transaction with durable calls through the installed service.
pub async fn commit_with_calls(from_cage: &str, calls: Vec<DurableCall>, finish: Finish) -> Result<Vec<String>, CommitFailure> {
    let Some(service) = self::calls() else {
        let _ = finish(false).await;
        return Err(CommitFailure::Calls("durable calls are not available in this process".into()));
    };
    service.commit_with_calls(from_cage, calls, finish).await
}

/// `rust.call_result(id, cage)` for the prelude's pmnc.calls.result: (true, status table or
/// nil) or (false, message).
pub(crate) fn register(lua: &Lua, helpers: &Table) -> mlua::Result<()> {
    helpers.set(
        "call_result",
        lua.create_async_function(|lua, (id, cage): (LuaValue, Option<String>)| async move {
            let lua = &lua;
            let fail = |m: String| -> mlua::Result<MultiValue> { Ok(MultiValue::from_iter([LuaValue::Boolean(false), LuaValue::String(lua.create_string(m)?)])) };
            let id = match id {
                LuaValue::String(s) => s.to_string_lossy(),
                LuaValue::Integer(i) => i.to_string(),
                other => return fail(format!("pmnc.calls.result(id): id must be a string, got {}", other.type_name())),
            };
            let Some(calls) = calls() else { return fail("pmnc.calls.result: durable calls are not available in this process".into()) };
            // A read of the SQLite file: off the worker thread, which must never block.
            let key = id.clone();
            let read = tokio::task::spawn_blocking(move || calls.result(cage.as_deref(), &key)).await;
            let status = match read {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return fail(format!("pmnc.calls.result({id:?}): {e}")),
                Err(e) => return fail(format!("pmnc.calls.result({id:?}): the read failed: {e}")),
            };
            let Some(status) = status else {
                return Ok(MultiValue::from_iter([LuaValue::Boolean(true), LuaValue::Nil]));
            };
            let t = lua.create_table()?;
            t.raw_set("status", status.status.as_str())?;
            t.raw_set("cage", status.cage.as_str())?;
            t.raw_set("attempts", status.attempts)?;
            if let Some(values) = &status.value {
                if let Some(first) = values.first() {
                    t.raw_set("value", to_lua(lua, first)?)?;
                }
                let all = lua.create_table()?;
                for (i, v) in values.iter().enumerate() {
                    all.raw_set(i + 1, to_lua(lua, v)?)?;
                }
                t.raw_set("values", all)?;
            }
            if let Some(e) = &status.error {
                t.raw_set("error", e.as_str())?;
            }
            Ok(MultiValue::from_iter([LuaValue::Boolean(true), LuaValue::Table(t)]))
        })?,
    )
}
