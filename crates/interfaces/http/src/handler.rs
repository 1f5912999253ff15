//! One HTTP request: limits, the Lua request and response tables, the handler's coroutine, and
//! turning its result (or failure) into a response.

use std::rc::Rc;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use rustomnic_lua::convert::from_lua;
use rustomnic_lua::mlua::{Lua, MultiValue, Table, Value as LuaValue};
use rustomnic_lua::{worker, RequestCtx, RequestFuture, RunError};
use tokio::io::AsyncWriteExt;

use crate::stream::{Body, Slot, SlotGuard};
use crate::HttpInterface;

/// Answers a connection over the limit and closes it.
pub(crate) async fn refuse_overloaded(mut stream: tokio::net::TcpStream) {
    let reply = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\ncontent-length: 34\r\nconnection: close\r\n\r\ntoo many connections, retry later\n";
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), stream.write_all(reply)).await;
    let _ = stream.shutdown().await;
}

fn plain(status: StatusCode, id: &str, text: &str) -> Response<Body> {
    let mut r = Response::new(Body::full(format!("{text} (request id {id})\n")));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    if let Ok(v) = HeaderValue::from_str(id) {
        h.insert("x-request-id", v);
    }
    r
}

/// The hyper side (HTTP/2): reads the body, runs the handler, and lets a handler that answered
/// early (a stream) go on in a task of its own. `peer` is the client's address, formatted once
/// per connection rather than for every request.
pub(crate) async fn handle(iface: Arc<HttpInterface>, req: Request<Incoming>, peer: Rc<str>, busy: crate::Busy) -> Result<Response<Body>, std::convert::Infallible> {
    let spec = &iface.spec;
    let ctx = RequestCtx::new(&spec.cage, &spec.name, spec.request_timeout);
    let id = ctx.id.clone();
    // Only what the debug line needs, and only when it will be written.
    let debug = tracing::enabled!(tracing::Level::DEBUG).then(|| (std::time::Instant::now(), req.method().clone(), req.uri().path().to_string()));
    let response = match Box::pin(collect(&iface, req, &ctx)).await {
        Err(response) => response,
        Ok((parts, body)) => {
            let started = start(&iface, parts, body, &peer, ctx, None);
            let mut answer = Answer::new(&iface, started, id.clone());
            match *(&mut answer).await {
                Outcome::Done(response) => response,
                Outcome::Early(head) => {
                    tokio::task::spawn_local(async move {
                        answer.rest().await;
                        drop(busy);
                    });
                    head
                }
            }
        }
    };
    if let Some((started, method, path)) = debug {
        tracing::debug!(cage = %spec.cage, interface = %spec.name, request = %id, "{method} {path} {} {:.1}ms", response.status().as_u16(), started.elapsed().as_secs_f64() * 1e3);
    }
    Ok(response)
}

/// An HTTP/1.1 GET asking for a WebSocket (RFC 6455 4.2.1).
pub(crate) fn is_websocket(method: &hyper::Method, version: hyper::Version, h: &hyper::HeaderMap) -> bool {
    let has = |name: hyper::header::HeaderName, token: &str| {
        h.get_all(name).iter().any(|v| v.to_str().is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token))))
    };
    method == hyper::Method::GET
        && version == hyper::Version::HTTP_11
        && has(hyper::header::UPGRADE, "websocket")
        && has(hyper::header::CONNECTION, "upgrade")
        && h.contains_key("sec-websocket-key")
}

/// Reads a hyper request's body within the deadline and max_body_size.
async fn collect(iface: &HttpInterface, req: Request<Incoming>, ctx: &RequestCtx) -> Result<(hyper::http::request::Parts, Bytes), Response<Body>> {
    let id = &ctx.id;
    let limit = iface.settings.max_body_size;
    let declared = req.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(plain(StatusCode::PAYLOAD_TOO_LARGE, id, &format!("request body over the limit of {limit} bytes")));
    }
    let (parts, body) = req.into_parts();
    match tokio::time::timeout_at(ctx.deadline.into(), Limited::new(body, limit as usize).collect()).await {
        Ok(Ok(b)) => Ok((parts, b.to_bytes())),
        Ok(Err(e)) => {
            if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() {
                return Err(plain(StatusCode::PAYLOAD_TOO_LARGE, id, &format!("request body over the limit of {limit} bytes")));
            }
            Err(plain(StatusCode::BAD_REQUEST, id, "request body could not be read"))
        }
        Err(_) => Err(plain(StatusCode::REQUEST_TIMEOUT, id, "request body not received before the deadline")),
    }
}

