//! Hot reload of modules under `pmnc run`: saves in place and by rename, broken saves, new and
//! deleted files, `.shared` fallback, empty files, requests in flight and module state.
//!
//! Every wait is for a log line or for an HTTP answer, polled with a bound.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::*;

/// How long a reload may take to be seen.
const RELOAD: Duration = Duration::from_secs(5);

/// An app with cage `web` whose handler answers `pmnc.util.v()` (or the error of calling it).
fn app(t: &Tree, util: &str) -> Server {
    t.write("cages/web/cage.toml", &http_cage_toml("request_timeout = \"5s\"\n"));
    t.write(
        "cages/web/http.lua",
        r#"local M = {}
function M.handle(req, res)
  if req.path == "/safe" then
    local ok, v = pcall(function() return pmnc.util.v() end)
    return ok and v or ("error: " .. tostring(v))
  end
  return pmnc.util.v()
end
return M
"#,
    );
    t.write("cages/web/util.lua", util);
    Server::start(t.path(), &[])
}

fn util(answer: &str) -> String {
    format!("local M = {{}}\nfunction M.v() return \"{answer}\" end\nreturn M\n")
}

/// Asserts that several requests (reaching both workers) all get `want`.
fn all_answer(addr: std::net::SocketAddr, path: &str, want: &str) {
    for _ in 0..4 {
        let r = get(addr, path);
        assert_eq!((r.status, r.text().as_str()), (200, want));
    }
}

#[test]
fn saving_in_place_reloads() {
    let t = Tree::new();
    let mut s = app(&t, &util("one"));
    let addr = s.addr("http");
    all_answer(addr, "/", "one");
    t.write("cages/web/util.lua", &util("two"));
    assert!(s.wait_for_new("reloaded web/util.lua", RELOAD).is_some(), "{}", s.log.join("\n"));
    get_until(addr, "/", "two", RELOAD);
    all_answer(addr, "/", "two");
}

#[test]
fn write_then_rename_reloads() {
    let t = Tree::new();
    let mut s = app(&t, &util("one"));
    let addr = s.addr("http");
    all_answer(addr, "/", "one");
    t.write_rename("cages/web/util.lua", &util("renamed"));
    get_until(addr, "/", "renamed", RELOAD);
    all_answer(addr, "/", "renamed");
    assert!(s.wait_for("reloaded web/util.lua", RELOAD).is_some(), "{}", s.log.join("\n"));
    // The temporary file of the rename is no module.
    assert!(!s.log.iter().any(|l| l.contains(".util.lua.tmp")), "{}", s.log.join("\n"));
}

#[test]
fn broken_save_keeps_the_old_version_until_fixed() {
    let t = Tree::new();
    let mut s = app(&t, &util("one"));
    let addr = s.addr("http");
    all_answer(addr, "/", "one");

    // A syntax error: logged with file and line, the old version goes on serving.
    let broken = "local M = {}\nfunction M.v( return \"broken\" end\nreturn M\n";
    t.write("cages/web/util.lua", broken);
    let line = s.wait_for_new("web/util.lua:2:", RELOAD).unwrap_or_else(|| panic!("{}", s.log.join("\n")));
    assert!(line.contains("keeping the previous version"), "{line}");
    all_answer(addr, "/", "one");

    // The same broken contents saved again (more events for one save) are reported once;
    // a marker module proves the watcher has handled the later events.
    t.write("cages/web/util.lua", broken);
    t.write("cages/web/marker.lua", "return { m = function() return 1 end }\n");
    s.wait_for_new("reloaded web/marker.lua", RELOAD).unwrap_or_else(|| panic!("{}", s.log.join("\n")));
    let reports = s.log.iter().filter(|l| l.contains("web/util.lua:2:")).count();
    assert_eq!(reports, 1, "{}", s.log.join("\n"));

    // An error at load time is refused the same way.
    t.write("cages/web/util.lua", "local M = {}\nfunction M.v() return 'x' end\nerror('not today')\nreturn M\n");
    let line = s.wait_for_new("web/util.lua:3: not today", RELOAD).unwrap_or_else(|| panic!("{}", s.log.join("\n")));
    assert!(line.contains("keeping the previous version"), "{line}");
    all_answer(addr, "/", "one");

    // Fixing it reloads.
    t.write("cages/web/util.lua", &util("fixed"));
    get_until(addr, "/", "fixed", RELOAD);
    all_answer(addr, "/", "fixed");
    assert!(s.wait_for("reloaded web/util.lua", RELOAD).is_some(), "{}", s.log.join("\n"));
}

