//! The smpp interface and resource through the real binary against a small SMSC written on
//! Python's smpplib (smpp_support/smsc.py: smpplib parses and builds every PDU it exchanges).
//! One SMSC and one pmnc process for every check: binds with credentials (a wrong password
//! refused, named in the error), deliver_sm and data_sm answered only after the handler, a failing handler
//! answered ESME_RX_T_APPN and the redelivery handled, a delivery receipt parsed, enquire_link
//! both ways, UCS-2 and long concatenated submits, a rollback submitting nothing, message ids
//! given back, throttling retried, a malformed PDU nacked, a bad command_length and a peer gone
//! mid-PDU ending the link, and the SMSC killed and restarted with the interface binding again.
//! The server side (`listen`) is driven by smpplib's own client (smpp_support/esme.py) and by
//! hostile connections (a bad length, a PDU before the bind, silence, a cut PDU).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use rustomnic_resource_smpp::pdu::{self, Body, Pdu};
use serde_json::{json, Value as Json};

const INSTALL: &str = "python3 -m pip install --break-system-packages smpplib";

fn shout(text: &str) {
    let _ = writeln!(std::io::stderr(), "\n!!!!!!!!\n{text}\n!!!!!!!!\n");
}

/// The test SMSC: its events as they come, and its command line.
struct Smsc {
    child: Child,
    stdin: ChildStdin,
    events: Arc<Mutex<Vec<Json>>>,
    /// Events before this index were looked at already.
    seen: usize,
}

impl Smsc {
    fn start(port: u16) -> Smsc {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/smpp_support/smsc.py");
        let mut child = Command::new("python3")
            .args([script, &port.to_string(), "pmnc", "secret"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start python3");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let events = Arc::new(Mutex::new(Vec::new()));
        let e = events.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Json>(&line) {
                    e.lock().unwrap().push(v);
                }
            }
        });
        let mut s = Smsc { child, stdin, events, seen: 0 };
        s.wait("ready", |_| true, Duration::from_secs(10)).expect("the test SMSC did not start");
        s
    }

    fn send(&mut self, cmd: Json) {
        writeln!(self.stdin, "{cmd}").unwrap();
        self.stdin.flush().unwrap();
    }

    /// The first event `ev` after those seen that `pred` accepts, within `timeout`; events
    /// before it stay unseen only if they come after it.
    fn wait(&mut self, ev: &str, pred: impl Fn(&Json) -> bool, timeout: Duration) -> Option<Json> {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let events = self.events.lock().unwrap();
                if let Some(i) = events.iter().skip(self.seen).position(|e| e["ev"] == ev && pred(e)) {
                    return Some(events[self.seen + i].clone());
                }
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Marks every event so far as seen.
    fn mark(&mut self) {
        self.seen = self.events.lock().unwrap().len();
    }

    fn all(&self, ev: &str) -> Vec<Json> {
        self.events.lock().unwrap().iter().skip(self.seen).filter(|e| e["ev"] == ev).cloned().collect()
    }
}

impl Drop for Smsc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn smpplib_present() -> bool {
    let ok = Command::new("python3").args(["-c", "import smpplib"]).status().map(|s| s.success()).unwrap_or(false);
    if !ok {
        shout(&format!("SKIPPED: Python's smpplib is missing (install with: {INSTALL})"));
    }
    ok
}

const APP: &str = r#"
local M = {}

local function submit(t, resource)
  local xa = pmnc.transaction.create()
  xa[resource or "sms"].submit(t)
  return xa.execute()
end

