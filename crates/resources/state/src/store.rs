//! The SQLite side of the state resource: opening (WAL, synchronous=FULL, busy timeout), the
//! versioned schema and its migrations, and the few statements the methods need. Everything here
//! blocks; the resource runs it on tokio's blocking pool.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, ErrorCode, OpenFlags, OptionalExtension, TransactionBehavior};
use rustomnic_resource::Error;

/// Written to `PRAGMA application_id` ("RmSt") so that a state file can be told apart from any
/// other SQLite database; `file state.sqlite` shows it too.
pub const APPLICATION_ID: i32 = 0x526d_5374;

/// The schema, one step per version: `MIGRATIONS[n]` takes a file from version n to n + 1.
/// Steps are only ever appended; a released step never changes, since files in the field have
/// already run it. `PRAGMA user_version` holds the version a file is at.
const MIGRATIONS: &[&str] = &[
    // 0 -> 1: one row per key; `value` is the codec's encoding (format byte first).
    "CREATE TABLE state (
        key TEXT PRIMARY KEY NOT NULL,
        value BLOB NOT NULL,
        updated_ms INTEGER NOT NULL
    );",
    // 1 -> 2: the durable call queue of the cage (crates/queue), in the same file as the state
    // so that a call's state writes and the record that it is done commit together; the outbox
    // of calls this cage sends to other cages (stored with its state writes, then forwarded).
    // status: pending (never ran), failed (ran, raised, waits for its retry), done, dead.
    // A done row stays for the de-duplication window (keep_until_ms); `result` is cleared after
    // the result time to live (result_until_ms).
    "CREATE TABLE queue_calls (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        queue TEXT NOT NULL,
        module TEXT NOT NULL,
        function TEXT NOT NULL,
        args BLOB NOT NULL,
        from_cage TEXT NOT NULL,
        status TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        created_ms INTEGER NOT NULL,
        due_ms INTEGER NOT NULL,
        expires_ms INTEGER NOT NULL,
        finished_ms INTEGER,
        keep_until_ms INTEGER NOT NULL,
        result_until_ms INTEGER,
        result BLOB,
        error TEXT
    );
    CREATE INDEX queue_calls_due ON queue_calls (queue, due_ms, seq) WHERE status IN ('pending', 'failed');
    CREATE INDEX queue_calls_order ON queue_calls (queue, seq) WHERE status IN ('pending', 'failed');
    CREATE INDEX queue_calls_kept ON queue_calls (keep_until_ms) WHERE status = 'done';
    CREATE VIEW queue_dead_letters AS SELECT * FROM queue_calls WHERE status = 'dead';
    CREATE TABLE queue_outbox (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        cage TEXT NOT NULL,
        queue TEXT NOT NULL,
        module TEXT NOT NULL,
        function TEXT NOT NULL,
        args BLOB NOT NULL,
        status TEXT NOT NULL DEFAULT 'pending',
        attempts INTEGER NOT NULL DEFAULT 0,
        created_ms INTEGER NOT NULL,
        next_ms INTEGER NOT NULL,
        due_ms INTEGER NOT NULL,
        expires_ms INTEGER NOT NULL,
        error TEXT
    );
    CREATE TABLE queue_leases (
        name TEXT PRIMARY KEY NOT NULL,
        holder TEXT NOT NULL,
        until_ms INTEGER NOT NULL,
        last_fired_ms INTEGER NOT NULL DEFAULT 0
    );",
    // 2 -> 3 (queue, docs/decisions/035-036): an outbox row records whether its expiry is the
    // call's own or only how long the sender keeps forwarding (the target's queue then sets it);
    // a call its target accepted stays as status 'forwarded' (arguments dropped) until
    // keep_until_ms, so that pmnc.calls.result can say where it went; indexes for the
    // dispatcher's read of due rows, for pruning (results included) and for counting dead
    // letters without reading the done calls.
    "ALTER TABLE queue_outbox ADD COLUMN expires_given INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE queue_outbox ADD COLUMN keep_until_ms INTEGER;
    ALTER TABLE queue_outbox ADD COLUMN finished_ms INTEGER;
    CREATE INDEX queue_outbox_next ON queue_outbox (next_ms) WHERE status = 'pending';
    CREATE INDEX queue_outbox_kept ON queue_outbox (keep_until_ms) WHERE status = 'forwarded';
    CREATE INDEX queue_calls_results ON queue_calls (result_until_ms) WHERE result_until_ms IS NOT NULL;
    CREATE INDEX queue_calls_dead ON queue_calls (queue) WHERE status = 'dead';",
    // 3 -> 4 (queue, docs/decisions/139): a call may carry its own limit of attempts (the
    // queue's max_attempts applies when it is NULL), in the queue and in the outbox; a call can
    // be cancelled (status 'cancelled', kept like a done call until keep_until_ms, then pruned).
    "ALTER TABLE queue_calls ADD COLUMN max_attempts INTEGER;
    ALTER TABLE queue_outbox ADD COLUMN max_attempts INTEGER;
    CREATE INDEX queue_calls_cancelled ON queue_calls (keep_until_ms) WHERE status = 'cancelled';",
    // 4 -> 5 (queue and tracing, docs/decisions/148): a call keeps the W3C traceparent of the
    // request that made it, in the queue and in the outbox, so every attempt joins that trace.
    "ALTER TABLE queue_calls ADD COLUMN trace TEXT;
    ALTER TABLE queue_outbox ADD COLUMN trace TEXT;",
    // 5 -> 6 (workflows, docs/decisions/149): a call that is a step of a workflow names it
    // (`workflow`) and carries its continuation (`cont`: the rest of the chain, the on_error
    // step, the join it reports to), in the queue and in the outbox, so that the next step is
    // stored in the same commit as the end of this one. `queue_workflows`: the workflows this
    // cage made, and the ones cancelled here (no later step is stored once cancelled).
    // `queue_joins` and `queue_join_parts`: the groups and chords this cage made, one part per
    // member that ended, written once by (join, index).
    "ALTER TABLE queue_calls ADD COLUMN workflow TEXT;
    ALTER TABLE queue_calls ADD COLUMN cont BLOB;
    ALTER TABLE queue_outbox ADD COLUMN workflow TEXT;
    ALTER TABLE queue_outbox ADD COLUMN cont BLOB;
    CREATE INDEX queue_calls_workflow ON queue_calls (workflow) WHERE workflow IS NOT NULL;
    CREATE INDEX queue_outbox_workflow ON queue_outbox (workflow) WHERE workflow IS NOT NULL;
    CREATE TABLE queue_workflows (
        id TEXT PRIMARY KEY NOT NULL,
        kind TEXT NOT NULL,
        status TEXT NOT NULL,
        last_step TEXT,
        created_ms INTEGER NOT NULL,
        keep_until_ms INTEGER NOT NULL
    );
    CREATE TABLE queue_joins (
        id TEXT PRIMARY KEY NOT NULL,
        workflow TEXT NOT NULL,
        size INTEGER NOT NULL,
        status TEXT NOT NULL DEFAULT 'pending',
        body BLOB,
        result BLOB,
        error TEXT,
        created_ms INTEGER NOT NULL,
        finished_ms INTEGER,
        keep_until_ms INTEGER NOT NULL
    );
    CREATE TABLE queue_join_parts (
        join_id TEXT NOT NULL,
        idx INTEGER NOT NULL,
        member TEXT NOT NULL,
        status TEXT NOT NULL,
        value BLOB,
        error TEXT,
        PRIMARY KEY (join_id, idx)
    );",
];

