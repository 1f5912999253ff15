//! `cage.toml`: the cage's name, default request timeout, log level and interfaces.
//!
//! ```toml
//! name = "web"                     # default: the folder name
//! request_timeout = "10s"          # default deadline of every request (default 10s, at most 1h)
//! log_level = "info"               # error, warn, info, debug or trace (default info)
//! log_format = "text"              # text, or json: one JSON object per line (decision 145)
//! drain_delay = "3s"               # at a stop, /readyz says 503 this long before the listeners
//!                                  # close, so balancers stop sending first (default 3s, "0s"
//!                                  # for none; only once /readyz has been asked; decision 144)
//!
//! [interfaces.http]                # an interface named "http"
//! protocol = "http"                # default: the interface name
//! handler = "http.handle"          # module.function, default "<interface>.handle"
//! request_timeout = "5s"           # default: the cage's request_timeout
//! # ... keys of the protocol, see docs/interfaces/<protocol>.md
//!
//! [resources.db]                   # a resource named "db": xa.db.execute(...)
//! protocol = "postgresql"          # default: the resource name
//! pool_size = 8                    # connections per process, split over the workers
//! min_idle = 0                     # standby connections per worker
//! idle_timeout = "60s"             # idle connections older than this are closed
//! max_age = "30m"                  # connections older than this are closed when returned
//! connect_timeout = "5s"
//! breaker_failures = 5             # failed connects in a row that open the circuit breaker
//! breaker_cooldown = "5s"          # how long calls then fail at once before a probe
//! # ... keys of the protocol, see docs/resources/<protocol>.md
//!
//! [cluster]                        # join other processes over NATS, see docs/cluster.md
//! url = "nats://127.0.0.1:4222"
//!
//! [tracing]                        # spans of this cage's requests over OTLP/HTTP (docs/tracing.md)
//! endpoint = "http://127.0.0.1:4318"
//!
//! [lua]                            # what module code may use (docs/decisions/004-lua-sandbox.md)
//! memory_limit = "1GiB"            # per VM: one cage on one worker thread (default 1 GiB)
//! request_memory_limit = "64MiB"   # what one request may add to its VM (default 64 MiB)
//! unyielding_limit = "20ms"        # Lua code run by C code (a metamethod, a message handler),
//!                                  # where it cannot yield, is stopped after this (default 20ms)
//! getenv = ["HOME", "APP_*"]       # what os.getenv may read: names, or prefixes ending with *;
//!                                  # default none (os.getenv returns nil)
//! ```

use std::sync::Arc;
use std::time::Duration;

use rustomnic_core::{ConfigError, Located, SourceFile};

use crate::app::CageDir;
use crate::interface::Protocols;
use rustomnic_interface::{Interface, InterfaceSpec};

/// The longest request timeout accepted anywhere.
pub const MAX_REQUEST_TIMEOUT: Duration = Duration::from_secs(3600);
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
pub const LOG_LEVELS: &[&str] = &["error", "warn", "info", "debug", "trace"];
pub const LOG_FORMATS: &[&str] = &["text", "json"];
/// How long a stop keeps the listeners open after `/readyz` turned 503, unless `drain_delay`
/// says otherwise.
pub const DEFAULT_DRAIN_DELAY: Duration = Duration::from_secs(3);
/// The longest `drain_delay` accepted.
pub const MAX_DRAIN_DELAY: Duration = Duration::from_secs(300);

/// A cage's config, read and checked.
pub struct CageConfig {
    pub name: String,
    pub dir: CageDir,
    pub request_timeout: Duration,
    pub log_level: Option<String>,
    /// `log_format`: "text" or "json" (process-wide: the cages of a process must agree).
    pub log_format: Option<String>,
    /// `drain_delay`: how long a stop keeps listening after `/readyz` turned 503 (the process
    /// takes the longest of its cages').
    pub drain_delay: Option<Duration>,
    pub interfaces: Vec<Arc<dyn Interface>>,
    pub resources: Vec<rustomnic_resource::ResourceConfig>,
    /// `[cluster]`, with the line of its table (every cage of a process must agree on it).
    pub cluster: Option<Located<rustomnic_cluster::ClusterConfig>>,
    /// `[monitor]`, when the file has the table (docs/monitoring.md).
    pub monitor: Option<rustomnic_monitor::MonitorConfig>,
    /// `[queues.NAME]`: the queues this cage accepts durable calls on (docs/queues.md).
    pub queues: Vec<rustomnic_queue::QueueConfig>,
    /// The SQLite file of the cage's state, which holds its queue too.
    pub state_file: std::path::PathBuf,
    /// `[lua]`: the limits of the cage's Lua VMs.
    pub lua: rustomnic_lua::LuaLimits,
    /// `[tracing]`: where the cage's spans go (read at start; a change needs a restart).
    pub tracing: Option<rustomnic_telemetry::TracingConfig>,
}

