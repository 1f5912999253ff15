//! `pmnc new`: the scaffolded app passes `pmnc check` and `pmnc test`, and serves; `pmnc new --cage`
//! adds a cage to it; its .gitignore keeps the state the app writes out of git.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::Write;
use std::path::Path;
use std::process::Command;

use common::{get, pmnc, pmnc_bin, Output, Server, Tree};

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

/// Runs `pmnc ARGS` in the folder `cwd`.
fn pmnc_in(cwd: &Path, args: &[&str]) -> Output {
    let out = Command::new(pmnc_bin()).args(args).current_dir(cwd).env("RUST_LOG", "").output().expect("start pmnc");
    Output { code: out.status.code(), stdout: String::from_utf8_lossy(&out.stdout).into(), stderr: String::from_utf8_lossy(&out.stderr).into() }
}

#[test]
fn new_cage_adds_a_cage_to_an_app_that_checks_tests_and_is_called() {
    let tree = Tree::new();
    let app = tree.path().join("myapp");
    assert_eq!(pmnc(&["new", &app.display().to_string()]).code, Some(0));

    // From the app folder itself, then from inside a cage of it.
    let out = pmnc_in(&app, &["new", "--cage", "worker"]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(out.stdout.contains("created cages/worker") && out.stdout.contains("pmnc run ."), "{}", out.stdout);
    let out = pmnc_in(&app.join("cages/web"), &["new", "--cage", "mailer"]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(app.join("cages/mailer/cage.toml").is_file() && app.join("cages/mailer/jobs.lua").is_file());
    // Or naming the app.
    let out = pmnc(&["new", "--cage", "audit", &app.display().to_string()]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);

    let app_s = app.display().to_string();
    let out = pmnc(&["check", &app_s]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(out.stdout.contains("4 cage(s)"), "{}", out.stdout);
    let out = pmnc(&["test", &app_s]);
    assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.lines().any(|l| l == "4 passed, 0 failed"), "{}", out.stdout);

    // The web cage calls the new one by name.
    std::fs::write(app.join("cages/web/http.lua"), "return { handle = function() return pmnc('worker').jobs.ping() end }\n").unwrap();
    let toml = app.join("cages/web/cage.toml");
    std::fs::write(&toml, std::fs::read_to_string(&toml).unwrap().replace("127.0.0.1:8080", "127.0.0.1:0")).unwrap();
    let server = Server::start(&app, &[]);
    assert_eq!(get(server.addr("http"), "/").text(), "pong from worker");
}

#[test]
fn new_cage_refuses_bad_names_existing_cages_and_folders_outside_an_app() {
    let tree = Tree::new();
    let app = tree.path().join("myapp");
    assert_eq!(pmnc(&["new", &app.display().to_string()]).code, Some(0));
    let app_s = app.display().to_string();
    for bad in ["../escape", "a/b", ".shared", "", "-x", "with space"] {
        let out = pmnc(&["new", &format!("--cage={bad}"), &app_s]);
        assert_eq!(out.code, Some(1), "{bad:?}: {}", out.stdout);
        assert!(out.stderr.contains("not a valid cage name"), "{bad:?}: {}", out.stderr);
    }
    assert!(!tree.path().join("escape").exists());
    let out = pmnc(&["new", "--cage", "web", &app_s]);
    assert_eq!(out.code, Some(1));
    assert!(out.stderr.contains("already exists"), "{}", out.stderr);
    assert_eq!(
        std::fs::read_to_string(app.join("cages/web/cage.toml")).unwrap().lines().next(),
        Some("# The web cage: one HTTP interface. Keys: docs/config.md and docs/interfaces/http.md.")
    );
    let elsewhere = tree.path().join("nowhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let out = pmnc_in(&elsewhere, &["new", "--cage", "worker"]);
    assert_eq!(out.code, Some(1));
    assert!(out.stderr.contains("not inside an app"), "{}", out.stderr);
    assert!(!elsewhere.join("cages").exists());
    let out = pmnc(&["new"]);
    assert_eq!(out.code, Some(1));
    assert!(out.stderr.contains("--cage NAME"), "{}", out.stderr);
}

#[test]
fn the_state_a_running_app_writes_is_ignored_by_git() {
    let tree = Tree::new();
    let app = tree.path().join("myapp");
    assert_eq!(pmnc(&["new", &app.display().to_string()]).code, Some(0));
    let git = |args: &[&str]| Command::new("git").args(args).current_dir(&app).output();
    match git(&["init", "-q"]) {
        Ok(o) if o.status.success() => {}
        other => {
            let _ = writeln!(
                std::io::stderr(),
                "\n!!!!!!!!\n!!! git is missing ({other:?}): the .gitignore test is SKIPPED. Install it with: apt-get install -y git\n!!!!!!!!\n"
            );
            return;
        }
    }
    let toml = app.join("cages/web/cage.toml");
    std::fs::write(&toml, std::fs::read_to_string(&toml).unwrap().replace("127.0.0.1:8080", "127.0.0.1:0")).unwrap();
    // A custom state path too, in the cage folder.
    assert_eq!(pmnc(&["new", "--cage", "worker", &app.display().to_string()]).code, Some(0));
    let worker = app.join("cages/worker/cage.toml");
    std::fs::write(&worker, format!("{}\n[resources.state]\npath = \"worker-state.sqlite\"\n", std::fs::read_to_string(&worker).unwrap())).unwrap();
    let mut server = Server::start(&app, &[]);
    assert_eq!(get(server.addr("http"), "/?name=Ann").status, 200);
    server.terminate(std::time::Duration::from_secs(10));
    assert!(app.join("cages/web/.data/state.sqlite").is_file(), "the running app made its state file");
    assert!(app.join("cages/worker/worker-state.sqlite").is_file(), "the custom state file");
    let out = git(&["status", "--porcelain", "--untracked-files=all"]).expect("git status");
    let status = String::from_utf8_lossy(&out.stdout);
    assert!(status.contains("cages/web/http.lua") && status.contains(".gitignore"), "{status}");
    assert!(!status.contains("sqlite") && !status.contains(".data"), "state shows in git status:\n{status}");
}
