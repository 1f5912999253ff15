//! WebSocket framing (RFC 6455) for the sessions of `request.upgrade`: reading the client's
//! masked frames into messages (fragments joined, pings answered, limits and UTF-8 checked) and
//! writing ours. An idle session keeps no buffer: bytes are read only once the socket is
//! readable, and what is left of them after whole frames is kept only until the frame is whole.
//!
//! permessage-deflate (RFC 7692) is offered only on terms that keep an idle session small: our
//! messages are compressed without context takeover, and the client's either without it or
//! with a window of at most 512 bytes, which is all a session keeps between messages. The
//! (de)compressors themselves are per worker thread, reset for each message.

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
    /// A fragmented message being joined.
    message: Option<Partial>,
    /// Control frames (pongs, the echo of a close) still to be written.
    output: Vec<u8>,
    max: usize,
    close_sent: bool,
    /// The client's close arrived (valid or not): closing need not wait for it.
    close_received: bool,
    /// permessage-deflate, when agreed.
    deflate: Option<Box<Deflate>>,
}

/// A fragmented message so far.
struct Partial {
    opcode: u8,
    data: Vec<u8>,
    compressed: bool,
    /// How much of `data` is known to be UTF-8 (text), so that a bad fragment is refused at
    /// once and each byte is checked once.
    checked: usize,
}

/// A parsed frame: fin, opcode, unmasked payload, and how many bytes it took.
struct Frame {
    fin: bool,
    opcode: u8,
    /// RSV1 on the first frame of a message: the message is compressed.
    compressed: bool,
    payload: Vec<u8>,
}

/// Parses the frame at the start of `buf`; `None` until it is whole.
fn parse(buf: &[u8], max: usize, deflate: bool) -> Result<Option<(Frame, usize)>, WsError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    let opcode = b0 & 0x0f;
    let compressed = b0 & 0x40 != 0;
    if b0 & 0x30 != 0 || (compressed && !deflate) {
        return Err(WsError::Protocol("reserved bits set (no extension was agreed)"));
    }
    if compressed && !matches!(opcode, TEXT | BINARY) {
        return Err(WsError::Protocol("RSV1 on a continuation or control frame"));
    }
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
    Ok(Some((Frame { fin, opcode, compressed, payload }, at + len)))
}

/// Appends a frame from the server (unmasked, whole) to `out`.
fn frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    frame_with(out, opcode, false, payload)
}

fn frame_with(out: &mut Vec<u8>, opcode: u8, compressed: bool, payload: &[u8]) {
    out.reserve(payload.len() + 10);
    out.push(0x80 | if compressed { 0x40 } else { 0 } | opcode);
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
    // 1012-1014 are registered with IANA (service restart, try again later, bad gateway).
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

impl Messages {
    fn new(input: Vec<u8>, max: usize, deflate: Option<Deflate>) -> Messages {
        Messages { input, message: None, output: Vec::new(), max, close_sent: false, close_received: false, deflate: deflate.map(Box::new) }
    }

    /// A whole message's data: inflated when it came compressed, then checked when text.
    fn whole(&mut self, opcode: u8, data: Vec<u8>, compressed: bool) -> Result<Message, WsError> {
        let data = match (&mut self.deflate, compressed) {
            (Some(d), true) => d.inflate(&data, self.max)?,
            _ => data,
        };
        whole(opcode, data)
    }

    /// The next whole message from the bytes read so far; `None` until more bytes come. Pings
    /// are answered and pongs dropped on the way.
    fn next(&mut self) -> Result<Option<Message>, WsError> {
        loop {
            let Some((f, used)) = parse(&self.input, self.max, self.deflate.is_some())? else {
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
                    self.close_received = true;
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
                    let Some(partial) = self.message.as_mut() else {
                        return Err(WsError::Protocol("a continuation frame without a message"));
                    };
                    if partial.data.len() + f.payload.len() > self.max {
                        return Err(WsError::TooBig(self.max));
                    }
                    partial.data.extend_from_slice(&f.payload);
                    partial.check_text()?;
                    if f.fin {
                        if let Some(p) = self.message.take() {
                            return self.whole(p.opcode, p.data, p.compressed).map(Some);
                        }
                    }
                }
                opcode => {
                    if self.message.is_some() {
                        return Err(WsError::Protocol("a new message inside a fragmented one"));
                    }
                    if f.fin {
                        return self.whole(opcode, f.payload, f.compressed).map(Some);
                    }
                    let mut partial = Partial { opcode, data: f.payload, compressed: f.compressed, checked: 0 };
                    partial.check_text()?;
                    self.message = Some(partial);
                }
            }
        }
    }
}

