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

use crate::limits::LuaLimits;
use crate::strings::Running;

/// What every request carries; shared by the coroutine, the hook and the pmnc functions.
#[derive(Debug)]
pub struct RequestCtx {
    /// Unique in this process and, with the time prefix, practically across restarts.
    pub id: String,
    pub cage: String,
    /// Name of the interface that received the request, or "pmnc" for a call from another cage.
    pub interface: String,
    pub deadline: Instant,
    /// The cage that made this call, when it came from another cage.
    pub caller: Option<String>,
    /// Interface-specific parameters (`pmnc.request.parameters`).
    pub parameters: Option<Value>,
    /// The id of the durable call this request delivers (`pmnc.request.call_id`).
    pub call_id: Option<String>,
    /// Set when the request failed with an error table holding `retry = false`
    /// (`pmnc.calls.fail_permanently`): a durable call is then not tried again. Shared, so that
    /// whoever started the request reads it after the request has ended.
    pub no_retry: Arc<std::sync::atomic::AtomicBool>,
    /// The W3C trace context the request arrived with (an HTTP `traceparent`), which its log
    /// lines carry; boxed, as most requests have none and parked ones should stay small.
    pub trace: Option<Box<crate::trace::TraceContext>>,
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
    // By hand: `format!` costs a few hundred instructions more, on every request. The usual
    // twelve digits are written into an array and the string made of it at once.
    if n < 1 << 24 {
        let mut digits = [0u8; 12];
        hex_into(&mut digits[..6], u64::from(prefix));
        hex_into(&mut digits[6..], n);
        return std::str::from_utf8(&digits).unwrap_or_default().to_owned();
    }
    let mut id = String::with_capacity(20);
    push_hex(&mut id, u64::from(prefix), 6);
    push_hex(&mut id, n, 6);
    id
}

/// The low digits of `v` in lower-case hex, filling `out`.
fn hex_into(out: &mut [u8], mut v: u64) {
    for d in out.iter_mut().rev() {
        let x = (v & 0xf) as u8;
        *d = if x < 10 { b'0' + x } else { b'a' + x - 10 };
        v >>= 4;
    }
}

/// `v` in lower-case hex, at least `width` digits (as `{v:0width$x}` writes it).
fn push_hex(out: &mut String, v: u64, width: usize) {
    let digits = ((64 - v.leading_zeros() as usize).div_ceil(4)).max(width);
    for i in (0..digits).rev() {
        let d = ((v >> (4 * i)) & 0xf) as u8;
        out.push(char::from(if d < 10 { b'0' + d } else { b'a' + d - 10 }));
    }
}

impl RequestCtx {
    /// A new request received by `interface` of `cage` with `timeout` to live.
    pub fn new(cage: &str, interface: &str, timeout: Duration) -> RequestCtx {
        Self::with_deadline(new_request_id(), cage, interface, Instant::now() + timeout, None)
    }

    pub fn with_deadline(id: String, cage: &str, interface: &str, deadline: Instant, caller: Option<String>) -> RequestCtx {
        RequestCtx {
            id,
            cage: cage.to_string(),
            interface: interface.to_string(),
            deadline,
            caller,
            parameters: None,
            call_id: None,
            no_retry: Arc::default(),
            trace: None,
        }
    }

    /// The deadline as seconds since the Unix epoch, for `pmnc.request.deadline` (read from the
    /// clocks when asked: most requests never ask).
    pub fn deadline_unix(&self) -> f64 {
        let now_unix = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64();
        now_unix + self.remain()
    }

    /// Seconds left before the deadline, never negative.
    pub fn remain(&self) -> f64 {
        self.deadline.saturating_duration_since(Instant::now()).as_secs_f64()
    }
}

thread_local! {
    /// The request whose coroutine this thread runs now, whatever its VM: log lines written
    /// meanwhile carry its id and trace (the binary's log format reads it).
    static RUNNING: RefCell<Option<Rc<RequestCtx>>> = const { RefCell::new(None) };
}

/// `f` of the request this thread runs now (`None` outside requests): what a log line written
/// now belongs to.
pub fn with_running<R>(f: impl FnOnce(&RequestCtx) -> R) -> Option<R> {
    RUNNING.with(|r| r.borrow().as_deref().map(f))
}

/// Marks `ctx` as the request this thread runs until the returned guard is dropped.
fn enter_running(ctx: &Rc<RequestCtx>) -> RunningGuard {
    RunningGuard(RUNNING.with(|r| r.replace(Some(ctx.clone()))))
}

