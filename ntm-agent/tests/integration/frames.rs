//! The real kernel program, loaded into the kernel, fed crafted frames with
//! BPF_PROG_TEST_RUN; what it counted is read back through the agent's own
//! drain. Covers what real interfaces here cannot produce: VLAN tags in the
//! frame, IPv4 options and fragments, IPv6 extension chains, malformed and
//! truncated frames, GSO aggregates.

use crate::kit::frames::*;
use aya::programs::{TestRun, TestRunOptions};
use ntm_agent::{
    kernel::{
        drain::{Drained, FlowTables},
        load::{Datapath, DatapathOptions},
    },
    pipeline::services::ServiceRegistry,
};
use ntm_common::{Counters, FlowKey, Hook, OutsideReason, family, ipproto, test_util::KeyBuilder};

struct Harness {
    datapath: Datapath,
    tables: FlowTables,
}

/// Offset of `gso_segs` in `struct __sk_buff` (uapi/linux/bpf.h); the only
/// context field these tests set.
const SKB_GSO_SEGS_OFFSET: usize = 164;
const SKB_CTX_SIZE: usize = 192;

impl Harness {
    fn new() -> Self {
        Self::with(
            DatapathOptions::default(),
            "53/udp=domain,443/tcp=https,443/udp=https",
        )
    }

    fn with(options: DatapathOptions, services: &str) -> Self {
        let mut registry = ServiceRegistry::default();
        for spec in services.split(',').filter(|s| !s.is_empty()) {
            registry.add_spec(spec).unwrap();
        }
        let (datapath, tables) =
            Datapath::load(&options, &registry.known_port_bitmap(), None).expect("load");
        Self { datapath, tables }
    }

    /// Runs `frame` through `program` `repeat` times, then drains.
    fn run(&mut self, program: &str, frame: &[u8], gso_segs: u32, repeat: u32) -> Drained {
        let mut ctx = [0u8; SKB_CTX_SIZE];
        ctx[SKB_GSO_SEGS_OFFSET..SKB_GSO_SEGS_OFFSET + 4].copy_from_slice(&gso_segs.to_ne_bytes());
        let prog = self.datapath.tc_program(program).expect("program");
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        opts.ctx_in = Some(&ctx);
        opts.repeat = repeat;
        let result = prog
            .test_run(opts)
            .unwrap_or_else(|e| panic!("test_run of {} bytes: {e:?}", frame.len()));
        // TC_ACT_UNSPEC: the packet always continues unchanged.
        assert_eq!(result.return_value as i32, -1);
        self.tables.drain().expect("drain")
    }

    fn ingress(&mut self, frame: &[u8]) -> Drained {
        self.run(TC_INGRESS_ETH, frame, 0, 1)
    }

    /// Runs `frame` through TC ingress once, without draining.
    fn send(&mut self, frame: &[u8]) {
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        let prog = self.datapath.tc_program(TC_INGRESS_ETH).expect("program");
        let result = prog.test_run(opts).expect("test_run");
        assert_eq!(result.return_value as i32, -1);
    }

    /// Runs `frame` through the XDP program once, without draining.
    fn xdp_once(&mut self, frame: &[u8]) {
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        let prog = self.datapath.xdp_program(XDP).expect("xdp program");
        let result = prog.test_run(opts).expect("test_run");
        // XDP_PASS: the frame goes on to the stack.
        assert_eq!(result.return_value, 2);
    }
}

/// The single flow a drain must have found.
fn only_flow(d: &Drained) -> (FlowKey, Counters) {
    assert_eq!(d.flows.len(), 1, "expected one flow, got {:?}", d.flows);
    assert!(
        d.outside.is_empty(),
        "unexpected outside counts: {:?}",
        d.outside
    );
    d.flows[0]
}

/// The frame must have been counted outside the table, for `reason` only.
fn only_outside(d: &Drained, reason: OutsideReason, bytes: u64) {
    assert!(d.flows.is_empty(), "expected no flow, got {:?}", d.flows);
    for r in OutsideReason::ALL {
        let expected = if r == reason {
            Counters { bytes, packets: 1 }
        } else {
            Counters::default()
        };
        assert_eq!(d.outside.total(r), expected, "outside[{}]", r.as_str());
    }
    // Kept with the hook and the interface it was seen on (test runs see
    // the loopback interface).
    for (at, _) in d.outside.iter() {
        assert_eq!(at.hook, ntm_common::Hook::Ingress, "{at:?}");
        assert_eq!(at.ifindex, 1, "{at:?}");
    }
}

/// The key of a crafted IPv4 frame (from [`SRC4`] to [`DST4`]) as a test
/// run counts it: on the loopback interface, ingress.
fn v4() -> KeyBuilder {
    KeyBuilder::v4(SRC4, DST4).ifindex(1)
}

/// The same for IPv6 ([`SRC6`] to [`DST6`]).
fn v6() -> KeyBuilder {
    KeyBuilder::v6(SRC6, DST6).ifindex(1)
}

fn counted(bytes: u64) -> Counters {
    Counters { bytes, packets: 1 }
}

pub fn ipv4_udp_to_a_known_port_in_both_directions() {
    let mut h = Harness::new();
    let frame = eth(ETH_IPV4, &[], &ipv4(17, &[], 0, &udp(40_000, 53, &[7; 10])));
    let (key, c) = only_flow(&h.ingress(&frame));
    assert_eq!(key, v4().udp(53).build());
    assert_eq!(c, counted(20 + 8 + 10));

    // The reply: same service port; the egress hook says so in the key.
    let reply = eth(ETH_IPV4, &[], &ipv4(17, &[], 0, &udp(53, 40_000, &[7; 30])));
    let (key, c) = only_flow(&h.run(TC_EGRESS_ETH, &reply, 0, 1));
    assert_eq!(key.port, 53);
    assert_eq!(key.hook, Hook::Egress as u8);
    assert_eq!(c, counted(20 + 8 + 30));
}

pub fn repeated_frames_are_counted_exactly() {
    let mut h = Harness::new();
    let frame = eth(
        ETH_IPV4,
        &[],
        &ipv4(6, &[], 0, &tcp(51_000, 443, &[], &[1; 100])),
    );
    let (key, c) = only_flow(&h.run(TC_INGRESS_ETH, &frame, 0, 10_000));
    assert_eq!(key, v4().tcp(443).build());
    assert_eq!(
        c,
        Counters {
            bytes: 140 * 10_000,
            packets: 10_000
        }
    );
}

pub fn single_and_double_vlan_tags_in_the_frame() {
    let mut h = Harness::new();
    let ip = ipv4(17, &[], 0, &udp(40_000, 53, &[0; 4]));
    let (key, c) = only_flow(&h.ingress(&eth(ETH_IPV4, &[(TPID_8021Q, 100)], &ip)));
    assert_eq!(key, v4().udp(53).vlan(100).build());
    assert_eq!(c, counted(32));

    // QinQ: the outer (service) tag is the one kept; priority bits ignored.
    let qinq = eth(
        ETH_IPV4,
        &[(TPID_8021AD, 0xE000 | 200), (TPID_8021Q, 100)],
        &ip,
    );
    let (key, c) = only_flow(&h.ingress(&qinq));
    assert_eq!(key.vlan_id, 200);
    assert_eq!(c, counted(32));

    // A tag with nothing after it is a truncated link-layer header.
    let mut cut = eth(TPID_8021Q, &[], &[]);
    cut.extend_from_slice(&[0, 100]);
    only_outside(
        &h.ingress(&cut),
        OutsideReason::TruncatedL2,
        cut.len() as u64,
    );
}

pub fn ipv4_options_and_fragments() {
    let mut h = Harness::new();
    // 12 bytes of options (IHL 8): the ports are still found.
    let opts = [1u8; 12];
    let frame = eth(
        ETH_IPV4,
        &[],
        &ipv4(6, &opts, 0, &tcp(51_000, 443, &[], &[0; 8])),
    );
    let (key, c) = only_flow(&h.ingress(&frame));
    assert_eq!(key, v4().tcp(443).build());
    assert_eq!(c, counted(32 + 20 + 8));

    // First fragment (MF set, offset 0): ports read.
    let first = eth(
        ETH_IPV4,
        &[],
        &ipv4(17, &[], 0x2000, &udp(40_000, 53, &[0; 24])),
    );
    let (key, c) = only_flow(&h.ingress(&first));
    assert_eq!(key, v4().udp(53).build());
    assert_eq!(c, counted(20 + 32));

    // A later fragment of that datagram (same addresses, protocol and
    // identification): its payload is not a UDP header, but it takes the
    // first fragment's port, so the datagram stays in one series.
    let later = eth(ETH_IPV4, &[], &ipv4(17, &[], 4, &[0xAA; 40]));
    let (key, c) = only_flow(&h.ingress(&later));
    assert_eq!(key, v4().udp(53).build());
    assert_eq!(c, counted(60));

    // A later fragment of a datagram whose first fragment was not seen
    // (another identification): no port, same bytes rule.
    let mut stray = later.clone();
    stray[18..20].copy_from_slice(&[0x56, 0x78]);
    let (key, c) = only_flow(&h.ingress(&stray));
    assert_eq!(key, v4().udp(0).l4_missing().build());
    assert_eq!(c, counted(60));
}

