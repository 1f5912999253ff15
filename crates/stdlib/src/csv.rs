//! `pmnc.csv`: RFC 4180 text to tables and back; with a header row (the default) each record is
//! a table keyed by the header's names.

use mlua::{Lua, MultiValue, Table, Value as LuaValue};

use crate::{ok_bytes, opt_flag, reported, run_over, string_arg};

/// Most fields one document may hold, so a small text of empty fields cannot make a huge table.
pub const FIELDS_MAX: usize = 10_000_000;

fn separator(opts: &LuaValue, func: &str) -> Result<u8, String> {
    let LuaValue::Table(t) = opts else { return Ok(b',') };
    match t.raw_get::<LuaValue>("separator") {
        Ok(LuaValue::Nil) => Ok(b','),
        Ok(LuaValue::String(s)) if s.as_bytes().len() == 1 => Ok(s.as_bytes()[0]),
        Ok(other) => Err(format!("{func}: option separator must be one byte, got {}", other.to_string().unwrap_or_default())),
        Err(e) => Err(format!("{func}: {e}")),
    }
}

/// The records of `text` as rows of fields.
pub fn decode(text: &[u8], sep: u8) -> Result<Vec<Vec<String>>, String> {
    let mut reader = ::csv::ReaderBuilder::new().has_headers(false).delimiter(sep).flexible(true).from_reader(text);
    let mut rows = Vec::new();
    let mut fields = 0usize;
    // One record read into again and again: the reader's records() clones each record with
    // buffers sized for the longest so far, which made short input cost 350 times its size.
    let mut record = ::csv::StringRecord::new();
    for i in 1.. {
        match reader.read_record(&mut record) {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => return Err(format!("pmnc.csv.decode: record {i}: {e}")),
        }
        fields += record.len().max(1);
        if fields > FIELDS_MAX {
            return Err(format!("pmnc.csv.decode: more than {FIELDS_MAX} fields"));
        }
        rows.push(record.iter().map(str::to_string).collect());
    }
    Ok(rows)
}

/// `rows` as RFC 4180 text (CRLF line ends, fields quoted where needed).
pub fn encode(rows: &[Vec<String>], sep: u8) -> Result<String, String> {
    let mut w = ::csv::WriterBuilder::new().delimiter(sep).flexible(true).terminator(::csv::Terminator::CRLF).from_writer(Vec::new());
    for row in rows {
        w.write_record(row).map_err(|e| format!("pmnc.csv.encode: {e}"))?;
    }
    let bytes = w.into_inner().map_err(|e| format!("pmnc.csv.encode: {e}"))?;
    String::from_utf8(bytes).map_err(|e| format!("pmnc.csv.encode: {e}"))
}

fn rows_to_lua(lua: &Lua, rows: Vec<Vec<String>>, header: bool) -> mlua::Result<MultiValue> {
    let out = lua.create_table_with_capacity(rows.len(), 0)?;
    let mut rows = rows.into_iter();
    if header {
        let names = rows.next().unwrap_or_default();
        for row in rows {
            let t = lua.create_table_with_capacity(0, names.len())?;
            for (name, field) in names.iter().zip(row) {
                t.raw_set(name.as_str(), field)?;
            }
            out.raw_push(t)?;
        }
    } else {
        for row in rows {
            out.raw_push(lua.create_sequence_from(row)?)?;
        }
    }
    Ok(MultiValue::from_iter([LuaValue::Table(out)]))
}

fn field(v: LuaValue, at: &str) -> Result<String, String> {
    match v {
        LuaValue::Nil => Ok(String::new()),
        LuaValue::String(s) => s.to_str().map(|s| s.to_string()).map_err(|_| format!("pmnc.csv.encode: {at} is not UTF-8")),
        LuaValue::Integer(i) => Ok(i.to_string()),
        LuaValue::Number(n) => Ok(n.to_string()),
        LuaValue::Boolean(b) => Ok(b.to_string()),
        other => Err(format!("pmnc.csv.encode: {at} must be a string or number, got {}", other.type_name())),
    }
}

fn names_of(opts: &LuaValue) -> Result<Option<Vec<String>>, String> {
    let LuaValue::Table(o) = opts else { return Ok(None) };
    match o.raw_get::<LuaValue>("header") {
        Ok(LuaValue::Table(h)) => {
            let mut names = Vec::new();
            for (i, v) in h.sequence_values::<LuaValue>().enumerate() {
                names.push(field(v.map_err(|e| format!("pmnc.csv.encode: {e}"))?, &format!("header {}", i + 1))?);
            }
            Ok(Some(names))
        }
        _ => Ok(None),
    }
}

