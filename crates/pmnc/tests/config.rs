//! Config and modules at start: every bad config is refused by both `pmnc check` and `pmnc run`
//! with file, line and key; the defaults of cage.toml; modules that cannot be used are refused;
//! which module file wins; private and missing functions.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

const LIMIT: Duration = Duration::from_secs(30);

/// The cage.toml of `rel` as pmnc names it in messages (the folder is canonicalized).
fn toml_of(t: &Tree, rel: &str) -> String {
    let dir: PathBuf = t.path().canonicalize().unwrap().join(rel);
    dir.join("cage.toml").display().to_string()
}

/// Asserts that `pmnc check` and `pmnc run` both refuse `path` and that each of `expected`
/// appears in what they print. Returns the output of `check`.
fn refused_with(path: &Path, expected: &[String]) -> String {
    refused_with_env(path, &[], expected)
}

fn refused_with_env(path: &Path, env: &[(&str, &str)], expected: &[String]) -> String {
    let p = path.display().to_string();
    let check = pmnc_env_limited(&["check", &p], env, LIMIT);
    assert_eq!(check.code, Some(1), "check accepted it:\nstdout:\n{}\nstderr:\n{}", check.stdout, check.stderr);
    assert!(!check.stdout.starts_with("ok:"), "{}", check.stdout);
    for e in expected {
        assert!(check.stderr.contains(e.as_str()), "check does not say {e:?}:\n{}", check.stderr);
    }
    let run = pmnc_env_limited(&["run", &p, "--workers", "1"], env, LIMIT);
    assert_eq!(run.code, Some(1), "run was not refused:\nstdout:\n{}\nstderr:\n{}", run.stdout, run.stderr);
    assert!(run.stderr.contains("refused to start"), "{}", run.stderr);
    assert!(!run.stderr.contains("listening on"), "something listened:\n{}", run.stderr);
    assert!(!run.stderr.contains("running "), "{}", run.stderr);
    for e in expected {
        assert!(run.stderr.contains(e.as_str()), "run does not say {e:?}:\n{}", run.stderr);
    }
    check.stderr
}

/// A cage `web` with a working `http.handle` and the given cage.toml.
fn web_cage(t: &Tree, toml: &str) -> PathBuf {
    t.write("web/cage.toml", toml);
    t.write("web/http.lua", "return { handle = function(req, res) return 'hi' end }\n");
    t.path().join("web")
}

// ---- bad config ----

#[test]
fn unknown_top_level_key() {
    let t = Tree::new();
    let web = web_cage(&t, &format!("request_timout = \"1s\"\n{}", http_cage_toml("")));
    refused_with(&web, &[format!("{}:1: request_timout: unknown key", toml_of(&t, "web"))]);
}

#[test]
fn unknown_interface_key() {
    let t = Tree::new();
    let web = web_cage(&t, &http_cage_toml("max_body_sise = \"1MiB\"\n"));
    refused_with(&web, &[format!("{}:3: interfaces.http.max_body_sise: unknown key", toml_of(&t, "web"))]);
}

#[test]
fn wrong_type() {
    let t = Tree::new();
    let web = web_cage(&t, &format!("request_timeout = 5\n{}", http_cage_toml("http2 = \"yes\"\n")));
    let toml = toml_of(&t, "web");
    refused_with(
        &web,
        &[
            format!("{toml}:1: request_timeout: expected a string, found integer"),
            format!("{toml}:4: interfaces.http.http2: expected true or false, found string"),
        ],
    );
}

#[test]
fn bad_duration() {
    let t = Tree::new();
    let web = web_cage(&t, &http_cage_toml("request_timeout = \"10 parsecs\"\n"));
    let out = refused_with(&web, &[format!("{}:3: interfaces.http.request_timeout: duration \"10 parsecs\"", toml_of(&t, "web"))]);
    assert!(out.contains("unknown unit \"parsecs\""), "{out}");
}

#[test]
fn unknown_protocol() {
    let t = Tree::new();
    let web = web_cage(&t, &format!("{}\n[interfaces.fax]\nprotocol = \"fax\"\n", http_cage_toml("")));
    let out = refused_with(&web, &[format!("{}:5: interfaces.fax.protocol: unknown protocol \"fax\"", toml_of(&t, "web"))]);
    // The known protocols are listed, in order.
    let known = out.split("this build knows: ").nth(1).unwrap_or_else(|| panic!("no list of known protocols: {out}"));
    for p in ["amqp", "http", "imap", "jsonrpc", "line", "mqtt", "nats", "schedule", "smtp", "stomp", "udp"] {
        assert!(known.contains(p), "{p} missing from the known protocols: {out}");
    }
}

