//! Time series of the page: a sample of every figure each second, kept in fixed-size rings (the
//! last 5 minutes at 1 s, the last hour at 10 s).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;

use rustomnic_core::metrics;

/// A ring of the last `capacity` values; pushing onto a full ring drops the oldest.
#[derive(Debug, Clone)]
pub struct Ring<T> {
    items: Vec<T>,
    /// Where the next value goes once the ring is full.
    next: usize,
    capacity: usize,
}

impl<T: Clone> Ring<T> {
    pub fn new(capacity: usize) -> Ring<T> {
        Ring { items: Vec::with_capacity(capacity), next: 0, capacity: capacity.max(1) }
    }

    pub fn push(&mut self, value: T) {
        if self.items.len() < self.capacity {
            self.items.push(value);
        } else {
            self.items[self.next] = value;
            self.next = (self.next + 1) % self.capacity;
        }
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &T> {
        let (newer, older) = self.items.split_at(self.next.min(self.items.len()));
        older.iter().chain(newer.iter())
    }

    /// The newest `n` values, oldest first.
    pub fn last(&self, n: usize) -> Vec<T> {
        let skip = self.len().saturating_sub(n);
        self.iter().skip(skip).cloned().collect()
    }
}

/// One moment: its time (Unix seconds) and a value per series id (NaN: no value).
#[derive(Debug, Clone)]
pub struct Sample {
    pub time: f64,
    pub values: Vec<f64>,
}

impl Sample {
    pub fn get(&self, id: usize) -> f64 {
        self.values.get(id).copied().unwrap_or(f64::NAN)
    }
}

pub const FINE: usize = 300;
pub const COARSE: usize = 360;
pub const COARSE_EVERY: usize = 10;

/// Counter values seen at the previous sample, to turn counters into rates.
#[derive(Default)]
struct Previous {
    counters: HashMap<String, u64>,
    fine: HashMap<String, Vec<u64>>,
}

/// Every series: names are interned to ids so a sample is a plain vector.
pub struct Store {
    names: Vec<String>,
    ids: HashMap<String, usize>,
    pub fine: Ring<Sample>,
    pub coarse: Ring<Sample>,
    pending: Vec<Sample>,
    previous: Previous,
}

impl Default for Store {
    fn default() -> Self {
        Store::new()
    }
}

/// The rate per second of a counter that went from `before` to `now` in `secs`.
/// A counter seen for the first time counted from zero: its series is made at its first event.
fn rate(before: Option<u64>, now: u64, secs: f64) -> f64 {
    if secs <= 0.0 {
        return 0.0;
    }
    now.saturating_sub(before.unwrap_or(0)) as f64 / secs
}

/// The fine buckets of an interval: `now` minus `before` (all of `now` the first time).
fn delta(before: Option<&Vec<u64>>, now: &[u64]) -> Vec<u64> {
    match before {
        Some(b) => now.iter().zip(b).map(|(n, b)| n.saturating_sub(*b)).collect(),
        None => now.to_vec(),
    }
}

impl Store {
    pub fn new() -> Store {
        Store { names: Vec::new(), ids: HashMap::new(), fine: Ring::new(FINE), coarse: Ring::new(COARSE), pending: Vec::new(), previous: Previous::default() }
    }

    fn id(&mut self, name: &str) -> usize {
        if let Some(id) = self.ids.get(name) {
            return *id;
        }
        let id = self.names.len();
        self.names.push(name.to_string());
        self.ids.insert(name.to_string(), id);
        id
    }

    pub fn names(&self) -> &[String] {
        &self.names
    }

    pub fn id_of(&self, name: &str) -> Option<usize> {
        self.ids.get(name).copied()
    }

    /// Adds a sample of named values.
    pub fn push(&mut self, time: f64, values: Vec<(String, f64)>) {
        let mut v = vec![f64::NAN; self.names.len()];
        for (name, value) in values {
            let id = self.id(&name);
            if v.len() <= id {
                v.resize(id + 1, f64::NAN);
            }
            v[id] = value;
        }
        let sample = Sample { time, values: v };
        self.fine.push(sample.clone());
        self.pending.push(sample);
        if self.pending.len() >= COARSE_EVERY {
            let merged = average(&self.pending);
            self.pending.clear();
            self.coarse.push(merged);
        }
    }

