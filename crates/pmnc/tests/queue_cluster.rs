//! Durable calls between cages of two processes over a private nats-server (issue 22): outbox
//! calls made together with local ones all run, permanent refusals fail at once or die at once,
//! calls keep their queue's expiry and their sender, the outbox is visible to `pmnc queue`,
//! results and waits tell the truth from the sending process, and a worker killed mid-call
//! loses nothing.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
#[path = "queue_app/support.rs"]
mod support;

use std::path::PathBuf;
use std::time::Duration;

use common::nats::Nats;
use common::*;
use support::*;

const WEB: &str = include_str!("queue_app/web.lua");
const WORK: &str = include_str!("queue_app/work.lua");
const MINE: &str = include_str!("queue_app/mine.lua");

fn cluster_table(url: &str) -> String {
    format!("[cluster]\nurl = \"{url}\"\nheartbeat = \"200ms\"\n")
}

/// A web cage (HTTP, queue `own`) and a worker cage (queue `retry` with `worker_queue` in its
/// table), each in its own folder, both joining `url`.
fn lay_out(t: &Tree, url: &str, worker_queue: &str) -> (PathBuf, PathBuf) {
    t.write("web/cage.toml", &format!("{}\n[queues.own]\n\n{}", http_cage_toml(""), cluster_table(url)));
    t.write("web/http.lua", WEB);
    t.write("web/mine.lua", MINE);
    t.write("worker/cage.toml", &format!("{}\n[queues.retry]\n{worker_queue}\n", cluster_table(url)));
    t.write("worker/work.lua", WORK);
    (t.path().join("web"), t.path().join("worker"))
}

/// Issue 22 #1 across processes: a durable call on the sender's own queue together with one to
/// a cage of another process, many times over; every one of them runs, soon.
#[test]
fn outbox_calls_to_another_process_made_together_with_local_ones_all_run() {
    let Some(nats) = Nats::start("outbox_calls_to_another_process_made_together_with_local_ones_all_run", "") else {
        return;
    };
    let t = Tree::new();
    let (web_dir, worker_dir) = lay_out(&t, &nats.url(), "");
    let _worker = Server::start(&worker_dir, &[]);
    let web = Server::start(&web_dir, &[]);
    let addr = web.addr("http");
    for i in 0..30 {
        assert_eq!(get(addr, &format!("/pair?i={i}")).text(), format!("own-{i} out-{i}"));
    }
    let (w, s) = (db(&worker_dir), db(&web_dir));
    let all = until(Duration::from_secs(20), || {
        count(&w, "SELECT count(*) FROM queue_calls WHERE status = 'done'") == 30 && count(&s, "SELECT count(*) FROM queue_calls WHERE status = 'done'") == 30
    });
    assert!(
        all,
        "worker done {}, web done {}, outbox not forwarded {}",
        count(&w, "SELECT count(*) FROM queue_calls WHERE status = 'done'"),
        count(&s, "SELECT count(*) FROM queue_calls WHERE status = 'done'"),
        count(&s, "SELECT count(*) FROM queue_outbox WHERE status = 'pending'")
    );
}

/// Issue 22 #4: a queue the target cage does not have is a permanent refusal. Once the sender
/// knows the target, the plain and the xa call fail at once (the transaction rolls back); a call
/// sent while the target was unknown dies at its first forward instead of retrying for a day.
#[test]
fn a_queue_the_other_process_lacks_fails_at_once_or_dies_at_its_first_forward() {
    let Some(nats) = Nats::start("a_queue_the_other_process_lacks_fails_at_once_or_dies_at_its_first_forward", "") else {
        return;
    };
    let t = Tree::new();
    let (web_dir, worker_dir) = lay_out(&t, &nats.url(), "");
    let web = Server::start(&web_dir, &[]);
    let addr = web.addr("http");
    assert_eq!(get(addr, "/plain?queue=nope&id=n1").text(), "n1", "the target is unknown yet: the call waits in the outbox");
    let _worker = Server::start(&worker_dir, &[]);
    let dead = get_prefix(addr, "/result?id=n1", "dead", Duration::from_secs(15));
    assert!(dead.contains("cage worker has no queue \"nope\" (its queues: retry"), "{dead}");
    assert_eq!(count(&db(&web_dir), "SELECT count(*) FROM queue_outbox WHERE id = 'n1' AND status = 'dead'"), 1, "given up at its refusal");
    let plain = get_prefix(addr, "/plain?queue=nope&id=n2", "ERR", Duration::from_secs(15));
    assert!(plain.contains("calling worker.work.count: cage worker has no queue \"nope\" (its queues: retry"), "{plain}");
    let xa = get(addr, "/xa?queue=nope&id=n3").text();
    assert!(xa.starts_with("ERR ") && xa.contains("cage worker has no queue \"nope\""), "{xa}");
    assert_eq!(get(addr, "/state?key=sent:n3").text(), "nil", "the transaction rolled back");
    assert_eq!(get(addr, "/result?id=n2").text(), "none");
    assert_eq!(get(addr, "/result?id=n3").text(), "none");
}

