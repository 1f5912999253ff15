//! Fuzzes what HTTP/1 clients send: request heads (the framing rules included) and chunked
//! bodies, through the same parser and decoder a connection uses. Nothing may panic, and a
//! decoded body never exceeds its limit.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = rustomnic_http::fuzzing::fuzz_request(data);
});
