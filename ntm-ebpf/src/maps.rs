//! Every map and every load-time setting of the kernel programs, in one
//! place: the agent finds each of them by its name (`ntm_common::names`,
//! the settings' names in its loader), so a name here is part of the
//! interface with the agent and does not change.
//!
//! The settings are read-only globals the agent writes into the object
//! before loading it; [`setting`] reads one.

use aya_ebpf::{
    bindings::xdp_action,
    btf_maps::{
        Array, ArrayOfMaps, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap, ProgramArray, RingBuf,
    },
    macros::btf_map,
};
use ntm_common::{
    CacheSlot, Counters, DEFAULT_FLOW_TABLE_ENTRIES, FLOW_CACHE_SLOTS, FlowKey, KNOWN_PORT_WORDS,
    OUTSIDE_ENTRIES, OUTSIDE_SLOTS, OUTSIDE_UNKEYED_SLOTS, OutsideKey, OutsideSlot,
    RETRANSMIT_ENTRIES, RetransmitKey, RetransmitLayout,
    handshake::{self, Handshake, HandshakeKey},
    observe::{self, MacKey, MacValue, Record},
    retransmit_lost, service_port, tail,
};

use crate::hello;

// The flow tables and the flow cache in front of them.

const TABLE_ENTRIES: usize = DEFAULT_FLOW_TABLE_ENTRIES as usize;
type FlowTable = PerCpuHashMap<FlowKey, Counters, TABLE_ENTRIES>;

/// The table being counted into. The agent points slot 0 at one of the two
/// tables below and swaps it to drain the other without losing a packet.
#[btf_map]
pub static NTM_ACTIVE_FLOWS: ArrayOfMaps<FlowTable, 1> = ArrayOfMaps::new();
#[btf_map]
static NTM_FLOWS_A: FlowTable = FlowTable::new();
#[btf_map]
static NTM_FLOWS_B: FlowTable = FlowTable::new();

/// How many times the agent has swapped the tables: it adds one once a
/// swap has returned, when no program holds the earlier table any more.
#[btf_map]
pub static NTM_TABLE_EPOCH: Array<u32, 1> = Array::new();

/// Per CPU: the epoch (plus one, so that the zero a fresh map holds means
/// nothing) in which this CPU found the active table full. A table is only
/// emptied by the agent's drain after a swap, so a table found full stays
/// full for the rest of its epoch: the CPU's later new flows skip the
/// insert the kernel would refuse (its lock and hashing again), and go
/// outside the table as that insert would have sent them.
#[btf_map]
pub static NTM_TABLE_FULL: PerCpuArray<u32, 1> = PerCpuArray::new();

/// The flow cache in front of the table: two halves of FLOW_CACHE_SLOTS
/// slots, double-buffered like the tables. The programs count into the
/// half [`NTM_CACHE_HALF`] names; the agent flips it before it swaps the
/// tables, whose swap then waits for every program that may still use the
/// other half. One array and a global, not a map-in-map as the tables: a
/// frame then finds its slot with one lookup (the inner lookup of a
/// map-in-map is a second one, with the key's words spilled around it).
#[btf_map]
pub static NTM_FLOW_SLOTS: PerCpuArray<CacheSlot, { 2 * FLOW_CACHE_SLOTS as usize }> =
    PerCpuArray::new();

/// The half of [`NTM_FLOW_SLOTS`] the programs count into (0 or 1), or
/// `ntm_common::CACHE_OFF` while the cache does not pay (most frames miss
/// it: a flood of new flows, a scan): the programs then count into the
/// table directly. Its own data section, so its own one-word map, which
/// the agent writes (`names::CACHE_HALF`) and the programs read with one
/// load.
#[unsafe(no_mangle)]
#[unsafe(link_section = ".data.ntm_cache")]
pub static mut NTM_CACHE_HALF: u32 = 0;

/// Whether a filter is in the hooks' filter slots (`names::FILTER_ON`):
/// while none is, the entry programs count a frame without the tail call
/// to an empty slot (its bounds, counter and slot checks). Its own data
/// section, so its own one-word map, which the agent writes and the
/// programs read with one load.
#[unsafe(no_mangle)]
#[unsafe(link_section = ".data.ntm_filter")]
pub static mut NTM_FILTER_ON: u32 = 0;

/// Per CPU: frames whose flow was not in its cache slot, since load. Only
/// the miss path writes it.
#[btf_map]
pub static NTM_CACHE_MISSES: PerCpuArray<u64, 1> = PerCpuArray::new();

// Counts outside the flow table.

/// Frames filtered out or finding the table full, by generation, interface
/// (one slot per ifindex modulo OUTSIDE_IFACE_SLOTS), hook and reason:
/// an array slot, because a filter that rejects most frames, or a flood of
/// new flows, sends each frame here.
#[btf_map]
pub static NTM_OUTSIDE_SLOTS: PerCpuArray<OutsideSlot, { OUTSIDE_SLOTS as usize }> =
    PerCpuArray::new();

