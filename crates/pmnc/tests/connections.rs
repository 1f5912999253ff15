//! Connection limits of the HTTP interface through the real `pmnc` binary: max_connections
//! refuses clearly and recovers, idle connections are closed after idle_timeout (but not while
//! a request is parked on them), and a client that does not read is dropped after write_timeout
//! without stalling the other requests of its worker; a long-poll client that goes away ends
//! its handler at once.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;

const HTTP_LUA: &str = r#"local M = {}

function M.handle(request, response)
  if request.path == "/wait" then
    return pmnc.events.wait("never", tonumber(request.query.timeout) or 30) or "timeout"
  elseif request.path == "/stats" then
    local s = pmnc.events.stats("never")
    return { waiting = s.topic_waiters, live = s.live_requests }
  elseif request.path == "/flood" then
    local stream = response.stream("application/octet-stream")
    local chunk = string.rep("x", 65536)
    local sent = 0
    while true do
      local ok, err = pcall(stream.send, chunk)
      if not ok then
        pmnc.log.info("flood ended after " .. sent .. " chunks: " .. tostring(err))
        return
      end
      sent = sent + 1
    end
  end
  return "ok"
end

return M
"#;

fn start(extra: &str) -> (Tree, Server, SocketAddr) {
    let tree = Tree::new();
    tree.write("c/cage.toml", &format!("[interfaces.http]\nlisten = \"127.0.0.1:0\"\nrequest_timeout = \"20s\"\n{extra}"));
    tree.write("c/http.lua", HTTP_LUA);
    let server = Server::start_with_workers(&tree.path().join("c"), 1, &[]);
    let addr = server.addr("http");
    (tree, server, addr)
}

fn park(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /wait HTTP/1.1\r\nhost: t\r\n\r\n").unwrap();
    s
}

#[test]
fn max_connections_refuses_then_recovers() {
    let (_tree, mut server, addr) = start("max_connections = 3\n");
    let parked: Vec<TcpStream> = (0..3).map(|_| park(addr)).collect();
    // The third parked client is counted once the server has accepted it; poll until refused.
    let deadline = Instant::now() + Duration::from_secs(10);
    let refused = loop {
        let r = raw_request(addr, b"GET / HTTP/1.1\r\nhost: t\r\n\r\n", Duration::from_secs(5)).unwrap();
        if r.status == 503 {
            break r;
        }
        assert!(Instant::now() < deadline, "never refused");
    };
    assert!(refused.text().contains("too many connections"), "{}", refused.text());
    assert!(server.wait_for("the limit is max_connections = 3", Duration::from_secs(5)).is_some());
    drop(parked);
    get_until(addr, "/", "ok", Duration::from_secs(10));
}

#[test]
fn idle_connections_close_but_parked_ones_stay() {
    let (_tree, _server, addr) = start("idle_timeout = \"400ms\"\n");
    // A keep-alive connection with nothing in flight is closed after idle_timeout.
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nhost: t\r\n\r\n").unwrap();
    let r = read_response(&mut s).unwrap();
    assert_eq!(r.status, 200);
    let answered = Instant::now();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    let idle = answered.elapsed();
    assert!(idle >= Duration::from_millis(350) && idle < Duration::from_secs(5), "closed after {idle:?}");

    // A request parked for longer than idle_timeout keeps its connection.
    let r = get(addr, "/wait?timeout=1.2");
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "timeout");
}

#[test]
fn a_client_that_does_not_read_is_dropped_without_stalling_others() {
    let (_tree, mut server, addr) = start("write_timeout = \"500ms\"\n");
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /flood HTTP/1.1\r\nhost: t\r\n\r\n").unwrap();
    // While the flood waits for this client to read, the only worker still answers others.
    let started = Instant::now();
    for _ in 0..5 {
        assert_eq!(get(addr, "/").text(), "ok");
    }
    assert!(started.elapsed() < Duration::from_secs(3), "others were held up: {:?}", started.elapsed());
    let line = server.wait_for("flood ended after", Duration::from_secs(15)).expect("the flood ended");
    assert!(line.contains("write_timeout") || line.contains("the client disconnected"), "{line}");
    drop(s);
}

#[test]
fn a_long_poll_client_that_goes_away_ends_its_handler() {
    let (_tree, _server, addr) = start("");
    let parked: Vec<TcpStream> = (0..20).map(|_| park(addr)).collect();
    let stats = || json_body(&get(addr, "/stats"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while stats()["waiting"] != 20 {
        assert!(Instant::now() < deadline, "never all parked: {}", stats());
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(parked);
    // Their waits were for 30 s; the handlers end as the connections close, so only the /stats
    // request itself is left running.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s = stats();
        if s["waiting"] == 0 && s["live"] == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "handlers still running after their clients left: {s}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
