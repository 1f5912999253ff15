//! The `smtp` interface: receives mail over ESMTP (RFC 5321, with 8BITMIME, PIPELINING, SIZE,
//! ENHANCEDSTATUSCODES and STARTTLS), each message one request; the reply to DATA waits for the
//! handler, so a sender learns at once whether the message was taken (250) or must be sent again
//! later (451). See docs/interfaces/smtp.md and docs/decisions/136-mail-in.md.
//!
//! ```toml
//! [interfaces.inbox]
//! protocol = "smtp"
//! listen = "0.0.0.0:2525"             # required
//! hostname = "mx.example.org"         # in the greeting and the EHLO reply; default: this machine's name
//! accept_domains = ["example.org"]    # recipients' domains taken (others: 550); default: any
//! accept_recipients = ["a@b.org"]     # whole addresses taken besides those domains
//! max_recipients = 100                # RCPT TO per message; more get 452
//! max_message_size = "10MiB"          # announced by SIZE; bigger messages get 552
//! max_parts = 100                     # MIME parts, containers and nested messages counted
//! max_depth = 10                      # how deep multiparts nest
//! max_headers = 500                   # header fields of the message and of each part
//! max_line_length = 1000              # a command line longer than this gets 500
//! max_errors = 10                     # bad commands before the session is closed (421)
//! max_connections = 100               # sessions at once; more are told 421 and closed
//! idle_timeout = "5m"                 # waiting for a command or for DATA bytes
//! session_timeout = "30m"             # a whole session
//! tls = { cert = "cert.pem", key = "key.pem" }   # offers STARTTLS (keys of the http interface's tls table)
//! require_tls = false                 # MAIL only after STARTTLS (needs tls)
//! handler = "inbox.handle"            # default "<interface>.handle"
//! request_timeout = "30s"             # the handler's deadline; the sender waits for it
//! ```
//!
//! The handler is `function M.handle(message)`, `message` as message.rs makes it with
//! `envelope = { mail_from, rcpt_to = {...}, helo, remote_addr, tls }`. Returned: the reply is
//! `250 2.0.0 Ok: queued as <request id>`. Failed or past its deadline: `451 4.3.0` with the
//! request id (the sender tries again later). A message over a MIME limit: `554 5.6.0`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use futures_util::future::LocalBoxFuture;
use rustomnic_core::{Located, Section, Value};
use rustomnic_http::tls::{read_tls, TlsOptions, TlsServer};
use rustomnic_interface::{Interface, InterfaceProtocol, InterfaceSpec, Shutdown};
use rustomnic_lua::{worker, RequestCtx, RunError};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::message::{self, Limits};
use crate::wire::{self, Command, DataDecoder, Fed, Line, Lines};

/// The keys of an smtp interface (besides protocol, handler and request_timeout).
pub const KEYS: &[&str] = &[
    "listen",
    "hostname",
    "accept_domains",
    "accept_recipients",
    "max_recipients",
    "max_message_size",
    "max_parts",
    "max_depth",
    "max_headers",
    "max_line_length",
    "max_errors",
    "max_connections",
    "idle_timeout",
    "session_timeout",
    "tls",
    "require_tls",
];

/// The `smtp` protocol.
pub struct SmtpProtocol;

/// A configured smtp interface.
pub struct SmtpInterface {
    spec: InterfaceSpec,
    listen: Located<SocketAddr>,
    hostname: String,
    accept_domains: Vec<String>,
    accept_recipients: Vec<String>,
    max_recipients: usize,
    limits: Limits,
    max_line_length: usize,
    max_errors: usize,
    max_connections: usize,
    idle_timeout: Duration,
    session_timeout: Duration,
    tls_options: Option<TlsOptions>,
    require_tls: bool,
    tls: OnceLock<Option<Arc<TlsServer>>>,
    open: Arc<AtomicUsize>,
    /// The second (Unix time) a refused connection was last logged.
    refused_logged: AtomicU64,
}