/// A web process and a worker process on a private NATS, the worker's queue with
/// `worker_queue`; the worker starts after `before_worker` ran against web. (NATS, tree, web,
/// worker, web's address, worker's folder)
struct Pair {
    _nats: Nats,
    _tree: Tree,
    _web: Server,
    _worker: Server,
    addr: std::net::SocketAddr,
    worker_dir: PathBuf,
}

fn pair(test: &str, worker_queue: &str, before_worker: impl FnOnce(std::net::SocketAddr)) -> Option<Pair> {
    let nats = Nats::start(test, "")?;
    let t = Tree::new();
    let (web_dir, worker_dir) = lay_out(&t, &nats.url(), worker_queue);
    let web = Server::start(&web_dir, &[]);
    let addr = web.addr("http");
    before_worker(addr);
    let worker = Server::start(&worker_dir, &[]);
    Some(Pair { _nats: nats, _tree: t, _web: web, _worker: worker, addr, worker_dir })
}

/// Issue 22 #5 and #7 across processes: a call to a cage of another process gets that queue's
/// expiry (also when sent before the target was known, and through xa.pmnc), not a day, and
/// names its true sender.
#[test]
fn a_call_to_another_process_keeps_its_queues_expiry_and_its_sender() {
    let Some(p) = pair("a_call_to_another_process_keeps_its_queues_expiry_and_its_sender", "expires_in = \"2m\"", |addr| {
        assert_eq!(get(addr, "/plain?id=early").text(), "early", "sent before the worker is known");
    }) else {
        return;
    };
    assert_eq!(get(p.addr, "/plain?id=c1").text(), "c1");
    assert_eq!(get(p.addr, "/xa?id=c2").text(), "ok c2");
    let w = db(&p.worker_dir);
    assert!(until(Duration::from_secs(15), || count(&w, "SELECT count(*) FROM queue_calls WHERE status = 'done'") == 3));
    for id in ["early", "c1", "c2"] {
        assert_eq!(
            count(&w, &format!("SELECT expires_ms - max(due_ms, created_ms) FROM queue_calls WHERE id = '{id}'")),
            120_000,
            "call {id}: the queue's expires_in"
        );
        let from: String = w.query_row("SELECT from_cage FROM queue_calls WHERE id = ?1", [id], |r| r.get(0)).unwrap();
        assert_eq!(from, "web", "call {id} names its sender");
        assert_eq!(count(&w, &format!("SELECT due_ms >= created_ms FROM queue_calls WHERE id = '{id}'")), 1, "call {id} is not due before it was made");
    }
    let show = pmnc_limited(&["queue", "show", p.worker_dir.to_str().unwrap(), "c1"], Duration::from_secs(30));
    assert!(show.stdout.contains("from cage: web") && show.stdout.contains("status:    done"), "{}", show.stdout);
}

