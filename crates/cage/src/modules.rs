//! Finding a cage's module files (its own, then `.shared`) and turning them into checked
//! versions ready for the worker VMs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rustomnic_lua::{compile, CageVm, CompiledModule, Module, ModuleError};

use rustomnic_interface::Interface;

use crate::app::CageDir;

/// A module file and the name Lua shows for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleFile {
    pub name: String,
    pub path: PathBuf,
    pub display: String,
}

/// Is this file name a module of a running cage (tests excluded unless asked)?
pub fn module_name(file_name: &str, tests: bool) -> Option<&str> {
    let stem = file_name.strip_suffix(".lua")?;
    if stem.is_empty() || stem.starts_with('.') || (!tests && stem.ends_with("_test")) {
        return None;
    }
    Some(stem)
}

/// The module file that defines `name` for the cage: its own file wins over `.shared`.
pub fn resolve(dir: &CageDir, name: &str) -> Option<ModuleFile> {
    let own = dir.dir.join(format!("{name}.lua"));
    if own.is_file() {
        return Some(ModuleFile { name: name.into(), path: own, display: format!("{}/{name}.lua", dir.folder_name) });
    }
    let shared = dir.shared.as_ref()?.join(format!("{name}.lua"));
    shared.is_file().then(|| ModuleFile { name: name.into(), path: shared, display: format!(".shared/{name}.lua") })
}

/// Every module of the cage, by name.
pub fn module_files(dir: &CageDir, tests: bool) -> Result<BTreeMap<String, ModuleFile>, String> {
    let mut names = Vec::new();
    for folder in std::iter::once(&dir.dir).chain(dir.shared.iter()) {
        let entries = std::fs::read_dir(folder).map_err(|e| format!("{}: {e}", folder.display()))?;
        for entry in entries.flatten() {
            let file_name = entry.file_name().to_string_lossy().to_string();
            if let Some(name) = module_name(&file_name, tests) {
                if entry.path().is_file() {
                    names.push(name.to_string());
                }
            }
        }
    }
    Ok(names.into_iter().filter_map(|n| resolve(dir, &n).map(|f| (n, f))).collect())
}

static VERSION: AtomicU64 = AtomicU64::new(1);

/// Reads, compiles and checks module files of one cage. Owns a VM used only for checking
/// (so it lives on the thread that made it).
pub struct Checker {
    vm: CageVm,
}

impl Checker {
    pub fn new(cage: &str, limits: &rustomnic_lua::LuaLimits) -> Result<Checker, String> {
        Ok(Checker { vm: CageVm::with_limits(cage, limits.clone())? })
    }

    /// The file's contents as a checked module, unless the file is empty (an editor in the middle
    /// of saving it) or its contents hash to one of `known` (the version running, or contents
    /// already reported as broken). `Err` only when the file cannot be read.
    ///
    /// `checks` are the cage's interfaces: each checks the new version for what it reads from it.
    pub fn load(&self, file: &ModuleFile, known: &[u64], checks: &[Arc<dyn Interface>]) -> Result<Loaded, ModuleError> {
        let source = read_limited(&file.path).map_err(|e| ModuleError { path: file.path.clone(), message: format!("{}: {e}", file.display) })?;
        if source.len() as u64 > rustomnic_lua::module::MAX_MODULE_BYTES {
            let size = std::fs::metadata(&file.path).map(|m| m.len()).unwrap_or(source.len() as u64);
            let message = format!(
                "{}: {size} bytes ({:.1} MiB) is over the module size limit of {} MiB",
                file.display,
                size as f64 / (1 << 20) as f64,
                rustomnic_lua::module::MAX_MODULE_BYTES >> 20
            );
            return Ok(Loaded::Broken { error: ModuleError { path: file.path.clone(), message }, source_hash: rustomnic_lua::module::source_hash(&source) });
        }
        if source.iter().all(|b| b.is_ascii_whitespace()) {
            return Ok(Loaded::Empty);
        }
        let source_hash = rustomnic_lua::module::source_hash(&source);
        if known.contains(&source_hash) {
            return Ok(Loaded::Unchanged(source_hash));
        }
        let bytecode = match compile(&file.name, &file.path, &file.display, &source) {
            Ok(b) => b,
            Err(error) => return Ok(Loaded::Broken { error, source_hash }),
        };
        let mut module = CompiledModule {
            name: file.name.clone(),
            path: file.path.clone(),
            display: file.display.clone(),
            bytecode,
            functions: Vec::new(),
            version: VERSION.fetch_add(1, Ordering::Relaxed),
            source_hash,
        };
        let name = module.name.clone();
        let check = |table: &rustomnic_lua::mlua::Table| checks.iter().try_for_each(|i| i.check_module(&name, table));
        match self.vm.check_module_with(&module, &check) {
            Ok(functions) => module.functions = functions,
            Err(message) => return Ok(Loaded::Broken { error: ModuleError { path: file.path.clone(), message }, source_hash }),
        }
        Ok(Loaded::New(Arc::new(module)))
    }
}