#[test]
fn protocol_defaults_to_the_interface_name() {
    // [interfaces.http] needs no protocol key (see the other tests); [interfaces.api] does.
    let t = Tree::new();
    let web = web_cage(&t, &format!("{}\n[interfaces.api]\nlisten = \"127.0.0.1:0\"\n", http_cage_toml("")));
    t.write("web/api.lua", "return { handle = function() return 'api' end }\n");
    refused_with(&web, &[format!("{}:4: interfaces.api: unknown protocol \"api\"", toml_of(&t, "web"))]);
}

#[test]
fn handler_module_missing() {
    let t = Tree::new();
    let web = web_cage(&t, &http_cage_toml("handler = \"front.handle\"\n"));
    refused_with(&web, &[format!("{}:3: interfaces.http.handler: handler module front not found (web/front.lua or .shared/front.lua)", toml_of(&t, "web"))]);
}

#[test]
fn handler_function_missing() {
    let t = Tree::new();
    let web = web_cage(&t, &http_cage_toml("handler = \"http.serve\"\n"));
    t.write("web/http.lua", "return { handle = function() end, other = function() end, _hidden = function() end }\n");
    refused_with(
        &web,
        &[format!("{}:3: interfaces.http.handler: module http (web/http.lua) has no function serve (it has: handle, other)", toml_of(&t, "web"))],
    );
}

#[test]
fn handler_must_be_module_dot_function() {
    for handler in ["handle", "http.handle.now", "2http.handle", "http."] {
        let t = Tree::new();
        let web = web_cage(&t, &http_cage_toml(&format!("handler = \"{handler}\"\n")));
        refused_with(&web, &[format!("{}:3: interfaces.http.handler: \"{handler}\" is not \"module.function\"", toml_of(&t, "web"))]);
    }
}

#[test]
fn two_interfaces_on_one_port_in_one_cage() {
    let t = Tree::new();
    let port = spare_port();
    let web = web_cage(
        &t,
        &format!(
            "[interfaces.http]\nlisten = \"127.0.0.1:{port}\"\n\n[interfaces.admin]\nprotocol = \"http\"\nlisten = \"0.0.0.0:{port}\"\nhandler = \"http.handle\"\n"
        ),
    );
    let toml = toml_of(&t, "web");
    refused_with(&web, &[format!("{toml}:6: interfaces.admin.listen: 0.0.0.0:{port} is already used by interface http of cage web ({toml}:2)")]);
}

#[test]
fn two_interfaces_on_one_port_across_cages() {
    let t = Tree::new();
    let port = spare_port();
    let listen = format!("[interfaces.http]\nlisten = \"127.0.0.1:{port}\"\n");
    t.write("cages/a/cage.toml", &listen);
    t.write("cages/b/cage.toml", &listen);
    t.write("cages/.shared/http.lua", "return { handle = function() return pmnc.cage end }\n");
    let (a, b) = (toml_of(&t, "cages/a"), toml_of(&t, "cages/b"));
    refused_with(t.path(), &[format!("{b}:2: interfaces.http.listen: 127.0.0.1:{port} is already used by interface http of cage a ({a}:2)")]);
}

#[test]
fn a_port_taken_by_another_process_is_refused_by_run() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let t = Tree::new();
    let web =
        web_cage(&t, &format!("{}\n[interfaces.admin]\nprotocol = \"http\"\nlisten = \"127.0.0.1:{port}\"\nhandler = \"http.handle\"\n", http_cage_toml("")));
    // check does not bind, so only run can find this out.
    let check = pmnc(&["check", &web.display().to_string()]);
    assert_eq!(check.code, Some(0), "{}", check.stderr);
    let run = pmnc_limited(&["run", &web.display().to_string(), "--workers", "1"], LIMIT);
    assert_eq!(run.code, Some(1), "stdout:\n{}\nstderr:\n{}", run.stdout, run.stderr);
    let expected = format!("{}:6: interfaces.admin.listen: cannot listen on 127.0.0.1:{port}", toml_of(&t, "web"));
    assert!(run.stderr.contains(&expected), "no {expected:?} in:\n{}", run.stderr);
    // The interface that could bind is not announced either: the start as a whole failed.
    assert!(!run.stderr.contains("listening on"), "{}", run.stderr);
    drop(taken);
}