/// Issue 22 #8: from the sending process a call that went to another process never reads as
/// "never stored": `forwarded` once accepted, `done` once its completion event came back, and
/// asking a cage this process does not run about an unknown id is an error, not nil.
#[test]
fn the_sending_process_tells_the_truth_about_a_forwarded_call() {
    let Some(p) = pair("the_sending_process_tells_the_truth_about_a_forwarded_call", "", |_| {}) else {
        return;
    };
    let addr = p.addr;
    assert_eq!(get(addr, "/plain?id=later&delay=3600").text(), "later");
    assert_eq!(get_prefix(addr, "/result?id=later", "forwarded", Duration::from_secs(15)), "forwarded nil nil worker nil");
    assert_eq!(get(addr, "/result?id=later&cage=worker").text(), "forwarded nil nil worker nil");
    assert_eq!(get(addr, "/plain?id=c1").text(), "c1");
    assert_eq!(get_prefix(addr, "/result?id=c1", "done", Duration::from_secs(15)), "done 42 1 worker nil");
    let elsewhere = get(addr, "/result?id=sent-by-someone-else&cage=worker").text();
    assert!(elsewhere.starts_with("ERR ") && elsewhere.contains("cage worker does not run in this process"), "{elsewhere}");
    assert_eq!(get(addr, "/result?id=sent-by-someone-else").text(), "none");
}

/// Issue 22 #10 across processes: the sending process waits for a call that runs in another one
/// (pmnc.calls.wait, and the completion event on "call:<id>"), and an event published by web to
/// a topic of cage worker reaches a call waiting there.
#[test]
fn a_call_in_another_process_can_be_waited_for_and_sent_events() {
    let Some(p) = pair("a_call_in_another_process_can_be_waited_for_and_sent_events", "", |_| {}) else {
        return;
    };
    let addr = p.addr;
    assert_eq!(get(addr, "/submit_wait?id=c3").text(), "done 42 1 worker nil", "waited for across processes");
    assert_eq!(get(addr, "/submit_event?id=c4").text(), "done 42 1 worker nil", "the completion event reaches the sender");
    assert_eq!(get(addr, "/wait?id=c3&timeout=10").text(), "done 42 1 worker nil", "a wait after the end returns at once");
    // Published until the call has taken it: it waits only once it runs.
    assert_eq!(get(addr, "/plain?id=e1&fn=await&arg=go").text(), "e1");
    let w = db(&p.worker_dir);
    let taken = until(Duration::from_secs(15), || {
        get(addr, "/publish?topic=go&value=hello&cage=worker");
        count(&w, "SELECT count(*) FROM queue_calls WHERE id = 'e1' AND status = 'done'") == 1
    });
    assert!(taken, "the event never reached the worker's call");
    assert_eq!(get(addr, "/wait?id=e1&timeout=10").text(), "done hello 1 worker nil");
}

/// Issue 22 #6: calls waiting in the outbox (their target's process is not running) can be
/// listed, shown, retried and purged with `pmnc queue`, dead ones included.
#[test]
fn the_outbox_is_visible_to_pmnc_queue() {
    let Some(nats) = Nats::start("the_outbox_is_visible_to_pmnc_queue", "") else {
        return;
    };
    let t = Tree::new();
    let (web_dir, _worker_dir) = lay_out(&t, &nats.url(), "");
    let web = Server::start(&web_dir, &[]);
    let addr = web.addr("http");
    assert_eq!(get(addr, "/plain?id=o1").text(), "o1");
    assert_eq!(get(addr, "/plain?id=o2&expires_in=1").text(), "o2");
    let s = db(&web_dir);
    assert!(until(Duration::from_secs(15), || count(&s, "SELECT count(*) FROM queue_outbox WHERE id = 'o2' AND status = 'dead'") == 1));
    let dir = web_dir.to_str().unwrap();
    let ls = pmnc_limited(&["queue", "ls", dir], Duration::from_secs(30));
    assert_eq!(ls.code, Some(0), "{}", ls.stderr);
    // By the id as a word: the header's temporary path can hold "o1" too.
    let line = |id: &str| {
        ls.stdout.lines().find(|l| l.split_whitespace().any(|w| w == id)).unwrap_or_else(|| panic!("no line for {id} in:\n{}", ls.stdout)).to_string()
    };
    assert!(line("o1").contains("outbox") && line("o1").contains("worker.work.count") && line("o1").contains("pending"), "{}", ls.stdout);
    assert!(line("o2").contains("outbox") && line("o2").contains("dead"), "{}", ls.stdout);
    let show = pmnc_limited(&["queue", "show", dir, "o1"], Duration::from_secs(30));
    assert_eq!(show.code, Some(0), "{}", show.stderr);
    for want in [
        "id:        o1",
        "call:      worker.work.count",
        "queue:     retry",
        "status:    pending in the outbox of cage web",
        "from cage: web",
        "arguments: [21]",
        "no cage named worker runs",
    ] {
        assert!(show.stdout.contains(want), "{want:?} missing from:\n{}", show.stdout);
    }
    let purge = pmnc_limited(&["queue", "purge", dir, "--dead"], Duration::from_secs(30));
    assert_eq!(purge.code, Some(0), "{}", purge.stderr);
    assert!(purge.stdout.contains("deleted 1 dead letters"), "{}", purge.stdout);
    assert_eq!(count(&s, "SELECT count(*) FROM queue_outbox WHERE id = 'o2'"), 0);
    let retry = pmnc_limited(&["queue", "retry", dir, "o1"], Duration::from_secs(30));
    assert_eq!(retry.code, Some(0), "{}", retry.stderr);
    let purge = pmnc_limited(&["queue", "purge", dir], Duration::from_secs(30));
    assert!(purge.stdout.contains("deleted 1 calls"), "{}", purge.stdout);
    assert_eq!(count(&s, "SELECT count(*) FROM queue_outbox"), 0);
}

