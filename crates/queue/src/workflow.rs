//! Workflows on durable calls (docs/queues.md "Workflows", docs/decisions/149): chains, groups
//! and chords whose steps are ordinary durable calls. A step carries its continuation (the
//! rest of the chain, the on_error step, the join it reports to) in its row; when it ends, the
//! queue's writer stores what comes next in the SAME SQLite transaction as the record of that
//! end: the next step (into this cage's queue, or its outbox for another cage), the on_error
//! step, or a part of the join. Joins live in the file of the cage that started the workflow;
//! a part for a join of another cage travels through the outbox as a call to `_queue.join`,
//! which the target's accept path applies (never Lua), once per (join, index).

use rusqlite::{params, Connection, OptionalExtension};
use rustomnic_core::Value;
use rustomnic_lua::durable::{
    self, CallOptions, CallStatus, CancelAnswer, DurableCall, Shape, Workflow, WorkflowStatus, ACCEPT_MODULE, MAX_WORKFLOW_ID, MAX_WORKFLOW_STEPS,
};
use rustomnic_resource_state::{decode, encode, MAX_VALUE};

use crate::store::{self, now_ms, NewCall, OutboxCall};
use crate::{new_call_id, store_of, writer, Store};

/// The function of `_queue` through which a part of a join reaches the cage that holds it.
pub(crate) const JOIN_FUNCTION: &str = "join";
/// How long a workflow's record (and a cancel's mark) is kept.
const RECORD_KEPT_MS: i64 = 30 * 86_400_000;
/// How long a join that ended is kept (its result read by pmnc.calls.result).
const ENDED_KEPT_MS: i64 = 3 * 86_400_000;
/// How long an outbox keeps forwarding a part of a join.
const PART_WINDOW_MS: i64 = 30 * 86_400_000;

fn field<'a>(m: &'a [(Value, Value)], name: &str) -> Option<&'a Value> {
    m.iter().find(|(k, _)| k.as_str() == Some(name)).map(|(_, v)| v)
}

fn text(m: &[(Value, Value)], name: &str) -> Result<String, String> {
    match field(m, name) {
        Some(Value::Str(b)) => String::from_utf8(b.clone()).map_err(|_| format!("field {name} is not UTF-8")),
        Some(other) => Err(format!("field {name} must be a string, got {}", other.type_name())),
        None => Err(format!("field {name} is missing")),
    }
}

fn opt_text(m: &[(Value, Value)], name: &str) -> Result<Option<String>, String> {
    match field(m, name) {
        None | Some(Value::Nil) => Ok(None),
        Some(_) => text(m, name).map(Some),
    }
}

fn number(m: &[(Value, Value)], name: &str) -> Result<Option<f64>, String> {
    match field(m, name) {
        None | Some(Value::Nil) => Ok(None),
        Some(Value::Int(i)) => Ok(Some(*i as f64)),
        Some(Value::Float(f)) if f.is_finite() => Ok(Some(*f)),
        Some(other) => Err(format!("field {name} must be a number, got {}", other.type_name())),
    }
}

fn map(fields: Vec<(&str, Value)>) -> Value {
    Value::Map(fields.into_iter().filter(|(_, v)| !matches!(v, Value::Nil)).map(|(k, v)| (Value::str(k), v)).collect())
}

fn opt_str(s: &Option<String>) -> Value {
    s.as_deref().map_or(Value::Nil, Value::str)
}

fn opt_num(n: Option<f64>) -> Value {
    n.map_or(Value::Nil, Value::Float)
}

/// A step (its id and the call) as one value, kept in a continuation.
pub(crate) fn step_value(id: &str, call: &DurableCall) -> Value {
    let o = &call.options;
    map(vec![
        ("id", Value::str(id)),
        ("from", Value::str(call.from_cage.as_str())),
        ("cage", Value::str(call.cage.as_str())),
        ("queue", Value::str(o.queue.as_str())),
        ("module", Value::str(call.module.as_str())),
        ("fn", Value::str(call.function.as_str())),
        ("args", Value::Array(call.args.clone())),
        ("expires_in", opt_num(o.expires_in)),
        ("expires_at", opt_num(o.expires_at)),
        ("delay", opt_num(o.delay)),
        ("at", opt_num(o.at)),
        ("max_attempts", o.max_attempts.map_or(Value::Nil, Value::Int)),
        ("trace", opt_str(&o.trace)),
    ])
}

/// Reads back what [`step_value`] made: (step id, the call with that id).
pub(crate) fn step_from(v: &Value) -> Result<(String, DurableCall), String> {
    let Value::Map(m) = v else { return Err("a workflow step is a map of its fields".into()) };
    let id = text(m, "id")?;
    let args = match field(m, "args") {
        Some(Value::Array(a)) => a.clone(),
        _ => return Err("field args of a workflow step must be an array".into()),
    };
    let options = CallOptions {
        queue: text(m, "queue")?,
        id: Some(id.clone()),
        expires_in: number(m, "expires_in")?,
        delay: number(m, "delay")?,
        at: number(m, "at")?,
        expires_at: number(m, "expires_at")?,
        max_attempts: match field(m, "max_attempts") {
            Some(Value::Int(n)) if (1..=durable::MAX_ATTEMPTS).contains(n) => Some(*n),
            None | Some(Value::Nil) => None,
            Some(_) => return Err("field max_attempts of a workflow step is out of range".into()),
        },
        trace: crate::forward::checked_trace(opt_text(m, "trace")?),
    };
    let call = DurableCall { from_cage: text(m, "from")?, cage: text(m, "cage")?, module: text(m, "module")?, function: text(m, "fn")?, args, options };
    Ok((id, call))
}

/// The join a member of a group or chord reports to: held by `cage`, member `index` (from 1).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Join {
    pub cage: String,
    pub id: String,
    pub index: i64,
    /// The holder key of the state file that holds the join (crate::holder), when the cage
    /// that started it runs in a flock: its parts go to that file's process (decision 152).
    /// Absent from continuations of earlier versions: parts then go to any copy of the cage.
    pub holder: Option<String>,
}

/// What a step carries: what is stored when it ends.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Cont {
    /// The workflow id.
    pub wf: String,
    /// The cage that started the workflow (where its record and joins are).
    pub origin: String,
    /// The steps after this one in a chain, as [`step_value`]s.
    pub next: Vec<Value>,
    /// Stored (with `{workflow, step, error}` as its first argument) when this step is dead.
    pub on_error: Option<Value>,
    pub join: Option<Join>,
    /// The chord whose body this step is: its end is the chord's end too.
    pub alias: Option<String>,
}

impl Cont {
    pub(crate) fn to_value(&self) -> Value {
        map(vec![
            ("wf", Value::str(self.wf.as_str())),
            ("origin", Value::str(self.origin.as_str())),
            ("next", if self.next.is_empty() { Value::Nil } else { Value::Array(self.next.clone()) }),
            ("on_error", self.on_error.clone().unwrap_or(Value::Nil)),
            (
                "join",
                match &self.join {
                    Some(j) => map(vec![
                        ("cage", Value::str(j.cage.as_str())),
                        ("id", Value::str(j.id.as_str())),
                        ("index", Value::Int(j.index)),
                        ("holder", opt_str(&j.holder)),
                    ]),
                    None => Value::Nil,
                },
            ),
            ("alias", opt_str(&self.alias)),
        ])
    }

    /// Reads a continuation, from this file or from a forwarded call of another process.
    pub(crate) fn from_value(v: &Value) -> Result<Cont, String> {
        let Value::Map(m) = v else { return Err("a continuation is a map of its fields".into()) };
        let next = match field(m, "next") {
            None | Some(Value::Nil) => Vec::new(),
            Some(Value::Array(a)) if a.len() <= MAX_WORKFLOW_STEPS => a.clone(),
            Some(_) => return Err(format!("field next must be an array of at most {MAX_WORKFLOW_STEPS} steps")),
        };
        let join = match field(m, "join") {
            None | Some(Value::Nil) => None,
            Some(Value::Map(j)) => {
                let of_join = |e: String| format!("{e} (of field join)");
                Some(Join {
                    cage: text(j, "cage").map_err(of_join)?,
                    id: text(j, "id").map_err(of_join)?,
                    index: match field(j, "index") {
                        Some(Value::Int(i)) if (1..=MAX_WORKFLOW_STEPS as i64).contains(i) => *i,
                        _ => return Err("field join.index must be a member index".into()),
                    },
                    holder: opt_text(j, "holder").map_err(of_join)?,
                })
            }
            Some(_) => return Err("field join must be a map".into()),
        };
        let wf = text(m, "wf")?;
        if wf.is_empty() || wf.len() > MAX_WORKFLOW_ID {
            return Err(format!("workflow ids are 1 to {MAX_WORKFLOW_ID} bytes"));
        }
        let on_error = match field(m, "on_error") {
            None | Some(Value::Nil) => None,
            Some(v) => Some(v.clone()),
        };
        Ok(Cont { wf, origin: text(m, "origin")?, next, on_error, join, alias: opt_text(m, "alias")? })
    }

    pub(crate) fn encode(&self) -> Result<Vec<u8>, String> {
        encode(&self.to_value(), MAX_VALUE).map_err(|e| format!("the workflow's continuation: {e}"))
    }

