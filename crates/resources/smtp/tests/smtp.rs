//! The smtp resource against a local SMTP sink (Python's aiosmtpd, storing every message in a
//! maildir, refusing recipients whose name starts with "reject" and messages that contain
//! "refuse-this-message"): delivery with subject,
//! body and attachment, nothing delivered on rollback, refused recipients, STARTTLS, errors.
//! Without aiosmtpd (`apt-get install -y python3-aiosmtpd`) the tests that need it are skipped
//! with a loud message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rustomnic_core::Value;
use rustomnic_resource::testing::{configure, run_lua};
use rustomnic_resource::ResourceConfig;
use rustomnic_resource_smtp::Smtp;

const SINK: &str = r#"
import ssl, sys
from aiosmtpd.controller import Controller
from aiosmtpd.handlers import Mailbox
from aiosmtpd.smtp import AuthResult, LoginPassword

class Sink(Mailbox):
    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.startswith("reject"):
            return "550 5.1.1 <%s>: no such user" % address
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        if b"refuse-this-message" in envelope.content:
            return "554 5.6.0 content refused"
        return await super().handle_DATA(server, session, envelope)

def authenticator(server, session, envelope, mechanism, auth_data):
    ok = isinstance(auth_data, LoginPassword) and auth_data.login == b"u" and auth_data.password == b"pw"
    return AuthResult(success=ok, handled=False)

maildir, port, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
kwargs = {}
if mode != "plain":
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(sys.argv[4], sys.argv[5])
    if mode == "starttls":
        # STARTTLS offered and required, then AUTH required.
        kwargs = dict(tls_context=context, require_starttls=True, authenticator=authenticator, auth_required=True)
    else:
        kwargs = dict(ssl_context=context)
controller = Controller(Sink(maildir), hostname="127.0.0.1", port=port, **kwargs)
controller.start()
print("ready", flush=True)
sys.stdin.read()  # runs until the test ends (closes stdin) or kills it
controller.stop()
"#;

/// A running sink; killed when dropped.
struct Sink {
    child: Child,
    port: u16,
    maildir: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Python that has aiosmtpd: the one on PATH, else the system's (Debian's package).
fn python() -> Option<&'static str> {
    ["python3", "/usr/bin/python3"]
        .into_iter()
        .find(|p| Command::new(p).args(["-c", "import aiosmtpd"]).stderr(Stdio::null()).status().is_ok_and(|s| s.success()))
}

fn sink() -> Option<Sink> {
    sink_with(&["plain"])
}

/// A sink in `mode`: "plain", or "starttls" / "tls" followed by the certificate and key files.
fn sink_with(mode: &[&str]) -> Option<Sink> {
    let Some(python) = python() else {
        skipped("\n*** SKIPPED: Python's aiosmtpd is not installed. Install it with:\n***   apt-get install -y python3-aiosmtpd\n");
        return None;
    };
    let dir = tempfile::tempdir().unwrap();
    let maildir = dir.path().join("maildir");
    let script = dir.path().join("sink.py");
    std::fs::write(&script, SINK).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut child = Command::new(python)
        .args(["-W", "ignore"]) // aiosmtpd's own deprecation notices
        .arg(&script)
        .arg(&maildir)
        .arg(port.to_string())
        .args(mode)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready", "the SMTP sink did not start");
    Some(Sink { child, port, maildir, _dir: dir })
}

/// The messages delivered so far, as text.
fn delivered(maildir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(maildir.join("new")) else { return vec![] };
    entries.map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap()).collect()
}

fn mail(sink: &Sink, extra: &str) -> ResourceConfig {
    configure(&Smtp, "mail", &format!("port = {}\n{extra}", sink.port)).unwrap()
}

fn run(resources: Vec<ResourceConfig>, lua: &str) -> Vec<Value> {
    let source = format!("return {{ f = function()\n{lua}\nend }}");
    run_lua(resources, &source, "f", vec![], Duration::from_secs(20)).unwrap()
}

