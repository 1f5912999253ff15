//! Traces through the real binary: an HTTP request that calls another cage, in the same process
//! and in another one over NATS, arrives at an OTLP receiver built on OpenTelemetry's official
//! protobuf definitions (crates/telemetry/tests/otlp_receiver.py) as one trace with the
//! expected parents; sampling follows the ratio and the incoming sampled flag.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::nats::Nats;
use common::*;
use serde_json::Value as Json;

/// The receiver process and the spans it printed, as they arrive.
struct Receiver {
    child: Child,
    spans: mpsc::Receiver<Json>,
    port: u16,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Receiver {
    /// None, loudly, when Python's opentelemetry-proto is missing.
    fn start(test: &str) -> Option<Receiver> {
        let ok = Command::new("python3")
            .args(["-c", "from opentelemetry.proto.collector.trace.v1 import trace_service_pb2"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("\n*** SKIPPED {test}: needs Python's opentelemetry-proto (python3 -m pip install opentelemetry-proto; .ci/run installs it) ***\n");
            return None;
        }
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../telemetry/tests/otlp_receiver.py");
        let mut child = Command::new("python3").arg(script).stdout(Stdio::piped()).spawn().unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap());
        let mut port = String::new();
        lines.read_line(&mut port).unwrap();
        let port = port.trim().parse().unwrap();
        let (tx, spans) = mpsc::channel();
        std::thread::spawn(move || {
            for line in lines.lines().map_while(Result::ok) {
                let export: Json = serde_json::from_str(&line).unwrap();
                for span in export["spans"].as_array().cloned().unwrap_or_default() {
                    if tx.send(span).is_err() {
                        return;
                    }
                }
            }
        });
        Some(Receiver { child, spans, port })
    }

    fn tracing_table(&self, extra: &str) -> String {
        format!("[tracing]\nendpoint = \"http://127.0.0.1:{}\"\n{extra}", self.port)
    }

    /// The next `n` spans (exports go out about once a second).
    fn take(&self, n: usize) -> Vec<Json> {
        (0..n).map(|i| self.spans.recv_timeout(Duration::from_secs(15)).unwrap_or_else(|_| panic!("span {} of {n} did not arrive", i + 1))).collect()
    }
}

const WEB: &str = r#"
local M = {}
function M.handle(request, response)
  if request.path == "/fail" then
    local ok, err = pcall(pmnc("worker").work.boom)
    response.status = 500
    return tostring(err)
  end
  return pmnc("worker").work.double(tonumber(request.query.n))
end
return M
"#;

const WORK: &str = r#"
local M = {}
function M.double(n) return { n = n * 2 } end
function M.boom() error("the worker failed on purpose") end
return M
"#;

fn get_with(addr: std::net::SocketAddr, path: &str, traceparent: Option<&str>) -> Response {
    let header = traceparent.map(|t| format!("traceparent: {t}\r\n")).unwrap_or_default();
    let req = format!("GET {path} HTTP/1.1\r\nhost: test\r\n{header}connection: close\r\n\r\n");
    raw_request(addr, req.as_bytes(), Duration::from_secs(30)).unwrap()
}

fn by_name<'a>(spans: &'a [Json], name: &str) -> &'a Json {
    spans.iter().find(|s| s["name"] == name).unwrap_or_else(|| panic!("no span named {name} in {spans:?}"))
}

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";

