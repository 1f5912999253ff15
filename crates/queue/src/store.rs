//! The queue's SQL: enqueue, the due calls, completion, results, and the operations of
//! `pmnc queue`. Every function blocks; the writer and dispatcher threads call them.
//! The tables are made by the state file's migrations (crates/resources/state/src/store.rs),
//! since the queue lives in the cage's state file.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OptionalExtension};
use rustomnic_resource_state::store::sql_error;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

fn fail(path: &Path, action: &str, e: rusqlite::Error) -> String {
    sql_error(path, action, e).message
}

/// A call as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct NewCall {
    pub id: String,
    pub queue: String,
    pub module: String,
    pub function: String,
    /// The arguments as one encoded array (the state codec).
    pub args: Vec<u8>,
    pub from_cage: String,
    pub created_ms: i64,
    pub due_ms: i64,
    pub expires_ms: i64,
    pub keep_until_ms: i64,
    /// The call's own limit of attempts (None: the queue's).
    pub max_attempts: Option<i64>,
    /// The W3C traceparent of the request that made the call.
    pub trace: Option<String>,
    /// The workflow the call is a step of.
    pub workflow: Option<String>,
    /// Its continuation, encoded (crate::workflow::Cont): what is stored when it ends.
    pub cont: Option<Vec<u8>>,
}

/// Inserts a call unless its id is known; true when inserted. A step of a workflow cancelled
/// in this file is stored cancelled: it never runs.
pub fn insert(tx: &Connection, path: &Path, c: &NewCall) -> Result<bool, String> {
    // A call outside a workflow takes the one-row form: an INSERT ... SELECT may write many rows,
    // so SQLite keeps a statement journal for it, a copy of every page it touches (decision 160).
    let sql = if c.workflow.is_none() {
        "INSERT INTO queue_calls (id, queue, module, function, args, from_cage, status, created_ms, due_ms, expires_ms, keep_until_ms, max_attempts, trace, workflow, cont)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'pending', ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)
         ON CONFLICT (id) DO NOTHING"
    } else {
        "INSERT INTO queue_calls (id, queue, module, function, args, from_cage, status, created_ms, due_ms, expires_ms, keep_until_ms, max_attempts, trace, workflow, cont, finished_ms, error)
         SELECT ?1, ?2, ?3, ?4, ?5, ?6, CASE WHEN w.id IS NULL THEN 'pending' ELSE 'cancelled' END, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14,
                CASE WHEN w.id IS NULL THEN NULL ELSE ?7 END, CASE WHEN w.id IS NULL THEN NULL ELSE 'cancelled with its workflow' END
         FROM (SELECT 1) LEFT JOIN queue_workflows w ON w.id = ?13 AND w.status = 'cancelled'
         WHERE true ON CONFLICT (id) DO NOTHING"
    };
    tx.prepare_cached(sql)
        .and_then(|mut s| {
            s.execute(params![
                c.id,
                c.queue,
                c.module,
                c.function,
                c.args,
                c.from_cage,
                c.created_ms,
                c.due_ms,
                c.expires_ms,
                c.keep_until_ms,
                c.max_attempts,
                c.trace,
                c.workflow,
                c.cont
            ])
        })
        .map(|n| n == 1)
        .map_err(|e| fail(path, "queue: cannot store call", e))
}

/// A call to another cage, kept in the sender's outbox until the target accepted it.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxCall {
    pub id: String,
    pub cage: String,
    pub queue: String,
    pub module: String,
    pub function: String,
    pub args: Vec<u8>,
    pub created_ms: i64,
    /// When the first attempt may start at the target (absolute, from delay or at).
    pub due_ms: i64,
    /// When the sender stops forwarding it; the call's own expiry when `expires_given`.
    pub expires_ms: i64,
    /// False when the call has no expiry of its own and the sender did not know the target
    /// queue's `expires_in`: the target then sets the expiry from its queue's.
    pub expires_given: bool,
    /// The call's own limit of attempts, carried to the target.
    pub max_attempts: Option<i64>,
    /// The W3C traceparent of the request that made the call, carried to the target.
    pub trace: Option<String>,
    /// The workflow the call is a step of, carried to the target.
    pub workflow: Option<String>,
    /// Its continuation, encoded, carried to the target.
    pub cont: Option<Vec<u8>>,
}

/// Stores an outbox call unless its id is known; true when stored.
pub fn outbox_insert(tx: &Connection, path: &Path, c: &OutboxCall) -> Result<bool, String> {
    tx.prepare_cached(
        "INSERT INTO queue_outbox (id, cage, queue, module, function, args, created_ms, next_ms, due_ms, expires_ms, expires_given, max_attempts, trace, workflow, cont)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14) ON CONFLICT (id) DO NOTHING",
    )
    .and_then(|mut s| {
        s.execute(params![
            c.id,
            c.cage,
            c.queue,
            c.module,
            c.function,
            c.args,
            c.created_ms,
            c.due_ms,
            c.expires_ms,
            c.expires_given,
            c.max_attempts,
            c.trace,
            c.workflow,
            c.cont
        ])
    })
    .map(|n| n == 1)
    .map_err(|e| fail(path, "queue: cannot store an outgoing call", e))
}

