//! The small parsers of config values: durations, sizes and `${ENV}` expansion. Properties: a
//! duration read is within the limit and reads back the same (to the millisecond) from the way
//! config writes it; a size reads back from its number; text without `$` expands to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rustomnic_core::{format_duration, parse_duration, parse_size};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(d) = parse_duration(text) {
        assert!(d.as_secs_f64() <= 1e9);
        let shown = format_duration(d);
        let back = parse_duration(&shown)
            .unwrap_or_else(|e| panic!("{shown:?} (from {text:?}) does not read back: {e}"));
        assert_eq!(back.as_millis(), d.as_millis(), "{text:?} -> {shown:?}");
    }
    if let Ok(n) = parse_size(text) {
        assert_eq!(parse_size(&n.to_string()), Ok(n));
    }
    match rustomnic_core::config::expand_env(text) {
        Ok(out) if !text.contains('$') => assert_eq!(out, text),
        Ok(_) => {}
        Err(e) => assert!(text.contains("${") && !e.is_empty(), "{text:?}: {e}"),
    }
});
