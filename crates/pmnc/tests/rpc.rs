//! The jsonrpc and xmlrpc interfaces and resources through the real binary, against peers
//! written by others: jsonrpcclient (PyPI) and Python's xmlrpc.client call our interfaces; our
//! resources call a jsonrpcserver (PyPI) behind Python's http.server and Python's
//! SimpleXMLRPCServer. One pmnc process hosts all of it (docs/decisions/134).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const CALC: &str = r#"
local M = {}
local count = 0
function M.echo(...) return ... end
function M.one(x) return x end
function M.sum(t) return t.a + t.b end
function M.add(a, b) return a + b end
function M.hidden() return "never" end
function M.fail() error("secret path detail") end
function M.refuse(x) error({ code = -32602, message = "x must be positive", data = { got = x } }) end
function M.custom() error({ code = 42, message = "custom", data = { 1, 2 } }) end
function M.slow() pmnc.sleep(10) return 1 end
function M.nap(s) pmnc.sleep(s) return s end
function M.note(n) count = count + n end
function M.count() return count end
function M.big() return 1 << 40 end
function M.kinds()
  return { when = { ["dateTime.iso8601"] = "20260706T12:30:05" }, bytes = { base64 = "\0\1" }, int = 1, nothing = { pmnc.json.null } }
end
return M
"#;

/// The module behind the http interface `web`: it calls the resources and reports what it saw.
const CLIENT: &str = r#"
local M = {}
local function try(f)
  local ok, r = pcall(f)
  if ok then return { ok = true, value = r } end
  return { ok = false, code = r.code, message = r.message }
end
function M.handle(request)
  local tx = pmnc.transaction
  if request.path == "/json" then
    local jr = tx.jr
    local r = {
      echo = jr.call("echo", 1, "x", { a = 1 }),
      one = jr.call("echo", "solo"),
      big = #jr.call("echo", string.rep("z", 100000)),
      named = jr.call_named("named", { a = 2, b = 40 }),
      oops = try(function() return jr.call("oops") end),
      missing = try(function() return jr.call("missing") end),
      bad_named = try(function() return jr.call_named("named", 5) end),
      broken = try(function() return tx.jr_broken.call("echo", 1) end),
      garbage = try(function() return tx.jr_garbage.call("echo", 1) end),
    }
    jr.notify("note", 5)
    r.total = jr.call("total")
    return r
  elseif request.path == "/json/slow" then
    return { late = tx.jr.call("slow") }
  elseif request.path == "/xml" then
    local xr = tx.xr
    local echoed = {}
    local values = { 7, -8, true, false, "caf\u{e9} <&>", 2.5, { ["dateTime.iso8601"] = "20260706T12:30:05" }, { 1, "a" }, { k = "v" }, pmnc.json.array(), {} }
    for i, v in ipairs(values) do echoed[i] = xr.call("echo", v) end
    local kinds = xr.call("kinds")
    kinds.bytes = pmnc.hex.encode(kinds.bytes)
    return {
      echoed = echoed,
      binary = xr.call("echo", "\0\255") == "\0\255",
      many = xr.call("echo", 1, "two"),
      big = #xr.call("echo", string.rep("z", 100000)),
      kinds = kinds,
      fault = try(function() return xr.call("fault") end),
      boom = try(function() return xr.call("boom") end),
      gone = try(function() return tx.xr_gone.call("echo", 1) end),
      garbage = try(function() return tx.xr_garbage.call("echo", 1) end),
    }
  end
  if request.path == "/tls" then
    return {
      trusted = tx.selfs.call("one", "over https"),
      untrusted = try(function() return tx.selfs_untrusted.call("one", 1) end),
    }
  end
  return { status = 404 }
end
return M
"#;

