//! Hostile Lua through the real binary (the cases of docs/decisions/004-lua-sandbox.md): each
//! snippet runs as an HTTP handler of one cage while a client keeps calling a quick endpoint of
//! another cage of the same process (2 workers). Every snippet must end with its clear error or
//! its deadline, the process must survive, and the quick endpoint must keep answering meanwhile
//! (its latencies are printed; bench/isolation.sh measures them as figures).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

const BAD_TOML: &str = r#"request_timeout = "2s"

[interfaces.hostile]
protocol = "http"
handler = "http.handle"
listen = "127.0.0.1:0"

[interfaces.long]
protocol = "http"
handler = "http.handle"
listen = "127.0.0.1:0"
request_timeout = "4s"

[lua]
getenv = ["PMNC_ISOLATION_VISIBLE"]
"#;

const BAD_HTTP: &str = r#"
local M = {}
local function loop() while true do end end
local snippets = {
  -- 1. a finalizer that loops
  gc = function() setmetatable({}, { __gc = loop }) collectgarbage("collect") return "x" end,
  -- 2. a to-be-closed handler that loops
  close = function() local x <close> = setmetatable({}, { __close = loop }) while true do end end,
  -- 3. one long pattern call over a big subject (ReDoS)
  redos = function() return tostring(("x"):rep(1e7):find(".-y")) end,
  -- the issue's form: 100 MB is over the default request memory limit of 64 MiB
  redos100 = function() return tostring(("x"):rep(1e8):find(".-y")) end,
  redos_logged = function() pmnc.log.info("searching") return tostring(("x"):rep(1e7):find(".-y")) end,
  -- 4. a memory bomb
  bomb = function() local t = {} for i = 1, 1e9 do t[i] = string.rep("x", 100000) .. i end end,
  -- 6. C-heavy loops
  cheavy = function() for i = 1, 100 do local s = string.rep("ab", 5e6):gsub("a", "b") end end,
  backtrack = function() return tostring(string.find(("a"):rep(29), ("a?"):rep(29) .. ("a"):rep(29))) end,
  -- 7. Lua called from C
  sort = function() table.sort({ 3, 2, 1 }, function(a, b) while true do end end) end,
  gsubfn = function() return (("abc"):gsub(".", function() while true do end end)) end,
  errtostring = function() error(setmetatable({}, { __tostring = loop })) end,
  formattostring = function() return string.format("%s", setmetatable({}, { __tostring = loop })) end,
}
function M.handle(request)
  local name = request.path:sub(2)
  if name == "quick" then return "quick" end
  if name == "libs" then
    return ("%d"):format(1) .. " " .. string.format("%d", 2) .. " " .. table.concat({ "a", "b" }) .. " " .. type(pmnc.log.info)
  end
  if name == "getenv" then
    return tostring(os.getenv("PMNC_ISOLATION_VISIBLE")) .. " " .. tostring(os.getenv("PMNC_ISOLATION_HIDDEN"))
  end
  return snippets[name]()
end
return M
"#;

/// 9. A module that replaces library functions and pmnc for everyone, were they shared.
const EVIL: &str = r#"
string.format = function() return "PWNED" end
table.concat = nil
_G.pmnc = {}
return {}
"#;

const FAST_TOML: &str = r#"
[interfaces.quick]
protocol = "http"
handler = "http.handle"
listen = "127.0.0.1:0"
"#;

const FAST_HTTP: &str = "local M = {} function M.handle() return 'fast' end return M";

fn app() -> Tree {
    let t = Tree::new();
    t.write("cages/bad/cage.toml", BAD_TOML);
    t.write("cages/bad/http.lua", BAD_HTTP);
    t.write("cages/bad/evil.lua", EVIL);
    t.write("cages/fast/cage.toml", FAST_TOML);
    t.write("cages/fast/http.lua", FAST_HTTP);
    t
}

/// Latencies of the quick endpoint while a probe runs.
struct Prober {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<(u16, Duration)>>>,
    thread: std::thread::JoinHandle<()>,
}

impl Prober {
    fn start(addr: std::net::SocketAddr) -> Prober {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (s, v) = (stop.clone(), seen.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                // A new connection each time: connections go to the workers in turn.
                let t = Instant::now();
                let status =
                    raw_request(addr, b"GET / HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n", Duration::from_secs(60)).map(|r| r.status).unwrap_or(0);
                v.lock().unwrap().push((status, t.elapsed()));
            }
        });
        Prober { stop, seen, thread }
    }

    /// (answers, all 200, p99, slowest).
    fn finish(self) -> (usize, bool, Duration, Duration) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap();
        let seen = self.seen.lock().unwrap();
        let mut lat: Vec<Duration> = seen.iter().map(|(_, d)| *d).collect();
        lat.sort();
        let p99 = lat.get(lat.len().saturating_sub(1) * 99 / 100).copied().unwrap_or_default();
        (seen.len(), seen.iter().all(|(s, _)| *s == 200), p99, lat.last().copied().unwrap_or_default())
    }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok()).unwrap_or(0)
}