#[test]
fn two_cages_with_one_name_are_refused() {
    let t = Tree::new();
    t.write("cages/a/cage.toml", "name = \"same\"\n");
    t.write("cages/b/cage.toml", "name = \"same\"\n");
    t.write("cages/.shared/util.lua", "return {}\n");
    let a = t.path().canonicalize().unwrap().join("cages/a");
    refused_with(t.path(), &[format!("{}: cage name \"same\" is also the name of {}", toml_of(&t, "cages/b"), a.display())]);
}

#[test]
fn toml_syntax_error() {
    let t = Tree::new();
    let web = web_cage(&t, "request_timeout = \"1s\"\n\n[interfaces.http\nlisten = \"127.0.0.1:0\"\n");
    refused_with(&web, &[format!("{}:3: TOML syntax error", toml_of(&t, "web"))]);
}

#[test]
fn bad_listen_address() {
    for bad in ["localhost:8080", "127.0.0.1", "127.0.0.1:99999"] {
        let t = Tree::new();
        let web = web_cage(&t, &format!("[interfaces.http]\nlisten = \"{bad}\"\n"));
        refused_with(&web, &[format!("{}:2: interfaces.http.listen: \"{bad}\" is not an address such as \"127.0.0.1:8080\"", toml_of(&t, "web"))]);
    }
}

#[test]
fn missing_listen() {
    let t = Tree::new();
    let web = web_cage(&t, "[interfaces.http]\nhandler = \"http.handle\"\n");
    refused_with(&web, &[format!("{}:1: interfaces.http: listen is required", toml_of(&t, "web"))]);
}

#[test]
fn missing_environment_variable() {
    let t = Tree::new();
    let var = "RUSTOMNIC_TEST_CONFIG_SURELY_UNSET";
    let web = web_cage(&t, &format!("[interfaces.http]\nlisten = \"${{{var}}}\"\n"));
    refused_with(&web, &[format!("{}:2: interfaces.http.listen: environment variable {var} is not set", toml_of(&t, "web"))]);
    // That is the only problem: the key is there, so "listen is required" would be wrong.
    let out = pmnc(&["check", &web.display().to_string()]);
    assert!(!out.stderr.contains("listen is required"), "{}", out.stderr);
    assert!(out.stderr.contains("1 problem found"), "{}", out.stderr);

    // With the variable set, the same config is fine.
    let out = pmnc_env_limited(&["check", &web.display().to_string()], &[(var, "127.0.0.1:0")], LIMIT);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert_eq!(out.stdout.trim(), "ok: 1 cage(s), 1 module(s), 1 interface(s)");
}

