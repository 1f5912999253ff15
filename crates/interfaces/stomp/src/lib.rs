//! The `stomp` interface: every message of STOMP 1.2 subscriptions (RabbitMQ's STOMP plugin) is
//! a request to the handler, and is acknowledged (ACK) only after the handler returned and its
//! transactions committed. See docs/interfaces/stomp.md and docs/decisions/125-129.
//!
//! ```toml
//! [interfaces.orders]
//! protocol = "stomp"
//! url = "stomp://guest:guest@127.0.0.1:61613/"   # required; stomp:// only
//! destinations = ["/queue/orders"]     # required: queues /queue/x or topics /topic/x
//! prefetch = 16                        # messages handled at once (RabbitMQ's prefetch-count)
//! max_attempts = 5                     # attempts before a message is dead-lettered
//! retry_delay = "1s"                   # wait before a failed message is NACKed (redelivered),
//!                                      # doubled for each next attempt, at most a minute
//! dead_letter = "/queue/orders.dead"   # where messages go after their last attempt
//! max_message_size = "16MiB"           # bigger bodies are refused (skipped unread)
//! heart_beat = "10s"                   # heart-beats both ways; "0s" for none
//! handler = "orders.handle"            # default "<interface>.handle"
//! request_timeout = "30s"              # deadline of one attempt
//! ```
//!
//! The handler is `function M.handle(message)`: `message.body` (a string), `.destination`,
//! `.headers` (every header of the MESSAGE frame but `ack` and `content-length`),
//! `.message_id`, `.redelivered` and `.attempt` (from 1).
//!
//! A failed attempt waits `retry_delay` and is NACKed, so the broker delivers it again; the
//! attempts are counted in this process (decision 127). After `max_attempts` the message is sent
//! to `dead_letter` with the error in the header `x-pmnc-error` (awaiting the broker's receipt)
//! and then ACKed; without `dead_letter` it is NACKed with `requeue:false` (dropped, or
//! dead-lettered by the queue's own policy). A lost broker is reconnected with backoff (said
//! once per outage in the log), and consumption resumes by itself.

mod session;

use std::sync::Arc;
use std::time::Duration;

use rustomnic_core::Section;
use rustomnic_interface::{Host, Interface, InterfaceProtocol, InterfaceSpec};
use rustomnic_resource_stomp::client::{self, StompUrl};

/// The keys of a stomp interface (besides protocol, handler and request_timeout; unknown keys
/// are reported by the runtime).
pub const KEYS: &[&str] = &["url", "destinations", "prefetch", "max_attempts", "retry_delay", "dead_letter", "max_message_size", "heart_beat"];

/// The largest `max_message_size`.
const MAX_MESSAGE_SIZE_LIMIT: u64 = 512 << 20;
/// The most a retry delay grows to.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(60);

/// The `stomp` protocol.
pub struct StompProtocol;

/// A configured stomp interface.
pub struct StompInterface {
    spec: InterfaceSpec,
    pub(crate) url: StompUrl,
    pub(crate) destinations: Vec<String>,
    pub(crate) prefetch: u32,
    pub(crate) max_attempts: u32,
    pub(crate) retry_delay: Duration,
    pub(crate) dead_letter: Option<String>,
    pub(crate) max_message_size: usize,
    pub(crate) heart_beat: Duration,
}

impl InterfaceProtocol for StompProtocol {
    fn name(&self) -> &'static str {
        "stomp"
    }

    fn configure(&self, spec: InterfaceSpec, section: &Section) -> Option<Arc<dyn Interface>> {
        // Every key is read before giving up, so that all problems are listed at once.
        let url = client::read_url(section, "url");
        let destinations = section.required_list(
            "destinations",
            "[\"/queue/orders\"]",
            "names no destination; give at least one, e.g. destinations = [\"/queue/orders\"]",
            client::check_destination,
        );
        let dead_letter = match section.string("dead_letter") {
            Some(d) => match client::check_destination(&d.value) {
                Ok(()) if destinations.as_ref().is_some_and(|ds| ds.contains(&d.value)) => {
                    section.error("dead_letter", format!("{:?} is also consumed: dead letters would come back as messages", d.value));
                    None
                }
                Ok(()) => Some(Some(d.value)),
                Err(e) => {
                    section.error("dead_letter", e);
                    None
                }
            },
            None if section.has("dead_letter") => None,
            None => Some(None),
        };
        let prefetch = section.integer("prefetch", 1, 65_535).map(|v| v.value as u32).unwrap_or(16);
        let max_attempts = section.integer("max_attempts", 1, 1_000_000).map(|v| v.value as u32).unwrap_or(5);
        let retry_delay = section.duration("retry_delay", Duration::from_secs(3600)).map(|v| v.value).unwrap_or(Duration::from_secs(1));
        let max_message_size = section.size("max_message_size", MAX_MESSAGE_SIZE_LIMIT).map(|v| v.value as usize).unwrap_or(16 << 20);
        let heart_beat = section.duration("heart_beat", Duration::from_secs(3600)).map(|v| v.value).unwrap_or(Duration::from_secs(10));
        let (Some(url), Some(destinations), Some(dead_letter)) = (url, destinations, dead_letter) else { return None };
        Some(Arc::new(StompInterface { spec, url, destinations, prefetch, max_attempts, retry_delay, dead_letter, max_message_size, heart_beat }))
    }
}

impl StompInterface {
    /// The wait after failed attempt `attempt` (1 and up): `retry_delay` doubled for every
    /// attempt after the first, at most [`MAX_RETRY_DELAY`].
    pub fn retry_delay(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(31);
        self.retry_delay.saturating_mul(1u32 << doublings).min(MAX_RETRY_DELAY.max(self.retry_delay))
    }
}

impl Interface for StompInterface {
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
    fn retry_delays_double_up_to_a_minute() {
        let s = StompInterface {
            spec: InterfaceSpec {
                cage: "c".into(),
                name: "in".into(),
                protocol: "stomp".into(),
                handler: rustomnic_core::Located { value: ("in".into(), "handle".into()), file: "cage.toml".into(), line: 1, key: "handler".into() },
                request_timeout: Duration::from_secs(1),
                state_file: "x".into(),
                fingerprint: String::new(),
            },
            url: client::parse_url("stomp://h/").unwrap(),
            destinations: vec!["/queue/q".into()],
            prefetch: 16,
            max_attempts: 5,
            retry_delay: Duration::from_secs(10),
            dead_letter: None,
            max_message_size: 1,
            heart_beat: Duration::ZERO,
        };
        let delays: Vec<u64> = (1..=5).map(|n| s.retry_delay(n).as_secs()).collect();
        assert_eq!(delays, vec![10, 20, 40, 60, 60]);
        assert_eq!(s.retry_delay(u32::MAX).as_secs(), 60);
    }
}