/// Reads `cage.toml` of `dir`. Every problem is returned, each with file, line and key.
pub fn load_cage(dir: &CageDir, protocols: &Protocols) -> Result<CageConfig, Vec<ConfigError>> {
    let path = dir.config_file();
    let text = std::fs::read(&path).map_err(|e| vec![ConfigError { file: path.clone(), line: 1, key: String::new(), message: format!("cannot read: {e}") }])?;
    parse_cage(dir, text, protocols)
}

/// Reads the bytes of `dir`'s cage.toml, as [`load_cage`] does after reading the file (the
/// config fuzz target runs the real readers through here).
pub fn parse_cage(dir: &CageDir, text: Vec<u8>, protocols: &Protocols) -> Result<CageConfig, Vec<ConfigError>> {
    let path = dir.config_file();
    if text.len() > 1 << 20 {
        return Err(vec![ConfigError { file: path, line: 1, key: String::new(), message: "over 1 MiB; this is not a cage.toml".into() }]);
    }
    let file = SourceFile::from_bytes(&path, text).map_err(|e| vec![e])?;
    let config = read(&file, dir, protocols);
    let errors = file.take_errors();
    match config {
        Some(c) if errors.is_empty() => Ok(c),
        _ => Err(errors),
    }
}

fn read(file: &SourceFile, dir: &CageDir, protocols: &Protocols) -> Option<CageConfig> {
    let root = file.root();
    let name = match root.string("name") {
        Some(n) if rustomnic_core::is_cage_name(&n.value) => n.value,
        Some(n) => {
            root.error("name", format!("{:?} is not a valid cage name (letters, digits, _ and -, at most 64)", n.value));
            dir.folder_name.clone()
        }
        None => dir.folder_name.clone(),
    };
    if !rustomnic_core::is_cage_name(&name) {
        root.table_error(format!("folder name {name:?} is not a valid cage name; set name = \"...\""));
    }
    let request_timeout = root.duration("request_timeout", MAX_REQUEST_TIMEOUT).map(|d| d.value).unwrap_or(DEFAULT_REQUEST_TIMEOUT);
    let log_level = root.string("log_level").and_then(|l| {
        if LOG_LEVELS.contains(&l.value.as_str()) {
            Some(l.value)
        } else {
            root.error("log_level", format!("{:?} is not one of {}", l.value, LOG_LEVELS.join(", ")));
            None
        }
    });
    let log_format = root.string("log_format").and_then(|l| {
        if LOG_FORMATS.contains(&l.value.as_str()) {
            Some(l.value)
        } else {
            root.error("log_format", format!("{:?} is not one of {}", l.value, LOG_FORMATS.join(", ")));
            None
        }
    });
    // Zero is allowed (no delay), so not Section::duration, which refuses it.
    let drain_delay = root.string("drain_delay").and_then(|d| match rustomnic_core::parse_duration(&d.value) {
        Ok(v) if v <= MAX_DRAIN_DELAY => Some(v),
        Ok(_) => {
            root.error("drain_delay", format!("{} is longer than the limit {}", d.value, rustomnic_core::format_duration(MAX_DRAIN_DELAY)));
            None
        }
        Err(e) => {
            root.error("drain_delay", e);
            None
        }
    });
    let state_file = state_file(dir, file);
    let mut interfaces = Vec::new();
    if let Some(section) = root.table("interfaces") {
        for (iname, s) in section.tables() {
            if !rustomnic_core::is_identifier(&iname) {
                section.error(&iname, "interface names are identifiers (letters, digits and _)");
                continue;
            }
            let protocol = s.string("protocol").map(|p| p.value).unwrap_or_else(|| iname.clone());
            let handler_text = s.string("handler").unwrap_or_else(|| Located {
                value: format!("{iname}.handle"),
                file: file.path().to_path_buf(),
                line: s.line_of("handler"),
                key: s.key_path("handler"),
            });
            // A bad handler is recorded but reading goes on, so that the problems of the other
            // keys of this interface are listed too; the interface itself is then dropped.
            let handler_ok = match handler_text.value.split_once('.') {
                Some((m, f)) => rustomnic_core::is_identifier(m) && rustomnic_core::is_identifier(f),
                None => false,
            };
            if !handler_ok {
                s.error("handler", format!("{:?} is not \"module.function\"", handler_text.value));
            }
            let (m, f) = handler_text.value.split_once('.').unwrap_or((handler_text.value.as_str(), ""));
            let handler =
                Located { value: (m.to_string(), f.to_string()), file: handler_text.file.clone(), line: handler_text.line, key: handler_text.key.clone() };
            let request_timeout = s.duration("request_timeout", MAX_REQUEST_TIMEOUT).map(|d| d.value).unwrap_or(request_timeout);
            let Some(plugin) = protocols.get(&protocol) else {
                let key = if s.has("protocol") { "protocol" } else { "" };
                let message = format!("unknown protocol {protocol:?} (this build knows: {})", protocols.names().join(", "));
                if key.is_empty() {
                    s.table_error(message)
                } else {
                    s.error(key, message)
                }
                continue;
            };
            let spec = InterfaceSpec {
                cage: name.clone(),
                name: iname.clone(),
                protocol,
                handler,
                request_timeout,
                state_file: state_file.clone(),
                fingerprint: s.fingerprint(),
            };
            if let Some(i) = plugin.configure(spec, &s).filter(|_| handler_ok) {
                interfaces.push(i);
            }
            s.finish();
        }
    }
    let mut resources = Vec::new();
    if let Some(section) = root.table("resources") {
        for (rname, s) in section.tables() {
            if !rustomnic_core::is_identifier(&rname) || rname == "execute" {
                section.error(&rname, "resource names are identifiers (letters, digits and _), and not \"execute\"");
                continue;
            }
            let protocol = s.string("protocol").map(|p| p.value).unwrap_or_else(|| rname.clone());
            let Some(plugin) = protocols.resource(&protocol) else {
                let message = format!("unknown resource protocol {protocol:?} (this build knows: {})", protocols.resource_names().join(", "));
                if s.has("protocol") {
                    s.error("protocol", message)
                } else {
                    s.table_error(message)
                }
                continue;
            };
            // Pool keys first, so they are known keys even when the protocol's own keys fail.
            let mut pool = rustomnic_resource::read_pool_settings(&s, 0);
            if let Some(resource) = plugin.configure(&rname, &s) {
                if pool.size == 0 {
                    pool.size = resource.default_pool_size();
                }
                resources.push(rustomnic_resource::ResourceConfig {
                    name: rname.clone(),
                    protocol,
                    pool,
                    resource,
                    fingerprint: s.fingerprint(),
                    breaker: Default::default(),
                });
            }
            s.finish();
        }
    }
    if !resources.iter().any(|r| r.name == "state") {
        if let Some(state) = implicit_state(dir, protocols, file) {
            resources.push(state);
        }
    }
    let cluster = root.table("cluster").and_then(|s| {
        let line = root.line_of("cluster");
        rustomnic_cluster::config::read(&s).map(|c| Located { value: c, file: file.path().to_path_buf(), line, key: "cluster".into() })
    });
    let monitor = root.table("monitor").map(|s| rustomnic_monitor::config::read(&s, &name));
    let queues = root.table("queues").map(|q| rustomnic_queue::read_queues(&q)).unwrap_or_default();
    let tracing = root.table("tracing").and_then(|s| rustomnic_telemetry::config::read(&s, &name));
    let mut lua = root.table("lua").map(|s| read_lua(&s)).unwrap_or_default();
    lua.libraries = dir.library_roots();
    root.finish_with(&[
        "name",
        "request_timeout",
        "log_level",
        "log_format",
        "drain_delay",
        "interfaces",
        "resources",
        "cluster",
        "monitor",
        "queues",
        "lua",
        "tracing",
    ]);
    Some(CageConfig {
        name,
        dir: dir.clone(),
        request_timeout,
        log_level,
        log_format,
        drain_delay,
        interfaces,
        resources,
        cluster,
        monitor,
        queues,
        state_file,
        lua,
        tracing,
    })
}

