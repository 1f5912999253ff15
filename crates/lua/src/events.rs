//! The event bus behind `pmnc.events`: a process-wide registry, per cage, of topics and the
//! requests waiting on them, whatever worker thread they run on.
//!
//! A publish wakes the waiters that are waiting at that moment and nobody else: there is no
//! queue for absent waiters (docs/decisions/020-events.md). A subscription (a WebSocket session
//! that names a topic) is a waiter that stays until dropped, with a short queue of its own. Values cross threads as one shared
//! `Arc<Value>`; every waiter copies it into its own VM. The cluster engine plugs in with
//! [`set_remote`] (told of every local publish) and [`deliver`] (a publish from elsewhere, given
//! to local waiters only).

use std::collections::HashMap;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::task::{Context, Poll, Waker};

use rustomnic_core::Value;
use tokio::sync::oneshot;

/// Longest topic name, in bytes.
pub const MAX_TOPIC_LEN: usize = 256;
/// Largest value one publish may carry (estimated size of its bytes).
pub const MAX_VALUE_SIZE: usize = 1 << 20;
/// Most requests that may wait at once in one cage, over all its topics.
pub const MAX_WAITERS: usize = 1_000_000;

/// What the cluster engine is told of every local publish: (cage, topic, value).
pub type RemoteHook = Arc<dyn Fn(&str, &str, &Value) + Send + Sync>;

/// Events a subscription may have queued; further ones are dropped for it (and counted).
pub const SUBSCRIPTION_QUEUE: usize = 64;

enum Sink {
    Once(oneshot::Sender<Arc<Value>>),
    Stream(Arc<Mutex<Queue>>),
}

/// A subscription's events not yet received, and the task to wake for the next. Smaller than a
/// channel (an idle WebSocket session holds one) and allocated as events arrive.
#[derive(Default)]
struct Queue {
    items: VecDeque<Arc<Value>>,
    waker: Option<Waker>,
}

#[derive(Default)]
struct Cage {
    topics: HashMap<Box<str>, HashMap<u64, Sink>>,
    waiters: usize,
}

#[derive(Default)]
struct Bus {
    cages: Mutex<HashMap<Box<str>, Cage>>,
    remote: RwLock<Option<RemoteHook>>,
    next: AtomicU64,
}

fn bus() -> &'static Bus {
    static BUS: OnceLock<Bus> = OnceLock::new();
    BUS.get_or_init(Bus::default)
}

fn lock(b: &Bus) -> std::sync::MutexGuard<'_, HashMap<Box<str>, Cage>> {
    // A panic elsewhere while holding the lock leaves plain maps behind, still consistent.
    b.cages.lock().unwrap_or_else(|p| p.into_inner())
}

/// Why a publish or a wait was refused; the text is what the Lua error says.
#[derive(Debug, Clone, PartialEq)]
pub struct EventError(pub String);

impl std::fmt::Display for EventError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for EventError {}

/// Topics that start with this are the runtime's own, carried between processes with the
/// events (module code cannot publish or wait on them).
pub const RESERVED_PREFIX: &str = "_pmnc.";

/// The topic on which a process tells the others of its committed read-cache invalidations
/// (a value `[resource, key, ...]`; docs/decisions/143).
pub const CACHE_TOPIC: &str = "_pmnc.cache.invalidate";

/// What a process does with a read-cache invalidation from another process: (cage, value).
pub type CacheHook = fn(&str, &Value);

static CACHE_HOOK: std::sync::OnceLock<CacheHook> = std::sync::OnceLock::new();

/// Installs what reads invalidations from other processes (the resource crate's read cache).
pub fn set_cache_hook(hook: CacheHook) {
    let _ = CACHE_HOOK.set(hook);
}

/// Tells the other processes of the flock (when there is one) `value` on the runtime's own
/// `topic`, without waking anyone here.
pub fn tell_flock(cage: &str, topic: &str, value: &Value) {
    let hook = bus().remote.read().unwrap_or_else(|p| p.into_inner()).clone();
    if let Some(hook) = hook {
        hook(cage, topic, value);
    }
}

