//! XML-RPC (http://xmlrpc.com/spec.md) method calls, responses and faults, with the `<nil/>`
//! extension and `<i8>`. The XML is read by `pmnc.xml`'s reader (rustomnic_stdlib::xml, on
//! quick-xml): a DTD is refused, so there are no entity definitions (no billion laughs, no
//! external entities); only the five predefined entities and character references are expanded;
//! size, depth and element count are limited.
//!
//! Values map to the value model (and so to Lua) as docs/interfaces/xmlrpc.md says: int, i4, i8
//! → integer; boolean; string and untyped text → string; double → float; base64 → a string of
//! the bytes; dateTime.iso8601 → `{["dateTime.iso8601"] = "20260706T12:00:00"}`; struct → map;
//! array → array; nil → nil. Written back: an integer outside 32 bits as `<i8>`, a string that
//! is not UTF-8 or holds characters XML cannot carry as `<base64>`, and the one-member tables
//! `{base64 = s}` and `{["dateTime.iso8601"] = s}` as those types.

use base64::Engine;
use rustomnic_core::Value;
use rustomnic_stdlib::xml::{self, Element, Node};

/// The member name of a table sent as `<dateTime.iso8601>`.
pub const DATETIME: &str = "dateTime.iso8601";
/// The member name of a table sent as `<base64>`.
pub const BASE64: &str = "base64";

/// Limits on a document read.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_size: usize,
    pub max_depth: usize,
    pub max_elements: usize,
}

impl Limits {
    pub fn new(max_size: usize, max_elements: usize) -> Limits {
        Limits { max_size, max_depth: 64, max_elements }
    }
}

/// A fault: `faultCode` and `faultString`.
#[derive(Debug, Clone, PartialEq)]
pub struct Fault {
    pub code: i64,
    pub message: String,
}

fn parse(text: &[u8], limits: Limits) -> Result<Element, String> {
    let root = xml::decode(text, xml::Limits { max_size: limits.max_size, max_depth: limits.max_depth })
        .map_err(|e| e.strip_prefix("pmnc.xml.decode: ").map(str::to_string).unwrap_or(e))?;
    let mut count = 0usize;
    if !within(&root, &mut count, limits.max_elements) {
        return Err(format!("more than {} elements (max_elements)", limits.max_elements));
    }
    Ok(root)
}

fn within(el: &Element, count: &mut usize, max: usize) -> bool {
    *count += 1;
    if *count > max {
        return false;
    }
    el.children.iter().all(|c| match c {
        Node::Element(e) => within(e, count, max),
        Node::Text(_) => true,
    })
}

/// The child elements of `el`; text between them must be white space.
fn kids(el: &Element) -> Result<Vec<&Element>, String> {
    let mut out = Vec::new();
    for c in &el.children {
        match c {
            Node::Element(e) => out.push(e),
            Node::Text(t) if t.trim().is_empty() => {}
            Node::Text(_) => return Err(format!("text inside <{}> where elements belong", el.name)),
        }
    }
    Ok(out)
}

/// The text of an element that holds only text.
fn text(el: &Element) -> Result<String, String> {
    let mut s = String::new();
    for c in &el.children {
        match c {
            Node::Text(t) => s.push_str(t),
            Node::Element(e) => return Err(format!("<{}> inside <{}>, which holds text", e.name, el.name)),
        }
    }
    Ok(s)
}

fn one<'a>(el: &'a Element, name: &str) -> Result<&'a Element, String> {
    match kids(el)?.as_slice() {
        [only] if only.name == name => Ok(only),
        _ => Err(format!("<{}> must hold one <{name}>", el.name)),
    }
}

