//! The `udp` resource: `xa.<name>.send(data)` inside a transaction keeps a datagram until the
//! transaction commits; the commit sends it to the configured target, a rollback sends nothing.
//! For statsd and syslog feeds: delivery is never confirmed (it is UDP). See
//! docs/resources/udp.md and docs/decisions/135.
//!
//! ```toml
//! [resources.statsd]
//! protocol = "udp"
//! target = "127.0.0.1:8125"   # required: host:port; a name is resolved when a connection is made
//! max_datagram_size = 65507   # bytes; bigger data is refused at the call; at most 65507
//! max_datagrams = 100         # datagrams one participant may send in one transaction
//! ```
//!
//! The pool keys (`pool_size`, ...) are the runtime's; a pooled connection is one UDP socket
//! connected to the target. A send the system refuses at commit (no route, or an ICMP "port
//! unreachable" that a previous datagram brought back) fails the commit and drops the socket.

use std::net::SocketAddr;
use std::sync::Arc;

use futures_util::future::LocalBoxFuture;
use rustomnic_core::{Section, Value};
use rustomnic_resource::{Connection, Error, Resource, ResourceProtocol};
use tokio::net::UdpSocket;

/// The keys this protocol reads itself.
pub const KEYS: &[&str] = &["target", "max_datagram_size", "max_datagrams"];

/// The largest payload of a UDP datagram over IPv4.
pub const MAX_DATAGRAM: usize = 65_507;

/// The `udp` resource protocol.
pub struct Udp;

struct Settings {
    /// `host:port` as written.
    target: String,
    max_datagram_size: usize,
    max_datagrams: usize,
}

struct UdpResource(Arc<Settings>);

/// Checks `host:port` (a bracketed IPv6 address, an IPv4 address or a name, then a port).
fn check_target(t: &str) -> Result<(), String> {
    let Some((host, port)) = t.rsplit_once(':') else { return Err(format!("{t:?} is not host:port, e.g. \"127.0.0.1:8125\"")) };
    if host.is_empty() || port.parse::<u16>().ok().filter(|p| *p != 0).is_none() {
        return Err(format!("{t:?} is not host:port with a port from 1 to 65535, e.g. \"127.0.0.1:8125\""));
    }
    Ok(())
}

impl ResourceProtocol for Udp {
    fn name(&self) -> &'static str {
        "udp"
    }

    fn configure(&self, _resource: &str, section: &Section) -> Option<Arc<dyn Resource>> {
        let max_datagram_size = section.integer("max_datagram_size", 1, MAX_DATAGRAM as i64).map(|v| v.value as usize).unwrap_or(MAX_DATAGRAM);
        let max_datagrams = section.integer("max_datagrams", 1, 100_000).map(|v| v.value as usize).unwrap_or(100);
        let target = section.required_parsed("target", "127.0.0.1:8125", |t| check_target(t).map(|()| t.to_string()))?;
        Some(Arc::new(UdpResource(Arc::new(Settings { target, max_datagram_size, max_datagrams }))))
    }
}

impl Resource for UdpResource {
    fn connect(&self) -> LocalBoxFuture<'static, Result<Box<dyn Connection>, Error>> {
        let s = self.0.clone();
        Box::pin(async move {
            let to: SocketAddr = tokio::net::lookup_host(&s.target)
                .await
                .map_err(|e| Error::new(format!("udp {}: cannot resolve: {e}", s.target)))?
                .next()
                .ok_or_else(|| Error::new(format!("udp {}: the name has no address", s.target)))?;
            let any: SocketAddr = if to.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { (std::net::Ipv6Addr::UNSPECIFIED, 0).into() };
            let socket = UdpSocket::bind(any).await.map_err(|e| Error::new(format!("udp {}: cannot open a socket: {e}", s.target)))?;
            socket.connect(to).await.map_err(|e| Error::new(format!("udp {}: cannot connect to {to}: {e}", s.target)))?;
            Ok(Box::new(UdpConnection { settings: s, socket, pending: Vec::new() }) as Box<dyn Connection>)
        })
    }

    fn default_pool_size(&self) -> usize {
        2
    }
}