/// The frame nearly every frame is (IPv4 without options or IPv6 without
/// extension headers, TCP or UDP) takes the kernel's one-go parse; the
/// same flow with IPv4 options or an IPv6 extension header takes the full
/// parse. Both must give one key, on the Ethernet and the raw-IP hooks
/// (fails when the two parsers disagree on any field of the key).
pub fn common_frames_and_the_full_parse_give_one_key() {
    let mut h = Harness::new();
    let nops = [1u8; 4];
    let cases = [
        (
            "IPv4/TCP",
            ipv4(6, &[], 0, &tcp(51_000, 443, &[1; 8], &[0; 10])),
            ipv4(6, &nops, 0, &tcp(51_000, 443, &[1; 8], &[0; 10])),
            v4().tcp(443).build(),
        ),
        (
            "IPv4/UDP to a DNS server",
            ipv4(17, &[], 0, &udp(40_000, 53, &[0; 22])),
            ipv4(17, &nops, 0, &udp(40_000, 53, &[0; 22])),
            v4().udp(53).build(),
        ),
        (
            "IPv6/TCP from a server",
            ipv6(6, &tcp(443, 51_000, &[], &[0; 10])),
            ipv6(
                0,
                &[ext_options(6, 1), tcp(443, 51_000, &[], &[0; 10])].concat(),
            ),
            v6().tcp(443).from_server().build(),
        ),
        (
            "IPv6/UDP, no known port",
            ipv6(17, &udp(40_000, 8123, &[0; 22])),
            ipv6(
                60,
                &[ext_options(17, 2), udp(40_000, 8123, &[0; 22])].concat(),
            ),
            v6().udp(8123).build(),
        ),
    ];
    for (name, common, full, key) in cases {
        for packet in [&common, &full] {
            // L3 bytes: the whole packet, options and extension headers too.
            let bytes = packet.len() as u64;
            let ethertype = if packet[0] >> 4 == 4 {
                ETH_IPV4
            } else {
                ETH_IPV6
            };
            let (got, c) = only_flow(&h.ingress(&eth(ethertype, &[], packet)));
            assert_eq!(got, key, "{name}, {bytes} bytes, Ethernet");
            assert_eq!(c, counted(bytes), "{name}, Ethernet");
            let (got, c) = only_flow(&h.run(TC_INGRESS_L3, packet, 0, 1));
            assert_eq!(got, key, "{name}, {bytes} bytes, raw IP");
            assert_eq!(c, counted(bytes), "{name}, raw IP");
        }
    }
}

/// The tests' programs that run the steady state alone (`steady.rs` in
/// ntm-ebpf): 1 if it counted the frame, 0 if it left it to the full path.
const STEADY_ETH: &str = "ntm_test_steady_eth";
const STEADY_L3: &str = "ntm_test_steady_l3";

/// Runs `frame` through `program` once, without draining: its return value.
fn run_once(h: &mut Harness, program: &str, frame: &[u8], gso_segs: u32) -> i32 {
    let mut ctx = [0u8; SKB_CTX_SIZE];
    ctx[SKB_GSO_SEGS_OFFSET..SKB_GSO_SEGS_OFFSET + 4].copy_from_slice(&gso_segs.to_ne_bytes());
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.ctx_in = Some(&ctx);
    let prog = h.datapath.tc_program(program).expect("program");
    prog.test_run(opts).expect("test_run").return_value as i32
}

/// The steady state counts a connection's frames once the full path has
/// put the connection in its cache slot, into the flow the full path chose
/// (the service port and its side), for each family, protocol and link
/// type; and it leaves to the full path, counting nothing, every frame that
/// needs more than a count: a SYN or RST, a segment that may begin a TLS
/// handshake, a long-header QUIC datagram, ports wanted for names, a
/// handshake whose client's ACK is awaited, and any frame the common parse
/// does not take (a VLAN tag in the frame, IPv4 options, a fragment, an
/// aggregate).
pub fn the_steady_state_counts_only_frames_that_need_no_decision() {
    let options = DatapathOptions {
        track_handshakes: true,
        also_load: &[STEADY_ETH, STEADY_L3],
        ..Default::default()
    };
    let mut h = Harness::with(options, "53/udp=domain,443/tcp=https,443/udp=https");
    let with_flags = |mut packet: Vec<u8>, flags: u8| {
        // Byte 13 of the TCP header, after an IPv4 header without options.
        packet[20 + 13] = flags;
        packet
    };
    let mut quic_short = vec![0x40u8; 1230];
    quic_short[1..].fill(7);
    let mut quic_long = vec![0xc3u8; 1230];
    quic_long[1..5].copy_from_slice(&1u32.to_be_bytes());
    let hello = [0x16u8, 3, 1, 0, 0x40, 1, 0, 0, 0x3c, 3, 3];

    // (what, link type, L3 packet, the full path's key)
    let taken = [
        (
            "IPv4/TCP data to a service",
            true,
            ipv4(6, &[], 0, &tcp(51_000, 443, &[], &[1; 100])),
            v4().tcp(443).build(),
        ),
        (
            "IPv4/TCP bare ACK from the service",
            true,
            with_flags(ipv4(6, &[], 0, &tcp(443, 51_000, &[], &[])), 0x10),
            v4().tcp(443).from_server().build(),
        ),
        (
            "IPv4/UDP, no known port",
            true,
            ipv4(17, &[], 0, &udp(40_000, 8123, &[0; 22])),
            v4().udp(8123).build(),
        ),
        (
            "IPv6/TCP with options, from a server",
            true,
            ipv6(6, &tcp(443, 51_000, &[1; 8], &[0; 10])),
            v6().tcp(443).from_server().build(),
        ),
        (
            "IPv6/UDP, a short-header QUIC datagram",
            true,
            ipv6(17, &udp(51_000, 443, &quic_short)),
            v6().udp(443).build(),
        ),
        (
            "IPv4/UDP on a raw-IP link",
            false,
            ipv4(17, &[], 0, &udp(40_000, 8123, &[0; 22])),
            v4().udp(8123).build(),
        ),
    ];
    for (what, ethernet, packet, key) in taken {
        let (full, steady, frame) = if ethernet {
            let ethertype = if packet[0] >> 4 == 4 {
                ETH_IPV4
            } else {
                ETH_IPV6
            };
            (TC_INGRESS_ETH, STEADY_ETH, eth(ethertype, &[], &packet))
        } else {
            (TC_INGRESS_L3, STEADY_L3, packet.clone())
        };
        assert_eq!(
            run_once(&mut h, steady, &frame, 0),
            0,
            "{what}: no slot yet"
        );
        assert_eq!(run_once(&mut h, full, &frame, 0), -1, "{what}");
        for _ in 0..3 {
            assert_eq!(
                run_once(&mut h, steady, &frame, 0),
                1,
                "{what}: in its slot"
            );
        }
        let (got, c) = only_flow(&h.tables.drain().expect("drain"));
        assert_eq!(got, key, "{what}");
        let bytes = packet.len() as u64;
        assert_eq!(
            c,
            Counters {
                bytes: 4 * bytes,
                packets: 4
            },
            "{what}"
        );
    }

    // (what, Ethernet frame, GSO segments)
    let tcp_to_service = |flags: u8, data: &[u8]| {
        eth(
            ETH_IPV4,
            &[],
            &with_flags(ipv4(6, &[], 0, &tcp(51_000, 443, &[], data)), flags),
        )
    };
    let left = [
        ("a SYN", tcp_to_service(0x02, &[]), 0),
        ("a RST", tcp_to_service(0x14, &[]), 0),
        ("a TLS handshake record", tcp_to_service(0x18, &hello), 0),
        (
            "a DNS response",
            eth(ETH_IPV4, &[], &ipv4(17, &[], 0, &udp(53, 40_000, &[0; 30]))),
            0,
        ),
        (
            "a DHCP request",
            eth(ETH_IPV4, &[], &ipv4(17, &[], 0, &udp(68, 67, &[0; 30]))),
            0,
        ),
        (
            "a long-header QUIC datagram",
            eth(ETH_IPV6, &[], &ipv6(17, &udp(51_000, 443, &quic_long))),
            0,
        ),
        (
            "a VLAN tag in the frame",
            eth(
                ETH_IPV4,
                &[(TPID_8021Q, 7)],
                &ipv4(17, &[], 0, &udp(40_000, 8123, &[0; 22])),
            ),
            0,
        ),
        (
            "IPv4 options",
            eth(
                ETH_IPV4,
                &[],
                &ipv4(17, &[1; 4], 0, &udp(40_000, 8123, &[0; 22])),
            ),
            0,
        ),
        (
            "a first fragment",
            eth(
                ETH_IPV4,
                &[],
                &ipv4(17, &[], 0x2000, &udp(40_000, 8123, &[0; 22])),
            ),
            0,
        ),
        (
            "an aggregate of 2 segments",
            tcp_to_service(0x10, &[1; 100]),
            2,
        ),
    ];
    for (what, frame, gso_segs) in left {
        assert_eq!(
            run_once(&mut h, TC_INGRESS_ETH, &frame, gso_segs),
            -1,
            "{what}"
        );
        assert_eq!(
            run_once(&mut h, STEADY_ETH, &frame, gso_segs),
            0,
            "{what}: for the full path"
        );
        let drained = h.tables.drain().expect("drain");
        let packets: u64 = drained.flows.iter().map(|(_, c)| c.packets).sum::<u64>()
            + drained.outside.iter().map(|(_, c)| c.packets).sum::<u64>();
        assert_eq!(packets, gso_segs.max(1) as u64, "{what}: counted once");
    }

    // A handshake: after the client's SYN its frames take the full path,
    // which follows the client's ACK of the SYN-ACK, until the handshake
    // has ended.
    // A client port of its own: the SYN and RST above were 51000's.
    let segment = |from_client: bool, flags: u8, seq: u32, ack: u32| {
        let mut f = tcp_to_service(flags, &[]);
        f[34..36].copy_from_slice(&40_002u16.to_be_bytes());
        if !from_client {
            let (src, dst) = (f[26..30].to_vec(), f[30..34].to_vec());
            f[26..30].copy_from_slice(&dst);
            f[30..34].copy_from_slice(&src);
            f[34..38].copy_from_slice(&[0x01, 0xbb, 0x9c, 0x42]);
        }
        f[38..42].copy_from_slice(&seq.to_be_bytes());
        f[42..46].copy_from_slice(&ack.to_be_bytes());
        f
    };
    let ack = segment(true, 0x10, 1001, 5001);
    let handshakes = h.datapath.take_handshakes().expect("handshakes followed");
    assert_eq!(run_once(&mut h, TC_INGRESS_ETH, &ack, 0), -1);
    assert_eq!(run_once(&mut h, STEADY_ETH, &ack, 0), 1, "no handshake yet");
    assert_eq!(
        run_once(&mut h, TC_INGRESS_ETH, &segment(true, 0x02, 1000, 0), 0),
        -1
    );
    assert_eq!(
        run_once(&mut h, STEADY_ETH, &ack, 0),
        0,
        "the SYN's ACK awaited"
    );
    assert_eq!(
        run_once(&mut h, TC_INGRESS_ETH, &segment(false, 0x12, 5000, 1001), 0),
        -1
    );
    assert_eq!(handshakes.waiting(), 1, "the SYN-ACK opens its gate");
    assert_eq!(
        run_once(&mut h, STEADY_ETH, &ack, 0),
        0,
        "the SYN-ACK's ACK awaited"
    );
    assert_eq!(run_once(&mut h, TC_INGRESS_ETH, &ack, 0), -1);
    assert_eq!(
        handshakes.waiting(),
        0,
        "the client's ACK, followed, closes it"
    );
    // The frame that closed the gate still found it open: the next one
    // through the full path clears the connection's watch.
    assert_eq!(run_once(&mut h, TC_INGRESS_ETH, &ack, 0), -1);
    assert_eq!(
        run_once(&mut h, STEADY_ETH, &ack, 0),
        1,
        "the handshake has ended"
    );
    let drained = h.tables.drain().expect("drain");
    let packets: u64 = drained.flows.iter().map(|(_, c)| c.packets).sum();
    assert_eq!(
        packets, 7,
        "every segment counted once: {:?}",
        drained.flows
    );
}

