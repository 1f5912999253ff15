//! Durable calls as Lua sees them: `pmnc("<cage>", {queue = ...}).m.f(...)`,
//! `pmnc.calls.result(id)`, `pmnc.calls.wait(id, timeout)` and `pmnc.calls.cancel(id)`, and the
//! workflows made of them (`pmnc.workflow`, workflow.rs). The Lua host only parses options
//! and hands the call to the installed [`Calls`] service (the task queue, crates/queue), which it
//! cannot depend on; the cluster engine reaches the same service through [`accept`] and tells it
//! which queues the cages of other processes have through [`set_directory`].

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use futures_util::future::LocalBoxFuture;
use mlua::{Lua, MultiValue, Table, Value as LuaValue};
use rustomnic_core::Value;

use crate::convert::to_lua;
use crate::transaction::ParticipantError;
use crate::worker::CallError;

/// The module through which one cage's outbox hands a durable call to another cage. Calls to it
/// are answered by the queue itself, never by Lua, and module code cannot call it.
pub const ACCEPT_MODULE: &str = "_queue";
/// The function of [`ACCEPT_MODULE`] that stores a forwarded call.
pub const ACCEPT_FUNCTION: &str = "accept";

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

impl DurableCall {
    /// "worker.work.handle", for messages.
    pub fn target(&self) -> String {
        format!("{}.{}.{}", self.cage, self.module, self.function)
    }
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
    /// Attempts after which a failing call goes to dead letters (wins over the queue's).
    pub max_attempts: Option<i64>,
    /// The W3C `traceparent` of the request that made the call (not a Lua option): every
    /// attempt runs as a span of that trace (docs/tracing.md).
    pub trace: Option<String>,
}

/// The largest `max_attempts` a call may set.
pub const MAX_ATTEMPTS: i64 = 1_000_000;

/// What `pmnc.calls.cancel(id)` answers.
#[derive(Debug, Clone, PartialEq)]
pub struct CancelAnswer {
    /// True when this cancel stopped the call (it will not run, or not run again).
    pub cancelled: bool,
    /// The status the call was in (pending, failed, running, or cancelled, done or dead when
    /// nothing changed); None when there is no such call.
    pub status: Option<String>,
    /// A sentence saying what happened, for people.
    pub message: String,
}

/// What `pmnc.calls.result(id)` reports.
#[derive(Debug, Clone, PartialEq)]
pub struct CallStatus {
    /// pending, running, failed (waiting for a retry), done, dead, cancelled, or forwarded (accepted by a
    /// cage of another process, where its progress is kept).
    pub status: String,
    /// The cage that stores the call (its target).
    pub cage: String,
    /// Attempts made so far; None when they are not known here (forwarded).
    pub attempts: Option<i64>,
    /// The values returned, while kept (done calls, for the queue's result_ttl).
    pub value: Option<Vec<Value>>,
    pub error: Option<String>,
}

impl CallStatus {
    /// Done, dead or cancelled: nothing about the call changes any more.
    pub fn is_final(&self) -> bool {
        self.status == "done" || self.status == "dead" || self.status == "cancelled"
    }

    /// Reads back what [`CallStatus::to_value`] made (a completion event from another process):
    /// the call's id and its status; None when it is not such a value.
    pub fn from_value(v: &Value) -> Option<(String, CallStatus)> {
        let Value::Map(m) = v else { return None };
        let get = |name: &str| m.iter().find(|(k, _)| k.as_str() == Some(name)).map(|(_, v)| v);
        let text = |name: &str| get(name).and_then(|v| v.as_str()).map(str::to_string);
        let status = CallStatus {
            status: text("status")?,
            cage: text("cage")?,
            attempts: match get("attempts") {
                Some(Value::Int(a)) => Some(*a),
                _ => None,
            },
            value: match get("values") {
                Some(Value::Array(values)) => Some(values.clone()),
                _ => None,
            },
            error: text("error"),
        };
        Some((text("id")?, status))
    }

