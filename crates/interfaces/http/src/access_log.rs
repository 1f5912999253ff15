//! The access log: one line per answered request on standard output, in the combined format or
//! as JSON, gathered per worker thread and written in batches, so that logging every request
//! costs a formatted line and not a system call.
//!
//! Standard output carries only this log; diagnostics go to standard error. One thread writes
//! it, so a worker never waits on a slow reader (a full pipe, a stalled collector): batches it
//! cannot take are dropped and counted. Lines are written in pieces of at most 4 KiB that end at
//! a line's end: a pipe keeps such writes whole.

use std::cell::RefCell;
use std::io::Write;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hyper::{HeaderMap, Method, StatusCode, Version};

/// `access_log` of an http interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Off,
    Combined,
    Json,
}

impl Format {
    pub(crate) const NAMES: &'static str = "\"combined\", \"json\" or \"off\"";

    pub(crate) fn parse(name: &str) -> Option<Format> {
        match name {
            "combined" => Some(Format::Combined),
            "json" => Some(Format::Json),
            "off" => Some(Format::Off),
            _ => None,
        }
    }
}

/// Written when this much is gathered, or after [`LINGER`] at the latest.
const BATCH: usize = 16 << 10;
const LINGER: Duration = Duration::from_millis(50);
/// Longest piece written at once: what a pipe writes atomically.
const PIECE: usize = 4096;
/// Fields from the client (target, referer, user agent) are cut to this length in the log.
const MAX_FIELD: usize = 1024;

/// What the log needs of a request, taken when it begins: clones that share the request's
/// bytes (a `PathAndQuery` and `HeaderValue`s are reference-counted), so taking it copies no
/// text. Kept small: a parked request holds it for as long as it waits (about 100 bytes).
pub(crate) struct Entry {
    pub(crate) started: Instant,
    method: Method,
    target: Option<hyper::http::uri::PathAndQuery>,
    version: Version,
    /// Referer and user agent, boxed and only when the client sent either.
    client: Option<Box<(Option<hyper::header::HeaderValue>, Option<hyper::header::HeaderValue>)>>,
}

impl Entry {
    pub(crate) fn new(method: &Method, uri: &hyper::Uri, version: Version, headers: &HeaderMap) -> Entry {
        let referer = headers.get(hyper::header::REFERER).cloned();
        let user_agent = headers.get(hyper::header::USER_AGENT).cloned();
        Entry {
            started: Instant::now(),
            method: method.clone(),
            target: uri.path_and_query().cloned(),
            version,
            client: (referer.is_some() || user_agent.is_some()).then(|| Box::new((referer, user_agent))),
        }
    }

    pub(crate) fn method(&self) -> &Method {
        &self.method
    }

    pub(crate) fn target(&self) -> &str {
        self.target.as_ref().map(|p| p.as_str()).unwrap_or("/")
    }

    fn referer(&self) -> Option<std::borrow::Cow<'_, str>> {
        self.client.as_ref()?.0.as_ref().map(|v| String::from_utf8_lossy(v.as_bytes()))
    }

    fn user_agent(&self) -> Option<std::borrow::Cow<'_, str>> {
        self.client.as_ref()?.1.as_ref().map(|v| String::from_utf8_lossy(v.as_bytes()))
    }
}

/// What the interface adds to each line.
pub(crate) struct Line<'a> {
    pub(crate) format: Format,
    pub(crate) cage: &'a str,
    pub(crate) interface: &'a str,
    pub(crate) peer: &'a str,
    pub(crate) id: &'a str,
    pub(crate) status: StatusCode,
    /// Body bytes sent; None for a stream or WebSocket, whose length is not known here.
    pub(crate) bytes: Option<u64>,
}

