//! Values crossing between Lua and the value model (`crates/lua/src/convert.rs`): everything a
//! handler returns, sends to another cage or encodes as JSON. The input is a small program that
//! builds Lua values: scalars, strings, tables and marked arrays, nested, shared, with holes,
//! cycles, functions and nil-like `null`s. Properties: conversion never panics; a refusal names
//! where in the value it happened; a converted value converts back into Lua and out again to
//! the same value (maps compared without their order, floats bit for bit), but for nil map
//! values, which Lua cannot hold (docs/decisions/005): then one trip settles it; values from
//! the MessagePack decoder settle after one trip through Lua too.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rustomnic_core::Value;
use rustomnic_fuzz::Choices;
use rustomnic_lua::convert::{array_metatable, from_lua, to_lua};
use rustomnic_lua::mlua::{LightUserData, Lua, Value as LuaValue};

thread_local! {
    static LUA: Lua = Lua::new();
}

/// A value with maps in a fixed order and floats as their bits, so two can be compared.
fn canonical(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    write(v, &mut out);
    out
}

fn write(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Nil => out.push(0),
        Value::Bool(b) => out.extend([1, *b as u8]),
        Value::Int(i) => {
            out.push(2);
            out.extend(i.to_be_bytes());
        }
        Value::Float(f) => {
            out.push(3);
            out.extend(f.to_bits().to_be_bytes());
        }
        Value::Str(s) => {
            out.push(4);
            out.extend((s.len() as u64).to_be_bytes());
            out.extend(s);
        }
        Value::Array(items) => {
            out.push(5);
            out.extend((items.len() as u64).to_be_bytes());
            items.iter().for_each(|i| write(i, out));
        }
        Value::Map(entries) => {
            let mut pairs: Vec<(Vec<u8>, Vec<u8>)> = entries
                .iter()
                .map(|(k, v)| (canonical(k), canonical(v)))
                .collect();
            pairs.sort();
            out.push(6);
            out.extend((pairs.len() as u64).to_be_bytes());
            for (k, v) in pairs {
                out.extend(k);
                out.extend(v);
            }
        }
    }
}

/// Builds Lua values from the program in `c`; the bottom of the stack is the result.
fn build(lua: &Lua, c: &mut Choices) -> Option<LuaValue> {
    let mut stack: Vec<LuaValue> = Vec::new();
    let mut steps = 0;
    while !c.data.is_empty() && steps < 512 {
        steps += 1;
        match c.byte() % 14 {
            0 => stack.push(LuaValue::Nil),
            1 => stack.push(LuaValue::Boolean(c.byte() & 1 == 1)),
            2 => stack.push(LuaValue::Integer(c.u64() as i64)),
            3 => stack.push(LuaValue::Integer((c.byte() % 8) as i64)),
            4 => stack.push(LuaValue::Number(f64::from_bits(c.u64()))),
            5 => stack.push(LuaValue::String(lua.create_string(c.piece()).ok()?)),
            6 => stack.push(LuaValue::Table(lua.create_table().ok()?)),
            7 => {
                let t = lua.create_table().ok()?;
                t.set_metatable(Some(array_metatable(lua).ok()?)).ok()?;
                stack.push(LuaValue::Table(t));
            }
            8 => {
                // t[k] = v, for the table under k and v.
                let (Some(v), Some(k)) = (stack.pop(), stack.pop()) else {
                    continue;
                };
                if let Some(LuaValue::Table(t)) = stack.last() {
                    let _ = t.raw_set(k, v);
                }
            }
            9 => {
                // Appends v to the table under it.
                let Some(v) = stack.pop() else { continue };
                if let Some(LuaValue::Table(t)) = stack.last() {
                    let _ = t.raw_set(t.raw_len() + 1, v);
                }
            }
            10 => {
                // The same value twice: shared tables, and cycles once set into itself.
                if let Some(top) = stack.last().cloned() {
                    stack.push(top);
                }
            }
            11 => stack.push(LuaValue::LightUserData(LightUserData(std::ptr::null_mut()))),
            12 => {
                let n = stack.len();
                if n >= 2 {
                    stack.swap(n - 1, n - 2);
                }
            }
            _ => stack.push(LuaValue::Function(
                lua.create_function(|_, ()| Ok(())).ok()?,
            )),
        }
    }
    stack.into_iter().next()
}

fn nil_in_map(v: &Value) -> bool {
    match v {
        Value::Array(items) => items.iter().any(nil_in_map),
        Value::Map(entries) => entries
            .iter()
            .any(|(k, v)| *v == Value::Nil || nil_in_map(k) || nil_in_map(v)),
        _ => false,
    }
}

/// One trip Value -> Lua -> Value.
fn trip(lua: &Lua, v: &Value) -> Value {
    let lv = to_lua(lua, v)
        .unwrap_or_else(|e| panic!("a converted value does not go back into Lua: {e}"));
    from_lua(&lv).unwrap_or_else(|e| panic!("a value made by to_lua does not convert: {e}"))
}

fuzz_target!(|data: &[u8]| {
    LUA.with(|lua| {
        if let Ok(v) = rustomnic_cluster::wire::decode_value(data) {
            // NaN and other keys Lua refuses are an error, never a panic.
            if let Ok(lv) = to_lua(lua, &v) {
                if let Ok(once) = from_lua(&lv) {
                    assert_eq!(
                        canonical(&trip(lua, &once)),
                        canonical(&once),
                        "a wire value did not settle after one trip"
                    );
                }
            }
        }
        let mut c = Choices::new(data);
        let Some(value) = build(lua, &mut c) else {
            return;
        };
        match from_lua(&value) {
            Ok(v) => {
                let once = trip(lua, &v);
                if !nil_in_map(&v) {
                    assert_eq!(
                        canonical(&once),
                        canonical(&v),
                        "from Lua, back and out again: not the same value"
                    );
                }
                // A nil map value (from `pmnc.json.null`) is dropped on the way into Lua
                // (docs/decisions/005), which may turn a map into an array; one trip settles it.
                assert_eq!(
                    canonical(&trip(lua, &once)),
                    canonical(&once),
                    "not settled after one trip"
                );
            }
            Err(e) => assert!(
                e.starts_with("value"),
                "a refusal that does not say where: {e}"
            ),
        }
        // Keep the VM small between inputs.
        let _ = lua.gc_collect();
    });
});
