//! Durable calls and the task queue: `pmnc("<cage>", {queue = ...}).m.f(x)` stores the call in
//! the target cage's SQLite file (the state file, so that a call's state writes commit with its
//! completion), one writer thread per cage commits enqueues and completions in groups, and a
//! dispatcher thread hands due calls to the worker threads under each queue's limits.
//! See docs/queues.md for the guarantees and docs/decisions/030-*.md for the design.

pub mod admin;
pub mod config;
mod dispatch;
pub mod store;
mod writer;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::future::LocalBoxFuture;
use rustomnic_core::Value;
use rustomnic_lua::durable::{CallStatus, Calls, CommitFailure, DurableCall, Finish};
use rustomnic_resource_state::store::Write;
use rustomnic_resource_state::{decode, encode, held, MAX_VALUE};

pub use config::{read_queues, Backoff, QueueConfig};
pub use store::QueueFigures;

/// Work for a worker thread: made on another thread, run there on the worker's `LocalSet`.
pub type Job = Box<dyn FnOnce() -> LocalBoxFuture<'static, ()> + Send>;
/// Hands a job to some worker thread (the runtime's round robin).
pub type Spawner = Arc<dyn Fn(Job) + Send + Sync>;

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
    pub(crate) ended: Mutex<std::collections::HashSet<i64>>,
    /// Why new calls are refused (the last commit failed: full disk, damaged file).
    pub(crate) refusing: Mutex<Option<String>>,
    pub(crate) wake: (Mutex<bool>, Condvar),
    pub(crate) stop: AtomicBool,
    /// Set at shutdown: no new call starts; the running ones finish.
    pub(crate) paused: AtomicBool,
    /// Set when the outbox may hold calls to forward (written, or a retry set), so that the
    /// dispatcher reads the outbox only then or when its next retry is due.
    pub(crate) outbox_hint: AtomicBool,
    /// Outbox calls being forwarded now.
    pub(crate) forwarding: Mutex<std::collections::HashSet<i64>>,
    /// Reads for pmnc.calls.result.
    pub(crate) reader: Mutex<rusqlite::Connection>,
}

impl Store {
    pub(crate) fn wake(&self) {
        let (lock, cv) = &self.wake;
        if let Ok(mut w) = lock.lock() {
            *w = true;
            cv.notify_one();
        }
    }

    fn refusing(&self) -> Option<String> {
        self.refusing.lock().ok().and_then(|r| r.clone())
    }

    pub fn cage(&self) -> &str {
        &self.cage
    }

    /// Per-queue figures (depth, age of the oldest waiting call, retries, dead letters).
    pub fn figures(&self) -> Result<Vec<QueueFigures>, String> {
        let conn = self.reader.lock().map_err(|_| "queue: reader lock poisoned".to_string())?;
        let mut f = store::figures(&conn, &self.path)?;
        for q in self.queues.keys() {
            if !f.iter().any(|x| &x.queue == q) {
                f.push(QueueFigures { queue: q.clone(), ..Default::default() });
            }
        }
        f.sort_by(|a, b| a.queue.cmp(&b.queue));
        Ok(f)
    }

    async fn enqueue(self: Arc<Self>, call: DurableCall) -> Result<String, String> {
        let target = format!("{}.{}.{}", call.cage, call.module, call.function);
        let row = self.new_call(call)?;
        let id = row.id.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.send(writer::Op::Enqueue(row, tx)).map_err(|e| format!("calling {target}: {e}"))?;
        match rx.await {
            Ok(Ok(_inserted)) => Ok(id),
            Ok(Err(e)) => Err(format!("calling {target}: {e}")),
            Err(_) => Err(format!("calling {target}: the queue writer of cage {} stopped", self.cage)),
        }
    }

