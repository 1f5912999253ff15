//! HTTPS on the http interface through the real `pmnc` binary: curl over HTTP/1.1 and HTTP/2
//! (ALPN), wss, client certificates (accepted, refused, optional), `request.tls` in Lua,
//! certificate rotation under load, and hostile clients (plain HTTP to the TLS port, a
//! truncated ClientHello, a thousand handshakes that never finish, the handshake cap).
//! Certificates are made in the test with rcgen.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustomnic_resource::testing_tls::shout;

const HTTP_LUA: &str = r#"local M = {}

function M.handle(request, response)
  if request.path == "/tls" then
    local t = request.tls
    if t == nil then return "plain" end
    local p = t.peer or {}
    return pmnc.json.encode({
      version = t.version, cipher = t.cipher, alpn = t.alpn or "", http = request.version,
      subject = p.subject or "", sans = table.concat(p.sans or {}, ","), serial = p.serial or "",
      not_after = p.not_after or "",
    })
  elseif request.path == "/sse" then
    local stream = response.stream("text/event-stream")
    for i = 1, 3 do
      stream.event{ id = i, data = "tick " .. i }
      pmnc.sleep(0.05)
    end
    return
  elseif request.path == "/wait" then
    pmnc.events.wait("never", 50)
    return "waited"
  elseif request.path == "/live" then
    return tostring(pmnc.events.stats().live_requests)
  elseif request.path == "/len" then
    return tostring(#request.body)
  elseif request.path == "/big" then
    return string.rep("0123456789", 100000)
  elseif request.path == "/ws" then
    local ws = request.upgrade()
    while true do
      local data, kind = ws.receive(30)
      if kind == "closed" then return end
      ws.send("echo: " .. data)
    end
  end
  return "hello"
end

return M
"#;

/// A CA that signs certificates for the test.
struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key).expect("CA certificate");
        Ca { pem: cert.pem(), issuer: Issuer::new(params, key) }
    }

    /// A certificate and its key (PEM) for `cn`, with `sans` and `serial`.
    fn sign(&self, cn: &str, sans: Vec<SanType>, serial: &[u8]) -> (String, String) {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.subject_alt_names = sans;
        params.distinguished_name.push(DnType::CommonName, cn);
        params.distinguished_name.push(DnType::OrganizationName, "Rustomnic tests");
        params.serial_number = Some(SerialNumber::from_slice(serial));
        params.not_after = rcgen::date_time_ymd(2031, 1, 2);
        let cert = params.signed_by(&key, &self.issuer).expect("certificate");
        (cert.pem(), key.serialize_pem())
    }

    fn server(&self, serial: &[u8]) -> (String, String) {
        self.sign("localhost", vec![SanType::DnsName("localhost".try_into().unwrap()), SanType::IpAddress([127, 0, 0, 1].into())], serial)
    }
}

fn der_of(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes()).expect("PEM certificate").to_vec()
}

/// A cage folder with the server's pair (cert.pem, key.pem) and the CA (ca.pem) written in it.
fn cage(tls_extra: &str, files: &[(&str, &str)]) -> (Tree, Server, SocketAddr) {
    let tree = Tree::new();
    for (name, text) in files {
        tree.write(&format!("c/{name}"), text);
    }
    tree.write(
        "c/cage.toml",
        &format!("[interfaces.http]\nlisten = \"127.0.0.1:0\"\n\n[interfaces.https]\nprotocol = \"http\"\nlisten = \"127.0.0.1:0\"\ntls = {{ cert = \"cert.pem\", key = \"key.pem\"{tls_extra} }}\n"),
    );
    tree.write("c/http.lua", HTTP_LUA);
    tree.write("c/https.lua", HTTP_LUA);
    let server = Server::start_with_workers(&tree.path().join("c"), 2, &[]);
    let addr = server.addr("https");
    (tree, server, addr)
}