#[test]
fn hostile_handlers_end_with_clear_errors_while_the_other_cage_keeps_answering() {
    let t = app();
    let mut s = Server::start(t.path(), &[]);
    let hostile = s.addr("hostile");
    let quick = s.addr("quick");
    assert_eq!(get(quick, "/").text(), "fast");
    // (path, expected status, expected log text)
    let cases: &[(&str, u16, &str)] = &[
        ("gc", 500, "__gc metamethods are not available to module code"),
        ("close", 504, "deadline exceeded"),
        ("redos", 504, "deadline exceeded"),
        ("redos100", 500, "not enough memory: the request holds more than its limit of 64 MiB"),
        ("cheavy", 504, "deadline exceeded"),
        ("backtrack", 504, "deadline exceeded"),
        ("sort", 504, "deadline exceeded"),
        ("gsubfn", 504, "deadline exceeded"),
        ("errtostring", 504, "deadline exceeded"),
        ("formattostring", 500, "without a chance to yield"),
        ("bomb", 500, "not enough memory: the request holds more than its limit of 64 MiB"),
    ];
    let baseline = rss_kib(s.child.id());
    for (path, status, log) in cases {
        let prober = Prober::start(quick);
        let started = Instant::now();
        let r = get(hostile, &format!("/{path}"));
        let took = started.elapsed();
        let (answers, all_ok, p99, slowest) = prober.finish();
        eprintln!("{path}: {} after {took:?}; the other cage answered {answers} times meanwhile, p99 {p99:?}, slowest {slowest:?}", r.status);
        assert_eq!(r.status, *status, "{path}: {}", r.text());
        let id = request_id(&r);
        assert!(s.wait_for_all(&[&id, log], Duration::from_secs(10)).is_some(), "{path}: no log line with {log:?} for request {id}");
        assert!(all_ok, "{path}: a request to the other cage failed meanwhile");
        if took >= Duration::from_secs(1) {
            // A frozen worker would hold the client's next connection for the whole probe.
            assert!(answers >= 10, "{path}: the other cage answered only {answers} times in {took:?}");
        }
        assert!(took < Duration::from_secs(20), "{path}: ended after {took:?}, far past its 2 s deadline");
    }
    // The memory of the bomb is given back (a full collection follows it).
    let after = rss_kib(s.child.id());
    eprintln!("RSS before the probes {baseline} KiB, after {after} KiB");
    assert!(after < baseline + 128 * 1024, "RSS grew from {baseline} KiB to {after} KiB");
    assert_eq!(get(hostile, "/quick").text(), "quick", "the hostile cage itself still works");
}

#[test]
fn library_tables_and_pmnc_are_not_shared_between_modules() {
    let t = app();
    let s = Server::start(t.path(), &[]);
    // evil.lua replaced string.format, table.concat and _G.pmnc in its own globals only.
    assert_eq!(get(s.addr("hostile"), "/libs").text(), "1 2 ab function");
}

#[test]
fn os_getenv_reads_only_the_names_the_cage_allows() {
    let t = app();
    let mut s = Server::try_start_env(t.path(), 2, &[], &[("PMNC_ISOLATION_VISIBLE", "visible"), ("PMNC_ISOLATION_HIDDEN", "secret")]).unwrap();
    s.wait_for("running", Duration::from_secs(10));
    assert_eq!(get(s.addr("hostile"), "/getenv").text(), "visible nil");
}

#[test]
fn sigterm_ends_the_process_while_a_hostile_request_runs() {
    let t = app();
    let mut s = Server::start(t.path(), &[]);
    let long = s.addr("long");
    let client = std::thread::spawn(move || raw_request(long, b"GET /redos_logged HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n", Duration::from_secs(60)));
    assert!(s.wait_for("searching", Duration::from_secs(10)).is_some(), "the request did not start");
    s.signal(15);
    // The drain waits for requests in flight up to the longest timeout (4 s) plus 1 s.
    let status = s.wait_exit(Duration::from_secs(30));
    assert!(status.is_some(), "the process still runs 30 s after SIGTERM");
    let r = client.join().unwrap();
    assert!(matches!(&r, Ok(r) if r.status == 504) || r.is_err(), "{r:?}");
}

#[test]
fn top_level_code_over_its_limit_is_refused_naming_the_file() {
    let t = Tree::new();
    t.write("c/cage.toml", &http_cage_toml(""));
    t.write("c/http.lua", "local M = {} function M.handle() return 'x' end return M");
    t.write("c/slow.lua", "local x = (\"x\"):rep(6e4):find(\".-y\")\nreturn {}");
    let out = pmnc_limited(&["check", t.path().join("c").to_str().unwrap()], Duration::from_secs(60));
    assert_ne!(out.code, Some(0));
    let text = format!("{}{}", out.stdout, out.stderr);
    assert!(text.contains("slow.lua: module top-level code ran longer than 500 ms"), "{text}");
}
