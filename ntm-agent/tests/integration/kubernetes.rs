//! A Kubernetes node (containerd's CRI, runc, CNI's bridge and host-local)
//! driven as kubelet drives it: the ground the tests of ntm's pod names
//! stand on. Pods run on a /29 of 198.18.0.0/15, traffic flows only between
//! their namespaces.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, UdpSocket},
    time::{Duration, Instant},
};

use crate::kit::{
    Agent,
    containerd::{Containerd, Pod, PodSpec, cgroup_paths},
    run_in_netns,
    scrape::{Guard, metrics, sample_sum, wait_for, wait_healthy},
};

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
    let ip = pod.ipv4();
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

/// Sends `count` datagrams to `to`:`port` from `from` inside the network
/// namespace at `netns`, with a receiver bound there first (so that no ICMP
/// answers them); returns (packets, IP bytes) sent.
fn send_udp(
    from_netns: &std::path::Path,
    from: Ipv4Addr,
    to_netns: &std::path::Path,
    to: Ipv4Addr,
    port: u16,
    count: usize,
) -> (u64, u64) {
    let receiver = run_in_netns(to_netns, || UdpSocket::bind((to, port)).expect("bind"));
    let sent = run_in_netns(from_netns, || {
        let sender = UdpSocket::bind((from, 0)).expect("bind");
        let mut bytes = 0u64;
        for i in 0..count {
            let payload = format!("pod datagram {i}");
            sender
                .send_to(payload.as_bytes(), (to, port))
                .expect("send");
            bytes += 20 + 8 + payload.len() as u64;
        }
        (count as u64, bytes)
    });
    receiver
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    let mut buf = [0u8; 64];
    let mut arrived = 0;
    while arrived < count && receiver.recv_from(&mut buf).is_ok() {
        arrived += 1;
    }
    assert_eq!(arrived, count, "datagrams lost between the pods");
    sent
}

