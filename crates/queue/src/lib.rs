//! Durable calls and the task queue: `pmnc("<cage>", {queue = ...}).m.f(x)` stores the call in
//! the target cage's SQLite file (the state file, so that a call's state writes commit with its
//! completion), one writer thread per cage commits enqueues and completions in groups, and a
//! dispatcher thread hands due calls to the worker threads under each queue's limits and
//! forwards the calls of the cage's outbox to their target cages.
//! See docs/queues.md for the guarantees and docs/decisions/030-*.md and 034-039 for the design.

pub mod admin;
pub mod admin_cluster;
pub mod config;
mod dispatch;
mod forward;
mod holder;
pub mod jetstream;
mod log;
pub mod overview;
mod share;
pub mod store;
pub mod workflow;
mod writer;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::future::LocalBoxFuture;
use rustomnic_core::Value;
use rustomnic_lua::durable::{self, CallStatus, Calls, CancelAnswer, CommitFailure, DurableCall, Finish, ACCEPT_MODULE};
use rustomnic_lua::worker::{self, CallError};
use rustomnic_resource_state::store::Write;
use rustomnic_resource_state::{decode, encode, held, MAX_VALUE};

pub use config::{read_queues, Backoff, QueueConfig, StoreKind};
pub use store::QueueFigures;

/// Work for a worker thread: made on another thread, run there on the worker's `LocalSet`.
pub type Job = Box<dyn FnOnce() -> LocalBoxFuture<'static, ()> + Send>;
/// Hands a job to some worker thread (the runtime's round robin).
pub type Spawner = Arc<dyn Fn(Job) + Send + Sync>;

/// After a failed commit, new calls are refused for this long before one may try again.
const REFUSE_PROBE: Duration = Duration::from_secs(1);
/// Longest function name a durable call may name.
const MAX_NAME: usize = 256;
/// How long a sender keeps forwarding a call that has no expiry of its own when it cannot see
/// the target queue's `expires_in` (its process has not announced itself): a queue's default.
const FORWARD_WINDOW_MS: i64 = 86_400_000;
/// How long an outbox remembers where a forwarded call went (for pmnc.calls.result): a queue's
/// default de-duplication window.
const FORWARDED_KEPT_MS: i64 = 3 * 86_400_000;
/// Room a forwarded call takes beyond its arguments on the wire (names, times, envelope).
const FORWARD_OVERHEAD: usize = 2048;
/// How long a cancelled call's record is kept when its queue is not configured here (a queue's
/// default de-duplication window).
const DEFAULT_DEDUP_MS: i64 = 3 * 86_400_000;
/// A done call's values travel with its completion event up to this size; larger ones are
/// read from the file by a waiter in the process that ran it.
const EVENT_VALUES_MAX: usize = 64 << 10;

/// Backoff of one call (or outbox row) whose end could not be recorded (full disk): it is not
/// tried again before `not_before_ms`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Cooldown {
    /// Ends in a row that could not be recorded.
    pub count: u32,
    pub not_before_ms: i64,
}

/// The queue of one cage in this process: its file, writer, dispatcher and the calls in flight.
pub struct Store {
    pub(crate) cage: String,
    pub(crate) path: PathBuf,
    pub(crate) queues: BTreeMap<String, QueueConfig>,
    pub(crate) cage_timeout: Duration,
    pub(crate) writer: Mutex<std::sync::mpsc::Sender<writer::Op>>,
    /// Calls running now: seq -> queue. They stay pending in the file, so a crash reruns them.
    pub(crate) inflight: Mutex<HashMap<i64, String>>,
    /// Calls that ended since the dispatcher's current pass began: its read may predate their
    /// completion, so it must not start them again in that pass.
    pub(crate) ended: Mutex<HashSet<i64>>,
    /// Why new calls are refused (the last commit failed: full disk, damaged file), and when.
    pub(crate) refusing: Mutex<Option<(String, Instant)>>,
    pub(crate) wake: (Mutex<bool>, Condvar),
    pub(crate) stop: AtomicBool,
    /// Set at shutdown: no new call starts; the running ones finish.
    pub(crate) paused: AtomicBool,
    /// Counts changes to the outbox (commits that touched it, forwards that ended): the
    /// dispatcher reads the outbox again whenever this moved since its last read, so that a
    /// call committed while a pass was reading is never left untried (docs/decisions/034).
    pub(crate) outbox_changes: AtomicU64,
    /// Outbox calls being forwarded now.
    pub(crate) forwarding: Mutex<HashSet<i64>>,
    /// Calls whose last end could not be recorded, by seq.
    pub(crate) unrecorded: Mutex<HashMap<i64, Cooldown>>,
    /// Outbox calls whose last forward's end could not be recorded, by seq.
    pub(crate) outbox_unrecorded: Mutex<HashMap<i64, Cooldown>>,
    pub(crate) log: log::Limiter,
    /// Held by a checkpoint while it runs: the writer's TRUNCATE waits for a PASSIVE one to end
    /// instead of failing on the checkpoint lock it holds.
    pub(crate) checkpoint: Mutex<()>,
    /// Reads for pmnc.calls.result.
    pub(crate) reader: Mutex<rusqlite::Connection>,
    /// The clustered queues (store = "cluster") when this process joined a cluster.
    pub(crate) cluster: std::sync::OnceLock<Arc<jetstream::Cluster>>,
    #[cfg(test)]
    pub(crate) hooks: Hooks,
}

/// A point where a unit test pauses a thread of the queue, to drive an interleaving of the
/// writer and the dispatcher deterministically.
#[cfg(test)]
pub(crate) type Hook = Mutex<Option<Arc<dyn Fn() + Send + Sync>>>;

#[cfg(test)]
#[derive(Default)]
pub(crate) struct Hooks {
    /// Run by the writer just before it commits a batch.
    pub before_commit: Hook,
    /// Run by the dispatcher after each read of the outbox.
    pub after_outbox_read: Hook,
}

#[cfg(test)]
pub(crate) fn run_hook(hook: &Hook) {
    let h = hook.lock().ok().and_then(|h| h.clone());
    if let Some(h) = h {
        h();
    }
}

/// The WAL file beside a state file.
fn wal_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push("-wal");
    PathBuf::from(p)
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// The message of a call to a queue its target does not have.
fn no_queue(target: &str, cage: &str, queue: &str, known: &[&str]) -> String {
    format!(
        "calling {target}: cage {cage} has no queue {queue:?} (its queues: {}; add [queues.{queue}] to its cage.toml)",
        if known.is_empty() { "none".to_string() } else { known.join(", ") }
    )
}

/// Refuses a module and function no durable call can reach: a reserved or malformed module
/// name, a private or absurd function name.
fn check_function(module: &str, function: &str) -> Result<(), String> {
    if module == ACCEPT_MODULE {
        return Err(format!("module {module} is reserved"));
    }
    if !rustomnic_core::is_identifier(module) {
        return Err(format!("{module:?} is not a module name"));
    }
    if function.is_empty() || function.len() > MAX_NAME {
        return Err(format!("function names are 1 to {MAX_NAME} bytes"));
    }
    if function.starts_with('_') {
        return Err(format!("{module}.{function} is private (names starting with _ cannot be called through pmnc)"));
    }
    Ok(())
}

/// Refuses a durable call whose names can never reach a function, before anything is stored.
fn check_names(call: &DurableCall) -> Result<(), String> {
    let target = call.target();
    if !rustomnic_core::is_cage_name(&call.cage) {
        return Err(format!("calling {target}: {:?} is not a valid cage name (letters, digits, _ and -, at most 64)", call.cage));
    }
    check_function(&call.module, &call.function).map_err(|e| format!("calling {target}: {e}"))
}

fn no_cage_here(call: &DurableCall) -> String {
    let here: Vec<String> = STORES.read().map(|s| s.keys().cloned().collect()).unwrap_or_default();
    format!(
        "calling {}: no cage named {} runs in this process (cages here: {}) and no cluster is configured",
        call.target(),
        call.cage,
        if here.is_empty() { "none".to_string() } else { here.join(", ") }
    )
}

