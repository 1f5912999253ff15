//! `pmnc queue ls|show|retry|cancel|purge`: the operations on a cage's queue and outbox, on its file,
//! whether the cage runs or not (SQLite's locking lets both work on it at once).

use std::io::Write as _;
use std::path::Path;
use std::time::Duration;

use rusqlite::OpenFlags;
use rustomnic_resource_state::{decode, store::sql_error, SCHEMA_VERSION};

use crate::store::{self, OutboxRecord, Record};

fn open(path: &Path) -> Result<rusqlite::Connection, String> {
    if !path.exists() {
        return Err(format!("{} does not exist (the cage has not stored anything yet)", path.display()));
    }
    rustomnic_resource_state::store::open(path, Duration::from_secs(10)).map_err(|e| e.message)
}

/// Opens the file to read it, read-only when it cannot be written (a read-only volume): `ls`
/// and `show` still work there, as long as the file needs no migration.
pub(crate) fn open_to_read(path: &Path) -> Result<rusqlite::Connection, String> {
    let first = match open(path) {
        Ok(c) => return Ok(c),
        Err(e) if !path.exists() => return Err(e),
        Err(e) => e,
    };
    let read_only = || -> rusqlite::Result<rusqlite::Connection> {
        let c = rusqlite::Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
        c.query_row("SELECT count(*) FROM sqlite_schema", [], |_| Ok(()))?;
        Ok(c)
    };
    // On a read-only volume a WAL file cannot get its shared memory; a file that nothing can
    // write is read as it is.
    let immutable = || -> rusqlite::Result<rusqlite::Connection> {
        let uri = format!("file:{}?immutable=1", path.display().to_string().replace('?', "%3f").replace('#', "%23"));
        let c = rusqlite::Connection::open_with_flags(uri, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_URI | OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
        c.query_row("SELECT count(*) FROM sqlite_schema", [], |_| Ok(()))?;
        Ok(c)
    };
    let conn = read_only().or_else(|_| immutable()).map_err(|_| first.clone())?;
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(|e| sql_error(path, "cannot read the schema version", e).message)?;
    if version != SCHEMA_VERSION as i64 {
        return Err(format!("{first} (and read-only, its schema version {version} cannot be brought to {SCHEMA_VERSION})"));
    }
    Ok(conn)
}

fn time(ms: i64) -> String {
    let ago = (store::now_ms() - ms) as f64 / 1000.0;
    if ago >= 0.0 {
        format!("{ago:.1}s ago")
    } else {
        format!("in {:.1}s", -ago)
    }
}

fn value_text(bytes: &[u8]) -> String {
    match decode(bytes) {
        Ok(v) => v.to_json().map(|j| j.to_string()).unwrap_or_else(|e| format!("<{e}>")),
        Err(e) => format!("<cannot read: {e}>"),
    }
}

/// `pmnc queue ls`: figures per queue and of the outbox, then the calls waiting or dead, in the
/// queue and in the outbox (at most `limit`).
pub fn ls(cage: &str, path: &Path, limit: usize, out: &mut dyn std::io::Write) -> Result<(), String> {
    let conn = open_to_read(path)?;
    let figures = store::figures(&conn, path, true)?;
    let w = |e: std::io::Error| e.to_string();
    writeln!(out, "cage {cage} ({})", path.display()).map_err(w)?;
    let (outgoing, outgoing_dead, forwarded) = store::outbox_counts(&conn, path)?;
    if figures.is_empty() && outgoing + outgoing_dead == 0 {
        writeln!(out, "no calls").map_err(w)?;
    }
    for f in &figures {
        writeln!(
            out,
            "queue {}: {} waiting (oldest {:.1}s, {} retrying), {} dead, {} done kept",
            f.queue, f.depth, f.oldest_age, f.retrying, f.dead, f.done_kept
        )
        .map_err(w)?;
    }
    if outgoing + outgoing_dead + forwarded > 0 {
        writeln!(out, "outbox: {outgoing} waiting for their cage to accept them, {outgoing_dead} dead, {forwarded} forwarded kept").map_err(w)?;
    }
    let mut shown = 0;
    for status in ["pending", "failed", "dead", "cancelled"] {
        for r in store::list(&conn, path, Some(status), limit.saturating_sub(shown))? {
            shown += 1;
            let when = if status == "dead" || status == "cancelled" { r.finished_ms.map(time).unwrap_or_default() } else { format!("due {}", time(r.due_ms)) };
            writeln!(out, "{:<8} {:<40} {:<10} {} attempts {} {}", r.status, r.id, r.queue, r.target, r.attempts, when).map_err(w)?;
        }
    }
    for status in ["pending", "dead"] {
        for r in store::outbox_list(&conn, path, status, limit.saturating_sub(shown))? {
            shown += 1;
            let when =
                if status == "dead" { format!("gave up {}", r.finished_ms.map(time).unwrap_or_default()) } else { format!("next try {}", time(r.next_ms)) };
            writeln!(out, "{:<8} {:<40} {:<10} {} in the outbox, forwarding attempts {} {}", r.status, r.id, r.queue, r.target, r.attempts, when).map_err(w)?;
        }
    }
    Ok(())
}

/// `pmnc queue show ID`: the call in the queue of `cage`, or in its outbox.
pub fn show(cage: &str, path: &Path, id: &str, out: &mut dyn std::io::Write) -> Result<(), String> {
    let conn = open_to_read(path)?;
    if let Some(r) = store::find(&conn, path, id)? {
        return write_record(&r, out).map_err(|e| e.to_string());
    }
    if let Some(r) = store::outbox_find(&conn, path, id)? {
        return write_outbox_record(cage, &r, out).map_err(|e| e.to_string());
    }
    Err(format!("no call {id:?} in {}", path.display()))
}

fn write_record(r: &Record, out: &mut dyn std::io::Write) -> std::io::Result<()> {
    writeln!(out, "id:        {}", r.id)?;
    writeln!(out, "queue:     {}", r.queue)?;
    writeln!(out, "call:      {}", r.target)?;
    writeln!(out, "from cage: {}", r.from_cage)?;
    writeln!(out, "status:    {}", r.status)?;
    writeln!(out, "attempts:  {}", r.attempts)?;
    writeln!(out, "created:   {}", time(r.created_ms))?;
    writeln!(out, "due:       {}", time(r.due_ms))?;
    writeln!(out, "expires:   {}", time(r.expires_ms))?;
    if let Some(f) = r.finished_ms {
        writeln!(out, "finished:  {}", time(f))?;
    }
    writeln!(out, "arguments: {}", value_text(&r.args))?;
    if let Some(v) = &r.result {
        writeln!(out, "result:    {}", value_text(v))?;
    }
    if let Some(e) = &r.error {
        writeln!(out, "error:     {e}")?;
    }
    Ok(())
}

fn write_outbox_record(cage: &str, r: &OutboxRecord, out: &mut dyn std::io::Write) -> std::io::Result<()> {
    writeln!(out, "id:        {}", r.id)?;
    writeln!(out, "queue:     {}", r.queue)?;
    writeln!(out, "call:      {}", r.target)?;
    writeln!(out, "from cage: {cage}")?;
    match r.status.as_str() {
        "pending" => writeln!(out, "status:    pending in the outbox of cage {cage}: not accepted by cage {} yet", r.cage)?,
        "dead" => writeln!(out, "status:    dead in the outbox of cage {cage}: cage {} never accepted it", r.cage)?,
        "forwarded" => writeln!(out, "status:    forwarded: accepted by cage {}, whose file keeps its progress", r.cage)?,
        other => writeln!(out, "status:    {other} in the outbox of cage {cage}")?,
    }
    writeln!(out, "forwarding attempts: {}", r.attempts)?;
    writeln!(out, "created:   {}", time(r.created_ms))?;
    writeln!(out, "due:       {}", time(r.due_ms))?;
    if r.expires_given {
        writeln!(out, "expires:   {}", time(r.expires_ms))?;
    } else {
        writeln!(out, "expires:   as its target queue's expires_in sets (forwarded until {})", time(r.expires_ms))?;
    }
    match r.status.as_str() {
        "pending" => writeln!(out, "next try:  {}", time(r.next_ms))?,
        _ => {
            if let Some(f) = r.finished_ms {
                writeln!(out, "finished:  {}", time(f))?;
            }
        }
    }
    if r.status != "forwarded" {
        writeln!(out, "arguments: {}", value_text(&r.args))?;
    }
    if let Some(e) = &r.error {
        writeln!(out, "error:     {e}")?;
    }
    Ok(())
}

/// `pmnc queue retry ID`: a failed or dead call runs again now (and gets `extend` more time
/// before it expires); a call in the outbox is forwarded again now.
pub fn retry(path: &Path, id: &str, extend: Duration) -> Result<(), String> {
    let conn = open(path)?;
    if store::retry(&conn, path, id, extend.as_millis() as i64)? || store::outbox_retry(&conn, path, id, extend.as_millis() as i64)? {
        return Ok(());
    }
    if let Some(r) = store::find(&conn, path, id)? {
        return Err(format!("call {id:?} is {}; only waiting, failed or dead calls can be retried", r.status));
    }
    if let Some(r) = store::outbox_find(&conn, path, id)? {
        return Err(format!("call {id:?} was {} to cage {}; retry it there", r.status, r.cage));
    }
    Err(format!("no call {id:?} in {}", path.display()))
}

/// `pmnc queue cancel ID`: cancels a waiting call of this file's queue (a running one too: its
/// attempt's outcome is then dropped and it is not retried); keeps its record at least
/// `keep`. Ok with what happened (cancelled now, or already), Err when it cannot be cancelled.
pub fn cancel(path: &Path, id: &str, keep: Duration) -> Result<String, String> {
    let mut conn = open(path)?;
    let fail = |e| sql_error(path, "queue cancel", e).message;
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(fail)?;
    let done = store::cancel(&tx, path, id, store::now_ms().saturating_add(keep.as_millis() as i64))?;
    tx.commit().map_err(fail)?;
    match done {
        store::Cancel::Cancelled(was) => {
            Ok(format!("call {id} cancelled (it was {was}); it will not run again (an attempt running now runs to its end, and its outcome is dropped)"))
        }
        store::Cancel::Unchanged(st) if st == "cancelled" => Ok(format!("call {id} was already cancelled")),
        store::Cancel::Unchanged(st) => Err(format!("call {id:?} is {st}: a call that ended cannot be cancelled")),
        store::Cancel::Unknown => match store::outbox_find(&conn, path, id)? {
            Some(r) => Err(format!(
                "call {id:?} is in this cage's outbox ({}), sent to cage {}: only the cage that stores it can cancel it; run pmnc queue cancel on its folder",
                r.status, r.cage
            )),
            None => Err(format!("no call {id:?} in {}", path.display())),
        },
    }
}

/// `pmnc queue purge`: deletes dead letters (`dead`) or every call not done (otherwise, cancelled
/// ones included), in the
/// queue and in the outbox, in chunks with a progress bar; returns how many were deleted.
pub fn purge(path: &Path, dead_only: bool, progress: bool) -> Result<u64, String> {
    let mut conn = open(path)?;
    let (calls, outbox) = if dead_only {
        ("status = 'dead'", "status = 'dead'")
    } else {
        ("status IN ('pending', 'failed', 'dead', 'cancelled')", "status IN ('pending', 'dead')")
    };
    let fail = |e| sql_error(path, "queue purge", e).message;
    let count = |table: &str, filter: &str| conn.query_row(&format!("SELECT count(*) FROM {table} WHERE {filter}"), [], |r| r.get::<_, i64>(0)).map_err(fail);
    let total = count("queue_calls", calls)? + count("queue_outbox", outbox)?;
    let bar = if progress && total > 0 { indicatif::ProgressBar::new(total as u64) } else { indicatif::ProgressBar::hidden() };
    let mut deleted = 0u64;
    for (table, filter) in [("queue_calls", calls), ("queue_outbox", outbox)] {
        loop {
            let tx = conn.transaction().map_err(fail)?;
            let n = tx.execute(&format!("DELETE FROM {table} WHERE seq IN (SELECT seq FROM {table} WHERE {filter} LIMIT 1000)"), []).map_err(fail)?;
            tx.commit().map_err(fail)?;
            deleted += n as u64;
            bar.inc(n as u64);
            if n == 0 {
                break;
            }
        }
    }
    bar.finish_and_clear();
    let _ = std::io::stderr().flush();
    Ok(deleted)
}

/// `pmnc queue ls` for the clustered queues of `cage` (store = "cluster"): what their stream and
/// consumer say, asked of the NATS servers of its `[cluster]` table (at most a few seconds).
pub fn ls_clustered(
    cage: &str,
    queues: &[crate::QueueConfig],
    cluster: Option<&rustomnic_cluster::ClusterConfig>,
    out: &mut dyn std::io::Write,
) -> Result<(), String> {
    let clustered: Vec<&crate::QueueConfig> = queues.iter().filter(|q| matches!(q.store, crate::StoreKind::Cluster { .. })).collect();
    let (Some(config), false) = (cluster, clustered.is_empty()) else { return Ok(()) };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    let w = |e: std::io::Error| e.to_string();
    let read = rt.block_on(async {
        let conn = tokio::time::timeout(config.connect_timeout, rustomnic_cluster::connect::connect(config, "pmnc queue ls", false))
            .await
            .map_err(|_| format!("cannot reach NATS ({}) within {:?}", config.servers(), config.connect_timeout))?
            .map_err(|e| e.to_string())?;
        let js = crate::jetstream::context(&conn.client);
        let mut lines = Vec::new();
        for q in &clustered {
            let f = tokio::time::timeout(Duration::from_secs(5), crate::jetstream::read_figures(&js, &config.flock, cage, &q.name))
                .await
                .unwrap_or_else(|_| Err("no answer within 5s".into()));
            lines.push((q.name.clone(), f));
        }
        // The copies consuming each queue, with their running calls, from their heartbeats as
        // every process's roster holds them (as `pmnc cluster status` asks).
        let instances = rustomnic_cluster::presence::ask(&conn, &config.flock, Duration::from_secs(1)).await.unwrap_or_default();
        Ok::<_, String>((lines, instances))
    });
    match read {
        Ok((lines, instances)) => {
            for (queue, f) in lines {
                let stream = crate::jetstream::stream_name(&config.flock, cage, &queue);
                match f {
                    Ok(f) => writeln!(
                        out,
                        "queue {queue} (clustered, stream {stream}): {} waiting, {} held (running, or waiting for a retry or their time), {} redelivered, {} dead letters{}",
                        f.waiting,
                        f.held,
                        f.redelivered,
                        f.dead,
                        f.oldest_age.map(|a| format!(", oldest {a:.1} s")).unwrap_or_default()
                    )
                    .map_err(w)?,
                    Err(e) => writeln!(out, "queue {queue} (clustered, stream {stream}): no figures: {e}").map_err(w)?,
                }
                for line in copy_lines(&instances, cage, &queue) {
                    writeln!(out, "  {line}").map_err(w)?;
                }
            }
        }
        Err(e) => writeln!(out, "clustered queues of cage {cage}: no figures: {e}").map_err(w)?,
    }
    Ok(())
}

/// A line per copy of `cage` consuming clustered queue `queue` (its instance, host, pid, state
/// and calls running now), from the flock's answers to a status request.
fn copy_lines(instances: &[serde_json::Value], cage: &str, queue: &str) -> Vec<String> {
    // What other processes said, shown and never obeyed by the terminal.
    let shown = |s: &str| s.chars().map(|c| if c.is_control() { c.escape_default().to_string() } else { c.to_string() }).collect::<String>();
    let mut lines: Vec<String> = instances
        .iter()
        .filter_map(|i| {
            let running = i.get("queues_running")?.get(cage)?.get(queue)?.as_u64()?;
            let text = |k: &str| shown(i.get(k).and_then(|v| v.as_str()).unwrap_or("?"));
            let pid = i.get("pid").and_then(|p| p.as_u64()).unwrap_or(0);
            Some(format!("copy {} ({} pid {pid}, {}): {running} running", text("instance"), text("host"), text("state")))
        })
        .collect();
    lines.sort();
    if lines.is_empty() {
        lines.push(format!("no copy of cage {cage} answered as consuming it (none running, or they run a version that does not say)"));
    }
    lines
}

/// `pmnc queue show PATH ID` of a workflow id: its record, join and steps as the cage files at
/// PATH hold them (`cages`: name and file of each). False when none of them knows the workflow.
pub fn show_workflow(cages: &[(String, std::path::PathBuf)], id: &str, out: &mut dyn std::io::Write) -> Result<bool, String> {
    let mut views = Vec::new();
    for (cage, file) in cages.iter().filter(|(_, f)| f.exists()) {
        let conn = open_to_read(file)?;
        views.push((cage.clone(), crate::workflow::view(&conn, file, id)?));
    }
    let Some(summary) = crate::workflow::summary(id, &views, |_| None) else { return Ok(false) };
    let w = |e: std::io::Error| e.to_string();
    writeln!(out, "workflow:  {id}").map_err(w)?;
    for (cage, v) in &views {
        if let Some((kind, status, _)) = v.record.as_ref().filter(|r| !r.0.is_empty()) {
            writeln!(out, "kind:      {kind}, started by cage {cage} (its record says {status})").map_err(w)?;
        }
    }
    writeln!(out, "status:    {}", summary.status).map_err(w)?;
    for (cage, v) in &views {
        if let Some((size, status, error, ended)) = &v.join {
            writeln!(
                out,
                "join:      held by cage {cage}: {size} members, {ended} ended, {status}{}",
                error.as_ref().map(|e| format!(": {e}")).unwrap_or_default()
            )
            .map_err(w)?;
        }
    }
    for (cage, v) in &views {
        for (step, status, error, target, outbox) in &v.steps {
            let place = if *outbox { format!("in the outbox of cage {cage}, to {target}") } else { format!("cage {cage}, {target}") };
            writeln!(out, "step       {step:<32} {status:<10} {place}{}", error.as_ref().map(|e| format!(": {e}")).unwrap_or_default()).map_err(w)?;
        }
    }
    Ok(true)
}

/// `pmnc queue cancel PATH ID` of a workflow id: in every cage file at PATH, its waiting steps
/// are cancelled, its joins too, and it is marked cancelled so that no later step is stored
/// there (a step that arrives later is stored cancelled). None when no file knows the workflow
/// (the id is then taken as a call's). One line per cage, saying what changed.
pub fn cancel_workflow(cages: &[(String, std::path::PathBuf)], id: &str, keep: Duration) -> Result<Option<Vec<String>>, String> {
    let files: Vec<&(String, std::path::PathBuf)> = cages.iter().filter(|(_, f)| f.exists()).collect();
    let mut known = false;
    for (_, file) in &files {
        let conn = open_to_read(file)?;
        known |= !crate::workflow::view(&conn, file, id)?.is_empty();
    }
    if !known {
        return Ok(None);
    }
    let mut lines = Vec::new();
    for (cage, file) in files {
        let mut conn = open(file)?;
        let fail = |e| sql_error(file, "queue cancel", e).message;
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(fail)?;
        let done = crate::workflow::cancel(&tx, file, id, store::now_ms().saturating_add(keep.as_millis() as i64))?;
        tx.commit().map_err(fail)?;
        let ids: Vec<&str> = done.calls.iter().map(|c| c.0.as_str()).collect();
        lines.push(if ids.is_empty() {
            format!("cage {cage}: workflow {id}: no step waiting here; marked cancelled (no later step is stored here)")
        } else {
            format!(
                "cage {cage}: workflow {id}: {} step{} cancelled ({}); no later step is stored here (an attempt running now runs to its end, and its outcome is dropped)",
                ids.len(),
                if ids.len() == 1 { "" } else { "s" },
                ids.join(", ")
            )
        });
    }
    Ok(Some(lines))
}
