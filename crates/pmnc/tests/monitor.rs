//! The monitor of a running `pmnc`: exact figures in /metrics and /status after known requests,
//! histogram buckets, reloads and module errors, alerts with de-duplication, and access control.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;

const HANDLER: &str = r#"
local M = {}
function M.handle(request, response)
  if request.path == "/fail" then error("failing on purpose") end
  if request.path == "/slow" then pmnc.sleep(0.15) end
  if request.path == "/hang" then pmnc.sleep(5) end
  if request.path == "/visit" then
    pmnc.state.set("visits", (pmnc.state.get("visits") or 0) + 1)
  end
  if request.path == "/alerts" then
    return tostring(pmnc.state.get("alerts") or 0) .. " " .. tostring(pmnc.state.get("last_alert") or "")
  end
  return "ok"
end
return M
"#;

const ALERTS: &str = r#"
local M = {}
function M.receive(alert)
  pmnc.state.set("alerts", (pmnc.state.get("alerts") or 0) + 1)
  pmnc.state.set("last_alert", alert.alert .. "|" .. alert.kind .. "|" .. alert.subject .. "|" .. alert.message)
end
return M
"#;

fn json(r: &Response) -> serde_json::Value {
    serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", r.text()))
}

/// GETs /metrics until `name_and_labels` reads `want` (figures are read live, but sampled
/// series lag up to a second).
fn metric_until(addr: SocketAddr, name_and_labels: &str, want: f64) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = get(addr, "/metrics").text();
        if sample(&text, name_and_labels) == Some(want) {
            return text;
        }
        if Instant::now() > deadline {
            panic!("{name_and_labels} is not {want} in:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn metrics_and_status_count_requests_errors_and_latency_exactly() {
    let t = Tree::new();
    // The state visits go through an interface of their own with a long deadline: a commit to
    // SQLite on a loaded machine may take longer than the 400 ms the deadline test needs.
    t.write(
        "web/cage.toml",
        &http_cage_toml("request_timeout = \"400ms\"\n\n[interfaces.state]\nprotocol = \"http\"\nlisten = \"127.0.0.1:0\"\nhandler = \"http.handle\"\nrequest_timeout = \"10s\"\n"),
    );
    t.write("web/http.lua", HANDLER);
    let mut s = Server::start(&t.path().join("web"), &[]);
    let http = s.addr("http");
    let visits = s.addr("state");
    let monitor = monitor_addr(&mut s);

    for _ in 0..7 {
        assert_eq!(get(http, "/").status, 200);
    }
    let mut failed_ids = Vec::new();
    for _ in 0..3 {
        let r = get(http, "/fail");
        assert_eq!(r.status, 500);
        let text = r.text();
        let id = text.split("request id ").nth(1).map(|s| s.trim_end_matches([')', '\n']).to_string()).unwrap_or_default();
        assert!(!id.is_empty(), "{text}");
        failed_ids.push(id);
    }
    for _ in 0..2 {
        assert_eq!(get(http, "/slow").status, 200);
    }
    assert_eq!(get(http, "/hang").status, 504);

    let labels = "{cage=\"web\",interface=\"http\"}";
    let text = metric_until(monitor, &format!("pmnc_requests_total{labels}"), 13.0);
    assert_eq!(sample(&text, &format!("pmnc_request_errors_total{labels}")), Some(4.0), "{text}");
    assert_eq!(sample(&text, &format!("pmnc_request_timeouts_total{labels}")), Some(1.0), "{text}");
    assert_eq!(sample(&text, &format!("pmnc_requests_in_flight{labels}")), Some(0.0), "{text}");
    let bucket = |le: &str| sample(&text, &format!("pmnc_request_duration_seconds_bucket{{cage=\"web\",interface=\"http\",le=\"{le}\"}}"));
    // 10 quick requests, 2 of 0.15 s, 1 stopped at its 0.4 s deadline.
    assert_eq!(bucket("0.1"), Some(10.0), "{text}");
    assert_eq!(bucket("0.25"), Some(12.0), "{text}");
    assert_eq!(bucket("0.5"), Some(13.0), "{text}");
    assert_eq!(bucket("+Inf"), Some(13.0), "{text}");
    assert_eq!(sample(&text, &format!("pmnc_request_duration_seconds_count{labels}")), Some(13.0), "{text}");
    let sum = sample(&text, &format!("pmnc_request_duration_seconds_sum{labels}")).unwrap_or_default();
    assert!((0.7..3.0).contains(&sum), "sum {sum}: 2 x 0.15 + 0.4 and the quick ones");

    // Each visit reads and writes the state resource.
    for _ in 0..4 {
        assert_eq!(get(visits, "/visit").status, 200);
    }
    let text = metric_until(monitor, "pmnc_requests_total{cage=\"web\",interface=\"state\"}", 4.0);
    assert_eq!(sample(&text, "pmnc_resource_calls_total{cage=\"web\",resource=\"state\"}"), Some(8.0), "{text}");
    assert_eq!(sample(&text, "pmnc_resource_errors_total{cage=\"web\",resource=\"state\",cause=\"query\"}"), Some(0.0), "{text}");
    assert_eq!(sample(&text, "pmnc_resource_call_duration_seconds_count{cage=\"web\",resource=\"state\"}"), Some(8.0), "{text}");
    assert!(text.contains("# TYPE pmnc_request_duration_seconds histogram"), "{text}");
    // Both workers sample their VM's memory within a second or two.
    let text = {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = get(monitor, "/metrics").text();
            let vms = ["0", "1"]
                .iter()
                .filter(|w| sample(&text, &format!("pmnc_lua_memory_bytes{{cage=\"web\",worker=\"{w}\"}}")).is_some_and(|b| b > 10_000.0))
                .count();
            if vms == 2 || Instant::now() > deadline {
                break text;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    assert!(text.contains("pmnc_lua_memory_bytes{cage=\"web\",worker=\"1\"}"), "{text}");

    let r = get(monitor, "/status");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let st = json(&r);
    let iface = &st["cages"][0]["interfaces"][0];
    assert_eq!(st["cages"][0]["name"], "web");
    assert_eq!(iface["name"], "http");
    assert_eq!(iface["requests"], 13);
    assert_eq!(iface["errors"], 4);
    assert_eq!(iface["timeouts"], 1);
    assert_eq!(st["pid"], s.child.id());
    assert!(st["cluster"].is_null(), "not clustered: {st}");
    let events = st["events"].as_array().cloned().unwrap_or_default();
    for id in &failed_ids {
        let e = events.iter().find(|e| e["request_id"] == id.as_str()).unwrap_or_else(|| panic!("no event for request {id}: {st}"));
        assert_eq!(e["kind"], "request_error");
        assert!(e["message"].as_str().unwrap_or("").contains("http.lua:4: failing on purpose"), "{e}");
    }
    assert!(events.iter().any(|e| e["message"] == "deadline exceeded"), "{st}");

    // The series of the page: requests per second appear within a couple of samples.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let series = json(&get(monitor, "/api/series?window=5m"));
        let column = series["series"]["interface/web/http/requests_per_s"].as_array().cloned().unwrap_or_default();
        let total: f64 = column.iter().filter_map(|v| v.as_f64()).sum();
        assert_eq!(series["time"].as_array().map(|t| t.len()), Some(column.len()));
        // Rates over intervals of about a second sum to about the count.
        if (11.0..=15.0).contains(&total) {
            break;
        }
        assert!(Instant::now() < deadline, "requests/s never summed to 13: {column:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(get(monitor, "/api/series?window=2d").status, 400);
    assert_eq!(get(monitor, "/api/series?since=yesterday").status, 400);
    let all = json(&get(monitor, "/api/series"));
    let times = all["time"].as_array().cloned().unwrap_or_default();
    assert_eq!(all["size"], 300);
    let last = times.last().and_then(|t| t.as_f64()).unwrap_or_default();
    let newer = json(&get(monitor, &format!("/api/series?since={last}")));
    assert!(newer["time"].as_array().is_some_and(|t| t.len() < times.len() && t.iter().all(|x| x.as_f64().unwrap_or(0.0) > last)), "{newer}");
    assert!(json(&get(monitor, "/api/series?window=1h"))["series"].is_object());

    // The page and its vendored scripts.
    let page = get(monitor, "/");
    assert_eq!(page.status, 200);
    assert!(page.text().contains("assets/uPlot.iife.min.js"), "{}", page.text());
    let lib = get(monitor, "/assets/uPlot.iife.min.js");
    assert_eq!(lib.status, 200);
    assert!(lib.text().contains("uPlot"));
}

#[test]
fn reloads_module_errors_and_alerts_with_deduplication() {
    let t = Tree::new();
    t.write("web/cage.toml", &http_cage_toml("[monitor.alerts.broken]\nkind = \"module_error\"\ntarget = \"web.alerts.receive\"\nrepeat = \"1s\"\n"));
    t.write("web/http.lua", HANDLER);
    t.write("web/alerts.lua", ALERTS);
    t.write("web/util.lua", "return { x = 1 }\n");
    let mut s = Server::start(&t.path().join("web"), &[]);
    let http = s.addr("http");
    let monitor = monitor_addr(&mut s);
    assert_eq!(get(http, "/alerts").text(), "0 ");

    t.write("web/util.lua", "local M = {}\nM.x = = 2\nreturn M\n");
    s.wait_for("keeping the previous version", Duration::from_secs(10)).expect("reload error logged");
    let r = get_until(
        http,
        "/alerts",
        "1 broken|module_error|util|cage web: 1 module(s) failed to load: web/util.lua:2: unexpected symbol near '='",
        Duration::from_secs(10),
    );
    assert_eq!(r.status, 200);
    let text = metric_until(monitor, "pmnc_module_load_errors_total{cage=\"web\"}", 1.0);
    assert_eq!(sample(&text, "pmnc_module_reloads_total{cage=\"web\"}"), Some(0.0), "no reload yet: {text}");
    let st = json(&get(monitor, "/status"));
    let broken = &st["cages"][0]["broken_modules"];
    assert_eq!(broken[0]["module"], "util", "{st}");
    assert!(broken[0]["message"].as_str().unwrap_or("").starts_with("web/util.lua:2:"), "{st}");
    assert_eq!(st["alerts"][0]["name"], "broken");
    assert_eq!(st["alerts"][0]["fired"], 1);

    // While the module stays broken the rule does not fire again: wait through three samples.
    s.wait_for("alert broken fired", Duration::from_secs(5)).expect("the firing is logged");
    assert!(s.wait_for_new("alert broken fired", Duration::from_millis(3200)).is_none(), "fired twice while broken");
    assert_eq!(get(http, "/alerts").text().split(' ').next(), Some("1"));

    // Fixed: a reload is counted and the condition clears; broken again: it fires again.
    t.write("web/util.lua", "return { x = 3 }\n");
    metric_until(monitor, "pmnc_module_reloads_total{cage=\"web\"}", 1.0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while json(&get(monitor, "/status"))["alerts"][0]["active"] != false {
        assert!(Instant::now() < deadline, "alert never cleared");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(json(&get(monitor, "/status"))["cages"][0]["broken_modules"].as_array().is_some_and(|b| b.is_empty()));
    t.write("web/util.lua", "return {\n\n x = \n");
    let r = get_until(
        http,
        "/alerts",
        "2 broken|module_error|util|cage web: 1 module(s) failed to load: web/util.lua:4: unexpected symbol near <eof>",
        Duration::from_secs(10),
    );
    assert_eq!(r.status, 200);
}

#[test]
fn not_loopback_without_access_control_refuses_to_start() {
    let t = Tree::new();
    t.write("web/cage.toml", &http_cage_toml("\n[monitor]\nlisten = \"0.0.0.0:0\"\n"));
    t.write("web/http.lua", HANDLER);
    let path = t.path().join("web");
    let out = pmnc_limited(&["run", &path.display().to_string()], Duration::from_secs(20));
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("cage.toml:5: monitor.listen: the monitor of cage web would listen on 0.0.0.0:0"), "{}", out.stderr);
    assert!(out.stderr.contains("set token"), "{}", out.stderr);
    assert!(!out.stderr.contains("running "), "{}", out.stderr);
    let out = pmnc_limited(&["check", &path.display().to_string()], Duration::from_secs(20));
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("monitor.listen"), "{}", out.stderr);

    // An empty token (its variable unset) is no access control either.
    t.write("web/cage.toml", &http_cage_toml("[monitor]\nlisten = \"0.0.0.0:0\"\ntoken = \"${PMNC_TEST_UNSET_TOKEN_VARIABLE}\"\n"));
    let out = pmnc_limited(&["check", &path.display().to_string()], Duration::from_secs(20));
    assert_eq!(out.code, Some(1), "{}{}", out.stdout, out.stderr);
    assert!(out.stderr.contains("monitor.token"), "{}", out.stderr);
}

#[test]
fn token_and_basic_auth_guard_every_page() {
    let t = Tree::new();
    let port = spare_port();
    t.write("web/cage.toml", &http_cage_toml(&format!("[monitor]\nlisten = \"0.0.0.0:{port}\"\ntoken = \"s3cret\"\n")));
    t.write("web/http.lua", HANDLER);
    let mut child_env = Server::start(&t.path().join("web"), &[]);
    let monitor = monitor_addr(&mut child_env);
    assert_eq!(monitor.port(), port);
    let local: SocketAddr = SocketAddr::from(([127, 0, 0, 1], port));
    for path in ["/", "/metrics", "/status", "/api/series"] {
        assert_eq!(get(local, path).status, 401, "{path} without a token");
        assert_eq!(get(local, &format!("{path}?token=wrong")).status, 401, "{path} with a wrong token");
        let with_query = if path.contains('?') { format!("{path}&token=s3cret") } else { format!("{path}?token=s3cret") };
        assert_eq!(get(local, &with_query).status, 200, "{path} with the token");
    }
    let bearer = |token: &str| {
        let req = format!("GET /status HTTP/1.1\r\nhost: t\r\nauthorization: Bearer {token}\r\nconnection: close\r\n\r\n");
        raw_request(local, req.as_bytes(), Duration::from_secs(10)).map(|r| r.status).unwrap_or(0)
    };
    assert_eq!(bearer("s3cret"), 200);
    assert_eq!(bearer("s3cre"), 401);
    drop(child_env);

    let t = Tree::new();
    t.write("web/cage.toml", &http_cage_toml("[monitor]\nlisten = \"127.0.0.1:0\"\nuser = \"ops\"\npassword = \"pw\"\n"));
    t.write("web/http.lua", HANDLER);
    let mut s = Server::start(&t.path().join("web"), &[]);
    let monitor = monitor_addr(&mut s);
    let r = get(monitor, "/metrics");
    assert_eq!(r.status, 401);
    assert_eq!(r.header("www-authenticate"), Some("Basic realm=\"pmnc monitor\""));
    let basic = |credentials: &str| {
        let req = format!("GET /metrics HTTP/1.1\r\nhost: t\r\nauthorization: Basic {credentials}\r\nconnection: close\r\n\r\n");
        raw_request(monitor, req.as_bytes(), Duration::from_secs(10)).map(|r| r.status).unwrap_or(0)
    };
    assert_eq!(basic("b3BzOnB3"), 200, "ops:pw");
    assert_eq!(basic("b3BzOnB4"), 401, "ops:px");
}

#[test]
fn listen_false_turns_the_page_off() {
    let t = Tree::new();
    t.write("web/cage.toml", &http_cage_toml("[monitor]\nlisten = false\n"));
    t.write("web/http.lua", HANDLER);
    let mut s = Server::start(&t.path().join("web"), &[]);
    assert_eq!(get(s.addr("http"), "/").text(), "ok");
    s.drain(Duration::from_millis(300));
    assert!(!s.log.iter().any(|l| l.contains("monitor page at")), "{:?}", s.log);
}

#[test]
fn alert_targets_in_this_process_must_exist() {
    let t = Tree::new();
    t.write(
        "app/cages/web/cage.toml",
        &http_cage_toml("\n[monitor.alerts.a]\nkind = \"module_error\"\ntarget = \"ops.alerts.recieve\"\n[monitor.alerts.b]\nkind = \"module_error\"\ntarget = \"ops.nothing.receive\"\n[monitor.alerts.c]\nkind = \"module_error\"\ntarget = \"elsewhere.alerts.receive\"\n"),
    );
    t.write("app/cages/web/http.lua", HANDLER);
    t.write("app/cages/ops/cage.toml", "");
    t.write("app/cages/ops/alerts.lua", ALERTS);
    let out = pmnc_limited(&["check", &t.path().join("app").display().to_string()], Duration::from_secs(20));
    assert_eq!(out.code, Some(1), "{}{}", out.stdout, out.stderr);
    assert!(
        out.stderr.contains("web/cage.toml:6: monitor.alerts.a.target: module alerts (ops/alerts.lua) has no function recieve (it has: receive)"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("web/cage.toml:9: monitor.alerts.b.target: cage ops has no module nothing"), "{}", out.stderr);
    assert!(!out.stderr.contains("elsewhere"), "a cage elsewhere is not a problem: {}", out.stderr);
}

#[test]
fn error_rate_alert_fires_from_live_figures() {
    let t = Tree::new();
    t.write(
        "web/cage.toml",
        &http_cage_toml("[monitor.alerts.errors]\nkind = \"error_rate\"\nthreshold = 0.1\ninterface = \"http\"\ntarget = \"web.alerts.receive\"\n"),
    );
    t.write("web/http.lua", HANDLER);
    t.write("web/alerts.lua", ALERTS);
    let mut s = Server::start(&t.path().join("web"), &[]);
    let http = s.addr("http");
    // Mixed with successes: the rule looks at errors per second, not at their share.
    for _ in 0..5 {
        assert_eq!(get(http, "/").status, 200);
    }
    for _ in 0..5 {
        assert_eq!(get(http, "/fail").status, 500);
    }
    let line = s.wait_for("alert errors fired", Duration::from_secs(10)).expect("the alert fires");
    assert!(line.contains("errors/s over the last 10 s (threshold 0.1), most on interface http"), "{line}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = get(http, "/alerts").text();
        if text.starts_with("1 errors|error_rate|http|cage web: ") {
            break;
        }
        assert!(Instant::now() < deadline, "alert not received: {text:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn queue_depth_and_dead_letters_are_metrics() {
    let t = Tree::new();
    t.write("web/cage.toml", &http_cage_toml("\n[queues.later]\n[queues.doomed]\nexpires_in = \"1s\"\n[queues.doomed.backoff]\ninitial = \"100ms\"\n"));
    t.write(
        "web/http.lua",
        r#"local M = {}
function M.handle(request)
  if request.path == "/later" then
    return pmnc("web", { queue = "later", delay = 3600 }).work.run()
  elseif request.path == "/doomed" then
    return pmnc("web", { queue = "doomed" }).work.fail()
  end
end
return M
"#,
    );
    t.write("web/work.lua", "local M = {}\nfunction M.run() end\nfunction M.fail() error('always') end\nreturn M\n");
    let mut s = Server::start(&t.path().join("web"), &[]);
    let addr = s.addr("http");
    let page = monitor_addr(&mut s);
    for _ in 0..3 {
        assert_eq!(get(addr, "/later").status, 200);
    }
    get(addr, "/doomed");
    metric_until(page, "pmnc_queue_depth{cage=\"web\",queue=\"later\"}", 3.0);
    let text = metric_until(page, "pmnc_queue_dead_letters{cage=\"web\",queue=\"doomed\"}", 1.0);
    let age = sample(&text, "pmnc_queue_oldest_age_seconds{cage=\"web\",queue=\"later\"}").expect("oldest age of the later queue");
    assert!((0.0..60.0).contains(&age), "{age}");
}

#[test]
fn alerts_can_be_delivered_as_durable_calls() {
    let t = Tree::new();
    t.write(
        "web/cage.toml",
        &http_cage_toml("[queues.alerts]\n[monitor.alerts.broken]\nkind = \"module_error\"\ntarget = \"web.alerts.receive\"\ndurable_queue = \"alerts\"\n"),
    );
    t.write("web/http.lua", "local M = {}\nfunction M.handle() return 'ok' end\nreturn M\n");
    // The receiver records which durable call brought the alert.
    t.write("web/alerts.lua", "local M = {}\nfunction M.receive(alert) pmnc.log.warn('ALERT', alert.alert, 'call', pmnc.request.call_id) end\nreturn M\n");
    t.write("web/util.lua", "return { x = 1 }\n");
    let mut s = Server::start(&t.path().join("web"), &[]);
    t.write("web/util.lua", "local M = {}\nM.x = = 2\nreturn M\n");
    let line = s.wait_for("ALERT broken call alert-web-broken-", Duration::from_secs(15)).expect("the alert arrives as a durable call");
    assert!(!line.contains("call nil"), "{line}");
    let out = pmnc_limited(&["queue", "ls", t.path().join("web").to_str().unwrap()], Duration::from_secs(20));
    assert!(out.stdout.contains("alerts"), "{}", out.stdout);

    // A durable_queue the target cage does not have is refused before anything starts.
    t.write("other/cage.toml", &http_cage_toml("[monitor.alerts.b]\nkind = \"module_error\"\ntarget = \"other.alerts.receive\"\ndurable_queue = \"nope\"\n"));
    t.write("other/alerts.lua", "local M = {}\nfunction M.receive() end\nreturn M\n");
    t.write("other/http.lua", "local M = {}\nfunction M.handle() end\nreturn M\n");
    let out = pmnc_limited(&["check", t.path().join("other").to_str().unwrap()], Duration::from_secs(20));
    assert_eq!(out.code, Some(1));
    assert!(out.stderr.contains("monitor.alerts.b.target: alert b: cage other has no queue \"nope\""), "{}", out.stderr);
}

/// Polls /status until `done` holds for it (bounded by 10 s); returns that status.
fn status_until(monitor: SocketAddr, what: &str, done: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let st = json(&get(monitor, "/status"));
        if done(&st) {
            return st;
        }
        assert!(Instant::now() < deadline, "{what} never came: {st}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_broken_module_deleted_before_it_ever_loaded_leaves_status_and_its_alert_clears() {
    let t = Tree::new();
    t.write("web/cage.toml", &http_cage_toml("[monitor.alerts.broken]\nkind = \"module_error\"\ntarget = \"web.alerts.receive\"\nrepeat = \"1s\"\n"));
    t.write("web/http.lua", HANDLER);
    t.write("web/alerts.lua", ALERTS);
    let mut s = Server::start(&t.path().join("web"), &[]);
    let monitor = monitor_addr(&mut s);

    // A new module, broken from its first save: no worker ever has it.
    let fresh = t.write("web/fresh.lua", "return { x = = 1 }\n");
    s.wait_for("web/fresh.lua:1:", Duration::from_secs(10)).expect("the load error is logged");
    let st = status_until(monitor, "the alert", |st| st["alerts"][0]["active"] == true);
    assert_eq!(st["cages"][0]["broken_modules"][0]["module"], "fresh", "{st}");

    std::fs::remove_file(&fresh).expect("remove fresh.lua");
    s.wait_for("broken module fresh removed before it ever loaded", Duration::from_secs(10)).expect("the removal is logged");
    let st = status_until(monitor, "the alert clearing", |st| st["alerts"][0]["active"] == false);
    assert_eq!(st["cages"][0]["broken_modules"], serde_json::json!([]), "{st}");

    // Broken again under the same name: reported again (the removal forgot its old contents).
    t.write("web/fresh.lua", "return { x = = 1 }\n");
    status_until(monitor, "the alert again", |st| st["alerts"][0]["active"] == true && st["cages"][0]["broken_modules"][0]["module"] == "fresh");
}
