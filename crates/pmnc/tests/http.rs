//! The HTTP interface through the real `pmnc` binary: what a request looks like to Lua, how a
//! handler's result becomes a response, errors, limits, slow and malformed clients, connection
//! limits, HTTP/2 and several interfaces in one cage.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::Read;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;

/// The handler of most tests: named endpoints, else an echo of the request as JSON.
const HTTP_LUA: &str = r#"local M = {}

function M.handle(request, response)
  local p = request.path
  if p == "/string" then
    return "plain text " .. request.query.n
  elseif p == "/table" then
    return { n = math.tointeger(tonumber(request.query.n)), list = { 1, 2, 3 }, nested = { ok = true } }
  elseif p == "/fields" then
    local status = math.tointeger(tonumber(request.query.status))
    response.status = status
    response.headers["x-custom"] = "custom-" .. status
    response.headers["set-cookie"] = { "a=" .. status, "b=" .. status }
    response.body = "body-" .. status
    return
  elseif p == "/fail" then
    error("secret failure text " .. request.query.token)
  elseif p == "/badstatus" then
    response.status = math.tointeger(tonumber(request.query.v)) or request.query.v
    return "never sent"
  end
  return {
    method = request.method,
    path = request.path,
    uri = request.uri,
    query = request.query,
    headers = request.headers,
    body = request.body,
    body_len = #request.body,
    remote_addr = request.remote_addr,
    version = request.version,
    interface = pmnc.request.interface,
  }
end

return M
"#;

/// A cage with HTTP_LUA behind one interface named `http` with `extra` config lines.
fn echo_server(extra: &str) -> (Tree, Server) {
    let tree = Tree::new();
    tree.write("web/cage.toml", &http_cage_toml(extra));
    tree.write("web/http.lua", HTTP_LUA);
    let server = Server::start(&tree.path().join("web"), &[]);
    (tree, server)
}

/// Something different in every run, so that no expected value is a constant.
fn token() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    format!("t{}x{nanos}", std::process::id())
}

#[test]
fn request_fields_reach_lua() {
    let (_tree, server) = echo_server("");
    let addr = server.addr("http");
    let tok = token();
    let body = format!("{{\"greeting\": \"hello {tok}\"}}");
    let mut s = connect(addr, Duration::from_secs(10));
    let local = s.local_addr().unwrap();
    let req = format!(
        "PUT /echo/a%20b/{tok}?x=1&y=two%20words&tok={tok} HTTP/1.1\r\nHost: test\r\nX-Custom-Header: Hello-{tok}\r\n\
         X-Multi: one\r\nX-Multi: two\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let r = exchange(&mut s, req.as_bytes()).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let j = json_body(&r);
    assert_eq!(j["method"], "PUT");
    assert_eq!(j["path"], format!("/echo/a b/{tok}"), "the path is percent-decoded");
    assert_eq!(j["uri"], format!("/echo/a%20b/{tok}?x=1&y=two%20words&tok={tok}"), "uri is as sent");
    assert_eq!(j["query"], serde_json::json!({ "x": "1", "y": "two words", "tok": tok }));
    let headers = j["headers"].as_object().expect("headers is a table");
    for name in headers.keys() {
        assert_eq!(name, &name.to_ascii_lowercase(), "header names reach Lua in lower case: {headers:?}");
    }
    assert_eq!(headers["x-custom-header"], format!("Hello-{tok}"));
    assert_eq!(headers["x-multi"], "one, two", "repeated request headers are joined");
    assert_eq!(headers["content-length"], body.len().to_string());
    assert_eq!(j["body"], body);
    assert_eq!(j["body_len"], body.len());
    assert_eq!(j["remote_addr"], local.to_string(), "remote_addr is the client's address and port");
    assert_eq!(j["version"], "HTTP/1.1");
    assert_eq!(j["interface"], "http");
}

#[test]
fn string_and_table_results() {
    let (_tree, server) = echo_server("");
    let addr = server.addr("http");
    let n = std::process::id();

    let r = get(addr, &format!("/string?n={n}"));
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), format!("plain text {n}"), "a returned string is the body as it is");
    assert!(r.header("content-type").unwrap_or("").starts_with("text/plain"), "{:?}", r.headers);

    let r = get(addr, &format!("/table?n={n}"));
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"), "{:?}", r.headers);
    let j = json_body(&r);
    assert_eq!(j, serde_json::json!({ "n": n, "list": [1, 2, 3], "nested": { "ok": true } }));
    assert!(!request_id(&r).is_empty());
}

