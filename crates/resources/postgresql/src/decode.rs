//! Result rows into values: each column's binary wire form decoded by its PostgreSQL type, so
//! that numbers stay numbers, numeric stays exact (text), times come out as ISO 8601 text and
//! json becomes tables. Types without a mapping are refused with the column and type named.

use rustomnic_core::Value;
use tokio_postgres::types::{FromSql, Kind, Type};
use tokio_postgres::Row;

type BoxError = Box<dyn std::error::Error + Sync + Send>;

/// A column's raw bytes as they came from the server (None for NULL), so that decoding and its
/// messages stay ours instead of tokio-postgres's per-Rust-type conversions.
struct Raw<'a>(Option<&'a [u8]>);

impl<'a> FromSql<'a> for Raw<'a> {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, BoxError> {
        Ok(Raw(Some(raw)))
    }

    fn from_sql_null(_: &Type) -> Result<Self, BoxError> {
        Ok(Raw(None))
    }

    fn accepts(_: &Type) -> bool {
        true
    }
}

/// One row as a map of column name to value; NULL columns are left out (a Lua table cannot hold
/// nil).
pub fn row(row: &Row) -> Result<Value, String> {
    let mut entries = Vec::with_capacity(row.len());
    for (i, column) in row.columns().iter().enumerate() {
        let raw: Raw = row.try_get(i).map_err(|e| format!("column {}: {e}", column.name()))?;
        let value = match raw.0 {
            None => Value::Nil,
            Some(bytes) => value(column.type_(), bytes).map_err(|e| match e {
                Decode::Unmapped(ty) => {
                    format!("column {name} is of type {ty}, which has no mapping to a Lua value; cast it in SQL, e.g. {name}::text", name = column.name())
                }
                Decode::Bad(e) => format!("column {} ({}): {e}", column.name(), column.type_().name()),
            })?,
        };
        if value != Value::Nil {
            entries.push((Value::str(column.name()), value));
        }
    }
    Ok(Value::Map(entries))
}

/// Why a value could not be decoded.
#[derive(Debug, PartialEq)]
pub enum Decode {
    /// The type (named) has no mapping.
    Unmapped(String),
    /// The bytes did not fit the type.
    Bad(String),
}

impl From<String> for Decode {
    fn from(s: String) -> Decode {
        Decode::Bad(s)
    }
}

impl From<&str> for Decode {
    fn from(s: &str) -> Decode {
        Decode::Bad(s.to_string())
    }
}

/// Decodes one non-NULL value of type `ty`.
pub fn value(ty: &Type, raw: &[u8]) -> Result<Value, Decode> {
    match ty.kind() {
        Kind::Array(member) => return array(ty, member, raw),
        Kind::Domain(base) => return value(base, raw),
        // An enum's binary form is its label.
        Kind::Enum(_) => return Ok(Value::Str(raw.to_vec())),
        _ => {}
    }
    let v = match *ty {
        // Functions returning void (pg_sleep, pg_notify): there is no value to give.
        Type::VOID => Value::Nil,
        Type::BOOL => Value::Bool(fixed::<1>(raw)?[0] != 0),
        Type::INT2 => Value::Int(i16::from_be_bytes(fixed(raw)?).into()),
        Type::INT4 => Value::Int(i32::from_be_bytes(fixed(raw)?).into()),
        Type::INT8 => Value::Int(i64::from_be_bytes(fixed(raw)?)),
        Type::OID => Value::Int(u32::from_be_bytes(fixed(raw)?).into()),
        // Through its shortest text so that real 0.1 reads as 0.1, not 0.10000000149011612.
        Type::FLOAT4 => Value::Float(f32::from_be_bytes(fixed(raw)?).to_string().parse().unwrap_or(f64::NAN)),
        Type::FLOAT8 => Value::Float(f64::from_be_bytes(fixed(raw)?)),
        Type::NUMERIC => Value::str(numeric(raw)?),
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN | Type::CHAR | Type::XML | Type::BYTEA => Value::Str(raw.to_vec()),
        Type::TIMESTAMP => Value::str(timestamp(i64::from_be_bytes(fixed(raw)?), "")),
        Type::TIMESTAMPTZ => Value::str(timestamp(i64::from_be_bytes(fixed(raw)?), "Z")),
        Type::DATE => Value::str(date(i32::from_be_bytes(fixed(raw)?))),
        Type::TIME => Value::str(time_of_day(in_day(i64::from_be_bytes(fixed(raw)?))?)),
        Type::TIMETZ => {
            let b = fixed::<12>(raw)?;
            let micros = in_day(i64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))?;
            // The server sends seconds west of UTC; ISO 8601 writes east as positive.
            let west = i32::from_be_bytes([b[8], b[9], b[10], b[11]]);
            // PostgreSQL's own limit (TZDISP_LIMIT): 16 hours either way.
            if west.unsigned_abs() > 16 * 3600 {
                return Err(format!("a time zone {west} seconds west of UTC, beyond PostgreSQL's 16 hours").into());
            }
            Value::str(format!("{}{}", time_of_day(micros), offset(-i64::from(west))))
        }
        Type::INTERVAL => {
            let b = fixed::<16>(raw)?;
            let micros = i64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
            let days = i32::from_be_bytes([b[8], b[9], b[10], b[11]]);
            let months = i32::from_be_bytes([b[12], b[13], b[14], b[15]]);
            Value::str(interval(months, days, micros))
        }
        Type::JSON => Value::parse_json(raw)?,
        Type::JSONB => match raw.split_first() {
            Some((1, text)) => Value::parse_json(text)?,
            _ => return Err("jsonb in an unknown binary version".into()),
        },
        Type::UUID => Value::str(uuid(&fixed::<16>(raw)?)),
        _ => {
            // Extension types such as citext are text on the wire.
            if ty.name() == "citext" {
                Value::Str(raw.to_vec())
            } else {
                return Err(Decode::Unmapped(ty.name().to_string()));
            }
        }
    };
    Ok(v)
}

