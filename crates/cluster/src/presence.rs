//! Who is in the flock: every process publishes a heartbeat; every process keeps the roster of
//! the instances it hears, marking down those that fall silent; `pmnc cluster status` asks every
//! process for its roster and merges the answers.
//!
//! Heartbeats are JSON (a few per second per process), so `nats sub 'pmnc.*.heartbeat'` shows
//! them readably.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use serde_json::{json, Value as Json};
use tokio::sync::watch;

use crate::connect::Connection;
use crate::{heartbeat_subject, status_subject, Identity};

/// Instances silent for this many heartbeat intervals are marked down.
pub const MISSED_BEATS: u32 = 3;
/// Down instances are forgotten after this long.
pub const FORGET_AFTER: Duration = Duration::from_secs(600);
/// The most instances a roster keeps.
pub const MAX_INSTANCES: usize = 4096;
/// The largest heartbeat a roster keeps, in bytes.
pub const MAX_HEARTBEAT: usize = 64 << 10;

/// What this process says about itself in each heartbeat besides its identity: its cages and
/// interfaces. Filled by the runtime.
pub type Describe = Arc<dyn Fn() -> Json + Send + Sync>;

/// The clustered queues this process consumes, by (cage, queue), with the count of their calls
/// running here now: announced in every heartbeat as `queues_running` (a few bytes a queue), so
/// that every copy knows how many copies share a queue's `rate_limit` (docs/decisions/153) and
/// the monitor and `pmnc queue ls` show each copy's running calls.
static CONSUMED: Mutex<BTreeMap<(String, String), Arc<AtomicUsize>>> = Mutex::new(BTreeMap::new());

/// Says in this process's heartbeats that it consumes clustered queue `queue` of `cage`; the
/// counter returned is its calls running here (the consumer adds and takes away).
pub fn consume_queue(cage: &str, queue: &str) -> Arc<AtomicUsize> {
    let mut all = CONSUMED.lock().unwrap_or_else(|p| p.into_inner());
    all.entry((cage.to_string(), queue.to_string())).or_default().clone()
}

/// Stops announcing queue `queue` of `cage` (its consumer stopped).
pub fn stop_consuming(cage: &str, queue: &str) {
    CONSUMED.lock().unwrap_or_else(|p| p.into_inner()).remove(&(cage.to_string(), queue.to_string()));
}

/// The calls of clustered queues whose delivery this process holds now, by (cage, queue): the
/// [`call_hash`] of each id, announced in every heartbeat as `queues_held`. A copy handed a
/// call again while the copy that holds it lives (its in-progress acks lost while the
/// consumer's leader was elected, or its end write waiting for the bucket's) leaves it to that
/// copy instead of running it a second time (docs/decisions/154).
static HELD: Mutex<BTreeMap<(String, String), HashSet<u64>>> = Mutex::new(BTreeMap::new());

/// The most held calls one heartbeat announces (~20 bytes each, well under MAX_HEARTBEAT); past
/// it a copy's further calls are not announced, and a call handed again meanwhile runs as it
/// would without the announcement.
pub const MAX_HELD_ANNOUNCED: usize = 2048;

/// A stable 64-bit hash of a call id (FNV-1a): the same in every process and version, so
/// copies compare what they announce.
pub fn call_hash(id: &str) -> u64 {
    id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3))
}

/// This process's hold of one call of a clustered queue, announced while it lives.
#[derive(Debug)]
pub struct Held {
    key: (String, String),
    hash: u64,
}

/// Holds call `id` of queue `queue` of `cage` in this process; None when this process holds it
/// already (the same call delivered to it again while its first delivery still runs here).
pub fn hold(cage: &str, queue: &str, id: &str) -> Option<Held> {
    let key = (cage.to_string(), queue.to_string());
    let hash = call_hash(id);
    let added = HELD.lock().unwrap_or_else(|p| p.into_inner()).entry(key.clone()).or_default().insert(hash);
    // Made only when added: a Held dropped here would take the first hold's announcement away.
    added.then(|| Held { key, hash })
}