/// Outbox calls to forward now (oldest first), as (seq, call, attempts).
pub fn outbox_due(conn: &Connection, path: &Path, now: i64, limit: usize) -> Result<Vec<(i64, OutboxCall, i64)>, String> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT seq, id, cage, queue, module, function, args, created_ms, due_ms, expires_ms, expires_given, attempts, max_attempts, trace, workflow, cont FROM queue_outbox
             INDEXED BY queue_outbox_next WHERE status = 'pending' AND next_ms <= ?1 ORDER BY next_ms, seq LIMIT ?2",
        )
        .map_err(|e| fail(path, "queue: cannot read the outbox", e))?;
    let rows = stmt
        .query_map(params![now, limit as i64], |r| {
            Ok((
                r.get(0)?,
                OutboxCall {
                    id: r.get(1)?,
                    cage: r.get(2)?,
                    queue: r.get(3)?,
                    module: r.get(4)?,
                    function: r.get(5)?,
                    args: r.get(6)?,
                    created_ms: r.get(7)?,
                    due_ms: r.get(8)?,
                    expires_ms: r.get(9)?,
                    expires_given: r.get(10)?,
                    max_attempts: r.get(12)?,
                    trace: r.get(13)?,
                    workflow: r.get(14)?,
                    cont: r.get(15)?,
                },
                r.get(11)?,
            ))
        })
        .map_err(|e| fail(path, "queue: cannot read the outbox", e))?;
    rows.collect::<Result<Vec<_>, _>>().map_err(|e| fail(path, "queue: cannot read the outbox", e))
}

/// The earliest time an outbox call waits for, if any.
pub fn outbox_next(conn: &Connection, path: &Path) -> Result<Option<i64>, String> {
    conn.prepare_cached("SELECT min(next_ms) FROM queue_outbox INDEXED BY queue_outbox_next WHERE status = 'pending'")
        .and_then(|mut s| s.query_row([], |r| r.get(0)))
        .map_err(|e| fail(path, "queue: cannot read the outbox", e))
}

/// The end of a forwarding attempt: accepted (the row is kept, without its arguments, as a
/// record of where the call went), retry at `next_ms`, or dead.
pub fn outbox_end(tx: &Connection, path: &Path, seq: i64, end: &OutboxEnd) -> Result<(), String> {
    let now = now_ms();
    let r = match end {
        OutboxEnd::Accepted { keep_until_ms } => tx
            .prepare_cached("UPDATE queue_outbox SET status = 'forwarded', attempts = attempts + 1, args = x'', error = NULL, finished_ms = ?2, keep_until_ms = ?3 WHERE seq = ?1")
            .and_then(|mut s| s.execute(params![seq, now, keep_until_ms])),
        OutboxEnd::Retry { next_ms, error } => tx
            .prepare_cached("UPDATE queue_outbox SET attempts = attempts + 1, next_ms = ?2, error = ?3 WHERE seq = ?1")
            .and_then(|mut s| s.execute(params![seq, next_ms, error])),
        OutboxEnd::Dead { error } => tx
            .prepare_cached("UPDATE queue_outbox SET attempts = attempts + 1, status = 'dead', error = ?2, finished_ms = ?3 WHERE seq = ?1")
            .and_then(|mut s| s.execute(params![seq, error, now])),
    };
    r.map(|_| ()).map_err(|e| fail(path, "queue: cannot update the outbox", e))
}

/// One outbox row, for results and `pmnc queue`.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxRecord {
    pub seq: i64,
    pub id: String,
    pub cage: String,
    pub queue: String,
    pub target: String,
    /// pending, dead or forwarded.
    pub status: String,
    /// Forwarding attempts made.
    pub attempts: i64,
    pub created_ms: i64,
    pub next_ms: i64,
    pub due_ms: i64,
    pub expires_ms: i64,
    pub expires_given: bool,
    pub finished_ms: Option<i64>,
    pub error: Option<String>,
    pub args: Vec<u8>,
}

const OUTBOX_RECORD: &str = "SELECT seq, id, cage, queue, module || '.' || function, status, attempts, created_ms, next_ms, due_ms, expires_ms, expires_given, finished_ms, error, args FROM queue_outbox";

fn outbox_record(r: &rusqlite::Row) -> rusqlite::Result<OutboxRecord> {
    let cage: String = r.get(2)?;
    let call: String = r.get(4)?;
    Ok(OutboxRecord {
        seq: r.get(0)?,
        id: r.get(1)?,
        target: format!("{cage}.{call}"),
        cage,
        queue: r.get(3)?,
        status: r.get(5)?,
        attempts: r.get(6)?,
        created_ms: r.get(7)?,
        next_ms: r.get(8)?,
        due_ms: r.get(9)?,
        expires_ms: r.get(10)?,
        expires_given: r.get(11)?,
        finished_ms: r.get(12)?,
        error: r.get(13)?,
        args: r.get(14)?,
    })
}

