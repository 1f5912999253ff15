//! Durable calls through the real binary: results and de-duplication, retries with backoff
//! into dead letters, `pmnc queue` on the file, delayed calls after a restart, and kill -9 in
//! the middle of thousands of calls with every call taking effect exactly once on the state.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
#[path = "queue_app/support.rs"]
mod support;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;
use support::*;

const HTTP: &str = r#"
local M = {}
-- /enqueue?from=A&to=B[&fn=F][&delay=S]: stores durable calls with ids k<A>..k<B>.
-- /result?id=ID: the call's status as "status value attempts error".
function M.handle(request)
  local q = request.query
  if request.path == "/enqueue" then
    local ids = {}
    for i = tonumber(q.from), tonumber(q.to) do
      local opts = { queue = q.queue or "retry", id = "k" .. i, delay = q.delay and tonumber(q.delay) or nil,
                     expires_in = q.expires_in and tonumber(q.expires_in) or nil }
      ids[#ids + 1] = pmnc("worker", opts)[q.mod or "work"][q.fn or "count"](i)
    end
    return table.concat(ids, ",")
  elseif request.path == "/anonymous" then
    local a = pmnc("worker", { queue = "retry" }).work.count(-1)
    local b = pmnc("worker", { queue = "retry" }).work.count(-1)
    return a ~= b and "distinct" or "same"
  elseif request.path == "/result" then
    local r = pmnc.calls.result(q.id)
    if r == nil then return "none" end
    return ("%s %s %s %s"):format(r.status, tostring(r.value), tostring(r.attempts), tostring(r.error))
  elseif request.path == "/tx" then
    -- A transaction with a state write and a durable call; fail=1 makes a participant fail.
    local xa = pmnc.transaction.create()
    xa.state.set("tx:" .. q.id, "written")
    if q.fail then xa.state.set("needs a value") end
    xa.pmnc("worker", { queue = "retry", id = q.id }).work.count(100)
    local ok, a, b = pcall(xa.execute)
    return tostring(ok) .. " " .. tostring(b)
  elseif request.path == "/order" then
    return table.concat(pmnc.state.get("order") or {}, ",")
  elseif request.path == "/state" then
    return tostring(pmnc.state.get(q.key))
  elseif request.path == "/bad" then
    local ok, e = pcall(function() return pmnc("worker", { queue = "nope" }).work.count(1) end)
    local ok2, e2 = pcall(function() return pmnc("worker", { queue = "retry", color = 1 }).work.count(1) end)
    return tostring(e) .. "\n" .. tostring(e2)
  end
end
return M
"#;

/// The worker cage's module (queue_app/work.lua): count(i) counts how often call i took effect on
/// the state; fail(i) writes to the state, then fails; slow and nap take a while.
const WORK: &str = include_str!("queue_app/work.lua");

fn worker_cage(t: &Tree, queue_extra: &str) -> PathBuf {
    t.write("worker/cage.toml", &http_cage_toml(&format!("\n[queues.retry]\n{queue_extra}\n")));
    t.write("worker/http.lua", HTTP);
    t.write("worker/work.lua", WORK);
    t.path().join("worker")
}

#[test]
fn a_durable_call_runs_once_keeps_its_result_and_refuses_duplicate_ids() {
    let t = Tree::new();
    let cage = worker_cage(&t, "");
    let s = Server::start(&cage, &[]);
    let addr = s.addr("http");
    assert_eq!(get(addr, "/enqueue?from=7&to=7").text(), "k7");
    let r = get_prefix(addr, "/result?id=k7", "done", Duration::from_secs(10));
    assert_eq!(r, "done 14 1 nil");
    assert_eq!(get(addr, "/state?key=id:7").text(), "k7", "pmnc.request.call_id is the call's id");
    // The same id again, twice: accepted, and run no more.
    assert_eq!(get(addr, "/enqueue?from=7&to=7").text(), "k7");
    assert_eq!(get(addr, "/enqueue?from=7&to=8").text(), "k7,k8");
    get_prefix(addr, "/result?id=k8", "done", Duration::from_secs(10));
    assert_eq!(get(addr, "/state?key=n:7").text(), "1");
    assert_eq!(get(addr, "/result?id=unknown").text(), "none");
    assert_eq!(get(addr, "/anonymous").text(), "distinct", "calls without an id get distinct ids");
    let bad = get(addr, "/bad").text();
    assert!(bad.contains("cage worker has no queue \"nope\" (its queues: retry; add [queues.nope] to its cage.toml)"), "{bad}");
    assert!(bad.contains("unknown option \"color\""), "{bad}");
}

#[test]
fn a_failing_call_is_retried_with_backoff_then_dead_and_can_be_retried_by_hand() {
    let t = Tree::new();
    let cage = worker_cage(&t, "expires_in = \"1500ms\"\n[queues.retry.backoff]\ninitial = \"100ms\"\nmultiplier = 2\njitter = 0\n");
    let s = Server::start(&cage, &[]);
    let addr = s.addr("http");
    let started = Instant::now();
    get(addr, "/enqueue?from=1&to=1&fn=fail");
    let r = get_prefix(addr, "/result?id=k1", "dead", Duration::from_secs(10));
    let took = started.elapsed();
    // Waits of 100, 200, 400, 800 ms: the fifth would pass the expiry at 1.5 s.
    assert!(r.starts_with("dead nil 4 "), "{r}");
    assert!(r.contains("worker.work.fail: worker/work.lua:12: always fails 1"), "{r}");
    assert!(took >= Duration::from_millis(700), "backoff waits add up to 700 ms before the 4th attempt, took {took:?}");
    assert_eq!(get(addr, "/state?key=failed:1").text(), "nil", "a failed attempt leaves no state behind");
    let c = db(&cage);
    assert_eq!(count(&c, "SELECT count(*) FROM queue_dead_letters WHERE id = 'k1'"), 1);

    let ls = pmnc_limited(&["queue", "ls", cage.to_str().unwrap()], Duration::from_secs(30));
    assert_eq!(ls.code, Some(0), "{}", ls.stderr);
    assert!(ls.stdout.contains("queue retry: 0 waiting") && ls.stdout.contains("1 dead"), "{}", ls.stdout);
    assert!(ls.stdout.contains("dead") && ls.stdout.contains("k1"), "{}", ls.stdout);
    let show = pmnc_limited(&["queue", "show", cage.to_str().unwrap(), "k1"], Duration::from_secs(30));
    assert!(show.stdout.contains("status:    dead") && show.stdout.contains("arguments: [1]"), "{}", show.stdout);
    let retry = pmnc_limited(&["queue", "retry", cage.to_str().unwrap(), "k1"], Duration::from_secs(30));
    assert_eq!(retry.code, Some(0), "{}", retry.stderr);
    // It runs again (and fails again: 4 more attempts within its extended time are not awaited).
    assert!(until(Duration::from_secs(10), || count(&c, "SELECT attempts FROM queue_calls WHERE id = 'k1'") > 4));
    let purge = pmnc_limited(&["queue", "purge", cage.to_str().unwrap()], Duration::from_secs(30));
    assert_eq!(purge.code, Some(0), "{}", purge.stderr);
    assert!(purge.stdout.contains("deleted 1 calls"), "{}", purge.stdout);
    let missing = pmnc_limited(&["queue", "show", cage.to_str().unwrap(), "k1"], Duration::from_secs(30));
    assert_eq!(missing.code, Some(1));
    assert!(missing.stderr.contains("no call \"k1\""), "{}", missing.stderr);
}

#[test]
fn delayed_calls_fire_on_time_after_a_restart() {
    let t = Tree::new();
    let cage = worker_cage(&t, "");
    {
        let mut s = Server::start(&cage, &[]);
        assert_eq!(get(s.addr("http"), "/enqueue?from=1&to=3&delay=2").text(), "k1,k2,k3");
        s.signal(9);
        s.wait_exit(Duration::from_secs(10));
    }
    let c = db(&cage);
    assert_eq!(count(&c, "SELECT count(*) FROM queue_calls WHERE status = 'pending'"), 3, "the delayed calls are in the file");
    let _s = Server::start(&cage, &[]);
    assert!(until(Duration::from_secs(10), || count(&c, "SELECT count(*) FROM queue_calls WHERE status = 'done'") == 3));
    // Never before their time. How soon after it is a speed figure, not an assertion: a loaded
    // machine delays them (it failed at 132 ms once, beside a soak and a full test run).
    let early: i64 = count(&c, "SELECT min(finished_ms - due_ms) FROM queue_calls");
    assert!(early >= 0, "a call ran {} ms before it was due", -early);
}

#[test]
fn kill_9_in_the_middle_of_thousands_of_calls_loses_none_and_runs_none_twice() {
    const N: usize = 3000;
    const CLIENTS: usize = 20;
    let t = Tree::new();
    // Quick retries: an attempt that fails on a loaded machine (a busy file) is tried again soon,
    // so the wait below measures the queue, not the default backoff.
    let cage = worker_cage(&t, "concurrency = 32\n[queues.retry.backoff]\ninitial = \"50ms\"\nmax = \"1s\"\n");
    let mut s = Server::start(&cage, &[]);
    let addr = s.addr("http");
    // 20 clients enqueue 150 calls each, one request per 50 calls.
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            std::thread::spawn(move || {
                let per = N / CLIENTS;
                let mut from = c * per + 1;
                let end = (c + 1) * per;
                while from <= end {
                    let to = (from + 49).min(end);
                    let r = raw_request(
                        addr,
                        format!("GET /enqueue?fn=slow&from={from}&to={to} HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n").as_bytes(),
                        Duration::from_secs(30),
                    );
                    if !matches!(r, Ok(ref r) if r.status == 200) {
                        return from - 1;
                    }
                    from = to + 1;
                }
                end
            })
        })
        .collect();
    let acked: Vec<usize> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let c = db(&cage);
    assert!(until(Duration::from_secs(30), || count(&c, "SELECT count(*) FROM queue_calls WHERE status = 'done'") >= 300));
    s.signal(9);
    s.wait_exit(Duration::from_secs(10));
    let done_at_kill = count(&c, "SELECT count(*) FROM queue_calls WHERE status = 'done'");
    assert!(done_at_kill < N as i64, "the kill came before the end ({done_at_kill} done)");

    let _s = Server::start(&cage, &[]);
    assert!(
        until(Duration::from_secs(60), || count(&c, "SELECT count(*) FROM queue_calls WHERE status = 'done'") == N as i64),
        "every call ends done; {} are; the others: {:?}",
        count(&c, "SELECT count(*) FROM queue_calls WHERE status = 'done'"),
        c.prepare("SELECT status, count(*), max(attempts), max(error) FROM queue_calls WHERE status != 'done' GROUP BY status")
            .and_then(|mut q| {
                q.query_map([], |r| {
                    Ok(format!(
                        "{}: {} (attempts up to {}, {:?})",
                        r.get::<_, String>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, Option<String>>(3)?
                    ))
                })
                .map(|rows| rows.filter_map(Result::ok).collect::<Vec<_>>())
            })
            .unwrap_or_default()
    );
    for (client, last) in acked.iter().enumerate() {
        assert_eq!(*last, (client + 1) * (N / CLIENTS), "client {client}: every enqueue was acknowledged");
    }
    let mut stmt = c.prepare("SELECT value FROM state WHERE key = ?1").unwrap();
    for i in 1..=N {
        let v: Vec<u8> = stmt.query_row([format!("n:{i}")], |r| r.get(0)).unwrap_or_else(|e| panic!("call {i} took no effect: {e}"));
        // The state codec: format 1, integer tag 3, zigzag varint of 1 = 2.
        assert_eq!(v, vec![1, 3, 2], "call {i} took effect once");
    }
}

