//! The redis resource against a real Redis (PMNC_TEST_REDIS_URL, default
//! redis://127.0.0.1:6379/0): commands and replies, maps, errors with their codes, multi
//! blocks, refused commands, transactions, and configuration problems. Every test uses keys
//! under its own prefix and deletes them at the end.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use rustomnic_core::Value;
use rustomnic_resource::testing::{configure, run_lua};
use rustomnic_resource::ResourceConfig;
use rustomnic_resource_redis::Redis;

const START: &str = "redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save \"\" --appendonly no";

fn url() -> String {
    std::env::var("PMNC_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".to_string())
}

/// The resource "cache" on the test server, or None (after a loud message) when no Redis runs.
fn cache(extra: &str) -> Option<ResourceConfig> {
    let url = url();
    let client = redis::Client::open(url.as_str()).expect("PMNC_TEST_REDIS_URL is not a Redis url");
    let addr = client.get_connection_info().addr().to_string();
    let reachable = addr.to_socket_addrs().ok().and_then(|mut a| a.next()).is_some_and(|a| TcpStream::connect_timeout(&a, Duration::from_secs(1)).is_ok());
    if !reachable {
        skipped(&format!("\n*** SKIPPED: no Redis at {url}. Start one with:\n***   {START}\n"));
        return None;
    }
    Some(configure(&Redis, "cache", &format!("url = \"{url}\"\n{extra}")).expect("config"))
}

/// A key prefix of its own for each test, so tests can run in parallel and again.
fn prefix(test: &str) -> Value {
    Value::str(format!("rustomnic-test:{}:{test}:", std::process::id()))
}

fn run(cache: ResourceConfig, lua: &str, prefix: &Value) -> Vec<Value> {
    let source = format!(
        "return {{ f = function(p)\n{lua}\nend, cleanup = function(p) local keys = pmnc.transaction.cache.keys(p .. '*') if #keys > 0 then pmnc.transaction.cache.del(keys) end end }}"
    );
    let result = run_lua(vec![cache.clone()], &source, "f", vec![prefix.clone()], Duration::from_secs(10));
    let _ = run_lua(vec![cache], &source, "cleanup", vec![prefix.clone()], Duration::from_secs(10));
    match result {
        Ok(values) => values,
        Err(e) => panic!("lua failed: {e:?}"),
    }
}

fn sorted_map(v: &Value) -> Vec<(String, String)> {
    let Value::Map(entries) = v else { panic!("not a map: {v:?}") };
    let mut out: Vec<(String, String)> = entries.iter().map(|(k, v)| (k.as_str().unwrap().to_string(), v.as_str().unwrap_or("?").to_string())).collect();
    out.sort();
    out
}

#[test]
fn set_get_incr_and_a_missing_key() {
    let Some(cache) = cache("") else { return };
    let p = prefix("basic");
    let r = run(
        cache,
        r#"
        local xa = pmnc.transaction.create()
        xa.cache.set(p .. "k", "v")
        xa.cache.incr(p .. "n")
        local ok, one = xa.execute()
        local c = pmnc.transaction.cache
        return ok, one, c.get(p .. "k"), c.incr(p .. "n"), c.get(p .. "missing") == nil,
               c.set(p .. "f", 1.5), c.get(p .. "f"), c.set(p .. "b", true), c.get(p .. "b"),
               c.mget(p .. "k", p .. "missing"), c.del({ p .. "k", p .. "n" })
        "#,
        &p,
    );
    assert_eq!(r[0], Value::str("OK"));
    assert_eq!(r[1], Value::Int(1));
    assert_eq!(r[2], Value::str("v"));
    assert_eq!(r[3], Value::Int(2));
    assert_eq!(r[4], Value::Bool(true));
    assert_eq!(r[6], Value::str("1.5"));
    assert_eq!(r[8], Value::str("1"));
    // MGET keeps the position of the missing key (nil inside an array comes back as nil).
    let Value::Array(items) = &r[9] else { panic!("{r:?}") };
    assert_eq!(items.len(), 2, "{r:?}");
    assert_eq!(items[0], Value::str("v"));
    assert_eq!(r[10], Value::Int(2), "a table argument is spread into several keys");
}

