//! A clustered queue's stream messages and the call records of its key-value bucket
//! (crates/queue/src/jetstream.rs), which any client that can publish on the flock's subjects
//! could have written. Properties: reading never asks for far more memory than the input; what
//! reads writes back and reads again as the same message or status.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rustomnic_fuzz::bounded;
use rustomnic_queue::jetstream::fuzzing::{message_roundtrip, record_roundtrip};

fuzz_target!(|data: &[u8]| {
    let message = bounded("queue message", data.len(), || message_roundtrip(data));
    assert_ne!(message, Some(false), "a message read from the stream does not write back as itself");
    let record = bounded("call record", data.len(), || record_roundtrip(data));
    assert_ne!(record, Some(false), "a call record read from the bucket does not write back as itself");
});
