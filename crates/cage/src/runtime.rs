//! Running cages: checking everything before anything listens, worker threads with one VM per
//! cage each, acceptors handing connections to workers, module updates, graceful shutdown.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustomnic_core::Located;
use rustomnic_lua::{worker, CageVm, Module};
use tokio::sync::{mpsc, watch};

use crate::app::find_cages;
use crate::config::{load_cage, CageConfig};
use crate::interface::Protocols;
use crate::live::{InterfaceChange, LiveInterfaces};
use crate::modules::load_all;
use crate::Error;
use rustomnic_interface::{FlockClaim, Interface};

/// A cage ready to run: config read, every module loaded and checked.
pub struct PreparedCage {
    pub config: CageConfig,
    pub modules: BTreeMap<String, Module>,
}

/// Reads and checks every cage at `path`: config, modules (with tests when asked), handlers,
/// listen addresses. Every problem found is returned, not only the first.
pub fn prepare(path: &std::path::Path, protocols: &Protocols, tests: bool) -> Result<Vec<PreparedCage>, Error> {
    let dirs = find_cages(path)?;
    let mut problems: Vec<String> = Vec::new();
    let mut cages = Vec::new();
    for dir in &dirs {
        let config = match load_cage(dir, protocols) {
            Ok(c) => c,
            Err(errors) => {
                problems.extend(errors.iter().map(|e| e.to_string()));
                // The modules are compiled all the same, under the folder's name and the default
                // limits, so that one run of `pmnc check` lists every problem, not the config's
                // first and the modules' after it is fixed.
                if let Err(p) = load_all(dir, &dir.folder_name, &rustomnic_lua::LuaLimits::default(), tests, &[]) {
                    problems.extend(p);
                }
                continue;
            }
        };
        match load_all(dir, &config.name, &config.lua, tests, &config.interfaces) {
            Ok(modules) => cages.push(PreparedCage { config, modules }),
            Err(p) => problems.extend(p),
        }
    }
    let mut names: BTreeMap<&str, &std::path::Path> = BTreeMap::new();
    let mut listening: Vec<(Located<SocketAddr>, String)> = Vec::new();
    for cage in &cages {
        if let Some(first) = names.insert(&cage.config.name, &cage.config.dir.dir) {
            problems.push(format!("{}: cage name {:?} is also the name of {}", cage.config.dir.config_file().display(), cage.config.name, first.display()));
        }
        for iface in &cage.config.interfaces {
            let spec = iface.spec();
            for handler in iface.handlers() {
                let (module, function) = &handler.value;
                match cage.modules.get(module) {
                    None => problems.push(
                        handler
                            .error(format!("handler module {module} not found ({0}/{module}.lua or .shared/{module}.lua)", cage.config.dir.folder_name))
                            .to_string(),
                    ),
                    Some(m) if !m.functions.iter().any(|f| f == function) => problems.push(
                        handler
                            .error(format!(
                                "module {module} ({}) has no function {function} (it has: {})",
                                m.display,
                                if m.functions.is_empty() { "none".to_string() } else { m.functions.join(", ") }
                            ))
                            .to_string(),
                    ),
                    Some(_) => {}
                }
            }
            if let Some(addr) = iface.listen() {
                let who = format!("interface {} of cage {}", spec.name, spec.cage);
                if let Some((other, other_who)) = listening.iter().find(|(o, _)| same_port(&o.value, &addr.value)) {
                    problems.push(addr.error(format!("{} is already used by {other_who} ({}:{})", addr.value, other.file.display(), other.line)).to_string());
                } else {
                    listening.push((addr, who));
                }
            }
        }
    }
    problems.extend(crate::monitor::check_targets(&cages));
    if problems.is_empty() {
        Ok(cages)
    } else {
        Err(Error::Invalid(problems))
    }
}

fn same_port(a: &SocketAddr, b: &SocketAddr) -> bool {
    a.port() != 0 && a.port() == b.port() && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// What `pmnc check` reports when all is well.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckSummary {
    pub cages: usize,
    pub modules: usize,
    pub interfaces: usize,
}

/// Validates config and compiles every module (tests included) without running anything.
pub fn check(path: &std::path::Path, protocols: &Protocols) -> Result<CheckSummary, Error> {
    let cages = prepare(path, protocols, true)?;
    Ok(CheckSummary {
        cages: cages.len(),
        modules: cages.iter().map(|c| c.modules.len()).sum(),
        interfaces: cages.iter().map(|c| c.config.interfaces.len()).sum(),
    })
}

#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Worker threads (each with its own VM of every cage).
    pub workers: usize,
    /// Reload changed modules.
    pub watch: bool,
    /// `--cluster`: NATS servers to join, overriding `[cluster] url`.
    pub cluster: Vec<String>,
    /// `--flock`: overrides `[cluster] flock`.
    pub flock: Option<String>,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions { workers: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2), watch: true, cluster: Vec::new(), flock: None }
    }
}

