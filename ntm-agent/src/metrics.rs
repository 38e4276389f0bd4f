//! Prometheus counters built from drained flow deltas, with a series budget
//! and idle expiry, and ntm's own health metrics.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use ntm_common::{Counters, FlowKey, OutsideReason};
use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

use crate::{
    drain::Drained,
    flows::address,
    labels::{Label, Labeller, wants_hosts},
    names::{HostLabels, NameOptions, Resolver},
    series::TrafficSeries,
};

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("registering metric {name}: {source}")]
    Register {
        name: String,
        #[source]
        source: prometheus::Error,
    },
}

/// Label value of series that stand for traffic beyond the series budget or
/// beyond the kernel's flow table.
pub const OTHER: &str = "other";

pub struct MetricsOptions {
    pub prefix: String,
    pub max_series: usize,
    pub series_ttl: Duration,
    pub flow_table_capacity: u32,
    pub names: NameOptions,
}

/// Flows waiting for their hosts' names, at most this many; beyond it they
/// are exported with addresses at once.
const MAX_WAITING_FLOWS: usize = 100_000;

pub struct Metrics {
    registry: Registry,
    labeller: Labeller,
    options: MetricsOptions,
    traffic: Arc<RwLock<TrafficSeries>>,
    hosts: HostLabels,
    /// Deltas of flows whose host names are not decided yet, with the time
    /// they were first seen.
    waiting: HashMap<FlowKey, (Counters, Instant)>,
    series_gauge: IntGauge,
    series_folded: IntCounter,
    series_expired: IntCounter,
    outside_bytes: IntCounterVec,
    outside_packets: IntCounterVec,
    flow_table_entries: IntGauge,
    drain_seconds: Histogram,
    attached: IntGaugeVec,
    filtered_bytes: IntCounter,
    filtered_packets: IntCounter,
    filter_active: IntGaugeVec,
    filter_reloads: IntCounterVec,
}

fn register<C: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    name: &str,
    collector: C,
) -> Result<C, MetricsError> {
    registry
        .register(Box::new(collector.clone()))
        .map_err(|source| MetricsError::Register {
            name: name.to_string(),
            source,
        })?;
    Ok(collector)
}

