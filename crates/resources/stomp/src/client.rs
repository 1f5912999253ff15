//! STOMP urls read from config (checked at `pmnc check`, shown without credentials), and
//! connections over tokio: CONNECT/CONNECTED with heart-beat negotiation, then frames read
//! through the bounded [`Decoder`] and written whole. Shared by the stomp resource and interface.

use std::time::Duration;

use rustomnic_core::Section;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

use crate::frame::{Decoded, Decoder, Frame, Limits};

/// A checked url and its display form (host:port/vhost, no credentials).
#[derive(Clone, Debug)]
pub struct StompUrl {
    pub host: String,
    pub port: u16,
    pub login: Option<String>,
    pub passcode: Option<String>,
    /// The `host` header of CONNECT (RabbitMQ: the virtual host).
    pub vhost: String,
    pub display: String,
}

/// Reads the url at `key` of `section`: required, `stomp://` only. Problems are recorded in the
/// section (file, line, key); the url's text stays out of them, as it may hold a password.
pub fn read_url(section: &Section, key: &str) -> Option<StompUrl> {
    section.required_parsed(key, "stomp://guest:guest@127.0.0.1:61613/", parse_url)
}

/// Parses `stomp://user:password@host:port/vhost` (port 61613 by default, vhost `/`).
pub fn parse_url(text: &str) -> Result<StompUrl, String> {
    if text.starts_with("stomp+ssl://") || text.starts_with("stomps://") {
        return Err("STOMP over TLS is not supported yet; use stomp:// on a trusted network or a local TLS tunnel".to_string());
    }
    let Some(rest) = text.strip_prefix("stomp://") else {
        return Err("not a STOMP url: it must start with stomp:// (such as \"stomp://guest:guest@127.0.0.1:61613/\")".to_string());
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, ""),
    };
    let (userinfo, hostport) = match authority.rfind('@') {
        Some(i) => (Some(&authority[..i]), &authority[i + 1..]),
        None => (None, authority),
    };
    let (login, passcode) = match userinfo {
        Some(u) => match u.split_once(':') {
            Some((l, p)) => (Some(percent_decode(l)?), Some(percent_decode(p)?)),
            None => (Some(percent_decode(u)?), None),
        },
        None => (None, None),
    };
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || hostport.starts_with('[') => {
            (h.to_string(), p.parse::<u16>().map_err(|_| format!("the port {p:?} is not a number from 1 to 65535"))?)
        }
        _ => (hostport.to_string(), 61613),
    };
    if host.is_empty() {
        return Err("the url names no host".to_string());
    }
    let vhost = if path.is_empty() { "/".to_string() } else { percent_decode(path)? };
    let display = format!("{host}:{port}/{}", if vhost == "/" { "%2f" } else { vhost.as_str() });
    Ok(StompUrl { host, port, login, passcode, vhost, display })
}

fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(h, 16).ok()).ok_or_else(|| "a bad %-escape in the url".to_string())?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "the url is not UTF-8 once %-decoded".to_string())
}

/// Frames from the peer.
pub struct Reader {
    half: OwnedReadHalf,
    decoder: Decoder,
    display: String,
    buf: Vec<u8>,
}

impl Reader {
    /// The next frame or heart-beat; an error ends the connection.
    pub async fn next(&mut self) -> Result<Decoded, String> {
        loop {
            if let Some(d) = self.decoder.decode().map_err(|e| format!("{}: {e}", self.display))? {
                return Ok(d);
            }
            let n = self.half.read(&mut self.buf).await.map_err(|e| format!("{}: reading failed: {e}", self.display))?;
            if n == 0 {
                return Err(format!("{}: the broker closed the connection", self.display));
            }
            self.decoder.extend(&self.buf[..n]);
        }
    }

    /// Whether the connection is still open and the peer has said nothing since (between
    /// transactions a resource expects silence: anything else is an ERROR before a close).
    pub fn idle_and_open(&mut self) -> bool {
        let mut probe = [0u8; 256];
        matches!(self.half.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }

    /// The next frame (heart-beats skipped); an ERROR frame is returned as an error.
    pub async fn frame(&mut self) -> Result<Frame, String> {
        loop {
            if let Decoded::Frame(f) = self.next().await? {
                if f.command == "ERROR" {
                    return Err(format!("{}: the broker said: {}", self.display, error_text(&f)));
                }
                return Ok(f);
            }
        }
    }
}

/// The text of an ERROR frame: its `message` header and its body.
pub fn error_text(f: &Frame) -> String {
    let message = f.get("message").unwrap_or("ERROR");
    let body = String::from_utf8_lossy(&f.body);
    let body = body.trim();
    if body.is_empty() {
        message.to_string()
    } else {
        format!("{message} ({})", body.chars().take(500).collect::<String>())
    }
}

/// Frames to the peer.
pub struct Writer {
    half: OwnedWriteHalf,
    display: String,
}

impl Writer {
    pub async fn send(&mut self, f: &Frame) -> Result<(), String> {
        self.send_bytes(&f.encode()).await
    }

