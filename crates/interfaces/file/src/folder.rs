//! The loop of one drop folder, on its own thread: folder events (notify) and listings find the
//! complete files, at most `concurrency` are taken and handled at once, and each is moved on
//! after its outcome is recorded. What it keeps in memory is bounded: the names it watches
//! settle and the names ready to take ([`MAX_TRACKED`] together), never the files' contents
//! beyond those being handled.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rusqlite::Connection;
use rustomnic_core::metrics::MessageCounts;
use rustomnic_core::Value;
use rustomnic_interface::Host;
use rustomnic_lua::{worker, RequestCtx};
use rustomnic_resource_state::held;
use rustomnic_resource_state::store::Write;
use tokio::sync::{mpsc, oneshot};

use crate::outcome::{self, Recorded};
use crate::{FileInterface, OnSuccess, DONE, FAILED, PROCESSING};

/// The most names watched (settling) and ready at once; more wait for a later listing.
pub const MAX_TRACKED: usize = 10_000;
/// Folder events buffered between the watcher's thread and the loop; when full, the loop lists
/// the folder instead.
const EVENTS: usize = 4096;
/// How soon after an event the folder is listed (events come in bursts).
const DEBOUNCE: Duration = Duration::from_millis(20);

/// Files in `.processing/` being handled by some interface of this process, so that a replacing
/// interface's recovery leaves them to the one handling them.
static BUSY: Mutex<Option<HashSet<PathBuf>>> = Mutex::new(None);

fn busy(f: impl FnOnce(&mut HashSet<PathBuf>) -> bool) -> bool {
    let mut b = BUSY.lock().unwrap_or_else(|e| e.into_inner());
    f(b.get_or_insert_with(HashSet::new))
}

/// A name seen in the folder, waiting until it is complete.
struct Track {
    size: u64,
    mtime: Option<SystemTime>,
    /// Since when size and mtime are what they are.
    since: Instant,
}

/// What the loop shares with the tasks of the files.
struct Shared {
    me: Arc<FileInterface>,
    host: Host,
    processing: PathBuf,
    db: Arc<Mutex<Connection>>,
    counts: Arc<MessageCounts>,
}

/// What one task does.
enum Work {
    /// Take this name from the folder and handle it.
    Take(String),
    /// A file left in `.processing/` without an outcome: handle it again.
    Again(PathBuf),
    /// A file left in `.processing/` with its outcome: move it on.
    Finish(PathBuf, Recorded),
}

/// Runs the folder until the interface's shutdown.
pub async fn run(me: Arc<FileInterface>, host: Host) {
    let spec = host.spec().clone();
    let processing = me.folder.join(PROCESSING);
    for d in [&processing, &me.folder.join(DONE), &me.folder.join(FAILED)] {
        if let Err(e) = std::fs::create_dir_all(d) {
            tracing::error!(cage = %spec.cage, interface = %spec.name, "file interface stopped: cannot make {}: {e}", d.display());
            return;
        }
    }
    let db = match outcome::open(&spec.state_file) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(cage = %spec.cage, interface = %spec.name, "file interface stopped: {e}");
            return;
        }
    };
    let shared =
        Arc::new(Shared { counts: rustomnic_core::metrics::message_counts(&spec.cage, &spec.name), me, host, processing, db: Arc::new(Mutex::new(db)) });
    let mut l = Loop { sh: shared.clone(), tracked: HashMap::new(), renamed: HashSet::new(), ready: VecDeque::new(), queued: HashSet::new(), running: 0 };
    l.run().await;
}

struct Loop {
    sh: Arc<Shared>,
    tracked: HashMap<String, Track>,
    /// Names the events say were renamed into the folder: complete at once.
    renamed: HashSet<String>,
    ready: VecDeque<Work>,
    /// The names in `ready`.
    queued: HashSet<String>,
    running: usize,
}

