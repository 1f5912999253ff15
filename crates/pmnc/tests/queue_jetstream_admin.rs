//! Cancel and administration of clustered queues (issue 18, docs/decisions/151): a call in a
//! JetStream queue is cancelled by `pmnc.calls.cancel` in any process of the flock or by
//! `pmnc queue cancel` on the cage's folder, through its record in the results bucket
//! (compare-and-set). A delayed call cancelled never runs; a running one runs to its end, stays
//! cancelled and its state writes never land; an ended one is refused. `pmnc queue show`,
//! `retry` and `purge` work on the streams and the bucket, and say so when NATS is away.
//! Every test starts its own nats-server with JetStream (skipped, loudly, without the binary).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::nats::Nats;
use common::*;

const HTTP: &str = r#"
local M = {}
local function show(r)
  if r == nil then return "none" end
  return ("%s %s %s %s"):format(r.status, tostring(r.value), tostring(r.attempts), tostring(r.error))
end
function M.handle(request)
  local q, p = request.query, request.path
  if p == "/enqueue" then
    local ok, r = pcall(function()
      return pmnc("worker", { queue = "jobs", id = q.id, delay = tonumber(q.delay) })[q.m or "work"][q.fn](tonumber(q.i) or 0)
    end)
    if ok then return tostring(r) end
    return "ERR " .. tostring(r)
  elseif p == "/cancel" then
    local ok, cancelled, status, message = pcall(pmnc.calls.cancel, q.id)
    if not ok then return "ERR " .. tostring(cancelled) end
    return ("%s %s %s"):format(tostring(cancelled), tostring(status), tostring(message))
  elseif p == "/result" then
    local ok, r = pcall(pmnc.calls.result, q.id)
    if not ok then return "ERR " .. tostring(r) end
    return show(r)
  elseif p == "/wait" then
    local ok, r = pcall(pmnc.calls.wait, q.id, tonumber(q.timeout) or 10)
    if not ok then return "ERR " .. tostring(r) end
    return show(r)
  elseif p == "/state" then
    return tostring(pmnc.state.get(q.key))
  elseif p == "/set" then
    pmnc.state.set(q.key, true)
    return "ok"
  elseif p == "/event" then
    -- The next value published on a topic of this cage (a call's completion event).
    local v = pmnc.events.wait(q.topic, tonumber(q.timeout) or 10)
    if v == nil then return "nil" end
    return tostring(v.status)
  elseif p == "/version" then
    return tostring(pmnc("worker").flaky.version())
  end
  return "no such path " .. p
end
return M
"#;

const WORK: &str = r#"
local M = {}
-- Leaves a marker: the call ran.
function M.mark(i)
  pmnc.state.set("ran:" .. i, true)
  return i
end
-- Writes a marker (held with the attempt), then waits until the test says go.
function M.hold(i)
  pmnc.state.set("held:" .. i, true)
  while not pmnc.state.get("go:" .. i) do pmnc.sleep(0.02) end
  return i
end
-- As hold, then fails (it would be retried).
function M.hold_fail(i)
  M.hold(i)
  error("boom " .. i)
end
-- As hold, then fails permanently (it would go to dead letters).
function M.hold_never(i)
  M.hold(i)
  M.never(i)
end
function M.never(i) pmnc.calls.fail_permanently("never works " .. i) end
return M
"#;

/// Fails permanently until replaced by FLAKY_FIXED.
const FLAKY_BROKEN: &str = r#"
local M = {}
function M.version() return 1 end
function M.run(i) pmnc.calls.fail_permanently("broken " .. i) end
return M
"#;

const FLAKY_FIXED: &str = r#"
local M = {}
function M.version() return 2 end
function M.run(i)
  pmnc.state.set("fixed:" .. i, true)
  return i * 10
end
return M
"#;

/// A nats-server with JetStream in a folder of its own. None (said loudly) without the binary.
fn nats(test: &str) -> Option<(Nats, tempfile::TempDir)> {
    let store = tempfile::tempdir().unwrap();
    let config = format!("jetstream {{\n  store_dir: \"{}\"\n}}\n", store.path().display());
    Nats::start(test, &config).map(|n| (n, store))
}

/// The folder of cage `worker` with the clustered queue `jobs` on the NATS server at `url`;
/// every copy runs from it, so they share its state file.
fn worker(t: &Tree, url: &str) -> PathBuf {
    t.write(
        "worker/cage.toml",
        &format!(
            "{}\n[queues.jobs]\nstore = \"cluster\"\nack_wait = \"2s\"\nconcurrency = 4\n[queues.jobs.backoff]\ninitial = \"50ms\"\nmax = \"200ms\"\n\n[cluster]\nurl = \"{url}\"\nheartbeat = \"200ms\"\nconnect_timeout = \"2s\"\n",
            http_cage_toml("")
        ),
    );
    t.write("worker/http.lua", HTTP);
    t.write("worker/work.lua", WORK);
    t.write("worker/flaky.lua", FLAKY_BROKEN);
    t.path().join("worker")
}

const STREAM: &str = "PMNC_default_Q_worker_jobs";
const DEAD: &str = "PMNC_default_Q_worker_jobs_DEAD";

/// The messages stream `name` holds, from the server's monitoring port.
fn stream_messages(nats: &Nats, name: &str) -> Option<u64> {
    fn find(v: &serde_json::Value, name: &str) -> Option<u64> {
        match v {
            serde_json::Value::Object(m) => {
                if m.get("name").and_then(|n| n.as_str()) == Some(name) {
                    if let Some(n) = m.get("state").and_then(|s| s.get("messages")).and_then(|n| n.as_u64()) {
                        return Some(n);
                    }
                }
                m.values().find_map(|x| find(x, name))
            }
            serde_json::Value::Array(a) => a.iter().find_map(|x| find(x, name)),
            _ => None,
        }
    }
    find(&nats.monitoring("/jsz?accounts=true&streams=true"), name)
}

fn wait_messages(nats: &Nats, name: &str, n: u64, timeout: Duration) {
    let ok = until(timeout, || stream_messages(nats, name) == Some(n));
    assert!(ok, "stream {name}: {:?} messages after {timeout:?}, waiting for {n}", stream_messages(nats, name));
}

/// Waits until call `id` reads `want` (a prefix) from `addr`; returns the line.
fn result_until(addr: SocketAddr, id: &str, want: &str, timeout: Duration) -> String {
    let mut last = String::new();
    let ok = until(timeout, || {
        last = get(addr, &format!("/result?id={id}")).text();
        last.starts_with(want)
    });
    assert!(ok, "call {id}: still {last:?} after {timeout:?}, waiting for {want:?}");
    last
}

fn queue_cli(args: &[&str], dir: &Path) -> Output {
    let mut all = vec!["queue", args[0], dir.to_str().unwrap()];
    all.extend(&args[1..]);
    pmnc_limited(&all, Duration::from_secs(60))
}

#[test]
fn a_delayed_call_cancelled_in_one_process_never_runs_and_reads_cancelled_in_another() {
    let Some((nats, _js)) = nats("a_delayed_call_cancelled_in_one_process_never_runs_and_reads_cancelled_in_another") else { return };
    let t = Tree::new();
    let dir = worker(&t, &nats.url());
    let a = Server::start(&dir, &[]);
    let b = Server::start(&dir, &[]);
    let (a_addr, b_addr) = (a.addr("http"), b.addr("http"));
    let enqueued = Instant::now();
    assert_eq!(get(a_addr, "/enqueue?id=later&fn=mark&i=1&delay=2").text(), "later");
    assert!(get(b_addr, "/result?id=later").text().starts_with("pending "));
    let c = get(a_addr, "/cancel?id=later").text();
    assert_eq!(c, "true pending call later of cage worker cancelled (it was pending); it will not run again (an attempt running now on another copy runs to its end, and its outcome is dropped)");
    assert_eq!(get(b_addr, "/result?id=later").text(), "cancelled nil 0 cancelled", "read from the bucket in the other process");
    assert_eq!(get(b_addr, "/wait?id=later&timeout=5").text(), "cancelled nil 0 cancelled", "an ended call's wait returns at once");
    assert_eq!(get(b_addr, "/cancel?id=later").text(), "false cancelled call later of cage worker was already cancelled");
    // Past its due time, a copy takes it, finds it cancelled and acks it: the stream empties.
    wait_messages(&nats, STREAM, 0, Duration::from_secs(20));
    assert!(enqueued.elapsed() >= Duration::from_secs(2), "it left the stream only once due");
    assert_eq!(get(a_addr, "/state?key=ran:1").text(), "nil", "a cancelled call never runs");
    assert_eq!(get(a_addr, "/result?id=later").text(), "cancelled nil 0 cancelled");
    // An unknown id: nothing in the bucket.
    assert_eq!(get(a_addr, "/cancel?id=nosuch").text(), "false nil no call \"nosuch\" in the queues of this process");
}

#[test]
fn a_running_call_cancelled_stays_cancelled_and_its_state_writes_never_land() {
    let Some((nats, _js)) = nats("a_running_call_cancelled_stays_cancelled_and_its_state_writes_never_land") else { return };
    let t = Tree::new();
    let dir = worker(&t, &nats.url());
    let a = Server::start(&dir, &[]);
    let b = Server::start(&dir, &[]);
    let (a_addr, b_addr) = (a.addr("http"), b.addr("http"));
    // Run by whichever copy takes it; both share the state file the marker would land in.
    assert_eq!(get(a_addr, "/enqueue?id=busy&fn=hold&i=1").text(), "busy");
    let ok = until(Duration::from_secs(20), || {
        get(a_addr, "/result?id=busy").text().starts_with("running") || get(b_addr, "/result?id=busy").text().starts_with("running")
    });
    assert!(ok, "the call never started: {}", get(a_addr, "/result?id=busy").text());
    let c = get(b_addr, "/cancel?id=busy").text();
    assert!(c.starts_with("true "), "{c}");
    assert_eq!(get(a_addr, "/result?id=busy").text(), "cancelled nil 0 cancelled", "final at once");
    // Let the attempt succeed.
    assert_eq!(get(a_addr, "/set?key=go:1").text(), "ok");
    let r = result_until(a_addr, "busy", "cancelled nil 1 cancelled while attempt 1 ran", Duration::from_secs(20));
    assert_eq!(r, "cancelled nil 1 cancelled while attempt 1 ran; it succeeded; its result and state writes were dropped");
    wait_messages(&nats, STREAM, 0, Duration::from_secs(10));
    assert_eq!(get(a_addr, "/state?key=held:1").text(), "nil", "the cancelled attempt's state write did not land");
    assert_eq!(get(b_addr, "/result?id=busy").text(), r, "the same in the other process");
    assert_eq!(stream_messages(&nats, DEAD), Some(0), "not a dead letter");
}

#[test]
fn a_running_call_cancelled_that_then_fails_is_not_retried_and_its_failure_is_noted() {
    let Some((nats, _js)) = nats("a_running_call_cancelled_that_then_fails_is_not_retried_and_its_failure_is_noted") else { return };
    let t = Tree::new();
    let dir = worker(&t, &nats.url());
    let a = Server::start(&dir, &[]);
    let addr = a.addr("http");
    assert_eq!(get(addr, "/enqueue?id=bad&fn=hold_fail&i=2").text(), "bad");
    result_until(addr, "bad", "running", Duration::from_secs(20));
    let c = get(addr, "/cancel?id=bad").text();
    assert_eq!(
        c,
        "true running call bad of cage worker cancelled while an attempt runs: that attempt runs to its end, its outcome is dropped and it is not retried"
    );
    assert_eq!(get(addr, "/set?key=go:2").text(), "ok");
    let r = result_until(addr, "bad", "cancelled nil 1 cancelled while attempt 1 ran; it failed: ", Duration::from_secs(20));
    assert!(r.contains("boom 2"), "{r}");
    wait_messages(&nats, STREAM, 0, Duration::from_secs(10));
    assert_eq!(stream_messages(&nats, DEAD), Some(0), "not a dead letter");
    assert_eq!(get(addr, "/state?key=held:2").text(), "nil");
    assert_eq!(get(addr, "/result?id=bad").text(), r, "not retried: the record stays as it is");

    // One that then fails for good: its dead letter is taken back, it stays cancelled.
    assert_eq!(get(addr, "/enqueue?id=worse&fn=hold_never&i=3").text(), "worse");
    result_until(addr, "worse", "running", Duration::from_secs(20));
    assert!(get(addr, "/cancel?id=worse").text().starts_with("true running "));
    assert_eq!(get(addr, "/set?key=go:3").text(), "ok");
    let r = result_until(addr, "worse", "cancelled nil 1 cancelled while attempt 1 ran; it failed: ", Duration::from_secs(20));
    assert!(r.contains("never works 3"), "{r}");
    wait_messages(&nats, STREAM, 0, Duration::from_secs(10));
    wait_messages(&nats, DEAD, 0, Duration::from_secs(10));
}

#[test]
fn an_ended_call_cannot_be_cancelled_from_lua_or_the_command_line() {
    let Some((nats, _js)) = nats("an_ended_call_cannot_be_cancelled_from_lua_or_the_command_line") else { return };
    let t = Tree::new();
    let dir = worker(&t, &nats.url());
    let a = Server::start(&dir, &[]);
    let addr = a.addr("http");
    assert_eq!(get(addr, "/enqueue?id=quick&fn=mark&i=7").text(), "quick");
    assert_eq!(get(addr, "/wait?id=quick&timeout=10").text(), "done 7 1 nil");
    assert_eq!(get(addr, "/cancel?id=quick").text(), "false done call quick of cage worker is done: a call that ended cannot be cancelled");
    let out = queue_cli(&["cancel", "quick"], &dir);
    assert_eq!(out.code, Some(1), "{}{}", out.stdout, out.stderr);
    assert!(out.stderr.contains("cage worker: call \"quick\" is done: a call that ended cannot be cancelled"), "{}", out.stderr);
    assert_eq!(get(addr, "/result?id=quick").text(), "done 7 1 nil", "nothing changed");
    assert_eq!(get(addr, "/state?key=ran:7").text(), "true");
    let out = queue_cli(&["cancel", "nosuch"], &dir);
    assert_eq!(out.code, Some(1));
    assert!(out.stderr.contains("no call \"nosuch\""), "{}", out.stderr);
}

#[test]
fn pmnc_queue_cancel_cancels_a_clustered_call_that_then_never_runs() {
    let Some((nats, _js)) = nats("pmnc_queue_cancel_cancels_a_clustered_call_that_then_never_runs") else { return };
    let t = Tree::new();
    let dir = worker(&t, &nats.url());
    let a = Server::start(&dir, &[]);
    let addr = a.addr("http");
    assert_eq!(get(addr, "/enqueue?id=cli1&fn=mark&i=3&delay=2").text(), "cli1");
    // The command line publishes no event: the copy that meets the cancelled call does, once.
    let event = std::thread::spawn(move || get(addr, "/event?topic=call:cli1&timeout=20").text());
    let out = queue_cli(&["cancel", "cli1"], &dir);
    assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);
    assert_eq!(
        out.stdout.trim(),
        "cage worker: call cli1 cancelled (it was pending); it will not run again (an attempt running now runs to its end, and its outcome is dropped)"
    );
    assert_eq!(get(addr, "/result?id=cli1").text(), "cancelled nil 0 cancelled");
    let again = queue_cli(&["cancel", "cli1"], &dir);
    assert_eq!((again.code, again.stdout.trim()), (Some(0), "cage worker: call cli1 was already cancelled"));
    wait_messages(&nats, STREAM, 0, Duration::from_secs(20));
    assert_eq!(event.join().unwrap(), "cancelled", "its completion event came when a copy met it");
    assert_eq!(get(addr, "/state?key=ran:3").text(), "nil", "never ran");
    let show = queue_cli(&["show", "cli1"], &dir);
    assert_eq!(show.code, Some(0), "{}", show.stderr);
    assert!(show.stdout.contains("status:    cancelled") && show.stdout.contains("held:      in no stream (it ended)"), "{}", show.stdout);
}

