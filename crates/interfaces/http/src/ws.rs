//! WebSocket framing (RFC 6455) for the sessions of `request.upgrade`: reading the client's
//! masked frames into messages (fragments joined, pings answered, limits and UTF-8 checked) and
//! writing ours. An idle session keeps no buffer: bytes are read only once the socket is
//! readable, and what is left of them after whole frames is kept only until the frame is whole.

use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::AsyncWriteExt;

use crate::Prefixed;

const TEXT: u8 = 1;
const BINARY: u8 = 2;
const CLOSE: u8 = 8;
const PING: u8 = 9;
const PONG: u8 = 10;
/// What a read reserves at least; a frame larger than this grows the buffer to its size.
const READ_CHUNK: usize = 512;

/// A whole message from the client.
#[derive(Debug, PartialEq)]
pub(crate) enum Message {
    /// Checked to be UTF-8.
    Text(Vec<u8>),
    Binary(Vec<u8>),
    /// The client's close, with its code (none when it sent none). The echo is queued.
    Close(Option<u16>),
}

/// Why a session cannot go on: each but `Broken` has the close code sent for it.
#[derive(Debug, PartialEq)]
pub(crate) enum WsError {
    /// A message or frame over max_message_size, which it carries (1009).
    TooBig(usize),
    /// A frame that breaks the protocol (1002).
    Protocol(&'static str),
    /// A text message that is not UTF-8 (1007).
    BadText,
    /// The connection failed.
    Broken,
}

impl WsError {
    /// The close code and reason to send for it; none when the connection is gone.
    pub(crate) fn close(&self) -> Option<(u16, &'static str)> {
        match self {
            WsError::TooBig(_) => Some((1009, "message too big")),
            WsError::Protocol(_) => Some((1002, "protocol error")),
            WsError::BadText => Some((1007, "text is not UTF-8")),
            WsError::Broken => None,
        }
    }
}

impl std::fmt::Display for WsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WsError::TooBig(max) => write!(f, "a message over max_message_size ({max} bytes)"),
            WsError::Protocol(what) => write!(f, "protocol error: {what}"),
            WsError::BadText => f.write_str("a text message that is not UTF-8"),
            WsError::Broken => f.write_str("the connection failed"),
        }
    }
}

/// A WebSocket session's connection.
pub(crate) struct WsConn {
    io: Prefixed,
    messages: Messages,
}

/// The message layer of a session, apart from its socket: client bytes in, whole messages out,
/// and the control frames to write back (pongs, the echo of a close). Kept apart so that the
/// fuzz target drives exactly what a session runs.
struct Messages {
    /// Bytes read that do not make a whole frame yet (unallocated while idle).
    input: Vec<u8>,
    /// A fragmented message being joined: its opcode and data so far.
    message: Option<(u8, Vec<u8>)>,
    /// Control frames (pongs, the echo of a close) still to be written.
    output: Vec<u8>,
    max: usize,
    close_sent: bool,
}

/// A parsed frame: fin, opcode, unmasked payload, and how many bytes it took.
struct Frame {
    fin: bool,
    opcode: u8,
    payload: Vec<u8>,
}

/// Parses the frame at the start of `buf`; `None` until it is whole.
fn parse(buf: &[u8], max: usize) -> Result<Option<(Frame, usize)>, WsError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    if b0 & 0x70 != 0 {
        return Err(WsError::Protocol("reserved bits set (no extension was agreed)"));
    }
    let opcode = b0 & 0x0f;
    if !matches!(opcode, 0 | TEXT | BINARY | CLOSE | PING | PONG) {
        return Err(WsError::Protocol("unknown opcode"));
    }
    let fin = b0 & 0x80 != 0;
    if b1 & 0x80 == 0 {
        return Err(WsError::Protocol("a frame from the client is not masked"));
    }
    let short = (b1 & 0x7f) as u64;
    if opcode >= CLOSE && (!fin || short > 125) {
        return Err(WsError::Protocol("a control frame is fragmented or longer than 125 bytes"));
    }
    let (len, mut at) = match short {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (u16::from_be_bytes([buf[2], buf[3]]) as u64, 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut n = [0u8; 8];
            n.copy_from_slice(&buf[2..10]);
            let len = u64::from_be_bytes(n);
            if len >> 63 != 0 {
                return Err(WsError::Protocol("a frame length with its top bit set"));
            }
            (len, 10)
        }
        n => (n, 2),
    };
    if len > max as u64 {
        return Err(WsError::TooBig(max));
    }
    if buf.len() < at + 4 {
        return Ok(None);
    }
    let mask = [buf[at], buf[at + 1], buf[at + 2], buf[at + 3]];
    at += 4;
    let len = len as usize;
    if buf.len() - at < len {
        return Ok(None);
    }
    let payload = buf[at..at + len].iter().enumerate().map(|(i, b)| b ^ mask[i % 4]).collect();
    Ok(Some((Frame { fin, opcode, payload }, at + len)))
}