#[test]
fn a_message_arrives_with_subject_body_and_attachment() {
    let Some(sink) = sink() else { return };
    let r = run(
        vec![mail(&sink, "")],
        r#"return pmnc.transaction.mail.send{
             from = "Shop <shop@example.com>",
             to = "alice@example.org",
             cc = { "Bob <bob@example.org>" },
             bcc = "audit@example.org",
             subject = "Your order 42",
             text = "Thank you for your order.",
             html = "<p>Thank you for your <b>order</b>.</p>",
             attachments = { { name = "invoice.txt", content_type = "text/plain", data = "INVOICE-42" } },
           }"#,
    );
    let id = r[0].get("message_id").and_then(|v| v.as_str()).unwrap().to_string();
    assert!(id.starts_with('<') && id.ends_with("@example.com>"), "{r:?}");
    assert_eq!(r[0].get("accepted"), Some(&Value::Int(3)));
    let messages = delivered(&sink.maildir);
    assert_eq!(messages.len(), 1);
    let m = &messages[0];
    assert!(m.contains("Subject: Your order 42"), "{m}");
    assert!(m.contains(&format!("Message-ID: {id}")), "{m}");
    assert!(m.contains("Thank you for your order."), "{m}");
    assert!(m.contains("<b>order</b>"), "{m}");
    assert!(m.contains("filename=\"invoice.txt\""), "{m}");
    assert!(m.contains("INVOICE-42") || m.contains("SU5WT0lDRS00Mg=="), "the attachment's data: {m}");
    assert!(m.contains("X-RcptTo: alice@example.org, bob@example.org, audit@example.org"), "{m}");
    assert!(!m.contains("Bcc:"), "{m}");
}

#[test]
fn a_rolled_back_transaction_sends_nothing() {
    let Some(sink) = sink() else { return };
    let r = run(
        vec![mail(&sink, "pool_size = 2\n")],
        r#"local msg = { from = "a@example.com", to = "b@example.org", subject = "s", text = "t" }
           -- Another participant fails: the message waits for a commit that never comes.
           local xa = pmnc.transaction.create()
           xa.mail.send(msg)
           xa.mail.bogus()
           local ok1, e1 = pcall(xa.execute)
           -- accept says no.
           local xb = pmnc.transaction.create{ accept = function() return false end }
           xb.mail.send(msg)
           local ok2 = pcall(xb.execute)
           pmnc.sleep(0.2)
           -- The connection just rolled back is the next one handed out: its session was reset.
           pmnc.transaction.mail.send{ from = "a@example.com", to = "b@example.org", text = "after" }
           return ok1, e1.participant, ok2"#,
    );
    assert_eq!(r, vec![Value::Bool(false), Value::Int(2), Value::Bool(false)]);
    let messages = delivered(&sink.maildir);
    assert_eq!(messages.len(), 1, "only the message sent after the rollbacks: {messages:?}");
    assert!(messages[0].contains("after"), "{messages:?}");
}

#[test]
fn one_connection_carries_several_messages() {
    let Some(sink) = sink() else { return };
    run(
        vec![mail(&sink, "pool_size = 1\n")],
        r#"for i = 1, 3 do pmnc.transaction.mail.send{ from = "a@example.com", to = "b@example.org", text = "n" .. i } end"#,
    );
    let messages = delivered(&sink.maildir);
    assert_eq!(messages.len(), 3);
    let peers: std::collections::BTreeSet<&str> = messages.iter().map(|m| m.lines().find(|l| l.starts_with("X-Peer:")).unwrap()).collect();
    assert_eq!(peers.len(), 1, "one SMTP session: {peers:?}");
}

#[test]
fn a_refused_recipient_fails_before_anything_is_sent() {
    let Some(sink) = sink() else { return };
    let r = run(
        vec![mail(&sink, "")],
        r#"local ok, e = pcall(pmnc.transaction.mail.send, {
             from = "a@example.com", to = { "good@example.org", "rejected@example.org" }, text = "t" })
           return ok, e.code, e.recoverable, tostring(e)"#,
    );
    assert_eq!(r[0], Value::Bool(false));
    assert_eq!(r[1], Value::str("550"));
    assert_eq!(r[2], Value::Bool(true));
    assert_eq!(
        r[3],
        Value::str(
            "resource mail (participant 1): the server refused the recipient <rejected@example.org>: 550 5.1.1 <rejected@example.org>: no such user [550]"
        )
    );
    assert_eq!(delivered(&sink.maildir).len(), 0);
}

