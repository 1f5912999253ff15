//! permessage-deflate (RFC 7692) and the close codes of WebSocket sessions through the real
//! binary: with a real client library (Python's `websockets`), on raw frames (the server's
//! messages compressed on the wire, the registered close codes 1012-1014 echoed), and with the
//! extension switched off.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::*;

const ECHO: &str = r#"local M = {}
function M.handle(request, response)
  local ws = request.upgrade()
  while true do
    local data, kind, code = ws.receive(30)
    if kind == "closed" then return end
    if kind == "binary" then ws.send(data, "binary") else ws.send("echo: " .. data) end
  end
end
return M
"#;

fn start(extra: &str) -> (Tree, Server, SocketAddr) {
    start_http_cage(&format!("[interfaces.http]\nlisten = \"127.0.0.1:0\"\nmax_message_size = \"64KiB\"\n{extra}"), ECHO, 1)
}

/// A masked client frame of any length; `rsv1` marks a compressed message.
fn frame(opcode: u8, rsv1: bool, payload: &[u8]) -> Vec<u8> {
    let mask = [0x11, 0x22, 0x33, 0x44];
    let mut out = vec![0x80 | if rsv1 { 0x40 } else { 0 } | opcode];
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// Opens a session offering `extensions`; the stream and the 101's head.
fn handshake(addr: SocketAddr, extensions: Option<&str>) -> (TcpStream, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let ext = extensions.map(|e| format!("sec-websocket-extensions: {e}\r\n")).unwrap_or_default();
    let req = format!("GET /ws HTTP/1.1\r\nhost: t\r\nupgrade: websocket\r\nconnection: upgrade\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n{ext}\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    (s, head)
}

/// The next server frame: (first byte, payload).
fn read_frame(s: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut h = [0u8; 2];
    s.read_exact(&mut h).unwrap();
    let len = match h[1] & 0x7f {
        126 => {
            let mut n = [0u8; 2];
            s.read_exact(&mut n).unwrap();
            u16::from_be_bytes(n) as usize
        }
        127 => {
            let mut n = [0u8; 8];
            s.read_exact(&mut n).unwrap();
            u64::from_be_bytes(n) as usize
        }
        n => n as usize,
    };
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).unwrap();
    (h[0], payload)
}

#[test]
fn our_messages_are_compressed_on_the_wire_when_agreed() {
    let (_t, _s, addr) = start("");
    let (mut s, head) = handshake(addr, Some("permessage-deflate; client_no_context_takeover"));
    assert!(head.contains("sec-websocket-extensions: permessage-deflate; server_no_context_takeover; client_no_context_takeover"), "{head}");
    // The client may send uncompressed messages; ours come compressed.
    let text = "the same words, again and again. ".repeat(30);
    s.write_all(&frame(1, false, text.as_bytes())).unwrap();
    let (b0, payload) = read_frame(&mut s);
    assert_eq!(b0, 0x80 | 0x40 | 1, "a final, compressed text frame");
    assert!(payload.len() < text.len() / 4, "{} bytes for {}", payload.len(), text.len());
    let mut inflated = Vec::with_capacity(text.len() + 64);
    let mut d = flate2::Decompress::new(false);
    let mut input = payload.clone();
    input.extend_from_slice(&[0, 0, 0xff, 0xff]);
    d.decompress_vec(&input, &mut inflated, flate2::FlushDecompress::Sync).unwrap();
    assert_eq!(String::from_utf8(inflated).unwrap(), format!("echo: {text}"));

    // Without an offer we can take, nothing is compressed.
    let (mut s, head) = handshake(addr, Some("permessage-deflate"));
    assert!(!head.contains("sec-websocket-extensions"), "{head}");
    s.write_all(&frame(1, false, text.as_bytes())).unwrap();
    let (b0, payload) = read_frame(&mut s);
    assert_eq!(b0, 0x81);
    assert_eq!(payload.len(), text.len() + 6);
}

#[test]
fn deflate_can_be_switched_off() {
    let (_t, _s, addr) = start("websocket_deflate = false\n");
    let (mut s, head) = handshake(addr, Some("permessage-deflate; client_no_context_takeover"));
    assert!(!head.contains("sec-websocket-extensions"), "{head}");
    // A compressed frame is then a protocol error.
    s.write_all(&frame(1, true, b"\x4b\x04\x00")).unwrap();
    let (b0, payload) = read_frame(&mut s);
    assert_eq!((b0 & 0x0f, &payload[..2]), (8, &1002u16.to_be_bytes()[..]));
}

#[test]
fn registered_close_codes_are_echoed() {
    let (_t, _s, addr) = start("");
    for code in [1012u16, 1013, 1014] {
        let (mut s, _) = handshake(addr, None);
        let mut payload = code.to_be_bytes().to_vec();
        payload.extend_from_slice(b"restart");
        s.write_all(&frame(8, false, &payload)).unwrap();
        let (b0, echo) = read_frame(&mut s);
        assert_eq!((b0 & 0x0f, &echo[..2]), (8, &code.to_be_bytes()[..]), "close {code}");
    }
    // An invalid close gets 1002, and the connection ends without a close from us awaited.
    let (mut s, _) = handshake(addr, None);
    s.write_all(&frame(8, false, &[0x03])).unwrap();
    let (b0, payload) = read_frame(&mut s);
    assert_eq!((b0 & 0x0f, &payload[..2]), (8, &1002u16.to_be_bytes()[..]));
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).expect("the server closes the connection");
    assert!(rest.is_empty(), "{rest:?}");
}

#[test]
fn a_real_client_library_talks_deflate_with_context_takeover() {
    let script = r#"
import asyncio, json, sys
import websockets
async def main():
    async with websockets.connect(sys.argv[1], compression="deflate", max_size=2**20) as ws:
        out = {"ext": ws.response_headers.get("Sec-WebSocket-Extensions")}
        big = "chat message about the weather, " * 40
        for i in range(3):
            await ws.send(big + str(i))
            out["r%d" % i] = (await ws.recv()) == "echo: " + big + str(i)
        await ws.send("tiny")
        out["tiny"] = await ws.recv()
        await ws.send(bytes(range(256)) * 3)
        out["binary"] = (await ws.recv()) == bytes(range(256)) * 3
        print(json.dumps(out))
asyncio.run(main())
"#;
    let python = "/usr/bin/python3";
    let has = std::process::Command::new(python).args(["-c", "import websockets"]).output().map(|o| o.status.success()).unwrap_or(false);
    if !has {
        eprintln!(
            "SKIPPED a_real_client_library_talks_deflate_with_context_takeover: Python's websockets is not installed (apt-get install -y python3-websockets)"
        );
        return;
    }
    let (_t, _s, addr) = start("");
    let out = std::process::Command::new(python).args(["-c", script, &format!("ws://{addr}/ws")]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    let ext = v["ext"].as_str().unwrap_or("");
    assert!(ext.starts_with("permessage-deflate") && ext.contains("client_max_window_bits=9"), "{v}");
    for k in ["r0", "r1", "r2", "binary"] {
        assert_eq!(v[k], true, "{k}: {v}");
    }
    assert_eq!(v["tiny"], "echo: tiny");
}
