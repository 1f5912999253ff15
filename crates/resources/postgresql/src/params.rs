//! Parameters into the wire: each value converted to the type the server declared for its `$n`
//! in the prepared statement, so `1` can fill an int2, an int8 or a float8 alike, and a value
//! that cannot become that type is refused here with the parameter and both types named.
//!
//! Numbers, booleans, text and bytea are sent in binary form. Types whose text input the server
//! knows best (numeric, timestamps, dates, uuid, json, arrays, and anything else) are sent in
//! text form, parsed by the server exactly as a SQL literal would be.

use bytes::BytesMut;
use rustomnic_core::Value;
use tokio_postgres::types::{to_sql_checked, Format, IsNull, Kind, ToSql, Type};

type BoxError = Box<dyn std::error::Error + Sync + Send>;

/// One parameter, already encoded.
#[derive(Debug)]
pub struct Param {
    format: Format,
    /// None for NULL.
    bytes: Option<Vec<u8>>,
}

impl Param {
    fn binary(bytes: impl Into<Vec<u8>>) -> Param {
        Param { format: Format::Binary, bytes: Some(bytes.into()) }
    }

    fn text(bytes: impl Into<Vec<u8>>) -> Param {
        Param { format: Format::Text, bytes: Some(bytes.into()) }
    }
}

impl ToSql for Param {
    fn to_sql(&self, _: &Type, out: &mut BytesMut) -> Result<IsNull, BoxError> {
        match &self.bytes {
            None => Ok(IsNull::Yes),
            Some(b) => {
                out.extend_from_slice(b);
                Ok(IsNull::No)
            }
        }
    }

    fn accepts(_: &Type) -> bool {
        // Checked in `convert`, against the declared type.
        true
    }

    fn encode_format(&self, _: &Type) -> Format {
        self.format
    }

    to_sql_checked!();
}

/// A short description of a value for messages: its type and, for scalars, the value itself.
fn describe(v: &Value) -> String {
    match v {
        Value::Str(b) => {
            let text = String::from_utf8_lossy(b);
            let shown: String = text.chars().take(40).collect();
            let more = if text.chars().count() > 40 { "..." } else { "" };
            format!("a string ({shown:?}{more})")
        }
        Value::Int(i) => format!("an integer ({i})"),
        Value::Float(f) => format!("a float ({f})"),
        Value::Bool(b) => format!("a boolean ({b})"),
        Value::Array(_) => "an array".into(),
        Value::Map(_) => "a map".into(),
        Value::Nil => "nil".into(),
    }
}

fn refuse(n: usize, v: &Value, ty: &Type, hint: &str) -> String {
    format!("parameter ${n}: {} cannot be passed as {}{hint}", describe(v), ty.name())
}

/// A whole number from an integer, or from a float without a fraction.
fn whole(n: usize, v: &Value, ty: &Type, min: i64, max: i64) -> Result<i64, String> {
    let i = match v {
        Value::Int(i) => *i,
        Value::Float(f) if f.fract() == 0.0 && *f >= -9.223_372_036_854_776e18 && *f < 9.223_372_036_854_776e18 => *f as i64,
        Value::Float(_) => return Err(refuse(n, v, ty, " (not a whole number)")),
        _ => return Err(refuse(n, v, ty, " (give a number)")),
    };
    if i < min || i > max {
        return Err(format!("parameter ${n}: {i} is out of range for {} ({min}..{max})", ty.name()));
    }
    Ok(i)
}

fn float(n: usize, v: &Value, ty: &Type) -> Result<f64, String> {
    match v {
        Value::Int(i) => Ok(*i as f64),
        Value::Float(f) => Ok(*f),
        _ => Err(refuse(n, v, ty, " (give a number)")),
    }
}

/// Text of a number as the server's numeric input reads it.
fn number_text(f: f64) -> String {
    if f.is_nan() {
        "NaN".into()
    } else if f.is_infinite() {
        if f > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        }
    } else {
        f.to_string()
    }
}

fn utf8(n: usize, v: &Value, ty: &Type, b: &[u8]) -> Result<String, String> {
    String::from_utf8(b.to_vec()).map_err(|_| refuse(n, v, ty, " (the string is not UTF-8)"))
}

