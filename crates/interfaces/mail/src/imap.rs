//! The `imap` interface: a cage polls a mailbox. Every message not yet handled is one request;
//! only after the handler returned (and its transactions committed) is the message marked
//! (`\Seen`), moved (`move_to`) or deleted (`delete`). New mail wakes the interface at once
//! through IDLE when the server has it, else the mailbox is polled. The IMAP client is
//! async-imap on the interface's own thread; TLS is rustls on ring. See docs/interfaces/imap.md
//! and docs/decisions/136-mail-in.md.
//!
//! ```toml
//! [interfaces.inbox]
//! protocol = "imap"
//! host = "imap.example.org"         # required
//! port = 993                        # default 993 with tls, 143 without
//! tls = true                        # imaps (TLS from the start); false: plain IMAP
//! ca = "ca.pem"                     # CA file for the server's certificate; default: the web's roots
//! user = "orders@example.org"       # required
//! password = "${IMAP_PASSWORD}"     # required
//! mailbox = "INBOX"
//! move_to = "Processed"             # after success: move there (created if missing) instead of \Seen
//! delete = false                    # after success: delete (expunge) instead of \Seen
//! max_attempts = 5                  # failed attempts before the message is set aside
//! failed_to = "Failed"              # where a message goes after max_attempts (created if
//!                                   # missing); without it the message stays unseen and is
//!                                   # skipped until the interface restarts
//! retry_delay = "30s"               # wait before a failed message is tried again, doubled each time, at most 1h
//! poll_interval = "60s"             # how often to look without IDLE
//! idle = true                       # use IDLE when the server announces it
//! idle_timeout = "25m"              # IDLE is renewed after this (servers end it at 30 min)
//! io_timeout = "60s"                # any one exchange with the server
//! max_message_size = "10MiB"        # bigger messages are set aside unread
//! max_parts = 100                   # MIME limits, as for the smtp interface
//! max_depth = 10
//! max_headers = 500
//! handler = "inbox.handle"          # default "<interface>.handle"
//! request_timeout = "30s"
//! ```
//!
//! The handler is `function M.handle(message)`, `message` as message.rs makes it with
//! `envelope = { mailbox, uid, uid_validity, attempt }`.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_imap::extensions::idle::IdleResponse;
use futures_util::TryStreamExt;
use rustomnic_core::{Section, Value};
use rustomnic_interface::consumer::{reconnecting, Outage};
use rustomnic_interface::{Host, Interface, InterfaceProtocol, InterfaceSpec, Request};
use rustomnic_resource::tls::{client_config, read_ca, CaFile, Verify};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::message::{self, Limits};

/// The keys of an imap interface (besides protocol, handler and request_timeout).
pub const KEYS: &[&str] = &[
    "host",
    "port",
    "tls",
    "ca",
    "user",
    "password",
    "mailbox",
    "move_to",
    "delete",
    "max_attempts",
    "failed_to",
    "retry_delay",
    "poll_interval",
    "idle",
    "idle_timeout",
    "io_timeout",
    "max_message_size",
    "max_parts",
    "max_depth",
    "max_headers",
];

/// The most a retry delay grows to.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(3600);

/// The `imap` protocol.
pub struct ImapProtocol;

/// What is done with a message after its handler succeeded.
#[derive(Debug, Clone, PartialEq, Eq)]
enum After {
    Seen,
    Move(String),
    Delete,
}

/// A configured imap interface.
pub struct ImapInterface {
    spec: InterfaceSpec,
    host: String,
    port: u16,
    tls: bool,
    ca: Option<CaFile>,
    user: String,
    password: String,
    mailbox: String,
    after: After,
    max_attempts: u32,
    failed_to: Option<String>,
    retry_delay: Duration,
    poll_interval: Duration,
    idle: bool,
    idle_timeout: Duration,
    io_timeout: Duration,
    limits: Limits,
}

/// A mailbox name as IMAP carries it: no control characters (async-imap quotes the rest).
fn check_mailbox(section: &Section, key: &str) -> Option<String> {
    let v = section.string(key)?;
    if v.value.is_empty() || v.value.len() > 255 || v.value.chars().any(|c| c.is_control()) {
        section.error(key, "must be a mailbox name such as \"Processed\"");
        return None;
    }
    Some(v.value)
}