/// A `<value>` element.
fn value(el: &Element) -> Result<Value, String> {
    if el.name != "value" {
        return Err(format!("<{}> where a <value> belongs", el.name));
    }
    if !el.children.iter().any(|c| matches!(c, Node::Element(_))) {
        return Ok(Value::Str(text(el)?.into_bytes()));
    }
    let inner = kids(el)?;
    let typed = match inner.as_slice() {
        [only] => *only,
        _ => return Err("a <value> holds one typed element".into()),
    };
    let name = typed.name.rsplit(':').next().unwrap_or("");
    Ok(match name {
        "int" | "i4" | "i8" => {
            let t = text(typed)?;
            Value::Int(t.trim().parse::<i64>().map_err(|_| format!("<{}> of {:?} is not an integer", typed.name, t.trim()))?)
        }
        "boolean" => match text(typed)?.trim() {
            "1" => Value::Bool(true),
            "0" => Value::Bool(false),
            other => return Err(format!("<boolean> of {other:?} is not 0 or 1")),
        },
        "string" => Value::Str(text(typed)?.into_bytes()),
        "double" => {
            let t = text(typed)?;
            let f = t.trim().parse::<f64>().ok().filter(|f| f.is_finite()).ok_or_else(|| format!("<double> of {:?} is not a number", t.trim()))?;
            Value::Float(f)
        }
        "dateTime.iso8601" => Value::Map(vec![(Value::str(DATETIME), Value::Str(text(typed)?.trim().as_bytes().to_vec()))]),
        "base64" => {
            let t: Vec<u8> = text(typed)?.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
            Value::Str(base64::engine::general_purpose::STANDARD.decode(&t).map_err(|e| format!("<base64>: {e}"))?)
        }
        "nil" => Value::Nil,
        "array" => {
            let data = one(typed, "data")?;
            Value::Array(kids(data)?.into_iter().map(value).collect::<Result<_, _>>()?)
        }
        "struct" => {
            let mut entries = Vec::new();
            for member in kids(typed)? {
                if member.name != "member" {
                    return Err(format!("<{}> inside <struct>", member.name));
                }
                let parts = kids(member)?;
                let (Some(n), Some(v)) = (parts.iter().find(|e| e.name == "name"), parts.iter().find(|e| e.name == "value")) else {
                    return Err("a <member> needs a <name> and a <value>".into());
                };
                if parts.len() != 2 {
                    return Err("a <member> holds a <name> and a <value> only".into());
                }
                entries.push((Value::Str(text(n)?.into_bytes()), value(v)?));
            }
            Value::Map(entries)
        }
        other => return Err(format!("<{other}> is not an XML-RPC type")),
    })
}

/// The values of `<params><param><value>...`.
fn params(el: &Element) -> Result<Vec<Value>, String> {
    kids(el)?.into_iter().map(|p| if p.name == "param" { value(one(p, "value")?) } else { Err(format!("<{}> inside <params>", p.name)) }).collect()
}

/// A `<methodCall>`: the method name and its arguments.
pub fn decode_call(body: &[u8], limits: Limits) -> Result<(String, Vec<Value>), String> {
    let root = parse(body, limits)?;
    if root.name != "methodCall" {
        return Err(format!("the document is a <{}>, not a <methodCall>", root.name));
    }
    let parts = kids(&root)?;
    let name = match parts.first() {
        Some(n) if n.name == "methodName" => text(n)?.trim().to_string(),
        _ => return Err("a <methodCall> starts with its <methodName>".into()),
    };
    let args = match parts.as_slice() {
        [_] => Vec::new(),
        [_, p] if p.name == "params" => params(p)?,
        _ => return Err("a <methodCall> holds a <methodName> and <params> only".into()),
    };
    Ok((name, args))
}

/// A `<methodResponse>`: its value, or the fault it carries.
pub fn decode_response(body: &[u8], limits: Limits) -> Result<Result<Value, Fault>, String> {
    let root = parse(body, limits)?;
    if root.name != "methodResponse" {
        return Err(format!("the document is a <{}>, not a <methodResponse>", root.name));
    }
    let inner = match kids(&root)?.as_slice() {
        [only] => *only,
        _ => return Err("a <methodResponse> holds <params> or <fault>".into()),
    };
    match inner.name.as_str() {
        "params" => {
            let mut values = params(inner)?;
            if values.len() != 1 {
                return Err(format!("a response has one value, this one {}", values.len()));
            }
            Ok(Ok(values.remove(0)))
        }
        "fault" => {
            let Value::Map(fields) = value(one(inner, "value")?)? else { return Err("a <fault> holds a struct".into()) };
            let mut fault = Fault { code: 0, message: String::new() };
            for (k, v) in fields {
                match (k.as_str(), v) {
                    (Some("faultCode"), Value::Int(c)) => fault.code = c,
                    (Some("faultString"), Value::Str(s)) => fault.message = String::from_utf8_lossy(&s).into_owned(),
                    _ => {}
                }
            }
            Ok(Err(fault))
        }
        other => Err(format!("<{other}> inside <methodResponse>")),
    }
}

fn escape(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '\r' => out.push_str("&#13;"),
            c => out.push(c),
        }
    }
}

/// Characters XML 1.0 can carry.
fn xml_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..='\u{10FFFF}')
}

