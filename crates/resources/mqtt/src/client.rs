//! The MQTT client layer shared by the `mqtt` resource and the `mqtt` interface: broker urls,
//! topic checks, and one face over rumqttc's MQTT 3.1.1 and MQTT 5 clients (their packet types
//! differ), so that the code above speaks of messages, acknowledgements and connections only.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rumqttc::tokio_rustls::rustls::ClientConfig;
use rumqttc::v5 as r5;
use rumqttc::v5::mqttbytes::v5 as p5;
use rustomnic_resource::tls::CaFile;

/// The protocol version spoken to the broker (`version = 5 | 3`, docs/decisions/115).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V3,
    V5,
}

/// Where the broker is and who we are to it: `mqtt://[user[:password]@]host[:port]`, or
/// `mqtts://` for TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    pub username: Option<String>,
    pub password: Option<String>,
    pub tls: bool,
}

impl Endpoint {
    /// The url without its password, for logs and errors.
    pub fn shown(&self) -> String {
        let user = self.username.as_ref().map(|u| format!("{u}@")).unwrap_or_default();
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        if self.host.contains(':') {
            format!("{scheme}://{user}[{}]:{}", self.host, self.port)
        } else {
            format!("{scheme}://{user}{}:{}", self.host, self.port)
        }
    }
}

/// Reads a broker url: `mqtt://` (plain TCP, port 1883 by default) or `mqtts://` (TLS, port
/// 8883 by default).
pub fn parse_url(url: &str) -> Result<Endpoint, String> {
    let (rest, tls) = if let Some(r) = url.strip_prefix("mqtt://") {
        (r, false)
    } else if let Some(r) = url.strip_prefix("mqtts://") {
        (r, true)
    } else {
        return Err(format!("{url:?} is not an MQTT url such as \"mqtt://127.0.0.1:1883\" (or mqtts:// for TLS)"));
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains('/') || rest.contains('?') || rest.contains('#') {
        return Err(format!("{url:?}: an MQTT url has no path or query (mqtt://[user[:password]@]host[:port])"));
    }
    let (userinfo, hostport) = match rest.rfind('@') {
        Some(at) => (Some(&rest[..at]), &rest[at + 1..]),
        None => (None, rest),
    };
    let (username, password) = match userinfo {
        None => (None, None),
        Some(u) => match u.split_once(':') {
            Some((user, pass)) => (Some(percent_decode(user)?), Some(percent_decode(pass)?)),
            None => (Some(percent_decode(u)?), None),
        },
    };
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        let Some((host, after)) = v6.split_once(']') else {
            return Err(format!("{url:?}: an IPv6 host needs its closing ]"));
        };
        (host.to_string(), after.strip_prefix(':'))
    } else {
        match hostport.split_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (hostport.to_string(), None),
        }
    };
    if host.is_empty() {
        return Err(format!("{url:?} names no host"));
    }
    let port = match port {
        None if tls => 8883,
        None => 1883,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 => n,
            _ => return Err(format!("{url:?}: {p:?} is not a port")),
        },
    };
    Ok(Endpoint { host, port, username: username.filter(|u| !u.is_empty()), password, tls })
}

fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok()).and_then(|h| u8::from_str_radix(h, 16).ok());
            match hex {
                Some(b) => out.push(b),
                None => return Err("a % in the user or password of the url must be followed by two hex digits".to_string()),
            }
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "the user or password of the url is not UTF-8".to_string())
}

/// Checks a topic to publish to: not empty, no wildcards, no NUL, at most 65535 bytes.
pub fn check_topic(topic: &str) -> Result<(), String> {
    if topic.is_empty() {
        return Err("the topic is empty".to_string());
    }
    if topic.contains(['+', '#']) {
        return Err(format!("{topic:?} has a wildcard (+ or #): a message is published to one topic, wildcards only subscribe"));
    }
    if topic.contains('\0') {
        return Err(format!("{topic:?} contains a NUL character"));
    }
    if topic.len() > 65535 {
        return Err(format!("the topic is {} bytes long, over MQTT's 65535", topic.len()));
    }
    Ok(())
}

