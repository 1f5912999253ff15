//! The `smpp` resource: short messages submitted to an SMSC over SMPP 3.4 (the resource is an
//! ESME bound as transmitter or transceiver), **at commit**. See docs/resources/smpp.md and
//! docs/decisions/137-smpp.md.
//!
//! ```toml
//! [resources.sms]
//! protocol = "smpp"
//! host = "smsc.example.net"        # required
//! port = 2775                      # default 2775
//! system_id = "shop"               # required, at most 15 characters
//! password = "${SMSC_PASSWORD}"    # at most 8 characters; default empty
//! system_type = ""                 # at most 12 characters
//! bind = "transmitter"             # or "transceiver"
//! enquire_link = "30s"             # a quiet link is checked this often
//! response_timeout = "10s"         # bind, enquire_link and each submit_sm answer
//! window = 10                      # submit_sm unanswered at once on a connection
//! submit_timeout = "30s"           # a commit's submits, throttling retries included
//! source = "Shop"                  # default sender (`from`)
//! max_parts = 10                   # parts of one concatenated message, at most 255
//! ```
//!
//! Methods:
//! - `submit{to, from?, text | bytes, coding?, registered_delivery?, service_type?, to_ton?,
//!   to_npi?, from_ton?, from_npi?}` checks and encodes the message when the transaction runs
//!   (a long text becomes concatenated parts with a user data header) and returns
//!   `{reference = "...", parts = n}`; the parts are **submitted at commit**, `window` at once,
//!   each retried with backoff while the SMSC answers ESME_RTHROTTLED or ESME_RMSGQFUL (within
//!   `submit_timeout`). A rollback submits nothing.
//! - `message_ids(reference)` gives the SMSC's message ids of a committed submit (one per part),
//!   kept in this process for 10 minutes (at most 10,000 references), or nil.
//!
//! A connection is one bound session that lives in the pool: it answers the SMSC's enquire_link
//! and checks a quiet link itself; a connection whose session ended is not handed out again. A
//! transceiver connection refuses deliver_sm with ESME_RX_T_APPN (the smpp interface takes them).
//!
//! [`pdu`] is the PDU codec, [`text`] the codings and concatenation, [`session`] the bound
//! session; the smpp interface uses all three.

pub mod pdu;
pub mod session;
pub mod text;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use futures_util::future::LocalBoxFuture;
use rustomnic_core::{Section, Value};
use rustomnic_resource::{Connection, Error, Resource, ResourceProtocol};

use pdu::{Address, Body, Pdu, Sm};
use session::{BindKind, Session, Target};
use text::Coding;

/// The keys this protocol reads itself (the pool keys are read by the runtime).
pub const KEYS: &[&str] =
    &["host", "port", "system_id", "password", "system_type", "bind", "enquire_link", "response_timeout", "window", "submit_timeout", "source", "max_parts"];

/// How long message ids are kept for `message_ids`, and how many references at most.
const IDS_KEPT: Duration = Duration::from_secs(600);
const IDS_MAX: usize = 10_000;
/// The first wait after a throttled submit, doubled up to [`MAX_THROTTLE_WAIT`].
const FIRST_THROTTLE_WAIT: Duration = Duration::from_millis(100);
const MAX_THROTTLE_WAIT: Duration = Duration::from_secs(2);
/// The most octets a `text` or `bytes` may have before encoding.
const MAX_INPUT: usize = 64 << 10;

/// The `smpp` resource protocol.
pub struct Smpp;

struct SmppResource {
    target: Target,
    submit_timeout: Duration,
    source: Option<String>,
    max_parts: usize,
}

