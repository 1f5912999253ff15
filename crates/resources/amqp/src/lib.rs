//! The `amqp` resource: messages to an AMQP 0-9-1 broker (RabbitMQ) from module code, through
//! lapin. See docs/resources/amqp.md.
//!
//! ```toml
//! [resources.bus]
//! protocol = "amqp"
//! url = "amqp://guest:guest@127.0.0.1:5672/%2f"   # required; amqp:// only (no TLS yet)
//! ```
//!
//! Methods:
//! - `publish(exchange, routing_key, body, properties?)` is checked and buffered when the
//!   transaction runs, and **published at commit** on a channel in confirm mode; the commit waits
//!   for the broker's confirm of every message (a nack, an unroutable mandatory message or the
//!   time running out fails the commit). A rollback publishes nothing.
//! - `call(exchange, routing_key, body, properties?)` publishes a request at once with RabbitMQ's
//!   direct reply-to and returns the reply `{body = ..., properties = {...}}` (within the
//!   request's deadline). A reply with the header `x-pmnc-error` (a failed handler of the amqp
//!   interface) is an error.
//!
//! A pooled connection is one AMQP connection with one channel in confirm mode (and, once `call`
//! is used, a second one consuming the direct reply-to pseudo-queue).
//!
//! The module [`wire`] converts field tables, properties and bodies; [`client`] reads urls and
//! connects. The amqp interface uses both.

pub mod client;
pub mod wire;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures_util::future::LocalBoxFuture;
use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Consumer};
use rustomnic_core::{Section, Value};
use rustomnic_resource::{Connection, Error, Resource, ResourceProtocol};

pub use lapin;

/// The keys this protocol reads itself (the pool keys are read by the runtime).
pub const KEYS: &[&str] = &["url"];

/// RabbitMQ's pseudo-queue for replies on the requester's own channel (no queue to declare).
pub const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// The `amqp` resource protocol.
pub struct Amqp;

struct AmqpResource {
    url: client::AmqpUrl,
    name: String,
}

impl ResourceProtocol for Amqp {
    fn name(&self) -> &'static str {
        "amqp"
    }

    fn configure(&self, resource: &str, section: &Section) -> Option<Arc<dyn Resource>> {
        let url = client::read_url(section, "url")?;
        Some(Arc::new(AmqpResource { url, name: resource.to_string() }))
    }
}

impl Resource for AmqpResource {
    fn connect(&self) -> LocalBoxFuture<'static, Result<Box<dyn Connection>, Error>> {
        let url = self.url.clone();
        let name = format!("pmnc resource {}", self.name);
        Box::pin(async move {
            let conn = client::connect(&url, &name).await.map_err(Error::new)?;
            let channel = conn.create_channel().await.map_err(|e| Error::new(format!("{}: cannot open a channel: {e}", url.display)))?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .map_err(|e| Error::new(format!("{}: cannot switch on publisher confirms: {e}", url.display)))?;
            Ok(Box::new(AmqpConnection { conn, channel, rpc: None, display: url.display.clone(), pending: Vec::new(), sent: false }) as Box<dyn Connection>)
        })
    }
}

/// A message waiting for the commit.
struct Pending {
    exchange: ShortString,
    routing_key: ShortString,
    body: Vec<u8>,
    properties: BasicProperties,
    mandatory: bool,
}

impl Pending {
    fn target(&self) -> String {
        target(self.exchange.as_str(), self.routing_key.as_str())
    }
}

fn target(exchange: &str, routing_key: &str) -> String {
    if exchange.is_empty() {
        format!("the default exchange with routing key {routing_key:?}")
    } else {
        format!("exchange {exchange:?} with routing key {routing_key:?}")
    }
}

struct AmqpConnection {
    conn: lapin::Connection,
    /// In confirm mode: publishes at commit and requests of `call`.
    channel: Channel,
    /// Opened at the first `call`: its consumer of the direct reply-to pseudo-queue (which must
    /// be on the channel that publishes the requests).
    rpc: Option<(Channel, Consumer)>,
    display: String,
    pending: Vec<Pending>,
    /// A request of `call` went out in this transaction: it may have acted.
    sent: bool,
}