pub fn ipv6_extension_header_chains() {
    let mut h = Harness::new();
    // hop-by-hop -> destination options (16 bytes) -> fragment (first) -> UDP.
    let mut payload = ext_options(60, 1);
    payload.extend(ext_options(44, 2));
    payload.extend(ext_fragment(17, 0, true));
    payload.extend(udp(40_000, 53, &[0; 20]));
    let frame = eth(ETH_IPV6, &[], &ipv6(0, &payload));
    let (key, c) = only_flow(&h.ingress(&frame));
    assert_eq!(key, v6().udp(53).build());
    assert_eq!(c, counted(40 + payload.len() as u64));

    // Routing header, then AH, then TCP.
    let mut payload = ext_options(51, 1);
    payload.extend(ext_ah(6, 3));
    payload.extend(tcp(51_000, 443, &[], &[]));
    let (key, _) = only_flow(&h.ingress(&eth(ETH_IPV6, &[], &ipv6(43, &payload))));
    assert_eq!(key, v6().tcp(443).build());

    // A later fragment of the first chain's datagram (identification 1):
    // the first fragment's port.
    let mut payload = ext_fragment(17, 100, false);
    payload.extend([0u8; 48]);
    let (key, c) = only_flow(&h.ingress(&eth(ETH_IPV6, &[], &ipv6(44, &payload))));
    assert_eq!(key, v6().udp(53).build());
    assert_eq!(c, counted(40 + 56));

    // A later fragment of an unseen datagram: protocol known, no port.
    payload[4..8].copy_from_slice(&[0, 0, 0, 9]);
    let (key, c) = only_flow(&h.ingress(&eth(ETH_IPV6, &[], &ipv6(44, &payload))));
    assert_eq!(key, v6().udp(0).l4_missing().build());
    assert_eq!(c, counted(40 + 56));

    // Seven destination-options headers: longer than the parser follows.
    let mut payload = Vec::new();
    for _ in 0..6 {
        payload.extend(ext_options(60, 1));
    }
    payload.extend(ext_options(17, 1));
    payload.extend(udp(1, 2, &[]));
    let frame = eth(ETH_IPV6, &[], &ipv6(60, &payload));
    only_outside(
        &h.ingress(&frame),
        OutsideReason::Ipv6ExtensionChain,
        frame.len() as u64,
    );

    // An extension header cut short.
    let frame = eth(ETH_IPV6, &[], &ipv6(0, &[17]));
    let d = h.ingress(&frame);
    assert!(d.flows.is_empty());
    assert_eq!(
        d.outside.total(OutsideReason::Ipv6ExtensionChain).packets,
        1
    );
}

pub fn icmp_and_icmpv6_message_types() {
    let mut h = Harness::new();
    let echo = eth(ETH_IPV4, &[], &ipv4(1, &[], 0, &icmp(8, 0, &[0; 56])));
    let (key, c) = only_flow(&h.ingress(&echo));
    assert_eq!(key, v4().icmp(8).build());
    assert_eq!(c, counted(84));

    let echo6 = eth(ETH_IPV6, &[], &ipv6(58, &icmp(128, 0, &[0; 56])));
    let (key, c) = only_flow(&h.ingress(&echo6));
    assert_eq!(key, v6().icmpv6(128).build());
    assert_eq!(c, counted(104));
}

pub fn non_ip_frames_are_counted_by_ethertype() {
    let mut h = Harness::new();
    let arp = eth(ETH_ARP, &[(TPID_8021Q, 7)], &arp_request());
    let (key, c) = only_flow(&h.ingress(&arp));
    assert_eq!(key, KeyBuilder::non_ip(ETH_ARP).vlan(7).ifindex(1).build());
    // Everything after the link-layer header (18 bytes with the tag).
    assert_eq!(c, counted(28));

    let lldp = eth(0x88CC, &[], &[0; 46]);
    let (key, c) = only_flow(&h.ingress(&lldp));
    assert_eq!((key.family, key.port), (family::NON_IP, 0x88CC));
    assert_eq!(c, counted(46));
}

pub fn malformed_frames_are_counted_by_reason_not_lost() {
    let mut h = Harness::new();
    // IPv4 header cut after 10 bytes. BPF_PROG_TEST_RUN refuses an
    // untagged IPv4 frame shorter than an IP header, so the frame carries a
    // VLAN tag: the parser walks past it to the same truncated header.
    let short = eth(ETH_IPV4, &[(TPID_8021Q, 5)], &[0x45; 10]);
    only_outside(
        &h.ingress(&short),
        OutsideReason::MalformedIpv4,
        short.len() as u64,
    );

    // IHL 3 (12 bytes) is impossible.
    let mut bad_ihl = ipv4(17, &[], 0, &udp(1, 2, &[]));
    bad_ihl[0] = 0x43;
    let frame = eth(ETH_IPV4, &[], &bad_ihl);
    only_outside(
        &h.ingress(&frame),
        OutsideReason::MalformedIpv4,
        frame.len() as u64,
    );

    // EtherType says IPv4, the header says version 6.
    let mut wrong_version = ipv4(17, &[], 0, &udp(1, 2, &[]));
    wrong_version[0] = 0x65;
    let frame = eth(ETH_IPV4, &[], &wrong_version);
    only_outside(
        &h.ingress(&frame),
        OutsideReason::MalformedIpv4,
        frame.len() as u64,
    );

    // Total length claims more than the frame carries: counted by what is there.
    let mut too_long = ipv4(17, &[], 0, &udp(1, 2, &[0; 10]));
    too_long[2..4].copy_from_slice(&1000u16.to_be_bytes());
    let frame = eth(ETH_IPV4, &[], &too_long);
    only_outside(
        &h.ingress(&frame),
        OutsideReason::MalformedIpv4,
        frame.len() as u64,
    );

    // IPv6 header cut short (tagged, as above).
    let frame = eth(ETH_IPV6, &[(TPID_8021Q, 5)], &[0x60; 30]);
    only_outside(
        &h.ingress(&frame),
        OutsideReason::MalformedIpv6,
        frame.len() as u64,
    );

    // A TCP header cut short still counts as IP traffic, without a port.
    let frame = eth(ETH_IPV4, &[], &ipv4(6, &[], 0, &[0xC3, 0x50, 0x01]));
    let (key, c) = only_flow(&h.ingress(&frame));
    assert_eq!(key, v4().tcp(0).l4_missing().build());
    assert_eq!(c, counted(23));
}

