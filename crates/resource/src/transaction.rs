//! Transactions over pooled connections: every participant checks out its own connection,
//! begins and makes its call, all in parallel under the request's deadline; then every
//! participant commits, or every one rolls back.
//!
//! A participant with `cached{key, ttl}` asks the resource's read cache first (cache.rs): a hit,
//! or the result of the same key's call running elsewhere, is a participant that is already
//! done and holds no connection; a miss runs as usual and hands its result to the cache. The keys
//! of `invalidates{...}` are dropped once the transaction has committed.

use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::{join_all, LocalBoxFuture};
use rustomnic_core::Value;
use rustomnic_lua::transaction::CachedRead;
use rustomnic_lua::{Participant, ParticipantError, Prepared, Resources};

use crate::cache::{self, Lookup, ReadCache, Waited};
use crate::pool::{Cause, Pool, PoolStats, Pooled};
use crate::{Error, ResourceConfig};

/// How long a commit or rollback may run past the request's deadline: ending a transaction
/// cleanly matters more than the last few milliseconds.
const FINISH_GRACE: Duration = Duration::from_secs(2);

/// The pools of every cage on one worker thread.
pub struct CageResources {
    pools: std::cell::RefCell<BTreeMap<String, BTreeMap<String, Rc<Pool>>>>,
    /// The read cache of each resource, shared with the other workers.
    caches: std::cell::RefCell<BTreeMap<String, BTreeMap<String, Arc<ReadCache>>>>,
    /// The protocol of each resource, for the spans of its calls.
    protocols: std::cell::RefCell<BTreeMap<(String, String), String>>,
    workers: usize,
}

fn cache_of(cage: &str, r: &ResourceConfig) -> Arc<ReadCache> {
    cache::cache_for(cage, &r.name, &r.fingerprint, r.pool.cache_size, r.pool.cache_max_value)
}

/// Builds this worker's pools for `cages` and installs them for Lua transactions. `stats` holds
/// one shared counter set per (cage, resource), made once for all workers.
pub fn install(cages: &[(String, Vec<ResourceConfig>)], workers: usize, stats: &BTreeMap<(String, String), Arc<PoolStats>>) -> Rc<CageResources> {
    let mut pools = BTreeMap::new();
    let mut caches = BTreeMap::new();
    let mut protocols = BTreeMap::new();
    for (cage, resources) in cages {
        let mut by_name = BTreeMap::new();
        let mut cache_by_name = BTreeMap::new();
        for r in resources {
            let s = stats.get(&(cage.clone(), r.name.clone())).cloned().unwrap_or_default();
            by_name.insert(r.name.clone(), Pool::new(&r.name, r.resource.clone(), r.pool.clone(), workers, s, r.breaker.clone()));
            cache_by_name.insert(r.name.clone(), cache_of(cage, r));
            protocols.insert((cage.clone(), r.name.clone()), r.protocol.clone());
        }
        pools.insert(cage.clone(), by_name);
        caches.insert(cage.clone(), cache_by_name);
    }
    let resources = Rc::new(CageResources {
        pools: std::cell::RefCell::new(pools),
        caches: std::cell::RefCell::new(caches),
        protocols: std::cell::RefCell::new(protocols),
        workers,
    });
    rustomnic_lua::transaction::set_resources(resources.clone());
    // Invalidations committed by other processes of the flock drop their keys here too.
    rustomnic_lua::events::set_cache_hook(cache::from_flock);
    // Standby connections and idle expiry, once a second.
    let weak = Rc::downgrade(&resources);
    tokio::task::spawn_local(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let Some(r) = weak.upgrade() else { return };
            let pools: Vec<Rc<Pool>> = r.pools.borrow().values().flat_map(|m| m.values().cloned()).collect();
            for pool in pools {
                pool.maintain().await;
            }
        }
    });
    resources
}

impl CageResources {
    pub fn pool(&self, cage: &str, resource: &str) -> Option<Rc<Pool>> {
        self.pools.borrow().get(cage).and_then(|m| m.get(resource)).cloned()
    }

    /// The read cache of a resource (shared by every worker).
    pub fn cache(&self, cage: &str, resource: &str) -> Option<Arc<ReadCache>> {
        self.caches.borrow().get(cage).and_then(|m| m.get(resource)).cloned()
    }

