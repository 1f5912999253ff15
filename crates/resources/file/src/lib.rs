//! The `file` resource: reads and writes files under one configured root folder, and nowhere
//! else. Methods `read`, `write`, `append`, `list`, `delete`, `exists`; see docs/resources/file.md.
//!
//! Reads happen in `call`. Changes are checked and prepared in `call` (a write goes to a synced
//! temp file beside its target) and made at `commit` (rename, append, remove); rollback removes
//! the temp files and any folders the call made, so a rolled-back transaction leaves no trace.
//! All disk work runs on tokio's blocking pool, never on the worker thread.

mod ops;
mod paths;

/// Entry points for the fuzz targets (`fuzz/`); not an API.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::ops::{abandon, exists, list, read, stage_append, stage_delete, stage_write, SharedTrace, Staged};
    pub use crate::paths::{follow, parse, Rel};
}

use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures_util::future::LocalBoxFuture;
use rustomnic_core::{Section, Value};
use rustomnic_resource::{Connection, Error, Resource, ResourceProtocol};

pub use ops::TEMP_PREFIX;
pub use paths::OUTSIDE;

const DEFAULT_MAX_SIZE: u64 = 64 << 20;
const METHODS: &str = "read, write, append, list, delete, exists";

/// The `file` protocol.
pub struct FileProtocol;

impl ResourceProtocol for FileProtocol {
    fn name(&self) -> &'static str {
        "file"
    }

    fn configure(&self, _resource: &str, section: &Section) -> Option<Arc<dyn Resource>> {
        let max_size = section.size("max_size", 1 << 30).map(|s| s.value).unwrap_or(DEFAULT_MAX_SIZE);
        let Some(root) = section.string("root") else {
            if !section.has("root") {
                section.table_error("root is required (the folder this resource may read and write)");
            }
            return None;
        };
        // Relative to the folder holding cage.toml, so a cage folder can be moved as a whole.
        let base = section.file().path().parent().unwrap_or(Path::new(""));
        let given = base.join(&root.value);
        let canonical = match given.canonicalize() {
            Ok(c) => c,
            Err(e) => {
                section.error("root", format!("{}: {}", given.display(), paths::plain(&e)));
                return None;
            }
        };
        if !canonical.is_dir() {
            section.error("root", format!("{} is not a folder", given.display()));
            return None;
        }
        Some(Arc::new(FileResource { root: Arc::new(canonical), max_size }))
    }
}

/// A configured root folder.
pub struct FileResource {
    /// Canonical (links resolved), so that a resolved path is inside when it starts with it.
    root: Arc<PathBuf>,
    max_size: u64,
}

impl FileResource {
    pub fn root(&self) -> &Path {
        &self.root
    }
}

impl Resource for FileResource {
    fn connect(&self) -> LocalBoxFuture<'static, Result<Box<dyn Connection>, Error>> {
        let conn = FileConn { root: self.root.clone(), max_size: self.max_size, staged: Vec::new(), traces: Vec::new() };
        Box::pin(async move { Ok(Box::new(conn) as Box<dyn Connection>) })
    }

    /// A connection is only bookkeeping; a few allow a few file participants per transaction.
    fn default_pool_size(&self) -> usize {
        4
    }
}

/// The staged changes of the current transaction.
struct FileConn {
    root: Arc<PathBuf>,
    max_size: u64,
    staged: Vec<ops::Staged>,
    /// What each staged change (made or in flight) put on disk, for rollback.
    traces: Vec<ops::SharedTrace>,
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, Error> + Send + 'static) -> Result<T, Error> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| Err(Error::broken(format!("the file task failed: {e}"))))
}

fn arity(method: &str, usage: &str, args: &[Value], min: usize, max: usize) -> Result<(), Error> {
    if args.len() < min || args.len() > max {
        return Err(Error::new(format!("{method}: expected {usage}, got {} argument{}", args.len(), if args.len() == 1 { "" } else { "s" })));
    }
    Ok(())
}

/// The path argument; `None` (nil) names the root where `root_ok`.
fn path_arg(method: &str, v: Option<&Value>, root_ok: bool) -> Result<paths::Rel, Error> {
    let rel = match v {
        None | Some(Value::Nil) if root_ok => paths::parse(method, b"")?,
        Some(Value::Str(b)) => paths::parse(method, b)?,
        Some(other) => return Err(Error::new(format!("{method}: the path must be a string, got {}", other.type_name()))),
        None => return Err(Error::new(format!("{method}: the path is missing"))),
    };
    if rel.is_root() && !root_ok {
        return Err(Error::new(format!("{method}: the path {:?} names the root folder, not a file", rel.text)));
    }
    Ok(rel)
}

