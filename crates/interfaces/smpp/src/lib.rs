//! The `smpp` interface: an ESME that connects to an SMSC, binds as receiver or transceiver over
//! SMPP 3.4, and makes every deliver_sm (mobile-originated messages, delivery receipts) and
//! data_sm a request to the handler. The response (deliver_sm_resp, data_sm_resp) is sent only
//! after the handler returned and its transactions committed: ESME_ROK; a failed handler is
//! answered ESME_RX_T_APPN (0x64, temporary), so the SMSC delivers the message again. See
//! docs/interfaces/smpp.md and docs/decisions/137-smpp.md.
//!
//! ```toml
//! [interfaces.sms_in]
//! protocol = "smpp"
//! host = "smsc.example.net"        # required
//! port = 2775                      # default 2775
//! system_id = "shop"               # required, at most 15 characters
//! password = "${SMSC_PASSWORD}"    # at most 8 characters; default empty
//! system_type = ""                 # at most 12 characters
//! bind = "receiver"                # or "transceiver"
//! enquire_link = "30s"             # a quiet link is checked this often; the SMSC's are answered
//! response_timeout = "10s"         # bind and enquire_link answers
//! window = 10                      # messages handled at once; more are answered ESME_RTHROTTLED
//! handler = "sms_in.handle"        # default "<interface>.handle"
//! request_timeout = "30s"
//! ```
//!
//! The handler is `function M.handle(message)` with `message.command` ("deliver_sm" or
//! "data_sm"), `.source`, `.destination`, `.source_ton`, `.source_npi`, `.destination_ton`,
//! `.destination_npi`, `.service_type`, `.esm_class`, `.data_coding`, `.registered_delivery`,
//! `.text` (UTF-8, nil for binary data), `.bytes` (the user data as sent, without its UDH),
//! `.part` (`{reference, total, number}` of a concatenated message, else nil; parts are handed
//! over one by one), `.receipt` (a delivery receipt's fields: `id`, `sub`, `dlvrd`,
//! `submit_date`, `done_date`, `stat`, `err`, `text`, and the TLVs `receipted_message_id`,
//! `message_state`; else nil) and `.tlvs` (every TLV: `{tag = n, value = "..."}`).
//!
//! A lost SMSC (closed, unbound, silent past response_timeout, a bad command_length) is
//! reconnected with backoff, said once per outage in the log.
//!
//! With `listen` the interface is the server side instead (server.rs): ESMEs connect and bind as
//! transmitter or transceiver with `system_id` and `password`; every submit_sm and data_sm is a
//! request (the same `message` table, plus `.system_id` and `.remote_addr`), answered after the
//! handler with the string it returned as message_id (or one made up), ESME_RSUBMITFAIL when it
//! failed.
//!
//! ```toml
//! [interfaces.sms_gateway]
//! protocol = "smpp"
//! listen = "127.0.0.1:2775"        # required in this mode
//! system_id = "partner"            # required: what ESMEs bind with
//! password = "${PARTNER_PASSWORD}"
//! enquire_link = "30s"
//! response_timeout = "10s"         # the bind must come within it
//! window = 10                      # submits handled at once per ESME; more: ESME_RTHROTTLED
//! ```

mod receipt;
mod server;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::LocalBoxFuture;

use rustomnic_core::{Located, Section, Value};
use rustomnic_interface::consumer::{reconnecting, Outage};
use rustomnic_interface::{Host, Interface, InterfaceProtocol, InterfaceSpec, Request, Shutdown};
use rustomnic_resource_smpp::pdu::{self, Body, Pdu, Tlv};
use rustomnic_resource_smpp::session::{self, BindKind, Session, Target};
use rustomnic_resource_smpp::text;
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use server::ServerConfig;

pub use receipt::parse_receipt;

/// The keys of an smpp interface (besides protocol, handler and request_timeout): those of
/// [`session::TARGET_KEYS`] to connect out, or `listen` with `system_id`, `password`,
/// `enquire_link`, `response_timeout` and `window` to be the server side.
pub const KEYS: &[&str] = &["host", "port", "system_id", "password", "system_type", "bind", "enquire_link", "response_timeout", "window", "listen"];