    /// Replaces (or adds, or with `None` removes) the pool of one resource after its config
    /// changed. Transactions running on the old pool finish on it; its connections close when
    /// the last of them is done.
    pub fn replace(&self, cage: &str, name: &str, config: Option<&ResourceConfig>, stats: Arc<PoolStats>) {
        let mut pools = self.pools.borrow_mut();
        let by_name = pools.entry(cage.to_string()).or_default();
        let mut caches = self.caches.borrow_mut();
        let cache_by_name = caches.entry(cage.to_string()).or_default();
        match config {
            Some(r) => {
                by_name.insert(name.to_string(), Pool::new(&r.name, r.resource.clone(), r.pool.clone(), self.workers, stats, r.breaker.clone()));
                // A changed table empties the cache (its values may come from another server).
                cache_by_name.insert(name.to_string(), cache_of(cage, r));
                self.protocols.borrow_mut().insert((cage.to_string(), name.to_string()), r.protocol.clone());
            }
            None => {
                by_name.remove(name);
                cache_by_name.remove(name);
            }
        }
    }

    fn missing(&self, cage: &str, resource: &str, participant: usize) -> ParticipantError {
        let known: Vec<String> = self.pools.borrow().get(cage).map(|m| m.keys().cloned().collect()).unwrap_or_default();
        ParticipantError {
            resource: resource.to_string(),
            participant,
            code: None,
            message: format!("cage {cage} has no resource {resource} (resources: {})", if known.is_empty() { "none".to_string() } else { known.join(", ") }),
            recoverable: true,
        }
    }
}

/// One participant after its call: its connection (unless it never got one) and its result.
struct Slot {
    resource: String,
    conn: Option<Pooled>,
    outcome: Result<Value, ParticipantError>,
    /// Its call may have had effects that a rollback does not undo.
    stays: bool,
    /// Its call ended at the request's deadline (cut, or no connection free until then), not
    /// with an answer of the resource.
    cut: bool,
    /// `invalidates{...}`: keys dropped from `cache` once the transaction commits.
    invalidates: Vec<String>,
    cache: Option<Arc<ReadCache>>,
}

impl Slot {
    /// A participant answered without a connection (a cache hit, or a running call's result).
    fn done(resource: &str, outcome: Result<Value, ParticipantError>) -> Slot {
        Slot { resource: resource.to_string(), conn: None, outcome, stays: false, cut: false, invalidates: Vec::new(), cache: None }
    }
}

struct PreparedTx {
    slots: Vec<Slot>,
    outcomes: Vec<Result<Value, ParticipantError>>,
    stays: bool,
}

fn participant_error(resource: &str, n: usize, e: Error) -> ParticipantError {
    ParticipantError { resource: resource.to_string(), participant: n, code: e.code, message: e.message, recoverable: true }
}

/// Counts one call when it ends, also when its future is dropped before (the request was stopped
/// at its deadline, or cancelled, while it waited): that counts as failed by the deadline.
struct CallCount {
    stats: Arc<PoolStats>,
    started: Instant,
    /// Set when the call ended: `Some(None)` for success, `Some(Some(cause))` for a failure.
    outcome: Option<Option<Cause>>,
}

impl Drop for CallCount {
    fn drop(&mut self) {
        self.stats.record(self.started.elapsed(), self.outcome.unwrap_or(Some(Cause::Deadline)));
    }
}

/// The span a traced participant's call records: a client span, child of the request's
/// (docs/tracing.md).
struct CallSpan {
    trace: rustomnic_lua::trace::TraceContext,
    cage: String,
    request_id: String,
    protocol: String,
}

impl CallSpan {
    fn record(self, resource: &str, method: &str, operation: Option<String>, outcome: &Result<Value, Error>) {
        use rustomnic_lua::trace::{AttrValue, SpanKind, SpanStatus};
        let mut attributes =
            vec![("pmnc.resource", AttrValue::from(resource)), ("pmnc.method", AttrValue::from(method)), ("db.system", AttrValue::Str(self.protocol))];
        if let Some(op) = operation {
            attributes.push(("db.operation.name", AttrValue::Str(op)));
        }
        let status = match outcome {
            Ok(_) => SpanStatus::Unset,
            Err(e) => SpanStatus::Error(e.message.clone()),
        };
        let name = format!("{resource} {method}");
        rustomnic_lua::trace::record_span(&self.trace, &self.cage, "resource", &self.request_id, name, SpanKind::Client, attributes, status);
    }
}

