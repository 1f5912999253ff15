//! `pmnc.hex`: bytes as lowercase hexadecimal and back (either case accepted).

use mlua::{Lua, Table, Value as LuaValue};

use crate::{bytes_arg, len_of, one_string, reported, run_within, INLINE_BYTES_RE};

/// Lowercase hex of `data`.
pub fn encode(data: &[u8]) -> String {
    ::hex::encode(data)
}

/// The bytes of hex `text`.
pub fn decode(text: &[u8]) -> Result<Vec<u8>, String> {
    ::hex::decode(text).map_err(|e| match e {
        ::hex::FromHexError::InvalidHexCharacter { c, index } => {
            format!("pmnc.hex.decode: invalid character {c:?} at offset {index}")
        }
        ::hex::FromHexError::OddLength => "pmnc.hex.decode: odd number of digits".to_string(),
        other => format!("pmnc.hex.decode: {other}"),
    })
}

pub(crate) fn install(lua: &Lua, t: &Table) -> mlua::Result<()> {
    t.set(
        "encode",
        lua.create_function(|lua, data: LuaValue| {
            reported(lua, || {
                let bytes = bytes_arg(&data, "pmnc.hex.encode", "data")?;
                Ok(run_within(lua, len_of(&data), INLINE_BYTES_RE, move || Ok(encode(&bytes)), one_string))
            })
        })?,
    )?;
    t.set(
        "decode",
        lua.create_function(|lua, text: LuaValue| {
            reported(lua, || {
                let bytes = bytes_arg(&text, "pmnc.hex.decode", "text")?;
                Ok(run_within(lua, len_of(&text), INLINE_BYTES_RE, move || decode(&bytes), one_string))
            })
        })?,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc4648_base16_vectors() {
        for (plain, coded) in [("", ""), ("f", "66"), ("fo", "666f"), ("foobar", "666f6f626172")] {
            assert_eq!(encode(plain.as_bytes()), coded);
            assert_eq!(decode(coded.as_bytes()).unwrap(), plain.as_bytes());
        }
        assert_eq!(decode(b"DEADbeef").unwrap(), vec![0xde, 0xad, 0xbe, 0xef]);
    }

    #[test]
    fn errors() {
        assert_eq!(decode(b"abc").unwrap_err(), "pmnc.hex.decode: odd number of digits");
        assert_eq!(decode(b"zz").unwrap_err(), "pmnc.hex.decode: invalid character 'z' at offset 0");
    }
}