/// How long a shutdown waits for messages in flight beyond the request timeout.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// The `smpp` protocol.
pub struct SmppProtocol;

/// A configured smpp interface.
pub struct SmppInterface {
    spec: InterfaceSpec,
    mode: Mode,
}

/// Which side of SMPP the interface is.
enum Mode {
    /// An ESME bound to an SMSC, receiving deliver_sm and data_sm.
    Connect(Target),
    /// The server ESMEs bind to, receiving submit_sm and data_sm.
    Listen(Located<SocketAddr>, ServerConfig),
}

impl InterfaceProtocol for SmppProtocol {
    fn name(&self) -> &'static str {
        "smpp"
    }

    fn configure(&self, spec: InterfaceSpec, section: &Section) -> Option<Arc<dyn Interface>> {
        if section.has("listen") {
            let listen = rustomnic_interface::read_listen(section);
            let system_id = section.string("system_id").map(|v| v.value);
            if system_id.is_none() && !section.has("system_id") {
                section.table_error("system_id is required: ESMEs bind with it");
            }
            let password = section.string("password").map(|v| v.value).unwrap_or_default();
            let enquire_link = section.duration("enquire_link", Duration::from_secs(3600)).map(|v| v.value).unwrap_or(Duration::from_secs(30));
            let response_timeout = section.duration("response_timeout", Duration::from_secs(600)).map(|v| v.value).unwrap_or(Duration::from_secs(10));
            let window = section.integer("window", 1, 1000).map(|v| v.value as usize).unwrap_or(10);
            for key in ["host", "port", "bind", "system_type"] {
                if section.has(key) {
                    section.error(key, "is for connecting to an SMSC; with listen the interface is the server side");
                }
            }
            let cfg = ServerConfig {
                system_id: system_id?,
                password,
                enquire_link: if enquire_link.is_zero() { Duration::from_secs(30) } else { enquire_link },
                response_timeout: if response_timeout.is_zero() { Duration::from_secs(10) } else { response_timeout },
                window,
            };
            return Some(Arc::new(SmppInterface { spec, mode: Mode::Listen(listen?, cfg) }));
        }
        let target = session::read_target(section, &[BindKind::Receiver, BindKind::Transceiver])?;
        Some(Arc::new(SmppInterface { spec, mode: Mode::Connect(target) }))
    }
}

impl Interface for SmppInterface {
    fn spec(&self) -> &InterfaceSpec {
        &self.spec
    }

    fn listen(&self) -> Option<Located<SocketAddr>> {
        match &self.mode {
            Mode::Listen(at, _) => Some(at.clone()),
            Mode::Connect(_) => None,
        }
    }

    fn serve(self: Arc<Self>, stream: TcpStream, remote: SocketAddr, shutdown: Shutdown) -> LocalBoxFuture<'static, ()> {
        Box::pin(async move {
            let Mode::Listen(_, cfg) = &self.mode else { return };
            if let Err(e) = self.serve_esme(cfg, stream, remote, shutdown).await {
                tracing::info!(cage = %self.spec.cage, interface = %self.spec.name, "{e}");
            }
        })
    }

    fn start(self: Arc<Self>, host: Host) {
        if !matches!(self.mode, Mode::Connect(_)) {
            return;
        }
        let me = self.clone();
        rustomnic_interface::consumer::spawn(&self.spec, move || async move {
            reconnecting(&host, async |outage: &mut Outage| me.session(&host, outage).await).await;
        });
    }
}