impl InterfaceProtocol for ImapProtocol {
    fn name(&self) -> &'static str {
        "imap"
    }

    fn configure(&self, spec: InterfaceSpec, section: &Section) -> Option<Arc<dyn Interface>> {
        let required = |key: &str, example: &str| match section.string(key) {
            Some(v) if v.value.is_empty() => {
                section.error(key, "is empty (is the environment variable it names set?)");
                None
            }
            Some(v) => Some(v.value),
            None => {
                if !section.has(key) {
                    section.table_error(format!("{key} is required, e.g. {key} = {example}"));
                }
                None
            }
        };
        let host = required("host", "\"imap.example.org\"");
        let user = required("user", "\"orders@example.org\"");
        let password = required("password", "\"${IMAP_PASSWORD}\"");
        let tls = section.bool("tls").map(|v| v.value).unwrap_or(true);
        let port = section.integer("port", 1, 65535).map(|v| v.value as u16).unwrap_or(if tls { 993 } else { 143 });
        let ca = match read_ca(section, "ca") {
            Some(Ok(ca)) => Some(ca),
            Some(Err(())) => None,
            None => None,
        };
        if section.has("ca") && !tls {
            section.error("ca", "is only used with tls = true");
        }
        let mailbox = if section.has("mailbox") { check_mailbox(section, "mailbox") } else { Some("INBOX".into()) };
        let move_to = if section.has("move_to") { check_mailbox(section, "move_to") } else { None };
        let delete = section.bool("delete").map(|v| v.value).unwrap_or(false);
        let after = match (move_to, delete) {
            (Some(_), true) => {
                section.error("delete", "cannot be used with move_to: a message is either moved or deleted");
                After::Seen
            }
            (Some(m), false) => After::Move(m),
            (None, true) => After::Delete,
            (None, false) => After::Seen,
        };
        let max_attempts = section.integer("max_attempts", 1, 1000).map(|v| v.value as u32).unwrap_or(5);
        let failed_to = if section.has("failed_to") { check_mailbox(section, "failed_to") } else { None };
        let duration = |key: &str, max: u64, default: u64| {
            let d = section.duration(key, Duration::from_secs(max)).map(|v| v.value).unwrap_or(Duration::from_secs(default));
            if d.is_zero() {
                section.error(key, "must be more than zero");
            }
            d
        };
        let retry_delay = duration("retry_delay", 3600, 30);
        let poll_interval = duration("poll_interval", 86_400, 60);
        let idle = section.bool("idle").map(|v| v.value).unwrap_or(true);
        let idle_timeout = duration("idle_timeout", 29 * 60, 25 * 60);
        let io_timeout = duration("io_timeout", 3600, 60);
        let limits = crate::read_limits(section);
        Some(Arc::new(ImapInterface {
            spec,
            host: host?,
            port,
            tls,
            ca,
            user: user?,
            password: password?,
            mailbox: mailbox?,
            after,
            max_attempts,
            failed_to,
            retry_delay,
            poll_interval,
            idle,
            idle_timeout,
            io_timeout,
            limits,
        }))
    }
}

impl Interface for ImapInterface {
    fn spec(&self) -> &InterfaceSpec {
        &self.spec
    }

    fn start(self: Arc<Self>, host: Host) {
        let me = self.clone();
        rustomnic_interface::consumer::spawn(&self.spec, move || run(me, host));
    }
}