async fn run_one(pool: Rc<Pool>, n: usize, p: Participant, deadline: Instant, span: Option<CallSpan>) -> Slot {
    let resource = p.resource.clone();
    // The first word of an SQL statement names the span's operation (never the values; other
    // protocols' first arguments may be values, such as a key).
    let sql = span.as_ref().is_some_and(|s| matches!(s.protocol.as_str(), "postgresql" | "mysql"));
    let operation = match p.args.first() {
        Some(Value::Str(b)) if sql => rustomnic_lua::trace::operation_of(&String::from_utf8_lossy(&b[..b.len().min(64)])),
        _ => None,
    };
    let method = span.as_ref().map(|_| p.method.clone());
    // Timed from the checkout on: waiting for a free connection or for a connect is part of
    // what the call cost the request.
    let mut count = CallCount { stats: pool.stats.clone(), started: Instant::now(), outcome: None };
    let mut held: Option<Pooled> = None;
    let work = async {
        let conn = held.insert(pool.checkout_why(deadline).await?);
        conn.set_in_transaction(true);
        if let Err(e) = conn.conn().begin().await {
            // A connection the server closed while it sat idle (a database restart) fails its
            // begin before anything ran: the participant takes a fresh connection, once,
            // instead of failing the request. The dead one goes first, freeing its pool slot.
            if !(e.broken && conn.is_reused()) {
                return Err((e, Cause::Query));
            }
            conn.mark_broken();
            held = None;
            let conn = held.insert(pool.checkout_why(deadline).await?);
            conn.set_in_transaction(true);
            conn.conn().begin().await.map_err(|e| (e, Cause::Query))?;
        }
        let Some(conn) = held.as_mut() else { return Err((Error::broken("no connection"), Cause::Query)) };
        conn.conn().call(&p.method, p.args).await.map_err(|e| (e, Cause::Query))
    };
    let work = rustomnic_lua::trace::with_call(span.as_ref().map(|s| s.trace), work);
    let result = match tokio::time::timeout_at(deadline.into(), work).await {
        Ok(r) => r,
        // The call was cut mid-flight: the connection's state is unknown, so it is dropped
        // (the server rolls back what it had begun when the connection closes).
        Err(_) => Err((Error::broken(format!("resource {resource}: deadline passed during {}", p.method)), Cause::Deadline)),
    };
    // Ended by this request's deadline rather than by an answer of the resource.
    let cut = matches!(result, Err((_, Cause::Deadline | Cause::PoolTimeout)));
    count.outcome = Some(result.as_ref().err().map(|(_, cause)| *cause));
    drop(count);
    let result = result.map_err(|(e, _)| e);
    if let (Some(span), Some(method)) = (span, method) {
        span.record(&resource, &method, operation, &result);
    }
    let stays = held.as_mut().is_some_and(|c| c.conn().effects_stay(&p.method, &result));
    if let (Err(e), Some(conn)) = (&result, held.as_mut()) {
        if e.broken {
            conn.mark_broken();
        }
    }
    Slot {
        resource: resource.clone(),
        conn: held,
        outcome: result.map_err(|e| participant_error(&resource, n, e)),
        stays,
        cut,
        invalidates: Vec::new(),
        cache: None,
    }
}

/// One participant: through the read cache when it is `cached`, else straight to its pool.
async fn run_participant(pool: Rc<Pool>, cache: Option<Arc<ReadCache>>, n: usize, mut p: Participant, deadline: Instant, span: Option<CallSpan>) -> Slot {
    let invalidates = std::mem::take(&mut p.invalidates);
    let mut slot = match (p.cached.take(), &cache) {
        (Some(spec), Some(c)) => run_cached(pool, c, spec, n, p, deadline, span).await,
        _ => run_one(pool, n, p, deadline, span).await,
    };
    if !invalidates.is_empty() {
        slot.invalidates = invalidates;
        slot.cache = cache;
    }
    slot
}

/// A cached participant: a fresh value, the result of the same key's running call (on any
/// worker), or the call run here for every caller of the key.
async fn run_cached(pool: Rc<Pool>, cache: &Arc<ReadCache>, spec: CachedRead, n: usize, p: Participant, deadline: Instant, span: Option<CallSpan>) -> Slot {
    let resource = p.resource.clone();
    loop {
        match cache.lookup(&spec.key) {
            Lookup::Hit(v) => return Slot::done(&resource, Ok((*v).clone())),
            Lookup::Wait(rx) => match cache::wait(rx, deadline).await {
                Waited::Done(r) => return Slot::done(&resource, r.map(|v| (*v).clone()).map_err(|e| participant_error(&resource, n, e))),
                Waited::Again => continue,
                Waited::Deadline => {
                    let e = Error::new(format!("resource {resource}: deadline passed while waiting for the running call of cache key {:?}", spec.key));
                    return Slot::done(&resource, Err(participant_error(&resource, n, e)));
                }
            },
            Lookup::Lead(leader) => {
                let mut slot = run_one(pool, n, p, deadline, span).await;
                if slot.cut {
                    // Our deadline, not the resource's answer: the waiters, whose deadlines may
                    // be later, look again (dropping the leader tells them).
                    drop(leader);
                    return slot;
                }
                slot.outcome = match std::mem::replace(&mut slot.outcome, Ok(Value::Nil)) {
                    Ok(v) => leader.finish(Ok(v), spec.ttl).map_err(|e| participant_error(&resource, n, e)),
                    Err(pe) => {
                        let shared = Error { message: pe.message.clone(), code: pe.code.clone(), broken: false };
                        let _ = leader.finish(Err(shared), spec.ttl);
                        Err(pe)
                    }
                };
                return slot;
            }
        }
    }
}

