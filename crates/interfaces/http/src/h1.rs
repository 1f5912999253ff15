//! Our own HTTP/1.1 server connection for the Lua handlers (hyper serves HTTP/2): between
//! requests and while a handler is parked, a connection holds no read or write buffer, only its
//! socket and the handler's coroutine (docs/decisions/050-own-http1.md).

use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper::header::{HeaderMap, HeaderName, HeaderValue, CONNECTION, CONTENT_LENGTH, DATE, EXPECT, TRANSFER_ENCODING};
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use rustomnic_interface::Shutdown;
use rustomnic_lua::RequestCtx;
use std::io::Write as _;

use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

use crate::handler::{self, Outcome};
use crate::stream::Body;
use crate::{Busy, HttpInterface, Prefixed};

/// More request headers than this get 431 (the limit hyper had).
const MAX_HEADERS: usize = 100;
/// A chunk-size line, extensions included, longer than this is refused.
const MAX_CHUNK_LINE: usize = 4096;
/// Response bodies up to this size are copied behind the head and sent in one write.
const COALESCE: usize = 16 * 1024;
/// The first read of a request head reserves this much; a larger head grows the buffer.
pub(crate) const FIRST_READ: usize = 2048;
/// After refusing a request, how long (and how much) the client's unread bytes are drained so
/// that closing does not reset the connection before the client has read the refusal.
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 4 << 20;

/// How the body of a request is framed.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Framing {
    None,
    Length(u64),
    Chunked,
}

/// A parsed request head and what it says about the connection.
struct Head {
    parts: hyper::http::request::Parts,
    framing: Framing,
    keep_alive: bool,
    expect_continue: bool,
    websocket: bool,
    /// The headers it carries of those the connection reads: `begin` skips the lookups of
    /// `traceparent` and `content-type` when they would find nothing.
    present: Present,
}

/// Which of the headers the connection itself reads a head carries, noted while the header map
/// is built: a lookup in the map hashes the name (~100-200 instructions each), and most requests
/// have none of these but the ones a client always sends.
#[derive(Default)]
struct Present {
    transfer_encoding: bool,
    content_length: bool,
    connection: bool,
    expect: bool,
    upgrade: bool,
    traceparent: bool,
    content_type: bool,
}

impl Present {
    fn note(&mut self, name: &HeaderName) {
        if name == TRANSFER_ENCODING {
            self.transfer_encoding = true;
        } else if name == CONTENT_LENGTH {
            self.content_length = true;
        } else if name == CONNECTION {
            self.connection = true;
        } else if name == EXPECT {
            self.expect = true;
        } else if name == hyper::header::UPGRADE {
            self.upgrade = true;
        } else if name == hyper::header::CONTENT_TYPE {
            self.content_type = true;
        } else if name.as_str() == "traceparent" {
            self.traceparent = true;
        }
    }
}

/// A request answered without running the handler (malformed, too large, too slow).
#[derive(Debug)]
pub(crate) struct Refusal {
    status: StatusCode,
    reason: String,
}

fn refusal(status: StatusCode, reason: impl Into<String>) -> Refusal {
    Refusal { status, reason: reason.into() }
}

/// Serves requests on `io` until the client closes, a request says `connection: close`, the
/// connection idles for idle_timeout, it is upgraded, or the process shuts down.
///
/// The connection is boxed so that handing it from one step to the next moves a pointer: a
/// moved value keeps its room in the task that moved it.
pub(crate) async fn serve(iface: Arc<HttpInterface>, mut io: Box<Prefixed>, peer: Rc<str>, shutdown: Shutdown) {
    // The bytes read to tell HTTP/2 from HTTP/1 are the start of the first head, in a buffer
    // with room for the rest (`first_bytes`).
    let mut buf = Vec::from(std::mem::take(&mut io.head));
    buf.reserve(FIRST_READ.saturating_sub(buf.len()));
    let mut first = true;
    let mut waits = Waits::new(&shutdown);
    loop {
        let head = match read_head(&iface, &mut io, &mut buf, first, &shutdown, &mut waits).await {
            Ok(Some(head)) => head,
            Ok(None) => return,
            Err(r) => {
                Box::pin(refuse(&iface, &mut io, r, &peer, &rustomnic_lua::new_request_id())).await;
                return;
            }
        };
        first = false;
        if buf.is_empty() {
            // A request being served (a parked long-poll) or an idle connection keeps no read
            // buffer; reading a body or the next head makes one.
            buf = Vec::new();
        }
        match exchange(&iface, io, &mut buf, head, &peer, &shutdown).await {
            Some(back) => io = back,
            None => return,
        }
        if buf.is_empty() {
            buf = Vec::new();
        }
    }
}

/// What a connection waits on between requests besides its bytes, made once per connection:
/// a timer and the process's shutdown. Made anew for every request they cost ~1k instructions
/// (a timer entry put into tokio's wheel and taken out again, a waiter added to the shutdown
/// watch and removed); kept, the timer's deadline is moved on (tokio only notes a later
/// deadline, and the wheel entry is moved when the old one comes due) and the shutdown waiter
/// stays registered.
struct Waits {
    timer: std::pin::Pin<Box<tokio::time::Sleep>>,
    /// Ready once the process is shutting down (or the watch's sender is gone).
    stopping: futures_util::future::LocalBoxFuture<'static, ()>,
}

impl Waits {
    fn new(shutdown: &Shutdown) -> Waits {
        let mut watch = shutdown.clone();
        Waits {
            // A placeholder deadline: read_head sets the real one before it first waits.
            timer: Box::pin(tokio::time::sleep_until(Instant::now() + Duration::from_secs(3600))),
            stopping: Box::pin(async move {
                let _ = watch.wait_for(|stopping| *stopping).await;
            }),
        }
    }
}

/// Waits for and parses the next request head. `None` when the connection should just close:
/// the client closed or sent nothing in time, or the process is shutting down.
async fn read_head(
    iface: &HttpInterface,
    io: &mut Prefixed,
    buf: &mut Vec<u8>,
    first: bool,
    shutdown: &Shutdown,
    waits: &mut Waits,
) -> Result<Option<Box<Head>>, Refusal> {
    let s = &iface.settings;
    let mut started = !buf.is_empty();
    // The first request of a connection must arrive within header_read_timeout; later ones may
    // take idle_timeout to start, and then header_read_timeout to arrive whole.
    let mut deadline = Instant::now() + if first || started { s.header_read_timeout } else { s.idle_timeout };
    let mut armed = false;
    loop {
        if started {
            if let Some((head, used)) = parse(buf, s.max_header_size)? {
                buf.drain(..used);
                return Ok(Some(head));
            }
            if buf.len() > s.max_header_size {
                return Err(refusal(
                    StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                    format!("the request head is over max_header_size ({} bytes)", s.max_header_size),
                ));
            }
        }
        if *shutdown.borrow() && !started {
            return Ok(None);
        }
        let more = if buf.is_empty() { FIRST_READ } else { buf.len().min(s.max_header_size) };
        if !armed {
            waits.timer.as_mut().reset(deadline);
            armed = true;
        }
        tokio::select! {
            // Bytes first: a head that arrived is read even when its deadline has come too.
            biased;
            r = fill_growing(io, buf, more) => if r.is_err() {
                return Ok(None);
            },
            () = waits.timer.as_mut() => {
                if started {
                    return Err(refusal(StatusCode::REQUEST_TIMEOUT, format!("the request head did not arrive within header_read_timeout ({:?})", s.header_read_timeout)));
                }
                return Ok(None);
            },
            () = &mut waits.stopping, if !started => return Ok(None),
        }
        if !started {
            started = true;
            deadline = Instant::now() + s.header_read_timeout;
            armed = false;
        }
    }
}

