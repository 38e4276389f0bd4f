//! ntm's kernel side: parse every frame on the hook, count it once.
//!
//! Policy (which ports are services, how big the tables are, when to drain)
//! lives in the agent; this program only parses and adds.
#![no_std]
#![no_main]

mod parse;

use aya_ebpf::{
    bindings::{TC_ACT_UNSPEC, xdp_action},
    btf_maps::{Array, ArrayOfMaps, LruHashMap, PerCpuArray, PerCpuHashMap, ProgramArray, RingBuf},
    cty::c_void,
    helpers::generated::{bpf_ktime_get_ns, bpf_skb_load_bytes, bpf_xdp_load_bytes},
    macros::{btf_map, classifier, xdp},
    programs::{TcContext, XdpContext},
};
use core::mem::{MaybeUninit, size_of};
use ntm_common::{
    CacheSlot, Counters, DEFAULT_FLOW_TABLE_ENTRIES, Direction, FLOW_CACHE_SLOTS, FlowKey,
    KEY_WORDS, KNOWN_PORT_WORDS, OUTSIDE_ENTRIES, OUTSIDE_SLOTS, OUTSIDE_UNKEYED_SLOTS, OutsideKey,
    OutsideReason, OutsideSlot, cache_index, ipproto,
    observe::{self, CAPTURE_BYTES, DropReason, MacKey, MacValue, Record},
    outside_slot_index, outside_unkeyed_index,
    service_port::{self, PortClass},
    tail,
};

use parse::{Fragment, Frame, NOT_OBSERVED, ParseError, Parsed};

const TABLE_ENTRIES: usize = DEFAULT_FLOW_TABLE_ENTRIES as usize;
type FlowTable = PerCpuHashMap<FlowKey, Counters, TABLE_ENTRIES>;

/// The table being counted into. The agent points slot 0 at one of the two
/// tables below and swaps it to drain the other without losing a packet.
#[btf_map]
static NTM_ACTIVE_FLOWS: ArrayOfMaps<FlowTable, 1> = ArrayOfMaps::new();
#[btf_map]
static NTM_FLOWS_A: FlowTable = FlowTable::new();
#[btf_map]
static NTM_FLOWS_B: FlowTable = FlowTable::new();

const CACHE_SLOTS: usize = FLOW_CACHE_SLOTS as usize;
type FlowCache = PerCpuArray<CacheSlot, CACHE_SLOTS>;

/// The flow cache in front of the table, double-buffered like the tables
/// and swapped with them.
#[btf_map]
static NTM_ACTIVE_CACHE: ArrayOfMaps<FlowCache, 1> = ArrayOfMaps::new();
#[btf_map]
static NTM_CACHE_A: FlowCache = FlowCache::new();
#[btf_map]
static NTM_CACHE_B: FlowCache = FlowCache::new();

/// Frames filtered out or finding the table full, by generation, interface
/// (one slot per ifindex modulo OUTSIDE_IFACE_SLOTS), direction and reason:
/// an array slot, because a filter that rejects most frames, or a flood of
/// new flows, sends each frame here.
#[btf_map]
static NTM_OUTSIDE_SLOTS: PerCpuArray<OutsideSlot, { OUTSIDE_SLOTS as usize }> = PerCpuArray::new();

/// Outside counts of the other reasons, and of an interface whose slot
/// another interface holds, by interface, direction, reason and generation
/// (see `ntm_common::OutsideKey`).
#[btf_map]
static NTM_OUTSIDE: PerCpuHashMap<OutsideKey, Counters, { OUTSIDE_ENTRIES as usize }> =
    PerCpuHashMap::new();

/// Where an outside count goes when NTM_OUTSIDE has no room for its key.
#[btf_map]
static NTM_OUTSIDE_UNKEYED: PerCpuArray<Counters, { OUTSIDE_UNKEYED_SLOTS as usize }> =
    PerCpuArray::new();

/// The generation outside counts go to now; the agent flips it to drain.
#[btf_map]
static NTM_OUTSIDE_GENERATION: Array<u32, 1> = Array::new();

/// The agent's lease: until when (CLOCK_MONOTONIC ns) it vouches for
/// reading these tables; 0: no timeout. The agent renews it while it runs.
#[btf_map]
static NTM_LEASE: Array<u64, 1> = Array::new();

/// Set once the lease ran out with no agent to renew it (the orphan
/// timeout): from then on the programs let every frame through uncounted,
/// at the cost of this one load. Read per frame, so a global (a direct
/// load), written only by [`check_lease`].
#[unsafe(no_mangle)]
static mut NTM_ORPHANED: u32 = 0;

