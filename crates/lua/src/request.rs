//! A request's context (id, cage, interface, deadline) and the future that runs its coroutine
//! under that deadline.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mlua::{MultiValue, Table, Value as LuaValue};
use rustomnic_core::Value;

/// What every request carries; shared by the coroutine, the hook and the pmnc functions.
#[derive(Debug)]
pub struct RequestCtx {
    /// Unique in this process and, with the time prefix, practically across restarts.
    pub id: String,
    pub cage: String,
    /// Name of the interface that received the request, or "pmnc" for a call from another cage.
    pub interface: String,
    pub deadline: Instant,
    /// The same deadline as seconds since the Unix epoch, for `pmnc.request.deadline`.
    pub deadline_unix: f64,
    /// The cage that made this call, when it came from another cage.
    pub caller: Option<String>,
    /// Interface-specific parameters (`pmnc.request.parameters`).
    pub parameters: Option<Value>,
    /// Pointer of the coroutine that runs this request, for the hook's "is this the request
    /// itself, not a coroutine it created" check.
    pub(crate) thread: Cell<*const std::ffi::c_void>,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// A new request id: 6 hex digits of process start time, then a counter.
pub fn new_request_id() -> String {
    static PREFIX: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    let prefix = *PREFIX.get_or_init(|| {
        let t = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        ((t.as_secs() as u32) ^ (t.subsec_nanos() << 8) ^ std::process::id()) & 0xff_ffff
    });
    let n = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    format!("{prefix:06x}{n:06x}")
}

impl RequestCtx {
    /// A new request received by `interface` of `cage` with `timeout` to live.
    pub fn new(cage: &str, interface: &str, timeout: Duration) -> RequestCtx {
        Self::with_deadline(new_request_id(), cage, interface, Instant::now() + timeout, None)
    }

    pub fn with_deadline(id: String, cage: &str, interface: &str, deadline: Instant, caller: Option<String>) -> RequestCtx {
        let remain = deadline.saturating_duration_since(Instant::now());
        let now_unix = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64();
        RequestCtx {
            id,
            cage: cage.to_string(),
            interface: interface.to_string(),
            deadline,
            deadline_unix: now_unix + remain.as_secs_f64(),
            caller,
            parameters: None,
            thread: Cell::new(std::ptr::null()),
        }
    }

    /// Seconds left before the deadline, never negative.
    pub fn remain(&self) -> f64 {
        self.deadline.saturating_duration_since(Instant::now()).as_secs_f64()
    }
}

/// Per-VM state shared by the hook, the pmnc functions and the request futures.
#[derive(Debug)]
pub(crate) struct VmShared {
    pub cage: String,
    /// The request whose coroutine is running right now (set while its future is polled).
    pub current: RefCell<Option<Rc<RequestCtx>>>,
    /// When the running coroutine was last resumed, for time slicing.
    pub slice_start: Cell<Instant>,
    /// While a module's top-level code runs: when it must have finished.
    pub load_deadline: Cell<Option<Instant>>,
    /// Requests running in this VM now (coroutines alive).
    pub live: Cell<usize>,
}

impl VmShared {
    pub fn current(&self) -> Option<Rc<RequestCtx>> {
        self.current.borrow().clone()
    }
}

/// How a request's coroutine ended, when it did not return normally.
#[derive(Debug, Clone, PartialEq)]
pub enum RunError {
    /// The deadline passed; the coroutine was stopped.
    Deadline,
    /// The handler (or a function it called) raised an error.
    Failed { message: String, traceback: String },
    /// The handler could not be found or started.
    NotFound(String),
    /// The runtime itself failed (out of memory, a bug).
    Internal(String),
}

impl std::fmt::Display for RunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunError::Deadline => write!(f, "deadline exceeded"),
            RunError::Failed { message, .. } => write!(f, "{message}"),
            RunError::NotFound(m) => write!(f, "{m}"),
            RunError::Internal(m) => write!(f, "internal error: {m}"),
        }
    }
}

