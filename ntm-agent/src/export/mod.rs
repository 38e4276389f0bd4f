//! The export side: from drained flow deltas to what users read.
//!
//! Rooms, in the order a flow's deltas travel (`crate::pipeline` wires
//! them):
//! - [`pending`]: new flows wait (bounded) for their hosts' names;
//! - [`names`]: host labels from reverse DNS, sticky for a series' life;
//! - [`labels`] and [`services`]: label values (service names, protocols,
//!   direction from the local networks);
//! - [`budget`] and [`series`]: the series budget, folding and expiry, and
//!   the compact series store with its text encoder;
//! - [`self_metrics`]: ntm's own health metrics;
//! - [`coverage`]: the self-check against the kernel's interface counters;
//! - [`live`] and [`api`]: what the page and the JSON API show now, per
//!   device, server, service and interface;
//! - [`history`]: the same counts per minute, hour and day in SQLite,
//!   across restarts;
//! - [`http`]: `/metrics`, `/healthz` and the API, secured as
//!   [`web_config`] says.

pub mod api;
pub mod budget;
pub mod coverage;
pub mod history;
pub mod http;
pub mod labels;
pub mod live;
pub mod names;
pub mod page;
pub mod pending;
pub mod self_metrics;
pub mod series;
pub mod services;
pub mod web_config;

use std::sync::{Arc, RwLock};

use prometheus::Registry;

use self::series::TrafficSeries;

/// Everything `/metrics` shows: the traffic series and ntm's own metrics.
#[derive(Clone)]
pub struct Exposition {
    registry: Registry,
    traffic: Arc<RwLock<TrafficSeries>>,
}

impl Exposition {
    pub fn new(registry: Registry, traffic: Arc<RwLock<TrafficSeries>>) -> Self {
        Self { registry, traffic }
    }

    /// The Prometheus text exposition format.
    pub fn encode(&self) -> Result<String, prometheus::Error> {
        let mut out = String::new();
        self.traffic
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .encode(&mut out);
        prometheus::TextEncoder::new().encode_utf8(&self.registry.gather(), &mut out)?;
        Ok(out)
    }
}