    /// Reads every figure now and adds the sample; `secs` is the time since the previous one.
    pub fn sample(&mut self, time: f64, secs: f64) {
        let mut values: Vec<(String, f64)> = Vec::new();
        let mut counters: HashMap<String, u64> = HashMap::new();
        let mut fines: HashMap<String, Vec<u64>> = HashMap::new();
        for (cage, interface, m) in metrics::interfaces() {
            let key = format!("interface/{cage}/{interface}");
            let requests = m.requests.load(Ordering::Relaxed);
            let errors = m.errors.load(Ordering::Relaxed);
            values.push((format!("{key}/requests_per_s"), rate(self.previous.counters.get(&format!("{key}/r")).copied(), requests, secs)));
            values.push((format!("{key}/errors_per_s"), rate(self.previous.counters.get(&format!("{key}/e")).copied(), errors, secs)));
            values.push((format!("{key}/in_flight"), m.in_flight.load(Ordering::Relaxed).max(0) as f64));
            let fine = m.latency.fine_counts();
            push_quantiles(&mut values, &key, &delta(self.previous.fine.get(&key), &fine));
            counters.insert(format!("{key}/r"), requests);
            counters.insert(format!("{key}/e"), errors);
            fines.insert(key, fine);
        }
        for (cage, resource, s) in rustomnic_resource::all_stats() {
            let key = format!("resource/{cage}/{resource}");
            let calls = s.calls.load(Ordering::Relaxed);
            let errors = s.errors.load(Ordering::Relaxed);
            values.push((format!("{key}/calls_per_s"), rate(self.previous.counters.get(&format!("{key}/c")).copied(), calls, secs)));
            values.push((format!("{key}/errors_per_s"), rate(self.previous.counters.get(&format!("{key}/e")).copied(), errors, secs)));
            values.push((format!("{key}/in_use"), s.in_use.load(Ordering::Relaxed) as f64));
            values.push((format!("{key}/idle"), s.idle.load(Ordering::Relaxed) as f64));
            values.push((format!("{key}/waiting"), s.waiting.load(Ordering::Relaxed) as f64));
            let fine = s.latency.fine_counts();
            push_quantiles(&mut values, &key, &delta(self.previous.fine.get(&key), &fine));
            counters.insert(format!("{key}/c"), calls);
            counters.insert(format!("{key}/e"), errors);
            fines.insert(key, fine);
        }
        for (cage, worker, bytes) in metrics::vm_memory() {
            values.push((format!("vm/{cage}/worker {worker}/memory_mib"), bytes as f64 / 1048576.0));
        }
        for g in metrics::gauges() {
            values.push((format!("gauge/{}/{}", g.name, label_text(&g.labels)), (g.read)()));
        }
        self.previous = Previous { counters, fine: fines };
        self.push(time, values);
    }

    /// The series of one window as JSON columns: {"size": ring capacity, "time": [...],
    /// "series": {name: [...]}}; with `since`, only the samples taken after that time (the page
    /// fetches the whole window once, then what is new each second).
    pub fn to_json(&self, coarse: bool, since: Option<f64>) -> serde_json::Value {
        let ring = if coarse { &self.coarse } else { &self.fine };
        let newer = |s: &&Sample| since.is_none_or(|t| s.time > t);
        let times: Vec<f64> = ring.iter().filter(newer).map(|s| s.time).collect();
        let mut series = serde_json::Map::new();
        for (id, name) in self.names.iter().enumerate() {
            let column: Vec<serde_json::Value> = ring
                .iter()
                .filter(newer)
                .map(|s| {
                    let v = s.get(id);
                    if v.is_finite() {
                        serde_json::json!((v * 1e4).round() / 1e4)
                    } else {
                        serde_json::Value::Null
                    }
                })
                .collect();
            series.insert(name.clone(), serde_json::Value::Array(column));
        }
        serde_json::json!({ "size": ring.capacity, "time": times, "series": series })
    }

    /// The mean of series `name` over the newest `n` fine samples (missing values skipped).
    pub fn recent_mean(&self, name: &str, n: usize) -> Option<f64> {
        let id = self.id_of(name)?;
        let values: Vec<f64> = self.fine.last(n).iter().map(|s| s.get(id)).filter(|v| v.is_finite()).collect();
        if values.is_empty() {
            None
        } else {
            Some(values.iter().sum::<f64>() / values.len() as f64)
        }
    }

