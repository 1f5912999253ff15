//! HTTP/1.1 conformance of the HTTP interface over raw TCP: pipelining, persistence, HEAD and
//! bodiless statuses, `Expect: 100-continue`, chunked bodies, request smuggling defenses, request
//! targets and header fields, malformed request lines, large responses to slow readers and
//! aborted bodies. It pins what our own HTTP/1.1 connection code must keep doing when it replaces
//! hyper's; what http.rs already covers (body and head limits, slow and silent clients, basic
//! malformed requests, sequential keep-alive, max_connections) is not repeated here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;

/// Routes by path; everything else is echoed as JSON, so each response names the request it
/// answers (which is how pipelining order and framing are checked).
const HANDLER: &str = r#"local M = {}

-- 262144 lines of 8 bytes ("%07d\n" of the line number): 2 MiB in which a lost, doubled or
-- misplaced piece shows. Made on first use and kept by this VM.
local big

function M.handle(request, response)
  local p = request.path
  if p == "/big" then
    if not big then
      local lines = {}
      for i = 0, 262143 do lines[#lines + 1] = string.format("%07d\n", i) end
      big = table.concat(lines)
    end
    return big
  elseif p == "/text" then
    return "text " .. (request.query.n or "")
  elseif p == "/status" then
    response.status = math.tointeger(tonumber(request.query.code))
    -- A body set together with 204/304 must still never reach the wire.
    response.body = request.query.body
    return
  elseif p == "/sleep" then
    pmnc.sleep(tonumber(request.query.s))
  elseif p == "/fail" then
    error("handler failure on purpose")
  end
  return {
    method = request.method,
    path = request.path,
    uri = request.uri,
    query = request.query,
    headers = request.headers,
    body = request.body,
    version = request.version,
  }
end

return M
"#;

/// How long a read waits for a response that should come (a server that is merely slow under a
/// loaded machine still makes it; a hang fails instead of blocking the test run).
const READ: Duration = Duration::from_secs(5);

/// How long a connection is watched for bytes that must never come. Every such check takes this
/// long on a correct server, so it is short; the request sent after each check also catches
/// stray bytes that come later, as they would be read as the start of its response.
const QUIET: Duration = Duration::from_millis(200);

fn server(extra: &str, workers: usize) -> (Tree, Server, SocketAddr) {
    start_http_cage(&http_cage_toml(extra), HANDLER, workers)
}

/// A response as the client framed it.
#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    fn has_token(&self, name: &str, token: &str) -> bool {
        self.headers.iter().filter(|(n, _)| n == name).any(|(_, v)| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    }

    fn is_chunked(&self) -> bool {
        self.has_token("transfer-encoding", "chunked")
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).to_string()
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {} {:?}", self.status, self.text()))
    }
}

/// One client connection with its own read buffer: bytes of a later response that arrive in the
/// same read as an earlier one (pipelining) stay for the next response instead of being lost,
/// and bytes a response should not have had show up at the next read.
struct Conn {
    s: TcpStream,
    buf: Vec<u8>,
    /// A slow reader: at most this many bytes a read, and a pause after each.
    slow: Option<(usize, Duration)>,
}

impl Conn {
    fn open(addr: SocketAddr) -> Conn {
        Conn { s: connect(addr, READ), buf: Vec::new(), slow: None }
    }

    fn send(&mut self, bytes: impl AsRef<[u8]>) {
        self.s.write_all(bytes.as_ref()).expect("write to the server");
    }

    /// One more read into the buffer; the number of bytes, 0 at end of stream.
    fn fill(&mut self) -> Result<usize, String> {
        let mut chunk = [0u8; 16384];
        let most = self.slow.map_or(chunk.len(), |(n, _)| n);
        match self.s.read(&mut chunk[..most]) {
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                if let Some((_, pause)) = self.slow {
                    std::thread::sleep(pause);
                }
                Ok(n)
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => Err(format!("nothing more within {READ:?}")),
            Err(e) => Err(format!("read failed: {e}")),
        }
    }