/// Outside counts of the other reasons, and of an interface whose slot
/// another interface holds, by interface, hook, reason and generation
/// (see `ntm_common::OutsideKey`).
#[btf_map]
pub static NTM_OUTSIDE: PerCpuHashMap<OutsideKey, Counters, { OUTSIDE_ENTRIES as usize }> =
    PerCpuHashMap::new();

/// Where an outside count goes when NTM_OUTSIDE has no room for its key.
#[btf_map]
pub static NTM_OUTSIDE_UNKEYED: PerCpuArray<Counters, { OUTSIDE_UNKEYED_SLOTS as usize }> =
    PerCpuArray::new();

/// The generation outside counts go to now; the agent flips it to drain.
#[btf_map]
pub static NTM_OUTSIDE_GENERATION: Array<u32, 1> = Array::new();

// The lease (see `lease.rs`).

/// The agent's lease: until when (CLOCK_MONOTONIC ns) it vouches for
/// reading these tables; 0: no timeout. The agent renews it while it runs.
#[btf_map]
pub static NTM_LEASE: Array<u64, 1> = Array::new();

// What the hooks look up: service ports, filters and their verdicts, and the
// ports of fragmented datagrams.

/// Filter programs and counting halves of the TC hooks (see
/// `ntm_common::tail`). The agent fills the counting halves at load time and
/// the filter slots only while a filter is configured.
#[btf_map]
pub static NTM_TC_TAILS: ProgramArray<{ tail::TC_SLOTS as usize }> = ProgramArray::new();
#[btf_map]
pub static NTM_XDP_TAILS: ProgramArray<{ tail::XDP_SLOTS as usize }> = ProgramArray::new();

/// The filter program's verdict for the frame in hand on this CPU.
#[btf_map]
pub static NTM_FILTER_VERDICT: PerCpuArray<u32, 1> = PerCpuArray::new();

