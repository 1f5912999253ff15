//! STOMP 1.2 frames: encoding, and an incremental decoder that bounds every input (header
//! bytes, number of headers, body size) and skips the body of an oversized message so that the
//! stream stays in step and the consumer can go on (docs/decisions/126).

/// One frame: a command, headers in order (repeated names: the first counts), a body.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Frame {
    pub command: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Set when the body was over the size limit (the body itself was skipped and `body` is
    /// empty): its `content-length`, or without one the limit plus one (its least length).
    pub oversized: Option<usize>,
}

impl Frame {
    pub fn new(command: &str) -> Frame {
        Frame { command: command.to_string(), ..Frame::default() }
    }

    pub fn header(mut self, name: &str, value: impl Into<String>) -> Frame {
        self.headers.push((name.to_string(), value.into()));
        self
    }

    pub fn with_body(mut self, body: Vec<u8>) -> Frame {
        self.body = body;
        self
    }

    /// The value of the first header named `name` (STOMP 1.2: the first occurrence wins).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// The frame on the wire. CONNECT and CONNECTED headers are not escaped (STOMP 1.2); the
    /// body length always goes in `content-length`, so bodies may hold NUL bytes.
    pub fn encode(&self) -> Vec<u8> {
        let escape = !matches!(self.command.as_str(), "CONNECT" | "STOMP" | "CONNECTED");
        let mut out = Vec::with_capacity(self.command.len() + 64 + self.body.len());
        out.extend_from_slice(self.command.as_bytes());
        out.push(b'\n');
        for (k, v) in &self.headers {
            if k == "content-length" {
                continue;
            }
            put_header_part(&mut out, k, escape);
            out.push(b':');
            put_header_part(&mut out, v, escape);
            out.push(b'\n');
        }
        if !self.body.is_empty() || matches!(self.command.as_str(), "SEND" | "MESSAGE") {
            out.extend_from_slice(format!("content-length:{}\n", self.body.len()).as_bytes());
        }
        out.push(b'\n');
        out.extend_from_slice(&self.body);
        out.push(0);
        out
    }
}

fn put_header_part(out: &mut Vec<u8>, s: &str, escape: bool) {
    if !escape {
        // Unescaped frames cannot carry these: they would end the line or the name.
        for b in s.bytes() {
            out.push(if b == b'\n' || b == b'\r' { b' ' } else { b });
        }
        return;
    }
    for b in s.bytes() {
        match b {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b':' => out.extend_from_slice(b"\\c"),
            other => out.push(other),
        }
    }
}

/// Undoes the 1.2 escapes; an undefined escape is an error (the spec says so).
pub fn unescape(s: &[u8]) -> Result<String, String> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'\\' {
            match s.get(i + 1) {
                Some(b'n') => out.push(b'\n'),
                Some(b'r') => out.push(b'\r'),
                Some(b'c') => out.push(b':'),
                Some(b'\\') => out.push(b'\\'),
                Some(other) => return Err(format!("undefined escape \\{} in a header", *other as char)),
                None => return Err("a header ends with a lone backslash".to_string()),
            }
            i += 2;
        } else {
            out.push(s[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "a header is not UTF-8".to_string())
}

/// The bounds of what one frame may be.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The command line and headers together, in bytes.
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub max_body: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits { max_header_bytes: 64 << 10, max_headers: 256, max_body: 16 << 20 }
    }
}

/// What the decoder hands out.
#[derive(Debug, PartialEq)]
pub enum Decoded {
    Frame(Frame),
    /// A lone end of line between frames: the peer's heart-beat.
    HeartBeat,
}