#[test]
fn show_retry_and_purge_a_dead_clustered_call() {
    let Some((nats, _js)) = nats("show_retry_and_purge_a_dead_clustered_call") else { return };
    let t = Tree::new();
    let dir = worker(&t, &nats.url());
    let a = Server::start(&dir, &[]);
    let addr = a.addr("http");
    assert_eq!(get(addr, "/enqueue?id=d1&m=flaky&fn=run&i=4").text(), "d1");
    let r = result_until(addr, "d1", "dead", Duration::from_secs(20));
    assert!(r.starts_with("dead nil 1 ") && r.contains("broken 4"), "{r}");
    wait_messages(&nats, DEAD, 1, Duration::from_secs(10));

    let show = queue_cli(&["show", "d1"], &dir);
    assert_eq!(show.code, Some(0), "{}", show.stderr);
    for want in [
        "call:      d1",
        "status:    dead",
        "queue:     jobs",
        "attempts:  1",
        &format!("held:      dead letter in stream {DEAD}, sequence 1"),
        "function:  flaky.run",
        "from cage: worker",
        "args:      [4]",
    ] {
        assert!(show.stdout.contains(want), "{want:?} not in:\n{}", show.stdout);
    }
    let error = show.stdout.lines().find(|l| l.starts_with("error:")).unwrap_or_default();
    assert!(error.contains("broken 4"), "{}", show.stdout);
    let early = queue_cli(&["retry", "d1"], &dir);
    assert_eq!(early.code, Some(0), "a dead call can be retried: {}", early.stderr);
    assert!(early.stdout.contains("call d1 of cage worker will run again now (queue jobs)"), "{}", early.stdout);
    // Still broken: dead again, with a new dead letter (the first one was removed).
    let r = result_until(addr, "d1", "dead nil 2 ", Duration::from_secs(20));
    assert!(r.contains("broken 4"), "{r}");
    wait_messages(&nats, DEAD, 1, Duration::from_secs(10));

    // The handler is fixed (hot reload), then the call is retried and runs.
    t.write_rename("worker/flaky.lua", FLAKY_FIXED);
    get_until(addr, "/version", "2", Duration::from_secs(20));
    let out = queue_cli(&["retry", "d1"], &dir);
    assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);
    assert_eq!(get(addr, "/wait?id=d1&timeout=20").text(), "done 40 3 nil");
    assert_eq!(get(addr, "/state?key=fixed:4").text(), "true", "it ran");
    wait_messages(&nats, DEAD, 0, Duration::from_secs(10));
    let again = queue_cli(&["retry", "d1"], &dir);
    assert_eq!(again.code, Some(1));
    assert!(again.stderr.contains("call \"d1\" is done: on a clustered queue only dead calls can be retried"), "{}", again.stderr);

    // Purge: --dead empties the dead letters only; without it the waiting calls go too.
    assert_eq!(get(addr, "/enqueue?id=d2&fn=never&i=5").text(), "d2");
    result_until(addr, "d2", "dead", Duration::from_secs(20));
    assert_eq!(get(addr, "/enqueue?id=p1&fn=mark&i=6&delay=60").text(), "p1");
    wait_messages(&nats, DEAD, 1, Duration::from_secs(10));
    let out = queue_cli(&["purge", "--dead"], &dir);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(out.stdout.contains("cage worker: queue jobs (clustered): deleted 1 dead letters"), "{}", out.stdout);
    assert_eq!(stream_messages(&nats, DEAD), Some(0));
    assert_eq!(stream_messages(&nats, STREAM), Some(1), "the waiting call stays");
    let show = queue_cli(&["show", "d2"], &dir);
    assert!(show.stdout.contains("its dead letter is no longer kept"), "{}", show.stdout);
    let gone = queue_cli(&["retry", "d2"], &dir);
    assert_eq!(gone.code, Some(1));
    assert!(gone.stderr.contains("its dead letter is no longer kept"), "{}", gone.stderr);
    let out = queue_cli(&["purge"], &dir);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(out.stdout.contains("deleted 0 dead letters, 1 calls (1 records marked cancelled)"), "{}", out.stdout);
    assert_eq!(stream_messages(&nats, STREAM), Some(0));
    assert_eq!(get(addr, "/result?id=p1").text(), "cancelled nil 0 purged (pmnc queue purge)");
}

/// With NATS away, the commands say which servers, which error, and which queues.
#[test]
fn the_queue_commands_say_when_nats_cannot_be_reached() {
    let t = Tree::new();
    let url = format!("nats://127.0.0.1:{}", spare_port());
    let dir = worker(&t, &url);
    for args in [&["show", "x"][..], &["cancel", "x"], &["retry", "x"], &["purge", "--dead"]] {
        let out = queue_cli(args, &dir);
        assert_eq!(out.code, Some(1), "{args:?}: {}{}", out.stdout, out.stderr);
        assert!(out.stderr.contains(&format!("cage worker, clustered queues jobs: cannot reach NATS ({url})")), "{args:?}: {}", out.stderr);
    }
}
