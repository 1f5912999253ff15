//! The `pmnc` command line: --version, --help, `check` on a good app, `test` output and exit
//! codes, `run` on a path that is no cage, and `run` of an app with several cages and `.shared`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::*;

const LIMIT: Duration = Duration::from_secs(30);

#[test]
fn version_prints_the_version() {
    let out = pmnc(&["--version"]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert_eq!(out.stdout.trim(), format!("pmnc {}", env!("CARGO_PKG_VERSION")));
}

#[test]
fn help_shows_examples() {
    let out = pmnc(&["--help"]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(out.stdout.contains("Examples:"), "{}", out.stdout);
    for example in ["pmnc run ", "pmnc check ", "pmnc test "] {
        assert!(
            out.stdout.lines().skip_while(|l| !l.starts_with("Examples:")).any(|l| l.trim_start().starts_with(example)),
            "no example of {example:?} in:\n{}",
            out.stdout
        );
    }
    for command in ["run", "check", "test"] {
        assert!(out.stdout.lines().any(|l| l.trim_start().starts_with(command)), "{command} not listed:\n{}", out.stdout);
    }
}

/// An app with two cages, a shared module and a test module.
fn two_cage_app(t: &Tree) {
    t.write("cages/web/cage.toml", &http_cage_toml(""));
    t.write(
        "cages/web/http.lua",
        "local M = {}\nfunction M.handle(req, res)\n  return pmnc('worker').jobs.double(tonumber(req.query.n) or 1)\nend\nreturn M\n",
    );
    t.write("cages/web/util.lua", "return { twice = function(s) return s .. s end }\n");
    t.write("cages/web/util_test.lua", "return { test_twice = function() assert(pmnc.util.twice('a') == 'aa') end }\n");
    t.write("cages/worker/cage.toml", "");
    t.write("cages/worker/jobs.lua", "return { double = function(n) return n * 2 end }\n");
    t.write("cages/.shared/common.lua", "return { name = function() return pmnc.cage end }\n");
}

#[test]
fn check_of_a_good_app_counts_what_it_found() {
    let t = Tree::new();
    two_cage_app(&t);
    let out = pmnc(&["check", &t.path().display().to_string()]);
    assert_eq!(out.code, Some(0), "stdout:\n{}\nstderr:\n{}", out.stdout, out.stderr);
    // web: http, util, util_test and the shared common; worker: jobs and common.
    assert_eq!(out.stdout.trim(), "ok: 2 cage(s), 6 module(s), 1 interface(s)");

    // The same command on one cage folder of the app sees only that cage (with .shared).
    let out = pmnc(&["check", &t.path().join("cages/worker").display().to_string()]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert_eq!(out.stdout.trim(), "ok: 1 cage(s), 2 module(s), 0 interface(s)");
}

/// Output lines of `pmnc test` that start a test result.
fn result_lines(stdout: &str) -> Vec<&str> {
    stdout.lines().filter(|l| l.starts_with("ok ") || l.starts_with("FAILED ")).collect()
}

/// The indented lines under the result line of `test`.
fn detail_of<'a>(stdout: &'a str, test: &str) -> Vec<&'a str> {
    let mut lines = stdout.lines().skip_while(|l| !(l.starts_with("FAILED ") && l.contains(test)));
    assert!(lines.next().is_some(), "no FAILED line for {test} in:\n{stdout}");
    lines.take_while(|l| l.starts_with("       ")).map(|l| l.trim()).collect()
}

/// Milliseconds shown at the end of a result line: "ok     a.b.c (12.3 ms)".
fn millis_of(line: &str) -> f64 {
    let open = line.rfind('(').unwrap_or_else(|| panic!("no time in {line:?}"));
    line[open + 1..].trim_end_matches(" ms)").parse().unwrap_or_else(|_| panic!("no time in {line:?}"))
}

#[test]
fn test_command_reports_every_test_and_a_summary() {
    let t = Tree::new();
    t.write("web/cage.toml", "request_timeout = \"300ms\"\n");
    t.write(
        "web/checks_test.lua",
        r#"local M = {}
function M.test_a_passes()
  assert(1 + 1 == 2)
end
function M.test_b_assert_fails()
  assert(1 == 2, "one is not two")
end
local function deep()
  error("deep failure")
end
function M.test_c_error()
  deep()
end
function M.test_d_sleeps_too_long()
  pmnc.sleep(5)
end
function M.test_e_spins()
  while true do end
end
function M.test_f_runs_after_failures()
  assert(pmnc.util.value() == 7)
end
function M.helper_not_a_test()
  error("must not run")
end
return M
"#,
    );
    t.write("web/util.lua", "return { value = function() return 7 end }\n");
    let started = std::time::Instant::now();
    let out = pmnc_limited(&["test", &t.path().join("web").display().to_string()], LIMIT);
    let elapsed = started.elapsed();
    assert_eq!(out.code, Some(1), "stdout:\n{}\nstderr:\n{}", out.stdout, out.stderr);

    let results = result_lines(&out.stdout);
    let expected = [
        ("ok     ", "web.checks_test.test_a_passes"),
        ("FAILED ", "web.checks_test.test_b_assert_fails"),
        ("FAILED ", "web.checks_test.test_c_error"),
        ("FAILED ", "web.checks_test.test_d_sleeps_too_long"),
        ("FAILED ", "web.checks_test.test_e_spins"),
        ("ok     ", "web.checks_test.test_f_runs_after_failures"),
    ];
    assert_eq!(results.len(), expected.len(), "{}", out.stdout);
    for (line, (status, name)) in results.iter().zip(expected) {
        assert!(line.starts_with(&format!("{status}{name} (")) && line.ends_with(" ms)"), "{line:?} is not {status}{name}");
    }
    assert!(!out.stdout.contains("helper_not_a_test"), "{}", out.stdout);
    assert_eq!(out.stdout.lines().last(), Some("2 passed, 4 failed"), "{}", out.stdout);

    // A failed assert: its message with file and line, then a traceback.
    let assert_detail = detail_of(&out.stdout, "test_b_assert_fails");
    assert_eq!(assert_detail.first().copied(), Some("web/checks_test.lua:6: one is not two"), "{assert_detail:?}");
    assert!(assert_detail.contains(&"stack traceback:"), "{assert_detail:?}");

    // An error raised in a helper: the traceback shows the helper and the test.
    let error_detail = detail_of(&out.stdout, "test_c_error");
    assert_eq!(error_detail.first().copied(), Some("web/checks_test.lua:9: deep failure"), "{error_detail:?}");
    assert!(error_detail.iter().any(|l| l.starts_with("web/checks_test.lua:9: in ") && l.contains("deep")), "{error_detail:?}");
    assert!(error_detail.iter().any(|l| l.starts_with("web/checks_test.lua:12: in ")), "{error_detail:?}");

    // Both ways of running too long are stopped at the cage's request_timeout.
    for name in ["test_d_sleeps_too_long", "test_e_spins"] {
        let detail = detail_of(&out.stdout, name);
        assert!(detail.first().is_some_and(|l| l.contains("deadline exceeded") && l.contains("300ms")), "{name}: {detail:?}");
        let line = results.iter().find(|l| l.contains(name)).unwrap();
        let ms = millis_of(line);
        assert!((250.0..3000.0).contains(&ms), "{name} took {ms} ms, the deadline is 300ms");
    }
    assert!(elapsed < Duration::from_secs(4), "pmnc test took {elapsed:?}: a 5 s sleep was not cut at the deadline");
}

#[test]
fn test_command_exits_zero_when_all_pass_and_filters() {
    let t = Tree::new();
    t.write("web/cage.toml", "");
    t.write("web/math_test.lua", "return { test_add = function() assert(2 + 2 == 4) end, test_mul = function() assert(2 * 3 == 6) end }\n");
    t.write("web/text_test.lua", "return { test_upper = function() assert(('a'):upper() == 'A') end }\n");
    let path = t.path().join("web").display().to_string();
    let out = pmnc(&["test", &path]);
    assert_eq!(out.code, Some(0), "stdout:\n{}\nstderr:\n{}", out.stdout, out.stderr);
    assert_eq!(result_lines(&out.stdout).len(), 3, "{}", out.stdout);
    assert!(result_lines(&out.stdout).iter().all(|l| l.starts_with("ok     web.")), "{}", out.stdout);
    assert_eq!(out.stdout.lines().last(), Some("3 passed, 0 failed"));

    let out = pmnc(&["test", &path, "--filter", "math_test.test_m"]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let results = result_lines(&out.stdout);
    assert_eq!(results.len(), 1, "{}", out.stdout);
    assert!(results[0].starts_with("ok     web.math_test.test_mul ("), "{}", out.stdout);
    assert_eq!(out.stdout.lines().last(), Some("1 passed, 0 failed"));
}

#[test]
fn test_command_calls_other_cages_of_the_app() {
    let t = Tree::new();
    t.write("cages/web/cage.toml", "");
    t.write(
        "cages/web/calls_test.lua",
        r#"local M = {}
function M.test_other_cage_doubles()
  assert(pmnc("worker").jobs.double(21) == 42)
end
function M.test_other_cage_sees_caller()
  assert(pmnc("worker").jobs.caller() == "web")
end
function M.test_other_cage_missing_function()
  pmnc("worker").jobs.nope()
end
return M
"#,
    );
    t.write("cages/worker/cage.toml", "");
    t.write("cages/worker/jobs.lua", "return { double = function(n) return n * 2 end, caller = function() return pmnc.request.caller end }\n");
    let out = pmnc_limited(&["test", &t.path().display().to_string()], LIMIT);
    assert_eq!(out.code, Some(1), "stdout:\n{}\nstderr:\n{}", out.stdout, out.stderr);
    let results = result_lines(&out.stdout);
    assert_eq!(results.len(), 3, "{}", out.stdout);
    assert!(results.iter().any(|l| l.starts_with("ok     web.calls_test.test_other_cage_doubles (")), "{}", out.stdout);
    assert!(results.iter().any(|l| l.starts_with("ok     web.calls_test.test_other_cage_sees_caller (")), "{}", out.stdout);
    let detail = detail_of(&out.stdout, "test_other_cage_missing_function");
    assert!(detail.first().is_some_and(|l| l.contains("calling worker.jobs.nope") && l.contains("has no function nope")), "{detail:?}");
    assert_eq!(out.stdout.lines().last(), Some("2 passed, 1 failed"));
}

#[test]
fn test_command_refuses_a_broken_cage() {
    let t = Tree::new();
    t.write("web/cage.toml", "");
    t.write("web/broken_test.lua", "return { test_x = function() end\n");
    let out = pmnc_limited(&["test", &t.path().join("web").display().to_string()], LIMIT);
    assert_eq!(out.code, Some(1), "stdout:\n{}\nstderr:\n{}", out.stdout, out.stderr);
    assert!(out.stderr.contains("web/broken_test.lua:2:"), "{}", out.stderr);
    assert!(!out.stdout.contains("passed"), "{}", out.stdout);
}

#[test]
fn run_on_a_path_that_is_no_cage_fails_clearly() {
    let t = Tree::new();
    t.write("notes/readme.txt", "not a cage\n");
    let notes = t.path().join("notes");
    let out = pmnc_limited(&["run", &notes.display().to_string()], LIMIT);
    assert_eq!(out.code, Some(1), "stdout:\n{}\nstderr:\n{}", out.stdout, out.stderr);
    assert!(out.stderr.contains("neither a cage folder (no cage.toml) nor an app folder (no cages/ folder)"), "{}", out.stderr);
    assert!(out.stderr.contains("notes"), "{}", out.stderr);
    assert!(!out.stderr.contains("listening on"), "{}", out.stderr);

    let file = t.path().join("notes/readme.txt");
    let out = pmnc_limited(&["run", &file.display().to_string()], LIMIT);
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("readme.txt") && out.stderr.contains("not a folder"), "{}", out.stderr);

    let missing = t.path().join("missing");
    let out = pmnc_limited(&["run", &missing.display().to_string()], LIMIT);
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(out.stderr.contains(&missing.display().to_string()), "{}", out.stderr);

    // An app folder whose cages/ holds no cage.
    t.write("empty/cages/notes/readme.txt", "no cage.toml here\n");
    let out = pmnc_limited(&["run", &t.path().join("empty").display().to_string()], LIMIT);
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("no cage folders"), "{}", out.stderr);
}

