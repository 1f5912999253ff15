//! The `[monitor]` table of cage.toml: where the page listens, how it is protected, and the
//! alert rules.
//!
//! ```toml
//! [monitor]
//! listen = "127.0.0.1:9100"        # default: 127.0.0.1 on a free port; false turns it off
//! token = "${MONITOR_TOKEN}"       # or user = "..." and password = "..." (basic auth)
//! tls = { cert = "cert.pem", key = "key.pem" }  # HTTPS, as on [interfaces.X] (docs/interfaces/http.md)
//!
//! [monitor.alerts.errors]
//! kind = "error_rate"              # cage_down, error_rate, queue_age or module_error
//! threshold = 0.5                  # errors/s (error_rate), seconds (queue_age)
//! for = "30s"                      # how long the condition must hold before it fires
//! repeat = "5m"                    # the least time between two firings of this rule
//! target = "ops.alerts.receive"    # cage.module.function that receives the alert
//! durable_queue = "alerts"          # deliver as a durable call on this queue of the target cage
//!                                   # (retried until it is taken; default: a direct call)
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use rustomnic_core::{Located, Section};

/// Who may read the pages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Auth {
    None,
    /// `Authorization: Bearer TOKEN` or `?token=TOKEN`.
    Token(String),
    Basic {
        user: String,
        password: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlertKind {
    /// No instance of the cage is up (from the cluster's heartbeats).
    CageDown,
    /// Errors per second over the last 10 s above `threshold`.
    ErrorRate,
    /// The oldest call of a queue older than `threshold` seconds.
    QueueAge,
    /// A module's latest version failed to load.
    ModuleError,
}

impl AlertKind {
    pub const NAMES: &'static [&'static str] = &["cage_down", "error_rate", "queue_age", "module_error"];

    pub fn parse(s: &str) -> Option<AlertKind> {
        Some(match s {
            "cage_down" => AlertKind::CageDown,
            "error_rate" => AlertKind::ErrorRate,
            "queue_age" => AlertKind::QueueAge,
            "module_error" => AlertKind::ModuleError,
            _ => return None,
        })
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            AlertKind::CageDown => "cage_down",
            AlertKind::ErrorRate => "error_rate",
            AlertKind::QueueAge => "queue_age",
            AlertKind::ModuleError => "module_error",
        }
    }
}

/// One `[monitor.alerts.NAME]` rule.
#[derive(Debug, Clone, PartialEq)]
pub struct AlertRule {
    pub name: String,
    /// The cage whose cage.toml holds the rule.
    pub owner: String,
    pub kind: AlertKind,
    /// The cage watched: `cage = "..."`, by default the owner (cage_down: any cage when unset).
    pub cage: Option<String>,
    /// error_rate: only this interface; queue_age: only this queue.
    pub subject: Option<String>,
    pub threshold: f64,
    pub hold: Duration,
    pub repeat: Duration,
    /// (cage, module, function) that receives the alert.
    pub target: (String, String, String),
    /// "file:line: monitor.alerts.NAME.target", for problems found after reading.
    pub target_at: String,
    /// Deliver as a durable call on this queue of the target cage instead of a direct call.
    pub durable_queue: Option<String>,
}

/// `[monitor]` of one cage.
#[derive(Debug, Clone, PartialEq)]
pub struct MonitorConfig {
    /// None: no page (`listen = false`).
    pub listen: Option<SocketAddr>,
    pub auth: Auth,
    pub alerts: Vec<AlertRule>,
    /// HTTPS: the page speaks TLS only (HTTP/1.1 by ALPN).
    pub tls: Option<rustomnic_http::tls::TlsOptions>,
    /// Where the table is, for messages; None when the cage has no `[monitor]` table.
    pub file: Option<PathBuf>,
    pub line: usize,
}

impl Default for MonitorConfig {
    fn default() -> Self {
        MonitorConfig { listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))), auth: Auth::None, alerts: Vec::new(), tls: None, file: None, line: 0 }
    }
}

