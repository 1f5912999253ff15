//! What a task goes through once its message is taken, whatever the broker: it runs as a
//! request of its module function, its result is stored in Celery's format (the Redis backend or
//! the RPC backend's reply queue), a chain's next step, callbacks and errbacks are sent, a retry
//! is queued again, and the message is acknowledged. The broker's part is a [`Transport`].

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use redis::aio::MultiplexedConnection;
use redis::AsyncCommands;
use rustomnic_core::Value;
use rustomnic_interface::{Host, Request};
use rustomnic_lua::RunError;
use rustomnic_resource_amqp::lapin;
use serde_json::Value as Json;

use crate::CeleryInterface;
use rustomnic_resource_celery::amqp;
use rustomnic_resource_celery::message::{self, Outgoing, Task};

/// A broker's part in running a task: `Taken` is a message taken from a queue.
pub(crate) trait Transport: Send + Sync + 'static {
    type Taken: Send + Sync;
    /// Sends task messages (a chain's next step, callbacks, errbacks); Ok once the broker has
    /// them.
    fn send(&self, messages: &[Outgoing]) -> impl Future<Output = Result<(), String>> + Send;
    /// Queues the taken task again (a retry): `retries` one more, its eta `at`.
    fn again(&self, taken: &Self::Taken, task: &Task, at: DateTime<Utc>) -> impl Future<Output = Result<(), String>> + Send;
    /// Acknowledges a taken message: it is done.
    fn ack(&self, taken: &Self::Taken) -> impl Future<Output = ()> + Send;
    /// Keeps a taken message from going back to its queue while it runs or waits (Redis's
    /// visibility timeout; nothing on AMQP).
    fn refresh(&self, taken: &Self::Taken) -> impl Future<Output = ()> + Send;
    /// Puts a taken message back in its queue, to be run again: its outcome could not be
    /// stored.
    fn release(&self, taken: &Self::Taken) -> impl Future<Output = ()> + Send;
}

/// Counts a finished header task of a chord in Celery 5.7's bookkeeping on the Redis result
/// backend (shared/design/celery-protocol.md §5.3), so that Python and Lua workers can share a
/// chord: KEYS are the group's `.j` (results by group index), `.t` (size adjustment), `.s`
/// (size, set by the client), `.d` (parts counted), the group key and `.c` (the claim to send the
/// body, "done" once sent); ARGV the task id, its encoded `[1, id, state, result]`, its group
/// index, the keys' expiry in seconds, the claim's expiry and this worker's claim token. Returns
/// {parts ready (-1 when the chord is done), size adjustment, size, 1 when this worker claimed
/// the body}.
const CHORD_PART: &str = r#"
if redis.call('GET', KEYS[6]) == 'done' then return {-1, 0, 0, 0} end
local member = ARGV[1] .. ':' .. ARGV[3]
if redis.call('SISMEMBER', KEYS[4], member) == 0 then
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[2])
  redis.call('SADD', KEYS[4], member)
end
local ready = redis.call('ZCOUNT', KEYS[1], '-inf', '+inf')
local expires = tonumber(ARGV[4])
if expires > 0 then
  for i = 1, 5 do redis.call('EXPIRE', KEYS[i], expires) end
end
local diff = tonumber(redis.call('GET', KEYS[2]) or '0') or 0
local size = tonumber(redis.call('GET', KEYS[3]) or '')
local claimed = 0
if size and ready == size + diff then
  if redis.call('SET', KEYS[6], ARGV[6], 'NX', 'EX', tonumber(ARGV[5])) then claimed = 1 end
end
return {ready, diff, size or -1, claimed}
"#;
/// Forgets a chord whose body was sent by the claim's holder, marking it done (so that a late
/// duplicate part does not start it again): KEYS `.c`, `.j`, `.t`, `.s`, `.d`; ARGV the claim
/// token and how long the mark stays.
const CHORD_DONE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[5])
  redis.call('SET', KEYS[1], 'done', 'EX', tonumber(ARGV[2]))
  return 1