/// The connection async-imap talks over: plain TCP or TLS.
trait Io: AsyncRead + AsyncWrite + Unpin + Send + std::fmt::Debug {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + std::fmt::Debug> Io for T {}

type Session = async_imap::Session<Box<dyn Io>>;

/// The failed attempts of messages, kept across sessions (by UIDVALIDITY and UID).
#[derive(Default)]
struct Failures {
    uid_validity: Option<u32>,
    /// UID → (attempts so far, when to try again).
    tries: HashMap<u32, (u32, Instant)>,
    /// Set aside for the life of the interface (no failed_to, or it could not be moved).
    given_up: HashSet<u32>,
}

async fn run(iface: Arc<ImapInterface>, host: Host) {
    let failures = Mutex::new(Failures::default());
    reconnecting(&host, async |outage: &mut Outage| session(&iface, &host, &failures, outage).await).await;
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ImapInterface {
    fn who(&self) -> String {
        format!("imap {}:{} mailbox {:?}", self.host, self.port, self.mailbox)
    }

    /// Runs `f` within io_timeout.
    async fn io<T, E: std::fmt::Display>(&self, what: &str, f: impl std::future::Future<Output = Result<T, E>>) -> Result<T, String> {
        match tokio::time::timeout(self.io_timeout, f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(format!("{}: {what}: {e}", self.who())),
            Err(_) => Err(format!("{}: {what}: no answer within io_timeout ({:?})", self.who(), self.io_timeout)),
        }
    }

    async fn connect(&self) -> Result<Session, String> {
        let tcp = self.io("connect", TcpStream::connect((self.host.as_str(), self.port))).await?;
        let _ = tcp.set_nodelay(true);
        let stream: Box<dyn Io> = if self.tls {
            let config = client_config(Verify::Full, self.ca.as_ref()).map_err(|e| format!("{}: TLS settings: {e}", self.who()))?;
            let name = rustls::pki_types::ServerName::try_from(self.host.clone()).map_err(|e| format!("{}: {e}", self.who()))?;
            let tls = self.io("TLS handshake", tokio_rustls::TlsConnector::from(config).connect(name, tcp)).await?;
            Box::new(tls)
        } else {
            Box::new(tcp)
        };
        let mut client = async_imap::Client::new(stream);
        match self.io("greeting", client.read_response()).await? {
            Some(_) => {}
            None => return Err(format!("{}: closed before its greeting", self.who())),
        }
        let login = tokio::time::timeout(self.io_timeout, client.login(&self.user, &self.password)).await;
        match login {
            Ok(Ok(s)) => Ok(s),
            Ok(Err((e, _))) => Err(format!("{}: login as {:?}: {e}", self.who(), self.user)),
            Err(_) => Err(format!("{}: login: no answer within io_timeout", self.who())),
        }
    }
}

/// One connection: log in, select, then handle what is there and wait for more, until the
/// shutdown (Ok) or a failure (Err: the caller connects again with backoff).
async fn session(iface: &ImapInterface, host: &Host, failures: &Mutex<Failures>, outage: &mut Outage) -> Result<(), String> {
    let spec = host.spec();
    let mut shutdown = host.shutdown();
    let mut s = iface.connect().await?;
    let caps = iface.io("CAPABILITY", s.capabilities()).await?;
    let can_idle = iface.idle && caps.has_str("IDLE");
    let can_move = caps.has_str("MOVE");
    let can_uidplus = caps.has_str("UIDPLUS");
    // The mailboxes messages go to are created when missing (an error says they exist).
    for target in [
        match &iface.after {
            After::Move(m) => Some(m),
            _ => None,
        },
        iface.failed_to.as_ref(),
    ]
    .into_iter()
    .flatten()
    {
        let _ = iface.io("CREATE", s.create(target)).await;
        // A mailbox that cannot take messages is found now, before any handler runs: else
        // each message would be handled, fail to move, and be handled again after reconnecting.
        iface.io(&format!("STATUS of {target:?} (move_to / failed_to)"), s.status(target, "(MESSAGES)")).await?;
    }
    let mailbox = iface.io("SELECT", s.select(&iface.mailbox)).await?;
    {
        let mut f = lock(failures);
        if f.uid_validity != mailbox.uid_validity {
            // Other UIDs now: what was counted belongs to messages that may no longer be these.
            *f = Failures { uid_validity: mailbox.uid_validity, ..Failures::default() };
        }
    }
    match outage.end() {
        Some(d) => tracing::info!(cage = %spec.cage, interface = %spec.name, "{}: connected again after {:.1}s", iface.who(), d.as_secs_f64()),
        None => {
            tracing::info!(cage = %spec.cage, interface = %spec.name, "{}: connected{}", iface.who(), if can_idle { ", waiting with IDLE" } else { ", polling" })
        }
    }
    let ctx = Ctx { iface, host, failures, uid_validity: mailbox.uid_validity.unwrap_or(0), can_move, can_uidplus };
    loop {
        if *shutdown.borrow() {
            let _ = tokio::time::timeout(Duration::from_secs(2), s.logout()).await;
            return Ok(());
        }
        while s.unsolicited_responses.try_recv().is_ok() {}
        let next_retry = ctx.handle_all(&mut s, &mut shutdown).await?;
        if *shutdown.borrow() {
            continue;
        }
        let wait = next_retry.map(|t| t.saturating_duration_since(Instant::now())).unwrap_or(Duration::MAX);
        if can_idle {
            let mut handle = s.idle();
            iface.io("IDLE", handle.init()).await?;
            let limit = iface.idle_timeout.min(wait).max(Duration::from_millis(50));
            let (wait_fut, stop) = handle.wait_with_timeout(limit);
            let outcome = tokio::select! {
                r = wait_fut => Some(r),
                _ = shutdown.changed() => None,
            };
            drop(stop);
            if let Some(r) = outcome {
                match r {
                    Ok(IdleResponse::NewData(_)) | Ok(IdleResponse::Timeout) | Ok(IdleResponse::ManualInterrupt) => {}
                    Err(e) => return Err(format!("{}: IDLE: {e}", iface.who())),
                }
            }
            s = iface.io("DONE", handle.done()).await?;
        } else {
            let pause = iface.poll_interval.min(wait);
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = shutdown.changed() => {}
            }
            // A NOOP lets the server tell of new messages and shows the connection still works.
            iface.io("NOOP", s.noop()).await?;
        }
    }
}

/// What handling the messages of one session needs.
struct Ctx<'a> {
    iface: &'a ImapInterface,
    host: &'a Host,
    failures: &'a Mutex<Failures>,
    uid_validity: u32,
    can_move: bool,
    can_uidplus: bool,
}