impl Partial {
    /// Fails fast on text that cannot become UTF-8 whatever follows (an incomplete character at
    /// the end may be completed by the next fragment). Compressed text is checked once inflated.
    fn check_text(&mut self) -> Result<(), WsError> {
        if self.opcode != TEXT || self.compressed {
            return Ok(());
        }
        match std::str::from_utf8(&self.data[self.checked..]) {
            Ok(_) => self.checked = self.data.len(),
            Err(e) if e.error_len().is_some() => return Err(WsError::BadText),
            Err(e) => self.checked += e.valid_up_to(),
        }
        Ok(())
    }
}

/// Client messages may reference this much of the previous ones (client_max_window_bits=9):
/// what a session keeps between messages when the client does not give up context takeover.
const CLIENT_WINDOW_BITS: u8 = 9;
/// Messages shorter than this go out uncompressed: compressing them would not pay.
const COMPRESS_FROM: usize = 64;

/// permessage-deflate as agreed with one client.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Deflate {
    /// The last bytes of the client's messages, when it keeps its context between them (the
    /// dictionary of its next message); None when it agreed not to.
    window: Option<Vec<u8>>,
    /// The window our compressor may use (server_max_window_bits, else 15).
    server_bits: u8,
}

/// The reply to a client's `sec-websocket-extensions` offer: the header value and what it
/// agrees to; None to decline (then no compression is used).
pub(crate) fn negotiate(offers: &str) -> Option<(String, Deflate)> {
    'offers: for offer in offers.split(',') {
        let mut params = offer.split(';').map(str::trim);
        if !params.next().is_some_and(|n| n.eq_ignore_ascii_case("permessage-deflate")) {
            continue;
        }
        let mut seen: Vec<String> = Vec::new();
        let (mut client_no_context, mut client_bits_ok, mut server_bits) = (false, false, None);
        for p in params.filter(|p| !p.is_empty()) {
            let (name, value) = match p.split_once('=') {
                Some((n, v)) => (n.trim().to_ascii_lowercase(), Some(v.trim().trim_matches('"'))),
                None => (p.to_ascii_lowercase(), None),
            };
            if seen.contains(&name) {
                continue 'offers;
            }
            seen.push(name.clone());
            let bits = |v: Option<&str>| v.and_then(|v| v.parse::<u8>().ok()).filter(|b| (8..=15).contains(b));
            match (name.as_str(), value) {
                ("server_no_context_takeover", None) => {}
                ("client_no_context_takeover", None) => client_no_context = true,
                ("server_max_window_bits", v) => match bits(v) {
                    // zlib cannot compress with a 256-byte window.
                    Some(b) if b >= 9 => server_bits = Some(b),
                    _ => continue 'offers,
                },
                ("client_max_window_bits", None) => client_bits_ok = true,
                ("client_max_window_bits", v) => match bits(v) {
                    Some(b) if b >= CLIENT_WINDOW_BITS => client_bits_ok = true,
                    _ => continue 'offers,
                },
                _ => continue 'offers,
            }
        }
        let mut reply = String::from("permessage-deflate; server_no_context_takeover");
        if let Some(b) = server_bits {
            reply.push_str(&format!("; server_max_window_bits={b}"));
        }
        let window = if client_no_context {
            reply.push_str("; client_no_context_takeover");
            None
        } else if client_bits_ok {
            reply.push_str(&format!("; client_max_window_bits={CLIENT_WINDOW_BITS}"));
            Some(Vec::new())
        } else {
            // The client would keep a 32 KiB window we would have to mirror per session.
            continue;
        };
        return Some((reply, Deflate { window, server_bits: server_bits.unwrap_or(15) }));
    }
    None
}

thread_local! {
    static INFLATER: std::cell::RefCell<Option<flate2::Decompress>> = const { std::cell::RefCell::new(None) };
    /// One compressor per window size agreed (at most 7).
    static DEFLATERS: std::cell::RefCell<Vec<(u8, flate2::Compress)>> = const { std::cell::RefCell::new(Vec::new()) };
    /// The last message compressed on this thread (window bits, message, result): a message
    /// published to many sessions is compressed once per worker, not once per session.
    static LAST: std::cell::RefCell<Option<Compressed>> = const { std::cell::RefCell::new(None) };
}

/// A message compressed: (window bits, the message, what it compressed to if it shrank).
type Compressed = (u8, Vec<u8>, Option<Vec<u8>>);

/// Messages up to this size are remembered for the next session that sends the same.
const REMEMBER_UP_TO: usize = 64 << 10;

