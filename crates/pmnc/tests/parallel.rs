//! `pmnc.parallel` through the real `pmnc` binary, one process with one worker thread: branches
//! that wait run at once, calls to another cage and transactions (HTTP resource calls, state
//! writes) in parallel, an error per branch, `any` closing
//! the others, the call's timeout, the request's deadline ending spinning and waiting branches
//! while other requests of the worker are answered, the branch cap and the nesting cap, the
//! request's memory share across branches, and the argument errors.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::*;

/// `{PORT}`: the http interface's port, which the http resource `self` calls.
const WEB_TOML: &str = r#"[lua]
request_memory_limit = "48MiB"

[interfaces.http]
listen = "127.0.0.1:{PORT}"
request_timeout = "5s"

[resources.self]
protocol = "http"
url = "http://127.0.0.1:{PORT}"

[interfaces.short]
protocol = "http"
handler = "http.handle"
listen = "127.0.0.1:0"
request_timeout = "1s"
"#;

const STOCK_TOML: &str = "request_timeout = \"10s\"\n";

const STOCK_LUA: &str = r#"local M = {}
local bumped = 0

function M.count(item)
  pmnc.sleep(0.2)
  return #item * 10, pmnc.request.caller
end

-- What a losing branch of pmnc.parallel.any would do after its wait.
function M.bump_later(s)
  pmnc.sleep(s)
  bumped = bumped + 1
  return bumped
end

function M.bumped() return bumped end

return M
"#;

const WEB_LUA: &str = r#"local M = {}

-- What branches did, read by later requests (one worker: one VM of this cage).
local seen = { closed = 0, late = 0 }

local function closer()
  return setmetatable({}, { __close = function() seen.closed = seen.closed + 1 end })
end

local function sleeper(s, v)
  return function() pmnc.sleep(s) return v end
end

