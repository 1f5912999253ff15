//! The `udp` interface: every datagram that arrives on `listen` is one request to the handler;
//! when the handler returns a string, it goes back to the sender as one datagram. For feeds such
//! as syslog or metrics. See docs/interfaces/udp.md and docs/decisions/135.
//!
//! ```toml
//! [interfaces.syslog]
//! protocol = "udp"
//! listen = "127.0.0.1:5140"      # required
//! max_datagram_size = 65507      # bytes; bigger datagrams are dropped (reason "oversize"); at most 65507
//! max_reply_size = 65507         # bytes; a longer reply is not sent (reason "reply"); at most 65507
//! concurrency = 16               # requests in flight at once
//! max_pending = 1024             # datagrams waiting for a free slot; more are dropped (reason "full")
//! recv_buffer = "4MiB"           # the socket's receive buffer (SO_RCVBUF); default: the system's
//! handler = "syslog.handle"      # default "<interface>.handle"
//! request_timeout = "5s"         # deadline of one request
//! ```
//!
//! The handler is `function M.handle(data, datagram)`: `data` is the datagram's bytes as they
//! came (a Lua string, not decoded), `datagram.peer` the sender (`"ip:port"`), `datagram.local`
//! the address this interface listens on. A string it returns is sent to the peer; nil (or
//! nothing) sends nothing; any other value is not sent (reason "reply").
//!
//! Nothing is queued without a bound: at most `concurrency` requests run and `max_pending`
//! datagrams wait (each kept at its own size); anything more is **dropped and counted** by
//! reason (`full`, `oversize`, `failed` for a handler error or passed deadline, `reply` for an
//! answer that could not be sent), said in one warning a second at most, and exposed as the
//! gauge `pmnc_udp_datagrams_dropped{cage,interface,reason}` (a count since the process
//! started) beside `pmnc_messages_total` (received, acked, refused).
//!
//! A datagram bigger than `max_datagram_size` is told apart by reading into a buffer one byte
//! larger: the kernel truncates what does not fit, so a full buffer means too big.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustomnic_core::metrics::MessageCounts;
use rustomnic_core::{Located, Section, Value};
use rustomnic_interface::consumer::{self, Outage};
use rustomnic_interface::{Host, Interface, InterfaceProtocol, InterfaceSpec, Request};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

/// The keys of a udp interface (besides protocol, handler and request_timeout).
pub const KEYS: &[&str] = &["listen", "max_datagram_size", "max_reply_size", "concurrency", "max_pending", "recv_buffer"];

/// The largest payload of a UDP datagram over IPv4 (65535 less the IP and UDP headers).
pub const MAX_DATAGRAM: usize = 65_507;

/// Consecutive receive errors after which the socket is bound again.
const MAX_RECV_ERRORS: u32 = 100;

/// The `udp` protocol.
pub struct UdpProtocol;

/// A configured udp interface.
pub struct UdpInterface {
    spec: InterfaceSpec,
    listen: Located<SocketAddr>,
    max_datagram_size: usize,
    max_reply_size: usize,
    concurrency: usize,
    max_pending: usize,
    recv_buffer: Option<usize>,
}

impl InterfaceProtocol for UdpProtocol {
    fn name(&self) -> &'static str {
        "udp"
    }

    fn configure(&self, spec: InterfaceSpec, section: &Section) -> Option<Arc<dyn Interface>> {
        let listen = rustomnic_interface::read_listen(section);
        let max_datagram_size = section.integer("max_datagram_size", 1, MAX_DATAGRAM as i64).map(|v| v.value as usize).unwrap_or(MAX_DATAGRAM);
        let max_reply_size = section.integer("max_reply_size", 0, MAX_DATAGRAM as i64).map(|v| v.value as usize).unwrap_or(MAX_DATAGRAM);
        let concurrency = section.integer("concurrency", 1, 10_000).map(|v| v.value as usize).unwrap_or(16);
        let max_pending = section.integer("max_pending", 0, 1_000_000).map(|v| v.value as usize).unwrap_or(1024);
        let recv_buffer = section.size("recv_buffer", 1 << 30).map(|v| v.value as usize);
        Some(Arc::new(UdpInterface { spec, listen: listen?, max_datagram_size, max_reply_size, concurrency, max_pending, recv_buffer }))
    }
}

