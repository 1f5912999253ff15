//! The process-wide SQLite settings take effect when made before SQLite's first use (a test
//! binary of its own, so that nothing in this process has used SQLite before).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

/// SQLite's count of the memory it holds, which it keeps only while its statistics are on.
fn memory_used() -> i64 {
    let (mut current, mut high) = (0i64, 0i64);
    // SAFETY: plain reads of two counters into locals.
    let rc = unsafe { rusqlite::ffi::sqlite3_status64(rusqlite::ffi::SQLITE_STATUS_MEMORY_USED, &mut current, &mut high, 0) };
    assert_eq!(rc, rusqlite::ffi::SQLITE_OK);
    current
}

#[test]
fn memory_statistics_are_off_after_configure() {
    rustomnic_resource_state::store::configure_sqlite();
    let dir = tempfile::tempdir().unwrap();
    let conn = rustomnic_resource_state::store::open(&dir.path().join("state.sqlite"), Duration::from_secs(5)).unwrap();
    conn.execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (randomblob(100000));").unwrap();
    // With the statistics on (SQLite's default) this is the size of the page cache and more.
    assert_eq!(memory_used(), 0, "SQLite still counts its memory: the setting did not take effect");
}
