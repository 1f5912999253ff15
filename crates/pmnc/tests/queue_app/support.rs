//! Helpers the durable call tests share (queue.rs, queue_cluster.rs, queue_disk.rs): the state
//! file of a cage folder, one number from it, and polling with a deadline.
#![allow(dead_code)]

use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::get;

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

/// Polls `f` until it returns true or `timeout` passes.
pub fn until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
}

/// GETs `path` until the body starts with `prefix`; returns the body.
pub fn get_prefix(
    addr: std::net::SocketAddr,
    path: &str,
    prefix: &str,
    timeout: Duration,
) -> String {
    let mut last = String::new();
    let found = until(timeout, || {
        last = get(addr, path).text();
        last.starts_with(prefix)
    });
    assert!(
        found,
        "GET {path}: still {last:?} after {timeout:?}, waiting for {prefix:?}"
    );
    last
}