/// How often the lease is looked at: whenever a counter crosses a multiple
/// of 2^LEASE_CHECK_SHIFT packets (a cache slot, a table entry, an outside
/// slot), so that the clock is read about once per 4096 frames of a flow.
const LEASE_CHECK_SHIFT: u32 = 12;

#[inline(always)]
fn orphaned() -> bool {
    // SAFETY: a plain aligned load of a global only check_lease writes
    // (a racing write is a u32 store: the load sees 0 or 1).
    unsafe { core::ptr::read_volatile(&raw const NTM_ORPHANED) != 0 }
}

/// Whether adding `added` packets to `before` crosses a lease check point.
#[inline(always)]
fn lease_check_due(before: u64, added: u64) -> bool {
    (before + added) >> LEASE_CHECK_SHIFT != before >> LEASE_CHECK_SHIFT
}

/// Stops counting for good if the lease ran out. A call of its own, taken
/// about once per 4096 frames, so the clock read is off the hot path.
#[inline(never)]
fn check_lease() {
    let until = match NTM_LEASE.get(0) {
        Some(until) => *until,
        None => return,
    };
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    if until != 0 && unsafe { bpf_ktime_get_ns() } > until {
        // SAFETY: an aligned store to a global; see `orphaned`.
        unsafe { core::ptr::write_volatile(&raw mut NTM_ORPHANED, 1) };
    }
}

/// Known service ports, a bitmap per protocol class (see ntm_common).
#[btf_map]
static NTM_KNOWN_PORTS: Array<u32, { KNOWN_PORT_WORDS as usize }> = Array::new();

/// Filter programs and counting halves of the TC hooks (see
/// `ntm_common::tail`). The agent fills the counting halves at load time and
/// the filter slots only while a filter is configured.
#[btf_map]
static NTM_TC_TAILS: ProgramArray<{ tail::TC_SLOTS as usize }> = ProgramArray::new();
#[btf_map]
static NTM_XDP_TAILS: ProgramArray<{ tail::XDP_SLOTS as usize }> = ProgramArray::new();

/// The filter program's verdict for the frame in hand on this CPU.
#[btf_map]
static NTM_FILTER_VERDICT: PerCpuArray<u32, 1> = PerCpuArray::new();

/// Start of the client ephemeral port range; set by the agent at load time.
/// Read-only after load, so the verifier treats it as a constant.
#[unsafe(no_mangle)]
static NTM_EPHEMERAL_START: u16 = service_port::DEFAULT_EPHEMERAL_START;

/// DNS and DHCP frames for the agent's names (see `ntm_common::observe`).
#[btf_map]
static NTM_OBSERVED: RingBuf<Record, { observe::RING_BYTES as usize }> = RingBuf::new();

/// Frames chosen for the agent but not handed over, by kind and reason.
#[btf_map]
static NTM_OBSERVE_DROPS: PerCpuArray<u64, { observe::DROP_SLOTS as usize }> = PerCpuArray::new();

/// This CPU's rate window for [`NTM_OBSERVED`].
#[repr(C)]
struct RateWindow {
    start_ns: u64,
    used: u64,
}
#[btf_map]
static NTM_OBSERVE_WINDOW: PerCpuArray<RateWindow, 1> = PerCpuArray::new();

/// Frames handed to the agent per second per CPU at most; 0: none (set by
/// the agent at load time; read-only, so with 0 the verifier drops the code).
#[unsafe(no_mangle)]
static NTM_OBSERVE_RATE: u32 = observe::DEFAULT_RATE_PER_CPU;

/// The sources whose MACs are learnt (the agent's local networks).
#[btf_map]
static NTM_MAC_NETS: Array<observe::MacNets, 1> = Array::new();

/// Source MACs by source address, learnt when a flow takes a cache slot.
#[btf_map]
static NTM_MACS: LruHashMap<MacKey, MacValue, { observe::MAC_ENTRIES as usize }> =
    LruHashMap::new();

/// A fragmented datagram: its addresses (the flow key's first four words),
/// identification, protocol and family. Every byte is a named field, so
/// the hash sees no stray padding.
#[repr(C, align(8))]
struct FragmentKey {
    addresses: [u64; 4],
    id: u32,
    proto: u8,
    family: u8,
    _pad: [u8; 2],
}

/// The service port of each fragmented datagram whose first fragment was
/// seen, for its later fragments (which carry no ports). An LRU: bounded,
/// and a datagram's entry is forgotten once newer ones need the room.
#[btf_map]
static NTM_FRAGMENTS: LruHashMap<FragmentKey, u32, { ntm_common::FRAGMENT_ENTRIES as usize }> =
    LruHashMap::new();