/// A one-dimensional array as an Array (NULL elements as nil holes).
///
/// Read here rather than through tokio-postgres's `Vec<T>: FromSql`, which reserves room for
/// the element count the header announces before reading any: 24 bytes announcing 2^31-1
/// elements asked for 32 GiB and aborted the process. The elements are decoded as they come.
fn array(ty: &Type, member: &Type, raw: &[u8]) -> Result<Value, Decode> {
    let bad = |what: &str| Decode::Bad(format!("array from the server: {what}"));
    fn int(rest: &mut &[u8], what: &str) -> Result<i32, Decode> {
        let (head, tail) = rest.split_first_chunk::<4>().ok_or_else(|| Decode::Bad(format!("array from the server: truncated {what}")))?;
        *rest = tail;
        Ok(i32::from_be_bytes(*head))
    }
    let mut rest = raw;
    let dimensions = int(&mut rest, "header")?;
    let _has_nulls = int(&mut rest, "header")?;
    let _element_type = int(&mut rest, "header")?;
    let count = match dimensions {
        0 => 0,
        1 => {
            let len = int(&mut rest, "dimension")?;
            let _lower_bound = int(&mut rest, "dimension")?;
            usize::try_from(len).map_err(|_| bad(&format!("a dimension of {len} elements")))?
        }
        n if n > 1 => return Err(bad(&format!("{n} dimensions (only one-dimensional arrays are mapped)"))),
        n => return Err(bad(&format!("{n} dimensions"))),
    };
    let mut out = Vec::new();
    for i in 0..count {
        let len = int(&mut rest, "element length")?;
        let element = match len {
            -1 => Value::Nil,
            len if len < -1 => return Err(bad(&format!("element {} has length {len}", i + 1))),
            len => {
                let (bytes, tail) =
                    rest.split_at_checked(len as usize).ok_or_else(|| bad(&format!("element {} runs past the end ({count} announced)", i + 1)))?;
                rest = tail;
                match value(member, bytes) {
                    Ok(v) => v,
                    Err(Decode::Unmapped(_)) => return Err(Decode::Unmapped(ty.name().to_string())),
                    Err(e) => return Err(e),
                }
            }
        };
        out.push(element);
    }
    if !rest.is_empty() {
        return Err(bad(&format!("{} bytes after its {count} elements", rest.len())));
    }
    Ok(Value::Array(out))
}

fn fixed<const N: usize>(raw: &[u8]) -> Result<[u8; N], String> {
    raw.try_into().map_err(|_| format!("expected {N} bytes from the server, got {}", raw.len()))
}

