//! Durable calls through the real binary: results and de-duplication, retries with backoff
//! into dead letters, `pmnc queue` on the file, delayed calls after a restart, and kill -9 in
//! the middle of thousands of calls with every call taking effect exactly once on the state.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;

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

const WORK: &str = r#"
local M = {}
-- Counts how often call i took effect on the state; returns i * 2 and its call id.
function M.count(i)
  local k = "n:" .. i
  pmnc.state.set(k, (pmnc.state.get(k) or 0) + 1)
  pmnc.state.set("id:" .. i, pmnc.request.call_id)
  return i * 2
end
-- Writes to the state, then fails: the write must never show.
function M.fail(i)
  pmnc.state.set("failed:" .. i, true)
  error("always fails " .. i)
end
function M.slow(i)
  pmnc.sleep(0.002)
  return M.count(i)
end
return M
"#;

fn worker_cage(t: &Tree, queue_extra: &str) -> PathBuf {
    t.write("worker/cage.toml", &http_cage_toml(&format!("\n[queues.retry]\n{queue_extra}\n")));
    t.write("worker/http.lua", HTTP);
    t.write("worker/work.lua", WORK);
    t.path().join("worker")
}

fn db(cage: &Path) -> rusqlite::Connection {
    let c = rusqlite::Connection::open(cage.join(".data/state.sqlite")).unwrap();
    c.busy_timeout(Duration::from_secs(10)).unwrap();
    c
}

fn count(c: &rusqlite::Connection, sql: &str) -> i64 {
    c.query_row(sql, [], |r| r.get(0)).unwrap()
}

/// GETs `path` until the body starts with `prefix`; returns the body.
fn get_prefix(addr: std::net::SocketAddr, path: &str, prefix: &str, timeout: Duration) -> String {
    let mut last = String::new();
    let found = until(timeout, || {
        last = get(addr, path).text();
        last.starts_with(prefix)
    });
    assert!(found, "GET {path}: still {last:?} after {timeout:?}, waiting for {prefix:?}");
    last
}

/// Polls `f` until it returns true or `timeout` passes.
fn until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
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
    assert!(r.contains("worker.work.fail: worker/work.lua:13: always fails 1"), "{r}");
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
    let late: i64 = count(&c, "SELECT max(finished_ms - due_ms) FROM queue_calls");
    let early: i64 = count(&c, "SELECT min(finished_ms - due_ms) FROM queue_calls");
    assert!(early >= 0 && late < 100, "calls ran between {early} and {late} ms after they were due");
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
                    let r = raw_request(addr, format!("GET /enqueue?fn=slow&from={from}&to={to} HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n").as_bytes(), Duration::from_secs(30));
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
                q.query_map([], |r| Ok(format!("{}: {} (attempts up to {}, {:?})", r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?, r.get::<_, Option<String>>(3)?)))
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
        &http_cage_toml("\n[queues.retry]\nkeep_order = true\n[queues.retry.backoff]\ninitial = \"50ms\"\njitter = 0\n\n[queues.slow]\nrate_limit = 5\nconcurrency = 100\n"),
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
    assert!(until(Duration::from_secs(5), || count(&web, "SELECT count(*) FROM queue_outbox") == 0), "the outbox empties once the target accepted");
    assert_eq!(count(&web, "SELECT count(*) FROM state WHERE key = 'sent:x1'"), 1);
    assert_eq!(count(&web, "SELECT count(*) FROM state WHERE key = 'sent:x2'"), 0);
    assert_eq!(count(&worker, "SELECT count(*) FROM queue_calls WHERE id = 'x2'"), 0, "a rolled back transaction leaves no call");
    assert_eq!(count(&worker, "SELECT count(*) FROM queue_calls WHERE id = 'x1' AND from_cage = 'worker'"), 1, "stored by the worker's accept");
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
                    let r = raw_request(addr, format!("GET /?from={from}&to={} HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n", from + 9).as_bytes(), Duration::from_secs(30));
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
        count(&web, "SELECT count(*) FROM queue_outbox") == 0 && count(&worker, "SELECT count(*) FROM queue_calls WHERE status != 'done'") == 0
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