impl Connection for AmqpConnection {
    fn begin(&mut self) -> LocalBoxFuture<'_, Result<(), Error>> {
        self.pending.clear();
        self.sent = false;
        Box::pin(async { Ok(()) })
    }

    fn call<'a>(&'a mut self, method: &'a str, args: Vec<Value>) -> LocalBoxFuture<'a, Result<Value, Error>> {
        Box::pin(async move {
            match method {
                "publish" => {
                    let p = outgoing("publish", args)?;
                    self.pending.push(p);
                    Ok(Value::Nil)
                }
                "call" => {
                    let p = outgoing("call", args)?;
                    self.rpc_call(p).await
                }
                other => Err(Error::new(format!("{other:?} is not a method of an amqp resource (methods: publish, call)"))),
            }
        })
    }

    fn commit(&mut self) -> LocalBoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            let pending = std::mem::take(&mut self.pending);
            if pending.is_empty() {
                return Ok(());
            }
            // Every message goes out before any confirm is awaited: one round trip for all.
            let mut confirms = Vec::with_capacity(pending.len());
            for p in &pending {
                let options = BasicPublishOptions { mandatory: p.mandatory, ..BasicPublishOptions::default() };
                match self.channel.basic_publish(p.exchange.clone(), p.routing_key.clone(), options, &p.body, p.properties.clone()).await {
                    Ok(c) => confirms.push(c),
                    Err(e) => return Err(Error::broken(format!("publish to {} on {} failed: {e}", p.target(), self.display))),
                }
            }
            for (p, confirm) in pending.iter().zip(confirms) {
                match confirm.await {
                    Ok(c) => check_confirm(c, &p.target())?,
                    Err(e) => return Err(Error::broken(format!("publish to {} on {}: no confirm from the broker: {e}", p.target(), self.display))),
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
        let ok = self.conn.status().connected() && self.channel.status().connected() && self.rpc.as_ref().is_none_or(|(c, _)| c.status().connected());
        Box::pin(async move { ok })
    }

    /// A buffered publish has done nothing until the commit; a `call`'s request, once sent, may
    /// have acted.
    fn effects_stay(&self, method: &str, _outcome: &Result<Value, Error>) -> bool {
        method == "call" && self.sent
    }
}

/// The checks of a confirm: acked, and not returned as unroutable.
fn check_confirm(c: Confirmation, target: &str) -> Result<(), Error> {
    if c.is_nack() {
        return Err(Error::new(format!("publish to {target}: the broker refused the message (nack)")));
    }
    if let Some(returned) = c.take_message() {
        return Err(Error::new(format!(
            "publish to {target}: no queue took the message ({} {}); bind a queue, or publish with properties.mandatory = false to let the broker drop it",
            returned.reply_code, returned.reply_text
        ))
        .with_code(returned.reply_code.to_string()));
    }
    Ok(())
}

/// Reads `(exchange, routing_key, body, properties?)`.
fn outgoing(method: &str, args: Vec<Value>) -> Result<Pending, Error> {
    let usage = format!("{method}(exchange, routing_key, body, properties?)");
    if args.len() < 3 || args.len() > 4 {
        return Err(Error::new(format!("{usage} takes 3 or 4 arguments, got {}", args.len())));
    }
    let name = |v: &Value, what: &str| -> Result<ShortString, Error> {
        match v {
            Value::Str(_) => {
                let s = v.as_str().ok_or_else(|| Error::new(format!("{usage}: {what} is not UTF-8 text")))?;
                wire::short(what, s).map_err(|e| Error::new(format!("{usage}: {e}")))
            }
            other => Err(Error::new(format!("{usage}: {what} must be a string, got {}", other.type_name()))),
        }
    };
    let exchange = name(&args[0], "exchange")?;
    let routing_key = name(&args[1], "routing_key")?;
    let (body, content_type) = args[2].to_message_body().map_err(|e| Error::new(format!("{usage}: {e}")))?;
    let out = wire::properties_from_value(args.get(3)).map_err(|e| Error::new(format!("{usage}: {e}")))?;
    let mut properties = out.properties;
    if let (Some(ct), None) = (content_type, properties.content_type()) {
        properties = properties.with_content_type(ShortString::from(ct));
    }
    Ok(Pending { exchange, routing_key, body, properties, mandatory: out.mandatory })
}

