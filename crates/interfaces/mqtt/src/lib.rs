//! The `mqtt` interface: subscribes topic filters on an MQTT broker and runs the handler once per
//! message, acknowledging a QoS 1 message only after its handler succeeded. See
//! docs/interfaces/mqtt.md and docs/decisions/115-119.
//!
//! ```toml
//! [interfaces.orders]
//! protocol = "mqtt"
//! url = "mqtt://127.0.0.1:1883"     # mqtt://[user[:password]@]host[:port]; required
//!                                   # (mqtts:// for TLS, port 8883 by default)
//! ca = "certs/broker-ca.pem"        # mqtts:// only: the broker's CA (default: public CAs)
//! topics = ["orders/#"]             # topic filters; required
//! qos = 1                           # 0 or 1 (QoS 2 is refused: decisions/116)
//! client_id = "pmnc-shop-orders"    # default "pmnc-<cage>-<interface>"
//! clean_start = false               # false: a persistent session (messages wait for us)
//! session_expiry = "7d"             # MQTT 5: how long the broker keeps the session
//! version = 5                       # 5 or 3 (MQTT 3.1.1)
//! keep_alive = "30s"                # at least 5s
//! max_inflight = 16                 # messages handled at once
//! max_message_size = "1MiB"         # bodies over this are refused (counted, dead-lettered)
//! max_attempts = 5                  # handler runs of one message before it is dead-lettered
//! retry_delay = "1s"                # before the 2nd attempt, doubling after each (at most 1m)
//! dead_letter_topic = "orders/dead" # where dead letters are published (default: only logged)
//! handler = "orders.handle"         # default "<interface>.handle"
//! ```
//!
//! Its own thread runs the consumer: one task polls rumqttc's event loop and reconnects with
//! backoff; the consumer loop hands messages to the workers through the `Host`, acknowledges
//! them, retries failed ones in this process (MQTT has no negative acknowledgement) and
//! publishes replies (MQTT 5 `response_topic`) and dead letters on a second connection that
//! waits for the broker's PUBACK before the original message is acknowledged.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rustomnic_core::metrics::MessageCounts;
use rustomnic_core::{Section, Value};
use rustomnic_interface::{Host, Interface, InterfaceProtocol, InterfaceSpec, Request};
use rustomnic_resource_mqtt::client::{
    check_filter, check_topic, new_client, Client, ConnectOptions, Endpoint, Event, EventLoop, Incoming, Outgoing, Properties, Tls, Version,
};
use rustomnic_resource_mqtt::lua::properties_to_value;
use rustomnic_resource_mqtt::publisher::Publisher;
use tokio::sync::{mpsc, oneshot};

/// Room for the topic and properties of a message beyond its body, in the packet size we accept.
const PACKET_OVERHEAD: usize = 64 << 10;
/// The longest wait between two reconnects.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// The longest wait between two attempts at one message.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(60);
/// Handlers that succeeded after their connection was lost, remembered (by packet id and
/// content) so that the broker's redelivery is acknowledged without running them again.
const MAX_SETTLED_UNACKED: usize = 10_000;

/// The `mqtt` interface protocol.
pub struct MqttProtocol;

/// What `[interfaces.X]` says.
#[derive(Debug, Clone)]
pub struct Config {
    pub endpoint: Endpoint,
    pub tls: Option<Tls>,
    pub version: Version,
    pub client_id: String,
    pub clean_start: bool,
    pub session_expiry: u32,
    pub topics: Vec<String>,
    pub qos: u8,
    pub keep_alive: Duration,
    pub max_inflight: usize,
    pub max_message_size: usize,
    pub max_attempts: u32,
    pub retry_delay: Duration,
    pub dead_letter_topic: Option<String>,
}

