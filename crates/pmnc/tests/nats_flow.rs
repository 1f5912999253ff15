//! The nats interface and resource through the real binary and a nats-server of each test's own
//! (JetStream on): a message in, a message out in the handler's transaction (core and
//! JetStream); a handler that raises after publishing sends nothing; JetStream retries with
//! backoff, terms after max_deliver with a dead letter, nothing acked early; request/reply
//! between two cages and a test client; a queue group sharing messages; refused bodies, odd
//! headers, wildcard publishes; config problems with file, line and key. Tests that kill the
//! server or the cage are in nats_restart.rs.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
mod nats_support;

use std::time::{Duration, Instant};

use common::*;
use nats_support::*;
use rustomnic_resource_nats::async_nats::HeaderMap;

/// Records every attempt in pmnc.state, then publishes a summary of the message in a
/// transaction (core to out.core, JetStream to out.js); "boom" fails, "raise after publish"
/// publishes and then rolls back; "json:..." must be JSON; "wild" publishes to a wildcard.
const APP: &str = r#"
local M = {}

local function summary(m)
  return {
    body = m.body, subject = m.subject, attempt = m.attempt, reply = m.reply, stream = m.stream,
    sequence = m.sequence, delivered = m.delivered, redelivered = m.redelivered,
    headers = m.headers,
  }
end

function M.handle(m)
  local id = m.headers["Msg-Id"] or m.body
  pmnc.state.set("seen:" .. id .. ":" .. m.attempt, pmnc.json.encode({ at = pmnc.time.now() }))
  if m.body == "boom" then error("boom: the handler refused it") end
  local out = m.stream and "out.js" or "out.core"
  local method = m.stream and "jetstream_publish" or "publish"
  if m.body == "raise after publish" then
    local xa = pmnc.transaction.create({ accept = function() error("refused after publishing") end })
    xa.bus[method](out, "must not appear")
    xa.execute()
  end
  if m.body:sub(1, 5) == "json:" then pmnc.json.decode(m.body:sub(6)) end
  if m.body == "wild" then pmnc.transaction.bus.publish("out.*", "x") end
  local xa = pmnc.transaction.create()
  xa.bus[method](out, summary(m), { ["From-Subject"] = m.subject, Multi = { "a", "b" } })
  xa.execute()
  return "handled " .. m.body
end

return M
"#;

fn core_cage(url: &str) -> String {
    format!(
        r#"[interfaces.in]
protocol = "nats"
url = "{url}"
subjects = ["in.core.*"]
max_message_size = "1KiB"
request_timeout = "5s"
handler = "app.handle"

[resources.bus]
protocol = "nats"
url = "{url}"
"#
    )
}

fn js_cage(url: &str) -> String {
    format!(
        r#"[interfaces.in]
protocol = "nats"
url = "{url}"
stream = "IN"
consumer = "pmnc-in"
declare = true
subjects = ["in.js.>"]
max_deliver = 3
backoff = ["300ms", "600ms"]
ack_wait = "4s"
dead_letter_subject = "dead.in"
max_message_size = "1KiB"
request_timeout = "2s"
handler = "app.handle"

[resources.bus]
protocol = "nats"
url = "{url}"
"#
    )
}

fn start(toml: &str) -> (Tree, Server) {
    let t = Tree::new();
    t.write("c/cage.toml", toml);
    t.write("c/app.lua", APP);
    let mut s = Server::start(&t.path().join("c"), &[]);
    s.wait_for("consuming", Duration::from_secs(15)).unwrap_or_else(|| panic!("the consumer did not start: {:#?}", s.log));
    (t, s)
}

fn h(pairs: &[(&str, &str)]) -> HeaderMap {
    headers(pairs)
}

