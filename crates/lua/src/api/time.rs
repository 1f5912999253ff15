//! `pmnc.sleep` and `pmnc.clock` (Rust side).

use std::time::{Duration, Instant};

use mlua::{Lua, Table, Value as LuaValue};

use super::current_ctx;
use super::{failure, success};

pub(crate) fn register(lua: &Lua, t: &Table) -> mlua::Result<()> {
    t.set(
        "sleep",
        lua.create_async_function(|lua, seconds: LuaValue| async move {
            let secs = match seconds {
                LuaValue::Integer(i) => i as f64,
                LuaValue::Number(n) => n,
                other => return failure(&lua, format!("pmnc.sleep: seconds must be a number, got {}", other.type_name())),
            };
            if !secs.is_finite() || secs < 0.0 {
                return failure(&lua, format!("pmnc.sleep: seconds must be zero or more, got {secs}"));
            }
            let Some(ctx) = current_ctx(&lua) else {
                return failure(&lua, "pmnc.sleep may only be called while handling a request");
            };
            let wanted = Instant::now() + Duration::from_secs_f64(secs.min(1e9));
            if wanted > ctx.deadline {
                tokio::time::sleep_until(ctx.deadline.into()).await;
                return failure(&lua, format!("pmnc.sleep({secs}): the request's deadline passed while sleeping"));
            }
            tokio::time::sleep_until(wanted.into()).await;
            Ok(success([]))
        })?,
    )?;
    // Monotonic seconds from a fixed point of the process, for measuring durations.
    t.set(
        "clock",
        lua.create_function(|_, ()| {
            static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
            Ok(START.get_or_init(Instant::now).elapsed().as_secs_f64())
        })?,
    )?;
    Ok(())
}