/// A WebSocket request's way to its connection once the 101 is sent, and the client's key.
pub(crate) type Upgrade = (tokio::sync::oneshot::Receiver<crate::Prefixed>, Bytes);

/// Starts the handler's coroutine with the request and response tables.
pub(crate) fn start(iface: &HttpInterface, parts: hyper::http::request::Parts, body: Bytes, peer: &str, ctx: RequestCtx, upgrade: Option<Upgrade>) -> Started {
    let spec = &iface.spec;
    let id = ctx.id.clone();
    let websocket = upgrade.is_some();
    let Some(vm) = worker::cage(&spec.cage) else {
        tracing::error!(cage = %spec.cage, interface = %spec.name, request = %id, "cage has no VM on this worker");
        return Err(Box::new(plain(StatusCode::SERVICE_UNAVAILABLE, &id, "cage is not running")));
    };
    let (module, function) = &spec.handler.value;
    let slot = Slot::register(&id, upgrade, iface.settings.write_timeout, iface.settings.max_message_size);
    let started = vm.function(module, function).and_then(|handler| {
        let tables = vm.helper("http_request", TABLES)?;
        let api = crate::lua_api::api(&vm)?;
        let lua = vm.lua();
        let internal = |e: rustomnic_lua::mlua::Error| RunError::Internal(format!("request tables: {e}"));
        let args = (|| {
            Ok::<_, rustomnic_lua::mlua::Error>(MultiValue::from_iter([
                LuaValue::String(lua.create_string(parts.method.as_str())?),
                LuaValue::String(lua.create_string(percent_decode(parts.uri.path()))?),
                LuaValue::String(lua.create_string(parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"))?),
                query_table(lua, &parts)?,
                LuaValue::Table(header_table(lua, &parts)?),
                if body.is_empty() { LuaValue::Nil } else { LuaValue::String(lua.create_string(&body)?) },
                LuaValue::String(lua.create_string(peer)?),
                LuaValue::String(lua.create_string(version_name(parts.version))?),
                LuaValue::Table(api),
                LuaValue::Boolean(websocket),
            ]))
        })()
        .map_err(internal)?;
        let (request, response): (Table, Table) = tables.call(args).map_err(internal)?;
        let fut = vm.start_function(ctx, handler, |_| Ok(MultiValue::from_iter([LuaValue::Table(request), LuaValue::Table(response.clone())])))?;
        Ok((fut, response))
    });
    Ok((started, slot))
}

/// How a handler answered: with its whole response, or with a response head it sent early
/// (`response.stream`, `request.upgrade`) while it goes on.
pub(crate) enum Outcome {
    Done(Response<Body>),
    /// The head the handler sent early; [`Answer::rest`] then drives the handler to its end.
    Early(Response<Body>),
}

/// A started handler, or the response that says why it could not start.
pub(crate) type Started = Result<(Result<(RequestFuture, Table), RunError>, SlotGuard), Box<Response<Body>>>;

/// Waits for a started handler's answer. Written by hand rather than as an `async fn`: this is
/// what a parked request's task holds, and it should hold nothing else.
pub(crate) struct Answer {
    iface: Arc<HttpInterface>,
    pub(crate) id: String,
    state: AnswerState,
}

enum AnswerState {
    /// The handler's coroutine, its slot and its response table.
    Running(RequestFuture, SlotGuard, Table),
    /// Answered early: the handler goes on, and its slot (a stream's sender, the WebSocket)
    /// stays until it ends.
    Continuing { fut: RequestFuture, _slot: SlotGuard },
    NotStarted(RunError),
    Refused(Box<Response<Body>>),
    Done,
}

impl Answer {
    pub(crate) fn new(iface: &Arc<HttpInterface>, started: Started, id: String) -> Answer {
        let state = match started {
            Ok((Ok((fut, response)), slot)) => AnswerState::Running(fut, slot, response),
            Ok((Err(e), _slot)) => AnswerState::NotStarted(e),
            Err(response) => AnswerState::Refused(response),
        };
        Answer { iface: iface.clone(), id, state }
    }

    /// After an early answer: resolves when the handler has ended, and logs how. The slot goes
    /// after the handler's end: that ends a stream's body and closes a WebSocket the handler
    /// left open.
    pub(crate) fn rest(&mut self) -> impl std::future::Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            let AnswerState::Continuing { fut, .. } = &mut self.state else { return std::task::Poll::Ready(()) };
            let r = std::task::ready!(std::future::Future::poll(std::pin::Pin::new(fut), cx));
            log_outcome(&self.iface, &self.id, r);
            self.state = AnswerState::Done;
            std::task::Poll::Ready(())
        })
    }
}