#[test]
fn core_message_in_becomes_message_out_and_a_raise_after_publish_sends_nothing() {
    let Some(server) = OwnNats::start("core_message_in_becomes_message_out") else { return };
    let c = Client::connect(&server.url());
    let mut out = c.subscribe("out.>");
    let (_t, _s) = start(&core_cage(&server.url()));
    c.publish("in.core.a", b"hello", h(&[("Msg-Id", "m1"), ("Multi", "x"), ("Multi", "y"), ("Empty", "")]));
    let got = c.next(&mut out, Duration::from_secs(10)).expect("the handler's message");
    assert_eq!(got.subject.as_str(), "out.core");
    let v = json(&got.payload);
    assert_eq!(v["body"], "hello");
    assert_eq!(v["subject"], "in.core.a");
    assert_eq!(v["attempt"], 1);
    assert!(v["stream"].is_null() && v["reply"].is_null());
    assert_eq!(v["headers"]["Msg-Id"], "m1");
    assert_eq!(v["headers"]["Multi"], serde_json::json!(["x", "y"]), "a header given twice is an array");
    assert_eq!(v["headers"]["Empty"], "");
    assert_eq!(header(&got, "From-Subject").as_deref(), Some("in.core.a"));
    assert_eq!(header(&got, "Content-Type").as_deref(), Some("application/json"));
    let multi: Vec<String> = got.headers.as_ref().unwrap().get_all("Multi").map(|v| v.as_str().to_string()).collect();
    assert_eq!(multi, vec!["a", "b"]);

    // Published, then rolled back by accept: nothing goes out; the next message does.
    c.publish("in.core.a", b"raise after publish", HeaderMap::new());
    c.publish("in.core.a", b"after", HeaderMap::new());
    let next = c.next(&mut out, Duration::from_secs(10)).expect("the next message's output");
    assert_eq!(json(&next.payload)["body"], "after", "a rolled-back publish sent something");
    assert!(c.next(&mut out, Duration::from_millis(300)).is_none());
}

