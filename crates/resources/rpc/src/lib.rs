//! The `jsonrpc` and `xmlrpc` resources: clients of a JSON-RPC 2.0 or XML-RPC server over HTTP
//! or HTTPS (hyper's client with rustls on ring, as the http resource), and the two wire
//! formats (jsonrpc.rs, xmlrpc.rs) that the interfaces of the same names
//! (crates/interfaces/rpc) share. See docs/resources/jsonrpc.md, docs/resources/xmlrpc.md and
//! decision 134.
//!
//! Keys of `[resources.NAME]` besides the pool keys:
//!
//! | key | default | meaning |
//! |---|---|---|
//! | `url` | required | the server's endpoint, http:// or https:// |
//! | `timeout` | none | limit of one call (connect, send, whole response); the request's deadline always applies |
//! | `max_body_size` | "16MiB" | larger responses are an error (at most 1GiB) |
//! | `max_elements` | 100000 | xmlrpc: most XML elements in a response |
//! | `tls_ca_file` | none | PEM certificates trusted besides the webpki roots |
//! | `headers` | none | `{ Authorization = "Bearer ${TOKEN}" }`: headers sent with every call |
//!
//! An RPC call is not transactional: it is made when the transaction executes (the participant's
//! call), begin, commit and rollback do nothing, and a call that was sent counts as an effect a
//! rollback cannot undo.

pub mod jsonrpc;
pub mod xmlrpc;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::LocalBoxFuture;
use http_body_util::{BodyExt, Full};
use hyper::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE, USER_AGENT};
use hyper::{HeaderMap, Method, Request, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustomnic_core::{Section, Value};
use rustomnic_resource::{Connection, Error, Resource, ResourceProtocol};

const MAX_BODY_SIZE_LIMIT: u64 = 1 << 30;
const DEFAULT_USER_AGENT: &str = concat!("rustomnic/", env!("CARGO_PKG_VERSION"));

/// The `jsonrpc` resource protocol.
pub struct JsonRpc;
/// The `xmlrpc` resource protocol.
pub struct XmlRpc;

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Json,
    Xml,
}

struct Settings {
    kind: Kind,
    url: Uri,
    timeout: Option<Duration>,
    max_body_size: u64,
    max_elements: usize,
    headers: HeaderMap,
    connector: HttpsConnector<HttpConnector>,
}

struct RpcResource(Arc<Settings>);

struct RpcConnection {
    settings: Arc<Settings>,
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    next_id: i64,
    sent: bool,
}

impl ResourceProtocol for JsonRpc {
    fn name(&self) -> &'static str {
        "jsonrpc"
    }

    fn configure(&self, _resource: &str, section: &Section) -> Option<Arc<dyn Resource>> {
        configure(section, Kind::Json)
    }
}

impl ResourceProtocol for XmlRpc {
    fn name(&self) -> &'static str {
        "xmlrpc"
    }

    fn configure(&self, _resource: &str, section: &Section) -> Option<Arc<dyn Resource>> {
        configure(section, Kind::Xml)
    }
}

fn configure(section: &Section, kind: Kind) -> Option<Arc<dyn Resource>> {
    let url = section.string("url");
    let timeout = section.duration("timeout", Duration::from_secs(3600)).map(|t| t.value);
    let max_body_size = section.size("max_body_size", MAX_BODY_SIZE_LIMIT).map(|s| s.value).unwrap_or(16 << 20);
    let max_elements = if kind == Kind::Xml { section.integer("max_elements", 1, 100_000_000).map(|v| v.value as usize).unwrap_or(100_000) } else { 0 };
    let headers = rustomnic_resource_http::default_headers(section);
    let roots = rustomnic_resource_http::tls_ca_roots(section);
    let Some(url) = url else {
        if !section.has("url") {
            section.table_error("url is required, e.g. url = \"https://api.example.com/rpc\"");
        }
        return None;
    };
    let uri = match url.value.parse::<Uri>() {
        Ok(u) if matches!(u.scheme_str(), Some("http" | "https")) && u.authority().is_some_and(|a| !a.as_str().contains('@')) => u,
        _ => {
            section.error("url", format!("{:?} is not an http:// or https:// URL without credentials (put them in headers)", url.value));
            return None;
        }
    };
    let connector = match rustomnic_resource_http::make_connector(timeout, roots?) {
        Ok(c) => c,
        Err(e) => {
            section.error("tls_ca_file", format!("cannot set up TLS: {e}"));
            return None;
        }
    };
    Some(Arc::new(RpcResource(Arc::new(Settings { kind, url: uri, timeout, max_body_size, max_elements, headers, connector }))))
}

