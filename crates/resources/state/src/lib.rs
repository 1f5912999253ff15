//! The `state` resource: a cage's persistent key/value state in one SQLite file (WAL mode,
//! synchronous=FULL, versioned schema). Methods `get`, `set`, `delete`, `keys`; see
//! docs/resources/state.md.
//!
//! Reads run in `call`. Writes are checked and encoded in `call`, then applied at `commit` in one
//! short SQLite transaction (BEGIN IMMEDIATE). Taking the write lock at `begin` instead would hold
//! it while the other participants work, and two state participants of one transaction (each on
//! its own connection) would wait on each other until the busy timeout failed them both.

mod codec;
pub mod held;
pub mod store;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::LocalBoxFuture;
use rustomnic_core::{Section, Value};
use rustomnic_resource::{Connection, Error, Resource, ResourceProtocol};

pub use codec::{decode, encode, FORMAT};
pub use store::{APPLICATION_ID, SCHEMA_VERSION};

/// Keys longer than this (in bytes) are refused.
pub const MAX_KEY: usize = 1024;
/// Encoded values longer than this are refused.
pub const MAX_VALUE: usize = 16 << 20;
/// `keys(prefix)` fails instead of returning more keys than this.
pub const MAX_KEYS: usize = 10_000;

const DEFAULT_BUSY_TIMEOUT: Duration = Duration::from_secs(5);
const METHODS: &str = "get, set, delete, keys";

/// The `state` protocol.
pub struct StateProtocol;

impl ResourceProtocol for StateProtocol {
    fn name(&self) -> &'static str {
        "state"
    }

    fn configure(&self, _resource: &str, section: &Section) -> Option<Arc<dyn Resource>> {
        let busy_timeout = section.duration("busy_timeout", Duration::from_secs(600)).map(|d| d.value).unwrap_or(DEFAULT_BUSY_TIMEOUT);
        let Some(path) = section.string("path") else {
            if !section.has("path") {
                section.table_error("path is required (the state file, such as \"/srv/cage/.data/state.sqlite\")");
            }
            return None;
        };
        if path.value.trim().is_empty() {
            section.error("path", "must not be empty");
            return None;
        }
        // Relative to the folder holding cage.toml, so a cage folder can be moved as a whole.
        let base = section.file().path().parent().unwrap_or(Path::new(""));
        // The file and its folders are made at the first connect, not here: `pmnc check` reads
        // the config too and must leave no files behind.
        Some(Arc::new(StateResource { path: Arc::new(base.join(path.value)), busy_timeout }))
    }
}

/// A configured state file.
pub struct StateResource {
    path: Arc<PathBuf>,
    busy_timeout: Duration,
}

impl StateResource {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Resource for StateResource {
    fn connect(&self) -> LocalBoxFuture<'static, Result<Box<dyn Connection>, Error>> {
        let path = self.path.clone();
        let busy = self.busy_timeout;
        Box::pin(async move {
            let p = path.clone();
            let conn = tokio::task::spawn_blocking(move || store::open(&p, busy))
                .await
                .map_err(|e| Error::broken(format!("opening the state file {} failed: {e}", path.display())))??;
            Ok(Box::new(StateConn { db: Arc::new(Mutex::new(conn)), path, staged: Vec::new(), broken: false }) as Box<dyn Connection>)
        })
    }

    /// SQLite takes one writer at a time, so more connections only add waiting writers.
    fn default_pool_size(&self) -> usize {
        4
    }
}

/// One SQLite connection. It sits behind `Arc<Mutex>` so that a clone can move into a blocking
/// task; if the call is abandoned (deadline), the task finishes with its clone and the
/// connection closes when the last clone goes, which rolls back whatever was open.
struct StateConn {
    db: Arc<Mutex<rusqlite::Connection>>,
    path: Arc<PathBuf>,
    /// Writes of this transaction, applied at commit.
    staged: Vec<store::Write>,
    broken: bool,
}

