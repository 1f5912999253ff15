//! Conversion between Lua values and the shared value model ([`Value`]), used for JSON and for
//! every call that leaves a VM (other cages, the wire).

use std::fmt::Write as _;

use mlua::{ffi, Lua, Table, Value as LuaValue};
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
    // A table without a border at 1 is a map unless marked: no pass to count its keys (most
    // returned tables, messages and results are records). The passes walk the table in one
    // protected call each (`for_each`), where an iterator made a protected `next` per key.
    if len > 0 || marked {
        t.for_each::<LuaValue, LuaValue>(|k, _| {
            count += 1;
            match k {
                LuaValue::Integer(i) if i >= 1 && (i as usize) <= len => {}
                _ => sequence = false,
            }
            Ok(())
        })
        .map_err(|e| format!("{path}: {e}"))?;
    }
    let base_len = path.len();
    if marked || (sequence && count == len && len > 0) {
        let mut items = Vec::with_capacity(len);
        for i in 1..=len {
            let v: LuaValue = t.raw_get(i).map_err(|e| format!("{path}: {e}"))?;
            let _ = write!(path, "[{i}]");
            items.push(from_lua_at(&v, depth + 1, path, left)?);
            path.truncate(base_len);
        }
        return Ok(Value::Array(items));
    }
    let mut entries = Vec::with_capacity(count);
    // The first entry that cannot be converted stops the walk; its error is this one.
    let mut failed = None;
    let walked = t.for_each::<LuaValue, LuaValue>(|k, v| match entry(&k, &v, depth, path, left, base_len) {
        Ok(e) => {
            entries.push(e);
            Ok(())
        }
        Err(e) => {
            failed = Some(e);
            Err(mlua::Error::runtime("stopped"))
        }
    });
    if let Some(e) = failed {
        return Err(e);
    }
    walked.map_err(|e| format!("{path}: {e}"))?;
    Ok(Value::Map(entries))
}

/// One entry of a map: its key and converted value; `path` is the map's, and is left so.
fn entry(k: &LuaValue, v: &LuaValue, depth: usize, path: &mut String, left: &mut usize, base_len: usize) -> Result<(Value, Value), String> {
    let key = match k {
        LuaValue::String(s) => {
            path.push('.');
            // Borrowed when the key is UTF-8: no string made per key for a path that is only
            // read in an error.
            path.push_str(&String::from_utf8_lossy(&s.as_bytes()));
            Value::Str(s.as_bytes().to_vec())
        }
        LuaValue::Integer(i) => {
            let _ = write!(path, "[{i}]");
            Value::Int(*i)
        }
        LuaValue::Number(n) => {
            let _ = write!(path, "[{n}]");
            Value::Float(*n)
        }
        LuaValue::Boolean(b) => {
            let _ = write!(path, "[{b}]");
            Value::Bool(*b)
        }
        other => return Err(format!("{path}: a table key of type {} cannot be converted", other.type_name())),
    };
    if let Value::Str(k) = &key {
        charge(left, k.len(), path)?;
    }
    let value = from_lua_at(v, depth + 1, path, left)?;
    path.truncate(base_len);
    Ok((key, value))
}

/// Converts the value model into Lua. Arrays are marked (see [`ARRAY_MT`]); nil inside an array
/// becomes the `null` light userdata so that positions are kept.
///
/// The whole value is built in one protected call through Lua's C API: every message a consumer
/// hands to a handler and every call between cages comes through here, and a call into mlua per
/// string and per field (each a protected call and a handle of its own) cost several times
/// what the values themselves do.
pub fn to_lua(lua: &Lua, value: &Value) -> mlua::Result<LuaValue> {
    // A value that is not a table takes one call at most (a protected call costs more).
    match value {
        Value::Nil => return Ok(LuaValue::Nil),
        Value::Bool(b) => return Ok(LuaValue::Boolean(*b)),
        Value::Int(i) => return Ok(LuaValue::Integer(*i)),
        Value::Float(f) => return Ok(LuaValue::Number(*f)),
        Value::Str(b) => return Ok(LuaValue::String(lua.create_string(b)?)),
        Value::Array(_) | Value::Map(_) => {}
    }
    let too_deep = std::cell::Cell::new(false);
    // SAFETY: the closure runs in a protected call on the VM's own state; it only pushes values
    // and sets fields of tables it made, and leaves exactly the one value it built on the stack
    // (the call has no arguments). It holds only borrows, so an allocation error that leaves it
    // by longjmp finds nothing of its own to drop.
    let built = unsafe { lua.exec_raw::<LuaValue>((), |state| push_value(state, value, 0, &too_deep)) }?;
    if too_deep.get() {
        return Err(mlua::Error::runtime(format!("value nested deeper than {MAX_DEPTH} levels")));
    }
    Ok(built)
}

