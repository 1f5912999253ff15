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

/// `peer` is the client's address, formatted once per connection rather than for every request.
pub(crate) async fn handle(iface: Arc<HttpInterface>, req: Request<Incoming>, peer: Rc<str>, busy: crate::Busy) -> Result<Response<Body>, std::convert::Infallible> {
    let spec = &iface.spec;
    // A WebSocket session lives as long as its connection, so it gets its own deadline.
    let timeout = if is_websocket(&req) { iface.settings.websocket_timeout } else { spec.request_timeout };
    let ctx = RequestCtx::new(&spec.cage, &spec.name, timeout);
    // Only what the debug line needs, and only when it will be written.
    let debug = tracing::enabled!(tracing::Level::DEBUG).then(|| (ctx.id.clone(), std::time::Instant::now(), req.method().clone(), req.uri().path().to_string()));
    let response = respond(&iface, req, &peer, ctx, busy).await;
    if let Some((id, started, method, path)) = debug {
        tracing::debug!(cage = %spec.cage, interface = %spec.name, request = %id, "{method} {path} {} {:.1}ms", response.status().as_u16(), started.elapsed().as_secs_f64() * 1e3);
    }
    Ok(response)
}

/// An HTTP/1.1 GET asking for a WebSocket (RFC 6455 4.2.1).
fn is_websocket(req: &Request<Incoming>) -> bool {
    let h = req.headers();
    let has = |name: hyper::header::HeaderName, token: &str| {
        h.get_all(name).iter().any(|v| v.to_str().is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token))))
    };
    req.method() == hyper::Method::GET
        && req.version() == hyper::Version::HTTP_11
        && has(hyper::header::UPGRADE, "websocket")
        && has(hyper::header::CONNECTION, "upgrade")
        && h.contains_key("sec-websocket-key")
}