    /// The bytes up to and including the next CRLF.
    fn line(&mut self) -> Result<Vec<u8>, String> {
        loop {
            if let Some(p) = self.buf.windows(2).position(|w| w == b"\r\n") {
                return Ok(self.buf.drain(..p + 2).collect());
            }
            if self.fill()? == 0 {
                return Err(format!("closed inside a line, after {:?}", String::from_utf8_lossy(&self.buf)));
            }
        }
    }

    /// Exactly `n` bytes.
    fn take(&mut self, n: usize) -> Result<Vec<u8>, String> {
        while self.buf.len() < n {
            if self.fill()? == 0 {
                return Err(format!("closed after {} of {n} body bytes", self.buf.len()));
            }
        }
        Ok(self.buf.drain(..n).collect())
    }

    /// A status line and header fields (the body is left in the stream).
    fn head(&mut self) -> Result<Resp, String> {
        let first = self.line().map_err(|e| format!("no response: {e}"))?;
        let first = String::from_utf8_lossy(&first).trim_end().to_string();
        let mut parts = first.splitn(3, ' ');
        let version = parts.next().unwrap_or("");
        if !matches!(version, "HTTP/1.1" | "HTTP/1.0") {
            return Err(format!("not a status line: {first:?}"));
        }
        let status = parts.next().and_then(|s| s.parse::<u16>().ok()).ok_or_else(|| format!("no status code in {first:?}"))?;
        let mut headers = Vec::new();
        loop {
            let line = self.line()?;
            if line == b"\r\n" {
                break;
            }
            let line = String::from_utf8_lossy(&line).to_string();
            let (n, v) = line.split_once(':').ok_or_else(|| format!("not a header field: {line:?}"))?;
            headers.push((n.to_ascii_lowercase(), v.trim().to_string()));
        }
        Ok(Resp { status, headers, body: Vec::new() })
    }

    /// A whole response, framed as RFC 9112 6.3 says: no body for HEAD, 1xx, 204 and 304;
    /// chunked; Content-Length; else until the server closes.
    fn try_response(&mut self, to_head: bool) -> Result<Resp, String> {
        let mut r = self.head()?;
        if to_head || r.status < 200 || r.status == 204 || r.status == 304 {
            return Ok(r);
        }
        if r.is_chunked() {
            loop {
                let size_line = String::from_utf8_lossy(&self.line()?).to_string();
                let size = size_line.trim_end().split(';').next().unwrap_or("").trim();
                let size = usize::from_str_radix(size, 16).map_err(|_| format!("bad chunk size line {size_line:?}"))?;
                if size == 0 {
                    // Trailer fields up to the empty line.
                    while self.line()? != b"\r\n" {}
                    break;
                }
                let data = self.take(size)?;
                r.body.extend_from_slice(&data);
                if self.take(2)? != b"\r\n" {
                    return Err("a chunk not followed by CRLF".into());
                }
            }
        } else if let Some(len) = r.header("content-length") {
            let len: usize = len.parse().map_err(|_| format!("bad content-length {len:?}"))?;
            r.body = self.take(len)?;
        } else {
            while self.fill()? > 0 {}
            r.body = std::mem::take(&mut self.buf);
        }
        Ok(r)
    }

    fn response(&mut self) -> Resp {
        self.try_response(false).unwrap_or_else(|e| panic!("reading a response: {e}"))
    }

    fn response_to_head(&mut self) -> Resp {
        self.try_response(true).unwrap_or_else(|e| panic!("reading the response to HEAD: {e}"))
    }

    /// Ok when the server has closed with no byte left unread (a reset counts as closed: the
    /// server may close with bytes of ours unread, and then the kernel resets).
    fn closed(&mut self) -> Result<(), String> {
        if !self.buf.is_empty() {
            return Err(format!("{} more bytes: {:?}", self.buf.len(), String::from_utf8_lossy(&self.buf)));
        }
        let mut chunk = [0u8; 4096];
        match self.s.read(&mut chunk) {
            Ok(0) => Ok(()),
            Ok(n) => Err(format!("more bytes instead of the end: {:?}", String::from_utf8_lossy(&chunk[..n]))),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => Err(format!("still open after {READ:?}")),
            Err(_) => Ok(()),
        }
    }

