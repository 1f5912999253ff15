//! The consumer loop of an amqp interface (on its own thread): connect, declare, consume, hand
//! each message to a worker and settle it by the handler's outcome (ack, delayed retry, dead
//! letter, RPC reply); reconnect with backoff when the broker goes away; on shutdown cancel the
//! consumers, let the messages in flight settle, close.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::{select_all, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions, BasicRejectOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, ExchangeKind};
use rustomnic_core::metrics::{message_counts, MessageCounts};
use rustomnic_core::Value;
use rustomnic_interface::consumer::{reconnecting, Outage};
use rustomnic_interface::{Host, Request};
use rustomnic_lua::RunError;
use rustomnic_resource_amqp::{lapin, wire};
use tokio::task::JoinSet;

use crate::AmqpInterface;

/// How long a shutdown waits for messages in flight beyond the request timeout.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Runs the interface until its shutdown: sessions one after another, with backoff between
/// failed ones (rustomnic_interface::consumer).
pub(crate) async fn run(iface: Arc<AmqpInterface>, host: Host) {
    let counts = message_counts(&iface.spec.cage, &iface.spec.name);
    reconnecting(&host, async |outage: &mut Outage| session(&iface, &host, &counts, outage).await).await;
}

/// One connection's life: until the shutdown (Ok) or the first failure (Err, to be retried).
async fn session(iface: &Arc<AmqpInterface>, host: &Host, counts: &Arc<MessageCounts>, outage: &mut Outage) -> Result<(), String> {
    let display = &iface.url.display;
    let conn = rustomnic_resource_amqp::client::connect(&iface.url, &format!("pmnc {}/{}", iface.spec.cage, iface.spec.name)).await?;
    let consume = conn.create_channel().await.map_err(|e| format!("{display}: cannot open a channel: {e}"))?;
    consume.basic_qos(iface.prefetch, BasicQosOptions::default()).await.map_err(|e| format!("{display}: cannot set prefetch: {e}"))?;
    let publish = conn.create_channel().await.map_err(|e| format!("{display}: cannot open a channel: {e}"))?;
    publish.confirm_select(ConfirmSelectOptions::default()).await.map_err(|e| format!("{display}: cannot switch on publisher confirms: {e}"))?;
    if iface.declare {
        declare(iface, &conn).await?;
    }
    let mut consumers = Vec::with_capacity(iface.queues.len());
    for (i, queue) in iface.queues.iter().enumerate() {
        let tag = format!("pmnc-{}-{}-{}-{i}", iface.spec.cage, iface.spec.name, std::process::id());
        let consumer = consume
            .basic_consume(short(queue)?, short(&tag)?, BasicConsumeOptions::default(), FieldTable::default())
            .await
            .map_err(|e| format!("{display}: cannot consume queue {queue:?}: {e}"))?;
        consumers.push((tag, consumer.map(move |d| (i, d))));
    }
    match outage.end() {
        Some(after) => {
            tracing::info!(cage = %iface.spec.cage, interface = %iface.spec.name, "connected to {at} again after {:.1}s; consuming {}", after.as_secs_f64(), iface.queues.join(", "), at = iface.url.display)
        }
        None => tracing::info!(cage = %iface.spec.cage, interface = %iface.spec.name, "consuming {} on {at}", iface.queues.join(", "), at = iface.url.display),
    }
    let tags: Vec<String> = consumers.iter().map(|(t, _)| t.clone()).collect();
    let mut deliveries = select_all(consumers.into_iter().map(|(_, c)| c));
    let mut tasks = JoinSet::new();
    let mut unsettled = Unsettled::default();
    let mut shutdown = host.shutdown();
    let failure = loop {
        tokio::select! {
            _ = shutdown.changed() => break None,
            Some(first) = tasks.join_next(), if !tasks.is_empty() => {
                // Every handler that has finished by now settles in one go: a run of
                // acknowledgements from the oldest delivery on becomes one frame.
                let mut batch: Vec<Done> = first.into_iter().collect();
                while let Some(more) = tasks.try_join_next() {
                    batch.extend(more);
                }
                unsettled.settle(iface, batch).await;
            }
            next = deliveries.next() => match next {
                Some((i, Ok(delivery))) => {
                    let job = Settle { iface: iface.clone(), host: host.clone(), counts: counts.clone(), publish: publish.clone(), queue: iface.queues[i].clone() };
                    unsettled.tags.insert(delivery.delivery_tag);
                    tasks.spawn(job.run(delivery));
                }
                Some((_, Err(e))) => break Some(format!("{display}: the connection failed: {e}")),
                None => break Some(format!("{display}: the broker ended the consumers (a queue deleted?)")),
            },
        }
    };
    if let Some(e) = failure {
        // The broker gives back what was not acknowledged on this connection; the handlers
        // still running finish on their workers and their settling fails harmlessly.
        tasks.detach_all();
        return Err(e);
    }
    // Shutdown: no new messages, those in flight settle (or go back to the queue), then close.
    for tag in &tags {
        if let Err(e) = consume.basic_cancel(short(tag)?, BasicCancelOptions::default()).await {
            tracing::debug!(cage = %iface.spec.cage, interface = %iface.spec.name, "cancelling consumer {tag}: {e}");
        }
    }
    let limit = iface.spec.request_timeout + SHUTDOWN_GRACE;
    let waited = tokio::time::timeout(limit, async {
        while let Some(done) = tasks.join_next().await {
            unsettled.settle(iface, done.into_iter().collect()).await;
        }
    })
    .await;
    if waited.is_err() {
        tracing::warn!(cage = %iface.spec.cage, interface = %iface.spec.name, "{} message(s) still in flight after {limit:?}; the broker delivers them again", tasks.len());
    }
    let _ = conn.close(200, ShortString::from("pmnc interface stopped")).await;
    Ok(())
}

