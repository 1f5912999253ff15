//! The stomp interface and resource through the real binary and RabbitMQ's STOMP plugin
//! (PMNC_TEST_STOMP_URL, default stomp://guest:guest@127.0.0.1:61613/): a message in, a message
//! out in the handler's transaction; a rollback and an ERROR frame sending nothing; retries then
//! a dead letter with the error; kill -9 and SIGTERM mid-handler losing nothing; an oversized
//! body refused while the consumer goes on; the link cut and mended through a proxy; a silent
//! fake broker dropped after missed heart-beats; a fake broker without receipts failing the
//! commit after receipt_timeout; config problems with file, line and key. The test's own client is the same codec.
//! Queues are named after the test process and deleted at the end (over AMQP).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use rustomnic_resource_stomp::client::{self, Connected, StompUrl};
use rustomnic_resource_stomp::frame::{Decoded, Frame, Limits};

const START: &str = "rabbitmq-plugins enable rabbitmq_stomp";

fn url() -> String {
    std::env::var("PMNC_TEST_STOMP_URL").unwrap_or_else(|_| "stomp://guest:guest@127.0.0.1:61613/".to_string())
}

fn shout(text: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "\n!!!!!!!!\n{text}\n!!!!!!!!\n");
}

/// A name of this test process.
fn name(test: &str) -> String {
    format!("pmnc-stomp-test-{}-{test}", std::process::id())
}

/// The test's STOMP client on a runtime of its own; the queues it was told of are deleted (over
/// AMQP, which STOMP cannot do) when it is dropped.
struct Client {
    rt: tokio::runtime::Runtime,
    conn: Connected,
    url: StompUrl,
    queues: Vec<String>,
}

impl Client {
    /// None (and a loud SKIPPED) when no broker answers.
    fn new() -> Option<Client> {
        let url = client::parse_url(&url()).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        match rt.block_on(client::connect(&url, Duration::ZERO, Limits::default(), Duration::from_secs(5))) {
            Ok(conn) => Some(Client { rt, conn, url, queues: Vec::new() }),
            Err(e) => {
                shout(&format!("SKIPPED: no STOMP broker at {} ({e}); start it with: {START}", url.display));
                None
            }
        }
    }

    fn forget_later(&mut self, queue: &str) {
        self.queues.push(queue.to_string());
    }

    /// Sends and waits for the receipt.
    fn send(&mut self, destination: &str, body: &[u8], headers: &[(&str, &str)]) {
        let mut f = Frame::new("SEND").header("destination", destination).header("receipt", "r1");
        for (k, v) in headers {
            f = f.header(k, *v);
        }
        let f = f.with_body(body.to_vec());
        let conn = &mut self.conn;
        self.rt.block_on(async {
            conn.writer.send(&f).await.unwrap();
            let r = tokio::time::timeout(Duration::from_secs(10), conn.reader.frame()).await.unwrap().unwrap();
            assert_eq!(r.command, "RECEIPT");
        });
    }

