//! A Kubernetes node (containerd's CRI, runc, CNI's bridge and host-local)
//! driven as kubelet drives it: the ground the tests of ntm's pod names
//! stand on. Pods run on a /29 of 198.18.0.0/15, traffic flows only between
//! their namespaces.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, UdpSocket},
    time::{Duration, Instant},
};

use crate::kit::containerd::{Containerd, Pod, PodSpec, cgroup_paths};

const BRIDGE: &str = "ntmk8s0";
/// Five pod addresses: .1 is the bridge's (the gateway), .0 and .7 are
/// the network's and the broadcast's.
const SUBNET: &str = "198.18.200.0/29";
const GATEWAY: Ipv4Addr = Ipv4Addr::new(198, 18, 200, 1);

fn pod_spec(name: &str, hash: &str) -> PodSpec {
    PodSpec::new("shop", name, &[("app", "web"), ("pod-template-hash", hash)])
}

/// The pod's address, which must be one host-local hands out on SUBNET.
fn pod_ip(pod: &Pod) -> Ipv4Addr {
    let Some(IpAddr::V4(ip)) = pod.ip else {
        panic!("{} has no IPv4 address: {:?}", pod.id, pod.ip);
    };
    let last = ip.octets()[3];
    assert!(
        ip.octets()[..3] == [198, 18, 200] && (2..=6).contains(&last),
        "{} got {ip}, not a pod address of {SUBNET}",
        pod.id
    );
    ip
}

/// Sends `count` datagrams from pod `from` to pod `to` and returns how many
/// arrived, from `from`'s address (a bounded exchange: one second at most
/// after the last one is sent).
fn udp_between(from: &Pod, to: &Pod, port: u16, count: usize) -> usize {
    let (from_ip, to_ip) = (pod_ip(from), pod_ip(to));
    let receiver = to.run(|| UdpSocket::bind((to_ip, port)).expect("bind in the pod"));
    receiver
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    from.run(|| {
        let sender = UdpSocket::bind((from_ip, 0)).expect("bind in the pod");
        for i in 0..count {
            sender
                .send_to(format!("datagram {i}").as_bytes(), (to_ip, port))
                .expect("send");
        }
    });
    let mut buf = [0u8; 64];
    let mut arrived = 0;
    while let Ok((_, peer)) = receiver.recv_from(&mut buf) {
        assert_eq!(peer.ip(), IpAddr::V4(from_ip), "a datagram from elsewhere");
        arrived += 1;
        if arrived == count {
            break;
        }
    }
    arrived
}

