//! The `mqtt` interface and resource through the real binary and a real broker
//! (PMNC_TEST_MQTT_URL, default mqtt://127.0.0.1:1883): a message in, the handler, a message out
//! in the same transaction; replies to a response topic; retries and dead letters; bad input;
//! config errors; mqtts:// with the broker's CA, and a wrong CA refused. Every run uses its own
//! topics and client ids.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
mod mqtt_support;

use std::path::Path;
use std::time::Duration;

use common::{get, line_of, monitor_addr, pmnc, sample, Server, Tree};
use mqtt_support::{broker, unique, TestClient};
use rumqttc::v5::mqttbytes::v5::PublishProperties;

const HANDLER: &str = r#"
local M = {}
function M.handle(message)
  local body = message.body
  if body == "wild" then
    local ok, err = pcall(function()
      local xa = pmnc.transaction.create()
      xa.mq.publish(OUT .. "/#", "x")
      xa.execute()
    end)
    local xa = pmnc.transaction.create()
    xa.mq.publish(OUT, "error:" .. tostring(err))
    xa.execute()
    return
  end
  if body == "bad" then error("rejected " .. body) end
  if body == "slow" then
    pmnc.log.info("slow handler started")
    pmnc.sleep(2)
  end
  local options = {}
  if body == "raise" then
    -- The publish call has run; the handler raises before the commit.
    options.accept = function(results) error("rejected after publishing") end
  end
  local xa = pmnc.transaction.create(options)
  xa.mq.publish(OUT, "echo:" .. body .. ":v" .. VERSION)
  xa.execute()
  return "answer:" .. body
end
return M
"#;

fn module(out: &str, version: u8) -> String {
    format!("local OUT = {out:?}\nlocal VERSION = {version}\n{HANDLER}")
}

fn metrics(server: &mut Server) -> String {
    let addr = monitor_addr(server);
    get(addr, "/metrics").text()
}

fn count(text: &str, interface: &str, event: &str) -> f64 {
    sample(text, &format!("pmnc_messages_total{{cage=\"c\",interface=\"{interface}\",event=\"{event}\"}}")).unwrap_or(0.0)
}

/// A cage `c` with interface `in` (MQTT 5) and `in3` (3.1.1) on `<base>/in5/#` and `<base>/in3/#`, and resource `mq`.
fn cage(tree: &Tree, url: &str, base: &str, extra: &str) {
    tree.write(
        "c/cage.toml",
        &format!(
            r#"
[interfaces.in]
protocol = "mqtt"
url = "{url}"
topics = ["{base}/in5/#"]
client_id = "{base}-in5"
max_attempts = 3
retry_delay = "50ms"
max_message_size = "1KiB"
dead_letter_topic = "{base}/dead"
{extra}

[interfaces.in3]
protocol = "mqtt"
handler = "in3.handle"
url = "{url}"
version = 3
topics = ["{base}/in3/#"]
client_id = "{base}-in3"

[resources.mq]
protocol = "mqtt"
url = "{url}"
"#
        ),
    );
    tree.write("c/in.lua", &module(&format!("{base}/out"), 5));
    tree.write("c/in3.lua", &module(&format!("{base}/out"), 3));
}

fn start(tree: &Tree) -> Server {
    let mut s = Server::start(&tree.path().join("c"), &[]);
    for iface in ["in", "in3"] {
        assert!(mqtt_support::wait_connected(&mut s, iface, Duration::from_secs(10)), "interface {iface} did not connect:\n{}", s.log.join("\n"));
    }
    s
}

fn text(p: &rumqttc::v5::mqttbytes::v5::Publish) -> String {
    String::from_utf8_lossy(&p.payload).into_owned()
}

