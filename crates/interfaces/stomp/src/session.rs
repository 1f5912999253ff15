//! The consumer loop of a stomp interface (on its own thread): connect, subscribe, hand each
//! MESSAGE to a worker and settle it by the handler's outcome (ACK, NACK after a delay, dead
//! letter then ACK); keep heart-beats both ways; reconnect with backoff when the broker goes
//! away; on shutdown unsubscribe, let the messages in flight settle, disconnect.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustomnic_core::metrics::{message_counts, MessageCounts};
use rustomnic_core::Value;
use rustomnic_interface::consumer::{reconnecting, Outage};
use rustomnic_interface::{Host, Request};
use rustomnic_lua::RunError;
use rustomnic_resource_stomp::client::{self, Writer};
use rustomnic_resource_stomp::frame::{Decoded, Frame, Limits};
use rustomnic_resource_stomp::receipt_id;
use tokio::sync::oneshot;
use tokio::task::JoinSet;

use crate::StompInterface;

/// How long a shutdown waits for messages in flight beyond the request timeout.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// How long connecting, a subscription's receipt or a dead letter's receipt may take.
const BROKER_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempt counts kept at most (messages failing at once); beyond it the counts start again.
const MAX_TRACKED: usize = 100_000;

/// The error of a failed attempt and where it is kept in a dead letter.
pub const ERROR_HEADER: &str = "x-pmnc-error";
pub const ATTEMPT_HEADER: &str = "x-pmnc-attempt";
pub const DESTINATION_HEADER: &str = "x-pmnc-destination";

/// Attempts of the messages that failed, by their fingerprint (decision 127).
type Attempts = Arc<Mutex<HashMap<u64, u32>>>;
/// Receipts awaited by settling tasks, fulfilled by the reading loop.
type Receipts = Arc<Mutex<HashMap<String, oneshot::Sender<()>>>>;

