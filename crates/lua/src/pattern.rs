//! Lua 5.4 string patterns, matched by a backtracking machine whose stack is data, not the C
//! stack: it counts its steps, asks its caller every few thousand of them whether to go on, and
//! can stop at any step and resume later. This is what keeps `string.find` and friends from
//! freezing a worker on a pathological pattern or a huge subject (docs/decisions/004-lua-sandbox.md).
//!
//! The semantics are those of the Lua 5.4 reference manual (§6.4.1), including its error
//! messages and its limits (32 captures, 200 nested matching levels); the tests compare every
//! result with the C implementation that ships with Lua.

/// Most captures one pattern may have.
pub const MAX_CAPTURES: usize = 32;
/// Most nested matching levels (captures, optional and repeated items being tried).
const MAX_LEVELS: usize = 200;
/// Steps between two questions to the caller's [`Control`].
pub const CHECK_EVERY: u32 = 2048;

/// What the caller answers every [`CHECK_EVERY`] steps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    Continue,
    /// Stop here; the match can be resumed where it stopped.
    Suspend,
    /// Stop with this error (a deadline passed, or the code ran too long without yielding).
    Fail(String),
}

/// Why a match could not be carried out: a malformed pattern, or the caller's [`Control::Fail`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatternError(pub String);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CapLen {
    Unfinished,
    Position,
    Len(usize),
}

#[derive(Debug, Clone, Copy)]
struct Capture {
    init: usize,
    len: CapLen,
}

/// One captured value: a slice of the subject or a position (1-based, as Lua reports it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Captured {
    Slice(usize, usize),
    Position(usize),
}

/// How a matching level goes on once the level it started returns.
#[derive(Debug, Clone, Copy)]
enum Frame {
    /// A capture was opened; if what follows fails, it is forgotten again.
    Opened,
    /// Capture `l` was closed; if what follows fails, it is open again.
    Closed { l: usize },
    /// `x?` took `x` at `s`; if the rest fails, it goes on without `x` from `s`.
    Optional { s: usize, ep: usize },
    /// `x*`/`x+` took `i` copies of `x` from `base`; if the rest fails, it tries one fewer.
    Greedy { base: usize, p: usize, ep: usize, i: usize },
    /// `x-` took copies of `x` up to `s`; if the rest fails, it takes one more.
    Lazy { s: usize, p: usize, ep: usize },
}

#[derive(Debug, Clone, Copy)]
enum Mode {
    /// Matching pattern position `p` against subject position `s`.
    Run { s: usize, p: usize },
    /// Counting how many copies of a single-character class `x*` can take from `base`.
    Count { base: usize, p: usize, ep: usize, i: usize },
    /// Looking for the end of a `%bxy` that opened at `open`; `cont` is the nesting so far.
    Balance { at: usize, p: usize, cont: usize },
    /// The current level ends with this result.
    Return(Option<usize>),
}

/// The state of one attempt to match a pattern at one position of a subject.
#[derive(Debug, Clone)]
pub struct Matcher {
    frames: Vec<Frame>,
    caps: Vec<Capture>,
    mode: Mode,
    steps: u32,
}

/// What [`Matcher::run`] came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The pattern matched up to this end position (exclusive).
    Matched(usize),
    NoMatch,
    Suspended,
}

impl Default for Matcher {
    fn default() -> Self {
        Matcher { frames: Vec::new(), caps: Vec::new(), mode: Mode::Return(None), steps: 0 }
    }
}

#[inline]
fn at(b: &[u8], i: usize) -> u8 {
    // Lua strings end with a NUL that its matcher reads in a few places; reading past the end as
    // 0 keeps exactly that behaviour.
    b.get(i).copied().unwrap_or(0)
}

