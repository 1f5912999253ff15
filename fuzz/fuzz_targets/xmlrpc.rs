//! XML-RPC method calls (what the xmlrpc interface reads) and method responses (what the
//! xmlrpc resource reads). Properties: bounded allocation; a DTD is always refused; a call or a
//! response that reads, written back, reads back the same (but for the documented one-member
//! typed tables and nil struct members); a fault has a code and a message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rustomnic_fuzz::bounded;
use rustomnic_resource_rpc::xmlrpc::{decode_call, decode_response, round_trip, Limits};

fuzz_target!(|data: &[u8]| {
    let limits = Limits::new(1 << 20, 10_000);
    let call = bounded("xmlrpc call", data.len(), || decode_call(data, limits));
    let reply = bounded("xmlrpc response", data.len(), || decode_response(data, limits));
    if data.windows(9).any(|w| w.eq_ignore_ascii_case(b"<!DOCTYPE")) {
        assert!(call.is_err() && reply.is_err(), "a DTD was read");
    }
    if let Err(e) = round_trip(data) {
        panic!("{e}");
    }
});