/// Runs the interface until its shutdown: sessions one after another, with backoff between
/// failed ones (rustomnic_interface::consumer).
pub(crate) async fn run(iface: Arc<StompInterface>, host: Host) {
    let counts = message_counts(&iface.spec.cage, &iface.spec.name);
    let attempts: Attempts = Arc::default();
    reconnecting(&host, async |outage: &mut Outage| session(&iface, &host, &counts, &attempts, outage).await).await;
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One connection's life: until the shutdown (Ok) or the first failure (Err, to be retried).
async fn session(iface: &Arc<StompInterface>, host: &Host, counts: &Arc<MessageCounts>, attempts: &Attempts, outage: &mut Outage) -> Result<(), String> {
    let display = &iface.url.display;
    let limits = Limits { max_body: iface.max_message_size, ..Limits::default() };
    let conn = client::connect(&iface.url, iface.heart_beat, limits, BROKER_TIMEOUT).await?;
    let mut reader = conn.reader;
    let mut writer = conn.writer;
    // Subscribed one after another, each confirmed by its receipt (a refused destination is an
    // ERROR here, not later). Messages of the first subscriptions may come before the receipt
    // of a later one: they are kept and handled once the loop runs.
    let mut early = Vec::new();
    for (i, destination) in iface.destinations.iter().enumerate() {
        let receipt = receipt_id();
        let subscribe = Frame::new("SUBSCRIBE")
            .header("id", i.to_string())
            .header("destination", destination.clone())
            .header("ack", "client-individual")
            .header("prefetch-count", iface.prefetch.to_string())
            .header("receipt", receipt.clone());
        writer.send(&subscribe).await?;
        let wait = async {
            loop {
                let f = reader.frame().await?;
                if f.command == "RECEIPT" && f.get("receipt-id") == Some(receipt.as_str()) {
                    return Ok::<(), String>(());
                }
                if f.command == "MESSAGE" {
                    early.push(f);
                }
            }
        };
        match tokio::time::timeout(BROKER_TIMEOUT, wait).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(format!("cannot subscribe to {destination:?}: {e}")),
            Err(_) => return Err(format!("{display}: no receipt for the subscription to {destination:?} within {BROKER_TIMEOUT:?}")),
        }
    }
    match outage.end() {
        Some(after) => {
            tracing::info!(cage = %iface.spec.cage, interface = %iface.spec.name, "connected to {at} again after {:.1}s; consuming {}", after.as_secs_f64(), iface.destinations.join(", "), at = iface.url.display)
        }
        None => {
            tracing::info!(cage = %iface.spec.cage, interface = %iface.spec.name, "consuming {} on {at}", iface.destinations.join(", "), at = iface.url.display)
        }
    }
    let writer = Arc::new(tokio::sync::Mutex::new(writer));
    let receipts: Receipts = Arc::default();
    let mut tasks = JoinSet::new();
    let mut shutdown = host.shutdown();
    let beat_every = if conn.send_every.is_zero() { Duration::from_secs(3600) } else { conn.send_every };
    let mut beat = tokio::time::interval(beat_every);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for f in early {
        let job = Settle {
            iface: iface.clone(),
            host: host.clone(),
            counts: counts.clone(),
            attempts: attempts.clone(),
            writer: writer.clone(),
            receipts: receipts.clone(),
        };
        tasks.spawn(job.run(f));
    }
    // No limit when no heart-beats were agreed: ten years stands for never.
    let silent = if conn.silent_at_most.is_zero() { Duration::from_secs(10 * 365 * 86_400) } else { conn.silent_at_most };
    // Measured from the last byte read, whatever else wakes the loop meanwhile.
    let mut heard = tokio::time::Instant::now();
    let failure = loop {
        tokio::select! {
            _ = shutdown.changed() => break None,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            _ = beat.tick(), if !conn.send_every.is_zero() => {
                if let Err(e) = writer.lock().await.send_bytes(b"\n").await {
                    break Some(e);
                }
            }
            _ = tokio::time::sleep_until(heard + silent) => break Some(format!("{display}: nothing from the broker for {silent:?} (heart-beats missed)")),
            next = reader.next() => match next {
                Err(e) => break Some(e),
                Ok(Decoded::HeartBeat) => heard = tokio::time::Instant::now(),
                Ok(Decoded::Frame(f)) => {
                    heard = tokio::time::Instant::now();
                    match f.command.as_str() {
                        "MESSAGE" => {
                            let job = Settle { iface: iface.clone(), host: host.clone(), counts: counts.clone(), attempts: attempts.clone(), writer: writer.clone(), receipts: receipts.clone() };
                            tasks.spawn(job.run(f));
                        }
                        "RECEIPT" => receipted(&receipts, &f),
                        "ERROR" => break Some(format!("{display}: the broker said: {}", client::error_text(&f))),
                        other => tracing::debug!(cage = %iface.spec.cage, interface = %iface.spec.name, "a {other} frame ignored"),
                    }
                }
            },
        }
    };
    if let Some(e) = failure {
        // The broker gives back what was not acknowledged on this connection; the handlers
        // still running finish on their workers and their settling fails harmlessly.
        tasks.detach_all();
        return Err(e);
    }
    // Shutdown: the messages in flight settle first, their receipts still read. RabbitMQ
    // refuses an ACK for a subscription already ended, so UNSUBSCRIBE comes after; what
    // arrives meanwhile goes straight back (NACK, no handler run, no attempt counted).
    let limit = iface.spec.request_timeout + SHUTDOWN_GRACE;
    let drain = async {
        while !tasks.is_empty() {
            tokio::select! {
                _ = tasks.join_next() => {}
                next = reader.next() => match next {
                    Ok(Decoded::Frame(f)) if f.command == "RECEIPT" => receipted(&receipts, &f),
                    Ok(Decoded::Frame(f)) if f.command == "MESSAGE" => {
                        if let Some(ack) = f.get("ack") {
                            let _ = writer.lock().await.send(&Frame::new("NACK").header("id", ack)).await;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => break,
                },
            }
        }
    };
    if tokio::time::timeout(limit, drain).await.is_err() {
        tracing::warn!(cage = %iface.spec.cage, interface = %iface.spec.name, "{} message(s) still in flight after {limit:?}; the broker delivers them again", tasks.len());
    }
    let mut w = writer.lock().await;
    for i in 0..iface.destinations.len() {
        if let Err(e) = w.send(&Frame::new("UNSUBSCRIBE").header("id", i.to_string())).await {
            tracing::debug!(cage = %iface.spec.cage, interface = %iface.spec.name, "unsubscribing: {e}");
        }
    }
    // The receipt of DISCONNECT says the broker has processed every frame before it.
    let receipt = receipt_id();
    if w.send(&Frame::new("DISCONNECT").header("receipt", receipt.clone())).await.is_ok() {
        drop(w);
        let wait = async {
            while let Ok(d) = reader.next().await {
                if let Decoded::Frame(f) = d {
                    if f.command == "RECEIPT" && f.get("receipt-id") == Some(receipt.as_str()) {
                        return;
                    }
                }
            }
        };
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, wait).await;
    }
    Ok(())
}

fn receipted(receipts: &Receipts, f: &Frame) {
    if let Some(tx) = f.get("receipt-id").and_then(|id| lock(receipts).remove(id)) {
        let _ = tx.send(());
    }
}

/// What settles one message.
struct Settle {
    iface: Arc<StompInterface>,
    host: Host,
    counts: Arc<MessageCounts>,
    attempts: Attempts,
    writer: Arc<tokio::sync::Mutex<Writer>>,
    receipts: Receipts,
}

/// How a message ends at the broker.
enum Outcome {
    Ack,
    /// Delivered again (another attempt, or the interface is stopping).
    Requeue,
    /// Not delivered again (dropped, or dead-lettered by the queue's own policy).
    Discard,
    /// Nothing sent: the connection is in doubt, the broker delivers it again.
    Leave,
}

/// Headers of a MESSAGE that are the protocol's, not the sender's.
const PROTOCOL_HEADERS: &[&str] = &["ack", "content-length", "subscription", "message-id", "destination", "redelivered"];

impl Settle {
    async fn run(self, f: Frame) {
        self.counts.received.fetch_add(1, Ordering::Relaxed);
        let redelivered = f.get("redelivered") == Some("true");
        if redelivered {
            self.counts.redelivered.fetch_add(1, Ordering::Relaxed);
        }
        let Some(ack) = f.get("ack").map(str::to_string) else {
            tracing::error!(cage = %self.iface.spec.cage, interface = %self.iface.spec.name, "{} has no ack header; ignored", describe(&f));
            return;
        };
        let outcome = self.handle(&f, redelivered).await;
        let frame = match outcome {
            Outcome::Ack => Frame::new("ACK").header("id", ack),
            Outcome::Requeue => Frame::new("NACK").header("id", ack),
            Outcome::Discard => Frame::new("NACK").header("id", ack).header("requeue", "false"),
            Outcome::Leave => return,
        };
        if let Err(e) = self.writer.lock().await.send(&frame).await {
            // The connection is gone: the broker delivers the message again.
            tracing::debug!(cage = %self.iface.spec.cage, interface = %self.iface.spec.name, "{} of {} failed (it will be delivered again): {e}", frame.command, describe(&f));
        }
    }

    fn stopping(&self) -> bool {
        *self.host.shutdown().borrow()
    }

    async fn handle(&self, f: &Frame, redelivered: bool) -> Outcome {
        let (cage, name) = (&self.iface.spec.cage, &self.iface.spec.name);
        let key = fingerprint(f);
        let attempt = lock(&self.attempts).get(&key).copied().unwrap_or(0).saturating_add(1);
        if let Some(size) = f.oversized {
            let error = format!("the body is {size} bytes or more, over max_message_size ({} bytes); it was skipped unread", self.iface.max_message_size);
            tracing::error!(cage = %cage, interface = %name, "{} refused: {error}", describe(f));
            self.counts.refused.fetch_add(1, Ordering::Relaxed);
            // The body is not here to forward: a notice with the headers goes to dead_letter,
            // and the broker drops the message or dead-letters it by the queue's policy.
            if self.iface.dead_letter.is_some() {
                if let Err(e) = self.dead_letter(f, attempt, &error).await {
                    tracing::error!(cage = %cage, interface = %name, "{}: the notice to dead_letter was not sent: {e}", describe(f));
                    return Outcome::Leave;
                }
            }
            self.counts.dead_lettered.fetch_add(1, Ordering::Relaxed);
            return Outcome::Discard;
        }
        let request = Request {
            handler: self.iface.spec.handler.value.clone(),
            args: vec![message(f, attempt, redelivered)],
            deadline: Instant::now() + self.iface.spec.request_timeout,
            parameters: None,
        };
        match self.host.run(request).await {
            Ok(_) => {
                lock(&self.attempts).remove(&key);
                self.counts.acked.fetch_add(1, Ordering::Relaxed);
                Outcome::Ack
            }
            // The worker stopped under the handler: not an attempt of the message's.
            Err(_) if self.stopping() => Outcome::Requeue,
            Err(e) => {
                let error = error_text(&e);
                if attempt >= self.iface.max_attempts {
                    tracing::error!(cage = %cage, interface = %name, "{} failed on attempt {attempt} of {}: {error}; dead-lettered", describe(f), self.iface.max_attempts);
                    lock(&self.attempts).remove(&key);
                    if self.iface.dead_letter.is_none() {
                        self.counts.dead_lettered.fetch_add(1, Ordering::Relaxed);
                        return Outcome::Discard;
                    }
                    return match self.dead_letter(f, attempt, &error).await {
                        Ok(()) => {
                            self.counts.dead_lettered.fetch_add(1, Ordering::Relaxed);
                            Outcome::Ack
                        }
                        Err(e) => {
                            // Kept rather than lost: it comes back and is dead-lettered later.
                            tracing::error!(cage = %cage, interface = %name, "{}: cannot send it to dead_letter: {e}; it goes back to the queue", describe(f));
                            let mut shutdown = self.host.shutdown();
                            tokio::select! {
                                _ = tokio::time::sleep(self.iface.retry_delay(attempt)) => {}
                                _ = shutdown.changed() => {}
                            }
                            Outcome::Requeue
                        }
                    };
                }
                let delay = self.iface.retry_delay(attempt);
                tracing::warn!(cage = %cage, interface = %name, "{} failed on attempt {attempt} of {}: {error}; retrying in {delay:?}", describe(f), self.iface.max_attempts);
                let mut shutdown = self.host.shutdown();
                if !*shutdown.borrow() {
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.changed() => {}
                    }
                }
                if self.stopping() {
                    return Outcome::Requeue;
                }
                {
                    let mut map = lock(&self.attempts);
                    if map.len() >= MAX_TRACKED {
                        map.clear();
                    }
                    map.insert(key, attempt);
                }
                self.counts.retried.fetch_add(1, Ordering::Relaxed);
                Outcome::Requeue
            }
        }
    }

    /// Sends the message to `dead_letter` with the error and waits for the broker's receipt.
    async fn dead_letter(&self, f: &Frame, attempt: u32, error: &str) -> Result<(), String> {
        let Some(target) = &self.iface.dead_letter else { return Ok(()) };
        let receipt = receipt_id();
        let mut out = Frame::new("SEND").header("destination", target.clone()).header("receipt", receipt.clone());
        for (k, v) in &f.headers {
            if !PROTOCOL_HEADERS.contains(&k.as_str()) && !k.starts_with("x-pmnc-") && k != "receipt" {
                out = out.header(k, v.clone());
            }
        }
        out = out
            .header(ERROR_HEADER, error)
            .header(ATTEMPT_HEADER, attempt.to_string())
            .header(DESTINATION_HEADER, f.get("destination").unwrap_or(""))
            .with_body(f.body.clone());
        let (tx, rx) = oneshot::channel();
        lock(&self.receipts).insert(receipt.clone(), tx);
        let sent = self.writer.lock().await.send(&out).await;
        if let Err(e) = sent {
            lock(&self.receipts).remove(&receipt);
            return Err(e);
        }
        match tokio::time::timeout(BROKER_TIMEOUT, rx).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err("the connection ended before the broker's receipt".to_string()),
            Err(_) => {
                lock(&self.receipts).remove(&receipt);
                Err(format!("no receipt from the broker within {BROKER_TIMEOUT:?}"))
            }
        }
    }
}

