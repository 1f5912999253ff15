//! `[cluster]` in cage.toml: which NATS servers to join, the flock, credentials and TLS.
//!
//! ```toml
//! [cluster]
//! url = "nats://127.0.0.1:4222"      # or a list: ["nats://a:4222", "nats://b:4222"]
//! flock = "default"                  # cluster namespace: flocks on one NATS never see each other
//! # at most one way of authenticating:
//! user = "${NATS_USER}"              # with password
//! password = "${NATS_PASSWORD}"
//! token = "${NATS_TOKEN}"
//! nkey_seed = "${NATS_NKEY_SEED}"    # an nkey seed (SU...)
//! credentials = "/etc/pmnc/app.creds" # a JWT + nkey credentials file
//! # TLS (rustls): a tls:// URL or tls_required turns it on
//! tls_required = false
//! tls_ca = "/etc/pmnc/ca.pem"        # roots to trust besides the system's
//! tls_cert = "/etc/pmnc/client.pem"  # client certificate, with tls_key
//! tls_key = "/etc/pmnc/client.key"
//! heartbeat = "1s"                   # how often this process says it is alive
//! connect_timeout = "5s"
//! max_calls = 10000                  # calls from other processes served at once (per process)
//! ```

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use rustomnic_core::Section;

pub const DEFAULT_FLOCK: &str = "default";
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(1);
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_MAX_CALLS: usize = 10_000;

/// How this process proves who it is to NATS.
#[derive(Clone, PartialEq, Eq, Default)]
pub enum Auth {
    #[default]
    None,
    UserPassword {
        user: String,
        password: String,
    },
    Token(String),
    NKey(String),
    Credentials(PathBuf),
}

impl std::fmt::Debug for Auth {
    // Secrets never reach a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::None => write!(f, "none"),
            Auth::UserPassword { user, .. } => write!(f, "user {user}"),
            Auth::Token(_) => write!(f, "token"),
            Auth::NKey(_) => write!(f, "nkey"),
            Auth::Credentials(p) => write!(f, "credentials {}", p.display()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Tls {
    pub required: bool,
    pub ca: Option<PathBuf>,
    pub cert: Option<(PathBuf, PathBuf)>,
}

/// The cluster settings of a process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    pub urls: Vec<String>,
    pub flock: String,
    pub auth: Auth,
    pub tls: Tls,
    pub heartbeat: Duration,
    pub connect_timeout: Duration,
    pub max_calls: usize,
}

impl ClusterConfig {
    /// The settings for `--cluster URL` alone.
    pub fn from_urls(urls: Vec<String>) -> ClusterConfig {
        ClusterConfig {
            urls,
            flock: DEFAULT_FLOCK.to_string(),
            auth: Auth::None,
            tls: Tls::default(),
            heartbeat: DEFAULT_HEARTBEAT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            max_calls: DEFAULT_MAX_CALLS,
        }
    }