/// What [`Checker::load`] found.
pub enum Loaded {
    Empty,
    /// The contents hash to one of the known hashes (given back).
    Unchanged(u64),
    New(Module),
    /// Fails to compile or to load; the hash lets the watcher report these contents once.
    Broken {
        error: ModuleError,
        source_hash: u64,
    },
}

fn read_limited(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut buf = Vec::new();
    std::fs::File::open(path)?.take(rustomnic_lua::module::MAX_MODULE_BYTES + 1).read_to_end(&mut buf)?;
    Ok(buf)
}

/// Loads every module of a cage; problems are listed, not stopped at.
pub fn load_all(
    dir: &CageDir,
    cage: &str,
    limits: &rustomnic_lua::LuaLimits,
    tests: bool,
    checks: &[Arc<dyn Interface>],
) -> Result<BTreeMap<String, Module>, Vec<String>> {
    let files = module_files(dir, tests).map_err(|e| vec![e])?;
    let checker = Checker::new(cage, limits).map_err(|e| vec![e])?;
    let mut modules = BTreeMap::new();
    let mut problems = Vec::new();
    for (name, file) in files {
        if let Err(e) = rustomnic_lua::module::check_module_name(&name) {
            problems.push(format!("{}: {e}", file.display));
            continue;
        }
        match checker.load(&file, &[], checks) {
            Ok(Loaded::New(m)) => {
                modules.insert(name, m);
            }
            Ok(Loaded::Broken { error, .. }) => problems.push(error.to_string()),
            Ok(_) => tracing::warn!(cage, "{}: empty file, not a module yet", file.display),
            Err(e) => problems.push(e.to_string()),
        }
    }
    if problems.is_empty() {
        Ok(modules)
    } else {
        Err(problems)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_precedence() {
        assert_eq!(module_name("util.lua", false), Some("util"));
        assert_eq!(module_name("util_test.lua", false), None);
        assert_eq!(module_name("util_test.lua", true), Some("util_test"));
        assert_eq!(module_name(".util.lua.swp", false), None);
        assert_eq!(module_name("util.lua~", false), None);
        let tmp = tempfile::tempdir().unwrap();
        let web = tmp.path().join("web");
        let shared = tmp.path().join(".shared");
        std::fs::create_dir_all(&web).unwrap();
        std::fs::create_dir_all(&shared).unwrap();
        std::fs::write(web.join("a.lua"), "return {}").unwrap();
        std::fs::write(shared.join("a.lua"), "return {}").unwrap();
        std::fs::write(shared.join("b.lua"), "return {}").unwrap();
        let dir = CageDir { folder_name: "web".into(), dir: web, shared: Some(shared) };
        let files = module_files(&dir, false).unwrap();
        assert_eq!(files["a"].display, "web/a.lua");
        assert_eq!(files["b"].display, ".shared/b.lua");
        let loaded = load_all(&dir, "web", &Default::default(), false, &[]).unwrap();
        assert_eq!(loaded.len(), 2);
        std::fs::write(dir.dir.join("bad.lua"), "return {").unwrap();
        std::fs::write(dir.dir.join("log.lua"), "return {}").unwrap();
        let problems = load_all(&dir, "web", &Default::default(), false, &[]).unwrap_err();
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems.iter().any(|p| p.starts_with("web/bad.lua:1:")), "{problems:?}");
        assert!(problems.iter().any(|p| p.contains("reserved")), "{problems:?}");
        // A file far over the size limit is named with its real size, not the bytes read.
        std::fs::remove_file(dir.dir.join("bad.lua")).unwrap();
        std::fs::remove_file(dir.dir.join("log.lua")).unwrap();
        std::fs::write(dir.dir.join("huge.lua"), vec![b'-'; 50 << 20]).unwrap();
        let problems = load_all(&dir, "web", &Default::default(), false, &[]).unwrap_err();
        assert_eq!(problems, vec!["web/huge.lua: 52428800 bytes (50.0 MiB) is over the module size limit of 8 MiB".to_string()]);
    }
}