#[test]
fn a_durable_call_in_a_transaction_exists_only_if_the_transaction_commits() {
    let t = Tree::new();
    let cage = worker_cage(&t, "");
    let s = Server::start(&cage, &[]);
    let addr = s.addr("http");
    assert_eq!(get(addr, "/tx?id=rolled&fail=1").text(), "false nil");
    assert_eq!(get(addr, "/tx?id=kept").text(), "true kept", "xa.execute() returns the call id after the participants' values");
    assert_eq!(get_prefix(addr, "/result?id=kept", "done", Duration::from_secs(10)), "done 200 1 nil");
    assert_eq!(get(addr, "/result?id=rolled").text(), "none", "a rolled back transaction leaves no call");
    assert_eq!(get(addr, "/state?key=tx:rolled").text(), "nil");
    assert_eq!(get(addr, "/state?key=tx:kept").text(), "written");
    let c = db(&cage);
    assert_eq!(count(&c, "SELECT count(*) FROM queue_calls WHERE id = 'rolled'"), 0);
}

const ORDERED: &str = r#"
local M = {}
-- Appends i to the list "order"; call 1 fails in its first attempt.
function M.append(i)
  if i == 1 and pmnc.request.parameters.attempt == 1 then error("first attempt of 1 fails") end
  local order = pmnc.state.get("order") or {}
  order[#order + 1] = i
  pmnc.state.set("order", order)
end
return M
"#;

#[test]
fn keep_order_runs_one_at_a_time_in_enqueue_order_and_rate_limit_spaces_calls() {
    let t = Tree::new();
    t.write(
        "worker/cage.toml",
        &http_cage_toml(
            "\n[queues.retry]\nkeep_order = true\n[queues.retry.backoff]\ninitial = \"50ms\"\njitter = 0\n\n[queues.slow]\nrate_limit = 5\nconcurrency = 100\n",
        ),
    );
    t.write("worker/http.lua", HTTP);
    t.write("worker/work.lua", WORK);
    t.write("worker/ordered.lua", ORDERED);
    let cage = t.path().join("worker");
    let s = Server::start(&cage, &[]);
    let addr = s.addr("http");
    get(addr, "/enqueue?from=1&to=5&fn=append&mod=ordered");
    assert_eq!(get_prefix(addr, "/result?id=k5", "done", Duration::from_secs(10)), "done nil 1 nil");
    assert_eq!(get(addr, "/order").text(), "1,2,3,4,5", "call 1 failed once and held the others until it succeeded");
    assert!(get(addr, "/result?id=k1").text().starts_with("done nil 2 "));

    get(addr, "/enqueue?from=10&to=19&queue=slow");
    let c = db(&cage);
    assert!(until(Duration::from_secs(10), || count(&c, "SELECT count(*) FROM queue_calls WHERE queue = 'slow' AND status = 'done'") == 10));
    let spread = count(&c, "SELECT max(finished_ms) - min(finished_ms) FROM queue_calls WHERE queue = 'slow'");
    // A bucket of 5 starts full: the other 5 calls need a second of tokens.
    assert!(spread >= 800, "10 calls at 5/s finished within {spread} ms");
}

#[test]
fn a_damaged_state_file_stops_the_start_with_its_path() {
    let t = Tree::new();
    let cage = worker_cage(&t, "");
    t.write("worker/.data/state.sqlite", &"this is not a database ".repeat(300));
    let out = pmnc_limited(&["run", cage.to_str().unwrap()], Duration::from_secs(30));
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("state.sqlite is damaged or not an SQLite database"), "{}", out.stderr);
}