/// 1: fill NTM_MACS (the agent names devices by MAC); read-only.
#[unsafe(no_mangle)]
static NTM_LEARN_MACS: u32 = 1;

/// Which kinds are handed over, a bit (`1 << kind`) each; read-only.
#[unsafe(no_mangle)]
static NTM_OBSERVE_KINDS: u32 = 0b11;

/// Whether the agent wants a frame of `kind` (NOT_OBSERVED: no). Both
/// settings are constants to the verifier: with observation off this is
/// false and the code behind it is gone.
#[inline(always)]
fn agent_wants(kind: u8) -> bool {
    kind != NOT_OBSERVED
        && setting(&NTM_OBSERVE_RATE) != 0
        && setting(&NTM_OBSERVE_KINDS) & (1u32 << (kind & 7)) != 0
}

// bpf_map_update_elem flags and the errno values it returns.
const BPF_NOEXIST: u64 = 1;
const EEXIST: i32 = 17;
const E2BIG: i32 = 7;

/// What XDP mode does with a frame after counting it (XDP_PASS or
/// XDP_DROP); set by the agent at load time.
#[unsafe(no_mangle)]
static NTM_XDP_ACTION: u32 = xdp_action::XDP_PASS;

/// Bytes pulled into the linear area when headers lie beyond it.
const PULL_LEN: u32 = 256;

// The attached programs: run the hook's filter if there is one (a tail call
// that does not return), else count the frame here.

#[classifier]
pub fn ntm_tc_ingress_eth(ctx: TcContext) -> i32 {
    filter_then_count::<true>(&ctx, Direction::Ingress, tail::FILTER_INGRESS_ETH)
}

#[classifier]
pub fn ntm_tc_egress_eth(ctx: TcContext) -> i32 {
    filter_then_count::<true>(&ctx, Direction::Egress, tail::FILTER_EGRESS_ETH)
}

#[classifier]
pub fn ntm_tc_ingress_l3(ctx: TcContext) -> i32 {
    filter_then_count::<false>(&ctx, Direction::Ingress, tail::FILTER_INGRESS_L3)
}

#[classifier]
pub fn ntm_tc_egress_l3(ctx: TcContext) -> i32 {
    filter_then_count::<false>(&ctx, Direction::Egress, tail::FILTER_EGRESS_L3)
}

// The counting halves, entered from a filter program with its verdict.

#[classifier]
pub fn ntm_count_in_eth(ctx: TcContext) -> i32 {
    count_tc::<true>(&ctx, Direction::Ingress, filtered_out());
    TC_ACT_UNSPEC
}

#[classifier]
pub fn ntm_count_out_eth(ctx: TcContext) -> i32 {
    count_tc::<true>(&ctx, Direction::Egress, filtered_out());
    TC_ACT_UNSPEC
}

#[classifier]
pub fn ntm_count_in_l3(ctx: TcContext) -> i32 {
    count_tc::<false>(&ctx, Direction::Ingress, filtered_out());
    TC_ACT_UNSPEC
}

#[classifier]
pub fn ntm_count_out_l3(ctx: TcContext) -> i32 {
    count_tc::<false>(&ctx, Direction::Egress, filtered_out());
    TC_ACT_UNSPEC
}

#[inline(always)]
fn filter_then_count<const ETHERNET: bool>(
    ctx: &TcContext,
    direction: Direction,
    filter_slot: u32,
) -> i32 {
    if orphaned() {
        return TC_ACT_UNSPEC;
    }
    // SAFETY: a tail call either does not return or, with the slot empty,
    // returns with nothing changed.
    unsafe { NTM_TC_TAILS.tail_call(ctx, filter_slot) };
    count_tc::<ETHERNET>(ctx, direction, false);
    TC_ACT_UNSPEC
}

/// Whether the filter program that tail-called us rejected the frame.
#[inline(always)]
fn filtered_out() -> bool {
    match NTM_FILTER_VERDICT.get(0) {
        Some(verdict) => *verdict == tail::VERDICT_FILTERED,
        None => false,
    }
}

#[inline(always)]
fn is_known_port(proto: u8, port: u16) -> bool {
    let Some(class) = PortClass::of_ipproto(proto) else {
        return false;
    };
    let (word, mask) = service_port::known_port_bit(class, port);
    match NTM_KNOWN_PORTS.get(word) {
        Some(bits) => *bits & mask != 0,
        None => false,
    }
}

