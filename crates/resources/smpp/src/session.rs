//! A bound SMPP session with an SMSC, shared by the smpp resource and interface: the target read
//! from config, connecting and binding, then a task that owns the socket. The task answers the
//! SMSC's enquire_link, sends its own at an interval when the link is quiet (a missing answer ends
//! the session), matches responses to requests by sequence number, keeps at most `window`
//! requests unanswered, hands the SMSC's deliver_sm and data_sm to the owner (or refuses them
//! with a temporary error when the owner takes none or is full), answers a malformed PDU with
//! generic_nack and ends at a bad command_length, a closed socket or an unbind.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustomnic_core::Section;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::pdu::{self, Bind, Body, Pdu, PduError};

/// How a session binds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindKind {
    Transmitter,
    Receiver,
    Transceiver,
}

impl BindKind {
    fn command(self) -> u32 {
        match self {
            BindKind::Transmitter => pdu::BIND_TRANSMITTER,
            BindKind::Receiver => pdu::BIND_RECEIVER,
            BindKind::Transceiver => pdu::BIND_TRANSCEIVER,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            BindKind::Transmitter => "transmitter",
            BindKind::Receiver => "receiver",
            BindKind::Transceiver => "transceiver",
        }
    }
}

/// Where and as whom to bind, and the session's timings.
#[derive(Debug, Clone)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub system_id: String,
    pub password: String,
    pub system_type: String,
    pub bind: BindKind,
    /// How often the link is checked when quiet.
    pub enquire_link: Duration,
    /// How long a response may take (bind, enquire_link, submit_sm).
    pub response_timeout: Duration,
    /// Requests unanswered at once, each way.
    pub window: usize,
    /// `system_id@host:port`, for messages (never the password).
    pub display: String,
}

/// The keys of a target, read by both the resource and the interface.
pub const TARGET_KEYS: &[&str] = &["host", "port", "system_id", "password", "system_type", "bind", "enquire_link", "response_timeout", "window"];

/// Reads a target from `section`; `binds` are the bind kinds allowed (the first is the default).
/// Problems are recorded in the section.
pub fn read_target(section: &Section, binds: &[BindKind]) -> Option<Target> {
    let host = section.string("host").map(|v| v.value);
    if host.is_none() && !section.has("host") {
        section.table_error("host is required, e.g. host = \"smsc.example.net\"");
    }
    let port = section.integer("port", 1, 65_535).map(|v| v.value as u16).unwrap_or(2775);
    let system_id = text_key(section, "system_id", pdu::SYSTEM_ID, true);
    let password = text_key(section, "password", pdu::PASSWORD, false);
    let system_type = text_key(section, "system_type", pdu::SYSTEM_TYPE, false);
    let default = binds.first().copied().unwrap_or(BindKind::Transmitter);
    let bind = match section.string("bind") {
        Some(b) => match binds.iter().find(|k| k.name() == b.value) {
            Some(k) => Some(*k),
            None => {
                let names: Vec<&str> = binds.iter().map(|k| k.name()).collect();
                section.error("bind", format!("{:?} is not one of {}", b.value, names.join(", ")));
                None
            }
        },
        None if section.has("bind") => None,
        None => Some(default),
    };
    let enquire_link = section.duration("enquire_link", Duration::from_secs(3600)).map(|v| v.value).unwrap_or(Duration::from_secs(30));
    let response_timeout = section.duration("response_timeout", Duration::from_secs(600)).map(|v| v.value).unwrap_or(Duration::from_secs(10));
    let window = section.integer("window", 1, 1000).map(|v| v.value as usize).unwrap_or(10);
    let (Some(host), Some(system_id), Some(password), Some(system_type), Some(bind)) = (host, system_id, password, system_type, bind) else { return None };
    if host.is_empty() {
        section.error("host", "is empty");
        return None;
    }
    let display = format!("{system_id}@{host}:{port}");
    let enquire_link = if enquire_link.is_zero() { Duration::from_secs(30) } else { enquire_link };
    let response_timeout = if response_timeout.is_zero() { Duration::from_secs(10) } else { response_timeout };
    Some(Target { host, port, system_id, password, system_type, bind, enquire_link, response_timeout, window, display })
}

