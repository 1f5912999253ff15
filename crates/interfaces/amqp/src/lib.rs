//! The `amqp` interface: every message consumed from AMQP 0-9-1 queues (RabbitMQ, through lapin)
//! is a request to the handler, and is acknowledged only after the handler returned and its
//! transactions committed. See docs/interfaces/amqp.md and docs/decisions/110-114.
//!
//! ```toml
//! [interfaces.orders]
//! protocol = "amqp"
//! url = "amqp://guest:guest@127.0.0.1:5672/%2f"   # required; amqp:// only
//! queues = ["orders"]                  # required: the queues consumed
//! declare = false                      # true: declare the queues (durable), their bindings, and
//!                                      # with dead_letter_exchange the exchange and <queue>.dead
//! bindings = ["shop order.*"]          # with declare: "EXCHANGE ROUTING_KEY", each to every queue
//! dead_letter_exchange = "orders.dlx"  # where messages go after their last attempt
//! prefetch = 16                        # messages handled at once (unacknowledged at the broker)
//! max_attempts = 5                     # attempts before a message is dead-lettered
//! retry_delay = "1s"                   # delay before the second attempt, doubled for each next
//! max_retry_delay = "1m"               # the most the delay grows to
//! max_message_size = "16MiB"           # bigger bodies are refused (dead-lettered at once)
//! handler = "orders.handle"            # default "<interface>.handle"
//! request_timeout = "30s"              # deadline of one attempt
//! ```
//!
//! The handler is `function M.handle(message)`: `message.body` (a string), `message.queue`,
//! `.exchange`, `.routing_key`, `.redelivered`, `.delivery_tag`, `.attempt` (from 1) and
//! `.properties` (`content_type`, `correlation_id`, `reply_to`, `message_id`, `timestamp`,
//! `headers` as a table, ...: those the message has). When the message has `reply_to`, the
//! handler's return value is published there with its `correlation_id` (RPC); a failed handler
//! then replies with the header `x-pmnc-error` and an empty body, and the message is not retried.
//!
//! A failed attempt is retried by republishing the message to its queue with the header
//! `x-pmnc-attempt` one higher, after the delay (the original stays unacknowledged until the copy
//! is confirmed); after `max_attempts` it is published to `dead_letter_exchange` (routing key:
//! the queue's name) with the error in `x-pmnc-error`, or, without one, rejected without requeue.
//! A lost broker is reconnected with backoff (said once per outage in the log), and consumption
//! resumes by itself.

mod session;

use std::sync::Arc;
use std::time::Duration;

use rustomnic_core::Section;
use rustomnic_interface::{Host, Interface, InterfaceProtocol, InterfaceSpec};
use rustomnic_resource_amqp::client::{self, AmqpUrl};
use rustomnic_resource_amqp::wire;

/// The keys of an amqp interface (besides protocol, handler and request_timeout; unknown keys
/// are reported by the runtime).
pub const KEYS: &[&str] =
    &["url", "queues", "declare", "bindings", "dead_letter_exchange", "prefetch", "max_attempts", "retry_delay", "max_retry_delay", "max_message_size"];

/// The largest `max_message_size` (RabbitMQ itself refuses bodies over 512 MiB).
const MAX_MESSAGE_SIZE_LIMIT: u64 = 512 << 20;

/// The `amqp` protocol.
pub struct AmqpProtocol;

/// A binding of `bindings`: an exchange and a routing key (a pattern for topic exchanges).
#[derive(Debug, Clone, PartialEq)]
pub struct Binding {
    pub exchange: String,
    pub routing_key: String,
}

/// A configured amqp interface.
pub struct AmqpInterface {
    spec: InterfaceSpec,
    pub(crate) url: AmqpUrl,
    pub(crate) queues: Vec<String>,
    pub(crate) declare: bool,
    pub(crate) bindings: Vec<Binding>,
    pub(crate) dead_letter_exchange: Option<String>,
    pub(crate) prefetch: u16,
    pub(crate) max_attempts: u32,
    pub(crate) retry_delay: Duration,
    pub(crate) max_retry_delay: Duration,
    pub(crate) max_message_size: usize,
}

