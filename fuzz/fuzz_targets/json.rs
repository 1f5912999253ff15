//! JSON request bodies and `pmnc.json.decode` input through the value model. Properties: the
//! decoder agrees with serde_json's own tree wherever serde_json's depth limit allows, refuses
//! only by depth beyond it, never asks for far more memory than the input, and whatever it
//! decodes encodes and decodes back to the same value, and both JSON writers print it alike.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rustomnic_core::Value;
use rustomnic_fuzz::bounded;

fuzz_target!(|data: &[u8]| {
    let parsed = bounded("parse_json", data.len(), || Value::parse_json(data));
    match serde_json::from_slice::<serde_json::Value>(data) {
        Ok(tree) => assert_eq!(
            parsed.as_ref(),
            Ok(&Value::from_json(&tree)),
            "the two ways of reading JSON disagree"
        ),
        Err(e) if parsed.is_ok() => assert!(
            e.to_string().contains("recursion limit"),
            "read although serde_json refused it: {e}"
        ),
        Err(_) => {}
    }
    let Ok(v) = parsed else { return };
    // A value read from JSON always has UTF-8 string keys and finite numbers.
    let json = v
        .to_json()
        .unwrap_or_else(|e| panic!("a value read from JSON cannot be written back: {e}"));
    let again = Value::parse_json(json.to_string().as_bytes())
        .unwrap_or_else(|e| panic!("our own JSON does not read back: {e}"));
    assert_eq!(again, v);
    // The direct writer (response bodies, pmnc.json.encode) prints the same text.
    assert_eq!(v.to_json_text().as_deref(), Ok(json.to_string().as_str()), "the two JSON writers disagree");
});
