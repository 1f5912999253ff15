//! Running one call of either protocol: the exposed function found, its arguments given, and its
//! outcome as a result or an error object (the codes of jsonrpc.rs, which XML-RPC faults use too).

use rustomnic_core::Value;
use rustomnic_lua::convert::{from_lua, to_lua};
use rustomnic_lua::mlua::{MultiValue, Value as LuaValue};
use rustomnic_lua::{worker, RequestCtx, RunError};
use rustomnic_resource_rpc::jsonrpc::{RpcError, DEADLINE_EXCEEDED, INTERNAL_ERROR, METHOD_NOT_FOUND};

use crate::Common;

/// A call's arguments: by position (the function's arguments) or by name (one table).
pub enum Args {
    Positional(Vec<Value>),
    Named(Vec<(Value, Value)>),
}

/// Calls the function with `pcall` so that an error raised as a table with an integer `code`
/// comes back as a value (the error object the caller gets); any other error goes on as the
/// request's failure, logged with its traceback. The sandbox's pcall passes the deadline's stop
/// on, so it cannot be caught here.
const WRAPPER: &str = r#"
local pcall, type, rawget, error, mtype = pcall, type, rawget, error, math.type
local function settle(ok, ...)
  if ok then return true, ... end
  local e = ...
  if type(e) == "table" and mtype(rawget(e, "code")) == "integer" then return false, e end
  error(e, 0)
end
return function(f, ...) return settle(pcall(f, ...)) end
"#;

/// Runs method `name` with `args` under `ctx`: its result (several returned values as an array,
/// none as nil), or the error object for the caller.
pub(crate) async fn call(common: &Common, name: &str, args: Args, ctx: RequestCtx) -> Result<Value, RpcError> {
    let id = ctx.id.clone();
    let Some((module, function)) = common.method(name) else {
        return Err(RpcError::new(METHOD_NOT_FOUND, format!("Method not found: {name}")));
    };
    let (cage, iface) = (&common.cage, &common.name);
    let internal = || RpcError::new(INTERNAL_ERROR, "Internal error").with_data(request_data(&id));
    let Some(vm) = worker::cage(cage) else {
        tracing::error!(cage = %cage, interface = %iface, request = %id, "cage has no VM on this worker");
        return Err(internal());
    };
    let started = vm.function(module, function).and_then(|f| {
        let wrapper = vm.helper("rpc_call", WRAPPER)?;
        vm.start_function(ctx, wrapper, |lua| {
            let mut all = MultiValue::new();
            all.push_back(LuaValue::Function(f));
            match &args {
                Args::Positional(values) => {
                    for v in values {
                        all.push_back(to_lua(lua, v)?);
                    }
                }
                Args::Named(entries) => all.push_back(to_lua(lua, &Value::Map(entries.clone()))?),
            }
            Ok(all)
        })
    });
    let fut = match started {
        Ok(f) => f,
        Err(RunError::NotFound(m)) => {
            // Exposed in cage.toml but gone from the module (a reload removed it).
            tracing::warn!(cage = %cage, interface = %iface, request = %id, "method {name}: {m}");
            return Err(RpcError::new(METHOD_NOT_FOUND, format!("Method not found: {name}")));
        }
        Err(e) => {
            tracing::error!(cage = %cage, interface = %iface, request = %id, "method {name} ({module}.{function}): {e}");
            return Err(internal());
        }
    };
    match fut.await {
        Ok(values) => {
            let mut values = values.into_iter();
            match values.next() {
                Some(LuaValue::Boolean(true)) => {
                    let rest: Vec<LuaValue> = values.collect();
                    let converted = match rest.len() {
                        0 => Ok(Value::Nil),
                        1 => from_lua(&rest[0]),
                        _ => rest.iter().map(from_lua).collect::<Result<Vec<_>, _>>().map(Value::Array),
                    };
                    converted.map_err(|e| {
                        tracing::error!(cage = %cage, interface = %iface, request = %id, "{module}.{function} returned a value that cannot be sent: {e}");
                        internal()
                    })
                }
                Some(LuaValue::Boolean(false)) => Err(error_object(values.next().unwrap_or(LuaValue::Nil))),
                _ => Err(internal()),
            }
        }
        Err(RunError::Deadline) => {
            tracing::warn!(cage = %cage, interface = %iface, request = %id, "method {name} ({module}.{function}): deadline exceeded");
            Err(RpcError::new(DEADLINE_EXCEEDED, "Deadline exceeded").with_data(request_data(&id)))
        }
        Err(e @ RunError::Failed { .. }) => {
            tracing::error!(cage = %cage, interface = %iface, request = %id, "{module}.{function} failed: {}", e.log_text());
            Err(internal())
        }
        Err(e) => {
            tracing::error!(cage = %cage, interface = %iface, request = %id, "{module}.{function}: {e}");
            Err(internal())
        }
    }
}

/// `{request_id = ...}`: what the caller can quote to find the log lines of its call.
fn request_data(id: &str) -> Value {
    Value::Map(vec![(Value::str("request_id"), Value::str(id))])
}

/// A Lua error table `{code = integer, message = ..., data = ...}` as the error object.
fn error_object(e: LuaValue) -> RpcError {
    let LuaValue::Table(t) = e else { return RpcError::new(INTERNAL_ERROR, "Internal error") };
    let code = t.raw_get::<i64>("code").unwrap_or(INTERNAL_ERROR);
    let message = match t.raw_get::<LuaValue>("message") {
        Ok(LuaValue::String(s)) => s.to_string_lossy(),
        Ok(LuaValue::Integer(i)) => i.to_string(),
        Ok(LuaValue::Number(n)) => n.to_string(),
        _ => String::new(),
    };
    let mut error = RpcError::new(code, message);
    match t.raw_get::<LuaValue>("data") {
        Ok(LuaValue::Nil) | Err(_) => {}
        Ok(d) => error.data = from_lua(&d).ok(),
    }
    error
}