/// Whether this process holds call `id` of queue `queue` of `cage` now.
pub fn holds(cage: &str, queue: &str, id: &str) -> bool {
    let all = HELD.lock().unwrap_or_else(|p| p.into_inner());
    all.get(&(cage.to_string(), queue.to_string())).is_some_and(|set| set.contains(&call_hash(id)))
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut all = HELD.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(set) = all.get_mut(&self.key) {
            set.remove(&self.hash);
            if set.is_empty() {
                all.remove(&self.key);
            }
        }
    }
}

/// `{"cage": {"queue": ["hash in hex", ...]}}` of the calls held here; None when none are.
fn queues_held() -> Option<Json> {
    let all = HELD.lock().unwrap_or_else(|p| p.into_inner());
    if all.is_empty() {
        return None;
    }
    let mut left = MAX_HELD_ANNOUNCED;
    let mut by_cage = serde_json::Map::new();
    for ((cage, queue), set) in all.iter() {
        let hashes: Vec<Json> = set.iter().take(left).map(|h| json!(format!("{h:016x}"))).collect();
        left -= hashes.len();
        let entry = by_cage.entry(cage.clone()).or_insert_with(|| json!({}));
        if let Some(o) = entry.as_object_mut() {
            o.insert(queue.clone(), Json::Array(hashes));
        }
    }
    Some(Json::Object(by_cage))
}

/// `{"cage": {"queue": running}}` of the queues this process consumes; None when it has none.
fn queues_running() -> Option<Json> {
    let all = CONSUMED.lock().unwrap_or_else(|p| p.into_inner());
    if all.is_empty() {
        return None;
    }
    let mut by_cage = serde_json::Map::new();
    for ((cage, queue), running) in all.iter() {
        let entry = by_cage.entry(cage.clone()).or_insert_with(|| json!({}));
        if let Some(o) = entry.as_object_mut() {
            o.insert(queue.clone(), json!(running.load(Ordering::Relaxed)));
        }
    }
    Some(Json::Object(by_cage))
}

/// One copy of a cage consuming a clustered queue, as the roster knows it.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueCopy {
    pub instance: String,
    pub host: String,
    pub pid: u64,
    /// Calls of the queue running on it, as of its last heartbeat.
    pub running: u64,
    /// Heard within its last MISSED_BEATS heartbeat intervals, and not leaving.
    pub up: bool,
}

#[derive(Debug, Clone)]
struct Entry {
    beat: Json,
    last_seen: Instant,
    interval: Duration,
    down: Option<&'static str>,
}

/// The instances of the flock this process has heard of.
#[derive(Default)]
pub struct Roster {
    entries: Mutex<BTreeMap<String, Entry>>,
}

impl Roster {
    /// A heartbeat as it arrived from the flock.
    ///
    /// Any process on the subject can send one, so what a roster keeps is bounded: a heartbeat
    /// over [`MAX_HEARTBEAT`] bytes is refused, and so is a new instance once [`MAX_INSTANCES`]
    /// are known (the ones known keep being heard; a flood of made-up names cannot push them
    /// out or grow the roster for the ten minutes before it forgets them).
    pub fn hear(&self, payload: &[u8]) -> Result<(), String> {
        if payload.len() > MAX_HEARTBEAT {
            return Err(format!("a heartbeat of {} bytes (at most {MAX_HEARTBEAT})", payload.len()));
        }
        let beat: Json = serde_json::from_slice(payload).map_err(|e| format!("unreadable heartbeat: {e}"))?;
        if beat.get("instance").and_then(Json::as_str).is_none() {
            return Err("a heartbeat without an instance".into());
        }
        if self.heard(beat) {
            Ok(())
        } else {
            Err(format!("a heartbeat from a new instance while {MAX_INSTANCES} are known"))
        }
    }

    /// How many instances it knows.
    pub fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// False when the beat was dropped: a new instance with the roster full.
    fn heard(&self, beat: Json) -> bool {
        let Some(instance) = beat.get("instance").and_then(Json::as_str).map(str::to_string) else { return false };
        let interval = Duration::from_millis(beat.get("heartbeat_ms").and_then(Json::as_u64).unwrap_or(1000).clamp(100, 60_000));
        let leaving = beat.get("state").and_then(Json::as_str) == Some("leaving");
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= MAX_INSTANCES && !entries.contains_key(&instance) {
            let now = Instant::now();
            entries.retain(|_, e| now.duration_since(e.last_seen) < FORGET_AFTER);
            if entries.len() >= MAX_INSTANCES {
                return false;
            }
        }
        entries.insert(instance, Entry { beat, last_seen: Instant::now(), interval, down: leaving.then_some("left") });
        true
    }

