//! Values across the MySQL wire: parameters out (the server converts them to the column or
//! expression type, refusing what does not fit in strict mode), and result columns in, mapped by
//! the column's type so that integers stay integers, DECIMAL stays exact (text), dates and times
//! come out as ISO 8601 text and JSON columns become tables.
//!
//! Prepared statements return typed values (binary protocol); the few statements that cannot be
//! prepared return text (text protocol), which is parsed here by the same column types.

use mysql_async::consts::ColumnType;
use mysql_async::{Column, Row, Value as My};
use rustomnic_core::Value;

/// Parameter `n` (1-based) for the wire.
pub fn param(n: usize, v: &Value) -> Result<My, String> {
    Ok(match v {
        Value::Nil => My::NULL,
        // MySQL has no boolean type: BOOL is TINYINT(1).
        Value::Bool(b) => My::Int(i64::from(*b)),
        Value::Int(i) => My::Int(*i),
        Value::Float(f) => My::Double(*f),
        Value::Str(b) => My::Bytes(b.clone()),
        // Tables go as JSON text, for JSON columns and JSON functions.
        Value::Array(_) | Value::Map(_) => {
            My::Bytes(v.to_json().map_err(|e| format!("parameter {n}: a table cannot be written as JSON: {e}"))?.to_string().into_bytes())
        }
    })
}

/// One row as a map of column name to value; NULL columns are left out (a Lua table cannot hold
/// nil).
pub fn row(row: Row) -> Result<Value, String> {
    let columns = row.columns();
    // Raw: no value has been taken out of this fresh row, so every one is Some.
    let values = row.unwrap_raw();
    let mut entries = Vec::with_capacity(values.len());
    for (column, value) in columns.iter().zip(values) {
        let v = cell(column, value.unwrap_or(My::NULL)).map_err(|e| format!("column {} ({:?}): {e}", column.name_str(), column.column_type()))?;
        if v != Value::Nil {
            entries.push((Value::str(column.name_str()), v));
        }
    }
    Ok(Value::Map(entries))
}

fn is_integer(t: ColumnType) -> bool {
    use ColumnType::*;
    matches!(t, MYSQL_TYPE_TINY | MYSQL_TYPE_SHORT | MYSQL_TYPE_INT24 | MYSQL_TYPE_LONG | MYSQL_TYPE_LONGLONG | MYSQL_TYPE_YEAR)
}

fn is_date(t: ColumnType) -> bool {
    matches!(t, ColumnType::MYSQL_TYPE_DATE | ColumnType::MYSQL_TYPE_NEWDATE)
}

fn is_datetime(t: ColumnType) -> bool {
    use ColumnType::*;
    matches!(t, MYSQL_TYPE_DATETIME | MYSQL_TYPE_DATETIME2 | MYSQL_TYPE_TIMESTAMP | MYSQL_TYPE_TIMESTAMP2)
}

/// An unsigned integer as Int when it fits, else its exact decimal text.
fn unsigned(u: u64) -> Value {
    match i64::try_from(u) {
        Ok(i) => Value::Int(i),
        Err(_) => Value::str(u.to_string()),
    }
}

fn is_time(t: ColumnType) -> bool {
    matches!(t, ColumnType::MYSQL_TYPE_TIME | ColumnType::MYSQL_TYPE_TIME2)
}

/// Seconds with their fraction, trailing zeros dropped.
fn seconds(s: u8, micros: u32) -> String {
    if micros == 0 {
        format!("{s:02}")
    } else {
        let frac = format!("{micros:06}");
        format!("{s:02}.{}", frac.trim_end_matches('0'))
    }
}