#[test]
fn response_status_headers_and_body() {
    let (_tree, server) = echo_server("");
    let addr = server.addr("http");
    for status in [201u16, 418, 503] {
        let r = get(addr, &format!("/fields?status={status}"));
        assert_eq!(r.status, status);
        assert_eq!(r.header("x-custom"), Some(format!("custom-{status}").as_str()));
        let cookies: Vec<&str> = r.headers.iter().filter(|(n, _)| n == "set-cookie").map(|(_, v)| v.as_str()).collect();
        assert_eq!(cookies, [format!("a={status}"), format!("b={status}")], "a list value sends the header once per item");
        assert_eq!(r.text(), format!("body-{status}"), "response.body is sent when the handler returns nothing");
        assert!(!request_id(&r).is_empty());
    }
}

#[test]
fn keep_alive_serves_several_requests_on_one_connection() {
    let (_tree, server) = echo_server("");
    let addr = server.addr("http");
    let mut s = connect(addr, Duration::from_secs(10));
    let local = s.local_addr().unwrap().to_string();
    let mut ids = Vec::new();
    for i in 0..3 {
        let r = exchange(&mut s, format!("GET /echo?i={i} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes())
            .unwrap_or_else(|e| panic!("request {i} on the kept-alive connection: {e}"));
        assert_eq!(r.status, 200);
        let j = json_body(&r);
        assert_eq!(j["query"]["i"], i.to_string());
        assert_eq!(j["remote_addr"], local, "served on the same connection");
        ids.push(request_id(&r));
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 3, "every request has its own id: {ids:?}");
    // A request asking to close ends the connection after its response.
    let r = exchange(&mut s, b"GET /string?n=1 HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").unwrap();
    assert_eq!(r.status, 200);
    let mut rest = Vec::new();
    let n = s.read_to_end(&mut rest).unwrap_or(0);
    assert_eq!(n, 0, "connection closed after `connection: close`");
}

type H2Result = Result<Vec<(u16, Option<String>, Vec<u8>)>, String>;

/// Sends GETs for every path concurrently on one HTTP/2 prior-knowledge connection.
fn h2_get(addr: SocketAddr, paths: &[String]) -> H2Result {
    use http_body_util::BodyExt;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().map_err(|e| e.to_string())?;
    let paths = paths.to_vec();
    rt.block_on(async move {
        let work = async move {
            let stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
            let (sender, conn) = hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| format!("handshake: {e}"))?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            let mut tasks = Vec::new();
            for p in paths {
                let mut sender = sender.clone();
                let req =
                    hyper::Request::builder().uri(format!("http://{addr}{p}")).body(http_body_util::Empty::<bytes::Bytes>::new()).map_err(|e| e.to_string())?;
                tasks.push(tokio::spawn(async move {
                    let resp = sender.send_request(req).await.map_err(|e| format!("request: {e}"))?;
                    let status = resp.status().as_u16();
                    let id = resp.headers().get("x-request-id").and_then(|v| v.to_str().ok()).map(str::to_string);
                    let body = resp.into_body().collect().await.map_err(|e| format!("body: {e}"))?.to_bytes();
                    Ok::<_, String>((status, id, body.to_vec()))
                }));
            }
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.map_err(|e| e.to_string())??);
            }
            Ok(out)
        };
        tokio::time::timeout(Duration::from_secs(10), work).await.map_err(|_| "timed out".to_string())?
    })
}

