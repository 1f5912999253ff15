//! The `celery` resource: Lua sends Celery tasks to Python workers (or to other cages' celery
//! interfaces) through a Redis or AMQP broker, **at commit** (a rollback sends nothing), and
//! reads their results from the Redis result backend or, on AMQP, the RPC backend. `message` is
//! Celery's wire format and `amqp` its AMQP side, both shared with the celery interface. See
//! docs/resources/celery.md and decisions 132 and 133.
//!
//! ```toml
//! [resources.py]
//! protocol = "celery"
//! broker = "redis://127.0.0.1:6379/0"          # required; redis:// or amqp://
//! result_backend = "redis://127.0.0.1:6379/0"  # default: the broker on Redis, "rpc://" on AMQP
//! queue = "celery"                             # default queue of send_task
//! ```
//!
//! Methods: `send_task(name [, args [, kwargs [, options]]])` → the task id (the message goes at
//! commit); options `queue`, `task_id`, `countdown` (seconds), `eta` (RFC 3339), `expires`
//! (seconds or RFC 3339), `priority` (0-9, passed on as Celery does). `result(id [, timeout])` →
//! the task's result once it is ready (`timeout` seconds, default 10, at most 3600), an error
//! with the Python exception's type as its code for a failed task.
//! `chain{step, ...}` and `group{step, ...}` send a Celery chain or group (each step as
//! send_task takes it).

pub mod amqp;
pub mod message;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::future::LocalBoxFuture;
use redis::aio::MultiplexedConnection;
use redis::AsyncCommands;
use rustomnic_core::{Section, Value};
use rustomnic_resource::{Connection, Error, Resource, ResourceProtocol};
use rustomnic_resource_amqp::client::{self, AmqpUrl};
use rustomnic_resource_amqp::lapin;
use serde_json::Value as Json;

/// The keys this protocol reads itself (the pool keys are read by the runtime).
pub const KEYS: &[&str] = &["broker", "result_backend", "queue", "result_expires"];

/// How often `result` looks for a result that is not ready yet on Redis.
const POLL: Duration = Duration::from_millis(50);
/// The longest `result` waits.
const MAX_WAIT: f64 = 3600.0;

/// The `celery` resource protocol.
pub struct Celery;

/// A broker, from its URL.
#[derive(Clone, Debug)]
pub enum Broker {
    Redis(String),
    Amqp(AmqpUrl),
}

impl Broker {
    /// The broker as logs name it (no credentials).
    pub fn display(&self) -> String {
        match self {
            Broker::Redis(url) => redis_display(url),
            Broker::Amqp(u) => format!("amqp://{}", u.display),
        }
    }
}

/// Where results go.
#[derive(Clone, Debug, PartialEq)]
pub enum Backend {
    Redis(String),
    /// Each client's own reply queue on the AMQP broker (Celery's `rpc://`).
    Rpc,
    None,
}

/// A Redis URL without its password.
pub fn redis_display(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => format!("{}{}", &url[..scheme + 3], &url[at + 1..]),
        _ => url.to_string(),
    }
}

/// A broker URL: redis:// or amqp:// (Celery's pyamqp:// is taken as amqp://), or why not.
pub fn parse_broker(url: &str) -> Result<Broker, String> {
    if let Some(rest) = url.strip_prefix("pyamqp://") {
        return parse_broker(&format!("amqp://{rest}"));
    }
    if url.starts_with("amqp://") || url.starts_with("amqps://") {
        // Celery writes the default vhost as "//": the path after the host is "/".
        let text = match url.strip_suffix("//") {
            Some(base) if !base.ends_with(':') => format!("{base}/%2f"),
            _ => url.to_string(),
        };
        return client::parse_url(&text).map(Broker::Amqp).map_err(|e| format!("{}: {e}", redis_display(url)));
    }
    check_redis_url(url).map(|()| Broker::Redis(url.to_string()))
}

/// How long a Redis reply may take. The library's default (500 ms) cut large task messages and
/// batches short on a loaded machine: the take had run, its reply was lost, and the messages
/// waited out the visibility timeout.
const REDIS_REPLY: Duration = Duration::from_secs(60);
const REDIS_CONNECT: Duration = Duration::from_secs(10);