/// Parses a complete request head at the start of `buf`: the head and its length, `None` when
/// more bytes are needed.
fn parse(buf: &[u8], max_header_size: usize) -> Result<Option<(Box<Head>, usize)>, Refusal> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let used = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        // A bare LF is refused as soon as it arrives, not when the head times out.
        Ok(httparse::Status::Partial) => match bare_lf(buf) {
            Some(at) => return Err(refusal(StatusCode::BAD_REQUEST, format!("a line of the request head ends in a bare LF at byte {at} (CRLF is required)"))),
            None => return Ok(None),
        },
        Err(httparse::Error::TooManyHeaders) => {
            return Err(refusal(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, format!("more than {MAX_HEADERS} request headers")))
        }
        Err(httparse::Error::Version) => return Err(refusal(StatusCode::BAD_REQUEST, "the request line does not end in HTTP/1.0 or HTTP/1.1")),
        Err(e) => return Err(refusal(StatusCode::BAD_REQUEST, format!("malformed request head: {e}"))),
    };
    if used > max_header_size {
        return Err(refusal(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, format!("the request head is over max_header_size ({max_header_size} bytes)")));
    }
    let bad = |what: String| refusal(StatusCode::BAD_REQUEST, what);
    // httparse takes a bare LF as a line end; chunk lines do not, and neither may a head: one
    // rule for every line of a request (docs/decisions/062-bare-lf.md).
    if let Some(at) = bare_lf(&buf[..used]) {
        return Err(bad(format!("a line of the request head ends in a bare LF at byte {at} (CRLF is required)")));
    }
    let method = Method::from_bytes(req.method.unwrap_or_default().as_bytes()).map_err(|_| bad("malformed method".into()))?;
    let target = req.path.unwrap_or_default();
    let uri = target.parse::<Uri>().map_err(|_| bad(format!("malformed request target {:?}", truncate(target))))?;
    let version = if req.version == Some(1) { Version::HTTP_11 } else { Version::HTTP_10 };
    let mut map = HeaderMap::with_capacity(req.headers.len());
    let mut present = Present::default();
    for h in req.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| bad(format!("malformed header name {:?}", truncate(h.name))))?;
        let value = HeaderValue::from_bytes(h.value).map_err(|_| bad(format!("header {name} has a value that is not allowed in HTTP")))?;
        present.note(&name);
        map.append(name, value);
    }
    // Each lookup below is skipped only where it would have found no header.
    let framing = if present.transfer_encoding || present.content_length { framing(&map, version)? } else { Framing::None };
    let tokens =
        |name: HeaderName, token: &str| map.get_all(name).iter().any(|v| v.to_str().is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token))));
    let keep_alive =
        if version == Version::HTTP_11 { !(present.connection && tokens(CONNECTION, "close")) } else { present.connection && tokens(CONNECTION, "keep-alive") };
    let expect_continue = version == Version::HTTP_11 && present.expect && tokens(EXPECT, "100-continue");
    let websocket = present.upgrade && handler::is_websocket(&method, version, &map);
    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = version;
    *request.headers_mut() = map;
    let (parts, ()) = request.into_parts();
    // A body framed in a way we cannot trust makes the rest of the connection unreadable.
    Ok(Some((Box::new(Head { parts, framing, keep_alive, expect_continue, websocket, present }), used)))
}

fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

/// The body framing of a request (RFC 9112 6.3), refusing the ambiguous ones that let a
/// request hide inside another (request smuggling).
fn framing(map: &HeaderMap, version: Version) -> Result<Framing, Refusal> {
    let bad = |what: &str| refusal(StatusCode::BAD_REQUEST, what);
    let te: Vec<&HeaderValue> = map.get_all(TRANSFER_ENCODING).iter().collect();
    let cl: Vec<&HeaderValue> = map.get_all(CONTENT_LENGTH).iter().collect();
    if !te.is_empty() {
        if !cl.is_empty() {
            return Err(bad("both content-length and transfer-encoding are set"));
        }
        if version != Version::HTTP_11 {
            return Err(bad("transfer-encoding in an HTTP/1.0 request"));
        }
        let mut codings = Vec::new();
        for v in te {
            let v = v.to_str().map_err(|_| bad("malformed transfer-encoding"))?;
            codings.extend(v.split(',').map(|t| t.trim().to_ascii_lowercase()).filter(|t| !t.is_empty()));
        }
        return match codings.as_slice() {
            [only] if only == "chunked" => Ok(Framing::Chunked),
            _ => Err(refusal(StatusCode::NOT_IMPLEMENTED, format!("transfer-encoding {:?} is not supported (only chunked)", codings.join(", ")))),
        };
    }
    let mut length: Option<u64> = None;
    for v in cl {
        for part in v.as_bytes().split(|b| *b == b',') {
            let part = part.trim_ascii();
            if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
                return Err(bad("malformed content-length"));
            }
            let n = std::str::from_utf8(part).ok().and_then(|p| p.parse::<u64>().ok()).ok_or_else(|| bad("malformed content-length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(bad("content-length values that differ"));
            }
            length = Some(n);
        }
    }
    Ok(match length {
        Some(0) | None => Framing::None,
        Some(n) => Framing::Length(n),
    })
}

/// Why a request body could not be read.
enum BodyError {
    Refused(Refusal),
    /// The client closed or the socket failed: nothing to answer.
    Gone,
}

/// What a request keeps while its handler runs, besides the handler itself.
struct Req {
    busy: Busy,
    version: Version,
    head_only: bool,
    keep_alive: bool,
    handover: Option<tokio::sync::oneshot::Sender<Prefixed>>,
    /// What the access log (or the debug line) needs, when either is on.
    log: Option<Box<crate::access_log::Entry>>,
    /// The request's span, when its trace is recorded.
    span: Option<Box<handler::SpanStart>>,
}

