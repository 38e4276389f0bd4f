//! Frame parser: from the first byte of a frame to a flow key.
//!
//! Works on raw `[data, data_end)` pointers so that TC and XDP share it.
//! Every read is bounds-checked against `data_end` first, and every
//! variable offset has a visible upper bound, as the verifier requires.
//!
//! Two parsers that give the same key: [`parse_common`], straight-line, for
//! what nearly every frame is (IPv4 or IPv6 carrying TCP or UDP, without
//! IPv4 options, IPv6 extension headers, a VLAN tag in the frame or
//! fragmentation), and the full parse ([`parse_ethernet`], [`parse_l3`]) of
//! any frame, which the hooks run when the first says no.

use core::mem::{MaybeUninit, size_of};

use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
};
use ntm_common::{
    FlowKey, KEY_WORDS, OutsideReason, family, ipproto, key_flags, observe,
    service_port::{self, PortClass},
    slot_id,
};

use crate::hello;

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;

/// In-frame VLAN tags followed (802.1ad outer + 802.1Q inner).
const MAX_VLAN_TAGS: usize = 2;
/// IPv6 extension headers followed before giving up on the chain.
const MAX_IPV6_EXT_HEADERS: usize = 6;
/// No header we parse starts beyond this offset; it bounds every variable
/// offset for the verifier (2 VLAN tags + IPv6 + 6 extension headers of
/// realistic size fit easily).
pub const MAX_L4_OFFSET: usize = 512;

/// Where the parse ended, with the lengths the byte count needs.
pub struct Parsed {
    /// Offset of the L3 header from the start of the frame.
    pub l3_offset: usize,
    /// Offset of the L4 header from the start of the frame (where the IP
    /// header and its options or extension headers end); 0 for non-IP
    /// frames.
    pub l4_offset: usize,
    /// L3 bytes according to the packet's own length field (IPv4 total
    /// length, IPv6 payload length + 40); for non-IP frames 0, meaning
    /// "the rest of the frame".
    pub l3_len: u32,
    /// L3 + L4 header bytes: repeated in every segment of a GSO aggregate.
    pub header_len: u32,
    /// An [`observe::Kind`] if the agent wants this frame for names, else
    /// [`NOT_OBSERVED`].
    pub observe: u8,
    /// Whether the packet is a fragment of a larger datagram, and which.
    pub fragment: Fragment,
    /// A fragment's datagram identification; 0 for a whole packet. A field
    /// of its own, always set, rather than in `Fragment`: an enum's payload
    /// is undefined in its other variants, and LLVM may then store an
    /// unset register, which the verifier refuses.
    pub fragment_id: u32,
    /// A TCP segment's flags (byte 13 of its header) where the segment may
    /// be part of a handshake (see [`handshake_part`]), or
    /// `ICMP_UNREACHABLE` for a destination unreachable (which may answer a
    /// SYN); 0 for any other frame, data segments among them, so that they
    /// pay one test.
    pub tcp_flags: u8,
}

/// Where a packet stands in its datagram: later fragments carry no ports,
/// and take their datagram's from the first (see `count.rs`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Fragment {
    Whole,
    /// Offset 0 with more to come.
    First,
    /// Offset above 0.
    Later,
}

/// `Parsed::observe` of a frame the agent does not want.
pub const NOT_OBSERVED: u8 = 0xff;
/// `Parsed::observe` of a TCP segment that ends a write (PSH) and whose
/// data lies beyond the linear part of the frame (a local socket's
/// segment, whose data is in pages): whether it begins a ClientHello is
/// read with a helper, by the TC programs only (`count.rs`).
pub const PEEK_TLS: u8 = 0xfe;
/// `Parsed::observe` of a TCP segment with data that begins no ClientHello
/// but whose ports' bucket has a hello followed (`hello.rs`): whether it
/// continues that hello is for the hand-over program to tell.
pub const FOLLOW_TLS: u8 = 0xfd;
/// A ClientHello's first segment holds at most this much data: a hello of
/// 16 KiB (what the agent reads at most) in its records.
pub const MAX_HELLO_SEGMENT: u32 = 16 * 1024 + 64;
/// TCP's PSH flag: the last segment of a write.
const TCP_PSH: u8 = 0x08;

/// Why the parse stopped early: either a reason to count the frame outside
/// the flow table, or "the headers lie beyond the linear data" (the caller may
/// pull the data in and try again).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    Outside(OutsideReason),
    NeedMoreData(OutsideReason),
}

