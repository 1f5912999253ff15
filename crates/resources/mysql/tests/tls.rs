//! TLS to MariaDB: a throw-away mariadbd with its own data folder (mariadb-install-db) and
//! ssl-cert/ssl-key/ssl-ca from a test CA made with rcgen is connected to with each ssl_mode; a
//! certificate for another host or from another CA is refused with the reason; disabled still
//! works against the machine's own server; bad TLS config is reported with file, line and key.
//! Without MariaDB's binaries the server tests say so loudly and pass.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use rustomnic_core::Value;
use rustomnic_resource::testing::{configure, configure_in, run_lua};
use rustomnic_resource::testing_tls::{free_port, is_root, shout, system_user, ServerGuard, TestPki};
use rustomnic_resource::ResourceConfig;
use rustomnic_resource_mysql::Mysql;

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
  return pmnc.transaction.db.execute("select cast(sum(n) as signed) as total from " .. table_name)
end

return M
"#;

/// The cipher of this connection as the server sees it; empty without TLS.
const CIPHER: &str = "select variable_value as cipher from information_schema.session_status where variable_name = 'Ssl_cipher'";

fn toml_string(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

fn db(url: &str, extra: &str) -> ResourceConfig {
    match configure(&Mysql, "db", &format!("url = {}\nconnect_timeout = \"10s\"\n{extra}", toml_string(url))) {
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

fn refused(config: ResourceConfig) -> String {
    let r = run(config, "try", "select 1");
    assert_eq!(r.first(), Some(&Value::Bool(false)), "expected a refusal: {r:?}");
    r.get(1).and_then(|v| v.as_str()).unwrap_or_default().to_string()
}

fn first_row(result: &Value) -> Option<&Value> {
    match result.get("rows") {
        Some(Value::Array(rows)) => rows.first(),
        _ => None,
    }
}

/// The TLS cipher of a connection made with `config` ("" when plain).
fn cipher(config: ResourceConfig) -> String {
    let r = run(config, "try", CIPHER);
    assert_eq!(r.first(), Some(&Value::Bool(true)), "the query failed: {r:?}");
    r.get(1).and_then(first_row).and_then(|row| row.get("cipher")).and_then(|c| c.as_str()).map(str::to_string).unwrap_or_else(|| panic!("no cipher in {r:?}"))
}

/// A mariadbd of its own with TLS, stopped and removed when dropped.
struct TlsMariadb {
    port: u16,
    pki: TestPki,
    _server: ServerGuard,
}

fn find(names: &[&str]) -> Option<String> {
    names.iter().find(|n| Path::new(n).is_file()).map(|n| n.to_string())
}

fn start_mariadb() -> Result<TlsMariadb, String> {
    let install = find(&["/usr/bin/mariadb-install-db", "/usr/bin/mysql_install_db"]).ok_or("no mariadb-install-db (apt-get install mariadb-server)")?;
    let server = find(&["/usr/sbin/mariadbd", "/usr/sbin/mysqld"]).ok_or("no mariadbd (apt-get install mariadb-server)")?;
    // mariadbd refuses to run as root unless told a user to switch to.
    let owner = if is_root() { Some(system_user("mysql").ok_or("running as root and there is no mysql user to run the server as")?) } else { None };
    let pki = TestPki::new("mariadb", &["localhost"])?;
    let dir = std::env::temp_dir().join(format!("rustomnic-mariadb-tls-server-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).map_err(|e| format!("cannot chown {}: {e}", dir.display()))?;
    }
    let data = dir.join("data");
    let mut install_db = Command::new(&install);
    install_db.arg("--no-defaults").arg(format!("--datadir={}", data.display())).args(["--auth-root-authentication-method=normal", "--skip-test-db"]);
    if owner.is_some() {
        install_db.arg("--user=mysql");
    }
    let out = install_db.stdin(Stdio::null()).output().map_err(|e| format!("cannot run {install}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{install} failed: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)));
    }
    let port = free_port()?;
    let log = dir.join("server.log");
    let mut mariadbd = Command::new(&server);
    mariadbd
        .arg("--no-defaults")
        .arg(format!("--datadir={}", data.display()))
        .arg(format!("--socket={}", dir.join("mysqld.sock").display()))
        .arg(format!("--pid-file={}", dir.join("mysqld.pid").display()))
        .arg(format!("--log-error={}", log.display()))
        .args([format!("--port={port}").as_str(), "--bind-address=127.0.0.1", "--skip-name-resolve", "--innodb-buffer-pool-size=16M"])
        .arg(format!("--ssl-cert={}", pki.cert.display()))
        .arg(format!("--ssl-key={}", pki.key.display()))
        .arg(format!("--ssl-ca={}", pki.ca.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if owner.is_some() {
        mariadbd.arg("--user=mysql");
    }
    let child = mariadbd.spawn().map_err(|e| format!("cannot start {server}: {e}"))?;
    let mut guard = ServerGuard::new("the test's mariadbd", child, "TERM", dir, log);
    guard.wait_log("ready for connections", Duration::from_secs(60))?;
    Ok(TlsMariadb { port, pki, _server: guard })
}

fn ca_line(path: &Path) -> String {
    format!("ca = {}\n", toml_string(&path.display().to_string()))
}

/// One server for every case, so that mariadb-install-db runs once per test run.
#[test]
fn tls_against_a_throwaway_server() {
    let maria = match start_mariadb() {
        Ok(m) => m,
        Err(why) => {
            shout(&format!("!!! No MariaDB with TLS could be started for the test: {why}\n!!! The mysql TLS server tests are SKIPPED."));
            return;
        }
    };
    let port = maria.port;
    let ca = ca_line(&maria.pki.ca);
    // With --skip-name-resolve, 127.0.0.1 is the client's host; root@localhost would not match.
    let grant = db(&format!("mysql://root@127.0.0.1:{port}/mysql"), "");
    let r = run(grant, "try", "create database tls_test");
    assert_eq!(r.first(), Some(&Value::Bool(true)), "{r:?}");

    // verify_identity by the name the certificate holds: TLS, and a real transaction through it.
    let full = |host: &str| db(&format!("mysql://root:s3cret-pw@{host}:{port}/tls_test"), &format!("ssl_mode = \"verify_identity\"\n{ca}"));
    let no_pw = |host: &str, mode: &str, extra: &str| db(&format!("mysql://root@{host}:{port}/tls_test"), &format!("ssl_mode = \"{mode}\"\n{extra}"));
    assert!(!cipher(no_pw("localhost", "verify_identity", &ca)).is_empty(), "verify_identity ran without TLS");
    let r = run(no_pw("localhost", "verify_identity", &ca), "try", "create table tls_check (n int) engine=innodb");
    assert_eq!(r.first(), Some(&Value::Bool(true)), "{r:?}");
    let r = run(no_pw("localhost", "verify_identity", &ca), "write_two", "tls_check");
    let total = r.first().and_then(first_row).and_then(|row| row.get("total")).cloned();
    assert_eq!(total, Some(Value::Int(3)), "{r:?}");

    // By an address the certificate does not name: refused with the reason, no password shown.
    let e = refused(full("127.0.0.1"));
    assert!(
        e.starts_with("resource db (participant 1): cannot connect: TLS: the server's certificate is not valid for 127.0.0.1 (it is for localhost)"),
        "{e}"
    );
    assert!(!e.contains("s3cret-pw"), "the password leaked: {e}");

    // verify_ca checks the chain only, so the address is fine.
    assert!(!cipher(no_pw("127.0.0.1", "verify_ca", &ca)).is_empty(), "verify_ca ran without TLS");

    // Another CA: refused by verify_ca and verify_identity. No ca: the public CAs, refused too.
    let other = ca_line(&maria.pki.other_ca);
    for mode in ["verify_ca", "verify_identity"] {
        let e = refused(no_pw("localhost", mode, &other));
        let expected = format!("cannot connect: TLS: the server's certificate is not signed by the CA of ca = {}", maria.pki.other_ca.display());
        assert!(e.contains(&expected), "{mode}: {e}");
    }
    let e = refused(no_pw("localhost", "verify_identity", ""));
    assert!(e.contains("TLS: the server's certificate is not signed by a public CA"), "{e}");

    // required and preferred encrypt and check nothing; disabled stays plain.
    for mode in ["required", "preferred", "REQUIRED"] {
        assert!(!cipher(no_pw("127.0.0.1", mode, "")).is_empty(), "{mode} ran without TLS");
    }
    assert_eq!(cipher(no_pw("127.0.0.1", "disabled", "")), "");
}

fn machine_url() -> String {
    std::env::var("PMNC_TEST_MYSQL_URL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".to_string())
}

/// The machine's server has TLS off (Debian's default): disabled works, preferred falls back to
/// plain, required is refused with the reason.
#[test]
fn the_machines_server_without_tls() {
    let r = run(db(&machine_url(), "ssl_mode = \"disabled\"\n"), "try", CIPHER);
    if r.first() != Some(&Value::Bool(true)) {
        let why = r.get(1).and_then(|v| v.as_str()).unwrap_or("no answer");
        shout(&format!(
            "!!! MariaDB is not reachable at PMNC_TEST_MYSQL_URL or its default ({why}).\n!!! the_machines_server_without_tls is SKIPPED. Start the server with:\n!!!   start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd"
        ));
        return;
    }
    let plain = r.get(1).and_then(first_row).and_then(|row| row.get("cipher")).and_then(|c| c.as_str()).map(str::to_string);
    assert_eq!(plain.as_deref(), Some(""), "{r:?}");
    let have_ssl = run(db(&machine_url(), ""), "try", "select @@have_ssl as s");
    let tls_on = have_ssl.get(1).and_then(first_row).and_then(|row| row.get("s")).and_then(|s| s.as_str()) == Some("YES");
    if tls_on {
        shout("!!! The machine's MariaDB has TLS on; the fallback of preferred and the refusal of required are not checked.");
        return;
    }
    assert_eq!(cipher(db(&machine_url(), "ssl_mode = \"preferred\"\n")), "");
    let e = refused(db(&machine_url(), "ssl_mode = \"required\"\n"));
    assert!(
        e.starts_with("resource db (participant 1): cannot connect: TLS: the server does not accept TLS connections (have_ssl is not YES on the server), and ssl_mode \"required\" requires TLS"),
        "{e}"
    );
}

fn config_errors(dir: &Path, toml: &str) -> Vec<String> {
    match configure_in(dir, &Mysql, "db", toml) {
        Ok(_) => panic!("accepted: {toml}"),
        Err(e) => e,
    }
}

#[test]
fn bad_tls_config_is_refused_with_file_line_and_key() {
    let dir = std::env::temp_dir().join(format!("rustomnic-mysql-tls-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(dir.join("not-pem.pem"), "just text\n").unwrap_or_else(|e| panic!("{e}"));
    let Ok(pki) = TestPki::new("mysql-config", &["localhost"]) else { panic!("no test certificates") };
    std::fs::copy(&pki.ca, dir.join("ca.pem")).unwrap_or_else(|e| panic!("{e}"));
    let file = dir.join("cage.toml").display().to_string();
    let url = "url = \"mysql://u@h/db\"\n";

    let e = config_errors(&dir, &format!("{url}ssl_mode = \"verify-full\"\n"));
    assert_eq!(
        e,
        vec![format!("{file}:3: resources.db.ssl_mode: \"verify-full\" is not an ssl_mode; use one of \"disabled\", \"preferred\", \"required\", \"verify_ca\", \"verify_identity\"")]
    );
    let e = config_errors(&dir, &format!("{url}ssl_mode = \"verify_ca\"\nca = \"missing.pem\"\n"));
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(e[0].starts_with(&format!("{file}:4: resources.db.ca: cannot read {}: ", dir.join("missing.pem").display())), "{e:?}");
    let e = config_errors(&dir, &format!("{url}ssl_mode = \"verify_ca\"\nca = \"not-pem.pem\"\n"));
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(e[0].starts_with(&format!("{file}:4: resources.db.ca: {} holds no certificate", dir.join("not-pem.pem").display())), "{e:?}");
    let e = config_errors(&dir, &format!("{url}ssl_mode = \"preferred\"\nca = \"ca.pem\"\n"));
    assert_eq!(
        e,
        vec![format!("{file}:4: resources.db.ca: is only read with ssl_mode \"verify_ca\" or \"verify_identity\"; with \"preferred\" the server's certificate is not checked")]
    );
    let e = config_errors(&dir, "url = \"mysql://u@h/db?require_ssl=true\"\n");
    assert_eq!(e, vec![format!("{file}:2: resources.db.url: TLS is set with the key ssl_mode (and ca), not with url parameters such as require_ssl")]);
    assert!(configure_in(&dir, &Mysql, "db", &format!("{url}ssl_mode = \"VERIFY_IDENTITY\"\nca = \"ca.pem\"\n")).is_ok());
    let _ = std::fs::remove_dir_all(&dir);
}
