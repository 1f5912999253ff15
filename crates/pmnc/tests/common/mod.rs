//! Shared harness of the integration tests: temporary cage folders, the real `pmnc` binary
//! started on them, its log read line by line, and a small HTTP/1.1 client.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub mod nats;

/// The binary under test; PMNC_TEST_BIN runs the tests against another build (to show that a
/// test fails on the code before a fix).
pub fn pmnc_bin() -> String {
    std::env::var("PMNC_TEST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_pmnc").to_string())
}

/// A temporary folder to lay cages out in.
pub struct Tree {
    pub dir: tempfile::TempDir,
}

impl Tree {
    pub fn new() -> Tree {
        Tree { dir: tempfile::tempdir().expect("temp dir") }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes `text` to `rel` (creating folders), returns the full path.
    pub fn write(&self, rel: &str, text: &str) -> PathBuf {
        let p = self.dir.path().join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, text).unwrap();
        p
    }

    /// Writes via a temporary file and a rename, as editors and deploy tools do.
    pub fn write_rename(&self, rel: &str, text: &str) {
        let p = self.dir.path().join(rel);
        let tmp = p.with_file_name(format!(".{}.tmp", p.file_name().unwrap().to_string_lossy()));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &p).unwrap();
    }
}

/// Output of a finished `pmnc` command.
pub struct Output {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `pmnc ARGS` to completion (bounded by 60 s).
pub fn pmnc(args: &[&str]) -> Output {
    let mut child = Command::new(pmnc_bin()).args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("start pmnc");
    let mut out = String::new();
    let mut err = String::new();
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let t = std::thread::spawn(move || {
        let mut e = String::new();
        let _ = se.read_to_string(&mut e);
        e
    });
    let _ = so.read_to_string(&mut out);
    err.push_str(&t.join().unwrap());
    let status = child.wait().unwrap();
    Output { code: status.code(), stdout: out, stderr: err }
}

/// A running `pmnc run`; killed when dropped.
pub struct Server {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    pub log: Vec<String>,
    /// "cage/interface" -> bound address, from the "listening on" lines.
    pub addrs: Vec<(String, String, SocketAddr)>,
}

impl Server {
    /// Starts `pmnc run PATH EXTRA...` and waits until it says it is running.
    pub fn start(path: &Path, extra: &[&str]) -> Server {
        Self::try_start(path, extra).unwrap_or_else(|log| panic!("pmnc did not start:\n{log}"))
    }

    /// Like `start`, but returns the log when the process exits before it is running.
    pub fn try_start(path: &Path, extra: &[&str]) -> Result<Server, String> {
        Self::try_start_with_workers(path, 2, extra)
    }

    /// Starts `pmnc run PATH --workers N EXTRA...`; the log when it exits before it is running.
    pub fn try_start_with_workers(path: &Path, workers: usize, extra: &[&str]) -> Result<Server, String> {
        Self::try_start_env(path, workers, extra, &[])
    }

    /// Like `try_start_with_workers`, with extra environment variables.
    pub fn try_start_env(path: &Path, workers: usize, extra: &[&str], env: &[(&str, &str)]) -> Result<Server, String> {
        let mut args = vec!["run".to_string(), path.display().to_string(), "--workers".into(), workers.to_string()];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut child = Command::new(pmnc_bin())
            .args(&args)
            .envs(env.iter().copied())
            .env("RUST_LOG", "")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start pmnc");
        let (tx, rx) = mpsc::channel();
        for out in [Box::new(child.stderr.take().unwrap()) as Box<dyn Read + Send>, Box::new(child.stdout.take().unwrap())] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        // Only the readers hold senders now, so a process that exits ends the waits at once.
        drop(tx);
        let mut s = Server { child, lines: rx, log: Vec::new(), addrs: Vec::new() };
        match s.wait_for("running ", Duration::from_secs(30)) {
            Some(_) => Ok(s),
            None => {
                let _ = s.child.kill();
                let _ = s.child.wait();
                s.drain(Duration::from_millis(300));
                Err(s.log.join("\n"))
            }
        }
    }

    fn take(&mut self, line: String) {
        if let Some(pos) = line.find("listening on ") {
            let rest = &line[pos + "listening on ".len()..];
            let addr = rest.split_whitespace().next().unwrap_or("");
            let field = |name: &str| line.split_whitespace().find_map(|w| w.strip_prefix(&format!("{name}="))).unwrap_or("").to_string();
            if let Ok(a) = addr.parse() {
                self.addrs.push((field("cage"), field("interface"), a));
            }
        }
        self.log.push(line);
    }

    /// Waits for a log line containing `pattern`; returns it.
    pub fn wait_for(&mut self, pattern: &str, timeout: Duration) -> Option<String> {
        if let Some(l) = self.log.iter().find(|l| l.contains(pattern)) {
            return Some(l.clone());
        }
        self.wait_for_new(pattern, timeout)
    }