    /// What arrives within `d` (for bytes that must not come); also what was already buffered.
    fn arriving_within(&mut self, d: Duration) -> Vec<u8> {
        self.s.set_read_timeout(Some(d)).unwrap();
        let deadline = Instant::now() + d;
        while Instant::now() < deadline {
            match self.fill() {
                Ok(n) if n > 0 => continue,
                _ => break,
            }
        }
        self.s.set_read_timeout(Some(READ)).unwrap();
        std::mem::take(&mut self.buf)
    }
}

/// What every response a handler (or the interface for it) makes carries: a `date` in the
/// IMF-fixdate form (RFC 9110 5.6.7, e.g. "Sun, 06 Nov 1994 08:49:37 GMT"), an `x-request-id`,
/// and exactly one of `content-length` and `transfer-encoding: chunked` (both at once is
/// forbidden, RFC 9112 6.1; neither would frame the body by closing, which ends keep-alive).
fn assert_normal(r: &Resp, what: &str) {
    let date = r.header("date").unwrap_or_else(|| panic!("{what}: no date header in {:?}", r.headers));
    assert!(date.len() == 29 && date.ends_with(" GMT") && date.as_bytes()[3] == b',', "{what}: date {date:?} is not an IMF-fixdate");
    assert!(r.header("x-request-id").is_some_and(|v| !v.is_empty()), "{what}: no x-request-id in {:?}", r.headers);
    let framings = [r.header("content-length").is_some(), r.is_chunked()];
    assert!(framings.iter().filter(|f| **f).count() == 1, "{what}: exactly one of content-length and transfer-encoding: chunked, got {:?}", r.headers);
}

fn get_req(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n")
}

/// Requests sent in one write are answered in order on the same connection, also when the
/// first takes longer than the second.
#[test]
fn pipelined_requests_are_answered_in_order_on_one_connection() {
    let (_tree, _server, addr) = server("", 2);
    for n in [2usize, 10] {
        let mut c = Conn::open(addr);
        let mut all = String::new();
        for i in 0..n {
            all += &get_req(&format!("/pipe/{n}/{i}"));
        }
        // The last asks to close, so that the end of the stream proves nothing else was answered.
        all += "GET /pipe/last HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n";
        c.send(&all);
        for i in 0..n {
            let r = c.response();
            assert_eq!(r.status, 200, "pipelined request {i} of {n}: {}", r.text());
            assert_normal(&r, "pipelined response");
            assert_eq!(r.json()["path"], format!("/pipe/{n}/{i}"), "response {i} of {n} pipelined requests");
        }
        assert_eq!(c.response().json()["path"], "/pipe/last");
        c.closed().unwrap_or_else(|e| panic!("{n} pipelined requests: after the last response: {e}"));
    }

    // A slow first request must not let the quick second one overtake it: HTTP/1.1 has no other
    // way to match responses to requests than their order.
    let mut c = Conn::open(addr);
    c.send(format!("{}{}", get_req("/sleep?s=0.3"), get_req("/quick")));
    let first = c.response();
    assert_eq!(first.json()["path"], "/sleep", "the first response answers the first request");
    assert_eq!(c.response().json()["path"], "/quick");
}

/// A kept connection is read again only when the client sends (the server does not read
/// after a short read until epoll says more came): requests in pieces with pauses between
/// them, a request after an idle pause, and two in one write are all answered.
#[test]
fn requests_in_pieces_and_after_pauses_are_answered_on_a_kept_connection() {
    let (_tree, _server, addr) = server("", 1);
    let mut c = Conn::open(addr);
    for round in 0..3 {
        let req = get_req(&format!("/piece/{round}"));
        let (a, rest) = req.split_at(5);
        let (b, d) = rest.split_at(rest.len() - 3);
        for part in [a, b, d] {
            c.send(part);
            std::thread::sleep(Duration::from_millis(30));
        }
        let r = c.response();
        assert_eq!(r.json()["path"], format!("/piece/{round}"), "round {round}");
        // Idle between requests, then one more, then two in one write.
        std::thread::sleep(Duration::from_millis(120));
        c.send(get_req(&format!("/after/{round}")));
        assert_eq!(c.response().json()["path"], format!("/after/{round}"));
        c.send(format!("{}{}", get_req("/two/a"), get_req("/two/b")));
        assert_eq!(c.response().json()["path"], "/two/a");
        assert_eq!(c.response().json()["path"], "/two/b");
    }
}

