//! The http resource against a small hyper server started by each test on 127.0.0.1:0, which
//! echoes method, path, query, headers and body as JSON, and has routes for a status, a big
//! body (with and without content-length) and a slow answer.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper::{Request, Response};
use rustomnic_core::Value;
use rustomnic_resource::testing::{configure, run_lua};
use rustomnic_resource::ResourceConfig;
use rustomnic_resource_http::Http;

/// A body sent in chunks without a content-length (so HTTP/1.1 uses chunked encoding).
struct Chunks(Vec<Bytes>);

impl Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.0.is_empty() {
            Poll::Ready(None)
        } else {
            Poll::Ready(Some(Ok(Frame::data(self.0.remove(0)))))
        }
    }
}

type Reply = Response<http_body_util::combinators::BoxBody<Bytes, Infallible>>;

async fn handle(req: Request<Incoming>) -> Result<Reply, Infallible> {
    let path = req.uri().path().to_string();
    let full = |status: u16, body: Vec<u8>| -> Reply {
        let mut r = Response::new(Full::new(Bytes::from(body)).boxed());
        *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
        r
    };
    if let Some(code) = path.strip_prefix("/api/status/") {
        let mut r = full(code.parse().unwrap(), format!("status {code}").into_bytes());
        r.headers_mut().append("x-repeat", "one".parse().unwrap());
        r.headers_mut().append("x-repeat", "two".parse().unwrap());
        return Ok(r);
    }
    if let Some(n) = path.strip_prefix("/api/big/") {
        return Ok(full(200, vec![b'x'; n.parse().unwrap()]));
    }
    if let Some(n) = path.strip_prefix("/api/chunked/") {
        let n: usize = n.parse().unwrap();
        let chunks = (0..n.div_ceil(100)).map(|i| Bytes::from(vec![b'y'; 100.min(n - i * 100)])).collect();
        return Ok(Response::new(Chunks(chunks).boxed()));
    }
    if path == "/api/slow" {
        tokio::time::sleep(Duration::from_secs(2)).await;
        return Ok(full(200, b"late".to_vec()));
    }
    let method = req.method().to_string();
    let version = format!("{:?}", req.version());
    let query = req.uri().query().unwrap_or("").to_string();
    let mut headers = serde_json::Map::new();
    for (k, v) in req.headers() {
        let joined = match headers.get(k.as_str()) {
            Some(serde_json::Value::String(prev)) => format!("{prev}, {}", v.to_str().unwrap()),
            _ => v.to_str().unwrap().to_string(),
        };
        headers.insert(k.to_string(), serde_json::Value::String(joined));
    }
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let echo = serde_json::json!({
        "method": method, "version": version, "path": path, "query": query, "headers": headers,
        "body": String::from_utf8_lossy(&body),
    });
    let mut r = full(200, echo.to_string().into_bytes());
    r.headers_mut().insert("content-type", "application/json".parse().unwrap());
    Ok(r)
}

/// Starts the server on its own thread; returns its address and a count of accepted connections.
fn server() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, hyper::service::service_fn(handle)).await;
                });
            }
        });
    });
    (addr, accepted)
}

fn api(addr: SocketAddr, extra: &str) -> ResourceConfig {
    configure(&Http, "api", &format!("url = \"http://{addr}/api/\"\n{extra}")).unwrap()
}

fn run(api: ResourceConfig, lua: &str) -> Vec<Value> {
    let source = format!("return {{ f = function()\n{lua}\nend }}");
    run_lua(vec![api], &source, "f", vec![], Duration::from_secs(10)).unwrap()
}

fn echo(response: &Value) -> serde_json::Value {
    assert_eq!(response.get("status"), Some(&Value::Int(200)), "{response:?}");
    serde_json::from_slice(match response.get("body") {
        Some(Value::Str(b)) => b,
        other => panic!("no body: {other:?}"),
    })
    .unwrap()
}