    /// Subscribes (auto ack) on a connection of its own.
    fn subscribe(&self, destination: &str) -> Sub {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let mut conn = rt.block_on(client::connect(&self.url, Duration::ZERO, Limits::default(), Duration::from_secs(5))).unwrap();
        let f = Frame::new("SUBSCRIBE").header("id", "0").header("destination", destination).header("ack", "auto").header("receipt", "s");
        rt.block_on(async {
            conn.writer.send(&f).await.unwrap();
            let r = tokio::time::timeout(Duration::from_secs(10), conn.reader.frame()).await.unwrap().unwrap();
            assert_eq!(r.command, "RECEIPT");
        });
        Sub { rt, conn }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        use rustomnic_resource_amqp::lapin;
        let amqp = std::env::var("PMNC_TEST_AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_string());
        let queues = std::mem::take(&mut self.queues);
        self.rt.block_on(async {
            let Ok(conn) = lapin::Connection::connect(&amqp, lapin::ConnectionProperties::default()).await else { return };
            let Ok(ch) = conn.create_channel().await else { return };
            for q in queues {
                let _ = ch.queue_delete(q.as_str().into(), Default::default()).await;
            }
        });
    }
}

struct Sub {
    rt: tokio::runtime::Runtime,
    conn: Connected,
}

impl Sub {
    /// The next MESSAGE within `timeout`.
    fn next(&mut self, timeout: Duration) -> Option<Frame> {
        let conn = &mut self.conn;
        self.rt.block_on(async {
            let end = tokio::time::Instant::now() + timeout;
            loop {
                match tokio::time::timeout_at(end, conn.reader.next()).await {
                    Ok(Ok(Decoded::Frame(f))) if f.command == "MESSAGE" => return Some(f),
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => panic!("{e}"),
                    Err(_) => return None,
                }
            }
        })
    }
}

/// The names one test uses.
struct Names {
    input: String,
    output: String,
    dead: String,
}

impl Names {
    fn new(test: &str, c: &mut Client) -> Names {
        let n = Names { input: name(&format!("{test}-in")), output: name(&format!("{test}-out")), dead: name(&format!("{test}-dead")) };
        for q in [&n.input, &n.output, &n.dead] {
            c.forget_later(q);
        }
        n
    }
}

/// Records every attempt in pmnc.state; "boom" fails; "raise after send" sends and then rolls
/// back; "slow" waits (for kill -9); anything else is answered with a summary sent to OUT.
const APP: &str = r#"
local M = {}
local OUT = "/queue/@OUT@"

function M.handle(m)
  local id = m.headers.tag or "?"
  pmnc.state.set("seen:" .. id .. ":" .. m.attempt .. ":" .. tostring(m.redelivered), m.body)
  if m.body == "boom" then error("boom: the handler refused it") end
  if m.body == "slow" then pmnc.sleep(30) end
  if m.body == "pause" then pmnc.sleep(1.5) end
  if m.body == "bad destination" then
    local ok, e = pcall(function()
      local xa = pmnc.transaction.create()
      xa.out.send("/exchange/@OUT@-missing", "x")
      xa.execute()
    end)
    local xa = pmnc.transaction.create()
    xa.out.send(OUT, { ok = ok, error = tostring(e) })
    xa.execute()
    return
  end
  if m.body == "raise after send" then
    local xa = pmnc.transaction.create({ accept = function() error("refused after sending") end })
    xa.out.send(OUT, "must not appear")
    xa.execute()
  end
  local xa = pmnc.transaction.create()
  xa.out.send(OUT, {
    body = m.body, attempt = m.attempt, destination = m.destination, redelivered = m.redelivered,
    has_id = m.message_id ~= nil, tag = m.headers.tag,
  }, { tag = id, ["odd:name"] = "a\nb" })
  xa.execute()
end

return M
"#;

fn cage_toml(n: &Names, extra: &str) -> String {
    cage_toml_via(n, extra, &url())
}

/// The interface connects to `iface_url` (a proxy), the resource to the broker.
fn cage_toml_via(n: &Names, extra: &str, iface_url: &str) -> String {
    let url = url();
    format!(
        r#"[interfaces.in]
protocol = "stomp"
url = "{iface_url}"
destinations = ["/queue/{input}"]
dead_letter = "/queue/{dead}"
max_attempts = 3
retry_delay = "100ms"
max_message_size = "1KiB"
request_timeout = "40s"
handler = "app.handle"
{extra}
[resources.out]
protocol = "stomp"
url = "{url}"
"#,
        input = n.input,
        dead = n.dead
    )
}

fn start(t: &Tree, n: &Names) -> Server {
    t.write("c/cage.toml", &cage_toml(n, ""));
    t.write("c/app.lua", &APP.replace("@OUT@", &n.output));
    let mut s = Server::start(&t.path().join("c"), &[]);
    s.wait_for("consuming", Duration::from_secs(10)).expect("the consumer started");
    s
}

fn json(f: &Frame) -> serde_json::Value {
    serde_json::from_slice(&f.body).unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&f.body)))
}