#[inline(always)]
fn parse_tc<const ETHERNET: bool>(
    ctx: &TcContext,
    key: &mut FlowKey,
) -> Result<Parsed, ParseError> {
    let frame = Frame {
        data: ctx.data(),
        end: ctx.data_end(),
    };
    let ephemeral_start = setting(&NTM_EPHEMERAL_START);
    if ETHERNET {
        parse::parse_ethernet(&frame, key, ephemeral_start, is_known_port)
    } else {
        parse::parse_l3(&frame, key, ephemeral_start, is_known_port)
    }
}

/// A setting the agent writes into the object before loading it. The
/// volatile read keeps the compiler from folding in the default; the
/// verifier then sees the loaded value as a constant (the map is frozen).
#[inline(always)]
fn setting<T: Copy>(value: &'static T) -> T {
    // SAFETY: `value` is a valid, aligned, initialised static.
    unsafe { core::ptr::read_volatile(value) }
}

/// Adds to the counters `counters` points at: this CPU's value in a
/// per-CPU map, which nothing else writes while the program runs (TC and
/// XDP run with bottom halves off, so no other program runs on this CPU).
#[inline(always)]
fn add_counts(counters: *mut Counters, bytes: u64, packets: u64) {
    // SAFETY: the pointer comes from a successful per-CPU map lookup (the
    // verifier checks it is not null), and as above no one else writes it.
    let before = unsafe {
        let before = (*counters).packets;
        (*counters).bytes += bytes;
        (*counters).packets = before + packets;
        before
    };
    if lease_check_due(before, packets) {
        check_lease();
    }
}

/// Zeroes a key with six 8-byte stores. (`FlowKey::default()` becomes a call
/// to a byte-by-byte memset in the BPF backend, which costs more than the
/// whole parse.)
#[inline(always)]
fn zero_key(key: *mut FlowKey) {
    const WORDS: usize = size_of::<FlowKey>() / 8;
    let words = key as *mut u64;
    for i in 0..WORDS {
        // SAFETY: FlowKey is 8-byte aligned and WORDS * 8 bytes long.
        unsafe { core::ptr::write_volatile(words.add(i), 0) };
    }
}

#[inline(always)]
fn count_tc<const ETHERNET: bool>(ctx: &TcContext, direction: Direction, filtered: bool) {
    let skb = ctx.skb.skb;
    // SAFETY: `skb` is the kernel's __sk_buff for this frame, valid for the
    // program's run; these fields are readable by TC programs.
    let (skb_len, ifindex, vlan_present, vlan_tci, gso_segs) = unsafe {
        (
            (*skb).len,
            (*skb).ifindex,
            (*skb).vlan_present,
            (*skb).vlan_tci,
            (*skb).gso_segs,
        )
    };
    // TC usually finds the outer VLAN tag already moved into skb metadata.
    let metadata_vlan = if vlan_present != 0 {
        (vlan_tci & 0x0fff) as u16
    } else {
        0
    };
    let mut key_space = MaybeUninit::<FlowKey>::uninit();
    zero_key(key_space.as_mut_ptr());
    // SAFETY: every byte was just written, and all-zero is a valid FlowKey.
    let key = unsafe { key_space.assume_init_mut() };
    key.ifindex = ifindex;
    key.direction = direction as u8;
    key.vlan_id = metadata_vlan;
    let mut parsed = parse_tc::<ETHERNET>(ctx, key);
    if let Err(ParseError::NeedMoreData(_)) = parsed {
        // Headers beyond the linear data: pull them in once and retry. A
        // frame that is simply short stays short and is counted as such.
        let linear = (ctx.data_end() - ctx.data()) as u32;
        if skb_len > linear {
            let want = if skb_len < PULL_LEN {
                skb_len
            } else {
                PULL_LEN
            };
            if ctx.pull_data(want).is_ok() {
                zero_key(key);
                key.ifindex = ifindex;
                key.direction = direction as u8;
                key.vlan_id = metadata_vlan;
                parsed = parse_tc::<ETHERNET>(ctx, key);
            }
        }
    }
    join_fragments(&parsed, key);
    // GSO/GRO aggregates count as the segments they carry on the wire.
    let segments = if gso_segs > 1 { gso_segs as u64 } else { 1 };
    let wanted = wanted_by_agent(&parsed, key);
    let took_slot = account(parsed, key, skb_len, segments, filtered);
    if ETHERNET && took_slot && direction == Direction::Ingress && setting(&NTM_LEARN_MACS) != 0 {
        learn_mac(ctx.data(), ctx.data_end(), key);
    }
    if agent_wants(wanted) {
        observe_tc(ctx, wanted, direction, ifindex, skb_len, ETHERNET);
    }
}

