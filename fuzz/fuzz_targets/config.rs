//! Fuzzes config files through the section reader: every key is read as every type, and every
//! problem must come back as an error with a line inside the file.
#![no_main]

use std::path::Path;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use rustomnic_core::{Section, SourceFile};

fn read_all(section: &Section, depth: usize) {
    if depth > 8 {
        return;
    }
    for (_, sub) in section.tables() {
        for key in ["name", "listen", "handler", "protocol"] {
            let _ = sub.string(key);
        }
        let _ = sub.duration("request_timeout", Duration::from_secs(3600));
        let _ = sub.size("max_body_size", 1 << 30);
        let _ = sub.integer("max_connections", 1, 1000);
        let _ = sub.bool("http2");
        read_all(&sub, depth + 1);
        sub.finish();
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let lines = text.lines().count().max(1);
    match SourceFile::parse(Path::new("cage.toml"), text.to_string()) {
        Ok(file) => {
            let root = file.root();
            let _ = root.string("name");
            let _ = root.duration("request_timeout", Duration::from_secs(3600));
            read_all(&root, 0);
            root.finish();
            for e in file.take_errors() {
                assert!(e.line >= 1 && e.line <= lines + 1, "line {} outside a {lines}-line file", e.line);
                assert!(!e.to_string().is_empty());
            }
        }
        Err(e) => assert!(e.line >= 1 && e.line <= lines + 1, "line {} outside a {lines}-line file", e.line),
    }
});
