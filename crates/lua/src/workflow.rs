//! Workflows as Lua sees them (`pmnc.workflow`, docs/queues.md "Workflows"): steps are durable
//! calls described and checked now but stored later (`step(cage, options).m.f(args...)`), and
//! `chain`, `group` and `chord` hand a list of them to the installed durable call service
//! (crates/queue), which stores the first ones and, at the end of each, the next in the same
//! commit. `cancel` and `status` read and change what the cages of this process store.

use mlua::{Lua, MultiValue, Table, Value as LuaValue, Variadic};

use crate::convert::from_lua;
use crate::durable::{self, DurableCall, Shape, Workflow, ACCEPT_MODULE, MAX_WORKFLOW_ID, MAX_WORKFLOW_STEPS};

/// A step as Lua holds it: opaque, so that only `pmnc.workflow.step` makes one.
struct StepUd(DurableCall);

impl mlua::UserData for StepUd {}

fn fail(lua: &Lua, m: impl AsRef<str>) -> mlua::Result<MultiValue> {
    Ok(MultiValue::from_iter([LuaValue::Boolean(false), LuaValue::String(lua.create_string(m.as_ref())?)]))
}

fn ok(values: impl IntoIterator<Item = LuaValue>) -> MultiValue {
    let mut mv = MultiValue::new();
    mv.push_back(LuaValue::Boolean(true));
    mv.extend(values);
    mv
}

/// The checks of names that need no service: what can never be a step.
fn check_names(target: &str, cage: &str, module: &str, function: &str) -> Result<(), String> {
    if !rustomnic_core::is_cage_name(cage) {
        return Err(format!("calling {target}: {cage:?} is not a valid cage name (letters, digits, _ and -, at most 64)"));
    }
    if module == ACCEPT_MODULE {
        return Err(format!("calling {target}: module {module} is reserved"));
    }
    if !rustomnic_core::is_identifier(module) {
        return Err(format!("calling {target}: {module:?} is not a module name"));
    }
    if function.starts_with('_') {
        return Err(format!("calling {target}: {module}.{function} is private (names starting with _ cannot be called through pmnc)"));
    }
    Ok(())
}

/// A workflow id given in options: 1 to [`MAX_WORKFLOW_ID`] bytes.
fn workflow_id(what: &str, v: LuaValue) -> Result<Option<String>, String> {
    match v {
        LuaValue::Nil => Ok(None),
        LuaValue::Integer(i) => Ok(Some(i.to_string())),
        LuaValue::String(s) => {
            let len = s.as_bytes().len();
            if len == 0 || len > MAX_WORKFLOW_ID {
                return Err(format!("{what}: option id must be 1 to {MAX_WORKFLOW_ID} bytes (its steps' ids add to it), got {len}"));
            }
            Ok(Some(s.to_string_lossy()))
        }
        other => Err(format!("{what}: option id must be a string, got {}", other.type_name())),
    }
}

/// The steps of a list given to chain, group or chord.
fn steps_of(what: &str, list: &LuaValue) -> Result<Vec<DurableCall>, String> {
    let LuaValue::Table(t) = list else {
        return Err(format!("{what}: expected a list of steps (pmnc.workflow.step(...)), got {}", list.type_name()));
    };
    let n = t.raw_len();
    if n == 0 {
        return Err(format!("{what}: the list of steps is empty"));
    }
    if n > MAX_WORKFLOW_STEPS {
        return Err(format!("{what}: {n} steps, over the limit of {MAX_WORKFLOW_STEPS}"));
    }
    let mut steps = Vec::with_capacity(n);
    for i in 1..=n {
        let v: LuaValue = t.raw_get(i).map_err(|e| format!("{what}: step {i}: {e}"))?;
        steps.push(step_of(&format!("{what}: step {i}"), &v)?);
    }
    Ok(steps)
}

fn step_of(what: &str, v: &LuaValue) -> Result<DurableCall, String> {
    let not_step = || format!("{what} is not a step (make one with pmnc.workflow.step(cage, options).module.fn(...)), got {}", crate::request::error_text(v));
    let LuaValue::UserData(ud) = v else { return Err(not_step()) };
    let step = ud.borrow::<StepUd>().map_err(|_| not_step())?;
    Ok(step.0.clone())
}

/// The options table of chain, group and chord: `id`, and `on_error` where `with_on_error`.
fn options_of(what: &str, v: LuaValue, with_on_error: bool) -> Result<(Option<String>, Option<DurableCall>), String> {
    let t = match v {
        LuaValue::Nil => return Ok((None, None)),
        LuaValue::Table(t) => t,
        other => return Err(format!("{what}: options must be a table, got {}", other.type_name())),
    };
    let known = if with_on_error { "id, on_error" } else { "id" };
    let (mut id, mut on_error) = (None, None);
    for pair in t.pairs::<LuaValue, LuaValue>() {
        let (k, v) = pair.map_err(|e| format!("{what}: options: {e}"))?;
        match k.as_string().map(|s| s.to_string_lossy()).as_deref() {
            Some("id") => id = workflow_id(what, v)?,
            Some("on_error") if with_on_error => on_error = Some(step_of(&format!("{what}: option on_error"), &v)?),
            _ => return Err(format!("{what}: unknown option {} (known: {known})", crate::request::error_text(&k))),
        }
    }
    Ok((id, on_error))
}

