//! The `http` resource: an HTTP client with a base URL (`xa.api.get("/users", {query = ...})`),
//! on hyper's client with rustls (ring) for https. See docs/resources/http.md.
//!
//! HTTP calls are not transactional: a call is made when the transaction executes, and begin,
//! commit and rollback do nothing. An HTTP error status is a result, not an error; only a
//! failure to get a response at all (or one over `max_body_size`) is an error.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::LocalBoxFuture;
use http_body_util::{BodyExt, Full};
use hyper::header::{HeaderName, HeaderValue, CONTENT_LENGTH, CONTENT_TYPE, USER_AGENT};
use hyper::{HeaderMap, Method, Request, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustomnic_core::{Section, Value};
use rustomnic_resource::{Connection, Error, Resource, ResourceProtocol};

/// The default limit of a response body.
pub const DEFAULT_MAX_BODY_SIZE: u64 = 16 << 20;
/// The largest `max_body_size` accepted: the whole body is held in memory.
const MAX_BODY_SIZE_LIMIT: u64 = 1 << 30;
const DEFAULT_USER_AGENT: &str = concat!("rustomnic/", env!("CARGO_PKG_VERSION"));

/// The `http` protocol.
pub struct Http;

/// What every connection of one resource shares.
struct Settings {
    /// Scheme and authority, e.g. `https://api.example.com`.
    origin: String,
    /// The base path without a trailing slash, e.g. `/v1` (empty for the root).
    base_path: String,
    timeout: Option<Duration>,
    headers: HeaderMap,
    max_body_size: u64,
    /// TLS setup (roots, provider) is made once and shared by every connection.
    connector: HttpsConnector<HttpConnector>,
}

struct HttpResource(Arc<Settings>);

/// One slot of the pool: a hyper client of its own, which keeps its keep-alive connections on
/// this worker thread. The pool size therefore bounds the calls in flight per worker.
struct HttpConnection {
    settings: Arc<Settings>,
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    /// The current call sent a request whose method is not safe (RFC 9110: anything but GET,
    /// HEAD, OPTIONS, TRACE): the server may have acted on it, and nothing undoes that.
    unsafe_sent: bool,
}

impl ResourceProtocol for Http {
    fn name(&self) -> &'static str {
        "http"
    }

    fn configure(&self, _resource: &str, section: &Section) -> Option<Arc<dyn Resource>> {
        let url = section.string("url");
        let timeout = section.duration("timeout", Duration::from_secs(3600)).map(|t| t.value);
        let max_body_size = section.size("max_body_size", MAX_BODY_SIZE_LIMIT).map(|s| s.value).unwrap_or(DEFAULT_MAX_BODY_SIZE);
        let headers = default_headers(section);
        let extra_roots = tls_ca_roots(section);
        let Some(url) = url else {
            if !section.has("url") {
                section.table_error("url is required, e.g. url = \"https://api.example.com/v1\"");
            }
            return None;
        };
        let (origin, base_path) = match parse_base(&url.value) {
            Ok(parts) => parts,
            Err(e) => {
                section.error("url", e);
                return None;
            }
        };
        let connector = match make_connector(timeout, extra_roots?) {
            Ok(c) => c,
            Err(e) => {
                section.error("tls_ca_file", format!("cannot set up TLS: {e}"));
                return None;
            }
        };
        Some(Arc::new(HttpResource(Arc::new(Settings { origin, base_path, timeout, headers, max_body_size, connector }))))
    }
}

/// An https-or-http connector with rustls on the ring provider. It trusts the webpki (Mozilla)
/// roots, the same on every machine whatever its system store holds, plus `extra_roots` (a
/// private CA of the `tls_ca_file` key). Also the client of the jsonrpc and xmlrpc resources.
pub fn make_connector(timeout: Option<Duration>, extra_roots: Vec<CertificateDer<'static>>) -> Result<HttpsConnector<HttpConnector>, String> {
    let mut http = HttpConnector::new();
    // https URLs go through the TLS layer, which needs the inner connector to accept them.
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(timeout);
    let mut roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    for cert in extra_roots {
        roots.add(cert).map_err(|e| format!("a certificate of tls_ca_file cannot be used as a root: {e}"))?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let builder = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(config);
    Ok(builder.https_or_http().enable_http1().enable_http2().wrap_connector(http))
}

/// The `tls_ca_file` key: the certificates trusted besides the webpki roots (none when the key
/// is absent); `None` when the file cannot be used, the problem recorded under the key.
pub fn tls_ca_roots(section: &Section) -> Option<Vec<CertificateDer<'static>>> {
    match section.string("tls_ca_file") {
        Some(path) => match read_ca_file(&path.value) {
            Ok(certs) => Some(certs),
            Err(e) => {
                section.error("tls_ca_file", e);
                None
            }
        },
        None => Some(Vec::new()),
    }
}