#[test]
fn http2_prior_knowledge() {
    let tree = Tree::new();
    tree.write(
        "web/cage.toml",
        "[interfaces.http]\nlisten = \"127.0.0.1:0\"\n\n\
         [interfaces.h1only]\nprotocol = \"http\"\nhandler = \"http.handle\"\nlisten = \"127.0.0.1:0\"\nhttp2 = false\n",
    );
    tree.write("web/http.lua", HTTP_LUA);
    let server = Server::start(&tree.path().join("web"), &[]);
    let paths: Vec<String> = (0..4).map(|i| format!("/echo?stream={i}")).collect();
    let results = h2_get(server.addr("http"), &paths).unwrap_or_else(|e| panic!("HTTP/2 with prior knowledge failed: {e}"));
    assert_eq!(results.len(), paths.len());
    let mut ids = Vec::new();
    for (i, (status, id, body)) in results.iter().enumerate() {
        assert_eq!(*status, 200, "{}", String::from_utf8_lossy(body));
        let j: serde_json::Value = serde_json::from_slice(body).unwrap();
        assert_eq!(j["version"], "HTTP/2.0");
        assert_eq!(j["query"]["stream"], i.to_string(), "each stream gets its own request");
        ids.push(id.clone().expect("x-request-id on HTTP/2 responses"));
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), paths.len());

    // With http2 = false the same client is refused, while HTTP/1.1 still works there.
    let refused = h2_get(server.addr("h1only"), &paths[..1]);
    assert!(refused.as_ref().map(|r| r.iter().all(|(s, _, _)| *s != 200)).unwrap_or(true), "http2 = false still served HTTP/2: {refused:?}");
    let r = get(server.addr("h1only"), "/echo");
    assert_eq!(r.status, 200);
    assert_eq!(json_body(&r)["interface"], "h1only");
}

#[test]
fn handler_error_hides_its_text_and_logs_it_with_the_request_id() {
    let (_tree, mut server) = echo_server("");
    let addr = server.addr("http");
    let tok = token();
    let r = get(addr, &format!("/fail?token={tok}"));
    assert_eq!(r.status, 500);
    let id = request_id(&r);
    let body = r.text();
    assert!(body.contains(&id), "the 500 body names the request id {id}: {body:?}");
    assert!(!body.contains("secret") && !body.contains(&tok), "the error text must not reach the client: {body:?}");
    let line = server
        .wait_for_all(&[&id, &tok], Duration::from_secs(5))
        .unwrap_or_else(|| panic!("no log line with both the id {id} and the error text:\n{}", server.log.join("\n")));
    let at = format!("http.lua:{}", line_of(HTTP_LUA, "secret failure text"));
    assert!(line.contains(&format!("{at}: secret failure text {tok}")), "error text with file:line: {line}");
    assert!(line.contains("stack traceback"), "a traceback in the same line: {line}");
    assert!(line.contains("ERROR"), "{line}");
}

#[test]
fn bad_response_status_is_a_logged_500() {
    let (_tree, mut server) = echo_server("");
    let addr = server.addr("http");
    for v in ["abc", "1000", "42"] {
        let r = get(addr, &format!("/badstatus?v={v}"));
        assert_eq!(r.status, 500, "response.status = {v}");
        let id = request_id(&r);
        assert!(r.text().contains(&id));
        assert!(!r.text().contains("never sent"));
        let line = server
            .wait_for_all(&[&id, "response.status"], Duration::from_secs(5))
            .unwrap_or_else(|| panic!("no log line about response.status = {v} with id {id}:\n{}", server.log.join("\n")));
        assert!(line.contains(v), "the log names the bad value {v}: {line}");
    }
}