impl Resource for RpcResource {
    fn connect(&self) -> LocalBoxFuture<'static, Result<Box<dyn Connection>, Error>> {
        let settings = self.0.clone();
        Box::pin(async move {
            let client = Client::builder(TokioExecutor::new()).build(settings.connector.clone());
            Ok(Box::new(RpcConnection { settings, client, next_id: 0, sent: false }) as Box<dyn Connection>)
        })
    }
}

impl Connection for RpcConnection {
    fn begin(&mut self) -> LocalBoxFuture<'_, Result<(), Error>> {
        self.sent = false;
        Box::pin(async { Ok(()) })
    }

    fn call<'a>(&'a mut self, method: &'a str, args: Vec<Value>) -> LocalBoxFuture<'a, Result<Value, Error>> {
        Box::pin(async move {
            let kind = self.settings.kind;
            let mut args = args.into_iter();
            let name = match args.next() {
                Some(Value::Str(s)) => String::from_utf8(s).map_err(|_| Error::new(format!("{method}: the method name is not UTF-8")))?,
                other => {
                    return Err(Error::new(format!(
                        "{method}(name, ...): the method name must be a string, got {}",
                        other.map(|v| v.type_name()).unwrap_or("nothing")
                    )))
                }
            };
            let rest: Vec<Value> = args.collect();
            match (kind, method) {
                (Kind::Json, "call") => self.json(&name, jsonrpc::Params::Positional(rest), true).await,
                (Kind::Json, "notify") => self.json(&name, jsonrpc::Params::Positional(rest), false).await,
                (Kind::Json, "call_named") => match <[Value; 1]>::try_from(rest) {
                    Ok([Value::Map(entries)]) => self.json(&name, jsonrpc::Params::Named(entries), true).await,
                    _ => Err(Error::new(format!("call_named({name:?}, params): params must be one table of name = value"))),
                },
                (Kind::Xml, "call") => self.xml(&name, &rest).await,
                (Kind::Json, other) => Err(Error::new(format!("no method {other} (methods: call, call_named, notify)"))),
                (Kind::Xml, other) => Err(Error::new(format!("no method {other} (methods: call)"))),
            }
        })
    }

    fn effects_stay(&self, _method: &str, _outcome: &Result<Value, Error>) -> bool {
        self.sent
    }
}

impl RpcConnection {
    async fn json(&mut self, name: &str, params: jsonrpc::Params, reply: bool) -> Result<Value, Error> {
        self.next_id += 1;
        let id = self.next_id;
        let call = jsonrpc::Call { id: reply.then_some(Value::Int(id)), method: name.to_string(), params };
        let body = jsonrpc::encode_call(&call).map_err(|e| Error::new(format!("{name}: the arguments cannot be sent as JSON: {e}")))?;
        let (status, text) = self.post(name, "application/json", body.to_string().into_bytes()).await?;
        if !reply {
            return if status.is_success() {
                Ok(Value::Nil)
            } else {
                Err(Error::new(format!("{name}: the server answered the notification with HTTP {status}")))
            };
        }
        let read = off_worker(text.len(), move || jsonrpc::decode_reply(&text, id)).await;
        match read.unwrap_or_else(|| Err("the response could not be read".into())) {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(remote_error(name, e.code, &e.message, e.data.as_ref())),
            // Not a JSON-RPC response: the HTTP status says more (a proxy's error page).
            Err(e) if !status.is_success() => Err(Error::new(format!("{name}: HTTP {status} ({e})"))),
            Err(e) => Err(Error::new(format!("{name}: {e}"))),
        }
    }

