//! `multipart/form-data` request bodies (RFC 7578), read as they arrive: fields into memory
//! within `max_body_size`, files into temporary files within `max_upload_size`, deleted when
//! the request ends.
//!
//! The parser is incremental and owns no I/O: [`Parser::push`] takes bytes in any split and
//! [`Parser::next`] gives events, so the same code serves HTTP/1 (our reader), HTTP/2 (hyper's
//! frames) and the fuzz target.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::AsyncWriteExt;

/// Most parts in one body, and the longest head of one part.
const MAX_PARTS: usize = 1000;
const MAX_PART_HEAD: usize = 8 << 10;
/// Whitespace allowed after a boundary before its CRLF (RFC 2046 transport padding).
const MAX_PADDING: usize = 64;

/// Why a multipart body was refused: 400 for a malformed one, 413 for one over a limit.
#[derive(Debug, PartialEq)]
pub enum MultipartError {
    Malformed(String),
    TooLarge(String),
    /// A temporary file could not be written (the server's fault: 500).
    Storage(String),
}

impl std::fmt::Display for MultipartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MultipartError::Malformed(m) => write!(f, "malformed multipart body: {m}"),
            MultipartError::TooLarge(m) | MultipartError::Storage(m) => write!(f, "{m}"),
        }
    }
}

/// The boundary of a `multipart/form-data` content type; None for any other type, Err for a
/// multipart type without a usable boundary.
pub fn boundary(content_type: &str) -> Option<Result<Vec<u8>, MultipartError>> {
    let mut params = content_type.split(';');
    let essence = params.next().unwrap_or("").trim();
    if !essence.eq_ignore_ascii_case("multipart/form-data") {
        return None;
    }
    for p in params {
        let Some((k, v)) = p.split_once('=') else { continue };
        if !k.trim().eq_ignore_ascii_case("boundary") {
            continue;
        }
        let v = v.trim();
        let v = v.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(v);
        if v.is_empty() || v.len() > 70 {
            return Some(Err(MultipartError::Malformed("the boundary must be 1 to 70 characters".into())));
        }
        return Some(Ok(v.as_bytes().to_vec()));
    }
    Some(Err(MultipartError::Malformed("multipart/form-data without a boundary parameter".into())))
}

/// What the parser found next.
#[derive(Debug, PartialEq)]
pub enum Event {
    /// A part begins: its field name, file name (for a file) and content type.
    Part { name: String, filename: Option<String>, content_type: Option<String> },
    /// Bytes of the current part.
    Data(Vec<u8>),
    /// The closing boundary: nothing more follows (an epilogue is ignored).
    End,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    /// Before the first boundary.
    Preamble,
    /// Right after a boundary: `--` ends the body, padding and CRLF start a part.
    AfterBoundary,
    Head,
    Body,
    End,
}

/// An incremental multipart parser.
pub struct Parser {
    /// CRLF `--` boundary: what ends a part's data.
    delimiter: Vec<u8>,
    pending: Vec<u8>,
    state: State,
    parts: usize,
}

impl Parser {
    pub fn new(boundary: &[u8]) -> Parser {
        let mut delimiter = b"\r\n--".to_vec();
        delimiter.extend_from_slice(boundary);
        // The first boundary need not follow a CRLF: start as if one came before the body.
        Parser { delimiter, pending: b"\r\n".to_vec(), state: State::Preamble, parts: 0 }
    }

    pub fn push(&mut self, data: &[u8]) {
        self.pending.extend_from_slice(data);
    }