/// A date and time as ISO 8601 text, the same from either protocol. Parts out of their range
/// (a seventh digit of microseconds, month 13) would print as another time, so they are
/// refused; MySQL's zero date (0000-00-00) is a value it really sends and is kept.
fn datetime(date_only: bool, (y, m, d, h, i, s, us): (u16, u8, u8, u8, u8, u8, u32)) -> Result<String, String> {
    // A DATE shows no time, so only its date parts are judged (as through the text protocol).
    if m > 12 || d > 31 || (!date_only && (h > 23 || i > 59 || s > 59 || us > 999_999)) {
        return Err(format!("the date or time {y}-{m}-{d} {h}:{i}:{s}.{us} is out of range"));
    }
    Ok(if date_only { format!("{y:04}-{m:02}-{d:02}") } else { format!("{y:04}-{m:02}-{d:02}T{h:02}:{i:02}:{}", seconds(s, us)) })
}

/// A TIME (a duration as much as a time of day, -838:59:59 to 838:59:59) as text.
fn time(negative: bool, hours: u64, i: u8, s: u8, us: u32) -> Result<String, String> {
    if i > 59 || s > 59 || us > 999_999 {
        return Err(format!("the time {hours}:{i}:{s}.{us} is out of range"));
    }
    Ok(format!("{}{hours:02}:{i:02}:{}", if negative { "-" } else { "" }, seconds(s, us)))
}

/// Reads `digits` ASCII digits at the start of `text` (exactly that many).
fn digits(text: &str, n: usize) -> Option<(u32, &str)> {
    let head = text.get(..n)?;
    if !head.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((head.parse().ok()?, &text[n..]))
}

/// `SS` or `SS.f` (1 to 6 digits of fraction) as seconds and microseconds; all of `text`.
fn seconds_text(text: &str) -> Option<(u8, u32)> {
    let (s, rest) = digits(text, 2)?;
    let us = match rest.strip_prefix('.') {
        None if rest.is_empty() => 0,
        Some(frac) if (1..=6).contains(&frac.len()) && frac.bytes().all(|b| b.is_ascii_digit()) => frac.parse::<u32>().ok()? * 10u32.pow(6 - frac.len() as u32),
        _ => return None,
    };
    Some((s as u8, us))
}

/// A DATE, DATETIME or TIMESTAMP as the text protocol sends it: `YYYY-MM-DD[ HH:MM:SS[.f]]`.
fn datetime_text(date_only: bool, text: &str) -> Option<(u16, u8, u8, u8, u8, u8, u32)> {
    let (y, rest) = digits(text, 4)?;
    let (m, rest) = digits(rest.strip_prefix('-')?, 2)?;
    let (d, rest) = digits(rest.strip_prefix('-')?, 2)?;
    if date_only {
        return rest.is_empty().then_some((y as u16, m as u8, d as u8, 0, 0, 0, 0));
    }
    let (h, rest) = digits(rest.strip_prefix(' ')?, 2)?;
    let (i, rest) = digits(rest.strip_prefix(':')?, 2)?;
    let (s, us) = seconds_text(rest.strip_prefix(':')?)?;
    Some((y as u16, m as u8, d as u8, h as u8, i as u8, s, us))
}

/// A TIME as the text protocol sends it: `[-]H...H:MM:SS[.f]`.
fn time_text(text: &str) -> Option<(bool, u64, u8, u8, u32)> {
    let (negative, rest) = match text.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, text),
    };
    let (hours, rest) = rest.split_once(':')?;
    if hours.len() < 2 || hours.len() > 4 || !hours.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (i, rest) = digits(rest, 2)?;
    let (s, us) = seconds_text(rest.strip_prefix(':')?)?;
    Some((negative, hours.parse().ok()?, i as u8, s, us))
}

/// One column value, mapped by the column's type.
pub fn cell(column: &Column, value: My) -> Result<Value, String> {
    let t = column.column_type();
    Ok(match value {
        My::NULL => Value::Nil,
        My::Int(i) => Value::Int(i),
        My::UInt(u) => unsigned(u),
        // Through its shortest text so that FLOAT 0.1 reads as 0.1, not 0.10000000149011612.
        My::Float(f) => Value::Float(f.to_string().parse().unwrap_or(f64::NAN)),
        My::Double(f) => Value::Float(f),
        My::Date(y, m, d, h, i, s, us) => Value::str(datetime(is_date(t), (y, m, d, h, i, s, us))?),
        My::Time(negative, days, h, i, s, us) => {
            if h > 23 {
                return Err(format!("the time {days}d {h}:{i}:{s}.{us} is out of range"));
            }
            Value::str(time(negative, u64::from(days) * 24 + u64::from(h), i, s, us)?)
        }
        My::Bytes(b) => bytes(t, b)?,
    })
}

