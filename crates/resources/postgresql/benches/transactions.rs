//! PostgreSQL through Lua transactions, measured against a real server: (1) latency of a
//! transaction of two participants against the same two statements one after another, and (2)
//! pooled `select 1` calls/s from Lua against raw tokio-postgres on the same kind of runtime.
//!
//! Run with `cargo bench -p rustomnic-resource-postgresql --bench transactions` (or
//! `bench/postgresql.sh`). It prints figures and never judges them: it exits 0 whatever the
//! timings, also when the server is not reachable (after saying so loudly), and non-zero only
//! when it cannot measure (a wrong answer, a failed call). The server is the one of
//! PMNC_TEST_POSTGRES_URL (default postgresql://postgres@127.0.0.1:5432/test), like the tests.
//!
//! Everything runs on one current-thread tokio runtime with a LocalSet, as a worker thread of the
//! runtime does: the Lua side installs this thread's pools (`rustomnic_resource::install`) and
//! runs module functions in a `CageVm`; the raw side drives tokio-postgres clients directly.
//!
//! Knobs (environment): PG_BENCH_ITERATIONS (latency iterations per variant, default 500),
//! PG_BENCH_SLEEP_MS (pg_sleep of each latency statement, default 5), PG_BENCH_CONNECTIONS (the
//! larger pool/connection count of part 2, default 4), PG_BENCH_SECONDS (length of one timed run
//! of part 2, default 1), PG_BENCH_ROUNDS (rounds of part 2, default 3).

use std::cell::Cell;
use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::process::exit;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use rustomnic_core::Value;
use rustomnic_lua::{compile, worker, CageVm, CompiledModule, RequestCtx};
use rustomnic_resource::testing::configure;
use rustomnic_resource::{error_chain, CageResources};
use rustomnic_resource_postgresql::Postgresql;
use tokio_postgres::{Client, NoTls, Statement};

const CAGE: &str = "bench";

/// Shortcut calls each Lua request of part 2 makes before it returns (the Rust side starts
/// requests until the run's time is over).
const BATCH: i64 = 20;

/// Timed runs of part 2 are preceded by a warm-up of this length (connections get opened,
/// statements and caches warm).
const WARMUP: Duration = Duration::from_millis(300);

/// Latency iterations run before the measured ones, per variant.
const LATENCY_WARMUP: usize = 20;

/// Deadline of every Lua request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

const SELECT_1: &str = "select 1 as one";

fn module_source(sleep_ms: u64) -> String {
    format!(
        r#"
local M = {{}}
local SLEEP = "select pg_sleep({sleep}) as s, $1::int as n"

-- One statement: a transaction of one participant.
function M.one(a)
  local r = pmnc.transaction.db.execute(SLEEP, a)
  return r.rows[1].n
end

-- Two participants of one transaction: run in parallel, each on its own connection.
function M.tx(a, b)
  local xa = pmnc.transaction.create()
  xa.db.execute(SLEEP, a)
  xa.db.execute(SLEEP, b)
  local r1, r2 = xa.execute()
  return r1.rows[1].n, r2.rows[1].n
end

-- The same two statements one after another (two transactions of one participant).
function M.seq(a, b)
  local r1 = pmnc.transaction.db.execute(SLEEP, a)
  local r2 = pmnc.transaction.db.execute(SLEEP, b)
  return r1.rows[1].n, r2.rows[1].n
end

-- n shortcut calls of `select 1`; returns the sum of what they returned (n when all is well).
function M.ones(n)
  local sum = 0
  for _ = 1, n do
    local r = pmnc.transaction.db.execute("{select_1}")
    sum = sum + r.rows[1].one
  end
  return sum
end

return M
"#,
        sleep = sleep_ms as f64 / 1000.0,
        select_1 = SELECT_1,
    )
}

struct Settings {
    url: String,
    iterations: usize,
    sleep_ms: u64,
    connections: usize,
    run: Duration,
    rounds: usize,
}