fn client_config(ca_pem: &str, client: Option<(&str, &str)>, alpn: &[&str]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.expect("CA PEM")).expect("CA");
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots);
    let mut config = match client {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(cert.as_bytes()).expect("cert")],
                PrivateKeyDer::from_pem_slice(key.as_bytes()).expect("key"),
            )
            .expect("client auth"),
    };
    config.alpn_protocols = alpn.iter().map(|a| a.as_bytes().to_vec()).collect();
    Arc::new(config)
}

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// A finished TLS connection to `addr` as "localhost".
fn tls_connect(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> std::io::Result<Tls> {
    let tcp = TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    let conn = rustls::ClientConnection::new(config, ServerName::try_from("localhost").expect("name")).map_err(std::io::Error::other)?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock)?;
    }
    Ok(tls)
}

/// One keep-alive GET on an open TLS connection: (status, body).
fn tls_get(tls: &mut Tls, path: &str) -> std::io::Result<(u16, String)> {
    tls.write_all(format!("GET {path} HTTP/1.1\r\nhost: localhost\r\n\r\n").as_bytes())?;
    tls.flush()?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if tls.read(&mut byte)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_string();
    let status = head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let len: usize = head.lines().find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap_or(0))).unwrap_or(0);
    let mut body = vec![0u8; len];
    tls.read_exact(&mut body)?;
    Ok((status, String::from_utf8_lossy(&body).to_string()))
}

/// curl, or None (said loudly) when the machine has none.
fn curl() -> Option<&'static str> {
    if Command::new("curl").arg("--version").output().is_ok_and(|o| o.status.success()) {
        Some("curl")
    } else {
        shout("SKIPPED: curl is not installed (apt-get install -y curl); the curl parts of this test did not run");
        None
    }
}

/// Runs curl against https://localhost:PORT/PATH: (exit code, stdout, stderr).
fn run_curl(addr: SocketAddr, path: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "--resolve", &format!("localhost:{}:127.0.0.1", addr.port())])
        .args(args)
        .arg(format!("https://localhost:{}{path}", addr.port()))
        .output()
        .expect("run curl");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).to_string(), String::from_utf8_lossy(&out.stderr).to_string())
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

#[test]
fn curl_over_http1_and_http2_and_request_tls() {
    let ca = Ca::new("Rustomnic test CA");
    let (cert, key) = ca.server(&[1]);
    let (tree, server, addr) = cage("", &[("cert.pem", &cert), ("key.pem", &key)]);
    let ca_file = tree.write("ca.pem", &ca.pem);
    let ca_arg = ca_file.display().to_string();
    // The plain interface of the same cage: request.tls is nil.
    assert_eq!(get(server.addr("http"), "/tls").text(), "plain");
    // Our own client first: TLS 1.3, no ALPN offered, HTTP/1.1.
    let mut tls = tls_connect(addr, client_config(&ca.pem, None, &[])).expect("TLS connection");
    let (status, body) = tls_get(&mut tls, "/tls").expect("request over TLS");
    assert_eq!(status, 200, "{body}");
    let v = json(&body);
    assert_eq!(v["version"], "TLSv1.3");
    assert!(v["cipher"].as_str().unwrap_or("").starts_with("TLS13_"), "{v}");
    assert_eq!(v["alpn"], "");
    assert_eq!(v["subject"], "", "no client certificate was asked for");
    // Keep-alive: a second request on the same connection.
    assert_eq!(tls_get(&mut tls, "/").expect("second request").1, "hello");
    let Some(_) = curl() else { return };
    let (code, out, err) = run_curl(addr, "/tls", &["--cacert", &ca_arg, "--http1.1"]);
    assert_eq!(code, 0, "curl --http1.1 failed: {err}");
    let v = json(&out);
    assert_eq!((v["alpn"].as_str(), v["http"].as_str()), (Some("http/1.1"), Some("HTTP/1.1")), "{v}");
    let (code, out, err) = run_curl(addr, "/tls", &["--cacert", &ca_arg, "--http2"]);
    assert_eq!(code, 0, "curl --http2 failed: {err}");
    let v = json(&out);
    assert_eq!((v["alpn"].as_str(), v["http"].as_str()), (Some("h2"), Some("HTTP/2.0")), "{v}");
    // TLS 1.2 works as well (tls12 is compiled in).
    let (code, out, err) = run_curl(addr, "/tls", &["--cacert", &ca_arg, "--tls-max", "1.2"]);
    assert_eq!(code, 0, "curl --tls-max 1.2 failed: {err}");
    assert_eq!(json(&out)["version"], "TLSv1.2");
    // A streamed response (server-sent events) over TLS, on HTTP/1.1 and on HTTP/2.
    for proto in ["--http1.1", "--http2"] {
        let (code, out, err) = run_curl(addr, "/sse", &["--cacert", &ca_arg, proto, "-N"]);
        assert_eq!(code, 0, "curl {proto} /sse failed: {err}");
        assert_eq!(out.matches("data: tick").count(), 3, "{out}");
    }
    // A body of 1 MB, larger than TLS records and socket buffers, arrives whole.
    let (code, out, err) = run_curl(addr, "/big", &["--cacert", &ca_arg, "--http1.1"]);
    assert_eq!((code, out.len()), (0, 1_000_000), "{err}");
    // A request body of 900 kB (many TLS records) is read whole, chunked too.
    let upload = tree.write("upload.bin", &"u".repeat(900_000)).display().to_string();
    for extra in [&[][..], &["-H", "transfer-encoding: chunked"][..]] {
        let mut args = vec!["--cacert", &ca_arg, "--http1.1", "--data-binary"];
        let at = format!("@{upload}");
        args.push(&at);
        args.extend_from_slice(extra);
        let (code, out, err) = run_curl(addr, "/len", &args);
        assert_eq!((code, out.as_str()), (0, "900000"), "{err}");
    }
    // Without the CA, curl refuses the certificate: the server is not trusted by accident.
    let (code, _, _) = run_curl(addr, "/", &[]);
    assert_ne!(code, 0, "curl trusted a certificate of a private CA");
}

