//! `pmnc.time`: the wall clock, and times (seconds since the Unix epoch) formatted and parsed as
//! RFC 3339, HTTP dates (IMF-fixdate) or strftime patterns, in UTC or an IANA zone (the zone
//! database is bundled, so results do not depend on the host).

use std::fmt::Write;

use chrono::format::{Item, StrftimeItems};
use chrono::{DateTime, LocalResult, NaiveDate, NaiveDateTime, SecondsFormat, TimeZone, Utc};
use chrono_tz::Tz;
use mlua::{Lua, Table, Value as LuaValue};

use crate::{ok, ok_bytes, reported};

const HTTP_DATE: &str = "%a, %d %b %Y %H:%M:%S GMT";

fn zone(tz: &LuaValue, func: &str) -> Result<Tz, String> {
    match tz {
        LuaValue::Nil => Ok(Tz::UTC),
        LuaValue::String(s) => {
            let name = s.to_string_lossy();
            name.parse::<Tz>().map_err(|_| format!("{func}: unknown time zone {name:?} (an IANA name such as \"Europe/Berlin\")"))
        }
        other => Err(format!("{func}: the time zone must be a string, got {}", other.type_name())),
    }
}

fn pattern(fmt: &LuaValue, func: &str) -> Result<String, String> {
    match fmt {
        LuaValue::Nil => Ok("rfc3339".to_string()),
        LuaValue::String(s) => Ok(s.to_string_lossy()),
        other => Err(format!("{func}: the format must be a string, got {}", other.type_name())),
    }
}

/// `t` (seconds since the epoch) in `tz` by `fmt`.
pub fn format(t: f64, fmt: &str, tz: Tz) -> Result<String, String> {
    let f = "pmnc.time.format";
    if !t.is_finite() {
        return Err(format!("{f}: the time must be a finite number, got {t}"));
    }
    // A double holds an epoch time to about a quarter of a microsecond, so digits past the
    // microsecond are noise.
    let mut secs = t.floor();
    let mut micros = ((t - secs) * 1e6).round();
    if micros >= 1e6 {
        secs += 1.0;
        micros = 0.0;
    }
    let nanos = micros as u32 * 1000;
    let utc = DateTime::<Utc>::from_timestamp(secs as i64, nanos).ok_or_else(|| format!("{f}: time {t} is out of range"))?;
    match fmt {
        "rfc3339" => Ok(utc.with_timezone(&tz).to_rfc3339_opts(SecondsFormat::AutoSi, true)),
        "http" => Ok(utc.format(HTTP_DATE).to_string()),
        pattern => {
            let items: Vec<Item> = StrftimeItems::new(pattern).collect();
            if items.iter().any(|i| matches!(i, Item::Error)) {
                return Err(format!("{f}: invalid format {pattern:?}"));
            }
            let mut out = String::new();
            write!(out, "{}", utc.with_timezone(&tz).format_with_items(items.into_iter()))
                .map_err(|_| format!("{f}: format {pattern:?} cannot be written for this time"))?;
            Ok(out)
        }
    }
}

fn local_to_utc(naive: NaiveDateTime, tz: Tz, s: &str) -> Result<DateTime<Utc>, String> {
    match tz.from_local_datetime(&naive) {
        LocalResult::Single(t) => Ok(t.with_timezone(&Utc)),
        LocalResult::Ambiguous(earliest, _) => Ok(earliest.with_timezone(&Utc)),
        LocalResult::None => Err(format!("pmnc.time.parse: {s:?} does not exist in {tz} (a clock change skips it)")),
    }
}

/// Seconds since the epoch of `s` read by `fmt`; times without an offset are in `tz`.
pub fn parse(s: &str, fmt: &str, tz: Tz) -> Result<f64, String> {
    let f = "pmnc.time.parse";
    let t = match fmt {
        "rfc3339" => DateTime::parse_from_rfc3339(s).map_err(|e| format!("{f}: {s:?} is not an RFC 3339 time: {e}"))?.with_timezone(&Utc),
        "http" => NaiveDateTime::parse_from_str(s, HTTP_DATE).map_err(|e| format!("{f}: {s:?} is not an HTTP date: {e}"))?.and_utc(),
        pattern => match DateTime::parse_from_str(s, pattern) {
            Ok(t) => t.with_timezone(&Utc),
            Err(first) => match NaiveDateTime::parse_from_str(s, pattern) {
                Ok(naive) => local_to_utc(naive, tz, s)?,
                Err(_) => match NaiveDate::parse_from_str(s, pattern) {
                    Ok(d) => local_to_utc(d.and_time(chrono::NaiveTime::MIN), tz, s)?,
                    Err(_) => return Err(format!("{f}: {s:?} does not match {pattern:?}: {first}")),
                },
            },
        },
    };
    Ok(t.timestamp() as f64 + f64::from(t.timestamp_subsec_nanos()) / 1e9)
}

