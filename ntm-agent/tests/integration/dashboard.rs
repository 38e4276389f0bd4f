//! The Grafana dashboard (grafana/ntm.json): its structure, and every panel's
//! and variable's query evaluated by a real Prometheus that scrapes a real
//! agent while known traffic flows. No errors, and data where traffic was
//! sent; the Kubernetes panels and variables with data from an agent on a
//! real Kubernetes node (containerd's CRI).

use std::{
    collections::HashSet,
    net::{TcpListener, TcpStream, UdpSocket},
    time::Duration,
};

use crate::kit::{
    A4, Agent, B4, Link, Netns,
    containerd::{Containerd, PodSpec},
    scrape::{http_get, metrics, start_prometheus, wait_for, wait_healthy},
};
use serde_json::Value;

fn dashboard() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../grafana/ntm.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn panels(d: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().unwrap() {
        out.push(p);
        for nested in p["panels"].as_array().into_iter().flatten() {
            out.push(nested);
        }
    }
    out
}

pub fn dashboard_structure() {
    let d = dashboard();
    let all = panels(&d);
    let ids: HashSet<i64> = all.iter().map(|p| p["id"].as_i64().unwrap()).collect();
    assert_eq!(ids.len(), all.len(), "panel ids are unique");

    let builtin = [
        "row",
        "timeseries",
        "piechart",
        "bargauge",
        "stat",
        "table",
        "text",
    ];
    for p in &all {
        let kind = p["type"].as_str().unwrap();
        assert!(
            builtin.contains(&kind),
            "{kind}: only built-in panels, no plugins"
        );
        if kind == "row" {
            continue;
        }
        let title = p["title"].as_str().unwrap();
        assert_eq!(
            p["datasource"]["uid"], "${datasource}",
            "{title}: panel datasource"
        );
        for t in p["targets"].as_array().unwrap() {
            assert_eq!(
                t["datasource"]["uid"], "${datasource}",
                "{title}: target datasource"
            );
            let expr = t["expr"].as_str().unwrap();
            assert!(
                !expr.contains("192.168") && !expr.contains("10.0."),
                "{title}: no subnets"
            );
        }
        let unit = p["fieldConfig"]["defaults"]["unit"].as_str().unwrap_or("");
        let bytes_panel = p["targets"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["expr"].as_str().unwrap().contains("_bytes_total"));
        if bytes_panel {
            assert!(
                ["Bps", "decbytes", "bytes"].contains(&unit),
                "{title}: byte panels use byte units, not {unit:?}"
            );
        }
    }

    // The TCP connection health row: a panel on each family; handshake
    // latency in seconds.
    for family in [
        "${prefix}_tcp_handshake_seconds_bucket{side=\"client\"",
        "${prefix}_tcp_handshake_seconds_bucket{side=\"server\"",
        "${prefix}_tcp_connections_failed_total",
        "${prefix}_tcp_retransmits_total",
    ] {
        assert!(
            all.iter()
                .any(|p| exprs(p).iter().any(|e| e.contains(family))),
            "no panel on {family}"
        );
    }
    for p in &all {
        if exprs(p)
            .iter()
            .any(|e| e.contains("_tcp_handshake_seconds"))
        {
            assert_eq!(
                p["fieldConfig"]["defaults"]["unit"], "s",
                "{}: handshake latency in seconds",
                p["title"]
            );
        }
    }

    // The Kubernetes row: its two panels, and the namespace and workload
    // variables from the pods every node's agent reports.
    for title in ["Traffic by workload", "Remote workload"] {
        assert!(
            all.iter()
                .any(|p| p["title"].as_str().unwrap().starts_with(title)),
            "no panel {title:?}"
        );
    }
    let vars = d["templating"]["list"].as_array().unwrap();
    for name in ["namespace", "workload"] {
        let v = vars.iter().find(|v| v["name"] == name).unwrap();
        assert!(
            v["definition"]
                .as_str()
                .unwrap()
                .starts_with("label_values(${prefix}_k8s_pod_info"),
            "{name}"
        );
    }
    let ds = vars.iter().find(|v| v["name"] == "datasource").unwrap();
    assert_eq!(ds["type"], "datasource");
    for v in vars.iter().filter(|v| v["type"] == "query") {
        assert_eq!(v["includeAll"], true, "{}", v["name"]);
        // "All" as .* also matches series whose label is empty.
        assert_eq!(v["allValue"], ".*", "{}", v["name"]);
        assert_eq!(v["datasource"]["uid"], "${datasource}");
    }
}