#[test]
fn jetstream_in_and_out_retries_with_backoff_terms_after_max_deliver_and_acks_nothing_early() {
    let Some(server) = OwnNats::start("jetstream_in_and_out") else { return };
    let c = Client::connect(&server.url());
    c.stream("OUT", &["out.js"]);
    c.stream("DEAD", &["dead.in"]);
    let mut out = c.subscribe("out.>");
    let mut dead = c.subscribe("dead.in");
    let (t, mut s) = start(&js_cage(&server.url()));
    let cage = t.path().join("c");
    let monitor = monitor_addr(&mut s);
    // Each of the two workers pulls on a connection of its own (decision 156), and the start is
    // said once.
    let names = || -> Vec<String> {
        let connz = server.nats.monitoring("/connz");
        let mut names: Vec<String> = connz["connections"].as_array().into_iter().flatten().filter_map(|c| c["name"].as_str().map(str::to_string)).collect();
        names.retain(|n| n.starts_with("pmnc c/"));
        names.sort();
        names
    };
    assert!(until(Duration::from_secs(5), || names().len() == 2), "{:?}", names());
    assert!(names()[0].ends_with("worker 0") && names()[1].ends_with("worker 1"), "{:?}", names());
    assert_eq!(s.log.iter().filter(|l| l.contains("consuming stream")).count(), 1, "{:#?}", s.log);

    c.js_publish("in.js.a", b"hello", h(&[("Msg-Id", "j1"), ("Multi", "x"), ("Multi", "y")]));
    let got = c.next(&mut out, Duration::from_secs(10)).expect("the handler's message");
    let v = json(&got.payload);
    assert_eq!(v["headers"]["Msg-Id"], "j1");
    assert_eq!(v["headers"]["Multi"], serde_json::json!(["x", "y"]), "a header given twice is an array");
    assert_eq!((v["body"].as_str(), v["subject"].as_str(), v["stream"].as_str()), (Some("hello"), Some("in.js.a"), Some("IN")));
    assert_eq!((v["sequence"].as_i64(), v["delivered"].as_i64(), v["attempt"].as_i64(), v["redelivered"].as_bool()), (Some(1), Some(1), Some(1), Some(false)));
    assert_eq!(c.stream_messages("OUT"), 1, "jetstream_publish stored the message in OUT");
    assert!(until(Duration::from_secs(5), || c.consumer_state("IN", "pmnc-in").3 == 1), "acked after the commit");

    // A failing message: three deliveries with growing delays, unacknowledged until it is
    // terminated, then a dead letter with the error.
    let started = Instant::now();
    c.js_publish("in.js.b", b"boom", h(&[("Msg-Id", "j2"), ("Keep", "me")]));
    assert!(until(Duration::from_secs(5), || state_keys(&cage, "seen:j2:").len() == 1));
    let (_, pending, _, floor) = c.consumer_state("IN", "pmnc-in");
    assert_eq!((pending, floor), (1, 1), "a failed message stays unacknowledged while it is retried");
    let dl = c.next(&mut dead, Duration::from_secs(10)).expect("dead letter after 3 attempts");
    let elapsed = started.elapsed();
    assert_eq!(dl.payload.as_ref(), b"boom");
    assert!(header(&dl, "Nats-Service-Error").unwrap().contains("boom: the handler refused it"));
    assert_eq!(header(&dl, "Pmnc-Subject").as_deref(), Some("in.js.b"));
    assert_eq!(header(&dl, "Pmnc-Stream").as_deref(), Some("IN"));
    assert_eq!(header(&dl, "Pmnc-Sequence").as_deref(), Some("2"));
    assert_eq!(header(&dl, "Keep").as_deref(), Some("me"), "the message's own headers are kept");
    assert!(elapsed >= Duration::from_millis(900), "the backoff delays (300ms + 600ms) were not waited: {elapsed:?}");
    assert_eq!(c.stream_messages("DEAD"), 1);
    assert_eq!(state_keys(&cage, "seen:j2:"), vec!["seen:j2:1", "seen:j2:2", "seen:j2:3"]);
    s.drain(Duration::from_millis(800));
    assert_eq!(state_keys(&cage, "seen:j2:").len(), 3, "delivered again after the term");
    let (_, pending, unsent, _) = c.consumer_state("IN", "pmnc-in");
    assert_eq!((pending, unsent), (0, 0));
    assert!(s.log.iter().any(|l| l.contains("failed on attempt 1 of 3") && l.contains("retrying in 300ms")), "{:#?}", s.log);
    assert!(s.log.iter().any(|l| l.contains("failed on attempt 2 of 3") && l.contains("retrying in 600ms")), "{:#?}", s.log);
    assert!(s.log.iter().any(|l| l.contains("failed on attempt 3 of 3") && l.contains("terminated")), "{:#?}", s.log);

    // Published then rolled back: nothing reaches OUT, the message ends as a dead letter.
    c.js_publish("in.js.c", b"raise after publish", h(&[("Msg-Id", "j3")]));
    let dl = c.next(&mut dead, Duration::from_secs(10)).expect("dead letter of the rolled-back message");
    assert!(header(&dl, "Nats-Service-Error").unwrap().contains("refused after publishing"));
    assert_eq!(c.stream_messages("OUT"), 1, "a rolled-back jetstream_publish stored nothing");
    assert!(c.next(&mut out, Duration::from_millis(200)).is_none());

    // An oversized body is refused at once: dead-lettered, counted, never handled.
    c.js_publish("in.js.d", &vec![b'x'; 2048], h(&[("Msg-Id", "j4")]));
    let dl = c.next(&mut dead, Duration::from_secs(10)).expect("dead letter of the oversized message");
    assert!(header(&dl, "Nats-Service-Error").unwrap().contains("over max_message_size (1024 bytes)"));
    assert!(state_keys(&cage, "seen:xxxx").is_empty());

    // A message without headers still has a headers table (an empty one).
    c.js_publish("in.js.e", b"plain", HeaderMap::new());
    let got = c.next(&mut out, Duration::from_secs(10)).expect("the handler's message without headers");
    let v = json(&got.payload);
    assert_eq!((v["body"].as_str(), v["sequence"].as_i64()), (Some("plain"), Some(5)));
    assert!(v["headers"].as_object().is_some_and(|h| h.is_empty()) || v["headers"].as_array().is_some_and(|h| h.is_empty()), "{v}");

    // hello 1 + boom 3 + raise 3 + oversized 1 + plain 1 received; 2 acked; 4 retried; 3 dead;
    // 1 refused. The dead letter goes out before the term is counted: polled until the counts
    // settle.
    let want = (9.0, 2.0, 4.0, 4.0, 3.0, 1.0);
    let mut text = String::new();
    let settled = until(Duration::from_secs(5), || {
        text = get(monitor, "/metrics").text();
        let count = |event: &str| sample(&text, &format!("pmnc_messages_total{{cage=\"c\",interface=\"in\",event=\"{event}\"}}")).unwrap_or(-1.0);
        (count("received"), count("acked"), count("retried"), count("redelivered"), count("dead_lettered"), count("refused")) == want
    });
    assert!(settled, "counts (received, acked, retried, redelivered, dead_lettered, refused) are not {want:?}:\n{text}");
}

