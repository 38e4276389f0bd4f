//! Names from the wire: a real DNS server (dnsmasq) answers a real client
//! (`dig`, over UDP and TCP, and the system resolver through `getent`) in
//! another namespace, and a real DHCP client (busybox udhcpc) sends its
//! host name to dnsmasq's DHCP server; the agent, watching the link, names
//! the traffic that follows by what the messages said. Reverse DNS goes to
//! a server that knows no name, so every name here came off the wire.

use std::{
    collections::HashMap,
    net::UdpSocket,
    path::Path,
    thread,
    time::{Duration, Instant},
};

use crate::kit::scrape::{bytes_where, wait_for_sink_bytes};
use crate::kit::{
    Agent, B4, B6, Link, Netns,
    dns::DnsServer,
    scrape::{Guard, TempDir, wait_healthy},
};

/// A second client address on b, and the servers' addresses on a.
const B4_OTHER: &str = "198.18.0.3";
const VIDEO: &str = "198.18.0.50";
const SHOP6: &str = "2001:2::51";
const CDN: &str = "198.18.0.52";
const BRIEF: &str = "198.18.0.53";
const TCP_ONLY: &str = "198.18.0.54";
const SYSTEM: &str = "198.18.0.55";
const SINK_PORT: u16 = 5300;

fn agent(link: &Link, port: u16, extra: &[&str]) -> Guard {
    let agent = Agent::in_ns(&link.a)
        .names(true)
        .iface(&link.a_if)
        .port(port)
        .args(["--dns-server", "127.0.0.1:5355", "--name-wait", "300ms"])
        .args(["--drain-interval", "100ms"])
        .args(extra)
        .spawn();
    wait_healthy(&link.a, port);
    agent
}

/// `dig` in b, from `from`, for `name`; returns its short answer.
fn dig(link: &Link, from: &str, args: &[&str]) -> String {
    let mut full = vec![
        "dig",
        "@198.18.0.1",
        "-b",
        from,
        "+short",
        "+time=2",
        "+tries=3",
    ];
    full.extend_from_slice(args);
    link.b.exec(&full)
}

/// 10 datagrams of 100 bytes from `src` (on b) to `dst`:5300 (on a); the
/// IP bytes sent.
fn send(link: &Link, src: &str, dst: &str) -> u64 {
    link.b.run(|| {
        let socket = UdpSocket::bind((src, 0)).unwrap();
        for _ in 0..10 {
            socket.send_to(&[7; 100], (dst, SINK_PORT)).unwrap();
        }
    });
    let header = if dst.contains(':') { 48 } else { 28 };
    10 * (100 + header)
}

fn sinks(link: &Link, addresses: &[&str]) -> Vec<UdpSocket> {
    link.a.run(|| {
        addresses
            .iter()
            .map(|a| UdpSocket::bind((*a, SINK_PORT)).unwrap())
            .collect()
    })
}

fn add_address(ns: &Netns, iface: &str, address: &str) {
    let prefix = if address.contains(':') { "64" } else { "24" };
    ns.exec(&[
        "ip",
        "addr",
        "add",
        &format!("{address}/{prefix}"),
        "dev",
        iface,
        "nodad",
    ]);
}

