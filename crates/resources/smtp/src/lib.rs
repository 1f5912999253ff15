//! The `smtp` resource: `xa.mail.send{from=, to=, subject=, text=, ...}` over a pooled SMTP
//! connection (lettre), plain, STARTTLS or TLS with rustls on ring. See docs/resources/smtp.md.
//!
//! Sending follows the transaction: the call builds the message and has the server accept the
//! sender and every recipient (MAIL FROM, RCPT TO), so that bad addresses fail the transaction
//! before anything is delivered; the commit sends the message (DATA); a rollback sends RSET,
//! and nothing is delivered.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use futures_util::future::LocalBoxFuture;
use lettre::message::header::ContentType;
use lettre::message::{Attachment, Mailbox, Mailboxes, MultiPart, SinglePart};
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{AsyncSmtpConnection, Certificate, TlsParameters};
use lettre::transport::smtp::commands::{Data, Mail, Rcpt, Rset};
use lettre::transport::smtp::extension::{ClientId, Extension, MailBodyParameter, MailParameter};
use lettre::{Address, Message};
use rustomnic_core::{Section, Value};
use rustomnic_resource::{Connection, Error, Resource, ResourceProtocol};

const SEND_KEYS: &[&str] = &["from", "to", "cc", "bcc", "reply_to", "subject", "text", "html", "attachments"];

/// The `smtp` protocol.
pub struct Smtp;

#[derive(Clone, Copy, PartialEq, Debug)]
enum TlsMode {
    /// Plain SMTP (a relay on localhost or a trusted network).
    None,
    /// Plain connect, then STARTTLS before anything else; refused if the server cannot.
    StartTls,
    /// TLS from the first byte (SMTPS, usually port 465).
    Implicit,
}

struct Settings {
    host: String,
    port: u16,
    tls: TlsMode,
    /// PEM certificates of a private CA, trusted besides the webpki (Mozilla) roots.
    ca: Option<Vec<u8>>,
    credentials: Option<Credentials>,
    hello: ClientId,
}

struct SmtpResource(Arc<Settings>);

/// One SMTP session and where it stands in the current transaction.
struct SmtpConnection {
    conn: AsyncSmtpConnection,
    /// MAIL FROM was accepted and no DATA or RSET followed yet.
    in_mail: bool,
    /// The formatted message waiting for the commit.
    pending: Option<Vec<u8>>,
}

impl ResourceProtocol for Smtp {
    fn name(&self) -> &'static str {
        "smtp"
    }

    fn configure(&self, _resource: &str, section: &Section) -> Option<Arc<dyn Resource>> {
        let tls = match section.string("tls") {
            None => Some(TlsMode::None),
            Some(t) => match t.value.as_str() {
                "none" => Some(TlsMode::None),
                "starttls" => Some(TlsMode::StartTls),
                "tls" => Some(TlsMode::Implicit),
                other => {
                    section.error("tls", format!("{other:?} is not one of \"none\", \"starttls\", \"tls\""));
                    None
                }
            },
        };
        let host = section.string("host").map(|h| h.value).unwrap_or_else(|| "127.0.0.1".to_string());
        let port = section.integer("port", 1, 65535).map(|p| p.value as u16);
        let username = section.string("username").map(|u| u.value);
        let password = section.string("password").map(|p| p.value);
        let hello = section.string("hello_name").map(|h| h.value).unwrap_or_else(|| "localhost".to_string());
        let ca = match section.string("tls_ca_file") {
            Some(path) => match read_ca_file(&path.value) {
                Ok(pem) => Some(Some(pem)),
                Err(e) => {
                    section.error("tls_ca_file", e);
                    None
                }
            },
            None => Some(None),
        };
        if host.is_empty() {
            section.error("host", "must not be empty");
            return None;
        }
        let credentials = match (username, password) {
            (Some(u), Some(p)) => Some(Credentials::new(u, p)),
            (None, None) if !section.has("username") && !section.has("password") => None,
            // A key that is present but could not be read has its own error already.
            (u, p) => {
                if u.is_some() && !section.has("password") {
                    section.error("username", "a username needs a password (password = \"${SMTP_PASSWORD}\")");
                }
                if p.is_some() && !section.has("username") {
                    section.error("password", "a password needs a username");
                }
                return None;
            }
        };
        let (tls, ca) = (tls?, ca?);
        if ca.is_some() && tls == TlsMode::None {
            section.error("tls_ca_file", "is only used with tls = \"starttls\" or \"tls\"");
            return None;
        }
        // The usual port of each kind of connection.
        let port = port.unwrap_or(match tls {
            TlsMode::None => 25,
            TlsMode::StartTls => 587,
            TlsMode::Implicit => 465,
        });
        let hello = match hello.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V4(a)) => ClientId::Ipv4(a),
            Ok(std::net::IpAddr::V6(a)) => ClientId::Ipv6(a),
            Err(_) => ClientId::Domain(hello),
        };
        Some(Arc::new(SmtpResource(Arc::new(Settings { host, port, tls, ca, credentials, hello }))))
    }
}

