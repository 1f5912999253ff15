//! AMQP urls read from config (checked at `pmnc check`, shown without credentials) and
//! connections made from them, for the amqp resource and the amqp interface alike.

use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::ConnectionProperties;
use rustomnic_core::Section;

/// A checked url and its display form (host:port/vhost, no credentials).
#[derive(Clone, Debug)]
pub struct AmqpUrl {
    pub uri: AMQPUri,
    pub display: String,
}

/// Reads the url at `key` of `section`: required, `amqp://` only. Problems are recorded in the
/// section (file, line, key); the url's text stays out of them, as it may hold a password.
pub fn read_url(section: &Section, key: &str) -> Option<AmqpUrl> {
    section.required_parsed(key, "amqp://guest:guest@127.0.0.1:5672/%2f", parse_url)
}

/// Parses an AMQP url (`amqp://user:password@host:port/vhost?heartbeat=30`).
pub fn parse_url(text: &str) -> Result<AmqpUrl, String> {
    if !text.starts_with("amqp://") && !text.starts_with("amqps://") {
        return Err("not an AMQP url: it must start with amqp:// (such as \"amqp://guest:guest@127.0.0.1:5672/%2f\")".to_string());
    }
    let uri: AMQPUri = text.parse().map_err(|e: String| format!("not a usable AMQP url: {e}"))?;
    if uri.scheme == AMQPScheme::AMQPS {
        return Err("amqps:// (TLS) is not supported yet; use amqp:// on a trusted network or a local TLS tunnel".to_string());
    }
    if uri.authority.host.is_empty() {
        return Err("the url names no host".to_string());
    }
    let vhost = if uri.vhost == "/" { "%2f".to_string() } else { uri.vhost.clone() };
    let display = format!("{}:{}/{}", uri.authority.host, uri.authority.port, vhost);
    Ok(AmqpUrl { uri, display })
}

/// Opens a connection (on the current tokio runtime, which must keep running while it is used),
/// named `name` in the broker's list of connections.
pub async fn connect(url: &AmqpUrl, name: &str) -> Result<lapin::Connection, String> {
    let props = ConnectionProperties::default().with_connection_name(name.to_string().into());
    lapin::Connection::connect_uri(url.uri.clone(), props)
        .await
        .map_err(|e| format!("cannot connect to {}: {}", url.display, rustomnic_resource::error_chain(&e)))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn urls_are_checked_and_shown_without_credentials() {
        let u = parse_url("amqp://guest:secret@127.0.0.1:5672/%2f").unwrap();
        assert_eq!(u.display, "127.0.0.1:5672/%2f");
        assert!(!u.display.contains("secret"));
        assert_eq!(parse_url("amqp://h/v").unwrap().display, "h:5672/v");
        assert!(parse_url("http://x").unwrap_err().contains("must start with amqp://"));
        assert!(parse_url("amqps://x").unwrap_err().contains("not supported"));
        assert!(parse_url("amqp://h:notaport/").is_err());
    }
}