fn short(s: &str) -> Result<ShortString, String> {
    wire::short("a name", s)
}

/// Declares the queues (durable, dead-lettering to the dead letter exchange), their bindings,
/// and the dead letter exchange with a `<queue>.dead` queue per consumed queue.
async fn declare(iface: &AmqpInterface, conn: &lapin::Connection) -> Result<(), String> {
    let display = &iface.url.display;
    let channel = conn.create_channel().await.map_err(|e| format!("{display}: cannot open a channel: {e}"))?;
    let durable = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
    if let Some(dlx) = &iface.dead_letter_exchange {
        ensure_exchange(conn, dlx, ExchangeKind::Direct, display).await?;
        for queue in &iface.queues {
            let dead = format!("{queue}.dead");
            channel.queue_declare(short(&dead)?, durable, FieldTable::default()).await.map_err(|e| format!("{display}: cannot declare queue {dead:?}: {e}"))?;
            channel
                .queue_bind(short(&dead)?, short(dlx)?, short(queue)?, QueueBindOptions::default(), FieldTable::default())
                .await
                .map_err(|e| format!("{display}: cannot bind queue {dead:?} to exchange {dlx:?}: {e}"))?;
        }
    }
    for queue in &iface.queues {
        let mut args = FieldTable::default();
        if let Some(dlx) = &iface.dead_letter_exchange {
            // Messages the broker itself dead-letters (expired, over a length limit) go there too.
            args.insert(ShortString::from("x-dead-letter-exchange"), AMQPValue::LongString(LongString::from(dlx.as_bytes().to_vec())));
            args.insert(ShortString::from("x-dead-letter-routing-key"), AMQPValue::LongString(LongString::from(queue.as_bytes().to_vec())));
        }
        channel.queue_declare(short(queue)?, durable, args).await.map_err(|e| format!("{display}: cannot declare queue {queue:?}: {e}"))?;
        for b in &iface.bindings {
            ensure_exchange(conn, &b.exchange, ExchangeKind::Topic, display).await?;
            channel
                .queue_bind(short(queue)?, short(&b.exchange)?, short(&b.routing_key)?, QueueBindOptions::default(), FieldTable::default())
                .await
                .map_err(|e| format!("{display}: cannot bind queue {queue:?} to exchange {:?} with {:?}: {e}", b.exchange, b.routing_key))?;
        }
    }
    let _ = channel.close(200, ShortString::from("declared")).await;
    Ok(())
}