impl Ctx<'_> {
    /// Handles every unseen message that is due, oldest first; when the next retry is due.
    async fn handle_all(&self, s: &mut Session, shutdown: &mut rustomnic_interface::Shutdown) -> Result<Option<Instant>, String> {
        let iface = self.iface;
        let found = iface.io("UID SEARCH", s.uid_search("UNSEEN UNDELETED")).await?;
        let mut uids: Vec<u32> = found.into_iter().collect();
        uids.sort_unstable();
        let mut next_retry: Option<Instant> = None;
        for uid in uids {
            if *shutdown.borrow() {
                break;
            }
            let attempt = {
                let f = lock(self.failures);
                if f.given_up.contains(&uid) {
                    continue;
                }
                match f.tries.get(&uid) {
                    Some((_, at)) if *at > Instant::now() => {
                        next_retry = Some(next_retry.map_or(*at, |r| r.min(*at)));
                        continue;
                    }
                    Some((n, _)) => n + 1,
                    None => 1,
                }
            };
            if let Some(at) = self.handle_one(s, uid, attempt).await? {
                next_retry = Some(next_retry.map_or(at, |r| r.min(at)));
            }
        }
        Ok(next_retry)
    }

    /// Fetches and handles one message; when it is to be tried again after a failure.
    async fn handle_one(&self, s: &mut Session, uid: u32, attempt: u32) -> Result<Option<Instant>, String> {
        let iface = self.iface;
        let spec = self.host.spec();
        // A partial fetch: a server never sends more than one byte over the limit.
        let query = format!("(UID RFC822.SIZE BODY.PEEK[]<0.{}>)", iface.limits.max_size + 1);
        let fetched: Vec<_> = iface.io("UID FETCH", async { s.uid_fetch(uid.to_string(), &query).await?.try_collect::<Vec<_>>().await }).await?;
        let Some(f) = fetched.iter().find(|f| f.uid == Some(uid)) else {
            // Gone meanwhile (another client moved or deleted it).
            return Ok(None);
        };
        let size = f.size.map(|n| n as usize).unwrap_or(0);
        let raw = f.body().unwrap_or_default();
        let envelope = Value::Map(vec![
            (Value::str("mailbox"), Value::str(iface.mailbox.clone())),
            (Value::str("uid"), Value::Int(uid as i64)),
            (Value::str("uid_validity"), Value::Int(self.uid_validity as i64)),
            (Value::str("attempt"), Value::Int(attempt as i64)),
        ]);
        let value = if size > iface.limits.max_size || raw.len() > iface.limits.max_size {
            Err(format!("the message is {} bytes, over max_message_size ({})", size.max(raw.len()), iface.limits.max_size))
        } else {
            message::to_value(raw, envelope, &iface.limits)
        };
        let m = match value {
            Ok(m) => m,
            // Refused by a limit: no attempt can do better, so it is set aside at once.
            Err(why) => {
                tracing::error!(cage = %spec.cage, interface = %spec.name, "{}: message UID {uid} cannot be handled: {why}", iface.who());
                return self.failed(s, uid, iface.max_attempts).await;
            }
        };
        let request = Request {
            handler: spec.handler.value.clone(),
            args: vec![m],
            deadline: Instant::now() + spec.request_timeout,
            parameters: Some(Value::Map(vec![(Value::str("attempt"), Value::Int(attempt as i64))])),
        };
        match self.host.run(request).await {
            Ok(_) => {
                lock(self.failures).tries.remove(&uid);
                self.settle(s, uid, &iface.after).await?;
                Ok(None)
            }
            Err(e) => {
                tracing::warn!(cage = %spec.cage, interface = %spec.name, "{}: message UID {uid}, attempt {attempt} of {}: {e}", iface.who(), iface.max_attempts);
                self.failed(s, uid, attempt).await
            }
        }
    }

    /// After a failed attempt: try again later, or set the message aside after the last one.
    async fn failed(&self, s: &mut Session, uid: u32, attempt: u32) -> Result<Option<Instant>, String> {
        let iface = self.iface;
        let spec = self.host.spec();
        if attempt >= iface.max_attempts {
            lock(self.failures).tries.remove(&uid);
            match &iface.failed_to {
                Some(to) => {
                    self.settle(s, uid, &After::Move(to.clone())).await?;
                    tracing::error!(cage = %spec.cage, interface = %spec.name, "{}: message UID {uid} moved to {to:?} after {attempt} failed attempts", iface.who());
                }
                None => {
                    lock(self.failures).given_up.insert(uid);
                    tracing::error!(cage = %spec.cage, interface = %spec.name, "{}: message UID {uid} left unseen after {attempt} failed attempts; it is skipped until the interface restarts (set failed_to to move such messages aside)", iface.who());
                }
            }
            return Ok(None);
        }
        let delay = iface.retry_delay.saturating_mul(1 << (attempt - 1).min(16)).min(MAX_RETRY_DELAY);
        let at = Instant::now() + delay;
        lock(self.failures).tries.insert(uid, (attempt, at));
        Ok(Some(at))
    }

    /// Marks, moves or deletes a message.
    async fn settle(&self, s: &mut Session, uid: u32, after: &After) -> Result<(), String> {
        let iface = self.iface;
        let set = uid.to_string();
        match after {
            After::Seen => {
                iface.io("UID STORE", async { s.uid_store(&set, "+FLAGS.SILENT (\\Seen)").await?.try_collect::<Vec<_>>().await }).await?;
            }
            After::Move(to) if self.can_move => iface.io("UID MOVE", s.uid_mv(&set, to)).await?,
            After::Move(to) => {
                iface.io("UID COPY", s.uid_copy(&set, to)).await?;
                self.expunge(s, &set).await?;
            }
            After::Delete => self.expunge(s, &set).await?,
        }
        Ok(())
    }

    /// Deletes one message: `\Deleted`, then UID EXPUNGE (UIDPLUS), or EXPUNGE without it.
    async fn expunge(&self, s: &mut Session, set: &str) -> Result<(), String> {
        let iface = self.iface;
        iface.io("UID STORE", async { s.uid_store(set, "+FLAGS.SILENT (\\Deleted)").await?.try_collect::<Vec<_>>().await }).await?;
        if self.can_uidplus {
            iface.io("UID EXPUNGE", async { s.uid_expunge(set).await?.try_collect::<Vec<_>>().await }).await?;
        } else {
            iface.io("EXPUNGE", async { s.expunge().await?.try_collect::<Vec<_>>().await }).await?;
        }
        Ok(())
    }
}