#[test]
fn a_message_in_makes_a_message_out_in_the_same_transaction_and_a_raise_sends_nothing() {
    let Some((host, port, url)) = broker("mqtt message in, message out") else { return };
    let base = unique("pmnc-t1");
    let tree = Tree::new();
    cage(&tree, &url, &base, "");
    let mut server = start(&tree);
    let client = TestClient::connect(&host, port, &[&format!("{base}/out")]);

    client.publish(&format!("{base}/in5/a"), b"hello");
    let got = client.recv(Duration::from_secs(10)).expect("the handler's message");
    assert_eq!(text(&got), "echo:hello:v5");

    // MQTT 3.1.1 works the same way.
    client.publish(&format!("{base}/in3/a"), b"hello3");
    let got = client.recv(Duration::from_secs(10)).expect("the 3.1.1 handler's message");
    assert_eq!(text(&got), "echo:hello3:v3");

    // A handler that raises after publishing: the transaction rolled back, nothing is sent, on
    // every attempt. A later message still goes through, and is the only one that arrives.
    client.publish(&format!("{base}/in5/a"), b"raise");
    server.wait_for("dead-lettered after 3 attempt(s)", Duration::from_secs(10)).expect("the raise was dead-lettered");
    client.publish(&format!("{base}/in5/a"), b"after");
    let got = client.recv(Duration::from_secs(10)).expect("the message after the raise");
    assert_eq!(text(&got), "echo:after:v5", "nothing of the raising handler was published");
    assert!(client.recv(Duration::from_millis(300)).is_none());
}

#[test]
fn a_request_with_a_response_topic_gets_the_handlers_result_with_its_correlation_data() {
    let Some((host, port, url)) = broker("mqtt request/response") else { return };
    let base = unique("pmnc-t2");
    let tree = Tree::new();
    cage(&tree, &url, &base, "");
    let _server = start(&tree);
    let client = TestClient::connect(&host, port, &[&format!("{base}/replies")]);
    let props = PublishProperties {
        response_topic: Some(format!("{base}/replies")),
        correlation_data: Some(bytes::Bytes::from_static(b"corr-42")),
        user_properties: vec![("trace".into(), "t-1".into())],
        ..Default::default()
    };
    client.publish_with(&format!("{base}/in5/req"), b"question", Some(props));
    let reply = client.recv(Duration::from_secs(10)).expect("a reply");
    assert_eq!(text(&reply), "answer:question");
    assert_eq!(reply.properties.and_then(|p| p.correlation_data).as_deref(), Some(&b"corr-42"[..]));
}

#[test]
fn a_failing_handler_is_tried_max_attempts_times_then_dead_lettered_and_only_then_acknowledged() {
    let Some((host, port, url)) = broker("mqtt retries and dead letters") else { return };
    let base = unique("pmnc-t3");
    let tree = Tree::new();
    // A slow second retry leaves time to look at the counts before the last attempt.
    cage(&tree, &url, &base, "");
    let toml = std::fs::read_to_string(tree.path().join("c/cage.toml")).unwrap().replace("retry_delay = \"50ms\"", "retry_delay = \"700ms\"");
    tree.write("c/cage.toml", &toml);
    let mut server = start(&tree);
    let client = TestClient::connect(&host, port, &[&format!("{base}/dead")]);
    client.publish(&format!("{base}/in5/x"), b"bad");
    server.wait_for("failed (attempt 1 of 3)", Duration::from_secs(10)).expect("first failure");
    server.wait_for("failed (attempt 2 of 3)", Duration::from_secs(10)).expect("second failure");
    let m = metrics(&mut server);
    assert_eq!(count(&m, "in", "received"), 1.0, "{m}");
    assert_eq!(count(&m, "in", "retried"), 2.0, "{m}");
    assert_eq!(count(&m, "in", "acked"), 0.0, "nothing is acknowledged before its last attempt:\n{m}");
    let dead = client.recv(Duration::from_secs(10)).expect("the dead letter");
    assert_eq!(text(&dead), "bad", "the dead letter carries the original body");
    let user = dead.properties.map(|p| p.user_properties).unwrap_or_default();
    let prop = |k: &str| user.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()).unwrap_or_default();
    assert!(prop("pmnc-error").contains("rejected bad"), "{user:?}");
    assert_eq!(prop("pmnc-attempts"), "3");
    assert_eq!(prop("pmnc-topic"), format!("{base}/in5/x"));
    server.wait_for("dead-lettered after 3 attempt(s)", Duration::from_secs(5)).expect("the dead letter is logged");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut m = metrics(&mut server);
    while count(&m, "in", "acked") < 1.0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        m = metrics(&mut server);
    }
    assert_eq!(count(&m, "in", "dead_lettered"), 1.0, "{m}");
    assert_eq!(count(&m, "in", "acked"), 1.0, "acknowledged once the dead letter was published:\n{m}");
}

