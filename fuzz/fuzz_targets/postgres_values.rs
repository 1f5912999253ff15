//! Column values as a PostgreSQL server sends them (binary format), through `decode::value`:
//! the first input byte picks the column type (arrays, a domain, an enum and an extension type
//! among them), the rest is the value. Properties: no value asks for far more memory than its
//! bytes; fixed-size types take exactly their size and keep their number; dates, timestamps,
//! times and intervals read back from their text to the very value sent; arrays have one
//! element per element sent; JSON agrees with the JSON reader.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rustomnic_core::Value;
use rustomnic_resource_postgresql::fuzzing::{value, Decode, Kind, Type};

const DAY: i64 = 86_400_000_000;
const PG_EPOCH_DAYS: i64 = 10_957;

fn types() -> Vec<Type> {
    let mood = Type::new(
        "mood".into(),
        90_001,
        Kind::Enum(vec!["sad".into(), "ok".into()]),
        "public".into(),
    );
    let positive = Type::new(
        "positive".into(),
        90_002,
        Kind::Domain(Type::INT4),
        "public".into(),
    );
    let citext = Type::new("citext".into(), 90_003, Kind::Simple, "public".into());
    let mood_array = Type::new(
        "_mood".into(),
        90_004,
        Kind::Array(mood.clone()),
        "public".into(),
    );
    vec![
        Type::BOOL,
        Type::INT2,
        Type::INT4,
        Type::INT8,
        Type::OID,
        Type::FLOAT4,
        Type::FLOAT8,
        Type::NUMERIC,
        Type::TEXT,
        Type::BYTEA,
        Type::TIMESTAMP,
        Type::TIMESTAMPTZ,
        Type::DATE,
        Type::TIME,
        Type::TIMETZ,
        Type::INTERVAL,
        Type::JSON,
        Type::JSONB,
        Type::UUID,
        Type::VOID,
        Type::POINT,
        Type::INT4_ARRAY,
        Type::TEXT_ARRAY,
        Type::NUMERIC_ARRAY,
        Type::JSONB_ARRAY,
        Type::DATE_ARRAY,
        Type::TIMETZ_ARRAY,
        Type::INTERVAL_ARRAY,
        Type::POINT_ARRAY,
        mood,
        positive,
        citext,
        mood_array,
    ]
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's method), written apart
/// from the decoder's inverse.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// "YYYY-MM-DD", "-YYYY-MM-DD" or "+YYYYY-MM-DD" as days since 2000-01-01.
fn date_back(text: &str) -> i64 {
    let (sign, rest) = match text.as_bytes()[0] {
        b'-' => (-1, &text[1..]),
        b'+' => (1, &text[1..]),
        _ => (1, text),
    };
    let mut parts = rest.splitn(3, '-');
    let mut next = || {
        parts
            .next()
            .and_then(|p| p.parse::<i64>().ok())
            .unwrap_or_else(|| panic!("date {text:?}"))
    };
    let (y, m, d) = (sign * next(), next(), next());
    assert!(
        (1..=12).contains(&m) && (1..=31).contains(&d),
        "date {text:?}"
    );
    days_from_civil(y, m, d) - PG_EPOCH_DAYS
}

/// "HH:MM:SS[.f]" as microseconds.
fn time_back(text: &str) -> i64 {
    let number = |p: Option<&str>| -> i64 {
        p.and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("time {text:?}"))
    };
    let mut parts = text.splitn(3, ':');
    let (h, m) = (number(parts.next()), number(parts.next()));
    let s = parts.next().unwrap_or_else(|| panic!("time {text:?}"));
    let (whole, frac) = s.split_once('.').unwrap_or((s, ""));
    assert!(
        frac.len() <= 6 && !frac.ends_with('0') && whole.len() == 2,
        "time {text:?}"
    );
    let micros = if frac.is_empty() {
        0
    } else {
        number(Some(&format!("{frac:0<6}")))
    };
    ((h * 60 + m) * 60 + number(Some(whole))) * 1_000_000 + micros
}

/// "P1Y-2M3DT4H5M-6.5S" back into months, days and microseconds.
fn interval_back(text: &str) -> (i64, i64, i64) {
    let body = text
        .strip_prefix('P')
        .unwrap_or_else(|| panic!("interval {text:?}"));
    let (date, time) = body.split_once('T').unwrap_or((body, ""));
    let (mut months, mut days, mut micros) = (0i64, 0i64, 0i64);
    let mut number = String::new();
    for c in date.chars() {
        match c {
            'Y' => months += 12 * number.parse::<i64>().unwrap_or_else(|_| panic!("{text:?}")),
            'M' => months += number.parse::<i64>().unwrap_or_else(|_| panic!("{text:?}")),
            'D' => days += number.parse::<i64>().unwrap_or_else(|_| panic!("{text:?}")),
            _ => {
                number.push(c);
                continue;
            }
        }
        number.clear();
    }
    for c in time.chars() {
        match c {
            'H' => {
                micros +=
                    3_600_000_000 * number.parse::<i64>().unwrap_or_else(|_| panic!("{text:?}"))
            }
            'M' => {
                micros += 60_000_000 * number.parse::<i64>().unwrap_or_else(|_| panic!("{text:?}"))
            }
            'S' => {
                let negative = number.starts_with('-');
                let digits = number.trim_start_matches('-');
                let (whole, frac) = digits.split_once('.').unwrap_or((digits, ""));
                let m = whole.parse::<i64>().unwrap_or_else(|_| panic!("{text:?}")) * 1_000_000
                    + if frac.is_empty() {
                        0
                    } else {
                        format!("{frac:0<6}")
                            .parse::<i64>()
                            .unwrap_or_else(|_| panic!("{text:?}"))
                    };
                micros += if negative { -m } else { m };
            }
            _ => {
                number.push(c);
                continue;
            }
        }
        number.clear();
    }
    (months, days, micros)
}

