//! `pmnc.compress.gunzip`/`inflate`/`unzstd` input, the format and `max_size` chosen by the
//! first two bytes. Properties: output never passes max_size; allocation stays within a few times
//! max_size plus the decoders' fixed state whatever the input announces (no bomb); what
//! decompresses compresses and decompresses back to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rustomnic_fuzz::asked;
use rustomnic_stdlib::compress::{bounded_gunzip, bounded_inflate, bounded_unzstd, deflate, gzip, zstd};

fuzz_target!(|data: &[u8]| {
    let [kind, size, rest @ ..] = data else { return };
    let max = (*size as usize) << 8;
    let (n, out) = asked(|| match kind % 3 {
        0 => bounded_gunzip(rest, max),
        1 => bounded_inflate(rest, max),
        _ => bounded_unzstd(rest, max),
    });
    // Output, its doubling Vec, the read chunk, and the decoder state (zstd's is the largest:
    // its contexts and a window of at most max_size, rounded up to a power of two).
    let limit = 4 * max as u64 + (4 << 20) + 4 * rest.len() as u64;
    assert!(n <= limit, "asked for {n} bytes for max_size {max} (limit {limit})");
    let Ok(out) = out else { return };
    assert!(out.len() <= max);
    let back = match kind % 3 {
        0 => bounded_gunzip(&gzip(&out, 6).unwrap(), max),
        1 => bounded_inflate(&deflate(&out, 6).unwrap(), max),
        _ => bounded_unzstd(&zstd(&out, 3).unwrap(), max),
    };
    assert_eq!(back.unwrap(), out);
});
