//! `require` for pure-Lua libraries installed under `lua_modules/` (the layout of
//! `luarocks --tree lua_modules --lua-version 5.4 install NAME`): finding a library's file,
//! compiling it once per process (kept while the file is unchanged), and loading it into the
//! requiring module's own environment. Native libraries are refused.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use mlua::{Function, Lua, Table};

/// A folder holding `share/lua/5.4/` (and perhaps `lib/lua/5.4/`) of installed libraries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LibraryRoot {
    pub dir: PathBuf,
    /// How messages name it ("web/lua_modules").
    pub display: String,
}

const LUA_PATHS: &[&str] = &["share/lua/5.4/?.lua", "share/lua/5.4/?/init.lua"];
const NATIVE_PATHS: &[&str] = &["lib/lua/5.4/?.so"];

/// The library files each module's top-level code required, by (cage, module): recorded by
/// every VM that loads the module (the same files for all), read by the watcher to reload the
/// modules of a changed library.
type Required = HashMap<(String, String), Vec<PathBuf>>;
static REQUIRED: Mutex<Option<Required>> = Mutex::new(None);

/// A new load of `module` of `cage` starts: what it requires is recorded anew.
pub(crate) fn forget(cage: &str, module: &str) {
    if let Ok(mut r) = REQUIRED.lock() {
        if let Some(map) = r.as_mut() {
            map.remove(&(cage.to_string(), module.to_string()));
        }
    }
}

fn record(cage: &str, module: &str, path: &Path) {
    if let Ok(mut r) = REQUIRED.lock() {
        let files = r.get_or_insert_with(HashMap::new).entry((cage.to_string(), module.to_string())).or_default();
        if !files.iter().any(|f| f == path) {
            files.push(path.to_path_buf());
        }
    }
}

/// The modules of `cage` whose top-level code required `file`.
pub fn dependents(cage: &str, file: &Path) -> Vec<String> {
    let Ok(r) = REQUIRED.lock() else { return Vec::new() };
    let Some(map) = r.as_ref() else { return Vec::new() };
    let mut modules: Vec<String> = map.iter().filter(|((c, _), files)| c == cage && files.iter().any(|f| f == file)).map(|((_, m), _)| m.clone()).collect();
    modules.sort();
    modules
}

/// Compiled libraries by path, with the modification time and length they were compiled from.
type Compiled = HashMap<PathBuf, (Option<SystemTime>, u64, Arc<Vec<u8>>)>;
static COMPILED: Mutex<Option<Compiled>> = Mutex::new(None);

/// Is `name` a library name (`a.b.c` of letters, digits, `_` and `-`)? Anything else could
/// reach outside the roots.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && name.split('.').all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'))
}

/// Where `require(name)` finds its file: the file and how messages name it, or the error.
pub fn find(roots: &[LibraryRoot], name: &str) -> Result<(PathBuf, String), String> {
    if !valid_name(name) {
        return Err(format!("module {name:?} not found: a library name is words of letters, digits, _ and - joined by dots"));
    }
    let rel = name.replace('.', "/");
    let mut tried = Vec::new();
    for root in roots {
        for pattern in LUA_PATHS {
            let sub = pattern.replace('?', &rel);
            let path = root.dir.join(&sub);
            let display = format!("{}/{sub}", root.display);
            if path.is_file() {
                return Ok((path, display));
            }
            tried.push(display);
        }
    }
    for root in roots {
        // Lua's C loader also looks for the first part of a dotted name ("all-in-one" libraries).
        let first = rel.split('/').next().unwrap_or(&rel);
        for pattern in NATIVE_PATHS {
            for candidate in [rel.as_str(), first] {
                let sub = pattern.replace('?', candidate);
                if root.dir.join(&sub).is_file() {
                    return Err(format!(
                        "module '{name}' is a native library ({}/{sub}): native code cannot be loaded into a cage, only pure-Lua libraries",
                        root.display
                    ));
                }
            }
        }
    }
    let mut message = format!("module '{name}' not found (install it with: luarocks --tree lua_modules --lua-version 5.4 install <rock>):");
    for t in tried {
        message.push_str(&format!("\n\tno file '{t}'"));
    }
    Err(message)
}

