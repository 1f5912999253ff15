//! The `celery` interface: a cage serves Celery tasks. Task messages (protocol 2, protocol 1
//! accepted; JSON only) are taken from a Redis broker's queues the way kombu's Redis transport
//! does it (redis_broker), or consumed from RabbitMQ queues (amqp_broker); each task runs as a
//! request of the module function its name maps to (tasks), and its result is written in
//! Celery's own format to the Redis result backend or the client's reply queue (the RPC
//! backend), so that Python's `AsyncResult.get()` returns it. See docs/interfaces/celery.md and
//! decisions 132 and 133.
//!
//! ```toml
//! [interfaces.tasks]
//! protocol = "celery"
//! broker = "redis://127.0.0.1:6379/0"   # required; redis:// or amqp://
//! tasks = ["billing.charge"]            # required: the tasks this cage serves, by name
//! # or, for names that are not module.function of this cage:
//! # tasks = { "proj.tasks.add" = "math.add" }
//! queues = ["celery"]                   # default ["celery"]
//! concurrency = 16                      # tasks run at once
//! result_backend = "redis://127.0.0.1:6379/0"  # default: the broker on Redis, "rpc://" on
//!                                       # AMQP; "none": no results
//! prefetch = 64                         # AMQP: messages delivered ahead (default 4 x concurrency);
//!                                       # on AMQP both are split over the worker threads
//! result_expires = "1d"                 # how long results are kept
//! visibility_timeout = "1h"             # a taken, unacknowledged task goes back after this
//! max_message_size = "1MiB"             # bigger task bodies fail with a clear error
//! request_timeout = "30s"               # a task's deadline (or its time_limit if shorter)
//! send_events = false                   # Celery's monitoring events, for Flower (celery -E)
//! hostname = "cage@host"                # the worker's name in events (default <cage>@<host>)
//! ```

mod amqp_broker;
mod events;
mod redis_broker;
mod tasks;

use std::sync::Arc;
use std::time::Duration;

use rustomnic_core::{Located, Section};
use rustomnic_interface::{Host, Interface, InterfaceProtocol, InterfaceSpec};
use rustomnic_resource_celery::{parse_broker, read_backend, Backend, Broker};

pub use rustomnic_resource_celery::amqp::{headers_table, table_json};
pub use rustomnic_resource_celery::message::{envelope, restored, task, unacked_entry, Message, Refusal, Task};

/// The largest `max_message_size`.
const MAX_MESSAGE_SIZE_LIMIT: u64 = 512 << 20;

/// The `celery` protocol.
pub struct CeleryProtocol;

/// A task name and the (module, function) it runs, located at the `tasks` key.
pub(crate) type TaskRoute = (String, Located<(String, String)>);

/// A configured celery interface.
pub struct CeleryInterface {
    spec: InterfaceSpec,
    pub(crate) broker: Broker,
    pub(crate) backend: Backend,
    pub(crate) prefetch: u16,
    pub(crate) queues: Vec<String>,
    pub(crate) tasks: Vec<TaskRoute>,
    pub(crate) concurrency: usize,
    pub(crate) result_expires: Duration,
    pub(crate) visibility_timeout: Duration,
    pub(crate) max_message_size: usize,
    /// The worker's name in monitoring events, when they are sent.
    pub(crate) events: Option<String>,
}

impl CeleryInterface {
    /// The handler of task `name`, if this interface serves it.
    pub(crate) fn handler(&self, name: &str) -> Option<&(String, String)> {
        self.tasks.iter().find(|(n, _)| n == name).map(|(_, h)| &h.value)
    }
}

/// `module.function`, or why not.
fn split_handler(text: &str) -> Result<(String, String), String> {
    match text.split_once('.') {
        Some((m, f)) if !m.is_empty() && !f.is_empty() && !f.contains('.') && !f.starts_with('_') => Ok((m.to_string(), f.to_string())),
        _ => Err(format!("{text:?} is not \"module.function\" of this cage (a public function)")),
    }
}

impl InterfaceProtocol for CeleryProtocol {
    fn name(&self) -> &'static str {
        "celery"
    }

    fn configure(&self, spec: InterfaceSpec, section: &Section) -> Option<Arc<dyn Interface>> {
        // Every key is read before giving up, so that all problems are listed at once.
        let broker = section.required_parsed("broker", "\"redis://127.0.0.1:6379/0\"", parse_broker);
        let backend = read_backend(section, broker.as_ref());
        let tasks = read_tasks(section);
        let queues = match section.strings("queues") {
            Some(q) if q.value.is_empty() || q.value.iter().any(|n| n.is_empty() || n.contains('\u{6}') || n.len() > 200) => {
                section.error("queues", "give one or more queue names, e.g. queues = [\"celery\"]");
                None
            }
            Some(q) => Some(q.value),
            None if section.has("queues") => None,
            None => Some(vec!["celery".to_string()]),
        };
        let concurrency = section.integer("concurrency", 1, 10_000).map(|v| v.value as usize).unwrap_or(16);
        let day = Duration::from_secs(86_400);
        let result_expires = section.duration("result_expires", 365 * day).map(|v| v.value).unwrap_or(day);
        let visibility_timeout = section.duration("visibility_timeout", 7 * day).map(|v| v.value).unwrap_or(Duration::from_secs(3600));
        if visibility_timeout < Duration::from_secs(1) {
            section.error("visibility_timeout", "must be at least 1s");
        }
        let prefetch = section.integer("prefetch", 1, 65_535).map(|v| v.value as u16).unwrap_or_else(|| (concurrency * 4).clamp(1, 65_535) as u16);
        if matches!(broker, Some(Broker::Redis(_))) && section.has("prefetch") {
            section.error("prefetch", "is for an AMQP broker; a Redis broker takes as many messages as there are free slots");
        }
        let max_message_size = section.size("max_message_size", MAX_MESSAGE_SIZE_LIMIT).map(|v| v.value as usize).unwrap_or(1 << 20);
        let send_events = section.bool("send_events").map(|v| v.value).unwrap_or(false);
        let hostname = match section.string("hostname") {
            Some(h) if h.value.is_empty() || h.value.len() > 200 || h.value.chars().any(char::is_control) => {
                section.error("hostname", "must be a worker name such as \"billing@host1\" (at most 200 characters)");
                None
            }
            Some(h) => Some(h.value),
            None => Some(format!("{}@{}", spec.cage, rustomnic_core::hostname())),
        };
        let events = send_events.then_some(hostname).flatten();
        let (Some(broker), Some(backend), Some(tasks), Some(queues)) = (broker, backend, tasks, queues) else { return None };
        Some(Arc::new(CeleryInterface {
            spec,
            broker,
            backend,
            prefetch,
            queues,
            tasks,
            concurrency,
            result_expires,
            visibility_timeout,
            max_message_size,
            events,
        }))
    }
}

