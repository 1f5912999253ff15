//! Celery over AMQP 0-9-1 (RabbitMQ), shared by the celery resource and interface: task
//! messages with Celery's headers and properties (shared/design/celery-protocol.md §3), queues
//! declared exactly as Celery declares them (§2), and the RPC result backend, whose results go
//! to the client's own reply queue (§5.4).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, ExchangeKind};
use rustomnic_core::value::MAX_DEPTH;
use rustomnic_resource_amqp::lapin;
pub use rustomnic_resource_amqp::wire::short;
use serde_json::{Map, Number, Value as Json};

use crate::message::Outgoing;

/// The content type of every message this side sends.
const JSON_TYPE: &str = "application/json";

/// Headers as JSON, as Celery's Python side sees them: every integer width an integer, every
/// string kind a string (bytes that are not UTF-8 replaced), void null, timestamps integers.
pub fn table_json(t: &FieldTable, depth: usize) -> Result<Map<String, Json>, String> {
    if depth >= MAX_DEPTH {
        return Err(format!("headers nested deeper than {MAX_DEPTH} levels"));
    }
    let mut out = Map::new();
    for (k, v) in t.inner() {
        out.insert(k.as_str().to_string(), value_json(v, depth + 1)?);
    }
    Ok(out)
}

/// Only the headers named in `keys` of a field table, as JSON: what a consumer converts of each
/// message when it reads only a few of its headers (the rest, `argsrepr` and the like, stay
/// as the broker gave them).
pub fn table_json_only(t: &FieldTable, keys: &[&str]) -> Result<Map<String, Json>, String> {
    let mut out = Map::new();
    for key in keys {
        if let Some(v) = t.inner().get(*key) {
            out.insert((*key).to_string(), value_json(v, 1)?);
        }
    }
    Ok(out)
}