/// Adds the line of one answered request to this thread's batch.
pub(crate) fn log(entry: &Entry, line: &Line<'_>) {
    if line.format == Format::Off {
        return;
    }
    let now = Instant::now();
    let elapsed = now.saturating_duration_since(entry.started);
    PENDING.with(|p| {
        let mut p = p.borrow_mut();
        match line.format {
            Format::Json => json(&mut p.buf, entry, line, elapsed),
            _ => combined(&mut p.buf, entry, line, now, elapsed),
        }
        if p.buf.len() >= BATCH {
            write_out(&mut p.buf);
        } else if !p.scheduled {
            p.scheduled = true;
            // On a worker (a LocalSet) the batch goes out after LINGER; elsewhere at once.
            if tokio::runtime::Handle::try_current().is_ok() && tokio::task::try_id().is_some() {
                tokio::task::spawn_local(async {
                    tokio::time::sleep(LINGER).await;
                    flush();
                });
            } else {
                p.scheduled = false;
                write_out(&mut p.buf);
            }
        }
    });
}

/// Writes this thread's batch now.
pub(crate) fn flush() {
    PENDING.with(|p| {
        let mut p = p.borrow_mut();
        p.scheduled = false;
        write_out(&mut p.buf);
    });
}

struct Pending {
    buf: Vec<u8>,
    scheduled: bool,
}

impl Drop for Pending {
    /// A worker that ends (the process stops) hands over its last lines and waits, a bounded
    /// time, until the writer has written everything handed over before them.
    fn drop(&mut self) {
        write_out(&mut self.buf);
        let Some(writer) = writer() else { return };
        let (done, wait) = std::sync::mpsc::sync_channel(1);
        let deadline = Instant::now() + EXIT_WAIT;
        let mut job = Job::Barrier(done);
        loop {
            match writer.try_send(job) {
                Ok(()) => break,
                Err(std::sync::mpsc::TrySendError::Full(j)) if Instant::now() < deadline => {
                    job = j;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(_) => return,
            }
        }
        let _ = wait.recv_timeout(deadline.saturating_duration_since(Instant::now()));
    }
}

/// Batches waiting for the writer thread, at most (about 4 MiB of lines).
const QUEUE: usize = 256;
/// How long a stopping worker waits for its lines to be written.
const EXIT_WAIT: Duration = Duration::from_secs(2);

enum Job {
    Batch(Vec<u8>),
    /// Answered once every batch sent before it is written.
    Barrier(std::sync::mpsc::SyncSender<()>),
}

/// The one thread that writes to standard output: a worker never waits on a slow reader of the
/// log (a full pipe, a stalled collector) — when the queue is full, batches are dropped and
/// counted instead.
fn writer() -> Option<&'static std::sync::mpsc::SyncSender<Job>> {
    static WRITER: std::sync::OnceLock<Option<std::sync::mpsc::SyncSender<Job>>> = std::sync::OnceLock::new();
    WRITER
        .get_or_init(|| {
            let (tx, rx) = std::sync::mpsc::sync_channel::<Job>(QUEUE);
            let started = std::thread::Builder::new().name("pmnc-access-log".into()).stack_size(256 << 10).spawn(move || {
                for job in rx {
                    match job {
                        Job::Batch(batch) => write_pieces(&batch),
                        Job::Barrier(done) => {
                            let _ = done.send(());
                        }
                    }
                }
            });
            started.ok().map(|_| tx)
        })
        .as_ref()
}

/// Lines dropped because the writer's queue was full, and when that was last said (seconds
/// since the Unix epoch).
static DROPPED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static DROP_SAID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

thread_local! {
    static PENDING: RefCell<Pending> = const { RefCell::new(Pending { buf: Vec::new(), scheduled: false }) };
}

