//! The helper families module code finds under `pmnc` besides the runtime's own API
//! (`pmnc.base64`, `pmnc.crypto`, ...): one file per family, each a table of functions, and the
//! shared way they report failures and move big inputs off the worker (docs/decisions/070).

use mlua::{AnyUserData, Lua, MultiValue, Table, Value as LuaValue};

// Public for the fuzz targets (fuzz/fuzz_targets/stdlib_*.rs) and the helpers' own tests.
pub mod base64;
pub mod celery;
pub mod compress;
pub mod crypto;
pub mod csv;
pub mod hex;
pub mod re;
pub mod time;
pub mod url;
mod uuid;
pub mod xml;

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

/// Registers `stdlib_wait(job)` (async: runs the job on the blocking pool) and `stdlib_run(job)`
/// (the same inline) in the table of Rust functions the prelude receives.
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
    run_within(lua, size, INLINE_BYTES, work, finish)
}

/// `run_sized` with the family's own inline limit.
pub(crate) fn run_within<T, W, F>(lua: &Lua, size: usize, inline: usize, work: W, finish: F) -> mlua::Result<MultiValue>
where
    T: Send + 'static,
    W: FnOnce() -> Result<T, String> + Send + 'static,
    F: FnOnce(&Lua, T) -> mlua::Result<MultiValue> + Send + 'static,
{
    if size <= inline {
        return match work() {
            Ok(v) => {
                let mut values = finish(lua, v)?;
                values.push_front(LuaValue::Boolean(true));
                Ok(values)
            }
            Err(m) => fail(lua, m),
        };
    }
    pending(lua, work, finish)
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

/// The bytes of a string argument, or the message naming the function and the argument.
pub(crate) fn bytes_arg(v: &LuaValue, func: &str, what: &str) -> Result<Vec<u8>, String> {
    match v {
        LuaValue::String(s) => Ok(s.as_bytes().to_vec()),
        other => Err(format!("{func}: {what} must be a string, got {}", other.type_name())),
    }
}

/// A string argument's length without copying it (0 for anything else).
pub(crate) fn len_of(v: &LuaValue) -> usize {
    match v {
        LuaValue::String(s) => s.as_bytes().len(),
        _ => 0,
    }
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
