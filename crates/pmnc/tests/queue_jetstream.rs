//! Clustered queues on JetStream (issue 18, `[queues.NAME] store = "cluster"`): copies of one
//! cage share a queue's calls through a private nats-server with JetStream. A call enqueued in
//! one process runs in another, survives the process that accepted it being killed, is run
//! again elsewhere when the copy running it dies, reads the same from every process, goes to
//! dead letters at its max_attempts, and an id runs once however often it is enqueued. The
//! chaos test kills copies at random while calls flow and counts lost calls (must be none) and
//! calls run twice; `PMNC_QUEUE_CHAOS_CALLS` sets how many (bench/queue-cluster.sh).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::nats::Nats;
use common::*;

const HTTP: &str = r#"
local M = {}
local function opts(q)
  return { queue = q.queue or "jobs", id = q.id, delay = tonumber(q.delay), max_attempts = tonumber(q.max) }
end
local function show(r)
  if r == nil then return "none" end
  return ("%s %s %s %s"):format(r.status, tostring(r.value), tostring(r.attempts), tostring(r.error))
end
function M.handle(request)
  local q, p = request.query, request.path
  if p == "/enqueue" then
    local ok, r = pcall(function() return pmnc("worker", opts(q)).work[q.fn or "count"](tonumber(q.i) or 0, tonumber(q.s)) end)
    if ok then return tostring(r) end
    return "ERR " .. tostring(r)
  elseif p == "/burst" then
    -- Enqueues calls c<from> .. c<to> of work.count (or q.fn); stops at the first error.
    for i = tonumber(q.from), tonumber(q.to) do
      local ok, r = pcall(function() return pmnc("worker", { queue = q.queue or "jobs", id = "c" .. i }).work[q.fn or "count"](i) end)
      if not ok then return "ERR at " .. i .. ": " .. tostring(r) end
    end
    return "ok"
  elseif p == "/xa" then
    -- A state write and a durable call in one transaction.
    local xa = pmnc.transaction.create()
    xa.state.set("sent:" .. q.id, true)
    xa.pmnc("worker", opts(q)).work[q.fn or "count"](tonumber(q.i) or 0)
    local ok, _, id = pcall(xa.execute)
    if ok then return "ok " .. tostring(id) end
    return "ERR " .. tostring(_)
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
  elseif p == "/tally" then
    -- Over calls 1..n: how many never took effect, took effect twice, were delivered again.
    local missing, twice, redelivered = 0, 0, 0
    for i = 1, tonumber(q.n) do
      local n = pmnc.state.get("n:" .. i)
      if n == nil then missing = missing + 1 elseif n > 1 then twice = twice + 1 end
      local d = pmnc.state.get("d:" .. i)
      if d ~= nil and d > 1 then redelivered = redelivered + 1 end
    end
    return ("missing=%d twice=%d redelivered=%d"):format(missing, twice, redelivered)
  end
  return "no such path " .. p
end
return M
"#;

const WORK: &str = r#"
local M = {}
-- Counts how often call i took effect on the (shared) state, and on which delivery.
function M.count(i)
  local k = "n:" .. i
  pmnc.state.set(k, (pmnc.state.get(k) or 0) + 1)
  pmnc.state.set("d:" .. i, pmnc.request.parameters.delivery)
  return i * 2
end
-- Sleeps s seconds on its first delivery only, then counts.
function M.nap(i, s)
  if pmnc.request.parameters.delivery == 1 then pmnc.sleep(s) end
  return M.count(i)
end
-- Takes a few milliseconds, so that copies die with calls running.
function M.slow(i)
  pmnc.sleep(0.005)
  return M.count(i)
end
-- Notes each start in effects/ran.log (a side effect outside the queue's bookkeeping, when the
-- cage has the file resource `effects`), takes s seconds, then counts.
function M.hold(i, s)
  pmnc.transaction.effects.append("ran.log", ("S %d %d\n"):format(i, pmnc.request.parameters.delivery))
  pmnc.sleep(s)
  return M.count(i)
end
function M.fail(i) error("always fails " .. i) end
function M.never(i) pmnc.calls.fail_permanently("never works " .. i) end
return M
"#;

/// A nats-server with JetStream in a folder of its own. None (said loudly) without the binary.
fn nats(test: &str) -> Option<(Nats, tempfile::TempDir)> {
    let store = tempfile::tempdir().unwrap();
    let config = format!("jetstream {{\n  store_dir: \"{}\"\n}}\n", store.path().display());
    Nats::start(test, &config).map(|n| (n, store))
}

