//! What the amqp tests share: the broker's url (PMNC_TEST_AMQP_URL) and the loud skip, a test
//! client of its own (lapin on a runtime of its own: declare, publish with confirms, get, count,
//! delete), queue names unique to the test process, and a RabbitMQ node of the test's own for
//! tests that kill the broker.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(dead_code)]

use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::until;
use rustomnic_resource_amqp::lapin;
use rustomnic_resource_amqp::lapin::options::{BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions};
use rustomnic_resource_amqp::lapin::types::{FieldTable, ShortString};
use rustomnic_resource_amqp::lapin::BasicProperties;

pub const START: &str = "rabbitmq-server -detached (or: service rabbitmq-server start)";

pub fn url() -> String {
    std::env::var("PMNC_TEST_AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_string())
}

/// Says loudly (past the harness's capture) that a test is skipped.
pub fn shout(text: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "\n!!!!!!!!\n{text}\n!!!!!!!!\n");
}

/// A queue name of this test process.
pub fn queue(name: &str) -> String {
    format!("pmnc-test-{}-{name}", std::process::id())
}

/// A message as taken from a queue.
pub struct Got {
    pub body: Vec<u8>,
    pub properties: BasicProperties,
    pub redelivered: bool,
}

impl Got {
    pub fn header_text(&self, name: &str) -> Option<String> {
        rustomnic_resource_amqp::wire::header_text(&self.properties, name)
    }

    pub fn header_int(&self, name: &str) -> Option<i64> {
        rustomnic_resource_amqp::wire::header_int(&self.properties, name)
    }
}

/// The test's own client; the queues it declared are deleted when it is dropped.
pub struct Client {
    pub rt: tokio::runtime::Runtime,
    pub conn: lapin::Connection,
    pub channel: lapin::Channel,
    declared: Vec<String>,
}

impl Client {
    /// Connects to the shared broker, or says loudly that the test is skipped.
    pub fn shared() -> Option<Client> {
        let u = rustomnic_resource_amqp::client::parse_url(&url()).expect("PMNC_TEST_AMQP_URL");
        let addr = format!("{}:{}", u.uri.authority.host, u.uri.authority.port);
        let reachable = addr.to_socket_addrs().ok().and_then(|mut a| a.next()).is_some_and(|a| TcpStream::connect_timeout(&a, Duration::from_secs(1)).is_ok());
        if !reachable {
            shout(&format!("SKIPPED: no RabbitMQ at {}. Start one with: {START}", u.display));
            return None;
        }
        Some(Client::connect(&url()))
    }

    pub fn connect(url: &str) -> Client {
        let u = rustomnic_resource_amqp::client::parse_url(url).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let (conn, channel) = rt.block_on(async {
            let conn = rustomnic_resource_amqp::client::connect(&u, "pmnc test").await.unwrap();
            let channel = conn.create_channel().await.unwrap();
            channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
            (conn, channel)
        });
        Client { rt, conn, channel, declared: Vec::new() }
    }

    /// Declares a durable queue (to be deleted at the end).
    pub fn declare(&mut self, q: &str) {
        let options = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
        self.rt.block_on(self.channel.queue_declare(ShortString::from(q), options, FieldTable::default())).unwrap();
        self.forget_later(q);
    }

    /// Deletes `q` at the end (a queue the cage declared).
    pub fn forget_later(&mut self, q: &str) {
        if !self.declared.iter().any(|d| d == q) {
            self.declared.push(q.to_string());
        }
    }

    /// Publishes persistently to the default exchange and waits for the confirm.
    pub fn publish(&self, q: &str, body: &[u8], properties: BasicProperties) {
        self.publish_to("", q, body, properties)
    }

    pub fn publish_to(&self, exchange: &str, routing_key: &str, body: &[u8], properties: BasicProperties) {
        let properties = properties.with_delivery_mode(2);
        self.rt.block_on(async {
            let c = self
                .channel
                .basic_publish(ShortString::from(exchange), ShortString::from(routing_key), BasicPublishOptions::default(), body, properties)
                .await
                .unwrap()
                .await
                .unwrap();
            assert!(c.is_ack());
        });
    }

