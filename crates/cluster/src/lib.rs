//! The cluster engine: cages of different processes and hosts calling each other over NATS.
//!
//! Subjects, all under the flock (`pmnc.<flock>.…`), so flocks sharing one NATS never meet:
//! - `call.<cage>`: calls to a cage, request/reply; every worker thread of every process running
//!   the cage is in the queue group `pmnc.<flock>.<cage>`, so copies share the calls.
//! - `heartbeat`: every process says who it is and what it runs, every `heartbeat` interval.
//! - `status`: asks every process for its roster (`pmnc cluster status`).

pub mod bench;
pub mod claims;
pub mod config;
pub mod connect;
pub mod events;
pub mod link;
pub mod presence;
pub mod wire;

use std::rc::Rc;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

pub use config::ClusterConfig;
pub use connect::Connection;
pub use presence::{Describe, Roster};
use tokio::sync::watch;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad settings (a credentials file that cannot be read, a server name that does not resolve).
    #[error("{0}")]
    Config(String),
    /// NATS answered and said no: credentials or TLS.
    #[error("{0}")]
    Refused(String),
    /// NATS could not be reached.
    #[error("{0}")]
    Unreachable(String),
}

pub fn call_subject(flock: &str, cage: &str) -> String {
    format!("pmnc.{flock}.call.{cage}")
}

pub fn queue_group(flock: &str, cage: &str) -> String {
    format!("pmnc.{flock}.{cage}")
}

pub fn heartbeat_subject(flock: &str) -> String {
    format!("pmnc.{flock}.heartbeat")
}

pub fn status_subject(flock: &str) -> String {
    format!("pmnc.{flock}.status")
}

/// Counters of the calls this process serves for others.
#[derive(Debug, Default)]
pub struct Stats {
    pub in_flight: AtomicUsize,
    pub served: AtomicU64,
    pub failed: AtomicU64,
}

/// Who this process is in the flock.
#[derive(Debug)]
pub struct Identity {
    /// Random per process start: copies of one cage are told apart by it.
    pub instance: String,
    pub host: String,
    pub pid: u32,
    pub version: String,
    pub started_unix: f64,
    pub flock: String,
    pub stats: Stats,
}

impl Identity {
    pub fn new(flock: &str, version: &str) -> Identity {
        let started = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        Identity {
            instance: instance_id(),
            host: rustomnic_core::hostname(),
            pid: std::process::id(),
            version: version.to_string(),
            started_unix: started.as_secs_f64(),
            flock: flock.to_string(),
            stats: Stats::default(),
        }
    }
}

fn instance_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    // RandomState is seeded from the OS; mixing in time and pid keeps two processes started
    // in the same instant apart even so.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos());
    h.write_u32(std::process::id());
    format!("{:012x}", h.finish() & 0xffff_ffff_ffff)
}

/// The cluster this process joined, for the parts that open connections of their own (the
/// clustered queues, crates/queue/src/jetstream.rs).
#[derive(Debug, Clone)]
pub struct Joined {
    pub config: ClusterConfig,
    pub instance: String,
}

static JOINED: std::sync::OnceLock<Joined> = std::sync::OnceLock::new();

/// The cluster this process joined ([`Cluster::join`]), if it did.
pub fn joined() -> Option<Joined> {
    JOINED.get().cloned()
}

static ROSTER: std::sync::OnceLock<Arc<Roster>> = std::sync::OnceLock::new();

/// The roster of the flock this process joined, if it did: the clustered queues count their
/// live copies in it (rate_limit, docs/decisions/153) and the monitor shows them.
pub fn roster() -> Option<Arc<Roster>> {
    ROSTER.get().cloned()
}

/// A process's membership of the flock.
pub struct Cluster {
    pub config: ClusterConfig,
    pub identity: Arc<Identity>,
    pub roster: Arc<Roster>,
    /// NATS answered when the process joined: workers then wait for their own connections
    /// before the process says it is running, so its first calls do not fail.
    reachable: std::sync::atomic::AtomicBool,
    /// The process's own connection (heartbeats, status, events), once joined.
    presence: std::sync::OnceLock<Connection>,
}

