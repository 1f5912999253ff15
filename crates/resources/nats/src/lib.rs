//! The `nats` resource: messages to a NATS server from module code, core and JetStream, through
//! async-nats. See docs/resources/nats.md and docs/decisions/124.
//!
//! ```toml
//! [resources.bus]
//! protocol = "nats"
//! url = "nats://127.0.0.1:4222"   # required; nats:// only, several servers separated by commas,
//!                                 # user:password@ in the url when the server asks for them
//! ```
//!
//! Methods:
//! - `publish(subject, body, headers?)` is checked and buffered when the transaction runs, and
//!   **published at commit** (core NATS), followed by a flush: the commit returns once the server
//!   has read the messages. A rollback publishes nothing.
//! - `jetstream_publish(subject, body, headers?)` likewise, to a subject a stream captures; the
//!   commit waits for the stream's acknowledgement of every message (no stream for the subject,
//!   a full stream or the time running out fails the commit).
//! - `request(subject, body, headers?)` sends a request at once and returns the reply
//!   `{body = ..., subject = ..., headers = {...}}` within the request's deadline; nobody
//!   subscribed is an error at once (code `no_responders`), a reply with the header
//!   `Nats-Service-Error` (a failed handler of the nats interface, or any NATS service) is an
//!   error with its `Nats-Service-Error-Code` as the code.
//!
//! A body that is a string is sent as it is, nil as an empty body, any other value as JSON with
//! the header `Content-Type: application/json`. `headers` is a table of names to strings
//! (numbers and booleans as text) or arrays of them. Subjects with wildcards (`*`, `>`) are
//! refused at the call.
//!
//! A pooled connection is one NATS client (which reconnects by itself; a connection found
//! disconnected at checkout is replaced).
//!
//! The module [`wire`] converts subjects, headers and bodies; [`client`] reads urls and
//! connects. The nats interface uses both.

pub mod client;
pub mod wire;

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::context::PublishAckFuture;
use async_nats::HeaderMap;
use futures_util::future::LocalBoxFuture;
use rustomnic_core::{Section, Value};
use rustomnic_resource::{Connection, Error, Resource, ResourceProtocol};

pub use async_nats;

/// The keys this protocol reads itself (the pool keys are read by the runtime).
pub const KEYS: &[&str] = &["url"];

/// How long connecting may take before the pool's own `connect_timeout` would cut it anyway.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a JetStream acknowledgement is awaited at most (the transaction's deadline usually
/// cuts it first).
const JETSTREAM_ACK_TIMEOUT: Duration = Duration::from_secs(30);

/// The `nats` resource protocol.
pub struct Nats;

struct NatsResource {
    url: client::NatsUrl,
    name: String,
}

impl ResourceProtocol for Nats {
    fn name(&self) -> &'static str {
        "nats"
    }

    fn configure(&self, resource: &str, section: &Section) -> Option<Arc<dyn Resource>> {
        let url = client::read_url(section, "url")?;
        Some(Arc::new(NatsResource { url, name: resource.to_string() }))
    }
}

impl Resource for NatsResource {
    fn connect(&self) -> LocalBoxFuture<'static, Result<Box<dyn Connection>, Error>> {
        let url = self.url.clone();
        let name = format!("pmnc resource {}", self.name);
        Box::pin(async move {
            let client = client::connect(&url, &name, CONNECT_TIMEOUT, None).await.map_err(Error::new)?;
            let mut jetstream = async_nats::jetstream::new(client.clone());
            jetstream.set_timeout(JETSTREAM_ACK_TIMEOUT);
            Ok(Box::new(NatsConnection { client, jetstream, display: url.display.clone(), pending: Vec::new(), sent: false }) as Box<dyn Connection>)
        })
    }
}

/// A message waiting for the commit.
struct Pending {
    jetstream: bool,
    subject: String,
    headers: HeaderMap,
    body: Vec<u8>,
}

