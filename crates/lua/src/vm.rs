//! One Lua VM of one cage on one worker thread: the pmnc API, module versions, and requests run
//! as coroutines that are time-sliced by an instruction hook and stopped at their deadline.

use std::cell::Cell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use mlua::{
    ffi, Function, HookTriggers, Lua, LuaOptions, MultiValue, StdLib, Table, Value as LuaValue,
    Variadic, VmState,
};
use rustomnic_core::Value;

use crate::convert::{array_metatable, from_lua, to_lua};
use crate::limits::LuaLimits;
use crate::module::CompiledModule;
use crate::request::{error_text, RequestCtx, RequestFuture, RunError, VmShared};
use crate::strings::Running;
use crate::transaction::{self, Participant, ParticipantError, Prepared};
use crate::worker::{self, CallRequest};

/// Instructions between two hook calls. The hook reads the clock, so this bounds both the
/// overhead (one clock read per this many instructions) and how late a slice or deadline is seen
/// in ordinary code; the watchdog (watchdog.rs) catches code whose instructions are slow.
const HOOK_EVERY: i32 = 4000;
/// How long a module's top-level code may run when it is loaded: every worker runs it too, and
/// nothing can yield meanwhile.
pub const LOAD_TIMEOUT: Duration = Duration::from_millis(500);
/// Arrays of plain numbers or strings up to this size go to Lua's own C sort (a few ms at most).
const C_SORT_MAX: usize = 20_000;

const PRELUDE: &str = include_str!("prelude.lua");

/// The prelude compiled once per process, without line information: an error that a library
/// function raises while a prelude wrapper calls it would otherwise carry the prelude's line
/// ("pmnc/prelude.lua:80: cannot change a protected metatable") where plain Lua names the
/// caller's; without it, such errors carry no position, and the prelude's own errors name the
/// module's line (they are raised at level 2).
fn prelude_bytecode() -> std::sync::Arc<Vec<u8>> {
    static CODE: std::sync::OnceLock<std::sync::Arc<Vec<u8>>> = std::sync::OnceLock::new();
    CODE.get_or_init(|| {
        let lua = Lua::new_with(StdLib::NONE, LuaOptions::default()).unwrap_or_else(|_| Lua::new());
        let code = lua.load(PRELUDE).set_name("=pmnc").into_function().map(|f| f.dump(true)).unwrap_or_default();
        std::sync::Arc::new(code)
    })
    .clone()
}

/// See the module docs. Not `Send`: it lives and dies on its worker thread.
pub struct CageVm {
    lua: Lua,
    shared: Rc<VmShared>,
    modules: Table,
    run: Function,
    failure_mt: Table,
    /// Makes a module's own globals (see the prelude).
    new_env: Function,
    /// Lua functions of interfaces (see [`CageVm::helper`]), by name.
    helpers: std::cell::RefCell<std::collections::HashMap<&'static str, Function>>,
}

impl CageVm {
    /// A VM for `cage` with the pmnc API installed, no modules and the default limits.
    pub fn new(cage: &str) -> Result<CageVm, String> {
        Self::with_limits(cage, LuaLimits::default())
    }

    /// A VM for `cage` under `limits`.
    pub fn with_limits(cage: &str, limits: LuaLimits) -> Result<CageVm, String> {
        Self::build(cage, limits).map_err(|e| format!("cage {cage}: cannot create its Lua VM: {e}"))
    }

