//! The chat example (examples/chat) through the real `pmnc` binary: its HTTP API (send, the
//! long-poll, the WebSocket, rooms kept apart), and the page driven in headless Chromium over
//! the DevTools protocol: a message typed in one page appears in another, with either transport.
//! The browser test is skipped, loudly, when Chromium is not installed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use tungstenite::{Message, WebSocket};

fn start_chat(workers: usize) -> (Tree, Server, SocketAddr) {
    let tree = Tree::new();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/chat");
    for file in ["cage.toml", "http.lua", "page.lua", "http_test.lua"] {
        let text = std::fs::read_to_string(dir.join(file)).unwrap().replace("127.0.0.1:8081", "127.0.0.1:0");
        tree.write(&format!("chat/{file}"), &text);
    }
    let server = Server::start_with_workers(&tree.path().join("chat"), workers, &[]);
    let addr = server.addr("http");
    (tree, server, addr)
}

fn waiting(addr: SocketAddr, room: &str) -> i64 {
    let r = get(addr, &format!("/stats?room={room}"));
    serde_json::from_slice::<Value>(&r.body).ok().and_then(|v| v["waiting"].as_i64()).unwrap_or(-1)
}

fn wait_waiting(addr: SocketAddr, room: &str, n: i64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while waiting(addr, room) < n {
        assert!(Instant::now() < deadline, "room {room}: never {n} waiting (now {})", waiting(addr, room));
        std::thread::sleep(Duration::from_millis(25));
    }
}

#[test]
fn chat_example_checks_and_passes_its_tests() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/chat");
    let dir = dir.to_str().unwrap();
    let out = pmnc_limited(&["check", dir], Duration::from_secs(60));
    assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);
    let out = pmnc_limited(&["test", dir], Duration::from_secs(60));
    assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("1 passed, 0 failed"), "{}", out.stdout);
}

