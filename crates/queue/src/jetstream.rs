//! The clustered store of durable calls (`[queues.NAME] store = "cluster"`, docs/queues.md
//! "Clustered store", docs/decisions/141): a queue's calls live in a JetStream stream of the
//! flock shared by every copy of the cage, and every copy consumes them through one durable pull
//! consumer. An attempt runs exactly as on the embedded store (on a worker thread, its state
//! writes held, then committed in this copy's state file); then its end goes to the cage's
//! key-value bucket of results and the message is acked (done, dead) or nak'd with the queue's
//! backoff. In-progress acks keep a running call from being handed to another copy; a copy that
//! dies stops sending them, and its calls go to another copy after `ack_wait`.
//!
//! A call's record in the bucket is the one place its status lives, changed only by
//! compare-and-set, so that a cancel (from any process, or `pmnc queue cancel`) and an attempt's
//! end cannot both win (docs/decisions/151).
//!
//! All NATS work runs on a runtime of its own (one thread per cage with clustered queues); the
//! worker threads only run the calls.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, kv, stream, AckKind};
use bytes::Bytes;
use futures_util::StreamExt;
use rustomnic_core::Value;
use rustomnic_lua::durable::{CallStatus, CancelAnswer};
use rustomnic_resource_state::{decode, encode, MAX_VALUE};
use tokio::sync::{OnceCell, Semaphore};

use crate::config::{QueueConfig, StoreKind};
use crate::store::{self, Due, NewCall, Outcome};
use crate::writer::Op;
use crate::{publish_end, workflow, Spawner, Store};

/// The durable consumer every copy of the cage shares, on each queue's stream.
pub const CONSUMER: &str = "pmnc";
/// Calls a queue's consumer hands out and has not seen acked, flock-wide: running ones and ones
/// waiting for a retry or for their due time (nak'd with a delay).
pub const MAX_HELD: i64 = 20_000;
/// A done call's values are kept in the bucket up to this size (a NATS message's limit is
/// 1 MiB by default); larger ones are noted in its error instead.
const RESULT_MAX: usize = 512 << 10;
/// How long `pmnc.calls.result` waits for the bucket.
const READ_TIMEOUT: Duration = Duration::from_secs(2);
/// How long `pmnc.calls.cancel` waits for the bucket (a few reads and writes).
const CANCEL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a pull request waits for calls before the next one.
const PULL_EXPIRES: Duration = Duration::from_secs(1);
/// How long after PULL_EXPIRES a pull that heard nothing, not even the server's timeout, is
/// given up: it reached no consumer leader (the consumer was being made, or its leader's server
/// died) and would otherwise hold the copy until the client's own timeout, 5 s later.
const PULL_GRACE: Duration = Duration::from_millis(500);
/// How long dead letters are kept in their stream.
const DEAD_KEPT: Duration = Duration::from_secs(30 * 86_400);

/// The stream holding the calls of `queue` of `cage`.
pub fn stream_name(flock: &str, cage: &str, queue: &str) -> String {
    format!("PMNC_{flock}_Q_{cage}_{queue}")
}

/// The stream holding its dead letters.
pub fn dead_stream_name(flock: &str, cage: &str, queue: &str) -> String {
    format!("{}_DEAD", stream_name(flock, cage, queue))
}

/// The subject its calls are published on.
pub fn subject(flock: &str, cage: &str, queue: &str) -> String {
    format!("pmnc.{flock}.queue.{cage}.{queue}")
}

/// The subject its dead letters are published on.
pub fn dead_subject(flock: &str, cage: &str, queue: &str) -> String {
    format!("{}.dead", subject(flock, cage, queue))
}

/// The key-value bucket of the results of `cage`'s clustered queues.
pub fn bucket(flock: &str, cage: &str) -> String {
    format!("pmnc_{flock}_{cage}_calls")
}

/// The key of call `id` in the bucket: the id itself when it is a valid key, else its bytes in
/// hex behind `h.` (ids are free text; keys are not).
pub fn key_of(id: &str) -> String {
    let plain = !id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'=');
    if plain {
        id.to_string()
    } else {
        let mut k = String::with_capacity(2 + 2 * id.len());
        k.push_str("h.");
        for b in id.bytes() {
            k.push_str(&format!("{b:02x}"));
        }
        k
    }
}

/// How long one JetStream request (a read or write of a record, a publish's ack, a stream's
/// info) may wait for its answer. The cluster's connections have no request timeout, so without
/// this a request answered by a server that was killed meanwhile waited forever: in the bed a
/// call's delivery hung in its first read and kept one of its copy's `concurrency` slots.
const API_TIMEOUT: Duration = Duration::from_secs(5);

/// A JetStream context on `client` whose requests give up after [`API_TIMEOUT`].
pub(crate) fn context(client: &async_nats::Client) -> jetstream::Context {
    let mut js = jetstream::new(client.clone());
    js.set_timeout(API_TIMEOUT);
    js
}

/// What is made once NATS answers: the JetStream context, the bucket and the streams.
struct Ready {
    js: jetstream::Context,
    kv: kv::Store,
}

/// The clustered queues of one cage in this process.
pub(crate) struct Cluster {
    cage: String,
    flock: String,
    config: rustomnic_cluster::ClusterConfig,
    instance: String,
    /// The clustered queues, by name.
    pub(crate) queues: HashMap<String, QueueConfig>,
    handle: tokio::runtime::Handle,
    ready: OnceCell<Ready>,
    /// Calls with an attempt running in this process (their status reads `running` here).
    pub(crate) running: Mutex<HashSet<String>>,
    figures: Mutex<HashMap<String, Figures>>,
    stop: AtomicBool,
    stop_tx: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// A call as it travels in its stream.
#[derive(Debug, PartialEq)]
pub(crate) struct Message {
    pub(crate) id: String,
    pub(crate) module: String,
    pub(crate) function: String,
    /// The arguments as one encoded array (the state codec), as the embedded store keeps them.
    pub(crate) args: Vec<u8>,
    pub(crate) from_cage: String,
    pub(crate) created_ms: i64,
    pub(crate) due_ms: i64,
    pub(crate) expires_ms: i64,
    pub(crate) max_attempts: Option<i64>,
    /// The W3C traceparent of the request that made the call.
    pub(crate) trace: Option<String>,
    /// The workflow of a step (decision 152): optional fields, ignored by a copy of an earlier
    /// version, where the step runs and nothing after it is stored.
    pub(crate) workflow: Option<String>,
    /// The step's continuation, encoded as the state file keeps it (crate::workflow::Cont).
    pub(crate) cont: Option<Vec<u8>>,
}

fn field<'a>(m: &'a [(Value, Value)], name: &str) -> Option<&'a Value> {
    m.iter().find(|(k, _)| k.as_str() == Some(name)).map(|(_, v)| v)
}

impl Message {
    fn of(call: &NewCall) -> Message {
        Message {
            id: call.id.clone(),
            module: call.module.clone(),
            function: call.function.clone(),
            args: call.args.clone(),
            from_cage: call.from_cage.clone(),
            created_ms: call.created_ms,
            due_ms: call.due_ms,
            expires_ms: call.expires_ms,
            max_attempts: call.max_attempts,
            trace: call.trace.clone(),
            workflow: call.workflow.clone(),
            cont: call.cont.clone(),
        }
    }

    pub(crate) fn encode(&self) -> Result<Vec<u8>, String> {
        let mut m = vec![
            (Value::str("id"), Value::str(self.id.as_str())),
            (Value::str("module"), Value::str(self.module.as_str())),
            (Value::str("function"), Value::str(self.function.as_str())),
            (Value::str("args"), Value::Str(self.args.clone())),
            (Value::str("from"), Value::str(self.from_cage.as_str())),
            (Value::str("created"), Value::Int(self.created_ms)),
            (Value::str("due"), Value::Int(self.due_ms)),
            (Value::str("expires"), Value::Int(self.expires_ms)),
        ];
        if let Some(n) = self.max_attempts {
            m.push((Value::str("max_attempts"), Value::Int(n)));
        }
        if let Some(t) = &self.trace {
            m.push((Value::str("trace"), Value::str(t.as_str())));
        }
        if let (Some(w), Some(c)) = (&self.workflow, &self.cont) {
            m.push((Value::str("workflow"), Value::str(w.as_str())));
            m.push((Value::str("cont"), Value::Str(c.clone())));
        }
        // A continuation carries the rest of its chain: room for it beside the arguments.
        encode(&Value::Map(m), 2 * MAX_VALUE + 4096)
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<Message, String> {
        let Value::Map(m) = decode(bytes)? else { return Err("not a map".into()) };
        let text = |name: &str| field(&m, name).and_then(|v| v.as_str()).map(str::to_string).ok_or_else(|| format!("no {name}"));
        let int = |name: &str| match field(&m, name) {
            Some(Value::Int(n)) => Ok(*n),
            _ => Err(format!("no {name}")),
        };
        let step = match (text("workflow"), field(&m, "cont")) {
            (Ok(w), Some(Value::Str(c))) => Some((w, c.clone())),
            _ => None,
        };
        Ok(Message {
            id: text("id")?,
            module: text("module")?,
            function: text("function")?,
            args: match field(&m, "args") {
                Some(Value::Str(b)) => b.clone(),
                _ => return Err("no args".into()),
            },
            from_cage: text("from")?,
            created_ms: int("created")?,
            due_ms: int("due")?,
            expires_ms: int("expires")?,
            max_attempts: int("max_attempts").ok(),
            trace: crate::forward::checked_trace(text("trace").ok()),
            // Both or neither: a step without its continuation runs alone.
            workflow: step.as_ref().map(|(w, _)| w.clone()),
            cont: step.map(|(_, c)| c),
        })
    }
}

/// What the `queue_message` fuzz target reads: the stream's messages and the bucket's records,
/// which anything that can publish on the flock's subjects could have written.
pub mod fuzzing {
    use super::*;

