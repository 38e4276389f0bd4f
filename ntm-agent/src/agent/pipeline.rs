//! The one place where the stages and the outputs are wired: a drain's
//! flow deltas go through them in this order.
//!
//! ```text
//! Drained (kernel::drain)
//!   -> self-metrics of the drain (outside the table, filtered, timing)
//!   -> every sink's raw deltas (outputs that need no names)
//!   -> pending: new flows wait for their hosts' names (names::HostLabels)
//!   -> labels: interface, service, host labels
//!   -> every sink's labelled deltas:
//!        series: the series budget (at most --max-series, the rest folded
//!                into "other") and the store /metrics encodes, host_info
//!        live: per device, server, service and interface (its own
//!              bounds): what the API and the page show now
//!        history: the same shares per minute, hour and day, in SQLite
//! ```

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use ntm_common::OutsideReason;

use crate::{
    config::PipelineOptions,
    health::{
        attached::Health,
        coverage::Coverage,
        self_metrics::{MetricsError, NameTable, SelfMetrics},
        status::DrainStatus,
    },
    kernel::{Hooked, drain::Drained, iface_label, observe::ObservedFrame},
    model::{
        net::{LocalNets, Mac},
        sync,
    },
    names::{HostLabels, NameMetrics, wire::WireReader},
    outputs::{
        Exposition,
        budget::SeriesBudget,
        history::{self, History, HistoryReader, sink::HistorySink},
        host_info::HostInfo,
        ipfix::IpfixSink,
        live::{LiveSink, LiveTraffic},
        live_health::{LiveHealth, LiveHealthSink},
        series::TrafficSeries,
        series_sink::SeriesSink,
        sink::{
            Host, LabelledConnectionCount, LabelledDrain, LabelledFlow, LabelledHandshake,
            Overflow, Sink,
        },
        tcp_health::TcpHealthSink,
    },
    pipeline::{
        labels::{Labeller, service_name},
        pending::PendingFlows,
        services::ServiceRegistry,
    },
    web::api::Api,
};

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error("history: {0}")]
    History(#[from] crate::outputs::history::store::StoreError),
    #[error("TCP health metrics: {0}")]
    TcpHealth(#[from] prometheus::Error),
}

/// One drain's interface and service labels, each text once: a drain's
/// flows share a handful of them.
#[derive(Default)]
struct SharedText(HashSet<Arc<str>>);

impl SharedText {
    fn get(&mut self, text: String) -> Arc<str> {
        if let Some(shared) = self.0.get(text.as_str()) {
            return Arc::clone(shared);
        }
        let shared: Arc<str> = Arc::from(text);
        self.0.insert(Arc::clone(&shared));
        shared
    }
}

/// Reads the neighbour table (IP address to MAC); None when it could not.
pub type NeighbourSource = Box<dyn FnMut() -> Option<Vec<(IpAddr, Mac)>> + Send>;

/// How old the neighbour table may be when a new address is named.
const NEIGHBOURS_FRESH: Duration = Duration::from_secs(1);

pub struct Pipeline {
    metrics: SelfMetrics,
    neighbours: Option<NeighbourSource>,
    neighbours_read: Option<Instant>,
    pending: PendingFlows,
    hosts: HostLabels,
    /// Reads the DNS and DHCP frames the kernel hands over (and keeps DNS
    /// responses over TCP that span segments until they are whole).
    wire: WireReader,
    labeller: Labeller,
    coverage: Coverage,
    /// The outputs, each fed every drain's deltas.
    sinks: Vec<Box<dyn Sink>>,
    series_ttl: Duration,
    /// What the web reads.
    exposition: Exposition,
    live: Arc<RwLock<LiveTraffic>>,
    /// TCP connection health per device and server, for the API.
    connections: Arc<RwLock<LiveHealth>>,
    history: HistoryReader,
    status: Arc<Mutex<DrainStatus>>,
    /// The local networks every stage judges by (the agent updates them).
    local: LocalNets,
    /// First port of the client ephemeral range (the service-port rule).
    ephemeral_start: u16,
}

/// A handshake's connection as the flow its client sends: from the
/// client (the SYN's sender) to the server, keyed by the port the SYN went
/// to.
fn handshake_flow(handshake: &ntm_common::handshake::HandshakeKey) -> ntm_common::FlowKey {
    ntm_common::FlowKey {
        src: handshake.client,
        dst: handshake.server,
        port: handshake.server_port,
        family: handshake.family,
        proto: ntm_common::ipproto::TCP,
        ..Default::default()
    }
}

/// A retransmitting connection as the flow its client sends: from the
/// client to the server, keyed by the service port (the side the
/// service-port rule picks is the server), so that it is named and its
/// service shown as that flow's are.
fn retransmit_flow(
    connection: &ntm_common::RetransmitKey,
    ephemeral_start: u16,
    services: &crate::pipeline::services::ServiceRegistry,
) -> ntm_common::FlowKey {
    use ntm_common::{ipproto, service_port::PortClass};
    let (local, remote) = (connection.local_port, connection.remote_port);
    let port = ntm_common::service_port::choose(local, remote, ephemeral_start, |p| {
        services.name(PortClass::Tcp, p).is_some()
    });
    let local_serves = port != 0 && port == local && port != remote;
    let (client, server) = if local_serves {
        (connection.remote, connection.local)
    } else {
        (connection.local, connection.remote)
    };
    ntm_common::FlowKey {
        src: client,
        dst: server,
        port,
        family: connection.family,
        proto: ipproto::TCP,
        ..Default::default()
    }
}

impl Pipeline {
    /// Builds every stage and output (and starts the name sources' and the
    /// history's threads).
    pub fn new(options: PipelineOptions, services: ServiceRegistry) -> Result<Self, PipelineError> {
        let metrics = SelfMetrics::new(&options.prefix, options.flow_table_capacity)?;
        let labeller = Labeller {
            services,
            local: options.local.clone(),
            enabled: options.labels.clone(),
        };
        let hosts = HostLabels::start(
            labeller.wants_hosts(),
            options.local.clone(),
            &options.names,
            NameMetrics {
                lookups: metrics.dns_lookups.clone(),
                by_source: metrics.names.clone(),
                kubernetes: metrics.kubernetes.clone(),
            },
        );
        let coverage = Coverage::new(metrics.coverage.clone());

        // The outputs.
        let series = Arc::new(RwLock::new(TrafficSeries::new(
            &options.prefix,
            labeller.names(),
        )));
        let budget = SeriesBudget::new(
            Arc::clone(&series),
            options.labels,
            options.max_series,
            options.series_ttl,
            (
                metrics.series.clone(),
                metrics.series_folded.clone(),
                metrics.series_expired.clone(),
            ),
        );
        let host_info = Arc::new(RwLock::new(HostInfo::new(&options.prefix)));
        let exposition =
            Exposition::new(metrics.registry().clone(), series, Arc::clone(&host_info));
        let live = Arc::new(RwLock::new(LiveTraffic::new(
            options.local.clone(),
            options.drain_interval.max(Duration::from_secs(1)),
            Instant::now(),
        )));
        let history = History::start(
            &options.history,
            metrics.history.clone(),
            history::local_day_start,
        )?;
        let history_reader = history.reader();
        let sinks: Vec<Box<dyn Sink>> = vec![
            Box::new(SeriesSink::new(
                budget,
                labeller.clone(),
                host_info,
                options.max_series,
            )),
            Box::new(LiveSink::new(Arc::clone(&live))),
            Box::new(HistorySink::new(history, options.local.clone())),
        ];
        let mut sinks = sinks;
        sinks.push(Box::new(TcpHealthSink::new(
            metrics.registry(),
            &options.prefix,
            options.max_series,
        )?));
        let connections = Arc::new(RwLock::new(LiveHealth::new(Instant::now())));
        sinks.push(Box::new(LiveHealthSink::new(Arc::clone(&connections))));
        if let Some(ipfix) = &options.ipfix {
            sinks.push(Box::new(IpfixSink::start(
                ipfix,
                metrics.ipfix_records.clone(),
                Instant::now(),
            )));
        }
        let local = options.local.clone();

        // What is configured, from the start: the API's status is asked for
        // before the first drain too.
        let status = DrainStatus {
            max_series: options.max_series,
            flow_table_capacity: options.flow_table_capacity,
            ..Default::default()
        };
        Ok(Self {
            metrics,
            neighbours: None,
            neighbours_read: None,
            pending: PendingFlows::default(),
            hosts,
            wire: WireReader::default(),
            labeller,
            coverage,
            sinks,
            series_ttl: options.series_ttl,
            exposition,
            live,
            connections,
            history: history_reader,
            status: Arc::new(Mutex::new(status)),
            local,
            ephemeral_start: options.ephemeral_start,
        })
    }

    /// Where the MACs learnt from frames come from (the agent: the
    /// kernel's table), for names by MAC address.
    pub fn look_up_macs_with(&mut self, lookup: crate::names::MacLookup) {
        self.hosts.look_up_macs_with(lookup);
    }

    /// Where the neighbour table comes from (the agent: rtnetlink), for
    /// names by MAC address.
    pub fn read_neighbours_with(&mut self, source: NeighbourSource) {
        self.neighbours = Some(source);
    }

    /// A DNS or DHCP frame the kernel handed over: what it says about
    /// names is kept for the flows to come.
    pub fn observe(&mut self, frame: &ObservedFrame<'_>, now: Instant) {
        use crate::{
            health::self_metrics::{ObservedResult, protocol_label},
            names::wire,
        };
        let result = match self.wire.facts(frame, now) {
            Ok(facts) => {
                for fact in &facts {
                    self.hosts.learn(fact, now);
                }
                ObservedResult::Parsed
            }
            Err(wire::WireError::Truncated(_)) => ObservedResult::Truncated,
            Err(e) => {
                // Hostile input: at debug level only, so that a flood of
                // garbage cannot flood the log; the counter says it.
                log::debug!("a {} message: {e}", protocol_label(frame.kind));
                ObservedResult::Malformed
            }
        };
        self.metrics
            .observed_messages
            .with_label_values(&[protocol_label(frame.kind), result.as_str()])
            .inc();
    }

    /// What the kernel could not hand over, and the sizes of the name
    /// tables (once per drain).
    pub fn record_observer(&self, drops: Option<&crate::kernel::observe::Drops>) {
        if let Some(drops) = drops {
            self.metrics.record_observe_drops(drops);
        }
        let sizes = self.hosts.table_sizes();
        let gauge = &self.metrics.observed_names;
        for (table, size) in [
            (NameTable::Answers, sizes.answers),
            (NameTable::Clients, sizes.clients),
            (NameTable::Leases, sizes.leases),
            (NameTable::Containers, sizes.containers),
            (NameTable::Pods, sizes.pods),
        ] {
            gauge.with_label_values(&[table.as_str()]).set(size as i64);
        }
    }

    /// One drain's deltas through every stage and output. `iface_labels`
    /// names the interfaces by index (see `Kernel::interface_labels`).
    pub fn process(
        &mut self,
        drained: &Drained,
        iface_labels: &HashMap<u32, String>,
        now: Instant,
    ) {
        self.metrics.record_drain(drained, iface_labels);
        for sink in &mut self.sinks {
            sink.raw(drained, iface_labels, now);
        }
        // The name files that changed are read again (a stat each).
        self.hosts.refresh();
        self.pending.add(&drained.flows, now);
        // New flows may bring new addresses, named by their MAC: read the
        // neighbour table first (at most once a second).
        let stale = self
            .neighbours_read
            .is_none_or(|read| now.duration_since(read) >= NEIGHBOURS_FRESH);
        if stale
            && !self.pending.is_empty()
            && self.hosts.wants_neighbours()
            && let Some(read) = self.neighbours.as_mut()
        {
            if let Some(entries) = read() {
                self.hosts.set_neighbours(entries);
            }
            self.neighbours_read = Some(now);
        }
        // Room for every waiting flow at once: a drain of 100k flows grew
        // this by doubling, and glibc kept the halves it let go.
        let mut labelled = LabelledDrain {
            flows: Vec::with_capacity(self.pending.len()),
            overflow: Vec::new(),
            retransmits: Vec::new(),
            handshakes: Vec::new(),
            syn_retries: Vec::new(),
        };
        let Self {
            pending,
            hosts,
            labeller,
            ..
        } = self;
        let wait = hosts.wait();
        let mut shared = SharedText::default();
        pending.release(
            now,
            wait,
            |key, first_seen| hosts.flow_labels(key, first_seen, now),
            |key, (src, dst), delta| {
                labelled.flows.push(LabelledFlow {
                    key: *key,
                    iface: shared.get(iface_label(iface_labels, key.ifindex)),
                    src,
                    dst,
                    service: shared.get(service_name(key, &labeller.services)),
                    delta: *delta,
                });
            },
        );
        // Retransmitting connections and handshakes, named now: as their
        // traffic's flow, whose labels are kept once decided; a connection
        // whose names are still awaited (its flow waits for a reverse
        // lookup, or for its client's handshake, which follows the one just
        // seen) shows addresses, and decides nothing for its traffic.
        // A connection's labels: its client and server as its traffic's,
        // its service.
        let mut labels_of = |key: &ntm_common::FlowKey| {
            let (client, server) = match hosts.flow_labels(key, now, now) {
                Some((client, server)) if !client.is_empty() => (client, server),
                _ => (
                    Arc::from(key.src_addr().map(|a| a.to_string()).unwrap_or_default()),
                    Arc::from(key.dst_addr().map(|a| a.to_string()).unwrap_or_default()),
                ),
            };
            (
                client,
                server,
                shared.get(service_name(key, &labeller.services)),
            )
        };
        let count = |(client, server, service), count| LabelledConnectionCount {
            client,
            server,
            service,
            count,
        };
        for (handshake, outcome) in &drained.handshakes.ended {
            let (client, server, service) = labels_of(&handshake_flow(handshake));
            labelled.handshakes.push(LabelledHandshake {
                client,
                server,
                service,
                outcome: *outcome,
            });
        }
        for (handshake, retries) in &drained.handshakes.syn_retries {
            let labels = labels_of(&handshake_flow(handshake));
            labelled.syn_retries.push(count(labels, *retries));
        }
        for (connection, segments) in &drained.retransmits.connections {
            let key = retransmit_flow(connection, self.ephemeral_start, &labeller.services);
            labelled.retransmits.push(count(labels_of(&key), *segments));
        }
        // Retransmits of connections the kernel's table had no room for:
        // still this host's, in the series whose labels are all "other".
        if drained.retransmits.no_room != 0 {
            let other = shared.get("other".to_string());
            labelled.retransmits.push(LabelledConnectionCount {
                client: Arc::clone(&other),
                server: Arc::clone(&other),
                service: other,
                count: drained.retransmits.no_room,
            });
        }
        // Traffic that found no room in the flow table is still traffic: it
        // goes into the main counters of its interface, every other label
        // "other" (its addresses, and so its direction, are not kept), so
        // that per-interface totals add up.
        let mut overflow = ntm_common::Counters::default();
        for (at, delta) in drained.outside.iter() {
            if matches!(
                at.reason,
                OutsideReason::TableFull
                    | OutsideReason::InsertFailed
                    | OutsideReason::NoActiveTable
            ) {
                labelled.overflow.push(Overflow {
                    iface: iface_label(iface_labels, at.ifindex),
                    hook: at.hook,
                    delta: *delta,
                });
                overflow.add(delta);
            }
        }
        for sink in &mut self.sinks {
            sink.labelled(&labelled, now);
        }
        {
            let mut status = sync::lock(&self.status);
            status.overflow.add(&overflow);
            status.series = self.series_count();
            status.series_folded = self.metrics.series_folded.get();
            status.waiting_flows = self.pending.len();
            status.drains += 1;
            status.last_drain = Some(std::time::SystemTime::now());
        }
        self.describe_hosts();
    }

    /// The self-check of one drain: what it counted per attached interface
    /// and hook next to the kernel's statistics read with it.
    pub fn check_coverage(&mut self, drained: &Drained, hooked: &[Hooked], now: Instant) {
        self.coverage.record(drained, hooked, now);
    }

    /// The hosts in labels, to the sinks that want them again.
    fn describe_hosts(&mut self) {
        let version = self.hosts.hosts_version();
        if !self.sinks.iter().any(|sink| sink.wants_hosts(version)) {
            return;
        }
        let hosts: Vec<Host> = self
            .hosts
            .hosts()
            .map(|(ip, label, source, mac)| Host {
                ip,
                label: Arc::clone(label),
                source: source.as_str(),
                mac,
            })
            .collect();
        for sink in &mut self.sinks {
            if sink.wants_hosts(version) {
                sink.describe_hosts(version, &hosts);
            }
        }
    }

    /// Drops idle series, and the host labels only they used.
    pub fn expire(&mut self, now: Instant) {
        for sink in &mut self.sinks {
            sink.expire(now, self.series_ttl);
        }
        self.hosts.expire(now, self.series_ttl);
    }

    pub fn metrics(&self) -> &SelfMetrics {
        &self.metrics
    }

    /// What the HTTP endpoint encodes.
    pub fn exposition(&self) -> Exposition {
        self.exposition.clone()
    }

    /// What the JSON API reads: the live view, the history, the pipeline's
    /// status, and `health` for the interfaces' attach state.
    pub fn api(&self, health: Health) -> Api {
        Api {
            live: Arc::clone(&self.live),
            history: self.history.clone(),
            health,
            status: Arc::clone(&self.status),
            local: self.local.clone(),
            connections: Arc::clone(&self.connections),
        }
    }

    /// The local networks every stage judges by: learnt ones are updated
    /// through this handle as the host's addresses change.
    pub fn local_nets(&self) -> &LocalNets {
        &self.local
    }

    /// Writes out what the outputs hold (after the last drain went
    /// through): the history commits.
    pub fn finish(mut self) {
        for sink in &mut self.sinks {
            sink.finish();
        }
    }

    /// Traffic series in `/metrics` now.
    pub fn series_count(&self) -> usize {
        usize::try_from(self.metrics.series.get()).unwrap_or(0)
    }

    /// Flows waiting for names right now.
    pub fn waiting_flows(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        model::{
            net::{Cidr, LocalNets},
            series::Label,
        },
        names::NameOptions,
        outputs::history::HistoryOptions,
    };
    use ntm_common::{Counters, FlowKey, test_util::KeyBuilder};

    fn pipeline(max_series: usize, ttl: Duration, labels: Vec<Label>) -> Pipeline {
        Pipeline::new(
            PipelineOptions {
                prefix: "ntm".into(),
                labels,
                local: LocalNets::given(vec!["192.168.0.0/16".parse::<Cidr>().unwrap()]),
                max_series,
                series_ttl: ttl,
                drain_interval: Duration::from_secs(1),
                history: HistoryOptions {
                    state_dir: None,
                    retention: Default::default(),
                    commit_interval: Duration::from_secs(10),
                    period_start_day: 1,
                    quotas: Vec::new(),
                    max_period_devices: 100,
                },
                flow_table_capacity: 1024,
                names: NameOptions::addresses_only(),
                ipfix: None,
                ephemeral_start: ntm_common::service_port::DEFAULT_EPHEMERAL_START,
            },
            ServiceRegistry::parse("https 443/tcp\n"),
        )
        .unwrap()
    }

    fn flow(src: [u8; 4], dst: [u8; 4], port: u16) -> FlowKey {
        KeyBuilder::v4(src, dst).tcp(port).ifindex(2).build()
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

    fn eth0() -> HashMap<u32, String> {
        HashMap::from([(2, "eth0".to_string())])
    }

    fn total(p: &Pipeline) -> u64 {
        let text = p.exposition().encode().unwrap();
        text.lines()
            .filter(|l| l.starts_with("ntm_bytes_total{"))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum()
    }

    /// The status tells the configured limits before the first drain
    /// (a page opened as the agent starts shows "0 of 500", not "0 of 0").
    #[test]
    fn the_status_has_the_limits_before_any_drain() {
        let pipeline = pipeline(500, Duration::from_secs(60), Vec::new());
        let status: serde_json::Value =
            serde_json::from_str(&pipeline.api(Health::default()).status()).unwrap();
        assert_eq!(status["max_series"], 500);
        assert_eq!(status["flow_table_capacity"], 1024);
        assert_eq!(status["drains"], 0);
    }

    #[test]
    fn labels_in_the_exposition() {
        let mut p = pipeline(100, Duration::from_secs(60), Label::DEFAULT.to_vec());
        let d = drained(vec![(
            flow([192, 168, 1, 2], [93, 184, 216, 34], 443),
            1500,
        )]);
        p.process(&d, &eth0(), Instant::now());
        let text = p.exposition().encode().unwrap();
        assert!(
            text.contains(r#"ntm_bytes_total{direction="outbound",dst="93.184.216.34",iface="eth0",proto="tcp",service="https",src="192.168.1.2"} 1500"#),
            "{text}"
        );
        assert!(text.contains("ntm_build_info{version="), "{text}");
        assert!(text.contains("ntm_flow_table_capacity 1024"), "{text}");
        assert!(
            text.contains(r#"ntm_kernel_program_info{hook="xdp",link="Ethernet",program="ntm_xdp",role="entry"} 1"#),
            "{text}"
        );
        assert_eq!(p.waiting_flows(), 0);
    }

    #[test]
    fn dropped_labels_are_summed_over() {
        let mut p = pipeline(
            100,
            Duration::from_secs(60),
            vec![Label::Service, Label::Direction],
        );
        let d = drained(vec![
            (flow([192, 168, 1, 2], [8, 8, 8, 8], 443), 100),
            (flow([192, 168, 1, 3], [1, 1, 1, 1], 443), 50),
        ]);
        p.process(&d, &eth0(), Instant::now());
        let text = p.exposition().encode().unwrap();
        assert!(
            text.contains(r#"ntm_bytes_total{direction="outbound",service="https"} 150"#),
            "{text}"
        );
        assert_eq!(p.series_count(), 1);
    }

    #[test]
    fn budget_folds_into_other_and_totals_still_add_up() {
        let mut p = pipeline(3, Duration::from_secs(60), Label::DEFAULT.to_vec());
        let flows = (1..=10u8)
            .map(|i| (flow([192, 168, 1, i], [8, 8, 8, 8], 443), 10 * i as u64))
            .collect();
        p.process(&drained(flows), &eth0(), Instant::now());
        assert_eq!(total(&p), (1..=10u64).map(|i| 10 * i).sum::<u64>());
        let text = p.exposition().encode().unwrap();
        assert!(text.contains(r#"src="other""#), "{text}");
        assert!(text.contains("ntm_series_folded_total 7"), "{text}");
        // 3 budgeted series plus one folded series.
        assert_eq!(p.series_count(), 4);
        assert!(text.contains("ntm_series 4"), "{text}");
    }

    #[test]
    fn idle_series_expire_and_counting_goes_on() {
        let mut p = pipeline(100, Duration::from_secs(10), Label::DEFAULT.to_vec());
        let start = Instant::now();
        let a = flow([192, 168, 1, 2], [8, 8, 8, 8], 443);
        let b = flow([192, 168, 1, 3], [8, 8, 8, 8], 443);
        p.process(&drained(vec![(a, 5), (b, 7)]), &eth0(), start);
        p.process(
            &drained(vec![(a, 5)]),
            &eth0(),
            start + Duration::from_secs(8),
        );
        p.expire(start + Duration::from_secs(15));
        assert_eq!(p.series_count(), 1);
        assert_eq!(total(&p), 10, "the live series keeps its count");
        let text = p.exposition().encode().unwrap();
        assert!(!text.contains(r#"src="192.168.1.3""#), "{text}");
        assert!(text.contains("ntm_series_expired_total 1"), "{text}");
    }

    #[test]
    fn overflow_counts_in_the_main_counters_of_its_interface() {
        use crate::kernel::drain::Outside;
        use ntm_common::Hook;
        let mut p = pipeline(100, Duration::from_secs(60), Label::DEFAULT.to_vec());
        let mut d = drained(vec![(flow([192, 168, 1, 2], [8, 8, 8, 8], 443), 100)]);
        let at = |ifindex, hook, reason| Outside {
            ifindex,
            hook,
            reason,
        };
        let c = |bytes, packets| Counters { bytes, packets };
        d.outside
            .add(at(2, Hook::Ingress, OutsideReason::TableFull), &c(900, 9));
        d.outside
            .add(at(2, Hook::Egress, OutsideReason::TableFull), &c(40, 1));
        d.outside.add(
            at(
                Outside::UNKNOWN_IFINDEX,
                Hook::Egress,
                OutsideReason::InsertFailed,
            ),
            &c(20, 1),
        );
        d.outside.add(
            at(2, Hook::Ingress, OutsideReason::MalformedIpv4),
            &c(60, 1),
        );
        d.outside
            .add(at(2, Hook::Egress, OutsideReason::Filtered), &c(70, 1));
        p.process(&d, &eth0(), Instant::now());
        assert_eq!(total(&p), 100 + 900 + 40 + 20);
        let text = p.exposition().encode().unwrap();
        for line in [
            r#"ntm_bytes_total{direction="other",dst="other",iface="eth0",proto="other",service="other",src="other"} 940"#,
            r#"ntm_bytes_total{direction="other",dst="other",iface="other",proto="other",service="other",src="other"} 20"#,
            r#"ntm_outside_flow_table_packets_total{hook="ingress",iface="eth0",reason="malformed_ipv4"} 1"#,
            r#"ntm_outside_flow_table_bytes_total{hook="ingress",iface="eth0",reason="table_full"} 900"#,
            r#"ntm_outside_flow_table_bytes_total{hook="egress",iface="eth0",reason="table_full"} 40"#,
            r#"ntm_outside_flow_table_bytes_total{hook="egress",iface="other",reason="insert_failed"} 20"#,
            r#"ntm_filtered_bytes_total{hook="egress",iface="eth0"} 70"#,
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
    }

    /// The live view and the history are two sinks of the same labelled
    /// deltas: per device, server, service and interface they hold the
    /// same totals, each way, overflow included.
    #[test]
    fn the_live_view_and_the_history_add_up_alike() {
        use crate::{
            kernel::drain::Outside, model::subjects::Subject, outputs::history::periods::Period,
        };
        use ntm_common::Hook;
        let mut p = pipeline(100, Duration::from_secs(60), Label::DEFAULT.to_vec());
        let mut d = drained(vec![
            (flow([192, 168, 1, 2], [8, 8, 8, 8], 443), 100),
            (flow([8, 8, 8, 8], [192, 168, 1, 2], 443), 1000),
            (flow([192, 168, 1, 3], [192, 168, 1, 2], 22), 30),
            (flow([1, 1, 1, 1], [9, 9, 9, 9], 53), 7),
        ]);
        d.outside.add(
            Outside {
                ifindex: 2,
                hook: Hook::Egress,
                reason: OutsideReason::TableFull,
            },
            &Counters {
                bytes: 40,
                packets: 1,
            },
        );
        let now = Instant::now();
        p.process(&d, &eth0(), now);
        p.process(&d, &eth0(), now);
        let unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let live = p.live.read().unwrap();
        for subject in Subject::ALL {
            let shown: HashMap<String, [Counters; 2]> = live
                .top(subject, None, now, usize::MAX)
                .unwrap()
                .into_iter()
                .map(|row| (row.name, row.total))
                .collect();
            let kept = p.history.period_totals(subject, Period::Day, unix).unwrap();
            assert!(!shown.is_empty(), "{subject:?}");
            assert_eq!(shown, kept, "{subject:?}");
        }
        let interfaces = p
            .history
            .period_totals(Subject::Interface, Period::Day, unix);
        assert_eq!(
            interfaces.unwrap()["eth0"],
            [
                Counters {
                    bytes: 2 * (100 + 1000 + 30 + 7),
                    packets: 2 * 4,
                },
                Counters {
                    bytes: 2 * 40,
                    packets: 2,
                },
            ],
            "the flows were seen by the ingress hook, the overflow by the egress one"
        );
    }
}