/// Appends a frame from the server (unmasked, whole) to `out`.
fn frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    out.reserve(payload.len() + 10);
    out.push(0x80 | opcode);
    match payload.len() {
        n if n < 126 => out.push(n as u8),
        n if n <= u16::MAX as usize => {
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

/// A close code a peer may send (RFC 6455 7.4).
fn valid_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999)
}

impl Messages {
    fn new(input: Vec<u8>, max: usize) -> Messages {
        Messages { input, message: None, output: Vec::new(), max, close_sent: false }
    }

    /// The next whole message from the bytes read so far; `None` until more bytes come. Pings
    /// are answered and pongs dropped on the way.
    fn next(&mut self) -> Result<Option<Message>, WsError> {
        loop {
            let Some((f, used)) = parse(&self.input, self.max)? else {
                if self.input.is_empty() {
                    self.input = Vec::new();
                }
                return Ok(None);
            };
            self.input.drain(..used);
            if self.input.is_empty() {
                self.input = Vec::new();
            }
            match f.opcode {
                PING => frame(&mut self.output, PONG, &f.payload),
                PONG => {}
                CLOSE => {
                    let code = match f.payload.len() {
                        0 => None,
                        1 => return Err(WsError::Protocol("a close frame of one byte")),
                        _ => {
                            let code = u16::from_be_bytes([f.payload[0], f.payload[1]]);
                            if !valid_code(code) {
                                return Err(WsError::Protocol("a close code a peer may not send"));
                            }
                            if std::str::from_utf8(&f.payload[2..]).is_err() {
                                return Err(WsError::Protocol("a close reason that is not UTF-8"));
                            }
                            Some(code)
                        }
                    };
                    if !self.close_sent {
                        // The echo of the client's close, with its code.
                        let echo = code.map(|c| c.to_be_bytes().to_vec()).unwrap_or_default();
                        frame(&mut self.output, CLOSE, &echo);
                        self.close_sent = true;
                    }
                    return Ok(Some(Message::Close(code)));
                }
                0 => {
                    let Some((_, data)) = self.message.as_mut() else {
                        return Err(WsError::Protocol("a continuation frame without a message"));
                    };
                    if data.len() + f.payload.len() > self.max {
                        return Err(WsError::TooBig(self.max));
                    }
                    data.extend_from_slice(&f.payload);
                    if f.fin {
                        if let Some((opcode, data)) = self.message.take() {
                            return whole(opcode, data).map(Some);
                        }
                    }
                }
                opcode => {
                    if self.message.is_some() {
                        return Err(WsError::Protocol("a new message inside a fragmented one"));
                    }
                    if f.fin {
                        return whole(opcode, f.payload).map(Some);
                    }
                    self.message = Some((opcode, f.payload));
                }
            }
        }
    }
}

impl WsConn {
    /// The session over `io`; bytes the client sent after its request are its first input.
    pub(crate) fn new(mut io: Prefixed, max: usize) -> WsConn {
        let input = std::mem::take(&mut io.head).to_vec();
        WsConn { io, messages: Messages::new(input, max) }
    }

