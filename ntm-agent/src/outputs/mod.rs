//! The outputs: what a drain's labelled deltas become.
//!
//! - [`sink`]: the one interface every output receives a drain's deltas
//!   through;
//! - [`series_sink`], [`budget`] and [`series`]: the Prometheus traffic
//!   series: at most `--max-series`, the rest folded into `other`, idle
//!   ones expired; the compact series store and its text encoder;
//!   [`host_info`]: the hosts in labels as `<prefix>_host_info`; [`text`]:
//!   the text format both are written in; [`Exposition`] is what
//!   `/metrics` shows;
//! - [`live`]: what the page and the JSON API show now, per device,
//!   server, service and interface;
//! - [`history`]: the same counts per minute, hour and day in SQLite,
//!   across restarts;
//! - [`tcp_health`]: how TCP connections fare (retransmissions), by
//!   client, server and service.

pub mod budget;
pub mod history;
pub mod host_info;
pub mod ipfix;
pub mod live;
pub mod live_health;
pub mod series;
pub mod series_sink;
pub mod sink;
pub mod tcp_health;
pub mod text;

use std::sync::{
    Arc, RwLock,
    atomic::{AtomicUsize, Ordering},
};

use prometheus::Registry;

use self::{host_info::HostInfo, series::TrafficSeries};
use crate::model::sync;

/// Everything `/metrics` shows: the traffic series, `<prefix>_host_info`
/// and ntm's own metrics.
#[derive(Clone)]
pub struct Exposition {
    registry: Registry,
    traffic: Arc<RwLock<TrafficSeries>>,
    host_info: Arc<RwLock<HostInfo>>,
    /// The last body's length: the next one is about as long, and is given
    /// its room at once rather than by doubling (a 32 MB body grew into a
    /// 64 MiB buffer).
    last_len: Arc<AtomicUsize>,
}

impl Exposition {
    pub fn new(
        registry: Registry,
        traffic: Arc<RwLock<TrafficSeries>>,
        host_info: Arc<RwLock<HostInfo>>,
    ) -> Self {
        Self {
            registry,
            traffic,
            host_info,
            last_len: Arc::default(),
        }
    }

    /// The Prometheus text exposition format: the traffic series, then
    /// every other family in name order, `host_info` among them where the
    /// `prometheus` crate would put it (as it did when it wrote it).
    pub fn encode(&self) -> Result<String, prometheus::Error> {
        let families = self.registry.gather();
        let last = self.last_len.load(Ordering::Relaxed);
        let mut out = String::with_capacity(last + last / 16);
        sync::read(&self.traffic).encode(&mut out);
        let host_info = sync::read(&self.host_info);
        let before = families.partition_point(|family| family.name() < host_info.name());
        let encoder = prometheus::TextEncoder::new();
        encoder.encode_utf8(&families[..before], &mut out)?;
        host_info.encode(&mut out);
        drop(host_info);
        encoder.encode_utf8(&families[before..], &mut out)?;
        self.last_len.store(out.len(), Ordering::Relaxed);
        Ok(out)
    }
}
