//! Cages in different processes calling each other over a private nats-server: calls, request
//! ids, deadlines, errors, copies sharing calls, kill -9 of a copy, a NATS restart, payload
//! limits, authentication, flocks and `pmnc cluster status`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::nats::Nats;
use common::*;

const WEB: &str = r#"
local M = {}

-- Runs a call and reports its outcome as data, so the test sees the error text.
local function try(f, ...)
  local ok, r = pcall(f, ...)
  if ok then return { ok = true, result = r } end
  return { ok = false, err = tostring(r) }
end

function M.handle(request, response)
  local p, q = request.path, request.query
  if p == "/square" then return try(pmnc("worker").work.square, tonumber(q.n))
  elseif p == "/boom" then return try(pmnc("worker").work.boom)
  elseif p == "/slow" then return pmnc("worker").work.slow(tonumber(q.s))
  elseif p == "/big" then return try(pmnc("worker").work.size, string.rep("x", tonumber(q.kb) * 1024))
  elseif p == "/bigresult" then return try(pmnc("worker").work.blob, tonumber(q.kb))
  elseif p == "/ghost" then return try(pmnc("ghost").m.f)
  elseif p == "/remain" then return try(pmnc("worker").work.remain)
  end
  response.status = 404
  return "no route"
end

return M
"#;

fn work(who: &str) -> String {
    format!(
        r#"local M = {{}}

function M.square(n)
  pmnc.log.info("square of", n)
  return {{ who = "{who}", n = n * n, id = pmnc.request.id }}
end

function M.boom()
  error("the worker failed on purpose")
end

function M.slow(s)
  pmnc.sleep(s)
  return "slept"
end

function M.size(s) return #s end
function M.blob(kb) return string.rep("y", kb * 1024) end
function M.remain() return pmnc.request.remain() end

return M
"#
    )
}

fn cluster_table(url: &str) -> String {
    format!("[cluster]\nurl = \"{url}\"\nheartbeat = \"200ms\"\n")
}

/// A web cage and worker copies (named "worker", told apart by the letter they answer with),
/// each in its own folder, all joining `url`.
fn lay_out(tree: &Tree, url: &str, copies: &[&str]) {
    tree.write("web/cage.toml", &format!("request_timeout = \"2s\"\n{}\n{}", http_cage_toml(""), cluster_table(url)));
    tree.write("web/http.lua", WEB);
    for who in copies {
        tree.write(&format!("worker_{who}/cage.toml"), &format!("name = \"worker\"\n{}", cluster_table(url)));
        tree.write(&format!("worker_{who}/work.lua"), &work(who));
    }
}

fn start(tree: &Tree, folder: &str) -> Server {
    Server::start(&tree.path().join(folder), &[])
}

/// A private NATS (with `conf`), worker copies named by `copies` and the web cage, each in its
/// own process; None when nats-server is not installed.
struct Flock {
    nats: Nats,
    _tree: Tree,
    copies: Vec<Server>,
    web: Server,
}

impl Flock {
    fn start(test: &str, conf: &str, copies: &[&str]) -> Option<Flock> {
        let nats = Nats::start(test, conf)?;
        let tree = Tree::new();
        lay_out(&tree, &nats.url(), copies);
        let copies = copies.iter().map(|c| start(&tree, &format!("worker_{c}"))).collect();
        let web = start(&tree, "web");
        Some(Flock { nats, _tree: tree, copies, web })
    }

    fn addr(&self) -> std::net::SocketAddr {
        self.web.addr("http")
    }
}

fn timed_get(addr: std::net::SocketAddr, path: &str) -> (Response, Duration) {
    let t = Instant::now();
    let r = get(addr, path);
    (r, t.elapsed())
}

fn status_table(url: &str) -> String {
    let out = pmnc_limited(&["cluster", "status", "--cluster", url, "--wait", "500ms"], Duration::from_secs(20));
    assert_eq!(out.code, Some(0), "pmnc cluster status failed: {}", out.stderr);
    out.stdout
}

