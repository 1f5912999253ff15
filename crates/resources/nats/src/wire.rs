//! Conversions between NATS messages (subjects, headers, bodies) and the value model, shared by
//! the nats resource and the nats interface. What goes to the wire is checked first and refused
//! with an error naming the place (the client library would otherwise panic on some header
//! names or values); what comes from it is converted without any limit but its size.

use std::str::FromStr;

use async_nats::{HeaderMap, HeaderName, HeaderValue};
use rustomnic_core::Value;

/// The error of a failed handler in a reply (the header NATS services use for it), with
/// [`ERROR_CODE_HEADER`] beside it.
pub const ERROR_HEADER: &str = "Nats-Service-Error";
/// The code of a failed reply: "500" for a handler that failed, "413" for a message over the
/// size limit, "400" for one whose headers cannot be read.
pub const ERROR_CODE_HEADER: &str = "Nats-Service-Error-Code";
/// The subject a dead-lettered JetStream message came from, and its stream and sequence.
pub const SUBJECT_HEADER: &str = "Pmnc-Subject";
pub const STREAM_HEADER: &str = "Pmnc-Stream";
pub const SEQUENCE_HEADER: &str = "Pmnc-Sequence";
/// Set on bodies the resource or the interface encoded as JSON.
pub const CONTENT_TYPE_HEADER: &str = "Content-Type";

/// The longest subject accepted (the server's own limit is far higher; nobody needs more).
pub const MAX_SUBJECT: usize = 4096;

/// Checks a subject tokens: not empty, no whitespace or control characters, no empty token.
fn check_tokens(what: &str, s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err(format!("{what} is empty"));
    }
    if s.len() > MAX_SUBJECT {
        return Err(format!("{what} is {} bytes long; at most {MAX_SUBJECT}", s.len()));
    }
    if let Some(c) = s.chars().find(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("{what} {s:?} holds {c:?}; subjects have no spaces or control characters"));
    }
    if s.split('.').any(str::is_empty) {
        return Err(format!("{what} {s:?} has an empty token (a leading, trailing or doubled dot)"));
    }
    Ok(())
}

/// A subject to publish or send a request to: concrete, no wildcards.
pub fn check_publish_subject(what: &str, s: &str) -> Result<(), String> {
    check_tokens(what, s)?;
    if s.split('.').any(|t| t == "*" || t == ">") {
        return Err(format!("{what} {s:?} is a wildcard subject; messages go to concrete subjects (wildcards are for subscriptions)"));
    }
    Ok(())
}

/// A subject to subscribe to: `*` matches one token, `>` the rest (last token only).
pub fn check_subscribe_subject(what: &str, s: &str) -> Result<(), String> {
    check_tokens(what, s)?;
    let tokens: Vec<&str> = s.split('.').collect();
    for (i, t) in tokens.iter().enumerate() {
        if t.len() > 1 && (t.contains('*') || t.contains('>')) && t.chars().any(|c| c != '*' && c != '>') {
            // "order*" is a literal token to the server; almost surely not what was meant.
            return Err(format!("{what} {s:?}: token {t:?} mixes a wildcard with text; * and > stand alone between dots"));
        }
        if *t == ">" && i + 1 != tokens.len() {
            return Err(format!("{what} {s:?}: > must be the last token"));
        }
    }
    Ok(())
}

/// A Lua `headers` table as NATS headers: names to strings (numbers and booleans as text), or
/// to arrays of them for a header given several times. Names are ASCII without control
/// characters, spaces or `:`; values hold no CR or LF.
pub fn headers_from_value(v: Option<&Value>) -> Result<HeaderMap, String> {
    let mut out = HeaderMap::new();
    let entries = match v {
        None | Some(Value::Nil) => return Ok(out),
        Some(Value::Map(entries)) => entries,
        Some(Value::Array(a)) if a.is_empty() => return Ok(out),
        Some(other) => return Err(format!("headers must be a table of names to strings, got {}", other.type_name())),
    };
    for (k, v) in entries {
        let Some(name) = k.as_str() else {
            return Err(format!("headers: a name must be a string, got {}", k.type_name()));
        };
        if name.is_empty() || name.chars().any(|c| c == ' ' || c == ':' || c.is_control() || !c.is_ascii()) {
            return Err(format!("headers: the name {name:?} is not a header name (ASCII, no spaces, control characters or ':')"));
        }
        let name = HeaderName::from_str(name).map_err(|e| format!("headers: the name {name:?}: {e}"))?;
        let values: Vec<&Value> = match v {
            Value::Array(items) => items.iter().collect(),
            one => vec![one],
        };
        for value in values {
            let text = header_text(value).map_err(|e| format!("headers: {name}: {e}"))?;
            let value = HeaderValue::from_str(&text).map_err(|_| format!("headers: {name}: the value {text:?} holds a line break"))?;
            out.append(name.clone(), value);
        }
    }
    Ok(out)
}