/// A printable ASCII key of at most `size - 1` octets (its spec length).
fn text_key(section: &Section, key: &str, size: usize, required: bool) -> Option<String> {
    match section.string(key) {
        Some(v) => {
            if v.value.len() >= size || !v.value.bytes().all(|b| (0x20..0x7F).contains(&b)) {
                // The value itself stays out of the message: it may be a password.
                section.error(key, format!("must be printable ASCII of at most {} characters (SMPP 3.4)", size - 1));
                None
            } else {
                Some(v.value)
            }
        }
        None if section.has(key) => None,
        None if required => {
            section.table_error(format!("{key} is required"));
            None
        }
        None => Some(String::new()),
    }
}

/// A request from the SMSC (deliver_sm, data_sm) for the owner, who must answer it with
/// [`Session::respond`].
pub type Incoming = mpsc::Receiver<Pdu>;

enum Cmd {
    Request(Pdu, oneshot::Sender<Result<Pdu, String>>),
    Respond(Pdu),
    Unbind,
}

/// A bound session: a handle to the task that owns the socket. Dropping every handle unbinds.
#[derive(Clone)]
pub struct Session {
    tx: mpsc::Sender<Cmd>,
    window: Arc<Semaphore>,
    ended: Arc<Mutex<Option<String>>>,
    closed: Arc<tokio::sync::Notify>,
    pub target: Arc<Target>,
    /// The SMSC's system_id from the bind response.
    pub smsc: String,
}

