//! `pmnc.crypto`: digests (SHA-1, SHA-256, SHA-512, MD5) and HMAC over them, random bytes from
//! the OS, constant-time comparison, and argon2id password hashes (always off the worker).

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use hmac::{Hmac, Mac};
use md5::Md5;
use mlua::{Lua, Table, Value as LuaValue};
use sha1::{Digest, Sha1};
use sha2::{Sha256, Sha512};
use subtle::ConstantTimeEq;

use crate::{bytes_arg, ok, one_string, opt_int, pending, reported, run_sized, string_arg, transform, Out, INLINE_BYTES};

/// Most bytes one `pmnc.crypto.random` call gives.
pub const RANDOM_MAX: i64 = 64 << 20;

/// The digest algorithms, by the names the functions use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Alg {
    Sha1,
    Sha256,
    Sha512,
    Md5,
}

impl Alg {
    const ALL: [Alg; 4] = [Alg::Sha1, Alg::Sha256, Alg::Sha512, Alg::Md5];

    /// The algorithm named `name`.
    pub(crate) fn named(name: &[u8]) -> Option<Alg> {
        Alg::ALL.into_iter().find(|a| a.name().as_bytes() == name)
    }

    fn name(self) -> &'static str {
        match self {
            Alg::Sha1 => "sha1",
            Alg::Sha256 => "sha256",
            Alg::Sha512 => "sha512",
            Alg::Md5 => "md5",
        }
    }
}

/// The digest of `data` by `alg` (sha1, sha256, sha512, md5).
pub fn digest(alg: &str, data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Out::default();
    digest_into(Alg::named(alg.as_bytes())?, data, &mut out);
    Some(out.into_vec())
}

/// [`digest`] appended to `out`.
fn digest_into(alg: Alg, data: &[u8], out: &mut Out) {
    let (bytes, len) = digest_array(alg, data);
    out.extend(&bytes[..len]);
}

/// The digest of `data` by `alg` in an array, with its length (what the fast paths push, as
/// they may own nothing with a destructor).
pub(crate) fn digest_array(alg: Alg, data: &[u8]) -> ([u8; 64], usize) {
    let mut out = [0u8; 64];
    let len = match alg {
        Alg::Sha1 => copy_into(&mut out, &Sha1::digest(data)),
        Alg::Sha256 => copy_into(&mut out, &Sha256::digest(data)),
        Alg::Sha512 => copy_into(&mut out, &Sha512::digest(data)),
        Alg::Md5 => copy_into(&mut out, &Md5::digest(data)),
    };
    (out, len)
}

/// The HMAC of `data` under `key` by `alg` in an array, with its length.
pub(crate) fn hmac_array(alg: Alg, key: &[u8], data: &[u8]) -> ([u8; 64], usize) {
    fn one<M: Mac + hmac::digest::KeyInit>(key: &[u8], data: &[u8], out: &mut [u8; 64]) -> usize {
        // An HMAC key may have any length, so this cannot fail.
        match <M as Mac>::new_from_slice(key) {
            Ok(mut m) => {
                m.update(data);
                copy_into(out, &m.finalize().into_bytes())
            }
            Err(_) => 0,
        }
    }
    let mut out = [0u8; 64];
    let len = match alg {
        Alg::Sha1 => one::<Hmac<Sha1>>(key, data, &mut out),
        Alg::Sha256 => one::<Hmac<Sha256>>(key, data, &mut out),
        Alg::Sha512 => one::<Hmac<Sha512>>(key, data, &mut out),
        Alg::Md5 => one::<Hmac<Md5>>(key, data, &mut out),
    };
    (out, len)
}

/// Copies `bytes` (at most 64: the longest digest) to the front of `out`; their length.
fn copy_into(out: &mut [u8; 64], bytes: &[u8]) -> usize {
    let len = bytes.len().min(64);
    out[..len].copy_from_slice(&bytes[..len]);
    len
}

/// HMAC of `data` under `key` with `alg`.
pub fn hmac(alg: &str, key: &[u8], data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Out::default();
    hmac_into(Alg::named(alg.as_bytes())?, key, data, &mut out);
    Some(out.into_vec())
}

/// [`hmac`] appended to `out`.
fn hmac_into(alg: Alg, key: &[u8], data: &[u8], out: &mut Out) {
    let (bytes, len) = hmac_array(alg, key, data);
    out.extend(&bytes[..len]);
}

fn hash_password(pw: &[u8]) -> Result<String, String> {
    let mut salt = [0u8; 16];
    getrandom::getrandom(&mut salt).map_err(|e| format!("pmnc.crypto.password_hash: no random bytes: {e}"))?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| format!("pmnc.crypto.password_hash: {e}"))?;
    Argon2::default().hash_password(pw, &salt).map(|h| h.to_string()).map_err(|e| format!("pmnc.crypto.password_hash: {e}"))
}

fn verify_password(pw: &[u8], hash: &str) -> Result<bool, String> {
    let parsed = PasswordHash::new(hash).map_err(|e| format!("pmnc.crypto.password_verify: not a PHC hash string: {e}"))?;
    match Argon2::default().verify_password(pw, &parsed) {
        Ok(()) => Ok(true),
        Err(argon2::password_hash::Error::Password) => Ok(false),
        Err(e) => Err(format!("pmnc.crypto.password_verify: {e}")),
    }
}

