//! `pmnc.url`: percent-encoding of a URL component and back, URLs parsed into their parts
//! (WHATWG rules, the `url` crate), and tables written as `application/x-www-form-urlencoded`.

use mlua::{Lua, Table, Value as LuaValue};

use crate::{ok, ok_bytes, reported, string_arg};

/// `data` with every byte but the unreserved ones (RFC 3986: letters, digits, `-._~`) as `%XX`.
pub fn encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len());
    for &b in data {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `%XX` sequences of `text` as bytes; with `plus`, `+` is a space (form encoding).
pub fn decode(text: &[u8], plus: bool) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(text.len());
    let mut i = 0;
    while i < text.len() {
        match text[i] {
            b'%' => {
                let hex = text.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok()).and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(b) if text[i + 1].is_ascii_hexdigit() => out.push(b),
                    _ => return Err(format!("pmnc.url.decode: invalid escape at offset {i}")),
                }
                i += 3;
            }
            b'+' if plus => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    Ok(out)
}

fn parse(lua: &Lua, text: &str) -> Result<mlua::Result<mlua::MultiValue>, String> {
    let u = ::url::Url::parse(text).map_err(|e| format!("pmnc.url.parse: {text:?} is not a URL: {e}"))?;
    Ok((|| {
        let t = lua.create_table()?;
        t.set("scheme", u.scheme())?;
        if !u.username().is_empty() {
            t.set("user", u.username())?;
        }
        t.set("password", u.password())?;
        t.set("host", u.host_str())?;
        t.set("port", u.port_or_known_default())?;
        t.set("path", u.path())?;
        t.set("query", u.query())?;
        t.set("fragment", u.fragment())?;
        let params = lua.create_table()?;
        for (k, v) in u.query_pairs() {
            match params.raw_get::<LuaValue>(k.as_ref())? {
                LuaValue::Nil => params.raw_set(k.as_ref(), v.as_ref())?,
                LuaValue::Table(list) => list.raw_push(v.as_ref())?,
                first => params.raw_set(k.as_ref(), lua.create_sequence_from([first, LuaValue::String(lua.create_string(v.as_ref())?)])?)?,
            }
        }
        t.set("params", params)?;
        ok([LuaValue::Table(t)])
    })())
}

fn scalar(v: &LuaValue, key: &str) -> Result<String, String> {
    match v {
        LuaValue::String(s) => Ok(s.to_string_lossy()),
        LuaValue::Integer(i) => Ok(i.to_string()),
        LuaValue::Number(n) => Ok(n.to_string()),
        LuaValue::Boolean(b) => Ok(b.to_string()),
        other => Err(format!("pmnc.url.query: value of {key:?} must be a string, number or boolean, got {}", other.type_name())),
    }
}

/// A form-encoded query of `t`: keys sorted, a list value repeats its key.
fn query(t: &Table) -> Result<String, String> {
    let mut pairs = Vec::new();
    for pair in t.pairs::<LuaValue, LuaValue>() {
        let (k, v) = pair.map_err(|e| format!("pmnc.url.query: {e}"))?;
        let key = match &k {
            LuaValue::String(s) => s.to_string_lossy(),
            LuaValue::Integer(i) => i.to_string(),
            other => return Err(format!("pmnc.url.query: keys must be strings, got {}", other.type_name())),
        };
        match &v {
            LuaValue::Table(list) => {
                for item in list.sequence_values::<LuaValue>() {
                    let item = item.map_err(|e| format!("pmnc.url.query: {e}"))?;
                    pairs.push((key.clone(), scalar(&item, &key)?));
                }
            }
            v => pairs.push((key.clone(), scalar(v, &key)?)),
        }
    }
    pairs.sort();
    let mut ser = form_urlencoded::Serializer::new(String::new());
    for (k, v) in &pairs {
        ser.append_pair(k, v);
    }
    Ok(ser.finish())
}

pub(crate) fn install(lua: &Lua, t: &Table) -> mlua::Result<()> {
    t.set(
        "encode",
        lua.create_function(|lua, s: LuaValue| reported(lua, || Ok(ok_bytes(lua, encode(&string_arg(&s, "pmnc.url.encode", "text")?.as_bytes())))))?,
    )?;
    t.set(
        "decode",
        lua.create_function(|lua, (s, opts): (LuaValue, LuaValue)| {
            reported(lua, || {
                let plus = crate::opt_flag(&opts, "plus", "pmnc.url.decode", false)?;
                Ok(ok_bytes(lua, decode(&string_arg(&s, "pmnc.url.decode", "text")?.as_bytes(), plus)?))
            })
        })?,
    )?;
    t.set(
        "parse",
        lua.create_function(|lua, s: LuaValue| {
            reported(lua, || {
                let text = string_arg(&s, "pmnc.url.parse", "url")?.as_bytes();
                parse(lua, &String::from_utf8_lossy(&text))
            })
        })?,
    )?;
    t.set(
        "query",
        lua.create_function(|lua, t: LuaValue| {
            reported(lua, || {
                let LuaValue::Table(t) = t else {
                    return Err(format!("pmnc.url.query: expected a table, got {}", t.type_name()));
                };
                Ok(ok_bytes(lua, query(&t)?))
            })
        })?,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rfc3986_unreserved() {
        assert_eq!(encode(b"a b&c=d/e~f"), "a%20b%26c%3Dd%2Fe~f");
        assert_eq!(encode("é".as_bytes()), "%C3%A9");
        assert_eq!(decode(b"a%20b%26c%3dd", false).unwrap(), b"a b&c=d");
        assert_eq!(decode(b"a+b", true).unwrap(), b"a b");
        assert_eq!(decode(b"a+b", false).unwrap(), b"a+b");
    }

    #[test]
    fn bad_escapes() {
        assert_eq!(decode(b"abc%2", false).unwrap_err(), "pmnc.url.decode: invalid escape at offset 3");
        assert!(decode(b"%zz", false).is_err());
        assert!(decode(b"%+1", false).is_err());
    }

    #[test]
    fn query_from_a_table() {
        let lua = Lua::new();
        let t: Table = lua.load(r#"return { b = "x y", a = 1, c = { "1", "2" } }"#).eval().unwrap();
        assert_eq!(query(&t).unwrap(), "a=1&b=x+y&c=1&c=2");
    }
}