    /// Publishes many at once, then waits for all the confirms.
    pub fn publish_many(&self, q: &str, messages: impl Iterator<Item = (Vec<u8>, BasicProperties)>) {
        self.rt.block_on(async {
            for (body, properties) in messages {
                self.channel
                    .basic_publish(ShortString::default(), ShortString::from(q), BasicPublishOptions::default(), &body, properties.with_delivery_mode(2))
                    .await
                    .unwrap();
            }
            assert!(self.channel.wait_for_confirms().await.unwrap().is_empty());
        });
    }

    /// Takes one message, if there is one.
    pub fn get(&self, q: &str) -> Option<Got> {
        let m = self.rt.block_on(self.channel.basic_get(ShortString::from(q), BasicGetOptions { no_ack: true })).unwrap()?;
        Some(Got { body: m.delivery.data.clone(), properties: m.delivery.properties.clone(), redelivered: m.delivery.redelivered })
    }

    /// Waits up to `timeout` for a message in `q`.
    pub fn wait_get(&self, q: &str, timeout: Duration) -> Option<Got> {
        let end = Instant::now() + timeout;
        loop {
            if let Some(m) = self.get(q) {
                return Some(m);
            }
            if Instant::now() > end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Messages ready in `q` (not those delivered and unacknowledged).
    pub fn ready(&self, q: &str) -> u32 {
        let options = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
        let ch = self.rt.block_on(self.conn.create_channel()).unwrap();
        let n = self.rt.block_on(ch.queue_declare(ShortString::from(q), options, FieldTable::default())).map(|q| q.message_count()).unwrap_or(0);
        let _ = self.rt.block_on(ch.close(200, ShortString::from("ok")));
        n
    }

    /// Consumers of `q` now.
    pub fn consumers(&self, q: &str) -> u32 {
        let options = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
        let ch = self.rt.block_on(self.conn.create_channel()).unwrap();
        let n = self.rt.block_on(ch.queue_declare(ShortString::from(q), options, FieldTable::default())).map(|q| q.consumer_count()).unwrap_or(0);
        let _ = self.rt.block_on(ch.close(200, ShortString::from("ok")));
        n
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        for q in std::mem::take(&mut self.declared) {
            let _ = self.rt.block_on(self.channel.queue_delete(ShortString::from(q.as_str()), QueueDeleteOptions::default()));
        }
    }
}

/// A header table from (name, text) pairs.
pub fn headers(pairs: &[(&str, lapin::types::AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert(ShortString::from(*k), v.clone());
    }
    t
}

/// A RabbitMQ node of the test's own (its own port, data folder and cookie), killed when
/// dropped. `None` when the server is not installed.
pub struct OwnBroker {
    pub port: u16,
    dir: tempfile::TempDir,
    node: String,
    child: Option<Child>,
}

pub const RABBITMQ_SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";
/// Not /usr/sbin/rabbitmqctl: that wrapper runs as the rabbitmq user, with its cookie.
const RABBITMQCTL: &str = "/usr/lib/rabbitmq/bin/rabbitmqctl";

impl OwnBroker {
    pub fn start() -> Option<OwnBroker> {
        if !Path::new(RABBITMQ_SERVER).exists() {
            shout(&format!("SKIPPED: {RABBITMQ_SERVER} is not installed (apt-get install rabbitmq-server)"));
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("plugins"), "[].").unwrap();
        let port = free_port();
        let node = format!("pmnctest{}x{port}@localhost", std::process::id());
        let mut b = OwnBroker { port, dir, node, child: None };
        b.boot();
        Some(b)
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Starts the node on its data folder and waits until it speaks AMQP.
    pub fn boot(&mut self) {
        let dist = free_port();
        let log = std::fs::File::create(self.path("server.log")).unwrap();
        let child = Command::new(RABBITMQ_SERVER)
            .env("HOME", self.dir.path())
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", dist.to_string())
            .env("RABBITMQ_MNESIA_BASE", self.path("mnesia"))
            .env("RABBITMQ_LOG_BASE", self.path("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", self.path("plugins"))
            .env("RABBITMQ_CONFIG_FILE", self.path("rabbitmq"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", self.path("advanced.config"))
            .env("RABBITMQ_PID_FILE", self.path("pid"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("start rabbitmq-server");
        self.child = Some(child);
        let ok = until(Duration::from_secs(60), || speaks_amqp(self.port));
        assert!(ok, "the test's RabbitMQ did not start: {}", std::fs::read_to_string(self.path("server.log")).unwrap_or_default());
    }

    /// What the node says of its queues (ready, unacknowledged, consumers) and the end of its
    /// log: what a failed test prints to tell a broker's loss from a consumer's stall.
    pub fn report(&self) -> String {
        let out = self.ctl(&["list_queues", "name", "messages_ready", "messages_unacknowledged", "consumers"]);
        let queues = match out {
            Ok(o) => format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)),
            Err(e) => format!("rabbitmqctl: {e}"),
        };
        let log = std::fs::read_to_string(self.path("server.log")).unwrap_or_default();
        let mut logs = String::new();
        if let Ok(dir) = std::fs::read_dir(self.path("log")) {
            for f in dir.flatten() {
                let text = std::fs::read_to_string(f.path()).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect();
                logs.push_str(&format!("== {}\n{}\n", f.path().display(), tail.join("\n")));
            }
        }
        format!("queues:\n{queues}\nserver.log:\n{log}\n{logs}")
    }

    /// Runs rabbitmqctl against this node (its cookie is in the test's folder, which is the
    /// node's home).
    fn ctl(&self, args: &[&str]) -> std::io::Result<std::process::Output> {
        Command::new(RABBITMQCTL).env("HOME", self.dir.path()).arg("-n").arg(&self.node).args(args).output()
    }

    /// Makes the node write its metadata (queues, bindings) to disk now. RabbitMQ 3.10 keeps it
    /// in Mnesia, whose log it writes asynchronously: a queue declared a few seconds before a
    /// `kill -9` can be gone, with its messages, when the node comes back (seen in 2 of 11 runs
    /// of the restart test). A crash right after a declare is the broker's window, not the
    /// consumer's; the test closes it so that what it counts is the interface's doing.
    pub fn write_metadata(&self) {
        let out = self.ctl(&["eval", "mnesia:dump_log()."]).expect("run rabbitmqctl");
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success() && text.contains("dumped"), "rabbitmqctl eval mnesia:dump_log(): {text}");
    }

    /// How many classic queues the node said it recovered at its last boot.
    pub fn recovered_queues(&self) -> Option<usize> {
        let mut found = None;
        for f in std::fs::read_dir(self.path("log")).ok()?.flatten() {
            let text = std::fs::read_to_string(f.path()).unwrap_or_default();
            for line in text.lines() {
                if let Some(rest) = line.split("Recovering ").nth(1) {
                    if rest.contains("of type rabbit_classic_queue") {
                        found = rest.split(' ').next().and_then(|n| n.parse().ok());
                    }
                }
            }
        }
        found
    }

    /// Kills the node (its whole process group) at once, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe_killpg(c.id() as i32);
            let _ = c.wait();
        }
    }
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        self.kill();
    }
}

use std::os::unix::process::CommandExt;

fn unsafe_killpg(pgid: i32) {
    // SAFETY: killpg with a process group this test started.
    unsafe {
        libc::killpg(pgid, libc::SIGKILL);
    }
}

fn speaks_amqp(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(300)) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"AMQP\x00\x00\x09\x01").is_err() {
        return false;
    }
    let mut buf = [0u8; 8];
    matches!(s.read(&mut buf), Ok(n) if n > 0)
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}
