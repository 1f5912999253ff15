//! Alert rules: evaluated every second, de-duplicated (a rule fires once while its condition
//! holds, again only after it cleared and came back, and never twice within `repeat`), and
//! delivered to a module function through an [`AlertSink`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use rustomnic_core::metrics::{self, Event, Gauge};
use rustomnic_core::Value;

use crate::cluster::Instance;
use crate::config::{AlertKind, AlertRule};
use crate::series::Store;

/// The gauge a queue registers for the age of its oldest call (see docs/monitoring.md).
pub const QUEUE_AGE_GAUGE: &str = "pmnc_queue_oldest_age_seconds";
/// error_rate looks at the mean errors per second over this many one-second samples.
pub const ERROR_RATE_WINDOW: usize = 10;

/// One firing of a rule, as the target function receives it (a table).
#[derive(Debug, Clone, PartialEq)]
pub struct Alert {
    pub rule: String,
    pub kind: AlertKind,
    /// The cage watched.
    pub cage: String,
    /// The interface, queue, module or instance the condition is about.
    pub subject: String,
    pub value: f64,
    pub threshold: f64,
    pub message: String,
    /// When the condition started to hold, Unix seconds.
    pub since: f64,
    pub fired_at: f64,
}

impl Alert {
    pub fn to_value(&self) -> Value {
        let s = |k: &str, v: &str| (Value::str(k), Value::str(v));
        let f = |k: &str, v: f64| (Value::str(k), Value::Float(if v.is_finite() { v } else { 0.0 }));
        Value::Map(vec![
            s("alert", &self.rule),
            s("kind", self.kind.as_str()),
            s("cage", &self.cage),
            s("subject", &self.subject),
            f("value", self.value),
            f("threshold", self.threshold),
            s("message", &self.message),
            f("since", self.since),
            f("fired_at", self.fired_at),
        ])
    }
}

/// Delivers alerts to `target` (cage, module, function).
pub trait AlertSink: Send + Sync {
    /// Delivers `alert` of `rule` to the rule's target: a direct call, or a durable call on the
    /// rule's `durable_queue`.
    fn deliver(&self, rule: &AlertRule, alert: Alert) -> BoxFuture<'static, Result<(), String>>;
}

/// A job run on a worker thread, inside its `LocalSet` (so it may `spawn_local`).
pub type WorkerJob = Box<dyn FnOnce() + Send>;

/// Hands each alert to a worker thread of this process, which calls the target function there
/// with `rustomnic_lua::worker::call` (in this process or, once a transport is set, remotely).
pub struct InProcessSink {
    submit: Arc<dyn Fn(WorkerJob) -> Result<(), String> + Send + Sync>,
    timeout: Duration,
}

impl InProcessSink {
    /// `submit` runs a job on some worker thread (it fails when none is left).
    pub fn new(submit: impl Fn(WorkerJob) -> Result<(), String> + Send + Sync + 'static, timeout: Duration) -> InProcessSink {
        InProcessSink { submit: Arc::new(submit), timeout }
    }
}

impl AlertSink for InProcessSink {
    fn deliver(&self, rule: &AlertRule, alert: Alert) -> BoxFuture<'static, Result<(), String>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (cage, module, function) = rule.target.clone();
        let target = format!("{cage}.{module}.{function}");
        let job: WorkerJob = match &rule.durable_queue {
            // Stored in the target cage's queue (or, for a cage elsewhere, in the owner cage's
            // outbox) and retried there: an alert survives a target that is down.
            Some(queue) => {
                let call = rustomnic_lua::durable::DurableCall {
                    from_cage: rule.owner.clone(),
                    cage,
                    module,
                    function,
                    args: vec![alert.to_value()],
                    options: rustomnic_lua::durable::CallOptions {
                        queue: queue.clone(),
                        // One call per firing, however often delivery is tried.
                        id: Some(format!("alert-{}-{}-{}", rule.owner, rule.name, (alert.fired_at * 1000.0) as i64)),
                        ..Default::default()
                    },
                };
                Box::new(move || {
                    tokio::task::spawn_local(async move {
                        let _ = tx.send(rustomnic_lua::durable::enqueue(call).await.map(|_| ()));
                    });
                })
            }
            None => {
                let request = rustomnic_lua::CallRequest {
                    from_cage: "pmnc-monitor".into(),
                    request_id: rustomnic_lua::new_request_id(),
                    deadline: Instant::now() + self.timeout,
                    cage,
                    module,
                    function,
                    args: vec![alert.to_value()],
                };
                Box::new(move || {
                    tokio::task::spawn_local(async move {
                        let _ = tx.send(rustomnic_lua::worker::call(request).await.map(|_| ()).map_err(|e| e.to_string()));
                    });
                })
            }
        };
        let submitted = (self.submit)(job);
        Box::pin(async move {
            submitted.map_err(|e| format!("alert to {target}: {e}"))?;
            match rx.await {
                Ok(r) => r,
                Err(_) => Err(format!("alert to {target}: the worker thread went away before the call ended")),
            }
        })
    }
}

