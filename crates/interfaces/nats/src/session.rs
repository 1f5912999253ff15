//! The consumer loop of a nats interface: connect, subscribe (on the interface's own thread,
//! handing each message to a worker) or bind the JetStream consumer (on every worker, handling
//! the messages where they arrive), and settle each message by the handler's outcome
//! (reply, ack, nak with a delay, term with a dead letter); the client reconnects by itself, and
//! a session that fails (the server unreachable at start, the stream missing) is started again
//! with backoff; on shutdown stop taking messages, let those in flight settle, flush, close.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::{select_all, StreamExt};
use rustomnic_core::metrics::{message_counts, MessageCounts};
use rustomnic_core::Value;
use rustomnic_interface::{Host, Request};
use rustomnic_lua::mlua::{Lua, MultiValue, Result as LuaResult, Value as LuaValue};
use rustomnic_lua::RunError;
use rustomnic_resource_nats::async_nats::jetstream::{self, consumer, AckKind};
use rustomnic_resource_nats::async_nats::{self, Event, HeaderMap};
use rustomnic_resource_nats::{client, wire};
use tokio::task::JoinSet;

use crate::{JetStream, NatsInterface, Source};

/// The first wait before a failed session is started again, doubled up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a shutdown waits for messages in flight beyond the request timeout.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// How often the server says an idle pull is alive; two missed ones end the pull (and it is
/// made again).
const HEARTBEAT: Duration = Duration::from_secs(5);

/// The outage now under way, shared by the sessions of one interface on every worker.
pub(crate) use rustomnic_interface::consumer::SharedOutage as Outage;