/// The schema version this build writes and reads.
pub const SCHEMA_VERSION: usize = MIGRATIONS.len();

/// One staged change, applied at commit.
#[derive(Debug, Clone)]
pub enum Write {
    Set(String, Vec<u8>),
    Delete(String),
}

/// Explains an SQLite failure on `path`. Lock waits and full disks leave the connection usable;
/// anything else (I/O errors, damage) drops it, so the next call opens the file afresh.
pub fn sql_error(path: &Path, action: &str, e: rusqlite::Error) -> Error {
    let p = path.display();
    let code = e.sqlite_error_code();
    match code {
        Some(ErrorCode::DatabaseBusy) | Some(ErrorCode::DatabaseLocked) => {
            Error::new(format!("{action}: the state file {p} stayed locked by another writer past the busy timeout ({e})")).with_code("SQLITE_BUSY")
        }
        Some(ErrorCode::NotADatabase) | Some(ErrorCode::DatabaseCorrupt) => {
            Error::broken(format!("{action}: {p} is damaged or not an SQLite database ({e})")).with_code("SQLITE_CORRUPT")
        }
        Some(ErrorCode::ReadOnly) | Some(ErrorCode::CannotOpen) | Some(ErrorCode::PermissionDenied) => {
            Error::broken(format!("{action}: cannot write the state file {p} ({e})")).with_code("SQLITE_CANTOPEN")
        }
        Some(ErrorCode::DiskFull) => Error::new(format!("{action}: the disk holding {p} is full ({e})")).with_code("SQLITE_FULL"),
        _ => Error::broken(format!("{action}: state file {p}: {e}")),
    }
}

