//! Resource calls as the monitor counts them, through the real binary and its /metrics: every
//! call a module made is a call, every failure is an error under its cause (a dead database, an
//! open breaker, a passed deadline, a transaction too big for the pool), and the circuit breaker
//! of a resource is one for all the workers of the process. The "dead database" is a closed
//! loopback port and the "silent" one a listener that never answers, so no server is needed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeSet;
use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use common::*;

const HANDLER: &str = r#"
local M = {}
-- One table per worker VM: its address tells the workers apart.
local me = {}
local worker = tostring(me)

function M.handle(request, response)
  if request.path == "/loop" then
    local failed = 0
    for _ = 1, tonumber(request.query.n) do
      if not pcall(pmnc.transaction[request.query.r].execute, "select 1") then failed = failed + 1 end
    end
    return tostring(failed)
  end
  if request.path == "/one" then
    local ok, e = pcall(pmnc.transaction[request.query.r].execute, "select 1")
    return worker .. "|" .. (ok and "ok" or tostring(e.message or e))
  end
  if request.path == "/two" then
    local xa = pmnc.transaction.create()
    xa[request.query.r].execute("select 1")
    xa[request.query.r].execute("select 2")
    local ok, e = pcall(xa.execute)
    return ok and "ok" or tostring(e.message or e)
  end
  return "?"
end
return M
"#;

/// A loopback port with nothing listening on it: every connect is refused at once.
fn closed_port() -> u16 {
    spare_port()
}

fn db(name: &str, port: u16, pool: &str) -> String {
    format!("\n[resources.{name}]\nprotocol = \"postgresql\"\nurl = \"postgresql://pmnc@127.0.0.1:{port}/test\"\nconnect_timeout = \"5s\"\n{pool}")
}

/// The resource's figures read from /metrics: (calls, errors by cause, connect failures,
/// duration count).
struct Figures {
    text: String,
    resource: String,
}

impl Figures {
    fn read(monitor: SocketAddr, resource: &str) -> Figures {
        Figures { text: get(monitor, "/metrics").text(), resource: resource.to_string() }
    }

