//! One HTTP request: limits, the Lua request and response tables, the handler's coroutine, and
//! turning its result (or failure) into a response.

use std::rc::Rc;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::LocalBoxFuture;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use rustomnic_core::metrics::StatusCounts;
use rustomnic_lua::convert::from_lua;
use rustomnic_lua::mlua::{Function, Lua, MultiValue, Table, Value as LuaValue};
use rustomnic_lua::{worker, CageVm, RequestCtx, RequestFuture, RunError};
use tokio::io::AsyncWriteExt;

use crate::multipart::Uploads;
use crate::stream::{Body, Slot, SlotGuard};
use crate::HttpInterface;

/// Made at compile time: a name given as a string is parsed and checked on every use.
pub(crate) const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Answers a connection over the limit and closes it.
pub(crate) async fn refuse_overloaded(mut stream: tokio::net::TcpStream) {
    let reply =
        b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\ncontent-length: 34\r\nconnection: close\r\n\r\ntoo many connections, retry later\n";
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), stream.write_all(reply)).await;
    let _ = stream.shutdown().await;
}

fn plain(status: StatusCode, id: &str, text: &str) -> Response<Body> {
    let mut r = Response::new(Body::full(format!("{text} (request id {id})\n")));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    if let Ok(v) = HeaderValue::from_str(id) {
        h.insert(X_REQUEST_ID, v);
    }
    r
}

/// The hyper side (HTTP/2): reads the body, runs the handler, and lets a handler that answered
/// early (a stream) go on in a task of its own. `peer` is the client's address, formatted once
/// per connection rather than for every request.
pub(crate) async fn handle(
    iface: Arc<HttpInterface>,
    req: Request<Incoming>,
    peer: Rc<str>,
    busy: crate::Busy,
) -> Result<Response<Body>, std::convert::Infallible> {
    let spec = &iface.spec;
    let mut ctx = RequestCtx::new(&spec.cage, &spec.name, spec.request_timeout);
    ctx.trace = rustomnic_lua::trace::for_request(&spec.cage, trace_context(req.headers()));
    let span = span_start(&ctx, req.method(), req.uri());
    let id = ctx.id.clone();
    let log = iface.wants_log().then(|| Box::new(crate::access_log::Entry::new(req.method(), req.uri(), req.version(), req.headers())));
    let (response, counts) = match Box::pin(collect(&iface, req, &ctx)).await {
        Err(response) => (response, iface.unrouted.clone()),
        Ok((parts, body, uploads)) => {
            let mut answer = match &iface.service {
                None => Answer::new(&iface, start(&iface, parts, body, uploads, &peer, ctx, None), id.clone()),
                Some(service) => Answer::service(&iface, service, parts, body, &peer, ctx),
            };
            let counts = answer.counts.clone();
            match *(&mut answer).await {
                Outcome::Done(response) => (response, counts),
                Outcome::Early(head) => {
                    tokio::task::spawn_local(async move {
                        answer.rest().await;
                        drop(busy);
                    });
                    (head, counts)
                }
            }
        }
    };
    counts.record(response.status().as_u16());
    span_done(&iface, span, &id, response.status());
    if let Some(entry) = log {
        let bytes = hyper::body::Body::size_hint(response.body()).exact();
        iface.log_request(&entry, &peer, &id, response.status(), bytes);
    }
    Ok(response)
}

/// What a traced request's span needs at its end (boxed: most requests are not traced).
pub(crate) struct SpanStart {
    trace: rustomnic_lua::trace::TraceContext,
    method: hyper::Method,
    path: String,
}

/// The start of the request's span when its trace is sampled and its cage traces.
pub(crate) fn span_start(ctx: &RequestCtx, method: &hyper::Method, uri: &hyper::Uri) -> Option<Box<SpanStart>> {
    let trace = rustomnic_lua::trace::recorded(ctx)?;
    Some(Box::new(SpanStart { trace, method: method.clone(), path: uri.path().chars().take(256).collect() }))
}

/// Records the request's span (a server span named by the method, as OpenTelemetry's HTTP
/// conventions name spans without a route); a 5xx answer is an error.
pub(crate) fn span_done(iface: &HttpInterface, span: Option<Box<SpanStart>>, id: &str, status: hyper::StatusCode) {
    use rustomnic_lua::trace::{AttrValue, SpanKind, SpanStatus};
    let Some(span) = span else { return };
    let SpanStart { trace, method, path } = *span;
    let attributes = vec![
        ("http.request.method", AttrValue::from(method.as_str())),
        ("url.path", AttrValue::Str(path)),
        ("http.response.status_code", AttrValue::Int(i64::from(status.as_u16()))),
    ];
    let outcome = if status.is_server_error() { SpanStatus::Error(format!("{status}")) } else { SpanStatus::Unset };
    let spec = &iface.spec;
    rustomnic_lua::trace::record_span(&trace, &spec.cage, &spec.name, id, method.as_str().to_string(), SpanKind::Server, attributes, outcome);
}