    /// The newest value of series `name`.
    pub fn latest(&self, name: &str) -> Option<f64> {
        let id = self.id_of(name)?;
        self.fine.last(1).first().map(|s| s.get(id)).filter(|v| v.is_finite())
    }
}

fn push_quantiles(values: &mut Vec<(String, f64)>, key: &str, counts: &[u64]) {
    for (name, q) in [("p50_ms", 0.5), ("p90_ms", 0.9), ("p99_ms", 0.99)] {
        // An interval without requests has no latency: a gap in the graph, not a zero.
        let v = metrics::quantile(counts, q).map(|s| s * 1e3).unwrap_or(f64::NAN);
        values.push((format!("{key}/{name}"), v));
    }
}

/// `a=1,b=2` for a series name.
pub fn label_text(labels: &[(String, String)]) -> String {
    labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

/// The mean of each series over `samples` (at the time of the last one).
fn average(samples: &[Sample]) -> Sample {
    let width = samples.iter().map(|s| s.values.len()).max().unwrap_or(0);
    let mut sums: BTreeMap<usize, (f64, usize)> = BTreeMap::new();
    for s in samples {
        for (i, v) in s.values.iter().enumerate() {
            if v.is_finite() {
                let e = sums.entry(i).or_insert((0.0, 0));
                e.0 += v;
                e.1 += 1;
            }
        }
    }
    let mut values = vec![f64::NAN; width];
    for (i, (sum, n)) in sums {
        values[i] = sum / n as f64;
    }
    Sample { time: samples.last().map(|s| s.time).unwrap_or(0.0), values }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_keeps_the_newest_in_order() {
        let mut r = Ring::new(3);
        assert!(r.is_empty());
        for i in 1..=2 {
            r.push(i);
        }
        assert_eq!(r.iter().copied().collect::<Vec<_>>(), vec![1, 2]);
        for i in 3..=7 {
            r.push(i);
        }
        assert_eq!(r.len(), 3);
        assert_eq!(r.iter().copied().collect::<Vec<_>>(), vec![5, 6, 7]);
        assert_eq!(r.last(2), vec![6, 7]);
        assert_eq!(r.last(10), vec![5, 6, 7]);
    }

    #[test]
    fn windows_have_fixed_sizes_and_coarse_samples_average_ten() {
        let mut s = Store::new();
        for i in 0..(FINE + 50) {
            s.push(i as f64, vec![("a".into(), i as f64)]);
        }
        assert_eq!(s.fine.len(), FINE);
        assert_eq!(s.fine.iter().next().map(|x| x.time), Some(50.0));
        assert_eq!(s.coarse.len(), (FINE + 50) / COARSE_EVERY);
        let first = s.coarse.iter().next().map(|x| x.get(0)).unwrap_or_default();
        assert_eq!(first, 4.5, "mean of 0..=9");
        for i in 0..(COARSE * COARSE_EVERY) {
            s.push(i as f64, vec![]);
        }
        assert_eq!(s.coarse.len(), COARSE);
    }

    #[test]
    fn series_that_appear_later_are_null_before() {
        let mut s = Store::new();
        s.push(1.0, vec![("a".into(), 1.0)]);
        s.push(2.0, vec![("a".into(), 2.0), ("b".into(), 5.0)]);
        let j = s.to_json(false, None);
        assert_eq!(j["size"], FINE);
        assert_eq!(j["time"], serde_json::json!([1.0, 2.0]));
        let newer = s.to_json(false, Some(1.0));
        assert_eq!(newer["time"], serde_json::json!([2.0]));
        assert_eq!(newer["series"]["a"], serde_json::json!([2.0]));
        assert_eq!(s.to_json(false, Some(2.0))["time"], serde_json::json!([]));
        assert_eq!(j["series"]["a"], serde_json::json!([1.0, 2.0]));
        assert_eq!(j["series"]["b"], serde_json::json!([null, 5.0]));
        assert_eq!(s.recent_mean("a", 10), Some(1.5));
        assert_eq!(s.latest("b"), Some(5.0));
    }

    #[test]
    fn sampling_turns_counters_into_rates() {
        let m = metrics::interface("series-test", "http");
        let mut s = Store::new();
        m.requests.fetch_add(3, Ordering::Relaxed);
        s.sample(1.0, 1.0);
        assert_eq!(s.latest("interface/series-test/http/requests_per_s"), Some(3.0), "first seen: counted from zero");
        m.requests.fetch_add(10, Ordering::Relaxed);
        m.errors.fetch_add(4, Ordering::Relaxed);
        m.latency.observe_us(2_000);
        s.sample(3.0, 2.0);
        assert_eq!(s.latest("interface/series-test/http/requests_per_s"), Some(5.0));
        assert_eq!(s.latest("interface/series-test/http/errors_per_s"), Some(2.0));
        let p50 = s.latest("interface/series-test/http/p50_ms").unwrap_or_default();
        assert!((1.9..2.6).contains(&p50), "{p50}");
        s.sample(4.0, 1.0);
        assert_eq!(s.latest("interface/series-test/http/requests_per_s"), Some(0.0));
        assert_eq!(s.latest("interface/series-test/http/p50_ms"), None, "no requests: no latency");
    }
}