fn toml(jr_port: u16, xr_port: u16, gone_port: u16, tls_port: u16, pki: &rustomnic_resource::testing_tls::TestPki) -> String {
    let (cert, key, ca) = (pki.cert.display(), pki.key.display(), pki.ca.display());
    let methods = r#"{ echo = "calc.echo", one = "calc.one", sum = "calc.sum", "math.add" = "calc.add", fail = "calc.fail", refuse = "calc.refuse", custom = "calc.custom", slow = "calc.slow", nap = "calc.nap", note = "calc.note", count = "calc.count", big = "calc.big", kinds = "calc.kinds" }"#;
    format!(
        r#"
[interfaces.json]
protocol = "jsonrpc"
listen = "127.0.0.1:0"
path = "/rpc"
request_timeout = "1s"
max_body_size = "256KiB"
max_batch = 10
methods = {methods}

[interfaces.xml]
protocol = "xmlrpc"
listen = "127.0.0.1:0"
path = "/RPC2"
request_timeout = "1s"
max_body_size = "256KiB"
methods = {methods}

[interfaces.jsons]
protocol = "jsonrpc"
listen = "127.0.0.1:{tls_port}"
tls = {{ cert = "{cert}", key = "{key}" }}
methods = {methods}

[resources.selfs]
protocol = "jsonrpc"
url = "https://127.0.0.1:{tls_port}/"
tls_ca_file = "{ca}"

[resources.selfs_untrusted]
protocol = "jsonrpc"
url = "https://127.0.0.1:{tls_port}/"

[interfaces.web]
protocol = "http"
listen = "127.0.0.1:0"
handler = "client.handle"
request_timeout = "1500ms"
access_log = "off"

[resources.jr]
protocol = "jsonrpc"
url = "http://127.0.0.1:{jr_port}/"

[resources.jr_broken]
protocol = "jsonrpc"
url = "http://127.0.0.1:{jr_port}/broken"

[resources.jr_garbage]
protocol = "jsonrpc"
url = "http://127.0.0.1:{jr_port}/garbage"

[resources.xr]
protocol = "xmlrpc"
url = "http://127.0.0.1:{xr_port}/RPC2"

[resources.xr_gone]
protocol = "xmlrpc"
url = "http://127.0.0.1:{gone_port}/"

[resources.xr_garbage]
protocol = "xmlrpc"
url = "http://127.0.0.1:{jr_port}/garbage"
"#
    )
}

/// A Python module, or a loud SKIPPED line naming how to install it.
fn python_has(module: &str, install: &str) -> bool {
    let ok = Command::new("python3").args(["-c", &format!("import {module}")]).output().is_ok_and(|o| o.status.success());
    if !ok {
        println!("SKIPPED rpc_interfaces_and_resources_against_python_peers: Python's {module} is missing (install with: {install})");
    }
    ok
}