#[test]
fn http2_off_offers_only_http1() {
    let Some(_) = curl() else { return };
    let ca = Ca::new("Rustomnic test CA");
    let (cert, key) = ca.server(&[2]);
    let tree = Tree::new();
    tree.write("c/cert.pem", &cert);
    tree.write("c/key.pem", &key);
    let ca_file = tree.write("ca.pem", &ca.pem);
    tree.write("c/cage.toml", "[interfaces.http]\nlisten = \"127.0.0.1:0\"\nhttp2 = false\ntls = { cert = \"cert.pem\", key = \"key.pem\" }\n");
    tree.write("c/http.lua", HTTP_LUA);
    let server = Server::start_with_workers(&tree.path().join("c"), 1, &[]);
    let (code, out, err) = run_curl(server.addr("http"), "/tls", &["--cacert", &ca_file.display().to_string(), "--http2"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(json(&out)["alpn"], "http/1.1");
}

#[test]
fn websocket_over_tls() {
    let ca = Ca::new("Rustomnic test CA");
    let (cert, key) = ca.server(&[3]);
    let (_tree, _server, addr) = cage("", &[("cert.pem", &cert), ("key.pem", &key)]);
    let tls = tls_connect(addr, client_config(&ca.pem, None, &["http/1.1"])).expect("TLS connection");
    let (mut ws, response) = tungstenite::client(format!("wss://localhost:{}/ws", addr.port()), tls).expect("WebSocket handshake over TLS");
    assert_eq!(response.status(), 101);
    for text in ["one", "two", &"x".repeat(70_000)] {
        ws.send(tungstenite::Message::text(text)).expect("send");
        match ws.read().expect("read") {
            tungstenite::Message::Text(t) => assert_eq!(t.as_str(), format!("echo: {text}")),
            other => panic!("unexpected {other:?}"),
        }
    }
    ws.close(None).expect("close");
}

#[test]
fn client_certificates() {
    let ca = Ca::new("Rustomnic test CA");
    let clients = Ca::new("Rustomnic client CA");
    let strangers = Ca::new("Rustomnic stranger CA");
    let (cert, key) = ca.server(&[4]);
    let alice = clients.sign(
        "alice",
        vec![
            SanType::DnsName("alice.example".try_into().unwrap()),
            SanType::Rfc822Name("alice@example.com".try_into().unwrap()),
            SanType::IpAddress([10, 1, 2, 3].into()),
        ],
        &[0x0a, 0xbc, 0xde],
    );
    let mallory = strangers.sign("alice", vec![SanType::DnsName("alice.example".try_into().unwrap())], &[7]);
    let files = [("cert.pem", cert.as_str()), ("key.pem", key.as_str()), ("clients.pem", clients.pem.as_str())];
    let (_tree, mut server, addr) = cage(", client_ca = \"clients.pem\"", &files);
    let mut tls = tls_connect(addr, client_config(&ca.pem, Some((&alice.0, &alice.1)), &[])).expect("a client certificate of client_ca is accepted");
    let (status, body) = tls_get(&mut tls, "/tls").expect("request");
    assert_eq!(status, 200, "{body}");
    let v = json(&body);
    assert_eq!(v["subject"], "CN=alice, O=Rustomnic tests");
    assert_eq!(v["sans"], "DNS:alice.example,email:alice@example.com,IP:10.1.2.3");
    assert_eq!(v["serial"], "0ABCDE");
    assert_eq!(v["not_after"], "2031-01-02T00:00:00Z");
    // The same name from another CA is refused, and so is a client with no certificate.
    let refused = tls_connect(addr, client_config(&ca.pem, Some((&mallory.0, &mallory.1)), &[])).and_then(|mut t| tls_get(&mut t, "/tls"));
    assert!(refused.is_err(), "a certificate of another CA was accepted: {refused:?}");
    assert!(
        server.wait_for("TLS handshake with 127.0.0.1", Duration::from_secs(5)).is_some_and(|l| l.contains("failed")),
        "no log line for the refused certificate: {:?}",
        server.log
    );
    let anonymous = tls_connect(addr, client_config(&ca.pem, None, &[])).and_then(|mut t| tls_get(&mut t, "/tls"));
    assert!(anonymous.is_err(), "a client without a certificate was served: {anonymous:?}");
    if curl().is_some() {
        let dir = _tree.path();
        let write = |name: &str, text: &str| {
            let p = dir.join(name);
            std::fs::write(&p, text).expect("write");
            p.display().to_string()
        };
        let (ca_f, alice_c, alice_k, mallory_c, mallory_k) = (
            write("ca.pem", &ca.pem),
            write("alice.pem", &alice.0),
            write("alice.key", &alice.1),
            write("mallory.pem", &mallory.0),
            write("mallory.key", &mallory.1),
        );
        let (code, out, err) = run_curl(addr, "/tls", &["--cacert", &ca_f, "--cert", &alice_c, "--key", &alice_k]);
        assert_eq!(code, 0, "{err}");
        assert_eq!(json(&out)["subject"], "CN=alice, O=Rustomnic tests");
        let (code, out, _) = run_curl(addr, "/tls", &["--cacert", &ca_f, "--cert", &mallory_c, "--key", &mallory_k]);
        assert_ne!(code, 0, "curl with a certificate of another CA got {out}");
    }
}

#[test]
fn optional_client_certificates() {
    let ca = Ca::new("Rustomnic test CA");
    let clients = Ca::new("Rustomnic client CA");
    let (cert, key) = ca.server(&[5]);
    let bob = clients.sign("bob", vec![], &[9]);
    let files = [("cert.pem", cert.as_str()), ("key.pem", key.as_str()), ("clients.pem", clients.pem.as_str())];
    let (_tree, _server, addr) = cage(", client_ca = \"clients.pem\", client_auth = \"optional\"", &files);
    let mut anonymous = tls_connect(addr, client_config(&ca.pem, None, &[])).expect("no certificate is fine when optional");
    let v = json(&tls_get(&mut anonymous, "/tls").expect("request").1);
    assert_eq!(v["subject"], "", "peer must be absent without a client certificate: {v}");
    let mut known = tls_connect(addr, client_config(&ca.pem, Some((&bob.0, &bob.1)), &[])).expect("with a certificate");
    let v = json(&tls_get(&mut known, "/tls").expect("request").1);
    assert_eq!((v["subject"].as_str(), v["sans"].as_str(), v["serial"].as_str()), (Some("CN=bob, O=Rustomnic tests"), Some(""), Some("09")));
}

#[test]
fn plain_http_and_broken_handshakes() {
    let ca = Ca::new("Rustomnic test CA");
    let (cert, key) = ca.server(&[6]);
    let (_tree, mut server, addr) = cage(", handshake_timeout = \"1s\"", &[("cert.pem", &cert), ("key.pem", &key)]);
    // Plain HTTP to the TLS port: a readable 400, then the connection is closed.
    let r = raw_request(addr, b"GET / HTTP/1.1\r\nhost: x\r\n\r\n", Duration::from_secs(5)).expect("an answer to plain HTTP");
    assert_eq!(r.status, 400);
    assert!(r.text().contains("speaks HTTPS"), "{}", r.text());
    assert!(server.wait_for("plain HTTP sent to a TLS port", Duration::from_secs(5)).is_some(), "{:?}", server.log);
    // A truncated ClientHello (the record says 512 bytes, 20 come) from a client that then
    // waits: closed after handshake_timeout.
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03, 1, 2, 3, 4, 5, 6, 7, 8, 9]).expect("write");
    let started = Instant::now();
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "the server answered a truncated ClientHello with {n} bytes");
    assert!(started.elapsed() < Duration::from_secs(8), "not closed by handshake_timeout (1s)");
    // Garbage that is not TLS, and a truncated ClientHello whose client goes away.
    let mut s = TcpStream::connect(addr).expect("connect");
    s.write_all(&[0x00, 0xff, 0x13]).expect("write");
    drop(s);
    let mut s = TcpStream::connect(addr).expect("connect");
    s.write_all(&[0x16, 0x03, 0x01, 0x00, 0x05, 0x01]).expect("write");
    drop(s);
    // Failures are logged (at most once per second, so wait for the next line after a second).
    assert!(server.wait_for_new("TLS handshake with", Duration::from_secs(5)).is_some(), "{:?}", server.log);
    // And the interface still serves.
    let mut tls = tls_connect(addr, client_config(&ca.pem, None, &[])).expect("TLS after the bad clients");
    assert_eq!(tls_get(&mut tls, "/").expect("request").1, "hello");
}

