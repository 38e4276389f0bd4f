//! Link types that BPF_PROG_TEST_RUN cannot show: a TUN device (frames start
//! at the IP header), and VLAN tags that the kernel has moved into skb
//! metadata before TC sees the frame.

use std::{fs::OpenOptions, io::Write, net::UdpSocket, os::fd::AsRawFd};

use crate::kit::{Netns, frames::*, send_raw};
use ntm_agent::kernel::{Kernel, drain::Drained};
use ntm_common::{Counters, FlowKey, Hook, OutsideReason, family, ipproto};

fn start_agent(iface: &str) -> Kernel {
    crate::kit::start_kernel(&["-i", iface])
}

fn flows_where(d: &Drained, pred: impl Fn(&FlowKey) -> bool) -> Vec<(FlowKey, Counters)> {
    d.flows.iter().copied().filter(|(k, _)| pred(k)).collect()
}

/// Opens the existing TUN device `name` (in this thread's namespace) without
/// packet-information headers: every write is one IP packet.
fn open_tun(name: &str) -> std::fs::File {
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    const IFF_TUN: libc::c_short = 0x0001;
    const IFF_NO_PI: libc::c_short = 0x1000;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .expect("/dev/net/tun");
    // SAFETY: TUNSETIFF with a zeroed ifreq carrying a short, NUL-terminated
    // name and the flags.
    unsafe {
        let mut req: libc::ifreq = std::mem::zeroed();
        for (d, s) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
            *d = *s as libc::c_char;
        }
        req.ifr_ifru.ifru_flags = IFF_TUN | IFF_NO_PI;
        let rc = libc::ioctl(file.as_raw_fd(), TUNSETIFF, &req);
        assert_eq!(
            rc,
            0,
            "TUNSETIFF {name}: {}",
            std::io::Error::last_os_error()
        );
    }
    file
}

