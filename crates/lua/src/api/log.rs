//! `pmnc.log.*` (Rust side): one log line per call, with the cage, interface and request id.

use mlua::{Lua, Table};

use super::{current_ctx, shared_of};

pub(crate) fn register(lua: &Lua, t: &Table) -> mlua::Result<()> {
    macro_rules! log_fn {
        ($name:literal, $level:expr) => {
            t.set(
                $name,
                lua.create_function(|lua, msg: String| {
                    let cage = shared_of(lua).map(|s| s.cage.clone()).unwrap_or_default();
                    let (request, interface) = match current_ctx(lua) {
                        Some(c) => (c.id.clone(), c.interface.clone()),
                        None => (String::new(), String::new()),
                    };
                    match $level {
                        tracing::Level::DEBUG => tracing::debug!(target: "lua", cage = %cage, interface = %interface, request = %request, "{msg}"),
                        tracing::Level::INFO => tracing::info!(target: "lua", cage = %cage, interface = %interface, request = %request, "{msg}"),
                        tracing::Level::WARN => tracing::warn!(target: "lua", cage = %cage, interface = %interface, request = %request, "{msg}"),
                        _ => tracing::error!(target: "lua", cage = %cage, interface = %interface, request = %request, "{msg}"),
                    }
                    Ok(())
                })?,
            )?;
        };
    }
    log_fn!("log_debug", tracing::Level::DEBUG);
    log_fn!("log_info", tracing::Level::INFO);
    log_fn!("log_warn", tracing::Level::WARN);
    log_fn!("log_error", tracing::Level::ERROR);
    Ok(())
}
