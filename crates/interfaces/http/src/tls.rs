//! TLS for the HTTP interface and the monitor page: the `tls = { ... }` table, the server
//! settings (ring, ALPN, client certificates) reloaded when the files change, handshakes with a
//! timeout and a cap, and the connection type the HTTP code reads and writes (plain or TLS).
//! See docs/decisions/081-https-one-listener.md and the records after it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustomnic_core::Section;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

/// Whether a client must show a certificate signed by `client_ca`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    Required,
    Optional,
}

/// The `tls` table of an interface or of `[monitor]`, as read from cage.toml.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsOptions {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
    pub client_auth: ClientAuth,
    pub handshake_timeout: Duration,
    pub max_handshakes: usize,
    /// ALPN names offered, in order of preference.
    pub alpn: Vec<Vec<u8>>,
}

/// Reads the table `key` of `section` when it is there: `Some(Ok(..))` with the files checked
/// (readable, PEM, a key matching the certificate), or `Some(Err(()))` after recording every
/// problem with its file and line. `h2` offers HTTP/2 by ALPN besides HTTP/1.1.
pub fn read_tls(section: &Section, key: &str, h2: bool) -> Option<Result<TlsOptions, ()>> {
    if !section.has(key) {
        return None;
    }
    let Some(t) = section.table(key) else { return Some(Err(())) };
    let base = section.file().path().parent().unwrap_or(Path::new("")).to_path_buf();
    let path = |k: &str, required: bool| -> Option<PathBuf> {
        match t.string(k) {
            Some(v) if v.value.is_empty() => {
                t.error(k, "is empty (is the environment variable it names set?)");
                None
            }
            Some(v) => Some(base.join(v.value)),
            None => {
                if required && !t.has(k) {
                    t.error(k, "is required: the PEM file (relative to the cage folder)");
                }
                None
            }
        }
    };
    let cert = path("cert", true);
    let tls_key = path("key", true);
    let client_ca = path("client_ca", false);
    let client_auth = match t.string("client_auth").map(|v| v.value) {
        None => ClientAuth::Required,
        Some(v) if v == "required" => ClientAuth::Required,
        Some(v) if v == "optional" => ClientAuth::Optional,
        Some(v) => {
            t.error("client_auth", format!("{v:?} is not \"required\" or \"optional\""));
            ClientAuth::Required
        }
    };
    if t.has("client_auth") && !t.has("client_ca") {
        t.error("client_auth", "needs client_ca: the PEM file of the CA that signs client certificates");
    }
    let handshake_timeout = t.duration("handshake_timeout", Duration::from_secs(3600)).map(|v| v.value).unwrap_or(Duration::from_secs(10));
    if handshake_timeout.is_zero() {
        t.error("handshake_timeout", "must be more than zero");
    }
    let max_handshakes = t.integer("max_handshakes", 1, 1_000_000).map(|v| v.value as usize).unwrap_or(1024);
    t.finish_with(&["cert", "key", "client_ca", "client_auth", "handshake_timeout", "max_handshakes"]);
    let alpn = if h2 { vec![b"h2".to_vec(), b"http/1.1".to_vec()] } else { vec![b"http/1.1".to_vec()] };
    let (Some(cert), Some(tls_key)) = (cert, tls_key) else { return Some(Err(())) };
    let options = TlsOptions { cert, key: tls_key, client_ca, client_auth, handshake_timeout, max_handshakes, alpn };
    // Checked now, so that `pmnc check` and a reload report a bad pair before anything listens.
    match build(&options) {
        Ok(_) => Some(Ok(options)),
        Err(e) => {
            t.table_error(e);
            Some(Err(()))
        }
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The server settings for `o`, from the files as they are now. Errors name the file at fault.
fn build(o: &TlsOptions) -> Result<Arc<ServerConfig>, String> {
    let certs = read_certs(&o.cert)?;
    let key_pem = std::fs::read(&o.key).map_err(|e| format!("cannot read the TLS key {}: {e}", o.key.display()))?;
    let key =
        PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| format!("{} holds no usable private key (PEM, PKCS#8, PKCS#1 or SEC1): {e}", o.key.display()))?;
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions().map_err(|e| format!("TLS settings: {e}"))?;
    let builder = match &o.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for (i, c) in read_certs(ca)?.into_iter().enumerate() {
                roots.add(c).map_err(|e| format!("{}: certificate {} cannot be used as a CA: {e}", ca.display(), i + 1))?;
            }
            let mut verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            if o.client_auth == ClientAuth::Optional {
                verifier = verifier.allow_unauthenticated();
            }
            builder.with_client_cert_verifier(verifier.build().map_err(|e| format!("client_ca {}: {e}", ca.display()))?)
        }
    };
    let mut config = builder.with_single_cert(certs, key).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => format!("the private key in {} does not belong to the certificate in {}", o.key.display(), o.cert.display()),
        e => format!("the certificate in {} or the key in {} cannot be used: {e}", o.cert.display(), o.key.display()),
    })?;
    config.alpn_protocols = o.alpn.clone();
    Ok(Arc::new(config))
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{} is not a PEM file of certificates: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no certificate (-----BEGIN CERTIFICATE----- blocks are expected)", path.display()));
    }
    Ok(certs)
}

