//! Request deadlines through the real `pmnc` binary: what a handler sees of its deadline, and
//! that sleeping, spinning and catching errors all end at the deadline with a 504, without
//! holding up the other requests of the same worker thread.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;

const CAGE_TOML: &str = r#"request_timeout = "3s"

[interfaces.http]
listen = "127.0.0.1:0"
request_timeout = "1s"

[interfaces.long]
protocol = "http"
handler = "http.handle"
listen = "127.0.0.1:0"
request_timeout = "2s"

[interfaces.short]
protocol = "http"
handler = "http.handle"
listen = "127.0.0.1:0"
request_timeout = "700ms"

[interfaces.plain]
protocol = "http"
handler = "http.handle"
listen = "127.0.0.1:0"
"#;

const HTTP_LUA: &str = r#"local M = {}

function M.handle(request, response)
  local p = request.path
  local id = pmnc.request.id
  if p == "/remain" then
    return { remain = pmnc.request.remain(), deadline = pmnc.request.deadline, interface = pmnc.request.interface }
  elseif p == "/sleep" then
    pmnc.sleep(tonumber(request.query.s))
    return { slept = tonumber(request.query.s), remain = pmnc.request.remain() }
  elseif p == "/spin" then
    pmnc.log.info("spinning " .. id)
    while true do end
  elseif p == "/pcallspin" then
    local ok, e = pcall(function() while true do end end)
    pmnc.log.info("swallowed " .. id .. ": " .. tostring(e))
    return "swallowed"
  elseif p == "/pcallsleep" then
    local ok, e = pcall(pmnc.sleep, 30)
    pmnc.log.info("swallowed " .. id .. ": " .. tostring(e))
    return "swallowed"
  elseif p == "/pcallco" then
    local ok, e = pcall(coroutine.wrap(function() while true do end end))
    pmnc.log.info("swallowed " .. id .. ": " .. tostring(e))
    return "swallowed"
  elseif p == "/cospin" then
    pmnc.log.info("spinning " .. id)
    coroutine.wrap(function() while true do end end)()
  end
  return "fast " .. (request.query.i or "")
end

return M
"#;

fn deadline_server(workers: usize) -> (Tree, Server) {
    let tree = Tree::new();
    tree.write("c/cage.toml", CAGE_TOML);
    tree.write("c/http.lua", HTTP_LUA);
    let server = Server::start_with_workers(&tree.path().join("c"), workers, &[]);
    (tree, server)
}

fn now_unix() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

/// GET `path`, with how long it took.
fn timed_get(addr: std::net::SocketAddr, path: &str) -> (Response, Duration) {
    let started = Instant::now();
    let r = get(addr, path);
    (r, started.elapsed())
}

/// Asserts a 504 whose body names the request id of its x-request-id header.
fn assert_timeout_response(r: &Response, what: &str) {
    assert_eq!(r.status, 504, "{what}: {}", r.text());
    let id = request_id(r);
    assert!(r.text().contains(&id), "{what}: the 504 body names the request id {id}: {:?}", r.text());
    assert!(!r.text().contains("swallowed"), "{what}: {:?}", r.text());
}

#[test]
fn remain_and_deadline_follow_the_interface_timeout() {
    let (_tree, server) = deadline_server(2);
    // Interfaces with their own request_timeout, and one that takes the cage's.
    for (iface, timeout) in [("http", 1.0), ("long", 2.0), ("short", 0.7), ("plain", 3.0)] {
        let before = now_unix();
        let r = get(server.addr(iface), "/remain");
        assert_eq!(r.status, 200, "{iface}: {}", r.text());
        let j = json_body(&r);
        assert_eq!(j["interface"], iface);
        let remain = j["remain"].as_f64().expect("remain is a number");
        println!("{iface}: request_timeout {timeout}s, remain {remain:.4}s");
        assert!(remain <= timeout && remain > timeout - 0.3, "{iface}: remain {remain} for request_timeout {timeout}s");
        let deadline = j["deadline"].as_f64().expect("deadline is a number");
        assert!(
            deadline >= before + timeout - 0.3 && deadline <= now_unix() + timeout + 0.05,
            "{iface}: deadline {deadline} is not about now + {timeout}s (now {before})"
        );
    }
}

#[test]
fn sleeping_past_the_deadline_ends_at_the_deadline() {
    let (_tree, mut server) = deadline_server(2);
    let addr = server.addr("http");

    // A sleep within the deadline returns normally and uses up its time.
    let (r, took) = timed_get(addr, "/sleep?s=0.3");
    assert_eq!(r.status, 200, "{}", r.text());
    let remain = json_body(&r)["remain"].as_f64().unwrap();
    assert!(took >= Duration::from_millis(300), "slept 0.3s in {took:?}");
    assert!(remain < 0.75 && remain > 0.3, "remain after sleeping 0.3s of 1s: {remain}");

    // A sleep of 5s under a 1s deadline: 504 at the deadline, not after the sleep.
    let (r, took) = timed_get(addr, "/sleep?s=5");
    println!("sleep(5) under a 1s deadline answered after {took:?}");
    assert_timeout_response(&r, "sleep(5)");
    assert!(took >= Duration::from_millis(950), "answered before the deadline: {took:?}");
    assert!(took < Duration::from_millis(2000), "not answered at the deadline: {took:?}");
    let id = request_id(&r);
    assert!(server.wait_for_all(&[&id, "deadline exceeded"], Duration::from_secs(5)).is_some(), "no log line for {id}");
}

