//! What the ntm kernel program and the ntm agent must agree on: the layout of
//! the flow-table key and value, the map names, the reasons a frame can be
//! counted outside the flow table, and the service-port rule.
//!
//! Everything here is `no_std` and free of aya so that the same code runs in
//! the kernel (compiled for bpfel) and in host unit tests.
#![no_std]

pub mod service_port;

/// Names of the maps and programs in the eBPF object, shared so that a rename
/// on one side is a compile error on the other rather than a load failure.
pub mod names {
    /// ARRAY_OF_MAPS with one slot: the flow table the program counts into.
    pub const ACTIVE_SLOT: &str = "NTM_ACTIVE_FLOWS";
    /// The two per-CPU flow tables that take turns behind [`ACTIVE_SLOT`].
    pub const FLOW_TABLES: [&str; 2] = ["NTM_FLOWS_A", "NTM_FLOWS_B"];
    /// ARRAY_OF_MAPS with one slot: the flow cache the program counts into.
    pub const ACTIVE_CACHE_SLOT: &str = "NTM_ACTIVE_CACHE";
    /// The two per-CPU flow caches that take turns behind [`ACTIVE_CACHE_SLOT`].
    pub const FLOW_CACHES: [&str; 2] = ["NTM_CACHE_A", "NTM_CACHE_B"];
    /// Per-CPU array of [`crate::Counters`], one per [`crate::OutsideReason`].
    pub const OUTSIDE_COUNTERS: &str = "NTM_OUTSIDE";
    /// Bitmap of known service ports, see [`crate::service_port::KnownPorts`].
    pub const KNOWN_PORTS: &str = "NTM_KNOWN_PORTS";
    /// Read-only global: first port of the client ephemeral range.
    pub const EPHEMERAL_START: &str = "NTM_EPHEMERAL_START";

    pub const PROG_TC_INGRESS_ETH: &str = "ntm_tc_ingress_eth";
    pub const PROG_TC_EGRESS_ETH: &str = "ntm_tc_egress_eth";
    pub const PROG_TC_INGRESS_L3: &str = "ntm_tc_ingress_l3";
    pub const PROG_TC_EGRESS_L3: &str = "ntm_tc_egress_l3";
    pub const PROG_XDP: &str = "ntm_xdp";
    /// Read-only global: XDP_PASS or XDP_DROP after counting, in XDP mode.
    pub const XDP_ACTION: &str = "NTM_XDP_ACTION";
}

/// Compile-time capacity of each flow table; the agent may change it at load
/// time (`--flow-table-size`). Both tables always have the same size, since an
/// ARRAY_OF_MAPS slot only accepts maps shaped like its template.
pub const DEFAULT_FLOW_TABLE_ENTRIES: u32 = 65_536;

/// Slots of each per-CPU flow cache (a power of two).
pub const FLOW_CACHE_SLOTS: u32 = 4096;

/// Size in 32-bit words of the known-port bitmap (3 protocol classes x 65536
/// ports).
pub const KNOWN_PORT_WORDS: u32 = service_port::PortClass::COUNT * (65_536 / 32);

/// Which hook saw the frame.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Ingress = 0,
    Egress = 1,
}

impl Direction {
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::Ingress),
            1 => Some(Self::Egress),
            _ => None,
        }
    }
}

/// `FlowKey::family` values. `NON_IP` keys carry the EtherType in `port`.
pub mod family {
    pub const NON_IP: u8 = 0;
    pub const IPV4: u8 = 4;
    pub const IPV6: u8 = 6;
}

/// `FlowKey::flags` bits.
pub mod key_flags {
    /// The packet's protocol has ports (or an ICMP type) but this packet
    /// carries no such header: a later fragment, or a header cut short. Its
    /// `port` is 0 and means "none", not ICMP type 0.
    pub const L4_MISSING: u8 = 1;
}

/// IP protocol numbers the parser and the labels care about.
pub mod ipproto {
    pub const HOPOPTS: u8 = 0;
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const ROUTING: u8 = 43;
    pub const FRAGMENT: u8 = 44;
    pub const ESP: u8 = 50;
    pub const AH: u8 = 51;
    pub const ICMPV6: u8 = 58;
    pub const NONE: u8 = 59;
    pub const DSTOPTS: u8 = 60;
    pub const SCTP: u8 = 132;
    pub const UDPLITE: u8 = 136;
}

