//! Decoding untrusted text with `pmnc.csv.decode` never costs far more memory than the text
//! itself: measured with a counting allocator (issue 24; the input is one the fuzzer found).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

struct Counting;

thread_local! {
    static ASKED: Cell<u64> = const { Cell::new(0) };
}

fn count(n: usize) {
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

/// The budget of every decoder of outside input (docs/decisions/060-bounded-decoding.md).
fn budget(len: usize) -> u64 {
    160 * len as u64 + (64 << 10)
}

#[test]
fn csv_decode_is_bounded() {
    let found = include_bytes!("csv-amplification.bin");
    let many_empty_fields = [b"a".as_slice(), &b"\t".repeat(5000)].concat();
    let many_short_lines = b"a\n".repeat(5000);
    let quoted_separators = [b"\"".as_slice(), &b"\t\n".repeat(3000), b"\""].concat();
    for (what, text, sep) in [
        ("found by the fuzzer", found.as_slice(), b'\t'),
        ("5,000 empty fields", &many_empty_fields, b'\t'),
        ("5,000 lines", &many_short_lines, b','),
        ("one quoted field", &quoted_separators, b'\t'),
    ] {
        let (n, out) = asked(|| rustomnic_stdlib::csv::decode(text, sep));
        eprintln!("{what}: {} bytes -> {n} asked ({:?} records)", text.len(), out.as_ref().map(Vec::len));
        assert!(n <= budget(text.len()), "{what}: {n} bytes asked decoding {} (budget {})", text.len(), budget(text.len()));
    }
}