pub(crate) fn install(lua: &Lua, t: &Table) -> mlua::Result<()> {
    for alg in Alg::ALL {
        let f = format!("pmnc.crypto.{}", alg.name());
        t.set(
            alg.name(),
            lua.create_function(move |lua, data: LuaValue| {
                reported(lua, || {
                    let data = string_arg(&data, &f, "data")?;
                    Ok(transform(lua, data, [], INLINE_BYTES, move |data, [], out| {
                        digest_into(alg, data, out);
                        Ok(())
                    }))
                })
            })?,
        )?;
    }
    t.set(
        "hmac",
        lua.create_function(|lua, (alg, key, data): (LuaValue, LuaValue, LuaValue)| {
            reported(lua, || {
                let f = "pmnc.crypto.hmac";
                let alg = match &alg {
                    LuaValue::String(s) => {
                        let name = s.as_bytes();
                        match Alg::named(&name) {
                            Some(alg) => alg,
                            None => {
                                let other = String::from_utf8_lossy(&name);
                                return Err(format!("{f}: unknown algorithm {other:?} (sha1, sha256, sha512 or md5)"));
                            }
                        }
                    }
                    other => return Err(format!("{f}: algorithm must be a string, got {}", other.type_name())),
                };
                let key = string_arg(&key, f, "key")?;
                let data = string_arg(&data, f, "data")?;
                Ok(transform(lua, data, [key], INLINE_BYTES, move |data, [key], out| {
                    hmac_into(alg, key, data, out);
                    Ok(())
                }))
            })
        })?,
    )?;
    t.set(
        "random",
        lua.create_function(|lua, n: LuaValue| {
            reported(lua, || {
                let f = "pmnc.crypto.random";
                if n.is_nil() {
                    return Err(format!("{f}: the number of bytes is missing"));
                }
                let n = opt_int(&n, f, "the number of bytes", 0, 0, RANDOM_MAX)? as usize;
                let work = move || {
                    let mut buf = vec![0u8; n];
                    getrandom::getrandom(&mut buf).map_err(|e| format!("{f}: the OS gave no random bytes: {e}"))?;
                    Ok(buf)
                };
                Ok(run_sized(lua, n, work, one_string))
            })
        })?,
    )?;
    t.set(
        "equal",
        lua.create_function(|lua, (a, b): (LuaValue, LuaValue)| {
            reported(lua, || {
                let f = "pmnc.crypto.equal";
                let (LuaValue::String(a), LuaValue::String(b)) = (&a, &b) else {
                    return Err(format!("{f}: both arguments must be strings, got {} and {}", a.type_name(), b.type_name()));
                };
                let same = a.as_bytes().ct_eq(&b.as_bytes()).into();
                Ok(ok([LuaValue::Boolean(same)]))
            })
        })?,
    )?;
    t.set(
        "password_hash",
        lua.create_function(|lua, pw: LuaValue| {
            reported(lua, || {
                let pw = bytes_arg(&pw, "pmnc.crypto.password_hash", "password")?;
                Ok(pending(lua, move || hash_password(&pw), one_string))
            })
        })?,
    )?;
    t.set(
        "password_verify",
        lua.create_function(|lua, (pw, hash): (LuaValue, LuaValue)| {
            reported(lua, || {
                let f = "pmnc.crypto.password_verify";
                let pw = bytes_arg(&pw, f, "password")?;
                let hash = String::from_utf8(bytes_arg(&hash, f, "hash")?).map_err(|_| format!("{f}: the hash is not UTF-8"))?;
                Ok(pending(lua, move || verify_password(&pw, &hash), |_, same| Ok(mlua::MultiValue::from_iter([LuaValue::Boolean(same)]))))
            })
        })?,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hx(b: &[u8]) -> String {
        ::hex::encode(b)
    }

    #[test]
    fn digest_vectors() {
        // FIPS 180 "abc" examples and RFC 1321.
        assert_eq!(hx(&digest("sha1", b"abc").unwrap()), "a9993e364706816aba3e25717850c26c9cd0d89d");
        assert_eq!(hx(&digest("sha256", b"abc").unwrap()), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert_eq!(
            hx(&digest("sha512", b"abc").unwrap()),
            "ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f"
        );
        assert_eq!(hx(&digest("md5", b"").unwrap()), "d41d8cd98f00b204e9800998ecf8427e");
        assert_eq!(hx(&digest("md5", b"abc").unwrap()), "900150983cd24fb0d6963f7d28e17f72");
        assert!(digest("sha3", b"").is_none());
    }

    #[test]
    fn hmac_rfc4231_and_rfc2202() {
        // RFC 4231 test case 2.
        assert_eq!(hx(&hmac("sha256", b"Jefe", b"what do ya want for nothing?").unwrap()), "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
        assert_eq!(
            hx(&hmac("sha512", b"Jefe", b"what do ya want for nothing?").unwrap()),
            "164b7a7bfcf819e2e395fbe73b56e0a387bd64222e831fd610270cd7ea2505549758bf75c05a994a6d034f65f8f0e6fdcaeab1a34d4a6b4b636e070a38bce737"
        );
        // RFC 4231 test case 1.
        assert_eq!(hx(&hmac("sha256", &[0x0b; 20], b"Hi There").unwrap()), "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7");
        // RFC 2202.
        assert_eq!(hx(&hmac("sha1", b"Jefe", b"what do ya want for nothing?").unwrap()), "effcdf6ae5eb2fa2d27416d5f184df9c259a7c79");
        assert_eq!(hx(&hmac("md5", b"Jefe", b"what do ya want for nothing?").unwrap()), "750c783e6ab0b503eaa86e310a5db738");
    }

    #[test]
    fn passwords() {
        let h = hash_password(b"correct horse").unwrap();
        assert!(h.starts_with("$argon2id$"), "{h}");
        assert!(verify_password(b"correct horse", &h).unwrap());
        assert!(!verify_password(b"wrong horse", &h).unwrap());
        assert!(verify_password(b"x", "not a hash").unwrap_err().contains("not a PHC hash string"));
    }
}
