//! The HTTP request as a Lua handler sees it: `request.path` (percent-decoded), `request.query`
//! and `request.headers`, built from a request head as for every handler. Properties: the
//! path decodes as the `percent-encoding` crate decodes it; the query table holds exactly the
//! pairs of a plain reading of application/x-www-form-urlencoded (a repeated name's last value);
//! the headers table has one lower-case key per field name, its values joined with ", " in order.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use rustomnic_http::fuzzing::{fuzz_head, fuzz_tables, percent_decode};
use rustomnic_lua::mlua::{Lua, LuaString, Table, Value as LuaValue};

thread_local! {
    static LUA: Lua = Lua::new();
}

/// `+` is a space, `%XX` a byte, a `%` without two hex digits stays; names and values are then
/// read as UTF-8 with U+FFFD for what is not.
fn form_part(part: &[u8]) -> String {
    let mut out = Vec::new();
    let mut i = 0;
    while i < part.len() {
        let hex = |b: Option<&u8>| b.and_then(|b| (*b as char).to_digit(16));
        match part[i] {
            b'+' => out.push(b' '),
            b'%' => match (hex(part.get(i + 1)), hex(part.get(i + 2))) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn pairs(t: &Table) -> BTreeMap<Vec<u8>, Vec<u8>> {
    t.pairs::<LuaString, LuaString>()
        .map(|p| {
            p.map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
                .expect("string keys and values")
        })
        .collect()
}

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        assert_eq!(
            percent_decode(text),
            percent_encoding::percent_decode_str(text).collect::<Vec<u8>>()
        );
    }
    let Some(parts) = fuzz_head(data) else { return };
    LUA.with(|lua| {
        let (path, query, headers) = fuzz_tables(lua, &parts)
            .unwrap_or_else(|e| panic!("the request tables cannot be built: {e}"));
        assert_eq!(
            path,
            percent_encoding::percent_decode_str(parts.uri.path()).collect::<Vec<u8>>()
        );
        match (parts.uri.query(), query) {
            (None, LuaValue::Nil) => {}
            (Some(q), LuaValue::Table(t)) => {
                let mut expected = BTreeMap::new();
                for piece in q.as_bytes().split(|b| *b == b'&').filter(|p| !p.is_empty()) {
                    let (name, value) = match piece.iter().position(|b| *b == b'=') {
                        Some(i) => (&piece[..i], &piece[i + 1..]),
                        None => (piece, &b""[..]),
                    };
                    expected.insert(form_part(name).into_bytes(), form_part(value).into_bytes());
                }
                assert_eq!(pairs(&t), expected, "query {q:?}");
            }
            (q, v) => panic!("query {q:?} became {v:?}"),
        }
        let mut expected: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        for name in parts.headers.keys() {
            let joined: Vec<&[u8]> = parts
                .headers
                .get_all(name)
                .iter()
                .map(|v| v.as_bytes())
                .collect();
            expected.insert(name.as_str().as_bytes().to_vec(), joined.join(&b", "[..]));
        }
        let got = pairs(&headers);
        for name in got.keys() {
            assert!(
                !name.iter().any(u8::is_ascii_uppercase),
                "{:?} is not lower case",
                String::from_utf8_lossy(name)
            );
        }
        assert_eq!(got, expected);
    });
});
