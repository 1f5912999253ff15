//! The dispatcher of a cage's queue: reads the calls that are due, hands each to a worker
//! thread within its queue's concurrency, order and rate limits, and sleeps until the next call
//! is due or the writer or a finished call wakes it. Nothing is held in memory but the set of
//! calls running now; a call waits in the file until it runs.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rusqlite::Connection;
use rustomnic_core::Value;
use rustomnic_lua::{worker, RequestCtx, RunError};
use rustomnic_resource_state::{decode, encode, held, MAX_VALUE};

use crate::store::{self, Due, Outcome};
use crate::writer::Op;
use crate::{QueueConfig, Spawner, Store};

/// The dispatcher looks at the file at least this often (new calls from other processes that
/// share it, clocks that jumped).
const POLL: Duration = Duration::from_millis(500);

/// A token bucket for `rate_limit`.
struct Rate {
    tokens: f64,
    at: Instant,
}

pub(crate) fn run(store: Arc<Store>, conn: Connection, spawn: Spawner) {
    let mut rates: BTreeMap<String, Rate> = BTreeMap::new();
    let mut seed = (std::process::id() as u64) << 32 ^ store::now_ms() as u64;
    let mut complained = false;
    // When the outbox must be read again even without a hint (its earliest retry).
    let mut outbox_at = i64::MAX;
    while !store.stop.load(Ordering::SeqCst) {
        // Calls that ended before this point are seen as ended by the reads below.
        if let Ok(mut e) = store.ended.lock() {
            e.clear();
        }
        let now = store::now_ms();
        let mut next = now + POLL.as_millis() as i64;
        for q in store.queues.values().filter(|_| !store.paused.load(Ordering::SeqCst)) {
            match dispatch_queue(&store, &conn, q, now, &mut rates, &spawn, &mut seed) {
                Ok(Some(at)) => next = next.min(at),
                Ok(None) => {}
                Err(e) => {
                    if !complained {
                        tracing::error!(cage = %store.cage, queue = %q.name, "{e}");
                    }
                    complained = true;
                }
            }
        }
        if !store.paused.load(Ordering::SeqCst) && (store.outbox_hint.swap(false, Ordering::SeqCst) || now >= outbox_at) {
            match forward_outbox(&store, &conn, now, &spawn) {
                Ok(at) => outbox_at = at.unwrap_or(i64::MAX),
                Err(e) => {
                    tracing::error!(cage = %store.cage, "{e}");
                    outbox_at = now + POLL.as_millis() as i64;
                }
            }
        }
        next = next.min(outbox_at);
        let wait = Duration::from_millis((next - store::now_ms()).clamp(1, POLL.as_millis() as i64) as u64);
        let (lock, cv) = &store.wake;
        let Ok(mut woken) = lock.lock() else { return };
        if !*woken {
            woken = match cv.wait_timeout(woken, wait) {
                Ok((w, _)) => w,
                Err(_) => return,
            };
        }
        *woken = false;
    }
}

/// Starts the due calls of one queue; returns when its next call is due, if known.
fn dispatch_queue(
    store: &Arc<Store>,
    conn: &Connection,
    q: &QueueConfig,
    now: i64,
    rates: &mut BTreeMap<String, Rate>,
    spawn: &Spawner,
    seed: &mut u64,
) -> Result<Option<i64>, String> {
    let limit = if q.keep_order { 1 } else { q.concurrency };
    let running = store.inflight.lock().map(|f| f.values().filter(|n| **n == q.name).count()).unwrap_or(limit);
    if running >= limit {
        return Ok(None);
    }
    let rows = store::waiting(conn, &store.path, &q.name, q.keep_order, limit)?;
    let mut started = running;
    for (seq, due_ms) in rows {
        if started >= limit {
            break;
        }
        if store.inflight.lock().map(|f| f.contains_key(&seq)).unwrap_or(true) {
            continue;
        }
        if store.ended.lock().map(|e| e.contains(&seq)).unwrap_or(true) {
            // Ended while this pass read: the row may be stale; the next pass sees it as it is.
            return Ok(Some(now + 1));
        }
        if due_ms > now {
            // Rows come earliest first (or in enqueue order, which must be kept).
            return Ok(Some(due_ms));
        }
        let Some(row) = store::due(conn, &store.path, seq)? else { continue };
        if row.expires_ms <= now {
            let (tx, rx) = tokio::sync::oneshot::channel();
            store.send(Op::Expire(row.seq, tx))?;
            if let Ok(Err(e)) = rx.blocking_recv() {
                return Err(e);
            }
            tracing::warn!(cage = %store.cage, queue = %q.name, call = %row.id, "expired before it ran; moved to dead letters");
            continue;
        }
        if q.rate_limit > 0 {
            let r = rates.entry(q.name.clone()).or_insert(Rate { tokens: q.rate_limit as f64, at: Instant::now() });
            let refill = r.at.elapsed().as_secs_f64() * q.rate_limit as f64;
            r.tokens = (r.tokens + refill).min(q.rate_limit as f64);
            r.at = Instant::now();
            if r.tokens < 1.0 {
                let wait = ((1.0 - r.tokens) / q.rate_limit as f64 * 1000.0).ceil() as i64;
                return Ok(Some(now + wait.max(1)));
            }
            r.tokens -= 1.0;
        }
        if let Ok(mut f) = store.inflight.lock() {
            f.insert(row.seq, q.name.clone());
        }
        started += 1;
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        let random = (*seed >> 11) as f64 / (1u64 << 53) as f64;
        let (store, q) = (store.clone(), q.clone());
        spawn(Box::new(move || Box::pin(attempt(store, q, row, random))));
    }
    Ok(None)
}

