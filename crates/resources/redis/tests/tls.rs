//! TLS to Redis: a throw-away redis-server with only a TLS port (certificates from a test CA
//! made with rcgen) is reached by rediss:// urls; a certificate for another host or from another
//! CA is refused with the reason; plain redis:// still works against the machine's own server;
//! bad TLS config is reported with file, line and key. Without a TLS-capable redis-server the
//! server tests say so loudly and pass.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{TcpStream, ToSocketAddrs};
use std::process::{Command, Stdio};
use std::time::Duration;

use rustomnic_core::Value;
use rustomnic_resource::testing::{configure, configure_in, run_lua};
use rustomnic_resource::testing_tls::{free_port, shout, ServerGuard, TestPki};
use rustomnic_resource::ResourceConfig;
use rustomnic_resource_redis::Redis;

const MODULE: &str = r#"
local M = {}

-- Two participants in one transaction, then what they wrote.
function M.roundtrip(key)
  local ok, r = pcall(function()
    local xa = pmnc.transaction.create()
    xa.cache.set(key, "over tls")
    xa.cache.incr(key .. ":n")
    local set, n = xa.execute()
    local c = pmnc.transaction.cache
    local got = c.get(key)
    c.del({ key, key .. ":n" })
    return { set = set, n = n, got = got }
  end)
  if ok then return true, r end
  return false, tostring(r)
end

return M
"#;