fn ms(seconds: f64) -> i64 {
    // `as` saturates: absurd times become the far future, never an overflow.
    (seconds * 1000.0) as i64
}

/// When a call may first run (`delay` or `at`, else now).
fn due_of(o: &durable::CallOptions, now: i64) -> i64 {
    match (o.delay, o.at) {
        (Some(d), _) => now.saturating_add(ms(d)),
        (_, Some(at)) => ms(at),
        _ => now,
    }
}

/// When a call expires: `expires_at`, else `expires_in` (or `default_ms`) after it is due.
fn expiry_of(o: &durable::CallOptions, due: i64, now: i64, default_ms: Option<i64>) -> Option<i64> {
    match (o.expires_at, o.expires_in, default_ms) {
        (Some(at), _, _) => Some(ms(at)),
        (None, Some(s), _) => Some(due.max(now).saturating_add(ms(s))),
        (None, None, Some(d)) => Some(due.max(now).saturating_add(d)),
        (None, None, None) => None,
    }
}

/// An outbox row for a call to another cage. `queue_expiry` is the target queue's `expires_in`
/// when the sender knows it (a cage of this process, or one the cluster announced): the call
/// then gets the same expiry it would get from a direct call.
fn outgoing_call(call: DurableCall, queue_expiry: Option<Duration>) -> Result<store::OutboxCall, String> {
    let target = call.target();
    let now = store::now_ms();
    let o = &call.options;
    let due = due_of(o, now);
    let (expires, given) = match expiry_of(o, due, now, queue_expiry.map(|d| d.as_millis() as i64)) {
        Some(e) => (e, true),
        None => (due.max(now).saturating_add(FORWARD_WINDOW_MS), false),
    };
    Ok(store::OutboxCall {
        id: o.id.clone().unwrap_or_else(new_call_id),
        args: encode(&Value::Array(call.args), MAX_VALUE).map_err(|e| format!("calling {target}: the arguments: {e}"))?,
        cage: call.cage,
        queue: call.options.queue,
        module: call.module,
        function: call.function,
        created_ms: now,
        due_ms: due,
        expires_ms: expires,
        expires_given: given,
        max_attempts: call.options.max_attempts,
        trace: call.options.trace,
        workflow: None,
        cont: None,
    })
}

/// An outbox row for a call to a cage of another process, checked against what the cluster
/// knows of that cage: a queue it does not have, or a call too large to carry, fails now.
fn remote_outgoing(call: DurableCall) -> Result<store::OutboxCall, String> {
    let target = call.target();
    let queue = call.options.queue.clone();
    let expiry = match durable::directory_of(&call.cage) {
        Some(queues) => match queues.iter().find(|q| q.name == queue) {
            Some(q) => Some(q.expires_in),
            None => {
                let known: Vec<&str> = queues.iter().map(|q| q.name.as_str()).collect();
                return Err(no_queue(&target, &call.cage, &queue, &known));
            }
        },
        // Not announced (its process may start later): only what can never be a queue fails.
        None if !rustomnic_core::is_identifier(&queue) => {
            return Err(format!("calling {target}: {queue:?} is not a queue name (queue names are identifiers)"));
        }
        None => None,
    };
    let row = outgoing_call(call, expiry)?;
    if let Some(max) = worker::remote_max_payload() {
        if row.args.len() + FORWARD_OVERHEAD > max {
            return Err(format!(
                "calling {target}: the call's arguments take {} bytes, over the NATS server's max_payload of {max} bytes; pass large data another way (a file, a database) or raise max_payload on the server",
                row.args.len()
            ));
        }
    }
    Ok(row)
}

impl Store {
    pub(crate) fn wake(&self) {
        let (lock, cv) = &self.wake;
        if let Ok(mut w) = lock.lock() {
            *w = true;
            cv.notify_one();
        }
    }

    /// The outbox changed (a commit touched it, a forward ended): the dispatcher reads it again.
    pub(crate) fn outbox_changed(&self) {
        self.outbox_changes.fetch_add(1, Ordering::SeqCst);
        self.wake();
    }

    /// Why a new call is refused now. A second after the last failed commit one call is let
    /// through to try the file again: with nothing else committing (no calls waiting), the
    /// queue would otherwise refuse every new call long after the disk has room again.
    fn refusing(&self) -> Option<String> {
        let mut r = self.refusing.lock().ok()?;
        match r.as_mut() {
            Some((why, at)) if at.elapsed() < REFUSE_PROBE => Some(why.clone()),
            Some((_, at)) => {
                *at = Instant::now();
                None
            }
            None => None,
        }
    }

    pub fn cage(&self) -> &str {
        &self.cage
    }

    /// Whether `queue` keeps its calls in JetStream here.
    pub(crate) fn clustered(&self, queue: &str) -> bool {
        self.cluster.get().is_some_and(|c| c.has(queue))
    }

    /// Bytes of the state file's WAL now.
    pub fn wal_bytes(&self) -> u64 {
        file_len(&wal_path(&self.path))
    }

    /// Bytes of the state file itself (without its WAL).
    pub fn file_bytes(&self) -> u64 {
        file_len(&self.path)
    }

    /// Per-queue figures (depth, age of the oldest waiting call, retries, dead letters).
    pub fn figures(&self) -> Result<Vec<QueueFigures>, String> {
        let conn = self.reader.lock().map_err(|_| "queue: reader lock poisoned".to_string())?;
        let mut f = store::figures(&conn, &self.path, false)?;
        for q in self.queues.keys() {
            if !f.iter().any(|x| &x.queue == q) {
                f.push(QueueFigures { queue: q.clone(), ..Default::default() });
            }
        }
        if let Some(cluster) = self.cluster.get() {
            // A clustered queue's calls are in JetStream: its figures come from there.
            for x in f.iter_mut().filter(|x| cluster.has(&x.queue)) {
                let js = cluster.figures(&x.queue).unwrap_or_default();
                let oldest_age = js.oldest_age.unwrap_or(0.0);
                *x = QueueFigures {
                    queue: x.queue.clone(),
                    depth: js.waiting + js.held,
                    retries: js.redelivered,
                    dead: js.dead,
                    oldest_age,
                    ..Default::default()
                };
            }
        }
        f.sort_by(|a, b| a.queue.cmp(&b.queue));
        Ok(f)
    }

    /// Records that the end of call (or outbox row) `seq` could not be written; returns how
    /// long it must wait before it is tried again, from `wait(times in a row)`.
    pub(crate) fn cool(map: &Mutex<HashMap<i64, Cooldown>>, seq: i64, at_least: i64, wait: impl Fn(u32) -> Duration) -> Cooldown {
        let mut m = map.lock().unwrap_or_else(|p| p.into_inner());
        let count = m.get(&seq).map_or(1, |c| c.count.saturating_add(1));
        let not_before_ms = at_least.max(store::now_ms().saturating_add(wait(count).as_millis() as i64));
        let c = Cooldown { count, not_before_ms };
        m.insert(seq, c);
        c
    }

    /// Until when call (or outbox row) `seq` waits after ends it could not record.
    pub(crate) fn cooling(map: &Mutex<HashMap<i64, Cooldown>>, seq: i64) -> Option<Cooldown> {
        map.lock().unwrap_or_else(|p| p.into_inner()).get(&seq).copied()
    }