/// Does `c` belong to the class `%cl` (C locale)?
fn class_has(c: u8, cl: u8) -> bool {
    let res = match cl.to_ascii_lowercase() {
        b'a' => c.is_ascii_alphabetic(),
        b'c' => c.is_ascii_control(),
        b'd' => c.is_ascii_digit(),
        b'g' => c.is_ascii_graphic(),
        b'l' => c.is_ascii_lowercase(),
        b'p' => c.is_ascii_punctuation(),
        b's' => c == b' ' || (9..=13).contains(&c),
        b'u' => c.is_ascii_uppercase(),
        b'w' => c.is_ascii_alphanumeric(),
        b'x' => c.is_ascii_hexdigit(),
        // Deprecated since Lua 5.2, still understood by 5.4.
        b'z' => c == 0,
        _ => return cl == c,
    };
    if cl.is_ascii_uppercase() {
        !res
    } else {
        res
    }
}

/// Does `c` belong to the set `[...]` that starts at `p` and whose `]` is at `close`?
fn set_has(pat: &[u8], c: u8, mut p: usize, close: usize) -> bool {
    let mut inside = true;
    if at(pat, p + 1) == b'^' {
        inside = false;
        p += 1;
    }
    loop {
        p += 1;
        if p >= close {
            return !inside;
        }
        let pc = pat[p];
        if pc == b'%' {
            p += 1;
            if class_has(c, at(pat, p)) {
                return inside;
            }
        } else if at(pat, p + 1) == b'-' && p + 2 < close {
            p += 2;
            if pc <= c && c <= pat[p] {
                return inside;
            }
        } else if pc == c {
            return inside;
        }
    }
}

/// Where the single-character class at `p` ends (the position of its optional suffix).
fn class_end(pat: &[u8], mut p: usize) -> Result<usize, PatternError> {
    let c = pat[p];
    p += 1;
    if c == b'%' {
        if p >= pat.len() {
            return Err(PatternError("malformed pattern (ends with '%')".into()));
        }
        return Ok(p + 1);
    }
    if c == b'[' {
        if at(pat, p) == b'^' {
            p += 1;
        }
        // The first character after `[` or `[^` is part of the set even when it is `]`.
        loop {
            if p >= pat.len() {
                return Err(PatternError("malformed pattern (missing ']')".into()));
            }
            let x = pat[p];
            p += 1;
            if x == b'%' && p < pat.len() {
                p += 1;
            }
            if at(pat, p) == b']' {
                break;
            }
        }
        return Ok(p + 1);
    }
    Ok(p)
}

/// Does subject position `s` hold one character of the class `pat[p..ep]`?
#[inline]
fn single(src: &[u8], s: usize, pat: &[u8], p: usize, ep: usize) -> bool {
    let Some(&c) = src.get(s) else { return false };
    match pat[p] {
        b'.' => true,
        b'%' => class_has(c, at(pat, p + 1)),
        b'[' => set_has(pat, c, p, ep - 1),
        pc => pc == c,
    }
}

/// Does the pattern (after an optional `^`) contain no magic characters, so a plain search
/// finds the same thing?
pub fn is_plain(pat: &[u8]) -> bool {
    !pat.iter().any(|c| b"^$*+?.([%-".contains(c))
}

impl Matcher {
    /// Starts an attempt at subject position `s` with the pattern from `p`.
    pub fn start(&mut self, s: usize, p: usize) {
        self.frames.clear();
        self.caps.clear();
        self.mode = Mode::Run { s, p };
    }

    /// Captures of the last match, as Lua returns them: with none, the whole match `s..e`.
    pub fn captures(&self, s: usize, e: usize, whole_if_none: bool) -> Result<Vec<Captured>, PatternError> {
        let n = if self.caps.is_empty() && whole_if_none { 1 } else { self.caps.len() };
        (0..n).map(|i| self.capture(i, s, e)).collect()
    }

    /// Capture `i` (0-based) of the last match `s..e`; `i == 0` with no captures is the whole match.
    pub fn capture(&self, i: usize, s: usize, e: usize) -> Result<Captured, PatternError> {
        match self.caps.get(i) {
            None if i == 0 => Ok(Captured::Slice(s, e)),
            None => Err(PatternError(format!("invalid capture index %{}", i + 1))),
            Some(c) => match c.len {
                CapLen::Unfinished => Err(PatternError("unfinished capture".into())),
                CapLen::Position => Ok(Captured::Position(c.init + 1)),
                CapLen::Len(n) => Ok(Captured::Slice(c.init, c.init + n)),
            },
        }
    }