/// The `observe::Kind` of a frame the agent wants for names, or
/// NOT_OBSERVED. A TCP segment without payload says nothing.
#[inline(always)]
fn wanted_by_agent(parsed: &Result<Parsed, ParseError>, key: &FlowKey) -> u8 {
    match parsed {
        Ok(p) if p.observe != NOT_OBSERVED => {
            if key.proto == ipproto::TCP && p.l3_len != 0 && p.l3_len <= p.header_len {
                NOT_OBSERVED
            } else {
                p.observe
            }
        }
        _ => NOT_OBSERVED,
    }
}

/// Whether this CPU may hand over one more frame in this second.
#[inline(always)]
fn within_rate() -> bool {
    let Some(window) = NTM_OBSERVE_WINDOW.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: no arguments, no memory touched.
    let now = unsafe { bpf_ktime_get_ns() };
    let rate = setting(&NTM_OBSERVE_RATE) as u64;
    // SAFETY: the pointer comes from a successful per-CPU lookup, and no
    // one else writes this CPU's value while the program runs (as in
    // `add_counts`).
    unsafe {
        if now.wrapping_sub((*window).start_ns) >= 1_000_000_000 {
            (*window).start_ns = now;
            (*window).used = 0;
        }
        if (*window).used >= rate {
            return false;
        }
        (*window).used += 1;
    }
    true
}

#[inline(always)]
fn count_drop(kind: u8, reason: DropReason) {
    let slot = kind as u32 * DropReason::COUNT + reason as u32;
    if let Some(count) = NTM_OBSERVE_DROPS.get_ptr_mut(slot) {
        // SAFETY: this CPU's value of a per-CPU map, as in `add_counts`.
        unsafe { *count += 1 };
    }
}

/// How many bytes of a frame of `len` to copy: at least 1 (the helpers
/// refuse 0), at most CAPTURE_BYTES. The mask is what the verifier sees
/// in the helper's length register (a compare would bound a copy of it);
/// for 1..=CAPTURE_BYTES it changes nothing, and a length of 0 becomes a
/// copy the helper refuses.
#[inline(always)]
fn capture_len(len: u32) -> u32 {
    let len = if len as usize > CAPTURE_BYTES {
        CAPTURE_BYTES as u32
    } else {
        len
    };
    (len.wrapping_sub(1) & (CAPTURE_BYTES as u32 - 1)) + 1
}

/// Hands a copy of the frame in `ctx` to the agent, within the rate.
#[inline(always)]
fn observe_tc(
    ctx: &TcContext,
    kind: u8,
    direction: Direction,
    ifindex: u32,
    skb_len: u32,
    ethernet: bool,
) {
    let link = if ethernet {
        observe::link::ETHERNET
    } else {
        observe::link::RAW_IP
    };
    let frame = FrameInfo {
        kind,
        ifindex,
        frame_len: skb_len,
        direction,
        link,
    };
    hand_over(&frame, |to, len| {
        // SAFETY: `to` is `len` (1 to CAPTURE_BYTES) writable bytes of a
        // reserved record; bpf_skb_load_bytes reads the skb (linear or
        // not) within its length and fails otherwise.
        unsafe { bpf_skb_load_bytes(ctx.skb.skb as *const c_void, 0, to, len) == 0 }
    });
}

/// What a record's header says of the frame it holds.
struct FrameInfo {
    kind: u8,
    ifindex: u32,
    frame_len: u32,
    direction: Direction,
    link: u8,
}

/// The hand-over both hooks share: within the rate, into a reserved
/// record, whose data `load` fills with the frame's first `len` bytes
/// (with its hook's helper), reporting whether it could.
#[inline(always)]
fn hand_over(frame: &FrameInfo, load: impl FnOnce(*mut c_void, u32) -> bool) {
    if !within_rate() {
        count_drop(frame.kind, DropReason::RateLimited);
        return;
    }
    let Some(mut entry) = NTM_OBSERVED.reserve(0) else {
        count_drop(frame.kind, DropReason::RingFull);
        return;
    };
    let len = capture_len(frame.frame_len);
    let record = entry.as_mut_ptr();
    // SAFETY: `record` is a reserved, writable Record; only the address of
    // its data is taken here.
    let data = unsafe { (*record).data.as_mut_ptr() as *mut c_void };
    if !load(data, len) {
        entry.discard(0);
        return;
    }
    // SAFETY: as above, the record is reserved and writable.
    unsafe { write_header(record, frame, len) };
    entry.submit(0);
}

