//! examples/order-events against the real servers: orders from RabbitMQ are stored in PostgreSQL
//! and confirmed over MQTT in one transaction, once each; a bad order is tried three times, then
//! dead-lettered with its error, with nothing stored and nothing confirmed. Skipped loudly when
//! RabbitMQ, PostgreSQL (and psql) or Mosquitto is missing.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod amqp_support;
mod common;
mod mqtt_support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use amqp_support::Client;
use rustomnic_resource_amqp::lapin::types::ShortString;
use rustomnic_resource_amqp::lapin::BasicProperties;

fn id(s: &str) -> BasicProperties {
    BasicProperties::default().with_message_id(ShortString::from(s))
}
use common::*;

fn postgres_url() -> String {
    std::env::var("PMNC_TEST_POSTGRES_URL").unwrap_or_else(|_| "postgresql://postgres@127.0.0.1:5432/test".into())
}

/// One query through psql: its rows, `|`-separated; None when psql or the server is missing.
fn psql(sql: &str) -> Option<String> {
    let out = Command::new("psql").args([&postgres_url(), "-At", "-c", sql]).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[test]
fn orders_are_stored_and_confirmed_in_one_transaction_and_a_bad_one_is_dead_lettered() {
    let Some(mut c) = Client::shared() else { return };
    let Some((host, port, mqtt_url)) = mqtt_support::broker("order-events") else { return };
    if psql("select 1").as_deref() != Some("1") {
        eprintln!(
            "\n*** SKIPPED order-events: no psql or no PostgreSQL at {} (apt-get install postgresql-client; pg_ctlcluster ... main start) ***\n",
            postgres_url()
        );
        return;
    }
    // The example as shipped, with names of this run's own (queue, dead letters) and the test's urls.
    let run = mqtt_support::unique("oe");
    let (queue, dlx) = (format!("{run}-orders"), format!("{run}.dlx"));
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/order-events");
    let t = Tree::new();
    let toml = std::fs::read_to_string(example.join("cage.toml"))
        .unwrap()
        .replace("queues = [\"orders\"]", &format!("queues = [\"{queue}\"]"))
        .replace("\"orders.dlx\"", &format!("\"{dlx}\""))
        .replace("amqp://guest:guest@127.0.0.1:5672/%2f", &amqp_support::url())
        .replace("postgresql://postgres@127.0.0.1:5432/test", &postgres_url())
        .replace("mqtt://127.0.0.1:1883", &mqtt_url);
    t.write("oe/cage.toml", &toml);
    t.write("oe/orders.lua", &std::fs::read_to_string(example.join("orders.lua")).unwrap());
    // Dead letters land in `<queue>.dead`, which the interface declares and binds.
    c.forget_later(&queue);
    let dead = format!("{queue}.dead");
    c.forget_later(&dead);
    let mut s = Server::start(&t.path().join("oe"), &[]);
    s.wait_for("consuming", Duration::from_secs(20)).expect("the amqp interface consumes");
    let watcher = mqtt_support::TestClient::connect(&host, port, &["orders/+/accepted"]);

    for (n, total) in [("a", 12.5), ("b", 0.0)] {
        let body = format!(r#"{{"id":"{run}-{n}","customer":"ada","total":{total}}}"#);
        c.publish(&queue, body.as_bytes(), id(&format!("{run}-{n}")));
    }
    c.publish(&queue, format!(r#"{{"id":"{run}-bad","customer":"ada","total":-1}}"#).as_bytes(), id(&format!("{run}-bad")));

    // Both good orders are confirmed over MQTT, each once, and stored.
    let mut confirmed = Vec::new();
    // (Other runs may confirm orders of their own on the shared broker: only this run's count.)
    let ours = |p: &rumqttc::v5::mqttbytes::v5::Publish| String::from_utf8_lossy(&p.topic).starts_with(&format!("orders/{run}-"));
    while confirmed.len() < 2 {
        let Some(p) = watcher.recv(Duration::from_secs(30)) else {
            s.drain(Duration::from_millis(300));
            panic!("confirmations so far: {confirmed:?}\n{}", s.log.join("\n"));
        };
        if ours(&p) {
            confirmed.push(String::from_utf8_lossy(&p.topic).to_string());
        }
    }
    confirmed.sort();
    assert_eq!(confirmed, vec![format!("orders/{run}-a/accepted"), format!("orders/{run}-b/accepted")]);
    let rows = psql(&format!("select id, customer, total from example_orders where id like '{run}-%' order by id")).unwrap();
    assert_eq!(rows, format!("{run}-a|ada|12.50\n{run}-b|ada|0.00"));
    // The bad one: three attempts, then the dead-letter exchange with the error; nothing stored,
    // nothing confirmed.
    let dead_letter = c.wait_get(&dead, Duration::from_secs(30)).unwrap_or_else(|| panic!("no dead letter:\n{}", s.log.join("\n")));
    assert!(
        dead_letter.header_text("x-pmnc-error").is_some_and(|e| e.contains("total must be a number >= 0")),
        "{:?}",
        dead_letter.header_text("x-pmnc-error")
    );
    assert!(until(Duration::from_secs(5), || c.ready(&queue) == 0));
    while let Some(p) = watcher.recv(Duration::from_millis(500)) {
        assert!(!ours(&p), "confirmed again or confirmed a bad order: {:?}", p.topic);
    }
    assert_eq!(psql(&format!("select count(*) from example_orders where id = '{run}-bad'")).as_deref(), Some("0"));
    psql(&format!("delete from example_orders where id like '{run}-%'"));
    // The dead-letter exchange goes with the run.
    let _ = c.rt.block_on(c.channel.exchange_delete(ShortString::from(dlx.as_str()), Default::default()));
}
