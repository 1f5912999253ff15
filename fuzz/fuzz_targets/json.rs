//! Fuzzes JSON request bodies through the value model: parse, encode, parse again, compare.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rustomnic_core::Value;

fuzz_target!(|data: &[u8]| {
    if let Ok(v) = Value::parse_json(data) {
        if let Ok(json) = v.to_json() {
            let text = json.to_string();
            let again = Value::parse_json(text.as_bytes()).expect("our own JSON must parse");
            assert_eq!(again.to_json().ok(), Some(json));
        }
    }
});
