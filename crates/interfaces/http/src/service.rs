//! The hook for interfaces that speak a protocol over HTTP (JSON-RPC, XML-RPC): the http
//! interface's listener, limits, TLS and HTTP/2 as they are, with each request's body answered
//! by Rust code of another crate (a [`Service`]) instead of a Lua handler (decision 134).
//!
//! The request is read as for a Lua handler (max_body_size gives 413, the deadline is the
//! interface's request_timeout); the service gets its head, its body and a request context, and
//! returns the whole response. Multipart bodies are held to max_body_size; WebSocket upgrades are
//! not made (the service sees the GET).

use std::rc::Rc;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::LocalBoxFuture;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::{Response, StatusCode};
use rustomnic_core::Section;
use rustomnic_interface::InterfaceSpec;
use rustomnic_lua::RequestCtx;

use crate::stream::Body;
use crate::HttpInterface;

/// One request handed to a [`Service`].
pub struct ServiceRequest {
    pub parts: hyper::http::request::Parts,
    pub body: Bytes,
    /// The client's address.
    pub peer: Rc<str>,
    /// The request's id and deadline (request_timeout); its id is sent back as x-request-id.
    pub ctx: RequestCtx,
}

/// What a [`Service`] answers.
pub struct ServiceResponse {
    pub status: StatusCode,
    /// Sent when the body is not empty.
    pub content_type: &'static str,
    pub body: Bytes,
    /// The `Allow` header of a 405.
    pub allow: Option<&'static str>,
}

impl ServiceResponse {
    /// A response with a body of `content_type`.
    pub fn new(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> ServiceResponse {
        ServiceResponse { status, content_type, body: body.into(), allow: None }
    }

    /// A plain-text refusal (a wrong method, path or content type).
    pub fn text(status: StatusCode, text: impl Into<String>) -> ServiceResponse {
        let mut t = text.into();
        t.push('\n');
        ServiceResponse::new(status, "text/plain; charset=utf-8", t)
    }
}

/// Answers the requests of an HTTP interface in Rust; runs on the worker thread of the
/// connection (the future need not be `Send`, and may run Lua of the worker's VMs).
pub trait Service: Send + Sync + 'static {
    fn call(&self, request: ServiceRequest) -> LocalBoxFuture<'static, ServiceResponse>;
}

/// The listener keys of an interface served by a [`Service`], read from its table as the http
/// interface reads them (listen, tls, http2, max_body_size, max_header_size,
/// header_read_timeout, max_connections, idle_timeout, write_timeout, access_log), not its
/// WebSocket and upload keys. `None` when a key has a problem (recorded in the section). Read
/// them before deciding to give up on the interface's own keys, so that every problem is
/// reported (and no key is reported unknown).
pub struct Listener(crate::HttpSettings);

pub fn read(section: &Section) -> Option<Listener> {
    crate::read_settings(section, false).map(Listener)
}

impl Listener {
    /// The HTTP interface that answers with `service`. The caller implements `Interface` around
    /// it and passes `listen` and `serve` on to it.
    pub fn serve_with(self, spec: InterfaceSpec, service: Arc<dyn Service>) -> Arc<HttpInterface> {
        crate::HttpInterface::new(spec, self.0, Some(service))
    }
}

/// The response of a service's answer.
pub(crate) fn response(answer: ServiceResponse, id: &str) -> Response<Body> {
    let empty = answer.body.is_empty();
    let mut r = Response::new(Body::full(answer.body));
    *r.status_mut() = answer.status;
    let h = r.headers_mut();
    if !empty {
        h.insert(CONTENT_TYPE, HeaderValue::from_static(answer.content_type));
    }
    if let Some(allow) = answer.allow {
        h.insert(ALLOW, HeaderValue::from_static(allow));
    }
    if let Ok(v) = HeaderValue::from_str(id) {
        h.insert(crate::handler::X_REQUEST_ID, v);
    }
    r
}
