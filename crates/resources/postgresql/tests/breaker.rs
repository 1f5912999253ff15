//! The circuit breaker and broken-connection handling of the postgresql resource against the real
//! server (PMNC_TEST_POSTGRES_URL, default postgresql://postgres@127.0.0.1:5432/test), reached
//! through a TCP forwarder inside the test that can take "the database" away (close its listener
//! and cut every forwarded connection), make it silent (accept, never answer), and bring it back
//! on the same port, without touching the shared server. The pools and the cage VM are built
//! here (as `rustomnic_resource::testing::run_lua` does) so that one set of pools lives through
//! several Lua requests while the forwarder is flipped between them. When the server is not
//! running, each test says how to start it and passes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::future::Future;
use std::io::Write;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::rc::Rc;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use rustomnic_core::Value;
use rustomnic_lua::{compile, worker, CageVm, CompiledModule, RequestCtx};
use rustomnic_resource::testing::{configure, run_lua};
use rustomnic_resource::{install, stats_for, CageResources, Pool, PoolStats, ResourceConfig};
use rustomnic_resource_postgresql::Postgresql;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const MODULE: &str = r#"
local M = {}

function M.try(sql)
  local ok, r = pcall(pmnc.transaction.db.execute, sql)
  if ok then return true, r end
  if type(r) ~= "table" then return false, { message = tostring(r) } end
  return false, { message = r.message, code = r.code, recoverable = r.recoverable, text = tostring(r) }
end

return M
"#;

/// The deadline of every Lua request here: far beyond what any step may take, so that a step
/// that fails in time fails on its own account, not by the deadline.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);

/// The pool keys of the breaker tests.
const BREAKER: &str = "pool_size = 1\nconnect_timeout = \"1s\"\nbreaker_failures = 2\nbreaker_cooldown = \"300ms\"\n";
const COOLDOWN: Duration = Duration::from_millis(300);

/// How long a connect refused by a closed port may take to be reported (connect_timeout is 1 s).
const PROMPTLY: Duration = Duration::from_millis(1500);
/// How long a call refused by the open breaker may take.
const AT_ONCE: Duration = Duration::from_millis(100);

fn url() -> String {
    std::env::var("PMNC_TEST_POSTGRES_URL").unwrap_or_else(|_| "postgresql://postgres@127.0.0.1:5432/test".to_string())
}

