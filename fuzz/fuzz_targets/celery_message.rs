//! Celery task messages as a Redis queue holds them (kombu's envelope, the body in base64):
//! whatever the bytes, reading the envelope and the task ends with a task or a refusal, never a
//! panic; a message put aside as taken (`unacked`) and restored reads as the same task; and the
//! same message carried the AMQP way (headers as a field table, the body as it is) reads as the
//! same task too.
#![no_main]

use libfuzzer_sys::fuzz_target;
use base64::Engine;
use rustomnic_celery::{envelope, headers_table, restored, table_json, task, unacked_entry, Message, Refusal};

fn outcome(payload: &[u8]) -> Option<Result<rustomnic_celery::Task, bool>> {
    let env = envelope(payload, "celery").ok()?;
    Some(task(&env, 1 << 16, |name| name.starts_with("tasks.")).map_err(|r| matches!(r, Refusal::Others(_))))
}

fuzz_target!(|data: &[u8]| {
    let Some(first) = outcome(data) else { return };
    let env = envelope(data, "celery").expect("read above");
    let entry = unacked_entry(&env);
    let (_, again) = restored(entry.as_bytes()).unwrap_or_else(|| panic!("an unacked entry that cannot be restored: {entry}"));
    let second = outcome(again.as_bytes()).expect("a restored envelope reads");
    // NaN cannot equal itself: compare the text of what was read.
    assert_eq!(format!("{first:?}"), format!("{second:?}"), "restored: {again}");
    // Over AMQP: the headers through a field table and back, the body decoded from base64.
    let Some(headers) = env.json.get("headers").and_then(|h| h.as_object()) else { return };
    let Ok(table) = headers_table(headers) else { return };
    let back = table_json(&table, 0).expect("a field table made from JSON reads back");
    let body = env.json.get("body").and_then(|b| b.as_str()).unwrap_or("");
    let base64 = env.json.get("properties").and_then(|p| p.get("body_encoding")).and_then(|e| e.as_str()) == Some("base64");
    let bytes = if base64 {
        match base64::engine::general_purpose::STANDARD.decode(body) {
            Ok(b) => b,
            Err(_) => return,
        }
    } else {
        body.as_bytes().to_vec()
    };
    let text = |k: &str| env.json.get("properties").and_then(|p| p.get(k)).and_then(|v| v.as_str()).unwrap_or("").to_string();
    let content_type = env.json.get("content-type").and_then(|c| c.as_str()).unwrap_or("").to_string();
    let (reply_to, correlation_id) = (text("reply_to"), text("correlation_id"));
    let msg = Message { content_type: &content_type, headers: &back, body: &bytes, reply_to: &reply_to, correlation_id: &correlation_id };
    let third = msg.task(1 << 16, |name| name.starts_with("tasks.")).map_err(|r| matches!(r, Refusal::Others(_)));
    assert_eq!(format!("{first:?}"), format!("{third:?}"), "over AMQP: {data:?}");
});
