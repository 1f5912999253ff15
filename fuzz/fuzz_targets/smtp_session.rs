//! What an SMTP client sends to the smtp interface: command lines and DATA, read by the same
//! code the session uses (wire.rs), cut into reads where the input's first bytes say.
//! Properties: command lines and their refusals are the same however the bytes arrive, and the
//! buffer never holds more than the line limit; the DATA decoder finds the same end and gives
//! the same message whatever the cuts, keeps nothing past its size limit, ends only at
//! CRLF.CRLF, and a message stuffed as a client sends it decodes back to itself (bare LFs made
//! CRLF); every command line parses without a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rustomnic_fuzz::Choices;
use rustomnic_mail::fuzzing::{parse, stuff, DataDecoder, Fed, Line, Lines};

fn lines(input: &[u8], cuts: &[usize], max: usize) -> (Vec<Line>, usize) {
    let mut l = Lines::default();
    let mut buf = Vec::new();
    let mut out = Vec::new();
    let mut start = 0;
    for end in cuts.iter().copied().chain([input.len()]) {
        buf.extend_from_slice(&input[start..end.max(start)]);
        start = end.max(start);
        while let Some(line) = l.next(&mut buf, max) {
            out.push(line);
        }
        assert!(buf.len() <= max + 1, "buffer of {} over the limit {max}", buf.len());
    }
    (out, buf.len())
}

fn data(input: &[u8], cuts: &[usize], max: usize) -> (Option<usize>, bool, Vec<u8>) {
    let mut d = DataDecoder::new(max);
    let mut start = 0;
    for end in cuts.iter().copied().chain([input.len()]) {
        let end = end.max(start);
        if let Fed::End(n) = d.feed(&input[start..end]) {
            let over = d.over();
            return (Some(start + n), over, d.into_message());
        }
        start = end;
    }
    let over = d.over();
    (None, over, d.into_message())
}

fuzz_target!(|data_in: &[u8]| {
    let mut c = Choices::new(data_in);
    let max = 8 + (c.byte() as usize) * 4;
    let cut_spec = c.piece();
    let input = c.rest();
    let cuts = Choices::cuts(cut_spec, input.len());

    let whole = lines(input, &[], max);
    let cut = lines(input, &cuts, max);
    assert_eq!(whole, cut, "lines cut at {cuts:?}");
    for l in &whole.0 {
        match l {
            Line::Line(l) => {
                assert!(l.len() <= max);
                let _ = parse(l);
            }
            Line::TooLong => {}
        }
    }

    let (end, over, message) = data(input, &[], max);
    assert_eq!((end, over, message.clone()), data(input, &cuts, max), "DATA cut at {cuts:?}");
    assert!(message.len() <= max);
    if over {
        assert!(message.is_empty());
    }
    if let Some(n) = end {
        assert!(input[..n].ends_with(b"\r\n.\r\n") || (n == 3 && input.starts_with(b".\r\n")), "ended at {n} without CRLF.CRLF");
    }

    // Round trip: the input as a message (bare LFs are CRLF once stuffed), stuffed and decoded.
    let stuffed = stuff(input);
    let (end, over, back) = data(&stuffed, &cuts, usize::MAX >> 1);
    assert_eq!(end, Some(stuffed.len()), "a stuffed message ends where its end is");
    assert!(!over);
    let mut want = Vec::new();
    let mut prev = 0u8;
    for &b in input {
        if b == b'\n' && prev != b'\r' {
            want.push(b'\r');
        }
        want.push(b);
        prev = b;
    }
    if !(want.is_empty() || want.ends_with(b"\r\n")) {
        want.extend_from_slice(b"\r\n");
    }
    assert_eq!(back, want);
});