/// Raises this process's open-file limit to its hard limit (a thousand sockets are held).
fn raise_nofile() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit read and write the struct given, nothing else.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

#[test]
fn a_thousand_unfinished_handshakes_do_not_stall_requests() {
    raise_nofile();
    let ca = Ca::new("Rustomnic test CA");
    let (cert, key) = ca.server(&[7]);
    let (_tree, _server, addr) = cage(", handshake_timeout = \"30s\"", &[("cert.pem", &cert), ("key.pem", &key)]);
    let config = client_config(&ca.pem, None, &[]);
    let mut idle = Vec::with_capacity(1000);
    for i in 0..1000 {
        let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connection {i}: {e}"));
        // Half of them start a ClientHello and stop; the other half send nothing.
        if i % 2 == 0 {
            s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]).expect("write");
        }
        idle.push(s);
    }
    let started = Instant::now();
    for i in 0..50 {
        let mut tls = tls_connect(addr, config.clone()).unwrap_or_else(|e| panic!("request {i} with 1000 handshakes pending: {e}"));
        let (status, body) = tls_get(&mut tls, "/").unwrap_or_else(|e| panic!("request {i}: {e}"));
        assert_eq!((status, body.as_str()), (200, "hello"));
    }
    // Well within the handshake timeout: the requests did not wait for the idle ones to time out.
    assert!(started.elapsed() < Duration::from_secs(25), "50 requests took {:?}", started.elapsed());
    // The idle ones are still open (their 30 s have not passed): nothing was dropped wholesale.
    let mut s = idle.pop().expect("one");
    s.set_read_timeout(Some(Duration::from_millis(200))).expect("timeout");
    let mut b = [0u8; 1];
    assert!(matches!(s.read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut));
}

