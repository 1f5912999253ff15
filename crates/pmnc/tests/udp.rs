//! The `udp` interface and resource through the real binary, with Python's `socket` as the peer:
//! replies, no reply for nil or a failed handler, binary data, drops counted under a flood
//! (full, oversize) in the log and in /metrics, datagrams the resource sends at commit only, and
//! a live change of the interface's table.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::*;

/// The peer: `exchange ADDR TIMEOUT HEX...` sends each payload (hex) and prints the reply (hex)
/// or TIMEOUT; `flood ADDR N SIZE` sends N datagrams of SIZE bytes at once; `listen` prints its
/// port, then every datagram it receives (hex), until stdin closes.
const PEER: &str = r#"
import socket, sys, select
mode = sys.argv[1]
if mode == "listen":
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    print("port", s.getsockname()[1], flush=True)
    while True:
        r, _, _ = select.select([s, sys.stdin], [], [], 30)
        if not r or sys.stdin in r:
            break
        data, _ = s.recvfrom(70000)
        print("got", data.hex(), flush=True)
    sys.exit(0)
host, port = sys.argv[2].rsplit(":", 1)
to = (host, int(port))
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
if mode == "exchange":
    s.settimeout(float(sys.argv[3]))
    for h in sys.argv[4:]:
        s.sendto(bytes.fromhex(h), to)
        try:
            data, frm = s.recvfrom(70000)
            print("reply", data.hex(), flush=True)
        except socket.timeout:
            print("TIMEOUT", flush=True)
elif mode == "flood":
    n, size = int(sys.argv[3]), int(sys.argv[4])
    for i in range(n):
        s.sendto(b"x" * size, to)
    print("sent", n, flush=True)
"#;

