//! The monitor page's clustered queues and workflows (docs/monitoring.md, "Clustered queues and
//! workflows"), through the real binary: each copy of the flock with the calls it runs now, the
//! stream's figures, `pmnc queue ls` saying the same, and the latest workflows of the process's
//! cages with their kind, status and steps.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use common::nats::Nats;
use common::*;

const HTTP: &str = r#"
local M = {}
function M.handle(request)
  local q, p = request.query, request.path
  if p == "/burst" then
    for i = tonumber(q.from), tonumber(q.to) do
      local ok, r = pcall(function() return pmnc("worker", { queue = "jobs", id = "h" .. i }).work.hold(i) end)
      if not ok then return "ERR at " .. i .. ": " .. tostring(r) end
    end
    return "ok"
  elseif p == "/go" then
    pmnc.state.set("go", true)
    return "ok"
  elseif p == "/result" then
    local r = pmnc.calls.result(q.id)
    return r and r.status or "none"
  end
  return "no such path " .. p
end
return M
"#;

/// Holds its call until /go: the calls stay running while the test looks.
const WORK: &str = r#"
local M = {}
function M.hold(i)
  while not pmnc.state.get("go") do pmnc.sleep(0.05) end
  return i
end
return M
"#;

fn nats(test: &str) -> Option<(Nats, tempfile::TempDir)> {
    let store = tempfile::tempdir().unwrap();
    let config = format!("jetstream {{\n  store_dir: \"{}\"\n}}\n", store.path().display());
    Nats::start(test, &config).map(|n| (n, store))
}

/// worker/jobs of `view` (the body of /api/queues or /status).
fn jobs(view: &serde_json::Value) -> serde_json::Value {
    view["clustered_queues"].as_array().and_then(|qs| qs.iter().find(|q| q["cage"] == "worker" && q["queue"] == "jobs").cloned()).unwrap_or_default()
}

/// The running calls of each live copy of worker/jobs, sorted, as the monitor at `m` shows them.
fn running(m: SocketAddr) -> Vec<u64> {
    let q = jobs(&json_body(&get(m, "/api/queues")));
    let mut r: Vec<u64> =
        q["copies"].as_array().map(|cs| cs.iter().filter(|c| c["up"] == true).filter_map(|c| c["running"].as_u64()).collect()).unwrap_or_default();
    r.sort();
    r
}

#[test]
fn the_monitor_and_queue_ls_show_each_copys_running_calls() {
    let Some((nats, _js)) = nats("the_monitor_and_queue_ls_show_each_copys_running_calls") else { return };
    let t = Tree::new();
    // concurrency 2 per copy: four held calls are two on each copy.
    t.write(
        "worker/cage.toml",
        &format!(
            "{}\n[queues.jobs]\nstore = \"cluster\"\nack_wait = \"2s\"\nconcurrency = 2\n\n[cluster]\nurl = \"{}\"\nheartbeat = \"200ms\"\n",
            http_cage_toml(""),
            nats.url()
        ),
    );
    t.write("worker/http.lua", HTTP);
    t.write("worker/work.lua", WORK);
    let dir: PathBuf = t.path().join("worker");
    let mut a = Server::start(&dir, &[]);
    let mut b = Server::start(&dir, &[]);
    let (ma, mb) = (monitor_addr(&mut a), monitor_addr(&mut b));
    assert!(until(Duration::from_secs(15), || running(ma) == vec![0, 0] && running(mb) == vec![0, 0]), "{:?} {:?}", running(ma), running(mb));
    let addr = a.addr("http");
    assert_eq!(get(addr, "/burst?from=1&to=4").text(), "ok");
    // Each copy's heartbeat says 2 running; both monitors show both copies.
    assert!(until(Duration::from_secs(15), || running(ma) == vec![2, 2] && running(mb) == vec![2, 2]), "{:?} {:?}", running(ma), running(mb));
    // The stream's figures (read every 2 s in the background): 4 held, none waiting, and the
    // oldest call's age.
    let mut q = serde_json::Value::Null;
    assert!(
        until(Duration::from_secs(10), || {
            q = jobs(&json_body(&get(ma, "/api/queues")));
            q["held"] == 4 && q["waiting"] == 0
        }),
        "{q}"
    );
    assert!(q["oldest_age_seconds"].as_f64().is_some_and(|a| (0.0..60.0).contains(&a)), "{q}");
    assert_eq!(q["running"], 4, "{q}");
    let copies = q["copies"].as_array().unwrap();
    assert_eq!(copies.len(), 2, "{q}");
    assert_eq!(copies.iter().filter(|c| c["this"] == true).count(), 1, "this process's copy is marked: {q}");
    assert!(copies.iter().all(|c| c["pid"].as_u64().is_some_and(|p| p as u32 == a.child.id() || p as u32 == b.child.id())), "{q}");
    // /status carries the same for the page, and the page has the table.
    assert_eq!(jobs(&json_body(&get(ma, "/status")))["copies"].as_array().map(Vec::len), Some(2));
    assert!(get(ma, "/").text().contains("id=\"clustered\""));
    assert!(get(ma, "/assets/monitor.js").text().contains("clustered_queues"));
    // pmnc queue ls: the stream's figures and a line per copy.
    let out = pmnc_limited(&["queue", "ls", dir.to_str().unwrap()], Duration::from_secs(30));
    assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("0 waiting, 4 held"), "{}", out.stdout);
    assert!(out.stdout.contains(", oldest "), "{}", out.stdout);
    for pid in [a.child.id(), b.child.id()] {
        let line = out.stdout.lines().find(|l| l.contains(&format!("pid {pid},"))).unwrap_or_else(|| panic!("no line for pid {pid}:\n{}", out.stdout));
        assert!(line.trim_start().starts_with("copy ") && line.ends_with(": 2 running") && line.contains(", up)"), "{line}");
    }
    // Released: every call ends and the copies say 0 running.
    assert_eq!(get(addr, "/go").text(), "ok");
    assert!(until(Duration::from_secs(15), || (1..=4).all(|i| get(addr, &format!("/result?id=h{i}")).text() == "done")));
    assert!(until(Duration::from_secs(10), || running(ma) == vec![0, 0]), "{:?}", running(ma));
    // A copy killed stops beating: after the heartbeat timeout it shows down.
    let b_pid = b.child.id();
    unsafe_kill(b_pid as i32, 9);
    let _ = b.child.wait();
    let down = until(Duration::from_secs(10), || {
        let q = jobs(&json_body(&get(ma, "/api/queues")));
        q["copies"].as_array().is_some_and(|cs| cs.iter().any(|c| c["pid"] == b_pid && c["up"] == false))
    });
    assert!(down, "the killed copy still shows up: {}", jobs(&json_body(&get(ma, "/api/queues"))));
}