/// What identifies a file's version without reading it.
type Stamp = Option<(SystemTime, u64, u64)>;

fn stamp(path: &Path) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

/// How often the files are looked at; a change is taken once it has stood still for one look,
/// so that a pair written one file after the other is not reported as a mismatch in between.
const POLL: Duration = Duration::from_millis(500);

/// The TLS side of one listener: the current settings (swapped when the files change) and the
/// handshakes in progress.
pub struct TlsServer {
    options: TlsOptions,
    /// "cage C interface I" or "monitor", for log lines.
    who: String,
    current: RwLock<Arc<ServerConfig>>,
    handshaking: AtomicUsize,
    failed: AtomicUsize,
    failed_logged: AtomicU64,
}

impl TlsServer {
    /// Loads the pair now and starts the thread that reloads it when the files change (it ends
    /// when the server is dropped).
    pub fn start(options: TlsOptions, who: String) -> Result<Arc<TlsServer>, String> {
        let config = build(&options)?;
        let server = Arc::new(TlsServer {
            options,
            who,
            current: RwLock::new(config),
            handshaking: AtomicUsize::new(0),
            failed: AtomicUsize::new(0),
            failed_logged: AtomicU64::new(0),
        });
        let weak = Arc::downgrade(&server);
        std::thread::Builder::new().name("tls-reload".into()).spawn(move || watch(weak)).map_err(|e| format!("cannot start the TLS reload thread: {e}"))?;
        Ok(server)
    }

    fn files(&self) -> Vec<&Path> {
        let o = &self.options;
        let mut files = vec![o.cert.as_path(), o.key.as_path()];
        files.extend(o.client_ca.as_deref());
        files
    }

    fn config(&self) -> Arc<ServerConfig> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The TLS handshake on `tcp`, bounded by handshake_timeout and max_handshakes; None when
    /// it failed (logged at most once per second), timed out, or `stop` resolved meanwhile.
    pub async fn accept(&self, tcp: TcpStream, remote: SocketAddr, stop: impl std::future::Future<Output = ()>) -> Option<TlsStream<TcpStream>> {
        let _slot = Handshaking::enter(&self.handshaking);
        let n = self.handshaking.load(Ordering::Relaxed);
        if n > self.options.max_handshakes {
            self.note_failure(
                remote,
                &format!("{} handshakes in progress, the limit is max_handshakes = {}: closed at once", n - 1, self.options.max_handshakes),
            );
            return None;
        }
        let timeout = self.options.handshake_timeout;
        let handshake = async {
            let mut first = [0u8; 1];
            match tcp.peek(&mut first).await {
                Ok(0) | Err(_) => return Err("closed before sending anything".to_string()),
                Ok(_) => {}
            }
            // 0x16 starts a TLS handshake record; a letter is most likely an HTTP request.
            if first[0] != 0x16 {
                let reason = if first[0].is_ascii_uppercase() {
                    answer_plain_http(tcp).await;
                    "plain HTTP sent to a TLS port (answered 400: this port speaks HTTPS)".to_string()
                } else {
                    format!("not a TLS ClientHello (first byte 0x{:02x})", first[0])
                };
                return Err(reason);
            }
            tokio_rustls::TlsAcceptor::from(self.config()).accept(tcp).await.map_err(|e| e.to_string())
        };
        tokio::select! {
            r = tokio::time::timeout(timeout, handshake) => match r {
                Ok(Ok(s)) => Some(s),
                Ok(Err(reason)) => {
                    self.note_failure(remote, &reason);
                    None
                }
                Err(_) => {
                    self.note_failure(remote, &format!("no complete handshake within handshake_timeout ({timeout:?})"));
                    None
                }
            },
            () = stop => None,
        }
    }

