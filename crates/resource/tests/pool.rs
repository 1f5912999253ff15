//! Pools and transactions with an in-memory protocol: commit and rollback reach every
//! participant, exhaustion waits until the deadline, the breaker opens and recovers.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::LocalBoxFuture;
use rustomnic_core::{Section, Value};
use rustomnic_resource::testing::{configure, run_lua};
use rustomnic_resource::{Connection, Error, ResourceProtocol, Resource};

#[derive(Default)]
struct Shared {
    journal: Mutex<Vec<String>>,
    down: AtomicBool,
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
    fn is_healthy(&mut self) -> LocalBoxFuture<'_, bool> {
        Box::pin(async { true })
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
    assert_eq!(r, vec![Value::Bool(false), Value::Int(2), Value::str("E1"), Value::Bool(true), Value::str("resource db (participant 2): no method bogus [E1]")]);
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
    assert_eq!(stats.in_use.load(Ordering::SeqCst), 0, "every connection went back");
    assert_eq!(stats.waiting.load(Ordering::SeqCst), 0);
    assert!(rustomnic_resource::all_stats().iter().any(|(c, r, _)| c == "test" && r == "counted"));
}
