//! The state resource through Lua transactions: values survive new pools (a restart), rollback
//! stores nothing, parallel participants both commit, limits and bad files fail clearly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::time::{Duration, Instant};

use rustomnic_core::Value;
use rustomnic_lua::RunError;
use rustomnic_resource::testing::{configure, run_lua};
use rustomnic_resource::ResourceConfig;
use rustomnic_resource_state::{encode, StateProtocol, APPLICATION_ID, FORMAT, SCHEMA_VERSION};

fn state_at(path: &Path, extra: &str) -> ResourceConfig {
    configure(&StateProtocol, "state", &format!("path = {:?}\n{extra}", path.display().to_string())).unwrap()
}

/// Runs `body` as the function `f` of a module, with the state resource at `path`.
fn run(path: &Path, body: &str) -> Result<Vec<Value>, RunError> {
    run_with(state_at(path, ""), body)
}

fn run_with(state: ResourceConfig, body: &str) -> Result<Vec<Value>, RunError> {
    run_lua(vec![state], &format!("return {{ f = function() {body} end }}"), "f", vec![], Duration::from_secs(20))
}

/// The message of the error raised by `body`, which must fail.
fn failure(path: &Path, body: &str) -> String {
    let r = run(path, &format!("local ok, e = pcall(function() {body} end) assert(not ok, 'no error') return tostring(e)")).unwrap();
    r[0].as_str().unwrap().to_string()
}

#[test]
fn values_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(".data/state.sqlite");
    run(
        &path,
        r#"local xa = pmnc.transaction.create()
           xa.state.set("user:1", { name = "Ann", tags = { "a", "b" }, n = 3, f = 1.5, ok = true })
           xa.state.set("bytes", "\0\255\n")
           xa.state.set("int", -42)
           xa.execute()"#,
    )
    .unwrap();
    assert!(path.exists(), "the state file and its folder are created");
    // A second run builds new pools and opens the file again.
    let r = run(&path, r#"local s = pmnc.transaction.state return s.get("user:1"), s.get("bytes"), s.get("int"), s.get("nobody")"#).unwrap();
    let user = &r[0];
    assert_eq!(user.get("name"), Some(&Value::str("Ann")));
    assert_eq!(user.get("tags"), Some(&Value::Array(vec![Value::str("a"), Value::str("b")])));
    assert_eq!(user.get("n"), Some(&Value::Int(3)));
    assert_eq!(user.get("f"), Some(&Value::Float(1.5)));
    assert_eq!(user.get("ok"), Some(&Value::Bool(true)));
    assert_eq!(r[1], Value::Str(vec![0, 255, b'\n']));
    assert_eq!(r[2], Value::Int(-42));
    assert_eq!(r[3], Value::Nil);
}

#[test]
fn delete_keys_and_set_nil() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.sqlite");
    run(
        &path,
        r#"local xa = pmnc.transaction.create()
           for _, k in ipairs({ "b:2", "a:1", "b:1", "c" }) do xa.state.set(k, k) end
           xa.execute()
           pmnc.transaction.state.set("b", "b")"#,
    )
    .unwrap();
    let r = run(
        &path,
        r#"local s = pmnc.transaction.state
           local all, b, none = s.keys(), s.keys("b:"), s.keys("zzz")
           local d1, d2 = s.delete("c"), s.delete("c")
           s.set("a:1", nil)
           return all, b, none, d1, d2, s.keys()"#,
    )
    .unwrap();
    let strs = |v: &[&str]| Value::Array(v.iter().map(|s| Value::str(*s)).collect());
    assert_eq!(r[0], strs(&["a:1", "b", "b:1", "b:2", "c"]));
    assert_eq!(r[1], strs(&["b:1", "b:2"]));
    assert_eq!(r[2], Value::Array(vec![]));
    assert_eq!((&r[3], &r[4]), (&Value::Bool(true), &Value::Bool(false)));
    assert_eq!(r[5], strs(&["b", "b:1", "b:2"]));
}