pub fn ethernet_padding_is_not_counted() {
    let mut h = Harness::new();
    // A 42-byte frame padded to the 60-byte Ethernet minimum.
    let mut frame = eth(ETH_IPV4, &[], &ipv4(17, &[], 0, &udp(40_000, 53, &[])));
    frame.resize(60, 0);
    let (_, c) = only_flow(&h.ingress(&frame));
    assert_eq!(c, counted(28));
}

pub fn gso_aggregates_count_as_their_wire_segments() {
    let mut h = Harness::new();
    // 4 segments of 500 payload bytes, TCP with 12 bytes of options: each
    // wire segment is 20 + 32 + 500 = 552 L3 bytes. (BPF_PROG_TEST_RUN takes
    // at most about a page of data, hence the small segments.)
    let options = [1u8; 12];
    let frame = eth(
        ETH_IPV4,
        &[],
        &ipv4(6, &[], 0, &tcp(51_000, 443, &options, &[0; 2000])),
    );
    let (key, c) = only_flow(&h.run(TC_EGRESS_ETH, &frame, 4, 1));
    assert_eq!(key.port, 443);
    assert_eq!(
        c,
        Counters {
            bytes: 4 * 552,
            packets: 4
        }
    );

    // IPv6 + UDP GSO: 3 segments of 500 bytes, 40 + 8 + 500 each.
    let frame = eth(ETH_IPV6, &[], &ipv6(17, &udp(40_000, 443, &[0; 1500])));

    let (key, c) = only_flow(&h.run(TC_EGRESS_ETH, &frame, 3, 1));
    assert_eq!(key.port, 443);
    assert_eq!(
        c,
        Counters {
            bytes: 3 * 548,
            packets: 3
        }
    );
}

pub fn service_port_rule_runs_in_the_kernel() {
    let mut h = Harness::new();
    let flow = |h: &mut Harness, sport, dport| {
        let frame = eth(ETH_IPV4, &[], &ipv4(17, &[], 0, &udp(sport, dport, &[])));
        only_flow(&h.ingress(&frame)).0.port
    };
    assert_eq!(flow(&mut h, 53, 40_000), 53);
    assert_eq!(
        flow(&mut h, 45_000, 8123),
        8123,
        "unknown port below the ephemeral range"
    );
    assert_eq!(flow(&mut h, 45_000, 50_000), 0, "two ephemeral ports");
    assert_eq!(flow(&mut h, 443, 53), 53, "both known: the lower");

    // The ephemeral range start is the agent's to set.
    let options = DatapathOptions {
        ephemeral_start: 1024,
        ..Default::default()
    };
    let mut low = Harness::with(options, "");
    assert_eq!(flow(&mut low, 45_000, 8123), 0);
    assert_eq!(flow(&mut low, 45_000, 800), 800);
}

/// A flood of new flows into a full table: the flow cache, which nearly
/// every frame then misses, goes off as it would with room (it was kept on
/// with a full table, and every frame paid its slot), and every frame is
/// still counted.
pub fn a_full_table_does_not_keep_a_flow_cache_that_does_not_pay() {
    let options = DatapathOptions {
        flow_table_entries: 8,
        ..Default::default()
    };
    let mut h = Harness::with(options, "");
    let _cpu = crate::kit::OnOneCpu::new();
    let flood = 2 * ntm_agent::kernel::flow_cache::BUSY_PACKETS as u32;
    let mut frame = eth(
        ETH_IPV4,
        &[],
        &ipv4(17, &[], 0, &udp(40_000, 1000, &[0; 12])),
    );
    let mut cache_on = Vec::new();
    for round in 0..3u32 {
        let mut expected = Counters::default();
        for i in 0..flood {
            let source = 0x0A00_0000 | (round * flood + i);
            frame[26..30].copy_from_slice(&source.to_be_bytes());
            let prog = h.datapath.tc_program(TC_INGRESS_ETH).unwrap();
            let mut opts = TestRunOptions::new();
            opts.data_in = Some(&frame);
            prog.test_run(opts).unwrap();
            expected.add(&Counters {
                bytes: 40,
                packets: 1,
            });
        }
        let d = h.tables.drain().unwrap();
        let outside = d.outside.total(OutsideReason::TableFull);
        assert!(outside.packets > 0, "round {round}: the table was full");
        let mut total = outside;
        for (_, c) in &d.flows {
            total.add(c);
        }
        assert_eq!(total, expected, "round {round}");
        cache_on.push(d.flow_cache.on);
    }
    assert_eq!(
        cache_on,
        [true, false, false],
        "the cache through each round: off once a full round missed it"
    );
}

pub fn a_full_table_still_counts_every_packet() {
    let options = DatapathOptions {
        flow_table_entries: 8,
        ..Default::default()
    };
    let mut h = Harness::with(options, "");
    // One CPU: its flow cache is then the only one, and both rounds below
    // fill it alike.
    let _cpu = crate::kit::OnOneCpu::new();
    let cache_slots = ntm_common::FLOW_CACHE_SLOTS as usize;
    // 10000 distinct flows (by source address), 3 packets each. The flow
    // cache holds at most one flow per slot (4096 on this CPU); every flow
    // it cannot hold goes to the 8-entry table, and beyond that to the
    // overflow bucket. Twice, with a drain after each: the second round's
    // table is a fresh one, which the programs must fill again although
    // they found the first one full (no new flow of the second round may
    // go outside it while it has room).
    let mut flows_per_round = Vec::new();
    for round in 0..2 {
        let mut expected = Counters::default();
        let mut frame = eth(
            ETH_IPV4,
            &[],
            &ipv4(17, &[], 0, &udp(40_000, 1000, &[0; 12])),
        );
        for i in 0..10_000u32 {
            frame[26..30].copy_from_slice(&(0xC612_0000 | i).to_be_bytes());
            let prog = h.datapath.tc_program(TC_INGRESS_ETH).unwrap();
            let mut opts = TestRunOptions::new();
            opts.data_in = Some(&frame);
            opts.repeat = 3;
            prog.test_run(opts).unwrap();
            expected.add(&Counters {
                bytes: 3 * 40,
                packets: 3,
            });
        }
        let d = h.tables.drain().unwrap();
        assert!(
            d.flows.len() <= cache_slots + 8,
            "round {round}: {} flows from a cache of {cache_slots} and a table of 8",
            d.flows.len()
        );
        let mut total = Counters::default();
        for (_, c) in &d.flows {
            assert_eq!(c.packets % 3, 0, "a flow's packets are never split: {c:?}");
            total.add(c);
        }
        let overflow = d.outside.total(OutsideReason::TableFull);
        assert!(
            overflow.packets >= 3 * (10_000 - cache_slots as u64 - 8),
            "round {round}: {overflow:?}"
        );
        total.add(&overflow);
        assert_eq!(total, expected, "round {round}");
        flows_per_round.push(d.flows.len());
    }
    assert_eq!(
        flows_per_round[0], flows_per_round[1],
        "the same frames fill the fresh table of the second round as they filled the first"
    );
}

pub fn sctp_udplite_and_portless_protocols() {
    let mut h = Harness::with(DatapathOptions::default(), "2905/sctp=m3ua,5060/udp=sip");
    // SCTP's common header starts with the two ports.
    let mut sctp = udp(40_000, 2905, &[0; 20]);
    sctp.truncate(12);
    sctp.extend([0u8; 16]);
    let (key, c) = only_flow(&h.ingress(&eth(ETH_IPV4, &[], &ipv4(132, &[], 0, &sctp))));
    assert_eq!(key, v4().proto(ipproto::SCTP).port(2905).build());
    assert_eq!(c, counted(20 + 28));

    // UDP-Lite shares UDP's header and UDP's service names.
    let frame = eth(ETH_IPV6, &[], &ipv6(136, &udp(40_000, 5060, &[0; 10])));
    let (key, _) = only_flow(&h.ingress(&frame));
    assert_eq!(key, v6().proto(ipproto::UDPLITE).port(5060).build());

    // GRE (47) has no ports: counted by protocol number, port 0, no flag.
    let frame = eth(ETH_IPV4, &[], &ipv4(47, &[], 0, &[0; 24]));
    let (key, c) = only_flow(&h.ingress(&frame));
    assert_eq!(key, v4().proto(47).build());
    assert_eq!(c, counted(44));
}

/// A DNS response header: id 1, QR + RD + RA, NOERROR, with these counts.
fn dns_header(questions: u16, answers: u16) -> Vec<u8> {
    let mut h = vec![0, 1, 0x81, 0x80];
    for count in [questions, answers, 0, 0] {
        h.extend_from_slice(&count.to_be_bytes());
    }
    h
}

/// "ok.test" A 198.18.1.1 (TTL 60), well formed.
fn dns_answer_ok() -> Vec<u8> {
    let mut m = dns_header(1, 1);
    m.extend_from_slice(b"\x02ok\x04test\x00\x00\x01\x00\x01");
    m.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 198, 18, 1, 1]);
    m
}

