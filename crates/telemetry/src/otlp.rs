//! OTLP's `ExportTraceServiceRequest` in protobuf, written by hand: the handful of messages and
//! fields a span needs (opentelemetry/proto/trace/v1/trace.proto and common/v1/common.proto),
//! so that exporting costs no code generator and no protobuf runtime. The tests decode what is
//! written here with the official definitions (tests/otlp_receiver.rs).

use crate::{AttrValue, Span, SpanStatus};

const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;

/// Name and version of the instrumentation scope every span is reported under.
const SCOPE_NAME: &str = "rustomnic";

/// The body of one export: `spans` grouped by service (one ResourceSpans per service name).
pub fn export_request<'a>(groups: impl IntoIterator<Item = (&'a str, &'a [Span])>) -> Vec<u8> {
    let mut out = Vec::new();
    for (service, spans) in groups {
        let mut resource_spans = Vec::new();
        let mut resource = Vec::new();
        key_value(&mut resource, 1, "service.name", &AttrValue::Str(service.to_string()));
        key_value(&mut resource, 1, "telemetry.sdk.name", &AttrValue::Str(SCOPE_NAME.into()));
        key_value(&mut resource, 1, "telemetry.sdk.language", &AttrValue::Str("rust".into()));
        message(&mut resource_spans, 1, &resource);
        let mut scope_spans = Vec::new();
        let mut scope = Vec::new();
        string(&mut scope, 1, SCOPE_NAME);
        string(&mut scope, 2, env!("CARGO_PKG_VERSION"));
        message(&mut scope_spans, 1, &scope);
        for span in spans {
            message(&mut scope_spans, 2, &encode_span(span));
        }
        message(&mut resource_spans, 2, &scope_spans);
        message(&mut out, 1, &resource_spans);
    }
    out
}

fn encode_span(span: &Span) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    bytes(&mut out, 1, &span.trace_id);
    bytes(&mut out, 2, &span.span_id);
    if let Some(state) = &span.trace_state {
        string(&mut out, 3, state);
    }
    if let Some(parent) = &span.parent_id {
        bytes(&mut out, 4, parent);
    }
    string(&mut out, 5, &span.name);
    tag(&mut out, 6, VARINT);
    varint(&mut out, span.kind as u64);
    tag(&mut out, 7, FIXED64);
    out.extend_from_slice(&span.start_unix_nanos.to_le_bytes());
    tag(&mut out, 8, FIXED64);
    out.extend_from_slice(&span.end_unix_nanos.max(span.start_unix_nanos).to_le_bytes());
    for (key, value) in &span.attributes {
        key_value(&mut out, 9, key, value);
    }
    let mut status = Vec::new();
    match &span.status {
        SpanStatus::Unset => {}
        SpanStatus::Ok => {
            tag(&mut status, 3, VARINT);
            varint(&mut status, 1);
        }
        SpanStatus::Error(message) => {
            string(&mut status, 2, message);
            tag(&mut status, 3, VARINT);
            varint(&mut status, 2);
        }
    }
    if !status.is_empty() {
        message(&mut out, 15, &status);
    }
    out
}

fn key_value(out: &mut Vec<u8>, field: u32, key: &str, value: &AttrValue) {
    let mut kv = Vec::with_capacity(key.len() + 16);
    string(&mut kv, 1, key);
    let mut any = Vec::new();
    match value {
        AttrValue::Str(s) => string(&mut any, 1, s),
        AttrValue::Bool(b) => {
            tag(&mut any, 2, VARINT);
            varint(&mut any, u64::from(*b));
        }
        AttrValue::Int(n) => {
            tag(&mut any, 3, VARINT);
            // int64 is written as its two's complement bits.
            varint(&mut any, *n as u64);
        }
        AttrValue::Float(x) => {
            tag(&mut any, 4, FIXED64);
            any.extend_from_slice(&x.to_le_bytes());
        }
    }
    message(&mut kv, 2, &any);
    message(out, field, &kv);
}

fn tag(out: &mut Vec<u8>, field: u32, wire: u8) {
    varint(out, (u64::from(field) << 3) | u64::from(wire));
}

fn varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn bytes(out: &mut Vec<u8>, field: u32, b: &[u8]) {
    tag(out, field, LEN);
    varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

fn string(out: &mut Vec<u8>, field: u32, s: &str) {
    bytes(out, field, s.as_bytes());
}

fn message(out: &mut Vec<u8>, field: u32, body: &[u8]) {
    bytes(out, field, body);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_as_protobuf_writes_them() {
        let mut out = Vec::new();
        varint(&mut out, 1);
        varint(&mut out, 300);
        varint(&mut out, u64::MAX);
        assert_eq!(out[..3], [0x01, 0xAC, 0x02]);
        assert_eq!(out.len(), 3 + 10);
        assert_eq!(out[12], 0x01);
    }

    #[test]
    fn a_field_tag_carries_its_wire_type() {
        let mut out = Vec::new();
        tag(&mut out, 15, LEN);
        tag(&mut out, 16, FIXED64);
        assert_eq!(out, [0x7A, 0x81, 0x01]);
    }
}
