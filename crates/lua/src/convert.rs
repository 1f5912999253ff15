//! Conversion between Lua values and the shared value model ([`Value`]), used for JSON and for
//! every call that leaves a VM (other cages, the wire).

use mlua::{Lua, Table, Value as LuaValue};
use rustomnic_core::value::{Value, MAX_DEPTH};

/// Key in the Lua registry of the metatable that marks a table as a JSON/value array, so that an
/// empty array survives a round trip as `[]`.
pub(crate) const ARRAY_MT: &str = "rustomnic.array";

/// Converts a Lua value into the value model. Functions, threads and userdata are refused with a
/// message naming the path inside the value (`args[2].items[3]`).
pub fn from_lua(value: &LuaValue) -> Result<Value, String> {
    let mut left = MAX_VALUE_BYTES;
    from_lua_at(value, 0, &mut String::from("value"), &mut left)
}

/// Most bytes a converted value may take. A table can hold the same big string, or the same
/// table, many times: the copy would be far larger than what Lua holds (a table of 60 levels of
/// `{a, a}` is 2^60 values), so the conversion stops at this size.
pub const MAX_VALUE_BYTES: usize = 64 << 20;
/// What one value costs on top of its bytes.
const NODE_COST: usize = 32;

fn charge(left: &mut usize, bytes: usize, path: &str) -> Result<(), String> {
    match left.checked_sub(bytes + NODE_COST) {
        Some(l) => {
            *left = l;
            Ok(())
        }
        None => Err(format!("{path}: the value would take more than {} MiB (a string or table repeated many times?)", MAX_VALUE_BYTES >> 20)),
    }
}

fn from_lua_at(value: &LuaValue, depth: usize, path: &mut String, left: &mut usize) -> Result<Value, String> {
    if depth > MAX_DEPTH {
        return Err(format!("{path}: nested deeper than {MAX_DEPTH} levels (a table that contains itself?)"));
    }
    charge(left, if let LuaValue::String(s) = value { s.as_bytes().len() } else { 0 }, path)?;
    Ok(match value {
        LuaValue::Nil => Value::Nil,
        LuaValue::Boolean(b) => Value::Bool(*b),
        LuaValue::Integer(i) => Value::Int(*i),
        LuaValue::Number(n) => Value::Float(*n),
        LuaValue::String(s) => Value::Str(s.as_bytes().to_vec()),
        LuaValue::LightUserData(p) if p.0.is_null() => Value::Nil,
        LuaValue::Table(t) => table_to_value(t, depth, path, left)?,
        other => return Err(format!("{path}: a {} cannot be converted to a value", other.type_name())),
    })
}

fn is_marked_array(t: &Table) -> bool {
    match t.metatable() {
        Some(mt) => mt.raw_get::<bool>("__array").unwrap_or(false),
        None => false,
    }
}

fn table_to_value(t: &Table, depth: usize, path: &mut String, left: &mut usize) -> Result<Value, String> {
    let len = t.raw_len();
    let marked = is_marked_array(t);
    let mut count = 0usize;
    let mut sequence = true;
    for pair in t.clone().pairs::<LuaValue, LuaValue>() {
        let (k, _) = pair.map_err(|e| format!("{path}: {e}"))?;
        count += 1;
        match k {
            LuaValue::Integer(i) if i >= 1 && (i as usize) <= len => {}
            _ => sequence = false,
        }
    }
    let base_len = path.len();
    if marked || (sequence && count == len && len > 0) {
        let mut items = Vec::with_capacity(len);
        for i in 1..=len {
            let v: LuaValue = t.raw_get(i).map_err(|e| format!("{path}: {e}"))?;
            path.push_str(&format!("[{i}]"));
            items.push(from_lua_at(&v, depth + 1, path, left)?);
            path.truncate(base_len);
        }
        return Ok(Value::Array(items));
    }
    let mut entries = Vec::with_capacity(count);
    for pair in t.clone().pairs::<LuaValue, LuaValue>() {
        let (k, v) = pair.map_err(|e| format!("{path}: {e}"))?;
        let key = match &k {
            LuaValue::String(s) => {
                path.push('.');
                path.push_str(&s.to_string_lossy());
                Value::Str(s.as_bytes().to_vec())
            }
            LuaValue::Integer(i) => {
                path.push_str(&format!("[{i}]"));
                Value::Int(*i)
            }
            LuaValue::Number(n) => {
                path.push_str(&format!("[{n}]"));
                Value::Float(*n)
            }
            LuaValue::Boolean(b) => {
                path.push_str(&format!("[{b}]"));
                Value::Bool(*b)
            }
            other => return Err(format!("{path}: a table key of type {} cannot be converted", other.type_name())),
        };
        if let Value::Str(k) = &key {
            charge(left, k.len(), path)?;
        }
        entries.push((key, from_lua_at(&v, depth + 1, path, left)?));
        path.truncate(base_len);
    }
    Ok(Value::Map(entries))
}