/// One request on the connection: its body, the handler, the response. Gives the connection
/// back when it may serve another request.
async fn exchange(
    iface: &Arc<HttpInterface>,
    mut io: Box<Prefixed>,
    buf: &mut Vec<u8>,
    head: Box<Head>,
    peer: &Rc<str>,
    shutdown: &Shutdown,
) -> Option<Box<Prefixed>> {
    let spec = &iface.spec;
    // Up to the handler's start, boxed: its state (the head, the body being read) is large,
    // and a parked request's task must not be sized for it. Its result is boxed too: what an
    // await returns takes room in the task besides the bindings it goes to.
    let begun = Box::pin(begin(iface, &mut io, buf, head, peer)).await?;
    // Moved out in a block of its own, so that the box is freed here and not at the end.
    let (mut answer, mut req) = {
        let begun = begun;
        *begun
    };
    // The answer becomes what to write before anything is awaited again, so that the task does
    // not keep room for both.
    let next = {
        let outcome = tokio::select! {
            o = &mut answer => o,
            () = gone(io.stream.tcp()) => {
                // Dropping the handler's future ends its coroutine: nobody waits for the answer.
                tracing::debug!(cage = %spec.cage, interface = %spec.name, request = %answer.id, "{peer} closed the connection before the answer; the handler is stopped");
                return None;
            }
        };
        if *shutdown.borrow() {
            req.keep_alive = false;
        }
        match *outcome {
            Outcome::Done(response) => {
                let bytes = hyper::body::Body::size_hint(response.body()).exact();
                Ok((response.status(), bytes, serialize(response, req.version, req.head_only, &mut req.keep_alive)))
            }
            Outcome::Early(response) => {
                Err(Box::new(Early { response, version: req.version, head_only: req.head_only, handover: req.handover.take(), leftover: buf }))
            }
        }
    };
    let written = match next {
        Ok((status, bytes, serialized)) => {
            let written = match serialized {
                Serialized::Whole(out) => io.write_all(&out).await,
                other => Box::pin(write_serialized(&mut io, other)).await,
            };
            log_done(iface, &answer, status, bytes, req.log.take(), peer);
            handler::span_done(iface, req.span.take(), &answer.id, status);
            written
        }
        Err(early) => {
            let status = early.response.status();
            let end = Box::pin(early.run(io, &mut req.keep_alive, &mut answer)).await;
            log_done(iface, &answer, status, None, req.log.take(), peer);
            handler::span_done(iface, req.span.take(), &answer.id, status);
            match end {
                // The session runs in the handler; this task waits for its end.
                EarlyEnd::Upgraded => {
                    answer.rest().await;
                    return None;
                }
                EarlyEnd::Streamed(back, written) => {
                    io = back;
                    written
                }
            }
        }
    };
    drop(req.busy);
    match written {
        Ok(()) if req.keep_alive => Some(io),
        // A TCP shutdown does not wait for the client.
        Ok(()) => {
            let _ = io.shutdown().await;
            None
        }
        Err(e) => {
            tracing::debug!(cage = %spec.cage, interface = %spec.name, request = %answer.id, "response to {peer} not delivered: {e}");
            None
        }
    }
}

/// Reads the request's body and starts its handler; `None` when the connection is over (the
/// request was refused, or the client went away).
async fn begin(iface: &Arc<HttpInterface>, io: &mut Prefixed, buf: &mut Vec<u8>, head: Box<Head>, peer: &Rc<str>) -> Option<Box<(handler::Answer, Req)>> {
    let spec = &iface.spec;
    let s = &iface.settings;
    let Head { parts, framing, keep_alive, expect_continue, websocket, present } = *head;
    // TLS: what the handler sees as request.tls (tls.rs).
    let mut parts = parts;
    if let Some(info) = io.stream.tls_info() {
        parts.extensions.insert(info);
    }
    let timeout = if websocket { s.websocket_timeout } else { spec.request_timeout };
    let mut ctx = RequestCtx::new(&spec.cage, &spec.name, timeout);
    ctx.trace = rustomnic_lua::trace::for_request(&spec.cage, if present.traceparent { handler::trace_context(&parts.headers) } else { None });
    let id = ctx.id.clone();
    let log = iface.wants_log().then(|| Box::new(crate::access_log::Entry::new(&parts.method, &parts.uri, parts.version, &parts.headers)));
    let span = handler::span_start(&ctx, &parts.method, &parts.uri);
    let mut req = Req { busy: Busy::new(&io.conn), version: parts.version, head_only: parts.method == Method::HEAD, keep_alive, handover: None, log, span };
    let multipart = if present.content_type {
        parts.headers.get(hyper::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).and_then(crate::multipart::boundary)
    } else {
        None
    };
    let mut uploads = None;
    let body = if framing == Framing::None {
        Bytes::new()
    } else if let Some(boundary) = multipart {
        let read = match boundary {
            Ok(boundary) => read_multipart(iface, io, buf, framing, expect_continue, ctx.deadline, &boundary).await,
            Err(e) => Err(BodyError::Refused(refusal(StatusCode::BAD_REQUEST, e.to_string()))),
        };
        match read {
            Ok(u) => {
                uploads = Some(Box::new(u));
                Bytes::new()
            }
            Err(BodyError::Gone) => return None,
            Err(BodyError::Refused(r)) => {
                refuse(iface, io, r, peer, &id).await;
                return None;
            }
        }
    } else {
        match read_body(iface, io, buf, framing, expect_continue, ctx.deadline).await {
            Ok(b) => b,
            Err(BodyError::Gone) => return None,
            Err(BodyError::Refused(r)) => {
                refuse(iface, io, r, peer, &id).await;
                return None;
            }
        }
    };
    if buf.is_empty() {
        // A parked handler keeps no read buffer.
        *buf = Vec::new();
    }
    let upgrade = if websocket {
        let (tx, rx) = tokio::sync::oneshot::channel();
        req.handover = Some(tx);
        let key = parts.headers.get("sec-websocket-key").map(|k| Bytes::copy_from_slice(k.as_bytes())).unwrap_or_default();
        let deflate = if iface.settings.websocket_deflate {
            parts.headers.get_all("sec-websocket-extensions").iter().filter_map(|v| v.to_str().ok()).find_map(crate::ws::negotiate).map(Box::new)
        } else {
            None
        };
        Some((rx, key, deflate))
    } else {
        None
    };
    if let Some(service) = &iface.service {
        return Some(Box::new((handler::Answer::service(iface, service, parts, body, peer, ctx), req)));
    }
    let started = handler::start(iface, parts, body, uploads, peer, ctx, upgrade);
    Some(Box::new((handler::Answer::new(iface, started, id), req)))
}

/// A handler that sent its response head early and goes on: a stream, written while it runs,
/// or a WebSocket, to which the connection is handed after the 101.
struct Early<'a> {
    response: Response<Body>,
    version: Version,
    head_only: bool,
    handover: Option<tokio::sync::oneshot::Sender<Prefixed>>,
    leftover: &'a mut Vec<u8>,
}

/// How an [`Early`] answer went on.
enum EarlyEnd {
    /// The stream ended: the connection back (unless it failed), and how the writing went.
    Streamed(Box<Prefixed>, std::io::Result<()>),
    /// The connection is the WebSocket session's now; the handler goes on.
    Upgraded,
}