    /// The next event from what was pushed; None when more input is needed.
    pub fn next(&mut self) -> Result<Option<Event>, MultipartError> {
        loop {
            match self.state {
                State::Preamble => match find(&self.pending, &self.delimiter) {
                    Some(at) => {
                        self.pending.drain(..at + self.delimiter.len());
                        self.state = State::AfterBoundary;
                    }
                    None => {
                        // Keep only what could be the start of the delimiter.
                        let keep = self.delimiter.len() - 1;
                        if self.pending.len() > keep {
                            self.pending.drain(..self.pending.len() - keep);
                        }
                        return Ok(None);
                    }
                },
                State::AfterBoundary => {
                    if self.pending.len() < 2 {
                        return Ok(None);
                    }
                    if self.pending.starts_with(b"--") {
                        self.state = State::End;
                        self.pending = Vec::new();
                        return Ok(Some(Event::End));
                    }
                    let padding = self.pending.iter().take_while(|b| **b == b' ' || **b == b'\t').count();
                    if padding > MAX_PADDING {
                        return Err(MultipartError::Malformed("a boundary line goes on past the boundary".into()));
                    }
                    if self.pending.len() < padding + 2 {
                        return Ok(None);
                    }
                    if &self.pending[padding..padding + 2] != b"\r\n" {
                        return Err(MultipartError::Malformed("a boundary is not followed by CRLF".into()));
                    }
                    self.pending.drain(..padding + 2);
                    self.parts += 1;
                    if self.parts > MAX_PARTS {
                        return Err(MultipartError::TooLarge(format!("more than {MAX_PARTS} parts in a multipart body")));
                    }
                    self.state = State::Head;
                }
                State::Head => {
                    let end = if self.pending.starts_with(b"\r\n") { Some(0) } else { find(&self.pending, b"\r\n\r\n").map(|i| i + 2) };
                    let Some(end) = end else {
                        if self.pending.len() > MAX_PART_HEAD {
                            return Err(MultipartError::TooLarge(format!("a part's head is over {MAX_PART_HEAD} bytes")));
                        }
                        return Ok(None);
                    };
                    if end > MAX_PART_HEAD {
                        return Err(MultipartError::TooLarge(format!("a part's head is over {MAX_PART_HEAD} bytes")));
                    }
                    let part = part_head(&self.pending[..end + 2])?;
                    self.pending.drain(..end + 2);
                    self.state = State::Body;
                    return Ok(Some(part));
                }
                State::Body => match find(&self.pending, &self.delimiter) {
                    Some(at) => {
                        let data: Vec<u8> = self.pending.drain(..at).collect();
                        self.pending.drain(..self.delimiter.len());
                        self.state = State::AfterBoundary;
                        if !data.is_empty() {
                            return Ok(Some(Event::Data(data)));
                        }
                    }
                    None => {
                        let keep = self.delimiter.len() - 1;
                        if self.pending.len() <= keep {
                            return Ok(None);
                        }
                        let data: Vec<u8> = self.pending.drain(..self.pending.len() - keep).collect();
                        return Ok(Some(Event::Data(data)));
                    }
                },
                State::End => {
                    self.pending.clear();
                    return Ok(None);
                }
            }
        }
    }

