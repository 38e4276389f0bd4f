//! tcpdump filters in the kernel, differentially: for thousands of (filter,
//! frame) pairs the kernel's verdict (the real programs, run with
//! BPF_PROG_TEST_RUN, read back as what they counted) equals libpcap's own
//! verdict (`pcap_offline_filter`) on the same bytes, for Ethernet frames at
//! TC and XDP and for raw-IP frames at TC. Counts stay exact: matching
//! frames are counted as without a filter, the others only as `filtered`,
//! with the same bytes.

use crate::kit::frames::*;
use aya::programs::{TestRun, TestRunOptions};
use ntm_agent::{
    filter::{Filter, pcap},
    kernel::{
        drain::{Drained, FlowTables},
        load::{Datapath, DatapathOptions},
    },
};
use ntm_common::{Counters, OutsideReason, programs::LinkType};

/// Filters: the README's examples (on the test ranges), every primitive
/// family, arithmetic and boolean structure.
const FILTERS: &[&str] = &[
    "src net 198.18.1.0/24 or dst net 198.18.1.0/24",
    "src net 192.168.0.0/24 or dst net 192.168.0.0/24",
    "ip",
    "ip6",
    "arp",
    "tcp",
    "udp",
    "icmp",
    "icmp6",
    "not ip",
    "ip and not icmp",
    "not (tcp or udp)",
    "host 198.18.1.1",
    "src host 198.18.1.1",
    "dst host 198.18.2.2",
    "src host 198.18.2.2 and dst host 198.18.1.1",
    "net 198.18.0.0/15",
    "dst net 198.19.0.0/16",
    "host 2001:2::1",
    "net 2001:2::/48",
    "src net 2001:2::/64 and udp",
    "port 53",
    "tcp port 443",
    "udp dst port 53",
    "src port 5000",
    "portrange 1000-2000",
    "tcp portrange 1-1023",
    "udp portrange 40000-65535",
    "ip6 and tcp port 80",
    "ip proto 47",
    "ip proto 132",
    "ip6 proto 17",
    "tcp[tcpflags] & tcp-syn != 0",
    "tcp[tcpflags] & (tcp-syn|tcp-ack) == tcp-syn",
    "tcp[13] & 1 != 0",
    "icmp[icmptype] == icmp-echo",
    "icmp[icmptype] != icmp-echoreply",
    "icmp6 and ip6[40] == 128",
    "less 100",
    "greater 200",
    "len > 60 and len < 1000",
    "ip[2:2] > 100",
    "ip[8] < 64",
    "ip[6:2] & 0x1fff != 0",
    "ip[6:2] & 0x3fff = 0 and udp",
    "ip[0] & 0xf > 5",
    "ip[1] & 0xfc == 0xb8",
    "(ip[2:2] - ((ip[0]&0xf)<<2)) > 20",
    "ip[2:2] * 2 / 3 > 50",
    "ip[2:2] % 7 == 3",
    "ip[2:2] >> 3 > 10",
    "ip[2:2] << 1 > 200",
    "ip[2:2] ^ 0xff > 100",
    "ip[8] - 1 > 60",
    "(ip[2:2] & 0xf0 | 0x1) > 10",
    "ip[2:2] / (ip[8] - 64) > 1",
    "ip[2:2] % (ip[9] - 6) > 1",
    "ip[2:2] << (ip[8] & 0x3f) > 0",
    "ip[2:2] >> (ip[15] & 0x3f) > 0",
    "-ip[8] > 100",
    "ip[9] = 17 and udp[4:2] > 20",
    "udp[8:4] = 0x47455420",
    "tcp[((tcp[12]&0xf0)>>2):4] = 0x47455420",
    "ip6[6] == 6 or ip6[6] == 17",
    "ether[0] & 1 != 0",
    "ether broadcast",
    "ether multicast",
    "ether host 02:00:00:00:00:02",
    "ether src 02:00:00:00:00:01 and ip",
    "ether proto 0x88cc",
    "ether[12:2] = 0x8100",
    "ether[14:4] = 0x00640800",
    "vlan",
    "vlan 100",
    "vlan and ip",
    "vlan 100 and udp port 53",
    "vlan and vlan 200",
    "ip multicast",
    "ip6 multicast",
    "tcp or (udp and not port 53) or icmp6",
    "ip6 protochain 6",
    "ip6 protochain 17",
    "protochain 58",
    "ip protochain 17",
];