pub struct Frame {
    pub data: usize,
    pub end: usize,
}

impl Frame {
    /// A pointer to a `T` at `offset`, if all of it lies inside the frame.
    #[inline(always)]
    fn at<T>(&self, offset: usize) -> Option<*const T> {
        let start = self.data + offset;
        if start + size_of::<T>() > self.end {
            return None;
        }
        Some(start as *const T)
    }

    /// Two bytes at `offset`. There is deliberately no one-byte read: LLVM
    /// turns `start + 1 > end` into `start >= end`, which the verifier does
    /// not accept as a bounds check. Every header we read a byte of is at
    /// least two bytes long.
    #[inline(always)]
    fn pair(&self, offset: usize) -> Option<[u8; 2]> {
        // SAFETY: `at` checked that the two bytes lie inside the frame.
        self.at::<[u8; 2]>(offset).map(|p| unsafe { *p })
    }

    #[inline(always)]
    fn be16(&self, offset: usize) -> Option<u16> {
        // SAFETY: `at` checked that the two bytes lie inside the frame.
        self.at::<[u8; 2]>(offset)
            .map(|p| u16::from_be_bytes(unsafe { *p }))
    }
}

/// Copies an address out of the packet with 4-byte loads, as C programs do
/// through `struct in6_addr`. The BPF backend otherwise copies byte by byte
/// (it assumes the packet's 1-byte alignment); the kernel allows unaligned
/// packet loads on the architectures whose JIT ntm targets, and IP headers
/// sit 4-byte aligned in practice anyway.
///
/// # Safety
/// `N * 4` bytes at `from` must be inside the frame.
#[inline(always)]
unsafe fn load_address<const N: usize>(from: *const u8, to: &mut [u8; 16]) {
    let words = to.as_mut_ptr() as *mut u32;
    for i in 0..N {
        // SAFETY: the caller checked that N * 4 bytes at `from` are in the
        // frame; `to` is 16 bytes, 4-byte aligned inside FlowKey.
        unsafe { *words.add(i) = core::ptr::read(from.add(i * 4) as *const u32) };
    }
}

#[inline(always)]
fn need(reason: OutsideReason) -> ParseError {
    ParseError::NeedMoreData(reason)
}

/// What the hook knows of a frame's key before parsing it.
#[derive(Clone, Copy)]
pub struct KeyBase {
    pub ifindex: u32,
    /// The VLAN tag TC keeps in skb metadata (0: none).
    pub vlan_id: u16,
    pub hook: u8,
}

impl KeyBase {
    /// Starts a key in `space` for the full parse: all zero but these
    /// fields.
    #[inline(always)]
    pub fn start<'a>(&self, space: &'a mut MaybeUninit<FlowKey>) -> &'a mut FlowKey {
        zero_key(space.as_mut_ptr());
        // SAFETY: every byte was just written, and all-zero is a valid
        // FlowKey.
        let key = unsafe { space.assume_init_mut() };
        key.ifindex = self.ifindex;
        key.vlan_id = self.vlan_id;
        key.hook = self.hook;
        key
    }
}

// `parse_common` builds the key's words as FlowKey lays its fields out.
const _: () = {
    use core::mem::offset_of;
    assert!(offset_of!(FlowKey, src) == 0 && offset_of!(FlowKey, dst) == 16);
    assert!(offset_of!(FlowKey, ifindex) == 32 && offset_of!(FlowKey, vlan_id) == 36);
    assert!(offset_of!(FlowKey, port) == 38 && offset_of!(FlowKey, family) == 40);
    assert!(offset_of!(FlowKey, proto) == 41 && offset_of!(FlowKey, hook) == 42);
    assert!(offset_of!(FlowKey, flags) == 43 && KEY_WORDS == 6);
};

/// Zeroes a key with six 8-byte stores. (`FlowKey::default()` becomes a call
/// to a byte-by-byte memset in the BPF backend, which costs more than the
/// whole parse.)
#[inline(always)]
fn zero_key(key: *mut FlowKey) {
    let words = key as *mut u64;
    for i in 0..KEY_WORDS {
        // SAFETY: FlowKey is 8-byte aligned and KEY_WORDS * 8 bytes long.
        unsafe { core::ptr::write_volatile(words.add(i), 0) };
    }
}

// The key's words as FlowKey lays them out in memory (see the asserts
// above), from its fields; one version per byte order.

