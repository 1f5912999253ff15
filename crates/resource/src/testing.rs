//! Test support for resource protocols: run a Lua module function of a cage whose resources
//! are given, on a current-thread runtime, as a request with a deadline; and the SQL server the
//! database protocols' tests share (its URL, the loud skip, statements, tables of one test).
// Test support: a failed step ends the test that asked for it.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use rustomnic_core::{Section, SourceFile, Value};
use rustomnic_lua::{compile, worker, CageVm, CompiledModule, RequestCtx, RunError};

use crate::{read_pool_settings, ResourceConfig, ResourceProtocol};

/// Configures a resource from TOML text of its table (`url = "..."` ...), as `cage.toml` would.
/// Returns the problems found, each as `file:line: key: message`.
pub fn configure(protocol: &dyn ResourceProtocol, name: &str, toml: &str) -> Result<ResourceConfig, Vec<String>> {
    configure_in(Path::new(""), protocol, name, toml)
}

/// Like [`configure`], as the `cage.toml` of the cage folder `dir`, for keys whose relative paths
/// are taken from that folder.
pub fn configure_in(dir: &Path, protocol: &dyn ResourceProtocol, name: &str, toml: &str) -> Result<ResourceConfig, Vec<String>> {
    let text = format!("[resources.{name}]\n{toml}");
    let file = SourceFile::parse(&dir.join("cage.toml"), text).map_err(|e| vec![e.to_string()])?;
    let root = file.root();
    let config = (|| {
        let resources: Section = root.table("resources")?;
        let section = resources.table(name)?;
        let _ = section.string("protocol");
        let mut pool = read_pool_settings(&section, 0);
        let resource = protocol.configure(name, &section);
        section.finish();
        let resource = resource?;
        if pool.size == 0 {
            pool.size = resource.default_pool_size();
        }
        Some(ResourceConfig {
            name: name.to_string(),
            protocol: protocol.name().to_string(),
            pool,
            resource,
            fingerprint: section.fingerprint(),
            breaker: Default::default(),
        })
    })();
    let errors = file.take_errors();
    match config {
        Some(c) if errors.is_empty() => Ok(c),
        _ => Err(errors.iter().map(|e| e.to_string()).collect()),
    }
}

/// Runs `function` of a module with `source` in cage "test" having `resources`, with `timeout`
/// as the request's deadline. Each call builds a fresh runtime, VM and pools.
pub fn run_lua(resources: Vec<ResourceConfig>, source: &str, function: &str, args: Vec<Value>, timeout: Duration) -> Result<Vec<Value>, RunError> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| RunError::Internal(e.to_string()))?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async {
        let stats = resources.iter().map(|r| (("test".to_string(), r.name.clone()), crate::stats_for("test", &r.name))).collect::<BTreeMap<_, _>>();
        let _pools = crate::install(&[("test".to_string(), resources)], 1, &stats);
        let vm = CageVm::new("test").map_err(RunError::Internal)?;
        let display = "test/m.lua".to_string();
        let bytecode = compile("m", Path::new(&display), &display, source.as_bytes()).map_err(|e| RunError::Internal(e.to_string()))?;
        let module = CompiledModule { name: "m".into(), path: display.clone().into(), display, bytecode, functions: vec![], version: 1, source_hash: 0 };
        vm.install(&module).map_err(RunError::Internal)?;
        let result = vm.call(RequestCtx::new("test", "test", timeout), "m", function, args).await;
        worker::clear();
        result
    })
}

/// Says loudly, past the test harness's capture, that a test is skipped and why (eprintln! output
/// of a passing test is captured and never shown, and this must be seen).
pub fn shout(text: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "\n!!!!!!!!\n{text}\n!!!!!!!!\n");
}

/// `s` as a TOML string.
pub fn toml_string(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// The SQL server the tests of one database protocol run against: where it is (an environment
/// variable, else a default URL), whether it answers (said loudly, with the command that starts
/// it, when it does not), statements run on it, and tables of one test dropped when it ends.
/// The resource is always named `db`.
pub struct SqlServer {
    pub protocol: &'static (dyn ResourceProtocol + 'static),
    /// "PostgreSQL", as the skip banner names it.
    pub product: &'static str,
    /// The tests that skip ("postgresql"), for the banner.
    pub tests: &'static str,
    pub url_env: &'static str,
    pub default_url: &'static str,
    /// The shell command that starts the server on a test machine.
    pub start: &'static str,
    /// Appended to `create table NAME (COLUMNS)` (" engine = InnoDB").
    pub create_suffix: &'static str,
}

