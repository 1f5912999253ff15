//! The service manager's notify protocol (systemd `Type=notify`): `READY=1` once every interface
//! listens and the cages' state and queues are open, `STOPPING=1` when a stop begins, and
//! `STATUS=` lines saying what the process is doing, and `WATCHDOG=1` at half the period systemd
//! gives in `WATCHDOG_USEC` while every worker thread answers the liveness probe (the runtime
//! sends those; decision 144). Off unless `NOTIFY_SOCKET` is set, which systemd does for a
//! `Type=notify` unit. See docs/deploy.md.
//!
//! The protocol is one datagram per message on the unix socket named by `NOTIFY_SOCKET` (a path,
//! or `@name` for an abstract socket), each a few `KEY=value` lines. A lost message is not an
//! error worth stopping for: it is logged once at debug level and the process goes on.

use std::os::unix::net::UnixDatagram;

/// Where notifications go, read once from the environment at start.
pub struct Notifier {
    socket: UnixDatagram,
    target: Target,
    /// The watchdog period systemd expects pings within (`WatchdogSec=`), when it set one for
    /// this process.
    pub watchdog: Option<std::time::Duration>,
}

enum Target {
    Path(std::path::PathBuf),
    Abstract(Vec<u8>),
}

impl Notifier {
    /// The notifier of this process, or `None` when no service manager asked for one. Takes
    /// `NOTIFY_SOCKET` out of the environment, so that processes the cages start (the cmdexec
    /// resource) cannot speak for this one; call it before any other thread starts.
    pub fn from_env() -> Option<Notifier> {
        let watchdog = watchdog_from_env();
        let value = std::env::var_os("NOTIFY_SOCKET")?;
        // SAFETY of the environment: called at the start of `run`, before the runtime's threads.
        std::env::remove_var("NOTIFY_SOCKET");
        let bytes = std::os::unix::ffi::OsStrExt::as_bytes(value.as_os_str()).to_vec();
        let target = match bytes.strip_prefix(b"@") {
            Some(name) => Target::Abstract(name.to_vec()),
            None if bytes.starts_with(b"/") => Target::Path(std::path::PathBuf::from(value)),
            None => {
                tracing::warn!("NOTIFY_SOCKET={:?} is neither a path nor an abstract socket (@name); the service manager will not be notified", value);
                return None;
            }
        };
        // Non-blocking: a manager that does not read (its queue full) must never stop the thread
        // that notifies it; such a message is lost, as any other failed send.
        match UnixDatagram::unbound().and_then(|s| s.set_nonblocking(true).map(|()| s)) {
            Ok(socket) => Some(Notifier { socket, target, watchdog }),
            Err(e) => {
                tracing::warn!("cannot open a socket to notify the service manager: {e}");
                None
            }
        }
    }

    /// Sends one message (`KEY=value` lines).
    pub fn send(&self, message: &str) {
        let sent = match &self.target {
            Target::Path(p) => self.socket.send_to(message.as_bytes(), p),
            Target::Abstract(name) => {
                use std::os::linux::net::SocketAddrExt;
                std::os::unix::net::SocketAddr::from_abstract_name(name).and_then(|a| self.socket.send_to_addr(message.as_bytes(), &a))
            }
        };
        if let Err(e) = sent {
            tracing::debug!("notifying the service manager ({message:?}): {e}");
        }
    }
}

/// The watchdog period from `WATCHDOG_USEC`, when `WATCHDOG_PID` is absent or names this
/// process. Both are taken out of the environment, as `NOTIFY_SOCKET` is, so that a program a
/// cage starts does not believe the watchdog is its own.
fn watchdog_from_env() -> Option<std::time::Duration> {
    let usec = std::env::var("WATCHDOG_USEC").ok();
    let pid = std::env::var("WATCHDOG_PID").ok();
    std::env::remove_var("WATCHDOG_USEC");
    std::env::remove_var("WATCHDOG_PID");
    watchdog_period(usec.as_deref(), pid.as_deref(), std::process::id())
}

/// `WATCHDOG_USEC` read as systemd writes it: a positive count of microseconds, for the process
/// `WATCHDOG_PID` names (any process when it is absent).
fn watchdog_period(usec: Option<&str>, pid: Option<&str>, me: u32) -> Option<std::time::Duration> {
    if let Some(pid) = pid {
        if pid.trim().parse::<u32>().ok() != Some(me) {
            tracing::debug!("WATCHDOG_PID={pid} is not this process ({me}); no watchdog pings");
            return None;
        }
    }
    let usec = usec?;
    match usec.trim().parse::<u64>() {
        Ok(n) if n > 0 => Some(std::time::Duration::from_micros(n)),
        _ => {
            tracing::warn!("WATCHDOG_USEC={usec:?} is not a positive number of microseconds; no watchdog pings");
            None
        }
    }
}

/// A `STATUS=` value on one line (the protocol is line based).
pub fn status_line(text: &str) -> String {
    text.replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_message_reaches_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let listener = UnixDatagram::bind(&path).unwrap();
        let n = Notifier { socket: UnixDatagram::unbound().unwrap(), target: Target::Path(path), watchdog: None };
        n.send("READY=1\nSTATUS=serving");
        let mut buf = [0u8; 64];
        let len = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=serving");
    }

    #[test]
    fn a_message_reaches_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("rustomnic-notify-test-{}", std::process::id());
        let listener = UnixDatagram::bind_addr(&std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap()).unwrap();
        let n = Notifier { socket: UnixDatagram::unbound().unwrap(), target: Target::Abstract(name.into_bytes()), watchdog: None };
        n.send("STOPPING=1");
        let mut buf = [0u8; 64];
        let len = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"STOPPING=1");
    }

    #[test]
    fn the_watchdog_period_is_read_for_this_process_only() {
        use std::time::Duration;
        assert_eq!(watchdog_period(Some("30000000"), None, 7), Some(Duration::from_secs(30)));
        assert_eq!(watchdog_period(Some("30000000"), Some("7"), 7), Some(Duration::from_secs(30)));
        assert_eq!(watchdog_period(Some("30000000"), Some("8"), 7), None, "another process's watchdog");
        assert_eq!(watchdog_period(Some("0"), None, 7), None);
        assert_eq!(watchdog_period(Some("soon"), None, 7), None);
        assert_eq!(watchdog_period(None, Some("7"), 7), None);
    }

    #[test]
    fn a_status_stays_on_one_line() {
        assert_eq!(status_line("a\nb\r\nc"), "a b  c");
    }
}
