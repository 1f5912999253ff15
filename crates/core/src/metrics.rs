//! Process-wide figures for monitoring: per-interface request counters and latency histograms,
//! Lua VM memory, reloads and module errors, recent request errors, and gauges other crates
//! register (queues). Recording is atomics only; the locks here are taken when a series is
//! first created, on error paths and by the monitor's once-a-second sampler.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

/// Upper bounds (seconds) of the Prometheus latency buckets, the client libraries' defaults with
/// a sub-millisecond one added: most Lua handlers answer in well under a millisecond.
pub const PROMETHEUS_BUCKETS: [f64; 14] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Fine buckets: four per power of two of microseconds (about 19% wide), 2^40 µs at most.
const FINE_BUCKETS: usize = 41 * 4;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64()
}

/// A latency histogram two ways: coarse buckets for Prometheus and fine log-scale buckets from
/// which the monitor reads percentiles. Lock-free; every observation is three atomic adds.
pub struct Histogram {
    prometheus: [AtomicU64; PROMETHEUS_BUCKETS.len() + 1],
    fine: Box<[AtomicU64]>,
    sum_us: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            prometheus: std::array::from_fn(|_| AtomicU64::new(0)),
            fine: (0..FINE_BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            sum_us: AtomicU64::new(0),
        }
    }
}

impl std::fmt::Debug for Histogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let count = self.cumulative().last().copied().unwrap_or(0);
        write!(f, "Histogram {{ count: {count}, sum: {}s }}", self.sum_seconds())
    }
}

/// The fine bucket of `us` microseconds.
fn fine_index(us: u64) -> usize {
    if us < 4 {
        return us as usize;
    }
    let exp = 63 - us.leading_zeros() as usize;
    let sub = ((us >> (exp - 2)) & 3) as usize;
    (exp * 4 + sub).min(FINE_BUCKETS - 1)
}

/// The range of fine bucket `i` in microseconds: [low, high).
fn fine_range(i: usize) -> (f64, f64) {
    if i < 4 {
        return (i as f64, i as f64 + 1.0);
    }
    let (exp, sub) = (i / 4, i % 4);
    let low = ((4 + sub) as f64) * 2f64.powi(exp as i32 - 2);
    let high = ((5 + sub) as f64) * 2f64.powi(exp as i32 - 2);
    (low, high)
}

impl Histogram {
    pub fn observe_us(&self, us: u64) {
        let secs = us as f64 / 1e6;
        let slot = PROMETHEUS_BUCKETS.iter().position(|le| secs <= *le).unwrap_or(PROMETHEUS_BUCKETS.len());
        self.prometheus[slot].fetch_add(1, Ordering::Relaxed);
        self.fine[fine_index(us)].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// Cumulative counts per [`PROMETHEUS_BUCKETS`] bound, then +Inf (the total).
    pub fn cumulative(&self) -> Vec<u64> {
        let mut total = 0;
        self.prometheus
            .iter()
            .map(|c| {
                total += c.load(Ordering::Relaxed);
                total
            })
            .collect()
    }

    pub fn sum_seconds(&self) -> f64 {
        self.sum_us.load(Ordering::Relaxed) as f64 / 1e6
    }

    /// The fine bucket counts now; the difference of two is the histogram of that interval.
    pub fn fine_counts(&self) -> Vec<u64> {
        self.fine.iter().map(|c| c.load(Ordering::Relaxed)).collect()
    }
}

/// The `q` quantile (0..=1) in seconds of fine bucket counts, interpolated inside its bucket;
/// None without observations.
pub fn quantile(counts: &[u64], q: f64) -> Option<f64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = (q.clamp(0.0, 1.0) * total as f64).max(1.0);
    let mut seen = 0u64;
    for (i, c) in counts.iter().enumerate() {
        if *c == 0 {
            continue;
        }
        if (seen + c) as f64 >= rank {
            let (low, high) = fine_range(i);
            let within = (rank - seen as f64) / *c as f64;
            return Some((low + (high - low) * within) / 1e6);
        }
        seen += c;
    }
    let (_, high) = fine_range(counts.len().saturating_sub(1));
    Some(high / 1e6)
}

/// The figures of one interface of one cage (the pseudo-interface "pmnc" counts calls from
/// other cages).
#[derive(Default)]
pub struct InterfaceMetrics {
    /// Requests that ended, however they ended.
    pub requests: AtomicU64,
    /// Requests that failed: an error, a missing handler or a passed deadline.
    pub errors: AtomicU64,
    pub timeouts: AtomicU64,
    /// Requests dropped before they ended (the client went away).
    pub cancelled: AtomicU64,
    pub in_flight: AtomicI64,
    pub latency: Histogram,
}

type Key = (String, String);

static INTERFACES: Mutex<BTreeMap<Key, Arc<InterfaceMetrics>>> = Mutex::new(BTreeMap::new());

