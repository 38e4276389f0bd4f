//! Frames the kernel hands to the agent for names: DNS responses and DHCP
//! messages, and the handshakes that name a server (a TLS ClientHello over
//! TCP, a QUIC Initial), copied whole (up to [`CAPTURE_BYTES`]) into a ring
//! buffer.
//!
//! The kernel only picks them out, by port or by the first bytes of their
//! payload, and copies them, within a rate per CPU; every decision about
//! what they say is the agent's.

/// Bytes of a frame copied at most: more than an Ethernet MTU, so every
/// DNS response over UDP that is not fragmented. A power of two, so that
/// the kernel program can bound the copy's length with a mask, the one
/// form the verifier follows through to the helper's argument.
pub const CAPTURE_BYTES: usize = 2048;

/// Size of the ring buffer (a power of two of pages): some 1,000 records,
/// a quarter of a second of the default rate on a 2-CPU machine (the
/// agent reads them as they come).
pub const RING_BYTES: u32 = 2 << 20;

/// Default of `--observe-rate`: frames of each kind handed over per second
/// per CPU at most.
pub const DEFAULT_RATE_PER_CPU: u32 = 2000;

/// What a handed-over frame is.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// From port 53, UDP or TCP (with payload).
    Dns = 0,
    /// DHCPv4 (ports 67 and 68) or DHCPv6 (546 and 547), either way.
    Dhcp = 1,
    /// A TCP segment, any port, whose data begins a TLS handshake record
    /// holding a ClientHello ([`starts_client_hello`]).
    Tls = 2,
    /// A UDP datagram, any port, of at least [`QUIC_MIN_DATAGRAM`] bytes
    /// whose first packet is a QUIC v1 or v2 Initial ([`starts_quic_initial`]).
    Quic = 3,
}

impl Kind {
    pub const COUNT: u32 = 4;
    pub const ALL: [Kind; 4] = [Kind::Dns, Kind::Dhcp, Kind::Tls, Kind::Quic];

    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::Dns),
            1 => Some(Self::Dhcp),
            2 => Some(Self::Tls),
            3 => Some(Self::Quic),
            _ => None,
        }
    }

    /// What a UDP or TCP packet between these ports is, if the agent wants
    /// to see it for DNS or DHCP. Called for every packet: for nearly all of them two
    /// compares (not from port 53, and a port above DHCP's).
    #[inline(always)]
    pub fn of_ports(tcp: bool, sport: u16, dport: u16) -> Option<Self> {
        if sport == 53 {
            return Some(Self::Dns);
        }
        // Every DHCP port is below 548: one compare of the two ports' OR
        // (at least as large as either) leaves out all other traffic.
        if tcp || (sport | dport) > 547 {
            return None;
        }
        match (sport, dport) {
            (68, 67) | (67, 68) | (546, 547) | (547, 546) => Some(Self::Dhcp),
            _ => None,
        }
    }
}

/// The first bytes of a TCP segment's data that may begin a ClientHello:
/// a handshake record (22), TLS major version 3, and the record's first
/// message a ClientHello (1, after the 5-byte record header).
pub const HELLO_PREFIX_LEN: usize = 6;

/// Whether `first` (the first [`HELLO_PREFIX_LEN`] bytes of a segment's
/// data, as a little-endian word and the byte after it) begins a
/// ClientHello.
#[inline(always)]
pub fn starts_client_hello(word: u32, sixth: u8) -> bool {
    // Bytes 0 and 1: 0x16 0x03 (byte 0 lowest in the little-endian word).
    word & 0xffff == 0x0316 && sixth == 1
}

/// A client's datagrams carrying Initials are at least this long (RFC 9000
/// 14.1): smaller UDP datagrams are never looked into.
pub const QUIC_MIN_DATAGRAM: u32 = 1200;

/// QUIC version 1 (RFC 9000) and version 2 (RFC 9369), as the wire has
/// them (big-endian).
pub const QUIC_V1: u32 = 0x0000_0001;
pub const QUIC_V2: u32 = 0x6b33_43cf;