end
return 0
"#;
/// Writes result documents (KEYS[i], ARGV[i + 1]) for ARGV[1] seconds and publishes each for the
/// clients waiting in `AsyncResult.get()`, unless a SUCCESS is stored already under its key (as
/// Celery's backend does: a task run twice after a crash keeps its first result); the results
/// of all the tasks that finished together, in one round trip. Returns how many were written.
const STORE: &str = r#"
local expires, written = tonumber(ARGV[1]), 0
for i = 1, #KEYS do
  local doc, keep = ARGV[i + 1], false
  local old = redis.call('GET', KEYS[i])
  if old then
    local ok, prior = pcall(cjson.decode, old)
    keep = ok and type(prior) == 'table' and prior.status == 'SUCCESS'
  end
  if not keep then
    redis.call('SETEX', KEYS[i], expires, doc)
    redis.call('PUBLISH', KEYS[i], doc)
    written = written + 1
  end
end
return written
"#;
/// The most results written in one round trip, and about the most bytes (a bigger result goes
/// alone).
const STORE_BATCH: usize = 256;
const STORE_BATCH_BYTES: usize = 4 << 20;
/// The scripts, each hashed once (a script is called by its SHA-1, which is not free per call).
static STORE_SCRIPT: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| redis::Script::new(STORE));
static CHORD_PART_SCRIPT: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| redis::Script::new(CHORD_PART));
static CHORD_DONE_SCRIPT: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| redis::Script::new(CHORD_DONE));
/// How long a claim to send a chord's body lasts (Celery's default: twice its join timeout).
const CHORD_CLAIM: u64 = 10;
/// How long a done chord stays marked done.
const CHORD_DONE_MARK: u64 = 300;

/// How long a message whose outcome could not be stored waits before it goes back, so that a
/// backend that is down is not hammered.
const RELEASE_PAUSE: Duration = Duration::from_secs(1);

/// Where results go.
pub(crate) enum Results {
    Redis(RedisResults),
    /// Published to each task's `reply_to` queue (an AMQP broker).
    Rpc(lapin::Channel),
    None,
}

/// Whose result is stored: the task, and where the RPC backend sends it.
pub(crate) struct ResultOf<'a> {
    pub id: &'a str,
    pub reply_to: &'a str,
    pub correlation_id: &'a str,
}