function M.handle(m)
  if m.receipt then
    local r = m.receipt
    submit{to = "+100", text = "receipt " .. r.id .. " " .. r.stat .. " " .. r.err .. " " .. tostring(r.message_state) .. " " .. tostring(r.receipted_message_id)}
    return
  end
  local t = m.text
  if m.command == "data_sm" then
    submit{to = "+100", text = "data-sm said " .. t .. " from " .. m.source}
  elseif t == "fail once" then
    local n = (pmnc.state.get("fails") or 0) + 1
    pmnc.state.set("fails", n)
    if n == 1 then error("the first attempt fails") end
    submit{to = "+100", text = "handled on attempt " .. n}
  elseif t == "slow" then
    pmnc.sleep(1)
  elseif t == "ucs2" then
    submit{to = "+4912345", from = "+4900", text = "Привет, мир 😀"}
  elseif t == "long" then
    submit{to = "+4912345", text = string.rep("0123456789", 40), registered_delivery = true}
  elseif t == "rollback" then
    local ok = pcall(function()
      local xa = pmnc.transaction.create({ accept = function() error("refused after submitting") end })
      xa.sms.submit{to = "+100", text = "must not be sent"}
      xa.execute()
    end)
    submit{to = "+100", text = "after rollback " .. tostring(ok)}
  elseif t == "ids" then
    local r = submit{to = "+100", text = "which id?"}
    local xa = pmnc.transaction.create()
    xa.sms.message_ids(r.reference)
    local ids = xa.execute()
    submit{to = "+100", text = "ids " .. table.concat(ids, ",") .. " parts " .. r.parts}
  elseif t == "throttled" then
    submit{to = "+100", text = "through the throttle"}
  elseif t == "bad password" then
    local ok, e = pcall(submit, {to = "+100", text = "x"}, "sms_bad")
    pmnc.log.warn("bad password: " .. tostring(ok) .. " " .. tostring(e))
    submit{to = "+100", text = "bad password done"}
  else
    submit{to = "+100", text = "echo " .. tostring(t) .. " from " .. m.source .. " dc " .. m.data_coding}
  end
end

-- The server side: what an ESME submits is passed on to the SMSC; the id is the handler's.
function M.server(m)
  if m.text == "please fail" then error("refused by the handler") end
  submit{to = "+100", text = "server got " .. m.text .. " from " .. m.source .. " as " .. m.system_id .. " (" .. m.command .. ")"}
  return "srv-" .. m.source
end

return M
"#;

fn cage_toml(port: u16) -> String {
    let target = |password: &str| {
        format!("host = \"127.0.0.1\"\nport = {port}\nsystem_id = \"pmnc\"\npassword = \"{password}\"\nenquire_link = \"1s\"\nresponse_timeout = \"2s\"\n")
    };
    format!(
        "[interfaces.sms_in]\nprotocol = \"smpp\"\n{}bind = \"receiver\"\nwindow = 4\nrequest_timeout = \"5s\"\n\n\
         [interfaces.sms_bad]\nprotocol = \"smpp\"\n{}handler = \"sms_in.handle\"\n\n\
         [interfaces.sms_server]\nprotocol = \"smpp\"\nlisten = \"127.0.0.1:0\"\nsystem_id = \"esme\"\npassword = \"pw\"\nhandler = \"sms_in.server\"\nresponse_timeout = \"1s\"\n\n\
         [resources.sms]\nprotocol = \"smpp\"\n{}source = \"Shop\"\nsubmit_timeout = \"10s\"\n\n\
         [resources.sms_bad]\nprotocol = \"smpp\"\n{}",
        target("${SMSC_PASSWORD}"),
        target("wrong"),
        target("secret"),
        target("wrong"),
    )
}