fn env_number(name: &str, default: f64, min: f64, max: f64) -> f64 {
    match std::env::var(name) {
        Err(_) => default,
        Ok(text) => match text.trim().parse::<f64>() {
            Ok(v) if (min..=max).contains(&v) => v,
            _ => {
                println!("{name}={text} is not a number in {min}..={max}; using {default}");
                default
            }
        },
    }
}

impl Settings {
    fn from_env() -> Settings {
        Settings {
            url: std::env::var("PMNC_TEST_POSTGRES_URL").unwrap_or_else(|_| "postgresql://postgres@127.0.0.1:5432/test".to_string()),
            iterations: env_number("PG_BENCH_ITERATIONS", 500.0, 10.0, 100_000.0) as usize,
            sleep_ms: env_number("PG_BENCH_SLEEP_MS", 5.0, 0.0, 1000.0) as u64,
            connections: env_number("PG_BENCH_CONNECTIONS", 4.0, 1.0, 64.0) as usize,
            run: Duration::from_secs_f64(env_number("PG_BENCH_SECONDS", 1.0, 0.1, 60.0)),
            rounds: env_number("PG_BENCH_ROUNDS", 3.0, 1.0, 100.0) as usize,
        }
    }
}

/// Runs `f` on a fresh current-thread runtime inside a LocalSet: the layout of a worker thread.
fn on_worker<F: Future>(f: impl FnOnce() -> F) -> F::Output {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => cannot_measure(format!("cannot build a tokio runtime: {e}")),
    };
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, f())
}

fn cannot_measure(why: impl AsRef<str>) -> ! {
    println!("CANNOT MEASURE: {}", why.as_ref());
    exit(1)
}

/// On-CPU time of this thread in nanoseconds (Linux schedstat), which is where the
/// current-thread runtime runs everything: Lua, the pools and the tokio-postgres connections.
fn thread_cpu_ns() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    text.split_whitespace().next()?.parse().ok()
}

/// Context switches of this thread so far (voluntary + involuntary): a voluntary one is the
/// runtime parking in epoll with nothing to do, i.e. waiting for the server.
fn thread_switches() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/thread-self/status").ok()?;
    let mut total = None;
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("voluntary_ctxt_switches:").or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:")) {
            total = Some(total.unwrap_or(0) + v.trim().parse::<u64>().ok()?);
        }
    }
    total
}

