//! Consuming Celery's queues on an AMQP 0-9-1 broker (RabbitMQ) as a Celery worker does
//! (shared/design/celery-protocol.md §2, §3): queues declared as Celery declares them, messages
//! acknowledged after their task's outcome is stored (acks_late), a message this worker does not
//! serve put back for another worker, a task waiting for its eta held without a slot (the
//! prefetch raised meanwhile, as Celery does) or, when the eta is further than the broker lets
//! a delivery stay unacknowledged, parked in a delay queue that gives it back later. What a task
//! goes through once taken is crate::tasks.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::stream::{select_all, StreamExt};
use rustomnic_interface::consumer::{reconnecting_with, Outage, SharedOutage};
use rustomnic_interface::Host;
use rustomnic_resource_amqp::client::{self, AmqpUrl};
use rustomnic_resource_amqp::lapin;
use rustomnic_resource_amqp::lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, BasicRejectOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use rustomnic_resource_amqp::lapin::types::{FieldTable, ShortString};
use rustomnic_resource_celery::amqp;
use rustomnic_resource_celery::message::{self, Outgoing, Refusal, Task};
use serde_json::Map;

use crate::tasks::{ResultOf, Results, Transport, Worker};
use crate::CeleryInterface;

/// The longest a message is held unacknowledged waiting for its eta: RabbitMQ closes the
/// channel of a delivery unacknowledged for its `consumer_timeout` (30 minutes by default), so a
/// later eta waits in the delay queue, coming back every HOLD until its time is near.
const HOLD: Duration = Duration::from_secs(600);
/// How long a shutdown waits for tasks in flight beyond the request timeout.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// The refused tasks remembered, to slow down when the same one comes back.
const REFUSED_KEPT: usize = 1024;
/// The content types of kombu's serializers: a message with one of them and no task headers
/// may be a protocol 1 task (its body says), left for others when it is not JSON.
const SERIALIZERS: &[&str] =
    &["application/json", "application/x-python-serialize", "application/x-yaml", "application/x-msgpack", "application/data", "application/text"];
/// Where messages that are not Celery messages at all are kept.
const UNREADABLE: &str = "rustomnic.celery.unreadable";

/// One worker's part of the interface (decision 162): a session runs on each worker thread that
/// has a share of `concurrency`, on a connection of its own, and its tasks run on that thread.
pub(crate) struct Part {
    /// The worker it runs on; worker 0's session says what the interface does and speaks for the
    /// worker in events.
    pub worker: usize,
    /// Its share of the tasks run at once, and of the prefetch.
    pub concurrency: usize,
    pub prefetch: u16,
    /// What the sessions share: the tasks refused lately, the outage under way, the event counts.
    pub refused: Arc<Mutex<VecDeque<String>>>,
    pub outage: SharedOutage,
    pub counters: Arc<crate::events::Counters>,
}

/// Splits `total` (tasks run at once) over `workers` sessions: as evenly as it goes, the first
/// ones taking one more; a session with none is not started.
pub(crate) fn shares(total: usize, workers: usize) -> Vec<usize> {
    let workers = workers.max(1);
    (0..workers).map(|i| total / workers + usize::from(i < total % workers)).collect()
}

/// Consumes until the interface's shutdown, reconnecting with backoff.
pub(crate) async fn run(iface: Arc<CeleryInterface>, host: Host, url: AmqpUrl, part: Part) {
    let outage = Outage::shared(&part.outage);
    reconnecting_with(&host, outage, async |outage: &mut Outage| session(&iface, &host, &url, &part, outage).await).await;
}

/// The AMQP side of a session.
pub(crate) struct Amqp {
    conn: lapin::Connection,
    /// Consumes the queues; its prefetch rises while messages wait for their eta.
    consume: lapin::Channel,
    /// In confirm mode: chain steps, callbacks, retries, parked and kept-aside messages.
    publish: lapin::Channel,
    display: String,
    prefetch: u16,
    /// Messages held waiting for their eta (each raises the prefetch by one).
    waiting: AtomicUsize,
    /// Serializes prefetch changes, so that the last one sent is the last one computed.
    qos: tokio::sync::Mutex<()>,
    /// Queues declared on this connection (for sending, parking, keeping aside).
    declared: Mutex<HashSet<String>>,
    refused: Arc<Mutex<VecDeque<String>>>,
    /// Messages settled by their tasks, for the session to acknowledge in runs.
    settled: tokio::sync::mpsc::UnboundedSender<Settled>,
}