/// Puts back the request that ran before (a call to another cage runs inside its caller's poll).
struct RunningGuard(Option<Rc<RequestCtx>>);

impl Drop for RunningGuard {
    fn drop(&mut self) {
        let previous = self.0.take();
        RUNNING.with(|r| *r.borrow_mut() = previous);
    }
}

/// Per-VM state shared by the hook, the pmnc functions and the request futures.
pub(crate) struct VmShared {
    pub cage: String,
    pub limits: LuaLimits,
    /// The VM itself (weak: the VM owns this struct through its app data).
    pub lua: mlua::WeakLua,
    /// The request whose coroutine is running right now (set while its future is polled).
    pub current: RefCell<Option<Rc<RequestCtx>>>,
    /// When the running coroutine was last resumed, for time slicing.
    pub slice_start: Cell<Instant>,
    /// While a module's top-level code runs: when it must have finished.
    pub load_deadline: Cell<Option<Instant>>,
    /// A stop (deadline, too long without yielding, closing) was raised in the running request:
    /// `pcall` and the other catching functions pass errors on instead of returning them.
    pub stopping: Cell<bool>,
    /// A request's coroutine is being closed (it passed its deadline or its client left): any
    /// Lua code it still runs (to-be-closed handlers) is stopped at its next hook call.
    pub closing: Cell<bool>,
    /// The coroutine of the request that has just started, set by the prelude's `run` so the
    /// request's future learns it (the watchdog's signal needs it).
    pub started: Cell<*mut mlua::ffi::lua_State>,
    /// Bytes in use after the last full collection; a request that leaves far more behind
    /// triggers another.
    pub collected_at: Cell<usize>,
    /// How much the Lua code running now may make the VM grow (see [`Budget`]).
    pub budget: Cell<Budget>,
    /// The module whose top-level code runs now (what it requires is recorded, so a changed
    /// library reloads it).
    pub loading: RefCell<Option<String>>,
    /// Requests running in this VM now (coroutines alive).
    pub live: Cell<usize>,
    /// Set during a poll by a wait that ends on its own at that time (`pmnc.events.wait` with a
    /// timeout): the request's deadline timer wakes the request then, so a parked request holds
    /// one timer, not two.
    pub wake_at: Cell<Option<Instant>>,
    /// While branches of `pmnc.parallel` are polled: how many branches the request they belong
    /// to has alive, nested calls included, and how deep the call polling them is nested
    /// (api/parallel.rs keeps the caps on both).
    pub parallel_live: RefCell<Option<(Rc<Cell<usize>>, usize)>>,
}

impl std::fmt::Debug for VmShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmShared").field("cage", &self.cage).finish_non_exhaustive()
    }
}

/// How much the Lua code running now (a poll of a request, a module's top-level code) may make
/// its VM grow.
///
/// mlua's memory limit is off while the code is far from its limits: with a limit on, mlua wraps
/// every value it makes from Rust in a protected call (measured: a quarter more instructions per
/// hello-world request). The hook, which the watchdog arms once a slice has run about a
/// millisecond and which then runs every 4000 instructions, turns the limit on once the code
/// comes within [`BUDGET_MARGIN`] of either limit; from then on the allocation that crosses it
/// fails as "not enough memory".
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Budget {
    /// Bytes in use when the code started running.
    pub start: usize,
    /// Bytes it may add.
    pub allowance: usize,
    /// Whether mlua's limit is on.
    pub on: bool,
    /// Whether a budget applies at all (false between polls).
    pub active: bool,
}

/// How close to a limit the code may come before mlua's limit is turned on.
const BUDGET_MARGIN: usize = 16 << 20;

impl VmShared {
    /// Starts a budget of `allowance` bytes for the code about to run; returns the one before.
    pub(crate) fn begin_budget(&self, lua: &mlua::Lua, allowance: usize) -> Budget {
        let b = Budget { start: lua.used_memory(), allowance, on: false, active: true };
        let previous = self.budget.replace(b);
        self.check_budget(lua);
        previous
    }

