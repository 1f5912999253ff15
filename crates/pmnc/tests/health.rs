//! `/healthz`, `/readyz`, the drain delay at a stop and the service manager's watchdog, through
//! the real binary (docs/deploy.md, decision 144).

mod common;

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use common::*;

/// GETs `path` of the monitor and reads its JSON body.
fn probe(monitor: std::net::SocketAddr, path: &str) -> Result<(u16, serde_json::Value), String> {
    let r = get(monitor, path);
    let body = serde_json::from_slice(&r.body).map_err(|e| format!("GET {path}: {e}: {:?}", r.text()))?;
    Ok((r.status, body))
}

fn web(extra: &str) -> Tree {
    let t = Tree::new();
    t.write("web/cage.toml", &format!("{extra}\n{}", http_cage_toml("")));
    t.write("web/http.lua", "return { handle = function() return 'ok' end }\n");
    t
}

#[test]
fn probes_answer_and_readyz_turns_503_before_the_listener_closes() {
    let t = web("drain_delay = \"1500ms\"");
    let mut s = Server::start(&t.path().join("web"), &[]);
    let monitor = monitor_addr(&mut s);
    let http = s.addr("http");
    assert_eq!(probe(monitor, "/healthz").unwrap(), (200, serde_json::json!({"status": "ok"})));
    assert_eq!(probe(monitor, "/readyz").unwrap(), (200, serde_json::json!({"status": "ok"})));
    // The container's HEALTHCHECK: `pmnc health URL` exits 0 on 200, 1 otherwise.
    let ok = pmnc_limited(&["health", &format!("http://{monitor}/healthz")], Duration::from_secs(10));
    assert_eq!(ok.code, Some(0), "{} {}", ok.stdout, ok.stderr);
    assert!(ok.stdout.contains("200") && ok.stdout.contains("\"ok\""), "{}", ok.stdout);
    let missing = pmnc_limited(&["health", &format!("http://{monitor}/nothing-here")], Duration::from_secs(10));
    assert_eq!(missing.code, Some(1), "{} {}", missing.stdout, missing.stderr);

    s.signal(libc::SIGTERM);
    // /readyz says 503 at once, while the interface still takes connections and serves them.
    let deadline = Instant::now() + Duration::from_secs(1);
    let body = loop {
        let (status, body) = probe(monitor, "/readyz").unwrap();
        if status == 503 {
            break body;
        }
        assert_eq!(status, 200);
        assert!(Instant::now() < deadline, "/readyz still 200 a second after SIGTERM");
        std::thread::sleep(Duration::from_millis(10));
    };
    let served = get(http, "/");
    s.drain(Duration::from_millis(50));
    assert!(!s.log.iter().any(|l| l.contains("shutting down")), "the listeners closed before the drain delay:\n{}", s.log.join("\n"));
    assert_eq!((served.status, served.text()), (200, "ok".to_string()), "the port serves while /readyz says 503");
    assert_eq!(body["status"], "fail");
    assert!(body["reasons"].as_array().unwrap().iter().any(|r| r.as_str().unwrap().starts_with("draining")), "{body}");
    assert_eq!(probe(monitor, "/healthz").unwrap().0, 200, "draining is not dead");
    // Then the listeners close, and the process ends cleanly.
    s.wait_for("shutting down", Duration::from_secs(10)).expect("the stop goes on after the drain delay");
    let draining = s.log.iter().position(|l| l.contains("draining: /readyz answers 503")).expect("the drain delay is said");
    let stopping = s.log.iter().position(|l| l.contains("shutting down")).unwrap();
    assert!(draining < stopping);
    assert_eq!(s.wait_exit(Duration::from_secs(20)).and_then(|e| e.code()), Some(0), "{}", s.log.join("\n"));
}

#[test]
fn without_a_watcher_of_readyz_the_stop_does_not_wait() {
    let t = web("drain_delay = \"20s\"");
    let mut s = Server::start(&t.path().join("web"), &[]);
    let monitor = monitor_addr(&mut s);
    assert_eq!(probe(monitor, "/healthz").unwrap().0, 200, "/healthz does not count as watching readiness");
    s.signal(libc::SIGTERM);
    assert_eq!(s.wait_exit(Duration::from_secs(10)).and_then(|e| e.code()), Some(0), "{}", s.log.join("\n"));
    assert!(!s.log.iter().any(|l| l.contains("draining: /readyz")), "{}", s.log.join("\n"));
}

#[test]
fn a_drain_delay_that_is_no_duration_is_refused() {
    let t = web("drain_delay = \"soon\"");
    let out = pmnc_limited(&["check", t.path().join("web").to_str().unwrap()], Duration::from_secs(30));
    assert_eq!(out.code, Some(1));
    assert!(out.stderr.contains("cage.toml:1") && out.stderr.contains("drain_delay"), "{}", out.stderr);
}