fn toml_string(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

fn cache(url: &str, extra: &str) -> ResourceConfig {
    match configure(&Redis, "cache", &format!("url = {}\nconnect_timeout = \"10s\"\n{extra}", toml_string(url))) {
        Ok(c) => c,
        Err(e) => panic!("config refused: {e:?}"),
    }
}

fn roundtrip(config: ResourceConfig) -> Vec<Value> {
    let key = format!("rustomnic-test:{}:tls", std::process::id());
    match run_lua(vec![config], MODULE, "roundtrip", vec![Value::str(key)], Duration::from_secs(20)) {
        Ok(v) => v,
        Err(e) => panic!("roundtrip: {e}"),
    }
}

fn works(config: ResourceConfig) {
    let r = roundtrip(config);
    assert_eq!(r.first(), Some(&Value::Bool(true)), "{r:?}");
    let result = r.get(1).cloned().unwrap_or(Value::Nil);
    assert_eq!(result.get("set"), Some(&Value::str("OK")), "{r:?}");
    assert_eq!(result.get("n"), Some(&Value::Int(1)), "{r:?}");
    assert_eq!(result.get("got"), Some(&Value::str("over tls")), "{r:?}");
}

fn refused(config: ResourceConfig) -> String {
    let r = roundtrip(config);
    assert_eq!(r.first(), Some(&Value::Bool(false)), "expected a refusal: {r:?}");
    r.get(1).and_then(|v| v.as_str()).unwrap_or_default().to_string()
}

/// A redis-server of its own with a TLS port only, stopped when dropped.
struct TlsRedis {
    port: u16,
    pki: TestPki,
    _server: ServerGuard,
}

fn start_redis() -> Result<TlsRedis, String> {
    let pki = TestPki::new("redis", &["localhost"])?;
    let dir = std::env::temp_dir().join(format!("rustomnic-redis-tls-server-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let port = free_port()?;
    let log = dir.join("server.log");
    let out = std::fs::File::create(&log).map_err(|e| e.to_string())?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    let child = Command::new("redis-server")
        .args(["--port", "0", "--bind", "127.0.0.1", "--tls-port", &port.to_string(), "--tls-auth-clients", "no", "--save", "", "--appendonly", "no"])
        .arg("--tls-cert-file")
        .arg(&pki.cert)
        .arg("--tls-key-file")
        .arg(&pki.key)
        .arg("--tls-ca-cert-file")
        .arg(&pki.ca)
        .arg("--dir")
        .arg(&dir)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("cannot start redis-server (apt-get install redis-server): {e}"))?;
    let mut server = ServerGuard::new("the test's redis-server", child, "TERM", dir, log);
    // A build without TLS exits here, saying so in its log.
    server.wait_log("Ready to accept connections", Duration::from_secs(30))?;
    Ok(TlsRedis { port, pki, _server: server })
}

#[test]
fn tls_against_a_throwaway_server() {
    let redis = match start_redis() {
        Ok(r) => r,
        Err(why) => {
            shout(&format!("!!! No redis-server with TLS could be started for the test: {why}\n!!! The redis TLS server tests are SKIPPED."));
            return;
        }
    };
    let port = redis.port;
    let ca = format!("ca = {}\n", toml_string(&redis.pki.ca.display().to_string()));

    // rediss:// by the name the certificate holds, with the test CA: a transaction over TLS.
    works(cache(&format!("rediss://localhost:{port}/0"), &ca));

    // By an address the certificate does not name: refused with the reason, no password shown.
    let e = refused(cache(&format!("rediss://:s3cret-pw@127.0.0.1:{port}/0"), &ca));
    assert!(
        e.starts_with(&format!(
            "resource cache (participant 1): cannot connect: 127.0.0.1:{port}/0: TLS: the server's certificate is not valid for 127.0.0.1 (it is for localhost)"
        )),
        "{e}"
    );
    assert!(!e.contains("s3cret-pw"), "the password leaked: {e}");

    // Another CA, and no ca at all (the public CAs): refused.
    let other = format!("ca = {}\n", toml_string(&redis.pki.other_ca.display().to_string()));
    let e = refused(cache(&format!("rediss://localhost:{port}/0"), &other));
    assert!(e.contains(&format!("TLS: the server's certificate is not signed by the CA of ca = {}", redis.pki.other_ca.display())), "{e}");
    let e = refused(cache(&format!("rediss://localhost:{port}/0"), ""));
    assert!(e.contains("TLS: the server's certificate is not signed by a public CA"), "{e}");

    // Plain redis:// to the TLS port does not get through either (the server resets it).
    let e = refused(cache(&format!("redis://127.0.0.1:{port}/0"), ""));
    assert!(e.starts_with(&format!("resource cache (participant 1): cannot connect: 127.0.0.1:{port}/0: ")), "{e}");
}

#[test]
fn plain_redis_still_works_against_the_machines_server() {
    let url = std::env::var("PMNC_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".to_string());
    let addr = redis::Client::open(url.as_str()).map(|c| c.get_connection_info().addr().to_string()).unwrap_or_default();
    let reachable = addr.to_socket_addrs().ok().and_then(|mut a| a.next()).is_some_and(|a| TcpStream::connect_timeout(&a, Duration::from_secs(1)).is_ok());
    if !reachable {
        shout(&format!("!!! No Redis at {url}; plain_redis_still_works_against_the_machines_server is SKIPPED.\n!!! Start one with: redis-server --daemonize yes --port 6379 --save \"\""));
        return;
    }
    works(cache(&url, ""));
}

fn config_errors(dir: &std::path::Path, toml: &str) -> Vec<String> {
    match configure_in(dir, &Redis, "cache", toml) {
        Ok(_) => panic!("accepted: {toml}"),
        Err(e) => e,
    }
}

#[test]
fn bad_tls_config_is_refused_with_file_line_and_key() {
    let dir = std::env::temp_dir().join(format!("rustomnic-redis-tls-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(dir.join("not-pem.pem"), "-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n").unwrap_or_else(|e| panic!("{e}"));
    let Ok(pki) = TestPki::new("redis-config", &["localhost"]) else { panic!("no test certificates") };
    std::fs::copy(&pki.ca, dir.join("ca.pem")).unwrap_or_else(|e| panic!("{e}"));
    let file = dir.join("cage.toml");

    let e = config_errors(&dir, "url = \"rediss://h:6380/0\"\nca = \"missing.pem\"\n");
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(e[0].starts_with(&format!("{}:3: resources.cache.ca: cannot read {}: ", file.display(), dir.join("missing.pem").display())), "{e:?}");
    let e = config_errors(&dir, "url = \"rediss://h:6380/0\"\nca = \"not-pem.pem\"\n");
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0].starts_with(&format!("{}:3: resources.cache.ca: {} is not a PEM file of certificates", file.display(), dir.join("not-pem.pem").display())),
        "{e:?}"
    );
    let e = config_errors(&dir, "url = \"redis://h:6379/0\"\nca = \"ca.pem\"\n");
    assert_eq!(e, vec![format!("{}:3: resources.cache.ca: is only read with a rediss:// url (TLS); this url is plain", file.display())]);
    let e = config_errors(&dir, "url = \"rediss://h:6380/0#insecure\"\n");
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0].starts_with(&format!("{}:2: resources.cache.url: #insecure (TLS without checking the server's certificate) is refused", file.display())),
        "{e:?}"
    );
    assert!(configure_in(&dir, &Redis, "cache", "url = \"rediss://h:6380/0\"\nca = \"ca.pem\"\n").is_ok());
    assert!(configure_in(&dir, &Redis, "cache", "url = \"rediss://h:6380/0\"\n").is_ok());
    let _ = std::fs::remove_dir_all(&dir);
}