/// A connection to the Redis at `url` (broker or result backend), every reply bounded by a
/// minute; errors name the server without its password.
pub async fn redis_connect(url: &str) -> Result<MultiplexedConnection, String> {
    let client = redis::Client::open(url).map_err(|e| format!("{}: {e}", redis_display(url)))?;
    let config = redis::AsyncConnectionConfig::new().set_connection_timeout(Some(REDIS_CONNECT)).set_response_timeout(Some(REDIS_REPLY));
    client.get_multiplexed_async_connection_with_config(&config).await.map_err(|e| format!("{}: {e}", redis_display(url)))
}

/// A redis:// URL, or why not.
pub fn check_redis_url(url: &str) -> Result<(), String> {
    if !url.starts_with("redis://") {
        return Err(format!("{:?} is not a redis:// or amqp:// URL such as \"redis://127.0.0.1:6379/0\"", redis_display(url)));
    }
    redis::Client::open(url).map(|_| ()).map_err(|e| format!("{:?}: {e}", redis_display(url)))
}

/// The `result_backend` key beside `broker`: "none", "rpc://" (an AMQP broker only) or a
/// redis:// URL; by default the broker itself on Redis, the RPC backend on AMQP. Problems are
/// recorded in the section.
pub fn read_backend(section: &Section, broker: Option<&Broker>) -> Option<Backend> {
    match section.string("result_backend") {
        Some(b) if b.value == "none" => Some(Backend::None),
        Some(b) if b.value == "rpc://" => match broker {
            Some(Broker::Amqp(_)) => Some(Backend::Rpc),
            Some(Broker::Redis(_)) => {
                section.error("result_backend", "\"rpc://\" needs an AMQP broker (amqp://); with Redis give a redis:// URL");
                None
            }
            None => None,
        },
        Some(b) => match check_redis_url(&b.value) {
            Ok(()) => Some(Backend::Redis(b.value)),
            Err(e) => {
                section.error("result_backend", format!("{e}; or \"rpc://\" (AMQP brokers) or \"none\""));
                None
            }
        },
        None if section.has("result_backend") => None,
        None => match broker? {
            Broker::Redis(url) => Some(Backend::Redis(url.clone())),
            Broker::Amqp(_) => Some(Backend::Rpc),
        },
    }
}

struct Settings {
    broker: Broker,
    backend: Backend,
    queue: String,
    result_expires: Duration,
    /// Results that reached the reply queues of this resource's connections (RPC backend).
    replies: Arc<amqp::Replies>,
}

struct CeleryResource(Arc<Settings>);

impl ResourceProtocol for Celery {
    fn name(&self) -> &'static str {
        "celery"
    }

    fn configure(&self, _resource: &str, section: &Section) -> Option<Arc<dyn Resource>> {
        let broker = section.required_parsed("broker", "\"redis://127.0.0.1:6379/0\"", parse_broker);
        let backend = read_backend(section, broker.as_ref());
        let queue = match section.string("queue") {
            Some(q) if q.value.is_empty() || q.value.contains('\u{6}') || q.value.len() > 255 => {
                section.error("queue", "must be a queue name, e.g. \"celery\"");
                None
            }
            Some(q) => Some(q.value),
            None if section.has("queue") => None,
            None => Some("celery".to_string()),
        };
        let day = Duration::from_secs(86_400);
        let result_expires = section.duration("result_expires", 365 * day).map(|v| v.value).unwrap_or(day);
        let (Some(broker), Some(backend), Some(queue)) = (broker, backend, queue) else { return None };
        Some(Arc::new(CeleryResource(Arc::new(Settings { broker, backend, queue, result_expires, replies: Arc::default() }))))
    }
}