/// The rows of Lua `rows`: lists as they are; keyed tables by `names` (or their sorted keys),
/// after a header row of the names.
fn rows_from_lua(rows: &Table, names: Option<Vec<String>>) -> Result<Vec<Vec<String>>, String> {
    let mut out = Vec::new();
    let mut names = names;
    let mut keyed = None;
    for (i, row) in rows.sequence_values::<LuaValue>().enumerate() {
        let at = format!("row {}", i + 1);
        let row = match row.map_err(|e| format!("pmnc.csv.encode: {e}"))? {
            LuaValue::Table(t) => t,
            other => return Err(format!("pmnc.csv.encode: {at} must be a table, got {}", other.type_name())),
        };
        let is_keyed = row.raw_len() == 0 && !row.is_empty();
        if *keyed.get_or_insert(is_keyed) {
            if names.is_none() {
                let mut keys = Vec::new();
                for pair in row.pairs::<LuaValue, LuaValue>() {
                    let (k, _) = pair.map_err(|e| format!("pmnc.csv.encode: {e}"))?;
                    keys.push(field(k, &at)?);
                }
                keys.sort();
                names = Some(keys);
            }
            let names = names.as_deref().unwrap_or_default();
            if out.is_empty() {
                out.push(names.to_vec());
            }
            let mut fields = Vec::with_capacity(names.len());
            for n in names {
                fields.push(field(row.raw_get(n.as_str()).map_err(|e| format!("pmnc.csv.encode: {e}"))?, &format!("{at}.{n}"))?);
            }
            out.push(fields);
        } else {
            if out.is_empty() {
                if let Some(names) = &names {
                    out.push(names.clone());
                }
            }
            let mut fields = Vec::new();
            for (j, v) in row.sequence_values::<LuaValue>().enumerate() {
                fields.push(field(v.map_err(|e| format!("pmnc.csv.encode: {e}"))?, &format!("{at} field {}", j + 1))?);
            }
            out.push(fields);
        }
    }
    Ok(out)
}

pub(crate) fn install(lua: &Lua, t: &Table) -> mlua::Result<()> {
    t.set(
        "decode",
        lua.create_function(|lua, (text, opts): (LuaValue, LuaValue)| {
            reported(lua, || {
                let f = "pmnc.csv.decode";
                let header = opt_flag(&opts, "header", f, true)?;
                let sep = separator(&opts, f)?;
                let text = string_arg(&text, f, "text")?;
                Ok(run_over(lua, text, [], crate::INLINE_BYTES_SLOW, move |text, []| decode(text, sep), move |lua, _, rows| rows_to_lua(lua, rows, header)))
            })
        })?,
    )?;
    t.set(
        "encode",
        lua.create_function(|lua, (rows, opts): (LuaValue, LuaValue)| {
            reported(lua, || {
                let f = "pmnc.csv.encode";
                let sep = separator(&opts, f)?;
                let LuaValue::Table(rows) = rows else {
                    return Err(format!("{f}: expected a list of rows, got {}", rows.type_name()));
                };
                let rows = rows_from_lua(&rows, names_of(&opts)?)?;
                Ok(ok_bytes(lua, encode(&rows, sep)?))
            })
        })?,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc4180_quoting() {
        let text = "name,note\r\nann,\"a, b\"\r\nbob,\"say \"\"hi\"\"\r\nnext line\"\r\n";
        let rows = decode(text.as_bytes(), b',').unwrap();
        assert_eq!(rows[1], vec!["ann", "a, b"]);
        assert_eq!(rows[2], vec!["bob", "say \"hi\"\r\nnext line"]);
        assert_eq!(encode(&rows, b',').unwrap(), text);
    }

    #[test]
    fn keyed_rows_with_a_header() {
        let lua = Lua::new();
        let rows: Table = lua.load(r#"return { { b = 2, a = "x,y" }, { a = 1 } }"#).eval().unwrap();
        let text = encode(&rows_from_lua(&rows, None).unwrap(), b',').unwrap();
        assert_eq!(text, "a,b\r\n\"x,y\",2\r\n1,\r\n");
        let back = rows_to_lua(&lua, decode(text.as_bytes(), b',').unwrap(), true).unwrap();
        let LuaValue::Table(t) = back.into_iter().next().unwrap() else { panic!() };
        let first: Table = t.get(1).unwrap();
        assert_eq!(first.get::<String>("a").unwrap(), "x,y");
    }

    #[test]
    fn bad_quotes_report_the_record() {
        // An unclosed quote runs to the end of the text, which the csv reader accepts; a field of
        // invalid UTF-8 is the error it reports.
        assert!(decode(b"a\r\n\xff\r\n", b',').unwrap_err().starts_with("pmnc.csv.decode: record 2"));
    }
}
