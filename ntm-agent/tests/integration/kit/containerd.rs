//! A Kubernetes node without an apiserver, for the tests of what ntm reads
//! from a node's container runtime: Debian's containerd (its built-in CRI
//! plugin) in a network namespace of the test's own, runc, and the CNI
//! bridge and host-local plugins on a pod network of the benchmarking range.
//! The fixture acts as kubelet over the CRI socket: it runs pod sandboxes
//! with kubelet's labels, each with a real network namespace and address.
//!
//! Nothing comes from a registry: the sandbox image is a static C program
//! that waits for SIGTERM, built here with `gcc -static` and imported as a
//! docker-archive tarball. containerd's root, state, socket, runc's state,
//! the CNI configuration and the IPAM leases are all in the test's own
//! folder; what containerd puts elsewhere (pods' network namespaces under
//! /var/run/netns, shim sockets under /run/containerd/s, CNI's result cache
//! under /var/lib/cni/results, cgroups) is removed on drop, even when the
//! test failed, and only what this fixture made.
//!
//! On these machines: `nsenter --net=`, not `ip netns exec`, which mounts a
//! sysfs of the namespace over /sys, where runc then finds no cgroup mount;
//! `restrict_oom_score_adj`, because root here lacks CAP_SYS_RESOURCE;
//! `disable_apparmor`; cgroupfs, not systemd.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fs,
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use hyper_util::rt::TokioIo;
use k8s_cri::v1::{
    ImageSpec, ImageStatusRequest, LinuxPodSandboxConfig, LinuxSandboxSecurityContext,
    ListPodSandboxRequest, NamespaceMode, NamespaceOption, PodSandbox, PodSandboxConfig,
    PodSandboxMetadata, PodSandboxStatusRequest, RemovePodSandboxRequest, RunPodSandboxRequest,
    SecurityProfile, StatusRequest, StopPodSandboxRequest,
    image_service_client::ImageServiceClient, runtime_service_client::RuntimeServiceClient,
    security_profile::ProfileType,
};
use tonic::transport::{Channel, Endpoint, Uri};

use super::{Netns, run_in_netns};

/// The sandbox image's name. A `localhost/` name: were the image ever
/// missing, containerd could only try to pull it from the node's own
/// loopback (it runs in the node's namespace, which has nothing else).
pub const PAUSE_IMAGE: &str = "localhost/ntm-test-pause:1";

/// The CRI namespace containerd keeps kubelet's sandboxes in.
const CRI_NAMESPACE: &str = "k8s.io";

/// How long containerd may take to answer, a sandbox to start or stop.
const DEADLINE: Duration = Duration::from_secs(60);

/// Kubernetes' pause, in short: it holds the pod's namespaces, reaps what
/// ends in them, and ends on SIGTERM or SIGINT. As a pid namespace's
/// first process it must handle them: the kernel drops signals that such a
/// process does not handle.
const PAUSE_C: &str = r#"#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int sig) { (void)sig; _exit(0); }

static void reap(int sig) {
    (void)sig;
    while (waitpid(-1, 0, WNOHANG) > 0) {
    }
}

int main(void) {
    signal(SIGINT, stop);
    signal(SIGTERM, stop);
    signal(SIGCHLD, reap);
    for (;;)
        pause();
}
"#;

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// A pod as kubelet asks for it.
#[derive(Clone, Debug)]
pub struct PodSpec {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// The pod's own labels (e.g. `app`, `pod-template-hash`); kubelet's
    /// `io.kubernetes.pod.*` labels are added to them.
    pub labels: Vec<(String, String)>,
    /// `hostNetwork: true`: the sandbox shares the node's network namespace
    /// and gets no address of its own.
    pub host_network: bool,
}