fn python() -> bool {
    Command::new("python3").arg("-c").arg("import socket").output().is_ok_and(|o| o.status.success())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(h: &str) -> Vec<u8> {
    (0..h.len()).step_by(2).map(|i| u8::from_str_radix(&h[i..i + 2], 16).unwrap()).collect()
}

/// Sends each payload and gives each reply (None: no reply within `timeout`).
fn exchange(to: SocketAddr, timeout: f64, payloads: &[&[u8]]) -> Vec<Option<Vec<u8>>> {
    let mut args = vec!["-c".to_string(), PEER.to_string(), "exchange".into(), to.to_string(), timeout.to_string()];
    args.extend(payloads.iter().map(|p| hex(p)));
    let out = Command::new("python3").args(&args).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().lines().map(|l| l.strip_prefix("reply ").map(unhex)).collect()
}

fn flood(to: SocketAddr, n: usize, size: usize) {
    let out = Command::new("python3").args(["-c", PEER, "flood", &to.to_string(), &n.to_string(), &size.to_string()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// A Python socket receiving datagrams; stopped (stdin closed, killed) when dropped.
struct Listener {
    child: Child,
    port: u16,
    lines: mpsc::Receiver<Vec<u8>>,
}

impl Listener {
    fn start() -> Listener {
        let mut child = Command::new("python3").args(["-c", PEER, "listen"]).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        out.read_line(&mut first).unwrap();
        let port = first.trim().strip_prefix("port ").unwrap().parse().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in out.lines().map_while(Result::ok) {
                if let Some(h) = l.strip_prefix("got ") {
                    let _ = tx.send(unhex(h));
                }
            }
        });
        Listener { child, port, lines }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const LUA: &str = r#"
local M = {}
function M.handle(data, datagram)
  if data == "boom" then error("boom: refused") end
  if data == "nil" then return nil end
  if data == "table" then return { 1 } end
  if data == "slow" then pmnc.sleep(5) return "late" end
  local send = data:match("^send:(.*)$")
  if send then
    local xa = pmnc.transaction.create()
    xa.feed.send(send)
    xa.execute()
    return "sent"
  end
  local back = data:match("^rollback:(.*)$")
  if back then
    local xa = pmnc.transaction.create({ accept = function() return false end })
    xa.feed.send(back)
    local ok = pcall(xa.execute)
    return ok and "committed?" or "rolled back"
  end
  if data:byte(1) == 0 then return "binary " .. #data .. " " .. data:byte(2) end
  local from = datagram.peer:match("^127%.0%.0%.1:%d+$") and "local" or datagram.peer
  return "ECHO " .. data .. " from " .. from
end
function M.slow(data)
  pmnc.sleep(0.3)
  return "done"
end
return M
"#;

#[test]
fn datagrams_are_requests_replies_go_back_and_drops_are_counted() {
    if !python() {
        eprintln!("SKIPPED: udp: python3 is missing (install with: apt-get install -y python3)");
        return;
    }
    let feed = Listener::start();
    let t = Tree::new();
    t.write(
        "c/cage.toml",
        &format!(
            r#"
[interfaces.echo]
protocol = "udp"
listen = "127.0.0.1:0"
request_timeout = "1s"

[interfaces.flood]
protocol = "udp"
listen = "127.0.0.1:0"
handler = "echo.slow"
concurrency = 1
max_pending = 2
max_datagram_size = 100
recv_buffer = "1MiB"

[resources.feed]
protocol = "udp"
target = "127.0.0.1:{}"
"#,
            feed.port
        ),
    );
    t.write("c/echo.lua", LUA);
    let mut s = Server::start(&t.path().join("c"), &[]);
    // The sockets are bound on the interfaces' own threads, just after the start.
    for name in ["echo", "flood"] {
        assert!(s.wait_for_all(&["(udp, receive buffer", &format!("interface={name}")], Duration::from_secs(5)).is_some(), "{name} listens");
    }
    let (echo, flood_at) = (s.addr("echo"), s.addr("flood"));

    // Replies; nothing for nil, for a table, for a failure (logged) or past the deadline; the
    // process goes on serving.
    let r = exchange(echo, 0.7, &[b"hello", b"nil", b"boom", b"table", b"slow", b"after", b"\x00\xff\x01"]);
    assert_eq!(r[0].as_deref(), Some(&b"ECHO hello from local"[..]));
    assert_eq!(r[1], None, "nil sends nothing");
    assert_eq!(r[2], None, "a failed handler sends nothing");
    assert_eq!(r[3], None, "only a string is sent back");
    assert_eq!(r[4], None, "a handler past its deadline sends nothing");
    assert_eq!(r[5].as_deref(), Some(&b"ECHO after from local"[..]));
    assert_eq!(r[6].as_deref(), Some(&b"binary 3 255"[..]), "bytes reach Lua as they are");
    assert!(s.wait_for("boom: refused", Duration::from_secs(5)).is_some(), "the failure is logged");

    // The resource: committed datagrams are sent, rolled back ones are not.
    let r = exchange(echo, 3.0, &[b"rollback:never", b"send:first", b"send:second"]);
    assert_eq!(r, vec![Some(b"rolled back".to_vec()), Some(b"sent".to_vec()), Some(b"sent".to_vec())]);
    let got: Vec<Vec<u8>> = (0..2).map(|_| feed.lines.recv_timeout(Duration::from_secs(5)).expect("a datagram from the resource")).collect();
    assert_eq!(got, vec![b"first".to_vec(), b"second".to_vec()], "the rolled back one never came, the others in order");

    // A flood against one slot and two waiting: the rest are dropped and counted, as are
    // datagrams over max_datagram_size.
    flood(flood_at, 3, 101);
    flood(flood_at, 50, 10);
    let line = s.wait_for_all(&["udp datagrams dropped", "interface=flood"], Duration::from_secs(5)).expect("a drop report");
    assert!(line.contains("oversize 3"), "{line}");
    let monitor = monitor_addr(&mut s);
    let metric =
        |reason: &str| sample(&get(monitor, "/metrics").text(), &format!("pmnc_udp_datagrams_dropped{{cage=\"c\",interface=\"flood\",reason=\"{reason}\"}}"));
    assert_eq!(metric("oversize"), Some(3.0));
    let full = metric("full").unwrap();
    assert!((40.0..=47.0).contains(&full), "one runs, two wait, the rest are dropped: {full}");
    // What was taken is handled: 53 received, 3 oversize, `full` dropped, the rest acked.
    let text = || get(monitor, "/metrics").text();
    assert!(
        until(Duration::from_secs(5), || sample(&text(), "pmnc_messages_total{cage=\"c\",interface=\"flood\",event=\"acked\"}") == Some(50.0 - full)),
        "{}",
        text()
    );
    assert_eq!(sample(&text(), "pmnc_messages_total{cage=\"c\",interface=\"flood\",event=\"received\"}"), Some(53.0));
    assert!(sample(&text(), "pmnc_udp_datagrams_dropped{cage=\"c\",interface=\"echo\",reason=\"failed\"}").unwrap() >= 2.0, "boom and slow");
    assert_eq!(sample(&text(), "pmnc_udp_datagrams_dropped{cage=\"c\",interface=\"echo\",reason=\"reply\"}"), Some(1.0), "the table");
    // Still serving after all that.
    assert_eq!(exchange(echo, 3.0, &[b"last"])[0].as_deref(), Some(&b"ECHO last from local"[..]));

    // A changed table replaces the interface live: bound again, the new limit holds, and the
    // drop counts go on from where they were.
    let toml = std::fs::read_to_string(t.path().join("c/cage.toml")).unwrap();
    t.write_rename("c/cage.toml", &toml.replace("request_timeout = \"1s\"", "request_timeout = \"1s\"\nmax_reply_size = 10"));
    let line = s.wait_for_new("(udp, receive buffer", Duration::from_secs(10)).expect("the echo interface listens again");
    assert!(line.contains("interface=echo"), "{line}");
    let again: SocketAddr = line.split("listening on ").nth(1).and_then(|r| r.split_whitespace().next()).unwrap().parse().unwrap();
    let r = exchange(again, 0.7, &[b"hello", b"\x00\x07"]);
    assert_eq!(r[0], None, "a reply over max_reply_size is not sent");
    assert_eq!(r[1].as_deref(), Some(&b"binary 2 7"[..]));
    assert!(
        until(Duration::from_secs(3), || sample(&text(), "pmnc_udp_datagrams_dropped{cage=\"c\",interface=\"echo\",reason=\"reply\"}") == Some(2.0)),
        "{}",
        text()
    );
}

#[test]
fn bad_config_is_reported_with_its_key() {
    let t = Tree::new();
    t.write(
        "c/cage.toml",
        r#"
[interfaces.echo]
protocol = "udp"
listen = "127.0.0.1:0"
max_datagram_size = 70000

[resources.feed]
protocol = "udp"
target = "nowhere"
"#,
    );
    t.write("c/echo.lua", "local M = {} function M.handle() end return M");
    let out = pmnc(&["check", &t.path().join("c").display().to_string()]);
    let text = format!("{}{}", out.stdout, out.stderr);
    assert_ne!(out.code, Some(0), "{text}");
    assert!(text.contains("max_datagram_size"), "{text}");
    assert!(text.contains("target"), "{text}");
}