/// IPv4 header checksum, so that the packets are ones the stack accepts.
fn with_ipv4_checksum(mut packet: Vec<u8>) -> Vec<u8> {
    let ihl = (packet[0] & 0x0f) as usize * 4;
    packet[10..12].copy_from_slice(&[0, 0]);
    let mut sum: u32 = 0;
    for pair in packet[..ihl].chunks(2) {
        sum += u16::from_be_bytes([pair[0], pair[1]]) as u32;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    packet[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    packet
}

pub fn tun_device_frames_start_at_the_ip_header() {
    let ns = Netns::new("tun");
    // Frames written to the device arrive from 198.18.2.2 (see frames.rs
    // DST4/SRC4: 198.18.1.1 -> 198.18.2.2); the device owns 198.18.2.2's
    // peer range so replies and our own sends leave through it.
    ns.exec(&["ip", "tuntap", "add", "mode", "tun", "name", "ntmtun0"]);
    ns.exec(&["ip", "addr", "add", "198.18.2.2/24", "dev", "ntmtun0"]);
    ns.exec(&[
        "ip",
        "addr",
        "add",
        "2001:2:0:2::2/64",
        "dev",
        "ntmtun0",
        "nodad",
    ]);
    ns.exec(&["ip", "link", "set", "ntmtun0", "up"]);
    ns.run(|| {
        let mut tun = open_tun("ntmtun0");
        let mut agent = start_agent("ntmtun0");

        // In: 10 IPv4 and 10 IPv6 UDP packets to port 5300.
        let v4 = with_ipv4_checksum(ipv4(17, &[], 0, &udp(40_000, 5300, &[1; 100])));
        let v6 = ipv6(17, &udp(40_000, 5300, &[2; 60]));
        for _ in 0..10 {
            tun.write_all(&v4).unwrap();
            tun.write_all(&v6).unwrap();
        }
        // Out: 7 datagrams routed through the device.
        let socket = UdpSocket::bind("198.18.2.2:0").unwrap();
        for _ in 0..7 {
            socket.send_to(&[3; 50], "198.18.2.77:5301").unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        let d = agent.drain().unwrap();

        let inbound = flows_where(&d, |k| {
            k.hook == Hook::Ingress as u8 && k.proto == ipproto::UDP && k.port == 5300
        });
        let mut by_family: Vec<(u8, Counters)> =
            inbound.iter().map(|(k, c)| (k.family, *c)).collect();
        by_family.sort_by_key(|(f, _)| *f);
        assert_eq!(
            by_family,
            vec![
                (
                    family::IPV4,
                    Counters {
                        bytes: 10 * 128,
                        packets: 10
                    }
                ),
                (
                    family::IPV6,
                    Counters {
                        bytes: 10 * 108,
                        packets: 10
                    }
                ),
            ],
            "{:?}",
            d.flows
        );
        let v4_key = inbound
            .iter()
            .find(|(k, _)| k.family == family::IPV4)
            .unwrap()
            .0;
        assert_eq!(&v4_key.src[..4], &SRC4);
        assert_eq!(v4_key.vlan_id, 0);

        let outbound = flows_where(&d, |k| {
            k.hook == Hook::Egress as u8 && k.proto == ipproto::UDP && k.port == 5301
        });
        assert_eq!(outbound.len(), 1, "{:?}", d.flows);
        assert_eq!(
            outbound[0].1,
            Counters {
                bytes: 7 * 78,
                packets: 7
            }
        );
        assert!(d.outside.is_empty(), "{:?}", d.outside);
        let _ = agent.shutdown().unwrap();
    });
}

pub fn vlan_tags_moved_into_skb_metadata_are_still_seen() {
    let link = crate::kit::Link::new("vlan");
    link.a.run(|| {
        let mut agent = start_agent(&link.a_if);
        // Frames to a's MAC; the receive path moves the outer tag into
        // skb->vlan_tci before TC ingress sees the frame.
        let to_a = |mut f: Vec<u8>| {
            f[..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
            f
        };
        let ip = ipv4(17, &[], 0, &udp(40_000, 53, &[0; 40]));
        let single = to_a(eth(ETH_IPV4, &[(TPID_8021Q, 100)], &ip));
        let qinq = to_a(eth(ETH_IPV4, &[(TPID_8021AD, 300), (TPID_8021Q, 100)], &ip));
        let arp = to_a(eth(ETH_ARP, &[(TPID_8021Q, 42)], &arp_request()));
        link.b.run(|| {
            send_raw(&link.b_if, &vec![single.clone(); 5]);
            send_raw(&link.b_if, &vec![qinq.clone(); 3]);
            send_raw(&link.b_if, &vec![arp.clone(); 2]);
        });
        link.wait_quiet();
        let d = agent.drain().unwrap();
        let ingress = |vlan: u16, fam: u8| {
            flows_where(&d, |k| {
                k.hook == Hook::Ingress as u8 && k.vlan_id == vlan && k.family == fam
            })
        };
        let v100 = ingress(100, family::IPV4);
        assert_eq!(v100.len(), 1, "{:?}", d.flows);
        assert_eq!(v100[0].0.port, 53);
        assert_eq!(
            v100[0].1,
            Counters {
                bytes: 5 * 68,
                packets: 5
            }
        );
        let v300 = ingress(300, family::IPV4);
        assert_eq!(v300.len(), 1, "outer tag of QinQ: {:?}", d.flows);
        assert_eq!(
            v300[0].1,
            Counters {
                bytes: 3 * 68,
                packets: 3
            }
        );
        let arp = ingress(42, family::NON_IP);
        assert_eq!(arp.len(), 1, "{:?}", d.flows);
        assert_eq!(arp[0].0.port, ETH_ARP);
        // 28 bytes of ARP, padded by nobody on a veth.
        assert_eq!(
            arp[0].1,
            Counters {
                bytes: 2 * 28,
                packets: 2
            }
        );
        assert_eq!(d.outside.total(OutsideReason::TruncatedL2).packets, 0);
        let _ = agent.shutdown().unwrap();
    });
}