function M.handle(request, response)
  local p = request.path
  local q = request.query
  local t0 = pmnc.clock()
  if p == "/three" then
    local r, failed = pmnc.parallel{ sleeper(0.3, "a"), sleeper(0.3, "b"), sleeper(0.3, "c") }
    return { took = pmnc.clock() - t0, failed = failed, values = { r[1].value, r[2].value, r[3].value }, ok = r[1].ok and r[2].ok and r[3].ok }
  elseif p == "/cages" then
    local items = { "ab", "abcd", "abcdef" }
    local branches = {}
    for i, item in ipairs(items) do branches[i] = function() return pmnc("stock").inv.count(item) end end
    local r, failed = pmnc.parallel(branches)
    return { took = pmnc.clock() - t0, failed = failed, counts = { r[1].value, r[2].value, r[3].value }, caller = r[1][2], n = r[1].n }
  elseif p == "/page" then
    pmnc.sleep(0.3)
    return "page " .. q.n
  elseif p == "/resources" then
    -- Transactions in branches: HTTP resource calls (to this interface) and state writes.
    local r, failed = pmnc.parallel{
      function() return pmnc.transaction.self.get("/page", { query = { n = "1" } }).body end,
      function() return pmnc.transaction.self.get("/page", { query = { n = "2" } }).body end,
      function() return pmnc.transaction.self.get("/page", { query = { n = "3" } }).body end,
      function() pmnc.state.set("from_branch", { n = 4 }); return pmnc.state.get("from_branch").n end,
    }
    return { took = pmnc.clock() - t0, failed = failed, bodies = { r[1].value, r[2].value, r[3].value }, state = r[4].value, stored = pmnc.state.get("from_branch").n }
  elseif p == "/mixed" then
    local r, failed = pmnc.parallel{
      function() return 1, 2 end,
      function() error("boom " .. q.token) end,
      function() error({ code = 7 }) end,
      sleeper(0.1, "late"),
      function() return pmnc("stock").nomodule.f() end,
    }
    return {
      failed = failed,
      first = { ok = r[1].ok, value = r[1].value, n = r[1].n, second = r[1][2] },
      boom = { ok = r[2].ok, message = r[2].message, error = r[2].error, traceback = r[2].traceback },
      table_error = { ok = r[3].ok, code = r[3].error.code },
      late = { ok = r[4].ok, value = r[4].value },
      cage = { ok = r[5].ok, message = r[5].message },
    }
  elseif p == "/any" then
    local before = pmnc("stock").inv.bumped()
    local closed, late = seen.closed, seen.late
    local r = pmnc.parallel.any{
      function() local c <close> = closer(); pmnc.sleep(0.4); seen.late = seen.late + 1; return "slow" end,
      sleeper(0.05, "fast"),
      function() local c <close> = closer(); return pmnc("stock").inv.bump_later(0.3) end,
    }
    local took = pmnc.clock() - t0
    local closed_at_once = seen.closed - closed
    -- Past the time the losers would have done their side effects.
    pmnc.sleep(0.6)
    return { value = r.value, index = r.index, took = took, closed = closed_at_once, late = seen.late - late, bumped = pmnc("stock").inv.bumped() - before }
  elseif p == "/anyfail" then
    local ok, e = pcall(pmnc.parallel.any, { function() error("one") end, function() pmnc.sleep(0.05) error("two") end })
    return { ok = ok, message = tostring(e), errors = #e.errors, second = e.errors[2].message }
  elseif p == "/timeout" then
    local r, failed = pmnc.parallel({ sleeper(0.1, "quick"), sleeper(5, "never"), function() while true do end end }, { timeout = 0.4 })
    return { took = pmnc.clock() - t0, failed = failed, first = r[1].value, second = { ok = r[2].ok, timeout = r[2].timeout, message = r[2].message }, third = r[3].timeout, remain = pmnc.request.remain() }
  elseif p == "/spin" then
    pmnc.log.info("spinning in a branch " .. pmnc.request.id)
    pmnc.parallel{ function() while true do end end, sleeper(0.1, 1) }
    return "not reached"
  elseif p == "/deadline" then
    local branches = {}
    for i = 1, 4 do branches[i] = function() local c <close> = closer(); pmnc.sleep(30); seen.late = seen.late + 1 end end
    pmnc.parallel(branches)
    return "not reached"
  elseif p == "/seen" then
    return seen
  elseif p == "/many" then
    local branches = {}
    for i = 1, tonumber(q.n) do branches[i] = function() return i end end
    local ok, r = pcall(pmnc.parallel, branches)
    if not ok then return { ok = false, message = tostring(r) } end
    return { ok = true, count = #r, last = r[#r].value }
  elseif p == "/nested" then
    local r = pmnc.parallel{
      function()
        local inner = pmnc.parallel{ sleeper(0.2, "x"), sleeper(0.2, "y") }
        return inner[1].value .. inner[2].value
      end,
      sleeper(0.2, "z"),
    }
    return { took = pmnc.clock() - t0, value = r[1].value .. r[2].value }
  elseif p == "/nestedcap" then
    local function inner()
      local b = {}
      for i = 1, 60 do b[i] = sleeper(0.05, i) end
      return #pmnc.parallel(b)
    end
    local r, failed = pmnc.parallel{ inner, inner }
    return { failed = failed, a = r[1].ok and r[1].value or r[1].message, b = r[2].ok and r[2].value or r[2].message }
  elseif p == "/deep" then
    local function deeper(d)
      local r = pmnc.parallel{ function() return deeper(d + 1) end }
      if not r[1].ok then return r[1].message end
      return r[1].value
    end
    return deeper(1)
  elseif p == "/memory" then
    local b = {}
    for i = 1, 3 do b[i] = function() local s = string.rep("x", 20 << 20) .. i; pmnc.sleep(0.1); return #s end end
    local r, failed = pmnc.parallel(b)
    local out = { failed = failed, messages = {} }
    for i = 1, 3 do if not r[i].ok then out.messages[#out.messages + 1] = r[i].message end end
    return out
  elseif p == "/arguments" then
    local results = {}
    for i, args in ipairs({
      { { function() end, "x" } },
      { "nope" },
      { { function() end, timeout = 1 } },
      { { function() end }, { timeout = -1 } },
      { { function() end }, { deadline = 1 } },
      { { function() end, nil, function() end } },
    }) do
      local ok, e = pcall(function() local r = pmnc.parallel(table.unpack(args, 1, 2)); return r end)
      results[i] = tostring(e)
    end
    local ok, e = pcall(function() local r = pmnc.parallel.any({}); return r end)
    results[#results + 1] = tostring(e)
    local co = coroutine.wrap(function() return pcall(function() local r = pmnc.parallel({ function() end }); return r end) end)
    local ok, e = co()
    results[#results + 1] = tostring(e)
    return results
  end
  return "quick"
end

return M
"#;

fn json(r: &Response, what: &str) -> serde_json::Value {
    assert_eq!(r.status, 200, "{what}: {}", r.text());
    json_body(r)
}

#[test]
fn parallel_branches_in_one_process() {
    let tree = Tree::new();
    tree.write("cages/web/cage.toml", &WEB_TOML.replace("{PORT}", &spare_port().to_string()));
    tree.write("cages/web/http.lua", WEB_LUA);
    tree.write("cages/stock/cage.toml", STOCK_TOML);
    tree.write("cages/stock/inv.lua", STOCK_LUA);
    let mut server = Server::start_with_workers(tree.path(), 1, &[]);
    let addr = server.addr("http");
    let short = server.addr("short");

    // Three waits of 0.3 s at once take about 0.3 s, not 0.9 s.
    let j = json(&get(addr, "/three"), "three");
    let took = j["took"].as_f64().unwrap();
    assert!((0.3..0.75).contains(&took), "three sleeps of 0.3 s in parallel took {took} s");
    assert_eq!(j["values"], serde_json::json!(["a", "b", "c"]));
    assert_eq!(j["failed"], 0);
    assert_eq!(j["ok"], true);

    // Calls to another cage in parallel: each waits 0.2 s there, and keeps the request's context.
    let j = json(&get(addr, "/cages"), "cages");
    assert_eq!(j["counts"], serde_json::json!([20, 40, 60]));
    assert_eq!(j["caller"], "web", "the called cage sees the calling cage: {j}");
    assert_eq!(j["n"], 2, "every value a branch returns is kept: {j}");
    let took = j["took"].as_f64().unwrap();
    assert!(took < 0.5, "three calls of 0.2 s in parallel took {took} s");

    // Transactions in branches: three HTTP resource calls of 0.3 s each, and a state write.
    let j = json(&get(addr, "/resources"), "resources");
    assert_eq!(j["failed"], 0, "{j}");
    assert_eq!(j["bodies"], serde_json::json!(["page 1", "page 2", "page 3"]));
    assert_eq!(j["state"], 4);
    assert_eq!(j["stored"], 4, "the branch's state write is committed: {j}");
    let took = j["took"].as_f64().unwrap();
    assert!(took < 0.75, "three HTTP resource calls of 0.3 s in parallel took {took} s");

    // One error per branch, the error value as raised; the others succeed.
    let j = json(&get(addr, "/mixed?token=T17"), "mixed");
    assert_eq!(j["failed"], 3, "{j}");
    assert_eq!(j["first"], serde_json::json!({"ok": true, "value": 1, "n": 2, "second": 2}));
    assert_eq!(j["boom"]["ok"], false);
    let message = j["boom"]["message"].as_str().unwrap();
    assert!(message.contains("http.lua") && message.ends_with("boom T17"), "the message names the module's line: {message}");
    assert!(j["boom"]["traceback"].as_str().unwrap().contains("stack traceback"), "{j}");
    assert_eq!(j["table_error"], serde_json::json!({"ok": false, "code": 7}), "a table error reaches Lua as the table");
    assert_eq!(j["late"], serde_json::json!({"ok": true, "value": "late"}));
    let cage_error = j["cage"]["message"].as_str().unwrap();
    assert!(cage_error.contains("stock.nomodule.f") && cage_error.contains("no module nomodule"), "{cage_error}");

    // any: the first to return wins, the others are closed at once (their to-be-closed handlers
    // ran) and never do what they would have done after their waits, here or in another cage.
    let j = json(&get(addr, "/any"), "any");
    assert_eq!(j["value"], "fast", "{j}");
    assert_eq!(j["index"], 2, "{j}");
    assert!(j["took"].as_f64().unwrap() < 0.3, "any returns with the first branch: {j}");
    assert_eq!(j["closed"], 2, "both losers were closed when any returned: {j}");
    assert_eq!(j["late"], 0, "a closed branch did not go on after its wait: {j}");
    assert_eq!(j["bumped"], 0, "the call to the other cage was closed too: {j}");

    // any where every branch fails: an error with every branch's error.
    let j = json(&get(addr, "/anyfail"), "anyfail");
    assert_eq!(j["ok"], false);
    let message = j["message"].as_str().unwrap();
    assert!(message.starts_with("pmnc.parallel.any: every branch failed: [1] ") && message.contains("one") && message.contains("[2] "), "{message}");
    assert_eq!(j["errors"], 2);
    assert!(j["second"].as_str().unwrap().ends_with("two"), "{j}");

    // A timeout shorter than the request's deadline: what is not done by then is stopped (a
    // spinning branch too) and reported, and the request goes on.
    let j = json(&get(addr, "/timeout"), "timeout");
    assert_eq!(j["first"], "quick");
    assert_eq!(j["second"]["ok"], false);
    assert_eq!(j["second"]["timeout"], true);
    assert!(j["second"]["message"].as_str().unwrap().contains("branch 2 did not end within the timeout of 0.4 s"), "{j}");
    assert_eq!(j["third"], true, "the spinning branch was stopped by the timeout: {j}");
    assert_eq!(j["failed"], 2);
    let took = j["took"].as_f64().unwrap();
    assert!((0.39..1.5).contains(&took), "the timeout of 0.4 s ended the call after {took} s");
    assert!(j["remain"].as_f64().unwrap() > 3.0, "the request itself goes on: {j}");

    // A spinning branch: the request ends at its deadline (1 s), and the single worker answers
    // other requests meanwhile.
    let spinner = std::thread::spawn(move || {
        let started = Instant::now();
        let r = get(short, "/spin");
        (r, started.elapsed())
    });
    assert!(server.wait_for("spinning in a branch", Duration::from_secs(5)).is_some(), "the spinning request started");
    for _ in 0..3 {
        let started = Instant::now();
        let r = get(addr, "/quick");
        assert_eq!(r.text(), "quick");
        assert!(started.elapsed() < Duration::from_millis(500), "a quick request waited {:?} behind a spinning branch", started.elapsed());
    }
    assert!(!spinner.is_finished(), "the quick requests were answered while the branch was still spinning");
    let (r, took) = spinner.join().unwrap();
    assert_eq!(r.status, 504, "{}", r.text());
    assert!(r.text().contains("deadline exceeded"), "{}", r.text());
    assert!(took >= Duration::from_millis(900) && took < Duration::from_millis(2500), "the spinning request ended after {took:?}");

    // The request's deadline ends every branch: their to-be-closed handlers run, nothing after
    // their waits does.
    let before = json(&get(addr, "/seen"), "seen");
    let started = Instant::now();
    let r = get(short, "/deadline");
    assert_eq!(r.status, 504, "{}", r.text());
    assert!(started.elapsed() < Duration::from_millis(2500), "{:?}", started.elapsed());
    let after = json(&get(addr, "/seen"), "seen");
    assert_eq!(after["closed"].as_i64().unwrap() - before["closed"].as_i64().unwrap(), 4, "every branch was closed: {before} -> {after}");
    assert_eq!(after["late"], before["late"], "no branch went on past its wait");

    // The cap: 100 branches run, 101 are refused; nested calls count against the same cap.
    let j = json(&get(addr, "/many?n=100"), "many");
    assert_eq!(j, serde_json::json!({"ok": true, "count": 100, "last": 100}));
    let j = json(&get(addr, "/many?n=101"), "many");
    assert_eq!(j["ok"], false);
    assert!(j["message"].as_str().unwrap().contains("101 branches, over the limit of 100"), "{j}");
    let j = json(&get(addr, "/nested"), "nested");
    assert_eq!(j["value"], "xyz");
    assert!(j["took"].as_f64().unwrap() < 0.35, "nested branches run at once too: {j}");
    let j = json(&get(addr, "/nestedcap"), "nestedcap");
    assert_eq!(j["failed"], 1, "{j}");
    assert_eq!(j["a"], 60, "{j}");
    let b = j["b"].as_str().unwrap();
    assert!(b.contains("60 branches (62 already alive in this request) are over the limit of 100"), "{b}");

    let r = get(addr, "/deep");
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().ends_with("pmnc.parallel: calls nested 11 deep, over the limit of 10"), "{}", r.text());

    // Branches share the request's memory share: three branches holding 20 MiB each do not all
    // fit in 48 MiB; the request itself goes on.
    let j = json(&get(addr, "/memory"), "memory");
    assert!(j["failed"].as_i64().unwrap() >= 1, "{j}");
    for m in j["messages"].as_array().unwrap() {
        assert!(m.as_str().unwrap().starts_with("not enough memory: the request holds more than its limit of 48 MiB"), "{m}");
    }

    // Bad arguments name what is wrong and where.
    let j = json(&get(addr, "/arguments"), "arguments");
    let texts: Vec<&str> = j.as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    let want = [
        "pmnc.parallel: branch 2 must be a function, got string",
        "pmnc.parallel(branches [, options]): branches must be a table of functions, got string",
        "the branches table holds only functions at 1..1 (found the key timeout; options go in the second argument)",
        "pmnc.parallel: timeout must be a number of seconds above zero, got -1",
        "pmnc.parallel: unknown option deadline (known: timeout)",
        // {f, nil, g}: Lua may take its length as 3 or 1; either way the hole is named.
        "pmnc.parallel: ",
        "pmnc.parallel.any: no branches",
        "pmnc.parallel may only be called from a request's own code or from a branch",
    ];
    assert_eq!(texts.len(), want.len(), "{texts:?}");
    assert!(texts[5].contains("branch 2 must be a function, got nil") || texts[5].contains("found the key 3"), "{}", texts[5]);
    for (text, want) in texts.iter().zip(want) {
        assert!(text.contains(want), "{text:?} should say {want:?}");
        assert!(text.contains("http.lua:"), "the error points at the caller's line: {text}");
    }
}
