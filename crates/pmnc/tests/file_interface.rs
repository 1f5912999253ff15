//! The `file` interface (drop folders) through the real binary: a file renamed in is handled
//! and moved to done/, one written in place only once it stopped changing, failures go to
//! failed/ with their .error, temporary and unmatched names stay, name clashes never overwrite,
//! the concurrency limit holds, and a kill -9 in the middle of many files loses none and
//! handles none twice (counted in `pmnc.state`, whose writes commit with each file's outcome).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

const LUA: &str = r#"
local M = {}
local inflight = 0
function M.handle(file)
  inflight = inflight + 1
  pmnc.log.info("inflight " .. inflight .. " for " .. file.name)
  local ok, err = pcall(function()
    if file.content:find("FAIL") then
      pmnc.state.set("wrote-before-failing:" .. file.name, true)
      error("refused: " .. file.name, 0)
    end
    if file.content:find("SLOW") then pmnc.sleep(0.2) end
    if file.content:find("QUICK") then pmnc.sleep(0.01) end
    pmnc.state.set("seen:" .. file.name .. ":" .. file.size .. ":" .. pmnc.request.id, true)
  end)
  inflight = inflight - 1
  if not ok then error(err, 0) end
end
return M
"#;

fn cage(t: &Tree, concurrency: usize) -> std::path::PathBuf {
    t.write(
        "c/cage.toml",
        &format!(
            r#"
[interfaces.inbox]
protocol = "file"
path = "inbox"
pattern = "*.csv"
settle = "1s"
rescan = "1s"
concurrency = {concurrency}
max_size = "1KiB"
"#
        ),
    );
    t.write("c/inbox.lua", LUA);
    std::fs::create_dir_all(t.path().join("c/inbox")).unwrap();
    t.path().join("c")
}

/// Writes `name` into the inbox through a hidden temporary name and a rename.
fn drop_file(cage: &Path, name: &str, content: &str) {
    let tmp = cage.join("inbox").join(format!(".{name}.part"));
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, cage.join("inbox").join(name)).unwrap();
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect()).unwrap_or_default();
    v.sort();
    v
}

/// The files handled successfully per name, from the handler's state keys.
fn handled(cage: &Path) -> BTreeMap<String, Vec<String>> {
    let mut m: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for k in state_keys(cage, "seen:") {
        let mut parts = k.splitn(4, ':');
        let (_, name, size) = (parts.next(), parts.next().unwrap().to_string(), parts.next().unwrap().to_string());
        m.entry(name).or_default().push(size);
    }
    m
}