/// The exact decimal text of a binary numeric: base-10000 digit groups, a weight (the power of
/// 10000 of the first group), a sign and the number of decimals to show.
pub fn numeric(raw: &[u8]) -> Result<String, String> {
    let field = |i: usize| -> Result<u16, String> {
        raw.get(i..i + 2).map(|b| u16::from_be_bytes([b[0], b[1]])).ok_or_else(|| "truncated numeric from the server".to_string())
    };
    let ndigits = field(0)? as usize;
    let weight = field(2)? as i16 as i64;
    let sign = field(4)?;
    let dscale = field(6)? as usize;
    if raw.len() != 8 + 2 * ndigits {
        return Err(format!("numeric from the server: {} bytes for {ndigits} digit groups", raw.len()));
    }
    // PostgreSQL keeps the display scale in 14 bits (NUMERIC_DSCALE_MASK).
    if dscale > 0x3fff {
        return Err(format!("numeric from the server with a display scale of {dscale}"));
    }
    let digits = (0..ndigits).map(|k| field(8 + 2 * k)).collect::<Result<Vec<u16>, _>>()?;
    if let Some(d) = digits.iter().find(|d| **d > 9999) {
        return Err(format!("numeric from the server with a digit group of {d} (base 10000)"));
    }
    match sign {
        0x0000 | 0x4000 => {}
        0xC000 => return Ok("NaN".into()),
        0xD000 => return Ok("Infinity".into()),
        0xF000 => return Ok("-Infinity".into()),
        other => return Err(format!("numeric with unknown sign 0x{other:04x}")),
    }
    // Group k counts 10000^(weight - k).
    let group = |k: i64| -> u16 {
        if k >= 0 {
            digits.get(k as usize).copied().unwrap_or(0)
        } else {
            0
        }
    };
    let mut out = String::new();
    if sign == 0x4000 {
        out.push('-');
    }
    let mut whole = String::new();
    for k in 0..=weight {
        whole.push_str(&format!("{:04}", group(k)));
    }
    // PostgreSQL sends no leading zero groups, but a server that did must not get "00005".
    let whole = whole.trim_start_matches('0');
    out.push_str(if whole.is_empty() { "0" } else { whole });
    if dscale > 0 {
        let mut frac = String::with_capacity(dscale + 4);
        let mut k = weight + 1;
        while frac.len() < dscale {
            frac.push_str(&format!("{:04}", group(k)));
            k += 1;
        }
        frac.truncate(dscale);
        out.push('.');
        out.push_str(&frac);
    }
    Ok(out)
}

/// PostgreSQL counts days and microseconds from 2000-01-01; the Unix epoch is 10957 days earlier.
const PG_EPOCH_DAYS: i64 = 10_957;
const MICROS_PER_DAY: i64 = 86_400_000_000;

/// Year, month, day of a day count since 1970-01-01 (proleptic Gregorian; H. Hinnant's method).
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn year_text(year: i64) -> String {
    if (0..=9999).contains(&year) {
        format!("{year:04}")
    } else if year > 9999 {
        format!("+{year}")
    } else {
        format!("-{:04}", -year)
    }
}

fn date_of_days(days_since_1970: i64) -> String {
    let (y, m, d) = civil_from_days(days_since_1970);
    format!("{}-{m:02}-{d:02}", year_text(y))
}

fn date(days: i32) -> String {
    match days {
        i32::MAX => "infinity".into(),
        i32::MIN => "-infinity".into(),
        d => date_of_days(i64::from(d) + PG_EPOCH_DAYS),
    }
}

/// Seconds with their fraction, trailing zeros dropped, as PostgreSQL prints them.
fn seconds(whole: u64, micros: u64) -> String {
    if micros == 0 {
        format!("{whole:02}")
    } else {
        let frac = format!("{micros:06}");
        format!("{whole:02}.{}", frac.trim_end_matches('0'))
    }
}

/// A time of day from the server: 00:00:00 to 24:00:00 inclusive; anything else would wrap
/// around the clock into another time.
fn in_day(micros: i64) -> Result<i64, String> {
    if (0..=MICROS_PER_DAY).contains(&micros) {
        Ok(micros)
    } else {
        Err(format!("a time of day of {micros} microseconds, outside 00:00:00..=24:00:00"))
    }
}

fn time_of_day(micros: i64) -> String {
    let m = micros.rem_euclid(MICROS_PER_DAY) as u64;
    let (h, rest) = (m / 3_600_000_000, m % 3_600_000_000);
    let (min, rest) = (rest / 60_000_000, rest % 60_000_000);
    // 24:00:00 is a valid time value; keep it rather than wrapping it to midnight.
    let h = if micros == MICROS_PER_DAY { 24 } else { h };
    format!("{h:02}:{min:02}:{}", seconds(rest / 1_000_000, rest % 1_000_000))
}

