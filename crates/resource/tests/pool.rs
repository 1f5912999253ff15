//! Pools and transactions with an in-memory protocol: commit and rollback reach every
//! participant, exhaustion waits until the deadline, the breaker opens and recovers, is shared by
//! the pools of every worker, and survives a probe that never reports back.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::LocalBoxFuture;
use rustomnic_core::{Section, Value};
use rustomnic_resource::testing::{configure, run_lua};
use rustomnic_resource::{Cause, Connection, Error, Pool, Resource, ResourceProtocol};

#[derive(Default)]
struct Shared {
    journal: Mutex<Vec<String>>,
    down: AtomicBool,
    /// Connects never finish (a server that accepts and never answers).
    hang: AtomicBool,
    connects: AtomicUsize,
}

struct Memory(Arc<Shared>);
struct MemoryResource(Arc<Shared>);
struct MemoryConn {
    shared: Arc<Shared>,
    id: usize,
}

impl ResourceProtocol for Memory {
    fn name(&self) -> &'static str {
        "memory"
    }
    fn configure(&self, _resource: &str, section: &Section) -> Option<Arc<dyn Resource>> {
        if let Some(d) = section.bool("down") {
            self.0.down.store(d.value, Ordering::SeqCst);
        }
        Some(Arc::new(MemoryResource(self.0.clone())))
    }
}

impl Resource for MemoryResource {
    fn connect(&self) -> LocalBoxFuture<'static, Result<Box<dyn Connection>, Error>> {
        let shared = self.0.clone();
        Box::pin(async move {
            if shared.hang.load(Ordering::SeqCst) {
                std::future::pending::<()>().await;
            }
            if shared.down.load(Ordering::SeqCst) {
                return Err(Error::new("connection refused"));
            }
            let id = shared.connects.fetch_add(1, Ordering::SeqCst) + 1;
            Ok(Box::new(MemoryConn { shared, id }) as Box<dyn Connection>)
        })
    }
}

impl MemoryConn {
    fn log(&self, what: String) {
        self.shared.journal.lock().unwrap().push(what);
    }
}

impl Connection for MemoryConn {
    fn begin(&mut self) -> LocalBoxFuture<'_, Result<(), Error>> {
        Box::pin(async { Ok(()) })
    }
    fn call<'a>(&'a mut self, method: &'a str, args: Vec<Value>) -> LocalBoxFuture<'a, Result<Value, Error>> {
        Box::pin(async move {
            self.log(format!("{method} on {}", self.id));
            match method {
                "echo" => Ok(Value::Array(args)),
                "sleep" => {
                    let secs = match args.first() {
                        Some(Value::Float(f)) => *f,
                        Some(Value::Int(i)) => *i as f64,
                        _ => 0.0,
                    };
                    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
                    Ok(Value::Bool(true))
                }
                _ => Err(Error::new(format!("no method {method}")).with_code("E1")),
            }
        })
    }
    fn commit(&mut self) -> LocalBoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            self.log(format!("commit {}", self.id));
            Ok(())
        })
    }
    fn rollback(&mut self) -> LocalBoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            self.log(format!("rollback {}", self.id));
            Ok(())
        })
    }
}

fn journal(shared: &Shared) -> Vec<String> {
    let mut j = shared.journal.lock().unwrap().clone();
    j.sort();
    j
}

#[test]
fn two_participants_on_one_resource_use_two_connections_and_commit() {
    let shared = Arc::new(Shared::default());
    let db = configure(&Memory(shared.clone()), "db", "pool_size = 4\n").unwrap();
    let r = run_lua(
        vec![db],
        "return { f = function() local xa = pmnc.transaction.create() xa.db.echo(1) xa.db.echo('two') return xa.execute() end }",
        "f",
        vec![],
        Duration::from_secs(5),
    )
    .unwrap();
    assert_eq!(r, vec![Value::Array(vec![Value::Int(1)]), Value::Array(vec![Value::str("two")])]);
    assert_eq!(journal(&shared), ["commit 1", "commit 2", "echo on 1", "echo on 2"]);
}

#[test]
fn a_failure_rolls_back_every_participant() {
    let shared = Arc::new(Shared::default());
    let db = configure(&Memory(shared.clone()), "db", "").unwrap();
    let r = run_lua(
        vec![db],
        "return { f = function() local xa = pmnc.transaction.create() xa.db.echo(1) xa.db.bogus() local ok, e = pcall(xa.execute) return ok, e.participant, e.code, e.recoverable, tostring(e) end }",
        "f",
        vec![],
        Duration::from_secs(5),
    )
    .unwrap();
    assert_eq!(
        r,
        vec![Value::Bool(false), Value::Int(2), Value::str("E1"), Value::Bool(true), Value::str("resource db (participant 2): no method bogus [E1]")]
    );
    assert_eq!(journal(&shared), ["bogus on 2", "echo on 1", "rollback 1", "rollback 2"]);
}