impl Resources for CageResources {
    fn invalidate(&self, cage: &str, resource: &str, keys: &[String]) -> Result<(), String> {
        let Some(cache) = self.cache(cage, resource) else {
            let known: Vec<String> = self.caches.borrow().get(cage).map(|m| m.keys().cloned().collect()).unwrap_or_default();
            return Err(format!(
                "cage {cage} has no resource {resource} (resources: {})",
                if known.is_empty() { "none".to_string() } else { known.join(", ") }
            ));
        };
        for key in keys {
            cache.invalidate(key);
        }
        cache::tell_flock(&cache, keys);
        Ok(())
    }

    fn run(&self, cage: &str, participants: Vec<Participant>, deadline: Instant) -> LocalBoxFuture<'static, Result<Box<dyn Prepared>, ParticipantError>> {
        // Every participant holds its own connection until the end, so more participants on one
        // resource than this worker's share of its pool could never all run: say so at once
        // instead of waiting for the deadline.
        let mut per_resource: BTreeMap<&str, usize> = BTreeMap::new();
        for (i, p) in participants.iter().enumerate() {
            let n = per_resource.entry(p.resource.as_str()).or_default();
            *n += 1;
            if let Some(pool) = self.pool(cage, &p.resource) {
                if *n > pool.size() {
                    // Each participant on this resource was a call the module made, refused.
                    for _ in participants.iter().filter(|q| q.resource == p.resource) {
                        pool.stats.record(Duration::ZERO, Some(Cause::PoolSize));
                    }
                    let e = ParticipantError {
                        resource: p.resource.clone(),
                        participant: i + 1,
                        code: None,
                        message: format!(
                            "this transaction has more participants on {} than its pool gives one worker ({}); raise pool_size or split the transaction",
                            p.resource,
                            pool.size()
                        ),
                        recoverable: true,
                    };
                    return Box::pin(async move { Err(e) });
                }
            }
        }
        // A transaction of one cached call whose value is fresh (the common read): answered
        // here, with no task and no connection.
        if let [p] = participants.as_slice() {
            if let (Some(spec), true) = (&p.cached, p.invalidates.is_empty()) {
                if let Some(value) = self.cache(cage, &p.resource).and_then(|c| c.peek(&spec.key)) {
                    let slots = vec![Slot::done(&p.resource, Ok((*value).clone()))];
                    let outcomes = vec![Ok((*value).clone())];
                    return Box::pin(async move { Ok(Box::new(PreparedTx { slots, outcomes, stays: false }) as Box<dyn Prepared>) });
                }
            }
        }
        // Traced requests give each call a client span (read here, in the request's poll).
        let traced = rustomnic_lua::request::with_running(|c| rustomnic_lua::trace::recorded(c).map(|t| (t, c.id.clone()))).flatten();
        let mut work = Vec::with_capacity(participants.len());
        for (i, p) in participants.into_iter().enumerate() {
            let Some(pool) = self.pool(cage, &p.resource) else {
                let e = self.missing(cage, &p.resource, i + 1);
                return Box::pin(async move { Err(e) });
            };
            let cache = self.cache(cage, &p.resource);
            let span = traced.as_ref().map(|(t, id)| CallSpan {
                trace: t.child(),
                cage: cage.to_string(),
                request_id: id.clone(),
                protocol: self.protocols.borrow().get(&(cage.to_string(), p.resource.clone())).cloned().unwrap_or_default(),
            });
            work.push(run_participant(pool, cache, i + 1, p, deadline, span));
        }
        let (tx, rx) = tokio::sync::oneshot::channel::<Vec<Slot>>();
        // The calls run as a task of their own: a request stopped at its deadline leaves its
        // coroutine (and what it awaits) to the garbage collector, and the calls must still end
        // by their deadline, be counted, and give their connections back (closed, as they are
        // mid-transaction: see `Pooled`).
        tokio::task::spawn_local(async move {
            let _ = tx.send(join_all(work).await);
        });
        Box::pin(async move {
            let Ok(slots) = rx.await else {
                return Err(ParticipantError {
                    resource: String::new(),
                    participant: 0,
                    code: None,
                    message: "resource calls were stopped before they ended (the worker is stopping)".to_string(),
                    recoverable: true,
                });
            };
            // Once a participant acted in a way a rollback does not undo, a failure of the
            // transaction leaves that behind: it is not recoverable.
            let stays = slots.iter().any(|s| s.stays);
            let outcomes = slots
                .iter()
                .map(|s| {
                    s.outcome.clone().map_err(|mut e| {
                        e.recoverable = e.recoverable && !stays;
                        e
                    })
                })
                .collect();
            Ok(Box::new(PreparedTx { slots, outcomes, stays }) as Box<dyn Prepared>)
        })
    }
}