    /// Stores a durable call to this cage (names already checked).
    async fn enqueue(self: Arc<Self>, call: DurableCall) -> Result<String, String> {
        let target = call.target();
        let row = self.new_call(call)?;
        let id = row.id.clone();
        if let Some(cluster) = self.cluster.get().filter(|c| c.has(&row.queue)) {
            // Boxed: the clustered enqueue's future is some 11 KB, and inline it would make every
            // call to a queue of this file move and allocate that much too.
            Box::pin(cluster.clone().enqueue(row)).await.map_err(|e| format!("calling {target}: {e}"))?;
            return Ok(id);
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.send(writer::Op::Enqueue(row, tx)).map_err(|e| format!("calling {target}: {e}"))?;
        match rx.await {
            Ok(Ok(_inserted)) => Ok(id),
            Ok(Err(e)) => Err(format!("calling {target}: {e}")),
            Err(_) => Err(format!("calling {target}: the queue writer of cage {} stopped", self.cage)),
        }
    }

    fn queue(&self, target: &str, queue: &str) -> Result<&QueueConfig, String> {
        self.queues.get(queue).ok_or_else(|| {
            let known: Vec<&str> = self.queues.keys().map(|k| k.as_str()).collect();
            no_queue(target, &self.cage, queue, &known)
        })
    }

    /// Checks a call to this cage and makes its row.
    fn new_call(&self, call: DurableCall) -> Result<store::NewCall, String> {
        let target = call.target();
        let q = self.queue(&target, &call.options.queue)?;
        if let Some(why) = self.refusing() {
            return Err(format!("calling {target}: queue {} of cage {} accepts no new calls: {why}", q.name, self.cage));
        }
        self.call_row(call, q)
    }

    /// The row of a call to queue `q` of this cage (a workflow's next step is made by the
    /// writer itself, which does not ask whether the file takes new calls).
    fn call_row(&self, call: DurableCall, q: &QueueConfig) -> Result<store::NewCall, String> {
        let target = call.target();
        let now = store::now_ms();
        let o = &call.options;
        let due = due_of(o, now);
        let expires = expiry_of(o, due, now, Some(q.expires_in.as_millis() as i64)).unwrap_or(i64::MAX);
        let args = encode(&Value::Array(call.args), MAX_VALUE).map_err(|e| format!("calling {target}: the arguments: {e}"))?;
        Ok(store::NewCall {
            id: o.id.clone().unwrap_or_else(new_call_id),
            queue: q.name.clone(),
            module: call.module,
            function: call.function,
            args,
            from_cage: call.from_cage,
            created_ms: now,
            due_ms: due,
            expires_ms: expires,
            keep_until_ms: now.saturating_add(q.dedup_window.as_millis() as i64),
            max_attempts: o.max_attempts,
            trace: o.trace.clone(),
            workflow: None,
            cont: None,
        })
    }

    /// Stores a call another cage's outbox forwarded, with its sender, creation time and (when
    /// the call has none of its own) this queue's expiry counted from its creation.
    async fn accept(self: Arc<Self>, from_cage: &str, f: forward::Forwarded) -> Result<String, CallError> {
        if f.module == ACCEPT_MODULE && f.function == workflow::JOIN_FUNCTION {
            return self.accept_part(f).await;
        }
        let target = format!("{}.{}.{}", self.cage, f.module, f.function);
        let refused = |e: String| CallError::Refused(format!("calling {target}: {e}"));
        check_function(&f.module, &f.function).map_err(refused)?;
        if f.id.is_empty() || f.id.len() > 256 {
            return Err(refused("call ids are 1 to 256 bytes".into()));
        }
        let q = self.queue(&target, &f.queue).map_err(CallError::Refused)?;
        if let Some(why) = self.refusing() {
            return Err(CallError::Failed(format!("calling {target}: queue {} of cage {} accepts no new calls: {why}", q.name, self.cage)));
        }
        let now = store::now_ms();
        let created = f.created_ms.min(now);
        let expires = f.expires_ms.unwrap_or_else(|| f.due_ms.max(created).saturating_add(q.expires_in.as_millis() as i64));
        let args = encode(&Value::Array(f.args), MAX_VALUE).map_err(|e| refused(format!("the arguments: {e}")))?;
        // A workflow step keeps its continuation (an earlier version of the sender sends none:
        // the step then runs alone).
        let (workflow, cont) = match &f.cont {
            Some(v) => {
                let c = workflow::Cont::from_value(v).map_err(|e| refused(format!("its workflow continuation: {e}")))?;
                (Some(c.wf.clone()), Some(c.encode().map_err(refused)?))
            }
            None => (None, None),
        };
        let row = store::NewCall {
            id: f.id,
            queue: q.name.clone(),
            module: f.module,
            function: f.function,
            args,
            from_cage: from_cage.to_string(),
            created_ms: created,
            due_ms: f.due_ms,
            expires_ms: expires,
            keep_until_ms: now.saturating_add(q.dedup_window.as_millis() as i64),
            max_attempts: f.max_attempts,
            trace: f.trace,
            workflow,
            cont,
        };
        let id = row.id.clone();
        if let Some(cluster) = self.cluster.get().filter(|c| c.has(&row.queue)) {
            // Boxed, as in enqueue: the clustered enqueue's future is some 11 KB.
            Box::pin(cluster.clone().enqueue(row)).await.map_err(|e| CallError::Failed(format!("calling {target}: {e}")))?;
            return Ok(id);
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.send(writer::Op::Enqueue(row, tx)).map_err(|e| CallError::Failed(format!("calling {target}: {e}")))?;
        match rx.await {
            Ok(Ok(_)) => Ok(id),
            Ok(Err(e)) => Err(CallError::Failed(format!("calling {target}: {e}"))),
            Err(_) => Err(CallError::Failed(format!("calling {target}: the queue writer of cage {} stopped", self.cage))),
        }
    }

    /// Applies a part of a join this cage holds, forwarded by the cage that ran the member
    /// (`_queue.join`); applied once by (join, index), so a second forward changes nothing.
    async fn accept_part(self: Arc<Self>, f: forward::Forwarded) -> Result<String, CallError> {
        let part = workflow::Part::from_args(f.args).map_err(|e| CallError::Refused(format!("cage {}: a part of a join cannot be read: {e}", self.cage)))?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.send(writer::Op::JoinPart { part, reply: tx }).map_err(CallError::Failed)?;
        match rx.await {
            Ok(Ok(())) => Ok(f.id),
            Ok(Err(e)) => Err(CallError::Failed(format!("cage {}: a part of a join: {e}", self.cage))),
            Err(_) => Err(CallError::Failed(format!("the queue writer of cage {} stopped", self.cage))),
        }
    }

    /// Stores calls to other cages in this cage's outbox, with `writes` (held state writes of
    /// a transaction) and `direct` (calls to this cage) in the same commit.
    async fn store_outgoing(&self, writes: Vec<Write>, direct: Vec<store::NewCall>, outgoing: Vec<store::OutboxCall>) -> Result<(), String> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.send(writer::Op::Outbox { writes, direct, outgoing, reply: tx })?;
        rx.await.unwrap_or_else(|_| Err(format!("the queue writer of cage {} stopped", self.cage)))
    }

    pub(crate) fn send(&self, op: writer::Op) -> Result<(), String> {
        let w = self.writer.lock().map_err(|_| "queue writer lock poisoned".to_string())?;
        w.send(op).map_err(|_| format!("the queue writer of cage {} stopped", self.cage))
    }

    /// A call in this cage's outbox: waiting to be forwarded, dead, or forwarded (accepted by
    /// its target, whose file keeps its progress).
    fn outbox_status(&self, id: &str) -> Result<Option<CallStatus>, String> {
        let rec = {
            let conn = self.reader.lock().map_err(|_| "queue: reader lock poisoned".to_string())?;
            store::outbox_find(&conn, &self.path, id)?
        };
        Ok(rec.map(|r| CallStatus {
            attempts: if r.status == "forwarded" { None } else { Some(0) },
            status: r.status,
            cage: r.cage,
            value: None,
            error: r.error,
        }))
    }

    /// Cancels call `id` of this cage's queue through the writer (one commit, answered once on
    /// disk); None when this queue does not hold it.
    async fn cancel(self: Arc<Self>, id: String) -> Result<Option<CancelAnswer>, String> {
        let reader = self.clone();
        let read_id = id.clone();
        let found = tokio::task::spawn_blocking(move || {
            let conn = reader.reader.lock().map_err(|_| "queue: reader lock poisoned".to_string())?;
            store::find(&conn, &reader.path, &read_id)
        })
        .await
        .unwrap_or_else(|e| Err(format!("the read failed: {e}")))?;
        let Some(rec) = found else {
            // A clustered queue's call: its record in the bucket (decision 151).
            let Some(cluster) = self.cluster.get().cloned() else { return Ok(None) };
            return cluster.cancel(id).await;
        };
        let window = self.queues.get(&rec.queue).map_or(DEFAULT_DEDUP_MS, |q| q.dedup_window.as_millis() as i64);
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.send(writer::Op::Cancel { id: id.clone(), keep_until_ms: store::now_ms().saturating_add(window), reply: tx })?;
        let done = rx.await.unwrap_or_else(|_| Err(format!("the queue writer of cage {} stopped", self.cage)))?;
        let cage = &self.cage;
        Ok(Some(match done {
            store::Cancel::Cancelled(was) => {
                // Read after the commit: an attempt that started before it is still counted.
                let running = self.inflight.lock().map(|f| f.contains_key(&rec.seq)).unwrap_or(false);
                let was = if running { "running".to_string() } else { was };
                let status =
                    CallStatus { status: "cancelled".into(), cage: cage.clone(), attempts: Some(rec.attempts), value: None, error: Some("cancelled".into()) };
                publish_end([cage, &rec.from_cage], &id, &status);
                let message = if running {
                    format!(
                        "call {id} of cage {cage} cancelled while an attempt runs: that attempt runs to its end, its outcome is dropped and it is not retried"
                    )
                } else {
                    format!("call {id} of cage {cage} cancelled (it was {was}); it will not run")
                };
                CancelAnswer { cancelled: true, status: Some(was), message }
            }
            store::Cancel::Unchanged(st) if st == "cancelled" => {
                CancelAnswer { cancelled: false, status: Some(st), message: format!("call {id} of cage {cage} was already cancelled") }
            }
            store::Cancel::Unchanged(st) => {
                CancelAnswer { message: format!("call {id} of cage {cage} is {st}: a call that ended cannot be cancelled"), cancelled: false, status: Some(st) }
            }
            // Pruned between the read and the cancel.
            store::Cancel::Unknown => return Ok(None),
        }))
    }

    fn status(&self, id: &str) -> Result<Option<CallStatus>, String> {
        let rec = {
            let conn = self.reader.lock().map_err(|_| "queue: reader lock poisoned".to_string())?;
            store::find(&conn, &self.path, id)?
        };
        let Some(rec) = rec else {
            // A group or chord this cage started: its join (a chord that ended is its body).
            let join = {
                let conn = self.reader.lock().map_err(|_| "queue: reader lock poisoned".to_string())?;
                workflow::join_status(&conn, self, id)?
            };
            if let Some((status, chord_done)) = join {
                if chord_done {
                    let body = format!("{id}.body");
                    return Ok(Some(match Service.result(None, &body)? {
                        Some(b) => CallStatus { error: b.error.map(|e| format!("its body {body}: {e}")), ..b },
                        None => CallStatus { status: "pending".into(), value: None, ..status },
                    }));
                }
                return Ok(Some(status));
            }
            return match self.cluster.get() {
                Some(cluster) => cluster.status(id),
                None => Ok(None),
            };
        };
        let running = self.inflight.lock().map(|f| f.contains_key(&rec.seq)).unwrap_or(false);
        let status = if running && (rec.status == "pending" || rec.status == "failed") { "running".to_string() } else { rec.status.clone() };
        let value = match &rec.result {
            Some(bytes) => match decode(bytes) {
                Ok(Value::Array(items)) => Some(items),
                Ok(other) => Some(vec![other]),
                Err(e) => return Err(format!("call {id}: its stored result cannot be read: {e}")),
            },
            None => None,
        };
        Ok(Some(CallStatus { status, cage: self.cage.clone(), attempts: Some(rec.attempts), value, error: rec.error }))
    }
}

/// Publishes the end of call `id` (done or dead) on its completion topic to the cages that may
/// wait for it: the one that stores it and the one that sent it (in every process that runs
/// them, when clustered).
pub(crate) fn publish_end(cages: [&str; 2], id: &str, status: &CallStatus) {
    let topic = durable::completion_topic(id);
    for (i, cage) in cages.iter().enumerate() {
        if i == 1 && cages[0] == cages[1] {
            break;
        }
        if rustomnic_lua::events::publish(cage, &topic, status.to_value(id, true)).is_err() {
            // Too large with its values: the waiter reads them from the file where it can.
            let _ = rustomnic_lua::events::publish(cage, &topic, status.to_value(id, false));
        }
    }
}

/// A call id that is unique across restarts and processes: time in nanoseconds, process and
/// a counter.
pub fn new_call_id() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let t = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("c{t:x}-{:x}-{:x}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

static STORES: RwLock<BTreeMap<String, Arc<Store>>> = RwLock::new(BTreeMap::new());

/// The queue store of `cage` in this process.
pub fn store_of(cage: &str) -> Option<Arc<Store>> {
    STORES.read().ok().and_then(|s| s.get(cage).cloned())
}

/// The ends of calls that ran in other processes, as their completion events arrived here:
/// a call forwarded from this process reads as done (or dead) once its event came, and a wait
/// that starts after the event still ends at once. Kept in memory, for the latest few only.
struct Seen {
    ends: HashMap<String, CallStatus>,
    order: std::collections::VecDeque<String>,
}

/// Completion events remembered by [`observe_completion`].
const SEEN_MAX: usize = 65_536;

static SEEN: Mutex<Option<Seen>> = Mutex::new(None);

/// Notes a completion event that arrived from another process (`topic`, `value` as
/// [`durable::completion_topic`] and [`CallStatus::to_value`] make them); other events are
/// ignored.
pub fn observe_completion(topic: &str, value: &Value) {
    if !topic.starts_with("call") {
        return;
    }
    let Some((id, status)) = CallStatus::from_value(value) else {
        return;
    };
    if !status.is_final() {
        return;
    }
    let mut seen = SEEN.lock().unwrap_or_else(|p| p.into_inner());
    let seen = seen.get_or_insert_with(|| Seen { ends: HashMap::new(), order: Default::default() });
    if seen.ends.insert(id.clone(), status).is_none() {
        seen.order.push_back(id);
    }
    while seen.order.len() > SEEN_MAX {
        if let Some(old) = seen.order.pop_front() {
            seen.ends.remove(&old);
        }
    }
}

fn seen_end(id: &str) -> Option<CallStatus> {
    SEEN.lock().unwrap_or_else(|p| p.into_inner()).as_ref().and_then(|s| s.ends.get(id).cloned())
}

fn all_stores() -> Vec<Arc<Store>> {
    STORES.read().map(|s| s.values().cloned().collect()).unwrap_or_default()
}

/// Figures of every queue of every cage in this process, for the monitoring page:
/// (cage, figures).
pub fn metrics() -> Vec<(String, Vec<QueueFigures>)> {
    all_stores()
        .into_iter()
        .map(|s| {
            let f = s.figures().unwrap_or_else(|e| {
                if let Some(note) = s.log.allow("figures") {
                    tracing::warn!(cage = %s.cage, "{e}{note}");
                }
                Vec::new()
            });
            (s.cage.clone(), f)
        })
        .collect()
}

/// (WAL bytes, file bytes) of the state file of `cage`, when its queue runs in this process.
pub fn file_sizes(cage: &str) -> Option<(u64, u64)> {
    store_of(cage).map(|s| (s.wal_bytes(), s.file_bytes()))
}

struct Service;

impl Calls for Service {
    fn check(&self, call: &DurableCall) -> Result<(), String> {
        workflow::check_step(call)
    }

    fn workflow(&self, workflow: durable::Workflow) -> LocalBoxFuture<'static, Result<String, String>> {
        Box::pin(workflow::start(workflow))
    }

    fn cancel_workflow(&self, id: &str) -> LocalBoxFuture<'static, Result<CancelAnswer, String>> {
        Box::pin(workflow::cancel_here(id.to_string()))
    }