/// Declares an exchange durable of `kind`. One that exists with another type is used as it is:
/// the broker refuses the declare (closing its channel, hence a channel of its own) and the
/// exchange is there.
async fn ensure_exchange(conn: &lapin::Connection, name: &str, kind: ExchangeKind, display: &str) -> Result<(), String> {
    let channel = conn.create_channel().await.map_err(|e| format!("{display}: cannot open a channel: {e}"))?;
    let durable = ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() };
    match channel.exchange_declare(short(name)?, kind, durable, FieldTable::default()).await {
        Ok(()) => {
            let _ = channel.close(200, ShortString::from("declared")).await;
            Ok(())
        }
        Err(e) if e.to_string().contains("PRECONDITION_FAILED") => Ok(()),
        Err(e) => Err(format!("{display}: cannot declare exchange {name:?}: {e}")),
    }
}

/// What settles one message.
struct Settle {
    iface: Arc<AmqpInterface>,
    host: Host,
    counts: Arc<MessageCounts>,
    publish: Channel,
    queue: String,
}

/// A message as the log names it: its id, else its delivery tag, and its queue.
fn describe(d: &lapin::message::Delivery, queue: &str) -> String {
    match d.properties.message_id() {
        Some(id) => format!("message {:?} from queue {:?}", id.as_str(), queue),
        None => format!("message #{} from queue {:?}", d.delivery_tag, queue),
    }
}

/// A message whose handler has finished, to be settled at the broker as `outcome` says.
struct Done {
    d: lapin::message::Delivery,
    outcome: Outcome,
    queue: String,
}

impl Done {
    fn describe(&self) -> String {
        describe(&self.d, &self.queue)
    }
}

/// The delivery tags of this session's channel not settled yet. Handlers finish in any order;
/// when those that finished together include the oldest deliveries still open, all of them
/// acknowledged, one `basic.ack` with `multiple` settles that run (fewer frames for the broker to
/// read, on a machine it may share). Everything else is settled one by one, at once: no
/// acknowledgement waits for a slower message, so a slow handler never holds the prefetch window.
#[derive(Default)]
struct Unsettled {
    tags: std::collections::BTreeSet<u64>,
}

impl Unsettled {
    async fn settle(&mut self, iface: &AmqpInterface, mut batch: Vec<Done>) {
        batch.sort_by_key(|done| done.d.delivery_tag);
        let acked: std::collections::BTreeSet<u64> = batch.iter().filter(|done| matches!(done.outcome, Outcome::Ack)).map(|done| done.d.delivery_tag).collect();
        let last_of_run = run_end(&self.tags, &acked);
        for done in &batch {
            let tag = done.d.delivery_tag;
            let (what, result) = match done.outcome {
                Outcome::Ack => match last_of_run {
                    Some(last) if tag < last => continue,
                    Some(last) if tag == last => ("ack", done.d.acker.ack(BasicAckOptions { multiple: true }).await),
                    _ => ("ack", done.d.acker.ack(BasicAckOptions::default()).await),
                },
                Outcome::Requeue => ("requeue", done.d.acker.nack(BasicNackOptions { requeue: true, multiple: false }).await),
                Outcome::Reject => ("reject", done.d.acker.reject(BasicRejectOptions { requeue: false }).await),
            };
            if let Err(e) = result {
                // The channel is gone: the broker delivers the message again.
                tracing::debug!(cage = %iface.spec.cage, interface = %iface.spec.name, "{what} of {} failed (it will be delivered again): {e}", done.describe());
            }
        }
        for done in &batch {
            self.tags.remove(&done.d.delivery_tag);
        }
    }
}

/// The last tag of the longest run of open tags, from the oldest, that `acked` holds entirely,
/// when the run has two tags or more: one `multiple` ack up to it settles exactly that run (the
/// tags below it are settled already, those after it not touched).
fn run_end(open: &std::collections::BTreeSet<u64>, acked: &std::collections::BTreeSet<u64>) -> Option<u64> {
    let mut run = open.iter().take_while(|t| acked.contains(t));
    let first = run.next()?;
    run.last().filter(|last| *last > first).copied()
}

