//! `pmnc.csv.decode` input. Properties: bounded allocation; what decodes encodes to text that
//! decodes to the same records (RFC 4180 quoting round-trips any field).
#![no_main]

use libfuzzer_sys::fuzz_target;
use rustomnic_fuzz::bounded;
use rustomnic_stdlib::csv::{decode, encode};

fuzz_target!(|data: &[u8]| {
    let sep = match data.first() {
        Some(b) if b % 3 == 1 => b';',
        Some(b) if b % 3 == 2 => b'\t',
        _ => b',',
    };
    let Ok(rows) = bounded("csv decode", data.len(), || decode(data, sep)) else { return };
    let text = encode(&rows, sep).unwrap_or_else(|e| panic!("decoded rows do not encode: {e}"));
    let again = decode(text.as_bytes(), sep).unwrap_or_else(|e| panic!("our own CSV does not read back: {e}"));
    // A record of one empty field is written as an empty line, which reads back as no record.
    let significant = |rows: &[Vec<String>]| rows.iter().filter(|r| !(r.len() == 1 && r[0].is_empty())).cloned().collect::<Vec<_>>();
    assert_eq!(significant(&again), significant(&rows), "{text:?}");
});