/// Checks a topic filter to subscribe to: `#` only as the whole last level, `+` only as a whole
/// level.
pub fn check_filter(filter: &str) -> Result<(), String> {
    if filter.is_empty() {
        return Err("the topic filter is empty".to_string());
    }
    if filter.contains('\0') {
        return Err(format!("{filter:?} contains a NUL character"));
    }
    if filter.len() > 65535 {
        return Err(format!("the topic filter is {} bytes long, over MQTT's 65535", filter.len()));
    }
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        if level.contains('#') && (*level != "#" || i != levels.len() - 1) {
            return Err(format!("{filter:?}: # must be a whole level and the last one (such as \"orders/#\")"));
        }
        if level.contains('+') && *level != "+" {
            return Err(format!("{filter:?}: + must be a whole level (such as \"orders/+/paid\")"));
        }
    }
    Ok(())
}

/// What a connection is made with.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    pub endpoint: Endpoint,
    pub version: Version,
    pub client_id: String,
    pub clean_start: bool,
    /// At least 5 s (rumqttc's floor).
    pub keep_alive: Duration,
    /// MQTT 5: how long the broker keeps the session after a disconnect (seconds).
    pub session_expiry: Option<u32>,
    /// MQTT 5: how many unacknowledged QoS 1/2 messages the broker may send us at once.
    pub receive_maximum: Option<u16>,
    /// The largest packet read from the broker; MQTT 5 tells the broker, which then does not
    /// send larger ones.
    pub max_packet_size: u32,
    pub manual_acks: bool,
    pub connect_timeout: Duration,
    /// Requests (publishes, acks) that can wait for the event loop.
    pub channel_capacity: usize,
    /// With an `mqtts://` url: the TLS settings (ring; the server's certificate checked against
    /// `ca`, or the public CAs, and the url's host).
    pub tls: Option<Tls>,
}

/// The TLS settings of a connection, and the CA file they trust (for error messages).
#[derive(Clone)]
pub struct Tls {
    pub config: Arc<ClientConfig>,
    pub ca: Option<CaFile>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tls({:?})", self.ca)
    }
}

/// TLS settings that check the server's certificate fully: signed by `ca` (or a public CA when
/// there is none) and issued for the host connected to.
pub fn tls_settings(ca: Option<CaFile>) -> Result<Tls, String> {
    let config = rustomnic_resource::tls::client_config(rustomnic_resource::tls::Verify::Full, ca.as_ref())?;
    Ok(Tls { config, ca })
}

/// Our own QoS 1/2 publishes that may wait for their acknowledgement at once, per connection.
const OUTGOING_INFLIGHT: u16 = 100;

/// Sends requests to the event loop.
#[derive(Clone)]
pub enum Client {
    V3(rumqttc::AsyncClient),
    V5(r5::AsyncClient),
}

/// The connection itself, driven by polling it; it reconnects when polled after an error.
pub struct EventLoop {
    inner: Inner,
    /// The CA trusted, to say why a handshake failed.
    ca: Option<CaFile>,
}

enum Inner {
    V3(Box<rumqttc::EventLoop>),
    V5(Box<r5::EventLoop>),
}

