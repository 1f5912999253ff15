//! `pmnc.events` through the real `pmnc` binary: a publish reaches waiters on every worker
//! thread, waits time out with nil, a wait never outlives the request's deadline (504), and the
//! limits give clear errors.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::*;

const HTTP_LUA: &str = r#"local M = {}

function M.handle(request, response)
  local q = request.query
  if request.path == "/wait" then
    local v = pmnc.events.wait(q.topic, tonumber(q.timeout))
    if v == nil then
      response.status = 204
      return ""
    end
    return { value = v }
  elseif request.path == "/publish" then
    return { woken = pmnc.events.publish(q.topic, { text = q.text, n = tonumber(q.n) }) }
  elseif request.path == "/stats" then
    local s = pmnc.events.stats(q.topic)
    return tostring(s.topic_waiters)
  elseif request.path == "/bad" then
    local ok, err = pcall(pmnc.events.publish, string.rep("x", 300), 1)
    local ok2, err2 = pcall(pmnc.events.wait, 42, 1)
    return tostring(ok) .. " " .. tostring(err) .. " | " .. tostring(ok2) .. " " .. tostring(err2)
  end
  response.status = 404
  return "no such path"
end

return M
"#;

fn start(workers: usize) -> (Tree, Server) {
    let (tree, server, _) = start_http_cage("[interfaces.http]\nlisten = \"127.0.0.1:0\"\nrequest_timeout = \"1500ms\"\n", HTTP_LUA, workers);
    (tree, server)
}

#[test]
fn publish_reaches_waiters_on_every_worker() {
    let (_tree, server) = start(3);
    let addr = server.addr("http");
    // Each waiter on its own connection: the acceptor hands them round robin to the workers.
    let waiters: Vec<_> = (0..6).map(|_| std::thread::spawn(move || get(addr, "/wait?topic=room&timeout=10"))).collect();
    get_until(addr, "/stats?topic=room", "6", Duration::from_secs(10));
    let r = get(addr, "/publish?topic=room&text=hello&n=3");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), r#"{"woken":6}"#);
    for w in waiters {
        let r = w.join().unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["value"]["text"], "hello");
        assert_eq!(v["value"]["n"], 3);
    }
    // Nobody waits any more: a publish now reaches no one and is not kept for later.
    assert_eq!(get(addr, "/stats?topic=room").text(), "0");
    assert_eq!(get(addr, "/publish?topic=room&text=late").text(), r#"{"woken":0}"#);
    let started = Instant::now();
    assert_eq!(get(addr, "/wait?topic=room&timeout=0.2").status, 204, "a publish made before the wait must not be queued for it");
    assert!(started.elapsed() < Duration::from_secs(1));
}

#[test]
fn timeouts_and_deadlines() {
    let (_tree, mut server) = start(2);
    let addr = server.addr("http");
    let started = Instant::now();
    let r = get(addr, "/wait?topic=quiet&timeout=0.3");
    let took = started.elapsed();
    assert_eq!(r.status, 204);
    assert!(took >= Duration::from_millis(290) && took < Duration::from_millis(1400), "timed out after {took:?}");

    // A wait longer than the request's 1.5 s deadline ends with the deadline.
    let started = Instant::now();
    let r = get(addr, "/wait?topic=quiet&timeout=100");
    let took = started.elapsed();
    assert_eq!(r.status, 504, "{}", r.text());
    assert!(took >= Duration::from_millis(1400) && took < Duration::from_secs(4), "ended after {took:?}");
    assert!(server.wait_for("deadline exceeded", Duration::from_secs(5)).is_some());
    // The ended wait left the topic.
    get_until(addr, "/stats?topic=quiet", "0", Duration::from_secs(5));
}

#[test]
fn bad_topics_are_clear_errors() {
    let (_tree, server) = start(1);
    let addr = server.addr("http");
    let r = get(addr, "/bad");
    assert_eq!(r.status, 200);
    let text = r.text();
    assert!(text.contains("false") && text.contains("topic of 300 bytes is longer than the limit of 256"), "{text}");
    assert!(text.contains("the topic must be a string, got integer"), "{text}");
}