/// Pushes `value` onto the stack of `state`; past [`MAX_DEPTH`] (or without room on the stack)
/// it pushes nil and sets `too_deep`, and the tables around it stop filling.
///
/// # Safety
/// `state` must be a Lua state inside a protected call; only borrows may live across this call.
unsafe fn push_value(state: *mut ffi::lua_State, value: &Value, depth: usize, too_deep: &std::cell::Cell<bool>) {
    // Room on the stack: a C function starts with LUA_MINSTACK free slots, and a table makes
    // room for what it pushes while it is filled (its key, its value, its metatable).
    let no_room = matches!(value, Value::Array(_) | Value::Map(_)) && ffi::lua_checkstack(state, 4) == 0;
    if depth > MAX_DEPTH || no_room {
        too_deep.set(true);
        ffi::lua_pushnil(state);
        return;
    }
    match value {
        Value::Nil => ffi::lua_pushnil(state),
        Value::Bool(b) => ffi::lua_pushboolean(state, std::ffi::c_int::from(*b)),
        Value::Int(i) => ffi::lua_pushinteger(state, *i),
        Value::Float(f) => ffi::lua_pushnumber(state, *f),
        Value::Str(b) => {
            ffi::lua_pushlstring(state, b.as_ptr() as *const std::ffi::c_char, b.len());
        }
        Value::Array(items) => {
            ffi::lua_createtable(state, size_hint(items.len()), 0);
            for (i, v) in items.iter().enumerate() {
                match v {
                    Value::Nil => ffi::lua_pushlightuserdata(state, std::ptr::null_mut()),
                    other => push_value(state, other, depth + 1, too_deep),
                }
                if too_deep.get() {
                    ffi::lua_pop(state, 1);
                    return;
                }
                ffi::lua_rawseti(state, -2, i as ffi::lua_Integer + 1);
            }
            push_array_metatable(state);
            ffi::lua_setmetatable(state, -2);
        }
        Value::Map(entries) => {
            ffi::lua_createtable(state, 0, size_hint(entries.len()));
            for (k, v) in entries {
                if matches!(v, Value::Nil) {
                    continue;
                }
                push_value(state, k, depth + 1, too_deep);
                push_value(state, v, depth + 1, too_deep);
                if too_deep.get() {
                    ffi::lua_pop(state, 2);
                    return;
                }
                ffi::lua_rawset(state, -3);
            }
        }
    }
}

/// A table's preallocated size: the count, within what `lua_createtable` takes.
fn size_hint(n: usize) -> std::ffi::c_int {
    n.min(1 << 24) as std::ffi::c_int
}

/// Pushes the array metatable, the one [`array_metatable`] gives (made here when it is missing).
///
/// # Safety
/// As [`push_value`].
unsafe fn push_array_metatable(state: *mut ffi::lua_State) {
    ffi::lua_pushlstring(state, ARRAY_MT.as_ptr() as *const std::ffi::c_char, ARRAY_MT.len());
    if ffi::lua_rawget(state, ffi::LUA_REGISTRYINDEX) == ffi::LUA_TTABLE {
        return;
    }
    ffi::lua_pop(state, 1);
    ffi::lua_createtable(state, 0, 1);
    ffi::lua_pushboolean(state, 1);
    ffi::lua_setfield(state, -2, c"__array".as_ptr());
    ffi::lua_pushlstring(state, ARRAY_MT.as_ptr() as *const std::ffi::c_char, ARRAY_MT.len());
    ffi::lua_pushvalue(state, -2);
    ffi::lua_rawset(state, ffi::LUA_REGISTRYINDEX);
}

/// The arguments of a call, each as [`to_lua`] makes it.
pub fn to_lua_all(lua: &Lua, values: &[Value]) -> mlua::Result<mlua::MultiValue> {
    values.iter().map(|v| to_lua(lua, v)).collect()
}

