//! The outputs: what a drain's labelled deltas become.
//!
//! - [`sink`]: the one interface every output receives a drain's deltas
//!   through;
//! - [`series_sink`], [`budget`] and [`series`]: the Prometheus traffic
//!   series: at most `--max-series`, the rest folded into `other`, idle
//!   ones expired; the compact series store and its text encoder; the hosts
//!   in labels as `<prefix>_host_info`; [`Exposition`] is what `/metrics`
//!   shows;
//! - [`live`]: what the page and the JSON API show now, per device,
//!   server, service and interface;
//! - [`history`]: the same counts per minute, hour and day in SQLite,
//!   across restarts.

pub mod budget;
pub mod history;
pub mod ipfix;
pub mod live;
pub mod series;
pub mod series_sink;
pub mod sink;

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
        crate::model::sync::read(&self.traffic).encode(&mut out);
        prometheus::TextEncoder::new().encode_utf8(&self.registry.gather(), &mut out)?;
        Ok(out)
    }
}