fn be<const N: usize>(raw: &[u8]) -> Option<[u8; N]> {
    raw.try_into().ok()
}

fn text(v: &Value) -> &str {
    v.as_str()
        .unwrap_or_else(|| panic!("expected text, got {v:?}"))
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, raw)) = data.split_first() else {
        return;
    };
    let all = types();
    let ty = &all[pick as usize % all.len()];
    let (asked, decoded) = rustomnic_fuzz::asked(|| value(ty, raw));
    // A numeric may spell out 147,000 digits from 8 bytes, as PostgreSQL allows; nothing more.
    assert!(
        asked <= rustomnic_fuzz::budget(raw.len()) + (1 << 20),
        "{ty}: asked for {asked} bytes for {} bytes",
        raw.len()
    );
    let v = match decoded {
        Ok(v) => v,
        Err(Decode::Unmapped(name)) => {
            assert!(
                matches!(*ty, Type::POINT | Type::POINT_ARRAY),
                "{ty} is mapped but was refused as {name}"
            );
            return;
        }
        Err(Decode::Bad(e)) => {
            assert!(!e.is_empty());
            return;
        }
    };
    match *ty {
        Type::INT2 => assert_eq!(
            v,
            Value::Int(i16::from_be_bytes(be(raw).expect("2 bytes")).into())
        ),
        Type::INT4 => assert_eq!(
            v,
            Value::Int(i32::from_be_bytes(be(raw).expect("4 bytes")).into())
        ),
        Type::INT8 => assert_eq!(v, Value::Int(i64::from_be_bytes(be(raw).expect("8 bytes")))),
        Type::OID => assert_eq!(
            v,
            Value::Int(u32::from_be_bytes(be(raw).expect("4 bytes")).into())
        ),
        Type::FLOAT8 => assert!(
            matches!(v, Value::Float(f) if f.to_bits() == u64::from_be_bytes(be(raw).expect("8 bytes")) || f.is_nan())
        ),
        Type::BOOL => assert_eq!(v, Value::Bool(be::<1>(raw).expect("1 byte")[0] != 0)),
        Type::TEXT | Type::BYTEA => assert_eq!(v, Value::Str(raw.to_vec())),
        Type::DATE => {
            let days = i32::from_be_bytes(be(raw).expect("4 bytes"));
            match days {
                i32::MAX => assert_eq!(text(&v), "infinity"),
                i32::MIN => assert_eq!(text(&v), "-infinity"),
                d => assert_eq!(date_back(text(&v)), i64::from(d), "{v:?}"),
            }
        }
        Type::TIMESTAMP | Type::TIMESTAMPTZ => {
            let micros = i64::from_be_bytes(be(raw).expect("8 bytes"));
            let t = text(&v);
            match micros {
                i64::MAX => assert_eq!(t, "infinity"),
                i64::MIN => assert_eq!(t, "-infinity"),
                m => {
                    let t = if *ty == Type::TIMESTAMPTZ {
                        t.strip_suffix('Z')
                            .unwrap_or_else(|| panic!("{t:?} has no Z"))
                    } else {
                        t
                    };
                    let (date, time) = t.rsplit_once('T').unwrap_or_else(|| panic!("{t:?}"));
                    // In i128: the day before a timestamp near i64::MIN starts before it.
                    assert_eq!(
                        i128::from(date_back(date)) * i128::from(DAY) + i128::from(time_back(time)),
                        i128::from(m),
                        "{t:?}"
                    );
                }
            }
        }
        Type::TIME => assert_eq!(
            time_back(text(&v)),
            i64::from_be_bytes(be(raw).expect("8 bytes"))
        ),
        Type::TIMETZ => {
            let t = text(&v);
            let at = t
                .rfind(['+', '-'])
                .unwrap_or_else(|| panic!("{t:?} has no zone"));
            let micros = i64::from_be_bytes(raw[..8].try_into().expect("12 bytes"));
            let west = i32::from_be_bytes(raw[8..].try_into().expect("12 bytes"));
            assert_eq!(time_back(&t[..at]), micros, "{t:?}");
            let zone = &t[at + 1..];
            let mut z = zone
                .split(':')
                .map(|p| p.parse::<i64>().unwrap_or_else(|_| panic!("{t:?}")));
            let east =
                z.next().unwrap_or(0) * 3600 + z.next().unwrap_or(0) * 60 + z.next().unwrap_or(0);
            let east = if t.as_bytes()[at] == b'-' {
                -east
            } else {
                east
            };
            assert_eq!(east, -i64::from(west), "{t:?}");
        }
        Type::INTERVAL => {
            let b: [u8; 16] = be(raw).expect("16 bytes");
            let micros = i64::from_be_bytes(b[..8].try_into().unwrap_or_default());
            let days = i32::from_be_bytes(b[8..12].try_into().unwrap_or_default());
            let months = i32::from_be_bytes(b[12..].try_into().unwrap_or_default());
            assert_eq!(
                interval_back(text(&v)),
                (i64::from(months), i64::from(days), micros),
                "{v:?}"
            );
        }
        Type::JSON => assert_eq!(Value::parse_json(raw).ok(), Some(v)),
        Type::UUID => assert_eq!(text(&v).len(), 36),
        _ if matches!(ty.kind(), Kind::Array(_)) => {
            let Value::Array(items) = &v else {
                panic!("{ty} gave {v:?}")
            };
            let announced = if raw.get(..4) == Some(&[0, 0, 0, 0]) {
                0
            } else {
                i32::from_be_bytes(raw[12..16].try_into().expect("a dimension")) as usize
            };
            assert_eq!(items.len(), announced);
        }
        _ => {}
    }
});
