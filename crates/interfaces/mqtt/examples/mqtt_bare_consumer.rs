//! The yardstick of bench/mqtt.sh: a bare rumqttc consumer doing what the `mqtt` interface does
//! per message minus Lua (QoS 1, manual acknowledgements, a persistent session), timing how long
//! it takes to take and acknowledge COUNT messages.
//!
//! `mqtt-bare-consumer HOST PORT TOPIC COUNT CLIENT_ID [subscribe-only | publish]`: with
//! `subscribe-only` it makes the persistent session and its subscription, then ends; with
//! `publish` it publishes COUNT QoS 1 messages (their numbers) and ends once the broker has
//! acknowledged every one (the bench fills the sessions so).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, Incoming, MqttOptions};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 6 {
        eprintln!("usage: mqtt-bare-consumer HOST PORT TOPIC COUNT CLIENT_ID [subscribe-only]");
        std::process::exit(2);
    }
    let (host, port, topic, count, id) = (&args[1], args[2].parse().unwrap(), &args[3], args[4].parse::<u64>().unwrap(), &args[5]);
    let subscribe_only = args.get(6).is_some_and(|a| a == "subscribe-only");
    if args.get(6).is_some_and(|a| a == "publish") {
        publish(host, port, topic, count, id).await;
        return;
    }
    let mut o = MqttOptions::new(id.clone(), host.clone(), port);
    o.set_clean_start(false);
    o.set_session_expiry_interval(Some(3600));
    o.set_manual_acks(true);
    o.set_receive_maximum(Some(16));
    o.set_keep_alive(Duration::from_secs(30));
    // Acknowledgements wait in this channel while the loop is busy reading: a broker may send a
    // whole backlog at once after a reconnect, and a full channel would block the only task that
    // drains it.
    let (client, mut eventloop) = AsyncClient::new(o, count as usize + 1024);
    client.subscribe(topic.clone(), QoS::AtLeastOnce).await.unwrap();
    let mut started: Option<Instant> = None;
    let mut seen = 0u64;
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Incoming::SubAck(_))) if subscribe_only => {
                client.disconnect().await.unwrap();
            }
            Ok(Event::Incoming(Incoming::Publish(p))) => {
                started.get_or_insert_with(Instant::now);
                client.ack(&p).await.unwrap();
                seen += 1;
                if seen == count {
                    let secs = started.map(|s| s.elapsed().as_secs_f64()).unwrap_or(0.0);
                    println!("bare: {count} messages in {secs:.3}s: {:.0} msg/s", count as f64 / secs.max(1e-9));
                    // Let the last acknowledgements go out.
                    client.disconnect().await.unwrap();
                }
            }
            Ok(other) => {
                if std::env::var("BARE_DEBUG").is_ok() {
                    eprintln!("{seen}: {other:?}");
                }
            }
            Err(e) if subscribe_only || seen == count => {
                let _ = e;
                return;
            }
            Err(e) => panic!("connection lost: {e}"),
        }
    }
}

/// Publishes `count` QoS 1 messages, at most 100 waiting for their PUBACK at once.
async fn publish(host: &str, port: u16, topic: &str, count: u64, id: &str) {
    let mut o = MqttOptions::new(id.to_string(), host.to_string(), port);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_outgoing_inflight_upper_limit(100);
    let (client, mut eventloop) = AsyncClient::new(o, 1024);
    let topic = topic.to_string();
    tokio::spawn(async move {
        for i in 1..=count {
            client.publish(topic.clone(), QoS::AtLeastOnce, false, i.to_string()).await.unwrap();
        }
    });
    let mut acked = 0u64;
    while acked < count {
        match eventloop.poll().await {
            Ok(Event::Incoming(Incoming::PubAck(_))) => acked += 1,
            Ok(_) => {}
            Err(e) => panic!("publisher lost its connection after {acked} acknowledged: {e}"),
        }
    }
}
