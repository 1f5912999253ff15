//! The celery interface through the real binary, a real Redis (PMNC_TEST_REDIS_URL, default
//! redis://127.0.0.1:6379/0) and stock Celery from PyPI as the client (`pip install celery
//! redis`, which .ci/run does): `AsyncResult.get()` returns what a Lua task returned; a Lua error
//! is re-raised in Python; an expired task is revoked, not run; `countdown` is not run early; an
//! oversized body fails with a clear error; a pickle message and an unknown task are left in the
//! queue for another worker; a worker killed with kill -9 with 1,000 tasks queued and some in flight loses none. Queues are
//! named after the test process.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod celery_support;
mod common;

use std::process::Command;
use std::time::Duration;

use celery_support::*;
use common::*;

/// Redis answers and Python has celery; else a loud SKIPPED.
fn ready() -> bool {
    celery_support::ready(true, false)
}

/// Runs a Python script with the Celery app `app` (broker and backend: the test's Redis), `q`
/// (the queue) and `r` (a Redis client) defined; its standard output.
fn python(queue: &str, script: &str) -> String {
    python_on(&redis_url(), queue, script)
}

/// [`python`] with the Redis at `url`.
fn python_on(url: &str, queue: &str, script: &str) -> String {
    let prelude = format!(
        "import json, sys, time, datetime\nfrom celery import Celery\nimport redis as redislib\napp = Celery(broker={url:?}, backend={url:?})\nq = {queue:?}\nr = redislib.Redis.from_url({url:?})\n"
    );
    run_python(&prelude, script)
}

fn cage(tree: &Tree, queue: &str, extra: &str) {
    write_cage(tree, &redis_url(), queue, extra);
}

#[test]
fn python_client_and_lua_tasks() {
    if !ready() {
        return;
    }
    let queue = format!("pmnc-celery-test-{}-main", std::process::id());
    let tree = Tree::new();
    // One task at a time: a task waiting for its eta must not hold that one slot.
    cage(&tree, &queue, "concurrency = 1\n");
    let mut server = start_cage(&tree);
    let out = python(
        &queue,
        &format!(
            "{CONFORMANCE}{}",
            r#"
print(json.dumps(outcome(app.send_task("tasks.add", args=[2.5, 0.25], queue=q))))
print(json.dumps(outcome(app.send_task("tasks.add", args=[40, 2], queue=q, priority=6))))
deep = []
for _ in range(300):
    deep = [deep]
print(json.dumps(outcome(app.send_task("tasks.add", args=[deep, 1], queue=q))))
r.lpush(q, b"\xffnot a message")
"#
        ),
    );
    let lines: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let lines = check_conformance(&out, &lines);
    assert_eq!(lines[0], serde_json::json!(["ok", 2.75]), "{out}");
    assert_eq!(lines[1], serde_json::json!(["ok", 42]), "a task sent with priority 6 (its own list) runs: {out}");
    assert_eq!(lines[2][0], "ValueError", "{out}");
    assert!(lines[2][1].as_str().unwrap().contains("deep"), "{out}");
    server.wait_for("is not a Celery message", Duration::from_secs(10)).expect("garbage kept aside");
    let kept = python(
        &queue,
        "print(r.lrange('rustomnic.celery.unreadable', 0, -1).count(b'\\xffnot a message'))\nr.lrem('rustomnic.celery.unreadable', 0, b'\\xffnot a message')",
    );
    assert_eq!(kept.trim(), "1", "the unreadable message is kept");

    // A pickle message and a task this cage does not serve stay in the queue for others.
    let out = python(
        &queue,
        r#"
a = app.send_task("tasks.add", args=[1, 2], queue=q, serializer="pickle")
b = app.send_task("tasks.other", args=[1], queue=q)
print(a.id, b.id)
"#,
    );
    server.wait_for("is not accepted (JSON only): left in queue", Duration::from_secs(10)).expect("pickle refused");
    server.wait_for("tasks.other is not one of this interface's tasks: left in queue", Duration::from_secs(10)).expect("unknown refused");
    let ids: Vec<&str> = out.split_whitespace().collect();
    let check = python(
        &queue,
        &format!(
            r#"
for _ in range(50):
    queued = [json.loads(m) for m in r.lrange(q, 0, -1)]
    if len(queued) == 2:
        break
    time.sleep(0.1)
print(json.dumps(sorted(m["headers"]["id"] for m in queued)))
print(json.dumps([app.AsyncResult(i).state for i in {ids:?}]))
"#
        ),
    );
    let mut expected: Vec<&str> = ids.clone();
    expected.sort();
    let lines: Vec<serde_json::Value> = check.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines[0], serde_json::json!(expected), "{check}");
    assert_eq!(lines[1], serde_json::json!(["PENDING", "PENDING"]), "no result is written for a task left to others: {check}");
    // A task run again after a crash keeps its first SUCCESS: a later FAILURE of the same id
    // is not written over it.
    let id = format!("guard-{queue}");
    // One slot: the task after it finishes after it, result written or not.
    let kept = python(
        &queue,
        &format!(
            "r.set('celery-task-meta-{id}', json.dumps({{'status': 'SUCCESS', 'result': 99, 'task_id': '{id}'}}))\napp.send_task('tasks.fail', args=[1], queue=q, task_id='{id}')\nafter = app.send_task('tasks.add', args=[1, 1], queue=q).get(timeout=20)\nprint(app.AsyncResult('{id}').get(timeout=5), after)\nr.delete('celery-task-meta-{id}')"
        ),
    );
    server.wait_for(&format!("task {id} (tasks.fail) failed"), Duration::from_secs(20)).expect("the task ran");
    assert_eq!(kept.trim(), "99 2", "a stored SUCCESS was overwritten");
    server.terminate(Duration::from_secs(10));
    python(&queue, "r.delete(q)");
}

