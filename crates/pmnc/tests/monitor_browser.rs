//! The monitor page in headless Chromium: it draws its graphs from live figures (the DOM after
//! a few seconds of the page's own polling) and a screenshot is saved in the target folder.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

fn chromium() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("PMNC_CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    ["/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome"].iter().map(PathBuf::from).find(|p| p.exists())
}

/// Runs Chromium headless on `url` with `args`, bounded by 90 s; its stdout.
fn headless(browser: &PathBuf, profile: &std::path::Path, url: &str, args: &[&str]) -> String {
    let mut child = Command::new(browser)
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run", "--window-size=1400,1300", "--virtual-time-budget=6000"])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromium");
    let mut out = String::new();
    let mut so = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        use std::io::Read;
        let mut s = String::new();
        let _ = so.read_to_string(&mut s);
        s
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish within 90 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    out.push_str(&reader.join().unwrap_or_default());
    out
}

#[test]
fn the_page_draws_graphs_from_live_figures() {
    let Some(browser) = chromium() else {
        eprintln!("SKIPPED the_page_draws_graphs_from_live_figures: no Chromium found; install it with `apt-get install -y chromium` (or set PMNC_CHROMIUM)");
        return;
    };
    let t = Tree::new();
    t.write("web/cage.toml", &http_cage_toml("[monitor]\nlisten = \"127.0.0.1:0\"\ntoken = \"page-token\"\n"));
    t.write(
        "web/http.lua",
        "local M = {}\nfunction M.handle(request)\n  if request.path == '/fail' then error('page test failure') end\n  return 'ok'\nend\nreturn M\n",
    );
    let mut s = Server::start(&t.path().join("web"), &[]);
    let http = s.addr("http");
    let monitor = monitor_addr(&mut s);
    // A request count no other test makes, so finding it in the page means live figures.
    for _ in 0..23 {
        assert_eq!(get(http, "/").status, 200);
    }
    let failed = get(http, "/fail");
    assert_eq!(failed.status, 500);
    let request_id = failed.text().split("request id ").nth(1).map(|s| s.trim_end_matches([')', '\n']).to_string()).unwrap_or_default();
    assert!(!request_id.is_empty(), "{}", failed.text());
    // Two samples at least, so every graph has a line.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let series: serde_json::Value = serde_json::from_slice(&get(monitor, "/api/series?token=page-token").body).unwrap_or_default();
        if series["time"].as_array().map(|a| a.len()).unwrap_or(0) >= 2 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the monitor never took two samples: {series}");
        std::thread::sleep(Duration::from_millis(100));
    }

    let profile = tempfile::tempdir().expect("profile dir");
    let url = format!("http://{monitor}/?token=page-token#request-{request_id}");
    let dom = headless(&browser, profile.path(), &url, &["--dump-dom"]);
    assert!(dom.contains("<h2>cage web</h2>"), "{dom}");
    // No fetch or script failed (the page shows such errors in the header).
    assert!(dom.contains("<span id=\"error\"></span>"), "{dom}");
    assert!(dom.contains("<span id=\"updated\">updated "), "{dom}");
    assert!(dom.contains("<tr data-interface=\"web/http\"><td>http</td><td class=\"requests\">24</td><td class=\"errors\">1</td>"), "{dom}");
    let charts: usize = dom.split("data-charts=\"").nth(1).and_then(|r| r.split('"').next()).and_then(|n| n.parse().ok()).unwrap_or(0);
    assert!(charts >= 3, "interface traffic, latency and Lua memory at least: {charts}");
    assert!(dom.matches("class=\"uplot").count() >= charts, "a uPlot graph per chart:\n{dom}");
    assert!(dom.contains("<canvas"), "{dom}");
    let points: usize = dom
        .split("data-chart=\"i/web/http/t\"")
        .nth(1)
        .and_then(|r| r.split("data-points=\"").nth(1))
        .and_then(|r| r.split('"').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(points >= 2, "the requests graph has samples: {points}");
    // The failed request is listed, with its id, highlighted as the page's target.
    assert!(dom.contains(&format!("<tr class=\"target\" id=\"request-{request_id}\">")), "{dom}");
    assert!(dom.contains("web/http.lua:3: page test failure"), "{dom}");

    // Without the token the page shows the refusal instead of figures.
    let refused = headless(&browser, profile.path(), &format!("http://{monitor}/"), &["--dump-dom"]);
    assert!(!refused.contains("data-interface"), "{refused}");

    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("monitor-page.png");
    let _ = std::fs::remove_file(&shot);
    headless(&browser, profile.path(), &url, &[&format!("--screenshot={}", shot.display())]);
    let size = std::fs::metadata(&shot).map(|m| m.len()).unwrap_or(0);
    assert!(size > 10_000, "screenshot {} has {size} bytes", shot.display());
    eprintln!("monitor page screenshot: {}", shot.display());
}