fn machine_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").ok().map(|h| h.trim().to_string()).filter(|h| !h.is_empty()).unwrap_or_else(|| "localhost".into())
}

impl InterfaceProtocol for SmtpProtocol {
    fn name(&self) -> &'static str {
        "smtp"
    }

    fn configure(&self, spec: InterfaceSpec, section: &Section) -> Option<Arc<dyn Interface>> {
        let listen = rustomnic_interface::read_listen(section);
        let hostname = match section.string("hostname") {
            Some(h) if h.value.is_empty() || h.value.chars().any(|c| c.is_whitespace() || c.is_control()) => {
                section.error("hostname", "must be a host name such as \"mx.example.org\"");
                machine_name()
            }
            Some(h) => h.value,
            None => machine_name(),
        };
        let lower = |key: &str| section.strings(key).map(|v| v.value.into_iter().map(|d| d.to_ascii_lowercase()).collect::<Vec<_>>()).unwrap_or_default();
        let accept_domains = lower("accept_domains");
        let accept_recipients = lower("accept_recipients");
        let max_recipients = section.integer("max_recipients", 1, 10_000).map(|v| v.value as usize).unwrap_or(100);
        let limits = crate::read_limits(section);
        let max_line_length = section.integer("max_line_length", 512, 1 << 20).map(|v| v.value as usize).unwrap_or(1000);
        let max_errors = section.integer("max_errors", 1, 1000).map(|v| v.value as usize).unwrap_or(10);
        let max_connections = section.integer("max_connections", 1, 100_000).map(|v| v.value as usize).unwrap_or(100);
        let duration = |key: &str, default: u64| {
            let d = section.duration(key, Duration::from_secs(86_400)).map(|v| v.value).unwrap_or(Duration::from_secs(default));
            if d.is_zero() {
                section.error(key, "must be more than zero");
            }
            d
        };
        let idle_timeout = duration("idle_timeout", 300);
        let session_timeout = duration("session_timeout", 1800);
        let tls = read_tls(section, "tls", false);
        let require_tls = section.bool("require_tls").map(|v| v.value).unwrap_or(false);
        if require_tls && tls.is_none() {
            section.error("require_tls", "needs a tls table (cert and key) to offer STARTTLS with");
        }
        let tls_options = match tls {
            None => None,
            Some(Ok(mut o)) => {
                // SMTP clients send no ALPN; an offered http/1.1 would only confuse one that does.
                o.alpn.clear();
                Some(o)
            }
            Some(Err(())) => return None,
        };
        Some(Arc::new(SmtpInterface {
            spec,
            listen: listen?,
            hostname,
            accept_domains,
            accept_recipients,
            max_recipients,
            limits,
            max_line_length,
            max_errors,
            max_connections,
            idle_timeout,
            session_timeout,
            tls_options,
            require_tls,
            tls: OnceLock::new(),
            open: Arc::new(AtomicUsize::new(0)),
            refused_logged: AtomicU64::new(0),
        }))
    }
}

impl Interface for SmtpInterface {
    fn spec(&self) -> &InterfaceSpec {
        &self.spec
    }

    fn listen(&self) -> Option<Located<SocketAddr>> {
        Some(self.listen.clone())
    }

    fn serve(self: Arc<Self>, stream: TcpStream, remote: SocketAddr, shutdown: Shutdown) -> LocalBoxFuture<'static, ()> {
        Box::pin(async move {
            if let Err(e) = self.connection(stream, remote, shutdown).await {
                tracing::debug!(cage = %self.spec.cage, interface = %self.spec.name, "session with {remote}: {e}");
            }
        })
    }
}

/// A place among the open sessions, left when dropped.
struct Open(Arc<AtomicUsize>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How a session part ended.
enum End {
    Close,
    /// STARTTLS was accepted: the handshake comes next.
    StartTls,
}

/// The state of one SMTP session.
struct Session<'a> {
    iface: &'a SmtpInterface,
    remote: SocketAddr,
    deadline: Instant,
    helo: Option<String>,
    tls: bool,
    from: Option<String>,
    rcpts: Vec<String>,
    errors: usize,
    buf: Vec<u8>,
    lines: Lines,
    out: Vec<u8>,
    /// What the last command asks of the session loop.
    pending: Option<Pending>,
}