/// web's handler: starts workflows.
const WEB: &str = r#"
local M = {}
local wf = pmnc.workflow
local function s() return wf.step("web", { queue = "own" }) end
function M.handle(request)
  local q, p = request.query, request.path
  local ok, r = pcall(function()
    if p == "/chain" then return wf.chain({ s().work.add(1, 1), s().work.add(2) }, { id = q.id }) end
    if p == "/group" then return wf.group({ s().work.add(1, 1), s().work.add(2, 2), s().work.add(3, 3) }, { id = q.id }) end
    if p == "/chord" then return wf.chord({ s().work.add(1, 1), s().work.add(2, 2) }, s().work.sum(0), { id = q.id }) end
    if p == "/broken" then return wf.chain({ s().work.add(1, 1), s().work.declined(), s().work.add(5) }, { id = q.id }) end
    return "no such path " .. p
  end)
  if ok then return tostring(r) end
  return "ERR " .. tostring(r)
end
return M
"#;

const WEB_WORK: &str = r#"
local M = {}
function M.add(a, b) return a + b end
function M.sum(results, base)
  local s = base
  for _, v in ipairs(results) do s = s + v end
  return s
end
function M.declined() pmnc.calls.fail_permanently("card declined") end
return M
"#;

#[test]
fn the_monitor_lists_the_latest_workflows_with_their_kind_status_and_steps() {
    let t = Tree::new();
    t.write("web/cage.toml", &format!("{}\n[queues.own]\n[queues.own.backoff]\ninitial = \"10ms\"\nmultiplier = 1\njitter = 0\n", http_cage_toml("")));
    t.write("web/http.lua", WEB);
    t.write("web/work.lua", WEB_WORK);
    let mut s = Server::start(&t.path().join("web"), &[]);
    let addr = s.addr("http");
    let monitor = monitor_addr(&mut s);
    for (path, id) in [("/chain", "wc"), ("/group", "wg"), ("/chord", "wd"), ("/broken", "wb")] {
        assert_eq!(get(addr, &format!("{path}?id={id}")).text(), id);
    }
    // (kind, status, steps done, steps in all) of each, once every one has ended.
    let want = [("wc", "chain", "done", 2, 2), ("wg", "group", "done", 3, 3), ("wd", "chord", "done", 3, 3), ("wb", "chain", "dead", 1, 3)];
    let mut view = serde_json::Value::Null;
    let row = |view: &serde_json::Value, id: &str| view["workflows"].as_array().and_then(|w| w.iter().find(|w| w["id"] == id).cloned()).unwrap_or_default();
    let ended = until(Duration::from_secs(20), || {
        view = json_body(&get(monitor, "/api/queues"));
        want.iter().all(|(id, _, status, _, _)| row(&view, id)["status"] == *status)
    });
    assert!(ended, "{view}");
    for (id, kind, status, done, total) in want {
        let r = row(&view, id);
        assert_eq!(
            (r["kind"].as_str(), r["status"].as_str(), r["steps_done"].as_u64(), r["steps_total"].as_u64()),
            (Some(kind), Some(status), Some(done), Some(total)),
            "{id}: {r}"
        );
        assert_eq!(r["cage"], "web");
        assert!(r["started"].as_f64().is_some_and(|t| t > 1.7e9), "{r}");
    }
    // Newest first.
    let ids: Vec<&str> = view["workflows"].as_array().unwrap().iter().filter_map(|w| w["id"].as_str()).collect();
    assert_eq!(ids, ["wb", "wd", "wg", "wc"], "{view}");
    // The page has the table, and /status carries the rows it draws.
    assert!(get(monitor, "/").text().contains("id=\"workflows\""));
    assert_eq!(json_body(&get(monitor, "/status"))["workflows"].as_array().map(Vec::len), Some(4));
    // Bounded: 60 more chains, and the view keeps the newest 50.
    for i in 0..60 {
        assert_eq!(get(addr, &format!("/chain?id=n{i}")).text(), format!("n{i}"));
    }
    let bounded = until(Duration::from_secs(20), || {
        view = json_body(&get(monitor, "/api/queues"));
        view["workflows"].as_array().is_some_and(|w| w.len() == 50 && w[0]["id"] == "n59")
    });
    assert!(bounded, "{view}");
}