impl InterfaceProtocol for MqttProtocol {
    fn name(&self) -> &'static str {
        "mqtt"
    }

    fn configure(&self, spec: InterfaceSpec, section: &Section) -> Option<Arc<dyn Interface>> {
        // Every key is read before giving up, so that all problems are listed at once.
        let endpoint = rustomnic_resource_mqtt::read_url(section);
        let tls = rustomnic_resource_mqtt::read_tls(section, endpoint.as_ref());
        let version = rustomnic_resource_mqtt::read_version(section);
        let keep_alive = rustomnic_resource_mqtt::read_keep_alive(section);
        let max_message_size = rustomnic_resource_mqtt::read_max_message_size(section);
        let client_id = match section.string("client_id") {
            Some(c) => match rustomnic_resource_mqtt::check_client_id(&c.value) {
                Ok(()) => Some(c.value),
                Err(e) => {
                    section.error("client_id", e);
                    None
                }
            },
            None if section.has("client_id") => None,
            None => Some(format!("pmnc-{}-{}", spec.cage, spec.name)),
        };
        let clean_start = match section.bool("clean_start") {
            Some(b) => Some(b.value),
            None if section.has("clean_start") => None,
            None => Some(false),
        };
        let session_expiry = match section.duration("session_expiry", Duration::from_secs(u32::MAX as u64)) {
            Some(d) => Some(d.value.as_secs().max(1) as u32),
            None if section.has("session_expiry") => None,
            None => Some(7 * 86_400),
        };
        let topics = section.required_list("topics", "[\"orders/#\"]", "needs at least one topic filter, e.g. topics = [\"orders/#\"]", check_filter);
        let qos = match section.integer("qos", 0, 2) {
            Some(q) if q.value == 2 => {
                section.error(
                    "qos",
                    "2 is not supported for subscriptions: messages are acknowledged after their handler succeeded, which makes qos = 1 deliver at least once as QoS 2 would here (a QoS 2 publish arrives at QoS 1); see docs/decisions/116",
                );
                None
            }
            Some(q) => Some(q.value as u8),
            None if section.has("qos") => None,
            None => Some(1),
        };
        let max_inflight = match section.integer("max_inflight", 1, 65_535) {
            Some(n) => Some(n.value as usize),
            None if section.has("max_inflight") => None,
            None => Some(16),
        };
        let max_attempts = match section.integer("max_attempts", 1, 1_000_000) {
            Some(n) => Some(n.value as u32),
            None if section.has("max_attempts") => None,
            None => Some(5),
        };
        let retry_delay = match section.duration("retry_delay", MAX_RETRY_DELAY) {
            Some(d) => Some(d.value),
            None if section.has("retry_delay") => None,
            None => Some(Duration::from_secs(1)),
        };
        let dead_letter_topic = match section.string("dead_letter_topic") {
            Some(t) => match check_topic(&t.value) {
                Ok(()) => Some(Some(t.value)),
                Err(e) => {
                    section.error("dead_letter_topic", e);
                    None
                }
            },
            None if section.has("dead_letter_topic") => None,
            None => Some(None),
        };
        let config = Config {
            endpoint: endpoint?,
            tls: tls?,
            version: version?,
            client_id: client_id?,
            clean_start: clean_start?,
            session_expiry: session_expiry?,
            topics: topics?,
            qos: qos?,
            keep_alive: keep_alive?,
            max_inflight: max_inflight?,
            max_message_size: max_message_size?,
            max_attempts: max_attempts?,
            retry_delay: retry_delay?,
            dead_letter_topic: dead_letter_topic?,
        };
        Some(Arc::new(MqttInterface { spec, config: Arc::new(config) }))
    }
}

/// A configured `mqtt` interface of a cage.
pub struct MqttInterface {
    spec: InterfaceSpec,
    config: Arc<Config>,
}

impl Interface for MqttInterface {
    fn spec(&self) -> &InterfaceSpec {
        &self.spec
    }

    fn start(self: Arc<Self>, host: Host) {
        let config = self.config.clone();
        rustomnic_interface::consumer::spawn(&self.spec, move || Consumer::new(host, config).run());
    }
}

/// What the poller task reports to the consumer loop.
enum FromLoop {
    Event(Event),
    /// The connection is lost. The poller waits for `resume` (sent once the consumer has stopped
    /// acknowledging on the old connection) before it reconnects.
    Down {
        error: String,
        resume: oneshot::Sender<()>,
    },
}

