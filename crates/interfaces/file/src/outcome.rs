//! What a drop folder keeps on disk: taking a file (a rename into `.processing/`), the outcome
//! of its handler in the cage's state file (with the handler's held `pmnc.state` writes, in one
//! SQLite transaction), and the moves to `done/` and `failed/` that never overwrite. Everything
//! here blocks; the folder's loop runs it on tokio's blocking pool.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OptionalExtension};
use rustomnic_resource_state::store::{self, Write};

/// The table of outcomes, made on first use in the cage's state file. A row lives from the
/// handler's end until its file has been moved on; `file` is the file's path in `.processing/`,
/// unique to one taking of one file.
const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS file_outcomes (
    file TEXT PRIMARY KEY NOT NULL,
    ok INTEGER NOT NULL,
    error TEXT NOT NULL,
    request_id TEXT NOT NULL,
    at_ms INTEGER NOT NULL
)";

/// How a handler ended, as recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct Recorded {
    pub ok: bool,
    pub error: String,
    pub request_id: String,
    pub at_ms: i64,
}

pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Opens the state file and makes the table.
pub fn open(path: &Path) -> Result<Connection, String> {
    let conn = store::open(path, std::time::Duration::from_secs(10)).map_err(|e| e.message)?;
    conn.execute_batch(SCHEMA).map_err(|e| store::sql_error(path, "file interface: cannot make its table", e).message)?;
    Ok(conn)
}

/// Records the end of the handler of `file` together with `writes` (its held state writes,
/// empty for a failure), in one transaction: after a crash either both are there or neither.
pub fn record(conn: &mut Connection, state: &Path, file: &Path, r: &Recorded, writes: &[Write]) -> Result<(), String> {
    let fail = |e| store::sql_error(state, "file interface: cannot record an outcome", e).message;
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(fail)?;
    store::apply_in(&tx, state, writes).map_err(|e| e.message)?;
    tx.execute(
        "INSERT OR REPLACE INTO file_outcomes (file, ok, error, request_id, at_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![file.to_string_lossy(), r.ok, r.error, r.request_id, r.at_ms],
    )
    .map_err(fail)?;
    tx.commit().map_err(fail)
}

/// The recorded outcome of `file`, if any.
pub fn lookup(conn: &Connection, state: &Path, file: &Path) -> Result<Option<Recorded>, String> {
    conn.query_row("SELECT ok, error, request_id, at_ms FROM file_outcomes WHERE file = ?1", [file.to_string_lossy()], |r| {
        Ok(Recorded { ok: r.get(0)?, error: r.get(1)?, request_id: r.get(2)?, at_ms: r.get(3)? })
    })
    .optional()
    .map_err(|e| store::sql_error(state, "file interface: cannot read an outcome", e).message)
}

/// Forgets the outcome of `file` (moved on).
pub fn forget(conn: &Connection, state: &Path, file: &Path) -> Result<(), String> {
    conn.execute("DELETE FROM file_outcomes WHERE file = ?1", [file.to_string_lossy()])
        .map(|_| ())
        .map_err(|e| store::sql_error(state, "file interface: cannot forget an outcome", e).message)
}

/// Forgets the outcomes of files under `dir` that are no longer there (a crash after the move
/// and before [`forget`]).
pub fn prune(conn: &Connection, state: &Path, dir: &Path) -> Result<usize, String> {
    let fail = |e| store::sql_error(state, "file interface: cannot prune outcomes", e).message;
    let prefix = format!("{}/", dir.to_string_lossy());
    let mut s = conn.prepare("SELECT file FROM file_outcomes WHERE substr(file, 1, length(?1)) = ?1").map_err(fail)?;
    let files: Vec<String> = s.query_map([&prefix], |r| r.get(0)).map_err(fail)?.filter_map(Result::ok).collect();
    let mut n = 0;
    for f in files {
        if !Path::new(&f).exists() {
            forget(conn, state, Path::new(&f))?;
            n += 1;
        }
    }
    Ok(n)
}

/// A prefix no other taking of a file has: time, process, a counter (no dots: the name follows
/// the first one).
fn unique_prefix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{:x}-{:x}-{n:x}", now_ms(), std::process::id())
}

/// The original name of a file in `.processing/` (`<prefix>.<name>`).
pub fn original_name(processing: &Path) -> String {
    let name = processing.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    match name.split_once('.') {
        Some((prefix, rest)) if !prefix.is_empty() && !rest.is_empty() && prefix.chars().all(|c| c.is_ascii_hexdigit() || c == '-') => rest.to_string(),
        _ => name,
    }
}