#[test]
fn killed_worker_loses_no_task() {
    if !ready() {
        return;
    }
    // A Redis of its own: its visibility timeout of 2 s would put back the messages other tests
    // hold (kombu's `unacked` is one per Redis database).
    let port = spare_port();
    let Some(mut redis) = own_redis(port) else {
        shout("SKIPPED: no redis-server binary (apt-get install redis-server)");
        return;
    };
    let url = format!("redis://127.0.0.1:{port}/0");
    let python = |queue: &str, script: &str| python_on(&url, queue, script);
    let queue = format!("pmnc-celery-test-{}-kill", std::process::id());
    let tree = Tree::new();
    write_cage(&tree, &url, &queue, "visibility_timeout = \"2s\"\nconcurrency = 8\n");
    let ids = python(&queue, "print(' '.join(app.send_task('tasks.slow', args=[i], queue=q).id for i in range(1000)))");
    let ids: Vec<String> = ids.split_whitespace().map(str::to_string).collect();
    assert_eq!(ids.len(), 1000);
    let mut server = Server::start(&tree.path().join("app/c"), &[]);
    // Some tasks done, others in flight: then kill -9.
    python(&queue, "for _ in range(200):\n    if r.llen(q) < 900:\n        break\n    time.sleep(0.05)\n");
    server.signal(9);
    server.wait_exit(Duration::from_secs(10));
    // An entry of unacked that no worker can read (another program's): kept aside by the
    // sweep, not dropped.
    python(&queue, "r.hset('unacked', 'garbage-' + q, 'not json')\nr.zadd('unacked_index', {'garbage-' + q: 0})");
    let mut server = Server::start(&tree.path().join("app/c"), &[]);
    let out = python(
        &queue,
        &format!(
            r#"
ids = {ids:?}
values = [app.AsyncResult(i).get(timeout=60) for i in ids]
print(json.dumps(values))
"#
        ),
    );
    let mut lines = out.lines();
    let values: Vec<i64> = serde_json::from_str(lines.next().unwrap()).unwrap();
    assert_eq!(values, (0..1000).map(|i| i * 2).collect::<Vec<i64>>());
    assert!(
        server.log.iter().any(|l| l.contains("put back in queue")) || server.wait_for("put back in queue", Duration::from_secs(1)).is_some(),
        "no message was restored after the kill"
    );
    server.wait_for("cannot be read; kept in the list rustomnic.celery.unreadable", Duration::from_secs(10)).expect("the unreadable entry kept aside");
    let kept = python(&queue, "print(r.hexists('unacked', 'garbage-' + q), r.lrem('rustomnic.celery.unreadable', 0, 'not json') >= 1)");
    assert_eq!(kept.trim(), "False True", "the entry left unacked for the unreadable list");
    server.terminate(Duration::from_secs(10));
    redis.stop();
}

