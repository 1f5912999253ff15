//! The `cmdexec` resource: runs one configured executable with arguments and standard input,
//! never through a shell, and returns its exit code and output. Method `run`; see
//! docs/resources/cmdexec.md.
//!
//! A command cannot be undone, so begin, commit and rollback do nothing: the command runs (and
//! its effects happen) during `xa.execute()`, whatever the other participants do. A command still
//! running when the call is dropped (the deadline) is killed with its whole process group.

mod config;

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::LocalBoxFuture;
use rustomnic_core::{Section, Value};
use rustomnic_resource::{Connection, Error, Resource, ResourceProtocol};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

pub use config::split_words;

const DEFAULT_MAX_OUTPUT: u64 = 16 << 20;

/// The `cmdexec` protocol.
pub struct CmdexecProtocol;

impl ResourceProtocol for CmdexecProtocol {
    fn name(&self) -> &'static str {
        "cmdexec"
    }

    fn configure(&self, _resource: &str, section: &Section) -> Option<Arc<dyn Resource>> {
        let args = config::fixed_args(section);
        let env = config::env_table(section);
        let cwd = config::folder(section, "cwd");
        let cwd_failed = section.has("cwd") && cwd.is_none();
        let max_output = section.size("max_output", 1 << 30).map(|s| s.value).unwrap_or(DEFAULT_MAX_OUTPUT);
        let Some(name) = section.string("executable") else {
            if !section.has("executable") {
                section.table_error("executable is required (an absolute path, or a name looked up in PATH)");
            }
            return None;
        };
        let path_var = std::env::var("PATH").ok();
        let executable = match config::find_executable(&name.value, path_var.as_deref()) {
            Ok(p) => p,
            Err(e) => {
                section.error("executable", e);
                return None;
            }
        };
        if cwd_failed {
            return None;
        }
        Some(Arc::new(CmdResource(Arc::new(Spec { executable, args, env, cwd, max_output }))))
    }
}

/// What every run of one resource shares.
#[derive(Debug)]
pub struct Spec {
    pub executable: PathBuf,
    /// Leading arguments, before those of each run.
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: Option<PathBuf>,
    /// Limit of each of stdout and stderr, in bytes.
    pub max_output: u64,
}

pub struct CmdResource(Arc<Spec>);

impl CmdResource {
    pub fn spec(&self) -> &Spec {
        &self.0
    }
}

impl Resource for CmdResource {
    fn connect(&self) -> LocalBoxFuture<'static, Result<Box<dyn Connection>, Error>> {
        let conn = CmdConn(self.0.clone(), std::cell::Cell::new(false));
        Box::pin(async move { Ok(Box::new(conn) as Box<dyn Connection>) })
    }

    /// A connection is only the config; the size bounds how many commands run at once.
    fn default_pool_size(&self) -> usize {
        4
    }
}

/// A run's spec, and whether the current call started a process (which may have acted).
struct CmdConn(Arc<Spec>, std::cell::Cell<bool>);

/// The arguments and input of one run.
struct Run {
    args: Vec<String>,
    stdin: Option<Vec<u8>>,
}

fn usage() -> Error {
    Error::new("run: expected run(args, stdin) or run{args = {...}, stdin = \"...\"}")
}

/// `run(args, stdin)` or `run{args=, stdin=}`; both optional.
fn parse_run(args: Vec<Value>) -> Result<Run, Error> {
    if args.len() > 2 {
        return Err(usage());
    }
    let mut it = args.into_iter();
    let (list, stdin) = match (it.next(), it.next()) {
        // One table with named fields (a map whose keys are strings).
        (Some(Value::Map(fields)), None) if !fields.is_empty() => {
            let (mut list, mut stdin) = (Value::Nil, Value::Nil);
            for (k, v) in fields {
                match k.as_str() {
                    Some("args") => list = v,
                    Some("stdin") => stdin = v,
                    _ => return Err(Error::new(format!("run: unknown field {k} (fields: args, stdin)"))),
                }
            }
            (list, stdin)
        }
        (list, stdin) => (list.unwrap_or_default(), stdin.unwrap_or_default()),
    };
    let args = match list {
        Value::Nil => Vec::new(),
        // An empty Lua table arrives as an empty map.
        Value::Map(m) if m.is_empty() => Vec::new(),
        Value::Array(items) => items.into_iter().enumerate().map(|(i, v)| arg_text(i + 1, v)).collect::<Result<_, _>>()?,
        other => return Err(Error::new(format!("run: args must be an array of strings, got {}", other.type_name()))),
    };
    let stdin = match stdin {
        Value::Nil => None,
        Value::Str(b) => Some(b),
        other => return Err(Error::new(format!("run: stdin must be a string, got {}", other.type_name()))),
    };
    Ok(Run { args, stdin })
}

fn arg_text(n: usize, v: Value) -> Result<String, Error> {
    let text = match v {
        Value::Str(b) => String::from_utf8(b).map_err(|_| Error::new(format!("run: argument {n} is not UTF-8 text")))?,
        Value::Int(i) => i.to_string(),
        Value::Float(f) => f.to_string(),
        other => return Err(Error::new(format!("run: argument {n} must be a string or a number, got {}", other.type_name()))),
    };
    if text.contains('\0') {
        return Err(Error::new(format!("run: argument {n} contains a NUL byte")));
    }
    Ok(text)
}