    /// Waits for a log line containing `pattern` that arrives after this call.
    pub fn wait_for_new(&mut self, pattern: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let hit = line.contains(pattern);
                    self.take(line.clone());
                    if hit {
                        return Some(line);
                    }
                }
                Err(_) => return None,
            }
        }
    }

    /// Reads whatever log lines arrive within `d`.
    pub fn drain(&mut self, d: Duration) {
        let deadline = Instant::now() + d;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) => self.take(line),
                Err(_) => break,
            }
        }
    }

    /// Address of the interface `interface` (of any cage when only one has that name).
    pub fn addr(&self, interface: &str) -> SocketAddr {
        self.addrs.iter().find(|(_, i, _)| i == interface).map(|(_, _, a)| *a).unwrap_or_else(|| panic!("no interface {interface} in {:?}", self.addrs))
    }

    /// Sends SIGTERM and waits for the exit code (bounded by `timeout`).
    pub fn terminate(&mut self, timeout: Duration) -> Option<i32> {
        let pid = self.child.id() as i32;
        unsafe_kill(pid, 15);
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.drain(Duration::from_millis(100));
                return status.code();
            }
            if Instant::now() > deadline {
                return None;
            }
            self.drain(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends a signal with the `kill` command (no libc dependency in tests).
pub fn unsafe_kill(pid: i32, signal: i32) {
    // `--`: a negative pid (a process group) is not read as an option.
    let _ = Command::new("kill").arg(format!("-{signal}")).arg("--").arg(pid.to_string()).status();
}

/// A parsed HTTP/1.1 response.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).to_string()
    }
}

/// Sends raw bytes and reads one response (Content-Length framed, or until close).
pub fn raw_request(addr: SocketAddr, request: &[u8], timeout: Duration) -> std::io::Result<Response> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(request)?;
    read_response(&mut s)
}

/// Reads one response from a stream.
pub fn read_response(s: &mut TcpStream) -> std::io::Result<Response> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, format!("closed after {} bytes", buf.len())));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status: u16 = status_line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let headers: Vec<(String, String)> =
        lines.filter(|l| !l.is_empty()).filter_map(|l| l.split_once(':').map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))).collect();
    let mut body = buf[head_end..].to_vec();
    let length = headers.iter().find(|(n, _)| n == "content-length").and_then(|(_, v)| v.parse::<usize>().ok());
    match length {
        Some(len) => {
            while body.len() < len {
                let n = s.read(&mut chunk)?;
                if n == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..n]);
            }
            body.truncate(len);
        }
        None => {
            let _ = s.read_to_end(&mut body);
        }
    }
    Ok(Response { status, headers, body })
}

/// GET `path`.
pub fn get(addr: SocketAddr, path: &str) -> Response {
    let req = format!("GET {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n");
    raw_request(addr, req.as_bytes(), Duration::from_secs(30)).unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

/// POST `body` to `path`.
pub fn post(addr: SocketAddr, path: &str, content_type: &str, body: &[u8]) -> Response {
    let mut req = format!("POST {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n\r\n", body.len())
        .into_bytes();
    req.extend_from_slice(body);
    raw_request(addr, &req, Duration::from_secs(30)).unwrap_or_else(|e| panic!("POST {path}: {e}"))
}

/// A cage.toml with one HTTP interface named `http` on a free port.
pub fn http_cage_toml(extra: &str) -> String {
    format!("[interfaces.http]\nlisten = \"127.0.0.1:0\"\n{extra}")
}

/// Runs `pmnc ARGS` with extra environment variables; the process is killed when it runs longer
/// than `timeout` (then `code` is None), so a command that wrongly keeps running fails the test
/// instead of hanging it.
pub fn pmnc_env_limited(args: &[&str], env: &[(&str, &str)], timeout: Duration) -> Output {
    let mut child = Command::new(pmnc_bin())
        .args(args)
        .envs(env.iter().copied())
        .env("RUST_LOG", "")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start pmnc");
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = so.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = se.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let code = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break status.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output { code, stdout: out.join().unwrap(), stderr: err.join().unwrap() }
}

/// `pmnc ARGS`, killed after `timeout`.
pub fn pmnc_limited(args: &[&str], timeout: Duration) -> Output {
    pmnc_env_limited(args, &[], timeout)
}

/// A loopback TCP port that was free a moment ago (for configs that need a fixed port).
pub fn spare_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a spare port");
    l.local_addr().expect("local addr").port()
}