impl Interface for UdpInterface {
    fn spec(&self) -> &InterfaceSpec {
        &self.spec
    }

    fn start(self: Arc<Self>, host: Host) {
        let me = self.clone();
        consumer::spawn(&self.spec, move || async move {
            consumer::reconnecting(&host, async |outage: &mut Outage| me.session(&host, outage).await).await;
        });
    }
}

/// Datagrams dropped, by reason; kept for the process's life per cage and interface, so that a
/// replaced interface goes on counting where the old one stopped.
#[derive(Debug, Default)]
pub struct Drops {
    pub full: AtomicU64,
    pub oversize: AtomicU64,
    pub failed: AtomicU64,
    pub reply: AtomicU64,
    /// What went wrong with the last reply not sent, for the next report.
    note: Mutex<Option<String>>,
}

impl Drops {
    /// (reason, count) of every reason.
    pub fn all(&self) -> [(&'static str, u64); 4] {
        [
            ("full", self.full.load(Ordering::Relaxed)),
            ("oversize", self.oversize.load(Ordering::Relaxed)),
            ("failed", self.failed.load(Ordering::Relaxed)),
            ("reply", self.reply.load(Ordering::Relaxed)),
        ]
    }

    fn reply_problem(&self, why: String) {
        self.reply.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut n) = self.note.lock() {
            *n = Some(why);
        }
    }
}

static DROPS: Mutex<BTreeMap<(String, String), Arc<Drops>>> = Mutex::new(BTreeMap::new());

/// The drop counts of `interface` of `cage`, made (and exposed to the monitor) on first use.
pub fn drops(cage: &str, interface: &str) -> Arc<Drops> {
    let mut all = DROPS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(d) = all.get(&(cage.to_string(), interface.to_string())) {
        return d.clone();
    }
    let d = Arc::new(Drops::default());
    all.insert((cage.to_string(), interface.to_string()), d.clone());
    for (reason, _) in d.all() {
        let counts = d.clone();
        rustomnic_core::metrics::register_gauge(
            "pmnc_udp_datagrams_dropped",
            "Datagrams a udp interface dropped since the process started, by reason: full (no slot and max_pending waiting), oversize (over max_datagram_size), failed (the handler failed or passed its deadline), reply (an answer not sent).",
            &[("cage", cage), ("interface", interface), ("reason", reason)],
            move || counts.all().iter().find(|(r, _)| *r == reason).map(|(_, n)| *n as f64).unwrap_or(0.0),
        );
    }
    d
}

/// Binds the socket, with the receive buffer asked for; gives the buffer the system granted.
fn bind(addr: SocketAddr, recv_buffer: Option<usize>) -> std::io::Result<(UdpSocket, usize)> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if let Some(n) = recv_buffer {
        s.set_recv_buffer_size(n)?;
    }
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    let granted = s.recv_buffer_size()?;
    let socket: std::net::UdpSocket = s.into();
    Ok((UdpSocket::from_std(socket)?, granted))
}

/// A datagram waiting for a slot.
struct Datagram {
    data: Vec<u8>,
    peer: SocketAddr,
}

