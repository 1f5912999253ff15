//! The `nats` interface: messages from NATS become requests to the handler, either from core
//! subjects (at most once; request/reply answered with the handler's value) or from a JetStream
//! durable consumer (acknowledged only after the handler returned and its transactions
//! committed). See docs/interfaces/nats.md and docs/decisions/120-124.
//!
//! ```toml
//! [interfaces.orders]
//! protocol = "nats"
//! url = "nats://127.0.0.1:4222"        # required; nats:// only, several separated by commas
//! # core subscriptions (no `stream`):
//! subjects = ["orders.*", "audit.>"]   # required without stream; wildcards allowed
//! queue_group = "orders"               # optional: copies of the cage share the messages
//! # or a JetStream durable consumer:
//! stream = "ORDERS"                    # the stream consumed
//! consumer = "pmnc-orders"             # required with stream: the durable consumer's name
//! declare = false                      # true: create the stream (with `subjects`) and the
//!                                      # consumer when missing, or update the consumer
//! max_deliver = 5                      # deliveries before a failed message is terminated
//! backoff = ["1s", "5s", "30s"]        # delay before the 2nd, 3rd... delivery (last repeats)
//! ack_wait = "40s"                     # default request_timeout + 10s; must be longer than it
//! dead_letter_subject = "orders.dead"  # where terminated messages are published, with the error
//! # both:
//! max_ack_pending = 16                 # messages handled at once
//! max_message_size = "1MiB"            # bigger bodies are refused
//! handler = "orders.handle"            # default "<interface>.handle"
//! request_timeout = "30s"              # deadline of one attempt
//! ```
//!
//! The handler is `function M.handle(message)`: `message.body` (a string), `.subject`,
//! `.headers` (a table: a header given once is a string, several times an array of strings),
//! `.attempt` (1 for core messages), `.reply` (core messages sent as requests) and, from
//! JetStream, `.stream`, `.sequence` (the stream's), `.delivered` (the server's delivery count),
//! `.redelivered` (delivered before).
//!
//! Core: a message with a reply subject is answered with the handler's return value (a string
//! as it is, nil as an empty body, other values as JSON); a failed handler answers an empty body
//! with the headers `Nats-Service-Error` (the error) and `Nats-Service-Error-Code` ("500"). A
//! failed handler of a message without reply is logged: core NATS keeps nothing to retry.
//!
//! JetStream: success acks; failure naks with the next `backoff` delay; the delivery that
//! reaches `max_deliver` is termed, logged and, with `dead_letter_subject`, published there with
//! the error in `Nats-Service-Error` (published before the term, so a crash in between repeats
//! the dead letter rather than losing it). A lost server is reconnected by the client with
//! backoff (said once per outage in the log), and consumption resumes by itself.

mod session;

pub use session::delivery as reply_delivery;

use std::sync::Arc;
use std::time::Duration;

use rustomnic_core::Section;
use rustomnic_interface::{Host, Interface, InterfaceProtocol, InterfaceSpec};
use rustomnic_resource_nats::client::{self, NatsUrl};
use rustomnic_resource_nats::wire;

/// The keys of a nats interface (besides protocol, handler and request_timeout; unknown keys
/// are reported by the runtime).
pub const KEYS: &[&str] = &[
    "url",
    "subjects",
    "queue_group",
    "stream",
    "consumer",
    "declare",
    "max_deliver",
    "backoff",
    "ack_wait",
    "dead_letter_subject",
    "max_ack_pending",
    "max_message_size",
];

/// The largest `max_message_size` (the NATS server's own max_payload tops out at 64 MiB).
const MAX_MESSAGE_SIZE_LIMIT: u64 = 64 << 20;

/// The `nats` protocol.
pub struct NatsProtocol;

/// Where messages come from.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    /// Core subscriptions, optionally in a queue group.
    Core { subjects: Vec<String>, queue_group: Option<String> },
    /// A JetStream durable pull consumer.
    JetStream(JetStream),
}

/// The settings of a JetStream consumer.
#[derive(Debug, Clone, PartialEq)]
pub struct JetStream {
    pub stream: String,
    pub consumer: String,
    pub declare: bool,
    /// The stream's subjects, when it is declared.
    pub subjects: Vec<String>,
    pub max_deliver: u32,
    pub backoff: Vec<Duration>,
    pub ack_wait: Duration,
    pub dead_letter_subject: Option<String>,
}

