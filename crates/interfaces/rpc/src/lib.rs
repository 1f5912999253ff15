//! The `jsonrpc` and `xmlrpc` interfaces: JSON-RPC 2.0 and XML-RPC over HTTP(S), on the http
//! interface's listener (rustomnic_http::service: the same keys for listen, tls, http2, limits,
//! timeouts and connections), answered by the module functions the interface exposes. See
//! docs/interfaces/jsonrpc.md, docs/interfaces/xmlrpc.md and decision 134.
//!
//! Keys of `[interfaces.NAME]` besides the http interface's listener keys (listen, tls, http2,
//! max_body_size, max_header_size, header_read_timeout, max_connections, idle_timeout,
//! write_timeout, access_log) and request_timeout (the deadline of a request, a batch included):
//!
//! | key | default | meaning |
//! |---|---|---|
//! | `methods` | required | the callable methods: `["billing.charge"]` (names that are module.function of this cage) or `{ charge = "billing.charge" }` (public name → module.function); nothing else can be called |
//! | `path` | "/" | the only path served; others get 404 |
//! | `max_batch` | 100 | jsonrpc: most requests in a batch (more: one -32600 error) |
//! | `batch_concurrency` | 16 | jsonrpc: calls of one batch running at once |
//! | `max_elements` | 100000 | xmlrpc: most XML elements in a request body |

mod run;
mod xml;

use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::LocalBoxFuture;
use futures_util::StreamExt;
use hyper::StatusCode;
use rustomnic_core::{Located, Section, Value};
use rustomnic_http::service::{Service, ServiceRequest, ServiceResponse};
use rustomnic_interface::{Interface, InterfaceProtocol, InterfaceSpec, Shutdown};
use rustomnic_lua::RequestCtx;
use rustomnic_resource_rpc::jsonrpc::{self, Envelope, Params};

pub use run::Args;

/// The `jsonrpc` protocol.
pub struct JsonRpcProtocol;
/// The `xmlrpc` protocol.
pub struct XmlRpcProtocol;

/// A public method name and the (module, function) it runs, located at the `methods` key.
pub(crate) type Method = (String, Located<(String, String)>);

/// What a service of either protocol knows of its interface.
pub(crate) struct Common {
    pub(crate) cage: String,
    pub(crate) name: String,
    pub(crate) path: String,
    pub(crate) methods: Vec<Method>,
}

impl Common {
    pub(crate) fn method(&self, name: &str) -> Option<&(String, String)> {
        self.methods.iter().find(|(n, _)| n == name).map(|(_, h)| &h.value)
    }

    /// The refusal of a request that is not a call: another path, method or content type.
    fn refusal(&self, req: &ServiceRequest, types: &[&str]) -> Option<ServiceResponse> {
        let path = req.parts.uri.path();
        if path != self.path {
            return Some(ServiceResponse::text(StatusCode::NOT_FOUND, format!("no RPC endpoint at {path} (it is at {})", self.path)));
        }
        if req.parts.method != hyper::Method::POST {
            let mut r = ServiceResponse::text(StatusCode::METHOD_NOT_ALLOWED, format!("{} is not allowed: calls are POSTed", req.parts.method));
            r.allow = Some("POST");
            return Some(r);
        }
        let content_type = req.parts.headers.get(hyper::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
        let essence = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        if !types.contains(&essence.as_str()) {
            return Some(ServiceResponse::text(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!("content type {content_type:?} is not accepted; send {}", types.join(" or ")),
            ));
        }
        None
    }
}

/// An interface of either protocol: the HTTP interface that serves it, and its methods.
struct RpcInterface {
    spec: InterfaceSpec,
    http: Arc<rustomnic_http::HttpInterface>,
    common: Arc<Common>,
}

impl Interface for RpcInterface {
    fn spec(&self) -> &InterfaceSpec {
        &self.spec
    }

    fn handlers(&self) -> Vec<Located<(String, String)>> {
        self.common.methods.iter().map(|(_, h)| h.clone()).collect()
    }

    fn listen(&self) -> Option<Located<std::net::SocketAddr>> {
        self.http.listen()
    }

    fn serve(self: Arc<Self>, stream: tokio::net::TcpStream, remote: std::net::SocketAddr, shutdown: Shutdown) -> LocalBoxFuture<'static, ()> {
        self.http.clone().serve(stream, remote, shutdown)
    }
}