impl Resource for CeleryResource {
    fn connect(&self) -> LocalBoxFuture<'static, Result<Box<dyn Connection>, Error>> {
        let s = self.0.clone();
        Box::pin(async move {
            let open = |url: &str| {
                let url = url.to_string();
                async move { redis_connect(&url).await.map_err(Error::new) }
            };
            let link = match &s.broker {
                Broker::Redis(url) => Link::Redis(open(url).await.map_err(|e| Error::new(format!("broker {}", e.message)))?),
                Broker::Amqp(url) => {
                    let conn = client::connect(url, "pmnc celery resource").await.map_err(Error::new)?;
                    let channel = conn.create_channel().await.map_err(|e| Error::new(format!("broker {}: cannot open a channel: {e}", url.display)))?;
                    channel
                        .confirm_select(lapin::options::ConfirmSelectOptions::default())
                        .await
                        .map_err(|e| Error::new(format!("broker {}: cannot switch on publisher confirms: {e}", url.display)))?;
                    let reply = match s.backend {
                        Backend::Rpc => {
                            let (name, channel) = amqp::reply_queue(&conn, s.replies.clone(), s.result_expires)
                                .await
                                .map_err(|e| Error::new(format!("broker {}: {e}", url.display)))?;
                            Some((name, channel))
                        }
                        _ => None,
                    };
                    Link::Amqp(Box::new(AmqpLink { conn, channel, declared: HashSet::new(), reply }))
                }
            };
            let backend = match &s.backend {
                Backend::Redis(url) => match (&s.broker, &link) {
                    (Broker::Redis(b), Link::Redis(c)) if b == url => Some(c.clone()),
                    _ => Some(open(url).await.map_err(|e| Error::new(format!("result backend {}", e.message)))?),
                },
                _ => None,
            };
            Ok(Box::new(CeleryConnection { settings: s, link, backend, pending: Vec::new() }) as Box<dyn Connection>)
        })
    }

    fn default_pool_size(&self) -> usize {
        4
    }
}

/// A pooled connection's link to its broker.
enum Link {
    Redis(MultiplexedConnection),
    Amqp(Box<AmqpLink>),
}

struct AmqpLink {
    conn: lapin::Connection,
    /// In confirm mode: the task messages.
    channel: lapin::Channel,
    /// The queues declared on this connection (as Celery's producer declares them).
    declared: HashSet<String>,
    /// The reply queue (RPC backend) and the channel consuming it.
    reply: Option<(String, lapin::Channel)>,
}

/// One pooled connection and the task messages its transaction holds back until the commit.
struct CeleryConnection {
    settings: Arc<Settings>,
    link: Link,
    /// The Redis result backend.
    backend: Option<MultiplexedConnection>,
    pending: Vec<message::Outgoing>,
}

impl CeleryConnection {
    /// The reply queue results come back to (the RPC backend), or "".
    fn reply_queue(&self) -> String {
        match &self.link {
            Link::Amqp(link) => link.reply.as_ref().map(|(name, _)| name.clone()).unwrap_or_default(),
            Link::Redis(_) => String::new(),
        }
    }
}

/// The most steps of one chain or group.
const MAX_STEPS: usize = 10_000;

