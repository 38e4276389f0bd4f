//! The counting path both hooks share: the flow key built by the parse
//! (with a fragment's port from its first fragment), the per-CPU flow cache,
//! the flow table behind it, and the outside counts of frames that are not
//! counted in the table. Every per-frame function is inlined into its
//! program; `count_outside` is a call of its own.
//!
//! The steady state (a frame of a flow already in its cache slot) is kept
//! short, as `cargo xtask bench` measures it part by part: the common frame
//! is parsed in one go into the key's words (`parse::parse_common`), which
//! are hashed and compared in registers; the key is written to memory only
//! off that path (map helpers, MAC learning); fragments, VLAN tags in the
//! frame, options and extension headers take the full parse; the DNS/DHCP
//! test is a port compare in the parse, the MAC test a flag after a new
//! cache slot, the lease check a shift and a compare on the slot's count.

use aya_ebpf::programs::{TcContext, XdpContext};
use core::mem::MaybeUninit;
use ntm_common::{
    CACHE_OFF, Counters, FLOW_CACHE_SLOTS, FlowKey, Hook, KEY_WORDS, OutsideKey, OutsideReason,
    cache_index, outside_slot_index, outside_unkeyed_index,
    service_port::{self, PortClass},
    slot_id::{self, watch},
};

use ntm_common::tail;

use crate::{
    handshakes,
    lease::{check_lease, lease_check_due},
    maps::{
        FragmentKey, NTM_ACTIVE_FLOWS, NTM_CACHE_HALF, NTM_CACHE_MISSES, NTM_EPHEMERAL_START,
        NTM_FLOW_SLOTS, NTM_FRAGMENTS, NTM_KNOWN_PORTS, NTM_LEARN_MACS, NTM_OUTSIDE,
        NTM_OUTSIDE_GENERATION, NTM_OUTSIDE_SLOTS, NTM_OUTSIDE_UNKEYED, NTM_PORT_WORD_MASK,
        NTM_TABLE_EPOCH, NTM_TABLE_FULL, NTM_TC_TAILS, NTM_XDP_TAILS, setting,
    },
    observe::{learn_mac, may_hand_over},
    parse::{self, Connection, Fragment, Frame, KeyBase, NOT_OBSERVED, ParseError, Parsed},
    steady,
};

// bpf_map_update_elem flags and the errno values it returns.
const BPF_NOEXIST: u64 = 1;
const EEXIST: i32 = 17;
const E2BIG: i32 = 7;

/// Bytes pulled into the linear area when headers lie beyond it.
const PULL_LEN: u32 = 256;

/// How far a program goes with a frame: every program ntm attaches goes
/// all the way ([`stage::ALL`]); the bench's programs (`ntm_bench_upto_*`
/// in main.rs, never loaded by the agent) take the full path without the
/// steady state (`steady.rs`) and stop after one part each, so that `cargo
/// xtask bench` can tell what each part costs a frame that takes the full
/// path, and what the steady state saves. A const generic: in the real
/// programs every stop folds away at compile time.
pub mod stage {
    /// main.rs: the orphan check and the filter's test (a tail call while
    /// a filter is on).
    pub const ENTRY: u8 = 0;
    /// parse.rs: the frame to a flow key.
    pub const PARSE: u8 = 1;
    /// count.rs: a fragment put in its datagram's flow (on the full parse
    /// only: a common frame is whole).
    pub const FRAGMENTS: u8 = 2;
    /// count.rs and lease.rs: the key into the per-CPU cache (the flow
    /// table when its slot is taken), the lease check.
    pub const COUNT: u8 = 3;
    /// observe.rs: MAC learning, and the tail call to the hand-over of a
    /// frame the agent wants for names: the whole full path.
    pub const FULL: u8 = 4;
    /// steady.rs first: the whole program.
    pub const ALL: u8 = 5;
}

/// Keeps what a bench program stopping early computed (the key's words and
/// the parse's result, as scalars: a struct with unset bytes would reach
/// the verifier as stray stores), so that the compiler does not drop the
/// work it measures.
#[inline(always)]
fn keep(parsed: &Result<Parsed, ParseError>, words: &[u64; KEY_WORDS]) {
    use core::hint::black_box;
    match parsed {
        Ok(p) => {
            black_box(p.l3_offset);
            black_box(p.l3_len);
            black_box(p.header_len);
            black_box(p.observe);
            black_box(p.fragment == Fragment::Whole);
        }
        Err(_) => {
            black_box(0);
        }
    }
    for word in words {
        black_box(*word);
    }
}

