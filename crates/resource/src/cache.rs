//! The read cache of a resource (docs/decisions/143): results of `cached{key, ttl}` calls, shared
//! by every worker thread of the process for one (cage, resource), bounded in bytes with LRU
//! eviction, and single flight: while the first call for a key runs, later calls for that key (on
//! any worker) wait for its result instead of running.
//!
//! One mutex guards a cache; it is held for map operations only, never across an await.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rustomnic_core::Value;
use tokio::sync::watch;

use crate::Error;

/// What one entry costs besides its value and key: map nodes, the LRU node, the Arc.
const ENTRY_OVERHEAD: u64 = 96;
/// What one value costs besides its own bytes (the enum, a vector's header).
const VALUE_OVERHEAD: u64 = 32;

/// Counters of one cache, for /metrics and the monitor page (registered gauges).
#[derive(Debug, Default)]
pub struct CacheStats {
    /// Calls answered from the cache.
    pub hits: AtomicU64,
    /// Calls that found nothing fresh and ran (each one a query).
    pub misses: AtomicU64,
    /// Calls that waited for a running call of the same key instead of running (single flight).
    pub waits: AtomicU64,
    /// Entries dropped to stay within `cache_size`.
    pub evictions: AtomicU64,
    /// Results not kept because they were over `cache_max_value`.
    pub too_big: AtomicU64,
    /// Entries and their estimated bytes now.
    pub entries: AtomicU64,
    pub bytes: AtomicU64,
}

/// How a running call ended, as its waiters see it.
#[derive(Clone, Debug)]
pub enum FlightEnd {
    Running,
    Done(Result<Arc<Value>, Error>),
    /// The first call ended without a result of its own (cut by its request's deadline, or its
    /// request went away): a waiter looks again, and may become the one that runs.
    Abandoned,
}

/// A call in progress; the map holds it while it runs.
#[derive(Debug)]
struct Flight {
    tx: watch::Sender<FlightEnd>,
}

enum Entry {
    Ready { value: Arc<Value>, expires: Instant, size: u64, tick: u64 },
    Running(Arc<Flight>),
}

struct Store {
    limit: u64,
    max_value: u64,
    /// Ordered, so that a prefix (`"price:*"`) is one range.
    entries: BTreeMap<String, Entry>,
    /// Ready entries by last use, oldest first.
    lru: BTreeMap<u64, String>,
    tick: u64,
    bytes: u64,
    fingerprint: String,
}

/// See the module docs.
pub struct ReadCache {
    store: Mutex<Store>,
    pub stats: Arc<CacheStats>,
}

/// What a lookup found.
pub enum Lookup {
    Hit(Arc<Value>),
    /// Another call is running for the key: wait on this for its end.
    Wait(watch::Receiver<FlightEnd>),
    /// Nothing: the caller runs the call and hands the result to [`Leader::finish`].
    Lead(Leader),
}

/// The caller that runs a key's call for everyone waiting on it. Dropped without `finish`, it
/// tells the waiters to look again.
pub struct Leader {
    cache: Arc<ReadCache>,
    key: String,
    flight: Arc<Flight>,
    done: bool,
}

impl Leader {
    /// Hands the call's result to the waiters, and keeps a success for `ttl` unless the key was
    /// invalidated meanwhile (then the result may predate the write that invalidated it).
    pub fn finish(mut self, result: Result<Value, Error>, ttl: Duration) -> Result<Value, Error> {
        self.done = true;
        let shared = result.map(Arc::new);
        {
            let mut s = self.cache.lock();
            let ours = matches!(s.entries.get(&self.key), Some(Entry::Running(f)) if Arc::ptr_eq(f, &self.flight));
            if ours {
                s.entries.remove(&self.key);
                if let Ok(value) = &shared {
                    self.cache.store_ready(&mut s, &self.key, value.clone(), ttl);
                }
                self.cache.publish_size(&s);
            }
        }
        self.flight.tx.send_replace(FlightEnd::Done(shared.clone()));
        shared.map(|v| Arc::try_unwrap(v).unwrap_or_else(|v| (*v).clone()))
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        {
            let mut s = self.cache.lock();
            if matches!(s.entries.get(&self.key), Some(Entry::Running(f)) if Arc::ptr_eq(f, &self.flight)) {
                s.entries.remove(&self.key);
            }
        }
        self.flight.tx.send_replace(FlightEnd::Abandoned);
    }
}

