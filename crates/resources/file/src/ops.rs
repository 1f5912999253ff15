//! The blocking file work of each method, and the trace of what a staged write left on disk so
//! that rollback (or a call cut by the deadline) can take it away again.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use rustomnic_core::Value;
use rustomnic_resource::Error;

use crate::paths::{self, io_error, plain, Rel};

/// Names of staged files start with this; `list` hides them.
pub const TEMP_PREFIX: &str = ".rustomnic-tmp-";
/// `list` fails instead of returning more entries than this.
pub const MAX_ENTRIES: usize = 10_000;

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A fresh staging name, unique in this process and across processes sharing the folder.
fn temp_name() -> String {
    format!("{TEMP_PREFIX}{}-{}", std::process::id(), TEMP_COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// What one staged write holds on disk, in order, shared between the blocking task doing the
/// work and the connection. Whichever of the two learns last that the work is abandoned removes
/// it all: the task checks `abandoned` after each step, the connection sets it and then removes
/// what is recorded, so nothing is left behind whatever the interleaving.
#[derive(Default)]
pub struct Trace {
    abandoned: bool,
    made: Vec<Made>,
}

enum Made {
    /// A reference on a folder made by a staged write and not committed yet (see [`FOLDERS`]).
    Dir(PathBuf),
    File(PathBuf),
}

pub type SharedTrace = Arc<Mutex<Trace>>;

/// Folders made by staged writes, with how many staged writes (of any connection) use each.
/// Two writes into one new folder are often two participants of one transaction, rolled back in
/// parallel: the folder must go when the last of them lets go, not when the one that made it
/// does (it would not be empty yet). Taken before a trace's lock, never after.
static FOLDERS: Mutex<BTreeMap<PathBuf, usize>> = Mutex::new(BTreeMap::new());

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock still guards a list of paths; cleaning up matters more than the panic.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Lets go of what `made` lists, newest first: files are removed; a folder is removed when no
/// staged write uses it any more and `remove` (rollback), and only if empty. Errors are ignored:
/// this is best-effort cleanup.
fn let_go(made: Vec<Made>, remove: bool) {
    let (files, dirs): (Vec<_>, Vec<_>) = made.into_iter().rev().partition(|m| matches!(m, Made::File(_)));
    if remove {
        for m in files {
            if let Made::File(p) = m {
                let _ = fs::remove_file(p);
            }
        }
    }
    let mut folders = lock(&FOLDERS);
    for m in dirs {
        let Made::Dir(p) = m else { continue };
        let Some(n) = folders.get_mut(&p) else { continue };
        *n -= 1;
        if *n == 0 {
            folders.remove(&p);
            if remove {
                let _ = fs::remove_dir(&p);
            }
        }
    }
}

/// Marks the work abandoned and removes what it made so far.
pub fn abandon(t: &SharedTrace) {
    let made = {
        let mut g = lock(t);
        g.abandoned = true;
        std::mem::take(&mut g.made)
    };
    let_go(made, true);
}

/// After a commit: what the work made is now the committed state, kept as it is.
pub fn release(t: &SharedTrace) {
    let made = std::mem::take(&mut lock(t).made);
    let_go(made, false);
}

/// Records `m` before it is created; false when the work was abandoned (then nothing is made).
fn record(t: &SharedTrace, m: Made) -> bool {
    let mut g = lock(t);
    if g.abandoned {
        return false;
    }
    g.made.push(m);
    true
}

/// After the last step: if the work was abandoned meanwhile, removes what it made.
fn settle(t: &SharedTrace) -> bool {
    let mut g = lock(t);
    if g.abandoned {
        let made = std::mem::take(&mut g.made);
        drop(g);
        let_go(made, true);
        return false;
    }
    true
}

fn abandoned_error(method: &str, rel: &Rel) -> Error {
    Error::new(format!("{method} {:?}: abandoned (the transaction ended first)", rel.text))
}

/// A change checked and prepared in `call`, made at commit.
pub enum Staged {
    /// Rename the fully written and synced `temp` over `target`.
    Replace { temp: PathBuf, target: PathBuf },
    /// Append `data` to `target` (canonical; created when missing).
    Append { target: PathBuf, data: Vec<u8> },
    /// Remove `target` (a file, link or empty folder; it is not followed).
    Delete { target: PathBuf, dir: bool },
}

/// Creates the missing folders of `rel` and returns the folder to write in. The folders it
/// makes, and those made by other staged writes that it writes into, are referenced in `trace`.
fn make_parent(root: &Path, rel: &Rel, method: &str, trace: &SharedTrace) -> Result<PathBuf, Error> {
    // Held throughout, so a folder cannot be taken away between being found and referenced.
    let mut folders = lock(&FOLDERS);
    let (mut dir, missing) = paths::existing_ancestor(root, rel, method)?;
    for uncommitted in dir.ancestors().take_while(|a| *a != root) {
        if let Some(n) = folders.get_mut(uncommitted) {
            if !record(trace, Made::Dir(uncommitted.to_path_buf())) {
                return Err(abandoned_error(method, rel));
            }
            *n += 1;
        }
    }
    for part in missing {
        dir.push(std::ffi::OsStr::from_bytes(&part));
        // create_dir, not create_dir_all: each level is made inside a folder already checked.
        match fs::create_dir(&dir) {
            Ok(()) => {}
            // Made meanwhile by a process that is not this one: not ours to count or remove.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => continue,
            Err(e) => return Err(io_error(method, rel, &e)),
        }
        folders.insert(dir.clone(), 1);
        if !record(trace, Made::Dir(dir.clone())) {
            // Abandoned while making it: let go of it now, as the connection will not.
            drop(folders);
            let_go(vec![Made::Dir(dir)], true);
            return Err(abandoned_error(method, rel));
        }
    }
    Ok(dir)
}

/// `write`: writes `data` to a new temp file beside the target and syncs it.
pub fn stage_write(root: &Path, rel: &Rel, data: &[u8], trace: &SharedTrace) -> Result<Staged, Error> {
    let method = "write";
    let dir = make_parent(root, rel, method, trace)?;
    let target = dir.join(std::ffi::OsStr::from_bytes(rel.name()));
    let existing = target.symlink_metadata().ok();
    if existing.as_ref().is_some_and(|m| m.is_dir()) {
        return Err(Error::new(format!("write {:?}: it is a folder", rel.text)).with_code("EISDIR"));
    }
    let temp = dir.join(temp_name());
    if !record(trace, Made::File(temp.clone())) {
        return Err(abandoned_error(method, rel));
    }
    let write = || -> io::Result<()> {
        let mut f = OpenOptions::new().write(true).create_new(true).open(&temp)?;
        if let Some(m) = existing.as_ref().filter(|m| m.is_file()) {
            // A replaced file keeps its permissions.
            f.set_permissions(m.permissions())?;
        }
        f.write_all(data)?;
        f.sync_all()
    };
    write().map_err(|e| io_error(method, rel, &e))?;
    if !settle(trace) {
        return Err(abandoned_error(method, rel));
    }
    Ok(Staged::Replace { temp, target })
}

/// `append`: checks the target (following a link inside the root) and makes its folders; the
/// data is appended at commit.
pub fn stage_append(root: &Path, rel: &Rel, data: Vec<u8>, trace: &SharedTrace) -> Result<Staged, Error> {
    let method = "append";
    let target = match paths::follow(root, rel, method)? {
        Some(t) => t,
        None => {
            let target = make_parent(root, rel, method, trace)?.join(std::ffi::OsStr::from_bytes(rel.name()));
            // A link to nothing: opening it to append would create its far end, wherever it is.
            if target.symlink_metadata().is_ok() {
                return Err(Error::new(format!("append {:?}: it is a symbolic link to nothing", rel.text)).with_code("ENOENT"));
            }
            target
        }
    };
    if target.is_dir() {
        return Err(Error::new(format!("append {:?}: it is a folder", rel.text)).with_code("EISDIR"));
    }
    if !settle(trace) {
        return Err(abandoned_error(method, rel));
    }
    Ok(Staged::Append { target, data })
}

/// `delete`: whether the entry exists now, and the staged removal when it does.
pub fn stage_delete(root: &Path, rel: &Rel) -> Result<Option<Staged>, Error> {
    let method = "delete";
    let Some(dir) = paths::parent_inside(root, rel, method)? else {
        return Ok(None);
    };
    let target = dir.join(std::ffi::OsStr::from_bytes(rel.name()));
    let meta = match target.symlink_metadata() {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error(method, rel, &e)),
    };
    let dir = meta.is_dir();
    if dir {
        let mut entries = fs::read_dir(&target).map_err(|e| io_error(method, rel, &e))?;
        if entries.next().is_some() {
            return Err(Error::new(format!("delete {:?}: the folder is not empty", rel.text)).with_code("ENOTEMPTY"));
        }
    }
    Ok(Some(Staged::Delete { target, dir }))
}

/// Makes a staged change. Each step is synced, and so is the folder, so that a commit that
/// returned survives a power cut.
pub fn apply(s: &Staged) -> Result<(), String> {
    let shown = |p: &Path, e: io::Error| format!("{}: {}", p.display(), plain(&e));
    match s {
        Staged::Replace { temp, target } => {
            fs::rename(temp, target).map_err(|e| shown(target, e))?;
            sync_parent(target).map_err(|e| shown(target, e))
        }
        Staged::Append { target, data } => {
            let created = !target.exists();
            // O_APPEND: concurrent appenders each land whole at the end, none is lost.
            let mut f = OpenOptions::new().append(true).create(true).open(target).map_err(|e| shown(target, e))?;
            f.write_all(data).and_then(|_| f.sync_all()).map_err(|e| shown(target, e))?;
            if created {
                sync_parent(target).map_err(|e| shown(target, e))?;
            }
            Ok(())
        }
        Staged::Delete { target, dir } => {
            let r = if *dir { fs::remove_dir(target) } else { fs::remove_file(target) };
            match r {
                Ok(()) => sync_parent(target).map_err(|e| shown(target, e)),
                // Deleted by someone else since the call: the outcome is the same.
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(shown(target, e)),
            }
        }
    }
}

fn sync_parent(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(dir) => File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

/// Removes what a staged change holds on disk (its temp file).
pub fn discard(s: &Staged) {
    if let Staged::Replace { temp, .. } = s {
        let _ = fs::remove_file(temp);
    }
}

/// `read`: the whole file, at most `max` bytes.
pub fn read(root: &Path, rel: &Rel, max: u64) -> Result<Value, Error> {
    let method = "read";
    let Some(path) = paths::follow(root, rel, method)? else {
        return Err(Error::new(format!("read {:?}: no such file", rel.text)).with_code("ENOENT"));
    };
    let mut f = File::open(&path).map_err(|e| io_error(method, rel, &e))?;
    let meta = f.metadata().map_err(|e| io_error(method, rel, &e))?;
    if meta.is_dir() {
        return Err(Error::new(format!("read {:?}: it is a folder", rel.text)).with_code("EISDIR"));
    }
    if meta.len() > max {
        return Err(too_big(method, rel, meta.len(), max));
    }
    let mut data = Vec::with_capacity(meta.len() as usize);
    // One byte past the limit tells a file that grew since the size check.
    (&mut f).take(max + 1).read_to_end(&mut data).map_err(|e| io_error(method, rel, &e))?;
    if data.len() as u64 > max {
        return Err(too_big(method, rel, data.len() as u64, max));
    }
    Ok(Value::Str(data))
}

pub fn too_big(method: &str, rel: &Rel, size: u64, max: u64) -> Error {
    Error::new(format!("{method} {:?}: {size} bytes is over max_size ({max} bytes)", rel.text)).with_code("EFBIG")
}

/// `exists`: whether something is there (following a link inside the root).
pub fn exists(root: &Path, rel: &Rel) -> Result<Value, Error> {
    Ok(Value::Bool(paths::follow(root, rel, "exists")?.is_some()))
}

/// `list`: the entries of a folder, sorted by name, staged files left out.
pub fn list(root: &Path, rel: &Rel) -> Result<Value, Error> {
    let method = "list";
    let Some(dir) = paths::follow(root, rel, method)? else {
        return Err(Error::new(format!("list {:?}: no such folder", rel.text)).with_code("ENOENT"));
    };
    if !dir.is_dir() {
        return Err(Error::new(format!("list {:?}: it is a file, not a folder", rel.text)).with_code("ENOTDIR"));
    }
    let mut out = Vec::new();
    for entry in fs::read_dir(&dir).map_err(|e| io_error(method, rel, &e))? {
        let entry = entry.map_err(|e| io_error(method, rel, &e))?;
        let name = entry.file_name();
        if name.as_bytes().starts_with(TEMP_PREFIX.as_bytes()) {
            continue;
        }
        if out.len() == MAX_ENTRIES {
            return Err(Error::new(format!("list {:?}: the folder has more than {MAX_ENTRIES} entries", rel.text)));
        }
        // Not followed: a link is reported as itself, whatever it points to.
        let meta = match entry.path().symlink_metadata() {
            Ok(m) => m,
            // Removed between read_dir and here.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_error(method, rel, &e)),
        };
        let mut fields = vec![
            (Value::str("name"), Value::Str(name.as_bytes().to_vec())),
            (Value::str("size"), Value::Int(meta.len() as i64)),
            (Value::str("dir"), Value::Bool(meta.is_dir())),
        ];
        if meta.file_type().is_symlink() {
            fields.push((Value::str("link"), Value::Bool(true)));
        }
        out.push((name.as_bytes().to_vec(), Value::Map(fields)));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(Value::Array(out.into_iter().map(|(_, v)| v).collect()))
}
