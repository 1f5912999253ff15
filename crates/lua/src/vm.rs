//! One Lua VM of one cage on one worker thread: the pmnc API, module versions, and requests run
//! as coroutines that are time-sliced by an instruction hook and stopped at their deadline.

use std::cell::Cell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use mlua::{ffi, Function, HookTriggers, Lua, LuaOptions, MultiValue, StdLib, Table, Value as LuaValue, VmState};
use rustomnic_core::Value;

use crate::convert::{from_lua, to_lua_all};
use crate::limits::LuaLimits;
use crate::module::CompiledModule;
use crate::request::{error_text, RequestCtx, RequestFuture, RunError, VmShared};
use crate::strings::Running;

/// Instructions between two hook calls once the watchdog has armed a coroutine's hook (its code
/// ran past the watchdog's first look). The hook reads the clock, so this bounds both the
/// overhead (one clock read per this many instructions) and how late the slice's end or the
/// deadline is seen; the watchdog signals again for code whose instructions are slow.
pub(crate) const HOOK_EVERY: i32 = 4000;
/// How long a module's top-level code may run when it is loaded: every worker runs it too, and
/// nothing can yield meanwhile.
pub const LOAD_TIMEOUT: Duration = Duration::from_millis(500);

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
    /// The module fields that requests start from, as last found (see [`CageVm::field`]).
    fields: std::cell::RefCell<Vec<Found>>,
    /// `modules` in the registry, for the checks of `fields` through the C API.
    modules_key: mlua::RegistryKey,
}

/// A module's field as found for an earlier request: its value, kept to be handed out again
/// while `modules[module][field]` is still that value. The names and the value are also kept in
/// the registry so that the check needs neither a string made nor a handle taken.
struct Found {
    module: Box<str>,
    field: Box<str>,
    value: LuaValue,
    module_key: mlua::RegistryKey,
    field_key: mlua::RegistryKey,
    value_key: mlua::RegistryKey,
}

