//! `pmnc.hex`: bytes as lowercase hexadecimal and back (either case accepted).

use mlua::{Lua, Table, Value as LuaValue};

use crate::{reported, string_arg, transform, Out, INLINE_BYTES_RE};

/// The two lowercase digits of every byte as one little-endian u16 (first digit in the low
/// byte): one lookup and one store per byte.
const PAIRS: [u16; 256] = {
    let digits = b"0123456789abcdef";
    let mut t = [0u16; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = digits[i >> 4] as u16 | (digits[i & 15] as u16) << 8;
        i += 1;
    }
    t
};

/// Lowercase hex of `data`.
pub fn encode(data: &[u8]) -> String {
    ::hex::encode(data)
}

/// [`encode`] into `out`, which is twice as long as `data` (a shorter one gets the digits of
/// the bytes that fit).
pub(crate) fn encode_to_slice(data: &[u8], out: &mut [u8]) {
    for (b, o) in data.iter().zip(out.chunks_exact_mut(2)) {
        o.copy_from_slice(&PAIRS[usize::from(*b)].to_le_bytes());
    }
}

/// The bytes of hex `text`.
pub fn decode(text: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = vec![0u8; text.len() / 2];
    decode_to_slice(text, &mut out)?;
    Ok(out)
}

/// [`decode`] into `out`, which is half as long as `text`.
fn decode_to_slice(text: &[u8], out: &mut [u8]) -> Result<(), String> {
    ::hex::decode_to_slice(text, out).map_err(|e| match e {
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
                let data = string_arg(&data, "pmnc.hex.encode", "data")?;
                Ok(transform(lua, data, [], INLINE_BYTES_RE, |data, [], out: &mut Out| {
                    encode_to_slice(data, out.grow(2 * data.len()));
                    Ok(())
                }))
            })
        })?,
    )?;
    t.set(
        "decode",
        lua.create_function(|lua, text: LuaValue| {
            reported(lua, || {
                let text = string_arg(&text, "pmnc.hex.decode", "text")?;
                Ok(transform(lua, text, [], INLINE_BYTES_RE, |text, [], out: &mut Out| decode_to_slice(text, out.grow(text.len() / 2))))
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
        assert_eq!(decode(b"00a!").unwrap_err(), "pmnc.hex.decode: invalid character '!' at offset 3");
    }

    #[test]
    fn the_pair_table_agrees_with_the_hex_crate_on_every_byte() {
        let every: Vec<u8> = (0..=255).collect();
        let mut out = vec![0u8; 512];
        encode_to_slice(&every, &mut out);
        assert_eq!(out, ::hex::encode(&every).as_bytes());
        assert_eq!(decode(&out).unwrap(), every);
    }
}
