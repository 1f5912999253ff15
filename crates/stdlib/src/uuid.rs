//! `pmnc.uuid`: random (v4) and time-ordered (v7) UUIDs as lowercase hyphenated strings.

use mlua::{Lua, Table};

pub(crate) fn install(lua: &Lua, t: &Table) -> mlua::Result<()> {
    // Plain values rather than (ok, value): these cannot fail.
    t.set("v4", lua.create_function(|lua, ()| crate::ok_bytes(lua, ::uuid::Uuid::new_v4().hyphenated().to_string()))?)?;
    t.set("v7", lua.create_function(|lua, ()| crate::ok_bytes(lua, ::uuid::Uuid::now_v7().hyphenated().to_string()))?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn versions_and_order() {
        let a = ::uuid::Uuid::now_v7();
        let b = ::uuid::Uuid::now_v7();
        assert_eq!(a.get_version_num(), 7);
        assert!(a.to_string() < b.to_string(), "v7 ids sort by time");
        assert_eq!(::uuid::Uuid::new_v4().get_version_num(), 4);
    }
}
