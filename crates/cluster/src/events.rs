//! Events across the flock: what a cage publishes in one process reaches the waiters of the same
//! cage in every other process, on `pmnc.<flock>.event.<cage>`.
//!
//! Publishing is called on worker threads and must not block them, so a publish is handed over
//! a bounded channel to a task on the presence connection; when that channel is full (NATS slow
//! or away) the event is dropped for other processes and counted, never queued without limit.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures_util::StreamExt;
use rmp::encode;
use rustomnic_core::Value;
use tokio::sync::{mpsc, watch};

use crate::connect::Connection;
use crate::wire::{encode_value, Reader};
use crate::Identity;

/// Events waiting to be sent to the flock; more are dropped (and counted).
pub const OUTBOX: usize = 10_000;

pub fn event_subject(flock: &str, cage: &str) -> String {
    format!("pmnc.{flock}.event.{cage}")
}

/// Where events from other processes go: (cage, topic, value).
pub type Deliver = Arc<dyn Fn(&str, &str, Value) + Send + Sync>;

/// The sending end, for the event bus's remote hook.
#[derive(Clone)]
pub struct Outbox {
    tx: mpsc::Sender<(String, String, Value)>,
    pub dropped: Arc<AtomicU64>,
}

impl Outbox {
    /// Hands an event to the flock without waiting; false when it had to be dropped.
    pub fn send(&self, cage: &str, topic: &str, value: &Value) -> bool {
        match self.tx.try_send((cage.to_string(), topic.to_string(), value.clone())) {
            Ok(()) => true,
            Err(_) => {
                if self.dropped.fetch_add(1, Ordering::Relaxed).is_multiple_of(1000) {
                    tracing::warn!("cluster: events to other processes are being dropped (NATS slow or away; {OUTBOX} waiting)");
                }
                false
            }
        }
    }
}

pub fn outbox() -> (Outbox, mpsc::Receiver<(String, String, Value)>) {
    let (tx, rx) = mpsc::channel(OUTBOX);
    (Outbox { tx, dropped: Arc::new(AtomicU64::new(0)) }, rx)
}

/// [instance, topic, value]: the instance lets a process skip its own events.
pub fn encode(instance: &str, topic: &str, value: &Value) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(64);
    encode::write_array_len(&mut out, 3).map_err(|e| e.to_string())?;
    encode_value(&mut out, &Value::Str(instance.as_bytes().to_vec()))?;
    encode_value(&mut out, &Value::Str(topic.as_bytes().to_vec()))?;
    encode_value(&mut out, value)?;
    Ok(out)
}

/// Reads an event; its value is counted for depth from its own top, as it was encoded.
pub fn decode(data: &[u8]) -> Result<(String, String, Value), String> {
    let mut r = Reader::new(data);
    if r.array_header("an event")? != 3 {
        return Err("an event has 3 parts".into());
    }
    let text = |v: Value| match v {
        Value::Str(b) => String::from_utf8(b).map_err(|_| "event names are UTF-8".to_string()),
        _ => Err("event names are strings".to_string()),
    };
    let instance = text(r.value()?)?;
    let topic = text(r.value()?)?;
    let value = r.value()?;
    if !r.at_end() {
        return Err("an event has 3 parts".into());
    }
    Ok((instance, topic, value))
}

/// Sends this process's events to the flock and delivers the flock's events to `cages` here,
/// until `shutdown`.
pub async fn run(
    conn: Connection,
    identity: Arc<Identity>,
    cages: Vec<String>,
    deliver: Deliver,
    mut outbox: mpsc::Receiver<(String, String, Value)>,
    mut shutdown: watch::Receiver<bool>,
) {
    let flock = identity.flock.clone();
    let mut subs = futures_util::stream::SelectAll::new();
    for cage in &cages {
        match conn.client.subscribe(event_subject(&flock, cage)).await {
            Ok(s) => subs.push(s),
            Err(e) => tracing::error!(cage = %cage, "cluster: cannot subscribe to events: {e}; this process gets no events from others"),
        }
    }
    let max = || conn.client.max_payload();
    loop {
        tokio::select! {
            Some((cage, topic, value)) = outbox.recv() => {
                if !conn.is_up() {
                    continue;
                }
                match encode(&identity.instance, &topic, &value) {
                    Ok(bytes) if max() == 0 || bytes.len() <= max() => {
                        let _ = conn.client.publish(event_subject(&flock, &cage), bytes.into()).await;
                    }
                    Ok(bytes) => tracing::warn!(cage = %cage, "cluster: event on {topic} not sent to other processes: {} bytes, over max_payload", bytes.len()),
                    Err(e) => tracing::warn!(cage = %cage, "cluster: event on {topic} not sent: {e}"),
                }
            }
            Some(m) = subs.next() => {
                let cage = m.subject.as_str().rsplit('.').next().unwrap_or_default().to_string();
                match decode(&m.payload) {
                    Ok((from, _, _)) if from == identity.instance => {}
                    Ok((_, topic, value)) => deliver(&cage, &topic, value),
                    Err(e) => tracing::debug!("cluster: unreadable event on {}: {e}", m.subject),
                }
            }
            _ = async { let _ = shutdown.wait_for(|s| *s).await; } => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_roundtrip_and_junk_is_refused() {
        let v = Value::Map(vec![(Value::Str(b"text".to_vec()), Value::Str(b"hi".to_vec()))]);
        let bytes = encode("i1", "room.1", &v).unwrap();
        assert_eq!(decode(&bytes).unwrap(), ("i1".to_string(), "room.1".to_string(), v));
        assert!(decode(b"\x92\xa1a\xa1b").is_err());
        assert!(decode(b"\xc0").is_err());
    }

    #[test]
    fn a_full_outbox_drops_and_counts() {
        let (out, _rx) = outbox();
        for _ in 0..OUTBOX {
            assert!(out.send("c", "t", &Value::Nil));
        }
        assert!(!out.send("c", "t", &Value::Nil));
        assert_eq!(out.dropped.load(Ordering::Relaxed), 1);
    }
}
