//! The `stomp` resource: messages to a STOMP 1.2 broker (RabbitMQ's STOMP plugin) from module
//! code, over a client of our own on tokio. See docs/resources/stomp.md and
//! docs/decisions/125-129.
//!
//! ```toml
//! [resources.out]
//! protocol = "stomp"
//! url = "stomp://guest:guest@127.0.0.1:61613/"   # required; stomp:// only (no TLS yet)
//! receipt_timeout = "10s"                        # how long a commit waits for the receipts
//! ```
//!
//! Methods:
//! - `send(destination, body, headers?)` is checked and buffered when the transaction runs, and
//!   **sent at commit**, each SEND with a `receipt` header; the commit waits for the RECEIPT of
//!   every message (an ERROR frame, a lost connection or `receipt_timeout` fails the commit).
//!   A rollback sends nothing. A body that is not a string goes as JSON with
//!   `content-type:application/json`; `headers` is a table of names to strings, numbers or
//!   booleans.
//!
//! A pooled connection is one STOMP connection without heart-beats (it is idle between
//! transactions; a connection the broker closed meanwhile is found before it is handed out).
//!
//! The module [`frame`] is the frame codec and [`client`] the url and connection layer; the
//! stomp interface uses both.

pub mod client;
pub mod frame;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::LocalBoxFuture;
use rustomnic_core::{Section, Value};
use rustomnic_resource::{Connection, Error, Resource, ResourceProtocol};

use client::{Connected, StompUrl};
use frame::{Frame, Limits};

/// The keys this protocol reads itself (the pool keys are read by the runtime).
pub const KEYS: &[&str] = &["url", "receipt_timeout"];

/// How long connecting may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Headers a call may not set: the client writes them itself.
pub const RESERVED_HEADERS: &[&str] = &["destination", "receipt", "content-length", "transaction"];

/// The `stomp` resource protocol.
pub struct Stomp;

struct StompResource {
    url: StompUrl,
    receipt_timeout: Duration,
}

impl ResourceProtocol for Stomp {
    fn name(&self) -> &'static str {
        "stomp"
    }

    fn configure(&self, _resource: &str, section: &Section) -> Option<Arc<dyn Resource>> {
        let url = client::read_url(section, "url");
        let receipt_timeout = section.duration("receipt_timeout", Duration::from_secs(3600)).map(|v| v.value).unwrap_or(Duration::from_secs(10));
        Some(Arc::new(StompResource { url: url?, receipt_timeout }))
    }
}

impl Resource for StompResource {
    fn connect(&self) -> LocalBoxFuture<'static, Result<Box<dyn Connection>, Error>> {
        let url = self.url.clone();
        let receipt_timeout = self.receipt_timeout;
        Box::pin(async move {
            // Receipts and errors are all a resource reads: small frames.
            let limits = Limits { max_body: 1 << 20, ..Limits::default() };
            let conn = client::connect(&url, Duration::ZERO, limits, CONNECT_TIMEOUT).await.map_err(Error::new)?;
            Ok(Box::new(StompConnection { conn, display: url.display.clone(), pending: Vec::new(), receipt_timeout, broken: false }) as Box<dyn Connection>)
        })
    }
}

struct StompConnection {
    conn: Connected,
    display: String,
    pending: Vec<Frame>,
    receipt_timeout: Duration,
    broken: bool,
}

impl Connection for StompConnection {
    fn begin(&mut self) -> LocalBoxFuture<'_, Result<(), Error>> {
        self.pending.clear();
        Box::pin(async { Ok(()) })
    }

    fn call<'a>(&'a mut self, method: &'a str, args: Vec<Value>) -> LocalBoxFuture<'a, Result<Value, Error>> {
        Box::pin(async move {
            match method {
                "send" => {
                    let f = outgoing(args).map_err(|e| Error::new(format!("send(destination, body, headers?): {e}")))?;
                    self.pending.push(f);
                    Ok(Value::Nil)
                }
                other => Err(Error::new(format!("{other:?} is not a method of a stomp resource (methods: send)"))),
            }
        })
    }

    fn commit(&mut self) -> LocalBoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            let pending = std::mem::take(&mut self.pending);
            if pending.is_empty() {
                return Ok(());
            }
            let timeout = self.receipt_timeout;
            let display = self.display.clone();
            let result = match tokio::time::timeout(timeout, self.send_all(pending)).await {
                Ok(r) => r,
                Err(_) => Err(format!("{display}: no receipt for every message within receipt_timeout ({timeout:?})")),
            };
            result.map_err(|e| {
                self.broken = true;
                Error::broken(format!("send on {e}"))
            })
        })
    }

    fn rollback(&mut self) -> LocalBoxFuture<'_, Result<(), Error>> {
        self.pending.clear();
        Box::pin(async { Ok(()) })
    }

    fn is_healthy(&mut self) -> LocalBoxFuture<'_, bool> {
        let ok = !self.broken && self.conn.reader.idle_and_open();
        Box::pin(async move { ok })
    }
}