#[test]
fn handshakes_beyond_the_cap_are_closed_at_once() {
    let ca = Ca::new("Rustomnic test CA");
    let (cert, key) = ca.server(&[8]);
    // The held handshakes must not time out while the test polls on a loaded machine.
    let (_tree, mut server, addr) = cage(", max_handshakes = 3, handshake_timeout = \"300s\"", &[("cert.pem", &cert), ("key.pem", &key)]);
    let held: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(addr).expect("connect")).collect();
    // The server counts a handshake from its accept; poll until a fourth is turned away.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(3))).expect("timeout");
        let mut b = [0u8; 1];
        if matches!(s.read(&mut b), Ok(0)) {
            break;
        }
        assert!(Instant::now() < deadline, "a fourth handshake was never refused with max_handshakes = 3");
    }
    assert!(server.wait_for("max_handshakes = 3", Duration::from_secs(5)).is_some(), "{:?}", server.log);
    drop(held);
    // Once they are gone, handshakes are taken again.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match tls_connect(addr, client_config(&ca.pem, None, &[])).and_then(|mut t| tls_get(&mut t, "/")) {
            Ok((200, _)) => break,
            other => assert!(Instant::now() < deadline, "no handshake after the held ones closed: {other:?}"),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Replaces `path` as a certificate tool does: a new file renamed over the old one.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

