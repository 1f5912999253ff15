//! The cages of this worker thread and the transport that carries `pmnc("<cage>")` calls.
//!
//! Every worker thread has its own VM of every cage, so a call between cages of one process stays
//! on the caller's thread: the value is copied from one VM to the other, never shared. Calls to
//! cages that do not run in this process go to the remote [`Transport`] once one is installed
//! (NATS, in the cluster engine).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Instant;

use futures_util::future::LocalBoxFuture;
use rustomnic_core::Value;

use crate::request::{RequestCtx, RunError};
use crate::vm::CageVm;

/// One call from a cage to a function of another cage.
#[derive(Debug, Clone)]
pub struct CallRequest {
    pub from_cage: String,
    pub request_id: String,
    pub deadline: Instant,
    pub cage: String,
    pub module: String,
    pub function: String,
    pub args: Vec<Value>,
}

impl CallRequest {
    /// "worker.work.handle", for messages.
    pub fn target(&self) -> String {
        format!("{}.{}.{}", self.cage, self.module, self.function)
    }
}

/// Why a call to another cage failed; the text is what the caller's Lua error says.
#[derive(Debug, Clone, PartialEq)]
pub enum CallError {
    NoCage(String),
    Deadline(String),
    Failed(String),
    /// The call can never succeed as it was made (no such queue, arguments too large): trying
    /// it again is pointless. The outbox of durable calls gives such a call up at once.
    Refused(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::NoCage(m) | CallError::Deadline(m) | CallError::Failed(m) | CallError::Refused(m) => write!(f, "{m}"),
        }
    }
}

/// Carries calls to cages that are not in this process.
pub trait Transport {
    fn call(&self, request: CallRequest) -> LocalBoxFuture<'static, Result<Vec<Value>, CallError>>;
    /// The largest call it carries, in bytes, when it has a limit.
    fn max_payload(&self) -> Option<usize> {
        None
    }
}

thread_local! {
    static CAGES: RefCell<BTreeMap<String, Rc<CageVm>>> = const { RefCell::new(BTreeMap::new()) };
    static REMOTE: RefCell<Option<Rc<dyn Transport>>> = const { RefCell::new(None) };
}

/// Registers the VM of a cage on this worker thread.
pub fn install(vm: Rc<CageVm>) {
    CAGES.with(|c| c.borrow_mut().insert(vm.cage().to_string(), vm));
}

/// The VM of `cage` on this worker thread.
pub fn cage(name: &str) -> Option<Rc<CageVm>> {
    CAGES.with(|c| c.borrow().get(name).cloned())
}

/// Every cage VM of this worker thread.
pub fn cages() -> Vec<Rc<CageVm>> {
    CAGES.with(|c| c.borrow().values().cloned().collect())
}

/// Drops the VMs of this thread (at shutdown).
pub fn clear() {
    CAGES.with(|c| c.borrow_mut().clear());
    REMOTE.with(|r| r.borrow_mut().take());
    crate::transaction::clear();
}

/// Whether a transport for cages not in this process is installed on this thread.
pub fn has_remote() -> bool {
    REMOTE.with(|r| r.borrow().is_some())
}

/// Installs the transport for cages not in this process.
pub fn set_remote(transport: Rc<dyn Transport>) {
    REMOTE.with(|r| *r.borrow_mut() = Some(transport));
}

/// The largest call the remote transport of this thread carries, when it has a limit.
pub fn remote_max_payload() -> Option<usize> {
    REMOTE.with(|r| r.borrow().as_ref().and_then(|t| t.max_payload()))
}

/// Sends a call through the remote transport only (the outbox of durable calls forwarding to a
/// cage of another process).
pub async fn call_remote(request: CallRequest) -> Result<Vec<Value>, CallError> {
    match REMOTE.with(|r| r.borrow().clone()) {
        Some(remote) => remote.call(request).await,
        None => {
            Err(CallError::NoCage(format!("calling {}: no cage named {} runs in this process and no cluster is configured", request.target(), request.cage)))
        }
    }
}