/// A target that disappears mid-call: the worker's process is killed (kill -9) while the web
/// cage forwards and the worker runs calls; after its restart every call took effect once.
#[test]
fn a_worker_killed_in_the_middle_of_forwarded_calls_loses_none() {
    const N: usize = 60;
    let Some(nats) = Nats::start("a_worker_killed_in_the_middle_of_forwarded_calls_loses_none", "") else {
        return;
    };
    let t = Tree::new();
    let (web_dir, worker_dir) = lay_out(&t, &nats.url(), "concurrency = 4\n[queues.retry.backoff]\ninitial = \"100ms\"\nmax = \"500ms\"\n");
    let mut worker = Server::start(&worker_dir, &[]);
    let web = Server::start(&web_dir, &[]);
    let addr = web.addr("http");
    for i in 1..=N {
        assert_eq!(get(addr, &format!("/plain?id=k{i}&fn=nap&n={i}")).text(), format!("k{i}"));
    }
    let w = db(&worker_dir);
    assert!(until(Duration::from_secs(20), || count(&w, "SELECT count(*) FROM queue_calls WHERE status = 'done'") >= 4));
    worker.signal(9);
    worker.wait_exit(Duration::from_secs(10));
    let _worker = Server::start(&worker_dir, &[]);
    assert!(
        until(Duration::from_secs(60), || count(&w, "SELECT count(*) FROM queue_calls WHERE status = 'done'") == N as i64),
        "{} of {N} done",
        count(&w, "SELECT count(*) FROM queue_calls WHERE status = 'done'")
    );
    let mut stmt = w.prepare("SELECT value FROM state WHERE key = ?1").unwrap();
    for i in 1..=N {
        let v: Vec<u8> = stmt.query_row([format!("n:{i}")], |r| r.get(0)).unwrap_or_else(|e| panic!("call {i} took no effect: {e}"));
        assert_eq!(v, vec![1, 3, 2], "call {i} took effect once");
    }
}

/// Issue 22 #4 (a call too large): a durable call to a cage of another process that could never
/// be carried (over the NATS server's max_payload) fails at once, in the plain and the xa path
/// (the transaction rolls back), instead of waiting in the outbox until it expires.
#[test]
fn a_call_too_large_for_the_cluster_fails_at_once() {
    let Some(nats) = Nats::start("a_call_too_large_for_the_cluster_fails_at_once", "max_payload: 65536\n") else {
        return;
    };
    let t = Tree::new();
    let (web_dir, _) = lay_out(&t, &nats.url(), "");
    let web = Server::start(&web_dir, &[]);
    let addr = web.addr("http");
    for path in ["/big?kb=100&id=b1", "/big?kb=100&xa=1&id=b2"] {
        let text = get(addr, path).text();
        assert!(text.starts_with("ERR ") && text.contains("over the NATS server's max_payload of 65536 bytes"), "{path}: {text}");
    }
    assert_eq!(get(addr, "/state?key=sent:b2").text(), "nil", "the transaction rolled back");
    assert_eq!(get(addr, "/big?kb=10&id=b3").text(), "b3", "a call that fits waits in the outbox");
    assert_eq!(count(&db(&web_dir), "SELECT count(*) FROM queue_outbox"), 1);
}
