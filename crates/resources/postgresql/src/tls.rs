//! TLS to PostgreSQL: the `sslmode` of a libpq URL or of the `sslmode` key, and tokio-postgres'
//! TLS hook implemented on tokio-rustls with the settings of `rustomnic_resource::tls`.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use rustomnic_resource::tls::Verify;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};

/// The values of libpq's sslmode that this resource takes (allow is left out: it tries plain
/// first and so is never better than disable against an attacker).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

pub const SSLMODES: &str = "\"disable\", \"prefer\", \"require\", \"verify-ca\", \"verify-full\"";

impl SslMode {
    pub fn parse(text: &str) -> Result<SslMode, String> {
        Ok(match text {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            "allow" => return Err(format!("\"allow\" is not supported (it tries without TLS first); use one of {SSLMODES}")),
            other => return Err(format!("{other:?} is not an sslmode; use one of {SSLMODES}")),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// What tokio-postgres does before the handshake: plain, TLS if offered, or TLS or nothing.
    pub fn wire(self) -> tokio_postgres::config::SslMode {
        match self {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => tokio_postgres::config::SslMode::Require,
        }
    }

    /// How much of the certificate is checked; `None` without TLS.
    pub fn verify(self) -> Option<Verify> {
        match self {
            SslMode::Disable => None,
            SslMode::Prefer | SslMode::Require => Some(Verify::Nothing),
            SslMode::VerifyCa => Some(Verify::Chain),
            SslMode::VerifyFull => Some(Verify::Full),
        }
    }

    pub fn verifies(self) -> bool {
        matches!(self, SslMode::VerifyCa | SslMode::VerifyFull)
    }
}

/// The libpq URL parameters about TLS that are taken out of a URL before tokio-postgres reads it
/// (it knows neither verify-ca nor verify-full).
pub struct UrlTls {
    /// The URL without them.
    pub url: String,
    pub sslmode: Option<String>,
    /// sslrootcert, sslcert, sslkey, sslpassword...: named so the caller can point to the key
    /// that replaces them or say they are not supported.
    pub other: Vec<String>,
}

/// Takes `sslmode` and the other `ssl*` parameters out of the query of a postgres:// or
/// postgresql:// URL, or out of a key=value connection string.
pub fn take_url_tls(url: &str) -> UrlTls {
    let is_url = url.starts_with("postgres://") || url.starts_with("postgresql://");
    if !is_url {
        return take_key_value_tls(url);
    }
    let Some((head, query)) = url.split_once('?') else {
        return UrlTls { url: url.to_string(), sslmode: None, other: Vec::new() };
    };
    let mut kept = Vec::new();
    let mut sslmode = None;
    let mut other = Vec::new();
    for pair in query.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if key == "sslmode" {
            sslmode = Some(value.to_string());
        } else if key.starts_with("ssl") && key != "sslnegotiation" {
            other.push(key.to_string());
        } else {
            kept.push(pair);
        }
    }
    let url = if kept.is_empty() { head.to_string() } else { format!("{head}?{}", kept.join("&")) };
    UrlTls { url, sslmode, other }
}

/// The same for `host=h user=u sslmode=verify-full`. The string is rebuilt only when it has an
/// ssl word, since rejoining the words would change spaces inside a quoted value.
fn take_key_value_tls(text: &str) -> UrlTls {
    let is_ssl = |word: &str| word.starts_with("ssl") && !word.starts_with("sslnegotiation=");
    if !text.split_whitespace().any(is_ssl) {
        return UrlTls { url: text.to_string(), sslmode: None, other: Vec::new() };
    }
    let mut kept = Vec::new();
    let mut sslmode = None;
    let mut other = Vec::new();
    for word in text.split_whitespace() {
        match word.split_once('=') {
            Some(("sslmode", value)) => sslmode = Some(value.trim_matches('\'').to_string()),
            Some((key, _)) if is_ssl(word) => other.push(key.to_string()),
            _ => kept.push(word),
        }
    }
    UrlTls { url: kept.join(" "), sslmode, other }
}

/// tokio-postgres' TLS hook: rustls with the settings of the resource's sslmode. Cloned into
/// every connect and cancel request; the settings themselves are shared.
#[derive(Clone)]
pub struct PgTls {
    /// `None` with sslmode disable, where tokio-postgres never asks for a handshake.
    pub config: Option<Arc<ClientConfig>>,
}

impl<S> MakeTlsConnect<S> for PgTls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PgTlsStream<S>;
    type TlsConnect = PgTlsConnect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> Result<PgTlsConnect, io::Error> {
        // Asked for every host before connecting, whatever the sslmode, so disable must pass.
        let config = self.config.clone();
        let name = ServerName::try_from(domain.to_string())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{domain:?} cannot be checked against a certificate: {e}")))?;
        Ok(PgTlsConnect { config, name })
    }
}

pub struct PgTlsConnect {
    config: Option<Arc<ClientConfig>>,
    name: ServerName<'static>,
}

impl<S> TlsConnect<S> for PgTlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PgTlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<PgTlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let config = self.config.ok_or_else(|| io::Error::other("a TLS handshake was asked for with sslmode disable"))?;
            let stream = tokio_rustls::TlsConnector::from(config).connect(self.name, stream).await?;
            Ok(PgTlsStream(stream))
        })
    }
}

/// A TLS session under a PostgreSQL connection.
pub struct PgTlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for PgTlsStream<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for PgTlsStream<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for PgTlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        // No tls-server-end-point binding: SCRAM then runs without -PLUS, as over a plain
        // connection. With verify-full the certificate check already rules out a man in the
        // middle; see docs/decisions/080-database-tls.md.
        ChannelBinding::none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssl_parameters_are_taken_out_of_the_url_and_the_rest_kept() {
        let t = take_url_tls("postgresql://u:p@h:5432/db?sslmode=verify-full&application_name=x&sslrootcert=/a.pem");
        assert_eq!(t.url, "postgresql://u:p@h:5432/db?application_name=x");
        assert_eq!(t.sslmode.as_deref(), Some("verify-full"));
        assert_eq!(t.other, vec!["sslrootcert".to_string()]);
        let t = take_url_tls("postgres://u@h/db?sslmode=require");
        assert_eq!(t.url, "postgres://u@h/db");
        let t = take_url_tls("host=h user=u");
        assert_eq!((t.url.as_str(), t.sslmode), ("host=h user=u", None));
        let t = take_url_tls("host=h  sslmode=verify-ca user=u sslkey=/k");
        assert_eq!((t.url.as_str(), t.sslmode.as_deref(), t.other), ("host=h user=u", Some("verify-ca"), vec!["sslkey".to_string()]));
    }

    #[test]
    fn sslmodes_parse_as_libpq_spells_them() {
        assert_eq!(SslMode::parse("verify-full"), Ok(SslMode::VerifyFull));
        assert_eq!(SslMode::parse("verify-ca").map(SslMode::name), Ok("verify-ca"));
        let e = SslMode::parse("verify_full").err().unwrap_or_default();
        assert!(e.starts_with("\"verify_full\" is not an sslmode; use one of \"disable\""), "{e}");
        assert!(SslMode::parse("allow").is_err());
    }
}
