//! Modules: compiling a `.lua` file to bytecode (off the worker threads) and the errors of that.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Largest module file accepted; anything bigger is almost certainly not a module.
pub const MAX_MODULE_BYTES: u64 = 8 << 20;

/// Names that cannot be module names because `pmnc.<name>` is taken by the API, and `_queue`,
/// the entry point of durable calls forwarded from other cages (crate::durable::ACCEPT_MODULE).
pub const RESERVED_NAMES: &[&str] =
    &["log", "sleep", "clock", "json", "request", "cage", "events", "state", "transaction", "calls", "parallel", "test", "cache", "_queue"];

/// A module compiled and checked once, ready to be handed to every VM of its cage.
#[derive(Debug)]
pub struct CompiledModule {
    pub name: String,
    pub path: PathBuf,
    /// The name Lua shows in messages and tracebacks ("web/util.lua").
    pub display: String,
    pub bytecode: Vec<u8>,
    /// Public functions found when the module was checked (for handler validation).
    pub functions: Vec<String>,
    /// Counts up with every version of any module, so logs can tell versions apart.
    pub version: u64,
    /// Hash of the source text, to skip reloading a file whose contents did not change.
    pub source_hash: u64,
}

/// A module that cannot be used; the message starts with `file:line:` when Lua knows the line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleError {
    pub path: PathBuf,
    pub message: String,
}

impl fmt::Display for ModuleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.message)
    }
}

impl std::error::Error for ModuleError {}

/// Is `name` usable as a module name?
pub fn check_module_name(name: &str) -> Result<(), String> {
    if !rustomnic_core::is_identifier(name) {
        return Err(format!("module name {name:?} is not an identifier (letters, digits and _; not starting with a digit)"));
    }
    if name == crate::durable::ACCEPT_MODULE {
        return Err(format!("module name {name:?} is reserved (durable calls from other cages arrive through it)"));
    }
    if RESERVED_NAMES.contains(&name) || rustomnic_stdlib::FAMILIES.contains(&name) {
        return Err(format!("module name {name:?} is reserved by the pmnc API (pmnc.{name})"));
    }
    Ok(())
}

/// Compiles Lua source to bytecode. The result is checked by loading it into a VM
/// ([`crate::CageVm::check_module`]) before anyone uses it.
pub fn compile(name: &str, path: &Path, display: &str, source: &[u8]) -> Result<Vec<u8>, ModuleError> {
    let err = |message: String| ModuleError { path: path.to_path_buf(), message };
    check_module_name(name).map_err(|m| err(format!("{display}: {m}")))?;
    if source.len() as u64 > MAX_MODULE_BYTES {
        // The reader stops one byte past the limit, so the length says only "too big".
        return Err(err(format!("{display}: over the module size limit of {} MiB", MAX_MODULE_BYTES >> 20)));
    }
    if source.starts_with(b"\x1bLua") {
        return Err(err(format!("{display}: precompiled bytecode is not accepted; ship the source")));
    }
    compile_text(source, display).map_err(err)
}

/// Compiles Lua text to bytecode named `display` in messages; the message of a syntax error
/// starts with `display:line:`.
pub fn compile_text(source: &[u8], display: &str) -> Result<Vec<u8>, String> {
    thread_local! {
        static COMPILER: mlua::Lua = mlua::Lua::new_with(mlua::StdLib::NONE, mlua::LuaOptions::default())
            .unwrap_or_else(|_| mlua::Lua::new());
    }
    COMPILER.with(|lua| {
        let f = lua
            .load(source)
            .set_name(format!("@{display}"))
            .set_mode(mlua::chunk::ChunkMode::Text)
            .into_function()
            .map_err(|e| crate::request::error_text(&mlua::Value::Error(Box::new(e))))?;
        Ok(f.dump(false))
    })
}

pub type Module = Arc<CompiledModule>;

/// The hash kept in [`CompiledModule::source_hash`].
pub fn source_hash(source: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    source.hash(&mut h);
    h.finish()
}
