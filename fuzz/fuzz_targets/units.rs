//! Fuzzes the small parsers of config values: durations, sizes and `${ENV}` expansion.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(d) = rustomnic_core::parse_duration(text) {
        assert!(d.as_secs_f64() <= 1e9);
    }
    let _ = rustomnic_core::parse_size(text);
    let _ = rustomnic_core::config::expand_env(text);
});