    fn build(cage: &str, limits: LuaLimits) -> mlua::Result<CageVm> {
        let libs = StdLib::COROUTINE
            | StdLib::TABLE
            | StdLib::STRING
            | StdLib::UTF8
            | StdLib::MATH
            | StdLib::OS;
        // The debug library is loaded only so the prelude can keep `debug.traceback`; the prelude
        // removes `debug` before any module runs. No C modules or `package` are ever loaded.
        let lua = unsafe { Lua::unsafe_new_with(libs | StdLib::DEBUG, LuaOptions::default()) };
        let shared = Rc::new(VmShared {
            cage: cage.to_string(),
            limits,
            lua: lua.weak(),
            current: Default::default(),
            slice_start: Cell::new(Instant::now()),
            load_deadline: Cell::new(None),
            stopping: Cell::new(false),
            closing: Cell::new(false),
            started: Cell::new(std::ptr::null_mut()),
            nested: Default::default(),
            collected_at: Cell::new(0),
            budget: Cell::new(Default::default()),
            loading: Default::default(),
            live: Cell::new(0),
            wake_at: Cell::new(None),
        });
        // Requests make many short-lived tables and strings; the generational collector
        // reclaims them young instead of re-marking the whole heap in every cycle.
        lua.gc_set_mode(mlua::state::GcMode::Generational(
            mlua::state::GcGenParams::default(),
        ));
        lua.set_app_data(shared.clone());
        install_hook(&lua, shared.clone())?;
        crate::watchdog::calibrate(&lua);
        let modules = lua.create_table()?;
        let rust = rust_helpers(&lua, cage)?;
        let (_pmnc, run, _resolve, failure_mt, new_env): (
            Table,
            Function,
            Function,
            Table,
            Function,
        ) = lua
            .load(&prelude_bytecode()[..])
            .set_name("=pmnc")
            .set_mode(mlua::chunk::ChunkMode::Binary)
            .call((rust, modules.clone()))?;
        lua.gc_collect()?;
        shared.collected_at.set(lua.used_memory());
        Ok(CageVm {
            lua,
            shared,
            modules,
            run,
            failure_mt,
            new_env,
            helpers: Default::default(),
        })
    }

    pub fn cage(&self) -> &str {
        &self.shared.cage
    }

    pub fn lua(&self) -> &Lua {
        &self.lua
    }

    /// Requests whose coroutines are alive in this VM now.
    pub fn live_requests(&self) -> usize {
        self.shared.live.get()
    }

    /// Bytes of memory the VM uses.
    pub fn memory(&self) -> usize {
        self.lua.used_memory()
    }

    /// Runs a module's top-level code and makes its table the current version. On failure the
    /// previous version stays. Returns the names of its public functions.
    pub fn install(&self, module: &CompiledModule) -> Result<Vec<String>, String> {
        let table = self.load(module)?;
        self.modules
            .raw_set(module.name.as_str(), &table)
            .map_err(|e| format!("{}: {e}", module.display))?;
        Ok(public_functions(&table))
    }

    /// Runs a module's top-level code without installing it: the check a new version passes
    /// before any worker sees it.
    pub fn check_module(&self, module: &CompiledModule) -> Result<Vec<String>, String> {
        self.load(module).map(|t| public_functions(&t))
    }

    fn load(&self, module: &CompiledModule) -> Result<Table, String> {
        let env: Table = self
            .new_env
            .call(())
            .map_err(|e| format!("{}: {e}", module.display))?;
        let now = Instant::now();
        let previous = self.shared.load_deadline.replace(Some(now + LOAD_TIMEOUT));
        let main = self.lua.exec_raw_lua(|raw| raw.state());
        let previous_loading = self.shared.loading.replace(Some(module.name.clone()));
        crate::libraries::forget(&self.shared.cage, &module.name);
        let section = crate::watchdog::enter(main, now);
        let previous_budget = self.shared.begin_budget(&self.lua, self.shared.limits.request_memory);
        let result = self
            .lua
            .load(&module.bytecode[..])
            .set_name(format!("@{}", module.display))
            .set_mode(mlua::chunk::ChunkMode::Binary)
            .set_environment(env)
            .call::<LuaValue>(());
        drop(section);
        *self.shared.loading.borrow_mut() = previous_loading;
        self.shared.end_budget(&self.lua, previous_budget);
        self.shared.load_deadline.set(previous);
        match result {
            Ok(LuaValue::Table(t)) => Ok(t),
            Ok(other) => Err(format!(
                "{}: a module must return a table, this one returned {}",
                module.display,
                other.type_name()
            )),
            // mlua appends a traceback to errors of a plain call; at load time the message
            // already names file and line, and the traceback would read as extra problems.
            Err(e) => {
                let text = error_text(&LuaValue::Error(Box::new(e)));
                let text = match text.rfind("\nstack traceback:\n") {
                    Some(at) => text[..at].to_string(),
                    None => text,
                };
                // Errors raised by the runtime (a limit) carry no position: name the file.
                Err(if text.starts_with(&module.display) {
                    text
                } else {
                    format!("{}: {text}", module.display)
                })
            }
        }
    }