/// The figures of `interface` of `cage`, made on first use.
pub fn interface(cage: &str, interface: &str) -> Arc<InterfaceMetrics> {
    lock(&INTERFACES).entry((cage.to_string(), interface.to_string())).or_default().clone()
}

/// Every interface's figures: (cage, interface, figures).
pub fn interfaces() -> Vec<(String, String, Arc<InterfaceMetrics>)> {
    lock(&INTERFACES).iter().map(|((c, i), m)| (c.clone(), i.clone(), m.clone())).collect()
}

/// Responses of one route of an HTTP interface (route "" for requests no route table served),
/// counted by status class: 1xx to 5xx.
#[derive(Default, Debug)]
pub struct StatusCounts {
    pub classes: [AtomicU64; 5],
}

impl StatusCounts {
    /// Counts one response with `status`; a status outside 100..=599 counts nowhere.
    pub fn record(&self, status: u16) {
        if let Some(c) = (status / 100).checked_sub(1).and_then(|i| self.classes.get(i as usize)) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }
}

type RouteKey = (String, String, String);

static STATUSES: Mutex<BTreeMap<RouteKey, Arc<StatusCounts>>> = Mutex::new(BTreeMap::new());

/// The status counts of `route` of `interface` of `cage`, made on first use. Callers keep the
/// handle: this takes a process-wide lock.
pub fn status_counts(cage: &str, interface: &str, route: &str) -> Arc<StatusCounts> {
    lock(&STATUSES).entry((cage.to_string(), interface.to_string(), route.to_string())).or_default().clone()
}

/// Every route's status counts: (cage, interface, route, counts).
pub fn all_status_counts() -> Vec<(String, String, String, Arc<StatusCounts>)> {
    lock(&STATUSES).iter().map(|((c, i, r), m)| (c.clone(), i.clone(), r.clone(), m.clone())).collect()
}

/// What a message interface (amqp, mqtt, nats, stomp, ...) did with the messages it took from
/// its broker, beyond the requests they became (those count in [`InterfaceMetrics`]).
#[derive(Default, Debug)]
pub struct MessageCounts {
    /// Messages taken from the broker.
    pub received: AtomicU64,
    /// Messages acknowledged to the broker after their handler succeeded.
    pub acked: AtomicU64,
    /// Messages handed back for another attempt (nack, reject with requeue, a delayed retry).
    pub retried: AtomicU64,
    /// Messages the broker marked as delivered before (a redelivery, a duplicate QoS 2 publish).
    pub redelivered: AtomicU64,
    /// Messages given up on after their last attempt (dead-lettered, terminated).
    pub dead_lettered: AtomicU64,
    /// Messages refused before any handler ran (over the size limit, undecodable).
    pub refused: AtomicU64,
}

impl MessageCounts {
    /// (name, value) of every count, in the order the monitor shows them.
    pub fn all(&self) -> [(&'static str, u64); 6] {
        [
            ("received", self.received.load(Ordering::Relaxed)),
            ("acked", self.acked.load(Ordering::Relaxed)),
            ("retried", self.retried.load(Ordering::Relaxed)),
            ("redelivered", self.redelivered.load(Ordering::Relaxed)),
            ("dead_lettered", self.dead_lettered.load(Ordering::Relaxed)),
            ("refused", self.refused.load(Ordering::Relaxed)),
        ]
    }
}

static MESSAGES: Mutex<BTreeMap<Key, Arc<MessageCounts>>> = Mutex::new(BTreeMap::new());

/// The message counts of `interface` of `cage`, made on first use. Callers keep the handle:
/// this takes a process-wide lock.
pub fn message_counts(cage: &str, interface: &str) -> Arc<MessageCounts> {
    lock(&MESSAGES).entry((cage.to_string(), interface.to_string())).or_default().clone()
}

/// Every message interface's counts: (cage, interface, counts).
pub fn all_message_counts() -> Vec<(String, String, Arc<MessageCounts>)> {
    lock(&MESSAGES).iter().map(|((c, i), m)| (c.clone(), i.clone(), m.clone())).collect()
}

static VM_MEMORY: Mutex<BTreeMap<(String, usize), Arc<AtomicU64>>> = Mutex::new(BTreeMap::new());

/// Where worker `worker` stores the bytes its VM of `cage` uses.
pub fn vm_memory_slot(cage: &str, worker: usize) -> Arc<AtomicU64> {
    lock(&VM_MEMORY).entry((cage.to_string(), worker)).or_default().clone()
}

/// (cage, worker, bytes) of every VM.
pub fn vm_memory() -> Vec<(String, usize, u64)> {
    lock(&VM_MEMORY).iter().map(|((c, w), b)| (c.clone(), *w, b.load(Ordering::Relaxed))).collect()
}

/// What happened, for the monitor page's list of events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    Reload,
    ModuleError,
    RequestError,
}