impl Early<'_> {
    async fn run(self, mut io: Box<Prefixed>, keep_alive: &mut bool, answer: &mut handler::Answer) -> EarlyEnd {
        let Early { response, version, head_only, handover, leftover } = self;
        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            // The handler waits for the connection meanwhile, so the 101 is written first; the
            // session then runs without this (larger) future around it.
            let leftover = std::mem::take(leftover);
            let mut keep = true;
            if write_response(&mut io, response, version, false, &mut keep).await.is_ok() {
                io.head = Bytes::from(leftover);
                if let Some(tx) = handover {
                    let _ = tx.send(*io);
                }
            }
            return EarlyEnd::Upgraded;
        }
        let send = write_response(&mut io, response, version, head_only, keep_alive);
        let written = futures_util::future::join(send, answer.rest()).await.0;
        EarlyEnd::Streamed(io, written)
    }
}

fn log_done(iface: &HttpInterface, answer: &handler::Answer, status: StatusCode, bytes: Option<u64>, log: Option<Box<crate::access_log::Entry>>, peer: &str) {
    answer.counts.record(status.as_u16());
    if let Some(entry) = log {
        iface.log_request(&entry, peer, &answer.id, status, bytes);
    }
}

/// Reads a request body (after `100 Continue` when the client waits for it) within the
/// request's deadline and max_body_size.
async fn read_body(
    iface: &HttpInterface,
    io: &mut Prefixed,
    buf: &mut Vec<u8>,
    framing: Framing,
    expect_continue: bool,
    deadline: std::time::Instant,
) -> Result<Bytes, BodyError> {
    let limit = iface.settings.max_body_size;
    let too_large = || over_limit("request body", limit, "max_body_size");
    before_body(io, buf, framing, expect_continue, limit, too_large).await?;
    let read = async {
        match framing {
            Framing::None => Ok(Bytes::new()),
            Framing::Length(n) => read_exact_body(io, buf, n as usize).await,
            Framing::Chunked => read_chunked(io, buf, limit).await,
        }
    };
    match tokio::time::timeout_at(deadline.into(), read).await {
        Ok(Ok(b)) => Ok(b),
        Ok(Err(e)) => Err(chunk_refusal(e, too_large)),
        Err(_) => Err(BodyError::Refused(refusal(StatusCode::REQUEST_TIMEOUT, "request body not received before the deadline"))),
    }
}

/// 413 for a body over `limit`, naming the key that sets it.
fn over_limit(what: &str, limit: u64, key: &str) -> BodyError {
    BodyError::Refused(refusal(StatusCode::PAYLOAD_TOO_LARGE, format!("{what} over the limit of {limit} bytes ({key})")))
}

/// What every body read does first: refuse a declared length over `limit` at once, and send
/// `100 Continue` to a client that waits for it.
async fn before_body(
    io: &mut Prefixed,
    buf: &[u8],
    framing: Framing,
    expect_continue: bool,
    limit: u64,
    too_large: impl Fn() -> BodyError,
) -> Result<(), BodyError> {
    if let Framing::Length(n) = framing {
        if n > limit {
            return Err(too_large());
        }
    }
    if expect_continue && buf.is_empty() && io.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await.is_err() {
        return Err(BodyError::Gone);
    }
    Ok(())
}

/// The answer to a chunked body that could not be read.
fn chunk_refusal(e: ChunkError, too_large: impl Fn() -> BodyError) -> BodyError {
    match e {
        ChunkError::TooLarge => too_large(),
        ChunkError::Malformed(what) => BodyError::Refused(refusal(StatusCode::BAD_REQUEST, format!("malformed chunked body: {what}"))),
        ChunkError::Gone => BodyError::Gone,
    }
}

/// Reads a `multipart/form-data` body as it arrives: fields within max_body_size, files into
/// temporary files, the whole within max_upload_size and the request's deadline.
async fn read_multipart(
    iface: &HttpInterface,
    io: &mut Prefixed,
    buf: &mut Vec<u8>,
    framing: Framing,
    expect_continue: bool,
    deadline: std::time::Instant,
    boundary: &[u8],
) -> Result<crate::multipart::Uploads, BodyError> {
    use crate::multipart::{Collector, MultipartError};
    let s = &iface.settings;
    let limit = s.max_upload_size;
    let too_large = || over_limit("multipart body", limit, "max_upload_size");
    before_body(io, buf, framing, expect_continue, limit, too_large).await?;
    let from_multipart = |e: MultipartError| match e {
        MultipartError::TooLarge(m) => BodyError::Refused(refusal(StatusCode::PAYLOAD_TOO_LARGE, m)),
        MultipartError::Malformed(_) => BodyError::Refused(refusal(StatusCode::BAD_REQUEST, e.to_string())),
        MultipartError::Storage(m) => {
            tracing::error!(cage = %iface.spec.cage, interface = %iface.spec.name, "{m}");
            BodyError::Refused(refusal(StatusCode::INTERNAL_SERVER_ERROR, "the upload could not be stored"))
        }
    };
    let from_chunks = |e: ChunkError| chunk_refusal(e, too_large);
    let mut collector = Collector::new(boundary, s.max_body_size, limit);
    let read = async {
        match framing {
            Framing::None => {}
            Framing::Length(n) => {
                let mut left = n as usize;
                while left > 0 {
                    if buf.is_empty() {
                        more(io, buf).await.map_err(from_chunks)?;
                    }
                    let take = buf.len().min(left);
                    collector.feed(&buf[..take]).await.map_err(from_multipart)?;
                    buf.drain(..take);
                    left -= take;
                }
            }
            Framing::Chunked => {
                let mut decoder = Chunked::new(limit);
                loop {
                    let done = decoder.feed(buf).map_err(from_chunks)?;
                    let data = std::mem::take(&mut decoder.body);
                    collector.feed(&data).await.map_err(from_multipart)?;
                    if done {
                        break;
                    }
                    more(io, buf).await.map_err(from_chunks)?;
                }
            }
        }
        collector.finish().map_err(from_multipart)
    };
    match tokio::time::timeout_at(deadline.into(), read).await {
        Ok(r) => r,
        Err(_) => Err(BodyError::Refused(refusal(StatusCode::REQUEST_TIMEOUT, "request body not received before the deadline"))),
    }
}

