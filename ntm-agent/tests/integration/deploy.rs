//! Deployment artefacts, tested like code: the systemd unit is valid, and
//! its capabilities are exactly enough for an unprivileged ntm to count.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, TcpListener, TcpStream, UdpSocket},
    process::Stdio,
    time::{Duration, Instant},
};

use crate::kit::{
    A4, Agent, B4, Link, Netns,
    containerd::{Containerd, Pod, PodSpec},
    scrape::{
        Guard, Prometheus, TempDir, http_get, metrics, start_prometheus_configured,
        udp_counted_exactly, urlencode, wait_for, wait_healthy,
    },
    sh,
};

const UNIT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/systemd/ntm.service");

fn unit_value(key: &str) -> String {
    let text = std::fs::read_to_string(UNIT).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("{key}= in {UNIT}"))
        .to_string()
}

pub fn systemd_unit_verifies() {
    if !std::path::Path::new("/usr/bin/systemd-analyze").exists() {
        assert!(
            std::env::var("NTM_REQUIRE_BPF").is_err(),
            "systemd-analyze is missing (Debian package systemd)"
        );
        eprintln!("SKIPPED: no systemd-analyze here");
        return;
    }
    // The units as installed, pointing at the binary just built: the agent
    // and the two that detach it when it stops for good.
    let dir = TempDir::new("unit");
    let mut units = Vec::new();
    for name in ["ntm.service", "ntm-pins.service", "ntm-detach.service"] {
        let source = std::path::Path::new(UNIT).with_file_name(name);
        let text = std::fs::read_to_string(&source)
            .unwrap()
            .replace("/usr/local/bin/ntm-agent", env!("CARGO_BIN_EXE_ntm-agent"));
        let unit = dir.0.join(name);
        std::fs::write(&unit, text).unwrap();
        units.push(unit.to_string_lossy().into_owned());
    }
    // With the web config's drop-in, as installed.
    let drop_in = dir.0.join("ntm.service.d");
    std::fs::create_dir_all(&drop_in).unwrap();
    std::fs::copy(
        std::path::Path::new(UNIT).with_file_name("ntm-web-config.conf"),
        drop_in.join("web-config.conf"),
    )
    .unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .args(&units)
        .output()
        .unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && report.trim().is_empty(), "{report}");
    assert_eq!(
        unit_value("AmbientCapabilities"),
        unit_value("CapabilityBoundingSet")
    );
}

pub fn an_unprivileged_agent_with_the_units_capabilities_counts() {
    // CAP_BPF CAP_NET_ADMIN CAP_PERFMON -> +bpf,+net_admin,+perfmon
    let caps: Vec<String> = unit_value("AmbientCapabilities")
        .split_whitespace()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_ascii_lowercase()))
        .collect();
    let caps = format!("-all,{}", caps.join(","));
    let link = Link::new("caps");
    let _agent = Guard(
        std::process::Command::new("ip")
            .args(["netns", "exec", &link.a.name, "setpriv"])
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(format!("--inh-caps={caps}"))
            .arg(format!("--ambient-caps={caps}"))
            .arg(format!("--bounding-set={caps}"))
            .arg(env!("CARGO_BIN_EXE_ntm-agent"))
            .args([
                "--numeric",
                "-i",
                &link.a_if,
                "-b",
                "127.0.0.1",
                "-p",
                "9950",
            ])
            .args(["--drain-interval", "100ms"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_healthy(&link.a, 9950);
    udp_counted_exactly(&link, 5320, 10, 72, 9950);
}

const RULES_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/prometheus");

/// The rule files and their promtool tests.
const RULE_FILES: [(&str, &str); 2] = [
    ("ntm-rules.yml", "ntm-rules.test.yml"),
    ("ntm-kubernetes-rules.yml", "ntm-kubernetes-rules.test.yml"),
];

/// Every expression of a rules file: the rest of an `expr:` line, with the
/// lines of a block scalar (`expr: |`) that follow it, more indented.
fn rule_exprs(text: &str) -> Vec<String> {
    let mut exprs = Vec::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let Some(rest) = line.trim_start().strip_prefix("expr:") else {
            continue;
        };
        let indent = line.len() - line.trim_start().len();
        let mut expr = rest.trim().trim_start_matches(['|', '>', '-']).to_string();
        while let Some(next) = lines.peek() {
            if !next.trim().is_empty() && next.len() - next.trim_start().len() <= indent {
                break;
            }
            expr.push('\n');
            expr.push_str(next.trim());
            lines.next();
        }
        exprs.push(expr);
    }
    exprs
}

/// A Prometheus in `ns` on 127.0.0.1:`port` that scrapes `targets` every
/// second as job "ntm" and evaluates `rules` every second.
fn prometheus_with_rules(ns: &Netns, port: u16, targets: &[String], rules: &str) -> Prometheus {
    let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
    start_prometheus_configured(
        ns,
        port,
        &format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {rules}\nscrape_configs:\n  - job_name: ntm\n    static_configs:\n      - targets: [{}]\n",
            targets.join(", ")
        ),
    )
}

