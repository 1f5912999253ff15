//! Fuzzes what WebSocket clients send: frames (lengths, masks, opcodes, control-frame rules)
//! through the parser a session uses. Nothing may panic or read past a frame.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = rustomnic_http::fuzzing::fuzz_frames(data);
});