/// Whether a UDP payload whose first byte is `first` and whose next four
/// are `version` (big-endian, as read) is a QUIC Initial: a long header
/// with the fixed bit, and the Initial type of its version (0 in v1, 1 in
/// v2).
#[inline(always)]
pub fn starts_quic_initial(first: u8, version: u32) -> bool {
    (version == QUIC_V1 && first & 0xf0 == 0xc0) || (version == QUIC_V2 && first & 0xf0 == 0xd0)
}

/// Why a frame chosen for the agent was not handed over: indexes of
/// [`crate::names::OBSERVE_DROPS`] are `kind * DropReason::COUNT + reason`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// Over the rate per CPU (`--observe-rate`).
    RateLimited = 0,
    /// The ring buffer was full: the agent did not keep up.
    RingFull = 1,
}

impl DropReason {
    pub const COUNT: u32 = 2;
    pub const ALL: [DropReason; 2] = [DropReason::RateLimited, DropReason::RingFull];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::RateLimited => "rate_limited",
            Self::RingFull => "ring_full",
        }
    }
}

/// Entries of [`crate::names::OBSERVE_DROPS`].
pub const DROP_SLOTS: u32 = Kind::COUNT * DropReason::COUNT;

/// `Header::link` values: what the captured bytes start with.
pub mod link {
    pub const ETHERNET: u8 = 0;
    pub const RAW_IP: u8 = 1;
}

/// The fixed part of a record.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Header {
    pub ifindex: u32,
    /// The frame's length on the wire (the skb's), which may exceed what
    /// was captured.
    pub frame_len: u32,
    /// Bytes of `Record::data` that hold the frame, from its first byte.
    pub captured: u16,
    /// A [`crate::Hook`].
    pub hook: u8,
    /// A [`link`] value.
    pub link: u8,
    /// A [`Kind`].
    pub kind: u8,
    pub _pad: [u8; 3],
}

/// One ring buffer record.
#[repr(C)]
pub struct Record {
    pub header: Header,
    pub data: [u8; CAPTURE_BYTES],
}

/// Record size, as the ring buffer holds it.
pub const RECORD_BYTES: usize = core::mem::size_of::<Record>();
const _: () = assert!(RECORD_BYTES == 16 + CAPTURE_BYTES);
const _: () = assert!(CAPTURE_BYTES.is_power_of_two());
const _: () = assert!(RECORD_BYTES.is_multiple_of(8));

impl Header {
    /// Reads a header from the front of a record's bytes.
    pub fn read(bytes: &[u8]) -> Option<Self> {
        let b = bytes.get(..16)?;
        Some(Self {
            ifindex: u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
            frame_len: u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
            captured: u16::from_ne_bytes([b[8], b[9]]),
            hook: b[10],
            link: b[11],
            kind: b[12],
            _pad: [0; 3],
        })
    }
}

/// Entries of [`crate::names::MACS`], the kernel's LRU table of which
/// MAC sent from which IP address.
pub const MAC_ENTRIES: u32 = 16_384;

/// A key of [`crate::names::MACS`]: an IP address (IPv4 in the first four
/// bytes) and its family.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MacKey {
    pub addr: [u8; 16],
    pub family: u8,
    pub _pad: [u8; 3],
}

/// A value of [`crate::names::MACS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MacValue {
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
}

/// Networks per family whose sources' MACs are learnt.
pub const MAC_NETS: usize = 16;

/// The value of [`crate::names::MAC_NETS`]: the networks whose sources'
/// MACs the kernel learns (the agent's `--local-net`: only a local
/// address's frames carry its device's MAC; a remote one's carry the
/// router's, which the agent never uses). Addresses and masks in network
/// byte order, as the frame has them; IPv4 in one word.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MacNets {
    /// IPv4 networks: (address, mask).
    pub v4: [[u32; 2]; MAC_NETS],
    /// IPv6 networks: address words then mask words.
    pub v6: [[u32; 8]; MAC_NETS],
    pub v4_count: u32,
    pub v6_count: u32,
    /// Non-zero: learn from every source (more networks than fit, or the
    /// agent's default before it writes its own).
    pub all: u32,
    pub _pad: u32,
}

impl MacNets {
    /// Learn from every source.
    pub const ALL: MacNets = MacNets {
        v4: [[0; 2]; MAC_NETS],
        v6: [[0; 8]; MAC_NETS],
        v4_count: 0,
        v6_count: 0,
        all: 1,
        _pad: 0,
    };

