//! The HTTP interface: HTTP/1.1 with keep-alive (our own connection code, h1.rs) and HTTP/2
//! (prior-knowledge h2c, hyper) served from Lua handlers on the worker threads, with limits on
//! headers, bodies, slow clients and connections.
//!
//! Config keys of `[interfaces.NAME]` with `protocol = "http"` (besides protocol, handler and
//! request_timeout, which every interface has):
//!
//! | key | default | meaning |
//! |---|---|---|
//! | `listen` | required | address and port, e.g. "127.0.0.1:8080" (port 0: any free port, logged at start) |
//! | `max_body_size` | "1MiB" | larger request bodies get 413 |
//! | `max_header_size` | "16KiB" | larger request heads get 431 (at least 8KiB) |
//! | `header_read_timeout` | "10s" | a client that has not sent its request head by then is disconnected (also one that sends nothing) |
//! | `max_connections` | 10000 | connections beyond this get 503 and are closed |
//! | `http2` | true | accept HTTP/2 with prior knowledge (h2c) besides HTTP/1.1 |
//! | `idle_timeout` | "60s" | a connection with no request in flight and no traffic for this long is closed |
//! | `write_timeout` | "30s" | a client that reads nothing of a response (or stream, or WebSocket) for this long is dropped |
//! | `websocket_timeout` | "1h" | the deadline of a request that upgrades to a WebSocket, instead of request_timeout |
//! | `max_message_size` | "1MiB" | larger WebSocket messages close the WebSocket with 1009 |
//! | `websocket_deflate` | true | accept permessage-deflate when the client's offer keeps a session small (see ws.rs) |
//! | `max_upload_size` | "100MiB" | a `multipart/form-data` body may be this large: its files go to temporary files, its fields (within max_body_size) to memory; larger: 413 |
//! | `access_log` | "combined" | one line per answered request on standard output: "combined" (Apache's format, then duration, cage/interface and request id), "json", or "off" |
//! | `tls` | none | `{ cert = "cert.pem", key = "key.pem" }`: the interface speaks HTTPS (and wss) only; see below |
//!
//! Keys of the `tls` table (paths relative to the cage folder, `${VAR}` expanded; the files are
//! reloaded when they change, see tls.rs):
//!
//! | key | default | meaning |
//! |---|---|---|
//! | `cert` | required | PEM file: the server's certificate, then any intermediates |
//! | `key` | required | PEM file: its private key (PKCS#8, PKCS#1 or SEC1) |
//! | `client_ca` | none | PEM file of the CA(s) that sign client certificates: asks clients for one |
//! | `client_auth` | "required" | with client_ca: "required" (no certificate, no connection) or "optional" |
//! | `handshake_timeout` | "10s" | a client that has not finished the TLS handshake by then is disconnected |
//! | `max_handshakes` | 1024 | handshakes in progress beyond this are closed at once |

mod h1;
/// Entry points for the fuzz targets (`fuzz/`); not an API.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::h1::{fuzz_connection, fuzz_head, Connection, Step};
    pub use crate::handler::{fuzz_tables, percent_decode};
    pub use crate::multipart::{boundary as multipart_boundary, fuzz_parse as fuzz_multipart, Event as MultipartEvent, MultipartError};
    pub use crate::ws::{fuzz_session, Session};
}
mod access_log;
mod der;
mod handler;
mod limits;
mod lua_api;
mod multipart;
pub mod raw;
mod routes;
pub mod service;
mod stream;
pub mod tls;
mod upgrade;
mod ws;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

pub use limits::{disable_transparent_huge_pages, raise_open_file_limit, tune_process};

use bytes::Bytes;
use futures_util::future::LocalBoxFuture;
use hyper_util::rt::{TokioIo, TokioTimer};
use rustomnic_core::{Located, Section};
use rustomnic_interface::{Interface, InterfaceProtocol, InterfaceSpec, Shutdown};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// The `http` protocol plugin.
pub struct HttpProtocol;

/// Settings of one HTTP interface.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    pub listen: Located<SocketAddr>,
    pub max_body_size: u64,
    pub max_header_size: usize,
    pub header_read_timeout: Duration,
    pub max_connections: usize,
    pub http2: bool,
    pub idle_timeout: Duration,
    pub write_timeout: Duration,
    pub websocket_timeout: Duration,
    pub max_message_size: usize,
    pub max_upload_size: u64,
    pub websocket_deflate: bool,
    pub access_log: access_log::Format,
    pub tls: Option<tls::TlsOptions>,
}