impl Metrics {
    pub fn new(options: MetricsOptions, labeller: Labeller) -> Result<Self, MetricsError> {
        let registry = Registry::new();
        let p = &options.prefix;
        let names = labeller.names();
        let name = |suffix: &str| format!("{p}_{suffix}");
        let counter_vec = |suffix: &str, help: &str, labels: &[&str]| {
            let n = name(suffix);
            let c = IntCounterVec::new(Opts::new(n.clone(), help), labels).map_err(|source| {
                MetricsError::Register {
                    name: n.clone(),
                    source,
                }
            })?;
            register(&registry, &n, c)
        };
        let traffic = Arc::new(RwLock::new(TrafficSeries::new(p, names.clone())));
        let outside_bytes = counter_vec(
            "outside_flow_table_bytes_total",
            "Bytes of frames counted outside the flow table, by reason (table_full is also in bytes_total as src=\"other\")",
            &["reason"],
        )?;
        let outside_packets = counter_vec(
            "outside_flow_table_packets_total",
            "Frames counted outside the flow table, by reason",
            &["reason"],
        )?;
        // Every reason from the start: a dashboard shows 0, not "no data".
        // (Filtered frames have counters of their own, below.)
        for reason in OutsideReason::ALL
            .into_iter()
            .filter(|r| *r != OutsideReason::Filtered)
        {
            outside_bytes.with_label_values(&[reason.as_str()]);
            outside_packets.with_label_values(&[reason.as_str()]);
        }
        let gauge = |suffix: &str, help: &str| {
            let n = name(suffix);
            let g = IntGauge::new(n.clone(), help).map_err(|source| MetricsError::Register {
                name: n.clone(),
                source,
            })?;
            register(&registry, &n, g)
        };
        let counter = |suffix: &str, help: &str| {
            let n = name(suffix);
            let c = IntCounter::new(n.clone(), help).map_err(|source| MetricsError::Register {
                name: n.clone(),
                source,
            })?;
            register(&registry, &n, c)
        };
        let series_gauge = gauge("series", "Traffic series exported now")?;
        let filtered_bytes = counter(
            "filtered_bytes_total",
            "Bytes of frames the tcpdump filter did not match (not in bytes_total), counted as bytes_total would",
        )?;
        let filtered_packets = counter(
            "filtered_packets_total",
            "Frames the tcpdump filter did not match (not in packets_total)",
        )?;
        let filter_reloads = counter_vec(
            "filter_reloads_total",
            "Filter changes on SIGHUP, by result (error: the old filter stays)",
            &["result"],
        )?;
        for result in ["ok", "error"] {
            filter_reloads.with_label_values(&[result]);
        }
        let series_folded = counter(
            "series_folded_total",
            "Flow deltas folded into \"other\" series because of --max-series",
        )?;
        let series_expired = counter(
            "series_expired_total",
            "Series dropped after --series-ttl without traffic",
        )?;
        let flow_table_entries = gauge(
            "flow_table_entries",
            "Flows in the kernel table drained last (per interval)",
        )?;
        let capacity = gauge(
            "flow_table_capacity",
            "Flows each kernel table holds before traffic goes to the overflow bucket",
        )?;
        capacity.set(options.flow_table_capacity as i64);
        let drain_n = name("drain_duration_seconds");
        let drain_seconds = Histogram::with_opts(
            HistogramOpts::new(
                drain_n.clone(),
                "Time to swap and read the kernel flow table",
            )
            .buckets(vec![
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
        )
        .map_err(|source| MetricsError::Register {
            name: drain_n.clone(),
            source,
        })?;
        let drain_seconds = register(&registry, &drain_n, drain_seconds)?;
        let attached_n = name("interface_attached");
        let attached = IntGaugeVec::new(
            Opts::new(
                attached_n.clone(),
                "1 while ntm's programs are attached to the interface",
            ),
            &["iface", "mode"],
        )
        .map_err(|source| MetricsError::Register {
            name: attached_n.clone(),
            source,
        })?;
        let attached = register(&registry, &attached_n, attached)?;
        let filter_n = name("filter_active");
        let filter_active = IntGaugeVec::new(
            Opts::new(
                filter_n.clone(),
                "1 for the tcpdump filter in effect (\"\" when every frame is counted)",
            ),
            &["filter"],
        )
        .map_err(|source| MetricsError::Register {
            name: filter_n.clone(),
            source,
        })?;
        let filter_active = register(&registry, &filter_n, filter_active)?;
        let build_n = name("build_info");
        let build = IntGaugeVec::new(Opts::new(build_n.clone(), "ntm's version"), &["version"])
            .map_err(|source| MetricsError::Register {
                name: build_n.clone(),
                source,
            })?;
        let build = register(&registry, &build_n, build)?;
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        let lookups = counter_vec(
            "dns_lookups_total",
            "Reverse DNS lookups for host labels, by result",
            &["result"],
        )?;
        for result in [
            "ok",
            "no_name",
            "server_error",
            "timeout",
            "error",
            "dropped",
        ] {
            lookups.with_label_values(&[result]);
        }
        let resolver = match options.names.server {
            Some(server) if wants_hosts(&labeller.enabled) => {
                Some(Resolver::start(server, &options.names, lookups))
            }
            _ => None,
        };
        let hosts = HostLabels::new(resolver, labeller.local.clone(), &options.names);
        let process = prometheus::process_collector::ProcessCollector::for_self();
        registry
            .register(Box::new(process))
            .map_err(|source| MetricsError::Register {
                name: "process_*".to_string(),
                source,
            })?;

        Ok(Self {
            registry,
            labeller,
            options,
            traffic,
            hosts,
            waiting: HashMap::new(),
            series_gauge,
            series_folded,
            series_expired,
            outside_bytes,
            outside_packets,
            flow_table_entries,
            drain_seconds,
            attached,
            filtered_bytes,
            filtered_packets,
            filter_active,
            filter_reloads,
        })
    }

    /// The filter in effect (None: every frame counted).
    pub fn set_filter(&self, expression: Option<&str>) {
        self.filter_active.reset();
        self.filter_active
            .with_label_values(&[expression.unwrap_or("")])
            .set(1);
    }

    /// One SIGHUP's filter change, done or refused.
    pub fn filter_reloaded(&self, ok: bool) {
        self.filter_reloads
            .with_label_values(&[if ok { "ok" } else { "error" }])
            .inc();
    }

    /// What the HTTP endpoint encodes.
    pub fn exposition(&self) -> Exposition {
        Exposition {
            registry: self.registry.clone(),
            traffic: Arc::clone(&self.traffic),
        }
    }

    pub fn set_attached(&self, iface: &str, mode: &str, attached: bool) {
        self.attached
            .with_label_values(&[iface, mode])
            .set(attached as i64);
    }

    /// Adds one drain's deltas; `ifname` names interfaces by index.
    pub fn record(&mut self, drained: &Drained, ifname: impl Fn(u32) -> String, now: Instant) {
        self.drain_seconds
            .observe((drained.swap_time + drained.read_time).as_secs_f64());
        self.flow_table_entries.set(drained.flows.len() as i64);
        for (key, delta) in &drained.flows {
            self.waiting
                .entry(*key)
                .and_modify(|(c, _)| c.add(delta))
                .or_insert((*delta, now));
        }
        let overfull = self.waiting.len() > MAX_WAITING_FLOWS;
        let mut still_waiting = HashMap::new();
        for (key, (delta, first_seen)) in std::mem::take(&mut self.waiting) {
            // Too many waiting: decide now (addresses where no name is known).
            let seen = if overfull {
                now - self.hosts_wait()
            } else {
                first_seen
            };
            let Some((src, dst)) = self.host_labels(&key, seen, now) else {
                still_waiting.insert(key, (delta, first_seen));
                continue;
            };
            let values = self.labeller.values(&key, &ifname(key.ifindex), &src, &dst);
            self.add(values, delta.bytes, delta.packets, now);
        }
        self.waiting = still_waiting;
        for reason in OutsideReason::ALL {
            let delta = drained.outside[reason as usize];
            if delta.packets == 0 && delta.bytes == 0 {
                continue;
            }
            if reason == OutsideReason::Filtered {
                self.filtered_bytes.inc_by(delta.bytes);
                self.filtered_packets.inc_by(delta.packets);
                continue;
            }
            self.outside_bytes
                .with_label_values(&[reason.as_str()])
                .inc_by(delta.bytes);
            self.outside_packets
                .with_label_values(&[reason.as_str()])
                .inc_by(delta.packets);
            // Traffic that found no room in the flow table is still traffic:
            // it goes into the main counters, labelled "other", so that their
            // totals add up.
            if matches!(
                reason,
                OutsideReason::TableFull
                    | OutsideReason::InsertFailed
                    | OutsideReason::NoActiveTable
            ) {
                let values = self
                    .labeller
                    .enabled
                    .iter()
                    .map(|_| OTHER.to_string())
                    .collect();
                self.add_unbudgeted(values, delta.bytes, delta.packets, now);
            }
        }
        self.series_gauge.set(self.series_count() as i64);
    }

    fn hosts_wait(&self) -> Duration {
        self.options.names.wait
    }

    /// (src, dst) labels, or None while a name is still awaited.
    fn host_labels(
        &mut self,
        key: &FlowKey,
        first_seen: Instant,
        now: Instant,
    ) -> Option<(String, String)> {
        if !wants_hosts(&self.labeller.enabled) {
            return Some((String::new(), String::new()));
        }
        match (address(key, true), address(key, false)) {
            (Some(src), Some(dst)) => {
                let src = self.hosts.label(src, first_seen, now);
                let dst = self.hosts.label(dst, first_seen, now);
                Some((src?, dst?))
            }
            // Non-IP frames have no hosts.
            _ => Some((String::new(), String::new())),
        }
    }

    /// Flows waiting for names right now (for tests and self-checks).
    pub fn waiting_flows(&self) -> usize {
        self.waiting.len()
    }

    fn add(&mut self, values: Vec<String>, bytes: u64, packets: u64, now: Instant) {
        let over_budget = {
            let traffic = self.traffic.read().unwrap_or_else(|e| e.into_inner());
            !traffic.contains(&values) && traffic.len() >= self.options.max_series
        };
        if over_budget {
            self.series_folded.inc();
            let folded = self.fold(values);
            self.add_unbudgeted(folded, bytes, packets, now);
            return;
        }
        self.add_unbudgeted(values, bytes, packets, now);
    }

    /// Beyond the budget: hosts and service become "other"; protocol,
    /// direction and interface (a handful of values each) are kept.
    fn fold(&self, mut values: Vec<String>) -> Vec<String> {
        for (value, label) in values.iter_mut().zip(&self.labeller.enabled) {
            if matches!(label, Label::Src | Label::Dst | Label::Service) {
                *value = OTHER.to_string();
            }
        }
        values
    }

    fn add_unbudgeted(&mut self, values: Vec<String>, bytes: u64, packets: u64, now: Instant) {
        self.traffic
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .add(&values, bytes, packets, now);
    }

    /// Drops series without traffic for longer than the TTL.
    pub fn expire(&mut self, now: Instant) {
        let ttl = self.options.series_ttl;
        let removed = self
            .traffic
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .expire(now, ttl);
        self.series_expired.inc_by(removed as u64);
        self.hosts.expire(now, ttl);
        self.series_gauge.set(self.series_count() as i64);
    }

    pub fn series_count(&self) -> usize {
        self.traffic.read().map(|t| t.len()).unwrap_or(0)
    }
}

/// Everything `/metrics` shows: the traffic series and ntm's own metrics.
#[derive(Clone)]
pub struct Exposition {
    registry: Registry,
    traffic: Arc<RwLock<TrafficSeries>>,
}

impl Exposition {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        labels::{Cidr, LocalNets},
        services::ServiceRegistry,
    };
    use ntm_common::family;

    fn metrics(max_series: usize, ttl: Duration, labels: Vec<Label>) -> Metrics {
        let labeller = Labeller {
            services: ServiceRegistry::parse("https 443/tcp\n"),
            local: LocalNets(vec!["192.168.0.0/16".parse::<Cidr>().unwrap()]),
            enabled: labels,
        };
        Metrics::new(
            MetricsOptions {
                prefix: "ntm".into(),
                max_series,
                series_ttl: ttl,
                flow_table_capacity: 1024,
                names: NameOptions {
                    server: None,
                    timeout: Duration::from_secs(1),
                    workers: 1,
                    queue: 16,
                    fqdn: false,
                    wait: Duration::from_secs(2),
                },
            },
            labeller,
        )
        .unwrap()
    }

    fn flow(src: [u8; 4], dst: [u8; 4], port: u16) -> FlowKey {
        let mut k = FlowKey {
            family: family::IPV4,
            proto: 6,
            port,
            ifindex: 2,
            ..Default::default()
        };
        k.src[..4].copy_from_slice(&src);
        k.dst[..4].copy_from_slice(&dst);
        k
    }

    fn drained(flows: Vec<(FlowKey, u64)>) -> Drained {
        Drained {
            flows: flows
                .into_iter()
                .map(|(k, b)| {
                    (
                        k,
                        Counters {
                            bytes: b,
                            packets: 1,
                        },
                    )
                })
                .collect(),
            ..Default::default()
        }
    }

    fn total(m: &Metrics) -> u64 {
        let text = m.exposition().encode().unwrap();
        text.lines()
            .filter(|l| l.starts_with("ntm_bytes_total{"))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum()
    }

    #[test]
    fn labels_in_the_exposition() {
        let mut m = metrics(100, Duration::from_secs(60), Label::DEFAULT.to_vec());
        let d = drained(vec![(
            flow([192, 168, 1, 2], [93, 184, 216, 34], 443),
            1500,
        )]);
        m.record(&d, |_| "eth0".into(), Instant::now());
        let text = m.exposition().encode().unwrap();
        assert!(
            text.contains(r#"ntm_bytes_total{direction="outbound",dst="93.184.216.34",iface="eth0",proto="tcp",service="https",src="192.168.1.2"} 1500"#),
            "{text}"
        );
        assert!(text.contains("ntm_build_info{version="), "{text}");
        assert!(text.contains("ntm_flow_table_capacity 1024"), "{text}");
    }

    #[test]
    fn dropped_labels_are_summed_over() {
        let mut m = metrics(
            100,
            Duration::from_secs(60),
            vec![Label::Service, Label::Direction],
        );
        let d = drained(vec![
            (flow([192, 168, 1, 2], [8, 8, 8, 8], 443), 100),
            (flow([192, 168, 1, 3], [1, 1, 1, 1], 443), 50),
        ]);
        m.record(&d, |_| "eth0".into(), Instant::now());
        let text = m.exposition().encode().unwrap();
        assert!(
            text.contains(r#"ntm_bytes_total{direction="outbound",service="https"} 150"#),
            "{text}"
        );
        assert_eq!(m.series_count(), 1);
    }

    #[test]
    fn budget_folds_into_other_and_totals_still_add_up() {
        let mut m = metrics(3, Duration::from_secs(60), Label::DEFAULT.to_vec());
        let flows = (1..=10u8)
            .map(|i| (flow([192, 168, 1, i], [8, 8, 8, 8], 443), 10 * i as u64))
            .collect();
        m.record(&drained(flows), |_| "eth0".into(), Instant::now());
        assert_eq!(total(&m), (1..=10u64).map(|i| 10 * i).sum::<u64>());
        let text = m.exposition().encode().unwrap();
        assert!(text.contains(r#"src="other""#), "{text}");
        assert!(text.contains("ntm_series_folded_total 7"), "{text}");
        // 3 budgeted series plus one folded series.
        assert_eq!(m.series_count(), 4);
    }

    #[test]
    fn idle_series_expire_and_counting_goes_on() {
        let mut m = metrics(100, Duration::from_secs(10), Label::DEFAULT.to_vec());
        let start = Instant::now();
        let a = flow([192, 168, 1, 2], [8, 8, 8, 8], 443);
        let b = flow([192, 168, 1, 3], [8, 8, 8, 8], 443);
        m.record(&drained(vec![(a, 5), (b, 7)]), |_| "eth0".into(), start);
        m.record(
            &drained(vec![(a, 5)]),
            |_| "eth0".into(),
            start + Duration::from_secs(8),
        );
        m.expire(start + Duration::from_secs(15));
        assert_eq!(m.series_count(), 1);
        assert_eq!(total(&m), 10, "the live series keeps its count");
        let text = m.exposition().encode().unwrap();
        assert!(!text.contains(r#"src="192.168.1.3""#), "{text}");
        assert!(text.contains("ntm_series_expired_total 1"), "{text}");
    }

    #[test]
    fn overflow_counts_in_the_main_counters_as_other() {
        let mut m = metrics(100, Duration::from_secs(60), Label::DEFAULT.to_vec());
        let mut d = drained(vec![(flow([192, 168, 1, 2], [8, 8, 8, 8], 443), 100)]);
        d.outside[OutsideReason::TableFull as usize] = Counters {
            bytes: 900,
            packets: 9,
        };
        d.outside[OutsideReason::MalformedIpv4 as usize] = Counters {
            bytes: 60,
            packets: 1,
        };
        m.record(&d, |_| "eth0".into(), Instant::now());
        assert_eq!(total(&m), 1000);
        let text = m.exposition().encode().unwrap();
        assert!(
            text.contains(r#"ntm_outside_flow_table_packets_total{reason="malformed_ipv4"} 1"#),
            "{text}"
        );
    }
}
