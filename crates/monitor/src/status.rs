//! `/status`: every figure of the process now, as JSON (the page's tables read it too).

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;

use rustomnic_core::metrics;
use serde_json::{json, Value};

use crate::series::Store;
use crate::{cluster, lock, Shared};

fn finite(v: Option<f64>) -> Value {
    match v {
        Some(v) if v.is_finite() => json!((v * 1e4).round() / 1e4),
        _ => Value::Null,
    }
}

fn rates(store: &Store, key: &str, names: &[&str]) -> serde_json::Map<String, Value> {
    names.iter().map(|n| (n.to_string(), finite(store.latest(&format!("{key}/{n}"))))).collect()
}

pub(crate) fn status(shared: &Shared) -> Value {
    let store = lock(&shared.store);
    let interfaces = metrics::interfaces();
    let messages = metrics::all_message_counts();
    let resources = rustomnic_resource::all_stats();
    let memory = metrics::vm_memory();
    let reloads = metrics::reload_counts();
    let broken = metrics::broken_modules();
    // The configured cages, and any other cage figures were recorded for (a test harness).
    let names: BTreeSet<&String> = shared.cages.iter().chain(interfaces.iter().map(|(c, _, _)| c)).collect();
    let cages: Vec<Value> = names
        .into_iter()
        .map(|cage| {
            let ifaces: Vec<Value> = interfaces
                .iter()
                .filter(|(c, _, _)| c == cage)
                .map(|(_, name, m)| {
                    let mut o = rates(&store, &format!("interface/{cage}/{name}"), &["requests_per_s", "errors_per_s", "p50_ms", "p90_ms", "p99_ms"]);
                    o.insert("name".into(), json!(name));
                    o.insert("requests".into(), json!(m.requests.load(Ordering::Relaxed)));
                    o.insert("errors".into(), json!(m.errors.load(Ordering::Relaxed)));
                    o.insert("timeouts".into(), json!(m.timeouts.load(Ordering::Relaxed)));
                    o.insert("cancelled".into(), json!(m.cancelled.load(Ordering::Relaxed)));
                    o.insert("in_flight".into(), json!(m.in_flight.load(Ordering::Relaxed).max(0)));
                    // A message interface's brokered figures (amqp, mqtt, ...).
                    if let Some((_, _, counts)) = messages.iter().find(|(c, i, _)| c == cage && i == name) {
                        let counts: serde_json::Map<String, Value> = counts.all().iter().map(|(k, v)| (k.to_string(), json!(v))).collect();
                        o.insert("messages".into(), Value::Object(counts));
                    }
                    Value::Object(o)
                })
                .collect();
            let res: Vec<Value> = resources
                .iter()
                .filter(|(c, _, _)| c == cage)
                .map(|(_, name, s)| {
                    let mut o = rates(&store, &format!("resource/{cage}/{name}"), &["calls_per_s", "errors_per_s", "p50_ms", "p90_ms", "p99_ms"]);
                    o.insert("name".into(), json!(name));
                    o.insert("calls".into(), json!(s.calls.load(Ordering::Relaxed)));
                    o.insert("errors".into(), json!(s.errors.load(Ordering::Relaxed)));
                    let causes: serde_json::Map<String, Value> =
                        rustomnic_resource::Cause::ALL.iter().map(|c| (c.label().to_string(), json!(s.errors_of(*c)))).collect();
                    o.insert("errors_by_cause".into(), Value::Object(causes));
                    o.insert("connect_failures".into(), json!(s.connect_failures.load(Ordering::Relaxed)));
                    o.insert("in_use".into(), json!(s.in_use.load(Ordering::Relaxed)));
                    o.insert("idle".into(), json!(s.idle.load(Ordering::Relaxed)));
                    o.insert("waiting".into(), json!(s.waiting.load(Ordering::Relaxed)));
                    Value::Object(o)
                })
                .collect();
            let vms: Vec<Value> = memory.iter().filter(|(c, _, _)| c == cage).map(|(_, w, b)| json!({"worker": w, "bytes": b})).collect();
            let (r, e) = reloads.iter().find(|(c, _, _)| c == cage).map(|(_, r, e)| (*r, *e)).unwrap_or((0, 0));
            let cage_broken: Vec<Value> =
                broken.iter().filter(|b| &b.cage == cage).map(|b| json!({"module": b.subject, "message": b.message, "time": b.time})).collect();
            json!({
                "name": cage,
                "interfaces": ifaces,
                "resources": res,
                "lua_memory_bytes": memory.iter().filter(|(c, _, _)| c == cage).map(|(_, _, b)| b).sum::<u64>(),
                "vms": vms,
                "reloads": r,
                "module_errors": e,
                "broken_modules": cage_broken,
            })
        })
        .collect();
    drop(store);
    let gauges: Vec<Value> = metrics::gauges()
        .iter()
        .map(|g| {
            let labels: serde_json::Map<String, Value> = g.labels.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
            json!({"name": g.name, "labels": labels, "value": finite(Some((g.read)()))})
        })
        .collect();
    let events: Vec<Value> = metrics::events()
        .iter()
        .rev()
        .take(100)
        .map(|e| json!({"time": e.time, "kind": e.kind.as_str(), "cage": e.cage, "subject": e.subject, "message": e.message, "request_id": e.request_id}))
        .collect();
    let cluster = cluster::instances().map(|all| all.iter().map(|i| i.to_json()).collect::<Vec<_>>());
    let (clustered_queues, workflows, _) = crate::queues::view();
    json!({
        "pid": std::process::id(),
        "version": env!("CARGO_PKG_VERSION"),
        "started": shared.started_unix,
        "uptime_seconds": shared.started.elapsed().as_secs_f64(),
        "monitor": shared.addr.map(|a| format!("{}://{a}/", shared.scheme)),
        "cages": cages,
        "gauges": gauges,
        "events": events,
        "alerts": lock(&shared.alerts).to_json(),
        "cluster": cluster,
        "clustered_queues": clustered_queues,
        "workflows": workflows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use std::time::Instant;

    #[test]
    fn status_lists_cages_and_the_cluster_when_a_source_is_set() {
        let shared = Shared {
            store: Mutex::new(Store::new()),
            alerts: Mutex::new(crate::alerts::Alerts::new(Vec::new())),
            auth: crate::Auth::None,
            cages: vec!["status-test".into()],
            started: Instant::now(),
            started_unix: 0.0,
            addr: None,
            scheme: "http",
        };
        metrics::interface("status-test", "http").requests.fetch_add(5, Ordering::Relaxed);
        let st = status(&shared);
        let cage = st["cages"].as_array().and_then(|c| c.iter().find(|c| c["name"] == "status-test").cloned()).unwrap_or_default();
        assert_eq!(cage["interfaces"][0]["requests"], 5, "{st}");
        assert!(st["cluster"].is_null(), "{st}");
        let source: Arc<dyn cluster::ClusterSource> =
            Arc::new(|| vec![cluster::sample_instance("web", "b", false), cluster::sample_instance("api", "a", true)]);
        cluster::set_cluster_source(Some(source));
        let st = status(&shared);
        cluster::set_cluster_source(None);
        let instances = st["cluster"].as_array().cloned().unwrap_or_default();
        assert_eq!(instances.len(), 2, "{st}");
        // Sorted by cage: api first.
        assert_eq!(instances[0]["cage"], "api");
        assert_eq!(instances[0]["up"], true);
        assert_eq!(instances[1]["up"], false);
        assert_eq!(instances[1]["monitor_url"], "http://host-a:9100/?cage=web");
        assert_eq!(instances[1]["pid"], 4242);
    }
}
