//! Durable calls that give up and can be cancelled (issue 18), through the real binary:
//! `max_attempts` from the queue and from the call, errors that say "do not retry"
//! (`retry = false`, `pmnc.calls.fail_permanently`), and cancelling calls from Lua
//! (`pmnc.calls.cancel`) and from the command line (`pmnc queue cancel`). One `pmnc` process.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::*;

const HTTP: &str = r#"
local M = {}
-- /enqueue?queue=Q&fn=F&id=ID[&arg=A][&delay=S][&max=N]: stores a durable call, returns its id.
-- /result?id=ID: "status attempts error". /cancel?id=ID: "cancelled status message".
function M.handle(request)
  local q = request.query
  if request.path == "/enqueue" then
    local opts = { queue = q.queue, id = q.id, delay = q.delay and tonumber(q.delay) or nil,
                   max_attempts = q.max and tonumber(q.max) or nil }
    return pmnc("worker", opts).work[q.fn](q.arg)
  elseif request.path == "/result" then
    local r = pmnc.calls.result(q.id)
    if r == nil then return "none" end
    return ("%s %s %s"):format(r.status, tostring(r.attempts), tostring(r.error))
  elseif request.path == "/cancel" then
    local cancelled, status, message = pmnc.calls.cancel(q.id)
    return ("%s %s %s"):format(tostring(cancelled), tostring(status), message)
  elseif request.path == "/wait" then
    local r = pmnc.calls.wait(q.id, 5)
    return r and r.status or "none"
  elseif request.path == "/state" then
    return tostring(pmnc.state.get(q.key))
  elseif request.path == "/bad" then
    local ok, e = pcall(function() return pmnc("worker", { queue = "free", max_attempts = 0 }).work.count(1) end)
    return tostring(e)
  end
end
return M
"#;

const WORK: &str = r#"
local M = {}
function M.count(x) return "counted " .. tostring(x) end
function M.fail(x) error("always fails " .. tostring(x)) end
function M.permanent(x)
  pmnc.state.set("permanent", "written")
  error({ message = "card declined", retry = false })
end
function M.helper(x) pmnc.calls.fail_permanently("no such account") end
function M.nap_ok(x)
  pmnc.state.set("nap_ok", "written")
  pmnc.sleep(tonumber(x))
  return "ok"
end
function M.nap_fail(x)
  pmnc.sleep(tonumber(x))
  error("failed after a nap")
end
return M
"#;

fn until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// GETs `path` until its text starts with `prefix`; returns that text.
fn get_prefix(addr: std::net::SocketAddr, path: &str, prefix: &str, timeout: Duration) -> String {
    let mut last = String::new();
    let found = until(timeout, || {
        last = get(addr, path).text();
        last.starts_with(prefix)
    });
    assert!(found, "GET {path}: still {last:?} after {timeout:?}, waiting for {prefix:?}");
    last
}