/// What a command leaves the session loop to do after its reply.
enum Pending {
    Quit,
    StartTls,
    Data,
}

impl SmtpInterface {
    fn tls_server(&self) -> Option<Arc<TlsServer>> {
        self.tls
            .get_or_init(|| {
                let options = self.tls_options.clone()?;
                let who = format!("cage {} interface {}", self.spec.cage, self.spec.name);
                match TlsServer::start(options, who.clone()) {
                    Ok(s) => Some(s),
                    Err(e) => {
                        // Checked at config time; only a file removed since then gets here.
                        tracing::error!("{who}: TLS cannot start, STARTTLS is not offered: {e}");
                        None
                    }
                }
            })
            .clone()
    }

    async fn connection(&self, mut stream: TcpStream, remote: SocketAddr, shutdown: Shutdown) -> std::io::Result<()> {
        let open = self.open.fetch_add(1, Ordering::Relaxed) + 1;
        let _open = Open(self.open.clone());
        if open > self.max_connections {
            // Said once a second at most: a flood of connections must not flood the log.
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
            if self.refused_logged.swap(now, Ordering::Relaxed) != now {
                tracing::warn!(cage = %self.spec.cage, interface = %self.spec.name, "{remote}: {} sessions open, the limit is max_connections: refused", open - 1);
            }
            stream.write_all(b"421 4.3.2 Too many connections, try again later\r\n").await?;
            return Ok(());
        }
        let mut s = Session {
            iface: self,
            remote,
            deadline: Instant::now() + self.session_timeout,
            helo: None,
            tls: false,
            from: None,
            rcpts: Vec::new(),
            errors: 0,
            buf: Vec::new(),
            lines: Lines::default(),
            out: Vec::new(),
            pending: None,
        };
        s.reply(&format!("220 {} ESMTP ready", self.hostname));
        match s.run(&mut stream, shutdown.clone()).await? {
            End::Close => return Ok(()),
            End::StartTls => {}
        }
        let Some(tls) = self.tls_server() else { return Ok(()) };
        let mut stop = shutdown.clone();
        let stopped = async move {
            let _ = stop.changed().await;
        };
        let Some(mut tls_stream) = Box::pin(tls.accept(stream, remote, stopped)).await else { return Ok(()) };
        // RFC 3207 4.2: everything learnt before the handshake is forgotten.
        s.tls = true;
        s.helo = None;
        s.reset();
        s.run(&mut tls_stream, shutdown).await?;
        let _ = tls_stream.shutdown().await;
        Ok(())
    }
}

/// Bytes read at a time.
const CHUNK: usize = 16 << 10;

/// What waiting for input came to.
enum Input {
    Bytes,
    Closed,
    Idle,
    SessionOver,
    Shutdown,
}

