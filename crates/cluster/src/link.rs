//! A worker thread's link to the cluster: it carries this thread's calls to cages of other
//! processes (the `Transport` of `pmnc("<cage>")`) and serves calls to this process's cages.
//!
//! Every worker thread has its own NATS connection and joins the queue group of every cage it
//! runs, so NATS spreads calls straight over the workers of every process: a call never hops
//! between threads on either side.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::LocalBoxFuture;
use futures_util::StreamExt;
use rustomnic_core::Value;
use rustomnic_lua::{worker, CallError, CallRequest, RequestCtx, RunError, Transport};
use tokio::sync::watch;

use crate::connect::Connection;
use crate::wire::{Call, Failure, Reply};
use crate::{call_subject, queue_group, Identity};

thread_local! {
    /// Calls from other processes this thread is running now.
    static SERVING: Rc<Cell<usize>> = Rc::new(Cell::new(0));
    static IDLE: Rc<tokio::sync::Notify> = Rc::new(tokio::sync::Notify::new());
}

/// The transport of one worker thread.
pub struct Link {
    inner: Rc<Inner>,
}

struct Inner {
    conn: Connection,
    identity: Arc<Identity>,
    /// Call subjects by cage, made once: a call then allocates no subject.
    subjects: std::cell::RefCell<std::collections::HashMap<String, async_nats::Subject>>,
}

impl Link {
    pub fn new(conn: Connection, identity: Arc<Identity>) -> Link {
        Link { inner: Rc::new(Inner { conn, identity, subjects: Default::default() }) }
    }
}

impl Transport for Link {
    fn call(&self, request: CallRequest) -> LocalBoxFuture<'static, Result<Vec<Value>, CallError>> {
        let inner = self.inner.clone();
        Box::pin(async move { remote_call(&inner, request).await })
    }

    fn max_payload(&self) -> Option<usize> {
        Some(self.inner.conn.client.max_payload()).filter(|m| *m > 0)
    }
}

fn subject_of(inner: &Inner, cage: &str) -> async_nats::Subject {
    let mut subjects = inner.subjects.borrow_mut();
    if let Some(s) = subjects.get(cage) {
        return s.clone();
    }
    let subject = async_nats::Subject::from(call_subject(&inner.identity.flock, cage));
    // Cage names come from module code; keep the cache bounded.
    if subjects.len() < 1024 {
        subjects.insert(cage.to_string(), subject.clone());
    }
    subject
}

async fn remote_call(inner: &Inner, request: CallRequest) -> Result<Vec<Value>, CallError> {
    let conn = &inner.conn;
    let flock = &inner.identity.flock;
    // Only errors need the name of the target; it is not built for calls that succeed.
    let target = |cage: &str, module: &str, function: &str| format!("{cage}.{module}.{function}");
    if !conn.is_up() {
        return Err(CallError::Failed(format!(
            "calling {}: cage {} is not in this process and the cluster is unreachable (no connection to NATS at {}); calls to other processes fail until it is back",
            request.target(),
            request.cage,
            conn.servers
        )));
    }
    let remain = request.deadline.saturating_duration_since(Instant::now());
    if remain.is_zero() {
        return Err(CallError::Deadline(format!("calling {}: deadline exceeded", request.target())));
    }
    let subject = subject_of(inner, &request.cage);
    let call = Call {
        from_cage: request.from_cage,
        request_id: request.request_id,
        timeout_us: u64::try_from(remain.as_micros()).unwrap_or(u64::MAX),
        cage: request.cage,
        module: request.module,
        function: request.function,
        args: request.args,
    };
    let target = || target(&call.cage, &call.module, &call.function);
    let payload = call.encode().map_err(|e| CallError::Failed(format!("calling {}: {e}", target())))?;
    let max = conn.client.max_payload();
    if max > 0 && payload.len() > max {
        // The same call would be too large every time: a durable call gives up at once.
        return Err(CallError::Refused(format!(
            "calling {}: the call's arguments take {} bytes, over the NATS server's max_payload of {max} bytes; pass large data another way (a file, a database) or raise max_payload on the server",
            target(),
            payload.len()
        )));
    }
    let losses = conn.losses();
    let mut outgoing = async_nats::Request::new().payload(payload.into()).timeout(None);
    // W3C trace context in a NATS header: the callee's span is a child of the caller's.
    if let Some(traceparent) = rustomnic_lua::request::with_running(|c| c.trace.as_deref().map(|t| t.traceparent())).flatten() {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("traceparent", traceparent.as_str());
        outgoing = outgoing.headers(headers);
    }
    let sent = conn.client.send_request(subject, outgoing);
    let deadline = tokio::time::Instant::from_std(request.deadline);
    let message = tokio::select! {
        reply = tokio::time::timeout_at(deadline, sent) => match reply {
            Err(_) => return Err(CallError::Deadline(format!("calling {}: deadline exceeded (no reply from cage {} in time)", target(), call.cage))),
            Ok(Err(e)) => return Err(request_error(&target(), &call.cage, flock, e)),
            Ok(Ok(message)) => message,
        },
        _ = conn.lost_since(losses) => return Err(CallError::Failed(format!(
            "calling {}: lost the connection to NATS while waiting for the reply; the call may or may not have run", target()
        ))),
    };
    match Reply::decode(&message.payload) {
        Ok(Reply::Ok(values)) => Ok(values),
        Ok(Reply::Err { failure, message, instance }) => {
            let text = format!("calling {} (instance {instance}): {message}", target());
            Err(match failure {
                Failure::Deadline => CallError::Deadline(text),
                Failure::Refused => CallError::Refused(text),
                _ => CallError::Failed(text),
            })
        }
        Err(e) => Err(CallError::Failed(format!("calling {}: unreadable reply: {e}", target()))),
    }
}