/// The outbox row of call `id`, if this file's outbox holds it.
pub fn outbox_find(conn: &Connection, path: &Path, id: &str) -> Result<Option<OutboxRecord>, String> {
    conn.prepare_cached(&format!("{OUTBOX_RECORD} WHERE id = ?1"))
        .and_then(|mut s| s.query_row([id], outbox_record).optional())
        .map_err(|e| fail(path, "queue: cannot read the outbox", e))
}

/// Outbox rows in `status`, oldest first, at most `limit`.
pub fn outbox_list(conn: &Connection, path: &Path, status: &str, limit: usize) -> Result<Vec<OutboxRecord>, String> {
    let mut stmt =
        conn.prepare(&format!("{OUTBOX_RECORD} WHERE status = ?1 ORDER BY seq LIMIT ?2")).map_err(|e| fail(path, "queue: cannot list the outbox", e))?;
    let rows = stmt.query_map(params![status, limit as i64], outbox_record).map_err(|e| fail(path, "queue: cannot list the outbox", e))?;
    rows.collect::<Result<Vec<_>, _>>().map_err(|e| fail(path, "queue: cannot list the outbox", e))
}

/// (waiting, dead, forwarded) calls in the outbox.
pub fn outbox_counts(conn: &Connection, path: &Path) -> Result<(u64, u64, u64), String> {
    conn.query_row(
        "SELECT coalesce(sum(status = 'pending'), 0), coalesce(sum(status = 'dead'), 0), coalesce(sum(status = 'forwarded'), 0) FROM queue_outbox",
        [],
        |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64, r.get::<_, i64>(2)? as u64)),
    )
    .map_err(|e| fail(path, "queue: cannot read the outbox", e))
}

/// Puts a dead or waiting outbox call back to be forwarded now; false when there is none.
pub fn outbox_retry(tx: &Connection, path: &Path, id: &str, extend_ms: i64) -> Result<bool, String> {
    let now = now_ms();
    tx.prepare_cached("UPDATE queue_outbox SET status = 'pending', next_ms = ?2, expires_ms = max(expires_ms, ?3), finished_ms = NULL WHERE id = ?1 AND status IN ('pending', 'dead')")
        .and_then(|mut s| s.execute(params![id, now, now + extend_ms]))
        .map(|n| n == 1)
        .map_err(|e| fail(path, "queue: cannot retry", e))
}

#[derive(Debug, Clone, PartialEq)]
pub enum OutboxEnd {
    Accepted { keep_until_ms: i64 },
    Retry { next_ms: i64, error: String },
    Dead { error: String },
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Returned: the encoded values, kept until `result_until_ms`.
    Done { result: Vec<u8>, result_until_ms: i64, keep_until_ms: i64 },
    /// Raised; try again at `due_ms`.
    Retry { error: String, due_ms: i64 },
    /// Raised (or was found expired) and will not be tried again.
    Dead { error: String },
}

/// Whether call `seq` was cancelled (while its attempt ran: the attempt's end is then recorded
/// with [`complete_cancelled`], and its state writes are dropped).
pub fn is_cancelled(tx: &Connection, path: &Path, seq: i64) -> Result<bool, String> {
    tx.prepare_cached("SELECT status = 'cancelled' FROM queue_calls WHERE seq = ?1")
        .and_then(|mut s| s.query_row([seq], |r| r.get::<_, bool>(0)).optional())
        .map(|c| c.unwrap_or(false))
        .map_err(|e| fail(path, "queue: cannot read a call", e))
}

/// Records the end of an attempt of a call cancelled while it ran: it stays cancelled, its
/// attempt counted and its outcome noted, nothing of it kept (no result, no retry).
pub fn complete_cancelled(tx: &Connection, path: &Path, seq: i64, outcome: &Outcome) -> Result<(), String> {
    let how = match outcome {
        Outcome::Done { .. } => "it succeeded; its result and state writes were dropped".to_string(),
        Outcome::Retry { error, .. } | Outcome::Dead { error } => format!("it failed: {error}"),
    };
    tx.prepare_cached(
        "UPDATE queue_calls SET attempts = attempts + 1, finished_ms = ?2, error = 'cancelled while attempt ' || (attempts + 1) || ' ran; ' || ?3 WHERE seq = ?1 AND status = 'cancelled'",
    )
    .and_then(|mut s| s.execute(params![seq, now_ms(), how]))
    .map(|_| ())
    .map_err(|e| fail(path, "queue: cannot record the end of a call", e))
}

/// What a cancel found and did.
#[derive(Debug, Clone, PartialEq)]
pub enum Cancel {
    /// Cancelled now; the status it was in (pending or failed; a running call reads as one
    /// of these in the file).
    Cancelled(String),
    /// Nothing changed: the call was already cancelled, or it ended (done, dead).
    Unchanged(String),
    /// No such call in this file's queue.
    Unknown,
}

