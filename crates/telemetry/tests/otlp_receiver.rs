//! Spans exported by the exporter thread, decoded by a receiver built on OpenTelemetry's
//! official protobuf definitions (tests/otlp_receiver.py, PyPI's opentelemetry-proto).
// The helpers below are test support: a failed step should stop the test where it happened.
#![allow(clippy::unwrap_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use rustomnic_telemetry::config::parse_endpoint;
use rustomnic_telemetry::{AttrValue, Exporter, Span, SpanKind, SpanStatus, TracingConfig};
use serde_json::Value as Json;

struct Receiver {
    child: Child,
    lines: BufReader<ChildStdout>,
    port: u16,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn has_proto() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "from opentelemetry.proto.collector.trace.v1 import trace_service_pb2"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("SKIPPED: needs Python's opentelemetry-proto (python3 -m pip install opentelemetry-proto; .ci/run installs it)");
    }
    ok
}

fn receiver(args: &[&str]) -> Receiver {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/otlp_receiver.py");
    let mut child = Command::new("python3").arg(script).args(args).stdout(Stdio::piped()).spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap());
    let mut port = String::new();
    lines.read_line(&mut port).unwrap();
    let port = port.trim().parse().unwrap();
    Receiver { child, lines, port }
}

fn config(port: u16, service: &str) -> TracingConfig {
    TracingConfig {
        endpoint: parse_endpoint(&format!("http://127.0.0.1:{port}")).unwrap(),
        sampling: 1.0,
        service_name: service.into(),
        headers: vec![("authorization".into(), "Bearer t0ken".into())],
        timeout: Duration::from_secs(5),
    }
}

fn span(cage: &str, name: &str, parent: Option<[u8; 8]>, status: SpanStatus) -> Span {
    let start = rustomnic_telemetry::now_unix_nanos();
    Span {
        cage: Arc::from(cage),
        trace_id: [0xab; 16],
        span_id: rustomnic_telemetry::new_span_id(),
        parent_id: parent,
        trace_state: Some("vendor=x".into()),
        name: name.into(),
        kind: SpanKind::Server,
        start_unix_nanos: start,
        end_unix_nanos: start + 1_500_000,
        attributes: vec![
            ("pmnc.cage", AttrValue::from(cage)),
            ("http.response.status_code", AttrValue::Int(200)),
            ("pmnc.retried", AttrValue::Bool(false)),
            ("pmnc.ratio", AttrValue::Float(0.25)),
            ("pmnc.negative", AttrValue::Int(-7)),
        ],
        status,
    }
}

fn next_export(r: &mut Receiver) -> Json {
    let mut line = String::new();
    r.lines.read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("receiver line {line:?}: {e}"))
}

#[test]
fn spans_arrive_as_the_official_definitions_read_them() {
    if !has_proto() {
        return;
    }
    let mut r = receiver(&[]);
    let exporter = Exporter::start(vec![("billing".into(), config(r.port, "billing-svc")), ("web".into(), config(r.port, "web"))]).unwrap();
    assert_eq!(exporter.sampling("billing"), Some(1.0));
    assert_eq!(exporter.sampling("other"), None);
    let root = span("web", "GET /pay", None, SpanStatus::Unset);
    let child = span("billing", "billing.charge", Some(root.span_id), SpanStatus::Error("card declined".into()));
    let (root_id, child_id) = (root.span_id, child.span_id);
    exporter.record(root);
    exporter.record(child);
    // A cage without [tracing] records nothing.
    exporter.record(span("other", "ignored", None, SpanStatus::Ok));
    assert!(exporter.flush(Duration::from_secs(10)), "the flush was not done");
    let export = next_export(&mut r);
    assert_eq!(export["path"], "/v1/traces");
    assert_eq!(export["content_type"], "application/x-protobuf");
    assert_eq!(export["authorization"], "Bearer t0ken");
    let spans = export["spans"].as_array().unwrap();
    assert_eq!(spans.len(), 2, "{export}");
    let by_name = |n: &str| spans.iter().find(|s| s["name"] == n).unwrap_or_else(|| panic!("no span {n} in {export}"));
    let web = by_name("GET /pay");
    let billing = by_name("billing.charge");
    assert_eq!(web["resource"]["service.name"]["stringValue"], "web");
    assert_eq!(billing["resource"]["service.name"]["stringValue"], "billing-svc");
    assert_eq!(web["trace_id"], "ab".repeat(16));
    assert_eq!(web["span_id"], hex(&root_id));
    assert_eq!(web["parent_span_id"], "");
    assert_eq!(billing["parent_span_id"], hex(&root_id));
    assert_eq!(billing["span_id"], hex(&child_id));
    assert_eq!(web["kind"], "SPAN_KIND_SERVER");
    assert_eq!(web["trace_state"], "vendor=x");
    assert_eq!(web["scope"], "rustomnic");
    let duration = web["end_time_unix_nano"].as_u64().unwrap() - web["start_time_unix_nano"].as_u64().unwrap();
    assert_eq!(duration, 1_500_000);
    assert!(web.get("status").is_none_or(|s| s.as_object().is_some_and(|o| o.is_empty())), "{web}");
    assert_eq!(billing["status"]["code"], "STATUS_CODE_ERROR");
    assert_eq!(billing["status"]["message"], "card declined");
    let attrs = &web["attributes"];
    assert_eq!(attrs["pmnc.cage"]["stringValue"], "web");
    assert_eq!(attrs["http.response.status_code"]["intValue"], "200");
    assert_eq!(attrs["pmnc.retried"]["boolValue"], false);
    assert_eq!(attrs["pmnc.ratio"]["doubleValue"], 0.25);
    assert_eq!(attrs["pmnc.negative"]["intValue"], "-7");
    assert_eq!(exporter.counts().exported.load(std::sync::atomic::Ordering::Relaxed), 2);
}

#[test]
fn a_failing_receiver_drops_spans_and_the_next_export_goes_through() {
    if !has_proto() {
        return;
    }
    let mut r = receiver(&["--fail", "1"]);
    let exporter = Exporter::start(vec![("web".into(), config(r.port, "web"))]).unwrap();
    exporter.record(span("web", "first", None, SpanStatus::Ok));
    assert!(exporter.flush(Duration::from_secs(10)));
    assert_eq!(exporter.counts().dropped_failed.load(std::sync::atomic::Ordering::Relaxed), 1);
    exporter.record(span("web", "second", None, SpanStatus::Ok));
    assert!(exporter.flush(Duration::from_secs(10)));
    let export = next_export(&mut r);
    assert_eq!(export["spans"][0]["name"], "second");
    assert_eq!(export["spans"][0]["status"]["code"], "STATUS_CODE_OK");
    assert_eq!(exporter.counts().exported.load(std::sync::atomic::Ordering::Relaxed), 1);
}

#[test]
fn nobody_listening_costs_the_spans_only() {
    // A port nothing listens on: bind one, note it, close it.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let exporter = Exporter::start(vec![("web".into(), config(port, "web"))]).unwrap();
    for i in 0..10 {
        exporter.record(span("web", &format!("s{i}"), None, SpanStatus::Ok));
    }
    assert!(exporter.flush(Duration::from_secs(10)));
    assert_eq!(exporter.counts().dropped_failed.load(std::sync::atomic::Ordering::Relaxed), 10);
    assert_eq!(exporter.counts().exported.load(std::sync::atomic::Ordering::Relaxed), 0);
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