/// # Safety
/// `record` must point at a reserved ring buffer record.
#[inline(always)]
unsafe fn write_header(record: *mut Record, frame: &FrameInfo, captured: u32) {
    // SAFETY: the caller says `record` is writable.
    unsafe {
        (*record).header = observe::Header {
            ifindex: frame.ifindex,
            frame_len: frame.frame_len,
            captured: captured as u16,
            direction: frame.direction as u8,
            link: frame.link,
            kind: frame.kind,
            _pad: [0; 3],
        };
    }
}

/// Puts a fragment in its datagram's flow: the first fragment notes its
/// service port, a later one takes it (and is no longer "without L4"). A
/// later fragment whose first one was not seen keeps no port, as before.
#[inline(always)]
fn join_fragments(parsed: &Result<Parsed, ParseError>, key: &mut FlowKey) {
    let (first, id) = match parsed {
        Ok(Parsed {
            fragment: Fragment::First(id),
            ..
        }) => (true, *id),
        Ok(Parsed {
            fragment: Fragment::Later(id),
            ..
        }) => (false, *id),
        _ => return,
    };
    let words = key.words();
    let datagram = FragmentKey {
        addresses: [words[0], words[1], words[2], words[3]],
        id,
        proto: key.proto,
        family: key.family,
        _pad: [0; 2],
    };
    if first {
        if key.flags & ntm_common::key_flags::L4_MISSING == 0 {
            let _ = NTM_FRAGMENTS.insert(datagram, key.port as u32, 0);
        }
    // SAFETY: a plain lookup; the value is copied out at once.
    } else if let Some(port) = unsafe { NTM_FRAGMENTS.get(datagram) } {
        key.port = *port as u16;
        key.flags &= !ntm_common::key_flags::L4_MISSING;
    }
}

/// Counts one frame (or aggregate of `segments`) of `frame_len` bytes, as
/// parsed into `key`; a frame the filter rejected goes to `Filtered`, with
/// the bytes it would have been counted with. True if the frame's flow
/// just took a flow-cache slot (it was not the slot's flow before).
#[inline(always)]
fn account(
    parsed: Result<Parsed, ParseError>,
    key: &FlowKey,
    frame_len: u32,
    segments: u64,
    filtered: bool,
) -> bool {
    // Where the frame goes without a filter, and with which bytes; a frame
    // the filter rejected goes to Filtered with exactly those bytes.
    let (bytes, packets, outside) = match parsed {
        Ok(p) => {
            let frame_l3 = frame_len.saturating_sub(p.l3_offset as u32) as u64;
            if segments > 1 || p.l3_len == 0 {
                // Every segment repeats the L3+L4 headers of the aggregate.
                (
                    frame_l3 + (segments - 1) * p.header_len as u64,
                    segments,
                    None,
                )
            } else if p.l3_len as u64 > frame_l3 {
                // The length field claims more than the frame holds.
                let reason = if key.family == ntm_common::family::IPV6 {
                    OutsideReason::MalformedIpv6
                } else {
                    OutsideReason::MalformedIpv4
                };
                (frame_len as u64, 1, Some(reason))
            } else {
                (p.l3_len as u64, segments, None)
            }
        }
        Err(ParseError::Outside(reason)) | Err(ParseError::NeedMoreData(reason)) => {
            (frame_len as u64, segments, Some(reason))
        }
    };
    match (filtered, outside) {
        (true, _) => {
            count_outside(key, OutsideReason::Filtered, bytes, packets);
            false
        }
        (false, Some(reason)) => {
            count_outside(key, reason, bytes, packets);
            false
        }
        (false, None) => count_cached(key, bytes, packets),
    }
}

/// Notes which MAC the frame came from for its source address, if that
/// is news: called only when a flow takes a cache slot, so a steady flow
/// costs nothing, and only on Ethernet ingress (at egress the source MAC
/// is this machine's).
#[inline(always)]
fn learn_mac(data: usize, end: usize, key: &FlowKey) {
    if key.family == ntm_common::family::NON_IP || data + 12 > end {
        return;
    }
    // Only a local source's frames carry its device's MAC; a flood of
    // remote sources must cost no table lookups, nor push local devices
    // out of the table.
    let src = key.src.as_ptr() as *const [u32; 4];
    // SAFETY: `src` points at the key's 16 address bytes; read unaligned.
    let src = unsafe { core::ptr::read_unaligned(src) };
    match NTM_MAC_NETS.get(0) {
        Some(nets) if nets.contains(key.family, &src) => {}
        _ => return,
    }
    // The source MAC: bytes 6..12, as one 4-byte and one 2-byte load.
    // SAFETY: the 12 bytes were just checked to lie inside the frame.
    let (high, low) = unsafe {
        (
            core::ptr::read_unaligned((data + 6) as *const [u8; 4]),
            core::ptr::read_unaligned((data + 10) as *const [u8; 2]),
        )
    };
    let mac = [high[0], high[1], high[2], high[3], low[0], low[1]];
    let mac_key = MacKey {
        addr: key.src,
        family: key.family,
        _pad: [0; 3],
    };
    // SAFETY: a plain lookup; the value is copied out at once.
    if let Some(known) = unsafe { NTM_MACS.get(mac_key) }
        && known.mac == mac
    {
        return;
    }
    let value = MacValue { mac, _pad: [0; 2] };
    // The table is an LRU: a full one forgets its least recent entry.
    let _ = NTM_MACS.insert(mac_key, value, 0);
}