impl PodSpec {
    /// A pod on the pod network with these labels, and a UID in UUID form
    /// made from its namespace and name (the same each run).
    pub fn new(namespace: &str, name: &str, labels: &[(&str, &str)]) -> Self {
        let hex = sha256(format!("{namespace}/{name}").as_bytes());
        Self {
            namespace: namespace.to_string(),
            name: name.to_string(),
            uid: format!(
                "{}-{}-{}-{}-{}",
                &hex[0..8],
                &hex[8..12],
                &hex[12..16],
                &hex[16..20],
                &hex[20..32]
            ),
            labels: labels
                .iter()
                .map(|&(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            host_network: false,
        }
    }
}

/// A running pod sandbox.
#[derive(Clone, Debug)]
pub struct Pod {
    /// The sandbox's ID (the CRI names it by that).
    pub id: String,
    /// Its address on the pod network; None for a host-network pod.
    pub ip: Option<IpAddr>,
    /// Its network namespace (the node's for a host-network pod).
    pub netns: PathBuf,
}

impl Pod {
    /// The pod's IPv4 address (a host-network pod has none: it panics).
    pub fn ipv4(&self) -> std::net::Ipv4Addr {
        match self.ip {
            Some(IpAddr::V4(ip)) => ip,
            other => panic!("{} has no IPv4 address: {other:?}", self.id),
        }
    }

    /// Runs `f` on a thread inside the pod's network namespace.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        run_in_netns(&self.netns, f)
    }

    /// Runs a command inside the pod's network namespace and returns its
    /// output; panics if it fails.
    pub fn exec(&self, args: &[&str]) -> String {
        let mut full = vec![format!("--net={}", self.netns.display())];
        full.extend(args.iter().map(|a| a.to_string()));
        let out = Command::new("nsenter")
            .args(&full)
            .output()
            .unwrap_or_else(|e| panic!("cannot run nsenter {full:?}: {e}"));
        assert!(
            out.status.success(),
            "nsenter {full:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// A Kubernetes node: containerd with its CRI plugin in a network namespace
/// of its own (`node()`), a pod network on a bridge there, and this
/// fixture as its kubelet. Dropping it removes every sandbox it ran, stops
/// containerd and deletes what it made.
pub struct Containerd {
    /// The test's folder: config, root, state, socket, runc's state, CNI.
    dir: PathBuf,
    socket: PathBuf,
    bridge: String,
    /// The CNI network's name, unique to this fixture (CNI's result cache
    /// names its files after it).
    network: String,
    /// The cgroup that holds the pods' cgroups in every hierarchy, in
    /// place of kubelet's `/kubepods`: this fixture's own, so that it can
    /// remove it (containerd's default, `/k8s.io`, is every containerd's).
    cgroup_root: String,
    process: Option<Child>,
    runtime: tokio::runtime::Runtime,
    /// Sandboxes run and not yet removed, with their network namespaces.
    pods: BTreeMap<String, PathBuf>,
    /// Every sandbox ever run here (files outside `dir` are named by them).
    ran: BTreeSet<String>,
    /// Whether a sandbox was ever asked for (one may run though its
    /// RunPodSandbox did not answer).
    asked: bool,
    /// Folders outside `dir` that containerd or CNI may create, and whether
    /// they were there before: only those that were not are removed.
    outside: Vec<(PathBuf, bool)>,
    /// Declared last: dropped after `drop` has stopped everything in it.
    node: Netns,
}

impl Containerd {
    /// A node named after `tag`, its pods on bridge `bridge` (made by CNI
    /// inside the node's namespace) and addressed from `subnet` (in
    /// 198.18.0.0/15; the bridge takes its first address, host-local hands
    /// out the next ones), with containerd started and the pause image
    /// imported.
    pub fn new(tag: &str, bridge: &str, subnet: &str) -> Self {
        assert!(
            subnet.starts_with("198.18.") || subnet.starts_with("198.19."),
            "pod networks are on 198.18.0.0/15 only, not {subnet}"
        );
        for (tool, package) in [
            ("containerd", "containerd"),
            ("ctr", "containerd"),
            ("runc", "runc"),
            ("gcc", "gcc"),
            ("nsenter", "util-linux"),
        ] {
            assert!(
                Command::new(tool)
                    .arg("--version")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok(),
                "{tool} is missing: install {package} (cargo xtask test does)"
            );
        }
        for plugin in ["bridge", "host-local"] {
            assert!(
                Path::new("/usr/lib/cni").join(plugin).exists(),
                "/usr/lib/cni/{plugin} is missing: install containernetworking-plugins (cargo xtask test does)"
            );
        }
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let unique = format!("{tag}-{}-{id}", std::process::id());
        let dir = std::env::temp_dir().join(format!("ntm-k8s-{unique}"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let outside = [
            "/run/containerd",
            "/run/containerd/s",
            "/var/lib/cni",
            "/var/lib/cni/results",
        ]
        .into_iter()
        .map(|p| (PathBuf::from(p), Path::new(p).exists()))
        .collect();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut node = Self {
            socket: dir.join("containerd.sock"),
            bridge: bridge.to_string(),
            network: format!("ntm-k8s-{unique}"),
            cgroup_root: format!("/ntm-k8s-{unique}"),
            process: None,
            runtime,
            pods: BTreeMap::new(),
            ran: BTreeSet::new(),
            asked: false,
            outside,
            node: Netns::new("k8s"),
            dir,
        };
        // From here on, a failure drops `node`, which cleans up.
        node.write_config(subnet);
        let image = node.build_pause_image();
        node.start();
        node.import(&image);
        node
    }

    /// The node's network namespace: containerd, the bridge and the host
    /// ends of the pods' veths are there.
    pub fn node(&self) -> &Netns {
        &self.node
    }

    /// The CRI socket (a Unix socket; containerd's own API on it too).
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The pods' bridge, in the node's namespace.
    pub fn bridge(&self) -> &str {
        &self.bridge
    }

    /// The test's folder, where containerd keeps everything of its own.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The cgroup under which every pod's is, as kubelet's `/kubepods`
    /// (`ROOT/besteffort/pod<uid>/<sandbox id>`).
    pub fn cgroup_root(&self) -> &str {
        &self.cgroup_root
    }

    /// containerd's process ID while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(|p| p.id())
    }

    /// Starts containerd (again: with the state it had, so the sandboxes
    /// that ran on are its own again) and waits until its CRI answers with
    /// the runtime and the network ready.
    pub fn start(&mut self) {
        if let Err(e) = self.try_start() {
            panic!("{e}\n{}", self.log_tail());
        }
    }

    /// Stops containerd (SIGTERM) and waits for it. The sandboxes keep
    /// running, as on a node whose runtime restarts: their shims outlive it.
    pub fn stop(&mut self) {
        if let Err(e) = self.try_stop() {
            panic!("{e}\n{}", self.log_tail());
        }
    }

    /// Runs a pod sandbox as kubelet does, and returns it once it runs.
    pub fn run_pod(&mut self, spec: &PodSpec) -> Pod {
        // Where kubelet's cgroupfs driver puts a BestEffort pod.
        let cgroup_parent = format!("{}/besteffort/pod{}", self.cgroup_root, spec.uid);
        let config = sandbox_config(spec, cgroup_parent);
        self.asked = true;
        let id = self
            .cri(|mut client| async move {
                client
                    .run_pod_sandbox(RunPodSandboxRequest {
                        config: Some(config),
                        runtime_handler: String::new(),
                    })
                    .await
                    .map(|r| r.into_inner().pod_sandbox_id)
            })
            .unwrap_or_else(|e| panic!("RunPodSandbox {spec:?}: {e}\n{}", self.log_tail()));
        // Recorded before anything else can fail, so that drop removes it.
        self.pods.insert(id.clone(), PathBuf::new());
        self.ran.insert(id.clone());
        let pod = self.pod(&id);
        self.pods.insert(id, pod.netns.clone());
        pod
    }

    /// A sandbox as the CRI describes it now: its address and network
    /// namespace (from the runtime spec in its verbose status).
    pub fn pod(&self, id: &str) -> Pod {
        let request = PodSandboxStatusRequest {
            pod_sandbox_id: id.to_string(),
            verbose: true,
        };
        let status = self
            .cri(|mut client| async move {
                client
                    .pod_sandbox_status(request)
                    .await
                    .map(|r| r.into_inner())
            })
            .unwrap_or_else(|e| panic!("PodSandboxStatus {id}: {e}"));
        let ip = status
            .status
            .as_ref()
            .and_then(|s| s.network.as_ref())
            .map(|n| n.ip.as_str())
            .filter(|ip| !ip.is_empty())
            .map(|ip| ip.parse().unwrap_or_else(|e| panic!("pod IP {ip:?}: {e}")));
        let info: serde_json::Value = serde_json::from_str(
            status
                .info
                .get("info")
                .unwrap_or_else(|| panic!("no verbose info for {id}: {:?}", status.info)),
        )
        .expect("the verbose info is JSON");
        // A network namespace with a path is the pod's own; none (a host
        // network pod) means containerd's, the node's.
        let netns = info["runtimeSpec"]["linux"]["namespaces"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|ns| ns["type"] == "network")
            .and_then(|ns| ns["path"].as_str())
            .filter(|path| !path.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| self.node.path());
        Pod {
            id: id.to_string(),
            ip,
            netns,
        }
    }

    /// Stops and removes a sandbox, as kubelet does when a pod goes:
    /// StopPodSandbox (CNI's DEL frees its address), then RemovePodSandbox.
    pub fn remove_pod(&mut self, id: &str) {
        if let Err(e) = self.try_remove_pod(id) {
            panic!("{e}\n{}", self.log_tail());
        }
    }

    /// Every sandbox the CRI lists, ready or not.
    pub fn list_pods(&self) -> Vec<PodSandbox> {
        self.try_list_pods()
            .unwrap_or_else(|e| panic!("ListPodSandbox: {e}\n{}", self.log_tail()))
    }

    fn try_list_pods(&self) -> Result<Vec<PodSandbox>, String> {
        self.cri(|mut client| async move {
            client
                .list_pod_sandbox(ListPodSandboxRequest { filter: None })
                .await
                .map(|r| r.into_inner().items)
        })
    }

    fn try_remove_pod(&mut self, id: &str) -> Result<(), String> {
        let stop = StopPodSandboxRequest {
            pod_sandbox_id: id.to_string(),
        };
        self.cri(|mut client| async move { client.stop_pod_sandbox(stop).await.map(|_| ()) })
            .map_err(|e| format!("StopPodSandbox {id}: {e}"))?;
        let remove = RemovePodSandboxRequest {
            pod_sandbox_id: id.to_string(),
        };
        self.cri(|mut client| async move { client.remove_pod_sandbox(remove).await.map(|_| ()) })
            .map_err(|e| format!("RemovePodSandbox {id}: {e}"))?;
        self.pods.remove(id);
        Ok(())
    }

    /// Writes containerd's config and the pod network's CNI config.
    fn write_config(&self, subnet: &str) {
        let dir = self.dir.display();
        let cni_dir = self.dir.join("cni");
        fs::create_dir_all(&cni_dir).unwrap();
        // No route but the subnet's own (no `routes`, no `isDefaultGateway`):
        // a pod can address nothing beyond the pod network. host-local's
        // leases in the test's folder (its default is /var/lib/cni).
        let conflist = serde_json::json!({
            "cniVersion": "0.4.0",
            "name": self.network,
            "plugins": [{
                "type": "bridge",
                "bridge": self.bridge,
                "isGateway": true,
                "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{ "subnet": subnet }]],
                    "dataDir": self.dir.join("ipam"),
                },
            }],
        });
        fs::write(
            cni_dir.join("10-ntm.conflist"),
            serde_json::to_string_pretty(&conflist).unwrap(),
        )
        .unwrap();
        let cri = r#"plugins."io.containerd.grpc.v1.cri""#;
        let config = format!(
            r#"version = 2
root = "{dir}/root"
state = "{dir}/state"

[grpc]
  address = "{socket}"

# containerd's own "/opt" for plugins' binaries: /opt/containerd otherwise.
[plugins."io.containerd.internal.v1.opt"]
  path = "{dir}/opt"

[{cri}]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  disable_apparmor = true
  systemd_cgroup = false

  [{cri}.containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"

    [{cri}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"

      # runc's state in the test's folder (/run/containerd/runc otherwise).
      [{cri}.containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{dir}/runc"

  [{cri}.cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{cni}"
    max_conf_num = 1
"#,
            socket = self.socket.display(),
            cni = cni_dir.display(),
        );
        fs::write(self.dir.join("config.toml"), config).unwrap();
    }

    /// Builds the pause program and packs it as a docker-archive tarball
    /// (what `docker save` writes: manifest.json, the image config, one
    /// layer); returns the tarball's path.
    fn build_pause_image(&self) -> PathBuf {
        let source = self.dir.join("pause.c");
        let binary = self.dir.join("pause");
        fs::write(&source, PAUSE_C).unwrap();
        let out = Command::new("gcc")
            .args(["-static", "-O2", "-o"])
            .arg(&binary)
            .arg(&source)
            .output()
            .expect("gcc runs");
        assert!(
            out.status.success(),
            "gcc -static (install gcc and libc6-dev): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let layer = tarball(&[("pause", &fs::read(&binary).unwrap(), 0o755)]);
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            other => other,
        };
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": arch,
            "os": "linux",
            "config": { "Entrypoint": ["/pause"] },
            "rootfs": { "type": "layers", "diff_ids": [format!("sha256:{}", sha256(&layer))] },
        }))
        .unwrap();
        let config_name = format!("{}.json", sha256(&config));
        let manifest = serde_json::to_vec(&serde_json::json!([{
            "Config": config_name,
            "RepoTags": [PAUSE_IMAGE],
            "Layers": ["layer/layer.tar"],
        }]))
        .unwrap();
        let archive = tarball(&[
            ("manifest.json", &manifest, 0o644),
            (&config_name, &config, 0o644),
            ("layer/layer.tar", &layer, 0o644),
        ]);
        let path = self.dir.join("pause-image.tar");
        fs::write(&path, archive).unwrap();
        path
    }

    /// Imports the image into the CRI's namespace and waits until the CRI
    /// knows it (it learns of images from containerd's events, after the
    /// import returns: a sandbox started before would try to pull it).
    fn import(&mut self, image: &Path) {
        let out = Command::new("ctr")
            .arg("-a")
            .arg(&self.socket)
            .args(["-n", CRI_NAMESPACE, "images", "import"])
            .arg(image)
            .output()
            .expect("ctr runs");
        assert!(
            out.status.success(),
            "ctr images import: {}{}",
            String::from_utf8_lossy(&out.stderr),
            self.log_tail()
        );
        let deadline = Instant::now() + DEADLINE;
        loop {
            let known = self.runtime.block_on(async {
                let channel = connect(&self.socket).await.map_err(|e| e.to_string())?;
                ImageServiceClient::new(channel)
                    .image_status(ImageStatusRequest {
                        image: Some(ImageSpec {
                            image: PAUSE_IMAGE.to_string(),
                            ..Default::default()
                        }),
                        verbose: false,
                    })
                    .await
                    .map(|r| r.into_inner().image.is_some())
                    .map_err(|e| e.to_string())
            });
            match known {
                Ok(true) => return,
                Ok(false) | Err(_) if Instant::now() < deadline => {
                    thread::sleep(Duration::from_millis(20))
                }
                other => panic!(
                    "the CRI does not know {PAUSE_IMAGE} after importing it: {other:?}\n{}",
                    self.log_tail()
                ),
            }
        }
    }

    fn try_start(&mut self) -> Result<(), String> {
        if self.process.is_some() {
            return Ok(());
        }
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("containerd.log"))
            .map_err(|e| format!("containerd.log: {e}"))?;
        // nsenter enters the namespace and execs containerd (no fork): the
        // child is containerd itself.
        let child = Command::new("nsenter")
            .arg(format!("--net={}", self.node.path().display()))
            .arg("containerd")
            .arg("--config")
            .arg(self.dir.join("config.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start containerd: {e}"))?;
        self.process = Some(child);
        // Ready when the CRI says the runtime and the network are: the
        // socket comes first, the CRI plugin's service a little later, the
        // network once it has read the CNI config.
        let deadline = Instant::now() + DEADLINE;
        loop {
            let status = self.cri(|mut client| async move {
                client
                    .status(StatusRequest { verbose: false })
                    .await
                    .map(|r| r.into_inner())
            });
            let not_ready = match &status {
                Ok(status) => {
                    let conditions = status
                        .status
                        .as_ref()
                        .map(|s| s.conditions.as_slice())
                        .unwrap_or_default();
                    let ready =
                        |kind: &str| conditions.iter().any(|c| c.r#type == kind && c.status);
                    if ready("RuntimeReady") && ready("NetworkReady") {
                        return Ok(());
                    }
                    format!("not ready: {conditions:?}")
                }
                Err(e) => e.clone(),
            };
            if let Some(exit) = self
                .process
                .as_mut()
                .and_then(|p| p.try_wait().ok().flatten())
            {
                self.process = None;
                return Err(format!("containerd ended at start ({exit})"));
            }
            if Instant::now() >= deadline {
                return Err(format!("containerd is not ready: {not_ready}"));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn try_stop(&mut self) -> Result<(), String> {
        let Some(mut child) = self.process.take() else {
            return Ok(());
        };
        let pid = libc::pid_t::try_from(child.id()).map_err(|e| e.to_string())?;
        // SAFETY: kill has no memory effects; `pid` is our child, not yet
        // waited for, so it cannot have been reused by another process.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match child.try_wait() {
                Ok(Some(_)) => return Ok(()),
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err("containerd did not stop within 20 s of SIGTERM (killed)".into());
                }
            }
        }
    }

    /// One CRI call on a fresh connection (a restarted containerd has a
    /// new socket), on this fixture's runtime.
    fn cri<T, F>(&self, call: impl FnOnce(RuntimeServiceClient<Channel>) -> F) -> Result<T, String>
    where
        F: Future<Output = Result<T, tonic::Status>>,
    {
        let call = async {
            let channel = connect(&self.socket)
                .await
                .map_err(|e| format!("connecting to {}: {e:?}", self.socket.display()))?;
            call(RuntimeServiceClient::new(channel))
                .await
                .map_err(|status| format!("{}: {}", status.code(), status.message()))
        };
        // The timer is made inside the runtime: it needs its time driver.
        self.runtime
            .block_on(async { tokio::time::timeout(DEADLINE, call).await })
            .unwrap_or_else(|_| Err(format!("no answer within {DEADLINE:?}")))
    }

    /// The end of containerd's log, for failure messages.
    fn log_tail(&self) -> String {
        let log = fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        format!(
            "containerd's log, last lines:\n{}",
            lines[lines.len().saturating_sub(30)..].join("\n")
        )
    }

    /// What a failed removal or a killed containerd leaves: runc's
    /// containers (the pause processes), their shims, mounts in the test's
    /// folder, pods' network namespaces. Each step only touches what this
    /// fixture made.
    fn remove_leftovers(&mut self) {
        let runc_root = self.dir.join("runc").join(CRI_NAMESPACE);
        for id in fs::read_dir(&runc_root).into_iter().flatten().flatten() {
            let _ = Command::new("runc")
                .arg("--root")
                .arg(&runc_root)
                .args(["delete", "--force"])
                .arg(id.file_name())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        // The shims of this containerd: started with `-address SOCKET`.
        for pid in processes_with_args(&["-address", &self.socket.to_string_lossy()]) {
            // SAFETY: kill has no memory effects; a shim whose command line
            // names this fixture's socket is this fixture's.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        for netns in std::mem::take(&mut self.pods).into_values() {
            if netns.starts_with("/var/run/netns") && netns.exists() {
                let _ = Command::new("umount").arg(&netns).status();
                let _ = fs::remove_file(&netns);
            }
        }
        // Deepest first: the sandboxes' shm and rootfs mounts.
        let mut mounts = mounts_under(&self.dir);
        mounts.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
        for mount in mounts {
            let _ = Command::new("umount").arg("-l").arg(&mount).status();
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("{}", self.log_tail());
        }
        // Remove the sandboxes as kubelet would, with containerd running
        // (started again if the test had stopped it): that frees their
        // addresses, network namespaces, mounts and shims. Every sandbox
        // this containerd lists is this fixture's, also one whose
        // RunPodSandbox did not answer in time.
        if self.asked {
            match self.try_start().and_then(|()| self.try_list_pods()) {
                Ok(listed) => {
                    let ids: BTreeSet<String> = listed
                        .into_iter()
                        .map(|s| s.id)
                        .chain(self.pods.keys().cloned())
                        .collect();
                    for id in ids {
                        if let Err(e) = self.try_remove_pod(&id) {
                            eprintln!("cleanup: {e}");
                        }
                    }
                }
                Err(e) => eprintln!("cleanup: {e}"),
            }
        }
        if let Err(e) = self.try_stop() {
            eprintln!("cleanup: {e}");
        }
        self.remove_leftovers();
        // CNI's cache of results (CNI DEL removes them; a failed removal
        // leaves them): the pod network's, named after this fixture's
        // network, and the loopback's, after the sandbox.
        for entry in fs::read_dir("/var/lib/cni/results")
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            let loopback = name
                .strip_prefix("cni-loopback-")
                .and_then(|n| n.strip_suffix("-lo"))
                .is_some_and(|id| self.ran.contains(id));
            if loopback || name.starts_with(&format!("{}-", self.network)) {
                let _ = fs::remove_file(entry.path());
            }
        }
        // A killed shim's socket: named by a hash of containerd's address,
        // the namespace and the sandbox (containerd's shim.SocketAddress).
        for id in &self.ran {
            let name = sha256(format!("{}/{CRI_NAMESPACE}/{id}", self.socket.display()).as_bytes());
            let _ = fs::remove_file(Path::new("/run/containerd/s").join(name));
        }
        // The pods' cgroups are gone with them (runc removes each); what
        // holds them is this fixture's. rmdir removes only empty cgroups.
        for path in cgroup_paths(&self.cgroup_root) {
            remove_empty_dirs(&path);
        }
        // Deepest first, and only if empty: another test's containerd may
        // use them too.
        for (path, existed) in self.outside.iter().rev() {
            if !existed {
                let _ = fs::remove_dir(path);
            }
        }
        let _ = Command::new("ip")
            .args(["-n", &self.node.name, "link", "del", &self.bridge])
            .stderr(Stdio::null())
            .status();
        let _ = fs::remove_dir_all(&self.dir);
        // `node` (the namespace) is deleted when the fields drop, after this.
    }
}

/// Kubelet's sandbox config for `spec`: its labels on the sandbox, the
/// pod's metadata, its hostname (none for host network), and the
/// namespaces and seccomp profile kubelet asks for.
fn sandbox_config(spec: &PodSpec, cgroup_parent: String) -> PodSandboxConfig {
    let mut labels: HashMap<String, String> = spec.labels.iter().cloned().collect();
    labels.insert("io.kubernetes.pod.name".into(), spec.name.clone());
    labels.insert("io.kubernetes.pod.namespace".into(), spec.namespace.clone());
    labels.insert("io.kubernetes.pod.uid".into(), spec.uid.clone());
    let annotations = HashMap::from([
        ("kubernetes.io/config.source".to_string(), "api".to_string()),
        (
            "kubernetes.io/config.seen".to_string(),
            "2026-01-01T00:00:00Z".to_string(),
        ),
    ]);
    let network = if spec.host_network {
        NamespaceMode::Node
    } else {
        NamespaceMode::Pod
    };
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: spec.name.clone(),
            uid: spec.uid.clone(),
            namespace: spec.namespace.clone(),
            attempt: 0,
        }),
        // containerd refuses a hostname for a host-network sandbox (it
        // would be the node's); kubelet sends the pod's name, cut to a
        // DNS label.
        hostname: if spec.host_network {
            String::new()
        } else {
            spec.name.chars().take(63).collect()
        },
        labels,
        annotations,
        linux: Some(LinuxPodSandboxConfig {
            cgroup_parent,
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(NamespaceOption {
                    network: network as i32,
                    pid: NamespaceMode::Container as i32,
                    ipc: NamespaceMode::Pod as i32,
                    ..Default::default()
                }),
                seccomp: Some(SecurityProfile {
                    profile_type: ProfileType::RuntimeDefault as i32,
                    localhost_ref: String::new(),
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A channel to the CRI on a Unix socket: tonic takes any connector; the
/// URI is a placeholder it needs for requests' authority.
async fn connect(socket: &Path) -> Result<Channel, tonic::transport::Error> {
    let socket = socket.to_path_buf();
    Endpoint::from_static("http://[::]")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await
}

/// A tar archive of regular files: (path, contents, mode).
fn tarball(files: &[(&str, &[u8], u32)]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for &(path, data, mode) in files {
        let mut header = tar::Header::new_ustar();
        header.set_size(data.len() as u64);
        header.set_mode(mode);
        header.set_mtime(0);
        header.set_entry_type(tar::EntryType::Regular);
        builder.append_data(&mut header, path, data).unwrap();
    }
    builder.into_inner().unwrap()
}

fn sha256(data: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, data)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Where the cgroup `path` is, in every hierarchy: under each of cgroup
/// v1's (/sys/fs/cgroup/memory, ...) and at v2's root (/sys/fs/cgroup),
/// whichever the machine mounts (a path that is not there is no cgroup).
pub fn cgroup_paths(path: &str) -> Vec<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    let relative = path.trim_start_matches('/');
    fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .map(|hierarchy| hierarchy.path().join(relative))
        .chain([root.join(relative)])
        .collect()
}

/// Removes `dir` and the folders under it, deepest first, where they are
/// empty (a cgroup is removed only when no process and no cgroup is in it).
fn remove_empty_dirs(dir: &Path) {
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_empty_dirs(&entry.path());
        }
    }
    let _ = fs::remove_dir(dir);
}

/// Processes whose command line has `args` in a row.
fn processes_with_args(args: &[&str]) -> Vec<libc::pid_t> {
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<libc::pid_t>() else {
            continue;
        };
        let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let words: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        if words
            .windows(args.len())
            .any(|w| w.iter().zip(args).all(|(a, b)| *a == b.as_bytes()))
        {
            found.push(pid);
        }
    }
    found
}

/// Mount points at or under `dir`, from this process's mount table.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|point| PathBuf::from(point.replace("\\040", " ")))
        .filter(|point| point.starts_with(dir))
        .collect()
}
