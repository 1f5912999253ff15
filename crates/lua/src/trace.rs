//! W3C trace context: the `traceparent` header of an incoming request, read and checked, the
//! ids a request's log lines carry (docs/decisions/145-log-format-and-request-ids.md), and the
//! spans a traced request leaves (rustomnic-telemetry exports them; decision 148).

pub use rustomnic_telemetry::{AttrValue, Span, SpanKind, SpanStatus};

use crate::request::RequestCtx;

/// A request's place in a distributed trace: the trace it belongs to, the span of the caller
/// that sent it (`parent_id`, zero for a trace's first request), and the span this request runs
/// as (`span_id`, new here).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    pub parent_id: [u8; 8],
    pub span_id: [u8; 8],
    pub flags: u8,
    /// When this request's span began (nanoseconds since the Unix epoch).
    pub start_unix_nanos: u64,
}

impl TraceContext {
    /// The context of a request that arrived with `traceparent`: its trace and parent, and a new
    /// span id for this request. `None` when the header is not a valid trace context (the
    /// request then runs without one, as the W3C recommendation says).
    pub fn from_traceparent(header: &[u8]) -> Option<TraceContext> {
        let (trace_id, parent_id, flags) = parse_traceparent(header)?;
        Some(TraceContext { trace_id, parent_id, span_id: new_span_id(), flags, start_unix_nanos: rustomnic_telemetry::now_unix_nanos() })
    }

    /// The context of a call this request makes to another cage: the same trace and sampling,
    /// this request's span as the parent, a new span.
    pub fn child(&self) -> TraceContext {
        TraceContext { parent_id: self.span_id, span_id: new_span_id(), start_unix_nanos: rustomnic_telemetry::now_unix_nanos(), ..*self }
    }

    /// Whether the trace's spans are recorded (the W3C sampled flag).
    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }

    pub fn trace_id_hex(&self) -> String {
        hex(&self.trace_id)
    }

    pub fn span_id_hex(&self) -> String {
        hex(&self.span_id)
    }

    /// The `traceparent` of a call this request makes: the same trace, this request's span as
    /// the parent.
    pub fn traceparent(&self) -> String {
        format!("00-{}-{}-{:02x}", hex(&self.trace_id), hex(&self.span_id), self.flags)
    }
}

/// The trace context a new request of `cage` runs with: the one it arrived with, else, when
/// the cage traces (`[tracing]`), a new trace kept or not by the cage's sampling ratio; else
/// none (tracing off costs one atomic load here).
pub fn for_request(cage: &str, incoming: Option<Box<TraceContext>>) -> Option<Box<TraceContext>> {
    if incoming.is_some() {
        return incoming;
    }
    let ratio = rustomnic_telemetry::exporter()?.sampling(cage)?;
    let trace_id = rustomnic_telemetry::new_trace_id();
    let flags = u8::from(rustomnic_telemetry::sample_new_trace(&trace_id, ratio));
    Some(Box::new(TraceContext { trace_id, parent_id: [0; 8], span_id: new_span_id(), flags, start_unix_nanos: rustomnic_telemetry::now_unix_nanos() }))
}

/// Whether `cage` exports spans (has a `[tracing]` table).
pub fn traces(cage: &str) -> bool {
    rustomnic_telemetry::exporter().is_some_and(|e| e.sampling(cage).is_some())
}

/// The trace context of `ctx` when the request's span is to be recorded: its trace is sampled
/// and its cage traces. Taken when the request starts, so that what it needs at its end is kept
/// only for spans that are recorded.
pub fn recorded(ctx: &RequestCtx) -> Option<TraceContext> {
    ctx.trace.as_deref().copied().filter(|t| t.sampled() && traces(&ctx.cage))
}