/// Hostile DNS and DHCP frames through the real kernel program: each is
/// counted exactly as any frame; each DNS or DHCP one is handed to the agent
/// (a TCP segment without payload is not); the agent's parsers refuse the
/// hostile ones without a panic and take the one good answer, and put a
/// long answer over TCP together from its three segments. A flood
/// beyond the rate is counted: every frame either handed or dropped, none
/// lost, and the traffic counted in full.
pub fn hostile_dns_and_dhcp_frames_are_counted_and_handed_over() {
    use ntm_agent::{
        kernel::observe::ObservedFrame,
        names::wire::{self, Fact},
    };
    use ntm_common::observe::{DropReason, Kind};
    let options = DatapathOptions {
        observe_rate: 50,
        observe_kinds: 0b11,
        ..Default::default()
    };
    let mut h = Harness::with(options, "53/udp=domain,53/tcp=domain");
    let mut observer = h.datapath.take_observer().expect("observation is on");

    let pointer_loop = {
        let mut m = dns_header(1, 0);
        m.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
        m
    };
    // Claims 65535 answers and has none.
    let huge_counts = {
        let mut m = dns_header(1, 65_535);
        m.extend_from_slice(b"\x02ok\x04test\x00\x00\x01\x00\x01");
        m
    };
    let truncated = dns_answer_ok()[..20].to_vec();
    // A record whose length says more than there is.
    let wrong_length = {
        let mut m = dns_answer_ok();
        let at = m.len() - 6;
        m[at] = 0xff;
        m
    };
    let garbage: Vec<u8> = (0..1900u32).map(|i| (i * 37 % 251) as u8).collect();
    let mut tcp_ok = (dns_answer_ok().len() as u16).to_be_bytes().to_vec();
    tcp_ok.extend(dns_answer_ok());
    let hostile_udp = [
        dns_answer_ok(),
        pointer_loop,
        huge_counts,
        truncated,
        wrong_length,
        garbage.clone(),
        Vec::new(),
    ];
    let mut handed = 0;
    for payload in &hostile_udp {
        let frame = eth(ETH_IPV4, &[], &ipv4(17, &[], 0, &udp(53, 40_000, payload)));
        let (key, c) = only_flow(&h.ingress(&frame));
        assert_eq!((key.proto, key.port), (17, 53));
        assert_eq!(c, counted(20 + 8 + payload.len() as u64));
        handed += 1;
    }
    let dhcp = eth(
        ETH_IPV4,
        &[],
        &ipv4(17, &[], 0, &udp(68, 67, &garbage[..300])),
    );
    assert_eq!(only_flow(&h.ingress(&dhcp)).1, counted(20 + 8 + 300));
    handed += 1;
    let over_tcp = eth(
        ETH_IPV4,
        &[],
        &ipv4(6, &[], 0, &tcp(53, 40_000, &[], &tcp_ok)),
    );
    assert_eq!(
        only_flow(&h.ingress(&over_tcp)).1,
        counted(20 + 20 + tcp_ok.len() as u64)
    );
    handed += 1;
    // A long answer (100 records, 1.7 KB) in three segments, the last one
    // before the middle one: handed over one by one, put together by the
    // agent.
    let long = {
        let mut m = dns_header(1, 100);
        m.extend_from_slice(b"\x04long\x04test\x00\x00\x01\x00\x01");
        for i in 0..100u8 {
            m.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 198, 18, 3, i]);
        }
        let mut framed = (m.len() as u16).to_be_bytes().to_vec();
        framed.extend(m);
        framed
    };
    let third = long.len() / 3;
    for (at, piece) in [
        (0, &long[..third]),
        (2 * third, &long[2 * third..]),
        (third, &long[third..2 * third]),
    ] {
        let mut segment = tcp(53, 40_001, &[], piece);
        segment[4..8].copy_from_slice(&(1_000 + at as u32).to_be_bytes());
        let frame = eth(ETH_IPV4, &[], &ipv4(6, &[], 0, &segment));
        assert_eq!(
            only_flow(&h.ingress(&frame)).1,
            counted(20 + 20 + piece.len() as u64)
        );
        handed += 1;
    }
    // No payload: nothing to hand over.
    let empty_tcp = eth(ETH_IPV4, &[], &ipv4(6, &[], 0, &tcp(53, 40_000, &[], &[])));
    assert_eq!(only_flow(&h.ingress(&empty_tcp)).1, counted(40));
    // Queries are not handed over either: only answers name anything.
    let query = eth(ETH_IPV4, &[], &ipv4(17, &[], 0, &udp(40_000, 53, &[0; 30])));
    assert_eq!(only_flow(&h.ingress(&query)).1, counted(58));

    let mut records = Vec::new();
    observer.read_now(&mut records);
    assert_eq!(records.len(), handed, "one record per DNS or DHCP frame");
    let mut answers = Vec::new();
    let mut refused = 0;
    let mut reader = wire::WireReader::default();
    for record in &records {
        let frame = ObservedFrame::from_record(record).expect("a record as the kernel writes them");
        assert_eq!(frame.bytes.len() as u32, frame.frame_len, "copied whole");
        match reader.facts(&frame, std::time::Instant::now()) {
            Ok(facts) => answers.extend(facts),
            Err(_) => refused += 1,
        }
    }
    let ok = Fact::Answer {
        client: "198.18.2.2".parse().unwrap(),
        address: "198.18.1.1".parse().unwrap(),
        name: "ok.test".into(),
        ttl: 60,
    };
    let (long, answers): (Vec<Fact>, Vec<Fact>) = answers
        .into_iter()
        .partition(|fact| matches!(fact, Fact::Answer { name, .. } if name == "long.test"));
    assert_eq!(
        answers,
        vec![ok.clone(), ok],
        "the good answer, over UDP and TCP"
    );
    assert_eq!(
        long.len(),
        wire::MAX_FACTS,
        "the long answer, whole once its three segments are: {long:?}"
    );
    assert!(refused >= 5, "hostile messages refused: {refused}");

    // A flood of 500 answers on one CPU, at a rate of 50 per second.
    let frame = eth(
        ETH_IPV4,
        &[],
        &ipv4(17, &[], 0, &udp(53, 40_000, &dns_answer_ok())),
    );
    let drained = h.run(TC_INGRESS_ETH, &frame, 0, 500);
    let (_, c) = only_flow(&drained);
    assert_eq!(c.packets, 500, "counting is unaffected");
    records.clear();
    while observer.read_now(&mut records) > 0 {}
    let dropped = observer.drops()[Kind::Dns as usize][DropReason::RateLimited as usize];
    assert_eq!(
        records.len() as u64 + dropped,
        500,
        "handed or counted as dropped"
    );
    // The frames above may have used some of this CPU's window already.
    assert!(
        (50 - handed..=100).contains(&records.len()),
        "within the rate (one or two one-second windows): {}",
        records.len()
    );
}

/// Which MAC sent from which address, learnt in the kernel when a flow
/// takes a flow-cache slot: at ingress, for IPv4 and IPv6; not at egress
/// (the source MAC is this machine's there), not for non-IP frames; a
/// device that moves to another MAC is followed; counting is unaffected.
pub fn source_macs_are_learnt_when_a_flow_takes_a_cache_slot() {
    let options = DatapathOptions {
        learn_macs: true,
        ..Default::default()
    };
    let mut h = Harness::with(options, "");
    let macs = h.datapath.take_macs().expect("MAC learning is on");
    let sent_from = [2, 0, 0, 0, 0, 1];
    let v4 = eth(
        ETH_IPV4,
        &[],
        &ipv4(17, &[], 0, &udp(40_000, 5300, &[0; 10])),
    );
    assert_eq!(only_flow(&h.run(TC_INGRESS_ETH, &v4, 0, 5)).1.packets, 5);
    let v6 = eth(ETH_IPV6, &[], &ipv6(17, &udp(40_000, 5300, &[0; 10])));
    only_flow(&h.ingress(&v6));
    let mut from_egress = v4.clone();
    from_egress[26..30].copy_from_slice(&[198, 18, 9, 9]);
    only_flow(&h.run(TC_EGRESS_ETH, &from_egress, 0, 1));
    h.ingress(&arp_request());
    let mut learnt = macs.read();
    learnt.sort();
    assert_eq!(
        learnt,
        vec![
            ("198.18.1.1".parse().unwrap(), sent_from),
            ("2001:2::1".parse().unwrap(), sent_from),
        ]
    );
    // The same address from another MAC (a new network card, or a MAC
    // privacy setting): the table follows. The flow is new in the cache
    // after the drain above swapped it.
    let mut moved = v4.clone();
    moved[11] = 0x77;
    only_flow(&h.ingress(&moved));
    let learnt = macs.read();
    assert!(
        learnt.contains(&("198.18.1.1".parse().unwrap(), [2, 0, 0, 0, 0, 0x77])),
        "{learnt:?}"
    );
}