/// Hands this thread's batch to the writer thread (or, without one, writes it here).
fn write_out(buf: &mut Vec<u8>) {
    use std::sync::atomic::Ordering;
    use std::sync::mpsc::TrySendError;
    if buf.is_empty() {
        return;
    }
    let Some(writer) = writer() else {
        write_pieces(buf);
        buf.clear();
        return;
    };
    let batch = std::mem::replace(buf, Vec::with_capacity(buf.len().min(BATCH)));
    match writer.try_send(Job::Batch(batch)) {
        Ok(()) => {}
        Err(TrySendError::Full(Job::Batch(batch))) => {
            let lines = batch.iter().filter(|&&b| b == b'\n').count() as u64;
            let total = DROPPED.fetch_add(lines, Ordering::Relaxed) + lines;
            // Said at most every 10 s, on standard error (where diagnostics go).
            let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
            let said = DROP_SAID.load(Ordering::Relaxed);
            if now >= said + 10 && DROP_SAID.compare_exchange(said, now, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
                tracing::warn!("access log: standard output is not keeping up; {total} line(s) dropped so far");
            }
        }
        Err(TrySendError::Full(Job::Barrier(_))) => {}
        Err(TrySendError::Disconnected(Job::Batch(batch))) => write_pieces(&batch),
        Err(TrySendError::Disconnected(Job::Barrier(_))) => {}
    }
}

/// Writes `buf` to standard output in pieces of at most [`PIECE`] bytes that end at a line's end.
fn write_pieces(buf: &[u8]) {
    let out = std::io::stdout();
    let mut out = out.lock();
    let mut rest = buf;
    while !rest.is_empty() {
        let mut end = rest.len().min(PIECE);
        if end < rest.len() {
            // Back to the end of the last whole line in the piece (a line longer than a piece
            // goes out whole).
            end = rest[..end]
                .iter()
                .rposition(|&b| b == b'\n')
                .map(|i| i + 1)
                .unwrap_or_else(|| rest.iter().position(|&b| b == b'\n').map(|i| i + 1).unwrap_or(rest.len()));
        }
        // An access log that cannot be written (stdout closed) must not stop requests.
        if out.write_all(&rest[..end]).is_err() {
            break;
        }
        rest = &rest[end..];
    }
    let _ = out.flush();
}

fn version_text(v: Version) -> &'static str {
    match v {
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2.0",
        _ => "HTTP",
    }
}

/// `addr - - [06/Dec/2026:04:09:41 +0000] "GET /x HTTP/1.1" 200 13 "referer" "agent" 0.412ms
/// cage/interface request-id`: Apache's combined format, then the duration, where the request
/// was served, and its id.
fn combined(out: &mut Vec<u8>, e: &Entry, l: &Line<'_>, now: Instant, elapsed: Duration) {
    // Straight into the batch, numbers included: no line is built apart from it, and nothing
    // goes through `core::fmt` (a third of the line's cost when it did).
    out.extend_from_slice(l.peer.rsplit_once(':').map(|(h, _)| h).unwrap_or(l.peer).as_bytes());
    out.extend_from_slice(b" - - [");
    clf_at(out, now);
    out.extend_from_slice(b"] \"");
    quoted(out, e.method.as_str());
    out.push(b' ');
    quoted(out, e.target());
    out.push(b' ');
    out.extend_from_slice(version_text(e.version).as_bytes());
    out.extend_from_slice(b"\" ");
    decimal(out, u64::from(l.status.as_u16()));
    out.push(b' ');
    match l.bytes {
        Some(n) => decimal(out, n),
        None => out.push(b'-'),
    }
    out.extend_from_slice(b" \"");
    quoted(out, e.referer().as_deref().unwrap_or("-"));
    out.extend_from_slice(b"\" \"");
    quoted(out, e.user_agent().as_deref().unwrap_or("-"));
    out.extend_from_slice(b"\" ");
    milliseconds(out, elapsed);
    out.extend_from_slice(b"ms ");
    out.extend_from_slice(l.cage.as_bytes());
    out.push(b'/');
    out.extend_from_slice(l.interface.as_bytes());
    out.push(b' ');
    out.extend_from_slice(l.id.as_bytes());
    out.push(b'\n');
}

/// Appends `elapsed` in milliseconds with three decimals (`1.500`).
fn milliseconds(out: &mut Vec<u8>, elapsed: Duration) {
    let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
    decimal(out, us / 1000);
    let ms = us % 1000;
    out.extend_from_slice(&[b'.', b'0' + (ms / 100) as u8, b'0' + (ms / 10 % 10) as u8, b'0' + (ms % 10) as u8]);
}

