//! ntm's own health metrics: what was counted outside the flow table or
//! filtered out, the filter in effect, the attachments, the drains, the
//! series budget, reverse DNS, the HTTP endpoint, and the process.
//!
//! They live in a `prometheus` registry; the traffic series and
//! `<prefix>_host_info`, a series per flow or per host, do not (see
//! `outputs/text.rs` for why).

use std::collections::{BTreeSet, HashMap};

use ntm_common::{Hook, OutsideReason, programs};
use prometheus::{
    GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, core::Collector,
};

use crate::kernel::{InterfaceState, drain::Drained};
use crate::{kernel::iface_label, model::sync};

#[derive(Debug, thiserror::Error)]
#[error("registering metric {name}: {source}")]
pub struct MetricsError {
    name: String,
    #[source]
    source: prometheus::Error,
}

/// ntm's metrics of its history.
#[derive(Clone)]
pub struct HistoryMetrics {
    /// 1 while the history is written to disk, 0 while in memory only.
    pub persistent: IntGauge,
    /// Commits by result (`ok`, `error`).
    pub commits: IntCounterVec,
    pub database_bytes: IntGauge,
    /// Minute buckets of counts dropped because commits kept failing.
    pub lost: IntGauge,
    /// `<prefix>_period_bytes{period, device, way, iface, hook}`.
    pub period_bytes: IntGaugeVec,
    /// `<prefix>_quota_bytes{iface, period}` and
    /// `<prefix>_quota_used_ratio{iface, period}`.
    pub quota_bytes: IntGaugeVec,
    pub quota_used: GaugeVec,
}

/// ntm's metrics of the Kubernetes rung (`names/kubernetes`).
#[derive(Clone)]
pub struct KubernetesMetrics {
    /// `<prefix>_k8s_pod_info{address, namespace, pod, workload,
    /// workload_kind, node}`: 1 per address of this node's pods.
    pub pod_info: IntGaugeVec,
    /// `<prefix>_node_info{node, address}`: 1 per address of this node.
    pub node_info: IntGaugeVec,
    /// `<prefix>_k8s_runtime_errors_total{socket}`: failed requests to a
    /// container runtime.
    pub runtime_errors: IntCounterVec,
}

/// How a reverse DNS lookup ended: the `result` label of
/// `<prefix>_dns_lookups_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DnsResult {
    Ok,
    NoName,
    ServerError,
    Timeout,
    Error,
    /// Not asked: the queue of lookups was full.
    Dropped,
}

impl DnsResult {
    pub const ALL: [DnsResult; 6] = [
        DnsResult::Ok,
        DnsResult::NoName,
        DnsResult::ServerError,
        DnsResult::Timeout,
        DnsResult::Error,
        DnsResult::Dropped,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DnsResult::Ok => "ok",
            DnsResult::NoName => "no_name",
            DnsResult::ServerError => "server_error",
            DnsResult::Timeout => "timeout",
            DnsResult::Error => "error",
            DnsResult::Dropped => "dropped",
        }
    }
}

