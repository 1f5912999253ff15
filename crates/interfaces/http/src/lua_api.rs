//! The Lua functions of HTTP handlers beyond the request and response tables:
//! `response.stream` (and the stream it returns) and `request.upgrade` (and the WebSocket it
//! returns). Made once per VM and kept in its registry.

use bytes::Bytes;
use rustomnic_lua::mlua::{Lua, Table, Value as LuaValue};
use rustomnic_lua::{CageVm, RunError};

const KEY: &str = "rustomnic.http.api";

/// Lua side: raises the errors the Rust functions report as (false, message), at the line of the
/// handler (`check` is tail-called, so level 2 is the handler's frame).
const SOURCE: &str = r#"
return function(rust)
  local error, setmetatable, rawset = error, setmetatable, rawset
  local function check(ok, ...)
    if ok then return ... end
    error((...), 2)
  end
  local stream_start, stream_send, stream_event = rust.stream_start, rust.stream_send, rust.stream_event
  local upgrade, ws_receive, ws_send, ws_close = rust.upgrade, rust.ws_receive, rust.ws_send, rust.ws_close
  -- Shared by every handler of the VM, so read-only (see the prelude).
  local stream = __pmnc_readonly({
    send = function(data) return check(stream_send(data)) end,
    event = function(e) return check(stream_event(e)) end,
  }, "stream")
  local ws = __pmnc_readonly({
    receive = function(timeout, topic) return check(ws_receive(timeout, topic)) end,
    send = function(data, kind) return check(ws_send(data, kind)) end,
    close = function(code, reason) return check(ws_close(code, reason)) end,
  }, "websocket")
  local upload_read = rust.upload_read
  local api = { form_decode = rust.form_decode }
  -- file.read() of request.files[i]: its bytes, read off the worker.
  function api.upload_reader(i)
    return function() return check(upload_read(i)) end
  end
  api.response_mt = __pmnc_locked {
    __index = function(response, k)
      if k == "headers" then
        -- Made when first read: most handlers set no header.
        local headers = {}
        rawset(response, "headers", headers)
        return headers
      elseif k == "stream" then
        return function(content_type)
          check(stream_start(response, content_type))
          return stream
        end
      end
    end,
  }
  function api.upgrader(response)
    return function()
      check(upgrade(response))
      return ws
    end
  end
  return api
end
"#;

/// The API table of this VM, made on first use.
pub(crate) fn api(vm: &CageVm) -> Result<Table, RunError> {
    let lua = vm.lua();
    if let Ok(LuaValue::Table(t)) = lua.named_registry_value::<LuaValue>(KEY) {
        return Ok(t);
    }
    let internal = |e: rustomnic_lua::mlua::Error| RunError::Internal(format!("http api: {e}"));
    let make = vm.helper("http_api", SOURCE)?;
    let rust = functions(lua).map_err(internal)?;
    let t: Table = make.call(rust).map_err(internal)?;
    lua.set_named_registry_value(KEY, &t).map_err(internal)?;
    Ok(t)
}