    /// Reads `bytes` as a stream message; when it reads, whether writing it back and reading
    /// that gives the same message.
    pub fn message_roundtrip(bytes: &[u8]) -> Option<bool> {
        let m = Message::decode(bytes).ok()?;
        let again = m.encode().ok().and_then(|b| Message::decode(&b).ok());
        Some(again.as_ref() == Some(&m))
    }

    /// Reads `bytes` as a call's record; when it reads, whether writing it back (with no
    /// result time to live) and reading that gives the same status.
    pub fn record_roundtrip(bytes: &[u8]) -> Option<bool> {
        let (id, _) = CallStatus::from_value(&decode(bytes).ok()?)?;
        let status = read_record(bytes)?;
        let again = read_record(&record(&id, &status, None));
        Some(again.as_ref() == Some(&status))
    }

    /// A message and a record as this build writes them (the target's seeds).
    pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
        let call = NewCall {
            id: "c1".into(),
            queue: "jobs".into(),
            module: "work".into(),
            function: "later".into(),
            args: encode(&Value::Array(vec![Value::Int(7), Value::str("x")]), 1024).unwrap_or_default(),
            from_cage: "web".into(),
            created_ms: 1,
            due_ms: 2,
            expires_ms: 3,
            keep_until_ms: 4,
            max_attempts: Some(5),
            trace: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
            workflow: None,
            cont: None,
        };
        let done = CallStatus { status: "done".into(), cage: "worker".into(), attempts: Some(1), value: Some(vec![Value::Int(14)]), error: None };
        let dead = CallStatus { status: "dead".into(), cage: "worker".into(), attempts: Some(3), value: None, error: Some("boom".into()) };
        let step = Message { workflow: Some("w".into()), cont: Some(vec![1, 2, 3]), ..Message::of(&call) };
        vec![
            ("message", Message::of(&call).encode().unwrap_or_default()),
            ("message-step", step.encode().unwrap_or_default()),
            ("record-done", record("c1", &done, Some(i64::MAX)).to_vec()),
            ("record-dead", record("c2", &dead, None).to_vec()),
        ]
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn the_seeds_read_back() {
            for (name, bytes) in seeds() {
                let ok = if name.starts_with("message") { message_roundtrip(&bytes) } else { record_roundtrip(&bytes) };
                assert_eq!(ok, Some(true), "{name}");
            }
        }

        /// `FUZZ_SEEDS=fuzz/corpus/queue_message cargo test -p rustomnic-queue write_fuzz_seeds -- --ignored`
        #[test]
        #[ignore]
        fn write_fuzz_seeds() {
            let dir = std::env::var("FUZZ_SEEDS").unwrap();
            std::fs::create_dir_all(&dir).unwrap();
            for (name, bytes) in seeds() {
                std::fs::write(std::path::Path::new(&dir).join(name), bytes).unwrap();
            }
        }
    }
}

/// What a call's record carries beside its status (decision 151).
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Extras {
    /// Until when a done call's values are shown (its queue's result_ttl).
    pub until: Option<i64>,
    /// The queue that holds the call (records written before decision 151 lack it).
    pub queue: Option<String>,
    /// The cage that sent it, which gets its completion event too.
    pub from: Option<String>,
    /// The completion event of its cancel was published (by the process that cancelled it, or
    /// by the copy that met the cancel): published once.
    pub told: bool,
    /// Set (Unix ms) while a copy commits the state writes of an attempt that succeeded: a
    /// cancel then comes too late, so that a cancelled call's writes never land.
    pub ending: Option<i64>,
}

/// A call's record as read from the bucket, with the revision every change is made against.
#[derive(Debug, Clone)]
pub(crate) struct Rec {
    pub status: CallStatus,
    pub extras: Extras,
    pub revision: u64,
}

/// A call's record in the bucket: its status as `pmnc.calls.result` shows it, and until when a
/// done call's values are shown (its queue's result_ttl).
fn record(id: &str, status: &CallStatus, until_ms: Option<i64>) -> Bytes {
    record_with(id, status, &Extras { until: until_ms, ..Default::default() })
}

fn record_with(id: &str, status: &CallStatus, extras: &Extras) -> Bytes {
    let with = |v: Value| {
        let mut v = v;
        if let Value::Map(m) = &mut v {
            if let Some(until) = extras.until {
                m.push((Value::str("until"), Value::Int(until)));
            }
            if let Some(q) = &extras.queue {
                m.push((Value::str("queue"), Value::str(q.as_str())));
            }
            if let Some(f) = &extras.from {
                m.push((Value::str("from"), Value::str(f.as_str())));
            }
            if extras.told {
                m.push((Value::str("told"), Value::Bool(true)));
            }
            if let Some(at) = extras.ending {
                m.push((Value::str("ending"), Value::Int(at)));
            }
        }
        v
    };
    match encode(&with(status.to_value(id, true)), RESULT_MAX) {
        Ok(b) => Bytes::from(b),
        Err(e) => {
            // Too large with its values: kept without them, saying why.
            let mut s = status.clone();
            s.value = None;
            s.error = Some(format!("its result is not kept: {e}"));
            Bytes::from(encode(&with(s.to_value(id, false)), RESULT_MAX).unwrap_or_default())
        }
    }
}

/// A record's status and extras, as written (a done call's values kept whatever its until).
fn read_full(bytes: &[u8]) -> Option<(CallStatus, Extras)> {
    let v = decode(bytes).ok()?;
    let Value::Map(m) = &v else { return None };
    let int = |name: &str| match field(m, name) {
        Some(Value::Int(n)) => Some(*n),
        _ => None,
    };
    let text = |name: &str| field(m, name).and_then(|v| v.as_str()).map(str::to_string);
    let extras = Extras {
        until: int("until"),
        queue: text("queue"),
        from: text("from"),
        told: matches!(field(m, "told"), Some(Value::Bool(true))),
        ending: int("ending"),
    };
    let (_, status) = CallStatus::from_value(&v)?;
    Some((status, extras))
}

fn read_record(bytes: &[u8]) -> Option<CallStatus> {
    let (mut status, extras) = read_full(bytes)?;
    if extras.until.is_some_and(|u| u < store::now_ms()) {
        status.value = None;
    }
    Some(status)
}

/// The record of call `id`, with its revision; None when there is none (or it was deleted).
pub(crate) async fn load(kv: &kv::Store, id: &str) -> Result<Option<Rec>, String> {
    let entry = kv.entry(key_of(id)).await.map_err(|e| format!("call {id}: its record cannot be read: {e}"))?;
    let Some(entry) = entry.filter(|e| e.operation == kv::Operation::Put) else { return Ok(None) };
    let (mut status, extras) = read_full(&entry.value).ok_or_else(|| format!("call {id}: its record cannot be read (not a record)"))?;
    if extras.until.is_some_and(|u| u < store::now_ms()) {
        status.value = None;
    }
    Ok(Some(Rec { status, extras, revision: entry.revision }))
}

/// Whether a compare-and-set write landed.
pub(crate) enum Cas {
    Written(u64),
    /// The record changed since `revision` was read (or, creating, one is there already).
    Conflict,
}

/// Writes the record of `id` if it is still at `revision` (0: only if there is none).
pub(crate) async fn cas(kv: &kv::Store, id: &str, status: &CallStatus, extras: &Extras, revision: u64) -> Result<Cas, String> {
    let value = record_with(id, status, extras);
    if revision == 0 {
        return match kv.create(key_of(id), value).await {
            Ok(r) => Ok(Cas::Written(r)),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(Cas::Conflict),
            Err(e) => Err(format!("call {id}: its record cannot be written: {e}")),
        };
    }
    match kv.update(key_of(id), value, revision).await {
        Ok(r) => Ok(Cas::Written(r)),
        Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
            tracing::debug!(call = %id, "compare-and-set of its record at revision {revision} refused: {e}");
            Ok(Cas::Conflict)
        }
        Err(e) => Err(format!("call {id}: its record cannot be written: {e}")),
    }
}

/// What a cancel did to a call's record.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Cancelled {
    /// Cancelled now; it was `was` (pending or failed), sent by `from`.
    Now {
        was: String,
        from: Option<String>,
    },
    Already,
    /// Done or dead: not changed.
    Ended(String),
    /// A copy is committing the state writes of an attempt that succeeded.
    Ending,
    /// No record of the id.
    Unknown,
}

/// The first nats-server release whose replicated key-value buckets keep their compare-and-set
/// writes right across leader changes. On 2.9.10 the bed (bench/cluster-bed.sh) saw a new
/// bucket leader answer "wrong last sequence: 3725" to writes at revision 3917 read from
/// another replica, the same offset for every record: the replicas numbered the bucket's
/// writes differently after failed compare-and-sets (fixed through the 2.10 series). 2.12.8
/// did not do it in the bed.
const SAFE_SERVER: (u64, u64, u64) = (2, 10, 12);