#[test]
fn get_with_query_and_headers() {
    let (addr, _) = server();
    let api = api(addr, "headers = { X-Default = \"d\", X-Override = \"base\" }\n");
    let r = run(
        api,
        r#"return pmnc.transaction.api.get("/echo/x", {
             query = { a = "1 2&", b = { "x", "y" } },
             headers = { ["X-Override"] = "call", ["x-num"] = 5 } })"#,
    );
    let e = echo(&r[0]);
    assert_eq!(e["method"], "GET");
    assert_eq!(e["path"], "/api/echo/x");
    // Map order follows Lua's table order, so both orders are accepted.
    let q = e["query"].as_str().unwrap();
    assert!(q == "a=1%202%26&b=x&b=y" || q == "b=x&b=y&a=1%202%26", "{q}");
    assert_eq!(e["headers"]["x-default"], "d");
    assert_eq!(e["headers"]["x-override"], "call", "a call's header replaces the default");
    assert_eq!(e["headers"]["x-num"], "5");
    assert!(e["headers"]["user-agent"].as_str().unwrap().starts_with("rustomnic/"));
    assert_eq!(r[0].get("headers").and_then(|h| h.get("content-type")), Some(&Value::str("application/json")));
}

#[test]
fn default_headers_as_a_table_or_as_lines() {
    let (addr, _) = server();
    std::env::set_var("RUSTOMNIC_HTTP_TEST_HEADER_TOKEN", "t0k");
    let forms = [
        // A table of its own, with ${NAME} expanded in its values.
        "\n[resources.api.headers]\nAuthorization = \"Bearer ${RUSTOMNIC_HTTP_TEST_HEADER_TOKEN}\"\nX-Trace = \"1\"\n\"user-agent\" = \"mine/2\"\n",
        // The same inline.
        "headers = { Authorization = \"Bearer ${RUSTOMNIC_HTTP_TEST_HEADER_TOKEN}\", X-Trace = \"1\", user-agent = \"mine/2\" }\n",
        // The older multi-line string of lines.
        "headers = \"\"\"\nAuthorization: Bearer ${RUSTOMNIC_HTTP_TEST_HEADER_TOKEN}\nX-Trace: 1\nuser-agent: mine/2\n\"\"\"\n",
    ];
    for extra in forms {
        let r = run(api(addr, extra), r#"return pmnc.transaction.api.get("/echo")"#);
        let e = echo(&r[0]);
        assert_eq!(e["headers"]["authorization"], "Bearer t0k", "{extra}");
        assert_eq!(e["headers"]["x-trace"], "1", "{extra}");
        assert_eq!(e["headers"]["user-agent"], "mine/2", "a default user-agent replaces rustomnic's: {extra}");
    }
}

#[test]
fn post_put_patch_delete_and_head() {
    let (addr, _) = server();
    let r = run(
        api(addr, ""),
        r#"local xa = pmnc.transaction.create()
           xa.api.post("items", { name = "n", list = { 1, 2 } })
           xa.api.put("/items/1", "raw text", { headers = { ["content-type"] = "text/plain" } })
           xa.api.patch("/items/1?x=1", "p", { query = { y = 2 } })
           xa.api.delete("/items/1")
           xa.api.head("/items/1")
           xa.api.request("propfind", "/dav")
           xa.api.get("/login?next=https://example.com/x")
           return xa.execute()"#,
    );
    let post = echo(&r[0]);
    assert_eq!(post["method"], "POST");
    assert_eq!(post["path"], "/api/items");
    assert_eq!(post["headers"]["content-type"], "application/json");
    let sent: serde_json::Value = serde_json::from_str(post["body"].as_str().unwrap()).unwrap();
    assert_eq!(sent, serde_json::json!({"name": "n", "list": [1, 2]}));
    let put = echo(&r[1]);
    assert_eq!((put["method"].as_str(), put["body"].as_str(), put["headers"]["content-type"].as_str()), (Some("PUT"), Some("raw text"), Some("text/plain")));
    let patch = echo(&r[2]);
    assert_eq!((patch["method"].as_str(), patch["query"].as_str()), (Some("PATCH"), Some("x=1&y=2")));
    assert_eq!(echo(&r[3])["method"], "DELETE");
    assert_eq!(r[4].get("status"), Some(&Value::Int(200)));
    assert_eq!(r[4].get("body"), Some(&Value::str("")), "HEAD has no body");
    assert_eq!(echo(&r[5])["method"], "PROPFIND");
    assert_eq!(echo(&r[6])["query"], "next=https://example.com/x", "a URL in the query is not refused");
}

#[test]
fn an_error_status_is_a_result() {
    let (addr, _) = server();
    let r = run(api(addr, ""), r#"local res = pmnc.transaction.api.get("/status/404") return res.status, res.body, res.headers["x-repeat"]"#);
    assert_eq!(r, vec![Value::Int(404), Value::str("status 404"), Value::str("one, two")]);
}

#[test]
fn calls_reuse_a_kept_alive_connection() {
    let (addr, accepted) = server();
    run(api(addr, "pool_size = 1\n"), r#"for i = 1, 5 do pmnc.transaction.api.get("/echo") end"#);
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}

#[test]
fn connection_refused_is_a_clear_error() {
    let api = configure(&Http, "api", "url = \"http://127.0.0.1:1\"\n").unwrap();
    let r = run(api, r#"local ok, e = pcall(pmnc.transaction.api.get, "/x", { query = { secret = "s" } }) return ok, tostring(e), e.recoverable"#);
    assert_eq!(r[0], Value::Bool(false));
    assert_eq!(
        r[1],
        Value::str("resource api (participant 1): GET http://127.0.0.1:1/x: cannot connect: tcp connect error: Connection refused (os error 111)")
    );
    assert_eq!(r[2], Value::Bool(true));
}

#[test]
fn a_body_over_max_body_size_is_an_error() {
    let (addr, _) = server();
    let r = run(
        api(addr, "max_body_size = \"1KiB\"\n"),
        r#"local c = pmnc.transaction.api
           local ok1, e1 = pcall(c.get, "/big/1025")
           local ok2, e2 = pcall(c.get, "/chunked/1500")
           return #c.get("/big/1024").body, e1.message, e2.message, #c.get("/chunked/1024").body"#,
    );
    assert_eq!(r[0], Value::Int(1024));
    assert_eq!(r[1], Value::str(format!("GET http://{addr}/api/big/1025: the response body is over max_body_size (1024 bytes)")));
    assert_eq!(r[2], Value::str(format!("GET http://{addr}/api/chunked/1500: the response body is over max_body_size (1024 bytes)")));
    assert_eq!(r[3], Value::Int(1024));
}

#[test]
fn the_timeout_key_bounds_a_call() {
    let (addr, _) = server();
    let started = std::time::Instant::now();
    let r = run(api(addr, "timeout = \"300ms\"\n"), r#"local ok, e = pcall(pmnc.transaction.api.get, "/slow") return e.message"#);
    assert_eq!(r[0], Value::str(format!("GET http://{addr}/api/slow: no complete response within the timeout of 300ms")));
    assert!(started.elapsed() < Duration::from_millis(1500));
}

/// A private CA and a certificate for localhost signed by it, made with the openssl tool, or
/// None (after a loud message) without it. Returns (folder, CA file).
fn certificates() -> Option<(tempfile::TempDir, std::path::PathBuf)> {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("leaf.ext"), "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n")
        .unwrap();
    let steps: [&[&str]; 3] = [
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=rustomnic test CA",
        ],
        &["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", "leaf.key", "-out", "leaf.csr", "-subj", "/CN=localhost"],
        &["x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out", "leaf.pem", "-days", "2", "-extfile", "leaf.ext"],
    ];
    for args in steps {
        let ok = std::process::Command::new("openssl").args(args).current_dir(d).stderr(std::process::Stdio::null()).status().is_ok_and(|s| s.success());
        if !ok {
            skipped("\n*** SKIPPED: the openssl tool is needed to make test certificates (apt-get install -y openssl)\n");
            return None;
        }
    }
    let ca = d.join("ca.pem");
    Some((dir, ca))
}

/// An HTTPS server (HTTP/1.1 and HTTP/2 by ALPN) with the certificate for localhost.
fn tls_server(dir: &Path) -> SocketAddr {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain = vec![CertificateDer::from_pem_file(dir.join("leaf.pem")).unwrap()];
    let key = PrivateKeyDer::from_pem_file(dir.join("leaf.key")).unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(stream).await else { return };
                    let io = hyper_util::rt::TokioIo::new(tls);
                    let _ = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(io, hyper::service::service_fn(handle))
                        .await;
                });
            }
        });
    });
    addr
}