/// Starts GET `path` on a thread; the receiver gets the response and when it arrived.
fn background_get(addr: std::net::SocketAddr, path: &'static str) -> mpsc::Receiver<(Response, Instant)> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let r = get(addr, path);
        let _ = tx.send((r, Instant::now()));
    });
    rx
}

#[test]
fn spinning_handler_is_stopped_at_its_deadline_while_others_keep_being_served() {
    // One worker thread: the spinner and the fast requests share one thread and one Lua VM.
    let (_tree, mut server) = deadline_server(1);
    let spin_addr = server.addr("long");
    let fast_addr = server.addr("http");
    let spinner = background_get(spin_addr, "/spin");
    let started = Instant::now();
    server.wait_for("spinning ", Duration::from_secs(5)).expect("the spinner started");
    let mut latencies = Vec::new();
    for i in 0..10 {
        let (r, took) = timed_get(fast_addr, &format!("/fast?i={i}"));
        assert_eq!(r.status, 200);
        assert_eq!(r.text(), format!("fast {i}"));
        latencies.push(took);
    }
    let fast_done = Instant::now();
    println!("fast requests while a handler spins: {latencies:?}");
    for (i, l) in latencies.iter().enumerate() {
        assert!(*l < Duration::from_millis(400), "fast request {i} took {l:?} while a handler spun (all: {latencies:?})");
    }
    // Time slices are 1ms: a typical request must not wait for dozens of them (the worker polls
    // its sockets between slices, not once per run queue pass).
    let mut sorted = latencies.clone();
    sorted.sort();
    let median = sorted[sorted.len() / 2];
    assert!(median < Duration::from_millis(60), "median latency {median:?} while a handler spun (all: {latencies:?})");
    assert!(spinner.try_recv().is_err(), "the spinner ended before the fast requests did, so they did not overlap");

    let (r, at) = spinner.recv_timeout(Duration::from_secs(10)).expect("the spinner is answered");
    let took = at.duration_since(started);
    println!("spinner (request_timeout 2s) answered after {took:?}");
    assert!(at > fast_done);
    assert_timeout_response(&r, "spinner");
    assert!(took >= Duration::from_millis(1900) && took < Duration::from_millis(3000), "spinner answered after {took:?}");
}

#[test]
fn pcall_cannot_swallow_the_deadline() {
    let (_tree, mut server) = deadline_server(2);
    let addr = server.addr("short");
    // A spin in the request itself, a sleep, and a spin in a coroutine the handler made.
    for path in ["/pcallspin", "/pcallsleep", "/pcallco"] {
        let (r, took) = timed_get(addr, path);
        println!("{path}: {} after {took:?}", r.status);
        assert_timeout_response(&r, path);
        assert!(took >= Duration::from_millis(650) && took < Duration::from_millis(2000), "{path}: answered after {took:?}");
        let id = request_id(&r);
        assert!(server.wait_for_all(&[&id, "deadline exceeded"], Duration::from_secs(5)).is_some(), "{path}: no deadline log for {id}");
    }
}

#[test]
fn a_body_that_never_arrives_is_bounded_by_the_deadline() {
    let (_tree, server) = deadline_server(2);
    let addr = server.addr("short");
    let started = Instant::now();
    let r = raw_request(addr, b"POST /fast HTTP/1.1\r\nHost: test\r\nContent-Length: 100\r\n\r\nonly ten b", Duration::from_secs(10))
        .expect("an answer when the body stops coming");
    let took = started.elapsed();
    println!("unfinished body answered {} after {took:?}", r.status);
    assert_eq!(r.status, 408, "{}", r.text());
    assert!(r.text().contains(&request_id(&r)));
    assert!(took >= Duration::from_millis(650) && took < Duration::from_millis(2000), "answered after {took:?}");
}

/// A spin inside a coroutine that the handler created is not time-sliced: the hook only yields
/// the request's own coroutine (crates/lua/src/vm.rs, install_hook), so the worker thread is
/// held until the deadline.
#[test]
fn spinning_inside_a_coroutine_does_not_starve_the_worker() {
    let (_tree, mut server) = deadline_server(1);
    let spinner = background_get(server.addr("long"), "/cospin");
    server.wait_for("spinning ", Duration::from_secs(5)).expect("the spinner started");
    let (r, took) = timed_get(server.addr("http"), "/fast?i=1");
    println!("fast request while a coroutine spins: {took:?}");
    assert_eq!(r.status, 200);
    assert!(took < Duration::from_millis(400), "fast request took {took:?} while a coroutine spun");
    let (r, _) = spinner.recv_timeout(Duration::from_secs(10)).expect("the spinner is answered");
    assert_timeout_response(&r, "coroutine spinner");
}
