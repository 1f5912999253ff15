//! `pmnc(CAGE).MODULE.FUNCTION` (Rust side): plain and durable calls to other cages.

use mlua::{Lua, Table, Value as LuaValue, Variadic};

use super::current_ctx;
use super::{failure, success};
use crate::convert::{from_lua, to_lua};
use crate::worker::{self, CallRequest};

pub(crate) fn register(lua: &Lua, t: &Table) -> mlua::Result<()> {
    t.set(
        "call_cage",
        lua.create_async_function(|lua, (cage, module, function, opts, args): (String, String, String, Option<Table>, Variadic<LuaValue>)| async move {
            let target = format!("{cage}.{module}.{function}");
            let durable = match &opts {
                Some(opts) if opts.pairs::<LuaValue, LuaValue>().next().is_some() => match crate::durable::options_from(&target, opts) {
                    Ok(o) => Some(o),
                    Err(e) => return failure(&lua, e),
                },
                _ => None,
            };
            let Some(ctx) = current_ctx(&lua) else {
                return failure(&lua, format!("calling {target}: other cages may only be called while handling a request"));
            };
            let mut values = Vec::with_capacity(args.len());
            for (i, a) in args.iter().enumerate() {
                match from_lua(a) {
                    Ok(v) => values.push(v),
                    Err(e) => return failure(&lua, format!("calling {target}: argument {}: {e}", i + 1)),
                }
            }
            if let Some(mut options) = durable {
                options.trace = ctx.trace.as_deref().map(|t| t.traceparent());
                let call = crate::durable::DurableCall { from_cage: ctx.cage.clone(), cage, module, function, args: values, options };
                return match crate::durable::enqueue(call).await {
                    Ok(id) => Ok(success([LuaValue::String(lua.create_string(&id)?)])),
                    Err(e) => failure(&lua, e),
                };
            }
            let request = CallRequest { from_cage: ctx.cage.clone(), request_id: ctx.id.clone(), deadline: ctx.deadline, cage, module, function, args: values };
            match worker::call(request).await {
                Ok(results) => {
                    let mut out = Vec::with_capacity(results.len());
                    for r in &results {
                        out.push(to_lua(&lua, r)?);
                    }
                    Ok(success(out))
                }
                Err(e) => failure(&lua, e.to_string()),
            }
        })?,
    )?;
    Ok(())
}