/// The W3C trace context of a request's `traceparent` header, when it has exactly one and it is
/// valid (otherwise the request runs without one, as the recommendation says).
pub(crate) fn trace_context(h: &hyper::HeaderMap) -> Option<Box<rustomnic_lua::trace::TraceContext>> {
    let mut values = h.get_all("traceparent").iter();
    let value = values.next()?;
    if values.next().is_some() {
        return None;
    }
    rustomnic_lua::trace::TraceContext::from_traceparent(value.as_bytes()).map(Box::new)
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

/// A request's head, its body, and the fields and files of a multipart body.
type Collected = (hyper::http::request::Parts, Bytes, Option<Box<Uploads>>);

/// Reads a hyper request's body within the deadline and max_body_size (a multipart body: its
/// parts as they arrive, within max_upload_size).
async fn collect(iface: &HttpInterface, req: Request<Incoming>, ctx: &RequestCtx) -> Result<Collected, Response<Body>> {
    let id = &ctx.id;
    let multipart = req.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).and_then(crate::multipart::boundary);
    let limit = if multipart.is_some() { iface.settings.max_upload_size } else { iface.settings.max_body_size };
    let setting = if multipart.is_some() { "max_upload_size" } else { "max_body_size" };
    let declared = req.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(plain(StatusCode::PAYLOAD_TOO_LARGE, id, &format!("request body over the limit of {limit} bytes ({setting})")));
    }
    let (parts, body) = req.into_parts();
    if let Some(boundary) = multipart {
        let boundary = boundary.map_err(|e| plain(StatusCode::BAD_REQUEST, id, &e.to_string()))?;
        let read = collect_multipart(iface, body, &boundary);
        return match tokio::time::timeout_at(ctx.deadline.into(), read).await {
            Ok(Ok(uploads)) => Ok((parts, Bytes::new(), Some(Box::new(uploads)))),
            Ok(Err(e)) => {
                let status = match e {
                    crate::multipart::MultipartError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
                    crate::multipart::MultipartError::Malformed(_) => StatusCode::BAD_REQUEST,
                    crate::multipart::MultipartError::Storage(ref m) => {
                        tracing::error!(cage = %iface.spec.cage, interface = %iface.spec.name, request = %id, "{m}");
                        return Err(plain(StatusCode::INTERNAL_SERVER_ERROR, id, "the upload could not be stored"));
                    }
                };
                Err(plain(status, id, &e.to_string()))
            }
            Err(_) => Err(plain(StatusCode::REQUEST_TIMEOUT, id, "request body not received before the deadline")),
        };
    }
    match tokio::time::timeout_at(ctx.deadline.into(), Limited::new(body, limit as usize).collect()).await {
        Ok(Ok(b)) => Ok((parts, b.to_bytes(), None)),
        Ok(Err(e)) => {
            if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() {
                return Err(plain(StatusCode::PAYLOAD_TOO_LARGE, id, &format!("request body over the limit of {limit} bytes")));
            }
            Err(plain(StatusCode::BAD_REQUEST, id, "request body could not be read"))
        }
        Err(_) => Err(plain(StatusCode::REQUEST_TIMEOUT, id, "request body not received before the deadline")),
    }
}

/// A multipart body of an HTTP/2 stream, frame by frame.
async fn collect_multipart(iface: &HttpInterface, mut body: Incoming, boundary: &[u8]) -> Result<Uploads, crate::multipart::MultipartError> {
    let mut collector = crate::multipart::Collector::new(boundary, iface.settings.max_body_size, iface.settings.max_upload_size);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| crate::multipart::MultipartError::Malformed(format!("the body could not be read: {e}")))?;
        if let Ok(data) = frame.into_data() {
            collector.feed(&data).await?;
        }
    }
    collector.finish()
}

/// A WebSocket request's way to its connection once the 101 is sent, and the client's key.
/// With permessage-deflate when the client offered terms we take: our reply and the terms.
pub(crate) type Upgrade = (tokio::sync::oneshot::Receiver<crate::Prefixed>, Bytes, Option<Box<(String, crate::ws::Deflate)>>);

/// Starts the handler's coroutine with the request and response tables. The handler is the
/// function the interface names, or the function of the route that a route table finds for
/// the request; a request no route takes is answered here (404, 405), without Lua.
pub(crate) fn start(
    iface: &HttpInterface,
    parts: hyper::http::request::Parts,
    body: Bytes,
    uploads: Option<Box<Uploads>>,
    peer: &str,
    ctx: RequestCtx,
    upgrade: Option<Upgrade>,
) -> (Started, Arc<StatusCounts>) {
    let spec = &iface.spec;
    let id = ctx.id.clone();
    let websocket = upgrade.is_some();
    let Some(vm) = worker::cage(&spec.cage) else {
        tracing::error!(cage = %spec.cage, interface = %spec.name, request = %id, "cage has no VM on this worker");
        return (Err(Box::new(plain(StatusCode::SERVICE_UNAVAILABLE, &id, "cage is not running"))), iface.unrouted.clone());
    };
    let (target, counts) = match target(iface, &vm, &parts, &id) {
        Ok(t) => t,
        Err(refused) => {
            iface.figures.requests.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return (Err(refused), iface.unrouted.clone());
        }
    };
    let slot = Slot::register(&id, upgrade, iface.settings.write_timeout, iface.settings.max_message_size);
    let started = target.and_then(|(handler, routed)| {
        let lua = vm.lua();
        let internal = |e: rustomnic_lua::mlua::Error| RunError::Internal(format!("request tables: {e}"));
        let shapes = shapes(&vm)?;
        let (params, route) = match routed {
            Some((params, key)) => (params, Some(key)),
            None => (None, None),
        };
        let (request, response): (Table, Table) = if websocket || uploads.is_some() {
            // The rare shapes (an upgrade, a multipart body) are made by the Lua adapter.
            adapter_tables(lua, &parts, &body, peer, websocket, params, route, uploads.as_deref()).map_err(internal)?
        } else {
            plain_tables(lua, &shapes, &parts, &body, peer, params, route).map_err(internal)?
        };
        *slot.0.uploads.borrow_mut() = uploads;
        // TLS: request.tls (nil on a plain connection).
        if let Some(info) = parts.extensions.get::<Arc<crate::tls::TlsInfo>>() {
            request.raw_set("tls", crate::tls::lua_table(lua, info).map_err(internal)?).map_err(internal)?;
        }
        let fut = vm.start_function(ctx, handler, |_| Ok((request, response.clone())))?;
        Ok((fut, response))
    });
    (Ok((started, slot)), counts)
}