const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);
const DEFAULT_REPEAT: Duration = Duration::from_secs(300);

/// Reads the `[monitor]` table of `cage`'s cage.toml; every problem is recorded in the file.
pub fn read(section: &Section<'_>, cage: &str) -> MonitorConfig {
    let mut config = MonitorConfig { file: Some(section.file().path().to_path_buf()), line: section.line_of(""), ..MonitorConfig::default() };
    match section.kind_of("listen") {
        Some("boolean") => {
            if let Some(b) = section.bool("listen") {
                if b.value {
                    section.error("listen", "true is not an address; write an address such as \"127.0.0.1:9100\", or false to turn the page off");
                } else {
                    config.listen = None;
                }
            }
        }
        Some(_) => {
            if let Some(s) = section.string("listen") {
                match s.value.parse::<SocketAddr>() {
                    Ok(a) => config.listen = Some(a),
                    Err(_) => section.error("listen", format!("{:?} is not an address such as \"127.0.0.1:9100\"", s.value)),
                }
            }
        }
        None => {}
    }
    let token = section.string("token");
    let user = section.string("user");
    let password = section.string("password");
    match (token, user, password) {
        (Some(t), None, None) => {
            if t.value.is_empty() {
                section.error("token", "is empty (is the environment variable it names set?)");
            } else {
                config.auth = Auth::Token(t.value);
            }
        }
        (None, Some(u), Some(p)) => {
            if u.value.is_empty() || p.value.is_empty() || u.value.contains(':') {
                section.error("user", "user and password must not be empty, and user must not contain ':'");
            } else {
                config.auth = Auth::Basic { user: u.value, password: p.value };
            }
        }
        (None, None, None) => {}
        (Some(_), _, _) => section.error("token", "use either token or user and password, not both"),
        (None, Some(_), None) => section.error("user", "basic auth needs password too"),
        (None, None, Some(_)) => section.error("password", "basic auth needs user too"),
    }
    if let Some(addr) = config.listen {
        if !addr.ip().is_loopback() && config.auth == Auth::None {
            section.error(
                "listen",
                format!("the monitor of cage {cage} would listen on {addr}, which is not loopback, without access control; set token = \"${{MONITOR_TOKEN}}\" or user and password, or listen on 127.0.0.1"),
            );
        }
    }
    if let Some(Ok(tls)) = rustomnic_http::tls::read_tls(section, "tls", false) {
        config.tls = Some(tls);
    }
    if let Some(alerts) = section.table("alerts") {
        for (name, s) in alerts.tables() {
            if let Some(rule) = read_rule(&name, &s, cage) {
                config.alerts.push(rule);
            }
            s.finish_with(&["kind", "threshold", "for", "repeat", "target", "cage", "interface", "queue", "durable_queue"]);
        }
    }
    section.finish_with(&["listen", "token", "user", "password", "tls", "alerts"]);
    config
}