/// A fragmented datagram: its addresses (the flow key's first four words),
/// identification, protocol and family. Every byte is a named field, so
/// the hash sees no stray padding.
#[repr(C, align(8))]
pub struct FragmentKey {
    pub addresses: [u64; 4],
    pub id: u32,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

/// The service port of each fragmented datagram whose first fragment was
/// seen, for its later fragments (which carry no ports). An LRU: bounded,
/// and a datagram's entry is forgotten once newer ones need the room.
#[btf_map]
pub static NTM_FRAGMENTS: LruHashMap<FragmentKey, u32, { ntm_common::FRAGMENT_ENTRIES as usize }> =
    LruHashMap::new();

// The hand-over of DNS and DHCP frames, and the MACs learnt (see
// `observe.rs`).

/// DNS and DHCP frames for the agent's names (see `ntm_common::observe`).
#[btf_map]
pub static NTM_OBSERVED: RingBuf<Record, { observe::RING_BYTES as usize }> = RingBuf::new();

/// Frames chosen for the agent but not handed over, by kind and reason.
#[btf_map]
pub static NTM_OBSERVE_DROPS: PerCpuArray<u64, { observe::DROP_SLOTS as usize }> =
    PerCpuArray::new();

/// This CPU's rate window for [`NTM_OBSERVED`].
#[repr(C)]
pub struct RateWindow {
    pub start_ns: u64,
    /// Frames handed over in this window, by `observe::Kind`.
    pub used: [u64; observe::Kind::COUNT as usize],
}
#[btf_map]
pub static NTM_OBSERVE_WINDOW: PerCpuArray<RateWindow, 1> = PerCpuArray::new();

/// ClientHellos whose later segments are handed over too, by their ports'
/// bucket.
#[btf_map]
pub static NTM_HELLO_FOLLOWED: Array<hello::Followed, { hello::BUCKETS as usize }> = Array::new();

/// The sources whose MACs are learnt (the agent's local networks).
#[btf_map]
pub static NTM_MAC_NETS: Array<observe::MacNets, 1> = Array::new();

/// Source MACs by source address, learnt when a flow takes a cache slot.
#[btf_map]
pub static NTM_MACS: LruHashMap<MacKey, MacValue, { observe::MAC_ENTRIES as usize }> =
    LruHashMap::new();

// Retransmissions (see `retransmits.rs`).

type RetransmitTable = PerCpuHashMap<RetransmitKey, u64, { RETRANSMIT_ENTRIES as usize }>;

/// The retransmit table counted into; the agent swaps it like the flow
/// tables.
#[btf_map]
pub static NTM_ACTIVE_RETRANSMITS: ArrayOfMaps<RetransmitTable, 1> = ArrayOfMaps::new();
#[btf_map]
static NTM_RETRANSMITS_A: RetransmitTable = RetransmitTable::new();
#[btf_map]
static NTM_RETRANSMITS_B: RetransmitTable = RetransmitTable::new();

/// Per CPU, since load: retransmits not counted by connection, by
/// `ntm_common::retransmit_lost` slot.
#[btf_map]
pub static NTM_RETRANSMITS_LOST: PerCpuArray<u64, { retransmit_lost::SLOTS as usize }> =
    PerCpuArray::new();

/// Where the program finds a connection in the kernel's structures; set
/// by the agent at load time from the running kernel's BTF.
#[unsafe(no_mangle)]
pub static NTM_RETRANSMIT_LAYOUT: RetransmitLayout = RetransmitLayout {
    family: 0,
    local_port: 0,
    remote_port: 0,
    local_v4: 0,
    remote_v4: 0,
    local_v6: 0,
    remote_v6: 0,
    segments: 0,
    has_err: 0,
};

// TCP handshakes (see `handshakes.rs`).

/// Handshakes in flight and just ended, shared by every CPU (a SYN and
/// its SYN-ACK may come in on different ones). Preallocated: a full table
/// refuses new handshakes, counted, and keeps those it follows (an LRU
/// would drop the oldest, a slow real handshake, for a flood's).
#[btf_map]
pub static NTM_HANDSHAKES: HashMap<
    HandshakeKey,
    Handshake,
    { handshake::HANDSHAKE_ENTRIES as usize },
> = HashMap::new();

/// Handshakes waiting for their client's ACK, by gate slot (see
/// `ntm_common::handshake::gate_index`); shared memory with the agent.
#[btf_map]
pub static NTM_HANDSHAKE_GATE: Array<
    u64,
    { handshake::GATE_SLOTS as usize },
    { handshake::GATE_MAP_FLAGS },
> = Array::new();

/// Per CPU, since load: handshakes not followed, by
/// `ntm_common::handshake::lost` slot.
#[btf_map]
pub static NTM_HANDSHAKES_LOST: PerCpuArray<u64, { handshake::lost::SLOTS as usize }> =
    PerCpuArray::new();

/// 1: follow TCP handshakes; read-only, so with 0 the verifier drops the
/// code.
#[unsafe(no_mangle)]
pub static NTM_TRACK_HANDSHAKES: u32 = 0;

// Settings.

/// Start of the client ephemeral port range; set by the agent at load time.
/// Read-only after load, so the verifier treats it as a constant.
#[unsafe(no_mangle)]
pub static NTM_EPHEMERAL_START: u16 = service_port::DEFAULT_EPHEMERAL_START;

/// Frames handed to the agent per second per CPU at most; 0: none (set by
/// the agent at load time; read-only, so with 0 the verifier drops the code).
#[unsafe(no_mangle)]
pub static NTM_OBSERVE_RATE: u32 = observe::DEFAULT_RATE_PER_CPU;

/// 1: fill NTM_MACS (the agent names devices by MAC); read-only.
#[unsafe(no_mangle)]
pub static NTM_LEARN_MACS: u32 = 1;

/// Which kinds are handed over, a bit (`1 << kind`) each; read-only.
#[unsafe(no_mangle)]
pub static NTM_OBSERVE_KINDS: u32 = 0b1111;

/// Known service ports, a bitmap per protocol class (see
/// `ntm_common::service_port`), written by the agent at load time;
/// read-only, so a lookup is one load (see `count::is_known_port`), where
/// an array map would take a lookup with its checks, twice per frame.
#[unsafe(no_mangle)]
pub static NTM_KNOWN_PORTS: [u32; KNOWN_PORT_WORDS as usize] = [0; KNOWN_PORT_WORDS as usize];

/// `2047`, the largest port word of one class (65535 / 32): a constant the
/// verifier knows, which bounds a port's word for it (older verifiers lose
/// a port's bounds in the byte swap; the compiler, which knows them, would
/// drop a literal mask). See `count::is_known_port`.
#[unsafe(no_mangle)]
pub static NTM_PORT_WORD_MASK: u32 = 65_535 / 32;

/// What XDP mode does with a frame after counting it (XDP_PASS or
/// XDP_DROP); set by the agent at load time.
#[unsafe(no_mangle)]
pub static NTM_XDP_ACTION: u32 = xdp_action::XDP_PASS;

/// A setting the agent writes into the object before loading it. The
/// volatile read keeps the compiler from folding in the default; the
/// verifier then sees the loaded value as a constant (the map is frozen).
#[inline(always)]
pub fn setting<T: Copy>(value: &'static T) -> T {
    // SAFETY: `value` is a valid, aligned, initialised static.
    unsafe { core::ptr::read_volatile(value) }
}