#[test]
fn a_new_module_file_is_picked_up() {
    let t = Tree::new();
    t.write("cages/web/cage.toml", &http_cage_toml(""));
    t.write(
        "cages/web/http.lua",
        "return { handle = function() local ok, v = pcall(function() return pmnc.fresh.v() end) return (ok and '' or 'error: ') .. tostring(v) end }\n",
    );
    let mut s = Server::start(t.path(), &[]);
    let addr = s.addr("http");
    let r = get(addr, "/");
    assert!(r.text().contains("cage web has no module fresh"), "{}", r.text());
    t.write("cages/web/fresh.lua", &util("fresh!"));
    get_until(addr, "/", "fresh!", RELOAD);
    all_answer(addr, "/", "fresh!");
    assert!(s.wait_for("reloaded web/fresh.lua", RELOAD).is_some(), "{}", s.log.join("\n"));
}

#[test]
fn deleting_own_module_falls_back_to_shared() {
    let t = Tree::new();
    t.write("cages/.shared/util.lua", &util("shared"));
    let mut s = app(&t, &util("own"));
    let addr = s.addr("http");
    all_answer(addr, "/", "own");
    std::fs::remove_file(t.path().join("cages/web/util.lua")).unwrap();
    get_until(addr, "/", "shared", RELOAD);
    all_answer(addr, "/", "shared");
    assert!(s.wait_for("reloaded .shared/util.lua", RELOAD).is_some(), "{}", s.log.join("\n"));

    // A new own file wins again; a change of the shared one then changes nothing.
    t.write("cages/web/util.lua", &util("own again"));
    get_until(addr, "/", "own again", RELOAD);
    t.write("cages/.shared/util.lua", &util("shared 2"));
    t.write("cages/web/marker.lua", "return {}\n");
    assert!(s.wait_for_new("reloaded web/marker.lua", RELOAD).is_some(), "{}", s.log.join("\n"));
    // The watcher handles changes in order and logs every reload before the marker's.
    let shared_reloads = s.log.iter().filter(|l| l.contains("reloaded .shared/util.lua")).count();
    assert_eq!(shared_reloads, 1, "{}", s.log.join("\n"));
    all_answer(addr, "/", "own again");
}

#[test]
fn deleting_a_module_without_fallback_makes_calls_fail_clearly() {
    let t = Tree::new();
    let mut s = app(&t, &util("one"));
    let addr = s.addr("http");
    all_answer(addr, "/", "one");
    std::fs::remove_file(t.path().join("cages/web/util.lua")).unwrap();
    assert!(s.wait_for_new("module util removed", RELOAD).is_some(), "{}", s.log.join("\n"));
    get_until(addr, "/safe", "error: web/http.lua:4: cage web has no module util (calling util.v)", RELOAD);
    // Unprotected, the handler fails: 500, and the log names the missing module.
    let r = get(addr, "/");
    assert_eq!(r.status, 500, "{}", r.text());
    let line = s.wait_for_new("has no module util", RELOAD).unwrap_or_else(|| panic!("{}", s.log.join("\n")));
    assert!(line.contains("http.handle failed") && line.contains("cage web"), "{line}");
    // Putting the file back brings it back.
    t.write("cages/web/util.lua", &util("back"));
    get_until(addr, "/", "back", RELOAD);
}

#[test]
fn a_shared_module_change_reaches_every_cage() {
    let t = Tree::new();
    let handler = "return { handle = function() return pmnc.common.v() .. ' in ' .. pmnc.cage end }\n";
    t.write("cages/web/cage.toml", &http_cage_toml(""));
    t.write("cages/web/http.lua", handler);
    t.write("cages/api/cage.toml", "[interfaces.api]\nprotocol = \"http\"\nlisten = \"127.0.0.1:0\"\nhandler = \"http.handle\"\n");
    t.write("cages/api/http.lua", handler);
    t.write("cages/.shared/common.lua", &util("one"));
    let s = Server::start(t.path(), &[]);
    let (web, api) = (s.addr("http"), s.addr("api"));
    all_answer(web, "/", "one in web");
    all_answer(api, "/", "one in api");
    t.write_rename("cages/.shared/common.lua", &util("two"));
    get_until(web, "/", "two in web", RELOAD);
    get_until(api, "/", "two in api", RELOAD);
}

#[test]
fn an_empty_file_is_ignored() {
    let t = Tree::new();
    let mut s = app(&t, &util("one"));
    t.write(
        "cages/web/http.lua",
        "return { handle = function() local ok, m = pcall(function() return pmnc.zz_marker.v() end) return pmnc.util.v() .. ' ' .. (ok and m or 'no marker') end }\n",
    );
    let addr = s.addr("http");
    get_until(addr, "/", "one no marker", RELOAD);

    // Truncated (a save in progress), then another file: once a worker sees the marker, it has
    // also seen whatever the empty file caused (updates reach a worker in order).
    t.write("cages/web/util.lua", "");
    t.write("cages/web/zz_marker.lua", &util("marker"));
    get_until(addr, "/", "one marker", RELOAD);
    all_answer(addr, "/", "one marker");
    assert!(s.wait_for("reloaded web/zz_marker.lua", RELOAD).is_some());
    assert!(!s.log.iter().any(|l| l.contains("module util removed") || l.contains("web/util.lua:")), "{}", s.log.join("\n"));

    // The rest of the save arrives.
    t.write("cages/web/util.lua", &util("two"));
    get_until(addr, "/", "two marker", RELOAD);
}

