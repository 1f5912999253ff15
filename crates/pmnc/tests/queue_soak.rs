//! The soak of issue 22 #1 (ignored: it runs for 20 minutes; `SOAK_SECS` shortens it): clients
//! keep making, in each request, a durable call on the cage's own queue, one through the outbox
//! to a cage of the same process and one through the outbox to a cage of another process over
//! NATS, while a checker reads the files every second. No call may stay acknowledged and untried
//! for more than `SOAK_LAG_SECS` (default 10), and in the end every call took effect once.
//!
//!     nice -n 19 cargo test -p pmnc --test queue_soak -- --ignored --nocapture
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::nats::Nats;
use common::*;

const WEB: &str = r#"
local M = {}
function M.handle(request)
  local i = request.query.i
  pmnc("web", { queue = "own", id = "own-" .. i }).count.add(i)
  local xa = pmnc.transaction.create()
  xa.pmnc("helper", { queue = "retry", id = "near-" .. i }).count.add(i)
  xa.execute()
  pmnc("worker", { queue = "retry", id = "far-" .. i }).count.add(i)
  return "ok"
end
return M
"#;

/// Records, under a key of its own, how often call i took effect on the cage's state (keys of
/// their own: calls running at once may overwrite each other's writes of one key).
const COUNT: &str = "return { add = function(i) pmnc.state.set('n:' .. i, (pmnc.state.get('n:' .. i) or 0) + 1) end }\n";

/// Short windows so that pruning runs all along, as it would over days.
const QUEUE: &str = "dedup_window = \"1m\"\nresult_ttl = \"1m\"\n";

fn env_secs(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn db(cage: &Path) -> Option<rusqlite::Connection> {
    let c = rusqlite::Connection::open_with_flags(cage.join(".data/state.sqlite"), rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).ok()?;
    c.busy_timeout(Duration::from_secs(10)).ok()?;
    Some(c)
}

/// Milliseconds since the oldest call that waits (`sql` gives its creation time), or 0.
fn oldest_ms(c: &rusqlite::Connection, sql: &str) -> i64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0);
    c.query_row(sql, [], |r| r.get::<_, Option<i64>>(0)).ok().flatten().map(|t| (now - t).max(0)).unwrap_or(0)
}

/// (calls that took effect, of which more than once) on the cage's state.
fn state_count(cage: &Path) -> (i64, i64) {
    let Some(c) = db(cage) else { return (-1, -1) };
    // The state codec: format 1, integer tag 3, zigzag varint of 1 = 2.
    c.query_row("SELECT count(*), coalesce(sum(value != x'010302'), 0) FROM state WHERE key LIKE 'n:%'", [], |r| Ok((r.get(0)?, r.get(1)?))).unwrap_or((-1, -1))
}

#[test]
#[ignore = "a 20-minute soak; run with --ignored (SOAK_SECS shortens it)"]
fn outbox_soak_no_call_waits_untried() {
    let secs = env_secs("SOAK_SECS", 1200);
    let lag = env_secs("SOAK_LAG_SECS", 10) as i64 * 1000;
    let Some(nats) = Nats::start("outbox_soak_no_call_waits_untried", "") else {
        return;
    };
    let cluster = format!("[cluster]\nurl = \"{}\"\nheartbeat = \"200ms\"\n", nats.url());
    let t = Tree::new();
    t.write("app/cages/web/cage.toml", &format!("{}\n[queues.own]\n{QUEUE}\n{cluster}", http_cage_toml("")));
    t.write("app/cages/web/http.lua", WEB);
    t.write("app/cages/web/count.lua", COUNT);
    t.write("app/cages/helper/cage.toml", &format!("[queues.retry]\n{QUEUE}\n{cluster}"));
    t.write("app/cages/helper/count.lua", COUNT);
    t.write("far/worker/cage.toml", &format!("[queues.retry]\n{QUEUE}\n{cluster}"));
    t.write("far/worker/count.lua", COUNT);
    let (web_dir, helper_dir, worker_dir) = (t.path().join("app/cages/web"), t.path().join("app/cages/helper"), t.path().join("far/worker"));
    let _worker = Server::start(&worker_dir, &[]);
    let app = Server::start(&t.path().join("app"), &[]);
    let addr = app.addr("http");

    let stop = Arc::new(AtomicBool::new(false));
    let next = Arc::new(AtomicU64::new(0));
    let acked = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..2)
        .map(|_| {
            let (stop, next, acked) = (stop.clone(), next.clone(), acked.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let r = raw_request(addr, format!("GET /?i={i} HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n").as_bytes(), Duration::from_secs(30));
                    match r {
                        Ok(r) if r.status == 200 => {
                            acked.fetch_add(1, Ordering::SeqCst);
                        }
                        other => panic!("request {i} failed: {other:?}"),
                    }
                    // About 100 requests (300 calls) a second in all: a steady load, not a flood.
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        })
        .collect();

    // Every second: the age of the oldest call that waits untried on each path.
    let paths: [(&str, &Path, &str); 4] = [
        ("own queue", &web_dir, "SELECT min(created_ms) FROM queue_calls WHERE status = 'pending' AND due_ms <= created_ms"),
        ("outbox", &web_dir, "SELECT min(created_ms) FROM queue_outbox WHERE status = 'pending'"),
        ("same-process target", &helper_dir, "SELECT min(created_ms) FROM queue_calls WHERE status = 'pending'"),
        ("other-process target", &worker_dir, "SELECT min(created_ms) FROM queue_calls WHERE status = 'pending'"),
    ];
    let mut worst = [0i64; 4];
    let mut late = [0u64; 4];
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(Duration::from_secs(1));
        for (k, (_, dir, sql)) in paths.iter().enumerate() {
            let Some(c) = db(dir) else { continue };
            let age = oldest_ms(&c, sql);
            worst[k] = worst[k].max(age);
            if age > lag {
                late[k] += 1;
            }
        }
    }
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.join().unwrap();
    }
    let n = acked.load(Ordering::SeqCst) as i64;
    let end = Instant::now() + Duration::from_secs(120);
    let counts = || [state_count(&web_dir), state_count(&helper_dir), state_count(&worker_dir)];
    while counts() != [(n, 0), (n, 0), (n, 0)] && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("soak of {secs} s: {n} requests acknowledged, {} durable calls", 3 * n);
    for (k, (name, _, _)) in paths.iter().enumerate() {
        eprintln!("  {name:<22} longest wait untried {:>6} ms, seconds with a call waiting over {lag} ms: {}", worst[k], late[k]);
    }
    assert_eq!(counts(), [(n, 0), (n, 0), (n, 0)], "every acknowledged call took effect exactly once on each path");
    assert_eq!(late, [0; 4], "no call waited untried longer than {lag} ms");
}