impl Session {
    /// Connects and binds within `target.response_timeout` (plus the TCP connect). With
    /// `incoming`, the SMSC's deliver_sm and data_sm go there (at most `window` waiting);
    /// without, they are refused with ESME_RX_T_APPN so the SMSC delivers them later.
    pub async fn connect(target: &Target, take_incoming: bool) -> Result<(Session, Option<Incoming>), String> {
        let t = target.response_timeout;
        let stream = match tokio::time::timeout(t, TcpStream::connect((target.host.as_str(), target.port))).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(format!("cannot connect to {}: {e}", target.display)),
            Err(_) => return Err(format!("cannot connect to {}: no answer within {t:?}", target.display)),
        };
        let _ = stream.set_nodelay(true);
        let (r, w) = stream.into_split();
        let mut reader = Reader { half: r, buf: Vec::new(), display: target.display.clone() };
        let mut writer = Writer { half: w, display: target.display.clone() };
        let bind = Pdu::new(
            target.bind.command(),
            1,
            Body::Bind(Bind {
                system_id: target.system_id.clone().into_bytes(),
                password: target.password.clone().into_bytes(),
                system_type: target.system_type.clone().into_bytes(),
                interface_version: 0x34,
                ..Bind::default()
            }),
        );
        writer.send(&bind).await?;
        let kind = target.bind.name();
        let answer = async {
            loop {
                let p = reader.next().await?;
                if p.sequence == 1 && p.command_id == bind.command_id | pdu::RESP {
                    return Ok::<Pdu, String>(p);
                }
                if p.command_id == pdu::GENERIC_NACK {
                    return Err(format!("{}: bind_{kind} answered with generic_nack, {}", target.display, pdu::status_name(p.status)));
                }
                if p.command_id == pdu::ENQUIRE_LINK {
                    writer.send(&p.response(pdu::ESME_ROK, Body::Empty)).await?;
                }
            }
        };
        let resp = match tokio::time::timeout(t, answer).await {
            Ok(r) => r?,
            Err(_) => return Err(format!("{}: no answer to bind_{kind} within {t:?}", target.display)),
        };
        if resp.status != pdu::ESME_ROK {
            return Err(format!("{}: bind_{kind} refused by the SMSC: {}", target.display, pdu::status_name(resp.status)));
        }
        let smsc = match &resp.body {
            Body::BindResp(Some(id), _) => String::from_utf8_lossy(id).into_owned(),
            _ => String::new(),
        };
        let (tx, rx) = mpsc::channel(target.window.max(1) * 2 + 4);
        let (in_tx, in_rx) = if take_incoming {
            let (a, b) = mpsc::channel(target.window.max(1));
            (Some(a), Some(b))
        } else {
            (None, None)
        };
        let ended = Arc::new(Mutex::new(None));
        let closed = Arc::new(tokio::sync::Notify::new());
        let target = Arc::new(target.clone());
        let task = Task { reader, writer, rx, incoming: in_tx, pending: HashMap::new(), next_seq: 2, target: target.clone() };
        let (e2, c2) = (ended.clone(), closed.clone());
        tokio::spawn(async move {
            let why = task.run().await;
            *lock(&e2) = Some(why);
            c2.notify_waiters();
            c2.notify_one();
        });
        let window = Arc::new(Semaphore::new(target.window.max(1)));
        Ok((Session { tx, window, ended, closed, target, smsc }, in_rx))
    }

    /// Why the session ended, once it has.
    pub fn ended(&self) -> Option<String> {
        lock(&self.ended).clone()
    }

    /// Waits until the session has ended and says why.
    pub async fn wait_ended(&self) -> String {
        loop {
            let notified = self.closed.notified();
            if let Some(e) = self.ended() {
                return e;
            }
            notified.await;
        }
    }

    /// Sends a request (its sequence number is set here) and waits for its response, within the
    /// window and `response_timeout`. A response with an error status is returned as it is.
    pub async fn request(&self, p: Pdu) -> Result<Pdu, String> {
        let name = p.name();
        let display = &self.target.display;
        let _permit = self.window.acquire().await.map_err(|_| format!("{display}: the session is closed"))?;
        let (tx, rx) = oneshot::channel();
        self.tx.send(Cmd::Request(p, tx)).await.map_err(|_| self.gone())?;
        match tokio::time::timeout(self.target.response_timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(self.gone()),
            Err(_) => Err(format!("{display}: no {name}_resp within response_timeout ({:?})", self.target.response_timeout)),
        }
    }

    /// Sends a response to a request of the SMSC.
    pub async fn respond(&self, p: Pdu) -> Result<(), String> {
        self.tx.send(Cmd::Respond(p)).await.map_err(|_| self.gone())
    }

    /// Unbinds (waiting briefly for unbind_resp) and ends the session, for every handle.
    pub async fn unbind(&self) {
        if self.tx.send(Cmd::Unbind).await.is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(2), self.wait_ended()).await;
        }
    }

    fn gone(&self) -> String {
        self.ended().unwrap_or_else(|| format!("{}: the session ended", self.target.display))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// PDUs from the SMSC.
pub struct Reader {
    half: OwnedReadHalf,
    buf: Vec<u8>,
    display: String,
}

impl Reader {
    /// Reads PDUs from `half`; `display` names the peer in errors.
    pub fn new(half: OwnedReadHalf, display: String) -> Reader {
        Reader { half, buf: Vec::new(), display }
    }

    /// The next PDU. A malformed body is returned as `Err` with its sequence in the message's
    /// [`PduError`] through [`Reader::next_or_bad`]; here any error ends the stream.
    pub async fn next(&mut self) -> Result<Pdu, String> {
        match self.next_or_bad().await? {
            Ok(p) => Ok(p),
            Err(e) => Err(format!("{}: {e}", self.display)),
        }
    }

    /// The next PDU, or a PDU whose body did not decode (the stream goes on after it); `Err` for
    /// what ends the stream (closed, cut mid-PDU, a bad command_length).
    pub async fn next_or_bad(&mut self) -> Result<Result<Pdu, PduError>, String> {
        loop {
            match pdu::peek_length(&self.buf) {
                Err(e) => return Err(format!("{}: {e}", self.display)),
                Ok(Some(len)) if self.buf.len() >= len => {
                    let r = pdu::decode_one(&self.buf[..len]);
                    self.buf.drain(..len);
                    return Ok(r);
                }
                Ok(_) => {}
            }
            let mut chunk = [0u8; 8192];
            let n = self.half.read(&mut chunk).await.map_err(|e| format!("{}: reading failed: {e}", self.display))?;
            if n == 0 {
                return Err(if self.buf.is_empty() {
                    format!("{}: the peer closed the connection", self.display)
                } else {
                    format!("{}: the peer closed the connection in the middle of a PDU ({} bytes of it read)", self.display, self.buf.len())
                });
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// PDUs to the SMSC.
pub struct Writer {
    half: OwnedWriteHalf,
    display: String,
}

impl Writer {
    pub fn new(half: OwnedWriteHalf, display: String) -> Writer {
        Writer { half, display }
    }

    pub async fn send(&mut self, p: &Pdu) -> Result<(), String> {
        let bytes = p.encode().map_err(|e| format!("{}: cannot encode {}: {e}", self.display, p.name()))?;
        self.half.write_all(&bytes).await.map_err(|e| format!("{}: writing failed: {e}", self.display))
    }
}

struct Task {
    reader: Reader,
    writer: Writer,
    rx: mpsc::Receiver<Cmd>,
    incoming: Option<mpsc::Sender<Pdu>>,
    pending: HashMap<u32, oneshot::Sender<Result<Pdu, String>>>,
    next_seq: u32,
    target: Arc<Target>,
}

impl Task {
    fn seq(&mut self) -> u32 {
        let s = self.next_seq;
        // Sequence numbers run 1..=0x7FFFFFFF (SMPP 3.4 section 3.2).
        self.next_seq = if s >= 0x7FFF_FFFF { 1 } else { s + 1 };
        s
    }

    /// Runs until the session ends; says why.
    async fn run(mut self) -> String {
        let display = self.target.display.clone();
        let quiet = self.target.enquire_link;
        let mut heard = tokio::time::Instant::now();
        // The sequence number of our enquire_link awaiting its answer, and since when.
        let mut probe: Option<(u32, tokio::time::Instant)> = None;
        let why = loop {
            let probe_due = match probe {
                Some((_, since)) => since + self.target.response_timeout,
                None => heard + quiet,
            };
            tokio::select! {
                cmd = self.rx.recv() => match cmd {
                    None | Some(Cmd::Unbind) => {
                        // Every handle is gone: unbind politely, briefly.
                        let seq = self.seq();
                        let _ = self.writer.send(&Pdu::new(pdu::UNBIND, seq, Body::Empty)).await;
                        let _ = tokio::time::timeout(Duration::from_secs(1), async {
                            while let Ok(p) = self.reader.next().await {
                                if p.command_id == pdu::UNBIND | pdu::RESP {
                                    break;
                                }
                            }
                        }).await;
                        break format!("{display}: unbound");
                    }
                    Some(Cmd::Request(mut p, reply)) => {
                        p.sequence = self.seq();
                        if let Err(e) = self.writer.send(&p).await {
                            let _ = reply.send(Err(e.clone()));
                            break e;
                        }
                        self.pending.retain(|_, r| !r.is_closed());
                        self.pending.insert(p.sequence, reply);
                    }
                    Some(Cmd::Respond(p)) => {
                        if let Err(e) = self.writer.send(&p).await {
                            break e;
                        }
                    }
                },
                _ = tokio::time::sleep_until(probe_due) => match probe {
                    Some(_) => break format!("{display}: no enquire_link_resp within {:?}; the link is dead", self.target.response_timeout),
                    None => {
                        let seq = self.seq();
                        if let Err(e) = self.writer.send(&Pdu::new(pdu::ENQUIRE_LINK, seq, Body::Empty)).await {
                            break e;
                        }
                        probe = Some((seq, tokio::time::Instant::now()));
                    }
                },
                next = self.reader.next_or_bad() => {
                    heard = tokio::time::Instant::now();
                    let p = match next {
                        Err(e) => break e,
                        Ok(Err(bad)) => {
                            tracing::warn!("{}: a malformed PDU answered with generic_nack: {bad}", self.target.display);
                            let nack = Pdu { command_id: pdu::GENERIC_NACK, status: bad.status, sequence: bad.sequence.unwrap_or(0), body: Body::Empty };
                            if let Err(e) = self.writer.send(&nack).await {
                                break e;
                            }
                            continue;
                        }
                        Ok(Ok(p)) => p,
                    };
                    if let Err(e) = self.take(p, &mut probe).await {
                        break e;
                    }
                    if probe.is_none() {
                        heard = tokio::time::Instant::now();
                    }
                }
            }
        };
        for (_, reply) in self.pending.drain() {
            let _ = reply.send(Err(why.clone()));
        }
        why
    }

    /// Handles one PDU from the SMSC; `Err` ends the session.
    async fn take(&mut self, p: Pdu, probe: &mut Option<(u32, tokio::time::Instant)>) -> Result<(), String> {
        let display = &self.target.display;
        if p.is_response() {
            if p.command_id == pdu::ENQUIRE_LINK | pdu::RESP && probe.is_some_and(|(s, _)| s == p.sequence) {
                *probe = None;
                return Ok(());
            }
            if p.command_id == pdu::GENERIC_NACK {
                let Some(reply) = self.pending.remove(&p.sequence) else {
                    return Err(format!("{display}: generic_nack from the SMSC: {}", pdu::status_name(p.status)));
                };
                let _ = reply.send(Err(format!("{display}: the SMSC answered generic_nack: {}", pdu::status_name(p.status))));
                return Ok(());
            }
            if p.command_id == pdu::UNBIND | pdu::RESP {
                return Err(format!("{display}: the SMSC ended the session (unbind_resp)"));
            }
            if let Some(reply) = self.pending.remove(&p.sequence) {
                let _ = reply.send(Ok(p));
            }
            return Ok(());
        }
        match p.command_id {
            pdu::ENQUIRE_LINK => self.writer.send(&p.response(pdu::ESME_ROK, Body::Empty)).await,
            pdu::UNBIND => {
                let _ = self.writer.send(&p.response(pdu::ESME_ROK, Body::Empty)).await;
                Err(format!("{display}: the SMSC unbound the session"))
            }
            pdu::DELIVER_SM | pdu::DATA_SM => {
                let refuse = |status| p.response(status, Body::SmResp(Some(Vec::new()), Vec::new()));
                match &self.incoming {
                    Some(tx) => match tx.try_send(p.clone()) {
                        Ok(()) => Ok(()),
                        // More than the window: the SMSC is asked to slow down.
                        Err(mpsc::error::TrySendError::Full(_)) => self.writer.send(&refuse(pdu::ESME_RTHROTTLED)).await,
                        Err(mpsc::error::TrySendError::Closed(_)) => self.writer.send(&refuse(pdu::ESME_RX_T_APPN)).await,
                    },
                    None => self.writer.send(&refuse(pdu::ESME_RX_T_APPN)).await,
                }
            }
            _ => {
                let nack = Pdu { command_id: pdu::GENERIC_NACK, status: pdu::ESME_RINVCMDID, sequence: p.sequence, body: Body::Empty };
                self.writer.send(&nack).await
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;
    use tokio::net::TcpListener;

    fn target(port: u16, window: usize, enquire_link: Duration) -> Target {
        Target {
            host: "127.0.0.1".into(),
            port,
            system_id: "t".into(),
            password: "p".into(),
            system_type: String::new(),
            bind: BindKind::Transmitter,
            enquire_link,
            response_timeout: Duration::from_millis(500),
            window,
            display: format!("t@127.0.0.1:{port}"),
        }
    }

    /// Accepts one ESME, answers its bind, and gives the socket halves.
    async fn accept_bound(l: &TcpListener) -> (Reader, Writer) {
        let (s, _) = l.accept().await.unwrap();
        let (r, w) = s.into_split();
        let mut reader = Reader { half: r, buf: Vec::new(), display: "esme".into() };
        let mut writer = Writer { half: w, display: "esme".into() };
        let bind = reader.next().await.unwrap();
        assert_eq!(bind.command_id, pdu::BIND_TRANSMITTER);
        writer.send(&bind.response(pdu::ESME_ROK, Body::BindResp(Some(b"smsc".to_vec()), vec![]))).await.unwrap();
        (reader, writer)
    }

    #[tokio::test]
    async fn no_more_than_the_window_is_unanswered() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let smsc = tokio::spawn(async move {
            let (mut r, mut w) = accept_bound(&l).await;
            let mut answered = 0;
            while answered < 7 {
                // Whatever is sent arrives within the wait; no more than the window may.
                let mut got = Vec::new();
                while let Ok(p) = tokio::time::timeout(Duration::from_millis(150), r.next()).await {
                    got.push(p.unwrap());
                }
                assert!(!got.is_empty() && got.len() <= 3, "{} unanswered at once", got.len());
                for p in got {
                    answered += 1;
                    w.send(&p.response(pdu::ESME_ROK, Body::SmResp(Some(format!("id{}", p.sequence).into_bytes()), vec![]))).await.unwrap();
                }
            }
        });
        let (session, _) = Session::connect(&target(port, 3, Duration::from_secs(60)), false).await.unwrap();
        assert_eq!(session.smsc, "smsc");
        let submits = (0..7).map(|_| session.request(Pdu::new(pdu::SUBMIT_SM, 0, Body::Sm(Box::default()))));
        let answers = futures_util::future::join_all(submits).await;
        assert!(answers.iter().all(|a| matches!(a, Ok(p) if p.status == pdu::ESME_ROK)), "{answers:?}");
        smsc.await.unwrap();
    }

    #[tokio::test]
    async fn a_silent_smsc_ends_the_session_and_a_refused_bind_is_named() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let smsc = tokio::spawn(async move {
            let (mut r, _w) = accept_bound(&l).await;
            // Reads the enquire_link and never answers it.
            let p = r.next().await.unwrap();
            assert_eq!(p.command_id, pdu::ENQUIRE_LINK);
            let _ = r.next().await;
            // Then refuses a bind.
            let (s, _) = l.accept().await.unwrap();
            let (r2, w2) = s.into_split();
            let mut r2 = Reader { half: r2, buf: Vec::new(), display: "esme".into() };
            let mut w2 = Writer { half: w2, display: "esme".into() };
            let bind = r2.next().await.unwrap();
            w2.send(&bind.response(pdu::ESME_RINVSYSID, Body::BindResp(None, vec![]))).await.unwrap();
        });
        let t = target(port, 1, Duration::from_millis(100));
        let (session, _) = Session::connect(&t, false).await.unwrap();
        let why = tokio::time::timeout(Duration::from_secs(5), session.wait_ended()).await.unwrap();
        assert!(why.contains("no enquire_link_resp within 500ms"), "{why}");
        assert!(session.request(Pdu::new(pdu::SUBMIT_SM, 0, Body::Sm(Box::default()))).await.unwrap_err().contains("no enquire_link_resp"));
        let e = Session::connect(&t, false).await.err().unwrap();
        assert!(e.contains("bind_transmitter refused by the SMSC: ESME_RINVSYSID"), "{e}");
        smsc.await.unwrap();
    }
}