#[derive(Debug, Default, Clone)]
struct RuleState {
    since: Option<(Instant, f64)>,
    fired: bool,
    last_fired: Option<Instant>,
    fired_count: u64,
    last_value: f64,
}

/// What the rules look at.
pub struct Inputs<'a> {
    pub store: &'a Store,
    /// None when not clustered.
    pub instances: Option<&'a [Instance]>,
    pub broken: &'a [Event],
    pub gauges: &'a [Gauge],
}

pub struct Alerts {
    rules: Vec<AlertRule>,
    state: Vec<RuleState>,
}

impl Alerts {
    pub fn new(rules: Vec<AlertRule>) -> Alerts {
        let state = vec![RuleState::default(); rules.len()];
        Alerts { rules, state }
    }

    /// Checks every rule at `now`; returns the alerts to deliver with their targets.
    pub fn evaluate(&mut self, now: Instant, now_unix: f64, inputs: &Inputs<'_>) -> Vec<(AlertRule, Alert)> {
        let mut out = Vec::new();
        for (rule, state) in self.rules.iter().zip(self.state.iter_mut()) {
            let Some((value, subject, message)) = condition(rule, inputs) else {
                state.since = None;
                state.fired = false;
                continue;
            };
            state.last_value = value;
            let (since, since_unix) = *state.since.get_or_insert((now, now_unix));
            let held = now.duration_since(since) >= rule.hold;
            let rested = state.last_fired.is_none_or(|l| now.duration_since(l) >= rule.repeat);
            if !state.fired && held && rested {
                state.fired = true;
                state.last_fired = Some(now);
                state.fired_count += 1;
                let alert = Alert {
                    rule: rule.name.clone(),
                    kind: rule.kind,
                    cage: rule.cage.clone().unwrap_or_default(),
                    subject,
                    value,
                    threshold: rule.threshold,
                    message,
                    since: since_unix,
                    fired_at: now_unix,
                };
                out.push((rule.clone(), alert));
            }
        }
        out
    }

    pub fn to_json(&self) -> serde_json::Value {
        let rules: Vec<serde_json::Value> = self
            .rules
            .iter()
            .zip(&self.state)
            .map(|(r, s)| {
                serde_json::json!({
                    "name": r.name,
                    "owner": r.owner,
                    "kind": r.kind.as_str(),
                    "cage": r.cage,
                    "threshold": r.threshold,
                    "active": s.since.is_some(),
                    "since": s.since.map(|(_, u)| u),
                    "fired": s.fired_count,
                    "value": s.last_value,
                    "target": format!("{}.{}.{}", r.target.0, r.target.1, r.target.2),
                })
            })
            .collect();
        serde_json::Value::Array(rules)
    }
}