/// Bytes by column type: JSON is parsed; in results of the text protocol numbers, dates and
/// times arrive as text too and are read as such; everything else (strings, blobs, DECIMAL,
/// ENUM, SET, BIT) stays a string of bytes.
fn bytes(t: ColumnType, b: Vec<u8>) -> Result<Value, String> {
    if t == ColumnType::MYSQL_TYPE_JSON {
        return Value::parse_json(&b);
    }
    let numeric = is_integer(t) || matches!(t, ColumnType::MYSQL_TYPE_FLOAT | ColumnType::MYSQL_TYPE_DOUBLE);
    if !numeric && !is_datetime(t) && !is_date(t) && !is_time(t) {
        return Ok(Value::Str(b));
    }
    let s = std::str::from_utf8(&b).map_err(|_| "not UTF-8 text".to_string())?;
    Ok(if is_integer(t) {
        match s.parse::<i64>() {
            Ok(i) => Value::Int(i),
            Err(_) => unsigned(s.parse::<u64>().map_err(|_| format!("{s:?} is not an integer"))?),
        }
    } else if numeric {
        Value::Float(s.parse::<f64>().map_err(|_| format!("{s:?} is not a number"))?)
    } else if is_time(t) {
        let (negative, hours, i, sec, us) = time_text(s).ok_or_else(|| format!("{s:?} is not a TIME"))?;
        Value::str(time(negative, hours, i, sec, us)?)
    } else {
        // "2024-01-02 03:04:05.500000" in text: read into its parts and written as the binary
        // protocol's values are, so a column reads the same whichever protocol carried it.
        let parts = datetime_text(is_date(t), s).ok_or_else(|| format!("{s:?} is not a {}", if is_date(t) { "DATE" } else { "DATETIME" }))?;
        Value::str(datetime(is_date(t), parts)?)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_columns_become_tables() {
        // MySQL marks JSON columns; MariaDB sends them as LONGTEXT (see the docs).
        let c = Column::new(ColumnType::MYSQL_TYPE_JSON);
        assert_eq!(cell(&c, My::Bytes(b"{\"a\": [1]}".to_vec())).unwrap(), Value::Map(vec![(Value::str("a"), Value::Array(vec![Value::Int(1)]))]));
        let c = Column::new(ColumnType::MYSQL_TYPE_BLOB);
        assert_eq!(cell(&c, My::Bytes(b"{}".to_vec())).unwrap(), Value::str("{}"));
    }

    /// The text the server sends for a value in results of the text protocol.
    fn text_of(t: ColumnType, v: &My) -> Vec<u8> {
        match *v {
            My::Date(y, m, d, ..) if is_date(t) => format!("{y:04}-{m:02}-{d:02}").into_bytes(),
            My::Date(y, m, d, h, i, s, us) => format!("{y:04}-{m:02}-{d:02} {h:02}:{i:02}:{s:02}.{us:06}").into_bytes(),
            My::Time(neg, days, h, i, s, us) => format!("{}{:02}:{i:02}:{s:02}.{us:06}", if neg { "-" } else { "" }, days * 24 + u32::from(h)).into_bytes(),
            _ => Vec::new(),
        }
    }

    #[test]
    fn both_protocols_give_the_same_text_for_times() {
        let cases = [
            (ColumnType::MYSQL_TYPE_DATETIME, My::Date(2024, 1, 2, 3, 4, 5, 500_000)),
            (ColumnType::MYSQL_TYPE_DATETIME, My::Date(2024, 1, 2, 3, 4, 5, 0)),
            (ColumnType::MYSQL_TYPE_TIMESTAMP, My::Date(1999, 12, 31, 23, 59, 59, 1)),
            (ColumnType::MYSQL_TYPE_DATE, My::Date(2024, 2, 29, 0, 0, 0, 0)),
            (ColumnType::MYSQL_TYPE_TIME, My::Time(true, 1, 2, 3, 4, 250_000)),
            (ColumnType::MYSQL_TYPE_TIME, My::Time(false, 34, 22, 59, 59, 0)),
        ];
        for (t, binary) in cases {
            let c = Column::new(t);
            let text = text_of(t, &binary);
            let from_text = cell(&c, My::Bytes(text.clone())).unwrap();
            let from_binary = cell(&c, binary.clone()).unwrap();
            assert_eq!(from_text, from_binary, "{t:?}: {:?} as text {:?}", binary, String::from_utf8_lossy(&text));
        }
    }

    #[test]
    fn times_out_of_range_are_refused() {
        let dt = Column::new(ColumnType::MYSQL_TYPE_DATETIME);
        // Seven digits of microseconds would print as a different time.
        assert!(cell(&dt, My::Date(2024, 1, 2, 3, 4, 5, 1_234_567)).unwrap_err().contains("out of range"));
        assert!(cell(&dt, My::Date(2024, 13, 2, 3, 4, 5, 0)).unwrap_err().contains("out of range"));
        assert!(cell(&dt, My::Date(2024, 1, 2, 24, 4, 5, 0)).unwrap_err().contains("out of range"));
        let time = Column::new(ColumnType::MYSQL_TYPE_TIME);
        assert!(cell(&time, My::Time(false, 0, 1, 60, 0, 0)).unwrap_err().contains("out of range"));
        assert!(cell(&dt, My::Bytes(b"2024-01-02 03:04".to_vec())).is_err());
        // A DATE's time parts are not shown, so they are not judged either (the mysql_values
        // target found a DATE refused through the binary protocol and read through the text one).
        let date = Column::new(ColumnType::MYSQL_TYPE_DATE);
        assert_eq!(cell(&date, My::Date(2024, 1, 2, 25, 0, 0, 1_089_088)).unwrap(), Value::str("2024-01-02"));
        // MySQL's zero date is a value it really sends.
        assert_eq!(cell(&dt, My::Date(0, 0, 0, 0, 0, 0, 0)).unwrap(), Value::str("0000-00-00T00:00:00"));
        assert_eq!(cell(&dt, My::Bytes(b"0000-00-00 00:00:00".to_vec())).unwrap(), Value::str("0000-00-00T00:00:00"));
    }

    #[test]
    fn text_protocol_values_are_read_by_column_type() {
        let int = Column::new(ColumnType::MYSQL_TYPE_LONGLONG);
        assert_eq!(cell(&int, My::Bytes(b"-42".to_vec())).unwrap(), Value::Int(-42));
        assert_eq!(cell(&int, My::Bytes(b"18446744073709551615".to_vec())).unwrap(), Value::str("18446744073709551615"));
        let dt = Column::new(ColumnType::MYSQL_TYPE_DATETIME);
        assert_eq!(cell(&dt, My::Bytes(b"2024-01-02 03:04:05.5".to_vec())).unwrap(), Value::str("2024-01-02T03:04:05.5"));
        assert_eq!(cell(&dt, My::Date(2024, 1, 2, 3, 4, 5, 500_000)).unwrap(), Value::str("2024-01-02T03:04:05.5"));
        let time = Column::new(ColumnType::MYSQL_TYPE_TIME);
        assert_eq!(cell(&time, My::Time(true, 1, 2, 3, 4, 0)).unwrap(), Value::str("-26:03:04"));
        assert_eq!(cell(&int, My::UInt(u64::MAX)).unwrap(), Value::str("18446744073709551615"));
    }
}
