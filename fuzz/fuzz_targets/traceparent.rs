//! The `traceparent` header of an incoming HTTP request (W3C trace context), as the http
//! interface reads it into a request's context. Properties: agreement with a second, plain
//! reading of the format written here (split at the dashes); what is accepted writes back
//! (lower-case hex) as exactly the first 55 bytes of the trimmed header, and a context made
//! from it sends the same trace with a new, non-zero span.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rustomnic_lua::trace::{parse_traceparent, TraceContext};

/// The format read plainly: version-trace-parent-flags, lower-case hex of 2, 32, 16 and 2
/// digits; version ff refused; version 00 has nothing more, later versions only `-...` more;
/// trace and parent not all zeros.
fn plain(header: &[u8]) -> Option<(String, String, String)> {
    // Bytes that are not UTF-8 can only stand after the fields of a later version.
    let text = String::from_utf8_lossy(header);
    let text = text.trim_matches(|c: char| c.is_ascii_whitespace());
    let lower_hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    let parts: Vec<&str> = text.splitn(5, '-').collect();
    if parts.len() < 4 || !lower_hex(parts[0], 2) || parts[0] == "ff" {
        return None;
    }
    if parts[0] == "00" && parts.len() != 4 {
        return None;
    }
    let (trace, parent, flags) = (parts[1], parts[2], parts[3]);
    if !lower_hex(trace, 32) || !lower_hex(parent, 16) || !lower_hex(flags, 2) {
        return None;
    }
    if trace.bytes().all(|b| b == b'0') || parent.bytes().all(|b| b == b'0') {
        return None;
    }
    Some((trace.to_string(), parent.to_string(), flags.to_string()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fuzz_target!(|data: &[u8]| {
    let ours = parse_traceparent(data);
    let theirs = plain(data);
    match (&ours, &theirs) {
        (None, None) => {}
        (Some((trace, parent, flags)), Some((t, p, f))) => {
            assert_eq!((hex(trace), hex(parent), format!("{flags:02x}")), (t.clone(), p.clone(), f.clone()), "{data:?}");
            let trimmed = data.trim_ascii();
            let written = format!("{}-{t}-{p}-{f}", std::str::from_utf8(&trimmed[..2]).unwrap_or("??"));
            assert_eq!(written.as_bytes(), &trimmed[..55], "{data:?}");
            let ctx = TraceContext::from_traceparent(data).unwrap_or_else(|| panic!("parsed but no context: {data:?}"));
            assert_eq!(ctx.trace_id_hex(), *t);
            assert!(ctx.span_id != [0; 8]);
            let sent = ctx.traceparent();
            assert_eq!(parse_traceparent(sent.as_bytes()).map(|(tr, pa, _)| (tr, pa)), Some((*trace, ctx.span_id)), "{sent}");
        }
        _ => panic!("the readings disagree on {data:?}: ours {ours:?}, plain {theirs:?}"),
    }
});
