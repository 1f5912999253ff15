//! `string.find`, `string.match`, `string.gmatch` and `string.gsub` for module code, on the
//! resumable matcher of [`crate::pattern`]: a long search stops at the end of the request's time
//! slice and hands back a state that the prelude resumes after yielding, so a pattern over a big
//! body never freezes the worker, and fails at the deadline whatever the pattern.
//!
//! Every function returns either its results, or `SUSPEND, state` (call `resume(state, s, p)`
//! after yielding), or `FAIL, message` (the prelude raises it at the caller's line), or for
//! `gsub` with a function or table replacement `DELEGATE, s, p, max` (the prelude runs that loop
//! in Lua, where the replacement function can be time-sliced like any other code).

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use mlua::{AnyUserData, LightUserData, Lua, LuaString, MultiValue, Table, Value as LuaValue};

use crate::pattern::{self, Captured, Control, Found, Search};
use crate::request::VmShared;

static SUSPEND_MARK: u8 = 0;
static FAIL_MARK: u8 = 0;
static DELEGATE_MARK: u8 = 0;

fn mark(m: &'static u8) -> LuaValue {
    LuaValue::LightUserData(LightUserData(m as *const u8 as *mut std::ffi::c_void))
}

/// Which function a suspended search belongs to, with what it needs to finish.
enum Op {
    Find,
    Match,
    /// A `gmatch` iterator's step; its position and last match end live in `it`.
    Gmatch {
        it: Table,
    },
    /// A `gsub` with a replacement string.
    Gsub {
        repl: Vec<u8>,
        max: i64,
        count: i64,
        out: Vec<u8>,
        pos: usize,
    },
    /// One step of the prelude's `gsub` loop for function and table replacements (a table is
    /// indexed with the first capture only, and only that one is taken).
    GsubNext {
        first_only: bool,
    },
}

/// A search stopped at the end of a time slice (held by the prelude as userdata).
struct Suspended {
    op: Op,
    search: Search,
    watch: Watch,
}

/// Decides, every few thousand matching steps, whether to go on, stop for a yield, or fail.
#[derive(Default)]
pub(crate) struct Watch {
    shared: Option<Rc<VmShared>>,
    /// The slice in which this search last stopped for a yield: if it is asked again in the
    /// same slice, the caller could not yield (a callback run by C code).
    stopped_in: Option<Instant>,
    function: &'static str,
}

impl Watch {
    fn new(function: &'static str) -> Watch {
        Watch { shared: None, stopped_in: None, function }
    }

    fn check(&mut self, lua: &Lua) -> Control {
        if self.shared.is_none() {
            self.shared = lua.app_data_ref::<Rc<VmShared>>().map(|s| s.clone());
        }
        let Some(shared) = &self.shared else {
            return Control::Continue;
        };
        let now = Instant::now();
        match shared.check_running(now) {
            Running::Go => Control::Continue,
            Running::Stop(m) => Control::Fail(m),
            Running::SliceOver { slice_start, past_deadline } => {
                if self.stopped_in != Some(slice_start) {
                    self.stopped_in = Some(slice_start);
                    return Control::Suspend;
                }
                // Asked to yield before and could not: the code around us cannot yield.
                if past_deadline {
                    return Control::Fail(shared.stop(format!("{}: the request's deadline passed", self.function)));
                }
                let ran = now.duration_since(slice_start);
                if ran >= shared.limits.unyielding {
                    return Control::Fail(shared.stop(unyielding_message(self.function, ran, shared.limits.unyielding)));
                }
                Control::Continue
            }
        }
    }
}

/// The error of code that ran longer than `unyielding_limit` where it could not yield.
pub(crate) fn unyielding_message(what: &str, ran: Duration, limit: Duration) -> String {
    format!(
        "{what} ran {} ms without a chance to yield (inside a function called by C code: a metamethod such as \
         __tostring or __index used by a library function, or an xpcall message handler); \
         the cage's [lua] unyielding_limit is {} ms",
        ran.as_millis(),
        limit.as_millis()
    )
}

/// What [`VmShared::check_running`] finds.
pub(crate) enum Running {
    Go,
    /// The time slice is over (or the deadline passed): stop for a yield if possible.
    SliceOver {
        slice_start: Instant,
        past_deadline: bool,
    },
    /// Stop with this error now.
    Stop(String),
}

fn fail(lua: &Lua, message: &str) -> mlua::Result<MultiValue> {
    Ok(MultiValue::from_iter([mark(&FAIL_MARK), LuaValue::String(lua.create_string(message)?)]))
}

fn bad_argument(lua: &Lua, n: usize, function: &str, message: &str) -> mlua::Result<MultiValue> {
    fail(lua, &format!("bad argument #{n} to '{function}' ({message})"))
}