#[test]
fn cages_in_two_processes_call_each_other() {
    let Some(mut f) = Flock::start("cages_in_two_processes_call_each_other", "", &["a"]) else { return };
    let addr = f.addr();

    let r = get(addr, "/square?n=7");
    assert_eq!(r.status, 200, "{}", r.text());
    let body = json_body(&r);
    assert_eq!(body["ok"], true, "{body}");
    assert_eq!(body["result"]["n"], 49);
    assert_eq!(body["result"]["who"], "a");
    assert_eq!(body["result"]["id"], request_id(&r).as_str(), "the request id travels with the call");

    // The callee's error names the target and the callee's file:line.
    let body = json_body(&get(addr, "/boom"));
    assert_eq!(body["ok"], false);
    let err = body["err"].as_str().unwrap();
    assert!(err.contains("calling worker.work.boom"), "{err}");
    let line = line_of(&work("a"), "failed on purpose");
    assert!(err.contains(&format!("work.lua:{line}:")) && err.contains("the worker failed on purpose"), "{err}");

    // The callee runs under the caller's deadline (request_timeout 2s), not a fresh one of its own.
    let body = json_body(&get(addr, "/remain"));
    let remain = body["result"].as_f64().unwrap_or_else(|| panic!("{body}"));
    assert!(remain > 0.5 && remain <= 2.0, "remain {remain}");

    // A cage nobody runs: answered at once, not at the deadline.
    let (r, took) = timed_get(addr, "/ghost");
    let body = json_body(&r);
    let err = body["err"].as_str().unwrap();
    assert!(err.contains("no cage named ghost") && err.contains("flock default"), "{err}");
    assert!(took < Duration::from_secs(1), "no responders took {took:?}");

    let table = status_table(&f.nats.url());
    let rows: Vec<&str> = table.lines().collect();
    assert!(rows[0].starts_with("CAGE"), "{table}");

    // The web process's monitor page shows the flock from the heartbeats, with the worker's page.
    let line = f.web.wait_for("monitor page at http://", Duration::from_secs(5)).expect("the monitor page address is logged");
    let page: std::net::SocketAddr = line.split("monitor page at http://").nth(1).unwrap().split('/').next().unwrap().parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = json_body(&get(page, "/status"));
        let cluster = status["cluster"].as_array().cloned().unwrap_or_default();
        let worker = cluster.iter().find(|i| i["cage"] == "worker");
        if let Some(w) = worker {
            assert_eq!(w["up"], true, "{w}");
            assert!(w["monitor_url"].as_str().unwrap_or("").starts_with("http://127.0.0.1:"), "{w}");
            assert!(cluster.iter().any(|i| i["cage"] == "web"), "{status}");
            break;
        }
        assert!(Instant::now() < deadline, "no worker in the cluster view: {status}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(rows.iter().any(|l| l.starts_with("web ") && l.contains(" up")), "{table}");
    assert!(rows.iter().any(|l| l.starts_with("worker ") && l.contains(" up")), "{table}");
}

#[test]
fn copies_share_calls_and_a_killed_copy_is_stood_in_for() {
    let Some(mut f) = Flock::start("copies_share_calls_and_a_killed_copy_is_stood_in_for", "", &["a", "b"]) else { return };
    let addr = f.addr();
    let a = &mut f.copies[0];

    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..200 {
        let body = json_body(&get(addr, "/square?n=3"));
        assert_eq!(body["ok"], true, "{body}");
        seen.insert(body["result"]["who"].as_str().unwrap().to_string());
        if seen.len() == 2 {
            break;
        }
    }
    assert_eq!(seen.len(), 2, "both copies should get calls, saw only {seen:?}");

    // kill -9 one copy; once NATS has dropped its connections (a presence connection and one
    // per worker thread), no call fails and the survivor answers every one.
    let before = f.nats.connections();
    a.child.kill().expect("kill -9 worker a");
    let _ = a.child.wait();
    f.nats.wait_connections(before - 3, Duration::from_secs(10));
    for i in 0..40 {
        let body = json_body(&get(addr, "/square?n=2"));
        assert_eq!(body["ok"], true, "call {i} after the kill failed: {body}");
        assert_eq!(body["result"]["who"], "b");
    }

    // The killed copy stops heartbeating and is listed as down.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let table = status_table(&f.nats.url());
        let worker_rows: Vec<&str> = table.lines().filter(|l| l.starts_with("worker ")).collect();
        if worker_rows.len() == 2 && worker_rows.iter().any(|l| l.contains("down (silent)")) && worker_rows.iter().any(|l| l.contains(" up")) {
            break;
        }
        assert!(Instant::now() < deadline, "the killed copy is not listed as down:\n{table}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_slow_callee_ends_at_the_callers_deadline() {
    let Some(mut f) = Flock::start("a_slow_callee_ends_at_the_callers_deadline", "", &["a"]) else { return };
    let addr = f.addr();
    let slow = std::thread::spawn(move || timed_get(addr, "/slow?s=10"));
    // While it runs, the heartbeats count it: the web process has a request in flight and the
    // worker process a call (IN FLIGHT is the last column of the status table).
    let deadline = Instant::now() + Duration::from_millis(1500);
    loop {
        let table = status_table(&f.nats.url());
        let busy = |cage: &str| table.lines().any(|l| l.starts_with(&format!("{cage} ")) && l.trim_end().ends_with(" 1"));
        if busy("web") && busy("worker") {
            break;
        }
        assert!(Instant::now() < deadline, "the slow request is not in the heartbeats' load:\n{table}");
    }
    let (r, took) = slow.join().unwrap();
    let worker = &mut f.copies[0];
    assert_eq!(r.status, 504, "{}", r.text());
    assert!(took >= Duration::from_millis(1900) && took < Duration::from_secs(4), "took {took:?}");
    // The callee stopped too, at the same deadline.
    let id = request_id(&r);
    assert!(worker.wait_for_all(&[&id, "deadline"], Duration::from_secs(5)).is_some(), "{}", worker.log.join("\n"));
}

#[test]
fn calls_fail_fast_while_nats_is_down_and_recover_after() {
    let Some(mut f) = Flock::start("calls_fail_fast_while_nats_is_down_and_recover_after", "", &["a"]) else { return };
    let addr = f.addr();
    assert_eq!(json_body(&get(addr, "/square?n=1"))["ok"], true);

    f.nats.kill();
    f.web.wait_for("lost the connection to NATS", Duration::from_secs(10)).expect("the web cage notices NATS is gone");
    for _ in 0..3 {
        let (r, took) = timed_get(addr, "/square?n=1");
        let body = json_body(&r);
        assert_eq!(body["ok"], false, "{body}");
        let err = body["err"].as_str().unwrap();
        assert!(err.contains("the cluster is unreachable"), "{err}");
        assert!(took < Duration::from_millis(500), "a call with NATS down took {took:?}");
    }

    f.nats.up();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let body = json_body(&get(addr, "/square?n=5"));
        if body["ok"] == true {
            assert_eq!(body["result"]["n"], 25);
            break;
        }
        assert!(Instant::now() < deadline, "no recovery after NATS came back: {body}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn payloads_over_max_payload_are_refused_clearly() {
    let Some(f) = Flock::start("payloads_over_max_payload_are_refused_clearly", "max_payload: 4096\n", &["a"]) else { return };
    let addr = f.addr();
    let body = json_body(&get(addr, "/big?kb=1"));
    assert_eq!(body["result"], 1024, "{body}");
    let body = json_body(&get(addr, "/big?kb=8"));
    let err = body["err"].as_str().unwrap_or_else(|| panic!("{body}"));
    assert!(err.contains("max_payload of 4096 bytes"), "{err}");
    let body = json_body(&get(addr, "/bigresult?kb=8"));
    let err = body["err"].as_str().unwrap_or_else(|| panic!("{body}"));
    assert!(err.contains("the result takes") && err.contains("max_payload of 4096 bytes"), "{err}");
}

#[test]
fn credentials_are_required_and_bad_ones_refused() {
    let Some(nats) = Nats::start("credentials_are_required_and_bad_ones_refused", "authorization {\n  user: pmnc\n  password: s3cret\n}\n") else {
        return;
    };
    let tree = Tree::new();
    let cluster = format!("[cluster]\nurl = \"{}\"\nuser = \"pmnc\"\npassword = \"${{TEST_NATS_PASSWORD}}\"\n", nats.url());
    tree.write("worker/cage.toml", &cluster);
    tree.write("worker/work.lua", &work("a"));
    let path = tree.path().join("worker");

    let refused = Server::try_start_env(&path, 1, &[], &[("TEST_NATS_PASSWORD", "wrong")]);
    let log = refused.err().expect("a wrong password must stop the start");
    assert!(log.contains("refused this process's credentials (user pmnc)"), "{log}");
    assert!(!log.contains("wrong"), "the password must not be logged: {log}");

    let _worker = Server::try_start_env(&path, 1, &[], &[("TEST_NATS_PASSWORD", "s3cret")]).expect("the right password");
    let out = pmnc_limited(&["cluster", "status", "--cluster", &nats.url()], Duration::from_secs(20));
    assert_eq!(out.code, Some(1));
    assert!(out.stderr.contains("refused"), "{}", out.stderr);
    let out = pmnc_env_limited(&["cluster", "status", path.to_str().unwrap(), "--wait", "500ms"], &[("TEST_NATS_PASSWORD", "s3cret")], Duration::from_secs(20));
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(out.stdout.lines().any(|l| l.starts_with("worker ")), "{}", out.stdout);
}

#[test]
fn flocks_on_one_nats_do_not_meet() {
    let Some(nats) = Nats::start("flocks_on_one_nats_do_not_meet", "") else { return };
    let tree = Tree::new();
    lay_out(&tree, &nats.url(), &["a"]);
    let _worker = start(&tree, "worker_a");
    let web = Server::start(&tree.path().join("web"), &["--flock", "other"]);
    let body = json_body(&get(web.addr("http"), "/square?n=2"));
    let err = body["err"].as_str().unwrap_or_else(|| panic!("{body}"));
    assert!(err.contains("no cage named worker") && err.contains("flock other"), "{err}");
}

#[test]
fn a_copy_stopped_with_sigterm_loses_no_call() {
    let Some(mut f) = Flock::start("a_copy_stopped_with_sigterm_loses_no_call", "", &["a", "b"]) else { return };
    let addr = f.addr();
    let a = &mut f.copies[0];
    // Calls run without pause from another thread while copy a stops.
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let done = std::sync::Arc::new(AtomicUsize::new(0));
    let caller = {
        let (stop, done) = (stop.clone(), done.clone());
        std::thread::spawn(move || {
            let (mut calls, mut failures, mut who) = (0, Vec::new(), std::collections::BTreeMap::new());
            while !stop.load(Ordering::Relaxed) {
                let body = json_body(&get(addr, "/square?n=4"));
                calls += 1;
                done.fetch_add(1, Ordering::Relaxed);
                if body["ok"] != true {
                    failures.push(body.to_string());
                } else {
                    *who.entry(body["result"]["who"].as_str().unwrap_or("?").to_string()).or_insert(0) += 1;
                }
            }
            (calls, failures, who)
        })
    };
    // Let both copies take calls, then stop a gracefully.
    let deadline = Instant::now() + Duration::from_secs(10);
    while a.wait_for("square of", Duration::from_millis(10)).is_none() {
        assert!(Instant::now() < deadline, "copy a got no call");
    }
    a.signal(15);
    let status = a.wait_exit(Duration::from_secs(10)).expect("copy a exits on SIGTERM");
    assert!(status.success(), "{status:?}");
    // Keep calling for 50 more calls after it left.
    let at_exit = done.load(Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(20);
    while done.load(Ordering::Relaxed) < at_exit + 50 {
        assert!(Instant::now() < deadline, "calls stalled after copy a left");
        std::thread::sleep(Duration::from_millis(10));
    }
    stop.store(true, Ordering::Relaxed);
    let (calls, failures, who) = caller.join().unwrap();
    assert!(failures.is_empty(), "{} of {calls} calls failed: {failures:?}", failures.len());
    assert!(who.get("b").copied().unwrap_or(0) > 0, "{who:?}");
}

/// A CA and a certificate for 127.0.0.1 signed by it, made with the openssl command; None (with
/// a loud message) when openssl is not installed.
fn make_certs(dir: &std::path::Path) -> Option<()> {
    let run = |args: &[&str]| {
        std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    if !run(&["version"]) {
        eprintln!("\n*** SKIPPED cluster TLS test: the openssl command is not installed (apt-get install openssl) ***\n");
        return None;
    }
    std::fs::write(dir.join("ext.cnf"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    for args in [
        &["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=pmnc test ca"][..],
        &["req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1"][..],
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ][..],
    ] {
        assert!(run(args), "openssl {args:?} failed");
    }
    Some(())
}

#[test]
fn tls_to_nats_with_a_private_ca() {
    let certs = tempfile::tempdir().unwrap();
    if make_certs(certs.path()).is_none() {
        return;
    }
    let c = |f: &str| certs.path().join(f).display().to_string();
    let conf = format!("tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n}}\n", c("server.pem"), c("server.key"));
    let Some(nats) = Nats::start("tls_to_nats_with_a_private_ca", &conf) else { return };
    let url = format!("tls://127.0.0.1:{}", nats.port);
    let tree = Tree::new();
    let cluster = |extra: &str| format!("[cluster]\nurl = \"{url}\"\n{extra}");
    tree.write("web/cage.toml", &format!("{}\n{}", http_cage_toml(""), cluster(&format!("tls_ca = \"{}\"\n", c("ca.pem")))));
    tree.write("web/http.lua", WEB);
    tree.write("worker/cage.toml", &cluster(&format!("tls_ca = \"{}\"\n", c("ca.pem"))));
    tree.write("worker/work.lua", &work("t"));
    tree.write("untrusting/cage.toml", &format!("name = \"worker\"\n{}", cluster("")));
    tree.write("untrusting/work.lua", &work("u"));

    let log = Server::try_start(&tree.path().join("untrusting"), &[]).err().expect("an unknown CA must stop the start");
    assert!(log.contains("TLS with NATS") || log.contains("certificate"), "{log}");

    let _worker = start(&tree, "worker");
    let web = start(&tree, "web");
    let body = json_body(&get(web.addr("http"), "/square?n=9"));
    assert_eq!(body["result"]["n"], 81, "{body}");
}

#[test]
fn an_nkey_seed_authenticates() {
    let user = nkeys::KeyPair::new_user();
    let seed = user.seed().expect("a new key pair has a seed");
    let conf = format!("authorization {{\n  users = [ {{ nkey: \"{}\" }} ]\n}}\n", user.public_key());
    let Some(nats) = Nats::start("an_nkey_seed_authenticates", &conf) else { return };
    let tree = Tree::new();
    let cluster = format!("[cluster]\nurl = \"{}\"\nnkey_seed = \"${{TEST_NKEY_SEED}}\"\n", nats.url());
    tree.write("worker/cage.toml", &cluster);
    tree.write("worker/work.lua", &work("n"));
    let path = tree.path().join("worker");
    let other = nkeys::KeyPair::new_user().seed().unwrap();
    let log = Server::try_start_env(&path, 1, &[], &[("TEST_NKEY_SEED", &other)]).err().expect("an unknown nkey is refused");
    assert!(log.contains("refused this process's credentials (nkey)"), "{log}");
    assert!(!log.contains(&other), "the seed must not be logged");
    let mut worker = Server::try_start_env(&path, 1, &[], &[("TEST_NKEY_SEED", &seed)]).expect("the right nkey");
    assert!(worker.wait_for("joined flock default", Duration::from_secs(5)).is_some());
}

#[test]
fn cages_of_one_process_must_agree_on_the_cluster() {
    let tree = Tree::new();
    tree.write("cages/a/cage.toml", "[cluster]\nurl = \"nats://127.0.0.1:4222\"\n");
    tree.write("cages/a/m.lua", "return {}\n");
    tree.write("cages/b/cage.toml", "\n[cluster]\nurl = \"nats://127.0.0.1:4222\"\nflock = \"other\"\n");
    tree.write("cages/b/m.lua", "return {}\n");
    let out = pmnc_limited(&["run", tree.path().to_str().unwrap()], Duration::from_secs(20));
    assert_eq!(out.code, Some(1));
    assert!(out.stderr.contains("b/cage.toml:2: cluster: differs from [cluster] in"), "{}", out.stderr);
    assert!(out.stderr.contains("a/cage.toml:1"), "{}", out.stderr);

    let out = pmnc_limited(&["run", tree.path().join("cages/a").to_str().unwrap(), "--cluster", "nats://a:b:c"], Duration::from_secs(20));
    assert_eq!(out.code, Some(1));
    assert!(out.stderr.contains("--cluster: \"nats://a:b:c\" is not a NATS server address"), "{}", out.stderr);
    let out = pmnc_limited(&["check", tree.path().join("cages/a").to_str().unwrap()], Duration::from_secs(20));
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    tree.write("cages/a/cage.toml", "[cluster]\nurl = \"nats://127.0.0.1:4222\"\ntoken = \"t\"\nuser = \"u\"\npassword = \"p\"\n");
    let out = pmnc_limited(&["check", tree.path().join("cages/a").to_str().unwrap()], Duration::from_secs(20));
    assert_eq!(out.code, Some(1));
    assert!(out.stderr.contains("one way of authenticating"), "{}", out.stderr);
}

#[test]
fn a_cage_down_alert_fires_when_the_last_copy_dies() {
    let Some(nats) = Nats::start("a_cage_down_alert_fires_when_the_last_copy_dies", "") else { return };
    let tree = Tree::new();
    lay_out(&tree, &nats.url(), &["a"]);
    let web_toml = std::fs::read_to_string(tree.path().join("web/cage.toml")).unwrap();
    tree.write(
        "web/cage.toml",
        &format!("{web_toml}\n[monitor.alerts.worker_gone]\nkind = \"cage_down\"\ncage = \"worker\"\ntarget = \"web.alerts.receive\"\n"),
    );
    tree.write("web/alerts.lua", "local M = {}\nfunction M.receive(alert) pmnc.log.warn('ALERT', alert.alert, alert.cage, alert.message) end\nreturn M\n");
    let mut worker = start(&tree, "worker_a");
    let mut web = start(&tree, "web");
    // Up first: the web process has heard the worker, and no alert has fired.
    assert_eq!(json_body(&get(web.addr("http"), "/square?n=2"))["ok"], true);
    web.drain(Duration::from_millis(800));
    assert!(!web.log.iter().any(|l| l.contains("ALERT")), "{}", web.log.join("\n"));
    worker.child.kill().unwrap();
    let _ = worker.child.wait();
    let line = web.wait_for("ALERT worker_gone worker", Duration::from_secs(15));
    assert!(line.is_some(), "no cage_down alert:\n{}", web.log.join("\n"));
}

#[test]
fn events_reach_the_same_cage_in_other_processes() {
    let Some(nats) = Nats::start("events_reach_the_same_cage_in_other_processes", "") else { return };
    let tree = Tree::new();
    let handler = r#"local M = {}
function M.handle(request)
  local q = request.query
  if request.path == "/wait" then
    local v = pmnc.events.wait(q.topic, tonumber(q.t or 5))
    return { value = v }
  elseif request.path == "/publish" then
    pmnc.events.publish(q.topic, { text = q.text })
    return "sent"
  end
end
return M
"#;
    for copy in ["one", "two"] {
        tree.write(&format!("{copy}/cage.toml"), &format!("name = \"chat\"\n{}\n{}", http_cage_toml(""), cluster_table(&nats.url())));
        tree.write(&format!("{copy}/http.lua"), handler);
    }
    let one = start(&tree, "one");
    let two = start(&tree, "two");
    let (a, b) = (one.addr("http"), two.addr("http"));
    let waiter = std::thread::spawn(move || get(a, "/wait?topic=room1"));
    // Publish in the other process until the waiter has its event (it may not be parked yet).
    let deadline = Instant::now() + Duration::from_secs(4);
    while !waiter.is_finished() {
        assert_eq!(get(b, "/publish?topic=room1&text=hello").text(), "sent");
        assert!(Instant::now() < deadline, "the event never reached the other process");
        std::thread::sleep(Duration::from_millis(50));
    }
    let r = waiter.join().unwrap();
    assert_eq!(json_body(&r)["value"]["text"], "hello", "{}", r.text());
    // Another topic is not delivered to this waiter.
    let waiter = std::thread::spawn(move || {
        let t = Instant::now();
        (get(a, "/wait?topic=room2&t=1"), t.elapsed())
    });
    for _ in 0..5 {
        get(b, "/publish?topic=room3&text=other");
    }
    let (r, took) = waiter.join().unwrap();
    assert!(json_body(&r)["value"].is_null(), "{}", r.text());
    assert!(took >= Duration::from_millis(950), "the wait ended early ({took:?})");
}

#[test]
fn durable_calls_reach_a_cage_in_another_process_even_one_started_later() {
    let Some(nats) = Nats::start("durable_calls_reach_a_cage_in_another_process_even_one_started_later", "") else { return };
    let tree = Tree::new();
    tree.write("web/cage.toml", &format!("{}\n{}", http_cage_toml(""), cluster_table(&nats.url())));
    tree.write(
        "web/http.lua",
        r#"local M = {}
function M.handle(request)
  local q = request.query
  if request.path == "/enqueue" then
    return pmnc("worker", { queue = "retry", id = "rec-" .. q.k }).work.record(q.k, q.v)
  elseif request.path == "/get" then
    return { value = pmnc("worker").work.get(q.k) }
  end
end
return M
"#,
    );
    tree.write("worker/cage.toml", &format!("{}\n[queues.retry]\n", cluster_table(&nats.url())));
    tree.write("worker/work.lua", "local M = {}\nfunction M.record(k, v) pmnc.state.set(k, v) end\nfunction M.get(k) return pmnc.state.get(k) end\nreturn M\n");
    // The worker is not running yet: the calls wait in the web cage's outbox.
    let web = start(&tree, "web");
    let addr = web.addr("http");
    for i in 0..10 {
        let r = get(addr, &format!("/enqueue?k=k{i}&v=v{i}"));
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.text(), format!("rec-k{i}"));
    }
    let _worker = start(&tree, "worker");
    let deadline = Instant::now() + Duration::from_secs(30);
    for i in 0..10 {
        loop {
            let r = get(addr, &format!("/get?k=k{i}"));
            if r.status == 200 && json_body(&r)["value"] == format!("v{i}").as_str() {
                break;
            }
            assert!(Instant::now() < deadline, "call {i} never reached the worker: {} {}", r.status, r.text());
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[test]
fn a_nats_cluster_of_three_routes_calls_and_survives_the_loss_of_a_server() {
    let ports: Vec<u16> = (0..3).map(|_| spare_port()).collect();
    let mut servers = Vec::new();
    for i in 0..3 {
        let routes: Vec<String> = (0..3).filter(|j| *j != i).map(|j| format!("nats-route://127.0.0.1:{}", ports[j])).collect();
        let conf = format!("cluster {{\n  name: pmnc_test\n  listen: 127.0.0.1:{}\n  routes: [{}]\n}}\n", ports[i], routes.join(", "));
        let Some(n) = Nats::start("a_nats_cluster_of_three_routes_calls_and_survives_the_loss_of_a_server", &conf) else { return };
        servers.push(n);
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    while !servers.iter().all(|s| s.monitoring("/routez")["num_routes"].as_u64().unwrap_or(0) >= 2) {
        assert!(Instant::now() < deadline, "the three NATS servers did not form a cluster");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The web process knows only the first server (it learns the others from it), the worker
    // only the third: every call crosses a route between servers.
    let tree = Tree::new();
    lay_out(&tree, &servers[0].url(), &[]);
    tree.write("worker/cage.toml", &cluster_table(&servers[2].url()));
    tree.write("worker/work.lua", &work("w"));
    let _worker = start(&tree, "worker");
    let mut web = start(&tree, "web");
    let addr = web.addr("http");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // Subscriptions take a moment to travel the routes.
        let body = json_body(&get(addr, "/square?n=6"));
        if body["ok"] == true {
            assert_eq!(body["result"]["n"], 36);
            break;
        }
        assert!(Instant::now() < deadline, "no call crossed the NATS cluster: {body}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The web process's server dies: it moves to another server of the cluster by itself.
    servers[0].kill();
    web.wait_for("lost the connection to NATS", Duration::from_secs(10)).expect("the loss is noticed");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let body = json_body(&get(addr, "/square?n=7"));
        if body["ok"] == true {
            assert_eq!(body["result"]["n"], 49);
            break;
        }
        assert!(Instant::now() < deadline, "no recovery on the other servers: {body}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_token_authenticates() {
    let Some(nats) = Nats::start("a_token_authenticates", "authorization {\n  token: \"t0ken-for-tests\"\n}\n") else { return };
    let tree = Tree::new();
    tree.write("worker/cage.toml", &format!("[cluster]\nurl = \"{}\"\ntoken = \"${{TEST_NATS_TOKEN}}\"\n", nats.url()));
    tree.write("worker/work.lua", &work("t"));
    let path = tree.path().join("worker");
    let log = Server::try_start_env(&path, 1, &[], &[("TEST_NATS_TOKEN", "guess")]).err().expect("a wrong token is refused");
    assert!(log.contains("refused this process's credentials (token)") && !log.contains("guess"), "{log}");
    let mut worker = Server::try_start_env(&path, 1, &[], &[("TEST_NATS_TOKEN", "t0ken-for-tests")]).expect("the right token");
    assert!(worker.wait_for("joined flock default", Duration::from_secs(5)).is_some());
}

#[test]
fn a_schedule_fires_once_across_hosts() {
    let store = tempfile::tempdir().unwrap();
    let conf = format!("jetstream {{\n  store_dir: \"{}\"\n}}\n", store.path().display());
    let Some(nats) = Nats::start("a_schedule_fires_once_across_hosts", &conf) else { return };
    // Two copies in two folders: two state files, as on two hosts; only the flock can choose.
    let tree = Tree::new();
    let jobs = "return {\n  tick = function(firing)\n    pmnc.state.set(('f:%.3f'):format(firing.scheduled_at), pmnc.cage)\n  end,\n}\n";
    for host in ["host_a", "host_b"] {
        tree.write(
            &format!("{host}/cage.toml"),
            &format!(
                "name = \"jobs\"\n[interfaces.every_second]\nprotocol = \"schedule\"\ncron = \"* * * * * *\"\nhandler = \"jobs.tick\"\n{}",
                cluster_table(&nats.url())
            ),
        );
        tree.write(&format!("{host}/jobs.lua"), jobs);
    }
    let a = start(&tree, "host_a");
    let b = start(&tree, "host_b");
    let firings = |host: &str| -> Vec<String> {
        let Ok(db) = rusqlite::Connection::open(tree.path().join(host).join(".data/state.sqlite")) else { return Vec::new() };
        let _ = db.busy_timeout(Duration::from_secs(10));
        let Ok(mut s) = db.prepare("SELECT key FROM state WHERE key LIKE 'f:%'") else { return Vec::new() };
        s.query_map([], |r| r.get(0)).map(|rows| rows.filter_map(Result::ok).collect()).unwrap_or_default()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while firings("host_a").len() + firings("host_b").len() < 5 {
        assert!(Instant::now() < deadline, "too few firings: {:?} {:?}", firings("host_a"), firings("host_b"));
        std::thread::sleep(Duration::from_millis(100));
    }
    let (mut a, mut b) = (a, b);
    a.drain(Duration::from_millis(100));
    b.drain(Duration::from_millis(100));
    let logs = format!("{}\n{}", a.log.join("\n"), b.log.join("\n"));
    drop((a, b));
    let (fa, fb) = (firings("host_a"), firings("host_b"));
    let twice: Vec<&String> = fa.iter().filter(|f| fb.contains(f)).collect();
    assert!(twice.is_empty(), "firings run on both hosts: {twice:?} (a: {fa:?}, b: {fb:?})\n{logs}");
}