/// The data argument, taken (not copied: it may be large).
fn data_arg(method: &str, v: Option<Value>, max: u64) -> Result<Vec<u8>, Error> {
    match v.unwrap_or_default() {
        Value::Str(b) if b.len() as u64 > max => {
            Err(Error::new(format!("{method}: the data is {} bytes, over max_size ({max} bytes)", b.len())).with_code("EFBIG"))
        }
        Value::Str(b) => Ok(b),
        other => Err(Error::new(format!("{method}: the data must be a string, got {}", other.type_name()))),
    }
}

impl FileConn {
    async fn call_inner(&mut self, method: &str, args: Vec<Value>) -> Result<Value, Error> {
        let root = self.root.clone();
        match method {
            "read" => {
                arity(method, "read(path)", &args, 1, 1)?;
                let rel = path_arg(method, args.first(), false)?;
                let max = self.max_size;
                blocking(move || ops::read(&root, &rel, max)).await
            }
            "exists" => {
                arity(method, "exists(path)", &args, 1, 1)?;
                let rel = path_arg(method, args.first(), true)?;
                blocking(move || ops::exists(&root, &rel)).await
            }
            "list" => {
                arity(method, "list(path)", &args, 0, 1)?;
                let rel = path_arg(method, args.first(), true)?;
                blocking(move || ops::list(&root, &rel)).await
            }
            "write" | "append" => {
                let usage = if method == "write" { "write(path, data)" } else { "append(path, data)" };
                arity(method, usage, &args, 2, 2)?;
                let rel = path_arg(method, args.first(), false)?;
                let data = data_arg(method, args.into_iter().nth(1), self.max_size)?;
                // Recorded before the work starts, so rollback finds it even if this call is cut.
                let trace = ops::SharedTrace::default();
                self.traces.push(trace.clone());
                let staged = if method == "write" {
                    blocking(move || ops::stage_write(&root, &rel, &data, &trace)).await?
                } else {
                    blocking(move || ops::stage_append(&root, &rel, data, &trace)).await?
                };
                self.staged.push(staged);
                Ok(Value::Nil)
            }
            "delete" => {
                arity(method, "delete(path)", &args, 1, 1)?;
                let rel = path_arg(method, args.first(), false)?;
                let staged = blocking(move || ops::stage_delete(&root, &rel)).await?;
                let existed = staged.is_some();
                self.staged.extend(staged);
                Ok(Value::Bool(existed))
            }
            other => Err(Error::new(format!("no method {other} (methods: {METHODS})"))),
        }
    }

    /// Takes back everything staged: temp files and the folders calls made.
    fn discard_all(&mut self) -> (Vec<ops::Staged>, Vec<ops::SharedTrace>) {
        (std::mem::take(&mut self.staged), std::mem::take(&mut self.traces))
    }
}

fn discard(staged: Vec<ops::Staged>, traces: Vec<ops::SharedTrace>) {
    for s in &staged {
        ops::discard(s);
    }
    for t in &traces {
        ops::abandon(t);
    }
}

impl Connection for FileConn {
    fn begin(&mut self) -> LocalBoxFuture<'_, Result<(), Error>> {
        // Anything staged here is left over from a transaction that ended without commit or
        // rollback: dropped the same way a rollback drops it.
        self.rollback()
    }

    fn call<'a>(&'a mut self, method: &'a str, args: Vec<Value>) -> LocalBoxFuture<'a, Result<Value, Error>> {
        Box::pin(self.call_inner(method, args))
    }

    fn commit(&mut self) -> LocalBoxFuture<'_, Result<(), Error>> {
        let (staged, traces) = self.discard_all();
        Box::pin(async move {
            if staged.is_empty() {
                return Ok(());
            }
            blocking(move || {
                for (i, s) in staged.iter().enumerate() {
                    if let Err(e) = ops::apply(s) {
                        // What is not made yet is taken back; what is made stays made.
                        discard(staged.into_iter().skip(i).collect(), traces);
                        return Err(Error::new(e));
                    }
                }
                for t in &traces {
                    ops::release(t);
                }
                Ok(())
            })
            .await
        })
    }

    fn rollback(&mut self) -> LocalBoxFuture<'_, Result<(), Error>> {
        let (staged, traces) = self.discard_all();
        Box::pin(async move {
            if !staged.is_empty() || !traces.is_empty() {
                blocking(move || {
                    discard(staged, traces);
                    Ok(())
                })
                .await?;
            }
            Ok(())
        })
    }
}

impl Drop for FileConn {
    /// A connection dropped mid-transaction (the deadline cut a call, the pool closed it) still
    /// leaves no temp files; removing a few paths is quick enough to do in place.
    fn drop(&mut self) {
        let (staged, traces) = self.discard_all();
        discard(staged, traces);
    }
}