impl<'a> ResultOf<'a> {
    pub fn task(task: &'a Task) -> ResultOf<'a> {
        ResultOf { id: &task.id, reply_to: &task.reply_to, correlation_id: &task.correlation_id }
    }
}

/// The Redis result backend of a session: its connection (chords), and the writer that stores
/// the results of the tasks that finish together in one round trip (a script per result cost
/// Redis more than the task itself, on a machine where it shares the cores with the worker).
pub(crate) struct RedisResults {
    pub conn: MultiplexedConnection,
    writes: tokio::sync::mpsc::UnboundedSender<Write>,
}

/// A result document to store under `key`, and who waits for the outcome.
struct Write {
    key: String,
    doc: String,
    done: tokio::sync::oneshot::Sender<Result<(), String>>,
}

impl RedisResults {
    /// Starts the writer (on the current runtime), which ends when this is dropped; results are
    /// kept `expires`.
    pub fn start(conn: MultiplexedConnection, expires: Duration) -> RedisResults {
        let (writes, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(write_results(rx, conn.clone(), expires.as_secs().max(1)));
        RedisResults { conn, writes }
    }

    /// Stores `doc` under `key` (not over a stored SUCCESS) and publishes it; Ok once Redis has
    /// it.
    async fn store(&self, key: String, doc: String) -> Result<(), String> {
        let (done, outcome) = tokio::sync::oneshot::channel();
        self.writes.send(Write { key, doc, done }).map_err(|_| "the result writer stopped".to_string())?;
        outcome.await.unwrap_or_else(|_| Err("the result writer stopped".into()))
    }
}

/// Writes what [`RedisResults::store`] is given: whatever is waiting when a write starts goes in
/// one script call, so that a busy worker makes few round trips and a lone task waits for none.
async fn write_results(mut rx: tokio::sync::mpsc::UnboundedReceiver<Write>, mut conn: MultiplexedConnection, expires: u64) {
    let mut next = None;
    loop {
        let first = match next.take() {
            Some(w) => w,
            None => match rx.recv().await {
                Some(w) => w,
                None => return,
            },
        };
        let mut bytes = first.doc.len();
        let mut batch = vec![first];
        while batch.len() < STORE_BATCH && bytes < STORE_BATCH_BYTES {
            match rx.try_recv() {
                Ok(w) => {
                    bytes += w.doc.len();
                    if bytes > STORE_BATCH_BYTES {
                        next = Some(w);
                        break;
                    }
                    batch.push(w);
                }
                Err(_) => break,
            }
        }
        let mut invocation = STORE_SCRIPT.prepare_invoke();
        for w in &batch {
            invocation.key(&w.key);
        }
        invocation.arg(expires);
        for w in &batch {
            invocation.arg(&w.doc);
        }
        let r: redis::RedisResult<i64> = invocation.invoke_async(&mut conn).await;
        let outcome = r.map(|_| ()).map_err(|e| e.to_string());
        for w in batch {
            let _ = w.done.send(outcome.clone());
        }
    }
}

/// What every task of a session shares.
pub(crate) struct Worker<T: Transport> {
    pub iface: Arc<CeleryInterface>,
    pub host: Host,
    pub transport: T,
    pub results: Results,
    /// A task runs holding one of `concurrency` permits; one waiting for its `eta` holds none.
    pub slots: tokio::sync::Semaphore,
    /// Set when a result could not be stored: the session ends and connects again (a Redis
    /// connection does not come back by itself).
    pub backend_failed: std::sync::atomic::AtomicBool,
    /// Monitoring events, when `send_events` is on.
    pub events: Option<crate::events::Events>,
}

impl<T: Transport> Worker<T> {
    /// Announces the worker and sends its heartbeats until the returned task is aborted (see
    /// [`Worker::stop_events`]); nothing when events are off.
    pub fn start_events(self: &Arc<Self>) -> Option<tokio::task::JoinHandle<()>> {
        if !self.events.as_ref()?.announces {
            return None;
        }
        let me = self.clone();
        Some(tokio::spawn(async move {
            let Some(events) = &me.events else { return };
            events.online().await;
            loop {
                tokio::time::sleep(crate::events::HEARTBEAT).await;
                events.heartbeat().await;
            }
        }))
    }

    /// Stops the heartbeats and says the worker went offline.
    pub async fn stop_events(&self, heartbeat: Option<tokio::task::JoinHandle<()>>) {
        if let Some(h) = heartbeat {
            h.abort();
        }
        if let Some(events) = self.events.as_ref().filter(|e| e.announces) {
            events.offline().await;
        }
    }

    /// Why a task this worker could run is left for another worker: a chord's part needs the
    /// Redis result backend (the RPC backend cannot count a chord, as in Celery).
    pub fn refusal(&self, task: &Task) -> Option<String> {
        (task.chord.is_some() && !matches!(self.results, Results::Redis(_)))
            .then(|| format!("task {} ({}) is part of a chord, which needs the Redis result backend (Celery's RPC backend has no chords)", task.id, task.name))
    }

    /// The error that ends a session whose result backend failed, if it did.
    pub fn backend_failure(&self) -> Option<String> {
        self.backend_failed.load(std::sync::atomic::Ordering::SeqCst).then(|| "the result backend failed; connecting again".to_string())
    }

