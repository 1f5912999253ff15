//! The `file` interface: a drop folder. Every complete file that arrives in `path` is one
//! request to the handler; after it the file is moved to `done/` (or deleted), or to `failed/`
//! with a `NAME.error` text beside it. See docs/interfaces/file.md and docs/decisions/135.
//!
//! ```toml
//! [interfaces.inbox]
//! protocol = "file"
//! path = "inbox"                # required: the folder, relative to the cage folder (made when missing)
//! pattern = "*.csv"             # names taken (`*` any run, `?` one character); default "*"
//! ignore = ["*.tmp", "*.part", "*~"]   # names never taken (the default); names starting with "." never are
//! settle = "2s"                 # a file written in place is taken once its size and mtime stayed this long
//! rescan = "5s"                 # the folder is listed again at least this often (events can be lost)
//! concurrency = 4               # files handled at once
//! max_size = "16MiB"            # a bigger file is not read: it goes to failed/ with the reason
//! on_success = "move"           # "move" to done/ or "delete"
//! handler = "inbox.handle"      # default "<interface>.handle"
//! request_timeout = "60s"
//! ```
//!
//! **Complete** means renamed into the folder (seen as a rename by the folder's events: taken
//! at once), or unchanged in size and mtime for `settle` (a writer writing in place, a file
//! found by a listing). The handler is `function M.handle(file)` with `file.name`,
//! `file.path` (where it is while handled: `<path>/.processing/<id>.<name>`), `file.size`,
//! `file.mtime` (Unix seconds) and `file.content` (its bytes); its return value is not used.
//!
//! **Restarts.** A file is taken by renaming it into `.processing/` under a unique name (atomic
//! on one file system, so two listings never take it twice); its handler runs with its
//! `pmnc.state` writes held, and the outcome is recorded in the cage's state file in the same
//! SQLite transaction as those writes, before the file is moved on. A start finds what is left
//! in `.processing/`: a recorded outcome is finished (moved), a file without one runs again.
//! So a file is handled **exactly once as far as the cage's state goes** and **at least once**
//! for every other effect of its handler (a kill between another resource's commit and the
//! record runs it again); see decision 135.

mod folder;
mod outcome;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustomnic_core::Section;
use rustomnic_interface::{Host, Interface, InterfaceProtocol, InterfaceSpec};

/// The keys of a file interface (besides protocol, handler and request_timeout).
pub const KEYS: &[&str] = &["path", "pattern", "ignore", "settle", "rescan", "concurrency", "max_size", "on_success"];

/// The subfolders the interface keeps in the folder.
pub const PROCESSING: &str = ".processing";
pub const DONE: &str = "done";
pub const FAILED: &str = "failed";

/// The largest `max_size`: a file's content is read whole into the request.
const MAX_SIZE_LIMIT: u64 = 1 << 30;

/// The `file` protocol.
pub struct FileProtocol;

/// What happens to a file whose handler succeeded.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum OnSuccess {
    Move,
    Delete,
}

/// A configured drop folder.
#[derive(Debug)]
pub struct FileInterface {
    spec: InterfaceSpec,
    /// The folder, absolute (the cage folder joined with `path`).
    folder: PathBuf,
    pattern: Vec<String>,
    ignore: Vec<String>,
    settle: Duration,
    rescan: Duration,
    concurrency: usize,
    max_size: u64,
    on_success: OnSuccess,
}

/// Checks a name pattern: not empty, no `/`.
fn check_glob(g: &str) -> Result<(), String> {
    if g.is_empty() || g.contains('/') {
        return Err(format!("{g:?} is not a name pattern such as \"*.csv\" (no folders)"));
    }
    Ok(())
}