/// A client and its event loop; nothing is connected until the loop is polled.
pub fn new_client(o: &ConnectOptions) -> (Client, EventLoop) {
    let secs = o.connect_timeout.as_secs().max(1);
    let keep_alive = o.keep_alive.max(Duration::from_secs(5));
    let transport = o.tls.as_ref().map(|t| rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(t.config.clone())));
    let ca = o.tls.as_ref().and_then(|t| t.ca.clone());
    match o.version {
        Version::V3 => {
            let mut m = rumqttc::MqttOptions::new(o.client_id.clone(), o.endpoint.host.clone(), o.endpoint.port);
            m.set_keep_alive(keep_alive);
            // rumqttc refuses a persistent session without a client id; ours always has one.
            m.set_clean_session(o.clean_start || o.client_id.is_empty());
            m.set_manual_acks(o.manual_acks);
            m.set_inflight(OUTGOING_INFLIGHT);
            m.set_max_packet_size(o.max_packet_size as usize, 256 << 20);
            if let Some(u) = &o.endpoint.username {
                m.set_credentials(u.clone(), o.endpoint.password.clone().unwrap_or_default());
            }
            if let Some(t) = transport {
                m.set_transport(t);
            }
            let (client, mut eventloop) = rumqttc::AsyncClient::new(m, o.channel_capacity);
            eventloop.network_options.set_connection_timeout(secs);
            (Client::V3(client), EventLoop { inner: Inner::V3(Box::new(eventloop)), ca })
        }
        Version::V5 => {
            let mut m = r5::MqttOptions::new(o.client_id.clone(), o.endpoint.host.clone(), o.endpoint.port);
            m.set_keep_alive(keep_alive);
            m.set_clean_start(o.clean_start);
            m.set_manual_acks(o.manual_acks);
            m.set_connection_timeout(secs);
            m.set_max_packet_size(Some(o.max_packet_size));
            m.set_session_expiry_interval(o.session_expiry);
            m.set_receive_maximum(o.receive_maximum);
            // Unbounded, rumqttc keeps a slot for each of the 65535 packet ids (MBs per client).
            m.set_outgoing_inflight_upper_limit(OUTGOING_INFLIGHT);
            if let Some(u) = &o.endpoint.username {
                m.set_credentials(u.clone(), o.endpoint.password.clone().unwrap_or_default());
            }
            if let Some(t) = transport {
                m.set_transport(t);
            }
            let (client, eventloop) = r5::AsyncClient::new(m, o.channel_capacity);
            (Client::V5(client), EventLoop { inner: Inner::V5(Box::new(eventloop)), ca })
        }
    }
}

/// MQTT 5 properties of a message, in both directions (the `properties` table in Lua).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Properties {
    pub user: Vec<(String, String)>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
    pub content_type: Option<String>,
    /// Seconds.
    pub message_expiry: Option<u32>,
    /// The payload is UTF-8 text (payload format indicator 1).
    pub utf8: Option<bool>,
}

impl Properties {
    pub fn is_empty(&self) -> bool {
        *self == Properties::default()
    }

    fn from_v5(p: &p5::PublishProperties) -> Properties {
        Properties {
            user: p.user_properties.clone(),
            response_topic: p.response_topic.clone(),
            correlation_data: p.correlation_data.clone(),
            content_type: p.content_type.clone(),
            message_expiry: p.message_expiry_interval,
            utf8: p.payload_format_indicator.map(|f| f == 1),
        }
    }

    fn to_v5(&self) -> p5::PublishProperties {
        p5::PublishProperties {
            payload_format_indicator: self.utf8.map(u8::from),
            message_expiry_interval: self.message_expiry,
            topic_alias: None,
            response_topic: self.response_topic.clone(),
            correlation_data: self.correlation_data.clone(),
            user_properties: self.user.clone(),
            subscription_identifiers: vec![],
            content_type: self.content_type.clone(),
        }
    }
}

/// A message received from the broker.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub topic: Bytes,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    pub dup: bool,
    pub pkid: u16,
    pub properties: Option<Properties>,
}

impl Incoming {
    /// A PUBLISH packet of MQTT 5 as the broker sent it (rumqttc decoded it; public for the
    /// fuzz target that feeds decoded packets to the conversions).
    pub fn from_v5(p: p5::Publish) -> Incoming {
        Incoming {
            topic: p.topic,
            payload: p.payload,
            qos: p.qos as u8,
            retain: p.retain,
            dup: p.dup,
            pkid: p.pkid,
            properties: p.properties.as_ref().map(Properties::from_v5),
        }
    }
}

