//! Starting the monitor of this process: one page for all its cages (docs/decisions/040), with
//! alerts delivered by calling their target function on a worker thread.

use std::sync::Arc;
use std::time::Duration;

use rustomnic_monitor::{InProcessSink, MonitorConfig, MonitorHandle};

use crate::runtime::{PreparedCage, Workers};
use crate::Error;

/// How long an alert's call to its target function may take.
const ALERT_CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// The page's settings from the cages' `[monitor]` tables, and its bound listener (None when
/// `listen = false`).
pub(crate) fn bind(cages: &[PreparedCage]) -> Result<(MonitorConfig, Option<std::net::TcpListener>), Error> {
    let tables: Vec<(String, Option<MonitorConfig>)> = cages.iter().map(|c| (c.config.name.clone(), c.config.monitor.clone())).collect();
    let (config, warnings) = rustomnic_monitor::choose(&tables);
    for w in warnings {
        tracing::warn!("{w}");
    }
    let listener = rustomnic_monitor::bind(&config).map_err(|e| Error::Invalid(vec![e]))?;
    Ok((config, listener))
}

/// Alert targets in cages of this process that have no such public function: config problems,
/// reported with the rule's file and line before anything listens.
pub(crate) fn check_targets(cages: &[PreparedCage]) -> Vec<String> {
    let mut problems = Vec::new();
    for c in cages {
        for rule in c.config.monitor.iter().flat_map(|m| &m.alerts) {
            let (cage, module, function) = &rule.target;
            let Some(target) = cages.iter().find(|t| &t.config.name == cage) else { continue };
            if let Some(queue) = &rule.durable_queue {
                if !target.config.queues.iter().any(|q| &q.name == queue) {
                    problems.push(format!(
                        "{}: alert {}: cage {cage} has no queue {queue:?} for durable_queue (add [queues.{queue}] to its cage.toml)",
                        rule.target_at, rule.name
                    ));
                }
            }
            match target.modules.get(module) {
                None => problems.push(format!("{}: cage {cage} has no module {module} ({cage}/{module}.lua)", rule.target_at)),
                Some(m) if !m.functions.iter().any(|f| f == function) => problems.push(format!(
                    "{}: module {module} ({}) has no function {function} (it has: {})",
                    rule.target_at,
                    m.display,
                    if m.functions.is_empty() { "none".to_string() } else { m.functions.join(", ") }
                )),
                Some(_) => {}
            }
        }
    }
    problems
}

/// Starts the sampler, the alert rules and (with a listener) the page.
pub(crate) fn start(listener: Option<std::net::TcpListener>, config: MonitorConfig, cages: &[PreparedCage], workers: &Workers) -> Result<MonitorHandle, Error> {
    for rule in &config.alerts {
        let cage = &rule.target.0;
        if !cages.iter().any(|c| &c.config.name == cage) {
            tracing::warn!(cage = %rule.owner, "alert {}: cage {cage} does not run in this process; its alerts go to the cluster ({})", rule.name, rule.target_at);
        }
    }
    let w = workers.clone();
    let sink = Arc::new(InProcessSink::new(move |job| w.run_job(job), ALERT_CALL_TIMEOUT));
    let names = cages.iter().map(|c| c.config.name.clone()).collect();
    rustomnic_monitor::start(listener, config, names, sink).map_err(Error::Runtime)
}

/// Every cage's queue figures, and when they were read.
type QueueReading = (std::time::Instant, Vec<(String, Vec<rustomnic_queue::QueueFigures>)>);

/// The queue figures read at most twice a second, however many gauges ask for them.
#[derive(Default)]
struct QueueFigures {
    read: std::sync::Mutex<Option<QueueReading>>,
}

impl QueueFigures {
    fn get(&self, cage: &str, queue: &str, pick: fn(&rustomnic_queue::QueueFigures) -> f64) -> f64 {
        let mut read = self.read.lock().unwrap_or_else(|p| p.into_inner());
        let fresh = read.as_ref().is_some_and(|(at, _)| at.elapsed() < std::time::Duration::from_millis(500));
        if !fresh {
            *read = Some((std::time::Instant::now(), rustomnic_queue::metrics()));
        }
        read.as_ref().and_then(|(_, all)| all.iter().find(|(c, _)| c == cage)).and_then(|(_, qs)| qs.iter().find(|q| q.queue == queue)).map(pick).unwrap_or(0.0)
    }
}

/// Gauges of every durable call queue of the cages (depth, age of the oldest waiting call,
/// retrying calls, dead letters) for /metrics, the page and `queue_age` alerts, and the sizes of
/// every cage's state file and WAL.
pub(crate) fn register_queue_gauges(cages: &[PreparedCage]) {
    let figures = Arc::new(QueueFigures::default());
    type Pick = fn(&rustomnic_queue::QueueFigures) -> f64;
    let gauges: [(&str, &str, Pick); 4] = [
        ("pmnc_queue_depth", "durable calls waiting to run", |f| f.depth as f64),
        ("pmnc_queue_oldest_age_seconds", "age of the oldest waiting durable call", |f| f.oldest_age),
        ("pmnc_queue_retrying", "waiting durable calls that failed at least once", |f| f.retrying as f64),
        ("pmnc_queue_dead_letters", "durable calls that expired (dead letters)", |f| f.dead as f64),
    ];
    // The state file and its WAL, which the queue keeps bounded (docs/decisions/038).
    type Size = fn((u64, u64)) -> u64;
    let sizes: [(&str, &str, Size); 2] = [
        ("pmnc_state_wal_bytes", "bytes of the WAL of the cage's state file (queue and state)", |(wal, _)| wal),
        ("pmnc_state_file_bytes", "bytes of the cage's state file (queue and state), without its WAL", |(_, file)| file),
    ];
    for c in cages {
        for (name, help, pick) in sizes {
            let cage = c.config.name.clone();
            rustomnic_core::metrics::register_gauge(name, help, &[("cage", &c.config.name)], move || {
                rustomnic_queue::file_sizes(&cage).map(pick).unwrap_or(0) as f64
            });
        }
    }
    for c in cages {
        for q in &c.config.queues {
            for (name, help, pick) in gauges {
                let (figures, cage, queue) = (figures.clone(), c.config.name.clone(), q.name.clone());
                rustomnic_core::metrics::register_gauge(name, help, &[("cage", &c.config.name), ("queue", &q.name)], move || figures.get(&cage, &queue, pick));
            }
        }
    }
}
