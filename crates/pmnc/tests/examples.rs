//! The examples stay runnable: `pmnc check` and `pmnc test` pass on each, and hello answers the
//! requests its README shows (served on a free port from a copy of the example).

mod common;

use std::path::{Path, PathBuf};

use common::*;

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples").join(name)
}

#[test]
fn every_example_checks_and_its_tests_pass() {
    for name in ["hello", "two-cages"] {
        let path = example(name).display().to_string();
        let out = pmnc(&["check", &path]);
        assert_eq!(out.code, Some(0), "{name}: {}", out.stderr);
        let out = pmnc(&["test", &path]);
        assert_eq!(out.code, Some(0), "{name}: {}{}", out.stdout, out.stderr);
        assert!(out.stdout.lines().last().is_some_and(|l| l.ends_with(" passed, 0 failed") && !l.starts_with("0 ")), "{name}: {}", out.stdout);
    }
}

#[test]
fn hello_answers_as_its_readme_says() {
    let t = Tree::new();
    for file in ["cage.toml", "http.lua", "util.lua"] {
        let text = std::fs::read_to_string(example("hello").join(file)).unwrap().replace("127.0.0.1:8080", "127.0.0.1:0");
        t.write(&format!("hello/{file}"), &text);
    }
    let s = Server::start(&t.path().join("hello"), &[]);
    let addr = s.addr("http");
    assert_eq!(get(addr, "/").text(), "Hello, world!");
    assert_eq!(json_body(&get(addr, "/double?n=5")), serde_json::json!({"doubled": 10, "n": 5}));
    assert_eq!(json_body(&get(addr, "/visits")), serde_json::json!({"visits": 1}));
    assert_eq!(json_body(&get(addr, "/visits")), serde_json::json!({"visits": 2}));
    assert_eq!(get(addr, "/nope").status, 404);
}