impl JetStream {
    /// The delay before delivery `next` (2 and up): the backoff's entry, the last one repeating.
    pub fn delay_before(&self, next: u32) -> Duration {
        let i = (next.saturating_sub(2) as usize).min(self.backoff.len().saturating_sub(1));
        self.backoff.get(i).copied().unwrap_or(Duration::ZERO)
    }
}

/// A configured nats interface.
pub struct NatsInterface {
    spec: InterfaceSpec,
    pub(crate) url: NatsUrl,
    pub(crate) source: Source,
    pub(crate) max_ack_pending: usize,
    pub(crate) max_message_size: usize,
}

impl InterfaceProtocol for NatsProtocol {
    fn name(&self) -> &'static str {
        "nats"
    }

    fn configure(&self, spec: InterfaceSpec, section: &Section) -> Option<Arc<dyn Interface>> {
        // Every key is read before giving up, so that all problems are listed at once.
        let url = client::read_url(section, "url");
        let jetstream = section.has("stream");
        let subjects = match section.strings("subjects") {
            Some(s) => {
                let mut ok = true;
                for subject in &s.value {
                    if let Err(e) = wire::check_subscribe_subject("subject", subject) {
                        section.error("subjects", e);
                        ok = false;
                    }
                }
                if s.value.is_empty() && !jetstream {
                    section.error("subjects", "names no subject; give at least one, e.g. subjects = [\"orders.*\"]");
                    ok = false;
                }
                ok.then_some(s.value)
            }
            None if section.has("subjects") => None,
            None => Some(Vec::new()),
        };
        let name = |key: &str| -> Option<Option<String>> {
            match section.string(key) {
                Some(v) if v.value.is_empty() || v.value.chars().any(|c| c.is_whitespace() || c.is_control() || matches!(c, '.' | '*' | '>')) => {
                    section.error(key, format!("{:?} is not a usable name (not empty; no spaces, dots, * or >)", v.value));
                    None
                }
                Some(v) => Some(Some(v.value)),
                None if section.has(key) => None,
                None => Some(None),
            }
        };
        let queue_group = name("queue_group");
        let stream = name("stream");
        let consumer = name("consumer");
        let declare = section.bool("declare").map(|v| v.value).unwrap_or(false);
        let max_deliver = section.integer("max_deliver", 1, 1_000_000).map(|v| v.value as u32).unwrap_or(5);
        let backoff = match section.strings("backoff") {
            Some(list) => {
                let mut out = Vec::new();
                let mut ok = true;
                for text in &list.value {
                    match rustomnic_core::parse_duration(text) {
                        Ok(d) if d <= Duration::from_secs(86_400) => out.push(d),
                        Ok(_) => {
                            section.error("backoff", format!("{text} is longer than a day"));
                            ok = false;
                        }
                        Err(e) => {
                            section.error("backoff", format!("{text:?}: {e}"));
                            ok = false;
                        }
                    }
                }
                if list.value.is_empty() {
                    section.error("backoff", "is empty; leave it out for the default [\"1s\", \"5s\", \"30s\"], or write [\"0s\"] to retry at once");
                    ok = false;
                }
                ok.then_some(out)
            }
            None if section.has("backoff") => None,
            None => Some(vec![Duration::from_secs(1), Duration::from_secs(5), Duration::from_secs(30)]),
        };
        let ack_wait = match section.duration("ack_wait", Duration::from_secs(86_400)) {
            Some(a) if a.value <= spec.request_timeout => {
                section.error(
                    "ack_wait",
                    format!(
                        "{} is not longer than request_timeout ({}): the server would deliver a message again while its handler still runs",
                        rustomnic_core::format_duration(a.value),
                        rustomnic_core::format_duration(spec.request_timeout)
                    ),
                );
                None
            }
            Some(a) => Some(a.value),
            None if section.has("ack_wait") => None,
            None => Some(spec.request_timeout + Duration::from_secs(10)),
        };
        let dead_letter_subject = match section.string("dead_letter_subject") {
            Some(s) => match wire::check_publish_subject("dead_letter_subject", &s.value) {
                Ok(()) => Some(Some(s.value)),
                Err(e) => {
                    section.error("dead_letter_subject", e);
                    None
                }
            },
            None if section.has("dead_letter_subject") => None,
            None => Some(None),
        };
        let max_ack_pending = section.integer("max_ack_pending", 1, 65_536).map(|v| v.value as usize).unwrap_or(16);
        let max_message_size = section.size("max_message_size", MAX_MESSAGE_SIZE_LIMIT).map(|v| v.value as usize).unwrap_or(1 << 20);
        let (Some(url), Some(subjects), Some(queue_group), Some(stream), Some(consumer), Some(backoff), Some(ack_wait), Some(dead_letter_subject)) =
            (url, subjects, queue_group, stream, consumer, backoff, ack_wait, dead_letter_subject)
        else {
            return None;
        };
        let source = match stream {
            Some(stream) => {
                let mut ok = true;
                if queue_group.is_some() {
                    section.error("queue_group", "is for core subscriptions; copies of a cage on one JetStream consumer share its messages already");
                    ok = false;
                }
                if declare && subjects.is_empty() {
                    section.error("declare", "creates the stream with `subjects`: give them, e.g. subjects = [\"orders.>\"]");
                    ok = false;
                }
                if !declare && !subjects.is_empty() {
                    section.error("subjects", "are the subjects of the stream created with declare = true; without it the stream is used as it is");
                    ok = false;
                }
                if let Some(dl) = &dead_letter_subject {
                    if declare && subjects.iter().any(|s| subject_matches(s, dl)) {
                        section.error("dead_letter_subject", format!("{dl:?} is one of the stream's own subjects: a dead letter would be consumed again"));
                        ok = false;
                    }
                }
                let Some(consumer) = consumer else {
                    section.table_error("consumer is required with stream: the durable consumer's name, e.g. consumer = \"pmnc-orders\"");
                    return None;
                };
                if !ok {
                    return None;
                }
                Source::JetStream(JetStream { stream, consumer, declare, subjects, max_deliver, backoff, ack_wait, dead_letter_subject })
            }
            None => {
                let mut ok = true;
                for key in ["consumer", "declare", "max_deliver", "backoff", "ack_wait", "dead_letter_subject"] {
                    if section.has(key) {
                        section.error(key, "is for a JetStream consumer: give `stream` too, or leave it out for core subscriptions");
                        ok = false;
                    }
                }
                if subjects.is_empty() {
                    section.table_error(
                        "subjects is required for core subscriptions (or give `stream` and `consumer` for JetStream), e.g. subjects = [\"orders.*\"]",
                    );
                    ok = false;
                }
                if !ok {
                    return None;
                }
                Source::Core { subjects, queue_group }
            }
        };
        Some(Arc::new(NatsInterface { spec, url, source, max_ack_pending, max_message_size }))
    }
}

