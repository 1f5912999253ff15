//! `pmnc.xml`: XML text to a tree of Lua tables and back (the shape is in docs/lua-api.md).
//! Outside input is read defensively: a DTD is refused (so there are no entity definitions, no
//! billion laughs and no external entities), only the five predefined entities and character
//! references are expanded, and depth and size are limited.

use mlua::{Lua, MultiValue, Table, Value as LuaValue};
use quick_xml::events::Event;
use quick_xml::Reader;

use crate::{ok_bytes, opt_flag, reported, run_over, string_arg};

/// Limits of `decode`.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Most bytes of text.
    pub max_size: usize,
    /// Most elements nested in one another.
    pub max_depth: usize,
}

/// The limits `pmnc.xml.decode` uses: 16 MiB of text, 128 levels (the nesting depth of values).
pub const DEFAULT_LIMITS: Limits = Limits { max_size: 16 << 20, max_depth: 128 };

/// A node of a decoded document.
#[derive(Clone, Debug, PartialEq)]
pub enum Node {
    Element(Element),
    Text(String),
}

/// An element: its name as written (`soap:Envelope`), the namespace URI its prefix (or the
/// default namespace) is bound to, its attributes in document order, and its children.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Element {
    pub name: String,
    pub ns: Option<String>,
    pub attrs: Vec<(String, String)>,
    pub children: Vec<Node>,
}

fn err(line_of: &dyn Fn() -> usize, m: impl std::fmt::Display) -> String {
    format!("pmnc.xml.decode: line {}: {m}", line_of())
}

/// Expands the five predefined entities and character references of `raw`.
pub fn unescape(raw: &[u8]) -> Result<String, String> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        if raw[i] != b'&' {
            out.push(raw[i]);
            i += 1;
            continue;
        }
        let Some(end) = raw[i..].iter().take(12).position(|&b| b == b';') else {
            return Err("a '&' that starts no entity (write &amp;)".to_string());
        };
        let name = &raw[i + 1..i + end];
        match name {
            b"lt" => out.push(b'<'),
            b"gt" => out.push(b'>'),
            b"amp" => out.push(b'&'),
            b"apos" => out.push(b'\''),
            b"quot" => out.push(b'"'),
            _ if name.first() == Some(&b'#') => {
                let digits = std::str::from_utf8(&name[1..]).unwrap_or("");
                let code = match digits.strip_prefix('x') {
                    Some(h) => u32::from_str_radix(h, 16).ok(),
                    None => digits.parse::<u32>().ok(),
                };
                let c = code
                    .and_then(char::from_u32)
                    .filter(|&c| c != '\0')
                    .ok_or_else(|| format!("invalid character reference &{};", String::from_utf8_lossy(name)))?;
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
            _ => {
                return Err(format!(
                    "unknown entity &{}; (only &lt; &gt; &amp; &apos; &quot; and character references; DTDs are not read)",
                    String::from_utf8_lossy(name)
                ))
            }
        }
        i += end + 1;
    }
    String::from_utf8(out).map_err(|_| "text that is not UTF-8".to_string())
}

fn resolve(scopes: &[Vec<(String, String)>], name: &str) -> Option<String> {
    let (prefix, _) = name.split_once(':').unwrap_or(("", name));
    let key = if prefix.is_empty() { "xmlns".to_string() } else { format!("xmlns:{prefix}") };
    if prefix == "xml" {
        return Some("http://www.w3.org/XML/1998/namespace".to_string());
    }
    scopes.iter().rev().flat_map(|s| s.iter()).find(|(k, _)| *k == key).map(|(_, v)| v.clone()).filter(|v| !v.is_empty())
}