    /// Whether an address (IPv4 in the first word) of `family` is in one
    /// of the networks.
    #[inline(always)]
    pub fn contains(&self, family: u8, addr: &[u32; 4]) -> bool {
        if self.all != 0 {
            return true;
        }
        if family == crate::family::IPV4 {
            for i in 0..MAC_NETS {
                if i as u32 >= self.v4_count {
                    break;
                }
                let [net, mask] = self.v4[i];
                if addr[0] & mask == net {
                    return true;
                }
            }
        } else if family == crate::family::IPV6 {
            for i in 0..MAC_NETS {
                if i as u32 >= self.v6_count {
                    break;
                }
                let n = &self.v6[i];
                if addr[0] & n[4] == n[0]
                    && addr[1] & n[5] == n[1]
                    && addr[2] & n[6] == n[2]
                    && addr[3] & n[7] == n[3]
                {
                    return true;
                }
            }
        }
        false
    }
}

const _: () = assert!(core::mem::size_of::<MacNets>() == 16 * 8 + 16 * 32 + 16);
const _: () = assert!(core::mem::size_of::<MacKey>() == 20);
const _: () = assert!(core::mem::size_of::<MacValue>() == 8);

#[cfg(feature = "user")]
mod pod {
    // SAFETY (both): repr(C), only byte arrays and bytes, sizes asserted
    // above with no implicit padding, so any bit pattern is a valid value.
    // SAFETY: as above.
    unsafe impl aya::Pod for super::MacKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::MacValue {}
    // SAFETY: repr(C), only u32 arrays and u32s, size asserted above with no
    // implicit padding, so any bit pattern is a valid value.
    unsafe impl aya::Pod for super::MacNets {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_and_initial_prefixes() {
        let word = |b: [u8; 4]| u32::from_le_bytes(b);
        assert!(starts_client_hello(word([0x16, 3, 1, 2]), 1));
        assert!(
            !starts_client_hello(word([0x16, 3, 1, 2]), 2),
            "a ServerHello"
        );
        assert!(
            !starts_client_hello(word([0x17, 3, 3, 0]), 1),
            "application data"
        );
        assert!(!starts_client_hello(word([0x16, 2, 0, 0]), 1), "SSL 2");
        assert!(starts_quic_initial(0xc3, QUIC_V1));
        assert!(starts_quic_initial(0xd0, QUIC_V2));
        assert!(!starts_quic_initial(0xe0, QUIC_V1), "a v1 Handshake packet");
        assert!(!starts_quic_initial(0xc0, QUIC_V2), "v2's 0-RTT type");
        assert!(!starts_quic_initial(0x40, QUIC_V1), "a short header");
        assert!(!starts_quic_initial(0xc0, 0), "version negotiation");
    }

    #[test]
    fn dns_from_port_53_dhcp_both_ways() {
        assert_eq!(Kind::of_ports(false, 53, 40000), Some(Kind::Dns));
        assert_eq!(Kind::of_ports(true, 53, 40000), Some(Kind::Dns));
        // Queries are not wanted: only answers say which name has which address.
        assert_eq!(Kind::of_ports(false, 40000, 53), None);
        assert_eq!(Kind::of_ports(false, 68, 67), Some(Kind::Dhcp));
        assert_eq!(Kind::of_ports(false, 67, 68), Some(Kind::Dhcp));
        assert_eq!(Kind::of_ports(false, 546, 547), Some(Kind::Dhcp));
        assert_eq!(Kind::of_ports(true, 68, 67), None);
        assert_eq!(Kind::of_ports(false, 80, 443), None);
    }

    #[test]
    fn a_header_reads_back() {
        let mut bytes = [0u8; 16];
        bytes[0..4].copy_from_slice(&7u32.to_ne_bytes());
        bytes[4..8].copy_from_slice(&1600u32.to_ne_bytes());
        bytes[8..10].copy_from_slice(&1520u16.to_ne_bytes());
        bytes[10] = 1;
        bytes[12] = 1;
        let h = Header::read(&bytes).unwrap();
        assert_eq!((h.ifindex, h.frame_len, h.captured), (7, 1600, 1520));
        assert_eq!((h.hook, h.link, h.kind), (1, 0, 1));
        assert!(Header::read(&bytes[..15]).is_none());
    }
}
