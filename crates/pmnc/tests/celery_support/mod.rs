//! What the celery tests share: the brokers' URLs (PMNC_TEST_REDIS_URL, PMNC_TEST_AMQP_URL) and
//! the loud skips, the test cage (its tasks and their Lua module), and a stock Flower to watch
//! the events.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(dead_code)]

use std::net::{SocketAddr, ToSocketAddrs};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::common::*;

pub fn redis_url() -> String {
    std::env::var("PMNC_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".to_string())
}

pub fn amqp_url() -> String {
    std::env::var("PMNC_TEST_AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_string())
}

/// The AMQP broker's URL as Celery writes it (the default vhost as "//").
pub fn celery_url() -> String {
    let url = amqp_url();
    match url.strip_suffix("/%2f") {
        Some(base) => format!("{base}//"),
        None => url,
    }
}

/// Says loudly (past the harness's capture) that a test is skipped.
pub fn shout(text: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "\n!!!!!!!!\n{text}\n!!!!!!!!\n");
}

/// Whether the server of `url` (`scheme` stripped, `port` by default) takes connections.
pub fn reachable(url: &str, scheme: &str, port: u16) -> bool {
    let rest = url.trim_start_matches(scheme);
    let rest = rest.rsplit_once('@').map(|(_, h)| h).unwrap_or(rest);
    let host = rest.split('/').next().unwrap_or("");
    let hostport = if host.contains(':') { host.to_string() } else { format!("{host}:{port}") };
    hostport.to_socket_addrs().ok().and_then(|mut a| a.next()).is_some_and(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok())
}

/// Redis answers (when `redis`), RabbitMQ answers (when `amqp`), and Python has Celery; else a
/// loud SKIPPED.
pub fn ready(redis: bool, amqp: bool) -> bool {
    if redis && !reachable(&redis_url(), "redis://", 6379) {
        shout(&format!("SKIPPED: no Redis at {}; start it with: redis-server --daemonize yes", redis_url()));
        return false;
    }
    if amqp && !reachable(&amqp_url(), "amqp://", 5672) {
        shout(&format!("SKIPPED: no RabbitMQ at {}; start it with: rabbitmq-server -detached (or: service rabbitmq-server start)", amqp_url()));
        return false;
    }
    python_has("celery, redis", "pip install celery redis; .ci/run installs it")
}

/// Whether Python can import `modules`; else a loud SKIPPED saying how to install them.
pub fn python_has(modules: &str, install: &str) -> bool {
    let ok = Command::new("python3").args(["-c", &format!("import {modules}")]).output().is_ok_and(|o| o.status.success());
    if !ok {
        shout(&format!("SKIPPED: Python has no {modules} ({install})"));
    }
    ok
}

/// Runs `prelude` then `script` in Python; its standard output (a failure fails the test).
pub fn run_python(prelude: &str, script: &str) -> String {
    let out = Command::new("python3").arg("-c").arg(format!("{prelude}{script}")).output().expect("python3");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "python failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    stdout
}

/// The test cage at app/c of `tree`: a celery interface on `broker` consuming `queue`, serving
/// the tasks of math.lua; `extra` is appended to its cage.toml.
pub fn write_cage(tree: &Tree, broker: &str, queue: &str, extra: &str) {
    let tasks = ["add", "fail", "now", "slow", "flaky", "hopeless", "echo", "relay", "relay_fail", "unsent", "canvas"]
        .iter()
        .map(|t| format!("\"tasks.{t}\" = \"math.{t}\""))
        .collect::<Vec<_>>()
        .join(", ");
    tree.write(
        "app/c/cage.toml",
        &format!("[interfaces.tasks]\nprotocol = \"celery\"\nbroker = {broker:?}\nqueues = [{queue:?}]\ntasks = {{ {tasks} }}\n{extra}"),
    );
    tree.write("app/c/math.lua", MATH_LUA);
}

/// Runs the test cage of `tree` and waits until its celery interface consumes.
pub fn start_cage(tree: &Tree) -> Server {
    let mut server = Server::start(&tree.path().join("app/c"), &[]);
    server.wait_for("consuming Celery tasks", Duration::from_secs(10)).expect("consuming");
    server
}

/// The test cage's tasks.
pub const MATH_LUA: &str = r#"local M = {}
function M.add(a, b, kwargs) return a + b + (kwargs.z or 0) end
function M.fail(x) error("bad input " .. tostring(x)) end
function M.now() return pmnc.time.now() end
function M.slow(n) pmnc.sleep(0.02) return n * 2 end
-- Succeeds at its third run (two retries).
function M.flaky(n)
  local retries = pmnc.request.parameters.retries
  if retries < 2 then pmnc.celery.retry{ countdown = 0.2, max_retries = 5, reason = "not yet" } end
  return n + retries