struct NatsConnection {
    client: async_nats::Client,
    jetstream: async_nats::jetstream::Context,
    display: String,
    pending: Vec<Pending>,
    /// A request went out in this transaction: it may have acted.
    sent: bool,
}

impl Connection for NatsConnection {
    fn begin(&mut self) -> LocalBoxFuture<'_, Result<(), Error>> {
        self.pending.clear();
        self.sent = false;
        Box::pin(async { Ok(()) })
    }

    fn call<'a>(&'a mut self, method: &'a str, args: Vec<Value>) -> LocalBoxFuture<'a, Result<Value, Error>> {
        Box::pin(async move {
            match method {
                "publish" | "jetstream_publish" => {
                    let mut p = outgoing(method, args)?;
                    p.jetstream = method == "jetstream_publish";
                    self.pending.push(p);
                    Ok(Value::Nil)
                }
                "request" => {
                    let p = outgoing(method, args)?;
                    self.request(p).await
                }
                other => Err(Error::new(format!("{other:?} is not a method of a nats resource (methods: publish, jetstream_publish, request)"))),
            }
        })
    }

    fn commit(&mut self) -> LocalBoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            let pending = std::mem::take(&mut self.pending);
            if pending.is_empty() {
                return Ok(());
            }
            // Everything goes out in the order of the calls before any acknowledgement is
            // awaited: one round trip for all.
            let mut acks: Vec<(String, PublishAckFuture)> = Vec::new();
            let mut core = false;
            for p in pending {
                if p.jetstream {
                    match self.jetstream.publish_with_headers(p.subject.clone(), p.headers, p.body.into()).await {
                        Ok(ack) => acks.push((p.subject, ack)),
                        Err(e) => return Err(Error::broken(format!("jetstream_publish to {:?} on {} failed: {e}", p.subject, self.display))),
                    }
                } else {
                    core = true;
                    if let Err(e) = self.client.publish_with_headers(p.subject.clone(), p.headers, p.body.into()).await {
                        return Err(publish_error(&p.subject, &self.display, &e));
                    }
                }
            }
            if core {
                self.client
                    .flush()
                    .await
                    .map_err(|e| Error::broken(format!("publish on {}: the messages were not flushed to the server: {e}", self.display)))?;
            }
            for (subject, ack) in acks {
                if let Err(e) = ack.await {
                    return Err(jetstream_error(&subject, &self.display, &e));
                }
            }
            Ok(())
        })
    }

    fn rollback(&mut self) -> LocalBoxFuture<'_, Result<(), Error>> {
        self.pending.clear();
        Box::pin(async { Ok(()) })
    }

    fn is_healthy(&mut self) -> LocalBoxFuture<'_, bool> {
        let ok = self.client.connection_state() == async_nats::connection::State::Connected;
        Box::pin(async move { ok })
    }

    /// A buffered publish has done nothing until the commit; a request, once sent, may have
    /// acted.
    fn effects_stay(&self, method: &str, _outcome: &Result<Value, Error>) -> bool {
        method == "request" && self.sent
    }
}

fn publish_error(subject: &str, display: &str, e: &async_nats::PublishError) -> Error {
    match e.kind() {
        async_nats::client::PublishErrorKind::MaxPayloadExceeded => {
            Error::new(format!("publish to {subject:?} on {display}: the message is over the server's max_payload: {e}")).with_code("max_payload")
        }
        _ => Error::broken(format!("publish to {subject:?} on {display} failed: {e}")),
    }
}

fn jetstream_error(subject: &str, display: &str, e: &async_nats::jetstream::context::PublishError) -> Error {
    use async_nats::jetstream::context::PublishErrorKind as K;
    let text = rustomnic_resource::error_chain(e);
    match e.kind() {
        K::StreamNotFound => Error::new(format!("jetstream_publish to {subject:?} on {display}: no stream takes this subject ({text})")).with_code("no_stream"),
        K::MaxPayloadExceeded => {
            Error::new(format!("jetstream_publish to {subject:?} on {display}: the message is over the server's max_payload")).with_code("max_payload")
        }
        K::TimedOut => Error::broken(format!("jetstream_publish to {subject:?} on {display}: no acknowledgement from the stream in time")),
        _ => Error::new(format!("jetstream_publish to {subject:?} on {display}: the stream did not take the message: {text}")),
    }
}