/// Opens (creating it and its folders when missing) and migrates the state file at `path`.
pub fn open(path: &Path, busy_timeout: Duration) -> Result<Connection, Error> {
    let p = path.display();
    if let Some(parent) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| Error::new(format!("cannot create the folder {} for the state file: {e}", parent.display())))?;
    }
    if path.is_dir() {
        return Err(Error::new(format!("the state file {p} is a folder")));
    }
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let mut conn = Connection::open_with_flags(path, flags).map_err(|e| sql_error(path, "cannot open", e))?;
    conn.busy_timeout(busy_timeout).map_err(|e| sql_error(path, "cannot open", e))?;
    let mode = wal_mode(&conn, path, busy_timeout)?;
    if !mode.eq_ignore_ascii_case("wal") {
        tracing::warn!("state file {p}: journal mode is {mode}, not wal (the file system may not support WAL); writers will block readers");
    }
    // FULL syncs the WAL at every commit: a committed set survives a power cut, not only a crash.
    conn.pragma_update(None, "synchronous", "FULL").map_err(|e| sql_error(path, "cannot open", e))?;
    migrate(&mut conn, path)?;
    Ok(conn)
}

/// Switches the file to WAL, which lets readers go on while one connection writes (the mode is
/// stored in the file, so this is a no-op after the first time); returns the mode now in force.
/// Switching needs the file to itself, and SQLite reports "locked" at once instead of calling
/// the busy handler when another connection holds it (several connections opening a new file
/// together do), so here the waiting is done by hand, within the same busy timeout.
fn wal_mode(conn: &Connection, path: &Path, busy_timeout: Duration) -> Result<String, Error> {
    let until = Instant::now() + busy_timeout;
    loop {
        match conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get::<_, String>(0)) {
            Ok(mode) => return Ok(mode),
            Err(e) if is_busy(&e) && Instant::now() < until => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(sql_error(path, "cannot open", e)),
        }
    }
}

fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(e.sqlite_error_code(), Some(ErrorCode::DatabaseBusy) | Some(ErrorCode::DatabaseLocked))
}

fn user_version(conn: &Connection, path: &Path) -> Result<usize, Error> {
    let v: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(|e| sql_error(path, "cannot read the schema version", e))?;
    Ok(v.max(0) as usize)
}

/// Brings the schema of `conn` up to [`SCHEMA_VERSION`]. Several connections may open the file at
/// once: the version is read again under the write lock, so each step runs exactly once.
pub fn migrate(conn: &mut Connection, path: &Path) -> Result<(), Error> {
    let p = path.display();
    let newer = |v: usize| {
        Error::broken(format!("the state file {p} has schema version {v}, newer than this build knows ({SCHEMA_VERSION}); it was written by a newer Rustomnic"))
    };
    let found = user_version(conn, path)?;
    if found == SCHEMA_VERSION {
        return Ok(());
    }
    if found > SCHEMA_VERSION {
        return Err(newer(found));
    }
    let fail = |e| sql_error(path, "cannot set up the schema", e);
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(fail)?;
    let found = user_version(&tx, path)?;
    if found > SCHEMA_VERSION {
        return Err(newer(found));
    }
    if found == 0 {
        // Version 0 is a new, empty file; an SQLite database that already holds tables of its own
        // is somebody else's and is left alone.
        let app: i32 = tx.query_row("PRAGMA application_id", [], |r| r.get(0)).map_err(fail)?;
        let tables: i64 = tx.query_row("SELECT count(*) FROM sqlite_schema", [], |r| r.get(0)).map_err(fail)?;
        if app != APPLICATION_ID && tables > 0 {
            return Err(Error::broken(format!("{p} is an SQLite database with other tables, not a Rustomnic state file")));
        }
    }
    for step in MIGRATIONS.iter().skip(found) {
        tx.execute_batch(step).map_err(fail)?;
    }
    tx.pragma_update(None, "application_id", APPLICATION_ID).map_err(fail)?;
    tx.pragma_update(None, "user_version", SCHEMA_VERSION as i64).map_err(fail)?;
    tx.commit().map_err(fail)?;
    if found > 0 {
        tracing::info!("state file {p}: schema migrated from version {found} to {SCHEMA_VERSION}");
    }
    Ok(())
}

