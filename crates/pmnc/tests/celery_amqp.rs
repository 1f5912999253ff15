//! The celery interface and resource on an AMQP broker, through the real binary, a real
//! RabbitMQ (PMNC_TEST_AMQP_URL, default amqp://guest:guest@127.0.0.1:5672/%2f) and stock Celery
//! from PyPI (`pip install celery redis`, which .ci/run does): results by the RPC backend (the
//! client's reply queue) and by Redis; errors, expiry, countdown, a far eta parked in the delay
//! queue, retries, callbacks, chains through Python and Lua workers, the resource sending to a
//! Python worker, refused messages left for others, garbage kept aside, a worker killed with
//! kill -9 with 1,000 tasks queued losing none. Queues are named after the test process and
//! deleted at the end.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod celery_support;
mod common;

use std::time::Duration;

use celery_support::*;
use common::*;

/// RabbitMQ (and, when `redis`, Redis) answer and Python has celery; else a loud SKIPPED.
fn ready(redis: bool) -> bool {
    celery_support::ready(redis, true)
}

/// Runs a Python script with the Celery app `app` (the test's RabbitMQ; results by `backend`)
/// and `q` (the queue) defined, and `count(queue)` / `consumers(queue)` / `get(queue)` / `purge(*queues)` helpers;
/// its standard output.
fn python(queue: &str, backend: &str, script: &str) -> String {
    let prelude = format!(
        r#"import json, sys, time, datetime
from celery import Celery
app = Celery(broker={url:?}, backend={backend:?})
q = {queue:?}
def count(name):
    with app.connection_for_write() as c:
        try:
            return c.default_channel.queue_declare(name, passive=True).message_count
        except Exception:
            return -1
def consumers(name):
    with app.connection_for_write() as c:
        try:
            return c.default_channel.queue_declare(name, passive=True).consumer_count
        except Exception:
            return -1
def get(name):
    with app.connection_for_write() as c:
        m = c.default_channel.basic_get(name, no_ack=True)
        return m
def purge(*names):
    with app.connection_for_write() as c:
        for n in names:
            try:
                c.default_channel.queue_delete(n)
            except Exception:
                pass
"#,
        url = celery_url()
    );
    run_python(&prelude, script)
}

fn cage(tree: &Tree, queue: &str, extra: &str) {
    write_cage(tree, &celery_url(), queue, extra);
}

#[test]
fn python_client_and_lua_tasks_over_amqp() {
    if !ready(false) {
        return;
    }
    let queue = format!("pmnc-celery-amqp-{}-main", std::process::id());
    let tree = Tree::new();
    cage(&tree, &queue, "concurrency = 1\n");
    let mut server = start_cage(&tree);
    let out = python(
        &queue,
        "rpc://",
        &format!(
            "{CONFORMANCE}{}",
            r#"
late = app.send_task("tasks.add", args=[1, 1], queue=q, countdown=3600)
for _ in range(100):
    if count(q + ".rustomnic.delay") == 1:
        break
    time.sleep(0.1)
print(json.dumps(["parked", count(q + ".rustomnic.delay"), late.ready()]))
print(json.dumps(["consumers", consumers(q)]))
import amqp
with app.connection_for_write() as c:
    c.default_channel.basic_publish(amqp.Message(b"\xffnot a message"), exchange="", routing_key=q)
"#
        ),
    );
    let lines: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let lines = check_conformance(&out, &lines);
    assert_eq!(lines[0], serde_json::json!(["parked", 1, false]), "a task an hour away waits in the delay queue: {out}");
    // Two workers, concurrency 1: one worker has the whole share, the other does not consume.
    assert_eq!(lines[1], serde_json::json!(["consumers", 1]), "one consumer for concurrency 1: {out}");
    server.wait_for("is not a Celery message", Duration::from_secs(10)).expect("garbage kept aside");

    // A pickle message and a task this cage does not serve stay in the queue for others.
    let out = python(
        &queue,
        "rpc://",
        r#"
a = app.send_task("tasks.add", args=[1, 2], queue=q, serializer="pickle")
b = app.send_task("tasks.other", args=[1], queue=q)
print(a.id, b.id)
"#,
    );
    server.wait_for("is not accepted (JSON only): left in queue", Duration::from_secs(10)).expect("pickle refused");
    server.wait_for("tasks.other is not one of this interface's tasks: left in queue", Duration::from_secs(10)).expect("unknown refused");
    server.terminate(Duration::from_secs(20));
    let ids: Vec<&str> = out.split_whitespace().collect();
    let check = python(
        &queue,
        "rpc://",
        r#"
ids = []
while True:
    m = get(q)
    if m is None:
        break
    ids.append(m.headers["id"])
print(json.dumps(sorted(ids)))
kept = []
while True:
    m = get("rustomnic.celery.unreadable")
    if m is None:
        break
    kept.append(m.body)
print(json.dumps([b"\xffnot a message" in kept, count(q + ".rustomnic.delay")]))
purge(q, q + ".rustomnic.delay")
"#,
    );
    let mut expected: Vec<&str> = ids.clone();
    expected.sort();
    let lines: Vec<serde_json::Value> = check.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines[0], serde_json::json!(expected), "the refused messages are in the queue, nothing else: {check}");
    assert_eq!(lines[1], serde_json::json!([true, 1]), "the garbage kept aside, the parked task still parked: {check}");
}

