//! The interface plugin boundary: what an inbound protocol implements ([`InterfaceProtocol`],
//! [`Interface`]) and what the runtime gives it ([`Host`]). An interface depends on this crate
//! and its own protocol library only, never on the runtime (docs/writing-an-interface.md).
//!
//! Two shapes:
//! - an interface that **listens** says where ([`Interface::listen`]); the runtime binds the
//!   address before anything starts (a taken port refuses the start), accepts connections and
//!   spreads them over the worker threads, calling [`Interface::serve`] on the worker;
//! - an interface that **consumes** (a schedule, a broker subscription, a folder watch) owns its
//!   loop: the runtime calls [`Interface::start`] once the workers are ready, and the interface
//!   hands each message to a worker through its [`Host`], learning the handler's outcome.
//!
//! Stages: `configure` (on the main thread, also run by `pmnc check`; problems are recorded in
//! the section with file, line and key) → bind / start → serve or run requests → the interface's
//! [`Shutdown`] fires (the process stops, or a changed `[interfaces.X]` replaces this interface):
//! stop taking work, let requests in flight finish.

pub mod consumer;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::LocalBoxFuture;
use rustomnic_core::{Located, Section, Value};
use rustomnic_lua::{worker, RequestCtx, RunError};
use tokio::net::TcpStream;

/// Fires once when the interface must stop: the process shuts down, or the interface is
/// replaced by a changed config.
pub type Shutdown = tokio::sync::watch::Receiver<bool>;

/// Work to run on a worker thread (it may hold `Rc`s there).
pub type Job = Box<dyn FnOnce() -> LocalBoxFuture<'static, ()> + Send>;
/// Hands a job to some worker thread, in turn.
pub type Spawner = Arc<dyn Fn(Job) + Send + Sync>;
/// Hands a job to worker thread `i` (counted from 0); false when that worker has stopped.
pub type Placer = Arc<dyn Fn(usize, Job) -> bool + Send + Sync>;

/// Decides a claim that only one process of the whole flock may win (a schedule's firing when
/// copies of a cage run on several hosts): true when this process won. Blocking; call it from the
/// interface's own thread, never from a worker.
pub type FlockClaim = Arc<dyn Fn(&str) -> Result<bool, String> + Send + Sync>;

/// What every interface has, whatever its protocol: read by the runtime from `[interfaces.X]`.
#[derive(Debug, Clone)]
pub struct InterfaceSpec {
    pub cage: String,
    pub name: String,
    pub protocol: String,
    /// Handler module and function, located at the `handler` key (or the interface's table).
    pub handler: Located<(String, String)>,
    pub request_timeout: Duration,
    /// The cage's state file (`[resources.state] path`, or `.data/state.sqlite`), for what an
    /// interface keeps (a schedule's claims).
    pub state_file: PathBuf,
    /// The interface's table as written, to tell whether a changed cage.toml changed it.
    pub fingerprint: String,
}

/// One protocol of inbound requests: reads an interface's keys and makes the interface.
pub trait InterfaceProtocol: Send + Sync {
    /// The protocol name used in `protocol = "..."`.
    fn name(&self) -> &'static str;

    /// Reads this protocol's keys from `section` (the interface's table). Problems are recorded in
    /// the section; `None` when the interface cannot be built.
    fn configure(&self, spec: InterfaceSpec, section: &Section) -> Option<Arc<dyn Interface>>;
}

/// A configured interface of a cage.
pub trait Interface: Send + Sync {
    fn spec(&self) -> &InterfaceSpec;

    /// The module functions this interface runs, each located where the config names it: the
    /// runtime checks that they exist before it starts (and before a changed config is taken).
    /// The `handler` key by default; an interface that runs several (celery's tasks) says so.
    fn handlers(&self) -> Vec<Located<(String, String)>> {
        vec![self.spec().handler.clone()]
    }

    /// Where to accept TCP connections, for interfaces that listen.
    fn listen(&self) -> Option<Located<SocketAddr>> {
        None
    }

    /// Serves one accepted connection on the current worker thread, until it closes or
    /// `shutdown` fires and what is in flight has finished.
    fn serve(self: Arc<Self>, stream: TcpStream, remote: SocketAddr, shutdown: Shutdown) -> LocalBoxFuture<'static, ()> {
        let _ = (stream, remote, shutdown);
        Box::pin(async {})
    }

    /// Starts an interface that consumes (owns its loop): called once the workers are ready.
    fn start(self: Arc<Self>, host: Host) {
        let _ = host;
    }

    /// Checks a new version of module `module` (its table, as its top-level code returned it)
    /// before any worker sees it, for what this interface will read from it (the http
    /// interface's route table): an error makes that version broken, reported with its file,
    /// and the working version stays. Called on the checking thread, also by `pmnc check`.
    fn check_module(&self, module: &str, table: &rustomnic_lua::mlua::Table) -> Result<(), String> {
        let _ = (module, table);
        Ok(())
    }
}

