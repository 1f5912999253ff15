//! The schedule interface through the real binary: two copies of a cage on the same folder run
//! each firing once, and bad schedule config is refused with file, line and key.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;

const JOBS: &str = r#"
return {
  -- One key per firing and process: the first six hex digits of a request id are the process's.
  tick = function(firing)
    pmnc.state.set(("f:%.3f:%s"):format(firing.scheduled_at, pmnc.request.id:sub(1, 6)), pmnc.request.interface)
  end,
}
"#;

#[test]
fn two_copies_of_a_cage_run_each_firing_once() {
    let t = Tree::new();
    t.write(
        "jobs/cage.toml",
        "[interfaces.every_second]\nprotocol = \"schedule\"\ncron = \"* * * * * *\"\ntimezone = \"Europe/Berlin\"\nhandler = \"jobs.tick\"\n",
    );
    t.write("jobs/jobs.lua", JOBS);
    let cage = t.path().join("jobs");
    let a = Server::start(&cage, &[]);
    let b = Server::start(&cage, &[]);
    let db = rusqlite::Connection::open(cage.join(".data/state.sqlite")).unwrap();
    db.busy_timeout(Duration::from_secs(10)).unwrap();
    let keys = || -> Vec<String> {
        // The file and its tables appear once a copy has opened it.
        let Ok(mut s) = db.prepare("SELECT key FROM state WHERE key LIKE 'f:%' ORDER BY key") else { return Vec::new() };
        s.query_map([], |r| r.get(0)).unwrap().map(|k| k.unwrap()).collect()
    };
    let end = Instant::now() + Duration::from_secs(15);
    while keys().len() < 4 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(50));
    }
    drop((a, b));
    let keys = keys();
    assert!(keys.len() >= 4, "firings seen: {keys:?}");
    let mut per_firing: BTreeMap<String, usize> = BTreeMap::new();
    for k in &keys {
        let firing = k.rsplit_once(':').unwrap().0.to_string();
        *per_firing.entry(firing).or_default() += 1;
    }
    for (firing, n) in &per_firing {
        assert_eq!(*n, 1, "firing {firing} ran {n} times: {keys:?}");
    }
    let times: Vec<f64> = per_firing.keys().map(|f| f[2..].parse().unwrap()).collect();
    for w in times.windows(2) {
        assert!((w[1] - w[0] - 1.0).abs() < 0.001, "firings one second apart: {times:?}");
    }
}

#[test]
fn bad_schedules_are_refused_with_file_line_and_key() {
    let t = Tree::new();
    t.write("jobs/cage.toml", "[interfaces.a]\nprotocol = \"schedule\"\ncron = \"61 * * * * *\"\nhandler = \"jobs.tick\"\n\n[interfaces.b]\nprotocol = \"schedule\"\ncron = \"* * * * *\"\ntimezone = \"Mars/Olympus\"\nmissed = \"later\"\nhandler = \"jobs.tick\"\n");
    t.write("jobs/jobs.lua", JOBS);
    let out = pmnc_limited(&["check", t.path().join("jobs").to_str().unwrap()], Duration::from_secs(30));
    assert_eq!(out.code, Some(1), "{}", out.stdout);
    let text = format!("{}{}", out.stdout, out.stderr);
    assert!(text.contains("cage.toml:3: interfaces.a.cron: \"61 * * * * *\" is not a cron expression"), "{text}");
    assert!(text.contains("cage.toml:9: interfaces.b.timezone: \"Mars/Olympus\" is not a time zone name"), "{text}");
    assert!(text.contains("cage.toml:10: interfaces.b.missed: \"later\" is not \"skip\" or \"catch_up\""), "{text}");
}

#[test]
fn catch_up_runs_the_firings_missed_while_no_copy_ran() {
    let t = Tree::new();
    t.write("jobs/cage.toml", "[interfaces.every_second]\nprotocol = \"schedule\"\ncron = \"* * * * * *\"\nhandler = \"jobs.tick\"\nmissed = \"catch_up\"\n");
    t.write("jobs/jobs.lua", JOBS);
    let cage = t.path().join("jobs");
    std::fs::create_dir_all(cage.join(".data")).unwrap();
    let db = rusqlite::Connection::open(cage.join(".data/state.sqlite")).unwrap();
    db.busy_timeout(Duration::from_secs(10)).unwrap();
    let firings = || -> Vec<f64> {
        let Ok(mut s) = db.prepare("SELECT key FROM state WHERE key LIKE 'f:%' ORDER BY key") else { return Vec::new() };
        s.query_map([], |r| r.get::<_, String>(0)).unwrap().map(|k| k.unwrap().split(':').nth(1).unwrap().parse().unwrap()).collect()
    };
    let wait_for = |n: usize| {
        let end = Instant::now() + Duration::from_secs(15);
        while firings().len() < n && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(50));
        }
        firings()
    };
    {
        let mut s = Server::start(&cage, &[]);
        wait_for(2);
        assert_eq!(s.terminate(Duration::from_secs(10)), Some(0));
    }
    let before = firings();
    // At least two firings pass with no copy running.
    let last = *before.last().unwrap();
    while (std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64()) < last + 3.5 {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _s = Server::start(&cage, &[]);
    let after = wait_for(before.len() + 4);
    for w in after.windows(2) {
        assert!((w[1] - w[0] - 1.0).abs() < 0.001, "every second fired once, the missed ones at start: {after:?}");
    }
    assert!(after.len() >= before.len() + 4, "{after:?}");
}

#[test]
fn a_schedule_keeps_its_claims_in_the_cages_configured_state_file() {
    let t = Tree::new();
    t.write(
        "jobs/cage.toml",
        "[interfaces.every_second]\nprotocol = \"schedule\"\ncron = \"* * * * * *\"\nhandler = \"jobs.tick\"\n\n[resources.state]\npath = \"db/custom.sqlite\"\n",
    );
    t.write("jobs/jobs.lua", JOBS);
    let cage = t.path().join("jobs");
    let s = Server::start(&cage, &[]);
    let db = rusqlite::Connection::open(cage.join("db/custom.sqlite")).unwrap();
    db.busy_timeout(Duration::from_secs(10)).unwrap();
    let count = |sql: &str| -> i64 { db.query_row(sql, [], |r| r.get(0)).unwrap_or(0) };
    let end = Instant::now() + Duration::from_secs(15);
    while count("SELECT count(*) FROM state WHERE key LIKE 'f:%'") < 2 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(s);
    assert!(count("SELECT count(*) FROM state WHERE key LIKE 'f:%'") >= 2, "the firings wrote to the configured file");
    assert!(count("SELECT count(*) FROM queue_leases") >= 1, "the schedule's claims are in the configured file too");
    assert!(!cage.join(".data/state.sqlite").exists(), "nothing was written to the default state file");
}
