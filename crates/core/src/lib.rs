//! Shared types of Rustomnic: the value model, durations, config sections with locations, errors.

pub mod config;
pub mod duration;
pub mod fnv;
pub mod metrics;
pub mod value;

pub use config::{ConfigError, Located, Section, SourceFile};
pub use duration::{format_duration, parse_duration, parse_size};
pub use value::Value;

/// Names of cages, modules, interfaces and resources: an ASCII letter or `_`
/// first, then letters, digits, `_` or `-` (cages only may use `-`).
pub fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    match chars.next() {
        Some(c) if c.is_ascii_alphabetic() || c == '_' => {}
        _ => return false,
    }
    chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Cage names may also contain `-` and `.` is never allowed: they become NATS subjects later.
pub fn is_cage_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// This machine's host name (the kernel's, else /etc/hostname, else $HOSTNAME), as the cluster
/// view and the Celery events name it.
pub fn hostname() -> String {
    for path in ["/proc/sys/kernel/hostname", "/etc/hostname"] {
        if let Ok(s) = std::fs::read_to_string(path) {
            let s = s.trim();
            if !s.is_empty() {
                return s.to_string();
            }
        }
    }
    std::env::var("HOSTNAME").unwrap_or_else(|_| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers() {
        assert!(is_identifier("util"));
        assert!(is_identifier("_private2"));
        assert!(!is_identifier("2fast"));
        assert!(!is_identifier("a-b"));
        assert!(!is_identifier(""));
        assert!(is_cage_name("web-1"));
        assert!(!is_cage_name(".shared"));
        assert!(!is_cage_name("a.b"));
    }
}