/// HTTP/1.0 closes after each response unless it asks for keep-alive; HTTP/1.1
/// `Connection: close` is answered with `connection: close` and then the end.
#[test]
fn http10_and_connection_close_end_the_connection_after_the_response() {
    let (_tree, _server, addr) = server("", 2);

    // HTTP/1.0 without keep-alive: one response, then the end.
    let mut c = Conn::open(addr);
    c.send("GET /v10/plain HTTP/1.0\r\nHost: test\r\n\r\n");
    let r = c.response();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_normal(&r, "HTTP/1.0 response");
    assert_eq!(r.json()["path"], "/v10/plain");
    assert_eq!(r.json()["version"], "HTTP/1.0");
    c.closed().unwrap_or_else(|e| panic!("HTTP/1.0 without keep-alive: the server must close after the response: {e}"));

    // HTTP/1.0 with keep-alive: announced in the response, and the connection serves again.
    let mut c = Conn::open(addr);
    for i in 1..=2 {
        c.send(format!("GET /v10/ka/{i} HTTP/1.0\r\nHost: test\r\nConnection: keep-alive\r\n\r\n"));
        let r = c.response();
        assert_eq!(r.status, 200, "HTTP/1.0 keep-alive request {i}: {}", r.text());
        assert_eq!(r.json()["path"], format!("/v10/ka/{i}"));
        assert!(r.has_token("connection", "keep-alive"), "HTTP/1.0 keep-alive request {i}: no `connection: keep-alive` in {:?}", r.headers);
    }
    // A later request on it without keep-alive ends it again.
    c.send("GET /v10/ka/3 HTTP/1.0\r\nHost: test\r\n\r\n");
    assert_eq!(c.response().json()["path"], "/v10/ka/3");
    c.closed().unwrap_or_else(|e| panic!("HTTP/1.0 request without keep-alive on a kept connection: {e}"));

    // HTTP/1.1 `Connection: close`: said in the response, and a request pipelined behind it is
    // never answered (RFC 9112 9.6: no further requests after close).
    let mut c = Conn::open(addr);
    c.send(format!("GET /close/1 HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n{}", get_req("/close/after")));
    let r = c.response();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["path"], "/close/1");
    assert!(r.has_token("connection", "close"), "no `connection: close` in the response to `Connection: close`: {:?}", r.headers);
    c.closed().unwrap_or_else(|e| panic!("after `Connection: close`: {e}"));
}

/// HEAD gets the status and content-length of GET without the body; 204 and 304 have no
/// body even when the handler sets one. Either way the next request on the connection parses.
#[test]
fn head_204_and_304_send_no_body_bytes() {
    let (_tree, _server, addr) = server("", 2);
    let mut c = Conn::open(addr);
    for path in ["/text?n=head", "/big"] {
        c.send(get_req(path));
        let got = c.response();
        assert_eq!(got.status, 200, "GET {path}");
        c.send(format!("HEAD {path} HTTP/1.1\r\nHost: test\r\n\r\n"));
        let head = c.response_to_head();
        assert_eq!(head.status, got.status, "HEAD {path}: same status as GET");
        assert!(got.header("content-length").is_some(), "GET {path}: {:?}", got.headers);
        assert_eq!(head.header("content-length"), got.header("content-length"), "HEAD {path}: the content-length of GET");
        let stray = c.arriving_within(QUIET);
        assert!(stray.is_empty(), "HEAD {path}: {} body bytes sent: {:?}", stray.len(), String::from_utf8_lossy(&stray[..stray.len().min(100)]));
        // Any stray byte would be read as the start of this response.
        c.send(get_req(&format!("/text?n=after-head{}", path.len())));
        let r = c.try_response(false).unwrap_or_else(|e| panic!("the request after HEAD {path}: {e}"));
        assert_eq!(r.text(), format!("text after-head{}", path.len()));
    }

    for code in [204, 304] {
        for body in ["", "&body=stray"] {
            let what = format!("status {code} (handler body {body:?})");
            c.send(get_req(&format!("/status?code={code}{body}")));
            let r = c.try_response(false).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(r.status, code, "{what}");
            assert!(r.header("transfer-encoding").is_none(), "{what}: transfer-encoding on a response without a body: {:?}", r.headers);
            if code == 204 {
                // RFC 9110 8.6: never a Content-Length on 204.
                assert!(r.header("content-length").is_none(), "{what}: content-length on a 204: {:?}", r.headers);
            }
            let stray = c.arriving_within(QUIET);
            assert!(stray.is_empty(), "{what}: body bytes sent: {:?}", String::from_utf8_lossy(&stray));
            c.send(get_req(&format!("/text?n=after{code}")));
            let r = c.try_response(false).unwrap_or_else(|e| panic!("the request after {what}: {e}"));
            assert_eq!(r.status, 200, "after {what}");
            assert_eq!(r.text(), format!("text after{code}"), "after {what}");
        }
    }
}

