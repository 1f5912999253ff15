//! The baseline of bench/nats.sh: a bare async-nats JetStream consumer that pulls and acks
//! messages with the same max_ack_pending as the interface, and a publisher that fills a stream.
//!
//! `nats_bare_consumer publish URL STREAM SUBJECT COUNT BYTES` creates the stream (if missing) and
//! publishes COUNT messages, each acked by the stream; `nats_bare_consumer consume URL STREAM CONSUMER
//! COUNT MAX_ACK_PENDING` creates a durable pull consumer and acks COUNT messages, printing the
//! rate; `nats_bare_consumer watch URL STREAM CONSUMER COUNT` waits for that consumer to appear and
//! times it from the server's side, from its first delivery to the ack of the stream's COUNT-th
//! message, by asking the server for the consumer's state every 5 ms (the same measure for the
//! bare consumer and the interface, and no process started per look); `nats_bare_consumer count
//! URL STREAM` prints how many messages the stream holds.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Instant;

use futures_util::StreamExt;
use rustomnic_resource_nats::async_nats::{self, jetstream};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    match args.get(1).map(String::as_str) {
        Some("publish") => rt.block_on(publish(&args[2], &args[3], &args[4], args[5].parse().unwrap(), args[6].parse().unwrap())),
        Some("consume") => rt.block_on(consume(&args[2], &args[3], &args[4], args[5].parse().unwrap(), args[6].parse().unwrap())),
        Some("watch") => rt.block_on(watch(&args[2], &args[3], &args[4], args[5].parse().unwrap())),
        Some("count") => rt.block_on(count(&args[2], &args[3])),
        _ => panic!("usage: nats_bare_consumer publish URL STREAM SUBJECT COUNT BYTES | consume URL STREAM CONSUMER COUNT MAX_ACK_PENDING | watch URL STREAM CONSUMER COUNT | count URL STREAM"),
    }
}

async fn publish(url: &str, stream: &str, subject: &str, count: usize, bytes: usize) {
    let client = async_nats::connect(url).await.unwrap();
    let js = jetstream::new(client);
    let config = jetstream::stream::Config { name: stream.to_string(), subjects: vec![subject.to_string()], ..Default::default() };
    js.get_or_create_stream(config).await.unwrap();
    let body = vec![b'x'; bytes];
    // A window of acks in flight: filling the stream is not what is measured.
    let mut acks = Vec::with_capacity(1000);
    for _ in 0..count {
        acks.push(js.publish(subject.to_string(), body.clone().into()).await.unwrap());
        if acks.len() == 1000 {
            for a in acks.drain(..) {
                a.await.unwrap();
            }
        }
    }
    for a in acks {
        a.await.unwrap();
    }
}

async fn consume(url: &str, stream: &str, consumer: &str, count: usize, max_ack_pending: usize) {
    let client = async_nats::connect(url).await.unwrap();
    let js = jetstream::new(client.clone());
    let stream = js.get_stream(stream).await.unwrap();
    let config = jetstream::consumer::pull::Config {
        durable_name: Some(consumer.to_string()),
        ack_policy: jetstream::consumer::AckPolicy::Explicit,
        max_ack_pending: max_ack_pending as i64,
        ..Default::default()
    };
    let c = stream.create_consumer(config).await.unwrap();
    let started = Instant::now();
    let mut messages = c.stream().max_messages_per_batch(max_ack_pending).messages().await.unwrap();
    let mut done = 0;
    while done < count {
        let m = messages.next().await.unwrap().unwrap();
        m.ack().await.unwrap();
        done += 1;
    }
    client.flush().await.unwrap();
    let secs = started.elapsed().as_secs_f64();
    println!("bare: {count} messages in {secs:.2} s = {:.0} msg/s", count as f64 / secs);
}

async fn watch(url: &str, stream: &str, consumer: &str, count: u64) {
    let client = async_nats::connect(url).await.unwrap();
    let js = jetstream::new(client);
    let stream = js.get_stream(stream).await.unwrap();
    let tick = std::time::Duration::from_millis(5);
    let deadline = Instant::now() + std::time::Duration::from_secs(600);
    let mut c = loop {
        if let Ok(c) = stream.get_consumer::<jetstream::consumer::pull::Config>(consumer).await {
            break c;
        }
        assert!(Instant::now() < deadline, "consumer {consumer} did not appear");
        tokio::time::sleep(tick).await;
    };
    let mut started = None;
    loop {
        let info = c.info().await.unwrap().clone();
        if started.is_none() && info.delivered.consumer_sequence > 0 {
            started = Some(Instant::now());
        }
        if info.ack_floor.stream_sequence >= count {
            break;
        }
        assert!(Instant::now() < deadline, "only {} of {count} acked", info.ack_floor.stream_sequence);
        tokio::time::sleep(tick).await;
    }
    let secs = started.map(|s| s.elapsed().as_secs_f64()).unwrap_or(f64::NAN);
    println!("watched: {count} messages in {secs:.3} s = {:.0} msg/s", count as f64 / secs);
}

async fn count(url: &str, stream: &str) {
    let client = async_nats::connect(url).await.unwrap();
    let js = jetstream::new(client);
    let mut stream = js.get_stream(stream).await.unwrap();
    println!("{}", stream.info().await.unwrap().state.messages);
}
