//! Pods on this node by workload (a rung beside the containers'): the
//! node's own container runtime, read over its CRI socket as kubelet
//! reads it (`cri.rs`), names each pod address `NAMESPACE/WORKLOAD`
//! (`workload.rs`), or `NAMESPACE/POD` with `--k8s-names pod`; the node's
//! own addresses, which host-network pods share, are named by the node's
//! name. No apiserver, no RBAC: memory in proportion to the node's pods.
//!
//! A task asks every runtime socket there is every [`POLL_EVERY`], and at
//! once when the runtime's event stream says something changed; the drain
//! loop only reads the shared table. A runtime that is not there, stops or
//! restarts is logged once, retried with backoff and counted; the names it
//! gave stay until it lists their sandboxes as gone.
//!
//! Pods elsewhere in the cluster are named in Prometheus instead: every
//! node exports `<prefix>_k8s_pod_info` for its own pods and
//! `<prefix>_node_info` for itself, to join on (see docs/kubernetes.md).

pub mod cri;
pub mod workload;

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    path::PathBuf,
    sync::{Arc, RwLock},
    time::Duration,
};

use self::cri::{EventStream, Runtime, Sandbox};
use super::source::{Lookup, NameSource, Query, Source, TableSizes};
use crate::{
    health::self_metrics::KubernetesMetrics,
    kernel::links,
    model::{series::usable_name, sync},
};

/// Where the runtimes listen by default: containerd, CRI-O, k3s, k0s and
/// microk8s. The ones that exist are asked.
pub const DEFAULT_SOCKETS: [&str; 5] = [
    "/run/containerd/containerd.sock",
    "/run/crio/crio.sock",
    "/run/k3s/containerd/containerd.sock",
    "/run/k0s/containerd.sock",
    "/var/snap/microk8s/common/run/containerd.sock",
];

/// How often the runtimes are asked (an event makes it sooner).
pub const POLL_EVERY: Duration = Duration::from_secs(2);
/// The longest wait before asking a failing runtime again.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Addresses whose pod changed, remembered at most between two drains
/// (past it, the oldest news is dropped: those addresses keep their label
/// until it expires).
const MAX_RENAMED: usize = 4096;

/// What a pod address is labelled with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PodNames {
    /// `NAMESPACE/WORKLOAD`: series bounded by the workloads, not the pods.
    #[default]
    Workload,
    /// `NAMESPACE/POD`.
    Pod,
}

/// The Kubernetes rung's options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KubernetesOptions {
    /// The runtime sockets (the default ones that exist, if empty).
    pub sockets: Vec<PathBuf>,
    pub names: PodNames,
    /// This node's name (`NODE_NAME` from the downward API, else the host
    /// name).
    pub node: String,
    /// The cluster's DNS domain (kubelet's `clusterDomain`).
    pub cluster_domain: String,
}

/// The label of a Service's DNS name: `web.shop.svc.cluster.local` (with
/// `cluster.local` the cluster's domain) is `web.shop`, SERVICE.NAMESPACE
/// (a headless Service's pod record keeps its pod: `db-0.db.shop`); None
/// for any other name. Such a name is the cluster's, not a registrable
/// domain's: it is never cut to one.
pub fn service_label(name: &str, cluster_domain: &str) -> Option<String> {
    let name = name.strip_suffix('.').unwrap_or(name);
    let domain = cluster_domain.trim_matches('.');
    if domain.is_empty() || name.len() <= domain.len() + 5 {
        return None;
    }
    let (service, suffix) = name.split_at(name.len() - domain.len() - 5);
    let in_cluster = suffix.len() == domain.len() + 5
        && suffix[..5].eq_ignore_ascii_case(".svc.")
        && suffix[5..].eq_ignore_ascii_case(domain);
    // SERVICE.NAMESPACE at least.
    (in_cluster && service.contains('.') && !service.starts_with('.'))
        .then(|| service.to_ascii_lowercase())
}

/// A pod address's owner.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Owner {
    label: String,
    uid: String,
}

/// What the poller found, shared with the ladder.
#[derive(Default)]
struct Table {
    /// Pod addresses, and the node's own.
    owners: HashMap<IpAddr, Owner>,
    /// Addresses whose owner changed since the ladder last asked.
    renamed: HashSet<IpAddr>,
    /// Sandboxes on the node now.
    pods: usize,
}

/// The Kubernetes rung: reads the table the poller keeps.
#[derive(Clone)]
pub struct KubernetesNames {
    table: Arc<RwLock<Table>>,
}