fn value_json(v: &AMQPValue, depth: usize) -> Result<Json, String> {
    let float = |f: f64| Number::from_f64(f).map(Json::Number).unwrap_or(Json::Null);
    Ok(match v {
        AMQPValue::Boolean(b) => Json::Bool(*b),
        AMQPValue::ShortShortInt(i) => Json::from(*i),
        AMQPValue::ShortShortUInt(i) => Json::from(*i),
        AMQPValue::ShortInt(i) => Json::from(*i),
        AMQPValue::ShortUInt(i) => Json::from(*i),
        AMQPValue::LongInt(i) => Json::from(*i),
        AMQPValue::LongUInt(i) => Json::from(*i),
        AMQPValue::LongLongInt(i) => Json::from(*i),
        AMQPValue::Timestamp(t) => Json::from(*t),
        AMQPValue::Float(f) => float(f64::from(*f)),
        AMQPValue::Double(f) => float(*f),
        AMQPValue::DecimalValue(d) => float(f64::from(d.value) / 10f64.powi(i32::from(d.scale))),
        AMQPValue::ShortString(s) => Json::from(s.as_str()),
        AMQPValue::LongString(s) => Json::from(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ByteArray(b) => Json::from(String::from_utf8_lossy(b.as_slice()).into_owned()),
        AMQPValue::Void => Json::Null,
        AMQPValue::FieldArray(a) => {
            if depth >= MAX_DEPTH {
                return Err(format!("headers nested deeper than {MAX_DEPTH} levels"));
            }
            Json::Array(a.as_slice().iter().map(|item| value_json(item, depth + 1)).collect::<Result<_, _>>()?)
        }
        AMQPValue::FieldTable(t) => Json::Object(table_json(t, depth)?),
    })
}

/// JSON headers as a field table, the way Celery's Python side writes them (py-amqp: integers
/// as 64-bit, strings as long strings, None as void).
pub fn headers_table(m: &Map<String, Json>) -> Result<FieldTable, String> {
    let mut t = FieldTable::default();
    for (k, v) in m {
        let key = ShortString::try_new(k.as_str()).map_err(|_| format!("a header name of {} bytes (AMQP allows 255)", k.len()))?;
        t.insert(key, json_value(v, 0)?);
    }
    Ok(t)
}

fn json_value(v: &Json, depth: usize) -> Result<AMQPValue, String> {
    if depth >= MAX_DEPTH {
        return Err(format!("a header nested deeper than {MAX_DEPTH} levels"));
    }
    Ok(match v {
        Json::Null => AMQPValue::Void,
        Json::Bool(b) => AMQPValue::Boolean(*b),
        Json::Number(n) => match n.as_i64() {
            Some(i) => AMQPValue::LongLongInt(i),
            None => AMQPValue::Double(n.as_f64().unwrap_or(0.0)),
        },
        Json::String(s) => AMQPValue::LongString(LongString::from(s.as_bytes().to_vec())),
        Json::Array(items) => AMQPValue::FieldArray(FieldArray::from(items.iter().map(|i| json_value(i, depth + 1)).collect::<Result<Vec<_>, _>>()?)),
        Json::Object(m) => {
            let mut t = FieldTable::default();
            for (k, v) in m {
                let key = ShortString::try_new(k.as_str()).map_err(|_| format!("a header name of {} bytes (AMQP allows 255)", k.len()))?;
                t.insert(key, json_value(v, depth + 1)?);
            }
            AMQPValue::FieldTable(t)
        }
    })
}

/// The properties of a task message as Celery sends them (persistent, JSON, the task id as the
/// correlation id).
pub fn task_properties(out: &Outgoing) -> Result<BasicProperties, String> {
    let mut p = BasicProperties::default()
        .with_content_type(ShortString::from(JSON_TYPE))
        .with_content_encoding(ShortString::from("utf-8"))
        .with_delivery_mode(2)
        .with_priority(out.priority)
        .with_correlation_id(short("the task id", &out.id)?)
        .with_headers(headers_table(&out.headers())?);
    if !out.reply_to.is_empty() {
        p = p.with_reply_to(short("reply_to", &out.reply_to)?);
    }
    Ok(p)
}

/// The properties of a result sent to a client's reply queue (the RPC backend): transient, as
/// Celery sends them unless `result_persistent`.
pub fn result_properties(correlation_id: &str) -> Result<BasicProperties, String> {
    Ok(BasicProperties::default()
        .with_content_type(ShortString::from(JSON_TYPE))
        .with_content_encoding(ShortString::from("utf-8"))
        .with_delivery_mode(1)
        .with_correlation_id(short("the correlation id", correlation_id)?))
}

/// Publishes a task message to its queue through the default exchange (as Celery does for a
/// queue of a direct exchange); the confirm is the caller's to await.
pub async fn publish_task(channel: &Channel, out: &Outgoing) -> Result<lapin::PublisherConfirm, String> {
    let properties = task_properties(out)?;
    channel
        .basic_publish(ShortString::default(), short("the queue name", &out.queue)?, BasicPublishOptions::default(), out.body().as_bytes(), properties)
        .await
        .map_err(|e| format!("cannot publish task {} to queue {:?}: {e}", out.id, out.queue))
}

/// Awaits a publisher confirm: the broker took the message.
pub async fn confirmed(confirm: lapin::PublisherConfirm, what: &str) -> Result<(), String> {
    match confirm.await {
        Ok(c) if c.is_nack() => Err(format!("{what}: the broker refused the message (nack)")),
        Ok(_) => Ok(()),
        Err(e) => Err(format!("{what}: no confirm from the broker: {e}")),
    }
}

/// Declares `queue` exactly as Celery does: a durable direct exchange of the same name, the
/// queue durable with no arguments, bound with its own name. A queue that exists with other
/// arguments (a quorum queue, a priority queue) is used as it is: the broker refuses the
/// declaration, closing the channel, so each declaration has a channel of its own.
pub async fn declare_queue(conn: &lapin::Connection, queue: &str) -> Result<(), String> {
    let name = short("the queue name", queue)?;
    let channel = conn.create_channel().await.map_err(|e| format!("cannot open a channel: {e}"))?;
    let durable = ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() };
    if let Err(e) = channel.exchange_declare(name.clone(), ExchangeKind::Direct, durable, FieldTable::default()).await {
        if is_precondition(&e) {
            return declare_existing(conn, queue).await;
        }
        return Err(format!("cannot declare exchange {queue:?}: {e}"));
    }
    let options = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
    match channel.queue_declare(name.clone(), options, FieldTable::default()).await {
        Ok(_) => {}
        Err(e) if is_precondition(&e) => return declare_existing(conn, queue).await,
        Err(e) => return Err(format!("cannot declare queue {queue:?}: {e}")),
    }
    channel
        .queue_bind(name.clone(), name.clone(), name, QueueBindOptions::default(), FieldTable::default())
        .await
        .map_err(|e| format!("cannot bind queue {queue:?} to exchange {queue:?}: {e}"))?;
    let _ = channel.close(200, ShortString::from("declared")).await;
    Ok(())
}