/// How many fields [`CageVm::field`] keeps: the handlers of a cage's interfaces and the targets
/// of its calls are few; past this, lookups go the long way.
const FIELDS_KEPT: usize = 32;
/// Finished coroutines a VM keeps for reuse (each about 1 KB; more in flight at once are made
/// anew and collected as before).
const COROUTINES_KEPT: usize = 128;

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
        let libs = StdLib::COROUTINE | StdLib::TABLE | StdLib::STRING | StdLib::UTF8 | StdLib::MATH | StdLib::OS;
        // The debug library is loaded only so the prelude can keep `debug.traceback`; the prelude
        // removes `debug` before any module runs. No C modules or `package` are ever loaded.
        // Finished coroutines are kept for the next requests (reset by lua_closethread, which
        // closes what the last one left open and shrinks its stack): without a pool each request
        // made a new Lua thread and left the old one to the collector (decision 160).
        let options = LuaOptions::default().thread_pool_size(COROUTINES_KEPT);
        let lua = unsafe { Lua::unsafe_new_with(libs | StdLib::DEBUG, options) };
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
            collected_at: Cell::new(0),
            budget: Cell::new(Default::default()),
            loading: Default::default(),
            live: Cell::new(0),
            wake_at: Cell::new(None),
            parallel_live: Default::default(),
        });
        // Requests make many short-lived tables and strings; the generational collector
        // reclaims them young instead of re-marking the whole heap in every cycle.
        lua.gc_set_mode(mlua::state::GcMode::Generational(mlua::state::GcGenParams::default()));
        lua.set_app_data(shared.clone());
        install_hook(&lua, shared.clone())?;
        let modules = lua.create_table()?;
        let rust = crate::api::register(&lua, cage)?;
        let (_pmnc, run, _resolve, failure_mt, new_env): (Table, Function, Function, Table, Function) =
            lua.load(&prelude_bytecode()[..]).set_name("=pmnc").set_mode(mlua::chunk::ChunkMode::Binary).call((rust, modules.clone()))?;
        lua.gc_collect()?;
        shared.collected_at.set(lua.used_memory());
        let modules_key = lua.create_registry_value(modules.clone())?;
        Ok(CageVm { lua, shared, modules, run, failure_mt, new_env, helpers: Default::default(), fields: Default::default(), modules_key })
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
        self.modules.raw_set(module.name.as_str(), &table).map_err(|e| format!("{}: {e}", module.display))?;
        // Not needed for correctness (a kept field is checked before each use), but the old
        // version's functions need not stay alive through the kept values.
        self.fields.borrow_mut().clear();
        Ok(public_functions(&table))
    }

    /// Runs a module's top-level code without installing it: the check a new version passes
    /// before any worker sees it.
    pub fn check_module(&self, module: &CompiledModule) -> Result<Vec<String>, String> {
        self.check_module_with(module, &|_| Ok(()))
    }

    /// Like [`check_module`](Self::check_module), with a further check of the module's table
    /// (what an interface reads from it); its error is the module's, prefixed with its file.
    pub fn check_module_with(&self, module: &CompiledModule, check: &dyn Fn(&Table) -> Result<(), String>) -> Result<Vec<String>, String> {
        let table = self.load(module)?;
        check(&table).map_err(|e| format!("{}: {e}", module.display))?;
        Ok(public_functions(&table))
    }

    fn load(&self, module: &CompiledModule) -> Result<Table, String> {
        let env: Table = self.new_env.call(()).map_err(|e| format!("{}: {e}", module.display))?;
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
            Ok(other) => Err(format!("{}: a module must return a table, this one returned {}", module.display, other.type_name())),
            // mlua appends a traceback to errors of a plain call; at load time the message
            // already names file and line, and the traceback would read as extra problems.
            Err(e) => {
                let text = error_text(&LuaValue::Error(Box::new(e)));
                let text = match text.rfind("\nstack traceback:\n") {
                    Some(at) => text[..at].to_string(),
                    None => text,
                };
                // Errors raised by the runtime (a limit) carry no position: name the file.
                Err(if text.starts_with(&module.display) { text } else { format!("{}: {text}", module.display) })
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
        let f: Function =
            self.lua.load(source).set_name(format!("@pmnc/{name}.lua")).call(()).map_err(|e| RunError::Internal(format!("helper {name}: {e}")))?;
        self.helpers.borrow_mut().insert(name, f.clone());
        Ok(f)
    }

    /// Forgets a module (its file was deleted and nothing replaces it).
    pub fn remove(&self, name: &str) {
        let _ = self.modules.raw_set(name, LuaValue::Nil);
        self.fields.borrow_mut().clear();
    }

    pub fn has_module(&self, name: &str) -> bool {
        matches!(self.modules.raw_get::<LuaValue>(name), Ok(LuaValue::Table(_)))
    }

    /// The current version of a public module function.
    pub fn function(&self, module: &str, function: &str) -> Result<Function, RunError> {
        let cage = self.cage();
        if function.starts_with('_') {
            return Err(RunError::NotFound(format!("cage {cage}: {module}.{function} is private (names starting with _ cannot be called through pmnc)")));
        }
        match self.field(module, function) {
            Some(LuaValue::Function(f)) => Ok(f),
            Some(LuaValue::Table(_)) | None if !self.has_module(module) => {
                Err(RunError::NotFound(format!("cage {cage} has no module {module} (calling {module}.{function})")))
            }
            _ => Err(RunError::NotFound(format!("cage {cage}: module {module} has no function {function}"))),
        }
    }

    /// A public field of a module, whatever its type: what an interface's `handler` names when
    /// it may be a function or a table (the http interface's route tables).
    pub fn module_field(&self, module: &str, field: &str) -> Result<LuaValue, RunError> {
        let cage = self.cage();
        if field.starts_with('_') {
            return Err(RunError::NotFound(format!("cage {cage}: {module}.{field} is private (names starting with _ cannot be called through pmnc)")));
        }
        match self.field(module, field) {
            Some(v) => Ok(v),
            None if !self.has_module(module) => Err(RunError::NotFound(format!("cage {cage} has no module {module} (calling {module}.{field})"))),
            None => Err(RunError::NotFound(format!("cage {cage}: module {module} has no function {field}"))),
        }
    }

    /// `modules[module][field]` when the module is there and the field is not nil. Every
    /// request starts by finding its handler, and two lookups through mlua (a string made for
    /// each name, a handle taken for each result) were about 2,200 instructions of it; a field
    /// found before is checked to be still the same value through the C API instead (about a
    /// tenth of that) and handed out again. The check is made on every use, so a module
    /// reloaded, removed or changing its own table at run time is seen at once.
    fn field(&self, module: &str, field: &str) -> Option<LuaValue> {
        {
            let fields = self.fields.borrow();
            if let Some(found) = fields.iter().find(|f| &*f.module == module && &*f.field == field) {
                if self.still(found) {
                    return Some(found.value.clone());
                }
            }
        }
        let m = match self.modules.raw_get::<LuaValue>(module) {
            Ok(LuaValue::Table(t)) => t,
            _ => return None,
        };
        let value = match m.raw_get::<LuaValue>(field) {
            Ok(LuaValue::Nil) | Err(_) => return None,
            Ok(v) => v,
        };
        if matches!(value, LuaValue::Function(_) | LuaValue::Table(_)) {
            self.keep(module, field, &value);
        }
        Some(value)
    }

    /// Keeps `value` as `modules[module][field]` (replacing what was kept for those names).
    fn keep(&self, module: &str, field: &str, value: &LuaValue) {
        let lua = &self.lua;
        let made = (|| {
            Ok::<_, mlua::Error>(Found {
                module: module.into(),
                field: field.into(),
                value: value.clone(),
                module_key: lua.create_registry_value(lua.create_string(module)?)?,
                field_key: lua.create_registry_value(lua.create_string(field)?)?,
                value_key: lua.create_registry_value(value.clone())?,
            })
        })();
        let Ok(found) = made else { return };
        let mut fields = self.fields.borrow_mut();
        fields.retain(|f| !(&*f.module == module && &*f.field == field));
        if fields.len() < FIELDS_KEPT {
            fields.push(found);
        }
    }

    /// Whether `modules[found.module][found.field]` is still `found`'s value.
    fn still(&self, found: &Found) -> bool {
        let ids = [self.modules_key.id(), found.module_key.id(), found.field_key.id(), found.value_key.id()];
        self.lua.exec_raw_lua(|raw| {
            let state = raw.state();
            // SAFETY: unprotected calls on the running state, each of which cannot raise an
            // error or run Lua code: `lua_checkstack` reports a failure instead of raising,
            // `lua_rawgeti` on the registry and `lua_rawget` on tables read without
            // metamethods and allocate nothing (the keys are strings already made), and
            // `lua_rawequal` compares without metamethods. The four registry slots are held by
            // live keys of this VM. The stack is put back to where it was (nothing pushed here
            // is to-be-closed), so the running code sees no change.
            unsafe {
                if ffi::lua_checkstack(state, 4) == 0 {
                    return false;
                }
                let top = ffi::lua_gettop(state);
                ffi::lua_rawgeti(state, ffi::LUA_REGISTRYINDEX, ffi::lua_Integer::from(ids[0]));
                ffi::lua_rawgeti(state, ffi::LUA_REGISTRYINDEX, ffi::lua_Integer::from(ids[1]));
                let same = ffi::lua_rawget(state, -2) == ffi::LUA_TTABLE && {
                    ffi::lua_rawgeti(state, ffi::LUA_REGISTRYINDEX, ffi::lua_Integer::from(ids[2]));
                    ffi::lua_rawget(state, -2);
                    ffi::lua_rawgeti(state, ffi::LUA_REGISTRYINDEX, ffi::lua_Integer::from(ids[3]));
                    ffi::lua_rawequal(state, -1, -2) != 0
                };
                ffi::lua_settop(state, top);
                same
            }
        })
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
        let f = self.function(module, function).inspect_err(|e| crate::metrics::not_started(&ctx, e))?;
        self.start_function(ctx, f, build)
    }

    /// Like [`start`](Self::start) with a function value (a test, a callback).
    ///
    /// `build` may make its arguments as a tuple (`(request, response)`): a tuple is pushed onto
    /// the coroutine's stack as it is, where a `MultiValue` is a list allocated first.
    pub fn start_function<A: mlua::IntoLuaMulti>(
        &self,
        ctx: RequestCtx,
        f: Function,
        build: impl FnOnce(&Lua) -> mlua::Result<A>,
    ) -> Result<RequestFuture, RunError> {
        let internal = |e: mlua::Error| RunError::Internal(e.to_string());
        let args = build(&self.lua).map_err(internal)?;
        // The runner takes the handler, then its arguments: pushed onto the stack one after
        // another, without a second list of them.
        let inner = self.run.call_async::<MultiValue>((f, args));
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
            recording: Some(recording),
            branch: false,
        })
    }

    /// Calls `module.function` with values from outside this VM (another cage, the wire).
    pub async fn call(&self, ctx: RequestCtx, module: &str, function: &str, args: Vec<Value>) -> Result<Vec<Value>, RunError> {
        self.call_with(ctx, module, function, |lua| to_lua_all(lua, &args)).await
    }

    /// Like [`call`](Self::call), with arguments that `build` makes in the VM: a consumer makes
    /// its message's table straight from the message, without the value model in between.
    pub async fn call_with(
        &self,
        ctx: RequestCtx,
        module: &str,
        function: &str,
        build: impl FnOnce(&Lua) -> mlua::Result<MultiValue>,
    ) -> Result<Vec<Value>, RunError> {
        let fut = self.start(ctx, module, function, build)?;
        let ctx = fut.ctx.clone();
        let result = fut.await;
        if let Err(e @ RunError::Failed { .. }) = &result {
            tracing::warn!(cage = %self.cage(), request = %ctx.id, "{module}.{function} failed: {}", e.log_text());
        }
        let values = result?;
        values
            .iter()
            .map(|v| from_lua(v).map_err(|e| RunError::Failed { message: format!("{module}.{function} returned {e}"), traceback: String::new() }))
            .collect()
    }
}

