//! `pmnc.base64`: encode and decode, standard or URL-safe alphabet, with or without padding
//! (RFC 4648).

use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::{DecodeError, Engine};
use mlua::{Lua, Table, Value as LuaValue};

use crate::{bytes_arg, len_of, one_string, opt_flag, reported, run_sized};

fn engine(url: bool, pad: bool) -> GeneralPurpose {
    let config = GeneralPurposeConfig::new().with_encode_padding(pad).with_decode_padding_mode(DecodePaddingMode::Indifferent);
    GeneralPurpose::new(if url { &alphabet::URL_SAFE } else { &alphabet::STANDARD }, config)
}

/// `encode(data, url, pad)` as the function does it.
pub fn encode(data: &[u8], url: bool, pad: bool) -> String {
    engine(url, pad).encode(data)
}

/// `decode(text, url)`: padding is optional either way.
pub fn decode(text: &[u8], url: bool) -> Result<Vec<u8>, String> {
    engine(url, true).decode(text).map_err(|e| match e {
        DecodeError::InvalidByte(at, b) => format!("pmnc.base64.decode: invalid byte {:?} at offset {at}", b as char),
        DecodeError::InvalidLength(n) => format!("pmnc.base64.decode: invalid length ({n} symbols)"),
        DecodeError::InvalidLastSymbol(at, b) => {
            format!("pmnc.base64.decode: invalid last symbol {:?} at offset {at}", b as char)
        }
        DecodeError::InvalidPadding => "pmnc.base64.decode: invalid padding".to_string(),
    })
}

pub(crate) fn install(lua: &Lua, t: &Table) -> mlua::Result<()> {
    t.set(
        "encode",
        lua.create_function(|lua, (data, opts): (LuaValue, LuaValue)| {
            reported(lua, || {
                let f = "pmnc.base64.encode";
                let url = opt_flag(&opts, "url", f, false)?;
                let pad = opt_flag(&opts, "pad", f, true)?;
                let bytes = bytes_arg(&data, f, "data")?;
                Ok(run_sized(lua, len_of(&data), move || Ok(encode(&bytes, url, pad)), one_string))
            })
        })?,
    )?;
    t.set(
        "decode",
        lua.create_function(|lua, (text, opts): (LuaValue, LuaValue)| {
            reported(lua, || {
                let f = "pmnc.base64.decode";
                let url = opt_flag(&opts, "url", f, false)?;
                let bytes = bytes_arg(&text, f, "text")?;
                Ok(run_sized(lua, len_of(&text), move || decode(&bytes, url), one_string))
            })
        })?,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc4648_vectors() {
        let vectors = [("", ""), ("f", "Zg=="), ("fo", "Zm8="), ("foo", "Zm9v"), ("foob", "Zm9vYg=="), ("fooba", "Zm9vYmE="), ("foobar", "Zm9vYmFy")];
        for (plain, coded) in vectors {
            assert_eq!(encode(plain.as_bytes(), false, true), coded);
            assert_eq!(decode(coded.as_bytes(), false).unwrap(), plain.as_bytes());
            let bare = coded.trim_end_matches('=');
            assert_eq!(encode(plain.as_bytes(), false, false), bare);
            assert_eq!(decode(bare.as_bytes(), false).unwrap(), plain.as_bytes());
        }
    }

    #[test]
    fn url_safe_alphabet() {
        assert_eq!(encode(&[0xfb, 0xff, 0xbf], false, true), "+/+/");
        assert_eq!(encode(&[0xfb, 0xff, 0xbf], true, true), "-_-_");
        assert_eq!(decode(b"-_-_", true).unwrap(), vec![0xfb, 0xff, 0xbf]);
        assert!(decode(b"-_-_", false).is_err());
    }

    #[test]
    fn errors_name_the_function_and_offset() {
        let e = decode(b"Zm9vYmF!", false).unwrap_err();
        assert_eq!(e, "pmnc.base64.decode: invalid byte '!' at offset 7");
    }
}