/// A, AAAA and a CNAME chain answered over UDP, one over TCP, one through
/// the system resolver; two clients that asked two names for one address
/// get their own; an answer past its TTL names nothing; remote names show
/// their registrable domain.
pub fn servers_by_the_name_their_client_asked() {
    let link = Link::new("dnsobs");
    let dir = TempDir::new("dnsobs");
    add_address(&link.b, &link.b_if, B4_OTHER);
    for address in [VIDEO, CDN, BRIEF, TCP_ONLY, SYSTEM, SHOP6] {
        add_address(&link.a, &link.a_if, address);
    }
    let _dnsmasq = crate::kit::dhcp::dnsmasq(
        &link,
        dir.0.as_path(),
        &[
            "--port=53",
            "--local-ttl=60",
            // --address makes no PTR record: reverse DNS could not find
            // these names, only the answer on the wire can.
            &format!("--address=/www.video.test/{VIDEO}"),
            "--host-record=edge.cdn.test,198.18.0.51,2001:2::51",
            "--cname=www.shop.test,edge.cdn.test",
            &format!("--address=/cdn-a.test/{CDN}"),
            &format!("--address=/cdn-b.test/{CDN}"),
            &format!("--host-record=brief.test,{BRIEF},1"),
            &format!("--address=/tcp-only.test/{TCP_ONLY}"),
            &format!("--address=/sys.test/{SYSTEM}"),
        ],
    );
    // Reverse DNS: a server that knows no name.
    let _ptr = DnsServer::start(&link.a, 5355, HashMap::new());
    let _sinks = sinks(&link, &[VIDEO, CDN, BRIEF, TCP_ONLY, SYSTEM, SHOP6]);
    // The clients are the local hosts; the servers, on the agent's own
    // host here, stand for remote ones.
    let _agent = agent(
        &link,
        9420,
        &[
            "--dns-answer-min-ttl",
            "1s",
            "--local-net",
            "198.18.0.2/32,198.18.0.3/32,2001:2::2/128",
        ],
    );

    // Wait for dnsmasq to answer at all.
    let deadline = Instant::now() + Duration::from_secs(10);
    while dig(&link, B4, &["www.video.test"]).trim() != VIDEO {
        assert!(Instant::now() < deadline, "dnsmasq does not answer");
        thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        dig(&link, B4, &["www.shop.test", "AAAA"]).lines().last(),
        Some(SHOP6)
    );
    assert_eq!(dig(&link, B4, &["cdn-a.test"]).trim(), CDN);
    assert_eq!(dig(&link, B4_OTHER, &["cdn-b.test"]).trim(), CDN);
    assert_eq!(dig(&link, B4, &["+tcp", "tcp-only.test"]).trim(), TCP_ONLY);
    assert_eq!(dig(&link, B4, &["brief.test"]).trim(), BRIEF);
    // The system resolver (glibc, through /etc/resolv.conf, which `ip
    // netns exec` takes from /etc/netns/<name>/).
    let etc = Path::new("/etc/netns").join(&link.b.name);
    std::fs::create_dir_all(&etc).unwrap();
    let _etc = RemoveOnDrop(etc.clone());
    std::fs::write(
        etc.join("resolv.conf"),
        "nameserver 198.18.0.1\noptions timeout:2 attempts:3\n",
    )
    .unwrap();
    let resolved = link.b.exec(&["getent", "ahostsv4", "sys.test"]);
    assert!(resolved.contains(SYSTEM), "getent: {resolved}");

    // brief.test's answer (TTL 1 s) is over before its traffic starts.
    thread::sleep(Duration::from_millis(2500));
    let brief = format!(r#"dst="{BRIEF}""#);
    let expect = vec![
        (vec![r#"dst="video.test""#], send(&link, B4, VIDEO)),
        (vec![r#"dst="shop.test""#], send(&link, B6, SHOP6)),
        (
            vec![r#"src="198.18.0.2""#, r#"dst="cdn-a.test""#],
            send(&link, B4, CDN),
        ),
        (
            vec![r#"src="198.18.0.3""#, r#"dst="cdn-b.test""#],
            send(&link, B4_OTHER, CDN),
        ),
        (vec![r#"dst="tcp-only.test""#], send(&link, B4, TCP_ONLY)),
        (vec![r#"dst="sys.test""#], send(&link, B4, SYSTEM)),
        (vec![brief.as_str()], send(&link, B4, BRIEF)),
    ];
    wait_for_sink_bytes(&link, 9420, &expect);
    // The info metric is rebuilt at the end of the drain that brought the
    // series: a scrape in between sees the series first. Wait for it.
    let brief_info =
        format!(r#"ntm_host_info{{address="{BRIEF}",mac="",name="{BRIEF}",source="address"}} 1"#);
    let text = crate::kit::scrape::wait_for("the host info", Duration::from_secs(5), || {
        let text = crate::kit::scrape::http_get(&link.a, 9420, "/metrics")?.1;
        text.contains(&brief_info).then_some(text)
    });
    // Every flow to a server is in exactly the series above.
    let total: u64 = expect.iter().map(|(_, b)| b).sum();
    assert_eq!(bytes_where(&text, &[r#"service="5300""#]), total, "{text}");
    assert!(!text.contains("brief.test"), "{text}");
    let parsed = crate::kit::scrape::sample_sum(
        &text,
        "ntm_observed_messages_total",
        &[r#"protocol="dns""#, r#"result="parsed""#],
    );
    assert!(parsed >= 7, "answers parsed: {parsed}\n{text}");
    assert!(
        text.contains(r#"ntm_names{source="dns_answer"} 6"#),
        "{text}"
    );
    // The info metric lists each host in the series once, with its source.
    for (address, name) in [
        (VIDEO, "video.test"),
        (CDN, "cdn-a.test"),
        (CDN, "cdn-b.test"),
        (SHOP6, "shop.test"),
    ] {
        let line = format!(
            r#"ntm_host_info{{address="{address}",mac="",name="{name}",source="dns_answer"}} 1"#
        );
        assert!(text.contains(&line), "no {line}:\n{text}");
    }
    assert!(text.contains(&brief_info), "no {brief_info}:\n{text}");
}

/// The host name a real DHCP client sent, read off the wire (no lease
/// file): its leased address and, through the source MAC of its frames,
/// its two IPv6 addresses show as one device.
pub fn devices_by_the_host_name_their_dhcp_client_sent() {
    let link = Link::new("dhcpobs");
    let dir = TempDir::new("dhcpobs");
    let _dnsmasq = crate::kit::dhcp::dnsmasq(
        &link,
        dir.0.as_path(),
        &[
            "--port=0",
            "--dhcp-range=198.18.0.100,198.18.0.150,255.255.255.0,10m",
            "--dhcp-authoritative",
            "--no-ping",
            &format!("--dhcp-leasefile={}", dir.0.join("leases").display()),
        ],
    );
    let _ptr = DnsServer::start(&link.a, 5355, HashMap::new());
    // Local networks: a frame's MAC names only local addresses.
    let _agent = agent(&link, 9421, &["--local-net", "198.18.0.0/24,2001:2::/64"]);
    crate::kit::dhcp::udhcpc(&link, &dir.0, "laptop-of-bo");
    let shown = link
        .b
        .exec(&["ip", "-4", "-o", "addr", "show", "dev", &link.b_if]);
    let leased = shown
        .split_whitespace()
        .filter_map(|w| w.split('/').next())
        .find(|a| a.starts_with("198.18.0.1") && a.len() == "198.18.0.100".len())
        .unwrap_or_else(|| panic!("no lease: {shown}"))
        .to_string();
    // A privacy-style second IPv6 address. b knows a's MAC already, so it
    // sends no neighbour solicitation that would put its addresses in a's
    // neighbour table: only the frames' source MAC (the kernel's table)
    // ties them to the device.
    let privacy = "2001:2::9a3f";
    add_address(&link.b, &link.b_if, privacy);
    let mac = link
        .b
        .exec(&["cat", &format!("/sys/class/net/{}/address", link.b_if)]);
    let a_mac = link
        .a
        .exec(&["cat", &format!("/sys/class/net/{}/address", link.a_if)]);
    for address in [crate::kit::A4, crate::kit::A6] {
        link.b
            .permanent_neighbour(&link.b_if, address, a_mac.trim());
    }
    let _sinks = sinks(&link, &[crate::kit::A4, crate::kit::A6]);
    let expect = vec![(
        vec![r#"src="laptop-of-bo""#],
        send(&link, &leased, crate::kit::A4)
            + send(&link, B6, crate::kit::A6)
            + send(&link, privacy, crate::kit::A6),
    )];
    let text = wait_for_sink_bytes(&link, 9421, &expect);
    // Three addresses, and b's link-local one if its MLD reports were seen.
    let named = text
        .lines()
        .find_map(|l| l.strip_prefix(r#"ntm_names{source="dhcp"} "#))
        .and_then(|v| v.parse::<u32>().ok());
    assert!(matches!(named, Some(3 | 4)), "{text}");
    for address in [leased.as_str(), B6, privacy] {
        let line = format!(
            r#"ntm_host_info{{address="{address}",mac="{}",name="laptop-of-bo",source="dhcp"}} 1"#,
            mac.trim()
        );
        assert!(text.contains(&line), "no {line}:\n{text}");
    }
    let parsed = crate::kit::scrape::sample_sum(
        &text,
        "ntm_observed_messages_total",
        &[r#"protocol="dhcp""#, r#"result="parsed""#],
    );
    assert!(parsed >= 2, "DHCP messages parsed: {parsed}\n{text}");
}

struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Servers named by the names their clients sent in the clear in their
/// handshakes, no DNS anywhere: `openssl s_client` and `curl --resolve`
/// send ClientHellos (their data in the socket's pages, as a local
/// socket's segments have it) to a listener on a port that is no TLS port;
/// aioquic's QUIC v1 Initials go to another server, its v2 ones over IPv6
/// to a third. One more hello goes through a route with a 120-byte MTU
/// from a sender without segmentation offload to a receiver without GRO:
/// the agent sees it in 80-byte segments, its server name not in the
/// first, which the kernel follows. The traffic that follows each is in
/// the series of the name, exactly; with `--no-observe-tls` no handshake
/// names anything.
pub fn servers_by_the_name_their_client_sent_in_its_handshake() {
    use std::net::TcpListener;
    const TLS: &str = "198.18.0.60";
    const QUIC: &str = "198.18.0.61";
    // Reached through a route with a 120-byte MTU: b's hello leaves in
    // segments of 80 bytes, and its server name is not in the first.
    const SPLIT: &str = "198.18.0.62";
    const QUIC6: &str = "2001:2::61";
    const TLS_PORT: u16 = 8444;
    for tls_on in [true, false] {
        let link = Link::new("hsobs");
        for address in [TLS, QUIC, QUIC6, SPLIT] {
            add_address(&link.a, &link.a_if, address);
        }
        let split_route = format!("{SPLIT}/32");
        link.b.exec(&[
            "ip",
            "route",
            "add",
            &split_route,
            "dev",
            &link.b_if,
            "mtu",
            "lock",
            "120",
        ]);
        // Segments as a sender without segmentation offload sends them,
        // and a receiver without GRO sees them: one by one.
        link.b.exec(&[
            "ethtool", "-K", &link.b_if, "sg", "off", "tso", "off", "gso", "off",
        ]);
        link.a.exec(&["ethtool", "-K", &link.a_if, "gro", "off"]);
        // Reverse DNS: a server that knows no name.
        let _ptr = DnsServer::start(&link.a, 5355, HashMap::new());
        let _sinks = sinks(&link, &[TLS, QUIC, QUIC6, SPLIT]);
        let port = 9422;
        let off: &[&str] = if tls_on { &[] } else { &["--no-observe-tls"] };
        let _agent = agent(
            &link,
            port,
            &[&["--local-net", "198.18.0.2/32,2001:2::2/128"], off].concat(),
        );
        // The TLS server: it takes the hellos and answers nothing.
        let listener = link
            .a
            .run(|| TcpListener::bind(("0.0.0.0", TLS_PORT)).unwrap());
        let server = thread::spawn(move || {
            for _ in 0..3 {
                let (mut stream, _) = listener.accept().unwrap();
                stream
                    .set_read_timeout(Some(Duration::from_secs(2)))
                    .unwrap();
                let mut buf = [0u8; 4096];
                let _ = std::io::Read::read(&mut stream, &mut buf);
            }
        });
        // `openssl s_client` from b to `server`, asking for `name`.
        let openssl = |server: &str, name: &str| {
            link.b.exec(&[
                "sh",
                "-c",
                &format!(
                    "timeout 5 openssl s_client -connect {server}:{TLS_PORT} -servername {name} \
                     </dev/null >/dev/null 2>&1; true"
                ),
            ]);
        };
        openssl(TLS, "www.tls.example");
        link.b.exec(&[
            "sh",
            "-c",
            &format!(
                "timeout 5 curl -sk --resolve api.tls.example:{TLS_PORT}:{TLS} \
                 https://api.tls.example:{TLS_PORT}/ >/dev/null 2>&1; true"
            ),
        ]);
        openssl(SPLIT, "www.split.example");
        server.join().unwrap();
        // The QUIC clients' first datagrams, as aioquic wrote them, sent
        // from b to a port that is no QUIC port.
        for (version, to, from) in [(1, QUIC, B4), (2, QUIC6, B6)] {
            let initials = crate::kit::hello::aioquic_initials("www.quic.example", version, 0);
            link.b.run(|| {
                let socket = UdpSocket::bind((from, 0)).unwrap();
                for datagram in &initials {
                    socket.send_to(datagram, (to, 4433)).unwrap();
                }
            });
        }
        // Past the name wait: the traffic that follows is named as the
        // handshakes said, or by address.
        thread::sleep(Duration::from_millis(500));
        let named = |name: &str, address: &'static str| {
            if tls_on {
                format!(r#"dst="{name}""#)
            } else {
                format!(r#"dst="{address}""#)
            }
        };
        let (tls, quic, quic6, split) = (
            named("tls.example", TLS),
            named("quic.example", QUIC),
            named("quic.example", QUIC6),
            named("split.example", SPLIT),
        );
        let expect = vec![
            (vec![tls.as_str()], send(&link, B4, TLS)),
            // Through the 120-byte MTU each 128-byte datagram leaves in two
            // fragments: one more IPv4 header each.
            (vec![split.as_str()], send(&link, B4, SPLIT) + 10 * 20),
            (
                vec![quic.as_str(), r#"src="198.18.0.2""#],
                send(&link, B4, QUIC),
            ),
            (
                vec![quic6.as_str(), r#"src="2001:2::2""#],
                send(&link, B6, QUIC6),
            ),
        ];
        let text = wait_for_sink_bytes(&link, port, &expect);
        let total: u64 = expect.iter().map(|(_, b)| b).sum();
        assert_eq!(bytes_where(&text, &[r#"service="5300""#]), total, "{text}");
        let handshakes = |protocol: &str| {
            crate::kit::scrape::sample_sum(
                &text,
                "ntm_observed_messages_total",
                &[&format!(r#"protocol="{protocol}""#), r#"result="parsed""#],
            )
        };
        if tls_on {
            assert!(handshakes("tls") >= 3, "{text}");
            assert!(handshakes("quic") >= 2, "{text}");
            for (source, count) in [("tls_sni", 2), ("quic_sni", 2)] {
                let line = format!(r#"ntm_names{{source="{source}"}} {count}"#);
                assert!(text.contains(&line), "no {line}:\n{text}");
            }
        } else {
            assert_eq!(handshakes("tls") + handshakes("quic"), 0, "{text}");
        }
    }
}