/// The certificates of a PEM file (one or more `BEGIN CERTIFICATE` blocks).
fn read_ca_file(path: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {path}: {e}"))?;
    let certs = CertificateDer::pem_slice_iter(&pem).collect::<Result<Vec<_>, _>>().map_err(|e| format!("{path} is not a PEM file of certificates: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{path} holds no certificate (-----BEGIN CERTIFICATE-----)"));
    }
    Ok(certs)
}

/// Splits the base URL into origin and path; only http and https, no query or credentials.
fn parse_base(url: &str) -> Result<(String, String), String> {
    let uri: Uri = url.parse().map_err(|e| format!("not a URL: {e}"))?;
    let scheme = uri.scheme_str().ok_or("the URL needs a scheme: http:// or https://")?;
    if scheme != "http" && scheme != "https" {
        return Err(format!("the scheme must be http or https, not {scheme}"));
    }
    let authority = uri.authority().ok_or("the URL needs a host")?;
    if authority.as_str().contains('@') {
        return Err("credentials in the URL are not supported; put an authorization header in headers".into());
    }
    if uri.query().is_some() {
        return Err("the base URL cannot have a query; pass query = {...} with each call".into());
    }
    let path = uri.path().trim_end_matches('/').to_string();
    Ok((format!("{scheme}://{authority}"), path))
}

/// The `headers` key: a table of name = "value" (the preferred form), or the older multi-line
/// string of `Name: value` lines. Problems are recorded under the key they concern.
pub fn default_headers(section: &Section) -> HeaderMap {
    match section.kind_of("headers") {
        None => HeaderMap::new(),
        Some("string") => match section.string("headers").map(|text| parse_header_lines(&text.value)) {
            Some(Ok(headers)) => headers,
            Some(Err(e)) => {
                section.error("headers", e);
                HeaderMap::new()
            }
            None => HeaderMap::new(),
        },
        // Anything else is read as the table; its error names the preferred form.
        Some(_) => {
            let Some(pairs) = section.string_map("headers") else {
                return HeaderMap::new();
            };
            // string_map has found a table; as a section it gives each name its own line in the
            // errors.
            let Some(table) = section.table("headers") else {
                return HeaderMap::new();
            };
            let mut headers = HeaderMap::new();
            for (name_text, value_text) in &pairs.value {
                let Ok(name) = HeaderName::from_bytes(name_text.as_bytes()) else {
                    table.error(name_text, "is not a valid header name");
                    continue;
                };
                match HeaderValue::from_str(value_text) {
                    Ok(value) => {
                        headers.append(name, value);
                    }
                    Err(_) => table.error(name_text, "is not a valid header value (no line breaks or other control characters)"),
                }
            }
            headers
        }
    }
}

/// Default headers from lines of `Name: value` (a TOML multi-line string).
fn parse_header_lines(text: &str) -> Result<HeaderMap, String> {
    let mut headers = HeaderMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err(format!("line {} is not \"Name: value\": {line:?}", n + 1));
        };
        let name = HeaderName::from_bytes(name.trim().as_bytes()).map_err(|_| format!("line {}: {:?} is not a header name", n + 1, name.trim()))?;
        let value = HeaderValue::from_str(value.trim()).map_err(|_| format!("line {}: the value of {name} is not a valid header value", n + 1))?;
        headers.append(name, value);
    }
    Ok(headers)
}

impl Resource for HttpResource {
    fn connect(&self) -> LocalBoxFuture<'static, Result<Box<dyn Connection>, Error>> {
        let settings = self.0.clone();
        Box::pin(async move {
            let client = Client::builder(TokioExecutor::new()).build(settings.connector.clone());
            Ok(Box::new(HttpConnection { settings, client, unsafe_sent: false }) as Box<dyn Connection>)
        })
    }
}