/// The stored encoding of `key`, if set.
pub fn get(conn: &Connection, path: &Path, key: &str) -> Result<Option<Vec<u8>>, Error> {
    conn.prepare_cached("SELECT value FROM state WHERE key = ?1")
        .and_then(|mut s| s.query_row([key], |r| r.get(0)).optional())
        .map_err(|e| sql_error(path, "get", e))
}

pub fn exists(conn: &Connection, path: &Path, key: &str) -> Result<bool, Error> {
    conn.prepare_cached("SELECT 1 FROM state WHERE key = ?1").and_then(|mut s| s.exists([key])).map_err(|e| sql_error(path, "delete", e))
}

/// Keys starting with `prefix`, in byte order; more than `limit` of them is an error.
pub fn keys(conn: &Connection, path: &Path, prefix: &str, limit: usize) -> Result<Vec<String>, Error> {
    let fail = |e| sql_error(path, "keys", e);
    // The primary key index is seeked to the prefix and walked while keys still match, which
    // needs no LIKE escaping and reads no more rows than it returns (plus one).
    let mut stmt = conn.prepare_cached("SELECT key FROM state WHERE key >= ?1 ORDER BY key").map_err(fail)?;
    let mut rows = stmt.query([prefix]).map_err(fail)?;
    let mut out = Vec::new();
    while let Some(row) = rows.next().map_err(fail)? {
        let key: String = row.get(0).map_err(fail)?;
        if !key.starts_with(prefix) {
            break;
        }
        if out.len() == limit {
            return Err(Error::new(format!("keys: more than {limit} keys start with {prefix:?}; ask with a longer prefix")));
        }
        out.push(key);
    }
    Ok(out)
}

/// Applies `writes` inside a transaction the caller holds (the queue's writer, which commits
/// them together with the record that a call is done).
pub fn apply_in(tx: &Connection, path: &Path, writes: &[Write]) -> Result<(), Error> {
    let fail = |e| sql_error(path, "commit", e);
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0);
    for w in writes {
        match w {
            Write::Set(key, value) => {
                tx.prepare_cached("INSERT INTO state (key, value, updated_ms) VALUES (?1, ?2, ?3) ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated_ms = excluded.updated_ms")
                    .and_then(|mut s| s.execute(params![key, value, now]))
                    .map_err(fail)?;
            }
            Write::Delete(key) => {
                tx.prepare_cached("DELETE FROM state WHERE key = ?1").and_then(|mut s| s.execute([key])).map_err(fail)?;
            }
        }
    }
    Ok(())
}

/// Applies `writes` in one transaction that takes the write lock at once (BEGIN IMMEDIATE), so a
/// busy file is waited for (up to the busy timeout) before anything is changed.
pub fn apply(conn: &mut Connection, path: &Path, writes: &[Write]) -> Result<(), Error> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(|e| sql_error(path, "commit", e))?;
    apply_in(&tx, path, writes)?;
    tx.commit().map_err(|e| sql_error(path, "commit", e))
}

#[cfg(test)]
mod migration_tests {
    use super::*;