/// Decodes frames from bytes as they arrive. Errors are fatal to the stream (it cannot be
/// resynchronised); an oversized body is not an error: the frame comes out with `oversized` set
/// and its body is skipped as it arrives.
pub struct Decoder {
    limits: Limits,
    buf: Vec<u8>,
    /// What to drop of a skipped body.
    skip: Skip,
    /// The head of the frame whose body is still arriving (parsed once).
    head: Option<Head>,
    /// How far `buf` has been searched, for the end of the head or the body's NUL, so that a
    /// frame arriving in many reads is not searched again from its start each time.
    scanned: usize,
    /// Heart-beats taken off the buffer and not yet handed out.
    beats: usize,
}

#[derive(Debug)]
struct Head {
    command: String,
    headers: Vec<(String, String)>,
    length: Option<usize>,
    body_start: usize,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Skip {
    No,
    Bytes(usize),
    ToNul,
}

impl Decoder {
    pub fn new(limits: Limits) -> Decoder {
        Decoder { limits, buf: Vec::new(), skip: Skip::No, head: None, scanned: 0, beats: 0 }
    }

    /// Adds bytes read from the peer.
    pub fn extend(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete frame, `Ok(None)` when more bytes are needed.
    pub fn decode(&mut self) -> Result<Option<Decoded>, String> {
        match self.skip {
            Skip::No => {}
            Skip::Bytes(n) => {
                let take = n.min(self.buf.len());
                self.buf.drain(..take);
                if take < n {
                    self.skip = Skip::Bytes(n - take);
                    return Ok(None);
                }
                self.skip = Skip::No;
            }
            Skip::ToNul => match self.buf.iter().position(|&b| b == 0) {
                Some(i) => {
                    self.buf.drain(..=i);
                    self.skip = Skip::No;
                }
                None => {
                    self.buf.clear();
                    return Ok(None);
                }
            },
        }
        // Heart-beats: end-of-lines between frames (a frame whose body is pending starts with
        // its command, never with an end of line). A run of them is taken off the buffer at
        // once and handed out one by one: removing them one at a time from the front would cost
        // the whole buffer per end of line (quadratic in a read full of them).
        if self.beats == 0 {
            let mut i = 0;
            while i < self.buf.len() {
                if self.buf[i] == b'\n' {
                    i += 1;
                } else if self.buf[i] == b'\r' && self.buf.get(i + 1) == Some(&b'\n') {
                    i += 2;
                } else {
                    break;
                }
                self.beats += 1;
            }
            if i > 0 {
                self.buf.drain(..i);
                self.scanned = 0;
            }
        }
        if self.beats > 0 {
            self.beats -= 1;
            return Ok(Some(Decoded::HeartBeat));
        }
        if self.buf.len() == 1 && self.buf[0] == b'\r' {
            return Ok(None);
        }
        self.frame()
    }

    fn frame(&mut self) -> Result<Option<Decoded>, String> {
        if self.head.is_none() {
            match self.head()? {
                Some(h) => {
                    self.scanned = h.body_start;
                    self.head = Some(h);
                }
                None => return Ok(None),
            }
        }
        let Some(head) = self.head.as_ref() else { return Ok(None) };
        let body_start = head.body_start;
        let rest = self.buf.len() - body_start;
        let (end, oversized) = match head.length {
            Some(n) if n > self.limits.max_body => {
                self.skip = Skip::Bytes(n + 1);
                (body_start, Some(n))
            }
            Some(n) => {
                if rest < n + 1 {
                    return Ok(None);
                }
                if self.buf[body_start + n] != 0 {
                    return Err(format!("a {} frame's body of content-length {n} is not followed by NUL", head.command));
                }
                (body_start + n, None)
            }
            None => match self.buf[self.scanned..].iter().position(|&b| b == 0).map(|i| self.scanned + i) {
                // Without content-length the length is known only at the NUL, which may arrive
                // later: the frame says "over the limit" (max_body + 1, at least), the same
                // however the bytes arrived.
                Some(nul) if nul - body_start > self.limits.max_body => (nul, Some(self.limits.max_body + 1)),
                Some(nul) => (nul, None),
                None if rest > self.limits.max_body => {
                    self.skip = Skip::ToNul;
                    (self.buf.len(), Some(self.limits.max_body + 1))
                }
                None => {
                    self.scanned = self.buf.len();
                    return Ok(None);
                }
            },
        };
        let Some(head) = self.head.take() else { return Ok(None) };
        let body = if oversized.is_some() { Vec::new() } else { self.buf[body_start..end].to_vec() };
        // The NUL goes with the frame unless a skip is still to come.
        let consumed = if end < self.buf.len() && self.skip == Skip::No { end + 1 } else { end };
        self.buf.drain(..consumed.min(self.buf.len()));
        self.scanned = 0;
        Ok(Some(Decoded::Frame(Frame { command: head.command, headers: head.headers, body, oversized })))
    }

    /// Parses the command and headers once they are all here.
    fn head(&mut self) -> Result<Option<Head>, String> {
        let from = self.scanned.saturating_sub(2);
        let Some((head_len, body_start)) = find(&self.buf[from..], b"\n\n", b"\n\r\n").map(|(a, b)| (from + a, from + b)) else {
            // A head within the limit may still be waiting for the last bytes of its end
            // ("\n\r\n" is 3): only past those is it over, however the bytes arrive.
            if self.buf.len() > self.limits.max_header_bytes + 2 {
                return Err(format!("a frame's command and headers are over {} bytes", self.limits.max_header_bytes));
            }
            self.scanned = self.buf.len();
            return Ok(None);
        };
        if head_len > self.limits.max_header_bytes {
            return Err(format!("a frame's command and headers are over {} bytes", self.limits.max_header_bytes));
        }
        let head = &self.buf[..head_len];
        let mut lines = head.split(|&b| b == b'\n').map(|l| l.strip_suffix(b"\r").unwrap_or(l));
        let command = lines.next().unwrap_or_default();
        let command = std::str::from_utf8(command).map_err(|_| "a frame's command is not UTF-8".to_string())?.to_string();
        if command.is_empty() || !command.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(format!("not a STOMP command: {:?}", truncate(&command)));
        }
        // As the encoder: CONNECT, its alias STOMP, and CONNECTED are not escaped.
        let escaped = !matches!(command.as_str(), "CONNECT" | "STOMP" | "CONNECTED");
        let mut headers = Vec::new();
        for line in lines {
            if headers.len() >= self.limits.max_headers {
                return Err(format!("a {command} frame has over {} headers", self.limits.max_headers));
            }
            let Some(colon) = line.iter().position(|&b| b == b':') else {
                return Err(format!("a {command} frame has a header line without a colon"));
            };
            let (k, v) = (&line[..colon], &line[colon + 1..]);
            let (k, v) =
                if escaped { (unescape(k)?, unescape(v)?) } else { (String::from_utf8_lossy(k).into_owned(), String::from_utf8_lossy(v).into_owned()) };
            headers.push((k, v));
        }
        let length = match headers.iter().find(|(k, _)| k == "content-length") {
            Some((_, v)) => Some(v.trim().parse::<usize>().map_err(|_| format!("a {command} frame has content-length {:?}, not a number", truncate(v)))?),
            None => None,
        };
        Ok(Some(Head { command, headers, length, body_start }))
    }
}

/// Where the head ends: (length of the head without its final end of line, start of the body).
fn find(buf: &[u8], a: &[u8], b: &[u8]) -> Option<(usize, usize)> {
    let i = buf.windows(2).position(|w| w == a).map(|i| (i, i + 2));
    let j = buf.windows(3).position(|w| w == b).map(|j| (j, j + 3));
    match (i, j) {
        (Some(x), Some(y)) => Some(if x.0 <= y.0 { x } else { y }),
        (x, y) => x.or(y),
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(40).collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    fn frames(d: &mut Decoder) -> Vec<Frame> {
        let mut out = Vec::new();
        while let Some(x) = d.decode().unwrap() {
            if let Decoded::Frame(f) = x {
                out.push(f);
            }
        }
        out
    }

    /// CONNECT, STOMP and CONNECTED are not escaped, on either side: a backslash stays, and a
    /// line end (which such a frame cannot carry) is written as a space. Found by the
    /// stomp_frame fuzz target (a bare CR in a CONNECTED header).
    #[test]
    fn unescaped_frames_round_trip() {
        for command in ["CONNECT", "STOMP", "CONNECTED"] {
            let f = Frame::new(command).header("host", "a\\b\rc\nd");
            let mut d = Decoder::new(Limits::default());
            d.extend(&f.encode());
            let got = frames(&mut d);
            assert_eq!(got.len(), 1, "{command}");
            assert_eq!(got[0].get("host"), Some("a\\b c d"), "{command}");
        }
        let mut d = Decoder::new(Limits::default());
        d.extend(b"CONNECTED\nversion:1.2\rx\n\n\0");
        assert_eq!(frames(&mut d)[0].get("version"), Some("1.2\rx"));
    }

    #[test]
    fn headers_round_trip_with_the_escapes() {
        let f = Frame::new("SEND").header("a:b", "line\nnext\\back\rcr:colon").with_body(b"x".to_vec());
        let wire = f.encode();
        let text = String::from_utf8_lossy(&wire);
        assert!(text.contains("a\\cb:line\\nnext\\\\back\\rcr\\ccolon\n"), "{text}");
        let mut d = Decoder::new(Limits::default());
        d.extend(&wire);
        let got = frames(&mut d);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].get("a:b"), Some("line\nnext\\back\rcr:colon"));
        assert_eq!(got[0].body, b"x");
        assert!(unescape(b"bad\\t").unwrap_err().contains("undefined escape"));
        // CONNECTED headers are taken as they are.
        d.extend(b"CONNECTED\nserver:a\\cb\n\n\0");
        assert_eq!(frames(&mut d)[0].get("server"), Some("a\\cb"));
    }