impl Connection for HttpConnection {
    fn begin(&mut self) -> LocalBoxFuture<'_, Result<(), Error>> {
        self.unsafe_sent = false;
        Box::pin(async { Ok(()) })
    }

    fn call<'a>(&'a mut self, method: &'a str, args: Vec<Value>) -> LocalBoxFuture<'a, Result<Value, Error>> {
        // Read now: the call's trace is known while the transaction polls it (docs/tracing.md).
        let traceparent = rustomnic_lua::trace::call_traceparent();
        Box::pin(async move {
            let call = parse_call(method, args)?;
            self.unsafe_sent = !call.method.is_safe();
            self.send(call, traceparent).await
        })
    }

    fn effects_stay(&self, _method: &str, _outcome: &Result<Value, Error>) -> bool {
        self.unsafe_sent
    }
}

/// One request as the Lua call described it.
struct Call {
    method: Method,
    path: String,
    body: Option<Value>,
    headers: Option<Value>,
    query: Option<Value>,
}

/// `get(path, opts)`, `post(path, body, opts)`, ..., `request(method, path, body, opts)`.
fn parse_call(method: &str, args: Vec<Value>) -> Result<Call, Error> {
    let mut args = args.into_iter();
    let (http_method, has_body) = match method {
        "get" => (Method::GET, false),
        "head" => (Method::HEAD, false),
        "delete" => (Method::DELETE, false),
        "options" => (Method::OPTIONS, false),
        "post" => (Method::POST, true),
        "put" => (Method::PUT, true),
        "patch" => (Method::PATCH, true),
        "request" => {
            let name = match args.next() {
                Some(Value::Str(s)) => String::from_utf8_lossy(&s).to_ascii_uppercase(),
                other => {
                    return Err(Error::new(format!("request(method, path, body, options): method must be a string such as \"PROPFIND\", got {}", kind(&other))))
                }
            };
            let m = Method::from_bytes(name.as_bytes()).map_err(|_| Error::new(format!("{name:?} is not an HTTP method")))?;
            (m, true)
        }
        other => {
            return Err(Error::new(format!("no method {other} (methods: get, head, delete, options, post, put, patch, request)")));
        }
    };
    let path = match args.next() {
        None | Some(Value::Nil) => String::new(),
        Some(Value::Str(s)) => String::from_utf8(s).map_err(|_| Error::new(format!("{method}: the path is not UTF-8 text")))?,
        Some(other) => return Err(Error::new(format!("{method}: the path must be a string, got {}", other.type_name()))),
    };
    let body = if has_body {
        match args.next() {
            None | Some(Value::Nil) => None,
            Some(b) => Some(b),
        }
    } else {
        None
    };
    let (mut headers, mut query) = (None, None);
    match args.next() {
        None | Some(Value::Nil) => {}
        Some(Value::Map(entries)) => {
            for (k, v) in entries {
                match k.as_str() {
                    Some("headers") => headers = Some(v),
                    Some("query") => query = Some(v),
                    _ => return Err(Error::new(format!("{method}: unknown option {} (options: headers, query)", display_key(&k)))),
                }
            }
        }
        Some(other) => {
            return Err(Error::new(format!("{method}: options must be a table such as {{headers = {{...}}, query = {{...}}}}, got {}", other.type_name())))
        }
    }
    if let Some(extra) = args.next() {
        return Err(Error::new(format!("{method}: too many arguments (the last one is a {})", extra.type_name())));
    }
    Ok(Call { method: http_method, path, body, headers, query })
}

