//! The Rust side of the sandbox rules of the prelude: stops, the watchdog's view of which
//! coroutine runs, turns for the worker, `require`, the C-sort gate and `os.getenv`.

use std::rc::Rc;

use mlua::{ffi, Lua, Table, Value as LuaValue};

use super::{failure, shared_of, success};

/// Arrays of plain numbers or strings up to this size go to Lua's own C sort (a few ms at most).
const C_SORT_MAX: usize = 20_000;

/// A future that is pending once (having woken its task), then ready: one turn for the other
/// tasks of the worker, which the request future counts as the end of a time slice.
#[derive(Default)]
pub(crate) struct YieldOnce(bool);

impl std::future::Future for YieldOnce {
    type Output = ();
    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        if self.0 {
            return std::task::Poll::Ready(());
        }
        self.0 = true;
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    }
}

/// The Rust side of the sandbox rules of the prelude.
pub(crate) fn register(lua: &Lua, t: &Table) -> mlua::Result<()> {
    // Weak: the VM owns these functions, and they must not keep its shared state alive.
    let weak = shared_of(lua).map(|s| Rc::downgrade(&s)).unwrap_or_default();
    // Whether an error on its way up is a stop that pcall and friends must pass on.
    let w = weak.clone();
    t.set("stopping", lua.create_function(move |_, ()| Ok(w.upgrade().is_some_and(|s| s.stopping.get() || s.closing.get())))?)?;
    // The request coroutine that has just started (the watchdog's signal must reach it); called
    // by every request, so it looks nothing up.
    t.set(
        "started",
        lua.create_function(move |lua, ()| {
            if let Some(shared) = weak.upgrade() {
                let state = lua.exec_raw_lua(|raw| raw.state());
                shared.started.set(state);
                crate::watchdog::push(state);
            }
            Ok(())
        })?,
    )?;
    // chained(f, co, ...): module code resumes or closes one of its coroutines (prelude.lua).
    // SAFETY: `chained` follows Lua's C function protocol and touches only its own stack.
    t.set("chained", unsafe { lua.create_c_function(chained)? })?;
    // SAFETY: as above.
    t.set("chained_resume", unsafe { lua.create_c_function(chained_resume)? })?;
    // find_library(name, env) -> true, chunk, file | false, message: `require` (libraries.rs).
    t.set(
        "find_library",
        lua.create_function(|lua, (name, env): (String, Table)| {
            let Some(shared) = shared_of(lua) else { return failure(lua, "require is not available here") };
            let loading = shared.loading.borrow().clone();
            match crate::libraries::load(lua, &shared.limits.libraries, &name, env, loading.as_deref().map(|m| (shared.cage.as_str(), m))) {
                Ok((f, _, display)) => Ok(success([LuaValue::Function(f), LuaValue::String(lua.create_string(&display)?)])),
                Err(m) => failure(lua, m),
            }
        })?,
    )?;
    t.set(
        "yield_slice",
        lua.create_async_function(|_, ()| async {
            YieldOnce(false).await;
            Ok(())
        })?,
    )?;
    // sortable(t): may Lua's C sort take this table? Only plain arrays (no metatable) of numbers
    // only or strings only, small enough to sort within a few milliseconds: then no Lua code
    // runs inside the sort.
    t.set(
        "sortable",
        lua.create_function(|_, t: Table| {
            if t.metatable().is_some() {
                return Ok(false);
            }
            let n = t.raw_len();
            if n > C_SORT_MAX {
                return Ok(false);
            }
            let mut kind = 0u8;
            for i in 1..=n {
                let k = match t.raw_get::<LuaValue>(i)? {
                    LuaValue::Integer(_) | LuaValue::Number(_) => 1,
                    LuaValue::String(_) => 2,
                    _ => return Ok(false),
                };
                if kind != 0 && k != kind {
                    return Ok(false);
                }
                kind = k;
            }
            Ok(true)
        })?,
    )?;
    // os.getenv: only the names the cage's [lua] getenv list allows.
    t.set(
        "getenv",
        lua.create_function(|lua, name: String| {
            let Some(shared) = shared_of(lua) else {
                return Ok(None);
            };
            if !shared.limits.may_read_env(&name) {
                return Ok(None);
            }
            Ok(std::env::var(&name).ok())
        })?,
    )?;
    Ok(())
}

/// `f(co, ...)` for the prelude's `coroutine.resume` and `coroutine.close`, with `co` among the
/// coroutines the watchdog's signal arms while it runs. In one C function, so the coroutine is
/// added right before Lua runs it and taken off right after: a slice cannot end in between
/// (no hook runs between C calls), and `co`, an argument on the stack, is alive throughout.
unsafe extern "C-unwind" fn chained(state: *mut ffi::lua_State) -> std::ffi::c_int {
    let co = ffi::lua_tothread(state, 2);
    if ffi::lua_type(state, 1) != ffi::LUA_TFUNCTION || co.is_null() {
        return ffi::luaL_error(state, c"chained: a function and a coroutine expected".as_ptr());
    }
    let args = ffi::lua_gettop(state) - 1;
    let chain = crate::watchdog::push(co);
    // Protected, so `co` leaves the chain even if the call raises (resume and close report their
    // coroutine's errors as results; this is for what is left, such as a memory error).
    let status = ffi::lua_pcall(state, args, ffi::LUA_MULTRET, 0);
    crate::watchdog::truncate(chain);
    if status != ffi::LUA_OK {
        ffi::lua_error(state);
    }
    ffi::lua_gettop(state)
}

/// `coroutine.resume(co, ...)` as Lua's own (same results and messages), with `co` among the
/// coroutines the watchdog's signal arms while it runs. Made here rather than by calling Lua's
/// through [`chained`], whose protected call would count a second C level per resume towards
/// Lua's limit of 200 (nested coroutines would overflow at half the depth).
unsafe extern "C-unwind" fn chained_resume(state: *mut ffi::lua_State) -> std::ffi::c_int {
    let co = ffi::lua_tothread(state, 1);
    if co.is_null() {
        return ffi::luaL_error(state, c"bad argument #1 to 'resume' (coroutine expected)".as_ptr());
    }
    let args = ffi::lua_gettop(state) - 1;
    if ffi::lua_checkstack(co, args) == 0 {
        ffi::lua_pushboolean(state, 0);
        ffi::lua_pushstring(state, c"too many arguments to resume".as_ptr());
        return 2;
    }
    ffi::lua_xmove(state, co, args);
    let mut results: std::ffi::c_int = 0;
    // Nothing between these two raises: `co` is in the chain exactly while it runs.
    let chain = crate::watchdog::push(co);
    let status = ffi::lua_resume(co, state, args, &mut results);
    crate::watchdog::truncate(chain);
    if status == ffi::LUA_OK || status == ffi::LUA_YIELD {
        if ffi::lua_checkstack(state, results + 1) == 0 {
            ffi::lua_pop(co, results);
            ffi::lua_pushboolean(state, 0);
            ffi::lua_pushstring(state, c"too many results to resume".as_ptr());
            return 2;
        }
        // As Lua's: the values first, then the flag put below them (`co` may be this very
        // thread, for which the moves do nothing).
        ffi::lua_xmove(co, state, results);
        ffi::lua_pushboolean(state, 1);
        ffi::lua_rotate(state, -(results + 1), 1);
        results + 1
    } else {
        // The error value.
        ffi::lua_xmove(co, state, 1);
        ffi::lua_pushboolean(state, 0);
        ffi::lua_rotate(state, -2, 1);
        2
    }
}