/// Every response carries date, x-request-id and its framing: JSON, text, large, a failed
/// handler's 500 and a refused body's 413.
#[test]
fn every_response_has_date_request_id_and_framing() {
    let (_tree, _server, addr) = server("max_body_size = \"1KiB\"\n", 2);
    let mut c = Conn::open(addr);
    for path in ["/json", "/text?n=1", "/big", "/fail"] {
        c.send(get_req(path));
        let r = c.response();
        assert_eq!(r.status, if path == "/fail" { 500 } else { 200 }, "GET {path}: {}", r.text());
        assert_normal(&r, &format!("GET {path}"));
    }
    c.send("POST /json HTTP/1.1\r\nHost: test\r\nContent-Length: 2048\r\nConnection: close\r\n\r\n");
    let r = c.response();
    assert_eq!(r.status, 413);
    assert_normal(&r, "413 for a body over max_body_size");
}

/// `Expect: 100-continue`: 100 before the body, then the final response; none over the limit.
#[test]
fn expect_100_continue() {
    let (_tree, _server, addr) = server("max_body_size = \"1KiB\"\n", 2);
    let body = "the body sent after 100 Continue";
    let mut c = Conn::open(addr);
    c.send(format!("POST /expect HTTP/1.1\r\nHost: test\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n", body.len()));
    // The body is held back until the server asks for it.
    let interim = c.try_response(false).unwrap_or_else(|e| panic!("waiting for 100 Continue before sending the body: {e}"));
    assert_eq!(interim.status, 100, "the answer to the head alone: {interim:?}");
    c.send(body);
    let r = c.response();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_normal(&r, "response after 100 Continue");
    assert_eq!(r.json()["body"], body);
    assert_eq!(r.json()["path"], "/expect");

    // Over max_body_size the declared length alone decides: 413 at once, and no 100 invites a
    // body that would be refused.
    let mut c = Conn::open(addr);
    c.send("POST /expect HTTP/1.1\r\nHost: test\r\nExpect: 100-continue\r\nContent-Length: 2048\r\n\r\n");
    let r = c.try_response(false).unwrap_or_else(|e| panic!("the answer to an announced body over max_body_size: {e}"));
    assert_eq!(r.status, 413, "the first answer to an announced body over max_body_size: {r:?}");
}