/// A delivery its task is done with: to acknowledge, or settled already (rejected).
enum Settled<A = lapin::Acker> {
    Ack(u64, A),
    Done(u64),
}

/// How long a finished task's acknowledgement may wait to go out with others: RabbitMQ spends
/// about 60 µs of CPU per persistent message acknowledged one by one and about 40 when eight or
/// more go in one `basic.ack` with `multiple` (bench/README.md, decision 163). The result is
/// stored before, so a crash in between only runs the task again, as any acks_late worker may.
const ACK_DELAY: Duration = Duration::from_millis(2);

/// The deliveries of a session not settled yet, and the finished ones whose acknowledgement
/// waits to go out in a run. A run goes out when it is [`Open::run`] long or [`ACK_DELAY`] after
/// the first of it finished, whichever comes first: the finished tasks at the head of the
/// deliveries as one `basic.ack` with `multiple`, any others one by one (a slow task never holds
/// back another's acknowledgement for longer than that).
struct Open<A = lapin::Acker> {
    tags: std::collections::BTreeSet<u64>,
    finished: std::collections::BTreeMap<u64, A>,
    /// Deliveries seen and the highest tag among them: a channel numbers its deliveries 1, 2, 3..,
    /// so while the two are equal no delivery below a tag is still unseen (in another queue's
    /// stream), and `multiple` cannot acknowledge a message no task has run.
    seen: u64,
    highest: u64,
    /// Finished tasks that make a run go out at once: a quarter of the prefetch, so that waiting
    /// acknowledgements never take much of the window of deliveries.
    run: usize,
}

impl<A> Open<A> {
    fn new(prefetch: u16) -> Open<A> {
        Open { tags: Default::default(), finished: Default::default(), seen: 0, highest: 0, run: usize::from(prefetch / 4).clamp(1, 64) }
    }

    fn delivered(&mut self, tag: u64) {
        self.tags.insert(tag);
        self.seen += 1;
        self.highest = self.highest.max(tag);
    }

    /// Notes what the tasks settled; true when a run should go out now.
    fn settled(&mut self, batch: impl IntoIterator<Item = Settled<A>>) -> bool {
        for s in batch {
            match s {
                Settled::Ack(tag, acker) => {
                    self.finished.insert(tag, acker);
                }
                Settled::Done(tag) => {
                    self.tags.remove(&tag);
                }
            }
        }
        self.finished.len() >= self.run
    }

    /// Whether acknowledgements wait to go out.
    fn waiting(&self) -> bool {
        !self.finished.is_empty()
    }

    /// The acknowledgements that wait, to send now: each with whether it has `multiple`.
    fn due(&mut self) -> Vec<(A, bool)> {
        let mut head = None;
        if self.seen == self.highest {
            for tag in &self.tags {
                if !self.finished.contains_key(tag) {
                    break;
                }
                head = Some(*tag);
            }
        }
        let mut sends = Vec::with_capacity(self.finished.len());
        if let Some(last) = head.filter(|l| self.tags.first() != Some(l)) {
            // The head of the deliveries, all finished: one acknowledgement for them all.
            let rest = self.finished.split_off(&(last + 1));
            if let Some((_, acker)) = self.finished.pop_last() {
                sends.push((acker, true));
            }
            self.finished = rest;
            let rest = self.tags.split_off(&(last + 1));
            self.tags = rest;
        }
        for (tag, acker) in std::mem::take(&mut self.finished) {
            self.tags.remove(&tag);
            sends.push((acker, false));
        }
        sends
    }
}

impl Open {
    /// Sends the acknowledgements that wait.
    async fn flush(&mut self, broker: &str) {
        for (acker, multiple) in self.due() {
            if let Err(e) = acker.ack(BasicAckOptions { multiple }).await {
                tracing::warn!("celery: broker {broker}: cannot acknowledge a task message ({e}); the broker delivers it again");
            }
        }
    }
}

/// A message taken from `queue`.
pub(crate) struct Taken {
    delivery: lapin::message::Delivery,
    queue: String,
}

