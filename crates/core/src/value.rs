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
            Value::Float(f) => serde_json::Number::from_f64(*f)
                .map(serde_json::Value::Number)
                .ok_or_else(|| format!("{f} cannot be written as JSON"))?,
            Value::Str(b) => serde_json::Value::String(
                String::from_utf8(b.clone()).map_err(|_| "a string that is not UTF-8 cannot be written as JSON".to_string())?,
            ),
            Value::Array(items) => {
                serde_json::Value::Array(items.iter().map(|v| v.to_json_at(depth + 1)).collect::<Result<_, _>>()?)
            }
            Value::Map(entries) => {
                let mut map = serde_json::Map::with_capacity(entries.len());
                for (k, v) in entries {
                    let key = match k {
                        Value::Str(_) => k.as_str().ok_or("a map key that is not UTF-8 cannot be written as JSON")?.to_string(),
                        Value::Int(i) => i.to_string(),
                        Value::Float(f) => f.to_string(),
                        Value::Bool(b) => b.to_string(),
                        other => return Err(format!("a map key of type {} cannot be written as JSON", other.type_name())),
                    };
                    map.insert(key, v.to_json_at(depth + 1)?);
                }
                serde_json::Value::Object(map)
            }
        })
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
            serde_json::Value::Object(o) => {
                Value::Map(o.iter().map(|(k, v)| (Value::str(k.clone()), Value::from_json(v))).collect())
            }
        }
    }

    /// Parses JSON text, refusing nesting past [`MAX_DEPTH`] (serde_json's own limit is 128 too).
    pub fn parse_json(text: &[u8]) -> Result<Value, String> {
        let json: serde_json::Value = serde_json::from_slice(text).map_err(|e| format!("invalid JSON: {e}"))?;
        Ok(Value::from_json(&json))
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
    fn json_round_trip() {
        let v = Value::parse_json(br#"{"a": [1, 2.5, "x", null, true], "b": {}}"#).unwrap();
        assert_eq!(v.get("a"), Some(&Value::Array(vec![Value::Int(1), Value::Float(2.5), Value::str("x"), Value::Nil, Value::Bool(true)])));
        let back = v.to_json().unwrap();
        assert_eq!(back, serde_json::json!({"a": [1, 2.5, "x", null, true], "b": {}}));
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

    #[test]
    fn non_string_keys_become_text() {
        let v = Value::Map(vec![(Value::Int(10), Value::Bool(false))]);
        assert_eq!(v.to_json().unwrap(), serde_json::json!({"10": false}));
    }
}
