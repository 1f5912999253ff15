//! What HTTP/1 clients send, through a connection's head parser and body framing (our own
//! HTTP/1 side; hyper serves HTTP/2). The input's first bytes choose where the rest is cut into
//! reads. Properties:
//! - split invariance: however the bytes arrive (whole, cut at the chosen places, one byte per
//!   read), the connection reads the same requests, refuses at the same point and leaves the
//!   same bytes unread;
//! - no smuggling: each request read, written back with plain framing (its body's length,
//!   CRLF lines), reads back as itself, and all of them in a row as the same sequence, so one
//!   request's bytes never become part of the next;
//! - bodies stay under the limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rustomnic_fuzz::Choices;
use rustomnic_http::fuzzing::{fuzz_connection, Step};

/// A request with plain framing: its fields without Content-Length and Transfer-Encoding, then
/// the body's length when it has one.
fn plain(step: &Step) -> Option<(Vec<u8>, Step)> {
    let Step::Request {
        method,
        target,
        version,
        headers,
        body,
    } = step
    else {
        return None;
    };
    let kept: Vec<(String, Vec<u8>)> = headers
        .iter()
        .filter(|(n, _)| n != "content-length" && n != "transfer-encoding")
        .cloned()
        .collect();
    let mut wire = format!("{method} {target} HTTP/1.{version}\r\n").into_bytes();
    for (n, v) in &kept {
        wire.extend_from_slice(n.as_bytes());
        wire.extend_from_slice(b": ");
        wire.extend_from_slice(v);
        wire.extend_from_slice(b"\r\n");
    }
    let mut expected = kept;
    if !body.is_empty() {
        wire.extend_from_slice(format!("content-length: {}\r\n", body.len()).as_bytes());
        expected.push(("content-length".into(), body.len().to_string().into_bytes()));
    }
    wire.extend_from_slice(b"\r\n");
    wire.extend_from_slice(body);
    // Fields come back grouped by name, in the order each name first appeared.
    let mut grouped: Vec<(String, Vec<u8>)> = Vec::new();
    for (n, v) in expected {
        match grouped.iter().rposition(|(g, _)| *g == n) {
            Some(i) => grouped.insert(i + 1, (n, v)),
            None => grouped.push((n, v)),
        }
    }
    Some((
        wire,
        Step::Request {
            method: method.clone(),
            target: target.clone(),
            version: *version,
            headers: grouped,
            body: body.clone(),
        },
    ))
}

fuzz_target!(|data: &[u8]| {
    let mut c = Choices::new(data);
    let n = (c.byte() % 8) as usize;
    let spec = c.take(n);
    let input = c.rest();
    let whole = fuzz_connection(input, &[]);
    let cuts = Choices::cuts(spec, input.len());
    assert_eq!(fuzz_connection(input, &cuts), whole, "cut at {cuts:?}");
    if input.len() <= 1024 {
        let every: Vec<usize> = (1..input.len()).collect();
        assert_eq!(fuzz_connection(input, &every), whole, "one byte per read");
    }
    assert!(whole.consumed <= input.len());
    let mut wire = Vec::new();
    let mut expected = Vec::new();
    for step in &whole.steps {
        if let Step::Request { body, .. } = step {
            assert!(body.len() <= 64 << 10, "a body over the limit");
        }
        if let Some((bytes, request)) = plain(step) {
            wire.extend_from_slice(&bytes);
            expected.push(request);
        }
    }
    let again = fuzz_connection(&wire, &[]);
    assert_eq!(
        again.steps, expected,
        "requests written back with plain framing read differently"
    );
    assert!(
        !again.waiting && again.consumed == wire.len(),
        "bytes of the requests left over: {again:?}"
    );
});
