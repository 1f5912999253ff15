//! One MQTT connection that publishes and learns when the broker has each message: PUBACK for
//! QoS 1, PUBCOMP for QoS 2. The resource's pooled connections are publishers, and so is the
//! connection the interface sends replies and dead letters on.
//!
//! A publisher never reconnects by itself: its session is clean, so a reconnect would drop
//! what was being published without a word. A lost connection makes it broken; its owner makes a
//! new one.

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::client::{new_client, Client, ConnectOptions, Event, Outgoing};

/// What a failed publish left behind.
#[derive(Debug, Clone, PartialEq)]
pub struct PublishError {
    pub message: String,
    /// How many of the messages (in order) the broker had confirmed before the failure.
    pub confirmed: usize,
    /// The connection is lost; the messages not confirmed may or may not have arrived.
    pub broken: bool,
}

pub struct Publisher {
    client: Client,
    events: mpsc::UnboundedReceiver<Result<Event, String>>,
    broken: Option<String>,
    /// Ends the driver task when the publisher is dropped.
    _stop: oneshot::Sender<()>,
}

/// Polls the event loop (pings included) until the connection fails or the publisher is gone.
async fn drive(mut eventloop: crate::client::EventLoop, tx: mpsc::UnboundedSender<Result<Event, String>>, mut stop: oneshot::Receiver<()>) {
    loop {
        tokio::select! {
            _ = &mut stop => return,
            r = eventloop.poll() => {
                let failed = r.is_err();
                if tx.send(r).is_err() || failed {
                    return;
                }
            }
        }
    }
}

impl Publisher {
    /// Connects (clean session) and waits for the broker's CONNACK, at most `timeout`.
    pub async fn connect(options: &ConnectOptions, timeout: Duration) -> Result<Publisher, String> {
        let (client, eventloop) = new_client(options);
        let (tx, mut events) = mpsc::unbounded_channel();
        let (stop, stopped) = oneshot::channel();
        tokio::spawn(drive(eventloop, tx, stopped));
        let shown = options.endpoint.shown();
        let first = async {
            loop {
                match events.recv().await {
                    Some(Ok(Event::Connected { .. })) => return Ok(()),
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => return Err(format!("{shown}: {e}")),
                    None => return Err(format!("{shown}: the connection ended before the broker answered")),
                }
            }
        };
        match tokio::time::timeout(timeout, first).await {
            Ok(Ok(())) => Ok(Publisher { client, events, broken: None, _stop: stop }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(format!("{shown}: no answer from the broker within {timeout:?}")),
        }
    }

    /// Reads what the driver reported since the last use: a lost connection shows here.
    fn take_stale(&mut self) {
        while let Ok(ev) = self.events.try_recv() {
            if let Err(e) = ev {
                self.broken = Some(e);
            }
        }
    }

    /// Whether the connection is still up (as far as is known without asking the broker).
    pub fn is_healthy(&mut self) -> bool {
        self.take_stale();
        self.broken.is_none()
    }

    /// Publishes `messages` in order and waits until the broker has confirmed every one of them
    /// (QoS 0 ones count once written). Bounded by whoever awaits it.
    pub async fn publish_all(&mut self, messages: &[Outgoing]) -> Result<(), PublishError> {
        self.take_stale();
        if let Some(e) = &self.broken {
            return Err(PublishError { message: format!("the connection to the broker is lost: {e}"), confirmed: 0, broken: true });
        }
        for m in messages {
            if let Err(e) = self.client.publish(m).await {
                self.broken = Some(e.clone());
                return Err(PublishError { message: format!("cannot publish to {:?}: {e}", m.topic), confirmed: 0, broken: true });
            }
        }
        let mut sent = 0usize;
        // Packet id → index of the message waiting for its confirmation.
        let mut waiting: HashMap<u16, usize> = HashMap::new();
        let mut done = vec![false; messages.len()];
        let mut confirmed = 0usize;
        let count = |done: &[bool]| done.iter().take_while(|d| **d).count();
        while confirmed < messages.len() {
            let ev = match self.events.recv().await {
                Some(ev) => ev,
                None => Err("the connection ended".to_string()),
            };
            match ev {
                Ok(Event::Sent(pkid)) if sent < messages.len() => {
                    let i = sent;
                    sent += 1;
                    if messages[i].qos == 0 {
                        done[i] = true;
                        confirmed += 1;
                    } else {
                        waiting.insert(pkid, i);
                    }
                }
                Ok(Event::PubAck { pkid, refused }) => {
                    let Some(i) = waiting.remove(&pkid) else { continue };
                    if let Some(reason) = refused {
                        return Err(PublishError {
                            message: format!("the broker refused the message to {:?}: {reason}", messages[i].topic),
                            confirmed: count(&done),
                            broken: false,
                        });
                    }
                    done[i] = true;
                    confirmed += 1;
                }
                Ok(Event::PubRec { pkid, refused: Some(reason) }) => {
                    let Some(i) = waiting.remove(&pkid) else { continue };
                    // rumqttc 0.25 keeps a refused QoS 2 publish counted as in flight for ever, so
                    // enough of them would stall the connection: it is not used again.
                    let message = format!("the broker refused the message to {:?}: {reason}", messages[i].topic);
                    self.broken = Some(message.clone());
                    return Err(PublishError { message, confirmed: count(&done), broken: true });
                }
                Ok(Event::PubComp { pkid }) => {
                    if let Some(i) = waiting.remove(&pkid) {
                        done[i] = true;
                        confirmed += 1;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    self.broken = Some(e.clone());
                    let confirmed = count(&done);
                    return Err(PublishError {
                        message: format!("the connection to the broker was lost while publishing ({confirmed} of {} confirmed): {e}", messages.len()),
                        confirmed,
                        broken: true,
                    });
                }
            }
        }
        Ok(())
    }

    /// Sends DISCONNECT (the driver ends when the publisher is dropped).
    pub fn disconnect(&self) {
        self.client.try_disconnect();
    }
}