impl InterfaceProtocol for AmqpProtocol {
    fn name(&self) -> &'static str {
        "amqp"
    }

    fn configure(&self, spec: InterfaceSpec, section: &Section) -> Option<Arc<dyn Interface>> {
        // Every key is read before giving up, so that all problems are listed at once.
        let url = client::read_url(section, "url");
        let queues = section.required_list("queues", "[\"orders\"]", "names no queue; give at least one, e.g. queues = [\"orders\"]", |name| {
            check_name(name).map_err(|e| format!("queue {name:?}: {e}"))
        });
        let declare = section.bool("declare").map(|v| v.value).unwrap_or(false);
        let bindings = match section.strings("bindings") {
            Some(list) => {
                let mut out = Vec::new();
                let mut ok = true;
                for text in &list.value {
                    match parse_binding(text) {
                        Ok(b) => out.push(b),
                        Err(e) => {
                            section.error("bindings", e);
                            ok = false;
                        }
                    }
                }
                if !declare && !out.is_empty() {
                    section.error("bindings", "are made only with declare = true (otherwise the queues and their bindings are used as they are)");
                    ok = false;
                }
                ok.then_some(out)
            }
            None if section.has("bindings") => None,
            None => Some(Vec::new()),
        };
        let dead_letter_exchange = match section.string("dead_letter_exchange") {
            Some(x) => match check_name(&x.value) {
                Ok(()) if x.value.is_empty() => {
                    section.error("dead_letter_exchange", "is empty; leave it out to reject failed messages without requeue instead");
                    None
                }
                Ok(()) => Some(Some(x.value)),
                Err(e) => {
                    section.error("dead_letter_exchange", e);
                    None
                }
            },
            None if section.has("dead_letter_exchange") => None,
            None => Some(None),
        };
        let prefetch = section.integer("prefetch", 1, 65_535).map(|v| v.value as u16).unwrap_or(16);
        let max_attempts = section.integer("max_attempts", 1, 1_000_000).map(|v| v.value as u32).unwrap_or(5);
        let retry_delay = section.duration("retry_delay", Duration::from_secs(86_400)).map(|v| v.value).unwrap_or(Duration::from_secs(1));
        let max_retry_delay = section.duration("max_retry_delay", Duration::from_secs(86_400)).map(|v| v.value).unwrap_or(Duration::from_secs(60));
        let max_message_size = section.size("max_message_size", MAX_MESSAGE_SIZE_LIMIT).map(|v| v.value as usize).unwrap_or(16 << 20);
        let (Some(url), Some(queues), Some(bindings), Some(dead_letter_exchange)) = (url, queues, bindings, dead_letter_exchange) else { return None };
        Some(Arc::new(AmqpInterface {
            spec,
            url,
            queues,
            declare,
            bindings,
            dead_letter_exchange,
            prefetch,
            max_attempts,
            retry_delay,
            max_retry_delay: max_retry_delay.max(retry_delay),
            max_message_size,
        }))
    }
}

/// Queue and exchange names are short strings: at most 255 bytes.
fn check_name(name: &str) -> Result<(), String> {
    wire::short("the name", name).map(|_| ())
}

/// `"EXCHANGE ROUTING_KEY"` (exchange names hold no spaces); the routing key may be empty
/// (`"events "` or just `"events"`, for fanout exchanges).
pub fn parse_binding(text: &str) -> Result<Binding, String> {
    let text = text.trim_start();
    let (exchange, routing_key) = match text.split_once(char::is_whitespace) {
        Some((x, k)) => (x, k.trim()),
        None => (text, ""),
    };
    if exchange.is_empty() {
        return Err(format!("{text:?} names no exchange; write \"EXCHANGE ROUTING_KEY\", such as \"shop order.*\""));
    }
    check_name(exchange).map_err(|e| format!("exchange {exchange:?}: {e}"))?;
    check_name(routing_key).map_err(|e| format!("routing key {routing_key:?}: {e}"))?;
    Ok(Binding { exchange: exchange.to_string(), routing_key: routing_key.to_string() })
}

impl AmqpInterface {
    /// The delay before attempt `next` (2 and up): `retry_delay` doubled for every attempt after
    /// the second, at most `max_retry_delay`.
    pub fn retry_delay(&self, next: u32) -> Duration {
        let doublings = next.saturating_sub(2).min(32);
        self.retry_delay.saturating_mul(1u32 << doublings.min(31)).min(self.max_retry_delay)
    }
}

impl Interface for AmqpInterface {
    fn spec(&self) -> &InterfaceSpec {
        &self.spec
    }

    fn start(self: Arc<Self>, host: Host) {
        let me = self.clone();
        rustomnic_interface::consumer::spawn(&self.spec, move || session::run(me, host));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn retry_delays_double_up_to_the_limit() {
        let a = AmqpInterface {
            spec: InterfaceSpec {
                cage: "c".into(),
                name: "in".into(),
                protocol: "amqp".into(),
                handler: rustomnic_core::Located { value: ("in".into(), "handle".into()), file: "cage.toml".into(), line: 1, key: "handler".into() },
                request_timeout: Duration::from_secs(1),
                state_file: "x".into(),
                fingerprint: String::new(),
            },
            url: client::parse_url("amqp://h/").unwrap(),
            queues: vec!["q".into()],
            declare: false,
            bindings: vec![],
            dead_letter_exchange: None,
            prefetch: 16,
            max_attempts: 5,
            retry_delay: Duration::from_secs(1),
            max_retry_delay: Duration::from_secs(5),
            max_message_size: 1,
        };
        let delays: Vec<u64> = (2..=6).map(|n| a.retry_delay(n).as_secs()).collect();
        assert_eq!(delays, vec![1, 2, 4, 5, 5]);
        assert_eq!(a.retry_delay(u32::MAX).as_secs(), 5);
    }

    #[test]
    fn bindings_are_an_exchange_and_a_routing_key() {
        assert_eq!(parse_binding("shop order.*").unwrap(), Binding { exchange: "shop".into(), routing_key: "order.*".into() });
        assert_eq!(parse_binding("events").unwrap(), Binding { exchange: "events".into(), routing_key: String::new() });
        assert!(parse_binding(" ").unwrap_err().contains("names no exchange"));
        assert!(parse_binding(&format!("x {}", "k".repeat(300))).unwrap_err().contains("at most 255"));
    }
}
