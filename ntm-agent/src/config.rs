//! Command line and environment: every option is a flag and an `NTM_*`
//! environment variable (the flag wins), as in the tool ntm replaces.

use std::{
    fs,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use clap::Parser;

use crate::{
    kernel::{
        AttachMode, CountMode, FilterSource, KernelOptions,
        load::DatapathOptions,
        privileges::{User, resolve_user},
    },
    model::{
        net::{Cidr, LocalNets},
        series::Label,
        units::parse_duration,
    },
    names::{
        NameOptions,
        kubernetes::{KubernetesOptions, PodNames, node_name},
        resolver::Upstream,
    },
    outputs::{
        history::HistoryOptions,
        ipfix::{
            IpfixOptions,
            collector::{CollectorSpec, ExportSettings},
        },
    },
    pipeline::services::{ServiceRegistry, ServiceSpec, ServicesError},
};

/// The one parser of every on/off flag's environment variable: 1/0,
/// true/false, yes/no, on/off, so that `NTM_X=1` means the same for every
/// X (clap's default for a flag takes only true/false). On the command
/// line such a flag still takes no value.
fn on_off() -> clap::builder::BoolishValueParser {
    clap::builder::BoolishValueParser::new()
}

/// Reverse lookups waiting for a DNS worker at most; beyond it the address
/// is shown.
const DNS_QUEUE: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "no interface given and no default route found in /proc/net/route or /proc/net/ipv6_route; name one with -i/--interface (or NTM_INTERFACE)"
    )]
    NoDefaultInterface,
    #[error(
        "a filter was given both as words ({words:?}) and with -F/--filter-file ({file}); give it one way"
    )]
    TwoFilters { words: String, file: String },
    #[error(
        "`{command}` is a command, not a filter: write it first, before its own options (`ntm-agent {command} --help`); the agent's options do not apply to it"
    )]
    CommandAfterOptions { command: String },
}

#[derive(Clone, Debug, Parser)]
#[command(
    name = "ntm-agent",
    version,
    about = "Counts every packet crossing an interface in the kernel (eBPF) and exports per-flow traffic.",
    args_conflicts_with_subcommands = true
)]
pub struct Config {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub interfaces: InterfaceArgs,
    #[command(flatten)]
    pub filter: FilterArgs,
    #[command(flatten)]
    pub names: NameArgs,
    #[command(flatten)]
    pub series: SeriesArgs,
    #[command(flatten)]
    pub datapath: DatapathArgs,
    #[command(flatten)]
    pub http: HttpArgs,
    #[command(flatten)]
    pub history: HistoryArgs,
    #[command(flatten)]
    pub export: ExportArgs,
    #[command(flatten)]
    pub privileges: PrivilegeArgs,
}

/// What `ntm-agent` does other than counting.
#[derive(Clone, Debug, clap::Subcommand)]
pub enum Command {
    /// Stop counting for good in this network namespace: detach ntm's
    /// programs that outlive the agent (TCX and XDP links pinned in
    /// bpffs, clsact filters) and remove its pinned state. The systemd
    /// unit runs it when the service is stopped (not restarted), the Helm
    /// chart when it is uninstalled. Refused while an agent runs here.
    Detach {
        /// The pinned state's directory, as the agent was given it.
        #[arg(long, env = "NTM_PIN_DIR", default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
}

/// Where the agent keeps its kernel state across restarts, by default.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/ntm";

/// Where to count.
#[derive(Clone, Debug, clap::Args)]
#[command(next_help_heading = "Interfaces")]
pub struct InterfaceArgs {
    /// Interface to monitor; repeat for several; shell patterns (veth*) too.
    /// A bridge is counted once per frame crossing it (at its ports' ingress
    /// and its own egress). Default: the interface of the default route.
    #[arg(
        short = 'i',
        long = "interface",
        visible_alias = "iface",
        env = "NTM_INTERFACE",
        value_delimiter = ','
    )]
    pub interfaces: Vec<String>,

    /// Wait for interfaces named with -i that do not exist yet (PPPoE,
    /// WireGuard, a container's veth) instead of refusing to start.
    #[arg(long, env = "NTM_WAIT_FOR_INTERFACES", value_parser = on_off(),
          action = clap::ArgAction::SetTrue)]
    pub wait_for_interfaces: bool,
}

/// Which frames to count (tcpdump syntax, evaluated in the kernel).
#[derive(Clone, Debug, clap::Args)]
#[command(next_help_heading = "Filter")]
pub struct FilterArgs {
    /// tcpdump filter expression (several words are joined), e.g.
    /// "src net 192.168.0.0/24 or dst net 192.168.0.0/24".
    #[arg(env = "NTM_FILTERS", num_args = 0.., trailing_var_arg = true)]
    pub filters: Vec<String>,

    /// Read the tcpdump filter expression from this file (as tcpdump -F;
    /// `#` starts a comment). SIGHUP re-reads it and swaps the new filter in
    /// without losing a count; a bad new filter is logged and the old one
    /// stays.
    #[arg(short = 'F', long = "filter-file", env = "NTM_FILTER_FILE")]
    pub filter_file: Option<std::path::PathBuf>,
}