    /// Turns mlua's limit on when the running code has come near a limit.
    pub(crate) fn check_budget(&self, lua: &mlua::Lua) {
        let mut b = self.budget.get();
        if !b.active || b.on {
            return;
        }
        let used = lua.used_memory();
        let margin = BUDGET_MARGIN.min(b.allowance / 4);
        let near_own = used.saturating_sub(b.start) + margin >= b.allowance;
        let near_vm = used + BUDGET_MARGIN.min(self.limits.memory / 4) >= self.limits.memory;
        if near_own || near_vm {
            b.on = true;
            self.budget.set(b);
            let _ = lua.set_memory_limit(self.budget_limit(&b));
        }
    }

    fn budget_limit(&self, b: &Budget) -> usize {
        self.limits.memory.min(b.start.saturating_add(b.allowance)).max(1)
    }

    /// Ends the running budget, puts `previous` back; returns how much the VM grew meanwhile.
    pub(crate) fn end_budget(&self, lua: &mlua::Lua, previous: Budget) -> isize {
        let b = self.budget.replace(previous);
        if b.on || previous.on {
            let _ = lua.set_memory_limit(if previous.on { self.budget_limit(&previous) } else { 0 });
        }
        lua.used_memory() as isize - b.start as isize
    }
}

/// How long a request's coroutine may run before it yields to the other tasks of its worker.
pub(crate) const SLICE: Duration = Duration::from_millis(1);

impl VmShared {
    pub fn current(&self) -> Option<Rc<RequestCtx>> {
        self.current.borrow().clone()
    }

    /// What the Lua code running now must do: go on, stop for a yield, or stop with an error.
    pub(crate) fn check_running(&self, now: Instant) -> Running {
        if self.closing.get() {
            return Running::Stop(self.stop("the request is being stopped (it passed its deadline or its client went away)".into()));
        }
        if let Some(d) = self.load_deadline.get() {
            if now >= d {
                return Running::Stop(format!(
                    "module top-level code ran longer than {} ms (define functions at load time, do the work in them)",
                    crate::vm::LOAD_TIMEOUT.as_millis()
                ));
            }
            return Running::Go;
        }
        let current = self.current.borrow();
        let Some(ctx) = current.as_ref() else {
            return Running::Go;
        };
        let slice_start = self.slice_start.get();
        let past_deadline = now >= ctx.deadline;
        if past_deadline || now.duration_since(slice_start) >= SLICE {
            return Running::SliceOver { slice_start, past_deadline };
        }
        Running::Go
    }

    /// Marks the running request as stopping and returns `message`, the error to raise.
    pub(crate) fn stop(&self, message: String) -> String {
        self.stopping.set(true);
        message
    }

    /// The request running now, for messages.
    pub(crate) fn request_id(&self) -> String {
        self.current.borrow().as_ref().map(|c| c.id.clone()).unwrap_or_default()
    }
}

impl RequestFuture {
    /// A branch of `pmnc.parallel`: `f` run by the prelude's `run` as a coroutine of its own
    /// under `ctx` (its request's, or one with the shorter deadline of the call's timeout).
    pub(crate) fn branch(shared: Rc<VmShared>, ctx: Rc<RequestCtx>, run: &mlua::Function, f: mlua::Function, failure_mt: Table) -> RequestFuture {
        let inner = run.call_async::<MultiValue>(f);
        shared.live.set(shared.live.get() + 1);
        RequestFuture {
            inner: Some(inner),
            state: std::ptr::null_mut(),
            grown: 0,
            done: false,
            ctx,
            shared,
            timer: None,
            gate: None,
            failure_mt,
            turn: None,
            recording: None,
            branch: true,
        }
    }

    /// The out-of-memory error of this request or branch.
    pub(crate) fn memory_error(&self) -> RunError {
        self.out_of_memory()
    }

