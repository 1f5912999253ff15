//! Decoding what other processes send never costs far more memory than the message itself:
//! measured with a counting allocator around each decode (issue 24, item 1).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use rustomnic_alloc_count::{asked, budget};
use rustomnic_cluster::wire::{decode_value, Call, Reply};

rustomnic_alloc_count::install!();

fn check(what: &str, message: &[u8]) {
    let (v, _) = asked(|| decode_value(message).is_ok());
    let (c, _) = asked(|| Call::decode(message).is_ok());
    let (r, _) = asked(|| Reply::decode(message).is_ok());
    let (e, _) = asked(|| rustomnic_cluster::events::decode(message).is_ok());
    for (decoder, n) in [("decode_value", v), ("Call::decode", c), ("Reply::decode", r), ("events::decode", e)] {
        assert!(n <= budget(message.len()), "{what}: {decoder} asked for {n} bytes decoding {} bytes (budget {})", message.len(), budget(message.len()));
    }
}

/// 128 nested map32 headers, each announcing 512Ki pairs (fewer than the bytes left, so the
/// announced count passes the length check), then nils up to 1 MiB.
fn nested_maps() -> Vec<u8> {
    let mut m = Vec::with_capacity(1 << 20);
    m.extend_from_slice(&[0x93, 0x00, 0xa0]);
    for _ in 0..128 {
        m.push(0xdf);
        m.extend_from_slice(&(512u32 << 10).to_be_bytes());
        m.push(0xc0);
    }
    m.resize(1 << 20, 0xc0);
    m
}

#[test]
fn the_nested_map_message_decodes_in_bounded_memory() {
    check("nested map32", &nested_maps());
}

#[test]
fn its_kin_decode_in_bounded_memory() {
    // One level: a map32 announcing a million pairs with half of them there.
    let mut one = vec![0xdf];
    one.extend_from_slice(&(1u32 << 20).to_be_bytes());
    one.resize(1 << 20, 0xc0);
    check("one map32", &one);
    // Nested array32 headers.
    let mut arrays = Vec::new();
    for _ in 0..128 {
        arrays.push(0xdd);
        arrays.extend_from_slice(&(900u32 << 10).to_be_bytes());
    }
    arrays.resize(1 << 20, 0xc0);
    check("nested array32", &arrays);
    // Nested fixmaps and fixarrays of 15: small headers, small messages.
    let mut small = Vec::new();
    for i in 0..128 {
        small.push(if i % 2 == 0 { 0x8f } else { 0x9f });
        if i % 2 == 0 {
            small.push(0xc0);
        }
    }
    check("nested fix containers", &small);
    // The envelope of a call whose arguments array announces what is not there.
    let mut call = vec![0x98, 0x01, 0xa1, b'w', 0xa1, b'r', 0x05, 0xa1, b'c', 0xa1, b'm', 0xa1, b'f', 0xdd];
    call.extend_from_slice(&(60u32 << 10).to_be_bytes());
    call.resize(64 << 10, 0xc0);
    check("call arguments", &call);
}