impl EventKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            EventKind::Reload => "reload",
            EventKind::ModuleError => "module_error",
            EventKind::RequestError => "request_error",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Event {
    pub time: f64,
    pub kind: EventKind,
    pub cage: String,
    /// The module (reloads, module errors) or the interface (request errors).
    pub subject: String,
    pub message: String,
    /// Set for request errors.
    pub request_id: String,
}

/// The most events kept of each kind: a storm of request errors must not push the reloads out.
const EVENTS_KEPT: usize = 100;

#[derive(Default)]
struct Events {
    reloads: VecDeque<Event>,
    module_errors: VecDeque<Event>,
    request_errors: VecDeque<Event>,
    reload_count: BTreeMap<String, u64>,
    module_error_count: BTreeMap<String, u64>,
    /// Modules whose latest version failed to load, with the error: (cage, module) -> event.
    broken: BTreeMap<Key, Event>,
}

static EVENTS: Mutex<Option<Events>> = Mutex::new(None);

fn with_events<R>(f: impl FnOnce(&mut Events) -> R) -> R {
    let mut guard = lock(&EVENTS);
    f(guard.get_or_insert_with(Events::default))
}

fn push(list: &mut VecDeque<Event>, e: Event) {
    if list.len() >= EVENTS_KEPT {
        list.pop_front();
    }
    list.push_back(e);
}

/// A new version of `module` of `cage` went live.
pub fn record_reload(cage: &str, module: &str, message: &str) {
    let e = Event { time: unix_now(), kind: EventKind::Reload, cage: cage.into(), subject: module.into(), message: message.into(), request_id: String::new() };
    with_events(|ev| {
        *ev.reload_count.entry(cage.to_string()).or_default() += 1;
        ev.broken.remove(&(cage.to_string(), module.to_string()));
        push(&mut ev.reloads, e);
    });
}

/// A version of `module` of `cage` failed to load; `message` names file and line.
pub fn record_module_error(cage: &str, module: &str, message: &str) {
    let e =
        Event { time: unix_now(), kind: EventKind::ModuleError, cage: cage.into(), subject: module.into(), message: message.into(), request_id: String::new() };
    with_events(|ev| {
        *ev.module_error_count.entry(cage.to_string()).or_default() += 1;
        ev.broken.insert((cage.to_string(), module.to_string()), e.clone());
        push(&mut ev.module_errors, e);
    });
}

/// `module` of `cage` is back to a working version (or was removed) without a new load.
pub fn clear_module_error(cage: &str, module: &str) {
    with_events(|ev| {
        ev.broken.remove(&(cage.to_string(), module.to_string()));
    });
}

/// A request failed; kept for the page's list of recent errors.
pub fn record_request_error(cage: &str, interface: &str, request_id: &str, message: &str) {
    let e = Event {
        time: unix_now(),
        kind: EventKind::RequestError,
        cage: cage.into(),
        subject: interface.into(),
        message: message.into(),
        request_id: request_id.into(),
    };
    with_events(|ev| push(&mut ev.request_errors, e));
}

/// Recent events of every kind, oldest first.
pub fn events() -> Vec<Event> {
    with_events(|ev| {
        let mut all: Vec<Event> = ev.reloads.iter().chain(&ev.module_errors).chain(&ev.request_errors).cloned().collect();
        all.sort_by(|a, b| a.time.total_cmp(&b.time));
        all
    })
}

/// Reloads and module errors so far per cage: (cage, reloads, module errors).
pub fn reload_counts() -> Vec<(String, u64, u64)> {
    with_events(|ev| {
        let mut cages: Vec<&String> = ev.reload_count.keys().chain(ev.module_error_count.keys()).collect();
        cages.sort();
        cages.dedup();
        cages.into_iter().map(|c| (c.clone(), ev.reload_count.get(c).copied().unwrap_or(0), ev.module_error_count.get(c).copied().unwrap_or(0))).collect()
    })
}

/// Modules whose latest version failed to load (the previous one keeps running).
pub fn broken_modules() -> Vec<Event> {
    with_events(|ev| ev.broken.values().cloned().collect())
}

/// A figure another crate exposes (a queue's depth, the age of its oldest call): read when the
/// monitor samples or is scraped.
#[derive(Clone)]
pub struct Gauge {
    pub id: u64,
    /// The Prometheus name, e.g. `pmnc_queue_depth`.
    pub name: String,
    pub help: String,
    /// Label pairs; `cage` first by convention.
    pub labels: Vec<(String, String)>,
    pub read: Arc<dyn Fn() -> f64 + Send + Sync>,
}

impl Gauge {
    /// The value of label `name`, or "".
    pub fn label(&self, name: &str) -> &str {
        self.labels.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str()).unwrap_or("")
    }
}