/// The DER of the certificate a new connection is shown.
fn served_cert(addr: SocketAddr, config: &Arc<rustls::ClientConfig>) -> Option<Vec<u8>> {
    let tls = tls_connect(addr, config.clone()).ok()?;
    tls.conn.peer_certificates().and_then(|c| c.first()).map(|c| c.to_vec())
}

#[test]
fn rotation_under_load() {
    let ca = Ca::new("Rustomnic test CA");
    let (cert_a, key_a) = ca.server(&[0x0a]);
    let (cert_b, key_b) = ca.server(&[0x0b]);
    let (tree, mut server, addr) = cage("", &[("cert.pem", &cert_a), ("key.pem", &key_a)]);
    let dir = tree.path().join("c");
    let config = client_config(&ca.pem, None, &[]);
    assert_eq!(served_cert(addr, &config), Some(der_of(&cert_a)));
    // A keep-alive connection made before the change must keep working after it.
    let mut kept = tls_connect(addr, config.clone()).expect("connection");
    assert_eq!(tls_get(&mut kept, "/").expect("request").1, "hello");
    // Load: new connections, one request each, from two threads.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(std::sync::Mutex::new(Vec::new()));
    let load: Vec<_> = (0..2)
        .map(|_| {
            let (stop, done, failed, config) = (stop.clone(), done.clone(), failed.clone(), config.clone());
            std::thread::spawn(move || {
                let started = Instant::now();
                while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(60) {
                    match tls_connect(addr, config.clone()).and_then(|mut t| tls_get(&mut t, "/")) {
                        Ok((200, _)) => {
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        other => failed.lock().unwrap().push(format!("{other:?}")),
                    }
                }
            })
        })
        .collect();
    while done.load(Ordering::Relaxed) < 20 {
        std::thread::sleep(Duration::from_millis(10));
    }
    // The key first, then the certificate: in between the pair does not match, and the old
    // one must stay in use.
    replace(&dir.join("key.pem"), &key_b);
    replace(&dir.join("cert.pem"), &cert_b);
    let deadline = Instant::now() + Duration::from_secs(15);
    while served_cert(addr, &config) != Some(der_of(&cert_b)) {
        assert!(Instant::now() < deadline, "the new certificate was not used within 15 s: {:?}", server.log);
        std::thread::sleep(Duration::from_millis(100));
    }
    let before = done.load(Ordering::Relaxed);
    while done.load(Ordering::Relaxed) < before + 20 {
        std::thread::sleep(Duration::from_millis(10));
    }
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.join().expect("load thread");
    }
    let failed = failed.lock().unwrap();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed during the rotation: {:?}",
        failed.len(),
        done.load(Ordering::Relaxed) + failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(server.wait_for("TLS certificate reloaded", Duration::from_secs(5)).is_some_and(|l| l.contains("serial 0B")), "{:?}", server.log);
    assert_eq!(tls_get(&mut kept, "/").expect("the connection made before the change").1, "hello");

    // A broken certificate file: the pair in use stays, and the file is named once.
    replace(&dir.join("cert.pem"), "-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n");
    let line = server.wait_for("keeping the previous TLS certificate", Duration::from_secs(10)).expect("a line about the broken file");
    assert!(line.contains("cert.pem"), "{line}");
    assert_eq!(served_cert(addr, &config), Some(der_of(&cert_b)));
    // A key that does not belong to the certificate: named too.
    replace(&dir.join("cert.pem"), &cert_b);
    replace(&dir.join("key.pem"), &key_a);
    let line = server.wait_for_new("keeping the previous TLS certificate", Duration::from_secs(10)).expect("a line about the mismatched key");
    assert!(line.contains("key.pem") && line.contains("does not belong"), "{line}");
    assert_eq!(served_cert(addr, &config), Some(der_of(&cert_b)));
    // Said once: nothing more while the files stay as they are.
    assert!(server.wait_for_new("keeping the previous TLS certificate", Duration::from_secs(3)).is_none(), "logged again though nothing changed");
}