/// An IPv4 address (as read from the frame) as the first word of a key's
/// address, the rest zero.
#[inline(always)]
pub fn ipv4_word(address: u32) -> u64 {
    if cfg!(target_endian = "little") {
        address as u64
    } else {
        (address as u64) << 32
    }
}

/// The fifth word: ifindex, vlan_id, port.
#[inline(always)]
pub fn interface_word(ifindex: u32, vlan_id: u16, port: u16) -> u64 {
    if cfg!(target_endian = "little") {
        ifindex as u64 | (vlan_id as u64) << 32 | (port as u64) << 48
    } else {
        (ifindex as u64) << 32 | (vlan_id as u64) << 16 | port as u64
    }
}

/// The sixth word: family, proto, hook, flags; zero padding.
#[inline(always)]
pub fn protocol_word(family: u8, proto: u8, hook: u8, flags: u8) -> u64 {
    if cfg!(target_endian = "little") {
        family as u64 | (proto as u64) << 8 | (hook as u64) << 16 | (flags as u64) << 24
    } else {
        (family as u64) << 56 | (proto as u64) << 48 | (hook as u64) << 40 | (flags as u64) << 32
    }
}

/// The protocol in a flow key's words (see [`protocol_word`]).
#[inline(always)]
pub fn proto_of(words: &[u64; KEY_WORDS]) -> u8 {
    if cfg!(target_endian = "little") {
        (words[5] >> 8) as u8
    } else {
        (words[5] >> 48) as u8
    }
}

