//! JSON-RPC 2.0 request bodies as the jsonrpc interface reads them (single requests and
//! batches), and response bodies as the jsonrpc resource reads them. Properties: bounded
//! allocation; every request read, written back as JSON, reads back as the same request; a
//! batch answers each element in place (a request or its refusal), never more than the limit;
//! a reply is a result or an error object, and a result reads back as itself once re-encoded.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rustomnic_fuzz::bounded;
use rustomnic_resource_rpc::jsonrpc::{decode_reply, decode_request, response, round_trip, Envelope};

fuzz_target!(|data: &[u8]| {
    let max_batch = 1 + (data.first().copied().unwrap_or(0) as usize % 8);
    let read = bounded("jsonrpc request", data.len(), || decode_request(data, max_batch));
    if let Ok(Envelope::Batch(calls)) = &read {
        assert!(!calls.is_empty() && calls.len() <= max_batch, "a batch of {} with max_batch {max_batch}", calls.len());
    }
    if let Err(e) = round_trip(data) {
        panic!("{e}");
    }
    if let Ok(Ok(v)) = bounded("jsonrpc reply", data.len(), || decode_reply(data, 1)) {
        // The server's side written, the client's side read: the same result.
        let text = response(&rustomnic_core::Value::Int(1), Ok(&v)).to_string();
        match decode_reply(text.as_bytes(), 1) {
            Ok(Ok(again)) => assert_eq!(again, v, "{text}"),
            Ok(Err(e)) if e.code == -32603 => {} // not writable as JSON (a lone surrogate's bytes)
            other => panic!("{text} read back as {other:?}"),
        }
    }
});