#[test]
fn participants_run_in_parallel() {
    let shared = Arc::new(Shared::default());
    let db = configure(&Memory(shared.clone()), "db", "").unwrap();
    let started = Instant::now();
    run_lua(
        vec![db],
        "return { f = function() local xa = pmnc.transaction.create() xa.db.sleep(0.3) xa.db.sleep(0.3) xa.db.sleep(0.3) return xa.execute() end }",
        "f",
        vec![],
        Duration::from_secs(5),
    )
    .unwrap();
    let took = started.elapsed();
    assert!(took < Duration::from_millis(800), "three 300 ms calls took {took:?}: not parallel");
}

#[test]
fn more_participants_than_the_pool_fail_at_once() {
    let shared = Arc::new(Shared::default());
    let db = configure(&Memory(shared.clone()), "db", "pool_size = 1\n").unwrap();
    let started = Instant::now();
    let r = run_lua(
        vec![db],
        "return { f = function() local xa = pmnc.transaction.create() xa.db.sleep(5) xa.db.echo(1) local ok, e = pcall(xa.execute) return tostring(e) end }",
        "f",
        vec![],
        Duration::from_secs(5),
    )
    .unwrap();
    // Each participant needs its own connection; waiting for a second one could never end.
    assert_eq!(r, vec![Value::str("resource db (participant 2): this transaction has more participants on db than its pool gives one worker (1); raise pool_size or split the transaction")]);
    assert!(started.elapsed() < Duration::from_secs(1));
    assert!(journal(&shared).is_empty(), "nothing may run: {:?}", journal(&shared));
}

#[test]
fn a_dead_server_fails_clearly_and_the_breaker_opens() {
    let shared = Arc::new(Shared::default());
    let db = configure(&Memory(shared.clone()), "db", "down = true\nbreaker_failures = 2\nbreaker_cooldown = \"10s\"\n").unwrap();
    let r = run_lua(
        vec![db],
        r#"return { f = function()
            local out = {}
            for i = 1, 3 do
              local ok, e = pcall(pmnc.transaction.db.echo, i)
              out[i] = e.message
            end
            return out
          end }"#,
        "f",
        vec![],
        Duration::from_secs(5),
    )
    .unwrap();
    let Value::Array(messages) = &r[0] else { panic!("{r:?}") };
    assert!(messages[0].as_str().unwrap().contains("cannot connect: connection refused"), "{messages:?}");
    assert!(messages[1].as_str().unwrap().contains("cannot connect"), "{messages:?}");
    assert!(messages[2].as_str().unwrap().contains("unavailable after 2 failed connects in a row (last: connection refused)"), "{messages:?}");
}

#[test]
fn the_breaker_lets_a_probe_through_after_its_cooldown() {
    let shared = Arc::new(Shared::default());
    let db = configure(&Memory(shared.clone()), "db", "down = true\nbreaker_failures = 1\nbreaker_cooldown = \"200ms\"\n").unwrap();
    let up = shared.clone();
    // The server comes back while the breaker is open.
    let flip = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        up.down.store(false, Ordering::SeqCst);
    });
    let r = run_lua(
        vec![db],
        r#"return { f = function()
            local first = select(2, pcall(pmnc.transaction.db.echo, 1)).message
            local second = select(2, pcall(pmnc.transaction.db.echo, 2)).message
            pmnc.sleep(0.3)
            local third = pmnc.transaction.db.echo(3)
            return first, second, third
          end }"#,
        "f",
        vec![],
        Duration::from_secs(5),
    )
    .unwrap();
    flip.join().unwrap();
    assert!(r[0].as_str().unwrap().contains("cannot connect"), "{r:?}");
    assert!(r[1].as_str().unwrap().contains("unavailable"), "{r:?}");
    assert_eq!(r[2], Value::Array(vec![Value::Int(3)]));
}

#[test]
fn config_problems_name_the_key() {
    let errors = configure(&Memory(Arc::default()), "db", "pool_size = 0\nidle_timeout = \"soon\"\nbogus = 1\n").unwrap_err();
    assert_eq!(errors.len(), 3, "{errors:?}");
    assert!(errors[0].starts_with("cage.toml:2: resources.db.pool_size: 0 is out of range"), "{errors:?}");
    assert!(errors[1].starts_with("cage.toml:3: resources.db.idle_timeout:"), "{errors:?}");
    assert!(errors[2].starts_with("cage.toml:4: resources.db.bogus: unknown key"), "{errors:?}");
}

#[test]
fn counters_count_calls_errors_and_connections() {
    let shared = Arc::new(Shared::default());
    // A resource name of its own: the counters are per process, by cage and resource.
    let db = configure(&Memory(shared.clone()), "counted", "").unwrap();
    run_lua(
        vec![db],
        "return { f = function() pmnc.transaction.counted.echo(1) pcall(pmnc.transaction.counted.bogus) local xa = pmnc.transaction.create() xa.counted.echo(2) xa.counted.echo(3) xa.execute() end }",
        "f",
        vec![],
        Duration::from_secs(5),
    )
    .unwrap();
    let stats = rustomnic_resource::stats_for("test", "counted");
    assert_eq!(stats.calls.load(Ordering::SeqCst), 4);
    assert_eq!(stats.errors.load(Ordering::SeqCst), 1);
    assert_eq!(stats.errors_of(Cause::Query), 1, "the unknown method is the server's answer to the call");
    assert_eq!(stats.latency.cumulative().last().copied(), Some(4), "every call timed");
    assert_eq!(stats.in_use.load(Ordering::SeqCst), 0, "every connection went back");
    assert_eq!(stats.waiting.load(Ordering::SeqCst), 0);
    assert!(rustomnic_resource::all_stats().iter().any(|(c, r, _)| c == "test" && r == "counted"));
}

