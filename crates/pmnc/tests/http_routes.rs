//! Route tables, parsed bodies, the access log and status-code figures of the http interface,
//! through the real binary.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;

const ROUTES: &str = r#"
local M = {}
M.routes = {
  ["GET /orders/{id}"] = function(request, response)
    return { id = request.params.id, route = request.route }
  end,
  ["POST /orders"] = function(request, response)
    response.status = 201
    response.json = { created = request.json.item, count = #request.json.lines }
  end,
  ["GET /files/{*path}"] = function(request) return request.params.path end,
  ["POST /form"] = function(request) return { name = request.form.name, n = request.form.n } end,
  ["GET /fail"] = function(request, response) response.status = 503 return "down" end,
  ["GET /caught"] = function(request)
    local ok, err = pcall(function() return request.json end)
    return ok and "parsed" or ("caught: " .. tostring(err):match("request%.json: [^\n]*"))
  end,
  ["* /any"] = function(request) return request.method end,
  ["POST /upload"] = function(request)
    local files = {}
    for _, f in ipairs(request.files) do
      local data = f.read()
      files[#files + 1] = { field = f.field, filename = f.filename, content_type = f.content_type, size = f.size,
        read = #data, head = { data:byte(1, 4) }, tail = { data:byte(-4, -1) }, path = f.path }
    end
    return { title = request.form.title, note = request.form.note, files = files }
  end,
  ["GET /"] = function(request) return "root " .. tostring(next(request.params)) end,
}
function M.plain(request) return "plain " .. tostring(request.route) .. " " .. tostring(next(request.params)) end
return M
"#;

fn header<'a>(r: &'a Response, name: &str) -> Option<&'a str> {
    r.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
}

fn request(addr: SocketAddr, method: &str, path: &str, content_type: &str, body: &[u8]) -> Response {
    let mut req =
        format!("{method} {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n\r\n", body.len())
            .into_bytes();
    req.extend_from_slice(body);
    raw_request(addr, &req, Duration::from_secs(30)).unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

fn routes_cage(extra: &str) -> (Tree, Server, SocketAddr) {
    start_http_cage(&http_cage_toml(&format!("handler = \"http.routes\"\n{extra}")), ROUTES, 2)
}

#[test]
fn routes_take_parameters_and_answer_404_and_405() {
    let (_t, _s, addr) = routes_cage("");
    let r = get(addr, "/orders/42");
    assert_eq!(r.status, 200, "{}", r.text());
    let v = json_body(&r);
    assert_eq!(v["id"], "42");
    assert_eq!(v["route"], "GET /orders/{id}");
    // Parameters are percent-decoded; a trailing slash matches the same route.
    assert_eq!(json_body(&get(addr, "/orders/a%20b/"))["id"], "a b");
    assert_eq!(get(addr, "/files/a/b%2Fc.txt").text(), "a/b/c.txt");
    assert_eq!(get(addr, "/").text(), "root nil");
    assert_eq!(request(addr, "PATCH", "/any", "text/plain", b"").text(), "PATCH");

    let r = get(addr, "/orders");
    assert_eq!(r.status, 405, "{}", r.text());
    assert_eq!(header(&r, "allow"), Some("POST"));
    let r = request(addr, "DELETE", "/orders/1", "text/plain", b"");
    assert_eq!(r.status, 405);
    assert_eq!(header(&r, "allow"), Some("GET, HEAD"));
    let r = get(addr, "/nothing/here");
    assert_eq!(r.status, 404);
    assert!(r.text().contains("no route for GET /nothing/here"), "{}", r.text());
    // HEAD takes the GET route and gets no body.
    let r = raw_request(addr, b"HEAD /orders/7 HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n", Duration::from_secs(10)).unwrap();
    assert_eq!(r.status, 200);
    assert!(r.body.is_empty());
    // A path of thousands of segments is simply not found.
    let deep = "/x".repeat(3000);
    assert_eq!(get(addr, &deep).status, 404);
}

#[test]
fn json_and_form_bodies_are_parsed_and_bad_ones_answer_400() {
    let (_t, _s, addr) = routes_cage("");
    let r = request(addr, "POST", "/orders", "application/json", br#"{"item": "tea", "lines": [1, 2, 3]}"#);
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(header(&r, "content-type"), Some("application/json"));
    let v = json_body(&r);
    assert_eq!(v["created"], "tea");
    assert_eq!(v["count"], 3);

    let r = request(addr, "POST", "/orders", "application/json", b"{\"item\": tea}");
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("request.json:") && r.text().contains("column"), "{}", r.text());
    // Caught by the handler, it is an ordinary error.
    let r = request(addr, "GET", "/caught", "application/json", b"[1,");
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().starts_with("caught: request.json: "), "{}", r.text());

    let r = request(addr, "POST", "/form", "application/x-www-form-urlencoded", b"name=J%C3%BCrgen+X&n=5&n=6");
    assert_eq!(r.status, 200, "{}", r.text());
    let v = json_body(&r);
    assert_eq!(v["name"], "Jürgen X");
    assert_eq!(v["n"], "6");
    let r = request(addr, "POST", "/form", "application/json", b"{}");
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("request.form: the body is application/json"), "{}", r.text());
}