#[test]
fn smpp_interface_and_resource_against_an_smpplib_smsc() {
    if !smpplib_present() {
        return;
    }
    let port = spare_port();
    let mut smsc = Smsc::start(port);
    let tree = Tree::new();
    tree.write("cage/cage.toml", &cage_toml(port));
    tree.write("cage/sms_in.lua", APP);
    let mut pmnc =
        Server::try_start_env(&tree.path().join("cage"), 2, &[], &[("SMSC_PASSWORD", "secret")]).unwrap_or_else(|log| panic!("pmnc did not start:\n{log}"));
    let t = Duration::from_secs(10);

    // Binds: the interface with the password from the environment, the other refused.
    let bound = smsc.wait("bind", |e| e["kind"] == "bind_receiver" && e["status"] == 0, t).expect("the interface bound");
    assert_eq!(bound["system_id"], "pmnc");
    smsc.wait("bind", |e| e["status"] == 0x0E, t).expect("the wrong password was refused");
    let refused = pmnc.wait_for("ESME_RINVPASWD", t).unwrap_or_else(|| panic!("the refusal is not logged:\n{}", pmnc.log.join("\n")));
    assert!(refused.contains("sms_bad") && refused.contains("bind_receiver refused"), "{refused}");

    // A message in, answered after its handler; the echo goes out through the resource.
    smsc.send(json!({"cmd": "deliver", "tag": "hello", "text": "hello there"}));
    let r = smsc.wait("deliver_sm_resp", |e| e["tag"] == "hello", t).expect("deliver_sm answered");
    assert_eq!(r["status"], 0);
    let echo = smsc.wait("submit_sm", |e| e["text"].as_str().is_some_and(|s| s.starts_with("echo hello")), t).expect("the echo was submitted");
    assert_eq!(echo["text"], "echo hello there from 4915550001 dc 0");
    assert_eq!(
        (echo["source"].as_str(), echo["source_ton"].as_i64(), echo["destination"].as_str(), echo["destination_ton"].as_i64()),
        (Some("Shop"), Some(5), Some("100"), Some(1))
    );

    // UCS-2 in.
    smsc.send(json!({"cmd": "deliver", "tag": "u", "text": "Grüße ✓", "data_coding": 8}));
    let u = smsc.wait("submit_sm", |e| e["text"].as_str().is_some_and(|s| s.starts_with("echo Gr")), t).expect("the UCS-2 message was read");
    assert_eq!(u["text"], "echo Grüße ✓ from 4915550001 dc 8");
    assert_eq!(u["data_coding"], 8, "the echo needs UCS-2 too");

    // data_sm with message_payload.
    smsc.send(json!({"cmd": "data", "tag": "d", "text": "payload text"}));
    assert_eq!(smsc.wait("data_sm_resp", |e| e["tag"] == "d", t).expect("data_sm answered")["status"], 0);
    smsc.wait("submit_sm", |e| e["text"] == "data-sm said payload text from 4915550003", t).unwrap_or_else(|| panic!("{:?}", smsc.all("submit_sm")));

    // The answer waits for the handler.
    smsc.send(json!({"cmd": "deliver", "tag": "slow", "text": "slow"}));
    let r = smsc.wait("deliver_sm_resp", |e| e["tag"] == "slow", t).expect("slow answered");
    assert_eq!(r["status"], 0);
    assert!(r["latency"].as_f64().unwrap() >= 0.95, "answered before the handler ended: {r}");

    // The window: 4 handled at once and 4 waiting; the SMSC is asked to slow down past that.
    smsc.mark();
    for i in 0..10 {
        smsc.send(json!({"cmd": "deliver", "tag": format!("w{i}"), "text": "slow"}));
    }
    assert!(until(Duration::from_secs(10), || smsc.all("deliver_sm_resp").len() == 10), "{:?}", smsc.all("deliver_sm_resp"));
    let answers = smsc.all("deliver_sm_resp");
    let throttled: Vec<&Json> = answers.iter().filter(|e| e["status"] == 0x58).collect();
    let handled: Vec<&Json> = answers.iter().filter(|e| e["status"] == 0).collect();
    assert_eq!(throttled.len() + handled.len(), 10, "{answers:?}");
    assert!(!throttled.is_empty() && handled.len() >= 4, "{answers:?}");
    assert!(throttled.iter().all(|e| e["latency"].as_f64().unwrap() < 0.9), "throttled at once: {answers:?}");
    assert!(handled.iter().all(|e| e["latency"].as_f64().unwrap() >= 0.95), "{answers:?}");

    // A failing handler: ESME_RX_T_APPN, then the SMSC's redelivery succeeds.
    smsc.send(json!({"cmd": "deliver", "tag": "f", "text": "fail once", "redeliver": true}));
    let first = smsc.wait("deliver_sm_resp", |e| e["tag"] == "f" && e["attempt"] == 1, t).expect("first attempt answered");
    assert_eq!(first["status"], 0x64);
    let second = smsc.wait("deliver_sm_resp", |e| e["tag"] == "f" && e["attempt"] == 2, t).expect("redelivery answered");
    assert_eq!(second["status"], 0);
    smsc.wait("submit_sm", |e| e["text"] == "handled on attempt 2", t).expect("the redelivery was handled");

    // A delivery receipt.
    let receipt = "id:msg-77 sub:001 dlvrd:001 submit date:2612061200 done date:2612061201 stat:DELIVRD err:000 text:Hello";
    smsc.send(json!({"cmd": "deliver", "tag": "dr", "text": receipt, "esm_class": 4, "tlvs": {"receipted_message_id": "msg-77", "message_state": 2}}));
    smsc.wait("submit_sm", |e| e["text"] == "receipt msg-77 DELIVRD 000 2 msg-77", t).expect("the receipt was parsed");

    // UCS-2 out, and a long text in concatenated parts.
    smsc.send(json!({"cmd": "deliver", "tag": "u2", "text": "ucs2"}));
    let u = smsc.wait("submit_sm", |e| e["destination"] == "4912345" && e["data_coding"] == 8, t).expect("the UCS-2 submit");
    assert_eq!(u["text"], "Привет, мир 😀");
    assert_eq!((u["source"].as_str(), u["source_ton"].as_i64()), (Some("4900"), Some(1)));
    smsc.mark();
    smsc.send(json!({"cmd": "deliver", "tag": "long", "text": "long"}));
    smsc.wait("deliver_sm_resp", |e| e["tag"] == "long", t).expect("long answered");
    let parts: Vec<Json> = smsc.all("submit_sm").into_iter().filter(|e| e["destination"] == "4912345").collect();
    assert_eq!(parts.len(), 3, "400 GSM characters take three parts: {parts:?}");
    let reference = parts[0]["udh"][3].clone();
    let mut whole = String::new();
    for (i, p) in parts.iter().enumerate() {
        assert_eq!(p["esm_class"], 0x40);
        assert_eq!(p["registered_delivery"], 1);
        let udh: Vec<i64> = p["udh"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
        assert_eq!((udh[0], udh[1], udh[3], udh[4]), (0, 3, 3, i as i64 + 1), "{udh:?}");
        assert_eq!(p["udh"][3], reference);
        whole.push_str(p["text"].as_str().unwrap());
    }
    assert_eq!(whole, "0123456789".repeat(40));

    // A rollback submits nothing.
    smsc.mark();
    smsc.send(json!({"cmd": "deliver", "tag": "rb", "text": "rollback"}));
    smsc.wait("submit_sm", |e| e["text"] == "after rollback false", t).expect("the handler went on after the rollback");
    assert!(smsc.all("submit_sm").iter().all(|e| e["text"] != "must not be sent"));

    // Message ids back after the commit.
    smsc.send(json!({"cmd": "deliver", "tag": "ids", "text": "ids"}));
    let first = smsc.wait("submit_sm", |e| e["text"] == "which id?", t).expect("the first submit");
    let want = format!("ids {} parts 1", first["message_id"].as_str().unwrap());
    smsc.wait("submit_sm", |e| e["text"] == want.as_str(), t).unwrap_or_else(|| panic!("no {want:?} in {:?}", smsc.all("submit_sm")));

    // Throttling retried.
    smsc.send(json!({"cmd": "throttle", "n": 2}));
    smsc.wait("ok", |_| true, t).unwrap();
    smsc.mark();
    smsc.send(json!({"cmd": "deliver", "tag": "th", "text": "throttled"}));
    smsc.wait("submit_sm", |e| e["text"] == "through the throttle" && e["status"] == 0, t).expect("submitted after the throttling");
    let tries: Vec<_> = smsc.all("submit_sm").into_iter().filter(|e| e["text"] == "through the throttle").map(|e| e["status"].as_i64().unwrap()).collect();
    assert_eq!(tries, vec![0x58, 0x58, 0], "throttled twice, then accepted");

    // A resource with a wrong password: the error names the resource and the refusal.
    smsc.send(json!({"cmd": "deliver", "tag": "bp", "text": "bad password"}));
    smsc.wait("submit_sm", |e| e["text"] == "bad password done", t).expect("the handler went on after the refusal");
    let bad = pmnc.wait_for("bad password: ", t).expect("the refusal reached Lua");
    assert!(
        bad.contains("bad password: false resource sms_bad (participant 1): cannot connect: pmnc@127.0.0.1")
            && bad.contains("bind_transmitter refused by the SMSC: ESME_RINVPASWD"),
        "{bad}"
    );

    // enquire_link both ways.
    smsc.send(json!({"cmd": "enquire"}));
    smsc.wait("enquire_link_resp", |_| true, t).expect("our enquire_link answered");
    smsc.wait("enquire_link", |e| e["bound"] == "bind_receiver", Duration::from_secs(5)).expect("the interface checks a quiet link");

    // A malformed body: generic_nack, and the session goes on.
    smsc.mark();
    smsc.send(json!({"cmd": "malformed"}));
    let nack = smsc.wait("generic_nack", |_| true, t).expect("generic_nack");
    assert_eq!(nack["status"], 1);
    smsc.send(json!({"cmd": "deliver", "tag": "after-nack", "text": "still here"}));
    assert_eq!(smsc.wait("deliver_sm_resp", |e| e["tag"] == "after-nack", t).expect("the session went on")["status"], 0);
    assert!(smsc.all("closed").iter().all(|e| e["bound"] != "bind_receiver"), "the session was not dropped");

    // A bad command_length, and a peer gone mid-PDU: the link ends, the interface binds again.
    for (cmd, said) in [("bad_length", "command_length 2147483647"), ("cut", "in the middle of a PDU")] {
        smsc.mark();
        smsc.send(json!({"cmd": cmd}));
        smsc.wait("bind", |e| e["kind"] == "bind_receiver" && e["status"] == 0, t).unwrap_or_else(|| {
            panic!("no bind again after {cmd}: {:?}\n{}", smsc.events.lock().unwrap(), {
                pmnc.drain(Duration::from_millis(100));
                pmnc.log.join("\n")
            })
        });
        pmnc.wait_for(said, t).unwrap_or_else(|| panic!("{cmd}: no {said:?} in the log"));
    }

    // The server side, with smpplib's own client as the ESME.
    let server = pmnc.addr("sms_server");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/smpp_support/esme.py");
    let esme = Command::new("python3").args([script, &server.ip().to_string(), &server.port().to_string(), "esme", "pw"]).output().expect("run esme.py");
    let text = String::from_utf8_lossy(&esme.stdout);
    assert!(esme.status.success(), "esme.py failed: {text}{}", String::from_utf8_lossy(&esme.stderr));
    let r: Json = serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert_eq!(r["bad_bind"], 0x0E, "a wrong password is ESME_RINVPASWD: {r}");
    assert_eq!((r["ucs2"]["status"].as_i64(), r["ucs2"]["message_id"].as_str()), (Some(0), Some("srv-4915550002")), "{r}");
    assert_eq!(r["fail"]["status"], 0x45, "a failed handler is ESME_RSUBMITFAIL: {r}");
    assert_eq!((r["enquire_link"].as_str(), r["unbind"].as_str()), (Some("enquire_link_resp"), Some("unbind_resp")), "{r}");
    smsc.wait("submit_sm", |e| e["text"] == "server got Привет from smpplib from 4915550002 as esme (submit_sm)", t).expect("the server side's handler ran");

    // Hostile ESMEs: an impossible length, a PDU before the bind, silence, a peer gone mid-PDU.
    let closes = |bytes: &[u8], hang_up: bool| -> (Vec<u8>, Duration) {
        let started = Instant::now();
        let mut c = std::net::TcpStream::connect(server).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.write_all(bytes).unwrap();
        if hang_up {
            c.shutdown(std::net::Shutdown::Write).unwrap();
        }
        let mut got = Vec::new();
        std::io::Read::read_to_end(&mut c, &mut got).expect("pmnc closes the connection");
        (got, started.elapsed())
    };
    let (got, _) = closes(&[0x7F, 0xFF, 0xFF, 0xFF, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 1], false);
    assert!(got.is_empty(), "{got:?}");
    let enquire = Pdu::new(pdu::ENQUIRE_LINK, 9, Body::Empty).encode().unwrap();
    let (got, _) = closes(&enquire, false);
    let (nack, _) = pdu::decode(&got).unwrap().expect("an answer");
    assert_eq!((nack.command_id, nack.status, nack.sequence), (pdu::GENERIC_NACK, pdu::ESME_RINVBNDSTS, 9));
    let (got, took) = closes(&[], false);
    assert!(got.is_empty() && took >= Duration::from_millis(900), "closed after {took:?}");
    let (got, _) = closes(&enquire[..7], true);
    assert!(got.is_empty(), "{got:?}");
    pmnc.wait_for("in the middle of a PDU (7 bytes of it read)", t).expect("the cut PDU is logged");
    pmnc.wait_for("outside 16..=65536", t).expect("the bad length is logged");

    // The SMSC killed and started again: the interface binds again and goes on, and the
    // resource's pooled session is replaced.
    drop(smsc);
    let mut smsc = Smsc::start(port);
    smsc.wait("bind", |e| e["kind"] == "bind_receiver" && e["status"] == 0, Duration::from_secs(15)).expect("bound again after the restart");
    pmnc.wait_for("again after", t).expect("the end of the outage is logged");
    smsc.send(json!({"cmd": "deliver", "tag": "back", "text": "back again"}));
    assert_eq!(smsc.wait("deliver_sm_resp", |e| e["tag"] == "back", t).expect("answered after the restart")["status"], 0);
    smsc.wait("submit_sm", |e| e["text"].as_str().is_some_and(|s| s.starts_with("echo back again")), t).expect("the resource submits after the restart");

    assert!(pmnc.terminate(Duration::from_secs(10)).is_some());
    smsc.wait("unbind", |e| e["bound"] == "bind_receiver", Duration::from_secs(5)).expect("the interface unbinds at shutdown");
}

#[test]
fn smpp_config_problems_are_reported_with_their_keys() {
    let tree = Tree::new();
    tree.write(
        "cage/cage.toml",
        "[interfaces.sms_in]\nprotocol = \"smpp\"\nhost = \"h\"\nsystem_id = \"a-very-long-system-id\"\nbind = \"transmitter\"\n\n[resources.sms]\nprotocol = \"smpp\"\nsystem_id = \"x\"\nmax_parts = 300\n\n[interfaces.srv]\nprotocol = \"smpp\"\nlisten = \"127.0.0.1:0\"\nhost = \"h\"\n",
    );
    tree.write("cage/sms_in.lua", "local M = {}\nfunction M.handle(m) end\nreturn M\n");
    let out = pmnc(&["check", tree.path().join("cage").to_str().unwrap()]);
    let text = format!("{}{}", out.stdout, out.stderr);
    assert_ne!(out.code, Some(0), "{text}");
    assert!(text.contains("system_id") && text.contains("at most 15 characters"), "{text}");
    assert!(text.contains("\"transmitter\" is not one of receiver, transceiver"), "{text}");
    assert!(text.contains("host is required"), "{text}");
    assert!(text.contains("max_parts"), "{text}");
    assert!(text.contains("is for connecting to an SMSC; with listen the interface is the server side"), "{text}");
    assert!(text.contains("system_id is required: ESMEs bind with it"), "{text}");
}
