//! Workflows on durable calls (issue 18, decision 149), through the real binary on temp cage
//! folders: chains passing values along across cages (in one process and across two over a
//! private nats-server), retries inside a chain, on_error when a step goes to dead letters,
//! every chain completing exactly once per step after kill -9, groups and chords, cancelling a
//! workflow mid-way, its status, and the input that is refused at once.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
#[path = "queue_app/support.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::nats::Nats;
use common::*;
use support::*;

/// web's HTTP handler: starts workflows from query parameters and reads their results.
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
  return ("%s %s %s"):format(r.status, show(r.value), tostring(r.error))
end
local function w(cage, queue) return wf.step(cage, { queue = queue or (cage == "web" and "own" or "retry") }) end
local function record() return w("web").mine.record() end
function M.handle(request)
  local q, p = request.query, request.path
  if p == "/chain3" then
    -- (n + 1) * 2 + 100, over worker, web, worker
    return try(function()
      return wf.chain({ w("worker").work.add(tonumber(q.n), 1), w("web").mine.double(), w("worker").work.add(100) }, { id = q.id })
    end)
  elseif p == "/flaky" then
    return try(function() return wf.chain({ w("worker").work.flaky(q.arg), w("web").mine.echo() }, { id = q.id }) end)
  elseif p == "/declined" then
    return try(function()
      return wf.chain({ w("worker").work.add(1, 1), w("worker").work.declined(), w("worker").work.never() }, { id = q.id, on_error = record() })
    end)
  elseif p == "/many" then
    -- q.n chains of three short steps each, ids m<i>: worker, web, worker.
    for i = 1, tonumber(q.n) do
      wf.chain({ w("worker").work.inc(0), w("web").mine.inc(), w("worker").work.finish("m" .. i) }, { id = "m" .. i })
    end
    return "started"
  elseif p == "/group" then
    return try(function()
      local members = {}
      for i = 1, tonumber(q.n) do
        if i % 2 == 0 then members[i] = w("web").mine.work_or_mine(i) else members[i] = w("worker").work.work_or_mine(i) end
      end
      return wf.group(members, { id = q.id })
    end)
  elseif p == "/group_bad" then
    return try(function()
      return wf.group({ w("worker").work.add(1, 2), w("worker").work.declined(), w("web").mine.double(5) }, { id = q.id })
    end)
  elseif p == "/chord" then
    return try(function()
      return wf.chord({ w("worker").work.add(1, 1), w("web").mine.double(10), w("worker").work.add(3, 4) }, w("web").mine.sum(1000), { id = q.id, on_error = record() })
    end)
  elseif p == "/chord_bad" then
    return try(function()
      return wf.chord({ w("worker").work.add(1, 1), w("worker").work.declined() }, w("web").mine.sum(0), { id = q.id, on_error = record() })
    end)
  elseif p == "/slow" then
    -- A chain whose second step waits; cancelled while it waits.
    return try(function()
      return wf.chain({ w("worker").work.add(1, 1), wf.step("worker", { queue = "retry", delay = tonumber(q.delay) or 2 }).work.add(1), w("web").mine.double() }, { id = q.id })
    end)
  elseif p == "/napchain" then
    return try(function() return wf.chain({ w("worker").work.nap(7), w("web").mine.double() }, { id = q.id }) end)
  elseif p == "/cqchain" then
    -- Two steps on web's clustered queue cq: 1 * 2, then doubled again.
    return try(function() return wf.chain({ wf.step("web", { queue = "cq" }).mine.double(1), wf.step("web", { queue = "cq" }).mine.double() }, { id = q.id }) end)
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
    local ok, r = pcall(pmnc.calls.wait, q.id, tonumber(q.timeout) or 10)
    if not ok then return "ERR " .. tostring(r) end
    return status(r)
  elseif p == "/state" then
    return tostring(pmnc.state.get(q.key))
  elseif p == "/bad" then
    local cases = {
      unknown_option = function() return w("worker").work.add(1) and wf.step("worker", { queue = "retry", colour = "red" }).work.add(1) end,
      step_id = function() return wf.step("worker", { queue = "retry", id = "x" }).work.add(1) end,
      no_queue = function() return wf.step("worker", {}).work.add(1) end,
      unknown_queue = function() return wf.step("worker", { queue = "nope" }).work.add(1) end,
      private = function() return wf.step("worker", { queue = "retry" }).work._add(1) end,
      not_a_step = function() return wf.chain({ w("worker").work.add(1), "add" }) end,
      not_a_list = function() return wf.chain("add") end,
      empty = function() return wf.chain({}) end,
      too_many = function()
        local s = w("worker").work.add(1)
        local list = {}
        for i = 1, 1001 do list[i] = s end
        return wf.chain(list)
      end,
      long_id = function() return wf.chain({ w("worker").work.add(1) }, { id = ("x"):rep(201) }) end,
      chain_option = function() return wf.chain({ w("worker").work.add(1) }, { colour = "red" }) end,
      group_on_error = function() return wf.group({ w("worker").work.add(1) }, { on_error = record() }) end,
      bad_on_error = function() return wf.chain({ w("worker").work.add(1) }, { on_error = "record" }) end,
      chord_body = function() return wf.chord({ w("worker").work.add(1) }, nil) end,
    }
    return try(cases[q.case])
  end
