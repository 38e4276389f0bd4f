//! What the agent learns names from, besides the counts: DNS and DHCP
//! frames and the handshakes that name a server (a ClientHello's segments,
//! a QUIC Initial), handed to it through the ring buffer (within a rate per
//! CPU and kind) by the hand-over programs, and the source MAC of each
//! local address, learnt when a flow takes a cache slot.

use core::mem::MaybeUninit;

use aya_ebpf::{
    bindings::BPF_RB_AVAIL_DATA,
    cty::c_void,
    helpers::generated::{
        bpf_ktime_get_ns, bpf_ringbuf_query, bpf_skb_load_bytes, bpf_xdp_load_bytes,
    },
    programs::{TcContext, XdpContext},
};
use ntm_common::{
    FlowKey, Hook, KEY_WORDS, ipproto,
    observe::{
        self, CAPTURE_BYTES, DropReason, HELLO_PREFIX_LEN, Kind, MacKey, MacValue, Record,
        starts_client_hello,
    },
};

use crate::{
    count::{self, stage},
    hello,
    maps::{
        NTM_MAC_NETS, NTM_MACS, NTM_OBSERVE_DROPS, NTM_OBSERVE_KINDS, NTM_OBSERVE_RATE,
        NTM_OBSERVE_WINDOW, NTM_OBSERVED, setting,
    },
    parse::{self, FOLLOW_TLS, NOT_OBSERVED, PEEK_TLS, Parsed},
};

/// Whether the agent wants a frame of `kind` (NOT_OBSERVED: no). Both
/// settings are constants to the verifier: with observation off this is
/// false and the code behind it is gone.
#[inline(always)]
pub fn agent_wants(kind: u8) -> bool {
    kind != NOT_OBSERVED
        && setting(&NTM_OBSERVE_RATE) != 0
        && setting(&NTM_OBSERVE_KINDS) & (1u32 << (kind & 7)) != 0
}

/// Whether the counting half hands a frame the parse marked `observe`
/// (`Parsed::observe`) to the hand-over program: for nearly every frame
/// one compare.
#[inline(always)]
pub fn may_hand_over(observe: u8) -> bool {
    // The common answer first, as one compare: as a match, LLVM tested the
    // two TLS marks first (a subtract, a compare, then the compare).
    if core::intrinsics::likely(observe == NOT_OBSERVED) {
        return false;
    }
    let kind = if observe == PEEK_TLS || observe == FOLLOW_TLS {
        Kind::Tls as u8
    } else {
        observe
    };
    agent_wants(kind)
}

// The hand-over programs (`ntm_observe_*` in main.rs): a frame the parse
// marked, counted already, is parsed again and looked into here, out of
// the counting half, whose path every frame takes (and whose size the
// verifier bounds).

/// The hand-over program of a TC hook.
#[inline(always)]
pub fn hand_over_tc<const ETHERNET: bool>(ctx: &TcContext, hook: Hook) {
    let mut space = MaybeUninit::<FlowKey>::uninit();
    let seen = count::read_tc::<ETHERNET, { stage::PARSE }>(ctx, hook, &mut space);
    let Ok(parsed) = &seen.parsed else {
        return;
    };
    let frame = FrameInfo {
        kind: NOT_OBSERVED,
        ifindex: seen.ifindex,
        frame_len: seen.len,
        hook,
        link: if ETHERNET {
            observe::link::ETHERNET
        } else {
            observe::link::RAW_IP
        },
    };
    let skb = ctx.skb.skb as *const c_void;
    hand_over_parsed(parsed, &seen.words, frame, |offset, to, len| {
        // SAFETY: `to` is `len` writable bytes (a record's data, or a
        // local array of at least `len` bytes); bpf_skb_load_bytes reads
        // the skb (linear or not) within its length and fails otherwise.
        unsafe { bpf_skb_load_bytes(skb, offset, to, len) == 0 }
    });
}

/// The hand-over program of XDP: the frame is all in [data, data_end).
#[inline(always)]
pub fn hand_over_xdp(ctx: &XdpContext) {
    let mut space = MaybeUninit::<FlowKey>::uninit();
    let seen = count::read_xdp(ctx, &mut space);
    let Ok(parsed) = &seen.parsed else {
        return;
    };
    let frame = FrameInfo {
        kind: NOT_OBSERVED,
        ifindex: seen.ifindex,
        frame_len: seen.len,
        hook: Hook::Ingress,
        link: observe::link::ETHERNET,
    };
    let xdp = ctx.ctx as *mut _;
    hand_over_parsed(parsed, &seen.words, frame, |offset, to, len| {
        // SAFETY: as in `hand_over_tc`; bpf_xdp_load_bytes checks the
        // frame's bounds.
        unsafe { bpf_xdp_load_bytes(xdp, offset, to, len) == 0 }
    });
}