/// A chain from a stock Celery worker to ours and back (AMQP broker, Redis results), and the
/// celery resource sending to the Python worker and reading its result by the RPC backend.
#[test]
fn chain_and_resource_through_python_worker_over_amqp() {
    if !ready(true) {
        return;
    }
    let queue = format!("pmnc-celery-amqp-{}-chain", std::process::id());
    let pyq = format!("{queue}-py");
    let tree = Tree::new();
    cage(
        &tree,
        &queue,
        &format!("result_backend = {r:?}\n\n[resources.py]\nprotocol = \"celery\"\nbroker = {url:?}\nqueue = {pyq:?}\n", r = redis_url(), url = celery_url()),
    );
    write_python_tasks(&tree, &celery_url(), &redis_url());
    // The Python worker's results go to Redis for the chain. A task our resource sends carries
    // its reply queue, which a worker with the Redis backend ignores, so the resource test below
    // runs the worker again with the RPC backend.
    let mut py = python_worker(&tree.path().join("py"), "pytasks", &pyq);
    let mut server = start_cage(&tree);
    let out = python(
        &queue,
        &redis_url(),
        &format!(
            r#"
pyq = {pyq:?}
{CANVAS}
"#
        ),
    );
    let _ = py.kill();
    let _ = py.wait();
    server.terminate(Duration::from_secs(10));
    let lines: Vec<&str> = out.lines().collect();
    assert!(check_canvas(&out, &lines).is_empty(), "{out}");

    // The resource with the RPC backend, against a Python worker with the RPC backend.
    cage(&tree, &queue, &format!("\n[resources.py]\nprotocol = \"celery\"\nbroker = {url:?}\nqueue = {pyq:?}\n", url = celery_url()));
    write_python_tasks(&tree, &celery_url(), "rpc://");
    let mut py = python_worker(&tree.path().join("py"), "pytasks", &pyq);
    let mut server = start_cage(&tree);
    let out = python(
        &queue,
        "rpc://",
        r#"
print(app.send_task("tasks.relay", args=[6, 7], queue=q).get(timeout=60))
print(json.dumps(app.send_task("tasks.relay_fail", queue=q).get(timeout=60), sort_keys=True))
"#,
    );
    let _ = py.kill();
    let _ = py.wait();
    server.terminate(Duration::from_secs(10));
    python(&queue, "rpc://", &format!("purge(q, {pyq:?})"));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "42", "a Lua task sent tasks.pymul(6, 7) to the Python worker and read its result from its reply queue: {out}");
    let failed: serde_json::Value = serde_json::from_str(lines[1]).unwrap();
    assert_eq!((failed["ok"].as_bool(), failed["code"].as_str()), (Some(false), Some("TypeError")), "{out}");
}

