//! The helper families module code finds under `pmnc` besides the runtime's own API
//! (`pmnc.base64`, `pmnc.crypto`, ...): one file per family, each a table of functions, and the
//! shared way they report failures and move big inputs off the worker (docs/decisions/070).

use std::cell::Cell;
use std::ops::Deref;

use mlua::{AnyUserData, BorrowedBytes, Lua, LuaString, MultiValue, Table, Value as LuaValue};

// Public for the fuzz targets (fuzz/fuzz_targets/stdlib_*.rs) and the helpers' own tests.
pub mod base64;
pub mod celery;
pub mod compress;
pub mod crypto;
pub mod csv;
mod fast;
pub mod hex;
pub mod re;
pub mod time;
pub mod url;
mod uuid;
pub mod xml;

use fast::front;

/// Inputs up to this many bytes are handled inline on the worker; larger ones on tokio's
/// blocking pool while the request waits (decision 070 has the measurements): for the fast
/// families (base64, digests, HMAC, zstd), whose 64 KiB take well under a millisecond.
pub const INLINE_BYTES: usize = 64 << 10;
/// The same for the slower ones: regular expressions and hex.
pub const INLINE_BYTES_RE: usize = 16 << 10;
/// The same for the slowest per byte: gzip and zlib compression, XML and CSV decoding (64 KiB
/// took 5-7 ms on a loaded machine).
pub const INLINE_BYTES_SLOW: usize = 8 << 10;

/// The families, by name: the Lua host makes each a read-only `pmnc.<name>` table. Every
/// function returns `(true, values...)`, `(false, message)` or `("pending", job)` for a job that
/// the prelude hands to `stdlib_wait` (off the worker) or `stdlib_run` (inline, where nothing
/// can wait).
pub fn install(lua: &Lua) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    let families: [(&str, Installer); 11] = [
        ("base64", base64::install),
        ("hex", hex::install),
        ("crypto", crypto::install),
        ("uuid", uuid::install),
        ("time", time::install),
        ("url", url::install),
        ("xml", xml::install),
        ("re", re::install),
        ("compress", compress::install),
        ("csv", csv::install),
        ("celery", celery::install),
    ];
    for (name, install) in families {
        let family = lua.create_table()?;
        install(lua, &family)?;
        t.set(name, family)?;
    }
    Ok(t)
}

/// Registers `stdlib_wait(job)` (async: runs the job on the blocking pool), `stdlib_run(job)`
/// (the same inline) and `stdlib_front(family, name, wrapper)` (the fast path of a helper in
/// front of its wrapper, see fast.rs) in the table of Rust functions the prelude receives.
pub fn install_runners(lua: &Lua, rust: &Table) -> mlua::Result<()> {
    rust.set(
        "stdlib_wait",
        lua.create_async_function(|lua, job: AnyUserData| async move {
            let job = match job.take::<Job>() {
                Ok(job) => job,
                Err(e) => return fail(&lua, format!("pmnc: a helper's job was used twice: {e}")),
            };
            match tokio::task::spawn_blocking(job.0).await {
                Ok(Ok(finish)) => finish_ok(&lua, finish),
                Ok(Err(message)) => fail(&lua, message),
                Err(e) => fail(&lua, format!("pmnc: a helper failed on the blocking pool: {e}")),
            }
        })?,
    )?;
    rust.set(
        "stdlib_front",
        lua.create_function(|lua, (family, name, wrapper): (LuaString, LuaString, mlua::Function)| front(lua, &family.to_str()?, &name.to_str()?, wrapper))?,
    )?;
    rust.set(
        "stdlib_run",
        lua.create_function(|lua, job: AnyUserData| {
            let job = match job.take::<Job>() {
                Ok(job) => job,
                Err(e) => return fail(lua, format!("pmnc: a helper's job was used twice: {e}")),
            };
            match (job.0)() {
                Ok(finish) => finish_ok(lua, finish),
                Err(message) => fail(lua, message),
            }
        })?,
    )?;
    Ok(())
}

/// How a family fills its table.
type Installer = fn(&Lua, &Table) -> mlua::Result<()>;