/// Whether the server version `version` ("2.9.10", "2.12.8-RC.1") is before `safe`; a version
/// that does not read as one is not (nothing to warn about that can be said for sure).
fn server_before(version: &str, safe: (u64, u64, u64)) -> bool {
    let core = version.trim_start_matches('v').split(['-', '+']).next().unwrap_or("");
    let mut parts = core.split('.').map(|p| p.parse::<u64>());
    match (parts.next(), parts.next(), parts.next()) {
        (Some(Ok(a)), Some(Ok(b)), Some(Ok(c))) => (a, b, c) < safe,
        _ => false,
    }
}

/// How many times a write against a record that keeps changing is tried again.
const CAS_TRIES: usize = 20;
/// How many times a read that is not newer than the revision last written is read again.
const STALE_READS: usize = 40;
/// How long a copy keeps trying to write a call's end while the bucket's servers fail (a
/// server died and its streams elect new leaders, which takes seconds): meanwhile in-progress
/// acks keep the call with this copy, where giving up would hand it to another copy to run
/// again after ack_wait.
const END_RETRY: Duration = Duration::from_secs(60);

/// Runs a bucket operation again while it fails, for up to END_RETRY, with in-progress acks
/// for `m` between the tries (at least one a second).
async fn persist<T, F, Fut>(m: &jetstream::Message, mut op: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let give_up = tokio::time::Instant::now() + END_RETRY;
    let mut wait = Duration::from_millis(50);
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if tokio::time::Instant::now() + wait >= give_up => return Err(e),
            Err(_) => {
                in_progress(m).await;
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// Cancels call `id` of `cage` in the bucket: its record becomes `cancelled` by a
/// compare-and-set on the revision read, read again on a conflict (decision 151). `told`: the
/// caller publishes the completion event itself.
pub(crate) async fn cancel_record(kv: &kv::Store, cage: &str, id: &str, told: bool) -> Result<Cancelled, String> {
    for _ in 0..CAS_TRIES {
        let Some(rec) = load(kv, id).await? else { return Ok(Cancelled::Unknown) };
        match rec.status.status.as_str() {
            "cancelled" => return Ok(Cancelled::Already),
            "done" | "dead" => return Ok(Cancelled::Ended(rec.status.status)),
            _ if rec.extras.ending.is_some() => return Ok(Cancelled::Ending),
            _ => {}
        }
        let status =
            CallStatus { status: "cancelled".into(), cage: cage.to_string(), attempts: rec.status.attempts, value: None, error: Some("cancelled".into()) };
        let extras = Extras { queue: rec.extras.queue.clone(), from: rec.extras.from.clone(), told, ..Default::default() };
        if let Cas::Written(_) = cas(kv, id, &status, &extras, rec.revision).await? {
            return Ok(Cancelled::Now { was: rec.status.status, from: rec.extras.from });
        }
    }
    Err(format!("call {id}: its record kept changing while it was being cancelled; try again"))
}

/// Cancels the records of a workflow's steps `ids` of cage `cage` in its bucket `kv`, each by
/// [`cancel_record`]; a step with no record yet (not stored yet: the step before it still
/// runs) gets a `cancelled` record now, written only if none is there, so that the copy meeting
/// it later acks it without running (decision 152); such a step answers `Unknown`. `told`: the
/// caller publishes the completion events itself (`pmnc queue cancel`, which has no events,
/// leaves them to the copy that meets each step).
pub(crate) async fn cancel_steps_in(kv: &kv::Store, cage: &str, ids: Vec<String>, told: bool) -> Result<Vec<(String, Cancelled)>, String> {
    let mut out = Vec::new();
    for id in ids {
        let mut done = cancel_record(kv, cage, &id, told).await?;
        if done == Cancelled::Unknown {
            let status = CallStatus { status: "cancelled".into(), cage: cage.to_string(), attempts: Some(0), value: None, error: Some("cancelled".into()) };
            if let Cas::Conflict = cas(kv, &id, &status, &Extras::default(), 0).await? {
                done = cancel_record(kv, cage, &id, told).await?;
            }
        }
        out.push((id, done));
    }
    Ok(out)
}

/// A one-line header value (JetStream headers are single lines).
fn header_text(s: &str) -> String {
    s.chars().map(|c| if c.is_control() { ' ' } else { c }).take(1000).collect()
}

impl Cluster {
    /// Starts the clustered queues of `store` (those of `queues` with store = "cluster") on the
    /// cluster this process joined; None when it has none, or joined no cluster (`pmnc test`:
    /// they then run on the embedded store, said once in the log).
    pub(crate) fn start(store: &Arc<Store>, spawn: Spawner) -> Result<Option<Arc<Cluster>>, String> {
        let queues: HashMap<String, QueueConfig> =
            store.queues.values().filter(|q| matches!(q.store, StoreKind::Cluster { .. })).map(|q| (q.name.clone(), q.clone())).collect();
        if queues.is_empty() {
            return Ok(None);
        }
        let Some(joined) = rustomnic_cluster::joined() else {
            tracing::info!(cage = %store.cage, "queues {} have store = \"cluster\" but this process joined no cluster: they keep their calls in the cage's file here", queues.keys().cloned().collect::<Vec<_>>().join(", "));
            return Ok(None);
        };
        let cage = store.cage.clone();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| format!("cage {cage}: clustered queues: {e}"))?;
        let handle = rt.handle().clone();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(format!("pmnc-queue-js-{cage}"))
            .spawn(move || {
                rt.block_on(async {
                    let _ = stop_rx.await;
                });
                rt.shutdown_background();
            })
            .map_err(|e| format!("cage {cage}: cannot start the clustered queues' thread: {e}"))?;
        let cluster = Arc::new(Cluster {
            cage: cage.clone(),
            flock: joined.config.flock.clone(),
            config: joined.config,
            instance: joined.instance,
            queues,
            handle,
            ready: OnceCell::new(),
            running: Mutex::new(HashSet::new()),
            figures: Mutex::new(HashMap::new()),
            stop: AtomicBool::new(false),
            stop_tx: Mutex::new(Some(stop_tx)),
            thread: Mutex::new(Some(thread)),
        });
        for q in cluster.queues.values() {
            let (c, s, q, spawn) = (cluster.clone(), store.clone(), q.clone(), spawn.clone());
            cluster.handle.spawn(consume(c, s, q, spawn));
        }
        cluster.handle.spawn(watch_figures(cluster.clone()));
        Ok(Some(cluster))
    }

    pub(crate) fn has(&self, queue: &str) -> bool {
        self.queues.contains_key(queue)
    }

    /// Stops consuming; the calls running here are redelivered to other copies after ack_wait.
    pub(crate) fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(tx) = self.stop_tx.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = t.join();
        }
    }

    /// Connects and makes the bucket and the streams, once.
    async fn ready(&self) -> Result<&Ready, String> {
        self.ready
            .get_or_try_init(|| async {
                let name = format!("pmnc {} {} queue {}", self.flock, self.instance, self.cage);
                let conn = rustomnic_cluster::connect::connect(&self.config, &name, true).await.map_err(|e| e.to_string())?;
                if !conn.wait_connected(self.config.connect_timeout).await {
                    return Err(format!("cannot reach NATS ({}) within {:?}", conn.servers, self.config.connect_timeout));
                }
                let js = context(&conn.client);
                let replicas = self.queues.values().map(replicas_of).max().unwrap_or(1);
                let info = conn.client.server_info();
                if replicas > 1 && server_before(&info.version, SAFE_SERVER) {
                    let (a, b, c) = SAFE_SERVER;
                    tracing::warn!(
                        cage = %self.cage,
                        "clustered queues: nats-server {} (server {:?}): replicas > 1 need nats-server {a}.{b}.{c} or later. After a server dies, the replicas of older servers can number a bucket's writes differently (a JetStream defect fixed in the 2.10 series), and compare-and-set writes of call records are refused for minutes: calls stall and some run twice (docs/queues.md, \"Which nats-server\")",
                        info.version,
                        info.server_name
                    );
                }
                let keep = self.queues.values().map(|q| q.dedup_window.max(q.result_ttl).max(q.expires_in)).max().unwrap_or(Duration::from_secs(86_400));
                let bucket = bucket(&self.flock, &self.cage);
                let kv = match js.get_key_value(bucket.clone()).await {
                    Ok(kv) => kv,
                    Err(_) => {
                        // The bucket's stream as the key-value layer lays it out, made directly:
                        // the client's own bucket creation first asks for account details that
                        // JetStream servers before 2.10 answer in a form it cannot read.
                        let made = js
                            .create_stream(stream::Config {
                                name: format!("KV_{bucket}"),
                                description: Some(format!("results of the clustered queues of cage {}", self.cage)),
                                subjects: vec![format!("$KV.{bucket}.>")],
                                max_messages_per_subject: 1,
                                max_age: keep,
                                storage: stream::StorageType::File,
                                num_replicas: replicas,
                                allow_rollup: true,
                                deny_delete: true,
                                // Any replica answers reads. A follower catching up (a server
                                // just restarted) can answer with an old record: the bed
                                // (bench/cluster-bed.sh) saw compare-and-set writes fail on its
                                // stale revisions and such calls run again. Reads from the
                                // leader only (false) stalled enqueues and calls for over 30 s
                                // after a server was killed, which is worse.
                                allow_direct: true,
                                discard: stream::DiscardPolicy::New,
                                ..Default::default()
                            })
                            .await;
                        // Copies starting together race to make it; the loser uses the winner's.
                        js.get_key_value(bucket.clone()).await.map_err(|e| match made {
                            Err(m) => format!("cannot make the JetStream bucket {bucket}: {m}"),
                            Ok(_) => format!("cannot open the JetStream bucket {bucket}: {e}"),
                        })?
                    }
                };
                for q in self.queues.values() {
                    self.streams(&js, q).await?;
                }
                Ok(Ready { js, kv })
            })
            .await
    }

    /// Makes the streams of queue `q` (calls and dead letters); existing ones are used as they are.
    async fn streams(&self, js: &jetstream::Context, q: &QueueConfig) -> Result<(), String> {
        let (name, dead) = (stream_name(&self.flock, &self.cage, &q.name), dead_stream_name(&self.flock, &self.cage, &q.name));
        js.get_or_create_stream(stream::Config {
            name: name.clone(),
            subjects: vec![subject(&self.flock, &self.cage, &q.name)],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            num_replicas: replicas_of(q),
            duplicate_window: q.dedup_window,
            description: Some(format!("durable calls of queue {} of cage {}", q.name, self.cage)),
            ..Default::default()
        })
        .await
        .map_err(|e| format!("cannot make the JetStream stream {name}: {e}"))?;
        js.get_or_create_stream(stream::Config {
            name: dead.clone(),
            subjects: vec![dead_subject(&self.flock, &self.cage, &q.name)],
            storage: stream::StorageType::File,
            num_replicas: replicas_of(q),
            max_age: DEAD_KEPT,
            duplicate_window: Duration::from_secs(3600),
            description: Some(format!("dead letters of queue {} of cage {}", q.name, self.cage)),
            ..Default::default()
        })
        .await
        .map_err(|e| format!("cannot make the JetStream stream {dead}: {e}"))?;
        Ok(())
    }

    /// Runs `work` on this cage's NATS runtime and waits for it from any thread's runtime.
    async fn on_runtime<T: Send + 'static>(&self, work: impl std::future::Future<Output = T> + Send + 'static) -> Result<T, String> {
        self.handle.spawn(work).await.map_err(|e| format!("the clustered queue's runtime stopped: {e}"))
    }

    /// Publishes call `call` to its stream and returns once JetStream acknowledged it (stored on
    /// a quorum of its replicas); its id de-duplicates within the queue's dedup_window.
    pub(crate) async fn enqueue(self: Arc<Self>, call: NewCall) -> Result<(), String> {
        let queue = call.queue.clone();
        let me = self.clone();
        self.on_runtime(async move {
            let ready = me.ready().await?;
            let payload = Message::of(&call).encode()?;
            let publish = jetstream::message::PublishMessage::build().payload(Bytes::from(payload)).message_id(call.id.as_str());
            let ack = ready
                .js
                .send_publish(subject(&me.flock, &me.cage, &queue), publish)
                .await
                .map_err(|e| format!("queue {queue} of cage {} (JetStream): {e}", me.cage))?
                .await
                .map_err(|e| format!("queue {queue} of cage {} (JetStream): the call was not acknowledged: {e}", me.cage))?;
            if !ack.duplicate {
                // Only when nothing is there: an attempt that already ended wrote its end first.
                // The consumer makes it too when it meets the call first (decision 151).
                let pending = CallStatus { status: "pending".into(), cage: me.cage.clone(), attempts: Some(0), value: None, error: None };
                let extras = Extras { queue: Some(queue.clone()), from: Some(call.from_cage.clone()), ..Default::default() };
                let _ = cas(&ready.kv, &call.id, &pending, &extras, 0).await;
            }
            Ok(())
        })
        .await?
    }

    /// The record of call `id` in the bucket (waits at most READ_TIMEOUT; called from Lua's
    /// synchronous `pmnc.calls.result`, so the worker thread waits that long at worst).
    pub(crate) fn status(self: &Arc<Self>, id: &str) -> Result<Option<CallStatus>, String> {
        let (tx, rx) = std::sync::mpsc::channel();
        let (me, key) = (self.clone(), key_of(id));
        self.handle.spawn(async move {
            let got = async {
                let ready = me.ready().await?;
                ready.kv.get(key).await.map_err(|e| e.to_string())
            };
            let _ = tx.send(tokio::time::timeout(READ_TIMEOUT, got).await.unwrap_or_else(|_| Err(format!("no answer within {READ_TIMEOUT:?}"))));
        });
        let got = rx.recv_timeout(READ_TIMEOUT + Duration::from_millis(100)).unwrap_or_else(|_| Err(format!("no answer within {READ_TIMEOUT:?}")));
        let bytes = got.map_err(|e| format!("call {id}: the results of cage {} in JetStream cannot be read: {e}", self.cage))?;
        let Some(bytes) = bytes else { return Ok(None) };
        let (mut status, extras) = read_full(&bytes).ok_or_else(|| format!("call {id}: its record in JetStream cannot be read"))?;
        if extras.until.is_some_and(|u| u < store::now_ms()) {
            status.value = None;
        }
        let here = self.running.lock().map(|r| r.contains(id)).unwrap_or(false);
        if (here || extras.ending.is_some()) && (status.status == "pending" || status.status == "failed") {
            status.status = "running".into();
        }
        Ok(Some(status))
    }

    /// `pmnc.calls.cancel(id)` on a clustered queue of this cage: the record becomes
    /// `cancelled` (compare-and-set), and the completion event is published here at once.
    /// None when the bucket has no record of the id.
    pub(crate) async fn cancel(self: Arc<Self>, id: String) -> Result<Option<CancelAnswer>, String> {
        let me = self.clone();
        let read_id = id.clone();
        let done = self
            .on_runtime(async move {
                let work = async {
                    let ready = me.ready().await?;
                    cancel_record(&ready.kv, &me.cage, &read_id, true).await
                };
                tokio::time::timeout(CANCEL_TIMEOUT, work)
                    .await
                    .unwrap_or_else(|_| Err(format!("call {read_id}: JetStream did not answer within {CANCEL_TIMEOUT:?}")))
            })
            .await?
            .map_err(|e| format!("cage {}: {e}", self.cage))?;
        let cage = &self.cage;
        Ok(Some(match done {
            Cancelled::Now { was, from } => {
                let status = CallStatus { status: "cancelled".into(), cage: cage.clone(), attempts: None, value: None, error: Some("cancelled".into()) };
                publish_end([cage, from.as_deref().unwrap_or(cage)], &id, &status);
                let here = self.running.lock().map(|r| r.contains(&id)).unwrap_or(false);
                if here {
                    let message = format!(
                        "call {id} of cage {cage} cancelled while an attempt runs: that attempt runs to its end, its outcome is dropped and it is not retried"
                    );
                    CancelAnswer { cancelled: true, status: Some("running".into()), message }
                } else {
                    let message = format!(
                        "call {id} of cage {cage} cancelled (it was {was}); it will not run again (an attempt running now on another copy runs to its end, and its outcome is dropped)"
                    );
                    CancelAnswer { cancelled: true, status: Some(was), message }
                }
            }
            Cancelled::Already => {
                CancelAnswer { cancelled: false, status: Some("cancelled".into()), message: format!("call {id} of cage {cage} was already cancelled") }
            }
            Cancelled::Ended(st) => {
                CancelAnswer { message: format!("call {id} of cage {cage} is {st}: a call that ended cannot be cancelled"), cancelled: false, status: Some(st) }
            }
            Cancelled::Ending => CancelAnswer {
                message: format!(
                    "call {id} of cage {cage} is ending now (an attempt succeeded and its state writes are being committed): too late to cancel it"
                ),
                cancelled: false,
                status: Some("running".into()),
            },
            Cancelled::Unknown => return Ok(None),
        }))
    }

    /// Cancels the steps `ids` of a workflow, of clustered queues of `cage` (this cage, or
    /// another of the flock whose bucket this connection reaches), by [`cancel_steps_in`]. A
    /// cage with no bucket has no clustered queues: nothing is done there.
    pub(crate) async fn cancel_steps(self: Arc<Self>, cage: String, ids: Vec<String>) -> Result<Vec<(String, Cancelled)>, String> {
        let me = self.clone();
        let work = async move {
            let ready = me.ready().await?;
            let kv = if cage == me.cage {
                ready.kv.clone()
            } else {
                match ready.js.get_key_value(bucket(&me.flock, &cage)).await {
                    Ok(kv) => kv,
                    Err(_) => return Ok(Vec::new()),
                }
            };
            cancel_steps_in(&kv, &cage, ids, true).await
        };
        let cage = self.cage.clone();
        self.on_runtime(async move {
            tokio::time::timeout(CANCEL_TIMEOUT, work).await.unwrap_or_else(|_| Err(format!("JetStream did not answer within {CANCEL_TIMEOUT:?}")))
        })
        .await?
        .map_err(|e: String| format!("cage {cage}: cancelling a workflow's clustered steps: {e}"))
    }

    /// The latest figures of queue `queue` from its stream and consumer (read every
    /// FIGURES_EVERY in the background, so that the monitor never waits for NATS).
    pub(crate) fn figures(&self, queue: &str) -> Option<Figures> {
        self.figures.lock().ok()?.get(queue).cloned()
    }
}

