//! The dispatcher of a cage's queue: reads the calls that are due, hands each to a worker
//! thread within its queue's concurrency, order and rate limits, forwards the calls of the
//! cage's outbox to their targets, and sleeps until the next call is due or the writer or a
//! finished call wakes it. Nothing is held in memory but the calls running now and the backoff
//! of calls whose end could not be recorded; a call waits in the file until it runs.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rusqlite::Connection;
use rustomnic_core::Value;
use rustomnic_lua::convert::{from_lua, to_lua_all};
use rustomnic_lua::durable::{CallStatus, ACCEPT_FUNCTION, ACCEPT_MODULE};
use rustomnic_lua::worker::{self, CallError};
use rustomnic_lua::{RequestCtx, RunError};
use rustomnic_resource_state::{decode, encode, held, MAX_VALUE};

use crate::forward::{self, Forwarded};
use crate::store::{self, Due, Outcome};
use crate::writer::Op;
use crate::{publish_end, store_of, QueueConfig, Spawner, Store, EVENT_VALUES_MAX, FORWARDED_KEPT_MS};

/// The dispatcher looks at the file at least this often (new calls from other processes that
/// share it, `pmnc queue retry`, clocks that jumped).
const POLL: Duration = Duration::from_millis(500);

/// A token bucket for `rate_limit`.
pub(crate) struct Rate {
    tokens: f64,
    at: Instant,
}

impl Rate {
    pub(crate) fn new(per_second: u32) -> Rate {
        Rate { tokens: per_second as f64, at: Instant::now() }
    }
}

pub(crate) fn run(store: Arc<Store>, conn: Connection, spawn: Spawner) {
    let mut rates: BTreeMap<String, Rate> = BTreeMap::new();
    let mut seed = (std::process::id() as u64) << 32 ^ store::now_ms() as u64;
    // The outbox change count at the last read of the outbox (none yet), and when the outbox
    // must be read again even if nothing changes (its earliest retry, at most POLL away).
    let mut outbox_seen = u64::MAX;
    let mut outbox_at = 0;
    while !store.stop.load(Ordering::SeqCst) {
        // Calls that ended before this point are seen as ended by the reads below.
        if let Ok(mut e) = store.ended.lock() {
            e.clear();
        }
        let now = store::now_ms();
        let mut next = now + POLL.as_millis() as i64;
        if !store.paused.load(Ordering::SeqCst) {
            for q in store.queues.values() {
                if store.clustered(&q.name) {
                    // Its calls live in JetStream (jetstream.rs).
                    continue;
                }
                match dispatch_queue(&store, &conn, q, now, &mut rates, &spawn, &mut seed) {
                    Ok(Some(at)) => next = next.min(at),
                    Ok(None) => {}
                    Err(e) => {
                        if let Some(note) = store.log.allow(&format!("dispatch:{}", q.name)) {
                            tracing::error!(cage = %store.cage, queue = %q.name, "{e}{note}");
                        }
                    }
                }
            }
            // Read before the outbox is: a commit that lands after this load moves the count,
            // and the next pass reads the outbox again. The next time is derived from the file
            // after every change, never from a flag that a pass could consume too early.
            let changes = store.outbox_changes.load(Ordering::SeqCst);
            if changes != outbox_seen || now >= outbox_at {
                outbox_seen = changes;
                outbox_at = match forward_outbox(&store, &conn, now, &spawn) {
                    Ok(at) => at,
                    Err(e) => {
                        if let Some(note) = store.log.allow("outbox") {
                            tracing::error!(cage = %store.cage, "{e}{note}");
                        }
                        now + POLL.as_millis() as i64
                    }
                };
                #[cfg(test)]
                crate::run_hook(&store.hooks.after_outbox_read);
            }
            next = next.min(outbox_at);
        }
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

fn random(seed: &mut u64) -> f64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    (*seed >> 11) as f64 / (1u64 << 53) as f64
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
    // The earliest time a call held back after an unrecorded end may go again.
    let mut cooled = i64::MAX;
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
        if let Some(c) = Store::cooling(&store.unrecorded, seq).filter(|c| c.not_before_ms > now) {
            // Its last end could not be written (full disk): it waits out its backoff, and with
            // keep_order it holds the calls after it.
            if q.keep_order {
                return Ok(Some(c.not_before_ms));
            }
            cooled = cooled.min(c.not_before_ms);
            continue;
        }
        if due_ms > now {
            // Rows come earliest first (or in enqueue order, which must be kept).
            return Ok(Some(due_ms.min(cooled)));
        }
        let Some(row) = store::due(conn, &store.path, seq)? else {
            if let Ok(mut u) = store.unrecorded.lock() {
                u.remove(&seq);
            }
            continue;
        };
        let random = random(seed);
        if row.expires_ms <= now {
            expire(store, q, &row, random);
            continue;
        }
        if q.rate_limit > 0 {
            let r = rates.entry(q.name.clone()).or_insert_with(|| Rate::new(q.rate_limit));
            let refill = r.at.elapsed().as_secs_f64() * q.rate_limit as f64;
            r.tokens = (r.tokens + refill).min(q.rate_limit as f64);
            r.at = Instant::now();
            if r.tokens < 1.0 {
                let wait = ((1.0 - r.tokens) / q.rate_limit as f64 * 1000.0).ceil() as i64;
                return Ok(Some((now + wait.max(1)).min(cooled)));
            }
            r.tokens -= 1.0;
        }
        if let Ok(mut f) = store.inflight.lock() {
            f.insert(row.seq, q.name.clone());
        }
        started += 1;
        let (store, q) = (store.clone(), q.clone());
        spawn(Box::new(move || Box::pin(attempt(store, q, row, random))));
    }
    Ok((cooled < i64::MAX).then_some(cooled))
}