    /// A state file made by the build of schema `version`, holding the call `insert_call` adds
    /// (id 'old') and one outbox row (id 'out').
    fn old_file(version: usize, insert_call: &str) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.sqlite");
        let c = Connection::open(&path).unwrap();
        for step in &MIGRATIONS[..version] {
            c.execute_batch(step).unwrap();
        }
        c.pragma_update(None, "application_id", APPLICATION_ID).unwrap();
        c.pragma_update(None, "user_version", version as i64).unwrap();
        c.execute(insert_call, []).unwrap();
        c.execute(
            "INSERT INTO queue_outbox (id, cage, queue, module, function, args, created_ms, next_ms, due_ms, expires_ms) VALUES ('out', 'w', 'q', 'm', 'f', x'00', 1, 1, 1, 9)",
            [],
        )
        .unwrap();
        (dir, path)
    }

    /// A file of version 5 (before workflows) opens at the current version with its calls and
    /// outbox rows, which are no workflow's steps; the workflow tables are there and empty.
    #[test]
    fn a_version_5_file_is_upgraded_for_workflows_and_keeps_its_calls() {
        let (_dir, path) = old_file(
            5,
            "INSERT INTO queue_calls (id, queue, module, function, args, from_cage, status, created_ms, due_ms, expires_ms, keep_until_ms, trace) VALUES ('old', 'q', 'm', 'f', x'00', 'web', 'pending', 1, 2, 3, 4, 't')",
        );
        let c = open(&path, Duration::from_secs(5)).unwrap();
        let version: i64 = c.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        assert_eq!(version, SCHEMA_VERSION as i64);
        const { assert!(SCHEMA_VERSION >= 6) };
        let (status, trace, wf, cont): (String, String, Option<String>, Option<Vec<u8>>) = c
            .query_row("SELECT status, trace, workflow, cont FROM queue_calls WHERE id = 'old'", [], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .unwrap();
        assert_eq!((status.as_str(), trace.as_str(), wf, cont), ("pending", "t", None, None));
        let (wf, cont): (Option<String>, Option<Vec<u8>>) =
            c.query_row("SELECT workflow, cont FROM queue_outbox WHERE id = 'out'", [], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
        assert_eq!((wf, cont), (None, None));
        for table in ["queue_workflows", "queue_joins", "queue_join_parts"] {
            let n: i64 = c.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0)).unwrap();
            assert_eq!(n, 0, "{table}");
        }
        let index: i64 = c.query_row("SELECT count(*) FROM sqlite_schema WHERE name = 'queue_calls_workflow'", [], |r| r.get(0)).unwrap();
        assert_eq!(index, 1);
    }

    /// A file written by the build before version 4 (its calls and outbox rows without
    /// max_attempts) opens, is brought to the current version in place, and keeps its rows.
    #[test]
    fn a_version_3_file_is_upgraded_and_keeps_its_calls() {
        let (_dir, path) = old_file(
            3,
            "INSERT INTO queue_calls (id, queue, module, function, args, from_cage, status, created_ms, due_ms, expires_ms, keep_until_ms) VALUES ('old', 'q', 'm', 'f', x'00', 'web', 'pending', 1, 2, 3, 4)",
        );
        let c = open(&path, Duration::from_secs(5)).unwrap();
        let version: i64 = c.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        assert_eq!(version, SCHEMA_VERSION as i64);
        const { assert!(SCHEMA_VERSION >= 4) };
        let (status, max): (String, Option<i64>) =
            c.query_row("SELECT status, max_attempts FROM queue_calls WHERE id = 'old'", [], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
        assert_eq!((status.as_str(), max), ("pending", None));
        let max: Option<i64> = c.query_row("SELECT max_attempts FROM queue_outbox WHERE id = 'out'", [], |r| r.get(0)).unwrap();
        assert_eq!(max, None);
        let index: i64 = c.query_row("SELECT count(*) FROM sqlite_schema WHERE name = 'queue_calls_cancelled'", [], |r| r.get(0)).unwrap();
        assert_eq!(index, 1);
        drop(c);
        // Opening it again finds it current and changes nothing.
        let c = open(&path, Duration::from_secs(5)).unwrap();
        let n: i64 = c.query_row("SELECT count(*) FROM queue_calls", [], |r| r.get(0)).unwrap();
        assert_eq!(n, 1);
    }
}