/// The cluster settings of the process: the cages' `[cluster]` tables (which must agree) with
/// `--cluster` and `--flock` on top. None when the process runs alone.
pub fn cluster_config(cages: &[PreparedCage], options: &RunOptions) -> Result<Option<rustomnic_cluster::ClusterConfig>, Error> {
    let mut found: Option<&Located<rustomnic_cluster::ClusterConfig>> = None;
    let mut problems = Vec::new();
    for cage in cages {
        let Some(c) = &cage.config.cluster else { continue };
        match found {
            None => found = Some(c),
            Some(first) if first.value != c.value => problems.push(
                c.error(format!(
                    "differs from [cluster] in {}:{}; the cages of one process join one cluster, so their [cluster] tables must be the same",
                    first.file.display(),
                    first.line
                ))
                .to_string(),
            ),
            Some(_) => {}
        }
    }
    if !problems.is_empty() {
        return Err(Error::Invalid(problems));
    }
    let mut config = match (found, options.cluster.is_empty()) {
        (None, true) => return Ok(None),
        (None, false) => rustomnic_cluster::ClusterConfig::from_urls(options.cluster.clone()),
        (Some(c), _) => c.value.clone(),
    };
    if !options.cluster.is_empty() {
        for url in &options.cluster {
            rustomnic_cluster::config::check_url(url).map_err(|e| Error::Invalid(vec![format!("--cluster: {e}")]))?;
        }
        config.urls = options.cluster.clone();
    }
    if let Some(flock) = &options.flock {
        if !rustomnic_cluster::config::is_flock_name(flock) {
            return Err(Error::Invalid(vec![format!("--flock: {flock:?} is not a valid flock name (letters, digits, _ and -, at most 64)")]));
        }
        config.flock = flock.clone();
    }
    Ok(Some(config))
}

/// The address others use for this process's monitor page: the host name when it listens on
/// every address.
fn monitor_url(addr: SocketAddr, host: &str, https: bool) -> String {
    let scheme = if https { "https" } else { "http" };
    if addr.ip().is_unspecified() {
        format!("{scheme}://{host}:{}/", addr.port())
    } else {
        format!("{scheme}://{addr}/")
    }
}

/// The roster as the monitor's cluster view: one row per cage of each instance.
fn cluster_view(roster: &[serde_json::Value]) -> Vec<rustomnic_monitor::cluster::Instance> {
    let mut rows = Vec::new();
    for i in roster {
        let s = |k: &str| i.get(k).and_then(|v| v.as_str()).unwrap_or_default().to_string();
        let cages = i.get("cages").and_then(|c| c.as_array()).cloned().unwrap_or_default();
        for cage in cages {
            rows.push(rustomnic_monitor::cluster::Instance {
                cage: cage.get("name").and_then(|n| n.as_str()).unwrap_or_default().to_string(),
                instance: s("instance"),
                host: s("host"),
                pid: i.get("pid").and_then(|p| p.as_u64()).unwrap_or(0) as u32,
                version: s("version"),
                uptime_seconds: i.get("uptime_s").and_then(|u| u.as_f64()).unwrap_or(0.0),
                up: s("state") == "up",
                load: i.pointer("/load/requests_in_flight").and_then(|l| l.as_f64()).unwrap_or(0.0),
                monitor_url: i.get("monitor").and_then(|m| m.as_str()).map(str::to_string),
            });
        }
    }
    rows
}

/// What this process's heartbeat says about its cages, interfaces and monitor page.
fn describe(cages: &[PreparedCage], monitor: Option<String>) -> rustomnic_cluster::Describe {
    let cages: Vec<serde_json::Value> = cages
        .iter()
        .map(|c| {
            let interfaces: Vec<serde_json::Value> = c
                .config
                .interfaces
                .iter()
                .map(|i| {
                    let spec = i.spec();
                    serde_json::json!({
                        "name": spec.name,
                        "protocol": spec.protocol,
                        "listen": i.listen().map(|a| a.value.to_string()),
                    })
                })
                .collect();
            // The queues let other processes refuse a durable call to a queue this cage does
            // not have at once, and give their calls this queue's expiry (issue 22 #4, #5).
            let queues: Vec<serde_json::Value> =
                c.config.queues.iter().map(|q| serde_json::json!({ "name": q.name, "expires_in_ms": q.expires_in.as_millis() as u64 })).collect();
            serde_json::json!({ "name": c.config.name, "interfaces": interfaces, "queues": queues })
        })
        .collect();
    let described = serde_json::json!({ "cages": cages, "monitor": monitor });
    Arc::new(move || described.clone())
}