/// Cancels call `id`: a waiting call (pending, failed, or running now, which the file shows as
/// one of those) becomes `cancelled` and is never started again; it is then kept until
/// `keep_until_ms` (at least), like a done call, so that its id keeps refusing the same id.
pub fn cancel(tx: &Connection, path: &Path, id: &str, keep_until_ms: i64) -> Result<Cancel, String> {
    let found: Option<(i64, String)> = tx
        .prepare_cached("SELECT seq, status FROM queue_calls WHERE id = ?1")
        .and_then(|mut s| s.query_row([id], |r| Ok((r.get(0)?, r.get(1)?))).optional())
        .map_err(|e| fail(path, "queue: cannot read a call", e))?;
    let Some((seq, status)) = found else { return Ok(Cancel::Unknown) };
    if status != "pending" && status != "failed" {
        return Ok(Cancel::Unchanged(status));
    }
    tx.prepare_cached(
        "UPDATE queue_calls SET status = 'cancelled', finished_ms = ?2, keep_until_ms = max(keep_until_ms, ?3), error = 'cancelled' || coalesce(' (last error: ' || error || ')', '') WHERE seq = ?1",
    )
    .and_then(|mut s| s.execute(params![seq, now_ms(), keep_until_ms]))
    .map_err(|e| fail(path, "queue: cannot cancel a call", e))?;
    Ok(Cancel::Cancelled(status))
}

/// Records the end of an attempt of call `seq`.
pub fn complete(tx: &Connection, path: &Path, seq: i64, outcome: &Outcome) -> Result<(), String> {
    let now = now_ms();
    let r = match outcome {
        Outcome::Done { result, result_until_ms, keep_until_ms } => tx
            .prepare_cached("UPDATE queue_calls SET status = 'done', attempts = attempts + 1, finished_ms = ?2, result = ?3, result_until_ms = ?4, keep_until_ms = max(keep_until_ms, ?5), error = NULL WHERE seq = ?1")
            .and_then(|mut s| s.execute(params![seq, now, result, result_until_ms, keep_until_ms])),
        Outcome::Retry { error, due_ms } => tx
            .prepare_cached("UPDATE queue_calls SET status = 'failed', attempts = attempts + 1, due_ms = ?2, error = ?3 WHERE seq = ?1")
            .and_then(|mut s| s.execute(params![seq, due_ms, error])),
        Outcome::Dead { error } => tx
            .prepare_cached("UPDATE queue_calls SET status = 'dead', attempts = attempts + 1, finished_ms = ?2, error = ?3 WHERE seq = ?1")
            .and_then(|mut s| s.execute(params![seq, now, error])),
    };
    r.map(|_| ()).map_err(|e| fail(path, "queue: cannot record the end of a call", e))
}

/// Marks an expired call dead without running it.
pub fn expire(tx: &Connection, path: &Path, seq: i64) -> Result<(), String> {
    tx.prepare_cached(
        "UPDATE queue_calls SET status = 'dead', finished_ms = ?2, error = coalesce(error || ' (then expired)', 'expired before it could run') WHERE seq = ?1 AND status IN ('pending', 'failed')",
    )
    .and_then(|mut s| s.execute(params![seq, now_ms()]))
    .map(|_| ())
    .map_err(|e| fail(path, "queue: cannot move an expired call to dead letters", e))
}

/// Forgets done calls past their de-duplication window, clears results past their time and
/// forgets forwarded outbox records past theirs: at most `limit` rows of each kind, so that one
/// commit never holds a huge delete (its WAL would grow with it). Returns how many rows changed;
/// `limit` of them or more means there may be more to do.
pub fn prune(tx: &Connection, path: &Path, now: i64, limit: usize) -> Result<usize, String> {
    let mut changed = 0;
    for sql in [
        "DELETE FROM queue_calls WHERE seq IN (SELECT seq FROM queue_calls INDEXED BY queue_calls_kept WHERE status = 'done' AND keep_until_ms < ?1 LIMIT ?2)",
        "DELETE FROM queue_calls WHERE seq IN (SELECT seq FROM queue_calls INDEXED BY queue_calls_cancelled WHERE status = 'cancelled' AND keep_until_ms < ?1 LIMIT ?2)",
        "UPDATE queue_calls SET result = NULL, result_until_ms = NULL WHERE seq IN (SELECT seq FROM queue_calls INDEXED BY queue_calls_results WHERE result_until_ms IS NOT NULL AND result_until_ms < ?1 LIMIT ?2)",
        "DELETE FROM queue_outbox WHERE seq IN (SELECT seq FROM queue_outbox INDEXED BY queue_outbox_kept WHERE status = 'forwarded' AND keep_until_ms < ?1 LIMIT ?2)",
        // Workflows: their records past their time, and joins that ended, with their parts.
        "DELETE FROM queue_workflows WHERE id IN (SELECT id FROM queue_workflows WHERE keep_until_ms < ?1 LIMIT ?2)",
        "DELETE FROM queue_join_parts WHERE join_id IN (SELECT id FROM queue_joins WHERE status <> 'pending' AND keep_until_ms < ?1 LIMIT ?2)",
        "DELETE FROM queue_joins WHERE id IN (SELECT id FROM queue_joins WHERE status <> 'pending' AND keep_until_ms < ?1 LIMIT ?2)",
    ] {
        changed = changed.max(tx.prepare_cached(sql).and_then(|mut s| s.execute(params![now, limit as i64])).map_err(|e| fail(path, "queue: cannot prune", e))?);
    }
    Ok(changed)
}