    fn decode(bytes: &[u8]) -> Result<Cont, String> {
        Cont::from_value(&decode(bytes).map_err(|e| format!("a stored continuation cannot be read: {e}"))?)
    }
}

/// A step's row, stored by the sending cage: in its own queue, or its outbox.
pub(crate) enum Row {
    Direct(NewCall),
    Out(OutboxCall),
}

/// Makes the row of step `id` that `store` stores. `on_worker`: the workflow is being started
/// on a worker thread, whose transport says whether cages of other processes can be reached
/// and how large a call may be; the writer, storing a later step, puts a call for a cage of
/// another process in the outbox whatever it knows (forwarding says the rest).
pub(crate) fn row(store: &Store, id: &str, mut call: DurableCall, cont: &Cont, on_worker: bool) -> Result<Row, String> {
    call.options.id = Some(id.to_string());
    let target = call.target();
    let queue = call.options.queue.clone();
    crate::check_names(&call)?;
    let bytes = cont.encode().map_err(|e| format!("calling {target}: {e}"))?;
    let mut out = if call.cage == store.cage && !store.clustered(&queue) {
        let q = store.queue(&target, &queue)?;
        let mut r = store.call_row(call, q)?;
        r.workflow = Some(cont.wf.clone());
        r.cont = Some(bytes);
        return Ok(Row::Direct(r));
    } else if let Some(t) = store_of(&call.cage) {
        // A cage of this process, or a clustered queue of this one: through the outbox, whose
        // forward hands it to the target's accept, which publishes a clustered step to its
        // stream with the continuation in its message (decision 152).
        let expiry = t.queue(&target, &queue)?.expires_in;
        crate::outgoing_call(call, Some(expiry))?
    } else if on_worker {
        if !rustomnic_lua::worker::has_remote() {
            return Err(crate::no_cage_here(&call));
        }
        crate::remote_outgoing(call)?
    } else {
        let expiry = durable::directory_of(&call.cage).and_then(|qs| qs.into_iter().find(|q| q.name == queue)).map(|q| q.expires_in);
        crate::outgoing_call(call, expiry)?
    };
    out.workflow = Some(cont.wf.clone());
    out.cont = Some(bytes);
    Ok(Row::Out(out))
}

/// What a commit of the writer does once it is on disk: the outbox changed, ends to publish.
#[derive(Default)]
pub(crate) struct After {
    pub outbox: bool,
    /// (cages, id, status): the end of a group or chord.
    pub ends: Vec<([String; 2], String, CallStatus)>,
}

impl After {
    pub(crate) fn publish(&self) {
        for (cages, id, status) in &self.ends {
            crate::publish_end([&cages[0], &cages[1]], id, status);
        }
    }
}

/// Whether workflow `wf` was cancelled in this file.
fn cancelled(tx: &Connection, store: &Store, wf: &str) -> Result<bool, String> {
    tx.prepare_cached("SELECT 1 FROM queue_workflows WHERE id = ?1 AND status = 'cancelled'")
        .and_then(|mut s| s.exists([wf]))
        .map_err(|e| sql(store, "cannot read a workflow", e))
}

fn sql(store: &Store, action: &str, e: rusqlite::Error) -> String {
    rustomnic_resource_state::store::sql_error(&store.path, &format!("queue: {action}"), e).message
}

/// How a step ended.
enum End {
    Done(Vec<Value>),
    Dead(String),
}

/// After the end of call `seq` was written in `tx` (done, or dead: by its last attempt or
/// its expiry), stores what its continuation says comes next, in the same transaction.
pub(crate) fn after_call_end(tx: &Connection, store: &Store, seq: i64, after: &mut After) -> Result<(), String> {
    type Ended = (String, Option<Vec<u8>>, String, Option<Vec<u8>>, Option<String>);
    let row: Option<Ended> = tx
        .prepare_cached("SELECT id, cont, status, result, error FROM queue_calls WHERE seq = ?1")
        .and_then(|mut s| s.query_row([seq], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))).optional())
        .map_err(|e| sql(store, "cannot read a call", e))?;
    let Some((id, Some(bytes), status, result, error)) = row else { return Ok(()) };
    let end = match status.as_str() {
        "done" => End::Done(match result.as_deref().map(decode) {
            Some(Ok(Value::Array(values))) => values,
            Some(Ok(other)) => vec![other],
            _ => Vec::new(),
        }),
        "dead" => End::Dead(error.unwrap_or_default()),
        _ => return Ok(()),
    };
    fire(tx, store, &id, &bytes, end, after)
}

/// After an outbox row was written dead (never accepted by its target): a step of a workflow
/// is then dead, and its on_error step or its join hears so.
pub(crate) fn after_outbox_dead(tx: &Connection, store: &Store, seq: i64, error: &str, after: &mut After) -> Result<(), String> {
    let row: Option<(String, Option<Vec<u8>>)> = tx
        .prepare_cached("SELECT id, cont FROM queue_outbox WHERE seq = ?1")
        .and_then(|mut s| s.query_row([seq], |r| Ok((r.get(0)?, r.get(1)?))).optional())
        .map_err(|e| sql(store, "cannot read the outbox", e))?;
    let Some((id, Some(bytes))) = row else { return Ok(()) };
    fire(tx, store, &id, &bytes, End::Dead(format!("never accepted by its cage: {error}")), after)
}

/// The end of a step of a clustered queue (its record is in JetStream, not in this file):
/// what comes next is stored in the file of the copy that ran it, in the commit that also holds
/// the attempt's state writes, before the record says done or dead (decision 152).
#[derive(Debug, Clone)]
pub(crate) struct StepEnd {
    pub id: String,
    pub cont: Vec<u8>,
    /// Its values, or the error it is dead with.
    pub end: Result<Vec<Value>, String>,
}

/// Stores what comes after the clustered step `e`, in the writer's transaction.
pub(crate) fn after_step_end(tx: &Connection, store: &Store, e: &StepEnd, after: &mut After) -> Result<(), String> {
    let end = match &e.end {
        Ok(values) => End::Done(values.clone()),
        Err(error) => End::Dead(error.clone()),
    };
    fire(tx, store, &e.id, &e.cont, end, after)
}

fn fire(tx: &Connection, store: &Store, id: &str, bytes: &[u8], end: End, after: &mut After) -> Result<(), String> {
    let cont = match Cont::decode(bytes) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(cage = %store.cage, call = %id, "workflow step: {e}; nothing after it is stored");
            return Ok(());
        }
    };
    if let Some(chord) = &cont.alias {
        let status = match &end {
            End::Done(values) => CallStatus { status: "done".into(), cage: store.cage.clone(), attempts: None, value: Some(values.clone()), error: None },
            End::Dead(e) => {
                CallStatus { status: "dead".into(), cage: store.cage.clone(), attempts: None, value: None, error: Some(format!("its body {id} is dead: {e}")) }
            }
        };
        after.ends.push(([store.cage.clone(), cont.origin.clone()], chord.clone(), status));
    }
    match end {
        End::Done(values) => {
            let first = values.into_iter().next().unwrap_or(Value::Nil);
            if let Some(join) = &cont.join {
                return part(tx, store, join, id, Ok(first), after);
            }
            let Some((next, rest)) = cont.next.split_first() else { return Ok(()) };
            let (next_id, mut call) = match step_from(next) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(cage = %store.cage, workflow = %cont.wf, "the step after {id} cannot be read: {e}");
                    return on_error(tx, store, &cont, id, &e, after);
                }
            };
            call.args.insert(0, first);
            let c = Cont { next: rest.to_vec(), join: None, alias: None, ..cont.clone() };
            store_step(tx, store, &next_id, call, &c, after)
        }
        End::Dead(error) => {
            if let Some(join) = &cont.join {
                part(tx, store, join, id, Err(error.clone()), after)?;
            }
            on_error(tx, store, &cont, id, &error, after)
        }
    }
}

/// Stores step `id` unless its workflow was cancelled here; a step that cannot be stored (its
/// queue is gone, its arguments too large) is logged and makes the workflow's on_error run.
fn store_step(tx: &Connection, store: &Store, id: &str, call: DurableCall, cont: &Cont, after: &mut After) -> Result<(), String> {
    if cancelled(tx, store, &cont.wf)? {
        return Ok(());
    }
    match row(store, id, call, cont, false) {
        Ok(Row::Direct(r)) => store::insert(tx, &store.path, &r).map(|_| ()),
        Ok(Row::Out(r)) => {
            after.outbox = true;
            store::outbox_insert(tx, &store.path, &r).map(|_| ())
        }
        Err(e) => {
            if let Some(note) = store.log.allow("workflow") {
                tracing::error!(cage = %store.cage, workflow = %cont.wf, "step {id} cannot be stored: {e}{note}");
            }
            if id.ends_with(".on_error") {
                return Ok(());
            }
            on_error(tx, store, cont, id, &e, after)
        }
    }
}

