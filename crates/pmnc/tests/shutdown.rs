//! Graceful shutdown of the real `pmnc` binary: on SIGTERM or SIGINT it stops accepting, lets the
//! requests in flight finish within their deadlines, and exits 0.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;

const SIGINT: i32 = 2;
const SIGTERM: i32 = 15;

const HTTP_LUA: &str = r#"local M = {}

function M.handle(request, response)
  local id = pmnc.request.id
  if request.path == "/sleep" then
    pmnc.log.info("sleeping " .. id)
    pmnc.sleep(tonumber(request.query.s))
    return "done " .. id
  elseif request.path == "/spin" then
    pmnc.log.info("spinning " .. id)
    while true do end
  end
  return "ok " .. id
end

return M
"#;

/// A cage whose interface has `request_timeout` (the drain bound is the longest one plus 1s).
fn server(request_timeout: &str) -> (Tree, Server) {
    let tree = Tree::new();
    tree.write("c/cage.toml", &http_cage_toml(&format!("request_timeout = \"{request_timeout}\"\n")));
    tree.write("c/http.lua", HTTP_LUA);
    let server = Server::start(&tree.path().join("c"), &[]);
    (tree, server)
}

/// Starts GET `path` on a thread; the receiver gets the response (or error) and when it arrived.
fn background_get(addr: SocketAddr, path: String) -> mpsc::Receiver<(std::io::Result<Response>, Instant)> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let req = format!("GET {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n");
        let r = raw_request(addr, req.as_bytes(), Duration::from_secs(30));
        let _ = tx.send((r, Instant::now()));
    });
    rx
}

/// Does a new connection get a response? `None` when refused, reset or closed unanswered.
fn try_new_request(addr: SocketAddr) -> Option<u16> {
    let req = b"GET /hello HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n";
    raw_request(addr, req, Duration::from_secs(2)).ok().map(|r| r.status)
}

#[test]
fn sigterm_lets_the_request_in_flight_finish_and_refuses_new_ones() {
    let (_tree, mut server) = server("5s");
    let addr = server.addr("http");
    assert_eq!(try_new_request(addr), Some(200));

    let started = Instant::now();
    let in_flight = background_get(addr, "/sleep?s=1.5".into());
    let sleeping = server.wait_for("sleeping ", Duration::from_secs(5)).expect("the request started");
    server.signal(SIGTERM);
    server.wait_for("shutting down", Duration::from_secs(5)).expect("the signal was seen");

    // New connections are refused from now on, while the request in flight is still running.
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        match try_new_request(addr) {
            None => break,
            Some(status) => {
                assert_ne!(status, 200, "a new request was served after SIGTERM");
                assert!(Instant::now() < deadline, "new connections still answered {status} after SIGTERM");
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}"),
        Ok(mut s) => {
            // Accepted by the kernel before the listener closed: it must be closed unanswered.
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf);
            assert!(buf.is_empty(), "answered after SIGTERM: {:?}", String::from_utf8_lossy(&buf));
        }
    }
    assert!(in_flight.try_recv().is_err(), "the request in flight ended before new connections were checked");

    let (r, at) = in_flight.recv_timeout(Duration::from_secs(10)).expect("the request in flight was answered");
    let r = r.expect("the request in flight got a response");
    assert_eq!(r.status, 200, "{}", r.text());
    let id = request_id(&r);
    assert_eq!(r.text(), format!("done {id}"));
    assert!(sleeping.contains(&id));
    assert!(at.duration_since(started) >= Duration::from_millis(1500), "it slept its 1.5s");

    let status = server.wait_exit(Duration::from_secs(5)).expect("pmnc exited after its last request");
    assert_eq!(status.code(), Some(0), "{}", server.log.join("\n"));
    println!("exited {:?} after the last response", at.elapsed());
    assert!(at.elapsed() < Duration::from_secs(3), "exit took {:?} after the last response", at.elapsed());
}