#[test]
fn a_request_and_its_call_to_another_cage_are_one_trace() {
    let Some(r) = Receiver::start("a_request_and_its_call_to_another_cage_are_one_trace") else { return };
    let tree = Tree::new();
    tree.write("app/cages/web/cage.toml", &format!("{}\n{}", http_cage_toml(""), r.tracing_table("")));
    tree.write("app/cages/web/http.lua", WEB);
    tree.write("app/cages/worker/cage.toml", &r.tracing_table("service_name = \"worker-svc\"\n"));
    tree.write("app/cages/worker/work.lua", WORK);
    let server = Server::start(&tree.path().join("app"), &[]);
    let addr = server.addr("http");

    // With an incoming traceparent: its trace, its span as the parent.
    let answer = get_with(addr, "/?n=21", Some(&format!("00-{TRACE}-{PARENT}-01")));
    assert_eq!(answer.status, 200, "{}", answer.text());
    let spans = r.take(2);
    let web = by_name(&spans, "GET");
    let work = by_name(&spans, "work.double");
    assert_eq!(web["trace_id"], TRACE);
    assert_eq!(work["trace_id"], TRACE);
    assert_eq!(web["parent_span_id"], PARENT);
    assert_eq!(work["parent_span_id"], web["span_id"], "the call's span is the request's child");
    assert_eq!(web["kind"], "SPAN_KIND_SERVER");
    assert_eq!(work["kind"], "SPAN_KIND_INTERNAL");
    assert_eq!(web["resource"]["service.name"]["stringValue"], "web");
    assert_eq!(work["resource"]["service.name"]["stringValue"], "worker-svc");
    assert_eq!(web["attributes"]["http.response.status_code"]["intValue"], "200");
    assert_eq!(web["attributes"]["url.path"]["stringValue"], "/");
    assert_eq!(web["attributes"]["pmnc.request_id"]["stringValue"], request_id(&answer));
    assert_eq!(work["attributes"]["pmnc.cage"]["stringValue"], "worker");
    let (ws, we) = (web["start_time_unix_nano"].as_u64().unwrap(), web["end_time_unix_nano"].as_u64().unwrap());
    let (ks, ke) = (work["start_time_unix_nano"].as_u64().unwrap(), work["end_time_unix_nano"].as_u64().unwrap());
    assert!(ws <= ks && ke <= we, "the call's span lies within the request's: {ws}..{we} vs {ks}..{ke}");

    // Without one: a new trace that both spans share; the request's span has no parent.
    assert_eq!(get_with(addr, "/?n=1", None).status, 200);
    let spans = r.take(2);
    let web = by_name(&spans, "GET");
    let work = by_name(&spans, "work.double");
    assert_eq!(web["parent_span_id"], "");
    assert_ne!(web["trace_id"], TRACE);
    assert_eq!(web["trace_id"].as_str().unwrap().len(), 32);
    assert_eq!(work["trace_id"], web["trace_id"]);
    assert_eq!(work["parent_span_id"], web["span_id"]);

    // A failing call and a 500: both spans are errors, the call's with its message.
    assert_eq!(get_with(addr, "/fail", None).status, 500);
    let spans = r.take(2);
    let web = by_name(&spans, "GET");
    let boom = by_name(&spans, "work.boom");
    assert_eq!(web["status"]["code"], "STATUS_CODE_ERROR");
    assert_eq!(boom["status"]["code"], "STATUS_CODE_ERROR");
    assert!(boom["status"]["message"].as_str().unwrap().contains("the worker failed on purpose"), "{boom}");
}

#[test]
fn sampling_keeps_the_share_asked_and_follows_the_callers_flag() {
    let Some(r) = Receiver::start("sampling_keeps_the_share_asked_and_follows_the_callers_flag") else { return };
    let tree = Tree::new();
    tree.write("web/cage.toml", &format!("{}\n{}", http_cage_toml(""), r.tracing_table("sampling = 0\n")));
    tree.write("web/http.lua", "local M = {}\nfunction M.handle(request) return 'ok' end\nreturn M\n");
    let server = Server::start(&tree.path().join("web"), &[]);
    let addr = server.addr("http");
    // Not kept: new traces at sampling 0, and a caller that says "not sampled".
    for _ in 0..5 {
        assert_eq!(get_with(addr, "/new", None).status, 200);
    }
    assert_eq!(get_with(addr, "/unsampled", Some(&format!("00-{TRACE}-{PARENT}-00"))).status, 200);
    // Kept: a caller that says "sampled". Spans leave in order, so had any of the others been
    // recorded it would arrive first.
    assert_eq!(get_with(addr, "/sampled", Some(&format!("00-{TRACE}-{PARENT}-01"))).status, 200);
    let spans = r.take(1);
    assert_eq!(spans[0]["attributes"]["url.path"]["stringValue"], "/sampled");
    assert!(r.spans.recv_timeout(Duration::from_millis(1500)).is_err(), "no other span may arrive");
}

