//! The error type of the cage runtime.

use rustomnic_core::ConfigError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Problems found in config files or modules, each naming its file and line.
    #[error("{}", list(.0))]
    Invalid(Vec<String>),
    #[error("{0}")]
    Io(String),
    #[error("{0}")]
    Runtime(String),
}

fn list(problems: &[String]) -> String {
    let mut out = String::new();
    for p in problems {
        out.push_str(p);
        out.push('\n');
    }
    out.push_str(&format!("{} problem{} found", problems.len(), if problems.len() == 1 { "" } else { "s" }));
    out
}

impl From<Vec<ConfigError>> for Error {
    fn from(errors: Vec<ConfigError>) -> Self {
        Error::Invalid(errors.into_iter().map(|e| e.to_string()).collect())
    }
}
