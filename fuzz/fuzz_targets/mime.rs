//! Mail messages as the smtp and imap interfaces receive them, through the conversion to the
//! handler's table (mail-parser underneath), with limits from the input's first bytes.
//! Properties: never a panic; bounded allocation; a refusal names the limit, else the table
//! holds the raw bytes and size as received, no more leaf parts than max_parts, attachments
//! whose size is their content's length; and a multipart message built from the input's pieces
//! (base64 attachments) gives those pieces back byte for byte.
#![no_main]

use base64::Engine;
use libfuzzer_sys::fuzz_target;
use rustomnic_core::Value;
use rustomnic_fuzz::{bounded, Choices};
use rustomnic_mail::fuzzing::{to_value, Limits};

fn get<'a>(v: &'a Value, key: &str) -> &'a Value {
    match v {
        Value::Map(m) => m.iter().find(|(k, _)| *k == Value::str(key)).map(|(_, v)| v).unwrap_or(&Value::Nil),
        _ => &Value::Nil,
    }
}

fn list(v: &Value) -> &[Value] {
    match v {
        Value::Array(a) => a,
        _ => &[],
    }
}

/// mail-parser 0.11's known overflow in quoted-printable decoding panics under `-a` (overflow
/// checks); `to_value` catches panics of the parser and refuses the message, which is the
/// behaviour under test, so only panics located in mail-parser's own source are let through
/// here. Every other panic goes to libFuzzer's hook (a crash).
fn tolerate_parser_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !info.location().is_some_and(|l| l.file().contains("mail-parser")) {
                previous(info);
            }
        }));
    });
}

fuzz_target!(|data: &[u8]| {
    tolerate_parser_panics();
    let mut c = Choices::new(data);
    let limits = Limits { max_size: 1 + c.u16() as usize * 4, max_parts: 1 + (c.byte() % 64) as usize, max_depth: 1 + (c.byte() % 12) as usize, max_headers: 1 + (c.byte() % 128) as usize };
    let raw = c.rest();
    let out = bounded("mime", raw.len(), || to_value(raw, Value::Nil, &limits));
    match &out {
        Err(e) => assert!(["max_message_size", "max_parts", "max_depth", "max_headers", "could not be parsed"].iter().any(|k| e.contains(k)), "refusal names no limit: {e}"),
        Ok(v) => {
            assert!(raw.len() <= limits.max_size);
            assert_eq!(get(v, "raw"), &Value::Str(raw.to_vec()));
            assert_eq!(get(v, "size"), &Value::Int(raw.len() as i64));
            assert!(list(get(v, "parts")).len() <= limits.max_parts);
            for a in list(get(v, "attachments")) {
                match get(a, "content") {
                    Value::Str(b) => assert_eq!(get(a, "size"), &Value::Int(b.len() as i64)),
                    other => panic!("attachment content {other:?}"),
                }
            }
        }
    }

    // Round trip: the input's pieces as base64 attachments of a multipart message.
    let pieces: Vec<&[u8]> = raw.split(|b| *b == 0).take(6).collect();
    let mut m = String::from("From: a@example.org\r\nSubject: round trip\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"=_b\"\r\n\r\n");
    for (i, p) in pieces.iter().enumerate() {
        let b64 = base64::engine::general_purpose::STANDARD.encode(p);
        m.push_str(&format!("--=_b\r\nContent-Type: application/octet-stream\r\nContent-Disposition: attachment; filename=\"p{i}.bin\"\r\nContent-Transfer-Encoding: base64\r\n\r\n"));
        for line in b64.as_bytes().chunks(76) {
            m.push_str(std::str::from_utf8(line).unwrap_or_default());
            m.push_str("\r\n");
        }
    }
    m.push_str("--=_b--\r\n");
    let generous = Limits { max_size: 1 << 24, max_parts: 100, max_depth: 10, max_headers: 100 };
    let v = to_value(m.as_bytes(), Value::Nil, &generous).unwrap_or_else(|e| panic!("built message refused: {e}"));
    let got: Vec<Vec<u8>> = list(get(&v, "attachments"))
        .iter()
        .map(|a| match get(a, "content") {
            Value::Str(b) => b.clone(),
            other => panic!("content {other:?}"),
        })
        .collect();
    // Empty pieces make empty parts, which a reader may take as an attachment or not.
    let want: Vec<Vec<u8>> = pieces.iter().map(|p| p.to_vec()).collect();
    let got_nonempty: Vec<&Vec<u8>> = got.iter().filter(|g| !g.is_empty()).collect();
    let want_nonempty: Vec<&Vec<u8>> = want.iter().filter(|w| !w.is_empty()).collect();
    assert_eq!(got_nonempty, want_nonempty, "attachments of the built message");
});
