//! `pmnc queue show|retry|cancel|purge` on the clustered queues of a cage (store = "cluster",
//! docs/queues.md "Clustered store", decision 151): they ask the NATS servers of the cage's
//! `[cluster]` table, change a call's record in the results bucket only by compare-and-set, and
//! say which queue and which servers when NATS cannot be reached.

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use rustomnic_cluster::ClusterConfig;
use rustomnic_lua::durable::CallStatus;
use rustomnic_resource_state::decode;

use crate::jetstream::{bucket, cas, dead_stream_name, key_of, load, stream_name, subject, Cancelled, Cas, Extras, Message, Rec};
use crate::{store, QueueConfig, StoreKind};

/// How long one request to JetStream may take here.
const ASK: Duration = Duration::from_secs(5);
/// At most this many messages of a stream are looked at to find a call (show, retry).
const SCAN_MAX: u64 = 100_000;

/// A cage's clustered queues and the cluster they live in, as its cage.toml says.
#[derive(Clone, Copy)]
pub struct Clustered<'a> {
    pub cage: &'a str,
    pub queues: &'a [QueueConfig],
    pub cluster: Option<&'a ClusterConfig>,
}

impl Clustered<'_> {
    fn queues(&self) -> Vec<&QueueConfig> {
        self.queues.iter().filter(|q| matches!(q.store, StoreKind::Cluster { .. })).collect()
    }

    /// The cluster, when the cage has clustered queues and a [cluster] table.
    fn config(&self) -> Option<&ClusterConfig> {
        self.cluster.filter(|_| !self.queues().is_empty())
    }

    fn names(&self) -> String {
        self.queues().iter().map(|q| q.name.as_str()).collect::<Vec<_>>().join(", ")
    }

    /// The queues a call of record `rec` may be in: its own when the record names it.
    fn of(&self, rec: &Rec) -> Vec<&QueueConfig> {
        let all = self.queues();
        match &rec.extras.queue {
            Some(q) if all.iter().any(|x| &x.name == q) => all.into_iter().filter(|x| &x.name == q).collect(),
            _ => all,
        }
    }

    /// Runs `work` with a JetStream context on the cage's cluster; a clear error naming the
    /// cage, its clustered queues and the servers when NATS cannot be reached.
    fn with_js<T>(&self, config: &ClusterConfig, work: impl AsyncFnOnce(&jetstream::Context) -> Result<T, String>) -> Result<T, String> {
        on_cluster(config, &format!("cage {}, clustered queues {}", self.cage, self.names()), work)
    }
}

/// Runs `work` with a JetStream context on `config`'s servers; errors begin with `label`, and
/// name the servers when NATS cannot be reached.
fn on_cluster<T>(config: &ClusterConfig, label: &str, work: impl AsyncFnOnce(&jetstream::Context) -> Result<T, String>) -> Result<T, String> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    rt.block_on(async {
        let conn = tokio::time::timeout(config.connect_timeout, rustomnic_cluster::connect::connect(config, "pmnc queue", false))
            .await
            .map_err(|_| format!("{label}: cannot reach NATS ({}) within {:?}", config.servers(), config.connect_timeout))?
            .map_err(|e| match e {
                // Already says "cannot reach NATS (servers): why".
                rustomnic_cluster::Error::Unreachable(why) => format!("{label}: {}", why.trim_start_matches("cluster: ")),
                e => format!("{label}: cannot reach NATS ({}): {e}", config.servers()),
            })?;
        let js = crate::jetstream::context(&conn.client);
        work(&js).await.map_err(|e| format!("{label} (NATS {}): {e}", config.servers()))
    })
}

/// The cage's bucket of results; None when none was made yet (nothing was ever stored).
async fn open_bucket(js: &jetstream::Context, flock: &str, cage: &str) -> Result<Option<kv::Store>, String> {
    let name = bucket(flock, cage);
    match tokio::time::timeout(ASK, js.get_key_value(name.clone())).await {
        Err(_) => Err(format!("the bucket {name} does not answer within {ASK:?}")),
        Ok(Ok(kv)) => Ok(Some(kv)),
        Ok(Err(e)) if e.kind() == jetstream::context::KeyValueErrorKind::GetBucket => Ok(None),
        Ok(Err(e)) => Err(format!("the bucket {name}: {e}")),
    }
}