impl Session<'_> {
    fn reply(&mut self, text: &str) {
        self.out.extend_from_slice(text.as_bytes());
        self.out.extend_from_slice(b"\r\n");
    }

    fn reset(&mut self) {
        self.from = None;
        self.rcpts.clear();
    }

    async fn flush<S: AsyncWrite + Unpin>(&mut self, stream: &mut S) -> std::io::Result<()> {
        if !self.out.is_empty() {
            let out = std::mem::take(&mut self.out);
            tokio::time::timeout(self.iface.idle_timeout, stream.write_all(&out))
                .await
                .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "the client reads no replies"))??;
            stream.flush().await?;
        }
        Ok(())
    }

    /// Reads more bytes into `into`, bounded by the idle and session timeouts and the shutdown.
    async fn fill<S: AsyncRead + Unpin>(&mut self, stream: &mut S, into: &mut Vec<u8>, shutdown: &mut Shutdown) -> std::io::Result<Input> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(Input::SessionOver);
        }
        let wait = self.iface.idle_timeout.min(left);
        let mut chunk = vec![0u8; CHUNK];
        tokio::select! {
            r = tokio::time::timeout(wait, stream.read(&mut chunk)) => match r {
                Ok(Ok(0)) => Ok(Input::Closed),
                Ok(Ok(n)) => {
                    into.extend_from_slice(&chunk[..n]);
                    Ok(Input::Bytes)
                }
                Ok(Err(e)) => Err(e),
                Err(_) if wait < self.iface.idle_timeout => Ok(Input::SessionOver),
                Err(_) => Ok(Input::Idle),
            },
            _ = shutdown.changed() => Ok(Input::Shutdown),
        }
    }

    /// A bad command: counted, and the session closed past `max_errors`. False when closing.
    fn error(&mut self, text: &str) -> bool {
        self.errors += 1;
        if self.errors > self.iface.max_errors {
            self.reply("421 4.7.0 Too many errors, closing the connection");
            return false;
        }
        self.reply(text);
        true
    }

    /// Commands until the client quits or goes, the session ends, or STARTTLS.
    async fn run<S: AsyncRead + AsyncWrite + Unpin>(&mut self, stream: &mut S, mut shutdown: Shutdown) -> std::io::Result<End> {
        loop {
            let line = match self.lines.next(&mut self.buf, self.iface.max_line_length) {
                Some(l) => l,
                None => {
                    // Pipelined commands are answered together, once all that came is read.
                    self.flush(stream).await?;
                    let mut buf = std::mem::take(&mut self.buf);
                    let input = self.fill(stream, &mut buf, &mut shutdown).await;
                    self.buf = buf;
                    match input? {
                        Input::Bytes => continue,
                        Input::Closed => return Ok(End::Close),
                        Input::Idle => self.reply("421 4.4.2 Idle for too long, closing the connection"),
                        Input::SessionOver => self.reply("421 4.4.2 Session time is over, closing the connection"),
                        Input::Shutdown => self.reply("421 4.3.2 Service shutting down, try again later"),
                    }
                    self.flush(stream).await?;
                    return Ok(End::Close);
                }
            };
            let line = match line {
                Line::Line(l) => l,
                Line::TooLong => {
                    let text = format!("500 5.5.2 Line too long (the limit is {} bytes)", self.iface.max_line_length);
                    if !self.error(&text) {
                        self.flush(stream).await?;
                        return Ok(End::Close);
                    }
                    continue;
                }
            };
            if !self.command(wire::parse(&line)) {
                self.flush(stream).await?;
                return Ok(End::Close);
            }
            match self.pending.take() {
                None => {}
                Some(Pending::Quit) => {
                    self.flush(stream).await?;
                    return Ok(End::Close);
                }
                Some(Pending::StartTls) => {
                    self.flush(stream).await?;
                    // Anything sent after STARTTLS in the clear is dropped, never read as if it
                    // had come over TLS (the command injection of CVE-2011-0411).
                    self.buf.clear();
                    return Ok(End::StartTls);
                }
                Some(Pending::Data) => {
                    self.flush(stream).await?;
                    if !self.data(stream, &mut shutdown).await? {
                        return Ok(End::Close);
                    }
                }
            }
        }
    }
}

