//! The Lua-level tests of the pmnc API (tests/lua-api/*_test.lua) through `pmnc test`, on a copy
//! of the folder so that the state they write stays out of the source tree.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::*;

#[test]
fn the_lua_api_tests_pass() {
    let tree = Tree::new();
    let source = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/lua-api");
    let mut files = 0;
    for entry in std::fs::read_dir(&source).expect("tests/lua-api") {
        let path = entry.expect("entry").path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        if name.ends_with(".lua") || name == "cage.toml" {
            tree.write(&format!("lua-api/{name}"), &std::fs::read_to_string(&path).expect("read"));
            files += 1;
        }
    }
    assert!(files >= 2, "tests/lua-api has a cage.toml and test modules");
    let out = pmnc_limited(&["test", tree.path().join("lua-api").to_str().unwrap()], Duration::from_secs(60));
    assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);
    let summary = out.stdout.lines().last().unwrap_or_default().to_string();
    assert!(summary.ends_with("passed, 0 failed") && !summary.starts_with("0 passed"), "{}", out.stdout);
}
