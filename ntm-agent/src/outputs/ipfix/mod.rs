//! Flow export over IPFIX (RFC 7011), into the collectors people run
//! already (nfdump, pmacct, GoFlow2, Akvorado, ...): every flow, by its
//! addresses, from the kernel's raw deltas (before names, the name wait
//! and the series budget: a collector wants every flow, and no delay).
//!
//! `IpfixSink` adds up each flow key's deltas over `--ipfix-interval` and
//! hands one record per key to each collector's thread
//! (`collector.rs`), which encodes (`encode.rs`) and sends them. The drain
//! only adds to a bounded table and, once an interval, queues a batch.

pub mod collector;
pub mod encode;

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use ntm_common::{Counters, FlowKey, OutsideReason};
use prometheus::IntCounterVec;

use self::{
    collector::{Collector, CollectorSpec, ExportSettings, unix_seconds},
    encode::{FlowRecord, OutsideRecord},
};
use super::sink::Sink;
use crate::kernel::drain::{Drained, Outside};

/// Flow keys one interval holds at most; a table this full is exported at
/// once (its records are still exact deltas, over a shorter interval).
pub const MAX_KEYS: usize = 1 << 20;

/// What `--ipfix-*` asks for.
#[derive(Clone, Debug)]
pub struct IpfixOptions {
    pub collectors: Vec<CollectorSpec>,
    pub interval: Duration,
    pub settings: ExportSettings,
}

/// One interval's records for every collector, with the interfaces' names.
pub struct Batch {
    pub records: Vec<FlowRecord>,
    /// What was counted outside the flow table.
    pub outside: Vec<OutsideRecord>,
    pub names: Arc<HashMap<u32, String>>,
    /// Unix seconds (the messages' export time).
    pub export_time: u32,
}

/// A flow key's counts in this interval, and when they came.
struct Sum {
    counts: Counters,
    start_ms: u64,
    end_ms: u64,
}

pub struct IpfixSink {
    interval: Duration,
    next_export: Instant,
    /// A fast hasher with a seed of its own per table (flow keys come
    /// from the network: no fixed seed an attacker could aim at).
    sums: HashMap<FlowKey, Sum, foldhash::fast::RandomState>,
    /// Counts outside the flow table (bounded by interfaces, hooks and
    /// reasons).
    outside: HashMap<Outside, Sum>,
    /// When the last drain was (a flow's first counts came after it).
    last_drain_ms: Option<u64>,
    names: Arc<HashMap<u32, String>>,
    collectors: Vec<Collector>,
}

impl IpfixSink {
    pub fn start(options: &IpfixOptions, records: IntCounterVec, now: Instant) -> Self {
        Self {
            interval: options.interval,
            next_export: now + options.interval,
            sums: HashMap::default(),
            outside: HashMap::new(),
            last_drain_ms: None,
            names: Arc::default(),
            collectors: options
                .collectors
                .iter()
                .map(|spec| Collector::start(spec.clone(), options.settings, records.clone()))
                .collect(),
        }
    }

    /// Hands this interval's records to every collector.
    fn export(&mut self) {
        if self.sums.is_empty() && self.outside.is_empty() {
            return;
        }
        let records: Vec<FlowRecord> = self
            .sums
            .drain()
            .map(|(key, sum)| FlowRecord {
                key,
                counts: sum.counts,
                start_ms: sum.start_ms,
                end_ms: sum.end_ms,
            })
            .collect();
        let outside = self
            .outside
            .drain()
            .map(|(at, sum)| OutsideRecord {
                ifindex: at.ifindex,
                hook: at.hook,
                what: format!("ntm:{}", at.reason.as_str()),
                counts: sum.counts,
                start_ms: sum.start_ms,
                end_ms: sum.end_ms,
            })
            .collect();
        let batch = Arc::new(Batch {
            records,
            outside,
            names: Arc::clone(&self.names),
            export_time: unix_seconds(),
        });
        for collector in &self.collectors {
            collector.send(Arc::clone(&batch));
        }
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Sink for IpfixSink {
    fn raw(&mut self, drained: &Drained, ifaces: &HashMap<u32, String>, now: Instant) {
        let now_ms = unix_ms();
        let since = self.last_drain_ms.unwrap_or(now_ms);
        self.last_drain_ms = Some(now_ms);
        if *self.names != *ifaces {
            self.names = Arc::new(ifaces.clone());
        }
        // Grown once per drain, not by doubling as keys come.
        let room = MAX_KEYS.saturating_sub(self.sums.len());
        self.sums.reserve(drained.flows.len().min(room));
        for (key, delta) in &drained.flows {
            if self.sums.len() >= MAX_KEYS && !self.sums.contains_key(key) {
                self.export();
            }
            let sum = self.sums.entry(*key).or_insert(Sum {
                counts: Counters::default(),
                start_ms: since,
                end_ms: now_ms,
            });
            sum.counts.add(delta);
            sum.end_ms = now_ms;
        }
        // What ntm counted outside the flow table, but what the filter
        // left out: it is in no total of ntm's.
        for (at, delta) in drained.outside.iter() {
            if at.reason == OutsideReason::Filtered {
                continue;
            }
            let sum = self.outside.entry(*at).or_insert(Sum {
                counts: Counters::default(),
                start_ms: since,
                end_ms: now_ms,
            });
            sum.counts.add(delta);
            sum.end_ms = now_ms;
        }
        if now >= self.next_export {
            self.export();
            self.next_export = now + self.interval;
        }
    }

    /// Sends what this interval holds and what is queued (SIGTERM).
    fn finish(&mut self) {
        self.export();
        for collector in self.collectors.drain(..) {
            collector.stop();
        }
    }
}