/// A configured HTTP interface, shared by every worker.
pub struct HttpInterface {
    spec: InterfaceSpec,
    settings: HttpSettings,
    open: AtomicUsize,
    /// Connections refused since the last warning, and when that was (ms, [`now_ms`]).
    refused: AtomicUsize,
    refused_logged: AtomicU64,
    /// Started at the first connection, so that `pmnc check` starts no reload thread.
    /// Err: configured but could not start; its connections are closed, never served plain.
    tls: std::sync::OnceLock<Result<Option<Arc<tls::TlsServer>>, ()>>,
    /// The interface's request figures (shared with the Lua side's recording).
    figures: Arc<rustomnic_core::metrics::InterfaceMetrics>,
    /// Status counts of the responses no route table served.
    unrouted: Arc<rustomnic_core::metrics::StatusCounts>,
    /// Answers the requests instead of a Lua handler (an interface built on this one, service.rs).
    service: Option<Arc<dyn service::Service>>,
}

impl HttpInterface {
    /// Whether a request's log entry is worth taking: the access log or the debug line is on.
    fn wants_log(&self) -> bool {
        self.settings.access_log != access_log::Format::Off || tracing::enabled!(tracing::Level::DEBUG)
    }

    /// The access log's line and the debug line of an answered request.
    fn log_request(&self, entry: &access_log::Entry, peer: &str, id: &str, status: hyper::StatusCode, bytes: Option<u64>) {
        let spec = &self.spec;
        tracing::debug!(cage = %spec.cage, interface = %spec.name, request = %id, "{} {} {} {:.1}ms", entry.method(), entry.target(), status.as_u16(), entry.started.elapsed().as_secs_f64() * 1e3);
        let line = access_log::Line { format: self.settings.access_log, cage: &spec.cage, interface: &spec.name, peer, id, status, bytes };
        access_log::log(entry, &line);
    }
}

impl InterfaceProtocol for HttpProtocol {
    fn name(&self) -> &'static str {
        "http"
    }

    fn configure(&self, spec: InterfaceSpec, section: &Section) -> Option<Arc<dyn Interface>> {
        let settings = read_settings(section, true)?;
        Some(HttpInterface::new(spec, settings, None))
    }
}

impl HttpInterface {
    pub(crate) fn new(spec: InterfaceSpec, settings: HttpSettings, service: Option<Arc<dyn service::Service>>) -> Arc<HttpInterface> {
        let figures = rustomnic_core::metrics::interface(&spec.cage, &spec.name);
        let unrouted = rustomnic_core::metrics::status_counts(&spec.cage, &spec.name, "");
        Arc::new(HttpInterface {
            spec,
            settings,
            open: AtomicUsize::new(0),
            refused: AtomicUsize::new(0),
            refused_logged: AtomicU64::new(0),
            figures,
            unrouted,
            tls: std::sync::OnceLock::new(),
            service,
        })
    }
}

