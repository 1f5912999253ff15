//! The exporter: spans from every worker thread go through one bounded channel to a thread of
//! its own, which batches them (up to 512, or what arrived in a second) and posts each batch to
//! its cages' OTLP endpoints. A full channel or an unreachable receiver drops spans (counted,
//! said once per outage) rather than slowing requests down or holding memory.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};

use crate::config::{Endpoint, TracingConfig};
use crate::{otlp, Error, Span};

/// Spans waiting for the exporter thread at most; more are dropped.
const QUEUE: usize = 4096;
/// Spans in one export at most.
const BATCH: usize = 512;
/// How long spans wait for a batch to fill.
const LINGER: Duration = Duration::from_secs(1);

enum Msg {
    Span(Box<Span>),
    Flush(SyncSender<()>),
}

/// Counts of what happened to spans, for metrics and tests.
#[derive(Debug, Default)]
pub struct Counts {
    pub exported: AtomicU64,
    pub dropped_full: AtomicU64,
    pub dropped_failed: AtomicU64,
}

/// The process's span exporter (see the module docs).
pub struct Exporter {
    tx: SyncSender<Msg>,
    cages: HashMap<Arc<str>, TracingConfig>,
    counts: Arc<Counts>,
}

impl Exporter {
    /// Starts the exporter thread for the cages that have a `[tracing]` table.
    pub fn start(cages: Vec<(String, TracingConfig)>) -> Result<Exporter, Error> {
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
        let cages: HashMap<Arc<str>, TracingConfig> = cages.into_iter().map(|(name, c)| (Arc::from(name.as_str()), c)).collect();
        let counts = Arc::new(Counts::default());
        let thread_cages = cages.clone();
        let thread_counts = counts.clone();
        std::thread::Builder::new().name("pmnc-traces".into()).spawn(move || run(rx, thread_cages, thread_counts)).map_err(|e| Error::Thread(e.to_string()))?;
        Ok(Exporter { tx, cages, counts })
    }

    /// The sampling ratio of a cage's new traces, `None` when the cage does not trace.
    pub fn sampling(&self, cage: &str) -> Option<f64> {
        self.cages.get(cage).map(|c| c.sampling)
    }

    /// Queues a finished span of a tracing cage; drops it (counted) when the queue is full.
    pub fn record(&self, span: Span) {
        if !self.cages.contains_key(&span.cage) {
            return;
        }
        match self.tx.try_send(Msg::Span(Box::new(span))) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.counts.dropped_full.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Exports what is queued now and waits for it, at most `limit` (at shutdown).
    pub fn flush(&self, limit: Duration) -> bool {
        let (done_tx, done_rx) = std::sync::mpsc::sync_channel(1);
        if self.tx.send(Msg::Flush(done_tx)).is_err() {
            return false;
        }
        done_rx.recv_timeout(limit).is_ok()
    }

    pub fn counts(&self) -> &Counts {
        &self.counts
    }
}

/// The exporter thread: batches, exports, repeats until every sender is gone.
fn run(rx: Receiver<Msg>, cages: HashMap<Arc<str>, TracingConfig>, counts: Arc<Counts>) {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("tracing: cannot start the exporter's runtime, spans are not exported: {e}");
            return;
        }
    };
    let mut links: HashMap<Endpoint, Link> = HashMap::new();
    let mut batch: Vec<Span> = Vec::with_capacity(BATCH);
    let mut waiting: Vec<SyncSender<()>> = Vec::new();
    loop {
        let deadline = Instant::now() + LINGER;
        let mut closed = false;
        while batch.len() < BATCH {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(Msg::Span(s)) => batch.push(*s),
                Ok(Msg::Flush(done)) => {
                    waiting.push(done);
                    break;
                }
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => {
                    closed = true;
                    break;
                }
            }
        }
        if !batch.is_empty() {
            runtime.block_on(export(&mut batch, &cages, &mut links, &counts));
        }
        for done in waiting.drain(..) {
            let _ = done.try_send(());
        }
        if closed {
            return;
        }
    }
}

/// One endpoint's connection and whether it is failing (to say an outage once).
#[derive(Default)]
struct Link {
    sender: Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>>,
    failing: bool,
}

async fn export(batch: &mut Vec<Span>, cages: &HashMap<Arc<str>, TracingConfig>, links: &mut HashMap<Endpoint, Link>, counts: &Counts) {
    // endpoint -> service -> spans
    let mut by_endpoint: HashMap<&Endpoint, (&TracingConfig, BTreeMap<&str, Vec<Span>>)> = HashMap::new();
    for span in batch.drain(..) {
        let Some(config) = cages.get(&span.cage) else { continue };
        let entry = by_endpoint.entry(&config.endpoint).or_insert_with(|| (config, BTreeMap::new()));
        entry.1.entry(config.service_name.as_str()).or_default().push(span);
    }
    for (endpoint, (config, services)) in by_endpoint {
        let n: usize = services.values().map(Vec::len).sum();
        let body = otlp::export_request(services.iter().map(|(service, spans)| (*service, spans.as_slice())));
        let link = links.entry(endpoint.clone()).or_default();
        match post(link, endpoint, config, body).await {
            Ok(()) => {
                counts.exported.fetch_add(n as u64, Ordering::Relaxed);
                if link.failing {
                    link.failing = false;
                    tracing::info!("tracing: exporting to {endpoint} again");
                }
            }
            Err(e) => {
                link.sender = None;
                counts.dropped_failed.fetch_add(n as u64, Ordering::Relaxed);
                if !link.failing {
                    link.failing = true;
                    tracing::warn!("tracing: cannot export to {endpoint}: {e}; spans are dropped until it answers");
                }
            }
        }
    }
}

async fn post(link: &mut Link, endpoint: &Endpoint, config: &TracingConfig, body: Vec<u8>) -> Result<(), String> {
    let limit = config.timeout;
    let ready = match link.sender.as_mut() {
        Some(s) => s.ready().await.is_ok(),
        None => false,
    };
    if !ready {
        let stream = tokio::time::timeout(limit, tokio::net::TcpStream::connect(&endpoint.authority))
            .await
            .map_err(|_| format!("no connection within {limit:?}"))?
            .map_err(|e| format!("connect: {e}"))?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        link.sender = Some(sender);
    }
    let Some(sender) = link.sender.as_mut() else { return Err("no connection".into()) };
    let mut request = hyper::Request::post(endpoint.path.as_str())
        .header(hyper::header::HOST, endpoint.authority.as_str())
        .header(hyper::header::CONTENT_TYPE, "application/x-protobuf");
    for (name, value) in &config.headers {
        request = request.header(name.as_str(), value.as_str());
    }
    let request = request.body(Full::new(Bytes::from(body))).map_err(|e| format!("request: {e}"))?;
    let response = tokio::time::timeout(limit, sender.send_request(request))
        .await
        .map_err(|_| format!("no answer within {limit:?}"))?
        .map_err(|e| format!("request: {e}"))?;
    let status = response.status();
    // Read the body so the connection can be used again, and keep a little of it for the error.
    let text = match tokio::time::timeout(limit, Limited::new(response.into_body(), 64 * 1024).collect()).await {
        Ok(Ok(b)) => String::from_utf8_lossy(&b.to_bytes()[..]).chars().take(200).collect::<String>(),
        _ => String::new(),
    };
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("the receiver answered {status}: {text}"))
    }
}