/// Messages from the main thread to a worker thread.
pub(crate) enum WorkerCmd {
    /// A connection accepted for `interface`, served until it closes or `shutdown` fires (the
    /// interface was replaced, or the process stops).
    Accept {
        interface: Arc<dyn Interface>,
        shutdown: rustomnic_interface::Shutdown,
        stream: std::net::TcpStream,
        remote: SocketAddr,
    },
    Module {
        cage: String,
        name: String,
        module: Option<Module>,
    },
    /// A resource's config changed (or it was added, or removed with `None`).
    Resource {
        cage: String,
        name: String,
        config: Option<rustomnic_resource::ResourceConfig>,
        stats: Arc<rustomnic_resource::PoolStats>,
    },
    /// Work made elsewhere to run on this worker (a queued call, a schedule firing, an alert).
    Run(rustomnic_queue::Job),
}

/// Handles to every worker, for the acceptors and the watcher.
#[derive(Clone)]
pub(crate) struct Workers {
    pub(crate) senders: Arc<Vec<mpsc::UnboundedSender<WorkerCmd>>>,
}

impl Workers {
    /// Runs `job` on one worker thread, the next in turn that is still running (the monitor
    /// delivers alerts this way).
    pub fn run_job(&self, job: rustomnic_monitor::WorkerJob) -> Result<(), String> {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let job: rustomnic_queue::Job = Box::new(move || Box::pin(async move { job() }));
        if send_job(&self.senders, &NEXT, job) {
            Ok(())
        } else {
            Err("no worker thread is running (shutting down)".into())
        }
    }

    /// Sends a resource's new config to every worker.
    pub fn broadcast_resource(&self, cage: &str, name: &str, config: Option<rustomnic_resource::ResourceConfig>, stats: Arc<rustomnic_resource::PoolStats>) {
        for tx in self.senders.iter() {
            let _ = tx.send(WorkerCmd::Resource { cage: cage.to_string(), name: name.to_string(), config: config.clone(), stats: stats.clone() });
        }
    }

    /// Sends a module update to every worker.
    pub fn broadcast_module(&self, cage: &str, name: &str, module: Option<Module>) {
        for tx in self.senders.iter() {
            let _ = tx.send(WorkerCmd::Module { cage: cage.to_string(), name: name.to_string(), module: module.clone() });
        }
    }
}

/// How long the end of a run waits for its last spans to be exported.
const TRACES_FLUSH: Duration = Duration::from_secs(3);

/// Starts the span exporter when some cage has a `[tracing]` table (decision 148).
fn start_tracing(cages: &[PreparedCage]) -> Result<(), Error> {
    let traced: Vec<(String, rustomnic_telemetry::TracingConfig)> =
        cages.iter().filter_map(|c| c.config.tracing.clone().map(|t| (c.config.name.clone(), t))).collect();
    if traced.is_empty() || rustomnic_telemetry::exporter().is_some() {
        return Ok(());
    }
    for (cage, t) in &traced {
        tracing::info!(cage = %cage, "tracing: spans go to {} as service {} (sampling {})", t.endpoint, t.service_name, t.sampling);
    }
    let exporter = rustomnic_telemetry::Exporter::start(traced).map_err(|e| Error::Runtime(e.to_string()))?;
    rustomnic_telemetry::install(exporter).map_err(|e| Error::Runtime(e.to_string()))
}

/// Runs the cages at `path` until SIGINT or SIGTERM, then lets in-flight requests finish
/// (bounded by their deadlines) and returns.
pub fn run(path: &std::path::Path, protocols: &Protocols, options: RunOptions) -> Result<(), Error> {
    // Read before any thread starts (it takes NOTIFY_SOCKET out of the environment).
    let notifier = crate::notify::Notifier::from_env().map(Arc::new);
    let cages = prepare(path, protocols, false)?;
    let drain_limit = drain_limit(&cages);
    let drain_delay = drain_delay(&cages);
    // What /healthz, /readyz and the watchdog read (decision 144).
    let health = Arc::new(rustomnic_monitor::health::Health::new(options.workers.max(1)));
    rustomnic_monitor::health::set(Some(health.clone()));
    let control =
        tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| Error::Runtime(format!("cannot start the control runtime: {e}")))?;
    let interfaces: Vec<Arc<dyn Interface>> = cages.iter().flat_map(|c| c.config.interfaces.iter().cloned()).collect();
    // Bind every listener before starting anything, so a taken port stops the start cleanly.
    let listeners = bind_listeners(&control, &interfaces)?;
    let (monitor_config, monitor_listener) = crate::monitor::bind(&cages)?;
    // Logged only once every bind succeeded, so a start refused for a taken port never claims
    // to have listened.
    for (iface, listener) in &listeners {
        log_listening(iface.as_ref(), listener)?;
    }
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let joined = join_cluster(&control, &cages, &options, monitor_listener.as_ref(), &shutdown_rx)?;
    let (cluster, claim) = match joined {
        Some((c, claim)) => (Some(c), claim),
        None => (None, None),
    };
    if let Some(c) = &cluster {
        health.set_cluster_check(cluster_ready_check(c));
    }
    start_tracing(&cages)?;
    let resources = Arc::new(ResourceInit::new(&cages, options.workers.max(1)));
    let (workers, threads) = start_workers(&cages, &options, &resources, &cluster, &shutdown_rx, &shutdown_tx, drain_limit, &health)?;
    let monitor = crate::monitor::start(monitor_listener, monitor_config, &cages, &workers)?;
    let queues = start_queues(&cages, &workers)?;
    crate::monitor::register_queue_gauges(&cages);
    let (changes_tx, changes_rx) = mpsc::unbounded_channel::<InterfaceChange>();
    let watcher = if options.watch {
        Some(crate::watcher::start(&cages, workers.clone(), protocols.clone(), resources.clone(), changes_tx).map_err(Error::Runtime)?)
    } else {
        None
    };
    let running = format!(
        "running {} cage{} ({}) on {} worker thread{}",
        cages.len(),
        if cages.len() == 1 { "" } else { "s" },
        cages.iter().map(|c| c.config.name.as_str()).collect::<Vec<_>>().join(", "),
        options.workers,
        if options.workers == 1 { "" } else { "s" }
    );
    tracing::info!("{running}");
    let stuck = control.block_on(serve_until_signal(ServeArgs {
        interfaces,
        listeners,
        changes: changes_rx,
        workers,
        claim,
        queues: &queues,
        shutdown_tx,
        threads,
        drain_limit,
        drain_delay,
        health,
        notifier,
        running,
    }));
    drop(watcher);
    drop(monitor);
    drop(queues);
    // Spans of the last requests go out before the process ends (bounded).
    if let Some(exporter) = rustomnic_telemetry::exporter() {
        exporter.flush(TRACES_FLUSH);
    }
    if stuck {
        tracing::info!("stopped (without a stuck worker)");
        std::process::exit(1);
    }
    tracing::info!("stopped");
    Ok(())
}