impl Resource for SmtpResource {
    fn connect(&self) -> LocalBoxFuture<'static, Result<Box<dyn Connection>, Error>> {
        let s = self.0.clone();
        Box::pin(async move {
            let at = format!("{}:{}", s.host, s.port);
            // No timeout of lettre's own: the pool's connect_timeout bounds the whole connect
            // (TCP, greeting, EHLO, STARTTLS, AUTH) and the request's deadline every command.
            let tls_params = || {
                let mut builder = TlsParameters::builder(s.host.clone());
                if let Some(pem) = &s.ca {
                    let ca = Certificate::from_pem(pem).map_err(|e| Error::new(format!("{at}: tls_ca_file: {e}")))?;
                    builder = builder.add_root_certificate(ca);
                }
                builder.build_rustls().map_err(|e| Error::new(format!("{at}: cannot set up TLS: {e}")))
            };
            let implicit = if s.tls == TlsMode::Implicit { Some(tls_params()?) } else { None };
            let mut conn = AsyncSmtpConnection::connect_tokio1((s.host.as_str(), s.port), None, &s.hello, implicit, None)
                .await
                .map_err(|e| Error::new(format!("{at}: {}", describe(&e))))?;
            if s.tls == TlsMode::StartTls {
                if !conn.can_starttls() {
                    conn.abort().await;
                    return Err(Error::new(format!("{at}: the server does not offer STARTTLS (tls = \"starttls\")")));
                }
                conn.starttls(tls_params()?, &s.hello).await.map_err(|e| Error::new(format!("{at}: STARTTLS failed: {}", describe(&e))))?;
            }
            if let Some(credentials) = &s.credentials {
                if let Err(e) = conn.auth(&[Mechanism::Plain, Mechanism::Login], credentials).await {
                    conn.abort().await;
                    let mut err = Error::new(format!("{at}: authentication failed: {}", describe(&e)));
                    if let Some(code) = e.status() {
                        err = err.with_code(code.to_string());
                    }
                    return Err(err);
                }
            }
            Ok(Box::new(SmtpConnection { conn, in_mail: false, pending: None }) as Box<dyn Connection>)
        })
    }

    fn default_pool_size(&self) -> usize {
        // Mail servers limit sessions per client; a few connections carry a lot of mail.
        4
    }
}

impl Connection for SmtpConnection {
    fn begin(&mut self) -> LocalBoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            self.pending = None;
            if self.in_mail {
                self.reset().await?;
            }
            Ok(())
        })
    }

    fn call<'a>(&'a mut self, method: &'a str, args: Vec<Value>) -> LocalBoxFuture<'a, Result<Value, Error>> {
        Box::pin(async move {
            if method != "send" {
                return Err(Error::new(format!("no method {method} (methods: send)")));
            }
            if self.pending.is_some() {
                return Err(Error::new("one message per participant: make one send per participant"));
            }
            let mut args = args.into_iter();
            let spec = match (args.next(), args.next()) {
                (Some(Value::Map(m)), None) => m,
                (Some(Value::Map(_)), Some(_)) => return Err(Error::new("send takes one table: send{from = ..., to = ..., subject = ..., text = ...}")),
                (other, _) => {
                    return Err(Error::new(format!(
                        "send takes one table: send{{from = ..., to = ..., subject = ..., text = ...}}, got {}",
                        other.map(|v| v.type_name()).unwrap_or("nothing")
                    )))
                }
            };
            let (message, id) = build_message(&spec)?;
            let bytes = message.formatted();
            self.announce(&message, &bytes).await?;
            let accepted = message.envelope().to().len();
            self.pending = Some(bytes);
            Ok(Value::Map(vec![(Value::str("message_id"), Value::str(id)), (Value::str("accepted"), Value::Int(accepted as i64))]))
        })
    }

    fn commit(&mut self) -> LocalBoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            let Some(bytes) = self.pending.take() else {
                return Ok(());
            };
            self.conn.command(Data).await.map_err(|e| smtp_error("the server refused DATA", &e))?;
            // From here the session is back out of the mail transaction, whatever the reply.
            self.in_mail = false;
            self.conn.message(&bytes).await.map_err(|e| smtp_error("the server refused the message", &e))?;
            Ok(())
        })
    }

    fn rollback(&mut self) -> LocalBoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            self.pending = None;
            if self.in_mail {
                self.reset().await?;
            }
            Ok(())
        })
    }

    fn is_healthy(&mut self) -> LocalBoxFuture<'_, bool> {
        Box::pin(async move { !self.conn.has_broken() && !self.in_mail && self.conn.test_connected().await })
    }
}

