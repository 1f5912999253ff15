//! The 3-node test bed of clustered queues (issue 18, bench/cluster-bed.sh, docs/cluster.md "A
//! test bed on one machine"): three nats-servers routed to each other with JetStream, and three
//! copies of the cage of examples/cluster-bed (each from a folder of its own, as on three hosts)
//! sharing a queue with `replicas = 3`. While 1,000 calls flow, one NATS server and one copy are
//! killed with kill -9. Every attempt notes its start (S) and end (E) in its copy's
//! effects/ran.log; every call must end somewhere (none lost), and a call may take effect twice
//! only if it had started on the killed copy, or on a copy whose connection went through the
//! killed server (cut from NATS until it reconnects): the window docs/queues.md names.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

/// The example's cage folder.
fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/cluster-bed/worker")
}

/// The example's cage.toml joining the servers `urls` in flock `flock`, with `queue` as the body
/// of `[queues.jobs]` when given.
fn cage_toml(urls: &[String], flock: &str, queue: Option<&str>) -> String {
    let toml = std::fs::read_to_string(example().join("cage.toml")).unwrap();
    let quoted: Vec<String> = urls.iter().map(|u| format!("\"{u}\"")).collect();
    let mut out: Vec<String> = Vec::new();
    let mut in_queue = false;
    for line in toml.lines() {
        if line.starts_with('[') {
            in_queue = line == "[queues.jobs]";
            out.push(line.to_string());
            if in_queue {
                if let Some(q) = queue {
                    out.push(q.to_string());
                }
            }
        } else if line.starts_with("url = ") {
            out.push(format!("url = [{}]", quoted.join(", ")));
        } else if line.starts_with("flock = ") {
            out.push(format!("flock = \"{flock}\""));
        } else if !(in_queue && queue.is_some()) {
            out.push(line.to_string());
        }
    }
    assert!(out.iter().any(|l| l.starts_with("url = [")), "the example's cage.toml has a url line");
    out.join("\n") + "\n"
}

/// A copy of the example's cage in `host/` with `toml` as its cage.toml.
fn lay_out(tree: &Tree, host: &str, toml: &str) -> PathBuf {
    tree.write(&format!("{host}/cage.toml"), toml);
    for file in ["http.lua", "work.lua"] {
        tree.write(&format!("{host}/{file}"), &std::fs::read_to_string(example().join(file)).unwrap());
    }
    std::fs::create_dir_all(tree.path().join(host).join("effects")).unwrap();
    tree.path().join(host)
}

/// One line of a copy's effects/ran.log.
struct Note {
    end: bool,
    id: String,
    delivery: u64,
    at: f64,
}

/// The lines of `cage`'s effects/ran.log (a line cut short by a kill is skipped).
fn notes(cage: &Path) -> Vec<Note> {
    let text = std::fs::read_to_string(cage.join("effects/ran.log")).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            match f[..] {
                [kind @ ("S" | "E"), id, delivery, at] => {
                    Some(Note { end: kind == "E", id: id.to_string(), delivery: delivery.parse().ok()?, at: at.parse().ok()? })
                }
                _ => None,
            }
        })
        .collect()
}

fn now_unix() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64()
}

const CALLS: usize = 1000;
/// The queue's concurrency in examples/cluster-bed: at most this many calls are held by a copy.
const CONCURRENCY: usize = 8;