/// Host names in src and dst.
#[derive(Clone, Debug, clap::Args)]
#[command(next_help_heading = "Names")]
pub struct NameArgs {
    /// Keep hosts' full names in src/dst (more series); default: registrable
    /// domains for remote hosts.
    #[arg(short = 'f', long = "fqdn", env = "NTM_FQDN", value_parser = on_off(),
          action = clap::ArgAction::SetTrue)]
    pub fqdn: bool,

    /// Names from an /etc/hosts-style file (ADDRESS NAME ...), the highest
    /// rung of the naming ladder; repeatable, comma-separated; re-read when
    /// it changes.
    #[arg(long = "hosts-file", env = "NTM_HOSTS_FILES", value_delimiter = ',')]
    pub hosts_files: Vec<PathBuf>,

    /// Device names by MAC address from an /etc/ethers-style file (MAC
    /// NAME): every address the device uses (its IPv4 lease, its IPv6
    /// addresses, as the neighbour table shows them) gets the name;
    /// repeatable, comma-separated; re-read when it changes.
    #[arg(long = "ethers-file", env = "NTM_ETHERS_FILES", value_delimiter = ',')]
    pub ethers_files: Vec<PathBuf>,

    /// Device names from a DHCP server's lease file: dnsmasq's (also
    /// OpenWrt's /tmp/dhcp.leases), ISC dhcpd's dhcpd.leases or Kea's CSV,
    /// told apart by their content: the hostname each device sent, for the
    /// address it was given and its MAC; repeatable, comma-separated;
    /// re-read when it changes.
    #[arg(long = "leases", env = "NTM_LEASES", value_delimiter = ',')]
    pub lease_files: Vec<PathBuf>,

    /// Show addresses only in src/dst, never names.
    #[arg(short = 'n', long = "numeric", env = "NTM_NUMERIC", value_parser = on_off(),
          action = clap::ArgAction::SetTrue)]
    pub numeric: bool,

    /// DNS server for reverse lookups (IP or IP:PORT); default: the
    /// nameservers and options of /etc/resolv.conf.
    #[arg(long, env = "NTM_DNS_SERVER", value_parser = parse_dns_server)]
    pub dns_server: Option<SocketAddr>,

    /// How long one reverse lookup may take.
    #[arg(long, env = "NTM_DNS_TIMEOUT", default_value = "2s", value_parser = parse_duration)]
    pub dns_timeout: Duration,

    /// Reverse lookups in flight at once.
    #[arg(long, env = "NTM_DNS_WORKERS", default_value_t = 4,
          value_parser = clap::value_parser!(u16).range(1..=256))]
    pub dns_workers: u16,

    /// How long a new flow waits for its hosts' names before it is exported
    /// with addresses (its labels never change afterwards).
    #[arg(long, env = "NTM_NAME_WAIT", default_value = "3s", value_parser = parse_duration)]
    pub name_wait: Duration,

    /// Docker or Podman API socket to name containers by (repeatable,
    /// comma-separated) [default: /run/podman/podman.sock,
    /// /var/run/docker.sock and /run/docker.sock, where they exist].
    #[arg(
        long = "container-socket",
        env = "NTM_CONTAINER_SOCKETS",
        value_delimiter = ','
    )]
    pub container_sockets: Vec<PathBuf>,

    /// Do not name containers by asking Docker or Podman.
    #[arg(long = "no-containers", env = "NTM_NO_CONTAINERS", value_parser = on_off(),
          action = clap::ArgAction::SetTrue)]
    pub no_containers: bool,

    /// Container runtime CRI socket to name this Kubernetes node's pods by
    /// (repeatable, comma-separated) [default: the sockets of containerd,
    /// CRI-O, k3s, k0s and microk8s, where they exist].
    #[arg(long = "cri-socket", env = "NTM_CRI_SOCKETS", value_delimiter = ',')]
    pub cri_sockets: Vec<PathBuf>,

    /// Do not name pods by asking the node's container runtime.
    #[arg(long = "no-kubernetes", env = "NTM_NO_KUBERNETES", value_parser = on_off(),
          action = clap::ArgAction::SetTrue)]
    pub no_kubernetes: bool,

    /// What a pod address is labelled with: `workload`
    /// (NAMESPACE/WORKLOAD, as many series as workloads) or `pod`
    /// (NAMESPACE/POD).
    #[arg(long = "k8s-names", env = "NTM_K8S_NAMES", default_value = "workload",
          value_parser = parse_pod_names)]
    pub k8s_names: PodNames,

    /// The Kubernetes cluster's DNS domain: a Service's name in a DNS
    /// answer (`web.shop.svc.DOMAIN`) labels its ClusterIP `web.shop`.
    #[arg(
        long = "cluster-domain",
        env = "NTM_CLUSTER_DOMAIN",
        default_value = "cluster.local"
    )]
    pub cluster_domain: String,

    /// Do not read the DNS answers that cross the monitored interfaces
    /// (by default a server is named by the name its client asked for).
    #[arg(long = "no-observe-dns", env = "NTM_NO_OBSERVE_DNS", value_parser = on_off(),
          action = clap::ArgAction::SetTrue)]
    pub no_observe_dns: bool,

    /// Do not read the DHCP messages that cross the monitored interfaces
    /// (by default a device is named by the hostname it sent).
    #[arg(long = "no-observe-dhcp", env = "NTM_NO_OBSERVE_DHCP", value_parser = on_off(),
          action = clap::ArgAction::SetTrue)]
    pub no_observe_dhcp: bool,

    /// Do not read the TLS ClientHellos and QUIC Initials that cross the
    /// monitored interfaces (by default a server is also named by the name
    /// its client sent in the clear in its handshake, for clients whose
    /// DNS is encrypted).
    #[arg(long = "no-observe-tls", env = "NTM_NO_OBSERVE_TLS", value_parser = on_off(),
          action = clap::ArgAction::SetTrue)]
    pub no_observe_tls: bool,

    /// DNS, DHCP and handshake messages handed from the kernel to ntm per
    /// second per CPU at most, for each of DNS, DHCP, TLS and QUIC; beyond it
    /// they are counted as dropped (traffic is counted all the same).
    #[arg(long = "observe-rate", env = "NTM_OBSERVE_RATE", default_value_t = ntm_common::observe::DEFAULT_RATE_PER_CPU,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub observe_rate: u32,

    /// Shortest time a DNS answer seen on the wire names its addresses:
    /// clients keep using an answer past a short TTL (at most a day).
    #[arg(long = "dns-answer-min-ttl", env = "NTM_DNS_ANSWER_MIN_TTL", default_value = "60s", value_parser = parse_duration)]
    pub answer_min_ttl: Duration,
}