/// A panel's query expressions (none for a row).
fn exprs(p: &Value) -> Vec<&str> {
    p["targets"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| t["expr"].as_str().unwrap())
        .collect()
}

/// Whether a panel is one of the Kubernetes row's (it shows pods only).
fn kubernetes_panel(p: &Value) -> bool {
    exprs(p).iter().any(|e| e.contains("$namespace"))
}

/// Whether a panel shows TCP retransmissions: only a path that loses
/// segments makes them, and this test's link loses none, so the panel is
/// empty here, not broken (health.rs counts them over a lossy line).
fn retransmits_panel(p: &Value) -> bool {
    exprs(p)
        .iter()
        .any(|e| e.contains("_tcp_retransmits_total"))
}

/// A panel expression with Grafana's variables replaced as Grafana would for
/// `device` (and "All" for the rest).
fn substitute(expr: &str, device: &str) -> String {
    substitute_workload(expr, device, ".*", ".*")
}

/// As [`substitute`], with the namespace and workload variables too.
fn substitute_workload(expr: &str, device: &str, namespace: &str, workload: &str) -> String {
    expr.replace("${prefix}", "ntm")
        .replace("$namespace", namespace)
        .replace("$workload", workload)
        .replace("$__rate_interval", "15s")
        .replace("$__range", "2m")
        .replace("$device", device)
        .replace("$iface", ".*")
        .replace("$service", ".*")
        .replace("$proto", ".*")
        .replace("$vlan", ".*")
        .replace("$excluded", "^$")
}

fn query(ns: &Netns, port: u16, q: &str) -> Result<usize, String> {
    query_series(ns, port, q).map(|r| r.len())
}

/// The series (their labels) of an instant query.
fn query_series(ns: &Netns, port: u16, q: &str) -> Result<Vec<Value>, String> {
    let url = format!("/api/v1/query?query={}", crate::kit::scrape::urlencode(q));
    let (status, body) = http_get(ns, port, &url).ok_or("no answer")?;
    let json: Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
    if status != 200 || json["status"] != "success" {
        return Err(format!("{status}: {body}"));
    }
    Ok(json["data"]["result"]
        .as_array()
        .map(|r| r.iter().map(|s| s["metric"].clone()).collect())
        .unwrap_or_default())
}

