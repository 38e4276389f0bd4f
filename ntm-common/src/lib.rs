//! What the ntm kernel program and the ntm agent must agree on: the layout of
//! the flow-table key and value, the map names, the reasons a frame can be
//! counted outside the flow table, and the service-port rule.
//!
//! Everything here is `no_std` and free of aya so that the same code runs in
//! the kernel (compiled for bpfel) and in host unit tests.
#![no_std]

pub mod handshake;
pub mod observe;
pub mod programs;
pub mod service_port;
#[cfg(any(test, feature = "test-util"))]
pub mod test_util;

/// Names of the maps in the eBPF object, shared so that a rename on one side
/// is a compile error on the other rather than a load failure. (Programs are
/// declared in [`programs`].)
pub mod names {
    /// ARRAY_OF_MAPS with one slot: the flow table the program counts into.
    pub const ACTIVE_SLOT: &str = "NTM_ACTIVE_FLOWS";
    /// The two per-CPU flow tables that take turns behind [`ACTIVE_SLOT`].
    pub const FLOW_TABLES: [&str; 2] = ["NTM_FLOWS_A", "NTM_FLOWS_B"];
    /// Per-CPU array of [`crate::CacheSlot`]s: the flow cache, two halves
    /// of [`crate::FLOW_CACHE_SLOTS`] that take turns like the tables.
    pub const FLOW_CACHE: &str = "NTM_FLOW_SLOTS";
    /// The data section of one u32 (an array of one value): the half of
    /// [`FLOW_CACHE`] the programs count into, or [`crate::CACHE_OFF`].
    /// The agent sets it before it swaps the tables, whose swap waits for
    /// every program that may still use the other half.
    pub const CACHE_HALF: &str = ".data.ntm_cache";
    /// The flow cache of layout 2, which a drain of pinned state still
    /// reads: slots of a flow key and its counts (`layout_2::CacheSlot`
    /// in the agent's drain), keyed by the flow alone.
    pub mod layout_2 {
        /// The per-CPU array of two halves, as [`super::FLOW_CACHE`].
        pub const FLOW_CACHE: &str = "NTM_FLOW_CACHE";
    }
    /// The flow cache of layout 1, which a drain of pinned state still
    /// reads: two per-CPU arrays behind a map-in-map slot.
    pub mod layout_1 {
        /// ARRAY_OF_MAPS with one slot: the flow cache counted into.
        pub const ACTIVE_CACHE_SLOT: &str = "NTM_ACTIVE_CACHE";
        /// The two caches that took turns behind [`ACTIVE_CACHE_SLOT`].
        pub const FLOW_CACHES: [&str; 2] = ["NTM_CACHE_A", "NTM_CACHE_B"];
    }
    /// Per-CPU array of [`crate::OutsideSlot`]s: frames filtered out or
    /// finding the table full, by generation, interface (direct-mapped, see
    /// [`crate::outside_slot_index`]), hook and reason. The hot path:
    /// an array slot, no hashing.
    pub const OUTSIDE_SLOTS: &str = "NTM_OUTSIDE_SLOTS";
    /// Per-CPU hash of [`crate::OutsideKey`] to [`crate::Counters`]: the
    /// other outside counts (malformed frames and the like), and those of
    /// an interface whose [`OUTSIDE_SLOTS`] slot another interface holds.
    pub const OUTSIDE_COUNTERS: &str = "NTM_OUTSIDE";
    /// Per-CPU array of [`crate::Counters`] for the rare frame whose
    /// [`OUTSIDE_COUNTERS`] entry could not be made (the hash is full): by
    /// generation, hook and reason, interface unknown. See
    /// [`crate::outside_unkeyed_index`].
    pub const OUTSIDE_UNKEYED: &str = "NTM_OUTSIDE_UNKEYED";
    /// Array of one u32: the generation (0 or 1) outside counts go to now.
    /// The agent flips it before swapping the flow tables, and so reads the
    /// other generation when no program can still be writing it.
    pub const OUTSIDE_GENERATION: &str = "NTM_OUTSIDE_GENERATION";
    /// Array of one u32: how many times the agent has swapped the flow
    /// tables, bumped once each swap has returned (no program holds the
    /// earlier table then). See [`TABLE_FULL`].
    pub const TABLE_EPOCH: &str = "NTM_TABLE_EPOCH";
    /// Per-CPU array of one u32: the [`TABLE_EPOCH`] (plus one) in which
    /// this CPU found the table full, so that its next new flows of that
    /// epoch go outside the table without another insert the kernel would
    /// refuse. Any other value: not known to be full.
    pub const TABLE_FULL: &str = "NTM_TABLE_FULL";
    /// Per-CPU array of one u64: frames whose flow was not in its flow-cache
    /// slot, since load (never reset). The agent compares it with the
    /// packets it drains to tell whether the cache pays, and turns it off
    /// (sets [`CACHE_HALF`] to [`crate::CACHE_OFF`]) while it does not.
    pub const CACHE_MISSES: &str = "NTM_CACHE_MISSES";
    /// Read-only global: the bitmap of known service ports, see
    /// [`crate::service_port::known_port_bit`].
    pub const KNOWN_PORTS: &str = "NTM_KNOWN_PORTS";
    /// Read-only global: first port of the client ephemeral range.
    pub const EPHEMERAL_START: &str = "NTM_EPHEMERAL_START";