#[test]
fn hgetall_gives_a_map() {
    let Some(cache) = cache("") else { return };
    let p = prefix("hash");
    let r = run(
        cache,
        r#"
        local c = pmnc.transaction.cache
        local added = c.hset(p .. "h", { a = "1", b = "two" })
        return added, c.hgetall(p .. "h"), c.hgetall(p .. "nothing")
        "#,
        &p,
    );
    assert_eq!(r[0], Value::Int(2));
    assert_eq!(sorted_map(&r[1]), [("a".to_string(), "1".to_string()), ("b".to_string(), "two".to_string())]);
    assert_eq!(r[2], Value::Map(vec![]), "an empty hash is an empty map");
}

#[test]
fn resp3_replies_map_to_the_same_values() {
    let Some(cache) = cache("") else { return };
    // The same server with RESP3 (HELLO 3): maps, doubles and sets come typed.
    let url = url();
    let sep = if url.contains('?') { '&' } else { '?' };
    let Ok(resp3) = configure(&Redis, "cache", &format!("url = \"{url}{sep}protocol=resp3\"\n")) else { panic!("config") };
    drop(cache);
    let p = prefix("resp3");
    let r = run(
        resp3,
        r#"
        local c = pmnc.transaction.cache
        c.hset(p .. "h", "f", "v")
        c.zadd(p .. "z", 1.5, "m")
        return c.hgetall(p .. "h"), c.zscore(p .. "z", "m"), c.get(p .. "none") == nil
        "#,
        &p,
    );
    assert_eq!(sorted_map(&r[0]), [("f".to_string(), "v".to_string())]);
    assert_eq!(r[1], Value::Float(1.5));
    assert_eq!(r[2], Value::Bool(true));
}

#[test]
fn errors_carry_the_redis_code() {
    let Some(cache) = cache("") else { return };
    let p = prefix("errors");
    let r = run(
        cache,
        r#"
        local c = pmnc.transaction.cache
        c.set(p .. "s", "text")
        local xa = pmnc.transaction.create()
        xa.cache.get(p .. "s")
        xa.cache.lpush(p .. "s", "x")
        local ok, e = pcall(xa.execute)
        local ok2, e2 = pcall(c.nosuchcommand, "x")
        local ok3, e3 = pcall(c.set, p .. "k", nil)
        return ok, e.code, e.participant, tostring(e), ok2, e2.code, e2.message, ok3, e3.message
        "#,
        &p,
    );
    assert_eq!(r[0], Value::Bool(false));
    assert_eq!(r[1], Value::str("WRONGTYPE"));
    assert_eq!(r[2], Value::Int(2));
    assert_eq!(r[3], Value::str("resource cache (participant 2): LPUSH failed: Operation against a key holding the wrong kind of value [WRONGTYPE]"));
    assert_eq!(r[4], Value::Bool(false));
    assert_eq!(r[5], Value::str("ERR"));
    assert!(r[6].as_str().unwrap().starts_with("NOSUCHCOMMAND failed: unknown command"), "{r:?}");
    assert_eq!(r[7], Value::Bool(false));
    assert_eq!(r[8], Value::str("argument 2 is nil; Redis has no nil argument (pass \"\" or leave it out)"));
}

#[test]
fn multi_runs_a_block_atomically() {
    let Some(cache) = cache("") else { return };
    let p = prefix("multi");
    let r = run(
        cache,
        r#"
        local c = pmnc.transaction.cache
        local replies = c.multi({ "set", p .. "a", "1" }, { "incr", p .. "a" }, { "hgetall", p .. "none" })
        -- A command Redis refuses to queue: nothing of the block runs.
        local ok, e = pcall(c.multi, { "set", p .. "b", "1" }, { "get" })
        local b = c.exists(p .. "b")
        -- A command that fails when run: the others did run (Redis has no rollback).
        local ok2, e2 = pcall(c.multi, { "set", p .. "c", "x" }, { "incr", p .. "c" }, { "set", p .. "d", "y" })
        return replies, ok, e.code, e.message, b, ok2, e2.code, e2.message, c.get(p .. "d")
        "#,
        &p,
    );
    assert_eq!(r[0], Value::Array(vec![Value::str("OK"), Value::Int(2), Value::Map(vec![])]));
    assert_eq!(r[1], Value::Bool(false));
    assert_eq!(r[2], Value::str("ERR"));
    assert!(r[3].as_str().unwrap().starts_with("multi: command 2 (GET) was refused, so none ran: wrong number of arguments"), "{r:?}");
    assert_eq!(r[4], Value::Int(0));
    assert_eq!(r[5], Value::Bool(false));
    assert_eq!(r[6], Value::str("ERR"));
    assert!(r[7].as_str().unwrap().starts_with("multi: command 2 (INCR) failed (the block's other commands did run): value is not an integer"), "{r:?}");
    assert_eq!(r[8], Value::str("y"));
}

