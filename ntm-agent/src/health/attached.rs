//! Whether each requested interface is attached: set by the agent as
//! interfaces come and go, read by `/healthz` and the API.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use crate::model::sync;

/// Attach state per interface, shared between the agent and `/healthz`.
#[derive(Clone, Default)]
pub struct Health {
    interfaces: Arc<Mutex<BTreeMap<String, bool>>>,
}

impl Health {
    pub fn set(&self, iface: &str, attached: bool) {
        sync::lock(&self.interfaces).insert(iface.to_string(), attached);
    }

    /// Each requested interface and whether it is attached.
    pub fn states(&self) -> Vec<(String, bool)> {
        sync::lock(&self.interfaces)
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }

    /// (healthy, one line per interface)
    pub fn report(&self) -> (bool, String) {
        let map = sync::lock(&self.interfaces);
        let mut text = String::new();
        for (iface, attached) in map.iter() {
            let state = if *attached {
                "attached"
            } else {
                "NOT attached"
            };
            text.push_str(&format!("{iface}: {state}\n"));
        }
        let healthy = !map.is_empty() && map.values().all(|a| *a);
        (healthy, text)
    }
}