fn functions(lua: &Lua) -> rustomnic_lua::mlua::Result<Table> {
    let t = lua.create_table()?;
    t.set("stream_start", lua.create_function(|lua, (response, ct): (Table, Option<String>)| crate::stream::start(lua, response, ct))?)?;
    t.set(
        "stream_send",
        lua.create_async_function(|lua, data: LuaValue| async move {
            let bytes = match &data {
                LuaValue::String(s) => Bytes::from(s.as_bytes().to_vec()),
                LuaValue::Integer(_) | LuaValue::Number(_) => Bytes::from(data.to_string()?),
                other => {
                    let m = format!("stream.send: data must be a string, got {}", other.type_name());
                    return (false, Some(m)).into_lua_multi_ok(&lua);
                }
            };
            crate::stream::send(&lua, "stream.send", bytes).await
        })?,
    )?;
    t.set(
        "stream_event",
        lua.create_async_function(|lua, event: LuaValue| async move {
            let LuaValue::Table(event) = event else {
                let m = format!("stream.event: expected a table such as {{event = \"message\", data = \"...\"}}, got {}", event.type_name());
                return (false, Some(m)).into_lua_multi_ok(&lua);
            };
            let frame = match crate::stream::sse_frame(&event) {
                Ok(f) => f,
                Err(e) => return (false, Some(format!("stream.event: {e}"))).into_lua_multi_ok(&lua),
            };
            crate::stream::send(&lua, "stream.event", frame).await
        })?,
    )?;
    t.set(
        "form_decode",
        lua.create_function(|lua, (body, content_type): (Option<rustomnic_lua::mlua::LuaString>, Option<rustomnic_lua::mlua::LuaString>)| {
            form_decode(lua, body, content_type)
        })?,
    )?;
    t.set(
        "upload_read",
        lua.create_async_function(|lua, i: usize| async move {
            let path = crate::stream::Slot::current(&lua).and_then(|slot| {
                let uploads = slot.uploads.borrow();
                uploads.as_ref().and_then(|u| u.files.get(i.wrapping_sub(1))).map(|f| f.path.clone())
            });
            let Some(path) = path else {
                return (false, Some("file.read: the upload is gone (its request has ended)".to_string())).into_lua_multi_ok(&lua);
            };
            match tokio::fs::read(&path).await {
                Ok(bytes) => {
                    use rustomnic_lua::mlua::IntoLuaMulti;
                    (true, lua.create_string(bytes)?).into_lua_multi(&lua)
                }
                Err(e) => (false, Some(format!("file.read: {}: {e}", path.display()))).into_lua_multi_ok(&lua),
            }
        })?,
    )?;
    t.set("upgrade", lua.create_async_function(|lua, response: Table| crate::upgrade::upgrade(lua, response))?)?;
    t.set("ws_receive", lua.create_async_function(|lua, (timeout, topic): (LuaValue, Option<String>)| crate::upgrade::receive(lua, timeout, topic))?)?;
    t.set("ws_send", lua.create_async_function(|lua, (data, kind): (LuaValue, Option<String>)| async move { crate::upgrade::send(&lua, data, kind).await })?)?;
    t.set(
        "ws_close",
        lua.create_async_function(|lua, (code, reason): (Option<u16>, Option<String>)| async move { crate::upgrade::close(&lua, code, reason).await })?,
    )?;
    Ok(t)
}

/// `request.form`: an `application/x-www-form-urlencoded` body as a table (a repeated name keeps
/// its last value, as `request.query` does); (false, message) for a body of another type.
fn form_decode(
    lua: &Lua,
    body: Option<rustomnic_lua::mlua::LuaString>,
    content_type: Option<rustomnic_lua::mlua::LuaString>,
) -> rustomnic_lua::mlua::Result<rustomnic_lua::mlua::MultiValue> {
    use rustomnic_lua::mlua::IntoLuaMulti;
    if let Some(ct) = content_type {
        let ct = ct.to_string_lossy();
        let essence = ct.split(';').next().unwrap_or("").trim();
        if !essence.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
            let m = format!("the body is {essence}, not application/x-www-form-urlencoded");
            return (false, m).into_lua_multi(lua);
        }
    }
    let form = lua.create_table()?;
    if let Some(body) = body {
        for (k, v) in form_urlencoded::parse(&body.as_bytes()) {
            form.raw_set(k.as_ref(), v.as_ref())?;
        }
    }
    (true, form).into_lua_multi(lua)
}

/// (false, message) as the multi-value the Lua side checks.
trait FailureExt {
    fn into_lua_multi_ok(self, lua: &Lua) -> rustomnic_lua::mlua::Result<rustomnic_lua::mlua::MultiValue>;
}

impl FailureExt for (bool, Option<String>) {
    fn into_lua_multi_ok(self, lua: &Lua) -> rustomnic_lua::mlua::Result<rustomnic_lua::mlua::MultiValue> {
        use rustomnic_lua::mlua::IntoLuaMulti;
        self.into_lua_multi(lua)
    }
}