#[test]
fn a_graceful_shutdown_lets_running_calls_finish() {
    let t = Tree::new();
    let cage = worker_cage(&t, "");
    t.write("worker/nap.lua", "return { nap = function(i) pmnc.state.set('napping', true) pmnc.sleep(0.5) return i end }\n");
    let mut s = Server::start(&cage, &[]);
    get(s.addr("http"), "/enqueue?from=1&to=1&mod=nap&fn=nap");
    // The call runs (it shows as running) when the signal comes.
    get_prefix(s.addr("http"), "/result?id=k1", "running", Duration::from_secs(10));
    assert_eq!(s.terminate(Duration::from_secs(20)), Some(0));
    let c = db(&cage);
    assert_eq!(count(&c, "SELECT count(*) FROM queue_calls WHERE id = 'k1' AND status = 'done'"), 1);
}

#[test]
fn a_transaction_in_another_cage_stores_its_call_through_its_outbox() {
    let t = Tree::new();
    t.write("app/cages/web/cage.toml", &http_cage_toml(""));
    t.write(
        "app/cages/web/http.lua",
        r#"return { handle = function(request)
  local q = request.query
  if request.path == "/result" then
    local r = pmnc.calls.result(q.id)
    return r and (r.status .. " " .. tostring(r.value)) or "none"
  end
  local xa = pmnc.transaction.create()
  xa.state.set("sent:" .. q.id, true)
  if q.fail then xa.state.set("needs a value") end
  xa.pmnc("worker", { queue = "retry", id = q.id }).work.count(21)
  local ok, _, id = pcall(xa.execute)
  return tostring(ok) .. " " .. tostring(id)
end }"#,
    );
    t.write("app/cages/worker/cage.toml", "[queues.retry]\n");
    t.write("app/cages/worker/work.lua", WORK);
    let s = Server::start(&t.path().join("app"), &[]);
    let addr = s.addr("http");
    assert_eq!(get(addr, "/?id=x1").text(), "true x1");
    assert_eq!(get_prefix(addr, "/result?id=x1", "done", Duration::from_secs(10)), "done 42");
    assert_eq!(get(addr, "/?id=x2&fail=1").text(), "false nil");
    let web = db(&t.path().join("app/cages/web"));
    let worker = db(&t.path().join("app/cages/worker"));
    assert!(
        until(Duration::from_secs(5), || count(&web, "SELECT count(*) FROM queue_outbox WHERE status != 'forwarded'") == 0),
        "the outbox holds nothing to forward once the target accepted"
    );
    assert_eq!(
        count(&web, "SELECT count(*) FROM queue_outbox WHERE id = 'x1' AND status = 'forwarded' AND length(args) = 0"),
        1,
        "a record of where it went, without its arguments"
    );
    assert_eq!(count(&web, "SELECT count(*) FROM state WHERE key = 'sent:x1'"), 1);
    assert_eq!(count(&web, "SELECT count(*) FROM state WHERE key = 'sent:x2'"), 0);
    assert_eq!(count(&worker, "SELECT count(*) FROM queue_calls WHERE id = 'x2'"), 0, "a rolled back transaction leaves no call");
    assert_eq!(count(&worker, "SELECT count(*) FROM queue_calls WHERE id = 'x1' AND from_cage = 'web'"), 1, "stored with its true sender");
}