fn read_rule(name: &str, s: &Section<'_>, owner: &str) -> Option<AlertRule> {
    let kind = match s.string("kind") {
        Some(k) => match AlertKind::parse(&k.value) {
            Some(kind) => Some(kind),
            None => {
                s.error("kind", format!("{:?} is not one of {}", k.value, AlertKind::NAMES.join(", ")));
                None
            }
        },
        None => {
            s.table_error(format!("alert {name}: kind is missing (one of {})", AlertKind::NAMES.join(", ")));
            None
        }
    };
    let threshold = s.number("threshold", 0.0, 1e12).map(|n| n.value);
    let hold = s.has("for").then(|| s.duration("for", MAX_DURATION)).flatten().map(|d| d.value).unwrap_or(Duration::ZERO);
    let repeat = s.duration("repeat", MAX_DURATION).map(|d| d.value).unwrap_or(DEFAULT_REPEAT);
    let cage = s.string("cage").map(|c| c.value);
    let interface = s.string("interface").map(|c| c.value);
    let queue = s.string("queue").map(|c| c.value);
    let mut target_at = String::new();
    let target = match s.string("target") {
        Some(t) => {
            target_at = format!("{}:{}: {}", t.file.display(), t.line, t.key);
            parse_target(&t)
        }
        None => {
            s.table_error(format!("alert {name}: target is missing (\"cage.module.function\" that receives the alert)"));
            None
        }
    };
    let target = match target {
        Some(Ok(t)) => Some(t),
        Some(Err(message)) => {
            s.error("target", message);
            None
        }
        None => None,
    };
    let kind = kind?;
    let threshold = match (kind, threshold) {
        (AlertKind::ErrorRate | AlertKind::QueueAge, None) if !s.has("threshold") => {
            s.table_error(format!("alert {name}: threshold is missing ({})", if kind == AlertKind::ErrorRate { "errors per second" } else { "seconds" }));
            return None;
        }
        (_, t) => t.unwrap_or(0.0),
    };
    let subject = match kind {
        AlertKind::ErrorRate => interface,
        AlertKind::QueueAge => queue,
        _ => None,
    };
    let cage = match kind {
        AlertKind::CageDown => cage,
        _ => Some(cage.unwrap_or_else(|| owner.to_string())),
    };
    let durable_queue = s.string("durable_queue").map(|q| q.value);
    Some(AlertRule {
        name: name.to_string(),
        owner: owner.to_string(),
        kind,
        cage,
        subject,
        threshold,
        hold,
        repeat,
        target: target?,
        target_at,
        durable_queue,
    })
}

fn parse_target(t: &Located<String>) -> Option<Result<(String, String, String), String>> {
    let parts: Vec<&str> = t.value.split('.').collect();
    Some(match parts.as_slice() {
        [c, m, f] if rustomnic_core::is_cage_name(c) && rustomnic_core::is_identifier(m) && rustomnic_core::is_identifier(f) && !f.starts_with('_') => {
            Ok((c.to_string(), m.to_string(), f.to_string()))
        }
        _ => Err(format!("{:?} is not \"cage.module.function\" (a public function)", t.value)),
    })
}

