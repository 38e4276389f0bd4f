//! Host names through a real DNS exchange: a DNS server the test runs on the
//! namespace's loopback answers the agent's PTR queries (local and remote
//! names, a slow answer, a failing one); the labels Prometheus would scrape
//! are checked, with exact byte counts and no series split.

use std::{
    collections::HashMap,
    net::UdpSocket,
    process::Stdio,
    thread,
    time::{Duration, Instant},
};

use crate::kit::{
    A4, A6, Agent, B6, Link,
    dns::{Answer, DnsServer},
    scrape::{Guard, bytes_where, metrics as scrape},
};

/// 10 datagrams of 100 bytes from `src` (an address of b) to a's sink.
fn send_from(link: &Link, src: &str) -> u64 {
    link.b.run(|| {
        let socket = UdpSocket::bind((src, 0)).unwrap();
        for _ in 0..10 {
            socket.send_to(&[1; 100], (A4, 5300)).unwrap();
        }
    });
    10 * 128
}

pub fn names_from_a_real_dns_exchange_without_splitting_series() {
    let link = Link::new("names");
    for extra in ["198.18.0.3", "198.18.0.4", "198.18.0.5"] {
        link.b.exec(&[
            "ip",
            "addr",
            "add",
            &format!("{extra}/24"),
            "dev",
            &link.b_if,
        ]);
    }
    let _dns = DnsServer::start(
        &link.a,
        5353,
        HashMap::from([
            (
                "1.0.18.198.in-addr.arpa",
                Answer::Name("gateway.home.arpa", Duration::ZERO),
            ),
            (
                "2.0.18.198.in-addr.arpa",
                Answer::Name("laptop.home.arpa", Duration::ZERO),
            ),
            (
                "3.0.18.198.in-addr.arpa",
                Answer::Name("news.bbc.co.uk", Duration::ZERO),
            ),
            // Answers after the flow's wait for names is over.
            (
                "4.0.18.198.in-addr.arpa",
                Answer::Name("slow.example.net", Duration::from_secs(2)),
            ),
            ("5.0.18.198.in-addr.arpa", Answer::ServFail),
        ]),
    );
    let _sink = link.a.run(|| UdpSocket::bind((A4, 5300)).unwrap());
    let _agent = Agent::in_ns(&link.a)
        .names(true)
        .iface(&link.a_if)
        .port(9400)
        .args(["--dns-server", "127.0.0.1:5353", "--dns-timeout", "5s"])
        .args(["--name-wait", "500ms", "--drain-interval", "100ms"])
        .args(["--local-net", "198.18.0.1/32,198.18.0.2/32"])
        .spawn();
    let deadline = Instant::now() + Duration::from_secs(30);
    while scrape(&link.a, 9400).is_none() {
        assert!(Instant::now() < deadline, "agent did not come up");
        thread::sleep(Duration::from_millis(100));
    }

    let mut sent: HashMap<&str, u64> = HashMap::new();
    for src in ["198.18.0.2", "198.18.0.3", "198.18.0.4", "198.18.0.5"] {
        *sent.entry(src).or_default() += send_from(&link, src);
    }
    // While the slow lookup is outstanding, scraping answers at once.
    thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    assert!(scrape(&link.a, 9400).is_some());
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "a scrape waited {:?} for DNS",
        started.elapsed()
    );
    // After the slow name has arrived, the same hosts send again.
    thread::sleep(Duration::from_millis(2700));
    for src in ["198.18.0.2", "198.18.0.3", "198.18.0.4", "198.18.0.5"] {
        *sent.entry(src).or_default() += send_from(&link, src);
    }

    // The destination is the agent's own host: its host name, over the
    // PTR record that names its address.
    let gateway = format!(r#"dst="{}""#, crate::kit::host_name());
    let expect = [
        // Local host: its whole name.
        (r#"src="laptop.home.arpa""#, "198.18.0.2"),
        // Remote host: its registrable domain (public suffix list).
        (r#"src="bbc.co.uk""#, "198.18.0.3"),
        // Its name came after the flow was exported: the address stays.
        (r#"src="198.18.0.4""#, "198.18.0.4"),
        // The server failed: the address.
        (r#"src="198.18.0.5""#, "198.18.0.5"),
    ];
    let deadline = Instant::now() + Duration::from_secs(20);
    let text = loop {
        let text = scrape(&link.a, 9400).unwrap_or_default();
        let done = expect
            .iter()
            .all(|(label, src)| bytes_where(&text, &[label, &gateway]) == sent[src]);
        if done || Instant::now() > deadline {
            break text;
        }
        thread::sleep(Duration::from_millis(200));
    };
    for (label, src) in expect {
        assert_eq!(
            bytes_where(&text, &[label, &gateway, r#"service="5300""#]),
            sent[src],
            "{label}\n{text}"
        );
    }
    assert!(
        !text.contains("example.net"),
        "a late name split a series:\n{text}"
    );
    assert!(
        text.contains(&format!(r#"direction="internal",{gateway}"#)),
        "{text}"
    );
    assert!(
        text.contains(r#"ntm_dns_lookups_total{result="server_error"} 1"#),
        "{text}"
    );
    // Three names came from reverse DNS; the agent's own address was not
    // asked (its host name names it).
    assert!(
        text.contains(r#"ntm_dns_lookups_total{result="ok"} 3"#),
        "{text}"
    );
}

/// 10 datagrams of 100 bytes from `src` (an IPv6 address of b) to a's
/// IPv6 sink; the IP bytes they carry.
fn send_from_v6(link: &Link, src: &str) -> u64 {
    link.b.run(|| {
        let socket = UdpSocket::bind((src, 0)).unwrap();
        for _ in 0..10 {
            socket.send_to(&[1; 100], (A6, 5300)).unwrap();
        }
    });
    10 * 148
}

/// Devices by the names people gave them: a hosts file (`--hosts-file`), an
/// ethers file (`--ethers-file`), and the hostname a real DHCP client
/// (busybox udhcpc) sent to a real DHCP server (dnsmasq), read from
/// dnsmasq's lease file (`--leases`). The ladder: a static name by address
/// wins over reverse DNS; a static name by MAC; the leased address has the
/// device's name, and so has the device's IPv6 address (same MAC in the
/// neighbour table); an address with none of these stays an address; a
/// line added to the hosts file while running names the next new address.
pub fn devices_by_hosts_files_and_dhcp_leases() {
    let link = Link::new("lease");
    let dir = crate::kit::scrape::TempDir::new("lease");
    let leases = dir.0.join("dnsmasq.leases");
    let hosts = dir.0.join("hosts");
    let ethers = dir.0.join("ethers");
    std::fs::write(&hosts, "# the office\n198.18.0.2 printer\n").unwrap();
    std::fs::write(&ethers, "02:00:00:00:00:99 tv\n").unwrap();
    // DHCP only (--port=0: no DNS), on a's end of the test link only.
    let _dnsmasq = crate::kit::dhcp::dnsmasq(
        &link,
        &dir.0,
        &[
            "--port=0",
            "--dhcp-range=198.18.0.100,198.18.0.150,255.255.255.0,10m",
            "--dhcp-authoritative",
            "--no-ping",
            &format!("--dhcp-leasefile={}", leases.display()),
        ],
    );
    // The client adds the address it is given to b's end of the link.
    let leased = crate::kit::dhcp::udhcpc(&link, &dir.0, "phone-of-ana");
    let wait_for_lease = Instant::now() + Duration::from_secs(20);
    let leased_ip = loop {
        let text = std::fs::read_to_string(&leases).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.contains(" phone-of-ana ")) {
            break line.split_whitespace().nth(2).unwrap().to_string();
        }
        assert!(
            Instant::now() < wait_for_lease,
            "no lease: {leased}\n{text}"
        );
        thread::sleep(Duration::from_millis(100));
    };
    // More addresses on b; a's neighbour table says which MAC each is at
    // (b's own, 02:00:00:00:00:02, for 198.18.0.2 and 2001:2::2 already).
    for (address, mac) in [
        ("198.18.0.4", "02:00:00:00:00:99"),
        ("198.18.0.5", "02:00:00:00:00:98"),
        ("198.18.0.6", "02:00:00:00:00:97"),
    ] {
        link.b.exec(&[
            "ip",
            "addr",
            "add",
            &format!("{address}/24"),
            "dev",
            &link.b_if,
        ]);
        link.a.permanent_neighbour(&link.a_if, address, mac);
    }
    // Reverse DNS has a name for the printer (the hosts file must win) and
    // none for the rest.
    let _dns = DnsServer::start(
        &link.a,
        5354,
        HashMap::from([(
            "2.0.18.198.in-addr.arpa",
            Answer::Name("wrong.example.net", Duration::ZERO),
        )]),
    );
    let _sinks = link.a.run(|| {
        (
            UdpSocket::bind((A4, 5300)).unwrap(),
            UdpSocket::bind((A6, 5300)).unwrap(),
        )
    });
    let _agent = Agent::in_ns(&link.a)
        .names(true)
        .iface(&link.a_if)
        .port(9410)
        .args(["--dns-server", "127.0.0.1:5354", "--name-wait", "500ms"])
        .args(["--drain-interval", "100ms"])
        .args(["--local-net", "198.18.0.0/24,2001:2::/64"])
        .arg("--hosts-file")
        .arg(&hosts)
        .arg("--ethers-file")
        .arg(&ethers)
        .arg("--leases")
        .arg(&leases)
        .spawn();
    crate::kit::scrape::wait_healthy(&link.a, 9410);
    let expect = vec![
        (r#"src="printer""#, send_from(&link, "198.18.0.2")),
        (r#"src="tv""#, send_from(&link, "198.18.0.4")),
        (r#"src="198.18.0.5""#, send_from(&link, "198.18.0.5")),
        (
            r#"src="phone-of-ana""#,
            send_from(&link, &leased_ip) + send_from_v6(&link, B6),
        ),
    ];
    let text = wait_for_bytes(&link, 9410, &expect);
    assert!(!text.contains("wrong.example.net"), "{text}");
    assert!(text.contains(r#"ntm_names{source="static"} 2"#), "{text}");
    assert!(text.contains(r#"ntm_names{source="dhcp"} 2"#), "{text}");

    // A name added while running names the next new address.
    std::fs::write(&hosts, "198.18.0.2 printer\n198.18.0.6 scanner\n").unwrap();
    thread::sleep(Duration::from_millis(500));
    let expect = vec![(r#"src="scanner""#, send_from(&link, "198.18.0.6"))];
    wait_for_bytes(&link, 9410, &expect);
}

/// Waits until the UDP bytes to port 5300 of each label equal what was
/// sent; returns the scrape.
fn wait_for_bytes(link: &Link, port: u16, expect: &[(&str, u64)]) -> String {
    let expect: Vec<(Vec<&str>, u64)> = expect
        .iter()
        .map(|(label, bytes)| (vec![*label], *bytes))
        .collect();
    crate::kit::scrape::wait_for_sink_bytes(link, port, &expect)
}

/// Runs `podman` with `args`; its stdout, or its stderr if it failed.
fn podman(args: &[&str]) -> Result<String, String> {
    let out = std::process::Command::new("podman")
        .args(args)
        .output()
        .expect("podman (cargo xtask test installs it)");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Removes a podman container or network when dropped.
struct PodmanObject(&'static str, String);

impl Drop for PodmanObject {
    fn drop(&mut self) {
        let _ = podman(&[self.0, "rm", "-f", &self.1]);
    }
}

/// A Podman container's name for its address, from Podman's API socket
/// (the Docker-compatible API, as Docker serves it too). The container
/// runs ntm's own image (the only image the tests have) on an internal
/// Podman network in the test range; the traffic itself flows between the
/// test's namespaces, from the container's address.
pub fn containers_by_the_names_their_engine_gives() {
    let Some(image) = crate::kit::test_image() else {
        return;
    };
    let dir = crate::kit::scrape::TempDir::new("containers");
    let socket = dir.0.join("podman.sock");
    let _service = Guard(
        std::process::Command::new("podman")
            .args(["system", "service", "--time=0"])
            .arg(format!("unix://{}", socket.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("podman"),
    );
    let pid = std::process::id();
    let network = format!("ntmt-net-{pid}");
    podman(&[
        "network",
        "create",
        "--internal",
        "--disable-dns",
        "--subnet",
        "198.19.77.0/24",
        &network,
    ])
    .expect("podman network create");
    let _network = PodmanObject("network", network.clone());
    let name = format!("ntm-web-{pid}");
    let container_ip = "198.19.77.10";
    podman(&[
        "run",
        "-d",
        "--name",
        &name,
        "--network",
        &network,
        "--ip",
        container_ip,
        "--security-opt",
        "seccomp=unconfined",
        "--cap-drop",
        "all",
        "--cap-add",
        "BPF,NET_ADMIN,PERFMON",
        &image,
        "--numeric",
        "-i",
        "lo",
        "-b",
        "127.0.0.1",
        "-p",
        "9000",
    ])
    .expect("podman run");
    let _container = PodmanObject("container", name.clone());
    let running = podman(&["inspect", "--format", "{{.State.Running}}", &name]).unwrap_or_default();
    assert_eq!(running.trim(), "true", "the container runs");

    let link = Link::new("ctr");
    link.b.exec(&[
        "ip",
        "addr",
        "add",
        &format!("{container_ip}/32"),
        "dev",
        &link.b_if,
    ]);
    let _dns = DnsServer::start(&link.a, 5356, HashMap::new());
    let _sink = link
        .a
        .run(|| UdpSocket::bind((crate::kit::A4, 5300)).unwrap());
    let _agent = Agent::in_ns(&link.a)
        .names(true)
        .iface(&link.a_if)
        .port(9412)
        .args(["--dns-server", "127.0.0.1:5356", "--name-wait", "300ms"])
        .args(["--drain-interval", "100ms"])
        .arg("--container-socket")
        .arg(&socket)
        .spawn();
    crate::kit::scrape::wait_healthy(&link.a, 9412);
    // The engine is asked at start and every 5 s.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = scrape(&link.a, 9412).unwrap_or_default();
        if text.contains(r#"ntm_observed_names{table="containers"} 1"#) {
            break;
        }
        assert!(Instant::now() < deadline, "no container seen:\n{text}");
        thread::sleep(Duration::from_millis(200));
    }
    let label = format!(r#"src="{name}""#);
    let expect = vec![(label.as_str(), send_from(&link, container_ip))];
    let text = wait_for_bytes(&link, 9412, &expect);
    assert!(
        text.contains(r#"ntm_names{source="container"} 1"#),
        "{text}"
    );
}
