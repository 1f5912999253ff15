//! `pmnc health URL`: asks a health endpoint of the monitor (`/healthz`, `/readyz`) and exits 0
//! when it answers 200, for a container's HEALTHCHECK on an image without curl. Plain HTTP on
//! a loopback or container address; one GET, bounded by a timeout.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// GETs `url` (`http://host:port/path`) and returns the status line and body; Err with the
/// reason when it cannot be asked or the status is not 200.
pub fn check(url: &str, timeout: Duration) -> Result<String, String> {
    let rest = url.strip_prefix("http://").ok_or_else(|| format!("{url:?}: only http:// URLs (the monitor on a local address)"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let started = Instant::now();
    let addr = authority.to_socket_addrs().map_err(|e| format!("{authority}: {e}"))?.next().ok_or_else(|| format!("{authority}: no address"))?;
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("{addr}: {e}"))?;
    let left = timeout.saturating_sub(started.elapsed()).max(Duration::from_millis(1));
    s.set_read_timeout(Some(left)).map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(left)).map_err(|e| e.to_string())?;
    write!(s, "GET {path} HTTP/1.1\r\nhost: {authority}\r\nconnection: close\r\nuser-agent: pmnc-health\r\n\r\n").map_err(|e| format!("{addr}: {e}"))?;
    let mut answer = Vec::new();
    // The body is a small JSON document; more than 64 KiB is not a health answer.
    s.take(64 << 10).read_to_end(&mut answer).map_err(|e| format!("{addr}: {e}"))?;
    let text = String::from_utf8_lossy(&answer);
    let status_line = text.lines().next().unwrap_or("");
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.trim()).unwrap_or("");
    match status_line.split_whitespace().nth(1) {
        Some("200") => Ok(format!("{status_line}: {body}")),
        Some(_) => Err(format!("{status_line}: {body}")),
        None => Err(format!("{addr}: no HTTP answer")),
    }
}