impl UdpInterface {
    /// Binds and serves until the shutdown (`Ok`), or fails (bind, a socket that keeps failing).
    async fn session(&self, host: &Host, outage: &mut Outage) -> Result<(), String> {
        let spec = host.spec();
        let addr = self.listen.value;
        let (socket, granted) = bind(addr, self.recv_buffer).map_err(|e| format!("interface {}: cannot listen on udp {addr}: {e}", spec.name))?;
        let local = socket.local_addr().map(|a| a.to_string()).unwrap_or_else(|_| addr.to_string());
        if let Some(after) = outage.end() {
            tracing::info!(cage = %spec.cage, interface = %spec.name, "listening again on {local} (udp) after {after:.1?}");
        }
        if let Some(asked) = self.recv_buffer {
            // Linux doubles what it is asked for (bookkeeping) and caps it at net.core.rmem_max.
            if granted < asked {
                tracing::warn!(cage = %spec.cage, interface = %spec.name, "recv_buffer: asked for {asked} bytes, the system granted {granted} (raise net.core.rmem_max)");
            }
        }
        tracing::info!(cage = %spec.cage, interface = %spec.name, "listening on {local} (udp, receive buffer {granted} bytes)");
        let mut serving = Serving {
            host: host.clone(),
            socket: Arc::new(socket),
            local,
            max_reply_size: self.max_reply_size,
            drops: drops(&spec.cage, &spec.name),
            counts: rustomnic_core::metrics::message_counts(&spec.cage, &spec.name),
            running: 0,
            pending: VecDeque::new(),
        };
        serving.serve(self).await
    }
}

/// One bound socket and what is in flight on it.
struct Serving {
    host: Host,
    socket: Arc<UdpSocket>,
    local: String,
    max_reply_size: usize,
    drops: Arc<Drops>,
    counts: Arc<MessageCounts>,
    running: usize,
    pending: VecDeque<Datagram>,
}

