//! The `mqtt` interface when things go away: messages published while the cage is stopped
//! arrive once it is back (persistent session); a broker (a private mosquitto) stopped and
//! started again while 1,000 QoS 1 messages flow; the cage killed with kill -9 mid-stream. Each
//! time every message is handled at least once: the handler records each distinct id in the
//! cage's state file, and the test counts them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
mod mqtt_support;

use std::time::Duration;

use common::{unsafe_kill, Server, Tree};
use mqtt_support::{broker, seen, unique, wait_connected, wait_seen, Mosquitto, TestClient};

/// A cage `c` whose handler takes a little while and records `seen:<body>` in its state.
fn cage(tree: &Tree, url: &str, topic: &str, client_id: &str) {
    tree.write(
        "c/cage.toml",
        &format!(
            r#"
[interfaces.in]
protocol = "mqtt"
url = "{url}"
topics = ["{topic}"]
client_id = "{client_id}"
max_inflight = 16
"#
        ),
    );
    tree.write(
        "c/in.lua",
        r#"
local M = {}
function M.handle(message)
  pmnc.sleep(0.005)
  pmnc.transaction.state.set("seen:" .. message.body, true)
end
return M
"#,
    );
}

fn start(tree: &Tree) -> Server {
    let mut s = Server::start(&tree.path().join("c"), &[]);
    assert!(wait_connected(&mut s, "in", Duration::from_secs(10)), "the interface did not connect:\n{}", s.log.join("\n"));
    s
}

#[test]
fn messages_published_while_the_cage_is_stopped_arrive_when_it_is_back() {
    let Some((host, port, url)) = broker("mqtt persistent session") else { return };
    let topic = unique("pmnc-c1");
    let tree = Tree::new();
    cage(&tree, &url, &topic, &unique("pmnc-c1-id"));
    let mut server = start(&tree);
    assert!(server.log.iter().any(|l| l.contains("(session new)")), "{}", server.log.join("\n"));
    assert_eq!(server.terminate(Duration::from_secs(20)), Some(0));

    let client = TestClient::connect(&host, port, &[]);
    client.publish_many(&topic, (0..20).map(|i| format!("m{i}")));
    let c = tree.path().join("c");
    assert_eq!(seen(&c), 0, "the cage is stopped");

    let server = start(&tree);
    assert!(server.log.iter().any(|l| l.contains("(session kept)")), "{}", server.log.join("\n"));
    assert_eq!(wait_seen(&c, 20, Duration::from_secs(20)), 20, "every message sent while the cage was down arrives");
}

#[test]
fn a_broker_restart_while_1000_messages_flow_loses_none() {
    let Some(mut mosquitto) = Mosquitto::start("mqtt broker restart") else { return };
    let topic = unique("pmnc-c2");
    let tree = Tree::new();
    cage(&tree, &mosquitto.url(), &topic, &unique("pmnc-c2-id"));
    let mut server = start(&tree);
    let c = tree.path().join("c");

    let client = TestClient::connect("127.0.0.1", mosquitto.port, &[]);
    client.publish_many(&topic, (0..1000).map(|i| format!("m{i}")));
    let before = wait_seen(&c, 100, Duration::from_secs(20));
    assert!((100..1000).contains(&before), "the restart must come mid-stream: {before} handled");

    mosquitto.down();
    let at_stop = seen(&c);
    assert!(at_stop < 1000, "the broker stopped mid-stream: {at_stop} handled by then");
    server.wait_for("lost the connection to mqtt://", Duration::from_secs(10)).expect("the loss is logged");
    mosquitto.up();
    let back = server.wait_for("reconnected to mqtt://", Duration::from_secs(15)).expect("the interface reconnects by itself");
    assert!(back.contains("(session kept)"), "the broker kept the session across its restart: {back}");

    let after = wait_seen(&c, 1000, Duration::from_secs(40));
    assert_eq!(after, 1000, "every message handled at least once across the broker's restart");
    let lost_lines = server.log.iter().filter(|l| l.contains("lost the connection")).count();
    assert_eq!(lost_lines, 1, "one line per outage, not per retry:\n{}", server.log.join("\n"));
}