fn check_topic(what: &str, topic: &str) -> Result<(), EventError> {
    if topic.is_empty() {
        return Err(EventError(format!("{what}: the topic must not be empty")));
    }
    if topic.starts_with(RESERVED_PREFIX) {
        return Err(EventError(format!("{what}: topics starting with {RESERVED_PREFIX:?} are the runtime's own")));
    }
    if topic.len() > MAX_TOPIC_LEN {
        return Err(EventError(format!("{what}: topic of {} bytes is longer than the limit of {MAX_TOPIC_LEN}", topic.len())));
    }
    Ok(())
}

/// Roughly how many bytes `v` holds; stops counting once past `limit`.
fn estimated_size(v: &Value, limit: usize) -> usize {
    match v {
        Value::Nil | Value::Bool(_) | Value::Int(_) | Value::Float(_) => 8,
        Value::Str(s) => s.len() + 8,
        Value::Array(items) => {
            let mut n = 8;
            for i in items {
                n += estimated_size(i, limit);
                if n > limit {
                    break;
                }
            }
            n
        }
        Value::Map(entries) => {
            let mut n = 8;
            for (k, v) in entries {
                n += estimated_size(k, limit) + estimated_size(v, limit);
                if n > limit {
                    break;
                }
            }
            n
        }
    }
}

/// Publishes `value` on `topic` of `cage`: wakes every local waiter of the topic and tells the
/// remote hook, when one is installed. Returns how many local waiters were woken.
pub fn publish(cage: &str, topic: &str, value: Value) -> Result<usize, EventError> {
    check_topic("pmnc.events.publish", topic)?;
    let size = estimated_size(&value, MAX_VALUE_SIZE);
    if size > MAX_VALUE_SIZE {
        return Err(EventError(format!("pmnc.events.publish: the value is larger than the limit of {MAX_VALUE_SIZE} bytes")));
    }
    let hook = bus().remote.read().unwrap_or_else(|p| p.into_inner()).clone();
    if let Some(hook) = hook {
        hook(cage, topic, &value);
    }
    Ok(wake(cage, topic, value))
}

/// Gives a value published elsewhere (another process of the cluster) to the local waiters of
/// `topic` of `cage`, without telling the remote hook again. Returns how many were woken.
pub fn deliver(cage: &str, topic: &str, value: Value) -> usize {
    if topic.starts_with(RESERVED_PREFIX) {
        if topic == CACHE_TOPIC {
            if let Some(hook) = CACHE_HOOK.get() {
                hook(cage, &value);
            }
        }
        return 0;
    }
    wake(cage, topic, value)
}

/// Installs the cluster's hook; it is called on every local publish, on the publishing thread,
/// so it must only hand the value on (a channel), never block.
pub fn set_remote(hook: RemoteHook) {
    *bus().remote.write().unwrap_or_else(|p| p.into_inner()) = Some(hook);
}

/// Removes the cluster's hook.
pub fn clear_remote() {
    *bus().remote.write().unwrap_or_else(|p| p.into_inner()) = None;
}

fn wake(cage: &str, topic: &str, value: Value) -> usize {
    // Take the whole set under the lock and send outside it, so a fan-out to many waiters does
    // not hold up publishes and waits of other topics.
    let value = Arc::new(value);
    let mut woken = 0;
    let waiters = {
        let mut cages = lock(bus());
        let Some(c) = cages.get_mut(cage) else { return 0 };
        let Some(set) = c.topics.get_mut(topic) else { return 0 };
        let mut once = Vec::with_capacity(set.len());
        for (id, sink) in std::mem::take(set) {
            match sink {
                Sink::Once(tx) => once.push(tx),
                Sink::Stream(queue) => {
                    // Never blocks: a subscriber that is this far behind loses the event.
                    let waker = {
                        let mut q = queue.lock().unwrap_or_else(|p| p.into_inner());
                        if q.items.len() >= SUBSCRIPTION_QUEUE {
                            tracing::warn!(cage, topic, "a subscriber is {SUBSCRIPTION_QUEUE} events behind; this event is dropped for it");
                            None
                        } else {
                            q.items.push_back(value.clone());
                            woken += 1;
                            q.waker.take()
                        }
                    };
                    if let Some(w) = waker {
                        w.wake();
                    }
                    set.insert(id, Sink::Stream(queue));
                }
            }
        }
        c.waiters -= once.len();
        if set.is_empty() {
            c.topics.remove(topic);
        }
        once
    };
    for tx in waiters {
        if tx.send(value.clone()).is_ok() {
            woken += 1;
        }
    }
    woken
}

