//! The Rust side of the pmnc API: the table of functions the prelude receives, filled by one
//! module per area (log, time, request, json, transactions, cage calls, parallel calls, durable calls, events,
//! strings, the sandbox) and the helper families of crates/stdlib.

mod calls;
mod json;
mod log;
mod parallel;
mod request;
pub(crate) mod sandbox;
mod time;
mod transactions;

use std::rc::Rc;

use mlua::{Lua, MultiValue, Table, Value as LuaValue};

use crate::convert::array_metatable;
use crate::request::{RequestCtx, VmShared};

pub(crate) fn shared_of(lua: &Lua) -> Option<Rc<VmShared>> {
    lua.app_data_ref::<Rc<VmShared>>().map(|s| s.clone())
}

pub(crate) fn current_ctx(lua: &Lua) -> Option<Rc<RequestCtx>> {
    shared_of(lua).and_then(|s| s.current())
}

/// (false, message): how Rust helpers report failure to the prelude, which raises it.
pub(crate) fn failure(lua: &Lua, message: impl AsRef<str>) -> mlua::Result<MultiValue> {
    Ok(MultiValue::from_iter([LuaValue::Boolean(false), LuaValue::String(lua.create_string(message.as_ref())?)]))
}

pub(crate) fn success(values: impl IntoIterator<Item = LuaValue>) -> MultiValue {
    let mut mv = MultiValue::new();
    mv.push_back(LuaValue::Boolean(true));
    mv.extend(values);
    mv
}

/// The table of Rust functions the prelude receives.
pub(crate) fn register(lua: &Lua, cage: &str) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    t.set("cage", cage)?;
    t.set("null", LuaValue::NULL)?;
    t.set("array_mt", array_metatable(lua)?)?;
    let marks = lua.create_table()?;
    let weak = lua.create_table()?;
    weak.raw_set("__mode", "k")?;
    marks.set_metatable(Some(weak))?;
    lua.set_named_registry_value(crate::vm::HOOK_YIELDS, &marks)?;
    t.set("hook_yields", marks)?;
    log::register(lua, &t)?;
    time::register(lua, &t)?;
    request::register(lua, &t)?;
    json::register(lua, &t)?;
    transactions::register(lua, &t)?;
    calls::register(lua, &t)?;
    parallel::register(lua, &t)?;
    crate::durable::register(lua, &t)?;
    crate::workflow::register(lua, &t)?;
    crate::events_lua::register(lua, &t)?;
    crate::strings::register(lua, &t)?;
    sandbox::register(lua, &t)?;
    t.set("stdlib", rustomnic_stdlib::install(lua)?)?;
    rustomnic_stdlib::install_runners(lua, &t)?;
    Ok(t)
}
