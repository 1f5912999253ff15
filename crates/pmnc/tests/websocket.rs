//! WebSocket sessions through the real `pmnc` binary: echo of text and binary messages, events
//! pushed into a session, the close handshake from either side, oversized messages (1009), and
//! a client that vanishes without closing (its coroutine ends: the count of live requests goes
//! back down).

mod common;

use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Message, WebSocket};

const HTTP_LUA: &str = r#"local M = {}

function M.handle(request, response)
  local q = request.query
  if request.path == "/ws" then
    if not request.websocket then
      response.status = 400
      return "not a WebSocket request"
    end
    local ws = request.upgrade()
    while true do
      local data, kind, code = ws.receive(30, "pushed")
      if kind == "closed" then
        pmnc.log.info("session ended with " .. tostring(code))
        return
      elseif kind == "event" then
        ws.send(pmnc.json.encode(data))
      elseif data == "bye" then
        ws.close(4000, "bye")
        return
      elseif kind == "binary" then
        ws.send(data, "binary")
      else
        ws.send("echo: " .. data)
      end
    end
  elseif request.path == "/not-ws" then
    local ok, err = pcall(function() return request.upgrade() end)
    return tostring(ok) .. " " .. tostring(err)
  elseif request.path == "/live" then
    return tostring(pmnc.events.stats().live_requests)
  elseif request.path == "/waiters" then
    return tostring(pmnc.events.stats("pushed").topic_waiters)
  elseif request.path == "/publish" then
    return tostring(pmnc.events.publish("pushed", { text = q.text }))
  end
  response.status = 404
  return "no such path"
end

return M
"#;

fn start() -> (Tree, Server, SocketAddr) {
    // One worker: the count of live requests is per worker VM.
    start_http_cage("[interfaces.http]\nlisten = \"127.0.0.1:0\"\nmax_message_size = \"1KiB\"\n", HTTP_LUA, 1)
}

fn connect(addr: SocketAddr) -> WebSocket<TcpStream> {
    let stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let (ws, response) = tungstenite::client(format!("ws://{addr}/ws"), stream).expect("WebSocket handshake");
    assert_eq!(response.status(), 101);
    assert!(response.headers().contains_key("x-request-id"));
    ws
}

fn next_data(ws: &mut WebSocket<TcpStream>) -> Message {
    loop {
        match ws.read().expect("read a message") {
            Message::Ping(_) | Message::Pong(_) => continue,
            m => return m,
        }
    }
}

#[test]
fn echo_events_and_close_from_either_side() {
    let (_tree, mut server, addr) = start();
    let mut ws = connect(addr);
    ws.send(Message::text("hi")).unwrap();
    assert_eq!(next_data(&mut ws), Message::text("echo: hi"));
    ws.send(Message::binary(vec![0u8, 1, 255])).unwrap();
    assert_eq!(next_data(&mut ws), Message::binary(vec![0u8, 1, 255]));
    // Pings are answered without the handler seeing them.
    ws.send(Message::Ping(b"p".to_vec().into())).unwrap();
    ws.send(Message::text("after ping")).unwrap();
    let mut got = Vec::new();
    while got.len() < 2 {
        match ws.read().unwrap() {
            Message::Pong(p) => got.push(format!("pong {}", String::from_utf8_lossy(&p))),
            Message::Text(t) => got.push(t.to_string()),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(got, ["pong p", "echo: after ping"]);

    // An event published elsewhere reaches the session while it waits for the client.
    get_until(addr, "/waiters", "1", Duration::from_secs(5));
    assert_eq!(get(addr, "/publish?text=news").text(), "1");
    assert_eq!(next_data(&mut ws), Message::text(r#"{"text":"news"}"#));

    // The client closes: the handler sees "closed" with the code and ends.
    ws.close(None).unwrap();
    loop {
        match ws.read() {
            Ok(_) => continue,
            Err(tungstenite::Error::ConnectionClosed) => break,
            Err(e) => panic!("close handshake: {e}"),
        }
    }
    assert!(server.wait_for("session ended with 1005", Duration::from_secs(5)).is_some());

    // The handler closes with its own code and reason.
    let mut ws = connect(addr);
    ws.send(Message::text("bye")).unwrap();
    match next_data(&mut ws) {
        Message::Close(Some(f)) => {
            assert_eq!(f.code, CloseCode::from(4000));
            assert_eq!(f.reason.as_str(), "bye");
        }
        other => panic!("expected a close frame, got {other:?}"),
    }
    get_until(addr, "/live", "1", Duration::from_secs(5));
}

#[test]
fn oversized_message_closes_with_1009() {
    let (_tree, _server, addr) = start();
    let mut ws = connect(addr);
    ws.send(Message::text("x".repeat(2000))).unwrap();
    match next_data(&mut ws) {
        Message::Close(Some(f)) => assert_eq!(f.code, CloseCode::Size),
        other => panic!("expected close 1009, got {other:?}"),
    }
    get_until(addr, "/live", "1", Duration::from_secs(5));
}

#[test]
fn vanished_client_ends_its_coroutine() {
    let (_tree, _server, addr) = start();
    let mut sessions: Vec<_> = (0..3).map(|_| connect(addr)).collect();
    for ws in sessions.iter_mut() {
        ws.send(Message::text("x")).unwrap();
        assert_eq!(next_data(ws), Message::text("echo: x"));
    }
    // Three sessions plus the request that counts them.
    assert_eq!(get(addr, "/live").text(), "4");
    let started = Instant::now();
    drop(sessions);
    get_until(addr, "/live", "1", Duration::from_secs(5));
    assert!(started.elapsed() < Duration::from_secs(5));
    get_until(addr, "/waiters", "0", Duration::from_secs(5));
}

#[test]
fn upgrade_of_a_plain_request_is_an_error() {
    let (_tree, _server, addr) = start();
    let r = get(addr, "/not-ws");
    assert_eq!(r.status, 200);
    assert!(r.text().contains("false") && r.text().contains("attempt to call a nil value"), "{}", r.text());
    let r = get(addr, "/ws");
    assert_eq!(r.status, 400);
}