/// GETs `path` until the body is `want` (bounded by `timeout`); returns the matching response or
/// panics with the last answer seen.
pub fn get_until(addr: SocketAddr, path: &str, want: &str, timeout: Duration) -> Response {
    let deadline = Instant::now() + timeout;
    loop {
        let r = get(addr, path);
        if r.text() == want {
            return r;
        }
        if Instant::now() > deadline {
            panic!("GET {path}: still {} {:?} after {timeout:?}, waiting for {want:?}", r.status, r.text());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// Helpers of http.rs, deadlines.rs, cages.rs and shutdown.rs.

impl Server {
    /// Like `start`, with `--workers N` instead of 2.
    pub fn start_with_workers(path: &Path, workers: usize, extra: &[&str]) -> Server {
        Self::try_start_with_workers(path, workers, extra).unwrap_or_else(|log| panic!("pmnc did not start:\n{log}"))
    }

    /// Sends `signal` (2 = SIGINT, 15 = SIGTERM) without waiting.
    pub fn signal(&self, signal: i32) {
        unsafe_kill(self.child.id() as i32, signal);
    }

    /// Waits (reading the log meanwhile) for the process to exit; `None` while it still runs
    /// after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.drain(Duration::from_millis(100));
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            self.drain(Duration::from_millis(10));
        }
    }

    /// Waits for a log line containing every one of `patterns`; returns it.
    pub fn wait_for_all(&mut self, patterns: &[&str], timeout: Duration) -> Option<String> {
        let hit = |l: &String| patterns.iter().all(|p| l.contains(p));
        if let Some(l) = self.log.iter().find(|l| hit(l)) {
            return Some(l.clone());
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            let line = self.lines.recv_timeout(left).ok()?;
            self.take(line.clone());
            if hit(&line) {
                return Some(line);
            }
        }
    }
}

/// A connection to `addr` with a read timeout, for several requests or hand-made bytes.
pub fn connect(addr: SocketAddr, read_timeout: Duration) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(read_timeout)).unwrap();
    s
}

/// Writes `request` on an open connection and reads one response.
pub fn exchange(s: &mut TcpStream, request: &[u8]) -> std::io::Result<Response> {
    s.write_all(request)?;
    read_response(s)
}

/// The response's x-request-id (panics when missing: every response must have one).
pub fn request_id(r: &Response) -> String {
    r.header("x-request-id").unwrap_or_else(|| panic!("no x-request-id in {r:?}")).to_string()
}

/// The response body as JSON (panics with the body when it is not).
pub fn json_body(r: &Response) -> serde_json::Value {
    serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", r.status, r.text()))
}

/// 1-based number of the first line of `text` containing `needle`.
pub fn line_of(text: &str, needle: &str) -> usize {
    text.lines().position(|l| l.contains(needle)).unwrap_or_else(|| panic!("{needle:?} not in the text")) + 1
}

/// A cage folder `c` holding `cage_toml` and `http.lua`, run with `workers` worker threads:
/// (the tree, which must live as long as the server; the server; its interface `http`).
pub fn start_http_cage(cage_toml: &str, http_lua: &str, workers: usize) -> (Tree, Server, SocketAddr) {
    let tree = Tree::new();
    tree.write("c/cage.toml", cage_toml);
    tree.write("c/http.lua", http_lua);
    let server = Server::start_with_workers(&tree.path().join("c"), workers, &[]);
    let addr = server.addr("http");
    (tree, server, addr)
}

/// The monitor page's address, from the line that announces it.
pub fn monitor_addr(s: &mut Server) -> SocketAddr {
    let line = s.wait_for("monitor page at http://", Duration::from_secs(10)).expect("monitor start line");
    let rest = &line[line.find("http://").unwrap_or(0) + "http://".len()..];
    rest.split('/').next().unwrap_or("").parse().unwrap_or_else(|_| panic!("no address in {line:?}"))
}

/// The value of the sample line `name{labels}` in Prometheus text.
pub fn sample(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name_and_labels).and_then(|v| v.strip_prefix(' ')).and_then(|v| v.parse().ok()))
}

/// The keys of `pmnc.state` under `prefix` in the cage's state file, sorted (what handlers of the
/// messaging tests record).
pub fn state_keys(cage: &Path, prefix: &str) -> Vec<String> {
    let Ok(db) = rusqlite::Connection::open(cage.join(".data/state.sqlite")) else { return Vec::new() };
    let _ = db.busy_timeout(Duration::from_secs(10));
    let Ok(mut s) = db.prepare("SELECT key FROM state WHERE key LIKE ?1 ORDER BY key") else { return Vec::new() };
    s.query_map([format!("{prefix}%")], |r| r.get(0)).map(|rows| rows.filter_map(Result::ok).collect()).unwrap_or_default()
}

/// Polls `f` until it is true or `timeout` passes; its last answer.
pub fn until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A throw-away CA and a server certificate it signed for localhost and 127.0.0.1, as PEM text:
/// (ca, cert, key).
pub fn test_certificates(tag: &str) -> (String, String, String) {
    let pki = rustomnic_resource::testing_tls::TestPki::new(tag, &["localhost", "127.0.0.1"]).unwrap();
    let read = |p: &Path| std::fs::read_to_string(p).unwrap();
    (read(&pki.ca), read(&pki.cert), read(&pki.key))
}
