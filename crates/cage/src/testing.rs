//! `pmnc test`: runs every `test_*` function of every `*_test.lua` module of each cage inside a
//! running cage (all cages loaded, interfaces not started, queues running). Each test runs in
//! fresh VMs, so neither its failure nor its module-level state reaches the next test. Every
//! cage's state and queue live in a temporary folder for the run, so tests neither read nor
//! change the cage's real file, and a cage running meanwhile never runs a test's calls.

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
    let mut cages = prepare(path, protocols, true)?;
    let state = TempState::new()?;
    for cage in &mut cages {
        state.take(cage, protocols)?;
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| Error::Runtime(format!("cannot start a runtime: {e}")))?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async {
        // Queued calls run on this thread, like every test: the queues' dispatchers hand their
        // jobs over a channel to a task of this LocalSet.
        let (jobs, mut incoming) = tokio::sync::mpsc::unbounded_channel::<rustomnic_queue::Job>();
        tokio::task::spawn_local(async move {
            while let Some(job) = incoming.recv().await {
                tokio::task::spawn_local(job());
            }
        });
        let spawn: rustomnic_queue::Spawner = std::sync::Arc::new(move |job| {
            let _ = jobs.send(job);
        });
        let mut queues = Vec::new();
        for c in &cages {
            let q = rustomnic_queue::start(&c.config.name, &c.config.state_file, c.config.queues.clone(), c.config.request_timeout, spawn.clone())
                .map_err(Error::Runtime)?;
            queues.push(q);
        }
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
        drop(queues);
        worker::clear();
        Ok(summary)
    })
}

/// The temporary folder holding every cage's state file during `pmnc test`; removed when
/// dropped.
struct TempState {
    dir: std::path::PathBuf,
}

impl TempState {
    fn new() -> Result<TempState, Error> {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let dir = std::env::temp_dir().join(format!("pmnc-test-{}-{nanos:x}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| Error::Runtime(format!("cannot create the temporary state folder {}: {e}", dir.display())))?;
        Ok(TempState { dir })
    }

    /// Points the cage's state file (its state resource, when that is the state protocol, and
    /// its queue) at a file of its own in this folder.
    fn take(&self, cage: &mut PreparedCage, protocols: &Protocols) -> Result<(), Error> {
        let file = self.dir.join(&cage.config.name).join("state.sqlite");
        cage.config.state_file = file.clone();
        if let Some(r) = cage.config.resources.iter_mut().find(|r| r.name == "state" && r.protocol == "state") {
            *r = crate::config::state_resource_at(&file, protocols)
                .ok_or_else(|| Error::Runtime(format!("cage {}: cannot point its state at {}", cage.config.name, file.display())))?;
        }
        Ok(())
    }
}

impl Drop for TempState {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
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
