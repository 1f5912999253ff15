//! NATS headers and subjects as the nats resource and interface read them from Lua and from the
//! wire. The input builds a `headers` table (names and values as the fuzzer chooses: any bytes,
//! numbers, booleans, arrays) and two subjects. Properties: a table the conversion accepts
//! becomes headers that convert back to a table which converts to the same headers again (names
//! and values with no line break or colon can smuggle no header); a refused table says why;
//! a subject valid for publishing matches itself, is matched by `>` and by its own tokens with
//! any one replaced by `*`, and by nothing with another number of tokens unless `>` ends it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rustomnic_core::Value;
use rustomnic_fuzz::Choices;
use rustomnic_nats::subject_matches;
use rustomnic_resource_nats::wire::{check_publish_subject, check_subscribe_subject, headers_from_value, headers_to_value};

fn value(c: &mut Choices) -> Value {
    match c.byte() % 6 {
        0 => Value::Int(c.u64() as i64),
        1 => Value::Bool(c.byte() & 1 == 1),
        2 => Value::Float(f64::from_bits(c.u64())),
        3 => {
            let n = c.byte() % 4;
            Value::Array((0..n).map(|_| Value::Str(c.piece().to_vec())).collect())
        }
        4 => Value::Nil,
        _ => Value::Str(c.piece().to_vec()),
    }
}

fuzz_target!(|data: &[u8]| {
    let mut c = Choices::new(data);
    let n = c.byte() % 8;
    let table = Value::Map((0..n).map(|_| (Value::Str(c.piece().to_vec()), value(&mut c))).collect());
    match headers_from_value(Some(&table)) {
        Ok(h) => {
            let back = headers_to_value(Some(&h));
            let again = headers_from_value(Some(&back)).expect("headers we made read back");
            assert_eq!(headers_to_value(Some(&again)), back, "headers do not round-trip");
            for (name, values) in h.iter() {
                let name = name.to_string();
                assert!(!name.is_empty() && !name.contains([':', ' ', '\r', '\n']), "header name {name:?}");
                for v in values {
                    assert!(!v.as_str().contains(['\r', '\n']), "a value with a line break: {:?}", v.as_str());
                }
            }
        }
        Err(e) => assert!(e.starts_with("headers"), "an error that does not say where: {e}"),
    }
    let subject = String::from_utf8_lossy(c.piece()).into_owned();
    let pattern = String::from_utf8_lossy(c.piece()).into_owned();
    if check_publish_subject("subject", &subject).is_ok() {
        assert!(subject_matches(&subject, &subject), "{subject:?} does not match itself");
        assert!(subject_matches(">", &subject), "> does not match {subject:?}");
        let tokens: Vec<&str> = subject.split('.').collect();
        let i = c.byte() as usize % tokens.len();
        let mut starred = tokens.clone();
        starred[i] = "*";
        assert!(subject_matches(&starred.join("."), &subject), "{starred:?} does not match {subject:?}");
        if check_subscribe_subject("pattern", &pattern).is_ok() && subject_matches(&pattern, &subject) {
            let p: Vec<&str> = pattern.split('.').collect();
            assert!(p.len() == tokens.len() || (p.last() == Some(&">") && p.len() <= tokens.len()), "{pattern:?} matched {subject:?}");
            for (a, b) in p.iter().zip(&tokens) {
                assert!(*a == "*" || *a == ">" || a == b, "{pattern:?} matched {subject:?} at {a:?}");
            }
        }
    }
});
