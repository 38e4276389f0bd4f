//! tcpdump filters with real traffic between test namespaces: only matching
//! traffic reaches the counters and the rest only the filtered counter
//! (exactly); VLAN tags the kernel moved into skb metadata are judged as
//! tcpdump sees them; SIGHUP swaps the filter without losing a packet; bad
//! filters fail before anything is attached.

use std::{net::UdpSocket, time::Duration};

use crate::kit::{
    Agent, Link, Netns,
    frames::*,
    scrape::{TempDir, http_get, sample_sum, wait_for, wait_healthy},
    send_raw,
};
use ntm_agent::{
    filter::pcap,
    kernel::{FilterSource, attach, load_filter},
};
use ntm_common::{Counters, Hook, OutsideReason, programs::LinkType};

/// Extra addresses: b sends from 198.18.1.2 and 198.18.2.2 to a's
/// 198.18.1.1 and 198.18.2.1 (neighbours fixed, so no ARP in the counts).
fn add_subnets(link: &Link) {
    for (ns, ifname, mine, peer_mac, peers) in [
        (
            &link.a,
            &link.a_if,
            ["198.18.1.1", "198.18.2.1"],
            "02:00:00:00:00:02",
            ["198.18.1.2", "198.18.2.2"],
        ),
        (
            &link.b,
            &link.b_if,
            ["198.18.1.2", "198.18.2.2"],
            "02:00:00:00:00:01",
            ["198.18.1.1", "198.18.2.1"],
        ),
    ] {
        for addr in mine {
            ns.exec(&["ip", "addr", "add", &format!("{addr}/24"), "dev", ifname]);
        }
        for peer in peers {
            ns.permanent_neighbour(ifname, peer, peer_mac);
        }
    }
    link.wait_quiet();
}

/// Sends `count` datagrams of `payload` bytes from `src` to `dst`:`port`
/// inside b; a sink in a receives them (no ICMP errors come back).
fn send_udp(link: &Link, src: &str, dst: &str, port: u16, count: usize, payload: usize) {
    let sink = link.a.run(|| UdpSocket::bind((dst, port)).unwrap());
    link.b.run(|| {
        let socket = UdpSocket::bind((src, 0)).unwrap();
        let data = vec![0x5a; payload];
        for _ in 0..count {
            socket.send_to(&data, (dst, port)).unwrap();
        }
    });
    link.wait_quiet();
    drop(sink);
}

fn metrics(ns: &Netns, port: u16) -> String {
    http_get(ns, port, "/metrics").expect("metrics").1
}

