//! Consuming a Redis broker as kombu's Redis transport does (shared/design/celery-protocol.md
//! §4): messages taken from the queues' lists, each recorded in `unacked`/`unacked_index` until it
//! is acknowledged, messages of a worker that died put back after the visibility timeout (by
//! whichever worker, ours or Python's, sweeps first). What a task goes through once taken is
//! crate::tasks.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use redis::aio::MultiplexedConnection;
use redis::AsyncCommands;
use rustomnic_interface::consumer::{reconnecting, Outage};
use rustomnic_interface::Host;
use rustomnic_resource_celery::{redis_connect, redis_display};
use serde_json::Value as Json;

use crate::tasks::{ResultOf, Transport, Worker};
use crate::CeleryInterface;
use rustomnic_resource_celery::message::{self, Envelope, Outgoing, Refusal, Task};

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
local find, sub = string.find, string.sub
-- The string value of the first key `name` at or after `from` (kombu writes `"k": "v"`, this
-- project's producer `"k":"v"`), or nil. Found by plain search, not by decoding the whole
-- envelope nor by patterns (both cost Redis several times more per message): a key inside
-- another string has its quotes escaped, so it cannot match; a value with an escape is refused.
local function field(m, name, from)
  local _, e = find(m, name .. '": "', from, true)
  if not e then _, e = find(m, name .. '":"', from, true) end
  if not e then return nil end
  local close = find(m, '"', e + 1, true)
  if not close then return nil end
  local v = sub(m, e + 1, close - 1)
  if find(v, '\\', 1, true) then return nil end
  return v
end
-- kombu's properties come last; the fields are looked for there first, then from the start.
local function prop(m, name, from)
  return field(m, name, from) or (from > 1 and field(m, name, 1)) or nil
end
local function quoted(s)
  if find(s, '[%c"\\]') then return cjson.encode(s) end
  return '"' .. s .. '"'
end
local out, left = {}, n
for i = 1, lists do
  if left <= 0 then break end
  local ms = redis.call('RPOP', KEYS[i], left)
  if ms then
    local z, h = {}, {}
    for _, m in ipairs(ms) do
      local from = find(m, '"properties":', 1, true) or 1
      local tag = prop(m, '"delivery_tag', from) or ''
      if tag ~= '' then
        local exchange = prop(m, '"exchange', from) or ''
        local key = prop(m, '"routing_key', from) or KEYS[i]
        z[#z + 1] = now
        z[#z + 1] = tag
        h[#h + 1] = tag
        h[#h + 1] = '[' .. m .. ',' .. quoted(exchange) .. ',' .. quoted(key) .. ']'
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
pub(crate) async fn run(iface: Arc<CeleryInterface>, host: Host, broker: String) {
    let refused = Arc::new(Mutex::new(VecDeque::new()));
    reconnecting(&host, async |outage: &mut Outage| session(&iface, &host, &broker, &refused, outage).await).await;
}

/// The Redis side of a session.
pub(crate) struct Redis {
    broker: MultiplexedConnection,
    display: String,
    refused: Arc<Mutex<VecDeque<String>>>,
    /// Set when a refused message came back: taking pauses until then, so that the message
    /// waits in its queue where another worker can take it.
    pause_until: Mutex<Option<Instant>>,
    /// The tags of the messages done with, for [`acknowledge`] to forget in one step per batch.
    acks: tokio::sync::mpsc::UnboundedSender<String>,
}

/// The most messages acknowledged in one round trip.
const ACK_BATCH: usize = 1024;

/// Acknowledges the messages whose tags it is given: those that wait when a round trip starts
/// go in one (`ZREM` and `HDEL` of many fields, atomic), so that a busy worker costs Redis two
/// commands per batch rather than four per task. Ends at `stop`, after what was given before it.
async fn acknowledge(mut tags: tokio::sync::mpsc::UnboundedReceiver<String>, broker: MultiplexedConnection, mut stop: tokio::sync::oneshot::Receiver<()>) {
    loop {
        let first = tokio::select! {
            biased;
            t = tags.recv() => match t {
                Some(t) => t,
                None => return,
            },
            _ = &mut stop => {
                // Every task has ended: what they acknowledged is waiting.
                let mut rest = Vec::new();
                while let Ok(t) = tags.try_recv() {
                    rest.push(t);
                }
                for chunk in rest.chunks(ACK_BATCH) {
                    forget(&broker, chunk).await;
                }
                return;
            }
        };
        let mut batch = vec![first];
        while batch.len() < ACK_BATCH {
            match tags.try_recv() {
                Ok(t) => batch.push(t),
                Err(_) => break,
            }
        }
        forget(&broker, &batch).await;
    }
}

/// Forgets messages as taken: they are done.
async fn forget(broker: &MultiplexedConnection, tags: &[String]) {
    let mut broker = broker.clone();
    let r: redis::RedisResult<()> = redis::pipe().atomic().zrem("unacked_index", tags).ignore().hdel("unacked", tags).ignore().query_async(&mut broker).await;
    if let Err(e) = r {
        tracing::warn!("celery: cannot acknowledge {} task message(s) ({e}); they come back after the visibility timeout", tags.len());
    }
}

impl Transport for Redis {
    type Taken = Envelope;

    async fn send(&self, messages: &[Outgoing]) -> Result<(), String> {
        if messages.is_empty() {
            return Ok(());
        }
        let mut broker = self.broker.clone();
        let mut pipe = redis::pipe();
        pipe.atomic();
        for m in messages {
            pipe.lpush(m.list(), m.envelope()).ignore();
        }
        let sent: redis::RedisResult<()> = pipe.query_async(&mut broker).await;
        sent.map_err(|e| format!("broker {}: {e}", self.display))
    }

    async fn again(&self, env: &Envelope, task: &Task, at: DateTime<Utc>) -> Result<(), String> {
        let again = message::retried(env, task.retries, at);
        let mut broker = self.broker.clone();
        let sent: redis::RedisResult<()> = broker.lpush(&env.routing_key, again).await;
        sent.map_err(|e| format!("broker {}: queue {}: {e}", self.display, env.routing_key))
    }

    async fn ack(&self, env: &Envelope) {
        // Acknowledged by the session's acknowledger, with the others done meanwhile; a session
        // that ended has flushed its acknowledgements (or its connection failed, and the message
        // comes back after the visibility timeout).
        if self.acks.send(env.tag.clone()).is_err() {
            tracing::warn!("celery: cannot acknowledge task message {} (the session ended); it comes back after the visibility timeout", env.tag);
        }
    }

    async fn refresh(&self, env: &Envelope) {
        let mut broker = self.broker.clone();
        let _: redis::RedisResult<()> = broker.zadd("unacked_index", &env.tag, unix_now()).await;
    }

    async fn release(&self, env: &Envelope) {
        // The front of its queue, as a sweep would put it; when this fails too, the sweep does.
        let r = put_back(&self.broker, env, &env.routing_key, env.json.to_string().as_bytes(), true).await;
        if let Err(e) = r {
            tracing::warn!("celery: cannot put task message {} back ({e}); it comes back after the visibility timeout", env.tag);
        }
    }
}

type Shared = Worker<Redis>;

async fn session(iface: &Arc<CeleryInterface>, host: &Host, url: &str, refused: &Arc<Mutex<VecDeque<String>>>, outage: &mut Outage) -> Result<(), String> {
    let spec = host.spec();
    let display = redis_display(url);
    let client = redis::Client::open(url).map_err(|e| format!("broker {display}: {e}"))?;
    // Taking has a connection of its own, so that it never waits behind results and acks.
    let mut pop = redis_connect(url).await.map_err(|e| format!("broker {e}"))?;
    let broker = redis_connect(url).await.map_err(|e| format!("broker {e}"))?;
    let results = crate::redis_results(iface).await?;
    let db = client.get_connection_info().redis_settings().db();
    let broker_events = broker.clone();
    let queues = iface.queues.join(", ");
    match outage.end() {
        Some(after) => {
            tracing::info!(cage = %spec.cage, interface = %spec.name, "connected to the broker again after {:.1}s; consuming {queues}", after.as_secs_f64())
        }
        None => tracing::info!(cage = %spec.cage, interface = %spec.name, "consuming Celery tasks from {queues}"),
    }
    let (acks, ack_rx) = tokio::sync::mpsc::unbounded_channel();
    let (ack_stop, ack_stopped) = tokio::sync::oneshot::channel();
    let acknowledger = tokio::spawn(acknowledge(ack_rx, broker.clone(), ack_stopped));
    let shared = Arc::new(Shared {
        iface: iface.clone(),
        host: host.clone(),
        transport: Redis { broker, display: display.clone(), refused: refused.clone(), pause_until: Mutex::new(None), acks },
        results,
        slots: tokio::sync::Semaphore::new(iface.concurrency),
        backend_failed: Default::default(),
        events: iface.events.clone().map(|name| crate::events::Events::new(name, crate::events::Sink::Redis { conn: broker_events, db })),
    });
    let heartbeat = shared.start_events();
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
        if let Some(e) = shared.backend_failure() {
            break Err(e);
        }
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
        let pause = shared.transport.pause_until.lock().unwrap_or_else(|p| p.into_inner()).take();
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
                    // Boxed, as the AMQP side's: the future is KiBs, copied whole by the task.
                    running.spawn(Box::pin(async move { take(&shared, queue, tag, payload).await }));
                }
            }
            Err(e) => break Err(format!("broker {display}: {e}")),
        }
    };
    // What was taken finishes (and is acknowledged) before the session ends; what is not
    // acknowledged then goes back after the visibility timeout.
    while running.join_next().await.is_some() {}
    let _ = ack_stop.send(());
    let _ = acknowledger.await;
    shared.stop_events(heartbeat).await;
    result
}

/// One message taken from list `queue` and recorded as taken under `tag` ("" when it was not
/// an envelope, so nothing was recorded).
async fn take(shared: &Shared, queue: String, tag: String, payload: Vec<u8>) {
    let spec = shared.host.spec();
    let mut broker = shared.transport.broker.clone();
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
            let header = |k: &str| env.json.get("headers").and_then(|h| h.get(k)).and_then(Json::as_str).unwrap_or("");
            let property = |k: &str| env.json.get("properties").and_then(|h| h.get(k)).and_then(Json::as_str).unwrap_or("");
            let to = ResultOf { id: header("id"), reply_to: property("reply_to"), correlation_id: property("correlation_id") };
            if to.id.is_empty() {
                // No task to fail: the message is kept aside, not dropped.
                tracing::error!(cage = %spec.cage, interface = %spec.name, "a message in queue {queue} is not a Celery task ({why}); kept in the list {UNREADABLE}");
                let r: redis::RedisResult<()> = redis::pipe()
                    .atomic()
                    .lpush(UNREADABLE, &payload)
                    .ignore()
                    .zrem("unacked_index", &env.tag)
                    .ignore()
                    .hdel("unacked", &env.tag)
                    .ignore()
                    .query_async(&mut broker)
                    .await;
                if let Err(e) = r {
                    tracing::warn!(cage = %spec.cage, interface = %spec.name, "cannot keep message {} aside ({e}); it comes back after the visibility timeout", env.tag);
                }
                return;
            }
            return shared.fail_unrun(&env, &to, &queue, &why).await;
        }
    };
    if let Some(why) = shared.refusal(&task) {
        return give_back(shared, &env, &queue, &payload, &why).await;
    }
    if shared.expired(&env, &task).await {
        return;
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
            shared.transport.refresh(&env).await;
        }
    }
    shared.run_task(&env, task, |r| shared.host.run(r)).await;
}