fn number(v: f64) -> LuaValue {
    if v.fract() == 0.0 && v.abs() < 9.0e15 {
        LuaValue::Integer(v as i64)
    } else {
        LuaValue::Number(v)
    }
}

pub(crate) fn install(lua: &Lua, t: &Table) -> mlua::Result<()> {
    t.set(
        "now",
        lua.create_function(|_, ()| {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
            ok([LuaValue::Number(now)])
        })?,
    )?;
    t.set(
        "format",
        lua.create_function(|lua, (t, fmt, tz): (LuaValue, LuaValue, LuaValue)| {
            reported(lua, || {
                let f = "pmnc.time.format";
                let t = match t {
                    LuaValue::Integer(i) => i as f64,
                    LuaValue::Number(n) => n,
                    other => return Err(format!("{f}: the time must be a number, got {}", other.type_name())),
                };
                let text = format(t, &pattern(&fmt, f)?, zone(&tz, f)?)?;
                Ok(ok_bytes(lua, text))
            })
        })?,
    )?;
    t.set(
        "parse",
        lua.create_function(|lua, (s, fmt, tz): (LuaValue, LuaValue, LuaValue)| {
            reported(lua, || {
                let f = "pmnc.time.parse";
                let LuaValue::String(s) = s else {
                    return Err(format!("{f}: the text must be a string, got {}", s.type_name()));
                };
                let v = parse(&s.to_string_lossy(), &pattern(&fmt, f)?, zone(&tz, f)?)?;
                Ok(ok([number(v)]))
            })
        })?,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_examples() {
        // RFC 3339 section 5.8.
        assert_eq!(parse("1985-04-12T23:20:50.52Z", "rfc3339", Tz::UTC).unwrap(), 482196050.52);
        assert_eq!(parse("1996-12-19T16:39:57-08:00", "rfc3339", Tz::UTC).unwrap(), 851042397.0);
        assert_eq!(parse("1990-12-31T23:59:60Z", "rfc3339", Tz::UTC).unwrap(), 662687999.0 + 1.0);
        assert_eq!(format(851042397.0, "rfc3339", Tz::UTC).unwrap(), "1996-12-20T00:39:57Z");
        assert_eq!(format(482196050.52, "rfc3339", Tz::UTC).unwrap(), "1985-04-12T23:20:50.520Z");
        assert_eq!(format(851042397.0, "rfc3339", "America/Los_Angeles".parse().unwrap()).unwrap(), "1996-12-19T16:39:57-08:00");
    }

    #[test]
    fn http_dates() {
        // RFC 9110 section 5.6.7.
        assert_eq!(format(784111777.0, "http", Tz::UTC).unwrap(), "Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(parse("Sun, 06 Nov 1994 08:49:37 GMT", "http", Tz::UTC).unwrap(), 784111777.0);
        assert!(parse("Sunday, 06-Nov-94 08:49:37 GMT", "http", Tz::UTC).is_err());
    }

    #[test]
    fn strftime_and_zones() {
        let berlin: Tz = "Europe/Berlin".parse().unwrap();
        assert_eq!(format(0.0, "%Y-%m-%d %H:%M %Z", berlin).unwrap(), "1970-01-01 01:00 CET");
        assert_eq!(parse("1970-01-01 01:00", "%Y-%m-%d %H:%M", berlin).unwrap(), 0.0);
        assert_eq!(parse("2024-03-01", "%Y-%m-%d", Tz::UTC).unwrap(), 1709251200.0);
        assert!(parse("2024-03-31 02:30", "%Y-%m-%d %H:%M", berlin).unwrap_err().contains("does not exist"));
        assert!(format(0.0, "%Q", Tz::UTC).unwrap_err().contains("invalid format"));
    }
}