#[test]
fn calls_give_up_after_max_attempts_or_a_permanent_failure_and_can_be_cancelled() {
    let t = Tree::new();
    let fast = "[queues.retry.backoff]\ninitial = \"10ms\"\nmultiplier = 1\njitter = 0\n";
    t.write("worker/cage.toml", &http_cage_toml(&format!("\n[queues.retry]\nmax_attempts = 3\n{fast}\n[queues.free]\n{}\n", fast.replace("retry", "free"))));
    t.write("worker/http.lua", HTTP);
    t.write("worker/work.lua", WORK);
    let cage = t.path().join("worker");
    let cage_arg = cage.to_str().unwrap();
    let s = Server::start(&cage, &[]);
    let addr = s.addr("http");
    let wait = Duration::from_secs(10);

    // max_attempts of the queue: dead after exactly 3 attempts, with the last error.
    assert_eq!(get(addr, "/enqueue?queue=retry&fn=fail&id=a1&arg=1").text(), "a1");
    let r = get_prefix(addr, "/result?id=a1", "dead", wait);
    assert_eq!(r, "dead 3 worker.work.fail: worker/work.lua:4: always fails 1 (after 3 attempts, its max_attempts)");
    // max_attempts of the call, on a queue without a limit, and over the queue's.
    get(addr, "/enqueue?queue=free&fn=fail&id=a2&arg=2&max=2");
    assert!(get_prefix(addr, "/result?id=a2", "dead", wait).starts_with("dead 2 "));
    get(addr, "/enqueue?queue=retry&fn=fail&id=a3&arg=3&max=5");
    assert!(get_prefix(addr, "/result?id=a3", "dead", wait).starts_with("dead 5 "));
    assert!(get(addr, "/bad").text().contains("option max_attempts must be a whole number from 1 to 1000000, got 0"));

    // Errors that say "do not retry": dead after one attempt with their message, and the state
    // write of the failed attempt is not kept.
    get(addr, "/enqueue?queue=free&fn=permanent&id=p1");
    assert_eq!(
        get_prefix(addr, "/result?id=p1", "dead", wait),
        "dead 1 worker.work.permanent: card declined (failed permanently after 1 attempt: not retried)"
    );
    get(addr, "/enqueue?queue=free&fn=helper&id=p2");
    let r = get_prefix(addr, "/result?id=p2", "dead", wait);
    assert!(r.starts_with("dead 1 worker.work.helper: no such account (failed permanently"), "{r}");

    // A pending (delayed) call: cancelled at once, never runs; twice is harmless; a waiter
    // returns at once.
    get(addr, "/enqueue?queue=free&fn=count&id=d1&delay=3600");
    assert_eq!(get(addr, "/result?id=d1").text(), "pending 0 nil");
    assert_eq!(get(addr, "/cancel?id=d1").text(), "true pending call d1 of cage worker cancelled (it was pending); it will not run");
    assert_eq!(get(addr, "/result?id=d1").text(), "cancelled 0 cancelled");
    assert_eq!(get(addr, "/cancel?id=d1").text(), "false cancelled call d1 of cage worker was already cancelled");
    assert_eq!(get(addr, "/wait?id=d1").text(), "cancelled");
    // Its id keeps refusing the same id: enqueued again, it stays cancelled.
    get(addr, "/enqueue?queue=free&fn=count&id=d1");
    assert_eq!(get(addr, "/result?id=d1").text(), "cancelled 0 cancelled");

    // A running call: its attempt runs to its end and is not retried.
    get(addr, "/enqueue?queue=free&fn=nap_fail&id=r1&arg=1");
    get_prefix(addr, "/result?id=r1", "running", wait);
    let c = get(addr, "/cancel?id=r1").text();
    assert!(c.starts_with("true running call r1 of cage worker cancelled while an attempt runs"), "{c}");
    assert!(get(addr, "/result?id=r1").text().starts_with("cancelled 0 "));
    let r = get_prefix(addr, "/result?id=r1", "cancelled 1 ", wait);
    assert_eq!(r, "cancelled 1 cancelled while attempt 1 ran; it failed: worker.work.nap_fail: worker/work.lua:17: failed after a nap");
    // With a 10 ms backoff a retry would have run by now.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(get(addr, "/result?id=r1").text(), r, "a cancelled call is not retried");

    // A running call that then succeeds: cancel won, so its result and state writes are dropped.
    get(addr, "/enqueue?queue=free&fn=nap_ok&id=r2&arg=0.5");
    get_prefix(addr, "/result?id=r2", "running", wait);
    assert!(get(addr, "/cancel?id=r2").text().starts_with("true running "));
    let r = get_prefix(addr, "/result?id=r2", "cancelled 1 ", wait);
    assert_eq!(r, "cancelled 1 cancelled while attempt 1 ran; it succeeded; its result and state writes were dropped");
    assert_eq!(get(addr, "/state?key=nap_ok").text(), "nil");

    // A done call cannot be cancelled; an unknown id says so.
    get(addr, "/enqueue?queue=free&fn=count&id=c1&arg=1");
    get_prefix(addr, "/result?id=c1", "done", wait);
    assert_eq!(get(addr, "/cancel?id=c1").text(), "false done call c1 of cage worker is done: a call that ended cannot be cancelled");
    assert_eq!(get(addr, "/cancel?id=nope").text(), "false nil no call \"nope\" in the queues of this process");

    // The command line, on the folder of the running cage.
    get(addr, "/enqueue?queue=free&fn=count&id=cli1&delay=3600");
    let o = pmnc(&["queue", "cancel", cage_arg, "cli1"]);
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    assert!(o.stdout.contains("cage worker: call cli1 cancelled (it was pending)"), "{}", o.stdout);
    assert_eq!(get(addr, "/result?id=cli1").text(), "cancelled 0 cancelled");
    let o = pmnc(&["queue", "cancel", cage_arg, "cli1"]);
    assert_eq!((o.code, o.stdout.trim()), (Some(0), "cage worker: call cli1 was already cancelled"));
    let o = pmnc(&["queue", "show", cage_arg, "cli1"]);
    assert!(o.stdout.contains("status:    cancelled"), "{}", o.stdout);
    let o = pmnc(&["queue", "ls", cage_arg]);
    assert!(o.stdout.lines().any(|l| l.starts_with("cancelled") && l.contains("cli1")), "{}", o.stdout);
    let o = pmnc(&["queue", "cancel", cage_arg, "c1"]);
    assert_eq!(o.code, Some(1));
    assert!(o.stderr.contains("cage worker: call \"c1\" is done: a call that ended cannot be cancelled"), "{}", o.stderr);
    let o = pmnc(&["queue", "cancel", cage_arg, "nope"]);
    assert_eq!(o.code, Some(1));
    assert!(o.stderr.contains("no call \"nope\""), "{}", o.stderr);

    // A cancel that was answered is on disk: after kill -9 and a restart, a call that was due
    // a second later still never runs.
    get(addr, "/enqueue?queue=free&fn=count&id=k1&delay=1");
    assert!(get(addr, "/cancel?id=k1").text().starts_with("true pending"));
    let due = Instant::now() + Duration::from_secs(1);
    let mut s = s;
    s.signal(9);
    s.wait_exit(wait).expect("pmnc exits on kill -9");
    let s = Server::start(&cage, &[]);
    let addr = s.addr("http");
    std::thread::sleep(due.saturating_duration_since(Instant::now()) + Duration::from_millis(300));
    assert_eq!(get(addr, "/result?id=k1").text(), "cancelled 0 cancelled");
    assert_eq!(get(addr, "/result?id=cli1").text(), "cancelled 0 cancelled");
}
