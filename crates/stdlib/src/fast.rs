//! Raw C functions in front of the helpers integration code calls most (`pmnc.base64.encode`,
//! `pmnc.hex.encode`, the digests and `pmnc.crypto.hmac`). A call through the prelude's Lua
//! wrapper and mlua's callback cost about 4,000 instructions besides the work (bench/README.md,
//! "what one helper call costs"); these read their string arguments with `lua_tolstring` and push
//! the result at once. Any call they do not take whole (another argument count or type, options,
//! an input too big to handle on the worker) goes to the prelude's wrapper unchanged, through a
//! yieldable protected call whose error gets the caller's position, as the wrapper's own
//! `error(message, 2)` gave it.
//!
//! Safety of the fast paths: Lua reports errors by `longjmp`, which may only cross Rust frames
//! that own nothing with a destructor. Every Lua API call below that can raise (pushing a
//! string: a memory error) is made when the Rust frames hold only integers, pointers and
//! arrays; the work in between calls no Lua API and cannot panic for inputs of any length.

use std::ffi::{c_char, c_int};

use mlua::{ffi, Function, Lua};

use crate::crypto::Alg;
use crate::{INLINE_BYTES, INLINE_BYTES_RE};

/// The C closure that puts the fast path of `family.name` in front of `wrapper` (the prelude's
/// function for it), or `wrapper` itself when there is none.
pub fn front(lua: &Lua, family: &str, name: &str, wrapper: Function) -> mlua::Result<Function> {
    let fast: ffi::lua_CFunction = match (family, name) {
        ("base64", "encode") => base64_encode,
        ("hex", "encode") => hex_encode,
        ("crypto", "hmac") => hmac,
        ("crypto", "sha1") => sha1,
        ("crypto", "sha256") => sha256,
        ("crypto", "sha512") => sha512,
        ("crypto", "md5") => md5,
        _ => return Ok(wrapper),
    };
    // SAFETY: the wrapper is at stack slot 1; `lua_pushcclosure` pops it as the upvalue and leaves
    // the closure, the one value returned. A memory error is caught by the protected call.
    unsafe {
        lua.exec_raw::<Function>(wrapper, |state| {
            ffi::lua_pushcclosure(state, fast, 1);
        })
    }
}

/// The bytes of argument `i` when it is a string (not a number: the wrapper's checks stand).
///
/// # Safety
/// `state` is a running Lua state with at least `i` arguments; the slice lives while the
/// argument stays on the stack.
unsafe fn string_at<'a>(state: *mut ffi::lua_State, i: c_int) -> Option<&'a [u8]> {
    if ffi::lua_type(state, i) != ffi::LUA_TSTRING {
        return None;
    }
    let mut len = 0usize;
    let p = ffi::lua_tolstring(state, i, &mut len);
    if p.is_null() {
        return None;
    }
    Some(std::slice::from_raw_parts(p as *const u8, len))
}

/// Hands the call to the prelude's wrapper (upvalue 1) with all its arguments.
unsafe extern "C-unwind" fn wrapped(state: *mut ffi::lua_State) -> c_int {
    let n = ffi::lua_gettop(state);
    ffi::lua_pushvalue(state, ffi::lua_upvalueindex(1));
    ffi::lua_insert(state, 1);
    let status = ffi::lua_pcallk(state, n, ffi::LUA_MULTRET, 0, 0, Some(wrapped_done));
    wrapped_done(state, status, 0)
}

/// After the wrapper: its results, or its error raised again. The wrapper raised a message at
/// level 2, which is this C function and gives no position: the caller's is put in front, as
/// it was when the wrapper was called directly.
unsafe extern "C-unwind" fn wrapped_done(state: *mut ffi::lua_State, status: c_int, _: ffi::lua_KContext) -> c_int {
    if status == ffi::LUA_OK || status == ffi::LUA_YIELD {
        return ffi::lua_gettop(state);
    }
    if ffi::lua_type(state, -1) == ffi::LUA_TSTRING {
        ffi::luaL_where(state, 1);
        ffi::lua_insert(state, -2);
        ffi::lua_concat(state, 2);
    }
    ffi::lua_error(state)
}

/// Pushes `bytes` as the one result.
unsafe fn push(state: *mut ffi::lua_State, bytes: &[u8]) -> c_int {
    ffi::lua_pushlstring(state, bytes.as_ptr() as *const c_char, bytes.len());
    1
}

/// Writes a result of `len` bytes with `write` into this thread's scratch buffer and pushes it.
/// The buffer is back in its slot before the string is made, so no Rust value with a destructor
/// is alive while Lua may raise; `lua_pushlstring` copies the bytes before its collector step,
/// and module code cannot set `__gc` (the prelude refuses it), so nothing writes the buffer
/// meanwhile.
unsafe fn push_written(state: *mut ffi::lua_State, len: usize, write: impl FnOnce(&mut [u8])) -> c_int {
    let (ptr, len) = crate::with_scratch(len, write);
    ffi::lua_pushlstring(state, ptr as *const c_char, len);
    1
}

unsafe extern "C-unwind" fn base64_encode(state: *mut ffi::lua_State) -> c_int {
    match (ffi::lua_gettop(state), string_at(state, 1)) {
        (1, Some(data)) if data.len() <= INLINE_BYTES => {
            push_written(state, crate::base64::encoded_len(data.len(), true), |out| crate::base64::encode_to_slice(data, false, out))
        }
        _ => wrapped(state),
    }
}

unsafe extern "C-unwind" fn hex_encode(state: *mut ffi::lua_State) -> c_int {
    match (ffi::lua_gettop(state), string_at(state, 1)) {
        (1, Some(data)) if data.len() <= INLINE_BYTES_RE => push_written(state, 2 * data.len(), |out| crate::hex::encode_to_slice(data, out)),
        _ => wrapped(state),
    }
}

unsafe fn digest(state: *mut ffi::lua_State, alg: Alg) -> c_int {
    match (ffi::lua_gettop(state), string_at(state, 1)) {
        (1, Some(data)) if data.len() <= INLINE_BYTES => {
            let (bytes, len) = crate::crypto::digest_array(alg, data);
            push(state, &bytes[..len])
        }
        _ => wrapped(state),
    }
}

unsafe extern "C-unwind" fn sha1(state: *mut ffi::lua_State) -> c_int {
    digest(state, Alg::Sha1)
}

unsafe extern "C-unwind" fn sha256(state: *mut ffi::lua_State) -> c_int {
    digest(state, Alg::Sha256)
}

unsafe extern "C-unwind" fn sha512(state: *mut ffi::lua_State) -> c_int {
    digest(state, Alg::Sha512)
}

unsafe extern "C-unwind" fn md5(state: *mut ffi::lua_State) -> c_int {
    digest(state, Alg::Md5)
}

unsafe extern "C-unwind" fn hmac(state: *mut ffi::lua_State) -> c_int {
    if ffi::lua_gettop(state) != 3 {
        return wrapped(state);
    }
    match (string_at(state, 1).and_then(Alg::named), string_at(state, 2), string_at(state, 3)) {
        (Some(alg), Some(key), Some(data)) if key.len() + data.len() <= INLINE_BYTES => {
            let (bytes, len) = crate::crypto::hmac_array(alg, key, data);
            push(state, &bytes[..len])
        }
        _ => wrapped(state),
    }
}
