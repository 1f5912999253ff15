//! Celery's task messages as the Redis transport carries them (kombu's envelope: the body in
//! base64, headers and properties beside it), decoded into a task; and the result documents
//! (`celery-task-meta-<id>`) written back. The wire is described in
//! shared/design/celery-protocol.md (sections 1, 4 and 5).

use base64::Engine;
use chrono::{DateTime, NaiveDateTime, Utc};
use rustomnic_core::Value;
use serde_json::{json, Map, Value as Json};

/// A message taken from a queue: its envelope as JSON, and the fields read from it.
#[derive(Debug)]
pub struct Envelope {
    pub json: Json,
    /// The ack handle (`properties.delivery_tag`), also the key of its `unacked` entry.
    pub tag: String,
    pub exchange: String,
    pub routing_key: String,
}

/// Why a message is left for another worker rather than run here.
#[derive(Debug, PartialEq)]
pub enum Refusal {
    /// Not a message this worker can run (pickle, an unknown task, a canvas it does not
    /// continue yet): it goes back to its queue for another worker, untouched.
    Others(String),
    /// A message that no worker can run as it is (too big, a body that is not a task): its
    /// task gets a FAILURE result with this text, and the message is acknowledged.
    Fail(String),
}

/// A task to run.
#[derive(Debug, PartialEq)]
pub struct Task {
    pub id: String,
    pub name: String,
    pub args: Vec<Value>,
    /// The keyword arguments, a map (empty when none).
    pub kwargs: Value,
    pub eta: Option<DateTime<Utc>>,
    pub expires: Option<DateTime<Utc>>,
    pub retries: i64,
    /// The hard time limit in seconds (`timelimit[0]`).
    pub time_limit: Option<f64>,
    pub ignore_result: bool,
    /// The first task of the workflow (the task itself when it is the first).
    pub root_id: String,
    /// What follows this task in a chain, in Celery's order (the next step last).
    pub chain: Vec<Json>,
    /// Signatures queued after success (`link`) and after failure (`link_error`).
    pub callbacks: Vec<Json>,
    pub errbacks: Vec<Json>,
    /// The group this task belongs to (`group` header) and its place in it.
    pub group: Option<String>,
    pub group_index: Option<i64>,
    /// The body of the chord this task is a header task of: sent when the last header task
    /// of its group has finished.
    pub chord: Option<Json>,
    /// Where the RPC result backend sends the result (empty: nowhere), and the id it is sent
    /// under (the task's id unless the message says otherwise).
    pub reply_to: String,
    pub correlation_id: String,
}

/// Reads kombu's envelope. An error means the bytes are not a Celery message at all.
pub fn envelope(payload: &[u8], queue: &str) -> Result<Envelope, String> {
    let json: Json = serde_json::from_slice(payload).map_err(|e| format!("not a JSON envelope: {e}"))?;
    let Some(o) = json.as_object() else { return Err("the envelope is not a JSON object".into()) };
    let props = o.get("properties").and_then(Json::as_object);
    let tag = props.and_then(|p| p.get("delivery_tag")).and_then(Json::as_str).map(str::to_string).unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let info = props.and_then(|p| p.get("delivery_info")).and_then(Json::as_object);
    let exchange = info.and_then(|i| i.get("exchange")).and_then(Json::as_str).unwrap_or("").to_string();
    let routing_key = info.and_then(|i| i.get("routing_key")).and_then(Json::as_str).unwrap_or(queue).to_string();
    Ok(Envelope { json, tag, exchange, routing_key })
}

/// The task in an envelope, or why it is not run here. `known` tells whether a task name is
/// one this interface runs.
pub fn task(env: &Envelope, max_size: usize, known: impl Fn(&str) -> bool) -> Result<Task, Refusal> {
    let o = env.json.as_object().ok_or_else(|| Refusal::Fail("the envelope is not a JSON object".into()))?;
    let headers = o.get("headers").and_then(Json::as_object);
    let content_type = o.get("content-type").and_then(Json::as_str).unwrap_or("");
    let empty = Map::new();
    let headers = headers.unwrap_or(&empty);
    precheck(content_type, headers)?;
    let body = o.get("body").and_then(Json::as_str).unwrap_or("");
    let props = o.get("properties");
    let prop = |k: &str| props.and_then(|p| p.get(k)).and_then(Json::as_str).unwrap_or("");
    let encoding = prop("body_encoding");
    // base64 is 4/3 of the body: what is too big is refused before decoding it (the exact size
    // is checked after; padding makes the estimate up to 2 bytes more).
    let size = if encoding == "base64" { body.len() / 4 * 3 } else { body.len() };
    if size > max_size.saturating_add(2) {
        return Err(too_big(size, max_size));
    }
    let bytes = if encoding == "base64" {
        base64::engine::general_purpose::STANDARD.decode(body).map_err(|e| Refusal::Fail(format!("the body is not base64: {e}")))?
    } else {
        body.as_bytes().to_vec()
    };
    let message = Message { content_type, headers, body: &bytes, reply_to: prop("reply_to"), correlation_id: prop("correlation_id") };
    message.task(max_size, known)
}