/// Appends `n` in decimal.
pub(crate) fn decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// Text from the client inside quotes: `"` and `\` escaped, control bytes as `\xHH`, cut long.
fn quoted(out: &mut Vec<u8>, text: &str) {
    use std::io::Write as _;
    // The usual case, printable ASCII without quotes, goes in as it is.
    if text.len() <= MAX_FIELD && text.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\') {
        out.extend_from_slice(text.as_bytes());
        return;
    }
    let mut buf = [0u8; 4];
    for (i, c) in text.chars().enumerate() {
        if i >= MAX_FIELD {
            out.extend_from_slice(b"...");
            break;
        }
        match c {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\x{:02X}", c as u32);
            }
            c => out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes()),
        }
    }
}

/// One JSON object per line, written field by field (no value tree is built).
fn json(out: &mut Vec<u8>, e: &Entry, l: &Line<'_>, elapsed: Duration) {
    out.extend_from_slice(b"{\"time\":\"");
    rfc3339_now(out);
    out.extend_from_slice(b"\",\"remote\":");
    json_text(out, l.peer);
    out.extend_from_slice(b",\"method\":");
    json_text(out, e.method.as_str());
    out.extend_from_slice(b",\"target\":");
    json_text(out, e.target());
    out.extend_from_slice(b",\"version\":\"");
    out.extend_from_slice(version_text(e.version).as_bytes());
    out.extend_from_slice(b"\",\"status\":");
    decimal(out, u64::from(l.status.as_u16()));
    out.extend_from_slice(b",\"bytes\":");
    match l.bytes {
        Some(n) => decimal(out, n),
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"duration_ms\":");
    milliseconds(out, elapsed);
    out.extend_from_slice(b",\"referer\":");
    match e.referer() {
        Some(r) => json_text(out, &r),
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"user_agent\":");
    match e.user_agent() {
        Some(a) => json_text(out, &a),
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"cage\":");
    json_text(out, l.cage);
    out.extend_from_slice(b",\"interface\":");
    json_text(out, l.interface);
    out.extend_from_slice(b",\"request_id\":");
    json_text(out, l.id);
    out.extend_from_slice(b"}\n");
}

/// A JSON string of `text`, cut to [`MAX_FIELD`] characters.
fn json_text(out: &mut Vec<u8>, text: &str) {
    let text = match text.len() > MAX_FIELD {
        true => text.char_indices().nth(MAX_FIELD).map(|(end, _)| &text[..end]).unwrap_or(text),
        false => text,
    };
    // Writing into a Vec cannot fail, and a &str always serializes.
    let _ = serde_json::to_writer(&mut *out, text);
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar.
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Appends the wall-clock time of `now` as `06/Dec/2026:04:09:41 +0000`, formatted once a second
/// per thread: within the second, `now` (the instant the line's duration was taken at) tells
/// that the text is still right, so a line reads the clock once.
fn clf_at(out: &mut Vec<u8>, now: Instant) {
    thread_local! {
        static CACHE: RefCell<Option<(Instant, String)>> = const { RefCell::new(None) };
    }
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        match &*c {
            Some((until, text)) if now < *until => out.extend_from_slice(text.as_bytes()),
            _ => {
                let wall = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
                let text = clf(wall.as_secs());
                out.extend_from_slice(text.as_bytes());
                let rest = Duration::from_secs(1).saturating_sub(Duration::from_nanos(u64::from(wall.subsec_nanos())));
                *c = Some((now + rest, text));
            }
        }
    })
}

fn clf(secs: u64) -> String {
    const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    let (y, m, d) = civil((secs / 86_400) as i64);
    let t = secs % 86_400;
    format!("{d:02}/{}/{y}:{:02}:{:02}:{:02} +0000", MONTHS[(m - 1) as usize % 12], t / 3600, t / 60 % 60, t % 60)
}

