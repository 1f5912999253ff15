//! Interfaces changed in a running process: a changed `[interfaces.X]` table restarts that
//! interface alone (a new address, new limits), the others keep serving meanwhile, and a broken
//! table changes nothing.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;

const HTTP: &str = "local M = {} function M.handle(r) return pmnc.request.interface .. ' ' .. #r.body end return M";

fn toml(a_port: u16, a_extra: &str, b_port: u16) -> String {
    format!(
        "[interfaces.a]\nprotocol = \"http\"\nhandler = \"http.handle\"\nlisten = \"127.0.0.1:{a_port}\"\n{a_extra}\n\n\
         [interfaces.b]\nprotocol = \"http\"\nhandler = \"http.handle\"\nlisten = \"127.0.0.1:{b_port}\"\n"
    )
}

#[test]
fn a_changed_interface_moves_without_a_restart_while_the_others_serve() {
    let (a1, a2, b) = (spare_port(), spare_port(), spare_port());
    let t = Tree::new();
    t.write("c/cage.toml", &toml(a1, "", b));
    t.write("c/http.lua", HTTP);
    let mut s = Server::start(&t.path().join("c"), &[]);
    let (old_a, addr_b) = (format!("127.0.0.1:{a1}").parse().unwrap(), format!("127.0.0.1:{b}").parse().unwrap());
    assert_eq!(get(old_a, "/").text(), "a 0");

    // b is called throughout the change.
    let stop = Arc::new(AtomicBool::new(false));
    let calls = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut answers = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let r = raw_request(addr_b, b"GET / HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n", Duration::from_secs(10));
                answers.push(r.map(|r| r.text()).unwrap_or_else(|e| format!("error: {e}")));
            }
            answers
        })
    };

    // A new address.
    t.write_rename("c/cage.toml", &toml(a2, "", b));
    assert!(s.wait_for_all(&["interface=a", "started again with the new table"], Duration::from_secs(10)).is_some(), "a was not restarted");
    let new_a = format!("127.0.0.1:{a2}").parse().unwrap();
    assert_eq!(get(new_a, "/").text(), "a 0");
    assert!(raw_request(old_a, b"GET / HTTP/1.1\r\nhost: t\r\n\r\n", Duration::from_secs(2)).is_err(), "the old address still answers");

    // New limits on the same address.
    t.write_rename("c/cage.toml", &toml(a2, "max_body_size = \"4\"", b));
    let r = get_until_status(new_a, 413, Duration::from_secs(10));
    assert_eq!(r.status, 413);

    // A broken table changes nothing and says where.
    t.write_rename("c/cage.toml", &toml(a2, "max_body_size = \"lots\"", b));
    assert!(
        s.wait_for_all(&["cage.toml:5", "max_body_size", "keeping the running config"], Duration::from_secs(10)).is_some(),
        "the broken table was not reported"
    );
    assert_eq!(post(new_a, "/", "text/plain", b"12345").status, 413, "the running interface was replaced by a broken one");

    stop.store(true, Ordering::Relaxed);
    let answers = calls.join().unwrap();
    assert!(answers.len() > 10, "b answered only {} times", answers.len());
    assert!(answers.iter().all(|a| a == "b 0"), "b failed while a changed: {:?}", answers.iter().find(|a| *a != "b 0"));
}

/// POSTs five bytes until the status is `want` (while the interface restarts on the same
/// address, a connection may be refused for a moment).
fn get_until_status(addr: std::net::SocketAddr, want: u16, timeout: Duration) -> Response {
    let end = std::time::Instant::now() + timeout;
    let request = b"POST / HTTP/1.1\r\nhost: t\r\nconnection: close\r\ncontent-length: 5\r\n\r\n12345";
    loop {
        match raw_request(addr, request, Duration::from_secs(5)) {
            Ok(r) if r.status == want => return r,
            Ok(r) if std::time::Instant::now() > end => return r,
            Err(e) if std::time::Instant::now() > end => panic!("POST: {e}"),
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}