impl Loop {
    async fn run(&mut self) {
        let me = self.sh.me.clone();
        let spec = self.sh.host.spec().clone();
        let mut shutdown = self.sh.host.shutdown();
        let (ev_tx, mut ev_rx) = mpsc::channel::<Option<String>>(EVENTS);
        let watcher = watch(&me.folder, ev_tx);
        if let Err(e) = &watcher {
            tracing::warn!(cage = %spec.cage, interface = %spec.name, "no events for {} ({e}); listing it every {:?} instead", me.folder.display(), me.rescan);
        }
        self.recover();
        tracing::info!(cage = %spec.cage, interface = %spec.name, "watching {} ({} file(s) at once)", me.folder.display(), me.concurrency);
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<()>();
        let mut next_scan = Instant::now();
        loop {
            self.start_ready(&done_tx);
            tokio::select! {
                _ = shutdown.changed() => break,
                Some(()) = done_rx.recv() => {
                    self.running -= 1;
                    if self.ready.is_empty() {
                        // Files may be waiting that the last listing could not queue.
                        next_scan = next_scan.min(Instant::now() + DEBOUNCE);
                    }
                }
                Some(ev) = ev_rx.recv() => {
                    if let Some(name) = ev {
                        if self.renamed.len() < MAX_TRACKED {
                            self.renamed.insert(name);
                        }
                    }
                    next_scan = next_scan.min(Instant::now() + DEBOUNCE);
                }
                _ = tokio::time::sleep_until(next_scan.into()) => {
                    next_scan = self.scan();
                }
            }
        }
        drop(watcher);
        // Nothing new is taken; what is in flight ends (and is moved on) first.
        let limit = Instant::now() + spec.request_timeout + Duration::from_secs(5);
        while self.running > 0 {
            match tokio::time::timeout_at(limit.into(), done_rx.recv()).await {
                Ok(Some(())) => self.running -= 1,
                _ => break,
            }
        }
    }

    /// Lists `.processing/` at the start: files with a recorded outcome are moved on, the others
    /// handled again (their handler may have run; its state writes did not commit).
    fn recover(&mut self) {
        let sh = self.sh.clone();
        let spec = sh.host.spec();
        let entries = match std::fs::read_dir(&sh.processing) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(cage = %spec.cage, interface = %spec.name, "cannot list {}: {e}", sh.processing.display());
                return;
            }
        };
        let db = sh.db.lock().unwrap_or_else(|e| e.into_inner());
        let (mut again, mut finish) = (0, 0);
        for entry in entries.flatten() {
            let path = entry.path();
            if !entry.file_type().is_ok_and(|t| t.is_file()) || busy(|b| b.contains(&path)) {
                continue;
            }
            match outcome::lookup(&db, &spec.state_file, &path) {
                Ok(Some(r)) => {
                    finish += 1;
                    self.ready.push_back(Work::Finish(path, r));
                }
                Ok(None) => {
                    again += 1;
                    self.ready.push_back(Work::Again(path));
                }
                Err(e) => tracing::error!(cage = %spec.cage, interface = %spec.name, "{e}; {} stays for the next start", path.display()),
            }
        }
        if let Err(e) = outcome::prune(&db, &spec.state_file, &sh.processing) {
            tracing::warn!(cage = %spec.cage, interface = %spec.name, "{e}");
        }
        if again + finish > 0 {
            tracing::info!(cage = %spec.cage, interface = %spec.name, "found in {}: {finish} file(s) handled before the stop (moved on now), {again} not (handled again)", sh.processing.display());
        }
    }

    /// Lists the folder: names complete now are queued, the others watched until they settle.
    /// Gives when to list again.
    fn scan(&mut self) -> Instant {
        let me = self.sh.me.clone();
        let now = Instant::now();
        let entries = match std::fs::read_dir(&me.folder) {
            Ok(e) => e,
            Err(e) => {
                let spec = self.sh.host.spec();
                tracing::warn!(cage = %spec.cage, interface = %spec.name, "cannot list {}: {e}", me.folder.display());
                return now + me.rescan;
            }
        };
        let mut seen = HashSet::new();
        for entry in entries.flatten() {
            let Ok(name) = entry.file_name().into_string() else { continue };
            if !me.wanted(&name) || self.queued.contains(&name) {
                continue;
            }
            // Regular files only: not the interface's own folders, not links.
            let Ok(meta) = std::fs::symlink_metadata(entry.path()) else { continue };
            if !meta.is_file() {
                continue;
            }
            seen.insert(name.clone());
            let (size, mtime) = (meta.len(), meta.modified().ok());
            let full = self.tracked.len() + self.ready.len() >= MAX_TRACKED;
            let complete = match self.tracked.get_mut(&name) {
                Some(t) if t.size == size && t.mtime == mtime => now.duration_since(t.since) >= me.settle,
                Some(t) => {
                    *t = Track { size, mtime, since: now };
                    false
                }
                None if full => continue,
                None => {
                    self.tracked.insert(name.clone(), Track { size, mtime, since: now });
                    me.settle.is_zero()
                }
            };
            if complete || self.renamed.remove(&name) {
                self.tracked.remove(&name);
                self.queued.insert(name.clone());
                self.ready.push_back(Work::Take(name));
            }
        }
        self.tracked.retain(|n, _| seen.contains(n));
        self.renamed.retain(|n| seen.contains(n));
        let settle_due = self.tracked.values().map(|t| t.since + me.settle).min();
        let next = settle_due.map_or(now + me.rescan, |d| d.min(now + me.rescan));
        next.max(now + DEBOUNCE)
    }

    fn start_ready(&mut self, done: &mpsc::UnboundedSender<()>) {
        while self.running < self.sh.me.concurrency {
            let Some(work) = self.ready.pop_front() else { return };
            if let Work::Take(name) = &work {
                self.queued.remove(name);
            }
            self.running += 1;
            let (sh, done) = (self.sh.clone(), done.clone());
            tokio::spawn(async move {
                sh.clone().work(work).await;
                let _ = done.send(());
            });
        }
    }
}

