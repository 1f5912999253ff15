//! An allocator that counts the bytes each thread asks for, and the budget every decoder of
//! outside input keeps (docs/decisions/060-bounded-decoding.md): for the tests and fuzz targets
//! that assert that no input costs far more memory than its size. A test binary installs it
//! with [`install!`]; [`asked`] measures a closure.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// Counts the bytes asked of the allocator, per thread (tests run on several threads at once;
/// libFuzzer runs one input at a time).
pub struct Counting;

thread_local! {
    static ASKED: Cell<u64> = const { Cell::new(0) };
}

fn count(n: usize) {
    // `try_with`: the slot is gone while a thread is being torn down.
    let _ = ASKED.try_with(|c| c.set(c.get().saturating_add(n as u64)));
}

// SAFETY: every call is passed on to the system allocator unchanged; only a counter is added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Makes [`Counting`] the allocator of the binary it is written in.
#[macro_export]
macro_rules! install {
    () => {
        #[global_allocator]
        static ALLOCATOR: $crate::Counting = $crate::Counting;
    };
}

/// Bytes asked of the allocator on this thread while `f` runs, and what it returned.
pub fn asked<T>(f: impl FnOnce() -> T) -> (u64, T) {
    let before = ASKED.with(Cell::get);
    let out = f();
    (ASKED.with(Cell::get) - before, out)
}

/// What decoding `len` bytes may ask for: a value of the model is 32 bytes and a map pair 64,
/// each takes at least one byte of input, a vector grown by doubling asks for under four times
/// its length in all; the constant covers error messages and small fixed costs.
pub fn budget(len: usize) -> u64 {
    160 * len as u64 + (64 << 10)
}