#[test]
fn run_of_an_app_runs_every_cage_with_shared_modules() {
    let t = Tree::new();
    t.write("cages/web/cage.toml", &http_cage_toml(""));
    t.write(
        "cages/web/http.lua",
        r#"local M = {}
function M.handle(req, res)
  local n = tonumber(req.query.n) or 0
  return { cage = pmnc.common.whoami(), doubled = pmnc("worker").jobs.double(n), worker = pmnc("worker").jobs.whoami() }
end
return M
"#,
    );
    t.write("cages/worker/cage.toml", "[interfaces.admin]\nprotocol = \"http\"\nlisten = \"127.0.0.1:0\"\nhandler = \"jobs.handle\"\n");
    t.write(
        "cages/worker/jobs.lua",
        r#"local M = {}
function M.double(n) return n * 2 end
function M.whoami() return pmnc.common.whoami() end
function M.handle(req, res) return "worker says " .. pmnc.common.whoami() end
return M
"#,
    );
    t.write("cages/.shared/common.lua", "return { whoami = function() return pmnc.cage end }\n");
    // A folder without cage.toml is skipped, not an error.
    t.write("cages/notes/readme.txt", "not a cage\n");

    let mut s = Server::start(t.path(), &[]);
    let running = s.wait_for("running ", Duration::from_secs(5)).unwrap();
    assert!(running.contains("running 2 cages (web, worker)"), "{running}");
    assert!(s.log.iter().any(|l| l.contains("notes") && l.contains("skipped")), "{}", s.log.join("\n"));
    assert_eq!(s.addrs.len(), 2, "{:?}", s.addrs);
    assert!(s.addrs.iter().any(|(c, i, _)| c == "web" && i == "http"), "{:?}", s.addrs);
    assert!(s.addrs.iter().any(|(c, i, _)| c == "worker" && i == "admin"), "{:?}", s.addrs);

    let r = get(s.addr("http"), "/?n=21");
    assert_eq!(r.status, 200, "{}", r.text());
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("{e}: {}", r.text()));
    assert_eq!(v, serde_json::json!({ "cage": "web", "doubled": 42, "worker": "worker" }));

    let r = get(s.addr("admin"), "/");
    assert_eq!((r.status, r.text().as_str()), (200, "worker says worker"));

    assert_eq!(s.terminate(Duration::from_secs(10)), Some(0), "{}", s.log.join("\n"));
    assert!(s.log.iter().any(|l| l.contains("stopped")), "{}", s.log.join("\n"));
}