/// Two cages: "svc" answers requests on svc.echo in a queue group (two processes of it), "front"
/// asks svc through the resource's request.
const SVC: &str = r#"
return { handle = function(m)
  pmnc.state.set("got:" .. m.body, m.subject)
  if m.subject == "svc.work" then return end
  if m.body == "fail" then error("svc refuses: fail") end
  if m.body:sub(1, 5) == "json:" then return pmnc.json.decode(m.body:sub(6)) end
  return "echo " .. m.body .. " (" .. (m.headers.Who or "?") .. ")"
end }
"#;

const FRONT: &str = r#"
return { handle = function(m)
  if m.body == "nobody" then
    local ok, e = pcall(pmnc.transaction.bus.request, "nobody.here", "x")
    return tostring(e.code) .. ": " .. e.message
  end
  if m.body == "wild" then
    local ok, e = pcall(pmnc.transaction.bus.request, "svc.*", "x")
    return e.message
  end
  local ok, r = pcall(pmnc.transaction.bus.request, "svc.echo", m.body, { Who = "front" })
  if not ok then return "error " .. tostring(r.code) .. ": " .. r.message end
  return r.body
end }
"#;

fn svc_cage(url: &str) -> String {
    format!("[interfaces.in]\nprotocol = \"nats\"\nurl = \"{url}\"\nsubjects = [\"svc.echo\", \"svc.work\"]\nqueue_group = \"svc\"\nrequest_timeout = \"5s\"\nhandler = \"app.handle\"\n")
}

fn front_cage(url: &str) -> String {
    format!(
        "[interfaces.in]\nprotocol = \"nats\"\nurl = \"{url}\"\nsubjects = [\"front.ask\"]\nrequest_timeout = \"5s\"\nhandler = \"app.handle\"\n\n[resources.bus]\nprotocol = \"nats\"\nurl = \"{url}\"\n"
    )
}