    /// The status as one value: the table Lua sees, and the payload of a completion event.
    pub fn to_value(&self, id: &str, with_values: bool) -> Value {
        let mut m = vec![
            (Value::str("id"), Value::str(id)),
            (Value::str("status"), Value::str(self.status.as_str())),
            (Value::str("cage"), Value::str(self.cage.as_str())),
        ];
        if let Some(a) = self.attempts {
            m.push((Value::str("attempts"), Value::Int(a)));
        }
        if let (true, Some(values)) = (with_values, &self.value) {
            if let Some(first) = values.first() {
                m.push((Value::str("value"), first.clone()));
            }
            m.push((Value::str("values"), Value::Array(values.clone())));
        }
        if let Some(e) = &self.error {
            m.push((Value::str("error"), Value::str(e.as_str())));
        }
        Value::Map(m)
    }
}

/// The topic of `cage`'s events on which the completion of call `id` is published (to the cage
/// that sent the call and the cage that ran it). Ids longer than fit a topic get a hash of
/// themselves instead, the same in every process.
pub fn completion_topic(id: &str) -> String {
    const PREFIX: &str = "call:";
    if PREFIX.len() + id.len() <= crate::events::MAX_TOPIC_LEN {
        return format!("{PREFIX}{id}");
    }
    // FNV-1a: stable across processes and builds, unlike the std hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.as_bytes() {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("call#{h:016x}:{}", id.len())
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

/// The most steps a chain, group or chord may have (its body aside): every remaining step
/// travels with the step that runs before it, so the bound keeps that continuation small.
pub const MAX_WORKFLOW_STEPS: usize = 1000;
/// The longest workflow id: step ids (`<id>.<k>`, `<id>.body`, `<id>.on_error`) must stay
/// within the 256 bytes of a call id.
pub const MAX_WORKFLOW_ID: usize = 200;

/// The shape of a workflow (`pmnc.workflow.chain`, `group`, `chord`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    Chain,
    Group,
    Chord,
}

impl Shape {
    pub fn name(self) -> &'static str {
        match self {
            Shape::Chain => "chain",
            Shape::Group => "group",
            Shape::Chord => "chord",
        }
    }
}

/// A workflow to store: its steps are durable calls described but not stored yet (their ids
/// are derived from the workflow's).
#[derive(Debug, Clone, PartialEq)]
pub struct Workflow {
    pub from_cage: String,
    /// The workflow id; a new unique one when absent.
    pub id: Option<String>,
    pub shape: Shape,
    pub steps: Vec<DurableCall>,
    /// The chord's body.
    pub body: Option<DurableCall>,
    /// Enqueued when a step goes to dead letters (Celery's link_error).
    pub on_error: Option<DurableCall>,
}

/// What `pmnc.workflow.status(id)` reports.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkflowStatus {
    /// running, done, dead or cancelled.
    pub status: String,
    /// (step id, status, error) of every step this process can read, in step order.
    pub steps: Vec<(String, String, Option<String>)>,
}