    fn sweep(&self) {
        let now = Instant::now();
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.retain(|_, e| now.duration_since(e.last_seen) < FORGET_AFTER);
        for e in entries.values_mut() {
            if e.down.is_none() && now.duration_since(e.last_seen) > e.interval * MISSED_BEATS {
                e.down = Some("silent");
            }
        }
    }

    /// The queues of `cage` as the instances of the flock announce them (name, `expires_in` in
    /// ms), merged over its copies; None when no instance runs it, or one runs it without
    /// announcing its queues (an older version): then nothing can be told about them.
    pub fn cage_queues(&self, cage: &str) -> Option<Vec<(String, u64)>> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let mut found: Option<Vec<(String, u64)>> = None;
        for e in entries.values() {
            let Some(cages) = e.beat.get("cages").and_then(Json::as_array) else { continue };
            for c in cages.iter().filter(|c| c.get("name").and_then(Json::as_str) == Some(cage)) {
                let queues = c.get("queues").and_then(Json::as_array)?;
                let list = found.get_or_insert_with(Vec::new);
                for q in queues {
                    if let (Some(name), Some(ms)) = (q.get("name").and_then(Json::as_str), q.get("expires_in_ms").and_then(Json::as_u64)) {
                        if !list.iter().any(|(n, _)| n == name) {
                            list.push((name.to_string(), ms));
                        }
                    }
                }
            }
        }
        found
    }

    /// The copies that announce consuming clustered queue `queue` of `cage` (up or down, until
    /// forgotten), sorted by instance.
    pub fn queue_copies(&self, cage: &str, queue: &str) -> Vec<QueueCopy> {
        let now = Instant::now();
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries
            .iter()
            .filter_map(|(id, e)| {
                let running = e.beat.get("queues_running")?.get(cage)?.get(queue)?.as_u64()?;
                let up = e.down.is_none() && now.duration_since(e.last_seen) <= e.interval * MISSED_BEATS;
                let host = e.beat.get("host").and_then(Json::as_str).unwrap_or_default().to_string();
                let pid = e.beat.get("pid").and_then(Json::as_u64).unwrap_or(0);
                Some(QueueCopy { instance: id.clone(), host, pid, running, up })
            })
            .collect()
    }

    /// The live instance other than `me` whose heartbeat says it holds call `id` of queue
    /// `queue` of `cage`, if any (live: heard within MISSED_BEATS intervals and not leaving).
    pub fn held_elsewhere(&self, cage: &str, queue: &str, id: &str, me: &str) -> Option<String> {
        let hash = format!("{:016x}", call_hash(id));
        let now = Instant::now();
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries
            .iter()
            .filter(|(instance, e)| instance.as_str() != me && e.down.is_none() && now.duration_since(e.last_seen) <= e.interval * MISSED_BEATS)
            .find(|(_, e)| {
                e.beat
                    .get("queues_held")
                    .and_then(|h| h.get(cage))
                    .and_then(|h| h.get(queue))
                    .and_then(Json::as_array)
                    .is_some_and(|held| held.iter().any(|h| h.as_str() == Some(hash.as_str())))
            })
            .map(|(instance, _)| instance.clone())
    }

    /// How many copies consume clustered queue `queue` of `cage` now: those whose heartbeat
    /// says so and came within MISSED_BEATS intervals. At least 1 (this process, before its
    /// first heartbeat is heard).
    pub fn live_copies(&self, cage: &str, queue: &str) -> usize {
        self.queue_copies(cage, queue).iter().filter(|c| c.up).count().max(1)
    }

    /// Every known instance: its last heartbeat plus `state` ("up", "down"), `down_reason` and
    /// `last_seen_ms` (milliseconds since its last heartbeat).
    pub fn snapshot(&self) -> Vec<Json> {
        self.sweep();
        let now = Instant::now();
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries
            .values()
            .map(|e| {
                let mut v = e.beat.clone();
                if let Some(o) = v.as_object_mut() {
                    o.insert("state".into(), json!(if e.down.is_some() { "down" } else { "up" }));
                    o.insert("down_reason".into(), json!(e.down));
                    o.insert("last_seen_ms".into(), json!(now.duration_since(e.last_seen).as_millis() as u64));
                }
                v
            })
            .collect()
    }
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64()
}