/// Parses the common frame in one go: IPv4 without options and not a
/// fragment, or IPv6 without extension headers, carrying a whole TCP or UDP
/// header, all in the linear data (after an Ethernet header without an
/// in-frame tag when `ETHERNET`). Nearly every frame is one; for it this
/// gives the [`Parsed`] that [`parse_ethernet`] or [`parse_l3`] would, and
/// the key they would write, as its [`KEY_WORDS`] words: built in
/// registers, they are stored once, whole, and hashed and compared without
/// reading the key back from partial stores (which the CPU cannot forward
/// to a whole-word load). One bounds check per header and no loops. With
/// them, the frame's connection, which its cache slot is found by. `None`:
/// any other frame, for those two to parse.
#[inline(always)]
pub fn parse_common<const ETHERNET: bool>(
    frame: &Frame,
    base: impl FnOnce() -> KeyBase,
    ephemeral_start: u16,
    is_known: impl Fn(PortClass, u16) -> bool,
) -> Option<(Parsed, [u64; KEY_WORDS], Connection)> {
    let l3 = if ETHERNET { EthHdr::LEN } else { 0 };
    let ip = frame.data + l3;
    // The smallest common frame: IPv4 and UDP headers. One check covers
    // the EtherType and every IPv4 field read below.
    if ip + Ipv4Hdr::LEN + UdpHdr::LEN > frame.end {
        return None;
    }
    // Fields are read as the loads the kernel allows on packet data (see
    // `load_address`): the BPF backend would otherwise read a 2-byte field
    // a byte at a time. Each is read where it is used, so that few values
    // are live at once (the BPF target has ten registers).
    // SAFETY: the first byte of the IP header, checked above.
    let version = unsafe { *(ip as *const u8) } >> 4;
    if ETHERNET {
        // SAFETY: bytes 12 and 13 are before `ip`, checked above.
        let ethertype = u16::from_be(unsafe { *((frame.data + 12) as *const u16) });
        let expected = match ethertype {
            ETH_P_IP => 4,
            ETH_P_IPV6 => 6,
            _ => return None,
        };
        if version != expected {
            return None;
        }
    }
    let (ip_len, proto, l3_len) = match version {
        4 => {
            // SAFETY: inside the 28 bytes checked above.
            let (vihl, tot_len, frags, proto) = unsafe {
                (
                    *(ip as *const u8),
                    u16::from_be(*((ip + 2) as *const u16)),
                    u16::from_be(*((ip + 6) as *const u16)),
                    *((ip + 9) as *const u8),
                )
            };
            // No options, not a fragment (offset 0, no more fragments),
            // and a total length that is 0 (a GSO aggregate) or holds the
            // header; anything else is for the full parse.
            if vihl != 0x45
                || frags & 0x3fff != 0
                || (tot_len != 0 && (tot_len as usize) < Ipv4Hdr::LEN)
            {
                return None;
            }
            (Ipv4Hdr::LEN, proto, tot_len as u32)
        }
        6 => {
            if ip + Ipv6Hdr::LEN + UdpHdr::LEN > frame.end {
                return None;
            }
            // SAFETY: inside the 48 bytes just checked.
            let (payload_len, next) = unsafe {
                (
                    u16::from_be(*((ip + 4) as *const u16)),
                    *((ip + 6) as *const u8),
                )
            };
            // payload_len 0 is a jumbogram or a BIG TCP aggregate: the
            // caller takes the length from the skb.
            let l3_len = if payload_len == 0 {
                0
            } else {
                payload_len as u32 + Ipv6Hdr::LEN as u32
            };
            (Ipv6Hdr::LEN, next, l3_len)
        }
        _ => return None,
    };
    let l4 = ip + ip_len;
    let (class, l4_len, tcp_flags, handshake) = match proto {
        ipproto::TCP => {
            if l4 + TcpHdr::LEN > frame.end {
                return None;
            }
            // SAFETY: the 20-byte TCP header was just checked; the data
            // offset is the high nibble of byte 12, the flags byte 13.
            let (doff, flags) =
                unsafe { (*((l4 + 12) as *const u8) >> 4, *((l4 + 13) as *const u8)) };
            let l4_len = doff as usize * 4;
            // The segment's part in a handshake is taken here, where its
            // header's length is at hand: a UDP datagram's is then a
            // constant 0 where the two arms meet (11 fewer instructions on
            // its path, docs/performance.md).
            let bare = l3_len == (ip_len + l4_len) as u32;
            (PortClass::Tcp, l4_len, flags, handshake_part(flags, bare))
        }
        // Its 8 bytes are in the checks above.
        ipproto::UDP => (PortClass::Udp, UdpHdr::LEN, 0, 0),
        _ => return None,
    };
    // SAFETY: the first 4 bytes of the L4 header are inside the checks
    // above.
    let (sport, dport) = unsafe {
        (
            u16::from_be(*(l4 as *const u16)),
            u16::from_be(*((l4 + 2) as *const u16)),
        )
    };
    let observe = observed(proto == ipproto::TCP, sport, dport);
    let header_len = (ip_len + l4_len) as u32;
    let observe = if observe == NOT_OBSERVED {
        handshake_candidate(
            proto == ipproto::TCP,
            (sport, dport),
            l4 + l4_len,
            frame.end,
            l3_len.wrapping_sub(header_len),
            tcp_flags,
        )
    } else {
        observe
    };
    // A frame the agent wants for names keeps its connection's next frames
    // on the full path: on ports wanted for names all of them; after a
    // hello's first segment those that may continue it, which the full
    // path tells (a hello followed), until one does not.
    let names = if observe != NOT_OBSERVED {
        slot_id::watch::NAMES
    } else {
        0
    };
    // SAFETY: as above.
    let ports = unsafe { *(l4 as *const u32) };
    let connection = Connection(slot_id::connection_part(ports, names));
    let (port, port_is_src) =
        service_port::choose_with_side(sport, dport, ephemeral_start, |p| is_known(class, p));
    let flags = if port_is_src {
        key_flags::SERVICE_PORT_IS_SRC
    } else {
        0
    };
    // SAFETY: the addresses are inside the IP header checked above; an
    // IPv6 address is read as two 8-byte words in the key's byte order.
    let (src, dst) = unsafe {
        if version == 4 {
            (
                [ipv4_word(*((ip + 12) as *const u32)), 0],
                [ipv4_word(*((ip + 16) as *const u32)), 0],
            )
        } else {
            let words = (ip + 8) as *const u64;
            ([*words, *words.add(1)], [*words.add(2), *words.add(3)])
        }
    };
    let family = if version == 4 {
        family::IPV4
    } else {
        family::IPV6
    };
    // The hook's fields last, where they are used: read at the start they
    // stayed live across the whole parse, on the stack.
    let base = base();
    let words = [
        src[0],
        src[1],
        dst[0],
        dst[1],
        interface_word(base.ifindex, base.vlan_id, port),
        protocol_word(family, proto, base.hook, flags),
    ];
    let parsed = Parsed {
        l3_offset: l3,
        l4_offset: l3 + ip_len,
        l3_len,
        header_len,
        observe,
        fragment: Fragment::Whole,
        fragment_id: 0,
        tcp_flags: handshake,
    };
    Some((parsed, words, connection))
}