fn toml_string(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

fn db_with(url: &str, extra: &str) -> ResourceConfig {
    match configure(&Postgresql, "db", &format!("url = {}\n{extra}", toml_string(url))) {
        Ok(c) => c,
        Err(e) => panic!("config refused: {e:?}"),
    }
}

fn shout(text: &str) {
    // Straight to stderr: eprintln! output of a passing test is captured and never shown.
    let _ = writeln!(std::io::stderr(), "\n!!!!!!!!\n{text}\n!!!!!!!!\n");
}

/// The real server, as the forwarder needs it.
#[derive(Clone)]
struct Real {
    address: SocketAddr,
    /// The URL up to the host ("postgresql://user@") and from after the port ("/test?...").
    before: String,
    after: String,
}

impl Real {
    /// The URL of the real server with the forwarder's port in place of its host and port.
    fn via(&self, port: u16) -> String {
        format!("{}127.0.0.1:{port}{}", self.before, self.after)
    }
}

/// Splits `scheme://[user[:password]@]host[:port][/database][?params]` around its host and port.
fn parse_url(url: &str) -> Result<Real, String> {
    let scheme_end = ["postgresql://", "postgres://"]
        .iter()
        .find(|s| url.starts_with(*s))
        .map(|s| s.len())
        .ok_or("not a postgresql:// URL (a key=value connection string cannot be forwarded here)")?;
    let rest = &url[scheme_end..];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let host_start = authority.rfind('@').map(|i| i + 1).unwrap_or(0);
    let host_port = &authority[host_start..];
    if host_port.is_empty() || host_port.contains(',') {
        return Err(format!("the URL names {} (one TCP host is needed)", if host_port.is_empty() { "no host" } else { "several hosts" }));
    }
    let has_port = match host_port.rfind(':') {
        Some(i) => !host_port[i..].contains(']'),
        None => false,
    };
    let target = if has_port { host_port.to_string() } else { format!("{host_port}:5432") };
    // The first address of the host that the server answers on ("localhost" may be ::1 too).
    let addresses: Vec<SocketAddr> = target.to_socket_addrs().map_err(|e| format!("{target}: {e}"))?.collect();
    let address = addresses
        .iter()
        .copied()
        .find(|a| std::net::TcpStream::connect_timeout(a, Duration::from_secs(3)).is_ok())
        .ok_or(format!("{target}: no address of it takes a connection ({addresses:?})"))?;
    Ok(Real { address, before: url[..scheme_end + host_start].to_string(), after: rest[authority_end..].to_string() })
}

/// The real server when it answers `select 1` and its URL can be forwarded; else says loudly why
/// the tests are skipped.
fn real_server() -> Option<Real> {
    static REAL: OnceLock<Option<Real>> = OnceLock::new();
    REAL.get_or_init(|| {
        let r = run_lua(vec![db_with(&url(), "connect_timeout = \"3s\"\n")], MODULE, "try", vec![Value::str("select 1")], Duration::from_secs(5));
        match r {
            Ok(v) if v.first() == Some(&Value::Bool(true)) => {}
            other => {
                let why = match &other {
                    Ok(v) => v.get(1).and_then(|e| e.get("message")).and_then(|t| t.as_str()).unwrap_or("no answer").to_string(),
                    Err(e) => e.to_string(),
                };
                shout(&format!(
                    "!!! PostgreSQL is not reachable at the URL of PMNC_TEST_POSTGRES_URL or its default ({why}).\n!!! The postgresql breaker tests are SKIPPED. Start the server with:\n!!!   pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"
                ));
                return None;
            }
        }
        match parse_url(&url()) {
            Ok(real) => Some(real),
            Err(why) => {
                shout(&format!("!!! PMNC_TEST_POSTGRES_URL cannot be put behind the test's forwarder: {why}.\n!!! The postgresql breaker tests are SKIPPED."));
                None
            }
        }
    })
    .clone()
}

/// Runs `test` on a current-thread runtime with a LocalSet, as a worker thread does.
fn on_worker(test: impl Future<Output = ()>) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    tokio::task::LocalSet::new().block_on(&rt, test);
}

// ---------------------------------------------------------------------------------------------
// The forwarder

/// What the forwarder does with a connection it accepts.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Forward,
    /// Accepts and holds the connection, never answering: a server that hangs.
    Silent,
}

#[derive(Default)]
struct Shared {
    accepted: Cell<usize>,
    silent: Cell<bool>,
    links: RefCell<Vec<Link>>,
    /// Bytes to look for in what clients send, and whom to tell when they pass.
    watch: RefCell<Option<(Vec<u8>, oneshot::Sender<()>)>>,
}

/// One accepted connection: a cut is asked through `cut`; `closed` ends when the link is over
/// (after a cut, when the client has closed its end too).
struct Link {
    cut: oneshot::Sender<()>,
    closed: oneshot::Receiver<()>,
}

/// A TCP forwarder on 127.0.0.1 to the real server, on the test's own thread.
struct Forwarder {
    port: u16,
    backend: SocketAddr,
    shared: Rc<Shared>,
    acceptor: RefCell<Option<JoinHandle<()>>>,
}

impl Forwarder {
    fn start(backend: SocketAddr) -> Forwarder {
        let mut f = Forwarder { port: 0, backend, shared: Rc::new(Shared::default()), acceptor: RefCell::new(None) };
        f.port = f.listen(0);
        f
    }