    /// Stores REVOKED for a task past its `expires` and acknowledges it (settles it); false when
    /// it has not expired.
    pub async fn expired(&self, taken: &T::Taken, task: &Task) -> bool {
        let Some(expires) = task.expires.filter(|e| Utc::now() >= *e) else { return false };
        let spec = self.host.spec();
        tracing::info!(cage = %spec.cage, interface = %spec.name, "task {} ({}) expired at {}; not run", task.id, task.name, message::format_time(expires));
        let revoked = message::exception("celery.exceptions", "TaskRevokedError", "expired");
        let stored = self.store(&ResultOf::task(task), "REVOKED", revoked, None, Json::Array(Vec::new()), false).await;
        self.settle(taken, stored).await;
        true
    }

    /// A message no worker can run as it is: its task (when it has an id) gets a FAILURE with
    /// `why`, and the message is acknowledged.
    pub async fn fail_unrun(&self, taken: &T::Taken, to: &ResultOf<'_>, queue: &str, why: &str) {
        let spec = self.host.spec();
        tracing::error!(cage = %spec.cage, interface = %spec.name, "task {} from queue {queue} fails without running: {why}", to.id);
        let stored = self.store(to, "FAILURE", message::exception("builtins", "ValueError", why), None, Json::Array(Vec::new()), false).await;
        self.settle(taken, stored).await;
    }

    /// Acknowledges a message whose outcome was stored; one whose outcome could not be stored
    /// goes back to its queue (after a pause) to be run again, rather than be lost.
    async fn settle(&self, taken: &T::Taken, stored: Result<(), ()>) {
        match stored {
            Ok(()) => self.transport.ack(taken).await,
            Err(()) => {
                tokio::time::sleep(RELEASE_PAUSE).await;
                self.transport.release(taken).await;
            }
        }
    }

