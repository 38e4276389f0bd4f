//! The steady state: a frame of a connection that already holds its flow
//! cache slot, counted with as few instructions as the kernel allows.
//!
//! Nearly every frame is one (a TCP or UDP frame of a connection seen
//! before, on its way in or out). The full path (`parse::parse_common`,
//! `count.rs`) decides for each frame its flow key's service port (the
//! service-port rule and the known-port bitmap), whether the agent wants it
//! for names, and its part in a TCP handshake. A connection decides those
//! the same way for all its frames but a few, so the full path stores what
//! it decided in the connection's slot ([`ntm_common::CacheSlot`]), and
//! here a frame only shows that it is not one of those few:
//! - a SYN or RST (handshakes), a TCP segment whose data begins a TLS
//!   handshake record (or lies beyond the linear data at the end of a
//!   write), a UDP datagram long enough for a QUIC Initial with a long
//!   header: tested per frame;
//! - a connection on ports the agent wants for names, one whose last frame
//!   through the full path was handed over for names (a hello's first
//!   segment, whose next ones may continue it), a handshake awaiting its
//!   client's ACK: the slot's watch bits (`slot_id::watch`), which this
//!   path's compare never matches.
//!
//! Any other frame, or a connection not in its slot, returns false having
//! counted nothing, and takes the full path, which parses it again: the
//! price of a miss, which the flow cache's own policy bounds (the agent
//! turns the cache off when most frames miss it, and then this path ends
//! at its first load).

use aya_ebpf::programs::{TcContext, XdpContext};
use core::ptr::read_volatile;
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
};
use ntm_common::{
    CACHE_OFF, FLOW_CACHE_SLOTS, Hook, KEY_WORDS, cache_index, family,
    handshake::tcp_flags::{RST, SYN},
    ipproto, observe, slot_id,
};

use crate::{
    lease::{check_lease, lease_check_due_at},
    maps::{NTM_CACHE_HALF, NTM_FLOW_SLOTS},
    parse::{interface_word, ipv4_word, protocol_word},
};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
/// TCP's PSH flag: the last segment of a write.
const TCP_PSH: u8 = 0x08;
/// The first byte of a TLS handshake record (a ClientHello's among them).
const TLS_HANDSHAKE: u8 = 0x16;

/// Counts a TC frame of a connection in its slot; false: nothing counted.
#[inline(always)]
pub fn count_tc<const ETHERNET: bool>(ctx: &TcContext, hook: Hook) -> bool {
    let skb = ctx.skb.skb;
    count::<ETHERNET>(ctx.data(), ctx.data_end(), hook, || {
        // SAFETY: `skb` is the kernel's __sk_buff for this frame, valid for
        // the program's run; these fields are readable by TC programs.
        let (len, gso_segs, ifindex, vlan_present, vlan_tci) = unsafe {
            (
                (*skb).len,
                (*skb).gso_segs,
                (*skb).ifindex,
                (*skb).vlan_present,
                (*skb).vlan_tci,
            )
        };
        let vlan_id = if vlan_present != 0 {
            (vlan_tci & 0x0fff) as u16
        } else {
            0
        };
        // An aggregate counts as the segments it carries: the full path.
        Frame {
            len: if gso_segs > 1 { 0 } else { len as u64 },
            iface: interface_word(ifindex, vlan_id, 0),
        }
    })
}

/// Counts an XDP frame of a connection in its slot; false: nothing counted.
#[inline(always)]
pub fn count_xdp(ctx: &XdpContext) -> bool {
    let (data, end) = (ctx.data(), ctx.data_end());
    count::<true>(data, end, Hook::Ingress, || Frame {
        len: (end - data) as u64,
        // In XDP a tag is still in the frame, whose EtherType then is not
        // IP: such a frame takes the full path.
        // SAFETY: the context pointer is the kernel's xdp_md for this frame.
        iface: interface_word(unsafe { (*ctx.ctx).ingress_ifindex }, 0, 0),
    })
}

/// What the hook says of a frame, read once its headers have passed.
struct Frame {
    /// Its bytes; 0 for an aggregate of several segments.
    len: u64,
    /// The id's word of its interface and VLAN tag.
    iface: u64,
}

