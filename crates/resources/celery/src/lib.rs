//! The `celery` resource: Lua sends Celery tasks to Python workers (or to other cages' celery
//! interfaces) through a Redis broker, **at commit** (a rollback sends nothing), and reads their
//! results from the Redis result backend. `message` is Celery's wire format, shared with the
//! celery interface. See docs/resources/celery.md and decision 132.
//!
//! ```toml
//! [resources.py]
//! protocol = "celery"
//! broker = "redis://127.0.0.1:6379/0"          # required; redis://
//! result_backend = "redis://127.0.0.1:6379/0"  # default: the broker
//! queue = "celery"                             # default queue of send_task
//! ```
//!
//! Methods: `send_task(name [, args [, kwargs [, options]]])` → the task id (the message goes at
//! commit); options `queue`, `task_id`, `countdown` (seconds), `eta` (RFC 3339), `expires`
//! (seconds or RFC 3339), `priority` (0-9, 0 first as on Redis). `result(id [, timeout])` → the
//! task's result once it is ready (`timeout` seconds, default 10, at most 3600), an error with
//! the Python exception's type as its code for a failed task.

pub mod message;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::future::LocalBoxFuture;
use redis::aio::MultiplexedConnection;
use redis::AsyncCommands;
use rustomnic_core::{Section, Value};
use rustomnic_resource::{Connection, Error, Resource, ResourceProtocol};
use serde_json::Value as Json;

/// The keys this protocol reads itself (the pool keys are read by the runtime).
pub const KEYS: &[&str] = &["broker", "result_backend", "queue"];

/// How often `result` looks for a result that is not ready yet.
const POLL: Duration = Duration::from_millis(50);
/// The longest `result` waits.
const MAX_WAIT: f64 = 3600.0;

/// The `celery` resource protocol.
pub struct Celery;

struct Settings {
    broker: String,
    backend: String,
    queue: String,
}

struct CeleryResource(Arc<Settings>);

/// A redis:// URL, or why not.
pub fn check_redis_url(url: &str) -> Result<(), String> {
    if url.starts_with("amqp://") || url.starts_with("amqps://") || url.starts_with("pyamqp://") {
        return Err(format!("{url:?}: only a Redis broker is served so far (redis://host:6379/0); AMQP is not yet"));
    }
    if !url.starts_with("redis://") {
        return Err(format!("{url:?} is not a redis:// URL such as \"redis://127.0.0.1:6379/0\""));
    }
    redis::Client::open(url).map(|_| ()).map_err(|e| format!("{url:?}: {e}"))
}

impl ResourceProtocol for Celery {
    fn name(&self) -> &'static str {
        "celery"
    }

    fn configure(&self, _resource: &str, section: &Section) -> Option<Arc<dyn Resource>> {
        let broker = section.required_parsed("broker", "\"redis://127.0.0.1:6379/0\"", |u| check_redis_url(u).map(|()| u.to_string()));
        let backend = match section.string("result_backend") {
            Some(b) => match check_redis_url(&b.value) {
                Ok(()) => Some(b.value),
                Err(e) => {
                    section.error("result_backend", e);
                    None
                }
            },
            None if section.has("result_backend") => None,
            None => broker.clone(),
        };
        let queue = match section.string("queue") {
            Some(q) if q.value.is_empty() || q.value.contains('\u{6}') => {
                section.error("queue", "must be a queue name, e.g. \"celery\"");
                None
            }
            Some(q) => Some(q.value),
            None if section.has("queue") => None,
            None => Some("celery".to_string()),
        };
        let (Some(broker), Some(backend), Some(queue)) = (broker, backend, queue) else { return None };
        Some(Arc::new(CeleryResource(Arc::new(Settings { broker, backend, queue }))))
    }
}