/// A small deterministic generator: the corpus is the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn v4(src: [u8; 4], dst: [u8; 4], proto: u8, options: &[u8], frag: u16, l4: &[u8]) -> Vec<u8> {
    let mut p = ipv4(proto, options, frag, l4);
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&dst);
    p
}

fn v6(next: u8, l4: &[u8], swap: bool) -> Vec<u8> {
    let mut p = ipv6(next, l4);
    if swap {
        p[8..24].copy_from_slice(&DST6);
        p[24..40].copy_from_slice(&SRC6);
    }
    p
}

fn tcp_flags(sport: u16, dport: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut t = tcp(sport, dport, &[], payload);
    t[13] = flags;
    t
}

/// IP packets (no link header) covering the filters above.
fn ip_packets() -> Vec<Vec<u8>> {
    let other = [198, 19, 7, 9];
    let bcast = [198, 18, 255, 255];
    let mcast = [239, 1, 2, 3];
    let get = b"GET / HTTP/1.1\r\n";
    let mut p = vec![
        v4(SRC4, DST4, 17, &[], 0, &udp(40000, 53, &[1; 20])),
        v4(DST4, SRC4, 17, &[], 0, &udp(53, 40000, &[2; 120])),
        v4(SRC4, other, 17, &[], 0, &udp(5000, 1500, b"GET xxxxxxxxx")),
        v4(SRC4, DST4, 17, &[], 0, &udp(1234, 443, &[0; 300])),
        v4(SRC4, bcast, 17, &[], 0, &udp(68, 67, &[0; 40])),
        v4(SRC4, mcast, 17, &[], 0, &udp(5353, 5353, &[0; 30])),
        v4(SRC4, DST4, 6, &[], 0, &tcp_flags(40001, 443, 0x02, &[])),
        v4(DST4, SRC4, 6, &[], 0, &tcp_flags(443, 40001, 0x12, &[])),
        v4(SRC4, DST4, 6, &[], 0, &tcp_flags(40001, 80, 0x18, get)),
        v4(SRC4, DST4, 6, &[], 0, &tcp_flags(40001, 22, 0x11, &[])),
        v4(
            other,
            DST4,
            6,
            &[],
            0,
            &tcp_flags(1500, 2000, 0x10, &[7; 700]),
        ),
        v4(SRC4, DST4, 1, &[], 0, &icmp(8, 0, &[0; 56])),
        v4(DST4, SRC4, 1, &[], 0, &icmp(0, 0, &[0; 56])),
        v4(SRC4, DST4, 1, &[], 0, &icmp(3, 3, &[0; 28])),
        v4(SRC4, DST4, 17, &[1, 1, 1, 0], 0, &udp(40000, 53, &[0; 10])),
        v4(
            SRC4,
            DST4,
            6,
            &[1, 1, 1, 1, 1, 1, 1, 0],
            0,
            &tcp(40002, 443, &[], &[]),
        ),
        v4(SRC4, DST4, 17, &[], 0x2000, &udp(40000, 53, &[0; 64])),
        v4(SRC4, DST4, 17, &[], 0x0008, &[0; 48]),
        v4(SRC4, DST4, 47, &[], 0, &[0, 0, 0x08, 0, 1, 2, 3, 4]),
        v4(SRC4, DST4, 132, &[], 0, &udp(36412, 36412, &[0; 16])),
        v6(17, &udp(40000, 53, &[0; 30]), false),
        v6(17, &udp(53, 40000, &[0; 90]), true),
        v6(6, &tcp_flags(40003, 80, 0x02, &[]), false),
        v6(6, &tcp_flags(40003, 443, 0x18, get), false),
        v6(58, &icmp(128, 0, &[0; 32]), false),
        v6(58, &icmp(129, 0, &[0; 32]), true),
        v6(58, &icmp(135, 0, &[0; 24]), false),
        v6(
            0,
            &ext_options(17, 1)
                .into_iter()
                .chain(udp(1, 2, &[0; 8]))
                .collect::<Vec<u8>>(),
            false,
        ),
        v6(
            44,
            &ext_fragment(17, 0, true)
                .into_iter()
                .chain(udp(40000, 53, &[0; 8]))
                .collect::<Vec<u8>>(),
            false,
        ),
    ];
    // A multicast IPv6 destination.
    let mut m = v6(17, &udp(5353, 5353, &[0; 20]), false);
    m[24] = 0xff;
    m[25] = 0x02;
    p.push(m);
    p
}