fn request_error(target: &str, cage: &str, flock: &str, e: async_nats::RequestError) -> CallError {
    use async_nats::RequestErrorKind as K;
    match e.kind() {
        K::NoResponders => {
            CallError::NoCage(format!("calling {target}: no cage named {cage} runs in this process or anywhere in flock {flock} (NATS: no responders)"))
        }
        K::MaxPayloadExceeded => CallError::Failed(format!("calling {target}: the call is over the NATS server's max_payload: {e}")),
        K::TimedOut => CallError::Deadline(format!("calling {target}: deadline exceeded")),
        _ => CallError::Failed(format!("calling {target}: cluster request failed: {e}")),
    }
}

/// Joins the queue group of each cage and serves calls from other processes on this thread
/// until `shutdown`; then leaves the groups so that new calls go to other copies.
pub fn serve(conn: Connection, identity: Arc<Identity>, cages: Vec<String>, max_calls: usize, shutdown: watch::Receiver<bool>) {
    let server = Rc::new(Server { conn, identity, max_calls });
    for cage in cages {
        let (server, mut shutdown) = (server.clone(), shutdown.clone());
        let busy = Busy::enter();
        tokio::task::spawn_local(async move {
            let _busy = busy;
            let subject = call_subject(&server.identity.flock, &cage);
            let mut sub = match server.conn.client.queue_subscribe(subject.clone(), queue_group(&server.identity.flock, &cage)).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(cage = %cage, "cluster: cannot subscribe to {subject}: {e}; this copy gets no calls from other processes");
                    return;
                }
            };
            loop {
                let message = tokio::select! {
                    m = sub.next() => m,
                    _ = shutdown.wait_for(|s| *s) => None,
                };
                let Some(message) = message else { break };
                tokio::task::spawn_local(answer(server.clone(), message));
            }
            // Leave the queue group and answer every call NATS had already routed here (drain:
            // UNSUB, then a ping round trip so nothing is still on its way), so that a copy that
            // stops does not strand calls.
            let _ = sub.drain().await;
            while let Ok(Some(message)) = tokio::time::timeout(Duration::from_secs(2), sub.next()).await {
                tokio::task::spawn_local(answer(server.clone(), message));
            }
        });
    }
}

/// Keeps this worker from finishing its shutdown while a call or a subscription is still being
/// handled; released however that ends (the task may be dropped).
struct Busy;

impl Busy {
    fn enter() -> Busy {
        SERVING.with(|s| s.set(s.get() + 1));
        Busy
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        SERVING.with(|s| {
            s.set(s.get().saturating_sub(1));
            if s.get() == 0 {
                IDLE.with(|i| i.notify_waiters());
            }
        });
    }
}