/// (value, subject, message) when the rule's condition holds.
fn condition(rule: &AlertRule, inputs: &Inputs<'_>) -> Option<(f64, String, String)> {
    let cage = rule.cage.as_deref().unwrap_or("");
    match rule.kind {
        AlertKind::ErrorRate => {
            let prefix = format!("interface/{cage}/");
            let mut total = 0.0;
            let mut worst = (String::new(), 0.0);
            for name in inputs.store.names() {
                let Some(interface) = name.strip_prefix(&prefix).and_then(|r| r.strip_suffix("/errors_per_s")) else { continue };
                if rule.subject.as_deref().is_some_and(|s| s != interface) {
                    continue;
                }
                let rate = inputs.store.recent_mean(name, ERROR_RATE_WINDOW).unwrap_or(0.0);
                total += rate;
                if rate > worst.1 {
                    worst = (interface.to_string(), rate);
                }
            }
            (total > rule.threshold).then(|| {
                (
                    total,
                    worst.0.clone(),
                    format!(
                        "cage {cage}: {total:.2} errors/s over the last {ERROR_RATE_WINDOW} s (threshold {}), most on interface {}",
                        rule.threshold, worst.0
                    ),
                )
            })
        }
        AlertKind::QueueAge => {
            let mut worst: Option<(f64, String)> = None;
            for g in inputs.gauges.iter().filter(|g| g.name == QUEUE_AGE_GAUGE && g.label("cage") == cage) {
                if rule.subject.as_deref().is_some_and(|q| q != g.label("queue")) {
                    continue;
                }
                let age = (g.read)();
                if age > rule.threshold && worst.as_ref().is_none_or(|(w, _)| age > *w) {
                    worst = Some((age, g.label("queue").to_string()));
                }
            }
            worst.map(|(age, queue)| {
                (age, queue.clone(), format!("cage {cage}: the oldest call of queue {queue} is {age:.0} s old (threshold {} s)", rule.threshold))
            })
        }
        AlertKind::ModuleError => {
            let broken: Vec<&Event> = inputs.broken.iter().filter(|e| e.cage == cage).collect();
            let first = broken.first()?;
            let text: Vec<&str> = broken.iter().map(|e| e.message.as_str()).collect();
            Some((broken.len() as f64, first.subject.clone(), format!("cage {cage}: {} module(s) failed to load: {}", broken.len(), text.join("; "))))
        }
        AlertKind::CageDown => {
            let instances = inputs.instances?;
            match rule.cage.as_deref() {
                Some(cage) => {
                    let mine: Vec<&Instance> = instances.iter().filter(|i| i.cage == cage).collect();
                    if mine.iter().any(|i| i.up) {
                        return None;
                    }
                    let what = if mine.is_empty() { "no instance is known".to_string() } else { format!("all {} instance(s) are down", mine.len()) };
                    Some((mine.len() as f64, cage.to_string(), format!("cage {cage} is down: {what}")))
                }
                None => {
                    let down: Vec<&Instance> = instances.iter().filter(|i| !i.up).collect();
                    let first = down.first()?;
                    let names: Vec<String> = down.iter().map(|i| format!("{} ({} on {})", i.cage, i.instance, i.host)).collect();
                    Some((down.len() as f64, first.cage.clone(), format!("instances down: {}", names.join(", "))))
                }
            }
        }
    }
}