/// One attempt of a call on this worker thread: run it with its state writes held, then record
/// the outcome and those writes in one commit.
async fn attempt(store: Arc<Store>, q: QueueConfig, row: Due, random: f64) {
    let target = format!("{}.{}.{}", store.cage, row.module, row.function);
    let result = run_call(&store, &q, &row).await;
    let (outcome, writes) = match result {
        Ok((values, writes)) => match encode(&Value::Array(values), MAX_VALUE) {
            Ok(bytes) => {
                let now = store::now_ms();
                (
                    Outcome::Done { result: bytes, result_until_ms: now + q.result_ttl.as_millis() as i64, keep_until_ms: now + q.dedup_window.as_millis() as i64 },
                    writes,
                )
            }
            Err(e) => (failed(&q, &row, format!("{target} returned a value that cannot be kept: {e}"), random), Vec::new()),
        },
        // A failed attempt has no effect on the state: its held writes are dropped.
        Err(message) => (failed(&q, &row, message, random), Vec::new()),
    };
    match &outcome {
        Outcome::Retry { error, due_ms } => {
            tracing::warn!(cage = %store.cage, queue = %q.name, call = %row.id, "attempt {} failed, retrying in {} ms: {error}", row.attempts + 1, due_ms - store::now_ms())
        }
        Outcome::Dead { error } => {
            tracing::error!(cage = %store.cage, queue = %q.name, call = %row.id, "attempt {} failed and the call expires; moved to dead letters: {error}", row.attempts + 1)
        }
        Outcome::Done { .. } => {}
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    let sent = store.send(Op::Complete { seq: row.seq, outcome, writes, reply: tx });
    let recorded = match sent {
        Ok(()) => rx.await.unwrap_or_else(|_| Err("the queue writer stopped".into())),
        Err(e) => Err(e),
    };
    if let Err(e) = recorded {
        // The call stays waiting in the file with none of its writes, so it runs again.
        tracing::error!(cage = %store.cage, queue = %q.name, call = %row.id, "queue: cannot record the end of the call (it will run again): {e}");
    }
    // Into `ended` before leaving `inflight`, so that no pass sees neither.
    if let Ok(mut e) = store.ended.lock() {
        e.insert(row.seq);
    }
    if let Ok(mut f) = store.inflight.lock() {
        f.remove(&row.seq);
    }
    store.wake();
}

fn failed(q: &QueueConfig, row: &Due, error: String, random: f64) -> Outcome {
    let wait = q.backoff.wait((row.attempts + 1) as u32, random);
    let due = store::now_ms() + wait.as_millis() as i64;
    if due >= row.expires_ms {
        Outcome::Dead { error }
    } else {
        Outcome::Retry { error, due_ms: due }
    }
}

async fn run_call(store: &Store, q: &QueueConfig, row: &Due) -> Result<(Vec<Value>, Vec<rustomnic_resource_state::store::Write>), String> {
    let target = format!("{}.{}.{}", store.cage, row.module, row.function);
    let args = match decode(&row.args) {
        Ok(Value::Array(items)) => items,
        Ok(_) | Err(_) => return Err(format!("{target}: the stored arguments of call {} cannot be read", row.id)),
    };
    let Some(vm) = worker::cage(&store.cage) else {
        return Err(format!("{target}: cage {} has no VM on this worker thread", store.cage));
    };
    let timeout = q.timeout.unwrap_or(store.cage_timeout);
    let mut ctx = RequestCtx::new(&store.cage, &format!("queue.{}", q.name), timeout);
    ctx.call_id = Some(row.id.clone());
    ctx.parameters = Some(Value::Map(vec![
        (Value::str("queue"), Value::str(q.name.clone())),
        (Value::str("attempt"), Value::Int(row.attempts + 1)),
    ]));
    let (result, writes) = held::scope(&store.path, vm.call(ctx, &row.module, &row.function, args)).await;
    match result {
        Ok(values) => Ok((values, writes)),
        Err(RunError::Deadline) => Err(format!("{target}: deadline exceeded ({}s)", timeout.as_secs_f64())),
        Err(e) => Err(format!("{target}: {e}")),
    }
}

/// Outbox calls forwarded at once.
const FORWARD_BATCH: usize = 64;
/// Longest wait between two forwarding attempts of one call.
const FORWARD_MAX_WAIT_MS: i64 = 60_000;

/// Hands the outbox calls that are due to workers, which forward them to their target's
/// `_queue.accept` over `worker::call` (in this process or through the cluster); returns when
/// the next one waits for, if known.
fn forward_outbox(store: &Arc<Store>, conn: &Connection, now: i64, spawn: &Spawner) -> Result<Option<i64>, String> {
    for (seq, call, attempts) in store::outbox_due(conn, &store.path, now, FORWARD_BATCH)? {
        let claimed = store.forwarding.lock().map(|mut f| f.insert(seq)).unwrap_or(false);
        if !claimed {
            continue;
        }
        let store = store.clone();
        spawn(Box::new(move || Box::pin(forward(store, seq, call, attempts))));
    }
    store::outbox_next(conn, &store.path).map(|n| n.filter(|n| *n > now))
}

async fn forward(store: Arc<Store>, seq: i64, call: store::OutboxCall, attempts: i64) {
    let target = format!("{}.{}.{}", call.cage, call.module, call.function);
    let args = match decode(&call.args) {
        Ok(v @ Value::Array(_)) => v,
        _ => Value::Array(Vec::new()),
    };
    let request = worker::CallRequest {
        from_cage: store.cage.clone(),
        request_id: rustomnic_lua::new_request_id(),
        deadline: Instant::now() + Duration::from_secs(10),
        cage: call.cage.clone(),
        module: "_queue".into(),
        function: "accept".into(),
        args: vec![
            Value::str(call.queue.clone()),
            Value::str(call.id.clone()),
            Value::str(call.module.clone()),
            Value::str(call.function.clone()),
            Value::Float(call.due_ms as f64 / 1000.0),
            Value::Float(call.expires_ms as f64 / 1000.0),
            args,
        ],
    };
    let end = match worker::call(request).await {
        Ok(_) => store::OutboxEnd::Accepted,
        Err(e) => {
            let wait = (1000i64 << attempts.clamp(0, 16)).min(FORWARD_MAX_WAIT_MS);
            let next = store::now_ms() + wait;
            let error = e.to_string();
            if next >= call.expires_ms {
                tracing::error!(cage = %store.cage, call = %call.id, "durable call to {target} expired before its cage accepted it: {error}");
                store::OutboxEnd::Dead { error }
            } else {
                tracing::warn!(cage = %store.cage, call = %call.id, "durable call to {target} not accepted yet (retrying in {wait} ms): {error}");
                store::OutboxEnd::Retry { next_ms: next, error }
            }
        }
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    let recorded = match store.send(Op::OutboxEnd(seq, end, tx)) {
        Ok(()) => rx.await.unwrap_or_else(|_| Err("the queue writer stopped".into())),
        Err(e) => Err(e),
    };
    if let Err(e) = recorded {
        // Forwarded again later; the target de-duplicates by id.
        tracing::error!(cage = %store.cage, call = %call.id, "queue: cannot update the outbox: {e}");
    }
    if let Ok(mut f) = store.forwarding.lock() {
        f.remove(&seq);
    }
    // Its retry time (or its removal) changes when the outbox must be read next.
    store.outbox_hint.store(true, Ordering::SeqCst);
    store.wake();
}
