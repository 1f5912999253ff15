//! Decoding a stored value never costs far more memory than the stored bytes: a damaged or
//! hostile blob in the state or queue tables cannot make a read ask for gigabytes (issue 24).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use rustomnic_alloc_count::{asked, budget};
use rustomnic_resource_state as codec;

rustomnic_alloc_count::install!();

fn varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8 & 0x7f) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn check(what: &str, blob: &[u8]) {
    let (n, result) = asked(|| codec::decode(blob).is_ok());
    assert!(!result, "{what}: a hostile blob decoded");
    assert!(n <= budget(blob.len()), "{what}: decode asked for {n} bytes for a {}-byte blob (budget {})", blob.len(), budget(blob.len()));
}

#[test]
fn nested_maps_decode_in_bounded_memory() {
    // 128 nested maps, each announcing 512Ki entries (fewer than the bytes left), in 1 MiB.
    let mut blob = vec![codec::FORMAT];
    for _ in 0..128 {
        blob.push(7);
        varint(&mut blob, 512 << 10);
        blob.push(0);
    }
    blob.resize(1 << 20, 0);
    check("nested maps", &blob);
}

#[test]
fn nested_arrays_decode_in_bounded_memory() {
    let mut blob = vec![codec::FORMAT];
    for _ in 0..128 {
        blob.push(6);
        varint(&mut blob, 900 << 10);
    }
    blob.resize(1 << 20, 0);
    check("nested arrays", &blob);
}