async fn timed<T>(what: &str, work: impl std::future::Future<Output = Result<T, String>>) -> Result<T, String> {
    tokio::time::timeout(ASK, work).await.unwrap_or_else(|_| Err(format!("{what}: no answer within {ASK:?}")))
}

/// The newest message of stream `name` that holds call `id`: (its sequence, the call, its
/// Pmnc-Error header); looks at SCAN_MAX messages at most, newest first.
async fn find(js: &jetstream::Context, name: &str, id: &str) -> Result<Option<(u64, Message, Option<String>)>, String> {
    let mut stream = match js.get_stream(name).await {
        Ok(s) => s,
        Err(e) if matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(_)) => return Ok(None),
        Err(e) => return Err(format!("stream {name}: {e}")),
    };
    let state = stream.info().await.map_err(|e| format!("stream {name}: {e}"))?.state.clone();
    if state.messages == 0 {
        return Ok(None);
    }
    let mut seq = state.last_sequence;
    let mut looked = 0;
    while seq >= state.first_sequence.max(1) && looked < SCAN_MAX {
        looked += 1;
        // Acked calls leave a work-queue stream: gaps are normal.
        if let Ok(m) = stream.get_raw_message(seq).await {
            if let Ok(call) = Message::decode(&m.payload) {
                if call.id == id {
                    let error = m.headers.get("Pmnc-Error").map(|v| v.as_str().to_string());
                    return Ok(Some((m.sequence, call, error)));
                }
            }
        }
        seq -= 1;
    }
    Ok(None)
}

/// The ids of the calls in stream `name` up to sequence `last`.
async fn ids(js: &jetstream::Context, name: &str, first: u64, last: u64) -> Result<Vec<String>, String> {
    let stream = js.get_stream(name).await.map_err(|e| format!("stream {name}: {e}"))?;
    let mut out = Vec::new();
    for seq in first.max(1)..=last {
        if let Ok(m) = stream.get_raw_message(seq).await {
            if let Ok(call) = Message::decode(&m.payload) {
                out.push(call.id);
            }
        }
    }
    Ok(out)
}

/// `pmnc queue cancel` on a clustered queue: Ok(Some(what happened)) when cancelled now or
/// before; Ok(None) when the cage's bucket has no record of `id` (or the cage has no
/// clustered queue); Err when it cannot be cancelled (it ended, it is ending) or NATS
/// cannot be reached. The completion event is published by the copy that meets the cancel.
pub fn cancel(c: Clustered, id: &str) -> Result<Option<String>, String> {
    let Some(config) = c.config() else { return Ok(None) };
    let cage = c.cage;
    let done = c.with_js(config, async |js| {
        let Some(kv) = open_bucket(js, &config.flock, cage).await? else { return Ok(Cancelled::Unknown) };
        timed("the bucket", crate::jetstream::cancel_record(&kv, cage, id, false)).await
    })?;
    match done {
        Cancelled::Now { was, .. } => {
            Ok(Some(format!("call {id} cancelled (it was {was}); it will not run again (an attempt running now runs to its end, and its outcome is dropped)")))
        }
        Cancelled::Already => Ok(Some(format!("call {id} was already cancelled"))),
        Cancelled::Ended(st) => Err(format!("cage {cage}: call {id:?} is {st}: a call that ended cannot be cancelled")),
        Cancelled::Ending => {
            Err(format!("cage {cage}: call {id:?} is ending now (an attempt succeeded and its state writes are being committed): too late to cancel it"))
        }
        Cancelled::Unknown => Ok(None),
    }
}

/// What `pmnc queue cancel PATH ID` of a workflow id did to its steps on clustered queues.
#[derive(Debug, Default)]
pub struct WorkflowSteps {
    /// A line per step: what its record says now.
    pub lines: Vec<String>,
    /// Steps whose records could not be reached, each with why (NATS away, no `[cluster]`).
    pub unreached: Vec<String>,
}

