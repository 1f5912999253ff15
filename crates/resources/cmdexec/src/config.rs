//! Reading `[resources.NAME]` of protocol cmdexec: finding the executable, the fixed arguments
//! (an array, or one string split into words), the `env` table.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use rustomnic_core::{ConfigError, Section};

/// The executable named by `name`: an absolute path as is, a bare name through PATH. It must be
/// an executable file now; a relative path with a slash is refused since the runtime's working
/// folder is nobody's business.
pub fn find_executable(name: &str, path_var: Option<&str>) -> Result<PathBuf, String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.contains('/') {
        let p = Path::new(name);
        if !p.is_absolute() {
            return Err(format!("{name:?} must be an absolute path, or a bare name looked up in PATH"));
        }
        return check_executable(p).map(|_| p.to_path_buf());
    }
    let path_var = path_var.unwrap_or("");
    for dir in path_var.split(':').filter(|d| !d.is_empty()) {
        let candidate = Path::new(dir).join(name);
        if check_executable(&candidate).is_ok() {
            return Ok(candidate);
        }
    }
    Err(format!("{name} was not found in PATH ({})", if path_var.is_empty() { "empty" } else { path_var }))
}

fn check_executable(p: &Path) -> Result<(), String> {
    let meta = std::fs::metadata(p).map_err(|e| format!("{}: {}", p.display(), plain(&e)))?;
    if !meta.is_file() {
        return Err(format!("{} is not a file", p.display()));
    }
    if meta.permissions().mode() & 0o111 == 0 {
        return Err(format!("{} is not executable", p.display()));
    }
    Ok(())
}

/// The OS message without Rust's " (os error 2)" tail.
pub fn plain(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.rfind(" (os error ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// Splits `text` into words the way a shell splits a command line, and does nothing else: no
/// variables, globs or redirections, since no shell ever runs. Quotes group (`'...'` literally,
/// `"..."` with `\"` and `\\`), a backslash outside quotes takes the next character as is.
pub fn split_words(text: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => word.push(c),
                        None => return Err("a ' quote is not closed".into()),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\')) => word.push(c),
                            Some(c) => {
                                word.push('\\');
                                word.push(c);
                            }
                            None => return Err("a \" quote is not closed".into()),
                        },
                        Some(c) => word.push(c),
                        None => return Err("a \" quote is not closed".into()),
                    }
                }
            }
            '\\' => {
                in_word = true;
                match chars.next() {
                    Some(c) => word.push(c),
                    None => return Err("it ends with a lone \\".into()),
                }
            }
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if in_word {
        words.push(word);
    }
    Ok(words)
}

/// Reads `args`: an array of strings, each one argument as written (the preferred form), or one
/// string split into words (see [`split_words`]), the form of older configs.
pub fn fixed_args(section: &Section) -> Vec<String> {
    match section.kind_of("args") {
        None => Vec::new(),
        Some("string") => {
            let Some(text) = section.string("args") else { return Vec::new() };
            match split_words(&text.value) {
                Ok(words) => {
                    if words.iter().any(|w| w.contains('\0')) {
                        section.error("args", "an argument contains a NUL byte");
                        return Vec::new();
                    }
                    words
                }
                Err(e) => {
                    section.error("args", e);
                    Vec::new()
                }
            }
        }
        // Anything else is read as the array; its error names the preferred form.
        Some(_) => {
            let Some(list) = section.strings("args") else { return Vec::new() };
            // A TOML string can hold \u0000, which no argument of exec(2) can.
            let mut clean = true;
            for (i, arg) in list.value.iter().enumerate() {
                if arg.contains('\0') {
                    section.file().push(ConfigError { key: format!("{}[{i}]", list.key), ..list.error("contains a NUL byte") });
                    clean = false;
                }
            }
            if clean {
                list.value
            } else {
                Vec::new()
            }
        }
    }
}

/// Reads `env`, a table of NAME = "value" strings (`${VAR}` expanded as everywhere).
pub fn env_table(section: &Section) -> Vec<(String, String)> {
    let Some(vars) = section.string_map("env") else {
        return Vec::new();
    };
    // string_map has found a table; as a section it gives each name its own line in the errors.
    let Some(table) = section.table("env") else {
        return Vec::new();
    };
    let mut out = Vec::with_capacity(vars.value.len());
    for (name, value) in vars.value {
        if name.is_empty() || name.contains('=') || name.contains('\0') {
            table.error(&name, "is not a valid environment variable name");
        } else if value.contains('\0') {
            table.error(&name, "the value contains a NUL byte");
        } else {
            out.push((name, value));
        }
    }
    out
}

/// A folder option (`cwd`), relative to the folder holding cage.toml; it must exist now.
pub fn folder(section: &Section, key: &str) -> Option<PathBuf> {
    let given = section.string(key)?;
    let base = section.file().path().parent().unwrap_or(Path::new(""));
    let path = base.join(&given.value);
    match std::fs::metadata(&path) {
        Ok(m) if m.is_dir() => Some(path),
        Ok(_) => {
            section.error(key, format!("{} is not a folder", path.display()));
            None
        }
        Err(e) => {
            section.error(key, format!("{}: {}", path.display(), plain(&e)));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_split_like_a_shell_without_expansion() {
        let w = |s: &str| split_words(s).unwrap();
        assert_eq!(w("  -a  b\tc "), ["-a", "b", "c"]);
        assert_eq!(w(r#"-c 'echo $HOME; ls *' "a \"b\" \\ \n" x\ y '' """#), ["-c", "echo $HOME; ls *", "a \"b\" \\ \\n", "x y", "", ""]);
        assert_eq!(w("a'b'\"c\""), ["abc"]);
        assert!(w("").is_empty());
        assert!(split_words("'open").unwrap_err().contains("not closed"));
        assert!(split_words("\"open").unwrap_err().contains("not closed"));
        assert!(split_words("end\\").unwrap_err().contains("lone"));
    }

    #[test]
    fn executables_are_found_in_path() {
        assert_eq!(find_executable("sh", Some("/nonexistent::/bin:/usr/bin")).unwrap(), Path::new("/bin/sh"));
        assert!(find_executable("surely-not-a-command-xyz", Some("/bin")).unwrap_err().contains("was not found in PATH (/bin)"));
        assert!(find_executable("bin/sh", Some("/")).unwrap_err().contains("must be an absolute path"));
        assert!(find_executable("/etc/passwd", None).unwrap_err().contains("is not executable"));
        assert!(find_executable("/bin", None).unwrap_err().contains("is not a file"));
        assert!(find_executable("/nonexistent/x", None).unwrap_err().contains("No such file or directory"));
    }
}