/// The folder of cage `worker` with queue `jobs` on `store` (the clustered store by default);
/// every copy runs from it, so they share its state file.
fn worker(t: &Tree, url: &str, queue_extra: &str) -> PathBuf {
    t.write(
        "worker/cage.toml",
        &format!(
            "{}\n[queues.jobs]\n{queue_extra}\n[queues.jobs.backoff]\ninitial = \"50ms\"\nmax = \"200ms\"\n\n[cluster]\nurl = \"{url}\"\nheartbeat = \"200ms\"\n",
            http_cage_toml("")
        ),
    );
    t.write("worker/http.lua", HTTP);
    t.write("worker/work.lua", WORK);
    t.path().join("worker")
}

const CLUSTERED: &str = "store = \"cluster\"\nack_wait = \"2s\"\nconcurrency = 8";

fn copy(dir: &Path) -> Server {
    Server::start(dir, &[])
}

fn kill9(s: &Server) {
    unsafe_kill(s.child.id() as i32, 9);
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

#[test]
fn a_call_enqueued_in_one_process_runs_in_another_and_its_result_reads_everywhere() {
    let Some((nats, _js)) = nats("a_call_enqueued_in_one_process_runs_in_another_and_its_result_reads_everywhere") else { return };
    let t = Tree::new();
    let dir = worker(&t, &nats.url(), CLUSTERED);
    let mut a = copy(&dir);
    let addr = a.addr("http");
    for i in 1..=20 {
        assert_eq!(get(addr, &format!("/enqueue?id=r{i}&i={i}&delay=1.5")).text(), format!("r{i}"));
    }
    assert!(get(addr, "/result?id=r1").text().starts_with("pending "), "stored and not run yet");
    // The process that accepted them leaves before they are due; another copy runs them.
    assert_eq!(a.terminate(Duration::from_secs(15)), Some(0));
    let b = copy(&dir);
    let b_addr = b.addr("http");
    for i in 1..=20 {
        let r = result_until(b_addr, &format!("r{i}"), "done", Duration::from_secs(20));
        assert_eq!(r, format!("done {} 1 nil", i * 2));
    }
    // Through a transaction: committed with its state write, then into the stream.
    assert_eq!(get(b_addr, "/xa?id=x1&i=21").text(), "ok x1");
    assert_eq!(get(b_addr, "/wait?id=x1&timeout=10").text(), "done 42 1 nil");
    assert_eq!(get(b_addr, "/state?key=sent:x1").text(), "true");
    let cancel = get(b_addr, "/cancel?id=r1").text();
    assert_eq!(cancel, "false done call r1 of cage worker is done: a call that ended cannot be cancelled");
    // A third process reads the results from the bucket, and the effects from the state.
    let c = copy(&dir);
    let c_addr = c.addr("http");
    assert_eq!(get(c_addr, "/result?id=r7").text(), "done 14 1 nil");
    assert_eq!(get(c_addr, "/wait?id=r7&timeout=1").text(), "done 14 1 nil", "an ended call's wait returns at once");
    assert_eq!(get(c_addr, "/result?id=nosuch").text(), "none");
    for i in 1..=20 {
        assert_eq!(get(c_addr, &format!("/state?key=n:{i}")).text(), "1", "call r{i} took effect once");
    }
}

#[test]
fn a_call_survives_the_process_that_accepted_it_killed_before_it_ran() {
    let Some((nats, _js)) = nats("a_call_survives_the_process_that_accepted_it_killed_before_it_ran") else { return };
    let t = Tree::new();
    let dir = worker(&t, &nats.url(), CLUSTERED);
    let a = copy(&dir);
    let addr = a.addr("http");
    for i in 1..=10 {
        assert_eq!(get(addr, &format!("/enqueue?id=k{i}&i={i}&delay=1")).text(), format!("k{i}"));
    }
    kill9(&a);
    drop(a);
    let b = copy(&dir);
    let b_addr = b.addr("http");
    for i in 1..=10 {
        result_until(b_addr, &format!("k{i}"), "done", Duration::from_secs(20));
        assert_eq!(get(b_addr, &format!("/state?key=n:{i}")).text(), "1");
    }
}

#[test]
fn a_call_whose_copy_dies_while_it_runs_runs_again_on_another_and_a_long_one_keeps_its_copy() {
    let Some((nats, _js)) = nats("a_call_whose_copy_dies_while_it_runs_runs_again_on_another_and_a_long_one_keeps_its_copy") else { return };
    let t = Tree::new();
    let dir = worker(&t, &nats.url(), CLUSTERED);
    let a = copy(&dir);
    let addr = a.addr("http");
    // Runs 3 s, longer than ack_wait (2 s): in-progress acks keep it on this copy.
    assert_eq!(get(addr, "/enqueue?id=long&fn=nap&i=1&s=3").text(), "long");
    let r = get(addr, "/wait?id=long&timeout=10").text();
    assert_eq!(r, "done 2 1 nil");
    assert_eq!(get(addr, "/state?key=d:1").text(), "1", "delivered once: not handed to another copy while it ran");
    // Runs 60 s on its first delivery; its copy dies meanwhile.
    assert_eq!(get(addr, "/enqueue?id=orphan&fn=nap&i=2&s=60").text(), "orphan");
    result_until(addr, "orphan", "running", Duration::from_secs(10));
    kill9(&a);
    drop(a);
    let started = Instant::now();
    let b = copy(&dir);
    let b_addr = b.addr("http");
    result_until(b_addr, "orphan", "done 4 1 nil", Duration::from_secs(20));
    eprintln!("the dead copy's call ran elsewhere {:.1} s after the kill", started.elapsed().as_secs_f64());
    assert_eq!(get(b_addr, "/state?key=n:2").text(), "1", "the first attempt never committed");
    assert_eq!(get(b_addr, "/state?key=d:2").text(), "2", "the second delivery ran it");
}

#[test]
fn a_call_handed_again_while_its_copy_still_runs_it_is_left_to_that_copy() {
    let Some((nats, _js)) = nats("a_call_handed_again_while_its_copy_still_runs_it_is_left_to_that_copy") else { return };
    let t = Tree::new();
    let queue = "store = \"cluster\"\nack_wait = \"1s\"\nconcurrency = 8\n\n[resources.effects]\nprotocol = \"file\"\nroot = \"effects\"\n";
    let dir = worker(&t, &nats.url(), queue);
    std::fs::create_dir_all(dir.join("effects")).unwrap();
    // The copies send no in-progress acks (a debug-build hook), as when they cannot reach the
    // consumer while it elects a leader: JetStream hands a call out again every ack_wait (1 s)
    // while it runs for 4 s.
    let env = [("PMNC_TEST_NO_PROGRESS", "1")];
    let mut a = Server::try_start_env(&dir, 2, &[], &env).unwrap();
    let addr = a.addr("http");
    // One copy: every delivery again comes to the process running the call.
    assert_eq!(get(addr, "/enqueue?id=alone&fn=hold&i=1&s=4").text(), "alone");
    assert_eq!(get(addr, "/wait?id=alone&timeout=30").text(), "done 2 1 nil");
    assert!(a.wait_for("call alone delivered again while this process still holds it", Duration::from_secs(5)).is_some(), "{:#?}", a.log);
    // Two copies (new processes: each logs at most 5 such lines in 10 s): it comes to this copy
    // or the other, both alive and announcing what they hold.
    a.terminate(Duration::from_secs(10));
    let mut a = Server::try_start_env(&dir, 2, &[], &env).unwrap();
    let addr = a.addr("http");
    let mut b = Server::try_start_env(&dir, 2, &[], &env).unwrap();
    assert_eq!(get(addr, "/enqueue?id=pair&fn=hold&i=2&s=4").text(), "pair");
    assert_eq!(get(addr, "/wait?id=pair&timeout=30").text(), "done 4 1 nil");
    for i in [1, 2] {
        assert_eq!(get(addr, &format!("/state?key=n:{i}")).text(), "1", "call {i} ran once");
        assert_eq!(get(addr, &format!("/state?key=d:{i}")).text(), "1", "call {i}: its first delivery ran it");
    }
    // The state alone would not tell: a second run's state writes are dropped when its end
    // finds the call ended. Its start, outside the state, would be noted.
    let starts = std::fs::read_to_string(dir.join("effects/ran.log")).unwrap();
    assert_eq!(starts, "S 1 1\nS 2 1\n", "each started once, by its first delivery");
    a.drain(Duration::from_millis(200));
    b.drain(Duration::from_millis(200));
    let again = a.log.iter().chain(b.log.iter()).filter(|l| l.contains("call pair delivered again while")).count();
    assert!(again >= 1, "the hook made JetStream hand the call out again: {:#?} {:#?}", a.log, b.log);
}

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

#[test]
fn failing_calls_go_to_dead_letters_at_max_attempts_or_at_once_when_permanent() {
    let Some((nats, _js)) = nats("failing_calls_go_to_dead_letters_at_max_attempts_or_at_once_when_permanent") else { return };
    let t = Tree::new();
    let dir = worker(&t, &nats.url(), &format!("{CLUSTERED}\nmax_attempts = 3"));
    let a = copy(&dir);
    let addr = a.addr("http");
    assert_eq!(get(addr, "/enqueue?id=f1&fn=fail&i=1").text(), "f1");
    assert_eq!(get(addr, "/enqueue?id=f2&fn=never&i=2").text(), "f2");
    assert_eq!(get(addr, "/enqueue?id=f3&fn=fail&i=3&max=1").text(), "f3");
    let r = result_until(addr, "f1", "dead", Duration::from_secs(20));
    assert!(r.starts_with("dead nil 3 ") && r.contains("always fails 1") && r.contains("after 3 attempts, its max_attempts"), "{r}");
    let r = result_until(addr, "f2", "dead", Duration::from_secs(20));
    assert!(r.starts_with("dead nil 1 ") && r.contains("never works 2") && r.contains("failed permanently"), "{r}");
    let r = result_until(addr, "f3", "dead", Duration::from_secs(20));
    assert!(r.starts_with("dead nil 1 ") && r.contains("after 1 attempt, its max_attempts"), "{r}");
    let ok = until(Duration::from_secs(10), || stream_messages(&nats, "PMNC_default_Q_worker_jobs_DEAD") == Some(3));
    assert!(ok, "dead letters: {:?}", stream_messages(&nats, "PMNC_default_Q_worker_jobs_DEAD"));
    assert_eq!(stream_messages(&nats, "PMNC_default_Q_worker_jobs"), Some(0), "nothing left in the queue's stream");
    let ls = pmnc_limited(&["queue", "ls", dir.to_str().unwrap()], Duration::from_secs(30));
    assert!(
        ls.stdout.contains("queue jobs (clustered, stream PMNC_default_Q_worker_jobs): 0 waiting, 0 held") && ls.stdout.contains("3 dead letters"),
        "{}",
        ls.stdout
    );
}

#[test]
fn a_call_enqueued_many_times_with_one_id_runs_once() {
    let Some((nats, _js)) = nats("a_call_enqueued_many_times_with_one_id_runs_once") else { return };
    let t = Tree::new();
    let dir = worker(&t, &nats.url(), CLUSTERED);
    let a = copy(&dir);
    let b = copy(&dir);
    let (a_addr, b_addr) = (a.addr("http"), b.addr("http"));
    for addr in [a_addr, b_addr, a_addr] {
        assert_eq!(get(addr, "/enqueue?id=dup&i=500&delay=0.5").text(), "dup");
    }
    result_until(b_addr, "dup", "done 1000 1", Duration::from_secs(20));
    // Again once it ran: still once. Calls enqueued after it run after it is looked at.
    assert_eq!(get(a_addr, "/enqueue?id=dup&i=500").text(), "dup");
    for i in 1..=10 {
        assert_eq!(get(a_addr, &format!("/enqueue?id=after{i}&i={i}")).text(), format!("after{i}"));
    }
    for i in 1..=10 {
        result_until(a_addr, &format!("after{i}"), "done", Duration::from_secs(20));
    }
    assert_eq!(get(a_addr, "/state?key=n:500").text(), "1", "the id ran once");
}

/// `s` from the environment variable `name`, else `default`.
fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[test]
fn chaos_copies_killed_at_random_while_calls_flow_lose_nothing() {
    let Some((nats, _js)) = nats("chaos_copies_killed_at_random_while_calls_flow_lose_nothing") else { return };
    let n = env_or("PMNC_QUEUE_CHAOS_CALLS", 500);
    let t = Tree::new();
    let dir = worker(&t, &nats.url(), CLUSTERED);
    // Copy 0 takes the enqueues and is never killed; copies 1 and 2 are killed and started again.
    let front = copy(&dir);
    let addr = front.addr("http");
    let others: Arc<Mutex<Vec<Server>>> = Arc::new(Mutex::new(vec![copy(&dir), copy(&dir)]));
    let done_sending = Arc::new(AtomicBool::new(false));
    let kills = Arc::new(Mutex::new((0usize, Instant::now())));
    let killer = {
        let (others, done_sending, kills, dir) = (others.clone(), done_sending.clone(), kills.clone(), dir.clone());
        std::thread::spawn(move || {
            let mut seed = std::process::id() as u64 ^ 0x5deece66d;
            let mut next = || {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed
            };
            // At least one kill per 250 calls (3 at least), and on until every call was sent.
            let mut count = 0;
            while count < (n / 250).max(3) || !done_sending.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(200 + next() % 600));
                let victim = (next() % 2) as usize;
                let mut o = others.lock().unwrap();
                kill9(&o[victim]);
                let _ = o[victim].child.wait();
                *kills.lock().unwrap() = (count + 1, Instant::now());
                o[victim] = copy(&dir);
                count += 1;
            }
        })
    };
    let started = Instant::now();
    let chunk = 50;
    let mut from = 1;
    while from <= n {
        let to = (from + chunk - 1).min(n);
        assert_eq!(get(addr, &format!("/burst?fn=slow&from={from}&to={to}")).text(), "ok");
        from = to + 1;
    }
    let sent = started.elapsed();
    done_sending.store(true, Ordering::SeqCst);
    killer.join().unwrap();
    let last_kill = kills.lock().unwrap().1;
    let mut tally = String::new();
    let drained = until(Duration::from_secs(120), || {
        tally = get(addr, &format!("/tally?n={n}")).text();
        tally.starts_with("missing=0 ")
    });
    let drain = last_kill.elapsed();
    let (kills_made, _) = *kills.lock().unwrap();
    println!(
        "queue chaos: calls={n} copies=3 kills={kills_made} sent_in={:.1}s drained_after_last_kill={:.1}s total={:.1}s {tally}",
        sent.as_secs_f64(),
        drain.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    assert!(drained, "calls lost: {tally}");
    drop(others);
}