#[test]
fn bad_input_is_refused_clearly_and_the_consumer_goes_on() {
    let Some((host, port, url)) = broker("mqtt bad input") else { return };
    let base = unique("pmnc-t4");
    let tree = Tree::new();
    cage(&tree, &url, &base, "");
    let mut server = start(&tree);
    let client = TestClient::connect(&host, port, &[&format!("{base}/out"), &format!("{base}/dead")]);

    // Over max_message_size (1 KiB): refused before any handler, counted, dead-lettered.
    client.publish(&format!("{base}/in5/big"), &[b'x'; 2000]);
    let dead = client.recv(Duration::from_secs(10)).expect("the refused message as a dead letter");
    assert_eq!(dead.topic.as_ref(), format!("{base}/dead").as_bytes());
    assert_eq!(dead.payload.len(), 2000);
    let error = dead.properties.map(|p| p.user_properties).unwrap_or_default().into_iter().find(|(k, _)| k == "pmnc-error").map(|(_, v)| v).unwrap_or_default();
    assert!(error.contains("2000 bytes, over max_message_size (1024 bytes)"), "{error}");
    server.wait_for("refused: its body is 2000 bytes", Duration::from_secs(5)).expect("the refusal is logged");

    // The consumer goes on; a publish to a topic with a wildcard fails at the call, clearly.
    client.publish(&format!("{base}/in5/w"), b"wild");
    let got = client.recv(Duration::from_secs(10)).expect("the handler's report");
    let said = text(&got);
    assert!(said.starts_with("error:") && said.contains("has a wildcard (+ or #)"), "{said}");

    let m = metrics(&mut server);
    assert_eq!(count(&m, "in", "refused"), 1.0, "{m}");
    assert_eq!(count(&m, "in", "received"), 2.0, "{m}");
}

#[test]
fn config_errors_are_reported_with_file_line_and_key() {
    let tree = Tree::new();
    let toml = r#"
[interfaces.in]
protocol = "mqtt"
url = "tcp://broker:1883"
topics = ["orders/#/x"]
qos = 2
keep_alive = "1s"
version = 7
max_message_size = "1GiB"
dead_letter_topic = "dead/+"
topic = "orders/new"

[resources.mq]
protocol = "mqtt"
qos = 3
ca = "missing-ca.pem"

[resources.plain]
protocol = "mqtt"
url = "mqtt://127.0.0.1:1883"
ca = "ca.pem"
"#;
    tree.write("c/cage.toml", toml);
    tree.write("c/in.lua", "local M = {}\nfunction M.handle(m) end\nreturn M\n");
    let pki = rustomnic_resource::testing_tls::TestPki::new("mqtt-check", &["localhost"]).unwrap();
    std::fs::copy(&pki.ca, tree.path().join("c/ca.pem")).unwrap();
    let out = pmnc(&["check", tree.path().join("c").to_str().unwrap()]);
    assert_ne!(out.code, Some(0));
    let text = format!("{}{}", out.stdout, out.stderr);
    let file = Path::new("c").join("cage.toml");
    let expect = |needle: &str, key: &str, says: &str| {
        let line = line_of(toml, needle);
        let want = format!("cage.toml:{line}: {key}: ");
        let found = text.lines().find(|l| l.contains(&want));
        let l = found.unwrap_or_else(|| panic!("no {want:?} in:\n{text}"));
        assert!(l.contains(says), "{l:?} should say {says:?}");
        assert!(l.contains(&file.display().to_string()) || l.contains("cage.toml"), "{l}");
    };
    expect("url = \"tcp", "interfaces.in.url", "is not an MQTT url");
    expect("topics =", "interfaces.in.topics", "# must be a whole level and the last one");
    expect("qos = 2", "interfaces.in.qos", "2 is not supported for subscriptions");
    expect("keep_alive", "interfaces.in.keep_alive", "at least 5s");
    expect("version = 7", "interfaces.in.version", "5 or 3");
    expect("max_message_size", "interfaces.in.max_message_size", "over the limit");
    expect("dead_letter_topic", "interfaces.in.dead_letter_topic", "wildcard");
    expect("topic = \"orders/new", "interfaces.in.topic", "unknown key");
    expect("qos = 3", "resources.mq.qos", "out of range");
    expect("missing-ca.pem", "resources.mq.ca", "cannot read");
    expect("ca = \"ca.pem", "resources.plain.ca", "only read with an mqtts:// url");
    assert!(text.contains("resources.mq") && text.contains("url is required"), "{text}");
}

