//! The one value model that crosses Lua, Rust, JSON and the wire: nil, bool, integer, float,
//! string (bytes), array, map.

use std::fmt;

/// Nesting deeper than this is refused everywhere a value is converted, so cycles and hostile
/// input end with an error instead of a stack overflow.
pub const MAX_DEPTH: usize = 128;

#[derive(Debug, Clone, PartialEq, Default)]
pub enum Value {
    #[default]
    Nil,
    Bool(bool),
    Int(i64),
    Float(f64),
    /// Bytes; usually UTF-8 text, but Lua strings may hold anything.
    Str(Vec<u8>),
    Array(Vec<Value>),
    /// Keys in insertion order; string keys in practice, but any scalar is kept.
    Map(Vec<(Value, Value)>),
}

impl Value {
    pub fn str(s: impl Into<String>) -> Value {
        Value::Str(s.into().into_bytes())
    }

    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Nil => "nil",
            Value::Bool(_) => "boolean",
            Value::Int(_) => "integer",
            Value::Float(_) => "float",
            Value::Str(_) => "string",
            Value::Array(_) => "array",
            Value::Map(_) => "map",
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(b) => std::str::from_utf8(b).ok(),
            _ => None,
        }
    }

    /// Looks up a string key of a map.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Map(entries) => entries.iter().find(|(k, _)| k.as_str() == Some(key)).map(|(_, v)| v),
            _ => None,
        }
    }

    /// The bytes of a message body sent to a broker: a string as it is, nil as nothing, any other
    /// value as JSON, with the content type that says so (a publisher's own content type, if it
    /// names one, wins over it).
    pub fn to_message_body(&self) -> Result<(Vec<u8>, Option<&'static str>), String> {
        match self {
            Value::Str(b) => Ok((b.clone(), None)),
            Value::Nil => Ok((Vec::new(), None)),
            other => {
                let text = other.to_json_text().map_err(|e| format!("the body cannot be sent as JSON: {e}"))?;
                Ok((text.into_bytes(), Some("application/json")))
            }
        }
    }

    /// Converts to JSON. Non-UTF-8 strings are refused (JSON has no bytes); map keys that are not
    /// strings are written as their text form; NaN and infinities are refused.
    pub fn to_json(&self) -> Result<serde_json::Value, String> {
        self.to_json_at(0)
    }

    fn to_json_at(&self, depth: usize) -> Result<serde_json::Value, String> {
        if depth > MAX_DEPTH {
            return Err(format!("value nested deeper than {MAX_DEPTH} levels (a cycle?)"));
        }
        Ok(match self {
            Value::Nil => serde_json::Value::Null,
            Value::Bool(b) => serde_json::Value::Bool(*b),
            Value::Int(i) => serde_json::Value::from(*i),
            Value::Float(f) => serde_json::Number::from_f64(*f).map(serde_json::Value::Number).ok_or_else(|| format!("{f} cannot be written as JSON"))?,
            Value::Str(b) => {
                serde_json::Value::String(String::from_utf8(b.clone()).map_err(|_| "a string that is not UTF-8 cannot be written as JSON".to_string())?)
            }
            Value::Array(items) => serde_json::Value::Array(items.iter().map(|v| v.to_json_at(depth + 1)).collect::<Result<_, _>>()?),
            Value::Map(entries) => {
                let mut map = serde_json::Map::with_capacity(entries.len());
                for (k, v) in entries {
                    map.insert(k.json_key()?.into_owned(), v.to_json_at(depth + 1)?);
                }
                serde_json::Value::Object(map)
            }
        })
    }

    /// This value as a JSON object's key: a string as it is, other scalars as their text.
    fn json_key(&self) -> Result<std::borrow::Cow<'_, str>, String> {
        Ok(match self {
            Value::Str(_) => std::borrow::Cow::Borrowed(self.as_str().ok_or("a map key that is not UTF-8 cannot be written as JSON")?),
            Value::Int(i) => std::borrow::Cow::Owned(i.to_string()),
            Value::Float(f) => std::borrow::Cow::Owned(f.to_string()),
            Value::Bool(b) => std::borrow::Cow::Owned(b.to_string()),
            other => return Err(format!("a map key of type {} cannot be written as JSON", other.type_name())),
        })
    }

    /// The JSON text [`to_json`](Self::to_json) would print (compact, object keys sorted, a
    /// repeated key's last value kept, the same refusals), written straight from the value: a
    /// handler's returned table and `pmnc.json.encode` skip the `serde_json::Value` in between
    /// (a map of its own per table, a string per key, then printing).
    pub fn to_json_text(&self) -> Result<String, String> {
        let mut out = Vec::with_capacity(64);
        self.write_json_at(&mut out, 0)?;
        // Only UTF-8 strings and ASCII were written.
        String::from_utf8(out).map_err(|_| "a string that is not UTF-8 cannot be written as JSON".to_string())
    }

    fn write_json_at(&self, out: &mut Vec<u8>, depth: usize) -> Result<(), String> {
        if depth > MAX_DEPTH {
            return Err(format!("value nested deeper than {MAX_DEPTH} levels (a cycle?)"));
        }
        match self {
            Value::Nil => out.extend_from_slice(b"null"),
            Value::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
            Value::Int(i) => leaf(out, i)?,
            Value::Float(f) if !f.is_finite() => return Err(format!("{f} cannot be written as JSON")),
            Value::Float(f) => leaf(out, f)?,
            Value::Str(b) => {
                let s = std::str::from_utf8(b).map_err(|_| "a string that is not UTF-8 cannot be written as JSON".to_string())?;
                leaf(out, s)?;
            }
            Value::Array(items) => {
                out.push(b'[');
                for (i, v) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    v.write_json_at(out, depth + 1)?;
                }
                out.push(b']');
            }
            Value::Map(entries) => {
                let mut keyed = Vec::with_capacity(entries.len());
                for (k, v) in entries {
                    keyed.push((k.json_key()?, v));
                }
                // As a B-tree map prints them: sorted by key, the last of equal keys kept (a
                // stable sort leaves equal keys in their order).
                keyed.sort_by(|a, b| a.0.cmp(&b.0));
                out.push(b'{');
                let mut first = true;
                for (i, (k, v)) in keyed.iter().enumerate() {
                    if keyed.get(i + 1).is_some_and(|next| next.0 == *k) {
                        continue;
                    }
                    if !first {
                        out.push(b',');
                    }
                    first = false;
                    leaf(out, &**k)?;
                    out.push(b':');
                    v.write_json_at(out, depth + 1)?;
                }
                out.push(b'}');
            }
        }
        Ok(())
    }

    /// Converts from JSON; numbers that fit i64 become integers.
    pub fn from_json(json: &serde_json::Value) -> Value {
        match json {
            serde_json::Value::Null => Value::Nil,
            serde_json::Value::Bool(b) => Value::Bool(*b),
            serde_json::Value::Number(n) => match n.as_i64() {
                Some(i) => Value::Int(i),
                None => Value::Float(n.as_f64().unwrap_or(f64::NAN)),
            },
            serde_json::Value::String(s) => Value::str(s.clone()),
            serde_json::Value::Array(a) => Value::Array(a.iter().map(Value::from_json).collect()),
            serde_json::Value::Object(o) => Value::Map(o.iter().map(|(k, v)| (Value::str(k.clone()), Value::from_json(v))).collect()),
        }
    }

    /// Parses JSON text, refusing nesting past [`MAX_DEPTH`]: the same depths that
    /// [`to_json`](Self::to_json) writes are read back. serde_json's own limit (127 levels) is
    /// off; the depth is counted here instead, and an element too deep is refused before the
    /// parser descends into it, so deep input cannot overflow the stack. Objects come out as
    /// they did through `serde_json::Value`: keys sorted, a repeated key's last value kept.
    pub fn parse_json(text: &[u8]) -> Result<Value, String> {
        use serde::de::DeserializeSeed;
        let mut de = serde_json::Deserializer::from_slice(text);
        de.disable_recursion_limit();
        let v = json::Seed(0).deserialize(&mut de).map_err(|e| format!("invalid JSON: {e}"))?;
        de.end().map_err(|e| format!("invalid JSON: {e}"))?;
        Ok(v)
    }
}