#[test]
fn bad_celery_config_is_reported_with_file_line_and_key() {
    let t = Tree::new();
    t.write(
        "c/cage.toml",
        "[interfaces.tasks]\nprotocol = \"celery\"\nbroker = \"http://guest:secret@h//\"\ntasks = { \"a.b\" = \"nodot\", \"tasks.add\" = \"math.nothere\" }\nconcurrency = 0\nvisibility_timeout = \"500ms\"\n\n[interfaces.more]\nprotocol = \"celery\"\nbroker = \"redis://127.0.0.1:6379/0\"\ntasks = [\"math.add\"]\nresult_backend = \"rpc://\"\nprefetch = 10\nhostname = \"\"\n\n[interfaces.amqp]\nprotocol = \"celery\"\nbroker = \"amqp://guest:guest@127.0.0.1:5672/%2f?heartbeat=x\"\ntasks = [\"math.add\"]\n",
    );
    t.write("c/math.lua", "return { add = function(a, b) return a + b end }");
    let out = pmnc_limited(&["check", t.path().join("c").to_str().unwrap()], Duration::from_secs(60));
    assert_ne!(out.code, Some(0));
    let text = format!("{}{}", out.stdout, out.stderr);
    assert!(!text.contains("secret"), "a password in a URL is not shown: {text}");
    for want in [
        "cage.toml:3: interfaces.tasks.broker: \"http://h//\" is not a redis:// or amqp:// URL",
        "cage.toml:12: interfaces.more.result_backend: \"rpc://\" needs an AMQP broker",
        "cage.toml:13: interfaces.more.prefetch: is for an AMQP broker",
        "cage.toml:14: interfaces.more.hostname: must be a worker name",
        "cage.toml:18: interfaces.amqp.broker:",
        "cage.toml:4: interfaces.tasks.tasks: task \"a.b\": \"nodot\" is not \"module.function\"",
        "cage.toml:5: interfaces.tasks.concurrency: 0 is out of range",
        "cage.toml:6: interfaces.tasks.visibility_timeout: must be at least 1s",
    ] {
        assert!(text.contains(want), "{want:?} not in:\n{text}");
    }
    // Every task's function must exist, named at the tasks key.
    let t = Tree::new();
    t.write("c/cage.toml", &format!("[interfaces.tasks]\nprotocol = \"celery\"\nbroker = {:?}\ntasks = [\"math.add\", \"math.nothere\"]\n", redis_url()));
    t.write("c/math.lua", "return { add = function(a, b) return a + b end }");
    let out = pmnc_limited(&["check", t.path().join("c").to_str().unwrap()], Duration::from_secs(60));
    let text = format!("{}{}", out.stdout, out.stderr);
    assert!(text.contains("cage.toml:4: interfaces.tasks.tasks: module math (") && text.contains("has no function nothere"), "{text}");
    assert!(!text.contains("interfaces.tasks.handler"), "the default handler is not a celery interface's: {text}");
    let t = Tree::new();
    t.write("c/cage.toml", "[interfaces.tasks]\nprotocol = \"celery\"\n");
    t.write("c/tasks.lua", "return {}");
    let out = pmnc_limited(&["check", t.path().join("c").to_str().unwrap()], Duration::from_secs(60));
    let text = format!("{}{}", out.stdout, out.stderr);
    assert!(text.contains("interfaces.tasks: broker is required") && text.contains("interfaces.tasks: tasks is required"), "{text}");
}

/// A chain that goes from a stock Celery worker to ours and back: each worker continues the
/// chain to the next step's queue.
#[test]
fn chain_through_python_and_lua_workers() {
    if !ready() {
        return;
    }
    let queue = format!("pmnc-celery-test-{}-chain", std::process::id());
    let pyq = format!("{queue}-py");
    let tree = Tree::new();
    cage(&tree, &queue, &format!("\n[resources.py]\nprotocol = \"celery\"\nbroker = {:?}\nqueue = {pyq:?}\n", redis_url()));
    write_python_tasks(&tree, &redis_url(), &redis_url());
    let mut worker = python_worker(&tree.path().join("py"), "pytasks", &pyq);
    let mut server = start_cage(&tree);
    let out = python(
        &queue,
        &format!(
            r#"
pyq = {pyq:?}
{CANVAS}
print(chord([app.signature("tasks.add", args=[1, 1], queue=q), app.signature("tasks.pymul", args=[2, 3], queue=pyq), app.signature("tasks.add", args=[2, 2], queue=q)], app.signature("tasks.pysum", queue=pyq))().get(timeout=60))
failing = chord([app.signature("tasks.add", args=[1, 1], queue=q), app.signature("tasks.fail", args=[3], queue=q)], app.signature("tasks.pysum", queue=pyq))()
body = app.AsyncResult(failing.id)
for _ in range(300):
    if body.state == "FAILURE":
        break
    time.sleep(0.1)
print(body.state, type(body.result).__name__, str(body.result))
print(json.dumps(app.send_task("tasks.canvas", queue=q).get(timeout=60)))
print(app.send_task("tasks.relay", args=[6, 7], queue=q).get(timeout=60))
print(json.dumps(app.send_task("tasks.relay_fail", queue=q).get(timeout=60), sort_keys=True))
unsent = "unsent-" + q
print(app.send_task("tasks.unsent", args=[unsent], queue=q).get(timeout=60))
time.sleep(0.5)
print(app.AsyncResult(unsent).state, any(unsent.encode() in m for m in r.lrange(pyq, 0, -1)))
"#
        ),
    );
    let _ = worker.kill();
    let _ = worker.wait();
    server.terminate(Duration::from_secs(10));
    python(&queue, &format!("r.delete(q, {pyq:?})"));
    let lines: Vec<&str> = out.lines().collect();
    let lines = check_canvas(&out, &lines);
    assert_eq!(lines[0], "12", "a chord whose parts run on Python and Lua workers: {out}");
    assert!(
        lines[1].starts_with("FAILURE ChordError Dependency ") && lines[1].contains("RuntimeError") && lines[1].contains("bad input 3"),
        "a failed part fails the body: {out}"
    );
    assert_eq!(lines[2], "[84, 2, 12]", "a chain (6, 42, 84) and a group sent from Lua to the Python worker: {out}");
    assert_eq!(lines[3], "42", "a Lua task sent tasks.pymul(6, 7) to the Python worker and read its result: {out}");
    let failed: serde_json::Value = serde_json::from_str(lines[4]).unwrap();
    assert_eq!((failed["ok"].as_bool(), failed["code"].as_str()), (Some(false), Some("TypeError")), "{out}");
    assert!(failed["message"].as_str().unwrap().contains("failure: TypeError"), "{out}");
    assert_eq!(lines[5], "False", "the transaction was not accepted: {out}");
    assert_eq!(lines[6], "PENDING False", "a rolled-back send_task sends nothing: {out}");
}

