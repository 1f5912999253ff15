//! Decoding what other processes send never costs far more memory than the message itself:
//! measured with a counting allocator around each decode (issue 24, item 1).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use rustomnic_cluster::wire::{decode_value, Call, Reply};

/// Counts the bytes each thread asks for (tests run on several threads at once).
struct Counting;

thread_local! {
    static ASKED: Cell<u64> = const { Cell::new(0) };
}

fn count(n: usize) {
    // `try_with`: the slot is gone while a thread is being torn down.
    let _ = ASKED.try_with(|c| c.set(c.get().saturating_add(n as u64)));
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Bytes asked of the allocator while `f` runs on this thread.
fn asked<T>(f: impl FnOnce() -> T) -> (u64, T) {
    let before = ASKED.with(Cell::get);
    let out = f();
    (ASKED.with(Cell::get) - before, out)
}

/// What a decode may cost: a value of the model is 32 bytes, a map pair 64, every element takes
/// at least one byte of the message, and a vector grown by doubling has asked for under four
/// times its length in all. The constant covers error messages and small fixed costs.
fn budget(message: &[u8]) -> u64 {
    160 * message.len() as u64 + (64 << 10)
}

fn check(what: &str, message: &[u8]) {
    let (v, _) = asked(|| decode_value(message).is_ok());
    let (c, _) = asked(|| Call::decode(message).is_ok());
    let (r, _) = asked(|| Reply::decode(message).is_ok());
    let (e, _) = asked(|| rustomnic_cluster::events::decode(message).is_ok());
    for (decoder, n) in [("decode_value", v), ("Call::decode", c), ("Reply::decode", r), ("events::decode", e)] {
        assert!(n <= budget(message), "{what}: {decoder} asked for {n} bytes decoding {} bytes (budget {})", message.len(), budget(message));
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
