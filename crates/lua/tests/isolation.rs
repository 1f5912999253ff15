//! Hostile module code against one VM on one thread: each case must end with a clear error (or
//! at its deadline) while a quick request on the same thread is served meanwhile, and must leave
//! the VM usable. These are the attacks of docs/decisions/004-lua-sandbox.md, kept as tests.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::cell::RefCell;
use std::path::Path;
use std::rc::Rc;
use std::time::Duration;

use rustomnic_core::Value;
use rustomnic_lua::{compile, CageVm, CompiledModule, LuaLimits, RequestCtx, RunError};

fn module(name: &str, source: &str) -> CompiledModule {
    let display = format!("test/{name}.lua");
    let bytecode = compile(name, Path::new(&display), &display, source.as_bytes()).unwrap();
    CompiledModule { name: name.into(), path: display.clone().into(), display, bytecode, functions: vec![], version: 1, source_hash: 0 }
}

fn on_one_thread<F: std::future::Future<Output = ()>>(f: F) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    tokio::task::LocalSet::new().block_on(&rt, f);
}

async fn call(vm: &CageVm, f: &str, timeout: Duration) -> Result<Vec<Value>, RunError> {
    vm.call(RequestCtx::new(vm.cage(), "test", timeout), "h", f, vec![]).await
}

/// Runs `h.<hostile>` and, once it has started, `h.quick`; returns the order in which they ended
/// and the hostile call's result.
async fn race(vm: Rc<CageVm>, hostile: &'static str, timeout: Duration) -> (Vec<&'static str>, Result<Vec<Value>, RunError>) {
    let order = Rc::new(RefCell::new(Vec::new()));
    let (o, v) = (order.clone(), vm.clone());
    let slow = tokio::task::spawn_local(async move {
        let r = call(&v, hostile, timeout).await;
        o.borrow_mut().push("hostile");
        r
    });
    // Let the hostile request start first.
    for _ in 0..3 {
        tokio::task::yield_now().await;
    }
    let (o, v) = (order.clone(), vm.clone());
    let quick = tokio::task::spawn_local(async move {
        let r = call(&v, "quick", Duration::from_secs(30)).await;
        o.borrow_mut().push("quick");
        r
    });
    assert_eq!(quick.await.unwrap().unwrap(), vec![Value::Str(b"quick".to_vec())]);
    let r = slow.await.unwrap();
    let order = order.borrow().clone();
    (order, r)
}

const HOSTILE: &str = r#"
local M = {}
function M.quick() return "quick" end
local function loop() while true do end end
function M.close_loop()
  local x <close> = setmetatable({}, { __close = loop })
  while true do end
end
function M.gc_function() setmetatable({}, { __gc = loop }) collectgarbage("collect") return "x" end
function M.gc_placeholder()
  local mt = { __gc = true }
  setmetatable({}, mt)
  mt.__gc = loop
  return "x"
end
function M.sort_loop() table.sort({ 3, 2, 1 }, function(a, b) while true do end end) end
function M.gsub_loop() return (("abc"):gsub(".", function() while true do end end)) end
function M.error_tostring_loop() error(setmetatable({}, { __tostring = loop })) end
function M.format_tostring_loop() return string.format("%s", setmetatable({}, { __tostring = loop })) end
function M.concat_index_loop()
  return table.concat(setmetatable({}, { __index = function() while true do end end, __len = function() return 2 end }))
end
function M.pcall_format_loop()
  local evil = setmetatable({}, { __tostring = loop })
  while true do pcall(string.format, "%s", evil) end
end
function M.pattern_redos() return tostring(("x"):rep(1e7):find(".-y")) end
function M.pattern_backtracking() return tostring(string.find(("a"):rep(29), ("a?"):rep(29) .. ("a"):rep(29))) end
function M.huge_move() table.move({}, 1, math.maxinteger - 1, 2) return "moved" end
function M.gsub_growth() return (("x"):rep(1e6):gsub("x", ("y"):rep(1e6))) end
function M.repeated_value()
  local s = ("x"):rep(1e7)
  local t = {}
  for i = 1, 1000 do t[i] = s end
  return pmnc.json.encode(t)
