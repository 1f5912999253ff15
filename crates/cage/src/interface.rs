//! The interface plugin boundary: a [`Protocol`] reads its config keys and makes an
//! [`Interface`], which serves accepted connections on worker threads.
//!
//! Stages: `configure` (on the main thread, also run by `pmnc check`; records problems in the
//! section) → the runtime binds `listen()` → `serve` is called on a worker thread for every
//! accepted connection and must end soon after `Shutdown` fires.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use futures_util::future::LocalBoxFuture;
use rustomnic_core::{Located, Section};
use tokio::net::TcpStream;

use crate::config::InterfaceSpec;

/// Fires once when the process starts its graceful shutdown.
pub type Shutdown = tokio::sync::watch::Receiver<bool>;

/// One protocol of inbound requests (http, later websocket, amqp, ...).
pub trait Protocol: Send + Sync {
    /// The protocol name used in `protocol = "..."`.
    fn name(&self) -> &'static str;

    /// Reads this protocol's keys from `section` (the interface's table). Problems are recorded in
    /// the section; `None` when the interface cannot be built.
    fn configure(&self, spec: InterfaceSpec, section: &Section) -> Option<Arc<dyn Interface>>;
}

/// A configured interface of a cage.
pub trait Interface: Send + Sync {
    fn spec(&self) -> &InterfaceSpec;

    /// The address to accept TCP connections on, for interfaces that listen.
    fn listen(&self) -> Option<Located<SocketAddr>>;

    /// Serves one accepted connection on the current worker thread.
    fn serve(self: Arc<Self>, stream: TcpStream, remote: SocketAddr, shutdown: Shutdown) -> LocalBoxFuture<'static, ()>;

    /// Starts an interface that makes requests itself (a schedule): called once per process
    /// when the workers are ready; `spawn` runs a job on a worker thread.
    fn start(self: Arc<Self>, _spawn: rustomnic_queue::Spawner, _shutdown: Shutdown) {}
}

/// The protocols this build knows, by name: interfaces (inbound) and resources (outbound).
#[derive(Clone, Default)]
pub struct Protocols {
    by_name: BTreeMap<&'static str, Arc<dyn Protocol>>,
    resources: BTreeMap<&'static str, Arc<dyn rustomnic_resource::Protocol>>,
}

impl Protocols {
    pub fn new() -> Protocols {
        Protocols::default()
    }

    pub fn add(&mut self, protocol: Arc<dyn Protocol>) {
        self.by_name.insert(protocol.name(), protocol);
    }

    pub fn get(&self, name: &str) -> Option<&Arc<dyn Protocol>> {
        self.by_name.get(name)
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.by_name.keys().copied().collect()
    }

    pub fn add_resource(&mut self, protocol: Arc<dyn rustomnic_resource::Protocol>) {
        self.resources.insert(protocol.name(), protocol);
    }

    pub fn resource(&self, name: &str) -> Option<&Arc<dyn rustomnic_resource::Protocol>> {
        self.resources.get(name)
    }

    pub fn resource_names(&self) -> Vec<&'static str> {
        self.resources.keys().copied().collect()
    }
}

/// Decides claims that only one process of the whole flock may win (a schedule's firing when
/// copies of a cage run on several hosts): true when this process won. Blocking; called from
/// an interface's own thread, never from a worker.
pub type FlockClaim = Arc<dyn Fn(&str) -> Result<bool, String> + Send + Sync>;

static FLOCK_CLAIM: std::sync::RwLock<Option<FlockClaim>> = std::sync::RwLock::new(None);

/// Installed by the runtime when the process is in a cluster.
pub fn set_flock_claim(claim: Option<FlockClaim>) {
    *FLOCK_CLAIM.write().unwrap_or_else(|p| p.into_inner()) = claim;
}

/// The flock's claims, when the process is in a cluster.
pub fn flock_claim() -> Option<FlockClaim> {
    FLOCK_CLAIM.read().unwrap_or_else(|p| p.into_inner()).clone()
}