#[test]
fn kill_9_during_transactions_keeps_state_writes_and_calls_together() {
    const N: usize = 1200;
    const CLIENTS: usize = 12;
    let t = Tree::new();
    t.write("app/cages/web/cage.toml", &http_cage_toml(""));
    t.write(
        "app/cages/web/http.lua",
        r#"return { handle = function(request)
  for i = tonumber(request.query.from), tonumber(request.query.to) do
    local xa = pmnc.transaction.create()
    xa.state.set("sent:" .. i, true)
    xa.pmnc("worker", { queue = "retry", id = "t" .. i }).work.count(i)
    xa.execute()
  end
  return "ok"
end }"#,
    );
    t.write("app/cages/worker/cage.toml", "[queues.retry]\nconcurrency = 32\n");
    t.write("app/cages/worker/work.lua", WORK);
    let app = t.path().join("app");
    let mut s = Server::start(&app, &[]);
    let addr = s.addr("http");
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            std::thread::spawn(move || {
                let per = N / CLIENTS;
                let mut acked = Vec::new();
                for from in (c * per + 1..=(c + 1) * per).step_by(10) {
                    let r = raw_request(
                        addr,
                        format!("GET /?from={from}&to={} HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n", from + 9).as_bytes(),
                        Duration::from_secs(30),
                    );
                    match r {
                        Ok(r) if r.status == 200 => acked.extend(from..from + 10),
                        _ => break,
                    }
                }
                acked
            })
        })
        .collect();
    let worker = db(&t.path().join("app/cages/worker"));
    let web = db(&t.path().join("app/cages/web"));
    let done = |c: &rusqlite::Connection| c.query_row("SELECT count(*) FROM queue_calls WHERE status = 'done'", [], |r| r.get::<_, i64>(0)).unwrap_or(0);
    assert!(until(Duration::from_secs(30), || done(&worker) >= 150));
    s.signal(9);
    s.wait_exit(Duration::from_secs(10));
    let acked: Vec<usize> = clients.into_iter().flat_map(|c| c.join().unwrap()).collect();
    let sent_at_kill = count(&web, "SELECT count(*) FROM state WHERE key LIKE 'sent:%'");
    assert!(sent_at_kill < N as i64, "the kill came in the middle ({sent_at_kill} sent)");

    let _s = Server::start(&app, &[]);
    assert!(until(Duration::from_secs(30), || {
        count(&web, "SELECT count(*) FROM queue_outbox WHERE status != 'forwarded'") == 0
            && count(&worker, "SELECT count(*) FROM queue_calls WHERE status != 'done'") == 0
    }));
    let sent: Vec<String> = {
        let mut st = web.prepare("SELECT substr(key, 6) FROM state WHERE key LIKE 'sent:%' ORDER BY 1").unwrap();
        st.query_map([], |r| r.get(0)).unwrap().map(|k| k.unwrap()).collect()
    };
    let called: Vec<String> = {
        let mut st = worker.prepare("SELECT substr(id, 2) FROM queue_calls ORDER BY 1").unwrap();
        st.query_map([], |r| r.get(0)).unwrap().map(|k| k.unwrap()).collect()
    };
    assert_eq!(sent, called, "a transaction's state write and its durable call exist together or not at all");
    for i in &acked {
        assert!(sent.contains(&i.to_string()), "acknowledged transaction {i} is there");
    }
    let mut stmt = worker.prepare("SELECT value FROM state WHERE key = ?1").unwrap();
    for i in &sent {
        let v: Vec<u8> = stmt.query_row([format!("n:{i}")], |r| r.get(0)).unwrap_or_else(|e| panic!("call t{i} took no effect: {e}"));
        assert_eq!(v, vec![1, 3, 2], "call t{i} took effect once");
    }
}