    /// "nats://a:4222, nats://b:4222", for messages.
    pub fn servers(&self) -> String {
        self.urls.join(", ")
    }
}

/// Checks a NATS server address as the client will read it.
pub fn check_url(url: &str) -> Result<(), String> {
    async_nats::ServerAddr::from_str(url).map(|_| ()).map_err(|e| format!("{url:?} is not a NATS server address: {e}"))
}

/// A flock name becomes a subject token: letters, digits, `_` and `-`.
pub fn is_flock_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Reads a `[cluster]` table, recording every problem on it with file, line and key.
pub fn read(s: &Section) -> Option<ClusterConfig> {
    let mut ok = true;
    let urls = match s.kind_of("url") {
        Some("string") => s.string("url").map(|u| vec![u.value]),
        Some(_) => s.strings("url").map(|u| u.value),
        None => {
            s.table_error("url is required: the NATS server(s) to join, e.g. url = \"nats://127.0.0.1:4222\"");
            None
        }
    };
    let urls = urls.unwrap_or_default();
    if urls.is_empty() && s.has("url") {
        s.error("url", "at least one NATS server address is needed");
        ok = false;
    }
    for u in &urls {
        if let Err(e) = check_url(u) {
            s.error("url", e);
            ok = false;
        }
    }
    let flock = s.string("flock").map(|f| f.value).unwrap_or_else(|| DEFAULT_FLOCK.to_string());
    if !is_flock_name(&flock) {
        s.error("flock", format!("{flock:?} is not a valid flock name (letters, digits, _ and -, at most 64)"));
        ok = false;
    }
    let user = s.string("user").map(|v| v.value);
    let password = s.string("password").map(|v| v.value);
    let token = s.string("token").map(|v| v.value);
    let nkey = s.string("nkey_seed").map(|v| v.value);
    let creds = s.string("credentials").map(|v| PathBuf::from(v.value));
    let methods = [user.is_some() || password.is_some(), token.is_some(), nkey.is_some(), creds.is_some()];
    let auth = if methods.iter().filter(|m| **m).count() > 1 {
        s.table_error("give one way of authenticating: user + password, token, nkey_seed or credentials");
        ok = false;
        Auth::None
    } else if let Some(token) = token {
        Auth::Token(token)
    } else if let Some(seed) = nkey {
        Auth::NKey(seed)
    } else if let Some(path) = creds {
        if !path.is_file() {
            s.error("credentials", format!("{} is not a readable file", path.display()));
            ok = false;
        }
        Auth::Credentials(path)
    } else {
        match (user, password) {
            (Some(user), Some(password)) => Auth::UserPassword { user, password },
            (None, None) => Auth::None,
            (Some(_), None) => {
                s.error("user", "user needs a password");
                ok = false;
                Auth::None
            }
            (None, Some(_)) => {
                s.error("password", "password needs a user");
                ok = false;
                Auth::None
            }
        }
    };
    let mut tls = Tls { required: s.bool("tls_required").map(|b| b.value).unwrap_or(false), ..Default::default() };
    if let Some(ca) = s.string("tls_ca") {
        let path = PathBuf::from(&ca.value);
        if !path.is_file() {
            s.error("tls_ca", format!("{} is not a readable file", path.display()));
            ok = false;
        }
        tls.ca = Some(path);
    }
    match (s.string("tls_cert"), s.string("tls_key")) {
        (Some(cert), Some(key)) => {
            for (k, p) in [("tls_cert", &cert.value), ("tls_key", &key.value)] {
                if !std::path::Path::new(p).is_file() {
                    s.error(k, format!("{p} is not a readable file"));
                    ok = false;
                }
            }
            tls.cert = Some((cert.value.into(), key.value.into()));
        }
        (None, None) => {}
        (Some(_), None) => {
            s.error("tls_cert", "tls_cert needs tls_key");
            ok = false;
        }
        (None, Some(_)) => {
            s.error("tls_key", "tls_key needs tls_cert");
            ok = false;
        }
    }
    let heartbeat = s.duration("heartbeat", Duration::from_secs(60)).map(|d| d.value).unwrap_or(DEFAULT_HEARTBEAT);
    if heartbeat < Duration::from_millis(100) {
        s.error("heartbeat", "at least 100ms");
        ok = false;
    }
    let connect_timeout = s.duration("connect_timeout", Duration::from_secs(300)).map(|d| d.value).unwrap_or(DEFAULT_CONNECT_TIMEOUT);
    let max_calls = s.integer("max_calls", 1, 1_000_000).map(|n| n.value as usize).unwrap_or(DEFAULT_MAX_CALLS);
    s.finish();
    if !ok || urls.is_empty() {
        return None;
    }
    Some(ClusterConfig { urls, flock, auth, tls, heartbeat, connect_timeout, max_calls })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustomnic_core::SourceFile;

    fn parse(text: &str) -> (Option<ClusterConfig>, Vec<String>) {
        let f = SourceFile::parse(std::path::Path::new("cage.toml"), text.to_string()).unwrap();
        let c = f.root().table("cluster").and_then(|s| read(&s));
        (c, f.take_errors().iter().map(|e| e.to_string()).collect())
    }

    #[test]
    fn defaults() {
        let (c, errors) = parse("[cluster]\nurl = \"nats://127.0.0.1:4222\"\n");
        assert!(errors.is_empty(), "{errors:?}");
        let c = c.unwrap();
        assert_eq!(c, ClusterConfig::from_urls(vec!["nats://127.0.0.1:4222".into()]));
    }

    #[test]
    fn lists_and_auth() {
        let (c, errors) = parse("[cluster]\nurl = [\"nats://a:1\", \"nats://b:2\"]\nflock = \"shop\"\nuser = \"u\"\npassword = \"p\"\n");
        assert!(errors.is_empty(), "{errors:?}");
        let c = c.unwrap();
        assert_eq!(c.urls.len(), 2);
        assert_eq!(c.flock, "shop");
        assert_eq!(c.auth, Auth::UserPassword { user: "u".into(), password: "p".into() });
        assert_eq!(format!("{:?}", c.auth), "user u", "the password stays out of Debug");
    }

    #[test]
    fn problems_name_the_key() {
        let (c, errors) = parse("[cluster]\nurl = \"nats://a:1\"\nflock = \"a.b\"\ntoken = \"t\"\nuser = \"u\"\nheartbeat = \"1ms\"\nbogus = 1\n");
        assert!(c.is_none());
        let text = errors.join("\n");
        assert!(text.contains("cage.toml:3: cluster.flock:"), "{text}");
        assert!(text.contains("one way of authenticating"), "{text}");
        assert!(text.contains("cluster.heartbeat: at least 100ms"), "{text}");
        assert!(text.contains("cage.toml:7: cluster.bogus: unknown key"), "{text}");
        let (_, errors) = parse("[cluster]\nflock = \"x\"\n");
        assert!(errors.join("\n").contains("url is required"), "{errors:?}");
        let (_, errors) = parse("[cluster]\nurl = \"nats://a:b:c:d\"\n");
        assert!(errors.join("\n").contains("not a NATS server address"), "{errors:?}");
    }
}