/// Puts a refused message back at the back of its queue, for another worker; when one comes
/// back that was refused before, taking pauses for a second, so that a queue this worker alone
/// consumes is not spun through and the message waits where another worker can take it.
async fn give_back(shared: &Shared, env: &Envelope, queue: &str, payload: &[u8], why: &str) {
    let spec = shared.host.spec();
    let seen = {
        let mut refused = shared.transport.refused.lock().unwrap_or_else(|p| p.into_inner());
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
        *shared.transport.pause_until.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now() + Duration::from_secs(1));
    } else {
        tracing::warn!(cage = %spec.cage, interface = %spec.name, "{why}: left in queue {queue} for another worker");
    }
    if let Err(e) = put_back(&shared.transport.broker, env, queue, payload, false).await {
        tracing::warn!(cage = %spec.cage, interface = %spec.name, "cannot put task message {} back ({e}); it comes back after the visibility timeout", env.tag);
    }
}

/// Puts a taken message back at the front of its queue (it is taken next).
async fn give_back_front(shared: &Shared, env: &Envelope, queue: &str, payload: &[u8]) {
    let _ = put_back(&shared.transport.broker, env, queue, payload, true).await;
}

/// Puts a taken message back in its queue, at the front (taken next) or the back, and forgets
/// it as taken, in one step.
async fn put_back(broker: &MultiplexedConnection, env: &Envelope, queue: &str, payload: &[u8], front: bool) -> redis::RedisResult<()> {
    let mut broker = broker.clone();
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
    let mut broker = shared.transport.broker.clone();
    let iface = &shared.iface;
    let err = |e: redis::RedisError| format!("broker {}: {e}", shared.transport.display);
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

fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}
