//! Turning a path given by module code into a place under the root, refusing anything that
//! would leave it: absolute paths, `..`, and symbolic links that point outside.
//!
//! The lexical checks come first (they need no disk). Then the folder a path lives in is
//! canonicalized (every symbolic link on the way resolved) and must still start with the
//! canonical root; the last component is judged by each method, since a rename or delete acts on
//! a link itself while a read follows it.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustomnic_resource::Error;

/// Longer relative paths are refused before touching the disk (Linux's PATH_MAX is 4096).
const MAX_PATH: usize = 4096;

/// Code of every refusal to leave the root, so module code can tell it from I/O errors.
pub const OUTSIDE: &str = "OUTSIDE_ROOT";

/// A relative path split into its components, as given (for messages) and checked.
pub struct Rel {
    pub text: String,
    pub parts: Vec<Vec<u8>>,
}

impl Rel {
    pub fn is_root(&self) -> bool {
        self.parts.is_empty()
    }

    /// The last component (the entry's own name); empty for the root.
    pub fn name(&self) -> &[u8] {
        self.parts.last().map(|p| p.as_slice()).unwrap_or(b"")
    }
}

/// Checks `raw` lexically: relative, no `..`, no NUL. `.` and empty components are dropped, so
/// "" and "." name the root.
pub fn parse(method: &str, raw: &[u8]) -> Result<Rel, Error> {
    let text = String::from_utf8_lossy(raw).into_owned();
    let refuse = |why: &str| Error::new(format!("{method}: the path {text:?} is refused: {why}")).with_code(OUTSIDE);
    if raw.len() > MAX_PATH {
        return Err(Error::new(format!("{method}: the path is {} bytes long, over the limit of {MAX_PATH}", raw.len())));
    }
    if raw.contains(&0) {
        return Err(refuse("it contains a NUL byte"));
    }
    if raw.first() == Some(&b'/') {
        return Err(refuse("absolute paths are not allowed (paths are relative to the root)"));
    }
    let mut parts = Vec::new();
    for part in raw.split(|b| *b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => return Err(refuse("\"..\" is not allowed")),
            p => parts.push(p.to_vec()),
        }
    }
    Ok(Rel { text, parts })
}

pub fn join(base: &Path, parts: &[Vec<u8>]) -> PathBuf {
    let mut p = base.to_path_buf();
    for part in parts {
        p.push(OsStr::from_bytes(part));
    }
    p
}

/// "no such file" style codes for I/O errors, so module code can test `e.code`.
pub fn io_code(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::NotFound => "ENOENT",
        io::ErrorKind::PermissionDenied => "EACCES",
        io::ErrorKind::AlreadyExists => "EEXIST",
        io::ErrorKind::IsADirectory => "EISDIR",
        io::ErrorKind::NotADirectory => "ENOTDIR",
        io::ErrorKind::DirectoryNotEmpty => "ENOTEMPTY",
        io::ErrorKind::StorageFull => "ENOSPC",
        io::ErrorKind::ReadOnlyFilesystem => "EROFS",
        _ => "EIO",
    }
}

/// An I/O error of `method` on the path given by module code.
pub fn io_error(method: &str, rel: &Rel, e: &io::Error) -> Error {
    Error::new(format!("{method} {:?}: {}", rel.text, plain(e))).with_code(io_code(e))
}

/// The OS message without Rust's " (os error 2)" tail, which means nothing to module code.
pub fn plain(e: &io::Error) -> String {
    let s = e.to_string();
    match s.rfind(" (os error ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// The canonical form of `path` (which exists), if it is under `root`; else the refusal.
fn inside(root: &Path, path: &Path, method: &str, rel: &Rel) -> Result<PathBuf, Error> {
    let canonical = path.canonicalize().map_err(|e| io_error(method, rel, &e))?;
    if canonical.starts_with(root) {
        Ok(canonical)
    } else {
        Err(Error::new(format!("{method}: the path {:?} is refused: a symbolic link leads outside the root", rel.text)).with_code(OUTSIDE))
    }
}

/// The entry at `rel`, following symbolic links (read, list, exists, append): its canonical path
/// under the root, or None when nothing is there (a dangling link counts as nothing).
pub fn follow(root: &Path, rel: &Rel, method: &str) -> Result<Option<PathBuf>, Error> {
    // The folder first: a link on the way out is refused whether or not the rest exists, so
    // module code cannot probe what lies outside.
    let Some(parent) = parent_inside(root, rel, method)? else {
        return Ok(None);
    };
    if rel.is_root() {
        return Ok(Some(parent));
    }
    let path = parent.join(OsStr::from_bytes(rel.name()));
    match path.symlink_metadata() {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error(method, rel, &e)),
        Ok(_) => {}
    }
    match inside(root, &path, method, rel) {
        Ok(p) => Ok(Some(p)),
        Err(e) if e.code.as_deref() == Some("ENOENT") => Ok(None),
        Err(e) => Err(e),
    }
}

/// The canonical folder holding `rel` (not following its last component), or None when that
/// folder does not exist.
pub fn parent_inside(root: &Path, rel: &Rel, method: &str) -> Result<Option<PathBuf>, Error> {
    let (base, missing) = existing_ancestor(root, rel, method)?;
    Ok(if missing.is_empty() { Some(base) } else { None })
}

/// The deepest folder of `rel`'s parent chain that exists (canonical, checked to be under the
/// root) and the components below it that do not exist yet.
pub fn existing_ancestor(root: &Path, rel: &Rel, method: &str) -> Result<(PathBuf, Vec<Vec<u8>>), Error> {
    let parent = &rel.parts[..rel.parts.len().saturating_sub(1)];
    let mut have = parent.len();
    while have > 0 {
        match join(root, &parent[..have]).symlink_metadata() {
            Ok(_) => break,
            Err(e) if e.kind() == io::ErrorKind::NotFound => have -= 1,
            Err(e) => return Err(io_error(method, rel, &e)),
        }
    }
    let base = inside(root, &join(root, &parent[..have]), method, rel)?;
    if !base.is_dir() {
        return Err(Error::new(format!("{method} {:?}: {} is a file, not a folder", rel.text, String::from_utf8_lossy(&parent[..have].join(&b'/'))))
            .with_code("ENOTDIR"));
    }
    Ok((base, parent[have..].to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lexical_checks() {
        let parts = |s: &str| parse("read", s.as_bytes()).map(|r| r.parts.iter().map(|p| String::from_utf8_lossy(p).into_owned()).collect::<Vec<_>>());
        assert_eq!(parts("a/./b//c").unwrap(), ["a", "b", "c"]);
        assert!(parts("").unwrap().is_empty());
        assert!(parts("./").unwrap().is_empty());
        let e = parse("read", b"../x").err().unwrap();
        assert_eq!(e.message, "read: the path \"../x\" is refused: \"..\" is not allowed");
        assert_eq!(e.code.as_deref(), Some(OUTSIDE));
        assert!(parse("read", b"a/b/../../..").is_err());
        assert!(parse("read", b"/etc/passwd").err().unwrap().message.contains("absolute paths are not allowed"));
        assert!(parse("read", b"a\0b").err().unwrap().message.contains("NUL"));
        assert!(parse("read", &[b'a'; 5000]).err().unwrap().message.contains("over the limit"));
        // ".." inside a name is just a name.
        assert_eq!(parts("a..b/..c").unwrap(), ["a..b", "..c"]);
    }

    #[test]
    fn plain_messages() {
        let e = io::Error::from_raw_os_error(2);
        assert_eq!(plain(&e), "No such file or directory");
        assert_eq!(io_code(&e), "ENOENT");
    }
}