/// Labels, services and the series budget.
#[derive(Clone, Debug, clap::Args)]
#[command(next_help_heading = "Series")]
pub struct SeriesArgs {
    /// Labels to keep on the traffic counters (the others are summed over).
    #[arg(
        long,
        env = "NTM_LABELS",
        value_delimiter = ',',
        default_value = "src,dst,service,proto,direction,iface"
    )]
    pub labels: Vec<Label>,

    /// Local networks (CIDR, comma-separated or repeated): which hosts are
    /// devices, and the direction label (inbound, outbound, internal,
    /// external) [default: learnt from the host: the networks of the
    /// addresses on the monitored interfaces and on its bridges and their
    /// ports, followed as they change, and the private ranges].
    #[arg(long = "local-net", env = "NTM_LOCAL_NETS", value_delimiter = ',')]
    pub local_nets: Vec<Cidr>,

    /// Extra service port, PORT[/PROTO]=NAME (e.g. 8123/tcp=home-assistant);
    /// repeatable; wins over the services file.
    #[arg(long = "service", env = "NTM_SERVICES", value_delimiter = ',',
          value_name = "PORT[/PROTO]=NAME", value_parser = parse_service)]
    pub services: Vec<ServiceSpec>,

    /// Services file in /etc/services format [default: /etc/services, which
    /// may be absent; a file given here must be readable].
    #[arg(long, env = "NTM_SERVICES_FILE")]
    pub services_file: Option<PathBuf>,

    /// Most traffic series exported; beyond it new label sets are folded into
    /// series labelled "other" (their bytes still count).
    #[arg(long, env = "NTM_MAX_SERIES", default_value_t = 10_000,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_series: u32,

    /// A series with no traffic for this long is dropped from /metrics.
    #[arg(long, env = "NTM_SERIES_TTL", default_value = "1h", value_parser = parse_duration)]
    pub series_ttl: Duration,
}

/// How the kernel side counts.
#[derive(Clone, Debug, clap::Args)]
#[command(next_help_heading = "Datapath")]
pub struct DatapathArgs {
    /// Count with TC (ingress and egress) or XDP (ingress, for mirror
    /// ports; native where the driver supports it, else generic).
    #[arg(long, env = "NTM_MODE", value_enum, default_value_t = CountMode::Tc)]
    pub mode: CountMode,

    /// XDP mode: pass frames on after counting, or drop them.
    #[arg(long, env = "NTM_XDP_ACTION", value_enum, default_value_t = XdpAction::Pass)]
    pub xdp_action: XdpAction,

    /// How to hook into TC: tcx (Linux 6.6+; the attachment dies with the
    /// process), clsact (older kernels; stale ntm filters are replaced at
    /// start), or auto (tcx where the kernel has it).
    #[arg(long, env = "NTM_ATTACH_MODE", value_enum, default_value_t = AttachMode::Auto)]
    pub attach_mode: AttachMode,

    /// How often the kernel's flow table is drained (e.g. 500ms, 2s).
    #[arg(long, env = "NTM_DRAIN_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub drain_interval: Duration,

    /// Flows each kernel flow table holds; traffic of flows beyond it is
    /// still counted, in the overflow bucket.
    #[arg(long, env = "NTM_FLOW_TABLE_SIZE", default_value_t = ntm_common::DEFAULT_FLOW_TABLE_ENTRIES,
          value_parser = clap::value_parser!(u32).range(1..=16_777_216))]
    pub flow_table_size: u32,

    /// First port of the client ephemeral range: two ports at or above it
    /// name no service.
    #[arg(long, env = "NTM_EPHEMERAL_START", default_value_t = ntm_common::service_port::DEFAULT_EPHEMERAL_START)]
    pub ephemeral_start: u16,

    /// Where in bpffs ntm keeps its programs' links and tables, one
    /// directory per network namespace, so that counting goes on while the
    /// agent restarts or upgrades and the next start takes it over. Where
    /// no bpffs is mounted there, ntm counts only while it runs.
    #[arg(long, env = "NTM_PIN_DIR", default_value = DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,

    /// How long the pinned programs go on counting with no agent (a crash
    /// with no restart, a stop without `ntm-agent detach`); after it they
    /// let every frame through uncounted until the next start or a detach.
    /// 0: until then, however long.
    #[arg(long, env = "NTM_ORPHAN_TIMEOUT", default_value = "15m", value_parser = parse_timeout)]
    pub orphan_timeout: Duration,

    /// Stop for good on SIGTERM: detach and remove the pinned state, as
    /// `ntm-agent detach` does (the Helm chart sets it before uninstalling).
    #[arg(long = "detach-on-stop", env = "NTM_DETACH_ON_STOP", value_parser = on_off(),
          action = clap::ArgAction::SetTrue)]
    pub detach_on_stop: bool,

    /// Keep nothing in bpffs: counting stops when the agent stops.
    #[arg(long = "no-pin", env = "NTM_NO_PIN", value_parser = on_off(),
          action = clap::ArgAction::SetTrue)]
    pub no_pin: bool,

    /// Do not follow TCP connections' health: the handshakes on the hooks
    /// (`<prefix>_tcp_handshake_seconds`,
    /// `<prefix>_tcp_connections_failed_total`) and the segments this
    /// host's connections retransmit (`<prefix>_tcp_retransmits_total`,
    /// from the tcp_retransmit_skb raw tracepoint, which needs the
    /// kernel's BTF).
    #[arg(long = "no-tcp-health", env = "NTM_NO_TCP_HEALTH", value_parser = on_off(),
          action = clap::ArgAction::SetTrue)]
    pub no_tcp_health: bool,
}

/// Flow export to IPFIX collectors.
#[derive(Clone, Debug, clap::Args)]
#[command(next_help_heading = "Flow export")]
pub struct ExportArgs {
    /// An IPFIX collector to send every flow to: HOST:PORT (UDP),
    /// udp://HOST:PORT or tcp://HOST:PORT; repeatable [default: none].
    #[arg(
        long = "ipfix-collector",
        env = "NTM_IPFIX_COLLECTORS",
        value_delimiter = ',',
        value_name = "HOST:PORT"
    )]
    pub ipfix_collectors: Vec<CollectorSpec>,

    /// How often each flow's counts are sent (one record per flow and
    /// interval).
    #[arg(long, env = "NTM_IPFIX_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub ipfix_interval: Duration,

    /// How often the templates are sent again over UDP (also every 100
    /// messages).
    #[arg(long, env = "NTM_IPFIX_TEMPLATE_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub ipfix_template_interval: Duration,

    /// The observation domain id in every message (collectors tell
    /// exporters apart by address and domain).
    #[arg(long, env = "NTM_IPFIX_DOMAIN", default_value_t = 1)]
    pub ipfix_domain: u32,

    /// The largest message, in bytes (the path MTU less IP and UDP
    /// headers).
    #[arg(long, env = "NTM_IPFIX_MESSAGE_SIZE", default_value_t = 1400,
          value_parser = clap::value_parser!(u16).range(512..))]
    pub ipfix_message_size: u16,
}