impl Resource for CeleryResource {
    fn connect(&self) -> LocalBoxFuture<'static, Result<Box<dyn Connection>, Error>> {
        let s = self.0.clone();
        Box::pin(async move {
            let open = |url: &str| redis::Client::open(url).map_err(|e| Error::new(format!("{url}: {e}")));
            let broker = open(&s.broker)?.get_multiplexed_async_connection().await.map_err(|e| Error::new(format!("broker {}: {e}", s.broker)))?;
            let backend = if s.backend == s.broker {
                broker.clone()
            } else {
                open(&s.backend)?.get_multiplexed_async_connection().await.map_err(|e| Error::new(format!("result backend {}: {e}", s.backend)))?
            };
            Ok(Box::new(CeleryConnection { settings: s, broker, backend, pending: Vec::new() }) as Box<dyn Connection>)
        })
    }

    fn default_pool_size(&self) -> usize {
        4
    }
}

/// One pooled connection and the task messages its transaction holds back until the commit:
/// (Redis list, envelope).
struct CeleryConnection {
    settings: Arc<Settings>,
    broker: MultiplexedConnection,
    backend: MultiplexedConnection,
    pending: Vec<(String, String)>,
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
                    let (list, id, envelope) = send_task_args(args, &self.settings.queue, Utc::now()).map_err(|e| Error::new(format!("send_task: {e}")))?;
                    self.pending.push((list, envelope));
                    Ok(Value::str(id))
                }
                "result" => result(&mut self.backend, args).await,
                other => Err(Error::new(format!("no method {other} (methods: send_task, result)"))),
            }
        })
    }

    fn commit(&mut self) -> LocalBoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            if self.pending.is_empty() {
                return Ok(());
            }
            let mut pipe = redis::pipe();
            pipe.atomic();
            for (list, envelope) in &self.pending {
                pipe.lpush(list, envelope).ignore();
            }
            let sent: redis::RedisResult<()> = pipe.query_async(&mut self.broker).await;
            self.pending.clear();
            sent.map_err(|e| Error::broken(format!("send_task at commit: broker {}: {e}", self.settings.broker)))
        })
    }

    fn rollback(&mut self) -> LocalBoxFuture<'_, Result<(), Error>> {
        self.pending.clear();
        Box::pin(async { Ok(()) })
    }
}

/// `send_task(name [, args [, kwargs [, options]]])`: the list, the task id and the envelope.
fn send_task_args(args: Vec<Value>, default_queue: &str, now: DateTime<Utc>) -> Result<(String, String, String), String> {
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
    if queue.is_empty() || queue.contains('\u{6}') {
        return Err(format!("option queue: {queue:?} is not a queue name"));
    }
    let id = text("task_id")?.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let out = message::Outgoing {
        name: &name,
        id: id.clone(),
        args,
        kwargs,
        chain: Json::Null,
        root_id: None,
        parent_id: None,
        group: None,
        queue: queue.clone(),
        eta,
        expires,
        priority,
        reply_to: "",
    };
    Ok((message::priority_list(&queue, priority), id, out.envelope()))
}

/// `result(id [, timeout])`: waits for a ready result document.
async fn result(backend: &mut MultiplexedConnection, args: Vec<Value>) -> Result<Value, Error> {
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
    let key = format!("celery-task-meta-{id}");
    let until = tokio::time::Instant::now() + Duration::from_secs_f64(timeout);
    loop {
        let doc: Option<Vec<u8>> = backend.get(&key).await.map_err(|e| Error::broken(format!("result of task {id}: {e}")))?;
        if let Some(doc) = doc {
            let meta: Json = serde_json::from_slice(&doc).map_err(|e| Error::new(format!("result of task {id}: not a result document: {e}")))?;
            match meta.get("status").and_then(Json::as_str).unwrap_or("") {
                "SUCCESS" => return Ok(Value::from_json(meta.get("result").unwrap_or(&Json::Null))),
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
                    return Err(e);
                }
                _ => {}
            }
        }
        if tokio::time::Instant::now() >= until {
            return Err(Error::new(format!("result of task {id}: not ready after {timeout}s")));
        }
        tokio::time::sleep(POLL).await;
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
        let (list, id, env) =
            send_task_args(vec![Value::str("tasks.mul"), Value::Array(vec![Value::Int(6), Value::Int(7)]), Value::Nil, opts], "celery", now).unwrap();
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
}
