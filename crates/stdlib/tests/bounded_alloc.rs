//! Decoding untrusted text with `pmnc.csv.decode` never costs far more memory than the text
//! itself: measured with a counting allocator (issue 24; the first input is the one the fuzzer found,
//! kept in its corpus).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use rustomnic_alloc_count::{asked, budget};

rustomnic_alloc_count::install!();

#[test]
fn csv_decode_is_bounded() {
    let found = include_bytes!("../../../fuzz/corpus/stdlib_csv/amplification-many-short-records");
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