fn script(name: &str) -> String {
    format!("{}/tests/rpc/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn python(name: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new("python3").arg(script(name)).args(args).output().expect("python3");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// A Python server, stopped when the test ends however it ends.
struct Peer(Child);

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts a Python server script that prints its port first.
fn peer(name: &str) -> (Peer, u16) {
    let mut child = Command::new("python3").arg(script(name)).stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().expect("python3");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let port = line.trim().parse().unwrap_or_else(|_| panic!("{name} printed {line:?}, not its port"));
    (Peer(child), port)
}

fn get_json(addr: std::net::SocketAddr, path: &str) -> (u16, serde_json::Value) {
    let r = get(addr, path);
    let v = serde_json::from_slice(&r.body).unwrap_or(serde_json::Value::Null);
    (r.status, v)
}

#[test]
fn rpc_interfaces_and_resources_against_python_peers() {
    let pip = "python3 -m pip install --break-system-packages jsonrpcclient jsonrpcserver requests";
    if !python_has("jsonrpcclient", pip) || !python_has("jsonrpcserver", pip) || !python_has("requests", pip) {
        return;
    }
    let (_jr, jr_port) = peer("jsonrpc_server.py");
    let (_xr, xr_port) = peer("xmlrpc_server.py");
    // A server that takes the request and closes the connection without an answer.
    let gone = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let gone_port = gone.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in gone.incoming() {
            let mut s = s.unwrap();
            let _ = s.read(&mut [0u8; 256]);
        }
    });
    let pki = rustomnic_resource::testing_tls::TestPki::new("rpc", &["127.0.0.1"]).unwrap();
    let t = Tree::new();
    t.write("c/cage.toml", &toml(jr_port, xr_port, gone_port, spare_port(), &pki));
    t.write("c/calc.lua", CALC);
    t.write("c/client.lua", CLIENT);
    let mut s = Server::start_with_workers(&t.path().join("c"), 1, &[]);
    let (json, xml, web) = (s.addr("json"), s.addr("xml"), s.addr("web"));

    // Our interfaces, called by Python's clients.
    for (name, url) in [("jsonrpc_client.py", format!("http://{json}/rpc")), ("xmlrpc_client.py", format!("http://{xml}/RPC2"))] {
        let (ok, out) = python(name, &[&url]);
        assert!(ok, "{name}:\n{out}");
        println!("{}", out.trim());
        let id = out.trim().rsplit(' ').next().unwrap().to_string();
        assert!(
            s.wait_for_all(&[&id, "calc.fail failed", "secret path detail"], Duration::from_secs(5)).is_some(),
            "{name}: the internal error is logged with its request id {id}"
        );
    }

    // Clients gone in the middle of their body, and garbage: the interfaces go on.
    for (addr, path, ct) in [(json, "/rpc", "application/json"), (xml, "/RPC2", "text/xml")] {
        let mut c = connect(addr, Duration::from_secs(5));
        c.write_all(format!("POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: {ct}\r\ncontent-length: 500\r\n\r\n<").as_bytes()).unwrap();
        drop(c);
        let r = post(addr, path, ct, b"\x00\xff{{{[<<");
        assert!(r.status == 200 && (r.text().contains("-32700")), "{}", r.text());
    }
    let r = post(json, "/rpc", "application/json", br#"{"jsonrpc":"2.0","method":"one","params":["still here"],"id":1}"#);
    assert_eq!(json_body(&r)["result"], "still here");

    // Our jsonrpc resource calling jsonrpcserver.
    let (status, v) = get_json(web, "/json");
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["echo"], serde_json::json!([1, "x", {"a": 1}]));
    assert_eq!(v["one"], "solo");
    assert_eq!(v["big"], 100000, "a big response is read off the worker");
    assert_eq!(v["named"], 42);
    assert_eq!(v["total"], 5, "the notification ran: {v}");
    let oops = &v["oops"];
    assert_eq!((oops["ok"].as_bool(), oops["code"].as_str()), (Some(false), Some("-32050")), "{v}");
    let m = oops["message"].as_str().unwrap();
    assert!(m.contains("oops happened") && m.contains(r#"(data: {"why":"testing"})"#), "{m}");
    assert_eq!(v["missing"]["code"], "-32601", "{v}");
    assert!(v["bad_named"]["message"].as_str().unwrap().contains("one table"), "{v}");
    assert!(v["broken"]["ok"] == false && v["broken"]["message"].as_str().unwrap().contains("broke off"), "a response that breaks off: {v}");
    assert!(v["garbage"]["ok"] == false && v["garbage"]["message"].as_str().unwrap().contains("not JSON"), "{v}");
    let started = Instant::now();
    let r = get(web, "/json/slow");
    assert_eq!(r.status, 504, "the request's deadline cuts the call: {}", r.text());
    assert!(started.elapsed() < Duration::from_millis(2900), "{:?}", started.elapsed());

    // Our xmlrpc resource calling SimpleXMLRPCServer.
    let (status, v) = get_json(web, "/xml");
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        v["echoed"],
        serde_json::json!([7, -8, true, false, "caf\u{e9} <&>", 2.5, {"dateTime.iso8601": "20260706T12:30:05"}, [1, "a"], {"k": "v"}, [], {}])
    );
    assert_eq!(v["binary"], true, "bytes that are not UTF-8 go as base64 and come back: {v}");
    assert_eq!(v["many"], serde_json::json!([1, "two"]));
    assert_eq!(v["big"], 100000, "a big response is read off the worker");
    assert_eq!(
        v["kinds"],
        serde_json::json!({"int": 7, "bool": true, "str": "caf\u{e9} <&>", "double": 2.5, "when": {"dateTime.iso8601": "20260706T12:30:05"},
            "bytes": "00ff7a", "list": [1, "a", null], "empty": [], "struct": {"k": "v"}})
    );
    assert_eq!((v["fault"]["code"].as_str(), v["fault"]["message"].as_str()), (Some("7"), Some("fault: seven went wrong")), "{v}");
    assert!(v["boom"]["code"] == "1" && v["boom"]["message"].as_str().unwrap().contains("python side"), "{v}");
    assert_eq!(v["gone"]["ok"], false, "{v}");
    assert!(!v["gone"]["message"].as_str().unwrap_or("").is_empty(), "{v}");
    assert!(v["garbage"]["message"].as_str().unwrap().contains("not XML-RPC"), "{v}");

    // HTTPS: our resource calls our own interface over TLS, trusting the CA given to it only.
    let (status, v) = get_json(web, "/tls");
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["trusted"], "over https");
    assert_eq!(v["untrusted"]["ok"], false, "{v}");
    assert!(v["untrusted"]["message"].as_str().unwrap().to_lowercase().contains("certificate"), "{v}");

    // HTTP/2 with prior knowledge (curl), the hyper side of the hook.
    if Command::new("curl").arg("--version").output().is_ok() {
        let out = Command::new("curl")
            .args([
                "-s",
                "--http2-prior-knowledge",
                "-H",
                "content-type: application/json",
                "-d",
                r#"{"jsonrpc":"2.0","method":"echo","params":[1,2],"id":"h2"}"#,
            ])
            .arg(format!("http://{json}/rpc"))
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
        assert_eq!(v, serde_json::json!({"jsonrpc": "2.0", "result": [1, 2], "id": "h2"}));
    } else {
        println!("SKIPPED the HTTP/2 part: curl is missing (install with: apt-get install -y curl)");
    }
    s.terminate(Duration::from_secs(10));
}