#[test]
fn max_header_size_below_8kib() {
    for value in ["\"4KiB\"", "8191", "1"] {
        let t = Tree::new();
        let web = web_cage(&t, &http_cage_toml(&format!("max_header_size = {value}\n")));
        refused_with(&web, &[format!("{}:3: interfaces.http.max_header_size: must be at least 8KiB", toml_of(&t, "web"))]);
    }
    // 8KiB itself is accepted.
    let t = Tree::new();
    let web = web_cage(&t, &http_cage_toml("max_header_size = \"8KiB\"\n"));
    let out = pmnc(&["check", &web.display().to_string()]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
}

#[test]
fn several_problems_are_all_listed() {
    let t = Tree::new();
    t.write(
        "cages/web/cage.toml",
        r#"colour = "blue"
request_timeout = 10
log_level = "loud"

[interfaces.http]
listen = "127.0.0.1:0"
request_timeout = "10 parsecs"
max_header_size = "1KiB"

[interfaces.admin]
protocol = "http"
listen = "nowhere"
handler = "admin"
extra = true

[interfaces.fax]
protocol = "fax"
"#,
    );
    t.write("cages/web/http.lua", "return { handle = function() end }\n");
    t.write("cages/worker/cage.toml", "");
    t.write("cages/worker/broken.lua", "local M = {}\nfunction M.f(\nreturn M\n");
    t.write("cages/worker/log.lua", "return {}\n");
    let web = toml_of(&t, "cages/web");
    let expected = [
        format!("{web}:1: colour: unknown key"),
        format!("{web}:2: request_timeout: expected a string, found integer"),
        format!("{web}:3: log_level: \"loud\" is not one of error, warn, info, debug, trace"),
        format!("{web}:7: interfaces.http.request_timeout: duration \"10 parsecs\""),
        format!("{web}:8: interfaces.http.max_header_size: must be at least 8KiB"),
        format!("{web}:12: interfaces.admin.listen: \"nowhere\" is not an address"),
        format!("{web}:13: interfaces.admin.handler: \"admin\" is not \"module.function\""),
        format!("{web}:14: interfaces.admin.extra: unknown key"),
        format!("{web}:17: interfaces.fax.protocol: unknown protocol \"fax\""),
        "worker/broken.lua:3: ".to_string(),
        "worker/log.lua: module name \"log\" is reserved".to_string(),
    ];
    let out = refused_with(t.path(), &expected);
    let problems: Vec<&str> = out.lines().filter(|l| !l.ends_with("found")).collect();
    assert_eq!(problems.len(), expected.len(), "one line per problem:\n{out}");
    assert_eq!(out.lines().last(), Some(format!("{} problems found", expected.len()).as_str()), "{out}");
}

// ---- defaults ----

#[test]
fn name_defaults_to_the_folder_name() {
    let t = Tree::new();
    let who = "return { handle = function(req, res) return { cage = pmnc.cage, request = pmnc.request.cage } end }\n";
    t.write("cages/alpha/cage.toml", &http_cage_toml(""));
    t.write("cages/alpha/http.lua", who);
    t.write("cages/folder/cage.toml", &format!("name = \"beta\"\n{}", http_cage_toml("")));
    t.write("cages/folder/http.lua", who);
    let mut s = Server::start(t.path(), &[]);
    let running = s.wait_for("running ", Duration::from_secs(5)).unwrap();
    assert!(running.contains("running 2 cages (alpha, beta)"), "{running}");
    for (cage, _, addr) in s.addrs.clone() {
        let r = get(addr, "/");
        assert_eq!(r.status, 200, "{}", r.text());
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v, serde_json::json!({ "cage": cage, "request": cage }));
    }
    let mut cages: Vec<String> = s.addrs.iter().map(|(c, _, _)| c.clone()).collect();
    cages.sort();
    assert_eq!(cages, ["alpha", "beta"]);
}

#[test]
fn handler_defaults_to_interface_name_dot_handle() {
    let t = Tree::new();
    t.write("web/cage.toml", "[interfaces.http]\nlisten = \"127.0.0.1:0\"\n\n[interfaces.api]\nprotocol = \"http\"\nlisten = \"127.0.0.1:0\"\n");
    t.write("web/http.lua", "return { handle = function() return 'from http.handle' end }\n");
    t.write("web/api.lua", "return { handle = function() return 'from api.handle' end, other = function() return 'no' end }\n");
    let s = Server::start(&t.path().join("web"), &[]);
    assert_eq!(get(s.addr("http"), "/").text(), "from http.handle");
    assert_eq!(get(s.addr("api"), "/").text(), "from api.handle");
    drop(s);

    // Without api.lua the default handler is reported at the interface's table.
    std::fs::remove_file(t.path().join("web/api.lua")).unwrap();
    refused_with(&t.path().join("web"), &[format!("{}:4: interfaces.api.handler: handler module api not found", toml_of(&t, "web"))]);
}

#[test]
fn request_timeout_of_the_cage_applies_and_interfaces_override_it() {
    let t = Tree::new();
    let remain = "return { handle = function(req, res) return { remain = pmnc.request.remain(), interface = pmnc.request.interface } end }\n";
    t.write(
        "cages/timed/cage.toml",
        "request_timeout = \"3s\"\n\n[interfaces.http]\nlisten = \"127.0.0.1:0\"\n\n[interfaces.fast]\nprotocol = \"http\"\nlisten = \"127.0.0.1:0\"\nhandler = \"http.handle\"\nrequest_timeout = \"700ms\"\n",
    );
    t.write("cages/timed/http.lua", remain);
    t.write("cages/plain/cage.toml", "[interfaces.plain]\nprotocol = \"http\"\nlisten = \"127.0.0.1:0\"\nhandler = \"http.handle\"\n");
    t.write("cages/plain/http.lua", remain);
    let s = Server::start(t.path(), &[]);
    let remain_of = |interface: &str| -> f64 {
        let r = get(s.addr(interface), "/");
        assert_eq!(r.status, 200, "{}", r.text());
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["interface"], interface);
        v["remain"].as_f64().unwrap_or_else(|| panic!("{}", r.text()))
    };
    let cage_level = remain_of("http");
    assert!(cage_level > 2.0 && cage_level <= 3.0, "cage request_timeout 3s, remain {cage_level}");
    let overridden = remain_of("fast");
    assert!(overridden > 0.2 && overridden <= 0.7, "interface request_timeout 700ms, remain {overridden}");
    let default = remain_of("plain");
    assert!(default > 9.0 && default <= 10.0, "default request_timeout 10s, remain {default}");
}

