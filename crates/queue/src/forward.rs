//! The call an outbox forwards to its target's `_queue.accept`: one map of named fields, so that
//! a field can be added later, and so that a malformed one (from a peer of another version, or
//! a hostile one) is refused with a reason instead of being stored wrongly.

use rustomnic_core::Value;

/// The version of the map; a target refuses versions it does not know.
const VERSION: i64 = 1;

/// A durable call on its way from one cage's outbox to its target cage.
#[derive(Debug, Clone, PartialEq)]
pub struct Forwarded {
    pub queue: String,
    pub id: String,
    pub module: String,
    pub function: String,
    pub args: Vec<Value>,
    /// When the caller made it (Unix ms): its expiry counts from here, not from when it arrived.
    pub created_ms: i64,
    pub due_ms: i64,
    /// Its own expiry; None lets the target's queue set it from its `expires_in`.
    pub expires_ms: Option<i64>,
    /// Its own limit of attempts (an optional field: a target of an earlier version ignores
    /// it and applies its queue's limit, if any).
    pub max_attempts: Option<i64>,
    /// The W3C traceparent of the request that made it (optional: an earlier version ignores
    /// it; a malformed one is dropped, not refused).
    pub trace: Option<String>,
    /// The continuation of a workflow step (crate::workflow::Cont as a value: what to store
    /// when it ends). Optional: a target of an earlier version ignores it, so the step runs
    /// there but nothing after it is stored (docs/decisions/149).
    pub cont: Option<Value>,
}

/// A traceparent from outside, kept only when it reads as one.
pub fn checked_trace(t: Option<String>) -> Option<String> {
    t.filter(|t| rustomnic_lua::trace::parse_traceparent(t.as_bytes()).is_some())
}

pub fn encode(f: &Forwarded) -> Value {
    let mut m = vec![
        (Value::str("v"), Value::Int(VERSION)),
        (Value::str("queue"), Value::str(f.queue.as_str())),
        (Value::str("id"), Value::str(f.id.as_str())),
        (Value::str("module"), Value::str(f.module.as_str())),
        (Value::str("function"), Value::str(f.function.as_str())),
        (Value::str("args"), Value::Array(f.args.clone())),
        (Value::str("created_ms"), Value::Int(f.created_ms)),
        (Value::str("due_ms"), Value::Int(f.due_ms)),
    ];
    if let Some(e) = f.expires_ms {
        m.push((Value::str("expires_ms"), Value::Int(e)));
    }
    if let Some(n) = f.max_attempts {
        m.push((Value::str("max_attempts"), Value::Int(n)));
    }
    if let Some(t) = &f.trace {
        m.push((Value::str("trace"), Value::str(t.as_str())));
    }
    if let Some(c) = &f.cont {
        m.push((Value::str("cont"), c.clone()));
    }
    Value::Map(m)
}

/// Reads the arguments of a call to `_queue.accept`: exactly one such map.
pub fn decode(args: Vec<Value>) -> Result<Forwarded, String> {
    if args.len() == 7 {
        return decode_positional(args);
    }
    let mut args = args.into_iter();
    let (Some(Value::Map(mut fields)), None) = (args.next(), args.next()) else {
        return Err("a forwarded call is one map of its fields".into());
    };
    // The arguments and the continuation are moved out, not copied: they are as large as the
    // message (the first field of each name counts, as for the others).
    let mut take = |name: &str| fields.iter().position(|(k, _)| k.as_str() == Some(name)).map(|i| fields.remove(i).1);
    let (call_args, cont) = (take("args"), take("cont"));
    let get = |name: &str| fields.iter().find(|(k, _)| k.as_str() == Some(name)).map(|(_, v)| v);
    let text = |name: &str| match get(name) {
        Some(Value::Str(b)) => String::from_utf8(b.clone()).map_err(|_| format!("field {name} is not UTF-8")),
        Some(other) => Err(format!("field {name} must be a string, got {}", other.type_name())),
        None => Err(format!("field {name} is missing")),
    };
    let int = |name: &str| match get(name) {
        Some(Value::Int(i)) => Ok(Some(*i)),
        Some(Value::Nil) | None => Ok(None),
        Some(other) => Err(format!("field {name} must be an integer, got {}", other.type_name())),
    };
    match int("v")? {
        Some(VERSION) => {}
        Some(v) => return Err(format!("version {v} of forwarded calls is not known here (this build reads {VERSION})")),
        None => return Err("field v is missing".into()),
    }
    let args = match call_args {
        Some(Value::Array(a)) => a,
        Some(other) => return Err(format!("field args must be an array, got {}", other.type_name())),
        None => return Err("field args is missing".into()),
    };
    Ok(Forwarded {
        queue: text("queue")?,
        id: text("id")?,
        module: text("module")?,
        function: text("function")?,
        args,
        created_ms: int("created_ms")?.ok_or("field created_ms is missing")?,
        due_ms: int("due_ms")?.ok_or("field due_ms is missing")?,
        expires_ms: int("expires_ms")?,
        max_attempts: match int("max_attempts")? {
            Some(n) if !(1..=rustomnic_lua::durable::MAX_ATTEMPTS).contains(&n) => {
                return Err(format!("field max_attempts must be 1 to {}, got {n}", rustomnic_lua::durable::MAX_ATTEMPTS))
            }
            n => n,
        },
        trace: checked_trace(text("trace").ok()),
        cont: match cont {
            None | Some(Value::Nil) => None,
            Some(v @ Value::Map(_)) => Some(v),
            Some(other) => return Err(format!("field cont must be a map, got {}", other.type_name())),
        },
    })
}