/// Where the server is, without the password.
fn describe(config: &tokio_postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        #[allow(unreachable_patterns)]
        Some(other) => format!("{other:?}"),
        None => "?".to_string(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!("{}@{host}:{port}/{}", config.get_user().unwrap_or("?"), config.get_dbname().unwrap_or("?"))
}

/// Connects and runs `select 1`; the server's version on success.
async fn probe(config: &tokio_postgres::Config) -> Result<String, String> {
    let connected = tokio::time::timeout(Duration::from_secs(3), config.connect(NoTls)).await;
    let (client, connection) = match connected {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return Err(error_chain(&e)),
        Err(_) => return Err("no answer within 3 s".to_string()),
    };
    tokio::task::spawn_local(async move {
        let _ = connection.await;
    });
    let row = client.query_one("select version()", &[]).await.map_err(|e| error_chain(&e))?;
    Ok(row.get::<_, String>(0))
}

fn toml_string(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// This thread's pools of resource `db` (pool_size `pool`) and a VM of cage "bench" with the
/// module `m`. Must run inside the LocalSet (the pools start their maintenance task there).
struct LuaSide {
    vm: Rc<CageVm>,
    _pools: Rc<CageResources>,
}

impl LuaSide {
    fn new(s: &Settings, pool: usize) -> LuaSide {
        let db = match configure(&Postgresql, "db", &format!("url = {}\npool_size = {pool}\n", toml_string(&s.url))) {
            Ok(c) => c,
            Err(e) => cannot_measure(format!("the resource config was refused: {}", e.join("; "))),
        };
        let stats = BTreeMap::from([((CAGE.to_string(), "db".to_string()), Arc::default())]);
        let pools = rustomnic_resource::install(&[(CAGE.to_string(), vec![db])], 1, &stats);
        let vm = CageVm::new(CAGE).unwrap_or_else(|e| cannot_measure(e));
        let display = format!("{CAGE}/m.lua");
        let source = module_source(s.sleep_ms);
        let bytecode = compile("m", Path::new(&display), &display, source.as_bytes()).unwrap_or_else(|e| cannot_measure(e.to_string()));
        let module = CompiledModule { name: "m".into(), path: display.clone().into(), display, bytecode, functions: vec![], version: 1, source_hash: 0 };
        vm.install(&module).unwrap_or_else(|e| cannot_measure(e));
        LuaSide { vm: Rc::new(vm), _pools: pools }
    }

    async fn call(&self, function: &str, args: Vec<Value>) -> Vec<Value> {
        let ctx = RequestCtx::new(CAGE, "bench", REQUEST_TIMEOUT);
        match self.vm.call(ctx, "m", function, args).await {
            Ok(values) => values,
            Err(e) => cannot_measure(format!("m.{function} failed: {e}")),
        }
    }
}

impl Drop for LuaSide {
    fn drop(&mut self) {
        // The thread-local transaction resources hold the pools; let them go with this side.
        worker::clear();
    }
}

// ---------------------------------------------------------------------------------------------
// Part 1: two participants in one transaction against two statements in sequence.

struct Stats {
    p50: f64,
    p99: f64,
    mean: f64,
    min: f64,
    max: f64,
}

/// Milliseconds.
fn stats(samples: &mut [f64]) -> Stats {
    samples.sort_by(|a, b| a.total_cmp(b));
    let n = samples.len();
    let at = |q: f64| samples[((n as f64 * q).ceil() as usize).clamp(1, n) - 1];
    Stats { p50: at(0.50), p99: at(0.99), mean: samples.iter().sum::<f64>() / n as f64, min: samples[0], max: samples[n - 1] }
}

fn latency(s: &Settings) {
    println!();
    println!("== 1. latency: a transaction of two participants vs the same two statements in sequence");
    println!(
        "   statement: select pg_sleep({}) as s, $1::int as n   (each participant: BEGIN, prepare, execute, COMMIT on its own pooled connection)",
        s.sleep_ms as f64 / 1000.0
    );
    println!("   pool_size = 2, one Lua request at a time, {} iterations per variant after {LATENCY_WARMUP} of warm-up, variants interleaved", s.iterations);
    let (one, tx, seq, cpu) = on_worker(|| async {
        let lua = LuaSide::new(s, 2);
        let (mut one, mut tx, mut seq) = (Vec::new(), Vec::new(), Vec::new());
        let mut cpu = [0u64; 3];
        for i in 0..LATENCY_WARMUP + s.iterations {
            let a = (i % 1000) as i64;
            let b = a + 1000;
            let measured = i >= LATENCY_WARMUP;
            for (v, (function, args, want)) in [
                ("one", vec![Value::Int(a)], vec![Value::Int(a)]),
                ("tx", vec![Value::Int(a), Value::Int(b)], vec![Value::Int(a), Value::Int(b)]),
                ("seq", vec![Value::Int(a), Value::Int(b)], vec![Value::Int(a), Value::Int(b)]),
            ]
            .into_iter()
            .enumerate()
            {
                let cpu0 = thread_cpu_ns();
                let t = Instant::now();
                let got = lua.call(function, args).await;
                let ms = t.elapsed().as_secs_f64() * 1000.0;
                if got != want {
                    cannot_measure(format!("m.{function} returned {got:?}, expected {want:?}"));
                }
                if measured {
                    [&mut one, &mut tx, &mut seq][v].push(ms);
                    if let (Some(c0), Some(c1)) = (cpu0, thread_cpu_ns()) {
                        cpu[v] += c1.saturating_sub(c0);
                    }
                }
            }
        }
        (one, tx, seq, cpu)
    });
    let n = s.iterations as f64;
    let rows = [("one statement (1 shortcut call)", one, cpu[0]), ("transaction of 2 participants", tx, cpu[1]), ("2 shortcut calls in sequence", seq, cpu[2])];
    println!();
    println!("   {:<34} {:>9} {:>9} {:>9} {:>9} {:>9} {:>14}", "variant", "p50 ms", "p99 ms", "mean ms", "min ms", "max ms", "CPU µs/request");
    let mut computed = Vec::new();
    for (name, mut samples, cpu_ns) in rows {
        let st = stats(&mut samples);
        let cpu_text = if cpu_ns > 0 { format!("{:.0}", cpu_ns as f64 / n / 1000.0) } else { "?".to_string() };
        println!("   {name:<34} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {cpu_text:>14}", st.p50, st.p99, st.mean, st.min, st.max);
        computed.push(st);
    }
    let (one, tx, seq) = (&computed[0], &computed[1], &computed[2]);
    println!();
    println!("   transaction p50 / one-statement p50 = {:.2}   (≈1 when the two participants run in parallel, ≈2 in sequence)", tx.p50 / one.p50);
    println!("   sequence    p50 / one-statement p50 = {:.2}", seq.p50 / one.p50);
    println!("   transaction p50 / sequence p50      = {:.2}   (p99: {:.2})", tx.p50 / seq.p50, tx.p99 / seq.p99);
    println!("   (CPU µs/request is this thread's on-CPU time: Lua, pools and the client side of tokio-postgres; the server's backends are not in it)");
}

// ---------------------------------------------------------------------------------------------
// Part 2: pooled `select 1` calls/s, Lua against raw tokio-postgres.

#[derive(Clone, Copy, PartialEq)]
enum Variant {
    /// `pmnc.transaction.db.execute("select 1")` in Lua, BATCH per request.
    Lua,
    /// What one shortcut call does on the wire: BEGIN, prepare, execute, COMMIT.
    RawSame,
    /// `client.query("select 1")`: prepare and execute, no transaction.
    RawQuery,
    /// A statement prepared once per connection, then only executed.
    RawPrepared,
}

const VARIANTS: [Variant; 4] = [Variant::Lua, Variant::RawSame, Variant::RawQuery, Variant::RawPrepared];

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::Lua => "Lua shortcut calls",
            Variant::RawSame => "raw: BEGIN, prepare, execute, COMMIT",
            Variant::RawQuery => "raw: query (prepare, execute)",
            Variant::RawPrepared => "raw: execute of a prepared statement",
        }
    }
}