/// Stores the workflow's on_error step, if it has one, for step `failed` that ended with `error`.
fn on_error(tx: &Connection, store: &Store, cont: &Cont, failed: &str, error: &str, after: &mut After) -> Result<(), String> {
    let Some(step) = &cont.on_error else { return Ok(()) };
    let (id, mut call) = match step_from(step) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(cage = %store.cage, workflow = %cont.wf, "its on_error step cannot be read: {e}");
            return Ok(());
        }
    };
    call.args.insert(0, map(vec![("workflow", Value::str(cont.wf.as_str())), ("step", Value::str(failed)), ("error", Value::str(error))]));
    let c = Cont { wf: cont.wf.clone(), origin: cont.origin.clone(), next: Vec::new(), on_error: None, join: None, alias: None };
    store_step(tx, store, &id, call, &c, after)
}

/// A member's end, for its join.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Part {
    pub join: String,
    pub index: i64,
    pub member: String,
    /// The member's first value, or its error.
    pub end: Result<Value, String>,
}

impl Part {
    pub(crate) fn to_value(&self) -> Value {
        let (status, value, error) = match &self.end {
            Ok(v) => ("done", v.clone(), Value::Nil),
            Err(e) => ("dead", Value::Nil, Value::str(e.as_str())),
        };
        map(vec![
            ("join", Value::str(self.join.as_str())),
            ("index", Value::Int(self.index)),
            ("member", Value::str(self.member.as_str())),
            ("status", Value::str(status)),
            ("value", value),
            ("error", error),
        ])
    }

    /// Reads a part forwarded by another cage (`_queue.join`).
    pub(crate) fn from_args(args: Vec<Value>) -> Result<Part, String> {
        let mut args = args.into_iter();
        let (Some(Value::Map(mut m)), None) = (args.next(), args.next()) else {
            return Err("a part of a join is one map of its fields".into());
        };
        let end = match text(&m, "status")?.as_str() {
            // Moved out, not copied: the value is as large as the message that brought it
            // (decision 060; the first one of that name, as `field` reads).
            "done" => Ok(match m.iter().position(|(k, _)| k.as_str() == Some("value")) {
                Some(i) => m.remove(i).1,
                None => Value::Nil,
            }),
            "dead" => Err(text(&m, "error")?),
            other => return Err(format!("a part of a join is done or dead, not {:?}", shown(other))),
        };
        let index = match field(&m, "index") {
            Some(Value::Int(i)) if (1..=MAX_WORKFLOW_STEPS as i64).contains(i) => *i,
            _ => return Err("field index of a part must be a member index".into()),
        };
        Ok(Part { join: text(&m, "join")?, index, member: text(&m, "member")?, end })
    }
}

/// At most the first 32 characters of `s`, for a refusal that quotes what a peer sent: the
/// refusal is logged and sent back, and the peer's text could be as long as a message.
fn shown(s: &str) -> String {
    match s.char_indices().nth(32) {
        Some((end, _)) => format!("{}...", &s[..end]),
        None => s.to_string(),
    }
}

/// A chord's body as its join keeps it (queue_joins.body): the body step (a [`step_value`])
/// and the workflow's on_error step, stored when the last member's part arrives.
pub(crate) fn body_bytes(step: Value, on_error: Option<Value>) -> Result<Vec<u8>, String> {
    let v = map(vec![("body", step), ("on_error", on_error.unwrap_or(Value::Nil))]);
    encode(&v, MAX_VALUE).map_err(|e| format!("the chord's body: {e}"))
}

/// Reads what [`body_bytes`] made: (body step id, its call, the on_error step). The file could
/// be damaged, or written by another version.
pub(crate) fn read_body(bytes: &[u8]) -> Result<(String, DurableCall, Option<Value>), String> {
    let Value::Map(m) = decode(bytes)? else { return Err("a chord's body is a map of its fields".into()) };
    let (id, call) = step_from(field(&m, "body").ok_or("field body is missing")?)?;
    Ok((id, call, field(&m, "on_error").filter(|v| !matches!(v, Value::Nil)).cloned()))
}

/// Hands a member's end to its join: applied here when this cage holds it, else stored in
/// the outbox for the cage that does (`_queue.join`, applied once by (join, index)).
fn part(tx: &Connection, store: &Store, join: &Join, member: &str, end: Result<Value, String>, after: &mut After) -> Result<(), String> {
    let p = Part { join: join.id.clone(), index: join.index, member: member.to_string(), end };
    // Held here: this cage, and this file (a copy of the cage in another process, with a file
    // of its own, does not hold it).
    if join.cage == store.cage && join.holder.as_ref().is_none_or(|h| *h == crate::holder::key_of(&store.path)) {
        return apply_part(tx, store, &p, after);
    }
    let now = now_ms();
    let args = match encode(&Value::Array(vec![p.to_value()]), MAX_VALUE) {
        Ok(a) => a,
        Err(e) => {
            let dead = Part { end: Err(format!("its value cannot be kept: {e}")), ..p };
            encode(&Value::Array(vec![dead.to_value()]), MAX_VALUE).map_err(|e| format!("workflow {}: a part of its join: {e}", join.id))?
        }
    };
    let row = OutboxCall {
        id: format!("{member}:join"),
        cage: join.cage.clone(),
        // A part has no queue: this column names the file that holds its join, when known
        // (the forward sends it there, crate::holder).
        queue: join.holder.clone().unwrap_or_default(),
        module: ACCEPT_MODULE.into(),
        function: JOIN_FUNCTION.into(),
        args,
        created_ms: now,
        due_ms: now,
        expires_ms: now.saturating_add(PART_WINDOW_MS),
        expires_given: true,
        max_attempts: None,
        trace: None,
        workflow: None,
        cont: None,
    };
    after.outbox = true;
    store::outbox_insert(tx, &store.path, &row).map(|_| ())
}

/// Applies a member's end to its join in this file, once per (join, index). The part that
/// completes the join stores the chord's body (or ends the group) in the same transaction; a
/// dead member ends the join dead at once (the others still run; their parts are kept).
pub(crate) fn apply_part(tx: &Connection, store: &Store, p: &Part, after: &mut After) -> Result<(), String> {
    let (status, value, error) = match &p.end {
        Ok(v) => match encode(v, MAX_VALUE) {
            Ok(bytes) => ("done", Some(bytes), None),
            Err(e) => ("dead", None, Some(format!("its value cannot be kept: {e}"))),
        },
        Err(e) => ("dead", None, Some(e.clone())),
    };
    let inserted = tx
        .prepare_cached("INSERT INTO queue_join_parts (join_id, idx, member, status, value, error) VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT DO NOTHING")
        .and_then(|mut s| s.execute(params![p.join, p.index, p.member, status, value, error]))
        .map_err(|e| sql(store, "cannot store a part of a join", e))?;
    if inserted == 0 {
        return Ok(());
    }
    let join: Option<(String, i64, String, Option<Vec<u8>>)> = tx
        .prepare_cached("SELECT workflow, size, status, body FROM queue_joins WHERE id = ?1")
        .and_then(|mut s| s.query_row([&p.join], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))).optional())
        .map_err(|e| sql(store, "cannot read a join", e))?;
    let Some((wf, size, jstatus, body)) = join else {
        if let Some(note) = store.log.allow("join") {
            tracing::warn!(cage = %store.cage, "member {} reports to join {}, which this cage does not hold{note}", p.member, p.join);
        }
        return Ok(());
    };
    if jstatus != "pending" {
        return Ok(());
    }
    let now = now_ms();
    let ends = [store.cage.clone(), store.cage.clone()];
    if let Some(error) = error {
        let error = format!("member {} is dead: {error}", p.member);
        tx.prepare_cached("UPDATE queue_joins SET status = 'dead', error = ?2, finished_ms = ?3, keep_until_ms = ?4 WHERE id = ?1")
            .and_then(|mut s| s.execute(params![p.join, error, now, now.saturating_add(ENDED_KEPT_MS)]))
            .map_err(|e| sql(store, "cannot end a join", e))?;
        let status = CallStatus { status: "dead".into(), cage: store.cage.clone(), attempts: None, value: None, error: Some(error) };
        after.ends.push((ends, p.join.clone(), status));
        return Ok(());
    }
    let done: i64 = tx
        .prepare_cached("SELECT count(*) FROM queue_join_parts WHERE join_id = ?1 AND status = 'done'")
        .and_then(|mut s| s.query_row([&p.join], |r| r.get(0)))
        .map_err(|e| sql(store, "cannot read a join", e))?;
    if done < size {
        return Ok(());
    }
    let values = join_values(tx, store, &p.join)?;
    let result = Value::Array(values);
    let bytes = encode(&result, MAX_VALUE).map_err(|e| format!("join {}: its results: {e}", p.join));
    let (status, stored, error) = match bytes {
        Ok(b) => ("done", Some(b), None),
        Err(e) => ("dead", None, Some(e)),
    };
    tx.prepare_cached("UPDATE queue_joins SET status = ?2, result = ?3, error = ?4, finished_ms = ?5, keep_until_ms = ?6 WHERE id = ?1")
        .and_then(|mut s| s.execute(params![p.join, status, stored, error, now, now.saturating_add(ENDED_KEPT_MS)]))
        .map_err(|e| sql(store, "cannot end a join", e))?;
    if let Some(error) = error {
        after.ends.push((
            ends,
            p.join.clone(),
            CallStatus { status: "dead".into(), cage: store.cage.clone(), attempts: None, value: None, error: Some(error) },
        ));
        return Ok(());
    }
    let Some(body) = body else {
        let status = CallStatus { status: "done".into(), cage: store.cage.clone(), attempts: None, value: Some(vec![result]), error: None };
        after.ends.push((ends, p.join.clone(), status));
        return Ok(());
    };
    // A chord: its body, with the results as its first argument.
    let (id, mut call, on_error) = match read_body(&body) {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(cage = %store.cage, workflow = %wf, "the body of chord {} cannot be read: {e}", p.join);
            return Ok(());
        }
    };
    call.args.insert(0, result);
    let c = Cont { wf, origin: store.cage.clone(), next: Vec::new(), on_error, join: None, alias: Some(p.join.clone()) };
    store_step(tx, store, &id, call, &c, after)
}