/// `pmnc queue cancel PATH ID` of a workflow id, after its marks in the files at PATH
/// (crate::admin::cancel_workflow): the steps on clustered queues that those files know of,
/// gathered as `pmnc.workflow.cancel` gathers them (crate::workflow::known_steps, their rows
/// and the later steps their continuations carry), have their records cancelled by
/// compare-and-set (decision 151); a step with no record yet gets a `cancelled` record, written
/// only if none is there, so that it never runs when it comes (decision 152). `cages`: name
/// and state file of each cage at PATH; `clustered`: their queues and `[cluster]` tables. A
/// step of a cage at PATH counts when its queue has store = "cluster"; of a cage elsewhere,
/// its bucket is asked (through the `[cluster]` of the cage whose file knew the step). The
/// completion events are left to the copy that meets each step, as for a cancelled call.
pub fn cancel_workflow(cages: &[(String, std::path::PathBuf)], clustered: &[Clustered], id: &str) -> Result<WorkflowSteps, String> {
    let here = |cage: &str| clustered.iter().find(|c| c.cage == cage);
    let cluster_of = |cage: &str| here(cage).and_then(|c| c.cluster);
    let is_clustered = |cage: &str, queue: &str| here(cage).map(|c| c.queues.iter().any(|q| q.name == queue && matches!(q.store, StoreKind::Cluster { .. })));
    let mut out = WorkflowSteps::default();
    // (the cluster, (the step's cage, its ids)); one connection per cluster.
    let mut groups: Vec<(&ClusterConfig, std::collections::BTreeMap<String, Vec<String>>)> = Vec::new();
    for (cage, file) in cages.iter().filter(|(_, f)| f.exists()) {
        let conn = crate::admin::open_to_read(file)?;
        let steps = crate::workflow::known_steps(&conn, file, cage, id)?;
        for (of, ids) in crate::workflow::clustered_by_cage(steps, is_clustered) {
            let Some(config) = cluster_of(&of).or(cluster_of(cage)).or(clustered.iter().find_map(|c| c.cluster)) else {
                // A cage elsewhere may have no clustered queue at all; one at PATH does.
                if here(&of).is_some() {
                    out.unreached.push(format!("cage {of}, steps {}: its cage.toml has no [cluster] table", ids.join(", ")));
                }
                continue;
            };
            let at = match groups.iter().position(|(c, _)| c.flock == config.flock && c.urls == config.urls) {
                Some(at) => at,
                None => {
                    groups.push((config, Default::default()));
                    groups.len() - 1
                }
            };
            let ids_of = groups[at].1.entry(of).or_default();
            ids_of.extend(ids);
            ids_of.sort();
            ids_of.dedup();
        }
    }
    for (config, by_cage) in groups {
        let label = format!("flock {}", config.flock);
        let done = on_cluster(config, &label, async |js| {
            let mut lines = Vec::new();
            let mut unreached = Vec::new();
            for (cage, ids) in &by_cage {
                let kv = match open_bucket(js, &config.flock, cage).await {
                    Ok(Some(kv)) => kv,
                    // No bucket: the cage never stored a call on a clustered queue (a cage
                    // elsewhere may have none); nothing has a record to cancel there.
                    Ok(None) => {
                        if here(cage).is_some() {
                            lines.push(format!("cage {cage}: steps {}: no record to cancel (its clustered queues never ran: no bucket)", ids.join(", ")));
                        }
                        continue;
                    }
                    Err(e) => {
                        unreached.push(format!("cage {cage}, steps {}: {e}", ids.join(", ")));
                        continue;
                    }
                };
                for sid in ids {
                    match timed("the bucket", crate::jetstream::cancel_steps_in(&kv, cage, vec![sid.clone()], false)).await {
                        Ok(found) => lines.extend(found.into_iter().map(|(sid, c)| step_line(cage, &sid, c))),
                        Err(e) => unreached.push(format!("cage {cage}, step {sid}: {e}")),
                    }
                }
            }
            Ok((lines, unreached))
        });
        match done {
            Ok((lines, unreached)) => {
                out.lines.extend(lines);
                out.unreached.extend(unreached);
            }
            Err(e) => {
                let steps: Vec<String> = by_cage.iter().map(|(c, ids)| format!("cage {c}: {}", ids.join(", "))).collect();
                out.unreached.push(format!("{e} (steps {})", steps.join("; ")));
            }
        }
    }
    Ok(out)
}