impl Prepared for PreparedTx {
    fn outcomes(&self) -> &[Result<Value, ParticipantError>] {
        &self.outcomes
    }

    fn effects_stay(&self) -> bool {
        self.stays
    }

    fn idle(&self) -> bool {
        self.slots.iter().all(|s| s.conn.is_none() && s.invalidates.is_empty())
    }

    fn finish(self: Box<Self>, commit: bool, wait: bool, deadline: Instant) -> LocalBoxFuture<'static, Result<(), ParticipantError>> {
        let limit = deadline.max(Instant::now()) + FINISH_GRACE;
        let work = finish_all(self.slots, commit, self.stays, limit);
        if wait {
            Box::pin(work)
        } else {
            tokio::task::spawn_local(async move {
                if let Err(e) = work.await {
                    tracing::error!("transaction commit not waited for failed: {e}");
                }
            });
            Box::pin(async { Ok(()) })
        }
    }
}

/// Commits the participants that succeeded (when `commit`) and rolls back all others, in
/// parallel. A failed commit after another participant has committed is not recoverable.
async fn finish_all(slots: Vec<Slot>, commit: bool, stays: bool, limit: Instant) -> Result<(), ParticipantError> {
    // Keys to drop once the ends below are done: of a participant that succeeded and commits,
    // and of one whose effects stay whatever happens (a Redis write, an HTTP call). A commit
    // that fails may still have reached the server, so it drops its keys too: dropping too much
    // costs a query, too little serves stale values.
    let drops: Vec<(Arc<ReadCache>, Vec<String>)> = slots
        .iter()
        .filter(|s| !s.invalidates.is_empty() && ((commit && s.outcome.is_ok()) || s.stays))
        .filter_map(|s| s.cache.clone().map(|c| (c, s.invalidates.clone())))
        .collect();
    let ends = slots.into_iter().enumerate().filter_map(|(i, slot)| {
        let Slot { resource, conn, outcome, .. } = slot;
        let mut conn = conn?;
        // A connection whose call broke it (lost, or cut by the deadline) is closed, not rolled
        // back: the server rolls back on close, and a ROLLBACK would only hide the real error.
        if conn.is_broken() {
            return None;
        }
        let do_commit = commit && outcome.is_ok();
        Some(async move {
            let r = match tokio::time::timeout_at(limit.into(), async {
                if do_commit {
                    conn.conn().commit().await
                } else {
                    conn.conn().rollback().await
                }
            })
            .await
            {
                Ok(r) => r,
                Err(_) => Err(Error::broken(format!("resource {resource}: {} did not finish in time", if do_commit { "commit" } else { "rollback" }))),
            };
            match r {
                Ok(()) => conn.set_in_transaction(false),
                Err(_) => conn.mark_broken(),
            }
            (i + 1, resource, do_commit, r)
        })
    });
    let results = join_all(ends).await;
    for (cache, keys) in drops {
        for key in &keys {
            cache.invalidate(key);
        }
        cache::tell_flock(&cache, &keys);
    }
    let committed = results.iter().filter(|(_, _, c, r)| *c && r.is_ok()).count();
    for (n, resource, did_commit, r) in results {
        if let Err(e) = r {
            let mut pe = participant_error(&resource, n, e);
            pe.message = format!("{} failed: {}", if did_commit { "commit" } else { "rollback" }, pe.message);
            // Once any participant has committed (or acted beyond undoing), the others cannot
            // be undone.
            pe.recoverable = committed == 0 && !stays;
            return Err(pe);
        }
    }
    Ok(())
}