    /// Number of captures of the last match.
    pub fn capture_count(&self) -> usize {
        self.caps.len()
    }

    fn call(&mut self, frame: Frame, s: usize, p: usize) -> Result<(), PatternError> {
        // The running level is frames.len() + 1; the one it starts would be one more.
        if self.frames.len() + 2 > MAX_LEVELS {
            return Err(PatternError("pattern too complex".into()));
        }
        self.frames.push(frame);
        self.mode = Mode::Run { s, p };
        Ok(())
    }

    /// Runs the attempt started by [`start`](Self::start) (or resumes it) until it matches,
    /// fails, or `control` asks it to stop.
    pub fn run(&mut self, src: &[u8], pat: &[u8], control: &mut dyn FnMut() -> Control) -> Result<Step, PatternError> {
        loop {
            self.steps += 1;
            if self.steps >= CHECK_EVERY {
                self.steps = 0;
                match control() {
                    Control::Continue => {}
                    Control::Suspend => return Ok(Step::Suspended),
                    Control::Fail(m) => return Err(PatternError(m)),
                }
            }
            match self.mode {
                Mode::Run { s, p } => self.run_item(src, pat, s, p)?,
                Mode::Count { base, p, ep, i } => {
                    // Counting is a tight loop of its own; it stops to ask like every other step.
                    let mut i = i;
                    let mut left = CHECK_EVERY;
                    while left > 0 && single(src, base + i, pat, p, ep) {
                        i += 1;
                        left -= 1;
                    }
                    if left == 0 {
                        self.steps = CHECK_EVERY - 1;
                        self.mode = Mode::Count { base, p, ep, i };
                    } else {
                        self.call(Frame::Greedy { base, p, ep, i }, base + i, ep + 1)?;
                    }
                }
                Mode::Balance { at: mut a, p, mut cont } => {
                    let (open, close) = (pat[p], pat[p + 1]);
                    let mut left = CHECK_EVERY;
                    let mut end = None;
                    while left > 0 {
                        a += 1;
                        let Some(&c) = src.get(a) else { break };
                        if c == close {
                            cont -= 1;
                            if cont == 0 {
                                end = Some(a + 1);
                                break;
                            }
                        } else if c == open {
                            cont += 1;
                        }
                        left -= 1;
                    }
                    if let Some(e) = end {
                        self.mode = Mode::Run { s: e, p: p + 2 };
                    } else if a >= src.len() {
                        self.mode = Mode::Return(None);
                    } else {
                        self.steps = CHECK_EVERY - 1;
                        self.mode = Mode::Balance { at: a, p, cont };
                    }
                }
                Mode::Return(r) => {
                    let Some(frame) = self.frames.pop() else {
                        return Ok(match r {
                            Some(e) => Step::Matched(e),
                            None => Step::NoMatch,
                        });
                    };
                    self.resume_frame(src, pat, frame, r)?;
                }
            }
        }
    }