/// Ethernet frames: every IP packet untagged and tagged (VLAN 100, 200,
/// QinQ), non-IP frames, broadcast and multicast MACs, short frames, and
/// random mutations and truncations of all of them.
fn ethernet_frames(rng: &mut Rng) -> Vec<Vec<u8>> {
    let mut frames = Vec::new();
    for p in ip_packets() {
        let ethertype = if p[0] >> 4 == 6 { ETH_IPV6 } else { ETH_IPV4 };
        frames.push(eth(ethertype, &[], &p));
        frames.push(eth(ethertype, &[(TPID_8021Q, 100)], &p));
        frames.push(eth(ethertype, &[(TPID_8021Q, 200)], &p));
        frames.push(eth(ethertype, &[(TPID_8021AD, 200), (TPID_8021Q, 100)], &p));
    }
    frames.push(eth(ETH_ARP, &[], &arp_request()));
    frames.push(eth(0x88cc, &[], &[0; 46]));
    let mut broadcast = eth(ETH_ARP, &[], &arp_request());
    broadcast[..6].copy_from_slice(&[0xff; 6]);
    frames.push(broadcast);
    let mut multicast = eth(ETH_IPV4, &[], &ip_packets()[5]);
    multicast[..6].copy_from_slice(&[0x01, 0x00, 0x5e, 0x01, 0x02, 0x03]);
    frames.push(multicast);
    frames.push(eth(ETH_IPV4, &[], &[]));
    frames.push(eth(ETH_IPV4, &[], &[0x45, 0, 0, 20]));
    frames.push(eth(ETH_IPV6, &[], &[0x60, 0, 0]));
    let crafted = frames.len();
    for _ in 0..400 {
        let mut f = frames[rng.below(crafted)].clone();
        match rng.below(3) {
            0 => {
                let len = 14 + rng.below(f.len() - 13);
                f.truncate(len);
            }
            1 => {
                for _ in 0..1 + rng.below(4) {
                    let at = rng.below(f.len());
                    f[at] = rng.next() as u8;
                }
            }
            _ => {
                for _ in 0..1 + rng.below(3) {
                    let at = 14 + rng.below(f.len().saturating_sub(14).max(1));
                    if at < f.len() {
                        f[at] = rng.next() as u8;
                    }
                }
                let len = 14 + rng.below(f.len() - 13);
                f.truncate(len);
            }
        }
        frames.push(f);
    }
    frames
}

