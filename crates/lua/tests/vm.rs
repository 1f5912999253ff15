//! Tests of the Lua host on a current-thread runtime: modules, late binding, deadlines, preemption.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::rc::Rc;
use std::time::{Duration, Instant};

use rustomnic_core::Value;
use rustomnic_lua::{compile, worker, CageVm, CompiledModule, RequestCtx, RunError};

fn module(name: &str, source: &str) -> CompiledModule {
    let display = format!("test/{name}.lua");
    let bytecode = compile(name, Path::new(&display), &display, source.as_bytes()).unwrap();
    CompiledModule { name: name.into(), path: display.clone().into(), display, bytecode, functions: vec![], version: 1, source_hash: 0 }
}

fn rt() -> (tokio::runtime::Runtime, tokio::task::LocalSet) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    (rt, tokio::task::LocalSet::new())
}

async fn call(vm: &CageVm, module: &str, f: &str, args: Vec<Value>, timeout: Duration) -> Result<Vec<Value>, RunError> {
    vm.call(RequestCtx::new(vm.cage(), "test", timeout), module, f, args).await
}

#[test]
fn modules_call_each_other_and_bind_late() {
    let (rt, local) = rt();
    local.block_on(&rt, async {
        let vm = CageVm::new("web").unwrap();
        vm.install(&module("util", "local M = {} function M.double(x) return x * 2 end return M")).unwrap();
        vm.install(&module("main", "local M = {} function M.go(x) return pmnc.util.double(x) end return M")).unwrap();
        let r = call(&vm, "main", "go", vec![Value::Int(21)], Duration::from_secs(5)).await.unwrap();
        assert_eq!(r, vec![Value::Int(42)]);
        vm.install(&module("util", "local M = {} function M.double(x) return x * 3 end return M")).unwrap();
        let r = call(&vm, "main", "go", vec![Value::Int(21)], Duration::from_secs(5)).await.unwrap();
        assert_eq!(r, vec![Value::Int(63)]);
    });
}

#[test]
fn a_handler_found_before_is_found_again_only_while_it_is_still_there() {
    // Interfaces find their handler on every request and the VM keeps what it found; whatever
    // changes `modules[module][field]` (a reload, a removal, the module replacing its own
    // function at run time, another module or table put there) must be seen by the next lookup.
    let (rt, local) = rt();
    local.block_on(&rt, async {
        let vm = CageVm::new("web").unwrap();
        let source = "local M = {} function M.handle() return 1 end function M.swap() M.handle = function() return 2 end end function M.drop() M.handle = nil end return M";
        vm.install(&module("app", source)).unwrap();
        let run = |f: rustomnic_lua::mlua::Function| f.call::<i64>(()).unwrap();
        assert_eq!(run(vm.function("app", "handle").unwrap()), 1);
        assert_eq!(run(vm.function("app", "handle").unwrap()), 1, "found again");
        call(&vm, "app", "swap", vec![], Duration::from_secs(5)).await.unwrap();
        assert_eq!(run(vm.function("app", "handle").unwrap()), 2, "the module replaced its function");
        call(&vm, "app", "drop", vec![], Duration::from_secs(5)).await.unwrap();
        let gone = vm.function("app", "handle");
        assert!(matches!(&gone, Err(RunError::NotFound(m)) if m.contains("module app has no function handle")), "{gone:?}");
        vm.install(&module("app", "local M = {} function M.handle() return 3 end return M")).unwrap();
        assert_eq!(run(vm.function("app", "handle").unwrap()), 3, "a reload");
        assert_eq!(run(vm.function("app", "handle").unwrap()), 3);
        vm.install(&module("app", "local M = {} M.handle = { routes = {} } return M")).unwrap();
        assert!(matches!(vm.module_field("app", "handle"), Ok(rustomnic_lua::mlua::Value::Table(_))));
        let table = vm.function("app", "handle");
        assert!(matches!(&table, Err(RunError::NotFound(m)) if m.contains("has no function handle")), "{table:?}");
        vm.remove("app");
        let removed = vm.function("app", "handle");
        assert!(matches!(&removed, Err(RunError::NotFound(m)) if m.contains("cage web has no module app")), "{removed:?}");
        // Many names looked up (more than are kept) still resolve, the kept ones and the rest.
        let many: String = (0..40).map(|i| format!("function M.f{i}() return {i} end ")).collect();
        vm.install(&module("many", &format!("local M = {{}} {many} return M"))).unwrap();
        for round in 0..2 {
            for i in 0..40 {
                assert_eq!(run(vm.function("many", &format!("f{i}")).unwrap()), i, "round {round}");
            }
        }
    });
}