struct RawConn {
    client: Client,
    prepared: Statement,
}

async fn raw_connect(url: &str) -> RawConn {
    let (client, connection) = match tokio_postgres::connect(url, NoTls).await {
        Ok(c) => c,
        Err(e) => cannot_measure(format!("raw connect: {}", error_chain(&e))),
    };
    tokio::task::spawn_local(async move {
        let _ = connection.await;
    });
    let prepared = client.prepare(SELECT_1).await.unwrap_or_else(|e| cannot_measure(format!("raw prepare: {}", error_chain(&e))));
    RawConn { client, prepared }
}

fn one_of(rows: &[tokio_postgres::Row]) -> i64 {
    match rows.first().map(|r| r.try_get::<_, i32>(0)) {
        Some(Ok(v)) => v as i64,
        other => cannot_measure(format!("raw select 1 returned {other:?}")),
    }
}

async fn raw_call(conn: &RawConn, variant: Variant) -> i64 {
    let c = &conn.client;
    let fail = |e: tokio_postgres::Error| -> ! { cannot_measure(format!("raw call: {}", error_chain(&e))) };
    match variant {
        Variant::RawSame => {
            c.batch_execute("BEGIN").await.unwrap_or_else(|e| fail(e));
            let stmt = c.prepare(SELECT_1).await.unwrap_or_else(|e| fail(e));
            let rows = c.query(&stmt, &[]).await.unwrap_or_else(|e| fail(e));
            c.batch_execute("COMMIT").await.unwrap_or_else(|e| fail(e));
            one_of(&rows)
        }
        Variant::RawQuery => one_of(&c.query(SELECT_1, &[]).await.unwrap_or_else(|e| fail(e))),
        Variant::RawPrepared => one_of(&c.query(&conn.prepared, &[]).await.unwrap_or_else(|e| fail(e))),
        Variant::Lua => unreachable!("not a raw variant"),
    }
}