/// `chain{step, ...}` and `group{step, ...}`: each step `{name [, args [, kwargs [, options]]]}`
/// as `send_task` takes them, with `immutable = true` among a later chain step's options (it
/// does not take the result before it); a later step takes only `queue`, `task_id` and
/// `immutable`.
fn steps_args(method: &str, args: Vec<Value>, default_queue: &str) -> Result<Vec<(message::Outgoing, bool)>, Error> {
    let usage = format!("{method}{{ {{name [, args [, kwargs [, options]]]}}, ... }}");
    let steps = match args.into_iter().next() {
        Some(Value::Array(steps)) if !steps.is_empty() => steps,
        Some(Value::Array(_) | Value::Map(_)) => return Err(Error::new(format!("{method}: give one or more steps: {usage}"))),
        Some(other) => return Err(Error::new(format!("{method}: the steps must be a list, got {}: {usage}", other.type_name()))),
        None => return Err(Error::new(format!("{method}: {usage}"))),
    };
    if steps.len() > MAX_STEPS {
        return Err(Error::new(format!("{method}: {} steps; at most {MAX_STEPS}", steps.len())));
    }
    let now = Utc::now();
    let mut out = Vec::with_capacity(steps.len());
    for (i, step) in steps.into_iter().enumerate() {
        let at = |e: String| Error::new(format!("{method}: step {}: {e}", i + 1));
        let mut parts = positional(step).map_err(at)?;
        let options = parts.get_mut(3).map(std::mem::take).unwrap_or_default();
        let immutable = matches!(options.get("immutable"), Some(Value::Bool(true)));
        let Value::Map(pairs) = options else {
            if !matches!(options, Value::Nil) {
                return Err(at(format!("options must be a table, got {}", options.type_name())));
            }
            out.push((send_task_args(parts, default_queue, now).map_err(at)?, false));
            continue;
        };
        let later = method == "chain" && i > 0;
        if let Some((k, _)) = pairs.iter().find(|(k, _)| later && !matches!(k.as_str(), Some("queue" | "task_id" | "immutable"))) {
            return Err(at(format!(
                "option {} applies to the first step of a chain only (a later step takes queue, task_id, immutable)",
                k.as_str().unwrap_or("?")
            )));
        }
        if !later && pairs.iter().any(|(k, _)| k.as_str() == Some("immutable")) {
            return Err(at("option immutable is for a later step of a chain".into()));
        }
        let kept: Vec<(Value, Value)> = pairs.into_iter().filter(|(k, _)| k.as_str() != Some("immutable")).collect();
        if parts.len() < 4 {
            parts.resize(4, Value::Nil);
        }
        parts[3] = Value::Map(kept);
        out.push((send_task_args(parts, default_queue, now).map_err(at)?, immutable));
    }
    Ok(out)
}

/// A step's positional parts: a list, or a table with holes (`{name, nil, nil, options}`).
fn positional(step: Value) -> Result<Vec<Value>, String> {
    match step {
        Value::Array(parts) => Ok(parts),
        Value::Map(pairs) => {
            let mut parts = vec![Value::Nil; 4];
            for (k, v) in pairs {
                match k {
                    Value::Int(i @ 1..=4) => parts[(i - 1) as usize] = v,
                    other => return Err(format!("a step is {{name [, args [, kwargs [, options]]]}}; it has the key {other:?}")),
                }
            }
            while matches!(parts.last(), Some(Value::Nil)) {
                parts.pop();
            }
            Ok(parts)
        }
        other => Err(format!("a step must be a table {{name [, args [, kwargs [, options]]]}}, got {}", other.type_name())),
    }
}

