//! Conversions between AMQP 0-9-1 values (field tables, message properties, bodies) and the value
//! model, shared by the amqp resource and the amqp interface. Everything that comes from the wire
//! is converted with a depth limit; everything that goes to it is checked (short strings at most
//! 255 bytes, known property names, value types) and refused with an error naming the place.

use lapin::types::{AMQPValue, DecimalValue, FieldArray, FieldTable, LongString, ShortString};
use lapin::BasicProperties;
use rustomnic_core::value::MAX_DEPTH;
use rustomnic_core::Value;

/// The header that carries the attempt a message is on when the interface republishes it for a
/// retry (1 for the first delivery, absent on messages from elsewhere).
pub const ATTEMPT_HEADER: &str = "x-pmnc-attempt";
/// The header that carries the error of a dead-lettered message, or of a failed RPC reply.
pub const ERROR_HEADER: &str = "x-pmnc-error";
/// Where a retried or dead-lettered message was first published: its exchange and routing key
/// (a republished message goes through the default exchange, which would hide them).
pub const EXCHANGE_HEADER: &str = "x-pmnc-exchange";
pub const ROUTING_KEY_HEADER: &str = "x-pmnc-routing-key";
/// The queue a dead-lettered message was taken from.
pub const QUEUE_HEADER: &str = "x-pmnc-queue";

/// The property names a Lua `properties` table may hold (plus `mandatory`, a publish flag).
pub const PROPERTY_KEYS: &[&str] = &[
    "content_type",
    "content_encoding",
    "headers",
    "delivery_mode",
    "priority",
    "correlation_id",
    "reply_to",
    "expiration",
    "message_id",
    "timestamp",
    "type",
    "user_id",
    "app_id",
    "mandatory",
];

/// A short string (exchange and queue names, routing keys, most properties): at most 255 bytes.
pub fn short(what: &str, s: &str) -> Result<ShortString, String> {
    ShortString::try_new(s).map_err(|_| format!("{what} is {} bytes long; AMQP allows at most 255", s.len()))
}

/// A field table from the wire as a map (keys in the table's order, which is by name). Nesting
/// deeper than the value model's limit is an error: such a message is refused, not half read.
pub fn table_to_value(t: &FieldTable, depth: usize) -> Result<Value, String> {
    if depth >= MAX_DEPTH {
        return Err(format!("a field table nested deeper than {MAX_DEPTH} levels"));
    }
    let mut out = Vec::with_capacity(t.inner().len());
    for (k, v) in t.inner() {
        out.push((Value::str(k.as_str()), amqp_to_value(v, depth + 1)?));
    }
    Ok(Value::Map(out))
}

/// One AMQP value from the wire. Integers of every width become integers (an unsigned 64-bit
/// timestamp past i64 becomes a float), decimals floats, every kind of string and byte array a
/// string, void nil.
pub fn amqp_to_value(v: &AMQPValue, depth: usize) -> Result<Value, String> {
    Ok(match v {
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::ShortShortInt(i) => Value::Int(i64::from(*i)),
        AMQPValue::ShortShortUInt(i) => Value::Int(i64::from(*i)),
        AMQPValue::ShortInt(i) => Value::Int(i64::from(*i)),
        AMQPValue::ShortUInt(i) => Value::Int(i64::from(*i)),
        AMQPValue::LongInt(i) => Value::Int(i64::from(*i)),
        AMQPValue::LongUInt(i) => Value::Int(i64::from(*i)),
        AMQPValue::LongLongInt(i) => Value::Int(*i),
        AMQPValue::Float(f) => Value::Float(f64::from(*f)),
        AMQPValue::Double(f) => Value::Float(*f),
        AMQPValue::DecimalValue(DecimalValue { scale, value }) => Value::Float(f64::from(*value) / 10f64.powi(i32::from(*scale))),
        AMQPValue::ShortString(s) => Value::str(s.as_str()),
        AMQPValue::LongString(s) => Value::Str(s.as_bytes().to_vec()),
        AMQPValue::ByteArray(b) => Value::Str(b.as_slice().to_vec()),
        AMQPValue::Timestamp(t) => unsigned(*t),
        AMQPValue::Void => Value::Nil,
        AMQPValue::FieldArray(a) => {
            if depth >= MAX_DEPTH {
                return Err(format!("a field array nested deeper than {MAX_DEPTH} levels"));
            }
            let mut out = Vec::with_capacity(a.as_slice().len());
            for item in a.as_slice() {
                out.push(amqp_to_value(item, depth + 1)?);
            }
            Value::Array(out)
        }
        AMQPValue::FieldTable(t) => table_to_value(t, depth)?,
    })
}