    /// The data section of one u32 (an array of one value): 1 while a
    /// filter is in the hooks' filter slots, 0 while none is, when the
    /// programs count a frame without the tail call to an empty slot. The
    /// agent sets it after it fills the slots and clears it before it
    /// empties them.
    pub const FILTER_ON: &str = ".data.ntm_filter";
    /// PROG_ARRAY of the TC hooks: filter programs and counting halves.
    pub const TC_TAILS: &str = "NTM_TC_TAILS";
    /// PROG_ARRAY of the XDP hook (a program array holds one program type).
    pub const XDP_TAILS: &str = "NTM_XDP_TAILS";
    /// Per-CPU array of one u32: the filter's verdict for the frame being
    /// counted, handed from the filter program to the counting half.
    pub const FILTER_VERDICT: &str = "NTM_FILTER_VERDICT";
    /// Read-only global: XDP_PASS or XDP_DROP after counting, in XDP mode.
    pub const XDP_ACTION: &str = "NTM_XDP_ACTION";

    /// RINGBUF of [`crate::observe::Record`]s: DNS and DHCP frames for names.
    pub const OBSERVED: &str = "NTM_OBSERVED";
    /// Per-CPU array of u64: frames not handed over, see
    /// [`crate::observe::DropReason`].
    pub const OBSERVE_DROPS: &str = "NTM_OBSERVE_DROPS";
    /// Read-only global: frames of each kind handed over per second per CPU
    /// at most; 0 turns observation off (and the verifier removes its code).
    pub const OBSERVE_RATE: &str = "NTM_OBSERVE_RATE";
    /// Read-only global: which [`crate::observe::Kind`]s are handed over, a
    /// bit (`1 << kind`) each.
    pub const OBSERVE_KINDS: &str = "NTM_OBSERVE_KINDS";
    /// LRU_HASH of [`crate::observe::MacKey`] to [`crate::observe::MacValue`]:
    /// the MAC a frame came from, by its source address, written when a
    /// flow takes a flow-cache slot (not per packet).
    pub const MACS: &str = "NTM_MACS";
    /// Array of one [`crate::observe::MacNets`]: the sources whose MACs go
    /// into [`MACS`] (the agent's local networks).
    pub const MAC_NETS: &str = "NTM_MAC_NETS";
    /// Read-only global: 1 to fill [`MACS`], 0 not to (and the verifier
    /// removes the code).
    pub const LEARN_MACS: &str = "NTM_LEARN_MACS";
    /// LRU_HASH of fragmented datagrams (addresses, protocol, id) to the
    /// service port their first fragment had, for their later fragments.
    pub const FRAGMENTS: &str = "NTM_FRAGMENTS";
    /// Array of one u64: until when (CLOCK_MONOTONIC ns) the agent vouches
    /// for reading the tables; past it with no renewal the programs stop
    /// counting (the orphan timeout). 0: no timeout.
    pub const LEASE: &str = "NTM_LEASE";

    /// The program on the `tcp_retransmit_skb` raw tracepoint: counts the
    /// TCP segments this host's kernel retransmits, by connection.
    pub const RETRANSMIT_PROGRAM: &str = "ntm_tcp_retransmit";
    /// ARRAY_OF_MAPS with one slot: the retransmit table counted into now.
    pub const ACTIVE_RETRANSMITS: &str = "NTM_ACTIVE_RETRANSMITS";
    /// The two per-CPU hashes of [`crate::RetransmitKey`] to a u64 count
    /// that take turns behind [`ACTIVE_RETRANSMITS`], swapped and drained
    /// like the flow tables.
    pub const RETRANSMIT_TABLES: [&str; 2] = ["NTM_RETRANSMITS_A", "NTM_RETRANSMITS_B"];
    /// Per-CPU array of u64, since load: see [`crate::retransmit_lost`].
    pub const RETRANSMITS_LOST: &str = "NTM_RETRANSMITS_LOST";
    /// Read-only global: a [`crate::RetransmitLayout`], from the running
    /// kernel's BTF.
    pub const RETRANSMIT_LAYOUT: &str = "NTM_RETRANSMIT_LAYOUT";

    /// HASH of [`crate::handshake::HandshakeKey`] to
    /// [`crate::handshake::Handshake`]: TCP handshakes in flight and just
    /// ended, which the agent takes and deletes each drain.
    pub const HANDSHAKES: &str = "NTM_HANDSHAKES";
    /// Mmapable array of [`crate::handshake::GATE_SLOTS`] u64: the
    /// handshakes waiting for their client's ACK, by gate slot (see
    /// [`crate::handshake::gate_index`]).
    pub const HANDSHAKE_GATE: &str = "NTM_HANDSHAKE_GATE";
    /// Per-CPU array of u64, since load: see [`crate::handshake::lost`].
    pub const HANDSHAKES_LOST: &str = "NTM_HANDSHAKES_LOST";
    /// Read-only global: 1 to follow TCP handshakes, 0 not to (the
    /// verifier then drops the code).
    pub const TRACK_HANDSHAKES: &str = "NTM_TRACK_HANDSHAKES";