    pub(crate) fn failure_mt(&self) -> &Table {
        &self.failure_mt
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
    /// The coroutine, taken from (and given back to) mlua's pool of recycled threads; taken out
    /// when the future is dropped, so that closing it happens under our rules (see Drop).
    pub(crate) inner: Option<mlua::function::AsyncCallFuture<MultiValue>>,
    /// The coroutine's Lua thread, once its first poll has told us (for the watchdog).
    pub(crate) state: *mut mlua::ffi::lua_State,
    /// Bytes the VM grew by during this request's polls (what it holds, roughly).
    pub(crate) grown: isize,
    /// The coroutine returned: nothing of it is left to close.
    pub(crate) done: bool,
    pub(crate) ctx: Rc<RequestCtx>,
    pub(crate) shared: Rc<VmShared>,
    /// Armed at the first wait: most calls finish in their first poll and never need it.
    pub(crate) timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The waker wrapper of the last poll, reused while the task's waker stays the same.
    pub(crate) gate: Option<Arc<WakeGate>>,
    pub(crate) failure_mt: Table,
    /// Set while the coroutine waits for its next turn after a time slice.
    pub(crate) turn: Option<Pin<Box<dyn Future<Output = ()>>>>,
    /// Counts the request for the monitor (in flight, outcome, latency); none for a branch of
    /// `pmnc.parallel`, which is part of its request.
    pub(crate) recording: Option<crate::metrics::Recording>,
    /// A branch of `pmnc.parallel` (api/parallel.rs): polled inside its request's poll, it shares
    /// the request's time slice and what is left of its memory share, and its result is the
    /// coroutine's raw (status, values...) so the branch's error value reaches Lua unchanged.
    pub(crate) branch: bool,
}

impl Drop for RequestFuture {
    fn drop(&mut self) {
        self.shared.live.set(self.shared.live.get().saturating_sub(1));
        if let Some(inner) = self.inner.take() {
            if self.done {
                drop(inner);
            } else {
                // Closing an unfinished coroutine runs its to-be-closed handlers (and mlua resumes
                // one that waits in a Rust call so it can unwind): whatever Lua code that runs is
                // stopped at its first hook call, so a handler that loops cannot hold the worker.
                let shared = self.shared.clone();
                let previous = shared.current.replace(Some(self.ctx.clone()));
                let previous_closing = shared.closing.replace(true);
                let previous_stopping = shared.stopping.replace(true);
                let section = crate::watchdog::enter(self.state, Instant::now());
                if !self.state.is_null() {
                    // The hook is off while code runs briefly; here it must come (the handlers'
                    // first HOOK_EVERY instructions may finish their work).
                    // SAFETY: the request's coroutine, suspended, on this thread.
                    unsafe { crate::watchdog::arm(self.state, crate::vm::HOOK_EVERY) };
                }
                drop(inner);
                drop(section);
                shared.stopping.set(previous_stopping);
                shared.closing.set(previous_closing);
                *shared.current.borrow_mut() = previous;
            }
        }
        self.collect_if_grown();
    }
}

static RELEASE_MEMORY: std::sync::OnceLock<fn()> = std::sync::OnceLock::new();

/// Sets the function that hands memory the allocator caches back to the system (the allocator
/// is the binary's choice); it runs after the full collection that follows a request which left
/// its VM much bigger.
pub fn set_release_memory(f: fn()) {
    let _ = RELEASE_MEMORY.set(f);
}

/// Growth of a VM past its size after the last full collection that triggers another one when a
/// request ends (at least this much, and at least the size it had then).
const COLLECT_AFTER_GROWTH: usize = 64 << 20;

impl RequestFuture {
    /// A request that left its VM much bigger (a memory bomb, a request stopped while holding
    /// much) is followed by a full collection, so its garbage does not stay for many requests.
    fn collect_if_grown(&self) {
        let Some(lua) = self.shared.lua.try_upgrade() else {
            return;
        };
        let used = lua.used_memory();
        let base = self.shared.collected_at.get();
        if used > base + base.max(COLLECT_AFTER_GROWTH) {
            let _ = lua.gc_collect();
            let _ = lua.gc_collect();
            self.shared.collected_at.set(lua.used_memory());
            if let Some(release) = RELEASE_MEMORY.get() {
                release();
            }
        }
    }