/// A call ready to run.
#[derive(Debug, Clone)]
pub struct Due {
    pub seq: i64,
    pub id: String,
    pub from_cage: String,
    pub module: String,
    pub function: String,
    pub args: Vec<u8>,
    pub attempts: i64,
    pub due_ms: i64,
    pub expires_ms: i64,
    /// The call's own limit of attempts (None: the queue's).
    pub max_attempts: Option<i64>,
    /// The W3C traceparent of the request that made the call.
    pub trace: Option<String>,
}

/// Up to `limit` calls of `queue` waiting to run as (seq, due_ms), earliest first (by enqueue
/// order with `in_order`, due or not: the first one then holds the rest). Read from the partial
/// index alone, since most of them are usually running already and are skipped.
pub fn waiting(conn: &Connection, path: &Path, queue: &str, in_order: bool, limit: usize) -> Result<Vec<(i64, i64)>, String> {
    let sql = if in_order {
        "SELECT seq, due_ms FROM queue_calls WHERE queue = ?1 AND status IN ('pending', 'failed') ORDER BY seq LIMIT ?2"
    } else {
        "SELECT seq, due_ms FROM queue_calls INDEXED BY queue_calls_due WHERE queue = ?1 AND status IN ('pending', 'failed') ORDER BY due_ms, seq LIMIT ?2"
    };
    let mut stmt = conn.prepare_cached(sql).map_err(|e| fail(path, "queue: cannot read due calls", e))?;
    let rows = stmt.query_map(params![queue, limit as i64], |r| Ok((r.get(0)?, r.get(1)?))).map_err(|e| fail(path, "queue: cannot read due calls", e))?;
    rows.collect::<Result<Vec<_>, _>>().map_err(|e| fail(path, "queue: cannot read due calls", e))
}

/// The call `seq` if it still waits.
pub fn due(conn: &Connection, path: &Path, seq: i64) -> Result<Option<Due>, String> {
    conn.prepare_cached(
        "SELECT seq, id, module, function, args, attempts, due_ms, expires_ms, from_cage, max_attempts, trace FROM queue_calls WHERE seq = ?1 AND status IN ('pending', 'failed')",
    )
    .and_then(|mut s| {
        s.query_row([seq], |r| {
            Ok(Due {
                seq: r.get(0)?,
                id: r.get(1)?,
                from_cage: r.get(8)?,
                module: r.get(2)?,
                function: r.get(3)?,
                args: r.get(4)?,
                attempts: r.get(5)?,
                due_ms: r.get(6)?,
                expires_ms: r.get(7)?,
                max_attempts: r.get(9)?,
                trace: r.get(10)?,
            })
        })
        .optional()
    })
    .map_err(|e| fail(path, "queue: cannot read a due call", e))
}

/// One call's stored record, for results and `pmnc queue show`.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub seq: i64,
    pub id: String,
    pub queue: String,
    pub target: String,
    pub from_cage: String,
    pub status: String,
    pub attempts: i64,
    pub created_ms: i64,
    pub due_ms: i64,
    pub expires_ms: i64,
    pub finished_ms: Option<i64>,
    pub result: Option<Vec<u8>>,
    pub error: Option<String>,
    pub args: Vec<u8>,
}

const RECORD: &str = "SELECT seq, id, queue, module || '.' || function, from_cage, status, attempts, created_ms, due_ms, expires_ms, finished_ms, result, error, args FROM queue_calls";

fn record(r: &rusqlite::Row) -> rusqlite::Result<Record> {
    Ok(Record {
        seq: r.get(0)?,
        id: r.get(1)?,
        queue: r.get(2)?,
        target: r.get(3)?,
        from_cage: r.get(4)?,
        status: r.get(5)?,
        attempts: r.get(6)?,
        created_ms: r.get(7)?,
        due_ms: r.get(8)?,
        expires_ms: r.get(9)?,
        finished_ms: r.get(10)?,
        result: r.get(11)?,
        error: r.get(12)?,
        args: r.get(13)?,
    })
}

pub fn find(conn: &Connection, path: &Path, id: &str) -> Result<Option<Record>, String> {
    conn.prepare_cached(&format!("{RECORD} WHERE id = ?1"))
        .and_then(|mut s| s.query_row([id], record).optional())
        .map_err(|e| fail(path, "queue: cannot read a call", e))
}