    /// The maps kept in bpffs across restarts (see [`crate::LAYOUT_VERSION`]):
    /// what the next agent reads (the tables and what points into them) and
    /// the program arrays, which the kernel would empty when the last
    /// process holding them goes (a filter would then be skipped).
    pub const PINNED: [&str; 11] = [
        ACTIVE_SLOT,
        FLOW_TABLES[0],
        FLOW_TABLES[1],
        FLOW_CACHE,
        OUTSIDE_SLOTS,
        OUTSIDE_COUNTERS,
        OUTSIDE_UNKEYED,
        OUTSIDE_GENERATION,
        TC_TAILS,
        XDP_TAILS,
        LEASE,
    ];
}

/// The layout of the state ntm keeps in bpffs across restarts: the names in
/// [`names::PINNED`], the flow key, counters, cache slots and outside keys
/// and slots, and how the drain reads them. A starting agent adopts and
/// drains state of its own layout; state of another layout it reads where
/// the formats allow and replaces. Change it with any of those.
///
/// 2: one flow cache of two halves where layout 1 had two caches behind a
/// map-in-map slot ([`names::layout_1`]).
///
/// 3: cache slots keyed by a [`SlotId`], a connection's for the common
/// frame ([`CacheSlot`]), where layout 2's were keyed by the flow key
/// ([`names::layout_2`]).
pub const LAYOUT_VERSION: u32 = 3;

/// Compile-time capacity of each flow table; the agent may change it at load
/// time (`--flow-table-size`). Both tables always have the same size, since an
/// ARRAY_OF_MAPS slot only accepts maps shaped like its template.
pub const DEFAULT_FLOW_TABLE_ENTRIES: u32 = 65_536;

/// Fragmented datagrams the kernel remembers the service port of, for
/// their later fragments (an LRU table, `NTM_FRAGMENTS`).
pub const FRAGMENT_ENTRIES: u32 = 4096;

/// Slots of each half of the per-CPU flow cache (a power of two).
pub const FLOW_CACHE_SLOTS: u32 = 4096;

/// What [`names::CACHE_HALF`] holds while the flow cache is off: any value
/// past the two halves puts a frame's slot index past the cache's end,
/// where the programs find no slot and count into the table directly.
pub const CACHE_OFF: u32 = 2;

/// Size in 32-bit words of the known-port bitmap (3 protocol classes x 65536
/// ports).
pub const KNOWN_PORT_WORDS: u32 = service_port::PortClass::COUNT * (65_536 / 32);

/// How a tcpdump filter is run before counting.
///
/// Each attached program first tail-calls its hook's filter slot. An empty
/// slot (no filter) returns at once and the program counts the frame itself.
/// A filter program (generated by the agent from libpcap's classic BPF)
/// stores its verdict in the per-CPU [`names::FILTER_VERDICT`] and
/// tail-calls the hook's counting half, which counts a matching frame as
/// usual and a non-matching one as [`OutsideReason::Filtered`]. Replacing the
/// program in a filter slot changes the filter atomically per frame.
pub mod tail {
    /// Slots of [`crate::names::TC_TAILS`].
    pub const FILTER_INGRESS_ETH: u32 = 0;
    pub const FILTER_EGRESS_ETH: u32 = 1;
    pub const FILTER_INGRESS_L3: u32 = 2;
    pub const FILTER_EGRESS_L3: u32 = 3;
    pub const COUNT_INGRESS_ETH: u32 = 4;
    pub const COUNT_EGRESS_ETH: u32 = 5;
    pub const COUNT_INGRESS_L3: u32 = 6;
    pub const COUNT_EGRESS_L3: u32 = 7;
    pub const OBSERVE_INGRESS_ETH: u32 = 8;
    pub const OBSERVE_EGRESS_ETH: u32 = 9;
    pub const OBSERVE_INGRESS_L3: u32 = 10;
    pub const OBSERVE_EGRESS_L3: u32 = 11;
    pub const TC_SLOTS: u32 = 12;
    /// Slots of [`crate::names::XDP_TAILS`].
    pub const FILTER_XDP: u32 = 0;
    pub const COUNT_XDP: u32 = 1;
    pub const OBSERVE_XDP: u32 = 2;
    pub const XDP_SLOTS: u32 = 3;

    /// Verdict values in [`crate::names::FILTER_VERDICT`].
    pub const VERDICT_MATCH: u32 = 1;
    pub const VERDICT_FILTERED: u32 = 2;
}

/// Which hook saw the frame.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Hook {
    Ingress = 0,
    Egress = 1,
}

impl Hook {
    pub const ALL: [Hook; 2] = [Self::Ingress, Self::Egress];

    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::Ingress),
            1 => Some(Self::Egress),
            _ => None,
        }
    }

    /// Stable label value (`hook` of ntm's own metrics).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ingress => "ingress",
            Self::Egress => "egress",
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
    /// The service port is the source port (the frame is the server's):
    /// flow export puts it on its real side. Constant for a flow's frames
    /// one way, so it splits no flow.
    pub const SERVICE_PORT_IS_SRC: u8 = 2;
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
    /// [`Hook`] as u8.
    pub hook: u8,
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
/// is all zero.
///
/// A slot is found by its [`SlotId`]: for the common frame (IPv4 or IPv6
/// carrying TCP or UDP, no options or extension headers) its connection's
/// (both ports, as the frame has them), which the frame gives without the
/// service-port rule; for any other frame its flow key. The flow key's port and flags, which the rule
/// decided when the connection took the slot, are kept in `flow`: a frame
/// of a connection already in its slot is counted without deciding them
/// again (the kernel's steady state, `steady.rs`). [`CacheSlot::flow_key`]
/// is the flow the slot's counts belong to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheSlot {
    pub id: SlotId,
    pub flow: SlotFlow,
    pub counters: Counters,
}

