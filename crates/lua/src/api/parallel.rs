//! `pmnc.parallel` (Rust side): several functions of one request run at once. Each branch is a
//! coroutine of its own driven by a branch [`RequestFuture`] (so it is time-sliced, keeps the
//! request's context and stops at its deadline like any request code), and one future, which the
//! request's coroutine waits in, polls the branches that were woken, within the request's time
//! slice. Dropping that future (the request ended) closes every branch (docs/decisions/138).

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use futures_util::task::AtomicWaker;
use mlua::{Function, Lua, MultiValue, Table, Value as LuaValue};

use super::{failure, shared_of, success};
use crate::request::{error_text, RequestCtx, RequestFuture, RunError, VmShared, SLICE};

/// Branches a request may have alive at once, nested `pmnc.parallel` calls included.
pub(crate) const MAX_BRANCHES: usize = 100;
/// How deep calls may nest (a branch calling `pmnc.parallel`, whose branch calls it, ...): each
/// level is a resume inside a resume on the worker's stack.
pub(crate) const MAX_DEPTH: usize = 10;

/// How a branch ended.
enum Outcome {
    /// Its function returned these values.
    Returned(Vec<LuaValue>),
    /// It raised `error` (the value as raised), with its text and traceback.
    Failed { error: LuaValue, message: String, traceback: String },
    /// The call's timeout passed before it ended.
    TimedOut,
}

/// The waker a branch polls with: it marks the branch for the next poll and wakes the request.
struct BranchWake {
    woken: AtomicBool,
    request: Arc<AtomicWaker>,
}

impl Wake for BranchWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.request.wake();
    }
}

struct Branch {
    future: Option<RequestFuture>,
    wake: Arc<BranchWake>,
    waker: Waker,
}

/// The branches of one `pmnc.parallel` call, polled together; see the module docs.
struct Parallel {
    lua: Lua,
    shared: Rc<VmShared>,
    branches: Vec<Branch>,
    outcomes: Vec<Option<Outcome>>,
    /// Ends at the first branch that returns (`pmnc.parallel.any`).
    any: bool,
    /// The branch polled first at the next poll (round robin, so a branch that spins takes its
    /// turn after the others, never before all of them).
    next: usize,
    request: Arc<AtomicWaker>,
    /// Branches alive in the whole request (nested calls included), and how many are ours.
    live: Rc<Cell<usize>>,
    alive: usize,
    /// 1 for a call of the request's own code, 2 for a call in one of its branches, ...
    depth: usize,
    /// The call's own timeout, for the message of a branch it stopped.
    timeout: Option<f64>,
    request_deadline: Instant,
}

impl Drop for Parallel {
    fn drop(&mut self) {
        self.live.set(self.live.get().saturating_sub(self.alive));
        self.alive = 0;
        // Each unfinished branch's coroutine is closed by its future's Drop, under the rules
        // of a stopped request (to-be-closed handlers run, then stop at their next hook call).
        self.branches.clear();
    }
}

impl Future for Parallel {
    type Output = mlua::Result<MultiValue>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        this.request.register(cx.waker());
        // Branches run inside the request's poll and share its slice (their futures keep this
        // slice start); the request's own coroutine and what its first poll reported to the
        // watchdog are put back afterwards.
        let slice_start = this.shared.slice_start.get();
        let started = this.shared.started.get();
        let previous_live = this.shared.parallel_live.replace(Some((this.live.clone(), this.depth)));
        let n = this.branches.len();
        let mut polled = 0;
        let mut out_of_time = false;
        let mut winner = None;
        let first = this.next;
        for k in 0..n {
            let i = (first + k) % n;
            let branch = &mut this.branches[i];
            let Some(future) = branch.future.as_mut() else { continue };
            if !branch.wake.woken.swap(false, Ordering::AcqRel) {
                continue;
            }
            if polled > 0 && Instant::now().duration_since(slice_start) >= SLICE {
                // The slice is over: the rest wait for the request's next turn.
                branch.wake.woken.store(true, Ordering::Release);
                this.next = i;
                out_of_time = true;
                break;
            }
            polled += 1;
            this.next = (i + 1) % n;
            let result = Pin::new(&mut *future).poll(&mut Context::from_waker(&branch.waker));
            let Poll::Ready(result) = result else { continue };
            let outcome = outcome_of(future, result, this.request_deadline);
            branch.future = None;
            this.alive -= 1;
            this.live.set(this.live.get().saturating_sub(1));
            let returned = matches!(outcome, Outcome::Returned(_));
            this.outcomes[i] = Some(outcome);
            if this.any && returned {
                winner = Some(i);
                break;
            }
        }
        this.shared.started.set(started);
        *this.shared.parallel_live.borrow_mut() = previous_live;
        if let Some(i) = winner {
            // The first to return wins; the others are closed now, their waits dropped.
            this.live.set(this.live.get().saturating_sub(this.alive));
            this.alive = 0;
            this.branches.clear();
            return Poll::Ready(this.answer(Some(i)));
        }
        if this.alive == 0 {
            this.branches.clear();
            return Poll::Ready(this.answer(None));
        }
        if out_of_time {
            // A turn for the worker's other tasks; the request's future makes it one.
            cx.waker().wake_by_ref();
        }
        Poll::Pending
    }
}

