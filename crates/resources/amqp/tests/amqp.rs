//! The amqp resource against a real RabbitMQ (PMNC_TEST_AMQP_URL, default
//! amqp://guest:guest@127.0.0.1:5672/%2f): publish at commit with confirms, nothing on rollback,
//! unroutable messages failing the commit, properties and headers as sent, RPC through direct
//! reply-to, and configuration problems. Every test uses queues named after the process and
//! deletes them at the end.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::BasicProperties;
use rustomnic_core::Value;
use rustomnic_resource::testing::{configure, run_lua, shout};
use rustomnic_resource::ResourceConfig;
use rustomnic_resource_amqp::{lapin, Amqp};

const START: &str = "rabbitmq-server -detached (or: service rabbitmq-server start)";

fn url() -> String {
    std::env::var("PMNC_TEST_AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_string())
}

/// The test's own client: a runtime of its own and one channel.
struct Client {
    rt: tokio::runtime::Runtime,
    _conn: lapin::Connection,
    channel: lapin::Channel,
    queues: Vec<String>,
}

impl Client {
    /// Connects, or says loudly that the test is skipped and returns None.
    fn new() -> Option<Client> {
        let u = rustomnic_resource_amqp::client::parse_url(&url()).expect("PMNC_TEST_AMQP_URL");
        let addr = format!("{}:{}", u.uri.authority.host, u.uri.authority.port);
        let reachable = addr.to_socket_addrs().ok().and_then(|mut a| a.next()).is_some_and(|a| TcpStream::connect_timeout(&a, Duration::from_secs(1)).is_ok());
        if !reachable {
            shout(&format!("SKIPPED: no RabbitMQ at {}. Start one with: {START}", u.display));
            return None;
        }
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let (conn, channel) = rt.block_on(async {
            let conn = rustomnic_resource_amqp::client::connect(&u, "resource test").await.unwrap();
            let channel = conn.create_channel().await.unwrap();
            (conn, channel)
        });
        Some(Client { rt, _conn: conn, channel, queues: Vec::new() })
    }

    /// Declares a queue of this test (named after the process and `name`).
    fn queue(&mut self, name: &str) -> String {
        let q = format!("pmnc-test-{}-{name}", std::process::id());
        self.rt.block_on(self.channel.queue_declare(ShortString::from(q.as_str()), QueueDeclareOptions::default(), FieldTable::default())).unwrap();
        self.queues.push(q.clone());
        q
    }

    /// Takes every message now in `queue`.
    fn take(&self, queue: &str) -> Vec<lapin::message::BasicGetMessage> {
        let mut out = Vec::new();
        while let Some(m) = self.rt.block_on(self.channel.basic_get(ShortString::from(queue), BasicGetOptions { no_ack: true })).unwrap() {
            out.push(m);
        }
        out
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        for q in std::mem::take(&mut self.queues) {
            let _ = self.rt.block_on(self.channel.queue_delete(ShortString::from(q.as_str()), QueueDeleteOptions::default()));
        }
    }
}

fn bus() -> ResourceConfig {
    configure(&Amqp, "bus", &format!("url = \"{}\"", url())).expect("config")
}

fn run(lua: &str, args: Vec<Value>) -> Result<Vec<Value>, rustomnic_lua::RunError> {
    let source = format!("return {{ f = function(q, extra)\n{lua}\nend }}");
    run_lua(vec![bus()], &source, "f", args, Duration::from_secs(10))
}

#[test]
fn publish_happens_at_commit_and_rollback_sends_nothing() {
    let Some(mut c) = Client::new() else { return };
    let q = c.queue("commit");
    run(
        r#"local xa = pmnc.transaction.create()
           xa.bus.publish("", q, "one", { content_type = "text/plain", message_id = "m1", headers = { n = 7, tag = "x" } })
           xa.bus.publish("", q, { two = 2 })
           xa.execute()"#,
        vec![Value::str(q.as_str())],
    )
    .unwrap();
    let mut got = c.take(&q);
    assert_eq!(got.len(), 2, "both messages published at commit");
    // The two calls are two participants, committed in parallel: either may arrive first.
    got.sort_by(|a, b| a.delivery.data.cmp(&b.delivery.data));
    assert_eq!(got[0].delivery.data, b"one");
    let p = &got[0].delivery.properties;
    assert_eq!(p.content_type().as_ref().unwrap().as_str(), "text/plain");
    assert_eq!(p.message_id().as_ref().unwrap().as_str(), "m1");
    assert_eq!(p.delivery_mode(), &Some(2), "persistent by default");
    let headers = p.headers().as_ref().unwrap().inner();
    assert_eq!(headers.get("n"), Some(&AMQPValue::LongLongInt(7)));
    assert_eq!(got[1].delivery.data, b"{\"two\":2}");
    assert_eq!(got[1].delivery.properties.content_type().as_ref().unwrap().as_str(), "application/json");

    // The module raises after the calls ran, before the commit (in accept): nothing goes out.
    let e = run(
        r#"local xa = pmnc.transaction.create({ accept = function(results)
             assert(results[1].ok)
             error("changed my mind")
           end })
           xa.bus.publish("", q, "never")
           xa.execute()"#,
        vec![Value::str(q.as_str())],
    );
    assert!(e.is_err());
    // A failing participant beside it: the publish is rolled back too.
    let e = run(
        r#"local xa = pmnc.transaction.create()
           xa.bus.publish("", q, "never either")
           xa.bus.publish("", q, "bad", { priority = "high" })
           xa.execute()"#,
        vec![Value::str(q.as_str())],
    )
    .unwrap_err();
    assert!(e.to_string().contains("properties.priority must be a whole number"), "{e}");
    assert!(c.take(&q).is_empty(), "nothing published on rollback");
}