/// Boxed: a value awaited in a task takes room in it for the task's life.
impl std::future::Future for Answer {
    type Output = Box<Outcome>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Box<Outcome>> {
        use std::task::Poll;
        let this = self.get_mut();
        if let AnswerState::Running(fut, slot, response) = &mut this.state {
            // The handler first: it either ends (the usual case) or sends its response head
            // early (response.stream, request.upgrade) and goes on.
            match std::pin::Pin::new(&mut *fut).poll(cx) {
                Poll::Ready(r) if slot.0.replied() => {
                    // It started a stream and ended within one poll: the head is sent, its
                    // body ends as the slot goes.
                    log_outcome(&this.iface, &this.id, r);
                    let head = slot.0.take_reply();
                    this.state = AnswerState::Done;
                    if let Some(head) = head {
                        return Poll::Ready(Box::new(Outcome::Done(head)));
                    }
                    return Poll::Ready(Box::new(Outcome::Done(plain(StatusCode::INTERNAL_SERVER_ERROR, &this.id, "internal error"))));
                }
                Poll::Ready(r) => {
                    let answer = match r {
                        Ok(values) => returned(&this.iface, response, values, &this.id),
                        Err(e) => failed(&this.iface, e, &this.id),
                    };
                    this.state = AnswerState::Done;
                    return Poll::Ready(Box::new(Outcome::Done(answer)));
                }
                Poll::Pending => {}
            }
            return match slot.0.poll_reply(cx) {
                Poll::Ready(head) => match std::mem::replace(&mut this.state, AnswerState::Done) {
                    AnswerState::Running(fut, slot, _) => {
                        this.state = AnswerState::Continuing { fut, _slot: slot };
                        Poll::Ready(Box::new(Outcome::Early(head)))
                    }
                    _ => Poll::Pending,
                },
                Poll::Pending => Poll::Pending,
            };
        }
        match std::mem::replace(&mut this.state, AnswerState::Done) {
            AnswerState::NotStarted(e) => Poll::Ready(Box::new(Outcome::Done(failed(&this.iface, e, &this.id)))),
            AnswerState::Refused(response) => Poll::Ready(Box::new(Outcome::Done(*response))),
            // Polled again after it answered: it never answers twice.
            state @ (AnswerState::Running(..) | AnswerState::Continuing { .. } | AnswerState::Done) => {
                this.state = state;
                Poll::Pending
            }
        }
    }
}

/// The response of a handler that returned: its response table and what it returned.
fn returned(iface: &HttpInterface, response: &Table, values: MultiValue, id: &str) -> Response<Body> {
    build_response(response, values, id).unwrap_or_else(|message| {
        let spec = &iface.spec;
        let (module, function) = &spec.handler.value;
        tracing::error!(cage = %spec.cage, interface = %spec.name, request = %id, "handler {module}.{function} returned a bad response: {message}");
        plain(StatusCode::INTERNAL_SERVER_ERROR, id, "internal error")
    })
}

/// The response for a handler that failed, or could not start.
fn failed(iface: &HttpInterface, e: RunError, id: &str) -> Response<Body> {
    let spec = &iface.spec;
    let (module, function) = &spec.handler.value;
    match e {
        RunError::Deadline => {
            tracing::warn!(cage = %spec.cage, interface = %spec.name, request = %id, "deadline exceeded ({:?}) in {module}.{function}", spec.request_timeout);
            plain(StatusCode::GATEWAY_TIMEOUT, id, "deadline exceeded")
        }
        e @ RunError::Failed { .. } => {
            // One line per record: the request id is printed at its end, and a traceback split
            // over lines would leave the error text on lines that do not carry the id.
            tracing::error!(cage = %spec.cage, interface = %spec.name, request = %id, "{module}.{function} failed: {}", e.log_text());
            plain(StatusCode::INTERNAL_SERVER_ERROR, id, "internal error")
        }
        e => {
            tracing::error!(cage = %spec.cage, interface = %spec.name, request = %id, "{module}.{function}: {e}");
            plain(StatusCode::INTERNAL_SERVER_ERROR, id, "internal error")
        }
    }
}