fn outcome_of(future: &RequestFuture, result: Result<MultiValue, RunError>, request_deadline: Instant) -> Outcome {
    match result {
        Ok(values) => {
            let mut values = values.into_iter();
            match values.next() {
                Some(LuaValue::Boolean(true)) => Outcome::Returned(values.collect()),
                Some(LuaValue::Boolean(false)) => failed(future, values.next().unwrap_or(LuaValue::Nil)),
                _ => Outcome::Failed { error: LuaValue::Nil, message: "the branch's coroutine returned no status".into(), traceback: String::new() },
            }
        }
        Err(RunError::Deadline) if Instant::now() < request_deadline => Outcome::TimedOut,
        Err(e) => {
            let message = e.to_string();
            Outcome::Failed { error: LuaValue::Nil, message, traceback: String::new() }
        }
    }
}

/// The prelude's failure table (error, traceback, message) as an outcome.
fn failed(future: &RequestFuture, failure: LuaValue) -> Outcome {
    if matches!(&failure, LuaValue::String(s) if s.as_bytes().starts_with(b"not enough memory")) {
        return Outcome::Failed { error: failure, message: future.memory_error().to_string(), traceback: String::new() };
    }
    if let LuaValue::Table(t) = &failure {
        if t.metatable().as_ref() == Some(future.failure_mt()) {
            let error: LuaValue = t.raw_get("error").unwrap_or(LuaValue::Nil);
            let traceback: String = t.raw_get("traceback").unwrap_or_default();
            let message = match t.raw_get::<LuaValue>("message") {
                Ok(LuaValue::String(m)) => m.to_string_lossy(),
                _ => error_text(&error),
            };
            return Outcome::Failed { error, message, traceback };
        }
    }
    let message = error_text(&failure);
    Outcome::Failed { error: failure, message, traceback: String::new() }
}

impl Parallel {
    /// (true, entries, failed, winner): one entry per branch that ended, in the order of the
    /// branches, the number that failed, and the index of the winner of `any`.
    fn answer(&mut self, winner: Option<usize>) -> mlua::Result<MultiValue> {
        let lua = &self.lua;
        let entries = lua.create_table()?;
        let mut failed = 0;
        for (i, outcome) in self.outcomes.iter_mut().enumerate() {
            let Some(outcome) = outcome.take() else { continue };
            let entry = lua.create_table()?;
            match outcome {
                Outcome::Returned(values) => {
                    entry.raw_set("ok", true)?;
                    entry.raw_set("n", values.len())?;
                    if let Some(first) = values.first() {
                        entry.raw_set("value", first.clone())?;
                    }
                    for (k, v) in values.into_iter().enumerate() {
                        entry.raw_set(k + 1, v)?;
                    }
                }
                Outcome::Failed { error, message, traceback } => {
                    failed += 1;
                    entry.raw_set("ok", false)?;
                    let error = if error.is_nil() { LuaValue::String(lua.create_string(&message)?) } else { error };
                    entry.raw_set("error", error)?;
                    entry.raw_set("message", message)?;
                    if !traceback.is_empty() {
                        entry.raw_set("traceback", traceback)?;
                    }
                }
                Outcome::TimedOut => {
                    failed += 1;
                    let message =
                        format!("pmnc.parallel: branch {} did not end within the timeout of {} s and was stopped", i + 1, self.timeout.unwrap_or_default());
                    entry.raw_set("ok", false)?;
                    entry.raw_set("error", message.as_str())?;
                    entry.raw_set("message", message)?;
                    entry.raw_set("timeout", true)?;
                }
            }
            entries.raw_set(i + 1, entry)?;
        }
        let winner = winner.map_or(LuaValue::Nil, |i| LuaValue::Integer(i as i64 + 1));
        Ok(success([LuaValue::Table(entries), LuaValue::Integer(failed), winner]))
    }
}