/// The service that stores and delivers durable calls.
pub trait Calls: Send + Sync {
    /// Checks a durable call as an enqueue would (names, the target's queue when it is known
    /// here), storing nothing: a workflow step is refused when it is made.
    fn check(&self, call: &DurableCall) -> Result<(), String> {
        let _ = call;
        Ok(())
    }
    /// Stores a workflow: its first step (a chain) or every member (a group, a chord), with
    /// its record, in one commit of the sending cage. Resolves to the workflow id.
    fn workflow(&self, workflow: Workflow) -> LocalBoxFuture<'static, Result<String, String>> {
        let _ = workflow;
        Box::pin(async { Err("workflows are not available in this process".to_string()) })
    }
    /// Cancels every step of workflow `id` not ended in the cages of this process, and keeps
    /// any later step from being stored.
    fn cancel_workflow(&self, id: &str) -> LocalBoxFuture<'static, Result<CancelAnswer, String>> {
        let _ = id;
        Box::pin(async { Err("workflows are not available in this process".to_string()) })
    }
    /// The status of workflow `id` as far as this process can read it; None when it knows
    /// nothing of it.
    fn workflow_status(&self, id: &str) -> Result<Option<WorkflowStatus>, String> {
        let _ = id;
        Err("workflows are not available in this process".to_string())
    }
    /// Stores the call durably; resolves to its id once it is on disk.
    fn enqueue(&self, call: DurableCall) -> LocalBoxFuture<'static, Result<String, String>>;
    /// Commits a transaction's participants through `finish` together with its durable calls:
    /// the calls are stored in the same SQLite commit as the cage's state writes of the
    /// transaction. Resolves to the calls' ids.
    fn commit_with_calls(&self, from_cage: &str, calls: Vec<DurableCall>, finish: Finish) -> LocalBoxFuture<'static, Result<Vec<String>, CommitFailure>>;
    /// The status of call `id` (stored in `cage`, or in any cage of this process when None).
    fn result(&self, cage: Option<&str>, id: &str) -> Result<Option<CallStatus>, String>;
    /// Stores a call another cage's outbox forwards to `cage` of this process (`args` as the
    /// sender put them in its call to `_queue.accept`). A refusal that can never change is
    /// [`CallError::Refused`]; anything else is worth trying again.
    fn accept(&self, from_cage: &str, cage: &str, args: Vec<Value>) -> LocalBoxFuture<'static, Result<Vec<Value>, CallError>>;
    /// Cancels call `id` (stored in `cage`, or in any cage of this process when None).
    fn cancel(&self, cage: Option<&str>, id: &str) -> LocalBoxFuture<'static, Result<CancelAnswer, String>> {
        let _ = (cage, id);
        Box::pin(async { Err("cancelling calls is not available in this process".to_string()) })
    }
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

/// A queue of a cage of another process, as that process announces it.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueInfo {
    pub name: String,
    pub expires_in: Duration,
}

/// What the cluster knows of the cages of other processes: the queues of `cage`, or None when no
/// process of the flock has announced it.
pub type Directory = Arc<dyn Fn(&str) -> Option<Vec<QueueInfo>> + Send + Sync>;

static DIRECTORY: RwLock<Option<Directory>> = RwLock::new(None);

/// Installs the cluster's directory of cages (when the process joins a cluster).
pub fn set_directory(directory: Directory) {
    if let Ok(mut d) = DIRECTORY.write() {
        *d = Some(directory);
    }
}

/// The queues of `cage` as another process of the flock announced them, if any did.
pub fn directory_of(cage: &str) -> Option<Vec<QueueInfo>> {
    let d = DIRECTORY.read().ok().and_then(|d| d.clone())?;
    d(cage)
}

const KNOWN: &str = "queue, id, expires_in, expires_at, delay, at, max_attempts";

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
            "max_attempts" => match v {
                LuaValue::Nil => {}
                LuaValue::Integer(n) if (1..=MAX_ATTEMPTS).contains(&n) => o.max_attempts = Some(n),
                LuaValue::Number(n) if n.fract() == 0.0 && (1.0..=MAX_ATTEMPTS as f64).contains(&n) => o.max_attempts = Some(n as i64),
                other => {
                    return Err(format!(
                        "calling {target}: option max_attempts must be a whole number from 1 to {MAX_ATTEMPTS}, got {}",
                        crate::request::error_text(&other)
                    ))
                }
            },
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
        return Err(format!("calling {}: durable calls are not available in this process", call.target()));
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

/// Checks a workflow step through the installed service (nothing is stored).
pub fn check_step(call: &DurableCall) -> Result<(), String> {
    match calls() {
        Some(c) => c.check(call),
        None => Err(format!("calling {}: durable calls are not available in this process", call.target())),
    }
}

/// Stores a workflow through the installed service.
pub async fn start_workflow(workflow: Workflow) -> Result<String, String> {
    let Some(calls) = calls() else {
        return Err("workflows are not available in this process".into());
    };
    calls.workflow(workflow).await
}

/// Cancels a workflow through the installed service.
pub async fn cancel_workflow(id: &str) -> Result<CancelAnswer, String> {
    let Some(calls) = calls() else {
        return Err("workflows are not available in this process".into());
    };
    calls.cancel_workflow(id).await
}

