//! `pmnc.transaction` (Rust side): running participants through the cage's resources, finishing
//! them, and finishing them together with durable calls.

use std::time::{Duration, Instant};

use mlua::{Lua, MultiValue, Table, Value as LuaValue};

use super::current_ctx;
use super::{failure, success};
use crate::convert::{from_lua, to_lua};
use crate::transaction::{self, CachedRead, Participant, ParticipantError, Prepared};

/// A prepared transaction held by Lua between `tx_run` and `tx_finish`. Dropped unfinished (the
/// request ended), its connections roll back when they go back to their pools.
struct TxHandle(std::cell::RefCell<Option<Box<dyn Prepared>>>);

fn participants_of(list: &Table) -> Result<Vec<Participant>, ParticipantError> {
    let fail = |i: usize, resource: String, message: String| ParticipantError { resource, participant: i, code: None, message, recoverable: true };
    let mut out = Vec::new();
    for (i, entry) in list.sequence_values::<Table>().enumerate() {
        let n = i + 1;
        let entry = entry.map_err(|e| fail(n, String::new(), e.to_string()))?;
        let resource: String = entry.raw_get("resource").map_err(|e| fail(n, String::new(), e.to_string()))?;
        let method: String = entry.raw_get("method").map_err(|e| fail(n, resource.clone(), e.to_string()))?;
        let args: Table = entry.raw_get("args").map_err(|e| fail(n, resource.clone(), e.to_string()))?;
        let count: i64 = args.raw_get("n").unwrap_or(0);
        let mut values = Vec::with_capacity(count.max(0) as usize);
        for a in 1..=count {
            let v: LuaValue = args.raw_get(a).map_err(|e| fail(n, resource.clone(), e.to_string()))?;
            values.push(from_lua(&v).map_err(|e| fail(n, resource.clone(), format!("{method}: argument {a}: {e}")))?);
        }
        let mut participant = Participant::new(resource, method, values);
        // The prelude checked both tables (with messages at the user's line); this only reads them.
        if let Some(c) = entry.raw_get::<Option<Table>>("cached").map_err(|e| fail(n, participant.resource.clone(), e.to_string()))? {
            let key: String = c.raw_get("key").map_err(|e| fail(n, participant.resource.clone(), format!("cached: key: {e}")))?;
            let ttl: f64 = c.raw_get("ttl").map_err(|e| fail(n, participant.resource.clone(), format!("cached: ttl: {e}")))?;
            let ttl = Duration::try_from_secs_f64(ttl).map_err(|e| fail(n, participant.resource.clone(), format!("cached: ttl {ttl}: {e}")))?;
            participant.cached = Some(CachedRead { key, ttl });
        }
        if let Some(keys) = entry.raw_get::<Option<Table>>("invalidates").map_err(|e| fail(n, participant.resource.clone(), e.to_string()))? {
            for key in keys.sequence_values::<String>() {
                participant.invalidates.push(key.map_err(|e| fail(n, participant.resource.clone(), format!("invalidates: {e}")))?);
            }
        }
        out.push(participant);
    }
    Ok(out)
}

fn error_fields(lua: &Lua, e: &ParticipantError) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    if !e.resource.is_empty() {
        t.raw_set("resource", e.resource.as_str())?;
    }
    if e.participant > 0 {
        t.raw_set("participant", e.participant)?;
    }
    t.raw_set("recoverable", e.recoverable)?;
    if let Some(code) = &e.code {
        t.raw_set("code", code.as_str())?;
    }
    t.raw_set("message", e.message.as_str())?;
    Ok(t)
}

fn tx_failure(lua: &Lua, e: &ParticipantError) -> mlua::Result<MultiValue> {
    Ok(MultiValue::from_iter([LuaValue::Boolean(false), LuaValue::Table(error_fields(lua, e)?)]))
}

