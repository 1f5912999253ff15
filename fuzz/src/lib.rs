//! What the fuzz targets share: an allocator that counts what each decode asks for (so a
//! target can assert that no input costs far more memory than its size), and a reader that
//! turns fuzz bytes into structured choices.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// Counts the bytes asked of the allocator, per thread; libFuzzer runs one input at a time.
pub struct Counting;

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

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Bytes asked of the allocator while `f` runs, and what it returned.
pub fn asked<T>(f: impl FnOnce() -> T) -> (u64, T) {
    let before = ASKED.with(Cell::get);
    let out = f();
    (ASKED.with(Cell::get) - before, out)
}

/// What decoding `len` bytes may ask for (docs/decisions/060-bounded-decoding.md): a value is
/// 32 bytes and a map pair 64, each takes at least one byte of input, a vector grown by
/// doubling asks for under four times its length in all; the constant covers messages.
pub fn budget(len: usize) -> u64 {
    160 * len as u64 + (64 << 10)
}

/// Asserts that `f`, decoding `len` bytes, stays within [`budget`].
pub fn bounded<T>(what: &str, len: usize, f: impl FnOnce() -> T) -> T {
    let (n, out) = asked(f);
    assert!(
        n <= budget(len),
        "{what}: asked for {n} bytes decoding {len} (budget {})",
        budget(len)
    );
    out
}

/// Structured choices taken from the front of the fuzz input; zeros once it runs out.
pub struct Choices<'a> {
    pub data: &'a [u8],
}

impl<'a> Choices<'a> {
    pub fn new(data: &'a [u8]) -> Choices<'a> {
        Choices { data }
    }

    pub fn byte(&mut self) -> u8 {
        match self.data.split_first() {
            Some((b, rest)) => {
                self.data = rest;
                *b
            }
            None => 0,
        }
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.byte(), self.byte()])
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_be_bytes([self.byte(), self.byte(), self.byte(), self.byte()])
    }

    pub fn u64(&mut self) -> u64 {
        (u64::from(self.u32()) << 32) | u64::from(self.u32())
    }

    /// Up to `n` bytes.
    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.data.split_at(n.min(self.data.len()));
        self.data = rest;
        head
    }

    /// A length-prefixed piece (one byte of length).
    pub fn piece(&mut self) -> &'a [u8] {
        let n = self.byte() as usize;
        self.take(n)
    }

    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.data)
    }

    /// Cut points into a buffer of `len` bytes, one per byte of `spec`, each a step from the
    /// one before, so a fuzzer can grow and shrink them.
    pub fn cuts(spec: &[u8], len: usize) -> Vec<usize> {
        let mut at = 0;
        let mut out = Vec::new();
        for b in spec {
            at += *b as usize;
            if at > len {
                break;
            }
            out.push(at);
        }
        out
    }
}