#[test]
fn a_call_over_nats_continues_the_trace_in_the_other_process() {
    let Some(r) = Receiver::start("a_call_over_nats_continues_the_trace_in_the_other_process") else { return };
    let Some(nats) = Nats::start("a_call_over_nats_continues_the_trace_in_the_other_process", "") else { return };
    let tree = Tree::new();
    let cluster = format!("[cluster]\nurl = \"{}\"\nheartbeat = \"200ms\"\n", nats.url());
    tree.write("web/cage.toml", &format!("{}\n{cluster}\n{}", http_cage_toml(""), r.tracing_table("")));
    tree.write("web/http.lua", WEB);
    tree.write("worker/cage.toml", &format!("{cluster}\n{}", r.tracing_table("")));
    tree.write("worker/work.lua", WORK);
    let _worker = Server::start(&tree.path().join("worker"), &[]);
    let web = Server::start(&tree.path().join("web"), &[]);
    let addr = web.addr("http");
    let answer = get_until(addr, "/?n=4", "{\"n\":8}", Duration::from_secs(20));
    assert_eq!(answer.status, 200, "{}", answer.text());
    // Requests made while the worker was still joining may have left spans: find this one's.
    let answer = get_with(addr, "/?n=5", Some(&format!("00-{TRACE}-{PARENT}-01")));
    assert!(answer.text().contains("\"n\":10"), "{}", answer.text());
    let mut mine = Vec::new();
    while mine.len() < 2 {
        let s = r.take(1).remove(0);
        if s["trace_id"] == TRACE {
            mine.push(s);
        }
    }
    let web_span = by_name(&mine, "GET");
    let work = by_name(&mine, "work.double");
    assert_eq!(web_span["parent_span_id"], PARENT);
    assert_eq!(work["parent_span_id"], web_span["span_id"], "the remote call's span is the request's child");
    assert_eq!(work["kind"], "SPAN_KIND_SERVER");
    assert_eq!(work["attributes"]["pmnc.interface"]["stringValue"], "cluster");
    assert_eq!(work["resource"]["service.name"]["stringValue"], "worker");
}

#[test]
fn resource_calls_are_client_spans_and_http_calls_carry_the_trace() {
    let Some(r) = Receiver::start("resource_calls_are_client_spans_and_http_calls_carry_the_trace") else { return };
    let port = spare_port();
    let tree = Tree::new();
    tree.write(
        "web/cage.toml",
        &format!(
            "[interfaces.http]\nlisten = \"127.0.0.1:{port}\"\n[resources.loop]\nprotocol = \"http\"\nurl = \"http://127.0.0.1:{port}\"\n{}",
            r.tracing_table("")
        ),
    );
    tree.write(
        "web/http.lua",
        r#"
local M = {}
function M.handle(request, response)
  if request.path == "/echo" then return request.headers["traceparent"] or "none" end
  local answer = pmnc.transaction.loop.get("/echo")
  return answer.body
end
return M
"#,
    );
    let server = Server::start(&tree.path().join("web"), &[]);
    let answer = get_with(server.addr("http"), "/out", Some(&format!("00-{TRACE}-{PARENT}-01")));
    assert_eq!(answer.status, 200, "{}", answer.text());
    let seen = answer.text();
    let spans = r.take(3);
    let outer = spans.iter().find(|s| s["attributes"]["url.path"]["stringValue"] == "/out").unwrap_or_else(|| panic!("{spans:?}"));
    let inner = spans.iter().find(|s| s["attributes"]["url.path"]["stringValue"] == "/echo").unwrap_or_else(|| panic!("{spans:?}"));
    let call = by_name(&spans, "loop get");
    assert_eq!(call["kind"], "SPAN_KIND_CLIENT");
    assert_eq!(call["trace_id"], TRACE);
    assert_eq!(call["parent_span_id"], outer["span_id"], "the resource call is a child of the request");
    assert_eq!(call["attributes"]["db.system"]["stringValue"], "http");
    assert_eq!(call["attributes"]["pmnc.resource"]["stringValue"], "loop");
    // The called service saw the call's span as its parent, and continued the trace.
    assert_eq!(seen, format!("00-{TRACE}-{}-01", call["span_id"].as_str().unwrap()));
    assert_eq!(inner["trace_id"], TRACE);
    assert_eq!(inner["parent_span_id"], call["span_id"]);
}