/// A string argument (numbers are converted as Lua converts them).
fn string_arg(lua: &Lua, v: LuaValue) -> mlua::Result<Result<LuaString, String>> {
    match v {
        LuaValue::String(s) => Ok(Ok(s)),
        LuaValue::Integer(_) | LuaValue::Number(_) => match lua.coerce_string(v)? {
            Some(s) => Ok(Ok(s)),
            None => Ok(Err("string expected, got number".into())),
        },
        other => Ok(Err(format!("string expected, got {}", type_name(&other)))),
    }
}

fn type_name(v: &LuaValue) -> &'static str {
    match v {
        LuaValue::Nil => "no value",
        LuaValue::LightUserData(_) | LuaValue::UserData(_) => "userdata",
        other => other.type_name(),
    }
}

/// An optional integer argument (floats with an exact integer value and numeric strings too).
fn integer_arg(lua: &Lua, v: LuaValue, default: i64) -> mlua::Result<Result<i64, String>> {
    match v {
        LuaValue::Nil => Ok(Ok(default)),
        LuaValue::Integer(i) => Ok(Ok(i)),
        LuaValue::Number(_) | LuaValue::String(_) => match lua.coerce_integer(v.clone())? {
            Some(i) => Ok(Ok(i)),
            None if matches!(v, LuaValue::Number(_)) => Ok(Err("number has no integer representation".into())),
            None => match lua.coerce_number(v)? {
                Some(_) => Ok(Err("number has no integer representation".into())),
                None => Ok(Err("number expected, got string".into())),
            },
        },
        other => Ok(Err(format!("number expected, got {}", type_name(&other)))),
    }
}

/// Lua's reading of a start position: negative counts from the end, 0 is 1.
fn start_position(pos: i64, len: usize) -> usize {
    let len = len as i64;
    let p = if pos > 0 {
        pos
    } else if pos == 0 || pos < -len {
        1
    } else {
        len + pos + 1
    };
    (p - 1) as usize
}

fn push_capture(lua: &Lua, out: &mut MultiValue, src: &[u8], c: Captured) -> mlua::Result<()> {
    out.push_back(match c {
        Captured::Slice(a, b) => LuaValue::String(lua.create_string(&src[a..b])?),
        Captured::Position(n) => LuaValue::Integer(n as i64),
    });
    Ok(())
}

fn push_captures(lua: &Lua, out: &mut MultiValue, src: &[u8], search: &Search, s: usize, e: usize, whole: bool) -> Result<mlua::Result<()>, String> {
    let caps = search.matcher.captures(s, e, whole).map_err(|e| e.0)?;
    for c in caps {
        if let Err(e) = push_capture(lua, out, src, c) {
            return Ok(Err(e));
        }
    }
    Ok(Ok(()))
}

/// Runs (or resumes) `search`, then finishes `op` with what it found.
fn drive(lua: &Lua, s: &LuaString, p: &LuaString, mut op: Op, mut search: Search, mut watch: Watch) -> mlua::Result<MultiValue> {
    let src = s.as_bytes();
    let pat = p.as_bytes();
    let gsub_cap =
        if matches!(op, Op::Gsub { .. }) { lua.app_data_ref::<Rc<VmShared>>().map(|s| s.limits.request_memory).unwrap_or(usize::MAX) } else { usize::MAX };
    loop {
        let found = {
            let mut control = || watch.check(lua);
            match search.run(&src, &pat, &mut control) {
                Ok(f) => f,
                Err(e) => return fail(lua, &e.0),
            }
        };
        if found == Found::Suspended {
            let state = lua.create_any_userdata(RefCell::new(Some(Suspended { op, search, watch })))?;
            return Ok(MultiValue::from_iter([mark(&SUSPEND_MARK), LuaValue::UserData(state)]));
        }
        let mut out = MultiValue::new();
        match &mut op {
            Op::Find => {
                let Found::At(a, e) = found else {
                    return Ok(MultiValue::from_iter([LuaValue::Nil]));
                };
                out.push_back(LuaValue::Integer(a as i64 + 1));
                out.push_back(LuaValue::Integer(e as i64));
                if let Err(m) = push_captures(lua, &mut out, &src, &search, a, e, false) {
                    return fail(lua, &m);
                }
                return Ok(out);
            }
            Op::Match | Op::GsubNext { .. } => {
                let Found::At(a, e) = found else {
                    return Ok(MultiValue::from_iter([LuaValue::Nil]));
                };
                if let Op::GsubNext { first_only } = op {
                    out.push_back(LuaValue::Integer(a as i64 + 1));
                    out.push_back(LuaValue::Integer(e as i64));
                    if first_only {
                        match search.matcher.capture(0, a, e) {
                            Ok(c) => push_capture(lua, &mut out, &src, c)?,
                            Err(m) => return fail(lua, &m.0),
                        }
                        return Ok(out);
                    }
                }
                if let Err(m) = push_captures(lua, &mut out, &src, &search, a, e, true) {
                    return fail(lua, &m);
                }
                return Ok(out);
            }
            Op::Gmatch { it } => {
                let Found::At(a, e) = found else {
                    it.raw_set(1, src.len() as i64 + 1)?;
                    return Ok(MultiValue::from_iter([LuaValue::Nil]));
                };
                it.raw_set(1, e as i64)?;
                it.raw_set(2, e as i64)?;
                if let Err(m) = push_captures(lua, &mut out, &src, &search, a, e, true) {
                    return fail(lua, &m);
                }
                return Ok(out);
            }
            Op::Gsub { repl, max, count, out: buf, pos } => {
                match found {
                    Found::At(a, e) => {
                        buf.extend_from_slice(&src[*pos..a]);
                        if let Err(m) = pattern::expand(repl, &src, &search.matcher, a, e, buf) {
                            return fail(lua, &m.0);
                        }
                        // The result is built outside Lua's memory accounting: bound it the same.
                        if buf.len() > gsub_cap {
                            return fail(
                                lua,
                                &format!("not enough memory: the result of string.gsub would be over the request's limit of {} MiB", gsub_cap >> 20),
                            );
                        }
                        *count += 1;
                        *pos = e;
                        if *count < *max && !search.anchor {
                            search.next = e;
                            search.last = Some(e);
                            continue;
                        }
                    }
                    Found::Nothing | Found::Suspended => {}
                }
                buf.extend_from_slice(&src[*pos..]);
                return Ok(MultiValue::from_iter([LuaValue::String(lua.create_string(&buf[..])?), LuaValue::Integer(*count)]));
            }
        }
    }
}