/// One flow: what every counted frame is grouped by.
///
/// Addresses are 16 bytes for both families (IPv4 uses the first four, the
/// rest is zero) so that IPv4 and IPv6 share one table. Every byte is a named
/// field, so there is no implicit padding that could differ between the
/// kernel's and the agent's copy of a key and make lookups miss.
///
/// 8-byte alignment lets the BPF backend initialise and copy the key with
/// 8-byte stores; with less it calls a byte-by-byte memset/memcpy, which
/// cost more than all the parsing.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// Interface index the frame was seen on.
    pub ifindex: u32,
    /// Outermost VLAN id (0: untagged).
    pub vlan_id: u16,
    /// Service (server-side) port for TCP/UDP/UDP-Lite/SCTP, 0 when there is
    /// none; ICMP/ICMPv6 message type; EtherType for non-IP frames.
    pub port: u16,
    /// One of [`family`].
    pub family: u8,
    /// IP protocol number (0 for non-IP frames).
    pub proto: u8,
    /// [`Direction`] as u8.
    pub direction: u8,
    /// [`key_flags`] bits.
    pub flags: u8,
    /// Always zero; fills the key to a multiple of 8 bytes with no implicit
    /// padding.
    pub _pad: [u8; 4],
}

const _: () = assert!(core::mem::size_of::<FlowKey>() == 48);
const _: () = assert!(core::mem::align_of::<FlowKey>() == 8);

/// Bytes and packets. Bytes are L3 bytes: the IPv4 total length, or the IPv6
/// payload length + 40, as the tool ntm replaces counted them; for non-IP
/// frames the frame length without the link-layer header.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub bytes: u64,
    pub packets: u64,
}

const _: () = assert!(core::mem::size_of::<Counters>() == 16);

impl Counters {
    pub fn add(&mut self, other: &Counters) {
        self.bytes = self.bytes.wrapping_add(other.bytes);
        self.packets = self.packets.wrapping_add(other.packets);
    }
}

/// One slot of the per-CPU flow cache that sits in front of the flow table.
///
/// A per-CPU hash update costs more than everything else the program does;
/// an array slot picked by a cheap hash of the key is a few instructions.
/// The cache keeps the counts of one flow per slot; when another flow needs
/// the slot, the old flow's counts move into the flow table. The drain reads
/// both, so every count lives in exactly one place at any time. An empty slot
/// has `counters.packets == 0`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheSlot {
    pub key: FlowKey,
    pub counters: Counters,
}

const _: () = assert!(core::mem::size_of::<CacheSlot>() == 64);

/// Words of a [`FlowKey`], for the cache's compare and hash.
pub const KEY_WORDS: usize = core::mem::size_of::<FlowKey>() / 8;

/// The cache slot of a key (given as its [`KEY_WORDS`] 8-byte words): cheap
/// enough for every packet, and mixing every word.
#[inline(always)]
pub fn cache_index(words: &[u64; KEY_WORDS]) -> u32 {
    let mixed = words[0]
        ^ words[1].rotate_left(17)
        ^ words[2].rotate_left(31)
        ^ words[3].rotate_left(43)
        ^ words[4].rotate_left(53)
        ^ words[5].rotate_left(7);
    // Two rounds of a multiply-xorshift finaliser (as in splitmix64), so
    // that keys differing in a few low bits still spread over all slots.
    let mut h = mixed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    h ^= h >> 29;
    h = h.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    h ^= h >> 32;
    (h as u32) & (FLOW_CACHE_SLOTS - 1)
}

impl FlowKey {
    /// The key as 8-byte words (it is 8-byte aligned and a multiple of 8).
    pub fn words(&self) -> [u64; KEY_WORDS] {
        let mut words = [0u64; KEY_WORDS];
        for (i, w) in words.iter_mut().enumerate() {
            // SAFETY: i < KEY_WORDS, so every read is inside the key.
            *w = unsafe { *(self as *const FlowKey as *const u64).add(i) };
        }
        words
    }
}