/// Moves a call found expired before it ran to dead letters (on the dispatcher's thread).
fn expire(store: &Arc<Store>, q: &QueueConfig, row: &Due, random: f64) {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let recorded = match store.send(Op::Expire(row.seq, tx)) {
        Ok(()) => rx.blocking_recv().unwrap_or_else(|_| Err("the queue writer stopped".into())),
        Err(e) => Err(e),
    };
    match recorded {
        Ok(()) => {
            if let Ok(mut u) = store.unrecorded.lock() {
                u.remove(&row.seq);
            }
            if let Some(note) = store.log.allow(&format!("expired:{}", q.name)) {
                tracing::warn!(cage = %store.cage, queue = %q.name, call = %row.id, "expired before it ran; moved to dead letters{note}");
            }
            let status = CallStatus {
                status: "dead".into(),
                cage: store.cage.clone(),
                attempts: Some(row.attempts),
                value: None,
                error: Some("expired before it could run".into()),
            };
            publish_end([&store.cage, &row.from_cage], &row.id, &status);
        }
        Err(e) => {
            let c = Store::cool(&store.unrecorded, row.seq, 0, |n| q.backoff.wait(n, random));
            if let Some(note) = store.log.allow("record") {
                tracing::error!(cage = %store.cage, queue = %q.name, call = %row.id, "queue: cannot move an expired call to dead letters ({e}); trying again in {} ms{note}", c.not_before_ms - store::now_ms());
            }
        }
    }
}

/// Why an attempt failed: the text stored with the call, and the text logged (with the
/// traceback, on one line).
pub(crate) struct Failure {
    pub stored: String,
    pub logged: String,
    /// The call raised an error with `retry = false` (`pmnc.calls.fail_permanently`).
    pub permanent: bool,
}