/// The refusals that need only the content type and the headers: a body that is not JSON, or
/// compressed, is left for another worker.
fn precheck(content_type: &str, headers: &Map<String, Json>) -> Result<(), Refusal> {
    let id_hint = headers.get("id").and_then(Json::as_str).unwrap_or("?");
    if content_type != "application/json" {
        return Err(Refusal::Others(format!("task {id_hint}: content type {content_type:?} is not accepted (JSON only)")));
    }
    if headers.get("compression").is_some_and(|c| !c.is_null()) {
        return Err(Refusal::Others(format!("task {id_hint}: compressed bodies are not accepted")));
    }
    Ok(())
}

fn too_big(size: usize, max_size: usize) -> Refusal {
    Refusal::Fail(format!("the task's body of about {size} bytes is over this worker's max_message_size of {max_size} bytes"))
}

/// A task message whatever the broker: what [`Message::task`] reads.
pub struct Message<'a> {
    pub content_type: &'a str,
    /// The message's headers (protocol 2 carries the task's name and id there).
    pub headers: &'a Map<String, Json>,
    /// The body, decoded from any transport encoding.
    pub body: &'a [u8],
    pub reply_to: &'a str,
    pub correlation_id: &'a str,
}

impl Message<'_> {
    /// The task, or why it is not run here. `known` tells whether a task name is one this
    /// interface runs.
    pub fn task(&self, max_size: usize, known: impl Fn(&str) -> bool) -> Result<Task, Refusal> {
        let header = |k: &str| self.headers.get(k);
        precheck(self.content_type, self.headers)?;
        if self.body.len() > max_size {
            return Err(too_big(self.body.len(), max_size));
        }
        let bytes = self.body;
        let decoded = Value::parse_json(bytes).map_err(|e| Refusal::Fail(format!("the body is not JSON: {e}")))?;
        let (name, id, args, kwargs, embed) = match header("task").and_then(Json::as_str) {
            // Protocol v2: [args, kwargs, embed].
            Some(name) => {
                let Value::Array(mut parts) = decoded else { return Err(Refusal::Fail("the body is not [args, kwargs, embed]".into())) };
                if parts.len() != 3 {
                    return Err(Refusal::Fail(format!("the body has {} parts, not [args, kwargs, embed]", parts.len())));
                }
                let embed = parts.pop().unwrap_or_default();
                let kwargs = parts.pop().unwrap_or_default();
                let args = parts.pop().unwrap_or_default();
                let id = header("id").and_then(Json::as_str).ok_or_else(|| Refusal::Fail("the message has no id header".into()))?;
                (name.to_string(), id.to_string(), args, kwargs, embed)
            }
            // Protocol v1: a map with task, id, args, kwargs (and callbacks beside them).
            None => {
                let field = |k: &str| decoded.get(k).cloned().unwrap_or_default();
                let (Some(name), Some(id)) = (field("task").as_str().map(str::to_string), field("id").as_str().map(str::to_string)) else {
                    return Err(Refusal::Fail("the message has neither a task header (protocol 2) nor a task in its body (protocol 1)".into()));
                };
                let embed = Value::Map(vec![(Value::str("callbacks"), field("callbacks")), (Value::str("errbacks"), field("errbacks"))]);
                (name, id, field("args"), field("kwargs"), embed)
            }
        };
        let args = match args {
            Value::Array(a) => a,
            Value::Nil => Vec::new(),
            other => return Err(Refusal::Fail(format!("task {id}: args must be a list, got {}", other.type_name()))),
        };
        let kwargs = match kwargs {
            m @ Value::Map(_) => m,
            Value::Nil | Value::Array(_) => Value::Map(Vec::new()),
            other => return Err(Refusal::Fail(format!("task {id}: kwargs must be an object, got {}", other.type_name()))),
        };
        let (mut chain, mut callbacks, mut errbacks) = (Vec::new(), Vec::new(), Vec::new());
        let mut chord = None;
        if let Value::Map(parts) = &embed {
            for (part, into) in [("chain", &mut chain), ("callbacks", &mut callbacks), ("errbacks", &mut errbacks)] {
                let Some((_, Value::Array(sigs))) = parts.iter().find(|(k, _)| k.as_str() == Some(part)) else { continue };
                for sig in sigs {
                    let json = sig.to_json().map_err(|e| Refusal::Fail(format!("task {id}: a signature in its {part} cannot be read: {e}")))?;
                    if json.get("task").and_then(Json::as_str).is_none() || json.get("subtask_type").is_some_and(|t| !t.is_null()) {
                        return Err(Refusal::Others(format!(
                            "task {id} ({name}) has in its {part} a signature that is not a plain task, which this worker does not continue yet"
                        )));
                    }
                    into.push(json);
                }
            }
            if let Some((_, sig)) = parts.iter().find(|(k, v)| k.as_str() == Some("chord") && !matches!(v, Value::Nil)) {
                let json = sig.to_json().map_err(|e| Refusal::Fail(format!("task {id}: its chord's body cannot be read: {e}")))?;
                if json.get("task").and_then(Json::as_str).is_none() || json.get("subtask_type").is_some_and(|t| !t.is_null()) {
                    return Err(Refusal::Others(format!(
                        "task {id} ({name}) is part of a chord whose body is not a plain task, which this worker does not continue yet"
                    )));
                }
                if header("group").and_then(Json::as_str).is_none_or(str::is_empty) {
                    return Err(Refusal::Fail(format!("task {id}: part of a chord but without a group id")));
                }
                chord = Some(json);
            }
            let continued = |k: &Value| matches!(k.as_str(), Some("chain" | "callbacks" | "errbacks" | "chord"));
            if let Some((k, _)) = parts.iter().find(|(k, v)| !continued(k) && !matches!(v, Value::Nil) && !matches!(v, Value::Array(a) if a.is_empty())) {
                return Err(Refusal::Others(format!(
                    "task {id} ({name}) carries a canvas part ({}), which this worker does not continue yet",
                    String::from_utf8_lossy(k.as_str().unwrap_or("?").as_bytes())
                )));
            }
        }
        if !known(&name) {
            return Err(Refusal::Others(format!("task {id}: {name} is not one of this interface's tasks")));
        }
        let time = |k: &str| header(k).and_then(Json::as_str).and_then(parse_time);
        let time_limit = header("timelimit").and_then(Json::as_array).and_then(|l| l.first()).and_then(Json::as_f64).filter(|s| *s > 0.0);
        Ok(Task {
            args: args.into_iter().map(untag).collect(),
            kwargs: untag(kwargs),
            eta: time("eta"),
            expires: time("expires"),
            retries: header("retries").and_then(Json::as_i64).unwrap_or(0),
            time_limit,
            ignore_result: header("ignore_result").and_then(Json::as_bool).unwrap_or(false),
            root_id: header("root_id").and_then(Json::as_str).unwrap_or(&id).to_string(),
            chain,
            callbacks,
            errbacks,
            group: header("group").and_then(Json::as_str).filter(|g| !g.is_empty()).map(str::to_string),
            group_index: header("group_index").and_then(Json::as_i64),
            chord,
            reply_to: self.reply_to.to_string(),
            correlation_id: if self.correlation_id.is_empty() { id.clone() } else { self.correlation_id.to_string() },
            id,
            name,
        })
    }
}

