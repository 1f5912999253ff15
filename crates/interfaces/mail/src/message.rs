//! A received message as the table a handler gets, shared by the smtp and imap interfaces: the
//! envelope the interface gives, the decoded headers, the MIME parts and attachments (parsed by
//! mail-parser, never by hand), and the raw bytes, all within [`Limits`].

use mail_parser::{Address, Message, MessageParser, MimeHeaders, PartType};
use rustomnic_core::Value;

/// What one message may hold; a message over any of them is refused with the reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of the raw message.
    pub max_size: usize,
    /// MIME parts of every kind (multipart containers included), nested messages' parts counted.
    pub max_parts: usize,
    /// How deep multiparts may nest (the top level is depth 0).
    pub max_depth: usize,
    /// Header fields of the message, and of each part.
    pub max_headers: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits { max_size: 10 << 20, max_parts: 100, max_depth: 10, max_headers: 500 }
    }
}

/// Above this many bytes a message is parsed on tokio's blocking pool, not on the worker
/// (decision 070's thresholds: well under a millisecond inline).
pub const INLINE_PARSE_LIMIT: usize = 64 << 10;

fn s(text: impl Into<String>) -> Value {
    Value::str(text)
}

fn map(entries: Vec<(&str, Value)>) -> Value {
    Value::Map(entries.into_iter().map(|(k, v)| (s(k), v)).collect())
}

/// The table of `raw` for a handler: `{ envelope, headers, parts, attachments, text, html, raw,
/// size }` (docs/interfaces/smtp.md). `Err` names the limit a message went over.
pub fn to_value(raw: &[u8], envelope: Value, limits: &Limits) -> Result<Value, String> {
    if raw.len() > limits.max_size {
        return Err(format!("the message is {} bytes, over max_message_size ({})", raw.len(), limits.max_size));
    }
    // mail-parser 0.11 has an overflowing subtraction in its quoted-printable decoder (a
    // boundary right after a soft line break), which panics where overflow checks are on (debug
    // builds) and wraps harmlessly elsewhere: a panic in the parser is caught and refuses that
    // one message. Only the parser: a panic in our own code below stays a bug to be found.
    let parsed = std::panic::catch_unwind(|| MessageParser::default().parse(raw))
        .map_err(|_| "the message could not be parsed (the MIME parser failed on it)".to_string())?;
    let (headers, parts, attachments, text, html) = match &parsed {
        Some(m) => {
            check(m, limits)?;
            let (parts, attachments) = parts(m, limits)?;
            (headers(m), parts, attachments, m.body_text(0).map(|t| s(t.into_owned())), m.body_html(0).map(|t| s(t.into_owned())))
        }
        // Nothing at all (an empty message): the handler still gets the envelope and raw.
        None => {
            let empty = || Value::Array(Vec::new());
            (map(vec![("from", empty()), ("to", empty()), ("cc", empty()), ("raw", empty())]), Vec::new(), Vec::new(), None, None)
        }
    };
    let mut out = vec![("envelope", envelope), ("headers", headers), ("parts", Value::Array(parts)), ("attachments", Value::Array(attachments))];
    if let Some(t) = text {
        out.push(("text", t));
    }
    if let Some(h) = html {
        out.push(("html", h));
    }
    out.push(("size", Value::Int(raw.len() as i64)));
    out.push(("raw", Value::Str(raw.to_vec())));
    Ok(map(out))
}

/// The counts and depth of `m` against `limits`, before anything is copied out of it.
fn check(m: &Message, limits: &Limits) -> Result<(), String> {
    let mut parts = 0usize;
    // Nested messages (message/rfc822) carry their own part lists; mail-parser nests at most a
    // few levels of them, and the depth counts them as one level each.
    let mut stack: Vec<(&Message, usize)> = vec![(m, 0)];
    while let Some((msg, base)) = stack.pop() {
        parts += msg.parts.len();
        if parts > limits.max_parts {
            return Err(format!("the message has more than max_parts ({}) MIME parts", limits.max_parts));
        }
        for p in &msg.parts {
            if p.headers.len() > limits.max_headers {
                return Err(format!("a part has {} header fields, over max_headers ({})", p.headers.len(), limits.max_headers));
            }
            if let PartType::Message(inner) = &p.body {
                stack.push((inner, base + 1));
            }
        }
        let depth = base + depth_of(msg, limits.max_depth.saturating_sub(base))?;
        if depth > limits.max_depth {
            return Err(format!("MIME parts nest {depth} deep, over max_depth ({})", limits.max_depth));
        }
    }
    Ok(())
}

