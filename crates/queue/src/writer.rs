//! The one writer of a cage's queue: it takes every enqueue and completion waiting in its
//! channel and commits them in one SQLite transaction (group commit), so that one fsync covers
//! a whole batch. Replies go out only after the commit: a call id returned to Lua is on disk.

use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rusqlite::{Connection, TransactionBehavior};
use rustomnic_resource_state::store::{apply_in, sql_error, Write};
use tokio::sync::oneshot;

use crate::store::{self, NewCall, OutboxCall, OutboxEnd, Outcome};
use crate::{workflow, Store};

/// The most operations committed together.
const MAX_BATCH: usize = 8192;
/// How often done calls past their windows are pruned (sooner while a backlog remains).
const PRUNE_EVERY: Duration = Duration::from_secs(10);
/// Rows pruned per kind in one commit: a large backlog is cleared over many small commits
/// rather than one that would hold a huge transaction in the WAL.
const PRUNE_BATCH: usize = 2000;

pub(crate) enum Op {
    Enqueue(NewCall, oneshot::Sender<Result<bool, String>>),
    /// The end of an attempt, with the state writes the call made (held until now). Replies
    /// true when the call had been cancelled meanwhile (its writes were dropped).
    Complete {
        seq: i64,
        outcome: Outcome,
        writes: Vec<Write>,
        reply: oneshot::Sender<Result<bool, String>>,
    },
    /// Cancels call `id`, keeping its record at least until `keep_until_ms`.
    Cancel {
        id: String,
        keep_until_ms: i64,
        reply: oneshot::Sender<Result<store::Cancel, String>>,
    },
    Expire(i64, oneshot::Sender<Result<(), String>>),
    /// A transaction's state writes with the durable calls it made: calls to this cage go
    /// straight into its queue, calls to other cages into its outbox, all in one commit.
    Outbox {
        writes: Vec<Write>,
        direct: Vec<NewCall>,
        outgoing: Vec<OutboxCall>,
        reply: oneshot::Sender<Result<(), String>>,
    },
    OutboxEnd(i64, OutboxEnd, oneshot::Sender<Result<(), String>>),
    /// The held state writes of an attempt of a clustered queue's call (its end is kept in
    /// JetStream, not in this file): committed before that end is written there, with what
    /// comes after it when it is a workflow step (decision 152).
    Writes {
        writes: Vec<Write>,
        step: Option<workflow::StepEnd>,
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// A workflow's record, join and first steps (workflow.rs).
    Workflow {
        start: workflow::Start,
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// Cancels a workflow's waiting steps and joins in this file, and marks it cancelled here.
    CancelWorkflow {
        id: String,
        keep_until_ms: i64,
        reply: oneshot::Sender<Result<workflow::Cancelled, String>>,
    },
    /// A member's end, for a join this cage holds (forwarded by the cage that ran it).
    JoinPart {
        part: workflow::Part,
        reply: oneshot::Sender<Result<(), String>>,
    },
}

impl Op {
    /// Whether committing this changes what the outbox holds.
    fn touches_outbox(&self) -> bool {
        match self {
            Op::Outbox { outgoing, .. } => !outgoing.is_empty(),
            Op::Workflow { start, .. } => !start.outgoing.is_empty(),
            Op::OutboxEnd(..) => true,
            _ => false,
        }
    }
}

pub(crate) fn run(store: Arc<Store>, mut conn: Connection, rx: Receiver<Op>) {
    let mut last_prune = Instant::now() - PRUNE_EVERY;
    let mut backlog = false;
    let mut trim = crate::WalTrim::new();
    loop {
        let first = match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(op) => op,
            Err(RecvTimeoutError::Timeout) => {
                if store.stop.load(Ordering::SeqCst) {
                    return;
                }
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => return,
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let prune = backlog || last_prune.elapsed() >= PRUNE_EVERY;
        #[cfg(test)]
        crate::run_hook(&store.hooks.before_commit);
        let result = commit(&store, &mut conn, &batch, prune);
        let mut after = workflow::After::default();
        let result = result.map(|(answers, pruned, a)| {
            after = a;
            (answers, pruned)
        });
        match &result {
            Ok((_, pruned)) => {
                if prune {
                    last_prune = Instant::now();
                    backlog = pruned.is_some_and(|n| n >= PRUNE_BATCH);
                }
                if let Ok(mut r) = store.refusing.lock() {
                    if r.take().is_some() {
                        tracing::info!(cage = %store.cage, "queue: the file is writable again; accepting new calls");
                    }
                }
            }
            Err(e) => {
                if let Some(note) = store.log.allow("commit") {
                    tracing::error!(cage = %store.cage, "{e}; new durable calls are refused until a write succeeds{note}");
                }
                if let Ok(mut r) = store.refusing.lock() {
                    *r = Some((e.clone(), Instant::now()));
                }
            }
        }
        let outbox = batch.iter().any(Op::touches_outbox);
        for (i, op) in batch.into_iter().enumerate() {
            let answer = |r: &Result<(Vec<Answer>, Option<usize>), String>| r.as_ref().map(|(answers, _)| answers[i].clone()).map_err(|e| e.clone());
            match op {
                Op::Enqueue(_, reply) | Op::Complete { reply, .. } => {
                    let _ = reply.send(answer(&result).map(|a| matches!(a, Answer::Yes)));
                }
                Op::Cancel { reply, .. } => {
                    let _ = reply.send(answer(&result).map(|a| match a {
                        Answer::Cancel(c) => c,
                        _ => store::Cancel::Unknown,
                    }));
                }
                Op::Expire(_, reply)
                | Op::Outbox { reply, .. }
                | Op::OutboxEnd(_, _, reply)
                | Op::Writes { reply, .. }
                | Op::Workflow { reply, .. }
                | Op::JoinPart { reply, .. } => {
                    let _ = reply.send(result.as_ref().map(|_| ()).map_err(|e| e.clone()));
                }
                Op::CancelWorkflow { reply, .. } => {
                    let _ = reply.send(answer(&result).map(|a| match a {
                        Answer::Workflow(c) => c,
                        _ => workflow::Cancelled::default(),
                    }));
                }
            }
        }
        // Ends of groups and chords that this commit decided, once on disk.
        after.publish();
        let outbox = outbox || after.outbox;
        trim.after_commit(&store, &conn);
        // After the commit, never before: a dispatcher pass that read the outbox before this
        // commit sees the count move and reads it again (docs/decisions/034).
        if outbox {
            store.outbox_changed();
        } else {
            store.wake();
        }
    }
}

/// What one operation of a batch found.
#[derive(Clone)]
enum Answer {
    /// An enqueue inserted its row; an attempt's end found its call cancelled.
    Yes,
    No,
    Cancel(store::Cancel),
    Workflow(workflow::Cancelled),
}

/// Commits `batch`; for each operation its [`Answer`] (enqueues of a known id insert nothing),
/// and how many rows a prune changed when it ran.
/// What a workflow step's end, or a join part, stores comes in the same transaction (`after`
/// says what to do once it is on disk).
type Committed = (Vec<Answer>, Option<usize>, workflow::After);

fn commit(store: &Store, conn: &mut Connection, batch: &[Op], prune: bool) -> Result<Committed, String> {
    let path = &store.path;
    let mut after = workflow::After::default();
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(|e| sql_error(path, "queue: cannot start a write", e).message)?;
    let mut inserted = Vec::with_capacity(batch.len());
    for op in batch {
        match op {
            Op::Enqueue(call, _) => inserted.push(if store::insert(&tx, path, call)? { Answer::Yes } else { Answer::No }),
            Op::Complete { seq, outcome, writes, .. } => {
                // Read in this transaction, which holds the write lock: a cancel (ours or
                // `pmnc queue cancel`'s) is either before it, and the attempt's outcome and
                // writes are dropped, or after it, and finds the call ended.
                if store::is_cancelled(&tx, path, *seq)? {
                    store::complete_cancelled(&tx, path, *seq, outcome)?;
                    inserted.push(Answer::Yes);
                } else {
                    apply_in(&tx, path, writes).map_err(|e| e.message)?;
                    store::complete(&tx, path, *seq, outcome)?;
                    if !matches!(outcome, Outcome::Retry { .. }) {
                        // A workflow's next step, in the same commit as this step's end.
                        workflow::after_call_end(&tx, store, *seq, &mut after)?;
                    }
                    inserted.push(Answer::No);
                }
            }
            Op::Cancel { id, keep_until_ms, .. } => inserted.push(Answer::Cancel(store::cancel(&tx, path, id, *keep_until_ms)?)),
            Op::Expire(seq, _) => {
                store::expire(&tx, path, *seq)?;
                workflow::after_call_end(&tx, store, *seq, &mut after)?;
                inserted.push(Answer::No);
            }
            Op::Outbox { writes, direct, outgoing, .. } => {
                apply_in(&tx, path, writes).map_err(|e| e.message)?;
                for call in direct {
                    store::insert(&tx, path, call)?;
                }
                for call in outgoing {
                    store::outbox_insert(&tx, path, call)?;
                }
                inserted.push(Answer::No);
            }
            Op::OutboxEnd(seq, end, _) => {
                store::outbox_end(&tx, path, *seq, end)?;
                if let OutboxEnd::Dead { error } = end {
                    workflow::after_outbox_dead(&tx, store, *seq, error, &mut after)?;
                }
                inserted.push(Answer::No);
            }
            Op::Workflow { start, .. } => {
                workflow::write_start(&tx, store, start)?;
                inserted.push(Answer::No);
            }
            Op::CancelWorkflow { id, keep_until_ms, .. } => inserted.push(Answer::Workflow(workflow::cancel(&tx, path, id, *keep_until_ms)?)),
            Op::JoinPart { part, .. } => {
                workflow::apply_part(&tx, store, part, &mut after)?;
                inserted.push(Answer::No);
            }
            Op::Writes { writes, step, .. } => {
                apply_in(&tx, path, writes).map_err(|e| e.message)?;
                if let Some(step) = step {
                    workflow::after_step_end(&tx, store, step, &mut after)?;
                }
                inserted.push(Answer::No);
            }
        }
    }
    let pruned = if prune { Some(store::prune(&tx, path, store::now_ms(), PRUNE_BATCH)?) } else { None };
    tx.commit().map_err(|e| sql_error(path, "queue: cannot commit", e).message)?;
    Ok((inserted, pruned, after))
}