/// A frame as the parse saw it, with what its hook says of it.
pub struct Seen {
    pub parsed: Result<Parsed, ParseError>,
    /// The flow key's words.
    pub words: [u64; KEY_WORDS],
    pub ifindex: u32,
    /// The frame's bytes (an aggregate's, for TC).
    pub len: u32,
    /// Segments in a GSO/GRO aggregate (0 or 1: one frame).
    pub gso_segs: u32,
    /// A common frame's connection (`parse::parse_common`), which its
    /// cache slot is found by; `Connection::NONE` for any other frame,
    /// found by its key.
    pub connection: Connection,
}

/// Parses the frame in `ctx` (a fragment put in its datagram's flow,
/// except by the bench's programs that stop at the parse); `space` takes
/// the key where the full parse builds it.
#[inline(always)]
pub fn read_tc<const ETHERNET: bool, const UPTO: u8>(
    ctx: &TcContext,
    hook: Hook,
    space: &mut MaybeUninit<FlowKey>,
) -> Seen {
    let skb = ctx.skb.skb;
    // The skb's fields are read where they are used, as late as they can
    // be: read all at the start, as they were, those needed only for the
    // key's last word or for the count stayed live across the parse, on
    // the stack (spilled and loaded again: the BPF target has ten
    // registers). Measured: about 1 ns a frame less (ntm net 52.2 / 48.6
    // / 46.0 / 48.4 ns before, 51.6 / 47.6 / 45.0 / 46.0 ns after, for the
    // bench's first four frames).
    let base = || {
        // SAFETY: `skb` is the kernel's __sk_buff for this frame, valid for
        // the program's run; these fields are readable by TC programs.
        let (ifindex, vlan_present, vlan_tci) =
            unsafe { ((*skb).ifindex, (*skb).vlan_present, (*skb).vlan_tci) };
        KeyBase {
            ifindex,
            // TC usually finds the outer VLAN tag already moved into skb
            // metadata.
            vlan_id: if vlan_present != 0 {
                (vlan_tci & 0x0fff) as u16
            } else {
                0
            },
            hook: hook as u8,
        }
    };
    let frame = Frame {
        data: ctx.data(),
        end: ctx.data_end(),
    };
    let ephemeral_start = setting(&NTM_EPHEMERAL_START);
    let common = parse::parse_common::<ETHERNET>(&frame, base, ephemeral_start, is_known_port);
    // SAFETY: as above.
    let (skb_len, gso_segs, ifindex) = unsafe { ((*skb).len, (*skb).gso_segs, (*skb).ifindex) };
    let (parsed, words, connection) = match common {
        Some((parsed, words, connection)) => (Ok(parsed), words, connection),
        None => {
            let (parsed, words) = parse_tc_any::<ETHERNET, UPTO>(ctx, &base(), skb_len, space);
            (parsed, words, Connection::NONE)
        }
    };
    Seen {
        parsed,
        words,
        ifindex,
        len: skb_len,
        gso_segs,
        connection,
    }
}

