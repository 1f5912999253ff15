//! What the smtp interface reads from a client, without I/O (so that the fuzz target
//! `smtp_session` drives it as the session does): command lines with a length limit, the
//! commands and their arguments, and the DATA decoder (dot-unstuffing, end of data, bare line
//! ends, the size limit). See docs/decisions/136-mail-in.md.

/// One command line taken from the input buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    /// A whole line, without its end (`\r\n` or a bare `\n`).
    Line(Vec<u8>),
    /// A line longer than the limit: it has been skipped up to its end.
    TooLong,
}

/// Splits command lines off an input buffer; a line over `max` is skipped up to its end, so an
/// endless line costs a bounded buffer.
#[derive(Debug, Default)]
pub struct Lines {
    /// Skipping the rest of a line that went over the limit.
    skipping: bool,
}

impl Lines {
    /// The next line of `buf` (taken out of it), or `None` when it holds no whole line yet. When
    /// `None` is returned and `buf` is longer than `max` + 1, it has been emptied (the line is being
    /// skipped) and the next complete line is reported as `TooLong`.
    pub fn next(&mut self, buf: &mut Vec<u8>, max: usize) -> Option<Line> {
        match buf.iter().position(|b| *b == b'\n') {
            Some(at) => {
                let mut line: Vec<u8> = buf.drain(..=at).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                if std::mem::take(&mut self.skipping) || line.len() > max {
                    return Some(Line::TooLong);
                }
                Some(Line::Line(line))
            }
            None => {
                // One byte more: the CR of a line of exactly `max` bytes may wait for its LF.
                // While skipping, nothing of the line is kept.
                if self.skipping || buf.len() > max + 1 {
                    buf.clear();
                    self.skipping = true;
                }
                None
            }
        }
    }
}

/// The parameters of MAIL or RCPT: name (upper case) and value.
pub type Params = Vec<(String, Option<String>)>;

/// An SMTP command (RFC 5321 4.1), its argument as sent.
#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    Ehlo(String),
    Helo(String),
    /// The reverse path (empty for `<>`) and the parameters.
    Mail(String, Params),
    Rcpt(String, Params),
    Data,
    Rset,
    Noop,
    Quit,
    Vrfy,
    Expn,
    Help,
    StartTls,
    /// A command we know but do not offer (AUTH, BDAT, ...).
    NotOffered(String),
    Unknown(String),
    /// A known command with arguments it cannot have, with the reason.
    Syntax(&'static str),
}

/// The longest path (RFC 5321 4.5.3.1.3).
pub const MAX_PATH: usize = 256;

/// Reads one command line.
pub fn parse(line: &[u8]) -> Command {
    let text = String::from_utf8_lossy(line);
    let text = text.trim_end();
    let (verb, rest) = match text.find(' ') {
        Some(at) => (&text[..at], text[at + 1..].trim_start()),
        None => (text, ""),
    };
    let verb = verb.to_ascii_uppercase();
    let no_args = |c: Command| if rest.is_empty() { c } else { Command::Syntax("this command takes no arguments") };
    match verb.as_str() {
        "EHLO" | "HELO" if rest.is_empty() => Command::Syntax("a domain or address literal is required"),
        "EHLO" => Command::Ehlo(rest.to_string()),
        "HELO" => Command::Helo(rest.to_string()),
        "MAIL" => match path_after(rest, "FROM:") {
            Ok((path, params)) => Command::Mail(path, params),
            Err(e) => Command::Syntax(e),
        },
        "RCPT" => match path_after(rest, "TO:") {
            Ok((path, _)) if path.is_empty() => Command::Syntax("an empty forward path"),
            Ok((path, params)) => Command::Rcpt(path, params),
            Err(e) => Command::Syntax(e),
        },
        "DATA" => no_args(Command::Data),
        "RSET" => no_args(Command::Rset),
        // NOOP and HELP may carry a string, which is ignored.
        "NOOP" => Command::Noop,
        "HELP" => Command::Help,
        "QUIT" => no_args(Command::Quit),
        "VRFY" => Command::Vrfy,
        "EXPN" => Command::Expn,
        "STARTTLS" => no_args(Command::StartTls),
        "AUTH" | "BDAT" | "TURN" | "ETRN" | "ATRN" | "SEND" | "SOML" | "SAML" => Command::NotOffered(verb),
        _ => Command::Unknown(verb.chars().take(16).collect()),
    }
}