/// kombu's tagged values (`{"__type__": "datetime", "__value__": "..."}` and the like) as the
/// plain value they carry: a datetime, date, time, decimal or text as its string, a UUID as its
/// hex, binary bytes decoded from base64.
fn untag(v: Value) -> Value {
    match v {
        Value::Map(pairs) => {
            if pairs.len() == 2 {
                let get = |k: &str| pairs.iter().find(|(key, _)| key.as_str() == Some(k)).map(|(_, v)| v);
                if let (Some(Value::Str(kind)), Some(value)) = (get("__type__"), get("__value__")) {
                    match (kind.as_slice(), value) {
                        (b"datetime" | b"date" | b"time" | b"decimal" | b"bytes", Value::Str(_)) => return value.clone(),
                        (b"uuid", v) => return v.get("hex").cloned().unwrap_or_else(|| v.clone()),
                        (b"base64", Value::Str(text)) => {
                            if let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(text) {
                                return Value::Str(bytes);
                            }
                        }
                        _ => {}
                    }
                }
            }
            Value::Map(pairs.into_iter().map(|(k, v)| (k, untag(v))).collect())
        }
        Value::Array(items) => Value::Array(items.into_iter().map(untag).collect()),
        other => other,
    }
}

/// An ISO-8601 time as Celery writes it; one without an offset is UTC.
pub fn parse_time(text: &str) -> Option<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Some(t.with_timezone(&Utc));
    }
    NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f").ok().map(|t| t.and_utc())
}

/// How Celery writes `date_done`, as a chrono pattern: [`format_time`]'s fallback, and what its
/// digit-by-digit writing is checked against.
const DATE_DONE: &str = "%Y-%m-%dT%H:%M:%S%.6f+00:00";

