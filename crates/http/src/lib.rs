//! The HTTP interface: HTTP/1.1 with keep-alive and HTTP/2 (prior-knowledge h2c) served from Lua
//! handlers on the worker threads, with limits on headers, bodies, slow clients and connections.
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

mod handler;
pub mod raw;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::LocalBoxFuture;
use hyper_util::rt::{TokioIo, TokioTimer};
use rustomnic_cage::{Interface, InterfaceSpec, Protocol, Shutdown};
use rustomnic_core::{Located, Section};
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
}

/// A configured HTTP interface, shared by every worker.
pub struct HttpInterface {
    spec: InterfaceSpec,
    settings: HttpSettings,
    open: AtomicUsize,
}

impl Protocol for HttpProtocol {
    fn name(&self) -> &'static str {
        "http"
    }

    fn configure(&self, spec: InterfaceSpec, section: &Section) -> Option<Arc<dyn Interface>> {
        let listen = match section.string("listen") {
            Some(l) => match l.value.parse::<SocketAddr>() {
                Ok(addr) => Some(Located { value: addr, file: l.file, line: l.line, key: l.key }),
                Err(_) => {
                    section.error("listen", format!("{:?} is not an address such as \"127.0.0.1:8080\"", l.value));
                    None
                }
            },
            // Present but unreadable (wrong type, unset ${ENV}): that problem is already recorded.
            None if section.has("listen") => None,
            None => {
                section.table_error("listen is required, e.g. listen = \"127.0.0.1:8080\"");
                None
            }
        };
        let max_body_size = section.size("max_body_size", 1 << 30).map(|v| v.value).unwrap_or(1 << 20);
        let max_header_size = section.size("max_header_size", 1 << 20).map(|v| v.value).unwrap_or(16 << 10);
        if max_header_size < 8192 {
            section.error("max_header_size", "must be at least 8KiB");
        }
        let header_read_timeout =
            section.duration("header_read_timeout", Duration::from_secs(3600)).map(|v| v.value).unwrap_or(Duration::from_secs(10));
        let max_connections = section.integer("max_connections", 1, 10_000_000).map(|v| v.value as usize).unwrap_or(10_000);
        let http2 = section.bool("http2").map(|v| v.value).unwrap_or(true);
        let settings = HttpSettings {
            listen: listen?,
            max_body_size,
            max_header_size: max_header_size.max(8192) as usize,
            header_read_timeout,
            max_connections,
            http2,
        };
        Some(Arc::new(HttpInterface { spec, settings, open: AtomicUsize::new(0) }))
    }
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

    fn serve(self: Arc<Self>, mut stream: TcpStream, remote: SocketAddr, mut shutdown: Shutdown) -> LocalBoxFuture<'static, ()> {
        Box::pin(async move {
            let open = self.open.fetch_add(1, Ordering::Relaxed) + 1;
            let _guard = OpenGuard(&self.open);
            if open > self.settings.max_connections {
                tracing::warn!(cage = %self.spec.cage, interface = %self.spec.name, "refusing {remote}: {} connections open, the limit is max_connections = {}", open - 1, self.settings.max_connections);
                handler::refuse_overloaded(stream).await;
                return;
            }
            // hyper-util's version sniffing waits for the first bytes without any timeout, so a
            // client that connects and stays silent (or stalls inside the HTTP/2 preface) would
            // hold a connection slot forever; header_read_timeout only starts after it.
            let Some(head) = first_bytes(&mut stream, self.settings.header_read_timeout, &mut shutdown).await else {
                tracing::debug!(cage = %self.spec.cage, interface = %self.spec.name, "closing {remote}: no request within header_read_timeout ({:?})", self.settings.header_read_timeout);
                return;
            };
            let io = TokioIo::new(Prefixed { head, stream });
            let me = self.clone();
            let peer: std::rc::Rc<str> = remote.to_string().into();
            let service = hyper::service::service_fn(move |req| handler::handle(me.clone(), req, peer.clone()));
            let mut builder = hyper_util::server::conn::auto::Builder::new(LocalExec);
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(self.settings.header_read_timeout)
                .max_buf_size(self.settings.max_header_size)
                .keep_alive(true);
            builder
                .http2()
                .timer(TokioTimer::new())
                .max_header_list_size(self.settings.max_header_size as u32)
                .max_concurrent_streams(256);
            let builder = if self.settings.http2 { builder } else { builder.http1_only() };
            let conn = builder.serve_connection(io, service);
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                _ = shutdown.changed() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(cage = %self.spec.cage, interface = %self.spec.name, "connection from {remote} ended: {e}");
            }
        })
    }
}

/// The HTTP/2 connection preface; HTTP/1 requests differ from it in their first byte.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Reads the first bytes of a connection, as many as it takes to tell HTTP/1 from the HTTP/2
/// preface, within `timeout`. `None` when the client sends nothing in time, closes, or the
/// process shuts down meanwhile. For HTTP/1 this returns at the first byte, so hyper's own
/// header_read_timeout then bounds the rest of the request head.
async fn first_bytes(stream: &mut TcpStream, timeout: Duration, shutdown: &mut Shutdown) -> Option<Bytes> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut head = Vec::with_capacity(H2_PREFACE.len());
    let mut chunk = [0u8; 24];
    loop {
        let want = H2_PREFACE.len() - head.len();
        let read = tokio::select! {
            r = tokio::time::timeout_at(deadline, stream.read(&mut chunk[..want])) => r,
            _ = shutdown.changed() => return None,
        };
        match read {
            Ok(Ok(n)) if n > 0 => head.extend_from_slice(&chunk[..n]),
            _ => return None,
        }
        if head.len() == H2_PREFACE.len() || !H2_PREFACE.starts_with(&head) {
            return Some(Bytes::from(head));
        }
    }
}

/// A connection whose first bytes [`first_bytes`] already read: they are replayed to hyper
/// before the rest of the stream.
struct Prefixed {
    head: Bytes,
    stream: TcpStream,
}

impl AsyncRead for Prefixed {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        if !self.head.is_empty() {
            let n = self.head.len().min(buf.remaining());
            let part = self.head.split_to(n);
            buf.put_slice(&part);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[std::io::IoSlice<'_>]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
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

struct OpenGuard<'a>(&'a AtomicUsize);

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