impl Amqp {
    /// Declares `queue` (as Celery does) unless this connection has already.
    async fn ensure_queue(&self, queue: &str) -> Result<(), String> {
        self.declare_once(queue, amqp::declare_queue(&self.conn, queue)).await
    }

    /// Runs `declare` for the queue `name` unless this connection has declared it already.
    async fn declare_once(&self, name: &str, declare: impl std::future::Future<Output = Result<(), String>>) -> Result<(), String> {
        if self.declared.lock().unwrap_or_else(|p| p.into_inner()).contains(name) {
            return Ok(());
        }
        declare.await?;
        self.declared.lock().unwrap_or_else(|p| p.into_inner()).insert(name.to_string());
        Ok(())
    }

    /// Publishes `body` with `properties` to `queue` through the default exchange, confirmed.
    async fn republish(&self, queue: &str, body: &[u8], properties: lapin::BasicProperties) -> Result<(), String> {
        let key = amqp::short("the queue name", queue)?;
        let confirm = self
            .publish
            .basic_publish(ShortString::default(), key, BasicPublishOptions::default(), body, properties)
            .await
            .map_err(|e| format!("broker {}: cannot publish to queue {queue:?}: {e}", self.display))?;
        amqp::confirmed(confirm, &format!("broker {}: queue {queue:?}", self.display)).await
    }

    /// Raises or lowers the prefetch by the messages waiting for their eta.
    async fn set_prefetch(&self) {
        let _one = self.qos.lock().await;
        let n = (usize::from(self.prefetch) + self.waiting.load(Ordering::SeqCst)).min(usize::from(u16::MAX)) as u16;
        let global = BasicQosOptions { global: true };
        if let Err(e) = self.consume.basic_qos(n, global).await {
            tracing::debug!("celery: broker {}: cannot set the prefetch to {n}: {e}", self.display);
        }
    }
}

impl Transport for Amqp {
    type Taken = Taken;

    async fn send(&self, messages: &[Outgoing]) -> Result<(), String> {
        for m in messages {
            self.ensure_queue(&m.queue).await.map_err(|e| format!("broker {}: {e}", self.display))?;
        }
        let mut confirms = Vec::with_capacity(messages.len());
        for m in messages {
            confirms.push((m, amqp::publish_task(&self.publish, m).await.map_err(|e| format!("broker {}: {e}", self.display))?));
        }
        for (m, c) in confirms {
            amqp::confirmed(c, &format!("broker {}: task {} to queue {:?}", self.display, m.id, m.queue)).await?;
        }
        Ok(())
    }

    async fn again(&self, taken: &Taken, task: &Task, at: DateTime<Utc>) -> Result<(), String> {
        let p = &taken.delivery.properties;
        let mut headers = match p.headers() {
            Some(t) => amqp::table_json(t, 0)?,
            None => Map::new(),
        };
        message::retried_headers(&mut headers, task.retries, at);
        let properties = p.clone().with_headers(amqp::headers_table(&headers)?);
        self.republish(&taken.queue, &taken.delivery.data, properties).await
    }

    async fn ack(&self, taken: &Taken) {
        // Acknowledged by the session, in runs; a session that ended has closed its channel and
        // the broker delivers the message again.
        let _ = self.settled.send(Settled::Ack(taken.delivery.delivery_tag, taken.delivery.acker.clone()));
    }

    async fn refresh(&self, _taken: &Taken) {}

    async fn release(&self, taken: &Taken) {
        requeue(self, taken).await;
    }
}

type Shared = Worker<Amqp>;

/// Puts a delivery back in its queue (a reject with requeue) and tells the session it is settled.
async fn requeue(t: &Amqp, taken: &Taken) {
    if let Err(e) = taken.delivery.acker.reject(BasicRejectOptions { requeue: true }).await {
        tracing::warn!("celery: broker {}: cannot put a task message back in queue {} ({e}); the broker delivers it again", t.display, taken.queue);
    }
    let _ = t.settled.send(Settled::Done(taken.delivery.delivery_tag));
}

