//! What the MQTT tests share: the broker's url (PMNC_TEST_MQTT_URL) or a loud skip, unique
//! names per run, a test client beside the cage, a private mosquitto that a test can stop and
//! start again, and the distinct ids a handler recorded in the cage's state file.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(dead_code)]

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rumqttc::v5::mqttbytes::v5::{Publish, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{Client, Event, Incoming, MqttOptions};

/// The shared broker: (host, port, url), or None after a loud SKIPPED line.
pub fn broker(test: &str) -> Option<(String, u16, String)> {
    let url = std::env::var("PMNC_TEST_MQTT_URL").unwrap_or_else(|_| "mqtt://127.0.0.1:1883".to_string());
    let hostport = url.trim_start_matches("mqtt://").trim_end_matches('/').to_string();
    let (host, port) = hostport.rsplit_once(':').map(|(h, p)| (h.to_string(), p.parse().unwrap_or(1883))).unwrap_or((hostport.clone(), 1883));
    if TcpStream::connect_timeout(&format!("{host}:{port}").parse().unwrap(), Duration::from_secs(2)).is_err() {
        eprintln!("\n*** SKIPPED {test}: no MQTT broker at {url} (start one: `mosquitto -d`, apt-get install mosquitto; or set PMNC_TEST_MQTT_URL) ***\n");
        return None;
    }
    Some((host, port, url))
}

/// A name no other run uses (topics, client ids).
pub fn unique(prefix: &str) -> String {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
    format!("{prefix}-{}-{:x}", std::process::id(), nanos & 0xffff_ffff_ffff)
}

/// A client beside the cage: publishes (QoS 1 waits for the PUBACK) and gathers what its
/// subscriptions receive.
pub struct TestClient {
    pub client: Client,
    received: mpsc::Receiver<Publish>,
    acked: mpsc::Receiver<u16>,
}

impl TestClient {
    /// Connects with a clean session and subscribes `filters` (QoS 1), waiting for the SUBACK.
    pub fn connect(host: &str, port: u16, filters: &[&str]) -> TestClient {
        let mut o = MqttOptions::new(unique("pmnc-test"), host, port);
        o.set_keep_alive(Duration::from_secs(30));
        o.set_max_packet_size(Some(64 << 20));
        let (client, mut connection) = Client::new(o, 10_000);
        let (tx, received) = mpsc::channel();
        let (ack_tx, acked) = mpsc::channel();
        let (sub_tx, subbed) = mpsc::channel();
        std::thread::spawn(move || {
            for ev in connection.iter() {
                match ev {
                    Ok(Event::Incoming(Incoming::Publish(p))) => {
                        if tx.send(p).is_err() {
                            return;
                        }
                    }
                    Ok(Event::Incoming(Incoming::PubAck(a))) => {
                        let _ = ack_tx.send(a.pkid);
                    }
                    Ok(Event::Incoming(Incoming::SubAck(_))) => {
                        let _ = sub_tx.send(());
                    }
                    Ok(_) => {}
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                }
            }
        });
        for f in filters {
            client.subscribe(*f, QoS::AtLeastOnce).unwrap();
            subbed.recv_timeout(Duration::from_secs(10)).expect("SUBACK");
        }
        TestClient { client, received, acked }
    }

    /// Publishes `body` to `topic` at QoS 1 and waits for the broker's PUBACK.
    pub fn publish(&self, topic: &str, body: &[u8]) {
        self.publish_with(topic, body, None);
    }

    pub fn publish_with(&self, topic: &str, body: &[u8], properties: Option<PublishProperties>) {
        match properties {
            Some(p) => self.client.publish_with_properties(topic, QoS::AtLeastOnce, false, body.to_vec(), p).unwrap(),
            None => self.client.publish(topic, QoS::AtLeastOnce, false, body.to_vec()).unwrap(),
        }
        self.acked.recv_timeout(Duration::from_secs(10)).expect("PUBACK");
    }

    /// Publishes many QoS 1 messages, then waits for all their PUBACKs.
    pub fn publish_many(&self, topic: &str, bodies: impl Iterator<Item = String>) {
        let mut n = 0;
        for b in bodies {
            self.client.publish(topic, QoS::AtLeastOnce, false, b.into_bytes()).unwrap();
            n += 1;
        }
        for _ in 0..n {
            self.acked.recv_timeout(Duration::from_secs(30)).expect("PUBACK");
        }
    }

    /// The next message received within `timeout`.
    pub fn recv(&self, timeout: Duration) -> Option<Publish> {
        self.received.recv_timeout(timeout).ok()
    }
}

/// The distinct `seen:<id>` keys the handler stored in the cage's state file.
pub fn seen(cage: &Path) -> usize {
    let db = cage.join(".data/state.sqlite");
    if !db.exists() {
        return 0;
    }
    let Ok(conn) = rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY) else { return 0 };
    let _ = conn.busy_timeout(Duration::from_secs(5));
    conn.query_row("SELECT count(*) FROM state WHERE key LIKE 'seen:%'", [], |r| r.get::<_, i64>(0)).unwrap_or(0) as usize
}