#[test]
fn missing_and_private_functions_are_named() {
    let (rt, local) = rt();
    local.block_on(&rt, async {
        let vm = CageVm::new("web").unwrap();
        vm.install(&module("util", "local M = {} function M._secret() return 1 end return M")).unwrap();
        vm.install(&module("main", "local M = {} function M.a() return pmnc.util._secret() end function M.b() return pmnc.nope.x() end function M.c() return pmnc.util.missing() end return M")).unwrap();
        for (f, want) in [("a", "util._secret is private"), ("b", "cage web has no module nope"), ("c", "module util has no function missing")] {
            match call(&vm, "main", f, vec![], Duration::from_secs(5)).await {
                Err(RunError::Failed { message, traceback }) => {
                    assert!(message.contains(want), "{message}");
                    assert!(message.contains("test/main.lua:1:"), "error should point at the caller's line: {message}");
                    assert!(traceback.contains("stack traceback"), "{traceback}");
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(matches!(call(&vm, "util", "_secret", vec![], Duration::from_secs(1)).await, Err(RunError::NotFound(m)) if m.contains("private")));

        // The lookup an interface makes for its handler, straight from Rust.
        vm.install(&module("data", "local M = {} M.routes = {} M.off = false function M.go() end return M")).unwrap();
        let not_found = |r: Result<_, RunError>| match r {
            Err(RunError::NotFound(m)) => m,
            other => panic!("{:?}", other.map(|_: mlua::Value| ())),
        };
        assert!(matches!(vm.module_field("data", "go"), Ok(mlua::Value::Function(_))));
        assert!(matches!(vm.module_field("data", "routes"), Ok(mlua::Value::Table(_))));
        assert!(matches!(vm.module_field("data", "off"), Ok(mlua::Value::Boolean(false))));
        assert!(not_found(vm.module_field("nope", "go")).contains("cage web has no module nope"));
        assert!(not_found(vm.module_field("data", "missing")).contains("module data has no function missing"));
        assert!(not_found(vm.module_field("data", "_go")).contains("data._go is private"));
        assert!(vm.function("data", "go").is_ok());
        assert!(matches!(vm.function("data", "routes"), Err(RunError::NotFound(m)) if m.contains("module data has no function routes")));
        assert!(matches!(vm.function("nope", "go"), Err(RunError::NotFound(m)) if m.contains("has no module nope")));
    });
}

#[test]
fn a_module_that_fails_to_load_keeps_the_old_version() {
    let (rt, local) = rt();
    local.block_on(&rt, async {
        let vm = CageVm::new("web").unwrap();
        vm.install(&module("m", "return {f = function() return 1 end}")).unwrap();
        let e = vm.install(&module("m", "error('boom at load')")).unwrap_err();
        assert!(e.contains("test/m.lua:1: boom at load"), "{e}");
        let e = vm.install(&module("m", "return 42")).unwrap_err();
        assert!(e.contains("must return a table"), "{e}");
        let e = compile("m", Path::new("m.lua"), "test/m.lua", b"return {").unwrap_err();
        assert!(e.message.starts_with("test/m.lua:1:"), "{e}");
        let r = call(&vm, "m", "f", vec![], Duration::from_secs(5)).await.unwrap();
        assert_eq!(r, vec![Value::Int(1)]);
    });
}

#[test]
fn spinning_module_top_level_is_stopped() {
    let vm = CageVm::new("web").unwrap();
    let started = Instant::now();
    let e = vm.install(&module("m", "while true do end")).unwrap_err();
    assert!(e.contains("top-level code ran longer"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[test]
fn a_spinning_handler_is_preempted_and_stopped_at_its_deadline() {
    let (rt, local) = rt();
    local.block_on(&rt, async {
        let vm = Rc::new(CageVm::new("web").unwrap());
        vm.install(&module("m", "local M = {} function M.spin() while true do end end function M.fast() return 'ok' end return M")).unwrap();
        let spinner = {
            let vm = vm.clone();
            tokio::task::spawn_local(async move { call(&vm, "m", "spin", vec![], Duration::from_millis(600)).await })
        };
        tokio::task::yield_now().await;
        // While the spinner runs, fast requests on the same thread still complete.
        let mut worst = Duration::ZERO;
        for _ in 0..20 {
            let t = Instant::now();
            let r = call(&vm, "m", "fast", vec![], Duration::from_secs(5)).await.unwrap();
            assert_eq!(r, vec![Value::str("ok")]);
            worst = worst.max(t.elapsed());
        }
        assert!(!spinner.is_finished(), "the spinner should still be running");
        let started = Instant::now();
        let result = spinner.await.unwrap();
        assert_eq!(result, Err(RunError::Deadline));
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(worst < Duration::from_millis(200), "fast requests waited {worst:?}");
        assert_eq!(vm.live_requests(), 0);
    });
}

#[test]
fn pcall_cannot_swallow_the_deadline() {
    let (rt, local) = rt();
    local.block_on(&rt, async {
        let vm = CageVm::new("web").unwrap();
        vm.install(&module("m", "local M = {} function M.f() while true do pcall(function() while true do end end) end end return M")).unwrap();
        let r = call(&vm, "m", "f", vec![], Duration::from_millis(200)).await;
        assert_eq!(r, Err(RunError::Deadline));
    });
}

#[test]
fn sleep_and_remain_respect_the_deadline() {
    let (rt, local) = rt();
    local.block_on(&rt, async {
        let vm = CageVm::new("web").unwrap();
        vm.install(&module("m", "local M = {} function M.r() return pmnc.request.remain() end function M.s(x) pmnc.sleep(x) return pmnc.request.id end function M.bad() pmnc.sleep('x') end return M")).unwrap();
        let r = call(&vm, "m", "r", vec![], Duration::from_secs(3)).await.unwrap();
        match r[0] { Value::Float(f) => assert!(f > 2.5 && f <= 3.0, "{f}"), ref v => panic!("{v:?}") }
        let t = Instant::now();
        let r = call(&vm, "m", "s", vec![Value::Float(0.05)], Duration::from_secs(3)).await.unwrap();
        assert!(t.elapsed() >= Duration::from_millis(50));
        assert!(matches!(&r[0], Value::Str(s) if s.len() == 12));
        let t = Instant::now();
        let r = call(&vm, "m", "s", vec![Value::Int(60)], Duration::from_millis(150)).await;
        assert_eq!(r, Err(RunError::Deadline));
        assert!(t.elapsed() < Duration::from_secs(2));
        match call(&vm, "m", "bad", vec![], Duration::from_secs(1)).await {
            Err(RunError::Failed { message, .. }) => assert!(message.contains("test/m.lua:1: pmnc.sleep: seconds must be a number"), "{message}"),
            other => panic!("{other:?}"),
        }
    });
}

#[test]
fn cages_on_one_thread_call_each_other() {
    let (rt, local) = rt();
    local.block_on(&rt, async {
        let web = Rc::new(CageVm::new("web").unwrap());
        let wk = Rc::new(CageVm::new("worker").unwrap());
        wk.install(&module("work", "local M = {} function M.handle(x) return {got = x, by = pmnc.request.caller} end function M.boom() error('kaput') end function M.slow() pmnc.sleep(10) end return M")).unwrap();
        web.install(&module("h", "local M = {} function M.a() return pmnc('worker').work.handle({1, 2}) end function M.b() return pmnc('worker').work.boom() end function M.c() return pmnc('nobody').x.y() end function M.d() return pmnc('worker').work.slow() end return M")).unwrap();
        worker::install(web.clone());
        worker::install(wk.clone());
        let r = call(&web, "h", "a", vec![], Duration::from_secs(5)).await.unwrap();
        assert_eq!(r[0].get("by"), Some(&Value::str("web")));
        assert_eq!(r[0].get("got"), Some(&Value::Array(vec![Value::Int(1), Value::Int(2)])));
        match call(&web, "h", "b", vec![], Duration::from_secs(5)).await {
            Err(RunError::Failed { message, .. }) => {
                assert!(message.contains("calling worker.work.boom"), "{message}");
                assert!(message.contains("test/work.lua:1: kaput"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        match call(&web, "h", "c", vec![], Duration::from_secs(5)).await {
            Err(RunError::Failed { message, .. }) => assert!(message.contains("no cage named nobody"), "{message}"),
            other => panic!("{other:?}"),
        }
        let t = Instant::now();
        assert_eq!(call(&web, "h", "d", vec![], Duration::from_millis(200)).await, Err(RunError::Deadline));
        assert!(t.elapsed() < Duration::from_secs(2));
        worker::clear();
    });
}

#[test]
fn json_round_trip_and_errors() {
    let (rt, local) = rt();
    local.block_on(&rt, async {
        let vm = CageVm::new("web").unwrap();
        vm.install(&module(
            "j",
            r#"local M = {}
            function M.rt() local t = pmnc.json.decode('{"a":[1,null,3],"e":[]}') return pmnc.json.encode(t.e), #t.a, t.a[2] == pmnc.json.null end
            function M.bad() return pmnc.json.decode('{') end
            function M.fn() return pmnc.json.encode({f = print}) end
            return M"#,
        ))
        .unwrap();
        let r = call(&vm, "j", "rt", vec![], Duration::from_secs(1)).await.unwrap();
        assert_eq!(r, vec![Value::str("[]"), Value::Int(3), Value::Bool(true)]);
        match call(&vm, "j", "bad", vec![], Duration::from_secs(1)).await {
            Err(RunError::Failed { message, .. }) => assert!(message.contains("invalid JSON"), "{message}"),
            other => panic!("{other:?}"),
        }
        match call(&vm, "j", "fn", vec![], Duration::from_secs(1)).await {
            Err(RunError::Failed { message, .. }) => assert!(message.contains("value.f: a function cannot be converted"), "{message}"),
            other => panic!("{other:?}"),
        }
    });
}

#[test]
fn module_code_cannot_load_bytecode_or_exit() {
    let (rt, local) = rt();
    local.block_on(&rt, async {
        let vm = CageVm::new("web").unwrap();
        // string.dump exists but load refuses binary chunks.
        vm.install(&module(
            "s",
            r#"local M = {}
            function M.f() local f, e = load("\27Lua") return f == nil, os.exit == nil, debug == nil end
            return M"#,
        ))
        .unwrap();
        let r = call(&vm, "s", "f", vec![], Duration::from_secs(1)).await.unwrap();
        assert_eq!(r, vec![Value::Bool(true), Value::Bool(true), Value::Bool(true)]);
    });
}

#[test]
fn coroutines_of_module_code_are_not_disturbed_by_time_slicing() {
    let (rt, local) = rt();
    local.block_on(&rt, async {
        let vm = CageVm::new("web").unwrap();
        // A generator that computes for several time slices between its yields: if the hook
        // yielded it, the consumer would receive nothing (nil) instead of the sums.
        vm.install(&module(
            "g",
            r#"local M = {}
            function M.f()
              local gen = coroutine.wrap(function()
                for i = 1, 3 do
                  local s = 0
                  for j = 1, 3000000 do s = s + j % 7 end
                  coroutine.yield(s)
                end
              end)
              local co = coroutine.create(function(a) local s = 0 for j = 1, 2000000 do s = s + j % 3 end return a + s end)
              local ok, v = coroutine.resume(co, 1)
              return gen(), gen(), gen(), ok, v
            end
            return M"#,
        ))
        .unwrap();
        let r = call(&vm, "g", "f", vec![], Duration::from_secs(30)).await.unwrap();
        let s: i64 = (1..=3_000_000i64).map(|j| j % 7).sum();
        let s2: i64 = (1..=2_000_000i64).map(|j| j % 3).sum();
        assert_eq!(r, vec![Value::Int(s), Value::Int(s), Value::Int(s), Value::Bool(true), Value::Int(1 + s2)]);
    });
}

#[test]
fn a_coroutine_of_module_code_that_spins_is_stopped_at_the_deadline() {
    let (rt, local) = rt();
    local.block_on(&rt, async {
        let vm = CageVm::new("web").unwrap();
        vm.install(&module(
            "g",
            "local M = {} function M.f() local co = coroutine.create(function() while true do end end) while true do coroutine.resume(co) end end return M",
        ))
        .unwrap();
        let t = Instant::now();
        assert_eq!(call(&vm, "g", "f", vec![], Duration::from_millis(200)).await, Err(RunError::Deadline));
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    });
}

#[test]
fn a_spinning_coroutine_of_module_code_does_not_starve_the_worker() {
    let (rt, local) = rt();
    local.block_on(&rt, async {
        let vm = Rc::new(CageVm::new("web").unwrap());
        vm.install(&module("m", r#"local M = {}
            function M.spin() local gen = coroutine.wrap(function() while true do end end) gen() end
            function M.nested() local co = coroutine.create(function() local inner = coroutine.wrap(function() while true do end end) inner() end) coroutine.resume(co) end
            function M.fast() return 'ok' end
            return M"#)).unwrap();
        for f in ["spin", "nested"] {
            let spinner = {
                let vm = vm.clone();
                tokio::task::spawn_local(async move { call(&vm, "m", f, vec![], Duration::from_millis(600)).await })
            };
            tokio::task::yield_now().await;
            let mut worst = Duration::ZERO;
            for _ in 0..20 {
                let t = Instant::now();
                assert_eq!(call(&vm, "m", "fast", vec![], Duration::from_secs(5)).await.unwrap(), vec![Value::str("ok")]);
                worst = worst.max(t.elapsed());
            }
            assert!(!spinner.is_finished(), "{f}: the spinner should still be running");
            assert_eq!(spinner.await.unwrap(), Err(RunError::Deadline), "{f}");
            assert!(worst < Duration::from_millis(200), "{f}: fast requests waited {worst:?}");
        }
        assert_eq!(vm.live_requests(), 0);
    });
}

#[test]
fn a_requests_coroutine_is_reused_and_cannot_be_resumed_or_closed_by_module_code() {
    // Finished request coroutines are kept for later requests (decision 160): a reference one
    // request kept to its own coroutine must not let later code resume or close the request
    // now running on it. Coroutines of module code behave as in plain Lua.
    let (rt, local) = rt();
    local.block_on(&rt, async {
        let vm = CageVm::new("web").unwrap();
        let source = r#"
local M = {}
local kept
function M.keep() kept = coroutine.running() return coroutine.status(kept) end
function M.wait(x) pmnc.sleep(0.05) return x end
function M.poke()
  local ok1, e1 = pcall(coroutine.resume, kept)
  local ok2, e2 = pcall(coroutine.close, kept)
  return ok1, e1, ok2, e2
end
function M.where()
  local _, e1 = pcall(function() coroutine.close(kept) end)
  local _, e2 = pcall(function() coroutine.resume(42) end)
  return e1, e2
end
function M.mine()
  local co = coroutine.create(function(a) local b = coroutine.yield(a + 1) return b * 2 end)
  local _, x = coroutine.resume(co, 1)
  local _, y = coroutine.resume(co, 10)
  local w = coroutine.wrap(function() coroutine.yield(7) end)
  return x, y, coroutine.close(co), w()
end
return M"#;
        vm.install(&module("app", source)).unwrap();
        let t = Duration::from_secs(5);
        assert_eq!(call(&vm, "app", "keep", vec![], t).await.unwrap(), vec![Value::str("running")]);
        // Requests in flight on reused coroutines while another request pokes the kept one.
        let waits: Vec<_> = (0..200).map(|i| call(&vm, "app", "wait", vec![Value::Int(i)], t)).collect();
        let poke = call(&vm, "app", "poke", vec![], t);
        let (waited, poked) = tokio::join!(futures_util::future::join_all(waits), poke);
        for (i, r) in waited.into_iter().enumerate() {
            assert_eq!(r.unwrap(), vec![Value::Int(i as i64)], "request {i} was disturbed");
        }
        let poked = poked.unwrap();
        assert_eq!(poked[0], Value::Bool(false));
        assert_eq!(poked[2], Value::Bool(false));
        for (at, verb) in [(1, "resume"), (3, "close")] {
            let Value::Str(m) = &poked[at] else { panic!("{poked:?}") };
            let m = String::from_utf8_lossy(m);
            assert!(m.contains(&format!("bad argument #1 to '{verb}' (a request's own coroutine")), "{m}");
        }
        // The errors name the line of the call, as Lua's own argument errors do.
        let whered = call(&vm, "app", "where", vec![], t).await.unwrap();
        assert_eq!(
            whered,
            vec![
                Value::str("test/app.lua:12: bad argument #1 to 'close' (a request's own coroutine: only coroutines made by coroutine.create or coroutine.wrap can be closed)"),
                Value::str("test/app.lua:13: bad argument #1 to 'resume' (coroutine expected)"),
            ]
        );
        assert_eq!(call(&vm, "app", "mine", vec![], t).await.unwrap(), vec![Value::Int(2), Value::Int(20), Value::Bool(true), Value::Int(7)]);
        // More requests one after another than the VM keeps coroutines for.
        for i in 0..300 {
            assert_eq!(call(&vm, "app", "keep", vec![], t).await.unwrap(), vec![Value::str("running")], "request {i}");
        }
    });
}

#[test]
fn coroutines_stopped_with_hostile_close_handlers_do_not_spoil_the_ones_kept() {
    // A request stopped at its deadline has its to-be-closed handlers run when its coroutine is
    // closed; one that spins there is stopped too, and a coroutine that could not be closed is
    // not kept (decision 160). The requests after them run as usual, on kept coroutines.
    let (rt, local) = rt();
    local.block_on(&rt, async {
        let vm = CageVm::new("web").unwrap();
        let source = r#"
local M = {}
local tidy_closed = 0
function M.count() return tidy_closed end
function M.hostile()
  local guard <close> = setmetatable({}, { __close = function() while true do end end })
  while true do end
end
function M.tidy()
  local guard <close> = setmetatable({}, { __close = function() tidy_closed = tidy_closed + 1 end })
  pmnc.sleep(10)
end
function M.fast(x) local t = {} for i = 1, 100 do t[i] = i end return x, coroutine.status(coroutine.running()) end
return M"#;
        vm.install(&module("app", source)).unwrap();
        for f in ["hostile", "tidy", "hostile", "tidy"] {
            let started = Instant::now();
            let r = call(&vm, "app", f, vec![], Duration::from_millis(200)).await;
            assert_eq!(r, Err(RunError::Deadline), "{f}");
            assert!(started.elapsed() < Duration::from_secs(3), "{f} took {:?} to stop", started.elapsed());
        }
        assert_eq!(call(&vm, "app", "count", vec![], Duration::from_secs(5)).await.unwrap(), vec![Value::Int(2)], "each tidy handler ran once");
        let t = Duration::from_secs(5);
        let many: Vec<_> = (0..300).map(|i| call(&vm, "app", "fast", vec![Value::Int(i)], t)).collect();
        for (i, r) in futures_util::future::join_all(many).await.into_iter().enumerate() {
            assert_eq!(r.unwrap(), vec![Value::Int(i as i64), Value::str("running")], "request {i}");
        }
        assert_eq!(vm.live_requests(), 0);
    });
}