const _: () = assert!(core::mem::size_of::<CacheSlot>() == 72);

/// What a cache slot is found by: laid out as a [`FlowKey`], word for word,
/// so that a flow key is an id as it is. A connection's id differs in four
/// fields: `hook` has [`slot_id::CONNECTION`] set, `port` is 0, `flags`
/// holds the watch bits ([`slot_id::watch`]), and `ports` both ports as
/// the frame's TCP or UDP header has them (the flow key's padding there).
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotId {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub ifindex: u32,
    pub vlan_id: u16,
    /// The flow key's port; 0 in a connection's id.
    pub port: u16,
    pub family: u8,
    pub proto: u8,
    /// The [`Hook`] as u8, with [`slot_id::CONNECTION`] for a connection.
    pub hook: u8,
    /// A connection's watch bits; else the flow key's flags.
    pub flags: u8,
    /// A connection's source and destination ports, in network order;
    /// else 0.
    pub ports: [u8; 4],
}

const _: () = assert!(core::mem::size_of::<SlotId>() == core::mem::size_of::<FlowKey>());

/// The flow key's fields a connection's id does not hold: its service port
/// and its flags, as the frame that took the slot decided them.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotFlow {
    pub port: u16,
    pub flags: u8,
    pub _pad: [u8; 5],
}

const _: () = assert!(core::mem::size_of::<SlotFlow>() == 8);

/// The cache slot ids' words, as the kernel builds and compares them in
/// registers (one version per byte order, as `SlotId` lays its fields out:
/// word 4 holds ifindex, vlan_id and port, word 5 family, proto, hook,
/// flags and a connection's ports).
pub mod slot_id {
    use crate::KEY_WORDS;

    /// The bit of [`crate::SlotId::hook`] that marks a connection's id (a
    /// hook is 0 or 1).
    pub const CONNECTION: u8 = 0x80;

    /// A connection's watch bits ([`crate::SlotId::flags`]): while any is
    /// set its frames take the full path, which decides what they need
    /// (the steady state compares the id with the bits clear, so it never
    /// finds such a slot). The full path sets them again from each frame.
    pub mod watch {
        /// The last frame through the full path was one the agent wants
        /// for names: on ports it wants (DNS, DHCP), or a hello's segment,
        /// which the next ones may continue.
        pub const NAMES: u8 = 1;
        /// A client's SYN: its ACK of the SYN-ACK is to be followed.
        pub const HANDSHAKE: u8 = 2;
    }

    const LITTLE: bool = cfg!(target_endian = "little");

    /// The port field of word 4.
    pub const PORT_BITS: u64 = if LITTLE { 0xffff << 48 } else { 0xffff };
    /// The flags field of word 5.
    pub const FLAGS_BITS: u64 = if LITTLE { 0xff << 24 } else { 0xff << 32 };
    /// Word 5's family, proto and hook: what a flow key's word 5 keeps.
    pub const PROTOCOL_BITS: u64 = if LITTLE { 0xff_ffff } else { 0xff_ffff << 40 };

    /// [`CONNECTION`] where word 5 holds the hook.
    pub const CONNECTION_BITS: u64 = if LITTLE {
        (CONNECTION as u64) << 16
    } else {
        (CONNECTION as u64) << 40
    };

    /// `flags` where word 5 holds them.
    #[inline(always)]
    pub fn flags_bits(flags: u8) -> u64 {
        if LITTLE {
            (flags as u64) << 24
        } else {
            (flags as u64) << 32
        }
    }

    /// Both ports where word 5 holds them, from the first four bytes of a
    /// TCP or UDP header loaded as one u32 (in the machine's order).
    #[inline(always)]
    pub fn ports_bits(ports: u32) -> u64 {
        if LITTLE {
            (ports as u64) << 32
        } else {
            ports as u64
        }
    }

    /// A flow key's port and flags (from its words) as a
    /// [`crate::SlotFlow`] word.
    #[inline(always)]
    pub fn flow_of_key(key: &[u64; KEY_WORDS]) -> u64 {
        if LITTLE {
            key[4] >> 48 | ((key[5] >> 24) & 0xff) << 16
        } else {
            (key[4] & 0xffff) << 48 | ((key[5] >> 32) & 0xff) << 40
        }
    }

    /// What a connection's id holds in word 5 beyond its flow key's
    /// family, proto and hook: the connection's mark, its watch bits and
    /// its ports (as [`ports_bits`] takes them). Never 0.
    #[inline(always)]
    pub fn connection_part(ports: u32, watch: u8) -> u64 {
        CONNECTION_BITS | flags_bits(watch) | ports_bits(ports)
    }

    /// The id of a common frame's connection, from its flow key's words
    /// and its [`connection_part`].
    #[inline(always)]
    pub fn of_connection(key: &[u64; KEY_WORDS], part: u64) -> [u64; KEY_WORDS] {
        [
            key[0],
            key[1],
            key[2],
            key[3],
            key[4] & !PORT_BITS,
            (key[5] & PROTOCOL_BITS) | part,
        ]
    }