#[test]
fn a_message_in_becomes_a_message_out_in_the_same_transaction_and_a_rollback_sends_nothing() {
    let Some(mut c) = Client::new() else { return };
    let n = Names::new("inout", &mut c);
    let t = Tree::new();
    let _s = start(&t, &n);
    let mut out = c.subscribe(&format!("/queue/{}", n.output));
    let mut dead = c.subscribe(&format!("/queue/{}", n.dead));
    c.send(&format!("/queue/{}", n.input), b"hello", &[("tag", "m1")]);
    let got = out.next(Duration::from_secs(10)).expect("the handler's message");
    let v = json(&got);
    assert_eq!(v["body"], "hello");
    assert_eq!(v["attempt"], 1);
    assert_eq!(v["destination"], format!("/queue/{}", n.input));
    assert_eq!(v["redelivered"], false);
    assert_eq!(v["has_id"], true);
    assert_eq!(v["tag"], "m1");
    assert_eq!(got.get("tag"), Some("m1"));
    assert_eq!(got.get("odd:name"), Some("a\nb"), "escaped header names and values survive");
    assert_eq!(got.get("content-type"), Some("application/json"));

    // An ERROR frame from the broker (no such exchange) fails the commit with its text.
    c.send(&format!("/queue/{}", n.input), b"bad destination", &[("tag", "m6")]);
    let v = json(&out.next(Duration::from_secs(10)).expect("the failed commit's report"));
    assert_eq!(v["ok"], false);
    let error = v["error"].as_str().unwrap();
    assert!(error.contains("the broker said") && error.contains("not_found"), "{error}");

    // Sent, then rolled back by accept: nothing out; after its attempts it is a dead letter.
    c.send(&format!("/queue/{}", n.input), b"raise after send", &[("tag", "m2")]);
    let d = dead.next(Duration::from_secs(15)).expect("dead letter");
    assert!(d.get("x-pmnc-error").unwrap().contains("refused after sending"), "{d:?}");
    assert!(out.next(Duration::from_millis(500)).is_none(), "a rolled-back send sends nothing");
}

#[test]
fn failures_are_retried_then_dead_lettered_with_the_error_and_nothing_is_acked_early() {
    let Some(mut c) = Client::new() else { return };
    let n = Names::new("retry", &mut c);
    let t = Tree::new();
    let mut s = start(&t, &n);
    let monitor = monitor_addr(&mut s);
    let mut out = c.subscribe(&format!("/queue/{}", n.output));
    let mut dead = c.subscribe(&format!("/queue/{}", n.dead));
    c.send(&format!("/queue/{}", n.input), b"boom", &[("tag", "m3"), ("keep", "me")]);
    let d = dead.next(Duration::from_secs(15)).expect("dead letter after 3 attempts");
    assert_eq!(d.body, b"boom");
    assert!(d.get("x-pmnc-error").unwrap().contains("boom: the handler refused it"), "{d:?}");
    assert_eq!(d.get("x-pmnc-attempt"), Some("3"));
    assert_eq!(d.get("x-pmnc-destination"), Some(format!("/queue/{}", n.input).as_str()));
    assert_eq!(d.get("keep"), Some("me"), "the message's own headers are kept");
    // Exactly three deliveries, the later ones redeliveries (NACKed, never acked), none after.
    let cage = t.path().join("c");
    assert_eq!(state_keys(&cage, "seen:m3:"), vec!["seen:m3:1:false", "seen:m3:2:true", "seen:m3:3:true"]);
    s.drain(Duration::from_millis(500));
    assert_eq!(state_keys(&cage, "seen:m3:").len(), 3);
    assert!(out.next(Duration::from_millis(200)).is_none());
    assert!(s.log.iter().any(|l| l.contains("failed on attempt 1 of 3") && l.contains("retrying in")), "{:#?}", s.log);
    let text = get(monitor, "/metrics").text();
    let count = |event: &str| sample(&text, &format!("pmnc_messages_total{{cage=\"c\",interface=\"in\",event=\"{event}\"}}")).unwrap_or(-1.0);
    assert_eq!((count("received"), count("retried"), count("dead_lettered"), count("acked"), count("redelivered")), (3.0, 2.0, 1.0, 0.0, 2.0), "{text}");
}

