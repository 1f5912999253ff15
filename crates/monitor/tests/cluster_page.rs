//! The cluster view of the page, from a fake cluster source, in headless Chromium (skipped
//! loudly without it): every instance listed with its state and a link to its page.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use rustomnic_monitor::{cluster, Alert, AlertSink, MonitorConfig};

struct NoSink;

impl AlertSink for NoSink {
    fn deliver(&self, _: &rustomnic_monitor::config::AlertRule, _: Alert) -> BoxFuture<'static, Result<(), String>> {
        Box::pin(async { Err("no alerts in this test".to_string()) })
    }
}

fn chromium() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("PMNC_CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    ["/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome"].iter().map(PathBuf::from).find(|p| p.exists())
}

#[test]
fn the_page_lists_the_flock_with_links() {
    let Some(browser) = chromium() else {
        eprintln!("SKIPPED the_page_lists_the_flock_with_links: no Chromium found; install it with `apt-get install -y chromium` (or set PMNC_CHROMIUM)");
        return;
    };
    let source: Arc<dyn cluster::ClusterSource> = Arc::new(|| {
        let mut down = cluster::sample_instance("worker", "w-2", false);
        down.host = "host-b".into();
        vec![cluster::sample_instance("web", "w-1", true), down]
    });
    cluster::set_cluster_source(Some(source));
    let config = MonitorConfig::default();
    let listener = rustomnic_monitor::bind(&config).expect("bind").expect("a listener");
    let monitor = rustomnic_monitor::start(Some(listener), config, vec!["web".into()], Arc::new(NoSink)).expect("start");
    let addr = monitor.addr.expect("address");

    let profile = tempfile::tempdir().expect("profile");
    let mut child = Command::new(&browser)
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--virtual-time-budget=4000", "--dump-dom"])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("http://{addr}/"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromium");
    let mut so = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        use std::io::Read;
        let mut s = String::new();
        let _ = so.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(90);
    while child.try_wait().ok().flatten().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("chromium did not finish within 90 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let dom = reader.join().unwrap_or_default();
    cluster::set_cluster_source(None);

    assert!(dom.contains("<section class=\"cage\" id=\"cluster-section\">"), "the section is shown:\n{dom}");
    assert!(
        dom.contains("<tr data-instance=\"w-1\"><td>web</td><td>w-1</td><td>host-a</td><td>4242</td><td>0.1.0</td><td>12 s</td><td class=\"up\">up</td><td>3</td><td><a href=\"http://host-a:9100/?cage=web\">page</a></td></tr>"),
        "{dom}"
    );
    assert!(dom.contains("<tr data-instance=\"w-2\"><td>worker</td><td>w-2</td><td>host-b</td>"), "{dom}");
    assert!(dom.contains("<td class=\"down\">down</td>"), "{dom}");
}