/// Reads `(subject, body, headers?)`.
fn outgoing(method: &str, args: Vec<Value>) -> Result<Pending, Error> {
    let usage = format!("{method}(subject, body, headers?)");
    if args.len() < 2 || args.len() > 3 {
        return Err(Error::new(format!("{usage} takes 2 or 3 arguments, got {}", args.len())));
    }
    let subject = match &args[0] {
        Value::Str(_) => args[0].as_str().ok_or_else(|| Error::new(format!("{usage}: the subject is not UTF-8 text")))?.to_string(),
        other => return Err(Error::new(format!("{usage}: the subject must be a string, got {}", other.type_name()))),
    };
    wire::check_publish_subject("the subject", &subject).map_err(|e| Error::new(format!("{usage}: {e}")))?;
    let (body, content_type) = args[1].to_message_body().map_err(|e| Error::new(format!("{usage}: {e}")))?;
    let mut headers = wire::headers_from_value(args.get(2)).map_err(|e| Error::new(format!("{usage}: {e}")))?;
    if let Some(ct) = content_type {
        if headers.get(wire::CONTENT_TYPE_HEADER).is_none() {
            headers.insert(wire::CONTENT_TYPE_HEADER, ct);
        }
    }
    Ok(Pending { jetstream: false, subject, headers, body })
}

impl NatsConnection {
    async fn request(&mut self, p: Pending) -> Result<Value, Error> {
        let subject = p.subject;
        self.sent = true;
        let reply = match self.client.request_with_headers(subject.clone(), p.headers, p.body.into()).await {
            Ok(m) => m,
            Err(e) => {
                use async_nats::client::RequestErrorKind as K;
                return Err(match e.kind() {
                    K::NoResponders => {
                        self.sent = false;
                        Error::new(format!("request to {subject:?} on {}: no responders (nobody subscribes to the subject)", self.display))
                            .with_code("no_responders")
                    }
                    K::TimedOut => Error::new(format!("request to {subject:?} on {}: no reply in time", self.display)).with_code("timeout"),
                    _ => Error::broken(format!("request to {subject:?} on {} failed: {}", self.display, rustomnic_resource::error_chain(&e))),
                });
            }
        };
        let headers = reply.headers.as_ref();
        if let Some(error) = wire::header(headers, wire::ERROR_HEADER) {
            let code = wire::header(headers, wire::ERROR_CODE_HEADER).unwrap_or_else(|| "500".to_string());
            return Err(Error::new(format!("request to {subject:?}: the responder failed: {error}")).with_code(code));
        }
        Ok(Value::Map(vec![
            (Value::str("body"), Value::Str(reply.payload.to_vec())),
            (Value::str("subject"), Value::str(reply.subject.as_str())),
            (Value::str("headers"), wire::headers_to_value(headers)),
        ]))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn arguments_are_checked_at_the_call() {
        let err = |args: Vec<Value>| outgoing("publish", args).err().unwrap().message;
        assert!(err(vec![Value::str("a.*"), Value::str("x")]).contains("wildcard"));
        assert!(err(vec![Value::str("a")]).contains("takes 2 or 3 arguments"));
        assert!(err(vec![Value::Int(1), Value::str("x")]).contains("must be a string"));
        assert!(err(vec![Value::str("a"), Value::str("x"), Value::str("h")]).contains("headers must be a table"));
        let p = outgoing("publish", vec![Value::str("a.b"), Value::Map(vec![(Value::str("k"), Value::Int(1))])]).unwrap();
        assert_eq!(p.body, br#"{"k":1}"#);
        assert_eq!(p.headers.get(wire::CONTENT_TYPE_HEADER).unwrap().as_str(), "application/json");
    }
}