fn timestamp(micros: i64, zone: &str) -> String {
    match micros {
        i64::MAX => "infinity".into(),
        i64::MIN => "-infinity".into(),
        m => {
            let days = m.div_euclid(MICROS_PER_DAY);
            let tod = m.rem_euclid(MICROS_PER_DAY);
            format!("{}T{}{zone}", date_of_days(days + PG_EPOCH_DAYS), time_of_day(tod))
        }
    }
}

/// A UTC offset in seconds east as ±HH:MM (with :SS when there are seconds). Wide enough for
/// the west offset of any server, i32::MIN included (negating it overflowed an i32).
fn offset(east: i64) -> String {
    let sign = if east < 0 { '-' } else { '+' };
    let a = east.unsigned_abs();
    let (h, m, s) = (a / 3600, a % 3600 / 60, a % 60);
    if s == 0 {
        format!("{sign}{h:02}:{m:02}")
    } else {
        format!("{sign}{h:02}:{m:02}:{s:02}")
    }
}

/// An ISO 8601 duration (`P1Y2M3DT4H5M6.5S`), each part signed on its own as PostgreSQL's
/// iso_8601 interval style does.
fn interval(months: i32, days: i32, micros: i64) -> String {
    let mut out = String::from("P");
    let (years, months) = (months / 12, months % 12);
    if years != 0 {
        out.push_str(&format!("{years}Y"));
    }
    if months != 0 {
        out.push_str(&format!("{months}M"));
    }
    if days != 0 {
        out.push_str(&format!("{days}D"));
    }
    let hours = micros / 3_600_000_000;
    let minutes = micros % 3_600_000_000 / 60_000_000;
    let rest = micros % 60_000_000;
    if hours != 0 || minutes != 0 || rest != 0 {
        out.push('T');
        if hours != 0 {
            out.push_str(&format!("{hours}H"));
        }
        if minutes != 0 {
            out.push_str(&format!("{minutes}M"));
        }
        if rest != 0 {
            let sign = if rest < 0 { "-" } else { "" };
            let a = rest.unsigned_abs();
            let whole = a / 1_000_000;
            let frac = a % 1_000_000;
            if frac == 0 {
                out.push_str(&format!("{sign}{whole}S"));
            } else {
                out.push_str(&format!("{sign}{whole}.{}S", format!("{frac:06}").trim_end_matches('0')));
            }
        }
    }
    if out == "P" {
        out.push_str("T0S");
    }
    out
}