/// With `send_events`, a stock Flower (from PyPI) sees our worker alive and a task it ran, from
/// the events alone.
#[test]
fn flower_sees_the_worker_and_its_tasks() {
    if !ready() {
        return;
    }
    if !python_has("flower", "pip install flower; .ci/run installs it") {
        return;
    }
    let queue = format!("pmnc-celery-test-{}-flower", std::process::id());
    let worker = format!("pmnc-test-{}@flower", std::process::id());
    let tree = Tree::new();
    cage(&tree, &queue, &format!("send_events = true\nhostname = {worker:?}\n"));
    let (mut flower, addr) = start_flower(&redis_url());
    let mut server = start_cage(&tree);
    let id = python(&queue, "r = app.send_task('tasks.add', args=[20, 22], queue=q)\nprint(r.id, r.get(timeout=20))");
    let (id, value) = id.trim().split_once(' ').unwrap();
    assert_eq!(value, "42");
    let (seen, alive, tasks) = flower_sees(addr, &worker, id, "SUCCESS");
    server.terminate(Duration::from_secs(10));
    let _ = flower.kill();
    let _ = flower.wait();
    python(&queue, "r.delete(q)");
    assert!(seen, "Flower did not see the worker and its task: workers {alive}; tasks {tasks}");
    let t: serde_json::Value = serde_json::from_str(&tasks).unwrap();
    assert_eq!(t[id]["name"], "tasks.add", "{tasks}");
    assert_eq!(t[id]["worker"], worker.as_str(), "{tasks}");
}

/// examples/celery works as its README says: the Python client's charge is made by the cage,
/// the receipt task reaches the Python worker, a bad amount comes back as the Lua error.
#[test]
fn the_celery_example_works_as_its_readme_says() {
    if !ready() {
        return;
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/celery");
    let tree = Tree::new();
    let url = redis_url();
    for file in ["billing/cage.toml", "billing/billing.lua", "python/tasks.py", "python/client.py"] {
        let text = std::fs::read_to_string(root.join(file)).unwrap().replace("redis://127.0.0.1:6379/0", &url);
        tree.write(&format!("celery/{file}"), &text);
    }
    python("billing", "r.delete('billing', 'mail')");
    let mut server = Server::start(&tree.path().join("celery/billing"), &[]);
    server.wait_for("consuming Celery tasks", Duration::from_secs(10)).expect("consuming");
    let py = tree.path().join("celery/python");
    let log = tree.path().join("worker.log");
    let mut worker = Command::new("python3")
        .args(["-m", "celery", "-A", "tasks", "worker", "-Q", "mail", "--pool", "solo", "--without-gossip", "--without-mingle", "--loglevel", "INFO"])
        .current_dir(&py)
        .env("BROKER", &url)
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(tree.path().join("worker.err")).unwrap())
        .spawn()
        .expect("celery worker");
    let out = Command::new("python3").arg("client.py").current_dir(&py).env("BROKER", &url).output().expect("client");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    // Celery logs what a task prints, on its standard error.
    let printed = || std::fs::read_to_string(&log).unwrap_or_default() + &std::fs::read_to_string(tree.path().join("worker.err")).unwrap_or_default();
    let receipt = until(Duration::from_secs(30), || printed().contains("receipt for alice: 12.50 EUR"));
    let _ = worker.kill();
    let _ = worker.wait();
    server.terminate(Duration::from_secs(10));
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("'cents': 1250") && stdout.contains("'customer': 'alice'"), "{stdout}");
    assert!(stdout.contains("RuntimeError: billing/billing.lua:16: amount must be a positive number, got -3"), "{stdout}");
    assert!(receipt, "the Python worker printed no receipt: {}", printed());
}