/// A common frame's connection, as the part of its cache slot's id that
/// its flow key does not give (`ntm_common::slot_id::connection_part`: its
/// ports, and the watch bit of a frame the agent wants for names), or
/// [`Connection::NONE`] for any other frame, whose slot is found by its
/// flow key. One word, so that it takes one register on the full path.
#[derive(Clone, Copy)]
pub struct Connection(pub u64);

impl Connection {
    pub const NONE: Self = Self(0);
}

/// Whether a common frame the ports did not pick for names may begin a
/// handshake that names its server: a TCP segment whose data begins a
/// ClientHello, a UDP datagram of [`observe::QUIC_MIN_DATAGRAM`] bytes or
/// more whose first packet is a QUIC Initial; or a TCP segment that may
/// continue a hello being followed ([`FOLLOW_TLS`]). `ports` are the
/// segment's (host order), `payload` is where the data begins,
/// `payload_len` its length by the IP header (huge when the header says 0:
/// an aggregate, never a hello's segment). Ordinary frames pay a compare
/// of their length, and a TCP segment with data a load and a compare of
/// its first bytes, which are in the cache with its headers, and the load
/// of its bucket's byte in `hello.rs`.
#[inline(always)]
fn handshake_candidate(
    tcp: bool,
    ports: (u16, u16),
    payload: usize,
    end: usize,
    payload_len: u32,
    tcp_flags: u8,
) -> u8 {
    if tcp {
        if !(observe::HELLO_PREFIX_LEN as u32..=MAX_HELLO_SEGMENT).contains(&payload_len) {
            return NOT_OBSERVED;
        }
        let followed = || {
            if hello::is_followed(ports.0, ports.1) {
                FOLLOW_TLS
            } else {
                NOT_OBSERVED
            }
        };
        if payload + observe::HELLO_PREFIX_LEN > end {
            return if tcp_flags & TCP_PSH != 0 {
                PEEK_TLS
            } else {
                followed()
            };
        }
        // SAFETY: the 6 bytes at `payload` were just checked to be in the
        // frame; read unaligned, as the kernel allows on packet data.
        let (word, sixth) = unsafe {
            (
                core::ptr::read_unaligned(payload as *const u32),
                *((payload + 5) as *const u8),
            )
        };
        if observe::starts_client_hello(u32::from_le(word), sixth) {
            observe::Kind::Tls as u8
        } else {
            followed()
        }
    } else {
        if payload_len < observe::QUIC_MIN_DATAGRAM || payload + 5 > end {
            return NOT_OBSERVED;
        }
        // SAFETY: the 5 bytes at `payload` were just checked to be in the
        // frame.
        let (first, version) = unsafe {
            (
                *(payload as *const u8),
                u32::from_be(core::ptr::read_unaligned((payload + 1) as *const u32)),
            )
        };
        if observe::starts_quic_initial(first, version) {
            observe::Kind::Quic as u8
        } else {
            NOT_OBSERVED
        }
    }
}

/// `flags`, if a segment with them may be part of a handshake: a SYN, a
/// RST, or a bare ACK (no payload, `bare`, and no flag but ACK among
/// FIN, SYN, RST, PSH, ACK and URG: a client's ACK of a SYN-ACK); else 0.
/// Only common frames are followed (`handshakes.rs`).
#[inline(always)]
fn handshake_part(flags: u8, bare: bool) -> u8 {
    use ntm_common::handshake::tcp_flags::{ACK, RST, SYN};
    let control = flags & (SYN | RST) != 0;
    // ECE and CWR (0xc0) may be on: ECN.
    let bare_ack = bare && flags & 0x3f == ACK;
    if control || bare_ack { flags } else { 0 }
}

/// [`ntm_common::handshake::ICMP_UNREACHABLE`] for a destination
/// unreachable (`icmp`, of type `unreachable`) with its ICMP header parsed
/// (`l4_len`), which may answer a SYN; else 0.
#[inline(always)]
fn unreachable_part(key: &FlowKey, icmp: u8, unreachable: u16, l4_len: usize) -> u8 {
    if key.proto == icmp && key.port == unreachable && l4_len != 0 {
        ntm_common::handshake::ICMP_UNREACHABLE
    } else {
        0
    }
}