/// How often the figures of the clustered queues are read.
const FIGURES_EVERY: Duration = Duration::from_secs(2);

/// What the stream and the consumer of a clustered queue say.
#[derive(Debug, Clone, Default)]
pub struct Figures {
    /// Calls not delivered yet.
    pub waiting: u64,
    /// Calls delivered and not acked: running somewhere, or waiting for a retry or their time.
    pub held: u64,
    /// Deliveries beyond the first (retries and redeliveries).
    pub redelivered: u64,
    /// Dead letters kept.
    pub dead: u64,
    /// Seconds since the oldest call in the stream (waiting or held) was stored, when there is
    /// one: a work-queue stream keeps a call until its end is acked, so its first message is it.
    pub oldest_age: Option<f64>,
}

/// The figures of one queue, asked of JetStream now.
pub async fn read_figures(js: &jetstream::Context, flock: &str, cage: &str, queue: &str) -> Result<Figures, String> {
    let name = stream_name(flock, cage, queue);
    let mut c: jetstream::consumer::PullConsumer =
        js.get_consumer_from_stream(CONSUMER, &name).await.map_err(|e| format!("consumer {CONSUMER} of {name}: {e}"))?;
    let i = c.info().await.map_err(|e| format!("consumer {CONSUMER} of {name}: {e}"))?.clone();
    // The stream's first message's time (one more request, made every FIGURES_EVERY).
    let oldest_age = match js.get_stream(&name).await {
        Ok(mut s) => s.info().await.ok().filter(|i| i.state.messages > 0).map(|i| {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs_f64();
            (now - i.state.first_timestamp.unix_timestamp_nanos() as f64 / 1e9).max(0.0)
        }),
        Err(_) => None,
    };
    let dead_name = dead_stream_name(flock, cage, queue);
    let dead = match js.get_stream(&dead_name).await {
        Ok(mut s) => s.info().await.map(|i| i.state.messages).unwrap_or(0),
        Err(_) => 0,
    };
    Ok(Figures { waiting: i.num_pending, held: i.num_ack_pending as u64, redelivered: i.num_redelivered as u64, dead, oldest_age })
}