#[inline(always)]
fn count<const ETHERNET: bool>(
    data: usize,
    end: usize,
    hook: Hook,
    frame: impl FnOnce() -> Frame,
) -> bool {
    let frame = frame();
    // SAFETY: an aligned load of a word the agent writes with one store.
    let half = unsafe { core::ptr::read_volatile(&raw const NTM_CACHE_HALF) };
    if half >= CACHE_OFF {
        return false;
    }
    let l3 = if ETHERNET { EthHdr::LEN } else { 0 };
    let ip = data + l3;
    // The smallest frame taken here: IPv4 and UDP headers and a byte of
    // data (a UDP datagram's first is tested below; an Ethernet frame is
    // never shorter, padded to 60 bytes). One check covers the EtherType
    // and every IPv4 field read below.
    if ip + Ipv4Hdr::LEN + UdpHdr::LEN + 1 > end {
        return false;
    }
    // Fields are read as `parse::parse_common` reads them (see there).
    // SAFETY: the first byte of the IP header, checked above.
    let version = unsafe { *(ip as *const u8) } >> 4;
    // Each version on a path of its own: an IPv4 id's zero words are then
    // constants, not values kept for the compare. On Ethernet the
    // EtherType (as the frame has it, big-endian) picks it; the IPv4 path
    // checks the version with the header's length.
    if ETHERNET {
        // SAFETY: bytes 12 and 13 are before `ip`, checked above.
        let ethertype = unsafe { *((data + 12) as *const u16) };
        if ethertype == ETH_P_IP.to_be() {
            count_ip::<false>(half, ip, l3, end, hook, frame)
        } else if ethertype == ETH_P_IPV6.to_be() && version == 6 {
            count_ip::<true>(half, ip, l3, end, hook, frame)
        } else {
            false
        }
    } else {
        match version {
            4 => count_ip::<false>(half, ip, l3, end, hook, frame),
            6 => count_ip::<true>(half, ip, l3, end, hook, frame),
            _ => false,
        }
    }
}