/// A time as Celery writes `date_done` (`2026-11-22T03:07:55.583864+00:00`). Written digit by
/// digit: every result document has one, and chrono's formatter (which parses its pattern each
/// time) was a sixth of the result document's cost; a year outside 0..=9999 or a leap second
/// takes chrono's way.
pub fn format_time(t: DateTime<Utc>) -> String {
    use chrono::{Datelike, Timelike};
    let (year, nanos) = (t.year(), t.nanosecond());
    if !(0..=9999).contains(&year) || nanos >= 1_000_000_000 {
        return t.format(DATE_DONE).to_string();
    }
    let mut out = [0u8; 32];
    let mut put = |at: usize, value: u32, digits: usize| {
        let mut v = value;
        for i in (0..digits).rev() {
            out[at + i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, year as u32, 4);
    put(5, t.month(), 2);
    put(8, t.day(), 2);
    put(11, t.hour(), 2);
    put(14, t.minute(), 2);
    put(17, t.second(), 2);
    put(20, nanos / 1000, 6);
    for (at, c) in [(4, b'-'), (7, b'-'), (10, b'T'), (13, b':'), (16, b':'), (19, b'.')] {
        out[at] = c;
    }
    out[26..32].copy_from_slice(b"+00:00");
    String::from_utf8_lossy(&out).into_owned()
}

/// The headers [`Message::task`] reads (and the id, for messages it refuses): a broker whose
/// headers arrive as another structure (AMQP's field table) converts only these.
pub const TASK_HEADERS: &[&str] = &["task", "id", "compression", "eta", "expires", "retries", "timelimit", "ignore_result", "root_id", "group", "group_index"];

/// The result document of a task (`celery-task-meta-<id>`).
pub fn meta(task_id: &str, status: &str, result: Json, traceback: Option<&str>, children: Json, now: DateTime<Utc>) -> String {
    json!({
        "status": status,
        "result": result,
        "traceback": traceback,
        "children": children,
        "date_done": format_time(now),
        "task_id": task_id,
    })
    .to_string()
}

/// A FAILURE's `result`: an exception the Python client re-raises (`exc_module.exc_type(*exc_message)`).
pub fn exception(module: &str, kind: &str, message: &str) -> Json {
    let mut m = Map::new();
    m.insert("exc_type".into(), Json::from(kind));
    m.insert("exc_message".into(), json!([message]));
    m.insert("exc_module".into(), Json::from(module));
    Json::Object(m)
}

/// The message that runs a task again (Celery's retry): the same message with `retries` one
/// more, `eta` at `at`, the task its own parent, and a new delivery tag.
pub fn retried(env: &Envelope, retries: i64, at: DateTime<Utc>) -> String {
    let mut json = env.json.clone();
    if let Some(h) = json.get_mut("headers").and_then(Json::as_object_mut) {
        retried_headers(h, retries, at);
    }
    if let Some(p) = json.get_mut("properties").and_then(Json::as_object_mut) {
        p.insert("delivery_tag".into(), Json::from(uuid::Uuid::new_v4().to_string()));
    }
    json.to_string()
}

/// The `unacked` hash's value for a message: `[envelope, exchange, routing_key]`, as kombu
/// writes it, so that either side can restore the other's messages.
pub fn unacked_entry(env: &Envelope) -> String {
    json!([env.json, env.exchange, env.routing_key]).to_string()
}

/// The envelope of an `unacked` entry, marked redelivered, with its queue (the routing key),
/// for putting it back.
pub fn restored(entry: &[u8]) -> Option<(String, String)> {
    let v: Json = serde_json::from_slice(entry).ok()?;
    let parts = v.as_array()?;
    let mut env = parts.first()?.clone();
    let queue = parts.get(2)?.as_str()?.to_string();
    if let Some(h) = env.get_mut("headers").and_then(Json::as_object_mut) {
        h.insert("redelivered".into(), Json::Bool(true));
    }
    if let Some(i) = env.get_mut("properties").and_then(|p| p.get_mut("delivery_info")).and_then(Json::as_object_mut) {
        i.insert("redelivered".into(), Json::Bool(true));
    }
    Some((queue, env.to_string()))
}

/// The message that runs the next step of a chain after task `parent` returned `result`: the
/// step's task with the result first among its arguments (unless the step is immutable), the
/// rest of the chain carried on, the parent and root ids set; its queue is the step's `queue`
/// option or `default_queue`.
pub fn next_step(parent: &Task, result: &Json, default_queue: &str) -> Option<Outgoing> {
    let (step, rest) = parent.chain.split_last()?;
    signature_message(step, result, rest, parent, default_queue)
}

/// The message of a chord's body (`sig`) given the header's results (in their group order)
/// first among its arguments.
pub fn chord_body(sig: &Json, results: Vec<Json>, last: &Task, default_queue: &str) -> Option<Outgoing> {
    signature_message(sig, &Json::Array(results), &[], last, default_queue)
}

/// The messages of a succeeded task's callbacks (`link`), each given the result first.
pub fn callbacks(parent: &Task, result: &Json, default_queue: &str) -> Vec<Outgoing> {
    parent.callbacks.iter().filter_map(|sig| signature_message(sig, result, &[], parent, default_queue)).collect()
}

/// The messages of a failed task's errbacks (`link_error`), each given the task's id first (the
/// message form a Celery worker uses for an errback it does not run itself).
pub fn errbacks(parent: &Task, default_queue: &str) -> Vec<Outgoing> {
    let id = Json::from(parent.id.clone());
    parent.errbacks.iter().filter_map(|sig| signature_message(sig, &id, &[], parent, default_queue)).collect()
}

/// The message of signature `sig` with `first` put before its arguments (unless it is
/// immutable) and `rest` as its chain.
fn signature_message(sig: &Json, first: &Json, rest: &[Json], parent: &Task, default_queue: &str) -> Option<Outgoing> {
    let name = sig.get("task").and_then(Json::as_str)?;
    let options = sig.get("options").and_then(Json::as_object);
    let option = |k: &str| options.and_then(|o| o.get(k)).and_then(Json::as_str).filter(|s| !s.is_empty());
    let mut args: Vec<Json> = sig.get("args").and_then(Json::as_array).cloned().unwrap_or_default();
    if !sig.get("immutable").and_then(Json::as_bool).unwrap_or(false) {
        args.insert(0, first.clone());
    }
    Some(Outgoing {
        name: name.to_string(),
        id: option("task_id").map(str::to_string).unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
        args,
        kwargs: sig.get("kwargs").filter(|k| k.is_object()).cloned().unwrap_or_else(|| json!({})),
        chain: if rest.is_empty() { Json::Null } else { Json::Array(rest.to_vec()) },
        root_id: Some(parent.root_id.clone()),
        parent_id: Some(parent.id.clone()),
        group: option("group_id").map(str::to_string),
        group_index: None,
        queue: option("queue").unwrap_or(default_queue).to_string(),
        eta: None,
        expires: None,
        priority: 0,
        reply_to: option("reply_to").unwrap_or(&parent.reply_to).to_string(),
    })
}

/// A task message to send: what the celery resource's `send_task` and a worker continuing a
/// chain make.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub name: String,
    pub id: String,
    pub args: Vec<Json>,
    pub kwargs: Json,
    /// The rest of a chain (Celery's order), or null.
    pub chain: Json,
    /// None for a task that starts a workflow: its root is itself.
    pub root_id: Option<String>,
    pub parent_id: Option<String>,
    pub group: Option<String>,
    /// Its place in its group.
    pub group_index: Option<i64>,
    pub queue: String,
    pub eta: Option<DateTime<Utc>>,
    pub expires: Option<DateTime<Utc>>,
    /// 0-9, passed on as Celery does: on Redis 0 goes first, on RabbitMQ (a queue declared with
    /// `x-max-priority`) 9 does.
    pub priority: u8,
    /// Where the RPC result backend sends the result ("" for none).
    pub reply_to: String,
}

impl Outgoing {
    /// The body (protocol 2, JSON).
    pub fn body(&self) -> String {
        json!([self.args, self.kwargs, {"callbacks": null, "errbacks": null, "chain": self.chain, "chord": null}]).to_string()
    }

    /// The headers (protocol 2).
    pub fn headers(&self) -> Map<String, Json> {
        let headers = json!({
            "lang": "rs", "task": self.name, "id": self.id, "shadow": null,
            "eta": self.eta.map(format_time), "expires": self.expires.map(format_time),
            "group": self.group, "group_index": self.group_index, "retries": 0, "timelimit": [null, null],
            "root_id": self.root_id.as_deref().unwrap_or(&self.id), "parent_id": self.parent_id,
            "argsrepr": Json::Array(self.args.clone()).to_string(), "kwargsrepr": self.kwargs.to_string(),
            "origin": "pmnc", "ignore_result": null, "replaced_task_nesting": 0,
            "stamped_headers": null, "stamps": {},
        });
        match headers {
            Json::Object(m) => m,
            _ => Map::new(),
        }
    }

    /// The message as a signature (a step of a chain another task carries).
    pub fn signature(&self, immutable: bool) -> Json {
        let mut options = Map::new();
        options.insert("task_id".into(), json!(self.id));
        options.insert("queue".into(), json!(self.queue));
        if !self.reply_to.is_empty() {
            options.insert("reply_to".into(), json!(self.reply_to));
        }
        json!({"task": self.name, "args": self.args, "kwargs": self.kwargs, "options": options, "subtask_type": null, "immutable": immutable})
    }

    /// The Redis list the message goes to.
    pub fn list(&self) -> String {
        priority_list(&self.queue, self.priority)
    }

    /// The message as kombu's Redis transport carries it (protocol 2, JSON).
    pub fn envelope(&self) -> String {
        json!({
            "body": base64::engine::general_purpose::STANDARD.encode(self.body()),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": self.headers(),
            "properties": {
                "correlation_id": self.id, "reply_to": self.reply_to, "delivery_mode": 2,
                "delivery_info": {"exchange": "", "routing_key": self.queue}, "priority": self.priority,
                "body_encoding": "base64", "delivery_tag": uuid::Uuid::new_v4().to_string(),
            },
        })
        .to_string()
    }
}

/// The headers of a message that runs a task again (Celery's retry): `retries` one more, `eta`
/// at `at`, the task its own parent.
pub fn retried_headers(headers: &mut Map<String, Json>, retries: i64, at: DateTime<Utc>) {
    let id = headers.get("id").cloned().unwrap_or(Json::Null);
    headers.insert("retries".into(), Json::from(retries + 1));
    headers.insert("eta".into(), Json::from(format_time(at)));
    headers.insert("parent_id".into(), id);
}

/// The Redis list of `queue` for a message of `priority` (kombu's steps 0, 3, 6, 9).
pub fn priority_list(queue: &str, priority: u8) -> String {
    match priority.min(9) {
        0..=2 => queue.to_string(),
        p => format!("{queue}\x06\x16{}", p / 3 * 3),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The envelope of shared/design/celery-protocol.md §4.1 (a task tasks.add(2, 3, z=1)).
    fn captured(content_type: &str, body: &str) -> Vec<u8> {
        let body = base64::engine::general_purpose::STANDARD.encode(body);
        json!({
            "body": body, "content-encoding": "utf-8", "content-type": content_type,
            "headers": {"lang": "py", "task": "tasks.add", "id": "ed9fe625", "shadow": null, "eta": null,
                "expires": null, "group": null, "group_index": null, "retries": 0, "timelimit": [null, null],
                "root_id": "ed9fe625", "parent_id": null, "argsrepr": "(2, 3)", "kwargsrepr": "{'z': 1}",
                "origin": "gen7399@vm", "ignore_result": null, "replaced_task_nesting": 0,
                "stamped_headers": null, "stamps": {}},
            "properties": {"correlation_id": "ed9fe625", "reply_to": "685fe064", "delivery_mode": 2,
                "delivery_info": {"exchange": "", "routing_key": "celery"}, "priority": 0,
                "body_encoding": "base64", "delivery_tag": "60e31c89"}
        })
        .to_string()
        .into_bytes()
    }

    const ADD: &str = r#"[[2, 3], {"z": 1}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]"#;

    /// A task read from only TASK_HEADERS is the task read from all of them: what an AMQP
    /// consumer converts of each message's headers is enough.
    #[test]
    fn the_task_headers_are_all_a_task_reads() {
        let full: Map<String, Json> = serde_json::from_value(json!({
            "lang": "py", "task": "tasks.add", "id": "t1", "shadow": "alias", "eta": "2026-12-06T10:00:00+00:00",
            "expires": "2026-12-07T10:00:00+00:00", "group": "g1", "group_index": 3, "retries": 2, "timelimit": [30.5, 20],
            "root_id": "r1", "parent_id": "p1", "argsrepr": "(2, 3)", "kwargsrepr": "{}", "origin": "gen1@host",
            "ignore_result": true, "replaced_task_nesting": 0, "stamped_headers": null, "stamps": {}, "compression": null,
        }))
        .unwrap();
        let only: Map<String, Json> = full.iter().filter(|(k, _)| TASK_HEADERS.contains(&k.as_str())).map(|(k, v)| (k.clone(), v.clone())).collect();
        assert!(only.len() < full.len());
        let read = |headers: &Map<String, Json>, content_type: &str, body: &str| {
            Message { content_type, headers, body: body.as_bytes(), reply_to: "", correlation_id: "c1" }.task(1 << 20, |n| n == "tasks.add")
        };
        let chord = r#"[[2, 3], {}, {"chord": {"task": "tasks.sum", "args": [], "kwargs": {}, "options": {}, "subtask_type": null}}]"#;
        for (content_type, body) in
            [("application/json", ADD), ("application/json", chord), ("application/x-python-serialize", ADD), ("application/json", "[1]")]
        {
            let (a, b) = (read(&full, content_type, body), read(&only, content_type, body));
            assert_eq!(a, b, "{content_type} {body}");
        }
        let task = read(&only, "application/json", ADD).unwrap();
        assert_eq!((task.retries, task.group_index, task.time_limit, task.ignore_result), (2, Some(3), Some(30.5), true));
        let mut compressed = full.clone();
        compressed.insert("compression".into(), json!("application/x-gzip"));
        let only: Map<String, Json> = compressed.iter().filter(|(k, _)| TASK_HEADERS.contains(&k.as_str())).map(|(k, v)| (k.clone(), v.clone())).collect();
        assert_eq!(read(&compressed, "application/json", ADD), read(&only, "application/json", ADD));
        assert!(read(&only, "application/json", ADD).is_err(), "a compressed body is refused");
    }

    #[test]
    fn a_captured_task() {
        let env = envelope(&captured("application/json", ADD), "celery").unwrap();
        assert_eq!((env.tag.as_str(), env.exchange.as_str(), env.routing_key.as_str()), ("60e31c89", "", "celery"));
        let t = task(&env, 1 << 20, |n| n == "tasks.add").unwrap();
        assert_eq!(t.name, "tasks.add");
        assert_eq!(t.id, "ed9fe625");
        assert_eq!(t.args, vec![Value::Int(2), Value::Int(3)]);
        assert_eq!(t.kwargs, Value::Map(vec![(Value::str("z"), Value::Int(1))]));
        assert_eq!((t.eta, t.expires, t.retries, t.time_limit, t.ignore_result), (None, None, 0, None, false));
    }

    #[test]
    fn refusals() {
        let env = envelope(&captured("application/x-python-serialize", ADD), "celery").unwrap();
        assert!(matches!(task(&env, 1 << 20, |_| true), Err(Refusal::Others(m)) if m.contains("JSON only")));
        let env = envelope(&captured("application/json", ADD), "celery").unwrap();
        assert!(matches!(task(&env, 1 << 20, |_| false), Err(Refusal::Others(m)) if m.contains("tasks.add is not one of")));
        assert!(matches!(task(&env, 10, |_| true), Err(Refusal::Fail(m)) if m.contains("max_message_size of 10 bytes")));
        let chord = r#"[[1], {}, {"callbacks": null, "errbacks": null, "chain": null, "chord": {"task": "tasks.sum"}}]"#;
        let env = envelope(&captured("application/json", chord), "celery").unwrap();
        assert!(matches!(task(&env, 1 << 20, |_| true), Err(Refusal::Fail(m)) if m.contains("part of a chord but without a group id")));
        let mut grouped = env.json.clone();
        grouped["headers"]["group"] = json!("g1");
        grouped["headers"]["group_index"] = json!(3);
        let env = envelope(grouped.to_string().as_bytes(), "celery").unwrap();
        let t = task(&env, 1 << 20, |_| true).unwrap();
        assert_eq!((t.group.as_deref(), t.group_index, t.chord.clone()), (Some("g1"), Some(3), Some(json!({"task": "tasks.sum"}))));
        let body = chord_body(t.chord.as_ref().unwrap(), vec![json!(1), json!(2)], &t, "celery").unwrap();
        assert_eq!((body.name.as_str(), body.args.clone()), ("tasks.sum", vec![json!([1, 2])]));
        let complex = r#"[[1], {}, {"chord": {"task": "celery.chain", "subtask_type": "chain"}}]"#;
        let mut m: Json = serde_json::from_slice(&captured("application/json", complex)).unwrap();
        m["headers"]["group"] = json!("g1");
        let env = envelope(m.to_string().as_bytes(), "celery").unwrap();
        assert!(matches!(task(&env, 1 << 20, |_| true), Err(Refusal::Others(m)) if m.contains("a chord whose body is not a plain task")));
        let other = r#"[[1], {}, {"chain": null, "mystery": [1]}]"#;
        let env = envelope(&captured("application/json", other), "celery").unwrap();
        assert!(matches!(task(&env, 1 << 20, |_| true), Err(Refusal::Others(m)) if m.contains("canvas part (mystery)")));
        let group_step = r#"[[1], {}, {"chain": [{"task": "g", "subtask_type": "group"}]}]"#;
        let env = envelope(&captured("application/json", group_step), "celery").unwrap();
        assert!(matches!(task(&env, 1 << 20, |_| true), Err(Refusal::Others(m)) if m.contains("in its chain a signature that is not a plain task")));
        for bad in ["{}", "[1, 2]", "[1, {}, {}]", "not json"] {
            let env = envelope(&captured("application/json", bad), "celery").unwrap();
            assert!(matches!(task(&env, 1 << 20, |_| true), Err(Refusal::Fail(_))), "{bad}");
        }
        assert!(envelope(b"[1]", "q").is_err());
        assert!(envelope(b"\xff", "q").is_err());
    }

    #[test]
    fn protocol_one_and_tagged_values() {
        let mut env = envelope(&captured("application/json", ""), "celery").unwrap();
        let body = r#"{"task": "tasks.add", "id": "v1", "args": [{"__type__": "decimal", "__value__": "1.10"}], "kwargs": {"b": {"__type__": "base64", "__value__": "AAE="}}}"#;
        env.json["body"] = Json::from(base64::engine::general_purpose::STANDARD.encode(body));
        env.json["headers"] = json!({});
        let t = task(&env, 1 << 20, |_| true).unwrap();
        assert_eq!((t.id.as_str(), t.name.as_str()), ("v1", "tasks.add"));
        assert_eq!(t.args, vec![Value::str("1.10")]);
        assert_eq!(t.kwargs, Value::Map(vec![(Value::str("b"), Value::Str(vec![0, 1]))]));
    }

    /// The captured chain of celery-protocol.md §1.3: `chain(add(1,1), add.s(10), mul.si(3))`.
    #[test]
    fn chains_continue() {
        let body = r#"[[1, 1], {}, {"callbacks": null, "errbacks": null, "chord": null, "chain": [
            {"task": "tasks.mul", "args": [3], "kwargs": {}, "immutable": true, "options": {"task_id": "f5a8"}, "subtask_type": null},
            {"task": "tasks.add", "args": [10], "kwargs": {}, "immutable": false, "options": {"task_id": "d64d", "queue": "rs"}, "subtask_type": null}]}]"#;
        let env = envelope(&captured("application/json", body), "celery").unwrap();
        let first = task(&env, 1 << 20, |_| true).unwrap();
        assert_eq!(first.chain.len(), 2);
        let step = next_step(&first, &json!(2), "celery").unwrap();
        let (queue, id, text) = (step.list(), step.id.clone(), step.envelope());
        assert_eq!((queue.as_str(), id.as_str()), ("rs", "d64d"));
        let second = task(&envelope(text.as_bytes(), &queue).unwrap(), 1 << 20, |_| true).unwrap();
        assert_eq!((second.name.as_str(), second.id.as_str(), second.root_id.as_str()), ("tasks.add", "d64d", "ed9fe625"));
        assert_eq!(second.args, vec![Value::Int(2), Value::Int(10)]);
        let step = next_step(&second, &json!(12), "celery").unwrap();
        let (queue, id, text) = (step.list(), step.id.clone(), step.envelope());
        assert_eq!((queue.as_str(), id.as_str()), ("celery", "f5a8"));
        let third = task(&envelope(text.as_bytes(), &queue).unwrap(), 1 << 20, |_| true).unwrap();
        assert_eq!(third.args, vec![Value::Int(3)], "an immutable step does not take the result");
        assert!(third.chain.is_empty());
        assert!(next_step(&third, &json!(36), "celery").is_none());
    }

    #[test]
    fn callbacks_and_errbacks() {
        let body = r#"[[1, 1], {}, {"chain": null, "chord": null,
            "callbacks": [{"task": "tasks.log", "args": ["done"], "kwargs": {}, "options": {"task_id": "cb1"}}],
            "errbacks": [{"task": "tasks.alert", "args": [], "kwargs": {"level": 2}, "options": {"task_id": "eb1", "queue": "alerts"}}]}]"#;
        let env = envelope(&captured("application/json", body), "celery").unwrap();
        let t = task(&env, 1 << 20, |_| true).unwrap();
        let ok = callbacks(&t, &json!(2), "celery");
        assert_eq!(ok.len(), 1);
        let cb = task(&envelope(ok[0].envelope().as_bytes(), "celery").unwrap(), 1 << 20, |_| true).unwrap();
        assert_eq!((cb.id.as_str(), cb.args.clone()), ("cb1", vec![Value::Int(2), Value::str("done")]));
        let failed = errbacks(&t, "celery");
        assert_eq!((failed[0].list().as_str(), failed[0].id.as_str()), ("alerts", "eb1"));
        let eb = task(&envelope(failed[0].envelope().as_bytes(), "alerts").unwrap(), 1 << 20, |_| true).unwrap();
        assert_eq!(eb.args, vec![Value::str("ed9fe625")]);
        assert_eq!(eb.kwargs, Value::Map(vec![(Value::str("level"), Value::Int(2))]));
    }

    #[test]
    fn retried_messages() {
        let env = envelope(&captured("application/json", ADD), "celery").unwrap();
        let at = parse_time("2026-12-06T10:00:00+00:00").unwrap();
        let again = envelope(retried(&env, 0, at).as_bytes(), "celery").unwrap();
        assert_ne!(again.tag, env.tag);
        let t = task(&again, 1 << 20, |_| true).unwrap();
        assert_eq!((t.retries, t.eta, t.id.as_str()), (1, Some(at), "ed9fe625"));
        assert_eq!(again.json["headers"]["parent_id"], "ed9fe625");
    }

    #[test]
    fn times_and_meta() {
        let t = parse_time("2026-11-22T03:07:55.583864+00:00").unwrap();
        assert_eq!(format_time(t), "2026-11-22T03:07:55.583864+00:00");
        // Digit by digit as chrono writes it, over years, months, days and fractions.
        let mut at = parse_time("0001-01-01T00:00:00Z").unwrap();
        let step = chrono::Duration::seconds(7_777_777) + chrono::Duration::nanoseconds(123_456_789);
        for _ in 0..5000 {
            assert_eq!(format_time(at), at.format(DATE_DONE).to_string());
            at += step;
        }
        assert_eq!(format_time(parse_time("2026-01-02T03:04:05Z").unwrap()), "2026-01-02T03:04:05.000000+00:00");
        assert_eq!(parse_time("2026-11-22T03:07:55.5"), parse_time("2026-11-22T03:07:55.500000+00:00"));
        assert_eq!(parse_time("2026-11-22T05:07:55+02:00"), parse_time("2026-11-22T03:07:55Z"));
        assert!(parse_time("yesterday").is_none());
        let m: Json = serde_json::from_str(&meta("id1", "FAILURE", exception("builtins", "RuntimeError", "boom"), Some("tb"), json!([]), t)).unwrap();
        assert_eq!(m["result"], json!({"exc_type": "RuntimeError", "exc_message": ["boom"], "exc_module": "builtins"}));
        assert_eq!((m["status"].as_str(), m["task_id"].as_str(), m["traceback"].as_str()), (Some("FAILURE"), Some("id1"), Some("tb")));
    }

    #[test]
    fn unacked_entries_restore() {
        let env = envelope(&captured("application/json", ADD), "celery").unwrap();
        let entry = unacked_entry(&env);
        let (queue, text) = restored(entry.as_bytes()).unwrap();
        assert_eq!(queue, "celery");
        let back = envelope(text.as_bytes(), "celery").unwrap();
        assert_eq!(back.json["headers"]["redelivered"], Json::Bool(true));
        assert_eq!(back.tag, env.tag);
        assert!(task(&back, 1 << 20, |_| true).is_ok());
    }
}
