//! The process's log lines on stderr: text (tracing's usual look, the default) or JSON, one
//! object per line, for collectors (`log_format = "json"`, `--log-format json`). A line written
//! while a request runs on the thread carries that request's id and, when it arrived with a W3C
//! trace context, its trace id and span id, in either format (decision 145).

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{self, FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::time::FormatTime;
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::registry::LookupSpan;

/// `log_format` and `--log-format`.
pub const FORMATS: &[&str] = &["text", "json"];

/// How lines are written.
pub struct Lines {
    json: bool,
    text: format::Format<format::Full, tracing_subscriber::fmt::time::SystemTime>,
}

impl Lines {
    pub fn new(json: bool) -> Lines {
        Lines { json, text: format::Format::default().with_target(false) }
    }
}

/// The ids of the request running on this thread now: (request id, trace id and span id).
fn running() -> Option<(String, Option<(String, String)>)> {
    rustomnic_lua::request::with_running(|c| (c.id.clone(), c.trace.as_ref().map(|t| (t.trace_id_hex(), t.span_id_hex()))))
}

impl<S, N> FormatEvent<S, N> for Lines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> std::fmt::Result {
        if self.json {
            return writeln!(writer, "{}", json_line(event, running()));
        }
        let Some((id, trace)) = running() else {
            return self.text.format_event(ctx, writer, event);
        };
        // The usual line, then the request's ids before its end (colours are left out of the
        // lines of requests: tracing lends them only to its own writer).
        let mut line = String::new();
        self.text.format_event(ctx, Writer::new(&mut line), event)?;
        writer.write_str(line.trim_end_matches('\n'))?;
        if event.metadata().fields().field("request").is_none() {
            write!(writer, " request={id}")?;
        }
        if let Some((trace_id, span_id)) = trace {
            write!(writer, " trace_id={trace_id} span_id={span_id}")?;
        }
        writeln!(writer)
    }
}

/// One event as a JSON object: time (RFC 3339, UTC), level, cage, module, message, the other
/// fields under `fields`, request_id, and trace_id and span_id when the request has a trace.
fn json_line(event: &Event<'_>, running: Option<(String, Option<(String, String)>)>) -> String {
    let mut time = String::new();
    let _ = tracing_subscriber::fmt::time::SystemTime.format_time(&mut Writer::new(&mut time));
    let mut fields = Fields::default();
    event.record(&mut fields);
    let meta = event.metadata();
    let mut line = serde_json::Map::new();
    line.insert("time".into(), time.into());
    line.insert("level".into(), meta.level().as_str().into());
    let mut take = |key: &str| fields.map.remove(key).filter(|v| v.as_str() != Some(""));
    let (cage, module, request) = (take("cage"), take("module"), take("request"));
    if let Some(cage) = cage {
        line.insert("cage".into(), cage);
    }
    if let Some(module) = module {
        line.insert("module".into(), module);
    }
    if meta.target() != "lua" {
        // Where in pmnc the line comes from (module code's lines have their module above).
        line.insert("target".into(), meta.target().into());
    }
    line.insert("message".into(), fields.message.into());
    if !fields.map.is_empty() {
        line.insert("fields".into(), serde_json::Value::Object(fields.map));
    }
    let (running_id, trace) = match running {
        Some((id, trace)) => (Some(id), trace),
        None => (None, None),
    };
    if let Some(id) = request.or(running_id.map(serde_json::Value::from)) {
        line.insert("request_id".into(), id);
    }
    if let Some((trace_id, span_id)) = trace {
        line.insert("trace_id".into(), trace_id.into());
        line.insert("span_id".into(), span_id.into());
    }
    serde_json::Value::Object(line).to_string()
}

/// An event's fields: its message, and the others by name with their JSON types.
#[derive(Default)]
struct Fields {
    message: String,
    map: serde_json::Map<String, serde_json::Value>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message = value.to_string();
        } else {
            self.map.insert(field.name().into(), value.into());
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.map.insert(field.name().into(), value.into());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.map.insert(field.name().into(), value.into());
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.map.insert(field.name().into(), value.into());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.map.insert(field.name().into(), value.into());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.message = format!("{value:?}");
        } else {
            self.map.insert(field.name().into(), format!("{value:?}").into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Collects what the JSON format writes for the events of `f`.
    fn lines(f: impl FnOnce()) -> Vec<serde_json::Value> {
        #[derive(Clone, Default)]
        struct Buf(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let out = buf.clone();
        let subscriber = tracing_subscriber::fmt().event_format(Lines::new(true)).with_writer(move || out.clone()).finish();
        tracing::subscriber::with_default(subscriber, f);
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}"))).collect()
    }

    #[test]
    fn a_line_is_one_json_object_with_its_fields() {
        let got = lines(|| {
            tracing::warn!(target: "lua", cage = %"web", module = %"http", interface = %"http", request = %"abc123", "two\nlines \"quoted\"");
            tracing::info!(cage = %"web", port = 8080u64, ok = true, "listening");
        });
        assert_eq!(got.len(), 2);
        let a = &got[0];
        assert_eq!(a["level"], "WARN");
        assert_eq!(a["cage"], "web");
        assert_eq!(a["module"], "http");
        assert_eq!(a["message"], "two\nlines \"quoted\"");
        assert_eq!(a["request_id"], "abc123");
        assert_eq!(a["fields"]["interface"], "http");
        assert!(a.get("target").is_none() && a.get("trace_id").is_none());
        let time = a["time"].as_str().unwrap();
        assert!(time.len() >= 20 && time.ends_with('Z') && &time[4..5] == "-" && &time[10..11] == "T", "RFC 3339: {time}");
        let b = &got[1];
        assert_eq!(b["fields"]["port"], 8080);
        assert_eq!(b["fields"]["ok"], true);
        assert!(b["target"].as_str().unwrap().starts_with("pmnc"), "{b}");
        assert!(b.get("request_id").is_none());
    }
}