/// How a message ends at the broker.
enum Outcome {
    Ack,
    /// Back to the queue at once (the interface is stopping, or settling failed).
    Requeue,
    Reject,
}

impl Settle {
    async fn run(self, d: lapin::message::Delivery) -> Done {
        self.counts.received.fetch_add(1, Ordering::Relaxed);
        if d.redelivered {
            self.counts.redelivered.fetch_add(1, Ordering::Relaxed);
        }
        let outcome = self.handle(&d).await;
        Done { d, outcome, queue: self.queue }
    }

    fn describe(&self, d: &lapin::message::Delivery) -> String {
        describe(d, &self.queue)
    }

    fn stopping(&self) -> bool {
        *self.host.shutdown().borrow()
    }

    async fn handle(&self, d: &lapin::message::Delivery) -> Outcome {
        let (cage, name) = (&self.iface.spec.cage, &self.iface.spec.name);
        // A copy we republished carries its attempt; anything unreadable there counts as the
        // first (a header of another type from another publisher).
        let attempt = match wire::header_int(&d.properties, wire::ATTEMPT_HEADER) {
            Some(n) if n >= 1 => n.min(i64::from(u32::MAX)) as u32,
            _ => 1,
        };
        if d.data.len() > self.iface.max_message_size {
            let error = format!("the body is {} bytes, over max_message_size ({} bytes)", d.data.len(), self.iface.max_message_size);
            tracing::error!(cage = %cage, interface = %name, "{} refused: {error}", self.describe(d));
            self.counts.refused.fetch_add(1, Ordering::Relaxed);
            return self.dead_letter(d, attempt, &error).await;
        }
        let message = match self.message(d, attempt) {
            Ok(m) => m,
            Err(error) => {
                tracing::error!(cage = %cage, interface = %name, "{} refused: {error}", self.describe(d));
                self.counts.refused.fetch_add(1, Ordering::Relaxed);
                return self.dead_letter(d, attempt, &error).await;
            }
        };
        let (module, function) = self.iface.spec.handler.value.clone();
        let request =
            Request { handler: (module, function), args: vec![message], deadline: Instant::now() + self.iface.spec.request_timeout, parameters: None };
        let result = self.host.run(request).await;
        let reply_to = d.properties.reply_to().as_ref().map(|r| r.as_str().to_string()).filter(|r| !r.is_empty());
        match result {
            Ok(values) => {
                if let Some(reply_to) = reply_to {
                    let body = values.into_iter().next().unwrap_or(Value::Nil);
                    self.reply(d, &reply_to, Ok(body)).await;
                }
                self.counts.acked.fetch_add(1, Ordering::Relaxed);
                Outcome::Ack
            }
            // The worker stopped under the handler: not an attempt of the message's.
            Err(_) if self.stopping() => Outcome::Requeue,
            Err(e) => {
                let error = error_text(&e);
                if let Some(reply_to) = reply_to {
                    // The caller waits for an answer, not for a retry some seconds later.
                    self.reply(d, &reply_to, Err(&error)).await;
                    return Outcome::Ack;
                }
                if attempt >= self.iface.max_attempts {
                    tracing::error!(cage = %cage, interface = %name, "{} failed on attempt {attempt} of {}: {error}; dead-lettered", self.describe(d), self.iface.max_attempts);
                    return self.dead_letter(d, attempt, &error).await;
                }
                self.retry(d, attempt, &error).await
            }
        }
    }