    fn workflow_status(&self, id: &str) -> Result<Option<durable::WorkflowStatus>, String> {
        let mut views = Vec::new();
        for s in all_stores() {
            let mut v = {
                let conn = s.reader.lock().map_err(|_| "queue: reader lock poisoned".to_string())?;
                workflow::view(&conn, &s.path, id)?
            };
            // A step running now reads as such, as in pmnc.calls.result.
            for step in v.steps.iter_mut().filter(|st| !st.4 && (st.1 == "pending" || st.1 == "failed")) {
                if s.status(&step.0)?.is_some_and(|c| c.status == "running") {
                    step.1 = "running".into();
                }
            }
            // A step forwarded to a clustered queue of a cage here: its record in the bucket.
            for step in v.steps.iter_mut().filter(|st| st.4 && st.1 == "forwarded") {
                let target = step.3.split('.').next().and_then(store_of).filter(|t| t.cluster.get().is_some());
                if let Some(Ok(Some(c))) = target.map(|t| t.status(&step.0)) {
                    step.1 = c.status;
                    step.2 = c.error;
                }
            }
            views.push((s.cage.clone(), v));
        }
        Ok(workflow::summary(id, &views, seen_end))
    }

    fn commit_with_calls(&self, from_cage: &str, calls: Vec<DurableCall>, finish: Finish) -> LocalBoxFuture<'static, Result<Vec<String>, CommitFailure>> {
        let sender = store_of(from_cage);
        Box::pin(async move {
            let Some(sender) = sender else {
                let _ = finish(false).await;
                return Err(CommitFailure::Calls("durable calls in transactions need the cage's queue store, which is not running".into()));
            };
            let mut ids = Vec::new();
            let mut direct = Vec::new();
            let mut outgoing = Vec::new();
            // Checked before anything commits, so a refused call rolls the transaction back:
            // every refusal that a direct call would meet at once is met here too.
            let checked: Result<(), String> = (|| {
                if let Some(why) = sender.refusing() {
                    return Err(format!("cage {} accepts no new durable calls: {why}", sender.cage));
                }
                for call in calls {
                    check_names(&call)?;
                    let row = if call.cage == sender.cage && sender.clustered(&call.options.queue) {
                        // A clustered queue of this cage: through the outbox (atomic with the
                        // state writes), which hands it to JetStream once committed.
                        let expiry = sender.queue(&call.target(), &call.options.queue)?.expires_in;
                        outgoing_call(call, Some(expiry))?
                    } else if call.cage == sender.cage {
                        let row = sender.new_call(call)?;
                        ids.push(row.id.clone());
                        direct.push(row);
                        continue;
                    } else if let Some(target) = store_of(&call.cage) {
                        let expiry = target.queue(&call.target(), &call.options.queue)?.expires_in;
                        outgoing_call(call, Some(expiry))?
                    } else if worker::has_remote() {
                        remote_outgoing(call)?
                    } else {
                        return Err(no_cage_here(&call));
                    };
                    ids.push(row.id.clone());
                    outgoing.push(row);
                }
                Ok(())
            })();
            if let Err(e) = checked {
                let _ = finish(false).await;
                return Err(CommitFailure::Calls(e));
            }
            let (committed, writes) = held::scope(&sender.path, finish(true)).await;
            if let Err(e) = committed {
                // The other participants' outcome stands; the state writes go in as they would
                // have, the calls do not.
                if let Err(w) = sender.store_outgoing(writes, Vec::new(), Vec::new()).await {
                    tracing::error!(cage = %sender.cage, "transaction state writes after a failed commit: {w}");
                }
                return Err(CommitFailure::Participant(e));
            }
            sender.store_outgoing(writes, direct, outgoing).await.map_err(CommitFailure::Calls)?;
            Ok(ids)
        })
    }

    fn enqueue(&self, call: DurableCall) -> LocalBoxFuture<'static, Result<String, String>> {
        if let Err(e) = check_names(&call) {
            return Box::pin(async move { Err(e) });
        }
        if let Some(target) = store_of(&call.cage) {
            return Box::pin(target.enqueue(call));
        }
        if !worker::has_remote() {
            let e = no_cage_here(&call);
            return Box::pin(async move { Err(e) });
        }
        // A cage elsewhere: through this cage's outbox, forwarded to the target's accept.
        let Some(sender) = store_of(&call.from_cage) else {
            let e = format!("calling {}: cage {} has no queue store in this process", call.target(), call.from_cage);
            return Box::pin(async move { Err(e) });
        };
        Box::pin(async move {
            let target = call.target();
            let row = remote_outgoing(call)?;
            let id = row.id.clone();
            sender.store_outgoing(Vec::new(), Vec::new(), vec![row]).await.map_err(|e| format!("calling {target}: {e}"))?;
            Ok(id)
        })
    }

    fn result(&self, cage: Option<&str>, id: &str) -> Result<Option<CallStatus>, String> {
        let all = all_stores();
        let stores: Vec<&Arc<Store>> = all.iter().filter(|s| cage.is_none_or(|c| c == s.cage)).collect();
        for s in &stores {
            if let Some(st) = s.status(id)? {
                return Ok(Some(st));
            }
        }
        // Then the outboxes: an accepted call is in its target's queue before it is marked
        // forwarded in them.
        // A call that ran in another process: its end, once its event came here, is the news;
        // it can come before this outbox has recorded that the call was accepted.
        let seen = seen_end(id).filter(|st| cage.is_none_or(|c| c == st.cage));
        for s in &all {
            if let Some(st) = s.outbox_status(id)? {
                if cage.is_none_or(|c| c == st.cage) {
                    let end = seen.filter(|_| st.status != "dead");
                    return Ok(Some(end.unwrap_or(st)));
                }
            }
        }
        if let Some(end) = seen {
            return Ok(Some(end));
        }
        match cage {
            Some(c) if store_of(c).is_none() => Err(format!(
                "cage {c} does not run in this process: the calls it stores can be read only where it runs (pmnc queue show on its folder); pmnc.calls.wait waits for their end from the cage that sent them"
            )),
            _ => Ok(None),
        }
    }

    fn cancel(&self, cage: Option<&str>, id: &str) -> LocalBoxFuture<'static, Result<CancelAnswer, String>> {
        let all = all_stores();
        let (cage, id) = (cage.map(str::to_string), id.to_string());
        Box::pin(async move {
            for s in all.iter().filter(|s| cage.as_deref().is_none_or(|c| c == s.cage)) {
                if let Some(answer) = s.clone().cancel(id.clone()).await? {
                    return Ok(answer);
                }
            }
            // The target owns its calls: an outbox row only says where a call went, or that it
            // waits to be accepted, and stopping its forward here could race with the target's
            // acceptance (docs/decisions/139).
            for s in &all {
                if let Some(st) = s.outbox_status(&id)? {
                    if cage.as_deref().is_none_or(|c| c == st.cage) {
                        return Ok(CancelAnswer {
                            cancelled: false,
                            message: format!(
                                "call {id} is in the outbox of cage {} ({}), sent to cage {}: only the cage that stores it can cancel it (pmnc.calls.cancel in a process running {}, or pmnc queue cancel on its folder)",
                                s.cage, st.status, st.cage, st.cage
                            ),
                            status: Some(st.status),
                        });
                    }
                }
            }
            if let Some(c) = cage.as_deref().filter(|c| store_of(c).is_none()) {
                return Err(format!("cage {c} does not run in this process: cancel its calls where it runs (or pmnc queue cancel on its folder)"));
            }
            Ok(CancelAnswer { cancelled: false, status: None, message: format!("no call {id:?} in the queues of this process") })
        })
    }

    fn accept(&self, from_cage: &str, cage: &str, args: Vec<Value>) -> LocalBoxFuture<'static, Result<Vec<Value>, CallError>> {
        let (from_cage, cage) = (from_cage.to_string(), cage.to_string());
        Box::pin(async move {
            let Some(store) = store_of(&cage) else {
                return Err(CallError::NoCage(format!("cage {cage} does not run in this process")));
            };
            let f = forward::decode(args).map_err(|e| CallError::Refused(format!("cage {cage}: a forwarded durable call cannot be read: {e}")))?;
            store.accept(&from_cage, f).await.map(|id| vec![Value::str(id)])
        })
    }
}

