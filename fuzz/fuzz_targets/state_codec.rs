//! The stored form of values (`pmnc.state`, queued calls' arguments and results): what the
//! SQLite file of a cage holds, which a damaged disk or a hand edit can change. Properties: a
//! decode never asks for far more memory than the blob; every value has one encoding (what
//! decodes encodes back to the very same bytes); and values from the MessagePack decoder
//! round-trip through the codec.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rustomnic_fuzz::bounded;
use rustomnic_resource_state::{decode, encode};

fuzz_target!(|data: &[u8]| {
    if let Ok(v) = bounded("codec::decode", data.len(), || decode(data)) {
        let again = encode(&v, usize::MAX)
            .unwrap_or_else(|e| panic!("a decoded value does not encode: {e}"));
        assert_eq!(again, data, "a second encoding of the same value");
    }
    // The same bytes as a value from the wire, stored and read back (bit for bit: NaN payloads
    // included).
    if let Ok(v) = rustomnic_cluster::wire::decode_value(data) {
        let stored =
            encode(&v, usize::MAX).unwrap_or_else(|e| panic!("a wire value cannot be stored: {e}"));
        let back =
            decode(&stored).unwrap_or_else(|e| panic!("a stored value does not read back: {e}"));
        assert_eq!(encode(&back, usize::MAX).ok(), Some(stored));
        // A limit is a limit: encoding under it either fits or is refused.
        let limit = data.len() / 2 + 1;
        if let Ok(small) = encode(&v, limit) {
            assert!(small.len() <= limit);
        }
    }
});