    /// Runs a task as a request (`run` gives its outcome: [`Host::run`] hands it to a worker,
    /// [`Host::run_here`] runs it on the worker this session runs on) and stores its outcome,
    /// then acknowledges it.
    pub async fn run_task<F>(&self, taken: &T::Taken, task: Task, run: impl FnOnce(Request) -> F)
    where
        F: Future<Output = Result<Vec<Value>, RunError>>,
    {
        let spec = self.host.spec();
        let Some(handler) = self.iface.handler(&task.name).cloned() else { return };
        let Ok(_permit) = self.slots.acquire().await else { return };
        let mut timeout = spec.request_timeout;
        if let Some(limit) = task.time_limit.and_then(|s| Duration::try_from_secs_f64(s).ok()) {
            timeout = timeout.min(limit);
        }
        let mut args = task.args.clone();
        args.push(task.kwargs.clone());
        let parameters = Value::Map(vec![
            (Value::str("task_id"), Value::str(task.id.clone())),
            (Value::str("task"), Value::str(task.name.clone())),
            (Value::str("retries"), Value::Int(task.retries)),
        ]);
        let request = Request { handler, args, deadline: Instant::now() + timeout, parameters: Some(parameters) };
        let started_at = Instant::now();
        if let Some(events) = &self.events {
            events.started(&task).await;
        }
        let running = run(request);
        // A task that runs longer than half the visibility timeout keeps its message taken.
        let every = self.iface.visibility_timeout / 2;
        tokio::pin!(running);
        let outcome = loop {
            tokio::select! {
                r = &mut running => break r,
                _ = tokio::time::sleep(every) => self.transport.refresh(taken).await,
            }
        };
        let retry = match &outcome {
            Err(RunError::Failed { message, .. }) => rustomnic_stdlib::celery::parse_retry(message),
            _ => None,
        };
        if let Some(events) = &self.events {
            let (state, detail, traceback) = match (&outcome, &retry) {
                (Ok(values), _) => ("SUCCESS", values.first().and_then(|v| v.to_json().ok()).map(|j| j.to_string()).unwrap_or_else(|| "None".into()), None),
                (Err(_), Some(r)) => ("RETRY", format!("Retry({:?})", r.reason), None),
                (Err(RunError::Failed { message, traceback }), None) => ("FAILURE", format!("RuntimeError({message:?})"), Some(traceback.as_str())),
                (Err(RunError::Deadline), None) => ("FAILURE", format!("TimeLimitExceeded({:?})", timeout.as_secs_f64()), None),
                (Err(e), None) => ("FAILURE", format!("RuntimeError({:?})", e.to_string()), None),
            };
            events.finished(&task, state, &detail, traceback, started_at.elapsed()).await;
        }
        let to = ResultOf::task(&task);
        let none = || Json::Array(Vec::new());
        let stored = match outcome {
            Ok(values) => {
                let result = values.into_iter().next().unwrap_or_default();
                match result.to_json() {
                    Ok(json) => {
                        // A chain goes on: the next step is queued before the result is written
                        // and the message acknowledged (a crash in between runs this task again
                        // and queues the step again; the first result stays).
                        let default_queue = &self.iface.queues[0];
                        let mut next: Vec<Outgoing> = message::next_step(&task, &json, default_queue).into_iter().collect();
                        next.extend(message::callbacks(&task, &json, default_queue));
                        match self.send_all(&task, &next, "its chain's next step or a callback").await {
                            Some(children) => match self.store(&to, "SUCCESS", json.clone(), None, children, task.ignore_result).await {
                                Ok(()) => self.chord_part(&task, "SUCCESS", &json).await,
                                Err(()) => Err(()),
                            },
                            None => Err(()),
                        }
                    }
                    Err(e) => {
                        let why = format!("{}: the result cannot be sent as JSON: {e}", task.name);
                        tracing::error!(cage = %spec.cage, interface = %spec.name, "task {}: {why}", task.id);
                        self.store(&to, "FAILURE", message::exception("builtins", "TypeError", &why), None, none(), task.ignore_result).await
                    }
                }
            }
            Err(_) if retry.is_some() => {
                let Some(retry) = &retry else { return };
                if self.retried(taken, &task, retry).await {
                    Ok(())
                } else {
                    Err(())
                }
            }
            Err(e) => {
                let (kind, text) = match &e {
                    RunError::Deadline => ("TimeLimitExceeded", format!("{} passed its deadline of {:.1}s", task.name, timeout.as_secs_f64())),
                    RunError::Failed { message, .. } => ("RuntimeError", message.clone()),
                    other => ("RuntimeError", other.to_string()),
                };
                let module = if kind == "TimeLimitExceeded" { "celery.exceptions" } else { "builtins" };
                tracing::warn!(cage = %spec.cage, interface = %spec.name, "task {} ({}) failed: {text}", task.id, task.name);
                let traceback = match &e {
                    RunError::Failed { traceback, .. } if !traceback.is_empty() => Some(traceback.as_str()),
                    _ => None,
                };
                let exception = message::exception(module, kind, &text);
                let stored = match self.store(&to, "FAILURE", exception.clone(), traceback, none(), task.ignore_result).await {
                    Ok(()) => self.chord_part(&task, "FAILURE", &exception).await,
                    Err(()) => Err(()),
                };
                // Errbacks once the failure is stored; one that cannot be queued is logged (the
                // task is not run again for it).
                if stored.is_ok() {
                    let _ = self.send_all(&task, &message::errbacks(&task, &self.iface.queues[0]), "an errback").await;
                }
                stored
            }
        };
        self.settle(taken, stored).await;
    }