    /// Writes what it can of the queued control frames without waiting; false when the
    /// connection failed.
    fn write_queued(&mut self, cx: &mut Context<'_>) -> bool {
        let output = &mut self.messages.output;
        if output.is_empty() {
            return true;
        }
        match tokio::io::AsyncWrite::poll_write(std::pin::Pin::new(&mut self.io), cx, output) {
            Poll::Ready(Ok(n)) => {
                output.drain(..n);
                if output.is_empty() {
                    *output = Vec::new();
                }
                true
            }
            Poll::Ready(Err(_)) => false,
            Poll::Pending => true,
        }
    }

    /// The next message; `None` once the client has closed the connection.
    pub(crate) fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Message, WsError>>> {
        loop {
            if !self.write_queued(cx) {
                return Poll::Ready(Some(Err(WsError::Broken)));
            }
            match self.messages.next() {
                Ok(Some(m)) => {
                    // A pong for a ping that came just before the message goes out now.
                    if !self.write_queued(cx) {
                        return Poll::Ready(Some(Err(WsError::Broken)));
                    }
                    return Poll::Ready(Some(Ok(m)));
                }
                Err(e) => return Poll::Ready(Some(Err(e))),
                Ok(None) => {}
            }
            // More bytes: the buffer is made only once there are some to read.
            match self.io.stream.poll_read_ready(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(_)) => return Poll::Ready(Some(Err(WsError::Broken))),
                Poll::Ready(Ok(())) => {}
            }
            let input = &mut self.messages.input;
            input.reserve(READ_CHUNK.max(input.len()));
            match self.io.stream.try_read_buf(input) {
                Ok(0) => return Poll::Ready(None),
                Ok(_) => self.io.touch(),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return Poll::Ready(Some(Err(WsError::Broken))),
            }
            if input.is_empty() {
                *input = Vec::new();
            }
        }
    }

    /// Sends a text (UTF-8) or binary message, after any control frame still queued.
    pub(crate) async fn send(&mut self, text: bool, data: &[u8]) -> std::io::Result<()> {
        let mut out = std::mem::take(&mut self.messages.output);
        frame(&mut out, if text { TEXT } else { BINARY }, data);
        self.io.write_all(&out).await
    }

    /// Writes what is queued (the echo of a client's close), waiting at most `wait`.
    pub(crate) async fn flush(&mut self, wait: Duration) {
        let out = std::mem::take(&mut self.messages.output);
        let _ = tokio::time::timeout(wait, self.io.write_all(&out)).await;
    }

    /// The close handshake from our side: our close frame, then the client's answer (messages
    /// meanwhile are dropped), waiting at most `wait`; then the connection is shut.
    pub(crate) async fn close(&mut self, code: u16, reason: &str, wait: Duration) {
        let _ = tokio::time::timeout(wait, async {
            if !self.messages.close_sent {
                self.messages.close_sent = true;
                let mut payload = code.to_be_bytes().to_vec();
                payload.extend_from_slice(reason.as_bytes());
                let mut out = std::mem::take(&mut self.messages.output);
                frame(&mut out, CLOSE, &payload);
                if self.io.write_all(&out).await.is_err() {
                    return;
                }
                loop {
                    match std::future::poll_fn(|cx| self.poll_next(cx)).await {
                        Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                        Some(Ok(_)) => continue,
                    }
                }
            } else {
                let out = std::mem::take(&mut self.messages.output);
                let _ = self.io.write_all(&out).await;
            }
            let _ = self.io.shutdown().await;
        })
        .await;
    }
}

fn whole(opcode: u8, data: Vec<u8>) -> Result<Message, WsError> {
    if opcode == TEXT {
        if std::str::from_utf8(&data).is_err() {
            return Err(WsError::BadText);
        }
        return Ok(Message::Text(data));
    }
    Ok(Message::Binary(data))
}

