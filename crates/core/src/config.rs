//! Config sections read from TOML with the file, line and key of every problem, and `${ENV}` expansion.
//!
//! Readers ask a [`Section`] for typed keys; every problem is recorded (not returned early) so that
//! `pmnc check` can list all of them at once, and keys nobody asked for are reported as unknown.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml_edit::{Item, TableLike};

/// One problem in a config file, located as precisely as the file allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: usize,
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}:{}: {}", self.file.display(), self.line, self.message)
        } else {
            write!(f, "{}:{}: {}: {}", self.file.display(), self.line, self.key, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

/// A value with the line it came from, for errors found after reading (a handler that does not
/// exist, a port used twice).
#[derive(Debug, Clone, PartialEq)]
pub struct Located<T> {
    pub value: T,
    pub file: PathBuf,
    pub line: usize,
    pub key: String,
}

impl<T> Located<T> {
    pub fn error(&self, message: impl Into<String>) -> ConfigError {
        ConfigError { file: self.file.clone(), line: self.line, key: self.key.clone(), message: message.into() }
    }
}

/// A parsed TOML file that keeps the source text for line numbers.
pub struct SourceFile {
    path: PathBuf,
    text: String,
    doc: toml_edit::Document<String>,
    errors: RefCell<Vec<ConfigError>>,
}

impl SourceFile {
    /// Parses `text`; a syntax error comes back with its line.
    pub fn parse(path: &Path, text: String) -> Result<SourceFile, ConfigError> {
        match toml_edit::Document::parse(text.clone()) {
            Ok(doc) => Ok(SourceFile { path: path.to_path_buf(), text, doc, errors: RefCell::new(Vec::new()) }),
            Err(e) => {
                let line = e.span().map(|s| line_of(&text, s.start)).unwrap_or(1);
                let message = e.message().trim().to_string();
                Err(ConfigError { file: path.to_path_buf(), line, key: String::new(), message: format!("TOML syntax error: {message}") })
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The top-level table.
    pub fn root(&self) -> Section<'_> {
        Section { file: self, table: self.doc.as_table(), path: String::new(), used: RefCell::new(BTreeSet::new()), line: 1 }
    }

    /// Records a problem found outside a section reader.
    pub fn push(&self, error: ConfigError) {
        self.errors.borrow_mut().push(error);
    }

    /// Every problem recorded so far, in file order.
    pub fn take_errors(&self) -> Vec<ConfigError> {
        let mut errors = std::mem::take(&mut *self.errors.borrow_mut());
        errors.sort_by(|a, b| a.line.cmp(&b.line).then(a.key.cmp(&b.key)));
        errors.dedup();
        errors
    }

    fn line(&self, span: Option<std::ops::Range<usize>>) -> usize {
        span.map(|s| line_of(&self.text, s.start)).unwrap_or(1)
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())].iter().filter(|b| **b == b'\n').count() + 1
}

/// A table of a config file being read; see the module docs.
pub struct Section<'a> {
    file: &'a SourceFile,
    table: &'a dyn TableLike,
    path: String,
    used: RefCell<BTreeSet<String>>,
    line: usize,
}

impl<'a> Section<'a> {
    /// The dotted path of this table ("interfaces.http"), empty at the top.
    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn file(&self) -> &'a SourceFile {
        self.file
    }

    /// The dotted name of `key` in this table.
    pub fn key_path(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{}", self.path, key)
        }
    }

    /// The line of `key` (of its value when present), or of the table itself.
    pub fn line_of(&self, key: &str) -> usize {
        match self.table.get_key_value(key) {
            Some((k, item)) => {
                let l = self.file.line(k.span());
                if l > 1 || item.span().is_none() {
                    l
                } else {
                    self.file.line(item.span())
                }
            }
            None => self.line,
        }
    }

    /// Records a problem with `key` of this table.
    pub fn error(&self, key: &str, message: impl Into<String>) {
        self.file.push(ConfigError { file: self.file.path.clone(), line: self.line_of(key), key: self.key_path(key), message: message.into() });
    }

    /// Records a problem with the table as a whole.
    pub fn table_error(&self, message: impl Into<String>) {
        self.file.push(ConfigError { file: self.file.path.clone(), line: self.line, key: self.path.clone(), message: message.into() });
    }

    pub fn has(&self, key: &str) -> bool {
        self.table.contains_key(key)
    }

    fn item(&self, key: &str) -> Option<&'a Item> {
        self.used.borrow_mut().insert(key.to_string());
        self.table.get(key)
    }

    fn located<T>(&self, key: &str, value: T) -> Located<T> {
        Located { value, file: self.file.path.clone(), line: self.line_of(key), key: self.key_path(key) }
    }

    fn kind(item: &Item) -> &'static str {
        match item {
            Item::None => "nothing",
            Item::Value(v) => v.type_name(),
            Item::Table(_) => "table",
            Item::ArrayOfTables(_) => "array of tables",
        }
    }

    /// A string, with `${NAME}` replaced by the environment variable NAME (`$${` for a literal).
    pub fn string(&self, key: &str) -> Option<Located<String>> {
        let item = self.item(key)?;
        match item.as_str() {
            Some(s) => match expand_env(s) {
                Ok(v) => Some(self.located(key, v)),
                Err(e) => {
                    self.error(key, e);
                    None
                }
            },
            None => {
                self.error(key, format!("expected a string, found {}", Self::kind(item)));
                None
            }
        }
    }

    pub fn bool(&self, key: &str) -> Option<Located<bool>> {
        let item = self.item(key)?;
        match item.as_bool() {
            Some(b) => Some(self.located(key, b)),
            None => {
                self.error(key, format!("expected true or false, found {}", Self::kind(item)));
                None
            }
        }
    }

    /// A whole number in `min..=max`.
    pub fn integer(&self, key: &str, min: i64, max: i64) -> Option<Located<i64>> {
        let item = self.item(key)?;
        match item.as_integer() {
            Some(n) if (min..=max).contains(&n) => Some(self.located(key, n)),
            Some(n) => {
                self.error(key, format!("{n} is out of range {min}..={max}"));
                None
            }
            None => {
                self.error(key, format!("expected a whole number, found {}", Self::kind(item)));
                None
            }
        }
    }

    /// A duration string such as "250ms" or "10s", at most `max`.
    pub fn duration(&self, key: &str, max: Duration) -> Option<Located<Duration>> {
        let s = self.string(key)?;
        match crate::parse_duration(&s.value) {
            Ok(d) if d.is_zero() => {
                self.error(key, "must be greater than zero");
                None
            }
            Ok(d) if d > max => {
                self.error(key, format!("{} is longer than the limit {}", s.value, crate::format_duration(max)));
                None
            }
            Ok(d) => Some(self.located(key, d)),
            Err(e) => {
                self.error(key, e);
                None
            }
        }
    }

    /// A byte size: a whole number or a string such as "64KiB"; at least 1 and at most `max`.
    pub fn size(&self, key: &str, max: u64) -> Option<Located<u64>> {
        let item = self.item(key)?;
        let parsed = if let Some(n) = item.as_integer() {
            u64::try_from(n).map_err(|_| format!("{n} is negative"))
        } else if let Some(s) = item.as_str() {
            crate::parse_size(s)
        } else {
            Err(format!("expected a size such as \"64KiB\", found {}", Self::kind(item)))
        };
        match parsed {
            Ok(0) => {
                self.error(key, "must be greater than zero");
                None
            }
            Ok(n) if n > max => {
                self.error(key, format!("{n} bytes is over the limit of {max} bytes"));
                None
            }
            Ok(n) => Some(self.located(key, n)),
            Err(e) => {
                self.error(key, e);
                None
            }
        }
    }

    /// A sub-table (header `[a.b]` or inline `{...}`).
    pub fn table(&self, key: &str) -> Option<Section<'a>> {
        let item = self.item(key)?;
        match item.as_table_like() {
            Some(t) => Some(Section {
                file: self.file,
                table: t,
                path: self.key_path(key),
                used: RefCell::new(BTreeSet::new()),
                line: self.line_of(key),
            }),
            None => {
                self.error(key, format!("expected a table, found {}", Self::kind(item)));
                None
            }
        }
    }

    /// Every key of this table whose value is a table, in file order, as sections.
    pub fn tables(&self) -> Vec<(String, Section<'a>)> {
        let keys: Vec<String> = self.table.iter().map(|(k, _)| k.to_string()).collect();
        keys.into_iter().filter_map(|k| self.table(&k).map(|s| (k, s))).collect()
    }

    /// The table's keys and values as written (nested tables included), in key order: equal
    /// fingerprints mean an unchanged table, so a reload can leave it alone.
    pub fn fingerprint(&self) -> String {
        let mut entries: Vec<String> = self.table.iter().map(|(k, item)| format!("{k}={}", item.to_string().trim())).collect();
        entries.sort();
        entries.join("\n")
    }

    /// Reports every key of this table that no reader asked for.
    pub fn finish(&self) {
        let used = self.used.borrow();
        for (key, _) in self.table.iter() {
            if !used.contains(key) {
                self.error(key, "unknown key");
            }
        }
    }

    /// Like [`finish`](Self::finish) and lists the keys this table accepts.
    pub fn finish_with(&self, known: &[&str]) {
        let used = self.used.borrow();
        for (key, _) in self.table.iter() {
            if !used.contains(key) {
                self.error(key, format!("unknown key (known keys here: {})", known.join(", ")));
            }
        }
    }
}

