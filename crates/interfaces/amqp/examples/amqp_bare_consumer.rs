//! The yardstick of bench/amqp.sh: a bare lapin consumer that acks every message with the same
//! prefetch as the amqp interface, on one current-thread runtime (as the interface's consumer
//! thread), and the publisher that fills the queues beforehand.
//!
//! `amqp_bare_consumer publish URL QUEUE COUNT [BYTES]`: declares QUEUE durable, publishes COUNT
//! persistent messages of BYTES (default 100) with confirms.
//! `amqp_bare_consumer consume URL QUEUE COUNT PREFETCH [RUN]`: consumes COUNT messages, acking each
//! (or, with RUN > 1, every RUN-th with `multiple`, the least work a broker can be asked for), and
//! prints `consumed COUNT in SECONDS s: RATE msg/s` (timed from the first delivery).
//! `amqp_bare_consumer delete URL QUEUE 0`: deletes QUEUE.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Instant;

use futures_util::StreamExt;
use rustomnic_resource_amqp::lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use rustomnic_resource_amqp::lapin::types::{FieldTable, ShortString};
use rustomnic_resource_amqp::lapin::BasicProperties;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: amqp_bare_consumer publish URL QUEUE COUNT [BYTES] | consume URL QUEUE COUNT PREFETCH [RUN]";
    if args.len() < 5 {
        eprintln!("{usage}");
        std::process::exit(2);
    }
    let (mode, url, queue, count) = (args[1].as_str(), args[2].as_str(), args[3].as_str(), args[4].parse::<usize>().expect("COUNT"));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let u = rustomnic_resource_amqp::client::parse_url(url).expect("URL");
        let conn = rustomnic_resource_amqp::client::connect(&u, "bare consumer").await.expect("connect");
        let channel = conn.create_channel().await.unwrap();
        if mode == "delete" {
            let _ = channel.queue_delete(ShortString::from(queue), Default::default()).await;
            return;
        }
        let durable = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
        channel.queue_declare(ShortString::from(queue), durable, FieldTable::default()).await.unwrap();
        match mode {
            "publish" => {
                let bytes = args.get(5).map(|b| b.parse::<usize>().expect("BYTES")).unwrap_or(100);
                let body = vec![b'x'; bytes];
                channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
                let started = Instant::now();
                for i in 0..count {
                    let props = BasicProperties::default().with_delivery_mode(2).with_message_id(ShortString::from(format!("m{i}")));
                    channel.basic_publish(ShortString::default(), ShortString::from(queue), BasicPublishOptions::default(), &body, props).await.unwrap();
                    if i % 1000 == 999 {
                        channel.wait_for_confirms().await.unwrap();
                    }
                }
                channel.wait_for_confirms().await.unwrap();
                println!("published {count} in {:.2} s", started.elapsed().as_secs_f64());
            }
            "consume" => {
                let prefetch = args.get(5).map(|p| p.parse::<u16>().expect("PREFETCH")).unwrap_or(16);
                let run = args.get(6).map(|r| r.parse::<usize>().expect("RUN")).unwrap_or(1).max(1);
                channel.basic_qos(prefetch, BasicQosOptions { global: std::env::var_os("BARE_GLOBAL").is_some() }).await.unwrap();
                let mut consumer = channel
                    .basic_consume(ShortString::from(queue), ShortString::from("bare"), BasicConsumeOptions::default(), FieldTable::default())
                    .await
                    .unwrap();
                let mut started = None;
                let mut n = 0;
                while let Some(d) = consumer.next().await {
                    let d = d.expect("delivery");
                    started.get_or_insert_with(Instant::now);
                    n += 1;
                    if run == 1 {
                        d.acker.ack(BasicAckOptions::default()).await.expect("ack");
                    } else if n % run == 0 || n == count {
                        d.acker.ack(BasicAckOptions { multiple: true }).await.expect("ack");
                    }
                    if n == count {
                        break;
                    }
                }
                let secs = started.map(|s| s.elapsed().as_secs_f64()).unwrap_or(0.0);
                println!("consumed {n} in {secs:.2} s: {:.0} msg/s", n as f64 / secs.max(1e-9));
            }
            _ => {
                eprintln!("{usage}");
                std::process::exit(2);
            }
        }
        let _ = conn.close(200, ShortString::from("done")).await;
    });
}