fn unsigned(n: u64) -> Value {
    match i64::try_from(n) {
        Ok(i) => Value::Int(i),
        Err(_) => Value::Float(n as f64),
    }
}

/// A Lua value as an AMQP header value: booleans, 64-bit integers, doubles, strings as long
/// strings (bytes kept), arrays as field arrays, maps (string keys) as field tables, nil as void.
pub fn value_to_amqp(v: &Value, what: &str, depth: usize) -> Result<AMQPValue, String> {
    if depth >= MAX_DEPTH {
        return Err(format!("{what} is nested deeper than {MAX_DEPTH} levels"));
    }
    Ok(match v {
        Value::Nil => AMQPValue::Void,
        Value::Bool(b) => AMQPValue::Boolean(*b),
        Value::Int(i) => AMQPValue::LongLongInt(*i),
        Value::Float(f) => AMQPValue::Double(*f),
        Value::Str(b) => AMQPValue::LongString(LongString::from(b.clone())),
        Value::Array(items) => {
            let mut out = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                out.push(value_to_amqp(item, &format!("{what}[{}]", i + 1), depth + 1)?);
            }
            AMQPValue::FieldArray(FieldArray::from(out))
        }
        Value::Map(_) => AMQPValue::FieldTable(value_to_table(v, what, depth + 1)?),
    })
}

/// A Lua map as a field table; its keys must be strings of at most 255 bytes.
pub fn value_to_table(v: &Value, what: &str, depth: usize) -> Result<FieldTable, String> {
    let Value::Map(entries) = v else {
        return Err(format!("{what} must be a table of names and values, got {}", v.type_name()));
    };
    let mut t = FieldTable::default();
    for (k, item) in entries {
        let Some(name) = k.as_str() else {
            return Err(format!("{what} has a key that is not a string ({})", k.type_name()));
        };
        let key = short(&format!("the name {name:?} in {what}"), name)?;
        t.insert(key, value_to_amqp(item, &format!("{what}.{name}"), depth)?);
    }
    Ok(t)
}

/// The properties of a message as a map: only those the message has, `headers` as a map.
pub fn properties_to_value(p: &BasicProperties) -> Result<Value, String> {
    let mut out = Vec::new();
    let mut text = |name: &str, v: &Option<ShortString>| {
        if let Some(s) = v {
            out.push((Value::str(name), Value::str(s.as_str())));
        }
    };
    text("content_type", p.content_type());
    text("content_encoding", p.content_encoding());
    text("correlation_id", p.correlation_id());
    text("reply_to", p.reply_to());
    text("expiration", p.expiration());
    text("message_id", p.message_id());
    text("type", p.kind());
    text("user_id", p.user_id());
    text("app_id", p.app_id());
    if let Some(m) = p.delivery_mode() {
        out.push((Value::str("delivery_mode"), Value::Int(i64::from(*m))));
    }
    if let Some(m) = p.priority() {
        out.push((Value::str("priority"), Value::Int(i64::from(*m))));
    }
    if let Some(t) = p.timestamp() {
        out.push((Value::str("timestamp"), unsigned(*t)));
    }
    if let Some(h) = p.headers() {
        out.push((Value::str("headers"), table_to_value(h, 0).map_err(|e| format!("headers: {e}"))?));
    }
    Ok(Value::Map(out))
}

/// What a Lua `properties` table asks for a publish.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub properties: BasicProperties,
    /// Return the message when no queue takes it (the publish then fails), instead of letting
    /// the broker drop it.
    pub mandatory: bool,
}