/// Chunked and Content-Length request bodies end exactly where their framing says.
#[test]
fn request_bodies_are_framed_exactly() {
    let (_tree, _server, addr) = server("", 2);

    // Chunk extensions are skipped (also a quoted one), sizes are hex of either case, trailer
    // fields end the body; then the connection goes on.
    let mut c = Conn::open(addr);
    c.send(
        "POST /chunked HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n\
         5;ext=1\r\nhello\r\n7;name=\"quoted value\";x\r\n, world\r\nA\r\n 012345678\r\n0\r\nX-Trailer: done\r\n\r\n",
    );
    let r = c.response();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["body"], "hello, world 012345678", "the chunks joined");
    c.send(get_req("/after-chunked"));
    let r = c.response();
    assert_eq!(r.json()["path"], "/after-chunked", "the request after a chunked body");

    // A Content-Length body that looks like a request, with a real request behind it in the
    // same write: the body is the body, the request after it is the second request, and there is
    // no third.
    let inner = get_req("/inside-body");
    let mut c = Conn::open(addr);
    c.send(format!(
        "POST /first HTTP/1.1\r\nHost: test\r\nContent-Length: {}\r\n\r\n{inner}GET /second HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n",
        inner.len()
    ));
    let r = c.response();
    assert_eq!(r.json()["path"], "/first");
    assert_eq!(r.json()["body"], inner.as_str(), "the body is exactly Content-Length bytes");
    let r = c.response();
    assert_eq!(r.json()["path"], "/second", "the bytes after the body are the next request");
    c.closed().unwrap_or_else(|e| panic!("after the second request (connection: close): {e}"));
}

/// Ambiguous or invalid framing is refused, and what follows it is never served as a request.
#[test]
fn request_smuggling_is_refused_and_the_connection_closed() {
    let (_tree, _server, addr) = server("", 2);
    let smuggled = get_req("/smuggled");
    // (what, head fields, the bytes after the head, acceptable statuses)
    let chunked_end = "0\r\n\r\n";
    let cases: Vec<(&str, String, String, &[u16])> = vec![
        (
            "Content-Length with Transfer-Encoding: chunked",
            format!("Content-Length: {}\r\nTransfer-Encoding: chunked\r\n", chunked_end.len() + smuggled.len()),
            format!("{chunked_end}{smuggled}"),
            &[400],
        ),
        ("two different Content-Length fields", "Content-Length: 5\r\nContent-Length: 6\r\n".into(), format!("hello{smuggled}"), &[400]),
        ("a Content-Length list of different values", "Content-Length: 5, 6\r\n".into(), format!("hello{smuggled}"), &[400]),
        ("Content-Length +5", "Content-Length: +5\r\n".into(), format!("hello{smuggled}"), &[400]),
        ("Content-Length 5x", "Content-Length: 5x\r\n".into(), format!("hello{smuggled}"), &[400]),
        ("Transfer-Encoding: gzip", "Transfer-Encoding: gzip\r\n".into(), smuggled.clone(), &[400, 501]),
        // Lines ended by a bare LF: a proxy in front may read them differently (issue 12: this
        // one waited for CRLFs until the deadline).
        ("a chunked body with bare-LF lines", "Transfer-Encoding: chunked\r\n".into(), "5\nhello\n0\n\n".into(), &[400]),
        ("a chunk extension with a bare CR", "Transfer-Encoding: chunked\r\n".into(), format!("5;a\rb\r\nhello\r\n0\r\n\r\n{smuggled}"), &[400]),
    ];
    let mut problems = Vec::new();
    for (what, fields, rest, statuses) in &cases {
        let mut c = Conn::open(addr);
        c.send(format!("POST /smuggle HTTP/1.1\r\nHost: test\r\n{fields}\r\n{rest}"));
        match c.try_response(false) {
            Ok(r) if statuses.contains(&r.status) => {}
            Ok(r) => problems.push(format!("{what}: status {} (want one of {statuses:?}), body {:?}", r.status, r.text())),
            Err(e) => problems.push(format!("{what}: no response: {e}")),
        }
        // RFC 9112 6.3: the framing cannot be trusted, so the server closes; whatever follows
        // the head is never taken as a request.
        if let Err(e) = c.closed() {
            let answered = if e.contains("/smuggled") || e.contains("HTTP/1.1") { " (the bytes after the head were answered as a request)" } else { "" };
            problems.push(format!("{what}: not closed after the response{answered}: {e}"));
        }
    }
    // The server still serves.
    let r = get(addr, "/text?n=still");
    assert_eq!(r.text(), "text still");
    assert!(problems.is_empty(), "request smuggling defenses:\n{}", problems.join("\n"));
}

