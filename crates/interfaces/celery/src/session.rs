//! Consuming a Redis broker as kombu's Redis transport does (shared/design/celery-protocol.md
//! §4): messages taken from the queues' lists, each recorded in `unacked`/`unacked_index` until it
//! is acknowledged, messages of a worker that died put back after the visibility timeout (by
//! whichever worker, ours or Python's, sweeps first), results written with SETEX and PUBLISH.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use redis::aio::MultiplexedConnection;
use redis::AsyncCommands;
use rustomnic_core::Value;
use rustomnic_interface::consumer::{reconnecting, Outage};
use rustomnic_interface::{Host, Request};
use rustomnic_lua::RunError;
use serde_json::Value as Json;

use crate::CeleryInterface;
use rustomnic_resource_celery::message::{self, Envelope, Refusal, Task};

/// The wait after a poll that found nothing, first and at most.
const FIRST_POLL: Duration = Duration::from_millis(2);
const IDLE_POLL: Duration = Duration::from_millis(100);
/// Takes up to ARGV[1] messages from the lists KEYS[1..n-2] in order (priority first; RPOP with
/// a count, Redis 6.2 or later), and
/// records each as taken exactly as kombu does (`unacked_index` scored ARGV[2], `unacked` holding
/// `[envelope, exchange, routing_key]`), in one atomic step. Returns {list, tag, message}
/// triples; the tag is "" for a message that is not an envelope (nothing is recorded for it).
const TAKE: &str = r#"
local n, now = tonumber(ARGV[1]), ARGV[2]
local lists = #KEYS - 2
local unacked, index = KEYS[lists + 1], KEYS[lists + 2]
local out, left = {}, n
for i = 1, lists do
  if left <= 0 then break end
  local ms = redis.call('RPOP', KEYS[i], left)
  if ms then
    local z, h = {}, {}
    for _, m in ipairs(ms) do
      -- The fields are read with patterns, not by decoding the whole envelope: kombu writes
      -- them once, in properties; a quote inside another string is escaped, so it cannot match.
      local tag = m:match('"delivery_tag": *"([^"\\]+)"') or ''
      if tag ~= '' then
        local exchange = m:match('"exchange": *"([^"\\]*)"') or ''
        local key = m:match('"routing_key": *"([^"\\]*)"') or KEYS[i]
        z[#z + 1] = now
        z[#z + 1] = tag
        h[#h + 1] = tag
        h[#h + 1] = '[' .. m .. ',' .. cjson.encode(exchange) .. ',' .. cjson.encode(key) .. ']'
      end
      out[#out + 1] = { KEYS[i], tag, m }
    end
    if #z > 0 then
      redis.call('ZADD', index, unpack(z))
      redis.call('HSET', unacked, unpack(h))
    end
    left = left - #ms
  end
end
return out
"#;
/// The most messages taken and waiting for their eta at once, beyond those running.
const MAX_WAITING: usize = 10_000;
/// The most messages taken in one round trip.
const MAX_BATCH: usize = 64;
/// How often this worker sweeps `unacked` for messages past the visibility timeout.
const SWEEP_EVERY: Duration = Duration::from_secs(30);
/// The refused messages remembered, to slow down when the same one comes back.
const REFUSED_KEPT: usize = 1024;
/// Where messages that are not Celery messages at all are kept (they cannot go back to a queue
/// whose consumers cannot read them either).
const UNREADABLE: &str = "rustomnic.celery.unreadable";

/// Consumes until the interface's shutdown, reconnecting with backoff.
pub(crate) async fn run(iface: Arc<CeleryInterface>, host: Host) {
    let refused = Arc::new(Mutex::new(VecDeque::new()));
    reconnecting(&host, async |outage: &mut Outage| session(&iface, &host, &refused, outage).await).await;
}

/// What every task of a session shares.
struct Shared {
    iface: Arc<CeleryInterface>,
    host: Host,
    broker: MultiplexedConnection,
    backend: Option<MultiplexedConnection>,
    refused: Arc<Mutex<VecDeque<String>>>,
    /// Set when a refused message came back: taking pauses until then, so that the message
    /// waits in its queue where another worker can take it.
    pause_until: Mutex<Option<Instant>>,
    /// A task runs holding one of `concurrency` permits; one waiting for its `eta` holds none.
    slots: tokio::sync::Semaphore,
}

async fn session(iface: &Arc<CeleryInterface>, host: &Host, refused: &Arc<Mutex<VecDeque<String>>>, outage: &mut Outage) -> Result<(), String> {
    let spec = host.spec();
    let client = redis::Client::open(iface.broker.as_str()).map_err(|e| format!("broker {}: {e}", iface.broker))?;
    // Taking has a connection of its own, so that it never waits behind results and acks.
    let mut pop = client.get_multiplexed_async_connection().await.map_err(|e| format!("broker {}: {e}", iface.broker))?;
    let broker = client.get_multiplexed_async_connection().await.map_err(|e| format!("broker {}: {e}", iface.broker))?;
    let backend = match &iface.backend {
        Some(url) => {
            let c = redis::Client::open(url.as_str()).map_err(|e| format!("result backend {url}: {e}"))?;
            Some(c.get_multiplexed_async_connection().await.map_err(|e| format!("result backend {url}: {e}"))?)
        }
        None => None,
    };
    let queues = iface.queues.join(", ");
    match outage.end() {
        Some(after) => {
            tracing::info!(cage = %spec.cage, interface = %spec.name, "connected to the broker again after {:.1}s; consuming {queues}", after.as_secs_f64())
        }
        None => tracing::info!(cage = %spec.cage, interface = %spec.name, "consuming Celery tasks from {queues}"),
    }
    let shared = Arc::new(Shared {
        iface: iface.clone(),
        host: host.clone(),
        broker,
        backend,
        refused: refused.clone(),
        pause_until: Mutex::new(None),
        slots: tokio::sync::Semaphore::new(iface.concurrency),
    });
    let mut shutdown = host.shutdown();
    let mut running = tokio::task::JoinSet::new();
    let mut next_sweep = Instant::now();
    let take_script = redis::Script::new(TAKE);
    let mut idle = FIRST_POLL;
    // Each queue is four lists, one per priority step (kombu's Redis priorities: 0 first).
    let keys: Vec<String> = iface.queues.iter().flat_map(|q| [0, 3, 6, 9].map(|p| message::priority_list(q, p))).collect();
    let result = loop {
        if *shutdown.borrow() {
            break Ok(());
        }
        while running.try_join_next().is_some() {}
        // Taken messages: those running or about to (as many as there are permits), and those
        // waiting for their eta (at most MAX_WAITING).
        let free = shared.slots.available_permits();
        if free == 0 || running.len() >= iface.concurrency + MAX_WAITING {
            tokio::select! {
                _ = running.join_next() => continue,
                _ = shutdown.changed() => break Ok(()),
            }
        }
        if Instant::now() >= next_sweep {
            next_sweep = Instant::now() + SWEEP_EVERY.min(iface.visibility_timeout / 2);
            if let Err(e) = restore_visible(&shared).await {
                break Err(e);
            }
        }
        let pause = shared.pause_until.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(until) = pause {
            tokio::select! {
                _ = tokio::time::sleep_until(until.into()) => {}
                _ = shutdown.changed() => break Ok(()),
            }
        }
        // Taken and recorded as taken in one atomic step (a script), so that a crash cannot
        // lose a message between the two (kombu's BRPOP then MULTI can); polled, since a
        // script cannot block: at once after a hit, then less and less often up to IDLE_POLL.
        let room = free.clamp(1, MAX_BATCH);
        let mut invocation = take_script.prepare_invoke();
        for k in &keys {
            invocation.key(k);
        }
        invocation.key("unacked").key("unacked_index").arg(room).arg(unix_now());
        // Not raced with the shutdown: a take abandoned after Redis ran it would leave its
        // messages taken by nobody until the visibility timeout. It never blocks.
        let taken: redis::RedisResult<Vec<(String, String, Vec<u8>)>> = invocation.invoke_async(&mut pop).await;
        match taken {
            Ok(messages) if messages.is_empty() => {
                tokio::select! {
                    _ = tokio::time::sleep(idle) => {}
                    _ = shutdown.changed() => break Ok(()),
                }
                idle = (idle * 2).min(IDLE_POLL);
            }
            Ok(messages) => {
                idle = FIRST_POLL;
                for (queue, tag, payload) in messages {
                    let shared = shared.clone();
                    running.spawn(async move { take(&shared, queue, tag, payload).await });
                }
            }
            Err(e) => break Err(format!("broker {}: {e}", iface.broker)),
        }
    };
    // What was taken finishes (and is acknowledged) before the session ends; what is not
    // acknowledged then goes back after the visibility timeout.
    while running.join_next().await.is_some() {}
    result
}

/// One message taken from list `queue` and recorded as taken under `tag` ("" when it was not
/// an envelope, so nothing was recorded).
async fn take(shared: &Shared, queue: String, tag: String, payload: Vec<u8>) {
    let spec = shared.host.spec();
    let mut broker = shared.broker.clone();
    let env = match message::envelope(&payload, &queue) {
        Ok(mut e) if !tag.is_empty() => {
            // Acknowledged under the tag it was recorded with.
            e.tag = tag;
            e
        }
        other => {
            let why = other.err().unwrap_or_else(|| "no delivery tag".into());
            tracing::error!(cage = %spec.cage, interface = %spec.name, "a message in queue {queue} is not a Celery message ({why}); kept in the list {UNREADABLE}");
            let mut pipe = redis::pipe();
            pipe.atomic().lpush(UNREADABLE, payload).ignore();
            if !tag.is_empty() {
                pipe.zrem("unacked_index", &tag).ignore().hdel("unacked", &tag).ignore();
            }
            let _: redis::RedisResult<()> = pipe.query_async(&mut broker).await;
            return;
        }
    };
    let iface = &shared.iface;
    let task = match message::task(&env, iface.max_message_size, |name| iface.handler(name).is_some()) {
        Ok(t) => t,
        Err(Refusal::Others(why)) => return give_back(shared, &env, &queue, &payload, &why).await,
        Err(Refusal::Fail(why)) => {
            let id = env.json.get("headers").and_then(|h| h.get("id")).and_then(Json::as_str).unwrap_or("").to_string();
            tracing::error!(cage = %spec.cage, interface = %spec.name, "task {id} from queue {queue} fails without running: {why}");
            if !id.is_empty() {
                store(shared, &id, "FAILURE", message::exception("builtins", "ValueError", &why), None).await;
            }
            return ack(shared, &env).await;
        }
    };
    if let Some(expires) = task.expires {
        if Utc::now() >= expires {
            tracing::info!(cage = %spec.cage, interface = %spec.name, "task {} ({}) expired at {}; not run", task.id, task.name, message::format_time(expires));
            store(shared, &task.id, "REVOKED", message::exception("celery.exceptions", "TaskRevokedError", "expired"), None).await;
            return ack(shared, &env).await;
        }
    }
    if let Some(eta) = task.eta {
        // Waits here, not on a worker; the message stays taken (and refreshed) meanwhile.
        let mut shutdown = shared.host.shutdown();
        loop {
            let left = (eta - Utc::now()).to_std().unwrap_or_default();
            if left.is_zero() {
                break;
            }
            let nap = left.min(shared.iface.visibility_timeout / 2);
            tokio::select! {
                _ = tokio::time::sleep(nap) => {}
                _ = shutdown.changed() => {
                    // Stopping: the task goes back to its queue's front for the next worker.
                    return give_back_front(shared, &env, &queue, &payload).await;
                }
            }
            let _ = refresh(&mut broker, &env.tag).await;
        }
    }
    run_task(shared, &env, task).await;
}

/// Runs a task on a worker and stores its outcome, then acknowledges it.
async fn run_task(shared: &Shared, env: &Envelope, task: Task) {
    let spec = shared.host.spec();
    let Some(handler) = shared.iface.handler(&task.name).cloned() else { return };
    let Ok(_permit) = shared.slots.acquire().await else { return };
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
    let running = shared.host.run(request);
    // A task that runs longer than half the visibility timeout keeps its message taken.
    let mut broker = shared.broker.clone();
    let every = shared.iface.visibility_timeout / 2;
    tokio::pin!(running);
    let outcome = loop {
        tokio::select! {
            r = &mut running => break r,
            _ = tokio::time::sleep(every) => { let _ = refresh(&mut broker, &env.tag).await; }
        }
    };
    let retry = match &outcome {
        Err(RunError::Failed { message, .. }) => rustomnic_stdlib::celery::parse_retry(message),
        _ => None,
    };
    match outcome {
        Ok(values) => {
            let result = values.into_iter().next().unwrap_or_default();
            match result.to_json() {
                Ok(json) => {
                    // A chain goes on: the next step is queued before the result is written
                    // and the message acknowledged (a crash in between runs this task again
                    // and queues the step again; the first result stays).
                    let default_queue = &shared.iface.queues[0];
                    let mut next: Vec<(String, String, String)> = message::next_step(&task, &json, default_queue).into_iter().collect();
                    next.extend(message::callbacks(&task, &json, default_queue));
                    let Some(children) = queue_all(shared, &task, next, "its chain's next step or a callback").await else { return };
                    store_with(shared, &task.id, "SUCCESS", json, None, children, task.ignore_result).await
                }
                Err(e) => {
                    let why = format!("{}: the result cannot be sent as JSON: {e}", task.name);
                    tracing::error!(cage = %spec.cage, interface = %spec.name, "task {}: {why}", task.id);
                    store_with(shared, &task.id, "FAILURE", message::exception("builtins", "TypeError", &why), None, serde_json::json!([]), task.ignore_result)
                        .await;
                }
            }
        }
        Err(_) if retry.is_some() => {
            let Some(retry) = &retry else { return };
            if !retried(shared, env, &task, retry).await {
                // Not queued again: the message stays taken and comes back after the
                // visibility timeout.
                return;
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
            store_with(shared, &task.id, "FAILURE", message::exception(module, kind, &text), traceback, serde_json::json!([]), task.ignore_result).await;
            // Errbacks once the failure is stored; one that cannot be queued is logged (the task
            // is not run again for it).
            let _ = queue_all(shared, &task, message::errbacks(&task, &shared.iface.queues[0]), "an errback").await;
        }
    }
    ack(shared, env).await;
}

/// Queues messages that follow a task (chain step, callbacks, errbacks); the result's
/// `children` naming them, or None (logged) when one could not be queued.
async fn queue_all(shared: &Shared, task: &Task, messages: Vec<(String, String, String)>, what: &str) -> Option<Json> {
    let spec = shared.host.spec();
    let mut broker = shared.broker.clone();
    let mut children = Vec::with_capacity(messages.len());
    for (queue, id, envelope) in messages {
        let sent: redis::RedisResult<()> = broker.lpush(&queue, envelope).await;
        if let Err(e) = sent {
            tracing::error!(cage = %spec.cage, interface = %spec.name, "task {}: cannot queue {what} in {queue} ({e})", task.id);
            return None;
        }
        children.push(serde_json::json!([[id, null], null]));
    }
    Some(Json::Array(children))
}

/// A task that asked for a retry (`pmnc.celery.retry`): queued again with its eta and a RETRY
/// result, or, past its `max_retries`, a FAILURE. False when it could not be queued again.
async fn retried(shared: &Shared, env: &Envelope, task: &Task, retry: &rustomnic_stdlib::celery::Retry) -> bool {
    let spec = shared.host.spec();
    if let Some(max) = retry.max_retries.filter(|m| task.retries >= i64::from(*m)) {
        let text = format!("{}[{}]: max retries ({max}) exceeded: {}", task.name, task.id, retry.reason);
        tracing::warn!(cage = %spec.cage, interface = %spec.name, "task {text}");
        store_with(
            shared,
            &task.id,
            "FAILURE",
            message::exception("celery.exceptions", "MaxRetriesExceededError", &text),
            None,
            serde_json::json!([]),
            task.ignore_result,
        )
        .await;
        return true;
    }
    let at = Utc::now() + chrono::Duration::milliseconds((retry.countdown * 1000.0) as i64);
    let again = message::retried(env, task.retries, at);
    let mut broker = shared.broker.clone();
    let sent: redis::RedisResult<()> = broker.lpush(&env.routing_key, again).await;
    if let Err(e) = sent {
        tracing::error!(cage = %spec.cage, interface = %spec.name, "task {}: cannot queue its retry in {} ({e})", task.id, env.routing_key);
        return false;
    }
    tracing::info!(cage = %spec.cage, interface = %spec.name, "task {} ({}) retries in {:.1}s (retry {}): {}", task.id, task.name, retry.countdown, task.retries + 1, retry.reason);
    store_with(shared, &task.id, "RETRY", message::exception("celery.exceptions", "Retry", &retry.reason), None, serde_json::json!([]), task.ignore_result)
        .await;
    true
}

/// Keeps a taken message from being put back by a sweep while it waits or runs.
async fn refresh(broker: &mut MultiplexedConnection, tag: &str) -> redis::RedisResult<()> {
    broker.zadd("unacked_index", tag, unix_now()).await
}

/// Acknowledges a taken message: it is forgotten.
async fn ack(shared: &Shared, env: &Envelope) {
    let mut broker = shared.broker.clone();
    let r: redis::RedisResult<()> =
        redis::pipe().atomic().zrem("unacked_index", &env.tag).ignore().hdel("unacked", &env.tag).ignore().query_async(&mut broker).await;
    if let Err(e) = r {
        let spec = shared.host.spec();
        tracing::warn!(cage = %spec.cage, interface = %spec.name, "cannot acknowledge task message {} ({e}); it comes back after the visibility timeout", env.tag);
    }
}

/// Puts a refused message back at the back of its queue, for another worker; when one comes
/// back that was refused before, taking pauses for a second, so that a queue this worker alone
/// consumes is not spun through and the message waits where another worker can take it.
async fn give_back(shared: &Shared, env: &Envelope, queue: &str, payload: &[u8], why: &str) {
    let spec = shared.host.spec();
    let seen = {
        let mut refused = shared.refused.lock().unwrap_or_else(|p| p.into_inner());
        let seen = refused.contains(&env.tag);
        if !seen {
            if refused.len() >= REFUSED_KEPT {
                refused.pop_front();
            }
            refused.push_back(env.tag.clone());
        }
        seen
    };
    if seen {
        *shared.pause_until.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now() + Duration::from_secs(1));
    } else {
        tracing::warn!(cage = %spec.cage, interface = %spec.name, "{why}: left in queue {queue} for another worker");
    }
    if let Err(e) = put_back(shared, env, queue, payload, false).await {
        tracing::warn!(cage = %spec.cage, interface = %spec.name, "cannot put task message {} back ({e}); it comes back after the visibility timeout", env.tag);
    }
}

/// Puts a taken message back at the front of its queue (it is taken next).
async fn give_back_front(shared: &Shared, env: &Envelope, queue: &str, payload: &[u8]) {
    let _ = put_back(shared, env, queue, payload, true).await;
}

/// Puts a taken message back in its queue, at the front (taken next) or the back, and forgets
/// it as taken, in one step.
async fn put_back(shared: &Shared, env: &Envelope, queue: &str, payload: &[u8], front: bool) -> redis::RedisResult<()> {
    let mut broker = shared.broker.clone();
    let mut pipe = redis::pipe();
    pipe.atomic();
    if front {
        pipe.rpush(queue, payload).ignore();
    } else {
        pipe.lpush(queue, payload).ignore();
    }
    pipe.zrem("unacked_index", &env.tag).ignore().hdel("unacked", &env.tag).ignore().query_async(&mut broker).await
}

/// Puts back every taken message older than the visibility timeout (its worker died), under
/// kombu's `unacked_mutex`, at the front of its queue and marked redelivered.
async fn restore_visible(shared: &Shared) -> Result<(), String> {
    let mut broker = shared.broker.clone();
    let iface = &shared.iface;
    let err = |e: redis::RedisError| format!("broker {}: {e}", iface.broker);
    let token = uuid::Uuid::new_v4().to_string();
    let locked: Option<String> = redis::cmd("SET").arg("unacked_mutex").arg(&token).arg("NX").arg("EX").arg(300).query_async(&mut broker).await.map_err(err)?;
    if locked.is_none() {
        return Ok(());
    }
    let ceiling = unix_now() - iface.visibility_timeout.as_secs_f64();
    let tags: Vec<String> = broker.zrangebyscore_limit("unacked_index", "-inf", ceiling, 0, 1000).await.map_err(err)?;
    let spec = shared.host.spec();
    for tag in tags {
        let entry: Option<Vec<u8>> = broker.hget("unacked", &tag).await.map_err(err)?;
        let back = entry.as_deref().and_then(message::restored);
        let mut pipe = redis::pipe();
        pipe.atomic();
        match (&back, &entry) {
            (Some((queue, env)), _) => {
                pipe.rpush(queue, env).ignore();
                tracing::info!(cage = %spec.cage, interface = %spec.name, "task message {tag} was taken and not acknowledged for over {:?}: put back in queue {queue}", iface.visibility_timeout);
            }
            // Written by some other program: kept aside rather than dropped.
            (None, Some(raw)) => {
                pipe.lpush(UNREADABLE, raw).ignore();
                tracing::error!(cage = %spec.cage, interface = %spec.name, "task message {tag} was taken and not acknowledged, but its entry in unacked cannot be read; kept in the list {UNREADABLE}");
            }
            (None, None) => {}
        }
        pipe.zrem("unacked_index", &tag).ignore().hdel("unacked", &tag).ignore();
        let _: () = pipe.query_async(&mut broker).await.map_err(err)?;
    }
    let held: Option<String> = broker.get("unacked_mutex").await.map_err(err)?;
    if held.as_deref() == Some(token.as_str()) {
        let _: () = broker.del("unacked_mutex").await.map_err(err)?;
    }
    Ok(())
}

/// Writes a task's result document, unless a SUCCESS is stored already (as Celery's backend
/// does), and publishes it for clients waiting in `AsyncResult.get()`.
async fn store(shared: &Shared, task_id: &str, status: &str, result: Json, traceback: Option<&str>) {
    store_with(shared, task_id, status, result, traceback, serde_json::json!([]), false).await
}

/// [`store`] with the result's `children` (the next step of a chain); nothing when `ignore`
/// (the task's `ignore_result`).
async fn store_with(shared: &Shared, task_id: &str, status: &str, result: Json, traceback: Option<&str>, children: Json, ignore: bool) {
    if ignore {
        return;
    }
    let Some(backend) = &shared.backend else { return };
    let mut backend = backend.clone();
    let spec = shared.host.spec();
    let key = format!("celery-task-meta-{task_id}");
    let existing: redis::RedisResult<Option<Vec<u8>>> = backend.get(&key).await;
    if let Ok(Some(old)) = &existing {
        if serde_json::from_slice::<Json>(old).ok().and_then(|m| m.get("status").and_then(Json::as_str).map(|s| s == "SUCCESS")) == Some(true) {
            return;
        }
    }
    let doc = message::meta(task_id, status, result, traceback, children, Utc::now());
    let expires = shared.iface.result_expires.as_secs().max(1);
    let r: redis::RedisResult<()> = redis::pipe().atomic().set_ex(&key, &doc, expires).ignore().publish(&key, &doc).ignore().query_async(&mut backend).await;
    if let Err(e) = r {
        tracing::error!(cage = %spec.cage, interface = %spec.name, "cannot store the result of task {task_id} ({status}): {e}");
    }
}

fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}