/// Notifications until one satisfies `want`, within `within`.
fn until(socket: &UnixDatagram, within: Duration, want: impl Fn(&str) -> bool) -> Option<String> {
    let deadline = Instant::now() + within;
    let mut buf = vec![0u8; 4096];
    loop {
        let left = deadline.checked_duration_since(Instant::now())?;
        socket.set_read_timeout(Some(left.max(Duration::from_millis(1)))).ok()?;
        let n = socket.recv(&mut buf).ok()?;
        let m = String::from_utf8_lossy(&buf[..n]).into_owned();
        if want(&m) {
            return Some(m);
        }
    }
}

fn pings(m: &str) -> bool {
    m.lines().any(|l| l == "WATCHDOG=1")
}

#[test]
fn a_stalled_worker_fails_healthz_and_stops_the_watchdog_pings() {
    let t = web("");
    let notify = t.path().join("notify.sock");
    let socket = UnixDatagram::bind(&notify).unwrap();
    let stall = t.path().join("stall");
    let env = [
        ("NOTIFY_SOCKET", notify.to_str().unwrap()),
        // Pings every 150 ms.
        ("WATCHDOG_USEC", "300000"),
        ("PMNC_TEST_STALL_FILE", stall.to_str().unwrap()),
    ];
    let mut s = Server::try_start_env(&t.path().join("web"), 2, &[], &env).unwrap();
    assert!(
        s.log.iter().any(|l| l.contains("test hook: worker 0 blocks while")),
        "the stall hook is compiled into debug builds only; run this test against one:\n{}",
        s.log.join("\n")
    );
    let monitor = monitor_addr(&mut s);
    until(&socket, Duration::from_secs(30), |m| m.contains("READY=1")).expect("READY=1");
    until(&socket, Duration::from_secs(5), pings).expect("a first WATCHDOG=1");
    until(&socket, Duration::from_secs(5), pings).expect("a second WATCHDOG=1");
    assert_eq!(probe(monitor, "/healthz").unwrap().0, 200);

    std::fs::write(&stall, "").unwrap();
    // The watchdog task says the probe fails once, then sends no pings.
    let said = until(&socket, Duration::from_secs(10), |m| m.contains("STATUS=not alive"))
        .unwrap_or_else(|| panic!("no STATUS=not alive after the stall:\n{}", s.log.join("\n")));
    assert!(said.contains("worker 0 did not answer within 1s"), "{said}");
    assert!(!pings(&said));
    assert_eq!(until(&socket, Duration::from_millis(1200), pings), None, "a WATCHDOG=1 while worker 0 is stuck");
    let (status, body) = probe(monitor, "/healthz").unwrap();
    assert_eq!(status, 503, "{body}");
    let reasons: Vec<&str> = body["reasons"].as_array().unwrap().iter().map(|r| r.as_str().unwrap()).collect();
    assert!(reasons.len() == 1 && reasons[0].starts_with("worker 0 did not answer within 1s"), "only worker 0 is stuck: {reasons:?}");
    assert_eq!(probe(monitor, "/readyz").unwrap().0, 503, "a dead process is not ready");

    std::fs::remove_file(&stall).unwrap();
    until(&socket, Duration::from_secs(5), pings).expect("the pings resume once the worker answers");
    assert_eq!(probe(monitor, "/healthz").unwrap().0, 200);
    s.signal(libc::SIGTERM);
    assert_eq!(s.wait_exit(Duration::from_secs(20)).and_then(|e| e.code()), Some(0), "{}", s.log.join("\n"));
}

#[test]
fn readyz_follows_the_cluster_connection() {
    let Some(mut nats) = common::nats::Nats::start("readyz_follows_the_cluster_connection", "") else { return };
    let t = web(&format!("[cluster]\nurl = \"{}\"\nheartbeat = \"200ms\"\n", nats.url()));
    let mut s = Server::start(&t.path().join("web"), &[]);
    let monitor = monitor_addr(&mut s);
    // Ready once connected to NATS.
    let deadline = Instant::now() + Duration::from_secs(10);
    while probe(monitor, "/readyz").unwrap().0 != 200 {
        assert!(Instant::now() < deadline, "/readyz not 200 in a cluster: {}", probe(monitor, "/readyz").unwrap().1);
        std::thread::sleep(Duration::from_millis(50));
    }
    nats.kill();
    let deadline = Instant::now() + Duration::from_secs(10);
    let body = loop {
        let (status, body) = probe(monitor, "/readyz").unwrap();
        if status == 503 {
            break body;
        }
        assert!(Instant::now() < deadline, "/readyz still 200 with NATS gone");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(body["reasons"][0].as_str().unwrap().starts_with("cluster: not connected to NATS"), "{body}");
    assert_eq!(probe(monitor, "/healthz").unwrap().0, 200, "NATS gone is not a dead process");
    nats.up();
    let deadline = Instant::now() + Duration::from_secs(20);
    while probe(monitor, "/readyz").unwrap().0 != 200 {
        assert!(Instant::now() < deadline, "/readyz not 200 again after NATS came back: {}", probe(monitor, "/readyz").unwrap().1);
        std::thread::sleep(Duration::from_millis(100));
    }
}