impl SmppInterface {
    /// One bound session: until the shutdown (Ok) or the link's end (Err, bound again later).
    async fn session(self: &Arc<Self>, host: &Host, outage: &mut Outage) -> Result<(), String> {
        let (cage, name) = (&self.spec.cage, &self.spec.name);
        let Mode::Connect(target) = &self.mode else { return Ok(()) };
        let (session, incoming) = Session::connect(target, true).await?;
        let Some(mut incoming) = incoming else { return Err("no incoming channel".into()) };
        let kind = target.bind.name();
        match outage.end() {
            Some(after) => {
                tracing::info!(cage = %cage, interface = %name, "bound as {kind} to {} again after {:.1}s", target.display, after.as_secs_f64())
            }
            None => tracing::info!(cage = %cage, interface = %name, "bound as {kind} to {} (SMSC {:?})", target.display, session.smsc),
        }
        let mut shutdown = host.shutdown();
        let mut tasks = JoinSet::new();
        let window = target.window.max(1);
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                why = session.wait_ended() => {
                    // The handlers still running finish; their answers go nowhere and the
                    // SMSC delivers those messages again.
                    tasks.detach_all();
                    return Err(why);
                }
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                next = incoming.recv(), if tasks.len() < window => match next {
                    Some(p) => {
                        let (me, host, session) = (self.clone(), host.clone(), session.clone());
                        tasks.spawn(async move { me.handle(&host, &session, p).await });
                    }
                    None => return Err(session.wait_ended().await),
                },
            }
        }
        // Shutdown: what is in flight is answered first, then the session unbinds.
        drop(incoming);
        let limit = self.spec.request_timeout + SHUTDOWN_GRACE;
        if tokio::time::timeout(limit, async { while tasks.join_next().await.is_some() {} }).await.is_err() {
            tracing::warn!(cage = %cage, interface = %name, "{} message(s) still in flight after {limit:?}; the SMSC delivers them again", tasks.len());
        }
        session.unbind().await;
        Ok(())
    }

    /// Runs the handler for one deliver_sm or data_sm and answers it by the outcome.
    async fn handle(&self, host: &Host, session: &Session, p: Pdu) {
        let (cage, name) = (&self.spec.cage, &self.spec.name);
        let request = Request {
            handler: self.spec.handler.value.clone(),
            args: vec![message(&p)],
            deadline: Instant::now() + self.spec.request_timeout,
            parameters: None,
        };
        let status = match host.run(request).await {
            Ok(_) => pdu::ESME_ROK,
            Err(e) => {
                tracing::warn!(cage = %cage, interface = %name, "{} #{} failed: {e}; answered ESME_RX_T_APPN so the SMSC delivers it again", p.name(), p.sequence);
                pdu::ESME_RX_T_APPN
            }
        };
        let body = Body::SmResp(Some(Vec::new()), Vec::new());
        if let Err(e) = session.respond(p.response(status, body)).await {
            tracing::debug!(cage = %cage, interface = %name, "the answer to {} #{} was not sent (the SMSC delivers it again): {e}", p.name(), p.sequence);
        }
    }
}

fn s(b: &[u8]) -> Value {
    Value::Str(b.to_vec())
}

fn int(n: impl Into<i64>) -> Value {
    Value::Int(n.into())
}