end
function M.c_heavy_loop() for i = 1, 100 do local s = string.rep("ab", 5e6):gsub("a", "b") end return "done" end
function M.slow_instructions()
  local a, b = ("x"):rep(2e7), ("x"):rep(2e7)
  local n = 0
  while true do if a == b then n = n + 1 end end
end
function M.slow_instructions_in_a_coroutine()
  local a, b = ("x"):rep(2e7), ("x"):rep(2e7)
  coroutine.wrap(function() while true do local _ = a == b end end)()
end
function M.spin() while true do end end
-- Runs past a slice (the watchdog arms this coroutine's hook), makes a coroutine while armed (it
-- inherits the hook), waits in a Rust call (the arming is left over), then loops in it forever.
function M.loop_after_an_armed_slice()
  local t = os.clock()
  while os.clock() - t < 0.01 do end
  local co = coroutine.wrap(function() while true do end end)
  pmnc.sleep(0)
  co()
end
function M.memory_bomb()
  local t = {}
  for i = 1, 1e9 do t[i] = string.rep("x", 1000) .. i end
end
function M.size() return collectgarbage("count") end
function M.json_big()
  local s = "[" .. string.rep('{"a":1,"b":"xyz","c":[true,null]},', 150000) .. "0]"
  local n = 0
  for i = 1, 3 do n = n + #pmnc.json.decode(s) end
  local again = pmnc.json.decode(pmnc.json.encode(pmnc.json.decode(s)))
  local last = again[150000]
  return n .. " " .. last.b .. " " .. tostring(last.c[2] == pmnc.json.null) .. " " .. tostring(again[150001])
end
return M
"#;

fn hostile_vm(limits: LuaLimits) -> Rc<CageVm> {
    let vm = CageVm::with_limits("iso", limits).unwrap();
    vm.install(&module("h", HOSTILE)).unwrap();
    Rc::new(vm)
}

fn failed_with(r: &Result<Vec<Value>, RunError>, text: &str) -> bool {
    matches!(r, Err(RunError::Failed { message, .. }) if message.contains(text))
}

#[test]
fn loops_in_lua_called_from_c_are_time_sliced_or_stopped() {
    on_one_thread(async {
        let vm = hostile_vm(LuaLimits { unyielding: Duration::from_millis(30), ..Default::default() });
        // Made yieldable: sliced like any code, stopped at the deadline.
        for hostile in ["sort_loop", "gsub_loop", "error_tostring_loop", "close_loop"] {
            let (order, r) = race(vm.clone(), hostile, Duration::from_millis(400)).await;
            assert_eq!(order, ["quick", "hostile"], "{hostile}: the quick request waited");
            assert_eq!(r, Err(RunError::Deadline), "{hostile}");
        }
        // Run by C code where nothing can yield: stopped after the unyielding limit, with an error
        // that says so, long before the deadline; pcall cannot swallow it.
        // (The quick request waits those 30 ms: nothing can yield there.)
        for hostile in ["format_tostring_loop", "concat_index_loop", "pcall_format_loop"] {
            let (_, r) = race(vm.clone(), hostile, Duration::from_secs(60)).await;
            assert!(failed_with(&r, "without a chance to yield"), "{hostile}: {r:?}");
            assert!(failed_with(&r, "unyielding_limit is 30 ms"), "{hostile}: {r:?}");
        }
        assert_eq!(call(&vm, "quick", Duration::from_secs(5)).await.unwrap(), vec![Value::Str(b"quick".to_vec())]);
    });
}

#[test]
fn finalizers_are_refused() {
    on_one_thread(async {
        let vm = hostile_vm(LuaLimits::default());
        for hostile in ["gc_function", "gc_placeholder"] {
            let r = call(&vm, hostile, Duration::from_secs(5)).await;
            assert!(failed_with(&r, "__gc metamethods are not available to module code"), "{hostile}: {r:?}");
            assert!(failed_with(&r, "test/h.lua:"), "the error names the line: {r:?}");
        }
    });
}

#[test]
fn patterns_and_c_heavy_loops_yield_and_end_at_the_deadline() {
    on_one_thread(async {
        let vm = hostile_vm(LuaLimits::default());
        for hostile in ["pattern_redos", "pattern_backtracking", "c_heavy_loop", "huge_move"] {
            let (order, r) = race(vm.clone(), hostile, Duration::from_millis(500)).await;
            assert_eq!(order, ["quick", "hostile"], "{hostile}: the quick request waited");
            assert_eq!(r, Err(RunError::Deadline), "{hostile}");
        }
    });
}

