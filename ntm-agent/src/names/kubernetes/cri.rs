//! One container runtime's CRI (containerd, CRI-O, k3s, k0s, microk8s),
//! spoken as kubelet speaks it: gRPC over the runtime's Unix socket, with
//! k8s-cri's generated client. Read only: the node's pod sandboxes and
//! their status, and the runtime's event stream where it has one
//! (containerd 1.7+, CRI-O 1.26+), which only says "look again".
//!
//! Everything a runtime answers is hostile input: names are checked, only
//! the labels the workload needs are kept, and every answer is bounded.

use std::{
    collections::HashMap,
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use hyper_util::rt::TokioIo;
use k8s_cri::v1::{
    GetEventsRequest, ListPodSandboxRequest, NamespaceMode, PodSandboxFilter, PodSandboxState,
    PodSandboxStateValue, PodSandboxStatus, PodSandboxStatusRequest,
    runtime_service_client::RuntimeServiceClient,
};
use tonic::transport::{Channel, Endpoint, Uri};

use super::workload::{Workload, workload};
use crate::model::series::usable_name;

/// How long one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Sandboxes read from one runtime at most (kubelet's default is 110 pods
/// per node; large nodes run a few hundred).
pub const MAX_SANDBOXES: usize = 4096;
/// IP addresses of one sandbox kept at most (IPv4 and IPv6, a few extra).
const MAX_IPS_PER_SANDBOX: usize = 8;
/// Kubernetes' limit on a name (DNS subdomain).
const MAX_K8S_NAME: usize = 253;

/// The labels a workload is derived from; every other label is dropped.
const WORKLOAD_LABELS: [&str; 6] = [
    "pod-template-hash",
    "statefulset.kubernetes.io/pod-name",
    "controller-revision-hash",
    "pod-template-generation",
    "batch.kubernetes.io/job-name",
    "job-name",
];

/// Asking a runtime failed.
#[derive(Debug, thiserror::Error)]
pub enum CriError {
    #[error("cannot connect to {}: {source}", socket.display())]
    Connect {
        socket: PathBuf,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("{call} on {}: {source}", socket.display())]
    Call {
        call: &'static str,
        socket: PathBuf,
        #[source]
        source: Box<tonic::Status>,
    },
}

/// One pod sandbox, as ntm keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sandbox {
    pub id: String,
    pub namespace: String,
    pub pod: String,
    pub uid: String,
    pub workload: Workload,
    /// The pod's own addresses; none for a host-network pod.
    pub ips: Vec<IpAddr>,
    /// It shares the node's network namespace (`hostNetwork: true`).
    pub host_network: bool,
}

impl Sandbox {
    /// The sandbox a status describes, if its metadata is usable.
    fn from_status(status: PodSandboxStatus) -> Option<Sandbox> {
        let metadata = status.metadata?;
        let name_ok = |n: &str| usable_name(n) && n.len() <= MAX_K8S_NAME && !n.contains('/');
        if !name_ok(&metadata.name) || !name_ok(&metadata.namespace) {
            return None;
        }
        let labels: HashMap<&str, &str> = status
            .labels
            .iter()
            .filter(|(k, v)| WORKLOAD_LABELS.contains(&k.as_str()) && v.len() <= MAX_K8S_NAME)
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let workload = workload(&metadata.name, |key| labels.get(key).copied());
        let host_network = status
            .linux
            .and_then(|l| l.namespaces)
            .and_then(|n| n.options)
            .is_some_and(|o| o.network == NamespaceMode::Node as i32);
        let mut ips = Vec::new();
        if !host_network && let Some(network) = status.network {
            let all =
                std::iter::once(network.ip).chain(network.additional_ips.into_iter().map(|p| p.ip));
            for ip in all.filter_map(|ip| ip.parse::<IpAddr>().ok()) {
                if ips.len() < MAX_IPS_PER_SANDBOX && !ips.contains(&ip) {
                    ips.push(ip);
                }
            }
        }
        Some(Sandbox {
            id: status.id,
            namespace: metadata.namespace,
            pod: metadata.name,
            uid: metadata.uid,
            workload,
            ips,
            host_network,
        })
    }
}