/// Polls the event loop, reconnecting with backoff after a loss.
async fn poller(mut eventloop: EventLoop, tx: mpsc::Sender<FromLoop>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match eventloop.poll().await {
            Ok(ev) => {
                if matches!(ev, Event::Connected { .. }) {
                    backoff = Duration::from_millis(100);
                }
                if tx.send(FromLoop::Event(ev)).await.is_err() {
                    return;
                }
            }
            Err(error) => {
                let (resume, resumed) = oneshot::channel();
                if tx.send(FromLoop::Down { error, resume }).await.is_err() || resumed.await.is_err() {
                    return;
                }
                eventloop.forget_acks();
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// A message the broker may send again (packet id and a hash of topic and body), or a QoS 0
/// message (packet id 0 and a sequence number).
type Key = (u16, u64);

struct Entry {
    message: Incoming,
    /// None for QoS 0.
    key: Option<Key>,
    session: u64,
    /// The connection it arrived on (or was delivered again on).
    generation: u64,
    /// Handler runs that failed so far.
    failures: u32,
    last_error: String,
}

enum Outcome {
    /// The handler (and its reply, if any) ended.
    Handled { id: u64, result: Result<(), String> },
    /// The dead letter (or refused message) was published to `dead_letter_topic`, or not.
    DeadLettered { id: u64, result: Result<(), String> },
}

/// The connection replies and dead letters go out on, made when first needed and again after it
/// broke.
type Out = Arc<tokio::sync::Mutex<Option<Publisher>>>;

struct Consumer {
    host: Host,
    config: Arc<Config>,
    cage: String,
    name: String,
    counts: Arc<MessageCounts>,
    client: Option<Client>,
    out: Out,
    /// Messages being handled, by a number of their own.
    entries: HashMap<u64, Entry>,
    /// The entry of each QoS 1 message of the current session, to recognise its redelivery.
    by_key: HashMap<Key, u64>,
    ready: VecDeque<u64>,
    retries: Vec<(Instant, u64)>,
    running: usize,
    generation: u64,
    /// Counts new sessions: a message of an older one is no longer the broker's to send again.
    session: u64,
    connected: bool,
    subscribed: bool,
    down_since: Option<Instant>,
    settled_unacked: HashSet<Key>,
    /// Acknowledgements not yet handed to the event loop (its channel was full).
    acks_waiting: Vec<(Incoming, Key)>,
    /// Acknowledgements handed to the event loop and not yet written, by packet id.
    acks_unwritten: HashMap<u16, Key>,
    sequence: u64,
    overflow_said: bool,
    done_tx: mpsc::UnboundedSender<Outcome>,
    done_rx: mpsc::UnboundedReceiver<Outcome>,
}

fn content_hash(m: &Incoming) -> u64 {
    let mut h = DefaultHasher::new();
    m.topic.hash(&mut h);
    m.payload.hash(&mut h);
    h.finish()
}

fn topic_text(m: &Incoming) -> String {
    String::from_utf8_lossy(&m.topic).into_owned()
}

/// The `message` table the handler gets.
pub fn message_value(m: &Incoming, attempt: u32) -> Value {
    let mut fields = vec![
        (Value::str("body"), Value::Str(m.payload.to_vec())),
        (Value::str("topic"), Value::Str(m.topic.to_vec())),
        (Value::str("qos"), Value::Int(m.qos as i64)),
        (Value::str("retain"), Value::Bool(m.retain)),
        (Value::str("duplicate"), Value::Bool(m.dup)),
        (Value::str("attempt"), Value::Int(attempt as i64)),
    ];
    if let Some(p) = &m.properties {
        fields.push((Value::str("properties"), properties_to_value(p)));
    }
    Value::Map(fields)
}

/// The handler's first result as the body of a reply: a string as it is, nil as nothing, any
/// other value as JSON.
pub fn reply_body(values: &[Value]) -> Result<Bytes, String> {
    match values.first() {
        None | Some(Value::Nil) => Ok(Bytes::new()),
        Some(Value::Str(s)) => Ok(Bytes::from(s.clone())),
        Some(other) => {
            let json = other.to_json().map_err(|e| format!("the handler's result cannot be sent as JSON: {e}"))?;
            Ok(Bytes::from(json.to_string().into_bytes()))
        }
    }
}

/// Publishes `message` on the interface's second connection, connecting it when needed.
async fn publish_out(out: &Out, config: &Config, message: Outgoing) -> Result<(), String> {
    let mut slot = out.lock().await;
    if !slot.as_mut().is_some_and(|p| p.is_healthy()) {
        let options = ConnectOptions {
            endpoint: config.endpoint.clone(),
            version: config.version,
            client_id: format!("{}-out", config.client_id),
            clean_start: true,
            keep_alive: config.keep_alive,
            session_expiry: None,
            receive_maximum: None,
            max_packet_size: 64 << 10,
            manual_acks: false,
            connect_timeout: Duration::from_secs(10),
            channel_capacity: 16,
            tls: config.tls.clone(),
        };
        *slot = Some(Publisher::connect(&options, Duration::from_secs(10)).await?);
    }
    let Some(p) = slot.as_mut() else { return Err("no connection".to_string()) };
    tokio::time::timeout(Duration::from_secs(30), p.publish_all(std::slice::from_ref(&message)))
        .await
        .map_err(|_| "the broker did not confirm within 30s".to_string())?
        .map_err(|e| e.message)
}

impl Consumer {
    fn new(host: Host, config: Arc<Config>) -> Consumer {
        let spec = host.spec();
        let (cage, name) = (spec.cage.clone(), spec.name.clone());
        let counts = rustomnic_core::metrics::message_counts(&cage, &name);
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        Consumer {
            host,
            config,
            cage,
            name,
            counts,
            client: None,
            out: Arc::new(tokio::sync::Mutex::new(None)),
            entries: HashMap::new(),
            by_key: HashMap::new(),
            ready: VecDeque::new(),
            retries: Vec::new(),
            running: 0,
            generation: 0,
            session: 0,
            connected: false,
            subscribed: false,
            down_since: None,
            settled_unacked: HashSet::new(),
            acks_waiting: Vec::new(),
            acks_unwritten: HashMap::new(),
            sequence: 0,
            overflow_said: false,
            done_tx,
            done_rx,
        }
    }

    async fn run(mut self) {
        let c = &self.config;
        let options = ConnectOptions {
            endpoint: c.endpoint.clone(),
            version: c.version,
            client_id: c.client_id.clone(),
            clean_start: c.clean_start,
            keep_alive: c.keep_alive,
            session_expiry: Some(c.session_expiry),
            receive_maximum: Some(c.max_inflight.min(65_535) as u16),
            max_packet_size: (c.max_message_size + PACKET_OVERHEAD).min(u32::MAX as usize) as u32,
            manual_acks: true,
            connect_timeout: Duration::from_secs(10),
            channel_capacity: c.max_inflight + 1024,
            tls: c.tls.clone(),
        };
        let (client, eventloop) = new_client(&options);
        self.client = Some(client);
        let (tx, mut rx) = mpsc::channel(256);
        let poll_task = tokio::spawn(poller(eventloop, tx));
        let mut shutdown = self.host.shutdown();
        tracing::info!(cage = %self.cage, interface = %self.name, "connecting to {} as {:?}, topics {:?}", c.endpoint.shown(), c.client_id, c.topics);
        loop {
            let next_retry = self.retries.iter().map(|(at, _)| *at).min();
            tokio::select! {
                _ = shutdown.changed() => break,
                Some(outcome) = self.done_rx.recv() => self.finished(outcome),
                from = rx.recv() => match from {
                    Some(FromLoop::Event(ev)) => self.event(ev).await,
                    Some(FromLoop::Down { error, resume }) => {
                        self.down(&error);
                        let _ = resume.send(());
                    }
                    None => break,
                },
                _ = sleep_until(next_retry) => self.due_retries(),
            }
            self.flush_acks();
            self.start_ready();
        }
        self.stop(&mut rx).await;
        poll_task.abort();
    }

    /// Stops taking messages, lets the handlers in flight end (and acknowledges those that
    /// succeeded), then disconnects. Messages not handled stay with the broker.
    async fn stop(&mut self, rx: &mut mpsc::Receiver<FromLoop>) {
        self.ready.clear();
        self.retries.clear();
        let limit = Instant::now() + self.host.spec().request_timeout + Duration::from_secs(2);
        if self.running > 0 {
            tracing::info!(cage = %self.cage, interface = %self.name, "stopping: {} message(s) in flight", self.running);
        }
        let mut left = self.entries.len().saturating_sub(self.running);
        while self.running > 0 {
            tokio::select! {
                Some(outcome) = self.done_rx.recv() => match outcome {
                    // A failed one stays with the broker, which sends it again at the next start.
                    Outcome::Handled { id, result } => {
                        self.running = self.running.saturating_sub(1);
                        if result.is_ok() {
                            self.settle(id);
                        } else {
                            left += 1;
                        }
                    }
                    Outcome::DeadLettered { id, result: Ok(()) } => self.settle(id),
                    Outcome::DeadLettered { .. } => {}
                },
                from = rx.recv() => match from {
                    // No reconnect while stopping: when this interface is being replaced, the new
                    // one may have taken the session (same client id), and taking it back would
                    // make the two throw each other off until this one is gone. What is still
                    // running is acknowledged by nobody, and comes back from the broker.
                    Some(FromLoop::Down { error, .. }) => {
                        self.down(&error);
                        break;
                    }
                    Some(FromLoop::Event(Event::AckSent(pkid))) => self.ack_written(pkid),
                    Some(FromLoop::Event(_)) => {}
                    None => break,
                },
                _ = tokio::time::sleep_until(limit.into()) => break,
            }
            self.flush_acks();
        }
        left += self.running;
        if left > 0 {
            tracing::info!(cage = %self.cage, interface = %self.name, "{left} message(s) not done stay with the broker, which sends them again");
        }
        if self.connected {
            if let Some(client) = &self.client {
                client.try_disconnect();
            }
            // The DISCONNECT goes out after the acknowledgements queued before it; the poller
            // reports the closed connection when it is done.
            let until = Instant::now() + Duration::from_secs(2);
            while let Ok(Some(from)) = tokio::time::timeout_at(until.into(), rx.recv()).await {
                match from {
                    FromLoop::Down { .. } => break,
                    FromLoop::Event(Event::AckSent(pkid)) => self.ack_written(pkid),
                    FromLoop::Event(_) => {}
                }
            }
        }
        if let Some(p) = self.out.lock().await.take() {
            p.disconnect();
        }
        tracing::info!(cage = %self.cage, interface = %self.name, "stopped");
    }

    async fn event(&mut self, ev: Event) {
        match ev {
            Event::Connected { session_present } => {
                self.connected = true;
                match self.down_since.take() {
                    Some(since) => tracing::info!(
                        cage = %self.cage, interface = %self.name,
                        "reconnected to {} after {:.1}s (session {})",
                        self.config.endpoint.shown(), since.elapsed().as_secs_f64(), if session_present { "kept" } else { "new" }
                    ),
                    None => tracing::info!(
                        cage = %self.cage, interface = %self.name,
                        "connected to {} (session {})", self.config.endpoint.shown(), if session_present { "kept" } else { "new" }
                    ),
                }
                if !session_present {
                    // Nothing of the old session will come back, and its packet ids mean
                    // nothing now.
                    self.session += 1;
                    self.settled_unacked.clear();
                    self.by_key.clear();
                }
                // A kept session keeps its subscriptions; the first connect of this interface
                // subscribes anyway, since cage.toml may have changed the filters.
                if !self.subscribed || !session_present {
                    let filters: Vec<(String, u8)> = self.config.topics.iter().map(|t| (t.clone(), self.config.qos)).collect();
                    if let Some(client) = &self.client {
                        if let Err(e) = client.subscribe(&filters, true).await {
                            tracing::error!(cage = %self.cage, interface = %self.name, "cannot subscribe: {e}");
                        }
                    }
                    self.subscribed = true;
                }
            }
            Event::SubAck { granted } => {
                for (topic, g) in self.config.topics.iter().zip(granted) {
                    match g {
                        None => tracing::error!(cage = %self.cage, interface = %self.name, "the broker refused the subscription to {topic:?}"),
                        Some(q) if q < self.config.qos => {
                            tracing::warn!(cage = %self.cage, interface = %self.name, "the broker granted {topic:?} QoS {q} only (asked {})", self.config.qos)
                        }
                        Some(_) => {}
                    }
                }
            }
            Event::Message(m) => self.received(m),
            Event::AckSent(pkid) => self.ack_written(pkid),
            _ => {}
        }
    }

    fn down(&mut self, error: &str) {
        self.generation += 1;
        // Acknowledgements that never reached the connection (the event loop drops those still
        // queued) are of messages the broker sends again: their redelivery is acknowledged at
        // once. One that was written may have arrived; its message may run again, but an
        // acknowledgement is never sent twice.
        let unsent: Vec<Key> = self.acks_waiting.drain(..).map(|(_, k)| k).chain(self.acks_unwritten.drain().map(|(_, k)| k)).collect();
        for key in unsent {
            self.remember_settled(key);
        }
        if self.down_since.is_none() {
            self.down_since = Some(Instant::now());
            if self.connected {
                tracing::warn!(cage = %self.cage, interface = %self.name, "lost the connection to {}: {error}; reconnecting with backoff", self.config.endpoint.shown());
            } else {
                tracing::warn!(cage = %self.cage, interface = %self.name, "cannot connect to {}: {error}; retrying with backoff", self.config.endpoint.shown());
            }
        } else {
            tracing::debug!(cage = %self.cage, interface = %self.name, "still no connection: {error}");
        }
        self.connected = false;
    }

    fn received(&mut self, m: Incoming) {
        self.counts.received.fetch_add(1, Ordering::Relaxed);
        if m.dup {
            self.counts.redelivered.fetch_add(1, Ordering::Relaxed);
        }
        let key = (m.qos > 0).then(|| (m.pkid, content_hash(&m)));
        if let Some(key) = key {
            if self.settled_unacked.remove(&key) {
                // Its handler already succeeded; only the acknowledgement was lost.
                self.ack(m, key);
                return;
            }
            if let Some(entry) = self.by_key.get(&key).and_then(|id| self.entries.get_mut(id)) {
                // Sent again after a reconnect while still being handled here: the run under way
                // acknowledges it on this connection.
                entry.generation = self.generation;
                entry.message.dup = true;
                return;
            }
        }
        self.sequence += 1;
        let id = self.sequence;
        if let Some(key) = key {
            self.by_key.insert(key, id);
        }
        let oversize = m.payload.len() > self.config.max_message_size;
        let bad_reply = m.properties.as_ref().and_then(|p| p.response_topic.as_ref()).and_then(|t| check_topic(t).err());
        let overflow = m.qos == 0 && self.ready.len() >= (10 * self.config.max_inflight).max(1000);
        let entry = Entry { message: m, key, session: self.session, generation: self.generation, failures: 0, last_error: String::new() };
        if oversize || bad_reply.is_some() || overflow {
            self.counts.refused.fetch_add(1, Ordering::Relaxed);
            let topic = topic_text(&entry.message);
            let why = if oversize {
                format!("its body is {} bytes, over max_message_size ({} bytes)", entry.message.payload.len(), self.config.max_message_size)
            } else if let Some(e) = bad_reply {
                format!("its response_topic cannot be published to: {e}")
            } else {
                "too many QoS 0 messages are waiting for a handler".to_string()
            };
            if !overflow || !self.overflow_said {
                tracing::warn!(cage = %self.cage, interface = %self.name, "message on {topic:?} refused: {why}");
            }
            self.overflow_said |= overflow;
            self.entries.insert(id, Entry { last_error: why, ..entry });
            self.dead_letter(id, true);
            return;
        }
        self.entries.insert(id, entry);
        self.ready.push_back(id);
    }

    fn start_ready(&mut self) {
        while self.running < self.config.max_inflight {
            let Some(id) = self.ready.pop_front() else {
                self.overflow_said = false;
                return;
            };
            let Some(entry) = self.entries.get(&id) else { continue };
            self.running += 1;
            let value = message_value(&entry.message, entry.failures + 1);
            let reply = entry.message.properties.as_ref().and_then(|p| p.response_topic.clone().map(|t| (t, p.correlation_data.clone())));
            let request = Request {
                handler: self.host.spec().handler.value.clone(),
                args: vec![value],
                deadline: Instant::now() + self.host.spec().request_timeout,
                parameters: None,
            };
            let run = self.host.run(request);
            let (done, out, config) = (self.done_tx.clone(), self.out.clone(), self.config.clone());
            tokio::spawn(async move {
                let result = match run.await {
                    Ok(values) => match reply {
                        Some((topic, correlation)) => match reply_body(&values) {
                            Ok(body) => {
                                let properties = Properties { correlation_data: correlation, ..Properties::default() };
                                let message = Outgoing { topic: topic.clone(), payload: body, qos: 1, retain: false, properties };
                                publish_out(&out, &config, message).await.map_err(|e| format!("the reply to {topic:?} was not published: {e}"))
                            }
                            Err(e) => Err(e),
                        },
                        None => Ok(()),
                    },
                    Err(e) => Err(e.to_string()),
                };
                let _ = done.send(Outcome::Handled { id, result });
            });
        }
    }

    fn finished(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::Handled { id, result } => {
                self.running = self.running.saturating_sub(1);
                match result {
                    Ok(()) => self.settle(id),
                    Err(e) => self.failed(id, e),
                }
            }
            Outcome::DeadLettered { id, result: Ok(()) } => self.settle(id),
            Outcome::DeadLettered { id, result: Err(e) } => {
                let Some(entry) = self.entries.get(&id) else { return };
                tracing::error!(
                    cage = %self.cage, interface = %self.name,
                    "cannot publish the dead letter of a message on {:?} to {:?}: {e}; trying again (the message stays unacknowledged)",
                    topic_text(&entry.message), self.config.dead_letter_topic.as_deref().unwrap_or("")
                );
                let delay = self.config.retry_delay.min(MAX_RETRY_DELAY);
                self.retries.push((Instant::now() + delay, id));
            }
        }
    }

    fn failed(&mut self, id: u64, error: String) {
        let Some(entry) = self.entries.get_mut(&id) else { return };
        entry.failures += 1;
        entry.last_error = error;
        let topic = topic_text(&entry.message);
        let failures = entry.failures;
        if failures < self.config.max_attempts {
            self.counts.retried.fetch_add(1, Ordering::Relaxed);
            let delay = self.config.retry_delay.saturating_mul(1 << (failures - 1).min(16)).min(MAX_RETRY_DELAY);
            tracing::warn!(
                cage = %self.cage, interface = %self.name,
                "message on {topic:?} failed (attempt {failures} of {}): {}; trying again in {delay:?}",
                self.config.max_attempts, entry.last_error
            );
            self.retries.push((Instant::now() + delay, id));
        } else {
            self.counts.dead_lettered.fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                cage = %self.cage, interface = %self.name,
                "message on {topic:?} dead-lettered after {failures} attempt(s): {}{}",
                entry.last_error,
                self.config.dead_letter_topic.as_ref().map(|t| format!(" (published to {t:?})")).unwrap_or_default()
            );
            self.dead_letter(id, false);
        }
    }

    /// Publishes the message to `dead_letter_topic` (when set), then acknowledges it.
    fn dead_letter(&mut self, id: u64, refused: bool) {
        let Some(topic) = self.config.dead_letter_topic.clone() else {
            self.settle(id);
            return;
        };
        let Some(entry) = self.entries.get(&id) else { return };
        let m = &entry.message;
        let mut properties = Properties::default();
        if self.config.version == Version::V5 {
            properties = m.properties.clone().unwrap_or_default();
            properties.response_topic = None;
            properties.user.push(("pmnc-error".to_string(), entry.last_error.clone()));
            properties.user.push(("pmnc-topic".to_string(), topic_text(m)));
            properties.user.push(("pmnc-attempts".to_string(), if refused { "0".to_string() } else { entry.failures.to_string() }));
        }
        let message = Outgoing { topic, payload: m.payload.clone(), qos: 1, retain: false, properties };
        let (done, out, config) = (self.done_tx.clone(), self.out.clone(), self.config.clone());
        tokio::spawn(async move {
            let result = publish_out(&out, &config, message).await;
            let _ = done.send(Outcome::DeadLettered { id, result });
        });
    }

    fn due_retries(&mut self) {
        let now = Instant::now();
        let (due, later): (Vec<_>, Vec<_>) = self.retries.drain(..).partition(|(at, _)| *at <= now);
        self.retries = later;
        for (_, id) in due {
            let Some(entry) = self.entries.get(&id) else { continue };
            if entry.failures >= self.config.max_attempts {
                // A dead letter whose publish failed: try it again.
                self.dead_letter(id, false);
            } else {
                self.ready.push_back(id);
            }
        }
    }

    /// Done with a message: acknowledged on the connection it (last) arrived on, or, when that
    /// connection is gone, remembered so that its redelivery is acknowledged at once. A message
    /// of a session the broker no longer has is not acknowledged at all.
    fn settle(&mut self, id: u64) {
        let Some(entry) = self.entries.remove(&id) else { return };
        let Some(key) = entry.key else { return };
        if self.by_key.get(&key) == Some(&id) {
            self.by_key.remove(&key);
        }
        if entry.session != self.session {
            return;
        }
        if entry.generation == self.generation && self.connected {
            self.ack(entry.message, key);
        } else {
            self.remember_settled(key);
        }
    }

    fn ack_written(&mut self, pkid: u16) {
        if self.acks_unwritten.remove(&pkid).is_some() {
            self.counts.acked.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn remember_settled(&mut self, key: Key) {
        if self.settled_unacked.len() >= MAX_SETTLED_UNACKED {
            self.settled_unacked.clear();
        }
        self.settled_unacked.insert(key);
    }

    fn ack(&mut self, m: Incoming, key: Key) {
        self.acks_waiting.push((m, key));
        self.flush_acks();
    }

    /// Hands waiting acknowledgements to the event loop (its channel may be full for a moment).
    fn flush_acks(&mut self) {
        let Some(client) = &self.client else { return };
        let mut handed = 0;
        for (m, key) in &self.acks_waiting {
            if client.try_ack(m).is_err() {
                break;
            }
            self.acks_unwritten.insert(m.pkid, *key);
            handed += 1;
        }
        self.acks_waiting.drain(..handed);
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_table() {
        let m = Incoming {
            topic: Bytes::from_static(b"orders/1"),
            payload: Bytes::from_static(b"{\"id\":1}"),
            qos: 1,
            retain: false,
            dup: true,
            pkid: 7,
            properties: Some(Properties { user: vec![("k".into(), "v".into())], correlation_data: Some(Bytes::from_static(b"c1")), ..Properties::default() }),
        };
        let v = message_value(&m, 2);
        assert_eq!(v.get("body"), Some(&Value::str("{\"id\":1}")));
        assert_eq!(v.get("topic"), Some(&Value::str("orders/1")));
        assert_eq!(v.get("qos"), Some(&Value::Int(1)));
        assert_eq!(v.get("duplicate"), Some(&Value::Bool(true)));
        assert_eq!(v.get("attempt"), Some(&Value::Int(2)));
        let p = v.get("properties").unwrap();
        assert_eq!(p.get("user").and_then(|u| u.get("k")), Some(&Value::str("v")));
        assert_eq!(p.get("correlation_data"), Some(&Value::str("c1")));
    }

    #[test]
    fn reply_bodies() {
        assert_eq!(reply_body(&[]).unwrap(), Bytes::new());
        assert_eq!(reply_body(&[Value::str("ok")]).unwrap(), Bytes::from_static(b"ok"));
        assert_eq!(reply_body(&[Value::Map(vec![(Value::str("a"), Value::Int(1))])]).unwrap(), Bytes::from_static(b"{\"a\":1}"));
        assert_eq!(reply_body(&[Value::Str(vec![0xff])]).unwrap(), Bytes::from_static(&[0xff]), "bytes go as they are");
        assert!(reply_body(&[Value::Float(f64::NAN)]).is_err());
    }
}
