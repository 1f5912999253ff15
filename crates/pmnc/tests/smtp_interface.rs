//! The `smtp` interface through the real binary with Python's smtplib as the sender: plain and
//! multipart messages, the handler's failure as 451, the size limit as 552, recipients over the
//! limit or outside the accepted domains, pipelining with dot-stuffing, a client gone mid-DATA,
//! bad command sequences, long lines, STARTTLS with a throw-away certificate and require_tls.
//! One pmnc process with two smtp interfaces; one Python process runs every exchange.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

const TOML: &str = r#"
[interfaces.mx]
protocol = "smtp"
listen = "127.0.0.1:0"
handler = "mail.handle"
hostname = "mx.test"
accept_domains = ["example.org"]
max_recipients = 5
max_message_size = "64KiB"
max_errors = 7
request_timeout = "5s"

[interfaces.mxtls]
protocol = "smtp"
listen = "127.0.0.1:0"
handler = "mail.handle"
tls = { cert = "cert.pem", key = "key.pem" }
require_tls = true
max_connections = 3
idle_timeout = "2s"
"#;

const MAIL: &str = r#"
local M = {}
function M.handle(m)
  local h = m.headers
  if h.subject == "FAIL" then error("refused on purpose") end
  local t = {
    id = pmnc.request.id, subject = h.subject, from = h.from[1] and h.from[1].address,
    to = #h.to, message_id = h.message_id, mail_from = m.envelope.mail_from,
    rcpt_to = m.envelope.rcpt_to, helo = m.envelope.helo, tls = m.envelope.tls,
    parts = #m.parts, text = m.text, size = m.size, raw_ok = (#m.raw == m.size), attachments = {},
  }
  for _, a in ipairs(m.attachments) do
    t.attachments[#t.attachments + 1] = { filename = a.filename, content_type = a.content_type, size = a.size, sha = pmnc.hex.encode(pmnc.crypto.sha256(a.content)) }
  end
  pmnc.log.info("GOT " .. pmnc.hex.encode(pmnc.json.encode(t)) .. " END")
end
return M
"#;

/// Every exchange; prints one JSON object of results.
const CLIENT: &str = r#"
import json, smtplib, socket, ssl, sys, time, hashlib
from email.message import EmailMessage
port, tls_port, ca = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
out = {}

def raw_exchange(chunks, port=port):
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    f = s.makefile("rb")
    replies = []
    def read_reply():
        lines = []
        while True:
            l = f.readline().decode()
            if not l:
                return lines
            lines.append(l.rstrip("\r\n"))
            if len(l) < 4 or l[3] != "-":
                return lines
    replies.append(read_reply())
    for data, n in chunks:
        s.sendall(data)
        for _ in range(n):
            replies.append(read_reply())
    s.close()
    return replies

# 1. A plain message: the reply to DATA carries the request id.
with smtplib.SMTP("127.0.0.1", port, local_hostname="sender.test", timeout=10) as c:
    c.ehlo()
    out["ehlo"] = c.esmtp_features
    c.mail("ann@sender.test")
    c.rcpt("bob@example.org")
    code, text = c.data(b"From: Ann <ann@sender.test>\r\nTo: bob@example.org\r\nSubject: plain one\r\nMessage-ID: <p1@sender.test>\r\n\r\nHello Bob.\r\n")
    out["plain"] = [code, text.decode()]

# 2. Multipart with an attachment and a non-ASCII subject.
m = EmailMessage()
m["From"] = "ann@sender.test"
m["To"] = "bob@example.org, cy@example.org"
m["Subject"] = "Grüße ☃"
m.set_content("Body with ümlauts.\n")
blob = bytes(range(256)) * 20
m.add_attachment(blob, maintype="application", subtype="octet-stream", filename="data.bin")
out["blob_sha"] = hashlib.sha256(blob).hexdigest()
with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
    out["multipart"] = c.send_message(m)

# 3. A failing handler: 451, which smtplib raises as SMTPDataError.
try:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
        c.sendmail("ann@sender.test", ["bob@example.org"], b"Subject: FAIL\r\n\r\nx\r\n")
    out["fail"] = "accepted"
except smtplib.SMTPDataError as e:
    out["fail"] = [e.smtp_code, e.smtp_error.decode()]

# 4. Over the size: refused at MAIL FROM by SIZE=, and after DATA when no SIZE was said.
big = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 100
try:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
        c.sendmail("ann@sender.test", ["bob@example.org"], big)
    out["big_size"] = "accepted"
except smtplib.SMTPSenderRefused as e:
    out["big_size"] = e.smtp_code
with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
    c.ehlo()
    c.mail("ann@sender.test")
    c.rcpt("bob@example.org")
    # data() raises only when DATA itself is refused; the reply to the message is returned.
    out["big_data"] = c.data(big)[0]
    out["after_big"] = c.noop()[0]

# 5. Many recipients: five taken, more get 452; another domain gets 550.
rcpts = ["r%d@example.org" % i for i in range(7)] + ["x@other.test"]
with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
    refused = c.sendmail("ann@sender.test", rcpts, b"Subject: many\r\n\r\nto many\r\n")
    out["many"] = {k: v[0] for k, v in refused.items()}

# 6. Pipelining: every command in one write, the message (dot-stuffed) and QUIT in another.
out["pipelined"] = raw_exchange([
    (b"EHLO pipe.test\r\nMAIL FROM:<p@sender.test>\r\nRCPT TO:<bob@example.org>\r\nRCPT TO:<nobody@other.test>\r\nDATA\r\n", 5),
    (b"Subject: piped\r\n\r\nline one\r\n..leading dot\r\n.\r\nQUIT\r\n", 2),
])

# 7. A client gone in the middle of DATA: its message must never reach the handler.
s = socket.create_connection(("127.0.0.1", port), timeout=10)
f = s.makefile("rb")
f.readline()
s.sendall(b"HELO cut.test\r\nMAIL FROM:<c@sender.test>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n")
for _ in range(4):
    f.readline()
s.sendall(b"Subject: CUT\r\n\r\nhalf a message")
s.close()
with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
    c.sendmail("ann@sender.test", ["bob@example.org"], b"Subject: after cut\r\n\r\nx\r\n")

# 8. Bad sequences, refused commands and a long line; then too many errors close the session.
out["bad"] = raw_exchange([
    (b"DATA\r\n", 1), (b"HELO bad.test\r\n", 1), (b"DATA\r\n", 1), (b"RCPT TO:<bob@example.org>\r\n", 1),
    (b"VRFY bob\r\n", 1), (b"FROB\r\n", 1), (b"MAIL FROM:bob\r\n", 1), (b"NOOP " + b"x" * 3000 + b"\r\n", 1),
    (b"MAIL FROM:<a@b.test>\r\n", 1), (b"DATA\r\n", 1), (b"FROB\r\n", 1),
])

# 10. Attacks: a second message smuggled behind bare-LF line ends stays inside the first; an
# endless line costs nothing and the session goes on; commands pipelined after STARTTLS in the
# clear are dropped, never run as if they came over TLS.
out["smuggle"] = raw_exchange([
    (b"EHLO s.test\r\nMAIL FROM:<s@sender.test>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n", 4),
    (b"Subject: smuggle\r\n\r\na\n.\nMAIL FROM:<evil@sender.test>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\nSubject: evil\r\n\r\nb\r\n.\r\nNOOP\r\n", 2),
])
out["endless"] = raw_exchange([(b"HELO e.test\r\n", 1), (b"x" * 200000, 0), (b"\r\nNOOP\r\n", 2)])
s = socket.create_connection(("127.0.0.1", tls_port), timeout=10)
f = s.makefile("rb")
f.readline()
s.sendall(b"EHLO i.test\r\nSTARTTLS\r\nNOOP\r\n")
while not f.readline().startswith(b"250 "):
    pass
out["inject_starttls"] = f.readline().decode().strip()
t = ssl.create_default_context(cafile=ca).wrap_socket(s, server_hostname="127.0.0.1")
t.sendall(b"EHLO i.test\r\n")
out["inject_first"] = t.recv(4096).decode().split("\r\n")[0]
t.close()

# 9. STARTTLS, and require_tls refusing MAIL before it.
out["before_tls"] = raw_exchange([(b"EHLO t.test\r\nMAIL FROM:<a@sender.test>\r\n", 2)], port=tls_port)
ctx = ssl.create_default_context(cafile=ca)
with smtplib.SMTP("127.0.0.1", tls_port, timeout=10) as c:
    c.ehlo()
    out["tls_offered"] = c.has_extn("starttls")
    c.starttls(context=ctx)
    c.ehlo()
    out["tls_offered_after"] = c.has_extn("starttls")
    out["tls_cipher"] = c.sock.version()
    out["tls"] = c.sendmail("ann@sender.test", ["bob@example.org"], b"Subject: over tls\r\n\r\nsecret\r\n")
# 11. Three sessions held open: a fourth is refused; a silent one is closed after idle_timeout.
held = [socket.create_connection(("127.0.0.1", tls_port), timeout=10) for _ in range(3)]
files = [h.makefile("rb") for h in held]
out["held"] = [f.readline().decode()[:3] for f in files]
extra = socket.create_connection(("127.0.0.1", tls_port), timeout=10)
out["fourth"] = extra.makefile("rb").readline().decode().strip()
t0 = time.monotonic()
out["idle"] = files[0].readline().decode().strip()
out["idle_after"] = time.monotonic() - t0
print(json.dumps(out))
"#;

/// The handler's records, from its `GOT <hex json> END` log lines.
fn records(s: &Server) -> Vec<serde_json::Value> {
    s.log
        .iter()
        .filter_map(|l| {
            let hex = l.split("GOT ").nth(1)?.split(" END").next()?;
            let bytes: Vec<u8> = (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
            Some(serde_json::from_slice(&bytes).unwrap())
        })
        .collect()
}

fn by_subject<'a>(records: &'a [serde_json::Value], subject: &str) -> Vec<&'a serde_json::Value> {
    records.iter().filter(|r| r["subject"] == subject).collect()
}

