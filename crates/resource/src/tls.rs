//! TLS for the database resources (feature `tls`): the CA file of a `ca` key, rustls client
//! settings on the ring provider for each level of checking, and one-line reasons for failed
//! handshakes. See docs/decisions/080-database-tls.md.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustomnic_core::Section;

/// How much of the server's certificate a connection checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verify {
    /// Encrypts, but takes any certificate: protects against listening, not against a server
    /// that pretends to be the database (libpq's require, MySQL's REQUIRED).
    Nothing,
    /// The certificate must chain to a trusted CA; the name in it is not compared with the host.
    Chain,
    /// The chain and the host name (or IP address) the resource connects to.
    Full,
}

/// The certificates of a `ca` file, read once at config time.
#[derive(Clone)]
pub struct CaFile {
    /// The file as resolved (relative paths against the cage folder), for messages.
    pub path: PathBuf,
    /// The file's text, for drivers that take PEM.
    pub pem: Vec<u8>,
    pub certs: Vec<CertificateDer<'static>>,
}

impl std::fmt::Debug for CaFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CaFile({}, {} certificates)", self.path.display(), self.certs.len())
    }
}

/// The ring provider, named explicitly so that a second provider compiled in by another crate
/// can never make the choice ambiguous.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Makes ring the process-wide default. Drivers that build their rustls settings themselves
/// (mysql_async, redis) ask rustls for that default; without one installed, rustls picks by the
/// providers compiled in and panics when there are two. Installing it twice is harmless.
pub fn install_default_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Reads the CA file named by `key` of `section`, if the key is there: `Some(Ok(file))`, or
/// `Some(Err(()))` after recording the problem (unreadable, not PEM, no certificate) with the
/// file, line and key. A relative path is taken from the folder of the config file (the cage
/// folder), so that a cage folder can be moved as a whole.
pub fn read_ca(section: &Section, key: &str) -> Option<Result<CaFile, ()>> {
    let written = section.string(key);
    let Some(written) = written else {
        // Present but not a string (or a bad ${VAR}): the section has recorded why.
        return if section.has(key) { Some(Err(())) } else { None };
    };
    if written.value.is_empty() {
        section.error(key, "is empty: give the PEM file of the CA that signed the server's certificate");
        return Some(Err(()));
    }
    let base = section.file().path().parent().unwrap_or(Path::new(""));
    let path = base.join(&written.value);
    Some(load_ca(&path).map_err(|e| section.error(key, e)))
}

/// The certificates of the PEM file at `path`.
pub fn load_ca(path: &Path) -> Result<CaFile, String> {
    let shown = path.display();
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {shown}: {e}"))?;
    let certs = CertificateDer::pem_slice_iter(&pem).collect::<Result<Vec<_>, _>>().map_err(|e| format!("{shown} is not a PEM file of certificates: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{shown} holds no certificate (a PEM file with -----BEGIN CERTIFICATE----- blocks is expected)"));
    }
    // Each is parsed now, so that a damaged certificate is reported by `pmnc check` and not by
    // the first connection.
    let mut roots = RootCertStore::empty();
    for (i, cert) in certs.iter().enumerate() {
        roots.add(cert.clone()).map_err(|e| format!("{shown}: certificate {} cannot be used as a CA: {e}", i + 1))?;
    }
    Ok(CaFile { path: path.to_path_buf(), pem, certs })
}

/// The roots a connection trusts: the `ca` file alone when given (a private CA must not be
/// widened to every public one), else the webpki (Mozilla) roots, the same on every machine.
pub fn roots(ca: Option<&CaFile>) -> Result<RootCertStore, String> {
    match ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in &ca.certs {
                roots.add(cert.clone()).map_err(|e| format!("{}: a certificate cannot be used as a CA: {e}", ca.path.display()))?;
            }
            Ok(roots)
        }
        None => Ok(RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() }),
    }
}

/// Client settings on the ring provider that check as much as `verify` says.
pub fn client_config(verify: Verify, ca: Option<&CaFile>) -> Result<Arc<ClientConfig>, String> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions().map_err(|e| e.to_string())?;
    let config = match verify {
        Verify::Full => builder.with_root_certificates(roots(ca)?).with_no_client_auth(),
        Verify::Chain => {
            let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots(ca)?), provider).build().map_err(|e| e.to_string())?;
            builder.dangerous().with_custom_certificate_verifier(Arc::new(ChainOnly(inner))).with_no_client_auth()
        }
        Verify::Nothing => builder.dangerous().with_custom_certificate_verifier(Arc::new(AnyCertificate(provider))).with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// verify-ca: the chain is checked, a name that differs from the host is accepted.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.0.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            // rustls checks the name only after the chain, so this error means the chain passed.
            Err(rustls::Error::InvalidCertificate(CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. })) => {
                Ok(ServerCertVerified::assertion())
            }
            other => other,
        }
    }

    fn verify_tls12_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// prefer and require: any certificate. The handshake's signatures are still checked, so the