/// Converts parameter `n` (1-based) to the declared type `ty`.
pub fn convert(n: usize, v: &Value, ty: &Type) -> Result<Param, String> {
    if let Value::Nil = v {
        return Ok(Param { format: Format::Binary, bytes: None });
    }
    match ty.kind() {
        Kind::Domain(base) => return convert(n, v, base),
        Kind::Array(_) => {
            return match v {
                Value::Array(items) => Ok(Param::text(array_literal(n, items, ty, 0)?)),
                // An array literal written by hand: '{1,2,3}'.
                Value::Str(b) => Ok(Param::text(utf8(n, v, ty, b)?)),
                _ => Err(refuse(n, v, ty, " (give an array)")),
            };
        }
        _ => {}
    }
    let p = match *ty {
        Type::BOOL => match v {
            Value::Bool(b) => Param::binary([u8::from(*b)]),
            _ => return Err(refuse(n, v, ty, " (give true or false)")),
        },
        Type::INT2 => Param::binary((whole(n, v, ty, i16::MIN.into(), i16::MAX.into())? as i16).to_be_bytes()),
        Type::INT4 => Param::binary((whole(n, v, ty, i32::MIN.into(), i32::MAX.into())? as i32).to_be_bytes()),
        Type::INT8 => Param::binary(whole(n, v, ty, i64::MIN, i64::MAX)?.to_be_bytes()),
        Type::OID => Param::binary((whole(n, v, ty, 0, u32::MAX.into())? as u32).to_be_bytes()),
        Type::FLOAT4 => Param::binary((float(n, v, ty)? as f32).to_be_bytes()),
        Type::FLOAT8 => Param::binary(float(n, v, ty)?.to_be_bytes()),
        Type::NUMERIC => match v {
            Value::Int(i) => Param::text(i.to_string()),
            Value::Float(f) => Param::text(number_text(*f)),
            // Exact decimals travel as text ("12.50") and are checked by the server.
            Value::Str(b) => Param::text(utf8(n, v, ty, b)?),
            _ => return Err(refuse(n, v, ty, " (give a number or a decimal string)")),
        },
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::XML => match v {
            Value::Str(b) => Param::binary(b.clone()),
            Value::Int(i) => Param::binary(i.to_string()),
            Value::Float(f) => Param::binary(f.to_string()),
            _ => return Err(refuse(n, v, ty, " (give a string)")),
        },
        // The "char" type: one byte.
        Type::CHAR => match v {
            Value::Str(b) if b.len() == 1 => Param::binary(b.clone()),
            _ => return Err(refuse(n, v, ty, " (give a one-byte string)")),
        },
        Type::BYTEA => match v {
            Value::Str(b) => Param::binary(b.clone()),
            _ => return Err(refuse(n, v, ty, " (give a string of bytes)")),
        },
        Type::JSON | Type::JSONB => match v {
            // A string is taken as JSON text already (e.g. from pmnc.json.encode).
            Value::Str(b) => Param::text(utf8(n, v, ty, b)?),
            other => Param::text(other.to_json().map_err(|e| format!("parameter ${n}: cannot be written as {}: {e}", ty.name()))?.to_string()),
        },
        // Whatever else (timestamps, dates, uuid, interval, inet, enums, ...): the text form,
        // parsed by the server as it parses a literal of that type.
        _ => match v {
            Value::Str(b) => Param::text(utf8(n, v, ty, b)?),
            Value::Int(i) => Param::text(i.to_string()),
            Value::Float(f) => Param::text(number_text(*f)),
            Value::Bool(b) => Param::text(if *b { "true" } else { "false" }),
            _ => return Err(refuse(n, v, ty, " (give its text form as a string)")),
        },
    };
    Ok(p)
}

/// An array literal (`{1,"a b",NULL,{2,3}}`) of nested arrays.
fn array_literal(n: usize, items: &[Value], ty: &Type, depth: usize) -> Result<String, String> {
    if depth > rustomnic_core::value::MAX_DEPTH {
        return Err(format!("parameter ${n}: array nested too deep"));
    }
    let mut out = String::from("{");
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        match item {
            Value::Nil => out.push_str("NULL"),
            Value::Bool(b) => out.push_str(if *b { "t" } else { "f" }),
            Value::Int(i) => out.push_str(&i.to_string()),
            Value::Float(f) => out.push_str(&number_text(*f)),
            Value::Str(b) => quote(&mut out, &utf8(n, item, ty, b)?),
            Value::Array(inner) => out.push_str(&array_literal(n, inner, ty, depth + 1)?),
            Value::Map(_) => {
                let json = item.to_json().map_err(|e| format!("parameter ${n}: an element cannot be written as JSON: {e}"))?;
                quote(&mut out, &json.to_string());
            }
        }
    }
    out.push('}');
    Ok(out)
}

/// An array element in double quotes, with `"` and `\` escaped.
fn quote(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_name_the_parameter_and_both_types() {
        let e = convert(2, &Value::str("abc"), &Type::INT4).unwrap_err();
        assert_eq!(e, "parameter $2: a string (\"abc\") cannot be passed as int4 (give a number)");
        let e = convert(1, &Value::Float(1.5), &Type::INT8).unwrap_err();
        assert!(e.contains("not a whole number"), "{e}");
        let e = convert(1, &Value::Int(70000), &Type::INT2).unwrap_err();
        assert!(e.contains("out of range for int2"), "{e}");
    }

    #[test]
    fn array_literals_quote_their_strings() {
        let items = vec![Value::Int(1), Value::Nil, Value::str("a\"b\\c"), Value::Array(vec![Value::Bool(true)])];
        assert_eq!(array_literal(1, &items, &Type::TEXT_ARRAY, 0).unwrap(), r#"{1,NULL,"a\"b\\c",{t}}"#);
    }
}