/// Requests of every interface of this process running now (calls from other processes
/// included: they count under the interface "cluster").
fn requests_in_flight() -> i64 {
    rustomnic_core::metrics::interfaces().iter().map(|(_, _, m)| m.in_flight.load(Ordering::Relaxed).max(0)).sum()
}

/// This process's heartbeat.
pub fn heartbeat(identity: &Identity, describe: &Describe, interval: Duration, leaving: bool) -> Json {
    let mut beat = json!({
        "instance": identity.instance,
        "host": identity.host,
        "pid": identity.pid,
        "version": identity.version,
        "started": identity.started_unix,
        "uptime_s": (unix_now() - identity.started_unix).max(0.0).round() as u64,
        "heartbeat_ms": interval.as_millis() as u64,
        "state": if leaving { "leaving" } else { "up" },
        "load": {
            "requests_in_flight": requests_in_flight(),
            "calls_in_flight": identity.stats.in_flight.load(Ordering::Relaxed),
            "calls_served": identity.stats.served.load(Ordering::Relaxed),
            "calls_failed": identity.stats.failed.load(Ordering::Relaxed),
        },
    });
    if let (Some(o), Json::Object(more)) = (beat.as_object_mut(), describe()) {
        o.extend(more);
    }
    if let (Some(o), Some(running)) = (beat.as_object_mut(), queues_running()) {
        o.insert("queues_running".into(), running);
    }
    if let (Some(o), Some(held)) = (beat.as_object_mut(), queues_held()) {
        o.insert("queues_held".into(), held);
    }
    beat
}

/// Publishes heartbeats, keeps the roster and answers status requests until `shutdown`; then
/// says goodbye so that others mark this instance down at once.
pub async fn run(conn: Connection, identity: Arc<Identity>, roster: Arc<Roster>, describe: Describe, interval: Duration, mut shutdown: watch::Receiver<bool>) {
    let flock = identity.flock.clone();
    let mut beats = match conn.client.subscribe(heartbeat_subject(&flock)).await {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::error!("cluster: cannot subscribe to heartbeats: {e}");
            None
        }
    };
    let mut asks = match conn.client.subscribe(status_subject(&flock)).await {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::error!("cluster: cannot answer status requests: {e}");
            None
        }
    };
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let beat = heartbeat(&identity, &describe, interval, false);
                roster.heard(beat.clone());
                if conn.is_up() {
                    let _ = conn.client.publish(heartbeat_subject(&flock), beat.to_string().into()).await;
                }
            }
            Some(m) = next(&mut beats) => {
                if let Err(e) = roster.hear(&m.payload) {
                    tracing::debug!("cluster: {e} on {}", m.subject);
                }
            }
            Some(m) = next(&mut asks) => {
                if let Some(reply) = m.reply {
                    let answer = json!({ "from": identity.instance, "instances": roster.snapshot() });
                    let _ = conn.client.publish(reply, answer.to_string().into()).await;
                }
            }
            _ = async { let _ = shutdown.wait_for(|s| *s).await; } => break,
        }
    }
    let bye = heartbeat(&identity, &describe, interval, true);
    let _ = conn.client.publish(heartbeat_subject(&flock), bye.to_string().into()).await;
    let _ = tokio::time::timeout(Duration::from_secs(1), conn.client.flush()).await;
}