    /// Whether the closing boundary has been seen.
    pub fn ended(&self) -> bool {
        self.state == State::End
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    memchr::memmem::find(haystack, needle)
}

/// A part's head (its header lines and the empty line after them) as a [`Event::Part`].
fn part_head(head: &[u8]) -> Result<Event, MultipartError> {
    let mut headers = [httparse::EMPTY_HEADER; 16];
    let parsed = match httparse::parse_headers(head, &mut headers) {
        Ok(httparse::Status::Complete((_, h))) => h,
        Ok(httparse::Status::Partial) => return Err(MultipartError::Malformed("a part's head is incomplete".into())),
        Err(e) => return Err(MultipartError::Malformed(format!("a part's head: {e}"))),
    };
    let mut disposition = None;
    let mut content_type = None;
    for h in parsed.iter() {
        let value = String::from_utf8_lossy(h.value).into_owned();
        if h.name.eq_ignore_ascii_case("content-disposition") {
            disposition = Some(value);
        } else if h.name.eq_ignore_ascii_case("content-type") {
            content_type = Some(value);
        }
    }
    let Some(disposition) = disposition else {
        return Err(MultipartError::Malformed("a part has no content-disposition".into()));
    };
    let (kind, params) = disposition_params(&disposition)?;
    if !kind.eq_ignore_ascii_case("form-data") {
        return Err(MultipartError::Malformed(format!("a part's content-disposition is {kind:?}, not form-data")));
    }
    let mut name = None;
    let mut filename = None;
    for (k, v) in params {
        if k.eq_ignore_ascii_case("name") {
            name = Some(v);
        } else if k.eq_ignore_ascii_case("filename") {
            filename = Some(v);
        }
    }
    let Some(name) = name else {
        return Err(MultipartError::Malformed("a part's content-disposition has no name".into()));
    };
    Ok(Event::Part { name, filename, content_type })
}

/// `form-data; name="a"; filename="b \"c\".txt"` into its type and parameters.
fn disposition_params(text: &str) -> Result<(String, Vec<(String, String)>), MultipartError> {
    let bad = || MultipartError::Malformed(format!("a part's content-disposition cannot be read: {:?}", text.chars().take(100).collect::<String>()));
    let (kind, mut rest) = match text.find(';') {
        Some(i) => (text[..i].trim(), &text[i + 1..]),
        None => (text.trim(), ""),
    };
    let mut params = Vec::new();
    loop {
        rest = rest.trim_start_matches([' ', '\t', ';']);
        if rest.is_empty() {
            break;
        }
        let eq = rest.find('=').ok_or_else(bad)?;
        let key = rest[..eq].trim().to_string();
        rest = rest[eq + 1..].trim_start();
        let value;
        if let Some(quoted) = rest.strip_prefix('"') {
            let mut v = String::new();
            let mut chars = quoted.char_indices();
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, n)) = chars.next() {
                            v.push(n);
                        }
                    }
                    '"' => {
                        end = Some(i);
                        break;
                    }
                    c => v.push(c),
                }
            }
            let end = end.ok_or_else(bad)?;
            value = v;
            rest = &quoted[end + 1..];
        } else {
            let end = rest.find(';').unwrap_or(rest.len());
            value = rest[..end].trim().to_string();
            rest = &rest[end..];
        }
        params.push((key, value));
    }
    Ok((kind.to_string(), params))
}

/// A file received in a multipart body, in a temporary file of its own.
#[derive(Debug)]
pub(crate) struct UploadedFile {
    pub(crate) field: String,
    pub(crate) filename: String,
    pub(crate) content_type: Option<String>,
    pub(crate) path: PathBuf,
    pub(crate) size: u64,
}

/// What a multipart body held. The files are deleted when this goes (the request ended).
#[derive(Debug, Default)]
pub(crate) struct Uploads {
    pub(crate) fields: Vec<(String, Vec<u8>)>,
    pub(crate) files: Vec<UploadedFile>,
}

impl Drop for Uploads {
    fn drop(&mut self) {
        for f in &self.files {
            let _ = std::fs::remove_file(&f.path);
        }
    }
}

/// Unique names for temporary files within this process.
static NEXT_FILE: AtomicU64 = AtomicU64::new(0);

/// Reads a multipart body's events into [`Uploads`] within the limits.
pub(crate) struct Collector {
    parser: Parser,
    uploads: Uploads,
    /// The field being read, or the file being written.
    current: Option<Current>,
    /// Bytes of fields so far, and their limit (max_body_size).
    field_bytes: u64,
    max_fields: u64,
    /// Bytes of the whole body so far, and its limit (max_upload_size).
    total: u64,
    max_total: u64,
    dir: PathBuf,
}

enum Current {
    Field(String, Vec<u8>),
    File(tokio::fs::File),
}