/// Makes a correlation id unique in this process: the process id, a counter.
fn correlation_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    format!("pmnc-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

impl AmqpConnection {
    async fn rpc_channel(&mut self) -> Result<&mut (Channel, Consumer), Error> {
        if self.rpc.is_none() {
            let channel = self.conn.create_channel().await.map_err(|e| Error::broken(format!("{}: cannot open a channel: {e}", self.display)))?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .map_err(|e| Error::broken(format!("{}: cannot switch on publisher confirms: {e}", self.display)))?;
            let options = BasicConsumeOptions { no_ack: true, ..BasicConsumeOptions::default() };
            let consumer = channel
                .basic_consume(ShortString::from(DIRECT_REPLY_TO), ShortString::default(), options, FieldTable::default())
                .await
                .map_err(|e| Error::broken(format!("{}: cannot consume {DIRECT_REPLY_TO} (RabbitMQ's direct reply-to): {e}", self.display)))?;
            self.rpc = Some((channel, consumer));
        }
        self.rpc.as_mut().ok_or_else(|| Error::broken("no reply channel"))
    }

    async fn rpc_call(&mut self, mut p: Pending) -> Result<Value, Error> {
        let id = correlation_id();
        p.properties = p.properties.with_reply_to(ShortString::from(DIRECT_REPLY_TO)).with_correlation_id(ShortString::from(id.as_str()));
        let display = self.display.clone();
        let target = p.target();
        let (channel, _) = self.rpc_channel().await?;
        let options = BasicPublishOptions { mandatory: p.mandatory, ..BasicPublishOptions::default() };
        let confirm = channel
            .basic_publish(p.exchange.clone(), p.routing_key.clone(), options, &p.body, p.properties.clone())
            .await
            .map_err(|e| Error::broken(format!("call to {target} on {display} failed: {e}")))?;
        let confirmed = confirm.await.map_err(|e| Error::broken(format!("call to {target} on {display}: no confirm from the broker: {e}")));
        self.sent = true;
        let Some((_, consumer)) = self.rpc.as_mut() else { return Err(Error::broken("no reply channel")) };
        check_confirm(confirmed?, &target).map_err(|e| Error { message: e.message.replacen("publish to", "call to", 1), ..e })?;
        // Replies to earlier calls cut by their deadline may still arrive: only ours counts.
        loop {
            match consumer.next().await {
                Some(Ok(reply)) => {
                    if reply.properties.correlation_id().as_ref().map(|c| c.as_str()) != Some(id.as_str()) {
                        tracing::debug!("amqp call: a reply for another request ({:?}) ignored", reply.properties.correlation_id());
                        continue;
                    }
                    if let Some(error) = wire::header_text(&reply.properties, wire::ERROR_HEADER) {
                        return Err(Error::new(format!("call to {target}: the handler failed: {error}")).with_code("handler"));
                    }
                    let properties = wire::properties_to_value(&reply.properties).map_err(|e| Error::new(format!("call to {target}: the reply's {e}")))?;
                    return Ok(Value::Map(vec![(Value::str("body"), Value::Str(reply.data)), (Value::str("properties"), properties)]));
                }
                Some(Err(e)) => return Err(Error::broken(format!("call to {target} on {display}: waiting for the reply failed: {e}"))),
                None => return Err(Error::broken(format!("call to {target} on {display}: the reply consumer was cancelled"))),
            }
        }
    }
}