#[test]
fn the_cage_killed_with_kill_9_mid_stream_loses_nothing() {
    let Some((host, port, url)) = broker("mqtt kill -9") else { return };
    let topic = unique("pmnc-c3");
    let tree = Tree::new();
    cage(&tree, &url, &topic, &unique("pmnc-c3-id"));
    let server = start(&tree);
    let c = tree.path().join("c");

    let client = TestClient::connect(&host, port, &[]);
    client.publish_many(&topic, (0..400).map(|i| format!("m{i}")));
    let before = wait_seen(&c, 40, Duration::from_secs(20));
    unsafe_kill(server.child.id() as i32, 9);
    drop(server);
    assert!(before < 400, "the kill must come mid-stream: {before} handled");

    let server = start(&tree);
    assert!(server.log.iter().any(|l| l.contains("(session kept)")), "{}", server.log.join("\n"));
    assert_eq!(wait_seen(&c, 400, Duration::from_secs(40)), 400, "no message lost to kill -9");
}

#[test]
fn a_stop_with_sigterm_mid_stream_loses_nothing() {
    let Some((host, port, url)) = broker("mqtt stop mid-stream") else { return };
    let topic = unique("pmnc-c4");
    let tree = Tree::new();
    cage(&tree, &url, &topic, &unique("pmnc-c4-id"));
    let mut server = start(&tree);
    let c = tree.path().join("c");
    let client = TestClient::connect(&host, port, &[]);
    client.publish_many(&topic, (0..400).map(|i| format!("m{i}")));
    wait_seen(&c, 40, Duration::from_secs(20));
    assert_eq!(server.terminate(Duration::from_secs(20)), Some(0), "a clean stop:\n{}", server.log.join("\n"));
    let at_stop = seen(&c);
    assert!(at_stop < 400, "the stop must come mid-stream: {at_stop} handled");
    assert!(server.log.iter().any(|l| l.contains("stay with the broker, which sends them again")), "{}", server.log.join("\n"));
    let _server = start(&tree);
    assert_eq!(wait_seen(&c, 400, Duration::from_secs(40)), 400, "what the stop left is handled after the start");
}