/// Calls a function of a cage: in this process when the cage runs here, else through the remote
/// transport.
pub async fn call(request: CallRequest) -> Result<Vec<Value>, CallError> {
    let target = request.target();
    // The queue's own entry point: only an outbox forwards to it (crates/queue), never module
    // code, which could otherwise store calls in another cage's name.
    if request.module == crate::durable::ACCEPT_MODULE {
        return Err(CallError::Refused(format!("calling {target}: module {} is reserved", crate::durable::ACCEPT_MODULE)));
    }
    let Some(vm) = cage(&request.cage) else {
        if let Some(remote) = REMOTE.with(|r| r.borrow().clone()) {
            return remote.call(request).await;
        }
        let here: Vec<String> = CAGES.with(|c| c.borrow().keys().cloned().collect());
        return Err(CallError::NoCage(format!(
            "calling {target}: no cage named {} runs in this process (cages here: {}) and no cluster is configured",
            request.cage,
            here.join(", ")
        )));
    };
    let mut ctx = RequestCtx::with_deadline(request.request_id, &request.cage, "pmnc", request.deadline, Some(request.from_cage));
    // The callee runs as a span of the caller's trace (its log lines carry it too).
    ctx.trace = crate::request::with_running(|c| c.trace.as_deref().map(|t| Box::new(t.child()))).flatten();
    let span = crate::trace::recorded(&ctx).map(|t| (t, ctx.id.clone()));
    let result = match vm.call(ctx, &request.module, &request.function, request.args).await {
        Ok(values) => Ok(values),
        Err(RunError::Deadline) => Err(CallError::Deadline(format!("calling {target}: deadline exceeded"))),
        Err(RunError::NotFound(m)) => Err(CallError::Failed(format!("calling {target}: {m}"))),
        Err(RunError::Failed { message, .. }) => Err(CallError::Failed(format!("calling {target}: {message}"))),
        Err(RunError::Internal(m)) => Err(CallError::Failed(format!("calling {target}: internal error: {m}"))),
    };
    if let Some((t, id)) = span {
        call_span(
            &t,
            &request.cage,
            "pmnc",
            &id,
            &request.module,
            &request.function,
            crate::trace::SpanKind::Internal,
            result.as_ref().err().map(|e| e.to_string()),
        );
    }
    result
}

/// Runs `module.function` of `vm` as a request an interface started (a message, a firing, a
/// datagram): when the cage traces, as a span of `kind` in a new trace (or the one `ctx`
/// arrived with), recorded when it ends.
pub async fn run_traced(
    vm: &crate::CageVm,
    ctx: RequestCtx,
    module: &str,
    function: &str,
    args: Vec<Value>,
    kind: crate::trace::SpanKind,
) -> Result<Vec<Value>, RunError> {
    run_traced_with(vm, ctx, module, function, |lua| crate::convert::to_lua_all(lua, &args), kind).await
}

/// Like [`run_traced`], with the arguments `build` makes in the VM ([`CageVm::call_with`]).
pub async fn run_traced_with(
    vm: &crate::CageVm,
    mut ctx: RequestCtx,
    module: &str,
    function: &str,
    build: impl FnOnce(&mlua::Lua) -> mlua::Result<mlua::MultiValue>,
    kind: crate::trace::SpanKind,
) -> Result<Vec<Value>, RunError> {
    ctx.trace = crate::trace::for_request(&ctx.cage, ctx.trace.take());
    let names = crate::trace::recorded(&ctx).map(|t| (t, ctx.cage.clone(), ctx.interface.clone(), ctx.id.clone()));
    let outcome = vm.call_with(ctx, module, function, build).await;
    if let Some((t, cage, interface, id)) = names {
        let failed = outcome.as_ref().err().map(|e| e.to_string());
        call_span(&t, &cage, &interface, &id, module, function, kind, failed);
    }
    outcome
}

/// Records the span of a call to `cage.module.function` that ended now (an error when `failed`).
#[allow(clippy::too_many_arguments)]
pub fn call_span(
    t: &crate::trace::TraceContext,
    cage: &str,
    interface: &str,
    request_id: &str,
    module: &str,
    function: &str,
    kind: crate::trace::SpanKind,
    failed: Option<String>,
) {
    use crate::trace::{AttrValue, SpanStatus};
    let name = format!("{module}.{function}");
    let attributes = vec![("pmnc.function", AttrValue::Str(name.clone()))];
    let status = match failed {
        Some(message) => SpanStatus::Error(message),
        None => SpanStatus::Unset,
    };
    crate::trace::record_span(t, cage, interface, request_id, name, kind, attributes, status);
}