#[test]
fn a_handler_function_still_works_and_sees_no_route() {
    let (_t, _s, addr) = start_http_cage(&http_cage_toml("handler = \"http.plain\"\n"), ROUTES, 1);
    assert_eq!(get(addr, "/anything").text(), "plain nil nil");
}

#[test]
fn routes_reload_with_their_module() {
    let (t, _s, addr) = routes_cage("");
    assert_eq!(get(addr, "/new").status, 404);
    t.write("c/http.lua", &ROUTES.replace("M.routes = {", "M.routes = {\n  [\"GET /new\"] = function() return \"new route\" end,"));
    let r = get_until(addr, "/new", "new route", Duration::from_secs(20));
    assert_eq!(r.status, 200);
    assert_eq!(json_body(&get(addr, "/orders/1"))["id"], "1");
}

#[test]
fn a_bad_route_table_is_refused_at_load_naming_its_file_and_key() {
    let bad = "local M = {}\nM.routes = { [\"GET /x/{id}\"] = function() end, [\"GET /x/{name}\"] = function() end }\nreturn M\n";
    // At start (and by pmnc check): the cage does not start, and the problem names the file.
    let tree = Tree::new();
    tree.write("c/cage.toml", &http_cage_toml("handler = \"http.routes\"\n"));
    tree.write("c/http.lua", bad);
    let out = pmnc(&["check", &tree.path().join("c").display().to_string()]);
    assert_ne!(out.code, Some(0));
    let text = format!("{}{}", out.stderr, out.stdout);
    assert!(text.contains("c/http.lua") && text.contains("route table http.routes") && text.contains("another route names it"), "{text}");
    // Saved over a working version: the new version is broken, and the old routes keep serving.
    let (t, mut s, addr) = routes_cage("");
    assert_eq!(json_body(&get(addr, "/orders/7"))["id"], "7");
    t.write("c/http.lua", &ROUTES.replace("M.routes = {", "M.routes = {\n  [\"GET orders\"] = function() end,"));
    let line = s.wait_for("route table http.routes", Duration::from_secs(20)).expect("a log line naming the route table");
    assert!(line.contains("http.lua") && line.contains("must start with /"), "{line}");
    assert_eq!(json_body(&get(addr, "/orders/8"))["id"], "8", "the working version still serves");
}