/// The values of a `label_values(SELECTOR, LABEL)` variable, as Grafana
/// asks Prometheus for them.
fn variable_values(ns: &Netns, port: u16, v: &Value, namespace: &str) -> Vec<String> {
    let def = v["definition"]
        .as_str()
        .unwrap()
        .replace("${prefix}", "ntm")
        .replace("$namespace", namespace);
    let inner = def
        .strip_prefix("label_values(")
        .and_then(|r| r.strip_suffix(')'))
        .unwrap();
    let (selector, label) = inner.rsplit_once(", ").unwrap();
    let url = format!(
        "/api/v1/label/{label}/values?match[]={}",
        crate::kit::scrape::urlencode(selector)
    );
    let (_, body) = http_get(ns, port, &url).unwrap();
    let json: Value = serde_json::from_str(&body).unwrap();
    json["data"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

pub fn every_panel_query_returns_data_from_a_real_prometheus() {
    let link = Link::new("dash");
    let _agent = Agent::in_ns(&link.a)
        .iface(&link.a_if)
        .port(9800)
        .args(["--local-net", "198.18.0.1/32", "--drain-interval", "200ms"])
        .spawn();
    wait_for("the agent", Duration::from_secs(30), || {
        http_get(&link.a, 9800, "/healthz").filter(|(s, _)| *s == 200)
    });
    let _prometheus = start_prometheus(&link.a, 9890, 9800);
    // Traffic in both directions for the local host 198.18.0.1.
    let _sink = link.a.run(|| UdpSocket::bind((A4, 5300)).unwrap());
    link.b.run(|| {
        let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
        for _ in 0..50 {
            socket.send_to(&[0; 500], (A4, 5300)).unwrap();
        }
    });
    link.b.exec(&["ping", "-q", "-c", "10", "-i", "0.05", A4]);
    // TCP for the connection health row, with the local host as the client
    // (the device the panels filter on): handshakes with a listener on B
    // (the kernel completes them without an accept) and a connection to a
    // port where nothing listens, refused.
    let _listener = link.b.run(|| TcpListener::bind((B4, 5400)).unwrap());
    link.a.run(|| {
        for _ in 0..5 {
            TcpStream::connect((B4, 5400)).unwrap();
        }
        let refused = TcpStream::connect((B4, 5401)).unwrap_err();
        assert_eq!(
            refused.kind(),
            std::io::ErrorKind::ConnectionRefused,
            "{refused}"
        );
    });
    // Wait until Prometheus has scraped the traffic a few times.
    wait_for(
        "Prometheus to have the traffic, the handshakes and the refused connection",
        Duration::from_secs(30),
        || {
            let n = query(&link.a, 9890, "count_over_time(ntm_bytes_total[1m])").ok()?;
            let handshakes = query(
                &link.a,
                9890,
                r#"ntm_tcp_handshake_seconds_count{side="client"}"#,
            )
            .ok()?;
            let refused = query(
                &link.a,
                9890,
                r#"ntm_tcp_connections_failed_total{reason="refused"}"#,
            )
            .ok()?;
            (n > 0 && handshakes > 0 && refused > 0).then_some(())
        },
    );
    std::thread::sleep(Duration::from_secs(3));

    let d = dashboard();
    for device in [".*", "198.18.0.1"] {
        for p in panels(&d) {
            if p["type"] == "row" {
                continue;
            }
            let title = p["title"].as_str().unwrap();
            for t in p["targets"].as_array().unwrap() {
                let expr = substitute(t["expr"].as_str().unwrap(), device);
                let n =
                    query(&link.a, 9890, &expr).unwrap_or_else(|e| panic!("{title}: {expr}: {e}"));
                // No pods here: the Kubernetes panels are empty, not broken
                // (their data is checked below, on a Kubernetes node). No
                // loss either: no retransmissions.
                assert!(
                    n > 0 || kubernetes_panel(p) || retransmits_panel(p),
                    "{title} (device {device}): no data from {expr}"
                );
            }
        }
    }

    // Template variables (label_values) find the values the traffic made;
    // without pods, the Kubernetes ones find none (and stay at All).
    for v in d["templating"]["list"].as_array().unwrap() {
        if v["type"] != "query" || v["name"] == "vlan" {
            continue;
        }
        let values = variable_values(&link.a, 9890, v, ".*");
        if v["name"] == "namespace" || v["name"] == "workload" {
            assert!(values.is_empty(), "variable {}: {values:?}", v["name"]);
        } else {
            assert!(!values.is_empty(), "variable {}: no values", v["name"]);
        }
    }
    drop(_prometheus);

    kubernetes_panels_show_workloads(&d);
}

/// The Kubernetes row on a real node (containerd's CRI, an agent on the pod
/// bridge): the namespace and workload variables list the node's pods, and
/// with `shop/web` chosen both panels show web's traffic to db under their
/// workload names, sent and received.
fn kubernetes_panels_show_workloads(d: &Value) {
    let mut node = Containerd::new("dash", "ntmdk0", "198.18.214.0/29");
    let web = node.run_pod(&PodSpec::new(
        "shop",
        "web-5d8f9c7b6-x2x9q",
        &[("pod-template-hash", "5d8f9c7b6")],
    ));
    let db = node.run_pod(&PodSpec::new(
        "shop",
        "db-0",
        &[("statefulset.kubernetes.io/pod-name", "db-0")],
    ));
    let ns = node.node();
    let _agent = Agent::in_ns(ns)
        .names(true)
        .cri_socket(node.socket())
        .iface(node.bridge())
        .port(9801)
        .env("NODE_NAME", "node-a")
        .args(["--drain-interval", "200ms", "--no-containers", "--no-pin"])
        .args(["--dns-server", "127.0.0.1:5398", "--dns-timeout", "200ms"])
        .args(["--name-wait", "300ms"])
        .spawn();
    wait_healthy(ns, 9801);
    wait_for(
        "the pods in ntm_k8s_pod_info",
        Duration::from_secs(20),
        || {
            let text = metrics(ns, 9801)?;
            (text.contains(r#"pod="web-5d8f9c7b6-x2x9q""#) && text.contains(r#"pod="db-0""#))
                .then_some(())
        },
    );
    let _prometheus = start_prometheus(ns, 9891, 9801);
    let (from, to) = (web.ipv4(), db.ipv4());
    let receiver = db.run(|| UdpSocket::bind((to, 5310)).unwrap());
    // web to db (db receives), db to web (web answers ICMP).
    let send = || {
        web.run(|| {
            let socket = UdpSocket::bind((from, 0)).unwrap();
            for _ in 0..20 {
                socket.send_to(&[0; 300], (to, 5310)).unwrap();
            }
        });
        db.run(|| {
            let socket = UdpSocket::bind((to, 0)).unwrap();
            for _ in 0..5 {
                socket.send_to(&[0; 100], (from, 5311)).unwrap();
            }
        });
    };
    send();
    wait_for(
        "Prometheus to have the pods' traffic",
        Duration::from_secs(30),
        || {
            send();
            let n = query(
                ns,
                9891,
                r#"count_over_time(ntm_bytes_total{src="shop/web"}[1m])"#,
            )
            .ok()?;
            (n > 0).then_some(())
        },
    );
    std::thread::sleep(Duration::from_secs(3));
    send();
    std::thread::sleep(Duration::from_secs(2));
    drop(receiver);

    let vars = d["templating"]["list"].as_array().unwrap();
    let var = |name: &str| vars.iter().find(|v| v["name"] == name).unwrap();
    assert_eq!(variable_values(ns, 9891, var("namespace"), ".*"), ["shop"]);
    let workloads = variable_values(ns, 9891, var("workload"), "shop");
    assert!(
        workloads.contains(&"web".to_string()) && workloads.contains(&"db".to_string()),
        "{workloads:?}"
    );

    let panels: Vec<&Value> = panels(d)
        .into_iter()
        .filter(|p| kubernetes_panel(p))
        .collect();
    assert_eq!(panels.len(), 2, "Traffic by workload, Remote workload");
    for (workload, expect) in [
        ("web", [("src", "shop/web"), ("dst_workload", "shop/db")]),
        ("db", [("src_workload", "shop/web"), ("dst", "shop/db")]),
    ] {
        let mut seen = Vec::new();
        for p in &panels {
            let title = p["title"].as_str().unwrap();
            for t in p["targets"].as_array().unwrap() {
                let expr = substitute_workload(t["expr"].as_str().unwrap(), ".*", "shop", workload);
                let series = query_series(ns, 9891, &expr)
                    .unwrap_or_else(|e| panic!("{title}: {expr}: {e}"));
                seen.extend(series);
            }
        }
        let own = format!("shop/{workload}");
        assert!(
            seen.iter().any(|s| s["src"] == own.as_str())
                && seen.iter().any(|s| s["dst"] == own.as_str()),
            "{workload}: its own traffic, sent and received: {seen:?}"
        );
        assert!(
            seen.iter().any(|s| expect.iter().all(|(k, v)| s[*k] == *v)),
            "{workload}: the other end by workload {expect:?}: {seen:?}"
        );
    }
}