    /// The flow key (as words) of a slot's id and flow word: the id's
    /// addresses, interface and protocol, the flow word's port and flags.
    /// A flow key's id gives itself back.
    #[inline(always)]
    pub fn flow_key(id: &[u64; KEY_WORDS], flow: u64) -> [u64; KEY_WORDS] {
        // The flow word's port and flags (see `flow_of_key`).
        let (port, flags) = if LITTLE {
            (flow as u16, (flow >> 16) as u8)
        } else {
            ((flow >> 48) as u16, (flow >> 40) as u8)
        };
        let port = if LITTLE {
            (port as u64) << 48
        } else {
            port as u64
        };
        [
            id[0],
            id[1],
            id[2],
            id[3],
            (id[4] & !PORT_BITS) | port,
            (id[5] & PROTOCOL_BITS & !CONNECTION_BITS) | flags_bits(flags),
        ]
    }
}

impl CacheSlot {
    /// The flow the slot's counts belong to.
    pub fn flow_key(&self) -> FlowKey {
        // SAFETY: SlotId and SlotFlow are plain integers, 8-byte aligned,
        // KEY_WORDS and one words long.
        let (id, flow) = unsafe {
            (
                core::ptr::read(&self.id as *const SlotId as *const [u64; KEY_WORDS]),
                core::ptr::read(&self.flow as *const SlotFlow as *const u64),
            )
        };
        FlowKey::from_words(&slot_id::flow_key(&id, flow))
    }
}

/// Words of a [`FlowKey`], for the cache's compare and hash.
pub const KEY_WORDS: usize = core::mem::size_of::<FlowKey>() / 8;

/// The cache slot of an id (given as its [`KEY_WORDS`] 8-byte words, a
/// [`SlotId`]'s or a flow key's): cheap enough for every packet, and mixing
/// every word but the watch bits, which change while a connection holds
/// its slot. The words are folded into two, one with the source address,
/// the other with the destination, each multiplied by an odd 64-bit
/// constant of its own, and the top bits of the sum taken (multiply-shift):
/// every bit of every word reaches the top bits, a flow and its reverse
/// (addresses swapped) land apart, and it costs two multiplies, which the
/// CPU runs side by side. A collision only costs a hand-over to the flow
/// table.
#[inline(always)]
pub fn cache_index(words: &[u64; KEY_WORDS]) -> u32 {
    // Random odd constants (digits of pi, made odd).
    const SOURCE: u64 = 0x243F_6A88_85A3_08D3;
    const DESTINATION: u64 = 0x1319_8A2E_0370_7345;
    let source = words[0] ^ words[1] ^ words[4];
    let destination = words[2] ^ words[3] ^ (words[5] & !slot_id::FLAGS_BITS);
    let h = source
        .wrapping_mul(SOURCE)
        .wrapping_add(destination.wrapping_mul(DESTINATION));
    (h >> (64 - FLOW_CACHE_SLOTS.trailing_zeros())) as u32
}

impl FlowKey {
    /// The source address of an IP flow (None for non-IP frames).
    pub fn src_addr(&self) -> Option<core::net::IpAddr> {
        self.address(&self.src)
    }

    /// The destination address of an IP flow (None for non-IP frames).
    pub fn dst_addr(&self) -> Option<core::net::IpAddr> {
        self.address(&self.dst)
    }

    fn address(&self, bytes: &[u8; 16]) -> Option<core::net::IpAddr> {
        use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};
        match self.family {
            family::IPV4 => Some(IpAddr::V4(Ipv4Addr::new(
                bytes[0], bytes[1], bytes[2], bytes[3],
            ))),
            family::IPV6 => Some(IpAddr::V6(Ipv6Addr::from(*bytes))),
            _ => None,
        }
    }

    /// The key of its 8-byte words (see [`FlowKey::words`]).
    pub fn from_words(words: &[u64; KEY_WORDS]) -> FlowKey {
        let mut key = FlowKey::default();
        for (i, w) in words.iter().enumerate() {
            // SAFETY: i < KEY_WORDS, so every write is inside the key; any
            // bytes are a FlowKey (plain integers).
            unsafe { *(&mut key as *mut FlowKey as *mut u64).add(i) = *w };
        }
        key
    }

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
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
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
    /// The tcpdump filter did not match: not counted in any flow.
    Filtered = 8,
}

impl OutsideReason {
    pub const COUNT: u32 = 9;
    pub const ALL: [OutsideReason; Self::COUNT as usize] = [
        Self::TableFull,
        Self::InsertFailed,
        Self::NoActiveTable,
        Self::TruncatedL2,
        Self::MalformedIpv4,
        Self::MalformedIpv6,
        Self::Ipv6ExtensionChain,
        Self::UnknownL3,
        Self::Filtered,
    ];

    pub fn from_u8(v: u8) -> Option<Self> {
        Self::ALL.get(v as usize).copied()
    }

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
            Self::Filtered => "filtered",
        }
    }
}

/// Where and why frames were counted outside the flow table: the key of
/// A TCP connection of this host, as the retransmit tracepoint names it:
/// the local (sending) side and the remote one. Addresses as in
/// [`FlowKey`] (IPv4 in the first four bytes); ports in host order.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RetransmitKey {
    pub local: [u8; 16],
    pub remote: [u8; 16],
    pub local_port: u16,
    pub remote_port: u16,
    /// One of [`family`].
    pub family: u8,
    pub _pad: [u8; 3],
}