/// How long the shutdown waits for requests in flight: the longest request timeout, plus 1 s.
fn drain_limit(cages: &[PreparedCage]) -> Duration {
    cages
        .iter()
        .flat_map(|c| c.config.interfaces.iter().map(|i| i.spec().request_timeout).chain(std::iter::once(c.config.request_timeout)))
        .max()
        .unwrap_or(Duration::ZERO)
        + Duration::from_secs(1)
}

/// How long a stop keeps the listeners open after `/readyz` turned 503: the longest
/// `drain_delay` the cages set, else the default.
fn drain_delay(cages: &[PreparedCage]) -> Duration {
    cages.iter().filter_map(|c| c.config.drain_delay).max().unwrap_or(crate::config::DEFAULT_DRAIN_DELAY)
}

/// The cluster's part of readiness: the process's own connection to NATS (heartbeats, events)
/// is up.
fn cluster_ready_check(cluster: &Arc<rustomnic_cluster::Cluster>) -> rustomnic_monitor::health::ReadyCheck {
    let (cluster, flock) = (cluster.clone(), cluster.identity.flock.clone());
    let servers = cluster.config.servers();
    Arc::new(move || (!cluster.is_connected()).then(|| format!("cluster: not connected to NATS at {servers} (flock {flock}); calls to other processes fail")))
}

/// Binds the address of every interface that listens.
/// An interface with the listener bound for it.
type Bound = (Arc<dyn Interface>, tokio::net::TcpListener);
/// The cluster this process joined, and its claims for interfaces (when JetStream is there).
type Joined = (Arc<rustomnic_cluster::Cluster>, Option<FlockClaim>);

fn bind_listeners(control: &tokio::runtime::Runtime, interfaces: &[Arc<dyn Interface>]) -> Result<Vec<Bound>, Error> {
    let mut listeners = Vec::new();
    for iface in interfaces {
        if let Some(addr) = iface.listen() {
            let listener = control
                .block_on(bind(addr.value))
                .map_err(|e| Error::Invalid(vec![addr.error(format!("cannot listen on {}: {e}", addr.value)).to_string()]))?;
            listeners.push((iface.clone(), listener));
        }
    }
    Ok(listeners)
}

pub(crate) fn log_listening(iface: &dyn Interface, listener: &tokio::net::TcpListener) -> Result<(), Error> {
    let spec = iface.spec();
    let local = listener.local_addr().map_err(|e| Error::Io(e.to_string()))?;
    tracing::info!(cage = %spec.cage, interface = %spec.name, "listening on {local} ({})", spec.protocol);
    Ok(())
}

