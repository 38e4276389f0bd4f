//! What Prometheus sees: the agent binary in a network namespace, a real
//! Prometheus (Debian's package) scraping it on that namespace's loopback,
//! known traffic, and PromQL answers compared exactly with what was sent.

use std::{
    io::Write,
    net::{TcpListener, TcpStream, UdpSocket},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use crate::kit::{
    A4, Agent, B4, Link, Netns,
    scrape::{http_get, plain_value, promql, sample_sum, wait_for, wait_healthy},
};

pub fn prometheus_sees_exactly_what_was_sent() {
    let link = Link::new("prom");
    let before = link.a_stats();
    // Environment variables as the old tool's users set them; 198.18.0.1 is
    // the local host, so traffic from 198.18.0.2 is inbound.
    let _agent = Agent::in_ns(&link.a)
        .iface(&link.a_if)
        .args(["--local-net", "198.18.0.1/32", "--drain-interval", "200ms"])
        .env("NTM_PORT", "9100")
        .env("NTM_BIND", "127.0.0.1")
        .env("NTM_METRIC_PREFIX", "home")
        .spawn();
    wait_healthy(&link.a, 9100);

    let _prometheus = crate::kit::scrape::start_prometheus(&link.a, 9190, 9100);

    // Known traffic: 300 UDP datagrams of 1..=300 bytes to port 5300, and 20
    // pings of 100 bytes.
    let sink = link.a.run(|| UdpSocket::bind((A4, 5300)).unwrap());
    let udp_bytes: u64 = link.b.run(|| {
        let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
        (1..=300usize)
            .map(|size| {
                socket.send_to(&vec![7; size], (A4, 5300)).unwrap();
                (28 + size) as u64
            })
            .sum()
    });
    link.b
        .exec(&["ping", "-q", "-c", "20", "-i", "0.01", "-s", "100", A4]);
    link.wait_quiet();
    drop(sink);
    let after = link.a_stats();
    let frames = (after.0.0 - before.0.0) + (after.1.0 - before.1.0);
    let l3_bytes = (after.0.1 - before.0.1) + (after.1.1 - before.1.1) - 14 * frames;

    let query = |q: &str, want: f64| {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last = None;
        while Instant::now() < deadline {
            last = promql(&link.a, 9190, q);
            if last == Some(want) {
                return;
            }
            thread::sleep(Duration::from_millis(200));
        }
        let exposition = http_get(&link.a, 9100, "/metrics")
            .map(|(_, b)| b)
            .unwrap_or_default();
        let ours: Vec<&str> = exposition
            .lines()
            .filter(|l| l.starts_with("home_"))
            .collect();
        panic!(
            "{q}: Prometheus says {last:?}, expected {want}; /metrics:\n{}",
            ours.join("\n")
        );
    };
    let udp = format!(
        r#"home_bytes_total{{src="{B4}",dst="{A4}",service="5300",proto="udp",direction="inbound",iface="{}"}}"#,
        link.a_if
    );
    query(&udp, udp_bytes as f64);
    query(
        r#"sum(home_packets_total{proto="udp",service="5300"})"#,
        300.0,
    );
    query(
        r#"home_packets_total{service="echo-request",proto="icmp",direction="inbound"}"#,
        20.0,
    );
    query(
        r#"home_packets_total{service="echo-reply",proto="icmp",direction="outbound"}"#,
        20.0,
    );
    // Everything that crossed the interface, in total, through PromQL.
    query("sum(home_bytes_total)", l3_bytes as f64);
    query("sum(home_packets_total)", frames as f64);
    query(r#"home_interface_attached{iface="ntm0"}"#, 1.0);

    // The exposition passes promtool's checks.
    let (_, exposition) = http_get(&link.a, 9100, "/metrics").unwrap();
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(exposition.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && report.trim().is_empty(),
        "promtool: {report}"
    );
}

fn agent_fails(args: &[&str], ns: &Netns) -> String {
    let out = Agent::in_ns(ns).args(args).output();
    assert!(!out.status.success(), "{args:?} should fail");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!err.contains("panicked"), "{err}");
    err
}

pub fn endpoint_errors_and_flag_precedence() {
    let link = Link::new("flags");
    let iface = link.a_if.as_str();

    // A taken port: clear error, and nothing left attached.
    let taken = link
        .a
        .run(|| TcpListener::bind(("127.0.0.1", 9300)).unwrap());
    let err = agent_fails(&["-i", iface, "-b", "127.0.0.1", "-p", "9300"], &link.a);
    assert!(
        err.contains("already in use") && err.contains("--port"),
        "{err}"
    );
    drop(taken);
    let attached = link
        .a
        .run(|| ntm_agent::kernel::attach::attached_ntm_programs(iface).unwrap());
    assert_eq!(attached, (vec![], vec![]));

    // An address this machine does not have (nothing is sent to it).
    let err = agent_fails(&["-i", iface, "-b", "203.0.113.9"], &link.a);
    assert!(
        err.contains("not on this machine") && err.contains("--bind_ip"),
        "{err}"
    );

    // A prefix Prometheus would reject.
    let err = agent_fails(&["-i", iface, "-s", "9bad"], &link.a);
    assert!(err.contains("metric name"), "{err}");

    // A filter libpcap refuses, from the environment as the old tool took it.
    let out = Agent::in_ns(&link.a)
        .iface(iface)
        .env("NTM_FILTERS", "src net 198.18.0.0/33")
        .output();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad filter expression \"src net 198.18.0.0/33\""),
        "{err}"
    );

    // The flag wins over the environment variable.
    let _agent = Agent::in_ns(&link.a)
        .iface(iface)
        .port_any_address(9302)
        .env("NTM_PORT", "9301")
        .env("NTM_BIND", "127.0.0.1")
        .spawn();
    wait_for(
        "the agent on the flag's port",
        Duration::from_secs(30),
        || http_get(&link.a, 9302, "/healthz").filter(|(s, _)| *s == 200),
    );
    assert!(http_get(&link.a, 9301, "/healthz").is_none());
}