/// `FROM:<path> PARAM=VALUE ...`: the path between the angle brackets and the parameters.
fn path_after(rest: &str, keyword: &str) -> Result<(String, Params), &'static str> {
    let Some(head) = rest.get(..keyword.len()) else { return Err("syntax: MAIL FROM:<address> or RCPT TO:<address>") };
    if !head.eq_ignore_ascii_case(keyword) {
        return Err("syntax: MAIL FROM:<address> or RCPT TO:<address>");
    }
    // A space after the colon is against the grammar but common; it is allowed.
    let rest = rest[keyword.len()..].trim_start();
    let Some(after) = rest.strip_prefix('<') else { return Err("the address must be in angle brackets") };
    let Some(end) = after.find('>') else { return Err("the address must be in angle brackets") };
    let mut path = &after[..end];
    if path.len() > MAX_PATH {
        return Err("the address is too long");
    }
    // A source route (@a,@b:user@c) is ignored, as RFC 5321 4.1.1.3 lets a server do.
    if path.starts_with('@') {
        path = path.split_once(':').map(|(_, p)| p).unwrap_or("");
    }
    if path.chars().any(|c| c.is_control() || c == ' ' || c == '<') {
        return Err("the address holds characters it cannot have");
    }
    let params = after[end + 1..]
        .split_ascii_whitespace()
        .take(16)
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (k.to_ascii_uppercase(), Some(v.to_string())),
            None => (p.to_ascii_uppercase(), None),
        })
        .collect();
    Ok((path.to_string(), params))
}

/// Where the DATA decoder is within the current line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum At {
    /// Right after CRLF (or at the start of the data).
    LineStart,
    /// A dot first on the line.
    Dot,
    /// A dot first on the line, then CR.
    DotCr,
    /// Inside a line.
    Inside,
    /// After a CR inside a line.
    Cr,
}

/// What feeding bytes to the decoder came to.
#[derive(Debug, PartialEq, Eq)]
pub enum Fed {
    /// All of the input was taken; the data goes on.
    More,
    /// The end of data (`CRLF.CRLF`) was reached after this many bytes of the input; what
    /// follows belongs to the next command.
    End(usize),
}

/// Decodes the DATA of one message: removes the stuffed dots, ends at `CRLF.CRLF` only (a bare
/// LF or CR never ends the data: one reading on both sides of a relay, so that no second
/// message can be smuggled in), turns a bare LF into CRLF, and keeps at most `max` bytes
/// (counting on, to say by how much a message was over).
#[derive(Debug)]
pub struct DataDecoder {
    at: At,
    max: usize,
    out: Vec<u8>,
    /// Bytes of the message, kept or not.
    pub size: usize,
}

impl DataDecoder {
    pub fn new(max: usize) -> DataDecoder {
        DataDecoder { at: At::LineStart, max, out: Vec::new(), size: 0 }
    }

    /// Whether the message went over the limit.
    pub fn over(&self) -> bool {
        self.size > self.max
    }

    /// The message (only meaningful when not [`over`](Self::over)).
    pub fn into_message(self) -> Vec<u8> {
        self.out
    }

    fn emit(&mut self, bytes: &[u8]) {
        self.size += bytes.len();
        if self.size <= self.max {
            self.out.extend_from_slice(bytes);
        } else if !self.out.is_empty() {
            self.out = Vec::new();
        }
    }

    /// Takes `input`; see [`Fed`].
    pub fn feed(&mut self, input: &[u8]) -> Fed {
        for (i, &b) in input.iter().enumerate() {
            self.at = match (self.at, b) {
                (At::LineStart, b'.') => At::Dot,
                (At::Dot, b'\r') => At::DotCr,
                (At::DotCr, b'\n') => return Fed::End(i + 1),
                // ".\rX": the stuffed dot goes, the CR stays.
                (At::DotCr, _) => {
                    self.emit(b"\r");
                    self.byte(b)
                }
                // A dot first on a line is removed, whatever follows (RFC 5321 4.5.2).
                (At::Dot, _) | (At::LineStart, _) | (At::Inside, _) => self.byte(b),
                (At::Cr, b'\n') => {
                    self.emit(b"\r\n");
                    At::LineStart
                }
                (At::Cr, b'\r') => {
                    self.emit(b"\r");
                    At::Cr
                }
                (At::Cr, _) => {
                    self.emit(b"\r");
                    self.byte(b)
                }
            };
        }
        Fed::More
    }