/// `tasks`: a list of names that are `module.function` of the cage, or a table from task names
/// to `module.function`.
fn read_tasks(section: &Section) -> Option<Vec<TaskRoute>> {
    let example = "tasks = [\"billing.charge\"] or tasks = { \"proj.tasks.add\" = \"math.add\" }";
    let at: (std::path::PathBuf, usize, String);
    let pairs: Vec<(String, String)> = match section.kind_of("tasks") {
        None => {
            section.table_error(format!("tasks is required: the Celery task names this cage serves, e.g. {example}"));
            return None;
        }
        Some("array") => {
            let l = section.strings("tasks")?;
            at = (l.file, l.line, l.key);
            l.value.into_iter().map(|n| (n.clone(), n)).collect()
        }
        Some("table" | "inline table") => {
            let l = section.string_map("tasks")?;
            at = (l.file, l.line, l.key);
            l.value
        }
        Some(other) => {
            section.error("tasks", format!("is a {other}; give a list or a table, e.g. {example}"));
            return None;
        }
    };
    if pairs.is_empty() {
        section.error("tasks", format!("names no task; e.g. {example}"));
        return None;
    }
    let mut out = Vec::with_capacity(pairs.len());
    let mut ok = true;
    for (name, target) in pairs {
        match split_handler(&target) {
            Ok(h) => out.push((name, Located { value: h, file: at.0.clone(), line: at.1, key: at.2.clone() })),
            Err(e) => {
                section.error("tasks", format!("task {name:?}: {e}"));
                ok = false;
            }
        }
    }
    ok.then_some(out)
}

impl Interface for CeleryInterface {
    fn spec(&self) -> &InterfaceSpec {
        &self.spec
    }

    fn handlers(&self) -> Vec<Located<(String, String)>> {
        self.tasks.iter().map(|(_, h)| h.clone()).collect()
    }

    fn start(self: Arc<Self>, host: Host) {
        let me = self.clone();
        match self.broker.clone() {
            Broker::Redis(url) => rustomnic_interface::consumer::spawn(&self.spec, move || redis_broker::run(me, host, url)),
            // A session on each worker (decision 162): no thread hands tasks to workers and
            // their outcomes back.
            Broker::Amqp(url) => {
                let shares = amqp_broker::shares(self.concurrency, host.workers());
                let (refused, outage, counters) = (Arc::new(std::sync::Mutex::new(Default::default())), Default::default(), Arc::new(Default::default()));
                host.spawn_on_each(|worker| {
                    let concurrency = shares.get(worker).copied().unwrap_or(0);
                    if concurrency == 0 {
                        return Box::new(|| Box::pin(async {}));
                    }
                    let prefetch = (usize::from(self.prefetch) * concurrency).div_ceil(self.concurrency).clamp(1, usize::from(u16::MAX)) as u16;
                    let part = amqp_broker::Part {
                        worker,
                        concurrency,
                        prefetch,
                        refused: refused.clone(),
                        outage: Clone::clone(&outage),
                        counters: Arc::clone(&counters),
                    };
                    let (me, host, url) = (me.clone(), host.clone(), url.clone());
                    Box::new(move || Box::pin(amqp_broker::run(me, host, url, part)))
                });
            }
        }
    }
}

/// The Redis result backend's connection, or no results (a session's start).
pub(crate) async fn redis_results(iface: &CeleryInterface) -> Result<tasks::Results, String> {
    match &iface.backend {
        Backend::Redis(url) => {
            let conn = rustomnic_resource_celery::redis_connect(url).await.map_err(|e| format!("result backend {e}"))?;
            Ok(tasks::Results::Redis(tasks::RedisResults::start(conn, iface.result_expires)))
        }
        _ => Ok(tasks::Results::None),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn urls_and_handlers() {
        assert!(matches!(parse_broker("redis://127.0.0.1:6379/0").unwrap(), Broker::Redis(_)));
        let Broker::Amqp(u) = parse_broker("amqp://guest:secret@h//").unwrap() else { panic!() };
        assert_eq!(u.display, "h:5672/%2f");
        let Broker::Amqp(u) = parse_broker("pyamqp://guest@h:5673/v").unwrap() else { panic!() };
        assert_eq!(u.display, "h:5673/v");
        assert!(parse_broker("http://x").unwrap_err().contains("not a redis:// or amqp:// URL"));
        assert!(!parse_broker("http://u:secret@x").unwrap_err().contains("secret"));
        assert_eq!(split_handler("math.add").unwrap(), ("math".into(), "add".into()));
        for bad in ["add", "a.b.c", ".x", "m.", "m._private"] {
            assert!(split_handler(bad).is_err(), "{bad}");
        }
    }
}