impl Connection for CeleryConnection {
    fn begin(&mut self) -> LocalBoxFuture<'_, Result<(), Error>> {
        self.pending.clear();
        Box::pin(async { Ok(()) })
    }

    fn call<'a>(&'a mut self, method: &'a str, args: Vec<Value>) -> LocalBoxFuture<'a, Result<Value, Error>> {
        Box::pin(async move {
            match method {
                "send_task" => {
                    let mut out = send_task_args(args, &self.settings.queue, Utc::now()).map_err(|e| Error::new(format!("send_task: {e}")))?;
                    out.reply_to = self.reply_queue();
                    let id = out.id.clone();
                    self.pending.push(out);
                    Ok(Value::str(id))
                }
                "chain" => {
                    let mut steps = steps_args("chain", args, &self.settings.queue)?;
                    let reply_to = self.reply_queue();
                    for (out, _) in &mut steps {
                        out.reply_to = reply_to.clone();
                    }
                    let last = steps.last().map(|(o, _)| o.id.clone()).unwrap_or_default();
                    let mut rest: Vec<Json> = steps.iter().skip(1).map(|(o, immutable)| o.signature(*immutable)).collect();
                    rest.reverse();
                    let (mut first, _) = steps.swap_remove(0);
                    if !rest.is_empty() {
                        first.chain = Json::Array(rest);
                    }
                    self.pending.push(first);
                    Ok(Value::str(last))
                }
                "group" => {
                    let steps = steps_args("group", args, &self.settings.queue)?;
                    let group = uuid::Uuid::new_v4().to_string();
                    let reply_to = self.reply_queue();
                    let mut ids = Vec::with_capacity(steps.len());
                    for (i, (mut out, _)) in steps.into_iter().enumerate() {
                        out.group = Some(group.clone());
                        out.group_index = Some(i as i64);
                        out.reply_to = reply_to.clone();
                        ids.push(Value::str(out.id.clone()));
                        self.pending.push(out);
                    }
                    Ok(Value::Map(vec![(Value::str("id"), Value::str(group)), (Value::str("tasks"), Value::Array(ids))]))
                }
                "result" => {
                    let (id, timeout) = result_args(args)?;
                    match (&self.settings.backend, &mut self.backend) {
                        (Backend::Redis(_), Some(backend)) => redis_result(backend, &id, timeout).await,
                        (Backend::Rpc, _) => rpc_result(&self.settings.replies, &id, timeout).await,
                        _ => Err(Error::new(format!("result of task {id}: this resource has no result backend (result_backend = \"none\")"))),
                    }
                }
                other => Err(Error::new(format!("no method {other} (methods: send_task, chain, group, result)"))),
            }
        })
    }

    fn commit(&mut self) -> LocalBoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            if self.pending.is_empty() {
                return Ok(());
            }
            let pending = std::mem::take(&mut self.pending);
            let broker = self.settings.broker.display();
            match &mut self.link {
                Link::Redis(conn) => {
                    let mut pipe = redis::pipe();
                    pipe.atomic();
                    for out in &pending {
                        pipe.lpush(out.list(), out.envelope()).ignore();
                    }
                    let sent: redis::RedisResult<()> = pipe.query_async(conn).await;
                    sent.map_err(|e| Error::broken(format!("send_task at commit: broker {broker}: {e}")))
                }
                Link::Amqp(link) => {
                    let AmqpLink { conn, channel, declared, .. } = &mut **link;
                    for out in &pending {
                        if !declared.contains(&out.queue) {
                            amqp::declare_queue(conn, &out.queue).await.map_err(|e| Error::broken(format!("send_task at commit: broker {broker}: {e}")))?;
                            declared.insert(out.queue.clone());
                        }
                    }
                    // Every message goes out before any confirm is awaited: one round trip.
                    let mut confirms = Vec::with_capacity(pending.len());
                    for out in &pending {
                        confirms.push(amqp::publish_task(channel, out).await.map_err(|e| Error::broken(format!("send_task at commit: broker {broker}: {e}")))?);
                    }
                    for (out, confirm) in pending.iter().zip(confirms) {
                        amqp::confirmed(confirm, &format!("send_task {} at commit", out.id)).await.map_err(Error::broken)?;
                    }
                    Ok(())
                }
            }
        })
    }

    fn rollback(&mut self) -> LocalBoxFuture<'_, Result<(), Error>> {
        self.pending.clear();
        Box::pin(async { Ok(()) })
    }

    fn is_healthy(&mut self) -> LocalBoxFuture<'_, bool> {
        let ok = match &self.link {
            Link::Redis(_) => true,
            Link::Amqp(l) => l.conn.status().connected() && l.channel.status().connected() && l.reply.as_ref().is_none_or(|(_, c)| c.status().connected()),
        };
        Box::pin(async move { ok })
    }
}

