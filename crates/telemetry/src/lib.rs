//! Traces (OpenTelemetry): the span a request, resource call or call between cages leaves
//! behind, the per-cage sampling decision, and the process-wide sink that batches spans and
//! exports them over OTLP/HTTP (protobuf). Off unless a cage has a `[tracing]` table, and then
//! one atomic load and one bounded channel send per span on the request's thread.

pub mod config;
pub mod exporter;
pub mod otlp;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

pub use config::TracingConfig;
pub use exporter::Exporter;

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("tracing: endpoint {endpoint}: {message}")]
    Endpoint { endpoint: String, message: String },
    #[error("tracing: exporter thread: {0}")]
    Thread(String),
}

/// What a span stands for, as OTLP's `SpanKind` numbers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpanKind {
    Internal = 1,
    Server = 2,
    Client = 3,
    Producer = 4,
    Consumer = 5,
}

/// An attribute's value (the OTLP `AnyValue` kinds we write).
#[derive(Debug, Clone, PartialEq)]
pub enum AttrValue {
    Str(String),
    Int(i64),
    Bool(bool),
    Float(f64),
}

impl From<&str> for AttrValue {
    fn from(s: &str) -> AttrValue {
        AttrValue::Str(s.to_string())
    }
}

impl From<String> for AttrValue {
    fn from(s: String) -> AttrValue {
        AttrValue::Str(s)
    }
}

impl From<i64> for AttrValue {
    fn from(n: i64) -> AttrValue {
        AttrValue::Int(n)
    }
}

impl From<bool> for AttrValue {
    fn from(b: bool) -> AttrValue {
        AttrValue::Bool(b)
    }
}

/// How a span ended: OTLP's status (unset for success, as the specification asks of servers
/// that have nothing to add, or an error with its message).
#[derive(Debug, Clone, PartialEq)]
pub enum SpanStatus {
    Unset,
    Ok,
    Error(String),
}

/// One finished span.
#[derive(Debug, Clone, PartialEq)]
pub struct Span {
    /// The cage that recorded it: its `[tracing]` table says where the span goes and under
    /// which service name.
    pub cage: Arc<str>,
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    /// The caller's span, absent for a trace's first span.
    pub parent_id: Option<[u8; 8]>,
    /// The W3C `tracestate` that came with the trace, passed on unchanged.
    pub trace_state: Option<String>,
    pub name: String,
    pub kind: SpanKind,
    pub start_unix_nanos: u64,
    pub end_unix_nanos: u64,
    pub attributes: Vec<(&'static str, AttrValue)>,
    pub status: SpanStatus,
}

/// Nanoseconds since the Unix epoch now (0 if the clock is before it).
pub fn now_unix_nanos() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)).unwrap_or(0)
}

/// A new random trace id (never all zero, as W3C trace context requires).
pub fn new_trace_id() -> [u8; 16] {
    let hi = random_u64();
    let lo = random_u64();
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&hi.to_be_bytes());
    id[8..].copy_from_slice(&lo.to_be_bytes());
    if id == [0; 16] {
        id[15] = 1;
    }
    id
}

/// A new random span id (never all zero).
pub fn new_span_id() -> [u8; 8] {
    let n = random_u64();
    if n == 0 {
        1u64.to_be_bytes()
    } else {
        n.to_be_bytes()
    }
}

/// A fast, well-mixed 64-bit number: splitmix64 over a process-wide counter seeded from the
/// clock and the process id. Ids need to be unique and spread, not secret.
fn random_u64() -> u64 {
    static STATE: OnceLock<AtomicU64> = OnceLock::new();
    let state = STATE.get_or_init(|| AtomicU64::new(now_unix_nanos() ^ (u64::from(std::process::id()) << 32)));
    let mut z = state.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed).wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Whether a new trace starting in a cage with this sampling `ratio` is recorded: the decision
/// is a function of the trace id (its last 8 bytes against the ratio), so every process that
/// sees the trace id without a sampled flag would decide the same.
pub fn sample_new_trace(trace_id: &[u8; 16], ratio: f64) -> bool {
    if ratio >= 1.0 {
        return true;
    }
    if ratio <= 0.0 {
        return false;
    }
    let mut low = [0u8; 8];
    low.copy_from_slice(&trace_id[8..]);
    // The top 53 bits as a fraction in [0, 1).
    let x = (u64::from_be_bytes(low) >> 11) as f64 / (1u64 << 53) as f64;
    x < ratio
}

static SINK: OnceLock<Exporter> = OnceLock::new();

/// Installs the process's exporter (once; a second call is refused with the error).
pub fn install(exporter: Exporter) -> Result<(), Error> {
    SINK.set(exporter).map_err(|_| Error::Thread("an exporter is already installed".into()))
}

/// The process's exporter, when some cage traces.
pub fn exporter() -> Option<&'static Exporter> {
    SINK.get()
}

/// Records a finished span when tracing is on for its cage; otherwise drops it.
pub fn record(span: Span) {
    if let Some(e) = SINK.get() {
        e.record(span);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_never_zero_and_differ() {
        let a = new_trace_id();
        let b = new_trace_id();
        assert_ne!(a, [0; 16]);
        assert_ne!(a, b);
        assert_ne!(new_span_id(), new_span_id());
    }

    #[test]
    fn sampling_follows_the_ratio() {
        assert!(sample_new_trace(&new_trace_id(), 1.0));
        assert!(!sample_new_trace(&new_trace_id(), 0.0));
        let kept = (0..20_000).filter(|_| sample_new_trace(&new_trace_id(), 0.25)).count();
        assert!((4_000..6_000).contains(&kept), "0.25 of 20000 kept {kept}");
        // The same trace id is decided the same way every time.
        let id = new_trace_id();
        let first = sample_new_trace(&id, 0.5);
        assert!((0..10).all(|_| sample_new_trace(&id, 0.5) == first));
    }
}