#[test]
fn concurrency_bounds_the_calls_of_a_queue_running_at_once() {
    let t = Tree::new();
    t.write("worker/cage.toml", &http_cage_toml("\n[queues.retry]\nconcurrency = 2\n"));
    t.write("worker/http.lua", HTTP);
    t.write("worker/work.lua", WORK);
    t.write("worker/nap.lua", "return { nap = function(i) pmnc.sleep(0.2) return i end }\n");
    let cage = t.path().join("worker");
    let s = Server::start(&cage, &[]);
    get(s.addr("http"), "/enqueue?from=1&to=6&mod=nap&fn=nap");
    let c = db(&cage);
    assert!(until(Duration::from_secs(10), || count(&c, "SELECT count(*) FROM queue_calls WHERE status = 'done'") == 6));
    // Six calls of 200 ms, two at a time: three rounds.
    let took = count(&c, "SELECT max(finished_ms) - min(created_ms) FROM queue_calls");
    assert!(took >= 590, "6 calls of 200 ms with concurrency 2 took {took} ms");
}

#[test]
fn a_durable_call_to_a_cage_not_in_the_process_fails_at_once() {
    let t = Tree::new();
    t.write("web/cage.toml", &http_cage_toml(""));
    t.write(
        "web/http.lua",
        "return { handle = function() local ok, e = pcall(function() return pmnc('nowhere', { queue = 'retry' }).m.f(1) end) return tostring(e) end }\n",
    );
    let s = Server::start(&t.path().join("web"), &[]);
    let text = get(s.addr("http"), "/").text();
    assert!(text.contains("calling nowhere.m.f: no cage named nowhere runs in this process (cages here: web) and no cluster is configured"), "{text}");
}

#[test]
fn a_call_that_expires_before_it_runs_goes_to_dead_letters_unrun() {
    let t = Tree::new();
    let cage = worker_cage(&t, "");
    let s = Server::start(&cage, &[]);
    let addr = s.addr("http");
    get(addr, "/enqueue?from=3&to=3&expires_in=0");
    let r = get_prefix(addr, "/result?id=k3", "dead", Duration::from_secs(10));
    assert_eq!(r, "dead nil 0 expired before it could run");
    assert_eq!(get(addr, "/state?key=n:3").text(), "nil", "it never ran");
}

// ---------------------------------------------------------------------------------------------
// Issue 22 in one process: an app of a web cage (HTTP) sending to a worker cage (queues).

/// The web cage's handler (queue_app/web.lua): each route makes one kind of call and answers
/// its outcome as text ("ERR <message>" for a raised error), so a test sees exactly what Lua saw.
const WEB: &str = include_str!("queue_app/web.lua");

const MINE: &str = include_str!("queue_app/mine.lua");

/// An app folder with cages web (HTTP, queue `own`) and worker (queue `retry` with `worker_queue`
/// in its table).
fn two_cage_app(t: &Tree, worker_queue: &str) -> PathBuf {
    t.write("app/cages/web/cage.toml", &http_cage_toml("\n[queues.own]\n"));
    t.write("app/cages/web/http.lua", WEB);
    t.write("app/cages/web/mine.lua", MINE);
    t.write("app/cages/worker/cage.toml", &format!("[queues.retry]\n{worker_queue}\n"));
    t.write("app/cages/worker/work.lua", WORK);
    t.path().join("app")
}

/// Issue 22 #2: `_queue` is reserved; a module of that name must not pass `pmnc check` or start.
#[test]
fn a_module_named_queue_is_refused_by_check_and_run() {
    let t = Tree::new();
    let app = two_cage_app(&t, "");
    t.write("app/cages/worker/_queue.lua", "return { accept = function() return 'swallowed' end }\n");
    let check = pmnc_limited(&["check", app.to_str().unwrap()], Duration::from_secs(30));
    assert_eq!(check.code, Some(1), "{}\n{}", check.stdout, check.stderr);
    assert!(check.stderr.contains("module name \"_queue\" is reserved"), "{}", check.stderr);
    let run = pmnc_limited(&["run", app.to_str().unwrap()], Duration::from_secs(30));
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    assert!(run.stderr.contains("module name \"_queue\" is reserved"), "{}", run.stderr);
    std::fs::remove_file(t.path().join("app/cages/worker/_queue.lua")).unwrap();
    t.write("app/cages/.shared/_queue.lua", "return { accept = function() return 'swallowed' end }\n");
    let shared = pmnc_limited(&["check", app.to_str().unwrap()], Duration::from_secs(30));
    assert_eq!(shared.code, Some(1), "{}", shared.stderr);
    assert!(shared.stderr.contains("module name \"_queue\" is reserved"), "{}", shared.stderr);
}

/// Issue 22 #3: with no cluster, xa.pmnc to a cage that does not exist fails at once like the
/// plain call, and the transaction rolls back.
#[test]
fn xa_pmnc_to_a_misspelled_cage_fails_at_once_and_rolls_back() {
    let t = Tree::new();
    let app = two_cage_app(&t, "");
    let s = Server::start(&app, &[]);
    let addr = s.addr("http");
    let plain = get(addr, "/plain?cage=wroker&id=p1").text();
    let xa = get(addr, "/xa?cage=wroker&id=t1").text();
    for text in [&plain, &xa] {
        assert!(
            text.starts_with("ERR ") && text.contains("no cage named wroker runs in this process (cages here: web, worker) and no cluster is configured"),
            "{text}"
        );
    }
    assert_eq!(get(addr, "/state?key=sent:t1").text(), "nil", "the transaction rolled back");
    assert_eq!(get(addr, "/result?id=t1").text(), "none");
    assert_eq!(count(&db(&app.join("cages/web")), "SELECT count(*) FROM queue_outbox"), 0);
}

