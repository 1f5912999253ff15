//! Held writes: while a queued call runs, the state writes it commits are kept here instead of
//! reaching the file, and the queue commits them in the same SQLite transaction as the record
//! that the call is done. A crash before that commit loses both, so the call runs again from
//! scratch; after it, both are there. This is what makes a queued call exactly once on its
//! cage's state (docs/queues.md).
//!
//! The scope is a tokio task-local around the call's future: every transaction the call commits
//! from its own task (`pmnc.state.*`, `xa.state.*` with the default sync_commit) is in it. Only
//! writes to the file of the scope are held; a call into another cage writes that cage's state
//! directly.

use std::cell::RefCell;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use crate::store::Write;

/// The writes of one running queued call to one state file.
#[derive(Debug, Default)]
pub struct Held {
    path: PathBuf,
    writes: Vec<Write>,
}

tokio::task_local! {
    static HELD: Rc<RefCell<Held>>;
}

/// Runs `f` with the state writes to `path` held; returns its output and the writes, in the
/// order they were committed.
pub async fn scope<F: Future>(path: &Path, f: F) -> (F::Output, Vec<Write>) {
    let held = Rc::new(RefCell::new(Held { path: path.to_path_buf(), writes: Vec::new() }));
    let out = HELD.scope(held.clone(), f).await;
    let writes = std::mem::take(&mut held.borrow_mut().writes);
    (out, writes)
}

/// Keeps `writes` when a scope for `path` is active (returns None); otherwise gives them back
/// to be applied now.
pub(crate) fn hold(path: &Path, writes: Vec<Write>) -> Option<Vec<Write>> {
    HELD.try_with(|h| {
        let mut h = h.borrow_mut();
        if h.path == path {
            h.writes.extend(writes.iter().cloned());
            true
        } else {
            false
        }
    })
    .ok()
    .filter(|held| *held)
    .map_or(Some(writes), |_| None)
}

/// The value the held writes give `key`: Some(Some(bytes)) set, Some(None) deleted, None when
/// no held write touched it (read the file).
pub(crate) fn lookup(path: &Path, key: &str) -> Option<Option<Vec<u8>>> {
    HELD.try_with(|h| {
        let h = h.borrow();
        if h.path != path {
            return None;
        }
        h.writes.iter().rev().find_map(|w| match w {
            Write::Set(k, v) if k == key => Some(Some(v.clone())),
            Write::Delete(k) if k == key => Some(None),
            _ => None,
        })
    })
    .ok()
    .flatten()
}