#[test]
fn https_with_a_private_ca_speaks_http2() {
    let Some((dir, ca)) = certificates() else { return };
    let addr = tls_server(dir.path());
    let url = format!("https://localhost:{}/api", addr.port());
    let trusted = configure(&Http, "api", &format!("url = \"{url}\"\ntls_ca_file = \"{}\"\n", ca.display())).unwrap();
    let r = run(trusted, r#"return pmnc.transaction.api.post("/echo", { a = 1 })"#);
    let e = echo(&r[0]);
    assert_eq!(e["version"], "HTTP/2.0", "ALPN chose h2");
    assert_eq!(e["body"], "{\"a\":1}");
    // Without the CA the server's certificate is not trusted.
    let untrusted = configure(&Http, "api", &format!("url = \"{url}\"\n")).unwrap();
    let r = run(untrusted, r#"local ok, e = pcall(pmnc.transaction.api.get, "/echo") return e.message"#);
    let m = r[0].as_str().unwrap();
    assert!(m.starts_with(&format!("GET {url}/echo: cannot connect: ")), "{m}");
    assert!(m.contains("invalid peer certificate: UnknownIssuer"), "{m}");
}

#[test]
fn bad_calls_are_refused_before_sending() {
    let (addr, accepted) = server();
    let r = run(
        api(addr, ""),
        r#"local c = pmnc.transaction.api
           local out = {}
           for i, f in ipairs({
             function() return c.fetch("/") end,
             function() return c.get("http://elsewhere.example/") end,
             function() return c.get("/", { hedaers = {} }) end,
             function() return c.post("/", true) end,
             function() return c.get("/", { headers = { ["bad name"] = "x" } }) end,
             function() return c.get("/a b") end,
           }) do
             local ok, e = pcall(f)
             out[i] = e.message
           end
           return out"#,
    );
    let Value::Array(m) = &r[0] else { panic!("{r:?}") };
    let m: Vec<&str> = m.iter().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(m[0], "no method fetch (methods: get, head, delete, options, post, put, patch, request)");
    assert_eq!(m[1], "GET http://elsewhere.example/: the path must be relative to the resource's url");
    assert_eq!(m[2], "get: unknown option hedaers (options: headers, query)");
    assert!(m[3].ends_with("the body must be a string or a table (sent as JSON), got boolean"), "{m:?}");
    assert_eq!(m[4], "\"bad name\" is not a header name");
    assert_eq!(m[5], "GET /a b: not a valid URL path (percent-encode spaces and other special characters)");
    assert_eq!(accepted.load(Ordering::SeqCst), 0, "nothing was sent");
}

#[test]
fn config_problems_name_the_key() {
    let missing = configure(&Http, "api", "timeout = \"1s\"\n").unwrap_err();
    assert!(missing[0].contains("resources.api: url is required"), "{missing:?}");
    let scheme = configure(&Http, "api", "url = \"ftp://h/\"\n").unwrap_err();
    assert_eq!(scheme, ["cage.toml:2: resources.api.url: the scheme must be http or https, not ftp"]);
    let query = configure(&Http, "api", "url = \"http://h/?a=1\"\n").unwrap_err();
    assert!(query[0].contains("the base URL cannot have a query"), "{query:?}");
    let headers = configure(&Http, "api", "url = \"http://h\"\nheaders = \"X-A: 1\\nnonsense\"\n").unwrap_err();
    assert_eq!(headers, ["cage.toml:3: resources.api.headers: line 2 is not \"Name: value\": \"nonsense\""]);
    let ca = configure(&Http, "api", "url = \"http://h\"\ntls_ca_file = \"/nonexistent/ca.pem\"\n").unwrap_err();
    assert!(ca[0].starts_with("cage.toml:3: resources.api.tls_ca_file: cannot read /nonexistent/ca.pem: "), "{ca:?}");
    let table = configure(&Http, "api", "url = \"http://h\"\nheaders = { a = \"1\", b = 2 }\n").unwrap_err();
    assert_eq!(table, ["cage.toml:3: resources.api.headers.b: expected a string, found integer"]);
    let table = configure(&Http, "api", "url = \"http://h\"\n[resources.api.headers]\nok = \"1\"\n\"bad name\" = \"x\"\nX-Value = \"a\\nb\"\n").unwrap_err();
    assert_eq!(
        table,
        [
            "cage.toml:5: resources.api.headers.bad name: is not a valid header name",
            "cage.toml:6: resources.api.headers.X-Value: is not a valid header value (no line breaks or other control characters)",
        ]
    );
    let other = configure(&Http, "api", "url = \"http://h\"\nheaders = [\"X-A: 1\"]\n").unwrap_err();
    assert_eq!(other, ["cage.toml:3: resources.api.headers: expected a table of strings, found array"]);
    let size = configure(&Http, "api", "url = \"http://h\"\nmax_body_size = \"2GiB\"\nbogus = 1\n").unwrap_err();
    assert_eq!(size.len(), 2, "{size:?}");
    assert!(size[0].starts_with("cage.toml:3: resources.api.max_body_size:"), "{size:?}");
    assert!(size[1].starts_with("cage.toml:4: resources.api.bogus: unknown key"), "{size:?}");
    std::env::set_var("RUSTOMNIC_HTTP_TEST_TOKEN", "t0k");
    assert!(configure(&Http, "api", "url = \"https://h/v1\"\nheaders = \"Authorization: Bearer ${RUSTOMNIC_HTTP_TEST_TOKEN}\"\n").is_ok());
    assert!(configure(&Http, "api", "url = \"https://h/v1\"\nheaders = { Authorization = \"Bearer ${RUSTOMNIC_HTTP_TEST_TOKEN}\" }\n").is_ok());
    let unset = configure(&Http, "api", "url = \"https://h/v1\"\nheaders = { Authorization = \"Bearer ${RUSTOMNIC_SURELY_UNSET_VAR}\" }\n").unwrap_err();
    assert_eq!(unset, ["cage.toml:3: resources.api.headers.Authorization: environment variable RUSTOMNIC_SURELY_UNSET_VAR is not set"]);
}

/// Says loudly that a test did not run: written to the process's stderr directly, which the test
/// harness does not capture, so it shows in a plain `cargo test`.
fn skipped(message: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{message}");
}

/// Issue 22 #9: a request whose method is not safe (POST, PUT, PATCH, DELETE) may have acted
/// on the server and nothing undoes it, so a transaction that then fails is not recoverable;
/// after a GET it still is.
#[test]
fn a_failure_after_an_unsafe_request_is_not_recoverable() {
    let (addr, _) = server();
    let r = run(
        api(addr, ""),
        r#"local function outcome(build)
             local xa = pmnc.transaction.create()
             build(xa)
             local ok, e = pcall(xa.execute)
             return tostring(e.recoverable)
           end
           return outcome(function(xa) xa.api.post("/echo", "x") xa.api.get(42) end),
                  outcome(function(xa) xa.api.get("/echo") xa.api.get(42) end)"#,
    );
    assert_eq!(r, vec![Value::str("false"), Value::str("true")]);
}