/// The first values of a join's members, in member order.
fn join_values(tx: &Connection, store: &Store, join: &str) -> Result<Vec<Value>, String> {
    let mut stmt = tx.prepare_cached("SELECT value FROM queue_join_parts WHERE join_id = ?1 ORDER BY idx").map_err(|e| sql(store, "cannot read a join", e))?;
    let rows = stmt.query_map([join], |r| r.get::<_, Option<Vec<u8>>>(0)).map_err(|e| sql(store, "cannot read a join", e))?;
    let mut values = Vec::new();
    for r in rows {
        let bytes = r.map_err(|e| sql(store, "cannot read a join", e))?;
        values.push(bytes.and_then(|b| decode(&b).ok()).unwrap_or(Value::Nil));
    }
    Ok(values)
}

/// A workflow's record and first rows, committed together by the writer of the cage that
/// starts it.
pub(crate) struct Start {
    pub id: String,
    pub kind: &'static str,
    /// The step whose end is the workflow's (a chain's last, a chord's body).
    pub last_step: Option<String>,
    /// (size, body) of a group's or chord's join, held by this cage under the workflow id.
    pub join: Option<(i64, Option<Vec<u8>>)>,
    pub direct: Vec<NewCall>,
    pub outgoing: Vec<OutboxCall>,
}

/// Writes a workflow's start in the writer's transaction.
pub(crate) fn write_start(tx: &Connection, store: &Store, s: &Start) -> Result<(), String> {
    let now = now_ms();
    tx.prepare_cached("INSERT INTO queue_workflows (id, kind, status, last_step, created_ms, keep_until_ms) VALUES (?1, ?2, 'running', ?3, ?4, ?5) ON CONFLICT (id) DO NOTHING")
        .and_then(|mut st| st.execute(params![s.id, s.kind, s.last_step, now, now.saturating_add(RECORD_KEPT_MS)]))
        .map_err(|e| sql(store, "cannot store a workflow", e))?;
    if let Some((size, body)) = &s.join {
        tx.prepare_cached(
            "INSERT INTO queue_joins (id, workflow, size, body, created_ms, keep_until_ms) VALUES (?1, ?1, ?2, ?3, ?4, ?5) ON CONFLICT (id) DO NOTHING",
        )
        .and_then(|mut st| st.execute(params![s.id, size, body, now, now.saturating_add(RECORD_KEPT_MS)]))
        .map_err(|e| sql(store, "cannot store a join", e))?;
    }
    for c in &s.direct {
        store::insert(tx, &store.path, c)?;
    }
    for c in &s.outgoing {
        store::outbox_insert(tx, &store.path, c)?;
    }
    Ok(())
}

/// Starts a workflow made in a request of cage `w.from_cage` (on its worker thread): its
/// record, its join and its first steps in one commit of that cage's file.
pub(crate) async fn start(w: Workflow) -> Result<String, String> {
    let Some(origin) = store_of(&w.from_cage) else {
        return Err(format!("cage {} has no queue store in this process", w.from_cage));
    };
    if let Some(why) = origin.refusing() {
        return Err(format!("cage {} accepts no new durable calls: {why}", origin.cage));
    }
    let n = w.steps.len();
    if n == 0 || n > MAX_WORKFLOW_STEPS {
        return Err(format!("a workflow has 1 to {MAX_WORKFLOW_STEPS} steps, got {n}"));
    }
    let wf = w.id.clone().unwrap_or_else(new_call_id);
    if wf.is_empty() || wf.len() > MAX_WORKFLOW_ID {
        return Err(format!("workflow ids are 1 to {MAX_WORKFLOW_ID} bytes"));
    }
    let on_error = w.on_error.as_ref().map(|c| step_value(&format!("{wf}.on_error"), c));
    if let Some(c) = &w.on_error {
        check_step(c)?;
    }
    let base = Cont { wf: wf.clone(), origin: origin.cage.clone(), next: Vec::new(), on_error: None, join: None, alias: None };
    let holder = crate::holder::holder_of(&origin);
    let mut rows = Vec::new();
    let (last_step, join) = match w.shape {
        Shape::Chain => {
            for c in &w.steps[1..] {
                check_step(c)?;
            }
            let next = w.steps[1..].iter().enumerate().map(|(i, c)| step_value(&format!("{wf}.{}", i + 2), c)).collect();
            let cont = Cont { next, on_error: on_error.clone(), ..base.clone() };
            rows.push(row(&origin, &format!("{wf}.1"), w.steps[0].clone(), &cont, true)?);
            (Some(format!("{wf}.{n}")), None)
        }
        Shape::Group | Shape::Chord => {
            for (i, c) in w.steps.iter().enumerate() {
                let join = Join { cage: origin.cage.clone(), id: wf.clone(), index: i as i64 + 1, holder: holder.clone() };
                let cont = Cont { on_error: on_error.clone(), join: Some(join), ..base.clone() };
                rows.push(row(&origin, &format!("{wf}.{}", i + 1), c.clone(), &cont, true)?);
            }
            let body = match &w.body {
                Some(b) => {
                    check_step(b)?;
                    Some(body_bytes(step_value(&format!("{wf}.body"), b), on_error.clone())?)
                }
                None => None,
            };
            (body.as_ref().map(|_| format!("{wf}.body")), Some((n as i64, body)))
        }
    };
    let (mut direct, mut outgoing) = (Vec::new(), Vec::new());
    for r in rows {
        match r {
            Row::Direct(c) => direct.push(c),
            Row::Out(c) => outgoing.push(c),
        }
    }
    let start = Start { id: wf.clone(), kind: w.shape.name(), last_step, join, direct, outgoing };
    let (tx, rx) = tokio::sync::oneshot::channel();
    origin.send(writer::Op::Workflow { start, reply: tx })?;
    rx.await.unwrap_or_else(|_| Err(format!("the queue writer of cage {} stopped", origin.cage)))?;
    Ok(wf)
}

/// The checks of a step that do not depend on where it is stored from: its names, and its
/// target's queue when the target runs in this process (known).
pub(crate) fn check_step(call: &DurableCall) -> Result<(), String> {
    crate::check_names(call)?;
    if call.options.id.is_some() {
        return Err(format!("calling {}: option id is not taken by a workflow step: its id is derived from its workflow's", call.target()));
    }
    if let Some(t) = store_of(&call.cage) {
        t.queue(&call.target(), &call.options.queue)?;
    } else if let Some(queues) = durable::directory_of(&call.cage) {
        if !queues.iter().any(|q| q.name == call.options.queue) {
            let known: Vec<&str> = queues.iter().map(|q| q.name.as_str()).collect();
            return Err(crate::no_queue(&call.target(), &call.cage, &call.options.queue, &known));
        }
    }
    Ok(())
}

/// What a cancel of a workflow did in one file.
#[derive(Debug, Default, Clone)]
pub(crate) struct Cancelled {
    /// Its status in this file's record before (running, cancelled), if it had one.
    pub was: Option<String>,
    /// Whether this file had anything of it (record, steps, join).
    pub known: bool,
    /// (call id, status it was in, its sender, attempts) of every step cancelled now.
    pub calls: Vec<(String, String, String, i64)>,
    /// Joins cancelled now.
    pub joins: Vec<String>,
}

