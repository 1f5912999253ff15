//! `[queues.NAME]` of cage.toml: the queues a cage accepts durable calls on.
//!
//! ```toml
//! [queues.retry]
//! concurrency = 16          # calls of this queue running at once in this process
//! keep_order = false        # true: one at a time, in enqueue order (a failing call holds the rest)
//! rate_limit = 0            # calls started per second, 0 = no limit
//! expires_in = "1d"         # default time a call is tried before it goes to dead letters
//! dedup_window = "3d"       # how long a done call's id keeps refusing the same id
//! result_ttl = "1h"         # how long pmnc.calls.result(id) keeps a done call's value
//! timeout = "30s"           # deadline of one attempt (default: the cage's request_timeout)
//! max_attempts = 0          # attempts before a failing call goes to dead letters, 0 = no limit
//! store = "embedded"        # "embedded": the cage's SQLite file; "cluster": a JetStream stream
//!                           # shared by every copy of the cage (needs [cluster]; docs/queues.md)
//! replicas = 1              # store = "cluster" only: copies of its stream and results, 1 to 5
//! ack_wait = "30s"          # store = "cluster" only: how soon a dead copy's call runs elsewhere
//!
//! [queues.retry.backoff]
//! initial = "1s"            # wait before the first retry
//! max = "10m"               # longest wait between attempts
//! multiplier = 2            # each wait is this many times the last (a number, "1.5" as text)
//! jitter = 20               # percent of random spread around each wait
//! ```

use std::time::Duration;

use rustomnic_core::Section;

const DAY: Duration = Duration::from_secs(86_400);
/// The largest `max_attempts` a queue or a call may set.
pub const MAX_ATTEMPTS: u32 = 1_000_000;
const YEAR: Duration = Duration::from_secs(366 * 86_400);

/// One configured queue.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueConfig {
    pub name: String,
    pub concurrency: usize,
    pub keep_order: bool,
    /// Calls started per second; 0 is unlimited.
    pub rate_limit: u32,
    pub expires_in: Duration,
    pub dedup_window: Duration,
    pub result_ttl: Duration,
    /// Deadline of one attempt; None means the cage's request_timeout.
    pub timeout: Option<Duration>,
    /// Attempts after which a failing call is dead (a call's own `max_attempts` wins); None is
    /// no limit but the expiry.
    pub max_attempts: Option<u32>,
    pub backoff: Backoff,
    /// Where its calls are kept.
    pub store: StoreKind,
    /// store = "cluster": how long a call's delivery waits for its copy's in-progress acks
    /// before JetStream hands it to another copy.
    pub ack_wait: Duration,
}

/// Where a queue keeps its calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    /// The cage's own SQLite file (the default).
    Embedded,
    /// A JetStream stream of the flock, shared by every copy of the cage, with this many
    /// replicas (1 to 5).
    Cluster { replicas: usize },
}

/// Default `ack_wait` of a clustered queue.
pub const ACK_WAIT: Duration = Duration::from_secs(30);

/// How long to wait before retry n.
#[derive(Debug, Clone, PartialEq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
    pub multiplier: f64,
    /// 0.0 ..= 1.0
    pub jitter: f64,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { initial: Duration::from_secs(1), max: Duration::from_secs(600), multiplier: 2.0, jitter: 0.2 }
    }
}

impl Backoff {
    /// The wait before the attempt after `attempts` failed ones; `random` is uniform in [0, 1).
    pub fn wait(&self, attempts: u32, random: f64) -> Duration {
        let base = self.initial.as_secs_f64() * self.multiplier.powi(attempts.saturating_sub(1).min(1000) as i32);
        let base = base.min(self.max.as_secs_f64());
        let spread = 1.0 + self.jitter * (2.0 * random - 1.0);
        Duration::from_secs_f64((base * spread).clamp(0.0, self.max.as_secs_f64()))
    }
}

impl QueueConfig {
    pub fn new(name: &str) -> QueueConfig {
        QueueConfig {
            name: name.to_string(),
            concurrency: 16,
            keep_order: false,
            rate_limit: 0,
            expires_in: DAY,
            dedup_window: 3 * DAY,
            result_ttl: Duration::from_secs(3600),
            timeout: None,
            max_attempts: None,
            backoff: Backoff::default(),
            store: StoreKind::Embedded,
            ack_wait: ACK_WAIT,
        }
    }
}