fn is_precondition(e: &lapin::Error) -> bool {
    e.to_string().contains("PRECONDITION_FAILED")
}

/// A queue declared by someone else with other arguments: it must exist (a passive declare).
async fn declare_existing(conn: &lapin::Connection, queue: &str) -> Result<(), String> {
    let channel = conn.create_channel().await.map_err(|e| format!("cannot open a channel: {e}"))?;
    let passive = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
    channel.queue_declare(short("the queue name", queue)?, passive, FieldTable::default()).await.map_err(|e| format!("queue {queue:?}: {e}"))?;
    let _ = channel.close(200, ShortString::from("declared")).await;
    Ok(())
}

/// Declares the queue where a message waits `hold` at a time for a far eta: it has no consumer,
/// and every message in it goes back to `queue` after `hold` (one TTL for the whole queue, so
/// that the broker expires them in order).
pub async fn declare_delay_queue(conn: &lapin::Connection, queue: &str, hold: Duration) -> Result<String, String> {
    let delay = delay_queue(queue);
    let channel = conn.create_channel().await.map_err(|e| format!("cannot open a channel: {e}"))?;
    let mut args = FieldTable::default();
    args.insert(ShortString::from("x-message-ttl"), AMQPValue::LongLongInt(hold.as_millis() as i64));
    args.insert(ShortString::from("x-dead-letter-exchange"), AMQPValue::LongString(LongString::from(Vec::new())));
    args.insert(ShortString::from("x-dead-letter-routing-key"), AMQPValue::LongString(LongString::from(queue.as_bytes().to_vec())));
    let options = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
    channel.queue_declare(short("the delay queue name", &delay)?, options, args).await.map_err(|e| format!("cannot declare queue {delay:?}: {e}"))?;
    let _ = channel.close(200, ShortString::from("declared")).await;
    Ok(delay)
}

/// The name of `queue`'s delay queue.
pub fn delay_queue(queue: &str) -> String {
    format!("{queue}.rustomnic.delay")
}

/// The results that reached this process's reply queues (the RPC backend), by task id, until
/// `result` reads them: the latest state of each task.
#[derive(Default)]
pub struct Replies {
    states: Mutex<HashMap<String, Json>>,
    arrived: tokio::sync::Notify,
}

/// The most results kept unread; beyond it the oldest (by no particular order) are dropped.
const MAX_UNREAD: usize = 100_000;

impl Replies {
    /// Records a result document sent under `correlation_id`.
    fn record(&self, correlation_id: &str, meta: Json) {
        let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        if states.len() >= MAX_UNREAD && !states.contains_key(correlation_id) {
            if let Some(k) = states.keys().next().cloned() {
                states.remove(&k);
                tracing::warn!("celery: over {MAX_UNREAD} results arrived and were never read; dropped the one of task {k}");
            }
        }
        states.insert(correlation_id.to_string(), meta);
        drop(states);
        self.arrived.notify_waiters();
    }

    /// The ready result of task `id` (taken: read once), or None.
    pub fn take_ready(&self, id: &str) -> Option<Json> {
        let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        let ready = states.get(id).and_then(|m| m.get("status")).and_then(Json::as_str).is_some_and(|s| matches!(s, "SUCCESS" | "FAILURE" | "REVOKED"));
        if ready {
            states.remove(id)
        } else {
            None
        }
    }

    /// Waits until a result arrives (any), or `timeout`.
    pub async fn wait(&self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.arrived.notified()).await;
    }
}