    /// Listens on `port` (0: any) and serves it; returns the port.
    fn listen(&self, port: u16) -> u16 {
        let socket = TcpSocket::new_v4().expect("socket");
        // The port's earlier connections may linger in TIME_WAIT.
        socket.set_reuseaddr(true).expect("SO_REUSEADDR");
        socket.bind(SocketAddr::from(([127, 0, 0, 1], port))).unwrap_or_else(|e| panic!("forwarder cannot listen on port {port} again: {e}"));
        let listener = socket.listen(64).expect("listen");
        let port = listener.local_addr().expect("local address").port();
        let (shared, backend) = (self.shared.clone(), self.backend);
        let acceptor = tokio::task::spawn_local(async move {
            loop {
                let client = match listener.accept().await {
                    Ok((client, _)) => client,
                    Err(e) => {
                        shout(&format!("!!! the test's forwarder stopped accepting: {e}"));
                        return;
                    }
                };
                shared.accepted.set(shared.accepted.get() + 1);
                let (cut, cut_asked) = oneshot::channel();
                let (link_over, closed) = oneshot::channel();
                shared.links.borrow_mut().push(Link { cut, closed });
                let mode = if shared.silent.get() { Mode::Silent } else { Mode::Forward };
                tokio::task::spawn_local(serve(client, backend, mode, cut_asked, link_over, shared.clone()));
            }
        });
        *self.acceptor.borrow_mut() = Some(acceptor);
        port
    }

    /// Connections accepted so far (each a connect of the pool, or a cancel request).
    fn accepted(&self) -> usize {
        self.shared.accepted.get()
    }

    /// The database goes away: nothing listens on the port any more (connects are refused) and
    /// every forwarded connection is cut. Returns once every client has closed its end of them.
    async fn down(&self) {
        let acceptor = self.acceptor.borrow_mut().take().expect("the forwarder is already down");
        acceptor.abort();
        // Ends when the task is dropped, and with it the listener.
        let _ = acceptor.await;
        self.cut().await;
    }

    /// The database comes back on the same port.
    fn up(&self, mode: Mode) {
        assert!(self.acceptor.borrow().is_none(), "the forwarder is already up");
        self.shared.silent.set(mode == Mode::Silent);
        assert_eq!(self.listen(self.port), self.port);
    }

    /// Cuts every connection forwarded so far (the server's side closed, the client told with a
    /// FIN); returns once every client has closed its end: its driver saw the connection end.
    async fn cut(&self) {
        let links: Vec<Link> = self.shared.links.borrow_mut().drain(..).collect();
        let mut closed = Vec::new();
        for link in links {
            let _ = link.cut.send(());
            closed.push(link.closed);
        }
        let all = async {
            for c in closed {
                let _ = c.await;
            }
        };
        if tokio::time::timeout(Duration::from_secs(5), all).await.is_err() {
            panic!("a client kept its end of a cut connection open for 5 s (its driver never noticed the cut)");
        }
    }

    /// Asks every forwarded connection to be cut and returns at once: the client's driver has
    /// not seen the end yet when the next call starts.
    fn cut_now(&self) {
        for link in self.shared.links.borrow_mut().drain(..) {
            let _ = link.cut.send(());
        }
    }

    /// Resolves once a client has sent `bytes` (and they were forwarded to the server).
    fn when_sent(&self, bytes: &[u8]) -> oneshot::Receiver<()> {
        let (tell, told) = oneshot::channel();
        *self.shared.watch.borrow_mut() = Some((bytes.to_vec(), tell));
        told
    }
}

/// Looks for the watched bytes in what a client just sent (`tail` keeps the end of the previous
/// chunk, for a pattern split over two reads).
fn watch(shared: &Shared, tail: &mut Vec<u8>, chunk: &[u8]) {
    let mut watch = shared.watch.borrow_mut();
    let Some((pattern, _)) = watch.as_ref() else {
        tail.clear();
        return;
    };
    tail.extend_from_slice(chunk);
    if tail.windows(pattern.len()).any(|w| w == pattern.as_slice()) {
        if let Some((_, tell)) = watch.take() {
            let _ = tell.send(());
        }
        tail.clear();
    } else {
        let keep = tail.len().min(pattern.len());
        tail.drain(..tail.len() - keep);
    }
}