/// kill -9 while the handler runs: the message was not acknowledged, so the broker gives it to
/// the next start, marked redelivered.
#[test]
fn a_cage_killed_mid_handler_loses_nothing() {
    let Some(mut c) = Client::new() else { return };
    let n = Names::new("kill", &mut c);
    let t = Tree::new();
    let mut s = start(&t, &n);
    let cage = t.path().join("c");
    c.send(&format!("/queue/{}", n.input), b"slow", &[("tag", "m4")]);
    assert!(until(Duration::from_secs(10), || !state_keys(&cage, "seen:m4:").is_empty()), "the handler started");
    s.signal(9);
    s.wait_exit(Duration::from_secs(10)).expect("killed");
    let _s = Server::start(&cage, &[]);
    assert!(until(Duration::from_secs(20), || state_keys(&cage, "seen:m4:").len() == 2), "{:?}", state_keys(&cage, "seen:m4:"));
    assert_eq!(state_keys(&cage, "seen:m4:"), vec!["seen:m4:1:false", "seen:m4:1:true"], "delivered again after the kill, marked redelivered");
}

#[test]
fn an_oversized_message_is_refused_and_the_consumer_goes_on() {
    let Some(mut c) = Client::new() else { return };
    let n = Names::new("big", &mut c);
    let t = Tree::new();
    let mut s = start(&t, &n);
    let mut out = c.subscribe(&format!("/queue/{}", n.output));
    let mut dead = c.subscribe(&format!("/queue/{}", n.dead));
    c.send(&format!("/queue/{}", n.input), &vec![b'x'; 4096], &[("tag", "big")]);
    c.send(&format!("/queue/{}", n.input), b"after", &[("tag", "m5")]);
    let d = dead.next(Duration::from_secs(10)).expect("a notice of the refused message");
    assert!(d.get("x-pmnc-error").unwrap().contains("over max_message_size (1024 bytes)"), "{d:?}");
    assert_eq!(d.get("tag"), Some("big"));
    assert!(d.body.is_empty());
    let got = out.next(Duration::from_secs(10)).expect("the next message handled");
    assert_eq!(json(&got)["body"], "after");
    assert!(state_keys(&t.path().join("c"), "seen:big").is_empty(), "the handler never saw it");
    assert!(s.wait_for("refused", Duration::from_secs(1)).is_some());
}

#[test]
fn bad_stomp_config_is_reported_with_file_line_and_key() {
    let t = Tree::new();
    t.write(
        "c/cage.toml",
        "[interfaces.in]\nprotocol = \"stomp\"\nurl = \"http://nope\"\ndestinations = [\"orders\"]\nprefetch = 0\ndead_letter = \"/queue/\"\ncolour = \"red\"\n\n[resources.out]\nprotocol = \"stomp\"\nurl = \"stomp+ssl://h/\"\n",
    );
    t.write("c/in.lua", "return { handle = function(m) end }");
    let out = pmnc_limited(&["check", t.path().join("c").to_str().unwrap()], Duration::from_secs(60));
    assert_ne!(out.code, Some(0));
    let text = format!("{}{}", out.stdout, out.stderr);
    for want in [
        "cage.toml:3: interfaces.in.url: not a STOMP url",
        "cage.toml:4: interfaces.in.destinations: destination \"orders\" is not one of",
        "cage.toml:5: interfaces.in.prefetch: 0 is out of range 1..=65535",
        "cage.toml:6: interfaces.in.dead_letter: destination \"/queue/\" is not one of",
        "cage.toml:7: interfaces.in.colour: unknown key",
        "cage.toml:11: resources.out.url: STOMP over TLS is not supported yet",
    ] {
        assert!(text.contains(want), "{want:?} not in:\n{text}");
    }
    let t = Tree::new();
    t.write("c/cage.toml", "[interfaces.in]\nprotocol = \"stomp\"\n");
    t.write("c/in.lua", "return { handle = function(m) end }");
    let out = pmnc_limited(&["check", t.path().join("c").to_str().unwrap()], Duration::from_secs(60));
    let text = format!("{}{}", out.stdout, out.stderr);
    assert!(text.contains("interfaces.in: url is required") && text.contains("interfaces.in: destinations is required"), "{text}");
}

