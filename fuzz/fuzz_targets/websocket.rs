//! What WebSocket clients send, through the message layer of a session (frames, fragments,
//! control frames between them, close codes and reasons, UTF-8, the size limit across
//! fragments). The input's first bytes choose the message size limit and where the rest is cut
//! into reads. Properties: however the bytes arrive, the session gives the same messages, the
//! same refusal and writes the same control frames; and it agrees with a plain reading of
//! RFC 6455 written here (messages, refusal codes, pongs and the close echo).
#![no_main]

use libfuzzer_sys::fuzz_target;
use rustomnic_fuzz::Choices;
use rustomnic_http::fuzzing::{fuzz_session, Session};

/// A server frame: final, unmasked.
fn server_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    out.push(0x80 | opcode);
    match payload.len() {
        n if n < 126 => out.push(n as u8),
        n if n <= 0xffff => {
            out.push(126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(payload);
}

/// RFC 6455 read from a whole buffer, frame by frame, as directly as it is written there.
fn reference(data: &[u8], max: usize) -> Session {
    let mut s = Session {
        messages: Vec::new(),
        refused: None,
        written: Vec::new(),
    };
    let mut pos = 0;
    let mut fragments: Option<(u8, Vec<u8>)> = None;
    let refuse = |mut s: Session, code: u16| {
        s.refused = Some(code);
        s
    };
    loop {
        let rest = &data[pos..];
        if rest.len() < 2 {
            return s;
        }
        let (fin, rsv, opcode) = (rest[0] & 0x80 != 0, (rest[0] >> 4) & 7, rest[0] & 0x0f);
        let (masked, len7) = (rest[1] & 0x80 != 0, (rest[1] & 0x7f) as u64);
        if rsv != 0 || ![0, 1, 2, 8, 9, 10].contains(&opcode) || !masked {
            return refuse(s, 1002);
        }
        let control = opcode >= 8;
        if control && (!fin || len7 > 125) {
            return refuse(s, 1002);
        }
        let (len, header) = match len7 {
            126 if rest.len() < 4 => return s,
            126 => (u16::from_be_bytes([rest[2], rest[3]]) as u64, 4),
            127 if rest.len() < 10 => return s,
            127 => {
                let n = u64::from_be_bytes(rest[2..10].try_into().unwrap_or_default());
                if n >= 1 << 63 {
                    return refuse(s, 1002);
                }
                (n, 10)
            }
            n => (n, 2),
        };
        if len > max as u64 {
            return refuse(s, 1009);
        }
        let len = len as usize;
        if rest.len() < header + 4 + len {
            return s;
        }
        let mask = &rest[header..header + 4];
        let payload: Vec<u8> = rest[header + 4..header + 4 + len]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ mask[i % 4])
            .collect();
        pos += header + 4 + len;
        match opcode {
            9 => server_frame(&mut s.written, 10, &payload),
            10 => {}
            8 => {
                if payload.len() == 1 {
                    return refuse(s, 1002);
                }
                let mut echo = Vec::new();
                if payload.len() >= 2 {
                    let code = u16::from_be_bytes([payload[0], payload[1]]);
                    let allowed = matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999);
                    if !allowed || std::str::from_utf8(&payload[2..]).is_err() {
                        return refuse(s, 1002);
                    }
                    echo = payload[..2].to_vec();
                }
                server_frame(&mut s.written, 8, &echo);
                s.messages.push(("close", echo));
                return s;
            }
            0 => {
                let Some((_, so_far)) = fragments.as_mut() else {
                    return refuse(s, 1002);
                };
                if so_far.len() + payload.len() > max {
                    return refuse(s, 1009);
                }
                so_far.extend_from_slice(&payload);
            }
            _ => {
                if fragments.is_some() {
                    return refuse(s, 1002);
                }
                fragments = Some((opcode, payload));
            }
        }
        // A fragmented text message is refused at the first fragment after which no further
        // bytes could make it UTF-8 (only an incomplete last character may wait for more).
        if let Some((1, so_far)) = &fragments {
            if !fin {
                if let Err(e) = std::str::from_utf8(so_far) {
                    if e.error_len().is_some() {
                        return refuse(s, 1007);
                    }
                }
            }
        }
        if fin && opcode < 8 {
            if let Some((first, message)) = fragments.take() {
                if first == 1 {
                    if std::str::from_utf8(&message).is_err() {
                        return refuse(s, 1007);
                    }
                    s.messages.push(("text", message));
                } else {
                    s.messages.push(("binary", message));
                }
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut c = Choices::new(data);
    // Small limits, so that messages over them (across fragments too) are common.
    let max = 1 + c.byte() as usize * 4;
    let n = (c.byte() % 16) as usize;
    let spec = c.take(n);
    let input = c.rest();
    let whole = fuzz_session(input, &[], max);
    let cuts = Choices::cuts(spec, input.len());
    assert_eq!(fuzz_session(input, &cuts, max), whole, "cut at {cuts:?}");
    if input.len() <= 1024 {
        let every: Vec<usize> = (1..input.len()).collect();
        assert_eq!(fuzz_session(input, &every, max), whole, "one byte per read");
    }
    let expected = reference(input, max);
    assert_eq!(
        whole, expected,
        "the session and RFC 6455 disagree (max {max})"
    );
    for (kind, data) in &whole.messages {
        assert!(data.len() <= max);
        if *kind == "text" {
            assert!(std::str::from_utf8(data).is_ok());
        }
    }
});