/// While nearly every frame misses its flow-cache slot (a flood of new
/// flows), the agent turns the cache off and the programs count into the
/// table directly; with few flows again it turns it back on. Every packet
/// is counted exactly in each interval, whichever way it went, and a
/// source MAC is learnt with the cache off too (when its flow takes a
/// table entry).
pub fn the_flow_cache_steps_aside_while_nearly_every_frame_misses_it() {
    let options = DatapathOptions {
        learn_macs: true,
        ..Default::default()
    };
    let mut h = Harness::with(options, "");
    let macs = h.datapath.take_macs().expect("MAC learning is on");
    // One CPU: its misses are then all the misses.
    let _cpu = crate::kit::OnOneCpu::new();
    let mut seen = Vec::new();
    // 20,000 flows of one frame each, twice; then 100 flows of 200 frames,
    // twice. The third round's source MAC is another, to be learnt while
    // the cache is off: its flows (from other addresses) are new, and take
    // entries in the table (which keeps the flows that sent in its turn
    // before, the first round's: a flow's MAC is learnt when it takes an
    // entry, not at each frame).
    for (round, (flows, each)) in [(20_000u32, 1u32), (20_000, 1), (100, 200), (100, 200)]
        .into_iter()
        .enumerate()
    {
        let mut frame = eth(
            ETH_IPV4,
            &[],
            &ipv4(17, &[], 0, &udp(40_000, 1000, &[0; 12])),
        );
        if round == 2 {
            frame[11] = 0x55;
        }
        let base: u32 = if round < 2 { 0xC612_0000 } else { 0xC613_0000 };
        let mut expected = Counters::default();
        for i in 0..flows {
            frame[26..30].copy_from_slice(&(base | i).to_be_bytes());
            let prog = h.datapath.tc_program(TC_INGRESS_ETH).unwrap();
            let mut opts = TestRunOptions::new();
            opts.data_in = Some(&frame);
            opts.repeat = each;
            prog.test_run(opts).unwrap();
            expected.add(&Counters {
                bytes: 40 * each as u64,
                packets: each as u64,
            });
        }
        let d = h.tables.drain().unwrap();
        assert_eq!(d.flows.len(), flows as usize, "round {round}");
        assert!(d.outside.is_empty(), "round {round}: {:?}", d.outside);
        assert_eq!(d.total(), expected, "round {round}");
        assert!(
            d.flows.iter().all(|(_, c)| c.packets == each as u64),
            "round {round}: a flow's packets split or lost"
        );
        seen.push((d.flow_cache.on, d.flow_cache.misses));
        if round == 2 {
            let learnt = macs.read();
            let address: std::net::IpAddr = "198.19.0.7".parse().unwrap();
            assert!(
                learnt.contains(&(address, [2, 0, 0, 0, 0, 0x55])),
                "a MAC learnt with the cache off: {:?}",
                learnt.iter().find(|(a, _)| *a == address)
            );
        }
    }
    assert_eq!(
        seen,
        [(true, 20_000), (false, 0), (false, 0), (true, 100)],
        "(cache on, misses) per round: off after a round that missed every frame, on again after one of 100 flows"
    );
}

/// A drained table keeps, zeroed, the entries of the flows that sent in its
/// turn, so that in its next turn they are looked up, not inserted again;
/// an entry that stayed zero for a whole turn is deleted; after a turn in
/// which the table was full, every entry is. Counts stay exact throughout.
pub fn a_drained_table_keeps_the_flows_that_sent_and_drops_the_rest() {
    let mut h = Harness::new();
    // One CPU: its flow cache is then the only one.
    let _cpu = crate::kit::OnOneCpu::new();
    let table = ntm_common::DEFAULT_FLOW_TABLE_ENTRIES as usize;
    // One frame from each of the sources `flows` (numbered in
    // 198.0.0.0/8; a flow is keyed by its addresses and the service port,
    // here 1000 for all); then a drain, whose counts must be exactly these.
    let mut round = |flows: std::ops::Range<u32>| -> Drained {
        let mut frame = eth(
            ETH_IPV4,
            &[],
            &ipv4(17, &[], 0, &udp(40_000, 1000, &[0; 12])),
        );
        let mut expected = Counters::default();
        for i in flows.clone() {
            frame[26..30].copy_from_slice(&(0xC600_0000 | i).to_be_bytes());
            let prog = h.datapath.tc_program(TC_INGRESS_ETH).unwrap();
            let mut opts = TestRunOptions::new();
            opts.data_in = Some(&frame);
            prog.test_run(opts).unwrap();
            expected.add(&counted(40));
        }
        let d = h.tables.drain().unwrap();
        assert_eq!(d.total(), expected, "flows {flows:?}");
        assert!(d.flows.iter().all(|(_, c)| *c == counted(40)));
        d
    };
    // Tables A and B take turns. The first round (A) misses the cache with
    // every frame: the cache is off from then on, while rounds keep more
    // flows than it would hold and fewer frames than make it worth a try.
    round(100_000..120_000);
    // B: 2,000 new flows.
    let d = round(0..2_000);
    assert_eq!((d.flows.len(), d.table_entries), (2_000, 2_000));
    assert!(!d.flow_cache.on, "the cache is off: {:?}", d.flow_cache);
    // A: the same 2,000, new to A; the first round's flows it kept stayed
    // unused and go.
    let d = round(0..2_000);
    assert_eq!(d.flows.len(), 2_000);
    assert!(d.table_entries > 2_000, "{}", d.table_entries);
    // B kept its 2,000: 1,500 of them send, 500 stay unused and go.
    let d = round(0..1_500);
    assert_eq!((d.flows.len(), d.table_entries), (1_500, 2_000));
    // A kept its 2,000 too.
    let d = round(0..1_500);
    assert_eq!((d.flows.len(), d.table_entries), (1_500, 2_000));
    // B holds the 1,500 that sent.
    let d = round(0..1_500);
    assert_eq!((d.flows.len(), d.table_entries), (1_500, 1_500));
    assert!(!d.flow_cache.on, "the cache is off: {:?}", d.flow_cache);
    // A: 1,500 kept and more new flows than the rest of the table holds.
    let flood = table as u32 + 5_000;
    let d = round(200_000..200_000 + flood);
    assert_eq!(d.table_entries, table);
    let outside = d.outside.total(OutsideReason::TableFull);
    assert_eq!(
        outside.packets as usize,
        flood as usize - (table - 1_500),
        "the kept 1,500 took their room"
    );
    // B: nothing sent; its 1,500 stay unused and go.
    let d = round(0..0);
    assert_eq!((d.flows.len(), d.table_entries), (0, 1_500));
    let d = round(0..0);
    assert_eq!(
        (d.flows.len(), d.table_entries),
        (0, 0),
        "after a full turn the table keeps nothing"
    );
    let d = round(0..0);
    assert_eq!(d.table_entries, 0, "nor does the other, once drained empty");
}

/// 100,000 SYNs from random sources through the real program (a SYN flood
/// of spoofed sources): the handshake table takes its bound and not one
/// more, every other SYN is counted as having found it full, a second wave
/// finds it full too, and every frame is still counted exactly.
pub fn a_syn_flood_cannot_grow_the_handshake_table() {
    use ntm_common::handshake::HANDSHAKE_ENTRIES;
    const SYNS: u32 = 100_000;
    let options = DatapathOptions {
        track_handshakes: true,
        ..Default::default()
    };
    let mut h = Harness::with(options, "443/tcp=https");
    let mut handshakes = h.datapath.take_handshakes().expect("handshakes followed");
    // One CPU: a preallocated table's free entries are then all on it.
    let _cpu = crate::kit::OnOneCpu::new();
    let mut syn = eth(ETH_IPV4, &[], &ipv4(6, &[], 0, &tcp(40_000, 443, &[], &[])));
    let flags = 14 + 20 + 13;
    syn[flags] = 0x02;
    // Distinct pseudo-random sources: an odd multiplier is a bijection of
    // the 32-bit numbers.
    let source = |i: u32| i.wrapping_mul(0x9E37_79B1) ^ 0x5A5A_0000;
    let mut expected = Counters::default();
    for wave in 0..2u32 {
        for i in 0..SYNS {
            syn[26..30].copy_from_slice(&source(i + wave * SYNS).to_be_bytes());
            let prog = h.datapath.tc_program(TC_INGRESS_ETH).unwrap();
            let mut opts = TestRunOptions::new();
            opts.data_in = Some(&syn);
            prog.test_run(opts).unwrap();
            expected.add(&Counters {
                bytes: 40,
                packets: 1,
            });
        }
        let counts = handshakes
            .drain(ntm_agent::sys::process::monotonic_ns())
            .unwrap();
        let took = if wave == 0 { HANDSHAKE_ENTRIES } else { 0 };
        assert_eq!(
            counts.no_room,
            (SYNS - took) as u64,
            "wave {wave}: {counts:?}"
        );
        // None has ended: each waits for its SYN-ACK (or 10 s).
        assert!(counts.ended.is_empty(), "wave {wave}");
    }
    let d = h.tables.drain().unwrap();
    let mut total = Counters::default();
    for (_, c) in &d.flows {
        total.add(c);
    }
    total.add(&d.outside.total(OutsideReason::TableFull));
    assert_eq!(total, expected);
}