/// The interface's keys; `lua`: also those of Lua handlers only (WebSockets, uploads), which an
/// interface of a [`service::Service`] does not have (its uploads are held to max_body_size).
pub(crate) fn read_settings(section: &Section, lua: bool) -> Option<HttpSettings> {
    let listen = rustomnic_interface::read_listen(section);
    let max_body_size = section.size("max_body_size", 1 << 30).map(|v| v.value).unwrap_or(1 << 20);
    let max_header_size = section.size("max_header_size", 1 << 20).map(|v| v.value).unwrap_or(16 << 10);
    if max_header_size < 8192 {
        section.error("max_header_size", "must be at least 8KiB");
    }
    let header_read_timeout = section.duration("header_read_timeout", Duration::from_secs(3600)).map(|v| v.value).unwrap_or(Duration::from_secs(10));
    let max_connections = section.integer("max_connections", 1, 10_000_000).map(|v| v.value as usize).unwrap_or(10_000);
    let http2 = section.bool("http2").map(|v| v.value).unwrap_or(true);
    let day = Duration::from_secs(86_400);
    let idle_timeout = section.duration("idle_timeout", day).map(|v| v.value).unwrap_or(Duration::from_secs(60));
    let write_timeout = section.duration("write_timeout", day).map(|v| v.value).unwrap_or(Duration::from_secs(30));
    let (websocket_timeout, max_message_size, websocket_deflate, max_upload_size) = if lua {
        let websocket_timeout = section.duration("websocket_timeout", 365 * day).map(|v| v.value).unwrap_or(Duration::from_secs(3600));
        let max_message_size = section.size("max_message_size", 1 << 30).map(|v| v.value).unwrap_or(1 << 20);
        let websocket_deflate = section.bool("websocket_deflate").map(|v| v.value).unwrap_or(true);
        let max_upload_size = section.size("max_upload_size", 1 << 40).map(|v| v.value).unwrap_or(100 << 20);
        if websocket_timeout.is_zero() {
            section.error("websocket_timeout", "must be more than zero");
        }
        if max_message_size < 125 {
            section.error("max_message_size", "must be at least 125 bytes (the largest control frame)");
        }
        (websocket_timeout, max_message_size, websocket_deflate, max_upload_size)
    } else {
        (Duration::from_secs(3600), 1 << 20, false, max_body_size)
    };
    for (key, d) in [("idle_timeout", idle_timeout), ("write_timeout", write_timeout)] {
        if d.is_zero() {
            section.error(key, "must be more than zero");
        }
    }
    let access_log = match section.string("access_log") {
        Some(v) => match access_log::Format::parse(&v.value) {
            Some(f) => f,
            None => {
                section.error("access_log", format!("must be {}, not {:?}", access_log::Format::NAMES, v.value));
                access_log::Format::Combined
            }
        },
        None => access_log::Format::Combined,
    };
    let tls = match tls::read_tls(section, "tls", http2) {
        None => None,
        Some(Ok(t)) => Some(t),
        Some(Err(())) => return None,
    };
    Some(HttpSettings {
        listen: listen?,
        max_body_size,
        max_header_size: max_header_size.max(8192) as usize,
        header_read_timeout,
        max_connections,
        http2,
        idle_timeout,
        write_timeout,
        websocket_timeout,
        max_message_size: max_message_size.max(125) as usize,
        max_upload_size,
        websocket_deflate,
        access_log,
        tls,
    })
}

/// A local executor: HTTP/2 streams of a connection run on the worker that owns it, so neither
/// they nor the Lua handlers they call need to be `Send`.
#[derive(Clone, Copy)]
pub(crate) struct LocalExec;

impl<F: std::future::Future + 'static> hyper::rt::Executor<F> for LocalExec {
    fn execute(&self, fut: F) {
        tokio::task::spawn_local(fut);
    }
}

impl Interface for HttpInterface {
    fn spec(&self) -> &InterfaceSpec {
        &self.spec
    }

    fn listen(&self) -> Option<Located<SocketAddr>> {
        Some(self.settings.listen.clone())
    }

    /// A handler that is a route table must compile: a version whose table does not is broken,
    /// and the working one keeps serving.
    fn check_module(&self, module: &str, table: &rustomnic_lua::mlua::Table) -> Result<(), String> {
        let (handler_module, function) = &self.spec.handler.value;
        if module != handler_module {
            return Ok(());
        }
        match table.raw_get::<rustomnic_lua::mlua::Value>(function.as_str()) {
            Ok(rustomnic_lua::mlua::Value::Table(routes)) => routes::Router::compile(&routes, &self.spec.cage, &self.spec.name)
                .map(|_| ())
                .map_err(|e| format!("route table {module}.{function} (interface {}): {e}", self.spec.name)),
            _ => Ok(()),
        }
    }

