//! The monitor's HTTP routes and their access check.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use base64::Engine;

use crate::{lock, Auth, Shared};

const PAGE: &str = include_str!("../assets/page.html");
const SCRIPT: &str = include_str!("../assets/monitor.js");
const UPLOT_JS: &str = include_str!("../assets/uPlot.iife.min.js");
const UPLOT_CSS: &str = include_str!("../assets/uPlot.min.css");

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/", get(|| async { asset("text/html; charset=utf-8", PAGE) }))
        .route("/assets/monitor.js", get(|| async { asset("text/javascript; charset=utf-8", SCRIPT) }))
        .route("/assets/uPlot.iife.min.js", get(|| async { asset("text/javascript; charset=utf-8", UPLOT_JS) }))
        .route("/assets/uPlot.min.css", get(|| async { asset("text/css; charset=utf-8", UPLOT_CSS) }))
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .route("/api/series", get(series))
        .route("/api/queues", get(|| async { json(crate::queues::to_json()) }))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .layer(middleware::from_fn_with_state(shared.clone(), access))
        .with_state(shared)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "no-cache")], body).into_response()
}

fn json(value: serde_json::Value) -> Response {
    ([(header::CONTENT_TYPE, "application/json"), (header::CACHE_CONTROL, "no-cache")], value.to_string()).into_response()
}

async fn metrics() -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], crate::prometheus::render()).into_response()
}

async fn status(State(shared): State<Arc<Shared>>) -> Response {
    json(crate::status::status(&shared))
}

/// Alive: every worker thread's loop turns (health.rs). Open without credentials, like the
/// assets: probes of orchestrators and balancers carry none, and it tells only ok or which
/// worker is stuck.
async fn healthz() -> Response {
    probe(crate::health::get().map(|h| h.liveness()).unwrap_or_default())
}

/// Ready: listening, the cluster joined when there is one, not draining (health.rs).
async fn readyz() -> Response {
    probe(crate::health::get().map(|h| h.readiness()).unwrap_or_default())
}

fn probe(reasons: Vec<String>) -> Response {
    let status = if reasons.is_empty() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, json(crate::health::body(&reasons))).into_response()
}

async fn series(State(shared): State<Arc<Shared>>, Query(q): Query<HashMap<String, String>>) -> Response {
    let coarse = match q.get("window").map(String::as_str) {
        None | Some("5m") => false,
        Some("1h") => true,
        Some(other) => return (StatusCode::BAD_REQUEST, format!("window {other:?} is not 5m or 1h\n")).into_response(),
    };
    let since = match q.get("since").map(|s| s.parse::<f64>()) {
        None => None,
        Some(Ok(t)) if t.is_finite() => Some(t),
        Some(_) => return (StatusCode::BAD_REQUEST, "since must be a time in Unix seconds\n").into_response(),
    };
    let body = lock(&shared.store).to_json(coarse, since);
    json(body)
}

/// Compares without leaving the position of the first difference in the timing.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

/// Whether `headers` and `query` carry the credentials `auth` asks for.
pub fn allowed(auth: &Auth, headers: &HeaderMap, query: Option<&str>) -> bool {
    let authorization = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).unwrap_or("");
    match auth {
        Auth::None => true,
        Auth::Token(token) => {
            if let Some(given) = authorization.strip_prefix("Bearer ") {
                return same(given.trim().as_bytes(), token.as_bytes());
            }
            // Links and the page's own requests carry ?token= (a browser cannot add a header
            // to a link).
            query.unwrap_or("").split('&').filter_map(|p| p.strip_prefix("token=")).any(|t| same(percent_decode(t).as_bytes(), token.as_bytes()))
        }
        Auth::Basic { user, password } => {
            let Some(encoded) = authorization.strip_prefix("Basic ") else { return false };
            let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded.trim()) else { return false };
            same(&decoded, format!("{user}:{password}").as_bytes())
        }
    }
}

/// Decodes a query parameter (`%XX`, and `+` for a space); bytes that are not UTF-8 become U+FFFD.
pub fn percent_decode(s: &str) -> String {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 3 <= bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h * 16 + l);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn access(State(shared): State<Arc<Shared>>, request: Request, next: Next) -> Response {
    // The scripts and styles hold no figures; the page loads them without its token. The
    // probes are asked by orchestrators and balancers, which carry no credentials.
    let path = request.uri().path();
    if path.starts_with("/assets/") || path == "/healthz" || path == "/readyz" || allowed(&shared.auth, request.headers(), request.uri().query()) {
        return next.run(request).await;
    }
    let mut response = (StatusCode::UNAUTHORIZED, "the monitor needs a token (Authorization: Bearer ... or ?token=...) or user and password\n").into_response();
    if matches!(shared.auth, Auth::Basic { .. }) {
        response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"pmnc monitor\""));
    }
    response
}

/// The page's listener with TLS: each connection's handshake runs in a task of its own (a slow
/// client delays nobody), and finished ones are handed to axum.
pub(crate) struct TlsListener {
    addr: std::net::SocketAddr,
    ready: tokio::sync::mpsc::Receiver<(tokio_rustls::server::TlsStream<tokio::net::TcpStream>, std::net::SocketAddr)>,
}

impl TlsListener {
    pub(crate) fn new(listener: tokio::net::TcpListener, tls: Arc<rustomnic_http::tls::TlsServer>) -> TlsListener {
        let addr = listener.local_addr().unwrap_or_else(|_| std::net::SocketAddr::from(([0, 0, 0, 0], 0)));
        let (tx, ready) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let (tcp, remote) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of file descriptors, most likely: wait instead of spinning.
                        tracing::warn!("monitor: accept failed: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let (tls, tx) = (tls.clone(), tx.clone());
                tokio::spawn(async move {
                    if let Some(s) = tls.accept(tcp, remote, std::future::pending()).await {
                        let _ = tx.send((s, remote)).await;
                    }
                });
            }
        });
        TlsListener { addr, ready }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(c) => c,
            // The accepting task never ends while the listener lives.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_checks() {
        let mut h = HeaderMap::new();
        assert!(allowed(&Auth::None, &h, None));
        let token = Auth::Token("s3cr/t".into());
        assert!(!allowed(&token, &h, None));
        assert!(!allowed(&token, &h, Some("token=wrong")));
        assert!(allowed(&token, &h, Some("window=5m&token=s3cr%2Ft")));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer s3cr/t"));
        assert!(allowed(&token, &h, None));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer s3cr/"));
        assert!(!allowed(&token, &h, Some("token=s3cr%2Ft")), "a wrong header is not rescued by the query");
        let basic = Auth::Basic { user: "ops".into(), password: "pw".into() };
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic b3BzOnB3"));
        assert!(allowed(&basic, &h, None));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic b3BzOnB4"));
        assert!(!allowed(&basic, &h, None));
        assert_eq!(percent_decode("a%20b+c%zz%4"), "a b c%zz%4");
    }
}