end
return M
"#;

/// web's own module: steps that run in cage web.
const MINE: &str = r#"
local M = {}
function M.double(x) return x * 2 end
function M.echo(x) return x end
function M.inc(x)
  pmnc.state.set("step:" .. pmnc.request.call_id, true)
  return x + 1
end
function M.record(info)
  pmnc.state.set("on_error:" .. info.workflow, info.step .. " | " .. info.error)
  return "noted"
end
function M.work_or_mine(i) return "web" .. i end
function M.sum(results, base)
  local s = base
  for _, v in ipairs(results) do s = s + v end
  pmnc.state.set("sum", s)
  return s
end
return M
"#;

/// worker's module.
const WORK: &str = r#"
local M = {}
function M.add(a, b) return a + b end
function M.flaky(x)
  local a = pmnc.request.parameters.attempt
  if a < 3 then error("flaky attempt " .. a) end
  return x .. ":ok@" .. a
end
function M.declined() pmnc.calls.fail_permanently("card declined") end
function M.never(x)
  pmnc.state.set("never", true)
  return x
end
function M.inc(x)
  pmnc.state.set("step:" .. pmnc.request.call_id, true)
  pmnc.sleep(0.002)
  return x + 1
end
function M.finish(n, wf)
  pmnc.state.set("step:" .. pmnc.request.call_id, true)
  pmnc.state.set("done:" .. wf, "n=" .. (n + 1))
  return n + 1
end
function M.work_or_mine(i) return "worker" .. i end
function M.nap(x)
  pmnc.sleep(0.5)
  return x
end
return M
"#;

const FAST: &str = "[queues.retry.backoff]\ninitial = \"10ms\"\nmultiplier = 1\njitter = 0\n";

/// web (HTTP, queue own) and worker (queue retry) under `root`; `extra` is added to both
/// cage.toml files (a [cluster] table).
fn lay_out(t: &Tree, web: &str, worker: &str, extra: &str) -> (PathBuf, PathBuf) {
    t.write(
        &format!("{web}/cage.toml"),
        &format!("{}\n[queues.own]\n[queues.own.backoff]\ninitial = \"10ms\"\nmultiplier = 1\njitter = 0\n{extra}", http_cage_toml("")),
    );
    t.write(&format!("{web}/http.lua"), HTTP);
    t.write(&format!("{web}/mine.lua"), MINE);
    t.write(&format!("{worker}/cage.toml"), &format!("[queues.retry]\n{FAST}{extra}"));
    t.write(&format!("{worker}/work.lua"), WORK);
    (t.path().join(web), t.path().join(worker))
}