/// What a cancel did to the record of step `sid` of cage `cage`, as a line of output.
fn step_line(cage: &str, sid: &str, c: Cancelled) -> String {
    let what = match c {
        Cancelled::Now { was, .. } => {
            format!("cancelled (it was {was}); it will not run (an attempt running now runs to its end, and its outcome is dropped)")
        }
        Cancelled::Already => "was already cancelled".to_string(),
        Cancelled::Ended(st) => format!("is {st}: it ended before the cancel"),
        Cancelled::Ending => {
            "is ending now (its next step is being stored): too late for it, it ends done; its later steps on clustered queues were cancelled in advance"
                .to_string()
        }
        // cancel_steps_in wrote a `cancelled` record where there was none.
        Cancelled::Unknown => "not stored yet: cancelled in advance (a cancelled record is written, so it never runs when it comes)".to_string(),
    };
    format!("cage {cage}: step {sid} (clustered) {what}")
}

fn time(ms: i64) -> String {
    let ago = (store::now_ms() - ms) as f64 / 1000.0;
    if ago >= 0.0 {
        format!("{ago:.1}s ago")
    } else {
        format!("in {:.1}s", -ago)
    }
}

fn values_text(values: &[rustomnic_core::Value]) -> String {
    rustomnic_core::Value::Array(values.to_vec()).to_json().map(|j| j.to_string()).unwrap_or_else(|e| format!("<{e}>"))
}

/// `pmnc queue show` on a clustered queue: the call's record, and which stream holds it (with
/// its function, arguments and times when found there). Ok(false) when the bucket has no
/// record of `id`.
pub fn show(c: Clustered, id: &str, out: &mut dyn std::io::Write) -> Result<bool, String> {
    let Some(config) = c.config() else { return Ok(false) };
    let cage = c.cage;
    let found = c.with_js(config, async |js| {
        let Some(kv) = open_bucket(js, &config.flock, cage).await? else { return Ok(None) };
        let Some(rec) = timed("the bucket", load(&kv, id)).await? else { return Ok(None) };
        // Waiting calls (cancelled ones too, until their next delivery) are in the queue's
        // stream; dead ones in its dead letters.
        let mut held = None;
        for q in c.of(&rec) {
            let dead = rec.status.status == "dead";
            let name = if dead { dead_stream_name(&config.flock, cage, &q.name) } else { stream_name(&config.flock, cage, &q.name) };
            if rec.status.status == "done" {
                break;
            }
            if let Some(hit) = find(js, &name, id).await? {
                held = Some((q.name.clone(), name, hit));
                break;
            }
        }
        Ok(Some((rec, held)))
    })?;
    let Some((rec, held)) = found else { return Ok(false) };
    let w = |e: std::io::Error| e.to_string();
    let st = &rec.status;
    writeln!(out, "call:      {id}").map_err(w)?;
    writeln!(out, "cage:      {cage} (clustered, record {} in bucket {})", key_of(id), bucket(&config.flock, cage)).map_err(w)?;
    let status =
        if rec.extras.ending.is_some() { format!("{} (an attempt is ending: its state writes are being committed)", st.status) } else { st.status.clone() };
    writeln!(out, "status:    {status}").map_err(w)?;
    if let Some(q) = rec.extras.queue.as_ref().or(held.as_ref().map(|h| &h.0)) {
        writeln!(out, "queue:     {q}").map_err(w)?;
    }
    writeln!(out, "attempts:  {}", st.attempts.unwrap_or(0)).map_err(w)?;
    match &held {
        Some((_, stream, (seq, call, error))) => {
            let what = if st.status == "dead" { "dead letter in stream" } else { "in stream" };
            writeln!(out, "held:      {what} {stream}, sequence {seq}").map_err(w)?;
            writeln!(out, "function:  {}.{}", call.module, call.function).map_err(w)?;
            writeln!(out, "from cage: {}", call.from_cage).map_err(w)?;
            writeln!(out, "created:   {}", time(call.created_ms)).map_err(w)?;
            writeln!(out, "due:       {}", time(call.due_ms)).map_err(w)?;
            if call.expires_ms < i64::MAX {
                writeln!(out, "expires:   {}", time(call.expires_ms)).map_err(w)?;
            }
            let args = match decode(&call.args) {
                Ok(v) => v.to_json().map(|j| j.to_string()).unwrap_or_else(|e| format!("<{e}>")),
                Err(e) => format!("<cannot read: {e}>"),
            };
            writeln!(out, "args:      {args}").map_err(w)?;
            if let Some(e) = error {
                writeln!(out, "dead as:   {e}").map_err(w)?;
            }
        }
        None if st.status == "done" || st.status == "cancelled" => writeln!(out, "held:      in no stream (it ended)").map_err(w)?,
        None if st.status == "dead" => writeln!(out, "held:      its dead letter is no longer kept (purged, or past 30 days)").map_err(w)?,
        None => writeln!(out, "held:      not found in its queue's stream (it may have just ended or be about to be published)").map_err(w)?,
    }
    if let Some(f) = &rec.extras.from {
        if held.is_none() {
            writeln!(out, "from cage: {f}").map_err(w)?;
        }
    }
    if let Some(v) = &st.value {
        writeln!(out, "result:    {}", values_text(v)).map_err(w)?;
    }
    if let Some(e) = &st.error {
        writeln!(out, "error:     {e}").map_err(w)?;
    }
    Ok(true)
}