#[test]
fn smtplib_delivers_to_the_handler_and_learns_every_outcome() {
    if Command::new("/usr/bin/python3").arg("-c").arg("import smtplib").output().map(|o| !o.status.success()).unwrap_or(true) {
        eprintln!("SKIPPED: smtp interface tests need /usr/bin/python3 (install with: apt-get install -y python3)");
        return;
    }
    let t = Tree::new();
    let (ca, cert, key) = test_certificates("smtp");
    t.write("c/cage.toml", TOML);
    t.write("c/mail.lua", MAIL);
    t.write("c/cert.pem", &cert);
    t.write("c/key.pem", &key);
    let ca_path = t.write("ca.pem", &ca);
    let script = t.write("client.py", CLIENT);
    let mut s = Server::start(&t.path().join("c"), &[]);
    let (port, tls_port) = (s.addr("mx").port(), s.addr("mxtls").port());
    let run = Command::new("/usr/bin/python3").arg(&script).arg(port.to_string()).arg(tls_port.to_string()).arg(&ca_path).output().unwrap();
    assert!(run.status.success(), "client failed: {}\n{}", String::from_utf8_lossy(&run.stderr), s.log.join("\n"));
    let out: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();

    // The last message of the run is the one over TLS: once it is logged, all earlier ones are.
    assert!(s.wait_for("GOT ", Duration::from_secs(5)).is_some());
    assert!(until(Duration::from_secs(10), || {
        s.drain(Duration::from_millis(20));
        !by_subject(&records(&s), "over tls").is_empty()
    }));
    let got = records(&s);

    // EHLO announces the extensions.
    for ext in ["size", "8bitmime", "pipelining", "enhancedstatuscodes"] {
        assert!(out["ehlo"].get(ext).is_some(), "{ext} in {}", out["ehlo"]);
    }
    assert_eq!(out["ehlo"]["size"], "65536");
    assert!(out["ehlo"].get("starttls").is_none(), "no STARTTLS without tls");

    // 1. plain: 250 with the request id the handler ran as.
    assert_eq!(out["plain"][0], 250);
    let plain = by_subject(&got, "plain one");
    assert_eq!(plain.len(), 1, "{got:?}");
    let id = plain[0]["id"].as_str().unwrap();
    assert!(out["plain"][1].as_str().unwrap().contains(&format!("queued as {id}")), "{}", out["plain"]);
    assert_eq!(plain[0]["from"], "ann@sender.test");
    assert_eq!(plain[0]["mail_from"], "ann@sender.test");
    assert_eq!(plain[0]["rcpt_to"], serde_json::json!(["bob@example.org"]));
    assert_eq!(plain[0]["helo"], "sender.test");
    assert_eq!(plain[0]["message_id"], "p1@sender.test");
    assert_eq!(plain[0]["text"], "Hello Bob.\r\n");
    assert_eq!(plain[0]["tls"], false);
    assert_eq!(plain[0]["raw_ok"], true);

    // 2. multipart: decoded subject, the text part, the attachment's bytes.
    assert_eq!(out["multipart"], serde_json::json!({}), "every recipient taken");
    let multi = by_subject(&got, "Grüße ☃");
    assert_eq!(multi.len(), 1, "{got:?}");
    assert_eq!(multi[0]["to"], 2);
    assert_eq!(multi[0]["parts"], 2);
    assert_eq!(multi[0]["text"], "Body with ümlauts.\r\n");
    let att = &multi[0]["attachments"][0];
    assert_eq!(att["filename"], "data.bin");
    assert_eq!(att["content_type"], "application/octet-stream");
    assert_eq!(att["size"], 5120);
    assert_eq!(att["sha"], out["blob_sha"]);

    // 3. the failed handler: 451 with the request id, logged with the error.
    assert_eq!(out["fail"][0], 451, "{}", out["fail"]);
    let text = out["fail"][1].as_str().unwrap();
    let fail_id = text.split("request ").nth(1).and_then(|r| r.split(')').next()).unwrap();
    assert!(s.wait_for_all(&[fail_id, "refused on purpose"], Duration::from_secs(5)).is_some(), "the failure is logged with its id");
    assert!(by_subject(&got, "FAIL").is_empty());

    // 4. size: 552 at MAIL FROM (SIZE=) and after DATA; the session goes on.
    assert_eq!(out["big_size"], 552);
    assert_eq!(out["big_data"], 552);
    assert_eq!(out["after_big"], 250);
    assert!(by_subject(&got, "big").is_empty());

    // 5. recipients: 452 over the limit, 550 for another domain, one message to the five.
    assert_eq!(out["many"], serde_json::json!({"r5@example.org": 452, "r6@example.org": 452, "x@other.test": 550}));
    let many = by_subject(&got, "many");
    assert_eq!(many.len(), 1);
    assert_eq!(many[0]["rcpt_to"].as_array().unwrap().len(), 5);

    // 6. pipelining: every reply in order, the stuffed dot removed.
    let codes = |replies: &serde_json::Value| -> Vec<String> {
        replies.as_array().unwrap().iter().map(|r| r.as_array().unwrap().last().unwrap().as_str().unwrap()[..3].to_string()).collect()
    };
    assert_eq!(codes(&out["pipelined"]), ["220", "250", "250", "250", "550", "354", "250", "221"], "{}", out["pipelined"]);
    let piped = by_subject(&got, "piped");
    assert_eq!(piped.len(), 1);
    assert_eq!(piped[0]["text"], "line one\r\n.leading dot\r\n");
    assert_eq!(piped[0]["helo"], "pipe.test");

    // 7. the message cut mid-DATA never ran; the next one did.
    assert_eq!(by_subject(&got, "after cut").len(), 1);
    assert!(by_subject(&got, "CUT").is_empty(), "{got:?}");

    // 8. bad sequences: 503, 501, 502, 500, the long line, then 421 after max_errors (7).
    assert_eq!(codes(&out["bad"]), ["220", "503", "250", "503", "503", "502", "500", "501", "500", "250", "554", "421"], "{}", out["bad"]);
    let long = out["bad"][8][0].as_str().unwrap();
    assert!(long.starts_with("500 5.5.2 Line too long"), "{long}");

    // 9. TLS: MAIL refused before STARTTLS, offered once, the message marked as over TLS.
    assert_eq!(codes(&out["before_tls"]), ["220", "250", "530"]);
    assert_eq!(out["tls_offered"], true);
    assert_eq!(out["tls_offered_after"], false);
    assert!(out["tls_cipher"].as_str().unwrap().starts_with("TLSv1."));
    assert_eq!(out["tls"], serde_json::json!({}));
    let tls = by_subject(&got, "over tls");
    assert_eq!(tls.len(), 1);
    assert_eq!(tls[0]["tls"], true);

    // 10. attacks: one message behind the smuggling attempt, its bytes inside it.
    assert_eq!(codes(&out["smuggle"]), ["220", "250", "250", "250", "354", "250", "250"], "{}", out["smuggle"]);
    let smuggled = by_subject(&got, "smuggle");
    assert_eq!(smuggled.len(), 1);
    assert!(smuggled[0]["text"].as_str().unwrap().contains("MAIL FROM:<evil@sender.test>"), "{}", smuggled[0]);
    assert!(by_subject(&got, "evil").is_empty());
    assert_eq!(codes(&out["endless"]), ["220", "250", "500", "250"], "{}", out["endless"]);
    assert!(out["inject_starttls"].as_str().unwrap().starts_with("220 2.0.0"), "{}", out["inject_starttls"]);
    assert!(out["inject_first"].as_str().unwrap().starts_with("250-"), "the NOOP sent in the clear ran over TLS: {}", out["inject_first"]);

    // 11. the connection limit and the idle timeout.
    assert_eq!(out["held"], serde_json::json!(["220", "220", "220"]));
    assert!(out["fourth"].as_str().unwrap().starts_with("421 4.3.2"), "{}", out["fourth"]);
    assert!(out["idle"].as_str().unwrap().starts_with("421 4.4.2 Idle"), "{}", out["idle"]);
    assert!(out["idle_after"].as_f64().unwrap() < 8.0, "{}", out["idle_after"]);

    // Each message ran once.
    assert_eq!(got.len(), 7, "{got:?}");
}

#[test]
fn bad_smtp_config_is_refused_with_file_line_and_key() {
    let t = Tree::new();
    t.write(
        "c/cage.toml",
        "[interfaces.mx]\nprotocol = \"smtp\"\nlisten = \"127.0.0.1:0\"\nrequire_tls = true\nmax_recipients = 0\ntls = { cert = \"missing.pem\", key = \"k.pem\" }\n",
    );
    t.write("c/mx.lua", "return { handle = function(m) end }\n");
    let out = pmnc_limited(&["check", t.path().join("c").to_str().unwrap()], Duration::from_secs(60));
    assert_ne!(out.code, Some(0));
    let text = format!("{}{}", out.stdout, out.stderr);
    assert!(text.contains("cage.toml:5: interfaces.mx.max_recipients"), "{text}");
    assert!(text.contains("missing.pem"), "{text}");
}
