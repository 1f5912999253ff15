//! Calls between cages of one process through the real `pmnc` binary: results, request context,
//! errors, deadlines, value types and modules shared by every cage.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::*;

const WEB_TOML: &str = "[interfaces.http]\nlisten = \"127.0.0.1:0\"\nrequest_timeout = \"1s\"\n";
/// The worker's own timeout is long: calls must still end at the caller's deadline.
const WORKER_TOML: &str = "request_timeout = \"10s\"\n";

const WEB_HTTP_LUA: &str = r#"local M = {}

local function caught(f)
  local ok, e = pcall(f)
  return { ok = ok, message = tostring(e) }
end

function M.handle(request, response)
  local p = request.path
  local q = request.query
  if p == "/call" then
    local r = pmnc("worker").work.handle(q.x)
    return { result = r, id = pmnc.request.id, cage = pmnc.cage, remain = pmnc.request.remain() }
  elseif p == "/fail" then
    return pmnc("worker").work.fail(q.token)
  elseif p == "/failcaught" then
    return caught(function() return pmnc("worker").work.fail(q.token) end)
  elseif p == "/slow" then
    return pmnc("worker").work.slow()
  elseif p == "/slowcaught" then
    local r = caught(function() return pmnc("worker").work.slow() end)
    return "swallowed: " .. r.message
  elseif p == "/missing" then
    return {
      cage = caught(function() return pmnc("nope" .. q.n).work.handle(1) end),
      module = caught(function() return pmnc("worker").nomod.handle(1) end),
      fn = caught(function() return pmnc("worker").work.nofunction(1) end),
      private = caught(function() return pmnc("worker").work._secret(1) end),
    }
  elseif p == "/types" then
    local results = table.pack(pmnc("worker").work.echo(
      42, -7, 2.0, 1.5, "text", "a\0b", true, false,
      { n = 1, f = 2.5, list = { 1, 2.0, "three" }, deep = { a = { b = { c = 3 } } } },
      { 10, 20, 30 },
      pmnc.json.array()))
    local seen_by_worker = results[1]
    local values = {}
    for i = 2, results.n do values[i - 1] = results[i] end
    return { seen_by_worker = seen_by_worker, seen_by_web = pmnc.describe.all(table.unpack(values)), values = values }
  elseif p == "/shared" then
    return {
      web = pmnc.util.tag(q.x),
      worker = pmnc("worker").work.shared(q.x),
      web_greet = pmnc.greet.hi(),
      worker_greet = pmnc("worker").work.greet(),
    }
  end
  response.status = 404
  return "no route " .. p
end

return M
"#;

const WORKER_WORK_LUA: &str = r#"local M = {}

function M.handle(x)
  return {
    x = x,
    doubled = x .. x,
    caller = pmnc.request.caller,
    id = pmnc.request.id,
    cage = pmnc.cage,
    interface = pmnc.request.interface,
    remain = pmnc.request.remain(),
  }
end

function M.fail(token)
  error("worker exploded " .. token)
end

function M.slow()
  -- Even a callee that catches its own sleep error ends at the caller's deadline.
  pcall(pmnc.sleep, 30)
  return "late"
end

function M.echo(...)
  return pmnc.describe.all(...), ...
end

function M.shared(x)
  return pmnc.util.tag(x)
end

function M.greet()
  return pmnc.greet.hi()
end

function M._secret()
  return "private"
end

return M
"#;

/// Types of values as Lua sees them: math.type for numbers, length for strings, tables by key.
const SHARED_DESCRIBE_LUA: &str = r##"local M = {}

