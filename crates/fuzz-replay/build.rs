//! Turns each fuzz target under fuzz/fuzz_targets into a module with a plain `fuzz_one(&[u8])`
//! function (the `#![no_main]` line and libFuzzer's import dropped, `fuzz_target!` defined by
//! tests/corpus.rs) and a #[test] that replays the target's kept corpus through it.

use std::fmt::Write as _;
use std::path::Path;

fn main() {
    let targets_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/fuzz_targets");
    println!("cargo:rerun-if-changed={}", targets_dir.display());
    let mut names: Vec<String> = Vec::new();
    let entries = std::fs::read_dir(&targets_dir).unwrap_or_else(|e| panic!("cannot list {}: {e}", targets_dir.display()));
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "rs") {
            if let Some(stem) = path.file_stem().and_then(|s| s.to_str()) {
                names.push(stem.to_string());
            }
        }
    }
    names.sort();
    let mut out = String::new();
    for name in &names {
        let path = targets_dir.join(format!("{name}.rs"));
        println!("cargo:rerun-if-changed={}", path.display());
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        let body: String =
            text.lines().filter(|l| l.trim() != "#![no_main]" && l.trim() != "use libfuzzer_sys::fuzz_target;").map(|l| format!("{l}\n")).collect();
        let _ = writeln!(out, "pub mod {name} {{\n{body}\n}}");
        let _ = writeln!(out, "#[test]\nfn {name}_corpus() {{ replay({name:?}, {name}::fuzz_one) }}");
    }
    let _ = writeln!(out, "pub const TARGETS: &[&str] = &{names:?};");
    let dest = Path::new(&std::env::var("OUT_DIR").unwrap_or_else(|e| panic!("OUT_DIR: {e}"))).join("targets.rs");
    std::fs::write(&dest, out).unwrap_or_else(|e| panic!("cannot write {}: {e}", dest.display()));
}