end
function M.echo(x) return x end
-- Through the celery resource (py, in the chain test): a task of a Python worker, at commit.
function M.relay(x, y)
  local id = pmnc.transaction.py.send_task("tasks.pymul", { x, y })
  return pmnc.transaction.py.result(id, 30)
end
function M.relay_fail()
  local id = pmnc.transaction.py.send_task("tasks.pymul", { "x" })
  local ok, e = pcall(pmnc.transaction.py.result, id, 30)
  return { ok = ok, code = e.code, message = e.message }
end
function M.unsent(id)
  local xa = pmnc.transaction.create{ accept = function() return false end }
  xa.py.send_task("tasks.pymul", { 1, 1 }, nil, { task_id = id })
  return (pcall(xa.execute))
end
-- A chain and a group of the Python worker's tasks, sent from Lua.
function M.canvas()
  local py = pmnc.transaction.py
  local last = py.chain{ { "tasks.pymul", { 2, 3 } }, { "tasks.pymul", { 7 } }, { "tasks.pymul", { 2 } } }
  local g = py.group{ { "tasks.pymul", { 1, 2 } }, { "tasks.pymul", { 3, 4 } } }
  local out = { py.result(last, 30) }
  for _, id in ipairs(g.tasks) do out[#out + 1] = py.result(id, 30) end
  return out
end
function M.hopeless() pmnc.celery.retry{ countdown = 0.1, max_retries = 1, reason = "never" } end
return M
"#;

/// What a Celery client sees of our worker, the same on every broker: a Python script (after a
/// prelude defining `app` and the queue `q`, on a cage with `concurrency = 1`) printing one JSON
/// line per check, and [`check_conformance`] for its lines. It defines `outcome(result)` for the
/// broker's own checks that follow it.
pub const CONFORMANCE: &str = r#"
def outcome(res, timeout=20):
    try:
        return ["ok", res.get(timeout=timeout)]
    except Exception as e:
        return [type(e).__name__, str(e)]
print(json.dumps(outcome(app.send_task("tasks.add", args=[2, 3], kwargs={"z": 1}, queue=q))))
print(json.dumps(outcome(app.send_task("tasks.fail", args=[7], queue=q))))
past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=5)
print(json.dumps(outcome(app.send_task("tasks.add", args=[1, 1], queue=q, expires=past))))
sent = time.time()
res = app.send_task("tasks.now", queue=q, countdown=2)
quick = app.send_task("tasks.add", args=[1, 2], queue=q)
print(json.dumps(["quick", quick.get(timeout=20), res.ready()]))
ran_at = res.get(timeout=20)
print(json.dumps(["countdown", ran_at - sent]))
print(json.dumps(outcome(app.send_task("tasks.add", args=["x" * 16000000, 1], queue=q), timeout=120)))
print(json.dumps(outcome(app.send_task("tasks.flaky", args=[40], queue=q))))
print(json.dumps(outcome(app.send_task("tasks.hopeless", queue=q))))
cb = app.signature("tasks.add", args=[10], queue=q)
cb.freeze()
app.send_task("tasks.add", args=[1, 2], queue=q, link=cb)
eb = app.signature("tasks.echo", queue=q)
eb.freeze()
failed = app.send_task("tasks.fail", args=[1], queue=q, link_error=eb)
print(json.dumps([app.AsyncResult(cb.id).get(timeout=20), app.AsyncResult(eb.id).get(timeout=20) == failed.id]))
from celery import chain
steps = chain(app.signature("tasks.add", args=[2, 3], queue=q), app.signature("tasks.add", args=[10], queue=q), app.signature("tasks.add", args=[1, 1], queue=q, immutable=True))
print(json.dumps(outcome(steps.apply_async())))
"#;

/// Asserts the lines [`CONFORMANCE`] printed (the first of `lines`); returns the rest. `out` is
/// the whole output, for the messages.
pub fn check_conformance<'a>(out: &str, lines: &'a [serde_json::Value]) -> &'a [serde_json::Value] {
    assert!(lines.len() >= 10, "{out}");
    assert_eq!(lines[0], serde_json::json!(["ok", 6]), "{out}");
    assert_eq!(lines[1][0], "RuntimeError", "{out}");
    assert!(lines[1][1].as_str().unwrap().contains("bad input 7"), "{out}");
    assert_eq!(lines[2][0], "TaskRevokedError", "{out}");
    assert_eq!(lines[3], serde_json::json!(["quick", 3, false]), "a task sent after a countdown one ran first: {out}");
    let waited = lines[4][1].as_f64().unwrap();
    assert!(waited >= 1.9, "a countdown of 2 s ran after {waited} s: {out}");
    assert_eq!(lines[5][0], "ValueError", "{out}");
    assert!(lines[5][1].as_str().unwrap().contains("max_message_size"), "{out}");
    assert_eq!(lines[6], serde_json::json!(["ok", 42]), "retried twice, then 40 + 2: {out}");
    assert_eq!(lines[7][0], "MaxRetriesExceededError", "{out}");
    assert!(lines[7][1].as_str().unwrap().contains("max retries (1) exceeded: never"), "{out}");
    assert_eq!(lines[8], serde_json::json!([13, true]), "a callback got the result first, an errback the failed task's id: {out}");
    assert_eq!(lines[9], serde_json::json!(["ok", 2]), "a chain of three steps on this worker ends with the immutable step: {out}");
    &lines[10..]
}