/// How deep the multiparts of `m` nest, walking from its first part; stops past `max`.
fn depth_of(m: &Message, max: usize) -> Result<usize, String> {
    let mut deepest = 0;
    let mut stack = vec![(0u32, 0usize)];
    while let Some((id, depth)) = stack.pop() {
        deepest = deepest.max(depth);
        if depth > max {
            return Ok(depth);
        }
        if let Some(PartType::Multipart(children)) = m.parts.get(id as usize).map(|p| &p.body) {
            // A part's children come after it in the list; anything else is not followed, so
            // the walk ends whatever the ids say.
            stack.extend(children.iter().filter(|c| **c > id).map(|c| (*c, depth + 1)));
        }
    }
    Ok(deepest)
}

/// The leaf parts in order (containers left out) and the attachments.
fn parts(m: &Message, limits: &Limits) -> Result<(Vec<Value>, Vec<Value>), String> {
    let mut leaves = Vec::new();
    let mut stack = vec![(0u32, 0usize)];
    while let Some((id, depth)) = stack.pop() {
        if depth > limits.max_depth {
            return Err(format!("MIME parts nest over max_depth ({})", limits.max_depth));
        }
        let Some(p) = m.parts.get(id as usize) else { continue };
        match &p.body {
            PartType::Multipart(children) => stack.extend(children.iter().rev().filter(|c| **c > id).map(|c| (*c, depth + 1))),
            _ => leaves.push(part(p)),
        }
    }
    let attachments = m.attachments.iter().filter_map(|id| m.parts.get(*id as usize)).map(attachment).collect();
    Ok((leaves, attachments))
}

fn content_type<'x>(p: &impl MimeHeaders<'x>, body: &PartType) -> String {
    match p.content_type() {
        Some(ct) => match &ct.c_subtype {
            Some(sub) => format!("{}/{}", ct.c_type, sub).to_ascii_lowercase(),
            None => ct.c_type.to_ascii_lowercase(),
        },
        None => match body {
            PartType::Message(_) => "message/rfc822".into(),
            PartType::Html(_) => "text/html".into(),
            PartType::Text(_) => "text/plain".into(),
            _ => "application/octet-stream".into(),
        },
    }
}

/// `{ content_type, charset?, filename?, content_id?, size, text | body }`: `text` (UTF-8,
/// decoded from its charset) for text parts, `body` (bytes, transfer-decoded) for the others.
fn part(p: &mail_parser::MessagePart) -> Value {
    let mut out = vec![("content_type", s(content_type(p, &p.body)))];
    if let Some(charset) = p.content_type().and_then(|c| c.attribute("charset")) {
        out.push(("charset", s(charset.to_ascii_lowercase())));
    }
    if let Some(name) = p.attachment_name() {
        out.push(("filename", s(name)));
    }
    if let Some(id) = p.content_id() {
        out.push(("content_id", s(id)));
    }
    out.push(("size", Value::Int(p.len() as i64)));
    match &p.body {
        PartType::Text(t) | PartType::Html(t) => out.push(("text", s(t.as_ref()))),
        _ => out.push(("body", Value::Str(p.contents().to_vec()))),
    }
    map(out)
}

/// `{ filename, content_type, size, content }`.
fn attachment(p: &mail_parser::MessagePart) -> Value {
    let mut out = Vec::new();
    if let Some(name) = p.attachment_name() {
        out.push(("filename", s(name)));
    }
    out.push(("content_type", s(content_type(p, &p.body))));
    out.push(("size", Value::Int(p.len() as i64)));
    out.push(("content", Value::Str(p.contents().to_vec())));
    map(out)
}