    /// A header task of a chord has finished with `state` and `result`: it is counted, and the
    /// worker that counts the last part sends the body with the parts' results in their group
    /// order (or, when a part failed, stores the body's FAILURE as Celery's ChordError). Err
    /// (logged) when Redis failed: the part runs again and is counted once.
    async fn chord_part(&self, task: &Task, state: &str, result: &Json) -> Result<(), ()> {
        let (Some(body), Some(group), Results::Redis(backend)) = (&task.chord, &task.group, &self.results) else { return Ok(()) };
        let spec = self.host.spec();
        let mut redis = backend.conn.clone();
        let key = |suffix: &str| format!("celery-taskset-meta-{group}{suffix}");
        let token = uuid::Uuid::new_v4().simple().to_string();
        let score = task.group_index.map(|i| i.to_string()).unwrap_or_else(|| "+inf".to_string());
        let encoded = serde_json::json!([1, task.id, state, result]).to_string();
        let fail = |e: redis::RedisError| {
            tracing::error!(cage = %spec.cage, interface = %spec.name, "task {}: cannot count it in chord {group} ({e}); it runs again", task.id);
        };
        let mut part = CHORD_PART_SCRIPT.prepare_invoke();
        for k in [key(".j"), key(".t"), key(".s"), key(".d"), key(""), key(".c")] {
            part.key(k);
        }
        part.arg(&task.id).arg(&encoded).arg(&score).arg(self.iface.result_expires.as_secs()).arg(CHORD_CLAIM).arg(&token);
        let (_ready, _diff, _size, claimed): (i64, i64, i64, i64) = part.invoke_async(&mut redis).await.map_err(fail)?;
        if claimed != 1 {
            return Ok(());
        }
        let parts: Vec<Vec<u8>> = redis.zrange(key(".j"), 0, -1).await.map_err(fail)?;
        let mut results = Vec::with_capacity(parts.len());
        let mut failed = None;
        for p in parts {
            let entry: Json = serde_json::from_slice(&p).unwrap_or(Json::Null);
            let (tid, pstate, value) = (entry.get(1).and_then(Json::as_str).unwrap_or("?"), entry.get(2).and_then(Json::as_str).unwrap_or(""), entry.get(3));
            if matches!(pstate, "FAILURE" | "REVOKED") && failed.is_none() {
                let kind = value.and_then(|v| v.get("exc_type")).and_then(Json::as_str).unwrap_or(pstate);
                let text = value.and_then(|v| v.get("exc_message")).map(|m| m.to_string()).unwrap_or_default();
                failed = Some(format!("Dependency {tid} raised {kind}({text})"));
            }
            results.push(value.cloned().unwrap_or(Json::Null));
        }
        let body_id = body.get("options").and_then(|o| o.get("task_id")).and_then(Json::as_str).unwrap_or("").to_string();
        match failed {
            None => {
                let Some(message) = message::chord_body(body, results, task, &self.iface.queues[0]) else { return Ok(()) };
                if let Err(e) = self.transport.send(std::slice::from_ref(&message)).await {
                    tracing::error!(cage = %spec.cage, interface = %spec.name, "chord {group}: cannot send its body {} ({e}); the last part runs again", message.name);
                    // The claim runs out and the part, run again, claims it anew.
                    return Err(());
                }
                tracing::info!(cage = %spec.cage, interface = %spec.name, "chord {group}: all parts done; its body {} ({}) sent", message.id, message.name);
            }
            Some(why) => {
                tracing::warn!(cage = %spec.cage, interface = %spec.name, "chord {group}: {why}; its body {body_id} fails");
                let reply_to = body.get("options").and_then(|o| o.get("reply_to")).and_then(Json::as_str).unwrap_or("");
                let to = ResultOf { id: &body_id, reply_to, correlation_id: &body_id };
                self.store(&to, "FAILURE", message::exception("celery.exceptions", "ChordError", &why), None, Json::Array(Vec::new()), false).await?;
            }
        }
        let mut done = CHORD_DONE_SCRIPT.prepare_invoke();
        for k in [key(".c"), key(".j"), key(".t"), key(".s"), key(".d")] {
            done.key(k);
        }
        done.arg(&token).arg(CHORD_DONE_MARK);
        let _: redis::RedisResult<i64> = done.invoke_async(&mut redis).await;
        Ok(())
    }

    /// Sends messages that follow a task (chain step, callbacks, errbacks); the result's
    /// `children` naming them, or None (logged) when they could not be sent.
    async fn send_all(&self, task: &Task, messages: &[Outgoing], what: &str) -> Option<Json> {
        if let Err(e) = self.transport.send(messages).await {
            let spec = self.host.spec();
            tracing::error!(cage = %spec.cage, interface = %spec.name, "task {}: cannot send {what} ({e})", task.id);
            return None;
        }
        Some(Json::Array(messages.iter().map(|m| serde_json::json!([[m.id, null], null])).collect()))
    }