/// The fixture runs pods as kubelet would: each sandbox has kubelet's labels,
/// an address on the pod network and a network namespace of its own from
/// which it reaches the others; a host-network pod has the node's; an
/// address freed by a removed pod is handed out again once the /29 is full;
/// pods keep running while containerd restarts, and it lists them again.
pub fn the_fixture_runs_pods_like_kubelet() {
    let started = Instant::now();
    let mut node = Containerd::new("smoke", BRIDGE, SUBNET);
    eprintln!(
        "containerd ready, pause image imported: {:?}",
        started.elapsed()
    );

    let started = Instant::now();
    let a = node.run_pod(&pod_spec("web-5d8f9c7b6-x2x9q", "5d8f9c7b6"));
    eprintln!("a sandbox: {:?}", started.elapsed());
    let b = node.run_pod(&pod_spec("web-5d8f9c7b6-k7m4t", "5d8f9c7b6"));
    let (a_ip, b_ip) = (pod_ip(&a), pod_ip(&b));
    assert_ne!(a_ip, b_ip);
    assert_ne!(a.netns, b.netns, "each pod has its own network namespace");
    for (pod, ip) in [(&a, a_ip), (&b, b_ip)] {
        let eth0 = pod.exec(&["ip", "-4", "-o", "addr", "show", "dev", "eth0"]);
        assert!(eth0.contains(&format!("{ip}/29")), "{eth0}");
    }
    let bridge = node
        .node()
        .exec(&["ip", "-4", "-o", "addr", "show", "dev", BRIDGE]);
    assert!(bridge.contains(&format!("{GATEWAY}/29")), "{bridge}");

    let listed = node.list_pods();
    for (pod, name) in [(&a, "web-5d8f9c7b6-x2x9q"), (&b, "web-5d8f9c7b6-k7m4t")] {
        let sandbox = listed
            .iter()
            .find(|s| s.id == pod.id)
            .unwrap_or_else(|| panic!("{} is not listed: {listed:?}", pod.id));
        let label = |key: &str| sandbox.labels.get(key).map(String::as_str);
        assert_eq!(label("io.kubernetes.pod.name"), Some(name));
        assert_eq!(label("io.kubernetes.pod.namespace"), Some("shop"));
        assert_eq!(
            label("io.kubernetes.pod.uid"),
            Some(pod_spec(name, "").uid.as_str())
        );
        assert_eq!(label("pod-template-hash"), Some("5d8f9c7b6"));
        assert_eq!(label("app"), Some("web"));
        let metadata = sandbox.metadata.as_ref().expect("metadata");
        assert_eq!(
            (metadata.name.as_str(), metadata.namespace.as_str()),
            (name, "shop")
        );
    }

    assert_eq!(udp_between(&a, &b, 5400, 10), 10, "a to b");
    assert_eq!(udp_between(&b, &a, 5401, 10), 10, "b to a");

    let host = node.run_pod(&PodSpec {
        host_network: true,
        ..PodSpec::new(
            "kube-system",
            "node-exporter-h8c2v",
            &[("app", "node-exporter")],
        )
    });
    assert_eq!(
        host.ip, None,
        "a host-network pod has no address of its own"
    );
    assert_eq!(host.netns, node.node().path());

    // host-local hands out the address after the last one it gave, round
    // the range: a freed address comes back only once the rest are taken.
    let c = node.run_pod(&pod_spec("api-7c9d8e6f5-q2w3e", "7c9d8e6f5"));
    let d = node.run_pod(&pod_spec("api-7c9d8e6f5-r4t5y", "7c9d8e6f5"));
    node.remove_pod(&a.id);
    assert!(!a.netns.exists(), "{} outlived its pod", a.netns.display());
    let e = node.run_pod(&pod_spec("api-7c9d8e6f5-u6i7o", "7c9d8e6f5"));
    let taken: BTreeSet<Ipv4Addr> = [&b, &c, &d, &e].into_iter().map(pod_ip).collect();
    assert_eq!(taken.len(), 4, "{taken:?}");
    assert!(!taken.contains(&a_ip), "reused at once: {taken:?}");
    let f = node.run_pod(&pod_spec("api-7c9d8e6f5-p8a9s", "7c9d8e6f5"));
    assert_eq!(pod_ip(&f), a_ip, "the /29 is full but for {a_ip}");
    assert_eq!(udp_between(&f, &b, 5402, 10), 10, "f (a's address) to b");

    // containerd stops; the pods keep running and their network works.
    node.stop();
    assert_eq!(
        udp_between(&b, &f, 5403, 10),
        10,
        "while containerd is down"
    );
    let started = Instant::now();
    node.start();
    eprintln!("containerd restarted: {:?}", started.elapsed());
    let listed: BTreeSet<String> = node.list_pods().into_iter().map(|s| s.id).collect();
    let running: BTreeSet<String> = [&b, &c, &d, &e, &f, &host]
        .into_iter()
        .map(|p| p.id.clone())
        .collect();
    assert_eq!(listed, running, "after the restart");
    let again = node.pod(&f.id);
    assert_eq!((again.ip, &again.netns), (f.ip, &f.netns));

    // Dropping the node removes everything it made.
    let (dir, socket, node_ns) = (
        node.dir().to_path_buf(),
        node.socket().to_string_lossy().into_owned(),
        node.node().path(),
    );
    let cgroups = cgroup_paths(node.cgroup_root());
    assert!(
        cgroups.iter().any(|p| p.exists()),
        "the pods' cgroups are not under {}",
        node.cgroup_root()
    );
    let pod_namespaces: Vec<_> = [&b, &c, &d, &e, &f]
        .iter()
        .map(|p| p.netns.clone())
        .collect();
    drop(node);
    assert!(!dir.exists(), "{} is left", dir.display());
    assert!(!node_ns.exists(), "{} is left", node_ns.display());
    for netns in pod_namespaces {
        assert!(!netns.exists(), "{} is left", netns.display());
    }
    let procs = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .filter(|cmdline| String::from_utf8_lossy(cmdline).contains(&socket))
        .count();
    assert_eq!(procs, 0, "processes of the node are left");
    for cgroup in cgroups {
        assert!(!cgroup.exists(), "{} is left", cgroup.display());
    }
}
