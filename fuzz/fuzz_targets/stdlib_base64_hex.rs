//! `pmnc.base64.decode` and `pmnc.hex.decode` input. Properties: every form of base64 (standard
//! or URL-safe, padded or not) and hex round-trips the bytes; what decodes re-encodes to text
//! that decodes to the same bytes; a refusal names the function.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rustomnic_fuzz::bounded;
use rustomnic_stdlib::{base64, hex};

fuzz_target!(|data: &[u8]| {
    for url in [false, true] {
        for pad in [false, true] {
            let text = base64::encode(data, url, pad);
            assert_eq!(base64::decode(&text, url).unwrap(), data);
        }
        match bounded("base64 decode", data.len(), || base64::decode(data, url)) {
            Ok(bytes) => assert_eq!(base64::decode(&base64::encode(&bytes, url, true), url).unwrap(), bytes),
            Err(e) => assert!(e.starts_with("pmnc.base64.decode: "), "{e}"),
        }
    }
    assert_eq!(hex::decode(hex::encode(data).as_bytes()).unwrap(), data);
    match bounded("hex decode", data.len(), || hex::decode(data)) {
        Ok(bytes) => {
            assert_eq!(bytes.len() * 2, data.len());
            assert_eq!(hex::encode(&bytes), String::from_utf8_lossy(data).to_lowercase());
        }
        Err(e) => assert!(e.starts_with("pmnc.hex.decode: "), "{e}"),
    }
});