impl Serving {
    async fn serve(&mut self, config: &UdpInterface) -> Result<(), String> {
        let mut shutdown = self.host.shutdown();
        // One byte more than allowed: a datagram that fills it was truncated, so too big.
        let mut buf = vec![0u8; config.max_datagram_size + 1];
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<()>();
        let mut report = tokio::time::interval(Duration::from_secs(1));
        report.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut reported = self.drops.all();
        let mut errors = 0u32;
        let result = loop {
            tokio::select! {
                _ = shutdown.changed() => break Ok(()),
                Some(()) = done_rx.recv() => {
                    self.running = self.running.saturating_sub(1);
                    while self.running < config.concurrency {
                        let Some(d) = self.pending.pop_front() else { break };
                        self.start(d, &done_tx);
                    }
                }
                r = self.socket.recv_from(&mut buf) => match r {
                    Ok((n, peer)) => {
                        errors = 0;
                        self.counts.received.fetch_add(1, Ordering::Relaxed);
                        if n > config.max_datagram_size {
                            self.drops.oversize.fetch_add(1, Ordering::Relaxed);
                            self.counts.refused.fetch_add(1, Ordering::Relaxed);
                        } else if self.running < config.concurrency {
                            self.start(Datagram { data: buf[..n].to_vec(), peer }, &done_tx);
                        } else if self.pending.len() < config.max_pending {
                            self.pending.push_back(Datagram { data: buf[..n].to_vec(), peer });
                        } else {
                            self.drops.full.fetch_add(1, Ordering::Relaxed);
                            self.counts.refused.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(e) => {
                        errors += 1;
                        tracing::debug!(cage = %self.host.spec().cage, interface = %self.host.spec().name, "udp receive: {e}");
                        if errors >= MAX_RECV_ERRORS {
                            break Err(format!("interface {}: udp socket {} keeps failing: {e}", self.host.spec().name, self.local));
                        }
                    }
                },
                _ = report.tick() => reported = self.report(reported),
            }
        };
        self.stop(&mut done_rx).await;
        self.report(reported);
        result
    }

    /// Starts the request of one datagram; its end is said on `done`.
    fn start(&mut self, d: Datagram, done: &mpsc::UnboundedSender<()>) {
        self.running += 1;
        let spec = self.host.spec();
        let info = Value::Map(vec![(Value::str("peer"), Value::str(d.peer.to_string())), (Value::str("local"), Value::str(self.local.clone()))]);
        let run = self.host.run(Request {
            handler: spec.handler.value.clone(),
            args: vec![Value::Str(d.data), info],
            deadline: Instant::now() + spec.request_timeout,
            parameters: None,
        });
        let (socket, drops, counts, done, max_reply, peer) =
            (self.socket.clone(), self.drops.clone(), self.counts.clone(), done.clone(), self.max_reply_size, d.peer);
        tokio::spawn(async move {
            match run.await {
                Ok(values) => {
                    counts.acked.fetch_add(1, Ordering::Relaxed);
                    match values.into_iter().next() {
                        None | Some(Value::Nil) => {}
                        Some(Value::Str(reply)) if reply.len() > max_reply => {
                            drops.reply_problem(format!("a reply of {} bytes is over max_reply_size ({max_reply})", reply.len()))
                        }
                        Some(Value::Str(reply)) => {
                            if let Err(e) = socket.send_to(&reply, peer).await {
                                drops.reply_problem(format!("the reply to {peer} was not sent: {e}"));
                            }
                        }
                        Some(other) => drops.reply_problem(format!("the handler returned a value of type {}; only a string is sent back", other.type_name())),
                    }
                }
                // The worker has logged it with its request id.
                Err(_) => {
                    drops.failed.fetch_add(1, Ordering::Relaxed);
                }
            }
            let _ = done.send(());
        });
    }

    /// Says what was dropped since `last` (one warning at most per call, so at most one a
    /// second); gives the counts now.
    fn report(&self, last: [(&'static str, u64); 4]) -> [(&'static str, u64); 4] {
        let now = self.drops.all();
        if now != last {
            let spec = self.host.spec();
            let parts: Vec<String> = now.iter().zip(last.iter()).map(|((r, n), (_, l))| format!("{r} {}", n - l)).collect();
            let totals: Vec<String> = now.iter().map(|(r, n)| format!("{r} {n}")).collect();
            let note = self.drops.note.lock().ok().and_then(|mut n| n.take()).map(|n| format!("; last reply problem: {n}")).unwrap_or_default();
            tracing::warn!(cage = %spec.cage, interface = %spec.name, "udp datagrams dropped: {} (since start: {}){note}", parts.join(", "), totals.join(", "));
        }
        now
    }

    /// Stops taking datagrams: those waiting are dropped (said in the log), those in flight end
    /// (their replies are sent), at most until their deadline and two seconds more.
    async fn stop(&mut self, done_rx: &mut mpsc::UnboundedReceiver<()>) {
        let spec = self.host.spec();
        if !self.pending.is_empty() {
            tracing::info!(cage = %spec.cage, interface = %spec.name, "stopping: {} datagram(s) waiting are dropped", self.pending.len());
            self.pending.clear();
        }
        let limit = Instant::now() + spec.request_timeout + Duration::from_secs(2);
        while self.running > 0 {
            match tokio::time::timeout_at(limit.into(), done_rx.recv()).await {
                Ok(Some(())) => self.running -= 1,
                Ok(None) | Err(_) => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn drops_are_kept_per_interface_and_exposed_as_gauges() {
        let a = drops("udp-test", "in");
        a.full.fetch_add(3, Ordering::Relaxed);
        let again = drops("udp-test", "in");
        assert_eq!(again.full.load(Ordering::Relaxed), 3, "a replaced interface counts on");
        let gauge = rustomnic_core::metrics::gauges()
            .into_iter()
            .find(|g| g.name == "pmnc_udp_datagrams_dropped" && g.label("cage") == "udp-test" && g.label("reason") == "full")
            .unwrap();
        assert_eq!((gauge.read)(), 3.0);
    }

    #[tokio::test]
    async fn a_datagram_one_byte_over_the_limit_is_told_apart() {
        let (socket, _) = bind("127.0.0.1:0".parse().unwrap(), Some(1 << 20)).unwrap();
        let to = socket.local_addr().unwrap();
        let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        peer.send_to(&[7u8; 11], to).unwrap();
        peer.send_to(&[7u8; 10], to).unwrap();
        let mut buf = [0u8; 11];
        let (n, _) = socket.recv_from(&mut buf).await.unwrap();
        assert_eq!(n, 11, "11 bytes fill a buffer of limit 10 + 1: too big");
        let (n, _) = socket.recv_from(&mut buf).await.unwrap();
        assert_eq!(n, 10);
    }
}