/// Everything the rules need, read now.
pub fn broken_and_gauges() -> (Vec<Event>, Vec<Gauge>) {
    (metrics::broken_modules(), metrics::gauges())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::sample_instance;

    fn rule(kind: AlertKind, cage: Option<&str>, threshold: f64, hold: u64, repeat: u64) -> AlertRule {
        AlertRule {
            name: "r".into(),
            owner: "web".into(),
            kind,
            cage: cage.map(String::from),
            subject: None,
            threshold,
            hold: Duration::from_secs(hold),
            repeat: Duration::from_secs(repeat),
            target: ("ops".into(), "alerts".into(), "receive".into()),
            target_at: String::new(),
            durable_queue: None,
        }
    }

    fn inputs<'a>(store: &'a Store, instances: Option<&'a [Instance]>, broken: &'a [Event], gauges: &'a [Gauge]) -> Inputs<'a> {
        Inputs { store, instances, broken, gauges }
    }

    #[test]
    fn fires_once_while_it_holds_and_again_after_it_clears() {
        let store = Store::new();
        let mut alerts = Alerts::new(vec![rule(AlertKind::CageDown, Some("worker"), 0.0, 2, 0)]);
        let t0 = Instant::now();
        let down = vec![sample_instance("worker", "a", false)];
        let up = vec![sample_instance("worker", "a", true)];
        let at = |s: u64| t0 + Duration::from_secs(s);
        // Held for less than `for`: nothing yet.
        assert!(alerts.evaluate(at(0), 0.0, &inputs(&store, Some(&down), &[], &[])).is_empty());
        assert!(alerts.evaluate(at(1), 1.0, &inputs(&store, Some(&down), &[], &[])).is_empty());
        let fired = alerts.evaluate(at(2), 2.0, &inputs(&store, Some(&down), &[], &[]));
        assert_eq!(fired.len(), 1);
        assert_eq!(fired[0].1.since, 0.0);
        assert!(fired[0].1.message.contains("all 1 instance(s) are down"), "{}", fired[0].1.message);
        // Still down: no repeat.
        for s in 3..10 {
            assert!(alerts.evaluate(at(s), s as f64, &inputs(&store, Some(&down), &[], &[])).is_empty());
        }
        // Up, then down again: fires again after `for`.
        assert!(alerts.evaluate(at(10), 10.0, &inputs(&store, Some(&up), &[], &[])).is_empty());
        assert!(alerts.evaluate(at(11), 11.0, &inputs(&store, Some(&down), &[], &[])).is_empty());
        assert_eq!(alerts.evaluate(at(13), 13.0, &inputs(&store, Some(&down), &[], &[])).len(), 1);
        // Not clustered: a cage_down rule never holds.
        assert!(alerts.evaluate(at(20), 20.0, &inputs(&store, None, &[], &[])).is_empty());
        assert_eq!(alerts.to_json()[0]["fired"], 2);
    }

    #[test]
    fn repeat_interval_holds_back_a_flapping_condition() {
        let store = Store::new();
        let mut alerts = Alerts::new(vec![rule(AlertKind::CageDown, None, 0.0, 0, 60)]);
        let t0 = Instant::now();
        let down = vec![sample_instance("worker", "a", false), sample_instance("web", "b", true)];
        let up = vec![sample_instance("worker", "a", true)];
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert_eq!(alerts.evaluate(at(0), 0.0, &inputs(&store, Some(&down), &[], &[])).len(), 1);
        assert!(alerts.evaluate(at(1), 1.0, &inputs(&store, Some(&up), &[], &[])).is_empty());
        // Flaps back within the repeat interval: held back while it holds...
        assert!(alerts.evaluate(at(2), 2.0, &inputs(&store, Some(&down), &[], &[])).is_empty());
        assert!(alerts.evaluate(at(59), 59.0, &inputs(&store, Some(&down), &[], &[])).is_empty());
        // ...and sent once the interval has passed, if it still holds.
        let fired = alerts.evaluate(at(60), 60.0, &inputs(&store, Some(&down), &[], &[]));
        assert_eq!(fired.len(), 1);
        assert_eq!(fired[0].1.subject, "worker");
        assert_eq!(fired[0].1.since, 2.0);
    }

    #[test]
    fn error_rate_module_error_and_queue_age() {
        let mut store = Store::new();
        for i in 0..10 {
            store.push(
                i as f64,
                vec![("interface/web/http/errors_per_s".into(), if i < 5 { 0.0 } else { 2.0 }), ("interface/api/http/errors_per_s".into(), 9.0)],
            );
        }
        let t = Instant::now();
        let mut alerts = Alerts::new(vec![rule(AlertKind::ErrorRate, Some("web"), 0.9, 0, 0)]);
        let fired = alerts.evaluate(t, 0.0, &inputs(&store, None, &[], &[]));
        assert_eq!(fired.len(), 1, "mean 1.0 errors/s > 0.9");
        assert_eq!(fired[0].1.value, 1.0);
        assert_eq!(fired[0].1.subject, "http");
        let mut alerts = Alerts::new(vec![rule(AlertKind::ErrorRate, Some("web"), 1.0, 0, 0)]);
        assert!(alerts.evaluate(t, 0.0, &inputs(&store, None, &[], &[])).is_empty(), "1.0 is not above 1.0");

        let broken = vec![Event {
            time: 0.0,
            kind: metrics::EventKind::ModuleError,
            cage: "web".into(),
            subject: "util".into(),
            message: "web/util.lua:3: unexpected symbol".into(),
            request_id: String::new(),
        }];
        let mut alerts = Alerts::new(vec![rule(AlertKind::ModuleError, Some("web"), 0.0, 0, 0), rule(AlertKind::ModuleError, Some("api"), 0.0, 0, 0)]);
        let fired = alerts.evaluate(t, 0.0, &inputs(&store, None, &broken, &[]));
        assert_eq!(fired.len(), 1);
        assert!(fired[0].1.message.contains("web/util.lua:3:"), "{}", fired[0].1.message);
        let v = fired[0].1.to_value();
        assert_eq!(v.get("kind").and_then(|k| k.as_str()), Some("module_error"));
        assert_eq!(v.get("subject").and_then(|k| k.as_str()), Some("util"));

        let gauge = |queue: &str, age: f64| Gauge {
            id: 0,
            name: QUEUE_AGE_GAUGE.into(),
            help: String::new(),
            labels: vec![("cage".into(), "web".into()), ("queue".into(), queue.into())],
            read: Arc::new(move || age),
        };
        let gauges = vec![gauge("retry", 30.0), gauge("mail", 120.0)];
        let mut alerts = Alerts::new(vec![rule(AlertKind::QueueAge, Some("web"), 60.0, 0, 0)]);
        let fired = alerts.evaluate(t, 0.0, &inputs(&store, None, &[], &gauges));
        assert_eq!(fired.len(), 1);
        assert_eq!((fired[0].1.subject.as_str(), fired[0].1.value), ("mail", 120.0));
    }

    #[test]
    fn in_process_sink_calls_the_target_on_a_worker_thread() {
        // A "worker thread": a LocalSet with a cage VM installed, running the jobs it is sent.
        let (jobs_tx, mut jobs_rx) = tokio::sync::mpsc::unbounded_channel::<WorkerJob>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<String>();
        let worker = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            let local = tokio::task::LocalSet::new();
            local.block_on(&rt, async move {
                let vm = rustomnic_lua::CageVm::new("ops").expect("vm");
                let source = "local M = {}\nfunction M.receive(alert)\n  if alert.kind ~= 'module_error' then error('wrong kind ' .. tostring(alert.kind)) end\n  return alert.subject\nend\nreturn M\n";
                let path = std::path::Path::new("ops/alerts.lua");
                let bytecode = rustomnic_lua::compile("alerts", path, "ops/alerts.lua", source.as_bytes()).expect("compile");
                let module = rustomnic_lua::CompiledModule {
                    name: "alerts".into(),
                    path: path.to_path_buf(),
                    display: "ops/alerts.lua".into(),
                    bytecode,
                    functions: vec!["receive".into()],
                    version: 1,
                    source_hash: 0,
                };
                vm.install(&module).expect("install");
                rustomnic_lua::worker::install(std::rc::Rc::new(vm));
                let _ = ready_tx.send("ready".into());
                while let Some(job) = jobs_rx.recv().await {
                    job();
                }
                rustomnic_lua::worker::clear();
            });
        });
        assert_eq!(ready_rx.recv_timeout(Duration::from_secs(10)).ok().as_deref(), Some("ready"));
        let sink = InProcessSink::new(move |job| jobs_tx.send(job).map_err(|_| "no worker left".to_string()), Duration::from_secs(5));
        let alert = |kind| Alert {
            rule: "r".into(),
            kind,
            cage: "web".into(),
            subject: "util".into(),
            value: 1.0,
            threshold: 0.0,
            message: "m".into(),
            since: 0.0,
            fired_at: 0.0,
        };
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let to = |cage: &str, module: &str, function: &str| AlertRule {
            target: (cage.into(), module.into(), function.into()),
            ..rule(AlertKind::ModuleError, None, 0.0, 0, 0)
        };
        let ok = rt.block_on(sink.deliver(&to("ops", "alerts", "receive"), alert(AlertKind::ModuleError)));
        assert_eq!(ok, Ok(()));
        let failed = rt.block_on(sink.deliver(&to("ops", "alerts", "receive"), alert(AlertKind::CageDown)));
        assert!(failed.as_ref().is_err_and(|e| e.contains("wrong kind cage_down")), "{failed:?}");
        let missing = rt.block_on(sink.deliver(&to("nowhere", "a", "b"), alert(AlertKind::ModuleError)));
        assert!(missing.as_ref().is_err_and(|e| e.contains("no cage named nowhere")), "{missing:?}");
        drop(sink);
        let _ = worker.join();
    }
}