impl StateConn {
    /// Runs `f` with the SQLite connection on tokio's blocking pool.
    async fn blocking<T: Send + 'static>(&mut self, f: impl FnOnce(&mut rusqlite::Connection, &Path) -> Result<T, Error> + Send + 'static) -> Result<T, Error> {
        let db = self.db.clone();
        let path = self.path.clone();
        let joined = tokio::task::spawn_blocking(move || {
            let mut conn = db.lock().map_err(|_| Error::broken(format!("the connection to {} failed earlier and cannot be used", path.display())))?;
            f(&mut conn, &path)
        })
        .await;
        let result = joined.unwrap_or_else(|e| Err(Error::broken(format!("state file {}: the database task failed: {e}", self.path.display()))));
        if matches!(&result, Err(e) if e.broken) {
            self.broken = true;
        }
        result
    }

    async fn call_inner(&mut self, method: &str, args: Vec<Value>) -> Result<Value, Error> {
        match method {
            "get" => {
                arity(method, "get(key)", &args, 1, 1)?;
                let key = key_arg(method, args.first())?;
                let k = key.clone();
                // A queued call reads its own held writes (see held.rs).
                let stored = match held::lookup(&self.path, &key) {
                    Some(seen) => seen,
                    None => self.blocking(move |c, p| store::get(c, p, &k)).await?,
                };
                match stored {
                    None => Ok(Value::Nil),
                    Some(bytes) => decode(&bytes).map_err(|e| Error::new(format!("get: key {key:?} cannot be read: {e}"))),
                }
            }
            "set" => {
                if args.len() == 1 {
                    return Err(Error::new("set(key, value) needs a value; set(key, nil) or delete(key) removes a key"));
                }
                arity(method, "set(key, value)", &args, 2, 2)?;
                let key = key_arg(method, args.first())?;
                let write = match args.get(1).unwrap_or(&Value::Nil) {
                    // Like assigning nil to a Lua table field: the key goes away.
                    Value::Nil => store::Write::Delete(key),
                    value => {
                        let encoded = encode(value, MAX_VALUE).map_err(|e| Error::new(format!("set: key {key:?}: {e}")))?;
                        store::Write::Set(key, encoded)
                    }
                };
                self.staged.push(write);
                Ok(Value::Nil)
            }
            "delete" => {
                arity(method, "delete(key)", &args, 1, 1)?;
                let key = key_arg(method, args.first())?;
                let k = key.clone();
                let existed = self.blocking(move |c, p| store::exists(c, p, &k)).await?;
                self.staged.push(store::Write::Delete(key));
                Ok(Value::Bool(existed))
            }
            "keys" => {
                arity(method, "keys(prefix)", &args, 0, 1)?;
                let prefix = match args.first() {
                    None | Some(Value::Nil) => String::new(),
                    Some(Value::Str(b)) => String::from_utf8(b.clone()).map_err(|_| Error::new("keys: the prefix is not UTF-8 text (keys always are)"))?,
                    Some(other) => return Err(Error::new(format!("keys: the prefix must be a string, got {}", other.type_name()))),
                };
                let keys = self.blocking(move |c, p| store::keys(c, p, &prefix, MAX_KEYS)).await?;
                Ok(Value::Array(keys.into_iter().map(Value::str).collect()))
            }
            other => Err(Error::new(format!("no method {other} (methods: {METHODS})"))),
        }
    }
}

fn arity(method: &str, usage: &str, args: &[Value], min: usize, max: usize) -> Result<(), Error> {
    if args.len() < min || args.len() > max {
        return Err(Error::new(format!("{method}: expected {usage}, got {} argument{}", args.len(), if args.len() == 1 { "" } else { "s" })));
    }
    Ok(())
}

/// A key: non-empty UTF-8 text of at most [`MAX_KEY`] bytes.
fn key_arg(method: &str, v: Option<&Value>) -> Result<String, Error> {
    let v = v.unwrap_or(&Value::Nil);
    let Value::Str(bytes) = v else {
        return Err(Error::new(format!("{method}: the key must be a string, got {}", v.type_name())));
    };
    if bytes.is_empty() {
        return Err(Error::new(format!("{method}: the key must not be empty")));
    }
    if bytes.len() > MAX_KEY {
        return Err(Error::new(format!("{method}: the key is {} bytes, over the limit of {}", bytes.len(), codec::human_size(MAX_KEY))));
    }
    String::from_utf8(bytes.clone()).map_err(|_| Error::new(format!("{method}: the key must be UTF-8 text")))
}

impl Connection for StateConn {
    fn begin(&mut self) -> LocalBoxFuture<'_, Result<(), Error>> {
        self.staged.clear();
        Box::pin(async { Ok(()) })
    }

    fn call<'a>(&'a mut self, method: &'a str, args: Vec<Value>) -> LocalBoxFuture<'a, Result<Value, Error>> {
        Box::pin(self.call_inner(method, args))
    }

    fn commit(&mut self) -> LocalBoxFuture<'_, Result<(), Error>> {
        let writes = std::mem::take(&mut self.staged);
        Box::pin(async move {
            if writes.is_empty() {
                return Ok(());
            }
            // While a queued call of this cage runs, its writes wait for the call's completion
            // record and commit in the same SQLite transaction (exactly once on the state).
            let Some(writes) = held::hold(&self.path, writes) else {
                return Ok(());
            };
            self.blocking(move |c, p| store::apply(c, p, &writes)).await
        })
    }

    fn rollback(&mut self) -> LocalBoxFuture<'_, Result<(), Error>> {
        // Nothing reached the file before commit, so dropping the staged writes is the rollback.
        self.staged.clear();
        Box::pin(async { Ok(()) })
    }

    fn is_healthy(&mut self) -> LocalBoxFuture<'_, bool> {
        let healthy = !self.broken;
        Box::pin(async move { healthy })
    }
}