impl ResourceProtocol for Smpp {
    fn name(&self) -> &'static str {
        "smpp"
    }

    fn configure(&self, _resource: &str, section: &Section) -> Option<Arc<dyn Resource>> {
        let target = session::read_target(section, &[BindKind::Transmitter, BindKind::Transceiver]);
        let submit_timeout = section.duration("submit_timeout", Duration::from_secs(3600)).map(|v| v.value).unwrap_or(Duration::from_secs(30));
        let max_parts = section.integer("max_parts", 1, 255).map(|v| v.value as usize).unwrap_or(10);
        let source = match section.string("source") {
            Some(s) if s.value.len() >= pdu::ADDR_21 || s.value.is_empty() => {
                section.error("source", "must be 1 to 20 characters");
                return None;
            }
            Some(s) => Some(s.value),
            None => None,
        };
        Some(Arc::new(SmppResource { target: target?, submit_timeout, source, max_parts }))
    }
}

impl Resource for SmppResource {
    fn connect(&self) -> LocalBoxFuture<'static, Result<Box<dyn Connection>, Error>> {
        let target = self.target.clone();
        let (submit_timeout, source, max_parts) = (self.submit_timeout, self.source.clone(), self.max_parts);
        Box::pin(async move {
            let (session, _) = Session::connect(&target, false).await.map_err(Error::new)?;
            Ok(Box::new(SmppConnection { session, pending: Vec::new(), submit_timeout, source, max_parts }) as Box<dyn Connection>)
        })
    }

    fn default_pool_size(&self) -> usize {
        // SMSCs allow few binds per system_id; the window carries the parallel submits.
        2
    }
}

/// A message checked and encoded, waiting for the commit.
struct Outgoing {
    reference: String,
    parts: Vec<Pdu>,
}

struct SmppConnection {
    session: Session,
    pending: Vec<Outgoing>,
    submit_timeout: Duration,
    source: Option<String>,
    max_parts: usize,
}

impl Connection for SmppConnection {
    fn begin(&mut self) -> LocalBoxFuture<'_, Result<(), Error>> {
        self.pending.clear();
        Box::pin(async { Ok(()) })
    }

    fn call<'a>(&'a mut self, method: &'a str, args: Vec<Value>) -> LocalBoxFuture<'a, Result<Value, Error>> {
        Box::pin(async move {
            match method {
                "submit" => {
                    let [arg] = <[Value; 1]>::try_from(args).map_err(|a| Error::new(format!("submit{{...}} takes one table, got {} arguments", a.len())))?;
                    let parts = build(&arg, self.source.as_deref(), self.max_parts).map_err(|e| Error::new(format!("submit: {e}")))?;
                    let reference = new_reference();
                    let n = parts.len();
                    self.pending.push(Outgoing { reference: reference.clone(), parts });
                    Ok(Value::Map(vec![(Value::str("reference"), Value::str(reference)), (Value::str("parts"), Value::Int(n as i64))]))
                }
                "message_ids" => {
                    let reference = match args.first() {
                        Some(v @ Value::Str(_)) if args.len() == 1 => v.as_str().unwrap_or("").to_string(),
                        _ => return Err(Error::new("message_ids(reference) takes the reference string submit returned")),
                    };
                    Ok(match lock(ids()).get(&reference) {
                        Some((_, list)) => Value::Array(list.iter().map(|s| Value::str(s.as_str())).collect()),
                        None => Value::Nil,
                    })
                }
                other => Err(Error::new(format!("{other:?} is not a method of an smpp resource (methods: submit, message_ids)"))),
            }
        })
    }

    fn commit(&mut self) -> LocalBoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            let pending = std::mem::take(&mut self.pending);
            if pending.is_empty() {
                return Ok(());
            }
            let deadline = tokio::time::Instant::now() + self.submit_timeout;
            let session = &self.session;
            let all = pending.iter().map(|o| async move {
                let results = futures_util::future::join_all(o.parts.iter().map(|p| submit_part(session, p.clone(), deadline))).await;
                (o, results)
            });
            let done = futures_util::future::join_all(all).await;
            let mut first_error: Option<Error> = None;
            for (o, results) in done {
                let ids: Vec<String> = results.iter().filter_map(|r| r.as_ref().ok().cloned()).collect();
                if ids.len() == results.len() {
                    remember(&o.reference, ids);
                    continue;
                }
                let Some(Err(e)) = results.into_iter().find(|r| r.is_err()) else { continue };
                if first_error.is_none() {
                    let accepted =
                        if ids.is_empty() { String::new() } else { format!(" ({} of {} parts were accepted: {})", ids.len(), o.parts.len(), ids.join(", ")) };
                    let mut err = Error { message: format!("submit_sm at commit: {}{accepted}", e.message), ..e };
                    if self.session.ended().is_some() {
                        err.broken = true;
                    }
                    first_error = Some(err);
                }
                remember(&o.reference, ids);
            }
            match first_error {
                Some(e) => Err(e),
                None => Ok(()),
            }
        })
    }

    fn rollback(&mut self) -> LocalBoxFuture<'_, Result<(), Error>> {
        self.pending.clear();
        Box::pin(async { Ok(()) })
    }

    fn is_healthy(&mut self) -> LocalBoxFuture<'_, bool> {
        let ok = self.session.ended().is_none();
        Box::pin(async move { ok })
    }
}

