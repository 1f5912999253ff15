//! The read cache of resources (issue 27, docs/decisions/143) through the real binary against
//! PostgreSQL: a cached call is one query per TTL, a committed `invalidates` (or
//! `pmnc.cache.invalidate`) makes the next call query again and a rolled-back one does not,
//! identical calls on four workers run one query (single flight), a failure is shared with the
//! waiters and never kept; the state and redis resources cache the same way. Queries are counted
//! with a sequence: `nextval` moves once per query that ran, whatever the transaction did.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;

fn postgres_url() -> String {
    std::env::var("PMNC_TEST_POSTGRES_URL").unwrap_or_else(|_| "postgresql://postgres@127.0.0.1:5432/test".into())
}

fn redis_url() -> String {
    std::env::var("PMNC_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
}

/// Whether `host:port` of `url` answers; says loudly how to start the server when it does not.
fn up(url: &str, what: &str, start: &str) -> bool {
    let rest = url.split("://").nth(1).unwrap_or("");
    let hostport = rest.rsplit('@').next().and_then(|r| r.split('/').next()).unwrap_or("").to_string();
    let reachable = hostport.parse().ok().and_then(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_secs(2)).ok()).is_some();
    if !reachable {
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "SKIPPED: {what} is not reachable at {hostport}; start it with: {start}");
    }
    reachable
}

fn postgres_up() -> bool {
    up(&postgres_url(), "PostgreSQL (PMNC_TEST_POSTGRES_URL)", "service postgresql start")
}

const HANDLER: &str = r#"
local M = {}
-- One table per worker VM: its address tells the workers apart.
local me = {}
local worker = tostring(me)
local db = pmnc.transaction.db

local function next_sql(q)
  if q.fail then return "select nextval('" .. q.seq .. "') / (select 0 from pg_sleep(" .. q.fail .. ")) as n" end
  if q.slow then return "select nextval('" .. q.seq .. "') as n, (select 1 from pg_sleep(" .. q.slow .. ")) as slept" end
  return "select nextval('" .. q.seq .. "') as n"
end