/// `send_task(name [, args [, kwargs [, options]]])`: the message.
fn send_task_args(args: Vec<Value>, default_queue: &str, now: DateTime<Utc>) -> Result<message::Outgoing, String> {
    let mut it = args.into_iter();
    let name = match it.next() {
        Some(Value::Str(n)) if !n.is_empty() => String::from_utf8(n).map_err(|_| "the task name is not UTF-8".to_string())?,
        Some(other) => return Err(format!("the task name must be a string, got {}", other.type_name())),
        None => return Err("a task name is required: send_task(name [, args [, kwargs [, options]]])".into()),
    };
    let args = match it.next().unwrap_or_default() {
        Value::Nil => Vec::new(),
        Value::Array(a) => a.iter().map(Value::to_json).collect::<Result<_, _>>()?,
        Value::Map(m) if m.is_empty() => Vec::new(),
        other => return Err(format!("args must be a list, got {}", other.type_name())),
    };
    let kwargs = match it.next().unwrap_or_default() {
        Value::Nil => serde_json::json!({}),
        Value::Array(a) if a.is_empty() => serde_json::json!({}),
        m @ Value::Map(_) => m.to_json()?,
        other => return Err(format!("kwargs must be a table of names, got {}", other.type_name())),
    };
    let options = it.next().unwrap_or_default();
    let option = |k: &str| options.get(k).cloned().unwrap_or_default();
    let text = |k: &str| -> Result<Option<String>, String> {
        match option(k) {
            Value::Nil => Ok(None),
            Value::Str(s) => String::from_utf8(s).map(Some).map_err(|_| format!("option {k} is not UTF-8")),
            other => Err(format!("option {k} must be a string, got {}", other.type_name())),
        }
    };
    let seconds = |k: &str| -> Result<Option<f64>, String> {
        match option(k) {
            Value::Nil => Ok(None),
            Value::Int(n) if n >= 0 => Ok(Some(n as f64)),
            Value::Float(f) if f.is_finite() && f >= 0.0 => Ok(Some(f)),
            other => Err(format!("option {k} must be a number of seconds >= 0, got {}", other.type_name())),
        }
    };
    let after = |s: f64| now + chrono::Duration::milliseconds((s.min(1e9) * 1000.0) as i64);
    let time = |k: &str, t: String| message::parse_time(&t).ok_or_else(|| format!("option {k}: {t:?} is not an RFC 3339 time"));
    if !matches!(options, Value::Nil | Value::Map(_)) {
        return Err(format!("options must be a table, got {}", options.type_name()));
    }
    if let Value::Map(pairs) = &options {
        for (k, _) in pairs {
            let k = k.as_str().unwrap_or("?");
            if !["queue", "task_id", "countdown", "eta", "expires", "priority"].contains(&k) {
                return Err(format!("unknown option {k} (known: queue, task_id, countdown, eta, expires, priority)"));
            }
        }
    }
    let eta = match (seconds("countdown")?, text("eta")?) {
        (Some(_), Some(_)) => return Err("give countdown or eta, not both".into()),
        (Some(c), None) => Some(after(c)),
        (None, Some(t)) => Some(time("eta", t)?),
        (None, None) => None,
    };
    let expires = match option("expires") {
        Value::Str(_) => Some(time("expires", text("expires")?.unwrap_or_default())?),
        Value::Nil => None,
        _ => seconds("expires")?.map(after),
    };
    let priority = match option("priority") {
        Value::Nil => 0,
        Value::Int(p) if (0..=9).contains(&p) => p as u8,
        other => return Err(format!("option priority must be an integer 0..9, got {}", other.type_name())),
    };
    let queue = text("queue")?.unwrap_or_else(|| default_queue.to_string());
    if queue.is_empty() || queue.contains('\u{6}') || queue.len() > 255 {
        return Err(format!("option queue: {queue:?} is not a queue name"));
    }
    let id = text("task_id")?.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    Ok(message::Outgoing {
        name,
        id,
        args,
        kwargs,
        chain: Json::Null,
        root_id: None,
        parent_id: None,
        group: None,
        group_index: None,
        queue,
        eta,
        expires,
        priority,
        reply_to: String::new(),
    })
}

/// `result(id [, timeout])`: the task id and the seconds to wait.
fn result_args(args: Vec<Value>) -> Result<(String, f64), Error> {
    let mut it = args.into_iter();
    let id = match it.next() {
        Some(Value::Str(s)) if !s.is_empty() => String::from_utf8(s).map_err(|_| Error::new("result: the task id is not UTF-8"))?,
        Some(other) => return Err(Error::new(format!("result: the task id must be a string, got {}", other.type_name()))),
        None => return Err(Error::new("result: a task id is required: result(id [, timeout])")),
    };
    let timeout = match it.next().unwrap_or_default() {
        Value::Nil => 10.0,
        Value::Int(n) if n >= 0 => (n as f64).min(MAX_WAIT),
        Value::Float(f) if f.is_finite() && f >= 0.0 => f.min(MAX_WAIT),
        other => return Err(Error::new(format!("result: the timeout must be a number of seconds >= 0, got {}", other.type_name()))),
    };
    Ok((id, timeout))
}

