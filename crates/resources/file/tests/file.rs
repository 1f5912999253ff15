//! The file resource through Lua transactions: reads and writes under the root, atomic replace,
//! commit-time changes that a rollback leaves no trace of, and every way out of the root refused.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::symlink;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rustomnic_core::Value;
use rustomnic_lua::RunError;
use rustomnic_resource::testing::{configure, run_lua};
use rustomnic_resource::ResourceConfig;
use rustomnic_resource_file::{FileProtocol, OUTSIDE, TEMP_PREFIX};

fn files_at(root: &Path, extra: &str) -> ResourceConfig {
    configure(&FileProtocol, "files", &format!("root = {:?}\n{extra}", root.display().to_string())).unwrap()
}

fn run(root: &Path, body: &str) -> Result<Vec<Value>, RunError> {
    run_with(files_at(root, ""), body)
}

fn run_with(files: ResourceConfig, body: &str) -> Result<Vec<Value>, RunError> {
    run_lua(vec![files], &format!("local F = pmnc.transaction.files\nreturn {{ f = function() {body} end }}"), "f", vec![], Duration::from_secs(20))
}

/// The error raised by `body` (which must fail) as its text and code.
fn failure(root: &Path, body: &str) -> (String, Value) {
    let r = run(root, &format!("local ok, e = pcall(function() {body} end) assert(not ok, 'no error') return tostring(e), e.code")).unwrap();
    (r[0].as_str().unwrap().to_string(), r[1].clone())
}

/// Every name in `dir` and below, hidden ones included, relative and sorted.
fn tree(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            out.push(p.strip_prefix(base).unwrap().display().to_string());
            if p.is_dir() && !p.is_symlink() {
                walk(base, &p, out);
            }
        }
    }
    walk(dir, dir, &mut out);
    out.sort();
    out
}