#[test]
fn a_sql_statement_is_named_by_its_first_word_never_its_values() {
    let Some(r) = Receiver::start("a_sql_statement_is_named_by_its_first_word_never_its_values") else { return };
    let url = std::env::var("PMNC_TEST_POSTGRES_URL").unwrap_or_else(|_| "postgresql://postgres@127.0.0.1:5432/test".into());
    if std::net::TcpStream::connect_timeout(&"127.0.0.1:5432".parse().unwrap(), Duration::from_secs(2)).is_err() && !url.contains("PMNC") {
        eprintln!("\n*** SKIPPED a_sql_statement_is_named_by_its_first_word_never_its_values: PostgreSQL is not reachable (service postgresql start) ***\n");
        return;
    }
    let tree = Tree::new();
    tree.write("web/cage.toml", &format!("{}\n[resources.db]\nprotocol = \"postgresql\"\nurl = \"{url}\"\n{}", http_cage_toml(""), r.tracing_table("")));
    tree.write(
        "web/http.lua",
        r#"
local M = {}
function M.handle(request, response)
  local r = pmnc.transaction.db.execute("select $1::text as secret", "s3cret-value")
  return r.rows[1].secret
end
return M
"#,
    );
    let server = Server::start(&tree.path().join("web"), &[]);
    let answer = get_with(server.addr("http"), "/", Some(&format!("00-{TRACE}-{PARENT}-01")));
    assert_eq!(answer.text(), "s3cret-value");
    let spans = r.take(2);
    let call = by_name(&spans, "db execute");
    assert_eq!(call["attributes"]["db.system"]["stringValue"], "postgresql");
    assert_eq!(call["attributes"]["db.operation.name"]["stringValue"], "SELECT");
    let all = serde_json::to_string(&spans).unwrap();
    assert!(!all.contains("s3cret-value") && !all.contains("$1::text"), "a span must not carry the statement or its values: {all}");
}

#[test]
fn a_schedule_firing_is_a_consumer_span_of_its_own_trace() {
    let Some(r) = Receiver::start("a_schedule_firing_is_a_consumer_span_of_its_own_trace") else { return };
    let tree = Tree::new();
    tree.write(
        "jobs/cage.toml",
        &format!("[interfaces.tick]\nprotocol = \"schedule\"\ncron = \"* * * * * *\"\nhandler = \"jobs.tick\"\n\n{}", r.tracing_table("")),
    );
    tree.write("jobs/jobs.lua", "local M = {}\nfunction M.tick(firing) return firing.interface end\nreturn M\n");
    let _server = Server::start(&tree.path().join("jobs"), &[]);
    let span = r.take(1).remove(0);
    assert_eq!(span["name"], "jobs.tick");
    assert_eq!(span["kind"], "SPAN_KIND_CONSUMER");
    assert_eq!(span["parent_span_id"], "");
    assert_eq!(span["attributes"]["pmnc.interface"]["stringValue"], "tick");
    assert_eq!(span["resource"]["service.name"]["stringValue"], "jobs");
}