#[test]
fn mqtts_checks_the_brokers_certificate_against_ca() {
    let pki = rustomnic_resource::testing_tls::TestPki::new("mqtt", &["localhost"]).unwrap();
    let tls_port = common::spare_port();
    let more = format!("listener {tls_port} 127.0.0.1\ncertfile {}\nkeyfile {}\n", pki.cert.display(), pki.key.display());
    let Some(mosquitto) = mqtt_support::Mosquitto::start_with("mqtt over TLS", &more) else { return };
    let base = unique("pmnc-t5");
    let tree = Tree::new();
    tree.write(
        "c/cage.toml",
        &format!(
            r#"
[interfaces.in]
protocol = "mqtt"
url = "mqtts://localhost:{tls_port}"
ca = "{ca}"
topics = ["{base}/in5/#"]
client_id = "{base}-in"

[interfaces.wrong]
protocol = "mqtt"
handler = "in.handle"
url = "mqtts://localhost:{tls_port}"
ca = "{other}"
topics = ["{base}/wrong"]
client_id = "{base}-wrong"

[resources.mq]
protocol = "mqtt"
url = "mqtts://localhost:{tls_port}"
ca = "{ca}"
"#,
            ca = pki.ca.display(),
            other = pki.other_ca.display()
        ),
    );
    tree.write("c/in.lua", &module(&format!("{base}/out"), 5));
    let mut server = Server::start(&tree.path().join("c"), &[]);
    assert!(mqtt_support::wait_connected(&mut server, "in", Duration::from_secs(10)), "{}", server.log.join("\n"));
    // The plain listener of the same broker, for the test's own client.
    let client = TestClient::connect("127.0.0.1", mosquitto.port, &[&format!("{base}/out")]);
    client.publish(&format!("{base}/in5/a"), b"secret");
    let got = client.recv(Duration::from_secs(10)).expect("the handler's message, in and out over TLS");
    assert_eq!(text(&got), "echo:secret:v5");

    let refused = server.wait_for("cannot connect to mqtts://localhost", Duration::from_secs(10)).expect("the interface with the wrong CA says why");
    assert!(refused.contains("TLS: the server's certificate is not signed by the CA of ca = ") && refused.contains("other-ca.pem"), "{refused}");
}

#[test]
fn a_changed_interface_table_hands_the_session_over_without_a_tug_of_war() {
    let Some((host, port, url)) = broker("mqtt live change") else { return };
    let base = unique("pmnc-t6");
    let tree = Tree::new();
    cage(&tree, &url, &base, "");
    let mut server = start(&tree);
    let client = TestClient::connect(&host, port, &[&format!("{base}/out")]);
    client.publish(&format!("{base}/in5/a"), b"before");
    assert_eq!(text(&client.recv(Duration::from_secs(10)).expect("before the change")), "echo:before:v5");

    // A handler still runs in the old interface when the new one connects with the same client id.
    client.publish(&format!("{base}/in5/a"), b"slow");
    server.wait_for("slow handler started", Duration::from_secs(10)).expect("the slow handler runs");
    let toml = std::fs::read_to_string(tree.path().join("c/cage.toml")).unwrap().replace("max_attempts = 3", "max_attempts = 4");
    tree.write_rename("c/cage.toml", &toml);
    server.wait_for("interface changed in cage.toml: started again", Duration::from_secs(10)).expect("the interface restarts");
    let kept = server.wait_for_all(&["connected to mqtt://", "(session kept)"], Duration::from_secs(10)).expect("the new one takes the session over");
    assert!(kept.trim_end().ends_with("interface=in"), "{kept}");
    client.publish(&format!("{base}/in5/a"), b"after");
    let mut got = Vec::new();
    while !got.iter().any(|t| t == "echo:after:v5") {
        got.push(text(&client.recv(Duration::from_secs(10)).unwrap_or_else(|| panic!("after the change; got {got:?}"))));
    }
    // The slow message: handled by the old interface (its acknowledgement had no connection any
    // more) and again by the new one, which the broker sent it to.
    while got.iter().filter(|t| *t == "echo:slow:v5").count() < 1 {
        got.push(text(&client.recv(Duration::from_secs(10)).unwrap_or_else(|| panic!("the slow message; got {got:?}"))));
    }
    server.drain(Duration::from_secs(2));
    let tugs = server.log.iter().filter(|l| l.contains("reconnected to mqtt://")).count();
    assert_eq!(tugs, 0, "neither copy took the session back from the other:\n{}", server.log.join("\n"));
}