/// Whether `/metrics` text exports `metric`: a family of that name, or the
/// `_bucket`, `_count` or `_sum` series of a histogram (typed under the
/// histogram's own name).
fn exports(text: &str, metric: &str) -> bool {
    let typed = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("# TYPE {name} ")))
    };
    typed(metric).is_some()
        || ["_bucket", "_count", "_sum"].iter().any(|suffix| {
            metric
                .strip_suffix(suffix)
                .is_some_and(|histogram| typed(histogram) == Some("histogram"))
        })
}

/// The `/metrics` of an agent that has seen a TCP handshake complete and a
/// connection refused, so that its TCP health families have series (a
/// family without any is left out of `/metrics`): an agent of its own on
/// a plain link, which sees both at once, where the Kubernetes agents'
/// pods here make no refused connection.
fn tcp_health_metrics() -> String {
    const PORT: u16 = 9472;
    let link = Link::new("rtcp");
    let _agent = Agent::in_ns(&link.a)
        .iface(&link.a_if)
        .port(PORT)
        .args(["--drain-interval", "200ms"])
        .spawn();
    wait_healthy(&link.a, PORT);
    let _listener = link.b.run(|| TcpListener::bind((B4, 5335)).unwrap());
    link.a.run(|| {
        TcpStream::connect((B4, 5335)).unwrap();
        let refused = TcpStream::connect((B4, 5336)).unwrap_err();
        assert_eq!(
            refused.kind(),
            std::io::ErrorKind::ConnectionRefused,
            "{refused}"
        );
    });
    wait_for(
        "the agent to have the handshake and the refused connection",
        Duration::from_secs(20),
        || {
            let text = metrics(&link.a, PORT)?;
            (text.contains(&format!(
                r#"ntm_tcp_handshake_seconds_count{{client="{A4}""#
            )) && text.contains(r#"reason="refused""#))
            .then_some(text)
        },
    )
}

/// The samples of an instant query: each one's labels and value.
fn samples(ns: &Netns, port: u16, query: &str) -> Vec<(serde_json::Value, f64)> {
    let url = format!("/api/v1/query?query={}", urlencode(query));
    let Some((200, body)) = http_get(ns, port, &url) else {
        return Vec::new();
    };
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["status"], "success", "{query}: {body}");
    json["data"]["result"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let value = r["value"][1].as_str().unwrap().parse().unwrap();
            (r["metric"].clone(), value)
        })
        .collect()
}

/// Sends `count` datagrams of 200 bytes from `pod` to `to`.
fn send(pod: &Pod, to: Ipv4Addr, port: u16, count: usize) {
    let from = pod.ipv4();
    pod.run(|| {
        let socket = UdpSocket::bind((from, 0)).unwrap();
        for _ in 0..count {
            socket.send_to(&[0; 200], (to, port)).unwrap();
        }
    });
}