#[inline(always)]
pub fn count_tc<const ETHERNET: bool, const UPTO: u8>(ctx: &TcContext, hook: Hook, filtered: bool) {
    // Nearly every frame: its connection's, in its slot (`steady.rs`).
    if UPTO == stage::ALL && !filtered && steady::count_tc::<ETHERNET>(ctx, hook) {
        return;
    }
    let mut key_space = MaybeUninit::<FlowKey>::uninit();
    let Seen {
        parsed,
        words,
        len: skb_len,
        gso_segs,
        connection,
        ..
    } = read_tc::<ETHERNET, UPTO>(ctx, hook, &mut key_space);
    if UPTO == stage::PARSE || UPTO == stage::FRAGMENTS {
        keep(&parsed, &words);
        return;
    }
    let observe = match &parsed {
        Ok(p) if UPTO >= stage::FULL => p.observe,
        _ => NOT_OBSERVED,
    };
    let handshake = match &parsed {
        Ok(p) if UPTO >= stage::FULL && !filtered => {
            handshakes::pending(p.tcp_flags, &words, p.l3_offset, p.header_len)
        }
        _ => handshakes::Pending::NONE,
    };
    // GSO/GRO aggregates count as the segments they carry on the wire.
    let segments = if gso_segs > 1 { gso_segs as u64 } else { 1 };
    let slot = slot_of(connection, handshake, &words);
    let took_slot = account(
        parsed,
        &words,
        slot,
        &mut key_space,
        skb_len,
        segments,
        filtered,
    );
    if UPTO == stage::COUNT {
        core::hint::black_box(took_slot);
        return;
    }
    if ETHERNET && took_slot && hook == Hook::Ingress && setting(&NTM_LEARN_MACS) != 0 {
        learn_mac(
            ctx.data(),
            ctx.data_end(),
            store_key(&mut key_space, &words),
        );
    }
    handshakes::track(handshake, || (ctx.data(), ctx.data_end()));
    // Last, once the frame is counted: for nearly every frame one compare.
    if UPTO >= stage::FULL && may_hand_over(observe) {
        let slot = match (ETHERNET, hook) {
            (true, Hook::Ingress) => tail::OBSERVE_INGRESS_ETH,
            (true, Hook::Egress) => tail::OBSERVE_EGRESS_ETH,
            (false, Hook::Ingress) => tail::OBSERVE_INGRESS_L3,
            (false, Hook::Egress) => tail::OBSERVE_EGRESS_L3,
        };
        // SAFETY: a tail call either does not return or, with the slot
        // empty, returns with nothing changed; the program it enters
        // returns what the counting half would (TC_ACT_UNSPEC).
        unsafe { NTM_TC_TAILS.tail_call(ctx, slot) };
    }
}

/// The full parse of a frame that is not a common one (see
/// `parse::parse_common`), into a key in `space`: VLAN tags in the frame, IPv4
/// options, IPv6 extension headers, fragments (put in their datagram's
/// flow), other protocols, headers beyond the linear data (pulled in once),
/// malformed frames. Returns the key's words with the parse.
#[inline(always)]
fn parse_tc_any<const ETHERNET: bool, const UPTO: u8>(
    ctx: &TcContext,
    base: &KeyBase,
    skb_len: u32,
    space: &mut MaybeUninit<FlowKey>,
) -> (Result<Parsed, ParseError>, [u64; KEY_WORDS]) {
    let mut key = base.start(space);
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
                key = base.start(space);
                parsed = parse_tc::<ETHERNET>(ctx, key);
            }
        }
    }
    if UPTO != stage::PARSE {
        join_fragments(&parsed, key);
    }
    (parsed, key.words())
}

/// Parses the frame in `ctx` as [`read_tc`] does.
#[inline(always)]
pub fn read_xdp(ctx: &XdpContext, space: &mut MaybeUninit<FlowKey>) -> Seen {
    // SAFETY: the context pointer is the kernel's xdp_md for this frame.
    let ifindex = unsafe { (*ctx.ctx).ingress_ifindex };
    let base = KeyBase {
        ifindex,
        vlan_id: 0,
        hook: Hook::Ingress as u8,
    };
    let frame = Frame {
        data: ctx.data(),
        end: ctx.data_end(),
    };
    let ephemeral_start = setting(&NTM_EPHEMERAL_START);
    let (parsed, words, connection) =
        match parse::parse_common::<true>(&frame, || base, ephemeral_start, is_known_port) {
            Some((parsed, words, connection)) => (Ok(parsed), words, connection),
            None => {
                let key = base.start(space);
                // In XDP every VLAN tag is still in the frame, and there is
                // no more data to pull: what is not in [data, data_end) is
                // not there.
                let parsed = parse::parse_ethernet(&frame, key, ephemeral_start, is_known_port);
                join_fragments(&parsed, key);
                (parsed, key.words(), Connection::NONE)
            }
        };
    Seen {
        parsed,
        words,
        ifindex,
        len: (frame.end - frame.data) as u32,
        gso_segs: 1,
        connection,
    }
}