/// XDP: what a mirror or SPAN port receives, counted before the stack sees
/// it; the agent chooses whether the copy then goes on (pass) or not (drop).
#[xdp]
pub fn ntm_xdp(ctx: XdpContext) -> u32 {
    if orphaned() {
        return xdp_action::XDP_PASS;
    }
    // SAFETY: a tail call either does not return or, with the slot empty,
    // returns with nothing changed.
    unsafe { NTM_XDP_TAILS.tail_call(&ctx, tail::FILTER_XDP) };
    count_xdp(&ctx, false);
    setting(&NTM_XDP_ACTION)
}

/// XDP's counting half, entered from a filter program.
#[xdp]
pub fn ntm_count_xdp(ctx: XdpContext) -> u32 {
    count_xdp(&ctx, filtered_out());
    setting(&NTM_XDP_ACTION)
}

#[inline(always)]
fn count_xdp(ctx: &XdpContext, filtered: bool) {
    // SAFETY: the context pointer is the kernel's xdp_md for this frame.
    let ifindex = unsafe { (*ctx.ctx).ingress_ifindex };
    let mut key_space = MaybeUninit::<FlowKey>::uninit();
    zero_key(key_space.as_mut_ptr());
    // SAFETY: every byte was just written, and all-zero is a valid FlowKey.
    let key = unsafe { key_space.assume_init_mut() };
    key.ifindex = ifindex;
    key.direction = Direction::Ingress as u8;
    let frame = Frame {
        data: ctx.data(),
        end: ctx.data_end(),
    };
    let ephemeral_start = setting(&NTM_EPHEMERAL_START);
    // In XDP every VLAN tag is still in the frame, and there is no more
    // data to pull: what is not in [data, data_end) is not there.
    let parsed = parse::parse_ethernet(&frame, key, ephemeral_start, is_known_port);
    join_fragments(&parsed, key);
    let frame_len = (frame.end - frame.data) as u32;
    let wanted = wanted_by_agent(&parsed, key);
    let took_slot = account(parsed, key, frame_len, 1, filtered);
    if took_slot && setting(&NTM_LEARN_MACS) != 0 {
        learn_mac(frame.data, frame.end, key);
    }
    if agent_wants(wanted) {
        observe_xdp(ctx, wanted, ifindex, frame_len);
    }
}

/// XDP's [`observe_tc`]: the frame is all in [data, data_end).
#[inline(always)]
fn observe_xdp(ctx: &XdpContext, kind: u8, ifindex: u32, frame_len: u32) {
    let frame = FrameInfo {
        kind,
        ifindex,
        frame_len,
        direction: Direction::Ingress,
        link: observe::link::ETHERNET,
    };
    hand_over(&frame, |to, len| {
        // SAFETY: as in observe_tc; bpf_xdp_load_bytes checks the frame's
        // bounds.
        unsafe { bpf_xdp_load_bytes(ctx.ctx as *mut _, 0, to, len) == 0 }
    });
}

/// Counts into the flow's cache slot; a slot held by another flow first
/// hands that flow's counts to the flow table.
#[inline(always)]
fn count_cached(key: &FlowKey, bytes: u64, packets: u64) -> bool {
    // Word by word: the BPF backend turns array copies and compares into
    // calls to byte loops.
    let k = key as *const FlowKey as *const u64;
    let mut words = [0u64; KEY_WORDS];
    for (i, w) in words.iter_mut().enumerate() {
        // SAFETY: FlowKey is 8-byte aligned and KEY_WORDS words long.
        *w = unsafe { *k.add(i) };
    }
    let Some(cache) = NTM_ACTIVE_CACHE.get(0) else {
        count_flow(key, bytes, packets);
        return false;
    };
    let Some(slot) = cache.get_ptr_mut(cache_index(&words)) else {
        count_flow(key, bytes, packets);
        return false;
    };
    let s = slot as *mut u64;
    // SAFETY: a CacheSlot is KEY_WORDS key words then bytes and packets, all
    // u64; it is this CPU's, and TC runs with bottom halves off.
    unsafe {
        let mut same = true;
        for (i, w) in words.iter().enumerate() {
            same &= *s.add(i) == *w;
        }
        let held_packets = *s.add(KEY_WORDS + 1);
        if same && held_packets != 0 {
            *s.add(KEY_WORDS) += bytes;
            *s.add(KEY_WORDS + 1) = held_packets + packets;
            if lease_check_due(held_packets, packets) {
                check_lease();
            }
            return false;
        }
        if held_packets != 0 {
            let held_key = &*(s as *const FlowKey);
            count_flow(held_key, *s.add(KEY_WORDS), held_packets);
        }
        for (i, w) in words.iter().enumerate() {
            core::ptr::write_volatile(s.add(i), *w);
        }
        *s.add(KEY_WORDS) = bytes;
        *s.add(KEY_WORDS + 1) = packets;
    }
    true
}