#[test]
fn big_json_is_parsed_and_printed_off_the_worker() {
    on_one_thread(async {
        let vm = hostile_vm(LuaLimits { request_memory: 512 << 20, memory: 1 << 30, ..Default::default() });
        // Quick requests one after another while the big one runs: decoded inline, each of the
        // four parses would hold the thread for its whole length (a handful of quick requests
        // would get through, between parses); off the worker, they keep getting through.
        let v = vm.clone();
        let big = tokio::task::spawn_local(async move { call(&v, "json_big", Duration::from_secs(120)).await });
        let mut quick = 0;
        while !big.is_finished() {
            assert_eq!(call(&vm, "quick", Duration::from_secs(30)).await.unwrap(), vec![Value::Str(b"quick".to_vec())]);
            quick += 1;
            tokio::task::yield_now().await;
        }
        assert_eq!(big.await.unwrap(), Ok(vec![Value::Str(b"450003 xyz true 0".to_vec())]));
        eprintln!("{quick} quick requests answered meanwhile");
        assert!(quick >= 100, "only {quick} quick requests were answered while the big JSON was handled");
    });
}

#[test]
fn results_built_outside_lua_are_bounded_like_lua_memory() {
    on_one_thread(async {
        let vm = hostile_vm(LuaLimits { request_memory: 64 << 20, ..Default::default() });
        let r = call(&vm, "gsub_growth", Duration::from_secs(30)).await;
        assert!(failed_with(&r, "not enough memory: the result of string.gsub would be over the request's limit of 64 MiB"), "{r:?}");
        let r = call(&vm, "repeated_value", Duration::from_secs(30)).await;
        assert!(failed_with(&r, "would take more than 64 MiB"), "{r:?}");
    });
}

#[test]
fn slow_single_instructions_are_preempted_by_the_watchdog() {
    if !rustomnic_lua::watchdog::can_arm() {
        // calibrate runs when the first VM is made
        let _ = CageVm::new("probe");
    }
    assert!(rustomnic_lua::watchdog::can_arm(), "the hook counter of this Lua build was not found");
    on_one_thread(async {
        let vm = hostile_vm(LuaLimits::default());
        // Each comparison of two 20 MB strings takes milliseconds: 4000 of them between two
        // count-hook calls would hold the thread far past the deadline.
        for hostile in ["slow_instructions", "slow_instructions_in_a_coroutine"] {
            let (order, r) = race(vm.clone(), hostile, Duration::from_secs(3)).await;
            assert_eq!(order, ["quick", "hostile"], "{hostile}: the quick request waited for the deadline");
            assert_eq!(r, Err(RunError::Deadline), "{hostile}");
        }
    });
}

#[test]
fn a_loop_after_an_armed_slice_and_a_wait_is_still_preempted() {
    // The hook is armed only while a slice runs long and takes itself off at a yield; one left
    // on a coroutine that then waited is taken off at its first call, and the loop after it must
    // be armed again by the watchdog.
    on_one_thread(async {
        let vm = hostile_vm(LuaLimits::default());
        for _ in 0..5 {
            let (order, r) = race(vm.clone(), "loop_after_an_armed_slice", Duration::from_millis(300)).await;
            assert_eq!(order, ["quick", "hostile"], "the quick request waited for the deadline");
            assert_eq!(r, Err(RunError::Deadline));
        }
    });
}

#[test]
fn module_coroutines_nest_as_deep_as_in_plain_lua() {
    // The prelude's coroutine.resume adds no C level of its own: Lua's limit of 200 nested C
    // calls allows about 197 nested resumes, as in plain Lua.
    on_one_thread(async {
        let vm = CageVm::new("web").unwrap();
        vm.install(&module(
            "m",
            "local M = {} local function nest(n) local co = coroutine.create(function() return nest(n + 1) end) local ok, r = coroutine.resume(co) if ok then return r end return n end function M.depth() return nest(1) end return M",
        ))
        .unwrap();
        let r = vm.call(RequestCtx::new("web", "test", Duration::from_secs(5)), "m", "depth", vec![]).await.unwrap();
        let Some(Value::Int(depth)) = r.first() else { panic!("{r:?}") };
        assert!((180..=200).contains(depth), "nested resumes reached {depth}");
    });
}

