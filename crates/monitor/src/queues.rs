//! The clustered queues (each with its stream's figures and the copies of the flock consuming
//! it) and the latest workflows of this process's cages, for `/api/queues`, `/status` and the
//! page. Read on the blocking pool every [`EVERY`] and kept here, so that no page request
//! waits for a state file (docs/monitoring.md, "Clustered queues and workflows").

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use serde_json::{json, Value};

/// How often the view is read again.
pub(crate) const EVERY: Duration = Duration::from_secs(2);
/// The most workflows shown (the newest).
pub const MAX_WORKFLOWS: usize = 50;

/// (clustered queues, workflows, when read in Unix seconds).
static VIEW: Mutex<Option<(Value, Value, f64)>> = Mutex::new(None);
static READING: AtomicBool = AtomicBool::new(false);

fn clustered_json() -> Value {
    let queues: Vec<Value> = rustomnic_queue::overview::clustered()
        .into_iter()
        .map(|q| {
            let copies: Vec<Value> = q
                .copies
                .iter()
                .map(|c| json!({"instance": c.instance, "host": c.host, "pid": c.pid, "running": c.running, "up": c.up, "this": c.instance == q.instance}))
                .collect();
            let running: u64 = q.copies.iter().filter(|c| c.up).map(|c| c.running).sum();
            let f = q.figures.as_ref();
            json!({
                "cage": q.cage,
                "queue": q.queue,
                // null until the stream's figures were first read.
                "waiting": f.map(|f| f.waiting),
                "held": f.map(|f| f.held),
                "redelivered": f.map(|f| f.redelivered),
                "dead": f.map(|f| f.dead),
                "oldest_age_seconds": f.and_then(|f| f.oldest_age).map(|a| (a * 10.0).round() / 10.0),
                "running": running,
                "copies": copies,
            })
        })
        .collect();
    Value::Array(queues)
}

fn workflows_json() -> Value {
    match rustomnic_queue::overview::workflows(MAX_WORKFLOWS) {
        Ok(rows) => Value::Array(
            rows.into_iter()
                .map(|w| {
                    json!({
                        "cage": w.cage, "id": w.id, "kind": w.kind, "status": w.status,
                        "steps_done": w.done, "steps_total": w.total, "started": w.started_ms as f64 / 1000.0,
                    })
                })
                .collect(),
        ),
        Err(e) => {
            tracing::warn!("monitor: cannot read the workflows: {e}");
            Value::Array(Vec::new())
        }
    }
}

/// Reads the view now (blocking: the state files); call it on the blocking pool.
pub(crate) fn read() {
    let view = (clustered_json(), workflows_json(), rustomnic_core::metrics::unix_now());
    *VIEW.lock().unwrap_or_else(|p| p.into_inner()) = Some(view);
}

/// Starts a read on the blocking pool unless one is still going (a slow disk delays the view,
/// never the sampler or the pages).
pub(crate) fn refresh() {
    if READING.swap(true, Ordering::SeqCst) {
        return;
    }
    tokio::task::spawn_blocking(|| {
        read();
        READING.store(false, Ordering::SeqCst);
    });
}

/// (clustered queues, workflows, when read) as last read; empty before the first read.
pub(crate) fn view() -> (Value, Value, Option<f64>) {
    match VIEW.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
        Some((q, w, at)) => (q.clone(), w.clone(), Some(*at)),
        None => (json!([]), json!([]), None),
    }
}

/// The body of `/api/queues`.
pub(crate) fn to_json() -> Value {
    let (clustered, workflows, read) = view();
    json!({"clustered_queues": clustered, "workflows": workflows, "read": read})
}