/// The shared metatable that marks arrays.
pub fn array_metatable(lua: &Lua) -> mlua::Result<Table> {
    if let Some(t) = lua.named_registry_value::<Option<Table>>(ARRAY_MT)? {
        return Ok(t);
    }
    // SAFETY: the closure runs in a protected call without arguments and leaves exactly the
    // metatable it pushed (see push_array_metatable), holding nothing of its own.
    unsafe { lua.exec_raw::<Table>((), |state| push_array_metatable(state)) }
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

    /// What the one-call builder makes: nil in an array kept as null, nil map values left
    /// out, the shared array metatable, keys of every kind, bytes as they are.
    #[test]
    fn values_built_through_the_c_api() {
        let lua = Lua::new();
        let v = Value::Map(vec![
            (Value::str("a"), Value::Array(vec![Value::Int(1), Value::Nil, Value::Map(vec![(Value::Int(1), Value::Bool(true))])])),
            (Value::Int(7), Value::Float(2.5)),
            (Value::str("skip"), Value::Nil),
            (Value::str("s"), Value::Str(vec![b'x', 0, 255])),
            (Value::Bool(false), Value::Array(vec![])),
        ]);
        let lv = to_lua(&lua, &v).unwrap();
        let check: mlua::Function = lua
            .load(
                r#"return function(t, null, mt)
                  assert(t.a[1] == 1 and t.a[2] == null and t.a[3][1] == true and #t.a == 3)
                  assert(getmetatable(t.a) == mt and getmetatable(t[false]) == mt and getmetatable(t) == nil)
                  assert(t[7] == 2.5 and math.type(t[7]) == "float" and math.type(t.a[1]) == "integer")
                  assert(rawget(t, "skip") == nil and t.s == "x\0\255")
                  return true
                end"#,
            )
            .eval()
            .unwrap();
        assert!(check.call::<bool>((lv.clone(), LuaValue::NULL, array_metatable(&lua).unwrap())).unwrap());
        assert_eq!(from_lua(&lv).unwrap().get("s"), v.get("s"));
        // Made here first, the array metatable is the one array_metatable gives afterwards.
        let fresh = Lua::new();
        let t = to_lua(&fresh, &Value::Array(vec![Value::Int(1)])).unwrap();
        let LuaValue::Table(t) = t else { panic!("not a table") };
        assert_eq!(t.metatable().unwrap(), array_metatable(&fresh).unwrap());
    }

    /// Maps are walked in one protected call per table: an entry that cannot be converted stops
    /// the walk with its own error and path, a cycle stops at the depth limit, and the deepest
    /// allowed value converts even from Lua code inside a coroutine (each level's walk is a C
    /// call that counts towards Lua's limit of nested C calls).
    #[test]
    fn maps_are_walked_with_errors_that_name_their_entry() {
        let lua = Lua::new();
        let eval = |code: &str| lua.load(code).eval::<LuaValue>().unwrap();
        let e = from_lua(&eval("return {a = {b = {ok = 1, c = function() end}}}")).unwrap_err();
        assert_eq!(e, "value.a.b.c: a function cannot be converted to a value");
        let e = from_lua(&eval("return {x = {[{}] = 1}}")).unwrap_err();
        assert_eq!(e, "value.x: a table key of type table cannot be converted");
        let e = from_lua(&eval("local t = {} t.me = t return t")).unwrap_err();
        assert!(e.contains("nested deeper than 128 levels"), "{e}");
        let deepest = eval("local t = 1 for i = 1, 128 do t = {k = t} end return t");
        assert!(from_lua(&deepest).is_ok());
        let convert = lua.create_function(|_, v: LuaValue| Ok(from_lua(&v).map(|_| true).unwrap_or_else(|e| panic!("{e}")))).unwrap();
        lua.globals().set("convert", convert).unwrap();
        let ok: bool = lua
            .load("local t = 1 for i = 1, 128 do t = {k = t, [i] = i} end return coroutine.wrap(function() return coroutine.wrap(function() return convert(t) end)() end)()")
            .eval()
            .unwrap();
        assert!(ok);
        let v = from_lua(&eval("return {b = 2, a = {1, 2}, [3] = 'x', [true] = false}")).unwrap();
        assert_eq!(v.get("a"), Some(&Value::Array(vec![Value::Int(1), Value::Int(2)])));
        assert_eq!(v.get("b"), Some(&Value::Int(2)));
        let Value::Map(entries) = &v else { panic!("not a map: {v:?}") };
        assert_eq!(entries.len(), 4);
        assert!(entries.contains(&(Value::Int(3), Value::str("x"))) && entries.contains(&(Value::Bool(true), Value::Bool(false))));
    }

    #[test]
    fn too_deep_or_too_big_values_are_errors_and_the_vm_goes_on() {
        let lua = Lua::new();
        let nest = |levels: usize| (0..levels).fold(Value::Int(1), |inner, _| Value::Array(vec![inner]));
        assert!(to_lua(&lua, &nest(MAX_DEPTH)).is_ok());
        let e = to_lua(&lua, &Value::Map(vec![(Value::str("k"), nest(MAX_DEPTH + 5))])).unwrap_err();
        assert!(e.to_string().contains("nested deeper"), "{e}");
        let limit = lua.set_memory_limit(lua.used_memory() + (64 << 10)).unwrap();
        let big = Value::Array(vec![Value::Str(vec![b'x'; 1 << 20])]);
        assert!(matches!(to_lua(&lua, &big), Err(mlua::Error::MemoryError(_))));
        lua.set_memory_limit(limit).unwrap();
        assert!(to_lua(&lua, &big).is_ok());
        // Keys Lua cannot take are errors of the call, not of the process.
        for key in [Value::Nil, Value::Float(f64::NAN)] {
            let e = to_lua(&lua, &Value::Map(vec![(Value::str("ok"), Value::Int(1)), (key, Value::Int(2))])).unwrap_err();
            assert!(e.to_string().contains("index is"), "{e}");
        }
        assert_eq!(lua.load("return 1 + 1").eval::<i64>().unwrap(), 2);
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
