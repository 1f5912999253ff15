//! What a cage's Lua code may use: memory per VM and per request, how long it may run where it
//! cannot yield, and which environment variables `os.getenv` may read. Read from the cage's
//! `[lua]` table (crates/cage/src/config.rs documents the keys).

use std::time::Duration;

/// Limits of one cage's VMs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LuaLimits {
    /// Bytes one VM (one cage on one worker thread) may hold.
    pub memory: usize,
    /// Bytes one request may add to its VM while it runs.
    pub request_memory: usize,
    /// How long Lua code may run inside a function called by C code (where it cannot yield)
    /// before it is stopped with an error.
    pub unyielding: Duration,
    /// Names `os.getenv` may read: exact names, or prefixes ending with `*`.
    pub getenv: Vec<String>,
    /// Where `require` looks for libraries, in order (the cage's `lua_modules`, then the app's).
    pub libraries: Vec<crate::libraries::LibraryRoot>,
}

pub const DEFAULT_MEMORY: usize = 1 << 30;
pub const DEFAULT_REQUEST_MEMORY: usize = 64 << 20;
pub const DEFAULT_UNYIELDING: Duration = Duration::from_millis(20);

impl Default for LuaLimits {
    fn default() -> Self {
        LuaLimits { memory: DEFAULT_MEMORY, request_memory: DEFAULT_REQUEST_MEMORY, unyielding: DEFAULT_UNYIELDING, getenv: Vec::new(), libraries: Vec::new() }
    }
}

impl LuaLimits {
    /// May `os.getenv` read `name`?
    pub fn may_read_env(&self, name: &str) -> bool {
        self.getenv.iter().any(|p| match p.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix),
            None => p == name,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_getenv_list_takes_names_and_prefixes() {
        let l = LuaLimits { getenv: vec!["HOME".into(), "APP_*".into()], ..Default::default() };
        assert!(l.may_read_env("HOME"));
        assert!(!l.may_read_env("HOMEDIR"));
        assert!(l.may_read_env("APP_DB_URL"));
        assert!(!l.may_read_env("AWS_SECRET_ACCESS_KEY"));
        assert!(!LuaLimits::default().may_read_env("PATH"));
    }
}