pub struct SelfMetrics {
    registry: Registry,
    outside_bytes: IntCounterVec,
    outside_packets: IntCounterVec,
    filtered_bytes: IntCounterVec,
    filtered_packets: IntCounterVec,
    /// The `iface` values the outside and filtered counters have series
    /// for, so that those of interfaces that went away can go too.
    outside_ifaces: std::sync::Mutex<BTreeSet<String>>,
    filter_active: IntGaugeVec,
    filter_reloads: IntCounterVec,
    flow_table_entries: IntGauge,
    drain_seconds: Histogram,
    attached: IntGaugeVec,
    pub series: IntGauge,
    pub series_folded: IntCounter,
    pub series_expired: IntCounter,
    pub dns_lookups: IntCounterVec,
    pub names: IntGaugeVec,
    /// `<prefix>_observed_messages_total{protocol, result}`.
    pub observed_messages: IntCounterVec,
    /// What the kernel reported dropped so far, to add the deltas.
    observed_drops_seen: std::sync::Mutex<crate::kernel::observe::Drops>,
    pub observed_names: IntGaugeVec,
    pub http_connection_errors: IntCounter,
    /// `<prefix>_http_requests_refused_total{reason}`: `unauthorized` (no
    /// or wrong basic auth), `rate_limited`, `client_certificate` (a SAN
    /// not in client_allowed_sans), `tls_handshake`.
    pub http_refused: IntCounterVec,
    /// Flow records for each IPFIX collector, by result (`IpfixResult`).
    pub ipfix_records: IntCounterVec,
    /// The Kubernetes rung's pod and node info, and the runtime's errors.
    pub kubernetes: KubernetesMetrics,
    /// `<prefix>_history_*`: whether the history is on disk, its commits,
    /// its size, and what failing commits dropped.
    pub history: HistoryMetrics,
    /// The self-check: `<prefix>_interface_kernel_{packets,bytes}_total`,
    /// `_counted_packets_total` and `_coverage_ratio`, by iface and
    /// hook (see `coverage.rs`).
    pub coverage: (IntCounterVec, IntCounterVec, IntCounterVec, GaugeVec),
}

/// Why the web config refused a request or a connection: the `reason` of
/// `<prefix>_http_requests_refused_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// Basic auth missing or wrong.
    Unauthorized,
    /// Too many failed logins from the client's address.
    RateLimited,
    /// A client certificate without an allowed SAN.
    ClientCertificate,
    /// The TLS handshake failed or timed out.
    TlsHandshake,
}

impl Refused {
    pub const ALL: [Refused; 4] = [
        Refused::Unauthorized,
        Refused::RateLimited,
        Refused::ClientCertificate,
        Refused::TlsHandshake,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Refused::Unauthorized => "unauthorized",
            Refused::RateLimited => "rate_limited",
            Refused::ClientCertificate => "client_certificate",
            Refused::TlsHandshake => "tls_handshake",
        }
    }
}

/// How a history commit went: the `result` of
/// `<prefix>_history_commits_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommitResult {
    Ok,
    Error,
}

impl CommitResult {
    pub const ALL: [CommitResult; 2] = [CommitResult::Ok, CommitResult::Error];

    pub fn as_str(self) -> &'static str {
        match self {
            CommitResult::Ok => "ok",
            CommitResult::Error => "error",
        }
    }
}

/// A table of names learnt from the wire or from containers: the `table`
/// of `<prefix>_observed_names`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NameTable {
    Answers,
    Clients,
    Leases,
    Containers,
    Pods,
}

impl NameTable {
    pub fn as_str(self) -> &'static str {
        match self {
            NameTable::Answers => "answers",
            NameTable::Clients => "clients",
            NameTable::Leases => "leases",
            NameTable::Containers => "containers",
            NameTable::Pods => "pods",
        }
    }
}

/// How a DNS or DHCP message the kernel handed over was read: the
/// `result` label of `<prefix>_observed_messages_total`, beside the
/// kernel's reasons for not handing one over (`observe::DropReason`). The
/// sum is every message the kernel picked out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ObservedResult {
    Parsed,
    Malformed,
    /// Larger than the copy the kernel hands over.
    Truncated,
}

impl ObservedResult {
    pub const ALL: [ObservedResult; 3] = [
        ObservedResult::Parsed,
        ObservedResult::Malformed,
        ObservedResult::Truncated,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ObservedResult::Parsed => "parsed",
            ObservedResult::Malformed => "malformed",
            ObservedResult::Truncated => "truncated",
        }
    }
}

/// Registers metrics under one prefix, with the name in every error.
struct Registrar<'a> {
    registry: &'a Registry,
    prefix: &'a str,
}