/// The running command. Dropped before it is reaped (the deadline dropped the call, or the output
/// went over its limit), it kills the command's whole process group.
struct Running {
    child: Option<Child>,
    pid: Option<u32>,
}

impl Running {
    fn finished(&mut self) {
        self.child = None;
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        if let Some(pid) = self.pid.and_then(|p| i32::try_from(p).ok()) {
            // The group leader is not reaped yet (we hold it), so its pid, which is the group's
            // id, cannot have been reused: this reaches only the command and its children.
            // SAFETY: kill(2) takes plain integers and touches no memory of ours.
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
            }
        }
        let _ = child.start_kill();
        // Reap it here if it is gone already, which after SIGKILL takes well under a
        // millisecond; a few short looks keep the worker thread waiting at most ~10 ms, and keep
        // dead commands from lingering as zombies.
        let started = Instant::now();
        while started.elapsed() < Duration::from_millis(10) {
            match child.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) => std::thread::sleep(Duration::from_micros(200)),
            }
        }
        // Still there (stuck in the kernel): let the runtime reap it when it ends.
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                let _ = child.wait().await;
            });
        }
        // Without a runtime, dropping the child (kill_on_drop) hands it to tokio's orphan reaper.
    }
}

/// Reads `stream` to its end, failing as soon as it passes `max` bytes.
async fn read_limited(stream: Option<impl AsyncRead + Unpin>, max: u64, name: &str) -> Result<Vec<u8>, Error> {
    let Some(stream) = stream else { return Ok(Vec::new()) };
    let mut out = Vec::new();
    stream.take(max + 1).read_to_end(&mut out).await.map_err(|e| Error::new(format!("run: reading the command's {name}: {e}")))?;
    if out.len() as u64 > max {
        return Err(Error::new(format!("run: the command wrote more than max_output ({max} bytes) to {name}; it was killed")).with_code("OUTPUT_LIMIT"));
    }
    Ok(out)
}

impl CmdConn {
    async fn run(&self, method: &str, args: Vec<Value>) -> Result<Value, Error> {
        if method != "run" {
            return Err(Error::new(format!("no method {method} (methods: run)")));
        }
        let run = parse_run(args)?;
        let spec = &self.0;
        let mut cmd = Command::new(&spec.executable);
        cmd.args(&spec.args)
            .args(&run.args)
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .stdin(if run.stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            // Its own process group, so that the deadline reaches whatever it started, and a
            // Ctrl-C at the runtime's terminal does not reach it.
            .process_group(0);
        if let Some(dir) = &spec.cwd {
            cmd.current_dir(dir);
        }
        let shown = spec.executable.display();
        let mut child = cmd.spawn().map_err(|e| Error::new(format!("run: cannot start {shown}: {}", config::plain(&e))))?;
        self.1.set(true);
        let (stdin, stdout, stderr) = (child.stdin.take(), child.stdout.take(), child.stderr.take());
        let mut running = Running { pid: child.id(), child: Some(child) };
        let feed = async {
            if let (Some(mut pipe), Some(data)) = (stdin, run.stdin) {
                // A command that exits without reading all its input is not an error (EPIPE).
                let _ = pipe.write_all(&data).await;
                drop(pipe);
            }
            Ok::<(), Error>(())
        };
        // All three at once: a command may fill one pipe before it reads its input.
        let ((), out, err) = tokio::try_join!(feed, read_limited(stdout, spec.max_output, "stdout"), read_limited(stderr, spec.max_output, "stderr"))?;
        let status = match running.child.as_mut() {
            Some(child) => child.wait().await.map_err(|e| Error::new(format!("run: waiting for {shown}: {e}")))?,
            None => return Err(Error::new("run: the command was lost")),
        };
        running.finished();
        let mut result = Vec::with_capacity(4);
        match status.code() {
            Some(code) => result.push((Value::str("exit"), Value::Int(i64::from(code)))),
            None => {
                use std::os::unix::process::ExitStatusExt;
                result.push((Value::str("signal"), Value::Int(i64::from(status.signal().unwrap_or(0)))));
            }
        }
        result.push((Value::str("stdout"), Value::Str(out)));
        result.push((Value::str("stderr"), Value::Str(err)));
        Ok(Value::Map(result))
    }
}

impl Connection for CmdConn {
    fn begin(&mut self) -> LocalBoxFuture<'_, Result<(), Error>> {
        self.1.set(false);
        Box::pin(async { Ok(()) })
    }

    /// A command that started may have acted, whatever it answered; nothing undoes it.
    fn effects_stay(&self, _method: &str, _outcome: &Result<Value, Error>) -> bool {
        self.1.get()
    }

    fn call<'a>(&'a mut self, method: &'a str, args: Vec<Value>) -> LocalBoxFuture<'a, Result<Value, Error>> {
        Box::pin(self.run(method, args))
    }
}