    /// One pattern item at `p` against subject position `s`.
    fn run_item(&mut self, src: &[u8], pat: &[u8], s: usize, p: usize) -> Result<(), PatternError> {
        if p >= pat.len() {
            self.mode = Mode::Return(Some(s));
            return Ok(());
        }
        match pat[p] {
            b'(' => {
                let (len, next) = if at(pat, p + 1) == b')' { (CapLen::Position, p + 2) } else { (CapLen::Unfinished, p + 1) };
                if self.caps.len() >= MAX_CAPTURES {
                    return Err(PatternError("too many captures".into()));
                }
                self.caps.push(Capture { init: s, len });
                return self.call(Frame::Opened, s, next);
            }
            b')' => {
                let Some(l) = self.caps.iter().rposition(|c| c.len == CapLen::Unfinished) else {
                    return Err(PatternError("invalid pattern capture".into()));
                };
                self.caps[l].len = CapLen::Len(s - self.caps[l].init);
                return self.call(Frame::Closed { l }, s, p + 1);
            }
            b'$' if p + 1 == pat.len() => {
                self.mode = Mode::Return(if s == src.len() { Some(s) } else { None });
                return Ok(());
            }
            b'%' => match at(pat, p + 1) {
                b'b' => {
                    let q = p + 2;
                    if q + 1 >= pat.len() {
                        return Err(PatternError("malformed pattern (missing arguments to '%b')".into()));
                    }
                    self.mode = if src.get(s) == Some(&pat[q]) { Mode::Balance { at: s, p: q, cont: 1 } } else { Mode::Return(None) };
                    return Ok(());
                }
                b'f' => {
                    let q = p + 2;
                    if at(pat, q) != b'[' {
                        return Err(PatternError("missing '[' after '%f' in pattern".into()));
                    }
                    let ep = class_end(pat, q)?;
                    let previous = if s == 0 { 0 } else { src[s - 1] };
                    let current = at(src, s);
                    self.mode =
                        if !set_has(pat, previous, q, ep - 1) && set_has(pat, current, q, ep - 1) { Mode::Run { s, p: ep } } else { Mode::Return(None) };
                    return Ok(());
                }
                d @ b'0'..=b'9' => {
                    let l = d as usize;
                    let l = l.wrapping_sub(b'1' as usize);
                    let cap = match self.caps.get(l) {
                        Some(c) if c.len != CapLen::Unfinished => *c,
                        _ => return Err(PatternError(format!("invalid capture index %{}", l.wrapping_add(1) as isize))),
                    };
                    let end = match cap.len {
                        CapLen::Len(n) if src.len() - s >= n && src[cap.init..cap.init + n] == src[s..s + n] => Some(s + n),
                        _ => None,
                    };
                    self.mode = match end {
                        Some(e) => Mode::Run { s: e, p: p + 2 },
                        None => Mode::Return(None),
                    };
                    return Ok(());
                }
                _ => {}
            },
            _ => {}
        }
        // A single-character class with an optional suffix.
        let ep = class_end(pat, p)?;
        let suffix = at(pat, ep);
        if !single(src, s, pat, p, ep) {
            self.mode = if matches!(suffix, b'*' | b'?' | b'-') { Mode::Run { s, p: ep + 1 } } else { Mode::Return(None) };
            return Ok(());
        }
        match suffix {
            b'?' => self.call(Frame::Optional { s, ep }, s + 1, ep + 1),
            b'+' => {
                self.mode = Mode::Count { base: s + 1, p, ep, i: 0 };
                Ok(())
            }
            b'*' => {
                self.mode = Mode::Count { base: s, p, ep, i: 1 };
                Ok(())
            }
            b'-' => self.call(Frame::Lazy { s, p, ep }, s, ep + 1),
            _ => {
                self.mode = Mode::Run { s: s + 1, p: ep };
                Ok(())
            }
        }
    }

    /// A level started by `frame`'s owner returned `r`: the owner goes on.
    fn resume_frame(&mut self, src: &[u8], pat: &[u8], frame: Frame, r: Option<usize>) -> Result<(), PatternError> {
        match frame {
            Frame::Opened => {
                if r.is_none() {
                    self.caps.pop();
                }
                self.mode = Mode::Return(r);
            }
            Frame::Closed { l } => {
                if r.is_none() {
                    self.caps[l].len = CapLen::Unfinished;
                }
                self.mode = Mode::Return(r);
            }
            Frame::Optional { s, ep } => {
                self.mode = if r.is_some() { Mode::Return(r) } else { Mode::Run { s, p: ep + 1 } };
            }
            Frame::Greedy { base, p, ep, i } => {
                if r.is_some() {
                    self.mode = Mode::Return(r);
                } else if i == 0 {
                    self.mode = Mode::Return(None);
                } else {
                    self.call(Frame::Greedy { base, p, ep, i: i - 1 }, base + i - 1, ep + 1)?;
                }
            }
            Frame::Lazy { s, p, ep } => {
                if r.is_some() {
                    self.mode = Mode::Return(r);
                } else if single(src, s, pat, p, ep) {
                    self.call(Frame::Lazy { s: s + 1, p, ep }, s + 1, ep + 1)?;
                } else {
                    self.mode = Mode::Return(None);
                }
            }
        }
        Ok(())
    }
}

