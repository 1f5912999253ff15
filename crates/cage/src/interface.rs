//! The protocols this build knows, by name: interfaces (inbound, `rustomnic-interface`) and
//! resources (outbound, `rustomnic-resource`). The binary registers each in one line.

use std::collections::BTreeMap;
use std::sync::Arc;

use rustomnic_interface::InterfaceProtocol;
use rustomnic_resource::ResourceProtocol;

#[derive(Clone, Default)]
pub struct Protocols {
    interfaces: BTreeMap<&'static str, Arc<dyn InterfaceProtocol>>,
    resources: BTreeMap<&'static str, Arc<dyn ResourceProtocol>>,
}

impl Protocols {
    pub fn new() -> Protocols {
        Protocols::default()
    }

    pub fn add(&mut self, protocol: Arc<dyn InterfaceProtocol>) {
        self.interfaces.insert(protocol.name(), protocol);
    }

    pub fn get(&self, name: &str) -> Option<&Arc<dyn InterfaceProtocol>> {
        self.interfaces.get(name)
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.interfaces.keys().copied().collect()
    }

    pub fn add_resource(&mut self, protocol: Arc<dyn ResourceProtocol>) {
        self.resources.insert(protocol.name(), protocol);
    }

    pub fn resource(&self, name: &str) -> Option<&Arc<dyn ResourceProtocol>> {
        self.resources.get(name)
    }

    pub fn resource_names(&self) -> Vec<&'static str> {
        self.resources.keys().copied().collect()
    }
}
