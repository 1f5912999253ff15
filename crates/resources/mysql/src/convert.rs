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

/// Seconds with their fraction, trailing zeros dropped.
fn seconds(s: u8, micros: u32) -> String {
    if micros == 0 {
        format!("{s:02}")
    } else {
        let frac = format!("{micros:06}");
        format!("{s:02}.{}", frac.trim_end_matches('0'))
    }
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
        My::Date(y, m, d, h, i, s, us) => {
            if is_date(t) {
                Value::str(format!("{y:04}-{m:02}-{d:02}"))
            } else {
                Value::str(format!("{y:04}-{m:02}-{d:02}T{h:02}:{i:02}:{}", seconds(s, us)))
            }
        }
        My::Time(negative, days, h, i, s, us) => {
            // TIME is a duration as much as a time of day: -838:59:59 to 838:59:59.
            let hours = u64::from(days) * 24 + u64::from(h);
            Value::str(format!("{}{hours:02}:{i:02}:{}", if negative { "-" } else { "" }, seconds(s, us)))
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
    if !numeric && !is_datetime(t) {
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
    } else {
        // "2024-01-02 03:04:05" in text; ISO 8601 puts a T between date and time.
        Value::str(s.replacen(' ', "T", 1))
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
