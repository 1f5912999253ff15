//! Workflows on clustered queues (issue 18, decision 152), through the real binary and a
//! private nats-server with JetStream: cage web (one process, embedded queue `own`) starts
//! workflows whose steps run on queue `cq` (store = "cluster") of cage worker, two copies of
//! which share the queue's stream. A chain passes its values along across the processes, a
//! chord's members on the clustered queue report to web's join, on_error runs after a
//! permanent failure, a chain survives kill -9 of the copy running its step (each step done
//! once in the bucket, its state effect committed once), and a cancel reaches the step's record,
//! from Lua and from `pmnc queue cancel`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
#[path = "queue_app/support.rs"]
mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use common::nats::Nats;
use common::*;
use support::*;

/// The HTTP handler of both cages: starts workflows (in web) and reads calls and state.
const HTTP: &str = r#"
local M = {}
local wf = pmnc.workflow
local function try(f)
  local ok, r = pcall(f)
  if ok then return tostring(r) end
  return "ERR " .. tostring(r)
end
local function show(v)
  if type(v) == "table" then return pmnc.json.encode(v) end
  return tostring(v)
end
local function status(r)
  if r == nil then return "none" end
  return ("%s %s %s %s"):format(r.status, show(r.value), tostring(r.attempts), tostring(r.error))