/// The settings of the one page a process serves, from the cages' tables: the first cage (in
/// name order) with a `[monitor]` table sets listen and access; the alert rules of every cage
/// apply. Returns the settings and a warning for each other cage whose table disagrees.
pub fn choose(cages: &[(String, Option<MonitorConfig>)]) -> (MonitorConfig, Vec<String>) {
    let mut sorted: Vec<&(String, Option<MonitorConfig>)> = cages.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut chosen: Option<(String, MonitorConfig)> = None;
    let mut warnings = Vec::new();
    let mut alerts = Vec::new();
    for (cage, config) in sorted {
        let Some(config) = config else { continue };
        alerts.extend(config.alerts.iter().cloned());
        match &chosen {
            None => chosen = Some((cage.clone(), config.clone())),
            Some((first, c)) => {
                if c.listen != config.listen || c.auth != config.auth || c.tls != config.tls {
                    warnings.push(format!(
                        "{}:{}: monitor: the page of this process follows [monitor] of cage {first}; listen, access and tls set here for cage {cage} are not used",
                        config.file.as_ref().map(|f| f.display().to_string()).unwrap_or_default(),
                        config.line
                    ));
                }
            }
        }
    }
    let mut config = chosen.map(|(_, c)| c).unwrap_or_default();
    config.alerts = alerts;
    (config, warnings)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustomnic_core::SourceFile;

    fn parse(text: &str) -> (MonitorConfig, Vec<String>) {
        let file = SourceFile::parse(std::path::Path::new("c/cage.toml"), text.to_string()).expect("toml");
        let root = file.root();
        let section = root.table("monitor").expect("monitor table");
        let config = read(&section, "c");
        (config, file.take_errors().iter().map(|e| e.to_string()).collect())
    }

    #[test]
    fn defaults_and_off() {
        let (c, errors) = parse("[monitor]\n");
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(c.listen, Some(SocketAddr::from(([127, 0, 0, 1], 0))));
        let (c, errors) = parse("[monitor]\nlisten = false\n");
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(c.listen, None);
    }

    #[test]
    fn not_loopback_needs_access_control() {
        let (_, errors) = parse("[monitor]\n\nlisten = \"0.0.0.0:9100\"\n");
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].starts_with("c/cage.toml:3: monitor.listen: "), "{}", errors[0]);
        assert!(errors[0].contains("token"), "{}", errors[0]);
        let (c, errors) = parse("[monitor]\nlisten = \"0.0.0.0:9100\"\ntoken = \"t0k\"\n");
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(c.auth, Auth::Token("t0k".into()));
        let (c, errors) = parse("[monitor]\nlisten = \"0.0.0.0:9100\"\nuser = \"u\"\npassword = \"p\"\n");
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(c.auth, Auth::Basic { user: "u".into(), password: "p".into() });
        let (_, errors) = parse("[monitor]\nlisten = \"0.0.0.0:9100\"\nuser = \"u\"\n");
        assert!(errors.iter().any(|e| e.contains("monitor.user: basic auth needs password")), "{errors:?}");
    }

    #[test]
    fn alert_rules() {
        let (c, errors) = parse(
            "[monitor.alerts.errors]\nkind = \"error_rate\"\nthreshold = 0.5\nfor = \"10s\"\ntarget = \"ops.alerts.receive\"\n\
             [monitor.alerts.broken]\nkind = \"module_error\"\ntarget = \"ops.alerts.receive\"\nrepeat = \"1s\"\n",
        );
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(c.alerts.len(), 2);
        let e = &c.alerts[0];
        assert_eq!((e.kind, e.threshold, e.hold, e.cage.as_deref()), (AlertKind::ErrorRate, 0.5, Duration::from_secs(10), Some("c")));
        assert_eq!(e.target, ("ops".into(), "alerts".into(), "receive".into()));
        assert_eq!(e.target_at, "c/cage.toml:5: monitor.alerts.errors.target");
        assert_eq!(c.alerts[1].repeat, Duration::from_secs(1));
        let (c, errors) = parse("[monitor.alerts.x]\nkind = \"fire\"\ntarget = \"a.b\"\nwhen = 1\n");
        assert!(c.alerts.is_empty());
        assert!(errors.iter().any(|e| e.contains("monitor.alerts.x.kind: \"fire\" is not one of")), "{errors:?}");
        assert!(errors.iter().any(|e| e.contains("monitor.alerts.x.target: \"a.b\" is not")), "{errors:?}");
        assert!(errors.iter().any(|e| e.contains("monitor.alerts.x.when: unknown key")), "{errors:?}");
        let (_, errors) = parse("[monitor.alerts.x]\nkind = \"queue_age\"\ntarget = \"a.b.c\"\n");
        assert!(errors.iter().any(|e| e.contains("threshold is missing")), "{errors:?}");
    }

    #[test]
    fn first_cage_sets_the_page_and_every_cage_adds_alerts() {
        let (a, _) = parse("[monitor]\nlisten = \"127.0.0.1:9101\"\n[monitor.alerts.x]\nkind = \"module_error\"\ntarget = \"a.b.c\"\n");
        let (b, _) = parse("[monitor]\nlisten = \"127.0.0.1:9102\"\n[monitor.alerts.y]\nkind = \"module_error\"\ntarget = \"a.b.c\"\n");
        let (c, warnings) = choose(&[("web".into(), Some(b)), ("api".into(), Some(a)), ("none".into(), None)]);
        assert_eq!(c.listen, Some("127.0.0.1:9101".parse().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))));
        assert_eq!(c.alerts.len(), 2);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("cage web"), "{warnings:?}");
        let (c, warnings) = choose(&[("x".into(), None)]);
        assert_eq!(c, MonitorConfig::default());
        assert!(warnings.is_empty());
    }
}