#[test]
fn a_message_refused_at_commit_fails_the_commit() {
    let Some(sink) = sink() else { return };
    let r = run(
        vec![mail(&sink, "")],
        r#"local ok, e = pcall(pmnc.transaction.mail.send, { from = "a@example.com", to = "b@example.org", text = "refuse-this-message" })
           -- The session is usable afterwards.
           local after = pmnc.transaction.mail.send{ from = "a@example.com", to = "b@example.org", text = "fine" }
           return ok, e.code, tostring(e), after.accepted"#,
    );
    assert_eq!(r[0], Value::Bool(false));
    assert_eq!(r[1], Value::str("554"));
    assert_eq!(r[2], Value::str("resource mail (participant 1): commit failed: the server refused the message: 554 5.6.0 content refused [554]"));
    assert_eq!(r[3], Value::Int(1));
    assert_eq!(delivered(&sink.maildir).len(), 1);
}

/// A private CA and a certificate for localhost signed by it, made with the openssl tool, or
/// None (after a loud message) without it.
fn certificates() -> Option<tempfile::TempDir> {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("leaf.ext"), "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n")
        .unwrap();
    let steps: [&[&str]; 3] = [
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=rustomnic test CA",
        ],
        &["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", "leaf.key", "-out", "leaf.csr", "-subj", "/CN=localhost"],
        &["x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out", "leaf.pem", "-days", "2", "-extfile", "leaf.ext"],
    ];
    for args in steps {
        let ok = Command::new("openssl").args(args).current_dir(d).stderr(Stdio::null()).status().is_ok_and(|s| s.success());
        if !ok {
            skipped("\n*** SKIPPED: the openssl tool is needed to make test certificates (apt-get install -y openssl)\n");
            return None;
        }
    }
    Some(dir)
}

fn tls_sink(mode: &str, certs: &Path) -> Option<Sink> {
    let leaf = certs.join("leaf.pem").display().to_string();
    let key = certs.join("leaf.key").display().to_string();
    sink_with(&[mode, &leaf, &key])
}

