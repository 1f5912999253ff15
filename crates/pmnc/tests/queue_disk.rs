//! Durable calls when the disk under the state file fails (issue 12 #5, issue 22): a full disk
//! must not make the queue re-run calls at once or flood the log, and a file system that turns
//! read-only refuses new calls clearly and loses none. The cage lives on a small tmpfs of its
//! own, which needs root (mount); without it each test is skipped with a loud message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
#[path = "queue_app/support.rs"]
mod support;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use support::*;

/// A tmpfs mounted on a temporary folder; unmounted when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(test: &str, size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().expect("temp dir");
        let ok = Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(dir.path()).status().is_ok_and(|s| s.success());
        if !ok {
            eprintln!(
                "\n*** SKIPPED {test}: cannot mount a tmpfs (needs root: mount -t tmpfs -o size={size} tmpfs DIR); run the tests as root to cover full and read-only disks ***\n"
            );
            return None;
        }
        Some(Tmpfs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn remount(&self, mode: &str) {
        let ok = Command::new("mount").args(["-o", &format!("remount,{mode}")]).arg(self.path()).status().is_ok_and(|s| s.success());
        assert!(ok, "mount -o remount,{mode} {}", self.path().display());
    }

    /// Writes a file until the file system is full; returns its path.
    fn fill(&self) -> PathBuf {
        let p = self.path().join("filler");
        let mut f = std::fs::File::create(&p).expect("create the filler");
        let chunk = vec![0u8; 64 * 1024];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
        p
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}

const HTTP: &str = r#"
local M = {}
function M.handle(request)
  local q = request.query
  if request.path == "/enqueue" then
    local ok, r = pcall(function() return pmnc("worker", { queue = "retry", id = q.id, delay = tonumber(q.delay) }).work[q.fn](q.id) end)
    return ok and r or ("ERR " .. tostring(r))
  elseif request.path == "/result" then
    local r = pmnc.calls.result(q.id)
    if r == nil then return "none" end
    return ("%s %s %s"):format(r.status, tostring(r.attempts), tostring(r.error))
  elseif request.path == "/state" then
    return tostring(pmnc.state.get(q.key))
  end
end
return M
"#;

/// ok(id) counts its runs in the log and its effects on the state; fail(id) always raises.
const WORK: &str = r#"
local M = {}
function M.ok(id)
  pmnc.log.info("RAN ok " .. id)
  pmnc.state.set("ran:" .. id, (pmnc.state.get("ran:" .. id) or 0) + 1)
  return id
end
function M.fail(id)
  pmnc.log.info("RAN fail " .. id)
  error("fails " .. id)
end
return M
"#;

fn cage(root: &Path) -> PathBuf {
    let dir = root.join("worker");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("cage.toml"),
        http_cage_toml("\n[queues.retry]\nexpires_in = \"1h\"\n[queues.retry.backoff]\ninitial = \"1s\"\nmax = \"1m\"\njitter = 0\n"),
    )
    .unwrap();
    std::fs::write(dir.join("http.lua"), HTTP).unwrap();
    std::fs::write(dir.join("work.lua"), WORK).unwrap();
    dir
}

fn runs(log: &[String], what: &str) -> usize {
    log.iter().filter(|l| l.contains(what)).count()
}

/// Issue 12 #5: with the disk full, a call whose completion cannot be recorded is tried again
/// only after its backoff (not at once, thousands of times), the log stays small, and once
/// there is room again the call completes with its state writes applied exactly once.
#[test]
fn a_full_disk_does_not_rerun_calls_at_once_or_flood_the_log() {
    let Some(fs) = Tmpfs::mount("a_full_disk_does_not_rerun_calls_at_once_or_flood_the_log", "20m") else {
        return;
    };
    let dir = cage(fs.path());
    let mut s = Server::start(&dir, &[]);
    let addr = s.addr("http");
    assert_eq!(get(addr, "/enqueue?fn=ok&id=good&delay=2").text(), "good");
    assert_eq!(get(addr, "/enqueue?fn=fail&id=bad&delay=2").text(), "bad");
    let filler = fs.fill();
    let before = s.log.len();
    // Watch the calls fall due and fail to record their ends for a while: at 1 s, then 2, 4 and
    // 8 s, each call may run at most 4 times in this window (once more for a slow start).
    s.drain(Duration::from_secs(12));
    let window = &s.log[before..];
    let (good, bad) = (runs(window, "RAN ok good"), runs(window, "RAN fail bad"));
    eprintln!("12 s of full disk: the succeeding call ran {good} times, the failing one {bad}, {} log lines", window.len());
    assert!(good >= 1 && bad >= 1, "the calls ran at all: good {good}, bad {bad}");
    assert!(good <= 5, "the succeeding call ran {good} times in 12 s of full disk");
    assert!(bad <= 5, "the failing call ran {bad} times in 12 s of full disk");
    assert!(window.len() <= 80, "{} log lines in 12 s of full disk:\n{}", window.len(), window.join("\n"));
    std::fs::remove_file(filler).unwrap();
    get_prefix(addr, "/result?id=good", "done", Duration::from_secs(40));
    assert_eq!(get(addr, "/state?key=ran:good").text(), "1", "its state write took effect once");
    let bad = get(addr, "/result?id=bad").text();
    assert!(bad.starts_with("failed ") && bad.contains("fails bad"), "{bad}");
    let refused = get(addr, "/enqueue?fn=ok&id=after").text();
    assert_eq!(refused, "after", "new calls are accepted again");
}

/// A state file on a read-only file system (a remount after an error, a read-only volume):
/// the start fails naming the file, `pmnc queue ls` still reads it, and nothing stored is lost
/// once it is writable again. (Linux refuses to remount a file system read-only while a process
/// has files open on it for writing, and root ignores file modes, so a running cage cannot be
/// shown a read-only file; a write that fails while running is the full disk case above.)
#[test]
fn a_read_only_state_file_stops_the_start_clearly_and_loses_nothing() {
    let Some(fs) = Tmpfs::mount("a_read_only_state_file_stops_the_start_clearly_and_loses_nothing", "20m") else {
        return;
    };
    let dir = cage(fs.path());
    let mut s = Server::start(&dir, &[]);
    assert_eq!(get(s.addr("http"), "/enqueue?fn=ok&id=r1&delay=3600").text(), "r1");
    assert_eq!(s.terminate(Duration::from_secs(20)), Some(0));
    drop(s);
    fs.remount("ro");
    let start = pmnc_limited(&["run", dir.to_str().unwrap()], Duration::from_secs(30));
    assert_eq!(start.code, Some(1), "{}", start.stderr);
    assert!(start.stderr.contains("state.sqlite") && start.stderr.contains("read-only"), "{}", start.stderr);
    let ls = pmnc_limited(&["queue", "ls", dir.to_str().unwrap()], Duration::from_secs(30));
    assert_eq!(ls.code, Some(0), "{}", ls.stderr);
    assert!(ls.stdout.contains("queue retry: 1 waiting") && ls.stdout.contains("r1"), "{}", ls.stdout);
    fs.remount("rw");
    let s = Server::start(&dir, &[]);
    assert!(get(s.addr("http"), "/result?id=r1").text().starts_with("pending 0 "), "the call is still there");
}