/// Parses an Ethernet frame. `vlan_id` already holds the tag TC keeps in skb
/// metadata (0 if none); the first in-frame tag is used when it is 0.
#[inline(always)]
pub fn parse_ethernet(
    frame: &Frame,
    key: &mut FlowKey,
    ephemeral_start: u16,
    is_known: impl Fn(PortClass, u16) -> bool,
) -> Result<Parsed, ParseError> {
    let eth = frame
        .at::<EthHdr>(0)
        .ok_or(need(OutsideReason::TruncatedL2))?;
    // SAFETY: `at` checked that the whole Ethernet header is in the frame.
    let mut ethertype = u16::from_be(unsafe { (*eth).ether_type });
    let mut offset = EthHdr::LEN;
    for _ in 0..MAX_VLAN_TAGS {
        if ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD {
            break;
        }
        let tci = frame.be16(offset).ok_or(need(OutsideReason::TruncatedL2))?;
        ethertype = frame
            .be16(offset + 2)
            .ok_or(need(OutsideReason::TruncatedL2))?;
        if key.vlan_id == 0 {
            key.vlan_id = tci & 0x0fff;
        }
        offset += 4;
    }
    match ethertype {
        ETH_P_IP => parse_ipv4(frame, offset, key, ephemeral_start, is_known),
        ETH_P_IPV6 => parse_ipv6(frame, offset, key, ephemeral_start, is_known),
        other => {
            key.family = family::NON_IP;
            key.port = other;
            Ok(Parsed {
                l3_offset: offset,
                l4_offset: 0,
                l3_len: 0,
                header_len: 0,
                observe: NOT_OBSERVED,
                fragment: Fragment::Whole,
                fragment_id: 0,
                tcp_flags: 0,
            })
        }
    }
}

/// Parses a frame that starts with the IP header (TUN, PPP, WireGuard).
#[inline(always)]
pub fn parse_l3(
    frame: &Frame,
    key: &mut FlowKey,
    ephemeral_start: u16,
    is_known: impl Fn(PortClass, u16) -> bool,
) -> Result<Parsed, ParseError> {
    let [first, _] = frame.pair(0).ok_or(need(OutsideReason::UnknownL3))?;
    match first >> 4 {
        4 => parse_ipv4(frame, 0, key, ephemeral_start, is_known),
        6 => parse_ipv6(frame, 0, key, ephemeral_start, is_known),
        _ => Err(ParseError::Outside(OutsideReason::UnknownL3)),
    }
}

#[inline(always)]
fn parse_ipv4(
    frame: &Frame,
    l3: usize,
    key: &mut FlowKey,
    ephemeral_start: u16,
    is_known: impl Fn(PortClass, u16) -> bool,
) -> Result<Parsed, ParseError> {
    const BAD: OutsideReason = OutsideReason::MalformedIpv4;
    let ip = frame.at::<Ipv4Hdr>(l3).ok_or(need(BAD))?;
    // SAFETY: `at` checked that the whole fixed IPv4 header is in the frame.
    let (vihl, tot_len, id, frags, proto) = unsafe {
        (
            (*ip).vihl,
            u16::from_be_bytes((*ip).tot_len),
            u16::from_be_bytes((*ip).id),
            u16::from_be_bytes((*ip).frags),
            (*ip).proto,
        )
    };
    let header_len = ((vihl & 0x0f) as usize) * 4;
    if vihl >> 4 != 4 || header_len < Ipv4Hdr::LEN {
        return Err(ParseError::Outside(BAD));
    }
    key.family = family::IPV4;
    key.proto = proto;
    // SAFETY: both addresses (4 bytes each) are inside the checked header.
    unsafe {
        load_address::<1>((*ip).src_addr.as_ptr(), &mut key.src);
        load_address::<1>((*ip).dst_addr.as_ptr(), &mut key.dst);
    }
    // A total length of 0 is what GSO "BIG TCP" aggregates carry; the caller
    // then takes the length from the skb. Anything else shorter than the
    // header is malformed.
    if tot_len != 0 && (tot_len as usize) < header_len {
        return Err(ParseError::Outside(BAD));
    }
    // Ports only in the first fragment; later ones have none to read.
    let first_fragment = frags & 0x1fff == 0;
    let (fragment, fragment_id) = match (first_fragment, frags & 0x2000 != 0) {
        (true, false) => (Fragment::Whole, 0),
        (true, true) => (Fragment::First, id as u32),
        (false, _) => (Fragment::Later, id as u32),
    };
    let l4 = l3 + header_len;
    let (l4_len, observe) = if first_fragment {
        parse_l4(frame, l4, proto, key, ephemeral_start, is_known)
    } else {
        mark_l4_missing(proto, key);
        (0, NOT_OBSERVED)
    };
    let header_len = (header_len + l4_len) as u32;
    Ok(Parsed {
        l3_offset: l3,
        l4_offset: l4,
        l3_len: tot_len as u32,
        header_len,
        observe,
        fragment,
        fragment_id,
        tcp_flags: unreachable_part(key, ipproto::ICMP, 3, l4_len),
    })
}