/// The history database.
#[derive(Clone, Debug, clap::Args)]
#[command(next_help_heading = "History")]
pub struct HistoryArgs {
    /// Where ntm keeps its state: the history database (history.db), one
    /// agent per folder.
    #[arg(
        long = "state-dir",
        env = "NTM_STATE_DIR",
        default_value = "/var/lib/ntm"
    )]
    pub state_dir: PathBuf,

    /// Keep the history in memory only (lost at each restart).
    #[arg(long = "no-history", env = "NTM_NO_HISTORY", value_parser = on_off(),
          action = clap::ArgAction::SetTrue)]
    pub no_history: bool,

    /// How often the history is committed to disk: a kill -9 loses at most
    /// this much of it (SIGTERM loses nothing).
    #[arg(long = "history-commit-interval", env = "NTM_HISTORY_COMMIT_INTERVAL",
          default_value = "10s", value_parser = parse_duration)]
    pub commit_interval: Duration,

    /// How long the minute, hour and day totals are kept.
    #[arg(long = "history-keep", env = "NTM_HISTORY_KEEP", value_name = "MINUTES,HOURS,DAYS",
          default_value = "48h,90d,5y", value_parser = parse_history_keep)]
    pub keep: (Duration, Duration, Duration),

    /// The largest the history database may grow (K, M or G bytes); past
    /// it, the oldest minutes go first, then hours, then days.
    #[arg(long = "history-max-size", env = "NTM_HISTORY_MAX_SIZE",
          default_value = "256M", value_parser = parse_size)]
    pub max_size: u64,

    /// The day of the month billing periods start on (1 to 28), for the
    /// "month" totals and quotas (as vnstat's MonthRotate).
    #[arg(long = "period-start-day", env = "NTM_PERIOD_START_DAY", default_value_t = 1,
          value_parser = clap::value_parser!(u8).range(1..=crate::outputs::history::periods::MAX_START_DAY as i64))]
    pub period_start_day: u8,

    /// A data cap per interface: IFACE=SIZE[/day|week|month] (month: the
    /// billing period), e.g. wwan0=50G/month; SIZE in bytes with k, M, G, T
    /// (powers of 1000) or Ki, Mi, Gi, Ti. Exported as <prefix>_quota_used_ratio.
    #[arg(long = "quota", env = "NTM_QUOTAS", value_delimiter = ',')]
    pub quotas: Vec<crate::outputs::history::Quota>,
}

/// `48h,90d,5y`: the minute, hour and day tiers' retention. The minutes
/// must cover a day (today's totals come from them) and the days a
/// period (62 days).
pub fn parse_history_keep(text: &str) -> Result<(Duration, Duration, Duration), String> {
    let parts: Vec<&str> = text.split(',').map(str::trim).collect();
    let [minutes, hours, days] = parts[..] else {
        return Err(format!(
            "{text:?}: give three durations, for minutes, hours and days, like 48h,90d,5y"
        ));
    };
    let long = |part: &str| -> Result<Duration, String> {
        let (number, unit) = part.split_at(
            part.find(|c: char| !c.is_ascii_digit())
                .unwrap_or(part.len()),
        );
        let n: u64 = number
            .parse()
            .map_err(|_| format!("{part:?} is not a duration like 48h, 90d or 5y"))?;
        match unit {
            "h" => Ok(Duration::from_secs(n * 3600)),
            "d" => Ok(Duration::from_secs(n * 86_400)),
            "y" => Ok(Duration::from_secs(n * 366 * 86_400)),
            _ => Err(format!("{part:?}: use h, d or y")),
        }
    };
    let (minutes, hours, days) = (long(minutes)?, long(hours)?, long(days)?);
    if minutes < Duration::from_secs(25 * 3600) {
        return Err("keep minutes for at least 25h (today's totals come from them)".into());
    }
    if hours < minutes {
        return Err("keep hours at least as long as minutes".into());
    }
    if days < Duration::from_secs(62 * 86_400) || days < hours {
        return Err("keep days for at least 62d, and at least as long as hours (period totals come from them)".into());
    }
    Ok((minutes, hours, days))
}

/// `256M`: bytes, with K, M or G (powers of 1024).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size like 64M or 1G"))?;
    let shift = match unit.trim_end_matches(['B', 'i']) {
        "" => 0,
        "K" | "k" => 10,
        "M" => 20,
        "G" => 30,
        _ => return Err(format!("{text:?}: use K, M or G")),
    };
    let bytes = n
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("{text:?} is too large"))?;
    if bytes < 1 << 20 {
        return Err("the history needs at least 1M".into());
    }
    Ok(bytes)
}

/// The endpoint.
#[derive(Clone, Debug, clap::Args)]
#[command(next_help_heading = "HTTP")]
pub struct HttpArgs {
    /// Port of the Prometheus endpoint (/metrics).
    #[arg(short = 'p', long = "port", env = "NTM_PORT", default_value_t = 8000)]
    pub port: u16,

    /// Address the Prometheus endpoint listens on.
    #[arg(
        short = 'b',
        long = "bind_ip",
        visible_alias = "bind-ip",
        env = "NTM_BIND",
        default_value = "0.0.0.0"
    )]
    pub bind_ip: IpAddr,

    /// Prefix of the metric names (<prefix>_bytes_total, ...).
    #[arg(short = 's', long = "metric_prefix", visible_alias = "metric-prefix", env = "NTM_METRIC_PREFIX",
          default_value = "ntm", value_parser = parse_metric_prefix)]
    pub metric_prefix: String,

    /// TLS and basic auth for the page, the API and /metrics: a web config
    /// file in the format of Prometheus's exporter-toolkit (node_exporter's
    /// --web.config.file). /healthz stays open for probes.
    #[arg(
        long = "web-config-file",
        env = "NTM_WEB_CONFIG_FILE",
        value_name = "FILE"
    )]
    pub web_config_file: Option<PathBuf>,
}

/// What ntm runs as.
#[derive(Clone, Debug, clap::Args)]
#[command(next_help_heading = "Privileges")]
pub struct PrivilegeArgs {
    /// After attaching, switch to this user (name, uid or uid:gid), keeping
    /// only CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON (to follow new interfaces
    /// and load new filters). Needs ntm to start as root.
    #[arg(long = "user", env = "NTM_USER", value_name = "NAME|UID[:GID]",
          value_parser = parse_user)]
    pub user: Option<User>,
}

