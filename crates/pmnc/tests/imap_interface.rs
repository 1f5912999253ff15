//! The `imap` interface through the real binary against a Dovecot of the test's own (a throw-away
//! config in a temp dir, maildir, a passwd-file user), messages put in with Python's imaplib:
//! each handled once, moved or marked only after success, a failing message left unseen or
//! moved to failed_to after its attempts, new mail during IDLE handled at once, delete after
//! success while polling, imaps with a throw-away CA, and Dovecot restarted mid-run. One Dovecot,
//! one pmnc process with four imap interfaces.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const DOVECOT: &str = "/usr/sbin/dovecot";

/// A Dovecot started for one test; stopped when dropped.
struct Dovecot {
    child: Option<Child>,
    config: PathBuf,
    port: u16,
    /// imaps, with the certificate of `ca.pem` in the test's folder.
    tls_port: u16,
}

impl Dovecot {
    /// A Dovecot with its files in `dir`, serving imaps with `cert`/`key` (PEM).
    fn new(dir: &Path, cert: &str, key: &str) -> Dovecot {
        let port = spare_port();
        let tls_port = spare_port();
        let uid = String::from_utf8(Command::new("id").arg("-u").output().unwrap().stdout).unwrap().trim().to_string();
        let user = String::from_utf8(Command::new("id").arg("-un").output().unwrap().stdout).unwrap().trim().to_string();
        let gid = String::from_utf8(Command::new("id").arg("-g").output().unwrap().stdout).unwrap().trim().to_string();
        for sub in ["run", "state", "mail"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        // Dovecot gives no mail access to root: as root, the mail is nobody's.
        let (mail_uid, mail_gid, users) = if uid == "0" {
            use std::os::unix::fs::PermissionsExt;
            for (p, mode) in [(dir.to_path_buf(), 0o755), (dir.join("mail"), 0o777)] {
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            }
            ("65534".to_string(), "65534".to_string(), String::new())
        } else {
            (uid, gid, format!("default_internal_user = {user}\ndefault_login_user = {user}\n"))
        };
        std::fs::write(dir.join("passwd"), "test:{PLAIN}secret::::::\n").unwrap();
        std::fs::write(dir.join("cert.pem"), cert).unwrap();
        std::fs::write(dir.join("key.pem"), key).unwrap();
        let d = dir.display();
        let config = format!(
            "base_dir = {d}/run\nstate_dir = {d}/state\ninstance_name = pmnc-test-{port}\nlog_path = {d}/dovecot.log\n{users}\
             protocols = imap\nlisten = 127.0.0.1\nssl = yes\nssl_cert = <{d}/cert.pem\nssl_key = <{d}/key.pem\ndisable_plaintext_auth = no\nauth_mechanisms = plain\n\
             mail_location = maildir:{d}/mail/%u\nfirst_valid_uid = 1\n\
             passdb {{\n  driver = passwd-file\n  args = scheme=PLAIN username_format=%u {d}/passwd\n}}\n\
             userdb {{\n  driver = static\n  args = uid={mail_uid} gid={mail_gid} home={d}/mail/%u\n}}\n\
             service imap-login {{\n  chroot =\n  inet_listener imap {{\n    address = 127.0.0.1\n    port = {port}\n  }}\n  inet_listener imaps {{\n    address = 127.0.0.1\n    port = {tls_port}\n  }}\n}}\n\
             service anvil {{\n  chroot =\n}}\n"
        );
        let path = dir.join("dovecot.conf");
        std::fs::write(&path, config).unwrap();
        let mut d = Dovecot { child: None, config: path, port, tls_port };
        d.start();
        d
    }

    fn start(&mut self) {
        // A process group of its own: stop() ends the master and every imap process it forked,
        // so no client connection outlives the server the test stopped.
        let child = Command::new(DOVECOT).arg("-F").arg("-c").arg(&self.config).process_group(0).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
        self.child = Some(child);
        let up = until(Duration::from_secs(10), || std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok());
        assert!(up, "dovecot did not start: {}", std::fs::read_to_string(self.config.with_file_name("dovecot.log")).unwrap_or_default());
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // A negative pid: every process of the group the master leads.
            let group = -(c.id() as i32);
            unsafe_kill(group, 15);
            let deadline = Instant::now() + Duration::from_secs(10);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            // A child that outlived the master (or a master that did not stop) would keep its
            // clients connected to a server the test believes stopped.
            unsafe_kill(group, 9);
            let _ = c.wait();
        }
        // Until the port is free, a new master cannot bind it.
        until(Duration::from_secs(10), || std::net::TcpListener::bind(("127.0.0.1", self.port)).is_ok());
    }
}

