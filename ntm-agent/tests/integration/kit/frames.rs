//! Builders for crafted frames fed to the program with BPF_PROG_TEST_RUN.
//! Checksums are left zero: the TC program never looks at them.

use ntm_common::programs::{HOOKS, HookPoint, LinkType};

pub const ETH_IPV4: u16 = 0x0800;
pub const ETH_IPV6: u16 = 0x86DD;
pub const ETH_ARP: u16 = 0x0806;
pub const TPID_8021Q: u16 = 0x8100;
pub const TPID_8021AD: u16 = 0x88A8;

pub const SRC4: [u8; 4] = [198, 18, 1, 1];
pub const DST4: [u8; 4] = [198, 18, 2, 2];
pub const SRC6: [u8; 16] = [0x20, 0x01, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
pub const DST6: [u8; 16] = [0x20, 0x01, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];

/// Ethernet frame with in-frame VLAN tags `(tpid, vlan id)`, outermost first.
pub fn eth(ethertype: u16, vlans: &[(u16, u16)], payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01];
    for (tpid, vid) in vlans {
        f.extend_from_slice(&tpid.to_be_bytes());
        f.extend_from_slice(&vid.to_be_bytes());
    }
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// IPv4 packet; `frag` is the flags + fragment offset field; `options` must
/// be a multiple of 4 bytes long.
pub fn ipv4(proto: u8, options: &[u8], frag: u16, payload: &[u8]) -> Vec<u8> {
    assert_eq!(options.len() % 4, 0);
    let ihl = (20 + options.len()) / 4;
    let total = 20 + options.len() + payload.len();
    let mut p = vec![0x40 | ihl as u8, 0];
    p.extend_from_slice(&(total as u16).to_be_bytes());
    p.extend_from_slice(&[0x12, 0x34]);
    p.extend_from_slice(&frag.to_be_bytes());
    p.extend_from_slice(&[64, proto, 0, 0]);
    p.extend_from_slice(&SRC4);
    p.extend_from_slice(&DST4);
    p.extend_from_slice(options);
    p.extend_from_slice(payload);
    p
}

/// IPv6 packet whose payload starts with header `next`.
pub fn ipv6(next: u8, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0x60, 0, 0, 0];
    p.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    p.extend_from_slice(&[next, 64]);
    p.extend_from_slice(&SRC6);
    p.extend_from_slice(&DST6);
    p.extend_from_slice(payload);
    p
}

/// Hop-by-hop, routing or destination options header of `8 * units` bytes.
pub fn ext_options(next: u8, units: u8) -> Vec<u8> {
    assert!(units >= 1);
    let mut h = vec![next, units - 1];
    h.resize(units as usize * 8, 0);
    h
}

/// Fragment header; `offset_units` in 8-byte units, `more` = MF flag.
pub fn ext_fragment(next: u8, offset_units: u16, more: bool) -> Vec<u8> {
    let field = (offset_units << 3) | more as u16;
    let mut h = vec![next, 0];
    h.extend_from_slice(&field.to_be_bytes());
    h.extend_from_slice(&[0, 0, 0, 1]);
    h
}

/// Authentication header with `icv_words` 4-byte words of ICV.
pub fn ext_ah(next: u8, icv_words: u8) -> Vec<u8> {
    let len_words = 3 + icv_words; // next/len/reserved, SPI, sequence, ICV
    // The length field is the header's size in 4-byte words, minus 2.
    let mut h = vec![next, len_words - 2];
    h.resize(len_words as usize * 4, 0);
    h
}

pub fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = Vec::new();
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    u
}

/// TCP segment with `options` (multiple of 4 bytes).
pub fn tcp(sport: u16, dport: u16, options: &[u8], payload: &[u8]) -> Vec<u8> {
    assert_eq!(options.len() % 4, 0);
    let doff = (20 + options.len()) / 4;
    let mut t = Vec::new();
    t.extend_from_slice(&sport.to_be_bytes());
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0]);
    t.extend_from_slice(&[(doff as u8) << 4, 0x18, 0xff, 0xff, 0, 0, 0, 0]);
    t.extend_from_slice(options);
    t.extend_from_slice(payload);
    t
}

pub fn icmp(icmp_type: u8, code: u8, payload: &[u8]) -> Vec<u8> {
    let mut m = vec![icmp_type, code, 0, 0, 0, 1, 0, 1];
    m.extend_from_slice(payload);
    m
}

pub fn arp_request() -> Vec<u8> {
    let mut a = vec![0, 1, 8, 0, 6, 4, 0, 1];
    a.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    a.extend_from_slice(&SRC4);
    a.extend_from_slice(&[0; 6]);
    a.extend_from_slice(&DST4);
    a
}

/// The attached program of a hook in `ntm_common::programs::HOOKS`, found
/// at compile time (a missing hook fails the build).
const fn entry(point: HookPoint, link: LinkType) -> &'static str {
    let mut i = 0;
    while i < HOOKS.len() {
        let hook = &HOOKS[i];
        if hook.point as u8 == point as u8 && hook.link as u8 == link as u8 {
            return hook.entry;
        }
        i += 1;
    }
    panic!("no such hook")
}

/// The attached programs of the hooks tests run frames through.
pub const TC_INGRESS_ETH: &str = entry(HookPoint::TcIngress, LinkType::Ethernet);
pub const TC_EGRESS_ETH: &str = entry(HookPoint::TcEgress, LinkType::Ethernet);
pub const TC_INGRESS_L3: &str = entry(HookPoint::TcIngress, LinkType::RawIp);
pub const XDP: &str = entry(HookPoint::XdpIngress, LinkType::Ethernet);