    /// A Lua function an interface uses on every request (to build its request tables with
    /// constant keys, which is much cheaper from Lua than key by key from Rust): `source` is a
    /// chunk returning the function; it is loaded once per VM and kept under `name`.
    pub fn helper(&self, name: &'static str, source: &str) -> Result<Function, RunError> {
        if let Some(f) = self.helpers.borrow().get(name) {
            return Ok(f.clone());
        }
        let f: Function = self
            .lua
            .load(source)
            .set_name(format!("@pmnc/{name}.lua"))
            .call(())
            .map_err(|e| RunError::Internal(format!("helper {name}: {e}")))?;
        self.helpers.borrow_mut().insert(name, f.clone());
        Ok(f)
    }

    /// Forgets a module (its file was deleted and nothing replaces it).
    pub fn remove(&self, name: &str) {
        let _ = self.modules.raw_set(name, LuaValue::Nil);
    }

    pub fn has_module(&self, name: &str) -> bool {
        matches!(
            self.modules.raw_get::<LuaValue>(name),
            Ok(LuaValue::Table(_))
        )
    }

    /// The current version of a public module function.
    pub fn function(&self, module: &str, function: &str) -> Result<Function, RunError> {
        let cage = self.cage();
        if function.starts_with('_') {
            return Err(RunError::NotFound(format!(
                "cage {cage}: {module}.{function} is private (names starting with _ cannot be called through pmnc)"
            )));
        }
        let m: Table = match self.modules.raw_get::<LuaValue>(module) {
            Ok(LuaValue::Table(t)) => t,
            _ => {
                return Err(RunError::NotFound(format!(
                    "cage {cage} has no module {module} (calling {module}.{function})"
                )))
            }
        };
        match m.raw_get::<LuaValue>(function) {
            Ok(LuaValue::Function(f)) => Ok(f),
            _ => Err(RunError::NotFound(format!(
                "cage {cage}: module {module} has no function {function}"
            ))),
        }
    }

    /// Starts a request: `module.function` runs as a new coroutine with the arguments `build`
    /// makes. The returned future ends when the handler returns, fails or passes its deadline.
    pub fn start(
        &self,
        ctx: RequestCtx,
        module: &str,
        function: &str,
        build: impl FnOnce(&Lua) -> mlua::Result<MultiValue>,
    ) -> Result<RequestFuture, RunError> {
        let f = self
            .function(module, function)
            .inspect_err(|e| crate::metrics::not_started(&ctx, e))?;
        self.start_function(ctx, f, build)
    }

    /// Like [`start`](Self::start) with a function value (a test, a callback).
    pub fn start_function(
        &self,
        ctx: RequestCtx,
        f: Function,
        build: impl FnOnce(&Lua) -> mlua::Result<MultiValue>,
    ) -> Result<RequestFuture, RunError> {
        let internal = |e: mlua::Error| RunError::Internal(e.to_string());
        let args = build(&self.lua).map_err(internal)?;
        let mut all = MultiValue::with_capacity(args.len() + 1);
        all.push_back(LuaValue::Function(f));
        all.extend(args);
        let inner = self.run.call_async::<MultiValue>(all);
        self.shared.live.set(self.shared.live.get() + 1);
        let recording = crate::metrics::Recording::start(&ctx);
        Ok(RequestFuture {
            inner: Some(inner),
            state: std::ptr::null_mut(),
            grown: 0,
            done: false,
            ctx: Rc::new(ctx),
            shared: self.shared.clone(),
            timer: None,
            gate: None,
            failure_mt: self.failure_mt.clone(),
            turn: None,
            recording,
        })
    }

    /// Calls `module.function` with values from outside this VM (another cage, the wire).
    pub async fn call(
        &self,
        ctx: RequestCtx,
        module: &str,
        function: &str,
        args: Vec<Value>,
    ) -> Result<Vec<Value>, RunError> {
        let fut = self.start(ctx, module, function, |lua| {
            args.iter().map(|v| to_lua(lua, v)).collect()
        })?;
        let ctx = fut.ctx.clone();
        let result = fut.await;
        if let Err(e @ RunError::Failed { .. }) = &result {
            tracing::warn!(cage = %self.cage(), request = %ctx.id, "{module}.{function} failed: {}", e.log_text());
        }
        let values = result?;
        values
            .iter()
            .map(|v| {
                from_lua(v).map_err(|e| RunError::Failed {
                    message: format!("{module}.{function} returned {e}"),
                    traceback: String::new(),
                })
            })
            .collect()
    }
}