    /// Checks a call to this cage and makes its row.
    fn new_call(&self, call: DurableCall) -> Result<store::NewCall, String> {
        let target = format!("{}.{}.{}", call.cage, call.module, call.function);
        let Some(q) = self.queues.get(&call.options.queue) else {
            let known: Vec<&str> = self.queues.keys().map(|k| k.as_str()).collect();
            return Err(format!(
                "calling {target}: cage {} has no queue {:?} (its queues: {}; add [queues.{}] to its cage.toml)",
                self.cage,
                call.options.queue,
                if known.is_empty() { "none".to_string() } else { known.join(", ") },
                call.options.queue
            ));
        };
        if let Some(why) = self.refusing() {
            return Err(format!("calling {target}: queue {} of cage {} accepts no new calls: {why}", q.name, self.cage));
        }
        let now = store::now_ms();
        let o = &call.options;
        let (due, expires) = due_and_expiry(o, now, q.expires_in.as_millis() as i64);
        let args = encode(&Value::Array(call.args), MAX_VALUE).map_err(|e| format!("calling {target}: the arguments: {e}"))?;
        let id = o.id.clone().unwrap_or_else(new_call_id);
        Ok(store::NewCall {
            id,
            queue: q.name.clone(),
            module: call.module,
            function: call.function,
            args,
            from_cage: call.from_cage,
            created_ms: now,
            due_ms: due,
            expires_ms: expires,
            keep_until_ms: now + q.dedup_window.as_millis() as i64,
        })
    }