fn uuid(b: &[u8; 16]) -> String {
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &hex[0..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..32])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn num(ndigits: u16, weight: i16, sign: u16, dscale: u16, digits: &[u16]) -> Vec<u8> {
        let mut v = Vec::new();
        for x in [ndigits, weight as u16, sign, dscale] {
            v.extend_from_slice(&x.to_be_bytes());
        }
        for d in digits {
            v.extend_from_slice(&d.to_be_bytes());
        }
        v
    }

    #[test]
    fn numerics_keep_their_exact_text() {
        assert_eq!(numeric(&num(2, 0, 0, 4, &[123, 4500])).unwrap(), "123.4500");
        assert_eq!(numeric(&num(1, -1, 0x4000, 3, &[10])).unwrap(), "-0.001");
        assert_eq!(numeric(&num(1, -2, 0, 6, &[12])).unwrap(), "0.000000");
        assert_eq!(numeric(&num(1, 2, 0, 0, &[1])).unwrap(), "100000000");
        assert_eq!(numeric(&num(0, 0, 0, 2, &[])).unwrap(), "0.00");
        assert_eq!(numeric(&num(0, 0, 0xC000, 0, &[])).unwrap(), "NaN");
        assert_eq!(numeric(&num(2, 1, 0, 0, &[12, 3])).unwrap(), "120003");
    }

    /// A one-dimensional array's binary form: a header, then each element's length and bytes.
    fn int4_array(announced: i32, elements: &[Option<i32>]) -> Vec<u8> {
        let mut v = Vec::new();
        for x in [1i32, 1, 23, announced, 1] {
            v.extend_from_slice(&x.to_be_bytes());
        }
        for e in elements {
            match e {
                Some(n) => {
                    v.extend_from_slice(&4i32.to_be_bytes());
                    v.extend_from_slice(&n.to_be_bytes());
                }
                None => v.extend_from_slice(&(-1i32).to_be_bytes()),
            }
        }
        v
    }

    #[test]
    fn arrays_decode_and_refuse_what_they_do_not_hold() {
        let ok = value(&Type::INT4_ARRAY, &int4_array(3, &[Some(1), None, Some(-3)])).unwrap();
        assert_eq!(ok, Value::Array(vec![Value::Int(1), Value::Nil, Value::Int(-3)]));
        // An array announcing 2^31-1 elements in 24 bytes: refused as damaged, without first
        // reserving 32 GiB for them (the allocation aborted the process).
        let e = value(&Type::INT4_ARRAY, &int4_array(i32::MAX, &[Some(1)])).unwrap_err();
        assert!(matches!(&e, Decode::Bad(m) if m.contains("array")), "{e:?}");
        assert!(value(&Type::INT4_ARRAY, &int4_array(1, &[Some(1), Some(2)])).is_err(), "bytes after the last element");
        assert!(value(&Type::INT4_ARRAY, &int4_array(-1, &[])).is_err());
        let mut two_dims = Vec::new();
        for x in [2i32, 0, 23, 1, 1, 1, 1] {
            two_dims.extend_from_slice(&x.to_be_bytes());
        }
        assert!(matches!(value(&Type::INT4_ARRAY, &two_dims), Err(Decode::Bad(m)) if m.contains("one-dimensional")));
        let mut empty = Vec::new();
        for x in [0i32, 0, 23] {
            empty.extend_from_slice(&x.to_be_bytes());
        }
        assert_eq!(value(&Type::INT4_ARRAY, &empty).unwrap(), Value::Array(vec![]));
    }

    #[test]
    fn numerics_from_a_confused_server_are_refused_or_kept_exact() {
        // A digit group is 0..=9999; 12345 would print as five digits in a four-digit place.
        assert!(numeric(&num(1, 0, 0, 0, &[12345])).unwrap_err().contains("digit"));
        // Bytes after the digits it announces.
        let mut long = num(1, 0, 0, 0, &[5]);
        long.extend_from_slice(&[0, 7]);
        assert!(numeric(&long).unwrap_err().contains("bytes"));
        // PostgreSQL keeps the display scale in 14 bits.
        assert!(numeric(&num(0, 0, 0, 0x4000, &[])).is_err());
        // Leading zero groups print no leading zeros.
        assert_eq!(numeric(&num(2, 1, 0, 0, &[0, 5])).unwrap(), "5");
        assert_eq!(numeric(&num(4, 2, 0x4000, 1, &[0, 0, 7, 5000])).unwrap(), "-7.5");
    }

    /// Found while writing the postgres_values target's "reads back as the same value"
    /// property: a time of day outside 00:00:00..=24:00:00 wrapped around the clock.
    #[test]
    fn times_of_day_out_of_range_are_refused() {
        for micros in [-1i64, MICROS_PER_DAY + 1, i64::MIN, i64::MAX] {
            assert!(value(&Type::TIME, &micros.to_be_bytes()).is_err(), "{micros}");
            let mut raw = micros.to_be_bytes().to_vec();
            raw.extend_from_slice(&0i32.to_be_bytes());
            assert!(value(&Type::TIMETZ, &raw).is_err(), "{micros}");
        }
        assert_eq!(value(&Type::TIME, &MICROS_PER_DAY.to_be_bytes()).unwrap(), Value::str("24:00:00"));
    }

    #[test]
    fn extreme_time_zones_do_not_overflow() {
        let timetz = |west: i32| {
            let mut raw = 0i64.to_be_bytes().to_vec();
            raw.extend_from_slice(&west.to_be_bytes());
            value(&Type::TIMETZ, &raw)
        };
        // Negating i32::MIN overflowed (a panic in debug builds); now it is refused.
        assert!(matches!(timetz(i32::MIN), Err(Decode::Bad(m)) if m.contains("16 hours")));
        assert_eq!(timetz(-16 * 3600).unwrap(), Value::str("00:00:00+16:00"));
        assert_eq!(timetz(5 * 3600 + 30 * 60).unwrap(), Value::str("00:00:00-05:30"));
    }

    #[test]
    fn dates_and_times() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        assert_eq!(date(0), "2000-01-01");
        assert_eq!(timestamp(-1, "Z"), "1999-12-31T23:59:59.999999Z");
        assert_eq!(timestamp(1_500_000, ""), "2000-01-01T00:00:01.5");
        assert_eq!(time_of_day(MICROS_PER_DAY), "24:00:00");
        assert_eq!(offset(-(5 * 3600 + 30 * 60)), "-05:30");
        assert_eq!(interval(14, 3, 4 * 3_600_000_000 + 5 * 60_000_000 + 6_500_000), "P1Y2M3DT4H5M6.5S");
        assert_eq!(interval(0, 0, -1_000_000), "PT-1S");
        assert_eq!(interval(0, 0, 0), "PT0S");
    }
}