/// A message to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    pub properties: Properties,
}

/// What polling the event loop gave, the same for both versions.
#[derive(Debug)]
pub enum Event {
    /// Connected; whether the broker still had our session.
    Connected {
        session_present: bool,
    },
    Message(Incoming),
    /// A publish of ours left with this packet id (0 for QoS 0), in the order they were asked.
    Sent(u16),
    /// Our acknowledgement (PUBACK/PUBREC) of the received message with this packet id was
    /// written to the connection.
    AckSent(u16),
    /// A QoS 1 publish of ours was acknowledged (`refused` when the broker's reason says no).
    PubAck {
        pkid: u16,
        refused: Option<String>,
    },
    /// A QoS 2 publish of ours was received (first half; `refused` as above).
    PubRec {
        pkid: u16,
        refused: Option<String>,
    },
    /// A QoS 2 publish of ours was completed.
    PubComp {
        pkid: u16,
    },
    /// The broker answered a subscribe: the granted QoS of each filter, None where refused.
    SubAck {
        granted: Vec<Option<u8>>,
    },
    Other,
}

fn qos3(q: u8) -> rumqttc::QoS {
    match q {
        0 => rumqttc::QoS::AtMostOnce,
        1 => rumqttc::QoS::AtLeastOnce,
        _ => rumqttc::QoS::ExactlyOnce,
    }
}

fn qos5(q: u8) -> r5::mqttbytes::QoS {
    match q {
        0 => r5::mqttbytes::QoS::AtMostOnce,
        1 => r5::mqttbytes::QoS::AtLeastOnce,
        _ => r5::mqttbytes::QoS::ExactlyOnce,
    }
}

impl EventLoop {
    /// The next event; an error means the connection is gone (polling again reconnects).
    pub async fn poll(&mut self) -> Result<Event, String> {
        let ca = self.ca.as_ref();
        match &mut self.inner {
            Inner::V3(l) => {
                use rumqttc::{Event as E, Incoming as I, Outgoing as O};
                match l.poll().await.map_err(|e| describe3(&e, ca))? {
                    E::Incoming(I::ConnAck(c)) => Ok(Event::Connected { session_present: c.session_present }),
                    E::Incoming(I::Publish(p)) => Ok(Event::Message(Incoming {
                        topic: Bytes::from(p.topic.into_bytes()),
                        payload: p.payload,
                        qos: p.qos as u8,
                        retain: p.retain,
                        dup: p.dup,
                        pkid: p.pkid,
                        properties: None,
                    })),
                    E::Incoming(I::PubAck(a)) => Ok(Event::PubAck { pkid: a.pkid, refused: None }),
                    E::Incoming(I::PubRec(a)) => Ok(Event::PubRec { pkid: a.pkid, refused: None }),
                    E::Incoming(I::PubComp(a)) => Ok(Event::PubComp { pkid: a.pkid }),
                    E::Incoming(I::SubAck(s)) => Ok(Event::SubAck {
                        granted: s
                            .return_codes
                            .iter()
                            .map(|c| match c {
                                rumqttc::SubscribeReasonCode::Success(q) => Some(*q as u8),
                                rumqttc::SubscribeReasonCode::Failure => None,
                            })
                            .collect(),
                    }),
                    E::Outgoing(O::Publish(pkid)) => Ok(Event::Sent(pkid)),
                    E::Outgoing(O::PubAck(pkid) | O::PubRec(pkid)) => Ok(Event::AckSent(pkid)),
                    _ => Ok(Event::Other),
                }
            }
            Inner::V5(l) => {
                use r5::{Event as E, Incoming as I};
                use rumqttc::Outgoing as O;
                match l.poll().await.map_err(|e| describe5(&e, ca))? {
                    E::Incoming(I::ConnAck(c)) => Ok(Event::Connected { session_present: c.session_present }),
                    E::Incoming(I::Publish(p)) => Ok(Event::Message(Incoming::from_v5(p))),
                    E::Incoming(I::PubAck(a)) => {
                        let ok = matches!(a.reason, p5::PubAckReason::Success | p5::PubAckReason::NoMatchingSubscribers);
                        Ok(Event::PubAck { pkid: a.pkid, refused: (!ok).then(|| format!("{:?}", a.reason)) })
                    }
                    E::Incoming(I::PubRec(a)) => {
                        let ok = matches!(a.reason, p5::PubRecReason::Success | p5::PubRecReason::NoMatchingSubscribers);
                        Ok(Event::PubRec { pkid: a.pkid, refused: (!ok).then(|| format!("{:?}", a.reason)) })
                    }
                    E::Incoming(I::PubComp(a)) => Ok(Event::PubComp { pkid: a.pkid }),
                    E::Incoming(I::SubAck(s)) => Ok(Event::SubAck {
                        granted: s
                            .return_codes
                            .iter()
                            .map(|c| match c {
                                p5::SubscribeReasonCode::Success(q) => Some(*q as u8),
                                _ => None,
                            })
                            .collect(),
                    }),
                    E::Outgoing(O::Publish(pkid)) => Ok(Event::Sent(pkid)),
                    E::Outgoing(O::PubAck(pkid) | O::PubRec(pkid)) => Ok(Event::AckSent(pkid)),
                    _ => Ok(Event::Other),
                }
            }
        }
    }