#[test]
fn a_nats_server_and_a_copy_killed_under_load_lose_no_call_on_a_three_node_cluster() {
    let test = "a_nats_server_and_a_copy_killed_under_load_lose_no_call_on_a_three_node_cluster";
    let Some((mut servers, _stores)) = common::nats::cluster(test, 3) else { return };
    let urls: Vec<String> = servers.iter().map(|s| s.url()).collect();
    let tree = Tree::new();
    let toml = cage_toml(&urls, "bed", None);
    let hosts: Vec<PathBuf> = ["host1", "host2", "host3"].iter().map(|h| lay_out(&tree, h, &toml)).collect();
    let mut copies: Vec<Server> = hosts.iter().map(|h| Server::start(h, &[])).collect();
    let front = copies[0].addr("http");
    // Each copy's instance id, which names its NATS connections ("pmnc bed ID queue worker").
    let instances: Vec<String> = copies
        .iter_mut()
        .map(|c| {
            let line = c.wait_for("as instance ", Duration::from_secs(10)).expect("the copy joined the flock");
            line.split("as instance ").nth(1).and_then(|r| r.split_whitespace().next()).unwrap_or("").to_string()
        })
        .collect();

    // The sender: calls c1..c1000 in requests of 50 through copy 1 (never killed), each request
    // sent again from the first call that was not accepted (while a server dies, enqueues fail
    // for a moment; ids make sending again harmless).
    let started = Instant::now();
    let sent = Arc::new(AtomicUsize::new(0));
    let refused = Arc::new(AtomicUsize::new(0));
    let sender = {
        let (sent, refused) = (sent.clone(), refused.clone());
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(40);
            let mut from = 1;
            while from <= CALLS {
                let to = (from + 49).min(CALLS);
                let body = get(front, &format!("/enqueue?from={from}&to={to}&ms=20")).text();
                if body == "ok" {
                    from = to + 1;
                    sent.store(to, Ordering::SeqCst);
                    continue;
                }
                let at = body.strip_prefix("ERR at ").and_then(|r| r.split(':').next()).and_then(|n| n.parse::<usize>().ok());
                let Some(at) = at else { return Err(format!("unexpected answer to /enqueue: {body}")) };
                refused.fetch_add(1, Ordering::SeqCst);
                sent.store(at - 1, Ordering::SeqCst);
                from = at;
                if Instant::now() > deadline {
                    return Err(format!("the sender gave up at call {at}: {body}"));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Ok(())
        })
    };

    // Mid-flow, once 30% of the calls were accepted and the third copy is running some: kill -9
    // that copy and the second NATS server (whichever servers the copies are connected to).
    let busy = until(Duration::from_secs(40), || sent.load(Ordering::SeqCst) >= CALLS * 3 / 10 && notes(&hosts[2]).len() >= 10);
    if !busy {
        copies[2].drain(Duration::from_millis(200));
        panic!(
            "after {:?}: {} calls accepted, {} lines in the third copy's effects/ran.log; its log:\n{}",
            started.elapsed(),
            sent.load(Ordering::SeqCst),
            notes(&hosts[2]).len(),
            copies[2].log.join("\n")
        );
    }
    // The copies whose queue connection goes through the server about to die are cut from NATS
    // until they reconnect: docs/queues.md lets a call they were running run again too.
    let names = servers[1].monitoring("/connz?limit=1000").to_string();
    let cut: Vec<usize> = (0..2).filter(|k| names.contains(&format!("pmnc bed {} queue worker", instances[*k]))).collect();
    unsafe_kill(copies[2].child.id() as i32, 9);
    servers[1].kill();
    let killed_at = now_unix();
    let sending = sender.join().unwrap();
    let sent_in = started.elapsed();
    if let Err(e) = sending {
        copies[0].drain(Duration::from_millis(200));
        let said: Vec<&String> = copies[0].log.iter().filter(|l| l.contains("WARN") || l.contains("ERROR")).collect();
        panic!("{e} (after {sent_in:?}); the first copy said:\n{}", said.iter().map(|l| l.as_str()).collect::<Vec<_>>().join("\n"));
    }

    // Every call ends on a surviving copy.
    let ended = |hosts: &[PathBuf]| -> HashSet<String> { hosts.iter().flat_map(|h| notes(h)).filter(|n| n.end).map(|n| n.id).collect() };
    let mut lost = Vec::new();
    let drained = until(Duration::from_secs(40), || {
        let done = ended(&hosts);
        lost = (1..=CALLS).map(|i| format!("c{i}")).filter(|id| !done.contains(id)).collect();
        lost.is_empty()
    });
    let drain = now_unix() - killed_at;
    assert!(drained, "{} calls never ran after the kill: {:?}", lost.len(), &lost[..lost.len().min(20)]);

    // Calls run twice: only ones that had started on the killed copy, or on a copy the dead
    // server cut from NATS for a moment; at most as many as those copies held.
    let all: Vec<(usize, Note)> = hosts.iter().enumerate().flat_map(|(k, h)| notes(h).into_iter().map(move |n| (k, n))).collect();
    let mut ends: HashMap<&str, usize> = HashMap::new();
    for (_, n) in all.iter().filter(|(_, n)| n.end) {
        *ends.entry(n.id.as_str()).or_default() += 1;
    }
    let twice: Vec<&str> = ends.iter().filter(|(_, c)| **c > 1).map(|(id, _)| *id).collect();
    let on_killed: HashSet<&str> = all.iter().filter(|(k, _)| *k == 2).map(|(_, n)| n.id.as_str()).collect();
    assert!(!on_killed.is_empty(), "the killed copy ran no call before it died: the test killed it too early");
    let held_when_cut: HashSet<&str> = all.iter().filter(|(k, n)| cut.contains(k) && n.at <= killed_at).map(|(_, n)| n.id.as_str()).collect();
    let stray: Vec<&&str> = twice.iter().filter(|id| !on_killed.contains(*id) && !held_when_cut.contains(*id)).collect();
    if !stray.is_empty() {
        let mut said = Vec::new();
        for c in copies.iter_mut().take(2) {
            c.drain(Duration::from_millis(200));
            said.extend(c.log.iter().filter(|l| l.contains("WARN") || l.contains("ERROR")).cloned());
        }
        panic!(
            "calls that took effect twice without having started on the killed copy or on a copy cut from NATS ({cut:?}): {stray:?}; the other copies said:\n{}",
            said.join("\n")
        );
    }
    let bound = CONCURRENCY * (1 + cut.len());
    assert!(twice.len() <= bound, "{} calls took effect twice, more than the copies in the window could hold ({bound}): {twice:?}", twice.len());

    // Calls the killed copy had started and not ended: each ran again on another copy.
    let mut last_on_killed: HashMap<&str, &Note> = HashMap::new();
    for (_, n) in all.iter().filter(|(k, _)| *k == 2) {
        last_on_killed.insert(n.id.as_str(), n);
    }
    let orphans: Vec<&str> = last_on_killed.iter().filter(|(_, n)| !n.end).map(|(id, _)| *id).collect();
    let mut reruns = Vec::new();
    for id in &orphans {
        let again = all
            .iter()
            .filter(|(k, n)| *k != 2 && n.id == *id && !n.end && n.delivery > last_on_killed[id].delivery)
            .map(|(_, n)| n.at)
            .fold(f64::MAX, f64::min);
        assert!(again < f64::MAX, "call {id}, running on the killed copy, never started again elsewhere");
        reruns.push(again - killed_at);
    }
    reruns.sort_by(|a, b| a.total_cmp(b));
    let redelivered = all.iter().filter(|(_, n)| !n.end && n.delivery > 1).count();
    println!(
        "queue bed: calls={CALLS} lost=0 copies_cut_from_nats={cut:?} ran_twice={} started_again={redelivered} running_on_killed_copy={} reran_after_kill={:?} s drained_after_kill={drain:.1}s sent_in={:.1}s enqueue_retries={}",
        twice.len(),
        orphans.len(),
        reruns.iter().map(|r| (r * 10.0).round() / 10.0).collect::<Vec<_>>(),
        sent_in.as_secs_f64(),
        refused.load(Ordering::SeqCst)
    );
}

