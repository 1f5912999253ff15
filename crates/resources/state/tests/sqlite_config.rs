//! SQLite is built without the process-wide locks its memory management and memory statistics
//! take (.cargo/config.toml, LIBSQLITE3_FLAGS): every connection of the process would otherwise
//! share one page-cache mutex and one allocation mutex.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::ffi::CStr;
use std::time::Duration;

/// Whether SQLite was compiled with `option` (its name without the `SQLITE_` prefix).
fn compiled_with(option: &CStr) -> bool {
    // SAFETY: a read of SQLite's table of compile-time options with a NUL-terminated name.
    unsafe { rusqlite::ffi::sqlite3_compileoption_used(option.as_ptr()) != 0 }
}

/// SQLite's count of the memory it holds, which it keeps only while its statistics are on.
fn memory_used() -> i64 {
    let (mut current, mut high) = (0i64, 0i64);
    // SAFETY: plain reads of two counters into locals.
    let rc = unsafe { rusqlite::ffi::sqlite3_status64(rusqlite::ffi::SQLITE_STATUS_MEMORY_USED, &mut current, &mut high, 0) };
    assert_eq!(rc, rusqlite::ffi::SQLITE_OK);
    current
}

#[test]
fn sqlite_takes_no_process_wide_lock_for_pages_or_allocations() {
    assert!(!compiled_with(c"ENABLE_MEMORY_MANAGEMENT"), "SQLite was built with SQLITE_ENABLE_MEMORY_MANAGEMENT: one page-cache mutex for every connection");
    assert!(compiled_with(c"DEFAULT_MEMSTATUS=0"), "SQLite was built without SQLITE_DEFAULT_MEMSTATUS=0");
    let dir = tempfile::tempdir().unwrap();
    let conn = rustomnic_resource_state::store::open(&dir.path().join("state.sqlite"), Duration::from_secs(5)).unwrap();
    conn.execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (randomblob(100000));").unwrap();
    // With the statistics on this is the size of the page cache and more.
    assert_eq!(memory_used(), 0, "SQLite counts its memory: its statistics (and their mutex) are on");
}
