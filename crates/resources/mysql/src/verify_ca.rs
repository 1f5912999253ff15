//! ssl_mode verify_ca: the server's certificate must chain to a trusted CA, whatever name it is
//! issued for. mysql_async checks chain and name together and its own switch for skipping the
//! name does not work with the rustls it is built with (it looks for "NotValidForName" in an
//! error text that no longer holds it). So before each connection a probe does the TLS
//! handshake of the MySQL protocol itself, checks the chain, and learns a name the certificate
//! holds; mysql_async then connects checking chain and that name.

use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, SignatureScheme};
use rustomnic_resource::tls::{self as rtls, CaFile};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Capability flags of the SSL request packet.
const CLIENT_LONG_PASSWORD: u32 = 0x1;
const CLIENT_PROTOCOL_41: u32 = 0x200;
const CLIENT_SSL: u32 = 0x800;
const CLIENT_SECURE_CONNECTION: u32 = 0x8000;
/// utf8mb4_general_ci: the client's charset is not used before the handshake that follows.
const CHARSET: u8 = 45;
/// A greeting longer than this is not a MySQL server's.
const MAX_GREETING: usize = 64 * 1024;

/// The name mysql_async is to check the certificate against: `host` when the certificate holds
/// it, else one of the names it holds. Errors are the reason in words ("TLS: ...").
pub async fn certificate_name(host: &str, port: u16, ca: Option<&CaFile>) -> Result<String, String> {
    let mut stream = TcpStream::connect((host, port)).await.map_err(|e| format!("{host}:{port}: {e}"))?;
    let greeting = read_packet(&mut stream).await.map_err(|e| format!("{host}:{port}: reading the server's greeting: {e}"))?;
    let capabilities = greeting_capabilities(&greeting)?;
    if capabilities & CLIENT_SSL == 0 {
        return Err("TLS: the server does not accept TLS connections (have_ssl is not YES on the server), and ssl_mode \"verify_ca\" requires TLS".to_string());
    }
    stream.write_all(&ssl_request()).await.map_err(|e| format!("{host}:{port}: {e}"))?;

    let recorder = Arc::new(NameRecorder { inner: verifier(ca)?, names: Mutex::new(Vec::new()) });
    let config = ClientConfig::builder_with_provider(rtls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(recorder.clone())
        .with_no_client_auth();
    let server_name = ServerName::try_from(host.to_string()).map_err(|e| format!("TLS: {host:?} cannot be checked against a certificate: {e}"))?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(server_name, stream).await;
    if let Err(e) = tls {
        return Err(rtls::describe(&e, ca).unwrap_or_else(|| format!("TLS: {e}")));
    }
    // The probe ends here; the server sees a client that went away before logging in.
    let names = recorder.names.lock().map(|n| n.clone()).unwrap_or_default();
    match names.first() {
        None => Ok(host.to_string()),
        Some(_) => names.iter().map(|n| rtls::plain_name(n)).find_map(usable_name).ok_or_else(|| {
            format!(
                "TLS: the server's certificate holds no name that can be checked ({})",
                names.iter().map(|n| rtls::plain_name(n)).collect::<Vec<_>>().join(", ")
            )
        }),
    }
}

/// A name rustls can check the certificate against: a wildcard stands for any one label.
fn usable_name(name: &str) -> Option<String> {
    let name = match name.strip_prefix("*.") {
        Some(rest) => format!("any.{rest}"),
        None => name.to_string(),
    };
    ServerName::try_from(name.clone()).ok().map(|_| name)
}

fn verifier(ca: Option<&CaFile>) -> Result<Arc<WebPkiServerVerifier>, String> {
    WebPkiServerVerifier::builder_with_provider(Arc::new(rtls::roots(ca)?), rtls::provider()).build().map_err(|e| e.to_string())
}

/// One packet of the MySQL protocol: a 3-byte little-endian length and a sequence number.
async fn read_packet(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut header = [0u8; 4];
    stream.read_exact(&mut header).await?;
    let len = usize::from(header[0]) | usize::from(header[1]) << 8 | usize::from(header[2]) << 16;
    if len > MAX_GREETING {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("a greeting of {len} bytes is not a MySQL server's")));
    }
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload).await?;
    Ok(payload)
}