/// A scalar of [`Value::to_json_text`], printed by serde_json's own writer, so that numbers and
/// escapes come out exactly as `serde_json::Value` prints them.
fn leaf<T: serde::Serialize + ?Sized>(out: &mut Vec<u8>, v: &T) -> Result<(), String> {
    serde_json::to_writer(out, v).map_err(|e| e.to_string())
}

/// Reading JSON straight into the value model with a depth count.
mod json {
    use std::collections::BTreeMap;
    use std::fmt;

    use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};

    use super::{Value, MAX_DEPTH};

    /// A value at this depth (0 at the top).
    pub(super) struct Seed(pub(super) usize);

    impl<'de> DeserializeSeed<'de> for Seed {
        type Value = Value;

        fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
            if self.0 > MAX_DEPTH {
                return Err(de::Error::custom(format!("nested deeper than {MAX_DEPTH} levels")));
            }
            d.deserialize_any(self)
        }
    }

    impl<'de> Visitor<'de> for Seed {
        type Value = Value;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a JSON value")
        }

        fn visit_unit<E>(self) -> Result<Value, E> {
            Ok(Value::Nil)
        }

        fn visit_bool<E>(self, b: bool) -> Result<Value, E> {
            Ok(Value::Bool(b))
        }

        fn visit_i64<E>(self, i: i64) -> Result<Value, E> {
            Ok(Value::Int(i))
        }

        fn visit_u64<E>(self, u: u64) -> Result<Value, E> {
            // Past i64, as serde_json::Value's as_i64 did: a float.
            Ok(i64::try_from(u).map(Value::Int).unwrap_or(Value::Float(u as f64)))
        }

        fn visit_f64<E>(self, f: f64) -> Result<Value, E> {
            Ok(Value::Float(f))
        }

        fn visit_str<E>(self, s: &str) -> Result<Value, E> {
            Ok(Value::str(s))
        }

        fn visit_string<E>(self, s: String) -> Result<Value, E> {
            Ok(Value::Str(s.into_bytes()))
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
            let mut items = Vec::new();
            while let Some(v) = seq.next_element_seed(Seed(self.0 + 1))? {
                items.push(v);
            }
            Ok(Value::Array(items))
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
            let mut entries = BTreeMap::new();
            while let Some(k) = map.next_key::<String>()? {
                let v = map.next_value_seed(Seed(self.0 + 1))?;
                entries.insert(k, v);
            }
            Ok(Value::Map(entries.into_iter().map(|(k, v)| (Value::Str(k.into_bytes()), v)).collect()))
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.to_json() {
            Ok(j) => write!(f, "{j}"),
            Err(_) => write!(f, "<{}>", self.type_name()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_bodies_are_bytes_or_json() {
        assert_eq!(Value::str("hi").to_message_body().unwrap(), (b"hi".to_vec(), None));
        assert_eq!(Value::Nil.to_message_body().unwrap(), (Vec::new(), None));
        let (b, ct) = Value::Map(vec![(Value::str("n"), Value::Int(1))]).to_message_body().unwrap();
        assert_eq!((b.as_slice(), ct), (&b"{\"n\":1}"[..], Some("application/json")));
        assert!(Value::Float(f64::NAN).to_message_body().unwrap_err().contains("the body cannot be sent as JSON"));
    }

    #[test]
    fn json_round_trip() {
        let v = Value::parse_json(br#"{"a": [1, 2.5, "x", null, true], "b": {}}"#).unwrap();
        assert_eq!(v.get("a"), Some(&Value::Array(vec![Value::Int(1), Value::Float(2.5), Value::str("x"), Value::Nil, Value::Bool(true)])));
        let back = v.to_json().unwrap();
        assert_eq!(back, serde_json::json!({"a": [1, 2.5, "x", null, true], "b": {}}));
    }

    /// The direct writer prints what `to_json` then `to_string` print, refusals included.
    #[test]
    fn json_text_is_what_serde_json_prints() {
        let s = |t: &str| Value::str(t);
        let values = vec![
            Value::Nil,
            Value::Bool(false),
            Value::Int(i64::MIN),
            Value::Float(1.0),
            Value::Float(-0.0),
            Value::Float(3.33e34),
            Value::Float(1e-300),
            Value::Float(0.1),
            s("quote \" back \\ nl \n tab \t ctl \u{1} ü 😀 \u{2028}"),
            Value::Array(vec![]),
            Value::Map(vec![]),
            Value::Array(vec![Value::Nil, Value::Int(2), Value::Array(vec![s("x")])]),
            // Keys sorted by their bytes; non-string keys as their text; the last of equal keys.
            Value::Map(vec![
                (s("b"), Value::Int(1)),
                (s("a"), Value::Int(2)),
                (Value::Int(10), s("ten")),
                (Value::Int(9), s("nine")),
                (Value::Float(1.5), s("f")),
                (Value::Bool(true), s("t")),
                (s("1.5"), s("again")),
                (s("a"), Value::Int(3)),
                (s("é"), Value::Map(vec![(s("z"), Value::Nil), (s("Z"), Value::Nil)])),
            ]),
        ];
        for v in values {
            assert_eq!(v.to_json_text().unwrap(), v.to_json().unwrap().to_string(), "{v:?}");
        }
        let refused = [
            Value::Float(f64::NAN),
            Value::Float(f64::INFINITY),
            Value::Str(vec![0xff]),
            Value::Map(vec![(Value::Str(vec![0xfe]), Value::Nil)]),
            Value::Map(vec![(Value::Nil, Value::Nil)]),
            Value::Map(vec![(Value::Array(vec![]), Value::Nil)]),
            Value::Array(vec![Value::Int(1), Value::Float(f64::NEG_INFINITY)]),
        ];
        for v in refused {
            assert_eq!(v.to_json_text().unwrap_err(), v.to_json().unwrap_err(), "{v:?}");
        }
        let mut deep = Value::Nil;
        for _ in 0..MAX_DEPTH {
            deep = Value::Array(vec![deep]);
        }
        assert_eq!(deep.to_json_text().unwrap(), deep.to_json().unwrap().to_string());
        let deeper = Value::Map(vec![(s("k"), Value::Array(vec![deep]))]);
        assert_eq!(deeper.to_json_text().unwrap_err(), deeper.to_json().unwrap_err());
    }

    #[test]
    fn json_refusals() {
        assert!(Value::Float(f64::NAN).to_json().is_err());
        assert!(Value::Str(vec![0xff, 0xfe]).to_json().is_err());
        assert!(Value::parse_json(b"{").unwrap_err().starts_with("invalid JSON"));
        let mut deep = Value::Nil;
        for _ in 0..200 {
            deep = Value::Array(vec![deep]);
        }
        assert!(deep.to_json().unwrap_err().contains("deeper"));
    }

    #[test]
    fn floats_survive_a_round_trip() {
        // Found by the json fuzz target: without exact float parsing 3.33e34 came back changed.
        for text in ["3.33e34", "0.1", "1e-300", "-2.2250738585072014e-308", "123456789.123456789"] {
            let v = Value::parse_json(text.as_bytes()).unwrap();
            let again = Value::parse_json(v.to_json().unwrap().to_string().as_bytes()).unwrap();
            assert_eq!(v, again, "{text}");
        }
    }

    /// Issue 12: JSON decoding stopped at 127 levels (serde_json's own limit) while encoding
    /// allowed every depth up to MAX_DEPTH, so a value could be written that could not be read.
    #[test]
    fn json_decodes_every_depth_it_encodes() {
        let mut v = Value::Array(vec![]);
        let mut levels = 1;
        loop {
            match v.to_json() {
                Ok(json) => {
                    let back = Value::parse_json(json.to_string().as_bytes()).unwrap_or_else(|e| panic!("{levels} levels encode but do not decode: {e}"));
                    assert_eq!(back, v, "{levels} levels");
                }
                Err(e) => {
                    assert!(e.contains("deeper"), "{e}");
                    let text = format!("{}{}", "[".repeat(levels), "]".repeat(levels));
                    let e = Value::parse_json(text.as_bytes()).unwrap_err();
                    assert!(e.contains("deeper than 128"), "{levels} levels: {e}");
                    break;
                }
            }
            v = Value::Array(vec![v]);
            levels += 1;
        }
        assert_eq!(levels, MAX_DEPTH + 2, "the deepest value has MAX_DEPTH + 1 levels");
        // Objects count the same way.
        let text = format!("{}1{}", "{\"k\":".repeat(MAX_DEPTH), "}".repeat(MAX_DEPTH));
        assert!(Value::parse_json(text.as_bytes()).is_ok());
        let text = format!("{}1{}", "{\"k\":".repeat(MAX_DEPTH + 1), "}".repeat(MAX_DEPTH + 1));
        assert!(Value::parse_json(text.as_bytes()).unwrap_err().contains("deeper"));
        // Far deeper input ends with the same error, not a stack overflow.
        let text = "[".repeat(1 << 20);
        assert!(Value::parse_json(text.as_bytes()).unwrap_err().contains("deeper"));
    }

    #[test]
    fn json_objects_keep_their_old_form() {
        // Keys sorted, a repeated key's last value wins, as with serde_json's own map.
        let v = Value::parse_json(br#"{"b": 1, "a": 2, "b": 3}"#).unwrap();
        assert_eq!(v, Value::Map(vec![(Value::str("a"), Value::Int(2)), (Value::str("b"), Value::Int(3))]));
        assert_eq!(Value::parse_json(b"18446744073709551615").unwrap(), Value::Float(18446744073709551615.0));
        assert_eq!(Value::parse_json(b"-5").unwrap(), Value::Int(-5));
        assert!(Value::parse_json(b"[1,]").unwrap_err().starts_with("invalid JSON"));
        assert!(Value::parse_json(b"1 2").is_err());
    }

    #[test]
    fn non_string_keys_become_text() {
        let v = Value::Map(vec![(Value::Int(10), Value::Bool(false))]);
        assert_eq!(v.to_json().unwrap(), serde_json::json!({"10": false}));
    }
}