/// Both cages in one process (an app folder).
fn one_process() -> (Tree, Server, std::net::SocketAddr, PathBuf, PathBuf) {
    let t = Tree::new();
    let (web, worker) = lay_out(&t, "app/cages/web", "app/cages/worker", "");
    let s = Server::start(&t.path().join("app"), &[]);
    let addr = s.addr("http");
    (t, s, addr, web, worker)
}

fn state_text(cage: &Path, key: &str) -> Option<String> {
    let c = db(cage);
    let bytes: Option<Vec<u8>> = c.query_row("SELECT value FROM state WHERE key = ?1", [key], |r| r.get(0)).ok();
    bytes.map(|b| String::from_utf8_lossy(&b).to_string())
}

const WAIT: Duration = Duration::from_secs(20);

#[test]
fn a_chain_across_two_cages_passes_values_along_and_its_last_step_can_be_waited_for() {
    let (_t, _s, addr, web, worker) = one_process();
    assert_eq!(get(addr, "/chain3?n=4&id=c1").text(), "c1");
    // (4 + 1) * 2 + 100
    assert_eq!(get(addr, "/wait?id=c1.3").text(), "done 110 nil");
    assert_eq!(get(addr, "/result?id=c1.1").text(), "done 5 nil");
    assert_eq!(get(addr, "/result?id=c1.2").text(), "done 10 nil");
    assert_eq!(get(addr, "/status?id=c1").text(), "done c1.1=done c1.2=done c1.3=done");
    // Each step is an ordinary durable call of its cage, stored with its workflow.
    let (w, s) = (db(&worker), db(&web));
    assert_eq!(count(&w, "SELECT count(*) FROM queue_calls WHERE workflow = 'c1' AND status = 'done'"), 2);
    assert_eq!(count(&s, "SELECT count(*) FROM queue_calls WHERE workflow = 'c1' AND status = 'done'"), 1);
    assert_eq!(count(&s, "SELECT count(*) FROM queue_workflows WHERE id = 'c1' AND kind = 'chain'"), 1);
    // The same workflow id again stores nothing new: every step id is de-duplicated.
    assert_eq!(get(addr, "/chain3?n=7&id=c1").text(), "c1");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(get(addr, "/result?id=c1.3").text(), "done 110 nil");
    // Without an id, a new one.
    let id = get(addr, "/chain3?n=0").text();
    assert!(!id.is_empty() && !id.starts_with("ERR"), "{id}");
    assert_eq!(get(addr, &format!("/wait?id={id}.3")).text(), "done 102 nil");
}

#[test]
fn a_step_that_fails_twice_is_retried_and_the_chain_goes_on() {
    let (_t, _s, addr, _web, _worker) = one_process();
    assert_eq!(get(addr, "/flaky?arg=a&id=f1").text(), "f1");
    assert_eq!(get(addr, "/wait?id=f1.2").text(), "done a:ok@3 nil");
    let r = get(addr, "/result?id=f1.1").text();
    assert_eq!(r, "done a:ok@3 nil");
}

#[test]
fn a_step_that_fails_permanently_runs_on_error_and_no_later_step() {
    let (_t, _s, addr, web, worker) = one_process();
    assert_eq!(get(addr, "/declined?id=d1").text(), "d1");
    let noted = get_prefix(addr, "/state?key=on_error:d1", "d1.2", WAIT);
    assert!(noted.starts_with("d1.2 | worker.work.declined: card declined (failed permanently after 1 attempt"), "{noted}");
    assert_eq!(get(addr, "/wait?id=d1.on_error").text(), "done noted nil");
    assert!(get(addr, "/result?id=d1.2").text().starts_with("dead nil worker.work.declined: card declined"));
    assert_eq!(get(addr, "/result?id=d1.3").text(), "none", "the step after a dead one is never stored");
    assert_eq!(state_text(&worker, "never"), None);
    let st = get(addr, "/status?id=d1").text();
    assert_eq!(st, "dead d1.1=done d1.2=dead d1.on_error=done");
    assert_eq!(count(&db(&web), "SELECT count(*) FROM queue_calls WHERE id = 'd1.on_error' AND workflow = 'd1'"), 1);
}