impl Collector {
    pub(crate) fn new(boundary: &[u8], max_fields: u64, max_total: u64) -> Collector {
        Collector {
            parser: Parser::new(boundary),
            uploads: Uploads::default(),
            current: None,
            field_bytes: 0,
            max_fields,
            total: 0,
            max_total,
            dir: std::env::temp_dir(),
        }
    }

    /// Takes the next bytes of the body.
    pub(crate) async fn feed(&mut self, data: &[u8]) -> Result<(), MultipartError> {
        self.total += data.len() as u64;
        if self.total > self.max_total {
            return Err(MultipartError::TooLarge(format!("multipart body over the limit of {} bytes (max_upload_size)", self.max_total)));
        }
        self.parser.push(data);
        while let Some(event) = self.parser.next()? {
            self.take(event).await?;
        }
        Ok(())
    }

    async fn take(&mut self, event: Event) -> Result<(), MultipartError> {
        match event {
            Event::Part { name, filename, content_type } => {
                self.close().await?;
                match filename {
                    Some(filename) => {
                        let n = NEXT_FILE.fetch_add(1, Ordering::Relaxed);
                        let path = self.dir.join(format!("pmnc-upload-{}-{n}", std::process::id()));
                        // Recorded first, so that the file goes whatever happens next.
                        self.uploads.files.push(UploadedFile { field: name, filename, content_type, path: path.clone(), size: 0 });
                        let file = tokio::fs::OpenOptions::new()
                            .write(true)
                            .create_new(true)
                            .open(&path)
                            .await
                            .map_err(|e| MultipartError::Storage(format!("cannot create the upload file {}: {e}", path.display())))?;
                        self.current = Some(Current::File(file));
                    }
                    None => self.current = Some(Current::Field(name, Vec::new())),
                }
            }
            Event::Data(data) => match &mut self.current {
                Some(Current::Field(_, value)) => {
                    self.field_bytes += data.len() as u64;
                    if self.field_bytes > self.max_fields {
                        return Err(MultipartError::TooLarge(format!(
                            "the fields of a multipart body are over the limit of {} bytes (max_body_size)",
                            self.max_fields
                        )));
                    }
                    value.extend_from_slice(&data);
                }
                Some(Current::File(file)) => {
                    file.write_all(&data).await.map_err(|e| MultipartError::Storage(format!("cannot write an upload file: {e}")))?;
                    if let Some(f) = self.uploads.files.last_mut() {
                        f.size += data.len() as u64;
                    }
                }
                None => {}
            },
            Event::End => self.close().await?,
        }
        Ok(())
    }

    async fn close(&mut self) -> Result<(), MultipartError> {
        match self.current.take() {
            Some(Current::Field(name, value)) => self.uploads.fields.push((name, value)),
            Some(Current::File(mut file)) => {
                file.flush().await.map_err(|e| MultipartError::Storage(format!("cannot write an upload file: {e}")))?;
            }
            None => {}
        }
        Ok(())
    }

    /// The fields and files, once the body has ended.
    pub(crate) fn finish(self) -> Result<Uploads, MultipartError> {
        if !self.parser.ended() {
            return Err(MultipartError::Malformed("the body ends before its closing boundary".into()));
        }
        Ok(self.uploads)
    }
}