#[inline(always)]
pub fn count_xdp(ctx: &XdpContext, filtered: bool) {
    // Nearly every frame: its connection's, in its slot (`steady.rs`).
    if !filtered && steady::count_xdp(ctx) {
        return;
    }
    let mut key_space = MaybeUninit::<FlowKey>::uninit();
    let Seen {
        parsed,
        words,
        len: frame_len,
        connection,
        ..
    } = read_xdp(ctx, &mut key_space);
    let observe = match &parsed {
        Ok(p) => p.observe,
        Err(_) => NOT_OBSERVED,
    };
    let handshake = match &parsed {
        Ok(p) if !filtered => handshakes::pending(p.tcp_flags, &words, p.l3_offset, p.header_len),
        _ => handshakes::Pending::NONE,
    };
    let slot = slot_of(connection, handshake, &words);
    let took_slot = account(parsed, &words, slot, &mut key_space, frame_len, 1, filtered);
    let (data, end) = (ctx.data(), ctx.data_end());
    if took_slot && setting(&NTM_LEARN_MACS) != 0 {
        learn_mac(data, end, store_key(&mut key_space, &words));
    }
    handshakes::track(handshake, || (data, end));
    if may_hand_over(observe) {
        // SAFETY: as in `count_tc`; the program it enters returns the
        // action the counting half would.
        unsafe { NTM_XDP_TAILS.tail_call(ctx, tail::OBSERVE_XDP) };
    }
}

/// Writes the key's words into its space, whole, for what reads a key in
/// memory (map helpers, MAC learning): only off the cache-hit path, which
/// needs the words alone. A key the full parse wrote gets the same bytes
/// again.
#[inline(always)]
fn store_key<'a>(space: &'a mut MaybeUninit<FlowKey>, words: &[u64; KEY_WORDS]) -> &'a FlowKey {
    let to = space.as_mut_ptr() as *mut u64;
    for (i, word) in words.iter().enumerate() {
        // SAFETY: FlowKey is 8-byte aligned and KEY_WORDS words long.
        unsafe { *to.add(i) = *word };
    }
    // SAFETY: every word was just written, and any words are a valid
    // FlowKey (plain integers with explicit padding).
    unsafe { space.assume_init_ref() }
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

/// Whether `port` is a known service port of its class (the agent's
/// bitmap).
#[inline(always)]
fn is_known_port(class: PortClass, port: u16) -> bool {
    let (_, mask) = service_port::known_port_bit(class, port);
    // `known_port_bit`'s word, its port part masked by a setting: the
    // verifier then sees it inside the bitmap (see NTM_PORT_WORD_MASK).
    let word = class as u32 * (65_536 / 32) + ((port as u32 / 32) & setting(&NTM_PORT_WORD_MASK));
    // SAFETY: `word` is at most 2 * 2048 + 2047, inside the bitmap (as the
    // verifier checks too); the bitmap is a read-only global.
    let bits = unsafe { core::ptr::read_volatile(NTM_KNOWN_PORTS.as_ptr().add(word as usize)) };
    bits & mask != 0
}

/// Puts a fragment in its datagram's flow: the first fragment notes its
/// service port, a later one takes it (and is no longer "without L4"). A
/// later fragment whose first one was not seen keeps no port, as before.
#[inline(always)]
fn join_fragments(parsed: &Result<Parsed, ParseError>, key: &mut FlowKey) {
    let (first, id) = match parsed {
        Ok(p) if p.fragment == Fragment::First => (true, p.fragment_id),
        Ok(p) if p.fragment == Fragment::Later => (false, p.fragment_id),
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
    // The value: the service port, and above it the side it is on.
    const SIDE: u8 = ntm_common::key_flags::SERVICE_PORT_IS_SRC;
    if first {
        if key.flags & ntm_common::key_flags::L4_MISSING == 0 {
            let value = key.port as u32 | ((key.flags & SIDE) as u32) << 16;
            let _ = NTM_FRAGMENTS.insert(datagram, value, 0);
        }
    // SAFETY: a plain lookup; the value is copied out at once.
    } else if let Some(value) = unsafe { NTM_FRAGMENTS.get(datagram) } {
        key.port = *value as u16;
        key.flags &= !ntm_common::key_flags::L4_MISSING;
        key.flags |= (*value >> 16) as u8 & SIDE;
    }
}

/// Counts one frame (or aggregate of `segments`) of `frame_len` bytes, as
/// parsed into `key`; a frame the filter rejected goes to `Filtered`, with
/// the bytes it would have been counted with. True if the frame's flow
/// just took a flow-cache slot (it was not the slot's flow before).
#[inline(always)]
fn account(
    parsed: Result<Parsed, ParseError>,
    words: &[u64; KEY_WORDS],
    slot: Connection,
    space: &mut MaybeUninit<FlowKey>,
    frame_len: u32,
    segments: u64,
    filtered: bool,
) -> bool {
    // Nearly every frame: one packet whose length field the frame holds.
    if let Ok(p) = &parsed
        && !filtered
        && segments == 1
        && p.l3_len != 0
        && p.l3_len as u64 + p.l3_offset as u64 <= frame_len as u64
    {
        return count_cached(words, slot, space, p.l3_len as u64, 1);
    }
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
                let reason = if store_key(space, words).family == ntm_common::family::IPV6 {
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
            count_outside(
                store_key(space, words),
                OutsideReason::Filtered,
                bytes,
                packets,
            );
            false
        }
        (false, Some(reason)) => {
            count_outside(store_key(space, words), reason, bytes, packets);
            false
        }
        (false, None) => count_cached(words, slot, space, bytes, packets),
    }
}