/// Decides what a marked frame is and hands it over: `load(offset, to,
/// len)` copies the frame's bytes with its hook's helper. A ClientHello
/// that goes on past its first segment has its connection followed
/// (`hello.rs`).
#[inline(always)]
fn hand_over_parsed(
    parsed: &Parsed,
    words: &[u64; KEY_WORDS],
    mut frame: FrameInfo,
    load: impl Fn(u32, *mut c_void, u32) -> bool,
) {
    let payload = (parsed.l3_offset as u32).wrapping_add(parsed.header_len);
    let kind = match parsed.observe {
        NOT_OBSERVED => return,
        PEEK_TLS => {
            let mut first = [0u8; HELLO_PREFIX_LEN];
            let loaded = load(
                payload,
                first.as_mut_ptr() as *mut c_void,
                HELLO_PREFIX_LEN as u32,
            );
            let word = u32::from_le_bytes([first[0], first[1], first[2], first[3]]);
            if !loaded || !starts_client_hello(word, first[5]) {
                return;
            }
            Kind::Tls as u8
        }
        FOLLOW_TLS => match tcp_segment(parsed, &load) {
            Some(segment) if hello::continues(words, &segment) => Kind::Tls as u8,
            _ => return,
        },
        // A TCP segment without data says nothing (DNS over TCP).
        _ if parse::proto_of(words) == ipproto::TCP
            && parsed.l3_len != 0
            && parsed.l3_len <= parsed.header_len =>
        {
            return;
        }
        by_port_or_first_bytes => by_port_or_first_bytes,
    };
    if !agent_wants(kind) {
        return;
    }
    frame.kind = kind;
    if !hand_over(&frame, |to, len| load(0, to, len)) {
        return;
    }
    if kind == Kind::Tls as u8 && parsed.observe != FOLLOW_TLS {
        let mut head = [0u8; 9];
        if load(payload, head.as_mut_ptr() as *mut c_void, 9)
            && let Some(segment) = tcp_segment(parsed, &load)
        {
            hello::follow(words, &segment, &head);
        }
    }
}

/// A TCP segment's ports, sequence number and data length, read from its
/// header with `load`.
#[inline(always)]
fn tcp_segment(
    parsed: &Parsed,
    load: &impl Fn(u32, *mut c_void, u32) -> bool,
) -> Option<hello::Segment> {
    if parsed.l3_len <= parsed.header_len {
        return None;
    }
    let mut first = [0u8; 8];
    if !load(
        parsed.l4_offset as u32,
        first.as_mut_ptr() as *mut c_void,
        8,
    ) {
        return None;
    }
    Some(hello::Segment::from_header(
        &first,
        parsed.l3_len - parsed.header_len,
    ))
}

/// Whether this CPU may hand over one more frame of `kind` in this second:
/// each kind has the rate of its own, so that a flood of one (half
/// ClientHellos, say) leaves the others theirs.
#[inline(always)]
fn within_rate(kind: u8) -> bool {
    let Some(window) = NTM_OBSERVE_WINDOW.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: no arguments, no memory touched.
    let now = unsafe { bpf_ktime_get_ns() };
    let rate = setting(&NTM_OBSERVE_RATE) as u64;
    let kind = (kind as usize) % Kind::COUNT as usize;
    // SAFETY: the pointer comes from a successful per-CPU lookup, and no
    // one else writes this CPU's value while the program runs (as in
    // `add_counts`).
    unsafe {
        if now.wrapping_sub((*window).start_ns) >= 1_000_000_000 {
            (*window).start_ns = now;
            (*window).used = [0; Kind::COUNT as usize];
        }
        if (*window).used[kind] >= rate {
            return false;
        }
        (*window).used[kind] += 1;
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

/// What a record's header says of the frame it holds.
struct FrameInfo {
    kind: u8,
    ifindex: u32,
    frame_len: u32,
    hook: Hook,
    link: u8,
}

/// The hand-over both hooks share: within its kind's rate, into a
/// reserved record, whose data `load` fills with the frame's first `len`
/// bytes (with its hook's helper), reporting whether it could. A handshake
/// is not handed over while the ring is half full: what is left is DNS's
/// and DHCP's. True if the frame was handed over.
#[inline(always)]
fn hand_over(frame: &FrameInfo, load: impl FnOnce(*mut c_void, u32) -> bool) -> bool {
    if !within_rate(frame.kind) {
        count_drop(frame.kind, DropReason::RateLimited);
        return false;
    }
    let handshake = frame.kind == Kind::Tls as u8 || frame.kind == Kind::Quic as u8;
    if handshake && ring_bytes_unread() > observe::RING_BYTES as u64 / 2 {
        count_drop(frame.kind, DropReason::RingFull);
        return false;
    }
    let Some(mut entry) = NTM_OBSERVED.reserve(0) else {
        count_drop(frame.kind, DropReason::RingFull);
        return false;
    };
    let len = capture_len(frame.frame_len);
    let record = entry.as_mut_ptr();
    // SAFETY: `record` is a reserved, writable Record; only the address of
    // its data is taken here.
    let data = unsafe { (*record).data.as_mut_ptr() as *mut c_void };
    if !load(data, len) {
        entry.discard(0);
        return false;
    }
    // SAFETY: as above, the record is reserved and writable.
    unsafe { write_header(record, frame, len) };
    entry.submit(0);
    true
}

/// Bytes of the ring the agent has not read yet.
#[inline(always)]
fn ring_bytes_unread() -> u64 {
    // The map's address, as aya's own calls take it (its `as_ptr` is not
    // public); the loader turns it into the map.
    let ring = core::ptr::from_ref(&NTM_OBSERVED)
        .cast_mut()
        .cast::<c_void>();
    // SAFETY: `ring` is the ring buffer map; the helper only reads its
    // positions.
    unsafe { bpf_ringbuf_query(ring, BPF_RB_AVAIL_DATA as u64) }
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
            hook: frame.hook as u8,
            link: frame.link,
            kind: frame.kind,
            _pad: [0; 3],
        };
    }
}

/// Notes which MAC the frame came from for its source address, if that
/// is news: called only when a flow takes a cache slot, so a steady flow
/// costs nothing, and only on Ethernet ingress (at egress the source MAC
/// is this machine's).
#[inline(always)]
pub fn learn_mac(data: usize, end: usize, key: &FlowKey) {
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