impl std::error::Error for RunError {}

/// Drives one request coroutine: marks its context current while it runs, and ends it at the
/// deadline whatever it is doing (a Rust wait or Lua code preempted by the hook).
pub struct RequestFuture {
    pub(crate) inner: mlua::thread::AsyncThread<MultiValue>,
    pub(crate) ctx: Rc<RequestCtx>,
    pub(crate) shared: Rc<VmShared>,
    pub(crate) timer: Pin<Box<tokio::time::Sleep>>,
    pub(crate) failure_mt: Table,
}

impl Drop for RequestFuture {
    fn drop(&mut self) {
        self.shared.live.set(self.shared.live.get().saturating_sub(1));
    }
}

impl Future for RequestFuture {
    type Output = Result<MultiValue, RunError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let now = Instant::now();
        if now >= self.ctx.deadline {
            return Poll::Ready(Err(RunError::Deadline));
        }
        let previous = self.shared.current.replace(Some(self.ctx.clone()));
        let previous_slice = self.shared.slice_start.replace(now);
        let result = Pin::new(&mut self.inner).poll(cx);
        *self.shared.current.borrow_mut() = previous;
        self.shared.slice_start.set(previous_slice);
        match result {
            Poll::Pending => {
                if self.timer.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Err(RunError::Deadline));
                }
                Poll::Pending
            }
            Poll::Ready(Err(e)) => {
                if Instant::now() >= self.ctx.deadline {
                    Poll::Ready(Err(RunError::Deadline))
                } else {
                    Poll::Ready(Err(RunError::Internal(e.to_string())))
                }
            }
            Poll::Ready(Ok(values)) => Poll::Ready(self.unpack(values)),
        }
    }
}

impl RequestFuture {
    /// The coroutine body is `xpcall(handler, on_error, ...)`: (true, results...) or
    /// (false, failure table).
    fn unpack(&self, values: MultiValue) -> Result<MultiValue, RunError> {
        let mut values = values.into_iter();
        match values.next() {
            Some(LuaValue::Boolean(true)) => Ok(values.collect()),
            Some(LuaValue::Boolean(false)) => {
                if Instant::now() >= self.ctx.deadline {
                    return Err(RunError::Deadline);
                }
                let failure = values.next().unwrap_or(LuaValue::Nil);
                Err(describe_failure(&failure, &self.failure_mt))
            }
            _ => Err(RunError::Internal("request coroutine returned no status".into())),
        }
    }
}

fn describe_failure(failure: &LuaValue, failure_mt: &Table) -> RunError {
    if let LuaValue::Table(t) = failure {
        if t.metatable().as_ref() == Some(failure_mt) {
            let error: LuaValue = t.raw_get("error").unwrap_or(LuaValue::Nil);
            let traceback: String = t.raw_get("traceback").unwrap_or_default();
            return RunError::Failed { message: error_text(&error), traceback };
        }
    }
    RunError::Failed { message: error_text(failure), traceback: String::new() }
}

/// Text of a Lua error value: strings as they are, tables through `__tostring`, mlua errors by
/// their message without mlua's own traceback.
pub fn error_text(error: &LuaValue) -> String {
    match error {
        LuaValue::String(s) => s.to_string_lossy(),
        LuaValue::Error(e) => root_cause(e),
        other => other.to_string().unwrap_or_else(|_| format!("({} error value)", other.type_name())),
    }
}

fn root_cause(e: &mlua::Error) -> String {
    match e {
        mlua::Error::CallbackError { cause, .. } => root_cause(cause),
        mlua::Error::RuntimeError(m) => m.clone(),
        mlua::Error::SyntaxError { message, .. } => message.clone(),
        mlua::Error::WithContext { context, cause } => format!("{context}: {}", root_cause(cause)),
        other => other.to_string(),
    }
}
