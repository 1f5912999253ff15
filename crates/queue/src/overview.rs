//! What the monitor shows of the queues of this process beyond their gauges: each clustered
//! queue with its stream's figures and the copies of the flock consuming it (their running
//! calls, from their heartbeats), and the latest workflows started by this process's cages.
//! Both read what is already at hand (the figures read in the background, the roster, the state
//! files through their reader connections), never NATS, so that the monitor never waits.

use rusqlite::params;
use rustomnic_lua::durable::Calls;

pub use crate::jetstream::Figures;
pub use rustomnic_cluster::presence::QueueCopy;

/// A clustered queue of a cage of this process.
#[derive(Debug, Clone)]
pub struct ClusteredQueue {
    pub cage: String,
    pub queue: String,
    /// Its stream's and consumer's figures as last read (every few seconds); None before the
    /// first reading.
    pub figures: Option<Figures>,
    /// Every copy of the flock that says it consumes the queue, this process included.
    pub copies: Vec<QueueCopy>,
    /// This process's instance id in the flock (to mark its own row).
    pub instance: String,
}

/// Every clustered queue of the cages of this process, by cage and queue.
pub fn clustered() -> Vec<ClusteredQueue> {
    let roster = rustomnic_cluster::roster();
    let instance = rustomnic_cluster::joined().map(|j| j.instance).unwrap_or_default();
    let mut out = Vec::new();
    for s in crate::all_stores() {
        let Some(cluster) = s.cluster.get() else { continue };
        let mut names: Vec<&String> = cluster.queues.keys().collect();
        names.sort();
        for q in names {
            out.push(ClusteredQueue {
                cage: s.cage.clone(),
                queue: q.clone(),
                figures: cluster.figures(q),
                copies: roster.as_ref().map(|r| r.queue_copies(&s.cage, q)).unwrap_or_default(),
                instance: instance.clone(),
            });
        }
    }
    out
}

/// A workflow started by a cage of this process.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkflowRow {
    /// The cage that started it (its record and join are in this cage's file).
    pub cage: String,
    pub id: String,
    /// chain, group or chord.
    pub kind: String,
    /// running, done, dead or cancelled.
    pub status: String,
    /// Steps done, of those this process can read (on_error not counted).
    pub done: usize,
    /// Its steps: a chain's length, a group's members, a chord's members and body.
    pub total: Option<usize>,
    /// When it was started, in Unix milliseconds.
    pub started_ms: i64,
}

/// The latest `limit` workflows started by each cage of this process, newest first over all.
pub fn workflows(limit: usize) -> Result<Vec<WorkflowRow>, String> {
    let mut rows: Vec<WorkflowRow> = Vec::new();
    for s in crate::all_stores() {
        let conn = s.reader.lock().map_err(|_| format!("cage {}: queue: reader lock poisoned", s.cage))?;
        let fail = |e| rustomnic_resource_state::store::sql_error(&s.path, "queue: cannot read the workflows", e).message;
        // Newest first by rowid, which grows with each insert: no index on created_ms is needed
        // and the read stops after `limit` rows. kind '' is a cancel mark of a workflow started
        // elsewhere.
        let mut stmt = conn
            .prepare_cached(
                "SELECT w.id, w.kind, w.status, w.last_step, w.created_ms, j.size FROM queue_workflows w
                 LEFT JOIN queue_joins j ON j.id = w.id WHERE w.kind <> '' ORDER BY w.rowid DESC LIMIT ?1",
            )
            .map_err(fail)?;
        let found = stmt
            .query_map(params![limit as i64], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, Option<String>>(3)?,
                    r.get::<_, i64>(4)?,
                    r.get::<_, Option<i64>>(5)?,
                ))
            })
            .map_err(fail)?;
        for r in found {
            let (id, kind, status, last_step, started_ms, size) = r.map_err(fail)?;
            let total = match kind.as_str() {
                "chain" => last_step.as_deref().and_then(|l| l.rsplit('.').next()).and_then(|n| n.parse::<usize>().ok()),
                "group" => size.map(|n| n as usize),
                "chord" => size.map(|n| n as usize + 1),
                _ => None,
            };
            rows.push(WorkflowRow { cage: s.cage.clone(), id, kind, status, done: 0, total, started_ms });
        }
    }
    rows.sort_by_key(|r| std::cmp::Reverse(r.started_ms));
    rows.truncate(limit);
    let mut out = Vec::with_capacity(rows.len());
    for mut row in rows {
        // Its steps in every file of this process, as pmnc.workflow.status reads them; when
        // they cannot be read (a clustered step's record out of reach), the row keeps its
        // record's status and 0 steps done rather than hiding every other workflow.
        if let Ok(Some(st)) = crate::Service.workflow_status(&row.id) {
            let on_error = format!("{}.on_error", row.id);
            row.done = st.steps.iter().filter(|(sid, status, _)| *sid != on_error && status == "done").count();
            row.status = st.status;
        }
        out.push(row);
    }
    Ok(out)
}
