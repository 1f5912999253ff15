//! `/metrics`: every figure in the Prometheus text exposition format (version 0.0.4).

use std::fmt::Write;
use std::sync::atomic::Ordering;

use rustomnic_core::metrics::{self, Histogram, PROMETHEUS_BUCKETS};

/// A label value with `\`, `"` and newlines escaped.
pub fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn labels(pairs: &[(&str, &str)]) -> String {
    let inner: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}=\"{}\"", escape(v))).collect();
    format!("{{{}}}", inner.join(","))
}

/// Accumulates families; each family's HELP and TYPE are written once, before its first sample.
struct Text {
    out: String,
}

impl Text {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {}", help.replace('\\', "\\\\").replace('\n', "\\n"));
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, pairs: &[(&str, &str)], value: f64) {
        let _ = writeln!(self.out, "{name}{} {}", labels(pairs), number(value));
    }

    fn histogram(&mut self, name: &str, pairs: &[(&str, &str)], h: &Histogram) {
        let cumulative = h.cumulative();
        for (i, count) in cumulative.iter().enumerate() {
            let le = PROMETHEUS_BUCKETS.get(i).map(|b| number(*b)).unwrap_or_else(|| "+Inf".into());
            let mut with_le: Vec<(&str, &str)> = pairs.to_vec();
            with_le.push(("le", &le));
            let _ = writeln!(self.out, "{name}_bucket{} {count}", labels(&with_le));
        }
        let _ = writeln!(self.out, "{name}_sum{} {}", labels(pairs), number(h.sum_seconds()));
        let _ = writeln!(self.out, "{name}_count{} {}", labels(pairs), cumulative.last().copied().unwrap_or(0));
    }
}

/// A float as Prometheus writes it: integers without a fraction, NaN and infinities by name.
pub fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        }
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

/// A counter family: name, help, and how to read it from the figures of one series.
type Counter<T> = (&'static str, &'static str, fn(&T) -> u64);

