//! The `[tracing]` table of cage.toml: where the cage's spans go and how many of its traces are
//! kept.
//!
//! ```toml
//! [tracing]
//! endpoint = "http://127.0.0.1:4318"     # OTLP/HTTP receiver; /v1/traces is added when no path is given
//! sampling = 0.1                         # share of new traces kept, 0..=1 (default 1); a request
//!                                        # whose traceparent says sampled is always kept
//! service_name = "billing"               # default: the cage's name
//! headers = { authorization = "Bearer ${OTLP_TOKEN}" }   # sent with every export (optional)
//! timeout = "10s"                        # one export's limit (default 10s, at most 60s)
//! ```

use std::time::Duration;

use rustomnic_core::Section;

/// A cage's tracing settings.
#[derive(Debug, Clone, PartialEq)]
pub struct TracingConfig {
    pub endpoint: Endpoint,
    pub sampling: f64,
    pub service_name: String,
    pub headers: Vec<(String, String)>,
    pub timeout: Duration,
}

/// An OTLP/HTTP endpoint split into what a connection needs.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// `host:port` to connect to.
    pub authority: String,
    /// The request path, `/v1/traces` unless the URL names one.
    pub path: String,
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "http://{}{}", self.authority, self.path)
    }
}

/// Reads an endpoint URL: `http://host[:port][/path]` (port 4318, OTLP/HTTP's, when absent).
pub fn parse_endpoint(url: &str) -> Result<Endpoint, String> {
    let rest = if let Some(r) = url.strip_prefix("http://") {
        r
    } else if url.starts_with("https://") {
        return Err("https endpoints are not supported yet: send to a local receiver (such as the OpenTelemetry Collector) over http://".into());
    } else {
        return Err(format!("expected an http:// URL such as \"http://127.0.0.1:4318\", found {url:?}"));
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if authority.is_empty() || authority.contains('@') || authority.chars().any(|c| c.is_whitespace()) {
        return Err(format!("{url:?} has no usable host"));
    }
    let authority = match authority.rsplit_once(':') {
        // A port after the last colon (an IPv6 literal without one ends with `]`).
        Some((host, port)) if !port.contains(']') => {
            if host.is_empty() || !port.parse::<u16>().is_ok_and(|p| p > 0) {
                return Err(format!("{url:?}: the port {port:?} is not a number from 1 to 65535"));
            }
            authority.to_string()
        }
        _ => format!("{authority}:4318"),
    };
    let path = if path.is_empty() || path == "/" { "/v1/traces".to_string() } else { path.to_string() };
    if path.len() > 1024 || path.chars().any(|c| c.is_control() || c == ' ') {
        return Err(format!("{url:?}: the path is not usable in a request"));
    }
    Ok(Endpoint { authority, path })
}

/// Reads `[tracing]`; every problem is recorded in the section (file, line, key).
pub fn read(section: &Section, cage: &str) -> Option<TracingConfig> {
    let endpoint = section.required_parsed("endpoint", "http://127.0.0.1:4318", parse_endpoint);
    let sampling = section.number("sampling", 0.0, 1.0).map(|l| l.value).unwrap_or(1.0);
    let service_name = match section.string("service_name") {
        Some(s) if s.value.trim().is_empty() || s.value.len() > 256 => {
            section.error("service_name", "must be a non-empty name of at most 256 bytes");
            None
        }
        Some(s) => Some(s.value),
        None => Some(cage.to_string()),
    };
    let headers = section.string_map("headers").map(|l| l.value).unwrap_or_default();
    for (name, value) in &headers {
        let bad_name = name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b));
        if bad_name || value.bytes().any(|b| b == b'\r' || b == b'\n') {
            section.error("headers", format!("header {name:?} is not a usable HTTP header"));
        }
    }
    let timeout = section.duration("timeout", Duration::from_secs(60)).map(|l| l.value).unwrap_or(Duration::from_secs(10));
    section.finish_with(&["endpoint", "sampling", "service_name", "headers", "timeout"]);
    Some(TracingConfig { endpoint: endpoint?, sampling, service_name: service_name?, headers, timeout })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustomnic_core::SourceFile;
    use std::path::Path;

    fn parse(text: &str) -> (Option<TracingConfig>, Vec<String>) {
        let file = SourceFile::parse(Path::new("cage.toml"), text.to_string()).unwrap();
        let root = file.root();
        let section = root.table("tracing").unwrap();
        let config = read(&section, "billing");
        (config, file.take_errors().iter().map(|e| e.to_string()).collect())
    }

    #[test]
    fn defaults_and_path() {
        let (c, errors) = parse("[tracing]\nendpoint = \"http://127.0.0.1\"\n");
        assert!(errors.is_empty(), "{errors:?}");
        let c = c.unwrap();
        assert_eq!(c.endpoint, Endpoint { authority: "127.0.0.1:4318".into(), path: "/v1/traces".into() });
        assert_eq!(c.sampling, 1.0);
        assert_eq!(c.service_name, "billing");
        assert_eq!(c.timeout, Duration::from_secs(10));
        let (c, _) = parse("[tracing]\nendpoint = \"http://collector:9999/otlp/traces\"\nsampling = 0.5\nservice_name = \"pay\"\n");
        let c = c.unwrap();
        assert_eq!(c.endpoint.to_string(), "http://collector:9999/otlp/traces");
        assert_eq!((c.sampling, c.service_name.as_str()), (0.5, "pay"));
    }

    #[test]
    fn problems_name_their_key_and_line() {
        let (c, errors) = parse("[tracing]\nendpoint = \"https://x\"\nsampling = 2\nextra = 1\n");
        assert!(c.is_none());
        assert!(errors.iter().any(|e| e.starts_with("cage.toml:2: tracing.endpoint: https endpoints are not supported")), "{errors:?}");
        assert!(errors.iter().any(|e| e.starts_with("cage.toml:3: tracing.sampling: 2 is out of range")), "{errors:?}");
        assert!(errors.iter().any(|e| e.starts_with("cage.toml:4: tracing.extra: unknown key")), "{errors:?}");
        let (_, errors) = parse("[tracing]\n");
        assert!(errors.iter().any(|e| e.contains("endpoint is required")), "{errors:?}");
        let (_, errors) = parse("[tracing]\nendpoint = \"http://h:99999\"\n");
        assert!(errors.iter().any(|e| e.contains("is not a number from 1 to 65535")), "{errors:?}");
        let (_, errors) = parse("[tracing]\nendpoint = \"http://h:1\"\nheaders = { \"a b\" = \"x\" }\n");
        assert!(errors.iter().any(|e| e.contains("is not a usable HTTP header")), "{errors:?}");
    }
}