/// The form an outbox of an earlier version sends (queue, id, module, function, due and
/// expiry in Unix seconds, arguments), accepted so that a flock can be upgraded one process at
/// a time. It has no creation time: the call counts as made when it arrives.
fn decode_positional(args: Vec<Value>) -> Result<Forwarded, String> {
    let text = |v: &Value, name: &str| match v {
        Value::Str(b) => String::from_utf8(b.clone()).map_err(|_| format!("field {name} is not UTF-8")),
        other => Err(format!("field {name} must be a string, got {}", other.type_name())),
    };
    let millis = |v: &Value, name: &str| match v {
        Value::Int(i) => Ok(Some(i.saturating_mul(1000))),
        Value::Float(f) if f.is_finite() => Ok(Some((f * 1000.0) as i64)),
        Value::Nil => Ok(None),
        other => Err(format!("field {name} must be a number of seconds, got {}", other.type_name())),
    };
    let now = crate::store::now_ms();
    Ok(Forwarded {
        queue: text(&args[0], "queue")?,
        id: text(&args[1], "id")?,
        module: text(&args[2], "module")?,
        function: text(&args[3], "function")?,
        due_ms: millis(&args[4], "at")?.unwrap_or(now),
        expires_ms: millis(&args[5], "expires_at")?,
        args: match &args[6] {
            Value::Array(a) => a.clone(),
            other => return Err(format!("field args must be an array, got {}", other.type_name())),
        },
        created_ms: now,
        max_attempts: None,
        trace: None,
        cont: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forwarded_call_roundtrips_and_junk_is_refused_with_a_reason() {
        let f = Forwarded {
            queue: "retry".into(),
            id: "x1".into(),
            module: "work".into(),
            function: "count".into(),
            args: vec![Value::Int(21), Value::Nil],
            created_ms: 5,
            due_ms: 7,
            expires_ms: None,
            max_attempts: None,
            trace: None,
            cont: None,
        };
        assert_eq!(decode(vec![encode(&f)]).unwrap(), f);
        let with = Forwarded {
            expires_ms: Some(9),
            max_attempts: Some(3),
            trace: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
            cont: Some(Value::Map(vec![(Value::str("wf"), Value::str("w1"))])),
            ..f.clone()
        };
        assert_eq!(decode(vec![encode(&with)]).unwrap(), with);
        let Value::Map(mut odd_cont) = encode(&with) else { unreachable!() };
        odd_cont.iter_mut().find(|(k, _)| k.as_str() == Some("cont")).unwrap().1 = Value::Int(1);
        assert_eq!(decode(vec![Value::Map(odd_cont)]).unwrap_err(), "field cont must be a map, got integer");
        let Value::Map(mut zero) = encode(&with) else { unreachable!() };
        zero.iter_mut().find(|(k, _)| k.as_str() == Some("max_attempts")).unwrap().1 = Value::Int(0);
        assert!(decode(vec![Value::Map(zero)]).unwrap_err().contains("max_attempts must be 1"));
        // A traceparent that does not read as one is dropped, not refused.
        let odd = Forwarded { trace: Some("00-not-a-trace".into()), ..f.clone() };
        assert_eq!(decode(vec![encode(&odd)]).unwrap().trace, None);
        assert_eq!(decode(vec![]).unwrap_err(), "a forwarded call is one map of its fields");
        assert_eq!(decode(vec![encode(&f), Value::Nil]).unwrap_err(), "a forwarded call is one map of its fields");
        let Value::Map(mut m) = encode(&f) else { unreachable!() };
        m[0].1 = Value::Int(2);
        assert!(decode(vec![Value::Map(m.clone())]).unwrap_err().contains("version 2"));
        m[0].1 = Value::Int(1);
        m[2].1 = Value::Int(3);
        assert_eq!(decode(vec![Value::Map(m)]).unwrap_err(), "field id must be a string, got integer");
    }

    /// An outbox of the version before sends seven positional arguments; they still arrive.
    #[test]
    fn the_earlier_positional_form_is_read() {
        let old = vec![
            Value::str("retry"),
            Value::str("x1"),
            Value::str("work"),
            Value::str("count"),
            Value::Float(12.5),
            Value::Nil,
            Value::Array(vec![Value::Int(21)]),
        ];
        let f = decode(old.clone()).unwrap();
        assert_eq!((f.queue.as_str(), f.id.as_str(), f.module.as_str(), f.function.as_str()), ("retry", "x1", "work", "count"));
        assert_eq!((f.due_ms, f.expires_ms, f.args), (12_500, None, vec![Value::Int(21)]));
        let mut bad = old;
        bad[6] = Value::Int(1);
        assert_eq!(decode(bad).unwrap_err(), "field args must be an array, got integer");
    }
}