    pub async fn send_bytes(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.half.write_all(bytes).await.map_err(|e| format!("{}: writing failed: {e}", self.display))
    }
}

/// A connection after CONNECTED.
pub struct Connected {
    pub reader: Reader,
    pub writer: Writer,
    /// How often we must send something, zero for never.
    pub send_every: Duration,
    /// How long the broker may stay silent (twice its interval), zero for no limit.
    pub silent_at_most: Duration,
    pub server: String,
}

/// Connects and logs in within `timeout`. `heart_beat` is what we offer both ways (zero: none).
pub async fn connect(url: &StompUrl, heart_beat: Duration, limits: Limits, timeout: Duration) -> Result<Connected, String> {
    match tokio::time::timeout(timeout, connect_now(url, heart_beat, limits)).await {
        Ok(r) => r,
        Err(_) => Err(format!("cannot connect to {}: no answer within {timeout:?}", url.display)),
    }
}

async fn connect_now(url: &StompUrl, heart_beat: Duration, limits: Limits) -> Result<Connected, String> {
    let stream = TcpStream::connect((url.host.as_str(), url.port)).await.map_err(|e| format!("cannot connect to {}: {e}", url.display))?;
    let _ = stream.set_nodelay(true);
    let (r, w) = stream.into_split();
    let mut reader = Reader { half: r, decoder: Decoder::new(limits), display: url.display.clone(), buf: vec![0; 64 << 10] };
    let mut writer = Writer { half: w, display: url.display.clone() };
    let ms = heart_beat.as_millis().min(u128::from(u32::MAX)) as u64;
    let mut connect = Frame::new("CONNECT").header("accept-version", "1.2").header("host", url.vhost.clone()).header("heart-beat", format!("{ms},{ms}"));
    if let Some(l) = &url.login {
        connect = connect.header("login", l.clone());
    }
    if let Some(p) = &url.passcode {
        connect = connect.header("passcode", p.clone());
    }
    writer.send(&connect).await?;
    let connected = reader.frame().await.map_err(|e| format!("cannot connect: {e}"))?;
    if connected.command != "CONNECTED" {
        return Err(format!("{}: expected CONNECTED, got {}", url.display, connected.command));
    }
    if connected.get("version") != Some("1.2") {
        return Err(format!("{}: the broker does not speak STOMP 1.2 (version {:?})", url.display, connected.get("version")));
    }
    let (sx, sy) = parse_heart_beat(connected.get("heart-beat").unwrap_or("0,0"));
    let send_every = if ms == 0 || sy == 0 { 0 } else { ms.max(sy) };
    let silent = if ms == 0 || sx == 0 { 0 } else { ms.max(sx) * 2 };
    Ok(Connected {
        reader,
        writer,
        send_every: Duration::from_millis(send_every),
        silent_at_most: Duration::from_millis(silent),
        server: connected.get("server").unwrap_or("").to_string(),
    })
}

fn parse_heart_beat(s: &str) -> (u64, u64) {
    let mut it = s.split(',').map(|p| p.trim().parse::<u64>().unwrap_or(0));
    (it.next().unwrap_or(0), it.next().unwrap_or(0))
}

/// A destination as the config or a call gives it: `/queue/x`, `/topic/x`, `/exchange/...`,
/// `/amq/queue/x` or `/temp-queue/x`, with no control characters.
pub fn check_destination(d: &str) -> Result<(), String> {
    const KINDS: &[&str] = &["/queue/", "/topic/", "/exchange/", "/amq/queue/", "/temp-queue/"];
    if !KINDS.iter().any(|k| d.starts_with(k) && d.len() > k.len()) {
        return Err(format!("destination {d:?} is not one of /queue/NAME, /topic/NAME, /exchange/NAME[/KEY], /amq/queue/NAME, /temp-queue/NAME"));
    }
    if d.len() > 1024 || d.chars().any(char::is_control) {
        return Err(format!("destination {:?} is over 1024 bytes or holds control characters", d.chars().take(40).collect::<String>()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn urls_are_checked_and_shown_without_credentials() {
        let u = parse_url("stomp://guest:se%40cret@127.0.0.1:61613/").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.vhost.as_str()), ("127.0.0.1", 61613, "/"));
        assert_eq!(u.passcode.as_deref(), Some("se@cret"));
        assert_eq!(u.display, "127.0.0.1:61613/%2f");
        assert_eq!(parse_url("stomp://h/v1").unwrap().display, "h:61613/v1");
        assert!(parse_url("amqp://h").unwrap_err().contains("must start with stomp://"));
        assert!(parse_url("stomp+ssl://h").unwrap_err().contains("not supported"));
        assert!(parse_url("stomp://h:x/").unwrap_err().contains("port"));
        assert!(parse_url("stomp:///").unwrap_err().contains("no host"));
    }

    #[test]
    fn destinations_are_checked() {
        assert!(check_destination("/queue/a").is_ok());
        assert!(check_destination("/topic/a.b").is_ok());
        assert!(check_destination("queue/a").is_err());
        assert!(check_destination("/queue/").is_err());
        assert!(check_destination("/queue/a\nb").is_err());
    }

    #[test]
    fn heart_beats_are_negotiated_from_both_sides() {
        assert_eq!(parse_heart_beat("4000,0"), (4000, 0));
        assert_eq!(parse_heart_beat("junk"), (0, 0));
    }
}