/// Joins the cluster when the cages configure one (or `--cluster` asks): heartbeats, the
/// monitor's cluster view, durable calls' directory of queues, events across the flock, and the
/// flock's claims for interfaces.
fn join_cluster(
    control: &tokio::runtime::Runtime,
    cages: &[PreparedCage],
    options: &RunOptions,
    monitor_listener: Option<&std::net::TcpListener>,
    shutdown_rx: &watch::Receiver<bool>,
) -> Result<Option<Joined>, Error> {
    let Some(config) = cluster_config(cages, options)? else { return Ok(None) };
    let cluster = Arc::new(rustomnic_cluster::Cluster::new(config, env!("CARGO_PKG_VERSION")));
    // The page speaks HTTPS when the monitor's config has a tls table.
    let https = cages.iter().filter_map(|c| c.config.monitor.as_ref()).any(|m| m.tls.is_some());
    let page = monitor_listener.and_then(|l| l.local_addr().ok()).map(|a| monitor_url(a, &cluster.identity.host, https));
    control.block_on(cluster.join(describe(cages, page), shutdown_rx.clone())).map_err(|e| Error::Runtime(e.to_string()))?;
    let roster = cluster.roster.clone();
    rustomnic_monitor::set_cluster_source(Some(Arc::new(move || cluster_view(&roster.snapshot()))));
    let roster = cluster.roster.clone();
    rustomnic_lua::durable::set_directory(Arc::new(move |cage: &str| {
        roster
            .cage_queues(cage)
            .map(|queues| queues.into_iter().map(|(name, ms)| rustomnic_lua::durable::QueueInfo { name, expires_in: Duration::from_millis(ms) }).collect())
    }));
    // pmnc.events reach the same cages in every process of the flock.
    let names = cages.iter().map(|c| c.config.name.clone()).collect();
    let deliver: rustomnic_cluster::events::Deliver = Arc::new(|cage: &str, topic: &str, value| {
        // The end of a durable call that ran in another process (docs/queues.md).
        rustomnic_queue::observe_completion(topic, &value);
        rustomnic_lua::events::deliver(cage, topic, value);
    });
    let outbox = {
        let _runtime = control.enter();
        cluster.join_events(names, deliver, shutdown_rx.clone())
    };
    let claim: Option<FlockClaim> = cluster.claims().map(|claims| {
        let (handle, claims) = (control.handle().clone(), Arc::new(claims));
        Arc::new(move |key: &str| handle.block_on(claims.claim(key))) as FlockClaim
    });
    if let Some(outbox) = outbox {
        rustomnic_lua::events::set_remote(Arc::new(move |cage: &str, topic: &str, value: &rustomnic_core::Value| {
            outbox.send(cage, topic, value);
        }));
    }
    Ok(Some((cluster, claim)))
}

/// Starts the worker threads and waits until each has loaded every cage.
#[allow(clippy::too_many_arguments)]
fn start_workers(
    cages: &[PreparedCage],
    options: &RunOptions,
    resources: &Arc<ResourceInit>,
    cluster: &Option<Arc<rustomnic_cluster::Cluster>>,
    shutdown_rx: &watch::Receiver<bool>,
    shutdown_tx: &watch::Sender<bool>,
    drain_limit: Duration,
    health: &Arc<rustomnic_monitor::health::Health>,
) -> Result<(Workers, Vec<std::thread::JoinHandle<()>>), Error> {
    let init: Arc<Vec<(String, rustomnic_lua::LuaLimits, Vec<Module>)>> =
        Arc::new(cages.iter().map(|c| (c.config.name.clone(), c.config.lua.clone(), c.modules.values().cloned().collect())).collect());
    let mut senders = Vec::new();
    let mut threads = Vec::new();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
    for n in 0..options.workers.max(1) {
        let (tx, rx) = mpsc::unbounded_channel();
        senders.push(tx);
        let (init, resources, shutdown, ready, cluster) = (init.clone(), resources.clone(), shutdown_rx.clone(), ready_tx.clone(), cluster.clone());
        let health = health.clone();
        let handle = std::thread::Builder::new()
            .name(format!("pmnc-worker-{n}"))
            .spawn(move || worker_main(n, init, resources, cluster, rx, shutdown, ready, drain_limit, health))
            .map_err(|e| Error::Runtime(format!("cannot start worker thread {n}: {e}")))?;
        threads.push(handle);
    }
    drop(ready_tx);
    for _ in 0..threads.len() {
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = shutdown_tx.send(true);
                return Err(Error::Runtime(e));
            }
            Err(_) => return Err(Error::Runtime("a worker thread died while starting".into())),
        }
    }
    Ok((Workers { senders: Arc::new(senders) }, threads))
}

/// What [`serve_until_signal`] runs with.
struct ServeArgs<'a> {
    interfaces: Vec<Arc<dyn Interface>>,
    listeners: Vec<Bound>,
    changes: mpsc::UnboundedReceiver<InterfaceChange>,
    workers: Workers,
    claim: Option<FlockClaim>,
    queues: &'a [rustomnic_queue::Running],
    shutdown_tx: watch::Sender<bool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    drain_limit: Duration,
    /// How long a stop keeps listening after `/readyz` turned 503 (when it was ever asked).
    drain_delay: Duration,
    health: Arc<rustomnic_monitor::health::Health>,
    /// The service manager, told when the process is ready and when it stops.
    notifier: Option<Arc<crate::notify::Notifier>>,
    /// What the process runs, for the manager's status line.
    running: String,
}

