//! The helper families module code finds under `pmnc` besides the runtime's own API
//! (`pmnc.base64`, `pmnc.crypto`, ...): one file per family, each a table of functions.

use mlua::{Lua, Table};

/// The families, by name: the Lua host makes each a read-only `pmnc.<name>` table. A function
/// reports a failure as `(false, message)` or raises it; see the module docs of each family.
pub fn install(lua: &Lua) -> mlua::Result<Table> {
    lua.create_table()
}

/// Names of the families, which modules cannot take as their own names.
pub const FAMILIES: &[&str] = &["base64", "hex", "crypto", "uuid", "time", "url", "xml", "re", "compress", "csv"];