/// One attempt of a call on this worker thread: run it with its state writes held, then record
/// the outcome and those writes in one commit.
async fn attempt(store: Arc<Store>, q: QueueConfig, row: Due, random: f64) {
    let target = format!("{}.{}.{}", store.cage, row.module, row.function);
    let (outcome, writes, values, failure) = match run_call(&store, &q, &row, None).await {
        Ok((values, writes)) => match encode(&Value::Array(values.clone()), MAX_VALUE) {
            Ok(bytes) => {
                let now = store::now_ms();
                let small = (bytes.len() <= EVENT_VALUES_MAX).then_some(values);
                let done = Outcome::Done {
                    result: bytes,
                    result_until_ms: now + q.result_ttl.as_millis() as i64,
                    keep_until_ms: now + q.dedup_window.as_millis() as i64,
                };
                (done, writes, small, None)
            }
            Err(e) => {
                let stored = format!("{target} returned a value that cannot be kept: {e}");
                (failed(&q, &row, stored.clone(), false, random), Vec::new(), None, Some(stored))
            }
        },
        // A failed attempt has no effect on the state: its held writes are dropped.
        Err(f) => (failed(&q, &row, f.stored, f.permanent, random), Vec::new(), None, Some(f.logged)),
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    let sent = store.send(Op::Complete { seq: row.seq, outcome: outcome.clone(), writes, reply: tx });
    let recorded = match sent {
        Ok(()) => rx.await.unwrap_or_else(|_| Err("the queue writer stopped".into())),
        Err(e) => Err(e),
    };
    let attempt_no = row.attempts + 1;
    match recorded {
        Ok(true) => {
            // Cancelled while it ran: nothing of this attempt was kept, and it is not retried.
            if let Ok(mut u) = store.unrecorded.lock() {
                u.remove(&row.seq);
            }
            if let Some(note) = store.log.allow(&format!("cancelled:{}", q.name)) {
                tracing::warn!(cage = %store.cage, queue = %q.name, call = %row.id, "attempt {attempt_no} ended after the call was cancelled; its outcome was dropped{note}");
            }
            let error = format!(
                "cancelled while attempt {attempt_no} ran; {}",
                match &failure {
                    Some(f) => format!("it failed: {f}"),
                    None => "it succeeded; its result and state writes were dropped".into(),
                }
            );
            let status = CallStatus { status: "cancelled".into(), cage: store.cage.clone(), attempts: Some(attempt_no), value: None, error: Some(error) };
            publish_end([&store.cage, &row.from_cage], &row.id, &status);
        }
        Ok(false) => {
            if let Ok(mut u) = store.unrecorded.lock() {
                u.remove(&row.seq);
            }
            let failure = failure.unwrap_or_default();
            let end = match &outcome {
                Outcome::Retry { due_ms, .. } => {
                    if let Some(note) = store.log.allow(&format!("attempt:{}", q.name)) {
                        tracing::warn!(cage = %store.cage, queue = %q.name, call = %row.id, "attempt {attempt_no} failed, retrying in {} ms: {failure}{note}", due_ms - store::now_ms());
                    }
                    None
                }
                Outcome::Dead { error } => {
                    if let Some(note) = store.log.allow(&format!("dead:{}", q.name)) {
                        tracing::error!(cage = %store.cage, queue = %q.name, call = %row.id, "attempt {attempt_no} failed and the call is not tried again (expired, at its max_attempts or failed permanently); moved to dead letters: {failure}{note}");
                    }
                    Some(CallStatus { status: "dead".into(), cage: store.cage.clone(), attempts: Some(attempt_no), value: None, error: Some(error.clone()) })
                }
                Outcome::Done { .. } => {
                    Some(CallStatus { status: "done".into(), cage: store.cage.clone(), attempts: Some(attempt_no), value: values, error: None })
                }
            };
            if let Some(status) = end {
                publish_end([&store.cage, &row.from_cage], &row.id, &status);
            }
        }
        Err(e) => {
            // The call stays waiting in the file with none of its writes, so it runs again: not
            // at once (the cause, a full disk, is still there), but after a backoff that grows
            // with every end it could not record, as if each had been a failed attempt.
            let retry_at = match &outcome {
                Outcome::Retry { due_ms, .. } => *due_ms,
                _ => 0,
            };
            let c = Store::cool(&store.unrecorded, row.seq, retry_at, |n| q.backoff.wait((row.attempts as u32).saturating_add(n), random));
            if let Some(note) = store.log.allow("record") {
                tracing::error!(
                    cage = %store.cage, queue = %q.name, call = %row.id,
                    "queue: cannot record the end of attempt {attempt_no} ({e}); the call runs again in {} ms{note}",
                    c.not_before_ms - store::now_ms()
                );
            }
        }
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

/// The outcome of a failed attempt: dead when it failed permanently, when it was the last of
/// its `max_attempts` (the call's own, else its queue's), or when the next would start after
/// its expiry; else retried after the backoff.
pub(crate) fn failed(q: &QueueConfig, row: &Due, error: String, permanent: bool, random: f64) -> Outcome {
    let attempts = row.attempts + 1;
    if permanent {
        return Outcome::Dead { error: format!("{error} (failed permanently after {attempts} attempt{}: not retried)", if attempts == 1 { "" } else { "s" }) };
    }
    if let Some(max) = row.max_attempts.or(q.max_attempts.map(i64::from)) {
        if attempts >= max {
            return Outcome::Dead { error: format!("{error} (after {attempts} attempt{}, its max_attempts)", if attempts == 1 { "" } else { "s" }) };
        }
    }
    let wait = q.backoff.wait(attempts.clamp(0, u32::MAX as i64) as u32, random);
    let due = store::now_ms() + wait.as_millis() as i64;
    if due >= row.expires_ms {
        Outcome::Dead { error }
    } else {
        Outcome::Retry { error, due_ms: due }
    }
}

/// Runs one attempt of `row` on this worker thread with its state writes held; `delivery` is
/// JetStream's delivery count on the clustered store (`pmnc.request.parameters.delivery`).
pub(crate) async fn run_call(
    store: &Store,
    q: &QueueConfig,
    row: &Due,
    delivery: Option<i64>,
) -> Result<(Vec<Value>, Vec<rustomnic_resource_state::store::Write>), Failure> {
    let target = format!("{}.{}.{}", store.cage, row.module, row.function);
    let fail = |stored: String| Failure { logged: stored.clone(), stored, permanent: false };
    let args = match decode(&row.args) {
        Ok(Value::Array(items)) => items,
        Ok(_) | Err(_) => return Err(fail(format!("{target}: the stored arguments of call {} cannot be read", row.id))),
    };
    let Some(vm) = worker::cage(&store.cage) else {
        return Err(fail(format!("{target}: cage {} has no VM on this worker thread", store.cage)));
    };
    let timeout = q.timeout.unwrap_or(store.cage_timeout);
    let mut ctx = RequestCtx::new(&store.cage, &format!("queue.{}", q.name), timeout);
    ctx.call_id = Some(row.id.clone());
    let no_retry = ctx.no_retry.clone();
    let mut parameters = vec![(Value::str("queue"), Value::str(q.name.clone())), (Value::str("attempt"), Value::Int(row.attempts + 1))];
    if let Some(n) = delivery {
        parameters.push((Value::str("delivery"), Value::Int(n)));
    }
    ctx.parameters = Some(Value::Map(parameters));
    // The attempt is a span of the request that made the call (each attempt a sibling under
    // it), or of a new trace when the cage traces (docs/tracing.md).
    let made_by = row.trace.as_deref().and_then(|t| rustomnic_lua::trace::TraceContext::from_traceparent(t.as_bytes())).map(Box::new);
    ctx.trace = rustomnic_lua::trace::for_request(&store.cage, made_by);
    let span = rustomnic_lua::trace::recorded(&ctx).map(|t| (t, ctx.id.clone(), ctx.interface.clone()));
    // Started here rather than with CageVm::call, which logs every failure: the queue logs its
    // own failures, rate-limited, since a failing call is tried again and again.
    let run = match vm.start(ctx, &row.module, &row.function, |lua| to_lua_all(lua, &args)) {
        Ok(f) => f,
        Err(e) => return Err(fail(format!("{target}: {e}"))),
    };
    let (result, writes) = held::scope(&store.path, run).await;
    if let Some((t, id, interface)) = span {
        let failed = result.as_ref().err().map(|e| e.to_string());
        rustomnic_lua::worker::call_span(&t, &store.cage, &interface, &id, &row.module, &row.function, rustomnic_lua::trace::SpanKind::Consumer, failed);
    }
    match result {
        Ok(values) => {
            let values: Result<Vec<Value>, String> = values.iter().map(from_lua).collect();
            match values {
                Ok(v) => Ok((v, writes)),
                Err(e) => Err(fail(format!("{target} returned {e}"))),
            }
        }
        Err(RunError::Deadline) => Err(fail(format!("{target}: deadline exceeded ({}s)", timeout.as_secs_f64()))),
        Err(e) => Err(Failure {
            stored: format!("{target}: {e}"),
            logged: format!("{target}: {}", e.log_text()),
            permanent: no_retry.load(std::sync::atomic::Ordering::SeqCst),
        }),
    }
}

/// Outbox calls forwarded at once.
const FORWARD_BATCH: usize = 64;
/// Longest wait between two forwarding attempts of one call.
const FORWARD_MAX_WAIT_MS: i64 = 60_000;

/// Hands the outbox calls that are due to workers, which forward them to their target's
/// `_queue.accept` (in this process or through the cluster); returns when the outbox must be
/// read next.
fn forward_outbox(store: &Arc<Store>, conn: &Connection, now: i64, spawn: &Spawner) -> Result<i64, String> {
    let mut cooled = i64::MAX;
    for (seq, call, attempts) in store::outbox_due(conn, &store.path, now, FORWARD_BATCH)? {
        if let Some(c) = Store::cooling(&store.outbox_unrecorded, seq).filter(|c| c.not_before_ms > now) {
            cooled = cooled.min(c.not_before_ms);
            continue;
        }
        let claimed = store.forwarding.lock().map(|mut f| f.insert(seq)).unwrap_or(false);
        if !claimed {
            continue;
        }
        let store = store.clone();
        spawn(Box::new(move || Box::pin(forward(store, seq, call, attempts))));
    }
    let next = store::outbox_next(conn, &store.path)?.unwrap_or(i64::MAX);
    // A due row still here is being forwarded or waits out a backoff: the end of its forward
    // moves the change count. The poll bounds the rest, and finds rows that another process
    // wrote (`pmnc queue retry`).
    let poll = now + POLL.as_millis() as i64;
    let next = if next <= now { poll } else { next.min(poll) };
    Ok(next.min(cooled))
}

/// Hands a forwarded call to its target: straight to its queue when it runs in this process,
/// else through the cluster to `_queue.accept` of a process that runs it.
async fn deliver(store: &Store, cage: &str, f: Forwarded) -> Result<(), CallError> {
    if f.module == ACCEPT_MODULE && f.function == crate::workflow::JOIN_FUNCTION && !f.queue.is_empty() {
        // A part of a join whose file is named: to the process that holds that file.
        let holder = f.queue.clone();
        // Boxed: rare, and its future (some 7 KB) would otherwise size every forwarding's.
        return Box::pin(crate::holder::deliver(cage, &holder, f)).await;
    }
    if let Some(target) = store_of(cage) {
        return target.accept(&store.cage, f).await.map(|_| ());
    }
    let request = worker::CallRequest {
        from_cage: store.cage.clone(),
        request_id: rustomnic_lua::new_request_id(),
        deadline: Instant::now() + Duration::from_secs(10),
        cage: cage.to_string(),
        module: ACCEPT_MODULE.into(),
        function: ACCEPT_FUNCTION.into(),
        args: vec![forward::encode(&f)],
    };
    worker::call_remote(request).await.map(|_| ())
}

async fn forward(store: Arc<Store>, seq: i64, call: store::OutboxCall, attempts: i64) {
    let target = format!("{}.{}.{}", call.cage, call.module, call.function);
    let outcome = match decode(&call.args) {
        Ok(Value::Array(args)) => {
            let f = Forwarded {
                queue: call.queue.clone(),
                id: call.id.clone(),
                module: call.module.clone(),
                function: call.function.clone(),
                args,
                created_ms: call.created_ms,
                due_ms: call.due_ms,
                expires_ms: call.expires_given.then_some(call.expires_ms),
                max_attempts: call.max_attempts,
                trace: call.trace.clone(),
                cont: match call.cont.as_deref().map(decode) {
                    Some(Ok(v)) => Some(v),
                    _ => None,
                },
            };
            deliver(&store, &call.cage, f).await
        }
        _ => Err(CallError::Refused(format!("calling {target}: the stored arguments of call {} cannot be read", call.id))),
    };
    let now = store::now_ms();
    let end = match outcome {
        Ok(()) => store::OutboxEnd::Accepted { keep_until_ms: now.saturating_add(FORWARDED_KEPT_MS) },
        // The same call would be refused every time: given up at once, not after a day.
        Err(CallError::Refused(error)) => {
            if let Some(note) = store.log.allow("forward-refused") {
                tracing::error!(cage = %store.cage, call = %call.id, "durable call to {target} refused by its cage; moved to dead letters: {error}{note}");
            }
            store::OutboxEnd::Dead { error }
        }
        Err(e) => {
            let wait = (1000i64 << attempts.clamp(0, 16)).min(FORWARD_MAX_WAIT_MS);
            let next = now + wait;
            let error = e.to_string();
            if next >= call.expires_ms {
                if let Some(note) = store.log.allow("forward-expired") {
                    tracing::error!(cage = %store.cage, call = %call.id, "durable call to {target} expired before its cage accepted it: {error}{note}");
                }
                store::OutboxEnd::Dead { error }
            } else {
                if let Some(note) = store.log.allow("forward") {
                    tracing::warn!(cage = %store.cage, call = %call.id, "durable call to {target} not accepted yet (retrying in {wait} ms): {error}{note}");
                }
                store::OutboxEnd::Retry { next_ms: next, error }
            }
        }
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    let recorded = match store.send(Op::OutboxEnd(seq, end.clone(), tx)) {
        Ok(()) => rx.await.unwrap_or_else(|_| Err("the queue writer stopped".into())),
        Err(e) => Err(e),
    };
    match recorded {
        Ok(()) => {
            if let Ok(mut u) = store.outbox_unrecorded.lock() {
                u.remove(&seq);
            }
            if let store::OutboxEnd::Dead { error } = end {
                let status = CallStatus { status: "dead".into(), cage: call.cage.clone(), attempts: Some(0), value: None, error: Some(error) };
                publish_end([&store.cage, &call.cage], &call.id, &status);
            }
        }
        Err(e) => {
            // Forwarded again after a backoff; the target de-duplicates by id.
            let c = Store::cool(&store.outbox_unrecorded, seq, 0, |n| Duration::from_millis((1000u64 << n.min(6)).min(FORWARD_MAX_WAIT_MS as u64)));
            if let Some(note) = store.log.allow("outbox-record") {
                tracing::error!(cage = %store.cage, call = %call.id, "queue: cannot update the outbox ({e}); forwarding again in {} ms{note}", c.not_before_ms - store::now_ms());
            }
        }
    }
    if let Ok(mut f) = store.forwarding.lock() {
        f.remove(&seq);
    }
    // Its retry time (or its end) changes when the outbox must be read next.
    store.outbox_changed();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(attempts: i64, max_attempts: Option<i64>) -> Due {
        Due {
            seq: 1,
            id: "c".into(),
            from_cage: "web".into(),
            module: "m".into(),
            function: "f".into(),
            args: Vec::new(),
            attempts,
            due_ms: 0,
            expires_ms: i64::MAX,
            max_attempts,
            trace: None,
        }
    }

    /// Issue 18: the last allowed attempt (the call's own limit, else the queue's) and a
    /// permanent failure end the call; anything else is retried until the expiry.
    #[test]
    fn a_failed_attempt_is_dead_at_max_attempts_or_when_permanent() {
        let mut q = QueueConfig::new("q");
        let dead = |o: Outcome| match o {
            Outcome::Dead { error } => Some(error),
            _ => None,
        };
        assert_eq!(dead(failed(&q, &row(0, None), "e".into(), false, 0.5)), None, "no limit: retried");
        q.max_attempts = Some(3);
        assert_eq!(dead(failed(&q, &row(1, None), "e".into(), false, 0.5)), None, "attempt 2 of 3: retried");
        assert_eq!(dead(failed(&q, &row(2, None), "e".into(), false, 0.5)).as_deref(), Some("e (after 3 attempts, its max_attempts)"));
        assert_eq!(dead(failed(&q, &row(2, Some(5)), "e".into(), false, 0.5)), None, "the call's own limit wins");
        assert_eq!(dead(failed(&q, &row(0, Some(1)), "e".into(), false, 0.5)).as_deref(), Some("e (after 1 attempt, its max_attempts)"));
        assert_eq!(dead(failed(&q, &row(0, None), "no".into(), true, 0.5)).as_deref(), Some("no (failed permanently after 1 attempt: not retried)"));
        let mut expiring = row(0, None);
        expiring.expires_ms = store::now_ms();
        q.max_attempts = None;
        assert_eq!(dead(failed(&q, &expiring, "e".into(), false, 0.5)).as_deref(), Some("e"), "past its expiry: dead with its error as before");
    }
}
