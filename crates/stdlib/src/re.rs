//! `pmnc.re`: regular expressions over the `regex` crate, which matches in time linear in the
//! subject (no backtracking), so a pattern over outside input cannot be a ReDoS. Compiled
//! patterns are kept per worker thread in a small LRU cache; a pattern's compiled size is
//! bounded.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use mlua::{Function, Lua, LuaString, MultiValue, Table, Value as LuaValue};
use regex::bytes::{Captures, Regex, RegexBuilder};

use crate::{fail, opt_int, reported, run_over, string_arg, INLINE_BYTES_RE};

/// Compiled patterns kept per worker thread.
pub const CACHE_SIZE: usize = 256;
/// Most bytes a compiled pattern (and each lazy DFA) may take.
pub const SIZE_LIMIT: usize = 2 << 20;
/// Longest pattern text.
pub const PATTERN_MAX: usize = 32 << 10;
/// Most matches one `gmatch` or `split` collects.
pub const MATCHES_MAX: usize = 1_000_000;

// Shared, not cloned: a cloned `Regex` starts with an empty match cache (its lazy DFA is built
// again while it searches), which cost ~900k instructions for one search of 4 KiB.
struct Cache {
    map: HashMap<Vec<u8>, (Arc<Regex>, u64)>,
    tick: u64,
}

thread_local! {
    static CACHE: RefCell<Cache> = RefCell::new(Cache { map: HashMap::new(), tick: 0 });
}

/// `pattern` compiled, from this thread's cache when it was used lately.
pub fn compiled(pattern: &[u8], func: &str) -> Result<Arc<Regex>, String> {
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        c.tick += 1;
        let tick = c.tick;
        if let Some((re, used)) = c.map.get_mut(pattern) {
            *used = tick;
            return Ok(Arc::clone(re));
        }
        let re = Arc::new(compile(pattern, func)?);
        if c.map.len() >= CACHE_SIZE {
            if let Some(oldest) = c.map.iter().min_by_key(|(_, (_, used))| *used).map(|(k, _)| k.clone()) {
                c.map.remove(&oldest);
            }
        }
        c.map.insert(pattern.to_vec(), (Arc::clone(&re), tick));
        Ok(re)
    })
}

fn compile(pattern: &[u8], func: &str) -> Result<Regex, String> {
    if pattern.len() > PATTERN_MAX {
        return Err(format!("{func}: a pattern of {} bytes is over the limit of {PATTERN_MAX}", pattern.len()));
    }
    let text = std::str::from_utf8(pattern).map_err(|_| format!("{func}: the pattern is not UTF-8"))?;
    RegexBuilder::new(text)
        .size_limit(SIZE_LIMIT)
        .dfa_size_limit(SIZE_LIMIT)
        .build()
        .map_err(|e| format!("{func}: invalid pattern: {}", e.to_string().replace('\n', " ")))
}

#[cfg(test)]
fn cached() -> usize {
    CACHE.with(|c| c.borrow().map.len())
}

/// A match as positions, so it can leave the thread that found it.
struct Found {
    spans: Vec<Option<(usize, usize)>>,
}

impl Found {
    fn of(c: &Captures) -> Found {
        Found { spans: c.iter().map(|m| m.map(|m| (m.start(), m.end()))).collect() }
    }
}

fn match_table(lua: &Lua, re: &Regex, subject: &[u8], found: &Found) -> mlua::Result<Table> {
    // Groups 1.. go to the array part; the whole match (key 0) and the names to the hash part,
    // sized for them so that no insertion rehashes the table.
    let names = re.capture_names().flatten().count();
    let t = lua.create_table_with_capacity(found.spans.len().saturating_sub(1), 1 + names)?;
    for ((i, span), name) in found.spans.iter().enumerate().zip(re.capture_names()) {
        let v = match span {
            Some((s, e)) => LuaValue::String(lua.create_string(&subject[*s..*e])?),
            None => LuaValue::Boolean(false),
        };
        if let Some(name) = name {
            t.raw_set(name, v.clone())?;
        }
        t.raw_set(i, v)?;
    }
    Ok(t)
}