/// A non-empty table whose keys all read as routes: "/path" or "METHOD /path".
fn is_route_table(t: &Table) -> bool {
    let mut any = false;
    for pair in t.pairs::<LuaValue, LuaValue>() {
        let Ok((LuaValue::String(k), LuaValue::Function(_))) = pair else { return false };
        let k = k.as_bytes();
        let path = match k.iter().position(|&b| b == b' ') {
            Some(i) => &k[i + 1..],
            None => &k[..],
        };
        if !path.starts_with(b"/") {
            return false;
        }
        any = true;
    }
    any
}

fn public_functions(t: &Table) -> Vec<String> {
    let mut names: Vec<String> = t
        .pairs::<LuaValue, LuaValue>()
        .filter_map(|p| p.ok())
        .filter_map(|(k, v)| match (k, v) {
            (LuaValue::String(s), LuaValue::Function(_)) => Some(s.to_string_lossy()),
            // A route table (`M.routes = {["GET /x"] = f}`) is what an http interface's handler
            // may name instead of a function.
            (LuaValue::String(s), LuaValue::Table(t)) if is_route_table(&t) => Some(s.to_string_lossy()),
            _ => None,
        })
        .filter(|n| !n.starts_with('_'))
        .collect();
    names.sort();
    names
}

/// The hook behind preemption and deadlines. No thread runs it until the watchdog's signal (or a
/// stop of the request) arms it on the coroutine running Lua (watchdog.rs); from then it runs
/// every [`HOOK_EVERY`] instructions of that coroutine until the slice ends, where it takes
/// itself off and yields.
fn install_hook(lua: &Lua, shared: Rc<VmShared>) -> mlua::Result<()> {
    let callback = move |lua: &Lua, debug: &mlua::debug::Debug| {
        let state = lua.exec_raw_lua(|raw| raw.state());
        if !crate::watchdog::armed_here() {
            // Armed in an earlier section of this coroutine, which then waited for a Rust call:
            // a fresh slice runs unhooked.
            // SAFETY: `state` is the thread running this hook.
            unsafe { crate::watchdog::disarm(state) };
            return Ok(VmState::Continue);
        }
        // Keeps the hook coming back every HOOK_EVERY instructions while this slice lasts.
        // SAFETY: `state` is the thread running this hook.
        let keep = || unsafe {
            if ffi::lua_gethookcount(state) != HOOK_EVERY {
                crate::watchdog::arm(state, HOOK_EVERY);
            }
        };
        shared.check_budget(lua);
        let now = Instant::now();
        match shared.check_running(now) {
            Running::Go => {
                keep();
                Ok(VmState::Continue)
            }
            Running::Stop(m) => {
                // Every later hook call raises it again (to-be-closed handlers, pcall in a loop).
                keep();
                shared.stopping.set(true);
                Err(mlua::Error::runtime(m))
            }
            Running::SliceOver { slice_start, past_deadline } => {
                // SAFETY: `state` is the thread running this hook.
                if unsafe { ffi::lua_isyieldable(state) } != 0 {
                    if in_async_wrapper(debug) {
                        // mlua's wrapper of an async function has polled its future and is about
                        // to yield "pending": a yield here would let the future's wake-up arrive
                        // while nothing listens for it, and the request would never be polled
                        // again. Try again at the next instruction, which is soon outside.
                        // SAFETY: as above.
                        unsafe { crate::watchdog::arm(state, 1) };
                        return Ok(VmState::Continue);
                    }
                    // In a coroutine that module code created, the yield reaches the prelude's
                    // coroutine.resume, which sees this mark and passes the yield on upwards.
                    if let Ok(marks) = lua.named_registry_value::<Table>(HOOK_YIELDS) {
                        let _ = marks.raw_set(lua.current_thread(), true);
                    }
                    // Off before the yield, so the next slice starts unhooked (mlua then tells
                    // this yield from a coroutine's own by its frames).
                    // SAFETY: as above.
                    unsafe { crate::watchdog::disarm(state) };
                    return Ok(VmState::Yield);
                }
                keep();
                // Here nothing can yield (Lua called by C code): stop at the deadline, and stop
                // code that keeps the worker from its other tasks for too long.
                if past_deadline {
                    return Err(mlua::Error::runtime(shared.stop(format!("request {} passed its deadline", shared.request_id()))));
                }
                let ran = now.duration_since(slice_start);
                if ran >= shared.limits.unyielding {
                    return Err(mlua::Error::runtime(shared.stop(crate::strings::unyielding_message("Lua code", ran, shared.limits.unyielding))));
                }
                Ok(VmState::Continue)
            }
        }
    };
    // mlua's C hook function is one for all VMs and not public: installed once with a count
    // trigger, read back for the watchdog, then replaced by no trigger at all, so no thread
    // (the main one, or any mlua makes later) runs a hook until armed.
    lua.set_global_hook(HookTriggers::new().every_nth_instruction(HOOK_EVERY as u32), callback.clone())?;
    let main = lua.exec_raw_lua(|raw| raw.state());
    // SAFETY: reads the hook of the VM's main thread, which is not running.
    crate::watchdog::set_hook_function(unsafe { ffi::lua_gethook(main) });
    lua.set_global_hook(HookTriggers::new(), callback)
}

/// Is the hook running in mlua's Lua wrapper of an async Rust function?
fn in_async_wrapper(debug: &mlua::debug::Debug) -> bool {
    matches!(debug.source().source.as_deref(), Some("=__mlua_async_poll"))
}

/// Registry key of the weak-keyed set of coroutines the hook suspended at the end of a time
/// slice (see the prelude's `coroutine.resume`).
pub(crate) const HOOK_YIELDS: &str = "rustomnic.hook_yields";