/// One connection's life: until the shutdown (Ok) or the first failure (Err, to be retried).
async fn session(iface: &Arc<CeleryInterface>, host: &Host, url: &AmqpUrl, part: &Part, outage: &mut Outage) -> Result<(), String> {
    let spec = host.spec();
    let display = url.display.clone();
    // Made on this worker: lapin's own work for the connection (acknowledgements among it) runs
    // here too, beside the tasks.
    let conn = client::connect(url, &format!("pmnc {}/{} celery {}", spec.cage, spec.name, part.worker)).await?;
    let channel = || async { conn.create_channel().await.map_err(|e| format!("{display}: cannot open a channel: {e}")) };
    let consume = channel().await?;
    consume.basic_qos(part.prefetch, BasicQosOptions { global: true }).await.map_err(|e| format!("{display}: cannot set the prefetch: {e}"))?;
    let publish = channel().await?;
    publish.confirm_select(ConfirmSelectOptions::default()).await.map_err(|e| format!("{display}: cannot switch on publisher confirms: {e}"))?;
    for queue in &iface.queues {
        amqp::declare_queue(&conn, queue).await.map_err(|e| format!("{display}: {e}"))?;
    }
    let results = match &iface.backend {
        rustomnic_resource_celery::Backend::Rpc => Results::Rpc(channel().await?),
        _ => crate::redis_results(iface).await?,
    };
    let events = match &iface.events {
        Some(name) => {
            let channel = crate::events::declare_amqp(&conn).await.map_err(|e| format!("{display}: {e}"))?;
            Some(crate::events::Events::shared(name.clone(), crate::events::Sink::Amqp(channel), part.counters.clone(), part.worker == 0))
        }
        None => None,
    };
    let mut consumers = Vec::with_capacity(iface.queues.len());
    for (i, queue) in iface.queues.iter().enumerate() {
        let tag = format!("pmnc-{}-{}-{}-{}-{i}", spec.cage, spec.name, std::process::id(), part.worker);
        let consumer = consume
            .basic_consume(amqp::short("the queue name", queue)?, amqp::short("a consumer tag", &tag)?, BasicConsumeOptions::default(), FieldTable::default())
            .await
            .map_err(|e| format!("{display}: cannot consume queue {queue:?}: {e}"))?;
        consumers.push((tag, consumer.map(move |d| (i, d))));
    }
    let queues = iface.queues.join(", ");
    match outage.end() {
        Some(after) => {
            tracing::info!(cage = %spec.cage, interface = %spec.name, "connected to {at} again after {:.1}s; consuming {queues}", after.as_secs_f64(), at = url.display)
        }
        None if part.worker == 0 => tracing::info!(cage = %spec.cage, interface = %spec.name, "consuming Celery tasks from {queues} on {at}", at = url.display),
        None => {
            tracing::debug!(cage = %spec.cage, interface = %spec.name, "worker {} consuming Celery tasks from {queues} on {at}", part.worker, at = url.display)
        }
    }
    let (settled, mut settled_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut open = Open::new(part.prefetch);
    let transport = Amqp {
        conn,
        consume: consume.clone(),
        publish,
        display: display.clone(),
        prefetch: part.prefetch,
        waiting: AtomicUsize::new(0),
        qos: tokio::sync::Mutex::new(()),
        declared: Mutex::new(iface.queues.iter().cloned().collect()),
        refused: part.refused.clone(),
        settled,
    };
    let shared = Arc::new(Shared {
        iface: iface.clone(),
        host: host.clone(),
        transport,
        results,
        slots: tokio::sync::Semaphore::new(part.concurrency),
        backend_failed: Default::default(),
        events,
    });
    let heartbeat = shared.start_events();
    let tags: Vec<String> = consumers.iter().map(|(t, _)| t.clone()).collect();
    let mut deliveries = select_all(consumers.into_iter().map(|(_, c)| c));
    let mut running = tokio::task::JoinSet::new();
    let mut shutdown = host.shutdown();
    // When the acknowledgements that wait go out at the latest (armed by the first of them).
    let flush_at = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(flush_at);
    let failure = loop {
        while running.try_join_next().is_some() {}
        if let Some(e) = shared.backend_failure() {
            break Some(e);
        }
        tokio::select! {
            _ = shutdown.changed() => break None,
            Some(first) = settled_rx.recv() => {
                let armed = open.waiting();
                let mut batch = vec![first];
                while let Ok(more) = settled_rx.try_recv() {
                    batch.push(more);
                }
                if open.settled(batch) {
                    open.flush(&display).await;
                } else if !armed && open.waiting() {
                    flush_at.as_mut().reset(tokio::time::Instant::now() + ACK_DELAY);
                }
            }
            _ = &mut flush_at, if open.waiting() => open.flush(&display).await,
            next = deliveries.next() => match next {
                Some((i, Ok(delivery))) => {
                    open.delivered(delivery.delivery_tag);
                    let shared = shared.clone();
                    let queue = iface.queues[i].clone();
                    // Run on this worker, as the session: a task stays on one thread from its
                    // delivery to its acknowledgement. Boxed: a task keeps its future inline and
                    // copies it whole as it is placed, polled and read, and this one is KiBs.
                    running.spawn_local(Box::pin(async move { take(&shared, Taken { delivery, queue }).await }));
                }
                Some((_, Err(e))) => break Some(format!("{display}: the connection failed: {e}")),
                None => break Some(format!("{display}: the broker ended the consumers (a queue deleted?)")),
            },
        }
    };
    if let Some(e) = failure {
        // The broker gives back what was not acknowledged on this connection.
        running.detach_all();
        shared.stop_events(heartbeat).await;
        return Err(e);
    }
    // Shutdown: no new messages; those in flight finish (messages waiting for their eta go back
    // at once), then the connection closes and the broker gives back the rest.
    for tag in &tags {
        let _ = consume.basic_cancel(amqp::short("a consumer tag", tag)?, BasicCancelOptions::default()).await;
    }
    let limit = spec.request_timeout + SHUTDOWN_GRACE;
    let finished = tokio::time::timeout(limit, async {
        loop {
            tokio::select! {
                next = running.join_next() => if next.is_none() { break },
                Some(s) = settled_rx.recv() => {
                    open.settled([s]);
                    open.flush(&display).await;
                }
            }
        }
    })
    .await;
    // What the last tasks settled, and what waited to go out.
    let mut batch = Vec::new();
    while let Ok(s) = settled_rx.try_recv() {
        batch.push(s);
    }
    open.settled(batch);
    open.flush(&display).await;
    if finished.is_err() {
        tracing::warn!(cage = %spec.cage, interface = %spec.name, "{} task(s) still in flight after {limit:?}; the broker delivers them again", running.len());
    }
    shared.stop_events(heartbeat).await;
    let _ = shared.transport.conn.close(200, ShortString::from("pmnc interface stopped")).await;
    Ok(())
}

/// One delivered message.
async fn take(shared: &Shared, taken: Taken) {
    let spec = shared.host.spec();
    let d = &taken.delivery;
    let p = &d.properties;
    let text = |s: &Option<ShortString>| s.as_ref().map(|s| s.as_str().to_string()).unwrap_or_default();
    let headers = match p.headers() {
        Some(t) => amqp::table_json_only(t, message::TASK_HEADERS),
        None => Ok(Map::new()),
    };
    let Ok(headers) = headers else {
        let why = headers.err().unwrap_or_default();
        return keep_aside(shared, &taken, &why).await;
    };
    let (content_type, reply_to, correlation_id) = (text(p.content_type()), text(p.reply_to()), text(p.correlation_id()));
    if !headers.contains_key("task") && !headers.contains_key("id") && !SERIALIZERS.contains(&content_type.as_str()) {
        return keep_aside(shared, &taken, &format!("no task headers, and content type {content_type:?}")).await;
    }
    let msg = message::Message { content_type: &content_type, headers: &headers, body: &d.data, reply_to: &reply_to, correlation_id: &correlation_id };
    let iface = &shared.iface;
    let task = match msg.task(iface.max_message_size, |name| iface.handler(name).is_some()) {
        Ok(t) => t,
        Err(Refusal::Others(why)) => return give_back(shared, &taken, headers.get("id").and_then(|v| v.as_str()).unwrap_or(&correlation_id), &why).await,
        Err(Refusal::Fail(why)) => {
            let id = headers.get("id").and_then(|v| v.as_str()).unwrap_or("");
            if id.is_empty() {
                // No task to fail: kept aside, not dropped.
                return keep_aside(shared, &taken, &why).await;
            }
            let to = ResultOf { id, reply_to: &reply_to, correlation_id: if correlation_id.is_empty() { id } else { &correlation_id } };
            return shared.fail_unrun(&taken, &to, &taken.queue, &why).await;
        }
    };
    if let Some(why) = shared.refusal(&task) {
        return give_back(shared, &taken, &task.id, &why).await;
    }
    if shared.expired(&taken, &task).await {
        return;
    }
    if let Some(eta) = task.eta {
        let left = (eta - Utc::now()).to_std().unwrap_or_default();
        if left > HOLD {
            return park(shared, &taken, &task, eta).await;
        }
        if !left.is_zero() {
            // Held here without a slot; the prefetch rises by one meanwhile, so that held
            // messages do not stop the deliveries of others.
            shared.transport.waiting.fetch_add(1, Ordering::SeqCst);
            shared.transport.set_prefetch().await;
            let mut shutdown = shared.host.shutdown();
            let stopped = tokio::select! {
                _ = tokio::time::sleep(left) => false,
                _ = shutdown.changed() => true,
            };
            shared.transport.waiting.fetch_sub(1, Ordering::SeqCst);
            if stopped {
                // Stopping: the task goes back to its queue for the next worker.
                requeue(&shared.transport, &taken).await;
                return;
            }
            shared.transport.set_prefetch().await;
            tracing::debug!(cage = %spec.cage, interface = %spec.name, "task {} reached its eta", task.id);
        }
    }
    shared.run_task(&taken, task, |r| shared.host.run_here(r)).await;
}

/// A task whose eta is further than a delivery may stay unacknowledged: the message goes to
/// its queue's delay queue (confirmed), then is acknowledged; it comes back after HOLD.
async fn park(shared: &Shared, taken: &Taken, task: &Task, eta: DateTime<Utc>) {
    let spec = shared.host.spec();
    let t = &shared.transport;
    let parked = async {
        let delay = amqp::delay_queue(&taken.queue);
        let declare = async { amqp::declare_delay_queue(&t.conn, &taken.queue, HOLD).await.map(|_| ()) };
        t.declare_once(&delay, declare).await.map_err(|e| format!("broker {}: {e}", t.display))?;
        t.republish(&delay, &taken.delivery.data, taken.delivery.properties.clone()).await.map(|()| delay)
    };
    match parked.await {
        Ok(delay) => {
            tracing::info!(cage = %spec.cage, interface = %spec.name, "task {} ({}) waits for its eta {} in queue {delay}", task.id, task.name, message::format_time(eta));
            t.ack(taken).await;
        }
        Err(e) => {
            // Not parked: it goes back to its queue and comes again.
            tracing::warn!(cage = %spec.cage, interface = %spec.name, "task {}: cannot park it until its eta ({e}); put back in its queue", task.id);
            tokio::time::sleep(Duration::from_secs(1)).await;
            requeue(t, taken).await;
        }
    }
}

/// A message this worker does not serve goes back to its queue for another worker; when one
/// comes back that was refused before, it is held a second first, so that a queue only this
/// worker consumes is not spun through.
async fn give_back(shared: &Shared, taken: &Taken, id: &str, why: &str) {
    let spec = shared.host.spec();
    let seen = {
        let mut refused = shared.transport.refused.lock().unwrap_or_else(|p| p.into_inner());
        let seen = refused.iter().any(|r| r == id);
        if !seen {
            if refused.len() >= REFUSED_KEPT {
                refused.pop_front();
            }
            refused.push_back(id.to_string());
        }
        seen
    };
    if seen {
        tokio::time::sleep(Duration::from_secs(1)).await;
    } else {
        tracing::warn!(cage = %spec.cage, interface = %spec.name, "{why}: left in queue {} for another worker", taken.queue);
    }
    requeue(&shared.transport, taken).await;
}

/// A message that is not a Celery message at all: kept in the queue UNREADABLE (confirmed),
/// then acknowledged.
async fn keep_aside(shared: &Shared, taken: &Taken, why: &str) {
    let spec = shared.host.spec();
    let t = &shared.transport;
    let kept = async {
        let declare = async {
            let channel = t.conn.create_channel().await.map_err(|e| e.to_string())?;
            let durable = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
            channel.queue_declare(ShortString::from(UNREADABLE), durable, FieldTable::default()).await.map_err(|e| e.to_string())?;
            let _ = channel.close(200, ShortString::from("declared")).await;
            Ok(())
        };
        t.declare_once(UNREADABLE, declare).await?;
        t.republish(UNREADABLE, &taken.delivery.data, taken.delivery.properties.clone()).await
    };
    match kept.await {
        Ok(()) => {
            tracing::error!(cage = %spec.cage, interface = %spec.name, "a message in queue {} is not a Celery message ({why}); kept in the queue {UNREADABLE}", taken.queue);
            t.ack(taken).await;
        }
        Err(e) => {
            tracing::error!(cage = %spec.cage, interface = %spec.name, "a message in queue {} is not a Celery message ({why}) and cannot be kept aside ({e}); put back", taken.queue);
            tokio::time::sleep(Duration::from_secs(1)).await;
            requeue(t, taken).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{shares, Open, Settled};

    /// Delivers `tags`, settles `acks` (finished) and `rejects`, and returns what goes out.
    fn due(open: &mut Open<u64>, acks: &[u64], rejects: &[u64]) -> (bool, Vec<(u64, bool)>) {
        let now = open.settled(acks.iter().map(|t| Settled::Ack(*t, *t)).chain(rejects.iter().map(|t| Settled::Done(*t))));
        (now, open.due())
    }

    #[test]
    fn finished_tasks_at_the_head_go_out_as_one_acknowledgement() {
        let mut open: Open<u64> = Open::new(32);
        assert_eq!(open.run, 8);
        (1..=10).for_each(|t| open.delivered(t));
        // Three at the head, one behind a task still running.
        assert_eq!(due(&mut open, &[2, 1, 3, 5], &[]), (false, vec![(3, true), (5, false)]));
        // A rejected delivery does not hold back the ones behind it.
        assert_eq!(due(&mut open, &[6, 7], &[4]), (false, vec![(7, true)]));
        assert_eq!(open.tags.iter().copied().collect::<Vec<_>>(), vec![8, 9, 10]);
        // A run long enough goes out at once.
        (11..=20).for_each(|t| open.delivered(t));
        let (now, sent) = due(&mut open, &(8..=15).collect::<Vec<_>>(), &[]);
        assert!(now, "eight finished make a run go out");
        assert_eq!(sent, vec![(15, true)]);
        // A single finished task at the head goes out alone, without `multiple`.
        assert_eq!(due(&mut open, &[16], &[]), (false, vec![(16, false)]));
        assert!(!open.waiting());
    }

    #[test]
    fn no_multiple_acknowledgement_while_a_lower_delivery_is_unseen() {
        // Two queues' consumers on one channel: delivery 2 arrived in the other queue's stream
        // and has not been read yet, so acknowledging 3 with `multiple` would settle it unrun.
        let mut open: Open<u64> = Open::new(16);
        for t in [1, 3, 4] {
            open.delivered(t);
        }
        assert_eq!(due(&mut open, &[1, 3, 4], &[]), (false, vec![(1, false), (3, false), (4, false)]));
        open.delivered(2);
        open.delivered(5);
        open.delivered(6);
        assert_eq!(due(&mut open, &[2, 5, 6], &[]), (false, vec![(6, true)]));
    }

    #[test]
    fn a_small_prefetch_acknowledges_each_task_at_once() {
        let mut open: Open<u64> = Open::new(4);
        open.delivered(1);
        assert_eq!(due(&mut open, &[1], &[]), (true, vec![(1, false)]));
    }

    #[test]
    fn concurrency_is_split_exactly_over_the_workers() {
        assert_eq!(shares(16, 2), vec![8, 8]);
        assert_eq!(shares(5, 2), vec![3, 2]);
        assert_eq!(shares(1, 2), vec![1, 0], "a worker without a share does not consume");
        assert_eq!(shares(3, 4), vec![1, 1, 1, 0]);
        assert_eq!(shares(7, 1), vec![7]);
        assert_eq!(shares(7, 0), vec![7], "a host without workers runs one session");
        for (total, workers) in [(1, 3), (64, 2), (10_000, 7), (9, 4)] {
            assert_eq!(shares(total, workers).iter().sum::<usize>(), total);
        }
    }
}