/// Cancels workflow `id` in this file: marks it cancelled (so no later step is stored here, and
/// a step that arrives later is stored cancelled), cancels its waiting steps and its joins.
pub(crate) fn cancel(tx: &Connection, path: &std::path::Path, id: &str, keep_until_ms: i64) -> Result<Cancelled, String> {
    let fail = |e| rustomnic_resource_state::store::sql_error(path, "queue: cannot cancel a workflow", e).message;
    let now = now_ms();
    let mut out =
        Cancelled { was: tx.query_row("SELECT status FROM queue_workflows WHERE id = ?1", [id], |r| r.get(0)).optional().map_err(fail)?, ..Default::default() };
    out.known = out.was.is_some()
        || tx
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM queue_calls WHERE workflow = ?1) OR EXISTS (SELECT 1 FROM queue_outbox WHERE workflow = ?1) OR EXISTS (SELECT 1 FROM queue_joins WHERE workflow = ?1)",
                [id],
                |r| r.get(0),
            )
            .map_err(fail)?;
    tx.execute(
        "INSERT INTO queue_workflows (id, kind, status, created_ms, keep_until_ms) VALUES (?1, '', 'cancelled', ?2, ?3)
         ON CONFLICT (id) DO UPDATE SET status = 'cancelled', keep_until_ms = max(keep_until_ms, excluded.keep_until_ms)",
        params![id, now, keep_until_ms.max(now.saturating_add(RECORD_KEPT_MS))],
    )
    .map_err(fail)?;
    let waiting: Vec<(String, String, i64)> = {
        let mut stmt =
            tx.prepare("SELECT id, from_cage, attempts FROM queue_calls INDEXED BY queue_calls_workflow WHERE workflow = ?1 AND status IN ('pending', 'failed') ORDER BY seq").map_err(fail)?;
        let rows = stmt.query_map([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).map_err(fail)?;
        rows.collect::<Result<_, _>>().map_err(fail)?
    };
    for (call, from, attempts) in waiting {
        if let store::Cancel::Cancelled(was) = store::cancel(tx, path, &call, keep_until_ms)? {
            out.calls.push((call, was, from, attempts));
        }
    }
    let joins: Vec<String> = {
        let mut stmt = tx.prepare("SELECT id FROM queue_joins WHERE workflow = ?1 AND status = 'pending'").map_err(fail)?;
        let rows = stmt.query_map([id], |r| r.get(0)).map_err(fail)?;
        rows.collect::<Result<_, _>>().map_err(fail)?
    };
    for j in &joins {
        tx.execute(
            "UPDATE queue_joins SET status = 'cancelled', error = 'cancelled', finished_ms = ?2, keep_until_ms = ?3 WHERE id = ?1",
            params![j, now, now.saturating_add(ENDED_KEPT_MS)],
        )
        .map_err(fail)?;
    }
    out.joins = joins;
    Ok(out)
}

/// The steps of workflow `id` that this file knows of, as (cage, queue, step id): its rows in
/// the queue and the outbox, the later steps and on_error step their continuations carry, and
/// a chord's body. What a cancel looks for in the clustered queues' buckets (decision 152).
pub(crate) fn known_steps(conn: &Connection, path: &std::path::Path, cage: &str, id: &str) -> Result<Vec<(String, String, String)>, String> {
    let fail = |e| rustomnic_resource_state::store::sql_error(path, "queue: cannot read a workflow", e).message;
    let mut out: Vec<(String, String, String)> = Vec::new();
    let mut add = |v: &Value| {
        if let Ok((sid, call)) = step_from(v) {
            out.push((call.cage, call.options.queue, sid));
        }
    };
    let mut conts: Vec<Vec<u8>> = Vec::new();
    let mut rows: Vec<(String, String, String)> = Vec::new();
    for sql in [
        "SELECT NULL, queue, id, cont FROM queue_calls INDEXED BY queue_calls_workflow WHERE workflow = ?1",
        "SELECT cage, queue, id, cont FROM queue_outbox INDEXED BY queue_outbox_workflow WHERE workflow = ?1",
    ] {
        let mut stmt = conn.prepare(sql).map_err(fail)?;
        // A row of this file's queue is a step of this cage (no cage column).
        let found = stmt
            .query_map([id], |r| {
                Ok((
                    r.get::<_, Option<String>>(0)?.unwrap_or_else(|| cage.to_string()),
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, Option<Vec<u8>>>(3)?,
                ))
            })
            .map_err(fail)?;
        for r in found {
            let (c, q, sid, cont) = r.map_err(fail)?;
            rows.push((c, q, sid));
            conts.extend(cont);
        }
    }
    for bytes in conts {
        if let Ok(c) = Cont::decode(&bytes) {
            c.next.iter().for_each(&mut add);
            if let Some(e) = &c.on_error {
                add(e);
            }
        }
    }
    let body: Option<Option<Vec<u8>>> = conn.query_row("SELECT body FROM queue_joins WHERE id = ?1", [id], |r| r.get(0)).optional().map_err(fail)?;
    if let Some(Ok(Value::Map(m))) = body.flatten().as_deref().map(decode) {
        for name in ["body", "on_error"] {
            if let Some(v) = field(&m, name) {
                add(v);
            }
        }
    }
    out.extend(rows);
    out.sort();
    out.dedup();
    Ok(out)
}

/// Which of `steps` (as [`known_steps`] gives them) are on clustered queues, by the cage whose
/// bucket holds their records, ids sorted. `clustered(cage, queue)`: whether the queue is
/// clustered, for a cage whose queues are known where the cancel runs; None for a cage
/// elsewhere, whose bucket is asked (it holds records of clustered calls only). Shared by
/// `pmnc.workflow.cancel` and `pmnc queue cancel` (decision 152).
pub(crate) fn clustered_by_cage(
    steps: impl IntoIterator<Item = (String, String, String)>,
    clustered: impl Fn(&str, &str) -> Option<bool>,
) -> Vec<(String, Vec<String>)> {
    let mut by_cage: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for (cage, queue, sid) in steps {
        if clustered(&cage, &queue).unwrap_or(true) {
            by_cage.entry(cage).or_default().push(sid);
        }
    }
    by_cage
        .into_iter()
        .map(|(c, mut ids)| {
            ids.sort();
            ids.dedup();
            (c, ids)
        })
        .collect()
}

/// The workflow's steps on clustered queues that the files of this process know of, by the
/// cage whose bucket holds their records.
fn clustered_steps(id: &str) -> Vec<(String, Vec<String>)> {
    let mut all = Vec::new();
    for s in crate::all_stores() {
        let Ok(conn) = s.reader.lock() else { continue };
        match known_steps(&conn, &s.path, &s.cage, id) {
            Ok(steps) => all.extend(steps),
            Err(e) => tracing::warn!(cage = %s.cage, workflow = %id, "cancel: {e}"),
        }
    }
    // A cage of this process says which of its queues are clustered.
    clustered_by_cage(all, |cage, queue| store_of(cage).map(|t| t.clustered(queue)))
}

/// `pmnc.workflow.cancel(id)` in every cage of this process.
pub(crate) async fn cancel_here(id: String) -> Result<CancelAnswer, String> {
    let mut was_running = false;
    let mut known = false;
    let mut already = false;
    let mut steps = Vec::new();
    for s in crate::all_stores() {
        let window = s.queues.values().map(|q| q.dedup_window.as_millis() as i64).max().unwrap_or(crate::DEFAULT_DEDUP_MS);
        let (tx, rx) = tokio::sync::oneshot::channel();
        s.send(writer::Op::CancelWorkflow { id: id.clone(), keep_until_ms: now_ms().saturating_add(window), reply: tx })?;
        let c = rx.await.unwrap_or_else(|_| Err(format!("the queue writer of cage {} stopped", s.cage)))?;
        known |= c.known;
        already |= c.was.as_deref() == Some("cancelled");
        was_running |= c.was.as_deref() == Some("running") || !c.calls.is_empty();
        for (call, _was, from, attempts) in &c.calls {
            let status =
                CallStatus { status: "cancelled".into(), cage: s.cage.clone(), attempts: Some(*attempts), value: None, error: Some("cancelled".into()) };
            crate::publish_end([&s.cage, from], call, &status);
            steps.push(call.clone());
        }
        for j in &c.joins {
            let status = CallStatus { status: "cancelled".into(), cage: s.cage.clone(), attempts: None, value: None, error: Some("cancelled".into()) };
            crate::publish_end([&s.cage, &s.cage], j, &status);
        }
    }
    // Its steps on clustered queues: their records in the buckets, read and changed by
    // compare-and-set (decision 151); a step not stored yet gets a `cancelled` record now, so
    // that the copy meeting it later acks it without running it (decision 152).
    let mut refused = Vec::new();
    let mut unreached = Vec::new();
    if rustomnic_cluster::joined().is_some() {
        for (cage, ids) in clustered_steps(&id) {
            // The cage's own clustered queues' connection when it runs here, else this
            // process's connection for joins (which reaches every bucket of the flock).
            let cancelled = match store_of(&cage).and_then(|s| s.cluster.get().cloned()) {
                Some(own) => own.cancel_steps(cage.clone(), ids.clone()).await,
                None => crate::holder::cancel_steps(cage.clone(), ids.clone()).await,
            };
            let found = match cancelled {
                Ok(found) => found,
                Err(e) => {
                    // The files are marked already: said, not raised, so the caller knows both.
                    unreached.push(format!("{} ({e})", ids.join(", ")));
                    continue;
                }
            };
            for (sid, done) in found {
                match done {
                    crate::jetstream::Cancelled::Now { from, .. } => {
                        let status =
                            CallStatus { status: "cancelled".into(), cage: cage.clone(), attempts: None, value: None, error: Some("cancelled".into()) };
                        crate::publish_end([&cage, from.as_deref().unwrap_or(&cage)], &sid, &status);
                        was_running = true;
                        known = true;
                        steps.push(sid);
                    }
                    crate::jetstream::Cancelled::Ending => {
                        known = true;
                        refused.push(sid);
                    }
                    _ => {}
                }
            }
        }
    }
    if !unreached.is_empty() {
        let message = format!(
            "workflow {id}: marked cancelled in the files of this process{}, but its steps on clustered queues could not be reached: {}; cancel again",
            if steps.is_empty() { String::new() } else { format!(" (cancelled: {})", steps.join(", ")) },
            unreached.join("; ")
        );
        return Ok(CancelAnswer { cancelled: !steps.is_empty(), status: Some("running".into()), message });
    }
    let message = if !known {
        format!("no workflow {id:?} in the cages of this process; it is marked cancelled, so a step of it that arrives here later never runs")
    } else if already && steps.is_empty() {
        format!("workflow {id} was already cancelled")
    } else if steps.is_empty() {
        format!("workflow {id} cancelled: no step of it was waiting here; no later step will be stored here")
    } else {
        format!(
            "workflow {id} cancelled: {} step{} cancelled ({}); no later step will be stored here",
            steps.len(),
            if steps.len() == 1 { "" } else { "s" },
            steps.join(", ")
        )
    };
    // A step that is ending stores its next step and ends done: too late for it, but the steps
    // after it were cancelled above (in advance when not stored yet), so none of them runs.
    let message = if refused.is_empty() {
        message
    } else {
        format!(
            "{message}; too late for step{} {} (ending now: it ends done; its later steps on clustered queues do not run)",
            if refused.len() == 1 { "" } else { "s" },
            refused.join(", ")
        )
    };
    let status = if !known {
        None
    } else if already && !was_running {
        Some("cancelled".to_string())
    } else {
        Some("running".to_string())
    };
    Ok(CancelAnswer { cancelled: known && !(already && steps.is_empty()), status, message })
}