/// A search for the first position from `next` where the pattern matches, resumable like the
/// matcher under it. `last` is the end of the previous match of a `gmatch`/`gsub`: a match
/// ending there again (an empty match right after it) does not count.
#[derive(Debug, Clone)]
pub struct Search {
    pub matcher: Matcher,
    /// Pattern position after an anchoring `^`.
    pub p0: usize,
    pub anchor: bool,
    /// The start position being tried.
    pub next: usize,
    pub last: Option<usize>,
    started: bool,
}

/// What [`Search::run`] came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    At(usize, usize),
    Nothing,
    Suspended,
}

impl Search {
    /// A search from subject position `from`; `anchored` says whether a leading `^` anchors
    /// (it does for find, match and gsub, not for gmatch).
    pub fn new(pat: &[u8], from: usize, anchored: bool, last: Option<usize>) -> Search {
        let anchor = anchored && pat.first() == Some(&b'^');
        Search { matcher: Matcher::default(), p0: usize::from(anchor), anchor, next: from, last, started: false }
    }

    pub fn run(&mut self, src: &[u8], pat: &[u8], control: &mut dyn FnMut() -> Control) -> Result<Found, PatternError> {
        loop {
            if !self.started {
                if self.next > src.len() {
                    return Ok(Found::Nothing);
                }
                self.matcher.start(self.next, self.p0);
                self.started = true;
            }
            match self.matcher.run(src, pat, control)? {
                Step::Suspended => return Ok(Found::Suspended),
                Step::Matched(e) if Some(e) != self.last => {
                    self.started = false;
                    return Ok(Found::At(self.next, e));
                }
                _ => {
                    self.started = false;
                    if self.anchor || self.next >= src.len() {
                        // Nothing here; an anchored search tries one position only.
                        self.next = src.len() + 1;
                        return Ok(Found::Nothing);
                    }
                    self.next += 1;
                }
            }
        }
    }
}