/// Reads a workflow's status off the worker thread (reads of SQLite files).
pub async fn workflow_status(id: String) -> Result<Option<WorkflowStatus>, String> {
    let Some(calls) = calls() else {
        return Err("workflows are not available in this process".into());
    };
    let read = tokio::task::spawn_blocking(move || calls.workflow_status(&id)).await;
    read.unwrap_or_else(|e| Err(format!("the read failed: {e}")))
}

/// Answers a call to `_queue.accept` of `cage` (from the cluster link): stores the forwarded
/// call in that cage's queue.
pub async fn accept(from_cage: &str, cage: &str, args: Vec<Value>) -> Result<Vec<Value>, CallError> {
    let Some(service) = calls() else {
        return Err(CallError::Failed(format!("cage {cage}: durable calls are not available in this process")));
    };
    service.accept(from_cage, cage, args).await
}

fn id_of(what: &str, id: &LuaValue) -> Result<String, String> {
    match id {
        LuaValue::String(s) => Ok(s.to_string_lossy()),
        LuaValue::Integer(i) => Ok(i.to_string()),
        other => Err(format!("{what}(id): id must be a string, got {}", other.type_name())),
    }
}

/// Reads the status of call `id` off the worker thread (a read of SQLite files).
async fn read_status(calls: Arc<dyn Calls>, cage: Option<String>, id: String) -> Result<Option<CallStatus>, String> {
    let read = tokio::task::spawn_blocking(move || calls.result(cage.as_deref(), &id)).await;
    read.unwrap_or_else(|e| Err(format!("the read failed: {e}")))
}

fn status_table(lua: &Lua, id: &str, status: Option<&CallStatus>) -> mlua::Result<LuaValue> {
    match status {
        Some(s) => to_lua(lua, &s.to_value(id, true)),
        None => Ok(LuaValue::Nil),
    }
}