/// A call being answered: busy, and counted in the process's load.
struct Serving(Arc<Identity>, #[allow(dead_code)] Busy);

impl Serving {
    fn enter(identity: &Arc<Identity>) -> Serving {
        identity.stats.in_flight.fetch_add(1, Ordering::Relaxed);
        Serving(identity.clone(), Busy::enter())
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        self.0.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What the serving side of a worker needs, shared by every call it answers.
struct Server {
    conn: Connection,
    identity: Arc<Identity>,
    max_calls: usize,
}

async fn answer(server: Rc<Server>, message: async_nats::Message) {
    let (conn, identity, max_calls) = (&server.conn, &server.identity, server.max_calls);
    let Some(reply_to) = message.reply.clone() else {
        tracing::debug!("cluster: ignoring a call without a reply subject on {}", message.subject);
        return;
    };
    let busy = identity.stats.in_flight.load(Ordering::Relaxed) >= max_calls;
    let _serving = Serving::enter(identity);
    identity.stats.served.fetch_add(1, Ordering::Relaxed);
    let reply = if busy {
        Reply::Err {
            failure: Failure::Busy,
            message: format!("busy: {max_calls} calls from other processes in flight (max_calls)"),
            instance: identity.instance.clone(),
        }
    } else {
        run(identity, &message.payload, message.headers.as_ref()).await
    };
    if let Reply::Err { .. } = reply {
        identity.stats.failed.fetch_add(1, Ordering::Relaxed);
    }
    let mut bytes = reply.encode().unwrap_or_else(|e| encode_err(identity, Failure::Failed, format!("cannot encode the result: {e}")));
    let max = conn.client.max_payload();
    if max > 0 && bytes.len() > max {
        bytes = encode_err(identity, Failure::Failed, format!("the result takes {} bytes, over the NATS server's max_payload of {max} bytes", bytes.len()));
    }
    if let Err(e) = conn.client.publish(reply_to, bytes.into()).await {
        tracing::warn!("cluster: cannot send a reply: {e}");
    }
}

fn encode_err(identity: &Identity, failure: Failure, message: String) -> Vec<u8> {
    Reply::Err { failure, message, instance: identity.instance.clone() }.encode().unwrap_or_default()
}

async fn run(identity: &Identity, payload: &[u8], headers: Option<&async_nats::HeaderMap>) -> Reply {
    let err = |failure, message: String| Reply::Err { failure, message, instance: identity.instance.clone() };
    let call = match Call::decode(payload) {
        Ok(c) => c,
        Err(e) => return err(Failure::BadCall, format!("unreadable call: {e}")),
    };
    let Some(vm) = worker::cage(&call.cage) else {
        return err(Failure::NotFound, format!("cage {} does not run in this process", call.cage));
    };
    // A durable call forwarded from another cage's outbox: stored by the queue itself, not run
    // as Lua (and not counted as a request of the cage).
    if call.module == rustomnic_lua::durable::ACCEPT_MODULE {
        if call.function != rustomnic_lua::durable::ACCEPT_FUNCTION {
            return err(Failure::NotFound, format!("module {} has no function {}", call.module, call.function));
        }
        return match rustomnic_lua::durable::accept(&call.from_cage, &call.cage, call.args).await {
            Ok(values) => Reply::Ok(values),
            Err(CallError::Refused(m)) => err(Failure::Refused, m),
            Err(e) => err(Failure::Failed, e.to_string()),
        };
    }
    let deadline = Instant::now() + Duration::from_micros(call.timeout_us.min(3_600_000_000));
    let (id, from) = (call.request_id.clone(), call.from_cage.clone());
    let mut ctx = RequestCtx::with_deadline(call.request_id, &call.cage, "cluster", deadline, Some(call.from_cage));
    ctx.trace =
        headers.and_then(|h| h.get("traceparent")).and_then(|v| rustomnic_lua::trace::TraceContext::from_traceparent(v.as_str().as_bytes())).map(Box::new);
    let span = rustomnic_lua::trace::recorded(&ctx);
    let reply = serve_call(&vm, ctx, &call.cage, &call.module, &call.function, call.args, &id, &from, &err).await;
    if let Some(t) = span {
        let failed = match &reply {
            Reply::Err { message, .. } => Some(message.clone()),
            Reply::Ok(_) => None,
        };
        rustomnic_lua::worker::call_span(&t, &call.cage, "cluster", &id, &call.module, &call.function, rustomnic_lua::trace::SpanKind::Server, failed);
    }
    reply
}

/// Runs a call from another process on this worker's VM of its cage.
#[allow(clippy::too_many_arguments)]
async fn serve_call(
    vm: &rustomnic_lua::CageVm,
    ctx: RequestCtx,
    cage: &str,
    module: &str,
    function: &str,
    args: Vec<Value>,
    id: &str,
    from: &str,
    err: &dyn Fn(Failure, String) -> Reply,
) -> Reply {
    match vm.call(ctx, module, function, args).await {
        Ok(values) => Reply::Ok(values),
        Err(RunError::Deadline) => {
            tracing::warn!(cage = %cage, request = %id, "{module}.{function} called by cage {from}: deadline exceeded");
            err(Failure::Deadline, "deadline exceeded".into())
        }
        Err(RunError::NotFound(m)) => err(Failure::NotFound, m),
        Err(RunError::Failed { message, .. }) => err(Failure::Failed, message),
        Err(RunError::Internal(m)) => err(Failure::Failed, format!("internal error: {m}")),
    }
}

/// Waits until this thread serves no call from another process and has left every queue
/// group, at most `limit`.
pub async fn drain(limit: Duration) {
    let started = Instant::now();
    loop {
        let busy = SERVING.with(|s| s.get());
        if busy == 0 || started.elapsed() >= limit {
            if busy > 0 {
                tracing::warn!("cluster: {busy} call(s) from other processes still running after {limit:?}");
            }
            return;
        }
        let idle = IDLE.with(|i| i.clone());
        let wait = idle.notified();
        if SERVING.with(|s| s.get()) == 0 {
            return;
        }
        let _ = tokio::time::timeout(limit.saturating_sub(started.elapsed()), wait).await;
    }
}
