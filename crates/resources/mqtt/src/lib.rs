//! The `mqtt` resource: `xa.<name>.publish(topic, body, options)` inside a transaction. The
//! message is kept until the transaction commits; the commit publishes it and returns once the
//! broker confirmed it (PUBACK for QoS 1, PUBCOMP for QoS 2); a rollback sends nothing. See
//! docs/resources/mqtt.md and docs/decisions/117.
//!
//! ```toml
//! [resources.mq]
//! protocol = "mqtt"
//! url = "mqtt://app:${MQTT_PASSWORD}@127.0.0.1:1883"   # mqtt://[user[:password]@]host[:port]
//!                               # mqtts:// for TLS (port 8883 by default)
//! ca = "certs/broker-ca.pem"    # mqtts:// only: the CA of the broker's certificate (default: public CAs)
//! version = 5                   # 5 (default) or 3 (MQTT 3.1.1)
//! client_id = "pmnc-mq"         # prefix of each connection's client id (default "pmnc-<resource>")
//! keep_alive = "30s"            # at least 5s
//! qos = 1                       # default QoS of publish: 0, 1 or 2
//! max_message_size = "1MiB"     # bodies over this are refused at the call
//! ```
//!
//! The pool keys (`pool_size`, `connect_timeout`, `breaker_*`, ...) are the runtime's; every
//! pooled connection is its own MQTT client with a clean session and a unique client id.
//!
//! This crate also holds the MQTT client layer that the `mqtt` interface uses ([`client`],
//! [`publisher`]) and the conversions between MQTT 5 properties and Lua values ([`lua`]).

pub mod client;
pub mod lua;
pub mod publisher;

/// The MQTT client crate, for code that must name its types (the fuzz targets).
pub use rumqttc;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::future::LocalBoxFuture;
use rustomnic_core::{Section, Value};
use rustomnic_resource::{Connection, Error, Resource, ResourceProtocol};

use client::{parse_url, tls_settings, ConnectOptions, Endpoint, Outgoing, Tls, Version};
use publisher::Publisher;

/// The keys this protocol reads itself (the pool keys are read by the runtime).
pub const KEYS: &[&str] = &["url", "ca", "version", "client_id", "keep_alive", "qos", "max_message_size"];

/// The largest `max_message_size` (MQTT's own packet limit is 256 MiB).
pub const MAX_MESSAGE_SIZE: u64 = 256 << 20;

/// The `mqtt` resource protocol.
pub struct Mqtt;

struct Settings {
    endpoint: Endpoint,
    tls: Option<Tls>,
    version: Version,
    client_id: String,
    keep_alive: Duration,
    qos: u8,
    max_message_size: usize,
}

struct MqttResource(Arc<Settings>);

/// Reads `version = 5 | 3` (default 5); shared with the interface.
pub fn read_version(section: &Section) -> Option<Version> {
    match section.integer("version", 0, 100) {
        None if section.has("version") => None,
        None => Some(Version::V5),
        Some(v) if v.value == 5 => Some(Version::V5),
        Some(v) if v.value == 3 || v.value == 4 => Some(Version::V3),
        Some(v) => {
            section.error("version", format!("{} is not an MQTT version this client speaks: 5 or 3 (3.1.1)", v.value));
            None
        }
    }
}

/// Reads `url` (required); shared with the interface.
pub fn read_url(section: &Section) -> Option<Endpoint> {
    match section.string("url") {
        Some(u) => match parse_url(&u.value) {
            Ok(e) => Some(e),
            Err(e) => {
                section.error("url", e);
                None
            }
        },
        None if section.has("url") => None,
        None => {
            section.table_error("url is required, e.g. url = \"mqtt://127.0.0.1:1883\"");
            None
        }
    }
}

/// Reads `ca` (a PEM file of CA certificates, relative to the cage folder, read now) and makes
/// the TLS settings of an `mqtts://` url: the broker's certificate must be signed by that CA (by
/// a public one without `ca`) and issued for the url's host. Shared with the interface.
pub fn read_tls(section: &Section, endpoint: Option<&Endpoint>) -> Option<Option<Tls>> {
    let ca = match rustomnic_resource::tls::read_ca(section, "ca") {
        Some(Ok(ca)) => Some(ca),
        Some(Err(())) => return None,
        None => None,
    };
    // Without a url its problem is reported already.
    let Some(endpoint) = endpoint else { return Some(None) };
    if !endpoint.tls {
        if ca.is_some() {
            section.error("ca", "is only read with an mqtts:// url (TLS); this url is plain");
            return None;
        }
        return Some(None);
    }
    match tls_settings(ca) {
        Ok(t) => Some(Some(t)),
        Err(e) => {
            section.error("url", format!("cannot set up TLS: {e}"));
            None
        }
    }
}

/// Reads `keep_alive` (default 30 s, at least 5 s); shared with the interface.
pub fn read_keep_alive(section: &Section) -> Option<Duration> {
    match section.duration("keep_alive", Duration::from_secs(65535)) {
        Some(d) if d.value < Duration::from_secs(5) => {
            section.error("keep_alive", "must be at least 5s");
            None
        }
        Some(d) => Some(d.value),
        None if section.has("keep_alive") => None,
        None => Some(Duration::from_secs(30)),
    }
}