/// The absolute form of a target, percent-encoding, and how header fields reach Lua.
#[test]
fn request_target_and_header_fields_reach_lua() {
    let (_tree, _server, addr) = server("", 2);
    let mut c = Conn::open(addr);

    // Absolute form (RFC 9112 3.2.2): the path and query are taken from the URI.
    c.send("GET http://example.com/abs/path?x=1 HTTP/1.1\r\nHost: example.com\r\n\r\n");
    let r = c.response();
    assert_eq!(r.status, 200, "{}", r.text());
    let j = r.json();
    assert_eq!(j["path"], "/abs/path", "absolute-form target");
    assert_eq!(j["query"]["x"], "1", "absolute-form target");

    // Percent-encoding: decoded in path, kept in uri.
    c.send(get_req("/a%20b"));
    let j = c.response().json();
    assert_eq!(j["path"], "/a b");
    assert_eq!(j["uri"], "/a%20b");

    // Names in lower case; a repeated field joined in order even with another between its lines;
    // values without leading and trailing whitespace (spaces and tabs, RFC 9112 5) but with
    // their inner spaces and their own case.
    c.send(
        "GET /fields HTTP/1.1\r\nHost: test\r\nX-MiXeD-CaSe: Value\r\nX-A: 1\r\nX-Between: b\r\nX-A: 2\r\n\
         X-Spaces:   inner  spaced \t value \t \r\n\r\n",
    );
    let j = c.response().json();
    let headers = j["headers"].as_object().expect("request.headers is a table");
    for name in headers.keys() {
        assert_eq!(name, &name.to_ascii_lowercase(), "header names reach Lua in lower case: {headers:?}");
    }
    assert_eq!(headers["x-mixed-case"], "Value");
    assert_eq!(headers["x-a"], "1, 2", "repeated field: {headers:?}");
    assert_eq!(headers["x-between"], "b");
    assert_eq!(headers["x-spaces"], "inner  spaced \t value", "outer whitespace trimmed, inner kept");
}