/// Issue 22 #5 and #7 in one process: a call through the outbox gets the target queue's
/// `expires_in` (not a day), its true sender and creation time.
#[test]
fn an_outbox_call_keeps_the_queues_expiry_its_sender_and_its_creation_time() {
    let t = Tree::new();
    let app = two_cage_app(&t, "expires_in = \"2m\"");
    let s = Server::start(&app, &[]);
    let addr = s.addr("http");
    assert_eq!(get(addr, "/plain?id=p1").text(), "p1");
    assert_eq!(get(addr, "/xa?id=x1").text(), "ok x1");
    assert_eq!(get(addr, "/xa?id=x2&expires_in=30").text(), "ok x2");
    assert_eq!(get(addr, "/xa?id=x3&delay=3600").text(), "ok x3");
    for id in ["p1", "x1", "x2"] {
        get_prefix(addr, &format!("/result?id={id}"), "done", Duration::from_secs(10));
    }
    let worker = app.join("cages/worker");
    let c = db(&worker);
    let ttl = |id: &str| count(&c, &format!("SELECT expires_ms - max(due_ms, created_ms) FROM queue_calls WHERE id = '{id}'"));
    assert_eq!(ttl("p1"), 120_000, "a plain call gets the queue's expires_in");
    assert_eq!(ttl("x1"), 120_000, "an xa.pmnc call gets the queue's expires_in too");
    assert_eq!(ttl("x2"), 30_000, "its own expires_in wins");
    assert!(until(Duration::from_secs(10), || count(&c, "SELECT count(*) FROM queue_calls WHERE id = 'x3'") == 1));
    assert_eq!(ttl("x3"), 120_000, "counted from when it is due");
    for id in ["p1", "x1", "x2", "x3"] {
        let from: String = c.query_row("SELECT from_cage FROM queue_calls WHERE id = ?1", [id], |r| r.get(0)).unwrap();
        assert_eq!(from, "web", "call {id} names its sender");
        assert!(count(&c, &format!("SELECT due_ms >= created_ms FROM queue_calls WHERE id = '{id}'")) == 1, "call {id} is not due before it was made");
    }
    let show = pmnc_limited(&["queue", "show", worker.to_str().unwrap(), "x1"], Duration::from_secs(30));
    assert!(show.stdout.contains("from cage: web"), "{}", show.stdout);
}

/// Issue 22 #10 in one process: pmnc.calls.wait parks until the call is done (or dead), and the
/// completion is an event on topic "call:<id>" of the sending cage.
#[test]
fn pmnc_calls_wait_and_the_completion_event_end_when_the_call_does() {
    let t = Tree::new();
    let app = two_cage_app(&t, "expires_in = \"1s\"\n[queues.retry.backoff]\ninitial = \"300ms\"\njitter = 0\n");
    let s = Server::start(&app, &[]);
    let addr = s.addr("http");
    assert_eq!(get(addr, "/submit_wait?id=w1").text(), "done 42 1 worker nil");
    assert_eq!(get(addr, "/submit_event?id=w2").text(), "done 42 1 worker nil");
    let dead = get(addr, "/submit_wait?id=w3&fn=fail").text();
    assert!(dead.starts_with("dead nil ") && dead.contains("always fails 21"), "{dead}");
    // A call not due yet: the wait ends at its timeout with the status as it stands.
    assert_eq!(get(addr, "/plain?id=w4&delay=3600").text(), "w4");
    assert_eq!(get(addr, "/wait?id=w4&timeout=0.2").text(), "pending nil 0 worker nil");
    assert_eq!(get(addr, "/wait?id=never-stored&timeout=0.1").text(), "none");
    let bad = get(addr, "/wait?timeout=1").text();
    assert!(bad.starts_with("ERR ") && bad.contains("pmnc.calls.wait(id): id must be a string, got nil"), "{bad}");
    let bad = get(addr, "/wait?id=w1&timeout=-1").text();
    assert!(bad.starts_with("ERR ") && bad.contains("timeout must be zero or more seconds"), "{bad}");
}