#[test]
fn request_reply_between_cages_and_a_queue_group_shares_the_messages() {
    let Some(server) = OwnNats::start("request_reply_between_cages") else { return };
    let c = Client::connect(&server.url());
    let t = Tree::new();
    t.write("a/cage.toml", &svc_cage(&server.url()));
    t.write("a/app.lua", SVC);
    t.write("b/cage.toml", &svc_cage(&server.url()));
    t.write("b/app.lua", SVC);
    t.write("f/cage.toml", &front_cage(&server.url()));
    t.write("f/app.lua", FRONT);
    let mut servers = Vec::new();
    for cage in ["a", "b", "f"] {
        let mut s = Server::start(&t.path().join(cage), &[]);
        s.wait_for("consuming", Duration::from_secs(15)).expect("consuming");
        servers.push(s);
    }
    let ask = |body: &str| c.request("front.ask", body.as_bytes(), HeaderMap::new(), Duration::from_secs(10)).expect("front answers");
    assert_eq!(ask("hi").payload.as_ref(), b"echo hi (front)", "front asked svc through the resource");
    let failed = String::from_utf8_lossy(&ask("fail").payload).to_string();
    assert!(failed.starts_with("error 500: request to \"svc.echo\": the responder failed: ") && failed.ends_with("app.lua:5: svc refuses: fail"), "{failed}");
    let nobody = String::from_utf8_lossy(&ask("nobody").payload).to_string();
    assert!(nobody.starts_with("no_responders: request to \"nobody.here\""), "{nobody}");
    assert!(String::from_utf8_lossy(&ask("wild").payload).contains("is a wildcard subject"));

    // Straight from a client: a table comes back as JSON, a failure as the error headers.
    let r = c.request("svc.echo", b"json:{\"a\":[1,2]}", HeaderMap::new(), Duration::from_secs(10)).unwrap();
    assert_eq!(json(&r.payload), serde_json::json!({"a": [1, 2]}));
    assert_eq!(header(&r, "Content-Type").as_deref(), Some("application/json"));
    let r = c.request("svc.echo", b"fail", HeaderMap::new(), Duration::from_secs(10)).unwrap();
    assert!(r.payload.is_empty());
    assert!(header(&r, "Nats-Service-Error").unwrap().contains("svc refuses: fail"));
    assert_eq!(header(&r, "Nats-Service-Error-Code").as_deref(), Some("500"));
    let r = c.request("svc.echo", b"json:{nope", HeaderMap::new(), Duration::from_secs(10)).unwrap();
    assert!(header(&r, "Nats-Service-Error").is_some(), "a body the handler rejects is answered with an error");

    // The queue group: 40 messages, each handled by exactly one of the two copies, both busy.
    for i in 0..40 {
        c.publish("svc.work", format!("w{i:02}").as_bytes(), HeaderMap::new());
    }
    let (a, b) = (t.path().join("a"), t.path().join("b"));
    assert!(until(Duration::from_secs(15), || state_keys(&a, "got:w").len() + state_keys(&b, "got:w").len() >= 40));
    let (ka, kb) = (state_keys(&a, "got:w"), state_keys(&b, "got:w"));
    assert_eq!(ka.len() + kb.len(), 40, "a message was handled twice: {ka:?} {kb:?}");
    assert!(!ka.is_empty() && !kb.is_empty(), "one copy took every message: {} / {}", ka.len(), kb.len());
    assert!(ka.iter().all(|k| !kb.contains(k)));
}

#[test]
fn bad_input_gets_a_clear_error_and_the_consumer_goes_on() {
    let Some(server) = OwnNats::start("bad_input") else { return };
    let c = Client::connect(&server.url());
    let mut out = c.subscribe("out.>");
    let (_t, mut s) = start(&core_cage(&server.url()));
    let ask = |body: &[u8]| {
        c.request("in.core.r", body, HeaderMap::new(), Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("{:?}: {e}", String::from_utf8_lossy(&body[..body.len().min(20)])))
    };
    // Over the size limit: refused with code 413, never handled.
    let r = ask(&vec![b'x'; 2000]);
    assert!(header(&r, "Nats-Service-Error").unwrap().contains("over max_message_size"));
    assert_eq!(header(&r, "Nats-Service-Error-Code").as_deref(), Some("413"));
    // A body the handler rejects (bad JSON) and a wildcard publish: errors in the reply.
    let r = ask(b"json:{oops");
    assert_eq!(header(&r, "Nats-Service-Error-Code").as_deref(), Some("500"));
    let r = ask(b"wild");
    let e = header(&r, "Nats-Service-Error").unwrap();
    assert!(e.contains("\"out.*\" is a wildcard subject"), "{e}");
    // Headers of odd shapes arrive as they are.
    c.publish("in.core.h", b"odd", h(&[("lower-case", "v"), ("X", "a:b: c"), ("X", ""), ("Msg-Id", "odd")]));
    let got = c.next(&mut out, Duration::from_secs(10)).expect("the odd-headers message was handled");
    let v = json(&got.payload);
    assert_eq!(v["headers"]["lower-case"], "v");
    assert_eq!(v["headers"]["X"], serde_json::json!(["a:b: c", ""]));
    // A failed core message without reply is logged, and the next one still works.
    c.publish("in.core.f", b"boom", HeaderMap::new());
    assert!(s.wait_for("core NATS keeps nothing to retry", Duration::from_secs(10)).is_some());
    let r = ask(b"fine");
    assert_eq!(r.payload.as_ref(), b"handled fine");
}