/// What one timed run of part 2 measured.
struct Run {
    calls: u64,
    elapsed: Duration,
    /// This thread's CPU time, ns.
    cpu: Option<u64>,
    /// This thread's context switches.
    switches: Option<u64>,
}

/// Calls made, wall time, this thread's CPU time and context switches of `concurrency` tasks
/// calling until `length` has passed (each task finishes the call, or Lua batch, it is in).
async fn timed_run(variant: Variant, lua: &Rc<LuaSide>, raw: &Rc<Vec<RawConn>>, concurrency: usize, length: Duration) -> Run {
    let calls = Rc::new(Cell::new(0u64));
    let switches0 = thread_switches();
    let cpu0 = thread_cpu_ns();
    let start = Instant::now();
    let end = start + length;
    let tasks = (0..concurrency).map(|i| {
        let (calls, lua, raw) = (calls.clone(), lua.clone(), raw.clone());
        tokio::task::spawn_local(async move {
            while Instant::now() < end {
                if variant == Variant::Lua {
                    let got = lua.call("ones", vec![Value::Int(BATCH)]).await;
                    if got != [Value::Int(BATCH)] {
                        cannot_measure(format!("m.ones({BATCH}) returned {got:?}"));
                    }
                    calls.set(calls.get() + BATCH as u64);
                } else {
                    let got = raw_call(&raw[i % raw.len()], variant).await;
                    if got != 1 {
                        cannot_measure(format!("raw select 1 returned {got}"));
                    }
                    calls.set(calls.get() + 1);
                }
            }
        })
    });
    for r in join_all(tasks.collect::<Vec<_>>()).await {
        if let Err(e) = r {
            cannot_measure(format!("a load task ended abnormally: {e}"));
        }
    }
    let elapsed = start.elapsed();
    let cpu = cpu0.zip(thread_cpu_ns()).map(|(a, b)| b.saturating_sub(a));
    let switches = switches0.zip(thread_switches()).map(|(a, b)| b.saturating_sub(a));
    Run { calls: calls.get(), elapsed, cpu, switches }
}