/// Starts the interfaces, applies changed `[interfaces.X]` tables until SIGINT or SIGTERM, then
/// shuts down: queued calls, interfaces, workers. True when a worker had to be left behind.
async fn serve_until_signal(args: ServeArgs<'_>) -> bool {
    let ServeArgs { interfaces, listeners, mut changes, workers, claim, queues, shutdown_tx, threads, drain_limit, drain_delay, health, notifier, running } =
        args;
    let mut live = LiveInterfaces::new(workers.clone(), claim);
    live.start(interfaces, listeners);
    // Every listener was bound (and so accepts connections) before the workers started; the
    // state files and queues are open by now, and the acceptors have just been handed out.
    health.set_listening();
    if let Some(n) = &notifier {
        n.send(&format!("READY=1\nSTATUS={}", crate::notify::status_line(&running)));
        if let Some(period) = n.watchdog {
            tokio::spawn(watchdog(n.clone(), health.clone(), period, running.clone()));
        }
    }
    loop {
        tokio::select! {
            _ = wait_for_signal() => break,
            change = changes.recv() => match change {
                Some(change) => live.apply(change).await,
                None => {
                    wait_for_signal().await;
                    break;
                }
            },
        }
    }
    // A second signal means "now", from here on.
    tokio::spawn(async {
        wait_for_signal().await;
        tracing::warn!("second signal: exiting without waiting");
        std::process::exit(1);
    });
    health.set_draining();
    // A balancer that watches /readyz gets time to see the 503 and stop sending before the
    // listeners close; nobody has asked /readyz, nobody is told, and the stop goes on at once.
    let delay = if health.watched() { drain_delay } else { Duration::ZERO };
    if let Some(n) = &notifier {
        n.send(&format!("STOPPING=1\nSTATUS=stopping: waiting for requests in flight (at most {:?})", delay + drain_limit));
    }
    if !delay.is_zero() {
        tracing::info!("draining: /readyz answers 503; the listeners close in {delay:?} (drain_delay)");
        tokio::time::sleep(delay).await;
    }
    tracing::info!("shutting down: no new connections; waiting for requests in flight (at most {:?})", drain_limit);
    // Queued calls first: they need the workers (and their connections) to finish.
    for q in queues {
        let left = q.drain(drain_limit).await;
        if left > 0 {
            tracing::warn!(cage = %q.store().cage(), "{left} queued call(s) still running at shutdown; they run again at the next start");
        }
    }
    live.stop_all();
    // Interfaces that consume (brokers, schedules) settle what is in flight before the workers
    // stop: their handlers still run, and a message is acknowledged only after its handler.
    let left = live.consumers_stopped(drain_limit).await;
    if left > 0 {
        tracing::warn!(
            "{left} consuming interface(s) still busy after {drain_limit:?}; stopping the workers anyway (their unsettled messages come back from the broker)"
        );
    }
    let _ = shutdown_tx.send(true);
    let joined = tokio::task::spawn_blocking(move || {
        for t in threads {
            let _ = t.join();
        }
    });
    // Workers end within the drain limit; one that does not is stuck in a call that no hook
    // can interrupt (the watchdog has named it in the log). Exit without it rather than hang.
    let grace = drain_limit + WORKER_EXIT_GRACE;
    if tokio::time::timeout(grace, joined).await.is_err() {
        tracing::error!("a worker thread did not stop within {grace:?} of the shutdown (stuck in a long C or Rust call); exiting without waiting for it");
        return true;
    }
    false
}

/// Pings the service manager's watchdog at half its period while every worker thread answers
/// the liveness probe; a stuck worker stops the pings, and the manager restarts the process.
async fn watchdog(notifier: Arc<crate::notify::Notifier>, health: Arc<rustomnic_monitor::health::Health>, period: Duration, running: String) {
    let mut tick = tokio::time::interval(period / 2);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tick.tick().await;
        let reasons = health.liveness();
        if reasons.is_empty() {
            if failing {
                tracing::info!("liveness probe passes again; watchdog pings resume");
                failing = false;
                notifier.send(&format!("WATCHDOG=1\nSTATUS={}", crate::notify::status_line(&running)));
            } else {
                notifier.send("WATCHDOG=1");
            }
        } else if !failing {
            failing = true;
            tracing::error!("liveness probe fails ({}); no watchdog ping, the service manager restarts the process after {period:?}", reasons.join("; "));
            notifier.send(&format!("STATUS={}", crate::notify::status_line(&format!("not alive: {}", reasons.join("; ")))));
        }
    }
}