/// `s` from the environment variable `name`, else `default`.
fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Durable calls per second of one process (2 workers) whose queue `jobs` has `queue` as its
/// settings: `n` calls of work.tally enqueued by 8 client threads in requests of 100, counted
/// done from the state they write. (seconds, calls/s).
fn throughput(urls: &[String], flock: &str, queue: &str, n: usize) -> (f64, f64) {
    let tree = Tree::new();
    let dir = lay_out(&tree, "host1", &cage_toml(urls, flock, Some(queue)));
    let s = Server::start_with_workers(&dir, 2, &[]);
    let addr = s.addr("http");
    let started = Instant::now();
    let senders = 8;
    let per = n.div_ceil(senders);
    let threads: Vec<_> = (0..senders)
        .map(|k| {
            std::thread::spawn(move || {
                let (a, b) = (k * per + 1, ((k + 1) * per).min(n));
                let mut from = a;
                while from <= b {
                    let to = (from + 99).min(b);
                    assert_eq!(get(addr, &format!("/enqueue?fn=tally&from={from}&to={to}")).text(), "ok");
                    from = to + 1;
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let mut missing = String::new();
    let all = until(Duration::from_secs(300), || {
        missing = get(addr, &format!("/missing?n={n}")).text();
        missing == "0"
    });
    if !all {
        let mut s = s;
        s.drain(Duration::from_millis(200));
        let said: Vec<String> = s.log.iter().filter(|l| l.contains("WARN") || l.contains("ERROR")).take(40).cloned().collect();
        panic!("{missing} of {n} calls never ran within 300 s on a queue with {queue:?}; the process said:\n{}", said.join("\n"));
    }
    let secs = started.elapsed().as_secs_f64();
    (secs, n as f64 / secs)
}

/// bench/queue-cluster.sh: durable calls/s end to end (enqueue, run, state commit) on the
/// embedded store, and on the clustered store with replicas 1 and replicas 3 on the 3-node
/// cluster, in the same run (`PMNC_QUEUE_BENCH_CALLS` per store).
#[test]
#[ignore]
fn bench_durable_calls_per_second_replicas_1_and_3_against_embedded() {
    let Some((servers, _stores)) = common::nats::cluster("bench_durable_calls_per_second_replicas_1_and_3_against_embedded", 3) else { return };
    let urls: Vec<String> = servers.iter().map(|s| s.url()).collect();
    let n = env_or("PMNC_QUEUE_BENCH_CALLS", 5000);
    let (es, er) = throughput(&urls, "bench_e", "concurrency = 64", n);
    let (r1s, r1) = throughput(&urls, "bench_r1", "store = \"cluster\"\nreplicas = 1\nconcurrency = 64", n);
    let (r3s, r3) = throughput(&urls, "bench_r3", "store = \"cluster\"\nreplicas = 3\nconcurrency = 64", n);
    println!(
        "queue bed bench: calls={n} embedded: {es:.2}s {er:.0} calls/s; cluster replicas=1: {r1s:.2}s {r1:.0} calls/s ({:.2}); replicas=3: {r3s:.2}s {r3:.0} calls/s ({:.2}) on 3 servers",
        r1 / er,
        r3 / er
    );
}