#[test]
fn sigint_when_idle_exits_at_once() {
    // The drain bound is 11s here, so a quick exit means nothing was waited for.
    let (_tree, mut server) = server("10s");
    let addr = server.addr("http");
    // An idle kept-alive connection and one that never sent anything must not hold the exit.
    let mut idle = connect(addr, Duration::from_secs(5));
    let r = exchange(&mut idle, b"GET /hello HTTP/1.1\r\nhost: test\r\n\r\n").unwrap();
    assert_eq!(r.status, 200);
    let mut silent = connect(addr, Duration::from_secs(5));

    let started = Instant::now();
    server.signal(SIGINT);
    let status = server.wait_exit(Duration::from_secs(5)).expect("pmnc exits after SIGINT");
    let took = started.elapsed();
    println!("SIGINT with idle connections: exited after {took:?}");
    assert_eq!(status.code(), Some(0), "{}", server.log.join("\n"));
    assert!(took < Duration::from_millis(1500), "idle exit took {took:?}");
    for (what, s) in [("idle", &mut idle), ("silent", &mut silent)] {
        let mut buf = Vec::new();
        let n = s.read_to_end(&mut buf).unwrap_or(0);
        assert_eq!(n, 0, "the {what} connection was closed without an answer");
    }
}

#[test]
fn requests_in_flight_are_cut_at_their_deadline_during_shutdown() {
    let (_tree, mut server) = server("1500ms");
    let addr = server.addr("http");
    let started = Instant::now();
    let sleeper = background_get(addr, "/sleep?s=30".into());
    let spinner = background_get(addr, "/spin".into());
    server.wait_for("sleeping ", Duration::from_secs(5)).expect("the sleeper started");
    server.wait_for("spinning ", Duration::from_secs(5)).expect("the spinner started");
    server.signal(SIGTERM);
    for (what, rx) in [("sleeper", sleeper), ("spinner", spinner)] {
        let (r, at) = rx.recv_timeout(Duration::from_secs(10)).unwrap_or_else(|_| panic!("the {what} was answered"));
        let r = r.unwrap_or_else(|e| panic!("the {what} got a response: {e}"));
        let took = at.duration_since(started);
        println!("{what}: {} after {took:?}", r.status);
        assert_eq!(r.status, 504, "{what}: {}", r.text());
        assert!(r.text().contains(&request_id(&r)));
        assert!(took >= Duration::from_millis(1400) && took < Duration::from_millis(3000), "{what}: answered after {took:?}");
    }
    let status = server.wait_exit(Duration::from_secs(5)).expect("pmnc exited");
    let took = started.elapsed();
    println!("exited after {took:?}");
    assert_eq!(status.code(), Some(0), "{}", server.log.join("\n"));
    assert!(took < Duration::from_secs(4), "exit took {took:?}; the requests' deadline was 1.5s");
}

#[test]
fn a_second_signal_exits_without_waiting() {
    let (_tree, mut server) = server("10s");
    let addr = server.addr("http");
    let in_flight = background_get(addr, "/sleep?s=8".into());
    server.wait_for("sleeping ", Duration::from_secs(5)).expect("the request started");
    server.signal(SIGTERM);
    server.wait_for("shutting down", Duration::from_secs(5)).expect("the first signal was seen");
    assert!(server.wait_exit(Duration::from_millis(300)).is_none(), "exited while a request was in flight");
    let started = Instant::now();
    server.signal(SIGTERM);
    let status = server.wait_exit(Duration::from_secs(3)).expect("the second signal ends the process");
    println!("second signal: exited {:?} after it with {status:?}", started.elapsed());
    assert_eq!(status.code(), Some(1), "a forced exit is not a clean one");
    let (r, _) = in_flight.recv_timeout(Duration::from_secs(5)).expect("the client saw the end");
    assert!(r.is_err(), "the request in flight was cut, not answered: {:?}", r.map(|r| r.status));
}