/// Makes a receipt id unique in this process.
pub fn receipt_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    format!("pmnc-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

impl StompConnection {
    /// Every SEND goes out before any receipt is awaited: one round trip for all.
    async fn send_all(&mut self, pending: Vec<Frame>) -> Result<(), String> {
        let mut waiting = Vec::with_capacity(pending.len());
        let mut bytes = Vec::new();
        for f in pending {
            let id = receipt_id();
            waiting.push((id.clone(), f.get("destination").unwrap_or("").to_string()));
            bytes.extend_from_slice(&f.header("receipt", id).encode());
        }
        self.conn.writer.send_bytes(&bytes).await?;
        while !waiting.is_empty() {
            let f = self.conn.reader.frame().await.map_err(|e| {
                let first = waiting.first().map(|(_, d)| d.as_str()).unwrap_or("");
                format!("{e} (sending to {first:?})")
            })?;
            if f.command == "RECEIPT" {
                let id = f.get("receipt-id").unwrap_or("");
                waiting.retain(|(r, _)| r != id);
            }
        }
        Ok(())
    }
}

/// Reads `(destination, body, headers?)` into a SEND frame (without its receipt).
pub fn outgoing(args: Vec<Value>) -> Result<Frame, String> {
    if args.len() < 2 || args.len() > 3 {
        return Err(format!("takes 2 or 3 arguments, got {}", args.len()));
    }
    let destination = match &args[0] {
        v @ Value::Str(_) => v.as_str().ok_or("the destination is not UTF-8 text")?.to_string(),
        other => return Err(format!("the destination must be a string, got {}", other.type_name())),
    };
    client::check_destination(&destination)?;
    let (body, content_type) = args[1].to_message_body()?;
    let mut f = Frame::new("SEND").header("destination", destination);
    let mut has_type = false;
    if let Some(h) = args.get(2) {
        for (k, v) in headers_from_value(h)? {
            has_type |= k == "content-type";
            f = f.header(&k, v);
        }
    }
    if let (Some(ct), false) = (content_type, has_type) {
        f = f.header("content-type", ct);
    }
    Ok(f.with_body(body))
}

/// A table of header names to strings, numbers or booleans.
pub fn headers_from_value(v: &Value) -> Result<Vec<(String, String)>, String> {
    let entries = match v {
        Value::Nil => return Ok(Vec::new()),
        Value::Map(entries) => entries,
        Value::Array(a) if a.is_empty() => return Ok(Vec::new()),
        other => return Err(format!("headers must be a table of names to values, got {}", other.type_name())),
    };
    let mut out = Vec::with_capacity(entries.len());
    for (k, v) in entries {
        let name = k.as_str().ok_or_else(|| format!("a header name must be text, got {}", k.type_name()))?;
        if name.is_empty() || RESERVED_HEADERS.contains(&name) {
            return Err(format!("header {name:?} cannot be set (the client writes destination, receipt, content-length itself)"));
        }
        let value = match v {
            Value::Str(_) => v.as_str().ok_or_else(|| format!("header {name:?} is not UTF-8 text"))?.to_string(),
            Value::Int(i) => i.to_string(),
            Value::Float(x) => x.to_string(),
            Value::Bool(b) => b.to_string(),
            other => return Err(format!("header {name:?} must be a string, number or boolean, got {}", other.type_name())),
        };
        out.push((name.to_string(), value));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn send_arguments_are_checked() {
        let f = outgoing(vec![Value::str("/queue/a"), Value::Map(vec![(Value::str("k"), Value::Int(1))]), Value::Map(vec![(Value::str("x"), Value::Int(2))])])
            .unwrap();
        assert_eq!(f.get("destination"), Some("/queue/a"));
        assert_eq!(f.get("content-type"), Some("application/json"));
        assert_eq!(f.get("x"), Some("2"));
        assert_eq!(f.body, br#"{"k":1}"#);
        assert!(outgoing(vec![Value::str("a")]).unwrap_err().contains("2 or 3 arguments"));
        assert!(outgoing(vec![Value::str("nope"), Value::str("b")]).unwrap_err().contains("is not one of"));
        let reserved = outgoing(vec![Value::str("/queue/a"), Value::str("b"), Value::Map(vec![(Value::str("receipt"), Value::str("r"))])]);
        assert!(reserved.unwrap_err().contains("cannot be set"));
    }
}