    fn serve(self: Arc<Self>, stream: TcpStream, remote: SocketAddr, mut shutdown: Shutdown) -> LocalBoxFuture<'static, ()> {
        Box::pin(async move {
            let open = self.open.fetch_add(1, Ordering::Relaxed) + 1;
            // Counted until the socket closes, which for a WebSocket is long after serve() ends.
            let conn = Arc::new(ConnState { iface: self.clone(), last: AtomicU64::new(now_ms()), in_flight: AtomicUsize::new(0) });
            let Ok(tls) = self.tls_server() else { return };
            if open > self.settings.max_connections {
                self.note_refusal(remote, open - 1);
                // A TLS client could not read a plain 503: it is closed.
                if tls.is_none() {
                    handler::refuse_overloaded(stream).await;
                }
                return;
            }
            let mut stream = match tls {
                None => tls::Conn::Plain(stream),
                Some(tls) => {
                    let mut stop = shutdown.clone();
                    let stopped = async move {
                        let _ = stop.changed().await;
                    };
                    // Boxed: the handshake's state is large and would otherwise size the task
                    // of every connection, plain ones and parked requests included.
                    match Box::pin(tls.accept(stream, remote, stopped)).await {
                        Some(s) => tls::Conn::tls(s),
                        None => return,
                    }
                }
            };
            let tls_info = stream.tls_info();
            // A client that connects and stays silent (or stalls inside the HTTP/2 preface)
            // would hold a connection slot: the first bytes, too, come within header_read_timeout.
            let Some(head) = first_bytes(&mut stream, self.settings.header_read_timeout, &mut shutdown).await else {
                tracing::debug!(cage = %self.spec.cage, interface = %self.spec.name, "closing {remote}: no request within header_read_timeout ({:?})", self.settings.header_read_timeout);
                return;
            };
            if !self.settings.http2 && head.starts_with(H2_PREFACE) {
                tracing::debug!(cage = %self.spec.cage, interface = %self.spec.name, "closing {remote}: HTTP/2 is off (http2 = false)");
                return;
            }
            let h2 = head.starts_with(H2_PREFACE);
            let peer: std::rc::Rc<str> = remote.to_string().into();
            let io = Box::new(Prefixed { head, stream, conn: conn.clone(), write_timer: None });
            if !h2 {
                return h1::serve(self, io, peer, shutdown).await;
            }
            // HTTP/2 (rarer, and larger) is served by hyper, boxed so that the task of every
            // HTTP/1 connection stays small.
            let io = TokioIo::new(io);
            let me = self.clone();
            let busy = conn.clone();
            let service = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                if let Some(info) = &tls_info {
                    req.extensions_mut().insert(info.clone());
                }
                handler::handle(me.clone(), req, peer.clone(), Busy::new(&busy))
            });
            let idle = self.settings.idle_timeout;
            let idle_out = async {
                loop {
                    let at = conn.last.load(Ordering::Relaxed) + idle.as_millis() as u64;
                    tokio::time::sleep(Duration::from_millis(at.saturating_sub(now_ms()))).await;
                    if conn.in_flight.load(Ordering::Relaxed) == 0 && conn.last.load(Ordering::Relaxed) + idle.as_millis() as u64 <= now_ms() {
                        return;
                    }
                }
            };
            let result = Box::pin(async {
                let mut b = hyper::server::conn::http2::Builder::new(LocalExec);
                b.timer(TokioTimer::new()).max_header_list_size(self.settings.max_header_size as u32).max_concurrent_streams(256);
                let h2conn = b.serve_connection(io, service);
                tokio::pin!(h2conn);
                // Shut down gracefully at shutdown or when idle for idle_timeout.
                tokio::select! {
                    r = h2conn.as_mut() => r,
                    _ = shutdown.changed() => {
                        h2conn.as_mut().graceful_shutdown();
                        h2conn.await
                    }
                    _ = idle_out => {
                        tracing::debug!(cage = %self.spec.cage, interface = %self.spec.name, "closing {remote}: idle for idle_timeout ({idle:?})");
                        h2conn.as_mut().graceful_shutdown();
                        h2conn.await
                    }
                }
            })
            .await;
            if let Err(e) = result {
                tracing::debug!(cage = %self.spec.cage, interface = %self.spec.name, "connection from {remote} ended: {e}");
            }
        })
    }
}

/// The HTTP/2 connection preface; HTTP/1 requests differ from it in their first byte.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Reads the first bytes of a connection, as many as it takes to tell HTTP/1 from the HTTP/2
/// preface (and whatever else the same reads bring), within `timeout`. `None` when the client
/// sends nothing in time, closes, or the process shuts down meanwhile. For HTTP/1 this returns
/// at the first read, so the head's own header_read_timeout then bounds the rest of it.
async fn first_bytes(stream: &mut tls::Conn, timeout: Duration, shutdown: &mut Shutdown) -> Option<Bytes> {
    let deadline = tokio::time::Instant::now() + timeout;
    // Room for a usual request head: an HTTP/1 connection's first read takes its first head
    // whole, and h1::serve goes on in this buffer (24 bytes at a time, a head took four reads).
    let mut head = Vec::with_capacity(h1::FIRST_READ);
    loop {
        let read = tokio::select! {
            r = tokio::time::timeout_at(deadline, stream.read_buf(&mut head)) => r,
            _ = shutdown.changed() => return None,
        };
        match read {
            Ok(Ok(n)) if n > 0 => {}
            _ => return None,
        }
        if head.len() >= H2_PREFACE.len() || !H2_PREFACE.starts_with(&head) {
            return Some(Bytes::from(head));
        }
    }
}

