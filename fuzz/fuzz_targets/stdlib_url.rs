//! `pmnc.url.decode`/`encode` input. Properties: decoding agrees with the `percent-encoding`
//! crate wherever every `%` starts a valid escape and refuses exactly where one does not; encoding
//! is undone by decoding and leaves only unreserved bytes and escapes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rustomnic_stdlib::url::{decode, encode};

fn escapes_valid(data: &[u8]) -> bool {
    data.iter().enumerate().all(|(i, &b)| b != b'%' || (data.get(i + 1).is_some_and(u8::is_ascii_hexdigit) && data.get(i + 2).is_some_and(u8::is_ascii_hexdigit)))
}

fuzz_target!(|data: &[u8]| {
    let decoded = decode(data, false);
    assert_eq!(decoded.is_ok(), escapes_valid(data), "{data:?}: {decoded:?}");
    if let Ok(d) = &decoded {
        let theirs: Vec<u8> = percent_encoding::percent_decode(data).collect();
        assert_eq!(d, &theirs);
    }
    let e = encode(data);
    assert!(e.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._~%".contains(&b)), "{e}");
    assert_eq!(decode(e.as_bytes(), true).unwrap(), data);
    if let Ok(plus) = decode(data, true) {
        assert_eq!(plus.len(), decoded.as_ref().map(Vec::len).unwrap_or(plus.len()));
    }
});