    /// Reads until `done` holds (bounded by 10 s).
    fn until(monitor: SocketAddr, resource: &str, done: impl Fn(&Figures) -> bool) -> Figures {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let f = Figures::read(monitor, resource);
            if done(&f) {
                return f;
            }
            assert!(Instant::now() < deadline, "never came:\n{}", f.text);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn get(&self, name: &str, extra: &str) -> f64 {
        let key = format!("{name}{{cage=\"c\",resource=\"{}\"{extra}}}", self.resource);
        sample(&self.text, &key).unwrap_or_else(|| panic!("no {key} in:\n{}", self.text))
    }

    fn calls(&self) -> f64 {
        self.get("pmnc_resource_calls_total", "")
    }

    fn errors(&self, cause: &str) -> f64 {
        self.get("pmnc_resource_errors_total", &format!(",cause=\"{cause}\""))
    }

    /// Every cause but the ones named is zero.
    fn assert_only(&self, causes: &[&str]) {
        for cause in ["connect", "breaker_open", "pool_timeout", "pool_size", "query", "deadline"] {
            if !causes.contains(&cause) {
                assert_eq!(self.errors(cause), 0.0, "cause {cause} in:\n{}", self.text);
            }
        }
    }
}

#[test]
fn every_call_to_a_dead_database_is_counted_as_a_call_and_a_connect_error() {
    let dead = closed_port();
    let toml = format!(
        "{}{}{}",
        http_cage_toml(""),
        db("dead", dead, "breaker_failures = 1000\n"),
        db("tripping", dead, "breaker_failures = 5\nbreaker_cooldown = \"60s\"\n")
    );
    let t = Tree::new();
    t.write("c/cage.toml", &toml);
    t.write("c/http.lua", HANDLER);
    let mut s = Server::start_with_workers(&t.path().join("c"), 2, &[]);
    let http = s.addr("http");
    let monitor = monitor_addr(&mut s);

    assert_eq!(get(http, "/loop?r=dead&n=20").text(), "20");
    let f = Figures::read(monitor, "dead");
    assert_eq!(f.calls(), 20.0, "{}", f.text);
    assert_eq!(f.errors("connect"), 20.0, "{}", f.text);
    f.assert_only(&["connect"]);
    assert_eq!(f.get("pmnc_resource_connect_failures_total", ""), 20.0, "{}", f.text);
    // Failed calls are timed too (from the checkout on).
    assert_eq!(f.get("pmnc_resource_call_duration_seconds_count", ""), 20.0, "{}", f.text);

    // The breaker opens after 5 connect failures; the other 15 calls are refused without a connect.
    assert_eq!(get(http, "/loop?r=tripping&n=20").text(), "20");
    let f = Figures::read(monitor, "tripping");
    assert_eq!(f.calls(), 20.0, "{}", f.text);
    assert_eq!(f.errors("connect"), 5.0, "{}", f.text);
    assert_eq!(f.errors("breaker_open"), 15.0, "{}", f.text);
    f.assert_only(&["connect", "breaker_open"]);
    assert_eq!(f.get("pmnc_resource_connect_failures_total", ""), 5.0, "{}", f.text);
    // /status says the same.
    let st: serde_json::Value = serde_json::from_slice(&get(monitor, "/status").body).expect("status JSON");
    let resources = st["cages"][0]["resources"].as_array().cloned().unwrap_or_default();
    let tripping = resources.iter().find(|r| r["name"] == "tripping").unwrap_or_else(|| panic!("{st}"));
    assert_eq!(tripping["calls"], 20, "{tripping}");
    assert_eq!(tripping["errors"], 20, "{tripping}");
    assert_eq!(tripping["errors_by_cause"]["connect"], 5, "{tripping}");
    assert_eq!(tripping["errors_by_cause"]["breaker_open"], 15, "{tripping}");
    assert!(f.text.contains("# HELP pmnc_resource_call_duration_seconds Time of one call to a resource, from asking the pool for a connection"), "{}", f.text);
}

#[test]
fn a_database_that_never_answers_counts_under_deadline_and_a_too_big_transaction_under_pool_size() {
    // Accepts (the kernel completes the handshake) and never says a word.
    let silent = TcpListener::bind("127.0.0.1:0").expect("bind");
    let silent_port = silent.local_addr().expect("addr").port();
    let toml = format!("{}{}{}", http_cage_toml("request_timeout = \"300ms\"\n"), db("silent", silent_port, ""), db("small", closed_port(), "pool_size = 1\n"));
    let t = Tree::new();
    t.write("c/cage.toml", &toml);
    t.write("c/http.lua", HANDLER);
    let mut s = Server::start_with_workers(&t.path().join("c"), 1, &[]);
    let http = s.addr("http");
    let monitor = monitor_addr(&mut s);

    let started = Instant::now();
    let r = get(http, "/one?r=silent");
    assert!(started.elapsed() < Duration::from_secs(3), "the 300 ms deadline, not connect_timeout (5 s), ended it");
    assert!(r.status == 504 || r.text().contains("no answer"), "{} {}", r.status, r.text());
    // The call is counted when its future ends, which for a request stopped at its deadline
    // may come just after the 504 went out.
    let f = Figures::until(monitor, "silent", |f| f.calls() == 1.0);
    assert_eq!(f.errors("deadline"), 1.0, "{}", f.text);
    f.assert_only(&["deadline"]);

    // Two participants on a pool of one per worker: refused at once, both counted.
    let r = get(http, "/two?r=small");
    assert!(r.text().contains("more participants on small"), "{}", r.text());
    let f = Figures::read(monitor, "small");
    assert_eq!(f.calls(), 2.0, "{}", f.text);
    assert_eq!(f.errors("pool_size"), 2.0, "{}", f.text);
    f.assert_only(&["pool_size"]);
    drop(silent);
}

#[test]
fn the_breaker_of_a_resource_is_shared_by_every_worker() {
    let toml = format!("{}{}", http_cage_toml(""), db("db", closed_port(), "breaker_failures = 3\nbreaker_cooldown = \"60s\"\n"));
    let t = Tree::new();
    t.write("c/cage.toml", &toml);
    t.write("c/http.lua", HANDLER);
    let mut s = Server::start_with_workers(&t.path().join("c"), 4, &[]);
    let http = s.addr("http");
    let monitor = monitor_addr(&mut s);

    // One call per connection until every one of the 4 workers has refused a call, 12 calls at
    // least: with a breaker per worker, each worker would try 3 connects of its own.
    let mut workers = BTreeSet::new();
    let mut refused_on = BTreeSet::new();
    let mut calls = 0;
    while calls < 12 || refused_on.len() < 4 {
        assert!(calls < 400, "after 400 connections, refusals seen on {} of 4 workers only", refused_on.len());
        let text = get(http, "/one?r=db").text();
        let (worker, message) = text.split_once('|').unwrap_or_else(|| panic!("{text}"));
        calls += 1;
        workers.insert(worker.to_string());
        if calls <= 3 {
            assert!(message.contains("cannot connect"), "call {calls}: {message}");
        } else {
            assert!(message.contains("unavailable after 3 failed connects"), "call {calls} on worker {worker}: {message}");
            refused_on.insert(worker.to_string());
        }
    }
    assert_eq!(workers.len(), 4, "{workers:?}");
    let f = Figures::read(monitor, "db");
    assert_eq!(f.calls(), calls as f64, "{}", f.text);
    assert_eq!(f.errors("connect"), 3.0, "{}", f.text);
    assert_eq!(f.errors("breaker_open"), (calls - 3) as f64, "{}", f.text);
    assert_eq!(f.get("pmnc_resource_connect_failures_total", ""), 3.0, "{}", f.text);
}