/// Submits one part, waiting and trying again while the SMSC throttles, until `deadline`.
async fn submit_part(session: &Session, p: Pdu, deadline: tokio::time::Instant) -> Result<String, Error> {
    let mut wait = FIRST_THROTTLE_WAIT;
    loop {
        let resp = match tokio::time::timeout_at(deadline, session.request(p.clone())).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return Err(Error::broken(e)),
            Err(_) => return Err(Error::new(format!("{}: submit_timeout passed before the SMSC accepted the message", session.target.display))),
        };
        match resp.status {
            pdu::ESME_ROK => {
                return Ok(match resp.body {
                    Body::SmResp(Some(id), _) => String::from_utf8_lossy(&id).into_owned(),
                    _ => String::new(),
                })
            }
            pdu::ESME_RTHROTTLED | pdu::ESME_RMSGQFUL => {
                if tokio::time::Instant::now() + wait >= deadline {
                    return Err(Error::new(format!(
                        "{}: still throttled ({}) when submit_timeout ran out",
                        session.target.display,
                        pdu::status_name(resp.status)
                    ))
                    .with_code(format!("0x{:08x}", resp.status)));
                }
                tracing::debug!("{}: throttled, submitting again in {wait:?}", session.target.display);
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(MAX_THROTTLE_WAIT);
            }
            s => {
                return Err(
                    Error::new(format!("{}: the SMSC refused the message: {}", session.target.display, pdu::status_name(s))).with_code(format!("0x{s:08x}"))
                )
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

type Ids = Mutex<HashMap<String, (Instant, Vec<String>)>>;

/// Message ids of committed submits, by reference, for `message_ids` (in this process only).
fn ids() -> &'static Ids {
    static IDS: OnceLock<Ids> = OnceLock::new();
    IDS.get_or_init(Ids::default)
}

fn remember(reference: &str, list: Vec<String>) {
    let mut map = lock(ids());
    if map.len() >= IDS_MAX {
        map.retain(|_, (at, _)| at.elapsed() < IDS_KEPT);
        if map.len() >= IDS_MAX {
            // Still full of recent ones: the oldest tenth goes.
            let mut ages: Vec<(Instant, String)> = map.iter().map(|(k, (at, _))| (*at, k.clone())).collect();
            ages.sort();
            for (_, k) in ages.into_iter().take(IDS_MAX / 10) {
                map.remove(&k);
            }
        }
    }
    map.insert(reference.to_string(), (Instant::now(), list));
}

fn next_number() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

fn new_reference() -> String {
    format!("sms-{}-{}", std::process::id(), next_number())
}

fn field<'a>(t: &'a Value, key: &str) -> Option<&'a Value> {
    t.get(key).filter(|v| !matches!(v, Value::Nil))
}