    async fn xml(&mut self, name: &str, args: &[Value]) -> Result<Value, Error> {
        let body = xmlrpc::encode_call(name, args).map_err(|e| Error::new(format!("{name}: {e}")))?;
        let (status, text) = self.post(name, "text/xml", body.into_bytes()).await?;
        if !status.is_success() {
            return Err(Error::new(format!("{name}: HTTP {status}")));
        }
        let limits = xmlrpc::Limits::new(self.settings.max_body_size as usize, self.settings.max_elements);
        let read = off_worker(text.len(), move || xmlrpc::decode_response(&text, limits)).await;
        match read.unwrap_or_else(|| Err("it could not be read".into())) {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(f)) => Err(remote_error(name, f.code, &f.message, None)),
            Err(e) => Err(Error::new(format!("{name}: the response is not XML-RPC: {e}"))),
        }
    }

    /// POSTs a body to the endpoint and reads the whole response within the limits.
    async fn post(&mut self, name: &str, content_type: &'static str, body: Vec<u8>) -> Result<(hyper::StatusCode, Vec<u8>), Error> {
        let s = self.settings.clone();
        let mut request = Request::builder().method(Method::POST).uri(s.url.clone());
        if let Some(h) = request.headers_mut() {
            for (k, v) in &s.headers {
                h.append(k, v.clone());
            }
            h.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
            if !h.contains_key(USER_AGENT) {
                h.insert(USER_AGENT, HeaderValue::from_static(DEFAULT_USER_AGENT));
            }
        }
        let request = request.body(Full::new(Bytes::from(body))).map_err(|e| Error::new(format!("{name}: {e}")))?;
        self.sent = true;
        let exchange = exchange(&self.client, request, s.max_body_size, name);
        match s.timeout {
            Some(t) => tokio::time::timeout(t, exchange)
                .await
                .map_err(|_| Error::broken(format!("{name}: no complete response within the timeout of {}", rustomnic_core::format_duration(t))))?,
            None => exchange.await,
        }
    }
}

async fn exchange(
    client: &Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    request: Request<Full<Bytes>>,
    limit: u64,
    name: &str,
) -> Result<(hyper::StatusCode, Vec<u8>), Error> {
    let response = client.request(request).await.map_err(|e| Error::broken(format!("{name}: {}", rustomnic_resource::error_chain(&e))))?;
    let status = response.status();
    let too_big = || Error::broken(format!("{name}: the response is over max_body_size ({limit} bytes)"));
    let declared = response.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(too_big());
    }
    let mut stream = response.into_body();
    let mut body = Vec::new();
    while let Some(frame) = stream.frame().await {
        let frame = frame.map_err(|e| Error::broken(format!("{name}: the response broke off: {}", rustomnic_resource::error_chain(&e))))?;
        if let Ok(data) = frame.into_data() {
            if body.len() as u64 + data.len() as u64 > limit {
                return Err(too_big());
            }
            body.extend_from_slice(&data);
        }
    }
    Ok((status, body))
}

/// Responses over this many bytes are read on tokio's blocking pool (decision 070): a worker never
/// parses for longer than about a time slice.
const INLINE_LIMIT: usize = 64 << 10;

async fn off_worker<T: Send + 'static>(len: usize, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    if len <= INLINE_LIMIT {
        return Some(f());
    }
    tokio::task::spawn_blocking(f).await.ok()
}

/// A remote error or fault: `err.code` is its code as text (as every resource's codes are),
/// `err.message` the server's message, with the error's data as JSON after it.
fn remote_error(name: &str, code: i64, message: &str, data: Option<&Value>) -> Error {
    let mut text = format!("{name}: {message}");
    if let Some(d) = data.and_then(|d| d.to_json().ok()) {
        text.push_str(&format!(" (data: {d})"));
    }
    Error::new(text).with_code(code.to_string())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    /// The fuzz targets' properties over the kept corpus and every truncation and byte flip of
    /// it (a quick stand-in for a fuzz run in the unit tests).
    #[test]
    fn mutated_corpus_keeps_the_round_trips() {
        let corpus = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../fuzz/corpus");
        for (dir, check) in [("jsonrpc_envelope", crate::jsonrpc::round_trip as fn(&[u8]) -> Result<(), String>), ("xmlrpc", crate::xmlrpc::round_trip)] {
            let Ok(entries) = std::fs::read_dir(format!("{corpus}/{dir}")) else { continue };
            for entry in entries {
                let seed = std::fs::read(entry.unwrap().path()).unwrap();
                for i in 0..seed.len() {
                    check(&seed[..i]).unwrap();
                    for flip in [b'<', b'"', 0xff] {
                        let mut m = seed.clone();
                        m[i] = flip;
                        check(&m).unwrap();
                    }
                }
            }
        }
    }
}