const _: () = assert!(core::mem::size_of::<RetransmitKey>() == 40);

/// Slots of [`names::RETRANSMITS_LOST`]: what the retransmit program saw
/// and did not count by connection.
pub mod retransmit_lost {
    /// Retransmits of a connection the table had no room for.
    pub const NO_ROOM: u32 = 0;
    /// Retransmits the kernel tried and failed (Linux 6.17+ fires the
    /// tracepoint for them too): not sent, so not counted.
    pub const FAILED: u32 = 1;
    pub const SLOTS: u32 = 2;
}

/// Connections each retransmit table holds: those that retransmitted in
/// one drain interval.
pub const RETRANSMIT_ENTRIES: u32 = 16_384;

/// Where the retransmit program finds a connection in the kernel's own
/// structures, as byte offsets the agent takes from the running kernel's
/// BTF (aya has no CO-RE for Rust programs). The raw tracepoint passes the
/// socket and the buffer, not a formatted record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RetransmitLayout {
    /// `struct sock`'s `skc_family` (u16).
    pub family: u32,
    /// `skc_num`: the local port, host order (u16).
    pub local_port: u32,
    /// `skc_dport`: the remote port, network order (u16).
    pub remote_port: u32,
    /// `skc_rcv_saddr` (4 bytes).
    pub local_v4: u32,
    /// `skc_daddr` (4 bytes).
    pub remote_v4: u32,
    /// `skc_v6_rcv_saddr` (16 bytes).
    pub local_v6: u32,
    /// `skc_v6_daddr` (16 bytes).
    pub remote_v6: u32,
    /// `struct sk_buff`'s `TCP_SKB_CB(skb)->tcp_gso_segs` (u16); 0 where
    /// unknown (each retransmitted buffer then counts as one segment).
    pub segments: u32,
    /// 1 where the tracepoint passes the send's error as a third argument
    /// (Linux 6.17+, where failed retransmits fire it too), else 0. The
    /// program reads that argument only where it is 1: the kernel refuses
    /// to attach a program that reads past a tracepoint's arguments.
    pub has_err: u32,
}

/// [`names::OUTSIDE_COUNTERS`]. The generation makes the counters
/// double-buffered like the flow tables, so the agent reads and deletes what
/// it drains (nothing accumulates across drains, interfaces or agents).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OutsideKey {
    /// Interface index the frame was seen on.
    pub ifindex: u32,
    /// [`Hook`] as u8.
    pub hook: u8,
    /// [`OutsideReason`] as u8.
    pub reason: u8,
    /// 0 or 1, see [`names::OUTSIDE_GENERATION`].
    pub generation: u8,
    /// Always zero.
    pub _pad: u8,
}

const _: () = assert!(core::mem::size_of::<OutsideKey>() == 8);

/// Entries of [`names::OUTSIDE_COUNTERS`], both generations together: an
/// interface uses one per hook and reason it sees (usually none, or
/// `filtered` and `table_full` both ways), so this is room for hundreds of
/// busy interfaces per drain interval.
pub const OUTSIDE_ENTRIES: u32 = 4096;

/// One slot of [`names::OUTSIDE_SLOTS`]: the interface that holds it on
/// this CPU (0: none yet) and its counts.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OutsideSlot {
    pub ifindex: u32,
    /// Always zero.
    pub _pad: u32,
    pub counters: Counters,
}

const _: () = assert!(core::mem::size_of::<OutsideSlot>() == 24);

/// Interfaces [`names::OUTSIDE_SLOTS`] keeps apart directly (by ifindex
/// modulo this); others share, through [`names::OUTSIDE_COUNTERS`].
pub const OUTSIDE_IFACE_SLOTS: u32 = 64;
/// The reasons that may come with every frame (a filter that rejects most
/// of them, a flood of new flows) have slots; the rest, rare by nature
/// (malformed frames), go to [`names::OUTSIDE_COUNTERS`].
pub const OUTSIDE_SLOT_REASONS: [OutsideReason; 2] =
    [OutsideReason::Filtered, OutsideReason::TableFull];
/// Slots of one generation of [`names::OUTSIDE_SLOTS`].
pub const OUTSIDE_SLOTS_PER_GENERATION: u32 =
    OUTSIDE_IFACE_SLOTS * 2 * OUTSIDE_SLOT_REASONS.len() as u32;
/// Slots of [`names::OUTSIDE_SLOTS`], both generations.
pub const OUTSIDE_SLOTS: u32 = 2 * OUTSIDE_SLOTS_PER_GENERATION;

/// The [`names::OUTSIDE_SLOTS`] slot of a generation, interface, hook
/// and reason, if the reason has slots; generation `g`'s slots are
/// `g * OUTSIDE_SLOTS_PER_GENERATION` onwards.
#[inline(always)]
pub fn outside_slot_index(
    generation: u32,
    ifindex: u32,
    hook: u8,
    reason: OutsideReason,
) -> Option<u32> {
    let hot = match reason {
        OutsideReason::Filtered => 0,
        OutsideReason::TableFull => 1,
        _ => return None,
    };
    Some(
        (((generation & 1) * OUTSIDE_IFACE_SLOTS + ifindex % OUTSIDE_IFACE_SLOTS) * 2
            + (hook as u32 & 1))
            * OUTSIDE_SLOT_REASONS.len() as u32
            + hot,
    )
}