    #[test]
    fn bodies_with_content_length_may_hold_nul_and_without_end_at_nul() {
        let f = Frame::new("MESSAGE").header("destination", "/queue/a").with_body(b"a\0b\0".to_vec());
        let mut d = Decoder::new(Limits::default());
        d.extend(&f.encode());
        d.extend(b"\n\r\nMESSAGE\r\nx:1\r\n\r\nplain\0");
        let mut got = Vec::new();
        let mut beats = 0;
        while let Some(x) = d.decode().unwrap() {
            match x {
                Decoded::Frame(f) => got.push(f),
                Decoded::HeartBeat => beats += 1,
            }
        }
        assert_eq!(beats, 2);
        assert_eq!(got[0].body, b"a\0b\0");
        assert_eq!(got[1].get("x"), Some("1"));
        assert_eq!(got[1].body, b"plain");
    }

    #[test]
    fn a_read_full_of_heart_beats_costs_linear_time() {
        let mut d = Decoder::new(Limits::default());
        d.extend(&vec![b'\n'; 4 << 20]);
        d.extend(b"\r\nRECEIPT\nreceipt-id:7\n\n\0");
        let started = std::time::Instant::now();
        let mut beats = 0;
        let mut frames = Vec::new();
        while let Some(x) = d.decode().unwrap() {
            match x {
                Decoded::HeartBeat => beats += 1,
                Decoded::Frame(f) => frames.push(f),
            }
        }
        assert_eq!(beats, (4 << 20) + 1);
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].get("receipt-id"), Some("7"));
        // One pass over the buffer, not one per end of line (which took minutes).
        assert!(started.elapsed() < std::time::Duration::from_secs(10), "{:?}", started.elapsed());
    }

    #[test]
    fn split_reads_at_every_offset_give_the_same_frames() {
        let mut wire = Frame::new("MESSAGE").header("k", "v:\n").with_body(b"bo\0dy".to_vec()).encode();
        wire.extend_from_slice(b"\n");
        wire.extend_from_slice(b"ERROR\r\nmessage:m\r\n\r\ntext\0");
        let mut whole = Decoder::new(Limits::default());
        whole.extend(&wire);
        let want = frames(&mut whole);
        assert_eq!(want.len(), 2);
        for cut in 0..=wire.len() {
            let mut d = Decoder::new(Limits::default());
            d.extend(&wire[..cut]);
            let mut got = frames(&mut d);
            d.extend(&wire[cut..]);
            got.extend(frames(&mut d));
            assert_eq!(got, want, "cut at {cut}");
        }
        // One byte at a time.
        let mut d = Decoder::new(Limits::default());
        let mut got = Vec::new();
        for b in &wire {
            d.extend(std::slice::from_ref(b));
            got.extend(frames(&mut d));
        }
        assert_eq!(got, want);
    }

    #[test]
    fn limits_refuse_big_heads_and_skip_big_bodies() {
        let limits = Limits { max_header_bytes: 100, max_headers: 3, max_body: 8 };
        let mut d = Decoder::new(limits);
        d.extend(format!("MESSAGE\nk:{}\n", "v".repeat(200)).as_bytes());
        assert!(d.decode().unwrap_err().contains("over 100 bytes"));
        let mut d = Decoder::new(limits);
        d.extend(b"MESSAGE\na:1\nb:2\nc:3\nd:4\n\n\0");
        assert!(d.decode().unwrap_err().contains("over 3 headers"));
        let mut d = Decoder::new(limits);
        d.extend(b"MESSAGE\ncontent-length:x\n\n\0");
        assert!(d.decode().unwrap_err().contains("not a number"));
        let mut d = Decoder::new(limits);
        d.extend(b"hello\n\n\0");
        assert!(d.decode().unwrap_err().contains("not a STOMP command"));

        // Oversized with and without content-length, arriving in pieces: each comes out marked,
        // and the frame after it is intact.
        for wire in
            [Frame::new("MESSAGE").header("id", "1").with_body(vec![b'x'; 20]).encode(), [b"MESSAGE\nid:1\n\n".to_vec(), vec![b'x'; 20], vec![0]].concat()]
        {
            let wire = [wire, Frame::new("MESSAGE").header("id", "2").with_body(b"small".to_vec()).encode()].concat();
            for cut in 0..=wire.len() {
                let mut d = Decoder::new(limits);
                d.extend(&wire[..cut]);
                let mut got = frames(&mut d);
                d.extend(&wire[cut..]);
                got.extend(frames(&mut d));
                assert_eq!(got.len(), 2, "cut at {cut}: {got:?}");
                assert_eq!(got[0].get("id"), Some("1"));
                assert!(got[0].oversized.is_some() && got[0].body.is_empty());
                assert_eq!(got[1].body, b"small");
                assert_eq!(got[1].oversized, None);
            }
        }
    }

    /// A big body in small reads is searched once, not again from its start at every read
    /// (8 MiB in 4 KiB reads would be some 8 GB of searching otherwise).
    #[test]
    fn a_big_body_in_small_reads_is_decoded_in_linear_time() {
        let body = vec![b'y'; 8 << 20];
        for wire in [[b"MESSAGE\nk:v\n\n".to_vec(), body.clone(), vec![0]].concat(), Frame::new("MESSAGE").with_body(body.clone()).encode()] {
            let started = std::time::Instant::now();
            let mut d = Decoder::new(Limits { max_body: 16 << 20, ..Limits::default() });
            let mut got = Vec::new();
            for chunk in wire.chunks(4096) {
                d.extend(chunk);
                got.extend(frames(&mut d));
            }
            assert_eq!(got.len(), 1);
            assert_eq!(got[0].body.len(), body.len());
            assert!(started.elapsed() < std::time::Duration::from_secs(5), "{:?}", started.elapsed());
        }
    }
}
