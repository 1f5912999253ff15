//! `multipart/form-data` bodies from clients, through the incremental parser the http interface
//! uses. The input's first bytes choose the boundary and where the body is cut into reads.
//! Properties: however the bytes arrive, the parser gives the same parts with the same bytes
//! (or the same refusal), its buffer stays bounded by what one event needs, and a body built
//! from parts parses back to those parts.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rustomnic_fuzz::Choices;
use rustomnic_http::fuzzing::{fuzz_multipart, MultipartEvent};

/// The events with each part's data joined: the cut-independent view.
fn joined(events: Vec<MultipartEvent>) -> Vec<(String, Option<String>, Vec<u8>, bool)> {
    let mut out: Vec<(String, Option<String>, Vec<u8>, bool)> = Vec::new();
    for e in events {
        match e {
            MultipartEvent::Part { name, filename, .. } => out.push((name, filename, Vec::new(), false)),
            MultipartEvent::Data(d) => {
                if let Some(last) = out.last_mut() {
                    last.2.extend(d);
                } else {
                    panic!("data before any part");
                }
            }
            MultipartEvent::End => out.push((String::new(), None, Vec::new(), true)),
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let mut c = Choices::new(data);
    let boundary_len = 1 + (c.byte() % 16) as usize;
    let boundary: Vec<u8> = c.take(boundary_len).iter().map(|b| b'A' + b % 26).collect();
    if boundary.is_empty() {
        return;
    }
    let cut_spec = c.piece();
    let body = c.rest();
    let whole = fuzz_multipart(&boundary, body, &[]).map(joined);
    let cuts = Choices::cuts(cut_spec, body.len());
    let pieces = fuzz_multipart(&boundary, body, &cuts).map(joined);
    match (&whole, &pieces) {
        (Ok(a), Ok(b)) => assert_eq!(a, b, "cuts {cuts:?} changed the parts"),
        // Refusals may come at different points, but both must refuse.
        (Err(_), Err(_)) => {}
        _ => panic!("whole: {whole:?}\ncut at {cuts:?}: {pieces:?}"),
    }

    // Round trip: the body's pieces as field values (without the boundary in them) parse back.
    let values: Vec<&[u8]> = body.split(|b| *b == 0).take(8).collect();
    let mut built = Vec::new();
    let mut want = Vec::new();
    for (i, v) in values.iter().enumerate() {
        if memchr_find(v, &boundary) {
            return;
        }
        built.extend_from_slice(b"--");
        built.extend_from_slice(&boundary);
        built.extend_from_slice(format!("\r\ncontent-disposition: form-data; name=\"f{i}\"\r\n\r\n").as_bytes());
        built.extend_from_slice(v);
        built.extend_from_slice(b"\r\n");
        want.push((format!("f{i}"), None, v.to_vec(), false));
    }
    built.extend_from_slice(b"--");
    built.extend_from_slice(&boundary);
    built.extend_from_slice(b"--\r\n");
    want.push((String::new(), None, Vec::new(), true));
    let got = fuzz_multipart(&boundary, &built, &cuts).map(joined);
    assert_eq!(got.as_ref().ok(), Some(&want), "round trip of {values:?}");
});

fn memchr_find(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}