/// Registers the string functions in the prelude's table of Rust helpers.
pub(crate) fn register(lua: &Lua, t: &Table) -> mlua::Result<()> {
    t.set("str_suspend", mark(&SUSPEND_MARK))?;
    t.set("str_fail", mark(&FAIL_MARK))?;
    t.set("str_delegate", mark(&DELEGATE_MARK))?;
    t.set(
        "str_find",
        lua.create_function(|lua, (s, p, init, plain): (LuaValue, LuaValue, LuaValue, LuaValue)| find_or_match(lua, "find", s, p, init, plain))?,
    )?;
    t.set("str_match", lua.create_function(|lua, (s, p, init): (LuaValue, LuaValue, LuaValue)| find_or_match(lua, "match", s, p, init, LuaValue::Nil))?)?;
    // gmatch(s, p, init) -> s, p, it: the checked arguments and the iterator's state
    // {next start, end of the last match}.
    t.set(
        "str_gmatch",
        lua.create_function(|lua, (s, p, init): (LuaValue, LuaValue, LuaValue)| {
            let s = match string_arg(lua, s)? {
                Ok(s) => s,
                Err(m) => return bad_argument(lua, 1, "gmatch", &m),
            };
            let p = match string_arg(lua, p)? {
                Ok(p) => p,
                Err(m) => return bad_argument(lua, 2, "gmatch", &m),
            };
            let init = match integer_arg(lua, init, 1)? {
                Ok(i) => i,
                Err(m) => return bad_argument(lua, 3, "gmatch", &m),
            };
            let len = s.as_bytes().len();
            let start = start_position(init, len).min(len + 1);
            let it = lua.create_table()?;
            it.raw_set(1, start as i64)?;
            it.raw_set(2, -1)?;
            Ok(MultiValue::from_iter([LuaValue::String(s), LuaValue::String(p), LuaValue::Table(it)]))
        })?,
    )?;
    t.set(
        "str_gmatch_step",
        lua.create_function(|lua, (s, p, it): (LuaString, LuaString, Table)| {
            let next: i64 = it.raw_get(1)?;
            let last: i64 = it.raw_get(2)?;
            let pat = p.as_bytes();
            let search = Search::new(&pat, next.max(0) as usize, false, usize::try_from(last).ok());
            drop(pat);
            drive(lua, &s, &p, Op::Gmatch { it }, search, Watch::new("string.gmatch"))
        })?,
    )?;
    t.set(
        "str_gsub",
        lua.create_function(|lua, (s, p, repl, n): (LuaValue, LuaValue, LuaValue, LuaValue)| {
            let s = match string_arg(lua, s)? {
                Ok(s) => s,
                Err(m) => return bad_argument(lua, 1, "gsub", &m),
            };
            let p = match string_arg(lua, p)? {
                Ok(p) => p,
                Err(m) => return bad_argument(lua, 2, "gsub", &m),
            };
            let len = s.as_bytes().len();
            let max = match integer_arg(lua, n, len as i64 + 1)? {
                Ok(m) => m,
                Err(m) => return bad_argument(lua, 4, "gsub", &m),
            };
            let repl = match repl {
                LuaValue::String(r) => r.as_bytes().to_vec(),
                LuaValue::Integer(_) | LuaValue::Number(_) => match lua.coerce_string(repl)? {
                    Some(r) => r.as_bytes().to_vec(),
                    None => return bad_argument(lua, 3, "gsub", "string/function/table expected, got number"),
                },
                LuaValue::Function(_) | LuaValue::Table(_) => {
                    return Ok(MultiValue::from_iter([mark(&DELEGATE_MARK), LuaValue::String(s), LuaValue::String(p), LuaValue::Integer(max)]))
                }
                other => return bad_argument(lua, 3, "gsub", &format!("string/function/table expected, got {}", type_name(&other))),
            };
            if max <= 0 {
                return Ok(MultiValue::from_iter([LuaValue::String(s), LuaValue::Integer(0)]));
            }
            let pat = p.as_bytes();
            let search = Search::new(&pat, 0, true, None);
            drop(pat);
            let op = Op::Gsub { repl, max, count: 0, out: Vec::with_capacity(len.min(1 << 16)), pos: 0 };
            drive(lua, &s, &p, op, search, Watch::new("string.gsub"))
        })?,
    )?;
    // gsub_next(s, p, pos, last, first_only) -> start, end, captures...: the first match at or
    // after pos (1-based) whose end is not `last`, for the prelude's gsub loop.
    t.set(
        "str_gsub_next",
        lua.create_function(|lua, (s, p, pos, last, first_only): (LuaString, LuaString, i64, i64, bool)| {
            let pat = p.as_bytes();
            let mut search = Search::new(&pat, 0, true, usize::try_from(last).ok());
            drop(pat);
            search.next = (pos.max(1) - 1) as usize;
            drive(lua, &s, &p, Op::GsubNext { first_only }, search, Watch::new("string.gsub"))
        })?,
    )?;
    t.set(
        "str_resume",
        lua.create_function(|lua, (state, s, p): (AnyUserData, LuaValue, LuaValue)| {
            // The prelude passes the arguments of the first call again; numbers become strings
            // exactly as they did then.
            let (Ok(s), Ok(p)) = (string_arg(lua, s)?, string_arg(lua, p)?) else {
                return fail(lua, "internal error: a pattern search was resumed with other arguments");
            };
            let taken = state.borrow::<RefCell<Option<Suspended>>>()?.borrow_mut().take();
            let Some(Suspended { op, search, watch }) = taken else {
                return fail(lua, "internal error: a pattern search was resumed twice");
            };
            drive(lua, &s, &p, op, search, watch)
        })?,
    )?;
    Ok(())
}