#[test]
fn commands_that_would_spoil_a_pooled_connection_are_refused() {
    let Some(cache) = cache("") else { return };
    let p = prefix("refused");
    let r = run(
        cache,
        r#"
        local c = pmnc.transaction.cache
        local out = {}
        for i, name in ipairs({ "select", "multi_", "subscribe", "watch" }) do
          local ok, e = pcall(c[name], "1")
          out[i] = e.message
        end
        local ok, e = pcall(c.multi, "set")
        out[#out + 1] = e.message
        return out
        "#,
        &p,
    );
    let Value::Array(m) = &r[0] else { panic!("{r:?}") };
    assert_eq!(m[0], Value::str("the command SELECT is not allowed here: the database is chosen by the resource's url (redis://host:port/DB)"));
    assert!(m[1].as_str().unwrap().starts_with("MULTI_ failed: unknown command"), "{m:?}");
    assert!(m[2].as_str().unwrap().starts_with("the command SUBSCRIBE is not allowed here"), "{m:?}");
    assert!(m[3].as_str().unwrap().starts_with("the command WATCH is not allowed here"), "{m:?}");
    assert_eq!(m[4], Value::str("multi: command 1 must be an array such as {\"set\", \"k\", \"v\"}, got string"));
}

#[test]
fn a_rolled_back_transaction_does_not_undo_redis_commands() {
    let Some(cache) = cache("") else { return };
    let p = prefix("rollback");
    let r = run(
        cache,
        r#"
        local xa = pmnc.transaction.create()
        xa.cache.set(p .. "k", "kept")
        xa.cache.bogus()
        local ok = pcall(xa.execute)
        return ok, pmnc.transaction.cache.get(p .. "k")
        "#,
        &p,
    );
    // Documented: Redis commands take effect when the transaction executes.
    assert_eq!(r, vec![Value::Bool(false), Value::str("kept")]);
}

#[test]
fn connections_are_reused_and_selected_by_the_url() {
    let Some(cache) = cache("pool_size = 2\n") else { return };
    let p = prefix("reuse");
    let r = run(
        cache,
        r#"
        local c = pmnc.transaction.cache
        local ids = {}
        for i = 1, 5 do ids[c.client("id")] = true end
        local n = 0
        for _ in pairs(ids) do n = n + 1 end
        local info = c.client("info")
        return n, info
        "#,
        &p,
    );
    assert_eq!(r[0], Value::Int(1), "one connection serves calls made one after another");
    let db = redis::Client::open(url().as_str()).unwrap().get_connection_info().redis_settings().db();
    assert!(r[1].as_str().unwrap().contains(&format!(" db={db} ")), "{r:?}");
}

#[test]
fn a_connection_closed_by_the_server_is_replaced() {
    let Some(cache) = cache("pool_size = 1\n") else { return };
    let p = prefix("killed");
    let r = run(
        cache,
        r#"
        local c = pmnc.transaction.cache
        local id = c.client("id")
        pcall(c.client, "kill", "id", id, "skipme", "no") -- the server closes the connection that sent this
        pmnc.sleep(1.2) -- idle long enough for the checkout's PING
        local value = c.set(p .. "k", "v")
        return value, c.client("id") ~= id
        "#,
        &p,
    );
    assert_eq!(r, vec![Value::str("OK"), Value::Bool(true)]);
}

#[test]
fn an_unreachable_server_fails_clearly() {
    let cache = configure(&Redis, "cache", "url = \"redis://127.0.0.1:1/0\"\n").unwrap();
    let r = run_lua(
        vec![cache],
        "return { f = function() local ok, e = pcall(pmnc.transaction.cache.get, 'k') return tostring(e) end }",
        "f",
        vec![],
        Duration::from_secs(5),
    )
    .unwrap();
    let text = r[0].as_str().unwrap();
    assert!(text.starts_with("resource cache (participant 1): cannot connect: 127.0.0.1:1/0: "), "{text}");
    assert!(text.to_lowercase().contains("refused"), "{text}");
}

#[test]
fn config_problems_name_the_key() {
    let missing = configure(&Redis, "cache", "pool_size = 2\n").unwrap_err();
    assert_eq!(missing.len(), 1, "{missing:?}");
    assert!(missing[0].contains("resources.cache: url is required"), "{missing:?}");
    let bad = configure(&Redis, "cache", "url = \"http://h\"\n").unwrap_err();
    assert!(bad[0].starts_with("cage.toml:2: resources.cache.url: not a usable Redis url"), "{bad:?}");
    let unknown = configure(&Redis, "cache", "url = \"redis://h\"\nhost = \"x\"\n").unwrap_err();
    assert!(unknown[0].starts_with("cage.toml:3: resources.cache.host: unknown key"), "{unknown:?}");
    std::env::set_var("RUSTOMNIC_REDIS_TEST_PASSWORD", "secret");
    assert!(configure(&Redis, "cache", "url = \"redis://:${RUSTOMNIC_REDIS_TEST_PASSWORD}@127.0.0.1:6379/2\"\n").is_ok());
}

/// Says loudly that a test did not run: written to the process's stderr directly, which the test
/// harness does not capture, so it shows in a plain `cargo test`.
fn skipped(message: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{message}");
}

/// Issue 22 #9: `recoverable` is true only when nothing of the transaction remains. A Redis
/// write cannot be rolled back, so a transaction that fails (or is rejected by accept) after
/// one is not recoverable; reads and refused commands leave nothing, so those stay recoverable.
#[test]
fn a_transaction_that_fails_after_a_redis_write_is_not_recoverable() {
    let Some(cache) = cache("") else { return };
    let p = prefix("recoverable");
    let out = run(
        cache,
        r#"
local function outcome(build, accept)
  local xa = pmnc.transaction.create(accept and { accept = accept } or nil)
  build(xa)
  local ok, e = pcall(xa.execute)
  if ok then return "ok" end
  return tostring(e.recoverable) .. " " .. tostring(e.message)
end
pmnc.transaction.cache.set(p .. "list", "not a list")
return
  outcome(function(xa) xa.cache.set(p .. "a", 1) xa.cache.lpush(p .. "list", "x") end),
  outcome(function(xa) xa.cache.get(p .. "a") xa.cache.lpush(p .. "list", "x") end),
  outcome(function(xa) xa.cache.lpush(p .. "list", "x") end),
  outcome(function(xa) xa.cache.set(p .. "b", 1) end, function() return false end),
  outcome(function(xa) xa.cache.get(p .. "b") end, function() return false end),
  outcome(function(xa) xa.cache.multi({ "set", p .. "c", 1 }, { "lpush", p .. "list", "x" }) end),
  pmnc.transaction.cache.get(p .. "a")
"#,
        &p,
    );
    let text: Vec<String> = out.iter().map(|v| v.as_str().unwrap_or("?").to_string()).collect();
    assert!(text[0].starts_with("false ") && text[0].contains("wrong kind of value"), "a write, then a failure: {text:?}");
    assert!(text[1].starts_with("true "), "a read, then a failure: {text:?}");
    assert!(text[2].starts_with("true "), "a refused command alone wrote nothing: {text:?}");
    assert_eq!(text[3], "false rejected by accept", "a write, then rejected: {text:?}");
    assert_eq!(text[4], "true rejected by accept", "a read, then rejected: {text:?}");
    assert!(text[5].starts_with("false "), "a multi block that failed half way: {text:?}");
    assert_eq!(text[6], "1", "the write of the failed transaction stayed, as documented");
}