/// Reads `text` into its root element.
pub fn decode(text: &[u8], limits: Limits) -> Result<Element, String> {
    if text.len() > limits.max_size {
        return Err(format!("pmnc.xml.decode: text of {} bytes is over the limit of {} bytes", text.len(), limits.max_size));
    }
    let mut reader = Reader::from_reader(text);
    reader.config_mut().check_end_names = true;
    let mut stack: Vec<Element> = Vec::new();
    let mut scopes: Vec<Vec<(String, String)>> = Vec::new();
    let mut root: Option<Element> = None;
    loop {
        let pos = reader.buffer_position() as usize;
        let line_of = || 1 + text[..pos.min(text.len())].iter().filter(|&&b| b == b'\n').count();
        let event = reader.read_event().map_err(|e| err(&line_of, e))?;
        let (start, empty) = match event {
            Event::Start(s) => (s, false),
            Event::Empty(s) => (s, true),
            Event::End(_) => {
                scopes.pop();
                let Some(done) = stack.pop() else { return Err(err(&line_of, "an end tag without a start")) };
                match stack.last_mut() {
                    Some(parent) => parent.children.push(Node::Element(done)),
                    None => root = Some(done),
                }
                continue;
            }
            Event::Text(t) => {
                let s = unescape(&t.into_inner()).map_err(|e| err(&line_of, e))?;
                push_text(&mut stack, s, &line_of)?;
                continue;
            }
            Event::CData(t) => {
                let s = String::from_utf8(t.into_inner().into_owned()).map_err(|_| err(&line_of, "CDATA that is not UTF-8"))?;
                match stack.last_mut() {
                    Some(parent) => parent.children.push(Node::Text(s)),
                    None => return Err(err(&line_of, "CDATA outside the root element")),
                }
                continue;
            }
            Event::DocType(_) => return Err(err(&line_of, "a DTD (<!DOCTYPE ...>) is not allowed: entity definitions and external entities are refused")),
            Event::Comment(_) | Event::Decl(_) | Event::PI(_) => continue,
            Event::Eof => break,
        };
        if root.is_some() {
            return Err(err(&line_of, "a second root element"));
        }
        if stack.len() >= limits.max_depth {
            return Err(err(&line_of, format!("elements nested deeper than {} levels", limits.max_depth)));
        }
        let name = String::from_utf8(start.name().as_ref().to_vec()).map_err(|_| err(&line_of, "a name that is not UTF-8"))?;
        // The parser takes `<>` and other names no XML may have (and encode refuses): refused
        // here, so what decode gives, encode writes back (found by the stdlib_xml fuzz target).
        if !valid_name(&name) {
            return Err(err(&line_of, format!("<{name}> is not an XML element name")));
        }
        let mut el = Element { name, ..Element::default() };
        let mut scope = Vec::new();
        for a in start.attributes() {
            let a = a.map_err(|e| err(&line_of, e))?;
            let key = String::from_utf8(a.key.as_ref().to_vec()).map_err(|_| err(&line_of, "a name that is not UTF-8"))?;
            if !valid_name(&key) {
                return Err(err(&line_of, format!("{key:?} is not an XML attribute name")));
            }
            let value = unescape(&a.value).map_err(|e| err(&line_of, e))?;
            if key == "xmlns" || key.starts_with("xmlns:") {
                scope.push((key.clone(), value.clone()));
            }
            el.attrs.push((key, value));
        }
        scopes.push(scope);
        el.ns = resolve(&scopes, &el.name);
        if empty {
            scopes.pop();
            match stack.last_mut() {
                Some(parent) => parent.children.push(Node::Element(el)),
                None => root = Some(el),
            }
        } else {
            stack.push(el);
        }
    }
    if !stack.is_empty() {
        return Err(format!("pmnc.xml.decode: the text ends inside <{}>", stack.last().map(|e| e.name.as_str()).unwrap_or("")));
    }
    root.ok_or_else(|| "pmnc.xml.decode: no root element".to_string())
}

fn push_text(stack: &mut [Element], s: String, line_of: &dyn Fn() -> usize) -> Result<(), String> {
    // Whitespace between elements is layout, not content.
    if s.chars().all(char::is_whitespace) {
        return Ok(());
    }
    match stack.last_mut() {
        Some(parent) => {
            parent.children.push(Node::Text(s));
            Ok(())
        }
        None => Err(err(line_of, "text outside the root element")),
    }
}

/// The Lua table of `el` (built on the worker).
fn to_lua(lua: &Lua, el: Element) -> mlua::Result<Table> {
    let t = lua.create_table_with_capacity(0, 5)?;
    t.raw_set("name", el.name)?;
    if let Some(ns) = el.ns {
        t.raw_set("ns", ns)?;
    }
    let attrs = lua.create_table_with_capacity(0, el.attrs.len())?;
    for (k, v) in el.attrs {
        attrs.raw_set(k, v)?;
    }
    t.raw_set("attrs", attrs)?;
    let children = lua.create_table_with_capacity(el.children.len(), 0)?;
    let mut text: Option<String> = None;
    for child in el.children {
        match child {
            Node::Text(s) => {
                text.get_or_insert_with(String::new).push_str(&s);
                children.raw_push(s)?;
            }
            Node::Element(e) => children.raw_push(to_lua(lua, e)?)?,
        }
    }
    t.raw_set("children", children)?;
    if let Some(text) = text {
        t.raw_set("text", text)?;
    }
    Ok(t)
}

fn escape_into(out: &mut String, s: &str, attr: bool) {
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' if attr => out.push_str("&quot;"),
            '\n' if attr => out.push_str("&#10;"),
            '\r' => out.push_str("&#13;"),
            '\t' if attr => out.push_str("&#9;"),
            c => out.push(c),
        }
    }
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_alphabetic() || c == '_' || c == ':') && chars.all(|c| c.is_alphanumeric() || matches!(c, '_' | ':' | '-' | '.'))
}