fn throughput(s: &Settings, connections: usize) {
    let concurrency = connections;
    println!();
    println!(
        "== 2. select 1 calls/s: {connections} connection{} (Lua: pool_size = {connections}), {concurrency} concurrent task{}; {} rounds of {:.1} s per variant, variants interleaved",
        if connections == 1 { "" } else { "s" },
        if concurrency == 1 { "" } else { "s" },
        s.rounds,
        s.run.as_secs_f64()
    );
    println!("   Lua: each task runs requests of m.ones({BATCH}) (a loop of {BATCH} pmnc.transaction.db.execute(\"{SELECT_1}\")) until the run is over");
    println!("   raw: each task has its own tokio-postgres client and calls in a loop");
    let totals = on_worker(|| async {
        let lua = Rc::new(LuaSide::new(s, connections));
        let mut raw = Vec::new();
        for _ in 0..connections {
            raw.push(raw_connect(&s.url).await);
        }
        let raw = Rc::new(raw);
        for v in VARIANTS {
            timed_run(v, &lua, &raw, concurrency, WARMUP).await;
        }
        // Per variant: the sum of its rounds, and each round's calls/s.
        let mut totals: Vec<(Run, Vec<f64>)> =
            VARIANTS.iter().map(|_| (Run { calls: 0, elapsed: Duration::ZERO, cpu: Some(0), switches: Some(0) }, Vec::new())).collect();
        for _ in 0..s.rounds {
            for (k, v) in VARIANTS.into_iter().enumerate() {
                let run = timed_run(v, &lua, &raw, concurrency, s.run).await;
                let (t, rounds) = &mut totals[k];
                t.calls += run.calls;
                t.elapsed += run.elapsed;
                t.cpu = t.cpu.zip(run.cpu).map(|(a, b)| a + b);
                t.switches = t.switches.zip(run.switches).map(|(a, b)| a + b);
                rounds.push(run.calls as f64 / run.elapsed.as_secs_f64());
            }
        }
        totals
    });
    println!();
    println!("   {:<38} {:>10} {:>22} {:>12} {:>13} {:>10}", "variant", "calls/s", "rounds (calls/s)", "CPU µs/call", "switches/call", "calls");
    let mut rates = Vec::new();
    for (v, (t, rounds)) in VARIANTS.iter().zip(&totals) {
        let rate = t.calls as f64 / t.elapsed.as_secs_f64();
        let per_call = |x: Option<u64>, scale: f64| x.map(|x| format!("{:.1}", x as f64 / t.calls as f64 / scale)).unwrap_or_else(|| "?".to_string());
        let rounds_text = rounds.iter().map(|r| format!("{r:.0}")).collect::<Vec<_>>().join(" ");
        println!("   {:<38} {rate:>10.0} {rounds_text:>22} {:>12} {:>13} {:>10}", v.name(), per_call(t.cpu, 1000.0), per_call(t.switches, 1.0), t.calls);
        rates.push(rate);
    }
    println!();
    println!("   Lua / raw (same statements: BEGIN, prepare, execute, COMMIT) = {:.3}", rates[0] / rates[1]);
    println!("   Lua / raw query (prepare, execute; no transaction)           = {:.3}", rates[0] / rates[2]);
    println!("   Lua / raw prepared statement (execute only)                  = {:.3}", rates[0] / rates[3]);
    println!(
        "   (CPU µs/call and switches/call are of this thread, kernel time included: Lua, the pool, tokio-postgres and the loopback TCP; not the server's)"
    );
}

fn main() {
    let s = Settings::from_env();
    let started = Instant::now();
    let config: tokio_postgres::Config =
        s.url.parse().unwrap_or_else(|e| cannot_measure(format!("PMNC_TEST_POSTGRES_URL (or its default) is not a PostgreSQL URL: {e}")));
    let version = match on_worker(|| probe(&config)) {
        Ok(v) => v,
        Err(why) => {
            // The loud part on stderr (seen even when the figures go to a file), one line on stdout.
            eprintln!(
                "\n!!!!!!!!\n!!! PostgreSQL is not reachable at {} (PMNC_TEST_POSTGRES_URL or its default): {why}\n!!! The PostgreSQL benchmarks are SKIPPED: nothing was measured. Start the server with:\n!!!   pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start\n!!!!!!!!\n",
                describe(&config)
            );
            println!("SKIPPED: PostgreSQL not reachable ({why}); start it with: pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start");
            exit(0);
        }
    };
    println!("PostgreSQL benchmarks (figures only: nothing here passes or fails on timing)");
    println!("server: {} — {}", describe(&config), version.split(',').next().unwrap_or(&version));
    let cores = std::thread::available_parallelism().map(|n| n.get().to_string()).unwrap_or_else(|_| "?".to_string());
    let load = std::fs::read_to_string("/proc/loadavg").map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" ")).unwrap_or_else(|_| "?".to_string());
    println!("machine: {cores} cores, load average {load} (the server runs on the same machine, over loopback)");

    latency(&s);
    let mut counts = vec![1];
    if s.connections > 1 {
        counts.push(s.connections);
    }
    for n in counts {
        throughput(&s, n);
    }
    let load = std::fs::read_to_string("/proc/loadavg").map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" ")).unwrap_or_else(|_| "?".to_string());
    println!();
    println!("done in {:.1} s; load average now {load}", started.elapsed().as_secs_f64());
}