impl Deflate {
    /// A compressed message inflated, within `max` bytes.
    fn inflate(&mut self, data: &[u8], max: usize) -> Result<Vec<u8>, WsError> {
        const CORRUPT: WsError = WsError::Protocol("a compressed message that does not inflate");
        let out = INFLATER.with(|cell| {
            let mut cell = cell.borrow_mut();
            let d = cell.get_or_insert_with(|| flate2::Decompress::new_with_window_bits(false, 15));
            d.reset(false);
            if let Some(window) = self.window.as_ref().filter(|w| !w.is_empty()) {
                d.set_dictionary(window).map_err(|_| CORRUPT)?;
            }
            let mut out = Vec::with_capacity((data.len() * 4).clamp(64, max.max(64)));
            // The four bytes each message's compressed data lost at its end (RFC 7692 7.2.2).
            for input in [data, &[0, 0, 0xff, 0xff][..]] {
                let start = d.total_in();
                loop {
                    let used = (d.total_in() - start) as usize;
                    if used >= input.len() && out.len() < out.capacity() {
                        break;
                    }
                    if out.len() == out.capacity() {
                        if out.len() >= max {
                            // Is there more to come? One more byte of room tells.
                            out.reserve(1);
                        } else {
                            out.reserve((out.len()).clamp(64, max - out.len()));
                        }
                    }
                    let before = (d.total_in(), d.total_out());
                    match d.decompress_vec(&input[used..], &mut out, flate2::FlushDecompress::Sync) {
                        Ok(flate2::Status::StreamEnd) => break,
                        Ok(_) => {}
                        Err(_) => return Err(CORRUPT),
                    }
                    if out.len() > max {
                        return Err(WsError::TooBig(max));
                    }
                    if (d.total_in(), d.total_out()) == before && out.len() < out.capacity() {
                        // No progress with room to spare: the input is used up.
                        break;
                    }
                }
            }
            Ok(out)
        })?;
        if let Some(window) = &mut self.window {
            // The next message may refer back into this one (and before it).
            let keep = 1usize << CLIENT_WINDOW_BITS;
            if out.len() >= keep {
                window.clear();
                window.extend_from_slice(&out[out.len() - keep..]);
            } else {
                window.extend_from_slice(&out);
                let excess = window.len().saturating_sub(keep);
                window.drain(..excess);
            }
        }
        Ok(out)
    }

    /// `data` compressed as one message without context takeover; None when it does not shrink.
    fn deflate(&self, data: &[u8]) -> Option<Vec<u8>> {
        if data.len() < COMPRESS_FROM {
            return None;
        }
        let bits = self.server_bits;
        if let Some(hit) = LAST.with(|l| l.borrow().as_ref().filter(|(b, m, _)| *b == bits && m.as_slice() == data).map(|(_, _, out)| out.clone())) {
            return hit;
        }
        let out = self.compress(data);
        if data.len() <= REMEMBER_UP_TO {
            LAST.with(|l| *l.borrow_mut() = Some((bits, data.to_vec(), out.clone())));
        }
        out
    }

    fn compress(&self, data: &[u8]) -> Option<Vec<u8>> {
        DEFLATERS.with(|cell| {
            let mut list = cell.borrow_mut();
            let at = match list.iter().position(|(b, _)| *b == self.server_bits) {
                Some(i) => i,
                None => {
                    list.push((self.server_bits, flate2::Compress::new_with_window_bits(flate2::Compression::fast(), false, self.server_bits)));
                    list.len() - 1
                }
            };
            let c = &mut list[at].1;
            c.reset();
            let mut out = Vec::with_capacity(data.len() + 16);
            loop {
                let used = c.total_in() as usize;
                if out.len() == out.capacity() {
                    out.reserve(64);
                }
                let before = c.total_out();
                c.compress_vec(&data[used..], &mut out, flate2::FlushCompress::Sync).ok()?;
                if c.total_in() as usize >= data.len() && c.total_out() == before && out.len() < out.capacity() {
                    break;
                }
            }
            // A sync flush ends with 00 00 ff ff, which the receiver adds back.
            if out.ends_with(&[0, 0, 0xff, 0xff]) {
                out.truncate(out.len() - 4);
            }
            (out.len() < data.len()).then_some(out)
        })
    }
}