end
local function cq(opts) return wf.step("worker", opts or { queue = "cq" }) end
local function own() return wf.step("web", { queue = "own" }) end
function M.handle(request)
  local q, p = request.query, request.path
  if p == "/chain3" then
    -- (n + 1) * 2 + 100: worker (clustered), web, worker (clustered)
    return try(function() return wf.chain({ cq().work.add(tonumber(q.n), 1), own().mine.double(), cq().work.add(100) }, { id = q.id }) end)
  elseif p == "/cqchain" then
    -- Three steps on the clustered queue, the second napping on its first delivery.
    return try(function()
      return wf.chain({ cq().work.mark(1), cq().work.nap(tonumber(q.s) or 0), cq().work.mark() }, { id = q.id })
    end)
  elseif p == "/clichain" then
    -- Three steps on the clustered queue, the second due q.delay seconds after the first ends.
    return try(function()
      return wf.chain({ cq().work.mark(1), cq({ queue = "cq", delay = tonumber(q.delay) or 3 }).work.mark(), cq().work.mark() }, { id = q.id })
    end)
  elseif p == "/chord" then
    return try(function()
      return wf.chord({ cq().work.add(1, 1), own().mine.double(10), cq().work.add(3, 4) }, own().mine.sum(1000), { id = q.id })
    end)
  elseif p == "/group" then
    -- q.n members on the clustered queue: member i gives i + 0.
    return try(function()
      local members = {}
      local opts = { queue = "cq", delay = tonumber(q.delay) }
      for i = 1, tonumber(q.n) do members[i] = cq(opts).work.add(i, 0) end
      return wf.group(members, { id = q.id })
    end)
  elseif p == "/declined" then
    return try(function()
      return wf.chain({ cq().work.add(1, 1), cq().work.declined(), cq().work.never() }, { id = q.id, on_error = own().mine.record() })
    end)
  elseif p == "/slow" then
    -- The second step is due q.delay seconds after the first ends.
    return try(function()
      return wf.chain({ cq().work.add(1, 1), cq({ queue = "cq", delay = tonumber(q.delay) or 3 }).work.add(1), own().mine.double() }, { id = q.id })
    end)
  elseif p == "/cancel" then
    return try(function()
      local cancelled, st, message = wf.cancel(q.id)
      return ("%s %s %s"):format(tostring(cancelled), tostring(st), message)
    end)
  elseif p == "/status" then
    return try(function()
      local s = wf.status(q.id)
      if s == nil then return "none" end
      local parts = { s.status }
      for _, step in ipairs(s.steps) do parts[#parts + 1] = step.id .. "=" .. step.status end
      return table.concat(parts, " ")
    end)
  elseif p == "/result" then
    local ok, r = pcall(pmnc.calls.result, q.id)
    if not ok then return "ERR " .. tostring(r) end
    return status(r)
  elseif p == "/wait" then
    local ok, r = pcall(pmnc.calls.wait, q.id, tonumber(q.timeout) or 20)
    if not ok then return "ERR " .. tostring(r) end
    return status(r)
  elseif p == "/state" then
    return tostring(pmnc.state.get(q.key))
  end
  return "no such path " .. p
end
return M
"#;

/// web's own module.
const MINE: &str = r#"
local M = {}
function M.double(x) return x * 2 end
function M.record(info)
  pmnc.state.set("on_error:" .. info.workflow, info.step .. " | " .. info.error)
  return "noted"
end
function M.sum(results, base)
  local s = base
  for _, v in ipairs(results) do s = s + v end
  pmnc.state.set("sum", s)
  return s
end
return M
"#;

/// worker's module; every effect is a state write, committed with the step's end.
const WORK: &str = r#"
local M = {}
local function effect()
  local k = "ran:" .. pmnc.request.call_id
  pmnc.state.set(k, (pmnc.state.get(k) or 0) + 1)
end
function M.add(a, b)
  effect()
  return a + b
end
function M.mark(x)
  effect()
  return (x or 0) + 1
end
-- Sleeps s seconds on its first delivery only.
function M.nap(x, s)
  if pmnc.request.parameters.delivery == 1 then pmnc.sleep(s) end
  effect()
  return x + 1
end
function M.declined() pmnc.calls.fail_permanently("card declined") end
function M.never(x)
  pmnc.state.set("never", true)
  return x
end
return M
"#;

const WAIT: Duration = Duration::from_secs(30);

/// A nats-server with JetStream in a folder of its own. None (said loudly) without the binary.
fn nats(test: &str) -> Option<(Nats, tempfile::TempDir)> {
    let store = tempfile::tempdir().unwrap();
    let config = format!("jetstream {{\n  store_dir: \"{}\"\n}}\n", store.path().display());
    Nats::start(test, &config).map(|n| (n, store))
}

struct Bed {
    _t: Tree,
    _web: Server,
    web: SocketAddr,
    web_dir: PathBuf,
    worker_dir: PathBuf,
    copies: Vec<Server>,
}

impl Bed {
    /// web in one process, two copies of worker (sharing its folder, so its state file).
    fn start(url: &str) -> Bed {
        let t = Tree::new();
        let cluster = format!("\n[cluster]\nurl = \"{url}\"\nheartbeat = \"200ms\"\n");
        t.write(
            "web/cage.toml",
            &format!("{}\n[queues.own]\n[queues.own.backoff]\ninitial = \"10ms\"\nmultiplier = 1\njitter = 0\n{cluster}", http_cage_toml("")),
        );
        t.write("web/http.lua", HTTP);
        t.write("web/mine.lua", MINE);
        t.write(
            "worker/cage.toml",
            &format!(
                "{}\n[queues.cq]\nstore = \"cluster\"\nack_wait = \"2s\"\n[queues.cq.backoff]\ninitial = \"50ms\"\nmax = \"200ms\"\n{cluster}",
                http_cage_toml("")
            ),
        );
        t.write("worker/http.lua", HTTP);
        t.write("worker/work.lua", WORK);
        let (web_dir, worker_dir) = (t.path().join("web"), t.path().join("worker"));
        let copies = vec![Server::start(&worker_dir, &[]), Server::start(&worker_dir, &[])];
        let web_server = Server::start(&web_dir, &[]);
        let web = web_server.addr("http");
        Bed { _t: t, _web: web_server, web, web_dir, worker_dir, copies }
    }

    fn copy(&self, i: usize) -> SocketAddr {
        self.copies[i].addr("http")
    }
}

/// What `key` of worker's state reads (the copies share its file).
fn state_of(addr: SocketAddr, key: &str) -> String {
    get(addr, &format!("/state?key={key}")).text()
}

/// Waits until `path` on `addr` starts with `want`; returns the text.
fn until_text(addr: SocketAddr, path: &str, want: &str) -> String {
    let mut last = String::new();
    let ok = until(WAIT, || {
        last = get(addr, path).text();
        last.starts_with(want)
    });
    assert!(ok, "{path}: still {last:?} after {WAIT:?}, waiting for {want:?}");
    last
}

/// A chain whose first and last steps are on the clustered queue (run by either copy of worker)
/// and whose middle step runs in web: values pass along, each step runs once.
#[test]
fn a_chain_on_a_clustered_queue_passes_values_along_across_processes() {
    let Some((nats, _js)) = nats("a_chain_on_a_clustered_queue_passes_values_along_across_processes") else { return };
    let b = Bed::start(&nats.url());
    assert_eq!(get_prefix(b.web, "/chain3?n=4&id=c1", "c1", WAIT), "c1");
    // (4 + 1) * 2 + 100
    assert_eq!(until_text(b.copy(0), "/result?id=c1.3", "done"), "done 110 1 nil");
    assert_eq!(get(b.copy(1), "/result?id=c1.1").text(), "done 5 1 nil");
    assert_eq!(get(b.web, "/result?id=c1.2").text(), "done 10 1 nil");
    for step in ["c1.1", "c1.3"] {
        assert_eq!(state_of(b.copy(0), &format!("ran:{step}")), "1", "step {step} took effect once");
    }
    // The later steps went through the outboxes of the cages that ran the steps before them.
    assert_eq!(count(&db(&b.worker_dir), "SELECT count(*) FROM queue_outbox WHERE id = 'c1.2' AND workflow = 'c1'"), 1);
    assert_eq!(count(&db(&b.web_dir), "SELECT count(*) FROM queue_outbox WHERE id IN ('c1.1', 'c1.3') AND workflow = 'c1'"), 2);
    assert_eq!(until_text(b.web, "/status?id=c1", "done"), "done c1.1=done c1.2=done c1.3=done");
    // The same workflow id again: every step id is de-duplicated (by the outbox, JetStream's
    // window and the bucket), nothing runs again.
    assert_eq!(get(b.web, "/chain3?n=7&id=c1").text(), "c1");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(get(b.copy(0), "/result?id=c1.3").text(), "done 110 1 nil");
    assert_eq!(state_of(b.copy(0), "ran:c1.1"), "1");
}

/// A chord whose members run on the clustered queue: their parts reach web's join through the
/// outbox, and the body gets every result in member order.
#[test]
fn a_chord_with_members_on_a_clustered_queue_hands_their_results_to_its_body() {
    let Some((nats, _js)) = nats("a_chord_with_members_on_a_clustered_queue_hands_their_results_to_its_body") else { return };
    let b = Bed::start(&nats.url());
    assert_eq!(get_prefix(b.web, "/chord?id=h1", "h1", WAIT), "h1");
    // [2, 20, 7] summed onto 1000.
    let r = get(b.web, "/wait?id=h1&timeout=30").text();
    assert!(r.starts_with("done 1029 "), "{r}");
    assert_eq!(get(b.web, "/state?key=sum").text(), "1029");
    assert_eq!(count(&db(&b.web_dir), "SELECT count(*) FROM queue_join_parts WHERE join_id = 'h1'"), 3, "one part per member");
    assert_eq!(
        count(&db(&b.worker_dir), "SELECT count(*) FROM queue_outbox WHERE id IN ('h1.1:join', 'h1.3:join') AND cage = 'web'"),
        2,
        "the clustered members' parts went through the outbox of the copy that ran them"
    );
    assert_eq!(until_text(b.web, "/status?id=h1", "done"), "done h1.1=done h1.2=done h1.3=done h1.body=done");
}

/// A step on the clustered queue that fails permanently: its on_error step runs in web with the
/// error, the step after it is never stored, and the dead step's record says why.
#[test]
fn a_permanent_failure_on_a_clustered_queue_runs_on_error_and_no_later_step() {
    let Some((nats, _js)) = nats("a_permanent_failure_on_a_clustered_queue_runs_on_error_and_no_later_step") else { return };
    let b = Bed::start(&nats.url());
    assert_eq!(get_prefix(b.web, "/declined?id=d1", "d1", WAIT), "d1");
    let noted = until_text(b.web, "/state?key=on_error:d1", "d1.2");
    assert!(noted.starts_with("d1.2 | worker.work.declined: card declined"), "{noted}");
    assert_eq!(get(b.web, "/wait?id=d1.on_error").text(), "done noted 1 nil");
    let dead = get(b.copy(0), "/result?id=d1.2").text();
    assert!(dead.starts_with("dead nil 1 worker.work.declined: card declined"), "{dead}");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(get(b.copy(1), "/result?id=d1.3").text(), "none", "the step after a dead one is never stored");
    assert_eq!(get(b.copy(0), "/state?key=never").text(), "nil");
    // The on_error step was stored by the copy that met the dead step, in its file.
    assert_eq!(count(&db(&b.worker_dir), "SELECT count(*) FROM queue_outbox WHERE id = 'd1.on_error' AND cage = 'web'"), 1);
    // Status reads the files of the process asked: a copy of worker holds the dead step (in
    // its outbox, its record in the bucket) and the on_error step it stored.
    let st = until_text(b.copy(1), "/status?id=d1", "dead");
    assert!(st.contains("d1.2=dead"), "{st}");
}

/// Kill -9 of the copy running a step mid-chain: the step is delivered again to the other copy
/// after ack_wait, the chain completes, and every step is done once in the bucket (one recorded
/// attempt) with its state effect committed once.
#[test]
fn a_chain_survives_kill_9_of_the_copy_running_its_step() {
    let Some((nats, _js)) = nats("a_chain_survives_kill_9_of_the_copy_running_its_step") else { return };
    let mut b = Bed::start(&nats.url());
    const N: usize = 4;
    for i in 1..=N {
        assert_eq!(get_prefix(b.web, &format!("/cqchain?id=k{i}&s=60"), &format!("k{i}"), WAIT), format!("k{i}"));
    }
    // Every chain's second step naps 60 s on its first delivery: wait until each runs on a copy.
    let mut on = [None; N];
    let all = until(WAIT, || {
        for (i, slot) in on.iter_mut().enumerate() {
            for c in 0..2 {
                if get(b.copy(c), &format!("/result?id=k{}.2", i + 1)).text().starts_with("running") {
                    *slot = Some(c);
                }
            }
        }
        on.iter().all(Option::is_some)
    });
    assert!(all, "not every chain's second step runs: {on:?}");
    let victim = on[0].unwrap();
    let moved: Vec<usize> = (1..=N).filter(|i| on[i - 1] == Some(victim)).collect();
    let killed = b.copies.remove(victim);
    unsafe_kill(killed.child.id() as i32, 9);
    drop(killed);
    let alive = b.copy(0);
    let started = std::time::Instant::now();
    // The steps the killed copy ran are delivered again to the survivor after ack_wait (its
    // own naps go on for a minute and are not waited for).
    for i in &moved {
        assert_eq!(until_text(alive, &format!("/result?id=k{i}.3"), "done"), "done 4 1 nil", "chain k{i}");
        for k in 1..=3 {
            let step = format!("k{i}.{k}");
            let r = get(alive, &format!("/result?id={step}")).text();
            assert!(r.starts_with("done ") && r.ends_with(" 1 nil"), "step {step} is done once in the bucket: {r}");
            assert_eq!(state_of(b.copy(0), &format!("ran:{step}")), "1", "step {step} took effect once");
        }
    }
    eprintln!("{} chain(s) went on {:.1} s after the kill", moved.len(), started.elapsed().as_secs_f64());
}

/// Cancelling a workflow whose next step waits on the clustered queue: the step's record
/// becomes cancelled (so no copy runs it), and nothing after it is stored.
#[test]
fn cancelling_a_workflow_reaches_its_step_on_a_clustered_queue() {
    let Some((nats, _js)) = nats("cancelling_a_workflow_reaches_its_step_on_a_clustered_queue") else { return };
    let b = Bed::start(&nats.url());
    assert_eq!(get_prefix(b.web, "/slow?id=s1&delay=4", "s1", WAIT), "s1");
    // Step 1 ends at once; step 2 is published with a 4 s delay.
    until_text(b.copy(0), "/result?id=s1.2", "pending");
    // From a copy of worker, whose file holds step 2 (in its outbox) and whose connection
    // reaches the bucket.
    let c = get(b.copy(0), "/cancel?id=s1").text();
    assert!(c.starts_with("true ") && c.contains("s1.2"), "{c}");
    assert!(get(b.copy(1), "/result?id=s1.2").text().starts_with("cancelled"));
    std::thread::sleep(Duration::from_millis(5000));
    assert!(get(b.copy(1), "/result?id=s1.2").text().starts_with("cancelled"), "still cancelled after its due time");
    assert_eq!(state_of(b.copy(0), "ran:s1.2"), "nil", "the cancelled step never ran");
    assert_eq!(get(b.web, "/result?id=s1.3").text(), "none", "nothing after it is stored");
    // From web, which has no clustered queue of its own: its connection for joins reaches
    // worker's bucket, and the files of web know the steps (step 1's continuation).
    assert_eq!(get_prefix(b.web, "/slow?id=s3&delay=4", "s3", WAIT), "s3");
    until_text(b.copy(0), "/result?id=s3.2", "pending");
    let c = get(b.web, "/cancel?id=s3").text();
    assert!(c.starts_with("true ") && c.contains("s3.2"), "{c}");
    assert!(get(b.copy(1), "/result?id=s3.2").text().starts_with("cancelled"));
    std::thread::sleep(Duration::from_millis(4500));
    assert_eq!(state_of(b.copy(0), "ran:s3.2"), "nil", "the step cancelled from web never ran");
    assert_eq!(get(b.web, "/result?id=s3.3").text(), "none");
    // Cancelled while step 2 runs: its end is dropped (its state write too), and step 3, not
    // stored yet, gets a cancelled record in advance, so it could never run.
    assert_eq!(get_prefix(b.web, "/cqchain?id=s2&s=3", "s2", WAIT), "s2");
    let mut runner = 0;
    let running = until(WAIT, || {
        (0..2).any(|c| {
            runner = c;
            get(b.copy(c), "/result?id=s2.2").text().starts_with("running")
        })
    });
    assert!(running, "step s2.2 never ran");
    let c = get(b.copy(runner), "/cancel?id=s2").text();
    assert!(c.starts_with("true running") && c.contains("s2.2"), "{c}");
    let r = until_text(b.copy(runner), "/result?id=s2.2", "cancelled nil 1 cancelled while attempt 1 ran");
    assert!(r.contains("dropped"), "{r}");
    assert!(get(b.copy(1 - runner), "/result?id=s2.3").text().starts_with("cancelled"), "cancelled before it was stored");
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(state_of(b.copy(0), "ran:s2.2"), "nil", "the cancelled attempt's state write was dropped");
    assert_eq!(state_of(b.copy(0), "ran:s2.3"), "nil");
    assert_eq!(count(&db(&b.worker_dir), "SELECT count(*) FROM queue_outbox WHERE id = 's2.3'"), 0, "step 3 was never stored");
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

/// `pmnc queue cancel PATH <workflow id>` from the command line, on the folder of web (which
/// started the chain and has no clustered queue): besides web's file, the records of the
/// chain's steps on worker's clustered queue are cancelled, step 2 (waiting for its delay) now
/// and step 3 (not stored yet) in advance, and the output names each step. No copy runs step 2
/// at its due time, and step 3 never runs. With NATS away, the files are marked and the command
/// fails saying which clustered steps it could not reach.
#[test]
fn cancelling_a_workflow_from_the_command_line_reaches_its_clustered_steps() {
    let Some((mut nats, _js)) = nats("cancelling_a_workflow_from_the_command_line_reaches_its_clustered_steps") else { return };
    let b = Bed::start(&nats.url());
    assert_eq!(get_prefix(b.web, "/clichain?id=x1&delay=4", "x1", WAIT), "x1");
    // Step 1 ends at once (its record done once step 2 is stored); step 2 is published with
    // a 4 s delay.
    until_text(b.copy(0), "/result?id=x1.2", "pending");
    until_text(b.copy(0), "/result?id=x1.1", "done");
    let web_dir = b.web_dir.to_str().unwrap();
    let o = pmnc_limited(&["queue", "cancel", web_dir, "x1"], Duration::from_secs(60));
    assert_eq!(o.code, Some(0), "stdout: {}\nstderr: {}", o.stdout, o.stderr);
    eprintln!("pmnc queue cancel {web_dir} x1:\n{}", o.stdout);
    for line in [
        "cage web: workflow x1: no step waiting here; marked cancelled",
        "cage worker: step x1.1 (clustered) is done: it ended before the cancel",
        "cage worker: step x1.2 (clustered) cancelled (it was pending); it will not run",
        "cage worker: step x1.3 (clustered) not stored yet: cancelled in advance",
    ] {
        assert!(o.stdout.lines().any(|l| l.starts_with(line)), "no line {line:?} in:\n{}", o.stdout);
    }
    assert!(get(b.copy(1), "/result?id=x1.2").text().starts_with("cancelled"), "step 2's record says cancelled");
    assert!(get(b.copy(0), "/result?id=x1.3").text().starts_with("cancelled"), "step 3 has a cancelled record before it exists");
    // At its due time a copy meets step 2, finds it cancelled and acks it without running:
    // the queue's stream is then empty.
    let stream = "PMNC_default_Q_worker_cq";
    let mut left = None;
    assert!(
        until(WAIT, || {
            left = stream_messages(&nats, stream);
            left == Some(0)
        }),
        "stream {stream} still holds {left:?} messages"
    );
    assert!(get(b.copy(1), "/result?id=x1.2").text().starts_with("cancelled"), "still cancelled after its delivery");
    assert_eq!(state_of(b.copy(0), "ran:x1.2"), "nil", "the cancelled step never ran");
    assert_eq!(state_of(b.copy(0), "ran:x1.3"), "nil", "the step after it never ran");
    assert_eq!(count(&db(&b.worker_dir), "SELECT count(*) FROM queue_outbox WHERE id = 'x1.3'"), 0, "step 3 was never stored");
    // Again: nothing changes, and each step says so.
    let o = pmnc_limited(&["queue", "cancel", web_dir, "x1"], Duration::from_secs(60));
    assert_eq!(o.code, Some(0), "stdout: {}\nstderr: {}", o.stdout, o.stderr);
    assert!(o.stdout.contains("cage worker: step x1.2 (clustered) was already cancelled"), "{}", o.stdout);

    // NATS away: the file at PATH (worker's folder this time, whose own queue cq is the
    // clustered one) is marked, and the command fails naming the clustered steps it could not
    // reach.
    assert_eq!(get_prefix(b.web, "/clichain?id=x2&delay=60", "x2", WAIT), "x2");
    until_text(b.copy(0), "/result?id=x2.2", "pending");
    nats.kill();
    let o = pmnc_limited(&["queue", "cancel", b.worker_dir.to_str().unwrap(), "x2"], Duration::from_secs(60));
    assert_eq!(o.code, Some(1), "stdout: {}\nstderr: {}", o.stdout, o.stderr);
    assert!(o.stdout.starts_with("cage worker: workflow x2: "), "stdout: {}\nstderr: {}", o.stdout, o.stderr);
    eprintln!("with NATS away:\n{}{}", o.stdout, o.stderr);
    for said in ["marked cancelled in the files at", "(those marks hold)", "cannot reach NATS", "x2.2", "x2.3"] {
        assert!(o.stderr.contains(said), "no {said:?} in: {}", o.stderr);
    }
    assert_eq!(count(&db(&b.worker_dir), "SELECT count(*) FROM queue_workflows WHERE id = 'x2' AND status = 'cancelled'"), 1);
    assert_eq!(count(&db(&b.web_dir), "SELECT count(*) FROM queue_workflows WHERE id = 'x2' AND status = 'running'"), 1, "web's file is not at PATH");
}

/// Two processes run cage web, each from a folder of its own (so each with its own state file);
/// groups started in both have their members on the clustered queue of worker. A member's part
/// goes to the process whose file holds its join, not to any copy of web: every group completes
/// in the copy that started it, and no part is dropped.
#[test]
fn a_join_in_a_flock_gets_its_parts_from_every_member() {
    let Some((nats, _js)) = nats("a_join_in_a_flock_gets_its_parts_from_every_member") else { return };
    let b = Bed::start(&nats.url());
    // A second copy of web, from another folder: the same cage, another state file.
    let other = b._t.path().join("b/web");
    std::fs::create_dir_all(&other).unwrap();
    for f in ["cage.toml", "http.lua", "mine.lua"] {
        std::fs::copy(b.web_dir.join(f), other.join(f)).unwrap();
    }
    let web2_server = Server::start(&other, &[]);
    let web2 = web2_server.addr("http");
    const GROUPS: usize = 6;
    for g in 1..=GROUPS {
        assert_eq!(get_prefix(b.web, &format!("/group?n=4&id=ga{g}"), "ga", WAIT), format!("ga{g}"));
        assert_eq!(get_prefix(web2, &format!("/group?n=4&id=gb{g}"), "gb", WAIT), format!("gb{g}"));
    }
    for g in 1..=GROUPS {
        for (addr, dir, id) in [(b.web, &b.web_dir, format!("ga{g}")), (web2, &other, format!("gb{g}"))] {
            let r = get(addr, &format!("/wait?id={id}&timeout=30")).text();
            assert!(r.starts_with("done [1,2,3,4] "), "group {id}: {r}");
            assert_eq!(count(&db(dir), &format!("SELECT count(*) FROM queue_join_parts WHERE join_id = '{id}'")), 4, "group {id}: one part per member");
        }
    }
    // Parts went to the file that holds each join, never to the other copy.
    for (dir, other_prefix) in [(&b.web_dir, "gb"), (&other, "ga")] {
        assert_eq!(count(&db(dir), &format!("SELECT count(*) FROM queue_join_parts WHERE join_id LIKE '{other_prefix}%'")), 0);
    }
    // The holder away while its members end: their parts wait in worker's outbox (the other
    // copy of web does not take them), and reach the holder once it is back. The members are
    // due 5 s later, past the holder's stop: with 1 s, a stop slowed by a loaded machine (CI
    // runs the suites side by side) let a member end while the holder was still draining and
    // took its part.
    let mut web2_server = web2_server;
    assert_eq!(get(web2, "/group?n=3&id=late&delay=5").text(), "late");
    assert_eq!(web2_server.terminate(Duration::from_secs(15)), Some(0));
    let waiting = || count(&db(&b.worker_dir), "SELECT count(*) FROM queue_outbox WHERE id LIKE 'late.%:join' AND status = 'pending' AND attempts > 0");
    assert!(until(WAIT, || waiting() == 3), "{} parts wait for their holder", waiting());
    assert_eq!(count(&db(&b.web_dir), "SELECT count(*) FROM queue_join_parts WHERE join_id = 'late'"), 0);
    let back = Server::start(&other, &[]);
    let r = get(back.addr("http"), "/wait?id=late&timeout=60").text();
    assert!(r.starts_with("done [1,2,3] "), "{r}");
}