/// ntm on the node's CNI bridge names every pod address by the workload
/// the runtime's labels say (Deployment, StatefulSet, DaemonSet, a
/// CronJob's job, a bare pod), the node's own addresses (which host-network
/// pods share) by the node's name, and counts the traffic between them
/// exactly under those names; a removed pod's address, handed to a new pod,
/// gets the new pod's name in a series of its own; while containerd is
/// down the names stay, and the failures are counted.
pub fn pods_are_named_by_workload_and_counted_exactly() {
    const PORT: u16 = 9820;
    let mut node = Containerd::new("names", "ntmk8s1", "198.18.201.0/29");
    let web = node.run_pod(&PodSpec::new(
        "shop",
        "web-5d8f9c7b6-x2x9q",
        &[("app", "web"), ("pod-template-hash", "5d8f9c7b6")],
    ));
    let db = node.run_pod(&PodSpec::new(
        "shop",
        "db-0",
        &[
            ("statefulset.kubernetes.io/pod-name", "db-0"),
            ("controller-revision-hash", "db-6b8f9c"),
        ],
    ));
    let agent = node.run_pod(&PodSpec::new(
        "kube-system",
        "log-agent-8kx2p",
        &[
            ("controller-revision-hash", "6c9d8f7b5"),
            ("pod-template-generation", "1"),
        ],
    ));
    let backup = node.run_pod(&PodSpec::new(
        "ops",
        "backup-29481120-q7k2m",
        &[
            ("batch.kubernetes.io/job-name", "backup-29481120"),
            ("job-name", "backup-29481120"),
        ],
    ));
    let debug = node.run_pod(&PodSpec::new("shop", "debug", &[("run", "debug")]));
    let _host = node.run_pod(&PodSpec {
        host_network: true,
        ..PodSpec::new("kube-system", "node-exporter-h8c2v", &[])
    });

    let _ntm = Agent::in_ns(node.node())
        .names(true)
        .cri_socket(node.socket())
        .iface("ntmk8s1")
        .port(PORT)
        .env("NODE_NAME", "node-a")
        .args([
            "--local-net",
            "198.18.201.0/29",
            "--drain-interval",
            "200ms",
        ])
        .args(["--dns-server", "127.0.0.1:5398", "--dns-timeout", "200ms"])
        .args(["--name-wait", "300ms", "--no-containers", "--no-pin"])
        // As the chart runs it: root gone after attaching. The runtime's
        // socket is root's, mode 0660: ntm keeps its group to reconnect.
        .args(["--user", "65534"])
        .spawn();
    wait_healthy(node.node(), PORT);
    let pods = [
        (&web, "shop", "web-5d8f9c7b6-x2x9q", "web", "Deployment"),
        (&db, "shop", "db-0", "db", "StatefulSet"),
        (
            &agent,
            "kube-system",
            "log-agent-8kx2p",
            "log-agent",
            "DaemonSet",
        ),
        (&backup, "ops", "backup-29481120-q7k2m", "backup", "CronJob"),
        (&debug, "shop", "debug", "debug", "Pod"),
    ];
    // Every pod address in ntm_k8s_pod_info, with its workload and kind.
    wait_for(
        "the pods in ntm_k8s_pod_info",
        Duration::from_secs(20),
        || {
            let text = metrics(node.node(), PORT)?;
            pods.iter()
            .all(|(pod, namespace, name, workload, kind)| {
                text.contains(&format!(
                    r#"ntm_k8s_pod_info{{address="{}",namespace="{namespace}",node="node-a",pod="{name}",workload="{workload}",workload_kind="{kind}"}} 1"#,
                    pod.ipv4(),
                ))
            })
            .then_some(())
        },
    );

    // Traffic between the pods, and from the node (its bridge address).
    let gateway = Ipv4Addr::new(198, 18, 201, 1);
    let node_ns = node.node().path();
    // (source, destination, (packets, bytes) sent): one flow each.
    let expected: Vec<(&str, &str, (u64, u64))> = vec![
        (
            "shop/web",
            "shop/db",
            send_udp(&web.netns, web.ipv4(), &db.netns, db.ipv4(), 5432, 20),
        ),
        (
            "kube-system/log-agent",
            "ops/backup",
            send_udp(
                &agent.netns,
                agent.ipv4(),
                &backup.netns,
                backup.ipv4(),
                7001,
                7,
            ),
        ),
        (
            "shop/debug",
            "shop/web",
            send_udp(&debug.netns, debug.ipv4(), &web.netns, web.ipv4(), 7002, 5),
        ),
        (
            "node-a",
            "shop/web",
            send_udp(&node_ns, gateway, &web.netns, web.ipv4(), 7003, 4),
        ),
    ];
    // What ntm counted from `src` to `dst` over UDP.
    let counted = |text: &str, src: &str, dst: &str| {
        let parts = [
            format!(r#"src="{src}""#),
            format!(r#"dst="{dst}""#),
            r#"proto="udp""#.to_string(),
        ];
        let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
        (
            sample_sum(text, "ntm_packets_total", &parts),
            sample_sum(text, "ntm_bytes_total", &parts),
        )
    };
    let text = wait_for("every flow counted", Duration::from_secs(20), || {
        let text = metrics(node.node(), PORT)?;
        expected
            .iter()
            .all(|(src, dst, sent)| counted(&text, src, dst) == *sent)
            .then_some(text)
    });
    for (src, dst, sent) in &expected {
        assert_eq!(counted(&text, src, dst), *sent, "{src} -> {dst}\n{text}");
    }
    assert!(
        !text.contains(&format!(r#"src="{}""#, web.ipv4())),
        "a pod address left unnamed:\n{text}"
    );

    // A Service: its ClusterIP is named by the DNS answer the pod got, as
    // SERVICE.NAMESPACE (the cluster's name, never cut to a registrable
    // domain). Seen at the pod's port, before any DNAT would rewrite it.
    let cluster_ip = Ipv4Addr::new(198, 18, 202, 10);
    let _dns = Guard(
        std::process::Command::new("nsenter")
            .arg(format!("--net={}", node_ns.display()))
            .args(["dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null"])
            .args(["--no-resolv", "--no-hosts", "--interface=ntmk8s1"])
            .args(["--bind-interfaces", "--except-interface=lo", "--pid-file="])
            .args(["--user=root", "--log-facility=-"])
            .arg(format!(
                "--host-record=web.shop.svc.cluster.local,{cluster_ip}"
            ))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("dnsmasq"),
    );
    wait_for("the cluster's DNS answer", Duration::from_secs(10), || {
        let answer = db.exec(&[
            "dig",
            "+short",
            "+time=1",
            "+tries=1",
            "@198.18.201.1",
            "web.shop.svc.cluster.local",
        ]);
        (answer.trim() == cluster_ip.to_string()).then_some(())
    });
    // Service addresses are reached through the node (a pod's default
    // route; this CNI config gives the pod network's only).
    db.exec(&[
        "ip",
        "route",
        "add",
        "198.18.202.0/24",
        "via",
        "198.18.201.1",
    ]);
    // The answer is observed before the flow it names is first drained.
    std::thread::sleep(Duration::from_millis(500));
    let to_service = run_in_netns(&db.netns, || {
        let sender = UdpSocket::bind((db.ipv4(), 0)).expect("bind");
        let mut bytes = 0;
        for i in 0..8 {
            let payload = format!("to the service {i}");
            sender
                .send_to(payload.as_bytes(), (cluster_ip, 80))
                .expect("send");
            bytes += 20 + 8 + payload.len() as u64;
        }
        (8u64, bytes)
    });
    wait_for(
        "the Service's traffic under its name",
        Duration::from_secs(20),
        || {
            let text = metrics(node.node(), PORT)?;
            (counted(&text, "shop/db", "web.shop") == to_service).then_some(())
        },
    );

    // The debug pod goes; a new pod (a StatefulSet's) takes its address,
    // the only one left on the /29.
    let debug_ip = debug.ipv4();
    node.remove_pod(&debug.id);
    let cache = node.run_pod(&PodSpec::new(
        "shop",
        "cache-0",
        &[
            ("statefulset.kubernetes.io/pod-name", "cache-0"),
            ("controller-revision-hash", "cache-5f6c7"),
        ],
    ));
    assert_eq!(cache.ipv4(), debug_ip, "the freed address is reused");
    wait_for(
        "the new pod in ntm_k8s_pod_info",
        Duration::from_secs(20),
        || {
            let text = metrics(node.node(), PORT)?;
            (text.contains(&format!(r#"address="{debug_ip}""#))
                && text.contains(r#"pod="cache-0""#)
                && !text.contains(r#"pod="debug""#))
            .then_some(())
        },
    );
    let before_debug = counted(&text, "shop/debug", "shop/web");
    let sent = send_udp(&cache.netns, debug_ip, &web.netns, web.ipv4(), 7002, 6);
    let text = wait_for(
        "the new pod's traffic under its own name",
        Duration::from_secs(20),
        || {
            let text = metrics(node.node(), PORT)?;
            (counted(&text, "shop/cache", "shop/web") == sent).then_some(text)
        },
    );
    assert_eq!(
        counted(&text, "shop/debug", "shop/web"),
        before_debug,
        "the old pod's series did not grow:\n{text}"
    );

    // containerd stops: names stay, the failures are counted; it starts
    // again and is asked again.
    node.stop();
    wait_for("a runtime error counted", Duration::from_secs(20), || {
        let text = metrics(node.node(), PORT)?;
        (sample_sum(&text, "ntm_k8s_runtime_errors_total", &[]) > 0).then_some(())
    });
    let before = counted(&text, "shop/web", "shop/db");
    let more = send_udp(&web.netns, web.ipv4(), &db.netns, db.ipv4(), 5432, 9);
    wait_for(
        "traffic named while containerd is down",
        Duration::from_secs(20),
        || {
            let text = metrics(node.node(), PORT)?;
            (counted(&text, "shop/web", "shop/db") == (before.0 + more.0, before.1 + more.1))
                .then_some(())
        },
    );
    node.start();
    wait_for("the pods listed again", Duration::from_secs(30), || {
        let text = metrics(node.node(), PORT)?;
        text.contains(r#"pod="cache-0""#).then_some(())
    });
    let text = metrics(node.node(), PORT).unwrap();
    assert!(text.contains(r#"ntm_names{source="kubernetes"}"#), "{text}");
}