/// Builds the request and response tables; the coroutine then runs the handler itself, so no
/// frame of this function stays on its stack while the handler waits (a parked request's stack
/// then fits in Lua's second size step, 80 slots). `response.stream` comes from a shared
/// metatable and `request.upgrade` exists only on upgrade requests, so plain requests pay for
/// neither; `body` and `websocket` come through the request's metatable, which keeps a request's
/// table within 8 hash slots.
const TABLES: &str = r#"
local setmetatable, readonly, locked = __pmnc_setmetatable, __pmnc_readonly, __pmnc_locked
-- Shared by every request of the VM, so no module may change them (see the prelude).
local request_mt = locked({ __index = readonly({ body = "", websocket = false }, "request") })
local websocket_mt = locked({ __index = readonly({ body = "", websocket = true }, "request") })
return function(method, path, uri, query, headers, body, remote_addr, version, api, websocket)
  local response = setmetatable({ status = 200, headers = {} }, api.response_mt)
  local request = setmetatable({
    method = method, path = path, uri = uri, query = query or {}, headers = headers,
    remote_addr = remote_addr, version = version,
  }, websocket and websocket_mt or request_mt)
  if body then request.body = body end
  if websocket then request.upgrade = api.upgrader(response) end
  return request, response
end
"#;

/// Logs how a handler that answered early (a stream, a WebSocket) ended.
fn log_outcome(iface: &HttpInterface, id: &str, r: Result<MultiValue, RunError>) {
    let spec = &iface.spec;
    let (module, function) = &spec.handler.value;
    match r {
        Ok(_) => {}
        Err(RunError::Deadline) => {
            tracing::info!(cage = %spec.cage, interface = %spec.name, request = %id, "{module}.{function}: a streaming or WebSocket handler reached its deadline")
        }
        Err(e) => tracing::error!(cage = %spec.cage, interface = %spec.name, request = %id, "{module}.{function} failed: {}", e.log_text()),
    }
}

fn version_name(v: hyper::Version) -> &'static str {
    match v {
        hyper::Version::HTTP_09 => "HTTP/0.9",
        hyper::Version::HTTP_10 => "HTTP/1.0",
        hyper::Version::HTTP_11 => "HTTP/1.1",
        hyper::Version::HTTP_2 => "HTTP/2.0",
        hyper::Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP",
    }
}

/// Lower-case names; repeated headers joined with ", ". One pass over the headers: the values of
/// a repeated name come one after another.
fn header_table(lua: &Lua, parts: &hyper::http::request::Parts) -> rustomnic_lua::mlua::Result<Table> {
    let headers = lua.create_table_with_capacity(0, parts.headers.keys_len())?;
    let mut pending: Option<(&HeaderName, Vec<u8>)> = None;
    for (name, value) in parts.headers.iter() {
        match &mut pending {
            Some((n, joined)) if *n == name => {
                joined.extend_from_slice(b", ");
                joined.extend_from_slice(value.as_bytes());
            }
            _ => {
                if let Some((n, joined)) = pending.take() {
                    headers.raw_set(lua.create_string(n.as_str())?, lua.create_string(&joined)?)?;
                }
                pending = Some((name, value.as_bytes().to_vec()));
            }
        }
    }
    if let Some((n, joined)) = pending {
        headers.raw_set(lua.create_string(n.as_str())?, lua.create_string(&joined)?)?;
    }
    Ok(headers)
}

/// The decoded query parameters, or nil when there are none (the adapter makes an empty table).
fn query_table(lua: &Lua, parts: &hyper::http::request::Parts) -> rustomnic_lua::mlua::Result<LuaValue> {
    let Some(q) = parts.uri.query() else { return Ok(LuaValue::Nil) };
    let query = lua.create_table()?;
    for (k, v) in form_urlencoded::parse(q.as_bytes()) {
        query.raw_set(k.as_ref(), v.as_ref())?;
    }
    Ok(LuaValue::Table(query))
}

/// For the fuzz target: `request.path`, `request.query` and `request.headers` as a handler
/// gets them from a request's parts.
pub fn fuzz_tables(lua: &Lua, parts: &hyper::http::request::Parts) -> rustomnic_lua::mlua::Result<(Vec<u8>, LuaValue, Table)> {
    Ok((percent_decode(parts.uri.path()), query_table(lua, parts)?, header_table(lua, parts)?))
}