/// Watches `folder` (not its subfolders): a name renamed into it is sent as Some(name), any
/// other change as None. When the loop falls behind, events are dropped: the events waiting
/// already bring a listing, which finds what they said (a dropped rename then takes `settle`).
fn watch(folder: &Path, tx: mpsc::Sender<Option<String>>) -> Result<notify::RecommendedWatcher, String> {
    use notify::event::{EventKind, ModifyKind, RenameMode};
    use notify::Watcher;
    let dir = folder.to_path_buf();
    let mut w = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let Ok(ev) = res else {
            let _ = tx.try_send(None);
            return;
        };
        // Names leaving the folder (this interface's own takes among them) change nothing to
        // list: only arrivals and writes are worth a listing.
        if matches!(ev.kind, EventKind::Remove(_) | EventKind::Access(_) | EventKind::Modify(ModifyKind::Name(RenameMode::From))) {
            return;
        }
        let renamed_in = matches!(ev.kind, EventKind::Modify(ModifyKind::Name(RenameMode::To | RenameMode::Both)));
        let name = ev
            .paths
            .last()
            .filter(|p| renamed_in && p.parent() == Some(dir.as_path()))
            .and_then(|p| p.file_name())
            .and_then(|n| n.to_str())
            .map(str::to_string);
        let _ = tx.try_send(name);
    })
    .map_err(|e| e.to_string())?;
    w.watch(folder, notify::RecursiveMode::NonRecursive).map_err(|e| e.to_string())?;
    Ok(w)
}

/// Runs blocking `f` on the blocking pool.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, String> {
    tokio::task::spawn_blocking(f).await.map_err(|e| format!("a blocking task failed: {e}"))
}

impl Shared {
    async fn work(self: Arc<Self>, work: Work) {
        let spec = self.host.spec();
        let path = match work {
            Work::Take(name) => {
                let (folder, processing) = (self.me.folder.clone(), self.processing.clone());
                match blocking(move || outcome::take(&folder, &processing, &name)).await.and_then(|r| r) {
                    Ok(Some(p)) => p,
                    Ok(None) => return,
                    Err(e) => {
                        tracing::error!(cage = %spec.cage, interface = %spec.name, "{e}");
                        return;
                    }
                }
            }
            Work::Again(p) => {
                self.counts.redelivered.fetch_add(1, Ordering::Relaxed);
                p
            }
            Work::Finish(p, r) => {
                if busy(|b| b.insert(p.clone())) {
                    self.finish(&p, r, true).await;
                    busy(|b| b.remove(&p));
                }
                return;
            }
        };
        if !busy(|b| b.insert(path.clone())) {
            return;
        }
        self.counts.received.fetch_add(1, Ordering::Relaxed);
        self.handle(&path).await;
        busy(|b| b.remove(&path));
    }

    /// Reads, runs the handler, records, moves on.
    async fn handle(&self, path: &Path) {
        let spec = self.host.spec();
        let name = outcome::original_name(path);
        let (p, max) = (path.to_path_buf(), self.me.max_size);
        let read = blocking(move || outcome::read(&p, max)).await.and_then(|r| r);
        let (content, mtime) = match read {
            Ok(Ok((c, m))) => (c, m),
            Ok(Err(error)) => {
                self.counts.refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(cage = %spec.cage, interface = %spec.name, "{name}: {error}");
                let r = Recorded { ok: false, error, request_id: "-".into(), at_ms: outcome::now_ms() };
                self.finish(path, r, false).await;
                return;
            }
            // Gone: another copy of this interface (the one it replaced) finished it.
            Err(_) if !path.exists() => return,
            Err(e) => {
                tracing::error!(cage = %spec.cage, interface = %spec.name, "{name}: {e}; it stays in {} for the next start", self.processing.display());
                return;
            }
        };
        let size = content.len();
        let file = Value::Map(vec![
            (Value::str("name"), Value::str(name.clone())),
            (Value::str("path"), Value::str(path.to_string_lossy())),
            (Value::str("size"), Value::Int(size as i64)),
            (Value::str("mtime"), mtime.and_then(|m| m.duration_since(UNIX_EPOCH).ok()).map_or(Value::Nil, |d| Value::Float(d.as_secs_f64()))),
            (Value::str("content"), Value::Str(content)),
        ]);
        let (request_id, result, writes) = self.run_handler(file).await;
        let record = Recorded { ok: result.is_ok(), error: result.err().unwrap_or_default(), request_id, at_ms: outcome::now_ms() };
        let r = record.clone();
        let (sh_path, state, target) = (path.to_path_buf(), spec.state_file.clone(), self.db.clone());
        let recorded = blocking(move || {
            let mut db = target.lock().unwrap_or_else(|e| e.into_inner());
            outcome::record(&mut db, &state, &sh_path, &r, &writes)
        })
        .await
        .and_then(|r| r);
        if let Err(e) = recorded {
            tracing::error!(cage = %spec.cage, interface = %spec.name, "{name}: {e}; it stays in {} and is handled again at the next start", self.processing.display());
            return;
        }
        self.finish(path, record, false).await;
    }