/// Reads every `[queues.NAME]` of the `queues` table; problems are recorded in the sections.
pub fn read_queues(queues: &Section) -> Vec<QueueConfig> {
    let mut out = Vec::new();
    for (name, s) in queues.tables() {
        if !rustomnic_core::is_identifier(&name) {
            queues.error(&name, "queue names are identifiers (letters, digits and _)");
            continue;
        }
        let mut q = QueueConfig::new(&name);
        if let Some(n) = s.integer("concurrency", 1, 10_000) {
            q.concurrency = n.value as usize;
        }
        if let Some(b) = s.bool("keep_order") {
            q.keep_order = b.value;
        }
        if let Some(n) = s.integer("rate_limit", 0, 1_000_000) {
            q.rate_limit = n.value as u32;
        }
        if let Some(n) = s.integer("max_attempts", 0, MAX_ATTEMPTS as i64) {
            q.max_attempts = (n.value > 0).then_some(n.value as u32);
        }
        if let Some(d) = s.duration("expires_in", YEAR) {
            q.expires_in = d.value;
        }
        if let Some(d) = s.duration("dedup_window", YEAR) {
            q.dedup_window = d.value;
        }
        if let Some(d) = s.duration("result_ttl", YEAR) {
            q.result_ttl = d.value;
        }
        if let Some(d) = s.duration("timeout", Duration::from_secs(3600)) {
            q.timeout = Some(d.value);
        }
        if let Some(b) = s.table("backoff") {
            if let Some(d) = b.duration("initial", DAY) {
                q.backoff.initial = d.value;
            }
            if let Some(d) = b.duration("max", 7 * DAY) {
                q.backoff.max = d.value;
            }
            let multiplier = match b.kind_of("multiplier") {
                Some("integer") => b.integer("multiplier", 1, 100).map(|n| n.value as f64),
                Some(_) => b.string("multiplier").and_then(|m| match m.value.trim().parse::<f64>() {
                    Ok(f) if (1.0..=100.0).contains(&f) => Some(f),
                    _ => {
                        b.error("multiplier", format!("{:?} is not a number from 1 to 100", m.value));
                        None
                    }
                }),
                None => None,
            };
            if let Some(m) = multiplier {
                q.backoff.multiplier = m;
            }
            if let Some(j) = b.integer("jitter", 0, 100) {
                q.backoff.jitter = j.value as f64 / 100.0;
            }
            if q.backoff.initial > q.backoff.max {
                b.error("initial", "is longer than max");
            }
            b.finish();
        }
        read_store(&s, &name, &mut q);
        s.finish();
        out.push(q);
    }
    out
}

