//! `pmnc.compress`: gzip, zlib (HTTP's "deflate") and zstd. Decompression streams into a buffer
//! that may not grow past `max_size`, so a bomb fails with a clear error having allocated at most
//! that much.

use std::io::{Read, Write};

use flate2::read::{MultiGzDecoder, ZlibDecoder};
use flate2::write::{GzEncoder, ZlibEncoder};
use flate2::Compression;
use mlua::{Lua, Table, Value as LuaValue};

use crate::{one_string, opt_int, reported, run_over, string_arg, INLINE_BYTES, INLINE_BYTES_SLOW};

/// What decompression may produce unless `max_size` says otherwise: 1 MiB, the default request
/// body limit of the http interface (`max_body_size`).
pub const DEFAULT_MAX_SIZE: usize = 1 << 20;
/// The largest `max_size` a call may ask for.
pub const MAX_SIZE_LIMIT: i64 = 1 << 30;

/// Reads `r` to its end, failing once more than `max` bytes come out.
fn bounded(mut r: impl Read, max: usize, func: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let mut chunk = [0u8; 16 << 10];
    loop {
        let n = r.read(&mut chunk).map_err(|e| format!("{func}: corrupt input: {e}"))?;
        if n == 0 {
            return Ok(out);
        }
        if out.len() + n > max {
            return Err(format!("{func}: output over max_size ({max} bytes); pass a larger max_size if it is expected"));
        }
        out.extend_from_slice(&chunk[..n]);
    }
}

/// Gunzips `data` (every member) into at most `max` bytes.
pub fn bounded_gunzip(data: &[u8], max: usize) -> Result<Vec<u8>, String> {
    bounded(MultiGzDecoder::new(data), max, "pmnc.compress.gunzip")
}

/// Inflates zlib `data` into at most `max` bytes.
pub fn bounded_inflate(data: &[u8], max: usize) -> Result<Vec<u8>, String> {
    bounded(ZlibDecoder::new(data), max, "pmnc.compress.inflate")
}

/// Decompresses zstd `data` into at most `max` bytes.
pub fn bounded_unzstd(data: &[u8], max: usize) -> Result<Vec<u8>, String> {
    let f = "pmnc.compress.unzstd";
    let mut decoder = zstd::stream::read::Decoder::new(data).map_err(|e| format!("{f}: {e}"))?;
    // A frame names the window its decoder must keep; a window over max_size serves no output
    // within the limit, and would let a few header bytes ask for 128 MiB.
    let window_log = (usize::BITS - max.max(1).leading_zeros()).clamp(10, 27);
    decoder.window_log_max(window_log).map_err(|e| format!("{f}: {e}"))?;
    bounded(decoder, max, f)
}

/// `data` gzipped at `level` (0-9).
pub fn gzip(data: &[u8], level: u32) -> Result<Vec<u8>, String> {
    let mut e = GzEncoder::new(Vec::new(), Compression::new(level));
    e.write_all(data).and_then(|_| e.finish()).map_err(|e| format!("pmnc.compress.gzip: {e}"))
}

/// `data` as a zlib stream at `level` (0-9).
pub fn deflate(data: &[u8], level: u32) -> Result<Vec<u8>, String> {
    let mut e = ZlibEncoder::new(Vec::new(), Compression::new(level));
    e.write_all(data).and_then(|_| e.finish()).map_err(|e| format!("pmnc.compress.deflate: {e}"))
}

/// `data` as zstd at `level` (1-19).
pub fn zstd(data: &[u8], level: i32) -> Result<Vec<u8>, String> {
    zstd::stream::encode_all(data, level).map_err(|e| format!("pmnc.compress.zstd: {e}"))
}

type Compressor = fn(&[u8], i64) -> Result<Vec<u8>, String>;
type Decompressor = fn(&[u8], usize) -> Result<Vec<u8>, String>;