/// The handler's `message` table.
fn message(f: &Frame, attempt: u32, redelivered: bool) -> Value {
    let mut headers = Vec::with_capacity(f.headers.len());
    for (k, v) in &f.headers {
        if k == "ack" || k == "content-length" || headers.iter().any(|(h, _): &(Value, Value)| h.as_str() == Some(k)) {
            continue;
        }
        headers.push((Value::str(k.as_str()), Value::str(v.as_str())));
    }
    let opt = |name: &str| f.get(name).map(Value::str).unwrap_or(Value::Nil);
    Value::Map(vec![
        (Value::str("body"), Value::Str(f.body.clone())),
        (Value::str("destination"), opt("destination")),
        (Value::str("headers"), Value::Map(headers)),
        (Value::str("message_id"), opt("message-id")),
        (Value::str("redelivered"), Value::Bool(redelivered)),
        (Value::str("attempt"), Value::Int(i64::from(attempt))),
    ])
}

/// What identifies a message across its deliveries: its destination, the sender's headers and
/// its body (the broker's message-id and ack id change at each delivery).
fn fingerprint(f: &Frame) -> u64 {
    let mut h = DefaultHasher::new();
    f.get("destination").hash(&mut h);
    for (k, v) in &f.headers {
        if !PROTOCOL_HEADERS.contains(&k.as_str()) {
            (k, v).hash(&mut h);
        }
    }
    f.body.hash(&mut h);
    f.oversized.hash(&mut h);
    h.finish()
}