/// A runtime behind one socket, and what it said of each sandbox (a
/// sandbox's status does not change while it is ready, so it is asked
/// once).
pub struct Runtime {
    socket: PathBuf,
    client: Option<RuntimeServiceClient<Channel>>,
    known: HashMap<String, Option<Sandbox>>,
}

impl Runtime {
    pub fn new(socket: PathBuf) -> Self {
        Self {
            socket,
            client: None,
            known: HashMap::new(),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    async fn client(&mut self) -> Result<RuntimeServiceClient<Channel>, CriError> {
        if let Some(client) = &self.client {
            return Ok(client.clone());
        }
        let client = connect(&self.socket).await?;
        self.client = Some(client.clone());
        Ok(client)
    }

    fn call_failed(&mut self, call: &'static str, status: tonic::Status) -> CriError {
        // The runtime may have restarted: connect afresh next time.
        self.client = None;
        CriError::Call {
            call,
            socket: self.socket.clone(),
            source: Box::new(status),
        }
    }

    /// The node's ready pod sandboxes, at most [`MAX_SANDBOXES`].
    pub async fn sandboxes(&mut self) -> Result<Vec<Sandbox>, CriError> {
        let mut client = self.client().await?;
        let request = ListPodSandboxRequest {
            filter: Some(PodSandboxFilter {
                state: Some(PodSandboxStateValue {
                    state: PodSandboxState::SandboxReady as i32,
                }),
                ..Default::default()
            }),
        };
        let items = match client.list_pod_sandbox(request).await {
            Ok(response) => response.into_inner().items,
            Err(status) => return Err(self.call_failed("ListPodSandbox", status)),
        };
        let mut listed: HashMap<String, Option<Sandbox>> = HashMap::new();
        for item in items.into_iter().take(MAX_SANDBOXES) {
            if let Some(known) = self.known.remove(&item.id) {
                listed.insert(item.id, known);
                continue;
            }
            let request = PodSandboxStatusRequest {
                pod_sandbox_id: item.id.clone(),
                verbose: false,
            };
            let sandbox = match client.pod_sandbox_status(request).await {
                Ok(response) => response.into_inner().status.and_then(Sandbox::from_status),
                // Gone between the list and the status: not there.
                Err(status) if status.code() == tonic::Code::NotFound => continue,
                Err(status) => return Err(self.call_failed("PodSandboxStatus", status)),
            };
            listed.insert(item.id, sandbox);
        }
        // Sandboxes no longer listed are forgotten with the old map.
        self.known = listed;
        Ok(self.known.values().flatten().cloned().collect())
    }

    /// The runtime's stream of container and sandbox events, or
    /// `Unsupported` when it has none (then polling is all there is).
    pub async fn events(&self) -> Result<EventStream, CriError> {
        let mut client = connect(&self.socket).await?;
        match client.get_container_events(GetEventsRequest {}).await {
            Ok(stream) => Ok(EventStream::Open(Box::new(stream.into_inner()))),
            Err(status) if status.code() == tonic::Code::Unimplemented => {
                Ok(EventStream::Unsupported)
            }
            Err(status) => Err(CriError::Call {
                call: "GetContainerEvents",
                socket: self.socket.clone(),
                source: Box::new(status),
            }),
        }
    }
}

/// A runtime's event stream, or the news that it has none.
pub enum EventStream {
    Open(Box<tonic::codec::Streaming<k8s_cri::v1::ContainerEventResponse>>),
    Unsupported,
}

/// A client on the runtime's Unix socket. (The URI is a placeholder that
/// tonic requires; the connector ignores it.)
async fn connect(socket: &Path) -> Result<RuntimeServiceClient<Channel>, CriError> {
    let path = socket.to_path_buf();
    let channel = Endpoint::from_static("http://[::]:50051")
        .connect_timeout(REQUEST_TIMEOUT)
        .timeout(REQUEST_TIMEOUT)
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await
        .map_err(|source| CriError::Connect {
            socket: socket.to_path_buf(),
            source,
        })?;
    // A node's sandbox list is small, but a hostile or broken runtime could
    // answer with anything: cap what one message may be.
    Ok(RuntimeServiceClient::new(channel).max_decoding_message_size(16 << 20))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_cri::v1::{
        LinuxPodSandboxStatus, Namespace, NamespaceOption, PodIp, PodSandboxMetadata,
        PodSandboxNetworkStatus,
    };

    fn status(
        name: &str,
        ns: &str,
        ip: &str,
        extra: &[&str],
        network: NamespaceMode,
    ) -> PodSandboxStatus {
        PodSandboxStatus {
            id: format!("id-{name}"),
            metadata: Some(PodSandboxMetadata {
                name: name.into(),
                namespace: ns.into(),
                uid: format!("uid-{name}"),
                attempt: 0,
            }),
            network: Some(PodSandboxNetworkStatus {
                ip: ip.into(),
                additional_ips: extra
                    .iter()
                    .map(|ip| PodIp { ip: ip.to_string() })
                    .collect(),
            }),
            linux: Some(LinuxPodSandboxStatus {
                namespaces: Some(Namespace {
                    options: Some(NamespaceOption {
                        network: network as i32,
                        ..Default::default()
                    }),
                }),
            }),
            labels: [
                ("pod-template-hash".to_string(), "5d9f8".to_string()),
                ("app".to_string(), "x".repeat(100_000)),
            ]
            .into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_status_gives_the_pods_addresses_and_workload() {
        let s = Sandbox::from_status(status(
            "web-5d9f8-abcde",
            "shop",
            "198.18.0.5",
            &["2001:2::5", "198.18.0.5", "not an address"],
            NamespaceMode::Pod,
        ))
        .unwrap();
        assert_eq!(s.workload.name, "web");
        assert_eq!(
            s.ips,
            [
                "198.18.0.5".parse::<IpAddr>().unwrap(),
                "2001:2::5".parse().unwrap()
            ]
        );
        assert!(!s.host_network);
    }

    #[test]
    fn a_host_network_pod_has_no_address_of_its_own() {
        let s = Sandbox::from_status(status(
            "agent",
            "kube-system",
            "198.18.0.1",
            &[],
            NamespaceMode::Node,
        ))
        .unwrap();
        assert!(s.host_network);
        assert!(s.ips.is_empty());
    }

    proptest::proptest! {
        /// Whatever a runtime answers, nothing panics, and what is kept is
        /// bounded and usable as a label.
        #[test]
        fn any_status_is_read_safely(
            name in "\\PC{0,300}",
            namespace in "\\PC{0,40}",
            ips in proptest::collection::vec("\\PC{0,40}|198\\.18\\.[0-9]{1,3}\\.[0-9]{1,3}", 0..20),
            labels in proptest::collection::vec(("\\PC{0,40}", "\\PC{0,300}"), 0..10),
            host in proptest::bool::ANY,
        ) {
            let mut s = status(
                &name,
                &namespace,
                ips.first().map(String::as_str).unwrap_or(""),
                &ips.iter().skip(1).map(String::as_str).collect::<Vec<_>>(),
                if host { NamespaceMode::Node } else { NamespaceMode::Pod },
            );
            s.labels.extend(labels);
            if let Some(sandbox) = Sandbox::from_status(s) {
                proptest::prop_assert!(usable_name(&sandbox.pod) && sandbox.pod.len() <= MAX_K8S_NAME);
                proptest::prop_assert!(usable_name(&sandbox.namespace) && !sandbox.namespace.contains('/'));
                proptest::prop_assert!(!sandbox.workload.name.is_empty());
                proptest::prop_assert!(sandbox.ips.len() <= MAX_IPS_PER_SANDBOX);
                proptest::prop_assert!(!host || sandbox.ips.is_empty());
            }
        }
    }

    #[test]
    fn unusable_names_are_dropped() {
        for (name, ns) in [("", "a"), ("a b", "a"), ("a", "x/y"), ("a", "\u{7}")] {
            assert_eq!(
                Sandbox::from_status(status(name, ns, "198.18.0.5", &[], NamespaceMode::Pod)),
                None,
                "{name:?} {ns:?}"
            );
        }
        let long = "a".repeat(254);
        assert_eq!(
            Sandbox::from_status(status(&long, "a", "198.18.0.5", &[], NamespaceMode::Pod)),
            None
        );
    }
}
