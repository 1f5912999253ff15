//! A request's context (id, cage, interface, deadline) and the future that runs its coroutine
//! under that deadline.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
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
    /// The id of the durable call this request delivers (`pmnc.request.call_id`).
    pub call_id: Option<String>,
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
            call_id: None,
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
    /// Hook calls past the deadline during the current poll: the first asks for a yield, a
    /// second means the yield could not happen (a C-call boundary) and raises an error.
    pub late_hooks: Cell<u32>,
    /// Requests running in this VM now (coroutines alive).
    pub live: Cell<usize>,
    /// Set during a poll by a wait that ends on its own at that time (`pmnc.events.wait` with a
    /// timeout): the request's deadline timer wakes the request then, so a parked request holds
    /// one timer, not two.
    pub wake_at: Cell<Option<Instant>>,
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

impl RunError {
    /// The text for a log line: the traceback when there is one, on one line (" | " between its
    /// lines) so the record that carries the request id carries all of it.
    pub fn log_text(&self) -> String {
        match self {
            RunError::Failed { traceback, .. } if !traceback.is_empty() => one_line(traceback),
            other => one_line(&other.to_string()),
        }
    }
}

/// `text` with its line breaks (and the tab that indents traceback frames) as " | ".
pub fn one_line(text: &str) -> String {
    text.trim_end().replace("\r\n", "\n").replace("\n\t", " | ").replace('\n', " | ")
}

/// Drives one request coroutine: marks its context current while it runs, and ends it at the
/// deadline whatever it is doing (a Rust wait or Lua code preempted by the hook).
///
/// At the end of a time slice the coroutine yields by waking its own task, which would put it
/// straight back in the run queue: with a spinning handler the runtime would then poll sockets
/// only once per 61 task polls (tokio's event interval), about 60 ms of slices that every other
/// request of the worker waits. A wake during our own poll is therefore held back and replaced
/// by `tokio::task::yield_now`, which the scheduler wakes only after it has polled its drivers.
pub struct RequestFuture {
    /// The coroutine, taken from (and given back to) mlua's pool of recycled threads.
    pub(crate) inner: mlua::function::AsyncCallFuture<MultiValue>,
    pub(crate) ctx: Rc<RequestCtx>,
    pub(crate) shared: Rc<VmShared>,
    /// Armed at the first wait: most calls finish in their first poll and never need it.
    pub(crate) timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The waker wrapper of the last poll, reused while the task's waker stays the same.
    pub(crate) gate: Option<Arc<WakeGate>>,
    pub(crate) failure_mt: Table,
    /// Set while the coroutine waits for its next turn after a time slice.
    pub(crate) turn: Option<Pin<Box<dyn Future<Output = ()>>>>,
    /// Counts the request for the monitor (in flight, outcome, latency).
    pub(crate) recording: crate::metrics::Recording,
}

impl Drop for RequestFuture {
    fn drop(&mut self) {
        self.shared.live.set(self.shared.live.get().saturating_sub(1));
    }
}

impl Future for RequestFuture {
    type Output = Result<MultiValue, RunError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let result = self.as_mut().poll_run(cx);
        if let Poll::Ready(r) = &result {
            // Split borrows of the fields; the future is Unpin, so this moves nothing.
            let this = &mut *self;
            this.recording.finish(&this.ctx, r);
        }
        result
    }
}