impl SmtpConnection {
    /// MAIL FROM and RCPT TO for every recipient; the server checks the addresses now.
    async fn announce(&mut self, message: &Message, bytes: &[u8]) -> Result<(), Error> {
        let envelope = message.envelope();
        let mut params = Vec::new();
        let ascii = |a: &Address| AsRef::<str>::as_ref(a).is_ascii();
        let non_ascii_address = envelope.from().is_some_and(|a| !ascii(a)) || envelope.to().iter().any(|a| !ascii(a));
        if non_ascii_address {
            if !self.conn.server_info().supports_feature(Extension::SmtpUtfEight) {
                return Err(Error::new("an address is not ASCII and the server does not support SMTPUTF8"));
            }
            params.push(MailParameter::SmtpUtfEight);
        }
        // lettre encodes bodies as 7-bit; this only matters for raw 8-bit headers.
        if !bytes.is_ascii() && self.conn.server_info().supports_feature(Extension::EightBitMime) {
            params.push(MailParameter::Body(MailBodyParameter::EightBitMime));
        }
        let sender = envelope.from().cloned();
        let shown = sender.as_ref().map(|a| a.to_string()).unwrap_or_default();
        self.conn.command(Mail::new(sender, params)).await.map_err(|e| smtp_error(&format!("the server refused the sender <{shown}>"), &e))?;
        self.in_mail = true;
        for to in envelope.to() {
            self.conn.command(Rcpt::new(to.clone(), vec![])).await.map_err(|e| smtp_error(&format!("the server refused the recipient <{to}>"), &e))?;
        }
        Ok(())
    }

    /// Ends the mail transaction on the server without delivering anything.
    async fn reset(&mut self) -> Result<(), Error> {
        let r = self.conn.command(Rset).await;
        self.in_mail = false;
        r.map(|_| ()).map_err(|e| Error::broken(format!("RSET failed: {}", describe(&e))))
    }
}

/// The PEM text of a CA file, checked to hold certificates lettre can read.
fn read_ca_file(path: &str) -> Result<Vec<u8>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {path}: {e}"))?;
    if !pem.windows(27).any(|w| w == b"-----BEGIN CERTIFICATE-----") {
        return Err(format!("{path} holds no certificate (-----BEGIN CERTIFICATE-----)"));
    }
    Certificate::from_pem(&pem).map_err(|e| format!("{path} is not a PEM file of certificates: {e}"))?;
    Ok(pem)
}

/// Checks the table of `send` and builds the message; nothing touches the network here.
fn build_message(spec: &[(Value, Value)]) -> Result<(Message, String), Error> {
    let field = |name: &str| spec.iter().find(|(k, _)| k.as_str() == Some(name)).map(|(_, v)| v);
    for (k, _) in spec {
        if !k.as_str().is_some_and(|k| SEND_KEYS.contains(&k)) {
            let shown = k.as_str().map(str::to_string).unwrap_or_else(|| format!("({})", k.type_name()));
            return Err(Error::new(format!("send: unknown field {shown} (fields: {})", SEND_KEYS.join(", "))));
        }
    }
    let from = match field("from") {
        Some(Value::Str(s)) => text("from", s)?.parse::<Mailbox>().map_err(|e| Error::new(format!("send: from: {e}: {:?}", String::from_utf8_lossy(s))))?,
        Some(other) => return Err(Error::new(format!("send: from must be a string, got {}", other.type_name()))),
        None => return Err(Error::new("send: from is required")),
    };
    let to = mailboxes("to", field("to"))?;
    let cc = mailboxes("cc", field("cc"))?;
    let bcc = mailboxes("bcc", field("bcc"))?;
    let reply_to = mailboxes("reply_to", field("reply_to"))?;
    if to.is_empty() && cc.is_empty() && bcc.is_empty() {
        return Err(Error::new("send: no recipient (give to, cc or bcc)"));
    }
    let id = message_id(from.email.domain());
    let mut builder = Message::builder().message_id(Some(id.clone())).from(from);
    for m in to {
        builder = builder.to(m);
    }
    for m in cc {
        builder = builder.cc(m);
    }
    for m in bcc {
        builder = builder.bcc(m);
    }
    for m in reply_to {
        builder = builder.reply_to(m);
    }
    match field("subject") {
        Some(Value::Str(s)) => builder = builder.subject(text("subject", s)?),
        Some(other) => return Err(Error::new(format!("send: subject must be a string, got {}", other.type_name()))),
        None => {}
    }
    let plain = optional_text("text", field("text"))?;
    let html = optional_text("html", field("html"))?;
    let attachments = attachments(field("attachments"))?;
    let body = match (plain, html) {
        (Some(t), Some(h)) => Some(Part::Multi(MultiPart::alternative_plain_html(t, h))),
        (Some(t), None) => Some(Part::Single(SinglePart::plain(t))),
        (None, Some(h)) => Some(Part::Single(SinglePart::html(h))),
        (None, None) => None,
    };
    let built = match (body, attachments.is_empty()) {
        (None, true) => return Err(Error::new("send: the message is empty (give text, html or attachments)")),
        (Some(Part::Single(p)), true) => builder.singlepart(p),
        (Some(Part::Multi(p)), true) => builder.multipart(p),
        (body, false) => {
            let mut mixed = match body {
                Some(Part::Single(p)) => MultiPart::mixed().singlepart(p),
                Some(Part::Multi(p)) => MultiPart::mixed().multipart(p),
                None => MultiPart::mixed().build(),
            };
            for a in attachments {
                mixed = mixed.singlepart(a);
            }
            builder.multipart(mixed)
        }
    };
    let message = built.map_err(|e| Error::new(format!("send: cannot build the message: {e}")))?;
    Ok((message, id))
}