fn public_functions(t: &Table) -> Vec<String> {
    let mut names: Vec<String> = t
        .pairs::<LuaValue, LuaValue>()
        .filter_map(|p| p.ok())
        .filter_map(|(k, v)| match (k, v) {
            (LuaValue::String(s), LuaValue::Function(_)) => Some(s.to_string_lossy()),
            _ => None,
        })
        .filter(|n| !n.starts_with('_'))
        .collect();
    names.sort();
    names
}

/// The hook behind preemption and deadlines, called every [`HOOK_EVERY`] instructions in every
/// coroutine of the VM, and at the next instruction after the watchdog's signal or a library
/// call that asked for a yield armed it.
fn install_hook(lua: &Lua, shared: Rc<VmShared>) -> mlua::Result<()> {
    lua.set_global_hook(
        HookTriggers::new().every_nth_instruction(HOOK_EVERY as u32),
        move |lua, debug| {
            let state = lua.exec_raw_lua(|raw| raw.state());
            shared.check_budget(lua);
            let now = Instant::now();
            match shared.check_running(now) {
                Running::Go => Ok(VmState::Continue),
                Running::Stop(m) => {
                    shared.stopping.set(true);
                    Err(mlua::Error::runtime(m))
                }
                Running::SliceOver {
                    slice_start,
                    past_deadline,
                } => {
                    // SAFETY: `state` is the thread running this hook.
                    if unsafe { ffi::lua_isyieldable(state) } != 0 {
                        if in_async_wrapper(debug) {
                            // mlua's wrapper of an async function has polled its future and is about
                            // to yield "pending": a yield here would let the future's wake-up arrive
                            // while nothing listens for it, and the request would never be polled
                            // again. Try again at the next instruction, which is soon outside.
                            // SAFETY: as above.
                            unsafe { crate::watchdog::arm(state) };
                            return Ok(VmState::Continue);
                        }
                        // In a coroutine that module code created, the yield reaches the prelude's
                        // coroutine.resume, which sees this mark and passes the yield on upwards.
                        if let Ok(marks) = lua.named_registry_value::<Table>(HOOK_YIELDS) {
                            let _ = marks.raw_set(lua.current_thread(), true);
                        }
                        return Ok(VmState::Yield);
                    }
                    // Here nothing can yield (Lua called by C code): stop at the deadline, and stop
                    // code that keeps the worker from its other tasks for too long.
                    if past_deadline {
                        return Err(mlua::Error::runtime(shared.stop(format!(
                            "request {} passed its deadline",
                            shared.request_id()
                        ))));
                    }
                    let ran = now.duration_since(slice_start);
                    if ran >= shared.limits.unyielding {
                        return Err(mlua::Error::runtime(shared.stop(
                            crate::strings::unyielding_message(
                                "Lua code",
                                ran,
                                shared.limits.unyielding,
                            ),
                        )));
                    }
                    Ok(VmState::Continue)
                }
            }
        },
    )
}

/// Is the hook running in mlua's Lua wrapper of an async Rust function?
fn in_async_wrapper(debug: &mlua::debug::Debug) -> bool {
    matches!(debug.source().source.as_deref(), Some("=__mlua_async_poll"))
}

/// Registry key of the weak-keyed set of coroutines the hook suspended at the end of a time
/// slice (see the prelude's `coroutine.resume`).
const HOOK_YIELDS: &str = "rustomnic.hook_yields";

fn shared_of(lua: &Lua) -> Option<Rc<VmShared>> {
    lua.app_data_ref::<Rc<VmShared>>().map(|s| s.clone())
}

fn current_ctx(lua: &Lua) -> Option<Rc<RequestCtx>> {
    shared_of(lua).and_then(|s| s.current())
}

/// (false, message): how Rust helpers report failure to the prelude, which raises it.
fn failure(lua: &Lua, message: impl AsRef<str>) -> mlua::Result<MultiValue> {
    Ok(MultiValue::from_iter([
        LuaValue::Boolean(false),
        LuaValue::String(lua.create_string(message.as_ref())?),
    ]))
}

fn success(values: impl IntoIterator<Item = LuaValue>) -> MultiValue {
    let mut mv = MultiValue::new();
    mv.push_back(LuaValue::Boolean(true));
    mv.extend(values);
    mv
}