    /// The handler's `message` table.
    fn message(&self, d: &lapin::message::Delivery, attempt: u32) -> Result<Value, String> {
        let properties = wire::properties_to_value(&d.properties)?;
        // A republished copy went through the default exchange: its first exchange and routing
        // key are in headers.
        let exchange = wire::header_text(&d.properties, wire::EXCHANGE_HEADER).unwrap_or_else(|| d.exchange.as_str().to_string());
        let routing_key = wire::header_text(&d.properties, wire::ROUTING_KEY_HEADER).unwrap_or_else(|| d.routing_key.as_str().to_string());
        Ok(Value::Map(vec![
            (Value::str("body"), Value::Str(d.data.clone())),
            (Value::str("queue"), Value::str(self.queue.as_str())),
            (Value::str("exchange"), Value::str(exchange)),
            (Value::str("routing_key"), Value::str(routing_key)),
            (Value::str("redelivered"), Value::Bool(d.redelivered)),
            (Value::str("delivery_tag"), Value::Int(d.delivery_tag as i64)),
            (Value::str("attempt"), Value::Int(i64::from(attempt))),
            (Value::str("properties"), properties),
        ]))
    }

    /// Publishes on the confirm channel and waits for the broker's confirm.
    async fn publish(&self, exchange: &str, routing_key: &str, body: &[u8], properties: BasicProperties, mandatory: bool) -> Result<(), String> {
        let options = BasicPublishOptions { mandatory, ..BasicPublishOptions::default() };
        let confirm = self.publish.basic_publish(short(exchange)?, short(routing_key)?, options, body, properties).await.map_err(|e| e.to_string())?;
        let c = confirm.await.map_err(|e| e.to_string())?;
        if c.is_nack() {
            return Err("the broker refused it (nack)".to_string());
        }
        if let Some(r) = c.take_message() {
            return Err(format!("no queue took it ({} {})", r.reply_code, r.reply_text));
        }
        Ok(())
    }

    /// The properties of a copy: attempt, first exchange and routing key, and `extra` headers.
    fn copy_properties(&self, d: &lapin::message::Delivery, attempt: u32, extra: Vec<(&str, AMQPValue)>) -> BasicProperties {
        let exchange = wire::header_text(&d.properties, wire::EXCHANGE_HEADER).unwrap_or_else(|| d.exchange.as_str().to_string());
        let routing_key = wire::header_text(&d.properties, wire::ROUTING_KEY_HEADER).unwrap_or_else(|| d.routing_key.as_str().to_string());
        let mut set = vec![
            (wire::ATTEMPT_HEADER, AMQPValue::LongLongInt(i64::from(attempt))),
            (wire::EXCHANGE_HEADER, wire::text_value(&exchange)),
            (wire::ROUTING_KEY_HEADER, wire::text_value(&routing_key)),
        ];
        set.extend(extra);
        wire::with_headers(&d.properties, set, &[])
    }