#[test]
fn check_reports_bad_tls_files() {
    let ca = Ca::new("Rustomnic test CA");
    let (cert, _) = ca.server(&[1]);
    let (_, other_key) = ca.server(&[2]);
    let tree = Tree::new();
    tree.write("c/cert.pem", &cert);
    tree.write("c/key.pem", &other_key);
    tree.write("c/http.lua", HTTP_LUA);
    tree.write("c/cage.toml", "[interfaces.http]\nlisten = \"127.0.0.1:0\"\ntls = { cert = \"cert.pem\", key = \"key.pem\", client_auth = \"maybe\" }\n");
    let dir = tree.path().join("c").display().to_string();
    let out = pmnc(&["check", &dir]);
    let text = format!("{}{}", out.stdout, out.stderr);
    assert_ne!(out.code, Some(0), "{text}");
    assert!(text.contains("does not belong to the certificate"), "{text}");
    assert!(text.contains("client_auth"), "{text}");
    tree.write("c/cage.toml", "[interfaces.http]\nlisten = \"127.0.0.1:0\"\ntls = { cert = \"missing.pem\", key = \"key.pem\" }\n");
    let out = pmnc(&["check", &dir]);
    let text = format!("{}{}", out.stdout, out.stderr);
    assert_ne!(out.code, Some(0), "{text}");
    assert!(text.contains("missing.pem"), "{text}");
}

#[test]
fn monitor_page_over_https() {
    let ca = Ca::new("Rustomnic test CA");
    let (cert, key) = ca.server(&[0x4d]);
    let tree = Tree::new();
    tree.write("c/cert.pem", &cert);
    tree.write("c/key.pem", &key);
    tree.write("c/http.lua", HTTP_LUA);
    tree.write(
        "c/cage.toml",
        "[interfaces.http]\nlisten = \"127.0.0.1:0\"\n\n[monitor]\nlisten = \"127.0.0.1:0\"\ntls = { cert = \"cert.pem\", key = \"key.pem\" }\n",
    );
    let mut server = Server::start_with_workers(&tree.path().join("c"), 1, &[]);
    let line = server.wait_for("monitor page at https://", Duration::from_secs(10)).expect("the monitor's address");
    let addr: SocketAddr =
        line.split("https://").nth(1).and_then(|r| r.split('/').next()).and_then(|a| a.parse().ok()).unwrap_or_else(|| panic!("no address in {line}"));
    let mut tls = tls_connect(addr, client_config(&ca.pem, None, &["http/1.1"])).expect("TLS to the monitor");
    assert_eq!(tls.conn.alpn_protocol(), Some(&b"http/1.1"[..]), "the monitor speaks HTTP/1.1 only");
    let (status, body) = tls_get(&mut tls, "/status").expect("GET /status over TLS");
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["monitor"], format!("https://{addr}/"));
    // Plain HTTP gets the readable refusal, not the page.
    let r = raw_request(addr, b"GET /status HTTP/1.1\r\nhost: x\r\n\r\n", Duration::from_secs(5)).expect("an answer to plain HTTP");
    assert_eq!(r.status, 400);
    // A handshake that never finishes does not block the next client (each has its own task).
    let _stalled = TcpStream::connect(addr).expect("connect");
    let mut tls = tls_connect(addr, client_config(&ca.pem, None, &[])).expect("TLS beside a stalled client");
    assert_eq!(tls_get(&mut tls, "/status").expect("GET").0, 200);
}