/// `store`, `replicas` and `ack_wait` of `[queues.NAME]`.
fn read_store(s: &Section, name: &str, q: &mut QueueConfig) {
    let clustered = match s.string("store") {
        Some(v) if v.value == "embedded" => false,
        Some(v) if v.value == "cluster" => true,
        Some(v) => {
            s.error("store", format!("{:?} is not a store: \"embedded\" (the cage's SQLite file) or \"cluster\" (JetStream)", v.value));
            return;
        }
        None => false,
    };
    let replicas = s.integer("replicas", 1, 5).map(|n| n.value as usize);
    let ack_wait = s.duration("ack_wait", Duration::from_secs(3600));
    if !clustered {
        for key in ["replicas", "ack_wait"] {
            if s.has(key) {
                s.error(key, format!("applies to store = \"cluster\" only (queue {name} keeps its calls in the cage's file)"));
            }
        }
        return;
    }
    if let Some(d) = ack_wait {
        if d.value < Duration::from_secs(1) {
            s.error("ack_wait", "must be at least 1s");
        } else {
            q.ack_wait = d.value;
        }
    }
    if !s.file().root().has("cluster") {
        s.error("store", format!("queue {name} has store = \"cluster\" but this cage.toml has no [cluster] table: add one (docs/cluster.md) or remove store"));
    }
    q.store = StoreKind::Cluster { replicas: replicas.unwrap_or(1) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_max_with_bounded_jitter() {
        let b = Backoff { initial: Duration::from_millis(100), max: Duration::from_secs(1), multiplier: 2.0, jitter: 0.5 };
        assert_eq!(b.wait(1, 0.5), Duration::from_millis(100));
        assert_eq!(b.wait(3, 0.5), Duration::from_millis(400));
        assert_eq!(b.wait(30, 0.5), Duration::from_secs(1));
        assert!(b.wait(2, 0.0) >= Duration::from_millis(100) && b.wait(2, 0.0) < Duration::from_millis(200));
        assert!(b.wait(2, 0.999) > Duration::from_millis(200));
    }

    #[test]
    fn queues_are_read_and_bad_keys_named() {
        let text = "[queues.retry]\nconcurrency = 4\nkeep_order = true\nexpires_in = \"2s\"\nmax_attempts = 5\n[queues.retry.backoff]\ninitial = \"10ms\"\nmultiplier = \"1.5\"\njitter = 10\n[queues.bad]\nconcurrency = 0\nwhat = 1\nmax_attempts = -1\n";
        let file = rustomnic_core::SourceFile::parse(std::path::Path::new("cage.toml"), text.to_string()).unwrap();
        let root = file.root();
        let qs = read_queues(&root.table("queues").unwrap());
        assert_eq!(qs.len(), 2);
        assert_eq!((qs[0].name.as_str(), qs[1].name.as_str()), ("retry", "bad"));
        assert_eq!((qs[0].concurrency, qs[0].keep_order, qs[0].expires_in), (4, true, Duration::from_secs(2)));
        assert_eq!((qs[0].backoff.multiplier, qs[0].backoff.jitter), (1.5, 0.1));
        assert_eq!((qs[0].max_attempts, qs[1].max_attempts), (Some(5), None));
        let errors: Vec<String> = file.take_errors().iter().map(|e| e.to_string()).collect();
        assert!(errors.iter().any(|e| e.contains("queues.bad.concurrency")), "{errors:?}");
        assert!(errors.iter().any(|e| e.contains("queues.bad.what")), "{errors:?}");
        assert!(errors.iter().any(|e| e.contains("queues.bad.max_attempts")), "{errors:?}");
    }

    fn read(text: &str) -> (Vec<QueueConfig>, Vec<String>) {
        let file = rustomnic_core::SourceFile::parse(std::path::Path::new("cage.toml"), text.to_string()).unwrap();
        let qs = read_queues(&file.root().table("queues").unwrap());
        (qs, file.take_errors().iter().map(|e| e.to_string()).collect())
    }

    /// Issue 18: a clustered queue needs [cluster]; its keys are refused on the embedded store,
    /// and every problem names file, line and key.
    #[test]
    fn the_store_of_a_queue_is_read_and_checked() {
        let (qs, errors) = read("[cluster]\nurl = \"nats://127.0.0.1:4222\"\n[queues.a]\nstore = \"cluster\"\nreplicas = 3\nack_wait = \"5s\"\n[queues.b]\n");
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!((qs[0].store, qs[0].ack_wait), (StoreKind::Cluster { replicas: 3 }, Duration::from_secs(5)));
        assert_eq!((qs[1].store, qs[1].ack_wait), (StoreKind::Embedded, ACK_WAIT));
        let (_, errors) = read("[queues.a]\nstore = \"cluster\"\n");
        assert!(
            errors.iter().any(|e| e.contains("cage.toml:2")
                && e.contains("queues.a.store")
                && e.contains("queue a has store = \"cluster\" but this cage.toml has no [cluster] table")),
            "{errors:?}"
        );
        let (_, errors) = read("[queues.a]\nstore = \"disk\"\n[queues.b]\nreplicas = 2\n[queues.c]\nstore = \"cluster\"\nreplicas = 7\nack_wait = \"10ms\"\n[cluster]\nurl = \"nats://x:4222\"\n");
        assert!(errors.iter().any(|e| e.contains("queues.a.store") && e.contains("\"disk\" is not a store")), "{errors:?}");
        assert!(errors.iter().any(|e| e.contains("queues.b.replicas") && e.contains("applies to store = \"cluster\" only")), "{errors:?}");
        assert!(errors.iter().any(|e| e.contains("queues.c.replicas")), "{errors:?}");
        assert!(errors.iter().any(|e| e.contains("queues.c.ack_wait") && e.contains("at least 1s")), "{errors:?}");
    }
}