#[test]
fn a_request_calling_over_nats_and_enqueuing_a_durable_call_is_one_trace() {
    let test = "a_request_calling_over_nats_and_enqueuing_a_durable_call_is_one_trace";
    let Some(r) = Receiver::start(test) else { return };
    let Some(nats) = Nats::start(test, "") else { return };
    let tree = Tree::new();
    let cluster = format!("[cluster]\nurl = \"{}\"\nheartbeat = \"200ms\"\n", nats.url());
    tree.write("web/cage.toml", &format!("{}\n{cluster}\n{}", http_cage_toml(""), r.tracing_table("")));
    tree.write(
        "web/http.lua",
        r#"
local M = {}
function M.handle(request, response)
  local doubled = pmnc("worker").work.double(tonumber(request.query.n))
  local id = pmnc("worker", {queue = "jobs"}).work.later(doubled.n)
  return { n = doubled.n, call = id }
end
return M
"#,
    );
    tree.write("worker/cage.toml", &format!("{cluster}\n{}\n[queues.jobs]\n", r.tracing_table("")));
    tree.write(
        "worker/work.lua",
        "local M = {}\nfunction M.double(n) return { n = n * 2 } end\nfunction M.later(n) pmnc.state.set('later', n) return n end\nreturn M\n",
    );
    let _worker = Server::start(&tree.path().join("worker"), &[]);
    let web = Server::start(&tree.path().join("web"), &[]);
    let addr = web.addr("http");
    // Until the worker has joined the flock, calls to it fail; then the traced request.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while get_with(addr, "/?n=1", None).status != 200 {
        assert!(std::time::Instant::now() < deadline, "the worker never answered");
        std::thread::sleep(Duration::from_millis(50));
    }
    let answer = get_with(addr, "/?n=3", Some(&format!("00-{TRACE}-{PARENT}-01")));
    assert_eq!(answer.status, 200, "{}", answer.text());
    let mut mine: Vec<Json> = Vec::new();
    let wanted = ["GET", "work.double", "work.later", "state set"];
    while !wanted.iter().all(|w| mine.iter().any(|s| s["name"] == *w)) {
        let s = r.take(1).remove(0);
        if s["trace_id"] == TRACE {
            mine.push(s);
        }
    }
    let request = by_name(&mine, "GET");
    let call = by_name(&mine, "work.double");
    let attempt = by_name(&mine, "work.later");
    let write = by_name(&mine, "state set");
    assert_eq!(write["parent_span_id"], attempt["span_id"], "the attempt's resource call is its child");
    assert_eq!(request["parent_span_id"], PARENT);
    assert_eq!(call["parent_span_id"], request["span_id"]);
    assert_eq!(attempt["parent_span_id"], request["span_id"], "the durable call's attempt is a child of the request that made it");
    assert_eq!(attempt["kind"], "SPAN_KIND_CONSUMER");
    assert_eq!(attempt["attributes"]["pmnc.interface"]["stringValue"], "queue.jobs");
    assert_eq!(attempt["resource"]["service.name"]["stringValue"], "worker");
}

#[test]
fn a_line_of_the_line_interface_is_a_server_span() {
    let Some(r) = Receiver::start("a_line_of_the_line_interface_is_a_server_span") else { return };
    let tree = Tree::new();
    tree.write("echo/cage.toml", &format!("[interfaces.echo]\nprotocol = \"line\"\nlisten = \"127.0.0.1:0\"\n\n{}", r.tracing_table("")));
    tree.write("echo/echo.lua", "local M = {}\nfunction M.handle(line, client) return line:upper() end\nreturn M\n");
    let server = Server::start(&tree.path().join("echo"), &[]);
    let mut s = std::net::TcpStream::connect(server.addr("echo")).unwrap();
    use std::io::Write;
    s.write_all(b"hello\n").unwrap();
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer).unwrap();
    assert_eq!(answer, "HELLO\n");
    let span = r.take(1).remove(0);
    assert_eq!(span["name"], "echo.handle");
    assert_eq!(span["kind"], "SPAN_KIND_SERVER");
    assert_eq!(span["attributes"]["pmnc.interface"]["stringValue"], "echo");
}