/// Calls in `status` (every status when None), oldest first, at most `limit`.
pub fn list(conn: &Connection, path: &Path, status: Option<&str>, limit: usize) -> Result<Vec<Record>, String> {
    let mut stmt =
        conn.prepare(&format!("{RECORD} WHERE (?1 IS NULL OR status = ?1) ORDER BY seq LIMIT ?2")).map_err(|e| fail(path, "queue: cannot list calls", e))?;
    let rows = stmt.query_map(params![status, limit as i64], record).map_err(|e| fail(path, "queue: cannot list calls", e))?;
    rows.collect::<Result<Vec<_>, _>>().map_err(|e| fail(path, "queue: cannot list calls", e))
}

/// Figures of one queue, for monitoring.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QueueFigures {
    pub queue: String,
    /// Calls waiting (pending or failed and waiting for a retry).
    pub depth: u64,
    /// Age in seconds of the oldest waiting call.
    pub oldest_age: f64,
    /// Waiting calls that have failed at least once.
    pub retrying: u64,
    /// Attempts made so far by waiting calls beyond their first.
    pub retries: u64,
    pub dead: u64,
    /// Done calls kept for de-duplication; counted only for `pmnc queue ls` (0 otherwise).
    pub done_kept: u64,
}

/// Figures of every queue with calls. Read from the partial indexes of waiting and dead calls,
/// so that the monitor, which asks every second, never scans the done calls (a scan holds a read
/// snapshot long enough to keep the WAL from being emptied); `done_kept` is counted only when
/// `count_done` (`pmnc queue ls`), else 0.
pub fn figures(conn: &Connection, path: &Path, count_done: bool) -> Result<Vec<QueueFigures>, String> {
    let now = now_ms();
    let fail = |e| fail(path, "queue: cannot read figures", e);
    let mut by_queue: std::collections::BTreeMap<String, QueueFigures> = Default::default();
    let waiting = "SELECT queue, count(*), min(created_ms), sum(status = 'failed'), sum(CASE WHEN attempts > 0 THEN attempts ELSE 0 END)
         FROM queue_calls INDEXED BY queue_calls_due WHERE status IN ('pending', 'failed') GROUP BY queue";
    let mut stmt = conn.prepare_cached(waiting).map_err(fail)?;
    let rows = stmt
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get::<_, Option<i64>>(2)?, r.get::<_, i64>(3)?, r.get::<_, i64>(4)?)))
        .map_err(fail)?;
    for row in rows {
        let (queue, depth, oldest, retrying, retries) = row.map_err(fail)?;
        let f = by_queue.entry(queue.clone()).or_insert_with(|| QueueFigures { queue, ..Default::default() });
        f.depth = depth as u64;
        f.oldest_age = oldest.map(|o| (now - o).max(0) as f64 / 1000.0).unwrap_or(0.0);
        f.retrying = retrying as u64;
        f.retries = retries as u64;
    }
    let mut counts = vec![("SELECT queue, count(*) FROM queue_calls INDEXED BY queue_calls_dead WHERE status = 'dead' GROUP BY queue", false)];
    if count_done {
        counts.push(("SELECT queue, count(*) FROM queue_calls WHERE status = 'done' GROUP BY queue", true));
    }
    for (sql, done) in counts {
        let mut stmt = conn.prepare_cached(sql).map_err(fail)?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))).map_err(fail)?;
        for row in rows {
            let (queue, n) = row.map_err(fail)?;
            let f = by_queue.entry(queue.clone()).or_insert_with(|| QueueFigures { queue, ..Default::default() });
            if done {
                f.done_kept = n as u64;
            } else {
                f.dead = n as u64;
            }
        }
    }
    Ok(by_queue.into_values().collect())
}

