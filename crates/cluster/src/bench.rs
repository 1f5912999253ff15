//! The yardstick of bench/cluster.sh: a bare async-nats request/reply between two processes,
//! with no Lua, no value model and no envelope, to hold cage calls against.

use std::rc::Rc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| format!("runtime: {e}"))
}

/// Answers every request on `subject` with its own payload, until killed.
pub fn respond(url: &str, subject: &str) -> Result<(), String> {
    runtime()?.block_on(async {
        let client = async_nats::connect(url).await.map_err(|e| format!("connect {url}: {e}"))?;
        let mut sub = client.subscribe(subject.to_string()).await.map_err(|e| format!("subscribe: {e}"))?;
        println!("ready");
        while let Some(m) = sub.next().await {
            if let Some(reply) = m.reply {
                let _ = client.publish(reply, m.payload).await;
            }
        }
        Ok(())
    })
}

/// Round trips measured by [`request`].
#[derive(Debug, Clone)]
pub struct Figures {
    pub calls: usize,
    pub seconds: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

/// Sends `count` requests to `subject`, `in_flight` at a time, and measures each round trip.
pub fn request(url: &str, subject: &str, in_flight: usize, count: usize, payload: &[u8]) -> Result<Figures, String> {
    let local = tokio::task::LocalSet::new();
    let payload = bytes::Bytes::copy_from_slice(payload);
    local.block_on(&runtime()?, async {
        let client = async_nats::connect(url).await.map_err(|e| format!("connect {url}: {e}"))?;
        // Warm up the path (inbox subscription, server routes) before measuring.
        for _ in 0..100 {
            client.request(subject.to_string(), payload.clone()).await.map_err(|e| format!("request: {e}"))?;
        }
        let latencies = Rc::new(std::cell::RefCell::new(Vec::with_capacity(count)));
        let started = Instant::now();
        let mut tasks = Vec::new();
        for t in 0..in_flight.max(1) {
            let (client, payload, latencies) = (client.clone(), payload.clone(), latencies.clone());
            let subject = subject.to_string();
            let mine = count / in_flight.max(1) + usize::from(t < count % in_flight.max(1));
            tasks.push(tokio::task::spawn_local(async move {
                for _ in 0..mine {
                    let t0 = Instant::now();
                    client.request(subject.clone(), payload.clone()).await.map_err(|e| format!("request: {e}"))?;
                    latencies.borrow_mut().push(t0.elapsed());
                }
                Ok::<(), String>(())
            }));
        }
        for t in tasks {
            t.await.map_err(|e| format!("task: {e}"))??;
        }
        let seconds = started.elapsed().as_secs_f64();
        let mut l = latencies.borrow_mut();
        l.sort();
        let pct = |p: f64| l.get(((l.len() as f64 * p) as usize).min(l.len().saturating_sub(1))).copied().unwrap_or(Duration::ZERO);
        Ok(Figures { calls: l.len(), seconds, p50_us: pct(0.50).as_secs_f64() * 1e6, p99_us: pct(0.99).as_secs_f64() * 1e6 })
    })
}
