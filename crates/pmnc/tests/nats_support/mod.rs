//! What the nats tests share: a private nats-server with JetStream (its store kept across a
//! restart), a blocking test client over async-nats, and readers of the cage's state file.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(dead_code)]

use std::time::{Duration, Instant};

use rustomnic_resource_nats::async_nats::{self, jetstream, HeaderMap};

use crate::common::nats::Nats;

/// A nats-server of the test's own with JetStream on a store folder that outlives restarts.
pub struct OwnNats {
    pub nats: Nats,
    _store: tempfile::TempDir,
}

impl OwnNats {
    pub fn start(test: &str) -> Option<OwnNats> {
        let store = tempfile::tempdir().expect("store dir");
        let conf = format!("jetstream {{ store_dir: {:?} }}\n", store.path().display().to_string());
        let nats = Nats::start(test, &conf)?;
        Some(OwnNats { nats, _store: store })
    }

    pub fn url(&self) -> String {
        self.nats.url()
    }
}

/// A blocking client for the tests.
pub struct Client {
    pub rt: tokio::runtime::Runtime,
    pub client: async_nats::Client,
    pub js: jetstream::Context,
}

impl Client {
    pub fn connect(url: &str) -> Client {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let client = rt.block_on(async_nats::ConnectOptions::new().max_reconnects(None).connect(url)).expect("the test client connects");
        let js = {
            let _in = rt.enter();
            jetstream::new(client.clone())
        };
        Client { rt, client, js }
    }

    pub fn publish(&self, subject: &str, body: &[u8], headers: HeaderMap) {
        self.rt.block_on(async {
            self.client.publish_with_headers(subject.to_string(), headers, body.to_vec().into()).await.unwrap();
            self.client.flush().await.unwrap();
        });
    }

    /// Publishes to a stream and waits for its ack (retrying through a server restart).
    pub fn js_publish(&self, subject: &str, body: &[u8], headers: HeaderMap) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let r = self.rt.block_on(async {
                let ack = self.js.publish_with_headers(subject.to_string(), headers.clone(), body.to_vec().into()).await.map_err(|e| e.to_string())?;
                ack.await.map(|_| ()).map_err(|e| e.to_string())
            });
            match r {
                Ok(()) => return,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("publish to {subject}: {e}"),
            }
        }
    }

    /// Subscribes, and returns once the server has the subscription (a message echoed back).
    pub fn subscribe(&self, subject: &str) -> async_nats::Subscriber {
        use futures_util::StreamExt;
        self.rt.block_on(async {
            let s = self.client.subscribe(subject.to_string()).await.unwrap();
            let inbox = self.client.new_inbox();
            let mut echo = self.client.subscribe(inbox.clone()).await.unwrap();
            self.client.publish(inbox, "".into()).await.unwrap();
            tokio::time::timeout(Duration::from_secs(10), echo.next()).await.expect("the server echoes").expect("echo");
            s
        })
    }

    /// The next message of `sub`, within `timeout`.
    pub fn next(&self, sub: &mut async_nats::Subscriber, timeout: Duration) -> Option<async_nats::Message> {
        use futures_util::StreamExt;
        self.rt.block_on(async { tokio::time::timeout(timeout, sub.next()).await.ok().flatten() })
    }

    pub fn request(&self, subject: &str, body: &[u8], headers: HeaderMap, timeout: Duration) -> Result<async_nats::Message, String> {
        self.rt.block_on(async {
            let r = async_nats::Request::new().payload(body.to_vec().into()).headers(headers).timeout(Some(timeout));
            self.client.send_request(subject.to_string(), r).await.map_err(|e| format!("{:?}: {e}", e.kind()))
        })
    }

    /// Creates a stream with these subjects.
    pub fn stream(&self, name: &str, subjects: &[&str]) {
        self.rt.block_on(async {
            let config = jetstream::stream::Config { name: name.to_string(), subjects: subjects.iter().map(|s| s.to_string()).collect(), ..Default::default() };
            self.js.get_or_create_stream(config).await.unwrap();
        });
    }

    /// (messages in the stream, the consumer's acknowledgements pending, messages not yet
    /// delivered, the consumer's last acknowledged stream sequence).
    pub fn consumer_state(&self, stream: &str, consumer: &str) -> (u64, usize, u64, u64) {
        self.rt.block_on(async {
            let mut s = self.js.get_stream(stream).await.unwrap();
            let messages = s.info().await.unwrap().state.messages;
            let mut c: jetstream::consumer::PullConsumer = s.get_consumer(consumer).await.unwrap();
            let info = c.info().await.unwrap();
            (messages, info.num_ack_pending, info.num_pending, info.ack_floor.stream_sequence)
        })
    }

    /// The messages a stream holds.
    pub fn stream_messages(&self, stream: &str) -> u64 {
        self.rt.block_on(async { self.js.get_stream(stream).await.unwrap().info().await.unwrap().state.messages })
    }
}

pub fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(*k, *v);
    }
    h
}

pub fn header(m: &async_nats::Message, name: &str) -> Option<String> {
    m.headers.as_ref().and_then(|h| h.get_last(name)).map(|v| v.as_str().to_string())
}

pub fn json(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body).unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(body)))
}