/// Reads a Lua `properties` table (nil: none). Messages are persistent (delivery_mode 2) and
/// mandatory unless the table says otherwise. Unknown names and wrong types are errors.
pub fn properties_from_value(v: Option<&Value>) -> Result<Outgoing, String> {
    let mut p = BasicProperties::default().with_delivery_mode(2);
    let mut mandatory = true;
    let entries = match v {
        None | Some(Value::Nil) => return Ok(Outgoing { properties: p, mandatory }),
        Some(Value::Map(entries)) => entries,
        // An empty Lua table reads as an empty array.
        Some(Value::Array(items)) if items.is_empty() => return Ok(Outgoing { properties: p, mandatory }),
        Some(other) => return Err(format!("properties must be a table, got {}", other.type_name())),
    };
    for (k, value) in entries {
        let Some(name) = k.as_str() else {
            return Err(format!("properties has a key that is not a string ({})", k.type_name()));
        };
        let text = |value: &Value| -> Result<ShortString, String> {
            match value {
                Value::Str(_) => short(&format!("properties.{name}"), value.as_str().ok_or_else(|| format!("properties.{name} is not UTF-8 text"))?),
                Value::Int(i) if name == "expiration" => short(name, &i.to_string()),
                other => Err(format!("properties.{name} must be a string, got {}", other.type_name())),
            }
        };
        let small = |value: &Value, max: i64| -> Result<u8, String> {
            match value {
                Value::Int(i) if (0..=max).contains(i) => Ok(*i as u8),
                other => Err(format!("properties.{name} must be a whole number 0..={max}, got {}", describe(other))),
            }
        };
        p = match name {
            "content_type" => p.with_content_type(text(value)?),
            "content_encoding" => p.with_content_encoding(text(value)?),
            "correlation_id" => p.with_correlation_id(text(value)?),
            "reply_to" => p.with_reply_to(text(value)?),
            "expiration" => p.with_expiration(text(value)?),
            "message_id" => p.with_message_id(text(value)?),
            "type" => p.with_type(text(value)?),
            "user_id" => p.with_user_id(text(value)?),
            "app_id" => p.with_app_id(text(value)?),
            "delivery_mode" => match small(value, 2)? {
                0 => p,
                m => p.with_delivery_mode(m),
            },
            "priority" => p.with_priority(small(value, 255)?),
            "timestamp" => match value {
                Value::Int(t) if *t >= 0 => p.with_timestamp(*t as u64),
                Value::Float(t) if *t >= 0.0 && t.is_finite() => p.with_timestamp(*t as u64),
                other => return Err(format!("properties.timestamp must be unix seconds (a number >= 0), got {}", describe(other))),
            },
            "headers" => match value {
                Value::Array(items) if items.is_empty() => p,
                _ => p.with_headers(value_to_table(value, "properties.headers", 0)?),
            },
            "mandatory" => match value {
                Value::Bool(b) => {
                    mandatory = *b;
                    p
                }
                other => return Err(format!("properties.mandatory must be true or false, got {}", other.type_name())),
            },
            other => return Err(format!("properties.{other} is not a message property (known: {})", PROPERTY_KEYS.join(", "))),
        };
    }
    Ok(Outgoing { properties: p, mandatory })
}

fn describe(v: &Value) -> String {
    match v {
        Value::Int(i) => i.to_string(),
        Value::Float(f) => f.to_string(),
        other => other.type_name().to_string(),
    }
}

/// A header of the properties, if the message has it.
pub fn header<'a>(p: &'a BasicProperties, name: &str) -> Option<&'a AMQPValue> {
    p.headers().as_ref().and_then(|h| h.inner().get(name))
}

/// The text of a string-valued header (long or short string, or byte array).
pub fn header_text(p: &BasicProperties, name: &str) -> Option<String> {
    match header(p, name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        AMQPValue::ByteArray(b) => Some(String::from_utf8_lossy(b.as_slice()).into_owned()),
        _ => None,
    }
}

/// The value of an integer-valued header of any width; None for absent or other types.
pub fn header_int(p: &BasicProperties, name: &str) -> Option<i64> {
    match header(p, name)? {
        AMQPValue::ShortShortInt(i) => Some(i64::from(*i)),
        AMQPValue::ShortShortUInt(i) => Some(i64::from(*i)),
        AMQPValue::ShortInt(i) => Some(i64::from(*i)),
        AMQPValue::ShortUInt(i) => Some(i64::from(*i)),
        AMQPValue::LongInt(i) => Some(i64::from(*i)),
        AMQPValue::LongUInt(i) => Some(i64::from(*i)),
        AMQPValue::LongLongInt(i) => Some(*i),
        _ => None,
    }
}

/// The properties with some headers set (replacing those of the same names) and others removed.
pub fn with_headers(p: &BasicProperties, set: Vec<(&str, AMQPValue)>, remove: &[&str]) -> BasicProperties {
    let mut table = p.headers().clone().unwrap_or_default();
    let mut inner = table.inner().clone();
    for name in remove {
        inner.remove(*name);
    }
    for (name, v) in set {
        if let Ok(k) = ShortString::try_new(name) {
            inner.insert(k, v);
        }
    }
    table = FieldTable::from(inner);
    p.clone().with_headers(table)
}

