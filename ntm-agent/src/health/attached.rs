//! Whether each requested interface is attached: set by the agent as
//! interfaces come and go, read by `/healthz` and the API.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

/// Attach state per interface, shared between the agent and `/healthz`.
#[derive(Clone, Default)]
pub struct Health {
    interfaces: Arc<Mutex<BTreeMap<String, bool>>>,
}

impl Health {
    pub fn set(&self, iface: &str, attached: bool) {
        if let Ok(mut map) = self.interfaces.lock() {
            map.insert(iface.to_string(), attached);
        }
    }

    /// Each requested interface and whether it is attached.
    pub fn states(&self) -> Vec<(String, bool)> {
        match self.interfaces.lock() {
            Ok(map) => map.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            Err(_) => Vec::new(),
        }
    }

    /// (healthy, one line per interface)
    pub fn report(&self) -> (bool, String) {
        let Ok(map) = self.interfaces.lock() else {
            return (false, "health state unavailable\n".to_string());
        };
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