/// Registry references to what [`plain_tables`] and [`plain_status`] need, made once per VM.
#[derive(Clone, Copy)]
struct Shapes {
    request_mt: std::ffi::c_int,
    response_mt: std::ffi::c_int,
    /// The strings "status" and "headers", for [`plain_status`]'s reads without allocation.
    status_key: std::ffi::c_int,
    headers_key: std::ffi::c_int,
}

/// Kept in the VM's app data: [`Shapes`] with its registry references (alive as long as the
/// VM), and the Lua adapter (for upgrades and multipart bodies) with the HTTP API table.
struct ShapesData {
    shapes: Shapes,
    build: Function,
    api: Table,
    _keys: [rustomnic_lua::mlua::RegistryKey; 4],
}

fn shapes(vm: &CageVm) -> Result<Shapes, RunError> {
    let lua = vm.lua();
    if let Some(data) = lua.app_data_ref::<ShapesData>() {
        return Ok(data.shapes);
    }
    let internal = |e: rustomnic_lua::mlua::Error| RunError::Internal(format!("request tables: {e}"));
    let api = crate::lua_api::api(vm)?;
    let make = vm.helper("http_request", TABLES)?;
    let (build, request_mt): (Function, Table) = make.call(api.clone()).map_err(internal)?;
    let response_mt: Table = api.raw_get("response_mt").map_err(internal)?;
    let request_key = lua.create_registry_value(request_mt).map_err(internal)?;
    let response_key = lua.create_registry_value(response_mt).map_err(internal)?;
    let status_key = lua.create_registry_value("status").map_err(internal)?;
    let headers_key = lua.create_registry_value("headers").map_err(internal)?;
    let shapes = Shapes { request_mt: request_key.id(), response_mt: response_key.id(), status_key: status_key.id(), headers_key: headers_key.id() };
    lua.set_app_data(ShapesData { shapes, build, api, _keys: [request_key, response_key, status_key, headers_key] });
    Ok(shapes)
}