#[inline(always)]
fn parse_ipv6(
    frame: &Frame,
    l3: usize,
    key: &mut FlowKey,
    ephemeral_start: u16,
    is_known: impl Fn(PortClass, u16) -> bool,
) -> Result<Parsed, ParseError> {
    const BAD: OutsideReason = OutsideReason::MalformedIpv6;
    let ip = frame.at::<Ipv6Hdr>(l3).ok_or(need(BAD))?;
    // SAFETY: `at` checked that the whole IPv6 header is in the frame.
    let (vcf0, payload_len, mut next) = unsafe {
        (
            (*ip).vcf[0],
            u16::from_be_bytes((*ip).payload_len),
            (*ip).next_hdr,
        )
    };
    if vcf0 >> 4 != 6 {
        return Err(ParseError::Outside(BAD));
    }
    key.family = family::IPV6;
    // SAFETY: both addresses (16 bytes each) are inside the checked header.
    unsafe {
        load_address::<4>((*ip).src_addr.as_ptr(), &mut key.src);
        load_address::<4>((*ip).dst_addr.as_ptr(), &mut key.dst);
    }
    let mut offset = l3 + Ipv6Hdr::LEN;
    let mut first_fragment = true;
    let mut fragment = Fragment::Whole;
    let mut fragment_id = 0;
    let mut chain_done = false;
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        if !is_extension_header(next) {
            chain_done = true;
            break;
        }
        // Every extension header starts with (next header, length).
        let [following, length] = frame
            .pair(offset)
            .ok_or(need(OutsideReason::Ipv6ExtensionChain))?;
        let len = match next {
            ipproto::HOPOPTS | ipproto::ROUTING | ipproto::DSTOPTS => (length as usize + 1) * 8,
            ipproto::AH => (length as usize + 2) * 4,
            ipproto::FRAGMENT => {
                // The whole 8-byte header in one check: next header,
                // reserved, offset and M flag, identification.
                let header = frame
                    .at::<[u8; 8]>(offset)
                    .ok_or(need(OutsideReason::Ipv6ExtensionChain))?;
                // SAFETY: `at` checked that the 8 bytes lie inside the frame.
                let header = unsafe { *header };
                let frag = u16::from_be_bytes([header[2], header[3]]);
                let id = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
                if frag & 0xfff8 != 0 {
                    first_fragment = false;
                    fragment = Fragment::Later;
                    fragment_id = id;
                } else if frag & 1 != 0 {
                    fragment = Fragment::First;
                    fragment_id = id;
                }
                8
            }
            _ => 0,
        };
        next = following;
        offset += len;
        if offset > MAX_L4_OFFSET {
            return Err(ParseError::Outside(OutsideReason::Ipv6ExtensionChain));
        }
    }
    if !chain_done && is_extension_header(next) {
        return Err(ParseError::Outside(OutsideReason::Ipv6ExtensionChain));
    }
    key.proto = next;
    let (l4_len, observe) = if first_fragment {
        parse_l4(frame, offset, next, key, ephemeral_start, is_known)
    } else {
        mark_l4_missing(next, key);
        (0, NOT_OBSERVED)
    };
    // payload_len 0 is a jumbogram or a BIG TCP aggregate: the caller takes
    // the length from the skb.
    let l3_len = if payload_len == 0 {
        0
    } else {
        payload_len as u32 + Ipv6Hdr::LEN as u32
    };
    let header_len = (offset - l3 + l4_len) as u32;
    Ok(Parsed {
        l3_offset: l3,
        l4_offset: offset,
        l3_len,
        header_len,
        observe,
        fragment,
        fragment_id,
        tcp_flags: unreachable_part(key, ipproto::ICMPV6, 1, l4_len),
    })
}

#[inline(always)]
fn is_extension_header(next: u8) -> bool {
    matches!(
        next,
        ipproto::HOPOPTS | ipproto::ROUTING | ipproto::DSTOPTS | ipproto::AH | ipproto::FRAGMENT
    )
}