/// The handler's `message` table.
pub fn message(p: &Pdu) -> Value {
    let (service_type, source, destination, esm_class, registered_delivery, data_coding, short, tlvs): (_, _, _, u8, u8, u8, &[u8], &[Tlv]) = match &p.body {
        Body::Sm(sm) => (&sm.service_type, &sm.source, &sm.destination, sm.esm_class, sm.registered_delivery, sm.data_coding, &sm.short_message, &sm.tlvs),
        Body::DataSm(d) => (&d.service_type, &d.source, &d.destination, d.esm_class, d.registered_delivery, d.data_coding, &[], &d.tlvs),
        _ => return Value::Nil,
    };
    // message_payload carries the user data when short_message is empty (always for data_sm).
    let payload = if short.is_empty() { pdu::tlv(tlvs, pdu::TAG_MESSAGE_PAYLOAD).unwrap_or(&[]) } else { short };
    let mut part = None;
    let mut data = payload;
    if esm_class & pdu::ESM_UDHI != 0 {
        if let Some((reference, total, number, len)) = text::read_udh(payload) {
            part = Some((u32::from(reference), u32::from(total), u32::from(number)));
            data = &payload[len..];
        } else if let Some(len) = payload.first().map(|l| 1 + *l as usize).filter(|l| *l <= payload.len()) {
            data = &payload[len..];
        }
    } else if let (Some(r), Some(t), Some(n)) =
        (pdu::tlv_int(tlvs, pdu::TAG_SAR_MSG_REF_NUM), pdu::tlv_int(tlvs, pdu::TAG_SAR_TOTAL_SEGMENTS), pdu::tlv_int(tlvs, pdu::TAG_SAR_SEGMENT_SEQNUM))
    {
        part = Some((r, t, n));
    }
    let text = text::decode(data_coding, data);
    let is_receipt = esm_class & 0x3C == pdu::ESM_DELIVERY_RECEIPT || esm_class & 0x3C == 0x08 || pdu::tlv(tlvs, pdu::TAG_RECEIPTED_MESSAGE_ID).is_some();
    let receipt = if is_receipt {
        let mut fields = parse_receipt(text.as_deref().unwrap_or(""));
        if let Some(id) = pdu::tlv_cstr(tlvs, pdu::TAG_RECEIPTED_MESSAGE_ID) {
            fields.push(("receipted_message_id".into(), s(&id)));
        }
        if let Some(state) = pdu::tlv_int(tlvs, pdu::TAG_MESSAGE_STATE) {
            fields.push(("message_state".into(), int(state)));
        }
        Value::Map(fields.into_iter().map(|(k, v)| (Value::str(k), v)).collect())
    } else {
        Value::Nil
    };
    let part = match part {
        Some((r, t, n)) => Value::Map(vec![(Value::str("reference"), int(r)), (Value::str("total"), int(t)), (Value::str("number"), int(n))]),
        None => Value::Nil,
    };
    let tlv_list = Value::Array(tlvs.iter().map(|t| Value::Map(vec![(Value::str("tag"), int(t.tag)), (Value::str("value"), s(&t.value))])).collect());
    let command = p.name();
    Value::Map(vec![
        (Value::str("command"), Value::str(command)),
        (Value::str("source"), s(&source.addr)),
        (Value::str("source_ton"), int(source.ton)),
        (Value::str("source_npi"), int(source.npi)),
        (Value::str("destination"), s(&destination.addr)),
        (Value::str("destination_ton"), int(destination.ton)),
        (Value::str("destination_npi"), int(destination.npi)),
        (Value::str("service_type"), s(service_type)),
        (Value::str("esm_class"), int(esm_class)),
        (Value::str("data_coding"), int(data_coding)),
        (Value::str("registered_delivery"), int(registered_delivery)),
        (Value::str("text"), text.map(Value::str).unwrap_or(Value::Nil)),
        (Value::str("bytes"), s(data)),
        (Value::str("part"), part),
        (Value::str("receipt"), receipt),
        (Value::str("tlvs"), tlv_list),
    ])
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use rustomnic_resource_smpp::pdu::{Address, Sm};

    #[test]
    fn a_receipt_and_a_part_become_fields() {
        let sm = Sm {
            source: Address { ton: 1, npi: 1, addr: b"491".to_vec() },
            esm_class: pdu::ESM_DELIVERY_RECEIPT,
            short_message: b"id:abc123 sub:001 dlvrd:001 submit date:2612061200 done date:2612061201 stat:DELIVRD err:000 text:Hello there".to_vec(),
            tlvs: vec![Tlv { tag: pdu::TAG_MESSAGE_STATE, value: vec![2] }],
            ..Sm::default()
        };
        let m = message(&Pdu::new(pdu::DELIVER_SM, 3, Body::Sm(Box::new(sm))));
        let r = m.get("receipt").unwrap();
        assert_eq!(r.get("id").unwrap().as_str(), Some("abc123"));
        assert_eq!(r.get("stat").unwrap().as_str(), Some("DELIVRD"));
        assert_eq!(r.get("submit_date").unwrap().as_str(), Some("2612061200"));
        assert_eq!(r.get("text").unwrap().as_str(), Some("Hello there"));
        assert_eq!(r.get("message_state"), Some(&Value::Int(2)));
        let mut um = text::udh(9, 2, 1).to_vec();
        um.extend(text::encode_ucs2("Ж"));
        let sm = Sm { esm_class: pdu::ESM_UDHI, data_coding: 8, short_message: um, ..Sm::default() };
        let m = message(&Pdu::new(pdu::DELIVER_SM, 4, Body::Sm(Box::new(sm))));
        assert_eq!(m.get("text").unwrap().as_str(), Some("Ж"));
        assert_eq!(m.get("part").unwrap().get("total"), Some(&Value::Int(2)));
        assert_eq!(m.get("receipt"), Some(&Value::Nil));
    }
}