/// Reads the `listen` key every listening interface has: `"127.0.0.1:8080"`. A missing or
/// malformed value is recorded in the section (file, line, key).
pub fn read_listen(section: &Section) -> Option<Located<SocketAddr>> {
    match section.string("listen") {
        Some(l) => match l.value.parse::<SocketAddr>() {
            Ok(addr) => Some(Located { value: addr, file: l.file, line: l.line, key: l.key }),
            Err(_) => {
                section.error("listen", format!("{:?} is not an address such as \"127.0.0.1:8080\"", l.value));
                None
            }
        },
        // Present but unreadable (wrong type, unset ${ENV}): that problem is already recorded.
        None if section.has("listen") => None,
        None => {
            section.table_error("listen is required, e.g. listen = \"127.0.0.1:8080\"");
            None
        }
    }
}

/// One request an interface asks a worker to run.
#[derive(Debug, Clone)]
pub struct Request {
    /// Module and function of the handler.
    pub handler: (String, String),
    pub args: Vec<Value>,
    /// When the request must have ended (`Instant::now() + spec.request_timeout` usually).
    pub deadline: Instant,
    /// What `pmnc.request.parameters` gives the handler.
    pub parameters: Option<Value>,
}

/// Runs `request` with the cage's VM of this worker thread.
async fn run_on_worker(spec: Arc<InterfaceSpec>, request: Request) -> Result<Vec<Value>, RunError> {
    run_on_worker_with(spec, request, |_| Ok(rustomnic_lua::mlua::MultiValue::new())).await
}

/// Runs `request` with the cage's VM of this worker thread, its arguments followed by what
/// `build` makes.
async fn run_on_worker_with(
    spec: Arc<InterfaceSpec>,
    request: Request,
    build: impl FnOnce(&rustomnic_lua::mlua::Lua) -> rustomnic_lua::mlua::Result<rustomnic_lua::mlua::MultiValue>,
) -> Result<Vec<Value>, RunError> {
    let (module, function) = request.handler;
    let Some(vm) = worker::cage(&spec.cage) else {
        return Err(RunError::NotFound(format!("cage {} does not run on this worker", spec.cage)));
    };
    let mut ctx = RequestCtx::with_deadline(rustomnic_lua::new_request_id(), &spec.cage, &spec.name, request.deadline, None);
    ctx.parameters = request.parameters;
    let args = request.args;
    let all = |lua: &rustomnic_lua::mlua::Lua| {
        let mut values = rustomnic_lua::convert::to_lua_all(lua, &args)?;
        values.extend(build(lua)?);
        Ok(values)
    };
    // A cage with [tracing] records a span per message or datagram (docs/tracing.md).
    worker::run_traced_with(&vm, ctx, &module, &function, all, rustomnic_lua::trace::SpanKind::Consumer).await
}

fn worker_stopped() -> RunError {
    RunError::Internal("the worker stopped before the request ended".into())
}

/// The way back of a [`Host::run_then`] request: its token with the outcome, or, dropped
/// unsent (the job was dropped with its worker), with an error, so the consumer never waits
/// for a request that will not end.
struct Back<T> {
    token: Option<T>,
    done: tokio::sync::mpsc::UnboundedSender<(T, Result<Vec<Value>, RunError>)>,
}

impl<T> Back<T> {
    fn send(&mut self, outcome: Result<Vec<Value>, RunError>) {
        if let Some(token) = self.token.take() {
            let _ = self.done.send((token, outcome));
        }
    }
}

impl<T> Drop for Back<T> {
    fn drop(&mut self) {
        self.send(Err(worker_stopped()));
    }
}

/// What the runtime gives an interface that consumes: workers to run requests on, the
/// interface's shutdown, and claims across the flock.
///
/// An interface that consumes has stopped when it has dropped its `Host` and every clone of it:
/// at shutdown the runtime keeps the workers running until then (at most its drain limit), so
/// that requests in flight end and their messages are acknowledged.
#[derive(Clone)]
pub struct Host {
    spec: Arc<InterfaceSpec>,
    spawner: Spawner,
    /// How many workers there are and how to reach each one, when the runtime gave them.
    placer: Option<(usize, Placer)>,
    shutdown: Shutdown,
    claim: Option<FlockClaim>,
    alive: Arc<()>,
}

