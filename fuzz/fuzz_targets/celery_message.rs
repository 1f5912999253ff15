//! Celery task messages as a Redis queue holds them (kombu's envelope, the body in base64):
//! whatever the bytes, reading the envelope and the task ends with a task or a refusal, never a
//! panic; and a message put aside as taken (`unacked`) and restored reads as the same task.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rustomnic_celery::{envelope, restored, task, unacked_entry, Refusal};

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
});