/// Names of the families, which modules cannot take as their own names.
pub const FAMILIES: &[&str] = &["base64", "hex", "crypto", "uuid", "time", "url", "xml", "re", "compress", "csv", "celery"];

/// What a job hands back to the worker: makes the Lua values of its result there.
type Finish = Box<dyn FnOnce(&Lua) -> mlua::Result<MultiValue> + Send>;

/// Work of a helper over a big input, done where the prelude decides.
struct Job(Box<dyn FnOnce() -> Result<Finish, String> + Send>);

impl mlua::UserData for Job {}

fn finish_ok(lua: &Lua, finish: Finish) -> mlua::Result<MultiValue> {
    let mut values = finish(lua)?;
    values.push_front(LuaValue::Boolean(true));
    Ok(values)
}

/// `(false, message)`.
pub(crate) fn fail(lua: &Lua, message: impl AsRef<str>) -> mlua::Result<MultiValue> {
    Ok(MultiValue::from_iter([LuaValue::Boolean(false), LuaValue::String(lua.create_string(message.as_ref())?)]))
}

/// `(true, values...)`.
pub(crate) fn ok(values: impl IntoIterator<Item = LuaValue>) -> mlua::Result<MultiValue> {
    let mut mv = MultiValue::from_iter(values);
    mv.push_front(LuaValue::Boolean(true));
    Ok(mv)
}

/// One string value (what most `finish` steps make).
pub(crate) fn one_string(lua: &Lua, bytes: impl AsRef<[u8]>) -> mlua::Result<MultiValue> {
    Ok(MultiValue::from_iter([LuaValue::String(lua.create_string(bytes)?)]))
}

/// `(true, string)`.
pub(crate) fn ok_bytes(lua: &Lua, bytes: impl AsRef<[u8]>) -> mlua::Result<MultiValue> {
    ok([LuaValue::String(lua.create_string(bytes)?)])
}

/// Runs `work` inline when `size` is small, else returns it as a job; `finish` makes the Lua
/// values of its result on the worker.
pub(crate) fn run_sized<T, W, F>(lua: &Lua, size: usize, work: W, finish: F) -> mlua::Result<MultiValue>
where
    T: Send + 'static,
    W: FnOnce() -> Result<T, String> + Send + 'static,
    F: FnOnce(&Lua, T) -> mlua::Result<MultiValue> + Send + 'static,
{
    if size <= INLINE_BYTES {
        return finish_inline(lua, work(), finish);
    }
    pending(lua, work, finish)
}

/// `(true, values...)` of `finish` for a result computed inline, or `(false, message)`.
fn finish_inline<T>(lua: &Lua, result: Result<T, String>, finish: impl FnOnce(&Lua, T) -> mlua::Result<MultiValue>) -> mlua::Result<MultiValue> {
    match result {
        Ok(v) => {
            let mut values = finish(lua, v)?;
            values.push_front(LuaValue::Boolean(true));
            Ok(values)
        }
        Err(m) => fail(lua, m),
    }
}

/// Always a job (for work that is slow whatever its input, like password hashing).
pub(crate) fn pending<T, W, F>(lua: &Lua, work: W, finish: F) -> mlua::Result<MultiValue>
where
    T: Send + 'static,
    W: FnOnce() -> Result<T, String> + Send + 'static,
    F: FnOnce(&Lua, T) -> mlua::Result<MultiValue> + Send + 'static,
{
    let job = Job(Box::new(move || {
        let v = work()?;
        let finish: Finish = Box::new(move |lua: &Lua| finish(lua, v));
        Ok(finish)
    }));
    Ok(MultiValue::from_iter([LuaValue::String(lua.create_string("pending")?), LuaValue::UserData(lua.create_userdata(job)?)]))
}

/// The string arguments of one call, read in place: the subject the work is about and any
/// others it needs (an HMAC key, a replacement template).
struct Borrowed<const N: usize> {
    subject: BorrowedBytes,
    extras: [BorrowedBytes; N],
}

impl<const N: usize> Borrowed<N> {
    fn of(subject: &LuaString, extras: [&LuaString; N]) -> Self {
        Borrowed { subject: subject.as_bytes(), extras: extras.map(LuaString::as_bytes) }
    }

