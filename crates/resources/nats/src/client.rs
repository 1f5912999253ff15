//! NATS server urls read from config (checked at `pmnc check`, shown without credentials) and
//! connections made from them, for the nats resource and the nats interface alike.

use std::str::FromStr;
use std::time::Duration;

use async_nats::{ConnectOptions, Event, ServerAddr};
use rustomnic_core::Section;

/// Checked server addresses and their display form (host:port, comma-separated, no credentials).
#[derive(Clone, Debug)]
pub struct NatsUrl {
    pub servers: Vec<ServerAddr>,
    pub display: String,
}

/// Reads the url at `key` of `section`: required, one or more `nats://` addresses separated by
/// commas. Problems are recorded in the section (file, line, key); the url's text stays out of
/// them, as it may hold a password.
pub fn read_url(section: &Section, key: &str) -> Option<NatsUrl> {
    section.required_parsed(key, "nats://127.0.0.1:4222", parse_url)
}

/// Parses `nats://[user:password@]host[:port]`, several separated by commas (a cluster's
/// servers). TLS (`tls://`) is not offered yet.
pub fn parse_url(text: &str) -> Result<NatsUrl, String> {
    let mut servers = Vec::new();
    let mut shown = Vec::new();
    for part in text.split(',').map(str::trim) {
        if part.is_empty() {
            return Err("names no server (an empty address between commas?); write \"nats://127.0.0.1:4222\"".to_string());
        }
        if part.starts_with("tls://") || part.starts_with("wss://") {
            return Err(
                "tls:// (TLS) is not supported yet by the nats interface and resource; use nats:// on a trusted network or a local TLS tunnel".to_string()
            );
        }
        if !part.starts_with("nats://") {
            return Err("not a NATS url: each server must start with nats:// (such as \"nats://127.0.0.1:4222\")".to_string());
        }
        // The error text of the parser may repeat the url (and its password): said without it.
        let addr = ServerAddr::from_str(part).map_err(|_| format!("server #{} is not a usable NATS address (nats://host:port)", servers.len() + 1))?;
        if addr.host().is_empty() {
            return Err(format!("server #{} names no host", servers.len() + 1));
        }
        shown.push(format!("{}:{}", addr.host(), addr.port()));
        servers.push(addr);
    }
    Ok(NatsUrl { servers, display: shown.join(",") })
}

/// What a connection reports about its link, besides errors (the interface logs an outage once).
pub type OnEvent = Box<dyn Fn(&Event) + Send + Sync>;

/// Opens a client (on the current tokio runtime, which must keep running while it is used),
/// named `name` in the server's list of connections. The client reconnects by itself, for ever,
/// with a backoff from 50 ms up to 2 s; requests carry no timeout of their own (the caller's
/// deadline bounds them).
pub async fn connect(url: &NatsUrl, name: &str, connect_timeout: Duration, on_event: Option<OnEvent>) -> Result<async_nats::Client, String> {
    let mut options = ConnectOptions::new()
        .name(name)
        .connection_timeout(connect_timeout)
        .request_timeout(None)
        .max_reconnects(None)
        .ping_interval(Duration::from_secs(5))
        // A restarted server is rejoined within a fraction of a second; a long outage does not
        // turn into a busy loop.
        .reconnect_delay_callback(|attempts| Duration::from_millis(50).saturating_mul(1u32 << attempts.min(6) as u32).min(Duration::from_secs(2)));
    if let Some(cb) = on_event {
        let cb = std::sync::Arc::new(cb);
        options = options.event_callback(move |event| {
            let cb = cb.clone();
            async move { cb(&event) }
        });
    }
    options.connect(url.servers.clone()).await.map_err(|e| format!("cannot connect to NATS at {}: {}", url.display, connect_error(&e)))
}

fn connect_error(e: &async_nats::ConnectError) -> String {
    use async_nats::ConnectErrorKind as K;
    match e.kind() {
        K::AuthorizationViolation | K::Authentication => format!("the server refused the credentials in the url: {e}"),
        K::TimedOut => "no answer in time".to_string(),
        _ => rustomnic_resource::error_chain(e),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn urls_are_checked_and_shown_without_credentials() {
        let u = parse_url("nats://me:secret@127.0.0.1:4333").unwrap();
        assert_eq!(u.display, "127.0.0.1:4333");
        assert!(!u.display.contains("secret"));
        let two = parse_url("nats://a:4222, nats://b").unwrap();
        assert_eq!(two.display, "a:4222,b:4222");
        assert_eq!(two.servers.len(), 2);
        assert!(parse_url("http://x").unwrap_err().contains("must start with nats://"));
        assert!(parse_url("tls://x").unwrap_err().contains("not supported"));
        assert!(parse_url("nats://a,,nats://b").unwrap_err().contains("names no server"));
        let bad = parse_url("nats://me:secret@h:notaport").unwrap_err();
        assert!(!bad.contains("secret"), "{bad}");
    }
}