/// A TCP proxy to the broker that the test can cut (every connection closed, new ones refused)
/// and mend: the network going away, with the broker itself untouched.
struct Proxy {
    port: u16,
    up: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    fn start(host: &str, port: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let me = Proxy { port: listener.local_addr().unwrap().port(), up: Arc::new(AtomicBool::new(true)), conns: Arc::default() };
        let (up, conns, target) = (me.up.clone(), me.conns.clone(), format!("{host}:{port}"));
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if !up.load(Ordering::SeqCst) {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(&target) else { continue };
                let mut list = conns.lock().unwrap();
                list.push(client.try_clone().unwrap());
                list.push(server.try_clone().unwrap());
                for (mut from, mut to) in [(client.try_clone().unwrap(), server.try_clone().unwrap()), (server, client)] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(Shutdown::Both);
                    });
                }
            }
        });
        me
    }

    fn down(&self) {
        self.up.store(false, Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }

    fn up(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

/// The link to the broker cut and mended: the interface says so once, connects again by itself
/// and handles what was sent meanwhile; the resource's pooled connection, cut too, is replaced.
#[test]
fn a_lost_broker_is_reconnected_with_backoff_and_said_once() {
    let Some(mut c) = Client::new() else { return };
    let n = Names::new("outage", &mut c);
    let proxy = Proxy::start(&c.url.host.clone(), c.url.port);
    let t = Tree::new();
    let via = format!("stomp://guest:guest@127.0.0.1:{}/", proxy.port);
    // The resource goes through the proxy too: its pooled connection is cut with the rest.
    let resource = |u: &str| format!("[resources.out]\nprotocol = \"stomp\"\nurl = \"{u}\"");
    let toml = cage_toml_via(&n, "", &via).replace(&resource(&url()), &resource(&via));
    assert_eq!(toml.matches(&via).count(), 2, "{toml}");
    t.write("c/cage.toml", &toml);
    t.write("c/app.lua", &APP.replace("@OUT@", &n.output));
    let mut s = Server::start(&t.path().join("c"), &[]);
    s.wait_for("consuming", Duration::from_secs(10)).expect("the consumer started");
    let mut out = c.subscribe(&format!("/queue/{}", n.output));
    c.send(&format!("/queue/{}", n.input), b"before", &[("tag", "o1")]);
    assert_eq!(json(&out.next(Duration::from_secs(10)).expect("before the cut"))["body"], "before");

    proxy.down();
    s.wait_for("connecting again with backoff", Duration::from_secs(10)).expect("the outage is logged");
    c.send(&format!("/queue/{}", n.input), b"during", &[("tag", "o2")]);
    // Long enough for several attempts to connect (0.2 s doubling).
    s.drain(Duration::from_secs(2));
    assert!(out.next(Duration::from_millis(100)).is_none(), "nothing is handled while the link is cut");
    proxy.up();
    s.wait_for("again after", Duration::from_secs(10)).expect("the reconnection is logged");
    // The ACK of "before" may not have reached the broker before the cut: then it comes again,
    // marked redelivered (at least once), ahead of "during".
    let v = loop {
        let v = json(&out.next(Duration::from_secs(10)).expect("sent during the cut"));
        if v["body"] == "during" {
            break v;
        }
        assert_eq!((v["body"].as_str(), v["redelivered"].as_bool()), (Some("before"), Some(true)), "{v}");
    };
    assert_eq!(v["attempt"], 1, "the resource's cut pooled connection was replaced before use, not failed on");
    let said = s.log.iter().filter(|l| l.contains("connecting again with backoff")).count();
    assert_eq!(said, 1, "one line per outage: {:#?}", s.log);
}

/// A broker of the test's own that agrees heart-beats (it says it sends every 500 ms and wants
/// one every 100 ms) and then says nothing: the interface sends its own beats and drops the
/// connection after 1 s of silence, then connects again.
#[test]
fn a_silent_broker_is_dropped_after_missed_heart_beats() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let beats = Arc::new(AtomicUsize::new(0));
    let connections = Arc::new(AtomicUsize::new(0));
    let (b, k) = (beats.clone(), connections.clone());
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            k.fetch_add(1, Ordering::SeqCst);
            let b = b.clone();
            std::thread::spawn(move || {
                let mut d = rustomnic_resource_stomp::frame::Decoder::new(Limits::default());
                let mut buf = [0u8; 4096];
                let mut subscribed = false;
                loop {
                    let Ok(n) = conn.read(&mut buf) else { return };
                    if n == 0 {
                        return;
                    }
                    d.extend(&buf[..n]);
                    while let Ok(Some(x)) = d.decode() {
                        match x {
                            Decoded::HeartBeat if subscribed => {
                                b.fetch_add(1, Ordering::SeqCst);
                            }
                            Decoded::HeartBeat => {}
                            Decoded::Frame(f) if f.command == "CONNECT" => {
                                assert_eq!(f.get("heart-beat"), Some("100,100"));
                                let _ = conn.write_all(&Frame::new("CONNECTED").header("version", "1.2").header("heart-beat", "500,100").encode());
                            }
                            Decoded::Frame(f) if f.command == "SUBSCRIBE" => {
                                assert_eq!(f.get("ack"), Some("client-individual"));
                                assert_eq!(f.get("prefetch-count"), Some("16"));
                                let _ = conn.write_all(&Frame::new("RECEIPT").header("receipt-id", f.get("receipt").unwrap()).encode());
                                subscribed = true;
                            }
                            Decoded::Frame(_) => {}
                        }
                    }
                }
            });
        }
    });
    let t = Tree::new();
    t.write(
        "c/cage.toml",
        &format!("[interfaces.in]\nprotocol = \"stomp\"\nurl = \"stomp://127.0.0.1:{port}/\"\ndestinations = [\"/queue/x\"]\nheart_beat = \"100ms\"\nhandler = \"app.handle\"\n"),
    );
    t.write("c/app.lua", "return { handle = function(m) end }");
    let mut s = Server::start(&t.path().join("c"), &[]);
    s.wait_for("consuming", Duration::from_secs(10)).expect("subscribed to the fake broker");
    s.wait_for("heart-beats missed", Duration::from_secs(5)).expect("the silent connection dropped");
    assert!(beats.load(Ordering::SeqCst) >= 3, "the interface sent its own heart-beats: {}", beats.load(Ordering::SeqCst));
    assert!(until(Duration::from_secs(5), || connections.load(Ordering::SeqCst) >= 2), "and connected again");
}