/// What a session made of a client's bytes (for the fuzz target).
#[derive(Debug, PartialEq)]
pub struct Session {
    /// The messages in order: text, binary, or the client's close (its code, if any, as two
    /// big-endian bytes).
    pub messages: Vec<(&'static str, Vec<u8>)>,
    /// The close code the session answered broken input with.
    pub refused: Option<u16>,
    /// The control frames written back (pongs, the echo of a close), in order.
    pub written: Vec<u8>,
}

/// Runs a client's bytes through the message layer as a session does, handed over in pieces
/// ending at each of `cuts` (then the rest), until the client's close or a refusal.
pub fn fuzz_session(data: &[u8], cuts: &[usize], max: usize) -> Session {
    let mut m = Messages::new(Vec::new(), max);
    let mut session = Session { messages: Vec::new(), refused: None, written: Vec::new() };
    let mut from = 0;
    for end in cuts.iter().copied().filter(|c| *c <= data.len()).chain([data.len()]) {
        if end < from {
            continue;
        }
        m.input.extend_from_slice(&data[from..end]);
        from = end;
        loop {
            let next = m.next();
            session.written.append(&mut m.output);
            match next {
                Ok(None) => break,
                Ok(Some(Message::Text(t))) => session.messages.push(("text", t)),
                Ok(Some(Message::Binary(b))) => session.messages.push(("binary", b)),
                Ok(Some(Message::Close(code))) => {
                    session.messages.push(("close", code.map(|c| c.to_be_bytes().to_vec()).unwrap_or_default()));
                    return session;
                }
                Err(e) => {
                    session.refused = e.close().map(|(code, _)| code);
                    return session;
                }
            }
        }
    }
    session
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame as a client sends it (masked).
    fn client(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x12, 0x34, 0x56, 0x78];
        let mut out = vec![(if fin { 0x80 } else { 0 }) | opcode];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n <= 65535 => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    #[test]
    fn frames_parse_whole_and_wait_for_the_rest() {
        for len in [0usize, 5, 125, 126, 65535, 65536] {
            let data = vec![b'a'; len];
            let wire = client(true, TEXT, &data);
            for cut in [0, 1, wire.len() / 2, wire.len() - 1] {
                assert!(parse(&wire[..cut], 1 << 20).unwrap().is_none(), "len {len} cut {cut}");
            }
            let (f, used) = parse(&wire, 1 << 20).unwrap().unwrap();
            assert_eq!((f.fin, f.opcode, f.payload, used), (true, TEXT, data, wire.len()));
        }
    }

    #[test]
    fn broken_frames_are_refused() {
        let mut unmasked = client(true, TEXT, b"hi");
        unmasked[1] &= 0x7f;
        assert!(matches!(parse(&unmasked, 100), Err(WsError::Protocol(_))));
        let mut rsv = client(true, TEXT, b"hi");
        rsv[0] |= 0x40;
        assert!(matches!(parse(&rsv, 100), Err(WsError::Protocol(_))));
        assert!(matches!(parse(&client(true, 3, b""), 100), Err(WsError::Protocol(_))));
        assert!(matches!(parse(&client(false, PING, b""), 100), Err(WsError::Protocol(_))));
        assert!(matches!(parse(&client(true, PING, &[0; 126]), 1000), Err(WsError::Protocol(_))));
        assert_eq!(parse(&client(true, BINARY, &[0; 101]), 100).err(), Some(WsError::TooBig(100)));
        // Too big is known from the length alone, before the payload arrives.
        assert_eq!(parse(&client(true, BINARY, &[0; 70000])[..10], 1000).err(), Some(WsError::TooBig(1000)));
    }

    #[test]
    fn server_frames_carry_their_length() {
        for len in [0usize, 125, 126, 65535, 65536] {
            let mut out = Vec::new();
            frame(&mut out, BINARY, &vec![7; len]);
            let header = if len < 126 { 2 } else if len <= 65535 { 4 } else { 10 };
            assert_eq!(out.len(), header + len);
            assert_eq!(out[0], 0x80 | BINARY);
            assert_eq!(out[1] & 0x80, 0, "server frames are not masked");
        }
        assert!(whole(TEXT, vec![0xff]).is_err());
        assert_eq!(whole(TEXT, b"ok".to_vec()), Ok(Message::Text(b"ok".to_vec())));
    }
}