/// Appends the wall-clock time as `2026-12-06T04:09:41.412Z`: the part up to the second is
/// formatted once a second per thread.
fn rfc3339_now(out: &mut Vec<u8>) {
    thread_local! {
        static CACHE: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = now.as_secs();
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        if c.0 != secs {
            let (y, m, d) = civil((secs / 86_400) as i64);
            let t = secs % 86_400;
            *c = (secs, format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.", t / 3600, t / 60 % 60, t % 60));
        }
        out.extend_from_slice(c.1.as_bytes());
    });
    let ms = now.subsec_millis();
    out.extend_from_slice(&[b'0' + (ms / 100) as u8, b'0' + (ms / 10 % 10) as u8, b'0' + (ms % 10) as u8, b'Z']);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_in_both_formats() {
        // 2026-12-06 04:09:41 UTC
        let secs = 1_796_530_181;
        assert_eq!(clf(secs), "06/Dec/2026:04:09:41 +0000");
        assert_eq!(civil(0), (1970, 1, 1));
        assert_eq!(civil(11_016), (2000, 2, 29));
    }

    #[test]
    fn an_entry_is_small() {
        // A parked request holds its entry while it waits.
        assert!(std::mem::size_of::<Entry>() <= 96, "{}", std::mem::size_of::<Entry>());
    }

    #[test]
    fn decimals() {
        for n in [0, 7, 10, 200, 65_535, 1_234_567, u64::MAX] {
            let mut out = Vec::new();
            decimal(&mut out, n);
            assert_eq!(out, n.to_string().into_bytes());
        }
    }

    #[test]
    fn client_text_cannot_forge_a_line() {
        let mut h = HeaderMap::new();
        h.insert(hyper::header::USER_AGENT, hyper::header::HeaderValue::from_static("a\"b\\c"));
        let uri: hyper::Uri = "/x%22%0A".parse().unwrap();
        let e = Entry::new(&Method::GET, &uri, Version::HTTP_11, &h);
        let l = Line { format: Format::Combined, cage: "c", interface: "http", peer: "127.0.0.1:5", id: "r1", status: StatusCode::OK, bytes: Some(3) };
        let mut out = Vec::new();
        combined(&mut out, &e, &l, Instant::now(), Duration::from_micros(1500));
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.matches('\n').count(), 1, "{text}");
        assert!(text.starts_with("127.0.0.1 - - ["), "{text}");
        assert!(text.contains("\"GET /x%22%0A HTTP/1.1\" 200 3 \"-\" \"a\\\"b\\\\c\" 1.500ms c/http r1\n"), "{text}");
        let mut quoted_out = Vec::new();
        quoted(&mut quoted_out, "a\"\n\\");
        assert_eq!(quoted_out, b"a\\\"\\x0A\\\\");
        let mut out = Vec::new();
        json(&mut out, &e, &Line { format: Format::Json, ..l }, Duration::from_micros(1500));
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["target"], "/x%22%0A");
        assert_eq!(v["status"], 200);
        assert_eq!(v["duration_ms"], 1.5);
        assert_eq!(v["user_agent"], "a\"b\\c");
        assert_eq!(v["referer"], serde_json::Value::Null);
        assert_eq!(v["bytes"], 3);
        assert_eq!(v["request_id"], "r1");
        assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 1);
        let long: hyper::Uri = format!("/{}", "a".repeat(3000)).parse().unwrap();
        let e = Entry::new(&Method::GET, &long, Version::HTTP_11, &h);
        let mut out = Vec::new();
        json(&mut out, &e, &Line { format: Format::Json, ..l }, Duration::from_micros(2));
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["duration_ms"], 0.002);
        let time = v["time"].as_str().unwrap();
        assert!(time.len() == 24 && time.ends_with('Z') && time.as_bytes()[10] == b'T', "{time}");
        assert_eq!(v["target"].as_str().unwrap().len(), MAX_FIELD, "{v}");
    }
}