/// For the fuzz target: every event of `body` fed in pieces cut at `cuts`.
pub fn fuzz_parse(boundary: &[u8], body: &[u8], cuts: &[usize]) -> Result<Vec<Event>, MultipartError> {
    let mut parser = Parser::new(boundary);
    let mut events = Vec::new();
    let mut from = 0;
    for &cut in cuts.iter().chain(std::iter::once(&body.len())) {
        let cut = cut.clamp(from, body.len());
        parser.push(&body[from..cut]);
        from = cut;
        while let Some(e) = parser.next()? {
            events.push(e);
        }
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BODY: &[u8] = b"preamble\r\n--XyZ\r\nContent-Disposition: form-data; name=\"title\"\r\n\r\nHello\r\n--XyZ  \r\ncontent-disposition: form-data; name=\"file\"; filename=\"a \\\"b\\\".txt\"\r\nContent-Type: text/plain\r\n\r\nline1\r\n--XyNot\r\nline2\r\n--XyZ--\r\nepilogue";

    /// Data events of each part joined, so that how the input was cut does not matter.
    fn joined(events: Vec<Event>) -> Vec<(String, Option<String>, Vec<u8>)> {
        let mut out: Vec<(String, Option<String>, Vec<u8>)> = Vec::new();
        for e in events {
            match e {
                Event::Part { name, filename, .. } => out.push((name, filename, Vec::new())),
                Event::Data(d) => out.last_mut().unwrap().2.extend(d),
                Event::End => out.push(("END".into(), None, Vec::new())),
            }
        }
        out
    }

    #[test]
    fn parts_come_out_the_same_whatever_the_cuts() {
        let want = vec![
            ("title".to_string(), None, b"Hello".to_vec()),
            ("file".to_string(), Some("a \"b\".txt".to_string()), b"line1\r\n--XyNot\r\nline2".to_vec()),
            ("END".to_string(), None, Vec::new()),
        ];
        assert_eq!(joined(fuzz_parse(b"XyZ", BODY, &[]).unwrap()), want);
        for cut in 0..BODY.len() {
            assert_eq!(joined(fuzz_parse(b"XyZ", BODY, &[cut]).unwrap()), want, "cut at {cut}");
        }
        let every: Vec<usize> = (0..BODY.len()).collect();
        assert_eq!(joined(fuzz_parse(b"XyZ", BODY, &every).unwrap()), want);
    }

    #[test]
    fn boundaries_are_read_from_the_content_type() {
        assert_eq!(boundary("multipart/form-data; boundary=abc"), Some(Ok(b"abc".to_vec())));
        assert_eq!(boundary("Multipart/Form-Data; charset=x; boundary=\"a b\""), Some(Ok(b"a b".to_vec())));
        assert!(matches!(boundary("multipart/form-data"), Some(Err(_))));
        assert!(matches!(boundary(&format!("multipart/form-data; boundary={}", "x".repeat(71))), Some(Err(_))));
        assert_eq!(boundary("application/json"), None);
    }

    #[test]
    fn malformed_bodies_are_refused() {
        let cases: [(&[u8], &str); 4] = [
            (b"--b\r\nno-disposition: x\r\n\r\ndata\r\n--b--", "no content-disposition"),
            (b"--b\r\ncontent-disposition: attachment; name=x\r\n\r\ndata\r\n--b--", "not form-data"),
            (b"--b\r\ncontent-disposition: form-data\r\n\r\ndata\r\n--b--", "has no name"),
            (b"--bX\r\n", "not followed by CRLF"),
        ];
        for (body, want) in cases {
            let e = fuzz_parse(b"b", body, &[]).unwrap_err();
            assert!(e.to_string().contains(want), "{e}");
        }
        let many: Vec<u8> = (0..=MAX_PARTS).flat_map(|_| b"--b\r\ncontent-disposition: form-data; name=x\r\n\r\n\r\n".iter().copied()).collect();
        assert!(matches!(fuzz_parse(b"b", &many, &[]), Err(MultipartError::TooLarge(_))));
        let long_head = format!("--b\r\ncontent-disposition: form-data; name=x\r\nx-pad: {}\r\n\r\n", "p".repeat(MAX_PART_HEAD));
        assert!(matches!(fuzz_parse(b"b", long_head.as_bytes(), &[]), Err(MultipartError::TooLarge(_))));
    }

    #[test]
    fn a_preamble_is_bounded_in_memory() {
        let mut p = Parser::new(b"boundary");
        for _ in 0..1000 {
            p.push(&[b'x'; 1024]);
            assert_eq!(p.next().unwrap(), None);
        }
        assert!(p.pending.len() < 64);
    }
}