/// `pmnc queue retry` on a clustered queue: a dead call is published again to its queue's
/// stream (a new message id, so that de-duplication lets it in) with `extend` more time to
/// live, its record becomes `pending` first (so the copy that takes it runs it), and its dead
/// letter is removed. Ok(Some(what happened)); Ok(None) when the bucket has no record of `id`.
pub fn retry(c: Clustered, id: &str, extend: Duration) -> Result<Option<String>, String> {
    let Some(config) = c.config() else { return Ok(None) };
    let cage = c.cage;
    // The outer error: NATS; the inner one: this call cannot be retried.
    c.with_js(config, async |js| Ok(retry_on(js, c, config, id, extend).await))?.map_err(|e| format!("cage {cage}: {e}"))
}

async fn retry_on(js: &jetstream::Context, c: Clustered<'_>, config: &ClusterConfig, id: &str, extend: Duration) -> Result<Option<String>, String> {
    let cage = c.cage;
    {
        let Some(kv) = open_bucket(js, &config.flock, cage).await? else { return Ok(None) };
        let Some(rec) = timed("the bucket", load(&kv, id)).await? else { return Ok(None) };
        if rec.status.status != "dead" {
            let why = match rec.status.status.as_str() {
                "cancelled" => "a cancelled call is not revived",
                "done" => "it ended",
                _ => "it is still being tried (its queue's backoff decides when)",
            };
            return Err(format!("call {id:?} is {}: on a clustered queue only dead calls can be retried ({why})", rec.status.status));
        }
        let mut letter = None;
        for q in c.of(&rec) {
            let name = dead_stream_name(&config.flock, cage, &q.name);
            if let Some((seq, call, _)) = find(js, &name, id).await? {
                letter = Some((q.name.clone(), name, seq, call));
                break;
            }
        }
        let Some((queue, dead_name, seq, mut call)) = letter else {
            return Err(format!("call {id:?} is dead but its dead letter is no longer kept (purged, or past 30 days): it cannot be run again"));
        };
        let now = store::now_ms();
        call.due_ms = now;
        call.expires_ms = call.expires_ms.max(now.saturating_add(extend.as_millis() as i64));
        let payload = call.encode()?;
        // The record first: a copy that took the call while its record still said dead would
        // only ack it.
        let pending = CallStatus { status: "pending".into(), ..rec.status.clone() };
        let extras = Extras { queue: Some(queue.clone()), from: rec.extras.from.clone().or(Some(call.from_cage.clone())), ..Default::default() };
        let revision = match timed("the bucket", cas(&kv, id, &pending, &extras, rec.revision)).await? {
            Cas::Written(r) => r,
            Cas::Conflict => return Err(format!("call {id:?} changed while it was being retried; look again (pmnc queue show)")),
        };
        let publish = jetstream::message::PublishMessage::build().payload(Bytes::from(payload)).message_id(format!("{id}:retry:{now}").as_str());
        let sent = async { js.send_publish(subject(&config.flock, cage, &queue), publish).await.map_err(|e| e.to_string())?.await.map_err(|e| e.to_string()) };
        if let Err(e) = timed("the queue's stream", sent).await {
            // Back to dead, as it was (only if nothing changed it since).
            let _ = cas(&kv, id, &rec.status, &rec.extras, revision).await;
            return Err(format!("call {id:?}: it could not be published again to queue {queue}: {e}"));
        }
        let removed = match js.get_stream(&dead_name).await {
            Ok(s) => s.delete_message(seq).await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        let note = match removed {
            Ok(_) => String::new(),
            Err(e) => format!(" (its dead letter, sequence {seq} of {dead_name}, could not be removed: {e})"),
        };
        Ok(Some(format!("call {id} of cage {cage} will run again now (queue {queue}){note}")))
    }
}

/// `pmnc queue purge` on the clustered queues of a cage: `dead_only` empties their dead-letter
/// streams; otherwise their calls' streams too, and the records of the calls purged there say
/// `cancelled` (`purged`), so that an attempt running now drops its outcome. Writes a line per
/// queue to `out`.
pub fn purge(c: Clustered, dead_only: bool, out: &mut dyn std::io::Write) -> Result<(), String> {
    let Some(config) = c.config() else { return Ok(()) };
    let cage = c.cage;
    let lines = c.with_js(config, async |js| {
        let kv = open_bucket(js, &config.flock, cage).await?;
        let mut lines = Vec::new();
        for q in c.queues() {
            let dead_name = dead_stream_name(&config.flock, cage, &q.name);
            let dead = match js.get_stream(&dead_name).await {
                Ok(s) => timed(&dead_name, async { s.purge().await.map_err(|e| e.to_string()) }).await?.purged,
                Err(_) => 0,
            };
            let mut line = format!("cage {cage}: queue {q} (clustered): deleted {dead} dead letters", q = q.name);
            if !dead_only {
                let name = stream_name(&config.flock, cage, &q.name);
                let (purged, marked) = match js.get_stream(&name).await {
                    Ok(mut s) => {
                        let state = s.info().await.map_err(|e| format!("stream {name}: {e}"))?.state.clone();
                        // The calls up to the last one now; calls published meanwhile stay.
                        let ids = if state.messages > 0 { ids(js, &name, state.first_sequence, state.last_sequence).await? } else { Vec::new() };
                        let purged = s.purge().sequence(state.last_sequence + 1).await.map_err(|e| format!("stream {name}: {e}"))?.purged;
                        let mut marked = 0;
                        if let Some(kv) = &kv {
                            for id in &ids {
                                if purged_record(kv, cage, id).await? {
                                    marked += 1;
                                }
                            }
                        }
                        (purged, marked)
                    }
                    Err(_) => (0, 0),
                };
                line.push_str(&format!(", {purged} calls ({marked} records marked cancelled)"));
            }
            lines.push(line);
        }
        Ok(lines)
    })?;
    for l in lines {
        writeln!(out, "{l}").map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Marks the record of a purged call `cancelled` when it had not ended; true when it did.
async fn purged_record(kv: &kv::Store, cage: &str, id: &str) -> Result<bool, String> {
    for _ in 0..20 {
        let Some(rec) = load(kv, id).await? else { return Ok(false) };
        if rec.status.is_final() {
            return Ok(false);
        }
        let status = CallStatus {
            status: "cancelled".into(),
            cage: cage.to_string(),
            attempts: rec.status.attempts,
            value: None,
            error: Some("purged (pmnc queue purge)".into()),
        };
        if let Cas::Written(_) = cas(kv, id, &status, &Extras { told: true, ..rec.extras.clone() }, rec.revision).await? {
            return Ok(true);
        }
    }
    Err(format!("call {id}: its record kept changing"))
}
