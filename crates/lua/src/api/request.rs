//! `pmnc.request` (Rust side): the fields of the running request.

use mlua::{Lua, Table, Value as LuaValue};

use super::current_ctx;
use crate::convert::to_lua;

pub(crate) fn register(lua: &Lua, t: &Table) -> mlua::Result<()> {
    t.set("remain", lua.create_function(|lua, ()| Ok(current_ctx(lua).map(|c| c.remain())))?)?;
    t.set(
        "request_field",
        lua.create_function(|lua, key: LuaValue| {
            let Some(ctx) = current_ctx(lua) else {
                return Ok(LuaValue::Nil);
            };
            let LuaValue::String(key) = key else {
                return Ok(LuaValue::Nil);
            };
            Ok(match &*key.to_str()? {
                "id" => LuaValue::String(lua.create_string(&ctx.id)?),
                "interface" => LuaValue::String(lua.create_string(&ctx.interface)?),
                "cage" => LuaValue::String(lua.create_string(&ctx.cage)?),
                "deadline" => LuaValue::Number(ctx.deadline_unix()),
                "call_id" => match &ctx.call_id {
                    Some(c) => LuaValue::String(lua.create_string(c)?),
                    None => LuaValue::Nil,
                },
                "caller" => match &ctx.caller {
                    Some(c) => LuaValue::String(lua.create_string(c)?),
                    None => LuaValue::Nil,
                },
                "parameters" => match &ctx.parameters {
                    Some(p) => to_lua(lua, p)?,
                    None => LuaValue::Nil,
                },
                _ => LuaValue::Nil,
            })
        })?,
    )?;
    Ok(())
}