    /// The error of a request that ran out of memory, saying which limit it met.
    fn out_of_memory(&self) -> RunError {
        let limits = &self.shared.limits;
        let vm_full = self.shared.lua.try_upgrade().is_some_and(|l| l.used_memory() + (1 << 20) >= limits.memory);
        let which = if !vm_full {
            format!("the request holds more than its limit of {} MiB ([lua] request_memory_limit)", limits.request_memory >> 20)
        } else {
            format!("the cage's Lua VM on this worker reached its limit of {} MiB ([lua] memory_limit)", limits.memory >> 20)
        };
        RunError::Failed { message: format!("not enough memory: {which}"), traceback: String::new() }
    }
}

impl Future for RequestFuture {
    type Output = Result<MultiValue, RunError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let result = self.as_mut().poll_run(cx);
        if let Poll::Ready(r) = &result {
            // Split borrows of the fields; the future is Unpin, so this moves nothing.
            let this = &mut *self;
            if let Some(recording) = this.recording.as_mut() {
                recording.finish(&this.ctx, r);
            }
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
        // A branch runs within its request's poll and slice: N branches take one slice, not N.
        let slice_start = if self.branch { self.shared.slice_start.get() } else { now };
        let previous_slice = self.shared.slice_start.replace(slice_start);
        let previous_stopping = self.shared.stopping.replace(false);
        let previous_wake = self.shared.wake_at.replace(None);
        // This poll may make the VM grow by what is left of the request's share.
        let lua = self.shared.lua.try_upgrade();
        let mut allowance = (self.shared.limits.request_memory as isize - self.grown).max(0) as usize;
        if self.branch {
            // ...and a branch by what is left of its request's share at this moment.
            let outer = self.shared.budget.get();
            if let (true, Some(l)) = (outer.active, &lua) {
                allowance = allowance.min(outer.allowance.saturating_sub(l.used_memory().saturating_sub(outer.start)));
            }
        }
        let previous_budget = lua.as_ref().map(|l| self.shared.begin_budget(l, allowance));
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
        let section = crate::watchdog::enter(self.state, now);
        let running = enter_running(&self.ctx);
        let result = match self.inner.as_mut() {
            Some(inner) => Pin::new(inner).poll(&mut Context::from_waker(&waker)),
            None => Poll::Ready(Err(mlua::Error::runtime("the request's coroutine is gone"))),
        };
        drop(running);
        drop(section);
        if self.state.is_null() {
            self.state = self.shared.started.replace(std::ptr::null_mut());
        }
        if let (Some(lua), Some(previous)) = (&lua, previous_budget) {
            self.grown += self.shared.end_budget(lua, previous);
        }
        let woken = gate.state.swap(IDLE, Ordering::AcqRel) == WOKEN;
        let wake_at = self.shared.wake_at.replace(previous_wake);
        *self.shared.current.borrow_mut() = previous;
        self.shared.slice_start.set(previous_slice);
        self.shared.stopping.set(previous_stopping);
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
                self.done = true;
                if Instant::now() >= self.ctx.deadline {
                    Poll::Ready(Err(RunError::Deadline))
                } else if matches!(e, mlua::Error::MemoryError(_)) {
                    Poll::Ready(Err(self.out_of_memory()))
                } else {
                    Poll::Ready(Err(RunError::Internal(error_text(&LuaValue::Error(Box::new(e))))))
                }
            }
            Poll::Ready(Ok(values)) => {
                self.done = true;
                if self.branch {
                    return Poll::Ready(if Instant::now() >= self.ctx.deadline { Err(RunError::Deadline) } else { Ok(values) });
                }
                Poll::Ready(self.unpack(values))
            }
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
        if self.state.compare_exchange(POLLING, WOKEN, Ordering::AcqRel, Ordering::Acquire).is_err() && self.state.load(Ordering::Acquire) == IDLE {
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
    fn unpack(&self, mut values: MultiValue) -> Result<MultiValue, RunError> {
        // Module code can catch the error that stops a coroutine it created past the deadline
        // and return normally; the caller was promised an answer by then, so it is a timeout.
        if Instant::now() >= self.ctx.deadline {
            return Err(RunError::Deadline);
        }
        // The status taken off the front of the same list (collecting the rest into a new one
        // cost an allocation and ~400 instructions per request).
        match values.pop_front() {
            Some(LuaValue::Boolean(true)) => Ok(values),
            Some(LuaValue::Boolean(false)) => {
                if Instant::now() >= self.ctx.deadline {
                    return Err(RunError::Deadline);
                }
                let failure = values.pop_front().unwrap_or(LuaValue::Nil);
                if matches!(&failure, LuaValue::String(s) if s.as_bytes().starts_with(b"not enough memory")) {
                    return Err(self.out_of_memory());
                }
                if says_no_retry(&failure, &self.failure_mt) {
                    self.ctx.no_retry.store(true, Ordering::SeqCst);
                }
                Err(describe_failure(&failure, &self.failure_mt))
            }
            _ => Err(RunError::Internal("request coroutine returned no status".into())),
        }
    }
}

/// Whether the error raised is a table with `retry = false` (read raw: no module code runs here).
fn says_no_retry(failure: &LuaValue, failure_mt: &Table) -> bool {
    let LuaValue::Table(t) = failure else { return false };
    if t.metatable().as_ref() != Some(failure_mt) {
        return false;
    }
    match t.raw_get::<LuaValue>("error") {
        Ok(LuaValue::Table(e)) => matches!(e.raw_get::<LuaValue>("retry"), Ok(LuaValue::Boolean(false))),
        _ => false,
    }
}

fn describe_failure(failure: &LuaValue, failure_mt: &Table) -> RunError {
    if let LuaValue::Table(t) = failure {
        if t.metatable().as_ref() == Some(failure_mt) {
            let error: LuaValue = t.raw_get("error").unwrap_or(LuaValue::Nil);
            let traceback: String = t.raw_get("traceback").unwrap_or_default();
            // The prelude puts the text of a table error there (its __tostring, run in Lua).
            let message = match (t.raw_get::<LuaValue>("message"), &error) {
                (Ok(LuaValue::String(m)), _) => m.to_string_lossy(),
                // A plain table error ({message = ..., retry = false}) says what it is in its
                // `message` field.
                (_, LuaValue::Table(e)) => match e.raw_get::<LuaValue>("message") {
                    Ok(LuaValue::String(m)) => m.to_string_lossy(),
                    _ => error_text(&error),
                },
                _ => error_text(&error),
            };
            // An error value Lua could not print (the runtime's own, a table) has a traceback
            // without the message: put it first, as Lua does for strings.
            let traceback = if traceback.is_empty() || traceback.starts_with(&message) { traceback } else { format!("{message}\n{traceback}") };
            return RunError::Failed { message, traceback };
        }
    }
    RunError::Failed { message: error_text(failure), traceback: String::new() }
}

/// Text of a Lua error value: strings as they are, mlua errors by their message without mlua's
/// own traceback. No `__tostring` of module code runs here (this is Rust, where Lua code could
/// not be time-sliced): the prelude takes the text of table errors beforehand.
pub fn error_text(error: &LuaValue) -> String {
    match error {
        LuaValue::String(s) => s.to_string_lossy(),
        LuaValue::Error(e) => root_cause(e),
        LuaValue::Integer(i) => i.to_string(),
        LuaValue::Number(n) => n.to_string(),
        LuaValue::Boolean(b) => b.to_string(),
        LuaValue::Nil => "nil".into(),
        other => format!("(error object is a {} value)", other.type_name()),
    }
}

fn root_cause(e: &mlua::Error) -> String {
    match e {
        mlua::Error::CallbackError { cause, .. } => root_cause(cause),
        mlua::Error::RuntimeError(m) => m.clone(),
        mlua::Error::SyntaxError { message, .. } => message.clone(),
        mlua::Error::WithContext { context, cause } => format!("{context}: {}", root_cause(cause)),
        mlua::Error::MemoryError(_) => "not enough memory".into(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn request_ids_are_hex_as_format_writes_them() {
        for v in [0u64, 1, 0xf, 0x10, 0xabcdef, 0x1000000, 0x123456789, u64::MAX] {
            let mut s = String::new();
            super::push_hex(&mut s, v, 6);
            assert_eq!(s, format!("{v:06x}"));
        }
        for v in [0u64, 1, 0xf, 0x10, 0xabcdef, 0xffffff] {
            let mut digits = [0u8; 6];
            super::hex_into(&mut digits, v);
            assert_eq!(std::str::from_utf8(&digits).unwrap(), format!("{v:06x}"));
        }
        let id = super::new_request_id();
        assert!(id.len() >= 12 && id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
        // The counter's digits follow the prefix's, one more per id.
        let next = super::new_request_id();
        let counter = |id: &str| u64::from_str_radix(&id[6..], 16).unwrap();
        assert!(counter(&next) > counter(&id) && id[..6] == next[..6], "{id} {next}");
    }

    #[test]
    fn the_deadline_in_unix_time_is_where_the_deadline_is() {
        let ctx = super::RequestCtx::new("c", "i", std::time::Duration::from_secs(30));
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
        let at = ctx.deadline_unix();
        assert!((at - now - 30.0).abs() < 1.0, "{at} vs {now}");
    }

    #[test]
    fn one_line_tracebacks() {
        let tb = "c/http.lua:3: boom\nstack traceback:\n\t[C]: in function 'error'\n\tc/http.lua:3: in function <c/http.lua:2>\n";
        assert_eq!(super::one_line(tb), "c/http.lua:3: boom | stack traceback: | [C]: in function 'error' | c/http.lua:3: in function <c/http.lua:2>");
        let e = super::RunError::Failed { message: "m".into(), traceback: String::new() };
        assert_eq!(e.log_text(), "m");
    }
}