/// [`count`] from the IP header at `ip` on (`l3` bytes into the frame).
#[inline(always)]
fn count_ip<const V6: bool>(
    half: u32,
    ip: usize,
    l3: usize,
    end: usize,
    hook: Hook,
    frame: Frame,
) -> bool {
    let (ip_len, proto, l3_len) = if V6 {
        // The IPv6 header, a UDP header and the first byte of its data
        // (see the QUIC test below).
        if ip + Ipv6Hdr::LEN + UdpHdr::LEN + 1 > end {
            return false;
        }
        // SAFETY: inside the 48 bytes just checked.
        let (payload_len, next) = unsafe {
            (
                u16::from_be(*((ip + 4) as *const u16)),
                *((ip + 6) as *const u8),
            )
        };
        // A payload length of 0 (a jumbogram or an aggregate) fails the
        // length test below.
        (Ipv6Hdr::LEN, next, payload_len as u32 + Ipv6Hdr::LEN as u32)
    } else {
        // SAFETY: inside the 28 bytes the caller checked.
        let (vihl, tot_len, frags, proto) = unsafe {
            (
                *(ip as *const u8),
                u16::from_be(*((ip + 2) as *const u16)),
                *((ip + 6) as *const u16),
                *((ip + 9) as *const u8),
            )
        };
        // Version 4 with no options, not a fragment (the offset and MF,
        // compared as the frame has them).
        if vihl != 0x45 || frags & 0x3fffu16.to_be() != 0 {
            return false;
        }
        (Ipv4Hdr::LEN, proto, tot_len as u32)
    };
    let Frame { len, iface } = frame;
    // One packet whose length field the frame holds (an aggregate's `len`
    // is 0): tested here, so that `len` is not kept past it.
    if l3_len as u64 + l3 as u64 > len {
        return false;
    }
    let l4 = ip + ip_len;
    let header_len = match proto {
        ipproto::TCP => {
            if l4 + TcpHdr::LEN > end {
                return false;
            }
            // SAFETY: the 20-byte TCP header was just checked.
            let (doff, flags) =
                unsafe { (*((l4 + 12) as *const u8) >> 4, *((l4 + 13) as *const u8)) };
            if flags & (SYN | RST) != 0 {
                return false;
            }
            let header_len = (ip_len + doff as usize * 4) as u32;
            // A superset of the full path's tests for data that may begin
            // a ClientHello (`parse::handshake_candidate`), without its
            // range of lengths: data whose first bytes are in the linear
            // part begins with a TLS handshake record's byte, or the IP
            // packet goes on past the linear part at the end of a write
            // (whose data the full path peeks at). A short segment, or
            // an Ethernet frame's padding, that begins with that byte
            // only takes the full path for nothing. (Data that may
            // continue a hello followed is its connection's, whose slot
            // the hello's first segment left watched.)
            let payload = ip + header_len as usize;
            if payload + observe::HELLO_PREFIX_LEN <= end {
                // SAFETY: the byte at `payload` is inside the check above.
                if unsafe { *(payload as *const u8) } == TLS_HANDSHAKE {
                    return false;
                }
            } else if ip + l3_len as usize > end {
                // SAFETY: the TCP header was checked above. The flags are
                // read again, not kept from above (see the addresses').
                if unsafe { read_volatile((l4 + 13) as *const u8) } & TCP_PSH != 0 {
                    return false;
                }
            }
            header_len
        }
        ipproto::UDP => {
            let header_len = (ip_len + UdpHdr::LEN) as u32;
            if l3_len.wrapping_sub(header_len) >= observe::QUIC_MIN_DATAGRAM {
                // A long header (bit 7 of the first byte) may be an
                // Initial; a short one never is.
                // SAFETY: the first byte after the UDP header is inside
                // the checks of the IP header above.
                if unsafe { *((l4 + UdpHdr::LEN) as *const u8) } & 0x80 != 0 {
                    return false;
                }
            }
            header_len
        }
        _ => return false,
    };
    // With its headers (the length test above is of the frame).
    if l3_len < header_len {
        return false;
    }
    // SAFETY: the first 4 bytes of the L4 header are inside the checks
    // above; the addresses inside the IP header.
    let (ports, src, dst) = unsafe {
        let ports = *(l4 as *const u32);
        let (src, dst) = if V6 {
            let words = (ip + 8) as *const u64;
            ([*words, *words.add(1)], [*words.add(2), *words.add(3)])
        } else {
            (
                [ipv4_word(*((ip + 12) as *const u32)), 0],
                [ipv4_word(*((ip + 16) as *const u32)), 0],
            )
        };
        (ports, src, dst)
    };
    let fam = if V6 { family::IPV6 } else { family::IPV4 };
    // The connection's id with its watch bits clear (see `slot_id`).
    let id: [u64; KEY_WORDS] = [
        src[0],
        src[1],
        dst[0],
        dst[1],
        iface,
        protocol_word(fam, proto, hook as u8 | slot_id::CONNECTION, 0) | slot_id::ports_bits(ports),
    ];
    let index = (half << FLOW_CACHE_SLOTS.trailing_zeros()) | cache_index(&id);
    let Some(slot) = NTM_FLOW_SLOTS.get_ptr_mut(index) else {
        return false;
    };
    let s = slot as *mut u64;
    // SAFETY: a CacheSlot is KEY_WORDS id words, the flow word, then bytes
    // and packets, all u64; it is this CPU's, and TC and XDP run with
    // bottom halves off. An empty slot is all zero, which no connection's
    // id is (its hook has CONNECTION set), so a match is a slot in use.
    unsafe {
        // An IPv4 id's words 1 and 3 are zero, and word 5 holds the
        // family: a slot whose words 0, 2, 4 and 5 match is this
        // connection's.
        if *s.add(4) != id[4] || *s.add(5) != id[5] {
            return false;
        }
        // The addresses read from the frame again (volatile: not kept
        // across the lookup's call, where the BPF target has four
        // registers that survive a call, and the rest would go to the
        // stack and back).
        let (src, dst) = if V6 {
            let words = (ip + 8) as *const u64;
            (
                [read_volatile(words), read_volatile(words.add(1))],
                [read_volatile(words.add(2)), read_volatile(words.add(3))],
            )
        } else {
            (
                [ipv4_word(read_volatile((ip + 12) as *const u32)), 0],
                [ipv4_word(read_volatile((ip + 16) as *const u32)), 0],
            )
        };
        if *s != src[0] || *s.add(2) != dst[0] {
            return false;
        }
        if V6 && (*s.add(1) != src[1] || *s.add(3) != dst[1]) {
            return false;
        }
        let packets = s.add(KEY_WORDS + 2);
        let now = *packets + 1;
        *s.add(KEY_WORDS + 1) += l3_len as u64;
        *packets = now;
        if lease_check_due_at(now) {
            check_lease();
        }
    }
    true
}