/// Milliseconds on a process-wide monotonic clock.
fn now_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START.get_or_init(std::time::Instant::now).elapsed().as_millis() as u64
}

impl HttpInterface {
    /// The TLS side of the interface, started at the first connection (None: plain HTTP).
    fn tls_server(&self) -> Result<Option<Arc<tls::TlsServer>>, ()> {
        self.tls
            .get_or_init(|| {
                let Some(options) = self.settings.tls.clone() else { return Ok(None) };
                let who = format!("cage {} interface {}", self.spec.cage, self.spec.name);
                match tls::TlsServer::start(options, who.clone()) {
                    Ok(s) => Ok(Some(s)),
                    Err(e) => {
                        // Checked at config time; only a file removed since then gets here.
                        tracing::error!("{who}: TLS cannot start, connections are closed: {e}");
                        Err(())
                    }
                }
            })
            .clone()
    }

    /// Logs refused connections once per second at most, with how many there were.
    fn note_refusal(&self, remote: SocketAddr, open: usize) {
        let n = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
        let now = now_ms();
        let last = self.refused_logged.load(Ordering::Relaxed);
        if (last == 0 || now.saturating_sub(last) >= 1000)
            && self.refused_logged.compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed).is_ok()
        {
            self.refused.fetch_sub(n, Ordering::Relaxed);
            tracing::warn!(cage = %self.spec.cage, interface = %self.spec.name, "refused {n} connection(s) (the latest from {remote}): {open} open, the limit is max_connections = {}", self.settings.max_connections);
        }
    }
}

/// What a connection shares between its socket and its requests: the idle clock, the requests
/// in flight, and its place in the interface's count of open connections.
pub(crate) struct ConnState {
    iface: Arc<HttpInterface>,
    last: AtomicU64,
    in_flight: AtomicUsize,
}

impl Drop for ConnState {
    fn drop(&mut self) {
        self.iface.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A request in flight on its connection (which is therefore not idle); held until the handler
/// ends, also when it answered early and streams.
pub(crate) struct Busy(Arc<ConnState>);

impl Busy {
    fn new(conn: &Arc<ConnState>) -> Busy {
        conn.in_flight.fetch_add(1, Ordering::Relaxed);
        Busy(conn.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.last.store(now_ms(), Ordering::Relaxed);
    }
}

/// A connection with bytes already read from it (by [`first_bytes`], or after a WebSocket's
/// request): they are read again before the rest of the stream. It also keeps the idle clock and
/// drops clients that do not read (write_timeout).
pub(crate) struct Prefixed {
    pub(crate) head: Bytes,
    pub(crate) stream: tls::Conn,
    pub(crate) conn: Arc<ConnState>,
    /// Running while a write waits for the client to read; made only when one does.
    write_timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Prefixed {
    /// Notes traffic on the connection (for idle_timeout).
    pub(crate) fn touch(&self) {
        self.conn.last.store(now_ms(), Ordering::Relaxed);
    }

    fn written(&mut self, cx: &mut Context<'_>, r: Poll<std::io::Result<usize>>) -> Poll<std::io::Result<usize>> {
        match r {
            Poll::Pending => {
                let timeout = self.conn.iface.settings.write_timeout;
                let timer = self.write_timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                if std::future::Future::poll(timer.as_mut(), cx).is_ready() {
                    self.write_timer = None;
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("the client read nothing for {timeout:?} (write_timeout)"),
                    )));
                }
                Poll::Pending
            }
            Poll::Ready(r) => {
                self.write_timer = None;
                if matches!(r, Ok(n) if n > 0) {
                    self.touch();
                }
                Poll::Ready(r)
            }
        }
    }
}

impl AsyncRead for Prefixed {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        if !self.head.is_empty() {
            let n = self.head.len().min(buf.remaining());
            let part = self.head.split_to(n);
            buf.put_slice(&part);
            // Hand over what else has arrived in the same read: hyper sizes its read buffer by
            // its reads, and a first read of one byte makes it grow the buffer to 16 KiB for the
            // rest of the connection instead of reading the whole head into the first 8 KiB.
            if self.head.is_empty() && buf.remaining() > 0 {
                if let Poll::Ready(Err(e)) = Pin::new(&mut self.stream).poll_read(cx, buf) {
                    return Poll::Ready(Err(e));
                }
            }
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut self.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.touch();
        }
        r
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.written(cx, r)
    }

    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[std::io::IoSlice<'_>]) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.written(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
