//! Parts of a join reach the state file that holds the join (docs/decisions/152). A group or
//! chord keeps its join in the file of the copy of the starting cage that started it; in a
//! flock the cage runs in several processes, each with its own file, and the cage's queue group
//! would hand a part to any of them. So a join names its holder, a key made from the host and
//! the file's path (stable across restarts of the process, shared by copies that run from one
//! folder and so hold the same file), and every process of the flock answers parts for the
//! files it holds on a subject of their own, `pmnc.<flock>.join.<cage>.<holder>`. A part for a
//! holder that is away waits in the sender's outbox (no responders: retried with its backoff).

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use rustomnic_lua::worker::CallError;
use rustomnic_resource_state::{decode, encode, MAX_VALUE};
use tokio::sync::OnceCell;

use crate::forward::{self, Forwarded};
use crate::{store_of, Store};

/// How long a part's forward waits for the holder's answer.
const ANSWER_WITHIN: Duration = Duration::from_secs(10);

/// The holder key of the state file at `path` on this host: FNV-1a of the host name and the
/// file's canonical path, in hex (a hash every build computes alike, unlike std's hashers).
pub(crate) fn key_of(path: &Path) -> String {
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let host = rustomnic_core::hostname();
    for b in host.as_bytes().iter().chain(b"\0").chain(path.to_string_lossy().as_bytes()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// The subject on which the holder `key` of cage `cage` takes parts of its joins.
pub(crate) fn subject(flock: &str, cage: &str, key: &str) -> String {
    format!("pmnc.{flock}.join.{cage}.{key}")
}

/// This process's connection for parts of joins: one per process, on a thread of its own.
struct Link {
    flock: String,
    config: rustomnic_cluster::ClusterConfig,
    instance: String,
    handle: tokio::runtime::Handle,
    client: OnceCell<async_nats::Client>,
    /// Subjects subscribed already (a cage started again keeps its subscription: the part is
    /// handed to whichever store of the cage runs when it arrives).
    serving: Mutex<HashSet<String>>,
}

static LINK: OnceLock<Option<Arc<Link>>> = OnceLock::new();

/// The link, made at the first use in a process that joined a cluster; None otherwise.
fn link() -> Option<Arc<Link>> {
    LINK.get_or_init(|| {
        let joined = rustomnic_cluster::joined()?;
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
        let handle = rt.handle().clone();
        std::thread::Builder::new()
            .name("pmnc-queue-joins".into())
            .spawn(move || rt.block_on(std::future::pending::<()>()))
            .map_err(|e| tracing::error!("queue: cannot start the thread of join parts: {e}; parts of joins are not received here"))
            .ok()?;
        Some(Arc::new(Link {
            flock: joined.config.flock.clone(),
            config: joined.config,
            instance: joined.instance,
            handle,
            client: OnceCell::new(),
            serving: Mutex::new(HashSet::new()),
        }))
    })
    .clone()
}

impl Link {
    async fn client(&self) -> Result<&async_nats::Client, String> {
        self.client
            .get_or_try_init(|| async {
                let name = format!("pmnc {} {} joins", self.flock, self.instance);
                let conn = rustomnic_cluster::connect::connect(&self.config, &name, true).await.map_err(|e| e.to_string())?;
                Ok::<_, String>(conn.client)
            })
            .await
    }
}

/// The holder key of `store`'s file when this process is in a flock (a join started there
/// records it); None outside a cluster, where one process holds every file of its cages.
pub(crate) fn holder_of(store: &Store) -> Option<String> {
    link().map(|_| key_of(&store.path))
}

/// Takes parts for the joins in `store`'s file from the flock: subscribes to its subject (in a
/// queue group of that subject, so that copies sharing the file take each part once).
pub(crate) fn serve(store: &Store) {
    let Some(link) = link() else { return };
    let (cage, key) = (store.cage.clone(), key_of(&store.path));
    let subject = subject(&link.flock, &cage, &key);
    if !link.serving.lock().map(|mut s| s.insert(subject.clone())).unwrap_or(false) {
        return;
    }
    let l = link.clone();
    link.handle.spawn(async move {
        let mut wait = Duration::from_millis(100);
        let mut sub = loop {
            let made = match l.client().await {
                Ok(c) => c.queue_subscribe(subject.clone(), subject.clone()).await.map_err(|e| e.to_string()),
                Err(e) => Err(e),
            };
            match made {
                Ok(s) => break s,
                Err(e) => {
                    tracing::warn!(cage = %cage, "queue: cannot take parts of joins on {subject} yet: {e}; trying again");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
            }
        };
        while let Some(m) = sub.next().await {
            let Some(reply) = m.reply.clone() else { continue };
            let answer = take(&cage, &key, &m.payload).await;
            if let Ok(c) = l.client().await {
                let _ = c.publish(reply, Bytes::from(answer)).await;
            }
        }
    });
}

/// Reads a part of a join as it arrives on a holder's subject: the call to `_queue.join` that
/// the member's outbox forwards, one map (crate::forward), whose one argument the holder's
/// store reads as the part (crate::workflow::Part::from_args). Anything on the flock's
/// subjects can publish here: a refusal says what was wrong.
pub(crate) fn read_part(payload: &[u8]) -> Result<Forwarded, String> {
    let v = decode(payload).map_err(|e| format!("the message: {e}"))?;
    forward::decode(vec![v])
}

/// A part of a join as [`deliver`] sends it to the holder's process.
pub(crate) fn part_message(f: &Forwarded) -> Result<Vec<u8>, String> {
    encode(&forward::encode(f), MAX_VALUE)
}

/// The message that carries part `f` to its join's holder, at most `max` bytes (the NATS
/// server's max_payload). A member's value that fit its own row can still fail to travel: the
/// message wraps it two levels deeper (past the nesting limit) and a server takes less than a
/// row holds. Such a part goes as a dead part that names why, so the join ends dead with that
/// error; refused, the part would stay in the outbox and the join would wait forever.
pub(crate) fn sendable_part(mut f: Forwarded, max: usize) -> Result<Vec<u8>, String> {
    let why = match part_message(&f) {
        Ok(bytes) if bytes.len() <= max => return Ok(bytes),
        Ok(bytes) => format!("the part takes {} bytes, over the NATS server's max_payload of {max} bytes", bytes.len()),
        Err(e) => e,
    };
    // Moved out, not copied: the value that did not fit can be as large as a row.
    let part = crate::workflow::Part::from_args(std::mem::take(&mut f.args))?;
    let dead = crate::workflow::Part { end: Err(format!("the member's value cannot reach the join's process: {why}")), ..part };
    part_message(&Forwarded { args: vec![dead.to_value()], ..f })
}

/// Applies one part that arrived for cage `cage`'s file `key`; the answer: `ok`, or
/// `refused:`/`failed:` and why.
async fn take(cage: &str, key: &str, payload: &[u8]) -> Vec<u8> {
    let f = match read_part(payload) {
        Ok(f) => f,
        Err(e) => return format!("refused:cage {cage}: a part of a join cannot be read: {e}").into_bytes(),
    };
    // The cage's store now (started again since the subscription was made, perhaps).
    let Some(store) = store_of(cage).filter(|s| key_of(&s.path) == key) else {
        return format!("failed:cage {cage} does not hold the file of these joins here now").into_bytes();
    };
    match store.accept_part(f).await {
        Ok(_) => b"ok".to_vec(),
        Err(CallError::Refused(m)) => format!("refused:{m}").into_bytes(),
        Err(e) => format!("failed:{e}").into_bytes(),
    }
}

/// Forwards part `f` of a join of cage `cage` to the process holding its file `key`: applied
/// here when this process holds it, else over the flock. No holder listening is a failure that
/// the outbox retries (the holder's process may be restarting).
pub(crate) async fn deliver(cage: &str, key: &str, f: Forwarded) -> Result<(), CallError> {
    if let Some(store) = store_of(cage).filter(|s| key_of(&s.path) == key) {
        return store.accept_part(f).await.map(|_| ());
    }
    let Some(link) = link() else {
        return Err(CallError::Failed(format!("the join of cage {cage} is held by another process, and this one joined no cluster")));
    };
    let subject = subject(&link.flock, cage, key);
    let (l, cage_name) = (link.clone(), cage.to_string());
    let sent = link
        .handle
        .spawn(async move {
            let client = l.client().await?;
            let max = Some(client.max_payload()).filter(|m| *m > 0).unwrap_or(usize::MAX);
            let payload = sendable_part(f, max).map_err(|e| format!("refused:{e}"))?;
            match tokio::time::timeout(ANSWER_WITHIN, client.request(subject, Bytes::from(payload))).await {
                Ok(Ok(m)) => Ok(m.payload.to_vec()),
                Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => {
                    Err(format!("no process holding this join's file of cage {cage_name} is reachable now"))
                }
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!("no answer within {ANSWER_WITHIN:?}")),
            }
        })
        .await
        .map_err(|e| CallError::Failed(format!("the thread of join parts stopped: {e}")))?;
    let answer = sent.map_err(|e| match e.strip_prefix("refused:") {
        Some(e) => CallError::Refused(format!("a part of a join of cage {cage}: {e}")),
        None => CallError::Failed(format!("a part of a join of cage {cage}: {e}")),
    })?;
    let text = String::from_utf8_lossy(&answer);
    if text == "ok" {
        Ok(())
    } else if let Some(m) = text.strip_prefix("refused:") {
        Err(CallError::Refused(m.to_string()))
    } else {
        Err(CallError::Failed(text.strip_prefix("failed:").unwrap_or(&text).to_string()))
    }
}

/// Cancels a workflow's steps `ids` of clustered queues of cage `cage` through this process's
/// connection (a process whose own cages have no clustered queue has no other), by
/// crate::jetstream::cancel_steps_in; nothing when the cage has no bucket, or this process
/// joined no cluster.
pub(crate) async fn cancel_steps(cage: String, ids: Vec<String>) -> Result<Vec<(String, crate::jetstream::Cancelled)>, String> {
    let Some(link) = link() else { return Ok(Vec::new()) };
    let l = link.clone();
    let name = cage.clone();
    link.handle
        .spawn(async move {
            let work = async {
                let js = crate::jetstream::context(l.client().await?);
                let Ok(kv) = js.get_key_value(crate::jetstream::bucket(&l.flock, &cage)).await else { return Ok(Vec::new()) };
                crate::jetstream::cancel_steps_in(&kv, &cage, ids, true).await
            };
            tokio::time::timeout(ANSWER_WITHIN, work).await.unwrap_or_else(|_| Err(format!("JetStream did not answer within {ANSWER_WITHIN:?}")))
        })
        .await
        .map_err(|e| format!("the thread of join parts stopped: {e}"))?
        .map_err(|e| format!("cage {name}: cancelling a workflow's clustered steps: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustomnic_core::Value;

    #[test]
    fn a_files_key_is_stable_and_apart_from_others() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.db"), dir.path().join("b.db"));
        std::fs::write(&a, b"").unwrap();
        assert_eq!(key_of(&a), key_of(&a));
        assert_eq!(key_of(&a), key_of(&dir.path().join(".").join("a.db")), "the canonical path counts");
        assert_ne!(key_of(&a), key_of(&b));
        assert_eq!(key_of(&a).len(), 16);
        assert_eq!(subject("f", "web", "00ff"), "pmnc.f.join.web.00ff");
    }

    /// A part as a member's cage stores it in its outbox (crate::workflow::part).
    fn forwarded(value: Value) -> Forwarded {
        let part = crate::workflow::Part { join: "j1".into(), index: 2, member: "j1.2".into(), end: Ok(value) };
        Forwarded {
            queue: "00ff".into(),
            id: "j1.2:join".into(),
            module: crate::ACCEPT_MODULE.into(),
            function: crate::workflow::JOIN_FUNCTION.into(),
            args: vec![part.to_value()],
            created_ms: 1,
            due_ms: 1,
            expires_ms: Some(2),
            max_attempts: None,
            trace: None,
            cont: None,
        }
    }

    fn sent(bytes: &[u8]) -> crate::workflow::Part {
        crate::workflow::Part::from_args(read_part(bytes).unwrap().args).unwrap()
    }

    #[test]
    fn a_part_that_cannot_travel_goes_dead_with_the_reason() {
        // Fits: sent as it is.
        let ok = sent(&sendable_part(forwarded(Value::Int(7)), 1 << 20).unwrap());
        assert_eq!((ok.join.as_str(), ok.index, ok.end), ("j1", 2, Ok(Value::Int(7))));

        // Nested so deep that the member's row kept it, but the message cannot.
        let mut deep = Value::Int(1);
        let mut levels = 0;
        // The message wraps the value three levels deep (forward map, args, part map).
        while encode(&Value::Array(vec![Value::Array(vec![Value::Array(vec![deep.clone()])])]), MAX_VALUE).is_ok() {
            deep = Value::Array(vec![deep]);
            levels += 1;
        }
        assert!(levels > 100, "{levels}");
        let row = encode(&Value::Array(vec![forwarded(deep.clone()).args[0].clone()]), MAX_VALUE);
        assert!(row.is_ok(), "the outbox row takes it");
        assert!(part_message(&forwarded(deep.clone())).is_err(), "the message alone cannot");
        let dead = sent(&sendable_part(forwarded(deep), 1 << 20).unwrap());
        assert_eq!((dead.join.as_str(), dead.index, dead.member.as_str()), ("j1", 2, "j1.2"));
        let e = dead.end.unwrap_err();
        assert!(e.contains("cannot reach the join's process") && e.contains("nested"), "{e}");

        // Over the server's max_payload.
        let big = Value::str("x".repeat(5000).as_str());
        let dead = sent(&sendable_part(forwarded(big.clone()), 4096).unwrap());
        let e = dead.end.unwrap_err();
        assert!(e.contains("over the NATS server's max_payload of 4096 bytes"), "{e}");
        assert_eq!(sent(&sendable_part(forwarded(big.clone()), 1 << 20).unwrap()).end, Ok(big));

        // Not a part at all: refused, as before.
        let mut junk = forwarded(Value::Nil);
        junk.args = vec![Value::Int(1)];
        let mut deep_junk = Value::Int(1);
        for _ in 0..200 {
            deep_junk = Value::Array(vec![deep_junk]);
        }
        junk.args.push(deep_junk);
        assert!(sendable_part(junk, 1 << 20).unwrap_err().contains("one map of its fields"));
    }
}
