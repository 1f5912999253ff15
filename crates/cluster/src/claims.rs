//! Claims that only one process of the flock may win (a schedule's firing run by copies of a
//! cage on several hosts): the first process to store the claim's subject in the flock's
//! JetStream stream wins.
//!
//! Spoken as plain JetStream API requests (JSON over core NATS) rather than through a client's
//! key-value layer, so that it works with every JetStream server from 2.2 on: a stream keeping
//! one message per subject for two days, and a publish that expects the subject to be empty
//! (`Nats-Expected-Last-Subject-Sequence: 0`), which the server refuses when a claim is there.

use std::time::Duration;

use serde_json::{json, Value as Json};
use tokio::sync::OnceCell;

use crate::connect::Connection;

/// How long a claim is kept (a firing is never claimed again after that: it is in the past).
pub const KEEP: Duration = Duration::from_secs(2 * 86_400);
/// How long one claim may take before it counts as failed.
pub const TIMEOUT: Duration = Duration::from_secs(5);
/// JetStream's error code for "wrong last sequence": the subject holds a claim already.
const WRONG_LAST_SEQUENCE: u64 = 10071;
/// JetStream's error code for "stream name already in use" (with another config).
const STREAM_NAME_IN_USE: u64 = 10058;

pub fn stream(flock: &str) -> String {
    format!("PMNC_{flock}_CLAIMS")
}

pub fn subject(flock: &str, key: &str) -> String {
    format!("pmnc.{flock}.claims.{key}")
}

pub struct Claims {
    conn: Connection,
    flock: String,
    instance: String,
    ready: OnceCell<()>,
}

fn error_of(reply: &Json) -> Option<(u64, String)> {
    let e = reply.get("error")?;
    Some((e.get("err_code").and_then(Json::as_u64).unwrap_or(0), e.get("description").and_then(Json::as_str).unwrap_or("").to_string()))
}

impl Claims {
    pub fn new(conn: Connection, flock: &str, instance: &str) -> Claims {
        Claims { conn, flock: flock.to_string(), instance: instance.to_string(), ready: OnceCell::new() }
    }

    async fn ask(&self, subject: String, headers: Option<async_nats::HeaderMap>, body: Vec<u8>) -> Result<Json, String> {
        let reply = match headers {
            Some(h) => self.conn.client.request_with_headers(subject.clone(), h, body.into()).await,
            None => self.conn.client.request(subject.clone(), body.into()).await,
        };
        let reply = reply.map_err(|e| match e.kind() {
            async_nats::RequestErrorKind::NoResponders => "JetStream is not enabled on the NATS server".to_string(),
            _ => format!("{subject}: {e}"),
        })?;
        serde_json::from_slice(&reply.payload).map_err(|e| format!("{subject}: unreadable answer: {e}"))
    }

    /// Makes the flock's claim stream once (an existing one is used as it is).
    async fn ensure_stream(&self) -> Result<(), String> {
        self.ready
            .get_or_try_init(|| async {
                let name = stream(&self.flock);
                let config = json!({
                    "name": name,
                    "subjects": [subject(&self.flock, ">")],
                    "max_msgs_per_subject": 1,
                    "max_age": KEEP.as_nanos() as u64,
                    "storage": "file",
                    "num_replicas": 1,
                    "discard": "old",
                });
                let reply = self.ask(format!("$JS.API.STREAM.CREATE.{name}"), None, config.to_string().into_bytes()).await?;
                match error_of(&reply) {
                    None => Ok(()),
                    Some((STREAM_NAME_IN_USE, _)) => Ok(()),
                    Some((code, text)) => {
                        // Copies starting together race to make the stream, and the loser may be
                        // told the subjects overlap: the stream it wanted exists, which is enough.
                        let info = self.ask(format!("$JS.API.STREAM.INFO.{name}"), None, Vec::new()).await?;
                        match error_of(&info) {
                            None => Ok(()),
                            Some(_) => Err(format!("cannot make the JetStream stream {name}: {text} ({code})")),
                        }
                    }
                }
            })
            .await
            .map(|_| ())
    }

    /// True when this process is the first of the flock to claim `key` (subject tokens only:
    /// letters, digits, `_`, `-`, separated by dots).
    pub async fn claim(&self, key: &str) -> Result<bool, String> {
        let work = async {
            self.ensure_stream().await?;
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Expected-Last-Subject-Sequence", "0");
            let reply = self.ask(subject(&self.flock, key), Some(headers), self.instance.clone().into_bytes()).await?;
            match error_of(&reply) {
                None => Ok(true),
                Some((WRONG_LAST_SEQUENCE, _)) => Ok(false),
                Some((code, text)) => Err(format!("cannot claim {key}: {text} ({code})")),
            }
        };
        tokio::time::timeout(TIMEOUT, work).await.unwrap_or_else(|_| Err(format!("claiming {key} took over {TIMEOUT:?}")))
    }
}