async fn next(sub: &mut Option<async_nats::Subscriber>) -> Option<async_nats::Message> {
    match sub {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

/// Asks every process of the flock for its roster, for `wait`, and merges the answers: an
/// instance's own answer wins, otherwise the freshest word about it.
pub async fn ask(conn: &Connection, flock: &str, wait: Duration) -> Result<Vec<Json>, String> {
    let inbox = conn.client.new_inbox();
    let mut sub = conn.client.subscribe(inbox.clone()).await.map_err(|e| format!("cannot subscribe to {inbox}: {e}"))?;
    conn.client.publish_with_reply(status_subject(flock), inbox, "".into()).await.map_err(|e| format!("cannot ask the flock: {e}"))?;
    let until = tokio::time::Instant::now() + wait;
    let mut merged = Merged::default();
    while let Ok(Some(m)) = tokio::time::timeout_at(until, sub.next()).await {
        merged.add(&m.payload);
    }
    Ok(merged.instances())
}

/// The answers of a status request, merged: an instance's own answer wins, otherwise the
/// freshest word about it.
#[derive(Default)]
pub struct Merged {
    by_id: BTreeMap<String, (bool, Json)>,
}

impl Merged {
    /// One process's answer as it arrived; unreadable ones are skipped.
    pub fn add(&mut self, payload: &[u8]) {
        let Ok(answer) = serde_json::from_slice::<Json>(payload) else { return };
        let from = answer.get("from").and_then(Json::as_str).unwrap_or_default().to_string();
        for inst in answer.get("instances").and_then(Json::as_array).cloned().unwrap_or_default() {
            let Some(id) = inst.get("instance").and_then(Json::as_str).map(str::to_string) else { continue };
            let own = id == from;
            let seen = |j: &Json| j.get("last_seen_ms").and_then(Json::as_u64).unwrap_or(u64::MAX);
            let better = match self.by_id.get(&id) {
                None => true,
                Some((was_own, old)) => own || (!*was_own && seen(&inst) < seen(old)),
            };
            if better {
                self.by_id.insert(id, (own, inst));
            }
        }
    }

    pub fn instances(self) -> Vec<Json> {
        self.by_id.into_values().map(|(_, j)| j).collect()
    }
}

/// `pmnc cluster status`: connects, asks, and returns the merged roster.
pub fn ask_blocking(config: &crate::ClusterConfig, wait: Duration) -> Result<Vec<Json>, crate::Error> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| crate::Error::Config(format!("cannot start a runtime: {e}")))?;
    rt.block_on(async {
        let conn = crate::connect::connect(config, "pmnc cluster status", false).await?;
        let instances = ask(&conn, &config.flock, wait).await.map_err(crate::Error::Unreachable)?;
        let _ = conn.client.drain().await;
        Ok(instances)
    })
}

/// Control characters escaped (`\n`, `\u{1b}`): what other processes say is shown, never
/// obeyed by the terminal, and cannot make rows of its own.
fn shown(text: &str) -> String {
    text.chars().map(|c| if c.is_control() { c.escape_default().to_string() } else { c.to_string() }).collect()
}