/// A text header value.
pub fn text_value(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn map(entries: Vec<(&str, Value)>) -> Value {
        Value::Map(entries.into_iter().map(|(k, v)| (Value::str(k), v)).collect())
    }

    #[test]
    fn headers_round_trip_through_field_tables() {
        let headers = map(vec![
            ("a", Value::Int(-5)),
            ("b", Value::Float(1.5)),
            ("c", Value::str("text")),
            ("d", Value::Bool(true)),
            ("e", Value::Array(vec![Value::Int(1), Value::str("x")])),
            ("f", map(vec![("g", Value::Str(vec![0, 255]))])),
        ]);
        let t = value_to_table(&headers, "headers", 0).unwrap();
        // Field tables keep their keys sorted, as the map here already is.
        assert_eq!(table_to_value(&t, 0).unwrap(), headers);
    }

    #[test]
    fn every_width_of_wire_value_is_read() {
        let mut t = std::collections::BTreeMap::new();
        t.insert(ShortString::from("i8"), AMQPValue::ShortShortInt(-1));
        t.insert(ShortString::from("u32"), AMQPValue::LongUInt(u32::MAX));
        t.insert(ShortString::from("dec"), AMQPValue::DecimalValue(DecimalValue { scale: 2, value: 1234 }));
        t.insert(ShortString::from("ts"), AMQPValue::Timestamp(u64::MAX));
        t.insert(ShortString::from("void"), AMQPValue::Void);
        t.insert(ShortString::from("bytes"), AMQPValue::ByteArray(vec![1u8, 2].into()));
        let v = table_to_value(&FieldTable::from(t), 0).unwrap();
        assert_eq!(v.get("i8"), Some(&Value::Int(-1)));
        assert_eq!(v.get("u32"), Some(&Value::Int(i64::from(u32::MAX))));
        assert_eq!(v.get("dec"), Some(&Value::Float(12.34)));
        assert_eq!(v.get("ts"), Some(&Value::Float(u64::MAX as f64)));
        assert_eq!(v.get("void"), Some(&Value::Nil));
        assert_eq!(v.get("bytes"), Some(&Value::Str(vec![1, 2])));
    }

    #[test]
    fn nesting_past_the_limit_is_refused_both_ways() {
        let mut deep = AMQPValue::Void;
        for _ in 0..MAX_DEPTH + 5 {
            deep = AMQPValue::FieldArray(FieldArray::from(vec![deep]));
        }
        assert!(amqp_to_value(&deep, 0).unwrap_err().contains("deeper than"));
        let mut v = Value::Nil;
        for _ in 0..MAX_DEPTH + 5 {
            v = Value::Array(vec![v]);
        }
        assert!(value_to_amqp(&v, "headers.x", 0).unwrap_err().contains("deeper than"));
    }

    #[test]
    fn properties_are_checked_by_name_and_type() {
        let p = map(vec![
            ("content_type", Value::str("text/plain")),
            ("priority", Value::Int(3)),
            ("expiration", Value::Int(5000)),
            ("headers", map(vec![("k", Value::str("v"))])),
            ("mandatory", Value::Bool(false)),
        ]);
        let out = properties_from_value(Some(&p)).unwrap();
        assert!(!out.mandatory);
        assert_eq!(out.properties.priority(), &Some(3));
        assert_eq!(out.properties.expiration().as_ref().map(|s| s.as_str()), Some("5000"));
        assert_eq!(out.properties.delivery_mode(), &Some(2));
        let back = properties_to_value(&out.properties).unwrap();
        assert_eq!(back.get("headers").and_then(|h| h.get("k")), Some(&Value::str("v")));
        let e = properties_from_value(Some(&map(vec![("colour", Value::str("red"))]))).unwrap_err();
        assert!(e.contains("properties.colour is not a message property"), "{e}");
        let e = properties_from_value(Some(&map(vec![("priority", Value::Int(300))]))).unwrap_err();
        assert!(e.contains("0..=255"), "{e}");
        let e = properties_from_value(Some(&map(vec![("message_id", Value::str("x".repeat(300)))]))).unwrap_err();
        assert!(e.contains("at most 255"), "{e}");
        let e = properties_from_value(Some(&map(vec![("headers", Value::str("x"))]))).unwrap_err();
        assert!(e.contains("properties.headers must be a table"), "{e}");
    }
}