impl Cluster {
    pub fn new(config: ClusterConfig, version: &str) -> Cluster {
        let identity = Arc::new(Identity::new(&config.flock, version));
        Cluster { config, identity, roster: Arc::new(Roster::default()), reachable: Default::default(), presence: Default::default() }
    }

    fn name(&self, role: &str) -> String {
        format!("pmnc {} {} {role}", self.identity.flock, self.identity.instance)
    }

    /// On the control thread at start: connects once so that refused credentials stop the start
    /// with a clear error; a NATS that cannot be reached yet is only a warning (the process
    /// serves its own interfaces and keeps trying). Then publishes heartbeats until `shutdown`.
    pub async fn join(&self, describe: Describe, shutdown: watch::Receiver<bool>) -> Result<(), Error> {
        let conn = match connect::connect(&self.config, &self.name("presence"), false).await {
            Ok(c) => {
                self.reachable.store(true, std::sync::atomic::Ordering::Relaxed);
                c
            }
            Err(Error::Unreachable(m)) => {
                tracing::warn!("{m}; starting anyway and retrying in the background (calls to other processes fail until then)");
                connect::connect(&self.config, &self.name("presence"), true).await?
            }
            Err(e) => return Err(e),
        };
        tracing::info!(
            "cluster: {} flock {} at {} as instance {} ({} pid {})",
            if conn.is_up() { "joined" } else { "joining" },
            self.identity.flock,
            conn.servers,
            self.identity.instance,
            self.identity.host,
            self.identity.pid
        );
        let _ = self.presence.set(conn.clone());
        let _ = JOINED.set(Joined { config: self.config.clone(), instance: self.identity.instance.clone() });
        let _ = ROSTER.set(self.roster.clone());
        tokio::spawn(presence::run(conn, self.identity.clone(), self.roster.clone(), describe, self.config.heartbeat, shutdown));
        Ok(())
    }

    /// Whether the process's own connection to NATS is up now (false before
    /// [`join`](Self::join)): the cluster's part of `/readyz` (decision 144).
    pub fn is_connected(&self) -> bool {
        self.presence.get().is_some_and(|c| c.is_up())
    }

    /// Flock-wide claims over the presence connection (after [`join`](Self::join)).
    pub fn claims(&self) -> Option<claims::Claims> {
        let conn = self.presence.get()?.clone();
        Some(claims::Claims::new(conn, &self.identity.flock, &self.identity.instance))
    }

    /// Joins the events of `cages` to the flock's (after [`join`](Self::join), on the same
    /// runtime): returns the outbox for this process's publishes; events of other processes go
    /// to `deliver`.
    pub fn join_events(&self, cages: Vec<String>, deliver: events::Deliver, shutdown: watch::Receiver<bool>) -> Option<events::Outbox> {
        let conn = self.presence.get()?.clone();
        let (outbox, rx) = events::outbox();
        tokio::spawn(events::run(conn, self.identity.clone(), cages, deliver, rx, shutdown));
        Some(outbox)
    }

    /// On each worker thread: its own connection, the transport for calls to cages not in this
    /// process, and serving `cages` to other processes until `shutdown`.
    pub async fn join_worker(&self, worker: usize, cages: Vec<String>, shutdown: watch::Receiver<bool>) -> Result<(), Error> {
        let conn = connect::connect(&self.config, &self.name(&format!("worker-{worker}")), true).await?;
        if self.reachable.load(std::sync::atomic::Ordering::Relaxed) && !conn.wait_connected(self.config.connect_timeout).await {
            tracing::warn!("cluster: worker {worker} could not connect to NATS within {:?}; it keeps trying", self.config.connect_timeout);
        }
        rustomnic_lua::worker::set_remote(Rc::new(link::Link::new(conn.clone(), self.identity.clone())));
        link::serve(conn, self.identity.clone(), cages, self.config.max_calls, shutdown);
        Ok(())
    }
}