/// The slot of a frame of `connection`, with the watch bits that keep its
/// connection's next frames off the steady state while they need what the
/// full path decides: a frame the agent wants for names (set by the
/// parse), or a handshake whose client's ACK is to be followed.
#[inline(always)]
fn slot_of(
    connection: Connection,
    handshake: handshakes::Pending,
    words: &[u64; KEY_WORDS],
) -> Connection {
    if connection.0 != 0 && handshakes::awaited(handshake, words) {
        Connection(connection.0 | slot_id::flags_bits(watch::HANDSHAKE))
    } else {
        connection
    }
}

/// Counts into the frame's cache slot; a slot held by another flow or
/// connection first hands its counts to the flow table. `words` are the
/// key's, as the parse built them; the slot's id is compared word by word
/// (the BPF backend turns array copies and compares into calls to byte
/// loops). True if the frame just took a slot, or, with the cache turned
/// off, a table entry: the first frame of a flow there, whose MAC is then
/// learnt.
#[inline(always)]
fn count_cached(
    words: &[u64; KEY_WORDS],
    slot: Connection,
    space: &mut MaybeUninit<FlowKey>,
    bytes: u64,
    packets: u64,
) -> bool {
    // SAFETY: an aligned load of a word the agent writes with one store.
    let half = unsafe { core::ptr::read_volatile(&raw const NTM_CACHE_HALF) };
    let connection = slot.0 != 0;
    let id = if connection {
        slot_id::of_connection(words, slot.0)
    } else {
        *words
    };
    // The half's slots begin at half * FLOW_CACHE_SLOTS; with the cache
    // off (CACHE_OFF, 2 or more) no slot is looked for (nor hashed).
    let cached = if half < CACHE_OFF {
        NTM_FLOW_SLOTS.get_ptr_mut((half << FLOW_CACHE_SLOTS.trailing_zeros()) | cache_index(&id))
    } else {
        None
    };
    let Some(cached) = cached else {
        // The agent turned the cache off: most frames would miss it.
        return count_flow(store_key(space, words), bytes, packets);
    };
    let s = cached as *mut u64;
    // SAFETY: a CacheSlot is KEY_WORDS id words, the flow word, then bytes
    // and packets, all u64; it is this CPU's, and TC runs with bottom
    // halves off.
    unsafe {
        // The flow word's, the bytes' and the packets' places.
        let (flow, bytes_at, packets_at) = (KEY_WORDS, KEY_WORDS + 1, KEY_WORDS + 2);
        let held_packets = *s.add(packets_at);
        // The same id, but a connection's watch bits, which this frame
        // sets anew.
        let ignored = if connection { slot_id::FLAGS_BITS } else { 0 };
        let mut same = (*s.add(5) | ignored) == (id[5] | ignored);
        for (i, w) in id.iter().take(5).enumerate() {
            same &= *s.add(i) == *w;
        }
        if held_packets != 0 && same {
            // The watch bits as this frame decided them.
            *s.add(5) = id[5];
            *s.add(bytes_at) += bytes;
            *s.add(packets_at) = held_packets + packets;
            if lease_check_due(held_packets, packets) {
                check_lease();
            }
            return false;
        }
        // A miss, for the agent's judgement of the cache (sound as above:
        // this CPU's slot of a per-CPU array, from a successful lookup).
        if let Some(misses) = NTM_CACHE_MISSES.get_ptr_mut(0) {
            *misses += 1;
        }
        if held_packets != 0 {
            if table_known_full() {
                // Evicting the slot's flow could only send it outside the
                // table, which is full until the next swap: it stays, and
                // this frame's flow is counted in the table if it is
                // there, else outside (a MAC it may carry is learnt once
                // its flow takes a slot, after the swap).
                let _ = count_flow(store_key(space, words), bytes, packets);
                return false;
            }
            let held_key = slot_id::flow_key(&*(s as *const [u64; KEY_WORDS]), *s.add(flow));
            let _ = count_flow(store_key(space, &held_key), *s.add(bytes_at), held_packets);
        }
        for (i, w) in id.iter().enumerate() {
            core::ptr::write_volatile(s.add(i), *w);
        }
        *s.add(flow) = slot_id::flow_of_key(words);
        *s.add(bytes_at) = bytes;
        *s.add(packets_at) = packets;
    }
    true
}