impl KubernetesNames {
    /// Starts asking the runtimes, on a task of the current tokio runtime.
    pub fn spawn(options: KubernetesOptions, metrics: KubernetesMetrics) -> Self {
        let names = Self {
            table: Arc::default(),
        };
        let explicit = !options.sockets.is_empty();
        let sockets: Vec<PathBuf> = if explicit {
            options.sockets.clone()
        } else {
            DEFAULT_SOCKETS.iter().map(PathBuf::from).collect()
        };
        let changed = Arc::new(tokio::sync::Notify::new());
        let mut runtimes = Vec::new();
        for socket in sockets {
            if !explicit && !socket.exists() {
                continue;
            }
            tokio::spawn(watch_events(socket.clone(), Arc::clone(&changed)));
            runtimes.push(Polled {
                runtime: Runtime::new(socket),
                failing: None,
                retry_at: tokio::time::Instant::now(),
                backoff: POLL_EVERY,
                sandboxes: Vec::new(),
            });
        }
        if runtimes.is_empty() {
            log::debug!("kubernetes names: no container runtime socket here");
            return names;
        }
        let shared = Arc::clone(&names.table);
        tokio::spawn(async move {
            let mut poller = Poller {
                runtimes,
                options,
                metrics,
                table: shared,
                answered: false,
                published_pods: HashSet::new(),
                published_nodes: HashSet::new(),
            };
            loop {
                poller.poll().await;
                tokio::select! {
                    () = tokio::time::sleep(POLL_EVERY) => {}
                    () = changed.notified() => {
                        // Let the runtime finish what it is doing (a sandbox
                        // gets its address after its event).
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        names
    }
}

impl NameSource for KubernetesNames {
    fn name(&mut self, query: &Query) -> Lookup {
        match sync::read(&self.table).owners.get(&query.ip) {
            Some(owner) => Lookup::Name(owner.label.clone(), Source::Kubernetes),
            None => Lookup::Next,
        }
    }

    fn renamed(&mut self) -> Vec<IpAddr> {
        let mut table = sync::write(&self.table);
        if table.renamed.is_empty() {
            return Vec::new();
        }
        table.renamed.drain().collect()
    }

    fn table_sizes(&self, sizes: &mut TableSizes) {
        sizes.pods += sync::read(&self.table).pods;
    }
}

/// One runtime and how asking it goes.
struct Polled {
    runtime: Runtime,
    /// Since when asking it fails, None while it answers (logged once per
    /// failure, and once when it answers again).
    failing: Option<tokio::time::Instant>,
    retry_at: tokio::time::Instant,
    backoff: Duration,
    /// What it listed last (kept while it fails).
    sandboxes: Vec<Sandbox>,
}

struct Poller {
    runtimes: Vec<Polled>,
    options: KubernetesOptions,
    metrics: KubernetesMetrics,
    table: Arc<RwLock<Table>>,
    /// Whether any runtime has answered yet.
    answered: bool,
    /// The label sets of the pod and node info exported now.
    published_pods: HashSet<Vec<String>>,
    published_nodes: HashSet<Vec<String>>,
}

impl Poller {
    async fn poll(&mut self) {
        let now = tokio::time::Instant::now();
        for polled in &mut self.runtimes {
            if now < polled.retry_at {
                continue;
            }
            let socket = polled.runtime.socket().display().to_string();
            match polled.runtime.sandboxes().await {
                Ok(sandboxes) => {
                    if polled.failing.take().is_some() {
                        log::info!("kubernetes names: {socket} answers again");
                    }
                    polled.backoff = POLL_EVERY;
                    polled.retry_at = now;
                    polled.sandboxes = sandboxes;
                }
                Err(e) => {
                    self.metrics
                        .runtime_errors
                        .with_label_values(&[&socket])
                        .inc();
                    if polled.failing.is_none() {
                        log::warn!(
                            "kubernetes names: {e} (is the runtime running, and may ntm read its socket? names already given stay; --no-kubernetes turns this off)"
                        );
                        polled.failing = Some(now);
                    }
                    polled.retry_at = now + polled.backoff;
                    polled.backoff = (polled.backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
        self.answered |= self.runtimes.iter().any(|p| p.failing.is_none());
        // The node is named once a runtime has answered: this is a node.
        let node_addresses = if self.answered {
            node_addresses()
        } else {
            Vec::new()
        };
        let sandboxes: Vec<&Sandbox> = self.runtimes.iter().flat_map(|p| &p.sandboxes).collect();
        let owners = owners(&sandboxes, &node_addresses, &self.options);
        let (pods, nodes) = info_labels(&sandboxes, &node_addresses, &self.options.node);
        update(&self.metrics.pod_info, &mut self.published_pods, pods);
        update(&self.metrics.node_info, &mut self.published_nodes, nodes);
        let mut table = sync::write(&self.table);
        // An address whose owner came, went or changed is labelled afresh
        // (its old label was sticky for its series' life).
        let renamed: Vec<IpAddr> = owners
            .keys()
            .chain(table.owners.keys())
            .filter(|ip| owners.get(ip) != table.owners.get(ip))
            .copied()
            .collect();
        table.renamed.extend(renamed);
        if table.renamed.len() > MAX_RENAMED {
            table.renamed.clear();
        }
        table.owners = owners;
        table.pods = sandboxes.len();
    }
}

/// The label sets of `<prefix>_k8s_pod_info` and `<prefix>_node_info` as
/// the node is now.
fn info_labels(
    sandboxes: &[&Sandbox],
    node_addresses: &[IpAddr],
    node: &str,
) -> (HashSet<Vec<String>>, HashSet<Vec<String>>) {
    let pods = sandboxes
        .iter()
        .flat_map(|sandbox| {
            sandbox.ips.iter().map(|ip| {
                vec![
                    ip.to_string(),
                    sandbox.namespace.clone(),
                    sandbox.pod.clone(),
                    sandbox.workload.name.clone(),
                    sandbox.workload.kind.as_str().to_string(),
                    node.to_string(),
                ]
            })
        })
        .collect();
    let nodes = node_addresses
        .iter()
        .map(|ip| vec![node.to_string(), ip.to_string()])
        .collect();
    (pods, nodes)
}

/// Sets `gauge` to 1 for each label set in `now` and removes those of
/// `published` no longer in it; `published` becomes `now`. Only what
/// changed is touched: a scrape never sees the info half rebuilt, and a
/// pod that went is gone from it.
fn update(
    gauge: &prometheus::IntGaugeVec,
    published: &mut HashSet<Vec<String>>,
    now: HashSet<Vec<String>>,
) {
    for gone in published.difference(&now) {
        let _ = gauge.remove_label_values(&label_values(gone));
    }
    for new in now.difference(published) {
        gauge.with_label_values(&label_values(new)).set(1);
    }
    *published = now;
}

fn label_values(labels: &[String]) -> Vec<&str> {
    labels.iter().map(String::as_str).collect()
}

/// Who owns each address: a pod's addresses its label; the node's own
/// addresses (which host-network pods share) the node's name.
fn owners(
    sandboxes: &[&Sandbox],
    node_addresses: &[IpAddr],
    options: &KubernetesOptions,
) -> HashMap<IpAddr, Owner> {
    let mut owners = HashMap::new();
    if usable_name(&options.node) {
        for ip in node_addresses {
            owners.insert(
                *ip,
                Owner {
                    label: options.node.clone(),
                    uid: String::new(),
                },
            );
        }
    }
    for sandbox in sandboxes {
        let name = match options.names {
            PodNames::Workload => &sandbox.workload.name,
            PodNames::Pod => &sandbox.pod,
        };
        let label = format!("{}/{name}", sandbox.namespace);
        for ip in &sandbox.ips {
            owners.insert(
                *ip,
                Owner {
                    label: label.clone(),
                    uid: sandbox.uid.clone(),
                },
            );
        }
    }
    owners
}

/// The node's addresses that other hosts reach it by.
fn node_addresses() -> Vec<IpAddr> {
    match links::global_addresses() {
        Ok(addresses) => addresses.into_iter().map(|a| a.address).collect(),
        Err(e) => {
            log::debug!("kubernetes names: the node's addresses: {e}");
            Vec::new()
        }
    }
}

/// Follows a runtime's event stream, waking the poller at each event;
/// returns if the runtime has none. Reconnects with backoff.
async fn watch_events(socket: PathBuf, changed: Arc<tokio::sync::Notify>) {
    let mut backoff = POLL_EVERY;
    loop {
        let runtime = Runtime::new(socket.clone());
        match runtime.events().await {
            Ok(EventStream::Unsupported) => {
                log::debug!(
                    "kubernetes names: {} has no event stream; asking every {:?}",
                    socket.display(),
                    POLL_EVERY
                );
                return;
            }
            Ok(EventStream::Open(mut stream)) => {
                backoff = POLL_EVERY;
                while let Ok(Some(_event)) = stream.message().await {
                    changed.notify_one();
                }
            }
            Err(e) => log::debug!("kubernetes names: events: {e}"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// This node's name: `NODE_NAME` (the chart sets it from the downward
/// API), else the host name.
pub fn node_name() -> String {
    std::env::var("NODE_NAME")
        .ok()
        .filter(|n| usable_name(n))
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
                .filter(|h| usable_name(h))
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use workload::{Workload, WorkloadKind};

    fn sandbox(pod: &str, uid: &str, workload: &str, ips: &[&str]) -> Sandbox {
        Sandbox {
            id: format!("id-{uid}"),
            namespace: "shop".into(),
            pod: pod.into(),
            uid: uid.into(),
            workload: Workload {
                name: workload.into(),
                kind: WorkloadKind::Deployment,
            },
            ips: ips.iter().map(|ip| ip.parse().unwrap()).collect(),
            host_network: ips.is_empty(),
        }
    }

    fn options(names: PodNames) -> KubernetesOptions {
        KubernetesOptions {
            sockets: Vec::new(),
            names,
            node: "node-a".into(),
            cluster_domain: "cluster.local".into(),
        }
    }

    #[test]
    fn the_info_changes_only_where_pods_came_or_went() {
        use prometheus::core::Collector as _;
        let gauge = prometheus::IntGaugeVec::new(
            prometheus::Opts::new("info", "test"),
            &["address", "pod"],
        )
        .unwrap();
        let set = |pairs: &[(&str, &str)]| -> HashSet<Vec<String>> {
            pairs
                .iter()
                .map(|(a, p)| vec![a.to_string(), p.to_string()])
                .collect()
        };
        let mut published = HashSet::new();
        update(
            &gauge,
            &mut published,
            set(&[("198.18.0.5", "web"), ("198.18.0.6", "db")]),
        );
        gauge.with_label_values(&["198.18.0.6", "db"]).set(7);
        update(
            &gauge,
            &mut published,
            set(&[("198.18.0.6", "db"), ("198.18.0.7", "cache")]),
        );
        let mut now: Vec<(String, i64)> = gauge
            .collect()
            .iter()
            .flat_map(|family| family.get_metric().to_vec())
            .map(|m| {
                (
                    m.get_label()[0].value().to_string(),
                    m.get_gauge().get_value() as i64,
                )
            })
            .collect();
        now.sort();
        // web is gone, cache came, db was left alone (7: not set again).
        assert_eq!(
            now,
            [("198.18.0.6".to_string(), 7), ("198.18.0.7".to_string(), 1)]
        );
    }

    #[test]
    fn service_names_are_service_dot_namespace() {
        let label = |name| service_label(name, "cluster.local");
        assert_eq!(label("web.shop.svc.cluster.local"), Some("web.shop".into()));
        assert_eq!(
            label("WEB.Shop.svc.Cluster.Local."),
            Some("web.shop".into())
        );
        assert_eq!(
            label("db-0.db.shop.svc.cluster.local"),
            Some("db-0.db.shop".into())
        );
        assert_eq!(
            service_label("web.shop.svc.k8s.example", "k8s.example"),
            Some("web.shop".into())
        );
        for other in [
            "web.svc.cluster.local",
            "svc.cluster.local",
            ".shop.svc.cluster.local",
            "web.shop.svc.cluster.local.evil.com",
            "web.shop.pod.cluster.local",
            "www.example.com",
            "",
            "cluster.local",
        ] {
            assert_eq!(label(other), None, "{other}");
        }
    }

    #[test]
    fn pods_by_workload_or_by_pod_and_the_node_by_its_name() {
        let web = sandbox("web-5d9f8-abcde", "u1", "web", &["198.18.0.5", "2001:2::5"]);
        let agent = sandbox("agent", "u2", "agent", &[]);
        let node: IpAddr = "198.18.0.1".parse().unwrap();
        let by_workload = owners(&[&web, &agent], &[node], &options(PodNames::Workload));
        let label = |o: &HashMap<IpAddr, Owner>, ip: &str| o[&ip.parse().unwrap()].label.clone();
        assert_eq!(label(&by_workload, "198.18.0.5"), "shop/web");
        assert_eq!(label(&by_workload, "2001:2::5"), "shop/web");
        assert_eq!(label(&by_workload, "198.18.0.1"), "node-a");
        assert_eq!(by_workload.len(), 3, "the host-network pod has no address");
        let by_pod = owners(&[&web], &[], &options(PodNames::Pod));
        assert_eq!(label(&by_pod, "198.18.0.5"), "shop/web-5d9f8-abcde");
    }
}
