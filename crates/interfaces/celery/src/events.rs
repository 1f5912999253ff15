//! Celery's monitoring events (shared/design/celery-protocol.md §7), sent when `send_events` is
//! on so that Flower and `celery events` see this worker and its tasks: worker-online, a
//! heartbeat every 2 seconds, worker-offline, and per task received and started (one
//! `task.multi`), then succeeded, failed or retried. On Redis they are published on kombu's
//! fanout channel `/<db>.celeryev/<routing key>` in kombu's envelope; on AMQP to the topic
//! exchange `celeryev`. Events are best effort, as Celery's are: one that cannot be sent is
//! dropped (logged once per session), never retried, and never holds a task.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use redis::aio::MultiplexedConnection;
use rustomnic_resource_amqp::lapin;
use rustomnic_resource_amqp::lapin::options::{BasicPublishOptions, ExchangeDeclareOptions};
use rustomnic_resource_amqp::lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use rustomnic_resource_amqp::lapin::{BasicProperties, ExchangeKind};
use rustomnic_resource_celery::message::{format_time, Task};
use serde_json::{json, Map, Value as Json};

/// How often a heartbeat goes out (Celery's default; Flower marks a worker offline after a few
/// missed ones).
pub(crate) const HEARTBEAT: Duration = Duration::from_secs(2);
const EXCHANGE: &str = "celeryev";

/// Where events go.
pub(crate) enum Sink {
    Redis { conn: MultiplexedConnection, db: i64 },
    Amqp(lapin::Channel),
}

/// What the sessions of one worker share of its events (on AMQP a session runs on each worker
/// thread, and Flower is to see one worker): Celery's Lamport clock, one more per event, and the
/// task counts its heartbeats carry.
#[derive(Default)]
pub(crate) struct Counters {
    clock: AtomicU64,
    processed: AtomicU64,
    active: AtomicI64,
}

/// A session's events.
pub(crate) struct Events {
    hostname: String,
    pid: u32,
    counters: std::sync::Arc<Counters>,
    /// This session says the worker online, beats its heartbeat and says it offline (one of the
    /// sessions that share `counters`).
    pub announces: bool,
    sink: Sink,
    /// A failure to send was logged in this session.
    warned: AtomicBool,
}

/// Declares the `celeryev` exchange as Celery does (topic, durable).
pub(crate) async fn declare_amqp(conn: &lapin::Connection) -> Result<lapin::Channel, String> {
    let channel = conn.create_channel().await.map_err(|e| format!("cannot open a channel: {e}"))?;
    let durable = ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() };
    channel
        .exchange_declare(ShortString::from(EXCHANGE), ExchangeKind::Topic, durable, FieldTable::default())
        .await
        .map_err(|e| format!("cannot declare exchange {EXCHANGE}: {e}"))?;
    Ok(channel)
}

fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// The load averages, as Celery reports them.
fn loadavg() -> Json {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    Json::Array(text.split_whitespace().take(3).filter_map(|v| v.parse::<f64>().ok()).map(|v| json!(v)).collect())
}

impl Events {
    /// The events of a session that is the worker's only one.
    pub fn new(hostname: String, sink: Sink) -> Events {
        Events::shared(hostname, sink, Default::default(), true)
    }

    /// The events of one of the worker's sessions, which share `counters`; the one that
    /// `announces` speaks for the worker.
    pub fn shared(hostname: String, sink: Sink, counters: std::sync::Arc<Counters>, announces: bool) -> Events {
        Events { hostname, pid: std::process::id(), counters, announces, sink, warned: AtomicBool::new(false) }
    }

    /// An event of `kind` with the fields every event has.
    fn event(&self, kind: &str, fields: Map<String, Json>) -> Json {
        let mut e = Map::new();
        e.insert("hostname".into(), json!(self.hostname));
        e.insert("utcoffset".into(), json!(0.0));
        e.insert("pid".into(), json!(self.pid));
        e.insert("clock".into(), json!(self.counters.clock.fetch_add(1, Ordering::Relaxed) + 1));
        e.extend(fields);
        e.insert("timestamp".into(), json!(now()));
        e.insert("type".into(), json!(kind));
        Json::Object(e)
    }