#[test]
fn files_are_handled_once_complete_and_moved_on() {
    let t = Tree::new();
    let c = cage(&t, 3);
    let mut s = Server::start_with_workers(&c, 1, &[]);
    s.wait_for("watching", Duration::from_secs(5)).expect("the folder is watched");
    let (inbox, done, failed) = (c.join("inbox"), c.join("inbox/done"), c.join("inbox/failed"));

    // Names never taken: temporary, hidden, not matching the pattern.
    std::fs::write(inbox.join("b.csv.tmp"), "x").unwrap();
    std::fs::write(inbox.join("c.csv.part"), "x").unwrap();
    std::fs::write(inbox.join(".hidden.csv"), "x").unwrap();
    std::fs::write(inbox.join("notes.txt"), "x").unwrap();
    // Nor anything but a regular file: a link (never followed out of the folder), a FIFO (whose
    // read would block).
    std::fs::write(t.path().join("secret"), "outside").unwrap();
    std::os::unix::fs::symlink(t.path().join("secret"), inbox.join("link.csv")).unwrap();
    let fifo = std::process::Command::new("mkfifo").arg(inbox.join("fifo.csv")).status().is_ok_and(|s| s.success());

    // Renamed in: handled and moved to done/.
    drop_file(&c, "a.csv", "1,2,3\n");
    assert!(until(Duration::from_secs(5), || done.join("a.csv").exists()), "{:?}", names(&inbox));
    assert_eq!(std::fs::read_to_string(done.join("a.csv")).unwrap(), "1,2,3\n");
    assert_eq!(handled(&c).get("a.csv"), Some(&vec!["6".to_string()]));

    // Written slowly in place: not taken while it grows, taken once it stayed the same for
    // `settle`, whole.
    let mut f = std::fs::File::create(inbox.join("slow.csv")).unwrap();
    let mut size = 0;
    for i in 0..8 {
        let line = format!("line {i}\n");
        f.write_all(line.as_bytes()).unwrap();
        f.flush().unwrap();
        size += line.len();
        std::thread::sleep(Duration::from_millis(250));
        assert!(!done.join("slow.csv").exists() && inbox.join("slow.csv").exists(), "taken while still being written (after line {i})");
    }
    drop(f);
    let closed = Instant::now();
    assert!(until(Duration::from_secs(5), || done.join("slow.csv").exists()), "{:?}", names(&inbox));
    assert!(closed.elapsed() >= Duration::from_millis(700), "taken {:?} after the last write, before it settled", closed.elapsed());
    assert_eq!(handled(&c).get("slow.csv"), Some(&vec![size.to_string()]), "handled once, at its full size");

    // A failure: failed/ with the error, the time and the request id beside it; the handler's
    // state writes are gone with it.
    drop_file(&c, "bad.csv", "FAIL");
    assert!(until(Duration::from_secs(5), || failed.join("bad.csv.error").exists()), "{:?}", names(&failed));
    assert_eq!(std::fs::read_to_string(failed.join("bad.csv")).unwrap(), "FAIL");
    let error = std::fs::read_to_string(failed.join("bad.csv.error")).unwrap();
    assert!(error.contains("error: refused: bad.csv"), "{error}");
    assert!(error.contains("time: 20"), "{error}");
    let id = error.lines().find_map(|l| l.strip_prefix("request: ")).unwrap().to_string();
    assert_eq!(id.len(), 12, "{error}");
    assert!(s.wait_for_all(&[&id, "refused: bad.csv"], Duration::from_secs(5)).is_some(), "the failure is logged with its request id");
    assert!(state_keys(&c, "wrote-before-failing:").is_empty(), "a failed handler's state writes do not commit");

    // Too big: not read, failed/ with the reason.
    drop_file(&c, "big.csv", &"x".repeat(2000));
    assert!(until(Duration::from_secs(5), || failed.join("big.csv.error").exists()));
    assert!(std::fs::read_to_string(failed.join("big.csv.error")).unwrap().contains("over max_size"));

    // The same name again: never over the first.
    drop_file(&c, "a.csv", "again\n");
    assert!(until(Duration::from_secs(5), || done.join("a.1.csv").exists()), "{:?}", names(&done));
    assert_eq!(std::fs::read_to_string(done.join("a.csv")).unwrap(), "1,2,3\n");
    assert_eq!(std::fs::read_to_string(done.join("a.1.csv")).unwrap(), "again\n");

    // Many at once: at most `concurrency` (3) handled together, and that many are.
    for i in 0..12 {
        drop_file(&c, &format!("many{i:02}.csv"), "SLOW");
    }
    assert!(until(Duration::from_secs(10), || (0..12).all(|i| done.join(format!("many{i:02}.csv")).exists())), "{:?}", names(&inbox));
    s.drain(Duration::from_millis(200));
    let most = s.log.iter().filter_map(|l| l.split("inflight ").nth(1)).filter_map(|r| r.split_whitespace().next()?.parse::<usize>().ok()).max().unwrap();
    assert_eq!(most, 3, "the most handlers in flight at once");

    let mut left = vec![".hidden.csv", ".processing", "b.csv.tmp", "c.csv.part", "done", "failed", "fifo.csv", "link.csv", "notes.txt"];
    left.retain(|n| fifo || *n != "fifo.csv");
    assert_eq!(names(&inbox), left);
    assert!(names(&inbox.join(".processing")).is_empty());
}