#[test]
fn chat_api_long_poll_websocket_and_rooms() {
    let (_tree, _server, addr) = start_chat(2);
    let page = get(addr, "/");
    assert_eq!(page.status, 200);
    assert_eq!(page.header("content-type"), Some("text/html; charset=utf-8"));
    assert!(page.text().contains("<!doctype html>"));

    // A long-poll in room a, a WebSocket in room a, a long-poll in room b.
    let poller = std::thread::spawn(move || get(addr, "/wait?room=a&timeout=20"));
    let other_room = std::thread::spawn(move || get(addr, "/wait?room=b&timeout=2"));
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let (mut ws, _) = tungstenite::client(format!("ws://{addr}/ws?room=a"), stream).unwrap();
    // The session subscribes on its first receive, the poller parks: two waiting in room a.
    wait_waiting(addr, "a", 2);

    let r = post(addr, "/send?room=a", "application/json", br#"{"name":"ann","text":"hello"}"#);
    assert_eq!(r.status, 200, "{}", r.text());
    let r = poller.join().unwrap();
    assert_eq!(r.status, 200);
    let m: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!((m["name"].as_str(), m["text"].as_str()), (Some("ann"), Some("hello")));
    // The session's own message goes to the room too, and comes back to it.
    ws.send(Message::text(r#"{"name":"w","text":"mine"}"#)).unwrap();
    let mut texts = Vec::new();
    while texts.len() < 2 {
        if let Message::Text(t) = ws.read().unwrap() {
            texts.push(serde_json::from_str::<Value>(&t).unwrap()["text"].as_str().unwrap().to_string());
        }
    }
    assert_eq!(texts, ["hello", "mine"], "the session sees the posted message and its own");
    assert_eq!(other_room.join().unwrap().status, 204, "room b heard nothing of room a");

    let r = post(addr, "/send?room=a", "application/json", b"not json");
    assert_eq!(r.status, 400);
    assert_eq!(get(addr, "/wait?room=bad%20room").status, 400);
}

// --- the browser test -------------------------------------------------------------------------

fn chromium() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    ["/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome"].iter().map(PathBuf::from).find(|p| p.exists())
}

/// A headless Chromium driven over the DevTools protocol (one WebSocket to the browser; pages
/// are attached targets addressed by session id).
struct Browser {
    child: Child,
    ws: WebSocket<TcpStream>,
    next: u64,
    _profile: tempfile::TempDir,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Browser {
    fn start(bin: &Path) -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let mut child = Command::new(bin)
            .args(["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run", "--remote-debugging-port=0"])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(at) = line.find("ws://") {
                    let _ = tx.send(line[at..].trim().to_string());
                }
            }
        });
        let url = rx.recv_timeout(Duration::from_secs(30)).expect("Chromium printed its DevTools address");
        let hostport = url.trim_start_matches("ws://").split('/').next().unwrap().to_string();
        let stream = TcpStream::connect(&hostport).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let (ws, _) = tungstenite::client(url.as_str(), stream).expect("DevTools WebSocket");
        Browser { child, ws, next: 0, _profile: profile }
    }

    /// Sends a command (to a page when `session` is set) and returns its result.
    fn call(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        self.next += 1;
        let id = self.next;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        self.ws.send(Message::text(msg.to_string())).unwrap();
        loop {
            let m = self.ws.read().unwrap_or_else(|e| panic!("DevTools {method}: {e}"));
            let Message::Text(t) = m else { continue };
            let v: Value = serde_json::from_str(&t).unwrap();
            if v["id"] == json!(id) {
                if let Some(e) = v.get("error") {
                    panic!("DevTools {method}: {e}");
                }
                return v["result"].clone();
            }
        }
    }

    fn open(&mut self, url: &str) -> String {
        let target = self.call(None, "Target.createTarget", json!({ "url": url }));
        let id = target["targetId"].as_str().unwrap().to_string();
        let attached = self.call(None, "Target.attachToTarget", json!({ "targetId": id, "flatten": true }));
        attached["sessionId"].as_str().unwrap().to_string()
    }

    fn eval(&mut self, session: &str, js: &str) -> Value {
        let r = self.call(Some(session), "Runtime.evaluate", json!({ "expression": js, "returnByValue": true, "awaitPromise": true }));
        r["result"]["value"].clone()
    }

    fn eval_until(&mut self, session: &str, js: &str, want: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let v = self.eval(session, js);
            if v.as_str().is_some_and(|s| s.contains(want)) {
                return;
            }
            assert!(Instant::now() < deadline, "{js} never contained {want:?} (last {v})");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn decode_base64(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for v in text.bytes().filter_map(value) {
        acc = (acc << 6) | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

#[test]
fn two_browser_pages_chat() {
    let Some(bin) = chromium() else {
        eprintln!("SKIPPED two_browser_pages_chat: Chromium is not installed (apt-get install -y chromium, or set CHROMIUM=/path/to/chrome)");
        return;
    };
    let (_tree, _server, addr) = start_chat(2);
    let mut browser = Browser::start(&bin);
    for (transport, room) in [("long-poll", "lp"), ("ws", "wsroom")] {
        let url = format!("http://{addr}/?room={room}&transport={transport}");
        let alice = browser.open(&url);
        let bob = browser.open(&url);
        // Both pages are connected: their long-polls parked, or their sessions subscribed.
        let ready = if transport == "ws" { "connected" } else { "waiting" };
        browser.eval_until(&alice, "document.getElementById('status').textContent", ready);
        browser.eval_until(&bob, "document.getElementById('status').textContent", ready);
        if transport == "ws" {
            // Chromium offers permessage-deflate with client_max_window_bits; the session takes it
            // (its messages to us come compressed, with the context it keeps).
            browser.eval_until(&alice, "socket.extensions", "permessage-deflate; server_no_context_takeover; client_max_window_bits=9");
            // A session subscribes when its handler first waits; a message from bob shows both are.
            browser.eval(
                &bob,
                "document.getElementById('name').value = 'bob'; document.getElementById('text').value = 'bob here'; document.getElementById('send').click(); 1",
            );
            browser.eval_until(&alice, "document.getElementById('log').textContent", "bob here");
        }
        wait_waiting(addr, room, 2);
        // Long enough that our broadcast of it goes out compressed over the WebSocket.
        let text = format!("hello over {transport}, {}", "and once more ".repeat(8));
        browser.eval(&alice, "document.getElementById('name').value = 'alice'; document.getElementById('text').focus(); 1");
        browser.call(Some(&alice), "Input.insertText", json!({ "text": text }));
        browser.eval(&alice, "document.getElementById('send').click(); 1");
        browser.eval_until(&bob, "document.getElementById('log').textContent", &format!("alice{text}"));
        if transport == "ws" {
            browser.eval_until(&alice, "document.getElementById('log').textContent", &text);
        }
        let shot = browser.call(Some(&bob), "Page.captureScreenshot", json!({ "format": "png" }));
        let png = decode_base64(shot["data"].as_str().unwrap());
        assert_eq!(&png[..4], b"\x89PNG");
        let dir = PathBuf::from(option_env!("CARGO_TARGET_TMPDIR").unwrap_or("/tmp"));
        let path = dir.join(format!("chat-{transport}.png"));
        std::fs::write(&path, &png).unwrap();
        eprintln!("screenshot: {}", path.display());
    }
}
