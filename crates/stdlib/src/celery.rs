//! `pmnc.celery`: what a task served by the celery interface asks of its worker. `retry` ends
//! the task with an error that the interface reads as "queue this task again" (Celery's
//! `self.retry`); anywhere else it is an ordinary error with a clear message.

use mlua::{Lua, Table, Value as LuaValue};

use crate::reported;

/// What a retry's error message starts with (after the `file:line:` Lua puts before it).
pub const RETRY_MARK: &str = "pmnc.celery.retry:";
/// Celery's `default_retry_delay` and `max_retries`.
pub const DEFAULT_COUNTDOWN: f64 = 180.0;
pub const DEFAULT_MAX_RETRIES: u32 = 3;

/// A retry a task asked for.
#[derive(Debug, PartialEq)]
pub struct Retry {
    /// Seconds before the task runs again.
    pub countdown: f64,
    /// How many retries the task may have in all (None: no limit).
    pub max_retries: Option<u32>,
    pub reason: String,
}

/// The error text of a retry: what [`parse_retry`] reads back.
pub fn retry_message(r: &Retry) -> String {
    let max = r.max_retries.map(|m| m.to_string()).unwrap_or_else(|| "none".into());
    format!("{RETRY_MARK} countdown={} max_retries={max}: {}", r.countdown, r.reason)
}

/// The retry in a failed task's error message, if it is one.
pub fn parse_retry(message: &str) -> Option<Retry> {
    let rest = &message[message.find(RETRY_MARK)? + RETRY_MARK.len()..];
    let rest = rest.strip_prefix(" countdown=")?;
    let (countdown, rest) = rest.split_once(" max_retries=")?;
    let (max, reason) = rest.split_once(": ")?;
    let countdown: f64 = countdown.parse().ok().filter(|c: &f64| c.is_finite() && *c >= 0.0)?;
    let max_retries = if max == "none" { None } else { Some(max.parse().ok()?) };
    Some(Retry { countdown, max_retries, reason: reason.lines().next().unwrap_or("").to_string() })
}

fn read(opts: &LuaValue) -> Result<Retry, String> {
    let t = match opts {
        LuaValue::Nil => return Ok(Retry { countdown: DEFAULT_COUNTDOWN, max_retries: Some(DEFAULT_MAX_RETRIES), reason: "retry".into() }),
        LuaValue::Table(t) => t,
        other => return Err(format!("pmnc.celery.retry: the options must be a table, got {}", other.type_name())),
    };
    let countdown = match t.raw_get::<LuaValue>("countdown").map_err(|e| e.to_string())? {
        LuaValue::Nil => DEFAULT_COUNTDOWN,
        LuaValue::Integer(n) if n >= 0 => n as f64,
        LuaValue::Number(n) if n.is_finite() && n >= 0.0 => n,
        other => return Err(format!("pmnc.celery.retry: countdown must be a number of seconds >= 0, got {}", other.type_name())),
    };
    let max_retries = match t.raw_get::<LuaValue>("max_retries").map_err(|e| e.to_string())? {
        LuaValue::Nil => Some(DEFAULT_MAX_RETRIES),
        LuaValue::Boolean(false) => None,
        LuaValue::Integer(n) if (0..=1_000_000).contains(&n) => Some(n as u32),
        other => return Err(format!("pmnc.celery.retry: max_retries must be an integer 0..1000000 or false (no limit), got {}", other.type_name())),
    };
    let reason = match t.raw_get::<LuaValue>("reason").map_err(|e| e.to_string())? {
        LuaValue::Nil => "retry".to_string(),
        LuaValue::String(s) => s.to_string_lossy().replace('\n', " "),
        other => return Err(format!("pmnc.celery.retry: reason must be a string, got {}", other.type_name())),
    };
    Ok(Retry { countdown, max_retries, reason })
}

pub(crate) fn install(lua: &Lua, t: &Table) -> mlua::Result<()> {
    t.set(
        "retry",
        lua.create_function(|lua, opts: LuaValue| {
            reported(lua, || {
                let r = read(&opts)?;
                Err(retry_message(&r))
            })
        })?,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn retries_read_back() {
        for r in
            [Retry { countdown: 5.0, max_retries: Some(3), reason: "busy: try later".into() }, Retry { countdown: 0.25, max_retries: None, reason: "x".into() }]
        {
            let text = format!("tasks.lua:7: {}\nstack traceback:\n...", retry_message(&r));
            assert_eq!(parse_retry(&text), Some(r));
        }
        assert_eq!(parse_retry("tasks.lua:7: boom"), None);
        assert_eq!(parse_retry("pmnc.celery.retry: countdown=-1 max_retries=3: x"), None);
        let lua = Lua::new();
        let t = lua.create_table().unwrap();
        install(&lua, &t).unwrap();
        let retry: mlua::Function = t.get("retry").unwrap();
        let (ok, text): (bool, String) = retry.call(lua.load("{ countdown = 2, max_retries = 5, reason = 'db busy' }").eval::<Table>().unwrap()).unwrap();
        assert!(!ok);
        assert_eq!(parse_retry(&text), Some(Retry { countdown: 2.0, max_retries: Some(5), reason: "db busy".into() }));
        let (_, text): (bool, String) = retry.call("soon").unwrap();
        assert!(text.contains("the options must be a table"), "{text}");
        let (_, text): (bool, String) = retry.call(()).unwrap();
        assert_eq!(parse_retry(&text).unwrap().countdown, DEFAULT_COUNTDOWN);
    }
}