/// One socket and the datagrams its transaction holds back until the commit.
struct UdpConnection {
    settings: Arc<Settings>,
    socket: UdpSocket,
    pending: Vec<Vec<u8>>,
}

impl Connection for UdpConnection {
    fn begin(&mut self) -> LocalBoxFuture<'_, Result<(), Error>> {
        self.pending.clear();
        Box::pin(async { Ok(()) })
    }

    fn call<'a>(&'a mut self, method: &'a str, args: Vec<Value>) -> LocalBoxFuture<'a, Result<Value, Error>> {
        Box::pin(async move {
            if method != "send" {
                return Err(Error::new(format!("no method {method} (methods: send)")));
            }
            let data = match args.into_iter().next() {
                Some(Value::Str(b)) => b,
                Some(other) => return Err(Error::new(format!("send takes a string, not a {}", other.type_name()))),
                None => return Err(Error::new("send takes a string: send(data)")),
            };
            if data.len() > self.settings.max_datagram_size {
                return Err(Error::new(format!("{} bytes are over max_datagram_size ({})", data.len(), self.settings.max_datagram_size)));
            }
            if self.pending.len() >= self.settings.max_datagrams {
                return Err(Error::new(format!("more than max_datagrams ({}) in one transaction", self.settings.max_datagrams)));
            }
            self.pending.push(data);
            Ok(Value::Nil)
        })
    }

    fn commit(&mut self) -> LocalBoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            for data in std::mem::take(&mut self.pending) {
                self.socket.send(&data).await.map_err(|e| Error::broken(format!("udp {}: send: {e}", self.settings.target)))?;
            }
            Ok(())
        })
    }

    fn rollback(&mut self) -> LocalBoxFuture<'_, Result<(), Error>> {
        self.pending.clear();
        Box::pin(async { Ok(()) })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use rustomnic_resource::testing::{configure, run_lua};
    use std::time::Duration;

    const LUA: &str = r#"
local M = {}
function M.go(what)
  local opts = {}
  if what == "rollback" then opts.accept = function() return false end end
  local xa = pmnc.transaction.create(opts)
  xa.feed.send("count:" .. what .. "|c")
  xa.feed.send("second")
  xa.execute()
  return "ok"
end
function M.bad()
  local xa = pmnc.transaction.create()
  xa.feed.send(string.rep("x", 11))
  xa.execute()
end
return M
"#;

    #[test]
    fn committed_datagrams_are_sent_and_rolled_back_ones_are_not() {
        let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        peer.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
        let toml = format!("protocol = \"udp\"\ntarget = \"{}\"\nmax_datagram_size = 10\n", peer.local_addr().unwrap());
        let config = configure(&Udp, "feed", &toml).unwrap();
        let _ = run_lua(vec![config.clone()], LUA, "go", vec![Value::str("rollback")], Duration::from_secs(5));
        let mut buf = [0u8; 100];
        assert!(peer.recv_from(&mut buf).is_err(), "a rolled back transaction sends nothing");
        let r = run_lua(vec![config.clone()], LUA, "go", vec![Value::str("a")], Duration::from_secs(5));
        assert!(r.is_ok(), "{r:?}");
        let (n, _) = peer.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"count:a|c");
        let (n, _) = peer.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"second");
        let e = run_lua(vec![config], LUA, "bad", vec![], Duration::from_secs(5)).unwrap_err();
        assert!(e.to_string().contains("over max_datagram_size"), "{e}");
        assert!(peer.recv_from(&mut buf).is_err());
    }

    #[test]
    fn targets_are_checked() {
        assert!(check_target("127.0.0.1:8125").is_ok());
        assert!(check_target("[::1]:8125").is_ok());
        assert!(check_target("statsd.local:8125").is_ok());
        for bad in ["127.0.0.1", ":8125", "h:0", "h:70000", "h:x"] {
            assert!(check_target(bad).is_err(), "{bad}");
        }
        let e = configure(&Udp, "feed", "protocol = \"udp\"\ntarget = \"nope\"\n").err().unwrap();
        assert!(e.iter().any(|m| m.contains("target")), "{e:?}");
    }
}