#[derive(Debug)]
pub(crate) enum ChunkError {
    TooLarge,
    Malformed(&'static str),
    Gone,
}

/// Reads more bytes of the connection into `into` (which has spare capacity); `Gone` at EOF.
/// Bytes are taken only once the socket is readable, so a read dropped while it waits loses
/// nothing.
async fn fill(io: &mut Prefixed, into: &mut Vec<u8>) -> Result<(), ChunkError> {
    fill_growing(io, into, 0).await
}

/// [`fill`] into a buffer that grows by `more` when it is full, once bytes have arrived: a
/// keep-alive connection waiting for its next request (thousands of them, after a fan-out to
/// parked long-polls) holds no read buffer meanwhile.
async fn fill_growing(io: &mut Prefixed, into: &mut Vec<u8>, more: usize) -> Result<(), ChunkError> {
    loop {
        io.stream.readable().await.map_err(|_| ChunkError::Gone)?;
        if into.capacity() == into.len() {
            into.reserve(more);
        }
        match io.stream.try_read_buf(into) {
            Ok(0) => return Err(ChunkError::Gone),
            Ok(_) => {
                io.touch();
                return Ok(());
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(_) => return Err(ChunkError::Gone),
        }
    }
}

async fn read_exact_body(io: &mut Prefixed, buf: &mut Vec<u8>, n: usize) -> Result<Bytes, ChunkError> {
    let have = buf.len().min(n);
    let mut body = Vec::with_capacity(n);
    body.extend(buf.drain(..have));
    while body.len() < n {
        fill(io, &mut body).await?;
    }
    Ok(Bytes::from(body))
}

/// Decodes a chunked body from `buf` (reading more as needed), leaving what follows it in
/// `buf`.
async fn read_chunked(io: &mut Prefixed, buf: &mut Vec<u8>, limit: u64) -> Result<Bytes, ChunkError> {
    let mut decoder = Chunked::new(limit);
    loop {
        if decoder.feed(buf)? {
            return Ok(Bytes::from(decoder.body));
        }
        more(io, buf).await?;
    }
}

/// An incremental decoder of a chunked request body (RFC 9112 7.1). Extensions are ignored;
/// trailers are read and dropped.
pub(crate) struct Chunked {
    pub(crate) body: Vec<u8>,
    limit: u64,
    state: ChunkState,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum ChunkState {
    /// Reading a chunk-size line.
    Size,
    /// This many data bytes of the current chunk are still to come.
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// Trailer lines, up to an empty line.
    Trailers,
    Done,
}

impl Chunked {
    pub(crate) fn new(limit: u64) -> Chunked {
        Chunked { body: Vec::new(), limit, state: ChunkState::Size }
    }

    /// Decodes what it can of `buf` and removes it from there. True once the body is complete
    /// (what follows it stays in `buf`).
    pub(crate) fn feed(&mut self, buf: &mut Vec<u8>) -> Result<bool, ChunkError> {
        let mut pos = 0;
        let result = self.step(buf, &mut pos);
        buf.drain(..pos);
        result
    }

    fn step(&mut self, buf: &[u8], pos: &mut usize) -> Result<bool, ChunkError> {
        loop {
            match self.state {
                ChunkState::Size => {
                    let Some(end) = line_end(buf, *pos, "a chunk-size line is too long")? else {
                        return Ok(false);
                    };
                    let text = &buf[*pos..end];
                    let size = text.split(|b| *b == b';').next().unwrap_or_default().trim_ascii_end();
                    if size.is_empty() || size.len() > 15 || !size.iter().all(u8::is_ascii_hexdigit) {
                        return Err(ChunkError::Malformed("a chunk size is not a hexadecimal number"));
                    }
                    let size = std::str::from_utf8(size)
                        .ok()
                        .and_then(|t| u64::from_str_radix(t, 16).ok())
                        .ok_or(ChunkError::Malformed("a chunk size is not a hexadecimal number"))?;
                    *pos = end + 2;
                    if size == 0 {
                        self.state = ChunkState::Trailers;
                    } else if self.body.len() as u64 + size > self.limit {
                        return Err(ChunkError::TooLarge);
                    } else {
                        self.body.reserve(size.min(64 << 10) as usize);
                        self.state = ChunkState::Data(size);
                    }
                }
                ChunkState::Data(left) => {
                    let take = (buf.len() - *pos).min(left.min(usize::MAX as u64) as usize);
                    self.body.extend_from_slice(&buf[*pos..*pos + take]);
                    *pos += take;
                    let left = left - take as u64;
                    if left > 0 {
                        self.state = ChunkState::Data(left);
                        return Ok(false);
                    }
                    self.state = ChunkState::DataEnd;
                }
                ChunkState::DataEnd => {
                    if buf.len() - *pos < 2 {
                        return Ok(false);
                    }
                    if &buf[*pos..*pos + 2] != b"\r\n" {
                        return Err(ChunkError::Malformed("a chunk does not end with CRLF"));
                    }
                    *pos += 2;
                    self.state = ChunkState::Size;
                }
                ChunkState::Trailers => match line_end(buf, *pos, "a trailer line is too long")? {
                    Some(end) if end == *pos => {
                        *pos += 2;
                        self.state = ChunkState::Done;
                        return Ok(true);
                    }
                    Some(end) => *pos = end + 2,
                    None => return Ok(false),
                },
                ChunkState::Done => return Ok(true),
            }
        }
    }
}

/// Where the line starting at `from` ends (the index of its CR), `None` while it is incomplete.
/// Only CRLF ends a line: a bare LF or a bare CR is refused at once rather than waited on, since
/// a proxy in front may split lines differently and take the rest as another request
/// (docs/decisions/062-bare-lf.md). So is a line longer than [`MAX_CHUNK_LINE`].
fn line_end(buf: &[u8], from: usize, too_long: &'static str) -> Result<Option<usize>, ChunkError> {
    let rest = &buf[from..];
    let Some(i) = rest.iter().position(|b| *b == b'\n' || *b == b'\r') else {
        return if rest.len() > MAX_CHUNK_LINE { Err(ChunkError::Malformed(too_long)) } else { Ok(None) };
    };
    if i > MAX_CHUNK_LINE {
        return Err(ChunkError::Malformed(too_long));
    }
    if rest[i] == b'\n' {
        return Err(ChunkError::Malformed("a line of the chunked body ends in a bare LF (CRLF is required)"));
    }
    match rest.get(i + 1) {
        None => Ok(None),
        Some(b'\n') => Ok(Some(from + i)),
        Some(_) => Err(ChunkError::Malformed("a bare CR in a line of the chunked body")),
    }
}

/// The position of the first LF in `head` that no CR comes before.
fn bare_lf(head: &[u8]) -> Option<usize> {
    head.iter().enumerate().position(|(i, b)| *b == b'\n' && (i == 0 || head[i - 1] != b'\r'))
}

async fn more(io: &mut Prefixed, buf: &mut Vec<u8>) -> Result<(), ChunkError> {
    buf.reserve(4096);
    fill(io, buf).await
}

/// The reason phrase of a status line.
fn reason(status: StatusCode) -> &'static str {
    status.canonical_reason().unwrap_or("")
}

/// The `date` header's value, formatted once a second per thread.
fn date() -> HeaderValue {
    thread_local! {
        static CACHE: std::cell::RefCell<(u64, Option<HeaderValue>)> = const { std::cell::RefCell::new((0, None)) };
    }
    let now = std::time::SystemTime::now();
    let secs = now.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        if c.0 != secs || c.1.is_none() {
            let text = httpdate::fmt_http_date(now);
            *c = (secs, HeaderValue::from_str(&text).ok());
        }
        c.1.clone().unwrap_or_else(|| HeaderValue::from_static("Thu, 01 Jan 1970 00:00:00 GMT"))
    })
}