/// Why a frame was counted outside the flow table. Every frame the program
/// sees ends up either in exactly one flow entry or in exactly one of these,
/// so the sum of both always equals what crossed the hook.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutsideReason {
    /// The flow table was full (-E2BIG): the overflow bucket.
    TableFull = 0,
    /// Any other insert failure (-ENOMEM, -EBUSY, ...).
    InsertFailed = 1,
    /// No flow table in the active slot (only between load and first swap).
    NoActiveTable = 2,
    /// Frame shorter than its link-layer header (Ethernet or VLAN tags).
    TruncatedL2 = 3,
    /// IPv4 header missing, cut short, with a bad IHL or version, or a total
    /// length that does not fit the frame.
    MalformedIpv4 = 4,
    /// IPv6 header missing or cut short, or a payload length that does not
    /// fit the frame.
    MalformedIpv6 = 5,
    /// More IPv6 extension headers than the parser follows, or one cut short.
    Ipv6ExtensionChain = 6,
    /// An L3-only interface delivered something that is neither IPv4 nor IPv6.
    UnknownL3 = 7,
}

impl OutsideReason {
    pub const COUNT: u32 = 8;
    pub const ALL: [OutsideReason; Self::COUNT as usize] = [
        Self::TableFull,
        Self::InsertFailed,
        Self::NoActiveTable,
        Self::TruncatedL2,
        Self::MalformedIpv4,
        Self::MalformedIpv6,
        Self::Ipv6ExtensionChain,
        Self::UnknownL3,
    ];

    /// Stable label value for self-metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TableFull => "table_full",
            Self::InsertFailed => "insert_failed",
            Self::NoActiveTable => "no_active_table",
            Self::TruncatedL2 => "truncated_l2",
            Self::MalformedIpv4 => "malformed_ipv4",
            Self::MalformedIpv6 => "malformed_ipv6",
            Self::Ipv6ExtensionChain => "ipv6_extension_chain",
            Self::UnknownL3 => "unknown_l3",
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: both are repr(C), made only of integers and byte arrays, with no
    // implicit padding (asserted above), so any bit pattern is valid.
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::Counters {}
    unsafe impl aya::Pod for super::CacheSlot {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flow_key_has_no_implicit_padding() {
        // Field sizes add up to the struct size: nothing is hidden in between.
        let fields = 16 + 16 + 4 + 2 + 2 + 1 + 1 + 1 + 1 + 4;
        assert_eq!(core::mem::size_of::<FlowKey>(), fields);
        let k = FlowKey::default();
        let base = &k as *const FlowKey as usize;
        assert_eq!(&k.ifindex as *const u32 as usize - base, 32);
        assert_eq!(&k.vlan_id as *const u16 as usize - base, 36);
        assert_eq!(&k.port as *const u16 as usize - base, 38);
        assert_eq!(&k.family as *const u8 as usize - base, 40);
        assert_eq!(&k.flags as *const u8 as usize - base, 43);
        assert_eq!(&k._pad as *const [u8; 4] as usize - base, 44);
    }

    #[test]
    fn cache_index_is_in_range_and_spreads_keys() {
        let mut used = [false; FLOW_CACHE_SLOTS as usize];
        for i in 0..1000u32 {
            let mut k = FlowKey {
                family: family::IPV4,
                proto: 6,
                port: 443,
                ifindex: 2,
                ..Default::default()
            };
            k.src[..4].copy_from_slice(&(0xC612_0000 | i).to_be_bytes());
            let index = cache_index(&k.words());
            assert!(index < FLOW_CACHE_SLOTS);
            used[index as usize] = true;
        }
        // 1000 keys differing only in one address byte pair land in many slots.
        let distinct = used.iter().filter(|u| **u).count();
        assert!(distinct > 800, "only {distinct} slots for 1000 keys");
    }

    #[test]
    fn outside_reasons_are_dense_and_named() {
        for (i, r) in OutsideReason::ALL.iter().enumerate() {
            assert_eq!(*r as u32, i as u32);
            assert!(!r.as_str().is_empty());
        }
    }

    #[test]
    fn direction_round_trips() {
        assert_eq!(Direction::from_u8(0), Some(Direction::Ingress));
        assert_eq!(Direction::from_u8(1), Some(Direction::Egress));
        assert_eq!(Direction::from_u8(2), None);
    }
}