impl Host {
    /// Made by the runtime.
    pub fn new(spec: InterfaceSpec, spawner: Spawner, shutdown: Shutdown, claim: Option<FlockClaim>) -> Host {
        Host { spec: Arc::new(spec), spawner, placer: None, shutdown, claim, alive: Arc::new(()) }
    }

    /// Made by the runtime: this host can also place a job on each of its `workers` workers
    /// ([`Host::spawn_on_each`]).
    pub fn with_workers(mut self, workers: usize, placer: Placer) -> Host {
        self.placer = Some((workers, placer));
        self
    }

    /// For the runtime: fails to upgrade once this host and all its clones are gone.
    pub fn liveness(&self) -> std::sync::Weak<()> {
        Arc::downgrade(&self.alive)
    }

    /// Runs `job` on a worker thread.
    pub fn spawn(&self, job: Job) {
        (self.spawner)(job)
    }

    /// How many jobs [`Host::spawn_on_each`] places: the runtime's workers, or 1 for a test host.
    pub fn workers(&self) -> usize {
        self.placer.as_ref().map(|(n, _)| *n).unwrap_or(1)
    }

    /// Runs the job `make(i)` makes on each worker `i`, for a consumer that takes its messages on
    /// the workers themselves (a message is then handled where it arrived, with no hand-over
    /// between threads; see [`Host::run_here`]). Without the runtime's workers (a test host),
    /// one job goes to the spawner. Returns how many jobs were placed.
    pub fn spawn_on_each(&self, make: impl Fn(usize) -> Job) -> usize {
        match &self.placer {
            Some((workers, place)) => (0..*workers).filter(|&i| place(i, make(i))).count(),
            None => {
                (self.spawner)(make(0));
                1
            }
        }
    }