/// A list of `{ name?, address? }`, groups flattened.
fn addresses(a: Option<&Address>) -> Value {
    let Some(a) = a else { return Value::Array(Vec::new()) };
    Value::Array(
        a.iter()
            .map(|addr| {
                let mut out = Vec::new();
                if let Some(n) = addr.name() {
                    out.push(("name", s(n)));
                }
                if let Some(x) = addr.address() {
                    out.push(("address", s(x)));
                }
                map(out)
            })
            .collect(),
    )
}

/// `{ subject?, from, to, cc, date?, message_id?, raw = { {name, value}, ... } }`.
fn headers(m: &Message) -> Value {
    let mut out = Vec::new();
    if let Some(subject) = m.subject() {
        out.push(("subject", s(subject)));
    }
    out.push(("from", addresses(m.from())));
    out.push(("to", addresses(m.to())));
    out.push(("cc", addresses(m.cc())));
    if let Some(d) = m.date() {
        out.push(("date", s(d.to_rfc3339())));
    }
    if let Some(id) = m.message_id() {
        out.push(("message_id", s(id)));
    }
    let raw = m.raw_message();
    let fields = m
        .root_part()
        .headers
        .iter()
        .map(|h| {
            let value = raw.get(h.offset_start() as usize..h.offset_end() as usize).unwrap_or_default();
            let value = String::from_utf8_lossy(value);
            map(vec![("name", s(h.name())), ("value", s(value.trim()))])
        })
        .collect();
    out.push(("raw", Value::Array(fields)));
    map(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get<'a>(v: &'a Value, key: &str) -> &'a Value {
        match v {
            Value::Map(m) => m.iter().find(|(k, _)| *k == Value::str(key)).map(|(_, v)| v).unwrap_or(&Value::Nil),
            _ => &Value::Nil,
        }
    }

    fn text(v: &Value) -> String {
        match v {
            Value::Str(b) => String::from_utf8_lossy(b).into_owned(),
            other => panic!("not a string: {other:?}"),
        }
    }

    const MULTI: &str = "From: Ann <ann@example.org>\r\nTo: bob@example.org, Cy <cy@example.org>\r\nSubject: =?UTF-8?B?R3LDvMOfZQ==?=\r\nMessage-ID: <abc@example.org>\r\nDate: Sun, 6 Dec 2026 10:00:00 +0000\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=XX\r\n\r\n--XX\r\nContent-Type: text/plain; charset=iso-8859-1\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\nGr=FC=DFe\r\n--XX\r\nContent-Type: application/octet-stream\r\nContent-Disposition: attachment; filename=\"a.bin\"\r\nContent-Transfer-Encoding: base64\r\n\r\nAAECAw==\r\n--XX--\r\n";

    #[test]
    fn a_multipart_message_becomes_its_table() {
        let v = to_value(MULTI.as_bytes(), Value::Nil, &Limits::default()).unwrap();
        let h = get(&v, "headers");
        assert_eq!(text(get(h, "subject")), "Grüße");
        assert_eq!(text(get(h, "message_id")), "abc@example.org");
        assert_eq!(text(get(h, "date")), "2026-12-06T10:00:00Z");
        let Value::Array(to) = get(h, "to") else { panic!() };
        assert_eq!(to.len(), 2);
        assert_eq!(text(get(&to[1], "name")), "Cy");
        let Value::Array(raw) = get(h, "raw") else { panic!() };
        assert_eq!(text(get(&raw[0], "name")), "From");
        assert_eq!(text(get(&raw[0], "value")), "Ann <ann@example.org>");
        let Value::Array(parts) = get(&v, "parts") else { panic!() };
        assert_eq!(parts.len(), 2);
        assert_eq!(text(get(&parts[0], "text")).trim_end(), "Grüße");
        assert_eq!(text(get(&parts[0], "charset")), "iso-8859-1");
        assert_eq!(get(&parts[1], "body"), &Value::Str(vec![0, 1, 2, 3]));
        let Value::Array(att) = get(&v, "attachments") else { panic!() };
        assert_eq!(att.len(), 1);
        assert_eq!(text(get(&att[0], "filename")), "a.bin");
        assert_eq!(get(&att[0], "size"), &Value::Int(4));
        assert_eq!(get(&v, "raw"), &Value::Str(MULTI.as_bytes().to_vec()));
    }

    #[test]
    fn limits_are_kept() {
        let l = Limits { max_parts: 2, ..Limits::default() };
        assert!(to_value(MULTI.as_bytes(), Value::Nil, &l).unwrap_err().contains("max_parts"));
        let l = Limits { max_headers: 3, ..Limits::default() };
        assert!(to_value(MULTI.as_bytes(), Value::Nil, &l).unwrap_err().contains("max_headers"));
        let l = Limits { max_size: 10, ..Limits::default() };
        assert!(to_value(MULTI.as_bytes(), Value::Nil, &l).unwrap_err().contains("max_message_size"));
        // Multiparts nested 30 deep.
        let mut m = String::from("Content-Type: multipart/mixed; boundary=b0\r\n\r\n");
        for i in 0..30 {
            m.push_str(&format!("--b{i}\r\nContent-Type: multipart/mixed; boundary=b{}\r\n\r\n", i + 1));
        }
        m.push_str("--b30\r\nContent-Type: text/plain\r\n\r\ndeep\r\n");
        let l = Limits { max_parts: 1000, ..Limits::default() };
        assert!(to_value(m.as_bytes(), Value::Nil, &l).unwrap_err().contains("max_depth"), "{:?}", to_value(m.as_bytes(), Value::Nil, &l));
        let l = Limits { max_parts: 1000, max_depth: 40, ..Limits::default() };
        assert!(to_value(m.as_bytes(), Value::Nil, &l).is_ok());
    }

    /// Pieces of MIME syntax put together at random: never a panic, a refusal names its limit,
    /// the limits hold.
    #[test]
    fn random_mime_is_converted_within_limits() {
        let pieces: [&[u8]; 12] = [
            b"Content-Type: multipart/mixed; boundary=a\r\n",
            b"Content-Type: message/rfc822\r\n",
            b"Content-Transfer-Encoding: base64\r\n",
            b"Content-Transfer-Encoding: quoted-printable\r\n",
            b"Subject: =?utf-8?q?=C3=A4?=\r\n",
            b"\r\n",
            b"--a\r\n",
            b"--a--\r\n",
            b"QUJD=\r\n",
            b"=FF=\r\n",
            b"Content-Disposition: attachment; filename=x\r\n",
            b"From: a <b@c>, d@e\r\n",
        ];
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..5_000 {
            let raw: Vec<u8> = (0..(next() % 40)).flat_map(|_| pieces[(next() % 12) as usize].iter().copied()).collect();
            let limits = Limits {
                max_size: 1 << 20,
                max_parts: 1 + (next() % 20) as usize,
                max_depth: 1 + (next() % 5) as usize,
                max_headers: 1 + (next() % 20) as usize,
            };
            match to_value(&raw, Value::Nil, &limits) {
                Ok(v) => {
                    assert_eq!(get(&v, "raw"), &Value::Str(raw.clone()));
                    let Value::Array(parts) = get(&v, "parts") else { panic!() };
                    assert!(parts.len() <= limits.max_parts);
                }
                Err(e) => assert!(["max_parts", "max_depth", "max_headers", "could not be parsed"].iter().any(|k| e.contains(k)), "{e}"),
            }
        }
    }

    /// The quoted-printable soft break right before a boundary that makes mail-parser 0.11
    /// subtract past zero: refused where that panics (debug), converted where it wraps.
    #[test]
    fn the_parsers_overflow_never_escapes() {
        let raw = b"Content-Type: multipart/mixed; boundary=a\r\n\r\n--a\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n=\r\n--a--\r\n";
        match to_value(raw, Value::Nil, &Limits::default()) {
            Ok(v) => assert_eq!(get(&v, "raw"), &Value::Str(raw.to_vec())),
            Err(e) => assert!(e.contains("could not be parsed"), "{e}"),
        }
    }

    #[test]
    fn odd_input_still_gives_a_table() {
        for raw in [&b""[..], b"\r\n", b"no headers at all", b"Content-Type: multipart/mixed; boundary=\r\n\r\n--\r\n"] {
            let v = to_value(raw, Value::Nil, &Limits::default()).unwrap();
            assert_eq!(get(&v, "raw"), &Value::Str(raw.to_vec()));
        }
    }
}