impl InterfaceProtocol for FileProtocol {
    fn name(&self) -> &'static str {
        "file"
    }

    fn configure(&self, spec: InterfaceSpec, section: &Section) -> Option<Arc<dyn Interface>> {
        let base = section.file().path().parent().map(Path::to_path_buf).unwrap_or_default();
        let base = if base.as_os_str().is_empty() { PathBuf::from(".") } else { base };
        let folder = section.required_parsed("path", "inbox", |p| {
            let given = base.join(p);
            if given.exists() && !given.is_dir() {
                return Err(format!("{} is not a folder", given.display()));
            }
            // Absolute, so that the folder does not depend on the process's working folder.
            let abs = if given.is_absolute() { given } else { std::env::current_dir().map(|d| d.join(&given)).unwrap_or(given) };
            Ok(abs)
        });
        let pattern = match section.string("pattern") {
            Some(p) => match check_glob(&p.value) {
                Ok(()) => Some(vec![p.value]),
                Err(e) => {
                    section.error("pattern", e);
                    None
                }
            },
            None if section.has("pattern") => None,
            None => Some(vec!["*".to_string()]),
        };
        let ignore = match section.strings("ignore") {
            Some(list) => {
                let bad: Vec<String> = list.value.iter().filter_map(|g| check_glob(g).err()).collect();
                if let Some(e) = bad.first() {
                    section.error("ignore", e.clone());
                    None
                } else {
                    Some(list.value)
                }
            }
            None if section.has("ignore") => None,
            None => Some(vec!["*.tmp".to_string(), "*.part".to_string(), "*~".to_string()]),
        };
        let settle = section.duration("settle", Duration::from_secs(3600)).map(|v| v.value).unwrap_or(Duration::from_secs(2));
        let rescan = match section.duration("rescan", Duration::from_secs(3600)) {
            Some(r) if r.value < Duration::from_millis(100) => {
                section.error("rescan", "must be at least 100ms");
                Duration::from_secs(5)
            }
            Some(r) => r.value,
            None => Duration::from_secs(5),
        };
        let concurrency = section.integer("concurrency", 1, 1000).map(|v| v.value as usize).unwrap_or(4);
        let max_size = section.size("max_size", MAX_SIZE_LIMIT).map(|v| v.value).unwrap_or(16 << 20);
        let on_success = match section.string("on_success") {
            Some(v) if v.value == "move" => Some(OnSuccess::Move),
            Some(v) if v.value == "delete" => Some(OnSuccess::Delete),
            Some(v) => {
                section.error("on_success", format!("{:?} is not \"move\" or \"delete\"", v.value));
                None
            }
            None if section.has("on_success") => None,
            None => Some(OnSuccess::Move),
        };
        Some(Arc::new(FileInterface {
            spec,
            folder: folder?,
            pattern: pattern?,
            ignore: ignore?,
            settle,
            rescan,
            concurrency,
            max_size,
            on_success: on_success?,
        }))
    }
}

impl FileInterface {
    /// Whether a file named `name` is one to take: not hidden, not ignored, matching `pattern`.
    pub fn wanted(&self, name: &str) -> bool {
        !name.starts_with('.') && !self.ignore.iter().any(|g| glob(g, name)) && self.pattern.iter().any(|g| glob(g, name))
    }
}

impl Interface for FileInterface {
    fn spec(&self) -> &InterfaceSpec {
        &self.spec
    }

    fn start(self: Arc<Self>, host: Host) {
        let me = self.clone();
        rustomnic_interface::consumer::spawn(&self.spec, move || folder::run(me, host));
    }
}

/// Whether `name` matches the pattern `g`: `*` any run of characters (none included), `?` one
/// character, anything else itself.
pub fn glob(g: &str, name: &str) -> bool {
    let (p, s): (Vec<char>, Vec<char>) = (g.chars().collect(), name.chars().collect());
    // The classic two-pointer match with one backtrack point: linear in practice, never
    // exponential whatever the pattern.
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == s[si]) {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, si));
            pi += 1;
        } else if let Some((sp, ss)) = star {
            pi = sp + 1;
            si = ss + 1;
            star = Some((sp, ss + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob("*", "a.csv"));
        assert!(glob("*.csv", "a.csv"));
        assert!(glob("*.csv", ".csv"));
        assert!(!glob("*.csv", "a.csv.tmp"));
        assert!(glob("a?c", "abc"));
        assert!(!glob("a?c", "ac"));
        assert!(glob("*~", "notes~"));
        assert!(glob("r*t*.txt", "report-today.txt"));
        assert!(!glob("r*t*.txt", "report-today.csv"));
        assert!(glob("**a", "bba"));
        assert!(glob("é*", "été"));
    }
}