    /// Runs `request` on this thread, which must be a worker's (a job of
    /// [`Host::spawn_on_each`]), and gives its outcome as [`Host::run`] does.
    pub fn run_here(&self, request: Request) -> impl Future<Output = Result<Vec<Value>, RunError>> + 'static {
        run_on_worker(self.spec.clone(), request)
    }

    /// Like [`Host::run_here`], with the handler's arguments made in the VM by `build` after
    /// `request.args` (usually none): a consumer makes its message's table straight from the
    /// message, without the value model in between.
    pub fn run_here_with<'a>(
        &self,
        request: Request,
        build: impl FnOnce(&rustomnic_lua::mlua::Lua) -> rustomnic_lua::mlua::Result<rustomnic_lua::mlua::MultiValue> + 'a,
    ) -> impl Future<Output = Result<Vec<Value>, RunError>> + 'a {
        run_on_worker_with(self.spec.clone(), request, build)
    }

    /// Runs `request` on a worker thread and gives its outcome: the handler's results, or its
    /// error (a failed handler's transactions have rolled back by then, a returned handler's
    /// have committed), so a consumer can acknowledge a message only after success. The request
    /// counts in the monitor's figures of this interface.
    pub fn run(&self, request: Request) -> impl Future<Output = Result<Vec<Value>, RunError>> + Send + 'static {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.dispatch(request, move |outcome| {
            let _ = tx.send(outcome);
        });
        async move { rx.await.unwrap_or_else(|_| Err(worker_stopped())) }
    }

    /// Runs `request` as [`Host::run`] does, and sends its outcome with `token` to `done`. A
    /// consumer with many requests in flight takes their outcomes from one channel: it is woken
    /// once for all the outcomes that arrived meanwhile, where a future per request woke it
    /// (a system call on the worker's side) for each. A request whose worker stops before it
    /// ends still sends its token, with an error.
    pub fn run_then<T: Send + 'static>(&self, request: Request, token: T, done: tokio::sync::mpsc::UnboundedSender<(T, Result<Vec<Value>, RunError>)>) {
        let mut back = Back { token: Some(token), done };
        self.dispatch(request, move |outcome| back.send(outcome));
    }

    /// Hands `request` to a worker, which gives its outcome to `finish`.
    fn dispatch(&self, request: Request, finish: impl FnOnce(Result<Vec<Value>, RunError>) + Send + 'static) {
        let spec = self.spec.clone();
        (self.spawner)(Box::new(move || {
            Box::pin(async move {
                finish(run_on_worker(spec, request).await);
            })
        }));
    }

    /// Fires when the interface must stop.
    pub fn shutdown(&self) -> Shutdown {
        self.shutdown.clone()
    }

    /// Claims `key` in the flock: `None` when the process is not in a cluster (every claim is
    /// then this process's to decide), else whether this process won. Blocking.
    pub fn claim_in_flock(&self, key: &str) -> Option<Result<bool, String>> {
        self.claim.as_ref().map(|c| c(key))
    }

    pub fn spec(&self) -> &InterfaceSpec {
        &self.spec
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use std::sync::Mutex;

    fn host(spawner: Spawner) -> Host {
        let spec = InterfaceSpec {
            cage: "c".into(),
            name: "in".into(),
            protocol: "test".into(),
            handler: rustomnic_core::config::Located { value: ("m".into(), "f".into()), file: "cage.toml".into(), line: 1, key: "handler".into() },
            request_timeout: Duration::from_secs(1),
            state_file: "state.sqlite".into(),
            fingerprint: String::new(),
        };
        let (_tx, shutdown) = tokio::sync::watch::channel(false);
        Host::new(spec, spawner, shutdown, None)
    }

    fn request() -> Request {
        Request { handler: ("m".into(), "f".into()), args: Vec::new(), deadline: std::time::Instant::now() + Duration::from_secs(1), parameters: None }
    }

    /// A consumer on a worker runs its handler there: the request's arguments first, then
    /// what `build` made in the VM; without the cage on the thread, a clear error.
    #[test]
    fn run_here_with_gives_the_arguments_then_what_build_makes() {
        use rustomnic_lua::mlua::{MultiValue, Value as LuaValue};
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let local = tokio::task::LocalSet::new();
        let host = host(Arc::new(drop::<Job>));
        local.block_on(&rt, async {
            let none = host.run_here_with(request(), |_| Ok(MultiValue::new())).await;
            assert!(matches!(none, Err(RunError::NotFound(ref m)) if m.contains("cage c does not run on this worker")), "{none:?}");

            let vm = rustomnic_lua::CageVm::new("c").unwrap();
            let source = "return { f = function(...) return table.concat({...}, '+'), select('#', ...) end }";
            let bytecode = rustomnic_lua::compile("m", std::path::Path::new("m.lua"), "m.lua", source.as_bytes()).unwrap();
            let module = rustomnic_lua::CompiledModule {
                name: "m".into(),
                path: "m.lua".into(),
                display: "m.lua".into(),
                bytecode,
                functions: vec![],
                version: 1,
                source_hash: 0,
            };
            vm.install(&module).unwrap();
            worker::install(std::rc::Rc::new(vm));
            let mut r = request();
            r.args = vec![Value::str("a"), Value::Int(2)];
            let built = |lua: &rustomnic_lua::mlua::Lua| Ok(MultiValue::from_iter([LuaValue::String(lua.create_string("made")?)]));
            let out = host.run_here_with(r, built).await.unwrap();
            assert_eq!(out, vec![Value::str("a+2+made"), Value::Int(3)]);
            let out = host.run_here(request()).await.unwrap();
            assert_eq!(out, vec![Value::str(""), Value::Int(0)]);
            worker::clear();
        });
    }

    #[test]
    fn run_then_gives_every_token_back_once_even_when_the_job_is_dropped() {
        // Jobs kept to be run later, and one spawner that drops its job (a worker that stopped).
        let kept: Arc<Mutex<Vec<Job>>> = Arc::default();
        let k = kept.clone();
        let running = host(Arc::new(move |job| k.lock().unwrap().push(job)));
        let stopped = host(Arc::new(drop::<Job>));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        stopped.run_then(request(), 1, tx.clone());
        running.run_then(request(), 2, tx.clone());
        running.run_then(request(), 3, tx);

        let (token, outcome) = rx.try_recv().unwrap();
        assert_eq!(token, 1);
        assert!(matches!(outcome, Err(RunError::Internal(ref m)) if m.contains("worker stopped")), "{outcome:?}");
        assert!(rx.try_recv().is_err(), "the kept jobs have not run");

        // Run here: no cage runs on this thread, so each ends with that error, once.
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        for job in kept.lock().unwrap().drain(..) {
            rt.block_on(job());
        }
        let mut back = Vec::new();
        while let Ok((token, outcome)) = rx.try_recv() {
            assert!(matches!(outcome, Err(RunError::NotFound(ref m)) if m.contains("cage c")), "{outcome:?}");
            back.push(token);
        }
        assert_eq!(back, [2, 3]);
    }
}