/// Reads `max_message_size` (default 1 MiB); shared with the interface.
pub fn read_max_message_size(section: &Section) -> Option<usize> {
    match section.size("max_message_size", MAX_MESSAGE_SIZE) {
        Some(s) => Some(s.value as usize),
        None if section.has("max_message_size") => None,
        None => Some(1 << 20),
    }
}

/// A client id as MQTT brokers take it: not empty, at most 65535 bytes, no NUL.
pub fn check_client_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("must not be empty".to_string());
    }
    if id.len() > 65535 || id.contains('\0') {
        return Err("must be at most 65535 bytes without NUL characters".to_string());
    }
    Ok(())
}

impl ResourceProtocol for Mqtt {
    fn name(&self) -> &'static str {
        "mqtt"
    }

    fn configure(&self, resource: &str, section: &Section) -> Option<Arc<dyn Resource>> {
        let endpoint = read_url(section);
        let tls = read_tls(section, endpoint.as_ref());
        let version = read_version(section);
        let keep_alive = read_keep_alive(section);
        let max_message_size = read_max_message_size(section);
        let qos = match section.integer("qos", 0, 2) {
            Some(q) => Some(q.value as u8),
            None if section.has("qos") => None,
            None => Some(1),
        };
        let client_id = match section.string("client_id") {
            Some(c) => match check_client_id(&c.value) {
                Ok(()) => Some(c.value),
                Err(e) => {
                    section.error("client_id", e);
                    None
                }
            },
            None if section.has("client_id") => None,
            None => Some(format!("pmnc-{resource}")),
        };
        let settings = Settings {
            endpoint: endpoint?,
            tls: tls?,
            version: version?,
            client_id: client_id?,
            keep_alive: keep_alive?,
            qos: qos?,
            max_message_size: max_message_size?,
        };
        Some(Arc::new(MqttResource(Arc::new(settings))))
    }
}

/// A client id no other connection has: the prefix, this process, a counter.
fn unique_client_id(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    static START: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    // Processes on two hosts can have the same pid: the start time tells them apart.
    let start = *START.get_or_init(|| SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0) & 0xff_ffff);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}-{:x}{start:x}-{n}", std::process::id())
}

impl Resource for MqttResource {
    fn connect(&self) -> LocalBoxFuture<'static, Result<Box<dyn Connection>, Error>> {
        let s = self.0.clone();
        Box::pin(async move {
            let options = ConnectOptions {
                endpoint: s.endpoint.clone(),
                version: s.version,
                client_id: unique_client_id(&s.client_id),
                clean_start: true,
                keep_alive: s.keep_alive,
                session_expiry: None,
                receive_maximum: None,
                // What the broker sends a publisher is acknowledgements only.
                max_packet_size: 64 << 10,
                manual_acks: false,
                // The pool's connect_timeout bounds the connect; this only keeps rumqttc's own
                // timer out of its way.
                connect_timeout: Duration::from_secs(600),
                channel_capacity: 16,
                tls: s.tls.clone(),
            };
            let publisher = Publisher::connect(&options, Duration::from_secs(600)).await.map_err(Error::new)?;
            Ok(Box::new(MqttConnection { settings: s, publisher, pending: None }) as Box<dyn Connection>)
        })
    }

    fn default_pool_size(&self) -> usize {
        4
    }
}

/// One pooled MQTT connection and the message its transaction holds back until the commit.
struct MqttConnection {
    settings: Arc<Settings>,
    publisher: Publisher,
    pending: Option<Outgoing>,
}

impl Connection for MqttConnection {
    fn begin(&mut self) -> LocalBoxFuture<'_, Result<(), Error>> {
        self.pending = None;
        Box::pin(async { Ok(()) })
    }

    fn call<'a>(&'a mut self, method: &'a str, args: Vec<Value>) -> LocalBoxFuture<'a, Result<Value, Error>> {
        Box::pin(async move {
            if method != "publish" {
                return Err(Error::new(format!("no method {method} (methods: publish)")));
            }
            if self.pending.is_some() {
                return Err(Error::new("one message per participant: make one publish per participant"));
            }
            let message = lua::publish_args(args, self.settings.qos, self.settings.max_message_size, self.settings.version).map_err(Error::new)?;
            self.pending = Some(message);
            Ok(Value::Nil)
        })
    }

    fn commit(&mut self) -> LocalBoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            let Some(message) = self.pending.take() else { return Ok(()) };
            self.publisher.publish_all(std::slice::from_ref(&message)).await.map_err(|e| {
                let text = format!("publish to {:?}: {}", message.topic, e.message);
                if e.broken {
                    Error::broken(text)
                } else {
                    Error::new(text)
                }
            })
        })
    }

    fn rollback(&mut self) -> LocalBoxFuture<'_, Result<(), Error>> {
        self.pending = None;
        Box::pin(async { Ok(()) })
    }

    fn is_healthy(&mut self) -> LocalBoxFuture<'_, bool> {
        let healthy = self.publisher.is_healthy();
        Box::pin(async move { healthy })
    }
}

impl Drop for MqttConnection {
    fn drop(&mut self) {
        self.publisher.disconnect();
    }
}