/// Keeps [`Cluster::figures`] fresh.
async fn watch_figures(cluster: Arc<Cluster>) {
    while !cluster.stop.load(Ordering::SeqCst) {
        if let Ok(ready) = cluster.ready().await {
            for q in cluster.queues.keys() {
                if let Ok(Ok(f)) = tokio::time::timeout(READ_TIMEOUT, read_figures(&ready.js, &cluster.flock, &cluster.cage, q)).await {
                    if let Ok(mut all) = cluster.figures.lock() {
                        all.insert(q.clone(), f);
                    }
                }
            }
        }
        tokio::time::sleep(FIGURES_EVERY).await;
    }
}

fn replicas_of(q: &QueueConfig) -> usize {
    match q.store {
        StoreKind::Cluster { replicas } => replicas,
        StoreKind::Embedded => 1,
    }
}

/// Consumes queue `q` until the process stops: pulls as many calls as it may start (its
/// concurrency, one with keep_order) and hands each to [`handle`].
async fn consume(cluster: Arc<Cluster>, store: Arc<Store>, q: QueueConfig, spawn: Spawner) {
    let limit = if q.keep_order { 1 } else { q.concurrency };
    let slots = Arc::new(Semaphore::new(limit));
    // This copy's share of the queue's rate_limit, and its running calls announced in its
    // heartbeats (docs/decisions/153).
    let mut rate = crate::share::FlockRate::new(&store.cage, &q.name, q.rate_limit);
    let consuming = crate::share::Consuming::new(&store.cage, &q.name);
    let mut consumer: Option<jetstream::consumer::PullConsumer> = None;
    let mut elected: Option<async_nats::Subscriber> = None;
    let mut wait = Duration::from_millis(100);
    while !cluster.stop.load(Ordering::SeqCst) {
        if store.paused.load(Ordering::SeqCst) {
            // Shutting down: starts nothing more.
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        let c = match &consumer {
            Some(c) => c.clone(),
            None => match open_consumer(&cluster, &q).await {
                Ok(c) => {
                    wait = Duration::from_millis(100);
                    consumer = Some(c.clone());
                    elected = elections(&cluster, &q).await;
                    c
                }
                Err(e) => {
                    if let Some(note) = store.log.allow(&format!("cluster:{}", q.name)) {
                        tracing::warn!(cage = %store.cage, queue = %q.name, "clustered queue not ready: {e}; trying again{note}");
                    }
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(2));
                    continue;
                }
            },
        };
        let Ok(first) = slots.clone().acquire_owned().await else { return };
        let mut want = 1 + slots.available_permits();
        if q.rate_limit > 0 {
            // Pulls no more than may start now; each start's token is taken when its call
            // arrives (below), so a pull that waits on an empty stream holds no tokens while
            // the bucket refills (that doubled the first burst after an idle spell).
            let (allowed, delay) = rate.available(want);
            if allowed == 0 {
                drop(first);
                tokio::time::sleep(delay).await;
                continue;
            }
            want = allowed;
        }
        let batch = c.batch().max_messages(want).expires(PULL_EXPIRES).messages().await;
        let mut batch = match batch {
            Ok(b) => b,
            Err(e) => {
                drop(first);
                // Made again at the next turn: the stream or the consumer may have been deleted.
                consumer = None;
                if let Some(note) = store.log.allow(&format!("pull:{}", q.name)) {
                    tracing::warn!(cage = %store.cage, queue = %q.name, "clustered queue: cannot pull calls: {e}{note}");
                }
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        let mut first = Some(first);
        let give_up = tokio::time::Instant::now() + PULL_EXPIRES + PULL_GRACE;
        loop {
            let next = tokio::select! {
                m = tokio::time::timeout_at(give_up, batch.next()) => m,
                Some(_) = next_election(&mut elected) => {
                    // A pull sent to a leader that died is never answered; the new leader
                    // holds the dead copy's calls for redelivery now, so pull from it at once
                    // rather than after PULL_GRACE.
                    tracing::debug!(cage = %store.cage, queue = %q.name, "clustered queue: its consumer has a new leader; pulling again");
                    break;
                }
            };
            let Ok(Some(m)) = next else { break };
            let m = match m {
                Ok(m) => m,
                Err(e) => {
                    tracing::debug!(cage = %store.cage, queue = %q.name, "clustered queue: pull ended: {e}");
                    break;
                }
            };
            let slot = match first.take() {
                Some(s) => s,
                None => match slots.clone().acquire_owned().await {
                    Ok(s) => s,
                    Err(_) => return,
                },
            };
            if q.rate_limit > 0 {
                rate.start().await;
            }
            let (c, s, q, spawn) = (cluster.clone(), store.clone(), q.clone(), spawn.clone());
            let running = crate::share::Running::new(&consuming.running);
            tokio::spawn(async move {
                handle(&c, &s, &q, &spawn, m).await;
                drop(running);
                drop(slot);
            });
        }
    }
}

/// JetStream's announcements of a new leader for queue `q`'s consumer, or None when the
/// subscription cannot be made (pulls then fall back on PULL_GRACE).
async fn elections(cluster: &Cluster, q: &QueueConfig) -> Option<async_nats::Subscriber> {
    let ready = cluster.ready().await.ok()?;
    let name = stream_name(&cluster.flock, &cluster.cage, &q.name);
    let subject = format!("$JS.EVENT.ADVISORY.CONSUMER.LEADER_ELECTED.{name}.{CONSUMER}");
    ready.js.client().subscribe(subject).await.ok()
}

/// The next announcement of a new leader; never ready without a subscription.
async fn next_election(elected: &mut Option<async_nats::Subscriber>) -> Option<async_nats::Message> {
    match elected {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

async fn open_consumer(cluster: &Cluster, q: &QueueConfig) -> Result<jetstream::consumer::PullConsumer, String> {
    let ready = cluster.ready().await?;
    let name = stream_name(&cluster.flock, &cluster.cage, &q.name);
    let stream = ready.js.get_stream(&name).await.map_err(|e| format!("stream {name}: {e}"))?;
    let config = pull::Config {
        durable_name: Some(CONSUMER.into()),
        description: Some(format!("the copies of cage {}", cluster.cage)),
        ack_policy: jetstream::consumer::AckPolicy::Explicit,
        ack_wait: q.ack_wait,
        max_deliver: -1,
        // keep_order: one call at a time in the whole flock, in stream order.
        max_ack_pending: if q.keep_order { 1 } else { MAX_HELD },
        num_replicas: replicas_of(q),
        ..Default::default()
    };
    stream.get_or_create_consumer(CONSUMER, config).await.map_err(|e| format!("consumer {CONSUMER} of stream {name}: {e}"))
}

/// Hands back a delivery of a call held by copy `holder`, or (None) by an attempt in this
/// process.
async fn held_by(store: &Store, q: &QueueConfig, m: &jetstream::Message, id: &str, holder: Option<&str>) {
    let again = held_recheck(q);
    let _ = m.ack_with(AckKind::Nak(Some(again))).await;
    if let Some(note) = store.log.allow(&format!("held:{}", q.name)) {
        let (who, left_to) = match holder {
            Some(h) => (format!("copy {h}"), "that copy"),
            None => ("this process".to_string(), "that attempt"),
        };
        tracing::info!(cage = %store.cage, queue = %q.name, call = %id, "call {id} delivered again while {who} still holds it (its acks did not reach JetStream); left to {left_to}, looked at again in {} ms{note}", again.as_millis());
    }
}

/// How long a call held by a live copy elsewhere (or by this process) waits before it is looked
/// at again: short, so that it runs soon after its holder dies, and no longer than ack_wait.
fn held_recheck(q: &QueueConfig) -> Duration {
    q.ack_wait.min(Duration::from_secs(1))
}

/// Tells JetStream that `m` is still being worked on, so it is not handed to another copy.
async fn in_progress(m: &jetstream::Message) {
    #[cfg(debug_assertions)]
    if no_progress_acks() {
        return;
    }
    let _ = m.ack_with(AckKind::Progress).await;
}

/// A test-only way to lose in-progress acks as a consumer leader's election does (debug builds
/// only; not compiled into a release build): `PMNC_TEST_NO_PROGRESS=1`.
#[cfg(debug_assertions)]
fn no_progress_acks() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        let on = std::env::var_os("PMNC_TEST_NO_PROGRESS").is_some_and(|v| v == "1");
        if on {
            tracing::warn!("test hook: clustered queues send no in-progress acks (PMNC_TEST_NO_PROGRESS, debug builds only)");
        }
        on
    })
}

/// Sends in-progress acks for `m` every third of ack_wait until `work` ends.
async fn with_progress<T>(m: &jetstream::Message, ack_wait: Duration, work: impl std::future::Future<Output = T>) -> T {
    let mut work = std::pin::pin!(work);
    let every = ack_wait / 3;
    loop {
        tokio::select! {
            out = &mut work => return out,
            _ = tokio::time::sleep(every) => {
                in_progress(m).await;
            }
        }
    }
}

/// The record of `call`, made `pending` when there is none yet: a call is published before
/// its record is written (the enqueuing process writes it after JetStream's ack, and may have
/// died in between), so the first copy to meet it may be first (decision 151).
async fn opened(kv: &kv::Store, cage: &str, call: &Message, extras: &Extras) -> Result<Rec, String> {
    for _ in 0..CAS_TRIES {
        if let Some(rec) = load(kv, &call.id).await? {
            return Ok(rec);
        }
        let pending = CallStatus { status: "pending".into(), cage: cage.to_string(), attempts: Some(0), value: None, error: None };
        if let Cas::Written(revision) = cas(kv, &call.id, &pending, extras, 0).await? {
            return Ok(Rec { status: pending, extras: extras.clone(), revision });
        }
    }
    Err(format!("call {}: its record kept changing", call.id))
}

/// The record of `id` after a compare-and-set against `revision` met another one. A read
/// answered by a replica that lags behind the stream's leader (direct gets) can be older than
/// the revision written last: it is read again (for up to 2 s) until it is newer.
async fn newer(m: &jetstream::Message, kv: &kv::Store, id: &str, revision: u64) -> Result<Option<Rec>, String> {
    let mut fresh = persist(m, || load(kv, id)).await?;
    for _ in 0..STALE_READS {
        if fresh.as_ref().is_some_and(|f| f.revision > revision) {
            break;
        }
        tracing::debug!(call = %id, "its record read at revision {:?} after a refused write at {revision}", fresh.as_ref().map(|f| f.revision));
        tokio::time::sleep(Duration::from_millis(50)).await;
        fresh = persist(m, || load(kv, id)).await?;
    }
    Ok(fresh)
}

/// A redelivered call's record as the bucket's leader has it. Records are read from any replica
/// (direct gets), and one that lags behind after a server died can show a call that ended on
/// another copy (whose ack was lost when the consumer's leader changed) as still to run, which
/// would run it twice. Writing the record back unchanged by compare-and-set fails when the
/// revision read is stale; it is then read again until the write lands. Only redeliveries pay
/// for this write.
async fn confirmed(m: &jetstream::Message, kv: &kv::Store, id: &str, mut rec: Rec) -> Result<Rec, String> {
    for _ in 0..CAS_TRIES {
        if rec.status.is_final() {
            return Ok(rec);
        }
        if let Cas::Written(revision) = persist(m, || cas(kv, id, &rec.status, &rec.extras, rec.revision)).await? {
            return Ok(Rec { revision, ..rec });
        }
        match newer(m, kv, id, rec.revision).await? {
            Some(f) => rec = f,
            // Gone (aged out of the bucket): nothing newer to learn.
            None => return Ok(rec),
        }
    }
    Err(format!("call {id}: its record kept changing"))
}

/// A call whose record says it ended: acked without running. A cancel whose event nobody
/// published yet (`pmnc queue cancel`) is told now, once.
async fn over(cluster: &Cluster, store: &Store, m: &jetstream::Message, call: &Message, rec: &Rec) {
    if rec.status.status == "cancelled" && !rec.extras.told {
        if let Ok(ready) = cluster.ready().await {
            let extras = Extras { told: true, ..rec.extras.clone() };
            if let Ok(Cas::Written(_)) = cas(&ready.kv, &call.id, &rec.status, &extras, rec.revision).await {
                publish_end([&store.cage, &call.from_cage], &call.id, &rec.status);
            }
        }
    }
    let _ = m.ack().await;
}

/// One delivery of a call: skipped when the bucket says it ended (done, dead, or cancelled),
/// held back until due, moved to dead letters when expired, else run.
async fn handle(cluster: &Arc<Cluster>, store: &Arc<Store>, q: &QueueConfig, spawn: &Spawner, m: jetstream::Message) {
    let delivery = m.info().map(|i| i.delivered).unwrap_or(1);
    let seq = m.info().map(|i| i.stream_sequence).unwrap_or(0);
    let call = match Message::decode(&m.payload) {
        Ok(c) => c,
        Err(e) => {
            if let Some(note) = store.log.allow("cluster-unreadable") {
                tracing::error!(cage = %store.cage, queue = %q.name, "a message in the queue's stream is no call ({e}); moved to dead letters{note}");
            }
            let _ = dead_letter(cluster, q, &m, None, &format!("not a call: {e}")).await;
            let _ = m.ack_with(AckKind::Term).await;
            return;
        }
    };
    // A second delivery while an attempt of the call still runs or ends here (handed again
    // after the consumer's leader moved) is left to that attempt, whose acks cover the same
    // message.
    if rustomnic_cluster::presence::holds(&store.cage, &q.name, &call.id) {
        held_by(store, q, &m, &call.id, None).await;
        return;
    }
    let Ok(ready) = cluster.ready().await else { return };
    let extras = Extras { queue: Some(q.name.clone()), from: Some(call.from_cage.clone()), ..Default::default() };
    let mut rec = match opened(&ready.kv, &store.cage, &call, &extras).await {
        Ok(r) => r,
        Err(e) => {
            // Without the bucket the call cannot be known to be new: it comes again.
            let _ = m.ack_with(AckKind::Nak(Some(Duration::from_secs(1)))).await;
            if let Some(note) = store.log.allow("cluster-kv") {
                tracing::warn!(cage = %store.cage, queue = %q.name, call = %call.id, "cannot read the call's record ({e}); it is delivered again{note}");
            }
            return;
        }
    };
    if delivery > 1 {
        // Handed again while the copy holding it lives (its in-progress acks or its ack lost
        // while the consumer elected a leader): that copy runs or ends it; this one looks again
        // later, and runs it only once that copy falls silent (docs/decisions/154).
        if let Some(holder) = rustomnic_cluster::roster().and_then(|r| r.held_elsewhere(&store.cage, &q.name, &call.id, &cluster.instance)) {
            held_by(store, q, &m, &call.id, Some(&holder)).await;
            return;
        }
        rec = match confirmed(&m, &ready.kv, &call.id, rec).await {
            Ok(r) => r,
            Err(e) => {
                let _ = m.ack_with(AckKind::Nak(Some(Duration::from_secs(1)))).await;
                if let Some(note) = store.log.allow("cluster-kv") {
                    tracing::warn!(cage = %store.cage, queue = %q.name, call = %call.id, "cannot confirm the call's record ({e}); it is delivered again{note}");
                }
                return;
            }
        };
    }
    // Announced in this process's heartbeats from here, where nothing waits without an
    // in-progress ack, until the delivery is settled: a hold taken before the reads above
    // would keep a call from every copy while one of them hung.
    let Some(_held) = rustomnic_cluster::presence::hold(&store.cage, &q.name, &call.id) else {
        held_by(store, q, &m, &call.id, None).await;
        return;
    };
    let mut attempts = rec.status.attempts.unwrap_or(0);
    let mut first = true;
    loop {
        if !first {
            // Held in place (keep_order) meanwhile: it may have been cancelled.
            if let Ok(Some(r)) = load(&ready.kv, &call.id).await {
                rec = r;
            }
        }
        first = false;
        if rec.status.is_final() {
            over(cluster, store, &m, &call, &rec).await;
            return;
        }
        let now = store::now_ms();
        if call.due_ms > now {
            let wait = Duration::from_millis((call.due_ms - now) as u64);
            if q.keep_order {
                // The calls after it wait too: it is held here, its delivery kept alive.
                with_progress(&m, q.ack_wait, tokio::time::sleep(wait)).await;
                continue;
            }
            let _ = m.ack_with(AckKind::Nak(Some(wait))).await;
            return;
        }
        if call.expires_ms <= now {
            let status = CallStatus {
                status: "dead".into(),
                cage: store.cage.clone(),
                attempts: Some(attempts),
                value: None,
                error: Some("expired before it could run".into()),
            };
            died(cluster, store, q, &m, &call, &mut rec, status, seq, "it expired").await;
            return;
        }
        let row = Due {
            seq: -1,
            id: call.id.clone(),
            from_cage: call.from_cage.clone(),
            module: call.module.clone(),
            function: call.function.clone(),
            args: call.args.clone(),
            attempts,
            due_ms: call.due_ms,
            expires_ms: call.expires_ms,
            max_attempts: call.max_attempts,
            trace: call.trace.clone(),
        };
        if let Ok(mut r) = cluster.running.lock() {
            r.insert(call.id.clone());
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        {
            let (store, q, row) = (store.clone(), q.clone(), row.clone());
            spawn(Box::new(move || {
                Box::pin(async move {
                    let _ = tx.send(run(store, q, row, delivery).await);
                })
            }));
        }
        let ran = with_progress(&m, q.ack_wait, rx).await.unwrap_or_else(|_| Err(Ran::Unrecorded("the worker thread stopped".into())));
        attempts += 1;
        let ended = match ran {
            Ok((values, writes, until)) => {
                let status = CallStatus { status: "done".into(), cage: store.cage.clone(), attempts: Some(attempts), value: Some(values), error: None };
                succeeded(cluster, store, q, &m, &call, &mut rec, status, writes, until).await;
                true
            }
            Err(Ran::Failed(failure)) => {
                // Jitter from the clock and the call: copies need no shared generator.
                let random = (store::now_ms() as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15).wrapping_add(call.id.len() as u64 * 31 + delivery as u64) % 10_000;
                match crate::dispatch::failed(q, &row, failure.stored.clone(), failure.permanent, random as f64 / 10_000.0) {
                    Outcome::Dead { error } => {
                        if let Some(note) = store.log.allow(&format!("dead:{}", q.name)) {
                            tracing::error!(cage = %store.cage, queue = %q.name, call = %call.id, "attempt {attempts} failed and the call is not tried again; moved to dead letters: {}{note}", failure.logged);
                        }
                        let status = CallStatus { status: "dead".into(), cage: store.cage.clone(), attempts: Some(attempts), value: None, error: Some(error) };
                        died(cluster, store, q, &m, &call, &mut rec, status, seq, &format!("it failed: {}", failure.stored)).await;
                        true
                    }
                    Outcome::Retry { error, due_ms } => {
                        let wait = Duration::from_millis((due_ms - store::now_ms()).max(0) as u64);
                        let status =
                            CallStatus { status: "failed".into(), cage: store.cage.clone(), attempts: Some(attempts), value: None, error: Some(error) };
                        match settle(cluster, store, &m, &call, &mut rec, status, extras.clone(), &format!("it failed: {}", failure.stored)).await {
                            Ok(false) => true,
                            written => {
                                if let Err(e) = written {
                                    if let Some(note) = store.log.allow("cluster-kv") {
                                        tracing::warn!(cage = %store.cage, queue = %q.name, call = %call.id, "cannot write the call's failed attempt to JetStream ({e}){note}");
                                    }
                                }
                                if let Some(note) = store.log.allow(&format!("attempt:{}", q.name)) {
                                    tracing::warn!(cage = %store.cage, queue = %q.name, call = %call.id, "attempt {attempts} failed, retrying in {} ms: {}{note}", wait.as_millis(), failure.logged);
                                }
                                if q.keep_order {
                                    if let Ok(mut r) = cluster.running.lock() {
                                        r.remove(&call.id);
                                    }
                                    with_progress(&m, q.ack_wait, tokio::time::sleep(wait)).await;
                                    continue;
                                }
                                let _ = m.ack_with(AckKind::Nak(Some(wait))).await;
                                true
                            }
                        }
                    }
                    Outcome::Done { .. } => true,
                }
            }
            Err(Ran::Unrecorded(e)) => {
                // The attempt's end could not be taken here (its worker stopped): it counts as
                // failed and the call comes again after the backoff, on whichever copy takes it.
                let wait = q.backoff.wait(attempts.clamp(1, u32::MAX as i64) as u32, 0.5);
                if let Some(note) = store.log.allow("record") {
                    tracing::error!(cage = %store.cage, queue = %q.name, call = %call.id, "queue: cannot record the end of attempt {attempts} ({e}); the call runs again in {} ms{note}", wait.as_millis());
                }
                let _ = m.ack_with(AckKind::Nak(Some(wait))).await;
                true
            }
        };
        if let Ok(mut r) = cluster.running.lock() {
            r.remove(&call.id);
        }
        if ended {
            return;
        }
    }
}

/// How an attempt on a worker thread failed.
enum Ran {
    Failed(crate::dispatch::Failure),
    /// Its end could not be taken (the worker thread stopped).
    Unrecorded(String),
}

/// Returned: (values, its held state writes, until when the values are shown); or why not.
type RanResult = Result<(Vec<Value>, Vec<rustomnic_resource_state::store::Write>, i64), Ran>;

/// One attempt, on a worker thread: the call runs as on the embedded store, its state writes
/// held; they are committed by [`succeeded`] only once the record allows it.
async fn run(store: Arc<Store>, q: QueueConfig, row: Due, delivery: i64) -> RanResult {
    match crate::dispatch::run_call(&store, &q, &row, Some(delivery)).await {
        Ok((values, writes)) => {
            if encode(&Value::Array(values.clone()), MAX_VALUE).is_err() {
                let stored = format!("{}.{}.{} returned a value that cannot be kept", store.cage, row.module, row.function);
                return Err(Ran::Failed(crate::dispatch::Failure { logged: stored.clone(), stored, permanent: false }));
            }
            Ok((values, writes, store::now_ms() + q.result_ttl.as_millis() as i64))
        }
        Err(f) => Err(Ran::Failed(f)),
    }
}

/// Writes `status` over the record `rec` was read as (compare-and-set). On a conflict the
/// record is read again: when the call was cancelled meanwhile, the cancel stands (`note`,
/// what became of this attempt, is added to its error), its event is told if nobody did, the
/// message is acked, and Ok(false) says that the end was dropped; the same when it ended
/// otherwise or its record is gone (purged). Ok(true): written, `rec` is the new record.
#[allow(clippy::too_many_arguments)]
async fn settle(
    cluster: &Cluster,
    store: &Store,
    m: &jetstream::Message,
    call: &Message,
    rec: &mut Rec,
    status: CallStatus,
    extras: Extras,
    note: &str,
) -> Result<bool, String> {
    let ready = cluster.ready().await?;
    for _ in 0..CAS_TRIES {
        if let Cas::Written(revision) = persist(m, || cas(&ready.kv, &call.id, &status, &extras, rec.revision)).await? {
            *rec = Rec { status, extras, revision };
            return Ok(true);
        }
        let fresh = newer(m, &ready.kv, &call.id, rec.revision).await?;
        let Some(fresh) = fresh else {
            let _ = m.ack().await;
            return Ok(false);
        };
        if fresh.status == status && fresh.extras.ending.is_some() == extras.ending.is_some() {
            // Our own write landed although its answer was lost (a server died meanwhile).
            *rec = fresh;
            return Ok(true);
        }
        if fresh.status.status == "cancelled" {
            let noted = fresh.status.error.as_deref() != Some("cancelled");
            let attempt = status.attempts.unwrap_or(0);
            let mut cancelled = fresh.status.clone();
            if !noted {
                cancelled.error = Some(format!("cancelled while attempt {attempt} ran; {note}"));
                cancelled.attempts = status.attempts;
            }
            let told = Extras { told: true, ..fresh.extras.clone() };
            if noted && fresh.extras.told {
                let _ = m.ack().await;
                return Ok(false);
            }
            if let Cas::Written(_) = cas(&ready.kv, &call.id, &cancelled, &told, fresh.revision).await? {
                if !fresh.extras.told {
                    publish_end([&store.cage, &call.from_cage], &call.id, &cancelled);
                }
                let _ = m.ack().await;
                return Ok(false);
            }
            continue;
        }
        if fresh.status.is_final() {
            // Ended by another copy (one cut from NATS longer than ack_wait ran it too).
            let _ = m.ack().await;
            return Ok(false);
        }
        *rec = fresh;
    }
    Err(format!("call {}: its record kept changing", call.id))
}

/// Commits an attempt's held state writes, and what comes after a workflow step, in one
/// commit of this copy's file.
async fn commit_end(store: &Store, writes: Vec<rustomnic_resource_state::store::Write>, step: Option<workflow::StepEnd>) -> Result<(), String> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    match store.send(Op::Writes { writes, step, reply: tx }) {
        Ok(()) => rx.await.unwrap_or_else(|_| Err("the queue writer stopped".into())),
        Err(e) => Err(e),
    }
}

/// An attempt that succeeded: with no state writes and no continuation, its record becomes
/// `done`. With either, the record is first marked `ending` (from then on a cancel is too
/// late), then the writes and the workflow's next step commit in this copy's file, then the
/// record becomes `done`: a cancel that came first leaves nothing committed. Then the ack and
/// the news.
#[allow(clippy::too_many_arguments)]
async fn succeeded(
    cluster: &Cluster,
    store: &Store,
    q: &QueueConfig,
    m: &jetstream::Message,
    call: &Message,
    rec: &mut Rec,
    status: CallStatus,
    writes: Vec<rustomnic_resource_state::store::Write>,
    until: i64,
) {
    let extras = Extras { queue: Some(q.name.clone()), from: Some(call.from_cage.clone()), ..Default::default() };
    let dropped = "it succeeded; its result and state writes were dropped";
    let unwritten = |e: String| {
        if let Some(note) = store.log.allow("cluster-kv") {
            tracing::error!(cage = %store.cage, queue = %q.name, call = %call.id, "cannot write the call's end to JetStream ({e}); it is delivered again after ack_wait{note}");
        }
    };
    let step = call.cont.clone().map(|cont| workflow::StepEnd { id: call.id.clone(), cont, end: Ok(status.value.clone().unwrap_or_default()) });
    if !writes.is_empty() || step.is_some() {
        let ending = Extras { ending: Some(store::now_ms()), ..extras.clone() };
        // Counting this attempt already, so that a cancel met here notes it.
        let marked = CallStatus { attempts: status.attempts, ..rec.status.clone() };
        match settle(cluster, store, m, call, rec, marked, ending, dropped).await {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => return unwritten(e),
        }
        if let Err(e) = commit_end(store, writes, step).await {
            // Not done: the mark goes, and the call comes again after the backoff.
            let attempts = status.attempts.unwrap_or(1);
            let wait = q.backoff.wait(attempts.clamp(1, u32::MAX as i64) as u32, 0.5);
            if let Some(note) = store.log.allow("record") {
                tracing::error!(cage = %store.cage, queue = %q.name, call = %call.id, "queue: cannot commit the state writes of attempt {attempts} ({e}); the call runs again in {} ms{note}", wait.as_millis());
            }
            let _ = settle(cluster, store, m, call, rec, rec.status.clone(), extras, "its state writes could not be committed").await;
            let _ = m.ack_with(AckKind::Nak(Some(wait))).await;
            return;
        }
    }
    match settle(cluster, store, m, call, rec, status.clone(), Extras { until: Some(until), ..extras }, dropped).await {
        Ok(true) => {
            let _ = m.ack().await;
            publish_end([&store.cage, &call.from_cage], &call.id, &status);
        }
        Ok(false) => {}
        Err(e) => unwritten(e),
    }
}

/// A call that is not tried again: its dead letter first, then its record `dead`, then the
/// ack and the news. A copy that dies between the record and the ack leaves the call to be
/// delivered again, and the next copy finds it ended and only acks it. When a cancel came
/// first, the dead letter is taken back and the call stays cancelled.
#[allow(clippy::too_many_arguments)]
async fn died(
    cluster: &Cluster,
    store: &Store,
    q: &QueueConfig,
    m: &jetstream::Message,
    call: &Message,
    rec: &mut Rec,
    status: CallStatus,
    seq: u64,
    note: &str,
) {
    // One dead letter per message of the queue's stream: a retried call that dies again gets
    // a new one, a redelivery of the same message does not.
    let dead_id = format!("{}@{seq}", call.id);
    let letter = match dead_letter(cluster, q, m, Some(&dead_id), status.error.as_deref().unwrap_or("")).await {
        Ok(s) => s,
        Err(e) => {
            // Not acked: it comes again after ack_wait and ends then.
            if let Some(note) = store.log.allow("cluster-dead") {
                tracing::error!(cage = %store.cage, queue = %q.name, call = %call.id, "cannot store the dead letter ({e}); trying again after ack_wait{note}");
            }
            return;
        }
    };
    let extras = Extras { queue: Some(q.name.clone()), from: Some(call.from_cage.clone()), ..Default::default() };
    let take_back = || async {
        if let Ok(ready) = cluster.ready().await {
            if let Ok(s) = ready.js.get_stream(dead_stream_name(&cluster.flock, &cluster.cage, &q.name)).await {
                let _ = s.delete_message(letter).await;
            }
        }
    };
    if let Some(cont) = call.cont.clone() {
        // A workflow step: its on_error step (or its dead part) is committed in this copy's
        // file before the record says dead, behind the same `ending` mark as a success's state
        // writes, so that a cancel either wins before anything is stored or is refused.
        let ending = Extras { ending: Some(store::now_ms()), ..extras.clone() };
        let marked = CallStatus { attempts: status.attempts, ..rec.status.clone() };
        match settle(cluster, store, m, call, rec, marked, ending, note).await {
            Ok(true) => {}
            Ok(false) => return take_back().await,
            Err(e) => {
                if let Some(note) = store.log.allow("cluster-kv") {
                    tracing::error!(cage = %store.cage, queue = %q.name, call = %call.id, "cannot write the call's end to JetStream ({e}); it is delivered again after ack_wait{note}");
                }
                return;
            }
        }
        let error = status.error.clone().unwrap_or_default();
        if let Err(e) = commit_end(store, Vec::new(), Some(workflow::StepEnd { id: call.id.clone(), cont, end: Err(error) })).await {
            // Left unacked with its mark: delivered again after ack_wait, it runs again (as
            // after a copy's death in this window) and ends on that delivery.
            if let Some(note) = store.log.allow("record") {
                tracing::error!(cage = %store.cage, queue = %q.name, call = %call.id, "queue: cannot store what comes after the dead workflow step ({e}); it is delivered again after ack_wait{note}");
            }
            return;
        }
    }
    match settle(cluster, store, m, call, rec, status.clone(), extras, note).await {
        Ok(true) => {
            let _ = m.ack().await;
            publish_end([&store.cage, &call.from_cage], &call.id, &status);
        }
        Ok(false) => take_back().await,
        Err(e) => {
            if let Some(note) = store.log.allow("cluster-kv") {
                tracing::error!(cage = %store.cage, queue = %q.name, call = %call.id, "cannot write the call's end to JetStream ({e}); it is delivered again after ack_wait{note}");
            }
        }
    }
}

/// Stores `m` in the queue's dead letters with `error`; returns its sequence there.
async fn dead_letter(cluster: &Cluster, q: &QueueConfig, m: &jetstream::Message, id: Option<&str>, error: &str) -> Result<u64, String> {
    let ready = cluster.ready().await?;
    let mut publish = jetstream::message::PublishMessage::build().payload(m.payload.clone()).header("Pmnc-Error", header_text(error).as_str());
    if let Some(id) = id {
        publish = publish.message_id(id);
    }
    ready
        .js
        .send_publish(dead_subject(&cluster.flock, &cluster.cage, &q.name), publish)
        .await
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())
        .map(|ack| ack.sequence)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_before_the_safe_release_are_told_apart() {
        for (v, before) in [
            ("2.9.10", true),
            ("2.10.11", true),
            ("v2.10.11", true),
            ("2.10.12", false),
            ("2.10.12-RC.1", false),
            ("2.12.8", false),
            ("3.0.0", false),
            ("", false),
            ("2.x", false),
            ("2.10", false),
        ] {
            assert_eq!(server_before(v, SAFE_SERVER), before, "{v}");
        }
    }

    #[test]
    fn a_call_goes_through_its_message_unchanged() {
        let m = Message {
            id: "c1".into(),
            module: "m".into(),
            function: "f".into(),
            args: vec![1, 2, 3],
            from_cage: "web".into(),
            created_ms: 5,
            due_ms: 6,
            expires_ms: 7,
            max_attempts: Some(3),
            trace: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
            workflow: None,
            cont: None,
        };
        let back = Message::decode(&m.encode().unwrap()).unwrap();
        assert_eq!((back.workflow.as_deref(), back.cont.as_deref()), (None, None));
        // A workflow step carries its workflow and continuation; a message with only one of
        // them (or of an earlier version, with neither) runs as a plain call.
        let step = Message { workflow: Some("w".into()), cont: Some(vec![9, 8]), ..Message::decode(&m.encode().unwrap()).unwrap() };
        assert_eq!(Message::decode(&step.encode().unwrap()).unwrap(), step);
        let half = Message { cont: None, ..Message::decode(&step.encode().unwrap()).unwrap() };
        assert_eq!(Message::decode(&half.encode().unwrap()).unwrap().workflow, None);
        assert_eq!((back.id, back.module, back.function, back.args, back.from_cage), ("c1".into(), "m".into(), "f".into(), vec![1, 2, 3], "web".into()));
        assert_eq!((back.created_ms, back.due_ms, back.expires_ms, back.max_attempts), (5, 6, 7, Some(3)));
        assert_eq!(back.trace.as_deref(), Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));
        assert!(Message::decode(b"\x01").is_err());
    }

    #[test]
    fn ids_become_valid_keys_and_stay_apart() {
        assert_eq!(key_of("order-17"), "order-17");
        assert_eq!(key_of("a.b"), "h.612e62");
        assert_eq!(key_of("a b"), "h.612062");
        assert_ne!(key_of("h.612062"), key_of("a b"));
    }

    #[test]
    fn a_records_extras_read_back_and_records_without_them_still_read() {
        let pending = CallStatus { status: "pending".into(), cage: "w".into(), attempts: Some(2), value: None, error: None };
        let extras = Extras { until: None, queue: Some("jobs".into()), from: Some("web".into()), told: true, ending: Some(42) };
        let (status, back) = read_full(&record_with("c", &pending, &extras)).unwrap();
        assert_eq!((status, back), (pending.clone(), extras));
        let (_, none) = read_full(&record("c", &pending, None)).unwrap();
        assert_eq!(none, Extras::default());
    }

    #[test]
    fn a_done_records_values_are_hidden_after_its_result_ttl() {
        let done = CallStatus { status: "done".into(), cage: "w".into(), attempts: Some(1), value: Some(vec![Value::Int(4)]), error: None };
        let kept = read_record(&record("c", &done, Some(store::now_ms() + 60_000))).unwrap();
        assert_eq!(kept.value, Some(vec![Value::Int(4)]));
        let gone = read_record(&record("c", &done, Some(store::now_ms() - 1))).unwrap();
        assert_eq!((gone.status.as_str(), gone.value), ("done", None));
    }
}
