//! The Prometheus output: each labelled delta into its series (through
//! the series budget), and the hosts in labels as `<prefix>_host_info`.

use std::{
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use super::{
    budget::SeriesBudget,
    host_info::{HostInfo, HostRows},
    sink::{Host, LabelledDrain, Sink},
};
use crate::{
    model::sync,
    pipeline::labels::{Labeller, SharedLabels},
};

pub struct SeriesSink {
    budget: SeriesBudget,
    labeller: Labeller,
    /// `<prefix>_host_info`, at most `max_hosts` hosts (as many as there
    /// may be series).
    host_info: Arc<RwLock<HostInfo>>,
    max_hosts: usize,
    /// The hosts' version `host_info` was last built from.
    hosts_version: Option<u64>,
}

impl SeriesSink {
    pub fn new(
        budget: SeriesBudget,
        labeller: Labeller,
        host_info: Arc<RwLock<HostInfo>>,
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
            let values = self.labeller.values(
                &flow.key,
                SharedLabels {
                    iface: &flow.iface,
                    src: &flow.src,
                    dst: &flow.dst,
                    service: &flow.service,
                },
            );
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

    fn describe_hosts(&mut self, version: u64, hosts: &[Host]) {
        self.hosts_version = Some(version);
        // Built and sorted before the lock, the old rows dropped after it:
        // a scrape waits only for the swap.
        let rows = HostRows::new(hosts, self.max_hosts);
        let old = sync::write(&self.host_info).set(rows);
        drop(old);
    }

    fn expire(&mut self, now: Instant, _ttl: Duration) {
        self.budget.expire(now);
    }
}