/// Records that worker `n`'s event loop turns, every [`rustomnic_monitor::health::BEAT`]: this
/// task runs only when the loop does, so a worker stuck in a call stops beating.
async fn heartbeat(n: usize, health: Arc<rustomnic_monitor::health::Health>) {
    #[cfg(debug_assertions)]
    let stall = test_stall_file(n);
    let mut tick = tokio::time::interval(rustomnic_monitor::health::BEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        health.beat(n);
        #[cfg(debug_assertions)]
        if let Some(file) = &stall {
            // Blocks the thread as a call stuck in C would: nothing else of this worker runs.
            while file.exists() {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// A test-only way to stall a worker (debug builds only; not compiled into a release build):
/// `PMNC_TEST_STALL_FILE=path` makes worker 0 block its thread while that file exists.
#[cfg(debug_assertions)]
fn test_stall_file(n: usize) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PMNC_TEST_STALL_FILE").filter(|_| n == 0)?;
    tracing::warn!("test hook: worker 0 blocks while {} exists (PMNC_TEST_STALL_FILE, debug builds only)", std::path::Path::new(&path).display());
    Some(path.into())
}

/// How long after the drain limit a worker thread may take to end before the process exits
/// without it.
const WORKER_EXIT_GRACE: Duration = Duration::from_secs(5);

pub(crate) async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Accepts connections of one interface until its shutdown fires, handing them to the workers in
/// turn.
pub(crate) async fn accept_loop(iface: Arc<dyn Interface>, listener: tokio::net::TcpListener, workers: Workers, mut shutdown: rustomnic_interface::Shutdown) {
    let mut next = 0usize;
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => return,
        };
        match accepted {
            Ok((stream, remote)) => {
                let _ = stream.set_nodelay(true);
                let Ok(stream) = stream.into_std() else { continue };
                let n = workers.senders.len();
                // Round robin; a worker that has gone away (shutdown) is skipped.
                let mut cmd = WorkerCmd::Accept { interface: iface.clone(), shutdown: shutdown.clone(), stream, remote };
                for _ in 0..n {
                    next = (next + 1) % n;
                    match workers.senders[next].send(cmd) {
                        Ok(()) => break,
                        Err(mpsc::error::SendError(back)) => cmd = back,
                    }
                }
            }
            Err(e) => {
                // Out of file descriptors or a transient error: do not spin on it.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn worker_main(
    n: usize,
    init: Arc<Vec<(String, rustomnic_lua::LuaLimits, Vec<Module>)>>,
    resources: Arc<ResourceInit>,
    cluster: Option<Arc<rustomnic_cluster::Cluster>>,
    mut rx: mpsc::UnboundedReceiver<WorkerCmd>,
    mut shutdown: watch::Receiver<bool>,
    ready: std::sync::mpsc::Sender<Result<(), String>>,
    drain_limit: Duration,
    health: Arc<rustomnic_monitor::health::Health>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(format!("worker {n}: cannot start its runtime: {e}")));
            return;
        }
    };
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        for (cage, limits, modules) in init.iter() {
            let vm = match CageVm::with_limits(cage, limits.clone()) {
                Ok(vm) => vm,
                Err(e) => {
                    let _ = ready.send(Err(e));
                    return;
                }
            };
            for m in modules {
                if let Err(e) = vm.install(m) {
                    let _ = ready.send(Err(format!("cage {cage}: {e}")));
                    return;
                }
            }
            worker::install(Rc::new(vm));
        }
        let pools = resources.install();
        if let Some(cluster) = &cluster {
            let names = init.iter().map(|(cage, _, _)| cage.clone()).collect();
            if let Err(e) = cluster.join_worker(n, names, shutdown.clone()).await {
                let _ = ready.send(Err(format!("worker {n}: {e}")));
                return;
            }
        }
        tokio::task::spawn_local(rustomnic_lua::metrics::sample_memory(n));
        health.beat(n);
        tokio::task::spawn_local(heartbeat(n, health));
        let _ = ready.send(Ok(()));
        drop(ready);
        let connections = Rc::new(std::cell::Cell::new(0usize));
        let idle = Rc::new(tokio::sync::Notify::new());
        loop {
            let cmd = tokio::select! {
                cmd = rx.recv() => cmd,
                _ = shutdown.changed() => None,
            };
            match cmd {
                Some(WorkerCmd::Accept { interface: iface, shutdown: iface_shutdown, stream, remote }) => {
                    let stream = match stream.set_nonblocking(true).and_then(|_| tokio::net::TcpStream::from_std(stream)) {
                        Ok(s) => s,
                        Err(e) => {
                            tracing::warn!("worker {n}: cannot take a connection from {remote}: {e}");
                            continue;
                        }
                    };
                    connections.set(connections.get() + 1);
                    let (connections, idle) = (connections.clone(), idle.clone());
                    tokio::task::spawn_local(async move {
                        iface.serve(stream, remote, iface_shutdown).await;
                        connections.set(connections.get() - 1);
                        if connections.get() == 0 {
                            idle.notify_waiters();
                        }
                    });
                }
                Some(WorkerCmd::Module { cage, name, module }) => apply_module(&cage, &name, module),
                Some(WorkerCmd::Resource { cage, name, config, stats }) => pools.replace(&cage, &name, config.as_ref(), stats),
                Some(WorkerCmd::Run(job)) => {
                    // Counted like a connection: the drain below waits for it.
                    connections.set(connections.get() + 1);
                    let (connections, idle) = (connections.clone(), idle.clone());
                    tokio::task::spawn_local(async move {
                        job().await;
                        connections.set(connections.get() - 1);
                        if connections.get() == 0 {
                            idle.notify_waiters();
                        }
                    });
                }
                None => break,
            }
        }
        rx.close();
        let started = Instant::now();
        while connections.get() > 0 && started.elapsed() < drain_limit {
            let wait = idle.notified();
            if connections.get() == 0 {
                break;
            }
            let _ = tokio::time::timeout(drain_limit.saturating_sub(started.elapsed()), wait).await;
        }
        if connections.get() > 0 {
            tracing::warn!("worker {n}: {} connection(s) or request(s) still open after {:?}; closing them", connections.get(), drain_limit);
        }
        if cluster.is_some() {
            rustomnic_cluster::link::drain(drain_limit.saturating_sub(started.elapsed())).await;
        }
        worker::clear();
    });
}