#[test]
fn a_failing_participant_rolls_the_set_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.sqlite");
    let long = "k".repeat(1025);
    let message = failure(&path, &format!(r#"local xa = pmnc.transaction.create() xa.state.set("kept?", 1) xa.state.set("{long}", 2) xa.execute()"#));
    assert_eq!(message, "resource state (participant 2): set: the key is 1025 bytes, over the limit of 1 KiB");
    let r = run(&path, r#"return pmnc.transaction.state.get("kept?"), pmnc.transaction.state.keys()"#).unwrap();
    assert_eq!(r, vec![Value::Nil, Value::Array(vec![])]);
}

#[test]
fn two_participants_on_state_both_commit_without_waiting() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.sqlite");
    let started = Instant::now();
    let r = run(
        &path,
        r#"local xa = pmnc.transaction.create()
           xa.state.set("a", 1) xa.state.set("b", 2) xa.state.get("a")
           xa.execute()
           local s = pmnc.transaction.state
           return s.get("a"), s.get("b")"#,
    )
    .unwrap();
    assert_eq!(r, vec![Value::Int(1), Value::Int(2)]);
    // Three connections in one transaction: none may wait for another's lock (busy timeout 5 s).
    assert!(started.elapsed() < Duration::from_secs(3), "took {:?}", started.elapsed());
}

#[test]
fn big_values_are_kept_and_oversized_ones_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.sqlite");
    let r = run(
        &path,
        r#"local big = string.rep("0123456789abcdef", 15 * 65536)
           pmnc.transaction.state.set("big", big)
           local back = pmnc.transaction.state.get("big")
           return #back, back == big"#,
    )
    .unwrap();
    assert_eq!(r, vec![Value::Int(15 << 20), Value::Bool(true)]);
    let message = failure(&path, r#"pmnc.transaction.state.set("huge", string.rep("x", 16 * 1024 * 1024))"#);
    assert_eq!(message, "resource state (participant 1): set: key \"huge\": the value is over the limit of 16 MiB encoded");
}

#[test]
fn bad_keys_and_values_fail_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.sqlite");
    let s = "pmnc.transaction.state";
    let cases = [
        (format!("{s}.set(12, 1)"), "set: the key must be a string, got integer"),
        (format!("{s}.get('')"), "get: the key must not be empty"),
        (format!("{s}.get('\\255')"), "get: the key must be UTF-8 text"),
        (format!("{s}.set('a')"), "set(key, value) needs a value; set(key, nil) or delete(key) removes a key"),
        (format!("{s}.get('a', 'b')"), "get: expected get(key), got 2 arguments"),
        (format!("{s}.keys(5)"), "keys: the prefix must be a string, got integer"),
        (format!("{s}.frob()"), "no method frob (methods: get, set, delete, keys)"),
    ];
    for (body, expected) in cases {
        assert_eq!(failure(&path, &body), format!("resource state (participant 1): {expected}"), "{body}");
    }
    // A function never reaches the resource: the Lua conversion refuses it and names the spot.
    let message = failure(&path, &format!("{s}.set('f', {{ cb = print }})"));
    assert!(message.contains("set: argument 2: value.cb: a function cannot be converted"), "{message}");
}

#[test]
fn an_unwritable_location_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    // Root may write anywhere, so a plain file stands where a folder is needed.
    std::fs::write(dir.path().join("blocker"), "not a folder").unwrap();
    let path = dir.path().join("blocker/sub/state.sqlite");
    let message = failure(&path, "pmnc.transaction.state.get('a')");
    let folder = dir.path().join("blocker/sub");
    assert!(
        message.starts_with(&format!("resource state (participant 1): cannot connect: cannot create the folder {} for the state file:", folder.display())),
        "{message}"
    );
    // A folder where the file should be.
    let message = failure(dir.path(), "pmnc.transaction.state.get('a')");
    assert_eq!(message, format!("resource state (participant 1): cannot connect: the state file {} is a folder", dir.path().display()));
}

#[test]
fn a_corrupt_file_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.sqlite");
    std::fs::write(&path, vec![b'#'; 8192]).unwrap();
    let message = failure(&path, "pmnc.transaction.state.get('a')");
    assert!(message.contains(&format!("cannot open: {} is damaged or not an SQLite database", path.display())), "{message}");
}

#[test]
fn another_database_and_a_newer_schema_are_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let foreign = dir.path().join("other.sqlite");
    rusqlite::Connection::open(&foreign).unwrap().execute_batch("CREATE TABLE accounts (id INTEGER);").unwrap();
    let message = failure(&foreign, "pmnc.transaction.state.get('a')");
    assert!(message.contains(&format!("{} is an SQLite database with other tables, not a Rustomnic state file", foreign.display())), "{message}");

    let newer = dir.path().join("newer.sqlite");
    run(&newer, "pmnc.transaction.state.set('a', 1)").unwrap();
    rusqlite::Connection::open(&newer).unwrap().pragma_update(None, "user_version", 99).unwrap();
    let message = failure(&newer, "pmnc.transaction.state.get('a')");
    assert!(
        message.contains(&format!("the state file {} has schema version 99, newer than this build knows ({SCHEMA_VERSION})", newer.display())),
        "{message}"
    );
}

#[test]
fn the_file_is_wal_with_a_versioned_schema_and_format_byte() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.sqlite");
    run(&path, "pmnc.transaction.state.set('k', 'v')").unwrap();
    let db = rusqlite::Connection::open(&path).unwrap();
    let mode: String = db.query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
    let version: i64 = db.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
    let app: i32 = db.query_row("PRAGMA application_id", [], |r| r.get(0)).unwrap();
    let blob: Vec<u8> = db.query_row("SELECT value FROM state WHERE key = 'k'", [], |r| r.get(0)).unwrap();
    assert_eq!((mode.as_str(), version, app), ("wal", SCHEMA_VERSION as i64, APPLICATION_ID));
    assert_eq!(blob, vec![FORMAT, 5, 1, b'v']);
}

