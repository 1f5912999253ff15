//! Fuzzes what arrives from other processes: MessagePack values, calls and replies. Whatever
//! decodes must encode and decode to the same thing; nothing may panic or allocate wildly.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rustomnic_cluster::wire::{decode_value, encode_value, Call, Reply};

fuzz_target!(|data: &[u8]| {
    if let Ok(v) = decode_value(data) {
        let mut out = Vec::new();
        encode_value(&mut out, &v).expect("a decoded value encodes");
        // Floats: NaN != NaN, so compare the bytes of a second round instead of the values.
        let again = decode_value(&out).expect("our own encoding decodes");
        let mut out2 = Vec::new();
        encode_value(&mut out2, &again).expect("encodes again");
        assert_eq!(out, out2);
    }
    if let Ok(call) = Call::decode(data) {
        let bytes = call.encode().expect("a decoded call encodes");
        assert_eq!(Call::decode(&bytes).expect("decodes again").encode().ok(), Some(bytes));
    }
    if let Ok(reply) = Reply::decode(data) {
        let bytes = reply.encode().expect("a decoded reply encodes");
        assert!(Reply::decode(&bytes).is_ok());
    }
});
