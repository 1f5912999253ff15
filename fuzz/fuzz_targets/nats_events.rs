//! Events from other processes of the flock (`pmnc.<flock>.event.<cage>`). Properties: a decode
//! never asks for far more memory than the message; a decoded event encodes to bytes that
//! decode to the same instance, topic and (byte for byte) value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rustomnic_cluster::events::{decode, encode};
use rustomnic_cluster::wire::encode_value;
use rustomnic_fuzz::bounded;

fn bytes(v: &rustomnic_core::Value) -> Vec<u8> {
    let mut out = Vec::new();
    encode_value(&mut out, v)
        .unwrap_or_else(|e| panic!("a decoded event value does not encode: {e}"));
    out
}

fuzz_target!(|data: &[u8]| {
    let Ok((instance, topic, value)) = bounded("events::decode", data.len(), || decode(data))
    else {
        return;
    };
    let again = encode(&instance, &topic, &value)
        .unwrap_or_else(|e| panic!("a decoded event does not encode: {e}"));
    let (i2, t2, v2) =
        decode(&again).unwrap_or_else(|e| panic!("our own event does not decode: {e}"));
    assert_eq!((i2, t2), (instance, topic));
    assert_eq!(bytes(&v2), bytes(&value));
});