local function describe(v)
  local t = type(v)
  if t == "number" then
    return math.type(v)
  elseif t == "string" then
    return "string:" .. #v
  elseif t == "table" then
    local out = { _n = #v }
    for k, x in pairs(v) do out[type(k) .. ":" .. tostring(k)] = describe(x) end
    return out
  end
  return t
end

function M.all(...)
  local out = {}
  for i = 1, select("#", ...) do out[i] = describe((select(i, ...))) end
  return out
end

return M
"##;

const SHARED_UTIL_LUA: &str = r#"local M = {}

function M.tag(x)
  return "util:" .. pmnc.cage .. ":" .. x
end

return M
"#;

fn app() -> (Tree, Server) {
    let tree = Tree::new();
    tree.write("cages/web/cage.toml", WEB_TOML);
    tree.write("cages/web/http.lua", WEB_HTTP_LUA);
    tree.write("cages/web/greet.lua", "local M = {}\nfunction M.hi() return \"own greet of \" .. pmnc.cage end\nreturn M\n");
    tree.write("cages/worker/cage.toml", WORKER_TOML);
    tree.write("cages/worker/work.lua", WORKER_WORK_LUA);
    tree.write("cages/.shared/describe.lua", SHARED_DESCRIBE_LUA);
    tree.write("cages/.shared/util.lua", SHARED_UTIL_LUA);
    tree.write("cages/.shared/greet.lua", "local M = {}\nfunction M.hi() return \"shared greet of \" .. pmnc.cage end\nreturn M\n");
    let server = Server::start(tree.path(), &[]);
    (tree, server)
}

fn token() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    format!("t{}x{nanos}", std::process::id())
}

#[test]
fn a_call_returns_the_result_and_carries_caller_and_request_id() {
    let (_tree, server) = app();
    let addr = server.addr("http");
    let x = token();
    let r = get(addr, &format!("/call?x={x}"));
    assert_eq!(r.status, 200, "{}", r.text());
    let j = json_body(&r);
    let result = &j["result"];
    assert_eq!(result["x"], x);
    assert_eq!(result["doubled"], format!("{x}{x}"), "the callee's code ran");
    assert_eq!(result["cage"], "worker");
    assert_eq!(result["caller"], "web", "pmnc.request.caller in the callee");
    assert_eq!(result["interface"], "pmnc");
    let id = request_id(&r);
    assert_eq!(j["id"], id, "the caller's pmnc.request.id is the x-request-id");
    assert_eq!(result["id"], id, "the callee sees the caller's request id");
    assert_eq!(j["cage"], "web");
    // The callee runs under the caller's 1s deadline, not its own 10s request_timeout.
    let callee_remain = result["remain"].as_f64().unwrap();
    let caller_remain = j["remain"].as_f64().unwrap();
    assert!(callee_remain <= 1.0 && callee_remain > 0.5, "callee remain {callee_remain}");
    assert!(caller_remain <= callee_remain, "caller remain {caller_remain} after the call, callee {callee_remain} during it");
}

#[test]
fn a_callee_error_names_cage_module_function_and_line() {
    let (_tree, mut server) = app();
    let addr = server.addr("http");
    let line = line_of(WORKER_WORK_LUA, "error(\"worker exploded");
    let at = format!("worker/work.lua:{line}:");

    let tok = token();
    let r = get(addr, &format!("/failcaught?token={tok}"));
    assert_eq!(r.status, 200, "{}", r.text());
    let j = json_body(&r);
    assert_eq!(j["ok"], false);
    let message = j["message"].as_str().unwrap();
    assert!(message.contains("worker.work.fail"), "names cage, module and function: {message}");
    assert!(message.contains(&format!("{at} worker exploded {tok}")), "names the callee's file:line and error: {message}");

    // Uncaught in the caller: a 500 without the text, the text in the caller's log with the id.
    let tok = token();
    let r = get(addr, &format!("/fail?token={tok}"));
    assert_eq!(r.status, 500);
    let id = request_id(&r);
    assert!(r.text().contains(&id) && !r.text().contains(&tok), "{}", r.text());
    let logged = server
        .wait_for_all(&[&id, "worker.work.fail", &tok], Duration::from_secs(5))
        .unwrap_or_else(|| panic!("no log line of {id} with the callee's error:\n{}", server.log.join("\n")));
    assert!(logged.contains(&at), "{logged}");
    assert!(logged.contains("cage=web"), "logged by the caller's cage: {logged}");
}