    /// Whether the work stays on the worker: the inputs together are at most `inline` bytes.
    fn fits(&self, inline: usize) -> bool {
        self.subject.len() + self.extras.iter().map(|e| e.len()).sum::<usize>() <= inline
    }

    fn extras(&self) -> [&[u8]; N] {
        self.extras.each_ref().map(|e| &**e)
    }

    /// Copies for the blocking pool, where the Lua strings cannot go.
    fn copies(&self) -> (Vec<u8>, [Vec<u8>; N]) {
        (self.subject.to_vec(), self.extras.each_ref().map(|e| e.to_vec()))
    }
}

/// The subject of a helper as `finish` gets it back, for results that point into it (the
/// matches of a regular expression).
pub(crate) enum Input<'a> {
    /// Inline: the Lua string and its bytes, never copied.
    Borrowed(&'a LuaString, &'a [u8]),
    /// After a job: the copy it took to the blocking pool.
    Copied(Vec<u8>),
}

impl Deref for Input<'_> {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Input::Borrowed(_, bytes) => bytes,
            Input::Copied(bytes) => bytes,
        }
    }
}

impl Input<'_> {
    /// The subject held past the call (by a `gmatch` iterator): another handle on the Lua string
    /// (not a `BorrowedBytes`, whose strong reference to the state, held by a function of that
    /// state, would keep the state alive forever), or the copy.
    pub(crate) fn keep(self) -> Kept {
        match self {
            Input::Borrowed(s, _) => Kept::Lua(s.clone()),
            Input::Copied(bytes) => Kept::Copied(bytes),
        }
    }
}

/// See [`Input::keep`].
pub(crate) enum Kept {
    Lua(LuaString),
    Copied(Vec<u8>),
}

impl Kept {
    pub(crate) fn read<R>(&self, f: impl FnOnce(&[u8]) -> R) -> R {
        match self {
            Kept::Lua(s) => f(&s.as_bytes()),
            Kept::Copied(bytes) => f(bytes),
        }
    }
}