/// `module.function`, or why not.
fn split_handler(text: &str) -> Result<(String, String), String> {
    match text.split_once('.') {
        Some((m, f)) if !m.is_empty() && !f.is_empty() && !f.contains('.') && !f.starts_with('_') => Ok((m.to_string(), f.to_string())),
        _ => Err(format!("{text:?} is not \"module.function\" of this cage (a public function)")),
    }
}

/// `methods`: a list of names that are `module.function` of the cage, or a table from public
/// names to `module.function`.
fn read_methods(section: &Section, reserved: &str) -> Option<Vec<Method>> {
    let example = "methods = [\"billing.charge\"] or methods = { charge = \"billing.charge\" }";
    let at: (std::path::PathBuf, usize, String);
    let pairs: Vec<(String, String)> = match section.kind_of("methods") {
        None => {
            section.table_error(format!("methods is required: the methods this interface exposes, e.g. {example}"));
            return None;
        }
        Some("array") => {
            let l = section.strings("methods")?;
            at = (l.file, l.line, l.key);
            l.value.into_iter().map(|n| (n.clone(), n)).collect()
        }
        Some("table" | "inline table") => {
            let l = section.string_map("methods")?;
            at = (l.file, l.line, l.key);
            l.value
        }
        Some(_) => {
            // Reads the key (so that it is not also reported unknown) and says what it found.
            let _ = section.strings("methods");
            return None;
        }
    };
    if pairs.is_empty() {
        section.error("methods", format!("names no method; e.g. {example}"));
        return None;
    }
    let mut out: Vec<Method> = Vec::with_capacity(pairs.len());
    let mut ok = true;
    for (name, target) in pairs {
        if name.is_empty() || name.len() > 200 || name.starts_with(reserved) {
            section.error("methods", format!("{name:?} cannot be a method name (1 to 200 characters, not starting with {reserved:?})"));
            ok = false;
            continue;
        }
        match split_handler(&target) {
            Ok(h) => out.push((name, Located { value: h, file: at.0.clone(), line: at.1, key: at.2.clone() })),
            Err(e) => {
                section.error("methods", format!("method {name:?}: {e}"));
                ok = false;
            }
        }
    }
    ok.then_some(out)
}

/// The keys both protocols have besides the listener's.
fn read_common(spec: &InterfaceSpec, section: &Section, reserved: &str) -> Option<Common> {
    let methods = read_methods(section, reserved);
    let path = match section.string("path") {
        Some(p) if !p.value.starts_with('/') || p.value.contains('?') => {
            section.error("path", format!("{:?} is not a path such as \"/rpc\"", p.value));
            None
        }
        Some(p) => Some(p.value),
        None if section.has("path") => None,
        None => Some("/".to_string()),
    };
    Some(Common { cage: spec.cage.clone(), name: spec.name.clone(), path: path?, methods: methods? })
}

impl InterfaceProtocol for JsonRpcProtocol {
    fn name(&self) -> &'static str {
        "jsonrpc"
    }

    fn configure(&self, spec: InterfaceSpec, section: &Section) -> Option<Arc<dyn Interface>> {
        let common = read_common(&spec, section, "rpc.");
        let max_batch = section.integer("max_batch", 1, 100_000).map(|v| v.value as usize).unwrap_or(100);
        let batch_concurrency = section.integer("batch_concurrency", 1, 10_000).map(|v| v.value as usize).unwrap_or(16);
        let listener = rustomnic_http::service::read(section);
        let common = Arc::new(common?);
        let service = Arc::new(JsonService(Arc::new(JsonInner { common: common.clone(), max_batch, batch_concurrency })));
        let http = listener?.serve_with(spec.clone(), service);
        Some(Arc::new(RpcInterface { spec, http, common }))
    }
}