/// `rust.workflow_step`, `rust.workflow_start`, `rust.workflow_cancel` and
/// `rust.workflow_status` for the prelude's pmnc.workflow: (true, results...) or (false, message).
pub(crate) fn register(lua: &Lua, helpers: &Table) -> mlua::Result<()> {
    helpers.set(
        "workflow_step",
        lua.create_function(|lua, (cage, opts, module, function, args): (String, Table, String, String, Variadic<LuaValue>)| {
            let target = format!("{cage}.{module}.{function}");
            let what = "pmnc.workflow.step";
            if !matches!(opts.raw_get::<LuaValue>("id"), Ok(LuaValue::Nil)) {
                return fail(lua, format!("{what}: calling {target}: option id is not taken: a step's id is derived from its workflow's (<id>.<k>)"));
            }
            let mut options = match durable::options_from(&target, &opts) {
                Ok(o) => o,
                Err(e) => return fail(lua, format!("{what}: {e}")),
            };
            if let Err(e) = check_names(&target, &cage, &module, &function) {
                return fail(lua, format!("{what}: {e}"));
            }
            let Some(ctx) = crate::api::current_ctx(lua) else {
                return fail(lua, format!("{what}: steps may only be made while handling a request"));
            };
            let mut values = Vec::with_capacity(args.len());
            for (i, a) in args.iter().enumerate() {
                match from_lua(a) {
                    Ok(v) => values.push(v),
                    Err(e) => return fail(lua, format!("{what}: calling {target}: argument {}: {e}", i + 1)),
                }
            }
            options.trace = ctx.trace.as_deref().map(|t| t.traceparent());
            let call = DurableCall { from_cage: ctx.cage.clone(), cage, module, function, args: values, options };
            if let Err(e) = durable::check_step(&call) {
                return fail(lua, format!("{what}: {e}"));
            }
            Ok(ok([LuaValue::UserData(lua.create_userdata(StepUd(call))?)]))
        })?,
    )?;
    helpers.set(
        "workflow_start",
        lua.create_async_function(|lua, (kind, list, body, opts): (String, LuaValue, LuaValue, LuaValue)| async move {
            let lua = &lua;
            let (shape, what) = match kind.as_str() {
                "chain" => (Shape::Chain, "pmnc.workflow.chain"),
                "group" => (Shape::Group, "pmnc.workflow.group"),
                _ => (Shape::Chord, "pmnc.workflow.chord"),
            };
            let steps = match steps_of(what, &list) {
                Ok(s) => s,
                Err(e) => return fail(lua, e),
            };
            let body = match shape {
                Shape::Chord => match step_of(&format!("{what}: its body"), &body) {
                    Ok(b) => Some(b),
                    Err(e) => return fail(lua, e),
                },
                _ => None,
            };
            let (id, on_error) = match options_of(what, opts, shape != Shape::Group) {
                Ok(o) => o,
                Err(e) => return fail(lua, e),
            };
            let Some(ctx) = crate::api::current_ctx(lua) else {
                return fail(lua, format!("{what}: workflows may only be started while handling a request"));
            };
            let workflow = Workflow { from_cage: ctx.cage.clone(), id, shape, steps, body, on_error };
            match durable::start_workflow(workflow).await {
                Ok(id) => Ok(ok([LuaValue::String(lua.create_string(&id)?)])),
                Err(e) => fail(lua, format!("{what}: {e}")),
            }
        })?,
    )?;
    helpers.set(
        "workflow_cancel",
        lua.create_async_function(|lua, id: LuaValue| async move {
            let lua = &lua;
            let id = match workflow_id("pmnc.workflow.cancel(id)", id) {
                Ok(Some(id)) => id,
                Ok(None) => return fail(lua, "pmnc.workflow.cancel(id): id must be a workflow id, got nil"),
                Err(e) => return fail(lua, e),
            };
            match durable::cancel_workflow(&id).await {
                Ok(a) => Ok(ok([
                    LuaValue::Boolean(a.cancelled),
                    match a.status {
                        Some(s) => LuaValue::String(lua.create_string(s)?),
                        None => LuaValue::Nil,
                    },
                    LuaValue::String(lua.create_string(a.message)?),
                ])),
                Err(e) => fail(lua, format!("pmnc.workflow.cancel({id:?}): {e}")),
            }
        })?,
    )?;
    helpers.set(
        "workflow_status",
        lua.create_async_function(|lua, id: LuaValue| async move {
            let lua = &lua;
            let id = match workflow_id("pmnc.workflow.status(id)", id) {
                Ok(Some(id)) => id,
                Ok(None) => return fail(lua, "pmnc.workflow.status(id): id must be a workflow id, got nil"),
                Err(e) => return fail(lua, e),
            };
            match durable::workflow_status(id.clone()).await {
                Ok(None) => Ok(ok([LuaValue::Nil])),
                Ok(Some(s)) => {
                    let t = lua.create_table()?;
                    t.set("id", id.as_str())?;
                    t.set("status", s.status.as_str())?;
                    let steps = lua.create_table()?;
                    for (i, (sid, status, error)) in s.steps.iter().enumerate() {
                        let st = lua.create_table()?;
                        st.set("id", sid.as_str())?;
                        st.set("status", status.as_str())?;
                        if let Some(e) = error {
                            st.set("error", e.as_str())?;
                        }
                        steps.raw_set(i + 1, st)?;
                    }
                    t.set("steps", steps)?;
                    Ok(ok([LuaValue::Table(t)]))
                }
                Err(e) => fail(lua, format!("pmnc.workflow.status({id:?}): {e}")),
            }
        })?,
    )?;
    Ok(())
}