/// Records the span of a request of `ctx` that ends now, when its trace is sampled and its cage
/// traces.
pub fn record(ctx: &RequestCtx, name: String, kind: SpanKind, attributes: Vec<(&'static str, AttrValue)>, status: SpanStatus) {
    if let Some(t) = ctx.trace.as_deref() {
        record_span(t, &ctx.cage, &ctx.interface, &ctx.id, name, kind, attributes, status);
    }
}

/// Records the span `t` of a request of `cage` that ends now, when `t` is sampled and the cage
/// traces: its name, kind and attributes, with the cage, interface and request id added.
#[allow(clippy::too_many_arguments)]
pub fn record_span(
    t: &TraceContext,
    cage: &str,
    interface: &str,
    request_id: &str,
    name: String,
    kind: SpanKind,
    mut attributes: Vec<(&'static str, AttrValue)>,
    status: SpanStatus,
) {
    if !t.sampled() {
        return;
    }
    // The exporter keeps only spans of cages that trace.
    let Some(exporter) = rustomnic_telemetry::exporter() else { return };
    attributes.push(("pmnc.cage", AttrValue::from(cage)));
    attributes.push(("pmnc.interface", AttrValue::from(interface)));
    attributes.push(("pmnc.request_id", AttrValue::from(request_id)));
    exporter.record(Span {
        cage: std::sync::Arc::from(cage),
        trace_id: t.trace_id,
        span_id: t.span_id,
        parent_id: (t.parent_id != [0; 8]).then_some(t.parent_id),
        trace_state: None,
        name,
        kind,
        start_unix_nanos: t.start_unix_nanos,
        end_unix_nanos: rustomnic_telemetry::now_unix_nanos(),
        attributes,
        status,
    });
}

thread_local! {
    /// The span of the resource call being polled on this thread (set by [`WithCall`]), whose
    /// `traceparent` an outgoing HTTP call sends.
    static CALL: std::cell::Cell<Option<TraceContext>> = const { std::cell::Cell::new(None) };
}

/// The `traceparent` of the resource call running now on this thread, when it is traced.
pub fn call_traceparent() -> Option<String> {
    CALL.with(|c| c.get()).map(|t| t.traceparent())
}

/// Runs `f` as the resource call of span `trace`: while it is polled, [`call_traceparent`]
/// answers with it.
pub fn with_call<F: std::future::Future>(trace: Option<TraceContext>, f: F) -> WithCall<F> {
    WithCall { trace, inner: Box::pin(f) }
}

/// The future of [`with_call`].
pub struct WithCall<F> {
    trace: Option<TraceContext>,
    inner: std::pin::Pin<Box<F>>,
}

impl<F: std::future::Future> std::future::Future for WithCall<F> {
    type Output = F::Output;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<F::Output> {
        let previous = CALL.with(|c| c.replace(self.trace));
        let out = self.inner.as_mut().poll(cx);
        CALL.with(|c| c.set(previous));
        out
    }
}

/// What a statement or command is, for a span: its first word in upper case (`SELECT`, `GET`),
/// never the rest, which may hold values.
pub fn operation_of(statement: &str) -> Option<String> {
    let word: String = statement.trim_start().chars().take_while(|c| c.is_ascii_alphabetic() || *c == '_').take(32).collect();
    (!word.is_empty()).then(|| word.to_ascii_uppercase())
}

/// Reads a `traceparent` value (`version-traceid-parentid-flags`, lower-case hex): version 00 is
/// exactly 55 bytes; a later version may carry more after a `-`, which is ignored; version ff,
/// an all-zero trace id or parent id, and anything else malformed are refused.
pub fn parse_traceparent(header: &[u8]) -> Option<([u8; 16], [u8; 8], u8)> {
    let h = header.trim_ascii();
    if h.len() < 55 {
        return None;
    }
    let version = byte(&h[0..2])?;
    if version == 0xff || (version == 0 && h.len() != 55) || (h.len() > 55 && h[55] != b'-') {
        return None;
    }
    if h[2] != b'-' || h[35] != b'-' || h[52] != b'-' {
        return None;
    }
    let mut trace_id = [0u8; 16];
    for (i, b) in trace_id.iter_mut().enumerate() {
        *b = byte(&h[3 + 2 * i..5 + 2 * i])?;
    }
    let mut parent_id = [0u8; 8];
    for (i, b) in parent_id.iter_mut().enumerate() {
        *b = byte(&h[36 + 2 * i..38 + 2 * i])?;
    }
    let flags = byte(&h[53..55])?;
    if trace_id == [0; 16] || parent_id == [0; 8] {
        return None;
    }
    Some((trace_id, parent_id, flags))
}

/// Two lower-case hex digits.
fn byte(two: &[u8]) -> Option<u8> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    Some(digit(*two.first()?)? << 4 | digit(*two.get(1)?)?)
}

fn hex(bytes: &[u8]) -> String {
    rustomnic_stdlib::hex::encode(bytes)
}

fn new_span_id() -> [u8; 8] {
    rustomnic_telemetry::new_span_id()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_traceparent_is_read_and_written_back_with_a_new_span() {
        let t = TraceContext::from_traceparent(GOOD.as_bytes()).unwrap();
        assert_eq!(t.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(hex(&t.parent_id), "00f067aa0ba902b7");
        assert_eq!(t.flags, 1);
        assert_ne!(t.span_id, t.parent_id);
        assert_ne!(t.span_id, [0; 8]);
        assert_eq!(t.traceparent(), format!("00-4bf92f3577b34da6a3ce929d0e0e4736-{}-01", t.span_id_hex()));
        let other = TraceContext::from_traceparent(format!(" {GOOD} ").as_bytes()).unwrap();
        assert_ne!(other.span_id, t.span_id, "every request has its own span");
    }

    #[test]
    fn invalid_traceparents_are_refused() {
        let bad = [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "0g-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473x-00f067aa0ba902b7-01",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
        ];
        for b in bad {
            assert_eq!(parse_traceparent(b.as_bytes()), None, "{b:?}");
        }
        // A later version may carry more fields after a dash.
        assert!(parse_traceparent(b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future").is_some());
    }
}