fn encode_value(out: &mut String, v: &Value, depth: usize) -> Result<(), String> {
    if depth > rustomnic_core::value::MAX_DEPTH {
        return Err("a value nested too deep".into());
    }
    out.push_str("<value>");
    match v {
        Value::Nil => out.push_str("<nil/>"),
        Value::Bool(b) => out.push_str(if *b { "<boolean>1</boolean>" } else { "<boolean>0</boolean>" }),
        Value::Int(i) if i32::try_from(*i).is_ok() => out.push_str(&format!("<int>{i}</int>")),
        Value::Int(i) => out.push_str(&format!("<i8>{i}</i8>")),
        Value::Float(f) if f.is_finite() => out.push_str(&format!("<double>{f}</double>")),
        Value::Float(f) => return Err(format!("{f} cannot be sent as an XML-RPC double")),
        Value::Str(b) => match std::str::from_utf8(b) {
            Ok(s) if s.chars().all(xml_char) => {
                out.push_str("<string>");
                escape(out, s);
                out.push_str("</string>");
            }
            _ => base64_into(out, b),
        },
        Value::Array(items) => {
            out.push_str("<array><data>");
            for item in items {
                encode_value(out, item, depth + 1)?;
            }
            out.push_str("</data></array>");
        }
        Value::Map(entries) => match entries.as_slice() {
            [(k, Value::Str(s))] if k.as_str() == Some(DATETIME) => {
                let t = std::str::from_utf8(s)
                    .ok()
                    .filter(|t| !t.is_empty() && t.chars().all(|c| c.is_ascii_graphic()))
                    .ok_or("a dateTime.iso8601 must be text such as \"20260706T12:00:00\"")?;
                out.push_str("<dateTime.iso8601>");
                escape(out, t);
                out.push_str("</dateTime.iso8601>");
            }
            [(k, Value::Str(s))] if k.as_str() == Some(BASE64) => base64_into(out, s),
            _ => {
                out.push_str("<struct>");
                for (k, v) in entries {
                    let name = match k {
                        Value::Str(b) => String::from_utf8(b.clone()).map_err(|_| "a struct member name that is not UTF-8")?,
                        Value::Int(i) => i.to_string(),
                        Value::Float(f) => f.to_string(),
                        Value::Bool(b) => b.to_string(),
                        other => return Err(format!("a member name of type {}", other.type_name())),
                    };
                    if !name.chars().all(xml_char) {
                        return Err("a struct member name with characters XML cannot carry".into());
                    }
                    if matches!(v, Value::Nil) {
                        continue;
                    }
                    out.push_str("<member><name>");
                    escape(out, &name);
                    out.push_str("</name>");
                    encode_value(out, v, depth + 1)?;
                    out.push_str("</member>");
                }
                out.push_str("</struct>");
            }
        },
    }
    out.push_str("</value>");
    Ok(())
}

fn base64_into(out: &mut String, b: &[u8]) {
    out.push_str("<base64>");
    out.push_str(&base64::engine::general_purpose::STANDARD.encode(b));
    out.push_str("</base64>");
}

/// A `<methodCall>` document.
pub fn encode_call(method: &str, args: &[Value]) -> Result<String, String> {
    if method.is_empty() || !method.chars().all(|c| c.is_ascii_alphanumeric() || "_.:/".contains(c)) {
        return Err(format!("{method:?} is not an XML-RPC method name (letters, digits, _ . : /)"));
    }
    let mut out = String::from("<?xml version=\"1.0\"?>\n<methodCall><methodName>");
    out.push_str(method);
    out.push_str("</methodName><params>");
    for a in args {
        out.push_str("<param>");
        encode_value(&mut out, a, 0)?;
        out.push_str("</param>");
    }
    out.push_str("</params></methodCall>\n");
    Ok(out)
}

/// A `<methodResponse>` with one value.
pub fn encode_response(v: &Value) -> Result<String, String> {
    let mut out = String::from("<?xml version=\"1.0\"?>\n<methodResponse><params><param>");
    encode_value(&mut out, v, 0)?;
    out.push_str("</param></params></methodResponse>\n");
    Ok(out)
}

/// A `<methodResponse>` with a fault.
pub fn encode_fault(fault: &Fault) -> String {
    let mut out = String::from("<?xml version=\"1.0\"?>\n<methodResponse><fault><value><struct><member><name>faultCode</name>");
    // Only an integer and a string: this cannot fail.
    let _ = encode_value(&mut out, &Value::Int(fault.code), 0);
    out.push_str("</member><member><name>faultString</name>");
    let message: String = fault.message.chars().filter(|&c| xml_char(c)).collect();
    let _ = encode_value(&mut out, &Value::str(message), 0);
    out.push_str("</member></struct></value></fault></methodResponse>\n");
    out
}

