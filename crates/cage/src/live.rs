//! The interfaces running in this process, each with its own shutdown: started once the workers
//! are ready, and replaced one by one when their `[interfaces.X]` table changes (the old one stops
//! taking work and lets what is in flight finish; the others go on serving).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rustomnic_interface::{FlockClaim, Host, Interface};
use tokio::sync::watch;

use crate::runtime::{accept_loop, bind, log_listening, Workers};

/// The interfaces a cage has now, from its changed cage.toml (sent by the watcher).
pub(crate) struct InterfaceChange {
    pub cage: String,
    pub interfaces: Vec<Arc<dyn Interface>>,
}

struct Running {
    interface: Arc<dyn Interface>,
    shutdown: watch::Sender<bool>,
    /// The listener's address once bound (for interfaces that listen).
    local: Option<std::net::SocketAddr>,
    /// The acceptor task, which holds the listener until it ends.
    acceptor: Option<tokio::task::JoinHandle<()>>,
}

pub(crate) struct LiveInterfaces {
    workers: Workers,
    claim: Option<FlockClaim>,
    /// By (cage, interface name).
    running: BTreeMap<(String, String), Running>,
    /// The hosts given to interfaces that consume: one that is still alive has not stopped.
    hosts: Vec<std::sync::Weak<()>>,
}

fn key(iface: &dyn Interface) -> (String, String) {
    (iface.spec().cage.clone(), iface.spec().name.clone())
}

impl LiveInterfaces {
    pub(crate) fn new(workers: Workers, claim: Option<FlockClaim>) -> LiveInterfaces {
        LiveInterfaces { workers, claim, running: BTreeMap::new(), hosts: Vec::new() }
    }

    /// Starts every interface: those that listen on the listeners bound at start.
    pub(crate) fn start(&mut self, interfaces: Vec<Arc<dyn Interface>>, listeners: Vec<(Arc<dyn Interface>, tokio::net::TcpListener)>) {
        let mut listeners: BTreeMap<(String, String), tokio::net::TcpListener> = listeners.into_iter().map(|(i, l)| (key(i.as_ref()), l)).collect();
        for iface in interfaces {
            let listener = listeners.remove(&key(iface.as_ref()));
            self.launch(iface, listener);
        }
    }

    fn launch(&mut self, iface: Arc<dyn Interface>, listener: Option<tokio::net::TcpListener>) {
        let (tx, rx) = watch::channel(false);
        let local = listener.as_ref().and_then(|l| l.local_addr().ok());
        let acceptor = match listener {
            Some(listener) => Some(tokio::spawn(accept_loop(iface.clone(), listener, self.workers.clone(), rx))),
            None => {
                let host =
                    Host::new(iface.spec().clone(), self.workers.spawner(), rx, self.claim.clone()).with_workers(self.workers.count(), self.workers.placer());
                self.hosts.retain(|h| h.strong_count() > 0);
                self.hosts.push(host.liveness());
                iface.clone().start(host);
                None
            }
        };
        self.running.insert(key(iface.as_ref()), Running { interface: iface, shutdown: tx, local, acceptor });
    }

    fn stop(&mut self, k: &(String, String)) -> Option<Running> {
        let r = self.running.remove(k)?;
        let _ = r.shutdown.send(true);
        Some(r)
    }

    /// Stops every interface (the process shuts down).
    pub(crate) fn stop_all(&mut self) {
        let keys: Vec<_> = self.running.keys().cloned().collect();
        for k in keys {
            self.stop(&k);
        }
    }

    /// Waits until every interface that consumes has stopped (dropped its host: its requests
    /// in flight ended and their messages were settled), at most `limit`; how many had not.
    pub(crate) async fn consumers_stopped(&mut self, limit: Duration) -> usize {
        let started = std::time::Instant::now();
        loop {
            self.hosts.retain(|h| h.strong_count() > 0);
            if self.hosts.is_empty() || started.elapsed() >= limit {
                return self.hosts.len();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Brings the interfaces of one cage in line with its changed cage.toml: an interface whose
    /// table changed is stopped and started again with the new table, a new one is started, a
    /// removed one stopped. When a changed interface cannot listen on its new address, the old
    /// one keeps serving.
    pub(crate) async fn apply(&mut self, change: InterfaceChange) {
        let cage = change.cage;
        let wanted: BTreeMap<String, Arc<dyn Interface>> = change.interfaces.into_iter().map(|i| (i.spec().name.clone(), i)).collect();
        let gone: Vec<(String, String)> = self.running.keys().filter(|(c, n)| c == &cage && !wanted.contains_key(n)).cloned().collect();
        for k in gone {
            self.stop(&k);
            tracing::info!(cage = %k.0, interface = %k.1, "interface removed from cage.toml: stopped (requests in flight finish)");
        }
        for (name, new) in wanted {
            let k = (cage.clone(), name.clone());
            let old_fingerprint = self.running.get(&k).map(|r| r.interface.spec().fingerprint.clone());
            if old_fingerprint.as_deref() == Some(new.spec().fingerprint.as_str()) {
                continue;
            }
            let replacing = old_fingerprint.is_some();
            let listener = match new.listen() {
                None => None,
                Some(addr) => {
                    // The same address: the old listener must close first to free it.
                    let same = self.running.get(&k).and_then(|r| r.local).is_some_and(|old| old.port() == addr.value.port() && addr.value.port() != 0);
                    let mut old = if same { self.stop(&k) } else { None };
                    if let Some(acceptor) = old.as_mut().and_then(|o| o.acceptor.take()) {
                        // Its listener is closed once the acceptor has ended.
                        let _ = acceptor.await;
                    }
                    match bind(addr.value).await {
                        Ok(l) => Some(l),
                        Err(e) => {
                            tracing::error!(cage = %cage, interface = %name, "{} (keeping the running interface)", addr.error(format!("cannot listen on {}: {e}", addr.value)));
                            // Put the old one back on its address.
                            if let Some((old, at)) = old.and_then(|o| o.local.map(|a| (o, a))) {
                                match bind(at).await {
                                    Ok(l) => self.launch(old.interface, Some(l)),
                                    Err(e) => tracing::error!(cage = %cage, interface = %name, "cannot listen on its old address again either: {e}"),
                                }
                            }
                            continue;
                        }
                    }
                }
            };
            if replacing {
                self.stop(&k);
            }
            if let Some(l) = &listener {
                let _ = log_listening(new.as_ref(), l);
            }
            tracing::info!(cage = %cage, interface = %name, "{}", if replacing { "interface changed in cage.toml: started again with the new table" } else { "interface added in cage.toml: started" });
            self.launch(new, listener);
        }
    }
}