/// Lua position `init` (1-based, negative from the end), 1 when absent.
fn init_arg(init: &LuaValue, func: &str) -> Result<i64, String> {
    opt_int(init, func, "init", 1, i64::MIN, i64::MAX)
}

/// Start offset (0-based) of Lua position `i` in a subject of `len` bytes.
fn start_of(i: i64, len: usize) -> usize {
    let len = len as i64;
    let start = if i > 0 {
        i - 1
    } else if i == 0 {
        0
    } else {
        (len + i).max(0)
    };
    start.min(len) as usize
}

fn args<'a>(subject: &'a LuaValue, pattern: &LuaValue, func: &str) -> Result<(&'a LuaString, Arc<Regex>), String> {
    let s = string_arg(subject, func, "subject")?;
    let LuaValue::String(p) = pattern else {
        return Err(format!("{func}: the pattern must be a string, got {}", pattern.type_name()));
    };
    Ok((s, compiled(&p.as_bytes(), func)?))
}

/// Every match of `re` in `s` from `start`, at most `max`.
fn all(re: &Regex, s: &[u8], max: usize, func: &str) -> Result<Vec<Found>, String> {
    let mut out = Vec::new();
    for c in re.captures_iter(s) {
        if out.len() >= max {
            return Err(format!("{func}: more than {max} matches"));
        }
        out.push(Found::of(&c));
    }
    Ok(out)
}

/// `s` with `n` (or every) match replaced by the expansion of `repl` (`$1`, `${name}`).
fn replace(re: &Regex, s: &[u8], repl: &[u8], n: usize) -> (Vec<u8>, usize) {
    let mut out = Vec::with_capacity(s.len());
    let mut last = 0;
    let mut count = 0;
    for c in re.captures_iter(s) {
        if count >= n {
            break;
        }
        let Some(m) = c.get(0) else { continue };
        out.extend_from_slice(&s[last..m.start()]);
        c.expand(repl, &mut out);
        last = m.end();
        count += 1;
    }
    out.extend_from_slice(&s[last..]);
    (out, count)
}

fn split(re: &Regex, s: &[u8], max: usize) -> Result<Vec<(usize, usize)>, String> {
    let mut out = Vec::new();
    let mut last = 0;
    for m in re.find_iter(s) {
        if out.len() + 1 >= max {
            break;
        }
        if out.len() >= MATCHES_MAX {
            return Err(format!("pmnc.re.split: more than {MATCHES_MAX} pieces"));
        }
        out.push((last, m.start()));
        last = m.end();
    }
    out.push((last, s.len()));
    Ok(out)
}

fn gsub_lua(lua: &Lua, re: &Regex, s: &[u8], repl: &LuaValue, n: usize) -> Result<mlua::Result<MultiValue>, String> {
    let f = "pmnc.re.gsub";
    let found = all(re, s, MATCHES_MAX, f)?;
    let run = || -> mlua::Result<Result<MultiValue, String>> {
        let mut out = Vec::with_capacity(s.len());
        let mut last = 0;
        let mut count = 0;
        for m in found.iter().take(n) {
            let Some((start, end)) = m.spans[0] else { continue };
            out.extend_from_slice(&s[last..start]);
            let t = match_table(lua, re, s, m)?;
            let value: LuaValue = match repl {
                LuaValue::Function(func) => Function::call(func, t)?,
                LuaValue::Table(map) => {
                    let key: LuaValue = if m.spans.len() > 1 { t.raw_get(1)? } else { t.raw_get(0)? };
                    map.get(key)?
                }
                _ => LuaValue::Nil,
            };
            match value {
                LuaValue::Nil | LuaValue::Boolean(false) => out.extend_from_slice(&s[start..end]),
                LuaValue::String(r) => out.extend_from_slice(&r.as_bytes()),
                LuaValue::Integer(i) => out.extend_from_slice(i.to_string().as_bytes()),
                LuaValue::Number(x) => out.extend_from_slice(x.to_string().as_bytes()),
                other => return Ok(Err(format!("{f}: the replacement must give a string, got {}", other.type_name()))),
            }
            last = end;
            count += 1;
        }
        out.extend_from_slice(&s[last..]);
        Ok(Ok(MultiValue::from_iter([LuaValue::String(lua.create_string(out)?), LuaValue::Integer(count)])))
    };
    Ok(match run() {
        Ok(Ok(mut v)) => {
            v.push_front(LuaValue::Boolean(true));
            Ok(v)
        }
        Ok(Err(m)) => fail(lua, m),
        Err(e) => Err(e),
    })
}