/// Raw-IP frames: the IP packets and random mutations of them (BPF_PROG_TEST_RUN
/// needs at least 14 bytes).
fn raw_ip_frames(rng: &mut Rng) -> Vec<Vec<u8>> {
    let mut frames: Vec<Vec<u8>> = ip_packets();
    frames.push(vec![0x45, 0, 0, 20, 0, 0, 0, 0, 64, 17, 0, 0, 198, 18]);
    frames.push(vec![0x20; 40]);
    let crafted = frames.len();
    for _ in 0..200 {
        let mut f = frames[rng.below(crafted)].clone();
        for _ in 0..1 + rng.below(4) {
            let at = rng.below(f.len());
            f[at] = rng.next() as u8;
        }
        if rng.below(2) == 0 {
            let len = 14 + rng.below(f.len() - 13);
            f.truncate(len);
        }
        frames.push(f);
    }
    frames
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Program {
    TcEthernet,
    TcRawIp,
    Xdp,
}

impl Program {
    fn link(self) -> LinkType {
        match self {
            Program::TcEthernet | Program::Xdp => LinkType::Ethernet,
            Program::TcRawIp => LinkType::RawIp,
        }
    }
}

struct Harness {
    datapath: Datapath,
    tables: FlowTables,
}

impl Harness {
    fn new() -> Self {
        let (datapath, tables) =
            Datapath::load(&DatapathOptions::default(), &[], None).expect("load");
        Self { datapath, tables }
    }

    /// Runs the frame; false if BPF_PROG_TEST_RUN refuses it (it wants the
    /// whole IP header of a frame whose EtherType says IP).
    fn try_run(&mut self, program: Program, frame: &[u8]) -> bool {
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        let result = match program {
            Program::TcEthernet | Program::TcRawIp => {
                let name = if program == Program::TcEthernet {
                    TC_INGRESS_ETH
                } else {
                    TC_INGRESS_L3
                };
                self.datapath.tc_program(name).expect("tc").test_run(opts)
            }
            Program::Xdp => self.datapath.xdp_program(XDP).expect("xdp").test_run(opts),
        };
        let Ok(result) = result else {
            return false;
        };
        let expected = if program == Program::Xdp { 2 } else { -1 };
        assert_eq!(
            result.return_value as i32, expected,
            "the frame must go on unchanged"
        );
        true
    }

    fn run(&mut self, program: Program, frame: &[u8]) {
        assert!(
            self.try_run(program, frame),
            "test_run of {frame:02x?} refused"
        );
    }

    fn filtered_packets(&mut self) -> u64 {
        self.tables
            .outside_undrained(OutsideReason::Filtered)
            .expect("read outside counters")
            .packets
    }

    fn drain(&mut self) -> Drained {
        // Twice: the first drain's swap leaves the other table to the next.
        let mut all = self.tables.drain().expect("drain");
        let more = self.tables.drain().expect("drain");
        all.flows.extend(more.flows);
        all.outside.merge(&more.outside);
        all
    }
}

fn counted(d: &Drained) -> Counters {
    let mut c = Counters::default();
    for (_, f) in &d.flows {
        c.add(f);
    }
    for r in OutsideReason::ALL {
        if r != OutsideReason::Filtered {
            c.add(&d.outside.total(r));
        }
    }
    c
}

/// Runs every frame of `frames` through `program` under every filter that
/// compiles for its link type; returns the number of pairs checked.
fn differential(h: &mut Harness, program: Program, frames: &[Vec<u8>]) -> usize {
    // What each frame counts as without a filter: the exact bytes a filtered
    // one must show up with.
    h.datapath.set_filter(None).expect("no filter");
    h.drain();
    let mut unfiltered = Vec::new();
    let mut runnable = Vec::new();
    for frame in frames {
        if !h.try_run(program, frame) {
            continue;
        }
        runnable.push(frame.clone());
        let d = h.drain();
        let c = counted(&d);
        assert_eq!(c.packets, 1, "{program:?} frame {frame:02x?} counted {c:?}");
        unfiltered.push(c);
    }

    let mut pairs = 0;
    let mut disagreements = Vec::new();
    for expression in FILTERS {
        let filter = Filter::compile(expression).unwrap_or_else(|e| panic!("{expression}: {e}"));
        let Ok(classic) = filter.program(program.link()) else {
            continue;
        };
        let classic = classic.to_vec();
        h.datapath
            .set_filter(Some(filter))
            .unwrap_or_else(|e| panic!("{expression} for {program:?}: {e}"));
        let mut expect_matched = Counters::default();
        let mut expect_filtered = Counters::default();
        for (frame, bytes) in runnable.iter().zip(&unfiltered) {
            let before = h.filtered_packets();
            h.run(program, frame);
            let kernel_matched = h.filtered_packets() == before;
            let libpcap_matched = pcap::offline_matches(&classic, frame);
            if kernel_matched != libpcap_matched {
                disagreements.push(format!(
                    "{program:?} {expression:?}: kernel {kernel_matched}, libpcap {libpcap_matched} on {frame:02x?}"
                ));
            }
            if libpcap_matched {
                expect_matched.add(bytes);
            } else {
                expect_filtered.add(bytes);
            }
            pairs += 1;
        }
        let d = h.drain();
        assert_eq!(
            counted(&d),
            expect_matched,
            "{program:?} {expression:?}: matching frames counted as without a filter"
        );
        assert_eq!(
            d.outside.total(OutsideReason::Filtered),
            expect_filtered,
            "{program:?} {expression:?}: the rest only as filtered, same bytes"
        );
    }
    assert!(
        disagreements.is_empty(),
        "{} of {pairs} verdicts differ from libpcap:\n{}",
        disagreements.len(),
        disagreements[..disagreements.len().min(20)].join("\n")
    );
    pairs
}

/// Run once per hook (`CASES` in `main.rs`: at_tc, at_xdp), each with
/// frames of its own seed.
pub fn kernel_verdicts_equal_libpcaps_on_ethernet_frames(hook: &str) {
    let (program, seed) = match hook {
        "at_tc" => (Program::TcEthernet, 0x5eed_0001),
        "at_xdp" => (Program::Xdp, 0x5eed_0002),
        _ => panic!("no hook {hook}"),
    };
    let mut h = Harness::new();
    let frames = ethernet_frames(&mut Rng(seed));
    let pairs = differential(&mut h, program, &frames);
    assert!(pairs > 10_000, "only {pairs} pairs");
    eprintln!("{pairs} (filter, frame) pairs agree");
}

pub fn kernel_verdicts_equal_libpcaps_on_raw_ip_frames() {
    let mut h = Harness::new();
    let frames = raw_ip_frames(&mut Rng(0x5eed_0003));
    let pairs = differential(&mut h, Program::TcRawIp, &frames);
    assert!(pairs > 5_000, "only {pairs} pairs");
    eprintln!("{pairs} (filter, frame) pairs agree");
}

/// A long filter (hundreds of classic instructions, as generated from a
/// list of hosts) passes the verifier and still agrees with libpcap.
pub fn a_long_filter_loads_and_agrees_with_libpcap() {
    let mut h = Harness::new();
    let hosts: Vec<String> = (0..120)
        .map(|i| format!("host 198.18.{}.{}", i / 50, i % 50 + 1))
        .collect();
    let expression = format!("udp and ({})", hosts.join(" or "));
    let filter = Filter::compile(&expression).expect("compiles");
    let classic = filter.program(LinkType::Ethernet).unwrap().to_vec();
    assert!(classic.len() > 200, "only {} instructions", classic.len());
    h.datapath
        .set_filter(Some(filter))
        .expect("the kernel takes it");
    let frames = ethernet_frames(&mut Rng(0x5eed_0004));
    let mut checked = 0;
    for frame in &frames {
        let before = h.filtered_packets();
        if !h.try_run(Program::TcEthernet, frame) {
            continue;
        }
        let kernel_matched = h.filtered_packets() == before;
        assert_eq!(
            kernel_matched,
            pcap::offline_matches(&classic, frame),
            "{frame:02x?}"
        );
        checked += 1;
    }
    assert!(checked > 300);
    eprintln!(
        "{} classic instructions, {checked} frames agree",
        classic.len()
    );
}