/// A handshake through the real program, frame by frame: the SYN-ACK
/// opens its gate slot (one handshake waits for its client's ACK), a bare
/// ACK that acknowledges something else leaves it waiting, the client's
/// ACK of the SYN-ACK closes it and the agent takes the handshake; a second
/// handshake whose ACK never comes is given up by the agent after 10 s,
/// which closes its slot through the gate's shared memory.
pub fn a_handshake_holds_its_gate_open_until_its_client_acks() {
    use ntm_agent::kernel::handshakes::Outcome;
    let options = DatapathOptions {
        track_handshakes: true,
        ..Default::default()
    };
    let mut h = Harness::with(options, "443/tcp=https");
    let mut handshakes = h.datapath.take_handshakes().expect("handshakes followed");
    let segment = |client_port: u16, from_client: bool, flags: u8, seq: u32, ack: u32| {
        let (sport, dport) = if from_client {
            (client_port, 443)
        } else {
            (443, client_port)
        };
        let mut f = eth(
            ETH_IPV4,
            &[],
            &ipv4(6, &[], 0, &tcp(sport, dport, &[], &[])),
        );
        if !from_client {
            let (src, dst) = (f[26..30].to_vec(), f[30..34].to_vec());
            f[26..30].copy_from_slice(&dst);
            f[30..34].copy_from_slice(&src);
        }
        f[38..42].copy_from_slice(&seq.to_be_bytes());
        f[42..46].copy_from_slice(&ack.to_be_bytes());
        f[47] = flags;
        f
    };
    let mut run = |frame: Vec<u8>| {
        h.ingress(&frame);
    };
    let now = ntm_agent::sys::process::monotonic_ns;
    assert_eq!(handshakes.waiting(), 0);
    run(segment(40_001, true, 0x02, 1000, 0));
    assert_eq!(handshakes.waiting(), 0, "a SYN alone opens nothing");
    run(segment(40_001, false, 0x12, 5000, 1001));
    assert_eq!(handshakes.waiting(), 1, "the SYN-ACK opens its slot");
    run(segment(40_001, true, 0x10, 1001, 4242));
    assert_eq!(handshakes.waiting(), 1, "an ACK of something else");
    run(segment(40_001, true, 0x10, 1001, 5001));
    assert_eq!(handshakes.waiting(), 0, "the client's ACK closes it");
    let taken = handshakes.drain(now()).unwrap();
    assert!(
        matches!(
            taken.ended[..],
            [(key, Outcome::Established { server: Some(_), client: Some(_) })]
                if key.client_port == 40_001 && key.server_port == 443
        ),
        "{taken:?}"
    );

    run(segment(40_002, true, 0x02, 1000, 0));
    run(segment(40_002, false, 0x12, 5000, 1001));
    assert_eq!(handshakes.waiting(), 1);
    let taken = handshakes.drain(now()).unwrap();
    assert!(taken.ended.is_empty(), "still waiting: {taken:?}");
    let later = now() + 11_000_000_000;
    let taken = handshakes.drain(later).unwrap();
    assert_eq!((taken.ended.len(), taken.ack_unseen), (0, 1), "{taken:?}");
    assert_eq!(handshakes.waiting(), 0, "the agent closed its slot");
}

/// A real ClientHello (`openssl s_client`) to a port that is no TLS port,
/// and real QUIC v1 and v2 Initials (aioquic), over IPv4 and IPv6, go
/// through the real kernel program: each is handed to the agent by its
/// first bytes (and names its server there), each counted exactly; an
/// ordinary segment with data, a bare ACK, a large UDP datagram that is no
/// Initial and a short one that begins like one are not handed over. With
/// TLS observation off, none is.
pub fn client_hellos_and_quic_initials_are_handed_over_by_their_first_bytes() {
    use ntm_agent::kernel::observe::ObservedFrame;
    use ntm_agent::names::{
        source::Source,
        wire::{Fact, WireReader},
    };
    use ntm_common::observe::Kind;

    let hello = crate::kit::hello::openssl_client_hello("tls.example");
    let initials: Vec<Vec<u8>> = [1, 2]
        .iter()
        .map(|&v| crate::kit::hello::aioquic_initials("quic.example", v, 0).remove(0))
        .collect();
    let mut app_data = vec![0x17, 3, 3, 0, 100];
    app_data.extend([9u8; 100]);
    let mut short_initial = initials[0][..100].to_vec();
    short_initial[0] = 0xc0;
    let l4s: Vec<(u8, Vec<u8>, bool)> = vec![
        (6, tcp(40_000, 8_443, &[], &hello), true),
        (6, tcp(40_000, 8_443, &[], &app_data), false),
        (6, tcp(40_000, 8_443, &[], &[]), false),
        (17, udp(50_000, 4_433, &initials[0]), true),
        (17, udp(50_000, 4_433, &initials[1]), true),
        (17, udp(50_000, 4_433, &[0xc0; 1300]), false),
        (17, udp(50_000, 4_433, &short_initial), false),
    ];
    for tls_on in [true, false] {
        let kinds = if tls_on { 0b1111 } else { 0b11 };
        let options = DatapathOptions {
            observe_rate: 1000,
            observe_kinds: kinds,
            ..Default::default()
        };
        let mut h = Harness::with(options, "");
        let mut observer = h.datapath.take_observer().expect("observation is on");
        let mut handed = 0;
        for (proto, l4, named) in &l4s {
            for v6 in [false, true] {
                let (frame, l3_len) = if v6 {
                    (eth(ETH_IPV6, &[], &ipv6(*proto, l4)), 40 + l4.len())
                } else {
                    (eth(ETH_IPV4, &[], &ipv4(*proto, &[], 0, l4)), 20 + l4.len())
                };
                assert_eq!(
                    only_flow(&h.ingress(&frame)).1,
                    counted(l3_len as u64),
                    "proto {proto}, {} bytes, v6 {v6}",
                    l4.len()
                );
                handed += usize::from(*named && tls_on);
            }
        }
        let mut records = Vec::new();
        observer.read_now(&mut records);
        assert_eq!(records.len(), handed, "TLS on: {tls_on}");
        let mut reader = WireReader::default();
        let mut names = Vec::new();
        for record in &records {
            let frame = ObservedFrame::from_record(record).expect("a record");
            assert!(matches!(frame.kind, Kind::Tls | Kind::Quic));
            let facts = reader
                .facts(&frame, std::time::Instant::now())
                .unwrap_or_else(|e| panic!("{:?}: {e}", frame.kind));
            for fact in facts {
                let Fact::Server { name, source, .. } = fact else {
                    panic!("{fact:?}");
                };
                names.push((name, source));
            }
        }
        let expected: Vec<(String, Source)> = if tls_on {
            let tls = ("tls.example".to_string(), Source::TlsSni);
            let quic = ("quic.example".to_string(), Source::QuicSni);
            vec![
                tls.clone(),
                tls,
                quic.clone(),
                quic.clone(),
                quic.clone(),
                quic,
            ]
        } else {
            Vec::new()
        };
        assert_eq!(names, expected);
    }
}

/// A TCP segment from `sport` to 8443 with sequence number `seq`.
fn segment_at(sport: u16, seq: u32, data: &[u8]) -> Vec<u8> {
    let mut segment = tcp(sport, 8_443, &[], data);
    segment[4..8].copy_from_slice(&seq.to_be_bytes());
    segment
}

/// The server names the agent reads from the records handed over.
fn names_in(records: &[Vec<u8>]) -> Vec<(String, ntm_agent::names::source::Source)> {
    use ntm_agent::kernel::observe::ObservedFrame;
    use ntm_agent::names::wire::{Fact, WireReader};
    let mut reader = WireReader::default();
    let mut names = Vec::new();
    for record in records {
        let frame = ObservedFrame::from_record(record).expect("a record");
        let facts = reader
            .facts(&frame, std::time::Instant::now())
            .unwrap_or_else(|e| panic!("{:?}: {e}", frame.kind));
        for fact in facts {
            match fact {
                Fact::Server { name, source, .. } => names.push((name, source)),
                other => panic!("{other:?}"),
            }
        }
    }
    names
}

/// Pins this thread to the CPU it runs on until dropped, for the per-CPU
/// rate: BPF_PROG_TEST_RUN runs the program on the caller's CPU.
struct PinnedCpu(libc::cpu_set_t);

impl PinnedCpu {
    fn here() -> Self {
        // SAFETY: plain libc calls on this thread with sets of the right
        // size; `before` is written by sched_getaffinity before it is read.
        unsafe {
            let mut before: libc::cpu_set_t = std::mem::zeroed();
            let size = std::mem::size_of::<libc::cpu_set_t>();
            assert_eq!(libc::sched_getaffinity(0, size, &mut before), 0);
            let mut one: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(libc::sched_getcpu() as usize, &mut one);
            assert_eq!(libc::sched_setaffinity(0, size, &one), 0);
            PinnedCpu(before)
        }
    }
}

impl Drop for PinnedCpu {
    fn drop(&mut self) {
        // SAFETY: as above; the set is the one sched_getaffinity gave.
        unsafe {
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &self.0);
        }
    }
}

