//! A private `nats-server` per test, on free ports, that a test can stop and start again.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The nats-server binary: $NATS_SERVER, else on PATH, else Debian's /usr/sbin.
pub fn binary() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("NATS_SERVER") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var("PATH").unwrap_or_default();
    std::env::split_paths(&path).chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/bin")]).map(|d| d.join("nats-server")).find(|p| p.is_file())
}

pub struct Nats {
    child: Option<Child>,
    pub port: u16,
    /// The HTTP monitoring port (/connz, /varz).
    pub monitor: u16,
    args: Vec<String>,
    /// The config file and the ports file the server writes at start.
    dir: tempfile::TempDir,
}

impl Nats {
    /// Starts nats-server with `config` (nats-server.conf text, may be empty). None, with a loud
    /// message, when the binary is not installed.
    pub fn start(test: &str, config: &str) -> Option<Nats> {
        let Some(bin) = binary() else {
            eprintln!("\n*** SKIPPED {test}: nats-server not found (set NATS_SERVER or install it: apt-get install nats-server) ***\n");
            return None;
        };
        let dir = tempfile::tempdir().expect("temp dir");
        let conf = dir.path().join("nats.conf");
        std::fs::write(&conf, config).expect("write nats.conf");
        // Ports the server picks itself and reports in its ports file: a port found free here
        // and bound later could be taken meanwhile by another test's server, whose listener
        // would then pass for this one's.
        let args = vec![
            bin.display().to_string(),
            "-a".into(),
            "127.0.0.1".into(),
            "-p".into(),
            "-1".into(),
            "-m".into(),
            "-1".into(),
            "-c".into(),
            conf.display().to_string(),
            "--ports_file_dir".into(),
            dir.path().display().to_string(),
        ];
        let mut n = Nats { child: None, port: 0, monitor: 0, args, dir };
        n.up();
        // Started again, it listens where its clients look for it.
        n.args[4] = n.port.to_string();
        n.args[6] = n.monitor.to_string();
        Some(n)
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts the server (again) on the same ports and waits until it accepts connections.
    pub fn up(&mut self) {
        let mut child = Command::new(&self.args[0]).args(&self.args[1..]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("start nats-server");
        // The server writes its ports file once it listens on both ports (and removes it when
        // it stops): that file, of this process, says the listener is this server's.
        // Named after the binary's file name and the process id.
        let suffix = format!("_{}.ports", child.id());
        let file = || std::fs::read_dir(self.dir.path()).ok()?.flatten().map(|e| e.path()).find(|p| p.to_string_lossy().ends_with(&suffix));
        let deadline = Instant::now() + Duration::from_secs(10);
        let ports = loop {
            if let Some(p) = file().and_then(|f| std::fs::read_to_string(f).ok()).and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok()) {
                break p;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("nats-server {:?} exited at start: {status}", self.args);
            }
            assert!(Instant::now() < deadline, "nats-server did not write its ports file (*{suffix}) within 10 s");
            std::thread::sleep(Duration::from_millis(10));
        };
        let port_of = |kind: &str| -> u16 {
            let url = ports[kind][0].as_str().unwrap_or_else(|| panic!("no {kind} port in {ports}"));
            url.rsplit(':').next().and_then(|p| p.parse().ok()).unwrap_or_else(|| panic!("bad {kind} address {url}"))
        };
        (self.port, self.monitor) = (port_of("nats"), port_of("monitoring"));
        self.child = Some(child);
        assert!(TcpStream::connect(("127.0.0.1", self.port)).is_ok(), "nats-server reported port {} but does not take connections", self.port);
    }

    /// Kills the server at once (as a crash would).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A page of the server's monitoring port (/varz, /connz, /routez) as JSON.
    pub fn monitoring(&self, page: &str) -> serde_json::Value {
        let mut s = TcpStream::connect(("127.0.0.1", self.monitor)).expect("connect to the nats monitoring port");
        s.set_read_timeout(Some(Duration::from_secs(5))).ok();
        use std::io::{Read, Write};
        s.write_all(format!("GET {page} HTTP/1.0\r\nhost: x\r\n\r\n").as_bytes()).expect("ask the monitoring port");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        let body = out.split("\r\n\r\n").nth(1).unwrap_or("");
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{page} is not JSON ({e}): {out}"))
    }

    /// The number of client connections the server has now.
    pub fn connections(&self) -> usize {
        let v = self.monitoring("/varz");
        v["connections"].as_u64().unwrap_or_else(|| panic!("no connections in /varz: {v}")) as usize
    }

    /// Waits until the server counts exactly `n` connections.
    pub fn wait_connections(&self, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let now = self.connections();
            if now == n {
                return;
            }
            assert!(Instant::now() < deadline, "nats-server still has {now} connections, waiting for {n}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `size` nats-servers with JetStream routed to each other on loopback ports: a JetStream
/// cluster, each server with its own `server_name` and store folder (under the returned
/// folder, which must live as long as the servers). Returns once every server sees the others
/// and agrees on a JetStream meta leader. None, said loudly, without the binary.
pub fn cluster(test: &str, size: usize) -> Option<(Vec<Nats>, tempfile::TempDir)> {
    let stores = tempfile::tempdir().expect("temp dir");
    let routes: Vec<u16> = (0..size).map(|_| super::spare_port()).collect();
    let mut servers = Vec::new();
    for (i, port) in routes.iter().enumerate() {
        let others: Vec<String> = routes.iter().filter(|p| *p != port).map(|p| format!("nats-route://127.0.0.1:{p}")).collect();
        let config = format!(
            "server_name: n{}\njetstream {{\n  store_dir: \"{}\"\n}}\ncluster {{\n  name: pmnc_test\n  listen: 127.0.0.1:{port}\n  routes: [{}]\n}}\n",
            i + 1,
            stores.path().join(format!("n{}", i + 1)).display(),
            others.join(", ")
        );
        servers.push(Nats::start(test, &config)?);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let formed = |s: &Nats| {
        let js = s.monitoring("/jsz");
        s.monitoring("/routez")["num_routes"].as_u64().unwrap_or(0) >= size as u64 - 1 && js["meta_cluster"]["leader"].as_str().is_some_and(|l| !l.is_empty())
    };
    while !servers.iter().all(formed) {
        assert!(Instant::now() < deadline, "the {size} NATS servers did not form a JetStream cluster within 20 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    Some((servers, stores))
}