/// Runs the interface until its shutdown: sessions one after another, with backoff between
/// failed ones. `worker` is the worker this runs on (a JetStream consumer's session runs on
/// each), or None on the interface's own thread.
pub(crate) async fn run(iface: Arc<NatsInterface>, host: Host, worker: Option<usize>, outage: Outage) {
    let counts = message_counts(&iface.spec.cage, &iface.spec.name);
    let mut shutdown = host.shutdown();
    let mut backoff = FIRST_BACKOFF;
    loop {
        if *shutdown.borrow() {
            return;
        }
        match session(&iface, &host, &counts, &outage, worker).await {
            Ok(()) => return,
            Err(e) => {
                if outage.begin() {
                    tracing::warn!(cage = %iface.spec.cage, interface = %iface.spec.name, "{e}; trying again with backoff (this is said once until it works)");
                } else {
                    tracing::debug!(cage = %iface.spec.cage, interface = %iface.spec.name, "still unavailable: {e}");
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.changed() => return,
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// Logs the client's own reconnects: one line when the link is lost, one when it is back.
fn on_event(iface: &Arc<NatsInterface>, outage: &Outage) -> client::OnEvent {
    let (cage, name, at) = (iface.spec.cage.clone(), iface.spec.name.clone(), iface.url.display.clone());
    let outage = outage.clone();
    Box::new(move |event: &Event| match event {
        Event::Disconnected if outage.begin() => {
            tracing::warn!(cage = %cage, interface = %name, "lost the connection to NATS at {at}; reconnecting with backoff (this is said once until it works)");
        }
        Event::Connected => {
            if let Some(after) = outage.end() {
                tracing::info!(cage = %cage, interface = %name, "connected to NATS at {at} again after {:.1}s", after.as_secs_f64());
            }
        }
        Event::ServerError(e) => tracing::warn!(cage = %cage, interface = %name, "NATS at {at} reports: {e}"),
        Event::SlowConsumer(_) => {
            tracing::warn!(cage = %cage, interface = %name, "messages arrive faster than the handlers take them; NATS dropped some core messages")
        }
        Event::LameDuckMode => tracing::warn!(cage = %cage, interface = %name, "the NATS server at {at} is shutting down (lame duck mode)"),
        _ => {}
    })
}

/// One client's life: until the shutdown (Ok) or a failure the client cannot mend (Err).
async fn session(iface: &Arc<NatsInterface>, host: &Host, counts: &Arc<MessageCounts>, outage: &Outage, worker: Option<usize>) -> Result<(), String> {
    let name = match worker {
        Some(w) => format!("pmnc {}/{} worker {w}", iface.spec.cage, iface.spec.name),
        None => format!("pmnc {}/{}", iface.spec.cage, iface.spec.name),
    };
    let client = client::connect(&iface.url, &name, CONNECT_TIMEOUT, Some(on_event(iface, outage))).await?;
    let result = match &iface.source {
        Source::Core { subjects, queue_group } => core(iface, host, counts, outage, &client, subjects, queue_group.as_deref()).await,
        Source::JetStream(js) => jetstream(iface, host, counts, outage, &client, js, worker.unwrap_or(0)).await,
    };
    // Whatever the outcome, acks and replies already handed to the client go out before it is
    // dropped.
    let _ = tokio::time::timeout(Duration::from_secs(2), client.flush()).await;
    result
}

/// Says that a session consumes: once per interface (the first worker's session, when each
/// worker has one), and once at the end of an outage.
fn said_connected(iface: &NatsInterface, outage: &Outage, what: &str, first: bool) {
    match outage.end() {
        Some(after) => {
            tracing::info!(cage = %iface.spec.cage, interface = %iface.spec.name, "connected to NATS at {} again after {:.1}s; consuming {what}", iface.url.display, after.as_secs_f64())
        }
        None if first => tracing::info!(cage = %iface.spec.cage, interface = %iface.spec.name, "consuming {what} on NATS at {}", iface.url.display),
        None => tracing::debug!(cage = %iface.spec.cage, interface = %iface.spec.name, "consuming {what} on NATS at {}", iface.url.display),
    }
}

async fn core(
    iface: &Arc<NatsInterface>,
    host: &Host,
    counts: &Arc<MessageCounts>,
    outage: &Outage,
    client: &async_nats::Client,
    subjects: &[String],
    queue_group: Option<&str>,
) -> Result<(), String> {
    let display = &iface.url.display;
    let mut subscribers = Vec::with_capacity(subjects.len());
    for subject in subjects {
        let sub = match queue_group {
            Some(group) => client.queue_subscribe(subject.clone(), group.to_string()).await,
            None => client.subscribe(subject.clone()).await,
        };
        subscribers.push(sub.map_err(|e| format!("{display}: cannot subscribe to {subject:?}: {e}"))?);
    }
    // The server knows of the subscriptions once it has echoed a message sent after them
    // (a flush only empties the socket's buffer): "consuming" is then true for every sender.
    round_trip(client).await.map_err(|e| format!("{display}: cannot subscribe: {e}"))?;
    let what = match queue_group {
        Some(g) => format!("{} (queue group {g})", subjects.join(", ")),
        None => subjects.join(", "),
    };
    said_connected(iface, outage, &what, true);
    let mut messages = select_all(subscribers);
    let mut tasks = JoinSet::new();
    let mut shutdown = host.shutdown();
    let failure = loop {
        tokio::select! {
            _ = shutdown.changed() => break None,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            next = messages.next(), if tasks.len() < iface.max_ack_pending => match next {
                Some(m) => {
                    let job = Settle { iface: iface.clone(), host: host.clone(), counts: counts.clone(), client: client.clone() };
                    tasks.spawn(job.core(m));
                }
                None => break Some(format!("{display}: the subscriptions ended (the client was closed)")),
            },
        }
    };
    // Unsubscribed first: no new messages while those in flight finish.
    drop(messages);
    if let Some(e) = failure {
        tasks.detach_all();
        return Err(e);
    }
    finish(iface, tasks).await;
    Ok(())
}

/// A message to an inbox of our own and back: the server has then read everything sent before.
async fn round_trip(client: &async_nats::Client) -> Result<(), String> {
    let inbox = client.new_inbox();
    let mut sub = client.subscribe(inbox.clone()).await.map_err(|e| e.to_string())?;
    client.publish(inbox, bytes::Bytes::new()).await.map_err(|e| e.to_string())?;
    client.flush().await.map_err(|e| e.to_string())?;
    match tokio::time::timeout(CONNECT_TIMEOUT, sub.next()).await {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err("the connection closed".to_string()),
        Err(_) => Err(format!("the server did not echo a message within {CONNECT_TIMEOUT:?}")),
    }
}

async fn finish(iface: &NatsInterface, mut tasks: JoinSet<()>) {
    let limit = iface.spec.request_timeout + SHUTDOWN_GRACE;
    let waited = tokio::time::timeout(limit, async { while tasks.join_next().await.is_some() {} }).await;
    if waited.is_err() {
        tracing::warn!(cage = %iface.spec.cage, interface = %iface.spec.name, "{} message(s) still in flight after {limit:?}; JetStream delivers them again, core ones are lost", tasks.len());
    }
}

/// Binds (or with `declare` creates) the stream and the durable pull consumer.
async fn bind(context: &jetstream::Context, js: &JetStream, max_ack_pending: usize, display: &str) -> Result<consumer::PullConsumer, String> {
    let stream = if js.declare {
        let config = jetstream::stream::Config { name: js.stream.clone(), subjects: js.subjects.clone(), ..Default::default() };
        context.get_or_create_stream(config).await.map_err(|e| format!("{display}: cannot create or open stream {:?}: {e}", js.stream))?
    } else {
        context
            .get_stream(&js.stream)
            .await
            .map_err(|e| format!("{display}: cannot open stream {:?}: {e} (create it, or set declare = true with the stream's subjects)", js.stream))?
    };
    if js.declare {
        let config = consumer::pull::Config {
            durable_name: Some(js.consumer.clone()),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: js.ack_wait,
            // The interface counts deliveries and terms the last itself (with a dead letter);
            // the server's own limit would drop a message silently.
            max_deliver: -1,
            max_ack_pending: max_ack_pending as i64,
            ..Default::default()
        };
        stream
            .create_consumer(config)
            .await
            .map_err(|e| format!("{display}: cannot create or update consumer {:?} on stream {:?}: {e}", js.consumer, js.stream))
    } else {
        stream.get_consumer(&js.consumer).await.map_err(|e| {
            format!(
                "{display}: cannot open consumer {:?} on stream {:?}: {e} (create it as a durable pull consumer, or set declare = true)",
                js.consumer, js.stream
            )
        })
    }
}

async fn jetstream(
    iface: &Arc<NatsInterface>,
    host: &Host,
    counts: &Arc<MessageCounts>,
    outage: &Outage,
    client: &async_nats::Client,
    js: &JetStream,
    worker: usize,
) -> Result<(), String> {
    let display = &iface.url.display;
    let context = jetstream::new(client.clone());
    let consumer = bind(&context, js, iface.max_ack_pending, display).await?;
    said_connected(iface, outage, &format!("stream {:?} (consumer {:?})", js.stream, js.consumer), worker == 0);
    // This runs on a worker, and each message's handler runs here too, as a task of its own
    // that reports to one channel: the session is woken once for all the handlers that ended
    // meanwhile, and acks them together (the client writes acks queued together in one write).
    // A failed handler's message is settled by a task of its own.
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut running = 0usize;
    let mut failed = JoinSet::new();
    let job = Settle { iface: iface.clone(), host: host.clone(), counts: counts.clone(), client: client.clone() };
    let mut shutdown = host.shutdown();
    let mut pulls = 0u32;
    let stream: Arc<str> = js.stream.as_str().into();
    let mut taken = 0usize;
    let failure = 'outer: loop {
        // A pull that ended (missed heartbeats across an outage) is made again on the same
        // consumer; the server kept every unacknowledged message for it.
        pulls += 1;
        let mut messages = match consumer.stream().max_messages_per_batch(iface.max_ack_pending).heartbeat(HEARTBEAT).messages().await {
            Ok(m) => m,
            Err(e) if pulls < 1000 && client.connection_state() != async_nats::connection::State::Connected => {
                tracing::debug!(cage = %iface.spec.cage, interface = %iface.spec.name, "pull on {:?}: {e}; again once connected", js.consumer);
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(200)) => continue,
                    _ = shutdown.changed() => break None,
                }
            }
            Err(e) => break Some(format!("{display}: cannot pull from consumer {:?}: {e}", js.consumer)),
        };
        pulls = 0;
        loop {
            tokio::select! {
                _ = shutdown.changed() => {
                    // Pulled but not yet handed to a worker: back to the server at once rather
                    // than held until ack_wait runs out.
                    // Bounded: the pull still open may be handed the nak'ed ones again.
                    for _ in 0..iface.max_ack_pending {
                        match tokio::time::timeout(Duration::from_millis(50), messages.next()).await {
                            Ok(Some(Ok(m))) => {
                                let _ = m.ack_with(AckKind::Nak(None)).await;
                            }
                            _ => break,
                        }
                    }
                    break 'outer None;
                }
                Some(first) = done_rx.recv(), if running > 0 => {
                    let mut ended = vec![first];
                    while let Ok(next) = done_rx.try_recv() {
                        ended.push(next);
                    }
                    running -= ended.len();
                    settle_all(&job, &context, js, &mut failed, ended).await;
                }
                Some(_) = failed.join_next(), if !failed.is_empty() => {}
                next = messages.next(), if running + failed.len() < iface.max_ack_pending => match next {
                    Some(Ok(m)) => {
                        // Boxed once here: the message (with its client) is a few hundred
                        // bytes, moved into the task, through the channel and into `ended`.
                        let m = Box::new(m);
                        if let Some(delivery) = job.prepare(&context, js, &m).await {
                            let (host, request, done, stream) = (job.host.clone(), job.bare_request(), done_tx.clone(), stream.clone());
                            // Boxed: a task keeps its future inline and moves it at each change
                            // of state, and this one is about 2 KiB.
                            tokio::task::spawn_local(Box::pin(async move {
                                let outcome = host.run_here_with(request, |lua| jetstream_message(lua, &m, &stream, &delivery)).await;
                                let _ = done.send((m, delivery, outcome));
                            }));
                            running += 1;
                            taken += 1;
                            if taken.is_multiple_of(DISPATCH_CHUNK) {
                                // Let the handlers taken so far run and their acks go out
                                // while the rest of the pull is still arriving (decision 158).
                                tokio::task::yield_now().await;
                            }
                        }
                    }
                    Some(Err(e)) => {
                        use consumer::pull::MessagesErrorKind as K;
                        match e.kind() {
                            K::ConsumerDeleted => break 'outer Some(format!("{display}: consumer {:?} on stream {:?} was deleted", js.consumer, js.stream)),
                            // Heartbeats missed while the link is down: the pull goes on once
                            // the client is back.
                            K::MissingHeartbeat => tracing::debug!(cage = %iface.spec.cage, interface = %iface.spec.name, "pull on {:?}: {e}", js.consumer),
                            _ => {
                                tracing::debug!(cage = %iface.spec.cage, interface = %iface.spec.name, "pull on {:?} ended: {e}; pulling again", js.consumer);
                                continue 'outer;
                            }
                        }
                    }
                    None => continue 'outer,
                },
            }
        }
    };
    // The handlers still running end on their workers and are settled through the client if it
    // is still there; what was not acknowledged comes back after ack_wait.
    let (context, js) = (context.clone(), js.clone());
    let drain = async move {
        while running > 0 {
            let Some(ended) = done_rx.recv().await else { break };
            running -= 1;
            settle_all(&job, &context, &js, &mut failed, vec![ended]).await;
        }
        while failed.join_next().await.is_some() {}
    };
    if let Some(e) = failure {
        tokio::spawn(drain);
        return Err(e);
    }
    let limit = iface.spec.request_timeout + SHUTDOWN_GRACE;
    if tokio::time::timeout(limit, drain).await.is_err() {
        tracing::warn!(cage = %iface.spec.cage, interface = %iface.spec.name, "message(s) still in flight after {limit:?}; JetStream delivers them again");
    }
    Ok(())
}

/// Settles the messages whose handlers ended: the successes acked together, each failure by a
/// task in `failed` ([`Settle::failed`]).
/// A message whose handler ended, with where it stood and the handler's outcome.
type Ended = (Box<jetstream::Message>, Delivery, Result<Vec<Value>, RunError>);

async fn settle_all(job: &Settle, context: &jetstream::Context, js: &JetStream, failed: &mut JoinSet<()>, ended: Vec<Ended>) {
    for (m, delivery, outcome) in ended {
        match outcome {
            Ok(_) => match m.ack().await {
                Ok(()) => {
                    job.counts.acked.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    tracing::debug!(cage = %job.iface.spec.cage, interface = %job.iface.spec.name, "ack of a message on {:?} failed (it will be delivered again): {e}", m.subject.as_str())
                }
            },
            Err(e) => {
                failed.spawn(job.clone().failed(context.clone(), js.clone(), *m, delivery, e));
            }
        }
    }
}

/// What settles one message.
#[derive(Clone)]
struct Settle {
    iface: Arc<NatsInterface>,
    host: Host,
    counts: Arc<MessageCounts>,
    client: async_nats::Client,
}

impl Settle {
    fn stopping(&self) -> bool {
        *self.host.shutdown().borrow()
    }

    fn request(&self, message: Value) -> Request {
        let mut request = self.bare_request();
        request.args.push(message);
        request
    }

    /// A request to the handler without arguments (the message's table is made in the VM).
    fn bare_request(&self) -> Request {
        let (module, function) = self.iface.spec.handler.value.clone();
        Request { handler: (module, function), args: Vec::new(), deadline: Instant::now() + self.iface.spec.request_timeout, parameters: None }
    }

    fn too_big(&self, len: usize) -> Option<String> {
        (len > self.iface.max_message_size).then(|| format!("the body is {len} bytes, over max_message_size ({} bytes)", self.iface.max_message_size))
    }

    async fn core(self, m: async_nats::Message) {
        let (cage, name) = (&self.iface.spec.cage, &self.iface.spec.name);
        self.counts.received.fetch_add(1, Ordering::Relaxed);
        let subject = m.subject.to_string();
        if let Some(error) = self.too_big(m.payload.len()) {
            tracing::error!(cage = %cage, interface = %name, "message on {subject:?} refused: {error}");
            self.counts.refused.fetch_add(1, Ordering::Relaxed);
            if let Some(reply) = &m.reply {
                self.reply(reply.as_str(), Err((&error, "413"))).await;
            }
            return;
        }
        let mut fields = common_fields(&m);
        fields.push((Value::str("attempt"), Value::Int(1)));
        if let Some(reply) = &m.reply {
            fields.push((Value::str("reply"), Value::str(reply.as_str())));
        }
        let result = self.host.run(self.request(Value::Map(fields))).await;
        match result {
            Ok(values) => {
                self.counts.acked.fetch_add(1, Ordering::Relaxed);
                if let Some(reply) = &m.reply {
                    self.reply(reply.as_str(), Ok(values.into_iter().next().unwrap_or(Value::Nil))).await;
                }
            }
            Err(e) => {
                let error = error_text(&e);
                match &m.reply {
                    Some(reply) => self.reply(reply.as_str(), Err((&error, "500"))).await,
                    None => {
                        tracing::error!(cage = %cage, interface = %name, "message on {subject:?} failed: {error}; core NATS keeps nothing to retry (a JetStream consumer would)")
                    }
                }
            }
        }
    }

    /// The answer to a request: the handler's value as the body, or an empty body with the
    /// error in `Nats-Service-Error`.
    async fn reply(&self, to: &str, outcome: Result<Value, (&str, &str)>) {
        let mut headers = HeaderMap::new();
        let body = match outcome {
            Ok(value) => match value.to_message_body() {
                Ok((body, content_type)) => {
                    if let Some(ct) = content_type {
                        headers.insert(wire::CONTENT_TYPE_HEADER, ct);
                    }
                    body
                }
                Err(e) => {
                    headers.insert(wire::ERROR_HEADER, wire::error_header_value(&format!("the handler's result: {e}")));
                    headers.insert(wire::ERROR_CODE_HEADER, "500");
                    Vec::new()
                }
            },
            Err((error, code)) => {
                headers.insert(wire::ERROR_HEADER, wire::error_header_value(error));
                headers.insert(wire::ERROR_CODE_HEADER, code);
                Vec::new()
            }
        };
        if let Err(e) = self.client.publish_with_headers(to.to_string(), headers, body.into()).await {
            tracing::warn!(cage = %self.iface.spec.cage, interface = %self.iface.spec.name, "the reply to {to:?} was not sent: {e}");
        }
    }

    /// Where JetStream message `m` stands, counted as received; None when the message was settled
    /// here instead (no JetStream metadata, or over the size limit: dead lettered).
    async fn prepare(&self, context: &jetstream::Context, js: &JetStream, m: &jetstream::Message) -> Option<Delivery> {
        let (cage, name) = (&self.iface.spec.cage, &self.iface.spec.name);
        self.counts.received.fetch_add(1, Ordering::Relaxed);
        let quick = m.reply.as_ref().and_then(|r| delivery(r.as_str()));
        let (sequence, delivered) = match quick.map(Ok).unwrap_or_else(|| m.info().map(|i| (i.stream_sequence, i.delivered))) {
            Ok((sequence, delivered)) => (sequence, delivered.max(1)),
            Err(e) => {
                // Not a JetStream delivery at all: nothing to ack, nothing to keep.
                tracing::error!(cage = %cage, interface = %name, "a message on {:?} without JetStream metadata was skipped: {e}", m.subject.as_str());
                self.counts.refused.fetch_add(1, Ordering::Relaxed);
                return None;
            }
        };
        let attempt = attempt_of(delivered);
        if attempt > 1 {
            self.counts.redelivered.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(error) = self.too_big(m.payload.len()) {
            let describe = describe(js, m, sequence);
            tracing::error!(cage = %cage, interface = %name, "{describe} refused: {error}");
            self.counts.refused.fetch_add(1, Ordering::Relaxed);
            Box::pin(self.dead_letter(context, js, m, sequence, attempt, &error, &describe)).await;
            return None;
        }
        Some(Delivery { sequence, delivered, attempt })
    }

    /// Settles JetStream message `m` whose handler failed with `e`: handed back at once when
    /// the worker stopped under it, else nak'ed with the backoff's delay, or, after its last
    /// attempt, dead lettered and terminated.
    async fn failed(self, context: jetstream::Context, js: JetStream, m: jetstream::Message, delivery: Delivery, e: RunError) {
        let (cage, name) = (&self.iface.spec.cage, &self.iface.spec.name);
        if self.stopping() {
            // The worker stopped under the handler: not an attempt of the message's.
            let _ = m.ack_with(AckKind::Nak(None)).await;
            return;
        }
        // Where the message stood as `prepare` read it (a second reading of the reply subject
        // could disagree with the first, and a message it failed to read would never end).
        let Delivery { sequence, attempt, .. } = delivery;
        let describe = describe(&js, &m, sequence);
        let error = error_text(&e);
        if attempt >= js.max_deliver {
            tracing::error!(cage = %cage, interface = %name, "{describe} failed on attempt {attempt} of {}: {error}; terminated", js.max_deliver);
            self.dead_letter(&context, &js, &m, sequence, attempt, &error, &describe).await;
            return;
        }
        let delay = js.delay_before(attempt + 1);
        tracing::warn!(cage = %cage, interface = %name, "{describe} failed on attempt {attempt} of {}: {error}; retrying in {delay:?}", js.max_deliver);
        match m.ack_with(AckKind::Nak(Some(delay))).await {
            Ok(()) => {
                self.counts.retried.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => tracing::debug!(cage = %cage, interface = %name, "nak of {describe} failed (it comes back after ack_wait): {e}"),
        }
    }

    /// Publishes the message to `dead_letter_subject` with the error (JetStream when a stream
    /// takes the subject, waiting for its ack; else core NATS, flushed), then terms it. A dead
    /// letter that cannot be published leaves the message to come back later.
    #[allow(clippy::too_many_arguments)]
    async fn dead_letter(
        &self,
        context: &jetstream::Context,
        js: &JetStream,
        m: &jetstream::Message,
        sequence: u64,
        attempt: u32,
        error: &str,
        describe: &str,
    ) {
        let (cage, name) = (&self.iface.spec.cage, &self.iface.spec.name);
        if let Some(subject) = &js.dead_letter_subject {
            let mut headers = m.headers.clone().unwrap_or_default();
            headers.insert(wire::ERROR_HEADER, wire::error_header_value(error));
            headers.insert(wire::SUBJECT_HEADER, wire::error_header_value(m.subject.as_str()));
            headers.insert(wire::STREAM_HEADER, wire::error_header_value(&js.stream));
            headers.insert(wire::SEQUENCE_HEADER, sequence.to_string().as_str());
            headers.insert("Pmnc-Attempt", attempt.to_string().as_str());
            let sent = match context.publish_with_headers(subject.clone(), headers.clone(), m.payload.clone()).await {
                Ok(ack) => match ack.await {
                    Ok(_) => Ok(()),
                    Err(e) if e.kind() == jetstream::context::PublishErrorKind::StreamNotFound => self.core_publish(subject, headers, m.payload.clone()).await,
                    Err(e) => Err(e.to_string()),
                },
                Err(e) => Err(e.to_string()),
            };
            if let Err(e) = sent {
                tracing::error!(cage = %cage, interface = %name, "{describe}: cannot publish it to dead_letter_subject {subject:?}: {e}; it is kept and comes back later");
                let delay = js.backoff.last().copied().unwrap_or(Duration::from_secs(30));
                let _ = m.ack_with(AckKind::Nak(Some(delay))).await;
                return;
            }
        }
        match m.ack_with(AckKind::Term).await {
            Ok(()) => {
                self.counts.dead_lettered.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => tracing::debug!(cage = %cage, interface = %name, "term of {describe} failed (it will be delivered again): {e}"),
        }
    }

    async fn core_publish(&self, subject: &str, headers: HeaderMap, payload: bytes::Bytes) -> Result<(), String> {
        self.client.publish_with_headers(subject.to_string(), headers, payload).await.map_err(|e| e.to_string())?;
        self.client.flush().await.map_err(|e| e.to_string())
    }
}

/// How many JetStream messages the session hands to handlers before it lets them run. Taking a
/// whole pull (up to `max_ack_pending` messages) before any handler ran made the consumer
/// stop-and-wait: the server waited for acks that came only after the last handler of the batch,
/// and the worker then waited for the next batch (decision 158).
const DISPATCH_CHUNK: usize = 4;

/// Where a JetStream message stands: its stream sequence, the server's delivery count and the
/// attempt that makes.
struct Delivery {
    sequence: u64,
    delivered: i64,
    attempt: u32,
}

/// The handler's `message` table of JetStream message `m`: body, subject, headers, stream,
/// sequence, delivered, redelivered, attempt. Made in one call through Lua's C API, without the
/// value model's copies in between (a value per field, each key and string its own allocation,
/// was a tenth of a message's handling); headers, when the message has any, go through
/// [`wire::headers_to_value`] as before.
fn jetstream_message(lua: &Lua, m: &jetstream::Message, stream: &str, d: &Delivery) -> LuaResult<MultiValue> {
    use rustomnic_lua::mlua::ffi;
    let headers = match m.headers.as_ref().filter(|h| !h.is_empty()) {
        Some(h) => rustomnic_lua::convert::to_lua(lua, &wire::headers_to_value(Some(h)))?,
        None => LuaValue::Nil,
    };
    let (body, subject) = (&m.payload[..], m.subject.as_str());
    let sequence = d.sequence.min(i64::MAX as u64) as i64;
    let (delivered, attempt) = (d.delivered, i64::from(d.attempt));
    // SAFETY: the closure runs in a protected call with the headers' table (or nil) at stack
    // slot 1; it pushes values, sets fields of the one table it made (which has no metatable,
    // so no metamethod runs), and leaves exactly that table. It holds only borrows, so an allocation
    // error that leaves it by longjmp finds nothing to drop.
    let table = unsafe {
        lua.exec_raw::<LuaValue>(headers, |state| {
            let push = |bytes: &[u8]| {
                ffi::lua_pushlstring(state, bytes.as_ptr() as *const std::ffi::c_char, bytes.len());
            };
            ffi::lua_createtable(state, 0, 8);
            push(body);
            ffi::lua_setfield(state, -2, c"body".as_ptr());
            push(subject.as_bytes());
            ffi::lua_setfield(state, -2, c"subject".as_ptr());
            if ffi::lua_type(state, 1) == ffi::LUA_TTABLE {
                ffi::lua_pushvalue(state, 1);
            } else {
                ffi::lua_createtable(state, 0, 0);
            }
            ffi::lua_setfield(state, -2, c"headers".as_ptr());
            push(stream.as_bytes());
            ffi::lua_setfield(state, -2, c"stream".as_ptr());
            ffi::lua_pushinteger(state, sequence);
            ffi::lua_setfield(state, -2, c"sequence".as_ptr());
            ffi::lua_pushinteger(state, delivered);
            ffi::lua_setfield(state, -2, c"delivered".as_ptr());
            ffi::lua_pushboolean(state, std::ffi::c_int::from(delivered > 1));
            ffi::lua_setfield(state, -2, c"redelivered".as_ptr());
            ffi::lua_pushinteger(state, attempt);
            ffi::lua_setfield(state, -2, c"attempt".as_ptr());
            ffi::lua_replace(state, 1);
            ffi::lua_settop(state, 1);
        })
    }?;
    Ok(MultiValue::from_iter([table]))
}

/// The stream sequence and delivery count of a JetStream message, read from its reply subject:
/// `$JS.ACK.` and then 7 tokens (stream, consumer, delivered, stream sequence, ...) or 9 and more
/// (domain and account hash first). Only the two numbers used per message are parsed (the
/// client's full reading of the subject cost about 5% of a message's handling); None for any
/// other subject, which the client's reading then reports. Public (as `reply_delivery`) for
/// the fuzz target fuzz/fuzz_targets/nats_reply_subject.rs: the subject comes from the server.
pub fn delivery(reply: &str) -> Option<(u64, i64)> {
    let rest = reply.strip_prefix("$JS.ACK.")?.as_bytes();
    // One pass over the bytes: where the first six tokens end, and how many dots in all (the
    // iterator of tokens was ~500 instructions a message).
    let mut ends = [0usize; 6];
    let mut dots = 0usize;
    for (i, &b) in rest.iter().enumerate() {
        if b == b'.' {
            if let Some(end) = ends.get_mut(dots) {
                *end = i;
            }
            dots += 1;
        }
    }
    let token = |k: usize| {
        let start = if k == 0 { 0 } else { ends[k - 1] + 1 };
        let end = if k < dots { ends[k] } else { rest.len() };
        &rest[start..end]
    };
    let (delivered, sequence) = match dots + 1 {
        7 => (token(2), token(3)),
        9.. => (token(4), token(5)),
        _ => return None,
    };
    Some((number(sequence)?, i64::try_from(number(delivered)?).ok()?))
}

/// A token of decimal digits (nothing else, not even a sign) as a number that fits in a u64.
fn number(token: &[u8]) -> Option<u64> {
    if token.is_empty() {
        return None;
    }
    token.iter().try_fold(0u64, |n, &b| if b.is_ascii_digit() { n.checked_mul(10)?.checked_add(u64::from(b - b'0')) } else { None })
}

/// The attempt a delivery count makes (JetStream counts from 1).
fn attempt_of(delivered: i64) -> u32 {
    delivered.clamp(1, i64::from(u32::MAX)) as u32
}

/// A JetStream message as log lines name it.
fn describe(js: &JetStream, m: &jetstream::Message, sequence: u64) -> String {
    format!("message #{sequence} of stream {:?} ({:?})", js.stream, m.subject.as_str())
}

/// The fields every message has: body, subject, headers.
fn common_fields(m: &async_nats::Message) -> Vec<(Value, Value)> {
    vec![
        (Value::str("body"), Value::Str(m.payload.to_vec())),
        (Value::str("subject"), Value::str(m.subject.as_str())),
        (Value::str("headers"), wire::headers_to_value(m.headers.as_ref())),
    ]
}

/// The error of a failed attempt as it goes into logs and headers: the message, without the
/// traceback (that is in the log with the request id).
fn error_text(e: &RunError) -> String {
    e.to_string()
}

#[cfg(test)]
mod tests {
    use super::delivery;

    #[test]
    fn the_delivery_is_read_from_both_forms_of_the_reply_subject() {
        // Stream, consumer, delivered, stream sequence, consumer sequence, time, pending.
        assert_eq!(delivery("$JS.ACK.ORDERS.pmnc.3.42.40.1700000000000000000.7"), Some((42, 3)));
        // Domain and account hash first, with and without the trailing token.
        assert_eq!(delivery("$JS.ACK.hub.ACC.ORDERS.pmnc.2.17.15.1700000000000000000.0.tok"), Some((17, 2)));
        assert_eq!(delivery("$JS.ACK._.ACC.ORDERS.pmnc.1.9.9.1700000000000000000.0"), Some((9, 1)));
        assert_eq!(delivery("$JS.ACK._.ACC.ORDERS.pmnc.1.9.9.1700000000000000000.0.tok.more"), Some((9, 1)));
        // The largest numbers that fit: a u64 sequence, an i64 delivery count.
        assert_eq!(delivery("$JS.ACK.S.c.9223372036854775807.18446744073709551615.1.1.0"), Some((u64::MAX, i64::MAX)));
        for bad in [
            "$JS.ACK.S.c.9223372036854775808.1.1.1.0",
            "$JS.ACK.S.c.1.18446744073709551616.1.1.0",
            "$JS.ACK.S.c.+1.1.1.1.0",
            "$JS.ACK.S.c..1.1.1.0",
            "$JS.ACK.S.c.1..1.1.0",
            "$JS.ACK.......",
            "$JS.ACK.ORDERS.pmnc.3.42.40.1700000000000000000",
            "$JS.ACK.ORDERS.pmnc.3.42.40.1700000000000000000.7.8",
            "_INBOX.abc.def",
            "$JS.ACK.ORDERS.pmnc.x.42.40.1700000000000000000.7",
            "$JS.ACK.ORDERS.pmnc.3.-1.40.1700000000000000000.7",
            "$JS.ACK.ORDERS.pmnc.99999999999999999999.1.40.1700000000000000000.7",
            "",
        ] {
            assert_eq!(delivery(bad), None, "{bad}");
        }
    }
}
