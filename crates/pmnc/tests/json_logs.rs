//! Log lines for collectors through the real binary: `--log-format json` and `log_format` write
//! one JSON object per line, and a line written while a request runs carries its request id and
//! the trace of an incoming `traceparent`, in text format too (decision 145).

mod common;

use std::time::Duration;

use common::*;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";

fn app(extra: &str) -> Tree {
    let t = Tree::new();
    t.write("web/cage.toml", &format!("{extra}\n{}", http_cage_toml("")));
    t.write("web/http.lua", "return { handle = function(request)\n  pmnc.log.info('handled', request.path)\n  return 'ok'\nend }\n");
    t
}

/// GET `path` with extra header lines; the response.
fn get_with(addr: std::net::SocketAddr, path: &str, headers: &str) -> std::io::Result<Response> {
    let req = format!("GET {path} HTTP/1.1\r\nhost: test\r\n{headers}connection: close\r\n\r\n");
    raw_request(addr, req.as_bytes(), Duration::from_secs(30))
}

/// The log line (as JSON) whose message is `message`, waiting for it.
fn json_line(s: &mut Server, message: &str) -> Result<serde_json::Value, String> {
    let line = s.wait_for(&format!("\"message\":\"{message}\""), Duration::from_secs(10)).ok_or_else(|| {
        format!(
            "no line {message:?}:
{}",
            s.log.join(
                "
"
            )
        )
    })?;
    serde_json::from_str(&line).map_err(|e| format!("{e}: {line}"))
}

#[test]
fn json_lines_carry_the_request_id_and_the_trace_of_a_traceparent() {
    let t = Tree::new();
    // The access log (stdout) has a format of its own (access_log = "json"); off here, so that
    // every line read is a diagnostic line of stderr.
    t.write("web/cage.toml", &http_cage_toml("access_log = \"off\"\n"));
    t.write("web/http.lua", "return { handle = function(request)\n  pmnc.log.info('handled', request.path)\n  return 'ok'\nend }\n");
    let mut s = Server::start(&t.path().join("web"), &["--log-format", "json"]);
    let http = s.addrs.first().map(|a| a.2).expect("the listening line was read");
    let traced = get_with(http, "/traced", &format!("traceparent: 00-{TRACE}-{PARENT}-01\r\n")).unwrap();
    assert_eq!(traced.status, 200);
    let plain = get_with(http, "/plain", "").unwrap();
    // An upper-case trace id is not valid W3C trace context: the request runs without one.
    let invalid = get_with(http, "/invalid", &format!("traceparent: 00-{}-{PARENT}-01\r\n", TRACE.to_uppercase())).unwrap();

    let line = json_line(&mut s, "handled /traced").unwrap();
    assert_eq!(line["level"], "INFO");
    assert_eq!(line["cage"], "web");
    assert_eq!(line["module"], "http");
    assert_eq!(line["fields"]["interface"], "http");
    assert_eq!(line["request_id"].as_str(), traced.header("x-request-id"), "{line}");
    assert_eq!(line["trace_id"], TRACE);
    let span = line["span_id"].as_str().unwrap();
    assert!(span.len() == 16 && span.bytes().all(|b| b.is_ascii_hexdigit()) && span != PARENT, "the request's own span: {span}");
    let time = line["time"].as_str().unwrap();
    assert!(time.ends_with('Z') && &time[10..11] == "T" && time.len() >= 20, "RFC 3339 time: {time}");

    for (path, r) in [("/plain", &plain), ("/invalid", &invalid)] {
        let line = json_line(&mut s, &format!("handled {path}")).unwrap();
        assert_eq!(line["request_id"].as_str(), r.header("x-request-id"), "{line}");
        assert!(line.get("trace_id").is_none() && line.get("span_id").is_none(), "no trace context: {line}");
    }
    s.signal(libc::SIGTERM);
    s.wait_exit(Duration::from_secs(20)).expect("exit");
    // Every line the process wrote, start to stop, is one JSON object.
    assert!(s.log.len() > 5);
    for l in &s.log {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(v["time"].is_string() && v["level"].is_string() && v["message"].is_string(), "{l}");
    }
}

#[test]
fn log_format_in_cage_toml_and_trace_ids_in_text_lines() {
    let t = app("log_format = \"json\"");
    let mut s = Server::start(&t.path().join("web"), &[]);
    let http = s.addrs.first().map(|a| a.2).expect("the listening line was read");
    let r = get_with(http, "/x", "").unwrap();
    let line = json_line(&mut s, "handled /x").unwrap();
    assert_eq!(line["request_id"].as_str(), r.header("x-request-id"));
    drop(s);

    // Text stays the default; a request's line carries its trace there too.
    let t = app("");
    let mut s = Server::start(&t.path().join("web"), &[]);
    let r = get_with(s.addr("http"), "/y", &format!("traceparent: 00-{TRACE}-{PARENT}-00\r\n")).unwrap();
    let line = s.wait_for("handled /y", Duration::from_secs(10)).unwrap();
    assert!(!line.starts_with('{'), "{line}");
    assert!(line.contains(&format!("request={}", r.header("x-request-id").unwrap())), "{line}");
    assert!(line.contains(&format!("trace_id={TRACE} span_id=")), "{line}");

    let bad = pmnc_limited(&["run", t.path().join("web").to_str().unwrap(), "--log-format", "xml"], Duration::from_secs(10));
    assert_eq!(bad.code, Some(2), "{}", bad.stderr);
    assert!(bad.stderr.contains("--log-format \"xml\" is not one of text, json"), "{}", bad.stderr);
}