/// What XDP mode does with a frame once counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum XdpAction {
    /// Let it go on into the stack.
    Pass,
    /// Discard it (mirrored copies nobody needs).
    Drop,
}

/// What `agent::pipeline::Pipeline` needs: the options of the stages it
/// wires, built from the configuration in one place (`Config::pipeline`).
#[derive(Clone, Debug)]
pub struct PipelineOptions {
    pub prefix: String,
    /// Labels kept on the traffic counters, each once, in order.
    pub labels: Vec<Label>,
    pub local: LocalNets,
    pub max_series: usize,
    pub series_ttl: Duration,
    /// How often the kernel is drained (the live view's rate buckets are
    /// at least this long).
    pub drain_interval: Duration,
    /// Reported as `<prefix>_flow_table_capacity`.
    pub flow_table_capacity: u32,
    pub history: HistoryOptions,
    pub names: NameOptions,
    /// Flow export; None: no collector.
    pub ipfix: Option<IpfixOptions>,
    /// First port of the client ephemeral range: which side of a
    /// connection the kernel does not key (retransmits) is the server.
    pub ephemeral_start: u16,
}

impl Config {
    /// The kernel side's options.
    pub fn kernel(&self) -> Result<KernelOptions, ConfigError> {
        Ok(KernelOptions {
            interfaces: self.resolved_interfaces()?,
            wait_for_interfaces: self.interfaces.wait_for_interfaces,
            filter: self.filter_source()?,
            count_mode: self.datapath.mode,
            attach_mode: self.datapath.attach_mode,
            pin_dir: (!self.datapath.no_pin).then(|| self.datapath.pin_dir.clone()),
            orphan_timeout: (!self.datapath.orphan_timeout.is_zero())
                .then_some(self.datapath.orphan_timeout),
            detach_on_stop: self.datapath.detach_on_stop,
            datapath: DatapathOptions {
                flow_table_entries: self.datapath.flow_table_size,
                ephemeral_start: self.datapath.ephemeral_start,
                xdp_drop: self.datapath.xdp_action == XdpAction::Drop,
                observe_rate: self.names.observe_rate,
                observe_kinds: self.observe_kinds(),
                learn_macs: self.wants_names(),
                // Learnt networks are set once the host's addresses are
                // read (`Kernel::set_mac_nets`); until then, the private
                // ranges.
                mac_nets: crate::kernel::load::mac_nets(&if self.series.local_nets.is_empty() {
                    LocalNets::private().into_iter().map(|n| n.net).collect()
                } else {
                    self.series.local_nets.clone()
                }),
                count_retransmits: !self.datapath.no_tcp_health,
                track_handshakes: !self.datapath.no_tcp_health,
                also_load: &[],
            },
        })
    }

    /// Whether any label shows hosts, by name (not `--numeric`).
    pub fn wants_names(&self) -> bool {
        let hosts = self
            .series
            .labels
            .iter()
            .any(|l| matches!(l, Label::Src | Label::Dst));
        hosts && !self.names.numeric
    }

    /// The container engines' sockets to ask for names, None: do not ask
    /// (`--no-containers`, `--numeric`, or no label shows hosts); an empty
    /// list: the default sockets.
    pub fn container_sockets(&self) -> Option<Vec<PathBuf>> {
        (self.wants_names() && !self.names.no_containers)
            .then(|| self.names.container_sockets.clone())
    }

    /// The Kubernetes rung's options, None: do not ask the container
    /// runtime (`--no-kubernetes`, `--numeric`, or no label shows hosts).
    pub fn kubernetes(&self) -> Option<KubernetesOptions> {
        (self.wants_names() && !self.names.no_kubernetes).then(|| KubernetesOptions {
            sockets: self.names.cri_sockets.clone(),
            names: self.names.k8s_names,
            node: node_name(),
            cluster_domain: self.names.cluster_domain.clone(),
        })
    }

    /// Which frames the kernel hands over for names (`observe::Kind`
    /// bits): none when no label shows hosts or with `--numeric`.
    pub fn observe_kinds(&self) -> u32 {
        if !self.wants_names() {
            return 0;
        }
        let mut kinds = 0;
        if !self.names.no_observe_dns {
            kinds |= 1 << ntm_common::observe::Kind::Dns as u32;
        }
        if !self.names.no_observe_dhcp {
            kinds |= 1 << ntm_common::observe::Kind::Dhcp as u32;
        }
        if !self.names.no_observe_tls {
            kinds |= 1 << ntm_common::observe::Kind::Tls as u32;
            kinds |= 1 << ntm_common::observe::Kind::Quic as u32;
        }
        kinds
    }

    /// The known service ports: the services file and `--service`. The
    /// default /etc/services may be missing (minimal containers have none);
    /// a file named with --services-file must be readable.
    pub fn services(&self) -> Result<ServiceRegistry, ServicesError> {
        let mut services = match &self.series.services_file {
            Some(path) => ServiceRegistry::from_file(path)?,
            None => ServiceRegistry::from_default_file()?,
        };
        for spec in &self.series.services {
            services.add(spec);
        }
        Ok(services)
    }