#[test]
fn responses_are_counted_by_route_and_status_class_and_5xx_are_errors() {
    let (_t, mut s, addr) = routes_cage("\n[monitor]\nlisten = \"127.0.0.1:0\"\n");
    let monitor = monitor_addr(&mut s);
    for _ in 0..3 {
        assert_eq!(get(addr, "/orders/1").status, 200);
    }
    assert_eq!(get(addr, "/fail").status, 503);
    assert_eq!(get(addr, "/fail").status, 503);
    assert_eq!(get(addr, "/missing").status, 404);
    let want = [
        ("pmnc_http_responses_total{cage=\"c\",interface=\"http\",route=\"GET /orders/{id}\",class=\"2xx\"}", 3.0),
        ("pmnc_http_responses_total{cage=\"c\",interface=\"http\",route=\"GET /fail\",class=\"5xx\"}", 2.0),
        ("pmnc_http_responses_total{cage=\"c\",interface=\"http\",route=\"\",class=\"4xx\"}", 1.0),
        ("pmnc_request_errors_total{cage=\"c\",interface=\"http\"}", 2.0),
        ("pmnc_requests_total{cage=\"c\",interface=\"http\"}", 6.0),
    ];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = get(monitor, "/metrics").text();
        if want.iter().all(|(k, v)| sample(&text, k) == Some(*v)) {
            break;
        }
        assert!(Instant::now() < deadline, "figures not as expected {want:?} in:\n{text}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_access_log_writes_a_line_per_request_in_either_format_or_none() {
    let tree = Tree::new();
    tree.write(
        "c/cage.toml",
        "[interfaces.http]\nlisten = \"127.0.0.1:0\"\nhandler = \"http.routes\"\n\n\
         [interfaces.quiet]\nprotocol = \"http\"\nlisten = \"127.0.0.1:0\"\nhandler = \"http.routes\"\naccess_log = \"off\"\n\n\
         [interfaces.api]\nprotocol = \"http\"\nlisten = \"127.0.0.1:0\"\nhandler = \"http.routes\"\naccess_log = \"json\"\n",
    );
    tree.write("c/http.lua", ROUTES);
    // One worker: the lines of all three interfaces go through one batch, in request order.
    let mut s = Server::start_with_workers(&tree.path().join("c"), 1, &[]);
    let (http, quiet, api) = (s.addr("http"), s.addr("quiet"), s.addr("api"));
    let req = b"GET /orders/5?x=1 HTTP/1.1\r\nhost: t\r\nuser-agent: test \"agent\"\r\nreferer: http://r/\r\nconnection: close\r\n\r\n";
    let r = raw_request(http, req, Duration::from_secs(10)).unwrap();
    let id = request_id(&r);
    let line = s.wait_for(&id, Duration::from_secs(10)).expect("an access log line with the request id");
    assert!(line.starts_with("127.0.0.1 - - ["), "{line}");
    assert!(line.contains(&format!("\"GET /orders/5?x=1 HTTP/1.1\" 200 {} \"http://r/\" \"test \\\"agent\\\"\"", r.body.len())), "{line}");
    assert!(line.contains(&format!("c/http {id}")), "{line}");

    let quiet_id = request_id(&get(quiet, "/orders/6"));
    let r = get(api, "/missing");
    let api_id = request_id(&r);
    let line = s.wait_for(&api_id, Duration::from_secs(10)).expect("a JSON access log line");
    let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    assert_eq!(v["status"], 404);
    assert_eq!(v["interface"], "api");
    assert_eq!(v["target"], "/missing");
    assert!(v["duration_ms"].as_f64().is_some(), "{line}");
    // The quiet interface's request came before, on the same worker: had it been logged, its
    // line would be here already.
    assert!(!s.log.iter().any(|l| l.contains(&quiet_id)), "access_log = \"off\" logged:\n{}", s.log.join("\n"));
}

#[test]
fn a_bad_access_log_setting_is_refused_with_its_key() {
    let tree = Tree::new();
    tree.write("c/cage.toml", &http_cage_toml("access_log = \"verbose\"\n"));
    tree.write("c/http.lua", "local M = {}\nfunction M.handle() return 'x' end\nreturn M\n");
    let out = pmnc_limited(&["check", &tree.path().join("c").display().to_string()], Duration::from_secs(20));
    assert_eq!(out.code, Some(1), "{}{}", out.stdout, out.stderr);
    assert!(out.stderr.contains("access_log") && out.stderr.contains("\"combined\", \"json\" or \"off\""), "{}", out.stderr);
}

/// `curl ARGS...` to completion; None (with a loud message) when curl is not installed.
fn curl(args: &[&str]) -> Option<std::process::Output> {
    match std::process::Command::new("curl").args(args).output() {
        Ok(out) => Some(out),
        Err(e) => {
            eprintln!("SKIPPED: curl is not installed ({e}); install it with: apt-get install -y curl");
            None
        }
    }
}

#[test]
fn multipart_uploads_stream_to_files_that_go_with_the_request() {
    let (t, _s, addr) = routes_cage("max_body_size = \"64KiB\"\nmax_upload_size = \"8MiB\"\n");
    // 5 MB of varied bytes (every byte value, CRLFs and dashes included).
    let big: Vec<u8> = (0..5_000_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let file = t.write("big.bin", "");
    std::fs::write(&file, &big).unwrap();
    let url = format!("http://{addr}/upload");
    for http in ["--http1.1", "--http2-prior-knowledge"] {
        let Some(out) = curl(&["-sS", http, "-F", "title=Hello upload", "-F", &format!("file=@{};type=application/x-test", file.display()), &url]) else {
            return;
        };
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
        assert_eq!(v["title"], "Hello upload", "{v}");
        let f = &v["files"][0];
        assert_eq!(f["field"], "file");
        assert_eq!(f["filename"], "big.bin");
        assert_eq!(f["content_type"], "application/x-test");
        assert_eq!(f["size"], 5_000_000);
        assert_eq!(f["read"], 5_000_000);
        assert_eq!(f["head"], serde_json::json!(big[..4]));
        assert_eq!(f["tail"], serde_json::json!(big[big.len() - 4..]));
        let path = f["path"].as_str().unwrap();
        // Answered means the request ended: its file is gone.
        assert!(!std::path::Path::new(path).exists(), "{path} is still there");
    }
    // The same in bytes: a raw multipart body, cut where a boundary could start.
    let body = b"--B0undary\r\ncontent-disposition: form-data; name=\"note\"\r\n\r\nline1\r\n--B0und\r\n--B0undary\r\ncontent-disposition: form-data; name=\"doc\"; filename=\"d.txt\"\r\n\r\n\r\n--B0undary--\r\n";
    let r = request(addr, "POST", "/upload", "multipart/form-data; boundary=B0undary", body);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = json_body(&r);
    assert_eq!(v["note"], "line1\r\n--B0und");
    assert_eq!(v["files"][0]["size"], 0);
    assert_eq!(v["files"][0]["filename"], "d.txt");
}

#[test]
fn multipart_limits_and_malformed_bodies_are_refused() {
    let (_t, _s, addr) = routes_cage("max_body_size = \"1KiB\"\nmax_upload_size = \"64KiB\"\n");
    let part = |name: &str, file: bool, data: &[u8]| {
        let mut p = format!("--b\r\ncontent-disposition: form-data; name=\"{name}\"{}\r\n\r\n", if file { "; filename=\"x\"" } else { "" }).into_bytes();
        p.extend_from_slice(data);
        p.extend_from_slice(b"\r\n");
        p
    };
    let mut over_upload = part("f", true, &vec![b'x'; 70 << 10]);
    over_upload.extend_from_slice(b"--b--\r\n");
    let r = request(addr, "POST", "/upload", "multipart/form-data; boundary=b", &over_upload);
    assert_eq!(r.status, 413, "{}", r.text());
    assert!(r.text().contains("max_upload_size"), "{}", r.text());

    let mut over_fields = part("a", false, &vec![b'y'; 2 << 10]);
    over_fields.extend_from_slice(b"--b--\r\n");
    let r = request(addr, "POST", "/upload", "multipart/form-data; boundary=b", &over_fields);
    assert_eq!(r.status, 413, "{}", r.text());
    assert!(r.text().contains("max_body_size"), "{}", r.text());

    // A body without its closing boundary, and one without a name.
    let r = request(addr, "POST", "/upload", "multipart/form-data; boundary=b", &part("a", false, b"v"));
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("closing boundary"), "{}", r.text());
    let r = request(addr, "POST", "/upload", "multipart/form-data; boundary=b", b"--b\r\ncontent-disposition: form-data\r\n\r\nv\r\n--b--");
    assert_eq!(r.status, 400, "{}", r.text());
    let r = request(addr, "POST", "/upload", "multipart/form-data", b"--b--");
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("boundary"), "{}", r.text());
    // Chunked framing is read the same way.
    let mut chunked =
        b"POST /upload HTTP/1.1\r\nhost: t\r\nconnection: close\r\ncontent-type: multipart/form-data; boundary=b\r\ntransfer-encoding: chunked\r\n\r\n"
            .to_vec();
    let mut body = part("note", false, b"chunked ok");
    body.extend_from_slice(b"--b--\r\n");
    for piece in body.chunks(7) {
        chunked.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        chunked.extend_from_slice(piece);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let r = raw_request(addr, &chunked, Duration::from_secs(10)).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(json_body(&r)["note"], "chunked ok");
}

/// A log reader that stops reading (a full pipe on standard output, a stalled collector) must not
/// stop requests: the worker hands its lines to the writer thread, which is the one that waits;
/// when its queue is full, lines are dropped and that is said on standard error.
#[test]
fn a_stalled_reader_of_the_access_log_does_not_stop_requests() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let tree = Tree::new();
    tree.write("c/cage.toml", &http_cage_toml(""));
    tree.write("c/http.lua", "local M = {}\nfunction M.handle(request, response) return \"ok\" end\nreturn M\n");
    let mut child = Command::new(pmnc_bin())
        .args(["run", &tree.path().join("c").display().to_string(), "--workers", "1", "--no-watch"])
        .env("RUST_LOG", "")
        // Standard output is a pipe nobody reads: it is full after 64 KiB.
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start pmnc");
    // Killed however the test ends (a failed assertion too).
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let stderr = child.stderr.take().unwrap();
    let _stdout = child.stdout.take();
    let _child = Kill(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut log = Vec::new();
    let addr: SocketAddr = loop {
        let line = rx.recv_timeout(Duration::from_secs(30)).expect("pmnc says where it listens");
        log.push(line.clone());
        if let Some(rest) = line.split("listening on ").nth(1) {
            break rest.split_whitespace().next().unwrap().parse().unwrap();
        }
    };
    // 6,000 requests whose lines carry a 1,000-byte user agent: some 6 MB of log, far past the
    // pipe and past the writer's queue.
    let agent = "a".repeat(1000);
    let request = format!("GET / HTTP/1.1\r\nhost: x\r\nuser-agent: {agent}\r\n\r\n");
    let mut s = connect(addr, Duration::from_secs(10));
    for i in 0..6000 {
        let r = exchange(&mut s, request.as_bytes()).unwrap_or_else(|e| panic!("request {i} not answered: {e}"));
        assert_eq!((r.status, r.text()), (200, "ok".to_string()), "request {i}");
    }
    let said = (|| loop {
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(line) if line.contains("line(s) dropped") => return Some(line),
            Ok(line) => log.push(line),
            Err(_) => return None,
        }
    })();
    assert!(said.is_some(), "no word of dropped lines on stderr:\n{}", log.join("\n"));
}