/// Durable calls per second of one process on `queue_extra`'s store: (seconds, calls/s).
fn throughput(nats_url: &str, queue_extra: &str, n: usize, senders: usize) -> (f64, f64) {
    let t = Tree::new();
    let dir = worker(&t, nats_url, queue_extra);
    let s = Server::start_with_workers(&dir, 2, &[]);
    let addr = s.addr("http");
    let started = Instant::now();
    let per = n.div_ceil(senders);
    let threads: Vec<_> = (0..senders)
        .map(|k| {
            std::thread::spawn(move || {
                let (a, b) = (k * per + 1, ((k + 1) * per).min(n));
                let mut from = a;
                while from <= b {
                    let to = (from + 99).min(b);
                    assert_eq!(get(addr, &format!("/burst?from={from}&to={to}")).text(), "ok");
                    from = to + 1;
                }
            })
        })
        .collect();
    for th in threads {
        th.join().unwrap();
    }
    let mut tally = String::new();
    let all = until(Duration::from_secs(300), || {
        tally = get(addr, &format!("/tally?n={n}")).text();
        tally.starts_with("missing=0 ")
    });
    assert!(all, "{tally}");
    let secs = started.elapsed().as_secs_f64();
    (secs, n as f64 / secs)
}

/// bench/queue-cluster.sh: durable calls/s end to end (enqueue, run, commit) on the clustered
/// store with replicas 1 against the embedded store, in the same run.
#[test]
#[ignore]
fn bench_durable_calls_per_second_clustered_against_embedded() {
    let Some((nats, _js)) = nats("bench_durable_calls_per_second_clustered_against_embedded") else { return };
    let n = env_or("PMNC_QUEUE_BENCH_CALLS", 5000);
    let (es, er) = throughput(&nats.url(), "concurrency = 64", n, 8);
    let (cs, cr) = throughput(&nats.url(), "store = \"cluster\"\nreplicas = 1\nconcurrency = 64", n, 8);
    println!("queue bench: calls={n} embedded: {es:.2}s {er:.0} calls/s; cluster replicas=1: {cs:.2}s {cr:.0} calls/s; ratio {:.2}", cr / er);
}

/// A clustered queue in a cage.toml without [cluster] is refused before anything starts, with
/// file, line and key, and naming the queue (no NATS needed).
#[test]
fn a_clustered_queue_without_a_cluster_table_is_a_config_error() {
    let t = Tree::new();
    t.write("c/cage.toml", "[queues.orders]\nstore = \"cluster\"\n");
    t.write("c/work.lua", WORK);
    let out = pmnc_limited(&["check", t.path().join("c").to_str().unwrap()], Duration::from_secs(60));
    assert_ne!(out.code, Some(0), "{}{}", out.stdout, out.stderr);
    let text = format!("{}{}", out.stdout, out.stderr);
    assert!(
        text.contains("cage.toml:2")
            && text.contains("queues.orders.store")
            && text.contains("queue orders has store = \"cluster\" but this cage.toml has no [cluster] table"),
        "{text}"
    );
}