    fn worker(&self, kind: &str) -> Json {
        let fields = json!({
            "freq": HEARTBEAT.as_secs_f64(), "active": self.counters.active.load(Ordering::Relaxed).max(0),
            "processed": self.counters.processed.load(Ordering::Relaxed), "loadavg": loadavg(),
            "sw_ident": "rustomnic", "sw_ver": env!("CARGO_PKG_VERSION"), "sw_sys": std::env::consts::OS,
        });
        self.event(kind, fields.as_object().cloned().unwrap_or_default())
    }

    pub async fn online(&self) {
        self.send("worker.online", self.worker("worker-online")).await;
    }

    pub async fn heartbeat(&self) {
        self.send("worker.heartbeat", self.worker("worker-heartbeat")).await;
    }

    pub async fn offline(&self) {
        self.send("worker.offline", self.worker("worker-offline")).await;
    }

    /// A task taken and starting: received and started in one `task.multi`.
    pub async fn started(&self, task: &Task) {
        self.counters.active.fetch_add(1, Ordering::Relaxed);
        let args = Json::Array(task.args.iter().filter_map(|a| a.to_json().ok()).collect()).to_string();
        let kwargs = task.kwargs.to_json().map(|k| k.to_string()).unwrap_or_else(|_| "{}".into());
        let received = self.event(
            "task-received",
            json!({
                "uuid": task.id, "name": task.name, "args": args, "kwargs": kwargs, "root_id": task.root_id,
                "parent_id": null, "retries": task.retries, "eta": task.eta.map(format_time), "expires": task.expires.map(format_time),
            })
            .as_object()
            .cloned()
            .unwrap_or_default(),
        );
        let started = self.event("task-started", json!({"uuid": task.id}).as_object().cloned().unwrap_or_default());
        self.send("task.multi", json!([received, started])).await;
    }

    /// A task finished: `state` SUCCESS (with `result`), FAILURE or RETRY (with the exception's
    /// text and the traceback).
    pub async fn finished(&self, task: &Task, state: &str, detail: &str, traceback: Option<&str>, runtime: Duration) {
        self.counters.active.fetch_sub(1, Ordering::Relaxed);
        self.counters.processed.fetch_add(1, Ordering::Relaxed);
        let (key, kind, fields) = match state {
            "SUCCESS" => ("task.succeeded", "task-succeeded", json!({"uuid": task.id, "result": detail, "runtime": runtime.as_secs_f64()})),
            "RETRY" => ("task.retried", "task-retried", json!({"uuid": task.id, "exception": detail, "traceback": traceback})),
            _ => ("task.failed", "task-failed", json!({"uuid": task.id, "exception": detail, "traceback": traceback})),
        };
        let event = self.event(kind, fields.as_object().cloned().unwrap_or_default());
        self.send(key, event).await;
    }

    async fn send(&self, routing_key: &str, body: Json) {
        let body = body.to_string();
        let sent = match &self.sink {
            Sink::Redis { conn, db } => {
                let envelope = json!({
                    "body": base64::engine::general_purpose::STANDARD.encode(&body),
                    "content-encoding": "utf-8", "content-type": "application/json",
                    "headers": {"hostname": self.hostname},
                    "properties": {
                        "delivery_mode": 1, "delivery_info": {"exchange": EXCHANGE, "routing_key": routing_key},
                        "priority": 0, "body_encoding": "base64", "delivery_tag": uuid::Uuid::new_v4().to_string(),
                    },
                })
                .to_string();
                let mut conn = conn.clone();
                let channel = format!("/{db}.{EXCHANGE}/{routing_key}");
                redis::cmd("PUBLISH").arg(channel).arg(envelope).query_async::<i64>(&mut conn).await.map(|_| ()).map_err(|e| e.to_string())
            }
            Sink::Amqp(channel) => {
                let mut headers = FieldTable::default();
                headers.insert(ShortString::from("hostname"), AMQPValue::LongString(LongString::from(self.hostname.as_bytes().to_vec())));
                let properties = BasicProperties::default()
                    .with_content_type(ShortString::from("application/json"))
                    .with_content_encoding(ShortString::from("utf-8"))
                    .with_delivery_mode(1)
                    .with_headers(headers);
                channel
                    .basic_publish(ShortString::from(EXCHANGE), ShortString::from(routing_key), BasicPublishOptions::default(), body.as_bytes(), properties)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
        };
        if let Err(e) = sent {
            if !self.warned.swap(true, Ordering::Relaxed) {
                tracing::warn!("celery: cannot send the event {routing_key} ({e}); events are dropped while this lasts");
            }
        }
    }
}
