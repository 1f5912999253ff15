//! Server-sent events through the real `pmnc` binary: `response.stream` framing, resuming with
//! Last-Event-ID, the stream ending when the handler returns, and a client that disconnects
//! making the next send fail so the handler ends.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;

const HTTP_LUA: &str = r#"local M = {}

function M.handle(request, response)
  if request.path == "/ticks" then
    response.headers["x-kind"] = "ticks"
    local stream = response.stream("text/event-stream")
    local last = tonumber(request.headers["last-event-id"] or "0")
    stream.event{ comment = "resuming after " .. last, retry = 1500 }
    for i = last + 1, last + 3 do
      stream.event{ id = i, event = "tick", data = "line one\nline " .. i }
    end
    stream.event{ data = { done = true } }
    return
  elseif request.path == "/follow" then
    local stream = response.stream()
    stream.event{ event = "ready", data = "ok" }
    while true do
      local v = pmnc.events.wait("feed", 10)
      if v == nil then return end
      local ok, err = pcall(stream.event, { data = v })
      if not ok then
        pmnc.log.info("follower ended: " .. tostring(err))
        return
      end
    end
  elseif request.path == "/twice" then
    response.stream("text/plain")
    local ok, err = pcall(response.stream, "text/plain")
    pmnc.log.info("second stream: " .. tostring(err))
    return
  elseif request.path == "/publish" then
    return tostring(pmnc.events.publish("feed", "item"))
  elseif request.path == "/live" then
    return tostring(pmnc.events.stats().live_requests)
  end
  response.status = 404
  return "no such path"
end

return M
"#;

fn start() -> (Tree, Server, SocketAddr) {
    start_http_cage("[interfaces.http]\nlisten = \"127.0.0.1:0\"\n", HTTP_LUA, 1)
}

/// The body of a chunked response, decoded.
fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(end) = raw.windows(2).position(|w| w == b"\r\n") else { return out };
        let size = usize::from_str_radix(std::str::from_utf8(&raw[..end]).unwrap().trim(), 16).expect("chunk size");
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&raw[end + 2..end + 2 + size]);
        raw = &raw[end + 2 + size + 2..];
    }
}

#[test]
fn event_stream_framing_and_last_event_id() {
    let (_tree, _server, addr) = start();
    let r = raw_request(addr, b"GET /ticks HTTP/1.1\r\nhost: t\r\nlast-event-id: 7\r\nconnection: close\r\n\r\n", Duration::from_secs(10)).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    assert_eq!(r.header("cache-control"), Some("no-cache"));
    assert_eq!(r.header("x-kind"), Some("ticks"));
    assert_eq!(r.header("transfer-encoding"), Some("chunked"));
    let body = String::from_utf8(dechunk(&r.body)).unwrap();
    assert_eq!(
        body,
        ": resuming after 7\nretry: 1500\n\n\
         id: 8\nevent: tick\ndata: line one\ndata: line 8\n\n\
         id: 9\nevent: tick\ndata: line one\ndata: line 9\n\n\
         id: 10\nevent: tick\ndata: line one\ndata: line 10\n\n\
         data: {\"done\":true}\n\n"
    );
}

#[test]
fn a_stream_can_start_once() {
    let (_tree, mut server, addr) = start();
    let r = get(addr, "/twice");
    assert_eq!(r.status, 200);
    let line = server.wait_for("second stream:", Duration::from_secs(5)).expect("the handler logged the second call");
    assert!(line.contains("response.stream: the response was already started"), "{line}");
}

#[test]
fn disconnected_client_ends_the_handler() {
    let (_tree, mut server, addr) = start();
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /follow HTTP/1.1\r\nhost: t\r\n\r\n").unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&seen).contains("event: ready\ndata: ok\n\n") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    // Pushed events arrive while the client is there.
    assert_eq!(get(addr, "/publish").text(), "1");
    seen.clear();
    while !String::from_utf8_lossy(&seen).contains("data: item\n\n") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0);
        seen.extend_from_slice(&buf[..n]);
    }
    drop(s);
    // Publish until a send notices the client has gone (the first write after a close may
    // still be accepted by the kernel).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        get(addr, "/publish");
        if server.wait_for_new("follower ended", Duration::from_millis(100)).is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "the handler never noticed the client had gone");
    }
    assert!(server.log.iter().any(|l| l.contains("follower ended") && l.contains("the client disconnected")), "{:?}", server.log);
    get_until(addr, "/live", "1", Duration::from_secs(5));
}