#[inline(always)]
fn count_flow(key: &FlowKey, bytes: u64, packets: u64) {
    let Some(table) = NTM_ACTIVE_FLOWS.get(0) else {
        count_outside(key, OutsideReason::NoActiveTable, bytes, packets);
        return;
    };
    if let Some(counters) = table.get_ptr_mut(key) {
        add_counts(counters, bytes, packets);
        return;
    }
    let fresh = Counters { bytes, packets };
    match table.insert(key, fresh, BPF_NOEXIST) {
        Ok(()) => {}
        Err(err) if err == -EEXIST => {
            // Another CPU inserted the key between our lookup and insert; our
            // CPU's slot in it exists now.
            match table.get_ptr_mut(key) {
                Some(counters) => add_counts(counters, bytes, packets),
                None => count_outside(key, OutsideReason::InsertFailed, bytes, packets),
            }
        }
        Err(err) if err == -E2BIG => count_outside(key, OutsideReason::TableFull, bytes, packets),
        Err(_) => count_outside(key, OutsideReason::InsertFailed, bytes, packets),
    }
}

/// Counts a frame of `key`'s interface and direction outside the flow
/// table, for `reason`, in the generation the agent has not begun to drain.
/// A function of its own (a BPF-to-BPF call): inlined at each of its
/// callers it would make the counting path larger, and slower, for every
/// frame.
#[inline(never)]
fn count_outside(key: &FlowKey, reason: OutsideReason, bytes: u64, packets: u64) {
    let generation = match NTM_OUTSIDE_GENERATION.get(0) {
        Some(g) => *g & 1,
        None => 0,
    };
    // `reason` is a constant at each call, so this folds to a slot or not.
    if let Some(index) = outside_slot_index(generation, key.ifindex, key.direction, reason)
        && let Some(slot) = NTM_OUTSIDE_SLOTS.get_ptr_mut(index)
    {
        // SAFETY: the slot is this CPU's (per-CPU array, TC and XDP run with
        // bottom halves off), and the pointer comes from a successful lookup.
        unsafe {
            if (*slot).ifindex == key.ifindex || (*slot).ifindex == 0 {
                let before = (*slot).counters.packets;
                (*slot).ifindex = key.ifindex;
                (*slot).counters.bytes += bytes;
                (*slot).counters.packets = before + packets;
                if lease_check_due(before, packets) {
                    check_lease();
                }
                return;
            }
        }
    }
    // A rare reason, or another interface holds the slot: the hash.
    let outside = OutsideKey {
        ifindex: key.ifindex,
        direction: key.direction,
        reason: reason as u8,
        generation: generation as u8,
        _pad: 0,
    };
    if let Some(counters) = NTM_OUTSIDE.get_ptr_mut(outside) {
        add_counts(counters, bytes, packets);
        return;
    }
    // This CPU's value is ours, the other CPUs' start at zero.
    let fresh = Counters { bytes, packets };
    match NTM_OUTSIDE.insert(outside, fresh, BPF_NOEXIST) {
        Ok(()) => return,
        Err(err) if err == -EEXIST => {
            if let Some(counters) = NTM_OUTSIDE.get_ptr_mut(outside) {
                add_counts(counters, bytes, packets);
                return;
            }
        }
        Err(_) => {}
    }
    // No room for the key: still counted, without its interface.
    let slot = outside_unkeyed_index(generation, key.direction, reason);
    if let Some(counters) = NTM_OUTSIDE_UNKEYED.get_ptr_mut(slot) {
        add_counts(counters, bytes, packets);
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier rejects any path that could reach here (it has
    // no way to panic), so this never runs.
    unsafe { core::hint::unreachable_unchecked() }
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