#[test]
fn tls_connections_beyond_max_connections_are_closed() {
    let ca = Ca::new("Rustomnic test CA");
    let (cert, key) = ca.server(&[0x0c]);
    let tree = Tree::new();
    tree.write("c/cert.pem", &cert);
    tree.write("c/key.pem", &key);
    tree.write("c/http.lua", HTTP_LUA);
    tree.write("c/cage.toml", "[interfaces.http]\nlisten = \"127.0.0.1:0\"\nmax_connections = 2\ntls = { cert = \"cert.pem\", key = \"key.pem\" }\n");
    let mut server = Server::start_with_workers(&tree.path().join("c"), 1, &[]);
    let addr = server.addr("http");
    let config = client_config(&ca.pem, None, &[]);
    let mut held: Vec<Tls> = (0..2).map(|_| tls_connect(addr, config.clone()).expect("within max_connections")).collect();
    for t in &mut held {
        assert_eq!(tls_get(t, "/").expect("request").1, "hello");
    }
    // The third gets no clear-text 503 (it could not read one): it is closed.
    let third = tls_connect(addr, config.clone()).and_then(|mut t| tls_get(&mut t, "/"));
    assert!(third.is_err(), "a connection beyond max_connections was served: {third:?}");
    assert!(server.wait_for("max_connections = 2", Duration::from_secs(5)).is_some(), "{:?}", server.log);
    // The held ones still work.
    assert_eq!(tls_get(&mut held[0], "/").expect("request on a held connection").1, "hello");
}

/// Takes in what the server sent after the handshake (its session tickets), so that closing the
/// socket sends FIN and not RST (a socket closed with unread bytes is reset).
fn read_pending(tls: &mut Tls) {
    tls.sock.set_read_timeout(Some(Duration::from_millis(200))).expect("timeout");
    while tls.conn.read_tls(&mut tls.sock).is_ok_and(|n| n > 0) {
        tls.conn.process_new_packets().expect("tickets");
    }
    tls.sock.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
}

#[test]
fn a_tls_client_that_leaves_stops_its_handler() {
    let ca = Ca::new("Rustomnic test CA");
    let (cert, key) = ca.server(&[0x0d]);
    let tree = Tree::new();
    tree.write("c/cert.pem", &cert);
    tree.write("c/key.pem", &key);
    tree.write("c/http.lua", HTTP_LUA);
    // The handler's deadline is far away: only the client's leaving can end it within 5 s.
    tree.write("c/cage.toml", "request_timeout = \"60s\"\n\n[interfaces.http]\nlisten = \"127.0.0.1:0\"\ntls = { cert = \"cert.pem\", key = \"key.pem\" }\n");
    // One worker: live_requests is counted per worker VM.
    let server = Server::start_with_workers(&tree.path().join("c"), 1, &[]);
    let addr = server.addr("http");
    let config = client_config(&ca.pem, None, &[]);
    let live = || {
        let mut t = tls_connect(addr, config.clone()).expect("connection");
        tls_get(&mut t, "/live").expect("/live").1
    };
    assert_eq!(live(), "1");
    // Leaving with close_notify (as curl and rustls do) and then FIN.
    let mut parked = tls_connect(addr, config.clone()).expect("connection");
    read_pending(&mut parked);
    parked.write_all(b"GET /wait HTTP/1.1\r\nhost: localhost\r\n\r\n").expect("request");
    parked.flush().expect("flush");
    let deadline = Instant::now() + Duration::from_secs(10);
    while live() != "2" {
        assert!(Instant::now() < deadline, "the /wait request never parked");
        std::thread::sleep(Duration::from_millis(20));
    }
    parked.conn.send_close_notify();
    parked.flush().expect("close_notify");
    drop(parked);
    let deadline = Instant::now() + Duration::from_secs(5);
    while live() != "1" {
        assert!(Instant::now() < deadline, "the handler of a client that left (close_notify) still runs");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Leaving without close_notify (FIN only).
    let mut parked = tls_connect(addr, config.clone()).expect("connection");
    read_pending(&mut parked);
    parked.write_all(b"GET /wait HTTP/1.1\r\nhost: localhost\r\n\r\n").expect("request");
    parked.flush().expect("flush");
    let deadline = Instant::now() + Duration::from_secs(10);
    while live() != "2" {
        assert!(Instant::now() < deadline, "the /wait request never parked");
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(parked);
    let deadline = Instant::now() + Duration::from_secs(5);
    while live() != "1" {
        assert!(Instant::now() < deadline, "the handler of a client that left (FIN) still runs");
        std::thread::sleep(Duration::from_millis(20));
    }
}