/// A response ready for the socket.
enum Serialized {
    /// The head, with the body when it is small.
    Whole(Vec<u8>),
    /// The head, then a large body.
    Large(Vec<u8>, Bytes),
    /// The head, then chunks until the handler ends (chunked unless the client speaks HTTP/1.0).
    Stream(Vec<u8>, tokio::sync::mpsc::Receiver<Bytes>, Version),
}

/// Writes a response: its head, then its body (all at once, or a stream in chunks). Sets
/// `keep_alive` to false when the connection must close after it (a handler's
/// `connection: close`, a streamed body to an HTTP/1.0 client).
async fn write_response(io: &mut Prefixed, response: Response<Body>, version: Version, head_only: bool, keep_alive: &mut bool) -> std::io::Result<()> {
    let serialized = serialize(response, version, head_only, keep_alive);
    write_serialized(io, serialized).await
}

async fn write_serialized(io: &mut Prefixed, serialized: Serialized) -> std::io::Result<()> {
    match serialized {
        Serialized::Whole(out) => io.write_all(&out).await,
        Serialized::Large(out, body) => {
            io.write_all(&out).await?;
            drop(out);
            io.write_all(&body).await
        }
        Serialized::Stream(out, rx, version) => Box::pin(write_stream(io, out, rx, version)).await,
    }
}

fn serialize(response: Response<Body>, version: Version, head_only: bool, keep_alive: &mut bool) -> Serialized {
    let (parts, body) = response.into_parts();
    let status = parts.status;
    let upgrade = status == StatusCode::SWITCHING_PROTOCOLS;
    // 1xx, 204 and 304 never have a body (RFC 9112 6.3).
    let bodiless = status.is_informational() || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(reason(status).as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in parts.headers.iter() {
        if name == CONTENT_LENGTH || name == TRANSFER_ENCODING {
            continue;
        }
        if name == CONNECTION && !upgrade {
            if value.to_str().is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close"))) {
                *keep_alive = false;
            }
            continue;
        }
        header(&mut out, name.as_str().as_bytes(), value.as_bytes());
    }
    if !parts.headers.contains_key(DATE) {
        header(&mut out, b"date", date().as_bytes());
    }
    let streamed = matches!(body, Body::Stream(_)) && !bodiless && !head_only;
    if streamed && version == Version::HTTP_10 {
        // No chunked encoding in HTTP/1.0: the body ends when the connection does.
        *keep_alive = false;
    }
    if !upgrade {
        if !*keep_alive {
            header(&mut out, b"connection", b"close");
        } else if version == Version::HTTP_10 {
            header(&mut out, b"connection", b"keep-alive");
        }
    }
    match body {
        Body::Full(b) => {
            let b = b.unwrap_or_default();
            if !bodiless {
                // By hand: `write!` through fmt cost ~350 instructions per response.
                out.extend_from_slice(b"content-length: ");
                crate::access_log::decimal(&mut out, b.len() as u64);
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(b"\r\n");
            if bodiless || head_only || b.is_empty() {
                Serialized::Whole(out)
            } else if b.len() <= COALESCE {
                out.extend_from_slice(&b);
                Serialized::Whole(out)
            } else {
                Serialized::Large(out, b)
            }
        }
        Body::Stream(rx) => {
            if streamed && version == Version::HTTP_11 {
                header(&mut out, b"transfer-encoding", b"chunked");
            }
            out.extend_from_slice(b"\r\n");
            if streamed {
                Serialized::Stream(out, rx, version)
            } else {
                Serialized::Whole(out)
            }
        }
    }
}

/// Writes a streamed body as its chunks come, until the handler ends or the client goes.
async fn write_stream(io: &mut Prefixed, out: Vec<u8>, mut rx: tokio::sync::mpsc::Receiver<Bytes>, version: Version) -> std::io::Result<()> {
    io.write_all(&out).await?;
    drop(out);
    loop {
        let chunk = tokio::select! {
            c = rx.recv() => c,
            () = gone(io.stream.tcp()) => return Err(std::io::Error::new(std::io::ErrorKind::ConnectionAborted, "the client closed the connection")),
        };
        let Some(chunk) = chunk else { break };
        if chunk.is_empty() {
            continue;
        }
        if version == Version::HTTP_10 {
            io.write_all(&chunk).await?;
            continue;
        }
        let mut framed = Vec::with_capacity(chunk.len() + 16);
        let _ = write!(framed, "{:x}\r\n", chunk.len());
        framed.extend_from_slice(&chunk);
        framed.extend_from_slice(b"\r\n");
        io.write_all(&framed).await?;
    }
    if version == Version::HTTP_11 {
        io.write_all(b"0\r\n\r\n").await?;
    }
    Ok(())
}

/// Resolves when the client has closed the connection (or it failed). Bytes the client sent
/// ahead (a pipelined request) are left for later, and then nothing more can be told. A plain
/// struct rather than an `async fn`: a parked request's task holds it.
fn gone(stream: &tokio::net::TcpStream) -> Gone<'_> {
    Gone { stream, data: false }
}

struct Gone<'a> {
    stream: &'a tokio::net::TcpStream,
    data: bool,
}

