//! Resources through the real binary: the implicit state resource survives a restart, a
//! PostgreSQL resource configured in cage.toml, pool exhaustion bounded by the deadline, and
//! resource config refused by `pmnc check`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::*;

fn postgres_url() -> String {
    std::env::var("PMNC_TEST_POSTGRES_URL").unwrap_or_else(|_| "postgresql://postgres@127.0.0.1:5432/test".into())
}

/// Whether PostgreSQL answers; says loudly how to start it when it does not.
fn postgres_up() -> bool {
    let url = postgres_url();
    let hostport = url.split('@').nth(1).and_then(|r| r.split('/').next()).unwrap_or("127.0.0.1:5432").to_string();
    let up = hostport.parse().ok().and_then(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_secs(2)).ok()).is_some();
    if !up {
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: PostgreSQL is not reachable at {hostport} (PMNC_TEST_POSTGRES_URL); start it with: pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"
        );
    }
    up
}

#[test]
fn state_survives_a_restart() {
    let t = Tree::new();
    t.write("web/cage.toml", &http_cage_toml(""));
    t.write(
        "web/http.lua",
        "return { handle = function() local n = (pmnc.state.get('visits') or 0) + 1 pmnc.state.set('visits', n) return tostring(n) end }\n",
    );
    let web = t.path().join("web");
    {
        let mut s = Server::start(&web, &[]);
        assert_eq!(get(s.addr("http"), "/").text(), "1");
        assert_eq!(get(s.addr("http"), "/").text(), "2");
        assert_eq!(s.terminate(Duration::from_secs(10)), Some(0));
    }
    assert!(web.join(".data/state.sqlite").is_file(), "the state file lives in the cage folder");
    let s = Server::start(&web, &[]);
    assert_eq!(get(s.addr("http"), "/").text(), "3");
}

#[test]
fn a_postgresql_resource_serves_a_handler() {
    if !postgres_up() {
        return;
    }
    let t = Tree::new();
    t.write("web/cage.toml", &format!("{}\n[resources.db]\nprotocol = \"postgresql\"\nurl = \"{}\"\npool_size = 2\n", http_cage_toml(""), postgres_url()));
    t.write(
        "web/http.lua",
        r#"return { handle = function(request)
             local r = pmnc.transaction.db.execute("select $1::int * 2 as doubled, 'x' || $2 as text", tonumber(request.query.n), request.query.s)
             return r.rows[1]
           end }
"#,
    );
    let s = Server::start(&t.path().join("web"), &[]);
    let r = get(s.addr("http"), "/?n=21&s=yz");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(json_body(&r), serde_json::json!({"doubled": 42, "text": "xyz"}));
}

#[test]
fn an_exhausted_pool_waits_no_longer_than_the_deadline() {
    if !postgres_up() {
        return;
    }
    let t = Tree::new();
    // One worker, one connection: a request that must wait for it longer than its deadline
    // (300 ms, interface "fast") is ended at that deadline, not left hanging.
    t.write(
        "web/cage.toml",
        &format!(
            "{}request_timeout = \"5s\"\n\n[interfaces.fast]\nprotocol = \"http\"\nhandler = \"http.handle\"\nlisten = \"127.0.0.1:0\"\nrequest_timeout = \"300ms\"\n\n[resources.db]\nprotocol = \"postgresql\"\nurl = \"{}\"\npool_size = 1\n",
            http_cage_toml(""),
            postgres_url()
        ),
    );
    t.write(
        "web/http.lua",
        r#"return { handle = function(request)
             if request.path == "/slow" then pmnc.transaction.db.execute("select pg_sleep(2) -- " .. request.query.tag) return "slow done" end
             local ok, e = pcall(pmnc.transaction.db.execute, "select 1")
             return ok and "fast done" or tostring(e)
           end }
"#,
    );
    let s = Server::start_with_workers(&t.path().join("web"), 1, &[]);
    let addr = s.addr("http");
    // The tag finds this test's query among those of other runs on the same server.
    let tag = format!("pmnc-test-{}-{}", std::process::id(), std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    let path = format!("/slow?tag={tag}");
    let slow = std::thread::spawn(move || get(addr, &path));
    wait_for_slow_query(&tag);
    let started = Instant::now();
    let r = get(s.addr("fast"), "/fast");
    let took = started.elapsed();
    let slow = slow.join().unwrap();
    assert_eq!(slow.text(), "slow done");
    assert!(took < Duration::from_millis(1500), "the waiting request took {took:?} (its deadline is 300 ms)");
    assert!(r.status == 504 || r.text().contains("no connection became free"), "{} {}", r.status, r.text());
}

/// Waits until the slow request holds the pool's connection (its query, found by `tag`, shows
/// in pg_stat_activity).
fn wait_for_slow_query(tag: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    // The pattern anchors the tag at the end of the query, so this query does not match itself.
    let sql = format!("select count(*) from pg_stat_activity where query like '%{tag}' and state = 'active'");
    while Instant::now() < deadline {
        let out = std::process::Command::new("psql").args([&postgres_url(), "-Atc", &sql]).output();
        match out {
            Ok(o) if String::from_utf8_lossy(&o.stdout).trim() == "1" => return,
            Ok(_) => std::thread::sleep(Duration::from_millis(20)),
            Err(_) => return,
        }
    }
}

#[test]
fn bad_resource_config_is_refused_with_file_line_and_key() {
    let t = Tree::new();
    t.write(
        "web/cage.toml",
        "[resources.db]\nprotocol = \"postgres\"\n\n[resources.cache]\nprotocol = \"redis\"\n\n[resources.q]\nprotocol = \"postgresql\"\nurl = \"postgresql://u@h/d\"\npool_size = 0\nbogus = 1\n",
    );
    let cage = t.path().join("web");
    let out = pmnc(&["check", &cage.display().to_string()]);
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    let toml = cage.join("cage.toml").canonicalize().unwrap().display().to_string();
    for want in [
        format!("{toml}:2: resources.db.protocol: unknown resource protocol \"postgres\""),
        format!("{toml}:4: resources.cache: "),
        format!("{toml}:10: resources.q.pool_size: 0 is out of range"),
        format!("{toml}:11: resources.q.bogus: unknown key"),
    ] {
        assert!(out.stderr.contains(&want), "missing {want:?} in:\n{}", out.stderr);
    }
}

#[test]
fn a_cage_starts_and_serves_while_a_resource_server_is_down() {
    let t = Tree::new();
    // Nothing listens on port 1: the database is "down" for the whole test.
    t.write(
        "web/cage.toml",
        &format!("{}\n[resources.db]\nprotocol = \"postgresql\"\nurl = \"postgresql://postgres@127.0.0.1:1/test\"\nmin_idle = 1\n", http_cage_toml("")),
    );
    t.write(
        "web/http.lua",
        r#"return { handle = function(request)
             if request.path == "/db" then
               local ok, e = pcall(pmnc.transaction.db.execute, "select 1")
               return { ok = ok, error = tostring(e) }
             end
             return "still serving"
           end }
"#,
    );
    let s = Server::start(&t.path().join("web"), &[]);
    assert_eq!(get(s.addr("http"), "/").text(), "still serving");
    let started = Instant::now();
    let r = json_body(&get(s.addr("http"), "/db"));
    assert_eq!(r["ok"], serde_json::json!(false));
    let e = r["error"].as_str().unwrap_or_default().to_string();
    assert!(e.starts_with("resource db (participant 1): cannot connect: ") || e.contains("unavailable after"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(3), "the failure took {:?}", started.elapsed());
    assert_eq!(get(s.addr("http"), "/").text(), "still serving");
}