    /// After a lost connection: forgets acknowledgements still waiting to be sent. They belong
    /// to the connection that delivered their messages; on the next one the broker sends those
    /// messages again (with the same packet ids, which it may also give to new messages once the
    /// old ones are settled), so an old acknowledgement sent there could settle the wrong
    /// message (docs/decisions/116).
    pub fn forget_acks(&mut self) {
        match &mut self.inner {
            Inner::V3(l) => {
                l.clean();
                l.pending.retain(|r| !matches!(r, rumqttc::Request::PubAck(_) | rumqttc::Request::PubRec(_)));
            }
            Inner::V5(l) => {
                l.clean();
                l.pending.retain(|r| !matches!(r, r5::Request::PubAck(_) | r5::Request::PubRec(_)));
            }
        }
    }
}

fn describe3(e: &rumqttc::ConnectionError, ca: Option<&CaFile>) -> String {
    match e {
        rumqttc::ConnectionError::ConnectionRefused(code) => format!("the broker refused the connection: {code:?}"),
        rumqttc::ConnectionError::NetworkTimeout => "no answer from the broker in time".to_string(),
        other => rustomnic_resource::tls::describe(other, ca).unwrap_or_else(|| rustomnic_resource::error_chain(other)),
    }
}

fn describe5(e: &r5::ConnectionError, ca: Option<&CaFile>) -> String {
    match e {
        r5::ConnectionError::ConnectionRefused(code) => format!("the broker refused the connection: {code:?}"),
        r5::ConnectionError::Timeout(_) => "no answer from the broker in time".to_string(),
        other => rustomnic_resource::tls::describe(other, ca).unwrap_or_else(|| rustomnic_resource::error_chain(other)),
    }
}

impl Client {
    /// Publishes (queues the publish for the event loop; its `Event::Sent` follows).
    pub async fn publish(&self, m: &Outgoing) -> Result<(), String> {
        match self {
            Client::V3(c) => c.publish_bytes(m.topic.clone(), qos3(m.qos), m.retain, m.payload.clone()).await.map_err(|e| e.to_string()),
            Client::V5(c) => {
                let r = if m.properties.is_empty() {
                    c.publish_bytes(m.topic.clone(), qos5(m.qos), m.retain, m.payload.clone()).await
                } else {
                    c.publish_bytes_with_properties(m.topic.clone(), qos5(m.qos), m.retain, m.payload.clone(), m.properties.to_v5()).await
                };
                r.map_err(|e| e.to_string())
            }
        }
    }