pub(crate) fn install(lua: &Lua, t: &Table) -> mlua::Result<()> {
    let packers: [(&'static str, i64, i64, i64, usize, Compressor); 3] = [
        ("gzip", 6, 0, 9, INLINE_BYTES_SLOW, |d, l| gzip(d, l as u32)),
        ("deflate", 6, 0, 9, INLINE_BYTES_SLOW, |d, l| deflate(d, l as u32)),
        ("zstd", 3, 1, 19, INLINE_BYTES, |d, l| zstd(d, l as i32)),
    ];
    for (name, default, min, max, inline, pack) in packers {
        t.set(
            name,
            lua.create_function(move |lua, (data, level): (LuaValue, LuaValue)| {
                reported(lua, || {
                    let f = format!("pmnc.compress.{name}");
                    let level = opt_int(&level, &f, "level", default, min, max)?;
                    let data = string_arg(&data, &f, "data")?;
                    Ok(run_over(lua, data, [], inline, move |data, []| pack(data, level), |lua, _, packed| one_string(lua, packed)))
                })
            })?,
        )?;
    }
    let unpackers: [(&'static str, Decompressor); 3] = [("gunzip", bounded_gunzip), ("inflate", bounded_inflate), ("unzstd", bounded_unzstd)];
    for (name, unpack) in unpackers {
        t.set(
            name,
            lua.create_function(move |lua, (data, max): (LuaValue, LuaValue)| {
                reported(lua, || {
                    let f = format!("pmnc.compress.{name}");
                    let max = opt_int(&max, &f, "max_size", DEFAULT_MAX_SIZE as i64, 0, MAX_SIZE_LIMIT)? as usize;
                    let data = string_arg(&data, &f, "data")?;
                    // The work grows with the output, so a large allowance goes off the worker
                    // even for a small input (the default one included; an empty input stays,
                    // as it has nothing to unpack).
                    let inline = if max > 4 * INLINE_BYTES { 0 } else { INLINE_BYTES_SLOW };
                    Ok(run_over(lua, data, [], inline, move |data, []| unpack(data, max), |lua, _, unpacked| one_string(lua, unpacked)))
                })
            })?,
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let data = b"hello hello hello hello".repeat(100);
        assert_eq!(bounded_gunzip(&gzip(&data, 6).unwrap(), DEFAULT_MAX_SIZE).unwrap(), data);
        assert_eq!(bounded_inflate(&deflate(&data, 9).unwrap(), DEFAULT_MAX_SIZE).unwrap(), data);
        assert_eq!(bounded_unzstd(&zstd(&data, 3).unwrap(), DEFAULT_MAX_SIZE).unwrap(), data);
    }

    #[test]
    fn known_gzip_stream() {
        // `printf hello | gzip -n`.
        let stream = [
            0x1f, 0x8b, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x03, 0xcb, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00, 0x86, 0xa6, 0x10, 0x36, 0x05, 0x00, 0x00,
            0x00,
        ];
        assert_eq!(bounded_gunzip(&stream, 10).unwrap(), b"hello");
    }

    #[test]
    fn bombs_stop_at_max_size() {
        let bomb = gzip(&vec![0u8; 50 << 20], 9).unwrap();
        assert!(bomb.len() < 100 << 10);
        let e = bounded_gunzip(&bomb, DEFAULT_MAX_SIZE).unwrap_err();
        assert_eq!(e, "pmnc.compress.gunzip: output over max_size (1048576 bytes); pass a larger max_size if it is expected");
        let z = zstd(&vec![0u8; 50 << 20], 3).unwrap();
        assert!(bounded_unzstd(&z, DEFAULT_MAX_SIZE).unwrap_err().contains("over max_size"));
        assert!(bounded_inflate(b"not zlib", 10).unwrap_err().contains("corrupt input"));
        // A frame whose window is far over max_size is refused before its window is allocated.
        let mut big = Vec::new();
        let mut e = zstd::stream::write::Encoder::new(&mut big, 3).unwrap();
        e.window_log(27).unwrap();
        e.include_contentsize(false).unwrap();
        e.write_all(&vec![7u8; 4 << 20]).unwrap();
        e.finish().unwrap();
        assert!(bounded_unzstd(&big, 1024).is_err());
    }
}
