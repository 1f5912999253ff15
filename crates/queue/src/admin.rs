//! `pmnc queue ls|show|retry|purge`: the operations on a cage's queue, on its file, whether the
//! cage runs or not (SQLite's locking lets both work on it at once).

use std::io::Write as _;
use std::path::Path;
use std::time::Duration;

use rustomnic_resource_state::{decode, store::sql_error};

use crate::store::{self, Record};

fn open(path: &Path) -> Result<rusqlite::Connection, String> {
    if !path.exists() {
        return Err(format!("{} does not exist (the cage has not stored anything yet)", path.display()));
    }
    rustomnic_resource_state::store::open(path, Duration::from_secs(10)).map_err(|e| e.message)
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

/// `pmnc queue ls`: figures per queue, then the calls waiting or dead (at most `limit`).
pub fn ls(cage: &str, path: &Path, limit: usize, out: &mut dyn std::io::Write) -> Result<(), String> {
    let conn = open(path)?;
    let figures = store::figures(&conn, path)?;
    let w = |e: std::io::Error| e.to_string();
    writeln!(out, "cage {cage} ({})", path.display()).map_err(w)?;
    if figures.is_empty() {
        writeln!(out, "no calls").map_err(w)?;
    }
    for f in &figures {
        writeln!(out, "queue {}: {} waiting (oldest {:.1}s, {} retrying), {} dead, {} done kept", f.queue, f.depth, f.oldest_age, f.retrying, f.dead, f.done_kept).map_err(w)?;
    }
    let (outgoing, outgoing_dead) = store::outbox_counts(&conn, path)?;
    if outgoing + outgoing_dead > 0 {
        writeln!(out, "outbox: {outgoing} waiting for their cage to accept them, {outgoing_dead} dead").map_err(w)?;
    }
    let mut shown = 0;
    for status in ["pending", "failed", "dead"] {
        for r in store::list(&conn, path, Some(status), limit.saturating_sub(shown))? {
            shown += 1;
            let when = if status == "dead" { r.finished_ms.map(time).unwrap_or_default() } else { format!("due {}", time(r.due_ms)) };
            writeln!(out, "{:<8} {:<40} {:<10} {} attempts {} {}", r.status, r.id, r.queue, r.target, r.attempts, when).map_err(w)?;
        }
    }
    Ok(())
}

/// `pmnc queue show ID`.
pub fn show(path: &Path, id: &str, out: &mut dyn std::io::Write) -> Result<(), String> {
    let conn = open(path)?;
    let Some(r) = store::find(&conn, path, id)? else {
        return Err(format!("no call {id:?} in {}", path.display()));
    };
    write_record(&r, out).map_err(|e| e.to_string())
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

/// `pmnc queue retry ID`: a failed or dead call runs again now (and gets `extend` more time
/// before it expires).
pub fn retry(path: &Path, id: &str, extend: Duration) -> Result<(), String> {
    let conn = open(path)?;
    if store::retry(&conn, path, id, extend.as_millis() as i64)? {
        Ok(())
    } else {
        match store::find(&conn, path, id)? {
            Some(r) => Err(format!("call {id:?} is {}; only waiting, failed or dead calls can be retried", r.status)),
            None => Err(format!("no call {id:?} in {}", path.display())),
        }
    }
}

/// `pmnc queue purge`: deletes dead letters (`dead`) or every call not done (otherwise), in
/// chunks with a progress bar; returns how many were deleted.
pub fn purge(path: &Path, dead_only: bool, progress: bool) -> Result<u64, String> {
    let mut conn = open(path)?;
    let filter = if dead_only { "status = 'dead'" } else { "status IN ('pending', 'failed', 'dead')" };
    let fail = |e| sql_error(path, "queue purge", e).message;
    let total: i64 = conn.query_row(&format!("SELECT count(*) FROM queue_calls WHERE {filter}"), [], |r| r.get(0)).map_err(fail)?;
    let bar = if progress && total > 0 { indicatif::ProgressBar::new(total as u64) } else { indicatif::ProgressBar::hidden() };
    let mut deleted = 0u64;
    loop {
        let tx = conn.transaction().map_err(fail)?;
        let n = tx
            .execute(&format!("DELETE FROM queue_calls WHERE seq IN (SELECT seq FROM queue_calls WHERE {filter} LIMIT 1000)"), [])
            .map_err(fail)?;
        tx.commit().map_err(fail)?;
        deleted += n as u64;
        bar.inc(n as u64);
        if n == 0 {
            break;
        }
    }
    bar.finish_and_clear();
    let _ = std::io::stderr().flush();
    Ok(deleted)
}