// ---- modules at start ----

#[test]
fn module_with_a_syntax_error_is_refused() {
    let t = Tree::new();
    let web = web_cage(&t, &http_cage_toml(""));
    t.write("web/util.lua", "local M = {}\nfunction M.f()\n  return 1 +\nend\nreturn M\n");
    let out = refused_with(&web, &["web/util.lua:4: unexpected symbol near 'end'".to_string()]);
    assert_eq!(out.lines().last(), Some("1 problem found"), "{out}");
}

#[test]
fn module_failing_at_top_level_is_refused() {
    let t = Tree::new();
    let web = web_cage(&t, &http_cage_toml(""));
    t.write("web/util.lua", "local M = {}\nlocal config = nil\nlocal port = config.port\nreturn M\n");
    let out = refused_with(&web, &["web/util.lua:3: attempt to index a nil value".to_string()]);
    // One line per problem: the message, not a traceback.
    assert_eq!(out.lines().count(), 2, "{out}");
    assert_eq!(out.lines().last(), Some("1 problem found"), "{out}");
}

#[test]
fn module_raising_an_error_at_top_level_is_refused() {
    let t = Tree::new();
    let web = web_cage(&t, &http_cage_toml(""));
    t.write("web/util.lua", "local M = {}\n\nerror('util needs a database')\nreturn M\n");
    let out = refused_with(&web, &["web/util.lua:3: util needs a database".to_string()]);
    assert_eq!(out.lines().count(), 2, "{out}");
}

#[test]
fn module_not_returning_a_table_is_refused() {
    for (source, kind) in [("return 42\n", "integer"), ("local M = {}\nfunction M.f() end\n", "nil"), ("return 'x'\n", "string")] {
        let t = Tree::new();
        let web = web_cage(&t, &http_cage_toml(""));
        t.write("web/util.lua", source);
        refused_with(&web, &[format!("web/util.lua: a module must return a table, this one returned {kind}")]);
    }
}

#[test]
fn reserved_module_name_is_refused() {
    for name in ["log", "json", "sleep", "clock", "request", "events", "calls", "parallel"] {
        let t = Tree::new();
        let web = web_cage(&t, &http_cage_toml(""));
        t.write(&format!("web/{name}.lua"), "return {}\n");
        refused_with(&web, &[format!("web/{name}.lua: module name \"{name}\" is reserved by the pmnc API (pmnc.{name})")]);
    }
    // In .shared too.
    let t = Tree::new();
    t.write("cages/web/cage.toml", &http_cage_toml(""));
    t.write("cages/web/http.lua", "return { handle = function() end }\n");
    t.write("cages/.shared/log.lua", "return {}\n");
    refused_with(t.path(), &[".shared/log.lua: module name \"log\" is reserved".to_string()]);
}

#[test]
fn own_module_file_wins_over_shared() {
    let t = Tree::new();
    let handler = "return { handle = function(req, res) return pmnc.util.origin() .. ' ' .. pmnc.extra.origin() end }\n";
    t.write("cages/web/cage.toml", &http_cage_toml(""));
    t.write("cages/web/http.lua", handler);
    t.write("cages/web/util.lua", "return { origin = function() return 'web-own' end }\n");
    t.write("cages/other/cage.toml", "[interfaces.other]\nprotocol = \"http\"\nlisten = \"127.0.0.1:0\"\nhandler = \"http.handle\"\n");
    t.write("cages/other/http.lua", handler);
    t.write("cages/.shared/util.lua", "return { origin = function() return 'shared' end }\n");
    t.write("cages/.shared/extra.lua", "return { origin = function() return 'extra-' .. pmnc.cage end }\n");
    // The shared http.lua loses to both cages' own.
    t.write("cages/.shared/http.lua", "return { handle = function() return 'shared handler' end }\n");
    let s = Server::start(t.path(), &[]);
    assert_eq!(get(s.addr("http"), "/").text(), "web-own extra-web");
    assert_eq!(get(s.addr("other"), "/").text(), "shared extra-other");
}