    /// The export side's options.
    pub fn pipeline(&self) -> PipelineOptions {
        let mut labels: Vec<Label> = Vec::new();
        for label in &self.series.labels {
            if !labels.contains(label) {
                labels.push(*label);
            }
        }
        PipelineOptions {
            prefix: self.http.metric_prefix.clone(),
            labels,
            local: if self.series.local_nets.is_empty() {
                LocalNets::learnt()
            } else {
                LocalNets::given(self.series.local_nets.clone())
            },
            max_series: self.series.max_series as usize,
            series_ttl: self.series.series_ttl,
            ephemeral_start: self.datapath.ephemeral_start,
            drain_interval: self.datapath.drain_interval,
            flow_table_capacity: self.datapath.flow_table_size,
            history: crate::outputs::history::HistoryOptions {
                state_dir: (!self.history.no_history).then(|| self.history.state_dir.clone()),
                retention: crate::outputs::history::Retention {
                    minutes: self.history.keep.0,
                    hours: self.history.keep.1,
                    days: self.history.keep.2,
                    max_bytes: self.history.max_size,
                },
                commit_interval: self.history.commit_interval,
                period_start_day: self.history.period_start_day,
                quotas: self.history.quotas.clone(),
                max_period_devices: self.series.max_series as usize,
            },
            names: NameOptions {
                upstream: if self.names.numeric {
                    None
                } else {
                    Some(
                        self.names
                            .dns_server
                            .map_or(Upstream::System, Upstream::Server),
                    )
                },
                timeout: self.names.dns_timeout,
                workers: self.names.dns_workers as usize,
                queue: DNS_QUEUE,
                fqdn: self.names.fqdn,
                wait: self.names.name_wait,
                // --numeric: addresses only, from every rung.
                hosts_files: if self.names.numeric {
                    Vec::new()
                } else {
                    self.names.hosts_files.clone()
                },
                ethers_files: if self.names.numeric {
                    Vec::new()
                } else {
                    self.names.ethers_files.clone()
                },
                lease_files: if self.names.numeric {
                    Vec::new()
                } else {
                    self.names.lease_files.clone()
                },
                answer_min_ttl: self.names.answer_min_ttl,
                handshake_names: self.observe_kinds()
                    & (1 << ntm_common::observe::Kind::Tls as u32)
                    != 0,
                container_sockets: self.container_sockets(),
                kubernetes: self.kubernetes(),
                own_addresses: self
                    .wants_names()
                    .then(crate::names::this_host::OwnAddresses::default),
            },
            ipfix: (!self.export.ipfix_collectors.is_empty()).then(|| IpfixOptions {
                collectors: self.export.ipfix_collectors.clone(),
                interval: self.export.ipfix_interval,
                settings: ExportSettings {
                    domain: self.export.ipfix_domain,
                    max_message: self.export.ipfix_message_size as usize,
                    template_interval: self.export.ipfix_template_interval,
                },
            }),
        }
    }

    /// The tcpdump filter expression, if one was given (words joined by
    /// spaces; an empty NTM_FILTERS means none).
    pub fn filter_expression(&self) -> Option<String> {
        let words: Vec<&str> = self
            .filter
            .filters
            .iter()
            .map(|w| w.trim())
            .filter(|w| !w.is_empty())
            .collect();
        (!words.is_empty()).then(|| words.join(" "))
    }

    /// Where the filter comes from; words and a file together are an error.
    pub fn filter_source(&self) -> Result<FilterSource, ConfigError> {
        // Agent options before a command (`ntm-agent --numeric detach`)
        // leave clap nothing but the filter's words to put it in.
        if let Some(first) = self.filter.filters.first().map(|w| w.trim())
            && <Self as clap::CommandFactory>::command()
                .get_subcommands()
                .any(|c| c.get_name() == first)
        {
            return Err(ConfigError::CommandAfterOptions {
                command: first.to_string(),
            });
        }
        match (self.filter_expression(), &self.filter.filter_file) {
            (Some(words), Some(file)) => Err(ConfigError::TwoFilters {
                words,
                file: file.display().to_string(),
            }),
            (Some(words), None) => Ok(FilterSource::Expression(words)),
            (None, Some(file)) => Ok(FilterSource::File(file.clone())),
            (None, None) => Ok(FilterSource::None),
        }
    }

    /// The interfaces to attach to: those given, else the default route's.
    pub fn resolved_interfaces(&self) -> Result<Vec<String>, ConfigError> {
        if !self.interfaces.interfaces.is_empty() {
            let mut seen = Vec::new();
            for iface in &self.interfaces.interfaces {
                let iface = iface.trim().to_string();
                if !iface.is_empty() && !seen.contains(&iface) {
                    seen.push(iface);
                }
            }
            if !seen.is_empty() {
                return Ok(seen);
            }
        }
        default_route_interface()
            .map(|iface| vec![iface])
            .ok_or(ConfigError::NoDefaultInterface)
    }
}

/// `PORT[/PROTO]=NAME`, checked at parse time.
fn parse_service(text: &str) -> Result<ServiceSpec, String> {
    text.parse().map_err(|e: ServicesError| e.to_string())
}

/// A user name, uid or uid:gid, looked up at parse time.
fn parse_user(text: &str) -> Result<User, String> {
    resolve_user(text).map_err(|e| e.to_string())
}

/// "IP" (port 53) or "IP:PORT" / "[IPv6]:PORT".
fn parse_pod_names(text: &str) -> Result<PodNames, String> {
    match text {
        "workload" => Ok(PodNames::Workload),
        "pod" => Ok(PodNames::Pod),
        _ => Err(format!("{text:?}: choose workload or pod")),
    }
}

pub fn parse_dns_server(text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    text.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, 53))
        .map_err(|_| {
            format!("{text:?} is not a DNS server address like 192.168.1.1 or 127.0.0.1:5353")
        })
}

/// A Prometheus metric name prefix: [a-zA-Z_:][a-zA-Z0-9_:]*.
pub fn parse_metric_prefix(text: &str) -> Result<String, String> {
    let mut chars = text.chars();
    let valid_first = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':');
    if valid_first && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
        Ok(text.to_string())
    } else {
        Err(format!(
            "{text:?} cannot start a Prometheus metric name: use letters, digits, '_' and ':', not starting with a digit"
        ))
    }
}

/// A duration, or 0 / "never" for none.
pub fn parse_timeout(text: &str) -> Result<Duration, String> {
    match text.trim() {
        "0" | "never" => Ok(Duration::ZERO),
        other => parse_duration(other),
    }
}

/// The interface of the IPv4 default route, else of the IPv6 one.
pub fn default_route_interface() -> Option<String> {
    let v4 = fs::read_to_string("/proc/net/route").unwrap_or_default();
    let v6 = fs::read_to_string("/proc/net/ipv6_route").unwrap_or_default();
    default_route_from_tables(&v4, &v6)
}