/// Expands a `gsub` replacement string for the match `s..e` into `out`.
pub fn expand(repl: &[u8], src: &[u8], m: &Matcher, s: usize, e: usize, out: &mut Vec<u8>) -> Result<(), PatternError> {
    let mut i = 0;
    while i < repl.len() {
        let c = repl[i];
        i += 1;
        if c != b'%' {
            out.push(c);
            continue;
        }
        let d = at(repl, i);
        i += 1;
        if d == b'%' {
            out.push(b'%');
        } else if d.is_ascii_digit() {
            let cap = if d == b'0' { Captured::Slice(s, e) } else { m.capture((d - b'1') as usize, s, e)? };
            match cap {
                Captured::Slice(a, b) => out.extend_from_slice(&src[a..b]),
                Captured::Position(n) => out.extend_from_slice(n.to_string().as_bytes()),
            }
        } else {
            return Err(PatternError("invalid use of '%' in replacement string".into()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn find(s: &str, p: &str) -> Result<Option<(usize, usize, Vec<Captured>)>, PatternError> {
        let mut search = Search::new(p.as_bytes(), 0, true, None);
        match search.run(s.as_bytes(), p.as_bytes(), &mut || Control::Continue)? {
            Found::At(a, b) => Ok(Some((a + 1, b, search.matcher.captures(a, b, false)?))),
            _ => Ok(None),
        }
    }

    #[test]
    fn basic_items() {
        assert_eq!(find("hello world", "o w").unwrap().map(|m| (m.0, m.1)), Some((5, 7)));
        assert_eq!(find("hello", "l+").unwrap().map(|m| (m.0, m.1)), Some((3, 4)));
        assert_eq!(find("hello", "^h.-l").unwrap().map(|m| (m.0, m.1)), Some((1, 3)));
        assert_eq!(find("hello", "^e"), Ok(None));
        assert_eq!(find("key = value", "(%w+)%s*=%s*(%w+)").unwrap().unwrap().2, vec![Captured::Slice(0, 3), Captured::Slice(6, 11)]);
        assert_eq!(find("THE (quick) fox", "%((%a+)%)").unwrap().unwrap().2, vec![Captured::Slice(5, 10)]);
        assert_eq!(find("x = [[a]] y", "%b[]").unwrap().map(|m| (m.0, m.1)), Some((5, 9)));
        assert_eq!(find("THE (quick) fox", "%f[%a]%a+%f[%A]").unwrap().map(|m| (m.0, m.1)), Some((1, 3)));
        assert_eq!(find("abcabc", "()b()").unwrap().unwrap().2, vec![Captured::Position(2), Captured::Position(3)]);
        assert_eq!(find("say 'hi' now", "(['\"])(.-)%1").unwrap().unwrap().2, vec![Captured::Slice(4, 5), Captured::Slice(5, 7)]);
        assert_eq!(find("end", "d$").unwrap().map(|m| (m.0, m.1)), Some((3, 3)));
        assert_eq!(find("a$b", "$b").unwrap().map(|m| (m.0, m.1)), Some((2, 3)));
    }

    #[test]
    fn malformed_patterns_say_why() {
        assert_eq!(find("x", "%"), Err(PatternError("malformed pattern (ends with '%')".into())));
        assert_eq!(find("x", "[a"), Err(PatternError("malformed pattern (missing ']')".into())));
        assert_eq!(find("x", "x)"), Err(PatternError("invalid pattern capture".into())));
        assert_eq!(find("x", "%1"), Err(PatternError("invalid capture index %1".into())));
        assert_eq!(find("x", "%f"), Err(PatternError("missing '[' after '%f' in pattern".into())));
        assert_eq!(find("x", "%b"), Err(PatternError("malformed pattern (missing arguments to '%b')".into())));
        assert_eq!(find("x", &"(".repeat(33)), Err(PatternError("too many captures".into())));
        assert_eq!(find(&"a".repeat(300), &"a?".repeat(300)), Err(PatternError("pattern too complex".into())));
    }

    #[test]
    fn a_long_match_stops_when_asked_and_resumes_where_it_stopped() {
        let subject = "x".repeat(100_000);
        let pat = b".-y";
        let mut search = Search::new(pat, 0, true, None);
        let mut asked = 0;
        let mut suspensions = 0;
        loop {
            let r = search
                .run(subject.as_bytes(), pat, &mut || {
                    asked += 1;
                    if asked % 3 == 0 {
                        Control::Suspend
                    } else {
                        Control::Continue
                    }
                })
                .unwrap();
            match r {
                Found::Suspended => suspensions += 1,
                Found::Nothing => break,
                Found::At(..) => panic!("no y in the subject"),
            }
            if suspensions > 10 {
                break;
            }
        }
        assert!(suspensions > 10, "a quadratic search over 100k characters must have been asked to stop");
        let mut search = Search::new(pat, 0, true, None);
        let r = search.run(subject.as_bytes(), pat, &mut || Control::Fail("deadline".into()));
        assert_eq!(r, Err(PatternError("deadline".into())));
    }

    #[test]
    fn replacement_strings() {
        let src = b"hello world";
        let mut search = Search::new(b"(o)", 0, true, None);
        let Found::At(s, e) = search.run(src, b"(o)", &mut || Control::Continue).unwrap() else { panic!() };
        let mut out = Vec::new();
        expand(b"[%1%%%0]", src, &search.matcher, s, e, &mut out).unwrap();
        assert_eq!(out, b"[o%o]");
        assert_eq!(expand(b"%2", src, &search.matcher, s, e, &mut out), Err(PatternError("invalid capture index %2".into())));
        assert_eq!(expand(b"%x", src, &search.matcher, s, e, &mut out), Err(PatternError("invalid use of '%' in replacement string".into())));
    }
}