#[test]
fn starttls_with_a_private_ca_and_authentication() {
    let Some(certs) = certificates() else { return };
    let Some(sink) = tls_sink("starttls", certs.path()) else { return };
    let ca = certs.path().join("ca.pem");
    let keys = format!("host = \"localhost\"\ntls = \"starttls\"\ntls_ca_file = \"{}\"\nusername = \"u\"\n", ca.display());
    let good = configure(&Smtp, "mail", &format!("port = {}\n{keys}password = \"pw\"\n", sink.port)).unwrap();
    let r = run(vec![good], r#"return pmnc.transaction.mail.send{ from = "a@example.com", to = "b@example.org", subject = "over tls", text = "t" }.accepted"#);
    assert_eq!(r, vec![Value::Int(1)]);
    let messages = delivered(&sink.maildir);
    assert_eq!(messages.len(), 1);
    assert!(messages[0].contains("Subject: over tls"), "{messages:?}");
    let bad = configure(&Smtp, "mail", &format!("port = {}\n{keys}password = \"wrong\"\n", sink.port)).unwrap();
    let r = run(vec![bad], r#"local ok, e = pcall(pmnc.transaction.mail.send, {}) return e.message"#);
    let m = r[0].as_str().unwrap();
    assert!(m.starts_with(&format!("cannot connect: localhost:{}: authentication failed: ", sink.port)), "{m}");
    assert!(m.contains("535"), "{m}");
}

#[test]
fn implicit_tls_trusts_only_known_roots() {
    let Some(certs) = certificates() else { return };
    let Some(sink) = tls_sink("tls", certs.path()) else { return };
    let ca = certs.path().join("ca.pem");
    let trusted =
        configure(&Smtp, "mail", &format!("host = \"localhost\"\nport = {}\ntls = \"tls\"\ntls_ca_file = \"{}\"\n", sink.port, ca.display())).unwrap();
    let r = run(vec![trusted], r#"return pmnc.transaction.mail.send{ from = "a@example.com", to = "b@example.org", text = "t" }.accepted"#);
    assert_eq!(r, vec![Value::Int(1)]);
    assert_eq!(delivered(&sink.maildir).len(), 1);
    let untrusted = configure(&Smtp, "mail", &format!("host = \"localhost\"\nport = {}\ntls = \"tls\"\n", sink.port)).unwrap();
    let r = run(vec![untrusted], r#"local ok, e = pcall(pmnc.transaction.mail.send, {}) return e.message"#);
    let m = r[0].as_str().unwrap();
    assert!(m.starts_with(&format!("cannot connect: localhost:{}: ", sink.port)), "{m}");
    assert!(m.ends_with("Connection error: invalid peer certificate: UnknownIssuer"), "{m}");
}

#[test]
fn starttls_is_required_when_configured() {
    let Some(sink) = sink() else { return };
    let r = run(vec![mail(&sink, "tls = \"starttls\"\n")], r#"local ok, e = pcall(pmnc.transaction.mail.send, {}) return e.message"#);
    assert_eq!(r[0], Value::str(format!("cannot connect: 127.0.0.1:{}: the server does not offer STARTTLS (tls = \"starttls\")", sink.port)));
}

#[test]
fn validation_and_connection_errors_read_well() {
    let unreachable = configure(&Smtp, "mail", "port = 1\n").unwrap();
    let r = run(
        vec![unreachable],
        r#"local c = pmnc.transaction.mail
           local ok1, e1 = pcall(c.send, { from = "a@example.com", to = "b@example.org", text = "t" })
           local ok2, e2 = pcall(c.deliver, {})
           return e1.message, e2.message"#,
    );
    let connect = r[0].as_str().unwrap();
    assert!(connect.starts_with("cannot connect: 127.0.0.1:1: "), "{connect}");
    assert!(connect.contains("refused"), "{connect}");
    // The pool connects before the call, so even a bad call needs a server; see the test below.
    assert!(r[1].as_str().unwrap().starts_with("cannot connect"), "{r:?}");
    let Some(sink) = sink() else { return };
    let r = run(
        vec![mail(&sink, "")],
        r#"local c = pmnc.transaction.mail
           local out = {}
           for i, args in ipairs({
             { { from = "a@example.com", to = "not an address", text = "t" } },
             { { from = "a@example.com", to = "b@example.org", text = "t", attachments = { { name = "x" } } } },
             { "text" },
           }) do
             local ok, e = pcall(c.send, table.unpack(args))
             out[i] = e.message
           end
           local ok, e = pcall(c.deliver, {})
           out[#out + 1] = e.message
           return out"#,
    );
    let Value::Array(m) = &r[0] else { panic!("{r:?}") };
    assert!(m[0].as_str().unwrap().starts_with("send: to: "), "{m:?}");
    assert_eq!(m[1], Value::str("send: attachment 1 (x) needs data (a string of bytes)"));
    assert_eq!(m[2], Value::str("send takes one table: send{from = ..., to = ..., subject = ..., text = ...}, got string"));
    assert_eq!(m[3], Value::str("no method deliver (methods: send)"));
    assert_eq!(delivered(&sink.maildir).len(), 0);
}

#[test]
fn config_problems_name_the_key() {
    let e = configure(&Smtp, "mail", "tls = \"ssl\"\nport = 70000\nusername = \"u\"\n").unwrap_err();
    assert_eq!(e.len(), 3, "{e:?}");
    assert_eq!(e[0], "cage.toml:2: resources.mail.tls: \"ssl\" is not one of \"none\", \"starttls\", \"tls\"");
    assert!(e[1].starts_with("cage.toml:3: resources.mail.port: 70000 is out of range"), "{e:?}");
    assert!(e[2].starts_with("cage.toml:4: resources.mail.username: a username needs a password"), "{e:?}");
    let unknown = configure(&Smtp, "mail", "hots = \"x\"\n").unwrap_err();
    assert_eq!(unknown, ["cage.toml:2: resources.mail.hots: unknown key"]);
    std::env::set_var("RUSTOMNIC_SMTP_TEST_PASSWORD", "pw");
    assert!(configure(&Smtp, "mail", "host = \"mail.example.com\"\ntls = \"tls\"\nusername = \"u\"\npassword = \"${RUSTOMNIC_SMTP_TEST_PASSWORD}\"\n").is_ok());
    let plain_ca = configure(&Smtp, "mail", "tls_ca_file = \"/etc/hostname\"\n").unwrap_err();
    assert!(plain_ca[0].starts_with("cage.toml:2: resources.mail.tls_ca_file: /etc/hostname holds no certificate"), "{plain_ca:?}");
    let unset = configure(&Smtp, "mail", "username = \"u\"\npassword = \"${RUSTOMNIC_SMTP_SURELY_UNSET}\"\n").unwrap_err();
    assert!(unset[0].contains("resources.mail.password: environment variable RUSTOMNIC_SMTP_SURELY_UNSET is not set"), "{unset:?}");
}

/// Says loudly that a test did not run: written to the process's stderr directly, which the test
/// harness does not capture, so it shows in a plain `cargo test`.
fn skipped(message: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{message}");
}