#[test]
fn a_memory_bomb_fails_its_request_and_the_memory_comes_back() {
    on_one_thread(async {
        let limits = LuaLimits { memory: 256 << 20, request_memory: 64 << 20, ..Default::default() };
        let vm = hostile_vm(limits);
        let before = vm.memory();
        let r = call(&vm, "memory_bomb", Duration::from_secs(30)).await;
        assert!(failed_with(&r, "not enough memory: the request holds more than its limit of 64 MiB"), "{r:?}");
        assert!(vm.memory() < before + (8 << 20), "the garbage of the bomb is collected: {} bytes now, {before} before", vm.memory());
        assert_eq!(call(&vm, "quick", Duration::from_secs(5)).await.unwrap(), vec![Value::Str(b"quick".to_vec())]);
    });
}

#[test]
fn wakeups_are_not_lost_when_the_hook_fires_right_after_an_async_call() {
    // A signal storm makes the hook fire at the instruction after nearly every Rust call,
    // including inside mlua's wrapper of async functions, where a yield would lose the wake-up
    // of the future it has just polled (seen as requests that hung to their deadline).
    let me = unsafe { libc::pthread_self() } as usize;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let storm = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // SAFETY: the test thread outlives the storm (joined below).
                unsafe { libc::pthread_kill(me as libc::pthread_t, libc::SIGURG) };
                std::thread::sleep(Duration::from_micros(30));
            }
        })
    };
    on_one_thread(async {
        let vm = Rc::new(CageVm::new("w").unwrap());
        vm.install(&module(
            "m",
            "local M = {} function M.f(n) local x = 0 for i = 1, n do pmnc.sleep(0) for j = 1, 300 do x = x + j end end return x end return M",
        ))
        .unwrap();
        let calls: Vec<_> = (0..200)
            .map(|_| {
                let vm = vm.clone();
                tokio::task::spawn_local(async move { vm.call(RequestCtx::new("w", "test", Duration::from_secs(20)), "m", "f", vec![Value::Int(200)]).await })
            })
            .collect();
        for c in calls {
            assert_eq!(c.await.unwrap(), Ok(vec![Value::Int(200 * 45150)]));
        }
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    storm.join().unwrap();
}

const MODULE_A: &str = r#"
local M = {}
string.format = function() return "PWNED" end
string.trim = function(s) return (s:gsub("^%s+", ""):gsub("%s+$", "")) end
table.concat = nil
tostring = function() return "PWNED" end
_G.pmnc = {}
shared_name = "a"
function M.mine() return string.format("%d", 1), string.trim("  x  "), shared_name end
function M.attacks()
  local results = {}
  local function try(name, f) local ok, e = pcall(f) results[#results + 1] = name .. "=" .. (ok and "allowed" or "refused") end
  try("rawset_pmnc", function() rawset(real_pmnc, "log", 1) end)
  try("set_pmnc_log", function() real_pmnc.log = 1 end)
  try("set_log_info", function() real_pmnc.log.info = nil end)
  try("rawset_log", function() rawset(real_pmnc.log, "info", 1) end)
  try("rawset_module_proxy", function() rawset(real_pmnc.b, "check", 1) end)
  try("string_mt", function() getmetatable("").__index = {} end)
  try("globals_mt", function() return getmetatable(_G).__index end)
  return table_concat(results, " ")
end
return M
"#;

const MODULE_B: &str = r#"
local M = {}
function M.check()
  return ("%d"):format(1), string.format("%d", 2), tostring(3), table.concat({ "a", "b" }), type(pmnc.log.info), shared_name
end
return M
"#;

#[test]
fn what_a_module_sets_stays_in_that_module() {
    on_one_thread(async {
        let vm = CageVm::new("web").unwrap();
        // b is installed first and again after a: its functions see the library either way.
        vm.install(&module("b", MODULE_B)).unwrap();
        let a_source = MODULE_A.replace("local M = {}", "local M = {} real_pmnc = pmnc table_concat = table.concat");
        vm.install(&module("a", &a_source)).unwrap();
        let ctx = || RequestCtx::new("web", "test", Duration::from_secs(5));
        let b = vm.call(ctx(), "b", "check", vec![]).await.unwrap();
        let s = |x: &str| Value::Str(x.as_bytes().to_vec());
        assert_eq!(b, vec![s("1"), s("2"), s("3"), s("ab"), s("function"), Value::Nil]);
        let a = vm.call(ctx(), "a", "mine", vec![]).await.unwrap();
        assert_eq!(a, vec![s("PWNED"), s("x"), s("a")], "a module's own changes apply to itself");
        let attacks = vm.call(ctx(), "a", "attacks", vec![]).await.unwrap();
        assert_eq!(
            attacks,
            vec![s("rawset_pmnc=refused set_pmnc_log=refused set_log_info=refused rawset_log=refused rawset_module_proxy=refused string_mt=refused globals_mt=refused")]
        );
        let b = vm.call(ctx(), "b", "check", vec![]).await.unwrap();
        assert_eq!(b[0], s("1"), "nothing of a's attacks reached b");
    });
}

#[test]
fn load_sees_the_module_and_takes_text_only() {
    on_one_thread(async {
        let vm = CageVm::new("web").unwrap();
        vm.install(&module(
            "l",
            r#"
local M = {}
local secret = 41
answer = 42
function M.run()
  local f = load("return answer")
  local ok_fn = pcall(load, function() return nil end)
  local bin = load(string.dump and "x" or "\27Lua")
  return f(), ok_fn, bin == nil
end
return M
"#,
        ))
        .unwrap();
        let r = vm.call(RequestCtx::new("web", "test", Duration::from_secs(5)), "l", "run", vec![]).await.unwrap();
        assert_eq!(r, vec![Value::Int(42), Value::Bool(false), Value::Bool(true)]);
    });
}

#[test]
fn os_getenv_reads_only_what_the_cage_allows() {
    std::env::set_var("PMNC_TEST_ALLOWED", "yes");
    std::env::set_var("PMNC_TEST_SECRET", "no");
    on_one_thread(async {
        let limits = LuaLimits { getenv: vec!["PMNC_TEST_ALLOWED".into()], ..Default::default() };
        let vm = CageVm::with_limits("web", limits).unwrap();
        vm.install(&module(
            "e",
            "local M = {} function M.run() return os.getenv('PMNC_TEST_ALLOWED'), os.getenv('PMNC_TEST_SECRET'), os.getenv('PATH') end return M",
        ))
        .unwrap();
        let r = vm.call(RequestCtx::new("web", "test", Duration::from_secs(5)), "e", "run", vec![]).await.unwrap();
        assert_eq!(r, vec![Value::Str(b"yes".to_vec()), Value::Nil, Value::Nil]);
    });
}

#[test]
fn top_level_code_is_bounded_even_inside_library_calls() {
    let vm = CageVm::new("web").unwrap();
    for (name, source) in [
        ("redos", "local x = (\"x\"):rep(6e4):find(\".-y\") return {}"),
        ("spin", "while true do end return {}"),
        ("slow_compare", "local a, b = (\"x\"):rep(2e7), (\"x\"):rep(2e7) while true do local _ = a == b end return {}"),
    ] {
        let m = module(name, source);
        let e = vm.check_module(&m).unwrap_err();
        assert!(e.contains("module top-level code ran longer than 500 ms"), "{name}: {e}");
        assert!(e.contains(&format!("test/{name}.lua")), "{name}: the error names the file: {e}");
    }
}

#[test]
fn nested_coroutines_pass_every_suspension_up_to_the_deadline() {
    // The watchdog can make the hook suspend a coroutine right before the prelude yields it to
    // pass an earlier suspension on; that second yield was once taken for a yield of module
    // code, and `coroutine.resume` returned `true` in the middle of an endless loop.
    on_one_thread(async {
        let vm = CageVm::new("web").unwrap();
        vm.install(&module(
            "m",
            "local M = {} function M.nested() local co = coroutine.create(function() local inner = coroutine.wrap(function() while true do end end) inner() end) return coroutine.resume(co) end return M",
        ))
        .unwrap();
        for _ in 0..40 {
            let r = vm.call(RequestCtx::new("web", "test", Duration::from_millis(100)), "m", "nested", vec![]).await;
            assert_eq!(r, Err(RunError::Deadline));
        }
    });
}