#[test]
fn test_command_gives_every_test_fresh_module_state() {
    let t = Tree::new();
    t.write("web/cage.toml", "");
    t.write("web/counter.lua", "local M = {}\nlocal n = 0\nfunction M.bump() n = n + 1 return n end\nreturn M\n");
    t.write(
        "web/counter_test.lua",
        "local M = {}\nfunction M.test_a() assert(pmnc.counter.bump() == 1, 'state leaked into test_a') end\nfunction M.test_b() assert(pmnc.counter.bump() == 1, 'state leaked into test_b') end\nreturn M\n",
    );
    let path = t.path().join("web").display().to_string();
    let out = pmnc(&["test", &path]);
    assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.lines().any(|l| l == "2 passed, 0 failed"), "{}", out.stdout);
}

#[test]
fn check_lists_module_errors_also_when_cage_toml_is_broken() {
    let t = Tree::new();
    t.write("cages/web/cage.toml", "request_timeout = \"1s\"\nbogus_key = 1\n");
    t.write("cages/web/http.lua", "local M = {}\nfunction M.handle(req, res)\n  return 1 +\nend\nreturn M\n");
    t.write("cages/web/util.lua", "return { ok = function() return 1 end }\n");
    // Not even TOML, and a broken shared module: both listed too.
    t.write("cages/worker/cage.toml", "[interfaces.http\nlisten = 1\n");
    t.write("cages/worker/jobs.lua", "return { x = function() return end end end }\n");
    let out = pmnc(&["check", &t.path().display().to_string()]);
    assert_eq!(out.code, Some(1), "stdout:\n{}\nstderr:\n{}", out.stdout, out.stderr);
    let err = &out.stderr;
    let web = t.path().join("cages/web/cage.toml").display().to_string();
    assert!(err.contains(&format!("{web}:2")) && err.contains("bogus_key"), "{err}");
    // The module's syntax error with its file and line (the expression ends at line 4).
    assert!(err.lines().any(|l| l.contains("web/http.lua:4:")), "{err}");
    let worker = t.path().join("cages/worker/cage.toml").display().to_string();
    assert!(err.contains(&format!("{worker}:1")), "{err}");
    assert!(err.lines().any(|l| l.contains("worker/jobs.lua:1:")), "{err}");
    assert!(!err.contains("util.lua"), "a good module is not a problem: {err}");
}
