//! The watchdog after a quiet spell: alone in its own test binary, since any other test running
//! Lua in the same process keeps the watchdog busy.

use std::path::Path;
use std::time::{Duration, Instant};

use rustomnic_core::Value;
use rustomnic_lua::{compile, CageVm, CompiledModule, RequestCtx, RunError};

#[test]
fn entering_lua_wakes_an_idle_watchdog() {
    // After a quiet second the watchdog looks every 20 ms; a thread entering Lua must wake it,
    // or the first long slice after a quiet spell could run for up to 20 ms.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    tokio::task::LocalSet::new().block_on(&rt, async {
        let vm = std::rc::Rc::new(CageVm::new("web").unwrap());
        let source = "local M = {} function M.quick() return 'quick' end function M.spin() while true do end end return M";
        let bytecode = compile("m", Path::new("test/m.lua"), "test/m.lua", source.as_bytes()).unwrap();
        let module = CompiledModule {
            name: "m".into(),
            path: "test/m.lua".into(),
            display: "test/m.lua".into(),
            bytecode,
            functions: vec![],
            version: 1,
            source_hash: 0,
        };
        vm.install(&module).unwrap();
        let call = |f: &'static str, timeout: Duration| {
            let vm = vm.clone();
            async move { vm.call(RequestCtx::new("web", "test", timeout), "m", f, vec![]).await }
        };
        assert_eq!(call("quick", Duration::from_secs(5)).await, Ok(vec![Value::Str(b"quick".to_vec())]));
        // Wait (bounded) for the watchdog to go idle (no Lua runs in this process meanwhile),
        // then enter Lua. Up to three tries: entering during the watchdog's own look (a few
        // microseconds every 20 ms) finds it awake and wakes nothing.
        let mut woke = false;
        for _ in 0..3 {
            let quiet = Instant::now();
            while !rustomnic_lua::watchdog::idle() {
                assert!(quiet.elapsed() < Duration::from_secs(10), "the watchdog never went idle");
                std::thread::sleep(Duration::from_millis(50));
            }
            let woken = rustomnic_lua::watchdog::wakeups();
            let spin = tokio::task::spawn_local(call("spin", Duration::from_millis(300)));
            // Let the spinning request start first; the quick one is served between its slices.
            tokio::task::yield_now().await;
            assert_eq!(call("quick", Duration::from_secs(5)).await, Ok(vec![Value::Str(b"quick".to_vec())]));
            assert!(!spin.is_finished(), "the quick request waited for the spinning one's deadline");
            assert_eq!(spin.await.unwrap(), Err(RunError::Deadline));
            if rustomnic_lua::watchdog::wakeups() > woken {
                woke = true;
                break;
            }
        }
        assert!(woke, "entering Lua did not wake the idle watchdog");
    });
}
