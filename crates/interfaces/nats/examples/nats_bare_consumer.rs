//! The baseline of bench/nats.sh: a bare async-nats JetStream consumer that pulls and acks
//! messages with the same max_ack_pending as the interface, and a publisher that fills a stream.
//!
//! `nats_bare_consumer publish URL STREAM SUBJECT COUNT BYTES` creates the stream (if missing) and
//! publishes COUNT messages, each acked by the stream; `nats_bare_consumer consume URL STREAM CONSUMER
//! COUNT MAX_ACK_PENDING` creates a durable pull consumer and acks COUNT messages, printing the
//! rate.
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
        _ => panic!("usage: nats_bare_consumer publish URL STREAM SUBJECT COUNT BYTES | consume URL STREAM CONSUMER COUNT MAX_ACK_PENDING"),
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