    /// Logs failed handshakes once per second at most, with how many were not logged.
    fn note_failure(&self, remote: SocketAddr, reason: &str) {
        let n = self.failed.fetch_add(1, Ordering::Relaxed) + 1;
        let now = crate::now_ms();
        let last = self.failed_logged.load(Ordering::Relaxed);
        if (last == 0 || now.saturating_sub(last) >= 1000)
            && self.failed_logged.compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed).is_ok()
        {
            self.failed.fetch_sub(n, Ordering::Relaxed);
            let more = if n > 1 { format!(" ({} more failed since the last such line)", n - 1) } else { String::new() };
            tracing::warn!("{}: TLS handshake with {remote} failed: {reason}{more}", self.who);
        }
    }
}

/// A place among the handshakes in progress, left when dropped.
struct Handshaking<'a>(&'a AtomicUsize);

impl<'a> Handshaking<'a> {
    fn enter(count: &'a AtomicUsize) -> Handshaking<'a> {
        count.fetch_add(1, Ordering::Relaxed);
        Handshaking(count)
    }
}

impl Drop for Handshaking<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Tells a client that sent plain HTTP what went wrong (as nginx's 497 does), after reading
/// what it sent so that closing does not reset the connection under the answer.
async fn answer_plain_http(mut tcp: TcpStream) {
    let body = "400 Bad Request: this port speaks HTTPS (TLS); use an https:// address\n";
    let out =
        format!("HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain; charset=utf-8\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}", body.len());
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let mut sink = [0u8; 4096];
        while let Ok(n) = tcp.try_read(&mut sink) {
            if n == 0 {
                break;
            }
        }
        if tcp.write_all(out.as_bytes()).await.is_ok() {
            let _ = tcp.shutdown().await;
            while let Ok(n) = tokio::io::AsyncReadExt::read(&mut tcp, &mut sink).await {
                if n == 0 {
                    break;
                }
            }
        }
    })
    .await;
}

/// Reloads the pair when its files change; ends when the server is gone.
fn watch(server: Weak<TlsServer>) {
    let stamps = |s: &TlsServer| s.files().iter().map(|p| stamp(p)).collect::<Vec<_>>();
    let Some(mut loaded) = server.upgrade().map(|s| stamps(&s)) else { return };
    let mut seen = loaded.clone();
    loop {
        std::thread::sleep(POLL);
        let Some(s) = server.upgrade() else { return };
        let now = stamps(&s);
        if now != seen {
            // Still being written, perhaps: wait until it stands still for one look.
            seen = now;
            continue;
        }
        if now == loaded {
            continue;
        }
        loaded = now;
        match build(&s.options) {
            Ok(config) => {
                let what = s.options.cert.display();
                let described = read_certs(&s.options.cert)
                    .ok()
                    .and_then(|c| c.first().and_then(|c| crate::der::describe(c)))
                    .map(|p| format!(" (subject {}, serial {}, valid until {})", p.subject, p.serial, p.not_after))
                    .unwrap_or_default();
                *s.current.write().unwrap_or_else(|e| e.into_inner()) = config;
                tracing::info!("{}: TLS certificate reloaded from {what}{described}; new connections use it", s.who);
            }
            // Logged once: the next attempt is at the next change of the files.
            Err(e) => tracing::warn!("{}: keeping the previous TLS certificate: {e}", s.who),
        }
    }
}

/// What a handler sees of a TLS connection (`request.tls`).
#[derive(Debug, Clone)]
pub struct TlsInfo {
    pub version: &'static str,
    pub cipher: String,
    pub alpn: Option<String>,
    /// The client's certificate, when it sent one (and so it was verified).
    pub peer: Option<crate::der::Described>,
}

