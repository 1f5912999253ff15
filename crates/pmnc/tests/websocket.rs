//! WebSocket sessions through the real `pmnc` binary: echo of text and binary messages, events
//! pushed into a session, the close handshake from either side, oversized messages (1009),
//! fragments and broken frames (1002, 1007) on raw frames, and a client that vanishes without
//! closing (its coroutine ends: the count of live requests goes back down).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

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

/// A client frame, masked as clients must (unless `masked` is false, to test the refusal).
fn raw_frame(fin: bool, opcode: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mask = [0xa1, 0xb2, 0xc3, 0xd4];
    let mut out = vec![(if fin { 0x80 } else { 0 }) | opcode, (if masked { 0x80 } else { 0 }) | payload.len() as u8];
    if masked {
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    } else {
        out.extend_from_slice(payload);
    }
    out
}

/// A raw WebSocket connection, after the 101.
fn raw_session(addr: SocketAddr) -> TcpStream {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /ws HTTP/1.1\r\nhost: t\r\nupgrade: websocket\r\nconnection: upgrade\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n").unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_string();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    // The accept key of RFC 6455's own example.
    assert!(head.to_ascii_lowercase().contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="), "{head}");
    s
}

/// The next frame from the server: (opcode, payload).
fn read_frame(s: &mut TcpStream) -> (u8, Vec<u8>) {
    use std::io::Read;
    let mut h = [0u8; 2];
    s.read_exact(&mut h).unwrap();
    assert_eq!(h[1] & 0x80, 0, "server frames are not masked");
    let len = match h[1] & 0x7f {
        126 => {
            let mut n = [0u8; 2];
            s.read_exact(&mut n).unwrap();
            u16::from_be_bytes(n) as usize
        }
        127 => panic!("unexpectedly long frame"),
        n => n as usize,
    };
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).unwrap();
    (h[0] & 0x0f, payload)
}

#[test]
fn fragments_join_and_broken_frames_close_with_their_code() {
    use std::io::Write;
    let (_tree, _server, addr) = start();
    // A text message in three fragments with a ping between them: the pong comes first, then
    // the echo of the whole message.
    let mut s = raw_session(addr);
    let mut wire = raw_frame(false, 1, b"frag", true);
    wire.extend(raw_frame(false, 0, b"men", true));
    wire.extend(raw_frame(true, 9, b"p!", true));
    wire.extend(raw_frame(true, 0, b"ted", true));
    s.write_all(&wire).unwrap();
    assert_eq!(read_frame(&mut s), (10, b"p!".to_vec()));
    assert_eq!(read_frame(&mut s), (1, b"echo: fragmented".to_vec()));
    // Text that is not UTF-8: closed with 1007.
    s.write_all(&raw_frame(true, 1, &[0xff, 0xfe], true)).unwrap();
    let (op, payload) = read_frame(&mut s);
    assert_eq!((op, &payload[..2]), (8, &1007u16.to_be_bytes()[..]));

    // An unmasked frame from a client: closed with 1002.
    let mut s = raw_session(addr);
    s.write_all(&raw_frame(true, 1, b"hi", false)).unwrap();
    let (op, payload) = read_frame(&mut s);
    assert_eq!((op, &payload[..2]), (8, &1002u16.to_be_bytes()[..]));

    // A continuation with no message before it: closed with 1002.
    let mut s = raw_session(addr);
    s.write_all(&raw_frame(true, 0, b"x", true)).unwrap();
    let (op, payload) = read_frame(&mut s);
    assert_eq!((op, &payload[..2]), (8, &1002u16.to_be_bytes()[..]));
}