/// Smallest VM and request memory limits: the prelude and a few modules need a few MiB.
const MIN_LUA_MEMORY: u64 = 16 << 20;
const MAX_LUA_MEMORY: u64 = 1 << 40;
const MAX_UNYIELDING: Duration = Duration::from_secs(10);

/// `[lua]` (keys in the module docs above).
fn read_lua(s: &rustomnic_core::Section) -> rustomnic_lua::LuaLimits {
    let mut limits = rustomnic_lua::LuaLimits::default();
    let size = |key: &str, into: &mut usize| {
        if let Some(v) = s.size(key, MAX_LUA_MEMORY) {
            if v.value < MIN_LUA_MEMORY {
                s.error(key, format!("{} bytes is under the minimum of 16 MiB", v.value));
            } else {
                *into = v.value as usize;
            }
        }
    };
    size("memory_limit", &mut limits.memory);
    size("request_memory_limit", &mut limits.request_memory);
    if limits.request_memory > limits.memory {
        s.error("request_memory_limit", format!("is over memory_limit ({} MiB)", limits.memory >> 20));
        limits.request_memory = limits.memory;
    }
    if let Some(d) = s.duration("unyielding_limit", MAX_UNYIELDING) {
        if d.value < Duration::from_millis(1) {
            s.error("unyielding_limit", "must be at least 1ms");
        } else {
            limits.unyielding = d.value;
        }
    }
    if let Some(names) = s.strings("getenv") {
        for n in &names.value {
            let name = n.strip_suffix('*').unwrap_or(n);
            if n.is_empty() || name.contains('*') || name.contains('=') {
                s.error("getenv", format!("{n:?} is not a variable name or a prefix ending with *"));
            }
        }
        limits.getenv = names.value;
    }
    s.finish_with(&["memory_limit", "request_memory_limit", "unyielding_limit", "getenv"]);
    limits
}