/// Whether subscription `pattern` matches the concrete `subject`.
pub fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut p = pattern.split('.');
    let mut s = subject.split('.');
    loop {
        match (p.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

impl Interface for NatsInterface {
    fn spec(&self) -> &InterfaceSpec {
        &self.spec
    }

    fn start(self: Arc<Self>, host: Host) {
        let outage = session::Outage::default();
        match &self.source {
            // A JetStream consumer is pulled by every worker on a connection of its own, and each
            // message is handled on the worker that pulled it (decision 156): no thread hands
            // messages to workers and their ends back.
            Source::JetStream(_) => {
                host.spawn_on_each(|worker| {
                    let (me, host, outage) = (self.clone(), host.clone(), outage.clone());
                    Box::new(move || Box::pin(session::run(me, host, Some(worker), outage)))
                });
            }
            Source::Core { .. } => {
                let me = self.clone();
                rustomnic_interface::consumer::spawn(&self.spec, move || session::run(me, host, None, outage));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_delays_follow_the_list_and_the_last_repeats() {
        let js = JetStream {
            stream: "S".into(),
            consumer: "c".into(),
            declare: false,
            subjects: vec![],
            max_deliver: 5,
            backoff: vec![Duration::from_secs(1), Duration::from_secs(5)],
            ack_wait: Duration::from_secs(40),
            dead_letter_subject: None,
        };
        let delays: Vec<u64> = (2..=5).map(|n| js.delay_before(n).as_secs()).collect();
        assert_eq!(delays, vec![1, 5, 5, 5]);
        assert_eq!(js.delay_before(u32::MAX).as_secs(), 5);
    }

    #[test]
    fn subjects_match_wildcards_by_whole_tokens() {
        assert!(subject_matches("orders.*", "orders.new"));
        assert!(!subject_matches("orders.*", "orders.new.eu"));
        assert!(subject_matches("orders.>", "orders.new.eu"));
        assert!(!subject_matches("orders.>", "orders"));
        assert!(subject_matches("a.b", "a.b"));
        assert!(!subject_matches("a.b", "a.c"));
    }
}