pub fn only_matching_traffic_is_counted_and_the_rest_is_filtered_exactly() {
    let link = Link::new("flt");
    add_subnets(&link);
    let port = 9481;
    let _agent = Agent::in_ns(&link.a)
        .iface(&link.a_if)
        .port_any_address(port)
        .args(["--drain-interval", "100ms"])
        .args(["src", "net", "198.18.1.0/24"])
        .spawn();
    wait_healthy(&link.a, port);
    send_udp(&link, "198.18.1.2", "198.18.1.1", 5001, 40, 100);
    send_udp(&link, "198.18.2.2", "198.18.2.1", 5001, 25, 300);
    let text = wait_for("the counts", Duration::from_secs(20), || {
        let text = metrics(&link.a, port);
        (sample_sum(&text, "ntm_filtered_packets_total", &[]) >= 25
            && sample_sum(&text, "ntm_packets_total", &[]) >= 40)
            .then_some(text)
    });
    // Counted: exactly the 198.18.1.0/24 source, 40 x (20 + 8 + 100) bytes.
    assert_eq!(
        sample_sum(&text, "ntm_bytes_total", &[r#"src="198.18.1.2""#]),
        40 * 128,
        "{text}"
    );
    assert_eq!(
        sample_sum(&text, "ntm_bytes_total", &[]),
        40 * 128,
        "{text}"
    );
    assert_eq!(sample_sum(&text, "ntm_packets_total", &[]), 40, "{text}");
    // The rest: only in the filtered counters, with the same kind of bytes,
    // under the interface and hook that saw them.
    let ingress = [r#"iface="ntm0""#, r#"hook="ingress""#];
    assert_eq!(
        sample_sum(&text, "ntm_filtered_bytes_total", &ingress),
        25 * 328,
        "{text}"
    );
    assert_eq!(
        sample_sum(&text, "ntm_filtered_packets_total", &ingress),
        25,
        "{text}"
    );
    assert_eq!(
        sample_sum(&text, "ntm_filtered_packets_total", &[]),
        25,
        "{text}"
    );
    assert!(
        text.contains(r#"ntm_filtered_packets_total{hook="egress",iface="ntm0"} 0"#),
        "every interface and hook starts at 0: {text}"
    );
    assert!(
        text.contains(r#"ntm_filter_active{filter="src net 198.18.1.0/24"} 1"#),
        "{text}"
    );
}

pub fn sighup_swaps_the_filter_from_its_file_without_losing_a_packet() {
    let link = Link::new("hup");
    let dir = TempDir::new("hup");
    let file = dir.0.join("filter");
    std::fs::write(&file, "# first\nudp dst port 5001\n").unwrap();
    let port = 9482;
    let agent = Agent::in_ns(&link.a)
        .iface(&link.a_if)
        .port_any_address(port)
        .args(["--drain-interval", "100ms", "-F", file.to_str().unwrap()])
        .spawn();
    wait_healthy(&link.a, port);
    let pid = agent.0.id() as i32;
    let sinks = link.a.run(|| {
        (
            UdpSocket::bind((crate::kit::A4, 5001)).unwrap(),
            UdpSocket::bind((crate::kit::A4, 5002)).unwrap(),
        )
    });
    // b sends to both ports in turn for a while; halfway the filter changes.
    let per_port = 3000;
    std::thread::scope(|scope| {
        let sender = scope.spawn(|| {
            link.b.run(|| {
                let socket = UdpSocket::bind((crate::kit::B4, 0)).unwrap();
                for i in 0..per_port {
                    for p in [5001u16, 5002] {
                        socket.send_to(&[0u8; 72], (crate::kit::A4, p)).unwrap();
                    }
                    if i % 100 == 0 {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
            })
        });
        std::thread::sleep(Duration::from_millis(80));
        std::fs::write(&file, "udp dst port 5002 # second\n").unwrap();
        // SAFETY: signalling our own child.
        // SAFETY: sending a signal to our own child.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
        sender.join().unwrap();
    });
    link.wait_quiet();
    drop(sinks);
    let text = wait_for("the reload and the counts", Duration::from_secs(20), || {
        let text = metrics(&link.a, port);
        let total = sample_sum(&text, "ntm_packets_total", &[])
            + sample_sum(&text, "ntm_filtered_packets_total", &[]);
        (total >= 2 * per_port as u64
            && text.contains(r#"ntm_filter_reloads_total{result="ok"} 1"#))
        .then_some(text)
    });
    let to_5001 = sample_sum(&text, "ntm_packets_total", &[r#"service="5001""#]);
    let to_5002 = sample_sum(&text, "ntm_packets_total", &[r#"service="5002""#]);
    let filtered = sample_sum(&text, "ntm_filtered_packets_total", &[]);
    // Every packet is in exactly one place; both filters counted some.
    assert_eq!(to_5001 + to_5002 + filtered, 2 * per_port as u64, "{text}");
    assert!(to_5001 > 0 && to_5002 > 0 && filtered > 0, "{text}");
    assert_eq!(
        sample_sum(&text, "ntm_packets_total", &[]),
        to_5001 + to_5002,
        "{text}"
    );
    assert!(
        text.contains(r#"ntm_filter_active{filter="udp dst port 5002"} 1"#),
        "{text}"
    );

    // A bad new filter is refused and the old one stays.
    std::fs::write(&file, "udp dst port").unwrap();
    // SAFETY: sending a signal to our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    let text = wait_for("the refused reload", Duration::from_secs(20), || {
        let text = metrics(&link.a, port);
        text.contains(r#"ntm_filter_reloads_total{result="error"} 1"#)
            .then_some(text)
    });
    assert!(
        text.contains(r#"ntm_filter_active{filter="udp dst port 5002"} 1"#),
        "{text}"
    );
    let before = sample_sum(&text, "ntm_packets_total", &[r#"service="5002""#]);
    send_udp(&link, crate::kit::B4, crate::kit::A4, 5002, 10, 10);
    wait_for(
        "the old filter still counting",
        Duration::from_secs(20),
        || {
            let text = metrics(&link.a, port);
            (sample_sum(&text, "ntm_packets_total", &[r#"service="5002""#]) == before + 10)
                .then_some(())
        },
    );
}

pub fn vlan_tags_in_skb_metadata_look_to_the_filter_as_they_do_to_tcpdump() {
    let link = Link::new("fvl");
    let to_a = |mut f: Vec<u8>| {
        f[..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
        f
    };
    let mut ip = ipv4(17, &[], 0, &udp(40_000, 53, &[0; 40]));
    // To an address a does not have: dropped quietly, nothing sent back.
    ip[16..20].copy_from_slice(&[198, 18, 0, 99]);
    let frames = [
        to_a(eth(ETH_IPV4, &[(TPID_8021Q, 100)], &ip)),
        to_a(eth(ETH_IPV4, &[(TPID_8021Q, 200)], &ip)),
        to_a(eth(ETH_IPV4, &[(TPID_8021AD, 300), (TPID_8021Q, 100)], &ip)),
        to_a(eth(ETH_ARP, &[(TPID_8021Q, 42)], &arp_request())),
        to_a(eth(ETH_IPV4, &[], &ip)),
    ];
    let filters = [
        "vlan",
        "not vlan",
        "vlan 100",
        "vlan 300",
        "vlan and ip",
        "vlan 100 and udp port 53",
        "vlan and vlan 100",
        "vlan 300 and vlan 100 and udp",
        "ip",
        "udp port 53",
        "arp",
        "vlan and arp",
        "ether[12:2] = 0x8100",
        "ether[12:2] = 0x88a8",
        "ether[14:2] & 0xfff = 200",
        "ether[16:2] = 0x0800",
        "ether[13:2] = 0x0064",
        "ether[10:4] = 0x00018100",
        "less 60",
        "greater 80",
    ];
    link.a.run(|| {
        // --no-pin (start_kernel's): this process's /sys/fs/bpf is the
        // host's, where pins would outlive the test; every run left one
        // set of programs and maps loaded when this started the kernel
        // with the default pin folder.
        let mut agent = crate::kit::start_kernel(&["-i", &link.a_if]);
        for expression in filters {
            let filter = load_filter(&FilterSource::Expression(expression.into()))
                .unwrap()
                .unwrap();
            let classic = filter.program(LinkType::Ethernet).unwrap().to_vec();
            agent.replace_filter(Some(filter)).unwrap();
            agent.drain().unwrap();
            agent.drain().unwrap();
            let mut expect_matched = 0;
            let mut expect_filtered = 0;
            for (i, frame) in frames.iter().enumerate() {
                let copies = i as u64 + 1;
                link.b.run(|| send_raw(&link.b_if, &vec![frame.clone(); copies as usize]));
                if pcap::offline_matches(&classic, frame) {
                    expect_matched += copies;
                } else {
                    expect_filtered += copies;
                }
            }
            link.wait_quiet();
            let mut counted = Counters::default();
            let mut filtered = Counters::default();
            for _ in 0..2 {
                let d = agent.drain().unwrap();
                for (key, c) in &d.flows {
                    assert_eq!(key.hook, Hook::Ingress as u8, "{expression}: {key:?}");
                    counted.add(c);
                }
                for r in OutsideReason::ALL {
                    if r == OutsideReason::Filtered {
                        filtered.add(&d.outside.total(r));
                    } else {
                        counted.add(&d.outside.total(r));
                    }
                }
            }
            assert_eq!(
                (counted.packets, filtered.packets),
                (expect_matched, expect_filtered),
                "{expression:?}: (counted, filtered) must be libpcap's verdict on the frames as sent"
            );
        }
        let _ = agent.shutdown().unwrap();
    });
}

pub fn bad_filters_fail_before_anything_is_attached() {
    let link = Link::new("fbad");
    let run = |args: &[&str]| {
        let out = Agent::in_ns(&link.a)
            .iface(&link.a_if)
            .port_any_address(9483)
            .args(args)
            .output();
        assert!(!out.status.success(), "{args:?} should fail");
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!err.contains("panicked"), "{err}");
        let attached = link
            .a
            .run(|| attach::attached_ntm_programs(&link.a_if).unwrap());
        assert_eq!(
            attached,
            (vec![], vec![]),
            "{args:?} left programs attached"
        );
        err
    };
    let err = run(&["tcp", "prot", "80"]);
    assert!(
        err.contains("\"tcp prot 80\"") && err.contains("syntax error"),
        "{err}"
    );
    let err = run(&["port", "99999"]);
    assert!(
        err.contains("\"port 99999\"") && err.contains("port"),
        "{err}"
    );
    let err = run(&["-F", "/nonexistent/ntm.filter"]);
    assert!(err.contains("/nonexistent/ntm.filter"), "{err}");
    let err = run(&["-F", "/etc/hostname", "udp"]);
    assert!(err.contains("one way"), "{err}");
    // An Ethernet-only filter on an L3-only interface would count what it
    // cannot judge: refused with libpcap's reason.
    link.a
        .exec(&["ip", "tuntap", "add", "dev", "ntmtun0", "mode", "tun"]);
    link.a.exec(&["ip", "link", "set", "ntmtun0", "up"]);
    let out = Agent::in_ns(&link.a)
        .iface("ntmtun0")
        .port_any_address(9484)
        .args(["ether", "host", "02:00:00:00:00:01"])
        .output();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("raw IP"), "{err}");
}