/// The same request with a shorter deadline: what the branches of a call with a timeout see.
fn with_deadline(ctx: &RequestCtx, deadline: Instant) -> RequestCtx {
    let mut c = RequestCtx::with_deadline(ctx.id.clone(), &ctx.cage, &ctx.interface, deadline, ctx.caller.clone());
    c.parameters = ctx.parameters.clone();
    c.call_id = ctx.call_id.clone();
    c.trace = ctx.trace.clone();
    c
}

pub(crate) fn register(lua: &Lua, t: &Table) -> mlua::Result<()> {
    // parallel(run, failure_mt, functions, any, timeout): the prelude has checked the arguments
    // and passes its own `run` (the body of request coroutines) and failure metatable.
    t.set(
        "parallel",
        lua.create_async_function(|lua, (run, failure_mt, list, any, timeout): (Function, Table, Table, bool, Option<f64>)| async move {
            let Some(shared) = shared_of(&lua) else {
                return failure(&lua, "pmnc.parallel may only be called while handling a request");
            };
            let Some(ctx) = shared.current() else {
                return failure(&lua, "pmnc.parallel may only be called while handling a request");
            };
            let n = list.raw_len();
            let (live, depth) = match shared.parallel_live.borrow().clone() {
                Some((live, outer)) => (live, outer + 1),
                None => (Rc::default(), 1),
            };
            if depth > MAX_DEPTH {
                return failure(&lua, format!("pmnc.parallel: calls nested {depth} deep, over the limit of {MAX_DEPTH}"));
            }
            if live.get() + n > MAX_BRANCHES {
                let already = live.get();
                let nested = if already > 0 { format!(" ({already} already alive in this request)") } else { String::new() };
                return failure(&lua, format!("pmnc.parallel: {n} branches{nested} are over the limit of {MAX_BRANCHES} branches alive in one request"));
            }
            let now = Instant::now();
            let timeout = timeout.filter(|t| t.is_finite() && *t >= 0.0);
            let branch_ctx = match timeout.map(|t| now + Duration::from_secs_f64(t.min(1e9))) {
                Some(d) if d < ctx.deadline => Rc::new(with_deadline(&ctx, d)),
                _ => ctx.clone(),
            };
            let request = Arc::new(AtomicWaker::new());
            let mut branches = Vec::with_capacity(n);
            for i in 1..=n {
                let f: Function = match list.raw_get::<LuaValue>(i)? {
                    LuaValue::Function(f) => f,
                    other => return failure(&lua, format!("pmnc.parallel: branch {i} must be a function, got {}", other.type_name())),
                };
                let wake = Arc::new(BranchWake { woken: AtomicBool::new(true), request: request.clone() });
                let waker = Waker::from(wake.clone());
                branches.push((f, wake, waker));
            }
            if n == 0 {
                return Ok(success([LuaValue::Table(lua.create_table()?), LuaValue::Integer(0), LuaValue::Nil]));
            }
            live.set(live.get() + n);
            let branches = branches
                .into_iter()
                .map(|(f, wake, waker)| Branch {
                    future: Some(RequestFuture::branch(shared.clone(), branch_ctx.clone(), &run, f, failure_mt.clone())),
                    wake,
                    waker,
                })
                .collect();
            let parallel = Parallel {
                lua: lua.clone(),
                shared: shared.clone(),
                branches,
                outcomes: (0..n).map(|_| None).collect(),
                any,
                next: 0,
                request,
                live,
                alive: n,
                depth,
                timeout,
                request_deadline: ctx.deadline,
            };
            parallel.await
        })?,
    )?;
    Ok(())
}
