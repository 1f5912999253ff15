//! `pmnc.json` over big inputs without holding the worker: parsing and printing run on tokio's
//! blocking pool while the request waits, and the tables of a big decoded value are made in
//! pieces with a turn for the worker between pieces (docs/decisions/004-lua-sandbox.md). Small
//! inputs stay on the fast inline path of vm.rs.

use mlua::{AnyUserData, Lua, LuaString, MultiValue, Table, Value as LuaValue};
use rustomnic_core::Value;

use super::{failure, success};
use crate::convert::{array_metatable, from_lua, to_lua};

/// Inputs up to this size are decoded and encoded inline (about 0.1-0.3 ms); larger ones go to
/// the blocking pool.
pub(crate) const INLINE_BYTES: usize = 64 << 10;
/// Lua values made between two turns for the worker while a big value is built.
const VALUES_PER_TURN: usize = 4096;

/// A converted value waiting to be printed off the worker (see `json_encode`).
pub(crate) struct Pending(pub Value);

impl mlua::UserData for Pending {}

/// Roughly how many bytes `v` prints to, stopping once past `limit`.
pub(crate) fn size_over(v: &Value, limit: usize) -> bool {
    let mut total = 0usize;
    let mut stack = vec![v];
    while let Some(v) = stack.pop() {
        total += match v {
            Value::Str(s) => s.len() + 2,
            Value::Array(items) => {
                stack.extend(items.iter());
                2
            }
            Value::Map(entries) => {
                for (k, v) in entries {
                    stack.push(k);
                    stack.push(v);
                }
                2
            }
            _ => 8,
        };
        if total > limit {
            return true;
        }
    }
    false
}

fn ok(v: LuaValue) -> mlua::Result<MultiValue> {
    Ok(MultiValue::from_iter([LuaValue::Boolean(true), v]))
}

fn fail(lua: &Lua, m: String) -> mlua::Result<MultiValue> {
    Ok(MultiValue::from_iter([LuaValue::Boolean(false), LuaValue::String(lua.create_string(m)?)]))
}

enum Frame {
    Array { table: Table, items: std::vec::IntoIter<Value>, at: usize },
    Map { table: Table, entries: std::vec::IntoIter<(Value, Value)> },
}

/// A scalar as Lua, or a new table for a container (its frame to fill it is pushed).
fn make(lua: &Lua, v: Value, stack: &mut Vec<Frame>, in_array: bool) -> mlua::Result<LuaValue> {
    Ok(match v {
        Value::Nil if in_array => LuaValue::NULL,
        Value::Array(items) => {
            let table = lua.create_table_with_capacity(items.len(), 0)?;
            table.set_metatable(Some(array_metatable(lua)?))?;
            stack.push(Frame::Array { table: table.clone(), items: items.into_iter(), at: 0 });
            LuaValue::Table(table)
        }
        Value::Map(entries) => {
            let table = lua.create_table_with_capacity(0, entries.len())?;
            stack.push(Frame::Map { table: table.clone(), entries: entries.into_iter() });
            LuaValue::Table(table)
        }
        scalar => to_lua(lua, &scalar)?,
    })
}

/// `value` as Lua, made in pieces with a turn for the worker between pieces.
async fn to_lua_in_pieces(lua: &Lua, value: Value) -> mlua::Result<LuaValue> {
    let mut stack = Vec::new();
    let root = make(lua, value, &mut stack, false)?;
    let mut made = 0usize;
    while let Some(frame) = stack.last_mut() {
        made += 1;
        if made.is_multiple_of(VALUES_PER_TURN) {
            super::sandbox::YieldOnce::default().await;
            continue;
        }
        match frame {
            Frame::Array { table, items, at } => match items.next() {
                None => {
                    stack.pop();
                }
                Some(v) => {
                    *at += 1;
                    let (table, at) = (table.clone(), *at);
                    let lv = make(lua, v, &mut stack, true)?;
                    table.raw_set(at, lv)?;
                }
            },
            Frame::Map { table, entries } => match entries.next() {
                None => {
                    stack.pop();
                }
                Some((_, Value::Nil)) => {}
                Some((k, v)) => {
                    let table = table.clone();
                    let key = to_lua(lua, &k)?;
                    let lv = make(lua, v, &mut stack, false)?;
                    table.raw_set(key, lv)?;
                }
            },
        }
    }
    Ok(root)
}

/// Registers `json_encode`, `json_decode` (inline) and `json_decode_big(s)`,
/// `json_encode_finish(pending)` (async).
pub(crate) fn register(lua: &Lua, t: &Table) -> mlua::Result<()> {
    // json_encode(v, can_wait): big values come back as ("pending", value) for json_encode_finish.
    t.set("json_encode", lua.create_function(|lua, (v, can_wait): (LuaValue, bool)| encode(lua, &v, can_wait))?)?;
    t.set(
        "json_decode",
        lua.create_function(|lua, s: LuaValue| {
            let LuaValue::String(s) = s else {
                return failure(lua, format!("pmnc.json.decode: expected a string, got {}", s.type_name()));
            };
            match Value::parse_json(&s.as_bytes()) {
                Ok(v) => Ok(success([to_lua(lua, &v)?])),
                Err(e) => failure(lua, format!("pmnc.json.decode: {e}")),
            }
        })?,
    )?;
    t.set(
        "json_decode_big",
        lua.create_async_function(|lua, s: LuaString| async move {
            let bytes = s.as_bytes().to_vec();
            drop(s);
            let parsed = tokio::task::spawn_blocking(move || Value::parse_json(&bytes)).await;
            match parsed {
                Ok(Ok(v)) => {
                    let lv = to_lua_in_pieces(&lua, v).await?;
                    ok(lv)
                }
                Ok(Err(e)) => fail(&lua, format!("pmnc.json.decode: {e}")),
                Err(e) => fail(&lua, format!("pmnc.json.decode: {e}")),
            }
        })?,
    )?;
    t.set(
        "json_encode_finish",
        lua.create_async_function(|lua, pending: AnyUserData| async move {
            let value = match pending.take::<Pending>() {
                Ok(Pending(v)) => v,
                Err(e) => return fail(&lua, format!("pmnc.json.encode: {e}")),
            };
            let printed = tokio::task::spawn_blocking(move || value.to_json_text()).await;
            match printed {
                Ok(Ok(text)) => {
                    let s = lua.create_string(text)?;
                    ok(LuaValue::String(s))
                }
                Ok(Err(e)) => fail(&lua, format!("pmnc.json.encode: {e}")),
                Err(e) => fail(&lua, format!("pmnc.json.encode: {e}")),
            }
        })?,
    )?;
    Ok(())
}

/// The inline encoder: `(true, text)`, `(false, message)`, or for a big value `(PENDING, value)`
/// that the prelude hands to `json_encode_finish` where it can wait.
pub(crate) fn encode(lua: &Lua, v: &LuaValue, can_wait: bool) -> mlua::Result<MultiValue> {
    let value = match from_lua(v) {
        Ok(v) => v,
        Err(e) => return fail(lua, format!("pmnc.json.encode: {e}")),
    };
    if can_wait && size_over(&value, INLINE_BYTES) {
        let ud = lua.create_userdata(Pending(value))?;
        return Ok(MultiValue::from_iter([LuaValue::String(lua.create_string("pending")?), LuaValue::UserData(ud)]));
    }
    match value.to_json_text() {
        Ok(j) => ok(LuaValue::String(lua.create_string(j)?)),
        Err(e) => fail(lua, format!("pmnc.json.encode: {e}")),
    }
}