/// What one file holds of a workflow.
#[derive(Debug, Default)]
pub(crate) struct View {
    /// (kind, status, last step) of its record here.
    pub record: Option<(String, String, Option<String>)>,
    /// (id, status, error, target, in the outbox) of its steps here, in storing order.
    pub steps: Vec<(String, String, Option<String>, String, bool)>,
    /// (size, status, error, members ended) of its join here.
    pub join: Option<(i64, String, Option<String>, i64)>,
}

impl View {
    pub(crate) fn is_empty(&self) -> bool {
        self.record.is_none() && self.steps.is_empty() && self.join.is_none()
    }
}

/// Reads what the file holds of workflow `id`.
pub(crate) fn view(conn: &Connection, path: &std::path::Path, id: &str) -> Result<View, String> {
    let fail = |e| rustomnic_resource_state::store::sql_error(path, "queue: cannot read a workflow", e).message;
    let record = conn
        .query_row("SELECT kind, status, last_step FROM queue_workflows WHERE id = ?1", [id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()
        .map_err(fail)?;
    let mut steps = Vec::new();
    for (sql, outbox) in [
        ("SELECT id, status, error, module || '.' || function FROM queue_calls INDEXED BY queue_calls_workflow WHERE workflow = ?1 ORDER BY seq", false),
        ("SELECT id, status, error, cage || '.' || module || '.' || function FROM queue_outbox INDEXED BY queue_outbox_workflow WHERE workflow = ?1 ORDER BY seq", true),
    ] {
        let mut stmt = conn.prepare(sql).map_err(fail)?;
        let rows = stmt.query_map([id], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, Option<String>>(2)?, r.get::<_, String>(3)?))).map_err(fail)?;
        for r in rows {
            let (sid, status, error, target) = r.map_err(fail)?;
            steps.push((sid, status, error, target, outbox));
        }
    }
    let join = conn
        .query_row("SELECT size, status, error, (SELECT count(*) FROM queue_join_parts WHERE join_id = ?1) FROM queue_joins WHERE id = ?1", [id], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })
        .optional()
        .map_err(fail)?;
    Ok(View { record, steps, join })
}

/// (id, status, error) of a step.
type Step = (String, String, Option<String>);
/// (status, result, body, error) of a join.
type JoinRow = (String, Option<Vec<u8>>, Option<Vec<u8>>, Option<String>);

/// Orders step ids: `<id>.1`, `<id>.2`, ..., then the body, then on_error.
fn step_rank(wf: &str, step: &str) -> (u8, u64, String) {
    let tail = step.strip_prefix(wf).and_then(|t| t.strip_prefix('.')).unwrap_or(step);
    match tail.parse::<u64>() {
        Ok(k) => (0, k, String::new()),
        Err(_) if tail == "body" => (1, 0, String::new()),
        Err(_) if tail == "on_error" => (2, 0, String::new()),
        Err(_) => (3, 0, tail.to_string()),
    }
}

/// Sums up what `views` (of the files of this process, or of one folder) say of workflow `id`.
pub(crate) fn summary(id: &str, views: &[(String, View)], seen: impl Fn(&str) -> Option<CallStatus>) -> Option<WorkflowStatus> {
    if views.iter().all(|(_, v)| v.is_empty()) {
        return None;
    }
    // A step's record in a queue wins over its row in an outbox (which only says where it went).
    let mut steps: std::collections::BTreeMap<(u8, u64, String), Step> = Default::default();
    for (_, v) in views {
        for (sid, status, error, _, outbox) in &v.steps {
            let key = step_rank(id, sid);
            let (status, error) = match (*outbox, status.as_str()) {
                (true, "forwarded") => match seen(sid) {
                    Some(end) => (end.status, end.error),
                    None => ("forwarded".to_string(), error.clone()),
                },
                _ => (status.clone(), error.clone()),
            };
            if *outbox && steps.contains_key(&key) {
                continue;
            }
            steps.insert(key, (sid.clone(), status, error));
        }
    }
    let steps: Vec<(String, String, Option<String>)> = steps.into_values().collect();
    let on_error = format!("{id}.on_error");
    let record = views.iter().find_map(|(_, v)| v.record.as_ref().filter(|r| !r.0.is_empty()));
    let join = views.iter().find_map(|(_, v)| v.join.as_ref());
    let cancelled = views.iter().any(|(_, v)| v.record.as_ref().is_some_and(|r| r.1 == "cancelled"));
    let dead = steps.iter().any(|(sid, st, _)| st == "dead" && *sid != on_error) || join.is_some_and(|j| j.1 == "dead");
    let status = if cancelled {
        "cancelled"
    } else if dead {
        "dead"
    } else {
        let last = record.and_then(|r| r.2.clone());
        let done = match (last, join) {
            (Some(last), _) => steps.iter().any(|(sid, st, _)| *sid == last && st == "done"),
            (None, Some(j)) => j.1 == "done",
            (None, None) => !steps.is_empty() && steps.iter().all(|(_, st, _)| st == "done"),
        };
        if done {
            "done"
        } else {
            "running"
        }
    };
    Some(WorkflowStatus { status: status.to_string(), steps })
}

/// What a join says as a call's status (`pmnc.calls.result(group id)`); a chord that ended is
/// its body's status, read by the caller.
pub(crate) fn join_status(conn: &Connection, store: &Store, id: &str) -> Result<Option<(CallStatus, bool)>, String> {
    let row: Option<JoinRow> = conn
        .prepare_cached("SELECT status, result, body, error FROM queue_joins WHERE id = ?1")
        .and_then(|mut s| s.query_row([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))).optional())
        .map_err(|e| sql(store, "cannot read a join", e))?;
    let Some((status, result, body, error)) = row else { return Ok(None) };
    let value = match result.as_deref().map(decode) {
        Some(Ok(v)) => Some(vec![v]),
        Some(Err(e)) => return Err(format!("group {id}: its stored results cannot be read: {e}")),
        None => None,
    };
    let chord_done = status == "done" && body.is_some();
    Ok(Some((CallStatus { status, cage: store.cage.clone(), attempts: None, value, error }, chord_done)))
}

/// What the `queue_workflow` fuzz target reads: parts of joins as they arrive from the flock
/// (crate::holder::read_part, then [`Part::from_args`] as the holder's store applies them),
/// continuations as a state file or a clustered queue's stream message keeps them
/// ([`Cont::decode`]), the steps they carry ([`step_from`], when they fire), and a chord's body
/// as its join keeps it ([`read_body`]). Each is the reading the runtime calls, and each
/// writes back as the runtime writes it.
pub mod fuzzing {
    use super::*;
    use crate::forward::Forwarded;
    use crate::holder::{part_message, read_part};

    /// What one reading of fuzz bytes (or of a value inside them) gave.
    #[derive(Debug, Clone, PartialEq)]
    pub enum Trip {
        /// Refused, with the reason the runtime would log or send back.
        Refused { what: &'static str, why: String },
        /// Read; written back as the runtime writes it, it read again as the same.
        Same { what: &'static str },
        /// Read, but writing it back, or reading that, went wrong: how.
        Broken { what: &'static str, how: String },
    }

    /// The stored form of a value, to compare two readings bit for bit (a NaN that a peer
    /// sent is not equal to itself; its bits are).
    fn bits(v: &Value) -> Vec<u8> {
        encode(v, usize::MAX).unwrap_or_else(|e| format!("unencodable: {e}").into_bytes())
    }

    // Two readings are compared field by field, each value by its bits: not through the
    // writer (comparing what two readings write would hide a writer that drops or swaps a
    // field).

    type ForwardedKey<'a> = (&'a str, &'a str, &'a str, &'a str, Vec<Vec<u8>>, [Option<i64>; 4], &'a Option<String>, Option<Vec<u8>>);

    fn forwarded_key(f: &Forwarded) -> ForwardedKey<'_> {
        (
            &f.queue,
            &f.id,
            &f.module,
            &f.function,
            f.args.iter().map(bits).collect(),
            [Some(f.created_ms), Some(f.due_ms), f.expires_ms, f.max_attempts],
            &f.trace,
            f.cont.as_ref().map(bits),
        )
    }