/// The queue of a running cage; stops its threads when dropped.
pub struct Running {
    store: Arc<Store>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Running {
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// At shutdown: starts no more calls and waits, at most `limit`, for the running ones to
    /// record their end (those still running then run again at the next start). Returns how
    /// many were still running.
    pub async fn drain(&self, limit: Duration) -> usize {
        self.store.paused.store(true, Ordering::SeqCst);
        let end = std::time::Instant::now() + limit;
        loop {
            let clustered = self.store.cluster.get().map_or(0, |c| c.running.lock().map(|r| r.len()).unwrap_or(0));
            let running = self.store.inflight.lock().map(|f| f.len()).unwrap_or(0) + clustered;
            if running == 0 || std::time::Instant::now() >= end {
                return running;
            }
            // Completions arrive on other threads with no notification to this runtime; a
            // short bounded poll is enough for a shutdown.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.store.stop.store(true, Ordering::SeqCst);
        self.store.wake();
        if let Some(c) = self.store.cluster.get() {
            c.stop();
        }
        if let Ok(mut s) = STORES.write() {
            if s.get(&self.store.cage).is_some_and(|x| Arc::ptr_eq(x, &self.store)) {
                s.remove(&self.store.cage);
            }
        }
        // The writer ends when every sender is gone; the dispatcher on the stop flag.
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Above this size the writer empties the WAL with a TRUNCATE checkpoint, and a checkpoint
/// that resets it cuts it back to this size (journal_size_limit): the WAL stays bounded while
/// the cage runs (docs/decisions/038).
pub const WAL_LIMIT_BYTES: u64 = 32 << 20;

/// How often the WAL is copied into the file (PASSIVE: never waits for readers or writers).
const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);
/// How long a TRUNCATE checkpoint waits for readers of old snapshots.
const TRUNCATE_WAIT: Duration = Duration::from_millis(200);
/// Longest pause between two TRUNCATE attempts while readers keep it from finishing.
const TRUNCATE_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// The writer's busy timeout (waiting for the file's write lock).
const WRITER_BUSY: Duration = Duration::from_secs(10);

fn checkpoints(store: Arc<Store>, conn: rusqlite::Connection) {
    while !store.stop.load(Ordering::SeqCst) {
        std::thread::sleep(CHECKPOINT_EVERY);
        if store.wal_bytes() > WAL_LIMIT_BYTES {
            // The writer empties it now (WalTrim); a checkpoint here would hold the checkpoint
            // lock that its TRUNCATE needs.
            continue;
        }
        let passive = {
            let _running = store.checkpoint.lock().unwrap_or_else(|p| p.into_inner());
            conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
        };
        if let Err(e) = passive {
            if let Some(note) = store.log.allow("checkpoint") {
                tracing::warn!(cage = %store.cage, "queue: checkpoint of {} failed: {e}{note}", store.path.display());
            }
        }
    }
}

/// Empties the WAL when it passed its limit. PASSIVE checkpoints copy it into the file, but
/// the WAL only starts over from its beginning when no reader holds a snapshot in it at the
/// moment a write begins; with reads going on all the time (the dispatcher reads after every
/// commit) that moment may not come, and the WAL grows. A TRUNCATE checkpoint waits for the
/// readers instead. It runs on the writer, between two commits: a checkpoint on another
/// connection would have to catch the write lock between them, which under load it does not.
pub(crate) struct WalTrim {
    next: Instant,
    backoff: Duration,
}

impl WalTrim {
    pub(crate) fn new() -> WalTrim {
        WalTrim { next: Instant::now(), backoff: Duration::from_secs(1) }
    }

    /// Called by the writer after a commit.
    pub(crate) fn after_commit(&mut self, store: &Store, conn: &rusqlite::Connection) {
        if Instant::now() < self.next || store.wal_bytes() <= WAL_LIMIT_BYTES {
            return;
        }
        // Waits at most TRUNCATE_WAIT for readers (the enqueues queue up meanwhile), copies every
        // frame and empties the file.
        let done = {
            let _running = store.checkpoint.lock().unwrap_or_else(|p| p.into_inner());
            let _ = conn.busy_timeout(TRUNCATE_WAIT);
            let done = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get::<_, i64>(0));
            let _ = conn.busy_timeout(WRITER_BUSY);
            done
        };
        match done {
            Ok(0) => self.backoff = Duration::from_secs(1),
            other => {
                self.next = Instant::now() + self.backoff;
                self.backoff = (self.backoff * 2).min(TRUNCATE_BACKOFF_MAX);
                if let Some(note) = store.log.allow("truncate") {
                    let why = match other {
                        Err(e) => e.to_string(),
                        _ => "a reader holds an old snapshot".into(),
                    };
                    tracing::info!(cage = %store.cage, "queue: the WAL of {} is {} bytes and cannot be emptied now ({why}); trying again in {:?}{note}", store.path.display(), store.wal_bytes(), self.next - Instant::now());
                }
            }
        }
    }
}

/// Why the state file cannot be written, when the file system says (SQLite only says it could
/// not open the file): a read-only volume, or permissions.
fn why_unwritable(path: &Path) -> String {
    let probe = if path.exists() {
        std::fs::OpenOptions::new().append(true).open(path).map(|_| ())
    } else {
        match path.parent() {
            Some(dir) => tempfile_probe(dir),
            None => Ok(()),
        }
    };
    match probe {
        Err(e) if e.kind() == std::io::ErrorKind::ReadOnlyFilesystem => " (the file system holding it is read-only)".into(),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            format!(" (this process may not write it: {e})")
        }
        _ => String::new(),
    }
}

fn tempfile_probe(dir: &Path) -> std::io::Result<()> {
    let probe = dir.join(format!(".pmnc-write-probe-{}", std::process::id()));
    std::fs::write(&probe, b"")?;
    std::fs::remove_file(&probe)
}

/// Opens the queue of `cage` in the state file at `path` and starts its writer and dispatcher.
pub fn start(cage: &str, path: &Path, queues: Vec<QueueConfig>, cage_timeout: Duration, spawn: Spawner) -> Result<Running, String> {
    start_with(cage, path, queues, cage_timeout, spawn, |_| Ok(()))
}

/// [`start`] with a set-up step for the writer's connection (tests limit its size).
fn start_with(
    cage: &str,
    path: &Path,
    queues: Vec<QueueConfig>,
    cage_timeout: Duration,
    spawn: Spawner,
    setup: impl FnOnce(&rusqlite::Connection) -> rusqlite::Result<()>,
) -> Result<Running, String> {
    let open = |what: &str| {
        rustomnic_resource_state::store::open(path, WRITER_BUSY).map_err(|e| format!("cage {cage}: queue {what}: {}{}", e.message, why_unwritable(path)))
    };
    let writer_conn = open("writer")?;
    setup(&writer_conn).map_err(|e| format!("cage {cage}: queue writer: {e}"))?;
    let pragma = |c: &rusqlite::Connection, name: &str, value: i64| c.pragma_update(None, name, value).map_err(|e| format!("cage {cage}: queue {name}: {e}"));
    // Checkpoints (copying the WAL into the file, with an fsync of the file) run on a thread of
    // their own instead of inside the writer's commits, where they stalled every waiting call;
    // only emptying a WAL past its limit is the writer's (WalTrim).
    pragma(&writer_conn, "wal_autocheckpoint", 0)?;
    pragma(&writer_conn, "journal_size_limit", WAL_LIMIT_BYTES as i64)?;
    let checkpoint_conn = open("checkpointer")?;
    pragma(&checkpoint_conn, "journal_size_limit", WAL_LIMIT_BYTES as i64)?;
    let dispatch_conn = open("dispatcher")?;
    let reader = open("reader")?;
    let (tx, rx) = std::sync::mpsc::channel();
    let store = Arc::new(Store {
        cage: cage.to_string(),
        path: path.to_path_buf(),
        queues: queues.into_iter().map(|q| (q.name.clone(), q)).collect(),
        cage_timeout,
        writer: Mutex::new(tx),
        inflight: Mutex::new(HashMap::new()),
        ended: Mutex::new(Default::default()),
        refusing: Mutex::new(None),
        wake: (Mutex::new(false), Condvar::new()),
        stop: AtomicBool::new(false),
        paused: AtomicBool::new(false),
        outbox_changes: AtomicU64::new(0),
        forwarding: Mutex::new(Default::default()),
        unrecorded: Mutex::new(HashMap::new()),
        outbox_unrecorded: Mutex::new(HashMap::new()),
        log: log::Limiter::default(),
        checkpoint: Mutex::new(()),
        reader: Mutex::new(reader),
        cluster: std::sync::OnceLock::new(),
        #[cfg(test)]
        hooks: Hooks::default(),
    });
    let thread = |name: String, what: &str, run: Box<dyn FnOnce() + Send>| {
        std::thread::Builder::new().name(name).spawn(run).map_err(|e| format!("cage {cage}: cannot start the queue {what}: {e}"))
    };
    let (w, d, c) = (store.clone(), store.clone(), store.clone());
    if let Some(cluster) = jetstream::Cluster::start(&store, spawn.clone())? {
        let _ = store.cluster.set(cluster);
    }
    let threads = vec![
        thread(format!("pmnc-queue-writer-{cage}"), "writer", Box::new(move || writer::run(w, writer_conn, rx)))?,
        thread(format!("pmnc-queue-{cage}"), "dispatcher", Box::new(move || dispatch::run(d, dispatch_conn, spawn)))?,
        thread(format!("pmnc-queue-checkpoint-{cage}"), "checkpointer", Box::new(move || checkpoints(c, checkpoint_conn)))?,
    ];
    if let Ok(mut s) = STORES.write() {
        s.insert(cage.to_string(), store.clone());
    }
    // Parts of the joins this file holds, from the other processes of the flock (decision 152).
    holder::serve(&store);
    rustomnic_lua::durable::set_calls(Arc::new(Service));
    Ok(Running { store, threads })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustomnic_lua::durable::CallOptions;

    fn call(id: &str) -> DurableCall {
        DurableCall {
            from_cage: "web".into(),
            cage: "fulltest".into(),
            module: "m".into(),
            function: "f".into(),
            args: vec![Value::str("x".repeat(2000))],
            options: CallOptions { queue: "q".into(), id: Some(id.into()), delay: Some(3600.0), ..Default::default() },
        }
    }

    /// A queue of `cage` with `queues` in a new file, its jobs handed to `spawn` and its writer's
    /// connection set up by `setup`: (folder, file, runtime for its calls, queue).
    fn new_queue(
        cage: &str,
        queues: Vec<QueueConfig>,
        spawn: Spawner,
        setup: impl FnOnce(&rusqlite::Connection) -> rusqlite::Result<()>,
    ) -> (tempfile::TempDir, PathBuf, tokio::runtime::Runtime, Running) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.sqlite");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let running = start_with(cage, &path, queues, Duration::from_secs(5), spawn, setup).unwrap();
        (dir, path, rt, running)
    }