/// The alert and recording rules: `promtool check rules` is clean,
/// `promtool test rules` passes (each alert fires on input that calls for
/// it, not before its `for`; the recording rules name a flow's remote
/// workload and node across nodes), and every ntm metric they name is one
/// a real agent exports. Then the recording rules in a real Prometheus
/// over two real Kubernetes nodes (containerd's CRI, a pod on each, an
/// agent on each node's pod bridge): a flow from the pod on node A to the
/// pod on node B, counted by both agents, shows once under B's workload
/// and node (and, by its source, under A's workload); a flow to node B's
/// own address under B's name; a flow to an address no node reports under
/// that address; a pod its own node named, on that node.
pub fn alert_rules_pass_promtool_and_name_real_metrics() {
    for (rules, test) in RULE_FILES {
        for args in [vec!["check", "rules", rules], vec!["test", "rules", test]] {
            let out = std::process::Command::new("promtool")
                .args(&args)
                .current_dir(RULES_DIR)
                .output()
                .expect("promtool (cargo xtask test installs prometheus)");
            assert!(
                out.status.success(),
                "promtool {args:?}:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let mut exprs = Vec::new();
    for (rules, _) in RULE_FILES {
        let text = std::fs::read_to_string(format!("{RULES_DIR}/{rules}")).unwrap();
        let found = rule_exprs(&text);
        assert_eq!(
            found.len(),
            text.lines()
                .filter(|l| l.trim_start().starts_with("expr:"))
                .count(),
            "{rules}"
        );
        exprs.extend(found);
    }
    let named: BTreeSet<&str> = exprs
        .iter()
        .flat_map(|expr| expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')))
        .filter(|word| word.starts_with("ntm_"))
        .collect();
    for metric in ["ntm_bytes_total", "ntm_k8s_pod_info", "ntm_node_info"] {
        assert!(named.contains(metric), "{metric} not found in {named:?}");
    }

    // Two nodes, their pod networks routed to each other over a link
    // between the nodes' namespaces (198.18.212.1 on A, .2 on B).
    let mut node_a = Containerd::new("rulesa", "ntmra0", "198.18.210.0/29");
    let mut node_b = Containerd::new("rulesb", "ntmrb0", "198.18.211.0/29");
    let web = node_a.run_pod(&PodSpec::new(
        "shop",
        "web-5d8f9c7b6-x2x9q",
        &[("pod-template-hash", "5d8f9c7b6")],
    ));
    let db = node_b.run_pod(&PodSpec::new(
        "shop",
        "db-0",
        &[("statefulset.kubernetes.io/pod-name", "db-0")],
    ));
    web.exec(&[
        "ip",
        "route",
        "add",
        "198.18.208.0/20",
        "via",
        "198.18.210.1",
    ]);
    db.exec(&[
        "ip",
        "route",
        "add",
        "198.18.208.0/20",
        "via",
        "198.18.211.1",
    ]);

    let (a, b) = (node_a.node(), node_b.node());
    sh(&[
        "ip", "link", "add", "ntmab0", "netns", &a.name, "type", "veth", "peer", "name", "ntmab1",
        "netns", &b.name,
    ]);
    for (ns, link, address, other_pods, via) in [
        (
            a,
            "ntmab0",
            "198.18.212.1/30",
            "198.18.211.0/29",
            "198.18.212.2",
        ),
        (
            b,
            "ntmab1",
            "198.18.212.2/30",
            "198.18.210.0/29",
            "198.18.212.1",
        ),
    ] {
        ns.exec(&["ip", "addr", "add", address, "dev", link]);
        ns.exec(&["ip", "link", "set", link, "up"]);
        ns.exec(&["ip", "route", "add", other_pods, "via", via]);
        ns.exec(&["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]);
    }
    let agent = |node: &Containerd, name: &str, port: u16| {
        Agent::in_ns(node.node())
            .names(true)
            .cri_socket(node.socket())
            .iface(node.bridge())
            .port_any_address(port)
            .env("NODE_NAME", name)
            .args(["--drain-interval", "200ms", "--no-containers", "--no-pin"])
            .args(["--dns-server", "127.0.0.1:5398", "--dns-timeout", "200ms"])
            .args(["--name-wait", "300ms"])
            .spawn()
    };
    let _agent_a = agent(&node_a, "node-a", 9470);
    let _agent_b = agent(&node_b, "node-b", 9471);
    wait_healthy(a, 9470);
    wait_healthy(b, 9471);
    wait_for(
        "both nodes' pods in their agents' info",
        Duration::from_secs(20),
        || {
            let on_a = metrics(a, 9470)?;
            let on_b = metrics(b, 9471)?;
            (on_a.contains(&format!(r#"ntm_k8s_pod_info{{address="{}",namespace="shop",node="node-a",pod="web-5d8f9c7b6-x2x9q",workload="web",workload_kind="Deployment"}} 1"#, web.ipv4()))
            && on_b.contains(&format!(r#"ntm_k8s_pod_info{{address="{}",namespace="shop",node="node-b",pod="db-0",workload="db",workload_kind="StatefulSet"}} 1"#, db.ipv4()))
            && on_b.contains(r#"ntm_node_info{address="198.18.212.2",node="node-b"} 1"#))
        .then_some(())
        },
    );
    let text = metrics(a, 9470).unwrap();
    let tcp_health = tcp_health_metrics();
    for metric in &named {
        assert!(
            exports(&text, metric) || exports(&tcp_health, metric),
            "the rules name {metric}, which ntm does not export:\n{text}\n{tcp_health}"
        );
    }

    let rules = format!("{RULES_DIR}/ntm-kubernetes-rules.yml");
    let _prometheus = prometheus_with_rules(
        a,
        9490,
        &[
            "127.0.0.1:9470".to_string(),
            "198.18.212.2:9471".to_string(),
        ],
        &rules,
    );
    let (nowhere, node_b_address) = (
        Ipv4Addr::new(198, 18, 213, 9),
        Ipv4Addr::new(198, 18, 212, 2),
    );
    // Traffic in rounds, so that Prometheus sees the counters grow.
    let deadline = Instant::now() + Duration::from_secs(60);
    let web_src = format!(r#"src="{}""#, web.ipv4());
    loop {
        send(&web, db.ipv4(), 5330, 20);
        send(&web, node_b_address, 5331, 10);
        send(&web, nowhere, 5332, 5);
        let by_workload = samples(a, 9490, "src_dst_workload:ntm_bytes:rate5m > 0");
        let by_node = samples(a, 9490, "src_dst_node:ntm_bytes:rate5m > 0");
        let reverse = samples(a, 9490, "src_workload_dst:ntm_bytes:rate5m > 0");
        let has = |set: &[(serde_json::Value, f64)], labels: &[(&str, &str)]| {
            set.iter()
                .any(|(m, _)| labels.iter().all(|(k, v)| m[k] == *v))
        };
        let done = has(
            &by_workload,
            &[("src", "shop/web"), ("dst_workload", "shop/db")],
        ) && has(
            &by_workload,
            &[("src", "shop/web"), ("dst_workload", "node-b")],
        ) && has(
            &by_workload,
            &[("src", "shop/web"), ("dst_workload", &nowhere.to_string())],
        ) && has(&by_node, &[("src", "shop/web"), ("dst_node", "node-b")])
            && has(&by_node, &[("src", "shop/db"), ("dst_node", "node-a")])
            && has(
                &reverse,
                &[("src_workload", "shop/web"), ("dst", "shop/db")],
            );
        if done {
            eprintln!("named by the rules:\n{by_workload:?}\n{by_node:?}\n{reverse:?}");
            // Node B counted the same flow (its src web's bare address): not
            // a second time here.
            let all = samples(a, 9490, "src_dst_workload:ntm_bytes:rate5m");
            assert!(
                !all.iter().any(|(m, _)| m["src"] == web.ipv4().to_string()),
                "web's bare address as a source: {all:?}"
            );
            // A pod its own node's agent named is on that node.
            let nodes = samples(a, 9490, "src_dst_node:ntm_bytes:rate5m");
            assert!(
                !nodes
                    .iter()
                    .any(|(m, _)| m["dst_node"].as_str().unwrap_or("").contains('/')),
                "a workload as a node: {nodes:?}"
            );
            let raw = samples(
                a,
                9490,
                &format!("ntm_bytes_total{{{web_src},dst=\"shop/db\"}}"),
            );
            assert!(!raw.is_empty(), "node B did not count the flow itself");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the recording rules did not name the remote ends:\n{by_workload:?}\n{by_node:?}\n{reverse:?}"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
}
