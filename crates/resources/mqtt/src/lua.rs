//! MQTT messages as Lua sees them: the arguments of `publish(topic, body, options)` and the
//! `properties` table (MQTT 5), which has the same shape in a received message and in the
//! options of a publish, so that a handler can pass one on.

use bytes::Bytes;
use rustomnic_core::Value;

use crate::client::{check_topic, Outgoing, Properties, Version};

const OPTION_KEYS: &[&str] = &["qos", "retain", "properties"];
const PROPERTY_KEYS: &[&str] = &["user", "response_topic", "correlation_data", "content_type", "message_expiry"];

fn entries(v: &Value) -> Option<&[(Value, Value)]> {
    match v {
        Value::Map(m) => Some(m),
        // An empty Lua table may arrive as an empty array.
        Value::Array(a) if a.is_empty() => Some(&[]),
        _ => None,
    }
}

fn key_name(k: &Value) -> String {
    k.as_str().map(str::to_string).unwrap_or_else(|| format!("({})", k.type_name()))
}

/// `publish(topic, body, options?)` → the message to publish at commit. `qos` is the default
/// when the options do not say; bodies over `max_size` are refused here, at the call.
pub fn publish_args(args: Vec<Value>, qos: u8, max_size: usize, version: Version) -> Result<Outgoing, String> {
    let mut args = args.into_iter();
    let topic = match args.next() {
        Some(Value::Str(t)) => String::from_utf8(t).map_err(|_| "publish: the topic is not UTF-8 text".to_string())?,
        other => return Err(format!("publish(topic, body, options?): the topic must be a string, got {}", other.map(|v| v.type_name()).unwrap_or("nothing"))),
    };
    check_topic(&topic).map_err(|e| format!("publish: {e}"))?;
    let payload = match args.next() {
        Some(Value::Str(b)) => b,
        other => {
            return Err(format!(
                "publish(topic, body, options?): the body must be a string (pmnc.json.encode a table first), got {}",
                other.map(|v| v.type_name()).unwrap_or("nothing")
            ))
        }
    };
    if payload.len() > max_size {
        return Err(format!("publish to {topic:?}: the body is {} bytes, over max_message_size ({max_size} bytes)", payload.len()));
    }
    let mut message = Outgoing { topic, payload: Bytes::from(payload), qos, retain: false, properties: Properties::default() };
    match args.next() {
        None | Some(Value::Nil) => {}
        Some(options) => {
            let Some(options) = entries(&options) else {
                return Err(format!("publish: the options must be a table {{qos =, retain =, properties =}}, got {}", options.type_name()));
            };
            for (k, v) in options {
                match k.as_str() {
                    Some("qos") => match v {
                        Value::Int(q @ 0..=2) => message.qos = *q as u8,
                        other => return Err(format!("publish: qos must be 0, 1 or 2, got {}", shown(other))),
                    },
                    Some("retain") => match v {
                        Value::Bool(b) => message.retain = *b,
                        other => return Err(format!("publish: retain must be true or false, got {}", other.type_name())),
                    },
                    Some("properties") => {
                        if version == Version::V3 {
                            return Err("publish: properties need MQTT 5 (version = 5 in the resource's table)".to_string());
                        }
                        message.properties = properties_from_value(v).map_err(|e| format!("publish: {e}"))?;
                    }
                    _ => return Err(format!("publish: unknown option {} (options: {})", key_name(k), OPTION_KEYS.join(", "))),
                }
            }
        }
    }
    if args.next().is_some() {
        return Err("publish(topic, body, options?) takes at most three arguments".to_string());
    }
    Ok(message)
}

fn shown(v: &Value) -> String {
    match v {
        Value::Int(i) => i.to_string(),
        other => other.type_name().to_string(),
    }
}

fn text(name: &str, v: &Value) -> Result<String, String> {
    match v {
        Value::Str(b) => String::from_utf8(b.clone()).map_err(|_| format!("properties.{name} is not UTF-8 text")),
        other => Err(format!("properties.{name} must be a string, got {}", other.type_name())),
    }
}