/// SIGTERM while a handler runs: it finishes, its message is ACKed, and a new start has nothing
/// to run again.
#[test]
fn a_handler_in_flight_at_a_graceful_stop_finishes_and_is_acknowledged() {
    let Some(mut c) = Client::new() else { return };
    let n = Names::new("inflight", &mut c);
    let t = Tree::new();
    let mut s = start(&t, &n);
    let cage = t.path().join("c");
    c.send(&format!("/queue/{}", n.input), b"pause", &[("tag", "p1")]);
    assert!(until(Duration::from_secs(10), || !state_keys(&cage, "seen:p1:").is_empty()), "the handler started");
    assert_eq!(s.terminate(Duration::from_secs(30)), Some(0), "a clean exit on SIGTERM");
    let mut out = c.subscribe(&format!("/queue/{}", n.output));
    assert_eq!(json(&out.next(Duration::from_secs(5)).expect("the handler in flight finished"))["body"], "pause");
    let mut s = Server::start(&cage, &[]);
    s.wait_for("consuming", Duration::from_secs(10)).unwrap();
    s.drain(Duration::from_millis(500));
    assert_eq!(state_keys(&cage, "seen:p1:"), vec!["seen:p1:1:false"], "the message ran once");
}

/// Two destinations with messages already waiting: those of the first arrive while the second
/// is being subscribed, and none is left behind.
#[test]
fn messages_waiting_on_several_destinations_are_all_handled() {
    let Some(mut c) = Client::new() else { return };
    let n = Names::new("two", &mut c);
    let second = name("two-in2");
    c.forget_later(&second);
    for i in 0..5 {
        c.send(&format!("/queue/{}", n.input), format!("a{i}").as_bytes(), &[("tag", "w")]);
        c.send(&format!("/queue/{second}"), format!("b{i}").as_bytes(), &[("tag", "w")]);
    }
    let mut out = c.subscribe(&format!("/queue/{}", n.output));
    let t = Tree::new();
    let toml = cage_toml(&n, "")
        .replace(&format!("destinations = [\"/queue/{}\"]", n.input), &format!("destinations = [\"/queue/{}\", \"/queue/{second}\"]", n.input));
    assert!(toml.contains(&second));
    t.write("c/cage.toml", &toml);
    t.write("c/app.lua", &APP.replace("@OUT@", &n.output));
    let mut s = Server::start(&t.path().join("c"), &[]);
    s.wait_for("consuming", Duration::from_secs(10)).expect("the consumer started");
    let mut bodies = std::collections::BTreeSet::new();
    while bodies.len() < 10 {
        let Some(f) = out.next(Duration::from_secs(10)) else { break };
        bodies.insert(json(&f)["body"].as_str().unwrap().to_string());
    }
    let want: std::collections::BTreeSet<String> = (0..5).flat_map(|i| [format!("a{i}"), format!("b{i}")]).collect();
    assert_eq!(bodies, want);
}