    /// Runs the handler on a worker with its `pmnc.state` writes held: its request id, how it
    /// ended, the writes (none after a failure: a failed handler leaves no trace on the state).
    async fn run_handler(&self, file: Value) -> (String, Result<(), String>, Vec<Write>) {
        let spec = self.host.spec().clone();
        let (tx, rx) = oneshot::channel();
        self.host.spawn(Box::new(move || {
            Box::pin(async move {
                let id = rustomnic_lua::new_request_id();
                let (module, function) = spec.handler.value.clone();
                let out = match worker::cage(&spec.cage) {
                    Some(vm) => {
                        let ctx = RequestCtx::with_deadline(id.clone(), &spec.cage, &spec.name, Instant::now() + spec.request_timeout, None);
                        let (r, writes) = held::scope(
                            &spec.state_file,
                            worker::run_traced(&vm, ctx, &module, &function, vec![file], rustomnic_lua::trace::SpanKind::Consumer),
                        )
                        .await;
                        match r {
                            Ok(_) => (id, Ok(()), writes),
                            Err(e) => (id, Err(e.to_string()), Vec::new()),
                        }
                    }
                    None => (id, Err(format!("cage {} does not run on this worker", spec.cage)), Vec::new()),
                };
                let _ = tx.send(out);
            })
        }));
        rx.await.unwrap_or_else(|_| ("-".into(), Err("the worker stopped before the handler ended".into()), Vec::new()))
    }

    /// Moves a handled file on (done/ or deleted, failed/ with its `.error`) and forgets its
    /// outcome.
    async fn finish(&self, path: &Path, r: Recorded, recovered: bool) {
        let spec = self.host.spec();
        let name = outcome::original_name(path);
        let (p, folder, on_success, state, db) = (path.to_path_buf(), self.me.folder.clone(), self.me.on_success, spec.state_file.clone(), self.db.clone());
        let (n, r2) = (name.clone(), r.clone());
        let moved = blocking(move || -> Result<String, String> {
            // Found at a start with a second link: a move cut short after linking the file to
            // its new name (a crash before the unlink); only the unlink is left to do.
            let linked = recovered && std::fs::metadata(&p).is_ok_and(|m| std::os::unix::fs::MetadataExt::nlink(&m) > 1);
            let to = if linked {
                std::fs::remove_file(&p).map_err(|e| format!("cannot remove {}: {e}", p.display()))?;
                "moved before the stop".to_string()
            } else if r2.ok {
                match on_success {
                    OnSuccess::Delete => {
                        std::fs::remove_file(&p).map_err(|e| format!("cannot delete {}: {e}", p.display()))?;
                        "deleted".to_string()
                    }
                    OnSuccess::Move => format!("moved to {}", outcome::move_unique(&p, &folder.join(DONE), &n)?.display()),
                }
            } else {
                let to = outcome::move_unique(&p, &folder.join(FAILED), &n)?;
                outcome::write_error(&to, &n, &r2)?;
                format!("moved to {}", to.display())
            };
            let db = db.lock().unwrap_or_else(|e| e.into_inner());
            outcome::forget(&db, &state, &p)?;
            Ok(to)
        })
        .await
        .and_then(|r| r);
        match moved {
            Ok(to) if r.ok => {
                self.counts.acked.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(cage = %spec.cage, interface = %spec.name, request = %r.request_id, "{name} handled; {to}");
            }
            Ok(to) => {
                self.counts.dead_lettered.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(cage = %spec.cage, interface = %spec.name, request = %r.request_id, "{name} failed; {to}: {}", r.error);
            }
            Err(e) => tracing::error!(cage = %spec.cage, interface = %spec.name, "{name}: {e}"),
        }
    }
}
