//! The monitor of a Rustomnic process: one page with live graphs of every cage of the process,
//! `/metrics` for Prometheus, `/status` as JSON, `/healthz` and `/readyz` (health.rs), the cluster
//! view, the clustered queues and workflows (queues.rs) and alert rules. It runs on a
//! thread of its own (never on a worker thread): a sampler every second, the alert rules after
//! each sample, and the pages (axum).

pub mod alerts;
pub mod cluster;
pub mod config;
pub mod health;
pub mod prometheus;
mod queues;
pub mod series;
mod server;
/// Entry points for the fuzz targets (`fuzz/`); not an API.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::server::{allowed, percent_decode};
}
mod status;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

pub use alerts::{Alert, AlertSink, InProcessSink, WorkerJob};
pub use cluster::{set_cluster_source, ClusterSource, Instance};
pub use config::{choose, AlertKind, AlertRule, Auth, MonitorConfig};

/// What the pages and the sampler share.
pub(crate) struct Shared {
    pub store: Mutex<series::Store>,
    pub alerts: Mutex<alerts::Alerts>,
    pub auth: Auth,
    pub cages: Vec<String>,
    pub started: Instant,
    pub started_unix: f64,
    pub addr: Option<SocketAddr>,
    /// "https" when the page speaks TLS.
    pub scheme: &'static str,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Binds the page's address (before anything else starts, so a taken port stops the start);
/// None when the page is off.
pub fn bind(config: &MonitorConfig) -> Result<Option<std::net::TcpListener>, String> {
    let Some(addr) = config.listen else { return Ok(None) };
    let at = match &config.file {
        Some(f) => format!("{}:{}: monitor.listen: ", f.display(), config.line),
        None => String::new(),
    };
    let listener = std::net::TcpListener::bind(addr).map_err(|e| format!("{at}the monitor cannot listen on {addr}: {e}"))?;
    listener.set_nonblocking(true).map_err(|e| format!("monitor: {e}"))?;
    Ok(Some(listener))
}

/// The running monitor; stops when dropped.
pub struct MonitorHandle {
    pub addr: Option<SocketAddr>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for MonitorHandle {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Starts the monitor thread: the page on `listener` (when there is one), the sampler and the
/// alert rules of `config`, delivered through `sink`.
pub fn start(listener: Option<std::net::TcpListener>, config: MonitorConfig, cages: Vec<String>, sink: Arc<dyn AlertSink>) -> Result<MonitorHandle, String> {
    let addr = match &listener {
        Some(l) => Some(l.local_addr().map_err(|e| format!("monitor: {e}"))?),
        None => None,
    };
    let scheme = if config.tls.is_some() { "https" } else { "http" };
    let shared = Arc::new(Shared {
        store: Mutex::new(series::Store::new()),
        alerts: Mutex::new(alerts::Alerts::new(config.alerts.clone())),
        auth: config.auth.clone(),
        cages,
        started: Instant::now(),
        started_unix: rustomnic_core::metrics::unix_now(),
        addr,
        scheme,
    });
    let tls = match config.tls.clone() {
        Some(options) => Some(rustomnic_http::tls::TlsServer::start(options, "monitor".into()).map_err(|e| format!("monitor: {e}"))?),
        None => None,
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
    let thread = std::thread::Builder::new()
        .name("pmnc-monitor".into())
        .spawn(move || run(listener, tls, shared, sink, stop_rx, ready_tx))
        .map_err(|e| format!("cannot start the monitor thread: {e}"))?;
    match ready_rx.recv_timeout(Duration::from_secs(10)) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e),
        Err(_) => return Err("the monitor thread did not start".into()),
    }
    if let Some(a) = addr {
        tracing::info!("monitor page at {scheme}://{a}/ (also /metrics, /status, /healthz and /readyz; a failed request: {scheme}://{a}/#request-<id>)");
    }
    Ok(MonitorHandle { addr, stop: Some(stop_tx), thread: Some(thread) })
}

fn run(
    listener: Option<std::net::TcpListener>,
    tls: Option<Arc<rustomnic_http::tls::TlsServer>>,
    shared: Arc<Shared>,
    sink: Arc<dyn AlertSink>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
    ready: std::sync::mpsc::Sender<Result<(), String>>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(format!("monitor: cannot start its runtime: {e}")));
            return;
        }
    };
    rt.block_on(async move {
        if let Some(l) = listener {
            match tokio::net::TcpListener::from_std(l) {
                Ok(l) => {
                    let app = server::router(shared.clone());
                    tokio::spawn(async move {
                        let served = match tls {
                            None => axum::serve(l, app).await,
                            Some(tls) => axum::serve(server::TlsListener::new(l, tls), app).await,
                        };
                        if let Err(e) = served {
                            tracing::error!("monitor page stopped: {e}");
                        }
                    });
                }
                Err(e) => {
                    let _ = ready.send(Err(format!("monitor: {e}")));
                    return;
                }
            }
        }
        let _ = ready.send(Ok(()));
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first tick is immediate; the first sample comes a second after the start so
        // its rates are over a whole second.
        tick.tick().await;
        let mut last = Instant::now();
        let mut queues_read: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = &mut stop => break,
            }
            let now = Instant::now();
            let now_unix = rustomnic_core::metrics::unix_now();
            let fired = {
                let mut store = lock(&shared.store);
                store.sample(now_unix, now.duration_since(last).as_secs_f64());
                let (broken, gauges) = alerts::broken_and_gauges();
                let instances = cluster::instances();
                let inputs = alerts::Inputs { store: &store, instances: instances.as_deref(), broken: &broken, gauges: &gauges };
                lock(&shared.alerts).evaluate(now, now_unix, &inputs)
            };
            last = now;
            if queues_read.is_none_or(|t| now.duration_since(t) >= queues::EVERY) {
                queues_read = Some(now);
                queues::refresh();
            }
            for (rule, alert) in fired {
                let target = format!("{}.{}.{}", rule.target.0, rule.target.1, rule.target.2);
                tracing::warn!(cage = %rule.owner, "alert {} fired: {} (sending it to {target})", rule.name, alert.message);
                let delivery = sink.deliver(&rule, alert);
                let name = rule.name.clone();
                tokio::spawn(async move {
                    match delivery.await {
                        Ok(()) => tracing::info!("alert {name} delivered to {target}"),
                        Err(e) => tracing::error!("alert {name}: cannot deliver: {e}"),
                    }
                });
            }
        }
    });
}