/// Where a [`names::OUTSIDE_SLOTS`] slot index points: (generation,
/// hook, reason); the interface is in the slot.
pub fn outside_slot_of(index: u32) -> (u32, u8, OutsideReason) {
    let reasons = OUTSIDE_SLOT_REASONS.len() as u32;
    let reason = OUTSIDE_SLOT_REASONS[(index % reasons) as usize];
    let rest = index / reasons;
    let hook = (rest % 2) as u8;
    let generation = rest / 2 / OUTSIDE_IFACE_SLOTS;
    (generation, hook, reason)
}

/// Slots of [`names::OUTSIDE_UNKEYED`].
pub const OUTSIDE_UNKEYED_SLOTS: u32 = 2 * 2 * OutsideReason::COUNT;

/// The [`names::OUTSIDE_UNKEYED`] slot of a generation, hook and
/// reason (all in range: generation and hook 0 or 1).
#[inline(always)]
pub fn outside_unkeyed_index(generation: u32, hook: u8, reason: OutsideReason) -> u32 {
    ((generation & 1) * 2 + (hook as u32 & 1)) * OutsideReason::COUNT + reason as u32
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY (all three): repr(C), made only of integers and byte arrays,
    // with no implicit padding (sizes asserted above), so any bit pattern is
    // a valid value.
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FlowKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Counters {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::CacheSlot {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::OutsideKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::OutsideSlot {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::RetransmitKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::RetransmitLayout {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::handshake::HandshakeKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::handshake::Handshake {}
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
    fn cache_index_spreads_ports_hosts_and_directions() {
        let spread = |keys: &mut dyn Iterator<Item = FlowKey>| {
            let mut used = [false; FLOW_CACHE_SLOTS as usize];
            let mut n = 0;
            for k in keys {
                used[cache_index(&k.words()) as usize] = true;
                n += 1;
            }
            (used.iter().filter(|u| **u).count(), n)
        };
        // 1000 service ports of one host pair.
        let (distinct, n) = spread(&mut (0..1000u16).map(|p| {
            test_util::KeyBuilder::v4(0xC612_0101, 0xC612_0202)
                .tcp(1000 + p)
                .build()
        }));
        assert!(distinct > 800, "{distinct} slots for {n} ports");
        // 1000 IPv6 hosts differing in the last byte pair.
        let (distinct, n) = spread(&mut (0..1000u128).map(|i| {
            test_util::KeyBuilder::v6(0x2001_0002 << 96 | i, 0x2001_0002 << 96 | 1)
                .udp(443)
                .build()
        }));
        assert!(distinct > 800, "{distinct} slots for {n} IPv6 hosts");
        // A flow and its reverse, on 1000 host pairs: apart almost always.
        let apart = (0..1000u32)
            .filter(|i| {
                let (a, b) = (0xC612_0000 | i, 0xC613_0000 | i);
                let there = test_util::KeyBuilder::v4(a, b).tcp(443).build();
                let back = test_util::KeyBuilder::v4(b, a).tcp(443).build();
                cache_index(&there.words()) != cache_index(&back.words())
            })
            .count();
        assert!(apart > 990, "only {apart} of 1000 reverse flows apart");
    }

    /// The words of a connection's id and of its slot, as the kernel
    /// writes them (`slot_id`), read as the structs the drain reads.
    fn connection_slot(key: &FlowKey, ports: [u8; 4], watch: u8) -> CacheSlot {
        let words = key.words();
        let id = slot_id::of_connection(
            &words,
            slot_id::connection_part(u32::from_ne_bytes(ports), watch),
        );
        let mut slot = CacheSlot::default();
        // SAFETY: SlotId is KEY_WORDS words, SlotFlow one, both plain
        // integers, 8-byte aligned.
        unsafe {
            *(&mut slot.id as *mut SlotId as *mut [u64; KEY_WORDS]) = id;
            *(&mut slot.flow as *mut SlotFlow as *mut u64) = slot_id::flow_of_key(&words);
        }
        slot.counters = Counters {
            bytes: 100,
            packets: 1,
        };
        slot
    }

    #[test]
    fn slot_id_fields_lie_where_the_flow_key_has_its_own() {
        use core::mem::offset_of;
        assert_eq!(offset_of!(SlotId, ifindex), offset_of!(FlowKey, ifindex));
        assert_eq!(offset_of!(SlotId, port), offset_of!(FlowKey, port));
        assert_eq!(offset_of!(SlotId, family), offset_of!(FlowKey, family));
        assert_eq!(offset_of!(SlotId, hook), offset_of!(FlowKey, hook));
        assert_eq!(offset_of!(SlotId, flags), offset_of!(FlowKey, flags));
        assert_eq!(offset_of!(SlotId, ports), offset_of!(FlowKey, _pad));
        assert_eq!(offset_of!(CacheSlot, flow), size_of::<FlowKey>());
        assert_eq!(offset_of!(CacheSlot, counters), size_of::<FlowKey>() + 8);
    }

    #[test]
    fn a_connections_slot_gives_back_its_flow_key() {
        let keys = [
            test_util::KeyBuilder::v4(0xC612_0101, 0xC612_0202)
                .tcp(443)
                .ifindex(7)
                .build(),
            test_util::KeyBuilder::v4(0xC612_0202, 0xC612_0101)
                .tcp(443)
                .from_server()
                .hook(crate::Hook::Egress)
                .vlan(42)
                .build(),
            test_util::KeyBuilder::v6(0x2001_0db8 << 96 | 1, 0x2001_0db8 << 96 | 2)
                .udp(8123)
                .ifindex(3)
                .build(),
        ];
        for key in keys {
            for watch in [0, slot_id::watch::NAMES, slot_id::watch::HANDSHAKE] {
                let slot = connection_slot(&key, [0xc7, 0x38, 0x01, 0xbb], watch);
                assert_eq!(slot.flow_key(), key, "watch {watch}");
                assert_eq!(slot.id.ports, [0xc7, 0x38, 0x01, 0xbb]);
                assert_eq!(slot.id.hook, key.hook | slot_id::CONNECTION);
                assert_eq!((slot.id.port, slot.id.flags), (0, watch));
                assert_eq!(slot.flow.port, key.port);
                assert_eq!(slot.flow.flags, key.flags);
            }
            // A flow key's slot: the key itself, given back as it is.
            let words = key.words();
            assert_eq!(
                FlowKey::from_words(&slot_id::flow_key(&words, slot_id::flow_of_key(&words))),
                key
            );
        }
    }

    #[test]
    fn a_connections_id_is_neither_empty_nor_a_flow_key_and_keeps_its_slot_whatever_it_watches() {
        let key = test_util::KeyBuilder::v4(0xC612_0101, 0xC612_0202)
            .tcp(443)
            .build();
        let words = key.words();
        let id = |ports: u32, watch| {
            slot_id::of_connection(&words, slot_id::connection_part(ports, watch))
        };
        // Ports 0 and 0 (a hostile frame), no watch: still marked.
        assert_ne!(id(0, 0), [0; KEY_WORDS]);
        assert_ne!(id(0, 0), words);
        assert_ne!(id(0, 0)[5] & slot_id::CONNECTION_BITS, 0);
        for ports in [0, 0x01bb_c738, u32::MAX] {
            let watched = [0, 1, 2, 3].map(|w| cache_index(&id(ports, w)));
            assert!(
                watched.iter().all(|i| *i == watched[0]),
                "{ports:x}: {watched:?}"
            );
        }
        // Other ports, other ids (and nearly always other slots).
        assert_ne!(id(0x01bb_c738, 0), id(0x01bb_c739, 0));
    }

    #[test]
    fn cache_index_is_in_range_and_spreads_keys() {
        let mut used = [false; FLOW_CACHE_SLOTS as usize];
        for i in 0..1000u32 {
            let k = test_util::KeyBuilder::v4(0xC612_0000 | i, 0)
                .tcp(443)
                .ifindex(2)
                .build();
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
            assert_eq!(OutsideReason::from_u8(i as u8), Some(*r));
            assert!(!r.as_str().is_empty());
        }
    }

    #[test]
    fn outside_slots_are_distinct_in_range_and_invert() {
        let mut seen = [false; OUTSIDE_SLOTS as usize];
        for generation in 0..2 {
            for ifindex in 0..OUTSIDE_IFACE_SLOTS {
                for hook in 0..2u8 {
                    for reason in OUTSIDE_SLOT_REASONS {
                        let i = outside_slot_index(generation, ifindex, hook, reason).unwrap();
                        assert!(!seen[i as usize], "slot {i} twice");
                        seen[i as usize] = true;
                        assert_eq!(outside_slot_of(i), (generation, hook, reason));
                        assert_eq!(
                            i / OUTSIDE_SLOTS_PER_GENERATION,
                            generation,
                            "a generation's slots are one range"
                        );
                    }
                }
            }
        }
        assert!(seen.iter().all(|s| *s));
        assert_eq!(
            outside_slot_index(0, 3, 0, OutsideReason::MalformedIpv4),
            None
        );
        // Interfaces 64 apart share a slot.
        assert_eq!(
            outside_slot_index(0, 3, 1, OutsideReason::Filtered),
            outside_slot_index(0, 67, 1, OutsideReason::Filtered)
        );
    }

    #[test]
    fn outside_unkeyed_slots_are_distinct_and_in_range() {
        let mut seen = [false; OUTSIDE_UNKEYED_SLOTS as usize];
        for generation in 0..2 {
            for hook in 0..2u8 {
                for reason in OutsideReason::ALL {
                    let i = outside_unkeyed_index(generation, hook, reason);
                    assert!(!seen[i as usize], "slot {i} twice");
                    seen[i as usize] = true;
                }
            }
        }
        assert!(seen.iter().all(|s| *s));
    }

    #[test]
    fn addresses_by_family() {
        let mut k = FlowKey {
            family: family::IPV4,
            ..Default::default()
        };
        k.src[..4].copy_from_slice(&[198, 18, 0, 1]);
        assert_eq!(k.src_addr(), "198.18.0.1".parse().ok());
        k.family = family::IPV6;
        k.dst = "2001:2::1".parse::<core::net::Ipv6Addr>().unwrap().octets();
        assert_eq!(k.dst_addr(), "2001:2::1".parse().ok());
        assert_eq!(FlowKey::default().src_addr(), None);
    }

    #[test]
    fn direction_round_trips() {
        assert_eq!(Hook::from_u8(0), Some(Hook::Ingress));
        assert_eq!(Hook::from_u8(1), Some(Hook::Egress));
        assert_eq!(Hook::from_u8(2), None);
    }
}