/// Starts waiting on `topic` of `cage`. The waiter is registered at once, so a publish made after
/// this returns reaches it even before it is first polled.
pub fn wait(cage: &str, topic: &str) -> Result<Waiter, EventError> {
    check_topic("pmnc.events.wait", topic)?;
    let (tx, rx) = oneshot::channel();
    let b = bus();
    let id = b.next.fetch_add(1, Ordering::Relaxed);
    let mut cages = lock(b);
    let c = cages.entry(cage.into()).or_default();
    if c.waiters >= MAX_WAITERS {
        return Err(EventError(format!("pmnc.events.wait: cage {cage} has {MAX_WAITERS} waiters already, the limit")));
    }
    c.topics.entry(topic.into()).or_default().insert(id, Sink::Once(tx));
    c.waiters += 1;
    Ok(Waiter { cage: cage.into(), topic: topic.into(), id, rx })
}

/// Subscribes to `topic` of `cage` until the subscription is dropped: every publish meanwhile is
/// queued for it (up to [`SUBSCRIPTION_QUEUE`]).
pub fn subscribe(cage: &str, topic: &str) -> Result<Subscription, EventError> {
    check_topic("subscribing", topic)?;
    let queue = Arc::new(Mutex::new(Queue::default()));
    let b = bus();
    let id = b.next.fetch_add(1, Ordering::Relaxed);
    let mut cages = lock(b);
    let c = cages.entry(cage.into()).or_default();
    if c.waiters >= MAX_WAITERS {
        return Err(EventError(format!("subscribing to {topic:?}: cage {cage} has {MAX_WAITERS} waiters already, the limit")));
    }
    c.topics.entry(topic.into()).or_default().insert(id, Sink::Stream(queue.clone()));
    c.waiters += 1;
    Ok(Subscription { key: Key { cage: cage.into(), topic: topic.into(), id }, queue })
}

/// See [`subscribe`].
pub struct Subscription {
    key: Key,
    queue: Arc<Mutex<Queue>>,
}

impl Subscription {
    pub fn topic(&self) -> &str {
        &self.key.topic
    }

    /// The next event published on the topic.
    pub async fn recv(&mut self) -> Option<Arc<Value>> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// The next event if one is queued; otherwise the task is woken when one is.
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Arc<Value>>> {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(v) = q.items.pop_front() {
            if q.items.is_empty() {
                // A burst's room goes back once it is read.
                q.items = VecDeque::new();
            }
            return Poll::Ready(Some(v));
        }
        if !q.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            q.waker = Some(cx.waker().clone());
        }
        Poll::Pending
    }
}

/// Where a waiter or subscription is registered; unregisters it when dropped.
struct Key {
    cage: Box<str>,
    topic: Box<str>,
    id: u64,
}

impl Drop for Key {
    fn drop(&mut self) {
        unregister(&self.cage, &self.topic, self.id);
    }
}

fn unregister(cage: &str, topic: &str, id: u64) {
    let mut cages = lock(bus());
    let Some(c) = cages.get_mut(cage) else { return };
    let Some(set) = c.topics.get_mut(topic) else { return };
    if set.remove(&id).is_some() {
        c.waiters -= 1;
        if set.is_empty() {
            c.topics.remove(topic);
        }
    }
}

/// Waiters on `topic` of `cage` now (in this process).
pub fn waiting(cage: &str, topic: &str) -> usize {
    lock(bus()).get(cage).and_then(|c| c.topics.get(topic)).map(|s| s.len()).unwrap_or(0)
}

/// Waiters of `cage` over all its topics, and how many topics have any.
pub fn cage_stats(cage: &str) -> (usize, usize) {
    lock(bus()).get(cage).map(|c| (c.waiters, c.topics.len())).unwrap_or((0, 0))
}

/// One registered wait; resolves with the published value. Dropped unresolved (timeout, the
/// request ended), it leaves the topic's set.
pub struct Waiter {
    cage: Box<str>,
    topic: Box<str>,
    id: u64,
    rx: oneshot::Receiver<Arc<Value>>,
}