/// Reads the body and starts the handler's coroutine. Boxed by the caller: its state (the body
/// being collected, the request head) is large, and a parked request must not keep it.
async fn prepare(iface: &HttpInterface, mut req: Request<Incoming>, peer: &str, ctx: RequestCtx) -> Result<(Result<RequestFuture, RunError>, SlotGuard), Response<Body>> {
    let spec = &iface.spec;
    let id = ctx.id.clone();
    let upgrade = if is_websocket(&req) {
        let key = req.headers().get("sec-websocket-key").map(|k| Bytes::copy_from_slice(k.as_bytes())).unwrap_or_default();
        Some((hyper::upgrade::on(&mut req), key))
    } else {
        None
    };
    let websocket = upgrade.is_some();
    let limit = iface.settings.max_body_size;
    let declared = req.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(plain(StatusCode::PAYLOAD_TOO_LARGE, &id, &format!("request body over the limit of {limit} bytes")));
    }
    let (parts, body) = req.into_parts();
    let body = match tokio::time::timeout_at(ctx.deadline.into(), Limited::new(body, limit as usize).collect()).await {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(e)) => {
            if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() {
                return Err(plain(StatusCode::PAYLOAD_TOO_LARGE, &id, &format!("request body over the limit of {limit} bytes")));
            }
            return Err(plain(StatusCode::BAD_REQUEST, &id, "request body could not be read"));
        }
        Err(_) => return Err(plain(StatusCode::REQUEST_TIMEOUT, &id, "request body not received before the deadline")),
    };
    let Some(vm) = worker::cage(&spec.cage) else {
        tracing::error!(cage = %spec.cage, interface = %spec.name, request = %id, "cage has no VM on this worker");
        return Err(plain(StatusCode::SERVICE_UNAVAILABLE, &id, "cage is not running"));
    };
    let (module, function) = &spec.handler.value;
    let slot = Slot::register(&id, upgrade, iface.settings.write_timeout, iface.settings.max_message_size);
    let started = vm.function(module, function).and_then(|handler| {
        let adapter = vm.helper("http_request", ADAPTER)?;
        let api = crate::lua_api::api(&vm)?;
        vm.start_function(ctx, adapter, |lua| {
            let (headers, query) = (header_table(lua, &parts)?, query_table(lua, &parts)?);
            Ok(MultiValue::from_iter([
                LuaValue::Function(handler),
                LuaValue::String(lua.create_string(parts.method.as_str())?),
                LuaValue::String(lua.create_string(percent_decode(parts.uri.path()))?),
                LuaValue::String(lua.create_string(parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"))?),
                query,
                LuaValue::Table(headers),
                LuaValue::String(lua.create_string(&body)?),
                LuaValue::String(lua.create_string(peer)?),
                LuaValue::String(lua.create_string(version_name(parts.version))?),
                LuaValue::Table(api),
                LuaValue::Boolean(websocket),
            ]))
        })
    });
    // The handler has its own copies now; a parked request should not keep the head and body.
    drop(parts);
    drop(body);
    Ok((started, slot))
}

async fn respond(iface: &HttpInterface, req: Request<Incoming>, peer: &str, ctx: RequestCtx, busy: crate::Busy) -> Response<Body> {
    let spec = &iface.spec;
    let id = ctx.id.clone();
    let (module, function) = &spec.handler.value;
    let (started, slot) = match Box::pin(prepare(iface, req, peer, ctx)).await {
        Ok(x) => x,
        Err(response) => return response,
    };
    let result = match started {
        Ok(mut fut) => {
            // The handler either ends (the usual case) or sends its response head early
            // (response.stream, request.upgrade) and goes on in a task of its own.
            let replied = tokio::select! {
                biased;
                r = &mut fut => Err(r),
                head = slot.replied() => Ok(head),
            };
            match replied {
                Err(r) if !slot.0.replied() => r,
                Err(r) => {
                    // It started a stream and ended within one poll: the head is sent, its
                    // body ends as the slot goes.
                    log_outcome(iface, &id, r);
                    let head = slot.replied().await;
                    drop(slot);
                    return head;
                }
                Ok(head) => {
                    let spec = iface.spec.clone();
                    let id = id.clone();
                    tokio::task::spawn_local(async move {
                        let r = fut.await;
                        log_outcome_spec(&spec, &id, r);
                        drop(slot);
                        drop(busy);
                    });
                    return head;
                }
            }
        }
        Err(e) => Err(e),
    };
    match result {
        Ok(values) => match build_response(values, &id) {
            Ok(r) => r,
            Err(message) => {
                tracing::error!(cage = %spec.cage, interface = %spec.name, request = %id, "handler {module}.{function} returned a bad response: {message}");
                plain(StatusCode::INTERNAL_SERVER_ERROR, &id, "internal error")
            }
        },
        Err(RunError::Deadline) => {
            tracing::warn!(cage = %spec.cage, interface = %spec.name, request = %id, "deadline exceeded ({:?}) in {module}.{function}", spec.request_timeout);
            plain(StatusCode::GATEWAY_TIMEOUT, &id, "deadline exceeded")
        }
        Err(e @ RunError::Failed { .. }) => {
            // One line per record: the request id is printed at its end, and a traceback split
            // over lines would leave the error text on lines that do not carry the id.
            tracing::error!(cage = %spec.cage, interface = %spec.name, request = %id, "{module}.{function} failed: {}", e.log_text());
            plain(StatusCode::INTERNAL_SERVER_ERROR, &id, "internal error")
        }
        Err(e) => {
            tracing::error!(cage = %spec.cage, interface = %spec.name, request = %id, "{module}.{function}: {e}");
            plain(StatusCode::INTERNAL_SERVER_ERROR, &id, "internal error")
        }
    }
}

/// Builds the request and response tables and calls the handler; returns the response table
/// first, then what the handler returned. `response.stream` comes from a shared metatable and
/// `request.upgrade` exists only on upgrade requests, so plain requests pay for neither.
const ADAPTER: &str = r#"
return function(handler, method, path, uri, query, headers, body, remote_addr, version, api, websocket)
  local response = setmetatable({ status = 200, headers = {} }, api.response_mt)
  local request = {
    method = method, path = path, uri = uri, query = query or {}, headers = headers,
    body = body, remote_addr = remote_addr, version = version, websocket = websocket,
  }
  if websocket then request.upgrade = api.upgrader(response) end
  return response, handler(request, response)
end
"#;

/// Logs how a handler that answered early (a stream, a WebSocket) ended.
fn log_outcome(iface: &HttpInterface, id: &str, r: Result<MultiValue, RunError>) {
    log_outcome_spec(&iface.spec, id, r)
}

fn log_outcome_spec(spec: &rustomnic_cage::InterfaceSpec, id: &str, r: Result<MultiValue, RunError>) {
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

fn percent_decode(path: &str) -> Vec<u8> {
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
/// sent as JSON. `values` are what the adapter returned: the response table, then the handler's.
fn build_response(values: MultiValue, id: &str) -> Result<Response<Body>, String> {
    let mut values = values.into_iter();
    let Some(LuaValue::Table(response)) = values.next() else { return Err("no response table".into()) };
    let returned = values.next().unwrap_or(LuaValue::Nil);
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
    let mut r = response_head(&response, Body::full(body), id)?;
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