/// How waiting for another call's result ended.
pub enum Waited {
    Done(Result<Arc<Value>, Error>),
    /// Look again (see [`FlightEnd::Abandoned`]).
    Again,
    /// The waiter's own deadline came first.
    Deadline,
}

/// Waits for the end of the call `rx` follows, until `deadline`.
pub async fn wait(mut rx: watch::Receiver<FlightEnd>, deadline: Instant) -> Waited {
    let ended = tokio::time::timeout_at(deadline.into(), rx.wait_for(|e| !matches!(e, FlightEnd::Running))).await;
    match ended {
        Err(_) => Waited::Deadline,
        // The sender went away with the entry: nothing will come.
        Ok(Err(_)) => Waited::Again,
        Ok(Ok(end)) => match &*end {
            FlightEnd::Done(r) => Waited::Done(r.clone()),
            _ => Waited::Again,
        },
    }
}

impl ReadCache {
    /// A cache of at most `limit` bytes keeping values of at most `max_value` bytes.
    pub fn new(limit: u64, max_value: u64) -> ReadCache {
        ReadCache {
            store: Mutex::new(Store { limit, max_value, entries: BTreeMap::new(), lru: BTreeMap::new(), tick: 0, bytes: 0, fingerprint: String::new() }),
            stats: Arc::new(CacheStats::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A fresh value for `key`, a running call to wait for, or the duty to run it.
    pub fn lookup(self: &Arc<Self>, key: &str) -> Lookup {
        if let Some(value) = self.peek(key) {
            return Lookup::Hit(value);
        }
        let mut s = self.lock();
        match s.entries.get(key) {
            // Stored between peek and this lock.
            Some(Entry::Ready { value, expires, .. }) if *expires > Instant::now() => {
                self.stats.hits.fetch_add(1, Ordering::Relaxed);
                return Lookup::Hit(value.clone());
            }
            Some(Entry::Ready { .. }) => {
                Self::remove(&mut s, key);
            }
            Some(Entry::Running(flight)) => {
                let rx = flight.tx.subscribe();
                self.stats.waits.fetch_add(1, Ordering::Relaxed);
                return Lookup::Wait(rx);
            }
            None => {}
        }
        let flight = Arc::new(Flight { tx: watch::channel(FlightEnd::Running).0 });
        s.entries.insert(key.to_string(), Entry::Running(flight.clone()));
        self.publish_size(&s);
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        Lookup::Lead(Leader { cache: self.clone(), key: key.to_string(), flight, done: false })
    }

    /// A fresh value for `key`, counted as a hit; None (counting nothing, changing nothing) when
    /// there is none, so the caller can go on to [`ReadCache::lookup`].
    pub fn peek(&self, key: &str) -> Option<Arc<Value>> {
        let mut s = self.lock();
        let (value, old) = match s.entries.get(key) {
            Some(Entry::Ready { value, expires, tick, .. }) if *expires > Instant::now() => (value.clone(), *tick),
            _ => return None,
        };
        s.tick += 1;
        let new = s.tick;
        s.lru.remove(&old);
        s.lru.insert(new, key.to_string());
        if let Some(Entry::Ready { tick, .. }) = s.entries.get_mut(key) {
            *tick = new;
        }
        self.stats.hits.fetch_add(1, Ordering::Relaxed);
        Some(value)
    }

    /// Drops `key`, or every key starting with what comes before a trailing `*`. A call running
    /// for a dropped key still answers its waiters but keeps nothing.
    pub fn invalidate(&self, key: &str) {
        let mut s = self.lock();
        match key.strip_suffix('*') {
            Some(prefix) => {
                let keys: Vec<String> = s
                    .entries
                    .range::<str, _>((std::ops::Bound::Included(prefix), std::ops::Bound::Unbounded))
                    .take_while(|(k, _)| k.starts_with(prefix))
                    .map(|(k, _)| k.clone())
                    .collect();
                for k in keys {
                    Self::remove(&mut s, &k);
                }
            }
            None => Self::remove(&mut s, key),
        }
        self.publish_size(&s);
    }

    /// Empties the cache and takes new limits when the resource's config changed (`fingerprint`
    /// differs from the last one): the values may have come from another server.
    pub fn configure(&self, fingerprint: &str, limit: u64, max_value: u64) {
        let mut s = self.lock();
        if s.fingerprint == fingerprint {
            return;
        }
        s.fingerprint = fingerprint.to_string();
        s.limit = limit;
        s.max_value = max_value;
        s.entries.clear();
        s.lru.clear();
        s.bytes = 0;
        self.publish_size(&s);
    }

    fn remove(s: &mut Store, key: &str) {
        if let Some(Entry::Ready { size, tick, .. }) = s.entries.remove(key) {
            s.lru.remove(&tick);
            s.bytes -= size;
        }
    }

    fn store_ready(&self, s: &mut Store, key: &str, value: Arc<Value>, ttl: Duration) {
        let budget = s.max_value.min(s.limit);
        let size = ENTRY_OVERHEAD + key.len() as u64 + value_size(&value, budget);
        if size > budget {
            self.stats.too_big.fetch_add(1, Ordering::Relaxed);
            return;
        }
        Self::remove(s, key);
        s.tick += 1;
        let tick = s.tick;
        let expires = Instant::now().checked_add(ttl).unwrap_or_else(|| Instant::now() + Duration::from_secs(86400 * 365));
        s.entries.insert(key.to_string(), Entry::Ready { value, expires, size, tick });
        s.lru.insert(tick, key.to_string());
        s.bytes += size;
        while s.bytes > s.limit {
            let Some((_, oldest)) = s.lru.pop_first() else { break };
            if let Some(Entry::Ready { size, .. }) = s.entries.remove(&oldest) {
                s.bytes -= size;
                self.stats.evictions.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn publish_size(&self, s: &Store) {
        self.stats.entries.store(s.lru.len() as u64, Ordering::Relaxed);
        self.stats.bytes.store(s.bytes, Ordering::Relaxed);
    }

    /// Kept entries now (running calls not counted).
    pub fn len(&self) -> usize {
        self.lock().lru.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The estimated bytes of `v`, counted no further than just past `cap`.
pub fn value_size(v: &Value, cap: u64) -> u64 {
    let mut total = 0u64;
    let mut stack = vec![v];
    while let Some(v) = stack.pop() {
        total += VALUE_OVERHEAD;
        match v {
            Value::Str(b) => total += b.len() as u64,
            Value::Array(items) => stack.extend(items.iter()),
            Value::Map(pairs) => {
                for (k, v) in pairs {
                    stack.push(k);
                    stack.push(v);
                }
            }
            Value::Nil | Value::Bool(_) | Value::Int(_) | Value::Float(_) => {}
        }
        if total > cap {
            break;
        }
    }
    total
}

/// Every read cache of this process by (cage, resource), made on first use and kept across
/// config changes (which empty it), so its counters run on.
static CACHES: Mutex<BTreeMap<(String, String), Arc<ReadCache>>> = Mutex::new(BTreeMap::new());

/// The read cache of `resource` of `cage`, configured by its `[resources.X]` table (its
/// `fingerprint` and cache keys). The first call registers its gauges.
pub fn cache_for(cage: &str, resource: &str, fingerprint: &str, limit: u64, max_value: u64) -> Arc<ReadCache> {
    let mut all = CACHES.lock().unwrap_or_else(|e| e.into_inner());
    let cache = match all.get(&(cage.to_string(), resource.to_string())) {
        Some(c) => c.clone(),
        None => {
            let c = Arc::new(ReadCache::new(limit, max_value));
            all.insert((cage.to_string(), resource.to_string()), c.clone());
            register_gauges(cage, resource, &c.stats);
            c
        }
    };
    drop(all);
    cache.configure(fingerprint, limit, max_value);
    cache
}

/// Tells the other processes of the flock that `keys` of this cache were invalidated here (a
/// committed `invalidates{...}` or `pmnc.cache.invalidate`); without a cluster it does nothing.
pub fn tell_flock(cache: &Arc<ReadCache>, keys: &[String]) {
    if keys.is_empty() {
        return;
    }
    let names = {
        let all = CACHES.lock().unwrap_or_else(|e| e.into_inner());
        all.iter().find(|(_, c)| Arc::ptr_eq(c, cache)).map(|(names, _)| names.clone())
    };
    let Some((cage, resource)) = names else { return };
    let mut items = Vec::with_capacity(keys.len() + 1);
    items.push(Value::Str(resource.into_bytes()));
    items.extend(keys.iter().map(|k| Value::Str(k.as_bytes().to_vec())));
    rustomnic_lua::events::tell_flock(&cage, rustomnic_lua::events::CACHE_TOPIC, &Value::Array(items));
}

/// An invalidation told by another process: `[resource, key, ...]` of `cage`, dropped here
/// (never told on again). Anything else is ignored.
pub fn from_flock(cage: &str, value: &Value) {
    let Value::Array(items) = value else { return };
    let Some((Value::Str(resource), keys)) = items.split_first() else { return };
    let resource = String::from_utf8_lossy(resource).into_owned();
    let cache = CACHES.lock().unwrap_or_else(|e| e.into_inner()).get(&(cage.to_string(), resource)).cloned();
    let Some(cache) = cache else { return };
    for key in keys {
        if let Value::Str(k) = key {
            cache.invalidate(&String::from_utf8_lossy(k));
        }
    }
}

/// Every read cache's counters: (cage, resource, counters).
pub fn all_cache_stats() -> Vec<(String, String, Arc<CacheStats>)> {
    let all = CACHES.lock().unwrap_or_else(|e| e.into_inner());
    all.iter().map(|((c, r), cache)| (c.clone(), r.clone(), cache.stats.clone())).collect()
}

type Read = fn(&CacheStats) -> u64;

fn register_gauges(cage: &str, resource: &str, stats: &Arc<CacheStats>) {
    let calls: [(&str, Read); 3] =
        [("hit", |s| s.hits.load(Ordering::Relaxed)), ("miss", |s| s.misses.load(Ordering::Relaxed)), ("wait", |s| s.waits.load(Ordering::Relaxed))];
    for (outcome, read) in calls {
        let s = stats.clone();
        rustomnic_core::metrics::register_gauge(
            "pmnc_resource_cache_calls",
            "Cached calls to a resource since the process started, by outcome: hit (answered from the read cache), miss (ran, one query each), wait (waited for the same key's running call: single flight).",
            &[("cage", cage), ("resource", resource), ("outcome", outcome)],
            move || read(&s) as f64,
        );
    }
    let others: [(&str, &str, Read); 4] = [
        ("pmnc_resource_cache_evictions", "Read cache entries dropped to stay within cache_size since the process started.", |s| {
            s.evictions.load(Ordering::Relaxed)
        }),
        ("pmnc_resource_cache_too_big", "Results not kept in the read cache because they were over cache_max_value, since the process started.", |s| {
            s.too_big.load(Ordering::Relaxed)
        }),
        ("pmnc_resource_cache_entries", "Entries in a resource's read cache now.", |s| s.entries.load(Ordering::Relaxed)),
        ("pmnc_resource_cache_bytes", "Estimated bytes of a resource's read cache now (at most cache_size).", |s| s.bytes.load(Ordering::Relaxed)),
    ];
    for (name, help, read) in others {
        let s = stats.clone();
        rustomnic_core::metrics::register_gauge(name, help, &[("cage", cage), ("resource", resource)], move || read(&s) as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(n: usize) -> Value {
        Value::Str(vec![b'x'; n])
    }

    /// The duty to run `key`'s call; None when the lookup found a value or a running call.
    fn lead(cache: &Arc<ReadCache>, key: &str) -> Option<Leader> {
        match cache.lookup(key) {
            Lookup::Lead(l) => Some(l),
            Lookup::Hit(_) | Lookup::Wait(_) => None,
        }
    }

    fn hit(cache: &Arc<ReadCache>, key: &str) -> Option<Value> {
        match cache.lookup(key) {
            Lookup::Hit(v) => Some((*v).clone()),
            Lookup::Lead(_) | Lookup::Wait(_) => None,
        }
    }

    const MINUTE: Duration = Duration::from_secs(60);

    #[test]
    fn a_result_is_kept_for_its_ttl() {
        let cache = Arc::new(ReadCache::new(1 << 20, 1 << 20));
        let v = lead(&cache, "a").unwrap().finish(Ok(Value::Int(7)), Duration::from_millis(50)).unwrap();
        assert_eq!(v, Value::Int(7));
        assert_eq!(hit(&cache, "a"), Some(Value::Int(7)));
        std::thread::sleep(Duration::from_millis(60));
        assert!(hit(&cache, "a").is_none(), "expired entry answered");
        assert_eq!(cache.stats.hits.load(Ordering::Relaxed), 1);
        assert_eq!(cache.stats.misses.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn peek_finds_fresh_values_only_and_changes_nothing_else() {
        let cache = Arc::new(ReadCache::new(1 << 20, 1 << 20));
        assert!(cache.peek("a").is_none());
        let leader = lead(&cache, "a").unwrap();
        assert!(cache.peek("a").is_none(), "a running call is not a value");
        leader.finish(Ok(Value::Int(3)), MINUTE).unwrap();
        assert_eq!(cache.peek("a").map(|v| (*v).clone()), Some(Value::Int(3)));
        assert_eq!(cache.stats.hits.load(Ordering::Relaxed), 1);
        assert_eq!(cache.stats.misses.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_failure_is_not_kept_and_reaches_waiters() {
        let cache = Arc::new(ReadCache::new(1 << 20, 1 << 20));
        let leader = lead(&cache, "a").unwrap();
        let Lookup::Wait(rx) = cache.lookup("a") else { panic!("second lookup did not wait") };
        let e = leader.finish(Err(Error::new("boom").with_code("42P01")), MINUTE).unwrap_err();
        assert_eq!(e.message, "boom");
        match &*rx.borrow() {
            FlightEnd::Done(Err(e)) => assert_eq!(e.code.as_deref(), Some("42P01")),
            other => panic!("waiter saw {other:?}"),
        }
        assert!(matches!(cache.lookup("a"), Lookup::Lead(_)), "a failure was cached");
        assert_eq!(cache.stats.waits.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn an_abandoned_call_lets_a_waiter_lead() {
        let cache = Arc::new(ReadCache::new(1 << 20, 1 << 20));
        let leader = lead(&cache, "a").unwrap();
        let Lookup::Wait(rx) = cache.lookup("a") else { panic!("second lookup did not wait") };
        drop(leader);
        assert!(matches!(&*rx.borrow(), FlightEnd::Abandoned));
        assert!(matches!(cache.lookup("a"), Lookup::Lead(_)));
    }

    #[test]
    fn waiters_on_other_threads_get_the_result() {
        let cache = Arc::new(ReadCache::new(1 << 20, 1 << 20));
        let leader = lead(&cache, "k").unwrap();
        let waiters: Vec<_> = (0..4)
            .map(|_| {
                let Lookup::Wait(rx) = cache.lookup("k") else { panic!("lookup did not wait") };
                std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
                    rt.block_on(async move {
                        match wait(rx, Instant::now() + Duration::from_secs(5)).await {
                            Waited::Done(Ok(v)) => (*v).clone(),
                            _ => Value::Nil,
                        }
                    })
                })
            })
            .collect();
        leader.finish(Ok(Value::str("row")), MINUTE).unwrap();
        for w in waiters {
            assert_eq!(w.join().unwrap(), Value::str("row"));
        }
        assert_eq!(cache.stats.misses.load(Ordering::Relaxed), 1);
        assert_eq!(cache.stats.waits.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn a_waiter_stops_at_its_deadline() {
        let cache = Arc::new(ReadCache::new(1 << 20, 1 << 20));
        let _leader = lead(&cache, "k").unwrap();
        let Lookup::Wait(rx) = cache.lookup("k") else { panic!("lookup did not wait") };
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        let r = rt.block_on(wait(rx, Instant::now() + Duration::from_millis(20)));
        assert!(matches!(r, Waited::Deadline));
    }

    #[test]
    fn least_recently_used_entries_go_first() {
        let each = ENTRY_OVERHEAD + 1 + VALUE_OVERHEAD + 100;
        let cache = Arc::new(ReadCache::new(each * 3, each));
        for k in ["a", "b", "c"] {
            lead(&cache, k).unwrap().finish(Ok(text(100)), MINUTE).unwrap();
        }
        assert!(hit(&cache, "a").is_some());
        lead(&cache, "d").unwrap().finish(Ok(text(100)), MINUTE).unwrap();
        assert!(hit(&cache, "b").is_none(), "b was the least recently used");
        assert!(hit(&cache, "a").is_some() && hit(&cache, "c").is_some() && hit(&cache, "d").is_some());
        assert_eq!(cache.stats.evictions.load(Ordering::Relaxed), 1);
        assert_eq!(cache.stats.bytes.load(Ordering::Relaxed), each * 3);
        assert_eq!(cache.stats.entries.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn values_over_the_limit_are_not_kept() {
        let cache = Arc::new(ReadCache::new(1 << 20, 200));
        let v = lead(&cache, "big").unwrap().finish(Ok(text(1000)), MINUTE).unwrap();
        assert_eq!(v, text(1000), "the caller still gets its value");
        assert!(hit(&cache, "big").is_none());
        assert_eq!(cache.stats.too_big.load(Ordering::Relaxed), 1);
        lead(&cache, "small").unwrap().finish(Ok(text(10)), MINUTE).unwrap();
        assert!(hit(&cache, "small").is_some());
    }

    #[test]
    fn invalidation_by_key_and_prefix() {
        let cache = Arc::new(ReadCache::new(1 << 20, 1 << 20));
        for k in ["price:1", "price:2", "pricey", "stock:1"] {
            lead(&cache, k).unwrap().finish(Ok(Value::Int(1)), MINUTE).unwrap();
        }
        cache.invalidate("stock:1");
        assert!(hit(&cache, "stock:1").is_none());
        cache.invalidate("price:*");
        assert!(hit(&cache, "price:1").is_none() && hit(&cache, "price:2").is_none());
        assert!(hit(&cache, "pricey").is_some(), "prefix went past its range");
    }

    #[test]
    fn a_call_running_across_an_invalidation_keeps_nothing() {
        let cache = Arc::new(ReadCache::new(1 << 20, 1 << 20));
        let old = lead(&cache, "a").unwrap();
        cache.invalidate("a");
        let new = lead(&cache, "a").unwrap();
        old.finish(Ok(Value::str("stale")), MINUTE).unwrap();
        assert!(matches!(cache.lookup("a"), Lookup::Wait(_)), "the stale result replaced the new call");
        new.finish(Ok(Value::str("fresh")), MINUTE).unwrap();
        assert_eq!(hit(&cache, "a"), Some(Value::str("fresh")));
    }

    #[test]
    fn a_changed_config_empties_the_cache() {
        let cache = cache_for("cache-unit", "db", "one", 1 << 20, 1 << 20);
        lead(&cache, "a").unwrap().finish(Ok(Value::Int(1)), MINUTE).unwrap();
        let same = cache_for("cache-unit", "db", "one", 1 << 20, 1 << 20);
        assert!(hit(&same, "a").is_some());
        let changed = cache_for("cache-unit", "db", "two", 1 << 20, 1 << 20);
        assert!(hit(&changed, "a").is_none());
        assert!(rustomnic_core::metrics::gauges()
            .iter()
            .any(|g| g.name == "pmnc_resource_cache_calls" && g.label("cage") == "cache-unit" && g.label("outcome") == "hit"));
    }

    #[test]
    fn sizes_are_counted_up_to_the_cap() {
        let nested = Value::Array(vec![text(10), Value::Map(vec![(Value::str("k"), Value::Int(1))])]);
        assert_eq!(value_size(&nested, u64::MAX), 32 * 5 + 10 + 1);
        assert!(value_size(&Value::Array(vec![text(100); 1000]), 500) < 1000);
    }
}
