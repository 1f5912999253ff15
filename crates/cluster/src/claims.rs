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
    let e = reply.get("error").filter(|e| e.is_object())?;
    Some((e.get("err_code").and_then(Json::as_u64).unwrap_or(0), e.get("description").and_then(Json::as_str).unwrap_or("").to_string()))
}

impl Claims {
    pub fn new(conn: Connection, flock: &str, instance: &str) -> Claims {
        Claims { conn, flock: flock.to_string(), instance: instance.to_string(), ready: OnceCell::new() }
    }

    async fn ask(&self, subject: String, headers: Option<async_nats::HeaderMap>, body: Vec<u8>) -> Result<Json, String> {
        let reply = self.ask_raw(subject.clone(), headers, body).await?;
        serde_json::from_slice(&reply).map_err(|e| format!("{subject}: unreadable answer: {e}"))
    }

    async fn ask_raw(&self, subject: String, headers: Option<async_nats::HeaderMap>, body: Vec<u8>) -> Result<bytes::Bytes, String> {
        let reply = match headers {
            Some(h) => self.conn.client.request_with_headers(subject.clone(), h, body.into()).await,
            None => self.conn.client.request(subject.clone(), body.into()).await,
        };
        let reply = reply.map_err(|e| match e.kind() {
            async_nats::RequestErrorKind::NoResponders => "JetStream is not enabled on the NATS server".to_string(),
            _ => format!("{subject}: {e}"),
        })?;
        Ok(reply.payload)
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
            let reply = self.ask_raw(subject(&self.flock, key), Some(headers), self.instance.clone().into_bytes()).await?;
            claim_reply(&self.flock, key, &reply)
        };
        tokio::time::timeout(TIMEOUT, work).await.unwrap_or_else(|_| Err(format!("claiming {key} took over {TIMEOUT:?}")))
    }
}

/// What JetStream's answer to a claim's publish says: true when this process stored the claim,
/// false when another process had stored it first.
///
/// A win needs the stream's acknowledgement (`{"stream": ..., "seq": n}`): anything else that
/// is not an error (an empty object, a number, another stream's ack) counted as a win, and two
/// processes could then both run one firing.
pub fn claim_reply(flock: &str, key: &str, reply: &[u8]) -> Result<bool, String> {
    let reply: Json = serde_json::from_slice(reply).map_err(|e| format!("cannot claim {key}: unreadable answer: {e}"))?;
    if reply.get("error").is_some() {
        return match error_of(&reply) {
            Some((WRONG_LAST_SEQUENCE, _)) => Ok(false),
            Some((code, text)) => Err(format!("cannot claim {key}: {text} ({code})")),
            None => Err(format!("cannot claim {key}: an error without its details")),
        };
    }
    let expected = stream(flock);
    let acked = reply.get("stream").and_then(Json::as_str) == Some(expected.as_str()) && reply.get("seq").and_then(Json::as_u64).is_some_and(|n| n > 0);
    if acked {
        Ok(true)
    } else {
        let shown: String = reply.to_string().chars().take(200).collect();
        Err(format!("cannot claim {key}: the answer {shown} is not an acknowledgement from {expected}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_is_won_only_on_an_acknowledgement_from_the_stream() {
        let won = |reply: &str| claim_reply("f", "k", reply.as_bytes());
        assert_eq!(won(r#"{"stream":"PMNC_f_CLAIMS","seq":7}"#), Ok(true));
        assert_eq!(won(r#"{"stream":"PMNC_f_CLAIMS","seq":7,"duplicate":false}"#), Ok(true));
        assert_eq!(won(r#"{"error":{"code":400,"err_code":10071,"description":"wrong last sequence: 3"}}"#), Ok(false));
        let e = won(r#"{"error":{"code":503,"err_code":10008,"description":"JetStream system temporarily unavailable"}}"#).unwrap_err();
        assert!(e.contains("cannot claim k") && e.contains("10008"), "{e}");
        // Answers that are not an acknowledgement must not count as a win: two processes would
        // both run the firing.
        for reply in [
            "{}",
            "5",
            "null",
            "[]",
            r#"{"error":null}"#,
            r#"{"stream":"PMNC_other_CLAIMS","seq":1}"#,
            r#"{"stream":"PMNC_f_CLAIMS"}"#,
            r#"{"stream":"PMNC_f_CLAIMS","seq":0}"#,
        ] {
            let r = won(reply);
            assert!(r.is_err(), "{reply} gave {r:?}");
            assert!(r.unwrap_err().contains("cannot claim k"), "{reply}");
        }
        assert!(won("not json").unwrap_err().contains("unreadable"));
    }
}
