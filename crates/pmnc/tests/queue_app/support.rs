//! Helpers the durable call tests share (queue.rs, queue_cluster.rs, queue_disk.rs): the state
//! file of a cage folder, one number from it, and polling with a deadline (common's `until`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(dead_code)]

use std::path::Path;
use std::time::Duration;

use crate::common::get;
pub use crate::common::until;

/// The state file of the cage folder `cage`, to read while the cage runs.
pub fn db(cage: &Path) -> rusqlite::Connection {
    let c = rusqlite::Connection::open(cage.join(".data/state.sqlite")).unwrap();
    c.busy_timeout(Duration::from_secs(10)).unwrap();
    c
}

/// The one integer `sql` selects.
pub fn count(c: &rusqlite::Connection, sql: &str) -> i64 {
    c.query_row(sql, [], |r| r.get(0)).unwrap()
}

/// GETs `path` until the body starts with `prefix`; returns the body.
pub fn get_prefix(addr: std::net::SocketAddr, path: &str, prefix: &str, timeout: Duration) -> String {
    let mut last = String::new();
    let found = until(timeout, || {
        last = get(addr, path).text();
        last.starts_with(prefix)
    });
    assert!(found, "GET {path}: still {last:?} after {timeout:?}, waiting for {prefix:?}");
    last
}