impl HttpConnection {
    async fn send(&self, call: Call, traceparent: Option<String>) -> Result<Value, Error> {
        let s = &*self.settings;
        let target = self.target(&call)?;
        // Messages name the method and URL without the query, which may carry secrets.
        let shown = format!("{} {}", call.method, target.split('?').next().unwrap_or(""));
        let mut request = Request::builder().method(call.method.clone()).uri(target.as_str());
        let Some(headers) = request.headers_mut() else {
            return Err(Error::new(format!("{shown}: not a valid request URL")));
        };
        for (name, value) in &s.headers {
            headers.append(name, value.clone());
        }
        if let Some(h) = &call.headers {
            add_call_headers(headers, h)?;
        }
        if !headers.contains_key(USER_AGENT) {
            headers.insert(USER_AGENT, HeaderValue::from_static(DEFAULT_USER_AGENT));
        }
        // A traced request's call carries its span (unless the call sets its own), so the
        // service called continues the trace.
        if let Some(tp) = traceparent.and_then(|t| HeaderValue::from_str(&t).ok()) {
            if !headers.contains_key("traceparent") {
                headers.insert("traceparent", tp);
            }
        }
        let body = match call.body {
            None => Bytes::new(),
            Some(Value::Str(b)) => Bytes::from(b),
            Some(v @ (Value::Map(_) | Value::Array(_))) => {
                let json = v.to_json().map_err(|e| Error::new(format!("{shown}: the body cannot be sent as JSON: {e}")))?;
                if !headers.contains_key(CONTENT_TYPE) {
                    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                }
                Bytes::from(json.to_string())
            }
            Some(other) => {
                return Err(Error::new(format!("{shown}: the body must be a string or a table (sent as JSON), got {}", other.type_name())));
            }
        };
        let request = request.body(Full::new(body)).map_err(|e| Error::new(format!("{shown}: {e}")))?;
        let exchange = self.exchange(request, &shown);
        match s.timeout {
            Some(t) => match tokio::time::timeout(t, exchange).await {
                Ok(r) => r,
                Err(_) => Err(Error::new(format!("{shown}: no complete response within the timeout of {}", rustomnic_core::format_duration(t)))),
            },
            None => exchange.await,
        }
    }

    /// The request URL: origin, base path, the call's path, and the query encoded.
    fn target(&self, call: &Call) -> Result<String, Error> {
        let s = &*self.settings;
        let path = call.path.as_str();
        // A URL of its own (scheme or //host) would send the default headers elsewhere; a URL
        // inside the query (?next=https://...) is fine.
        if path.split('?').next().is_some_and(|p| p.contains("://")) || path.starts_with("//") {
            return Err(Error::new(format!("{} {path}: the path must be relative to the resource's url", call.method)));
        }
        let mut target = format!("{}{}", s.origin, s.base_path);
        if !path.is_empty() && !path.starts_with('/') && !path.starts_with('?') {
            target.push('/');
        }
        target.push_str(path);
        if target.len() == s.origin.len() {
            target.push('/');
        }
        if let Some(q) = &call.query {
            let encoded = encode_query(q).map_err(|e| Error::new(format!("{} {path}: query: {e}", call.method)))?;
            if !encoded.is_empty() {
                target.push(if target.contains('?') { '&' } else { '?' });
                target.push_str(&encoded);
            }
        }
        if target.parse::<Uri>().is_err() {
            return Err(Error::new(format!("{} {path}: not a valid URL path (percent-encode spaces and other special characters)", call.method)));
        }
        Ok(target)
    }

    /// Sends the request and reads the whole response, refusing a body over `max_body_size`.
    async fn exchange(&self, request: Request<Full<Bytes>>, shown: &str) -> Result<Value, Error> {
        let limit = self.settings.max_body_size;
        let response = self.client.request(request).await.map_err(|e| Error::new(format!("{shown}: {}", describe_client_error(&e))))?;
        let status = response.status().as_u16();
        let too_big = || Error::new(format!("{shown}: the response body is over max_body_size ({limit} bytes)"));
        let declared = response.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit) {
            return Err(too_big());
        }
        let headers = response_headers(response.headers());
        let mut body_stream = response.into_body();
        let mut body = Vec::new();
        while let Some(frame) = body_stream.frame().await {
            let frame = frame.map_err(|e| Error::new(format!("{shown}: reading the response body failed: {}", chain(&e))))?;
            if let Ok(data) = frame.into_data() {
                if body.len() as u64 + data.len() as u64 > limit {
                    return Err(too_big());
                }
                body.extend_from_slice(&data);
            }
        }
        Ok(Value::Map(vec![(Value::str("status"), Value::Int(status.into())), (Value::str("headers"), headers), (Value::str("body"), Value::Str(body))]))
    }
}