/// The whole `/metrics` page.
pub fn render() -> String {
    let mut t = Text { out: String::new() };
    let interfaces = metrics::interfaces();
    let counters: [Counter<metrics::InterfaceMetrics>; 4] = [
        ("pmnc_requests_total", "Requests that ended, however they ended.", |m| m.requests.load(Ordering::Relaxed)),
        ("pmnc_request_errors_total", "Requests that failed (an error, a missing handler or a passed deadline).", |m| m.errors.load(Ordering::Relaxed)),
        ("pmnc_request_timeouts_total", "Requests stopped at their deadline.", |m| m.timeouts.load(Ordering::Relaxed)),
        ("pmnc_requests_cancelled_total", "Requests dropped before they ended (the client went away).", |m| m.cancelled.load(Ordering::Relaxed)),
    ];
    for (name, help, read) in counters {
        t.family(name, "counter", help);
        for (cage, interface, m) in &interfaces {
            t.sample(name, &[("cage", cage), ("interface", interface)], read(m) as f64);
        }
    }
    t.family("pmnc_requests_in_flight", "gauge", "Requests running now.");
    for (cage, interface, m) in &interfaces {
        t.sample("pmnc_requests_in_flight", &[("cage", cage), ("interface", interface)], m.in_flight.load(Ordering::Relaxed).max(0) as f64);
    }
    t.family("pmnc_request_duration_seconds", "histogram", "Time from the start of a request's handler to its end.");
    for (cage, interface, m) in &interfaces {
        t.histogram("pmnc_request_duration_seconds", &[("cage", cage), ("interface", interface)], &m.latency);
    }

    t.family(
        "pmnc_http_responses_total",
        "counter",
        "HTTP responses by status class, per route of a route table (route \"\" for the rest: a handler without routes, 404s, refused requests).",
    );
    for (cage, interface, route, counts) in metrics::all_status_counts() {
        for (i, class) in ["1xx", "2xx", "3xx", "4xx", "5xx"].iter().enumerate() {
            let n = counts.classes[i].load(Ordering::Relaxed);
            if n > 0 {
                t.sample("pmnc_http_responses_total", &[("cage", &cage), ("interface", &interface), ("route", &route), ("class", class)], n as f64);
            }
        }
    }

    t.family(
        "pmnc_messages_total",
        "counter",
        "Messages a message interface took from its broker, by what became of them: received, acked, retried, redelivered, dead_lettered, refused.",
    );
    for (cage, interface, counts) in metrics::all_message_counts() {
        for (event, n) in counts.all() {
            t.sample("pmnc_messages_total", &[("cage", &cage), ("interface", &interface), ("event", event)], n as f64);
        }
    }

    let resources = rustomnic_resource::all_stats();
    let counters: [Counter<rustomnic_resource::PoolStats>; 2] = [
        ("pmnc_resource_calls_total", "Calls a module made to a resource (participants of transactions), whether or not they got a connection.", |s| {
            s.calls.load(Ordering::Relaxed)
        }),
        ("pmnc_resource_connect_failures_total", "Connects to a resource that failed.", |s| s.connect_failures.load(Ordering::Relaxed)),
    ];
    for (name, help, read) in counters {
        t.family(name, "counter", help);
        for (cage, resource, s) in &resources {
            t.sample(name, &[("cage", cage), ("resource", resource)], read(s) as f64);
        }
    }
    t.family(
        "pmnc_resource_errors_total",
        "counter",
        "Calls to a resource that failed, by cause (connect, breaker_open, pool_timeout, pool_size, query, deadline).",
    );
    for (cage, resource, s) in &resources {
        for cause in rustomnic_resource::Cause::ALL {
            t.sample("pmnc_resource_errors_total", &[("cage", cage), ("resource", resource), ("cause", cause.label())], s.errors_of(cause) as f64);
        }
    }
    t.family("pmnc_resource_connections", "gauge", "Pooled connections by state (in_use, idle) over every worker.");
    for (cage, resource, s) in &resources {
        t.sample("pmnc_resource_connections", &[("cage", cage), ("resource", resource), ("state", "in_use")], s.in_use.load(Ordering::Relaxed) as f64);
        t.sample("pmnc_resource_connections", &[("cage", cage), ("resource", resource), ("state", "idle")], s.idle.load(Ordering::Relaxed) as f64);
    }
    t.family("pmnc_resource_waiting", "gauge", "Checkouts waiting for a free connection.");
    for (cage, resource, s) in &resources {
        t.sample("pmnc_resource_waiting", &[("cage", cage), ("resource", resource)], s.waiting.load(Ordering::Relaxed) as f64);
    }
    t.family("pmnc_resource_call_duration_seconds", "histogram", "Time of one call to a resource, from asking the pool for a connection (so waiting for one, or connecting, included) to the call's result; commit and rollback not included. Failed calls included.");
    for (cage, resource, s) in &resources {
        t.histogram("pmnc_resource_call_duration_seconds", &[("cage", cage), ("resource", resource)], &s.latency);
    }

    t.family("pmnc_lua_memory_bytes", "gauge", "Memory of each Lua VM (one per cage per worker thread), sampled every second.");
    for (cage, worker, bytes) in metrics::vm_memory() {
        t.sample("pmnc_lua_memory_bytes", &[("cage", &cage), ("worker", &worker.to_string())], bytes as f64);
    }
    let reloads = metrics::reload_counts();
    t.family("pmnc_module_reloads_total", "counter", "New module versions that went live.");
    for (cage, n, _) in &reloads {
        t.sample("pmnc_module_reloads_total", &[("cage", cage)], *n as f64);
    }
    t.family("pmnc_module_load_errors_total", "counter", "Module versions that failed to load (the previous version kept running).");
    for (cage, _, n) in &reloads {
        t.sample("pmnc_module_load_errors_total", &[("cage", cage)], *n as f64);
    }

    let mut gauges = metrics::gauges();
    gauges.sort_by(|a, b| a.name.cmp(&b.name));
    let mut last = String::new();
    for g in gauges {
        if g.name != last {
            t.family(&g.name, "gauge", &g.help);
            last = g.name.clone();
        }
        let pairs: Vec<(&str, &str)> = g.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        t.sample(&g.name, &pairs, (g.read)());
    }
    t.out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_format() {
        let m = metrics::interface("prom\"test", "http");
        m.requests.fetch_add(3, Ordering::Relaxed);
        m.errors.fetch_add(1, Ordering::Relaxed);
        m.latency.observe_us(300);
        m.latency.observe_us(30_000);
        let g = metrics::register_gauge("pmnc_queue_depth", "Calls waiting in a queue.", &[("cage", "prom-test"), ("queue", "retry")], || 7.0);
        let messages = metrics::message_counts("prom-test", "amqp");
        messages.received.fetch_add(5, Ordering::Relaxed);
        messages.dead_lettered.fetch_add(2, Ordering::Relaxed);
        let text = render();
        metrics::unregister_gauge(g);
        assert!(text.contains("# TYPE pmnc_requests_total counter\n"), "{text}");
        assert!(text.contains("pmnc_requests_total{cage=\"prom\\\"test\",interface=\"http\"} 3\n"), "{text}");
        assert!(text.contains("pmnc_request_errors_total{cage=\"prom\\\"test\",interface=\"http\"} 1\n"), "{text}");
        assert!(text.contains("pmnc_request_duration_seconds_bucket{cage=\"prom\\\"test\",interface=\"http\",le=\"0.0005\"} 1\n"), "{text}");
        assert!(text.contains("pmnc_request_duration_seconds_bucket{cage=\"prom\\\"test\",interface=\"http\",le=\"0.025\"} 1\n"), "{text}");
        assert!(text.contains("pmnc_request_duration_seconds_bucket{cage=\"prom\\\"test\",interface=\"http\",le=\"0.05\"} 2\n"), "{text}");
        assert!(text.contains("pmnc_request_duration_seconds_bucket{cage=\"prom\\\"test\",interface=\"http\",le=\"+Inf\"} 2\n"), "{text}");
        assert!(text.contains("pmnc_request_duration_seconds_count{cage=\"prom\\\"test\",interface=\"http\"} 2\n"), "{text}");
        assert!(text.contains("pmnc_messages_total{cage=\"prom-test\",interface=\"amqp\",event=\"received\"} 5\n"), "{text}");
        assert!(text.contains("pmnc_messages_total{cage=\"prom-test\",interface=\"amqp\",event=\"dead_lettered\"} 2\n"), "{text}");
        assert!(text.contains("pmnc_messages_total{cage=\"prom-test\",interface=\"amqp\",event=\"acked\"} 0\n"), "{text}");
        assert!(text.contains("# TYPE pmnc_queue_depth gauge\npmnc_queue_depth{cage=\"prom-test\",queue=\"retry\"} 7\n"), "{text}");
        // Every family is declared once.
        assert_eq!(text.matches("# TYPE pmnc_request_duration_seconds histogram").count(), 1);
        // Every sample line is `name{labels} value`.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (_, value) = line.rsplit_once(' ').unwrap_or(("", "x"));
            assert!(value.parse::<f64>().is_ok() || value == "NaN" || value.ends_with("Inf"), "bad line {line:?}");
        }
    }

    #[test]
    fn numbers() {
        assert_eq!(number(3.0), "3");
        assert_eq!(number(0.25), "0.25");
        assert_eq!(number(f64::INFINITY), "+Inf");
        assert_eq!(escape("a\nb\\"), "a\\nb\\\\");
    }
}