/// Runs `test` on a current-thread runtime with a LocalSet, as a worker does.
fn on_worker(test: impl std::future::Future<Output = ()>) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    tokio::task::LocalSet::new().block_on(&rt, test);
}

#[test]
fn the_pools_of_two_workers_share_one_breaker() {
    let shared = Arc::new(Shared::default());
    let db = configure(&Memory(shared.clone()), "db", "down = true\nbreaker_failures = 3\nbreaker_cooldown = \"60s\"\n").unwrap();
    on_worker(async move {
        // Two workers' pools of one resource, as the runtime builds them from one config.
        let stats = rustomnic_resource::stats_for("test", "shared-breaker");
        let a = Pool::new("db", db.resource.clone(), db.pool.clone(), 2, stats.clone(), db.breaker.clone());
        let b = Pool::new("db", db.resource.clone(), db.pool.clone(), 2, stats.clone(), db.breaker.clone());
        let far = || Instant::now() + Duration::from_secs(5);
        for (pool, n) in [(&a, 1), (&b, 2), (&a, 3)] {
            let (e, cause) = pool.checkout_why(far()).await.err().unwrap_or_else(|| panic!("connect {n} worked"));
            assert_eq!(cause, Cause::Connect, "{e}");
        }
        assert!(db.breaker.is_open());
        for pool in [&a, &b] {
            let (e, cause) = pool.checkout_why(far()).await.err().expect("refused");
            assert_eq!(cause, Cause::BreakerOpen, "{e}");
            assert!(e.message.contains("unavailable after 3 failed connects"), "{e}");
        }
        assert_eq!(stats.connect_failures.load(Ordering::SeqCst), 3);
        // Another config of the same resource (a reload) starts closed.
        let again = configure(&Memory(shared.clone()), "db", "down = false\n").unwrap();
        assert!(!again.breaker.is_open());
    });
}

#[test]
fn a_probe_dropped_mid_connect_does_not_keep_the_breaker_open() {
    let shared = Arc::new(Shared::default());
    let db = configure(&Memory(shared.clone()), "db", "down = true\nbreaker_failures = 1\nbreaker_cooldown = \"50ms\"\nconnect_timeout = \"300ms\"\n").unwrap();
    on_worker(async move {
        let pool = Pool::new("db", db.resource.clone(), db.pool.clone(), 1, rustomnic_resource::stats_for("test", "lost-probe"), db.breaker.clone());
        let far = || Instant::now() + Duration::from_secs(5);
        assert_eq!(pool.checkout_why(far()).await.err().map(|(_, c)| c), Some(Cause::Connect));
        tokio::time::sleep(Duration::from_millis(60)).await;
        // The probe hangs and its request goes away (dropped by the timeout) before it reports.
        shared.hang.store(true, Ordering::SeqCst);
        assert!(tokio::time::timeout(Duration::from_millis(20), pool.checkout(far())).await.is_err());
        shared.hang.store(false, Ordering::SeqCst);
        shared.down.store(false, Ordering::SeqCst);
        // While the lost probe could still be running, nobody else connects...
        assert_eq!(pool.checkout_why(far()).await.err().map(|(_, c)| c), Some(Cause::BreakerOpen));
        // ...and once connect_timeout has passed, a new probe goes and closes the breaker.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(pool.checkout(far()).await.is_ok(), "a new probe after the lost one");
        assert!(!db.breaker.is_open());
    });
}

#[test]
fn a_connection_dropped_mid_transaction_is_closed_not_reused() {
    let shared = Arc::new(Shared::default());
    let db = configure(&Memory(shared.clone()), "db", "").unwrap();
    on_worker(async move {
        let pool = Pool::new("db", db.resource.clone(), db.pool.clone(), 1, rustomnic_resource::stats_for("test", "mid-tx"), db.breaker.clone());
        let far = Instant::now() + Duration::from_secs(5);
        // Ended cleanly: back to the pool.
        let mut c = pool.checkout(far).await.expect("connect");
        c.set_in_transaction(true);
        c.set_in_transaction(false);
        drop(c);
        assert_eq!((pool.idle_connections(), pool.open_connections()), (1, 1));
        // Left inside its transaction (its request went away): closed.
        let mut c = pool.checkout(far).await.expect("reuse");
        c.set_in_transaction(true);
        drop(c);
        assert_eq!((pool.idle_connections(), pool.open_connections()), (0, 0));
        assert_eq!(shared.connects.load(Ordering::SeqCst), 1);
    });
}