fn scalar_text(v: &LuaValue, what: &str) -> Result<String, String> {
    match v {
        LuaValue::String(s) => s.to_str().map(|s| s.to_string()).map_err(|_| format!("pmnc.xml.encode: {what} is not UTF-8")),
        LuaValue::Integer(i) => Ok(i.to_string()),
        LuaValue::Number(n) => Ok(n.to_string()),
        LuaValue::Boolean(b) => Ok(b.to_string()),
        other => Err(format!("pmnc.xml.encode: {what} must be a string or number, got {}", other.type_name())),
    }
}

fn encode_into(out: &mut String, t: &Table, depth: usize, path: &str) -> Result<(), String> {
    if depth > DEFAULT_LIMITS.max_depth {
        return Err(format!("pmnc.xml.encode: {path}: nested deeper than {} levels (a table that contains itself?)", DEFAULT_LIMITS.max_depth));
    }
    let name = match t.raw_get::<LuaValue>("name") {
        Ok(LuaValue::String(s)) => s.to_string_lossy(),
        Ok(other) => return Err(format!("pmnc.xml.encode: {path}: an element needs a string name, got {}", other.type_name())),
        Err(e) => return Err(format!("pmnc.xml.encode: {path}: {e}")),
    };
    if !valid_name(&name) {
        return Err(format!("pmnc.xml.encode: {path}: {name:?} is not an XML name"));
    }
    let path = format!("{path}/{name}");
    out.push('<');
    out.push_str(&name);
    if let Ok(LuaValue::Table(attrs)) = t.raw_get::<LuaValue>("attrs") {
        let mut list = Vec::new();
        for pair in attrs.pairs::<LuaValue, LuaValue>() {
            let (k, v) = pair.map_err(|e| format!("pmnc.xml.encode: {path}: {e}"))?;
            let k = scalar_text(&k, "an attribute name")?;
            if !valid_name(&k) {
                return Err(format!("pmnc.xml.encode: {path}: {k:?} is not an XML name"));
            }
            list.push((k.clone(), scalar_text(&v, &format!("attribute {k}"))?));
        }
        list.sort();
        for (k, v) in list {
            out.push(' ');
            out.push_str(&k);
            out.push_str("=\"");
            escape_into(out, &v, true);
            out.push('"');
        }
    }
    let children = match t.raw_get::<LuaValue>("children") {
        Ok(LuaValue::Table(c)) => Some(c),
        _ => None,
    };
    let text = match t.raw_get::<LuaValue>("text") {
        Ok(LuaValue::Nil) | Err(_) => None,
        Ok(v) => Some(scalar_text(&v, "text")?),
    };
    let empty = children.as_ref().map(|c| c.raw_len() == 0).unwrap_or(true) && text.is_none();
    if empty {
        out.push_str("/>");
        return Ok(());
    }
    out.push('>');
    match children {
        Some(children) if children.raw_len() > 0 => {
            for (i, child) in children.sequence_values::<LuaValue>().enumerate() {
                match child.map_err(|e| format!("pmnc.xml.encode: {path}: {e}"))? {
                    LuaValue::Table(c) => encode_into(out, &c, depth + 1, &path)?,
                    v => escape_into(out, &scalar_text(&v, &format!("{path} child {}", i + 1))?, false),
                }
            }
        }
        _ => escape_into(out, text.as_deref().unwrap_or(""), false),
    }
    out.push_str("</");
    out.push_str(&name);
    out.push('>');
    Ok(())
}

impl Element {
    /// The element as XML text (attributes in their order), which `decode` reads back to it.
    pub fn to_xml(&self) -> String {
        let mut out = String::new();
        self.write(&mut out);
        out
    }

    fn write(&self, out: &mut String) {
        out.push('<');
        out.push_str(&self.name);
        for (k, v) in &self.attrs {
            out.push(' ');
            out.push_str(k);
            out.push_str("=\"");
            escape_into(out, v, true);
            out.push('"');
        }
        if self.children.is_empty() {
            out.push_str("/>");
            return;
        }
        out.push('>');
        for child in &self.children {
            match child {
                Node::Text(t) => escape_into(out, t, false),
                Node::Element(e) => e.write(out),
            }
        }
        out.push_str("</");
        out.push_str(&self.name);
        out.push('>');
    }
}

/// The text of element table `t`.
pub fn encode(t: &Table, declaration: bool) -> Result<String, String> {
    let mut out = String::new();
    if declaration {
        out.push_str("<?xml version=\"1.0\" encoding=\"UTF-8\"?>");
    }
    encode_into(&mut out, t, 1, "")?;
    Ok(out)
}