fn text_field(t: &Value, key: &str) -> Result<Option<String>, String> {
    match field(t, key) {
        None => Ok(None),
        Some(v @ Value::Str(_)) => Ok(Some(v.as_str().ok_or_else(|| format!("{key} is not UTF-8 text"))?.to_string())),
        Some(Value::Int(i)) => Ok(Some(i.to_string())),
        Some(other) => Err(format!("{key} must be a string, got {}", other.type_name())),
    }
}

fn small_int(t: &Value, key: &str) -> Result<Option<u8>, String> {
    match field(t, key) {
        None => Ok(None),
        Some(Value::Int(i)) => u8::try_from(*i).map(Some).map_err(|_| format!("{key} must be 0..255")),
        Some(other) => Err(format!("{key} must be an integer, got {}", other.type_name())),
    }
}

/// An address as given: `+4912345` (international), `012345` (unknown type), or an
/// alphanumeric sender (`Shop`, allowed for `from` only).
fn address(given: &str, key: &str, alpha_ok: bool, ton: Option<u8>, npi: Option<u8>) -> Result<Address, String> {
    let digits = given.strip_prefix('+').unwrap_or(given);
    let numeric = !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit());
    let alphanumeric = alpha_ok && !given.is_empty() && given.bytes().all(|b| (0x20..0x7F).contains(&b));
    if !numeric && !alphanumeric {
        return Err(format!("{key} {given:?} is not a phone number{}", if alpha_ok { " or an alphanumeric sender" } else { "" }));
    }
    let (t, n, addr) = if !numeric {
        (5, 0, given)
    } else if given.starts_with('+') {
        (1, 1, digits)
    } else {
        (0, 1, digits)
    };
    if addr.len() >= pdu::ADDR_21 || (!numeric && addr.len() > 11) {
        return Err(format!("{key} {given:?} is too long (20 digits, or 11 characters for an alphanumeric sender)"));
    }
    Ok(Address { ton: ton.unwrap_or(t), npi: npi.unwrap_or(n), addr: addr.as_bytes().to_vec() })
}

