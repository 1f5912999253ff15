//! TLS to PostgreSQL: a throw-away cluster with ssl on (initdb and postgres of the machine's
//! PostgreSQL, certificates from a test CA made with rcgen) is connected to with each sslmode;
//! a certificate for another host or from another CA is refused with the reason; disable still
//! works against the machine's own server; bad TLS config is reported with file, line and key.
//! Without PostgreSQL's binaries the server tests say so loudly and pass.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use rustomnic_core::Value;
use rustomnic_resource::testing::{configure, configure_in, run_lua};
use rustomnic_resource::testing_tls::{free_port, is_root, shout, system_user, ServerGuard, TestPki};
use rustomnic_resource::ResourceConfig;
use rustomnic_resource_postgresql::Postgresql;

const MODULE: &str = r#"
local M = {}

function M.try(sql)
  local ok, r = pcall(pmnc.transaction.db.execute, sql)
  if ok then return true, r end
  return false, tostring(r)
end

-- Two participants in one transaction, then what they wrote.
function M.write_two(table_name)
  local xa = pmnc.transaction.create()
  xa.db.execute("insert into " .. table_name .. " values (1)")
  xa.db.execute("insert into " .. table_name .. " values (2)")
  xa.execute()
  return pmnc.transaction.db.execute("select sum(n) as total from " .. table_name)
end

return M
"#;

/// Whether this connection runs over TLS, as the server sees it.
const SSL_IN_USE: &str = "select ssl from pg_stat_ssl where pid = pg_backend_pid()";

fn toml_string(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

fn db(url: &str, extra: &str) -> ResourceConfig {
    match configure(&Postgresql, "db", &format!("url = {}\nconnect_timeout = \"10s\"\n{extra}", toml_string(url))) {
        Ok(c) => c,
        Err(e) => panic!("config refused: {e:?}"),
    }
}

fn run(config: ResourceConfig, function: &str, arg: &str) -> Vec<Value> {
    match run_lua(vec![config], MODULE, function, vec![Value::str(arg)], Duration::from_secs(20)) {
        Ok(v) => v,
        Err(e) => panic!("{function}({arg}): {e}"),
    }
}

/// The error text of a call that must fail.
fn refused(config: ResourceConfig) -> String {
    let r = run(config, "try", "select 1");
    assert_eq!(r.first(), Some(&Value::Bool(false)), "expected a refusal: {r:?}");
    r.get(1).and_then(|v| v.as_str()).unwrap_or_default().to_string()
}

/// The first row of an execute result.
fn first_row(result: &Value) -> Option<&Value> {
    match result.get("rows") {
        Some(Value::Array(rows)) => rows.first(),
        _ => None,
    }
}

/// The `ssl` column of pg_stat_ssl for a connection made with `config`.
fn ssl_in_use(config: ResourceConfig) -> Value {
    let r = run(config, "try", SSL_IN_USE);
    assert_eq!(r.first(), Some(&Value::Bool(true)), "the query failed: {r:?}");
    match r.get(1).and_then(|v| v.get("rows")) {
        Some(Value::Array(rows)) if rows.len() == 1 => rows[0].get("ssl").cloned().unwrap_or(Value::Nil),
        other => panic!("unexpected result: {other:?}"),
    }
}

/// A PostgreSQL cluster of its own with ssl on, stopped and removed when dropped.
struct TlsCluster {
    port: u16,
    pki: TestPki,
    /// Its postgresql.conf, where the ssl settings are (so that a reload can change them).
    conf: PathBuf,
    _server: ServerGuard,
}

/// The bin folder of the newest PostgreSQL installed.
fn pg_bin() -> Option<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, bin): &(u32, PathBuf)| bin.join("initdb").is_file() && bin.join("postgres").is_file())
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin)
}

