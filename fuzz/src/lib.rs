//! What the fuzz targets share: an allocator that counts what each decode asks for (so a
//! target can assert that no input costs far more memory than its size), and a reader that
//! turns fuzz bytes into structured choices.

pub use rustomnic_alloc_count::{asked, budget, Counting};

rustomnic_alloc_count::install!();

/// Asserts that `f`, decoding `len` bytes, stays within [`budget`].
pub fn bounded<T>(what: &str, len: usize, f: impl FnOnce() -> T) -> T {
    let (n, out) = asked(f);
    assert!(n <= budget(len), "{what}: asked for {n} bytes decoding {len} (budget {})", budget(len));
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