/// How many keys starting with `prefix` the cage's state holds.
pub fn count_keys(cage: &Path, prefix: &str) -> usize {
    let db = cage.join(".data/state.sqlite");
    let Ok(conn) = rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY) else { return 0 };
    let _ = conn.busy_timeout(Duration::from_secs(5));
    conn.query_row("SELECT count(*) FROM state WHERE substr(key, 1, ?1) = ?2", rusqlite::params![prefix.len() as i64, prefix], |r| r.get::<_, i64>(0))
        .unwrap_or(0) as usize
}

/// Polls `seen` until it reaches `n` or `timeout` passes; the last count.
pub fn wait_seen(cage: &Path, n: usize, timeout: Duration) -> usize {
    let deadline = Instant::now() + timeout;
    loop {
        let s = seen(cage);
        if s >= n || Instant::now() > deadline {
            return s;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until interface `iface` logged that it connected (a new or a kept session).
pub fn wait_connected(s: &mut super::common::Server, iface: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let end = format!("interface={iface}");
    loop {
        if s.log.iter().any(|l| l.contains("connected to mqtt") && l.trim_end().ends_with(&end)) {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        s.drain(Duration::from_millis(50));
    }
}

/// A private mosquitto on a free port with its own persistence folder, so that sessions and
/// queued messages survive its restart.
pub struct Mosquitto {
    child: Option<Child>,
    pub port: u16,
    conf: PathBuf,
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    /// None (with a loud line) when /usr/sbin/mosquitto is missing.
    pub fn start(test: &str) -> Option<Mosquitto> {
        Self::start_with(test, "")
    }

    /// Like `start`, with more lines for mosquitto.conf (another listener: `listener PORT` and
    /// its settings).
    pub fn start_with(test: &str, more: &str) -> Option<Mosquitto> {
        let bin = Path::new("/usr/sbin/mosquitto");
        if !bin.exists() {
            eprintln!("\n*** SKIPPED {test}: /usr/sbin/mosquitto not found (apt-get install mosquitto) ***\n");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        // Started as root, mosquitto drops to its own user, which must be able to write its
        // persistence file here (else sessions silently do not survive its restart).
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
        let port = super::common::spare_port();
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "per_listener_settings false\nallow_anonymous true\npersistence true\npersistence_location {}/\nmax_queued_messages 100000\nlistener {port} 127.0.0.1\n{more}\n",
                dir.path().display()
            ),
        )
        .unwrap();
        let mut m = Mosquitto { child: None, port, conf, _dir: dir };
        m.up();
        Some(m)
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// Starts it (again) and waits until it takes connections.
    pub fn up(&mut self) {
        let child = Command::new("/usr/sbin/mosquitto").arg("-c").arg(&self.conf).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("start mosquitto");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "mosquitto did not start on port {}", self.port);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops it with SIGTERM (it writes its persistence file on the way out) and waits.
    pub fn down(&mut self) {
        if let Some(mut c) = self.child.take() {
            super::common::unsafe_kill(c.id() as i32, 15);
            let deadline = Instant::now() + Duration::from_secs(10);
            while c.try_wait().unwrap().is_none() {
                if Instant::now() > deadline {
                    let _ = c.kill();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.wait();
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