/// A ClientHello over several segments, as XDP, an ingress without GRO or
/// a sender without segmentation offload sees one (a post-quantum hello
/// is some 1.8 KB): the first segment is picked out by its first bytes and
/// the segments that continue it are handed over too, in any order, and
/// the agent names the server from them: over IPv4 and IPv6, at TC and at
/// XDP; sequence numbers that wrap. The
/// connection's data after its hello is not handed over, nor another
/// connection's. Counting is exact.
pub fn a_client_hello_over_several_segments_is_followed_to_its_end() {
    use ntm_agent::names::source::Source;
    use ntm_common::observe::Kind;

    let hello = crate::kit::hello::large_openssl_client_hello("split.example");
    let third = hello.len() / 3;
    // The first segment first (it is what the kernel knows a hello by),
    // then the last, then the middle one.
    let pieces = [
        (0, &hello[..third]),
        (2 * third, &hello[2 * third..]),
        (third, &hello[third..2 * third]),
    ];
    let app_data = [0x17u8; 200];
    let options = DatapathOptions {
        observe_rate: 1000,
        observe_kinds: 0b1111,
        ..Default::default()
    };
    let mut h = Harness::with(options, "");
    let mut observer = h.datapath.take_observer().expect("observation is on");
    type Shape = (&'static str, fn(&[u8]) -> (Vec<u8>, usize), bool);
    let shapes: [Shape; 3] = [
        (
            "IPv4",
            |l4| (eth(ETH_IPV4, &[], &ipv4(6, &[], 0, l4)), 20 + l4.len()),
            false,
        ),
        (
            "IPv4 at XDP",
            |l4| (eth(ETH_IPV4, &[], &ipv4(6, &[], 0, l4)), 20 + l4.len()),
            true,
        ),
        (
            "IPv6",
            |l4| (eth(ETH_IPV6, &[], &ipv6(6, l4)), 40 + l4.len()),
            false,
        ),
    ];
    // The hello's sequence numbers wrap past 2^32.
    let start = u32::MAX - 1_000;
    for (i, (shape, frame_of, xdp)) in shapes.iter().enumerate() {
        let sport = 41_000 + i as u16;
        let mut segments: Vec<Vec<u8>> = pieces
            .iter()
            .map(|(at, piece)| segment_at(sport, start.wrapping_add(*at as u32), piece))
            .collect();
        // The data after the hello, and another connection's data.
        segments.push(segment_at(
            sport,
            start.wrapping_add(hello.len() as u32),
            &app_data,
        ));
        segments.push(segment_at(sport + 100, start, &app_data));
        // Sent without a drain between them, so that the connection holds
        // its cache slot: a segment that may continue the hello must still
        // take the full path (the first one left the slot watched).
        let mut bytes = 0;
        for segment in &segments {
            let (frame, l3_len) = frame_of(segment);
            bytes += l3_len as u64;
            if *xdp {
                h.xdp_once(&frame);
            } else {
                assert_eq!(run_once(&mut h, TC_INGRESS_ETH, &frame, 0), -1);
            }
        }
        let drained = h.tables.drain().expect("drain");
        let counted_now: Counters =
            drained
                .flows
                .iter()
                .fold(Counters::default(), |mut all, (_, c)| {
                    all.add(c);
                    all
                });
        assert_eq!(
            counted_now,
            Counters {
                bytes,
                packets: segments.len() as u64
            },
            "{shape}: {:?}",
            drained.flows
        );
        let mut records = Vec::new();
        observer.read_now(&mut records);
        assert_eq!(records.len(), 3, "{shape}: the hello's three segments only");
        for record in &records {
            let frame = ntm_agent::kernel::observe::ObservedFrame::from_record(record).unwrap();
            assert_eq!(frame.kind, Kind::Tls, "{shape}");
        }
        assert_eq!(
            names_in(&records),
            vec![("split.example".to_string(), Source::TlsSni)],
            "{shape}"
        );
    }

    // Hellos that lie about their lengths, each a first segment and the
    // segment after it: a record of 65,535 bytes holding a message of
    // 16 MB, a record of length 0, a message longer than its record. The
    // kernel follows each within its bounds (16 KiB), counting is exact,
    // and the agent names nothing from them.
    let lying = |record: u16, message: u32| {
        let mut first = hello[..600].to_vec();
        first[3..5].copy_from_slice(&record.to_be_bytes());
        first[6..9].copy_from_slice(&message.to_be_bytes()[1..]);
        first
    };
    let mut records = Vec::new();
    for (i, first) in [lying(u16::MAX, 0xff_ffff), lying(0, 500), lying(600, 5_000)]
        .iter()
        .enumerate()
    {
        let sport = 42_000 + i as u16;
        for segment in [
            segment_at(sport, 9, first),
            segment_at(sport, 9 + first.len() as u32, &hello[600..1200]),
        ] {
            let frame = eth(ETH_IPV4, &[], &ipv4(6, &[], 0, &segment));
            assert_eq!(
                only_flow(&h.ingress(&frame)).1,
                counted(20 + segment.len() as u64)
            );
        }
        observer.read_now(&mut records);
    }
    assert_eq!(records.len(), 6, "each lying hello's two segments");
    let mut reader = ntm_agent::names::wire::WireReader::default();
    for record in &records {
        let frame = ntm_agent::kernel::observe::ObservedFrame::from_record(record).unwrap();
        if let Ok(facts) = reader.facts(&frame, std::time::Instant::now()) {
            assert!(facts.is_empty(), "named from a lying hello: {facts:?}");
        }
    }
}

/// 10,000 half ClientHellos from as many connections, each a first
/// segment whose record claims 2.5 KB that never come: every frame is
/// counted; the kernel follows them in its fixed table of slots, which
/// nothing grows; they are handed over within the TLS rate and while the
/// ring is less than half full (the rest counted as dropped), so that a
/// DNS answer among them is still handed over; once the rate's second has
/// passed, a whole hello in three segments is followed and named.
pub fn half_client_hellos_cannot_grow_the_kernel_state_nor_starve_dns() {
    use ntm_agent::names::source::Source;
    use ntm_common::observe::{DropReason, Kind};

    let _pinned = PinnedCpu::here();
    let hello = crate::kit::hello::large_openssl_client_hello("whole.example");
    let half = &hello[..600];
    let options = DatapathOptions {
        observe_rate: 2000,
        observe_kinds: 0b1111,
        ..Default::default()
    };
    let mut h = Harness::with(options, "53/udp=domain");
    let mut observer = h.datapath.take_observer().expect("observation is on");
    const FLOOD: u64 = 10_000;
    for i in 0..FLOOD {
        let sport = 20_000 + i as u16;
        let frame = eth(ETH_IPV4, &[], &ipv4(6, &[], 0, &segment_at(sport, 7, half)));
        h.send(&frame);
    }
    let drained = h.tables.drain().expect("drain");
    assert_eq!(
        only_flow(&drained).1,
        Counters {
            bytes: FLOOD * (20 + 20 + half.len() as u64),
            packets: FLOOD
        },
        "every half hello counted"
    );
    let dns = eth(
        ETH_IPV4,
        &[],
        &ipv4(17, &[], 0, &udp(53, 40_000, &dns_answer_ok())),
    );
    assert_eq!(
        only_flow(&h.ingress(&dns)).1,
        counted(28 + dns_answer_ok().len() as u64)
    );
    let mut records = Vec::new();
    while observer.read_now(&mut records) > 0 {}
    let kinds: Vec<Kind> = records
        .iter()
        .map(|r| {
            ntm_agent::kernel::observe::ObservedFrame::from_record(r)
                .unwrap()
                .kind
        })
        .collect();
    let tls = kinds.iter().filter(|k| **k == Kind::Tls).count() as u64;
    assert_eq!(
        kinds.len() as u64 - tls,
        1,
        "the DNS answer was handed over"
    );
    let drops = observer.drops()[Kind::Tls as usize];
    let (rate_limited, ring_full) = (
        drops[DropReason::RateLimited as usize],
        drops[DropReason::RingFull as usize],
    );
    assert_eq!(
        tls + rate_limited + ring_full,
        FLOOD,
        "handed over or counted as dropped"
    );
    let half_ring = ntm_common::observe::RING_BYTES as u64 / 2;
    let most = half_ring / ntm_common::observe::RECORD_BYTES as u64 + 1;
    assert!(
        tls <= most && ring_full > 0,
        "hellos take at most half the ring: {tls} handed over, {ring_full} dropped for it"
    );
    assert!(
        observer.drops()[Kind::Dns as usize].iter().all(|d| *d == 0),
        "no DNS answer dropped"
    );

    // A new rate window: a whole hello is followed, wherever its slot was.
    std::thread::sleep(std::time::Duration::from_millis(1_100));
    let third = hello.len() / 3;
    for (at, piece) in [
        (0, &hello[..third]),
        (third, &hello[third..2 * third]),
        (2 * third, &hello[2 * third..]),
    ] {
        let frame = eth(
            ETH_IPV4,
            &[],
            &ipv4(6, &[], 0, &segment_at(19_999, 1_000 + at as u32, piece)),
        );
        assert_eq!(
            only_flow(&h.ingress(&frame)).1,
            counted(40 + piece.len() as u64)
        );
    }
    records.clear();
    while observer.read_now(&mut records) > 0 {}
    assert_eq!(records.len(), 3, "the whole hello's segments");
    assert_eq!(
        names_in(&records),
        vec![("whole.example".to_string(), Source::TlsSni)]
    );
}
