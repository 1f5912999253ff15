//! The LuaLS annotations that `pmnc new` writes (crates/pmnc/src/scaffold/luals/pmnc.lua) and the
//! Lua API reference (docs/lua-api.md) name the same functions.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;

fn repo_file(rel: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `pmnc.a.b` names in `text` (lower-case parts only: `pmnc.MODULE.FUNCTION` is a pattern).
fn pmnc_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("pmnc.") {
        let start = i + at;
        let before_ok = start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_' || bytes[start - 1] == b'.');
        let mut end = start + 4;
        while end < bytes.len() && (bytes[end] == b'.' || bytes[end].is_ascii_lowercase() || bytes[end] == b'_' || bytes[end].is_ascii_digit()) {
            end += 1;
        }
        let name = text[start..end].trim_end_matches('.');
        if before_ok && name.len() > 5 && !text[end..].starts_with(|c: char| c.is_ascii_uppercase()) {
            names.insert(name.to_string());
        }
        i = end;
    }
    names
}

#[test]
fn every_documented_function_is_annotated_and_the_reverse() {
    let docs = repo_file("docs/lua-api.md");
    let annotations = repo_file("crates/pmnc/src/scaffold/luals/pmnc.lua");
    // What the reference documents: the names in its section headings.
    let headings: String = docs.lines().filter(|l| l.starts_with("## ") || l.starts_with("### ")).collect::<Vec<_>>().join("\n");
    let documented = pmnc_names(&headings);
    // What the annotations define: functions and tables assigned, and fields of the pmnc class.
    let mut annotated = BTreeSet::new();
    for line in annotations.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("function pmnc.") {
            annotated.insert(format!("pmnc.{}", rest.split('(').next().unwrap_or("")));
        } else if line.starts_with("pmnc.") && line.contains(" = ") {
            annotated.insert(line.split(" = ").next().unwrap_or("").to_string());
        }
    }
    let in_class = |field: &str| annotations.contains(&format!("---@field {field} "));
    let missing: Vec<&String> = documented.iter().filter(|n| !annotated.contains(*n) && !in_class(&n[5..])).collect();
    assert!(missing.is_empty(), "documented in docs/lua-api.md but not annotated: {missing:?}");
    let undocumented: Vec<&String> = annotated.iter().filter(|n| !docs.contains(n.as_str())).collect();
    assert!(undocumented.is_empty(), "annotated but not in docs/lua-api.md: {undocumented:?}");
    assert!(docs.contains("### require") && annotations.contains("function require(name)"), "require is in both");
    // The annotation file is Lua an editor can read.
    rustomnic_lua::module::compile_text(annotations.as_bytes(), "luals/pmnc.lua").unwrap();
}