const SQL_MODULE: &str = r#"
local M = {}
function M.exec(sql, ...)
  return pmnc.transaction.db.execute(sql, ...)
end
function M.try(sql)
  local ok, r = pcall(pmnc.transaction.db.execute, sql)
  if ok then return true end
  return false, type(r) == "table" and tostring(r.message) or tostring(r)
end
return M
"#;

/// Which servers were found up, by URL environment variable (asked once per test binary).
static SQL_UP: std::sync::Mutex<BTreeMap<&'static str, bool>> = std::sync::Mutex::new(BTreeMap::new());

impl SqlServer {
    /// The URL of the test server: `url_env` when set, else `default_url`.
    pub fn url(&self) -> String {
        std::env::var(self.url_env).unwrap_or_else(|_| self.default_url.to_string())
    }

    /// A resource `db` at `url` with more keys (`extra`, TOML lines); a refused config panics.
    pub fn db_with(&self, url: &str, extra: &str) -> ResourceConfig {
        match configure(self.protocol, "db", &format!("url = {}\n{extra}", toml_string(url))) {
            Ok(c) => c,
            Err(e) => panic!("config refused: {e:?}"),
        }
    }

    /// A resource `db` at the test server.
    pub fn db(&self, extra: &str) -> ResourceConfig {
        self.db_with(&self.url(), extra)
    }

    /// Runs one statement on the test server in a transaction of its own.
    pub fn try_exec(&self, sql: &str, params: Vec<Value>) -> Result<Value, RunError> {
        let mut args = vec![Value::str(sql)];
        args.extend(params);
        let mut r = run_lua(vec![self.db("")], SQL_MODULE, "exec", args, Duration::from_secs(10))?;
        Ok(if r.is_empty() { Value::Nil } else { r.remove(0) })
    }

    /// Like [`SqlServer::try_exec`]; a failure panics with the statement.
    pub fn exec(&self, sql: &str, params: Vec<Value>) -> Value {
        self.try_exec(sql, params).unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// Whether the server answers. When it does not, says so loudly with the command that starts
    /// it (once per test binary), and the caller skips.
    pub fn up(&self) -> bool {
        if let Some(up) = SQL_UP.lock().unwrap_or_else(|e| e.into_inner()).get(self.url_env) {
            return *up;
        }
        let r = run_lua(vec![self.db("connect_timeout = \"3s\"\n")], SQL_MODULE, "try", vec![Value::str("select 1")], Duration::from_secs(5));
        let up = match r {
            Ok(v) if v.first() == Some(&Value::Bool(true)) => true,
            other => {
                let why = match &other {
                    Ok(v) => v.get(1).and_then(|t| t.as_str()).unwrap_or("no answer").to_string(),
                    Err(e) => e.to_string(),
                };
                shout(&format!(
                    "!!! {} is not reachable at the URL of {} or its default ({why}).\n!!! The {} tests are SKIPPED. Start the server with:\n!!!   {}",
                    self.product, self.url_env, self.tests, self.start
                ));
                false
            }
        };
        SQL_UP.lock().unwrap_or_else(|e| e.into_inner()).insert(self.url_env, up);
        up
    }

    /// A table of its own for one test (`rtest_PID_N`), created with `columns` and dropped when
    /// the guard is.
    pub fn table(&'static self, columns: &str) -> Table {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let name = format!("rtest_{}_{}", std::process::id(), N.fetch_add(1, std::sync::atomic::Ordering::SeqCst));
        self.exec(&format!("create table {name} ({columns}){}", self.create_suffix), vec![]);
        Table { server: self, name }
    }
}

/// A test's table on a [`SqlServer`], dropped with the guard (also when the test panics).
pub struct Table {
    server: &'static SqlServer,
    pub name: String,
}

impl Drop for Table {
    fn drop(&mut self) {
        let _ = self.server.try_exec(&format!("drop table if exists {}", self.name), vec![]);
    }
}