fn header_text(v: &Value) -> Result<String, String> {
    match v {
        Value::Str(b) => String::from_utf8(b.clone()).map_err(|_| "the value is not UTF-8 text".to_string()),
        Value::Int(i) => Ok(i.to_string()),
        Value::Float(f) => Ok(f.to_string()),
        Value::Bool(b) => Ok(b.to_string()),
        other => Err(format!("a value must be a string, number or boolean (or an array of them), got {}", other.type_name())),
    }
}

/// NATS headers as a table: a name given once maps to its string, one given several times to
/// an array of its strings in order.
pub fn headers_to_value(h: Option<&HeaderMap>) -> Value {
    let Some(h) = h else { return Value::Map(Vec::new()) };
    let mut out: Vec<(Value, Value)> = h
        .iter()
        .map(|(name, values)| {
            let v = match values.as_slice() {
                [one] => Value::str(one.as_str()),
                many => Value::Array(many.iter().map(|v| Value::str(v.as_str())).collect()),
            };
            (Value::str(name.to_string()), v)
        })
        .collect();
    // A hash map's order changes from run to run: by name, so logs and tests see one order.
    out.sort_by(|a, b| a.0.as_str().cmp(&b.0.as_str()));
    Value::Map(out)
}

/// The text of a header, if the message has it (the last value when given several times).
pub fn header(h: Option<&HeaderMap>, name: &str) -> Option<String> {
    h?.get_last(name).map(|v| v.as_str().to_string())
}

/// An error text fit for one header line: line breaks become spaces, and a huge text is cut.
pub fn error_header_value(text: &str) -> HeaderValue {
    const MAX: usize = 4096;
    let mut s: String = text.chars().map(|c| if c == '\r' || c == '\n' { ' ' } else { c }).collect();
    if s.len() > MAX {
        let mut end = MAX;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push_str("...");
    }
    HeaderValue::from_str(&s).unwrap_or_else(|_| HeaderValue::from_str("(unprintable error)").unwrap_or_default())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn publish_subjects_are_concrete() {
        assert!(check_publish_subject("subject", "orders.new").is_ok());
        assert!(check_publish_subject("subject", "orders.*").unwrap_err().contains("wildcard"));
        assert!(check_publish_subject("subject", "orders.>").unwrap_err().contains("wildcard"));
        assert!(check_publish_subject("subject", "").unwrap_err().contains("empty"));
        assert!(check_publish_subject("subject", "a..b").unwrap_err().contains("empty token"));
        assert!(check_publish_subject("subject", "a b").unwrap_err().contains("no spaces"));
    }

    #[test]
    fn subscriptions_take_whole_token_wildcards() {
        assert!(check_subscribe_subject("s", "orders.*.eu").is_ok());
        assert!(check_subscribe_subject("s", "orders.>").is_ok());
        assert!(check_subscribe_subject("s", ">").is_ok());
        assert!(check_subscribe_subject("s", "orders.>.x").unwrap_err().contains("last token"));
        assert!(check_subscribe_subject("s", "order*").unwrap_err().contains("stand alone"));
    }

    #[test]
    fn headers_round_trip_and_odd_shapes_are_refused() {
        let v = Value::Map(vec![
            (Value::str("a"), Value::str("1")),
            (Value::str("n"), Value::Int(5)),
            (Value::str("many"), Value::Array(vec![Value::str("x"), Value::Bool(true)])),
        ]);
        let h = headers_from_value(Some(&v)).unwrap();
        let back = headers_to_value(Some(&h));
        assert_eq!(
            back,
            Value::Map(vec![
                (Value::str("a"), Value::str("1")),
                (Value::str("many"), Value::Array(vec![Value::str("x"), Value::str("true")])),
                (Value::str("n"), Value::str("5")),
            ])
        );
        let bad = |v: Value| headers_from_value(Some(&v)).unwrap_err();
        assert!(bad(Value::str("x")).contains("must be a table"));
        assert!(bad(Value::Map(vec![(Value::str("a:b"), Value::str("1"))])).contains("not a header name"));
        assert!(bad(Value::Map(vec![(Value::str("a"), Value::str("1\r\nX: y"))])).contains("line break"));
        assert!(bad(Value::Map(vec![(Value::Int(1), Value::str("1"))])).contains("name must be a string"));
        assert!(bad(Value::Map(vec![(Value::str("a"), Value::Map(vec![(Value::str("b"), Value::Int(1))]))])).contains("string, number or boolean"));
        assert!(bad(Value::Map(vec![(Value::str("é"), Value::str("1"))])).contains("not a header name"));
    }

    #[test]
    fn error_texts_fit_one_header_line() {
        assert_eq!(error_header_value("a\nb").as_str(), "a b");
        assert!(error_header_value(&"x".repeat(10_000)).as_str().len() <= 4099);
    }
}