/// The state file: `path` of `[resources.state]` (relative to the cage folder) or the implicit
/// `<cage folder>/.data/state.sqlite`. The queue lives in it (exactly once needs one file).
fn state_file(dir: &CageDir, file: &SourceFile) -> std::path::PathBuf {
    let implicit = dir.dir.join(".data").join("state.sqlite");
    let root = file.root();
    let Some(state) = root.table("resources").and_then(|r| r.table("state")) else { return implicit };
    if state.string("protocol").is_some_and(|p| p.value != "state") || !state.has("path") {
        return implicit;
    }
    match state.string("path") {
        Some(p) => file.path().parent().unwrap_or(std::path::Path::new("")).join(p.value),
        None => implicit,
    }
}

/// A `state` resource with its file at `path` and default settings (`pmnc test` points every
/// cage's state and queue at a temporary folder); None when the state protocol refuses it.
pub(crate) fn state_resource_at(path: &std::path::Path, protocols: &Protocols) -> Option<rustomnic_resource::ResourceConfig> {
    let plugin = protocols.resource("state")?;
    let quoted = path.display().to_string().replace('\\', "\\\\").replace('"', "\\\"").replace("${", "$${");
    let file = SourceFile::parse(path, format!("[resources.state]\npath = \"{quoted}\"\n")).ok()?;
    let root = file.root();
    let section = root.table("resources")?.table("state")?;
    let resource = plugin.configure("state", &section)?;
    if !file.take_errors().is_empty() {
        return None;
    }
    let pool = rustomnic_resource::PoolSettings { size: resource.default_pool_size(), ..Default::default() };
    Some(rustomnic_resource::ResourceConfig {
        name: "state".into(),
        protocol: "state".into(),
        pool,
        resource,
        fingerprint: section.fingerprint(),
        breaker: Default::default(),
    })
}

/// Every cage has a `state` resource (pmnc.state); when cage.toml does not configure one, it
/// keeps its SQLite file at `<cage folder>/.data/state.sqlite`.
fn implicit_state(dir: &CageDir, protocols: &Protocols, file: &SourceFile) -> Option<rustomnic_resource::ResourceConfig> {
    let plugin = protocols.resource("state")?;
    let path = dir.dir.join(".data").join("state.sqlite");
    // Escaped for a TOML basic string, and "${" kept literal (it would be expanded).
    let quoted = path.display().to_string().replace('\\', "\\\\").replace('"', "\\\"").replace("${", "$${");
    let text = format!("[resources.state]\npath = \"{quoted}\"\n");
    let implicit = SourceFile::parse(file.path(), text).ok()?;
    let root = implicit.root();
    let section = root.table("resources")?.table("state")?;
    let resource = plugin.configure("state", &section);
    for e in implicit.take_errors() {
        file.push(ConfigError { message: format!("the implicit state resource: {}", e.message), ..e });
    }
    let resource = resource?;
    let pool = rustomnic_resource::PoolSettings { size: resource.default_pool_size(), ..Default::default() };
    Some(rustomnic_resource::ResourceConfig {
        name: "state".into(),
        protocol: "state".into(),
        pool,
        resource,
        fingerprint: section.fingerprint(),
        breaker: Default::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(bytes: &[u8]) -> Result<CageConfig, Vec<ConfigError>> {
        let tmp = tempfile::tempdir().unwrap();
        let dir = CageDir { folder_name: "web".into(), dir: tmp.path().to_path_buf(), shared: None };
        std::fs::write(dir.config_file(), bytes).unwrap();
        load_cage(&dir, &Protocols::new())
    }

    /// Issue 12: a byte that is not UTF-8 was reported on line 1 wherever it was.
    #[test]
    fn a_non_utf8_file_is_reported_at_the_bad_byte() {
        let errors = load(b"name = \"web\"\n# caf\xc3\xa9 is fine\nrequest_timeout = \"1\xff0s\"\n").err().unwrap();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].line, 3, "{}", errors[0]);
        assert!(errors[0].message.contains("UTF-8") && errors[0].message.contains("0xff"), "{}", errors[0]);
        // A sequence cut at the end of the file.
        let errors = load(b"a = 1\n\n\n\xe2\x82").err().unwrap();
        assert_eq!(errors[0].line, 4, "{}", errors[0]);
    }
}