/// Issue 22 #11: `pmnc test` runs the cage's queues, in a temporary state folder, so a module
/// test can enqueue a call, wait for it and read its result and its state writes.
#[test]
fn durable_calls_run_under_pmnc_test() {
    let t = Tree::new();
    t.write("jobs/cage.toml", "[queues.work]\n");
    t.write("jobs/work.lua", "return { double = function(n) pmnc.state.set('doubled', n * 2) return n * 2 end }\n");
    t.write(
        "jobs/work_test.lua",
        r#"local M = {}
function M.test_enqueue_run_and_read()
  local id = pmnc("jobs", { queue = "work" }).work.double(21)
  local r = pmnc.calls.wait(id, 5)
  assert(r and r.status == "done", "status " .. tostring(r and r.status) .. " " .. tostring(r and r.error))
  assert(r.value == 42, "value " .. tostring(r.value))
  assert(pmnc.calls.result(id).status == "done")
  assert(pmnc.state.get("doubled") == 42, "the call's state write commits with its completion")
end
function M.test_a_transaction_with_a_durable_call()
  local xa = pmnc.transaction.create()
  xa.state.set("flag", 1)
  xa.pmnc("jobs", { queue = "work", id = "tx-1" }).work.double(5)
  local id = select(2, xa.execute())
  assert(id == "tx-1", tostring(id))
  assert(pmnc.calls.wait(id, 5).value == 10)
end
return M
"#,
    );
    let out = pmnc_limited(&["test", t.path().join("jobs").to_str().unwrap()], Duration::from_secs(60));
    assert_eq!(out.code, Some(0), "stdout:\n{}\nstderr:\n{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("2 passed, 0 failed"), "{}", out.stdout);
    assert!(!t.path().join("jobs/.data").exists(), "the cage's own state folder is left alone");
}

/// Issue 22 #1 in one process: a durable call on the sender's own queue together with one
/// through the outbox, many times over; every one of them runs.
#[test]
fn local_and_outbox_calls_made_together_all_run() {
    let t = Tree::new();
    let app = two_cage_app(&t, "");
    let s = Server::start(&app, &[]);
    let addr = s.addr("http");
    for i in 0..30 {
        assert_eq!(get(addr, &format!("/pair?i={i}")).text(), format!("own-{i} out-{i}"));
    }
    let worker = db(&app.join("cages/worker"));
    let web = db(&app.join("cages/web"));
    let all_done = until(Duration::from_secs(15), || {
        count(&worker, "SELECT count(*) FROM queue_calls WHERE status = 'done'") == 30
            && count(&web, "SELECT count(*) FROM queue_calls WHERE status = 'done'") == 30
    });
    assert!(
        all_done,
        "worker done {}, web done {}, outbox {:?}",
        count(&worker, "SELECT count(*) FROM queue_calls WHERE status = 'done'"),
        count(&web, "SELECT count(*) FROM queue_calls WHERE status = 'done'"),
        web.prepare("SELECT id, status, attempts, error FROM queue_outbox WHERE status != 'forwarded'")
            .and_then(|mut q| q
                .query_map([], |r| Ok(format!(
                    "{} {} {} {:?}",
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, Option<String>>(3)?
                )))
                .map(|rows| rows.filter_map(Result::ok).collect::<Vec<_>>()))
            .unwrap_or_default()
    );
}

/// Forwarding outbox calls is internal: it is not counted as requests of interface `pmnc` of
/// the target; the state file's WAL size is in /metrics (issue 22, smaller item and #12).
#[test]
fn forwarding_is_not_counted_as_requests_and_the_wal_size_is_in_metrics() {
    let t = Tree::new();
    let app = two_cage_app(&t, "");
    let mut s = Server::start(&app, &[]);
    let addr = s.addr("http");
    let monitor = monitor_addr(&mut s);
    for i in 0..5 {
        assert_eq!(get(addr, &format!("/xa?id=f{i}")).text(), format!("ok f{i}"));
    }
    for i in 0..5 {
        get_prefix(addr, &format!("/result?id=f{i}"), "done", Duration::from_secs(10));
    }
    let text = get(monitor, "/metrics").text();
    let forwarded = sample(&text, "pmnc_requests_total{cage=\"worker\",interface=\"pmnc\"}").unwrap_or(0.0);
    assert_eq!(forwarded, 0.0, "forwarding counted as requests:\n{text}");
    assert_eq!(sample(&text, "pmnc_requests_total{cage=\"worker\",interface=\"queue.retry\"}"), Some(5.0), "{text}");
    let wal = sample(&text, "pmnc_state_wal_bytes{cage=\"worker\"}");
    assert!(wal.is_some_and(|w| (0.0..=32.0 * 1024.0 * 1024.0).contains(&w)), "{text}");
    assert!(sample(&text, "pmnc_state_file_bytes{cage=\"worker\"}").is_some_and(|b| b > 0.0), "{text}");
}

/// The lines of a /hostile answer, by case name.
fn cases(text: &str) -> std::collections::BTreeMap<String, String> {
    text.lines().filter_map(|l| l.split_once(" => ")).map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn expect_refused(got: &std::collections::BTreeMap<String, String>, case: &str, needle: &str) {
    let line = got.get(case).unwrap_or_else(|| panic!("no case {case:?} in {got:#?}"));
    assert!(line.starts_with("ERR ") && line.contains(needle), "{case}: expected an error containing {needle:?}, got {line:?}");
}

/// A hostile pass over the names, values and options of durable calls: every attack ends in a
/// clear error at once, and nothing is stored, in the queue, the outbox or the state.
#[test]
fn hostile_names_values_and_options_are_refused_clearly_and_store_nothing() {
    let t = Tree::new();
    let app = two_cage_app(&t, "");
    t.write("app/cages/web/hostile.lua", include_str!("queue_app/hostile.lua"));
    let s = Server::start(&app, &[]);
    let addr = s.addr("http");
    let names = cases(&get(addr, "/hostile?set=names").text());
    expect_refused(&names, "bad cage", "calling ../etc.work.count: \"../etc\" is not a valid cage name");
    expect_refused(&names, "wildcard cage", "\"worker.>\" is not a valid cage name");
    expect_refused(&names, "empty cage", "\"\" is not a valid cage name");
    expect_refused(&names, "long queue", "cage worker has no queue \"qqqq");
    expect_refused(&names, "empty queue", "cage worker has no queue \"\"");
    expect_refused(&names, "private function", "calling worker.work._secret: work._secret is private");
    expect_refused(&names, "reserved module", "calling worker._queue.accept: module _queue is reserved");
    expect_refused(&names, "bad module", "calling worker.a.b.f: \"a.b\" is not a module name");
    expect_refused(&names, "plain reserved", "calling worker._queue.accept: module _queue is reserved");
    expect_refused(&names, "long id", "option id must be 1 to 256 bytes");
    expect_refused(&names, "xa bad cage", "\"../x\" is not a valid cage name");
    expect_refused(&names, "xa private", "work._secret is private");
    let values = cases(&get(addr, "/hostile?set=values").text());
    expect_refused(&values, "function", "calling worker.work.count: argument 1:");
    expect_refused(&values, "coroutine", "calling worker.work.count: argument 1:");
    expect_refused(&values, "cycle", "calling worker.work.count: argument 1:");
    expect_refused(&values, "deep", "calling worker.work.count: argument 1:");
    expect_refused(&values, "huge", "calling worker.work.count: the arguments:");
    expect_refused(&values, "xa function", "calling worker.work.count: argument 1:");
    expect_refused(&values, "xa huge", "calling worker.work.count: the arguments:");
    expect_refused(&values, "negative delay", "option delay must be zero or more");
    expect_refused(&values, "text delay", "option delay must be a number of seconds, got string");
    expect_refused(&values, "nan expiry", "option expires_in must be zero or more");
    expect_refused(&values, "wait bad id", "pmnc.calls.wait(id): id must be a string, got table");
    expect_refused(&values, "result bad cage", "\"../etc\" is not a valid cage name");
    let (web, worker) = (db(&app.join("cages/web")), db(&app.join("cages/worker")));
    assert_eq!(count(&worker, "SELECT count(*) FROM queue_calls"), 0, "nothing stored in the worker's queue");
    assert_eq!(count(&web, "SELECT count(*) FROM queue_calls"), 0);
    assert_eq!(count(&web, "SELECT count(*) FROM queue_outbox"), 0, "nothing in the outbox");
    assert_eq!(get(addr, "/state?key=hostile").text(), "nil", "every refused transaction rolled back");
}

/// A call whose target module disappears (deleted, hot reload) while it waits: its attempts fail
/// and are retried with backoff, and it runs once the module is back; nothing is lost.
#[test]
fn a_call_whose_module_disappears_is_retried_and_runs_once_it_is_back() {
    let t = Tree::new();
    let app = two_cage_app(&t, "[queues.retry.backoff]\ninitial = \"200ms\"\nmax = \"400ms\"\njitter = 0\n");
    let mut s = Server::start(&app, &[]);
    let addr = s.addr("http");
    std::fs::remove_file(app.join("cages/worker/work.lua")).unwrap();
    assert!(s.wait_for("module work removed", Duration::from_secs(10)).is_some(), "the removal was noticed");
    assert_eq!(get(addr, "/plain?id=gone").text(), "gone");
    let failed = get_prefix(addr, "/result?id=gone", "failed", Duration::from_secs(10));
    assert!(failed.contains("has no module work"), "{failed}");
    t.write("app/cages/worker/work.lua", WORK);
    assert_eq!(get_prefix(addr, "/result?id=gone", "done", Duration::from_secs(10)).split(' ').nth(1), Some("42"));
    let c = db(&app.join("cages/worker"));
    assert_eq!(count(&c, "SELECT count(*) FROM state WHERE key = 'n:21'"), 1);
}

/// Issue 22 #10: an event can be published to a topic of another cage. A queued call of the
/// worker waits on its own topic; the web cage publishes there; the call returns the value.
#[test]
fn an_event_published_to_another_cage_reaches_its_waiting_call() {
    let t = Tree::new();
    let app = two_cage_app(&t, "");
    let s = Server::start(&app, &[]);
    let addr = s.addr("http");
    assert_eq!(get(addr, "/plain?id=e1&fn=await&arg=go").text(), "e1");
    // The call runs once it waits: the publish reaches it (1 waiter woken) or nobody yet (0).
    let woken = get_prefix(addr, "/publish?topic=go&value=hello&cage=worker", "1", Duration::from_secs(10));
    assert_eq!(woken, "1");
    assert_eq!(get(addr, "/wait?id=e1&timeout=10").text(), "done hello 1 worker nil");
    let bad = get(addr, "/publish?topic=go&value=x&cage=../x").text();
    assert!(bad.starts_with("ERR ") && bad.contains("\"../x\" is not a valid cage name"), "{bad}");
}

/// Issue 12 (smaller item): a failed attempt used to log a WARN with its traceback every time,
/// twice (the VM's and the queue's), with no limit. A hundred calls failing at once now log a
/// few lines, the traceback on one line, and the error stays with each call in the file.
#[test]
fn many_failing_attempts_log_a_few_lines_not_one_each() {
    let t = Tree::new();
    let cage = worker_cage(&t, "[queues.retry.backoff]\ninitial = \"1h\"\nmax = \"2h\"\n");
    let mut s = Server::start(&cage, &[]);
    let addr = s.addr("http");
    get(addr, "/enqueue?from=1&to=100&fn=fail");
    let c = db(&cage);
    assert!(until(Duration::from_secs(20), || count(&c, "SELECT count(*) FROM queue_calls WHERE attempts = 1") == 100));
    s.drain(Duration::from_millis(500));
    let lines = s.log.iter().filter(|l| l.contains("always fails")).count();
    assert!((1..=6).contains(&lines), "{lines} log lines for 100 failed attempts:\n{}", s.log.join("\n"));
    let first = s.log.iter().find(|l| l.contains("always fails")).unwrap();
    assert!(first.contains("attempt 1 failed, retrying in") && first.contains("worker/work.lua:12:"), "{first}");
    assert_eq!(count(&c, "SELECT count(*) FROM queue_calls WHERE error LIKE '%always fails%'"), 100, "each call keeps its error");
}