pub(crate) fn register(lua: &Lua, t: &Table) -> mlua::Result<()> {
    // pmnc.cache.invalidate(resource, keys): the prelude checked the arguments.
    t.set(
        "cache_invalidate",
        lua.create_function(|lua, (resource, keys): (String, Table)| {
            let Some(shared) = super::shared_of(lua) else { return failure(lua, "pmnc.cache.invalidate: no cage") };
            let mut list = Vec::new();
            for k in keys.sequence_values::<String>() {
                list.push(k?);
            }
            let Some(resources) = transaction::resources() else {
                return failure(lua, format!("pmnc.cache.invalidate: cage {} has no resource {resource}", shared.cage));
            };
            match resources.invalidate(&shared.cage, &resource, &list) {
                Ok(()) => Ok(success([])),
                Err(e) => failure(lua, format!("pmnc.cache.invalidate: {e}")),
            }
        })?,
    )?;
    t.set(
        "tx_run",
        lua.create_async_function(|lua, list: Table| async move {
            let Some(ctx) = current_ctx(&lua) else {
                return tx_failure(
                    &lua,
                    &ParticipantError {
                        resource: String::new(),
                        participant: 0,
                        code: None,
                        message: "transactions may only be executed while handling a request".into(),
                        recoverable: true,
                    },
                );
            };
            let participants = match participants_of(&list) {
                Ok(p) => p,
                Err(e) => return tx_failure(&lua, &e),
            };
            let Some(resources) = transaction::resources() else {
                let first = &participants[0];
                return tx_failure(
                    &lua,
                    &ParticipantError {
                        resource: first.resource.clone(),
                        participant: 1,
                        code: None,
                        message: format!("cage {} has no resource {}", ctx.cage, first.resource),
                        recoverable: true,
                    },
                );
            };
            match resources.run(&ctx.cage, participants, ctx.deadline).await {
                Ok(prepared) => {
                    let outcomes = lua.create_table()?;
                    for (i, o) in prepared.outcomes().iter().enumerate() {
                        let t = lua.create_table()?;
                        match o {
                            Ok(v) => {
                                t.raw_set("ok", true)?;
                                t.raw_set("value", to_lua(&lua, v)?)?;
                            }
                            Err(e) => {
                                t.raw_set("ok", false)?;
                                t.raw_set("error", error_fields(&lua, e)?)?;
                            }
                        }
                        outcomes.raw_set(i + 1, t)?;
                    }
                    // queue (issue 22 #9): whether a participant's effects outlive a rollback.
                    let lasting = LuaValue::Boolean(prepared.effects_stay());
                    // Nothing to commit or roll back (read cache hits): Lua skips tx_finish.
                    let idle = LuaValue::Boolean(prepared.idle());
                    let handle = lua.create_any_userdata(TxHandle(std::cell::RefCell::new(Some(prepared))))?;
                    Ok(success([LuaValue::UserData(handle), LuaValue::Table(outcomes), lasting, idle]))
                }
                Err(e) => tx_failure(&lua, &e),
            }
        })?,
    )?;
    t.set(
        "tx_finish",
        lua.create_async_function(|lua, (handle, commit, wait): (mlua::AnyUserData, bool, bool)| async move {
            let prepared = match handle.borrow::<TxHandle>() {
                Ok(h) => h.0.borrow_mut().take(),
                Err(_) => None,
            };
            let Some(prepared) = prepared else {
                return Ok(success([]));
            };
            let deadline = current_ctx(&lua).map(|c| c.deadline).unwrap_or_else(|| Instant::now() + Duration::from_secs(5));
            match prepared.finish(commit, wait, deadline).await {
                Ok(()) => Ok(success([])),
                Err(e) => tx_failure(&lua, &e),
            }
        })?,
    )?;
    t.set(
        "tx_finish_calls",
        lua.create_async_function(|lua, (handle, list): (Option<mlua::AnyUserData>, Table)| async move {
            let Some(ctx) = current_ctx(&lua) else {
                return failure(&lua, "transactions may only be executed while handling a request");
            };
            let mut calls = Vec::new();
            for entry in list.sequence_values::<Table>() {
                let entry = entry?;
                let cage: String = entry.raw_get("cage")?;
                let module: String = entry.raw_get("module")?;
                let function: String = entry.raw_get("fn")?;
                let target = format!("{cage}.{module}.{function}");
                let opts: Table = entry.raw_get("opts")?;
                let options = match crate::durable::options_from(&target, &opts) {
                    Ok(o) => o,
                    Err(e) => return failure(&lua, e),
                };
                let args: Table = entry.raw_get("args")?;
                let n: i64 = args.raw_get("n").unwrap_or(0);
                let mut values = Vec::new();
                for a in 1..=n {
                    match from_lua(&args.raw_get::<LuaValue>(a)?) {
                        Ok(v) => values.push(v),
                        Err(e) => return failure(&lua, format!("calling {target}: argument {a}: {e}")),
                    }
                }
                let mut options = options;
                options.trace = ctx.trace.as_deref().map(|t| t.traceparent());
                calls.push(crate::durable::DurableCall { from_cage: ctx.cage.clone(), cage, module, function, args: values, options });
            }
            let prepared = handle.and_then(|h| h.borrow::<TxHandle>().ok().and_then(|h| h.0.borrow_mut().take()));
            let deadline = ctx.deadline;
            let finish: crate::durable::Finish = Box::new(move |commit| match prepared {
                Some(p) => p.finish(commit, true, deadline),
                None => Box::pin(async { Ok(()) }),
            });
            match crate::durable::commit_with_calls(&ctx.cage, calls, finish).await {
                Ok(ids) => {
                    let t = lua.create_table()?;
                    for (i, id) in ids.iter().enumerate() {
                        t.raw_set(i + 1, id.as_str())?;
                    }
                    Ok(success([LuaValue::Table(t)]))
                }
                Err(crate::durable::CommitFailure::Participant(e)) => tx_failure(&lua, &e),
                Err(crate::durable::CommitFailure::Calls(m)) => failure(&lua, m),
            }
        })?,
    )?;
    Ok(())
}