    /// After the delay, a copy with the next attempt goes to the end of the queue and the
    /// original is acknowledged; until the copy is confirmed the original stays unacknowledged,
    /// so a crash meanwhile loses nothing (the broker delivers the original again).
    async fn retry(&self, d: &lapin::message::Delivery, attempt: u32, error: &str) -> Outcome {
        let (cage, name) = (&self.iface.spec.cage, &self.iface.spec.name);
        let next = attempt + 1;
        let delay = self.iface.retry_delay(next);
        tracing::warn!(cage = %cage, interface = %name, "{} failed on attempt {attempt} of {}: {error}; retrying in {delay:?}", self.describe(d), self.iface.max_attempts);
        let mut shutdown = self.host.shutdown();
        if !*shutdown.borrow() {
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.changed() => {}
            }
        }
        if self.stopping() {
            // Back to the queue now, the attempt not counted: the broker keeps it for the next
            // start rather than this process holding it through its shutdown.
            return Outcome::Requeue;
        }
        let properties = self.copy_properties(d, next, vec![(wire::ERROR_HEADER, wire::text_value(error))]);
        match self.publish("", &self.queue, &d.data, properties, true).await {
            Ok(()) => {
                self.counts.retried.fetch_add(1, Ordering::Relaxed);
                Outcome::Ack
            }
            Err(e) => {
                tracing::error!(cage = %cage, interface = %name, "{}: cannot republish it for attempt {next}: {e}; it goes back to the queue as it is", self.describe(d));
                Outcome::Requeue
            }
        }
    }

    /// To the dead letter exchange with the error (then acknowledged), or, without one,
    /// rejected without requeue (the queue's own dead-lettering applies, if any).
    async fn dead_letter(&self, d: &lapin::message::Delivery, attempt: u32, error: &str) -> Outcome {
        let Some(dlx) = &self.iface.dead_letter_exchange else {
            self.counts.dead_lettered.fetch_add(1, Ordering::Relaxed);
            return Outcome::Reject;
        };
        let extra = vec![(wire::ERROR_HEADER, wire::text_value(error)), (wire::QUEUE_HEADER, wire::text_value(&self.queue))];
        let properties = self.copy_properties(d, attempt, extra);
        match self.publish(dlx, &self.queue, &d.data, properties, true).await {
            Ok(()) => {
                self.counts.dead_lettered.fetch_add(1, Ordering::Relaxed);
                Outcome::Ack
            }
            Err(e) => {
                // Kept rather than lost: it comes back and is dead-lettered again later.
                tracing::error!(cage = %self.iface.spec.cage, interface = %self.iface.spec.name, "{}: cannot publish it to dead_letter_exchange {dlx:?}: {e}; it goes back to the queue", self.describe(d));
                let mut shutdown = self.host.shutdown();
                tokio::select! {
                    _ = tokio::time::sleep(self.iface.max_retry_delay) => {}
                    _ = shutdown.changed() => {}
                }
                Outcome::Requeue
            }
        }
    }

    /// The answer to an RPC request: the handler's value as the body (a string as it is, other
    /// values as JSON), or an empty body with the error in `x-pmnc-error`.
    async fn reply(&self, d: &lapin::message::Delivery, reply_to: &str, outcome: Result<Value, &str>) {
        let mut properties = BasicProperties::default();
        if let Some(c) = d.properties.correlation_id() {
            properties = properties.with_correlation_id(c.clone());
        }
        let body = match outcome {
            Ok(value) => match value.to_message_body() {
                Ok((body, content_type)) => {
                    if let Some(ct) = content_type {
                        properties = properties.with_content_type(ShortString::from(ct));
                    }
                    body
                }
                Err(e) => {
                    properties = wire::with_headers(&properties, vec![(wire::ERROR_HEADER, wire::text_value(&format!("the handler's result: {e}")))], &[]);
                    Vec::new()
                }
            },
            Err(error) => {
                properties = wire::with_headers(&properties, vec![(wire::ERROR_HEADER, wire::text_value(error))], &[]);
                Vec::new()
            }
        };
        // Not mandatory: a requester that has gone away leaves nobody to answer.
        if let Err(e) = self.publish("", reply_to, &body, properties, false).await {
            tracing::warn!(cage = %self.iface.spec.cage, interface = %self.iface.spec.name, "{}: the reply to {reply_to:?} was not published: {e}", self.describe(d));
        }
    }
}

/// The error of a failed attempt as it goes into headers: the message, without the traceback
/// (that is in the log with the request id).
fn error_text(e: &RunError) -> String {
    let text = e.to_string();
    // Headers are for people and programs reading dead letters; a huge error text is cut.
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
    use super::run_end;
    use std::collections::BTreeSet;

    fn set(tags: &[u64]) -> BTreeSet<u64> {
        tags.iter().copied().collect()
    }

    #[test]
    fn one_multiple_ack_covers_only_a_run_from_the_oldest_open_delivery() {
        assert_eq!(run_end(&set(&[1, 2, 3, 4]), &set(&[1, 2])), Some(2));
        assert_eq!(run_end(&set(&[1, 2, 3, 4]), &set(&[1, 2, 4])), Some(2), "4 is acked on its own");
        assert_eq!(run_end(&set(&[1, 2, 3, 4]), &set(&[2, 3])), None, "1 is still running");
        assert_eq!(run_end(&set(&[1, 2, 3]), &set(&[1])), None, "one tag is a plain ack");
        // 6 was settled earlier (a nack): the run may step over it.
        assert_eq!(run_end(&set(&[5, 7, 9]), &set(&[5, 7])), Some(7));
        assert_eq!(run_end(&set(&[]), &set(&[1, 2])), None);
    }
}