/// Puts a failed or dead call back to run now; false when there is no such call to retry.
pub fn retry(tx: &Connection, path: &Path, id: &str, extend_ms: i64) -> Result<bool, String> {
    let now = now_ms();
    tx.prepare_cached("UPDATE queue_calls SET status = 'pending', due_ms = ?2, expires_ms = max(expires_ms, ?3), finished_ms = NULL WHERE id = ?1 AND status IN ('failed', 'dead', 'pending')")
        .and_then(|mut s| s.execute(params![id, now, now + extend_ms]))
        .map(|n| n == 1)
        .map_err(|e| fail(path, "queue: cannot retry", e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustomnic_resource_state::store::{apply_in, open, Write};

    fn call(id: &str, due: i64) -> NewCall {
        NewCall {
            id: id.into(),
            queue: "q".into(),
            module: "m".into(),
            function: "f".into(),
            args: vec![1, 6, 0],
            from_cage: "web".into(),
            created_ms: 1,
            due_ms: due,
            expires_ms: 1_000_000,
            keep_until_ms: 10,
            max_attempts: None,
            trace: None,
            workflow: None,
            cont: None,
        }
    }

    #[test]
    fn ids_deduplicate_and_completion_commits_with_state_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.sqlite");
        let mut c = open(&path, std::time::Duration::from_secs(5)).unwrap();
        assert!(insert(&c, &path, &call("a", 5)).unwrap());
        assert!(!insert(&c, &path, &call("a", 1)).unwrap(), "a known id is not stored again");
        assert!(insert(&c, &path, &call("b", 3)).unwrap());
        let ids = |rows: Vec<(i64, i64)>| rows.iter().map(|(seq, _)| due(&c, &path, *seq).unwrap().unwrap().id).collect::<Vec<_>>();
        let due_rows: Vec<Due> = waiting(&c, &path, "q", false, 10).unwrap().iter().map(|(seq, _)| due(&c, &path, *seq).unwrap().unwrap()).collect();
        assert_eq!(ids(waiting(&c, &path, "q", false, 10).unwrap()), ["b", "a"], "earliest due first");
        assert_eq!(ids(waiting(&c, &path, "q", true, 10).unwrap()), ["a", "b"], "keep_order: enqueue order");
        let due = due_rows;

        // A completion whose transaction is rolled back leaves neither the writes nor "done".
        let tx = c.transaction().unwrap();
        apply_in(&tx, &path, &[Write::Set("k".into(), vec![1, 2])]).unwrap();
        complete(&tx, &path, due[0].seq, &Outcome::Done { result: vec![1, 0], result_until_ms: 5, keep_until_ms: 20 }).unwrap();
        drop(tx);
        assert_eq!(find(&c, &path, "b").unwrap().unwrap().status, "pending");
        assert_eq!(c.query_row("SELECT count(*) FROM state", [], |r| r.get::<_, i64>(0)).unwrap(), 0);

        let tx = c.transaction().unwrap();
        apply_in(&tx, &path, &[Write::Set("k".into(), vec![1, 2])]).unwrap();
        complete(&tx, &path, due[0].seq, &Outcome::Done { result: vec![1, 0], result_until_ms: 5, keep_until_ms: 20 }).unwrap();
        tx.commit().unwrap();
        let b = find(&c, &path, "b").unwrap().unwrap();
        assert_eq!((b.status.as_str(), b.attempts, b.result), ("done", 1, Some(vec![1, 0])));
        assert_eq!(c.query_row("SELECT count(*) FROM state", [], |r| r.get::<_, i64>(0)).unwrap(), 1);

        // Results go first, then the row after its de-duplication window.
        prune(&c, &path, 6, 100).unwrap();
        assert_eq!(find(&c, &path, "b").unwrap().unwrap().result, None);
        prune(&c, &path, 21, 100).unwrap();
        assert_eq!(find(&c, &path, "b").unwrap(), None);
        assert!(find(&c, &path, "a").unwrap().is_some(), "waiting calls are never pruned");
    }

    /// Issue 18: a waiting call is cancelled once and never handed out again; a second cancel
    /// changes nothing; an ended call is not cancelled; an attempt that ends after the cancel
    /// leaves the call cancelled (its end noted); an expiry after it does not revive it; the
    /// record goes after its window like a done call.
    #[test]
    fn cancel_stops_a_waiting_call_for_good_and_leaves_ended_calls_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.sqlite");
        let c = open(&path, std::time::Duration::from_secs(5)).unwrap();
        insert(&c, &path, &call("a", 1)).unwrap();
        insert(&c, &path, &call("b", 1)).unwrap();
        let seq_a = find(&c, &path, "a").unwrap().unwrap().seq;
        complete(&c, &path, seq_a, &Outcome::Retry { error: "boom".into(), due_ms: 2 }).unwrap();
        assert_eq!(cancel(&c, &path, "a", 50).unwrap(), Cancel::Cancelled("failed".into()));
        let a = find(&c, &path, "a").unwrap().unwrap();
        assert_eq!((a.status.as_str(), a.error.as_deref()), ("cancelled", Some("cancelled (last error: boom)")));
        assert!(a.finished_ms.is_some());
        assert_eq!(cancel(&c, &path, "a", 50).unwrap(), Cancel::Unchanged("cancelled".into()), "twice is harmless");
        assert!(due(&c, &path, seq_a).unwrap().is_none(), "a cancelled call is never due");
        let waiting_ids: Vec<i64> = waiting(&c, &path, "q", false, 10).unwrap().into_iter().map(|(s, _)| s).collect();
        assert!(!waiting_ids.contains(&seq_a));
        // The attempt that was running when it was cancelled ends: still cancelled, counted.
        assert!(is_cancelled(&c, &path, seq_a).unwrap());
        complete_cancelled(&c, &path, seq_a, &Outcome::Retry { error: "late".into(), due_ms: 9 }).unwrap();
        let a = find(&c, &path, "a").unwrap().unwrap();
        assert_eq!((a.status.as_str(), a.attempts, a.error.as_deref()), ("cancelled", 2, Some("cancelled while attempt 2 ran; it failed: late")));
        expire(&c, &path, seq_a).unwrap();
        assert_eq!(find(&c, &path, "a").unwrap().unwrap().status, "cancelled", "an expiry does not touch a cancelled call");
        // Ended calls.
        let seq_b = find(&c, &path, "b").unwrap().unwrap().seq;
        assert!(!is_cancelled(&c, &path, seq_b).unwrap());
        complete(&c, &path, seq_b, &Outcome::Done { result: vec![1, 0], result_until_ms: 5, keep_until_ms: 20 }).unwrap();
        assert_eq!(cancel(&c, &path, "b", 50).unwrap(), Cancel::Unchanged("done".into()));
        assert_eq!(cancel(&c, &path, "nope", 50).unwrap(), Cancel::Unknown);
        insert(&c, &path, &call("d", 1)).unwrap();
        let seq_d = find(&c, &path, "d").unwrap().unwrap().seq;
        complete(&c, &path, seq_d, &Outcome::Dead { error: "x".into() }).unwrap();
        assert_eq!(cancel(&c, &path, "d", 50).unwrap(), Cancel::Unchanged("dead".into()));
        // Its id keeps refusing the same id until its window ends, then it is pruned.
        assert!(!insert(&c, &path, &call("a", 1)).unwrap());
        prune(&c, &path, 49, 100).unwrap();
        assert!(find(&c, &path, "a").unwrap().is_some());
        prune(&c, &path, 51, 100).unwrap();
        assert!(find(&c, &path, "a").unwrap().is_none());
    }

    /// A call's own max_attempts is stored and read back with it, in the queue and the outbox.
    #[test]
    fn max_attempts_is_kept_with_the_call() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.sqlite");
        let c = open(&path, std::time::Duration::from_secs(5)).unwrap();
        let trace = Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_string());
        insert(&c, &path, &NewCall { max_attempts: Some(3), trace: trace.clone(), ..call("m", 1) }).unwrap();
        let seq = find(&c, &path, "m").unwrap().unwrap().seq;
        let row = due(&c, &path, seq).unwrap().unwrap();
        assert_eq!((row.max_attempts, row.trace), (Some(3), trace));
        let out = OutboxCall {
            id: "o".into(),
            cage: "w".into(),
            queue: "q".into(),
            module: "m".into(),
            function: "f".into(),
            args: vec![1, 6, 0],
            created_ms: 1,
            due_ms: 1,
            expires_ms: 1_000_000,
            expires_given: true,
            max_attempts: Some(7),
            trace: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
            workflow: Some("wf".into()),
            cont: Some(vec![1, 0]),
        };
        outbox_insert(&c, &path, &out).unwrap();
        let rows = outbox_due(&c, &path, 5, 10).unwrap();
        assert_eq!(rows[0].1, out);
    }

    /// A step of a workflow cancelled in this file (it arrived after the cancel, from an outbox)
    /// is stored cancelled and never handed out; a step of another workflow, or no workflow's
    /// call, is stored pending.
    #[test]
    fn a_step_of_a_cancelled_workflow_is_stored_cancelled() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.sqlite");
        let c = open(&path, std::time::Duration::from_secs(5)).unwrap();
        c.execute("INSERT INTO queue_workflows (id, kind, status, created_ms, keep_until_ms) VALUES ('w', '', 'cancelled', 1, 2)", []).unwrap();
        assert!(insert(&c, &path, &NewCall { workflow: Some("w".into()), ..call("w.2", 1) }).unwrap());
        assert!(insert(&c, &path, &NewCall { workflow: Some("v".into()), ..call("v.2", 1) }).unwrap());
        assert!(insert(&c, &path, &call("plain", 1)).unwrap());
        let w = find(&c, &path, "w.2").unwrap().unwrap();
        assert_eq!((w.status.as_str(), w.error.as_deref(), w.finished_ms.is_some()), ("cancelled", Some("cancelled with its workflow"), true));
        assert_eq!(find(&c, &path, "v.2").unwrap().unwrap().status, "pending");
        assert_eq!(find(&c, &path, "plain").unwrap().unwrap().status, "pending");
        let waiting: Vec<i64> = waiting(&c, &path, "q", false, 10).unwrap().into_iter().map(|(s, _)| s).collect();
        assert_eq!(waiting.len(), 2);
        assert!(!insert(&c, &path, &NewCall { workflow: Some("w".into()), ..call("w.2", 1) }).unwrap(), "de-duplicated as any id");
    }

    /// Pruning deletes in batches, so that a backlog of done calls never goes in one commit.
    #[test]
    fn prune_goes_in_batches() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.sqlite");
        let c = open(&path, std::time::Duration::from_secs(5)).unwrap();
        for i in 0..25 {
            let id = format!("d{i}");
            insert(&c, &path, &call(&id, 1)).unwrap();
            let seq = find(&c, &path, &id).unwrap().unwrap().seq;
            complete(&c, &path, seq, &Outcome::Done { result: vec![1, 0], result_until_ms: 5, keep_until_ms: 20 }).unwrap();
        }
        let done = |c: &Connection| c.query_row("SELECT count(*) FROM queue_calls", [], |r| r.get::<_, i64>(0)).unwrap();
        assert_eq!(prune(&c, &path, 21, 10).unwrap(), 10);
        assert_eq!(done(&c), 15);
        assert_eq!(prune(&c, &path, 21, 10).unwrap(), 10);
        assert_eq!(prune(&c, &path, 21, 10).unwrap(), 5, "fewer than the batch: nothing more to do");
        assert_eq!(done(&c), 0);
    }
}