#[test]
fn bad_input_is_refused_at_once() {
    let (_t, _s, addr, web, worker) = one_process();
    let bad = |case: &str| get(addr, &format!("/bad?case={case}")).text();
    let expect = [
        ("unknown_option", "pmnc.workflow.step: calling worker.work.add: unknown option \"colour\""),
        ("step_id", "option id is not taken: a step's id is derived from its workflow's"),
        ("no_queue", "durable calls need option queue"),
        ("unknown_queue", "cage worker has no queue \"nope\" (its queues: retry"),
        ("private", "work._add is private"),
        ("not_a_step", "pmnc.workflow.chain: step 2 is not a step (make one with pmnc.workflow.step(cage, options).module.fn(...)), got add"),
        ("not_a_list", "pmnc.workflow.chain: expected a list of steps"),
        ("empty", "pmnc.workflow.chain: the list of steps is empty"),
        ("too_many", "pmnc.workflow.chain: 1001 steps, over the limit of 1000"),
        ("long_id", "pmnc.workflow.chain: option id must be 1 to 200 bytes (its steps' ids add to it), got 201"),
        ("chain_option", "pmnc.workflow.chain: unknown option colour (known: id, on_error)"),
        ("group_on_error", "pmnc.workflow.group: unknown option on_error (known: id)"),
        ("bad_on_error", "pmnc.workflow.chain: option on_error is not a step"),
        ("chord_body", "pmnc.workflow.chord: its body is not a step"),
    ];
    for (case, want) in expect {
        let got = bad(case);
        assert!(got.starts_with("ERR ") && got.contains(want), "{case}: {got}");
    }
    std::thread::sleep(Duration::from_millis(200));
    for cage in [&web, &worker] {
        assert_eq!(count(&db(cage), "SELECT count(*) FROM queue_calls"), 0, "nothing stored");
        assert_eq!(count(&db(cage), "SELECT count(*) FROM queue_workflows"), 0, "nothing stored");
    }
}

/// Kill -9 while 200 chains of three steps (worker, web, worker) run; after a restart every chain
/// completes, every step ran exactly once on the state of its cage, and nothing is missing.
#[test]
fn chains_survive_kill_9_and_complete_exactly_once_per_step() {
    let t = Tree::new();
    let (web, worker) = lay_out(&t, "app/cages/web", "app/cages/worker", "");
    let app = t.path().join("app");
    let mut s = Server::start(&app, &[]);
    let addr = s.addr("http");
    const N: usize = 200;
    assert_eq!(get(addr, &format!("/many?n={N}")).text(), "started");
    let done = || count(&db(&worker), "SELECT count(*) FROM state WHERE key LIKE 'done:%'") as usize;
    assert!(until(WAIT, || done() >= 20), "chains are running");
    s.signal(9);
    s.wait_exit(WAIT).expect("pmnc exits on kill -9");
    let at_kill = done();
    assert!(at_kill < N, "the kill came after every chain ended ({at_kill}); nothing was tested");
    let _s = Server::start(&app, &[]);
    assert!(until(Duration::from_secs(60), || done() == N), "{} of {N} chains done after the restart", done());
    let (w, b) = (db(&worker), db(&web));
    for i in 1..=N {
        let v = state_text(&worker, &format!("done:m{i}")).unwrap_or_default();
        assert!(v.ends_with("n=3"), "chain m{i} passed its value along: {v:?}");
    }
    // Exactly once per step: one done call per step id, and one state mark per call (marks of
    // attempts cut short by the kill were never committed).
    assert_eq!(count(&w, "SELECT count(*) FROM queue_calls WHERE workflow LIKE 'm%' AND status = 'done'"), 2 * N as i64);
    assert_eq!(count(&b, "SELECT count(*) FROM queue_calls WHERE workflow LIKE 'm%' AND status = 'done'"), N as i64);
    assert_eq!(count(&w, "SELECT count(*) FROM queue_calls WHERE workflow LIKE 'm%'"), 2 * N as i64, "no step stored twice or left behind");
    assert_eq!(count(&w, "SELECT count(*) FROM state WHERE key LIKE 'step:m%'"), 2 * N as i64);
    assert_eq!(count(&b, "SELECT count(*) FROM state WHERE key LIKE 'step:m%'"), N as i64);
    for (cage, k) in [(&w, 1), (&b, 2), (&w, 3)] {
        assert_eq!(count(cage, &format!("SELECT count(*) FROM queue_calls WHERE id LIKE 'm%.{k}' AND status = 'done'")), N as i64, "step {k}");
    }
}

