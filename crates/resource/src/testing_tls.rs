//! Test support for TLS to databases (feature `test-tls`): a throw-away CA and server
//! certificate made with rcgen, free ports, servers started for one test and stopped when their
//! guard is dropped, and the loud message of a test that has to skip.
// Test support: a failed step ends the test that asked for it.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};

pub use crate::testing::shout;

/// A folder with a CA (`ca.pem`), a server certificate it signed (`server.pem`,
/// `server.key`), and an unrelated CA (`other-ca.pem`) for the "wrong CA" cases. Removed when
/// dropped.
pub struct TestPki {
    pub dir: PathBuf,
    pub ca: PathBuf,
    pub other_ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestPki {
    /// Certificates for a server known by `names` (DNS names or IP addresses).
    pub fn new(tag: &str, names: &[&str]) -> Result<TestPki, String> {
        let dir = std::env::temp_dir().join(format!("rustomnic-{tag}-tls-{}-{}", std::process::id(), unique()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let pki = TestPki { ca: dir.join("ca.pem"), other_ca: dir.join("other-ca.pem"), cert: dir.join("server.pem"), key: dir.join("server.key"), dir };
        let (ca_pem, issuer) = make_ca("Rustomnic test CA")?;
        let (other_pem, _) = make_ca("Rustomnic other test CA")?;
        let key = KeyPair::generate().map_err(|e| e.to_string())?;
        let mut params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).map_err(|e| e.to_string())?;
        params.distinguished_name.push(DnType::CommonName, names.first().copied().unwrap_or("server"));
        let cert = params.signed_by(&key, &issuer).map_err(|e| e.to_string())?;
        write(&pki.ca, &ca_pem)?;
        write(&pki.other_ca, &other_pem)?;
        write(&pki.cert, &cert.pem())?;
        write(&pki.key, &key.serialize_pem())?;
        Ok(pki)
    }
}

impl Drop for TestPki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn make_ca(name: &str) -> Result<(String, Issuer<'static, KeyPair>), String> {
    let key = KeyPair::generate().map_err(|e| e.to_string())?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(|e| e.to_string())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params.distinguished_name.push(DnType::CommonName, name);
    let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
    Ok((cert.pem(), Issuer::new(params, key)))
}

fn write(path: &Path, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn unique() -> usize {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    N.fetch_add(1, Ordering::SeqCst)
}

/// A port nothing listens on right now (the OS picks it).
pub fn free_port() -> Result<u16, String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("no free port: {e}"))?;
    listener.local_addr().map(|a| a.port()).map_err(|e| e.to_string())
}

/// The uid and gid of a system user (from /etc/passwd), for servers that refuse to run as root.
pub fn system_user(name: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() > 3 && fields[0] == name {
            Some((fields[2].parse().ok()?, fields[3].parse().ok()?))
        } else {
            None
        }
    })
}

/// Whether this process runs as root (then servers are started as their own system user).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(1) == Some("0")))
        .unwrap_or(false)
}

/// A server started for one test: stopped (signal, then kill) and its folder removed when
/// dropped, whatever the test's outcome.
pub struct ServerGuard {
    pub name: String,
    child: Child,
    /// The signal that shuts the server down cleanly but at once (QUIT for PostgreSQL).
    stop_signal: &'static str,
    dir: PathBuf,
    pub log: PathBuf,
}

impl ServerGuard {
    pub fn new(name: &str, child: Child, stop_signal: &'static str, dir: PathBuf, log: PathBuf) -> ServerGuard {
        ServerGuard { name: name.to_string(), child, stop_signal, dir, log }
    }

    /// Polls until the server accepts TCP connections on `port`, it exits, or `within` passes.
    pub fn wait_accepting(&mut self, port: u16, within: Duration) -> Result<(), String> {
        let deadline = Instant::now() + within;
        loop {
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("{} exited ({status}) before accepting connections; its log:\n{}", self.name, self.log_tail()));
            }
            if Instant::now() >= deadline {
                return Err(format!("{} did not accept connections on port {port} within {within:?}; its log:\n{}", self.name, self.log_tail()));
            }
            // A poll interval, not a synchronisation: the loop ends on the port accepting.
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Polls the server's log until it holds `text` (a server saying it is ready), it exits, or
    /// `within` passes.
    pub fn wait_log(&mut self, text: &str, within: Duration) -> Result<(), String> {
        let deadline = Instant::now() + within;
        loop {
            if std::fs::read_to_string(&self.log).is_ok_and(|log| log.contains(text)) {
                return Ok(());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("{} exited ({status}) before logging {text:?}; its log:\n{}", self.name, self.log_tail()));
            }
            if Instant::now() >= deadline {
                return Err(format!("{} did not log {text:?} within {within:?}; its log:\n{}", self.name, self.log_tail()));
            }
            // A poll interval, not a synchronisation: the loop ends on the line appearing.
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The end of the server's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for ServerGuard {
    fn drop(&mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args([format!("-{}", self.stop_signal), pid]).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() >= deadline => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