/// What every worker needs to build its pools: the resources of each cage, and one set of
/// counters per resource shared by all workers.
pub(crate) struct ResourceInit {
    cages: Vec<(String, Vec<rustomnic_resource::ResourceConfig>)>,
    workers: usize,
    stats: BTreeMap<(String, String), Arc<rustomnic_resource::PoolStats>>,
}

impl ResourceInit {
    pub(crate) fn new(cages: &[PreparedCage], workers: usize) -> ResourceInit {
        let cages: Vec<_> = cages.iter().map(|c| (c.config.name.clone(), c.config.resources.clone())).collect();
        let stats = cages
            .iter()
            .flat_map(|(cage, rs)| rs.iter().map(move |r| ((cage.clone(), r.name.clone()), rustomnic_resource::stats_for(cage, &r.name))))
            .collect();
        ResourceInit { cages, workers, stats }
    }

    /// Builds this worker thread's pools and makes them the resources of Lua transactions.
    pub(crate) fn install(&self) -> Rc<rustomnic_resource::CageResources> {
        rustomnic_resource::install(&self.cages, self.workers, &self.stats)
    }

    /// The counters of a resource: the shared ones when it existed at start, else new ones.
    pub(crate) fn stats(&self, cage: &str, resource: &str) -> Arc<rustomnic_resource::PoolStats> {
        self.stats.get(&(cage.to_string(), resource.to_string())).cloned().unwrap_or_else(|| rustomnic_resource::stats_for(cage, resource))
    }

    /// Fingerprints of the resources of `cage` at start.
    pub(crate) fn fingerprints(&self, cage: &str) -> BTreeMap<String, String> {
        self.cages.iter().filter(|(c, _)| c == cage).flat_map(|(_, rs)| rs.iter().map(|r| (r.name.clone(), r.fingerprint.clone()))).collect()
    }
}

fn apply_module(cage: &str, name: &str, module: Option<Module>) {
    let Some(vm) = worker::cage(cage) else { return };
    match module {
        Some(m) => {
            if let Err(e) = vm.install(&m) {
                tracing::error!(cage, "{e} (keeping the previous version of {name})");
            }
        }
        None => vm.remove(name),
    }
}

impl Workers {
    /// Runs jobs on the workers, round robin.
    pub(crate) fn spawner(&self) -> rustomnic_interface::Spawner {
        let senders = self.senders.clone();
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        Arc::new(move |job| {
            send_job(&senders, &next, job);
        })
    }

    /// How many worker threads there are.
    pub(crate) fn count(&self) -> usize {
        self.senders.len()
    }

    /// Runs a job on the worker named by its index (a consumer that runs on every worker).
    pub(crate) fn placer(&self) -> rustomnic_interface::Placer {
        let senders = self.senders.clone();
        Arc::new(move |i, job| senders.get(i).is_some_and(|tx| tx.send(WorkerCmd::Run(job)).is_ok()))
    }
}

/// Hands `job` to the next worker in turn that is still running; false when none is.
fn send_job(senders: &[mpsc::UnboundedSender<WorkerCmd>], next: &std::sync::atomic::AtomicUsize, job: rustomnic_queue::Job) -> bool {
    let n = senders.len();
    let mut cmd = WorkerCmd::Run(job);
    for _ in 0..n {
        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % n;
        match senders[i].send(cmd) {
            Ok(()) => return true,
            Err(mpsc::error::SendError(back)) => cmd = back,
        }
    }
    false
}

/// Starts the queue of every cage (docs/queues.md): the queues of its `[queues]`, and its
/// outbox of durable calls to other cages.
fn start_queues(cages: &[PreparedCage], workers: &Workers) -> Result<Vec<rustomnic_queue::Running>, Error> {
    let mut running = Vec::new();
    for c in cages {
        let r = rustomnic_queue::start(&c.config.name, &c.config.state_file, c.config.queues.clone(), c.config.request_timeout, workers.spawner())
            .map_err(Error::Runtime)?;
        running.push(r);
    }
    Ok(running)
}