/// A chain whose steps alternate between two processes over NATS: each next step goes through
/// the outbox of the cage that ran the one before, and its end reaches the sender's waits.
#[test]
fn a_chain_across_two_processes_passes_values_along() {
    let Some(nats) = Nats::start("a_chain_across_two_processes_passes_values_along", "") else {
        return;
    };
    let t = Tree::new();
    let cluster = format!("\n[cluster]\nurl = \"{}\"\nheartbeat = \"200ms\"\n", nats.url());
    let (web, worker) = lay_out(&t, "web", "worker", &cluster);
    let _worker = Server::start(&worker, &[]);
    let s = Server::start(&web, &[]);
    let addr = s.addr("http");
    let first = get_prefix(addr, "/chain3?n=1&id=x1", "x1", WAIT);
    assert_eq!(first, "x1");
    assert_eq!(get(addr, "/wait?id=x1.3&timeout=20").text(), "done 104 nil");
    assert_eq!(count(&db(&worker), "SELECT count(*) FROM queue_calls WHERE workflow = 'x1' AND status = 'done'"), 2);
    assert_eq!(count(&db(&web), "SELECT count(*) FROM queue_calls WHERE workflow = 'x1' AND status = 'done'"), 1);
    // The sender marks a row forwarded once the target's accept answered, which can be after
    // the step already ran there.
    let forwarded = || count(&db(&web), "SELECT count(*) FROM queue_outbox WHERE workflow = 'x1' AND status = 'forwarded'");
    assert!(until(WAIT, || forwarded() == 2), "{} steps forwarded", forwarded());
    // A step that fails permanently in the other process: on_error runs here.
    assert_eq!(get(addr, "/declined?id=x2").text(), "x2");
    let noted = get_prefix(addr, "/state?key=on_error:x2", "x2.2", WAIT);
    assert!(noted.contains("card declined"), "{noted}");
    assert_eq!(state_text(&worker, "never"), None);
    // A group whose members run in both processes: the parts of the other process reach the
    // join here through its outbox (`_queue.join`).
    assert_eq!(get(addr, "/group?n=3&id=xg").text(), "xg");
    assert_eq!(get(addr, "/wait?id=xg&timeout=20").text(), r#"done ["worker1","web2","worker3"] nil"#);
    let w = db(&worker);
    let forwarded = || count(&w, "SELECT count(*) FROM queue_outbox WHERE id IN ('xg.1:join', 'xg.3:join') AND status = 'forwarded'");
    assert!(until(WAIT, || forwarded() == 2), "{} parts forwarded", forwarded());
}

#[test]
fn a_group_gives_its_results_in_member_order_and_a_chord_hands_them_to_its_body() {
    let (_t, _s, addr, web, _worker) = one_process();
    assert_eq!(get(addr, "/group?n=5&id=g1").text(), "g1");
    assert_eq!(get(addr, "/wait?id=g1").text(), r#"done ["worker1","web2","worker3","web4","worker5"] nil"#);
    assert_eq!(get(addr, "/result?id=g1").text(), r#"done ["worker1","web2","worker3","web4","worker5"] nil"#);
    assert_eq!(get(addr, "/status?id=g1").text(), "done g1.1=done g1.2=done g1.3=done g1.4=done g1.5=done");
    // A chord: its body gets [2, 20, 7] first, then its own argument.
    assert_eq!(get(addr, "/chord?id=h1").text(), "h1");
    assert_eq!(get(addr, "/wait?id=h1").text(), "done 1029 nil");
    assert_eq!(get(addr, "/result?id=h1.body").text(), "done 1029 nil");
    assert_eq!(get(addr, "/state?key=sum").text(), "1029");
    assert_eq!(get(addr, "/status?id=h1").text(), "done h1.1=done h1.2=done h1.3=done h1.body=done");
    assert_eq!(get(addr, "/state?key=on_error:h1").text(), "nil");
    let w = db(&web);
    assert_eq!(count(&w, "SELECT count(*) FROM queue_join_parts WHERE join_id = 'h1'"), 3, "one part per member");
    assert_eq!(count(&w, "SELECT count(*) FROM queue_joins WHERE id IN ('g1', 'h1') AND status = 'done'"), 2);
}

#[test]
fn a_dead_member_makes_the_group_dead_and_a_chord_runs_on_error_instead_of_its_body() {
    let (_t, _s, addr, _web, _worker) = one_process();
    assert_eq!(get(addr, "/group_bad?id=gb").text(), "gb");
    let r = get(addr, "/wait?id=gb").text();
    assert!(r.starts_with("dead nil member gb.2 is dead: worker.work.declined: card declined (failed permanently"), "{r}");
    // The other members still run; their results are kept, the group stays dead.
    assert_eq!(get_prefix(addr, "/result?id=gb.1", "done", WAIT), "done 3 nil");
    assert_eq!(get_prefix(addr, "/result?id=gb.3", "done", WAIT), "done 10 nil");
    std::thread::sleep(Duration::from_millis(200));
    assert!(get(addr, "/result?id=gb").text().starts_with("dead nil member gb.2 is dead"));
    assert!(get(addr, "/status?id=gb").text().starts_with("dead gb.1=done gb.2=dead gb.3=done"));

    assert_eq!(get(addr, "/chord_bad?id=hb").text(), "hb");
    let r = get(addr, "/wait?id=hb").text();
    assert!(r.starts_with("dead nil member hb.2 is dead"), "{r}");
    let noted = get_prefix(addr, "/state?key=on_error:hb", "hb.2 | ", WAIT);
    assert!(noted.contains("card declined"), "{noted}");
    assert_eq!(get(addr, "/wait?id=hb.on_error").text(), "done noted nil");
    assert_eq!(get(addr, "/result?id=hb.body").text(), "none", "the body never runs");
    assert_eq!(get(addr, "/state?key=sum").text(), "nil");
}

#[test]
fn a_cancelled_chain_stores_no_later_step_and_status_and_show_say_so() {
    let (t, _s, addr, _web, _worker) = one_process();
    let app = t.path().join("app");
    let app = app.to_str().unwrap();
    // Step 1 runs at once, step 2 waits 3 s: the chain is cancelled while it waits.
    assert_eq!(get(addr, "/slow?id=s1&delay=3").text(), "s1");
    get_prefix(addr, "/result?id=s1.2", "pending", WAIT);
    assert_eq!(get(addr, "/status?id=s1").text(), "running s1.1=done s1.2=pending");
    assert_eq!(get(addr, "/cancel?id=s1").text(), "true running workflow s1 cancelled: 1 step cancelled (s1.2); no later step will be stored here");
    assert!(get(addr, "/result?id=s1.2").text().starts_with("cancelled nil cancelled"));
    assert_eq!(get(addr, "/wait?id=s1.2").text(), "cancelled nil cancelled");
    assert_eq!(get(addr, "/status?id=s1").text(), "cancelled s1.1=done s1.2=cancelled");
    assert_eq!(get(addr, "/cancel?id=s1").text(), "false cancelled workflow s1 was already cancelled");
    assert_eq!(get(addr, "/cancel?id=nowhere").text().split(' ').next(), Some("false"));
    std::thread::sleep(Duration::from_millis(3500));
    assert_eq!(get(addr, "/result?id=s1.3").text(), "none", "no later step was stored");
    assert_eq!(get(addr, "/status?id=s1").text(), "cancelled s1.1=done s1.2=cancelled");

    // From the command line, on the app folder.
    assert_eq!(get(addr, "/slow?id=s2&delay=60").text(), "s2");
    get_prefix(addr, "/result?id=s2.2", "pending", WAIT);
    let o = pmnc(&["queue", "show", app, "s2"]);
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    assert!(o.stdout.contains("workflow:  s2") && o.stdout.contains("kind:      chain, started by cage web"), "{}", o.stdout);
    assert!(o.stdout.contains("status:    running"), "{}", o.stdout);
    assert!(o.stdout.lines().any(|l| l.starts_with("step") && l.contains("s2.1") && l.contains("done")), "{}", o.stdout);
    assert!(o.stdout.lines().any(|l| l.starts_with("step") && l.contains("s2.2") && l.contains("pending") && l.contains("cage worker")), "{}", o.stdout);
    let o = pmnc(&["queue", "cancel", app, "s2"]);
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    assert!(o.stdout.contains("cage worker: workflow s2: 1 step cancelled (s2.2)"), "{}", o.stdout);
    assert!(o.stdout.contains("cage web: workflow s2: no step waiting here"), "{}", o.stdout);
    assert!(get(addr, "/result?id=s2.2").text().starts_with("cancelled"));
    assert_eq!(get(addr, "/status?id=s2").text(), "cancelled s2.1=done s2.2=cancelled");
    let o = pmnc(&["queue", "show", app, "s2"]);
    assert!(o.stdout.contains("status:    cancelled"), "{}", o.stdout);

    // Cancelled while its first step runs: that attempt's success is dropped, and the step
    // after it is never stored.
    assert_eq!(get(addr, "/napchain?id=n1").text(), "n1");
    get_prefix(addr, "/result?id=n1.1", "running", WAIT);
    assert_eq!(get(addr, "/cancel?id=n1").text(), "true running workflow n1 cancelled: 1 step cancelled (n1.1); no later step will be stored here");
    let r = get_prefix(addr, "/result?id=n1.1", "cancelled nil cancelled while attempt 1 ran", WAIT);
    assert_eq!(r, "cancelled nil cancelled while attempt 1 ran; it succeeded; its result and state writes were dropped");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(get(addr, "/result?id=n1.2").text(), "none");
    assert_eq!(get(addr, "/status?id=n1").text(), "cancelled n1.1=cancelled");
}

/// A step naming a clustered queue (store = "cluster") of this cage is taken (decision 152): it
/// is stored through the outbox and published to the queue's stream, and runs.
#[test]
fn a_step_on_a_clustered_queue_of_its_own_cage_runs() {
    let store = tempfile::tempdir().unwrap();
    let config = format!("jetstream {{\n  store_dir: \"{}\"\n}}\n", store.path().display());
    let Some(nats) = Nats::start("a_step_on_a_clustered_queue_of_its_own_cage_runs", &config) else {
        return;
    };
    let t = Tree::new();
    let extra = format!("\n[queues.cq]\nstore = \"cluster\"\n\n[cluster]\nurl = \"{}\"\nheartbeat = \"200ms\"\n", nats.url());
    let (web, _) = lay_out(&t, "web", "worker", &extra);
    let s = Server::start(&web, &[]);
    let addr = s.addr("http");
    assert_eq!(get(addr, "/cqchain?id=q1").text(), "q1");
    assert_eq!(get(addr, "/wait?id=q1.2&timeout=20").text(), "done 4 nil");
    assert_eq!(get(addr, "/result?id=q1.1").text(), "done 2 nil");
    let forwarded = || count(&db(&web), "SELECT count(*) FROM queue_outbox WHERE id = 'q1.1' AND workflow = 'q1' AND status = 'forwarded'");
    assert!(until(WAIT, || forwarded() == 1), "step q1.1 went through the outbox");
}