fn describe(f: &Frame) -> String {
    format!("message {:?} from {:?}", f.get("message-id").unwrap_or("?"), f.get("destination").unwrap_or("?"))
}

/// The error of a failed attempt as it goes into a header: the message, without the traceback
/// (that is in the log with the request id), cut at 4 KiB.
fn error_text(e: &RunError) -> String {
    let text = e.to_string();
    const MAX: usize = 4096;
    if text.len() <= MAX {
        return text;
    }
    let mut end = MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_message_keeps_its_fingerprint_across_deliveries() {
        let a = Frame::new("MESSAGE").header("destination", "/queue/a").header("message-id", "1").header("ack", "x1").header("k", "v").with_body(b"b".to_vec());
        let b = Frame::new("MESSAGE")
            .header("destination", "/queue/a")
            .header("message-id", "2")
            .header("ack", "x2")
            .header("redelivered", "true")
            .header("k", "v")
            .with_body(b"b".to_vec());
        let c = Frame::new("MESSAGE").header("destination", "/queue/a").header("k", "w").with_body(b"b".to_vec());
        assert_eq!(fingerprint(&a), fingerprint(&b));
        assert_ne!(fingerprint(&a), fingerprint(&c));
        let m = message(&b, 2, true);
        assert_eq!(m.get("message_id").unwrap().as_str(), Some("2"));
        assert_eq!(m.get("headers").unwrap().get("k").unwrap().as_str(), Some("v"));
        assert!(m.get("headers").unwrap().get("ack").is_none());
        assert_eq!(m.get("attempt"), Some(&Value::Int(2)));
    }
}