impl Future for Waiter {
    type Output = Option<Arc<Value>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.rx).poll(cx).map(|r| r.ok())
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        unregister(&self.cage, &self.topic, self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
    }

    #[test]
    fn the_runtimes_topics_are_not_for_module_code() {
        for topic in [CACHE_TOPIC, "_pmnc.other"] {
            let e = publish("reserved-cage", topic, Value::Nil).unwrap_err();
            assert!(e.to_string().contains("are the runtime's own"), "{e}");
            assert!(wait("reserved-cage", topic).is_err());
            assert!(subscribe("reserved-cage", topic).is_err());
        }
        // One from elsewhere wakes nobody (it is not an event).
        assert_eq!(deliver("reserved-cage", "_pmnc.other", Value::Nil), 0);
        assert!(publish("reserved-cage", "pmnc.fine", Value::Nil).is_ok());
    }

    #[test]
    fn publish_reaches_waiters_on_other_threads() {
        let cage = "events-test-threads";
        let waiters: Vec<Waiter> = (0..4).map(|_| wait(cage, "t").unwrap()).collect();
        let threads: Vec<_> = waiters
            .into_iter()
            .map(|w| std::thread::spawn(move || rt().block_on(async { tokio::time::timeout(std::time::Duration::from_secs(5), w).await })))
            .collect();
        assert_eq!(waiting(cage, "t"), 4);
        assert_eq!(publish(cage, "t", Value::Int(7)).unwrap(), 4);
        for t in threads {
            let got = t.join().unwrap().expect("woken before the timeout");
            assert_eq!(got.as_deref(), Some(&Value::Int(7)));
        }
        assert_eq!(cage_stats(cage), (0, 0));
    }

    #[test]
    fn no_queue_for_absent_waiters_and_cages_are_separate() {
        assert_eq!(publish("events-test-a", "t", Value::Int(1)).unwrap(), 0);
        let w = wait("events-test-a", "t").unwrap();
        assert_eq!(publish("events-test-b", "t", Value::Int(2)).unwrap(), 0);
        assert_eq!(waiting("events-test-a", "t"), 1);
        drop(w);
        assert_eq!(waiting("events-test-a", "t"), 0);
        assert_eq!(cage_stats("events-test-a"), (0, 0));
    }

    #[test]
    fn limits_and_remote_hook() {
        let long = "x".repeat(MAX_TOPIC_LEN + 1);
        assert!(publish("events-test-l", &long, Value::Nil).unwrap_err().0.contains("longer than the limit"));
        assert!(wait("events-test-l", "").is_err());
        let big = Value::Str(vec![0; MAX_VALUE_SIZE + 1]);
        assert!(publish("events-test-l", "t", big).unwrap_err().0.contains("larger than the limit"));

        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        set_remote(Arc::new(move |cage: &str, topic: &str, v: &Value| {
            if cage == "events-test-r" {
                s.lock().unwrap().push((topic.to_string(), v.clone()));
            }
        }));
        let w = wait("events-test-r", "t").unwrap();
        assert_eq!(deliver("events-test-r", "t", Value::Int(5)), 1);
        assert_eq!(rt().block_on(w).as_deref(), Some(&Value::Int(5)));
        assert!(seen.lock().unwrap().is_empty(), "deliver must not go back to the cluster");
        publish("events-test-r", "u", Value::Int(6)).unwrap();
        assert_eq!(seen.lock().unwrap().as_slice(), &[("u".to_string(), Value::Int(6))]);
        clear_remote();
    }

    #[test]
    fn subscriptions_stay_and_queue() {
        let cage = "events-test-sub";
        let mut sub = subscribe(cage, "t").unwrap();
        let w = wait(cage, "t").unwrap();
        assert_eq!(publish(cage, "t", Value::Int(1)).unwrap(), 2);
        assert_eq!(publish(cage, "t", Value::Int(2)).unwrap(), 1, "the waiter was woken once and left");
        assert_eq!(rt().block_on(w).as_deref(), Some(&Value::Int(1)));
        let got = rt().block_on(async { (sub.recv().await, sub.recv().await) });
        assert_eq!((got.0.as_deref(), got.1.as_deref()), (Some(&Value::Int(1)), Some(&Value::Int(2))));
        assert_eq!(waiting(cage, "t"), 1);
        drop(sub);
        assert_eq!(cage_stats(cage), (0, 0));
    }
}