/// Whether a value holds a one-member table that is written as a type of its own.
fn has_marker(v: &Value) -> bool {
    match v {
        Value::Array(items) => items.iter().any(has_marker),
        Value::Map(entries) => {
            matches!(entries.as_slice(), [(k, Value::Str(_))] if k.as_str() == Some(DATETIME) || k.as_str() == Some(BASE64))
                || entries.iter().any(|(_, v)| has_marker(v))
        }
        _ => false,
    }
}

/// For the fuzz target: a call and a response read from any bytes, written back and read
/// again, are what was read (values with nil struct members or one-member typed tables aside,
/// which do not come back as they were); Err says which did not.
pub fn round_trip(body: &[u8]) -> Result<(), String> {
    let limits = Limits::new(1 << 20, 10_000);
    if let Ok((name, args)) = decode_call(body, limits) {
        if !args.iter().any(|a| has_marker(a) || has_nil_member(a)) {
            if let Ok(text) = encode_call(&name, &args) {
                let again = decode_call(text.as_bytes(), limits);
                if again != Ok((name.clone(), args.clone())) {
                    return Err(format!("{text} read back as {again:?}"));
                }
            }
        }
    }
    if let Ok(Ok(v)) = decode_response(body, limits) {
        if !has_marker(&v) && !has_nil_member(&v) {
            if let Ok(text) = encode_response(&v) {
                let again = decode_response(text.as_bytes(), limits);
                if again != Ok(Ok(v.clone())) {
                    return Err(format!("{text} read back as {again:?}"));
                }
            }
        }
    }
    Ok(())
}

fn has_nil_member(v: &Value) -> bool {
    match v {
        Value::Array(items) => items.iter().any(has_nil_member),
        Value::Map(entries) => entries.iter().any(|(_, v)| matches!(v, Value::Nil) || has_nil_member(v)),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const L: Limits = Limits { max_size: 1 << 20, max_depth: 64, max_elements: 1000 };

    #[test]
    fn every_type_both_ways() {
        let args = vec![
            Value::Int(-5),
            Value::Int(1 << 40),
            Value::Bool(true),
            Value::str("a <b> & c\r\n"),
            Value::Float(2.5),
            Value::Map(vec![(Value::str(DATETIME), Value::str("20260706T12:00:00"))]),
            Value::Str(vec![0, 0xff, 1]),
            Value::Array(vec![Value::Nil, Value::Int(1)]),
            Value::Map(vec![(Value::str("k"), Value::Array(vec![]))]),
        ];
        let text = encode_call("m.f", &args).unwrap();
        let (name, back) = decode_call(text.as_bytes(), L).unwrap();
        assert_eq!(name, "m.f");
        assert_eq!(back, args);
        let python = b"<?xml version='1.0'?>\n<methodCall>\n<methodName>x</methodName>\n<params>\n<param>\n<value><i4>7</i4></value>\n</param>\n<param><value>untyped</value></param><param><value><base64>\naGk=\n</base64></value></param>\n</params>\n</methodCall>\n";
        assert_eq!(decode_call(python, L).unwrap().1, vec![Value::Int(7), Value::str("untyped"), Value::str("hi")]);
        let f = encode_fault(&Fault { code: 4, message: "no".into() });
        assert_eq!(decode_response(f.as_bytes(), L).unwrap(), Err(Fault { code: 4, message: "no".into() }));
        assert_eq!(round_trip(text.as_bytes()), Ok(()));
    }

    #[test]
    fn hostile_documents_are_refused() {
        let laughs = b"<?xml version=\"1.0\"?><!DOCTYPE lolz [<!ENTITY lol \"lol\"><!ENTITY lol2 \"&lol;&lol;\">]><methodCall><methodName>&lol2;</methodName></methodCall>";
        assert!(decode_call(laughs, L).unwrap_err().contains("DTD"));
        assert!(decode_call(b"<methodCall><methodName>&xxe;</methodName></methodCall>", L).unwrap_err().contains("entity"));
        let many = format!("<methodCall><methodName>m</methodName><params>{}</params></methodCall>", "<param><value>x</value></param>".repeat(600));
        assert!(decode_call(many.as_bytes(), L).unwrap_err().contains("max_elements"));
        let deep = format!("<methodCall><methodName>m</methodName><params><param>{}</param></params></methodCall>", "<value><array><data>".repeat(40));
        assert!(decode_call(deep.as_bytes(), L).is_err());
        assert!(decode_call(b"<methodCall><methodName>m</methodName><params><param><value><int>x</int></value></param></params></methodCall>", L).is_err());
        assert!(decode_call(b"<methodCall><methodName>m", L).is_err());
    }
}
