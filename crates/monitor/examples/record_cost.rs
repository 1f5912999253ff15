//! Measures what monitoring costs: recording one request (on one and on two threads sharing an
//! interface), one sample of every figure, and one /metrics page. Run by bench/monitor.sh.

use std::hint::black_box;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rustomnic_lua::metrics::Recording;
use rustomnic_lua::{RequestCtx, RunError};

fn record(n: u64, interface: &str) -> Duration {
    let ctx = RequestCtx::new("bench", interface, Duration::from_secs(60));
    let ok: Result<(), RunError> = Ok(());
    let started = Instant::now();
    for _ in 0..n {
        let mut r = Recording::start(black_box(&ctx));
        r.finish(&ctx, black_box(&ok));
    }
    started.elapsed()
}

fn main() {
    let n: u64 = std::env::var("N").ok().and_then(|v| v.parse().ok()).unwrap_or(5_000_000);
    record(100_000, "warm");
    let one = record(n, "one");
    println!("record one request, 1 thread:             {:6.1} ns", one.as_nanos() as f64 / n as f64);
    let threads: Vec<_> = (0..2).map(|_| std::thread::spawn(move || record(n, "shared"))).collect();
    let two: Vec<Duration> = threads.into_iter().map(|t| t.join().unwrap_or_default()).collect();
    let worst = two.iter().max().copied().unwrap_or_default();
    println!("record one request, 2 threads, 1 interface: {:6.1} ns", worst.as_nanos() as f64 / n as f64);
    let counted = rustomnic_core::metrics::interface("bench", "shared").requests.load(Ordering::Relaxed);
    assert_eq!(counted, 2 * n, "every recording counted");

    // A process with 50 interfaces and 20 resources.
    for i in 0..50 {
        let m = rustomnic_core::metrics::interface("bench", &format!("if{i}"));
        for us in 0..200 {
            m.latency.observe_us(us * 37);
        }
    }
    for i in 0..20 {
        rustomnic_resource::stats_for("bench", &format!("r{i}"));
    }
    let mut store = rustomnic_monitor::series::Store::new();
    let rounds = 300;
    let started = Instant::now();
    for i in 0..rounds {
        store.sample(i as f64, 1.0);
    }
    println!("one sample (50 interfaces, 20 resources):  {:6.1} us", started.elapsed().as_secs_f64() * 1e6 / rounds as f64);
    let started = Instant::now();
    let json = store.to_json(false, None).to_string();
    println!("/api/series, 5 min window:                 {:6.1} ms, {} KiB", started.elapsed().as_secs_f64() * 1e3, json.len() / 1024);
    let started = Instant::now();
    let json = store.to_json(false, Some((rounds - 2) as f64)).to_string();
    println!("/api/series, the newest sample (since=):   {:6.1} us, {} KiB", started.elapsed().as_secs_f64() * 1e6, json.len() / 1024);
    let started = Instant::now();
    let mut bytes = 0;
    for _ in 0..100 {
        bytes = black_box(rustomnic_monitor::prometheus::render()).len();
    }
    println!("/metrics page:                             {:6.1} us, {} KiB", started.elapsed().as_secs_f64() * 1e6 / 100.0, bytes / 1024);
}