/// The capability flags (the lower 16 bits, where CLIENT_SSL is) of the server's greeting, or
/// the error the server sent instead of one.
fn greeting_capabilities(greeting: &[u8]) -> Result<u32, String> {
    match greeting.first() {
        Some(0xff) => {
            let code = greeting.get(1..3).map(|c| u16::from_le_bytes([c[0], c[1]])).unwrap_or(0);
            let message = String::from_utf8_lossy(greeting.get(3..).unwrap_or_default());
            return Err(format!("{message} [{code}]"));
        }
        Some(10) => {}
        _ => return Err("the server's greeting is not of the MySQL protocol 10".to_string()),
    }
    // protocol version, server version (NUL-terminated), thread id (4), scramble (8), filler (1)
    let version_end = greeting.iter().skip(1).position(|b| *b == 0).map(|p| p + 1).ok_or("the server's greeting has no version")?;
    let at = version_end + 1 + 4 + 8 + 1;
    let flags = greeting.get(at..at + 2).ok_or("the server's greeting is cut short")?;
    Ok(u32::from(u16::from_le_bytes([flags[0], flags[1]])))
}

/// The SSL request packet (sequence 1): after it the server expects a TLS handshake.
fn ssl_request() -> Vec<u8> {
    let mut packet = vec![32, 0, 0, 1];
    packet.extend_from_slice(&(CLIENT_LONG_PASSWORD | CLIENT_PROTOCOL_41 | CLIENT_SSL | CLIENT_SECURE_CONNECTION).to_le_bytes());
    packet.extend_from_slice(&(16u32 << 20).to_le_bytes());
    packet.push(CHARSET);
    packet.extend_from_slice(&[0u8; 23]);
    packet
}

/// The chain is checked as usual; a name that differs from the host is accepted and kept.
#[derive(Debug)]
struct NameRecorder {
    inner: Arc<WebPkiServerVerifier>,
    names: Mutex<Vec<String>>,
}

impl ServerCertVerifier for NameRecorder {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            // rustls checks the name only after the chain, so this error means the chain passed.
            Err(rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext { presented, .. })) => {
                if let Ok(mut names) = self.names.lock() {
                    *names = presented;
                }
                Ok(ServerCertVerified::assertion())
            }
            other => other,
        }
    }

    fn verify_tls12_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_capabilities_of_a_greeting_are_read_and_an_error_packet_is_reported() {
        let mut greeting = vec![10];
        greeting.extend_from_slice(b"10.11.19-MariaDB\0");
        greeting.extend_from_slice(&[1, 0, 0, 0]);
        greeting.extend_from_slice(&[0; 8]);
        greeting.push(0);
        greeting.extend_from_slice(&0xf7feu16.to_le_bytes());
        assert_eq!(greeting_capabilities(&greeting), Ok(0xf7fe));
        assert_eq!(greeting_capabilities(&greeting[..greeting.len() - 1]), Err("the server's greeting is cut short".to_string()));
        let mut refused = vec![0xff];
        refused.extend_from_slice(&1130u16.to_le_bytes());
        refused.extend_from_slice(b"Host is not allowed");
        assert_eq!(greeting_capabilities(&refused), Err("Host is not allowed [1130]".to_string()));
        assert_eq!(ssl_request().len(), 36);
    }

    #[test]
    fn wildcards_stand_for_one_label() {
        assert_eq!(usable_name("*.db.example").as_deref(), Some("any.db.example"));
        assert_eq!(usable_name("10.0.0.1").as_deref(), Some("10.0.0.1"));
    }
}