    fn part_key(p: &Part) -> (&str, i64, &str, Result<Vec<u8>, &str>) {
        (&p.join, p.index, &p.member, p.end.as_ref().map(bits).map_err(String::as_str))
    }

    type ContKey<'a> = (&'a str, &'a str, Vec<Vec<u8>>, Option<Vec<u8>>, &'a Option<Join>, &'a Option<String>);

    fn cont_key(c: &Cont) -> ContKey<'_> {
        (&c.wf, &c.origin, c.next.iter().map(bits).collect(), c.on_error.as_ref().map(bits), &c.join, &c.alias)
    }

    /// A step's call; its options hold only finite numbers, so they compare as they are.
    fn call_key(c: &DurableCall) -> (&str, &str, &str, &str, Vec<Vec<u8>>, &CallOptions) {
        (&c.from_cage, &c.cage, &c.module, &c.function, c.args.iter().map(bits).collect(), &c.options)
    }

    /// How the holder's process read a part of a join: the message, then its part. Kept apart
    /// from the round trip, so that a target can hold the runtime's reading (not the copies
    /// the round trip makes) to a memory budget.
    pub struct PartRead(Result<Result<Part, String>, String>);

    /// Reads `bytes` as a part of a join arriving on a holder's subject, as the holder does:
    /// crate::holder::read_part, then the part from the call's arguments, which the store
    /// takes by value ([`Part::from_args`]).
    pub fn read_part_message(bytes: &[u8]) -> PartRead {
        PartRead(read_part(bytes).map(|f| Part::from_args(f.args)))
    }

    /// The round trips of what [`read_part_message`] read from `bytes`: the message sent again
    /// as it is (a holder that answered `failed:` gets it again), the continuation a forwarded
    /// call may carry (`_queue.accept` reads it; the holder ignores it), and the part as its
    /// member's cage sends it.
    pub fn part_trips(bytes: &[u8], read: PartRead) -> Vec<Trip> {
        let what = "part message";
        let (part, f) = match (read.0, read_part(bytes)) {
            (Err(why), _) => return vec![Trip::Refused { what, why }],
            (Ok(part), Ok(f)) => (part, f),
            (Ok(_), Err(e)) => return vec![Trip::Broken { what, how: format!("read once, refused the second time: {e}") }],
        };
        match part_message(&f).and_then(|b| read_part(&b)) {
            Ok(again) if forwarded_key(&again) == forwarded_key(&f) => {}
            Ok(again) => return vec![Trip::Broken { what, how: format!("{f:?} was sent again as {again:?}") }],
            Err(e) => return vec![Trip::Broken { what, how: format!("{f:?} cannot be sent again: {e}") }],
        }
        let mut out = Vec::new();
        if let Some(v) = &f.cont {
            out.extend(cont_value(v, "continuation of a forwarded call"));
        }
        let what = "part of a join";
        let p = match part {
            Ok(p) => p,
            Err(why) => {
                out.push(Trip::Refused { what, why });
                return out;
            }
        };
        // Its one argument, in the same forwarded call.
        let sent = Forwarded { args: vec![p.to_value()], ..f };
        let back = part_message(&sent).and_then(|b| read_part(&b)).and_then(|again| Ok((Part::from_args(again.args.clone())?, again)));
        out.push(match back {
            Ok((p2, again)) if part_key(&p2) == part_key(&p) && forwarded_key(&again) == forwarded_key(&sent) => Trip::Same { what },
            Ok((p2, _)) => Trip::Broken { what, how: format!("{p:?} was written back as {p2:?}") },
            Err(e) => Trip::Broken { what, how: format!("{p:?} does not write back: {e}") },
        });
        out
    }

    /// A continuation as the runtime read it (see [`PartRead`]).
    pub struct ContRead(Result<Cont, String>);

    /// Reads `bytes` as a stored continuation: the `cont` column of a step's row, or of a
    /// clustered queue's stream message ([`Cont::decode`]).
    pub fn read_cont(bytes: &[u8]) -> ContRead {
        ContRead(Cont::decode(bytes))
    }

    /// The round trips of what [`read_cont`] read: the continuation stored as the writer
    /// stores it, then each step it carries, read as when it fires.
    pub fn cont_trips(read: ContRead) -> Vec<Trip> {
        let what = "continuation";
        match read.0 {
            Ok(c) => cont_and_steps(&c, what),
            Err(why) => vec![Trip::Refused { what, why }],
        }
    }

    /// A chord's body as the runtime read it (see [`PartRead`]).
    pub struct BodyRead(Result<(String, DurableCall, Option<Value>), String>);

    /// Reads `bytes` as a chord's body kept by its join ([`read_body`]).
    pub fn read_chord_body(bytes: &[u8]) -> BodyRead {
        BodyRead(read_body(bytes))
    }

    /// The round trips of what [`read_chord_body`] read: the body kept again, then its
    /// on_error step.
    pub fn body_trips(read: BodyRead) -> Vec<Trip> {
        let what = "chord body";
        let (id, call, on_error) = match read.0 {
            Ok(b) => b,
            Err(why) => return vec![Trip::Refused { what, why }],
        };
        let back = body_bytes(step_value(&id, &call), on_error.clone()).and_then(|b| read_body(&b));
        let mut out = vec![match back {
            Ok((id2, call2, on_error2)) if id2 == id && call_key(&call2) == call_key(&call) && on_error2.as_ref().map(bits) == on_error.as_ref().map(bits) => {
                Trip::Same { what }
            }
            Ok(again) => Trip::Broken { what, how: format!("{:?} was written back as {again:?}", (&id, &call, &on_error)) },
            Err(e) => Trip::Broken { what, how: format!("{:?} does not write back: {e}", (&id, &call, &on_error)) },
        }];
        if let Some(v) = &on_error {
            out.push(step_trip(v));
        }
        out
    }

    /// A continuation read from a value (a forwarded call's), then the steps it carries.
    fn cont_value(v: &Value, what: &'static str) -> Vec<Trip> {
        match Cont::from_value(v) {
            Ok(c) => cont_and_steps(&c, what),
            Err(why) => vec![Trip::Refused { what, why }],
        }
    }

    /// The round trip of a continuation that read, then of each step it carries.
    fn cont_and_steps(c: &Cont, what: &'static str) -> Vec<Trip> {
        let mut out = vec![cont_trip(c, what)];
        for step in c.next.iter().chain(&c.on_error) {
            out.push(step_trip(step));
        }
        out
    }

    /// A continuation that read, stored as the writer stores it and read again.
    fn cont_trip(c: &Cont, what: &'static str) -> Trip {
        match c.encode().and_then(|b| Cont::decode(&b)) {
            Ok(c2) if cont_key(&c2) == cont_key(c) => Trip::Same { what },
            Ok(c2) => Trip::Broken { what, how: format!("{c:?} was stored as {c2:?}") },
            Err(e) => Trip::Broken { what, how: format!("{c:?} cannot be stored: {e}") },
        }
    }

    /// A step a continuation carries, read as when it fires, then kept again as a step.
    fn step_trip(v: &Value) -> Trip {
        let what = "workflow step";
        let (id, call) = match step_from(v) {
            Ok(s) => s,
            Err(why) => return Trip::Refused { what, why },
        };
        let kept = step_value(&id, &call);
        match step_from(&kept) {
            Ok((id2, call2)) if id2 == id && call_key(&call2) == call_key(&call) => Trip::Same { what },
            Ok(again) => Trip::Broken { what, how: format!("{:?} was kept as {again:?}", (id, call)) },
            Err(e) => Trip::Broken { what, how: format!("{:?} does not read back: {e}", (id, call)) },
        }
    }