impl RequestFuture {
    fn poll_run(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<MultiValue, RunError>> {
        let now = Instant::now();
        if now >= self.ctx.deadline {
            return Poll::Ready(Err(RunError::Deadline));
        }
        if let Some(turn) = self.turn.as_mut() {
            if turn.as_mut().poll(cx).is_pending() {
                return self.wait_for_deadline(cx, None);
            }
            self.turn = None;
        }
        let previous = self.shared.current.replace(Some(self.ctx.clone()));
        let previous_slice = self.shared.slice_start.replace(now);
        let previous_late = self.shared.late_hooks.replace(0);
        let previous_wake = self.shared.wake_at.replace(None);
        let gate = match &self.gate {
            Some(g) if g.waker.will_wake(cx.waker()) => {
                g.state.store(POLLING, Ordering::Release);
                g.clone()
            }
            _ => {
                let g = Arc::new(WakeGate { state: AtomicU8::new(POLLING), waker: cx.waker().clone() });
                self.gate = Some(g.clone());
                g
            }
        };
        let waker = Waker::from(gate.clone());
        let result = Pin::new(&mut self.inner).poll(&mut Context::from_waker(&waker));
        let woken = gate.state.swap(IDLE, Ordering::AcqRel) == WOKEN;
        let wake_at = self.shared.wake_at.replace(previous_wake);
        *self.shared.current.borrow_mut() = previous;
        self.shared.slice_start.set(previous_slice);
        self.shared.late_hooks.set(previous_late);
        match result {
            Poll::Pending if woken => {
                let mut turn: Pin<Box<dyn Future<Output = ()>>> = Box::pin(tokio::task::yield_now());
                // The first poll hands our waker to the scheduler's deferred list.
                if turn.as_mut().poll(cx).is_ready() {
                    cx.waker().wake_by_ref();
                } else {
                    self.turn = Some(turn);
                }
                self.wait_for_deadline(cx, wake_at)
            }
            Poll::Pending => self.wait_for_deadline(cx, wake_at),
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

const IDLE: u8 = 0;
const POLLING: u8 = 1;
const WOKEN: u8 = 2;

/// The waker [`RequestFuture`] gives the coroutine: wakes during the poll are only noted, later
/// ones (timers, sockets, other cages) go straight to the task.
pub(crate) struct WakeGate {
    state: AtomicU8,
    waker: Waker,
}

impl Wake for WakeGate {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if self.state.compare_exchange(POLLING, WOKEN, Ordering::AcqRel, Ordering::Acquire).is_err()
            && self.state.load(Ordering::Acquire) == IDLE
        {
            self.waker.wake_by_ref();
        }
    }
}

impl RequestFuture {
    /// Pending, with the deadline timer registered so the request ends on time whatever it
    /// waits for; or earlier, at `wake_at`, when what it waits for ends on its own then.
    fn wait_for_deadline(&mut self, cx: &mut Context<'_>, wake_at: Option<Instant>) -> Poll<Result<MultiValue, RunError>> {
        let deadline = self.ctx.deadline;
        let at = wake_at.filter(|w| *w < deadline).unwrap_or(deadline);
        let timer = self.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at.into())));
        if timer.deadline() != at.into() {
            timer.as_mut().reset(at.into());
        }
        if timer.as_mut().poll(cx).is_ready() {
            if at >= deadline {
                return Poll::Ready(Err(RunError::Deadline));
            }
            // The wait's own time is up: poll the coroutine again, it finds out.
            cx.waker().wake_by_ref();
        }
        Poll::Pending
    }

    /// The coroutine body is `xpcall(handler, on_error, ...)`: (true, results...) or
    /// (false, failure table).
    fn unpack(&self, values: MultiValue) -> Result<MultiValue, RunError> {
        // Module code can catch the error that stops a coroutine it created past the deadline
        // and return normally; the caller was promised an answer by then, so it is a timeout.
        if Instant::now() >= self.ctx.deadline {
            return Err(RunError::Deadline);
        }
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

#[cfg(test)]
mod tests {
    #[test]
    fn one_line_tracebacks() {
        let tb = "c/http.lua:3: boom\nstack traceback:\n\t[C]: in function 'error'\n\tc/http.lua:3: in function <c/http.lua:2>\n";
        assert_eq!(super::one_line(tb), "c/http.lua:3: boom | stack traceback: | [C]: in function 'error' | c/http.lua:3: in function <c/http.lua:2>");
        let e = super::RunError::Failed { message: "m".into(), traceback: String::new() };
        assert_eq!(e.log_text(), "m");
    }
}