/// The request and response tables made by the Lua adapter (`build` of [`TABLES`]).
#[allow(clippy::too_many_arguments)]
fn adapter_tables(
    lua: &Lua,
    parts: &hyper::http::request::Parts,
    body: &Bytes,
    peer: &str,
    websocket: bool,
    params: Option<Table>,
    route: Option<rustomnic_lua::mlua::LuaString>,
    uploads: Option<&Uploads>,
) -> rustomnic_lua::mlua::Result<(Table, Table)> {
    let (build, api) = match lua.app_data_ref::<ShapesData>() {
        Some(data) => (data.build.clone(), data.api.clone()),
        None => return Err(rustomnic_lua::mlua::Error::runtime("the request tables' adapter is not made yet")),
    };
    let (form, files) = match uploads {
        Some(u) => upload_tables(lua, u)?,
        None => (LuaValue::Nil, LuaValue::Nil),
    };
    let args = MultiValue::from_iter([
        LuaValue::String(lua.create_string(parts.method.as_str())?),
        LuaValue::String(lua.create_string(percent_decode(parts.uri.path()))?),
        LuaValue::String(lua.create_string(parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"))?),
        query_table(lua, parts)?,
        LuaValue::Table(header_table(lua, parts)?),
        if body.is_empty() { LuaValue::Nil } else { LuaValue::String(lua.create_string(body)?) },
        LuaValue::String(lua.create_string(peer)?),
        LuaValue::String(lua.create_string(version_name(parts.version))?),
        LuaValue::Table(api),
        LuaValue::Boolean(websocket),
        params.map(LuaValue::Table).unwrap_or(LuaValue::Nil),
        route.map(LuaValue::String).unwrap_or(LuaValue::Nil),
        form,
        files,
    ]);
    build.call(args)
}

/// The request and response tables of a plain request (no upgrade, no multipart body), made
/// through Lua's C API: the same tables the adapter makes, at about a third of the cost of
/// calling it (issue 19's request path).
fn plain_tables(
    lua: &Lua,
    shapes: &Shapes,
    parts: &hyper::http::request::Parts,
    body: &Bytes,
    peer: &str,
    params: Option<Table>,
    route: Option<rustomnic_lua::mlua::LuaString>,
) -> rustomnic_lua::mlua::Result<(Table, Table)> {
    use rustomnic_lua::mlua::ffi;
    // Everything the closure reads is made here first: Lua's allocation errors leave the
    // closure by longjmp, which must find no Rust value of its own to drop.
    let raw_path = parts.uri.path();
    let decoded = if raw_path.as_bytes().contains(&b'%') { Some(percent_decode(raw_path)) } else { None };
    let path: &[u8] = decoded.as_deref().unwrap_or(raw_path.as_bytes());
    let uri = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let query: Vec<(std::borrow::Cow<'_, str>, std::borrow::Cow<'_, str>)> =
        parts.uri.query().map(|q| form_urlencoded::parse(q.as_bytes()).collect()).unwrap_or_default();
    let headers = joined_headers(&parts.headers);
    let method = parts.method.as_str();
    let version = version_name(parts.version);
    let (request_mt, response_mt) = (shapes.request_mt as ffi::lua_Integer, shapes.response_mt as ffi::lua_Integer);
    let has_query = parts.uri.query().is_some();
    let has_params = params.is_some();
    let has_route = route.is_some();
    // SAFETY: the closure runs in a protected call on the VM's own state, with the arguments
    // (params, route) at stack slots 1 and 2; it only pushes values and sets fields of tables it
    // made, keeps the stack balanced but for the two tables it leaves as results, and holds
    // only borrows (nothing to drop if an allocation error unwinds it).
    unsafe {
        lua.exec_raw::<(Table, Table)>((params, route), |state| {
            let push = |bytes: &[u8]| {
                ffi::lua_pushlstring(state, bytes.as_ptr() as *const std::ffi::c_char, bytes.len());
            };
            let fields = 6 + usize::from(has_query) + usize::from(!body.is_empty()) + usize::from(has_params) + usize::from(has_route);
            ffi::lua_createtable(state, 0, fields as std::ffi::c_int);
            push(method.as_bytes());
            ffi::lua_setfield(state, -2, c"method".as_ptr());
            push(path);
            ffi::lua_setfield(state, -2, c"path".as_ptr());
            push(uri.as_bytes());
            ffi::lua_setfield(state, -2, c"uri".as_ptr());
            if has_query {
                ffi::lua_createtable(state, 0, query.len() as std::ffi::c_int);
                for (k, v) in &query {
                    push(k.as_bytes());
                    push(v.as_bytes());
                    ffi::lua_rawset(state, -3);
                }
                ffi::lua_setfield(state, -2, c"query".as_ptr());
            }
            ffi::lua_createtable(state, 0, headers.len() as std::ffi::c_int);
            for (name, value) in &headers {
                push(name.as_bytes());
                push(value);
                ffi::lua_rawset(state, -3);
            }
            ffi::lua_setfield(state, -2, c"headers".as_ptr());
            push(peer.as_bytes());
            ffi::lua_setfield(state, -2, c"remote_addr".as_ptr());
            push(version.as_bytes());
            ffi::lua_setfield(state, -2, c"version".as_ptr());
            if !body.is_empty() {
                push(body);
                ffi::lua_setfield(state, -2, c"body".as_ptr());
            }
            if has_params {
                ffi::lua_pushvalue(state, 1);
                ffi::lua_setfield(state, -2, c"params".as_ptr());
            }
            if has_route {
                ffi::lua_pushvalue(state, 2);
                ffi::lua_setfield(state, -2, c"route".as_ptr());
            }
            ffi::lua_rawgeti(state, ffi::LUA_REGISTRYINDEX, request_mt);
            ffi::lua_setmetatable(state, -2);
            // response.headers is made when first read (response_mt in lua_api.rs).
            ffi::lua_createtable(state, 0, 1);
            ffi::lua_pushinteger(state, 200);
            ffi::lua_setfield(state, -2, c"status".as_ptr());
            ffi::lua_rawgeti(state, ffi::LUA_REGISTRYINDEX, response_mt);
            ffi::lua_setmetatable(state, -2);
            // Only the two new tables are the results.
            ffi::lua_rotate(state, 1, -2);
            ffi::lua_settop(state, 2);
        })
    }
}

/// The request's headers as `request.headers` has them: lower-case names, the values of a
/// repeated name joined with ", " (its values come one after another).
fn joined_headers(headers: &hyper::HeaderMap) -> Vec<(&str, std::borrow::Cow<'_, [u8]>)> {
    let mut out: Vec<(&str, std::borrow::Cow<'_, [u8]>)> = Vec::with_capacity(headers.keys_len());
    let mut last: Option<&HeaderName> = None;
    for (name, value) in headers.iter() {
        match (last, out.last_mut()) {
            (Some(n), Some((_, joined))) if n == name => {
                let joined = joined.to_mut();
                joined.extend_from_slice(b", ");
                joined.extend_from_slice(value.as_bytes());
            }
            _ => out.push((name.as_str(), std::borrow::Cow::Borrowed(value.as_bytes()))),
        }
        last = Some(name);
    }
    out
}

/// `request.form` and `request.files` of a multipart body.
fn upload_tables(lua: &Lua, uploads: &Uploads) -> rustomnic_lua::mlua::Result<(LuaValue, LuaValue)> {
    let form = lua.create_table()?;
    for (name, value) in &uploads.fields {
        form.raw_set(name.as_str(), lua.create_string(value)?)?;
    }
    let files = lua.create_table_with_capacity(uploads.files.len(), 0)?;
    for f in &uploads.files {
        let t = lua.create_table_with_capacity(0, 6)?;
        t.raw_set("field", f.field.as_str())?;
        t.raw_set("filename", f.filename.as_str())?;
        t.raw_set("content_type", f.content_type.as_deref())?;
        t.raw_set("size", f.size)?;
        t.raw_set("path", f.path.to_string_lossy().as_ref())?;
        files.raw_push(t)?;
    }
    Ok((LuaValue::Table(form), LuaValue::Table(files)))
}

/// A handler found for a request: the function, and for a routed request its parameters and
/// route key.
type Target = (Function, Option<(Option<Table>, rustomnic_lua::mlua::LuaString)>);

/// The function that serves a request, with the status counts its response goes to; Err is the
/// response for a request that no route takes.
#[allow(clippy::type_complexity)]
fn target(
    iface: &HttpInterface,
    vm: &CageVm,
    parts: &hyper::http::request::Parts,
    id: &str,
) -> Result<(Result<Target, RunError>, Arc<StatusCounts>), Box<Response<Body>>> {
    let spec = &iface.spec;
    let (module, function) = &spec.handler.value;
    // A request that fails before a route is found counts with the interface's unrouted ones.
    let unrouted = |e: RunError| Ok((Err(e), iface.unrouted.clone()));
    let table = match vm.module_field(module, function) {
        Ok(LuaValue::Function(f)) => return Ok((Ok((f, None)), iface.unrouted.clone())),
        Ok(LuaValue::Table(t)) => t,
        Ok(other) => {
            return unrouted(RunError::NotFound(format!(
                "cage {}: {module}.{function} is a {}, not a function or a route table",
                spec.cage,
                other.type_name()
            )));
        }
        Err(e) => return unrouted(e),
    };
    let internal = |e: rustomnic_lua::mlua::Error| RunError::Internal(format!("route table {module}.{function}: {e}"));
    let compiled = match crate::routes::compiled(vm.lua(), &table, &spec.cage, &spec.name) {
        Ok(c) => c,
        Err(message) => {
            return unrouted(RunError::NotFound(format!("route table {module}.{function} of cage {}: {message}", spec.cage)));
        }
    };
    let router = &compiled.router;
    match router.find(parts.method.as_str(), parts.uri.path()) {
        crate::routes::Found::Route(index, params) => {
            let (Some(route), Some((f, key))) = (router.route(index), compiled.route_values(index)) else {
                return unrouted(RunError::Internal(format!("route table {module}.{function}: no route {index}")));
            };
            let counts = route.counts.clone();
            // The parameters' table is made here, while the router (which owns their names)
            // is borrowed: no name is copied. No parameters: request.params comes from the
            // request's metatable, and the request table keeps within its 8 hash slots.
            let lua = vm.lua();
            let made = (|| {
                if params.is_empty() {
                    return Ok(None);
                }
                let t = lua.create_table_with_capacity(0, params.len())?;
                for (name, value) in &params {
                    t.raw_set(*name, lua.create_string(value)?)?;
                }
                Ok::<_, rustomnic_lua::mlua::Error>(Some(t))
            })();
            match made {
                Ok(t) => Ok((Ok((f, Some((t, key)))), counts)),
                Err(e) => Ok((Err(internal(e)), counts)),
            }
        }
        crate::routes::Found::WrongMethod(allow) => {
            let mut r = plain(StatusCode::METHOD_NOT_ALLOWED, id, &format!("{} is not allowed on {}", parts.method, parts.uri.path()));
            if let Ok(v) = HeaderValue::from_str(&allow) {
                r.headers_mut().insert(hyper::header::ALLOW, v);
            }
            Err(Box::new(r))
        }
        crate::routes::Found::Nothing => Err(Box::new(plain(StatusCode::NOT_FOUND, id, &format!("no route for {} {}", parts.method, parts.uri.path())))),
    }
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
    /// Where the response's status is counted: its route's figures, or the interface's.
    pub(crate) counts: Arc<StatusCounts>,
    state: AnswerState,
}

enum AnswerState {
    /// The handler's coroutine, its slot and its response table.
    Running(RequestFuture, SlotGuard, Table),
    /// Answered early: the handler goes on, and its slot (a stream's sender, the WebSocket)
    /// stays until it ends.
    Continuing {
        fut: RequestFuture,
        _slot: SlotGuard,
    },
    NotStarted(RunError),
    Refused(Box<Response<Body>>),
    /// A [`crate::service::Service`]'s answer on its way.
    Service(LocalBoxFuture<'static, crate::service::ServiceResponse>),
    Done,
}

impl Answer {
    pub(crate) fn new(iface: &Arc<HttpInterface>, (started, counts): (Started, Arc<StatusCounts>), id: String) -> Answer {
        let state = match started {
            Ok((Ok((fut, response)), slot)) => AnswerState::Running(fut, slot, response),
            Ok((Err(e), _slot)) => AnswerState::NotStarted(e),
            Err(response) => AnswerState::Refused(response),
        };
        Answer { iface: iface.clone(), id, counts, state }
    }

    /// The answer of the interface's service to a request read in full.
    pub(crate) fn service(
        iface: &Arc<HttpInterface>,
        service: &Arc<dyn crate::service::Service>,
        parts: hyper::http::request::Parts,
        body: Bytes,
        peer: &Rc<str>,
        ctx: RequestCtx,
    ) -> Answer {
        let id = ctx.id.clone();
        let fut = service.call(crate::service::ServiceRequest { parts, body, peer: peer.clone(), ctx });
        Answer { iface: iface.clone(), id, counts: iface.unrouted.clone(), state: AnswerState::Service(fut) }
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
                        Ok(values) => {
                            let r = returned(&this.iface, response, values, &this.id);
                            if r.status().is_server_error() {
                                // A 5xx the handler chose is a failure to the client and to alerts.
                                this.iface.figures.errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                            r
                        }
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
        if let AnswerState::Service(fut) = &mut this.state {
            let answer = std::task::ready!(fut.as_mut().poll(cx));
            this.state = AnswerState::Done;
            return Poll::Ready(Box::new(Outcome::Done(crate::service::response(answer, &this.id))));
        }
        match std::mem::replace(&mut this.state, AnswerState::Done) {
            AnswerState::NotStarted(e) => Poll::Ready(Box::new(Outcome::Done(failed(&this.iface, e, &this.id)))),
            AnswerState::Refused(response) => Poll::Ready(Box::new(Outcome::Done(*response))),
            // Polled again after it answered: it never answers twice.
            state @ (AnswerState::Running(..) | AnswerState::Continuing { .. } | AnswerState::Service(_) | AnswerState::Done) => {
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
        RunError::Failed { ref message, .. } if bad_request(message).is_some() => {
            let text = bad_request(message).unwrap_or_default();
            tracing::info!(cage = %spec.cage, interface = %spec.name, request = %id, "{module}.{function}: {text}");
            plain(StatusCode::BAD_REQUEST, id, text)
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

/// The text of an error that asks for a 400: its message (after the `file:line:` a string
/// error gets) starts with "bad request: ", as request.json and request.form raise them.
fn bad_request(message: &str) -> Option<&str> {
    const MARK: &str = "bad request: ";
    if let Some(rest) = message.strip_prefix(MARK) {
        return Some(rest);
    }
    let at = message.find(": bad request: ")?;
    // Only right after the position prefix, a "chunk:line" without spaces.
    let prefix = &message[..at];
    (!prefix.contains(' ')).then(|| &message[at + 2 + MARK.len()..])
}

/// Builds the request and response tables; the coroutine then runs the handler itself, so no
/// frame of this function stays on its stack while the handler waits (a parked request's stack
/// then fits in Lua's second size step, 80 slots). `response.stream` comes from a shared
/// metatable and `request.upgrade` exists only on upgrade requests, so plain requests pay for
/// neither; `body` and `websocket` come through the request's metatable, which keeps a request's
/// table within 8 hash slots.
const TABLES: &str = r#"
local setmetatable, readonly, locked = __pmnc_setmetatable, __pmnc_readonly, __pmnc_locked
local rawget, rawset, pcall, error, type = rawget, rawset, pcall, error, type
local json_decode = pmnc.json.decode
local no_params = readonly({}, "request.params")
local no_files = readonly({}, "request.files")
local form_decode
-- request.json and request.form: decoded on first use and kept; a body that does not decode
-- raises an error the interface answers with 400 (see bad_request in handler.rs).
local function lazy(defaults)
  return function(request, k)
    local v = defaults[k]
    if v ~= nil then return v end
    if k == "json" then
      local body = rawget(request, "body")
      if body == nil then return nil end
      local ok, value = pcall(json_decode, body)
      if not ok then
        error("bad request: request.json: " .. (value:match("^pmnc%.json%.decode: (.*)$") or value), 2)
      end
      if value ~= nil then rawset(request, "json", value) end
      return value
    elseif k == "query" then
      -- No query string: an empty table, made when first read (most handlers never do).
      local query = {}
      rawset(request, "query", query)
      return query
    elseif k == "form" then
      local ok, value = form_decode(rawget(request, "body"), rawget(request, "headers")["content-type"])
      if not ok then error("bad request: request.form: " .. value, 2) end
      rawset(request, "form", value)
      return value
    end
  end
end
-- Shared by every request of the VM, so no module may change them (see the prelude).
local request_mt = locked({ __index = lazy({ body = "", websocket = false, params = no_params, files = no_files }) })
local websocket_mt = locked({ __index = lazy({ body = "", websocket = true, params = no_params, files = no_files }) })
local function build(method, path, uri, query, headers, body, remote_addr, version, api, websocket, params, route, form, files)
  local response = setmetatable({ status = 200 }, api.response_mt)
  local request
  if route and (params or body) then
    -- Nine or ten fields: made in one constructor, so that the table is sized once for all of
    -- them rather than grown (rehashed) when the ninth arrives.
    request = setmetatable({
      method = method, path = path, uri = uri, query = query, headers = headers,
      remote_addr = remote_addr, version = version, body = body, route = route, params = params,
    }, websocket and websocket_mt or request_mt)
  else
    request = setmetatable({
      method = method, path = path, uri = uri, query = query, headers = headers,
      remote_addr = remote_addr, version = version,
    }, websocket and websocket_mt or request_mt)
    if body then request.body = body end
    if route then request.route = route end
  end
  if form then
    request.form, request.files = form, files
    for i = 1, #files do files[i].read = api.upload_reader(i) end
  end
  if websocket then request.upgrade = api.upgrader(response) end
  return request, response
end
-- Called once per VM with the HTTP API table; plain requests' tables are made in Rust with
-- request_mt (plain_tables in handler.rs), the others by build.
return function(api)
  form_decode = api.form_decode
  return build, request_mt
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

/// `request.headers` as a table (see [`joined_headers`]).
fn header_table(lua: &Lua, parts: &hyper::http::request::Parts) -> rustomnic_lua::mlua::Result<Table> {
    let joined = joined_headers(&parts.headers);
    let headers = lua.create_table_with_capacity(0, joined.len())?;
    for (name, value) in joined {
        headers.raw_set(lua.create_string(name)?, lua.create_string(&value)?)?;
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
    let mut json = false;
    let body = match returned {
        LuaValue::Nil => match response.raw_get::<LuaValue>("json").map_err(|e| e.to_string())? {
            LuaValue::Nil => body_bytes(response.raw_get("body").map_err(|e| e.to_string())?, &mut json)?,
            // response.json: any value as JSON, a string too (as a JSON string).
            value => {
                json = true;
                let value = from_lua(&value).map_err(|e| format!("response.json cannot be sent as JSON: {e}"))?;
                let text = value.to_json().map_err(|e| format!("response.json cannot be sent as JSON: {e}"))?;
                Bytes::from(text.to_string())
            }
        },
        v => body_bytes(v, &mut json)?,
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

/// A returned value or `response.body` as the body: a string as it is, a table as JSON.
fn body_bytes(value: LuaValue, json: &mut bool) -> Result<Bytes, String> {
    Ok(match value {
        LuaValue::Nil => Bytes::new(),
        LuaValue::String(s) => Bytes::from(s.as_bytes().to_vec()),
        LuaValue::Integer(_) | LuaValue::Number(_) => Bytes::from(value.to_string().map_err(|e| e.to_string())?),
        v @ LuaValue::Table(_) => {
            *json = true;
            let value = from_lua(&v).map_err(|e| format!("the returned table cannot be sent as JSON: {e}"))?;
            let text = value.to_json_text().map_err(|e| format!("the returned table cannot be sent as JSON: {e}"))?;
            Bytes::from(text)
        }
        other => return Err(format!("the body must be a string or a table, got {}", other.type_name())),
    })
}

/// A response with the status and headers the handler set on its `response` table.
pub(crate) fn response_head(response: &Table, body: Body, id: &str) -> Result<Response<Body>, String> {
    if let Some(status) = plain_status(response) {
        // The usual case, read in one step: a valid status and no headers.
        let mut r = Response::new(body);
        *r.status_mut() = status;
        if let Ok(v) = HeaderValue::from_str(id) {
            r.headers_mut().insert(X_REQUEST_ID, v);
        }
        return Ok(r);
    }
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
        h.insert(X_REQUEST_ID, v);
    }
    Ok(r)
}

/// The status of a response table whose `status` is nil or an integer in 100..=599 and whose
/// `headers` is absent, not a table, or empty; None for any other table, which
/// [`response_head`] then reads field by field (and reports what is wrong with it).
fn plain_status(response: &Table) -> Option<StatusCode> {
    use rustomnic_lua::mlua::ffi;
    let lua = response.weak_lua().try_upgrade()?;
    let (status_key, headers_key) = {
        let data = lua.app_data_ref::<ShapesData>()?;
        (data.shapes.status_key as ffi::lua_Integer, data.shapes.headers_key as ffi::lua_Integer)
    };
    let status = lua.exec_raw_lua(|raw| {
        let state = raw.state();
        // SAFETY: outside any Lua call, on the VM's own state, with room for four values
        // checked first. Nothing here allocates or runs Lua code, so nothing can raise an
        // error without a protected call: the keys come from the registry (lua_rawgeti), the
        // reads are raw (lua_rawget, lua_next), and the stack is put back as it was.
        unsafe {
            let top = ffi::lua_gettop(state);
            if ffi::lua_checkstack(state, 4) == 0 || raw.push(response).is_err() {
                ffi::lua_settop(state, top);
                return None;
            }
            let table = ffi::lua_gettop(state);
            let mut status = None;
            ffi::lua_rawgeti(state, ffi::LUA_REGISTRYINDEX, headers_key);
            let no_headers = ffi::lua_rawget(state, table) != ffi::LUA_TTABLE || {
                ffi::lua_pushnil(state);
                ffi::lua_next(state, -2) == 0
            };
            if no_headers {
                ffi::lua_settop(state, table);
                ffi::lua_rawgeti(state, ffi::LUA_REGISTRYINDEX, status_key);
                match ffi::lua_rawget(state, table) {
                    ffi::LUA_TNIL => status = Some(200),
                    ffi::LUA_TNUMBER if ffi::lua_isinteger(state, -1) != 0 => {
                        let n = ffi::lua_tointegerx(state, -1, std::ptr::null_mut());
                        if (100..=599).contains(&n) {
                            status = Some(n as u16);
                        }
                    }
                    _ => {}
                }
            }
            ffi::lua_settop(state, top);
            status
        }
    })?;
    StatusCode::from_u16(status).ok()
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
    use super::*;

    /// The tables a plain request gets from Lua's C API are the adapter's, field for field.
    #[test]
    fn plain_tables_are_the_adapters() {
        let vm = CageVm::new("t").expect("vm");
        let lua = vm.lua();
        let shapes = shapes(&vm).expect("shapes");
        let same: Function = lua
            .load(
                r#"
                local function same(a, b, path)
                  if type(a) ~= type(b) then error(path .. ": " .. type(a) .. " vs " .. type(b)) end
                  if type(a) ~= "table" then
                    if a ~= b then error(path .. ": " .. tostring(a) .. " vs " .. tostring(b)) end
                    return
                  end
                  if getmetatable(a) ~= getmetatable(b) then error(path .. ": metatables differ") end
                  for k, v in pairs(a) do same(v, rawget(b, k), path .. "." .. tostring(k)) end
                  for k in pairs(b) do if rawget(a, k) == nil then error(path .. "." .. tostring(k) .. " missing") end end
                end
                return function(r1, s1, r2, s2)
                  same(r1, r2, "request")
                  same(s1, s2, "response")
                  -- What comes through the metatable is the same too.
                  for _, k in ipairs({ "body", "websocket", "params", "files", "json", "query" }) do
                    local ok1, v1 = pcall(function() return r1[k] end)
                    local ok2, v2 = pcall(function() return r2[k] end)
                    same(ok1, ok2, "request." .. k .. " raised")
                    if not ok1 then v1, v2 = v1:match("bad request: .*"), v2:match("bad request: .*") end
                    same(v1, v2, "request." .. k)
                  end
                  return true
                end
                "#,
            )
            .call(())
            .expect("comparer");
        // (target, headers, body, routed)
        type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a [u8], bool);
        let requests: [Case; 6] = [
            ("/", &[("host", "h")], b"", false),
            ("/a%20b/%zz?x=1&y=%41&x=2&flag", &[("accept", "a"), ("Accept", "b"), ("x-one", "1")], b"", false),
            ("/p?", &[], b"{\"k\": [1, 2]}", false),
            ("/r/7/items?q=%E2%82%AC", &[("content-type", "application/json")], b"[1]", true),
            ("/r/8", &[("cookie", "a=1"), ("cookie", "b=2")], b"", true),
            ("/%C3%A9t%C3%A9", &[("host", "h")], b"x", false),
        ];
        for (target, headers, body, routed) in requests {
            let mut builder = hyper::Request::builder().method("POST").uri(target);
            for (k, v) in headers {
                builder = builder.header(*k, *v);
            }
            let (parts, ()) = builder.body(()).expect("request").into_parts();
            let body = Bytes::copy_from_slice(body);
            let routing = || {
                routed.then(|| {
                    let params = lua.create_table().expect("params");
                    params.raw_set("id", "7").expect("param");
                    (Some(params), lua.create_string("GET /r/{id}/items").expect("route"))
                })
            };
            let (p1, k1) = routing().map(|(p, k)| (p, Some(k))).unwrap_or((None, None));
            let (p2, k2) = routing().map(|(p, k)| (p, Some(k))).unwrap_or((None, None));
            let (r1, s1) = plain_tables(lua, &shapes, &parts, &body, "127.0.0.1:9", p1, k1).expect("plain");
            let (r2, s2) = adapter_tables(lua, &parts, &body, "127.0.0.1:9", false, p2, k2, None).expect("adapter");
            if let Err(e) = same.call::<bool>((r1, s1, r2, s2)) {
                panic!("{target}: {e}");
            }
        }
    }

    /// A VM without room for the request's strings gets an error from the C API's protected
    /// call, and is left as it was (a memory error leaves the closure by longjmp).
    #[test]
    fn plain_tables_out_of_memory() {
        let vm = CageVm::new("t").expect("vm");
        let lua = vm.lua();
        let shapes = shapes(&vm).expect("shapes");
        let (parts, ()) = hyper::Request::builder().uri("/?a=b").header("x", "y").body(()).expect("request").into_parts();
        let body = Bytes::from(vec![b'x'; 1 << 20]);
        let limit = lua.set_memory_limit(lua.used_memory() + (64 << 10)).expect("limit");
        let r = plain_tables(lua, &shapes, &parts, &body, "127.0.0.1:9", None, None);
        assert!(matches!(r, Err(rustomnic_lua::mlua::Error::MemoryError(_))), "{r:?}");
        lua.set_memory_limit(limit).expect("limit back");
        let (request, _) = plain_tables(lua, &shapes, &parts, &body, "127.0.0.1:9", None, None).expect("tables after");
        assert_eq!(request.raw_get::<rustomnic_lua::mlua::LuaString>("body").expect("body").as_bytes().len(), 1 << 20);
        assert_eq!(lua.load("return 1 + 1").eval::<i64>().expect("vm works"), 2);
    }

    /// The one-step read of a plain response and the field-by-field read agree; what the
    /// first cannot read goes to the second, which names the fault.
    #[test]
    fn response_heads() {
        let vm = CageVm::new("t").expect("vm");
        let lua = vm.lua();
        shapes(&vm).expect("shapes");
        let head = |source: &str| {
            let t: Table = lua.load(source).eval().expect("table");
            response_head(&t, Body::full(Bytes::new()), "abc").map(|r| {
                let h = r.headers();
                (r.status().as_u16(), h.get("x-request-id").cloned(), h.get("x-a").map(|v| v.as_bytes().to_vec()))
            })
        };
        let id = Some(HeaderValue::from_static("abc"));
        assert_eq!(head("return { headers = {} }"), Ok((200, id.clone(), None)));
        assert_eq!(head("return { status = 201, headers = {} }"), Ok((201, id.clone(), None)));
        assert_eq!(head("return { status = 204 }"), Ok((204, id.clone(), None)));
        assert_eq!(head("return { status = 202, headers = 'no table' }"), Ok((202, id.clone(), None)));
        assert_eq!(head("return { status = 203, headers = { ['x-a'] = 'b' } }"), Ok((203, id.clone(), Some(b"b".to_vec()))));
        assert_eq!(head("return { status = 600, headers = {} }"), Err("response.status must be an integer 100..599, got 600".into()));
        assert_eq!(head("return { status = 200.5 }"), Err("response.status must be an integer 100..599, got 200.5".into()));
        assert_eq!(head("return { status = '200' }"), Err("response.status must be an integer 100..599, got the string \"200\"".into()));
        assert_eq!(head("return { headers = { [1] = 'x' } }"), Err("response.headers keys must be strings".into()));

        // A plain request's response.headers and an absent query string's request.query are
        // made when first read, and are then the table that was written to.
        let (parts, ()) = hyper::Request::builder().uri("/").body(()).expect("request").into_parts();
        let (request, response) = plain_tables(lua, &shapes(&vm).expect("shapes"), &parts, &Bytes::new(), "p", None, None).expect("tables");
        let kept: bool = lua
            .load("local request, response = ...; response.headers['x-a'] = 'lazy'; request.query.k = 'v'; return request.query.k == 'v' and next(request.query) == 'k'")
            .call((request, response.clone()))
            .expect("lazy tables");
        assert!(kept);
        let r = response_head(&response, Body::full(Bytes::new()), "abc").expect("head");
        assert_eq!(r.headers().get("x-a").map(|v| v.as_bytes()), Some(&b"lazy"[..]));
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(super::percent_decode("/a%20b/%zz/%4"), b"/a b/%zz/%4");
        assert_eq!(super::percent_decode("%41"), b"A");
    }
}
