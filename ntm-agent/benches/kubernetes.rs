//! `cargo xtask bench` (Kubernetes names): the real agent naming the pods
//! of a node with 500 pod sandboxes and a churn of 10 pods a second, side
//! by side with the same agent with `--no-kubernetes`: its CPU and memory.
//! The runtime is a fake CRI server in this process (over a Unix socket,
//! the real gRPC and protobuf of k8s-cri), so that the figure is the
//! agent's own; like Debian's containerd 1.6 it has no event stream, so the
//! agent polls. Prints figures; asserts nothing.

#[path = "../tests/integration/kit/mod.rs"]
mod kit;

use std::{
    collections::VecDeque,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use k8s_cri::v1::{
    self as cri,
    runtime_service_server::{RuntimeService, RuntimeServiceServer},
};
use kit::{
    Agent, Link,
    scrape::{TempDir, metrics, sample_sum, wait_for, wait_healthy},
};
use tonic::{Request, Response, Status};

/// Sandboxes on the node.
const SANDBOXES: usize = 500;
/// Pods replaced a second.
const CHURN_PER_SECOND: u64 = 10;
/// How long each agent runs with the node as it is.
const MEASURE: Duration = Duration::from_secs(30);
const PORT: u16 = 9830;

/// The node's sandboxes; the churn replaces the oldest.
#[derive(Default)]
struct Node {
    sandboxes: VecDeque<cri::PodSandboxStatus>,
    next: u64,
}

impl Node {
    /// A Deployment's pod: 50 deployments in 20 namespaces.
    fn add(&mut self) {
        let n = self.next;
        self.next += 1;
        let slot = n % SANDBOXES as u64;
        let deployment = format!("app{}", n % 50);
        let hash = format!("{:x}", 0x5d8f9c7b6u64 + n % 50);
        let name = format!("{deployment}-{hash}-{n:05x}");
        let ip = format!("198.18.{}.{}", 64 + slot / 250, 2 + slot % 250);
        self.sandboxes.push_back(cri::PodSandboxStatus {
            id: format!("{n:064x}"),
            metadata: Some(cri::PodSandboxMetadata {
                name: name.clone(),
                namespace: format!("ns{}", n % 20),
                uid: format!("uid-{n}"),
                attempt: 0,
            }),
            network: Some(cri::PodSandboxNetworkStatus {
                ip,
                additional_ips: Vec::new(),
            }),
            labels: [
                ("io.kubernetes.pod.name".to_string(), name),
                ("pod-template-hash".to_string(), hash),
                ("app".to_string(), deployment),
            ]
            .into(),
            ..Default::default()
        });
    }

    fn churn(&mut self) {
        self.sandboxes.pop_front();
        self.add();
    }
}

/// The fake runtime: lists and describes the node's sandboxes, and counts
/// what it was asked.
#[derive(Clone, Default)]
struct FakeRuntime {
    node: Arc<Mutex<Node>>,
    lists: Arc<AtomicU64>,
    statuses: Arc<AtomicU64>,
}

type Events = Pin<
    Box<
        dyn tonic::codegen::tokio_stream::Stream<Item = Result<cri::ContainerEventResponse, Status>>
            + Send,
    >,
>;

#[tonic::async_trait]
impl RuntimeService for FakeRuntime {
    async fn version(
        &self,
        _: Request<cri::VersionRequest>,
    ) -> Result<Response<cri::VersionResponse>, Status> {
        Ok(Response::new(cri::VersionResponse {
            version: "0.1.0".into(),
            runtime_name: "fake".into(),
            runtime_version: "0".into(),
            runtime_api_version: "v1".into(),
        }))
    }

    async fn list_pod_sandbox(
        &self,
        _: Request<cri::ListPodSandboxRequest>,
    ) -> Result<Response<cri::ListPodSandboxResponse>, Status> {
        self.lists.fetch_add(1, Ordering::Relaxed);
        let node = self.node.lock().unwrap();
        let items = node
            .sandboxes
            .iter()
            .map(|s| cri::PodSandbox {
                id: s.id.clone(),
                metadata: s.metadata.clone(),
                labels: s.labels.clone(),
                ..Default::default()
            })
            .collect();
        Ok(Response::new(cri::ListPodSandboxResponse { items }))
    }

    async fn pod_sandbox_status(
        &self,
        request: Request<cri::PodSandboxStatusRequest>,
    ) -> Result<Response<cri::PodSandboxStatusResponse>, Status> {
        self.statuses.fetch_add(1, Ordering::Relaxed);
        let id = request.into_inner().pod_sandbox_id;
        let node = self.node.lock().unwrap();
        let status = node.sandboxes.iter().find(|s| s.id == id).cloned();
        match status {
            Some(status) => Ok(Response::new(cri::PodSandboxStatusResponse {
                status: Some(status),
                ..Default::default()
            })),
            None => Err(Status::not_found(id)),
        }
    }

    type GetContainerEventsStream = Events;

    async fn get_container_events(
        &self,
        _: Request<cri::GetEventsRequest>,
    ) -> Result<Response<Events>, Status> {
        Err(Status::unimplemented("get_container_events"))
    }

    // RPCs the agent never makes: unimplemented.

    async fn run_pod_sandbox(
        &self,
        _: Request<cri::RunPodSandboxRequest>,
    ) -> Result<Response<cri::RunPodSandboxResponse>, Status> {
        Err(Status::unimplemented("run_pod_sandbox"))
    }

    async fn stop_pod_sandbox(
        &self,
        _: Request<cri::StopPodSandboxRequest>,
    ) -> Result<Response<cri::StopPodSandboxResponse>, Status> {
        Err(Status::unimplemented("stop_pod_sandbox"))
    }

    async fn remove_pod_sandbox(
        &self,
        _: Request<cri::RemovePodSandboxRequest>,
    ) -> Result<Response<cri::RemovePodSandboxResponse>, Status> {
        Err(Status::unimplemented("remove_pod_sandbox"))
    }

    async fn create_container(
        &self,
        _: Request<cri::CreateContainerRequest>,
    ) -> Result<Response<cri::CreateContainerResponse>, Status> {
        Err(Status::unimplemented("create_container"))
    }

    async fn start_container(
        &self,
        _: Request<cri::StartContainerRequest>,
    ) -> Result<Response<cri::StartContainerResponse>, Status> {
        Err(Status::unimplemented("start_container"))
    }

    async fn stop_container(
        &self,
        _: Request<cri::StopContainerRequest>,
    ) -> Result<Response<cri::StopContainerResponse>, Status> {
        Err(Status::unimplemented("stop_container"))
    }

    async fn remove_container(
        &self,
        _: Request<cri::RemoveContainerRequest>,
    ) -> Result<Response<cri::RemoveContainerResponse>, Status> {
        Err(Status::unimplemented("remove_container"))
    }

    async fn list_containers(
        &self,
        _: Request<cri::ListContainersRequest>,
    ) -> Result<Response<cri::ListContainersResponse>, Status> {
        Err(Status::unimplemented("list_containers"))
    }

    async fn container_status(
        &self,
        _: Request<cri::ContainerStatusRequest>,
    ) -> Result<Response<cri::ContainerStatusResponse>, Status> {
        Err(Status::unimplemented("container_status"))
    }

    async fn update_container_resources(
        &self,
        _: Request<cri::UpdateContainerResourcesRequest>,
    ) -> Result<Response<cri::UpdateContainerResourcesResponse>, Status> {
        Err(Status::unimplemented("update_container_resources"))
    }

    async fn reopen_container_log(
        &self,
        _: Request<cri::ReopenContainerLogRequest>,
    ) -> Result<Response<cri::ReopenContainerLogResponse>, Status> {
        Err(Status::unimplemented("reopen_container_log"))
    }

    async fn exec_sync(
        &self,
        _: Request<cri::ExecSyncRequest>,
    ) -> Result<Response<cri::ExecSyncResponse>, Status> {
        Err(Status::unimplemented("exec_sync"))
    }

    async fn exec(
        &self,
        _: Request<cri::ExecRequest>,
    ) -> Result<Response<cri::ExecResponse>, Status> {
        Err(Status::unimplemented("exec"))
    }

    async fn attach(
        &self,
        _: Request<cri::AttachRequest>,
    ) -> Result<Response<cri::AttachResponse>, Status> {
        Err(Status::unimplemented("attach"))
    }

    async fn port_forward(
        &self,
        _: Request<cri::PortForwardRequest>,
    ) -> Result<Response<cri::PortForwardResponse>, Status> {
        Err(Status::unimplemented("port_forward"))
    }

    async fn container_stats(
        &self,
        _: Request<cri::ContainerStatsRequest>,
    ) -> Result<Response<cri::ContainerStatsResponse>, Status> {
        Err(Status::unimplemented("container_stats"))
    }

    async fn list_container_stats(
        &self,
        _: Request<cri::ListContainerStatsRequest>,
    ) -> Result<Response<cri::ListContainerStatsResponse>, Status> {
        Err(Status::unimplemented("list_container_stats"))
    }

    async fn pod_sandbox_stats(
        &self,
        _: Request<cri::PodSandboxStatsRequest>,
    ) -> Result<Response<cri::PodSandboxStatsResponse>, Status> {
        Err(Status::unimplemented("pod_sandbox_stats"))
    }

    async fn list_pod_sandbox_stats(
        &self,
        _: Request<cri::ListPodSandboxStatsRequest>,
    ) -> Result<Response<cri::ListPodSandboxStatsResponse>, Status> {
        Err(Status::unimplemented("list_pod_sandbox_stats"))
    }

    async fn update_runtime_config(
        &self,
        _: Request<cri::UpdateRuntimeConfigRequest>,
    ) -> Result<Response<cri::UpdateRuntimeConfigResponse>, Status> {
        Err(Status::unimplemented("update_runtime_config"))
    }

    async fn status(
        &self,
        _: Request<cri::StatusRequest>,
    ) -> Result<Response<cri::StatusResponse>, Status> {
        Err(Status::unimplemented("status"))
    }

    async fn checkpoint_container(
        &self,
        _: Request<cri::CheckpointContainerRequest>,
    ) -> Result<Response<cri::CheckpointContainerResponse>, Status> {
        Err(Status::unimplemented("checkpoint_container"))
    }

    async fn list_metric_descriptors(
        &self,
        _: Request<cri::ListMetricDescriptorsRequest>,
    ) -> Result<Response<cri::ListMetricDescriptorsResponse>, Status> {
        Err(Status::unimplemented("list_metric_descriptors"))
    }

    async fn list_pod_sandbox_metrics(
        &self,
        _: Request<cri::ListPodSandboxMetricsRequest>,
    ) -> Result<Response<cri::ListPodSandboxMetricsResponse>, Status> {
        Err(Status::unimplemented("list_pod_sandbox_metrics"))
    }

    async fn runtime_config(
        &self,
        _: Request<cri::RuntimeConfigRequest>,
    ) -> Result<Response<cri::RuntimeConfigResponse>, Status> {
        Err(Status::unimplemented("runtime_config"))
    }
}

/// (user + system CPU seconds, RSS MiB) of process `pid`.
fn usage(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command's closing parenthesis; utime and stime
    // are the 12th and 13th of them.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let cpu = (ticks(11) + ticks(12)) / hz;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or(0.0);
    (cpu, rss_kib / 1024.0)
}

/// Runs an agent on `link` for MEASURE; returns (CPU %, RSS MiB, pods
/// it knew at the end).
fn measure(link: &Link, socket: Option<&std::path::Path>) -> (f64, f64, u64) {
    let mut agent = Agent::in_ns(&link.a)
        .names(true)
        .iface(&link.a_if)
        .port(PORT)
        .args(["--dns-server", "127.0.0.1:5397", "--dns-timeout", "200ms"])
        .args(["--no-containers", "--no-pin"]);
    if let Some(socket) = socket {
        agent = agent.cri_socket(socket);
    }
    let mut child = agent.spawn_child();
    wait_healthy(&link.a, PORT);
    // `ip netns exec` execs the agent: the child is the agent itself.
    let pid = child.id();
    if socket.is_some() {
        wait_for("the pods named", Duration::from_secs(30), || {
            let text = metrics(&link.a, PORT)?;
            (sample_sum(&text, "ntm_observed_names", &[r#"table="pods""#]) >= SANDBOXES as u64 - 1)
                .then_some(())
        });
    }
    let (cpu_before, _) = usage(pid);
    let started = Instant::now();
    thread::sleep(MEASURE);
    let (cpu_after, rss) = usage(pid);
    let elapsed = started.elapsed().as_secs_f64();
    let pods = metrics(&link.a, PORT)
        .map(|text| sample_sum(&text, "ntm_observed_names", &[r#"table="pods""#]))
        .unwrap_or(0);
    let _ = child.kill();
    let _ = child.wait();
    (100.0 * (cpu_after - cpu_before) / elapsed, rss, pods)
}

fn main() {
    match kit::root_tests_enabled() {
        Ok(true) => {}
        Ok(false) => return,
        Err(e) => panic!("{e}"),
    }
    let dir = TempDir::new("k8sbench");
    let socket = dir.0.join("cri.sock");
    let runtime = FakeRuntime::default();
    {
        let mut node = runtime.node.lock().unwrap();
        for _ in 0..SANDBOXES {
            node.add();
        }
    }
    let server = runtime.clone();
    let socket_path = socket.clone();
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    tokio.spawn(async move {
        let listener = tokio::net::UnixListener::bind(&socket_path).expect("bind the CRI socket");
        let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
        tonic::transport::Server::builder()
            .add_service(RuntimeServiceServer::new(server))
            .serve_with_incoming(incoming)
            .await
            .expect("the fake runtime");
    });
    let churn = runtime.node.clone();
    tokio.spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(1000 / CHURN_PER_SECOND));
        loop {
            tick.tick().await;
            churn.lock().unwrap().churn();
        }
    });

    let link = Link::new("k8sb");
    let (base_cpu, base_rss, _) = measure(&link, None);
    let (lists, statuses) = (
        runtime.lists.load(Ordering::Relaxed),
        runtime.statuses.load(Ordering::Relaxed),
    );
    let (cpu, rss, pods) = measure(&link, Some(&socket));
    let lists = runtime.lists.load(Ordering::Relaxed) - lists;
    let statuses = runtime.statuses.load(Ordering::Relaxed) - statuses;
    println!(
        "kubernetes names: {SANDBOXES} sandboxes, churn {CHURN_PER_SECOND} pods/s, {}s each, agent idle on a veth",
        MEASURE.as_secs()
    );
    println!("  --no-kubernetes        CPU {base_cpu:6.2} %   RSS {base_rss:6.1} MiB");
    println!(
        "  --cri-socket (poll 2s) CPU {cpu:6.2} %   RSS {rss:6.1} MiB   (+{:.2} % CPU, +{:.1} MiB; {pods} pods known at the end; {lists} lists, {statuses} statuses served)",
        cpu - base_cpu,
        rss - base_rss
    );
}
