//! `cage.toml` through the real readers: the cage's own keys, every interface and resource
//! protocol of the `pmnc` binary, `[cluster]`, `[monitor]` and `[queues]`, from the file's raw
//! bytes as `pmnc check` and `pmnc run` read them. Properties: a file that is not UTF-8 is
//! reported once, on the line of its first bad byte; every problem reported about a key is on
//! a line where that key (or a table it is in) is written; problems come in file order, each
//! once; reading is deterministic.
#![no_main]

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use rustomnic_cage::config::parse_cage;
use rustomnic_cage::{CageDir, Protocols};

fn protocols() -> &'static Protocols {
    static P: OnceLock<Protocols> = OnceLock::new();
    P.get_or_init(|| {
        let mut p = Protocols::new();
        p.add(Arc::new(rustomnic_http::HttpProtocol));
        p.add(Arc::new(rustomnic_schedule::ScheduleProtocol));
        p.add_resource(Arc::new(rustomnic_resource_postgresql::Postgresql));
        p.add_resource(Arc::new(rustomnic_resource_mysql::Mysql));
        p.add_resource(Arc::new(rustomnic_resource_redis::Redis));
        p.add_resource(Arc::new(rustomnic_resource_http::Http));
        p.add_resource(Arc::new(rustomnic_resource_smtp::Smtp));
        p.add_resource(Arc::new(rustomnic_resource_cmdexec::CmdexecProtocol));
        p.add_resource(Arc::new(rustomnic_resource_file::FileProtocol));
        p.add_resource(Arc::new(rustomnic_resource_state::StateProtocol));
        p
    })
}

fn bare(component: &str) -> bool {
    !component.is_empty()
        && component
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fuzz_target!(|data: &[u8]| {
    // A folder that does not exist: the readers check paths only as text.
    let dir = CageDir {
        folder_name: "fuzzed".into(),
        dir: PathBuf::from("/nonexistent/rustomnic-fuzz/fuzzed"),
        shared: None,
    };
    let errors = match parse_cage(&dir, data.to_vec(), protocols()) {
        Ok(_) => return,
        Err(errors) => errors,
    };
    assert!(!errors.is_empty(), "a failed read reports nothing");
    let again = parse_cage(&dir, data.to_vec(), protocols())
        .err()
        .unwrap_or_default();
    assert_eq!(again, errors, "two readings of the same bytes differ");
    let text = match std::str::from_utf8(data) {
        Ok(t) => t,
        Err(e) => {
            let line = data[..e.valid_up_to()]
                .iter()
                .filter(|b| **b == b'\n')
                .count()
                + 1;
            assert_eq!(errors.len(), 1, "{errors:?}");
            assert_eq!(errors[0].line, line, "{}", errors[0]);
            return;
        }
    };
    if data.len() > 1 << 20 {
        return;
    }
    let lines: Vec<&str> = text.split('\n').collect();
    for pair in errors.windows(2) {
        assert!(
            pair[0].line <= pair[1].line,
            "not in file order: {} / {}",
            pair[0],
            pair[1]
        );
        assert_ne!(pair[0], pair[1], "reported twice: {}", pair[0]);
    }
    for e in &errors {
        assert!(
            e.line >= 1 && e.line <= lines.len(),
            "{e}: line outside a {}-line file",
            lines.len()
        );
        if e.key.is_empty() || e.message.starts_with("the implicit state resource") {
            continue;
        }
        let components: Vec<&str> = e
            .key
            .split('.')
            .map(|c| c.split('[').next().unwrap_or(c))
            .collect();
        if !components.iter().all(|c| bare(c)) {
            continue;
        }
        let line = lines[e.line - 1];
        assert!(
            components.iter().any(|c| line.contains(c)),
            "{e}: line {} is {line:?}, which names none of {components:?}",
            e.line
        );
    }
});