/// `rust.call_result(id, cage)`, `rust.call_wait(id, timeout)` and `rust.call_cancel(id, cage)`
/// for the prelude's pmnc.calls: (true, results...) or (false, message).
pub(crate) fn register(lua: &Lua, helpers: &Table) -> mlua::Result<()> {
    helpers.set(
        "call_cancel",
        lua.create_async_function(|lua, (id, cage): (LuaValue, LuaValue)| async move {
            let lua = &lua;
            let fail =
                |m: String| -> mlua::Result<MultiValue> { Ok(MultiValue::from_iter([LuaValue::Boolean(false), LuaValue::String(lua.create_string(m)?)])) };
            let id = match id_of("pmnc.calls.cancel", &id) {
                Ok(id) => id,
                Err(e) => return fail(e),
            };
            let cage = match cage {
                LuaValue::Nil => None,
                LuaValue::String(s) if rustomnic_core::is_cage_name(&s.to_string_lossy()) => Some(s.to_string_lossy()),
                other => return fail(format!("pmnc.calls.cancel({id:?}, cage): cage must be a cage name, got {}", crate::request::error_text(&other))),
            };
            let Some(calls) = calls() else {
                return fail("pmnc.calls.cancel: durable calls are not available in this process".into());
            };
            match calls.cancel(cage.as_deref(), &id).await {
                Ok(a) => Ok(MultiValue::from_iter([
                    LuaValue::Boolean(true),
                    LuaValue::Boolean(a.cancelled),
                    match a.status {
                        Some(s) => LuaValue::String(lua.create_string(s)?),
                        None => LuaValue::Nil,
                    },
                    LuaValue::String(lua.create_string(a.message)?),
                ])),
                Err(e) => fail(format!("pmnc.calls.cancel({id:?}): {e}")),
            }
        })?,
    )?;
    helpers.set(
        "call_result",
        lua.create_async_function(|lua, (id, cage): (LuaValue, LuaValue)| async move {
            let lua = &lua;
            let fail =
                |m: String| -> mlua::Result<MultiValue> { Ok(MultiValue::from_iter([LuaValue::Boolean(false), LuaValue::String(lua.create_string(m)?)])) };
            let id = match id_of("pmnc.calls.result", &id) {
                Ok(id) => id,
                Err(e) => return fail(e),
            };
            let cage = match cage {
                LuaValue::Nil => None,
                LuaValue::String(s) => {
                    let c = s.to_string_lossy();
                    if !rustomnic_core::is_cage_name(&c) {
                        return fail(format!("pmnc.calls.result({id:?}, cage): {c:?} is not a valid cage name"));
                    }
                    Some(c)
                }
                other => return fail(format!("pmnc.calls.result({id:?}, cage): cage must be a string, got {}", other.type_name())),
            };
            let Some(calls) = calls() else {
                return fail("pmnc.calls.result: durable calls are not available in this process".into());
            };
            match read_status(calls, cage, id.clone()).await {
                Ok(s) => Ok(MultiValue::from_iter([LuaValue::Boolean(true), status_table(lua, &id, s.as_ref())?])),
                Err(e) => fail(format!("pmnc.calls.result({id:?}): {e}")),
            }
        })?,
    )?;
    helpers.set(
        "call_wait",
        lua.create_async_function(|lua, (id, timeout): (LuaValue, LuaValue)| async move {
            let lua = &lua;
            let what = "pmnc.calls.wait";
            let fail =
                |m: String| -> mlua::Result<MultiValue> { Ok(MultiValue::from_iter([LuaValue::Boolean(false), LuaValue::String(lua.create_string(m)?)])) };
            let id = match id_of(what, &id) {
                Ok(id) => id,
                Err(e) => return fail(e),
            };
            let timeout = match crate::events_lua::seconds(what, &timeout) {
                Ok(t) => t,
                Err(e) => return fail(e),
            };
            let Some(ctx) = crate::events_lua::current_request(lua) else {
                return fail(format!("{what} may only be called while handling a request"));
            };
            let Some(calls) = calls() else {
                return fail(format!("{what}: durable calls are not available in this process"));
            };
            // Registered before the status is read, so a completion between the two is not
            // missed; completions are published to the sending and the running cage.
            let waiter = match crate::events::wait(&ctx.cage, &completion_topic(&id)) {
                Ok(w) => w,
                Err(e) => return fail(format!("{what}({id:?}): {e}")),
            };
            let now = match read_status(calls.clone(), None, id.clone()).await {
                Ok(s) => s,
                Err(e) => return fail(format!("{what}({id:?}): {e}")),
            };
            if now.as_ref().is_some_and(|s| s.is_final()) {
                return Ok(MultiValue::from_iter([LuaValue::Boolean(true), status_table(lua, &id, now.as_ref())?]));
            }
            // Without a timeout of its own the wait ends with the request, at its deadline.
            let until = timeout.map(|s| Instant::now() + Duration::from_secs_f64(s));
            let event = match until {
                Some(u) => tokio::time::timeout_at(u.into(), waiter).await.ok().flatten(),
                None => waiter.await,
            };
            let status = match event {
                Some(v) => {
                    // A done call's values travel with its event unless they were too large for
                    // one; then they are read here when this process has them.
                    let field = |name: &str| match &*v {
                        Value::Map(m) => m.iter().find(|(k, _)| k.as_str() == Some(name)).map(|(_, v)| v.clone()),
                        _ => None,
                    };
                    if field("status").as_ref().and_then(|s| s.as_str()) == Some("done") && field("values").is_none() {
                        if let Ok(Some(s)) = read_status(calls, None, id.clone()).await {
                            if s.is_final() {
                                return Ok(MultiValue::from_iter([LuaValue::Boolean(true), status_table(lua, &id, Some(&s))?]));
                            }
                        }
                    }
                    return Ok(MultiValue::from_iter([LuaValue::Boolean(true), to_lua(lua, &v)?]));
                }
                None => match read_status(calls, None, id.clone()).await {
                    Ok(s) => s,
                    Err(e) => return fail(format!("{what}({id:?}): {e}")),
                },
            };
            Ok(MultiValue::from_iter([LuaValue::Boolean(true), status_table(lua, &id, status.as_ref())?]))
        })?,
    )
}