impl Session<'_> {
    /// Answers one command (into the output); false when the session must close.
    fn command(&mut self, c: Command) -> bool {
        let i = self.iface;
        match c {
            Command::Ehlo(domain) => {
                self.reset();
                let mut lines = vec![
                    format!("{} greets {}", i.hostname, clean(&domain)),
                    format!("SIZE {}", i.limits.max_size),
                    "8BITMIME".into(),
                    "PIPELINING".into(),
                    "ENHANCEDSTATUSCODES".into(),
                ];
                if !self.tls && i.tls_options.is_some() {
                    lines.push("STARTTLS".into());
                }
                let last = lines.len() - 1;
                for (n, l) in lines.iter().enumerate() {
                    let sep = if n == last { ' ' } else { '-' };
                    self.reply(&format!("250{sep}{l}"));
                }
                self.helo = Some(domain);
            }
            Command::Helo(domain) => {
                self.reset();
                self.reply(&format!("250 {} greets {}", i.hostname, clean(&domain)));
                self.helo = Some(domain);
            }
            Command::Mail(path, params) => {
                if self.helo.is_none() {
                    return self.error("503 5.5.1 Say EHLO first");
                }
                if self.from.is_some() {
                    return self.error("503 5.5.1 Nested MAIL command");
                }
                if i.require_tls && !self.tls {
                    return self.error("530 5.7.0 Must issue a STARTTLS command first");
                }
                for (k, v) in params {
                    match (k.as_str(), v) {
                        ("SIZE", Some(v)) => match v.parse::<u64>() {
                            Ok(n) if n > i.limits.max_size as u64 => {
                                self.reply(&format!("552 5.3.4 Message size exceeds the limit of {} bytes", i.limits.max_size));
                                return true;
                            }
                            Ok(_) => {}
                            Err(_) => return self.error("501 5.5.4 SIZE needs a number"),
                        },
                        ("BODY", Some(v)) if v.eq_ignore_ascii_case("7BIT") || v.eq_ignore_ascii_case("8BITMIME") => {}
                        _ => return self.error("555 5.5.4 MAIL parameter not recognised"),
                    }
                }
                self.reply("250 2.1.0 Ok");
                self.from = Some(path);
            }
            Command::Rcpt(path, params) => {
                if self.from.is_none() {
                    return self.error("503 5.5.1 Need MAIL before RCPT");
                }
                if !params.is_empty() {
                    return self.error("555 5.5.4 RCPT parameters not recognised");
                }
                if !i.accepts(&path) {
                    self.reply("550 5.1.1 Recipient not accepted here");
                    return true;
                }
                if self.rcpts.len() >= i.max_recipients {
                    self.reply(&format!("452 4.5.3 Too many recipients (the limit is {})", i.max_recipients));
                    return true;
                }
                self.reply("250 2.1.5 Ok");
                self.rcpts.push(path);
            }
            Command::Data => {
                if self.from.is_none() {
                    return self.error("503 5.5.1 Need MAIL before DATA");
                }
                if self.rcpts.is_empty() {
                    // With PIPELINING every RCPT may have been refused: the sender learns why there.
                    return self.error("554 5.5.1 No valid recipients");
                }
                self.reply("354 End data with <CR><LF>.<CR><LF>");
                self.pending = Some(Pending::Data);
            }
            Command::Rset => {
                self.reset();
                self.reply("250 2.0.0 Ok");
            }
            Command::Noop => self.reply("250 2.0.0 Ok"),
            Command::Help => self.reply("214 2.0.0 See RFC 5321"),
            Command::Quit => {
                self.reply(&format!("221 2.0.0 {} closing the connection", i.hostname));
                self.pending = Some(Pending::Quit);
            }
            Command::Vrfy | Command::Expn => self.reply("502 5.5.1 Not offered"),
            Command::StartTls => {
                if self.tls || i.tls_options.is_none() {
                    return self.error("502 5.5.1 STARTTLS not offered");
                }
                if i.tls_server().is_none() {
                    self.reply("454 4.7.0 TLS not available due to temporary reason");
                    return true;
                }
                self.reply("220 2.0.0 Ready to start TLS");
                self.pending = Some(Pending::StartTls);
            }
            Command::NotOffered(verb) => return self.error(&format!("502 5.5.1 {verb} not offered")),
            Command::Unknown(_) => return self.error("500 5.5.2 Command not recognised"),
            Command::Syntax(why) => return self.error(&format!("501 5.5.4 Syntax error: {why}")),
        }
        true
    }

    /// Reads the message after 354 and answers it; false when the session must close.
    async fn data<S: AsyncRead + AsyncWrite + Unpin>(&mut self, stream: &mut S, shutdown: &mut Shutdown) -> std::io::Result<bool> {
        let mut decoder = DataDecoder::new(self.iface.limits.max_size);
        let mut pending = std::mem::take(&mut self.buf);
        loop {
            if let Fed::End(n) = decoder.feed(&pending) {
                pending.drain(..n);
                self.buf = pending;
                break;
            }
            pending.clear();
            match self.fill(stream, &mut pending, shutdown).await? {
                Input::Bytes => {}
                // A client gone before the end of data: nothing was received, nothing runs.
                Input::Closed => return Ok(false),
                Input::Idle | Input::SessionOver | Input::Shutdown => {
                    self.reply("421 4.4.2 Timeout or shutdown during DATA, closing the connection");
                    self.flush(stream).await?;
                    return Ok(false);
                }
            }
        }
        if decoder.over() {
            self.reset();
            self.reply(&format!("552 5.3.4 Message size exceeds the limit of {} bytes", self.iface.limits.max_size));
            return Ok(true);
        }
        let raw = decoder.into_message();
        let reply = self.deliver(raw).await;
        self.reset();
        self.reply(&reply);
        Ok(true)
    }

    /// Runs the handler for one message; the reply to DATA.
    async fn deliver(&mut self, raw: Vec<u8>) -> String {
        let i = self.iface;
        let spec = &i.spec;
        let envelope = Value::Map(vec![
            (Value::str("mail_from"), Value::str(self.from.clone().unwrap_or_default())),
            (Value::str("rcpt_to"), Value::Array(self.rcpts.iter().map(|r| Value::str(r.clone())).collect())),
            (Value::str("helo"), Value::str(self.helo.clone().unwrap_or_default())),
            (Value::str("remote_addr"), Value::str(self.remote.to_string())),
            (Value::str("tls"), Value::Bool(self.tls)),
        ]);
        let limits = i.limits;
        let parsed = if raw.len() > message::INLINE_PARSE_LIMIT {
            match tokio::task::spawn_blocking(move || message::to_value(&raw, envelope, &limits)).await {
                Ok(r) => r,
                Err(e) => return format!("451 4.3.0 Message could not be read ({e}), try again later"),
            }
        } else {
            message::to_value(&raw, envelope, &limits)
        };
        let message = match parsed {
            Ok(m) => m,
            Err(e) => return format!("554 5.6.0 Message refused: {e}"),
        };
        let (module, function) = &spec.handler.value;
        let Some(vm) = worker::cage(&spec.cage) else { return "451 4.3.0 The cage is not running, try again later".into() };
        let ctx = RequestCtx::new(&spec.cage, &spec.name, spec.request_timeout);
        let id = ctx.id.clone();
        match worker::run_traced(&vm, ctx, module, function, vec![message], rustomnic_lua::trace::SpanKind::Server).await {
            Ok(_) => format!("250 2.0.0 Ok: queued as {id}"),
            Err(e) => {
                if !matches!(e, RunError::Failed { .. }) {
                    tracing::error!(cage = %spec.cage, interface = %spec.name, request = %id, "{module}.{function}: {e}");
                }
                format!("451 4.3.0 Requested action aborted: local error in processing (request {id}), try again later")
            }
        }
    }
}

impl SmtpInterface {
    /// Whether a recipient is taken: any when neither list is given.
    fn accepts(&self, path: &str) -> bool {
        if self.accept_domains.is_empty() && self.accept_recipients.is_empty() {
            return true;
        }
        let lower = path.to_ascii_lowercase();
        let domain = lower.rsplit_once('@').map(|(_, d)| d).unwrap_or("");
        self.accept_recipients.contains(&lower) || self.accept_domains.iter().any(|d| d == domain)
    }
}

/// A client's EHLO argument as echoed back: printable, bounded.
fn clean(text: &str) -> String {
    text.chars().filter(|c| !c.is_control()).take(64).collect()
}
