//! The Prometheus output: each labelled delta into its series (through
//! the series budget), and the hosts in labels as `<prefix>_host_info`.

use std::time::{Duration, Instant};

use prometheus::IntGaugeVec;

use super::{
    budget::SeriesBudget,
    sink::{Host, LabelledDrain, Sink},
};
use crate::{model::net::format_mac, pipeline::labels::Labeller};

pub struct SeriesSink {
    budget: SeriesBudget,
    labeller: Labeller,
    /// `<prefix>_host_info{address, name, mac, source}`, at most
    /// `max_hosts` hosts (as many as there may be series).
    host_info: IntGaugeVec,
    max_hosts: usize,
    /// The hosts' version `host_info` was last built from.
    hosts_version: Option<u64>,
}

impl SeriesSink {
    pub fn new(
        budget: SeriesBudget,
        labeller: Labeller,
        host_info: IntGaugeVec,
        max_hosts: usize,
    ) -> Self {
        Self {
            budget,
            labeller,
            host_info,
            max_hosts,
            hosts_version: None,
        }
    }
}

impl Sink for SeriesSink {
    fn labelled(&mut self, drain: &LabelledDrain, now: Instant) {
        for flow in &drain.flows {
            let values = self
                .labeller
                .values(&flow.key, &flow.iface, &flow.src, &flow.dst);
            self.budget.add(values, &flow.delta, now);
        }
        for overflow in &drain.overflow {
            self.budget
                .add_overflow(&overflow.iface, &overflow.delta, now);
        }
    }

    fn wants_hosts(&self, version: u64) -> bool {
        self.hosts_version != Some(version)
    }

    fn describe_hosts(&mut self, version: u64, hosts: &[Host<'_>]) {
        self.hosts_version = Some(version);
        self.host_info.reset();
        for host in hosts.iter().take(self.max_hosts) {
            let mac = host.mac.map(format_mac).unwrap_or_default();
            self.host_info
                .with_label_values(&[&host.ip.to_string(), host.label, &mac, host.source])
                .set(1);
        }
    }

    fn expire(&mut self, now: Instant, _ttl: Duration) {
        self.budget.expire(now);
    }
}