#[test]
fn a_slow_callee_ends_at_the_callers_deadline() {
    let (_tree, server) = app();
    let addr = server.addr("http");
    for path in ["/slow", "/slowcaught"] {
        let started = Instant::now();
        let r = get(addr, path);
        let took = started.elapsed();
        println!("{path}: {} after {took:?}", r.status);
        assert_eq!(r.status, 504, "{path}: {}", r.text());
        assert!(!r.text().contains("swallowed") && !r.text().contains("late"), "{path}: {}", r.text());
        assert!(r.text().contains(&request_id(&r)));
        assert!(took >= Duration::from_millis(950) && took < Duration::from_millis(2500), "{path}: answered after {took:?}");
    }
}

#[test]
fn calling_what_does_not_exist_is_a_clear_error() {
    let (_tree, server) = app();
    let addr = server.addr("http");
    let n = std::process::id();
    let r = get(addr, &format!("/missing?n={n}"));
    assert_eq!(r.status, 200, "{}", r.text());
    let j = json_body(&r);
    for case in ["cage", "module", "fn", "private"] {
        assert_eq!(j[case]["ok"], false, "{case}: {j}");
    }
    let cage = j["cage"]["message"].as_str().unwrap();
    assert!(cage.contains(&format!("no cage named nope{n}")), "{cage}");
    assert!(cage.contains("web") && cage.contains("worker"), "lists the cages that do run: {cage}");
    let module = j["module"]["message"].as_str().unwrap();
    assert!(module.contains("worker") && module.contains("no module nomod"), "{module}");
    let function = j["fn"]["message"].as_str().unwrap();
    assert!(function.contains("worker") && function.contains("no function nofunction"), "{function}");
    let private = j["private"]["message"].as_str().unwrap();
    assert!(private.contains("_secret") && private.contains("private"), "{private}");
}

#[test]
fn values_keep_their_types_across_cages() {
    let (_tree, server) = app();
    let r = get(server.addr("http"), "/types");
    assert_eq!(r.status, 200, "{}", r.text());
    let j = json_body(&r);
    let expected = serde_json::json!([
        "integer",
        "integer",
        "float",
        "float",
        "string:4",
        "string:3",
        "boolean",
        "boolean",
        {
            "_n": 0,
            "string:n": "integer",
            "string:f": "float",
            "string:list": { "_n": 3, "number:1": "integer", "number:2": "float", "number:3": "string:5" },
            "string:deep": { "_n": 0, "string:a": { "_n": 0, "string:b": { "_n": 0, "string:c": "integer" } } },
        },
        { "_n": 3, "number:1": "integer", "number:2": "integer", "number:3": "integer" },
        { "_n": 0 },
    ]);
    assert_eq!(j["seen_by_worker"], expected, "arguments as the callee sees them");
    assert_eq!(j["seen_by_web"], expected, "results as the caller sees them");
    let values = &j["values"];
    assert_eq!(values[0], 42);
    assert_eq!(values[1], -7);
    assert_eq!(values[3], 1.5);
    assert_eq!(values[4], "text");
    assert_eq!(values[5], "a\u{0}b");
    assert_eq!(values[6], true);
    assert_eq!(values[7], false);
    assert_eq!(values[8]["list"], serde_json::json!([1, 2.0, "three"]));
    assert_eq!(values[8]["deep"]["a"]["b"]["c"], 3);
    assert_eq!(values[9], serde_json::json!([10, 20, 30]));
    assert_eq!(values[10], serde_json::json!([]), "an empty array stays an array");
}

#[test]
fn shared_modules_serve_every_cage() {
    let (_tree, server) = app();
    let x = token();
    let r = get(server.addr("http"), &format!("/shared?x={x}"));
    assert_eq!(r.status, 200, "{}", r.text());
    let j = json_body(&r);
    assert_eq!(j["web"], format!("util:web:{x}"), ".shared/util.lua in web runs as web");
    assert_eq!(j["worker"], format!("util:worker:{x}"), ".shared/util.lua in worker runs as worker");
    assert_eq!(j["web_greet"], "own greet of web", "a cage's own module wins over .shared");
    assert_eq!(j["worker_greet"], "shared greet of worker");
}