/// Takes `name` from `folder` by renaming it into `.processing/`: the file's path there, or
/// None when it is gone (taken by another listing, or removed).
pub fn take(folder: &Path, processing: &Path, name: &str) -> Result<Option<PathBuf>, String> {
    let to = processing.join(format!("{}.{name}", unique_prefix()));
    match std::fs::rename(folder.join(name), &to) {
        Ok(()) => Ok(Some(to)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot move {name} into {}: {e}", processing.display())),
    }
}

/// A file's bytes and its modification time.
pub type Content = (Vec<u8>, Option<SystemTime>);

/// Reads `path` when it is a regular file of at most `max` bytes: Ok(Ok((bytes, mtime))), or
/// Ok(Err(why)) when it is refused unread (too big; a link, a FIFO or a device swapped in after
/// the listing, which must neither be followed nor block the read). Read with a bound, so a
/// file that grew is not read whole.
pub fn read(path: &Path, max: u64) -> Result<Result<Content, String>, String> {
    let meta = std::fs::symlink_metadata(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if !meta.is_file() {
        return Ok(Err("it is not a regular file (a link, a folder or a special file); it was not read and no handler ran".into()));
    }
    let too_big = |size: u64| format!("the file is {size} bytes, over max_size ({max} bytes); it was not read and no handler ran");
    if meta.len() > max {
        return Ok(Err(too_big(meta.len())));
    }
    let f = std::fs::File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let mut buf = Vec::with_capacity(meta.len() as usize);
    f.take(max + 1).read_to_end(&mut buf).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if buf.len() as u64 > max {
        return Ok(Err(too_big(buf.len() as u64)));
    }
    Ok(Ok((buf, meta.modified().ok())))
}

/// `name` with `.n` before its extension: `report.csv` → `report.1.csv`, `notes` → `notes.1`.
fn numbered(name: &str, n: u32) -> String {
    match name.rfind('.') {
        Some(i) if i > 0 => format!("{}.{n}{}", &name[..i], &name[i..]),
        _ => format!("{name}.{n}"),
    }
}

/// Moves `from` into `dir` as `name`, or `name` numbered when that is taken: never over an
/// existing file (a hard link fails on an existing name, unlike a rename). Gives the new path.
pub fn move_unique(from: &Path, dir: &Path, name: &str) -> Result<PathBuf, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot make {}: {e}", dir.display()))?;
    for n in 0..100_000u32 {
        let candidate = dir.join(if n == 0 { name.to_string() } else { numbered(name, n) });
        match std::fs::hard_link(from, &candidate) {
            Ok(()) => {
                std::fs::remove_file(from).map_err(|e| format!("cannot remove {} after linking it to {}: {e}", from.display(), candidate.display()))?;
                return Ok(candidate);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            // A file system without hard links: a rename after a look (the folder is this
            // interface's own, so nothing else should race for the name).
            Err(_) if !candidate.exists() => {
                std::fs::rename(from, &candidate).map_err(|e| format!("cannot move {} to {}: {e}", from.display(), candidate.display()))?;
                return Ok(candidate);
            }
            Err(_) => continue,
        }
    }
    Err(format!("no free name for {name} in {}", dir.display()))
}

/// Writes the `.error` text beside a failed file (through a temporary name, so it is whole
/// when it appears).
pub fn write_error(failed: &Path, name: &str, r: &Recorded) -> Result<(), String> {
    let text = format!("error: {}\ntime: {}\nrequest: {}\nfile: {name}\n", r.error, utc_text(r.at_ms), r.request_id);
    let path = failed.with_file_name(format!("{}.error", failed.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()));
    let tmp = failed.with_file_name(format!(".{}.error.tmp", failed.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()));
    std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, &path)).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// `ms` since the epoch as `2026-12-06T19:50:00.123Z`.
pub fn utc_text(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rest) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Days to a civil date (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z", rest / 3600, rest % 3600 / 60, rest % 60, ms.rem_euclid(1000))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn moves_never_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let done = dir.path().join("done");
        for i in 0..3 {
            let f = dir.path().join(format!("x{i}"));
            std::fs::write(&f, format!("{i}")).unwrap();
            move_unique(&f, &done, "report.csv").unwrap();
        }
        assert_eq!(std::fs::read_to_string(done.join("report.csv")).unwrap(), "0");
        assert_eq!(std::fs::read_to_string(done.join("report.1.csv")).unwrap(), "1");
        assert_eq!(std::fs::read_to_string(done.join("report.2.csv")).unwrap(), "2");
        assert_eq!(numbered("notes", 2), "notes.2");
        assert_eq!(numbered(".hidden", 1), ".hidden.1");
    }

    #[test]
    fn names_round_trip_through_processing() {
        let dir = tempfile::tempdir().unwrap();
        let processing = dir.path().join(".processing");
        std::fs::create_dir(&processing).unwrap();
        std::fs::write(dir.path().join("a.b.csv"), "x").unwrap();
        let p = take(dir.path(), &processing, "a.b.csv").unwrap().unwrap();
        assert_eq!(original_name(&p), "a.b.csv");
        assert_eq!(take(dir.path(), &processing, "a.b.csv").unwrap(), None, "taken once");
        assert_eq!(original_name(Path::new("/x/plain.txt")), "plain.txt");
    }

    #[test]
    fn outcomes_commit_with_their_writes() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state.sqlite");
        let mut conn = open(&state).unwrap();
        let file = dir.path().join(".processing/1-2-3.a");
        let r = Recorded { ok: true, error: String::new(), request_id: "r1".into(), at_ms: 1 };
        record(&mut conn, &state, &file, &r, &[Write::Set("k".into(), vec![1])]).unwrap();
        assert_eq!(lookup(&conn, &state, &file).unwrap(), Some(r));
        assert_eq!(store::get(&conn, &state, "k").unwrap(), Some(vec![1]));
        assert_eq!(prune(&conn, &state, &dir.path().join(".processing")).unwrap(), 1, "the file is not there");
        assert_eq!(lookup(&conn, &state, &file).unwrap(), None);
    }

    #[test]
    fn reads_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, "0123456789").unwrap();
        assert_eq!(read(&f, 10).unwrap().unwrap().0, b"0123456789".to_vec());
        assert!(read(&f, 9).unwrap().unwrap_err().contains("10 bytes, over max_size (9 bytes)"));
        std::os::unix::fs::symlink(&f, dir.path().join("link")).unwrap();
        assert!(read(&dir.path().join("link"), 100).unwrap().unwrap_err().contains("not a regular file"), "a link is not followed");
    }

    #[test]
    fn utc() {
        assert_eq!(utc_text(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(utc_text(1_796_586_600_123), "2026-12-06T19:50:00.123Z");
    }
}