/// Notes that the service port is the frame's source port (the server's
/// frame), for flow export.
#[inline(always)]
fn mark_service_side(key: &mut FlowKey, sport: u16, dport: u16) {
    key.flags |= service_side(key.port, sport, dport);
}

/// [`key_flags::SERVICE_PORT_IS_SRC`] when the chosen service port is the
/// source port (the frame is the server's), else 0.
#[inline(always)]
fn service_side(port: u16, sport: u16, dport: u16) -> u8 {
    if port != 0 && port == sport && sport != dport {
        key_flags::SERVICE_PORT_IS_SRC
    } else {
        0
    }
}

/// For protocols with ports or an ICMP type: says this packet has none, so
/// that port 0 is not read as ICMP type 0 (echo reply).
#[inline(always)]
fn mark_l4_missing(proto: u8, key: &mut FlowKey) {
    if matches!(
        proto,
        ipproto::TCP
            | ipproto::UDP
            | ipproto::UDPLITE
            | ipproto::SCTP
            | ipproto::ICMP
            | ipproto::ICMPV6
    ) {
        key.flags |= key_flags::L4_MISSING;
    }
}

/// Fills `key.port` from the L4 header at `l4` and returns the L4 header
/// length (0 when unknown or cut short: the frame is still counted by its IP
/// header, just without a port), with whether the agent wants the frame
/// for names (`Parsed::observe`), by its ports. A handshake is looked for
/// in common frames only ([`parse_common`]): tested here too, in every
/// path the full parse can take, it doubled the verifier's work and the
/// agent's start.
#[inline(always)]
fn parse_l4(
    frame: &Frame,
    l4: usize,
    proto: u8,
    key: &mut FlowKey,
    ephemeral_start: u16,
    is_known: impl Fn(PortClass, u16) -> bool,
) -> (usize, u8) {
    if l4 > MAX_L4_OFFSET {
        mark_l4_missing(proto, key);
        return (0, NOT_OBSERVED);
    }
    match proto {
        ipproto::TCP => {
            let Some(tcp) = frame.at::<TcpHdr>(l4) else {
                mark_l4_missing(proto, key);
                return (0, NOT_OBSERVED);
            };
            // SAFETY: `at` checked that the 20-byte TCP header (ports, and
            // the data offset at byte 12) is in the frame.
            let (sport, dport, doff) = unsafe {
                (
                    u16::from_be_bytes((*tcp).source),
                    u16::from_be_bytes((*tcp).dest),
                    // Data offset: high nibble of byte 12.
                    *((tcp as *const u8).add(12)) >> 4,
                )
            };
            key.port = service_port::choose(sport, dport, ephemeral_start, |p| {
                is_known(PortClass::Tcp, p)
            });
            mark_service_side(key, sport, dport);
            (doff as usize * 4, observed(true, sport, dport))
        }
        ipproto::UDP | ipproto::UDPLITE | ipproto::SCTP => {
            // SCTP's common header starts with the same two ports; UDP-Lite's
            // header is UDP's.
            let Some(udp) = frame.at::<UdpHdr>(l4) else {
                mark_l4_missing(proto, key);
                return (0, NOT_OBSERVED);
            };
            // SAFETY: `at` checked that the 8-byte header is in the frame.
            let (sport, dport) = unsafe {
                (
                    u16::from_be_bytes((*udp).src),
                    u16::from_be_bytes((*udp).dst),
                )
            };
            let class = if proto == ipproto::SCTP {
                PortClass::Sctp
            } else {
                PortClass::Udp
            };
            key.port = service_port::choose(sport, dport, ephemeral_start, |p| is_known(class, p));
            mark_service_side(key, sport, dport);
            if proto == ipproto::SCTP {
                (12, NOT_OBSERVED)
            } else {
                (UdpHdr::LEN, observed(false, sport, dport))
            }
        }
        ipproto::ICMP | ipproto::ICMPV6 => match frame.pair(l4) {
            Some([icmp_type, _code]) => {
                key.port = icmp_type as u16;
                // Type, code, checksum, and the 4-byte rest-of-header.
                (8, NOT_OBSERVED)
            }
            None => {
                mark_l4_missing(proto, key);
                (0, NOT_OBSERVED)
            }
        },
        _ => (0, NOT_OBSERVED),
    }
}

#[inline(always)]
fn observed(tcp: bool, sport: u16, dport: u16) -> u8 {
    match observe::Kind::of_ports(tcp, sport, dport) {
        Some(kind) => kind as u8,
        None => NOT_OBSERVED,
    }
}
