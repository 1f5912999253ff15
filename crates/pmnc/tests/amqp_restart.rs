//! The amqp interface across a broker crash: a RabbitMQ node of the test's own (its own port and
//! data folder, so the shared broker is never touched) is killed while 1,000 messages flow and
//! started again on the same data; every message is handled, none lost, and the outage is logged
//! once. Skipped loudly when rabbitmq-server is not installed. The node is killed when the test
//! ends, failed or not (OwnBroker's drop).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod amqp_support;
mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use amqp_support::*;
use common::*;
use rustomnic_resource_amqp::lapin::types::ShortString;
use rustomnic_resource_amqp::lapin::BasicProperties;

const APP: &str = r#"
return { handle = function(m)
  pmnc.sleep(0.003)
  pmnc.state.set("done:" .. m.properties.message_id, m.attempt)
  local xa = pmnc.transaction.create()
  xa.bus.publish("", "@OUT@", m.body)
  xa.execute()
end }
"#;

#[test]
fn a_broker_killed_and_restarted_mid_stream_loses_no_message() {
    let Some(mut broker) = OwnBroker::start() else { return };
    let url = broker.url();
    let input = queue("restart-in");
    let output = queue("restart-out");
    let t = Tree::new();
    t.write(
        "c/cage.toml",
        &format!(
            "[interfaces.in]\nprotocol = \"amqp\"\nurl = \"{url}\"\nqueues = [\"{input}\"]\ndeclare = true\nprefetch = 32\nhandler = \"app.handle\"\n\n[resources.bus]\nprotocol = \"amqp\"\nurl = \"{url}\"\n"
        ),
    );
    t.write("c/app.lua", &APP.replace("@OUT@", &output));
    let cage = t.path().join("c");
    let c = Client::connect(&url);
    let options = rustomnic_resource_amqp::lapin::options::QueueDeclareOptions { durable: true, ..Default::default() };
    c.rt.block_on(c.channel.queue_declare(ShortString::from(output.as_str()), options, Default::default())).unwrap();
    let mut s = Server::start(&cage, &[]);
    s.wait_for("consuming", Duration::from_secs(10)).expect("consuming");
    // Both queues exist now (the cage declared its own): on the broker's disk before the kill.
    broker.write_metadata();
    let ids: Vec<String> = (0..1000).map(|i| format!("m{i:04}")).collect();
    c.publish_many(&input, ids.iter().map(|i| (i.as_bytes().to_vec(), BasicProperties::default().with_message_id(ShortString::from(i.as_str())))));
    drop(c);
    assert!(until(Duration::from_secs(30), || state_keys(&cage, "done:").len() >= 150), "messages being handled");
    broker.kill();
    let at_kill = state_keys(&cage, "done:").len();
    assert!(at_kill < ids.len(), "killed mid-stream ({at_kill} done)");
    s.wait_for("connecting again with backoff", Duration::from_secs(10)).expect("the outage is logged");
    let down = Instant::now();
    // Down for a while: the interface keeps trying, quietly.
    std::thread::sleep(Duration::from_secs(2));
    broker.boot();
    s.wait_for("again after", Duration::from_secs(30)).expect("reconnected by itself");
    eprintln!("broker down for {:?}", down.elapsed());
    // The node writes its log asynchronously: its recovery line may land a moment after it
    // accepted the cage's connection.
    until(Duration::from_secs(10), || broker.recovered_queues() == Some(2));
    assert_eq!(broker.recovered_queues(), Some(2), "the broker recovered both queues:\n{}", broker.report());
    let want: BTreeSet<String> = ids.iter().map(|i| format!("done:{i}")).collect();
    let all = until(Duration::from_secs(60), || state_keys(&cage, "done:").len() >= want.len());
    let got: BTreeSet<String> = state_keys(&cage, "done:").into_iter().collect();
    let missing: Vec<_> = want.difference(&got).take(10).collect();
    if !(all && missing.is_empty()) {
        s.drain(Duration::from_millis(500));
        let tail: Vec<&String> = s.log.iter().rev().take(60).collect::<Vec<_>>().into_iter().rev().collect();
        panic!(
            "lost across the broker restart (killed at {at_kill}, {} done): {missing:?}\nthe cage's log, last lines:\n{tail:#?}\nthe broker:\n{}",
            got.len(),
            broker.report()
        );
    }
    s.drain(Duration::from_millis(300));
    let warnings = s.log.iter().filter(|l| l.contains("connecting again with backoff")).count();
    assert_eq!(warnings, 1, "the outage is said once: {:#?}", s.log);
    // Every message handled published one out (at least once: a message handled just before the
    // kill may have been handled again).
    let c = Client::connect(&url);
    let out = c.ready(&output);
    assert!(out as usize >= ids.len(), "{out} messages out for {} in", ids.len());
}
