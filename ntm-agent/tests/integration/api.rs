//! The JSON API (`/api/v1/...`) of a real agent while known traffic flows:
//! per device, server, service and interface, totals equal what was sent
//! and what `/metrics` says, and bad queries get a JSON error.

use std::{net::UdpSocket, time::Duration};

use serde_json::Value;

use crate::kit::{
    A4, Agent, B4, Link,
    scrape::{TempDir, http_get, sample_sum, wait_for, wait_healthy},
};

const PORT: u16 = 9430;

fn get_json(link: &Link, path: &str) -> (u16, Value) {
    let (status, body) = http_get(&link.a, PORT, path).unwrap_or_else(|| panic!("GET {path}"));
    let doc = serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"));
    (status, doc)
}

/// The row named `name` of the listing `list` in `doc`.
fn row<'a>(doc: &'a Value, list: &str, name: &str) -> Option<&'a Value> {
    doc[list].as_array()?.iter().find(|r| r["name"] == name)
}

fn way(row: &Value, way: &str) -> (u64, u64) {
    (
        row[way]["bytes"].as_u64().unwrap(),
        row[way]["packets"].as_u64().unwrap(),
    )
}

/// A device ("laptop", 198.18.0.2, by a hosts file) talks to a server
/// ("nas", 198.18.0.1, the agent's host): 200 datagrams up, 100 down.
/// The API's device, its server and service, the server overall and the
/// interface equal what was sent, exactly, and equal `/metrics`.
pub fn the_api_shows_devices_servers_services_and_interfaces_exactly() {
    let link = Link::new("api");
    let dir = TempDir::new("api");
    let hosts = dir.0.join("hosts");
    std::fs::write(&hosts, "198.18.0.2 laptop\n198.18.0.1 nas\n").unwrap();
    let _agent = Agent::in_ns(&link.a)
        .names(true)
        .iface(&link.a_if)
        .port(PORT)
        .args(["--local-net", "198.18.0.2/32", "--drain-interval", "200ms"])
        .args(["--name-wait", "200ms", "--no-pin"])
        .arg("--hosts-file")
        .arg(&hosts)
        .spawn();
    wait_healthy(&link.a, PORT);

    let sink_a = link.a.run(|| UdpSocket::bind((A4, 5300)).unwrap());
    let sink_b = link.b.run(|| UdpSocket::bind((B4, 5301)).unwrap());
    let up: (u64, u64) = link.b.run(|| {
        let socket = UdpSocket::bind((B4, 0)).unwrap();
        let bytes = (1..=200usize)
            .map(|size| {
                socket.send_to(&vec![1; size], (A4, 5300)).unwrap();
                (28 + size) as u64
            })
            .sum();
        (bytes, 200)
    });
    let down: (u64, u64) = link.a.run(|| {
        let socket = UdpSocket::bind((A4, 0)).unwrap();
        for _ in 0..100 {
            socket.send_to(&[2; 50], (B4, 5301)).unwrap();
        }
        (100 * 78, 100)
    });
    link.wait_quiet();
    drop((sink_a, sink_b));

    let devices = wait_for(
        "the laptop's traffic in the API",
        Duration::from_secs(20),
        || {
            let (_, doc) = get_json(&link, "/api/v1/devices");
            let laptop = row(&doc, "devices", "laptop")?;
            (way(laptop, "upload") == up && way(laptop, "download") == down).then_some(doc)
        },
    );
    let laptop = row(&devices, "devices", "laptop").unwrap();
    assert_eq!(laptop["addresses"], serde_json::json!(["198.18.0.2"]));
    assert_eq!(laptop["name_source"], "static", "{laptop}");
    assert!(devices["started"].as_u64().unwrap() > 1_700_000_000);
    assert!(
        row(&devices, "devices", "nas").is_none(),
        "nas is not local"
    );

    // The laptop's servers: only the nas, in both directions.
    let (status, mine) = get_json(&link, "/api/v1/servers?device=laptop");
    assert_eq!(status, 200);
    assert_eq!(mine["device"], "laptop");
    let nas = row(&mine, "servers", "nas").expect("the nas");
    assert_eq!((way(nas, "upload"), way(nas, "download")), (up, down));
    let (_, all) = get_json(&link, "/api/v1/servers");
    assert_eq!(row(&all, "servers", "nas"), Some(nas));

    // Services: the two ports' traffic, as /metrics names them.
    let metrics = http_get(&link.a, PORT, "/metrics").unwrap().1;
    let (_, services) = get_json(&link, "/api/v1/services?device=laptop");
    let service_bytes: u64 = services["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| way(r, "upload").0 + way(r, "download").0)
        .sum();
    assert_eq!(service_bytes, up.0 + down.0);
    for service in services["services"].as_array().unwrap() {
        let name = service["name"].as_str().unwrap();
        let from_metrics = sample_sum(
            &metrics,
            "ntm_bytes_total",
            &[&format!(r#"service="{name}""#), r#"src="laptop""#],
        ) + sample_sum(
            &metrics,
            "ntm_bytes_total",
            &[&format!(r#"service="{name}""#), r#"dst="laptop""#],
        );
        assert_eq!(
            way(service, "upload").0 + way(service, "download").0,
            from_metrics,
            "{name}: {metrics}"
        );
    }

    // The interface: everything counted on it, as /metrics has it (ARP and
    // IPv6 neighbour discovery too), split by hook; the laptop's upload
    // arrived at its ingress hook.
    let (_, interfaces) = get_json(&link, "/api/v1/interfaces");
    let iface = row(&interfaces, "interfaces", &link.a_if).expect("the interface");
    assert_eq!(iface["attached"], true);
    let (rx, tx) = (way(iface, "ingress"), way(iface, "egress"));
    let on_iface = sample_sum(
        &metrics,
        "ntm_bytes_total",
        &[&format!(r#"iface="{}""#, link.a_if)],
    );
    assert_eq!(rx.0 + tx.0, on_iface, "{interfaces}\n{metrics}");
    assert!(rx.0 >= up.0 && tx.0 >= down.0, "{interfaces}");

    // Rates: once the traffic's bucket is complete it shows in the rate,
    // which never says more than was sent in the window.
    let (window, rate) = wait_for("an upload rate", Duration::from_secs(5), || {
        let (_, devices) = get_json(&link, "/api/v1/devices");
        let window = devices["rate_window_seconds"].as_f64()?;
        let rate = row(&devices, "devices", "laptop")?["upload"]["rate"].as_f64()?;
        (rate > 0.0).then_some((window, rate))
    });
    assert!(window >= 1.0);
    assert!(
        rate * window <= up.0 as f64 + 1e-6,
        "{rate} B/s over {window} s"
    );

    // Status: healthy, nothing overflowed.
    let (_, status) = get_json(&link, "/api/v1/status");
    assert_eq!(status["healthy"], true, "{status}");
    assert_eq!(status["overflow"]["packets"], 0);
    assert!(status["series"].as_u64().unwrap() >= 2, "{status}");
    assert!(status["drains"].as_u64().unwrap() >= 1);

    // Bad queries: a JSON error that says what was wrong.
    for (path, want) in [
        ("/api/v1/devices?limit=0", 400),
        ("/api/v1/devices?limit=many", 400),
        ("/api/v1/devices?colour=red", 400),
        ("/api/v1/servers?device=nobody", 404),
    ] {
        let (status, doc) = get_json(&link, path);
        assert_eq!(status, want, "{path}: {doc}");
        assert!(
            doc["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{doc}"
        );
    }
    let (status, body) = http_get(&link.a, PORT, "/api/v1/nothing").unwrap();
    assert_eq!(status, 404, "{body}");
}