/// A prepared transaction held by Lua between `tx_run` and `tx_finish`. Dropped unfinished (the
/// request ended), its connections roll back when they go back to their pools.
struct TxHandle(std::cell::RefCell<Option<Box<dyn Prepared>>>);

fn participants_of(list: &Table) -> Result<Vec<Participant>, ParticipantError> {
    let fail = |i: usize, resource: String, message: String| ParticipantError {
        resource,
        participant: i,
        code: None,
        message,
        recoverable: true,
    };
    let mut out = Vec::new();
    for (i, entry) in list.sequence_values::<Table>().enumerate() {
        let n = i + 1;
        let entry = entry.map_err(|e| fail(n, String::new(), e.to_string()))?;
        let resource: String = entry
            .raw_get("resource")
            .map_err(|e| fail(n, String::new(), e.to_string()))?;
        let method: String = entry
            .raw_get("method")
            .map_err(|e| fail(n, resource.clone(), e.to_string()))?;
        let args: Table = entry
            .raw_get("args")
            .map_err(|e| fail(n, resource.clone(), e.to_string()))?;
        let count: i64 = args.raw_get("n").unwrap_or(0);
        let mut values = Vec::with_capacity(count.max(0) as usize);
        for a in 1..=count {
            let v: LuaValue = args
                .raw_get(a)
                .map_err(|e| fail(n, resource.clone(), e.to_string()))?;
            values.push(
                from_lua(&v).map_err(|e| {
                    fail(n, resource.clone(), format!("{method}: argument {a}: {e}"))
                })?,
            );
        }
        out.push(Participant {
            resource,
            method,
            args: values,
        });
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
    Ok(MultiValue::from_iter([
        LuaValue::Boolean(false),
        LuaValue::Table(error_fields(lua, e)?),
    ]))
}

fn rust_helpers(lua: &Lua, cage: &str) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    t.set("cage", cage)?;
    t.set("null", LuaValue::NULL)?;
    t.set("array_mt", array_metatable(lua)?)?;
    let marks = lua.create_table()?;
    let weak = lua.create_table()?;
    weak.raw_set("__mode", "k")?;
    marks.set_metatable(Some(weak))?;
    lua.set_named_registry_value(HOOK_YIELDS, &marks)?;
    t.set("hook_yields", marks)?;
    crate::events_lua::register(lua, &t)?;
    crate::strings::register(lua, &t)?;
    t.set("stdlib", rustomnic_stdlib::install(lua)?)?;
    register_sandbox(lua, &t)?;

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

    t.set(
        "sleep",
        lua.create_async_function(|lua, seconds: LuaValue| async move {
            let secs = match seconds {
                LuaValue::Integer(i) => i as f64,
                LuaValue::Number(n) => n,
                other => {
                    return failure(
                        &lua,
                        format!(
                            "pmnc.sleep: seconds must be a number, got {}",
                            other.type_name()
                        ),
                    )
                }
            };
            if !secs.is_finite() || secs < 0.0 {
                return failure(
                    &lua,
                    format!("pmnc.sleep: seconds must be zero or more, got {secs}"),
                );
            }
            let Some(ctx) = current_ctx(&lua) else {
                return failure(
                    &lua,
                    "pmnc.sleep may only be called while handling a request",
                );
            };
            let wanted = Instant::now() + Duration::from_secs_f64(secs.min(1e9));
            if wanted > ctx.deadline {
                tokio::time::sleep_until(ctx.deadline.into()).await;
                return failure(
                    &lua,
                    format!("pmnc.sleep({secs}): the request's deadline passed while sleeping"),
                );
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

    // json_encode(v, can_wait): big values come back as ("pending", value) for json_encode_finish.
    t.set(
        "json_encode",
        lua.create_function(|lua, (v, can_wait): (LuaValue, bool)| crate::json::encode(lua, &v, can_wait))?,
    )?;
    crate::json::register(lua, &t)?;
    t.set(
        "json_decode",
        lua.create_function(|lua, s: LuaValue| {
            let LuaValue::String(s) = s else {
                return failure(
                    lua,
                    format!("pmnc.json.decode: expected a string, got {}", s.type_name()),
                );
            };
            match Value::parse_json(&s.as_bytes()) {
                Ok(v) => Ok(success([to_lua(lua, &v)?])),
                Err(e) => failure(lua, format!("pmnc.json.decode: {e}")),
            }
        })?,
    )?;

    t.set(
        "remain",
        lua.create_function(|lua, ()| Ok(current_ctx(lua).map(|c| c.remain())))?,
    )?;
    t.set(
        "request_field",
        lua.create_function(|lua, key: LuaValue| {
            let Some(ctx) = current_ctx(lua) else {
                return Ok(LuaValue::Nil);
            };
            let LuaValue::String(key) = key else {
                return Ok(LuaValue::Nil);
            };
            Ok(match &*key.to_str()? {
                "id" => LuaValue::String(lua.create_string(&ctx.id)?),
                "interface" => LuaValue::String(lua.create_string(&ctx.interface)?),
                "cage" => LuaValue::String(lua.create_string(&ctx.cage)?),
                "deadline" => LuaValue::Number(ctx.deadline_unix),
                "call_id" => match &ctx.call_id {
                    Some(c) => LuaValue::String(lua.create_string(c)?),
                    None => LuaValue::Nil,
                },
                "caller" => match &ctx.caller {
                    Some(c) => LuaValue::String(lua.create_string(c)?),
                    None => LuaValue::Nil,
                },
                "parameters" => match &ctx.parameters {
                    Some(p) => to_lua(lua, p)?,
                    None => LuaValue::Nil,
                },
                _ => LuaValue::Nil,
            })
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
                        message: "transactions may only be executed while handling a request"
                            .into(),
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
                    let handle = lua.create_any_userdata(TxHandle(std::cell::RefCell::new(Some(prepared))))?;
                    Ok(success([LuaValue::UserData(handle), LuaValue::Table(outcomes), lasting]))
                }
                Err(e) => tx_failure(&lua, &e),
            }
        })?,
    )?;
    t.set(
        "tx_finish",
        lua.create_async_function(
            |lua, (handle, commit, wait): (mlua::AnyUserData, bool, bool)| async move {
                let prepared = match handle.borrow::<TxHandle>() {
                    Ok(h) => h.0.borrow_mut().take(),
                    Err(_) => None,
                };
                let Some(prepared) = prepared else {
                    return Ok(success([]));
                };
                let deadline = current_ctx(&lua)
                    .map(|c| c.deadline)
                    .unwrap_or_else(|| Instant::now() + Duration::from_secs(5));
                match prepared.finish(commit, wait, deadline).await {
                    Ok(()) => Ok(success([])),
                    Err(e) => tx_failure(&lua, &e),
                }
            },
        )?,
    )?;
    crate::durable::register(lua, &t)?;
    t.set(
        "tx_finish_calls",
        lua.create_async_function(
            |lua, (handle, list): (Option<mlua::AnyUserData>, Table)| async move {
                let Some(ctx) = current_ctx(&lua) else {
                    return failure(
                        &lua,
                        "transactions may only be executed while handling a request",
                    );
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
                            Err(e) => {
                                return failure(
                                    &lua,
                                    format!("calling {target}: argument {a}: {e}"),
                                )
                            }
                        }
                    }
                    calls.push(crate::durable::DurableCall {
                        from_cage: ctx.cage.clone(),
                        cage,
                        module,
                        function,
                        args: values,
                        options,
                    });
                }
                let prepared = handle.and_then(|h| {
                    h.borrow::<TxHandle>()
                        .ok()
                        .and_then(|h| h.0.borrow_mut().take())
                });
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
            },
        )?,
    )?;
    t.set(
        "call_cage",
        lua.create_async_function(
            |lua, (cage, module, function, opts, args): (String, String, String, Option<Table>, Variadic<LuaValue>)| async move {
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
                if let Some(options) = durable {
                    let call = crate::durable::DurableCall { from_cage: ctx.cage.clone(), cage, module, function, args: values, options };
                    return match crate::durable::enqueue(call).await {
                        Ok(id) => Ok(success([LuaValue::String(lua.create_string(&id)?)])),
                        Err(e) => failure(&lua, e),
                    };
                }
                let request = CallRequest {
                    from_cage: ctx.cage.clone(),
                    request_id: ctx.id.clone(),
                    deadline: ctx.deadline,
                    cage,
                    module,
                    function,
                    args: values,
                };
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
            },
        )?,
    )?;
    Ok(t)
}

