//! FNV-1a, a fast hash without a random seed, for maps whose keys this process or its
//! configuration makes (route segments, request ids, cage and interface names), never keys a
//! client chooses: those need the standard library's seeded hasher.

/// The hasher; see the module docs for where it may be used.
#[derive(Default, Clone, Copy)]
pub struct Fnv(u64);

/// For `HashMap::with_hasher` and `HashMap<K, V, FnvBuild>`.
pub type FnvBuild = std::hash::BuildHasherDefault<Fnv>;

impl std::hash::Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut h = if self.0 == 0 { 0xcbf2_9ce4_8422_2325 } else { self.0 };
        for &b in bytes {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        self.0 = h;
    }
}

#[cfg(test)]
mod tests {
    use std::hash::Hasher;

    #[test]
    fn known_values_of_fnv1a() {
        // The published FNV-1a 64-bit values of "" and "a" (the empty input leaves the offset basis).
        let hash = |b: &[u8]| {
            let mut h = super::Fnv::default();
            h.write(b);
            h.finish()
        };
        assert_eq!(hash(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(hash(b"foobar"), 0x8594_4171_f739_67e8);
        assert_ne!(hash(b"ab"), hash(b"ba"));
    }
}