/// Serves one accepted connection until both sides close it, or until it is cut. `_link_over`
/// is dropped when this ends, which tells `Forwarder::cut`.
async fn serve(client: TcpStream, backend: SocketAddr, mode: Mode, mut cut_asked: oneshot::Receiver<()>, _link_over: oneshot::Sender<()>, shared: Rc<Shared>) {
    let (mut from_client, mut to_client) = client.into_split();
    let mut buf = vec![0u8; 16 * 1024];
    if mode == Mode::Silent {
        tokio::select! {
            _ = &mut cut_asked => {}
            _ = async { while matches!(from_client.read(&mut buf).await, Ok(n) if n > 0) {} } => return,
        }
    } else {
        let Ok(server) = TcpStream::connect(backend).await else { return };
        let (mut from_server, mut to_server) = server.into_split();
        {
            let upstream = async {
                let mut tail = Vec::new();
                loop {
                    let n = match from_client.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if to_server.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                    watch(&shared, &mut tail, &buf[..n]);
                }
                let _ = to_server.shutdown().await;
            };
            let downstream = async {
                let _ = tokio::io::copy(&mut from_server, &mut to_client).await;
                let _ = to_client.shutdown().await;
            };
            tokio::select! {
                _ = async { tokio::join!(upstream, downstream) } => return,
                _ = &mut cut_asked => {}
            }
        }
        // The server's side goes at once.
        drop((from_server, to_server));
    }
    // The client is told (FIN), and its own close is awaited.
    let _ = to_client.shutdown().await;
    while matches!(from_client.read(&mut buf).await, Ok(n) if n > 0) {}
}

// ---------------------------------------------------------------------------------------------
// A cage with one postgresql resource "db", whose pools live as long as this value

struct Cage {
    name: &'static str,
    vm: CageVm,
    resources: Rc<CageResources>,
    stats: Arc<PoolStats>,
}

impl Cage {
    /// Call inside `on_worker` (the pools spawn their maintenance on the LocalSet). Each test has
    /// a cage name of its own: the counters are per process.
    fn new(name: &'static str, config: ResourceConfig) -> Cage {
        let stats = stats_for(name, "db");
        let by_resource = BTreeMap::from([((name.to_string(), "db".to_string()), stats.clone())]);
        let resources = install(&[(name.to_string(), vec![config])], 1, &by_resource);
        let vm = CageVm::new(name).expect("cage VM");
        let display = format!("{name}/m.lua");
        let bytecode = compile("m", Path::new(&display), &display, MODULE.as_bytes()).expect("module compiles");
        let module = CompiledModule { name: "m".into(), path: display.clone().into(), display, bytecode, functions: vec![], version: 1, source_hash: 0 };
        vm.install(&module).expect("module installs");
        Cage { name, vm, resources, stats }
    }

    fn pool(&self) -> Rc<Pool> {
        self.resources.pool(self.name, "db").expect("the pool of db")
    }