/// The `properties` table → MQTT 5 properties.
pub fn properties_from_value(v: &Value) -> Result<Properties, String> {
    let Some(fields) = entries(v) else {
        return Err(format!("properties must be a table, got {}", v.type_name()));
    };
    let mut p = Properties::default();
    for (k, v) in fields {
        match k.as_str() {
            Some("user") => {
                let Some(user) = entries(v) else {
                    return Err(format!("properties.user must be a table of strings by name, got {}", v.type_name()));
                };
                for (name, value) in user {
                    let Some(name) = name.as_str() else {
                        return Err(format!("properties.user: every name must be a string, got {}", name.type_name()));
                    };
                    p.user.push((name.to_string(), text(&format!("user.{name}"), value)?));
                }
            }
            Some("response_topic") => {
                let t = text("response_topic", v)?;
                check_topic(&t).map_err(|e| format!("properties.response_topic: {e}"))?;
                p.response_topic = Some(t);
            }
            Some("correlation_data") => match v {
                Value::Str(b) => p.correlation_data = Some(Bytes::from(b.clone())),
                other => return Err(format!("properties.correlation_data must be a string, got {}", other.type_name())),
            },
            Some("content_type") => p.content_type = Some(text("content_type", v)?),
            Some("message_expiry") => match v {
                Value::Int(s @ 0..=0xffff_ffff) => p.message_expiry = Some(*s as u32),
                other => return Err(format!("properties.message_expiry must be whole seconds (0 to 4294967295), got {}", shown(other))),
            },
            _ => return Err(format!("unknown property {} (properties: {})", key_name(k), PROPERTY_KEYS.join(", "))),
        }
    }
    Ok(p)
}

/// MQTT 5 properties → the `properties` table (only what is present; a user property name sent
/// more than once keeps its last value).
pub fn properties_to_value(p: &Properties) -> Value {
    let mut out = Vec::new();
    if !p.user.is_empty() {
        let mut user: Vec<(Value, Value)> = Vec::with_capacity(p.user.len());
        for (k, v) in &p.user {
            match user.iter_mut().find(|(name, _)| name.as_str() == Some(k.as_str())) {
                Some(slot) => slot.1 = Value::str(v.clone()),
                None => user.push((Value::str(k.clone()), Value::str(v.clone()))),
            }
        }
        out.push((Value::str("user"), Value::Map(user)));
    }
    if let Some(t) = &p.response_topic {
        out.push((Value::str("response_topic"), Value::str(t.clone())));
    }
    if let Some(c) = &p.correlation_data {
        out.push((Value::str("correlation_data"), Value::Str(c.to_vec())));
    }
    if let Some(c) = &p.content_type {
        out.push((Value::str("content_type"), Value::str(c.clone())));
    }
    if let Some(e) = p.message_expiry {
        out.push((Value::str("message_expiry"), Value::Int(e as i64)));
    }
    Value::Map(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: Vec<(&str, Value)>) -> Value {
        Value::Map(pairs.into_iter().map(|(k, v)| (Value::str(k), v)).collect())
    }

    #[test]
    fn publish_arguments() {
        let m = publish_args(vec![Value::str("orders/paid"), Value::str("{}")], 1, 100, Version::V5).unwrap();
        assert_eq!((m.topic.as_str(), m.qos, m.retain, &m.payload[..]), ("orders/paid", 1, false, &b"{}"[..]));
        let props = map(vec![
            ("user", map(vec![("trace", Value::str("t1"))])),
            ("response_topic", Value::str("replies/1")),
            ("correlation_data", Value::Str(vec![0, 255])),
            ("message_expiry", Value::Int(60)),
        ]);
        let m = publish_args(
            vec![Value::str("a"), Value::str("b"), map(vec![("qos", Value::Int(2)), ("retain", Value::Bool(true)), ("properties", props.clone())])],
            1,
            100,
            Version::V5,
        )
        .unwrap();
        assert_eq!((m.qos, m.retain), (2, true));
        assert_eq!(m.properties.user, vec![("trace".to_string(), "t1".to_string())]);
        assert_eq!(properties_to_value(&m.properties), props, "the properties table round-trips");
    }

    #[test]
    fn bad_publish_arguments_are_named() {
        let err = |args: Vec<Value>| publish_args(args, 1, 10, Version::V5).unwrap_err();
        assert!(err(vec![Value::str("orders/#"), Value::str("x")]).contains("wildcard"));
        assert!(err(vec![Value::str("orders/+/x"), Value::str("x")]).contains("wildcard"));
        assert!(err(vec![Value::Int(1), Value::str("x")]).contains("the topic must be a string, got integer"));
        assert!(err(vec![Value::str("t"), map(vec![])]).contains("the body must be a string"));
        assert!(err(vec![Value::str("t"), Value::str("01234567890")]).contains("11 bytes, over max_message_size (10 bytes)"));
        assert!(err(vec![Value::str("t"), Value::str("x"), map(vec![("qos", Value::Int(3))])]).contains("qos must be 0, 1 or 2, got 3"));
        assert!(err(vec![Value::str("t"), Value::str("x"), map(vec![("qso", Value::Int(1))])]).contains("unknown option qso"));
        assert!(
            err(vec![Value::str("t"), Value::str("x"), map(vec![("properties", map(vec![("colour", Value::str("x"))]))])]).contains("unknown property colour")
        );
        let v3 = publish_args(vec![Value::str("t"), Value::str("x"), map(vec![("properties", map(vec![]))])], 1, 10, Version::V3).unwrap_err();
        assert!(v3.contains("need MQTT 5"), "{v3}");
    }
}
