//! `pmnc.log.*` (Rust side): one log line per call, with the cage, the module that logged, the
//! interface and request id (and the trace, which the binary's log format adds from the request
//! running now).

use mlua::{Lua, Table};

use super::{current_ctx, shared_of};

/// The module whose code called `pmnc.log` (or `print`, `warn`): the first function up the stack
/// that comes from a module file rather than the prelude; its file name without `.lua`.
fn calling_module(lua: &Lua) -> String {
    for level in 1..8 {
        let Some(source) = lua.inspect_stack(level, |d| d.source().source.map(|s| s.into_owned())) else { break };
        match source.as_deref().and_then(|s| s.strip_prefix('@')) {
            Some(path) if !path.starts_with("pmnc/") => {
                let file = path.rsplit('/').next().unwrap_or(path);
                return file.strip_suffix(".lua").unwrap_or(file).to_string();
            }
            _ => {}
        }
    }
    String::new()
}

pub(crate) fn register(lua: &Lua, t: &Table) -> mlua::Result<()> {
    macro_rules! log_fn {
        ($name:literal, $level:expr) => {
            t.set(
                $name,
                lua.create_function(|lua, msg: String| {
                    if !tracing::enabled!(target: "lua", $level) {
                        return Ok(());
                    }
                    let cage = shared_of(lua).map(|s| s.cage.clone()).unwrap_or_default();
                    let (request, interface) = match current_ctx(lua) {
                        Some(c) => (c.id.clone(), c.interface.clone()),
                        None => (String::new(), String::new()),
                    };
                    let module = calling_module(lua);
                    match $level {
                        tracing::Level::DEBUG => tracing::debug!(target: "lua", cage = %cage, module = %module, interface = %interface, request = %request, "{msg}"),
                        tracing::Level::INFO => tracing::info!(target: "lua", cage = %cage, module = %module, interface = %interface, request = %request, "{msg}"),
                        tracing::Level::WARN => tracing::warn!(target: "lua", cage = %cage, module = %module, interface = %interface, request = %request, "{msg}"),
                        _ => tracing::error!(target: "lua", cage = %cage, module = %module, interface = %interface, request = %request, "{msg}"),
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