/// peer at least holds the key of the certificate it sent.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The rustls error somewhere in `e`'s chain of causes. An `io::Error` hides the error it wraps
/// from `source()`, so each one met is opened as well.
pub fn find_rustls_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut next: Option<&'a (dyn std::error::Error + 'static)> = Some(e);
    while let Some(current) = next {
        if let Some(found) = current.downcast_ref::<rustls::Error>() {
            return Some(found);
        }
        if let Some(io) = current.downcast_ref::<std::io::Error>() {
            if let Some(inner) = io.get_ref() {
                if let Some(found) = find_rustls_error(inner) {
                    return Some(found);
                }
            }
        }
        // Drivers that keep their cause shared (redis) hand out the Arc, whose own `source()`
        // skips the error inside it.
        if let Some(shared) = current.downcast_ref::<Arc<dyn std::error::Error + Send + Sync>>() {
            let inner: &(dyn std::error::Error + 'static) = &**shared;
            if let Some(found) = find_rustls_error(inner) {
                return Some(found);
            }
        }
        next = current.source();
    }
    None
}

/// Why a handshake failed, as `TLS: ...`, when `e` comes from rustls; `trusted` names what the
/// connection trusts (the `ca` file, or the public CAs) for an unknown issuer.
pub fn describe(e: &(dyn std::error::Error + 'static), ca: Option<&CaFile>) -> Option<String> {
    find_rustls_error(e).map(|e| format!("TLS: {}", reason(e, ca)))
}

/// One rustls error in words.
pub fn reason(e: &rustls::Error, ca: Option<&CaFile>) -> String {
    let trusted = match ca {
        Some(ca) => format!("the CA of ca = {}", ca.path.display()),
        None => "a public CA (give the private CA that signed it as ca = \"...\")".to_string(),
    };
    match e {
        rustls::Error::InvalidCertificate(c) => match c {
            CertificateError::NotValidForNameContext { expected, presented } => {
                let names = if presented.is_empty() { "no name".to_string() } else { presented.iter().map(|n| plain_name(n)).collect::<Vec<_>>().join(", ") };
                format!("the server's certificate is not valid for {} (it is for {names}); connect by a name the certificate holds", expected.to_str())
            }
            CertificateError::NotValidForName => "the server's certificate is not valid for the host connected to".to_string(),
            CertificateError::UnknownIssuer => {
                format!("the server's certificate is not signed by {trusted}")
            }
            CertificateError::BadSignature => {
                format!("the server's certificate has a bad signature (not signed by {trusted}?)")
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => "the server's certificate has expired".to_string(),
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "the server's certificate is not valid yet (check the clocks)".to_string()
            }
            other => format!("the server's certificate is refused: {other}"),
        },
        rustls::Error::AlertReceived(alert) => {
            format!("the server ended the handshake with the alert {alert:?}")
        }
        rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } | rustls::Error::InappropriateHandshakeMessage { .. } => {
            format!("the server does not speak TLS as expected ({e})")
        }
        other => other.to_string(),
    }
}

/// A name as webpki reports it (`DnsName("db.example")`, `IpAddress(10.0.0.1)`) as written in
/// a config (`db.example`, `10.0.0.1`).
pub fn plain_name(presented: &str) -> &str {
    let inner = presented.strip_prefix("DnsName(\"").and_then(|n| n.strip_suffix("\")"));
    let inner = inner.or_else(|| presented.strip_prefix("IpAddress(").and_then(|n| n.strip_suffix(')')));
    inner.unwrap_or(presented)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rustls_error_is_found_inside_an_io_error() {
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer));
        let text = describe(&io, None).unwrap_or_default();
        assert!(text.starts_with("TLS: the server's certificate is not signed by a public CA"), "{text}");
        assert_eq!(describe(&std::io::Error::other("plain"), None), None);
    }

    #[test]
    fn a_name_mismatch_names_the_host_and_the_certificate() {
        let expected = ServerName::try_from("127.0.0.1").map(|n| n.to_owned());
        let Ok(expected) = expected else { panic!("127.0.0.1 is a server name") };
        let e = rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext {
            expected,
            presented: vec!["DnsName(\"db.example\")".into(), "IpAddress(10.0.0.1)".into()],
        });
        let text = reason(&e, None);
        assert!(text.starts_with("the server's certificate is not valid for 127.0.0.1 (it is for db.example, 10.0.0.1)"), "{text}");
    }

    #[test]
    fn a_file_without_certificates_is_refused() {
        let dir = std::env::temp_dir().join(format!("rustomnic-tls-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let empty = dir.join("empty.pem");
        let _ = std::fs::write(&empty, "no PEM here\n");
        let e = load_ca(&empty).err().unwrap_or_default();
        assert!(e.contains("holds no certificate"), "{e}");
        let e = load_ca(&dir.join("missing.pem")).err().unwrap_or_default();
        assert!(e.starts_with("cannot read ") && e.contains("missing.pem"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