impl TlsInfo {
    fn of(conn: &rustls::ServerConnection) -> TlsInfo {
        use rustls::ProtocolVersion as V;
        let version = match conn.protocol_version() {
            Some(V::TLSv1_3) => "TLSv1.3",
            Some(V::TLSv1_2) => "TLSv1.2",
            _ => "TLS",
        };
        TlsInfo {
            version,
            cipher: conn.negotiated_cipher_suite().map(|s| format!("{:?}", s.suite())).unwrap_or_default(),
            alpn: conn.alpn_protocol().map(|a| String::from_utf8_lossy(a).into_owned()),
            peer: conn.peer_certificates().and_then(|c| c.first()).and_then(|c| crate::der::describe(c)),
        }
    }
}

/// `request.tls`: { version, cipher, alpn, peer = { subject, sans, serial, not_after } }.
pub(crate) fn lua_table(lua: &rustomnic_lua::mlua::Lua, info: &TlsInfo) -> rustomnic_lua::mlua::Result<rustomnic_lua::mlua::Table> {
    let t = lua.create_table()?;
    t.raw_set("version", info.version)?;
    t.raw_set("cipher", info.cipher.as_str())?;
    if let Some(alpn) = &info.alpn {
        t.raw_set("alpn", alpn.as_str())?;
    }
    if let Some(p) = &info.peer {
        let peer = lua.create_table()?;
        peer.raw_set("subject", p.subject.as_str())?;
        peer.raw_set("sans", lua.create_sequence_from(p.sans.iter().map(String::as_str))?)?;
        peer.raw_set("serial", p.serial.as_str())?;
        peer.raw_set("not_after", p.not_after.as_str())?;
        t.raw_set("peer", peer)?;
    }
    Ok(t)
}

/// Whether `peeked`, the bytes waiting on a connection, are a TLS alert record alone: a client
/// closing its side (close_notify) or failing. TLS 1.2 alerts are records of type 21; in TLS 1.3
/// an alert is encrypted in a record of type 23 with exactly 19 bytes (2 of alert, 1 of inner
/// type, 16 of tag), which no HTTP request or WebSocket frame of application data fits. A plain
/// HTTP request starts with a letter, so this never takes one for an alert.
pub(crate) fn is_close_alert(peeked: &[u8]) -> bool {
    match peeked {
        [0x15, 0x03, ..] => true,
        [0x17, 0x03, 0x03, 0x00, 0x13, rest @ ..] => rest.len() == 19,
        _ => false,
    }
}

/// A connection of the HTTP interface: plain TCP or TLS over it. The HTTP/1 and WebSocket code
/// read it the way they read a socket (wait until readable, then take what is there), and a
/// write counts as done only once its bytes are on the socket, because that code never
/// flushes.
pub(crate) enum Conn {
    Plain(TcpStream),
    Tls(Box<TlsConn>),
}

pub(crate) struct TlsConn {
    stream: TlsStream<TcpStream>,
    info: Arc<TlsInfo>,
    /// Bytes taken by the last write whose ciphertext was not all sent yet: the write is
    /// reported done (with this count) once it is.
    owed: usize,
}

impl Conn {
    pub(crate) fn tls(stream: TlsStream<TcpStream>) -> Conn {
        let info = Arc::new(TlsInfo::of(stream.get_ref().1));
        Conn::Tls(Box::new(TlsConn { stream, info, owed: 0 }))
    }

    /// The socket underneath, to tell whether the client has gone.
    pub(crate) fn tcp(&self) -> &TcpStream {
        match self {
            Conn::Plain(s) => s,
            Conn::Tls(t) => t.stream.get_ref().0,
        }
    }

    pub(crate) fn tls_info(&self) -> Option<Arc<TlsInfo>> {
        match self {
            Conn::Plain(_) => None,
            Conn::Tls(t) => Some(t.info.clone()),
        }
    }

    /// Whether TLS has decrypted bytes (or the end) waiting, which the socket's readiness would
    /// not show.
    fn buffered(t: &mut TlsConn) -> bool {
        match t.stream.get_mut().1.process_new_packets() {
            Ok(state) => state.plaintext_bytes_to_read() > 0 || state.peer_has_closed(),
            Err(_) => true,
        }
    }

    /// Waits until a read may have something to take (as `TcpStream::readable`).
    pub(crate) async fn readable(&mut self) -> std::io::Result<()> {
        match self {
            Conn::Plain(s) => s.readable().await,
            Conn::Tls(t) => {
                if Self::buffered(t) {
                    return Ok(());
                }
                t.stream.get_ref().0.readable().await
            }
        }
    }