impl InterfaceProtocol for XmlRpcProtocol {
    fn name(&self) -> &'static str {
        "xmlrpc"
    }

    fn configure(&self, spec: InterfaceSpec, section: &Section) -> Option<Arc<dyn Interface>> {
        let common = read_common(&spec, section, "system.");
        let max_elements = section.integer("max_elements", 1, 100_000_000).map(|v| v.value as usize).unwrap_or(100_000);
        let listener = rustomnic_http::service::read(section);
        let common = Arc::new(common?);
        let service = Arc::new(xml::XmlService(Arc::new(xml::XmlInner { common: common.clone(), max_elements })));
        let http = listener?.serve_with(spec.clone(), service);
        Some(Arc::new(RpcInterface { spec, http, common }))
    }
}

struct JsonInner {
    common: Arc<Common>,
    max_batch: usize,
    batch_concurrency: usize,
}

struct JsonService(Arc<JsonInner>);

const JSON_TYPES: &[&str] = &["application/json", "application/json-rpc", "application/jsonrequest"];

impl Service for JsonService {
    fn call(&self, req: ServiceRequest) -> LocalBoxFuture<'static, ServiceResponse> {
        let me = self.0.clone();
        Box::pin(async move {
            if let Some(refused) = me.common.refusal(&req, JSON_TYPES) {
                return refused;
            }
            let ServiceRequest { body, ctx, .. } = req;
            let max_batch = me.max_batch;
            let read = off_worker(body.len(), move || jsonrpc::decode_request(&body, max_batch)).await;
            let envelope = match read {
                Some(Ok(e)) => e,
                Some(Err(e)) => return json_response(&jsonrpc::response(&Value::Nil, Err(&e))),
                None => return json_response(&jsonrpc::response(&Value::Nil, Err(&jsonrpc::RpcError::new(jsonrpc::INTERNAL_ERROR, "Internal error")))),
            };
            match envelope {
                Envelope::Single(call) => match me.answer(call, ctx).await {
                    Some(r) => json_response(&r),
                    None => no_content(),
                },
                Envelope::Batch(calls) => {
                    let deadline = ctx.deadline;
                    let first = std::cell::Cell::new(Some(ctx));
                    let answers: Vec<Option<serde_json::Value>> = futures_util::stream::iter(calls)
                        .map(|call| {
                            // The first call takes the HTTP request's id; the others get their own.
                            let ctx = first.take().unwrap_or_else(|| {
                                RequestCtx::with_deadline(rustomnic_lua::new_request_id(), &me.common.cage, &me.common.name, deadline, None)
                            });
                            me.answer(call, ctx)
                        })
                        .buffered(me.batch_concurrency)
                        .collect()
                        .await;
                    let answers: Vec<serde_json::Value> = answers.into_iter().flatten().collect();
                    if answers.is_empty() {
                        return no_content();
                    }
                    json_response(&serde_json::Value::Array(answers))
                }
            }
        })
    }
}

impl JsonInner {
    /// The response object of one request of an envelope; None for a notification.
    async fn answer(&self, call: Result<jsonrpc::Call, jsonrpc::Refused>, ctx: RequestCtx) -> Option<serde_json::Value> {
        let call = match call {
            Ok(c) => c,
            Err(r) if r.notification => return None,
            Err(r) => return Some(jsonrpc::response(&r.id, Err(&r.error))),
        };
        let args = match call.params {
            Params::None => Args::Positional(Vec::new()),
            Params::Positional(v) => Args::Positional(v),
            Params::Named(m) => Args::Named(m),
        };
        let outcome = run::call(&self.common, &call.method, args, ctx).await;
        let id = call.id?;
        Some(jsonrpc::response(&id, outcome.as_ref()))
    }
}

/// Bodies over this many bytes are read on tokio's blocking pool, as pmnc.json.decode does with
/// its big inputs (decision 070): a worker never parses for longer than about a time slice.
const INLINE_LIMIT: usize = 64 << 10;

/// Runs `f` (reading a body of `len` bytes) inline, or on the blocking pool for a big body;
/// None if it could not run there.
pub(crate) async fn off_worker<T: Send + 'static>(len: usize, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    if len <= INLINE_LIMIT {
        return Some(f());
    }
    tokio::task::spawn_blocking(f).await.ok()
}

fn json_response(v: &serde_json::Value) -> ServiceResponse {
    ServiceResponse::new(StatusCode::OK, "application/json", Bytes::from(v.to_string()))
}

fn no_content() -> ServiceResponse {
    ServiceResponse::new(StatusCode::NO_CONTENT, "application/json", Bytes::new())
}