static GAUGES: Mutex<Vec<Gauge>> = Mutex::new(Vec::new());
static NEXT_GAUGE: AtomicU64 = AtomicU64::new(1);

/// Registers a gauge; the returned id removes it again ([`unregister_gauge`]). A gauge with the
/// same name and labels replaces the earlier one.
pub fn register_gauge(name: &str, help: &str, labels: &[(&str, &str)], read: impl Fn() -> f64 + Send + Sync + 'static) -> u64 {
    let id = NEXT_GAUGE.fetch_add(1, Ordering::Relaxed);
    let labels: Vec<(String, String)> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let mut all = lock(&GAUGES);
    all.retain(|g| !(g.name == name && g.labels == labels));
    all.push(Gauge { id, name: name.into(), help: help.into(), labels, read: Arc::new(read) });
    id
}

pub fn unregister_gauge(id: u64) {
    lock(&GAUGES).retain(|g| g.id != id);
}

/// Every registered gauge (clones; read them without holding any lock).
pub fn gauges() -> Vec<Gauge> {
    lock(&GAUGES).clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fine_buckets_cover_their_values() {
        for us in [0u64, 1, 3, 4, 5, 7, 8, 100, 999, 1000, 1023, 1024, 65_537, 10_000_000] {
            let (low, high) = fine_range(fine_index(us));
            assert!(low <= us as f64 && (us as f64) < high, "{us} not in [{low}, {high})");
        }
        // About 19% wide at most above the first few microseconds.
        let (low, high) = fine_range(fine_index(50_000));
        assert!((high - low) / low <= 0.25, "{low}..{high}");
    }

    #[test]
    fn prometheus_buckets_are_cumulative_and_inclusive() {
        let h = Histogram::default();
        h.observe_us(400); // 0.0004 <= 0.0005
        h.observe_us(500); // exactly on the bound: le is inclusive
        h.observe_us(2_000); // <= 0.0025
        h.observe_us(20_000_000); // over 10 s: only +Inf
        let c = h.cumulative();
        assert_eq!(c.len(), PROMETHEUS_BUCKETS.len() + 1);
        assert_eq!(c[0], 2);
        assert_eq!(c[1], 2);
        assert_eq!(c[2], 3);
        assert_eq!(c[PROMETHEUS_BUCKETS.len() - 1], 3);
        assert_eq!(c[PROMETHEUS_BUCKETS.len()], 4);
        assert!((h.sum_seconds() - 20.0029).abs() < 1e-9);
    }

    #[test]
    fn quantiles_from_fine_buckets() {
        let h = Histogram::default();
        assert_eq!(quantile(&h.fine_counts(), 0.5), None);
        for _ in 0..90 {
            h.observe_us(1_000);
        }
        for _ in 0..10 {
            h.observe_us(100_000);
        }
        let counts = h.fine_counts();
        let p50 = quantile(&counts, 0.5).unwrap_or_default();
        let p99 = quantile(&counts, 0.99).unwrap_or_default();
        assert!((0.0009..0.00125).contains(&p50), "p50 {p50}");
        assert!((0.09..0.125).contains(&p99), "p99 {p99}");
        let p90 = quantile(&counts, 0.9).unwrap_or_default();
        assert!(p90 < 0.002, "p90 {p90}: the 90th of 100 is still a 1 ms one");
    }

    #[test]
    fn module_errors_clear_on_reload() {
        record_module_error("metrics-test", "m", "metrics-test/m.lua:3: boom");
        assert!(broken_modules().iter().any(|e| e.cage == "metrics-test" && e.message.contains(":3:")));
        record_reload("metrics-test", "m", "reloaded");
        assert!(!broken_modules().iter().any(|e| e.cage == "metrics-test"));
        let (_, reloads, errors) = reload_counts().into_iter().find(|(c, _, _)| c == "metrics-test").unwrap_or_default();
        assert_eq!((reloads, errors), (1, 1));
    }

    #[test]
    fn gauges_register_replace_and_unregister() {
        let a = register_gauge("pmnc_test_depth", "test", &[("cage", "g"), ("queue", "q")], || 1.0);
        let b = register_gauge("pmnc_test_depth", "test", &[("cage", "g"), ("queue", "q")], || 2.0);
        let mine: Vec<Gauge> = gauges().into_iter().filter(|g| g.name == "pmnc_test_depth").collect();
        assert_eq!(mine.len(), 1);
        assert_eq!((mine[0].read)(), 2.0);
        assert_eq!(mine[0].label("queue"), "q");
        unregister_gauge(a);
        assert_eq!(gauges().iter().filter(|g| g.name == "pmnc_test_depth").count(), 1);
        unregister_gauge(b);
        assert_eq!(gauges().iter().filter(|g| g.name == "pmnc_test_depth").count(), 0);
    }
}