#[test]
fn rpc_config_problems_are_reported_with_their_lines() {
    let t = Tree::new();
    let text = r#"
[interfaces.a]
protocol = "jsonrpc"
listen = "127.0.0.1:0"
methods = ["calc.nope"]

[interfaces.b]
protocol = "xmlrpc"
listen = "127.0.0.1:0"
methods = 5
max_elements = 0

[interfaces.c]
protocol = "jsonrpc"
listen = "127.0.0.1:0"
methods = { "rpc.x" = "calc.one", ok = "calc" }
path = "rpc"
max_batch = 0

[resources.r]
protocol = "xmlrpc"
url = "ftp://example.com/"
"#;
    t.write("c/cage.toml", text);
    t.write("c/calc.lua", CALC);
    let out = pmnc(&["check", t.path().join("c").to_str().unwrap()]);
    let all = format!("{}{}", out.stdout, out.stderr);
    assert_ne!(out.code, Some(0), "{all}");
    for (key, line_text) in [
        ("interfaces.b.methods", "methods = 5"),
        ("interfaces.b.max_elements", "max_elements = 0"),
        ("interfaces.c.methods", "methods = { \"rpc.x\""),
        ("interfaces.c.path", "path = \"rpc\""),
        ("interfaces.c.max_batch", "max_batch = 0"),
        ("resources.r.url", "url = \"ftp:"),
    ] {
        let want = format!("cage.toml:{}: {key}", line_of(text, line_text));
        assert!(all.contains(&want), "no {want:?} in:\n{all}");
    }
    assert!(all.contains("\"rpc.x\" cannot be a method name") && all.contains("\"calc\" is not \"module.function\""), "{all}");
    assert!(!all.contains("unknown key"), "every key is read whatever else is wrong: {all}");

    // With the table right, a method whose function does not exist stops the start.
    t.write("c/cage.toml", "[interfaces.a]\nprotocol = \"jsonrpc\"\nlisten = \"127.0.0.1:0\"\nmethods = [\"calc.one\", \"calc.nope\"]\n");
    let out = pmnc(&["check", t.path().join("c").to_str().unwrap()]);
    let all = format!("{}{}", out.stdout, out.stderr);
    assert!(all.contains("cage.toml:4: interfaces.a.methods") && all.contains("has no function nope"), "{all}");
}
