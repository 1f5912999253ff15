//! Hot reload: watches every cage folder and `.shared`, compiles and checks changed modules off
//! the worker threads, and sends each new version to every worker.
//!
//! Saving in place (truncate + write) and write-then-rename both end in events for the module's
//! path; events are gathered until the folder is quiet for [`QUIET`] and each path is then read
//! once. Empty files are skipped (a save in progress), unchanged contents are skipped, a file that
//! fails to compile or load is reported and the previous version keeps running.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use notify::{RecursiveMode, Watcher};

use crate::app::CageDir;
use crate::config::load_cage;
use crate::interface::Protocols;
use crate::modules::{module_name, resolve, Checker, Loaded};
use crate::runtime::{PreparedCage, ResourceInit, Workers};

/// How long the folders must be quiet before changed files are read.
const QUIET: Duration = Duration::from_millis(2);
/// Reading waits at most this long for quiet, so a file written non-stop still reloads.
const MAX_WAIT: Duration = Duration::from_millis(50);

/// Stops watching when dropped.
pub(crate) struct WatcherHandle {
    _watcher: notify::RecommendedWatcher,
}

struct CageState {
    name: String,
    dir: CageDir,
    /// Fingerprint of every resource's table, as running.
    resources: BTreeMap<String, String>,
    checker: Option<Checker>,
    limits: rustomnic_lua::LuaLimits,
    /// The cage's interfaces as running: each checks new module versions (route tables).
    interfaces: Vec<std::sync::Arc<dyn rustomnic_interface::Interface>>,
    /// Source hash of the version every worker has, per module.
    current: BTreeMap<String, u64>,
    /// Source hash of the last contents reported as broken, per module, so one broken save is
    /// reported once even when several events arrive for it.
    broken: BTreeMap<String, u64>,
}

pub(crate) fn start(
    cages: &[PreparedCage],
    workers: Workers,
    protocols: Protocols,
    init: Arc<ResourceInit>,
    interfaces: tokio::sync::mpsc::UnboundedSender<crate::live::InterfaceChange>,
) -> Result<WatcherHandle, String> {
    let (tx, rx) = mpsc::channel::<notify::Result<notify::Event>>();
    let mut watcher = notify::recommended_watcher(tx).map_err(|e| format!("cannot watch module files: {e}"))?;
    let mut folders = BTreeSet::new();
    for c in cages {
        folders.insert(c.config.dir.dir.clone());
        if let Some(s) = &c.config.dir.shared {
            folders.insert(s.clone());
        }
    }
    for f in &folders {
        watcher.watch(f, RecursiveMode::NonRecursive).map_err(|e| format!("cannot watch {}: {e}", f.display()))?;
    }
    // Libraries under lua_modules/ (those folders that exist at start): a changed library file
    // reloads the modules that required it.
    let mut library_dirs = BTreeSet::new();
    for c in cages {
        for root in &c.config.lua.libraries {
            if root.dir.is_dir() && !folders.contains(&root.dir) {
                library_dirs.insert(root.dir.clone());
            }
        }
    }
    for d in &library_dirs {
        watcher.watch(d, RecursiveMode::Recursive).map_err(|e| format!("cannot watch {}: {e}", d.display()))?;
    }
    type State = (String, CageDir, BTreeMap<String, u64>, rustomnic_lua::LuaLimits, Vec<std::sync::Arc<dyn rustomnic_interface::Interface>>);
    let states: Vec<State> = cages
        .iter()
        .map(|c| {
            let current = c.modules.iter().map(|(n, m)| (n.clone(), m.source_hash)).collect();
            (c.config.name.clone(), c.config.dir.clone(), current, c.config.lua.clone(), c.config.interfaces.clone())
        })
        .collect();
    std::thread::Builder::new()
        .name("pmnc-watcher".into())
        .spawn(move || {
            let mut cages: Vec<CageState> = states
                .into_iter()
                .map(|(name, dir, current, limits, interfaces)| CageState {
                    resources: init.fingerprints(&name),
                    name,
                    dir,
                    checker: None,
                    limits,
                    interfaces,
                    current,
                    broken: BTreeMap::new(),
                })
                .collect();
            // Files changed between the first load and the start of watching are caught here.
            for cage in &mut cages {
                let names: Vec<String> = crate::modules::module_files(&cage.dir, false).map(|m| m.into_keys().collect()).unwrap_or_default();
                let known: Vec<String> = cage.current.keys().cloned().collect();
                for name in names.into_iter().chain(known) {
                    reload(cage, &name, &workers, false);
                }
            }
            let config = ConfigReload { protocols, init, interfaces };
            watch_loop(rx, &mut cages, &workers, &config);
        })
        .map_err(|e| format!("cannot start the watcher thread: {e}"))?;
    Ok(WatcherHandle { _watcher: watcher })
}