local function keys_of(text)
  local keys = {}
  for k in text:gmatch("[^,]+") do keys[#keys + 1] = k end
  return keys
end

local function failed(e)
  if type(e) == "table" then return "err|" .. tostring(e.code) .. "|" .. tostring(e.message) end
  return "err|" .. tostring(e)
end

function M.handle(request, response)
  local q, p = request.query, request.path
  if p == "/reset" then
    db.execute("drop sequence if exists " .. q.seq)
    db.execute("create sequence " .. q.seq)
    return "ok"
  elseif p == "/next" then
    return tostring(db.execute(next_sql(q)).rows[1].n)
  elseif p == "/cached" then
    local ok, r = pcall(db.cached{ key = q.key, ttl = tonumber(q.ttl or "60") }.execute, next_sql(q))
    if not ok then return failed(r) end
    return worker .. "|" .. tostring(r.rows[1].n)
  elseif p == "/write" then
    -- A transaction whose first participant invalidates `keys`; with `fail` a second one fails
    -- (so it rolls back); with `peek` its accept reads that cached key before the commit.
    local seen = "-"
    local opts = nil
    if q.peek then
      opts = { accept = function(outcomes)
        seen = tostring(db.cached{ key = q.peek, ttl = 60 }.execute(next_sql(q)).rows[1].n)
        return outcomes[2] == nil or outcomes[2].ok
      end }
    end
    local xa = pmnc.transaction.create(opts)
    xa.db.invalidates(keys_of(q.keys)).execute("select 1")
    if q.rollback then xa.db.execute("select 1/0") end
    local ok = pcall(xa.execute)
    return (ok and "committed" or "rolled back") .. "|" .. seen
  elseif p == "/invalidate" then
    pmnc.cache.invalidate("db", keys_of(q.keys))
    return "ok"
  elseif p == "/misuse" then
    local out = {}
    -- Each case keeps its result in a local: a tail call would leave no line of http.lua to
    -- point at.
    local cases = {
      function() local v = db.cached{ key = "", ttl = 1 } return v end,
      function() local v = db.cached{ key = "k", ttl = 0 } return v end,
      function() local v = db.cached{ key = "k", ttl = "1" } return v end,
      function() local v = db.cached{ key = "k", ttl = 1, tll = 2 } return v end,
      function() local v = db.cached{ key = "k*", ttl = 1 } return v end,
      function() local v = db.cached{ key = string.rep("k", 1025), ttl = 1 } return v end,
      function() local xa = pmnc.transaction.create() local v = xa.db.invalidates{} return v end,
      function() local xa = pmnc.transaction.create() local v = xa.db.invalidates{ "a", 7 } return v end,
      function() local v = pmnc.cache.invalidate("nosuch", "k") return v end,
    }
    for i, f in ipairs(cases) do
      local ok, e = pcall(f)
      out[i] = ok and "no error" or tostring(e)
    end
    return table.concat(out, "\n")
  elseif p == "/state" then
    if q.set then
      if q.invalidate then
        pmnc.state.invalidates{ "st:" .. q.k }.set(q.k, q.set)
      else
        pmnc.state.set(q.k, q.set)
      end
      return "ok"
    end
    return tostring(pmnc.state.cached{ key = "st:" .. q.k, ttl = 60 }.get(q.k))
  elseif p == "/redis" then
    if q.cached then return tostring(pmnc.transaction.cache.cached{ key = "r:" .. q.k, ttl = 60 }.incr(q.k)) end
    return tostring(pmnc.transaction.cache.incr(q.k))
  end
  return "?"
end
return M
"#;

/// A unique sequence name for one test run.
fn seq(tag: &str) -> String {
    format!("rc_{tag}_{}", std::process::id())
}

fn value(r: &str) -> String {
    r.rsplit('|').next().unwrap_or("").to_string()
}

fn cage(workers: usize, extra: &str) -> (Tree, Server, SocketAddr) {
    let toml = format!(
        "{}request_timeout = \"10s\"\n\n[resources.db]\nprotocol = \"postgresql\"\nurl = \"{}\"\npool_size = 8\n{extra}",
        http_cage_toml(""),
        postgres_url()
    );
    start_http_cage(&toml, HANDLER, workers)
}

fn metric(text: &str, name: &str, extra: &str) -> f64 {
    let key = format!("{name}{{cage=\"c\",resource=\"db\"{extra}}}");
    sample(text, &key).unwrap_or_else(|| panic!("no {key} in:\n{text}"))
}

#[test]
fn cached_reads_last_their_ttl_and_go_with_committed_invalidations() {
    if !postgres_up() {
        return;
    }
    let (_t, mut s, http) = cage(2, "");
    let monitor = monitor_addr(&mut s);
    let sq = seq("ttl");
    assert_eq!(get(http, &format!("/reset?seq={sq}")).text(), "ok");

    // Within the TTL: one query, the same value twice (the second is no query: see /next below).
    let first = value(&get(http, &format!("/cached?seq={sq}&key=a&ttl=60")).text());
    assert_eq!(first, "1");
    assert_eq!(value(&get(http, &format!("/cached?seq={sq}&key=a&ttl=60")).text()), "1");
    assert_eq!(get(http, &format!("/next?seq={sq}")).text(), "2", "the cached call queried twice");

    // After the TTL a new query runs (the value moves on by exactly one).
    assert_eq!(value(&get(http, &format!("/cached?seq={sq}&key=short&ttl=0.3")).text()), "3");
    let started = Instant::now();
    let mut last = String::new();
    assert!(
        until(Duration::from_secs(5), || {
            last = value(&get(http, &format!("/cached?seq={sq}&key=short&ttl=0.3")).text());
            last != "3"
        }),
        "the entry never expired"
    );
    assert_eq!(last, "4");
    assert!(started.elapsed() >= Duration::from_millis(250), "expired after {:?}, before its ttl", started.elapsed());

    // A committed invalidation: the key is still there inside the transaction's accept (before
    // the commit), gone after it.
    assert_eq!(get(http, &format!("/write?seq={sq}&keys=a&peek=a")).text(), "committed|1");
    assert_eq!(value(&get(http, &format!("/cached?seq={sq}&key=a")).text()), "5");

    // A rolled-back one drops nothing.
    assert_eq!(get(http, &format!("/write?seq={sq}&keys=a&rollback=1")).text(), "rolled back|-");
    assert_eq!(value(&get(http, &format!("/cached?seq={sq}&key=a")).text()), "5");

    // Prefixes, and several keys at once.
    for k in ["price:1", "price:2", "stock:1"] {
        get(http, &format!("/cached?seq={sq}&key={k}"));
    }
    let before = get(http, &format!("/next?seq={sq}")).text().parse::<i64>().unwrap();
    assert_eq!(get(http, &format!("/write?seq={sq}&keys=price:*,a")).text(), "committed|-");
    assert_eq!(value(&get(http, &format!("/cached?seq={sq}&key=stock:1")).text()).parse::<i64>().unwrap(), before - 1, "stock:1 was dropped");
    assert_eq!(value(&get(http, &format!("/cached?seq={sq}&key=price:1")).text()), (before + 1).to_string());
    assert_eq!(value(&get(http, &format!("/cached?seq={sq}&key=price:2")).text()), (before + 2).to_string());
    assert_eq!(value(&get(http, &format!("/cached?seq={sq}&key=a")).text()), (before + 3).to_string());

    // pmnc.cache.invalidate, outside any transaction.
    assert_eq!(get(http, "/invalidate?keys=a").text(), "ok");
    assert_eq!(value(&get(http, &format!("/cached?seq={sq}&key=a")).text()), (before + 4).to_string());

    // The figures, per cage and resource.
    let text = get(monitor, "/metrics").text();
    assert!(metric(&text, "pmnc_resource_cache_calls", ",outcome=\"hit\"") >= 4.0, "{text}");
    assert!(metric(&text, "pmnc_resource_cache_calls", ",outcome=\"miss\"") >= 9.0, "{text}");
    assert_eq!(metric(&text, "pmnc_resource_cache_entries", ""), 5.0, "{text}");
    assert!(metric(&text, "pmnc_resource_cache_bytes", "") > 0.0, "{text}");
    assert_eq!(metric(&text, "pmnc_resource_cache_evictions", ""), 0.0, "{text}");

    // Misuse says what is wrong and names the resource.
    let misuse = get(http, "/misuse").text();
    let lines: Vec<&str> = misuse.lines().collect();
    let expect = [
        "pmnc.transaction.db.cached{key = ..., ttl = ...}: key must not be empty",
        "pmnc.transaction.db.cached{key = ..., ttl = ...}: ttl must be a number of seconds above 0",
        "ttl must be a number of seconds above 0 and at most 31536000, got 1",
        "unknown field tll (known: key, ttl)",
        "key k* ends in *",
        "key is 1025 bytes long, over the limit of 1024",
        "xa.db.invalidates{...}: the list of keys is empty",
        "xa.db.invalidates{...}: key 2 must be a string, got number",
        "pmnc.cache.invalidate: cage c has no resource nosuch (resources: db, state)",
    ];
    assert_eq!(lines.len(), expect.len(), "{misuse}");
    for (line, want) in lines.iter().zip(expect) {
        assert!(line.contains(want), "{line:?} does not say {want:?}");
        assert!(line.contains("http.lua:"), "{line:?} does not point at the caller");
    }
}

#[test]
fn identical_calls_on_four_workers_run_one_query_and_share_a_failure() {
    if !postgres_up() {
        return;
    }
    // A small cache_max_value would refuse the rows; the default keeps them.
    let (_t, mut s, http) = cage(4, "cache_size = \"1MiB\"\n");
    let monitor = monitor_addr(&mut s);
    let sq = seq("flight");
    assert_eq!(get(http, &format!("/reset?seq={sq}")).text(), "ok");

    let burst = |path: String| -> Vec<String> {
        let handles: Vec<_> = (0..20)
            .map(|_| {
                let path = path.clone();
                std::thread::spawn(move || get(http, &path).text())
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    };

    // 20 identical calls at once, each query taking 0.5 s: one query, 20 equal answers.
    let answers = burst(format!("/cached?seq={sq}&key=row&slow=0.5"));
    let workers: BTreeSet<&str> = answers.iter().map(|a| a.split('|').next().unwrap_or("")).collect();
    assert!(workers.len() >= 2, "the calls did not spread over the workers: {answers:?}");
    assert!(answers.iter().all(|a| value(a) == "1"), "{answers:?}");
    assert_eq!(get(http, &format!("/next?seq={sq}")).text(), "2", "more than one query ran");
    let text = get(monitor, "/metrics").text();
    assert_eq!(metric(&text, "pmnc_resource_cache_calls", ",outcome=\"miss\""), 1.0, "{text}");
    let waits = metric(&text, "pmnc_resource_cache_calls", ",outcome=\"wait\"");
    let hits = metric(&text, "pmnc_resource_cache_calls", ",outcome=\"hit\"");
    assert_eq!(waits + hits, 19.0, "{text}");
    assert!(waits >= 1.0, "no call waited for the running one: {text}");

    // A failing first call: its waiters get its error (division by zero, 22012), one query ran,
    // and nothing is kept.
    let answers = burst(format!("/cached?seq={sq}&key=bad&fail=0.5"));
    assert!(answers.iter().all(|a| a.starts_with("err|22012|") && a.contains("division by zero")), "{answers:?}");
    assert_eq!(get(http, &format!("/next?seq={sq}")).text(), "4", "the failing query ran more than once");
    assert_eq!(value(&get(http, &format!("/cached?seq={sq}&key=bad")).text()), "5", "a failure was cached");
    assert_eq!(value(&get(http, &format!("/cached?seq={sq}&key=bad")).text()), "5");
}

#[test]
fn state_and_redis_calls_are_cached_too() {
    let redis = up(&redis_url(), "Redis (PMNC_TEST_REDIS_URL)", "service redis-server start");
    let toml = if redis { format!("{}\n[resources.cache]\nprotocol = \"redis\"\nurl = \"{}\"\n", http_cage_toml(""), redis_url()) } else { http_cage_toml("") };
    let (_t, _s, http) = start_http_cage(&toml, HANDLER, 2);

    assert_eq!(get(http, "/state?k=x&set=one").text(), "ok");
    assert_eq!(get(http, "/state?k=x").text(), "one");
    // A write that does not invalidate leaves the cached value; one that does drops it at commit.
    assert_eq!(get(http, "/state?k=x&set=two").text(), "ok");
    assert_eq!(get(http, "/state?k=x").text(), "one");
    assert_eq!(get(http, "/state?k=x&set=three&invalidate=1").text(), "ok");
    assert_eq!(get(http, "/state?k=x").text(), "three");

    if !redis {
        return;
    }
    let k = format!("rc_counter_{}", std::process::id());
    let first: i64 = get(http, &format!("/redis?k={k}&cached=1")).text().parse().unwrap();
    assert_eq!(get(http, &format!("/redis?k={k}&cached=1")).text(), first.to_string(), "the cached INCR ran again");
    assert_eq!(get(http, &format!("/redis?k={k}")).text(), (first + 1).to_string());
}

#[test]
fn cache_keys_are_checked_with_file_line_and_key() {
    let t = Tree::new();
    t.write(
        "web/cage.toml",
        "[resources.db]\nprotocol = \"postgresql\"\nurl = \"postgresql://u@h/d\"\ncache_size = \"lots\"\ncache_max_value = 0\n\n[resources.files]\nprotocol = \"file\"\nroot = \".\"\ncache_size = \"64MiB\"\ncache_max_value = \"64KiB\"\n",
    );
    let cage = t.path().join("web");
    let out = pmnc(&["check", &cage.display().to_string()]);
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    let toml = cage.join("cage.toml").canonicalize().unwrap().display().to_string();
    for want in [format!("{toml}:4: resources.db.cache_size: "), format!("{toml}:5: resources.db.cache_max_value: must be greater than zero")] {
        assert!(out.stderr.contains(&want), "missing {want:?} in:\n{}", out.stderr);
    }
    assert!(!out.stderr.contains("resources.files"), "the good keys were refused:\n{}", out.stderr);
}

/// Two processes of one cage in a flock: an invalidation committed in one drops the key in the
/// other's cache too (the caches themselves stay local).
#[test]
fn an_invalidation_reaches_the_other_processes_of_the_flock() {
    if !postgres_up() {
        return;
    }
    let Some(nats) = common::nats::Nats::start("an_invalidation_reaches_the_other_processes_of_the_flock", "") else { return };
    let seq = format!("flock_seq_{}", std::process::id());
    let handler = format!(
        r#"
local M = {{}}
function M.handle(request, response)
  local db = pmnc.transaction.db
  if request.path == "/read" then
    return tostring(db.cached{{key = "k", ttl = 600}}.execute("select nextval('{seq}') as n").rows[1].n)
  elseif request.path == "/drop" then
    pmnc.cache.invalidate("db", {{ "k" }})
    return "dropped"
  elseif request.path == "/write" then
    db.invalidates{{ "k" }}.execute("select 1 as one")
    return "written"
  elseif request.path == "/setup" then
    db.execute("create sequence if not exists {seq}")
    return "ok"
  end
end
return M
"#
    );
    let tree = Tree::new();
    for copy in ["a", "b"] {
        tree.write(
            &format!("web_{copy}/cage.toml"),
            &format!(
                "name = \"web\"\n{}\n[resources.db]\nprotocol = \"postgresql\"\nurl = \"{}\"\n\n[cluster]\nurl = \"{}\"\nheartbeat = \"200ms\"\n",
                http_cage_toml(""),
                postgres_url(),
                nats.url()
            ),
        );
        tree.write(&format!("web_{copy}/http.lua"), &handler);
    }
    let a = Server::start(&tree.path().join("web_a"), &[]);
    let b = Server::start(&tree.path().join("web_b"), &[]);
    let (a, b) = (a.addr("http"), b.addr("http"));
    assert_eq!(get(a, "/setup").text(), "ok");
    let first = get(a, "/read").text();
    assert_eq!(get(a, "/read").text(), first, "a fresh value comes from the cache");
    let other = get(b, "/read").text();
    assert_ne!(other, first, "each process has its own cache");
    // Dropped in b: a's next read runs a query once the word has arrived.
    assert_eq!(get(b, "/drop").text(), "dropped");
    let moved = |addr: SocketAddr, from: &str| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let now = get(addr, "/read").text();
            if now != from {
                return now;
            }
            assert!(Instant::now() < deadline, "the invalidation never reached the other process (still {from})");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let second = moved(a, &first);
    // A committed invalidates{...} in b does the same.
    assert_eq!(get(b, "/write").text(), "written");
    let third = moved(a, &second);
    assert_ne!(third, second);
    assert_eq!(get(a, "/read").text(), third, "and the new value is cached again");
}
