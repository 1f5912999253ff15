//! Every fuzz target over its kept corpus (fuzz/corpus/<target>), as ordinary tests: a kept
//! input that now crashes a target, breaks the property it asserts or makes a decoder ask for
//! far more memory than its size fails `cargo test`. Fuzzing itself (new inputs, sanitizers,
//! timeouts) is bench/fuzz.sh's work (docs/decisions/147).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

/// What `fuzz_target!` means here: the closure becomes the module's `fuzz_one` function.
macro_rules! fuzz_target {
    (|$data:ident: &[u8]| $body:block) => {
        pub fn fuzz_one($data: &[u8]) $body
    };
}

include!(concat!(env!("OUT_DIR"), "/targets.rs"));

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

/// Runs every file of the target's corpus; fails naming each input that panicked.
fn replay(target: &str, run: fn(&[u8])) {
    let dir = fuzz_dir().join("corpus").join(target);
    let mut inputs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("fuzz target {target} has no kept corpus at {}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    inputs.sort();
    assert!(!inputs.is_empty(), "fuzz target {target}: {} is empty", dir.display());
    let mut failed = Vec::new();
    for input in &inputs {
        let data = std::fs::read(input).unwrap();
        if catch_unwind(AssertUnwindSafe(|| run(&data))).is_err() {
            failed.push(input.display().to_string());
        }
    }
    assert!(
        failed.is_empty(),
        "fuzz target {target}: {} of {} kept inputs failed (run `bench/fuzz.sh 10s {target}` or `cargo +nightly fuzz run {target} FILE` in fuzz/ to see one):\n{}",
        failed.len(),
        inputs.len(),
        failed.join("\n")
    );
}

/// Every target under fuzz/fuzz_targets is replayed here, and every kept corpus belongs to one.
#[test]
fn every_corpus_has_its_target() {
    let corpus = fuzz_dir().join("corpus");
    for entry in std::fs::read_dir(&corpus).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        assert!(TARGETS.contains(&name.as_str()), "fuzz/corpus/{name} has no target in fuzz/fuzz_targets");
    }
    assert!(TARGETS.len() >= 30, "only {} fuzz targets found", TARGETS.len());
}
