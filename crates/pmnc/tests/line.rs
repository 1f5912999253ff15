//! The `line` interface (the one docs/writing-an-interface.md builds) through the real binary:
//! a request per line, answers, failures, limits and bad config.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::*;

const TOML: &str = r#"
[interfaces.echo]
protocol = "line"
listen = "127.0.0.1:0"
max_line_size = "16"
"#;

const ECHO: &str = r#"
local M = {}
function M.handle(line, client)
  if line == "boom" then error("boom") end
  if line == "nil" then return nil end
  if line == "table" then return { n = 1 } end
  local from = client.remote_addr:match("^127%.0%.0%.1:") and "local" or client.remote_addr
  return line:upper() .. " from " .. from
end
return M
"#;

struct Client {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Client {
    fn new(addr: SocketAddr) -> Client {
        let s = connect(addr, Duration::from_secs(10));
        Client { reader: BufReader::new(s.try_clone().unwrap()), writer: s }
    }
    fn send(&mut self, text: &str) {
        self.writer.write_all(text.as_bytes()).unwrap();
    }
    fn line(&mut self) -> String {
        let mut l = String::new();
        self.reader.read_line(&mut l).unwrap();
        l
    }
}

fn start() -> (Tree, Server, SocketAddr) {
    let t = Tree::new();
    t.write("c/cage.toml", TOML);
    t.write("c/echo.lua", ECHO);
    let s = Server::start(&t.path().join("c"), &[]);
    let addr = s.addr("echo");
    (t, s, addr)
}

#[test]
fn each_line_is_a_request_and_its_answer_a_line() {
    let (_t, mut s, addr) = start();
    let mut a = Client::new(addr);
    let mut b = Client::new(addr);
    a.send("hello\n");
    b.send("from b\r\n");
    assert_eq!(a.line(), "HELLO from local\n");
    assert_eq!(b.line(), "FROM B from local\n");
    a.send("table\nnil\nnext\n");
    assert_eq!(a.line(), "{\"n\":1}\n");
    assert_eq!(a.line(), "NEXT from local\n", "a handler that returns nil answers nothing");
    a.send("boom\n");
    let e = a.line();
    let id = e.strip_prefix("error: ").map(|i| i.trim().to_string()).unwrap_or_else(|| panic!("{e}"));
    assert!(s.wait_for_all(&[&id, "boom"], Duration::from_secs(5)).is_some(), "the failure is logged with its request id");
    a.send("still here\n");
    assert_eq!(a.line(), "STILL HERE from local\n");
}

#[test]
fn a_line_over_the_limit_closes_the_connection_with_a_reason() {
    let (_t, _s, addr) = start();
    let mut c = Client::new(addr);
    c.send("0123456789abcdef0123\n");
    assert_eq!(c.line(), "error: line too long (over 16 bytes)\n");
    assert_eq!(c.line(), "", "the connection is closed");
    // Endless bytes with no line end are refused too, not buffered.
    let mut c = Client::new(addr);
    c.send(&"x".repeat(10_000));
    assert_eq!(c.line(), "error: line too long (over 16 bytes)\n");
}

#[test]
fn bad_line_config_is_refused_with_file_line_and_key() {
    let t = Tree::new();
    t.write("c/cage.toml", "[interfaces.echo]\nprotocol = \"line\"\nlisten = \"nowhere\"\nidle_timeout = \"0s\"\n");
    t.write("c/echo.lua", ECHO);
    let out = pmnc_limited(&["check", t.path().join("c").to_str().unwrap()], Duration::from_secs(60));
    assert_ne!(out.code, Some(0));
    let text = format!("{}{}", out.stdout, out.stderr);
    assert!(text.contains("cage.toml:3: interfaces.echo.listen: \"nowhere\" is not an address"), "{text}");
    assert!(text.contains("cage.toml:4: interfaces.echo.idle_timeout: must be greater than zero"), "{text}");
}