#[test]
fn an_unroutable_message_fails_the_commit_unless_not_mandatory() {
    let Some(c) = Client::new() else { return };
    let missing = format!("pmnc-test-{}-nobody", std::process::id());
    let e = run(r#"pmnc.transaction.bus.publish("", q, "lost?")"#, vec![Value::str(missing.as_str())]).unwrap_err();
    let text = e.to_string();
    assert!(text.contains("no queue took the message") && text.contains("NO_ROUTE"), "{text}");
    run(r#"pmnc.transaction.bus.publish("", q, "dropped", { mandatory = false })"#, vec![Value::str(missing.as_str())]).unwrap();
    // An exchange that does not exist: the broker closes the channel; the commit fails.
    let e = run(r#"pmnc.transaction.bus.publish("no-such-exchange-pmnc", "k", "x")"#, vec![Value::Nil]).unwrap_err();
    assert!(e.to_string().contains("no-such-exchange-pmnc"), "{e}");
    drop(c);
}

#[test]
fn bad_arguments_are_refused_at_the_call() {
    let e = run(r#"pmnc.transaction.bus.publish("", "q")"#, vec![]).unwrap_err().to_string();
    assert!(e.contains("takes 3 or 4 arguments"), "{e}");
    let e = run(r#"pmnc.transaction.bus.publish("", ("k"):rep(300), "x")"#, vec![]).unwrap_err().to_string();
    assert!(e.contains("routing_key is 300 bytes long"), "{e}");
    let e = run(r#"pmnc.transaction.bus.publish("", "q", "x", { colour = "red" })"#, vec![]).unwrap_err().to_string();
    assert!(e.contains("properties.colour is not a message property"), "{e}");
    let e = run(r#"pmnc.transaction.bus.send("", "q", "x")"#, vec![]).unwrap_err().to_string();
    assert!(e.contains("not a method of an amqp resource"), "{e}");
}

#[test]
fn call_returns_the_reply_and_a_handler_error_is_an_error() {
    let Some(mut c) = Client::new() else { return };
    let q = c.queue("rpc");
    // A responder on the test's own runtime: upper-cases the body; "fail" gets an error reply.
    let channel = c.channel.clone();
    let q2 = q.clone();
    c.rt.spawn(async move {
        let mut consumer = channel
            .basic_consume(ShortString::from(q2.as_str()), ShortString::from("responder"), BasicConsumeOptions::default(), FieldTable::default())
            .await
            .unwrap();
        while let Some(Ok(d)) = consumer.next().await {
            let reply_to = d.properties.reply_to().clone().unwrap();
            let mut props = BasicProperties::default().with_correlation_id(d.properties.correlation_id().clone().unwrap());
            let body = if d.data == b"fail" {
                let mut h = FieldTable::default();
                h.insert(ShortString::from("x-pmnc-error"), AMQPValue::LongString(LongString::from(b"it broke".to_vec())));
                props = props.with_headers(h);
                Vec::new()
            } else {
                d.data.to_ascii_uppercase()
            };
            channel.basic_publish(ShortString::default(), reply_to, BasicPublishOptions::default(), &body, props).await.unwrap();
            d.ack(BasicAckOptions::default()).await.unwrap();
        }
    });
    let started = Instant::now();
    let r = run(r#"local r = pmnc.transaction.bus.call("", q, "hello") return r.body, r.properties.correlation_id"#, vec![Value::str(q.as_str())]).unwrap();
    assert_eq!(r[0], Value::str("HELLO"));
    assert!(r[1].as_str().unwrap().starts_with("pmnc-"), "{r:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    let e = run(r#"return pmnc.transaction.bus.call("", q, "fail")"#, vec![Value::str(q.as_str())]).unwrap_err().to_string();
    assert!(e.contains("the handler failed: it broke"), "{e}");
    // Nobody serves this routing key: the request comes back at once, not at the deadline.
    let started = Instant::now();
    let e = run(r#"return pmnc.transaction.bus.call("", q .. "-nobody", "x")"#, vec![Value::str(q.as_str())]).unwrap_err().to_string();
    assert!(e.contains("call to") && e.contains("no queue took the message"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn a_call_without_reply_ends_at_the_deadline() {
    let Some(mut c) = Client::new() else { return };
    let q = c.queue("silent");
    let source = "return { f = function(q) return pmnc.transaction.bus.call('', q, 'anyone?') end }";
    let started = Instant::now();
    let e = run_lua(vec![bus()], source, "f", vec![Value::str(q.as_str())], Duration::from_millis(800)).unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(4), "ended at the deadline");
    assert!(e.to_string().contains("deadline"), "{e}");
    assert_eq!(c.take(&q).len(), 1, "the request was sent once");
}

#[test]
fn config_problems_are_reported_with_the_key() {
    let e = configure(&Amqp, "bus", "").unwrap_err().join("\n");
    assert!(e.contains("url is required"), "{e}");
    let e = configure(&Amqp, "bus", "url = \"http://x\"").unwrap_err().join("\n");
    assert!(e.contains("cage.toml:2: resources.bus.url: not an AMQP url"), "{e}");
    let e = configure(&Amqp, "bus", "url = \"amqp://h/\"\ncolour = 1").unwrap_err().join("\n");
    assert!(e.contains("resources.bus.colour: unknown key"), "{e}");
}
