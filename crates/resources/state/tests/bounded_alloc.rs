//! Decoding a stored value never costs far more memory than the stored bytes: a damaged or
//! hostile blob in the state or queue tables cannot make a read ask for gigabytes (issue 24).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use rustomnic_resource_state as codec;

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

fn asked<T>(f: impl FnOnce() -> T) -> (u64, T) {
    let before = ASKED.with(Cell::get);
    let out = f();
    (ASKED.with(Cell::get) - before, out)
}

/// A value is 32 bytes, a map entry 64; every element takes at least a byte; vectors grown by
/// doubling ask for under four times their length in all. The constant covers messages.
fn budget(blob: &[u8]) -> u64 {
    160 * blob.len() as u64 + (64 << 10)
}

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
    assert!(n <= budget(blob), "{what}: decode asked for {n} bytes for a {}-byte blob (budget {})", blob.len(), budget(blob));
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