/// The library's bytecode, compiled from its file now or before if the file did not change.
fn bytecode(path: &Path, display: &str) -> Result<Arc<Vec<u8>>, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{display}: {e}"))?;
    let (mtime, len) = (meta.modified().ok(), meta.len());
    if let Ok(guard) = COMPILED.lock() {
        if let Some((m, l, code)) = guard.as_ref().and_then(|c| c.get(path)) {
            if *m == mtime && *l == len && mtime.is_some() {
                return Ok(code.clone());
            }
        }
    }
    if len > crate::module::MAX_MODULE_BYTES {
        return Err(format!("{display}: {len} bytes is over the size limit of {} MiB", crate::module::MAX_MODULE_BYTES >> 20));
    }
    let source = std::fs::read(path).map_err(|e| format!("{display}: {e}"))?;
    if source.starts_with(b"\x1bLua") {
        return Err(format!("{display}: precompiled bytecode is not accepted; install the library's source"));
    }
    let code = Arc::new(crate::module::compile_text(&source, display).map_err(|e| e.to_string())?);
    if let Ok(mut guard) = COMPILED.lock() {
        guard.get_or_insert_with(HashMap::new).insert(path.to_path_buf(), (mtime, len, code.clone()));
    }
    Ok(code)
}

/// The library `name` as a function whose environment is `env` (the requiring module's), with
/// the file it came from; `loading` is (cage, module) when a module's top-level code requires it.
pub fn load(lua: &Lua, roots: &[LibraryRoot], name: &str, env: Table, loading: Option<(&str, &str)>) -> Result<(Function, PathBuf, String), String> {
    let (path, display) = find(roots, name)?;
    if let Some((cage, module)) = loading {
        record(cage, module, &path);
    }
    let code = bytecode(&path, &display)?;
    let f = lua
        .load(&code[..])
        .set_name(format!("@{display}"))
        .set_mode(mlua::chunk::ChunkMode::Binary)
        .set_environment(env)
        .into_function()
        .map_err(|e| format!("{display}: {e}"))?;
    Ok((f, path, display))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_cannot_leave_the_roots_and_misses_list_what_was_tried() {
        let dir = tempfile::tempdir().unwrap();
        let roots = [LibraryRoot { dir: dir.path().to_path_buf(), display: "web/lua_modules".into() }];
        for bad in ["../etc/passwd", "a/b", "", "a..b", ".a", "a\0b"] {
            assert!(find(&roots, bad).unwrap_err().contains("a library name is words"), "{bad:?}");
        }
        let e = find(&roots, "pl.List").unwrap_err();
        assert!(e.contains("no file 'web/lua_modules/share/lua/5.4/pl/List.lua'"), "{e}");
        assert!(e.contains("no file 'web/lua_modules/share/lua/5.4/pl/List/init.lua'"), "{e}");
        std::fs::create_dir_all(dir.path().join("lib/lua/5.4")).unwrap();
        std::fs::write(dir.path().join("lib/lua/5.4/cjson.so"), b"\x7fELF").unwrap();
        let e = find(&roots, "cjson").unwrap_err();
        assert!(e.contains("native library (web/lua_modules/lib/lua/5.4/cjson.so)"), "{e}");
        std::fs::create_dir_all(dir.path().join("share/lua/5.4/pl")).unwrap();
        std::fs::write(dir.path().join("share/lua/5.4/pl/init.lua"), b"return {}").unwrap();
        assert_eq!(find(&roots, "pl").unwrap().1, "web/lua_modules/share/lua/5.4/pl/init.lua");
    }
}
