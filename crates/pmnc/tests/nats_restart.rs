//! The nats interface across crashes, on a nats-server of each test's own (JetStream, its store
//! folder kept): the server killed and started again while 1,000 JetStream messages flow, and
//! the cage killed with kill -9 mid-stream and started again; in both every message is handled
//! at least once and none is lost, and the server's outage is logged once.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
mod nats_support;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use nats_support::*;

const APP: &str = r#"
return { handle = function(m)
  pmnc.sleep(0.002)
  pmnc.state.set("done:" .. m.body, m.attempt)
end }
"#;

fn cage(url: &str) -> String {
    format!(
        r#"[interfaces.in]
protocol = "nats"
url = "{url}"
stream = "WORK"
consumer = "pmnc-work"
declare = true
subjects = ["work.>"]
max_ack_pending = 32
request_timeout = "1s"
ack_wait = "2s"
backoff = ["100ms"]
max_deliver = 20
handler = "app.handle"
"#
    )
}

fn missing(cage: &std::path::Path, want: &BTreeSet<String>) -> Vec<String> {
    let done: BTreeSet<String> = state_keys(cage, "done:").into_iter().map(|k| k["done:".len()..].to_string()).collect();
    want.difference(&done).cloned().collect()
}

#[test]
fn the_server_killed_and_restarted_mid_stream_loses_no_message() {
    let Some(mut server) = OwnNats::start("the_server_killed_and_restarted") else { return };
    let t = Tree::new();
    t.write("c/cage.toml", &cage(&server.url()));
    t.write("c/app.lua", APP);
    let dir = t.path().join("c");
    let mut s = Server::start(&dir, &[]);
    s.wait_for("consuming", Duration::from_secs(15)).expect("consuming");
    let c = Client::connect(&server.url());
    let want: BTreeSet<String> = (0..1000).map(|i| format!("m{i:04}")).collect();
    let bodies: Vec<&String> = want.iter().collect();
    for b in &bodies[..500] {
        c.js_publish("work.a", b.as_bytes(), Default::default());
    }
    assert!(until(Duration::from_secs(20), || state_keys(&dir, "done:").len() >= 50), "the stream flows before the kill");
    server.nats.kill();
    let at_kill = state_keys(&dir, "done:").len();
    assert!(at_kill < 1000, "killed mid-stream");
    assert!(s.wait_for_new("lost the connection to NATS", Duration::from_secs(15)).is_some(), "the outage is logged: {:#?}", s.log);
    server.nats.up();
    for b in &bodies[500..] {
        c.js_publish("work.b", b.as_bytes(), Default::default());
    }
    let done = until(Duration::from_secs(45), || missing(&dir, &want).is_empty());
    s.drain(Duration::from_millis(200));
    assert!(done, "lost after the server restart (at kill {at_kill} done): {:?}\n{:#?}", missing(&dir, &want), s.log);
    assert!(s.log.iter().any(|l| l.contains("connected to NATS at") && l.contains("again after")), "{:#?}", s.log);
    let lost_lines = s.log.iter().filter(|l| l.contains("lost the connection to NATS")).count();
    assert_eq!(lost_lines, 1, "one line per outage: {:#?}", s.log);
    assert!(until(Duration::from_secs(10), || {
        let (_, pending, unsent, _) = c.consumer_state("WORK", "pmnc-work");
        pending == 0 && unsent == 0
    }));
}

#[test]
fn a_cage_killed_with_kill_9_mid_stream_loses_no_message() {
    let Some(server) = OwnNats::start("a_cage_killed_with_kill_9") else { return };
    let t = Tree::new();
    t.write("c/cage.toml", &cage(&server.url()));
    // Slow enough (0.2 s a message, 32 at a time: about 2 s for the 300) that the stop lands
    // mid-stream: at a graceful stop only the messages in flight finish.
    t.write("c/app.lua", &APP.replace("0.002", "0.2"));
    let dir = t.path().join("c");
    let c = Client::connect(&server.url());
    let mut s = Server::start(&dir, &[]);
    s.wait_for("consuming", Duration::from_secs(15)).expect("consuming");
    let want: BTreeSet<String> = (0..400).map(|i| format!("k{i:04}")).collect();
    for b in &want {
        c.js_publish("work.k", b.as_bytes(), Default::default());
    }
    assert!(until(Duration::from_secs(20), || state_keys(&dir, "done:").len() >= 40), "the stream flows before the kill");
    s.child.kill().unwrap();
    let _ = s.child.wait();
    let at_kill = state_keys(&dir, "done:").len();
    assert!(at_kill < want.len(), "killed mid-stream ({at_kill} of {} done)", want.len());
    // Messages the dead cage had taken and not acked: the server holds them for ack_wait.
    let (_, pending, _, _) = c.consumer_state("WORK", "pmnc-work");
    assert!(pending > 0, "no message was in flight at the kill");
    let mut s = Server::start(&dir, &[]);
    s.wait_for("consuming", Duration::from_secs(15)).expect("consuming again");
    let done = until(Duration::from_secs(30), || missing(&dir, &want).is_empty());
    assert!(done, "lost after kill -9 at {at_kill}: {:?}", missing(&dir, &want));
    assert!(until(Duration::from_secs(10), || {
        let (_, pending, unsent, _) = c.consumer_state("WORK", "pmnc-work");
        pending == 0 && unsent == 0
    }));
    drop(s);
}

#[test]
fn a_graceful_stop_mid_stream_exits_cleanly_and_loses_nothing() {
    let Some(server) = OwnNats::start("a_graceful_stop_mid_stream") else { return };
    let t = Tree::new();
    t.write("c/cage.toml", &cage(&server.url()));
    // Slow enough (0.2 s a message, 32 at a time: about 2 s for the 300) that the stop lands
    // mid-stream: at a graceful stop only the messages in flight finish.
    t.write("c/app.lua", &APP.replace("0.002", "0.2"));
    let dir = t.path().join("c");
    let c = Client::connect(&server.url());
    let mut s = Server::start(&dir, &[]);
    s.wait_for("consuming", Duration::from_secs(15)).expect("consuming");
    let want: BTreeSet<String> = (0..300).map(|i| format!("g{i:04}")).collect();
    for b in &want {
        c.js_publish("work.g", b.as_bytes(), Default::default());
    }
    assert!(until(Duration::from_secs(20), || state_keys(&dir, "done:").len() >= 30), "the stream flows before the stop");
    let code = s.terminate(Duration::from_secs(20));
    assert_eq!(code, Some(0), "a clean exit on SIGTERM");
    let after_stop = state_keys(&dir, "done:").len();
    assert!(after_stop < want.len(), "stopped mid-stream");
    // Messages in flight at the stop finished and were acked; those pulled and not started were
    // given back. Started again, the cage handles the rest: none lost.
    let mut s = Server::start(&dir, &[]);
    s.wait_for("consuming", Duration::from_secs(15)).expect("consuming again");
    assert!(until(Duration::from_secs(30), || missing(&dir, &want).is_empty()), "lost after a graceful stop: {:?}", missing(&dir, &want));
}