/// The roster as a table: one row per cage of each instance.
pub fn table(instances: &[Json]) -> String {
    let mut rows: Vec<[String; 8]> = Vec::new();
    for i in instances {
        let s = |k: &str| shown(&i.get(k).map(|v| v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string())).unwrap_or_default());
        let uptime = i.get("uptime_s").and_then(Json::as_u64).map(human).unwrap_or_default();
        let state = match i.get("down_reason").and_then(Json::as_str) {
            Some(reason) if s("state") == "down" => format!("down ({})", shown(reason)),
            _ => s("state"),
        };
        let load = i.pointer("/load/requests_in_flight").map(|v| v.to_string()).unwrap_or_default();
        let cages: Vec<String> = i
            .get("cages")
            .and_then(Json::as_array)
            .map(|a| a.iter().filter_map(|c| c.get("name").and_then(Json::as_str).map(shown)).collect())
            .unwrap_or_default();
        let cages = if cages.is_empty() { vec!["-".to_string()] } else { cages };
        for cage in cages {
            rows.push([cage, s("instance"), s("host"), s("pid"), s("version"), uptime.clone(), state.clone(), load.clone()]);
        }
    }
    rows.sort();
    let header = ["CAGE", "INSTANCE", "HOST", "PID", "VERSION", "UPTIME", "STATE", "IN FLIGHT"].map(str::to_string);
    let mut widths = header.clone().map(|h| h.len());
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r.iter()) {
            *w = (*w).max(c.len());
        }
    }
    let mut out = String::new();
    for r in std::iter::once(&header).chain(rows.iter()) {
        let line: Vec<String> = r.iter().zip(widths.iter()).map(|(c, w)| format!("{c:<w$}")).collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

fn human(s: u64) -> String {
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        3600..86400 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{}h", s / 86400, (s % 86400) / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silent_instances_go_down_and_leavers_at_once() {
        let roster = Roster::default();
        roster.heard(json!({"instance": "a", "heartbeat_ms": 100, "state": "up"}));
        roster.heard(json!({"instance": "b", "heartbeat_ms": 100, "state": "leaving"}));
        let snap = roster.snapshot();
        let state = |id: &str, snap: &[Json]| snap.iter().find(|j| j["instance"] == id).map(|j| j["state"].as_str().unwrap_or("").to_string());
        assert_eq!(state("a", &snap).as_deref(), Some("up"));
        assert_eq!(state("b", &snap).as_deref(), Some("down"));
        // Pretend a's last beat is old.
        {
            let mut e = roster.entries.lock().unwrap();
            e.get_mut("a").unwrap().last_seen -= Duration::from_millis(400);
        }
        let snap = roster.snapshot();
        assert_eq!(state("a", &snap).as_deref(), Some("down"));
        assert_eq!(snap.iter().find(|j| j["instance"] == "a").unwrap()["down_reason"], "silent");
    }

    #[test]
    fn copies_of_a_clustered_queue_are_counted_from_their_heartbeats() {
        let roster = Roster::default();
        let beat = |id: &str, running: u64, state: &str| {
            json!({"instance": id, "host": "h", "pid": 7, "heartbeat_ms": 100, "state": state,
                   "queues_running": {"worker": {"jobs": running}}})
        };
        roster.heard(beat("a", 2, "up"));
        roster.heard(beat("b", 0, "up"));
        roster.heard(json!({"instance": "c", "heartbeat_ms": 100, "state": "up", "cages": [{"name": "worker"}]}));
        assert_eq!(roster.live_copies("worker", "jobs"), 2, "c does not consume the queue");
        let copies = roster.queue_copies("worker", "jobs");
        assert_eq!(copies.iter().map(|c| (c.instance.as_str(), c.running, c.up)).collect::<Vec<_>>(), [("a", 2, true), ("b", 0, true)]);
        assert!(roster.queue_copies("worker", "other").is_empty());
        // b falls silent past its timeout; a leaves: neither counts, and at least 1 is left.
        roster.entries.lock().unwrap().get_mut("b").unwrap().last_seen -= Duration::from_millis(400);
        roster.heard(beat("a", 0, "leaving"));
        assert_eq!(roster.queue_copies("worker", "jobs").iter().filter(|c| c.up).count(), 0);
        assert_eq!(roster.live_copies("worker", "jobs"), 1);
    }

    #[test]
    fn a_heartbeat_announces_the_queues_consumed_and_their_running_calls() {
        let identity = Identity::new("f", "0.1.0");
        let describe: Describe = Arc::new(|| json!({}));
        let running = consume_queue("hb-test", "jobs");
        running.store(3, Ordering::Relaxed);
        let beat = heartbeat(&identity, &describe, Duration::from_secs(1), false);
        assert_eq!(beat["queues_running"]["hb-test"]["jobs"], 3, "{beat}");
        stop_consuming("hb-test", "jobs");
        let beat = heartbeat(&identity, &describe, Duration::from_secs(1), false);
        assert!(beat.pointer("/queues_running/hb-test").is_none(), "{beat}");
    }

    #[test]
    fn a_held_call_is_announced_until_released_and_found_only_on_live_other_copies() {
        let identity = Identity::new("f", "0.1.0");
        let describe: Describe = Arc::new(|| json!({}));
        let held = hold("held-test", "jobs", "c1").expect("first hold");
        assert!(hold("held-test", "jobs", "c1").is_none(), "held twice in one process");
        assert!(holds("held-test", "jobs", "c1") && !holds("held-test", "jobs", "c2"));
        let other = hold("held-test", "other", "c1").expect("another queue holds its own calls");
        let beat = heartbeat(&identity, &describe, Duration::from_secs(1), false);
        let hash = format!("{:016x}", call_hash("c1"));
        assert_eq!(beat["queues_held"]["held-test"]["jobs"], json!([hash]), "{beat}");
        // Another copy hears the beat: the call is held elsewhere, except for the holder
        // itself and for another call or queue.
        let roster = Roster::default();
        let mut theirs = beat.clone();
        theirs["instance"] = json!("a");
        theirs["heartbeat_ms"] = json!(100);
        roster.heard(theirs);
        assert_eq!(roster.held_elsewhere("held-test", "jobs", "c1", "b").as_deref(), Some("a"));
        assert_eq!(roster.held_elsewhere("held-test", "jobs", "c1", "a"), None, "its own hold");
        assert_eq!(roster.held_elsewhere("held-test", "jobs", "c2", "b"), None);
        assert_eq!(roster.held_elsewhere("held-test", "nope", "c1", "b"), None);
        // A silent holder is dead to the others: its calls are theirs to run.
        roster.entries.lock().unwrap().get_mut("a").unwrap().last_seen -= Duration::from_millis(400);
        assert_eq!(roster.held_elsewhere("held-test", "jobs", "c1", "b"), None);
        drop(held);
        drop(other);
        let beat = heartbeat(&identity, &describe, Duration::from_secs(1), false);
        assert!(beat.pointer("/queues_held/held-test").is_none(), "{beat}");
        assert!(hold("held-test", "jobs", "c1").is_some(), "released");
        assert_eq!(call_hash("c1"), 0x08a2_7f07_b54a_6859, "the hash is fixed across versions: copies compare it");
    }

    #[test]
    fn a_flood_of_heartbeats_cannot_grow_the_roster_without_bound() {
        let roster = Roster::default();
        for i in 0..MAX_INSTANCES + 500 {
            let _ = roster.hear(format!(r#"{{"instance": "i{i}", "heartbeat_ms": 100}}"#).as_bytes());
        }
        assert!(roster.len() <= MAX_INSTANCES, "{} instances kept", roster.len());
        // A heartbeat is a few hundred bytes; a huge one is refused rather than kept.
        let huge = format!(r#"{{"instance": "big", "pad": "{}"}}"#, "x".repeat(MAX_HEARTBEAT));
        assert!(Roster::default().hear(huge.as_bytes()).unwrap_err().contains("bytes"));
        assert!(Roster::default().hear(b"[1]").unwrap_err().contains("without an instance"));
        assert!(Roster::default().hear(b"{").unwrap_err().contains("unreadable"));
    }

    /// Found while writing the presence fuzz target: names and versions come from other
    /// processes, and a newline or an escape sequence in one went to the operator's terminal
    /// as it was (a forged row, or a terminal taken over by escape codes).
    #[test]
    fn what_peers_say_cannot_forge_rows_or_reach_the_terminal() {
        let t = table(&[json!({
            "instance": "i1\nweb  i2  h  1  0.1.0  1s  up  0", "host": "h\u{1b}]0;owned\u{7}", "version": "\u{9b}31m",
            "state": "up", "cages": [{"name": "web\r\nfake"}]
        })]);
        assert_eq!(t.lines().count(), 2, "{t}");
        assert!(!t.chars().any(|c| c.is_control() && c != '\n'), "{t:?}");
        assert!(t.contains("i1\\nweb") && t.contains("h\\u{1b}]0;owned\\u{7}"), "{t}");
    }

    #[test]
    fn table_has_a_row_per_cage() {
        let t = table(&[json!({
            "instance": "i1", "host": "h", "pid": 7, "version": "0.1.0", "uptime_s": 3700, "state": "up",
            "load": {"requests_in_flight": 2}, "cages": [{"name": "web"}, {"name": "worker"}]
        })]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        assert!(lines[0].starts_with("CAGE"));
        assert!(lines[1].starts_with("web") && lines[1].contains("1h1m") && lines[1].contains("i1"), "{t}");
        assert!(lines[2].starts_with("worker"), "{t}");
    }
}