impl Registrar<'_> {
    fn register<C: Collector + Clone + 'static>(
        &self,
        suffix: &str,
        make: impl FnOnce(String) -> prometheus::Result<C>,
    ) -> Result<C, MetricsError> {
        let name = format!("{}_{suffix}", self.prefix);
        let fail = |source| MetricsError {
            name: name.clone(),
            source,
        };
        let collector = make(name.clone()).map_err(fail)?;
        self.registry
            .register(Box::new(collector.clone()))
            .map_err(fail)?;
        Ok(collector)
    }

    fn counter(&self, suffix: &str, help: &str) -> Result<IntCounter, MetricsError> {
        self.register(suffix, |name| IntCounter::new(name, help))
    }

    fn gauge(&self, suffix: &str, help: &str) -> Result<IntGauge, MetricsError> {
        self.register(suffix, |name| IntGauge::new(name, help))
    }

    fn counter_vec(
        &self,
        suffix: &str,
        help: &str,
        labels: &[&str],
    ) -> Result<IntCounterVec, MetricsError> {
        self.register(suffix, |name| {
            IntCounterVec::new(Opts::new(name, help), labels)
        })
    }

    fn gauge_vec(
        &self,
        suffix: &str,
        help: &str,
        labels: &[&str],
    ) -> Result<IntGaugeVec, MetricsError> {
        self.register(suffix, |name| {
            IntGaugeVec::new(Opts::new(name, help), labels)
        })
    }
}