/// Converts the value model into Lua. Arrays are marked (see [`ARRAY_MT`]); nil inside an array
/// becomes the `null` light userdata so that positions are kept.
pub fn to_lua(lua: &Lua, value: &Value) -> mlua::Result<LuaValue> {
    to_lua_at(lua, value, 0)
}

fn to_lua_at(lua: &Lua, value: &Value, depth: usize) -> mlua::Result<LuaValue> {
    if depth > MAX_DEPTH {
        return Err(mlua::Error::runtime(format!("value nested deeper than {MAX_DEPTH} levels")));
    }
    Ok(match value {
        Value::Nil => LuaValue::Nil,
        Value::Bool(b) => LuaValue::Boolean(*b),
        Value::Int(i) => LuaValue::Integer(*i),
        Value::Float(f) => LuaValue::Number(*f),
        Value::Str(b) => LuaValue::String(lua.create_string(b)?),
        Value::Array(items) => {
            let t = lua.create_table_with_capacity(items.len(), 0)?;
            for (i, v) in items.iter().enumerate() {
                let lv = match v {
                    Value::Nil => LuaValue::NULL,
                    other => to_lua_at(lua, other, depth + 1)?,
                };
                t.raw_set(i + 1, lv)?;
            }
            t.set_metatable(Some(array_metatable(lua)?))?;
            LuaValue::Table(t)
        }
        Value::Map(entries) => {
            let t = lua.create_table_with_capacity(0, entries.len())?;
            for (k, v) in entries {
                if matches!(v, Value::Nil) {
                    continue;
                }
                t.raw_set(to_lua_at(lua, k, depth + 1)?, to_lua_at(lua, v, depth + 1)?)?;
            }
            LuaValue::Table(t)
        }
    })
}

/// The shared metatable that marks arrays.
pub fn array_metatable(lua: &Lua) -> mlua::Result<Table> {
    match lua.named_registry_value::<Option<Table>>(ARRAY_MT)? {
        Some(t) => Ok(t),
        None => {
            let t = lua.create_table()?;
            t.raw_set("__array", true)?;
            lua.set_named_registry_value(ARRAY_MT, &t)?;
            Ok(t)
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn repeated_strings_and_tables_cannot_blow_up_a_copy() {
        let lua = mlua::Lua::new();
        let t: mlua::Value = lua.load("local a = {('x'):rep(1e5)} for i = 1, 60 do a = {a, a} end return a").eval().unwrap();
        let e = super::from_lua(&t).unwrap_err();
        assert!(e.contains("more than 64 MiB"), "{e}");
        let t: mlua::Value = lua.load("local s = ('x'):rep(1e7) local t = {} for i = 1, 100 do t[i] = s end return t").eval().unwrap();
        assert!(super::from_lua(&t).unwrap_err().contains("more than 64 MiB"));
        let ok: mlua::Value = lua.load("return { a = ('x'):rep(1e6), b = {1, 2, 3} }").eval().unwrap();
        assert!(super::from_lua(&ok).is_ok());
    }

    use super::*;

    #[test]
    fn round_trip_through_lua() {
        let lua = Lua::new();
        let v = Value::Map(vec![
            (Value::str("a"), Value::Array(vec![Value::Int(1), Value::Nil, Value::Float(1.5)])),
            (Value::str("b"), Value::Array(vec![])),
            (Value::str("c"), Value::Str(vec![0, 255])),
        ]);
        let lv = to_lua(&lua, &v).unwrap();
        let back = from_lua(&lv).unwrap();
        assert_eq!(back.get("a"), v.get("a"));
        assert_eq!(back.get("b"), Some(&Value::Array(vec![])));
        assert_eq!(back.get("c"), Some(&Value::Str(vec![0, 255])));
    }

    #[test]
    fn tables_become_arrays_or_maps() {
        let lua = Lua::new();
        let v: LuaValue = lua.load("return {1, 2, 3}").eval().unwrap();
        assert_eq!(from_lua(&v).unwrap(), Value::Array(vec![Value::Int(1), Value::Int(2), Value::Int(3)]));
        let v: LuaValue = lua.load("return {[1] = 1, [3] = 3}").eval().unwrap();
        assert!(matches!(from_lua(&v).unwrap(), Value::Map(_)));
        let v: LuaValue = lua.load("return {}").eval().unwrap();
        assert_eq!(from_lua(&v).unwrap(), Value::Map(vec![]));
    }

    #[test]
    fn refusals_name_the_path() {
        let lua = Lua::new();
        let v: LuaValue = lua.load("return {a = {b = {1, print}}}").eval().unwrap();
        let e = from_lua(&v).unwrap_err();
        assert!(e.contains("value.a.b[2]"), "{e}");
        assert!(e.contains("function"), "{e}");
        let v: LuaValue = lua.load("local t = {} t.self = t return t").eval().unwrap();
        assert!(from_lua(&v).unwrap_err().contains("nested deeper"));
    }
}