#[test]
fn the_resource_publishes_at_each_qos_and_says_clearly_when_the_broker_is_gone() {
    let Some(mut mosquitto) = Mosquitto::start("mqtt resource and a stopped broker") else { return };
    let topic = unique("pmnc-c5");
    let tree = Tree::new();
    tree.write(
        "c/cage.toml",
        &format!(
            "{}\n[resources.mq]\nprotocol = \"mqtt\"\nurl = \"{}\"\nconnect_timeout = \"2s\"\nbreaker_failures = 1000\n",
            common::http_cage_toml(""),
            mosquitto.url()
        ),
    );
    tree.write(
        "c/http.lua",
        &format!(
            r#"
local M = {{}}
function M.handle(request)
  local ok, err = pcall(function()
    local xa = pmnc.transaction.create()
    xa.mq.publish({topic:?}, request.query.body, {{qos = tonumber(request.query.qos)}})
    xa.execute()
  end)
  if ok then return "ok" end
  return "error: " .. tostring(err)
end
return M
"#
        ),
    );
    let server = Server::start(&tree.path().join("c"), &[]);
    let addr = server.addr("http");
    let client = TestClient::connect("127.0.0.1", mosquitto.port, &[&topic]);
    for qos in 0..=2 {
        let r = common::get(addr, &format!("/?qos={qos}&body=q{qos}"));
        assert_eq!(r.text(), "ok", "qos {qos}");
        let got = client.recv(Duration::from_secs(10)).expect("the published message");
        assert_eq!(&got.payload[..], format!("q{qos}").as_bytes());
    }

    mosquitto.down();
    let said = common::get(addr, "/?qos=1&body=lost").text();
    assert!(said.starts_with("error: ") && said.contains("resource mq") && said.contains(&format!("127.0.0.1:{}", mosquitto.port)), "{said}");

    mosquitto.up();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let said = common::get(addr, "/?qos=1&body=back").text();
        if said == "ok" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the resource did not recover: {said}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_broker_restart_under_running_handlers_runs_no_message_twice() {
    let Some(mut mosquitto) = Mosquitto::start("mqtt restart under running handlers") else { return };
    let topic = unique("pmnc-c6");
    let tree = Tree::new();
    cage(&tree, &mosquitto.url(), &topic, &unique("pmnc-c6-id"));
    // Counts the runs of each message; "slow" ones outlast the broker's outage, "fast" ones end
    // while it is down. Fast is 1.5 s, not less: the broker must go down before any of them has
    // acknowledged, and on a loaded machine seeing all eight started can take a few hundred ms.
    tree.write(
        "c/in.lua",
        r#"
local M = {}
function M.handle(message)
  pmnc.transaction.state.set("started:" .. message.body, true)
  pmnc.sleep(message.body:find("^slow") and 4 or 1.5)
  local xa = pmnc.transaction.create()
  xa.state.set("run:" .. message.body .. ":" .. pmnc.request.id, true)
  xa.state.set("seen:" .. message.body, true)
  xa.execute()
end
return M
"#,
    );
    let mut server = start(&tree);
    let c = tree.path().join("c");
    let client = TestClient::connect("127.0.0.1", mosquitto.port, &[]);
    client.publish_many(&topic, (0..4).map(|i| format!("slow{i}")).chain((0..4).map(|i| format!("fast{i}"))));
    let started = |c: &std::path::Path| mqtt_support::count_keys(c, "started:");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while started(&c) < 8 {
        assert!(std::time::Instant::now() < deadline, "all eight handlers start (max_inflight 16)");
        std::thread::sleep(Duration::from_millis(20));
    }
    mosquitto.down();
    server.wait_for("lost the connection", Duration::from_secs(10)).expect("the loss is logged");
    // The fast ones end while the broker is down: their acknowledgements have no connection.
    assert_eq!(wait_seen(&c, 4, Duration::from_secs(10)), 4);
    assert!(seen(&c) < 8, "the slow ones are still running");
    mosquitto.up();
    let back = server.wait_for("reconnected to mqtt://", Duration::from_secs(15)).expect("reconnected");
    assert!(back.contains("(session kept)"), "the broker kept the session across its restart: {back}");
    assert_eq!(wait_seen(&c, 8, Duration::from_secs(15)), 8);

    let addr = common::monitor_addr(&mut server);
    let acked = |server: &mut Server| {
        let _ = server;
        common::sample(&common::get(addr, "/metrics").text(), "pmnc_messages_total{cage=\"c\",interface=\"in\",event=\"acked\"}").unwrap_or(0.0)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while acked(&mut server) < 8.0 {
        if std::time::Instant::now() > deadline {
            server.drain(Duration::from_millis(100));
            panic!(
                "every message acknowledged on the new connection:\n{}\n{}",
                common::get(addr, "/metrics").text().lines().filter(|l| l.contains("messages_total")).collect::<Vec<_>>().join("\n"),
                server.log.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let metrics = common::get(addr, "/metrics").text();
    let count = |event: &str| common::sample(&metrics, &format!("pmnc_messages_total{{cage=\"c\",interface=\"in\",event=\"{event}\"}}")).unwrap_or(0.0);
    assert_eq!(count("redelivered"), 8.0, "the broker sent all eight again after its restart:\n{metrics}");
    assert_eq!(count("acked"), 8.0, "each acknowledged once:\n{metrics}");
    for name in (0..4).map(|i| format!("slow{i}")).chain((0..4).map(|i| format!("fast{i}"))) {
        assert_eq!(mqtt_support::count_keys(&c, &format!("run:{name}:")), 1, "{name} ran once");
    }
}

#[test]
fn a_message_the_broker_refuses_fails_the_commit_with_its_reason_and_the_connection_goes_on() {
    let acl = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(acl.path(), "topic readwrite allowed/#\n").unwrap();
    std::fs::set_permissions(acl.path(), std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let Some(mosquitto) = Mosquitto::start_with("mqtt refused publish", &format!("acl_file {}\n", acl.path().display())) else { return };
    let tree = Tree::new();
    tree.write("c/cage.toml", &format!("{}\n[resources.mq]\nprotocol = \"mqtt\"\nurl = \"{}\"\npool_size = 1\n", common::http_cage_toml(""), mosquitto.url()));
    tree.write(
        "c/http.lua",
        r#"
local M = {}
function M.handle(request)
  local ok, err = pcall(function()
    local xa = pmnc.transaction.create()
    xa.mq.publish(request.query.topic, "x", {qos = tonumber(request.query.qos)})
    xa.execute()
  end)
  if ok then return "ok" end
  return "error: " .. tostring(err)
end
return M
"#,
    );
    let server = Server::start_with_workers(&tree.path().join("c"), 1, &[]);
    let addr = server.addr("http");
    for qos in [1, 2] {
        let said = common::get(addr, &format!("/?topic=denied/x&qos={qos}")).text();
        assert!(said.contains("commit failed") && said.contains("the broker refused the message to \"denied/x\": NotAuthorized"), "qos {qos}: {said}");
        // The same pooled connection (pool_size 1 on one worker) publishes the next one.
        assert_eq!(common::get(addr, &format!("/?topic=allowed/x&qos={qos}")).text(), "ok", "qos {qos}");
    }
}