/// Declares a reply queue as Celery's client does (durable, deleted when unused, expiring
/// after `expires`) and consumes it into `replies`. Returns its name.
pub async fn reply_queue(conn: &lapin::Connection, replies: Arc<Replies>, expires: Duration) -> Result<(String, Channel), String> {
    let name = uuid::Uuid::new_v4().to_string();
    let channel = conn.create_channel().await.map_err(|e| format!("cannot open a channel: {e}"))?;
    let mut args = FieldTable::default();
    args.insert(ShortString::from("x-expires"), AMQPValue::LongLongInt(expires.as_millis().max(1000) as i64));
    let options = QueueDeclareOptions { durable: true, auto_delete: true, ..QueueDeclareOptions::default() };
    channel.queue_declare(short("the reply queue", &name)?, options, args).await.map_err(|e| format!("cannot declare the reply queue: {e}"))?;
    let consume = BasicConsumeOptions { no_ack: true, ..BasicConsumeOptions::default() };
    let mut consumer = channel
        .basic_consume(short("the reply queue", &name)?, ShortString::default(), consume, FieldTable::default())
        .await
        .map_err(|e| format!("cannot consume the reply queue: {e}"))?;
    // Read on a task of the connection's runtime, whichever pooled connection waits for it.
    tokio::spawn(async move {
        while let Some(Ok(d)) = consumer.next().await {
            let Some(id) = d.properties.correlation_id().as_ref().map(|c| c.as_str().to_string()) else { continue };
            match serde_json::from_slice::<Json>(&d.data) {
                Ok(meta) => replies.record(&id, meta),
                Err(e) => tracing::warn!("celery: a reply for task {id} is not a result document ({e}); ignored"),
            }
        }
    });
    Ok((name, channel))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    #[test]
    fn headers_round_trip() {
        let h = json!({"task": "tasks.add", "id": "x", "retries": 2, "eta": null, "timelimit": [30, 20.5], "stamps": {"a": true}});
        let Json::Object(m) = h else { panic!() };
        let t = headers_table(&m).unwrap();
        assert_eq!(table_json(&t, 0).unwrap(), m);
        let long = "k".repeat(256);
        let mut bad = Map::new();
        bad.insert(long, Json::Null);
        assert!(headers_table(&bad).unwrap_err().contains("256 bytes"));
        let mut deep = json!(1);
        for _ in 0..(MAX_DEPTH + 2) {
            deep = json!([deep]);
        }
        let mut m = Map::new();
        m.insert("d".into(), deep);
        assert!(headers_table(&m).is_err());
    }

    #[test]
    fn only_the_named_headers_are_converted_and_a_deep_one_among_them_is_refused() {
        let h = json!({"task": "tasks.add", "id": "x", "retries": 2, "argsrepr": "(1,)", "stamps": {"a": true}});
        let Json::Object(m) = h else { panic!() };
        let mut t = headers_table(&m).unwrap();
        let only = table_json_only(&t, &["task", "retries", "eta"]).unwrap();
        assert_eq!(Json::Object(only), json!({"task": "tasks.add", "retries": 2}));
        // A header nested past MAX_DEPTH (as a broker may deliver it) is refused when it is read,
        // named in the error, and left alone when it is not.
        let mut deep = AMQPValue::LongLongInt(1);
        for _ in 0..(MAX_DEPTH + 2) {
            let mut a = FieldArray::default();
            a.push(deep);
            deep = AMQPValue::FieldArray(a);
        }
        t.insert(ShortString::from("deep"), deep);
        assert!(table_json_only(&t, &["task", "id"]).is_ok());
        assert!(table_json_only(&t, &["task", "deep"]).unwrap_err().contains("nested deeper"));
        assert!(table_json(&t, 0).is_err());
    }

    #[test]
    fn replies_keep_the_latest_state_until_ready() {
        let r = Replies::default();
        r.record("a", json!({"status": "STARTED"}));
        assert!(r.take_ready("a").is_none());
        r.record("a", json!({"status": "SUCCESS", "result": 5}));
        assert_eq!(r.take_ready("a").unwrap()["result"], 5);
        assert!(r.take_ready("a").is_none(), "read once");
    }
}