#[test]
fn write_then_read_and_exists() {
    let dir = tempfile::tempdir().unwrap();
    let r = run(
        dir.path(),
        r#"local xa = pmnc.transaction.create()
           xa.files.write("a.txt", "hello")
           xa.files.write("deep/er/b.bin", "\0\1\2")
           xa.execute()
           return F.read("a.txt"), F.read("./deep//er/b.bin"), F.exists("a.txt"), F.exists("nope"), F.exists("deep"), F.exists("")"#,
    )
    .unwrap();
    assert_eq!(r, vec![Value::str("hello"), Value::Str(vec![0, 1, 2]), Value::Bool(true), Value::Bool(false), Value::Bool(true), Value::Bool(true)]);
    assert_eq!(std::fs::read(dir.path().join("deep/er/b.bin")).unwrap(), [0, 1, 2]);
    // Writing again replaces the whole file.
    run(dir.path(), r#"F.write("a.txt", "bye")"#).unwrap();
    assert_eq!(std::fs::read_to_string(dir.path().join("a.txt")).unwrap(), "bye");
    assert_eq!(tree(dir.path()), ["a.txt", "deep", "deep/er", "deep/er/b.bin"]);
}

#[test]
fn append_adds_at_commit_and_parallel_appends_both_land() {
    let dir = tempfile::tempdir().unwrap();
    run(
        dir.path(),
        r#"F.append("log/x.log", "one\n")
           local xa = pmnc.transaction.create()
           xa.files.append("log/x.log", "two\n")
           xa.files.append("log/x.log", "three\n")
           xa.execute()"#,
    )
    .unwrap();
    let text = std::fs::read_to_string(dir.path().join("log/x.log")).unwrap();
    assert!(text == "one\ntwo\nthree\n" || text == "one\nthree\ntwo\n", "{text:?}");
}

#[test]
fn list_shows_names_sizes_and_folders() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    std::fs::write(dir.path().join("b.txt"), "12345").unwrap();
    std::fs::write(dir.path().join("sub/c"), "").unwrap();
    std::fs::write(dir.path().join(format!("{TEMP_PREFIX}1-1")), "staged elsewhere").unwrap();
    symlink("b.txt", dir.path().join("a-link")).unwrap();
    let r = run(dir.path(), r#"return F.list(""), F.list("sub"), F.list()"#).unwrap();
    let entry = |name: &str, size: i64, d: bool, link: bool| {
        let mut fields = vec![(Value::str("name"), Value::str(name)), (Value::str("size"), Value::Int(size)), (Value::str("dir"), Value::Bool(d))];
        if link {
            fields.push((Value::str("link"), Value::Bool(true)));
        }
        fields
    };
    let Value::Array(items) = &r[0] else { panic!("{r:?}") };
    let got: Vec<Vec<(Value, Value)>> =
        items.iter().map(|v| ["name", "size", "dir", "link"].iter().filter_map(|k| v.get(k).map(|x| (Value::str(*k), x.clone()))).collect()).collect();
    let dir_size = std::fs::metadata(dir.path().join("sub")).unwrap().len() as i64;
    assert_eq!(got, vec![entry("a-link", 5, false, true), entry("b.txt", 5, false, false), entry("sub", dir_size, true, false)]);
    let Value::Array(sub) = &r[1] else { panic!("{r:?}") };
    assert_eq!(sub.len(), 1);
    assert_eq!(sub[0].get("name"), Some(&Value::str("c")));
    assert_eq!(r[2], r[0]);
}

#[test]
fn delete_reports_whether_it_existed() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("full/inner")).unwrap();
    std::fs::create_dir(dir.path().join("empty")).unwrap();
    std::fs::write(dir.path().join("a.txt"), "x").unwrap();
    let r = run(dir.path(), r#"return F.delete("a.txt"), F.delete("a.txt"), F.delete("empty"), F.delete("no/such/thing")"#).unwrap();
    assert_eq!(r, vec![Value::Bool(true), Value::Bool(false), Value::Bool(true), Value::Bool(false)]);
    assert_eq!(tree(dir.path()), ["full", "full/inner"]);
    let (message, code) = failure(dir.path(), r#"F.delete("full")"#);
    assert_eq!(message, "resource files (participant 1): delete \"full\": the folder is not empty [ENOTEMPTY]");
    assert_eq!(code, Value::str("ENOTEMPTY"));
}

#[test]
fn escapes_are_refused() {
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret"), "s3cret").unwrap();
    let dir = tempfile::tempdir().unwrap();
    symlink(outside.path(), dir.path().join("out")).unwrap();
    symlink(outside.path().join("secret"), dir.path().join("secret-link")).unwrap();
    symlink("/nonexistent/far/away", dir.path().join("dangling")).unwrap();
    std::fs::create_dir(dir.path().join("in")).unwrap();
    symlink("in", dir.path().join("in-link")).unwrap();
    let cases = [
        (r#"F.read("../x")"#, r#"read: the path "../x" is refused: ".." is not allowed"#),
        (r#"F.read("a/../../x")"#, r#"read: the path "a/../../x" is refused: ".." is not allowed"#),
        (r#"F.read("/etc/passwd")"#, r#"read: the path "/etc/passwd" is refused: absolute paths are not allowed (paths are relative to the root)"#),
        (r#"F.read("out/secret")"#, r#"read: the path "out/secret" is refused: a symbolic link leads outside the root"#),
        (r#"F.read("secret-link")"#, r#"read: the path "secret-link" is refused: a symbolic link leads outside the root"#),
        (r#"F.write("out/new", "x")"#, r#"write: the path "out/new" is refused: a symbolic link leads outside the root"#),
        (r#"F.write("out/a/b/new", "x")"#, r#"write: the path "out/a/b/new" is refused: a symbolic link leads outside the root"#),
        (r#"F.append("secret-link", "x")"#, r#"append: the path "secret-link" is refused: a symbolic link leads outside the root"#),
        (r#"F.exists("out/nothing/here")"#, r#"exists: the path "out/nothing/here" is refused: a symbolic link leads outside the root"#),
        (r#"F.list("out")"#, r#"list: the path "out" is refused: a symbolic link leads outside the root"#),
        (r#"F.delete("out/secret")"#, r#"delete: the path "out/secret" is refused: a symbolic link leads outside the root"#),
    ];
    for (body, expected) in cases {
        let (message, code) = failure(dir.path(), body);
        assert_eq!(message, format!("resource files (participant 1): {expected} [{OUTSIDE}]"), "{body}");
        assert_eq!(code, Value::str(OUTSIDE));
    }
    let (message, _) = failure(dir.path(), r#"F.append("dangling", "x")"#);
    assert_eq!(message, "resource files (participant 1): append \"dangling\": it is a symbolic link to nothing [ENOENT]");
    assert!(!Path::new("/nonexistent").exists());
    assert_eq!(std::fs::read_to_string(outside.path().join("secret")).unwrap(), "s3cret");
    assert_eq!(tree(outside.path()), ["secret"], "nothing was written outside");
    // Links that stay inside are fine, and a link is replaced, not followed, by a write.
    let r = run(dir.path(), r#"F.write("in-link/x", "inside") F.write("secret-link", "mine") return F.read("in/x"), F.read("secret-link")"#).unwrap();
    assert_eq!(r, vec![Value::str("inside"), Value::str("mine")]);
    assert!(!dir.path().join("secret-link").is_symlink());
    assert_eq!(std::fs::read_to_string(outside.path().join("secret")).unwrap(), "s3cret");
}

#[test]
fn a_rolled_back_transaction_leaves_no_trace() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("keep.txt"), "original").unwrap();
    let (message, _) = failure(
        dir.path(),
        r#"local xa = pmnc.transaction.create()
           xa.files.write("new/deep/a.txt", "staged")
           xa.files.write("keep.txt", "changed")
           xa.files.append("log.txt", "line")
           xa.files.read("missing.txt")
           xa.execute()"#,
    );
    assert_eq!(message, "resource files (participant 4): read \"missing.txt\": no such file [ENOENT]");
    assert_eq!(tree(dir.path()), ["keep.txt"]);
    let (message, _) = failure(dir.path(), r#"local xa = pmnc.transaction.create() xa.files.delete("keep.txt") xa.files.read("missing.txt") xa.execute()"#);
    assert_eq!(message, "resource files (participant 2): read \"missing.txt\": no such file [ENOENT]");
    assert_eq!(tree(dir.path()), ["keep.txt"]);
    assert_eq!(std::fs::read_to_string(dir.path().join("keep.txt")).unwrap(), "original");
    // accept can refuse a transaction whose calls all succeeded: the same.
    let r = run(
        dir.path(),
        r#"local xa = pmnc.transaction.create({ accept = function() return false end })
           xa.files.write("x/y.txt", "staged")
           local ok, e = pcall(xa.execute)
           return ok, e.message"#,
    )
    .unwrap();
    assert_eq!(r, vec![Value::Bool(false), Value::str("rejected by accept")]);
    assert_eq!(tree(dir.path()), ["keep.txt"]);
}

#[test]
fn a_replace_is_atomic_the_target_only_ever_holds_a_whole_file() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("a.txt");
    let old = vec![b'o'; 1 << 20];
    std::fs::write(&target, &old).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (dir, stop) = (dir.path().to_path_buf(), stop.clone());
        std::thread::spawn(move || {
            let (mut seen_temp, mut olds, mut news) = (Vec::new(), 0, 0);
            while !stop.load(Ordering::SeqCst) {
                for e in std::fs::read_dir(&dir).unwrap() {
                    let name = e.unwrap().file_name().to_string_lossy().into_owned();
                    if name.starts_with(TEMP_PREFIX) && !seen_temp.contains(&name) {
                        seen_temp.push(name);
                    }
                }
                let data = std::fs::read(dir.join("a.txt")).unwrap();
                if data.len() == 1 << 20 && data.iter().all(|b| *b == b'o') {
                    olds += 1;
                } else if data.len() == 4 << 20 && data.iter().all(|b| *b == b'n') {
                    news += 1;
                } else {
                    panic!("a.txt held {} bytes that are neither the old nor the new file", data.len());
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            (seen_temp, olds, news)
        })
    };
    // accept runs between the call (temp file written) and the commit (rename): hold it there.
    run(
        dir.path(),
        r#"local xa = pmnc.transaction.create({ accept = function() pmnc.sleep(0.3) return true end })
           xa.files.write("a.txt", string.rep("n", 4 * 1024 * 1024))
           xa.execute()"#,
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(50));
    stop.store(true, Ordering::SeqCst);
    let (seen_temp, olds, news) = watcher.join().unwrap();
    assert_eq!(seen_temp.len(), 1, "one staged file beside the target: {seen_temp:?}");
    assert!(seen_temp[0].starts_with(&format!("{TEMP_PREFIX}{}-", std::process::id())), "{seen_temp:?}");
    assert!(olds > 10 && news > 0, "old seen {olds} times, new {news} times");
    assert_eq!(std::fs::read(&target).unwrap().len(), 4 << 20);
    assert_eq!(tree(dir.path()), ["a.txt"], "the temp file was renamed away");
}

#[test]
fn a_call_cut_by_the_deadline_leaves_no_temp_file() {
    let dir = tempfile::tempdir().unwrap();
    for timeout_ms in [30, 80, 150, 300] {
        let files = files_at(dir.path(), "max_size = \"256MiB\"\n");
        let _ = run_lua(
            vec![files],
            r#"return { f = function()
                 local data = string.rep("z", 96 * 1024 * 1024)
                 local xa = pmnc.transaction.create({ accept = function() pmnc.sleep(5) return true end })
                 xa.files.write("big/a.bin", data) xa.files.write("big/b.bin", data)
                 xa.execute()
               end }"#,
            "f",
            vec![],
            Duration::from_millis(timeout_ms),
        );
        // The runtime is gone, and with it every blocking task it had started.
        assert_eq!(tree(dir.path()), Vec::<String>::new(), "after a deadline of {timeout_ms} ms");
    }
}

#[test]
fn sizes_and_arguments_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("eleven"), "12345678901").unwrap();
    let small = || files_at(dir.path(), "max_size = 10\n");
    let r = run_with(small(), r#"local ok, e = pcall(F.write, "x", "12345678901") return tostring(e)"#).unwrap();
    assert_eq!(r[0], Value::str("resource files (participant 1): write: the data is 11 bytes, over max_size (10 bytes) [EFBIG]"));
    let r = run_with(small(), r#"local ok, e = pcall(F.read, "eleven") return tostring(e)"#).unwrap();
    assert_eq!(r[0], Value::str("resource files (participant 1): read \"eleven\": 11 bytes is over max_size (10 bytes) [EFBIG]"));
    let cases = [
        (r#"F.read("")"#, r#"read: the path "" names the root folder, not a file"#),
        (r#"F.read(1)"#, "read: the path must be a string, got integer"),
        (r#"F.write("a", {})"#, "write: the data must be a string, got map"),
        (r#"F.write("a")"#, "write: expected write(path, data), got 1 argument"),
        (r#"F.read("eleven/x")"#, r#"read "eleven/x": eleven is a file, not a folder [ENOTDIR]"#),
        (r#"F.write("eleven/x", "y")"#, r#"write "eleven/x": eleven is a file, not a folder [ENOTDIR]"#),
        (r#"F.list("eleven")"#, r#"list "eleven": it is a file, not a folder [ENOTDIR]"#),
        (r#"F.list("nope")"#, r#"list "nope": no such folder [ENOENT]"#),
        (r#"F.chmod("a")"#, "no method chmod (methods: read, write, append, list, delete, exists)"),
    ];
    for (body, expected) in cases {
        assert_eq!(failure(dir.path(), body).0, format!("resource files (participant 1): {expected}"), "{body}");
    }
    std::fs::create_dir(dir.path().join("folder")).unwrap();
    assert_eq!(failure(dir.path(), r#"F.write("folder", "x")"#).0, "resource files (participant 1): write \"folder\": it is a folder [EISDIR]");
    assert_eq!(failure(dir.path(), r#"F.read("folder")"#).0, "resource files (participant 1): read \"folder\": it is a folder [EISDIR]");
}

#[test]
fn config_needs_an_existing_root_folder() {
    let dir = tempfile::tempdir().unwrap();
    let errors = configure(&FileProtocol, "files", "").unwrap_err();
    assert_eq!(errors, vec!["cage.toml:1: resources.files: root is required (the folder this resource may read and write)".to_string()]);
    let missing = dir.path().join("missing");
    let errors = configure(&FileProtocol, "files", &format!("root = {:?}\n", missing.display().to_string())).unwrap_err();
    assert_eq!(errors, vec![format!("cage.toml:2: resources.files.root: {}: No such file or directory", missing.display())]);
    std::fs::write(dir.path().join("file"), "").unwrap();
    let file = dir.path().join("file");
    let errors = configure(&FileProtocol, "files", &format!("root = {:?}\n", file.display().to_string())).unwrap_err();
    assert_eq!(errors, vec![format!("cage.toml:2: resources.files.root: {} is not a folder", file.display())]);
    let errors = configure(&FileProtocol, "files", "root = \"/tmp\"\nmax_size = \"lots\"\nmode = 1\n").unwrap_err();
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(errors[0].starts_with("cage.toml:3: resources.files.max_size:"), "{errors:?}");
    assert!(errors[1].starts_with("cage.toml:4: resources.files.mode: unknown key"), "{errors:?}");
    assert_eq!(files_at(dir.path(), "").pool.size, 4);
}

#[test]
fn a_relative_root_is_taken_from_the_folder_of_cage_toml() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("files")).unwrap();
    let text = "[resources.files]\nroot = \"files\"\n".to_string();
    let file = rustomnic_core::SourceFile::parse(&dir.path().join("cage.toml"), text).unwrap();
    let root = file.root();
    let section = root.table("resources").unwrap().table("files").unwrap();
    let resource = rustomnic_resource::ResourceProtocol::configure(&FileProtocol, "files", &section).unwrap();
    section.finish();
    assert!(file.take_errors().is_empty());
    let config = ResourceConfig {
        name: "files".into(),
        protocol: "file".into(),
        pool: Default::default(),
        resource,
        fingerprint: String::new(),
        breaker: Default::default(),
    };
    run_with(config, r#"F.write("x.txt", "here")"#).unwrap();
    assert_eq!(std::fs::read_to_string(dir.path().join("files/x.txt")).unwrap(), "here");
}