fn find_or_match(lua: &Lua, name: &'static str, s: LuaValue, p: LuaValue, init: LuaValue, plain: LuaValue) -> mlua::Result<MultiValue> {
    let s = match string_arg(lua, s)? {
        Ok(s) => s,
        Err(m) => return bad_argument(lua, 1, name, &m),
    };
    let p = match string_arg(lua, p)? {
        Ok(p) => p,
        Err(m) => return bad_argument(lua, 2, name, &m),
    };
    let init = match integer_arg(lua, init, 1)? {
        Ok(i) => i,
        Err(m) => return bad_argument(lua, 3, name, &m),
    };
    let find = name == "find";
    let src = s.as_bytes();
    let pat = p.as_bytes();
    let start = start_position(init, src.len());
    if start > src.len() {
        return Ok(MultiValue::from_iter([LuaValue::Nil]));
    }
    let plain = !matches!(plain, LuaValue::Nil | LuaValue::Boolean(false));
    if find && (plain || pattern::is_plain(&pat)) {
        // A plain search is linear (two-way string matching), whatever the input.
        return Ok(match memchr::memmem::find(&src[start..], &pat) {
            Some(at) => MultiValue::from_iter([LuaValue::Integer((start + at + 1) as i64), LuaValue::Integer((start + at + pat.len()) as i64)]),
            None => MultiValue::from_iter([LuaValue::Nil]),
        });
    }
    let search = Search::new(&pat, start, true, None);
    drop((src, pat));
    let (op, what) = if find { (Op::Find, "string.find") } else { (Op::Match, "string.match") };
    drive(lua, &s, &p, op, search, Watch::new(what))
}

#[cfg(test)]
mod tests {
    #[test]
    fn start_positions_as_lua_reads_them() {
        use super::start_position;
        assert_eq!(start_position(1, 5), 0);
        assert_eq!(start_position(0, 5), 0);
        assert_eq!(start_position(-2, 5), 3);
        assert_eq!(start_position(-9, 5), 0);
        assert_eq!(start_position(7, 5), 6);
    }
}