fn start_cluster() -> Result<TlsCluster, String> {
    let bin = pg_bin().ok_or("no initdb and postgres under /usr/lib/postgresql/*/bin (apt-get install postgresql)")?;
    // initdb and postgres refuse to run as root.
    let owner = if is_root() { Some(system_user("postgres").ok_or("running as root and there is no postgres user to run the server as")?) } else { None };
    let pki = TestPki::new("pg", &["localhost"])?;
    let dir = std::env::temp_dir().join(format!("rustomnic-pg-tls-server-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let cert = dir.join("server.pem");
    let key = dir.join("server.key");
    for (from, to) in [(&pki.cert, &cert), (&pki.key, &key)] {
        std::fs::copy(from, to).map_err(|e| format!("cannot copy {}: {e}", from.display()))?;
    }
    // PostgreSQL refuses a key that others can read.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).map_err(|e| e.to_string())?;
    if let Some((uid, gid)) = owner {
        for path in [&dir, &cert, &key] {
            std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(|e| format!("cannot chown {}: {e}", path.display()))?;
        }
    }
    let data = dir.join("data");
    let as_owner = |command: &mut Command| {
        if let Some((uid, gid)) = owner {
            use std::os::unix::process::CommandExt;
            command.uid(uid).gid(gid);
        }
    };
    let mut initdb = Command::new(bin.join("initdb"));
    initdb.args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync", "-D"]).arg(&data).stdout(Stdio::null()).stderr(Stdio::piped());
    as_owner(&mut initdb);
    let out = initdb.output().map_err(|e| format!("cannot run initdb: {e}"))?;
    if !out.status.success() {
        return Err(format!("initdb failed: {}", String::from_utf8_lossy(&out.stderr)));
    }
    // In the file rather than on the command line, which a reload could not override.
    let conf = data.join("postgresql.conf");
    let ssl = format!("\nssl = on\nssl_cert_file = '{}'\nssl_key_file = '{}'\n", cert.display(), key.display());
    append(&conf, &ssl)?;
    let port = free_port()?;
    let log = dir.join("server.log");
    let log_file = std::fs::File::create(&log).map_err(|e| e.to_string())?;
    let log_err = log_file.try_clone().map_err(|e| e.to_string())?;
    let mut postgres = Command::new(bin.join("postgres"));
    postgres
        .arg("-D")
        .arg(&data)
        .args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
        .arg("-c")
        .arg(format!("unix_socket_directories={}", dir.display()))
        .stdin(Stdio::null())
        .stdout(log_file)
        .stderr(log_err);
    as_owner(&mut postgres);
    let child = postgres.spawn().map_err(|e| format!("cannot start postgres: {e}"))?;
    // QUIT: immediate shutdown, the backends go with the postmaster.
    let mut server = ServerGuard::new("the test's postgres", child, "QUIT", dir, log);
    server.wait_log("ready to accept connections", Duration::from_secs(60))?;
    Ok(TlsCluster { port, pki, conf, _server: server })
}

fn append(path: &Path, text: &str) -> Result<(), String> {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new().append(true).open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    file.write_all(text.as_bytes()).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn ca_line(path: &Path) -> String {
    format!("ca = {}\n", toml_string(&path.display().to_string()))
}

/// One cluster for every case, so that initdb runs once per test run.
#[test]
fn tls_against_a_throwaway_server() {
    let cluster = match start_cluster() {
        Ok(c) => c,
        Err(why) => {
            shout(&format!("!!! No PostgreSQL with TLS could be started for the test: {why}\n!!! The postgresql TLS server tests are SKIPPED."));
            return;
        }
    };
    let port = cluster.port;
    let ca = ca_line(&cluster.pki.ca);

    // verify-full by the name the certificate holds: TLS, and a real transaction through it.
    let full = |host: &str| db(&format!("postgresql://postgres:s3cret-pw@{host}:{port}/postgres"), &format!("sslmode = \"verify-full\"\n{ca}"));
    assert_eq!(ssl_in_use(full("localhost")), Value::Bool(true));
    let r = run(full("localhost"), "try", "create table tls_check (n int)");
    assert_eq!(r.first(), Some(&Value::Bool(true)), "{r:?}");
    let r = run(full("localhost"), "write_two", "tls_check");
    let total = r.first().and_then(first_row).and_then(|row| row.get("total")).cloned();
    assert_eq!(total, Some(Value::Int(3)), "{r:?}");

    // The same server by an address its certificate does not name: refused, with the reason,
    // and without the password of the url.
    let e = refused(full("127.0.0.1"));
    assert!(
        e.starts_with("resource db (participant 1): cannot connect: TLS: the server's certificate is not valid for 127.0.0.1 (it is for localhost)"),
        "{e}"
    );
    assert!(!e.contains("s3cret-pw"), "the password leaked: {e}");

    // The sslmode may come with the url, as libpq takes it.
    let in_url = db(&format!("postgresql://postgres@127.0.0.1:{port}/postgres?sslmode=verify-full"), &ca);
    assert!(refused(in_url).contains("TLS: the server's certificate is not valid for 127.0.0.1"));

    // verify-ca checks the chain only, so the address is fine.
    let by_chain = db(&format!("postgresql://postgres@127.0.0.1:{port}/postgres"), &format!("sslmode = \"verify-ca\"\n{ca}"));
    assert_eq!(ssl_in_use(by_chain), Value::Bool(true));

    // A certificate from a CA other than the one of `ca`: refused by verify-ca and verify-full.
    let other_ca = ca_line(&cluster.pki.other_ca);
    for mode in ["verify-ca", "verify-full"] {
        let e = refused(db(&format!("postgresql://postgres@localhost:{port}/postgres"), &format!("sslmode = \"{mode}\"\n{other_ca}")));
        let expected = format!("cannot connect: TLS: the server's certificate is not signed by the CA of ca = {}", cluster.pki.other_ca.display());
        assert!(e.contains(&expected), "{mode}: {e}");
    }
    // Without `ca`, the public CAs: the test CA is not one of them.
    let e = refused(db(&format!("postgresql://postgres@localhost:{port}/postgres"), "sslmode = \"verify-full\"\n"));
    assert!(e.contains("TLS: the server's certificate is not signed by a public CA"), "{e}");

    // require and prefer encrypt and check nothing.
    for mode in ["require", "prefer"] {
        assert_eq!(
            ssl_in_use(db(&format!("postgresql://postgres@127.0.0.1:{port}/postgres"), &format!("sslmode = \"{mode}\"\n"))),
            Value::Bool(true),
            "{mode}"
        );
    }
    // disable stays plain even where the server offers TLS.
    assert_eq!(ssl_in_use(db(&format!("postgresql://postgres@127.0.0.1:{port}/postgres"), "sslmode = \"disable\"\n")), Value::Bool(false));

    // With ssl switched off on the server (a reload is enough): prefer falls back to plain,
    // require is refused with the reason.
    let plain = |mode: &str| db(&format!("postgresql://postgres@127.0.0.1:{port}/postgres"), &format!("sslmode = \"{mode}\"\n"));
    append(&cluster.conf, "ssl = off\n").unwrap_or_else(|e| panic!("{e}"));
    let r = run(plain("disable"), "try", "select pg_reload_conf()");
    assert_eq!(r.first(), Some(&Value::Bool(true)), "{r:?}");
    // The reload is signalled, not awaited: poll new connections until they see it.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let r = run(plain("disable"), "try", "show ssl");
        let value = r.get(1).and_then(first_row).and_then(|row| row.get("ssl")).cloned();
        if value == Some(Value::str("off")) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "ssl is still on after the reload: {r:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(ssl_in_use(plain("prefer")), Value::Bool(false));
    let e = refused(plain("require"));
    assert!(
        e.starts_with("resource db (participant 1): cannot connect: TLS: the server does not accept TLS connections (ssl is off on the server), and sslmode \"require\" requires TLS"),
        "{e}"
    );
}

fn machine_url() -> String {
    std::env::var("PMNC_TEST_POSTGRES_URL").unwrap_or_else(|_| "postgresql://postgres@127.0.0.1:5432/test".to_string())
}

#[test]
fn disable_works_against_the_machines_server() {
    let r = run(db(&machine_url(), "sslmode = \"disable\"\n"), "try", SSL_IN_USE);
    if r.first() != Some(&Value::Bool(true)) {
        let why = r.get(1).and_then(|v| v.as_str()).unwrap_or("no answer");
        shout(&format!(
            "!!! PostgreSQL is not reachable at PMNC_TEST_POSTGRES_URL or its default ({why}).\n!!! disable_works_against_the_machines_server is SKIPPED. Start the server with:\n!!!   pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"
        ));
        return;
    }
    let ssl = r.get(1).and_then(first_row).and_then(|row| row.get("ssl")).cloned();
    assert_eq!(ssl, Some(Value::Bool(false)), "{r:?}");
}

fn config_errors(toml: &str) -> Vec<String> {
    match configure(&Postgresql, "db", toml) {
        Ok(_) => panic!("accepted: {toml}"),
        Err(e) => e,
    }
}

#[test]
fn bad_tls_config_is_refused_with_file_line_and_key() {
    let url = "url = \"postgresql://u@h/db\"\n";
    let e = config_errors(&format!("{url}sslmode = \"verify_full\"\n"));
    assert_eq!(
        e,
        vec!["cage.toml:3: resources.db.sslmode: \"verify_full\" is not an sslmode; use one of \"disable\", \"prefer\", \"require\", \"verify-ca\", \"verify-full\"".to_string()]
    );
    // A key=value connection string is read the same way.
    let e = config_errors("url = \"host=h user=u sslmode=verify-ca\"\nsslmode = \"verify-full\"\n");
    assert_eq!(e, vec!["cage.toml:3: resources.db.sslmode: is \"verify-full\" but the url says sslmode=verify-ca; give it once".to_string()]);
    assert!(configure(&Postgresql, "db", "url = \"host=h user=u sslmode=verify-full\"\n").is_ok());
    let e = config_errors("url = \"postgresql://u@h/db?sslmode=sometimes\"\n");
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(e[0].starts_with("cage.toml:2: resources.db.url: sslmode in the url: \"sometimes\" is not an sslmode"), "{e:?}");
    let e = config_errors(&format!("{url}sslmode = \"verify-full\"\nca = \"/surely/missing/ca.pem\"\n"));
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(e[0].starts_with("cage.toml:4: resources.db.ca: cannot read /surely/missing/ca.pem: "), "{e:?}");
    let e = config_errors("url = \"postgresql://u@h/db?sslmode=require\"\nsslmode = \"verify-full\"\n");
    assert_eq!(e, vec!["cage.toml:3: resources.db.sslmode: is \"verify-full\" but the url says sslmode=require; give it once".to_string()]);
    let e = config_errors("url = \"postgresql://u@h/db?sslmode=verify-full&sslrootcert=/x.pem\"\n");
    assert_eq!(e, vec!["cage.toml:2: resources.db.url: the url parameter sslrootcert is not read here: give the CA file as the key ca = \"...\" (relative to the cage folder)".to_string()]);

    let dir = std::env::temp_dir().join(format!("rustomnic-pg-tls-config-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("certs")).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(dir.join("certs/not-pem.pem"), "this is not PEM\n").unwrap_or_else(|e| panic!("{e}"));
    let Ok(pki) = TestPki::new("pg-config", &["localhost"]) else { panic!("no test certificates") };
    std::fs::copy(&pki.ca, dir.join("certs/ca.pem")).unwrap_or_else(|e| panic!("{e}"));
    // Relative to the cage folder, not to the working directory.
    let e = match configure_in(&dir, &Postgresql, "db", &format!("{url}sslmode = \"verify-ca\"\nca = \"certs/not-pem.pem\"\n")) {
        Ok(_) => panic!("a CA file without certificates was accepted"),
        Err(e) => e,
    };
    let expected = format!("{}:4: resources.db.ca: {} holds no certificate", dir.join("cage.toml").display(), dir.join("certs/not-pem.pem").display());
    assert!(e.len() == 1 && e[0].starts_with(&expected), "{e:?}");
    assert!(configure_in(&dir, &Postgresql, "db", &format!("{url}sslmode = \"verify-full\"\nca = \"certs/ca.pem\"\n")).is_ok());
    // A CA with a mode that would not check against it.
    let e = match configure_in(&dir, &Postgresql, "db", &format!("{url}sslmode = \"require\"\nca = \"certs/ca.pem\"\n")) {
        Ok(_) => panic!("ca with require was accepted"),
        Err(e) => e,
    };
    assert!(
        e.len() == 1
            && e[0].ends_with(
                "resources.db.ca: is only read with sslmode \"verify-ca\" or \"verify-full\"; with \"require\" the server's certificate is not checked"
            ),
        "{e:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