enum Part {
    Single(SinglePart),
    Multi(MultiPart),
}

/// `to = "a@x"`, `to = "A <a@x>, b@y"` or `to = {"a@x", "B <b@y>"}`.
fn mailboxes(name: &str, v: Option<&Value>) -> Result<Vec<Mailbox>, Error> {
    let parse_list = |s: &[u8]| -> Result<Vec<Mailbox>, Error> {
        let t = text(name, s)?;
        let list: Mailboxes = t.parse().map_err(|e| Error::new(format!("send: {name}: {e}: {t:?}")))?;
        Ok(list.into_iter().collect())
    };
    match v {
        None => Ok(vec![]),
        Some(Value::Str(s)) => parse_list(s),
        Some(Value::Array(items)) => {
            let mut out = Vec::new();
            for item in items {
                match item {
                    Value::Str(s) => out.extend(parse_list(s)?),
                    other => return Err(Error::new(format!("send: {name}: every address must be a string, got {}", other.type_name()))),
                }
            }
            Ok(out)
        }
        Some(other) => Err(Error::new(format!("send: {name} must be a string or an array of strings, got {}", other.type_name()))),
    }
}

fn optional_text(name: &str, v: Option<&Value>) -> Result<Option<String>, Error> {
    match v {
        None => Ok(None),
        Some(Value::Str(s)) => Ok(Some(text(name, s)?)),
        Some(other) => Err(Error::new(format!("send: {name} must be a string, got {}", other.type_name()))),
    }
}

fn text(name: &str, bytes: &[u8]) -> Result<String, Error> {
    String::from_utf8(bytes.to_vec()).map_err(|_| Error::new(format!("send: {name} is not UTF-8 text")))
}

/// `attachments = {{name = "a.pdf", content_type = "application/pdf", data = bytes}, ...}`.
fn attachments(v: Option<&Value>) -> Result<Vec<SinglePart>, Error> {
    let items = match v {
        None => return Ok(vec![]),
        Some(Value::Array(items)) => items,
        Some(Value::Map(m)) if m.is_empty() => return Ok(vec![]),
        Some(other) => return Err(Error::new(format!("send: attachments must be an array of tables, got {}", other.type_name()))),
    };
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let n = i + 1;
        let Value::Map(fields) = item else {
            return Err(Error::new(format!("send: attachment {n} must be a table {{name =, content_type =, data =}}, got {}", item.type_name())));
        };
        let get = |k: &str| fields.iter().find(|(key, _)| key.as_str() == Some(k)).map(|(_, v)| v);
        if let Some((k, _)) = fields.iter().find(|(k, _)| !matches!(k.as_str(), Some("name" | "content_type" | "data"))) {
            return Err(Error::new(format!("send: attachment {n}: unknown field {} (fields: name, content_type, data)", k.as_str().unwrap_or("?"))));
        }
        let name = match get("name") {
            Some(Value::Str(s)) => text(&format!("attachment {n} name"), s)?,
            _ => return Err(Error::new(format!("send: attachment {n} needs a name (the file name shown)"))),
        };
        let data = match get("data") {
            Some(Value::Str(s)) => s.clone(),
            _ => return Err(Error::new(format!("send: attachment {n} ({name}) needs data (a string of bytes)"))),
        };
        let content_type = match get("content_type") {
            None => "application/octet-stream".to_string(),
            Some(Value::Str(s)) => text(&format!("attachment {n} content_type"), s)?,
            Some(other) => return Err(Error::new(format!("send: attachment {n} ({name}): content_type must be a string, got {}", other.type_name()))),
        };
        let ct = ContentType::parse(&content_type).map_err(|_| Error::new(format!("send: attachment {n} ({name}): {content_type:?} is not a content type")))?;
        out.push(Attachment::new(name).body(data, ct));
    }
    Ok(out)
}