    /// As `TcpStream::poll_read_ready`.
    pub(crate) fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self {
            Conn::Plain(s) => s.poll_read_ready(cx),
            Conn::Tls(t) => {
                if Self::buffered(t) {
                    return Poll::Ready(Ok(()));
                }
                t.stream.get_ref().0.poll_read_ready(cx)
            }
        }
    }

    /// Appends what can be read without waiting to `into`, up to its spare capacity (as
    /// `TcpStream::try_read_buf`): `WouldBlock` when nothing is there, `Ok(0)` at the end.
    pub(crate) fn try_read_buf(&mut self, into: &mut Vec<u8>) -> std::io::Result<usize> {
        match self {
            Conn::Plain(s) => {
                let spare = into.capacity() - into.len();
                let n = s.try_read_buf(into)?;
                if n > 0 && n < spare {
                    // A read shorter than the room it had took everything the socket held, so the
                    // next read would only find EAGAIN (a system call per request on a kept
                    // connection). The readiness is cleared instead; epoll (edge-triggered)
                    // reports every later arrival, and tokio clears only the readiness it saw
                    // here: nothing ran on this thread since the read, so an event the driver
                    // takes later is kept (decision 157; this relies on the connection being
                    // served on a worker's current-thread runtime).
                    let _ = s.try_io(tokio::io::Interest::READABLE, || Err::<(), _>(std::io::ErrorKind::WouldBlock.into()));
                }
                Ok(n)
            }
            Conn::Tls(t) => {
                let mut chunk = [0u8; 16 * 1024];
                let want = (into.capacity() - into.len()).min(chunk.len());
                let mut buf = ReadBuf::new(&mut chunk[..want]);
                // No waker: after WouldBlock the caller waits with `readable`, which registers.
                let mut cx = Context::from_waker(std::task::Waker::noop());
                match Pin::new(&mut t.stream).poll_read(&mut cx, &mut buf) {
                    Poll::Ready(Ok(())) => {
                        into.extend_from_slice(buf.filled());
                        Ok(buf.filled().len())
                    }
                    Poll::Ready(Err(e)) => Err(e),
                    Poll::Pending => Err(std::io::ErrorKind::WouldBlock.into()),
                }
            }
        }
    }

    pub(crate) fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s) => s.is_write_vectored(),
            Conn::Tls(_) => false,
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(t) => Pin::new(&mut t.stream).poll_read(cx, buf),
        }
    }
}

impl TlsConn {
    fn poll_write(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let mut s = Pin::new(&mut self.stream);
        if self.owed > 0 {
            // The caller is retrying the write that took these bytes.
            return match s.as_mut().poll_flush(cx) {
                Poll::Ready(Ok(())) => Poll::Ready(Ok(std::mem::take(&mut self.owed).min(buf.len()))),
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            };
        }
        match s.as_mut().poll_flush(cx) {
            Poll::Ready(Ok(())) => {}
            other => return other.map(|r| r.map(|()| 0)),
        }
        let n = match s.as_mut().poll_write(cx, buf) {
            Poll::Ready(Ok(n)) => n,
            other => return other,
        };
        match s.poll_flush(cx) {
            Poll::Ready(Ok(())) => Poll::Ready(Ok(n)),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                self.owed = n;
                Poll::Pending
            }
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(t) => t.poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[std::io::IoSlice<'_>]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(t) => {
                let first = bufs.iter().find(|b| !b.is_empty()).map(|b| &b[..]).unwrap_or(&[]);
                t.poll_write(cx, first)
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        Conn::is_write_vectored(self)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(t) => Pin::new(&mut t.stream).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(t) => Pin::new(&mut t.stream).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::is_close_alert;

    #[test]
    fn close_alerts_and_not() {
        let mut tls13 = vec![0x17, 0x03, 0x03, 0x00, 0x13];
        tls13.extend([0u8; 19]);
        assert!(is_close_alert(&tls13));
        assert!(is_close_alert(&[0x15, 0x03, 0x03, 0x00, 0x02, 0x01, 0x00]));
        // Application data of another length, a record cut short, a pipelined plain request.
        let mut data = vec![0x17, 0x03, 0x03, 0x00, 0x40];
        data.extend([0u8; 27]);
        assert!(!is_close_alert(&data));
        assert!(!is_close_alert(&tls13[..20]));
        assert!(!is_close_alert(b"GET / HTTP/1.1\r\n"));
    }
}