#[test]
fn a_request_in_flight_finishes_on_its_old_code() {
    let t = Tree::new();
    t.write("cages/web/cage.toml", &http_cage_toml("request_timeout = \"20s\"\n"));
    let handler = |version: &str| {
        format!(
            r#"local M = {{}}
function M.handle(req, res)
  if req.path == "/slow" then
    pmnc.log.info("slow request started")
    pmnc.sleep(tonumber(req.query.s))
    return "slow {version}"
  end
  return "{version}"
end
return M
"#
        )
    };
    t.write("cages/web/http.lua", &handler("old"));
    let mut s = Server::start(t.path(), &[]);
    let addr = s.addr("http");
    all_answer(addr, "/", "old");

    let slow = std::thread::spawn(move || {
        let r = raw_request(addr, b"GET /slow?s=2 HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n", Duration::from_secs(30));
        (r.map(|r| (r.status, r.text())), Instant::now())
    });
    assert!(s.wait_for("slow request started", RELOAD).is_some(), "{}", s.log.join("\n"));
    t.write("cages/web/http.lua", &handler("new"));
    get_until(addr, "/", "new", RELOAD);
    all_answer(addr, "/", "new");
    let new_seen = Instant::now();

    let (slow_result, slow_done) = slow.join().unwrap();
    assert_eq!(slow_result.unwrap(), (200, "slow old".to_string()));
    assert!(new_seen < slow_done, "the new version was seen only after the slow request ended");
}

#[test]
fn module_state_resets_on_reload() {
    let t = Tree::new();
    let counter = |tag: &str| format!("local M = {{}}\nlocal count = 0\nfunction M.v()\n  count = count + 1\n  return \"{tag}:\" .. count\nend\nreturn M\n");
    let s = app(&t, &counter("a"));
    let addr = s.addr("http");
    let parse = |text: String| -> (String, u64) {
        let (tag, n) = text.split_once(':').unwrap_or_else(|| panic!("{text}"));
        (tag.to_string(), n.parse().unwrap_or_else(|_| panic!("{text}")))
    };
    // State lives across requests of a version (each worker counts its own).
    let mut highest = 0;
    for _ in 0..20 {
        let (tag, n) = parse(get(addr, "/").text());
        assert_eq!(tag, "a");
        highest = highest.max(n);
        if highest >= 3 {
            break;
        }
    }
    assert!(highest >= 3, "the module's count did not grow: {highest}");

    t.write("cages/web/util.lua", &counter("b"));
    let deadline = Instant::now() + RELOAD;
    let first_b = loop {
        let (tag, n) = parse(get(addr, "/").text());
        if tag == "b" {
            break n;
        }
        assert!(Instant::now() < deadline, "version b never answered");
        std::thread::sleep(Duration::from_millis(20));
    };
    // Nobody else calls it: the first answer of the new version is its first call on its worker.
    assert_eq!(first_b, 1, "the new version started with the old state");
}

#[test]
fn a_changed_resource_config_rebuilds_only_that_pool() {
    let t = Tree::new();
    t.write("a/x.txt", "from A");
    t.write("b/x.txt", "from B");
    let toml = |root: &str| format!("{}\n[resources.files]\nprotocol = \"file\"\nroot = \"{}\"\n", http_cage_toml(""), t.path().join(root).display());
    t.write("cages/web/cage.toml", &toml("a"));
    t.write("cages/web/http.lua", "return { handle = function() pmnc.state.set('n', 1) return pmnc.transaction.files.read('x.txt') end }\n");
    let mut s = Server::start(t.path(), &[]);
    let addr = s.addr("http");
    assert_eq!(get(addr, "/").text(), "from A");

    t.write("cages/web/cage.toml", &toml("b"));
    s.wait_for_new("resource files: config changed", RELOAD).unwrap_or_else(|| panic!("{}", s.log.join("\n")));
    get_until(addr, "/", "from B", RELOAD);
    all_answer(addr, "/", "from B");
    assert!(!s.log.iter().any(|l| l.contains("resource state: config changed")), "the state pool must be left alone");

    // A broken cage.toml changes nothing and says why.
    t.write("cages/web/cage.toml", &format!("{}bogus = 1\n", toml("a")));
    let line = s.wait_for_new("keeping the running config", RELOAD).unwrap_or_else(|| panic!("{}", s.log.join("\n")));
    assert!(line.contains("bogus: unknown key"), "{line}");
    all_answer(addr, "/", "from B");
}
