//! The examples stay runnable: `pmnc check` and `pmnc test` pass on each, and hello answers the
//! requests its README shows (served on a free port from a copy of the example).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};

use common::*;

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples").join(name)
}

#[test]
fn every_example_checks_and_its_tests_pass() {
    for name in ["hello", "two-cages", "webhook", "celery/billing"] {
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

/// The webhook example verifies the signature of a body: a correct one gets a receipt (a v7
/// UUID and an RFC 3339 time), a wrong one 401, a valid signature over a bad event 422.
#[test]
fn webhook_verifies_signatures() {
    let t = Tree::new();
    let root = example("webhook");
    for file in ["cage.toml", "http.lua", "lua_modules/share/lua/5.4/fieldcheck.lua"] {
        let text = std::fs::read_to_string(root.join(file)).unwrap().replace("127.0.0.1:8080", "127.0.0.1:0");
        t.write(&format!("webhook/{file}"), &text);
    }
    let s = Server::try_start_env(&t.path().join("webhook"), 1, &[], &[("WEBHOOK_SECRET", "s3cret")]).unwrap();
    let addr = s.addr("http");
    let signed = |body: &str, sig: &str| {
        let req = format!("POST /hook HTTP/1.1\r\nhost: t\r\nconnection: close\r\nx-signature: {sig}\r\ncontent-length: {}\r\n\r\n{body}", body.len());
        raw_request(addr, req.as_bytes(), std::time::Duration::from_secs(30)).unwrap()
    };
    let body = r#"{"id":"evt_1","type":"payment","amount":12.5}"#;
    // HMAC-SHA256("s3cret", body), computed with `openssl dgst -sha256 -hmac s3cret`.
    let good = "sha256=5fa6528f37167517b20e2b0d55684c55eb414fad706e3c833bcf1e74e2ba9112";
    let r = signed(body, good);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = json_body(&r);
    assert_eq!(v["received"], "evt_1");
    let receipt = v["receipt"].as_str().unwrap();
    assert_eq!(receipt.len(), 36);
    assert_eq!(&receipt[14..15], "7", "{receipt}");
    let at = v["at"].as_str().unwrap();
    assert!(at.len() >= 20 && at.ends_with('Z') && &at[10..11] == "T", "{at}");
    let r = signed(body, "sha256=0000");
    assert_eq!(r.status, 401);
    assert_eq!(json_body(&r)["error"], "bad signature");
    let tampered = body.replace("12.5", "1250");
    assert_eq!(signed(&tampered, good).status, 401);
    let r = signed(r#"{"id":"evt_2","type":"payment"}"#, "sha256=0d4b8ad7b310e45a4705c86bff90d84c82ae894a80224691cd2f9dbb72cbe0fa");
    assert_eq!(r.status, 422);
    assert_eq!(json_body(&r)["error"], "field amount: want number, got nil");
}