pub fn exposition_labels_for_every_kind_of_traffic() {
    let link = Link::new("expo");
    // An address on b that a has no static neighbour entry for: reaching it
    // takes ARP.
    link.b
        .exec(&["ip", "addr", "add", "198.18.0.9/24", "dev", &link.b_if]);
    let _agent = Agent::in_ns(&link.a)
        .iface(&link.a_if)
        .port(9500)
        .args(["--drain-interval", "100ms"])
        .spawn();
    wait_healthy(&link.a, 9500);
    let sinks = link
        .a
        .run(|| [443u16, 5300].map(|port| UdpSocket::bind((A4, port)).unwrap()));
    link.b.run(|| {
        let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
        for port in [443u16, 5300] {
            for _ in 0..5 {
                socket.send_to(&[0; 200], (A4, port)).unwrap();
            }
        }
        // ssh is closed on a: the SYN is answered with a reset.
        let ssh = format!("{A4}:22").parse().unwrap();
        let _ = TcpStream::connect_timeout(&ssh, Duration::from_secs(2));
    });
    // 3000 bytes of ICMP over a 1500-byte link: one first fragment with the
    // ICMP header, then later fragments without one.
    link.b.exec(&["ping", "-q", "-c", "2", "-s", "3000", A4]);
    link.b
        .exec(&["ping", "-q", "-c", "3", "-i", "0.01", crate::kit::A6]);
    link.a.exec(&["ping", "-q", "-c", "1", "198.18.0.9"]);
    link.wait_quiet();
    drop(sinks);
    thread::sleep(Duration::from_millis(500));
    let (_, text) = http_get(&link.a, 9500, "/metrics").unwrap();
    let packets = |parts: &[&str]| sample_sum(&text, "ntm_packets_total", parts);

    assert_eq!(
        packets(&[r#"service="https""#, r#"proto="udp""#]),
        5,
        "QUIC is https\n{text}"
    );
    assert_eq!(
        packets(&[r#"service="5300""#, r#"proto="udp""#]),
        5,
        "unnamed port\n{text}"
    );
    assert_eq!(
        packets(&[r#"service="ssh""#, r#"proto="tcp""#]),
        2,
        "SYN and RST\n{text}"
    );
    // Fragmented pings: 2 requests + 2 replies, 3 fragments each; only the
    // first fragment of each has the ICMP type, and the later two take it
    // from the first: each datagram is in one series.
    assert_eq!(
        packets(&[
            r#"service="echo-request""#,
            r#"proto="icmp""#,
            r#"dst="198.18.0.1""#
        ]),
        6,
        "{text}"
    );
    assert_eq!(
        packets(&[
            r#"service="echo-reply""#,
            r#"proto="icmp""#,
            r#"src="198.18.0.1""#
        ]),
        6,
        "{text}"
    );
    assert_eq!(packets(&[r#"service="""#, r#"proto="icmp""#]), 0, "{text}");
    assert_eq!(
        packets(&[
            r#"service="echo-request""#,
            r#"proto="icmp6""#,
            r#"src="2001:2::2""#
        ]),
        3
    );
    assert_eq!(
        packets(&[
            r#"service="echo-reply""#,
            r#"proto="icmp6""#,
            r#"dst="2001:2::2""#
        ]),
        3
    );
    // ARP: one request out, one reply in, no hosts, no service.
    assert_eq!(
        packets(&[r#"proto="arp""#, r#"src="""#, r#"dst="""#, r#"service="""#]),
        2,
        "{text}"
    );
}

pub fn series_budget_with_real_traffic_still_adds_up() {
    let link = Link::new("budget");
    let before = link.a_stats();
    let _agent = Agent::in_ns(&link.a)
        .iface(&link.a_if)
        .port(9600)
        .args(["--max-series", "5"])
        .spawn();
    wait_healthy(&link.a, 9600);
    let sinks = link.a.run(|| {
        (6000..6030u16)
            .map(|port| UdpSocket::bind((A4, port)).unwrap())
            .collect::<Vec<_>>()
    });
    link.b.run(|| {
        let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
        for port in 6000..6030u16 {
            for _ in 0..4 {
                socket.send_to(&[0; 100], (A4, port)).unwrap();
            }
        }
    });
    link.wait_quiet();
    drop(sinks);
    let after = link.a_stats();
    let frames = (after.0.0 - before.0.0) + (after.1.0 - before.1.0);
    let bytes = (after.0.1 - before.0.1) + (after.1.1 - before.1.1) - 14 * frames;
    let text = wait_for(
        "all traffic in the counters",
        Duration::from_secs(20),
        || {
            let (_, text) = http_get(&link.a, 9600, "/metrics")?;
            (sample_sum(&text, "ntm_bytes_total", &[]) == bytes).then_some(text)
        },
    );
    assert_eq!(sample_sum(&text, "ntm_packets_total", &[]), frames);
    let series = text
        .lines()
        .filter(|l| l.starts_with("ntm_bytes_total{"))
        .count();
    assert!(
        series <= 6,
        "5 series plus the folded one: {series}\n{text}"
    );
    assert!(
        sample_sum(&text, "ntm_bytes_total", &[r#"src="other""#]) > 0,
        "{text}"
    );
    assert!(plain_value(&text, "ntm_series_folded_total") > 0, "{text}");
}

pub fn idle_series_expire_from_the_endpoint() {
    let link = Link::new("ttl");
    let _agent = Agent::in_ns(&link.a)
        .iface(&link.a_if)
        .port(9700)
        .env("NTM_SERIES_TTL", "1s")
        .env("NTM_DRAIN_INTERVAL", "100ms")
        .spawn();
    wait_healthy(&link.a, 9700);
    let _sink = link.a.run(|| UdpSocket::bind((A4, 5310)).unwrap());
    let send = || {
        link.b.run(|| {
            let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
            socket.send_to(&[0; 10], (A4, 5310)).unwrap();
        })
    };
    send();
    let with = r#"service="5310""#;
    wait_for("the series to appear", Duration::from_secs(10), || {
        let (_, text) = http_get(&link.a, 9700, "/metrics")?;
        text.contains(with).then_some(())
    });
    // Idle for longer than the TTL: gone, and counted as expired.
    let text = wait_for("the series to expire", Duration::from_secs(15), || {
        let (_, text) = http_get(&link.a, 9700, "/metrics")?;
        (!text.contains(with)).then_some(text)
    });
    assert!(
        plain_value(&text, "ntm_series_expired_total") >= 1,
        "{text}"
    );
    // Traffic again: the series is back, counting from what arrived since.
    send();
    let text = wait_for("the series to come back", Duration::from_secs(10), || {
        let (_, text) = http_get(&link.a, 9700, "/metrics")?;
        text.contains(with).then_some(text)
    });
    assert_eq!(sample_sum(&text, "ntm_packets_total", &[with]), 1);
}