    /// A byte inside a line.
    fn byte(&mut self, b: u8) -> At {
        match b {
            b'\r' => At::Cr,
            b'\n' => {
                self.emit(b"\r\n");
                At::Inside
            }
            _ => {
                self.emit(&[b]);
                At::Inside
            }
        }
    }
}

/// What a client sends for `message` after DATA: bare LFs made CRLF, lines starting with a dot
/// stuffed, and the end `.\r\n` (the inverse of [`DataDecoder`], for tests and the fuzz target).
pub fn stuff(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + 8);
    let mut line_start = true;
    let mut prev = 0u8;
    for &b in message {
        if b == b'\n' && prev != b'\r' {
            out.push(b'\r');
        }
        if line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        line_start = b == b'\n';
        prev = b;
    }
    if !(out.is_empty() || out.ends_with(b"\r\n")) {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(input: &[u8]) -> (Vec<u8>, Fed) {
        let mut d = DataDecoder::new(1 << 20);
        let fed = d.feed(input);
        (d.into_message(), fed)
    }

    #[test]
    fn dots_are_unstuffed_and_the_end_found() {
        let (m, fed) = decode(b"a\r\n..b\r\n.c\r\n.\r\nQUIT\r\n");
        assert_eq!(m, b"a\r\n.b\r\nc\r\n");
        assert_eq!(fed, Fed::End(15));
        assert_eq!(decode(b".\r\n"), (Vec::new(), Fed::End(3)));
    }

    #[test]
    fn only_crlf_dot_crlf_ends_the_data() {
        // The smuggling shapes: a bare LF before or after the dot does not end anything.
        let input = b"a\n.\nMAIL FROM:<x>\r\nb\r\n.\n.\r\n";
        assert_eq!(decode(input).1, Fed::More);
        let input = b"a\n.\nMAIL FROM:<x>\r\nb\r\n.\n\r\n.\r\n";
        let (m, fed) = decode(input);
        assert_eq!(fed, Fed::End(input.len()));
        assert_eq!(m, b"a\r\n.\r\nMAIL FROM:<x>\r\nb\r\n\r\n\r\n");
        let (_, fed) = decode(b"a\r\n.\rx\r\n");
        assert_eq!(fed, Fed::More);
    }

    #[test]
    fn split_input_decodes_the_same() {
        let input = b"x\r\n..y\r\n\r\n.\r\n";
        let mut d = DataDecoder::new(100);
        let mut end = None;
        for (i, b) in input.iter().enumerate() {
            if let Fed::End(n) = d.feed(std::slice::from_ref(b)) {
                end = Some(i + n);
            }
        }
        assert_eq!(end, Some(input.len()));
        assert_eq!(d.into_message(), b"x\r\n.y\r\n\r\n");
    }

    #[test]
    fn stuffing_round_trips() {
        for m in [&b"hello\r\n.dot\r\n..two\r\n"[..], b".", b"", b"no end", b"\r\n.\r\n"] {
            let mut d = DataDecoder::new(100);
            assert_eq!(d.feed(&stuff(m)), Fed::End(stuff(m).len()), "{m:?}");
            let mut want = String::from_utf8_lossy(m).into_owned();
            if !(want.is_empty() || want.ends_with("\r\n")) {
                want.push_str("\r\n");
            }
            assert_eq!(String::from_utf8_lossy(&d.into_message()), want);
        }
    }

    #[test]
    fn the_size_limit_counts_on_and_keeps_nothing() {
        let mut d = DataDecoder::new(4);
        assert_eq!(d.feed(b"123456\r\n.\r\n"), Fed::End(11));
        assert!(d.over());
        assert_eq!(d.size, 8);
        assert!(d.into_message().is_empty());
    }

    #[test]
    fn commands_are_read() {
        assert_eq!(
            parse(b"mail from:<a@b> SIZE=10 BODY=8BITMIME"),
            Command::Mail("a@b".into(), vec![("SIZE".into(), Some("10".into())), ("BODY".into(), Some("8BITMIME".into()))])
        );
        assert_eq!(parse(b"MAIL FROM: <>"), Command::Mail(String::new(), vec![]));
        assert_eq!(parse(b"RCPT TO:<@r1,@r2:u@d>"), Command::Rcpt("u@d".into(), vec![]));
        assert!(matches!(parse(b"RCPT TO:<>"), Command::Syntax(_)));
        assert!(matches!(parse(b"MAIL FROM:a@b"), Command::Syntax(_)));
        assert!(matches!(parse(b"MAIL"), Command::Syntax(_)));
        assert!(matches!(parse(b"DATA now"), Command::Syntax(_)));
        assert!(matches!(parse(b"EHLO"), Command::Syntax(_)));
        assert_eq!(parse(b"ehlo client.example"), Command::Ehlo("client.example".into()));
        assert_eq!(parse(b"XYZZY"), Command::Unknown("XYZZY".into()));
        assert_eq!(parse(b"AUTH PLAIN x"), Command::NotOffered("AUTH".into()));
    }

    /// The fuzz target's properties over many small inputs made of the bytes that matter.
    #[test]
    fn split_invariance_and_round_trip_over_small_inputs() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..20_000 {
            let len = (next() % 24) as usize;
            let input: Vec<u8> = (0..len).map(|_| b"\r\n.a"[(next() % 4) as usize]).collect();
            let cut = (next() as usize) % (len + 1);
            let max = 2 + (next() % 8) as usize;
            // Lines: the same however the bytes arrive, the buffer within max + 1.
            let run = |cuts: &[usize]| {
                let mut l = Lines::default();
                let (mut buf, mut out, mut start) = (Vec::new(), Vec::new(), 0);
                for end in cuts.iter().copied().chain([input.len()]) {
                    buf.extend_from_slice(&input[start..end]);
                    start = end;
                    while let Some(line) = l.next(&mut buf, max) {
                        out.push(line);
                    }
                    assert!(buf.len() <= max + 1);
                }
                (out, buf)
            };
            assert_eq!(run(&[]), run(&[cut]), "lines of {input:?} cut at {cut}");
            // DATA: the same end and message however the bytes arrive.
            let data = |cuts: &[usize]| {
                let mut d = DataDecoder::new(max * 2);
                let mut start = 0;
                for end in cuts.iter().copied().chain([input.len()]) {
                    if let Fed::End(n) = d.feed(&input[start..end]) {
                        return (Some(start + n), d.over(), d.into_message());
                    }
                    start = end;
                }
                (None, d.over(), d.into_message())
            };
            let whole = data(&[]);
            assert_eq!(whole, data(&[cut]), "DATA {input:?} cut at {cut}");
            if let (Some(n), _, _) = whole {
                assert!(input[..n].ends_with(b"\r\n.\r\n") || n == 3, "{input:?} ended at {n}");
            }
            // Stuffed, the input decodes back to itself with bare LFs made CRLF.
            let stuffed = stuff(&input);
            let mut d = DataDecoder::new(1 << 20);
            assert_eq!(d.feed(&stuffed), Fed::End(stuffed.len()), "{input:?} stuffed {stuffed:?}");
            let mut want = Vec::new();
            let mut prev = 0u8;
            for &b in &input {
                if b == b'\n' && prev != b'\r' {
                    want.push(b'\r');
                }
                want.push(b);
                prev = b;
            }
            if !(want.is_empty() || want.ends_with(b"\r\n")) {
                want.extend_from_slice(b"\r\n");
            }
            assert_eq!(d.into_message(), want, "{input:?} stuffed {stuffed:?}");
        }
    }

    #[test]
    fn long_lines_are_skipped_with_a_bounded_buffer() {
        let mut l = Lines::default();
        let mut buf = vec![b'x'; 100];
        assert_eq!(l.next(&mut buf, 10), None);
        assert!(buf.is_empty());
        buf.extend_from_slice(b"yyy\r\nNOOP\r\n");
        assert_eq!(l.next(&mut buf, 10), Some(Line::TooLong));
        assert_eq!(l.next(&mut buf, 10), Some(Line::Line(b"NOOP".to_vec())));
        assert_eq!(l.next(&mut buf, 10), None);
    }
}