/// A broker of the test's own that takes SENDs and never gives their receipt: the commit fails
/// after receipt_timeout, naming the url, and the caller sees it.
#[test]
fn a_commit_without_receipts_fails_after_receipt_timeout() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let sends = Arc::new(AtomicUsize::new(0));
    let k = sends.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let k = k.clone();
            std::thread::spawn(move || {
                let mut d = rustomnic_resource_stomp::frame::Decoder::new(Limits::default());
                let mut buf = [0u8; 4096];
                loop {
                    let Ok(n) = conn.read(&mut buf) else { return };
                    if n == 0 {
                        return;
                    }
                    d.extend(&buf[..n]);
                    while let Ok(Some(Decoded::Frame(f))) = d.decode() {
                        if f.command == "CONNECT" {
                            let _ = conn.write_all(&Frame::new("CONNECTED").header("version", "1.2").encode());
                        } else if f.command == "SEND" {
                            assert!(f.get("receipt").is_some(), "every SEND asks for a receipt");
                            k.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                }
            });
        }
    });
    let toml = http_cage_toml(&format!("\n[resources.out]\nprotocol = \"stomp\"\nurl = \"stomp://127.0.0.1:{port}/\"\nreceipt_timeout = \"300ms\"\n"));
    let lua = r#"return { handle = function(request, response)
  local ok, e = pcall(function()
    local xa = pmnc.transaction.create()
    xa.out.send("/queue/a", "one")
    xa.out.send("/queue/b", "two")
    xa.execute()
  end)
  return { ok = ok, error = tostring(e) }
end }"#;
    let (_t, _s, addr) = start_http_cage(&toml, lua, 1);
    let started = Instant::now();
    let v = json_body(&get(addr, "/"));
    assert!(started.elapsed() >= Duration::from_millis(300), "{:?}", started.elapsed());
    assert_eq!(v["ok"], false);
    let error = v["error"].as_str().unwrap();
    assert!(error.contains(&format!("127.0.0.1:{port}/%2f: no receipt for every message within receipt_timeout (300ms)")), "{error}");
    assert_eq!(sends.load(Ordering::SeqCst), 2, "both messages went out at commit before the receipts were awaited");
}

/// A topic: the interface's subscription gets what is sent to the topic after it subscribed,
/// and the handler sees the topic as the destination.
#[test]
fn a_topic_subscription_takes_what_is_sent_to_the_topic() {
    let Some(mut c) = Client::new() else { return };
    let n = Names::new("topic", &mut c);
    let topic = format!("/topic/{}", name("topic-news"));
    let t = Tree::new();
    let toml = cage_toml(&n, "").replace(&format!("destinations = [\"/queue/{}\"]", n.input), &format!("destinations = [\"{topic}\"]"));
    assert!(toml.contains(&topic));
    t.write("c/cage.toml", &toml);
    t.write("c/app.lua", &APP.replace("@OUT@", &n.output));
    let mut s = Server::start(&t.path().join("c"), &[]);
    s.wait_for("consuming", Duration::from_secs(10)).expect("the consumer started");
    let mut out = c.subscribe(&format!("/queue/{}", n.output));
    for i in 0..3 {
        c.send(&topic, format!("news{i}").as_bytes(), &[("tag", "t")]);
    }
    let mut bodies = std::collections::BTreeSet::new();
    while bodies.len() < 3 {
        let Some(f) = out.next(Duration::from_secs(10)) else { break };
        let v = json(&f);
        assert_eq!(v["destination"], topic.as_str(), "the handler sees the topic");
        bodies.insert(v["body"].as_str().unwrap().to_string());
    }
    assert_eq!(bodies, (0..3).map(|i| format!("news{i}")).collect::<std::collections::BTreeSet<_>>());
}