/// Per-call headers: name → string, number or boolean, or an array of them (one line each).
/// They replace default headers of the same name.
fn add_call_headers(headers: &mut HeaderMap, given: &Value) -> Result<(), Error> {
    let Value::Map(entries) = given else {
        return Err(Error::new(format!("headers must be a table of name = value, got {}", given.type_name())));
    };
    for (k, v) in entries {
        let name_text = k.as_str().ok_or_else(|| Error::new(format!("header name {} is not a string", display_key(k))))?;
        let name = HeaderName::from_bytes(name_text.as_bytes()).map_err(|_| Error::new(format!("{name_text:?} is not a header name")))?;
        headers.remove(&name);
        let values = match v {
            Value::Array(items) => items.iter().collect::<Vec<_>>(),
            single => vec![single],
        };
        for item in values {
            let text = scalar_text(item)
                .ok_or_else(|| Error::new(format!("header {name_text}: a value must be a string, number or boolean, got {}", item.type_name())))?;
            let value = HeaderValue::from_bytes(&text).map_err(|_| Error::new(format!("header {name_text}: not a valid header value (line breaks?)")))?;
            headers.append(name.clone(), value);
        }
    }
    Ok(())
}

/// Lower-case name → value; repeated headers joined with ", " (as the HTTP interface does).
fn response_headers(headers: &HeaderMap) -> Value {
    let mut out: Vec<(Value, Value)> = Vec::with_capacity(headers.keys_len());
    for name in headers.keys() {
        let mut joined = Vec::new();
        for (i, v) in headers.get_all(name).iter().enumerate() {
            if i > 0 {
                joined.extend_from_slice(b", ");
            }
            joined.extend_from_slice(v.as_bytes());
        }
        out.push((Value::str(name.as_str()), Value::Str(joined)));
    }
    Value::Map(out)
}

/// `{a = 1, b = {"x", "y"}}` → `a=1&b=x&b=y`, percent-encoded.
fn encode_query(q: &Value) -> Result<String, String> {
    let Value::Map(entries) = q else {
        return Err(format!("must be a table of name = value, got {}", q.type_name()));
    };
    let mut out = String::new();
    for (k, v) in entries {
        let key = scalar_text(k).ok_or_else(|| format!("the name {} is not a string", display_key(k)))?;
        let values = match v {
            Value::Array(items) => items.iter().collect::<Vec<_>>(),
            single => vec![single],
        };
        for item in values {
            let text = scalar_text(item)
                .ok_or_else(|| format!("{}: a value must be a string, number or boolean, got {}", String::from_utf8_lossy(&key), item.type_name()))?;
            if !out.is_empty() {
                out.push('&');
            }
            percent_encode(&key, &mut out);
            out.push('=');
            percent_encode(&text, &mut out);
        }
    }
    Ok(out)
}

/// Encodes everything but the unreserved characters of RFC 3986.
fn percent_encode(bytes: &[u8], out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in bytes {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push('%');
            out.push(HEX[(b >> 4) as usize] as char);
            out.push(HEX[(b & 15) as usize] as char);
        }
    }
}

fn scalar_text(v: &Value) -> Option<Vec<u8>> {
    match v {
        Value::Str(b) => Some(b.clone()),
        Value::Int(i) => Some(i.to_string().into_bytes()),
        Value::Float(f) => Some(f.to_string().into_bytes()),
        Value::Bool(b) => Some(b.to_string().into_bytes()),
        _ => None,
    }
}

fn display_key(k: &Value) -> String {
    match k.as_str() {
        Some(s) => s.to_string(),
        None => format!("({})", k.type_name()),
    }
}

fn kind(v: &Option<Value>) -> &'static str {
    v.as_ref().map(|v| v.type_name()).unwrap_or("nothing")
}

/// The reason of a client error, its wrappers ("client error (Connect)") left out.
fn describe_client_error(e: &hyper_util::client::legacy::Error) -> String {
    let cause = match std::error::Error::source(e) {
        Some(source) => chain(source),
        None => e.to_string(),
    };
    if e.is_connect() {
        format!("cannot connect: {cause}")
    } else {
        cause
    }
}

/// An error and its sources, as "outer: inner: innermost", skipping repeats.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(e);
    while let Some(err) = next {
        let text = err.to_string();
        if !text.is_empty() && !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = err.source();
    }
    parts.join(": ")
}