/// What re-reading a changed cage.toml needs.
struct ConfigReload {
    protocols: Protocols,
    init: Arc<ResourceInit>,
    /// Where changed interfaces go (the control thread's LiveInterfaces).
    interfaces: tokio::sync::mpsc::UnboundedSender<crate::live::InterfaceChange>,
}

fn watch_loop(rx: mpsc::Receiver<notify::Result<notify::Event>>, cages: &mut [CageState], workers: &Workers, config: &ConfigReload) {
    while let Ok(first) = rx.recv() {
        let mut paths = BTreeSet::new();
        collect(first, &mut paths);
        let started = Instant::now();
        while started.elapsed() < MAX_WAIT {
            match rx.recv_timeout(QUIET) {
                Ok(e) => collect(e, &mut paths),
                Err(mpsc::RecvTimeoutError::Timeout) => break,
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
        }
        for path in paths {
            changed(&path, cages, workers, config);
        }
    }
}

fn collect(event: notify::Result<notify::Event>, paths: &mut BTreeSet<PathBuf>) {
    match event {
        Ok(e) => {
            if matches!(e.kind, notify::EventKind::Access(_)) {
                return;
            }
            paths.extend(e.paths);
        }
        Err(e) => tracing::warn!("watching module files: {e}"),
    }
}

fn changed(path: &Path, cages: &mut [CageState], workers: &Workers, config: &ConfigReload) {
    let Some(file_name) = path.file_name().map(|n| n.to_string_lossy().to_string()) else { return };
    let Some(folder) = path.parent() else { return };
    if path.components().any(|c| c.as_os_str() == "lua_modules") {
        for cage in cages.iter_mut() {
            for module in rustomnic_lua::libraries::dependents(&cage.name, path) {
                tracing::info!(cage = %cage.name, "library {} changed: checking module {module} again", path.display());
                reload(cage, &module, workers, true);
            }
        }
        return;
    }
    if file_name == "cage.toml" {
        if let Some(cage) = cages.iter_mut().find(|c| same_dir(folder, &c.dir.dir)) {
            reload_config(cage, workers, config);
        }
        return;
    }
    let Some(name) = module_name(&file_name, false) else { return };
    for cage in cages.iter_mut() {
        let own = same_dir(folder, &cage.dir.dir);
        let shared = cage.dir.shared.as_deref().is_some_and(|s| same_dir(folder, s));
        if own || shared {
            reload(cage, name, workers, false);
        }
    }
}

fn same_dir(a: &Path, b: &Path) -> bool {
    a == b || a.canonicalize().ok().as_deref() == Some(b)
}

/// Brings module `name` of `cage` in line with the files on disk.
/// `force`: check it even when its file did not change (a library it requires did).
fn reload(cage: &mut CageState, name: &str, workers: &Workers, force: bool) {
    if let Err(e) = rustomnic_lua::module::check_module_name(name) {
        tracing::error!(cage = %cage.name, "{}/{name}.lua: {e}", cage.dir.folder_name);
        return;
    }
    let Some(file) = resolve(&cage.dir, name) else {
        // A module that never loaded (its only versions were broken) is forgotten as well: it
        // leaves /status and its module_error alert, though no worker ever had it.
        let was_broken = cage.broken.remove(name).is_some();
        if cage.current.remove(name).is_some() {
            tracing::warn!(cage = %cage.name, "module {name} removed: its file is gone; calls to it now fail");
            rustomnic_core::metrics::clear_module_error(&cage.name, name);
            workers.broadcast_module(&cage.name, name, None);
        } else if was_broken {
            tracing::info!(cage = %cage.name, "broken module {name} removed before it ever loaded");
            rustomnic_core::metrics::clear_module_error(&cage.name, name);
        }
        return;
    };
    if cage.checker.is_none() {
        match Checker::new(&cage.name, &cage.limits) {
            Ok(c) => cage.checker = Some(c),
            Err(e) => {
                tracing::error!(cage = %cage.name, "cannot check modules: {e}");
                return;
            }
        }
    }
    let Some(checker) = cage.checker.as_ref() else { return };
    let started = Instant::now();
    let known: Vec<u64> = if force { Vec::new() } else { cage.current.get(name).into_iter().chain(cage.broken.get(name)).copied().collect() };
    match checker.load(&file, &known, &cage.interfaces) {
        Ok(Loaded::New(module)) => {
            cage.broken.remove(name);
            let version = module.version;
            cage.current.insert(name.to_string(), module.source_hash);
            workers.broadcast_module(&cage.name, name, Some(module));
            tracing::info!(cage = %cage.name, "reloaded {} (version {version}, checked in {:.1} ms)", file.display, started.elapsed().as_secs_f64() * 1e3);
            rustomnic_core::metrics::record_reload(&cage.name, name, &format!("reloaded {} (version {version})", file.display));
        }
        Ok(Loaded::Broken { error, source_hash }) => {
            cage.broken.insert(name.to_string(), source_hash);
            tracing::error!(cage = %cage.name, "{error} (keeping the previous version)");
            rustomnic_core::metrics::record_module_error(&cage.name, name, &error.to_string());
        }
        Ok(Loaded::Unchanged(hash)) => {
            // Back to the running contents: a later broken save must be reported again.
            if cage.current.get(name) == Some(&hash) {
                cage.broken.remove(name);
                rustomnic_core::metrics::clear_module_error(&cage.name, name);
            }
        }
        Ok(Loaded::Empty) => {}
        Err(e) => {
            tracing::error!(cage = %cage.name, "{e} (keeping the previous version)");
            rustomnic_core::metrics::record_module_error(&cage.name, name, &e.to_string());
        }
    }
}

/// Applies a changed cage.toml: every resource whose table changed gets a new pool (the others
/// keep theirs); anything else in the file takes effect at the next restart. A file with
/// problems changes nothing.
fn reload_config(cage: &mut CageState, workers: &Workers, config: &ConfigReload) {
    let file = cage.dir.config_file();
    let text = std::fs::read_to_string(&file).unwrap_or_default();
    if text.trim().is_empty() {
        return;
    }
    let new = match load_cage(&cage.dir, &config.protocols) {
        Ok(c) => c,
        Err(errors) => {
            for e in errors {
                tracing::error!(cage = %cage.name, "{e} (keeping the running config)");
            }
            return;
        }
    };
    // Interfaces: the control thread restarts those whose table changed. A handler whose module
    // is missing keeps every interface of the cage as it runs.
    let missing: Vec<String> = new
        .interfaces
        .iter()
        .flat_map(|i| i.handlers())
        .filter(|h| crate::modules::resolve(&cage.dir, &h.value.0).is_none())
        .map(|h| h.error(format!("handler module {} not found", h.value.0)).to_string())
        .collect();
    if missing.is_empty() {
        cage.interfaces = new.interfaces.clone();
        let _ = config.interfaces.send(crate::live::InterfaceChange { cage: cage.name.clone(), interfaces: new.interfaces.clone() });
    } else {
        for m in missing {
            tracing::error!(cage = %cage.name, "{m} (keeping the running interfaces)");
        }
    }
    let mut changed = 0;
    for r in &new.resources {
        if cage.resources.get(&r.name) != Some(&r.fingerprint) {
            let stats = config.init.stats(&cage.name, &r.name);
            workers.broadcast_resource(&cage.name, &r.name, Some(r.clone()), stats);
            tracing::info!(cage = %cage.name, "resource {}: config changed, its pool is rebuilt", r.name);
            cage.resources.insert(r.name.clone(), r.fingerprint.clone());
            changed += 1;
        }
    }
    let gone: Vec<String> = cage.resources.keys().filter(|n| !new.resources.iter().any(|r| &r.name == *n)).cloned().collect();
    for name in gone {
        workers.broadcast_resource(&cage.name, &name, None, Arc::default());
        tracing::info!(cage = %cage.name, "resource {name}: removed from cage.toml");
        cage.resources.remove(&name);
        changed += 1;
    }
    if changed == 0 {
        tracing::info!(cage = %cage.name, "{}: changed; resources unchanged; changes other than resources and interfaces take effect at the next restart", file.display());
    }
}