/// A stock Celery worker (solo pool, quiet) of the app `module` in `dir`, consuming `queue`.
pub fn python_worker(dir: &std::path::Path, module: &str, queue: &str) -> Child {
    Command::new("python3")
        .args([
            "-m",
            "celery",
            "-A",
            module,
            "worker",
            "--pool",
            "solo",
            "-Q",
            queue,
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "--loglevel",
            "WARNING",
        ])
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("celery worker")
}

/// Writes py/pytasks.py: a Celery app on `broker` with results in `backend`, serving
/// `tasks.pymul(x, y)` and `tasks.pysum(xs)` (for [`python_worker`]).
pub fn write_python_tasks(tree: &Tree, broker: &str, backend: &str) {
    tree.write(
        "py/pytasks.py",
        &format!(
            "from celery import Celery\napp = Celery(\"pytasks\", broker={broker:?}, backend={backend:?})\napp.conf.result_backend_always_retry = False\n@app.task(name=\"tasks.pymul\")\ndef pymul(x, y):\n    return x * y\n@app.task(name=\"tasks.pysum\")\ndef pysum(xs):\n    return sum(xs)\n"
        ),
    );
}

/// Canvas across workers, the same on every broker (after a prelude defining `app`, `q`, our
/// worker's queue, and `pyq`, the Python worker's): a chain Python -> Lua -> Python and a chord
/// of ten Lua parts with a Python body; [`check_canvas`] reads its lines.
pub const CANVAS: &str = r#"
from celery import chain, chord
steps = chain(app.signature("tasks.pymul", args=[2, 3], queue=pyq), app.signature("tasks.add", args=[10], queue=q), app.signature("tasks.pymul", args=[4], queue=pyq))
res = steps.apply_async()
print(res.get(timeout=60))
print(res.parent.get(timeout=5), res.parent.parent.get(timeout=5))
print(chord([app.signature("tasks.add", args=[i, i], queue=q) for i in range(10)], app.signature("tasks.pysum", queue=pyq))().get(timeout=60))
"#;

/// Asserts the lines [`CANVAS`] printed (the first of `lines`); returns the rest.
pub fn check_canvas<'a>(out: &str, lines: &'a [&'a str]) -> &'a [&'a str] {
    assert!(lines.len() >= 3, "{out}");
    assert_eq!(lines[..2], ["64", "16 6"], "(2*3 + 10) * 4, each step's result kept: {out}");
    assert_eq!(lines[2], "90", "a chord of ten Lua header tasks and a Python body: {out}");
    &lines[3..]
}

/// A stock Flower on `broker` (its API open, on a free port), and its address once it answers.
pub fn start_flower(broker: &str) -> (Child, Option<SocketAddr>) {
    let port = spare_port();
    let child = Command::new("python3")
        .args(["-m", "celery", "--broker", broker, "flower", "--address=127.0.0.1", &format!("--port={port}")])
        .env("FLOWER_UNAUTHENTICATED_API", "true")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("flower");
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let up = until(Duration::from_secs(30), || std::net::TcpStream::connect(addr).is_ok());
    (child, up.then_some(addr))
}

/// Waits until Flower lists `worker` alive and task `id` in `state`: whether it did, and the
/// last answers of its workers and tasks APIs.
pub fn flower_sees(addr: Option<SocketAddr>, worker: &str, id: &str, state: &str) -> (bool, String, String) {
    let Some(addr) = addr else { return (false, "Flower did not start".into(), String::new()) };
    let (mut alive, mut tasks) = (String::new(), String::new());
    let seen = until(Duration::from_secs(30), || {
        alive = get(addr, "/api/workers?status=true").text();
        tasks = get(addr, "/api/tasks").text();
        alive.contains(&format!("\"{worker}\": true")) && tasks.contains(id) && tasks.contains(state)
    });
    (seen, alive, tasks)
}

/// A Redis of the test's own, stopped when dropped (also when the test fails).
pub struct OwnRedis(Child);

impl OwnRedis {
    /// Stops it now.
    pub fn stop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A Redis of the test's own on `port` (no persistence), or None when there is no redis-server
/// or it does not answer.
pub fn own_redis(port: u16) -> Option<OwnRedis> {
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let redis = OwnRedis(child);
    let up = until(Duration::from_secs(10), || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
    up.then_some(redis)
}