/// Bytes of a chunked request body made of `chunks`.
fn chunked(chunks: &[usize]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, n) in chunks.iter().enumerate() {
        out.extend_from_slice(format!("{n:x}\r\n").as_bytes());
        out.extend(std::iter::repeat_n(b'a' + i as u8, *n));
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

#[test]
fn oversized_bodies_get_413() {
    let limit = 1024;
    let (_tree, server) = echo_server(&format!("max_body_size = \"{}KiB\"\n", limit / 1024));
    let addr = server.addr("http");
    let t = Duration::from_secs(10);

    // A body of exactly the limit is accepted, so the limit is neither off by one nor ignored.
    let r = post(addr, "/echo", "text/plain", &vec![b'x'; limit]);
    assert_eq!(r.status, 200);
    assert_eq!(json_body(&r)["body_len"], limit);

    // Declared too large: refused from the header, without waiting for the body.
    let head = format!("POST /echo HTTP/1.1\r\nHost: test\r\nContent-Length: {}\r\n\r\n", limit + 1);
    let r = raw_request(addr, head.as_bytes(), t).expect("413 before the body is sent");
    assert_eq!(r.status, 413);
    assert!(r.text().contains(&request_id(&r)));

    // Chunked under the limit is read whole...
    let mut req = b"POST /echo HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
    req.extend(chunked(&[400, 400]));
    let r = raw_request(addr, &req, t).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(json_body(&r)["body_len"], 800);
    // ...and over it, without any length given, is refused too.
    let mut req = b"POST /echo HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
    req.extend(chunked(&[700, 700]));
    let r = raw_request(addr, &req, t).unwrap();
    assert_eq!(r.status, 413, "{}", r.text());
    assert!(r.text().contains(&request_id(&r)));
}

#[test]
fn oversized_headers_get_431() {
    let (_tree, server) = echo_server("max_header_size = \"8KiB\"\n");
    let addr = server.addr("http");
    let t = Duration::from_secs(10);
    let small = "v".repeat(4096);
    let req = format!("GET /echo HTTP/1.1\r\nHost: test\r\nX-Big: {small}\r\nConnection: close\r\n\r\n");
    let r = raw_request(addr, req.as_bytes(), t).unwrap();
    assert_eq!(r.status, 200, "a 4KiB header is under the 8KiB limit");
    assert_eq!(json_body(&r)["headers"]["x-big"], small);

    let big = "v".repeat(16 * 1024);
    let req = format!("GET /echo HTTP/1.1\r\nHost: test\r\nX-Big: {big}\r\nConnection: close\r\n\r\n");
    let r = raw_request(addr, req.as_bytes(), t).expect("a response to an oversized head");
    assert_eq!(r.status, 431);
    // The server keeps serving.
    assert_eq!(get(addr, "/string?n=2").status, 200);
}

/// Sends `bytes`, then waits for the server to answer or close; returns what happened and when.
fn stall(addr: SocketAddr, bytes: &[u8]) -> (Duration, Result<Option<u16>, String>) {
    use std::io::Write;
    let mut s = connect(addr, Duration::from_secs(5));
    let started = Instant::now();
    if !bytes.is_empty() {
        s.write_all(bytes).unwrap();
    }
    let mut buf = Vec::new();
    let outcome = match s.read_to_end(&mut buf) {
        Ok(_) if buf.is_empty() => Ok(None),
        Ok(_) => Ok(String::from_utf8_lossy(&buf).split_whitespace().nth(1).and_then(|s| s.parse().ok())),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {
            Err(format!("still open after {:?}", started.elapsed()))
        }
        // Reset: closed.
        Err(_) => Ok(None),
    };
    (started.elapsed(), outcome)
}

#[test]
fn slow_client_headers_time_out() {
    let (_tree, server) = echo_server("header_read_timeout = \"300ms\"\n");
    let addr = server.addr("http");
    let (took, outcome) = stall(addr, b"GET /echo HTTP/1.1\r\nHost: test\r\nX-Slow: ");
    println!("unfinished head: closed after {took:?}: {outcome:?}");
    let outcome = outcome.unwrap_or_else(|e| panic!("a client that never finishes its head was not disconnected: {e}"));
    assert!(matches!(outcome, None | Some(408)), "closed or 408, got {outcome:?}");
    assert!(took >= Duration::from_millis(250), "closed before header_read_timeout: {took:?}");
    assert!(took < Duration::from_millis(1500), "header_read_timeout = 300ms took {took:?}");
    assert_eq!(get(addr, "/string?n=3").status, 200, "the server keeps serving");
}

#[test]
fn silent_client_is_disconnected() {
    let (_tree, server) = echo_server("header_read_timeout = \"300ms\"\n");
    let addr = server.addr("http");
    // Nothing at all, and a start of the HTTP/2 preface: both must be bounded like a slow head.
    for (what, bytes) in [("nothing", &b""[..]), ("part of the HTTP/2 preface", &b"PRI * HTTP/2.0\r\n"[..])] {
        let (took, outcome) = stall(addr, bytes);
        println!("{what}: closed after {took:?}: {outcome:?}");
        let outcome = outcome.unwrap_or_else(|e| panic!("a client that sends {what} was not disconnected: {e}"));
        assert!(matches!(outcome, None | Some(408)), "{what}: closed or 408, got {outcome:?}");
        assert!(took >= Duration::from_millis(250), "{what}: closed before header_read_timeout: {took:?}");
        assert!(took < Duration::from_millis(1500), "{what}: header_read_timeout = 300ms took {took:?}");
    }
    assert_eq!(get(addr, "/string?n=4").status, 200, "the server keeps serving");
}

#[test]
fn malformed_requests_get_400_and_the_server_keeps_serving() {
    let (_tree, server) = echo_server("");
    let addr = server.addr("http");
    let t = Duration::from_secs(5);
    let bad: [&[u8]; 4] = [
        b"HELLO WORLD\r\n\r\n",
        b"GET / FOO/1.1\r\nHost: test\r\n\r\n",
        b"GET /\x01\x02 HTTP/1.1\r\nHost: test\r\n\r\n",
        b"GET / HTTP/1.1\r\nBad Header Name: x\r\n\r\n",
    ];
    for (i, req) in bad.iter().enumerate() {
        match raw_request(addr, req, t) {
            Ok(r) => assert_eq!(r.status, 400, "malformed request {i} ({:?})", String::from_utf8_lossy(req)),
            Err(e) => assert_ne!(e.kind(), std::io::ErrorKind::WouldBlock, "malformed request {i}: no answer and not closed"),
        }
        let r = get(addr, &format!("/string?n={i}"));
        assert_eq!(r.status, 200, "after malformed request {i}");
        assert_eq!(r.text(), format!("plain text {i}"));
    }
}

#[test]
fn connections_beyond_max_connections_get_503() {
    let (_tree, server) = echo_server("max_connections = 2\n");
    let addr = server.addr("http");
    let keep = b"GET /string?n=1 HTTP/1.1\r\nHost: test\r\n\r\n";
    let mut c1 = connect(addr, Duration::from_secs(5));
    assert_eq!(exchange(&mut c1, keep).unwrap().status, 200);
    let mut c2 = connect(addr, Duration::from_secs(5));
    assert_eq!(exchange(&mut c2, keep).unwrap().status, 200);

    // Both are open (each has been served); a third is refused at once.
    let mut c3 = connect(addr, Duration::from_secs(5));
    let r = read_response(&mut c3).expect("a 503 on the third connection");
    assert_eq!(r.status, 503);
    assert!(r.text().contains("too many connections"), "{}", r.text());

    // The open ones still work.
    assert_eq!(exchange(&mut c1, keep).unwrap().status, 200);

    // Closing one frees its slot (the server sees the close asynchronously, so retry briefly).
    drop(c2);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = get(addr, "/string?n=5");
        if r.status == 200 {
            break;
        }
        assert_eq!(r.status, 503);
        assert!(Instant::now() < deadline, "the slot of a closed connection was never freed");
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(c1);
}

#[test]
fn two_http_interfaces_with_their_own_handlers() {
    let tree = Tree::new();
    tree.write(
        "web/cage.toml",
        "[interfaces.public]\nprotocol = \"http\"\nlisten = \"127.0.0.1:0\"\nhandler = \"public.handle\"\n\n\
         [interfaces.admin]\nprotocol = \"http\"\nlisten = \"127.0.0.1:0\"\nhandler = \"admin.serve\"\n",
    );
    tree.write(
        "web/public.lua",
        "local M = {}\nfunction M.handle(request)\n  return { who = \"public\", interface = pmnc.request.interface, path = request.path }\nend\nreturn M\n",
    );
    tree.write(
        "web/admin.lua",
        "local M = {}\nfunction M.serve(request, response)\n  response.status = 202\n  return \"admin \" .. pmnc.request.interface .. \" \" .. request.path\nend\nreturn M\n",
    );
    let server = Server::start(&tree.path().join("web"), &[]);
    let (public, admin) = (server.addr("public"), server.addr("admin"));
    assert_ne!(public.port(), admin.port());

    let r = get(public, "/p");
    assert_eq!(r.status, 200);
    assert_eq!(json_body(&r), serde_json::json!({ "who": "public", "interface": "public", "path": "/p" }));
    let r = get(admin, "/a");
    assert_eq!(r.status, 202);
    assert_eq!(r.text(), "admin admin /a");
}

#[test]
fn connections_are_shared_by_every_worker() {
    // Module-level variables are per worker VM, so a counter tells the workers apart: with two
    // workers taking connections in turn, four connections count 1, 1, 2, 2.
    let t = Tree::new();
    t.write("web/cage.toml", &http_cage_toml(""));
    t.write("web/http.lua", "local M = {}\nlocal n = 0\nfunction M.handle() n = n + 1 return tostring(n) end\nreturn M\n");
    let s = Server::start(&t.path().join("web"), &[]);
    let counts: Vec<String> = (0..4).map(|_| get(s.addr("http"), "/").text()).collect();
    assert_eq!(counts, ["1", "1", "2", "2"]);
}