/// What this CPU leaves in NTM_TABLE_FULL when it finds the active table
/// full: the table epoch plus one. Read before the table: a table found
/// full is then that epoch's, or an earlier one's (see NTM_TABLE_EPOCH:
/// the agent bumps it only once no program holds the earlier table), never
/// a later one's. The agent never sets u32::MAX, so a mark is never 0,
/// which a fresh slot holds.
#[inline(always)]
fn full_mark() -> u32 {
    match NTM_TABLE_EPOCH.get_ptr(0) {
        // SAFETY: a pointer from a successful lookup, read at once, and
        // volatile so that the read stays before the table's lookup.
        Some(epoch) => unsafe { core::ptr::read_volatile(epoch) }.wrapping_add(1),
        None => 0,
    }
}

/// Whether this CPU found the active table full in this epoch.
#[inline(always)]
fn table_known_full() -> bool {
    let mark = full_mark();
    match NTM_TABLE_FULL.get_ptr(0) {
        // SAFETY: this CPU's slot, from a successful lookup.
        Some(full) => mark != 0 && unsafe { *full } == mark,
        None => false,
    }
}

/// Counts into the flow table, or outside it where it cannot. True if the
/// flow took a new entry.
#[inline(always)]
fn count_flow(key: &FlowKey, bytes: u64, packets: u64) -> bool {
    let full_mark = full_mark();
    let Some(table) = NTM_ACTIVE_FLOWS.get(0) else {
        count_outside(key, OutsideReason::NoActiveTable, bytes, packets);
        return false;
    };
    if let Some(counters) = table.get_ptr_mut(key) {
        add_counts(counters, bytes, packets);
        return false;
    }
    let full = NTM_TABLE_FULL.get_ptr_mut(0);
    if let Some(full) = full {
        // SAFETY: this CPU's slot (per-CPU array; TC and XDP run with
        // bottom halves off), from a successful lookup.
        if full_mark != 0 && unsafe { *full } == full_mark {
            count_outside(key, OutsideReason::TableFull, bytes, packets);
            return false;
        }
    }
    let fresh = Counters { bytes, packets };
    match table.insert(key, fresh, BPF_NOEXIST) {
        Ok(()) => return true,
        Err(err) if err == -EEXIST => {
            // Another CPU inserted the key between our lookup and insert; our
            // CPU's slot in it exists now.
            match table.get_ptr_mut(key) {
                Some(counters) => add_counts(counters, bytes, packets),
                None => count_outside(key, OutsideReason::InsertFailed, bytes, packets),
            }
        }
        Err(err) if err == -E2BIG => {
            if let Some(full) = full {
                // SAFETY: as above.
                unsafe { *full = full_mark };
            }
            count_outside(key, OutsideReason::TableFull, bytes, packets)
        }
        Err(_) => count_outside(key, OutsideReason::InsertFailed, bytes, packets),
    }
    false
}

/// Counts a frame of `key`'s interface and hook outside the flow
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
    if let Some(index) = outside_slot_index(generation, key.ifindex, key.hook, reason)
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
        hook: key.hook,
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
    let slot = outside_unkeyed_index(generation, key.hook, reason);
    if let Some(counters) = NTM_OUTSIDE_UNKEYED.get_ptr_mut(slot) {
        add_counts(counters, bytes, packets);
    }
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
