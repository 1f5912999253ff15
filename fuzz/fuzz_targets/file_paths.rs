//! Paths given by module code to the file resource, a security boundary: no path may reach
//! outside the resource's root. Each input is a method and a path, run against a fixed tree
//! whose root holds folders, files and symbolic links that lead inside, outside (`..`, `/`, a
//! chain of links), nowhere and in a loop. Properties: a path is refused lexically exactly
//! when it is absolute, has `..` or NUL, or is too long; whatever a method resolves to is
//! under the root; nothing outside is read, listed or touched; and a staged write or append,
//! abandoned, leaves the tree exactly as it was.
#![no_main]

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use libfuzzer_sys::fuzz_target;
use rustomnic_core::Value;
use rustomnic_resource_file::fuzzing::{
    abandon, exists, follow, list, parse, read, stage_append, stage_delete, stage_write,
    SharedTrace, Staged,
};

const SECRET: &[u8] = b"OUTSIDE-SECRET";

/// The tree, made once per process: (base folder, canonical root inside it).
fn tree() -> &'static (PathBuf, PathBuf) {
    static TREE: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    TREE.get_or_init(|| {
        let tmp = std::env::temp_dir();
        // Trees of fuzz runs that ended are removed (a process cannot clean up after libFuzzer exits).
        for entry in std::fs::read_dir(&tmp).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name.strip_prefix("rustomnic-fuzz-paths-") {
                if !Path::new("/proc").join(pid).exists() {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        let base = tmp.join(format!("rustomnic-fuzz-paths-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let mk = |p: &str| std::fs::create_dir_all(base.join(p)).expect("make the tree");
        let file =
            |p: &str, data: &[u8]| std::fs::write(base.join(p), data).expect("make the tree");
        let link = |target: &str, p: &str| symlink(target, base.join(p)).expect("make the tree");
        mk("outside/sub");
        file("outside/secret.txt", SECRET);
        mk("root/a/b");
        file("root/a/b/f.txt", b"inside");
        file("root/f.txt", b"top");
        link("..", "root/a/up");
        link("../..", "root/a/upup");
        link("/", "root/a/abs");
        link("a/b", "root/in_link");
        link("../outside", "root/out_dir");
        link("../outside/secret.txt", "root/out_file");
        link("nowhere", "root/dangling");
        link("loop2", "root/loop1");
        link("loop1", "root/loop2");
        link("a/up/a/upup", "root/chain");
        let root = base.join("root").canonicalize().expect("the root");
        (base.canonicalize().expect("the base"), root)
    })
}

/// Every entry under `dir` (links not followed) with what it holds, sorted.
fn snapshot(dir: &Path, base: &Path, out: &mut Vec<(PathBuf, String)>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let p = e.path();
        let rel = p.strip_prefix(base).unwrap_or(&p).to_path_buf();
        let meta = std::fs::symlink_metadata(&p).expect("an entry of the tree");
        if meta.file_type().is_symlink() {
            out.push((rel, format!("link {:?}", std::fs::read_link(&p).ok())));
        } else if meta.is_dir() {
            out.push((rel, "dir".into()));
            snapshot(&p, base, out);
        } else {
            out.push((rel, format!("file {:?}", std::fs::read(&p).ok())));
        }
    }
}

fn state(base: &Path) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    snapshot(base, base, &mut out);
    out
}

fn initial() -> &'static Vec<(PathBuf, String)> {
    static INITIAL: OnceLock<Vec<(PathBuf, String)>> = OnceLock::new();
    INITIAL.get_or_init(|| state(&tree().0))
}

/// The canonical folder holding `p` (which itself may be a link or not exist).
fn under(root: &Path, p: &Path, what: &str) {
    let parent = p
        .parent()
        .unwrap_or_else(|| panic!("{what}: {p:?} has no folder"));
    let parent = parent
        .canonicalize()
        .unwrap_or_else(|e| panic!("{what}: {parent:?}: {e}"));
    assert!(
        parent.starts_with(root),
        "{what}: {p:?} is outside the root {root:?}"
    );
}

fuzz_target!(|data: &[u8]| {
    let Some((&op, raw)) = data.split_first() else {
        return;
    };
    let (base, root) = tree();
    let before = initial();
    let rel = parse("fuzz", raw);
    let components: Vec<&[u8]> = raw
        .split(|b| *b == b'/')
        .filter(|p| !p.is_empty() && *p != b".")
        .collect();
    let lexically_bad = raw.len() > 4096
        || raw.contains(&0)
        || raw.first() == Some(&b'/')
        || components.contains(&&b".."[..]);
    assert_eq!(
        rel.is_err(),
        lexically_bad,
        "{:?}",
        String::from_utf8_lossy(raw)
    );
    let Ok(rel) = rel else { return };
    assert_eq!(
        rel.parts.iter().map(Vec::as_slice).collect::<Vec<_>>(),
        components
    );
    if let Ok(Some(p)) = follow(root, &rel, "fuzz") {
        assert!(p.starts_with(root), "follow: {p:?} is outside the root");
    }
    let trace: SharedTrace = Arc::new(Mutex::new(Default::default()));
    match op % 6 {
        0 => {
            if let Ok(Value::Str(bytes)) = read(root, &rel, 1 << 20) {
                assert_ne!(bytes, SECRET, "read reached outside the root");
            }
        }
        1 => {
            let _ = exists(root, &rel);
        }
        2 => {
            if let Ok(Value::Array(entries)) = list(root, &rel) {
                let dir = follow(root, &rel, "fuzz")
                    .ok()
                    .flatten()
                    .expect("a listed folder resolves");
                assert!(dir.starts_with(root), "list: {dir:?} is outside the root");
                for e in entries {
                    let name = e
                        .get("name")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string();
                    assert!(
                        name != "secret.txt" && name != "sub",
                        "list reached outside the root: {name}"
                    );
                }
            }
        }
        3 => {
            if let Ok(Staged::Replace { temp, target }) = stage_write(root, &rel, b"w", &trace) {
                under(root, &temp, "write temp");
                under(root, &target, "write target");
            }
            abandon(&trace);
        }
        4 => {
            if let Ok(Staged::Append { target, .. }) =
                stage_append(root, &rel, b"a".to_vec(), &trace)
            {
                under(root, &target, "append");
                if let Ok(t) = target.canonicalize() {
                    assert!(t.starts_with(root), "append: {t:?} is outside the root");
                }
            }
            abandon(&trace);
        }
        _ => {
            if let Ok(Some(Staged::Delete { target, .. })) = stage_delete(root, &rel) {
                under(root, &target, "delete");
            }
        }
    }
    assert_eq!(
        &state(base),
        before,
        "the tree changed after op {} on {:?}",
        op % 6,
        String::from_utf8_lossy(raw)
    );
});