#[test]
fn keys_beyond_the_limit_fail_instead_of_flooding() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.sqlite");
    run(&path, "pmnc.transaction.state.set('x', 0)").unwrap();
    // Written straight into the file, as an older run would have left it.
    let mut db = rusqlite::Connection::open(&path).unwrap();
    let tx = db.transaction().unwrap();
    let value = encode(&Value::Int(1), 100).unwrap();
    for i in 0..10_001 {
        tx.execute("INSERT INTO state (key, value, updated_ms) VALUES (?1, ?2, 0)", rusqlite::params![format!("k:{i:05}"), value]).unwrap();
    }
    tx.commit().unwrap();
    drop(db);
    let message = failure(&path, "pmnc.transaction.state.keys('k:')");
    assert_eq!(message, "resource state (participant 1): keys: more than 10000 keys start with \"k:\"; ask with a longer prefix");
    let r = run(&path, "return #pmnc.transaction.state.keys('k:0'), pmnc.transaction.state.get('k:00007')").unwrap();
    assert_eq!(r, vec![Value::Int(10_000), Value::Int(1)]);
}

#[test]
fn a_writer_waits_for_a_busy_file_within_the_busy_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.sqlite");
    run(&path, "pmnc.transaction.state.set('a', 0)").unwrap();
    let hold = |ms: u64| {
        let path = path.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            let db = rusqlite::Connection::open(&path).unwrap();
            db.execute_batch("BEGIN IMMEDIATE").unwrap();
            tx.send(()).unwrap();
            std::thread::sleep(Duration::from_millis(ms));
            db.execute_batch("COMMIT").unwrap();
        });
        rx.recv().unwrap();
        t
    };
    // Held for 300 ms: a busy timeout of 5 s waits it out.
    let t = hold(300);
    run(&path, "pmnc.transaction.state.set('a', 1)").unwrap();
    t.join().unwrap();
    // Held for 2 s: a busy timeout of 200 ms gives up with a clear message.
    let t = hold(2000);
    let message =
        run_with(state_at(&path, "busy_timeout = \"200ms\"\n"), "local ok, e = pcall(pmnc.transaction.state.set, 'a', 2) return tostring(e), e.code").unwrap();
    t.join().unwrap();
    let text = message[0].as_str().unwrap();
    assert!(
        text.starts_with(&format!(
            "resource state (participant 1): commit failed: commit: the state file {} stayed locked by another writer past the busy timeout",
            path.display()
        )),
        "{text}"
    );
    assert_eq!(message[1], Value::str("SQLITE_BUSY"));
    let r = run(&path, "return pmnc.transaction.state.get('a')").unwrap();
    assert_eq!(r, vec![Value::Int(1)]);
}

#[test]
fn config_needs_a_path_and_knows_its_keys() {
    let errors = configure(&StateProtocol, "state", "").unwrap_err();
    assert_eq!(errors, vec!["cage.toml:1: resources.state: path is required (the state file, such as \"/srv/cage/.data/state.sqlite\")".to_string()]);
    let errors = configure(&StateProtocol, "state", "path = \"\"\nbusy_timeout = \"soon\"\n").unwrap_err();
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(errors[0].starts_with("cage.toml:2: resources.state.path: must not be empty"), "{errors:?}");
    assert!(errors[1].starts_with("cage.toml:3: resources.state.busy_timeout:"), "{errors:?}");
    let errors = configure(&StateProtocol, "state", "path = \"/tmp/x.sqlite\"\nmode = 1\n").unwrap_err();
    assert_eq!(errors, vec!["cage.toml:3: resources.state.mode: unknown key".to_string()]);
    let ok = configure(&StateProtocol, "state", "path = \"/nonexistent/x.sqlite\"\n").unwrap();
    assert_eq!(ok.pool.size, 4);
    assert!(!Path::new("/nonexistent").exists(), "configure creates nothing");
}

#[test]
fn a_relative_path_is_taken_from_the_folder_of_cage_toml() {
    let dir = tempfile::tempdir().unwrap();
    let text = "[resources.state]\npath = \"data/s.sqlite\"\n".to_string();
    let file = rustomnic_core::SourceFile::parse(&dir.path().join("cage.toml"), text).unwrap();
    let root = file.root();
    let section = root.table("resources").unwrap().table("state").unwrap();
    let resource = rustomnic_resource::ResourceProtocol::configure(&StateProtocol, "state", &section).unwrap();
    section.finish();
    assert!(file.take_errors().is_empty());
    let config = ResourceConfig {
        name: "state".into(),
        protocol: "state".into(),
        pool: Default::default(),
        resource,
        fingerprint: String::new(),
        breaker: Default::default(),
    };
    run_with(config, "pmnc.transaction.state.set('a', 1)").unwrap();
    assert!(dir.path().join("data/s.sqlite").is_file());
}

#[test]
fn connections_opening_a_new_file_at_once_wait_for_each_other() {
    // Found by a flaky run: switching a new file to WAL while another connection does the same
    // failed at once with "database is locked" instead of waiting.
    for _ in 0..15 {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.sqlite");
        let r = run(
            &path,
            r#"local xa = pmnc.transaction.create()
               xa.state.get("a") xa.state.keys() xa.state.set("b", 1) xa.state.delete("c")
               return xa.execute()"#,
        )
        .unwrap();
        assert_eq!(r, vec![Value::Nil, Value::Array(vec![]), Value::Nil, Value::Bool(false)]);
    }
}