/// A future that is pending once (having woken its task), then ready: one turn for the other
/// tasks of the worker, which the request future counts as the end of a time slice.
#[derive(Default)]
pub(crate) struct YieldOnce(bool);

impl std::future::Future for YieldOnce {
    type Output = ();
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        if self.0 {
            return std::task::Poll::Ready(());
        }
        self.0 = true;
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    }
}

/// The Rust side of the sandbox rules of the prelude.
fn register_sandbox(lua: &Lua, t: &Table) -> mlua::Result<()> {
    // Weak: the VM owns these functions, and they must not keep its shared state alive.
    let weak = shared_of(lua).map(|s| Rc::downgrade(&s)).unwrap_or_default();
    // Whether an error on its way up is a stop that pcall and friends must pass on.
    let w = weak.clone();
    t.set(
        "stopping",
        lua.create_function(move |_, ()| Ok(w.upgrade().is_some_and(|s| s.stopping.get() || s.closing.get())))?,
    )?;
    // The request coroutine that has just started (the watchdog's signal must reach it); called
    // by every request, so it looks nothing up.
    t.set(
        "started",
        lua.create_function(move |lua, ()| {
            if let Some(shared) = weak.upgrade() {
                let state = lua.exec_raw_lua(|raw| raw.state());
                shared.started.set(state);
                crate::watchdog::switch(state);
            }
            Ok(())
        })?,
    )?;
    // co_enter(co) -> depth, co_leave(depth): module code resumes one of its coroutines.
    t.set(
        "co_enter",
        lua.create_function(|lua, co: mlua::Thread| {
            let Some(shared) = shared_of(lua) else {
                return Ok(0);
            };
            let previous = crate::watchdog::switch(co.state());
            let mut nested = shared.nested.borrow_mut();
            nested.push((co, previous));
            Ok(nested.len())
        })?,
    )?;
    t.set(
        "co_leave",
        lua.create_function(|lua, depth: usize| {
            let Some(shared) = shared_of(lua) else {
                return Ok(());
            };
            let mut nested = shared.nested.borrow_mut();
            while nested.len() >= depth.max(1) {
                match nested.pop() {
                    Some((_, previous)) => {
                        crate::watchdog::switch(previous);
                    }
                    None => break,
                }
            }
            Ok(())
        })?,
    )?;
    // find_library(name, env) -> true, chunk, file | false, message: `require` (libraries.rs).
    t.set(
        "find_library",
        lua.create_function(|lua, (name, env): (String, Table)| {
            let Some(shared) = shared_of(lua) else { return failure(lua, "require is not available here") };
            let loading = shared.loading.borrow().clone();
            match crate::libraries::load(lua, &shared.limits.libraries, &name, env, loading.as_deref().map(|m| (shared.cage.as_str(), m))) {
                Ok((f, _, display)) => Ok(success([LuaValue::Function(f), LuaValue::String(lua.create_string(&display)?)])),
                Err(m) => failure(lua, m),
            }
        })?,
    )?;
    t.set(
        "yield_slice",
        lua.create_async_function(|_, ()| async {
            YieldOnce(false).await;
            Ok(())
        })?,
    )?;
    // sortable(t): may Lua's C sort take this table? Only plain arrays (no metatable) of numbers
    // only or strings only, small enough to sort within a few milliseconds: then no Lua code
    // runs inside the sort.
    t.set(
        "sortable",
        lua.create_function(|_, t: Table| {
            if t.metatable().is_some() {
                return Ok(false);
            }
            let n = t.raw_len();
            if n > C_SORT_MAX {
                return Ok(false);
            }
            let mut kind = 0u8;
            for i in 1..=n {
                let k = match t.raw_get::<LuaValue>(i)? {
                    LuaValue::Integer(_) | LuaValue::Number(_) => 1,
                    LuaValue::String(_) => 2,
                    _ => return Ok(false),
                };
                if kind != 0 && k != kind {
                    return Ok(false);
                }
                kind = k;
            }
            Ok(true)
        })?,
    )?;
    // os.getenv: only the names the cage's [lua] getenv list allows.
    t.set(
        "getenv",
        lua.create_function(|lua, name: String| {
            let Some(shared) = shared_of(lua) else {
                return Ok(None);
            };
            if !shared.limits.may_read_env(&name) {
                return Ok(None);
            }
            Ok(std::env::var(&name).ok())
        })?,
    )?;
    Ok(())
}