    /// Acknowledges a received message (PUBACK for QoS 1, PUBREC for QoS 2; nothing for QoS 0),
    /// without waiting: the request waits in the channel for the event loop.
    pub fn try_ack(&self, m: &Incoming) -> Result<(), String> {
        match self {
            Client::V3(c) => {
                let mut p = rumqttc::Publish::new("", qos3(m.qos), Vec::new());
                p.pkid = m.pkid;
                c.try_ack(&p).map_err(|e| e.to_string())
            }
            Client::V5(c) => {
                let p = p5::Publish { qos: qos5(m.qos), pkid: m.pkid, ..Default::default() };
                c.try_ack(&p).map_err(|e| e.to_string())
            }
        }
    }

    /// Subscribes the filters, each at its QoS. `retain_once`: with MQTT 5, retained messages are
    /// sent only when the subscription is new, not again on every renewal.
    pub async fn subscribe(&self, filters: &[(String, u8)], retain_once: bool) -> Result<(), String> {
        match self {
            Client::V3(c) => c.subscribe_many(filters.iter().map(|(f, q)| rumqttc::SubscribeFilter::new(f.clone(), qos3(*q)))).await.map_err(|e| e.to_string()),
            Client::V5(c) => {
                let list: Vec<p5::Filter> = filters
                    .iter()
                    .map(|(f, q)| {
                        let mut filter = p5::Filter::new(f.clone(), qos5(*q));
                        if retain_once {
                            filter.retain_forward_rule = p5::RetainForwardRule::OnNewSubscribe;
                        }
                        filter
                    })
                    .collect();
                c.subscribe_many(list).await.map_err(|e| e.to_string())
            }
        }
    }

    /// Asks the event loop to send DISCONNECT (a clean end: MQTT 5 brokers then drop the will).
    pub fn try_disconnect(&self) {
        let _ = match self {
            Client::V3(c) => c.try_disconnect().map_err(|e| e.to_string()),
            Client::V5(c) => c.try_disconnect().map_err(|e| e.to_string()),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let e = parse_url("mqtt://127.0.0.1:1884").unwrap();
        assert_eq!((e.host.as_str(), e.port, e.username), ("127.0.0.1", 1884, None));
        let e = parse_url("mqtt://app:p%40ss@broker.internal").unwrap();
        assert_eq!((e.host.as_str(), e.port, e.username.as_deref(), e.password.as_deref()), ("broker.internal", 1883, Some("app"), Some("p@ss")));
        assert_eq!(e.shown(), "mqtt://app@broker.internal:1883", "the password is never shown");
        let e = parse_url("mqtt://[::1]:1883/").unwrap();
        assert_eq!((e.host.as_str(), e.port), ("::1", 1883));
        let e = parse_url("mqtts://broker.internal").unwrap();
        assert_eq!((e.port, e.tls), (8883, true));
        assert_eq!(e.shown(), "mqtts://broker.internal:8883");
        assert!(parse_url("http://h").unwrap_err().contains("not an MQTT url"));
        assert!(parse_url("mqtt://h:0").unwrap_err().contains("is not a port"));
        assert!(parse_url("mqtt://h:1883/x").unwrap_err().contains("no path"));
        assert!(parse_url("mqtt://").unwrap_err().contains("names no host"));
    }

    #[test]
    fn topics_and_filters() {
        assert!(check_topic("orders/paid").is_ok());
        assert!(check_topic("orders/+").unwrap_err().contains("wildcard"));
        assert!(check_topic("orders/#").unwrap_err().contains("wildcard"));
        assert!(check_topic("").is_err());
        assert!(check_filter("orders/#").is_ok());
        assert!(check_filter("+/x/+").is_ok());
        assert!(check_filter("#").is_ok());
        assert!(check_filter("$share/g/orders/#").is_ok());
        assert!(check_filter("orders/#/x").is_err());
        assert!(check_filter("orders#").is_err());
        assert!(check_filter("a+/b").is_err());
        assert!(check_filter("").is_err());
    }
}