impl SelfMetrics {
    pub fn new(prefix: &str, flow_table_capacity: u32) -> Result<Self, MetricsError> {
        let registry = Registry::new();
        let r = Registrar {
            registry: &registry,
            prefix,
        };
        let outside_bytes = r.counter_vec(
            "outside_flow_table_bytes_total",
            "Bytes of frames counted outside the flow table, by reason, interface and hook (ingress or egress); table_full, insert_failed and no_active_table are also in bytes_total, with their iface and every other label \"other\"; iface=\"other\": the interface could not be kept",
            OUTSIDE_LABELS,
        )?;
        let outside_packets = r.counter_vec(
            "outside_flow_table_packets_total",
            "Frames counted outside the flow table, by reason, interface and hook (see outside_flow_table_bytes_total)",
            OUTSIDE_LABELS,
        )?;
        let filter_reloads = r.counter_vec(
            "filter_reloads_total",
            "Filter changes on SIGHUP, by result (error: the old filter stays)",
            &["result"],
        )?;
        for result in ["ok", "error"] {
            filter_reloads.with_label_values(&[result]);
        }
        let capacity = r.gauge(
            "flow_table_capacity",
            "Flows each kernel table holds before traffic goes to the overflow bucket",
        )?;
        capacity.set(flow_table_capacity as i64);
        let build = r.gauge_vec("build_info", "ntm's version", &["version"])?;
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        // The programs as the kernel names them (bpftool prog show name ...).
        let programs = r.gauge_vec(
            "kernel_program_info",
            "ntm's kernel programs by hook: the one attached (role=\"entry\") and the counting half a filter hands over to (role=\"count\"); names as the kernel shows them",
            &["program", "hook", "link", "role"],
        )?;
        for hook in &programs::HOOKS {
            for (name, role) in [(hook.entry, "entry"), (hook.count, "count")] {
                programs
                    .with_label_values(&[
                        programs::kernel_name(name),
                        hook.point.name(),
                        hook.link.name(),
                        role,
                    ])
                    .set(1);
            }
        }
        let dns_lookups = r.counter_vec(
            "dns_lookups_total",
            "Reverse DNS lookups for host labels, by result",
            &["result"],
        )?;
        for result in DnsResult::ALL {
            dns_lookups.with_label_values(&[result.as_str()]);
        }
        let observed_messages = r.counter_vec(
            "observed_messages_total",
            "DNS responses and DHCP messages on the monitored interfaces picked out for names, by protocol and result (parsed; malformed; truncated: larger than the copy; rate_limited and ring_full: not handed to ntm, see --observe-rate)",
            &["protocol", "result"],
        )?;
        for protocol in ["dns", "dhcp"] {
            let results = ObservedResult::ALL.map(ObservedResult::as_str);
            let dropped = ntm_common::observe::DropReason::ALL.map(|r| r.as_str());
            for result in results.into_iter().chain(dropped) {
                observed_messages.with_label_values(&[protocol, result]);
            }
        }
        let coverage = (
            r.counter_vec(
                "interface_kernel_packets_total",
                "Frames the kernel's own statistics of the interface (rtnetlink IFLA_STATS64 rx_packets for ingress, tx_packets for egress) counted since ntm attached, at each hook ntm counts at; compare with interface_counted_packets_total",
                FILTERED_LABELS,
            )?,
            r.counter_vec(
                "interface_kernel_bytes_total",
                "Bytes the kernel's statistics of the interface counted since ntm attached (rx_bytes, tx_bytes): link-layer bytes, so not comparable with bytes_total, which counts L3 bytes (14 bytes less per Ethernet frame, 18 with a VLAN tag)",
                FILTERED_LABELS,
            )?,
            r.counter_vec(
                "interface_counted_packets_total",
                "Frames ntm's program saw at the interface's hook: in the traffic counters, outside the flow table and filtered out. Equals interface_kernel_packets_total when nothing is missed; fewer: frames dropped before the ingress hook (rx_dropped) or not yet drained; more: GSO/GRO aggregates the driver counts as one packet and ntm as their segments, frames a qdisc dropped after the egress hook",
                FILTERED_LABELS,
            )?,
            r.register("interface_coverage_ratio", |name| {
                GaugeVec::new(
                    Opts::new(
                        name,
                        "interface_counted_packets_total / interface_kernel_packets_total over the last minute (1: every frame the kernel counted was counted; 1 when nothing crossed)",
                    ),
                    FILTERED_LABELS,
                )
            })?,
        );
        let metrics = Self {
            coverage,
            observed_messages,
            observed_drops_seen: Default::default(),
            observed_names: r.gauge_vec(
                "observed_names",
                "Entries of the name tables ntm keeps besides its files (answers: DNS answers per client and address; clients: DHCP host names; leases: DHCP leases; containers: addresses of Docker or Podman containers; pods: pod sandboxes on this Kubernetes node), each bounded",
                &["table"],
            )?,
            outside_bytes,
            outside_packets,
            filtered_bytes: r.counter_vec(
                "filtered_bytes_total",
                "Bytes of frames the tcpdump filter did not match (not in bytes_total), counted as bytes_total would, by interface and hook (ingress or egress)",
                FILTERED_LABELS,
            )?,
            filtered_packets: r.counter_vec(
                "filtered_packets_total",
                "Frames the tcpdump filter did not match (not in packets_total), by interface and hook",
                FILTERED_LABELS,
            )?,
            outside_ifaces: Default::default(),
            filter_active: r.gauge_vec(
                "filter_active",
                "1 for the tcpdump filter in effect (\"\" when every frame is counted)",
                &["filter"],
            )?,
            filter_reloads,
            flow_table_entries: r.gauge(
                "flow_table_entries",
                "Flows in the kernel table drained last (per interval)",
            )?,
            drain_seconds: r.register("drain_duration_seconds", |name| {
                Histogram::with_opts(
                    HistogramOpts::new(name, "Time to swap and read the kernel flow table")
                        .buckets(vec![
                            0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                        ]),
                )
            })?,
            attached: r.gauge_vec(
                "interface_attached",
                "1 while ntm's programs are attached to the interface's hooks; mode: tcx, clsact, xdp-native or xdp-generic",
                &["iface", "mode"],
            )?,
            series: r.gauge("series", "Traffic series exported now")?,
            series_folded: r.counter(
                "series_folded_total",
                "Flow deltas folded into \"other\" series because of --max-series",
            )?,
            series_expired: r.counter(
                "series_expired_total",
                "Series dropped after --series-ttl without traffic",
            )?,
            dns_lookups,
            names: r.gauge_vec(
                "names",
                "Hosts (address and label) in labels now, by where the label came from (static: --hosts-file or --ethers-file, dhcp: --leases or DHCP on the wire, dns_answer: a DNS answer on the wire, tls_sni and quic_sni: the server name in a TLS or QUIC ClientHello, tls_ech_outer: an ECH hello's public name, reverse_dns, address: no name)",
                &["source"],
            )?,
            http_connection_errors: r.counter(
                "http_connection_errors_total",
                "HTTP connections that ended in an error (client went away, bad request, header timeout)",
            )?,
            kubernetes: KubernetesMetrics {
                pod_info: r.gauge_vec(
                    "k8s_pod_info",
                    "1 per address of a pod on this Kubernetes node, from the container runtime (join on address to name the remote end of a flow; see docs/kubernetes.md)",
                    &["address", "namespace", "pod", "workload", "workload_kind", "node"],
                )?,
                node_info: r.gauge_vec(
                    "node_info",
                    "1 per address of this Kubernetes node (NODE_NAME, else the host name), exported once its container runtime answered",
                    &["node", "address"],
                )?,
                runtime_errors: r.counter_vec(
                    "k8s_runtime_errors_total",
                    "Failed requests to a container runtime's CRI socket (names already given stay until their pod is known to be gone)",
                    &["socket"],
                )?,
            },
            history: HistoryMetrics {
                persistent: r.gauge(
                    "history_persistent",
                    "1 while the history is written to its database in --state-dir, 0 while it is kept in memory only (see the log)",
                )?,
                commits: r.counter_vec(
                    "history_commits_total",
                    "Commits of the history database, by result (ok, error)",
                    &["result"],
                )?,
                database_bytes: r.gauge(
                    "history_database_bytes",
                    "Size of the history database (without its write-ahead log)",
                )?,
                lost: r.gauge(
                    "history_lost_buckets",
                    "Minute buckets of counts the history dropped because its commits kept failing",
                )?,
                period_bytes: r.gauge_vec(
                    "period_bytes",
                    "Bytes this day (from local midnight), week (from Monday) and billing period (from --period-start-day), per device (way: download, upload) and per interface (hook: ingress, egress); at most --max-series devices, the busiest",
                    &["period", "device", "way", "iface", "hook"],
                )?,
                quota_bytes: r.gauge_vec(
                    "quota_bytes",
                    "The data cap of an interface per period (--quota)",
                    &["iface", "period"],
                )?,
                quota_used: r.register("quota_used_ratio", |name| {
                    GaugeVec::new(
                        Opts::new(
                            name,
                            "Share of the interface's --quota used in the current period (ingress and egress; 1 is all of it)",
                        ),
                        &["iface", "period"],
                    )
                })?,
            },
            http_refused: r.counter_vec(
                "http_requests_refused_total",
                "HTTP requests and connections refused by the web config: unauthorized, rate_limited, client_certificate, tls_handshake",
                &["reason"],
            )?,
            ipfix_records: r.counter_vec(
                "ipfix_records_total",
                "Flow records for each IPFIX collector, by result: sent; dropped (the queue to the collector was full: it is slow or down); failed (the socket refused them: no collector listening, or the connection broke)",
                &["collector", "result"],
            )?,
            registry,
        };
        for result in CommitResult::ALL {
            metrics
                .history
                .commits
                .with_label_values(&[result.as_str()]);
        }
        for reason in Refused::ALL {
            metrics.http_refused.with_label_values(&[reason.as_str()]);
        }
        let process = prometheus::process_collector::ProcessCollector::for_self();
        metrics
            .registry
            .register(Box::new(process))
            .map_err(|source| MetricsError {
                name: "process_*".to_string(),
                source,
            })?;
        Ok(metrics)
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Adds what the kernel dropped since the last call.
    pub fn record_observe_drops(&self, drops: &crate::kernel::observe::Drops) {
        use ntm_common::observe::{DropReason, Kind};
        let mut seen = sync::lock(&self.observed_drops_seen);
        for kind in Kind::ALL {
            for reason in DropReason::ALL {
                let (k, r) = (kind as usize, reason as usize);
                let delta = drops[k][r].saturating_sub(seen[k][r]);
                seen[k][r] = drops[k][r];
                if delta > 0 {
                    self.observed_messages
                        .with_label_values(&[protocol_label(kind), reason.as_str()])
                        .inc_by(delta);
                }
            }
        }
    }

    /// One drain: its duration, the table's size, and what was counted
    /// outside the table or filtered out, by the interfaces' labels.
    pub fn record_drain(&self, drained: &Drained, iface_labels: &HashMap<u32, String>) {
        self.drain_seconds
            .observe((drained.swap_time + drained.read_time).as_secs_f64());
        self.flow_table_entries.set(drained.table_entries as i64);
        for (at, delta) in drained.outside.iter() {
            let iface = iface_label(iface_labels, at.ifindex);
            let hook = at.hook.as_str();
            if at.reason == OutsideReason::Filtered {
                let labels = [iface.as_str(), hook];
                self.filtered_bytes
                    .with_label_values(&labels)
                    .inc_by(delta.bytes);
                self.filtered_packets
                    .with_label_values(&labels)
                    .inc_by(delta.packets);
                continue;
            }
            let labels = [at.reason.as_str(), iface.as_str(), hook];
            self.outside_bytes
                .with_label_values(&labels)
                .inc_by(delta.bytes);
            self.outside_packets
                .with_label_values(&labels)
                .inc_by(delta.packets);
        }
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

    /// The attachments now: series that no longer apply go away.
    /// The attachments now. Each interface's outside and filtered counters
    /// start at 0 (so that a dashboard shows 0 and `increase()` sees the
    /// first frames); those of interfaces that are gone are dropped.
    pub fn set_interfaces(&self, states: &[InterfaceState]) {
        self.attached.reset();
        for state in states {
            self.attached
                .with_label_values(&[state.iface.as_str(), state.mode.as_str()])
                .set(state.attached as i64);
        }
        let mut known = sync::lock(&self.outside_ifaces);
        let now: BTreeSet<String> = states.iter().map(|s| s.iface.clone()).collect();
        for gone in known.difference(&now) {
            for hook in Hook::ALL {
                let labels = [gone.as_str(), hook.as_str()];
                let _ = self.filtered_bytes.remove_label_values(&labels);
                let _ = self.filtered_packets.remove_label_values(&labels);
                for reason in OutsideReason::ALL {
                    let labels = [reason.as_str(), gone.as_str(), hook.as_str()];
                    let _ = self.outside_bytes.remove_label_values(&labels);
                    let _ = self.outside_packets.remove_label_values(&labels);
                }
            }
        }
        for iface in now.difference(&known) {
            for hook in Hook::ALL {
                let labels = [iface.as_str(), hook.as_str()];
                self.filtered_bytes.with_label_values(&labels);
                self.filtered_packets.with_label_values(&labels);
                let labels = [
                    OutsideReason::TableFull.as_str(),
                    iface.as_str(),
                    hook.as_str(),
                ];
                self.outside_bytes.with_label_values(&labels);
                self.outside_packets.with_label_values(&labels);
            }
        }
        *known = now;
    }
}

/// Labels of `<prefix>_outside_flow_table_{bytes,packets}_total`.
const OUTSIDE_LABELS: &[&str] = &["reason", "iface", "hook"];
/// Labels of `<prefix>_filtered_{bytes,packets}_total`.
const FILTERED_LABELS: &[&str] = &["iface", "hook"];

/// The `protocol` label of an observed message.
pub fn protocol_label(kind: ntm_common::observe::Kind) -> &'static str {
    match kind {
        ntm_common::observe::Kind::Dns => "dns",
        ntm_common::observe::Kind::Dhcp => "dhcp",
        ntm_common::observe::Kind::Tls => "tls",
        ntm_common::observe::Kind::Quic => "quic",
    }
}