    fn outgoing(id: &str) -> store::OutboxCall {
        let now = store::now_ms();
        store::OutboxCall {
            id: id.into(),
            cage: "elsewhere".into(),
            queue: "q".into(),
            module: "m".into(),
            function: "f".into(),
            args: encode(&Value::Array(Vec::new()), MAX_VALUE).unwrap(),
            created_ms: now,
            due_ms: now,
            expires_ms: now + 60_000,
            expires_given: true,
            max_attempts: None,
            trace: None,
            workflow: None,
            cont: None,
        }
    }

    /// Issue 22 #1: a dispatcher pass that reads the outbox while an outbox insert is on its way
    /// to the file (stored, not committed yet) must not leave that call untried once it commits.
    #[test]
    fn an_outbox_call_committed_after_a_dispatcher_pass_read_the_outbox_is_forwarded() {
        use std::sync::mpsc::channel;
        let (jobs_tx, jobs_rx) = channel::<()>();
        let jobs_tx = Mutex::new(jobs_tx);
        // No queues: every job the dispatcher hands out is a forward of an outbox call.
        let spawn: Spawner = Arc::new(move |_job| {
            let _ = jobs_tx.lock().unwrap().send(());
        });
        let (_dir, _path, _rt, running) = new_queue("racetest", Vec::new(), spawn, |_| Ok(()));
        let store = running.store().clone();
        let (read_tx, read_rx) = channel::<()>();
        let read_tx = Mutex::new(read_tx);
        *store.hooks.after_outbox_read.lock().unwrap() = Some(Arc::new(move || {
            let _ = read_tx.lock().unwrap().send(());
        }));
        // The writer stops just before its commit until the test releases it.
        let (reached_tx, reached_rx) = channel::<()>();
        let (release_tx, release_rx) = channel::<()>();
        let gate = Mutex::new((reached_tx, release_rx));
        *store.hooks.before_commit.lock().unwrap() = Some(Arc::new(move || {
            let g = gate.lock().unwrap();
            let _ = g.0.send(());
            let _ = g.1.recv_timeout(Duration::from_secs(20));
        }));
        while read_rx.try_recv().is_ok() {}
        let sender = {
            let store = store.clone();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                // As Service::enqueue does for a call to a cage of another process.
                let stored = rt.block_on(store.store_outgoing(Vec::new(), Vec::new(), vec![outgoing("race-1")]));
                store.wake();
                stored
            })
        };
        reached_rx.recv_timeout(Duration::from_secs(10)).expect("the writer reaches its commit");
        // A pass of the dispatcher reads the outbox while the call is not committed yet.
        store.wake();
        read_rx.recv_timeout(Duration::from_secs(10)).expect("the dispatcher reads the outbox meanwhile");
        *store.hooks.before_commit.lock().unwrap() = None;
        release_tx.send(()).unwrap();
        sender.join().unwrap().expect("the outbox call is stored");
        assert!(jobs_rx.recv_timeout(Duration::from_secs(5)).is_ok(), "the stored outbox call was never handed out for forwarding");
    }

    fn wal_bytes(path: &Path) -> u64 {
        file_len(&wal_path(path))
    }

    /// A call that ran in another process can end (its completion event arrives) before this
    /// outbox has recorded that it was accepted: the end is what pmnc.calls.result answers, so
    /// that a wait started then returns at once instead of waiting for an event that came already.
    #[test]
    fn a_completion_event_wins_over_an_outbox_row_not_yet_marked_forwarded() {
        let (_dir, _path, rt, running) = new_queue("seentest", Vec::new(), Arc::new(|_job| {}), |_| Ok(()));
        let store = running.store().clone();
        let mut row = outgoing("seen-1");
        row.cage = "elsewhere".into();
        rt.block_on(store.store_outgoing(Vec::new(), Vec::new(), vec![row])).unwrap();
        let pending = Service.result(None, "seen-1").unwrap().unwrap();
        assert_eq!((pending.status.as_str(), pending.cage.as_str()), ("pending", "elsewhere"));
        let end = CallStatus { status: "done".into(), cage: "elsewhere".into(), attempts: Some(1), value: Some(vec![Value::Int(42)]), error: None };
        observe_completion(&durable::completion_topic("seen-1"), &end.to_value("seen-1", true));
        assert_eq!(Service.result(None, "seen-1").unwrap(), Some(end.clone()));
        assert_eq!(Service.result(Some("elsewhere"), "seen-1").unwrap(), Some(end));
    }

    /// Issue 18: a call still in this cage's outbox is not cancelled here (its target owns it
    /// once it accepts it); the answer names the target. Neither from Lua nor from the file.
    #[test]
    fn a_call_in_the_outbox_is_not_cancelled_by_its_sender() {
        let (_dir, path, rt, running) = new_queue("outcanceltest", Vec::new(), Arc::new(|_job| {}), |_| Ok(()));
        let store = running.store().clone();
        rt.block_on(store.store_outgoing(Vec::new(), Vec::new(), vec![outgoing("outcancel-1")])).unwrap();
        let a = rt.block_on(Service.cancel(None, "outcancel-1")).unwrap();
        assert_eq!((a.cancelled, a.status.as_deref()), (false, Some("pending")));
        assert!(
            a.message.contains("in the outbox of cage outcanceltest (pending), sent to cage elsewhere: only the cage that stores it can cancel it"),
            "{}",
            a.message
        );
        let e = admin::cancel(&path, "outcancel-1", Duration::from_secs(60)).unwrap_err();
        assert!(e.contains("is in this cage's outbox (pending), sent to cage elsewhere"), "{e}");
        assert_eq!(Service.result(None, "outcancel-1").unwrap().unwrap().status, "pending", "nothing changed");
        let none = rt.block_on(Service.cancel(None, "outcancel-none")).unwrap();
        assert_eq!((none.cancelled, none.status), (false, None));
        let elsewhere = rt.block_on(Service.cancel(Some("nosuchcage"), "x")).unwrap_err();
        assert!(elsewhere.contains("cage nosuchcage does not run in this process"), "{elsewhere}");
    }

    /// Issue 22 #12, as measured: under steady writes while reads never stop (the dispatcher reads
    /// after every commit, requests read results), the WAL never gets a moment without readers
    /// to start over, and PASSIVE checkpoints alone let it grow without bound.
    #[test]
    fn the_wal_stays_bounded_under_writes_while_reads_never_stop() {
        let (_dir, path, rt, running) = new_queue("busytest", vec![QueueConfig::new("q")], Arc::new(|_job| {}), |_| Ok(()));
        let store = running.store().clone();
        let stop = Arc::new(AtomicBool::new(false));
        // Two readers taking turns, so that one of them always holds a snapshot.
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (stop, path) = (stop.clone(), path.clone());
                std::thread::spawn(move || {
                    let c = rusqlite::Connection::open(&path).unwrap();
                    while !stop.load(Ordering::SeqCst) {
                        c.execute_batch("BEGIN; SELECT count(*) FROM queue_calls; SELECT count(*) FROM state; COMMIT;").unwrap();
                    }
                })
            })
            .collect();
        let mut peak = 0;
        rt.block_on(async {
            for i in 0..3000 {
                let mut c = call(&format!("b{i}"));
                c.cage = "busytest".into();
                c.args = vec![Value::str("x".repeat(10_000))];
                store.clone().enqueue(c).await.unwrap();
                peak = peak.max(wal_bytes(&path));
            }
        });
        stop.store(true, Ordering::SeqCst);
        for r in readers {
            r.join().unwrap();
        }
        assert!(peak <= 2 * WAL_LIMIT_BYTES, "the WAL reached {peak} bytes, over twice its limit of {WAL_LIMIT_BYTES}");
    }

    /// Issue 22 #12: while a reader holds an old snapshot the WAL has to grow; once it is gone the
    /// WAL must shrink back under its limit while the cage runs, not stay at its peak until exit.
    #[test]
    fn the_wal_shrinks_back_once_a_long_reader_is_gone() {
        let (_dir, path, rt, running) = new_queue("waltest", vec![QueueConfig::new("q")], Arc::new(|_job| {}), |_| Ok(()));
        let store = running.store().clone();
        let reader = rusqlite::Connection::open(&path).unwrap();
        reader.execute_batch("BEGIN; SELECT count(*) FROM queue_calls;").unwrap();
        let big = |i: usize| {
            let mut c = call(&format!("w{i}"));
            c.cage = "waltest".into();
            c.args = vec![Value::str("x".repeat(10_000))];
            c
        };
        rt.block_on(async {
            for i in 0..1500 {
                store.clone().enqueue(big(i)).await.unwrap();
            }
        });
        let peak = wal_bytes(&path);
        assert!(peak > WAL_LIMIT_BYTES, "the reader kept the WAL from being reused: {peak} bytes");
        reader.execute_batch("COMMIT").unwrap();
        drop(reader);
        let mut now = peak;
        // The writer retries an emptying that a reader held up after at most 30 s.
        let shrunk = (0..800).any(|i| {
            rt.block_on(store.clone().enqueue(big(100_000 + i))).unwrap();
            std::thread::sleep(Duration::from_millis(50));
            now = wal_bytes(&path);
            now <= WAL_LIMIT_BYTES
        });
        assert!(shrunk, "the WAL is still {now} bytes (peak {peak}), over its limit of {WAL_LIMIT_BYTES}");
    }

    /// A full disk (here: the file at its page limit) fails the enqueue, then refuses new calls,
    /// and keeps every call stored before.
    #[test]
    fn a_full_file_refuses_new_calls_and_keeps_old_ones() {
        let (dir, _rt, running, stored) = full_file("fulltest");
        drop(running);
        let c = rusqlite::Connection::open(dir.path().join("state.sqlite")).unwrap();
        let kept: i64 = c.query_row("SELECT count(*) FROM queue_calls", [], |r| r.get(0)).unwrap();
        assert_eq!(kept, stored as i64);
    }

    /// Once the file has room again, new calls are accepted even when nothing else commits
    /// (no call waits to run): a call is let through a second after the last failed commit.
    #[test]
    fn a_full_file_accepts_new_calls_again_once_there_is_room() {
        let (dir, rt, running, _) = full_file("roomtest");
        let c = rusqlite::Connection::open(dir.path().join("state.sqlite")).unwrap();
        c.busy_timeout(Duration::from_secs(10)).unwrap();
        c.execute("DELETE FROM queue_calls", []).unwrap();
        let end = std::time::Instant::now() + Duration::from_secs(10);
        let mut last = String::new();
        while std::time::Instant::now() < end {
            let mut late = call("after-room");
            late.cage = "roomtest".into();
            match rt.block_on(running.store().clone().enqueue(late)) {
                Ok(_) => return,
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("still refused 10 s after room was made: {last}");
    }

    /// A queue of `cage` whose file is filled to its page limit: the enqueue that finds it full
    /// fails, the next is refused, and the calls stored before stay. (folder, runtime, queue,
    /// calls stored)
    fn full_file(cage: &str) -> (tempfile::TempDir, tokio::runtime::Runtime, Running, usize) {
        let (dir, _path, rt, running) = new_queue(cage, vec![QueueConfig::new("q")], Arc::new(|_job| {}), |c| {
            let pages: i64 = c.query_row("PRAGMA page_count", [], |r| r.get(0))?;
            c.query_row(&format!("PRAGMA max_page_count = {}", pages + 30), [], |_| Ok(()))
        });
        let store = running.store().clone();
        let mut stored = 0;
        let error = rt.block_on(async {
            for i in 0..1000 {
                match store
                    .clone()
                    .enqueue({
                        let mut c = call(&format!("c{i}"));
                        c.cage = cage.into();
                        c
                    })
                    .await
                {
                    Ok(_) => stored += 1,
                    Err(e) => return e,
                }
            }
            String::new()
        });
        assert!(stored > 0 && error.contains("is full"), "after {stored} calls: {error}");
        let refused = rt
            .block_on(store.clone().enqueue({
                let mut c = call("late");
                c.cage = cage.into();
                c
            }))
            .unwrap_err();
        assert!(refused.contains(&format!("queue q of cage {cage} accepts no new calls")), "{refused}");
        let figures = store.figures().unwrap();
        assert_eq!((figures[0].queue.as_str(), figures[0].depth), ("q", stored as u64));
        assert_eq!(metrics().iter().find(|(c, _)| c == cage).map(|(_, f)| f[0].depth), Some(stored as u64));
        (dir, rt, running, stored)
    }
}
