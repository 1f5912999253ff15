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

    /// Parses a file's bytes: text that is not UTF-8 is refused with the line of its first bad
    /// byte (and the byte itself), then as [`parse`](Self::parse).
    pub fn from_bytes(path: &Path, bytes: Vec<u8>) -> Result<SourceFile, ConfigError> {
        match String::from_utf8(bytes) {
            Ok(text) => SourceFile::parse(path, text),
            Err(e) => {
                let bytes = e.as_bytes();
                let at = e.utf8_error().valid_up_to();
                let line = bytes[..at].iter().filter(|b| **b == b'\n').count() + 1;
                let column = at - bytes[..at].iter().rposition(|b| *b == b'\n').map_or(0, |p| p + 1) + 1;
                let message = match bytes.get(at) {
                    Some(b) if e.utf8_error().error_len().is_some() => format!("not UTF-8 text: byte 0x{b:02x} at column {column} (byte {})", at + 1),
                    _ => format!("not UTF-8 text: the file ends inside a character at column {column}"),
                };
                Err(ConfigError { file: path.to_path_buf(), line, key: String::new(), message })
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

/// The most elements of a [`Section::strings`] list or entries of a [`Section::string_map`]
/// table. Such lists are written by hand, so a longer one is a mistake (a generated file, a
/// runaway include) better refused at `pmnc check` than carried into every request.
const MAX_ENTRIES: usize = 1000;

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

    /// Reads the required string at `key` and parses it (a url, an address): a missing key is
    /// reported as required with `example` (`key = "..."`), a bad value with the parser's
    /// error, each at its file, line and key; the value's text stays out of the message, as a
    /// url may hold a password.
    pub fn required_parsed<T>(&self, key: &str, example: &str, parse: impl FnOnce(&str) -> Result<T, String>) -> Option<T> {
        let Some(text) = self.string(key) else {
            // Present but unreadable (wrong type, unset ${ENV}): that problem is already recorded.
            if !self.has(key) {
                self.table_error(format!("{key} is required, e.g. {key} = {example:?}"));
            }
            return None;
        };
        parse(&text.value).map_err(|e| self.error(key, e)).ok()
    }

    /// A required list of strings at `key` that must name at least one item (else `empty` is
    /// the error), each item passing `check` (each failure recorded at the key). `example` is
    /// the list as it would be written (`["orders"]`). `None` when anything is wrong; every
    /// problem is recorded.
    pub fn required_list(&self, key: &str, example: &str, empty: &str, check: impl Fn(&str) -> Result<(), String>) -> Option<Vec<String>> {
        let Some(list) = self.strings(key) else {
            // Present but unreadable (wrong type): that problem is already recorded.
            if !self.has(key) {
                self.table_error(format!("{key} is required, e.g. {key} = {example}"));
            }
            return None;
        };
        if list.value.is_empty() {
            self.error(key, empty);
            return None;
        }
        let mut ok = true;
        for item in &list.value {
            if let Err(e) = check(item) {
                self.error(key, e);
                ok = false;
            }
        }
        ok.then_some(list.value)
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

    /// A number (whole or not) in `min..=max`.
    pub fn number(&self, key: &str, min: f64, max: f64) -> Option<Located<f64>> {
        let item = self.item(key)?;
        let n = item.as_float().or_else(|| item.as_integer().map(|i| i as f64));
        match n {
            Some(n) if n >= min && n <= max => Some(self.located(key, n)),
            Some(n) => {
                self.error(key, format!("{n} is out of range {min}..={max}"));
                None
            }
            None => {
                self.error(key, format!("expected a number, found {}", Self::kind(item)));
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

    /// The TOML type of `key`'s value ("string", "array", "inline table", "table", ...), or None
    /// when it is absent. It does not count as reading the key: it is for keys that accept more
    /// than one form, which look first and then read with the getter of that form.
    pub fn kind_of(&self, key: &str) -> Option<&'static str> {
        self.table.get(key).map(Self::kind)
    }

    /// An array of strings, each with `${NAME}` expanded as in [`string`](Self::string).
    ///
    /// A bad element is reported as `key[i]` (counted from 0, as in TOML tools) on its own line,
    /// every one of them, and the whole key then reads as None: a list with a hole in it would
    /// shift the elements after it.
    pub fn strings(&self, key: &str) -> Option<Located<Vec<String>>> {
        let item = self.item(key)?;
        let Some(array) = item.as_array() else {
            self.error(key, format!("expected an array of strings, found {}", Self::kind(item)));
            return None;
        };
        if array.len() > MAX_ENTRIES {
            self.error(key, format!("has {} elements, more than the limit of {MAX_ENTRIES}", array.len()));
            return None;
        }
        let mut out = Vec::with_capacity(array.len());
        let mut failed = false;
        for (i, value) in array.iter().enumerate() {
            let found = match value.as_str() {
                Some(s) => expand_env(s),
                None => Err(format!("expected a string, found {}", value.type_name())),
            };
            match found {
                Ok(v) => out.push(v),
                Err(message) => {
                    failed = true;
                    // The element's own line: a long list is often written one element a line.
                    let line = match value.span() {
                        Some(span) => self.file.line(Some(span)),
                        None => self.line_of(key),
                    };
                    self.file.push(ConfigError { file: self.file.path.clone(), line, key: format!("{}[{i}]", self.key_path(key)), message });
                }
            }
        }
        if failed {
            None
        } else {
            Some(self.located(key, out))
        }
    }

    /// A table whose keys are names chosen by the user (headers, environment variables) and whose
    /// values are all strings, `${NAME}` expanded; in file order. Header (`[a.b]`) and inline
    /// (`{...}`) tables both work.
    ///
    /// Every key of the table is taken, so none of them is an "unknown key". A value that is not
    /// a string is reported under its own key (`headers.X-Trace`), every one of them, and the
    /// whole key then reads as None.
    pub fn string_map(&self, key: &str) -> Option<Located<Vec<(String, String)>>> {
        let item = self.item(key)?;
        let Some(table) = item.as_table_like() else {
            self.error(key, format!("expected a table of strings, found {}", Self::kind(item)));
            return None;
        };
        if table.len() > MAX_ENTRIES {
            self.error(key, format!("has {} entries, more than the limit of {MAX_ENTRIES}", table.len()));
            return None;
        }
        // As a section of its own, each problem gets the sub-key's path and line.
        let sub = self.child(key, table);
        let mut out = Vec::with_capacity(table.len());
        let mut failed = false;
        for (name, _) in table.iter() {
            match sub.string(name) {
                Some(value) => out.push((name.to_string(), value.value)),
                None => failed = true,
            }
        }
        if failed {
            None
        } else {
            Some(self.located(key, out))
        }
    }

    /// A sub-table (header `[a.b]` or inline `{...}`).
    pub fn table(&self, key: &str) -> Option<Section<'a>> {
        let item = self.item(key)?;
        match item.as_table_like() {
            Some(t) => Some(self.child(key, t)),
            None => {
                self.error(key, format!("expected a table, found {}", Self::kind(item)));
                None
            }
        }
    }

    fn child(&self, key: &str, table: &'a dyn TableLike) -> Section<'a> {
        Section { file: self.file, table, path: self.key_path(key), used: RefCell::new(BTreeSet::new()), line: self.line_of(key) }
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
    fn bytes_that_are_not_utf8_are_located() {
        let e = SourceFile::from_bytes(Path::new("c.toml"), b"a = 1\nb = \"x\xffy\"\n".to_vec()).err().unwrap();
        assert_eq!(e.to_string(), "c.toml:2: not UTF-8 text: byte 0xff at column 7 (byte 13)");
        let e = SourceFile::from_bytes(Path::new("c.toml"), b"a = \"\xe2\x82".to_vec()).err().unwrap();
        assert_eq!((e.line, e.message.contains("ends inside a character")), (1, true), "{e}");
        assert!(SourceFile::from_bytes(Path::new("c.toml"), "a = \"\u{e9}\"".as_bytes().to_vec()).is_ok());
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

    /// The recorded problems as `pmnc check` prints them.
    fn messages(f: &SourceFile) -> Vec<String> {
        f.take_errors().iter().map(|e| e.to_string()).collect()
    }

    #[test]
    fn string_lists_are_read_with_env_expansion() {
        std::env::set_var("RUSTOMNIC_TEST_LIST_VAR", "hi");
        let f = file("args = [\"-c\", \"echo ${RUSTOMNIC_TEST_LIST_VAR}\"]\nnone = []\n\n[r]\nlong = [\n  \"a\",\n  \"b\",  # a comment\n]\n");
        let root = f.root();
        let args = root.strings("args").unwrap();
        assert_eq!((args.value, args.line, args.key.as_str()), (vec!["-c".to_string(), "echo hi".to_string()], 1, "args"));
        assert_eq!(root.strings("none").unwrap().value, Vec::<String>::new());
        assert!(root.strings("absent").is_none());
        let r = root.table("r").unwrap();
        let long = r.strings("long").unwrap();
        assert_eq!((long.value, long.line, long.key.as_str()), (vec!["a".to_string(), "b".to_string()], 5, "r.long"));
        r.finish();
        root.finish();
        assert_eq!(messages(&f), Vec::<String>::new());
    }

    #[test]
    fn bad_string_lists_name_the_element_and_its_line() {
        let f = file("[r]\nargs = [\n  \"a\",\n  1,\n  \"b\",\n  true,\n]\nword = \"-l\"\ntable = { a = \"x\" }\nenv = [\"${RUSTOMNIC_SURELY_UNSET_VAR}\"]\nnested = [[\"x\"]]\n");
        let r = f.root().table("r").unwrap();
        assert!(r.strings("args").is_none(), "one bad element spoils the list");
        assert!(r.strings("word").is_none());
        assert!(r.strings("table").is_none());
        assert!(r.strings("env").is_none());
        assert!(r.strings("nested").is_none());
        r.finish();
        assert_eq!(
            messages(&f),
            [
                "cage.toml:4: r.args[1]: expected a string, found integer",
                "cage.toml:6: r.args[3]: expected a string, found boolean",
                "cage.toml:8: r.word: expected an array of strings, found string",
                "cage.toml:9: r.table: expected an array of strings, found inline table",
                "cage.toml:10: r.env[0]: environment variable RUSTOMNIC_SURELY_UNSET_VAR is not set",
                "cage.toml:11: r.nested[0]: expected a string, found array",
            ]
        );
    }

    #[test]
    fn string_lists_have_a_limit() {
        let list = |n: usize| format!("[{}]", vec!["\"x\""; n].join(", "));
        let f = file(&format!("most = {}\ntoo_many = {}\n", list(1000), list(1001)));
        let root = f.root();
        assert_eq!(root.strings("most").unwrap().value.len(), 1000);
        assert!(root.strings("too_many").is_none());
        assert_eq!(messages(&f), ["cage.toml:2: too_many: has 1001 elements, more than the limit of 1000"]);
    }

    #[test]
    fn string_maps_are_read_in_file_order_from_inline_and_header_tables() {
        std::env::set_var("RUSTOMNIC_TEST_MAP_VAR", "t0k");
        let f = file(
            "[r]\nheaders = { Authorization = \"Bearer ${RUSTOMNIC_TEST_MAP_VAR}\", X-Trace = \"1\", \"a b\" = \"\" }\nempty = {}\n\n[r.env]\nZED = \"z\"\nALPHA = \"a\"\n",
        );
        let root = f.root();
        let r = root.table("r").unwrap();
        let headers = r.string_map("headers").unwrap();
        let pairs = |v: &[(&str, &str)]| v.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<Vec<_>>();
        assert_eq!(headers.value, pairs(&[("Authorization", "Bearer t0k"), ("X-Trace", "1"), ("a b", "")]));
        assert_eq!((headers.line, headers.key.as_str()), (2, "r.headers"));
        assert_eq!(r.string_map("empty").unwrap().value, pairs(&[]));
        let env = r.string_map("env").unwrap();
        assert_eq!(env.value, pairs(&[("ZED", "z"), ("ALPHA", "a")]), "file order, not sorted");
        assert_eq!(env.line, 5);
        assert!(r.string_map("absent").is_none());
        // The user's names are not unknown keys of r, nor of anything else.
        r.finish();
        root.finish();
        assert_eq!(messages(&f), Vec::<String>::new());
    }

    #[test]
    fn bad_string_maps_name_the_sub_key_and_its_line() {
        let f = file(
            "[r]\ninline = { a = 1, b = \"x\", c = [\"y\"], d = { e = \"f\" } }\nword = \"X: 1\"\nlist = [\"a\"]\nenv = { T = \"${RUSTOMNIC_SURELY_UNSET_VAR}\" }\n\n[r.h]\nok = \"fine\"\nnum = 2.5\n\n[r.h.sub]\ny = \"z\"\n",
        );
        let r = f.root().table("r").unwrap();
        assert!(r.string_map("inline").is_none(), "one bad value spoils the table");
        assert!(r.string_map("word").is_none());
        assert!(r.string_map("list").is_none());
        assert!(r.string_map("env").is_none());
        assert!(r.string_map("h").is_none());
        r.finish();
        assert_eq!(
            messages(&f),
            [
                "cage.toml:2: r.inline.a: expected a string, found integer",
                "cage.toml:2: r.inline.c: expected a string, found array",
                "cage.toml:2: r.inline.d: expected a string, found inline table",
                "cage.toml:3: r.word: expected a table of strings, found string",
                "cage.toml:4: r.list: expected a table of strings, found array",
                "cage.toml:5: r.env.T: environment variable RUSTOMNIC_SURELY_UNSET_VAR is not set",
                "cage.toml:9: r.h.num: expected a string, found float",
                "cage.toml:11: r.h.sub: expected a string, found table",
            ]
        );
    }

    #[test]
    fn string_maps_have_a_limit() {
        let table = |n: usize| format!("{{ {} }}", (0..n).map(|i| format!("k{i} = \"v\"")).collect::<Vec<_>>().join(", "));
        let f = file(&format!("most = {}\ntoo_many = {}\n", table(1000), table(1001)));
        let root = f.root();
        assert_eq!(root.string_map("most").unwrap().value.len(), 1000);
        assert!(root.string_map("too_many").is_none());
        root.finish();
        assert_eq!(messages(&f), ["cage.toml:2: too_many: has 1001 entries, more than the limit of 1000"]);
    }

    #[test]
    fn kind_of_looks_without_reading() {
        let f = file("a = \"x\"\nb = [1]\nc = { d = 1 }\n[t]\n");
        let root = f.root();
        let kinds: Vec<_> = ["a", "b", "c", "t", "absent"].iter().map(|k| root.kind_of(k)).collect();
        assert_eq!(kinds, [Some("string"), Some("array"), Some("inline table"), Some("table"), None]);
        assert!(root.table("t").is_some());
        root.finish();
        let errors = messages(&f);
        assert_eq!(errors, ["cage.toml:1: a: unknown key", "cage.toml:2: b: unknown key", "cage.toml:3: c: unknown key"]);
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
