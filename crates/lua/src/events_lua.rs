//! The Lua side of the event bus: the Rust helpers behind `pmnc.events.publish`, `.wait` and
//! `.stats`, and [`current_request`] for interfaces whose Lua functions act on the request that
//! calls them.

use std::rc::Rc;
use std::time::{Duration, Instant};

use mlua::{Lua, MultiValue, Table, Value as LuaValue};

use crate::convert::{from_lua, to_lua};
use crate::events;
use crate::request::{RequestCtx, VmShared};

/// The request whose coroutine is running in `lua` now (`None` outside requests).
pub fn current_request(lua: &Lua) -> Option<Rc<RequestCtx>> {
    lua.app_data_ref::<Rc<VmShared>>().and_then(|s| s.current())
}

fn fail(lua: &Lua, message: impl AsRef<str>) -> mlua::Result<MultiValue> {
    Ok(MultiValue::from_iter([LuaValue::Boolean(false), LuaValue::String(lua.create_string(message.as_ref())?)]))
}

fn ok(values: impl IntoIterator<Item = LuaValue>) -> MultiValue {
    let mut mv = MultiValue::new();
    mv.push_back(LuaValue::Boolean(true));
    mv.extend(values);
    mv
}

/// Asks the request running in `lua` now to be polled again at `at` at the latest: a wait with
/// a time limit of its own uses the request's deadline timer rather than a timer of its own
/// (call it from the wait's `poll` when it returns pending).
pub fn wake_request_at(lua: &Lua, at: Instant) {
    if let Some(shared) = lua.app_data_ref::<Rc<VmShared>>() {
        let at = shared.wake_at.get().map_or(at, |w| w.min(at));
        shared.wake_at.set(Some(at));
    }
}

/// `pmnc.events.wait` while it waits. A plain struct rather than an `async` block: a parked
/// request holds it for as long as it waits, and an `async` block would be several times larger.
struct WaitEvent {
    lua: Lua,
    state: WaitState,
}

enum WaitState {
    /// The wait, and when it ends without an event (the request's timer wakes it then).
    Waiting(events::Waiter, Option<Instant>),
    /// Answered without waiting (a bad argument); boxed, as it is rare and large.
    Ready(Box<mlua::Result<MultiValue>>),
    Done,
}

impl std::future::Future for WaitEvent {
    type Output = mlua::Result<MultiValue>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        use std::task::Poll;
        let this = self.get_mut();
        let got = match &mut this.state {
            WaitState::Waiting(waiter, timer) => match std::pin::Pin::new(waiter).poll(cx) {
                Poll::Ready(v) => v,
                Poll::Pending => match timer {
                    Some(until) if Instant::now() >= *until => None,
                    Some(until) => {
                        wake_request_at(&this.lua, *until);
                        return Poll::Pending;
                    }
                    None => return Poll::Pending,
                },
            },
            WaitState::Ready(_) => None,
            WaitState::Done => return Poll::Pending,
        };
        let lua = &this.lua;
        Poll::Ready(match std::mem::replace(&mut this.state, WaitState::Done) {
            WaitState::Ready(r) => *r,
            _ => match got {
                Some(v) => to_lua(lua, &v).map(|v| ok([v])),
                None => Ok(ok([LuaValue::Nil])),
            },
        })
    }
}

fn topic_of(lua: &Lua, what: &str, topic: &LuaValue) -> Result<String, mlua::Result<MultiValue>> {
    match topic {
        LuaValue::String(s) => Ok(s.to_string_lossy()),
        other => Err(fail(lua, format!("{what}: the topic must be a string, got {}", other.type_name()))),
    }
}

/// Seconds from a Lua number: `None` for nil (no timeout of its own), an error text otherwise.
pub fn seconds(what: &str, v: &LuaValue) -> Result<Option<f64>, String> {
    let secs = match v {
        LuaValue::Nil => return Ok(None),
        LuaValue::Integer(i) => *i as f64,
        LuaValue::Number(n) => *n,
        other => return Err(format!("{what}: timeout must be a number of seconds, got {}", other.type_name())),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("{what}: timeout must be zero or more seconds, got {secs}"));
    }
    Ok(Some(secs.min(1e9)))
}

/// Adds `events_publish`, `events_wait` and `events_stats` to the prelude's table of helpers.
pub(crate) fn register(lua: &Lua, t: &Table) -> mlua::Result<()> {
    t.set(
        "events_publish",
        lua.create_function(|lua, (topic, value, cage): (LuaValue, LuaValue, LuaValue)| {
            let what = "pmnc.events.publish";
            let topic = match topic_of(lua, what, &topic) {
                Ok(t) => t,
                Err(e) => return e,
            };
            let Some(shared) = lua.app_data_ref::<Rc<VmShared>>().map(|s| s.clone()) else { return fail(lua, format!("{what}: no cage")) };
            let value = match from_lua(&value) {
                Ok(v) => v,
                Err(e) => return fail(lua, format!("{what}({topic:?}): the value {e}")),
            };
            // A third argument names another cage: its waiters, in every process that runs it.
            let cage = match cage {
                LuaValue::Nil => shared.cage.clone(),
                LuaValue::String(c) => {
                    let c = c.to_string_lossy();
                    if !rustomnic_core::is_cage_name(&c) {
                        return fail(lua, format!("{what}({topic:?}): {c:?} is not a valid cage name"));
                    }
                    c
                }
                other => return fail(lua, format!("{what}({topic:?}): the cage must be a string, got {}", other.type_name())),
            };
            match events::publish(&cage, &topic, value) {
                Ok(n) => Ok(ok([LuaValue::Integer(n as i64)])),
                Err(e) => fail(lua, e.to_string()),
            }
        })?,
    )?;
    t.set(
        "events_wait",
        lua.create_async_function(|lua, (topic, timeout): (LuaValue, LuaValue)| {
            let what = "pmnc.events.wait";
            let started = (|| {
                let topic = topic_of(&lua, what, &topic)?;
                let timeout = seconds(what, &timeout).map_err(|e| fail(&lua, e))?;
                let ctx = current_request(&lua).ok_or_else(|| fail(&lua, format!("{what} may only be called while handling a request")))?;
                let waiter = events::wait(&ctx.cage, &topic).map_err(|e| fail(&lua, e.to_string()))?;
                let until = timeout.map(|s| Instant::now() + Duration::from_secs_f64(s));
                // Ending at the deadline is the request future's job (the request gets its
                // timeout answer); a timeout within it gives nil to the handler.
                let timer = until.filter(|u| *u < ctx.deadline);
                Ok::<_, mlua::Result<MultiValue>>((waiter, timer))
            })();
            match started {
                Ok((waiter, timer)) => WaitEvent { lua, state: WaitState::Waiting(waiter, timer) },
                Err(r) => WaitEvent { lua, state: WaitState::Ready(Box::new(r)) },
            }
        })?,
    )?;
    t.set(
        "events_stats",
        lua.create_function(|lua, topic: Option<String>| {
            let Some(shared) = lua.app_data_ref::<Rc<VmShared>>().map(|s| s.clone()) else { return Ok(LuaValue::Nil) };
            let s = lua.create_table()?;
            let (waiters, topics) = events::cage_stats(&shared.cage);
            s.raw_set("waiters", waiters)?;
            s.raw_set("topics", topics)?;
            s.raw_set("live_requests", shared.live.get())?;
            s.raw_set("lua_memory", lua.used_memory())?;
            if let Some(topic) = topic {
                s.raw_set("topic_waiters", events::waiting(&shared.cage, &topic))?;
            }
            Ok(LuaValue::Table(s))
        })?,
    )?;
    Ok(())
}