    /// Stores calls to other cages in this cage's outbox, with `writes` (held state writes of
    /// a transaction) and `direct` (calls to this cage) in the same commit.
    async fn store_outgoing(&self, writes: Vec<Write>, direct: Vec<store::NewCall>, outgoing: Vec<store::OutboxCall>) -> Result<(), String> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if !outgoing.is_empty() {
            self.outbox_hint.store(true, Ordering::SeqCst);
        }
        self.send(writer::Op::Outbox { writes, direct, outgoing, reply: tx })?;
        rx.await.unwrap_or_else(|_| Err(format!("the queue writer of cage {} stopped", self.cage)))
    }

    pub(crate) fn send(&self, op: writer::Op) -> Result<(), String> {
        let w = self.writer.lock().map_err(|_| "queue writer lock poisoned".to_string())?;
        w.send(op).map_err(|_| format!("the queue writer of cage {} stopped", self.cage))
    }

    /// A call not accepted by its target yet: pending (or dead) in this cage's outbox.
    fn outbox_status(&self, id: &str) -> Result<Option<CallStatus>, String> {
        let conn = self.reader.lock().map_err(|_| "queue: reader lock poisoned".to_string())?;
        Ok(store::outbox_find(&conn, &self.path, id)?.map(|(status, attempts, error)| CallStatus {
            status: if status == "dead" { "dead".into() } else { "pending".into() },
            cage: self.cage.clone(),
            attempts,
            value: None,
            error,
        }))
    }

    fn status(&self, id: &str) -> Result<Option<CallStatus>, String> {
        let rec = {
            let conn = self.reader.lock().map_err(|_| "queue: reader lock poisoned".to_string())?;
            store::find(&conn, &self.path, id)?
        };
        let Some(rec) = rec else { return Ok(None) };
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
        Ok(Some(CallStatus { status, cage: self.cage.clone(), attempts: rec.attempts, value, error: rec.error }))
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

/// Figures of every queue of every cage in this process, for the monitoring page:
/// (cage, figures).
pub fn metrics() -> Vec<(String, Vec<QueueFigures>)> {
    let stores: Vec<Arc<Store>> = STORES.read().map(|s| s.values().cloned().collect()).unwrap_or_default();
    stores
        .into_iter()
        .map(|s| {
            let f = s.figures().unwrap_or_else(|e| {
                tracing::warn!(cage = %s.cage, "{e}");
                Vec::new()
            });
            (s.cage.clone(), f)
        })
        .collect()
}

/// When a call may first run (`delay` or `at`, else now) and when it expires (`expires_at`, else
/// `expires_in` or `default_ms` after it is due), in Unix milliseconds.
fn due_and_expiry(o: &rustomnic_lua::durable::CallOptions, now: i64, default_ms: i64) -> (i64, i64) {
    let due = match (o.delay, o.at) {
        (Some(d), _) => now + (d * 1000.0) as i64,
        (_, Some(at)) => (at * 1000.0) as i64,
        _ => now,
    };
    let expires = match o.expires_at {
        Some(at) => (at * 1000.0) as i64,
        None => due.max(now) + o.expires_in.map(|s| (s * 1000.0) as i64).unwrap_or(default_ms),
    };
    (due, expires)
}

/// An outbox row for a call to another cage (the target's queue is checked there).
fn outgoing_call(call: DurableCall) -> Result<store::OutboxCall, String> {
    let target = format!("{}.{}.{}", call.cage, call.module, call.function);
    let now = store::now_ms();
    let o = &call.options;
    // Without a sender-side default, a call the target never accepts is given up after a day.
    let (due, expires) = due_and_expiry(o, now, 86_400_000);
    Ok(store::OutboxCall {
        id: o.id.clone().unwrap_or_else(new_call_id),
        cage: call.cage,
        queue: o.queue.clone(),
        module: call.module,
        function: call.function,
        args: encode(&Value::Array(call.args), MAX_VALUE).map_err(|e| format!("calling {target}: the arguments: {e}"))?,
        created_ms: now,
        due_ms: due,
        expires_ms: expires,
    })
}

struct Service;

impl Calls for Service {
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
            // Checked before anything commits, so a refused call rolls the transaction back.
            let checked: Result<(), String> = (|| {
                if let Some(why) = sender.refusing() {
                    return Err(format!("cage {} accepts no new durable calls: {why}", sender.cage));
                }
                for call in calls {
                    if call.cage == sender.cage {
                        let row = sender.new_call(call)?;
                        ids.push(row.id.clone());
                        direct.push(row);
                    } else {
                        if let Some(target) = store_of(&call.cage) {
                            if !target.queues.contains_key(&call.options.queue) {
                                let known: Vec<&str> = target.queues.keys().map(|k| k.as_str()).collect();
                                return Err(format!(
                                    "calling {}.{}.{}: cage {} has no queue {:?} (its queues: {})",
                                    call.cage,
                                    call.module,
                                    call.function,
                                    call.cage,
                                    call.options.queue,
                                    if known.is_empty() { "none".to_string() } else { known.join(", ") }
                                ));
                            }
                        }
                        let row = outgoing_call(call)?;
                        ids.push(row.id.clone());
                        outgoing.push(row);
                    }
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
            let forwarding = !outgoing.is_empty();
            sender.store_outgoing(writes, direct, outgoing).await.map_err(CommitFailure::Calls)?;
            if forwarding {
                sender.wake();
            }
            Ok(ids)
        })
    }

    fn enqueue(&self, call: DurableCall) -> LocalBoxFuture<'static, Result<String, String>> {
        if store_of(&call.cage).is_none() {
            // A cage elsewhere: through this cage's outbox, forwarded to the target's accept.
            if let Some(sender) = store_of(&call.from_cage).filter(|_| rustomnic_lua::worker::has_remote()) {
                return Box::pin(async move {
                    let row = outgoing_call(call)?;
                    let id = row.id.clone();
                    sender.store_outgoing(Vec::new(), Vec::new(), vec![row]).await?;
                    sender.wake();
                    Ok(id)
                });
            }
        }
        let Some(store) = store_of(&call.cage) else {
            let here: Vec<String> = STORES.read().map(|s| s.keys().cloned().collect()).unwrap_or_default();
            let msg = format!(
                "calling {}.{}.{}: no cage named {} runs in this process (cages here: {}) and no cluster is configured",
                call.cage,
                call.module,
                call.function,
                call.cage,
                if here.is_empty() { "none".to_string() } else { here.join(", ") }
            );
            return Box::pin(async move { Err(msg) });
        };
        Box::pin(store.enqueue(call))
    }

    fn result(&self, cage: Option<&str>, id: &str) -> Result<Option<CallStatus>, String> {
        let stores: Vec<Arc<Store>> = match cage {
            Some(c) => store_of(c).into_iter().collect(),
            None => STORES.read().map(|s| s.values().cloned().collect()).unwrap_or_default(),
        };
        let all: Vec<Arc<Store>> = STORES.read().map(|s| s.values().cloned().collect()).unwrap_or_default();
        for s in &stores {
            if let Some(st) = s.status(id)? {
                return Ok(Some(st));
            }
        }
        // Then the outboxes: an accepted call is in its target's queue before it leaves them.
        for s in &all {
            if let Some(st) = s.outbox_status(id)? {
                return Ok(Some(st));
            }
        }
        Ok(None)
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
            let running = self.store.inflight.lock().map(|f| f.len()).unwrap_or(0);
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

/// How often the WAL is copied into the file (PASSIVE: never waits for readers or writers).
const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);

fn checkpoints(store: Arc<Store>, conn: rusqlite::Connection) {
    while !store.stop.load(Ordering::SeqCst) {
        std::thread::sleep(CHECKPOINT_EVERY);
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::warn!(cage = %store.cage, "queue: checkpoint of {} failed: {e}", store.path.display());
        }
    }
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
        rustomnic_resource_state::store::open(path, Duration::from_secs(10)).map_err(|e| format!("cage {cage}: queue {what}: {}", e.message))
    };
    let writer_conn = open("writer")?;
    setup(&writer_conn).map_err(|e| format!("cage {cage}: queue writer: {e}"))?;
    // Checkpoints (copying the WAL into the file, with an fsync of the file) run on a thread of
    // their own instead of inside the writer's commits, where they stalled every waiting call.
    writer_conn.pragma_update(None, "wal_autocheckpoint", 0).map_err(|e| format!("cage {cage}: queue writer: {e}"))?;
    let checkpoint_conn = open("checkpointer")?;
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
        // True at start: calls left in the outbox by the last run are forwarded.
        outbox_hint: AtomicBool::new(true),
        forwarding: Mutex::new(Default::default()),
        reader: Mutex::new(reader),
    });
    let thread = |name: String, what: &str, run: Box<dyn FnOnce() + Send>| {
        std::thread::Builder::new().name(name).spawn(run).map_err(|e| format!("cage {cage}: cannot start the queue {what}: {e}"))
    };
    let (w, d, c) = (store.clone(), store.clone(), store.clone());
    let threads = vec![
        thread(format!("pmnc-queue-writer-{cage}"), "writer", Box::new(move || writer::run(w, writer_conn, rx)))?,
        thread(format!("pmnc-queue-{cage}"), "dispatcher", Box::new(move || dispatch::run(d, dispatch_conn, spawn)))?,
        thread(format!("pmnc-queue-checkpoint-{cage}"), "checkpointer", Box::new(move || checkpoints(c, checkpoint_conn)))?,
    ];
    if let Ok(mut s) = STORES.write() {
        s.insert(cage.to_string(), store.clone());
    }
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

    /// A full disk (here: the file at its page limit) fails the enqueue, then refuses new calls,
    /// and keeps every call stored before.
    #[test]
    fn a_full_file_refuses_new_calls_and_keeps_old_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.sqlite");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let spawn: Spawner = Arc::new(|_job| {});
        let running = start_with("fulltest", &path, vec![QueueConfig::new("q")], Duration::from_secs(5), spawn, |c| {
            let pages: i64 = c.query_row("PRAGMA page_count", [], |r| r.get(0))?;
            c.query_row(&format!("PRAGMA max_page_count = {}", pages + 30), [], |_| Ok(()))
        })
        .unwrap();
        let store = running.store().clone();
        let mut stored = 0;
        let error = rt.block_on(async {
            for i in 0..1000 {
                match store.clone().enqueue(call(&format!("c{i}"))).await {
                    Ok(_) => stored += 1,
                    Err(e) => return e,
                }
            }
            String::new()
        });
        assert!(stored > 0 && error.contains("is full"), "after {stored} calls: {error}");
        let refused = rt.block_on(store.clone().enqueue(call("late"))).unwrap_err();
        assert!(refused.contains("queue q of cage fulltest accepts no new calls"), "{refused}");
        let figures = store.figures().unwrap();
        assert_eq!((figures[0].queue.as_str(), figures[0].depth), ("q", stored as u64));
        assert_eq!(metrics().iter().find(|(c, _)| c == "fulltest").map(|(_, f)| f[0].depth), Some(stored as u64));
        drop(running);
        let c = rusqlite::Connection::open(&path).unwrap();
        let kept: i64 = c.query_row("SELECT count(*) FROM queue_calls", [], |r| r.get(0)).unwrap();
        assert_eq!(kept, stored as i64);
    }
}