    /// Parts, continuations and chord bodies as this build writes them (the target's seeds):
    /// a chain's step, a group's and a chord's members (with and without the join's holder),
    /// a chord's body step, an on_error step, and a forwarded step carrying its continuation.
    pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
        let call = |f: &str| DurableCall {
            from_cage: "web".into(),
            cage: "worker".into(),
            module: "work".into(),
            function: f.into(),
            args: vec![Value::Int(1), Value::str("x"), Value::Map(vec![(Value::str("k"), Value::Float(2.5))])],
            options: CallOptions {
                queue: "jobs".into(),
                delay: Some(1.5),
                expires_in: Some(60.0),
                max_attempts: Some(3),
                trace: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
                ..Default::default()
            },
        };
        let on_error = step_value("w.on_error", &call("failed"));
        let base = Cont { wf: "w".into(), origin: "web".into(), next: Vec::new(), on_error: Some(on_error.clone()), join: None, alias: None };
        let join = |index, holder: Option<&str>| Join { cage: "web".into(), id: "w".into(), index, holder: holder.map(str::to_string) };
        let conts = [
            ("cont-chain-step", Cont { next: vec![step_value("w.2", &call("two")), step_value("w.3", &call("three"))], ..base.clone() }),
            ("cont-group-member", Cont { join: Some(join(2, Some("00ff00ff00ff00ff"))), ..base.clone() }),
            ("cont-chord-member-no-holder", Cont { join: Some(join(1, None)), on_error: None, ..base.clone() }),
            ("cont-chord-body", Cont { alias: Some("w".into()), ..base.clone() }),
            ("cont-on-error", Cont { on_error: None, ..base.clone() }),
        ];
        let part = |index: i64, end: Result<Value, String>| {
            let p = Part { join: "w".into(), index, member: format!("w.{index}"), end };
            Forwarded {
                queue: "00ff00ff00ff00ff".into(),
                id: format!("w.{index}:join"),
                module: ACCEPT_MODULE.into(),
                function: JOIN_FUNCTION.into(),
                args: vec![p.to_value()],
                created_ms: 1_700_000_000_000,
                due_ms: 1_700_000_000_000,
                expires_ms: Some(1_702_592_000_000),
                max_attempts: None,
                trace: None,
                cont: None,
            }
        };
        let step = Forwarded {
            queue: "jobs".into(),
            id: "w.2".into(),
            module: "work".into(),
            function: "two".into(),
            args: vec![Value::Int(7)],
            created_ms: 1_700_000_000_000,
            due_ms: 1_700_000_001_500,
            expires_ms: None,
            max_attempts: Some(3),
            trace: None,
            cont: Some(conts[0].1.to_value()),
        };
        let messages = [
            ("part-done", part(2, Ok(Value::Array(vec![Value::Int(14), Value::str("ok")])))),
            ("part-done-nil", part(1, Ok(Value::Nil))),
            ("part-dead", part(3, Err("work.add: boom".into()))),
            ("forwarded-step-with-cont", step),
        ];
        let mut out: Vec<(&'static str, Vec<u8>)> = Vec::new();
        for (name, c) in conts {
            out.push((name, c.encode().unwrap_or_default()));
        }
        for (name, f) in messages {
            out.push((name, part_message(&f).unwrap_or_default()));
        }
        out.push(("body-chord", body_bytes(step_value("w.body", &call("sum")), Some(on_error)).unwrap_or_default()));
        out.push(("body-chord-no-on-error", body_bytes(step_value("w.body", &call("sum")), None).unwrap_or_default()));
        out
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        /// Every seed reads, as what it was written as, and so does everything in it.
        #[test]
        fn the_seeds_read_back() {
            for (name, bytes) in seeds() {
                assert!(!bytes.is_empty(), "{name}");
                let trips = match name.split('-').next() {
                    Some("cont") => cont_trips(read_cont(&bytes)),
                    Some("body") => body_trips(read_chord_body(&bytes)),
                    _ => part_trips(&bytes, read_part_message(&bytes)),
                };
                let refused: Vec<&Trip> = trips.iter().filter(|t| !matches!(t, Trip::Same { .. })).collect();
                if name == "forwarded-step-with-cont" {
                    // An ordinary step is no part; its continuation and steps read.
                    assert!(matches!(refused[..], [Trip::Refused { what: "part of a join", .. }]), "{name}: {trips:?}");
                    assert!(trips.len() >= 4, "{name}: {trips:?}");
                } else {
                    assert!(refused.is_empty(), "{name}: {trips:?}");
                }
            }
        }

        /// `FUZZ_SEEDS=fuzz/corpus/queue_workflow cargo test -p rustomnic-queue write_workflow_fuzz_seeds -- --ignored`
        #[test]
        #[ignore]
        fn write_workflow_fuzz_seeds() {
            let dir = std::env::var("FUZZ_SEEDS").unwrap();
            std::fs::create_dir_all(&dir).unwrap();
            for (name, bytes) in seeds() {
                std::fs::write(std::path::Path::new(&dir).join(name), bytes).unwrap();
            }
        }

        /// Refusals name what was wrong, and quote a peer's text only briefly.
        #[test]
        fn refusals_say_why() {
            let refused = |trips: Vec<Trip>| match &trips[..] {
                [Trip::Refused { why, .. }] => why.clone(),
                other => panic!("not refused: {other:?}"),
            };
            assert!(refused(part_trips(b"", read_part_message(b""))).contains("the message: the stored value is empty"));
            assert!(refused(cont_trips(read_cont(&[1, 3, 2]))).contains("a continuation is a map of its fields"));
            assert!(refused(body_trips(read_chord_body(&[1, 0]))).contains("a chord's body is a map of its fields"));
            let j = map(vec![("id", Value::str("w")), ("index", Value::Int(1))]);
            let c = map(vec![("wf", Value::str("w")), ("origin", Value::str("web")), ("join", j)]);
            assert_eq!(Cont::from_value(&c).unwrap_err(), "field cage is missing (of field join)");
            let long = "x".repeat(10_000);
            let p = map(vec![("join", Value::str("w")), ("index", Value::Int(1)), ("member", Value::str("w.1")), ("status", Value::str(long.as_str()))]);
            let why = Part::from_args(vec![p]).unwrap_err();
            assert!(why.len() < 100 && why.ends_with("...\""), "{why}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call() -> DurableCall {
        DurableCall {
            from_cage: "web".into(),
            cage: "worker".into(),
            module: "work".into(),
            function: "add".into(),
            args: vec![Value::Int(1), Value::str("x")],
            options: CallOptions { queue: "retry".into(), delay: Some(1.5), max_attempts: Some(3), expires_in: Some(60.0), ..Default::default() },
        }
    }

    /// A step and a continuation read back as they were written; junk is refused with a reason.
    #[test]
    fn steps_and_continuations_roundtrip() {
        let (id, back) = step_from(&step_value("w.2", &call())).unwrap();
        let mut want = call();
        want.options.id = Some("w.2".into());
        assert_eq!((id.as_str(), back), ("w.2", want));
        let c = Cont {
            wf: "w".into(),
            origin: "web".into(),
            next: vec![step_value("w.3", &call())],
            on_error: Some(step_value("w.on_error", &call())),
            join: Some(Join { cage: "web".into(), id: "w".into(), index: 2, holder: Some("00ff".into()) }),
            alias: Some("w".into()),
        };
        assert_eq!(Cont::decode(&c.encode().unwrap()).unwrap(), c);
        let bare = Cont { wf: "w".into(), origin: "web".into(), next: Vec::new(), on_error: None, join: None, alias: None };
        assert_eq!(Cont::from_value(&bare.to_value()).unwrap(), bare);
        let Value::Map(mut m) = c.to_value() else { unreachable!() };
        m.retain(|(k, _)| k.as_str() != Some("wf"));
        assert_eq!(Cont::from_value(&Value::Map(m)).unwrap_err(), "field wf is missing");
        let long = Cont { wf: "x".repeat(MAX_WORKFLOW_ID + 1), ..bare };
        assert!(Cont::from_value(&long.to_value()).unwrap_err().contains("workflow ids are 1 to 200 bytes"));
        assert!(step_from(&Value::Int(1)).is_err());
    }

    #[test]
    fn parts_roundtrip_and_junk_is_refused() {
        for end in [Ok(Value::Array(vec![Value::Int(7)])), Err("boom".to_string())] {
            let p = Part { join: "g".into(), index: 3, member: "g.3".into(), end };
            assert_eq!(Part::from_args(vec![p.to_value()]).unwrap(), p);
        }
        assert!(Part::from_args(vec![]).is_err());
        let Value::Map(mut m) = (Part { join: "g".into(), index: 1, member: "g.1".into(), end: Ok(Value::Nil) }).to_value() else { unreachable!() };
        m.iter_mut().find(|(k, _)| k.as_str() == Some("index")).unwrap().1 = Value::Int(0);
        assert_eq!(Part::from_args(vec![Value::Map(m)]).unwrap_err(), "field index of a part must be a member index");
    }

    /// What a cancel asks the buckets for: steps of known cages only on their clustered
    /// queues, of cages elsewhere all of them; by cage, each id once.
    #[test]
    fn clustered_steps_are_grouped_by_the_cage_whose_bucket_holds_them() {
        let steps = [
            ("worker", "cq", "w.2"),
            ("worker", "cq", "w.1"),
            ("web", "own", "w.3"),
            ("billing", "jobs", "w.4"),
            ("worker", "cq", "w.2"),
            ("worker", "local", "w.5"),
        ]
        .map(|(c, q, s)| (c.to_string(), q.to_string(), s.to_string()));
        let known = |cage: &str, queue: &str| match cage {
            "worker" => Some(queue == "cq"),
            "web" => Some(false),
            _ => None,
        };
        let got = clustered_by_cage(steps, known);
        let want = vec![("billing".to_string(), vec!["w.4".to_string()]), ("worker".to_string(), vec!["w.1".to_string(), "w.2".to_string()])];
        assert_eq!(got, want);
    }

    #[test]
    fn steps_are_listed_in_workflow_order() {
        let mut ids = vec!["w.on_error", "w.10", "w.body", "w.2", "w.1"];
        ids.sort_by_key(|s| step_rank("w", s));
        assert_eq!(ids, ["w.1", "w.2", "w.10", "w.body", "w.on_error"]);
    }
}