/// Replaces `${NAME}` with the environment variable NAME; `$${` stands for a literal `${`.
pub fn expand_env(text: &str) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos..];
        if let Some(tail) = after.strip_prefix("$${") {
            out.push_str("${");
            rest = tail;
        } else if let Some(tail) = after.strip_prefix("${") {
            let end = tail.find('}').ok_or_else(|| format!("unclosed ${{ in {text:?}"))?;
            let name = &tail[..end];
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!("bad environment variable name {name:?} in {text:?}"));
            }
            match std::env::var(name) {
                Ok(v) => out.push_str(&v),
                Err(_) => return Err(format!("environment variable {name} is not set")),
            }
            rest = &tail[end + 1..];
        } else {
            out.push('$');
            rest = &after[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> SourceFile {
        SourceFile::parse(Path::new("cage.toml"), text.to_string()).unwrap()
    }

    #[test]
    fn reads_typed_keys_with_lines() {
        let f = file("a = \"x\"\nt = \"250ms\"\n\n[interfaces.http]\nlisten = \"127.0.0.1:1\"\nlisen = 3\n");
        let root = f.root();
        assert_eq!(root.string("a").unwrap().value, "x");
        let t = root.duration("t", Duration::from_secs(60)).unwrap();
        assert_eq!((t.value, t.line), (Duration::from_millis(250), 2));
        let ifaces = root.table("interfaces").unwrap();
        let tables = ifaces.tables();
        assert_eq!(tables.len(), 1);
        let (name, http) = &tables[0];
        assert_eq!(name, "http");
        assert_eq!(http.string("listen").unwrap().line, 5);
        http.finish();
        root.finish();
        let errors = f.take_errors();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].line, 6);
        assert_eq!(errors[0].key, "interfaces.http.lisen");
        assert_eq!(errors[0].to_string(), "cage.toml:6: interfaces.http.lisen: unknown key");
    }

    #[test]
    fn wrong_types_and_bad_durations_are_recorded() {
        let f = file("a = 1\nt = \"ten seconds\"\nn = \"x\"\nz = \"0s\"\n");
        let root = f.root();
        assert!(root.string("a").is_none());
        assert!(root.duration("t", Duration::from_secs(60)).is_none());
        assert!(root.integer("n", 0, 5).is_none());
        assert!(root.duration("z", Duration::from_secs(60)).is_none());
        let errors = f.take_errors();
        assert_eq!(errors.len(), 4);
        assert!(errors[0].to_string().contains("cage.toml:1: a: expected a string, found integer"));
        assert!(errors[1].message.contains("does not start with a number"), "{}", errors[1]);
        assert_eq!(errors[1].line, 2);
        assert!(errors[3].message.contains("greater than zero"));
    }

    #[test]
    fn fingerprints_ignore_order_and_comments_but_not_values() {
        let a = file("[r]\nurl = \"x\"   # a comment\npool_size = 2\n");
        let b = file("[r]\npool_size = 2\nurl = \"x\"\n");
        let c = file("[r]\npool_size = 3\nurl = \"x\"\n");
        let fp = |f: &SourceFile| f.root().table("r").unwrap().fingerprint();
        assert_eq!(fp(&a), fp(&b));
        assert_ne!(fp(&b), fp(&c));
    }

    #[test]
    fn syntax_errors_have_lines() {
        let e = SourceFile::parse(Path::new("c.toml"), "a = 1\nb = = 2\n".into()).err().unwrap();
        assert_eq!(e.line, 2);
        assert!(e.to_string().starts_with("c.toml:2: TOML syntax error"), "{e}");
    }

    #[test]
    fn env_expansion() {
        std::env::set_var("RUSTOMNIC_TEST_VAR", "secret");
        assert_eq!(expand_env("a${RUSTOMNIC_TEST_VAR}b").unwrap(), "asecretb");
        assert_eq!(expand_env("cost $5 $${X}").unwrap(), "cost $5 ${X}");
        assert!(expand_env("${RUSTOMNIC_SURELY_UNSET_VAR}").unwrap_err().contains("is not set"));
        assert!(expand_env("${OPEN").unwrap_err().contains("unclosed"));
        assert!(expand_env("${a b}").unwrap_err().contains("bad environment"));
    }

    #[test]
    fn sizes_accept_numbers_and_units() {
        let f = file("a = 100\nb = \"2KiB\"\nc = -1\nd = true\n");
        let root = f.root();
        assert_eq!(root.size("a", 1000).unwrap().value, 100);
        assert_eq!(root.size("b", 10000).unwrap().value, 2048);
        assert!(root.size("c", 10).is_none());
        assert!(root.size("d", 10).is_none());
        assert_eq!(f.take_errors().len(), 2);
    }
}