#[test]
fn config_problems_are_reported_by_check_with_file_line_and_key() {
    let t = Tree::new();
    t.write(
        "c/cage.toml",
        r#"[interfaces.in]
protocol = "nats"
url = "http://127.0.0.1:4222"
subjects = ["orders.>.x"]
queue_group = "a b"
max_ack_pending = 0
colour = "blue"

[interfaces.js]
protocol = "nats"
url = "nats://127.0.0.1:4222"
stream = "S"
consumer = "c"
ack_wait = "5s"
request_timeout = "10s"
backoff = ["1s", "soon"]
queue_group = "g"

[resources.bus]
protocol = "nats"
url = "tls://127.0.0.1:4222"
"#,
    );
    t.write("c/in.lua", "return { handle = function(m) end }");
    t.write("c/js.lua", "return { handle = function(m) end }");
    let out = pmnc_limited(&["check", t.path().join("c").to_str().unwrap()], Duration::from_secs(60));
    assert_ne!(out.code, Some(0));
    let text = format!("{}{}", out.stdout, out.stderr);
    for want in [
        "cage.toml:3: interfaces.in.url: not a NATS url",
        "cage.toml:4: interfaces.in.subjects: subject \"orders.>.x\": > must be the last token",
        "cage.toml:5: interfaces.in.queue_group: \"a b\" is not a usable name",
        "cage.toml:6: interfaces.in.max_ack_pending: 0 is out of range",
        "cage.toml:7: interfaces.in.colour: unknown key",
        "cage.toml:14: interfaces.js.ack_wait: 5s is not longer than request_timeout (10s)",
        "cage.toml:16: interfaces.js.backoff: \"soon\"",
        "cage.toml:21: resources.bus.url: tls:// (TLS) is not supported yet",
    ] {
        assert!(text.contains(want), "{want:?} not in:\n{text}");
    }
    let t = Tree::new();
    t.write("c/cage.toml", "[interfaces.in]\nprotocol = \"nats\"\nstream = \"S\"\nqueue_group = \"g\"\n");
    t.write("c/in.lua", "return { handle = function(m) end }");
    let out = pmnc_limited(&["check", t.path().join("c").to_str().unwrap()], Duration::from_secs(60));
    let text = format!("{}{}", out.stdout, out.stderr);
    assert!(text.contains("interfaces.in: url is required"), "{text}");
    let t = Tree::new();
    t.write("c/cage.toml", "[interfaces.in]\nprotocol = \"nats\"\nurl = \"nats://h\"\nstream = \"S\"\nconsumer = \"c\"\nqueue_group = \"g\"\n");
    t.write("c/in.lua", "return { handle = function(m) end }");
    let out = pmnc_limited(&["check", t.path().join("c").to_str().unwrap()], Duration::from_secs(60));
    let text = format!("{}{}", out.stdout, out.stderr);
    assert!(text.contains("cage.toml:6: interfaces.in.queue_group: is for core subscriptions"), "{text}");
    let t = Tree::new();
    t.write("c/cage.toml", "[interfaces.in]\nprotocol = \"nats\"\nurl = \"nats://h\"\nmax_deliver = 3\n");
    t.write("c/in.lua", "return { handle = function(m) end }");
    let out = pmnc_limited(&["check", t.path().join("c").to_str().unwrap()], Duration::from_secs(60));
    let text = format!("{}{}", out.stdout, out.stderr);
    assert!(text.contains("cage.toml:4: interfaces.in.max_deliver: is for a JetStream consumer"), "{text}");
    assert!(text.contains("subjects is required for core subscriptions"), "{text}");
}