#[test]
fn a_kill_in_the_middle_loses_no_file_and_handles_none_twice() {
    let t = Tree::new();
    let c = cage(&t, 4);
    let n = 150;
    let (inbox, done) = (c.join("inbox"), c.join("inbox/done"));
    let mut s = Server::start(&c, &[]);
    s.wait_for("watching", Duration::from_secs(5)).expect("the folder is watched");
    for i in 0..n {
        drop_file(&c, &format!("f{i:03}.csv"), "QUICK");
    }
    assert!(until(Duration::from_secs(20), || names(&done).len() >= n / 3), "{}", names(&done).len());
    let _ = s.child.kill();
    let _ = s.child.wait();
    let before = names(&done).len();
    assert!(before < n, "the kill came too late to test anything: {before}");
    let left = names(&inbox.join(".processing")).len();
    eprintln!("killed with {before} of {n} done and {left} in .processing/");
    // Left by a crash as well: one whose outcome was recorded (moved on, not handled again),
    // one linked into done/ but not yet unlinked (only unlinked).
    let processing = inbox.join(".processing");
    std::fs::write(processing.join("17f-1-1.recorded.csv"), "QUICK").unwrap();
    let db = rusqlite::Connection::open(c.join(".data/state.sqlite")).unwrap();
    db.execute(
        "INSERT INTO file_outcomes (file, ok, error, request_id, at_ms) VALUES (?1, 1, '', 'r0', 0)",
        [processing.join("17f-1-1.recorded.csv").to_string_lossy()],
    )
    .unwrap();
    db.execute(
        "INSERT INTO file_outcomes (file, ok, error, request_id, at_ms) VALUES (?1, 1, '', 'r1', 0)",
        [processing.join("17f-1-2.linked.csv").to_string_lossy()],
    )
    .unwrap();
    drop(db);
    std::fs::write(done.join("linked.csv"), "QUICK").unwrap();
    std::fs::hard_link(done.join("linked.csv"), processing.join("17f-1-2.linked.csv")).unwrap();
    let mut s = Server::start(&c, &[]);
    if left > 0 {
        assert!(s.wait_for("handled before the stop", Duration::from_secs(5)).is_some(), "{left} file(s) in .processing/ are recovered");
    }
    assert!(until(Duration::from_secs(20), || names(&done).len() >= n + 2), "{} of {n} + 2", names(&done).len());
    s.drain(Duration::from_millis(300));
    let mut h = handled(&c);
    assert_eq!(h.remove("recorded.csv"), None, "a recorded outcome is not handled again");
    assert_eq!(h.remove("linked.csv"), None);
    let twice: Vec<(&String, &Vec<String>)> = h.iter().filter(|(_, v)| v.len() != 1).collect();
    assert!(twice.is_empty(), "handled more than once: {twice:?}");
    assert_eq!(h.len(), n, "every file handled");
    let mut want: Vec<String> = (0..n).map(|i| format!("f{i:03}.csv")).collect();
    want.extend(["linked.csv".to_string(), "recorded.csv".to_string()]);
    assert_eq!(names(&done), want, "each moved once, no copies");
    assert!(names(&inbox.join(".processing")).is_empty());
    assert!(names(&c.join("inbox/failed")).is_empty());
}

#[test]
fn bad_config_is_reported_with_its_key() {
    let t = Tree::new();
    t.write(
        "c/cage.toml",
        r#"
[interfaces.inbox]
protocol = "file"
path = "cage.toml"
on_success = "keep"
pattern = "in/*.csv"
rescan = "10ms"
"#,
    );
    t.write("c/inbox.lua", LUA);
    let out = pmnc(&["check", &t.path().join("c").display().to_string()]);
    let text = format!("{}{}", out.stdout, out.stderr);
    assert_ne!(out.code, Some(0), "{text}");
    for key in ["interfaces.inbox.path: ", "interfaces.inbox.on_success: ", "interfaces.inbox.pattern: ", "interfaces.inbox.rescan: "] {
        assert!(text.contains(key), "{key} in {text}");
    }
    assert!(!t.path().join("c/cage.toml/.processing").exists() && !t.path().join("c/done").exists(), "check makes no folders");
}