/// At most 100 header fields (what clients of the hyper-based server could count on); more are
/// refused with 431, like a head over max_header_size.
#[test]
fn more_than_100_header_fields_get_431() {
    let (_tree, _server, addr) = server("", 2);
    // Host, Connection and `extra` more: 100 fields are served, 101 are not. Both heads are far
    // under the 16KiB max_header_size, so the count is what is refused.
    for (extra, want) in [(98, 200), (99, 431)] {
        let fields = extra + 2;
        let mut req = String::from("GET /count HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
        for i in 0..extra {
            req += &format!("X-H{i}: v\r\n");
        }
        req += "\r\n";
        assert!(req.len() < 4096, "the head stays small: {} bytes", req.len());
        let mut c = Conn::open(addr);
        c.send(&req);
        let r = c.try_response(false).unwrap_or_else(|e| panic!("{fields} header fields: {e}"));
        assert_eq!(r.status, want, "{fields} header fields ({} bytes): {}", req.len(), r.text());
    }
    assert_eq!(get(addr, "/text?n=ok").text(), "text ok", "the server keeps serving");
}

/// Unknown versions, obs-fold and whitespace before the colon are refused.
#[test]
fn malformed_request_lines_and_fields_get_400_or_505() {
    let (_tree, _server, addr) = server("", 2);
    let cases: [(&str, &str, &[u16]); 5] = [
        ("version HTTP/2.0 in a request line", "GET / HTTP/2.0\r\nHost: test\r\n\r\n", &[400, 505]),
        // Bare LF is refused in heads as in chunked bodies (docs/decisions/062-bare-lf.md).
        ("a head with bare-LF line ends", "GET / HTTP/1.1\nHost: test\n\n", &[400]),
        ("version HTTP/x", "GET / HTTP/x\r\nHost: test\r\n\r\n", &[400, 505]),
        ("an obs-fold line", "GET / HTTP/1.1\r\nHost: test\r\nX-A: a\r\n folded\r\n\r\n", &[400]),
        // RFC 9112 5.1 requires 400 for whitespace between name and colon (the space inside a
        // name is in http.rs).
        ("a space between field name and colon", "GET / HTTP/1.1\r\nHost: test\r\nX-Spaced : v\r\n\r\n", &[400]),
    ];
    let mut problems = Vec::new();
    for (i, (what, req, statuses)) in cases.iter().enumerate() {
        let mut c = Conn::open(addr);
        c.send(req);
        match c.try_response(false) {
            Ok(r) if statuses.contains(&r.status) => {}
            Ok(r) => problems.push(format!("{what}: status {} (want one of {statuses:?}), body {:?}", r.status, r.text())),
            Err(e) => problems.push(format!("{what}: no response: {e}")),
        }
        let r = get(addr, &format!("/text?n=after{i}"));
        assert_eq!(r.text(), format!("text after{i}"), "a new connection after {what}");
    }
    assert!(problems.is_empty(), "malformed requests:\n{}", problems.join("\n"));
}

/// A slow reader gets a large response whole.
#[test]
fn a_large_response_reaches_a_slow_reader_whole() {
    let (_tree, _server, addr) = server("", 2);
    let mut c = Conn::open(addr);
    c.send(get_req("/big"));
    // 4 KiB reads with a pause after each: about 2.5 s for 2 MiB, so the server's writes keep
    // finding the socket buffers full and have to wait, yet well within the default 30 s
    // write_timeout.
    c.slow = Some((4096, Duration::from_millis(5)));
    let started = Instant::now();
    let r = c.try_response(false).unwrap_or_else(|e| panic!("the 2 MiB response read slowly, after {:?}: {e}", started.elapsed()));
    println!("2 MiB read in small pieces in {:?}", started.elapsed());
    assert_eq!(r.status, 200);
    assert_normal(&r, "2 MiB response");
    let want: Vec<u8> = (0..262144).flat_map(|i| format!("{i:07}\n").into_bytes()).collect();
    assert_eq!(r.body.len(), want.len(), "the whole body");
    if let Some(at) = r.body.iter().zip(&want).position(|(a, b)| a != b) {
        panic!("the body differs from byte {at}: {:?}", String::from_utf8_lossy(&r.body[at.saturating_sub(8)..(at + 16).min(r.body.len())]));
    }
    // And the connection is still in order for another request.
    c.slow = None;
    c.send(get_req("/text?n=after-big"));
    assert_eq!(c.response().text(), "text after-big");
}

/// A client that sends half its body and goes away costs nothing but its connection.
#[test]
fn a_body_cut_short_by_the_client_harms_nothing() {
    // One worker: the aborted connections are handled on the thread that answers the later
    // request, so their errors (if any) are logged before the check below, not on another thread.
    let (_tree, mut server, addr) = server("", 1);
    let head = "POST /cut HTTP/1.1\r\nHost: test\r\nContent-Length: 1000\r\n\r\n";
    let half = "h".repeat(500);

    // Closed outright.
    let mut c = Conn::open(addr);
    c.send(format!("{head}{half}"));
    drop(c);

    // Closed for writing only: the server cannot get the rest, and the handler never sees half a
    // body as if it were whole. It may say 400 before closing.
    let mut c = Conn::open(addr);
    c.send(format!("{head}{half}"));
    c.s.shutdown(Shutdown::Write).unwrap();
    let mut all = Vec::new();
    match c.s.read_to_end(&mut all) {
        Ok(_) => {}
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            panic!("the connection with half a body stays open after the client's end")
        }
        Err(_) => {}
    }
    let text = String::from_utf8_lossy(&all);
    assert!(!text.starts_with("HTTP/1.1 2"), "half a body was handled as a request: {text:?}");

    let r = get(addr, "/text?n=next");
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "text next");
    // Log lines travel through a pipe and a reader thread; give them a moment to arrive.
    server.drain(Duration::from_millis(300));
    assert!(server.child.try_wait().unwrap().is_none(), "the server exited:\n{}", server.log.join("\n"));
    let fatal: Vec<&String> = server.log.iter().filter(|l| l.contains("ERROR") || l.contains("panicked")).collect();
    assert!(fatal.is_empty(), "a cut body was logged as an error: {fatal:?}");
}