/// `%XX` decoded to its byte; a `%` without two hex digits after it stays as it is.
pub fn percent_decode(path: &str) -> Vec<u8> {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = |b: u8| (b as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    out
}

/// The handler's first return value wins over `response.body`: a string is the body, a table is
/// sent as JSON.
fn build_response(response: &Table, values: MultiValue, id: &str) -> Result<Response<Body>, String> {
    let returned = values.into_iter().next().unwrap_or(LuaValue::Nil);
    let body_value = match returned {
        LuaValue::Nil => response.raw_get("body").map_err(|e| e.to_string())?,
        v => v,
    };
    let mut json = false;
    let body: Bytes = match body_value {
        LuaValue::Nil => Bytes::new(),
        LuaValue::String(s) => Bytes::from(s.as_bytes().to_vec()),
        LuaValue::Integer(_) | LuaValue::Number(_) => Bytes::from(body_value.to_string().map_err(|e| e.to_string())?),
        v @ LuaValue::Table(_) => {
            json = true;
            let value = from_lua(&v).map_err(|e| format!("the returned table cannot be sent as JSON: {e}"))?;
            let text = value.to_json().map_err(|e| format!("the returned table cannot be sent as JSON: {e}"))?;
            Bytes::from(text.to_string())
        }
        other => return Err(format!("the body must be a string or a table, got {}", other.type_name())),
    };
    let mut r = response_head(response, Body::full(body), id)?;
    let h = r.headers_mut();
    if json && !h.contains_key(CONTENT_TYPE) {
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    }
    if !h.contains_key(CONTENT_TYPE) {
        h.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    }
    Ok(r)
}

/// A response with the status and headers the handler set on its `response` table.
pub(crate) fn response_head(response: &Table, body: Body, id: &str) -> Result<Response<Body>, String> {
    let status: LuaValue = response.raw_get("status").map_err(|e| e.to_string())?;
    let status = match status {
        LuaValue::Integer(n) if (100..=599).contains(&n) => StatusCode::from_u16(n as u16).map_err(|e| e.to_string())?,
        LuaValue::Nil => StatusCode::OK,
        other => return Err(format!("response.status must be an integer 100..599, got {}", describe(&other))),
    };
    let mut r = Response::new(body);
    *r.status_mut() = status;
    let h = r.headers_mut();
    if let LuaValue::Table(headers) = response.raw_get("headers").map_err(|e| e.to_string())? {
        for pair in headers.pairs::<LuaValue, LuaValue>() {
            let (k, v) = pair.map_err(|e| e.to_string())?;
            let LuaValue::String(k) = k else { return Err("response.headers keys must be strings".into()) };
            let name = HeaderName::from_bytes(&k.as_bytes()).map_err(|_| format!("response header name {:?} is not valid", k.to_string_lossy()))?;
            let mut add = |v: &LuaValue| -> Result<(), String> {
                let text = match v {
                    LuaValue::String(s) => s.as_bytes().to_vec(),
                    LuaValue::Integer(_) | LuaValue::Number(_) => v.to_string().map_err(|e| e.to_string())?.into_bytes(),
                    other => return Err(format!("response header {name} must be a string, got {}", other.type_name())),
                };
                let value = HeaderValue::from_bytes(&text).map_err(|_| format!("response header {name} has a value that is not allowed in HTTP"))?;
                h.append(name.clone(), value);
                Ok(())
            };
            match &v {
                LuaValue::Table(list) => {
                    for item in list.sequence_values::<LuaValue>() {
                        add(&item.map_err(|e| e.to_string())?)?;
                    }
                }
                single => add(single)?,
            }
        }
    }
    if let Ok(v) = HeaderValue::from_str(id) {
        h.insert("x-request-id", v);
    }
    Ok(r)
}

fn describe(v: &LuaValue) -> String {
    match v {
        LuaValue::String(s) => format!("the string {:?}", s.to_string_lossy()),
        LuaValue::Number(n) => format!("{n}"),
        LuaValue::Integer(n) => format!("{n}"),
        other => other.type_name().to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn percent_decoding() {
        assert_eq!(super::percent_decode("/a%20b/%zz/%4"), b"/a b/%zz/%4");
        assert_eq!(super::percent_decode("%41"), b"A");
    }
}
