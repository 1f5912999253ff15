//! Opening a NATS connection from the cluster settings, and knowing at every moment whether it
//! is up, so that calls fail at once while NATS is away instead of waiting out their deadline.

use std::time::Duration;

use tokio::sync::watch;

use crate::config::{Auth, ClusterConfig};
use crate::Error;

/// A NATS connection and its live state.
#[derive(Clone)]
pub struct Connection {
    pub client: async_nats::Client,
    /// How many times the connection was lost so far.
    pub losses: watch::Receiver<u64>,
    /// How many times it was made (1 after the first connect).
    pub connects: watch::Receiver<u64>,
    pub servers: String,
}

impl Connection {
    pub fn is_up(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// The loss count now, to give to [`lost_since`](Self::lost_since).
    pub fn losses(&self) -> u64 {
        *self.losses.borrow()
    }

    /// Waits until the connection has been made once, at most `limit`; false on timeout.
    pub async fn wait_connected(&self, limit: std::time::Duration) -> bool {
        let mut connects = self.connects.clone();
        tokio::time::timeout(limit, connects.wait_for(|n| *n > 0)).await.map(|r| r.is_ok()).unwrap_or(false)
    }

    /// Resolves once the connection has been lost after `count` was read.
    pub async fn lost_since(&self, count: u64) {
        let mut losses = self.losses.clone();
        let _ = losses.wait_for(|n| *n > count).await;
    }
}

/// Connects to the cluster. With `retry`, a server that cannot be reached yet is retried in the
/// background and the connection starts as down; without it, the first failure is returned
/// (used at start to refuse bad credentials clearly).
pub async fn connect(config: &ClusterConfig, name: &str, retry: bool) -> Result<Connection, Error> {
    let (state_tx, state_rx) = watch::channel(0u64);
    let (connects_tx, connects_rx) = watch::channel(0u64);
    let connects_here = connects_tx.clone();
    let servers = config.servers();
    let who = servers.clone();
    let role = name.to_string();
    let ever = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // While NATS is away the client fails every retry the same way: one line per new reason.
    let last_error = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let mut options = async_nats::ConnectOptions::new()
        .name(name)
        .connection_timeout(config.connect_timeout)
        .request_timeout(None)
        .max_reconnects(None)
        .ping_interval(Duration::from_secs(5))
        // Quick first retries so a restarted NATS is rejoined within a fraction of a second,
        // capped so a long outage does not turn into a busy loop.
        .reconnect_delay_callback(|attempts| {
            let step = Duration::from_millis(50).saturating_mul(1u32 << attempts.min(6) as u32);
            step.min(Duration::from_secs(2))
        })
        .event_callback(move |event| {
            let state_tx = state_tx.clone();
            let connects_tx = connects_tx.clone();
            let who = who.clone();
            let role = role.clone();
            let ever = ever.clone();
            let last_error = last_error.clone();
            async move {
                match event {
                    async_nats::Event::Connected => {
                        connects_tx.send_modify(|n| *n += 1);
                        last_error.lock().unwrap_or_else(|p| p.into_inner()).clear();
                        // Every worker has a connection: only reconnects are worth a line each.
                        if ever.swap(true, std::sync::atomic::Ordering::Relaxed) {
                            tracing::info!("cluster: reconnected to NATS ({who}) [{role}]");
                        } else {
                            tracing::debug!("cluster: connected to NATS ({who}) [{role}]");
                        }
                    }
                    async_nats::Event::Disconnected => {
                        state_tx.send_modify(|n| *n += 1);
                        tracing::warn!("cluster: lost the connection to NATS ({who}) [{role}]; reconnecting");
                    }
                    async_nats::Event::Closed => state_tx.send_modify(|n| *n += 1),
                    async_nats::Event::ServerError(e) => tracing::warn!("cluster: NATS ({who}) reports: {e}"),
                    async_nats::Event::ClientError(e) => {
                        let text = e.to_string();
                        let mut last = last_error.lock().unwrap_or_else(|p| p.into_inner());
                        if *last != text {
                            tracing::warn!("cluster: NATS client error ({who}) [{role}]: {text} (retrying)");
                            *last = text;
                        } else {
                            tracing::debug!("cluster: NATS client error ({who}) [{role}]: {text}");
                        }
                    }
                    async_nats::Event::SlowConsumer(_) => {
                        tracing::warn!("cluster: this process reads calls slower than they arrive; NATS dropped some")
                    }
                    async_nats::Event::LameDuckMode => {
                        tracing::warn!("cluster: a NATS server ({who}) is shutting down (lame duck mode)")
                    }
                    async_nats::Event::Draining => {}
                }
            }
        });
    if retry {
        options = options.retry_on_initial_connect();
    }
    options = match &config.auth {
        Auth::None => options,
        Auth::UserPassword { user, password } => options.user_and_password(user.clone(), password.clone()),
        Auth::Token(token) => options.token(token.clone()),
        Auth::NKey(seed) => options.nkey(seed.clone()),
        Auth::Credentials(path) => {
            options.credentials_file(path).await.map_err(|e| Error::Config(format!("cluster: cannot read the credentials file {}: {e}", path.display())))?
        }
    };
    if config.tls.required {
        options = options.require_tls(true);
    }
    if let Some(ca) = &config.tls.ca {
        options = options.add_root_certificates(ca.clone());
    }
    if let Some((cert, key)) = &config.tls.cert {
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    let client = options.connect(config.urls.clone()).await.map_err(|e| connect_error(&servers, &config.auth, e))?;
    if !retry {
        // Connected already; the event that says so may still be on its way.
        connects_here.send_modify(|n| *n = (*n).max(1));
    }
    Ok(Connection { client, losses: state_rx, connects: connects_rx, servers })
}

fn connect_error(servers: &str, auth: &Auth, e: async_nats::ConnectError) -> Error {
    use async_nats::ConnectErrorKind as K;
    match e.kind() {
        K::AuthorizationViolation | K::Authentication => Error::Refused(format!(
            "cluster: NATS ({servers}) refused this process's credentials ({auth:?}): {e}; check [cluster] user/password, token, nkey_seed or credentials"
        )),
        K::Tls => Error::Refused(format!("cluster: TLS with NATS ({servers}) failed: {e}")),
        K::ServerParse | K::Dns => Error::Config(format!("cluster: cannot resolve the NATS servers ({servers}): {e}")),
        // rustls reports a certificate it does not trust as an I/O error.
        K::Io if e.to_string().contains("certificate") || e.to_string().contains("TLS") => {
            Error::Refused(format!("cluster: TLS with NATS ({servers}) failed: {e}; check [cluster] tls_ca (the CA that signed the server's certificate)"))
        }
        K::TimedOut | K::Io | K::MaxReconnects => Error::Unreachable(format!("cluster: cannot reach NATS ({servers}): {e}")),
    }
}
