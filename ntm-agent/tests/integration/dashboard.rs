//! The Grafana dashboard (grafana/ntm.json): its structure, and every panel's
//! and variable's query evaluated by a real Prometheus that scrapes a real
//! agent while known traffic flows. No errors, and data where traffic was
//! sent.

use std::{collections::HashSet, net::UdpSocket, time::Duration};

use crate::kit::{
    A4, Agent, Link, Netns,
    scrape::{http_get, start_prometheus, wait_for},
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

    let vars = d["templating"]["list"].as_array().unwrap();
    let ds = vars.iter().find(|v| v["name"] == "datasource").unwrap();
    assert_eq!(ds["type"], "datasource");
    for v in vars.iter().filter(|v| v["type"] == "query") {
        assert_eq!(v["includeAll"], true, "{}", v["name"]);
        // "All" as .* also matches series whose label is empty.
        assert_eq!(v["allValue"], ".*", "{}", v["name"]);
        assert_eq!(v["datasource"]["uid"], "${datasource}");
    }
}

/// A panel expression with Grafana's variables replaced as Grafana would for
/// `device` (and "All" for the rest).
fn substitute(expr: &str, device: &str) -> String {
    expr.replace("${prefix}", "ntm")
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
    let url = format!("/api/v1/query?query={}", crate::kit::scrape::urlencode(q));
    let (status, body) = http_get(ns, port, &url).ok_or("no answer")?;
    let json: Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
    if status != 200 || json["status"] != "success" {
        return Err(format!("{status}: {body}"));
    }
    Ok(json["data"]["result"].as_array().map_or(0, Vec::len))
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
    // Wait until Prometheus has scraped the traffic a few times.
    wait_for(
        "Prometheus to have the traffic",
        Duration::from_secs(30),
        || {
            let n = query(&link.a, 9890, "count_over_time(ntm_bytes_total[1m])").ok()?;
            (n > 0).then_some(())
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
                assert!(n > 0, "{title} (device {device}): no data from {expr}");
            }
        }
    }

    // Template variables (label_values) find the values the traffic made.
    for v in d["templating"]["list"].as_array().unwrap() {
        if v["type"] != "query" || v["name"] == "vlan" {
            continue;
        }
        let def = v["definition"]
            .as_str()
            .unwrap()
            .replace("${prefix}", "ntm");
        let inner = def
            .strip_prefix("label_values(")
            .and_then(|r| r.strip_suffix(')'))
            .unwrap();
        let (selector, label) = inner.rsplit_once(", ").unwrap();
        let url = format!(
            "/api/v1/label/{label}/values?match[]={}",
            crate::kit::scrape::urlencode(selector)
        );
        let (_, body) = http_get(&link.a, 9890, &url).unwrap();
        let json: Value = serde_json::from_str(&body).unwrap();
        let values = json["data"].as_array().map_or(0, Vec::len);
        assert!(values > 0, "variable {}: no values for {def}", v["name"]);
    }
}