/// The submit_sm PDUs of one `submit{...}` (sequence numbers set when sent).
pub fn build(arg: &Value, default_source: Option<&str>, max_parts: usize) -> Result<Vec<Pdu>, String> {
    let Value::Map(entries) = arg else { return Err(format!("takes a table such as {{to = \"+4912345\", text = \"hi\"}}, got {}", arg.type_name())) };
    const KNOWN: &[&str] = &["to", "from", "text", "bytes", "coding", "registered_delivery", "service_type", "to_ton", "to_npi", "from_ton", "from_npi"];
    for (k, _) in entries {
        let name = k.as_str().unwrap_or("?");
        if !KNOWN.contains(&name) {
            return Err(format!("unknown field {name:?} (fields: {})", KNOWN.join(", ")));
        }
    }
    let to = text_field(arg, "to")?.ok_or("to is required")?;
    let from = text_field(arg, "from")?.or(default_source.map(str::to_string)).ok_or("from is required (or set source in the resource's config)")?;
    let destination = address(&to, "to", false, small_int(arg, "to_ton")?, small_int(arg, "to_npi")?)?;
    let source = address(&from, "from", true, small_int(arg, "from_ton")?, small_int(arg, "from_npi")?)?;
    let coding = match text_field(arg, "coding")? {
        Some(c) => Coding::parse(&c)?,
        None => None,
    };
    let (coding, octets) = match (field(arg, "text"), field(arg, "bytes")) {
        (Some(_), Some(_)) => return Err("give text or bytes, not both".into()),
        (Some(t), None) => {
            let t = match t {
                Value::Str(_) => t.as_str().ok_or("text is not UTF-8; give binary data as bytes")?,
                other => return Err(format!("text must be a string, got {}", other.type_name())),
            };
            if t.len() > MAX_INPUT {
                return Err(format!("text is {} bytes, over {MAX_INPUT}", t.len()));
            }
            text::encode(t, coding)?
        }
        (None, Some(Value::Str(b))) => {
            if b.len() > MAX_INPUT {
                return Err(format!("bytes is {} bytes, over {MAX_INPUT}", b.len()));
            }
            (coding.unwrap_or(Coding::Binary), b.clone())
        }
        (None, Some(other)) => return Err(format!("bytes must be a string, got {}", other.type_name())),
        (None, None) => return Err("text (or bytes) is required".into()),
    };
    let registered_delivery = match field(arg, "registered_delivery") {
        None | Some(Value::Bool(false)) => 0,
        Some(Value::Bool(true)) => 1,
        Some(Value::Int(i)) => u8::try_from(*i).map_err(|_| "registered_delivery must be a boolean or 0..255")?,
        Some(other) => return Err(format!("registered_delivery must be a boolean, got {}", other.type_name())),
    };
    let service_type = text_field(arg, "service_type")?.unwrap_or_default();
    if service_type.len() >= pdu::SERVICE_TYPE {
        return Err("service_type is at most 5 characters".into());
    }
    let chunks = text::split(coding, &octets);
    if chunks.len() > max_parts {
        return Err(format!("the message needs {} parts, over max_parts ({max_parts})", chunks.len()));
    }
    let base = Sm { service_type: service_type.into_bytes(), source, destination, registered_delivery, data_coding: coding.data_coding(), ..Sm::default() };
    if chunks.len() == 1 {
        return Ok(vec![Pdu::new(pdu::SUBMIT_SM, 0, Body::Sm(Box::new(Sm { short_message: octets, ..base })))]);
    }
    let reference = (next_number() & 0xFF) as u8;
    let total = chunks.len() as u8;
    Ok(chunks
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let mut sm = text::udh(reference, total, i as u8 + 1).to_vec();
            sm.extend_from_slice(c);
            Pdu::new(pdu::SUBMIT_SM, 0, Body::Sm(Box::new(Sm { esm_class: pdu::ESM_UDHI, short_message: sm, ..base.clone() })))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn t(pairs: &[(&str, Value)]) -> Value {
        Value::Map(pairs.iter().map(|(k, v)| (Value::str(*k), v.clone())).collect())
    }

    #[test]
    fn submits_are_checked_and_split() {
        let one = build(&t(&[("to", Value::str("+4912345")), ("text", Value::str("hi"))]), Some("Shop"), 10).unwrap();
        let Body::Sm(sm) = &one[0].body else { panic!() };
        assert_eq!((sm.destination.ton, sm.destination.addr.as_slice()), (1, &b"4912345"[..]));
        assert_eq!((sm.source.ton, sm.data_coding, sm.short_message.as_slice()), (5, 0, &b"hi"[..]));
        let long = build(&t(&[("to", Value::str("123")), ("from", Value::str("456")), ("text", Value::str("Ж".repeat(100)))]), None, 10).unwrap();
        assert_eq!(long.len(), 2);
        let Body::Sm(p1) = &long[0].body else { panic!() };
        assert_eq!((p1.esm_class, p1.data_coding, &p1.short_message[..6]), (pdu::ESM_UDHI, 8, &text::udh(p1.short_message[3], 2, 1)[..]));
        assert!(build(&t(&[("to", Value::str("x1")), ("text", Value::str("a"))]), Some("S"), 10).unwrap_err().contains("not a phone number"));
        assert!(build(&t(&[("to", Value::str("1")), ("text", Value::str("a"))]), None, 10).unwrap_err().contains("from is required"));
        assert!(build(&t(&[("to", Value::str("1")), ("tex", Value::str("a"))]), Some("S"), 10).unwrap_err().contains("unknown field"));
        let e = build(&t(&[("to", Value::str("1")), ("text", Value::str("a".repeat(2000)))]), Some("S"), 10).unwrap_err();
        assert!(e.contains("over max_parts"), "{e}");
    }
}