pub(crate) fn install(lua: &Lua, t: &Table) -> mlua::Result<()> {
    t.set(
        "match",
        lua.create_function(|lua, (subject, pattern, init): (LuaValue, LuaValue, LuaValue)| {
            reported(lua, || {
                let f = "pmnc.re.match";
                let (s, re) = args(&subject, &pattern, f)?;
                let init = init_arg(&init, f)?;
                Ok(run_over(
                    lua,
                    s,
                    [],
                    INLINE_BYTES_RE,
                    move |s, []| {
                        let found = re.captures_at(s, start_of(init, s.len())).map(|c| Found::of(&c));
                        Ok((re, found))
                    },
                    |lua, s, (re, found)| match found {
                        Some(found) => Ok(MultiValue::from_iter([LuaValue::Table(match_table(lua, &re, &s, &found)?)])),
                        None => Ok(MultiValue::from_iter([LuaValue::Nil])),
                    },
                ))
            })
        })?,
    )?;
    t.set(
        "find",
        lua.create_function(|lua, (subject, pattern, init): (LuaValue, LuaValue, LuaValue)| {
            reported(lua, || {
                let f = "pmnc.re.find";
                let (s, re) = args(&subject, &pattern, f)?;
                let init = init_arg(&init, f)?;
                Ok(run_over(
                    lua,
                    s,
                    [],
                    INLINE_BYTES_RE,
                    move |s, []| Ok(re.find_at(s, start_of(init, s.len())).map(|m| (m.start(), m.end()))),
                    |_, _, found| match found {
                        Some((s, e)) => Ok(MultiValue::from_iter([LuaValue::Integer(s as i64 + 1), LuaValue::Integer(e as i64)])),
                        None => Ok(MultiValue::from_iter([LuaValue::Nil])),
                    },
                ))
            })
        })?,
    )?;
    t.set(
        "gmatch",
        lua.create_function(|lua, (subject, pattern): (LuaValue, LuaValue)| {
            reported(lua, || {
                let f = "pmnc.re.gmatch";
                let (s, re) = args(&subject, &pattern, f)?;
                Ok(run_over(
                    lua,
                    s,
                    [],
                    INLINE_BYTES_RE,
                    move |s, []| {
                        let found = all(&re, s, MATCHES_MAX, f)?;
                        Ok((re, found))
                    },
                    |lua, s, (re, found)| {
                        let s = s.keep();
                        let mut next = found.into_iter();
                        let iter = lua.create_function_mut(move |lua, ()| match next.next() {
                            Some(m) => Ok(LuaValue::Table(s.read(|s| match_table(lua, &re, s, &m))?)),
                            None => Ok(LuaValue::Nil),
                        })?;
                        Ok(MultiValue::from_iter([LuaValue::Function(iter)]))
                    },
                ))
            })
        })?,
    )?;
    t.set(
        "gsub",
        lua.create_function(|lua, (subject, pattern, repl, n): (LuaValue, LuaValue, LuaValue, LuaValue)| {
            reported(lua, || {
                let f = "pmnc.re.gsub";
                let (s, re) = args(&subject, &pattern, f)?;
                let n = opt_int(&n, f, "n", i64::MAX, 0, i64::MAX)? as usize;
                match &repl {
                    LuaValue::String(r) => Ok(run_over(
                        lua,
                        s,
                        [r],
                        INLINE_BYTES_RE,
                        move |s, [r]| Ok(replace(&re, s, r, n)),
                        |lua, _, (out, count)| Ok(MultiValue::from_iter([LuaValue::String(lua.create_string(out)?), LuaValue::Integer(count as i64)])),
                    )),
                    LuaValue::Function(_) | LuaValue::Table(_) => gsub_lua(lua, &re, &s.as_bytes(), &repl, n),
                    other => Err(format!("{f}: the replacement must be a string, function or table, got {}", other.type_name())),
                }
            })
        })?,
    )?;
    t.set(
        "split",
        lua.create_function(|lua, (subject, pattern, max): (LuaValue, LuaValue, LuaValue)| {
            reported(lua, || {
                let f = "pmnc.re.split";
                let (s, re) = args(&subject, &pattern, f)?;
                let max = opt_int(&max, f, "max", i64::MAX, 1, i64::MAX)? as usize;
                Ok(run_over(
                    lua,
                    s,
                    [],
                    INLINE_BYTES_RE,
                    move |s, []| split(&re, s, max),
                    |lua, s, pieces| {
                        let t = lua.create_table_with_capacity(pieces.len(), 0)?;
                        for (a, b) in pieces {
                            t.raw_push(lua.create_string(&s[a..b])?)?;
                        }
                        Ok(MultiValue::from_iter([LuaValue::Table(t)]))
                    },
                ))
            })
        })?,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catastrophic_backtracking_is_linear() {
        let re = compiled(b"(a+)+$", "t").unwrap();
        let subject = "a".repeat(50_000) + "!";
        assert!(re.find(subject.as_bytes()).is_none());
        let ok = "a".repeat(50_000);
        assert!(re.is_match(ok.as_bytes()));
    }

    #[test]
    fn cache_is_bounded() {
        for i in 0..CACHE_SIZE + 10 {
            compiled(format!("x{i}").as_bytes(), "t").unwrap();
        }
        assert_eq!(cached(), CACHE_SIZE);
    }

    #[test]
    fn a_cached_pattern_is_the_same_regex_with_its_match_cache() {
        // A clone would start with an empty lazy DFA, built again on every search.
        let a = compiled(br#""id":"(\w+)""#, "t").unwrap();
        let b = compiled(br#""id":"(\w+)""#, "t").unwrap();
        assert!(Arc::ptr_eq(&a, &b));
    }

    #[test]
    fn size_limit_refuses_huge_programs() {
        let e = compile(b"(\\w{100}){100}", "pmnc.re.match").unwrap_err();
        assert!(e.starts_with("pmnc.re.match: invalid pattern:"), "{e}");
        assert!(compile(b"(", "f").unwrap_err().contains("invalid pattern"));
    }

    #[test]
    fn replace_and_split() {
        let re = compiled(br"(?P<k>\w+)=(\d+)", "t").unwrap();
        assert_eq!(replace(&re, b"a=1, b=2", b"${k}:$2", usize::MAX), (b"a:1, b:2".to_vec(), 2));
        assert_eq!(replace(&re, b"a=1, b=2", b"x", 1), (b"x, b=2".to_vec(), 1));
        let comma = compiled(br"\s*,\s*", "t").unwrap();
        assert_eq!(split(&comma, b"a , b,c", usize::MAX).unwrap(), vec![(0, 1), (4, 5), (6, 7)]);
        assert_eq!(split(&comma, b"a , b,c", 2).unwrap(), vec![(0, 1), (4, 7)]);
    }
}