impl std::future::Future for Gone<'_> {
    type Output = ();

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        use std::task::Poll;
        if self.data {
            return Poll::Pending;
        }
        // TLS: room for a whole close_notify record, which a leaving TLS client sends before
        // its FIN (crate::tls::is_close_alert).
        let mut byte = [0u8; 32];
        let mut peek = tokio::io::ReadBuf::new(&mut byte);
        match self.stream.poll_peek(cx, &mut peek) {
            Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => Poll::Ready(()),
            Poll::Ready(Ok(n)) if crate::tls::is_close_alert(&byte[..n]) => Poll::Ready(()),
            Poll::Ready(Ok(_)) => {
                self.data = true;
                Poll::Pending
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

fn header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Answers a request the handler never saw, then closes the connection without resetting it
/// under the client (unread request bytes are drained for a moment first).
async fn refuse(iface: &HttpInterface, io: &mut Prefixed, r: Refusal, peer: &str, id: &str) {
    iface.unrouted.record(r.status.as_u16());
    tracing::debug!(cage = %iface.spec.cage, interface = %iface.spec.name, request = %id, "refusing a request from {peer}: {} {}", r.status.as_u16(), r.reason);
    let text = format!("{} {}: {} (request id {id})\n", r.status.as_u16(), reason(r.status), r.reason);
    let mut out = Vec::with_capacity(text.len() + 160);
    out.extend_from_slice(format!("HTTP/1.1 {} {}\r\n", r.status.as_u16(), reason(r.status)).as_bytes());
    header(&mut out, b"content-type", b"text/plain; charset=utf-8");
    header(&mut out, b"x-request-id", id.as_bytes());
    header(&mut out, b"date", date().as_bytes());
    header(&mut out, b"connection", b"close");
    let _ = write!(out, "content-length: {}\r\n", text.len());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(text.as_bytes());
    let _ = tokio::time::timeout(LINGER, async {
        if io.write_all(&out).await.is_err() {
            return;
        }
        let _ = io.stream.shutdown().await;
        let mut sink = vec![0u8; 4096];
        let mut drained = 0;
        while drained < LINGER_BYTES {
            match tokio::io::AsyncReadExt::read(&mut io.stream, &mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
    })
    .await;
}

/// For the fuzz target: the parts of a whole request head at the start of `data`, as a
/// handler would get them.
pub fn fuzz_head(data: &[u8]) -> Option<hyper::http::request::Parts> {
    parse(data, 16 << 10).ok()?.map(|(head, _)| head.parts)
}

/// One step of a connection as [`fuzz_connection`] saw it.
#[derive(Debug, PartialEq)]
pub enum Step {
    /// A request the handler would run: method, target, version (0 or 1), header fields as
    /// received (framing fields included), body.
    Request { method: String, target: String, version: u8, headers: Vec<(String, Vec<u8>)>, body: Vec<u8> },
    /// The status of a refusal; the connection closes after it.
    Refused(u16),
}

/// What a connection made of a client's bytes (for the fuzz target).
#[derive(Debug, PartialEq)]
pub struct Connection {
    pub steps: Vec<Step>,
    /// Bytes taken by the requests read whole, from the start.
    pub consumed: usize,
    /// Whether the connection is waiting for more bytes of a request when the input ends.
    pub waiting: bool,
}

/// The client's bytes as they arrive: in pieces ending at the cuts.
struct Feed<'a> {
    data: &'a [u8],
    ends: std::vec::IntoIter<usize>,
    fed: usize,
}

impl Feed<'_> {
    /// Like [`fill`]: the next piece into `buf`, false at the end of the input.
    fn fill(&mut self, buf: &mut Vec<u8>) -> bool {
        for end in self.ends.by_ref() {
            if end > self.fed {
                buf.extend_from_slice(&self.data[self.fed..end]);
                self.fed = end;
                return true;
            }
        }
        false
    }
}

/// Runs a client's bytes through the head parser and body framing exactly as a connection
/// does, the bytes arriving in pieces that end at each of `cuts` (then the rest): pipelined
/// requests one after another until one is refused, says `connection: close`, upgrades, or
/// the bytes end. The limits are those of the default settings.
pub fn fuzz_connection(data: &[u8], cuts: &[usize]) -> Connection {
    const MAX_HEADER: usize = 16 << 10;
    const MAX_BODY: u64 = 64 << 10;
    let mut ends = cuts.iter().copied().filter(|c| *c <= data.len()).collect::<Vec<_>>();
    ends.sort_unstable();
    ends.push(data.len());
    let mut feed = Feed { data, ends: ends.into_iter(), fed: 0 };
    let mut conn = Connection { steps: Vec::new(), consumed: 0, waiting: false };
    let mut buf = Vec::new();
    loop {
        let head = loop {
            if !buf.is_empty() {
                match parse(&buf, MAX_HEADER) {
                    Ok(Some((head, used))) => {
                        buf.drain(..used);
                        break head;
                    }
                    Ok(None) if buf.len() > MAX_HEADER => {
                        conn.steps.push(Step::Refused(431));
                        return conn;
                    }
                    Ok(None) => {}
                    Err(r) => {
                        conn.steps.push(Step::Refused(r.status.as_u16()));
                        return conn;
                    }
                }
            }
            if !feed.fill(&mut buf) {
                conn.waiting = !buf.is_empty();
                return conn;
            }
        };
        let body = match head.framing {
            Framing::None => Vec::new(),
            Framing::Length(n) if n > MAX_BODY => {
                conn.steps.push(Step::Refused(413));
                return conn;
            }
            Framing::Length(n) => {
                while (buf.len() as u64) < n {
                    if !feed.fill(&mut buf) {
                        conn.waiting = true;
                        return conn;
                    }
                }
                buf.drain(..n as usize).collect()
            }
            Framing::Chunked => {
                let mut decoder = Chunked::new(MAX_BODY);
                loop {
                    match decoder.feed(&mut buf) {
                        Ok(true) => break decoder.body,
                        Ok(false) => {
                            if !feed.fill(&mut buf) {
                                conn.waiting = true;
                                return conn;
                            }
                        }
                        Err(e) => {
                            conn.steps.push(Step::Refused(if matches!(e, ChunkError::TooLarge) { 413 } else { 400 }));
                            return conn;
                        }
                    }
                }
            }
        };
        let parts = &head.parts;
        conn.steps.push(Step::Request {
            method: parts.method.to_string(),
            target: parts.uri.to_string(),
            version: u8::from(parts.version == Version::HTTP_11),
            headers: parts.headers.iter().map(|(n, v)| (n.to_string(), v.as_bytes().to_vec())).collect(),
            body,
        });
        conn.consumed = feed.fed - buf.len();
        if !head.keep_alive || head.websocket {
            return conn;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_bodies_decode_across_any_split() {
        let wire = b"5;ext=1\r\nhello\r\nA\r\n, world!!!\r\n0\r\nx-trailer: 1\r\n\r\nGET /next";
        for split in 0..wire.len() {
            let mut d = Chunked::new(1 << 20);
            let mut buf = wire[..split].to_vec();
            let mut done = d.feed(&mut buf).unwrap();
            buf.extend_from_slice(&wire[split..]);
            if !done {
                done = d.feed(&mut buf).unwrap();
            }
            assert!(done, "split at {split}");
            assert_eq!(d.body, b"hello, world!!!");
            assert_eq!(buf, b"GET /next", "split at {split}");
        }
        let mut d = Chunked::new(4);
        assert!(matches!(d.feed(&mut b"5\r\nhello\r\n0\r\n\r\n".to_vec()), Err(ChunkError::TooLarge)));
        for bad in [&b"x\r\n"[..], b"5\r\nhelloXX", b"-1\r\n", b"1ffffffffffffffff\r\n"] {
            assert!(matches!(Chunked::new(1 << 20).feed(&mut bad.to_vec()), Err(ChunkError::Malformed(_))), "{:?}", String::from_utf8_lossy(bad));
        }
        let mut long = vec![b'1'; MAX_CHUNK_LINE + 10];
        assert!(Chunked::new(1 << 20).feed(&mut long).is_err());
    }

    /// Issue 12: bare-LF chunk lines were waited on until the deadline (the decoder looked
    /// only for CRLF), while bare-LF heads were accepted. Both are refused now, at once.
    #[test]
    fn bare_lf_and_bare_cr_are_refused_in_chunk_lines_and_heads() {
        for bad in [&b"5\nhello\r\n0\r\n\r\n"[..], b"5\r\nhello\r\n0\n\r\n", b"5\r\nhello\r\n0\r\nx: 1\n\r\n", b"5;a\rb\r\nhello\r\n", b"5\r\nhello\r\n0\r\n\n"]
        {
            let r = Chunked::new(1 << 20).feed(&mut bad.to_vec());
            assert!(matches!(r, Err(ChunkError::Malformed(_))), "{:?}: {r:?}", String::from_utf8_lossy(bad));
        }
        // Refused as soon as the bare LF is there, not when the line would be too long.
        assert!(matches!(Chunked::new(1 << 20).feed(&mut b"5\n".to_vec()), Err(ChunkError::Malformed(_))));
        let status = |t: &str| head(t).err().map(|r| r.status.as_u16());
        assert_eq!(status("GET / HTTP/1.1\nHost: x\n\n"), Some(400));
        assert_eq!(status("GET / HTTP/1.1\r\nHost: x\n\r\n"), Some(400));
        assert_eq!(status("GET / HTTP/1.1\r\nHost: x\r\n\n"), Some(400));
        assert!(head("GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap().is_some());
        assert_eq!(status("GET / HTTP/1.1\nHost: x"), Some(400), "refused before the head is whole");
        assert!(head("GET / HTTP/1.1\r").unwrap().is_none(), "a CR at the end waits for its LF");
    }

    #[test]
    fn mutated_requests_never_panic() {
        let seeds: [&[u8]; 3] = [
            b"POST /a?b=1 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5;e=1\r\nhello\r\n0\r\nt: 1\r\n\r\n",
            b"PUT /x HTTP/1.1\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc",
            b"GET http://h/p HTTP/1.0\r\nConnection: keep-alive\r\nX-A: 1\r\nX-A: 2\r\n\r\n",
        ];
        for seed in seeds {
            let conn = fuzz_connection(seed, &[]);
            assert!(matches!(conn.steps.as_slice(), [Step::Request { .. }]) && !conn.waiting, "seed {:?}: {conn:?}", String::from_utf8_lossy(seed));
        }
        // A small xorshift generator: the same mutations on every run.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut whole = 0;
        for i in 0..20_000 {
            let mut data = seeds[i % seeds.len()].to_vec();
            for _ in 0..1 + next() % 4 {
                let at = (next() as usize) % (data.len() + 1);
                match next() % 4 {
                    0 if at < data.len() => data[at] = next() as u8,
                    1 => data.insert(at, b"\r\n:;0 \t"[(next() % 7) as usize]),
                    2 if at < data.len() => {
                        data.remove(at);
                    }
                    _ => data.truncate(at),
                }
            }
            if matches!(fuzz_connection(&data, &[]).steps.first(), Some(Step::Request { .. })) {
                whole += 1;
            }
        }
        // The mutations must leave some requests whole, or the test exercises only the refusals.
        assert!(whole > 1000, "only {whole} of 20000 mutated requests parsed");
    }

    fn head(text: &str) -> Result<Option<(Box<Head>, usize)>, Refusal> {
        parse(text.as_bytes(), 16 << 10)
    }

    #[test]
    fn parses_a_request_head() {
        let (h, used) = head("GET /a?b=1 HTTP/1.1\r\nHost: x\r\nX-A: 1\r\nX-A: 2\r\n\r\nrest").unwrap().unwrap();
        assert_eq!(used, "GET /a?b=1 HTTP/1.1\r\nHost: x\r\nX-A: 1\r\nX-A: 2\r\n\r\n".len());
        assert_eq!(h.parts.uri.path(), "/a");
        assert_eq!(h.parts.headers.get_all("x-a").iter().count(), 2);
        assert!(h.keep_alive);
        assert_eq!(h.framing, Framing::None);
        assert!(head("GET /a HTTP/1.1\r\nHost: x\r\n").unwrap().is_none());
    }

    #[test]
    fn keep_alive_follows_the_version_and_connection_header() {
        assert!(!head("GET / HTTP/1.0\r\n\r\n").unwrap().unwrap().0.keep_alive);
        assert!(head("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").unwrap().unwrap().0.keep_alive);
        assert!(!head("GET / HTTP/1.1\r\nConnection: upgrade, close\r\n\r\n").unwrap().unwrap().0.keep_alive);
    }

    #[test]
    fn ambiguous_framing_is_refused() {
        let status = |t: &str| head(t).err().map(|r| r.status.as_u16());
        assert_eq!(status("POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"), Some(400));
        assert_eq!(status("POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"), Some(400));
        assert_eq!(status("POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n"), Some(400));
        assert_eq!(status("POST / HTTP/1.1\r\nContent-Length: 5x\r\n\r\n"), Some(400));
        assert_eq!(status("POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n"), Some(501));
        assert_eq!(status("POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n"), Some(501));
        assert_eq!(status("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"), Some(400));
        assert_eq!(head("POST / HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\n").unwrap().unwrap().0.framing, Framing::Length(5));
        assert_eq!(head("POST / HTTP/1.1\r\nTransfer-Encoding: Chunked\r\n\r\n").unwrap().unwrap().0.framing, Framing::Chunked);
    }

    #[test]
    fn the_headers_noted_while_parsing_are_the_ones_the_lookups_would_find() {
        // Any case of the name, among other headers, repeated or not.
        let h = head("POST / HTTP/1.1\r\nX-A: 1\r\nCONTENT-length: 3\r\nTraceParent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\nContent-Type: text/plain\r\nExpect: 100-continue\r\n\r\n")
            .unwrap()
            .unwrap()
            .0;
        assert_eq!(h.framing, Framing::Length(3));
        assert!(h.present.traceparent && h.present.content_type && h.expect_continue && h.keep_alive && !h.websocket);
        let h = head("GET / HTTP/1.1\r\nhost: x\r\n\r\n").unwrap().unwrap().0;
        assert!(!h.present.traceparent && !h.present.content_type && !h.expect_continue && h.keep_alive && !h.websocket);
        assert_eq!(h.framing, Framing::None);
        let ws = "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: WebSocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
        assert!(head(ws).unwrap().unwrap().0.websocket);
        assert!(!head(&ws.replace("Upgrade: WebSocket\r\n", "")).unwrap().unwrap().0.websocket);
        let chunked = head("POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n").unwrap().unwrap().0;
        assert_eq!(chunked.framing, Framing::Chunked);
        assert!(!head("GET / HTTP/1.1\r\nconnection: close\r\n\r\n").unwrap().unwrap().0.keep_alive);
        assert!(!head("GET / HTTP/1.0\r\nexpect: 100-continue\r\n\r\n").unwrap().unwrap().0.expect_continue);
    }

    #[test]
    fn malformed_heads_are_refused_with_their_status() {
        let status = |t: &str| head(t).err().map(|r| r.status.as_u16());
        assert_eq!(status("GET / HTTP/2.0\r\n\r\n"), Some(400));
        assert_eq!(status("GET / HTTP/1.1\r\nBad Name: x\r\n\r\n"), Some(400));
        assert_eq!(status("GET / HTTP/1.1\r\nA: b\r\n folded\r\n\r\n"), Some(400));
        let many: String = (0..=MAX_HEADERS).map(|i| format!("h{i}: v\r\n")).collect();
        assert_eq!(status(&format!("GET / HTTP/1.1\r\n{many}\r\n")), Some(431));
    }
}
