//! `pmnc test`: runs every `test_*` function of every `*_test.lua` module of each cage inside a
//! running cage (all cages loaded, interfaces not started). Each test runs in fresh VMs, so
//! neither its failure nor its module-level state reaches the next test.

use std::io::Write;
use std::rc::Rc;
use std::time::Instant;

use rustomnic_lua::{mlua::MultiValue, worker, CageVm, RequestCtx, RunError};

use crate::interface::Protocols;
use crate::runtime::{prepare, PreparedCage};
use crate::Error;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TestSummary {
    pub passed: usize,
    pub failed: usize,
}

/// Runs the tests at `path`, printing one line per test to `out`. `filter` keeps tests whose
/// "cage.module.function" name contains it.
pub fn run_tests(path: &std::path::Path, protocols: &Protocols, filter: Option<&str>, out: &mut dyn Write) -> Result<TestSummary, Error> {
    let cages = prepare(path, protocols, true)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Runtime(format!("cannot start a runtime: {e}")))?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async {
        let mut plan = Vec::new();
        for cage in &cages {
            for (name, m) in &cage.modules {
                if !name.ends_with("_test") {
                    continue;
                }
                for f in m.functions.iter().filter(|f| f.starts_with("test_")) {
                    let full = format!("{}.{name}.{f}", cage.config.name);
                    if filter.is_none_or(|flt| full.contains(flt)) {
                        plan.push((cage.config.name.clone(), cage.config.request_timeout, name.clone(), f.clone(), full));
                    }
                }
            }
        }
        let mut summary = TestSummary::default();
        for (cage, timeout, module, function, full) in plan {
            // Every test gets fresh VMs of every cage: module-level state set by one test
            // cannot leak into the next.
            let vm = fresh_vms(&cages, &cage)?;
            let started = Instant::now();
            let ctx = RequestCtx::new(vm.cage(), "test", timeout);
            let result = match vm.start(ctx, &module, &function, |_| Ok(MultiValue::new())) {
                Ok(fut) => fut.await.map(|_| ()),
                Err(e) => Err(e),
            };
            let ms = started.elapsed().as_secs_f64() * 1e3;
            match result {
                Ok(()) => {
                    summary.passed += 1;
                    let _ = writeln!(out, "ok     {full} ({ms:.1} ms)");
                }
                Err(e) => {
                    summary.failed += 1;
                    let _ = writeln!(out, "FAILED {full} ({ms:.1} ms)");
                    let detail = match &e {
                        RunError::Failed { message, traceback } if !traceback.is_empty() => {
                            format!("{message}\n{}", traceback.lines().skip(1).collect::<Vec<_>>().join("\n"))
                        }
                        RunError::Deadline => format!("deadline exceeded ({timeout:?}, the cage's request_timeout)"),
                        other => other.to_string(),
                    };
                    for line in detail.lines() {
                        let _ = writeln!(out, "       {line}");
                    }
                }
            }
        }
        let _ = writeln!(out, "{} passed, {} failed", summary.passed, summary.failed);
        worker::clear();
        Ok(summary)
    })
}

/// Replaces this thread's VMs with new ones holding every module; returns the VM of `cage`.
fn fresh_vms(cages: &[PreparedCage], cage: &str) -> Result<Rc<CageVm>, Error> {
    worker::clear();
    crate::runtime::ResourceInit::new(cages, 1).install();
    let mut wanted = None;
    for c in cages {
        let vm = CageVm::with_limits(&c.config.name, c.config.lua.clone()).map_err(Error::Runtime)?;
        for m in c.modules.values() {
            vm.install(m).map_err(Error::Runtime)?;
        }
        let vm = Rc::new(vm);
        if c.config.name == cage {
            wanted = Some(vm.clone());
        }
        worker::install(vm);
    }
    wanted.ok_or_else(|| Error::Runtime(format!("cage {cage} vanished")))
}