pub(crate) fn install(lua: &Lua, t: &Table) -> mlua::Result<()> {
    t.set(
        "decode",
        lua.create_function(|lua, text: LuaValue| {
            reported(lua, || {
                let text = string_arg(&text, "pmnc.xml.decode", "text")?;
                Ok(run_over(
                    lua,
                    text,
                    [],
                    crate::INLINE_BYTES_SLOW,
                    |text, []| decode(text, DEFAULT_LIMITS),
                    |lua, _, root| Ok(MultiValue::from_iter([LuaValue::Table(to_lua(lua, root)?)])),
                ))
            })
        })?,
    )?;
    t.set(
        "encode",
        lua.create_function(|lua, (t, opts): (LuaValue, LuaValue)| {
            reported(lua, || {
                let declaration = opt_flag(&opts, "declaration", "pmnc.xml.encode", false)?;
                let LuaValue::Table(t) = t else {
                    return Err(format!("pmnc.xml.encode: expected an element table, got {}", t.type_name()));
                };
                Ok(ok_bytes(lua, encode(&t, declaration)?))
            })
        })?,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elements_attributes_text_namespaces() {
        let doc = br#"<?xml version="1.0"?>
<soap:Envelope xmlns:soap="http://schemas.xmlsoap.org/soap/envelope/" xmlns="urn:x">
  <soap:Body><Price currency="EUR &amp; co">12.50 &lt;net&gt; &#233;&#x41;</Price><Empty/><![CDATA[<raw>]]></soap:Body>
</soap:Envelope>"#;
        let root = decode(doc, DEFAULT_LIMITS).unwrap();
        assert_eq!(root.name, "soap:Envelope");
        assert_eq!(root.ns.as_deref(), Some("http://schemas.xmlsoap.org/soap/envelope/"));
        let Node::Element(body) = &root.children[0] else { panic!("{root:?}") };
        let Node::Element(price) = &body.children[0] else { panic!("{body:?}") };
        assert_eq!(price.ns.as_deref(), Some("urn:x"));
        assert_eq!(price.attrs, vec![("currency".to_string(), "EUR & co".to_string())]);
        assert_eq!(price.children, vec![Node::Text("12.50 <net> éA".to_string())]);
        assert_eq!(body.children[2], Node::Text("<raw>".to_string()));
    }

    #[test]
    fn billion_laughs_and_external_entities_refused() {
        let bomb = br#"<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;">]><lolz>&lol2;</lolz>"#;
        let e = decode(bomb, DEFAULT_LIMITS).unwrap_err();
        assert!(e.contains("a DTD (<!DOCTYPE ...>) is not allowed"), "{e}");
        let e = decode(b"<a>&xxe;</a>", DEFAULT_LIMITS).unwrap_err();
        assert!(e.contains("unknown entity &xxe;"), "{e}");
    }

    #[test]
    fn limits_and_malformed_text() {
        let deep = "<a>".repeat(200) + &"</a>".repeat(200);
        assert!(decode(deep.as_bytes(), DEFAULT_LIMITS).unwrap_err().contains("nested deeper than 128"));
        assert!(decode(b"<a>", DEFAULT_LIMITS).unwrap_err().contains("ends inside <a>"));
        assert!(decode(b"<a></b>", DEFAULT_LIMITS).is_err());
        assert!(decode(b"<a/><b/>", DEFAULT_LIMITS).unwrap_err().contains("second root"));
        assert!(decode(b"", DEFAULT_LIMITS).unwrap_err().contains("no root"));
        // Found by the fuzz target: `<>` was taken, and written back as XML that does not read.
        assert!(decode(b"<a><b><c>#x41;<></></c></b></a>", DEFAULT_LIMITS).unwrap_err().contains("<> is not an XML element name"));
        assert!(decode(b"<a 1x=\"v\"/>", DEFAULT_LIMITS).is_err());
        let small = Limits { max_size: 10, max_depth: 5 };
        assert!(decode(b"<a>0123456789</a>", small).unwrap_err().contains("over the limit"));
    }

    #[test]
    fn encode_round_trip() {
        let lua = Lua::new();
        let t: Table =
            lua.load(r#"return { name = "m:a", attrs = { ["xmlns:m"] = "urn:m", q = 'x"<' }, children = { "t&", { name = "b", text = 5 } } }"#).eval().unwrap();
        let text = encode(&t, false).unwrap();
        assert_eq!(text, r#"<m:a q="x&quot;&lt;" xmlns:m="urn:m">t&amp;<b>5</b></m:a>"#);
        let back = decode(text.as_bytes(), DEFAULT_LIMITS).unwrap();
        assert_eq!(back.ns.as_deref(), Some("urn:m"));
        assert_eq!(back.children[0], Node::Text("t&".to_string()));
        let bad: Table = lua.load(r#"local t = { name = "a" }; t.children = { t }; return t"#).eval().unwrap();
        assert!(encode(&bad, false).unwrap_err().contains("nested deeper"));
    }
}
