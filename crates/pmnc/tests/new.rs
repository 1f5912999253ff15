//! `pmnc new`: the scaffolded app passes `pmnc check` and `pmnc test`, and serves.

mod common;

use common::{get, pmnc, Server, Tree};

#[test]
fn a_new_app_checks_tests_and_serves() {
    let tree = Tree::new();
    let app = tree.path().join("myapp");
    let app_s = app.display().to_string();
    let out = pmnc(&["new", &app_s]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(out.stdout.contains("pmnc run"), "{}", out.stdout);
    let out = pmnc(&["check", &app_s]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(out.stdout.contains("1 cage(s)"), "{}", out.stdout);
    let out = pmnc(&["test", &app_s]);
    assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.lines().any(|l| l == "1 passed, 0 failed"), "{}", out.stdout);
    // Editor support: lua-language-server finds the pmnc annotations through .luarc.json.
    let luarc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(app.join(".luarc.json")).unwrap()).unwrap();
    assert_eq!(luarc["workspace.library"][0], ".luals");
    assert!(std::fs::read_to_string(app.join(".luals/pmnc.lua")).unwrap().contains("function pmnc.events.wait(topic, timeout)"));

    // Serve it on a free port instead of the scaffold's 8080.
    let toml = app.join("cages/web/cage.toml");
    let text = std::fs::read_to_string(&toml).unwrap().replace("127.0.0.1:8080", "127.0.0.1:0");
    std::fs::write(&toml, text).unwrap();
    let server = Server::start(&app, &[]);
    let r = get(server.addr("http"), "/?name=Ann");
    assert_eq!((r.status, r.text()), (200, "Hello, Ann!".to_string()));
    let r = get(server.addr("http"), "/missing");
    assert_eq!(r.status, 404);
    assert_eq!(r.header("content-type"), Some("application/json"));
}

#[test]
fn new_refuses_an_existing_folder() {
    let tree = Tree::new();
    let path = tree.path().display().to_string();
    let out = pmnc(&["new", &path]);
    assert_eq!(out.code, Some(1));
    assert!(out.stderr.contains("already exists"), "{}", out.stderr);
}
