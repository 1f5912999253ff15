//! The service manager's notify protocol through the real binary: a unix datagram socket opened
//! by the test stands in for systemd's `NOTIFY_SOCKET`.

mod common;

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use common::*;

/// The next notification, within `within`.
fn next(socket: &UnixDatagram, within: Duration) -> Option<String> {
    socket.set_read_timeout(Some(within)).ok()?;
    let mut buf = vec![0u8; 4096];
    let n = socket.recv(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

#[test]
fn ready_comes_once_the_port_serves_and_stopping_at_sigterm() {
    let t = Tree::new();
    // The cage may read both variables: one set beside NOTIFY_SOCKET shows the reading works.
    t.write("web/cage.toml", &http_cage_toml("\n[lua]\ngetenv = [\"NOTIFY_SOCKET\", \"NOTIFY_TEST_SEEN\"]\n"));
    // What the cages (and the processes they start) see must not hold the socket: they could
    // speak for the process.
    t.write(
        "web/http.lua",
        "return { handle = function(request) return tostring(os.getenv('NOTIFY_SOCKET')) .. '|' .. tostring(os.getenv('NOTIFY_TEST_SEEN')) end }\n",
    );
    let path = t.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    let started = Instant::now();
    let mut s = Server::try_start_env(&t.path().join("web"), 1, &[], &[("NOTIFY_SOCKET", path.to_str().unwrap()), ("NOTIFY_TEST_SEEN", "yes")]).unwrap();
    let ready = next(&socket, Duration::from_secs(30)).unwrap_or_else(|| panic!("no notification within 30 s of the start:\n{}", s.log.join("\n")));
    assert!(ready.lines().any(|l| l == "READY=1"), "the first notification says READY=1: {ready:?}");
    assert!(ready.lines().any(|l| l.starts_with("STATUS=running 1 cage (web)")), "with a status line: {ready:?}");
    // Ready means serving: the port answers at once, no retry needed.
    let r = get(s.addr("http"), "/");
    assert_eq!(r.status, 200, "the port serves once READY=1 is sent");
    assert_eq!(r.text(), "nil|yes", "NOTIFY_SOCKET is taken out of the environment the cages see");
    assert!(started.elapsed() < Duration::from_secs(30));

    s.signal(libc::SIGTERM);
    let stopping = next(&socket, Duration::from_secs(10)).unwrap_or_else(|| panic!("no notification after SIGTERM:\n{}", s.log.join("\n")));
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "SIGTERM is said as STOPPING=1: {stopping:?}");
    assert!(stopping.lines().any(|l| l.starts_with("STATUS=stopping")), "{stopping:?}");
    assert_eq!(s.wait_exit(Duration::from_secs(20)).and_then(|e| e.code()), Some(0));
}

#[test]
fn a_notify_socket_that_is_no_address_is_said_and_the_process_serves() {
    let t = Tree::new();
    t.write("web/cage.toml", &http_cage_toml(""));
    t.write("web/http.lua", "return { handle = function() return 'ok' end }\n");
    let s = Server::try_start_env(&t.path().join("web"), 1, &[], &[("NOTIFY_SOCKET", "relative/notify.sock")]).unwrap();
    assert!(
        s.log.iter().any(|l| l.contains("NOTIFY_SOCKET=\"relative/notify.sock\" is neither a path nor an abstract socket")),
        "a NOTIFY_SOCKET that is no socket address is said at the start:\n{}",
        s.log.join("\n")
    );
    assert_eq!(get(s.addr("http"), "/").status, 200, "and the process serves anyway");
}