#[test]
fn killed_worker_loses_no_task_over_amqp() {
    if !ready(true) {
        return;
    }
    let queue = format!("pmnc-celery-amqp-{}-kill", std::process::id());
    let tree = Tree::new();
    cage(&tree, &queue, &format!("result_backend = {:?}\nconcurrency = 8\n", redis_url()));
    let ids = python(&queue, &redis_url(), "print(' '.join(app.send_task('tasks.slow', args=[i], queue=q).id for i in range(1000)))");
    let ids: Vec<String> = ids.split_whitespace().map(str::to_string).collect();
    assert_eq!(ids.len(), 1000);
    let mut server = Server::start(&tree.path().join("app/c"), &[]);
    // Some tasks done, others in flight: then kill -9.
    python(&queue, &redis_url(), "for _ in range(400):\n    if 0 <= count(q) < 900:\n        break\n    time.sleep(0.05)\n");
    server.signal(9);
    server.wait_exit(Duration::from_secs(10));
    let mut first = server;
    let mut server = Server::start(&tree.path().join("app/c"), &[]);
    let out = python(
        &queue,
        &redis_url(),
        &format!(
            r#"
ids = {ids:?}
deadline = time.time() + 90
values = []
for i in ids:
    try:
        values.append(app.AsyncResult(i).get(timeout=max(1, deadline - time.time())))
    except Exception as e:
        values.append(None)
print(json.dumps(values))
import redis as redislib
r = redislib.Redis.from_url({r:?})
print(sum(1 for i in ids if r.get("celery-task-meta-" + i) and json.loads(r.get("celery-task-meta-" + i))["status"] == "SUCCESS"))
print(count(q))
print(consumers(q))
"#,
            r = redis_url()
        ),
    );
    server.terminate(Duration::from_secs(10));
    python(&queue, &redis_url(), "purge(q)");
    let mut lines = out.lines();
    let values: Vec<Option<i64>> = serde_json::from_str(lines.next().unwrap()).unwrap();
    let missing: Vec<(usize, &String)> = values.iter().zip(&ids).enumerate().filter(|(_, (v, _))| v.is_none()).map(|(i, (_, id))| (i, id)).collect();
    if let Some((_, id)) = missing.first() {
        first.drain(Duration::from_millis(200));
        server.drain(Duration::from_millis(200));
        let log: Vec<&String> = first.log.iter().chain(server.log.iter()).filter(|l| l.contains(id.as_str())).collect();
        panic!(
            "{} task(s) without a result, the first {id}; left in the queue: {}; log lines naming it: {log:?}",
            missing.len(),
            out.lines().nth(2).unwrap_or("?")
        );
    }
    assert_eq!(values, (0..1000).map(|i| Some(i * 2)).collect::<Vec<_>>());
    assert_eq!(lines.next(), Some("1000"), "every task has its one SUCCESS");
    lines.next();
    // Concurrency 8 on two workers: a consumer of the queue on each (decision 162).
    assert_eq!(lines.next(), Some("2"), "one consumer per worker: {out}");
}

/// The result backend goes away while tasks run: their results cannot be stored, so their
/// messages go back to the queue instead of being acknowledged, the session connects again, and
/// once the backend is back every result is there.
#[test]
fn results_survive_a_result_backend_outage() {
    if !ready(false) {
        return;
    }
    let port = spare_port();
    let Some(mut redis) = own_redis(port) else {
        shout("SKIPPED: no redis-server binary (apt-get install redis-server)");
        return;
    };
    let backend = format!("redis://127.0.0.1:{port}/0");
    let queue = format!("pmnc-celery-amqp-{}-outage", std::process::id());
    let tree = Tree::new();
    cage(&tree, &queue, &format!("result_backend = {backend:?}\n"));
    let mut server = start_cage(&tree);
    redis.stop();
    let ids = python(&queue, "disabled://", "print(' '.join(app.send_task('tasks.add', args=[i, 1], queue=q).id for i in range(20)))");
    let ids: Vec<String> = ids.split_whitespace().map(str::to_string).collect();
    server.wait_for("goes back to its queue", Duration::from_secs(20)).expect("a result that cannot be stored sends its task back");
    let mut redis = own_redis(port).expect("redis again");
    let out = python(
        &queue,
        &backend,
        &format!(
            r#"
ids = {ids:?}
print(json.dumps([app.AsyncResult(i).get(timeout=60) for i in ids]))
"#
        ),
    );
    server.terminate(Duration::from_secs(10));
    redis.stop();
    python(&queue, "disabled://", "purge(q)");
    let values: Vec<i64> = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(values, (1..=20).collect::<Vec<i64>>(), "every task's result is stored once the backend is back");
}

/// With `send_events` on RabbitMQ, a stock Flower sees our worker alive and a task it ran.
#[test]
fn flower_sees_the_worker_over_amqp() {
    if !ready(false) {
        return;
    }
    if !python_has("flower", "pip install flower; .ci/run installs it") {
        return;
    }
    let queue = format!("pmnc-celery-amqp-{}-flower", std::process::id());
    let worker = format!("pmnc-amqp-{}@flower", std::process::id());
    let tree = Tree::new();
    cage(&tree, &queue, &format!("send_events = true\nhostname = {worker:?}\n"));
    let (mut flower, addr) = start_flower(&celery_url());
    let mut server = start_cage(&tree);
    let out = python(&queue, "rpc://", "r = app.send_task('tasks.fail', args=[5], queue=q)\nprint(r.id, r.get(timeout=20, propagate=False))");
    let id = out.split_whitespace().next().unwrap().to_string();
    let (seen, alive, tasks) = flower_sees(addr, &worker, &id, "FAILURE");
    server.terminate(Duration::from_secs(10));
    let _ = flower.kill();
    let _ = flower.wait();
    python(&queue, "rpc://", "purge(q)");
    assert!(seen, "Flower did not see the worker and its failed task: workers {alive}; tasks {tasks}");
    let t: serde_json::Value = serde_json::from_str(&tasks).unwrap();
    assert!(t[&id]["exception"].as_str().unwrap_or("").contains("bad input 5"), "{tasks}");
}