/// Runs `work` over the bytes of `subject` (and of `extras`): in place on the worker when they
/// come to at most `inline` bytes, else as a job over copies of them. `finish` makes the Lua
/// values of the result on the worker and gets the subject back.
pub(crate) fn run_over<const N: usize, T, W, F>(
    lua: &Lua,
    subject: &LuaString,
    extras: [&LuaString; N],
    inline: usize,
    work: W,
    finish: F,
) -> mlua::Result<MultiValue>
where
    T: Send + 'static,
    W: FnOnce(&[u8], [&[u8]; N]) -> Result<T, String> + Send + 'static,
    F: FnOnce(&Lua, Input<'_>, T) -> mlua::Result<MultiValue> + Send + 'static,
{
    let borrowed = Borrowed::of(subject, extras);
    if borrowed.fits(inline) {
        let bytes = &*borrowed.subject;
        return finish_inline(lua, work(bytes, borrowed.extras()), |lua, v| finish(lua, Input::Borrowed(subject, bytes), v));
    }
    let (copy, extras) = borrowed.copies();
    drop(borrowed);
    pending(
        lua,
        move || {
            let v = work(&copy, extras.each_ref().map(|e| e.as_slice()))?;
            Ok((copy, v))
        },
        move |lua, (copy, v)| finish(lua, Input::Copied(copy), v),
    )
}

/// The result of a [`transform`], written in place: the bytes past the result are left over
/// from earlier calls, so once the buffer has grown, sizing it for a result costs neither an
/// allocation nor zeroing.
#[derive(Default)]
pub(crate) struct Out {
    buf: Vec<u8>,
    len: usize,
}

impl Out {
    /// The next `n` bytes of the result, to be overwritten.
    pub(crate) fn grow(&mut self, n: usize) -> &mut [u8] {
        let end = self.len + n;
        if self.buf.len() < end {
            self.buf.resize(end, 0);
        }
        let at = self.len;
        self.len = end;
        &mut self.buf[at..end]
    }

    /// Keeps only the first `n` bytes of the result (after a [`Out::grow`] to an upper bound).
    pub(crate) fn truncate(&mut self, n: usize) {
        self.len = self.len.min(n);
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn extend(&mut self, bytes: &[u8]) {
        self.grow(bytes.len()).copy_from_slice(bytes);
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    pub(crate) fn into_vec(mut self) -> Vec<u8> {
        self.buf.truncate(self.len);
        self.buf
    }
}

/// Most bytes the scratch buffer keeps between calls (the longest inline result is the base64
/// of `INLINE_BYTES`, 87,384 bytes, in a buffer grown by doubling).
const SCRATCH_KEPT: usize = 256 << 10;

thread_local! {
    /// Where inline results of `transform` are written before their Lua string is made from
    /// them: one buffer per thread, so an encoding or a digest allocates nothing per call.
    static SCRATCH: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
}

/// Writes `len` bytes with `write` into this thread's scratch buffer, puts the buffer back in its
/// slot and returns where the bytes are: valid until the next use of the buffer on this thread
/// (for the fast paths, which make a Lua string of them at once). Their results are at most
/// the base64 of [`INLINE_BYTES`], within what the slot keeps ([`SCRATCH_KEPT`]).
pub(crate) fn with_scratch(len: usize, write: impl FnOnce(&mut [u8])) -> (*const u8, usize) {
    let mut out = Out { buf: SCRATCH.take(), len: 0 };
    write(out.grow(len));
    let ptr = out.buf.as_ptr();
    SCRATCH.set(out.buf);
    (ptr, len)
}

/// Like [`run_over`] for helpers that make one string (encodings, digests): `work` writes it
/// into the [`Out`] it gets. Inline that is this thread's scratch buffer, and the Lua string is
/// made from it (Lua 5.4 cannot make a string of a buffer it did not allocate, so that copy
/// stays; mlua's external strings need Lua 5.5).
pub(crate) fn transform<const N: usize, W>(lua: &Lua, subject: &LuaString, extras: [&LuaString; N], inline: usize, work: W) -> mlua::Result<MultiValue>
where
    W: FnOnce(&[u8], [&[u8]; N], &mut Out) -> Result<(), String> + Send + 'static,
{
    let borrowed = Borrowed::of(subject, extras);
    if borrowed.fits(inline) {
        // Taken out, not borrowed: a call made while this one runs (by a finaliser that making
        // the string set off) finds an empty buffer instead of a borrowed one.
        let mut out = Out { buf: SCRATCH.take(), len: 0 };
        let result = match work(&borrowed.subject, borrowed.extras(), &mut out) {
            Ok(()) => ok_bytes(lua, out.as_bytes()),
            Err(m) => fail(lua, m),
        };
        if out.buf.capacity() <= SCRATCH_KEPT {
            SCRATCH.set(out.buf);
        }
        return result;
    }
    let (copy, extras) = borrowed.copies();
    drop(borrowed);
    let job = move || {
        let mut out = Out::default();
        work(&copy, extras.each_ref().map(|e| e.as_slice()), &mut out)?;
        Ok(out)
    };
    pending(lua, job, |lua, out| one_string(lua, out.as_bytes()))
}

/// A string argument, or the message naming the function and the argument.
pub(crate) fn string_arg<'a>(v: &'a LuaValue, func: &str, what: &str) -> Result<&'a LuaString, String> {
    match v {
        LuaValue::String(s) => Ok(s),
        other => Err(format!("{func}: {what} must be a string, got {}", other.type_name())),
    }
}

/// A copy of a string argument's bytes, for work that always leaves the worker.
pub(crate) fn bytes_arg(v: &LuaValue, func: &str, what: &str) -> Result<Vec<u8>, String> {
    Ok(string_arg(v, func, what)?.as_bytes().to_vec())
}

/// An optional integer argument within `min..=max`.
pub(crate) fn opt_int(v: &LuaValue, func: &str, what: &str, default: i64, min: i64, max: i64) -> Result<i64, String> {
    let n = match v {
        LuaValue::Nil => return Ok(default),
        LuaValue::Integer(i) => *i,
        LuaValue::Number(f) if f.fract() == 0.0 && f.is_finite() => *f as i64,
        other => return Err(format!("{func}: {what} must be an integer, got {}", lua_type(other))),
    };
    if n < min || n > max {
        return Err(format!("{func}: {what} must be from {min} to {max}, got {n}"));
    }
    Ok(n)
}

fn lua_type(v: &LuaValue) -> String {
    match v {
        LuaValue::Number(f) => format!("{f}"),
        other => other.type_name().to_string(),
    }
}

/// An optional boolean field of an options table.
pub(crate) fn opt_flag(opts: &LuaValue, key: &str, func: &str, default: bool) -> Result<bool, String> {
    match opts {
        LuaValue::Nil => Ok(default),
        LuaValue::Table(t) => match t.raw_get::<LuaValue>(key) {
            Ok(LuaValue::Nil) => Ok(default),
            Ok(LuaValue::Boolean(b)) => Ok(b),
            Ok(other) => Err(format!("{func}: option {key} must be a boolean, got {}", other.type_name())),
            Err(e) => Err(format!("{func}: option {key}: {e}")),
        },
        other => Err(format!("{func}: options must be a table, got {}", other.type_name())),
    }
}

/// Calls `f`, turning an `Err(message)` into `(false, message)`.
pub(crate) fn reported(lua: &Lua, f: impl FnOnce() -> Result<mlua::Result<MultiValue>, String>) -> mlua::Result<MultiValue> {
    match f() {
        Ok(r) => r,
        Err(m) => fail(lua, m),
    }
}

#[cfg(test)]
mod measure {
    /// The figures behind `INLINE_BYTES` (decision 070):
    /// `cargo test --release -p rustomnic-stdlib -- --ignored --nocapture measure`.
    #[test]
    #[ignore]
    fn time_per_family_at_the_threshold() {
        let n = super::INLINE_BYTES;
        let mut data = vec![0u8; n];
        getrandom::getrandom(&mut data).unwrap();
        let text: Vec<u8> = data.iter().map(|b| b"abcdefgh ,;=\n"[(*b % 13) as usize]).collect();
        let re = super::re::compiled(br"(\w+)=(\w+)", "t").unwrap();
        let xml = format!("<r>{}</r>", "<i a=\"1\">text &amp; more</i>".repeat(n / 28));
        let b64 = super::base64::encode(&data, false, true);
        type Case<'a> = (&'a str, Box<dyn Fn() + 'a>);
        let cases: Vec<Case> = vec![
            (
                "hex.encode",
                Box::new(|| {
                    let _ = std::hint::black_box(super::hex::encode(&data));
                }),
            ),
            (
                "base64.encode",
                Box::new(|| {
                    let _ = std::hint::black_box(super::base64::encode(&data, false, true));
                }),
            ),
            (
                "base64.decode",
                Box::new(|| {
                    let _ = std::hint::black_box(super::base64::decode(&b64, false));
                }),
            ),
            (
                "crypto.sha256",
                Box::new(|| {
                    let _ = std::hint::black_box(super::crypto::digest("sha256", &data));
                }),
            ),
            (
                "crypto.hmac sha1",
                Box::new(|| {
                    let _ = std::hint::black_box(super::crypto::hmac("sha1", b"k", &data));
                }),
            ),
            (
                "re gmatch-all",
                Box::new(|| {
                    let _ = std::hint::black_box(re.captures_iter(&text).count());
                }),
            ),
            (
                "compress.gzip random",
                Box::new(|| {
                    let _ = std::hint::black_box(super::compress::gzip(&data, 6));
                }),
            ),
            (
                "compress.zstd random",
                Box::new(|| {
                    let _ = std::hint::black_box(super::compress::zstd(&data, 3));
                }),
            ),
            (
                "xml.decode",
                Box::new(|| {
                    let _ = std::hint::black_box(super::xml::decode(xml.as_bytes(), super::xml::DEFAULT_LIMITS));
                }),
            ),
            (
                "csv.decode",
                Box::new(|| {
                    let _ = std::hint::black_box(super::csv::decode(&text, b','));
                }),
            ),
        ];
        for (name, f) in cases {
            let start = std::time::Instant::now();
            for _ in 0..20 {
                f();
            }
            println!("{name:24} {:8.3} ms per {} KiB", start.elapsed().as_secs_f64() * 1000.0 / 20.0, n >> 10);
        }
    }
}

#[cfg(test)]
mod tests {
    //! The helpers through Lua on either side of their inline limits: in place over the Lua
    //! string just below and at the limit, as a job over a copy just above, the same results.

    use mlua::{Function, Lua};

    rustomnic_alloc_count::install!();

    /// A state with the families as the global `stdlib` and `call(f, ...)`, which runs a job
    /// inline as the prelude does where nothing can wait, and says which way it went.
    fn state() -> Lua {
        let lua = Lua::new();
        let rust = lua.create_table().unwrap();
        super::install_runners(&lua, &rust).unwrap();
        lua.globals().set("stdlib", super::install(&lua).unwrap()).unwrap();
        lua.globals().set("run", rust.get::<Function>("stdlib_run").unwrap()).unwrap();
        lua.load(
            r#"
            function call(f, ...)
              local how, ok, a, b = "inline", f(...)
              if ok == "pending" then how, ok, a, b = "job", run(a) end
              assert(ok == true, tostring(a))
              return how, a, b
            end
            "#,
        )
        .exec()
        .unwrap();
        lua
    }

    fn bytes(n: usize) -> Vec<u8> {
        (0..n as u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8).collect()
    }

    /// `(how, result)` of `code`, a Lua expression over `s` that calls a helper through `call`.
    fn run(lua: &Lua, code: &str, s: &[u8]) -> (String, Vec<u8>) {
        lua.globals().set("s", lua.create_string(s).unwrap()).unwrap();
        let (how, out): (String, mlua::LuaString) = lua.load(code).eval().unwrap();
        (how, out.as_bytes().to_vec())
    }

    fn way(len: usize, limit: usize) -> &'static str {
        if len <= limit {
            "inline"
        } else {
            "job"
        }
    }

    #[test]
    fn encodings_and_digests_agree_on_both_sides_of_the_limit() {
        let lua = state();
        for (limit, key) in [(super::INLINE_BYTES, 0), (super::INLINE_BYTES, 6), (super::INLINE_BYTES_RE, 0)] {
            for len in [limit - key - 1, limit - key, limit - key + 1] {
                let data = bytes(len);
                let want = way(len + key, limit);
                if limit == super::INLINE_BYTES_RE {
                    let hex = super::hex::encode(&data).into_bytes();
                    assert_eq!(run(&lua, "return call(stdlib.hex.encode, s)", &data), (want.to_string(), hex.clone()), "hex {len}");
                    let back = run(&lua, "return call(stdlib.hex.decode, s)", &hex);
                    assert_eq!(back.1, data, "hex decode {len}");
                } else if key == 0 {
                    let b64 = super::base64::encode(&data, true, false);
                    let got = run(&lua, "return call(stdlib.base64.encode, s, { url = true, pad = false })", &data);
                    assert_eq!(got, (want.to_string(), b64.clone()), "base64 {len}");
                    assert_eq!(run(&lua, "return call(stdlib.base64.decode, s, { url = true })", &b64).1, data, "base64 decode {len}");
                    let sha = super::crypto::digest("sha256", &data).unwrap();
                    assert_eq!(run(&lua, "return call(stdlib.crypto.sha256, s)", &data), (want.to_string(), sha), "sha256 {len}");
                } else {
                    let mac = super::crypto::hmac("sha1", b"secret", &data).unwrap();
                    assert_eq!(run(&lua, r#"return call(stdlib.crypto.hmac, "sha1", "secret", s)"#, &data), (want.to_string(), mac), "hmac {len}");
                }
            }
        }
    }

    #[test]
    fn regular_expressions_agree_on_both_sides_of_the_limit() {
        let lua = state();
        let limit = super::INLINE_BYTES_RE;
        for len in [limit - 1, limit, limit + 1] {
            // Filler without the pattern's characters, then an id the pattern captures at the end.
            let tail = br#""id":"ord_7""#;
            let mut s: Vec<u8> = b"lorem ipsum ".iter().copied().cycle().take(len - tail.len()).collect();
            s.extend_from_slice(tail);
            let want = way(len, limit).to_string();
            assert_eq!(
                run(&lua, r#"local how, m = call(stdlib.re.match, s, [["id":"(?P<id>\w+)"]]); return how, m[1] .. "|" .. m[0] .. "|" .. m.id"#, &s),
                (want.clone(), br#"ord_7|"id":"ord_7"|ord_7"#.to_vec())
            );
            let (_, found) = run(&lua, r#"local how, a, b = call(stdlib.re.find, s, "ord_(\\d)", -20); return how, a .. "-" .. b"#, &s);
            assert_eq!(found, format!("{}-{}", len - 5, len - 1).into_bytes());
            // The iterator reads the subject after the call returned, and after a collection.
            let gmatch = r#"local how, it = call(stdlib.re.gmatch, s, "(?:ipsum|ord)_?(\\d?)")
                collectgarbage()
                local n, last = 0, nil
                for m in it do n, last = n + 1, m[0] end
                return how, n .. " " .. last"#;
            let ipsums = (len - tail.len()) / 12 + usize::from((len - tail.len()) % 12 >= 11);
            assert_eq!(run(&lua, gmatch, &s), (want.clone(), format!("{} ord_7", ipsums + 1).into_bytes()));
            let (how, replaced) = run(&lua, r#"local how, out, n = call(stdlib.re.gsub, s, "ipsum", "IPSUM"); return how, out"#, &s);
            assert_eq!(how, way(len + 5, limit), "the replacement counts toward the limit");
            assert_eq!(replaced, String::from_utf8_lossy(&s).replace("ipsum", "IPSUM").into_bytes());
            let (_, pieces) = run(&lua, r#"local how, t = call(stdlib.re.split, s, "lorem "); return how, #t .. " " .. t[#t]"#, &s);
            assert!(pieces.ends_with(tail), "{}", String::from_utf8_lossy(&pieces));
        }
    }

    #[test]
    fn the_scratch_buffer_carries_nothing_from_one_call_to_the_next() {
        let lua = state();
        let long = bytes(3000);
        let long64 = super::base64::encode(&long, false, true);
        let calls = [
            ("return call(stdlib.base64.encode, s)", long.clone(), long64.clone()),
            ("return call(stdlib.base64.encode, s)", b"fo".to_vec(), b"Zm8=".to_vec()),
            ("return call(stdlib.base64.decode, s)", long64.clone(), long.clone()),
            // The decoder's buffer is sized by an estimate above what "Zm8" gives.
            ("return call(stdlib.base64.decode, s)", b"Zm8".to_vec(), b"fo".to_vec()),
            ("return call(stdlib.hex.encode, s)", b"\x01\xff".to_vec(), b"01ff".to_vec()),
            ("return call(stdlib.crypto.md5, s)", Vec::new(), ::hex::decode("d41d8cd98f00b204e9800998ecf8427e").unwrap()),
        ];
        for (code, input, want) in calls {
            assert_eq!(run(&lua, code, &input), ("inline".to_string(), want), "{code} over {} bytes", input.len());
        }
        // A refusal after a long result, then a short one.
        let refused: (bool, String) = lua.load(r#"return stdlib.base64.decode("Zm9vYmF!")"#).eval().unwrap();
        assert_eq!(refused, (false, "pmnc.base64.decode: invalid byte '!' at offset 7".to_string()));
        assert_eq!(run(&lua, "return call(stdlib.hex.decode, s)", b"00").1, vec![0]);
    }

    #[test]
    fn an_inline_encoding_asks_the_allocator_for_little_more_than_the_lua_string() {
        let lua = state();
        let encode: Function = lua.load("stdlib.base64.encode").eval().unwrap();
        let data = lua.create_string(bytes(4096)).unwrap();
        // The first call grows the scratch buffer; later ones find it.
        let _: mlua::MultiValue = encode.call(&data).unwrap();
        let (asked, out) = rustomnic_alloc_count::asked(|| encode.call::<(bool, mlua::LuaString)>(&data).unwrap());
        assert!(out.0);
        let len = out.1.as_bytes().len() as u64;
        assert_eq!(len, 5464);
        // Before: a copy of the input (4,096) and the encoded buffer (5,464) besides the string.
        assert!(asked < len + 1024, "asked the allocator for {asked} bytes to make a string of {len}");
    }
}
