//! The cluster view: the instances of every cage of the flock, as a [`ClusterSource`] (the
//! cluster engine, from its heartbeats) reports them.

use std::sync::{Arc, Mutex};

/// One running instance of a cage somewhere in the flock.
#[derive(Debug, Clone, PartialEq)]
pub struct Instance {
    pub cage: String,
    pub instance: String,
    pub host: String,
    pub pid: u32,
    pub version: String,
    pub uptime_seconds: f64,
    /// A heartbeat arrived recently.
    pub up: bool,
    /// Requests in flight, or whatever load figure the heartbeat carries.
    pub load: f64,
    /// Its monitor page, when it has one.
    pub monitor_url: Option<String>,
}

impl Instance {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "cage": self.cage,
            "instance": self.instance,
            "host": self.host,
            "pid": self.pid,
            "version": self.version,
            "uptime_seconds": self.uptime_seconds,
            "up": self.up,
            "load": self.load,
            "monitor_url": self.monitor_url,
        })
    }
}

/// Where the flock's instances come from.
pub trait ClusterSource: Send + Sync {
    fn instances(&self) -> Vec<Instance>;
}

/// A closure is a source too.
impl<F: Fn() -> Vec<Instance> + Send + Sync> ClusterSource for F {
    fn instances(&self) -> Vec<Instance> {
        self()
    }
}

static SOURCE: Mutex<Option<Arc<dyn ClusterSource>>> = Mutex::new(None);

/// Installs the source of the cluster view (the cluster engine does, when the process joins a
/// flock); `None` removes it.
pub fn set_cluster_source(source: Option<Arc<dyn ClusterSource>>) {
    *SOURCE.lock().unwrap_or_else(|e| e.into_inner()) = source;
}

/// The instances of the flock, or None when this process is not clustered.
pub fn instances() -> Option<Vec<Instance>> {
    let source = SOURCE.lock().unwrap_or_else(|e| e.into_inner()).clone();
    source.map(|s| {
        let mut all = s.instances();
        all.sort_by(|a, b| (&a.cage, &a.host, &a.instance).cmp(&(&b.cage, &b.host, &b.instance)));
        all
    })
}

/// Test support: an instance with plausible fields.
pub fn sample_instance(cage: &str, instance: &str, up: bool) -> Instance {
    Instance {
        cage: cage.into(),
        instance: instance.into(),
        host: "host-a".into(),
        pid: 4242,
        version: "0.1.0".into(),
        uptime_seconds: 12.0,
        up,
        load: 3.0,
        monitor_url: Some(format!("http://host-a:9100/?cage={cage}")),
    }
}