    fn connect_failures(&self) -> u64 {
        self.stats.connect_failures.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// One request running `sql` on db: its result or its error table, and how long it took.
    async fn sql(&self, sql: &str) -> (Result<Value, Value>, Duration) {
        let started = Instant::now();
        let r = self.vm.call(RequestCtx::new(self.name, "test", REQUEST_TIMEOUT), "m", "try", vec![Value::str(sql)]).await;
        let took = started.elapsed();
        match r {
            Ok(mut v) if v.len() == 2 => {
                let second = v.pop().unwrap_or_default();
                match v[0] {
                    Value::Bool(true) => (Ok(second), took),
                    _ => (Err(second), took),
                }
            }
            other => panic!("{sql}: the request itself failed (after {took:?}): {other:?}"),
        }
    }

    /// `sql` must succeed; its first row's column `column`.
    async fn value(&self, sql: &str, column: &str) -> Value {
        match self.sql(sql).await {
            (Ok(r), _) => match r.get("rows") {
                Some(Value::Array(rows)) if !rows.is_empty() => rows[0].get(column).cloned().unwrap_or_else(|| panic!("{sql}: no column {column}: {r:?}")),
                _ => panic!("{sql}: no rows: {r:?}"),
            },
            (Err(e), took) => panic!("{sql}: failed after {took:?}: {e:?}"),
        }
    }

    /// `sql` must fail within `within`; its error message.
    async fn failure(&self, sql: &str, within: Duration) -> String {
        match self.sql(sql).await {
            (Err(e), took) => {
                let message = e.get("message").and_then(|m| m.as_str()).unwrap_or_else(|| panic!("no message: {e:?}")).to_string();
                assert!(took < within, "{sql} failed only after {took:?} (allowed {within:?}): {message}");
                message
            }
            (Ok(r), _) => panic!("{sql}: expected a failure, got {r:?}"),
        }
    }
}

impl Drop for Cage {
    fn drop(&mut self) {
        worker::clear();
    }
}

fn assert_cannot_connect(message: &str) {
    assert!(message.starts_with("cannot connect: "), "{message}");
    assert!(message.to_lowercase().contains("refused"), "{message}");
}

fn assert_unavailable(message: &str, failures: u32) {
    let head = format!("unavailable after {failures} failed connects in a row (last: ");
    assert!(message.starts_with(&head), "expected {head:?}...: {message}");
    assert!(message.to_lowercase().contains("refused"), "the last failure is named: {message}");
    assert!(message.contains("); retrying in "), "{message}");
}

// ---------------------------------------------------------------------------------------------

#[test]
fn the_breaker_opens_while_the_server_is_away_and_a_probe_closes_it_when_it_is_back() {
    let Some(real) = real_server() else { return };
    on_worker(async {
        let fwd = Forwarder::start(real.address);
        let cage = Cage::new("breaker_away", db_with(&real.via(fwd.port), BREAKER));
        let pool = cage.pool();

        // The database is there.
        assert_eq!(cage.value("select 1 as n", "n").await, Value::Int(1));
        assert_eq!((fwd.accepted(), pool.open_connections(), pool.idle_connections()), (1, 1, 1));

        // It goes away: the idle connection is found closed (not handed out), and the connect
        // is refused, promptly and clearly.
        fwd.down().await;
        let message = cage.failure("select 1 as n", PROMPTLY).await;
        assert_cannot_connect(&message);
        assert_eq!((pool.open_connections(), pool.idle_connections(), cage.connect_failures()), (0, 0, 1));

        // The second failure in a row opens the breaker; the next call fails at once, trying
        // no connect.
        let message = cage.failure("select 1 as n", PROMPTLY).await;
        assert_cannot_connect(&message);
        let opened_by = Instant::now();
        let message = cage.failure("select 1 as n", AT_ONCE).await;
        assert_unavailable(&message, 2);
        assert_eq!(cage.connect_failures(), 2);

        // Past the cooldown one probe goes through; the server is still away, so it fails and
        // the breaker opens again at once.
        tokio::time::sleep_until((opened_by + COOLDOWN).into()).await;
        let probe_started = Instant::now();
        let message = cage.failure("select 1 as n", PROMPTLY).await;
        assert_cannot_connect(&message);
        let reopened_after = Instant::now();
        let message = cage.failure("select 1 as n", AT_ONCE).await;
        assert_unavailable(&message, 3);
        assert_eq!(cage.connect_failures(), 3);

        // The database comes back on the same port. Within the cooldown the breaker still
        // refuses (it does not look at the server); the forwarder sees no connect.
        fwd.up(Mode::Forward);
        // (Checked only when the machine was quick enough to be sure the cooldown is not over:
        // the breaker reopened after `probe_started`.)
        if probe_started.elapsed() < COOLDOWN - Duration::from_millis(50) {
            let message = cage.failure("select 1 as n", AT_ONCE).await;
            assert_unavailable(&message, 3);
            assert_eq!(fwd.accepted(), 1);
        }

        // Past the cooldown the probe connects and the call succeeds on the new connection.
        tokio::time::sleep_until((reopened_after + COOLDOWN).into()).await;
        assert_eq!(cage.value("select 1 as n", "n").await, Value::Int(1));
        assert_eq!((fwd.accepted(), pool.open_connections(), pool.idle_connections()), (2, 1, 1));
        assert_eq!(cage.value("select 2 as n", "n").await, Value::Int(2));
        assert_eq!(fwd.accepted(), 2, "the probe's connection is pooled and reused");

        // The success closed the breaker and started the count over: when the server goes away
        // again, two connects are tried before the breaker opens, not none.
        fwd.down().await;
        assert_cannot_connect(&cage.failure("select 1 as n", PROMPTLY).await);
        assert_cannot_connect(&cage.failure("select 1 as n", PROMPTLY).await);
        assert_unavailable(&cage.failure("select 1 as n", AT_ONCE).await, 2);
        assert_eq!(cage.connect_failures(), 5);
    });
}

#[test]
fn a_server_that_accepts_but_never_answers_fails_after_connect_timeout_and_opens_the_breaker() {
    let Some(real) = real_server() else { return };
    on_worker(async {
        let fwd = Forwarder::start(real.address);
        fwd.down().await;
        fwd.up(Mode::Silent);
        let cage = Cage::new("breaker_silent", db_with(&real.via(fwd.port), BREAKER));

        for _ in 0..2 {
            let started = Instant::now();
            let message = cage.failure("select 1 as n", PROMPTLY).await;
            assert_eq!(message, "cannot connect: no answer within 1s");
            assert!(started.elapsed() >= Duration::from_secs(1), "connect_timeout is 1 s: {:?}", started.elapsed());
        }
        let message = cage.failure("select 1 as n", AT_ONCE).await;
        assert!(message.starts_with("unavailable after 2 failed connects in a row (last: no answer within 1s); retrying in "), "{message}");
        assert_eq!((fwd.accepted(), cage.connect_failures()), (2, 2));
    });
}

#[test]
fn an_idle_pooled_connection_cut_by_the_network_is_replaced_by_the_next_call() {
    let Some(real) = real_server() else { return };
    on_worker(async {
        let fwd = Forwarder::start(real.address);
        let cage = Cage::new("breaker_idle_cut", db_with(&real.via(fwd.port), BREAKER));
        let pool = cage.pool();

        let first = cage.value("select pg_backend_pid() as pid", "pid").await;
        assert_eq!(pool.idle_connections(), 1);
        // The pooled connection is cut while idle; its driver has seen the end (`cut` returns
        // once the client closed its side). The docs promise a cheap "not closed" check before
        // reuse and a replacement: the next call gets a new connection and succeeds.
        fwd.cut().await;
        let second = cage.value("select pg_backend_pid() as pid", "pid").await;
        assert_ne!(first, second, "a new server session");
        assert_eq!((fwd.accepted(), pool.open_connections(), cage.connect_failures()), (2, 1, 0));
    });
}

#[test]
fn a_call_right_after_the_server_dropped_an_idle_connection_gets_a_fresh_one() {
    let Some(real) = real_server() else { return };
    on_worker(async {
        let fwd = Forwarder::start(real.address);
        let cage = Cage::new("breaker_restart", db_with(&real.via(fwd.port), BREAKER));
        let pool = cage.pool();

        let first = cage.value("select pg_backend_pid() as pid", "pid").await;
        // As after a database restart: the idle connection is gone, but its driver has not
        // noticed yet, so it passes the cheap health check and its BEGIN fails. Nothing ran, so
        // the participant takes a fresh connection instead of failing the request.
        fwd.cut_now();
        let second = cage.value("select pg_backend_pid() as pid", "pid").await;
        assert_ne!(first, second, "a new server session");
        assert_eq!((fwd.accepted(), pool.open_connections(), cage.connect_failures()), (2, 1, 0));
    });
}

#[test]
fn a_connection_cut_mid_statement_fails_that_call_as_lost_and_the_next_call_gets_a_new_one() {
    let Some(real) = real_server() else { return };
    on_worker(async {
        let fwd = Forwarder::start(real.address);
        let cage = Cage::new("breaker_busy_cut", db_with(&real.via(fwd.port), BREAKER));
        let pool = cage.pool();

        let sent = fwd.when_sent(b"pg_sleep(5)");
        let (outcome, ()) = tokio::join!(cage.sql("select pg_sleep(5)"), async {
            sent.await.expect("the statement reaches the forwarder");
            fwd.cut().await;
        });
        let (e, took) = match outcome {
            (Err(e), took) => (e, took),
            (Ok(r), _) => panic!("the cut statement succeeded: {r:?}"),
        };
        let message = e.get("message").and_then(|m| m.as_str()).unwrap_or_default();
        assert!(message.starts_with("the connection to the server was lost"), "{e:?}");
        assert!(took < PROMPTLY, "the cut call failed only after {took:?}");
        // The lost connection was closed, not pooled; a lost connection is no failed connect.
        assert_eq!((pool.open_connections(), pool.idle_connections(), cage.connect_failures()), (0, 0, 0));

        assert_eq!(cage.value("select 3 as n", "n").await, Value::Int(3));
        assert_eq!((fwd.accepted(), pool.open_connections()), (2, 1));
    });
}