impl WsConn {
    /// The session over `io`; bytes the client sent after its request are its first input.
    pub(crate) fn new(mut io: Prefixed, max: usize, deflate: Option<Deflate>) -> WsConn {
        let input = std::mem::take(&mut io.head).to_vec();
        WsConn { io, messages: Messages::new(input, max, deflate) }
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
        let opcode = if text { TEXT } else { BINARY };
        match self.messages.deflate.as_ref().and_then(|d| d.deflate(data)) {
            Some(compressed) => frame_with(&mut out, opcode, true, &compressed),
            None => frame(&mut out, opcode, data),
        }
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
                // The client's close came already (one we refused): nothing to wait for.
                while !self.messages.close_received {
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
    let mut m = Messages::new(Vec::new(), max, None);
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
                assert!(parse(&wire[..cut], 1 << 20, false).unwrap().is_none(), "len {len} cut {cut}");
            }
            let (f, used) = parse(&wire, 1 << 20, false).unwrap().unwrap();
            assert_eq!((f.fin, f.opcode, f.payload, used), (true, TEXT, data, wire.len()));
        }
    }

    #[test]
    fn broken_frames_are_refused() {
        let mut unmasked = client(true, TEXT, b"hi");
        unmasked[1] &= 0x7f;
        assert!(matches!(parse(&unmasked, 100, false), Err(WsError::Protocol(_))));
        let mut rsv = client(true, TEXT, b"hi");
        rsv[0] |= 0x40;
        assert!(matches!(parse(&rsv, 100, false), Err(WsError::Protocol(_))));
        assert!(matches!(parse(&client(true, 3, b""), 100, false), Err(WsError::Protocol(_))));
        assert!(matches!(parse(&client(false, PING, b""), 100, false), Err(WsError::Protocol(_))));
        assert!(matches!(parse(&client(true, PING, &[0; 126]), 1000, false), Err(WsError::Protocol(_))));
        assert_eq!(parse(&client(true, BINARY, &[0; 101]), 100, false).err(), Some(WsError::TooBig(100)));
        // Too big is known from the length alone, before the payload arrives.
        assert_eq!(parse(&client(true, BINARY, &[0; 70000])[..10], 1000, false).err(), Some(WsError::TooBig(1000)));
    }

    #[test]
    fn server_frames_carry_their_length() {
        for len in [0usize, 125, 126, 65535, 65536] {
            let mut out = Vec::new();
            frame(&mut out, BINARY, &vec![7; len]);
            let header = if len < 126 {
                2
            } else if len <= 65535 {
                4
            } else {
                10
            };
            assert_eq!(out.len(), header + len);
            assert_eq!(out[0], 0x80 | BINARY);
            assert_eq!(out[1] & 0x80, 0, "server frames are not masked");
        }
        assert!(whole(TEXT, vec![0xff]).is_err());
        assert_eq!(whole(TEXT, b"ok".to_vec()), Ok(Message::Text(b"ok".to_vec())));
    }

    /// A client's compressed message: raw deflate with a sync flush, its tail cut.
    fn client_deflate(c: &mut flate2::Compress, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(data.len() + 64);
        c.compress_vec(data, &mut out, flate2::FlushCompress::Sync).unwrap();
        assert!(out.ends_with(&[0, 0, 0xff, 0xff]));
        out.truncate(out.len() - 4);
        out
    }

    fn compressed_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = client(fin, opcode, payload);
        f[0] |= 0x40;
        f
    }

    #[test]
    fn deflate_is_agreed_only_on_terms_that_keep_a_session_small() {
        let (reply, d) = negotiate("permessage-deflate; client_max_window_bits").unwrap();
        assert_eq!(reply, "permessage-deflate; server_no_context_takeover; client_max_window_bits=9");
        assert_eq!(d.window, Some(Vec::new()));
        let (reply, d) = negotiate("permessage-deflate; client_no_context_takeover; server_max_window_bits=10").unwrap();
        assert_eq!(reply, "permessage-deflate; server_no_context_takeover; server_max_window_bits=10; client_no_context_takeover");
        assert_eq!((d.window, d.server_bits), (None, 10));
        assert_eq!(negotiate("permessage-deflate"), None, "a client keeping a 32 KiB window is declined");
        assert_eq!(negotiate("permessage-deflate; server_max_window_bits=8; client_no_context_takeover"), None);
        assert_eq!(negotiate("permessage-deflate; client_max_window_bits=8"), None);
        assert_eq!(negotiate("permessage-deflate; unknown; client_no_context_takeover"), None);
        assert_eq!(negotiate("permessage-deflate; client_no_context_takeover; client_no_context_takeover"), None);
        assert_eq!(negotiate("x-webkit-deflate-frame"), None);
        // The first acceptable offer wins.
        let (reply, _) = negotiate("permessage-deflate; foo, permessage-deflate; client_no_context_takeover").unwrap();
        assert!(reply.ends_with("client_no_context_takeover"), "{reply}");
    }

    #[test]
    fn compressed_messages_inflate_with_the_context_the_client_kept() {
        let (_, d) = negotiate("permessage-deflate; client_max_window_bits").unwrap();
        let mut m = Messages::new(Vec::new(), 1 << 20, Some(d));
        // One client stream over both messages (context takeover), window 9 bits as agreed.
        let mut c = flate2::Compress::new_with_window_bits(flate2::Compression::default(), false, 9);
        let first = br#"{"type":"chat","room":"lobby","text":"hello there"}"#;
        let second = br#"{"type":"chat","room":"lobby","text":"hello again"}"#;
        let a = client_deflate(&mut c, first);
        let b = client_deflate(&mut c, second);
        assert!(b.len() < a.len(), "the second refers back to the first");
        m.input.extend(compressed_frame(true, TEXT, &a));
        // The second in two fragments: RSV1 on the first only.
        let (b1, b2) = b.split_at(b.len() / 2);
        m.input.extend(compressed_frame(false, TEXT, b1));
        m.input.extend(client(true, 0, b2));
        assert_eq!(m.next().unwrap(), Some(Message::Text(first.to_vec())));
        assert_eq!(m.next().unwrap(), Some(Message::Text(second.to_vec())));
        assert!(m.deflate.as_ref().unwrap().window.as_ref().unwrap().len() <= 512);
    }

    #[test]
    fn compressed_bombs_and_garbage_are_refused() {
        let (_, d) = negotiate("permessage-deflate; client_no_context_takeover").unwrap();
        let mut m = Messages::new(Vec::new(), 64 << 10, Some(d.clone()));
        let mut c = flate2::Compress::new(flate2::Compression::best(), false);
        let bomb = client_deflate(&mut c, &vec![0u8; 2 << 20]);
        assert!(bomb.len() < 64 << 10);
        m.input.extend(compressed_frame(true, BINARY, &bomb));
        assert_eq!(m.next().err(), Some(WsError::TooBig(64 << 10)));
        let mut m = Messages::new(Vec::new(), 1 << 20, Some(d));
        m.input.extend(compressed_frame(true, BINARY, &[0xff, 0xfe, 0xfd, 0x00, 0x13]));
        assert!(matches!(m.next(), Err(WsError::Protocol(_))));
        // RSV1 without the extension, and on a continuation frame with it.
        let mut m = Messages::new(Vec::new(), 1 << 20, None);
        m.input.extend(compressed_frame(true, TEXT, b"x"));
        assert!(matches!(m.next(), Err(WsError::Protocol(_))));
    }

    #[test]
    fn our_messages_compress_and_inflate_with_any_client() {
        let (_, d) = negotiate("permessage-deflate; client_no_context_takeover; server_max_window_bits=9").unwrap();
        let text = "the same words again and again ".repeat(20);
        let out = d.deflate(text.as_bytes()).expect("compressible text compresses");
        assert!(out.len() < text.len() / 3);
        let mut inflated = Vec::with_capacity(text.len() + 16);
        let mut i = flate2::Decompress::new(false);
        let mut input = out.clone();
        input.extend_from_slice(&[0, 0, 0xff, 0xff]);
        i.decompress_vec(&input, &mut inflated, flate2::FlushDecompress::Sync).unwrap();
        assert_eq!(inflated, text.as_bytes());
        assert_eq!(d.deflate(b"short"), None);
        // A second message: no context taken over, so it inflates on its own.
        assert_eq!(d.deflate(text.as_bytes()), Some(out));
    }

    #[test]
    fn bad_text_is_refused_at_the_first_fragment_that_cannot_be_utf8() {
        let mut m = Messages::new(Vec::new(), 1 << 20, None);
        // "é" split across fragments is fine.
        m.input.extend(client(false, TEXT, &[b'a', 0xc3]));
        m.input.extend(client(true, 0, &[0xa9]));
        assert_eq!(m.next().unwrap(), Some(Message::Text("aé".as_bytes().to_vec())));
        m.input.extend(client(false, TEXT, &[b'a', 0xff]));
        assert_eq!(m.next().err(), Some(WsError::BadText), "refused before the message ends");
    }

    #[test]
    fn registered_close_codes_are_accepted_and_a_refused_close_is_not_waited_for() {
        for code in [1012u16, 1013, 1014] {
            let mut m = Messages::new(Vec::new(), 100, None);
            m.input.extend(client(true, CLOSE, &code.to_be_bytes()));
            assert_eq!(m.next().unwrap(), Some(Message::Close(Some(code))));
        }
        let mut m = Messages::new(Vec::new(), 100, None);
        m.input.extend(client(true, CLOSE, &[3]));
        assert!(matches!(m.next(), Err(WsError::Protocol(_))));
        assert!(m.close_received);
    }
}