    /// A task that asked for a retry (`pmnc.celery.retry`): queued again with its eta and a
    /// RETRY result, or, past its `max_retries`, a FAILURE. False when it could not be queued
    /// again.
    async fn retried(&self, taken: &T::Taken, task: &Task, retry: &rustomnic_stdlib::celery::Retry) -> bool {
        let spec = self.host.spec();
        let to = ResultOf::task(task);
        if let Some(max) = retry.max_retries.filter(|m| task.retries >= i64::from(*m)) {
            let text = format!("{}[{}]: max retries ({max}) exceeded: {}", task.name, task.id, retry.reason);
            tracing::warn!(cage = %spec.cage, interface = %spec.name, "task {text}");
            let e = message::exception("celery.exceptions", "MaxRetriesExceededError", &text);
            return self.store(&to, "FAILURE", e, None, Json::Array(Vec::new()), task.ignore_result).await.is_ok();
        }
        let at = Utc::now() + chrono::Duration::milliseconds((retry.countdown * 1000.0) as i64);
        if let Err(e) = self.transport.again(taken, task, at).await {
            tracing::error!(cage = %spec.cage, interface = %spec.name, "task {}: cannot queue its retry ({e})", task.id);
            return false;
        }
        tracing::info!(cage = %spec.cage, interface = %spec.name, "task {} ({}) retries in {:.1}s (retry {}): {}", task.id, task.name, retry.countdown, task.retries + 1, retry.reason);
        // The retry is queued: a RETRY state that cannot be written is only logged.
        let e = message::exception("celery.exceptions", "Retry", &retry.reason);
        let _ = self.store(&to, "RETRY", e, None, Json::Array(Vec::new()), task.ignore_result).await;
        true
    }

    /// Writes a task's result document (with its `children`: the next step of a chain), unless
    /// `ignore` (the task's `ignore_result`). On Redis a stored SUCCESS is never overwritten (as
    /// Celery's backend does) and the document is published for clients waiting in
    /// `AsyncResult.get()`; with the RPC backend it goes to the task's reply queue. Err (logged)
    /// when it could not be written.
    pub async fn store(&self, to: &ResultOf<'_>, status: &str, result: Json, traceback: Option<&str>, children: Json, ignore: bool) -> Result<(), ()> {
        if ignore || to.id.is_empty() {
            return Ok(());
        }
        let spec = self.host.spec();
        let task_id = to.id;
        let doc = message::meta(task_id, status, result, traceback, children, Utc::now());
        let outcome = match &self.results {
            Results::None => Ok(()),
            Results::Redis(backend) => backend.store(format!("celery-task-meta-{task_id}"), doc).await,
            // No reply queue: the client wants no result.
            Results::Rpc(_) if to.reply_to.is_empty() => Ok(()),
            Results::Rpc(channel) => rpc_reply(channel, to, &doc).await,
        };
        outcome.map_err(|e| {
            self.backend_failed.store(true, std::sync::atomic::Ordering::SeqCst);
            tracing::error!(cage = %spec.cage, interface = %spec.name, "cannot store the result of task {task_id} ({status}): {e}; the task goes back to its queue");
        })
    }
}

/// Publishes a result document to the client's reply queue.
async fn rpc_reply(channel: &lapin::Channel, to: &ResultOf<'_>, doc: &str) -> Result<(), String> {
    let properties = amqp::result_properties(to.correlation_id)?;
    let queue = amqp::short("reply_to", to.reply_to)?;
    channel
        .basic_publish(Default::default(), queue, Default::default(), doc.as_bytes(), properties)
        .await
        .map(|_| ())
        .map_err(|e| format!("to reply queue {}: {e}", to.reply_to))
}
