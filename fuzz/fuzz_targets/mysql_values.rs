//! Column values as a MySQL or MariaDB server sends them, through `convert::cell`: the input
//! picks a column type and a value (binary protocol: typed; text protocol: bytes). Properties:
//! integers keep their exact value; strings and blobs stay as sent; JSON agrees with the JSON
//! reader; and a date, datetime or time gives the same value through the text protocol (as the
//! server would print it) as through the binary protocol, or is refused through both.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rustomnic_core::Value;
use rustomnic_fuzz::Choices;
use rustomnic_resource_mysql::fuzzing::{cell, Column, ColumnType, Value as My};

const TYPES: &[ColumnType] = &[
    ColumnType::MYSQL_TYPE_TINY,
    ColumnType::MYSQL_TYPE_SHORT,
    ColumnType::MYSQL_TYPE_INT24,
    ColumnType::MYSQL_TYPE_LONG,
    ColumnType::MYSQL_TYPE_LONGLONG,
    ColumnType::MYSQL_TYPE_YEAR,
    ColumnType::MYSQL_TYPE_FLOAT,
    ColumnType::MYSQL_TYPE_DOUBLE,
    ColumnType::MYSQL_TYPE_NEWDECIMAL,
    ColumnType::MYSQL_TYPE_DATE,
    ColumnType::MYSQL_TYPE_NEWDATE,
    ColumnType::MYSQL_TYPE_DATETIME,
    ColumnType::MYSQL_TYPE_TIMESTAMP,
    ColumnType::MYSQL_TYPE_TIME,
    ColumnType::MYSQL_TYPE_JSON,
    ColumnType::MYSQL_TYPE_BLOB,
    ColumnType::MYSQL_TYPE_VAR_STRING,
    ColumnType::MYSQL_TYPE_BIT,
];

fn is_date(t: ColumnType) -> bool {
    matches!(
        t,
        ColumnType::MYSQL_TYPE_DATE | ColumnType::MYSQL_TYPE_NEWDATE
    )
}

/// What the server prints for a value in the text protocol (DATETIME(6) and TIME(6)).
fn printed(t: ColumnType, v: &My) -> Option<Vec<u8>> {
    Some(match *v {
        My::Date(y, m, d, ..) if is_date(t) => format!("{y:04}-{m:02}-{d:02}").into_bytes(),
        My::Date(y, m, d, h, i, s, us) => {
            format!("{y:04}-{m:02}-{d:02} {h:02}:{i:02}:{s:02}.{us:06}").into_bytes()
        }
        // The binary form splits days from hours (0-23); more hours have no text of their own.
        My::Time(_, _, h, ..) if h > 23 => return None,
        My::Time(neg, days, h, i, s, us) => format!(
            "{}{:02}:{i:02}:{s:02}.{us:06}",
            if neg { "-" } else { "" },
            u64::from(days) * 24 + u64::from(h)
        )
        .into_bytes(),
        _ => return None,
    })
}

/// The value printed as the text protocol carries it reads as the binary value did.
fn same_through_text(column: &Column, t: ColumnType, value: &My, binary: &Result<Value, String>) {
    let Some(text) = printed(t, value) else {
        return;
    };
    let through_text = cell(column, My::Bytes(text.clone()));
    match (binary, &through_text) {
        (Ok(a), Ok(b)) => assert_eq!(
            a,
            b,
            "{t:?}: {value:?} and {:?}",
            String::from_utf8_lossy(&text)
        ),
        (Err(_), Err(_)) => {}
        (a, b) => panic!(
            "{t:?}: {value:?} gives {a:?} in binary, {b:?} as {:?}",
            String::from_utf8_lossy(&text)
        ),
    }
}

fuzz_target!(|data: &[u8]| {
    let mut c = Choices::new(data);
    let t = TYPES[c.byte() as usize % TYPES.len()];
    let column = Column::new(t);
    let value = match c.byte() % 8 {
        0 => My::NULL,
        1 => My::Int(c.u64() as i64),
        2 => My::UInt(c.u64()),
        3 => My::Double(f64::from_bits(c.u64())),
        // Dates and times near their ranges, and past them.
        4 => My::Date(
            c.u16() % 10_000,
            c.byte() % 14,
            c.byte() % 33,
            c.byte() % 26,
            c.byte() % 62,
            c.byte() % 62,
            c.u32() % 1_100_000,
        ),
        5 => My::Time(
            c.byte() & 1 == 1,
            c.u32() % 40,
            c.byte() % 26,
            c.byte() % 62,
            c.byte() % 62,
            c.u32() % 1_100_000,
        ),
        _ => My::Bytes(c.rest().to_vec()),
    };
    let result = cell(&column, value.clone());
    match (&value, &result) {
        (My::NULL, r) => assert_eq!(r, &Ok(Value::Nil)),
        (My::Int(i), r) => assert_eq!(r, &Ok(Value::Int(*i))),
        (My::UInt(u), Ok(Value::Int(i))) => assert_eq!(*i as u64, *u),
        (My::UInt(u), Ok(Value::Str(s))) => assert_eq!(s, u.to_string().as_bytes()),
        (My::Bytes(b), Ok(v)) if t == ColumnType::MYSQL_TYPE_JSON => {
            assert_eq!(Value::parse_json(b).as_ref(), Ok(v))
        }
        (My::Bytes(b), Ok(v))
            if matches!(
                t,
                ColumnType::MYSQL_TYPE_BLOB
                    | ColumnType::MYSQL_TYPE_VAR_STRING
                    | ColumnType::MYSQL_TYPE_BIT
                    | ColumnType::MYSQL_TYPE_NEWDECIMAL
            ) =>
        {
            assert_eq!(v, &Value::Str(b.clone()))
        }
        (My::Bytes(b), Ok(Value::Int(i))) => assert_eq!(
            std::str::from_utf8(b)
                .ok()
                .and_then(|s| s.parse::<i64>().ok()),
            Some(*i)
        ),
        (My::Date(..), _)
            if matches!(
                t,
                ColumnType::MYSQL_TYPE_DATE
                    | ColumnType::MYSQL_TYPE_NEWDATE
                    | ColumnType::MYSQL_TYPE_DATETIME
                    | ColumnType::MYSQL_TYPE_TIMESTAMP
            ) =>
        {
            same_through_text(&column, t, &value, &result)
        }
        (My::Time(..), _) if t == ColumnType::MYSQL_TYPE_TIME => {
            same_through_text(&column, t, &value, &result)
        }
        _ => {}
    }
});