impl Dovecot {
    /// Dovecot's own log, for a failure's message.
    fn log(&self) -> String {
        std::fs::read_to_string(self.config.with_file_name("dovecot.log")).unwrap_or_default()
    }
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        self.stop();
    }
}

/// imaplib: `append MAILBOX SUBJECT...` puts messages in; `state` prints every mailbox's
/// messages as {mailbox: [[subject, flags], ...]}.
const IMAP: &str = r#"
import imaplib, json, sys, email
port, cmd = int(sys.argv[1]), sys.argv[2]
c = imaplib.IMAP4("127.0.0.1", port)
c.login("test", "secret")
if cmd == "append":
    box = sys.argv[3]
    c.create(box)
    for subject in sys.argv[4:]:
        msg = "From: a@sender.test\r\nTo: inbox@example.org\r\nSubject: %s\r\nMessage-ID: <%s@sender.test>\r\n\r\nbody of %s\r\n" % (subject, subject, subject)
        typ, data = c.append(box, None, None, msg.encode())
        assert typ == "OK", data
else:
    out = {}
    for box in ["INBOX", "Processed", "Failed", "Other", "Del", "Secure"]:
        typ, n = c.select(box, readonly=True)
        if typ != "OK":
            continue
        out[box] = []
        if int(n[0]) == 0:
            continue
        typ, data = c.fetch("1:*", "(FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        items = []
        for d in data or []:
            if isinstance(d, tuple):
                flags = d[0].decode().split("FLAGS (")[1].split(")")[0]
                subject = email.message_from_bytes(d[1])["Subject"]
                items.append([subject, flags])
        out[box] = sorted(items)
    print(json.dumps(out))
c.logout()
"#;

fn imap(script: &Path, port: u16, args: &[&str]) -> String {
    let out = Command::new("/usr/bin/python3").arg(script).arg(port.to_string()).args(args).output().unwrap();
    assert!(out.status.success(), "imaplib {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn state(script: &Path, port: u16) -> serde_json::Value {
    serde_json::from_str(&imap(script, port, &["state"])).unwrap()
}

const MAIL: &str = r#"
local M = {}
function M.handle(m)
  local e = m.envelope
  pmnc.log.info("GOT " .. pmnc.hex.encode(pmnc.json.encode({ subject = m.headers.subject, mailbox = e.mailbox, uid = e.uid, attempt = e.attempt, text = m.text })) .. " END")
  if m.headers.subject == "FAIL" then error("refused on purpose") end
  if m.headers.subject == "FLAKY" and e.attempt == 1 then error("flaky on purpose") end
end
return M
"#;

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

fn count(s: &Server, mailbox: &str, subject: &str) -> usize {
    records(s).iter().filter(|r| r["subject"] == subject && r["mailbox"] == mailbox).count()
}

/// Waits (reading the log) until `subject` was handled `n` times from `mailbox`.
fn wait_handled(s: &mut Server, mailbox: &str, subject: &str, n: usize, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if count(s, mailbox, subject) >= n {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        s.drain(Duration::from_millis(20));
    }
}

fn subjects(state: &serde_json::Value, mailbox: &str) -> Vec<String> {
    state[mailbox].as_array().map(|a| a.iter().map(|m| m[0].as_str().unwrap().to_string()).collect()).unwrap_or_default()
}

fn flags_of(state: &serde_json::Value, mailbox: &str, subject: &str) -> String {
    state[mailbox]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m[0] == subject)
        .map(|m| m[1].as_str().unwrap().to_string())
        .unwrap_or_else(|| panic!("{subject} not in {mailbox}: {state}"))
}

#[test]
fn dovecot_mail_is_handled_once_and_marked_after_success() {
    if !Path::new(DOVECOT).exists() {
        eprintln!("SKIPPED: the imap interface tests need Dovecot (install with: apt-get install -y dovecot-imapd)");
        return;
    }
    let t = Tree::new();
    let (ca, cert, key) = test_certificates("imap");
    let mut dovecot = Dovecot::new(&t.path().join("dovecot"), &cert, &key);
    t.write("c/ca.pem", &ca);
    let script = t.write("imap.py", IMAP);
    let (port, tls_port) = (dovecot.port, dovecot.tls_port);
    // Waiting before pmnc starts: handled at its first look.
    imap(&script, port, &["append", "INBOX", "one", "two", "FAIL", "FLAKY"]);
    imap(&script, port, &["append", "Other", "seen-one", "FAIL"]);
    imap(&script, port, &["append", "Del", "deleted-one"]);
    imap(&script, port, &["append", "Secure", "secure-one"]);

    let toml = format!(
        r#"
[interfaces.inbox]
protocol = "imap"
handler = "mail.handle"
host = "127.0.0.1"
port = {port}
tls = false
user = "test"
password = "${{IMAP_TEST_PASSWORD}}"
move_to = "Processed"
failed_to = "Failed"
max_attempts = 2
retry_delay = "300ms"
poll_interval = "60s"

[interfaces.other]
protocol = "imap"
handler = "mail.handle"
host = "127.0.0.1"
port = {port}
tls = false
user = "test"
password = "${{IMAP_TEST_PASSWORD}}"
mailbox = "Other"
retry_delay = "1h"
poll_interval = "60s"

[interfaces.del]
protocol = "imap"
handler = "mail.handle"
host = "127.0.0.1"
port = {port}
tls = false
user = "test"
password = "${{IMAP_TEST_PASSWORD}}"
mailbox = "Del"
delete = true
idle = false
poll_interval = "60s"

[interfaces.secure]
protocol = "imap"
handler = "mail.handle"
host = "127.0.0.1"
port = {tls_port}
ca = "ca.pem"
user = "test"
password = "${{IMAP_TEST_PASSWORD}}"
mailbox = "Secure"
"#
    );
    t.write("c/cage.toml", &toml);
    t.write("c/mail.lua", MAIL);
    let mut s =
        Server::try_start_env(&t.path().join("c"), 2, &[], &[("IMAP_TEST_PASSWORD", "secret")]).unwrap_or_else(|log| panic!("pmnc did not start:\n{log}"));

    // The first look: the waiting messages, the flaky one twice, the failing one until moved aside.
    for (mailbox, subject, n) in [
        ("INBOX", "one", 1),
        ("INBOX", "two", 1),
        ("INBOX", "FLAKY", 2),
        ("INBOX", "FAIL", 2),
        ("Other", "seen-one", 1),
        ("Other", "FAIL", 1),
        ("Del", "deleted-one", 1),
        ("Secure", "secure-one", 1),
    ] {
        assert!(wait_handled(&mut s, mailbox, subject, n, Duration::from_secs(15)), "{mailbox} {subject} x{n}: {:?}\n{}", records(&s), s.log.join("\n"));
    }
    assert!(s.wait_for("moved to \"Failed\" after 2 failed attempts", Duration::from_secs(10)).is_some(), "{}", s.log.join("\n"));
    let st = state(&script, port);
    assert_eq!(subjects(&st, "INBOX"), Vec::<String>::new(), "{st}");
    assert_eq!(subjects(&st, "Processed"), ["FLAKY", "one", "two"], "{st}");
    assert_eq!(subjects(&st, "Failed"), ["FAIL"], "{st}");
    // Over imaps (tls = true, the test's CA): handled and seen.
    assert!(until(Duration::from_secs(5), || state(&script, port)["Secure"][0][1].as_str().unwrap_or("").contains("\\Seen")), "{}", state(&script, port));
    // delete = true (and polling, idle = false): the handled message is gone.
    assert!(until(Duration::from_secs(5), || subjects(&state(&script, port), "Del").is_empty()), "{}", state(&script, port));
    // \Seen mode: the handled one is seen, the failing one stays unseen (retried in an hour).
    assert!(flags_of(&st, "Other", "seen-one").contains("\\Seen"), "{st}");
    assert!(!flags_of(&st, "Other", "FAIL").contains("\\Seen"), "{st}");
    let flaky: Vec<_> = records(&s).into_iter().filter(|r| r["subject"] == "FLAKY").map(|r| r["attempt"].as_i64().unwrap()).collect();
    assert_eq!(flaky, [1, 2]);
    assert_eq!(records(&s).iter().find(|r| r["subject"] == "one").unwrap()["text"], "body of one\r\n");

    // New mail while the interface waits in IDLE (polling would take 60 s): handled at once.
    let sent = Instant::now();
    imap(&script, port, &["append", "INBOX", "idle-new"]);
    assert!(wait_handled(&mut s, "INBOX", "idle-new", 1, Duration::from_secs(10)));
    assert!(sent.elapsed() < Duration::from_secs(5), "IDLE woke the interface after {:?}", sent.elapsed());

    // Dovecot restarted: the interfaces connect again and go on.
    dovecot.stop();
    assert!(s.wait_for_new("connecting again with backoff", Duration::from_secs(15)).is_some(), "{}\n--- dovecot.log:\n{}", s.log.join("\n"), dovecot.log());
    dovecot.start();
    imap(&script, port, &["append", "INBOX", "after-restart"]);
    assert!(wait_handled(&mut s, "INBOX", "after-restart", 1, Duration::from_secs(15)), "{}", s.log.join("\n"));
    assert!(s.wait_for("connected again after", Duration::from_secs(5)).is_some());

    // Each handled once (the failing ones as often as their attempts), nothing left unhandled.
    s.drain(Duration::from_millis(300));
    for (mailbox, subject, n) in [
        ("INBOX", "one", 1),
        ("INBOX", "two", 1),
        ("INBOX", "FLAKY", 2),
        ("INBOX", "FAIL", 2),
        ("Other", "seen-one", 1),
        ("Other", "FAIL", 1),
        ("Del", "deleted-one", 1),
        ("Secure", "secure-one", 1),
        ("INBOX", "idle-new", 1),
        ("INBOX", "after-restart", 1),
    ] {
        assert_eq!(count(&s, mailbox, subject), n, "{mailbox} {subject}: {:?}", records(&s));
    }
    let st = state(&script, port);
    assert_eq!(subjects(&st, "INBOX"), Vec::<String>::new(), "{st}");
    assert_eq!(subjects(&st, "Processed"), ["FLAKY", "after-restart", "idle-new", "one", "two"], "{st}");
}

#[test]
fn bad_imap_config_is_refused_with_file_line_and_key() {
    let t = Tree::new();
    t.write("c/cage.toml", "[interfaces.inbox]\nprotocol = \"imap\"\nhost = \"127.0.0.1\"\nmove_to = \"Done\"\ndelete = true\npoll_interval = \"0s\"\n");
    t.write("c/inbox.lua", "return { handle = function(m) end }\n");
    let out = pmnc_limited(&["check", t.path().join("c").to_str().unwrap()], Duration::from_secs(60));
    assert_ne!(out.code, Some(0));
    let text = format!("{}{}", out.stdout, out.stderr);
    assert!(text.contains("user is required"), "{text}");
    assert!(text.contains("password is required"), "{text}");
    assert!(text.contains("cage.toml:5: interfaces.inbox.delete: cannot be used with move_to"), "{text}");
    assert!(text.contains("cage.toml:6: interfaces.inbox.poll_interval"), "{text}");
}