fn default_route_from_tables(ipv4_route: &str, ipv6_route: &str) -> Option<String> {
    // /proc/net/route: Iface Destination Gateway Flags ... Mask ...; the
    // default route has destination and mask 0, and RTF_UP (0x1) set.
    let v4 = ipv4_route.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let flags = u32::from_str_radix(f.get(3)?, 16).ok()?;
        (f.get(1)? == &"00000000" && f.get(7)? == &"00000000" && flags & 1 == 1)
            .then(|| f[0].to_string())
    });
    // /proc/net/ipv6_route: dest destlen src srclen nexthop metric ref use
    // flags iface; the default route is ::/0 not on lo.
    v4.or_else(|| {
        ipv6_route.lines().find_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            (f.len() >= 10 && f[0].chars().all(|c| c == '0') && f[1] == "00" && f[9] != "lo")
                .then(|| f[9].to_string())
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_from_the_kernel_follow_the_flags() {
        // -i: no default-route lookup in a unit test.
        let config = |args: &[&str]| {
            let fixed = ["ntm-agent", "-i", "eth0"];
            Config::try_parse_from(fixed.into_iter().chain(args.iter().copied())).unwrap()
        };
        let dns = 1 << ntm_common::observe::Kind::Dns as u32;
        let dhcp = 1 << ntm_common::observe::Kind::Dhcp as u32;
        let tls = 1 << ntm_common::observe::Kind::Tls as u32
            | 1 << ntm_common::observe::Kind::Quic as u32;
        let on = config(&[]);
        assert_eq!(on.observe_kinds(), dns | dhcp | tls, "on by default");
        assert_eq!(config(&["--no-observe-tls"]).observe_kinds(), dns | dhcp);
        assert!(on.kernel().unwrap().datapath.learn_macs);
        assert_eq!(
            on.container_sockets(),
            Some(Vec::new()),
            "the default sockets"
        );
        assert_eq!(config(&["--no-observe-dns"]).observe_kinds(), dhcp | tls);
        assert_eq!(config(&["--no-observe-dhcp"]).observe_kinds(), dns | tls);
        assert_eq!(config(&["--no-containers"]).container_sockets(), None);
        assert_eq!(
            config(&["--container-socket", "/run/a.sock,/run/b.sock"]).container_sockets(),
            Some(vec![
                PathBuf::from("/run/a.sock"),
                PathBuf::from("/run/b.sock")
            ])
        );
        // No names at all: nothing observed, learnt or asked.
        for off in [&["--numeric"][..], &["--labels", "service,iface"][..]] {
            let c = config(off);
            assert_eq!(c.observe_kinds(), 0, "{off:?}");
            assert!(!c.kernel().unwrap().datapath.learn_macs, "{off:?}");
            assert_eq!(c.container_sockets(), None, "{off:?}");
        }
        assert!(Config::try_parse_from(["ntm-agent", "--observe-rate", "0"]).is_err());
        assert_eq!(
            config(&["--dns-answer-min-ttl", "5s"])
                .pipeline()
                .names
                .answer_min_ttl,
            Duration::from_secs(5)
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("fast").is_err());
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert!(parse_duration("5d").is_err());
    }

    #[test]
    fn default_route_ipv4_then_ipv6() {
        let v4 = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                  eth1\t0012A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
                  eth0\t00000000\t0102A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n";
        let v6 = "00000000000000000000000000000000 00 00000000000000000000000000000000 00 fe800000000000000000000000000001 00000400 00000001 00000000 00000003 wan6\n";
        assert_eq!(default_route_from_tables(v4, v6), Some("eth0".into()));
        assert_eq!(
            default_route_from_tables("header\n", v6),
            Some("wan6".into())
        );
        assert_eq!(default_route_from_tables("header\n", ""), None);
    }

    #[test]
    fn orphan_timeout_and_pinning_from_flags() {
        let c = Config::try_parse_from(["ntm-agent", "-i", "eth0"]).unwrap();
        let k = c.kernel().unwrap();
        assert_eq!(
            k.pin_dir.as_deref(),
            Some(std::path::Path::new(DEFAULT_PIN_DIR))
        );
        assert_eq!(k.orphan_timeout, Some(Duration::from_secs(15 * 60)));
        let c = Config::try_parse_from([
            "ntm-agent",
            "-i",
            "eth0",
            "--no-pin",
            "--orphan-timeout",
            "never",
        ])
        .unwrap();
        let k = c.kernel().unwrap();
        assert_eq!((k.pin_dir, k.orphan_timeout), (None, None));
        assert!(Config::try_parse_from(["ntm-agent", "--orphan-timeout", "soon"]).is_err());
        let late = Config::try_parse_from(["ntm-agent", "--numeric", "detach"]).unwrap();
        match late.filter_source() {
            Err(ConfigError::CommandAfterOptions { command }) => assert_eq!(command, "detach"),
            other => panic!("{other:?}"),
        }
        match Config::try_parse_from(["ntm-agent", "detach", "--pin-dir", "/x"])
            .unwrap()
            .command
        {
            Some(Command::Detach { pin_dir }) => assert_eq!(pin_dir, PathBuf::from("/x")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn interfaces_from_flags_and_env_style_lists() {
        let c = Config::try_parse_from(["ntm-agent", "-i", "br0,wan", "--iface", "br0"]).unwrap();
        assert_eq!(c.resolved_interfaces().unwrap(), vec!["br0", "wan"]);
        let c = Config::try_parse_from(["ntm-agent", "--interface", "eth9"]).unwrap();
        assert_eq!(c.resolved_interfaces().unwrap(), vec!["eth9"]);
    }

    #[test]
    fn every_option_has_its_env_var_and_the_old_spellings() {
        use clap::CommandFactory;
        let command = Config::command();
        let env_of = |id: &str| {
            command
                .get_arguments()
                .find(|a| a.get_id() == id)
                .and_then(|a| a.get_env())
                .map(|e| e.to_string_lossy().into_owned())
        };
        for (id, env) in [
            ("filters", "NTM_FILTERS"),
            ("filter_file", "NTM_FILTER_FILE"),
            ("user", "NTM_USER"),
            ("interfaces", "NTM_INTERFACE"),
            ("port", "NTM_PORT"),
            ("bind_ip", "NTM_BIND"),
            ("metric_prefix", "NTM_METRIC_PREFIX"),
            ("fqdn", "NTM_FQDN"),
            ("numeric", "NTM_NUMERIC"),
            ("labels", "NTM_LABELS"),
            ("local_nets", "NTM_LOCAL_NETS"),
            ("max_series", "NTM_MAX_SERIES"),
            ("series_ttl", "NTM_SERIES_TTL"),
            ("dns_server", "NTM_DNS_SERVER"),
            ("drain_interval", "NTM_DRAIN_INTERVAL"),
        ] {
            assert_eq!(env_of(id).as_deref(), Some(env), "{id}");
        }
        // Every option has one (flags without are a gap in the drop-in story).
        for arg in command.get_arguments() {
            let id = arg.get_id().as_str();
            if id != "help" && id != "version" {
                assert!(arg.get_env().is_some(), "--{id} has no NTM_ variable");
            }
        }
        // The old tool's spellings, short and long, and kebab-case.
        let parse = |args: &[&str]| Config::try_parse_from(args).unwrap();
        for args in [
            &[
                "ntm",
                "-p",
                "9000",
                "-b",
                "127.0.0.1",
                "-s",
                "home",
                "-f",
                "-i",
                "eth1",
            ][..],
            &[
                "ntm",
                "--port",
                "9000",
                "--bind_ip",
                "127.0.0.1",
                "--metric_prefix",
                "home",
                "--fqdn",
                "--interface",
                "eth1",
            ],
            &[
                "ntm",
                "--port=9000",
                "--bind-ip",
                "127.0.0.1",
                "--metric-prefix",
                "home",
                "--fqdn",
                "--iface",
                "eth1",
            ],
        ] {
            let c = parse(args);
            assert_eq!(c.http.port, 9000, "{args:?}");
            assert_eq!(c.http.bind_ip.to_string(), "127.0.0.1");
            assert_eq!(c.http.metric_prefix, "home");
            assert!(c.names.fqdn);
            assert_eq!(c.interfaces.interfaces, vec!["eth1"]);
        }
        let c = parse(&[
            "ntm",
            "-i",
            "eth0",
            "src",
            "net",
            "192.168.0.0/24",
            "or",
            "dst",
            "net",
            "192.168.0.0/24",
        ]);
        assert_eq!(
            c.filter_expression().as_deref(),
            Some("src net 192.168.0.0/24 or dst net 192.168.0.0/24")
        );
        assert_eq!(parse(&["ntm", "-i", "eth0"]).filter_expression(), None);
        assert_eq!(
            parse(&["ntm", "-i", "eth0"]).filter_source().unwrap(),
            FilterSource::None
        );
        assert_eq!(
            parse(&["ntm", "-F", "/etc/ntm.filter"])
                .filter_source()
                .unwrap(),
            FilterSource::File("/etc/ntm.filter".into())
        );
        assert_eq!(
            parse(&["ntm", "udp"]).filter_source().unwrap(),
            FilterSource::Expression("udp".into())
        );
        let both = parse(&["ntm", "-F", "/etc/ntm.filter", "udp"])
            .filter_source()
            .unwrap_err()
            .to_string();
        assert!(both.contains("one way"), "{both}");
        assert!(Config::try_parse_from(["ntm", "-s", "9bad"]).is_err());
        assert!(Config::try_parse_from(["ntm", "--labels", "src,colour"]).is_err());
        assert!(Config::try_parse_from(["ntm", "--local-net", "10.0.0.0/33"]).is_err());
    }

    /// Set in a child run of this test binary: the child prints what
    /// every on/off flag's variable made of the value its parent gave.
    const BOOLEAN_ENV_CHILD: &str = "NTM_TEST_BOOLEAN_ENV_CHILD";

    /// Every on/off flag (on when given) that has an environment variable,
    /// a new one included: (id, long name, variable).
    fn boolean_flags_with_env() -> Vec<(String, String, String)> {
        use clap::CommandFactory;
        Config::command()
            .get_arguments()
            .filter(|a| matches!(a.get_action(), clap::ArgAction::SetTrue))
            .filter_map(|a| {
                Some((
                    a.get_id().to_string(),
                    a.get_long()?.to_string(),
                    a.get_env()?.to_string_lossy().into_owned(),
                ))
            })
            .collect()
    }

    /// Every on/off flag's variable takes the same values (1/0,
    /// true/false, yes/no, on/off), 0 and false meaning off, and each is
    /// still a flag without a value on the command line. Clap reads the
    /// variables when the command is built and a test must not change
    /// the environment of the others running beside it: each value is
    /// tried in a child run of this binary.
    #[test]
    fn every_boolean_env_var_takes_the_same_values() {
        use clap::CommandFactory;
        let flags = boolean_flags_with_env();
        for name in ["NTM_NO_HISTORY", "NTM_NUMERIC", "NTM_NO_PIN"] {
            assert!(flags.iter().any(|(_, _, env)| env == name), "{name}");
        }
        for (id, long, _) in &flags {
            let matches = Config::command()
                .try_get_matches_from(["ntm-agent", &format!("--{long}")])
                .unwrap_or_else(|e| panic!("--{long}: {e}"));
            assert!(matches.get_flag(id), "--{long}");
        }
        let exe = std::env::current_exe().unwrap();
        for (value, on) in [
            ("1", true),
            ("0", false),
            ("true", true),
            ("false", false),
            ("yes", true),
            ("no", false),
            ("on", true),
            ("off", false),
        ] {
            let mut child = std::process::Command::new(&exe);
            child
                .args(["config::tests::boolean_env_vars_in_a_child", "--exact"])
                .args(["--nocapture", "--test-threads=1"])
                .env(BOOLEAN_ENV_CHILD, "1");
            for (_, _, env) in &flags {
                child.env(env, value);
            }
            let out = child.output().unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "={value}: {stdout}{stderr}");
            for (id, _, env) in &flags {
                assert!(
                    stdout.contains(&format!("flag {id} {on}\n")),
                    "{env}={value} should be {on}: {stdout}{stderr}"
                );
            }
        }
    }

    /// The child's half of the test above (nothing to do in a normal run).
    #[test]
    fn boolean_env_vars_in_a_child() {
        use clap::CommandFactory;
        if std::env::var_os(BOOLEAN_ENV_CHILD).is_none() {
            return;
        }
        let matches = Config::command()
            .try_get_matches_from(["ntm-agent"])
            .unwrap_or_else(|e| panic!("{e}"));
        for (id, _, _) in boolean_flags_with_env() {
            println!("flag {id} {}", matches.get_flag(&id));
        }
    }

    #[test]
    fn defaults() {
        let c = Config::try_parse_from(["ntm-agent"]).unwrap();
        assert_eq!(c.datapath.drain_interval, Duration::from_secs(1));
        assert_eq!(c.datapath.flow_table_size, 65_536);
        assert_eq!(c.datapath.ephemeral_start, 32_768);
        assert!(Config::try_parse_from(["ntm-agent", "--flow-table-size", "0"]).is_err());
    }
}
