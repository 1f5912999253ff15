//! STOMP 1.2 frames as a broker sends them, through the incremental decoder of the stomp
//! resource and interface. The input's first bytes choose the limits and where the rest is cut
//! into reads. Properties: however the bytes arrive, the decoder gives the same frames and
//! heart-beats and fails at the same place; no frame breaks a limit (a body over it comes out
//! empty, marked oversized, and the stream stays in step); a frame it decoded, encoded again,
//! decodes to the same frame.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rustomnic_fuzz::Choices;
use rustomnic_resource_stomp::frame::{Decoded, Decoder, Limits};

/// Everything `input` decodes to when fed in reads ending at `cuts`, and whether it ended in an
/// error (decoding stops there).
fn run(input: &[u8], cuts: &[usize], limits: Limits) -> (Vec<Decoded>, bool) {
    let mut d = Decoder::new(limits);
    let mut out = Vec::new();
    let mut from = 0;
    for &to in cuts.iter().chain(std::iter::once(&input.len())) {
        if to < from {
            continue;
        }
        d.extend(&input[from..to]);
        from = to;
        loop {
            match d.decode() {
                Ok(Some(item)) => out.push(item),
                Ok(None) => break,
                Err(_) => return (out, true),
            }
        }
    }
    (out, false)
}

/// Without the `content-length` header, which encoding writes itself.
fn normal(mut f: rustomnic_resource_stomp::frame::Frame) -> rustomnic_resource_stomp::frame::Frame {
    f.headers.retain(|(k, _)| k != "content-length");
    // Unescaped frames cannot carry a line end in a header: the encoder writes it as a space
    // (a bare '\r' can arrive in one, since only "\r\n" ends a line).
    if matches!(f.command.as_str(), "CONNECT" | "STOMP" | "CONNECTED") {
        for (k, v) in &mut f.headers {
            *k = k.replace(['\r', '\n'], " ");
            *v = v.replace(['\r', '\n'], " ");
        }
    }
    f
}

fuzz_target!(|data: &[u8]| {
    let mut c = Choices::new(data);
    let limits = Limits { max_header_bytes: 16 + c.u16() as usize % 4096, max_headers: 1 + c.byte() as usize % 64, max_body: c.u16() as usize % 4096 };
    let n = (c.byte() % 16) as usize;
    let spec = c.take(n);
    let input = c.rest();
    let whole = run(input, &[], limits);
    let cuts = Choices::cuts(spec, input.len());
    assert_eq!(run(input, &cuts, limits), whole, "cut at {cuts:?}");
    if input.len() <= 512 {
        let every: Vec<usize> = (1..input.len()).collect();
        assert_eq!(run(input, &every, limits), whole, "one byte per read");
    }
    for item in &whole.0 {
        let Decoded::Frame(f) = item else { continue };
        assert!(f.headers.len() <= limits.max_headers, "{} headers", f.headers.len());
        match f.oversized {
            Some(len) => assert!(f.body.is_empty() && len > limits.max_body),
            None => {
                assert!(f.body.len() <= limits.max_body);
                let again = run(&f.encode(), &[], Limits { max_header_bytes: usize::MAX >> 1, max_headers: usize::MAX >> 1, max_body: usize::MAX >> 1 });
                match again.0.as_slice() {
                    [Decoded::Frame(g)] if !again.1 => assert_eq!(normal(g.clone()), normal(f.clone()), "round trip"),
                    other => panic!("{f:?} encoded decodes to {other:?} (error: {})", again.1),
                }
            }
        }
    }
});