/// A cage whose handler runs `pmnc.<path>` through pcall and answers with the error message.
fn calling_cage(t: &Tree) -> Server {
    t.write("cages/web/cage.toml", &http_cage_toml(""));
    t.write(
        "cages/web/http.lua",
        r#"local M = {}
local calls = {
  private = function() return pmnc.util._secret() end,
  private_other = function() return pmnc("worker").jobs._internal() end,
  public = function() return pmnc.util.open() end,
  public_other = function() return pmnc("worker").jobs.work() end,
  no_module = function() return pmnc.nothing.f() end,
  no_function = function() return pmnc.util.nothing() end,
  no_module_other = function() return pmnc("worker").nothing.f() end,
  no_function_other = function() return pmnc("worker").jobs.nothing() end,
  no_cage = function() return pmnc("nowhere").jobs.work() end,
  unprotected = function() return pmnc.util._secret() end,
}
function M.handle(req, res)
  local name = req.path:sub(2)
  if name == "unprotected" then return calls.unprotected() end
  local ok, result = pcall(calls[name])
  return (ok and "ok: " or "error: ") .. tostring(result)
end
return M
"#,
    );
    t.write("cages/web/util.lua", "return { open = function() return 'open' end, _secret = function() return 'secret' end }\n");
    t.write("cages/worker/cage.toml", "");
    t.write("cages/worker/jobs.lua", "return { work = function() return 'worked' end, _internal = function() return 'internal' end }\n");
    Server::start(t.path(), &[])
}

#[test]
fn private_functions_cannot_be_called_through_pmnc() {
    let t = Tree::new();
    let mut s = calling_cage(&t);
    let addr = s.addr("http");
    assert_eq!(get(addr, "/public").text(), "ok: open");
    assert_eq!(get(addr, "/public_other").text(), "ok: worked");
    let r = get(addr, "/private");
    assert!(r.text().starts_with("error: "), "{}", r.text());
    assert!(r.text().contains("cage web: util._secret is private (names starting with _ cannot be called through pmnc)"), "{}", r.text());
    let r = get(addr, "/private_other");
    assert!(r.text().starts_with("error: "), "{}", r.text());
    assert!(r.text().contains("calling worker.jobs._internal") && r.text().contains("cage worker: jobs._internal is private"), "{}", r.text());
    // Unprotected, the same call fails the request and the log says why.
    let r = get(addr, "/unprotected");
    assert_eq!(r.status, 500, "{}", r.text());
    assert!(!r.text().contains("secret"), "{}", r.text());
    let line = s.wait_for("util._secret is private", Duration::from_secs(5));
    assert!(line.is_some_and(|l| l.contains("http.handle failed")), "{}", s.log.join("\n"));
}

#[test]
fn calling_a_missing_module_or_function_names_cage_module_and_function() {
    let t = Tree::new();
    let s = calling_cage(&t);
    let addr = s.addr("http");
    let cases = [
        ("/no_module", "cage web has no module nothing (calling nothing.f)"),
        ("/no_function", "cage web: module util has no function nothing"),
        ("/no_module_other", "calling worker.nothing.f: cage worker has no module nothing (calling nothing.f)"),
        ("/no_function_other", "calling worker.jobs.nothing: cage worker: module jobs has no function nothing"),
        ("/no_cage", "calling nowhere.jobs.work: no cage named nowhere runs in this process (cages here: web, worker)"),
    ];
    for (path, message) in cases {
        let r = get(addr, path);
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        assert!(r.text().starts_with("error: "), "{path}: {}", r.text());
        assert!(r.text().contains(message), "{path}: {:?} does not say {message:?}", r.text());
    }
    // Errors raised by pmnc point at the caller's line, not at pmnc's own code.
    let r = get(addr, "/no_module");
    assert!(r.text().starts_with("error: web/http.lua:7: "), "{}", r.text());
}