/// A unique Message-ID at the sender's domain: time, process and a counter.
fn message_id(domain: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("<{nanos:x}.{:x}.{n}.rustomnic@{domain}>", std::process::id())
}

/// The error of a failed SMTP command: the reply code as `code`; a lost session is broken.
fn smtp_error(what: &str, e: &lettre::transport::smtp::Error) -> Error {
    match e.status() {
        // 421: the server is closing the session.
        Some(code) if code.to_string() != "421" => {
            let said = std::error::Error::source(e).map(|s| s.to_string()).unwrap_or_default();
            Error::new(format!("{what}: {code} {said}").trim_end().to_string()).with_code(code.to_string())
        }
        Some(code) => Error::broken(format!("{what}: {}", describe(e))).with_code(code.to_string()),
        None => Error::broken(format!("{what}: {}", describe(e))),
    }
}

/// lettre's error text with its sources, without the repeats of nested errors of one kind
/// ("Connection error: Connection error: ...").
fn describe(e: &lettre::transport::smtp::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e).and_then(|s| s.source());
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    let mut parts: Vec<&str> = text.split(": ").collect();
    parts.dedup();
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(lua_like: Vec<(&str, Value)>) -> Vec<(Value, Value)> {
        lua_like.into_iter().map(|(k, v)| (Value::str(k), v)).collect()
    }

    #[test]
    fn a_message_with_text_html_and_an_attachment() {
        let (m, id) = build_message(&spec(vec![
            ("from", Value::str("Shop <shop@example.com>")),
            ("to", Value::Array(vec![Value::str("a@example.org"), Value::str("B <b@example.org>, c@example.org")])),
            ("bcc", Value::str("hidden@example.org")),
            ("subject", Value::str("Grüße")),
            ("text", Value::str("hello")),
            ("html", Value::str("<p>hello</p>")),
            (
                "attachments",
                Value::Array(vec![Value::Map(vec![(Value::str("name"), Value::str("a.bin")), (Value::str("data"), Value::Str(vec![0, 1, 2, 255]))])]),
            ),
        ]))
        .unwrap();
        assert!(id.starts_with('<') && id.ends_with("@example.com>"), "{id}");
        assert_eq!(m.envelope().to().len(), 4, "bcc recipients are in the envelope");
        let text = String::from_utf8(m.formatted()).unwrap();
        assert!(!text.contains("hidden@example.org"), "no Bcc header: {text}");
        assert!(text.contains(&format!("Message-ID: {id}")), "{text}");
        assert!(text.contains("\r\nDate: "), "{text}");
        assert!(text.contains("multipart/mixed") && text.contains("multipart/alternative"), "{text}");
        assert!(text.contains("filename=\"a.bin\""), "{text}");
    }

    #[test]
    fn bad_fields_are_named() {
        let err = |fields: Vec<(&str, Value)>| build_message(&spec(fields)).unwrap_err().message;
        assert_eq!(err(vec![("to", Value::str("a@x.org")), ("text", Value::str("t"))]), "send: from is required");
        assert_eq!(err(vec![("from", Value::str("a@x.org")), ("text", Value::str("t"))]), "send: no recipient (give to, cc or bcc)");
        assert!(err(vec![("from", Value::str("not an address")), ("to", Value::str("a@x.org"))]).starts_with("send: from: "));
        assert_eq!(err(vec![("from", Value::str("a@x.org")), ("to", Value::str("b@x.org"))]), "send: the message is empty (give text, html or attachments)");
        assert!(err(vec![("form", Value::str("a@x.org"))]).starts_with("send: unknown field form (fields: from, to,"));
        assert!(err(vec![("from", Value::str("a@x.org")), ("to", Value::Int(1))]).contains("to must be a string or an array of strings, got integer"));
    }
}