/// Waits for a ready result document in the Redis backend.
async fn redis_result(backend: &mut MultiplexedConnection, id: &str, timeout: f64) -> Result<Value, Error> {
    let key = format!("celery-task-meta-{id}");
    let until = tokio::time::Instant::now() + Duration::from_secs_f64(timeout);
    loop {
        let doc: Option<Vec<u8>> = backend.get(&key).await.map_err(|e| Error::broken(format!("result of task {id}: {e}")))?;
        if let Some(doc) = doc {
            let meta: Json = serde_json::from_slice(&doc).map_err(|e| Error::new(format!("result of task {id}: not a result document: {e}")))?;
            if let Some(outcome) = ready(id, &meta) {
                return outcome;
            }
        }
        if tokio::time::Instant::now() >= until {
            return Err(not_ready(id, timeout));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Waits for a ready result among those that reached this resource's reply queues.
async fn rpc_result(replies: &amqp::Replies, id: &str, timeout: f64) -> Result<Value, Error> {
    let until = tokio::time::Instant::now() + Duration::from_secs_f64(timeout);
    loop {
        if let Some(meta) = replies.take_ready(id) {
            if let Some(outcome) = ready(id, &meta) {
                return outcome;
            }
        }
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return Err(not_ready(id, timeout));
        }
        // A result may arrive between the look and the wait: the wait is short.
        replies.wait(left.min(POLL)).await;
    }
}

fn not_ready(id: &str, timeout: f64) -> Error {
    Error::new(format!("result of task {id}: not ready after {timeout}s"))
}

/// The outcome a ready result document gives (None when it is not ready): its value, or for a
/// failure an error whose code is the Python exception's type.
fn ready(id: &str, meta: &Json) -> Option<Result<Value, Error>> {
    match meta.get("status").and_then(Json::as_str).unwrap_or("") {
        "SUCCESS" => Some(Ok(Value::from_json(meta.get("result").unwrap_or(&Json::Null)))),
        status @ ("FAILURE" | "REVOKED") => {
            let r = meta.get("result");
            let kind = r.and_then(|r| r.get("exc_type")).and_then(Json::as_str).unwrap_or(status).to_string();
            let text = match r.and_then(|r| r.get("exc_message")) {
                Some(Json::Array(parts)) => {
                    parts.iter().map(|p| p.as_str().map(str::to_string).unwrap_or_else(|| p.to_string())).collect::<Vec<_>>().join(", ")
                }
                Some(Json::String(s)) => s.clone(),
                Some(other) => other.to_string(),
                None => String::new(),
            };
            let mut e = Error::new(format!("task {id} {}: {kind}: {text}", status.to_lowercase()));
            e.code = Some(kind);
            Some(Err(e))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn send_task_arguments() {
        let now = message::parse_time("2026-12-06T10:00:00+00:00").unwrap();
        let opts = Value::Map(vec![(Value::str("countdown"), Value::Int(5)), (Value::str("priority"), Value::Int(6)), (Value::str("queue"), Value::str("py"))]);
        let out = send_task_args(vec![Value::str("tasks.mul"), Value::Array(vec![Value::Int(6), Value::Int(7)]), Value::Nil, opts], "celery", now).unwrap();
        let (list, id, env) = (out.list(), out.id.clone(), out.envelope());
        assert_eq!(list, "py\u{6}\u{16}6");
        let env = message::envelope(env.as_bytes(), "py").unwrap();
        let t = message::task(&env, 1 << 20, |_| true).unwrap();
        assert_eq!((t.id, t.name.as_str(), t.args.clone(), t.root_id.as_str() == id), (id.clone(), "tasks.mul", vec![Value::Int(6), Value::Int(7)], true));
        assert_eq!(t.eta, message::parse_time("2026-12-06T10:00:05+00:00"));
        for (args, want) in [
            (vec![], "a task name is required"),
            (vec![Value::Int(1)], "the task name must be a string"),
            (vec![Value::str("t"), Value::str("x")], "args must be a list"),
            (vec![Value::str("t"), Value::Nil, Value::Nil, Value::Map(vec![(Value::str("cowntdown"), Value::Int(1))])], "unknown option cowntdown"),
            (vec![Value::str("t"), Value::Nil, Value::Nil, Value::Map(vec![(Value::str("priority"), Value::Int(10))])], "priority must be an integer 0..9"),
            (vec![Value::str("t"), Value::Nil, Value::Nil, Value::Map(vec![(Value::str("eta"), Value::str("soon"))])], "is not an RFC 3339 time"),
        ] {
            let e = send_task_args(args, "celery", now).unwrap_err();
            assert!(e.contains(want), "{e}");
        }
    }

    fn step(name: &str, args: Vec<Value>, options: Option<Value>) -> Value {
        let mut parts = vec![Value::str(name), Value::Array(args)];
        if let Some(o) = options {
            parts.push(Value::Nil);
            parts.push(o);
        }
        Value::Array(parts)
    }

    #[test]
    fn chains_and_groups_from_lua() {
        let immutable = Value::Map(vec![(Value::str("immutable"), Value::Bool(true)), (Value::str("queue"), Value::str("other"))]);
        let steps = Value::Array(vec![
            step("t.a", vec![Value::Int(1)], None),
            step("t.b", vec![Value::Int(2)], None),
            step("t.c", vec![Value::Int(3)], Some(immutable)),
        ]);
        let mut parsed = steps_args("chain", vec![steps], "celery").unwrap();
        assert_eq!(parsed.iter().map(|(_, i)| *i).collect::<Vec<_>>(), vec![false, false, true]);
        let mut rest: Vec<Json> = parsed.iter().skip(1).map(|(o, i)| o.signature(*i)).collect();
        rest.reverse();
        let (mut first, _) = parsed.remove(0);
        first.chain = Json::Array(rest);
        let a = message::task(&message::envelope(first.envelope().as_bytes(), "celery").unwrap(), 1 << 20, |_| true).unwrap();
        let b = message::next_step(&a, &serde_json::json!(10), "celery").unwrap();
        assert_eq!((b.name.as_str(), b.args.clone(), b.id.as_str()), ("t.b", vec![serde_json::json!(10), serde_json::json!(2)], parsed[0].0.id.as_str()));
        let b = message::task(&message::envelope(b.envelope().as_bytes(), "celery").unwrap(), 1 << 20, |_| true).unwrap();
        let c = message::next_step(&b, &serde_json::json!(20), "celery").unwrap();
        assert_eq!((c.name.as_str(), c.args.clone(), c.queue.as_str()), ("t.c", vec![serde_json::json!(3)], "other"), "immutable: no result first");
        for (steps, want) in [
            (Value::Array(vec![]), "give one or more steps"),
            (Value::str("x"), "the steps must be a list"),
            (Value::Array(vec![Value::Int(1)]), "step 1: a step must be a table"),
            (
                Value::Array(vec![step("t.a", vec![], None), step("t.b", vec![], Some(Value::Map(vec![(Value::str("countdown"), Value::Int(5))])))]),
                "step 2: option countdown applies to the first step of a chain only",
            ),
            (Value::Array(vec![step("t.a", vec![], Some(Value::Map(vec![(Value::str("immutable"), Value::Bool(true))])))]), "immutable is for a later step"),
        ] {
            let e = steps_args("chain", vec![steps], "celery").err().unwrap().message;
            assert!(e.contains(want), "{e}");
        }
        let group = steps_args("group", vec![Value::Array(vec![step("t.a", vec![], None), step("t.a", vec![], None)])], "celery").unwrap();
        assert_eq!(group.len(), 2);
        assert_ne!(group[0].0.id, group[1].0.id);
    }
}
