//! The counting path both hooks share: the flow key built by the parse
//! (with a fragment's port from its first fragment), the per-CPU flow cache,
//! the flow table behind it, and the outside counts of frames that are not
//! counted in the table. Every per-frame function is inlined into its
//! program; `count_outside` is a call of its own.

use aya_ebpf::programs::{TcContext, XdpContext};
use core::mem::{MaybeUninit, size_of};
use ntm_common::{
    Counters, FlowKey, Hook, KEY_WORDS, OutsideKey, OutsideReason, cache_index, outside_slot_index,
    outside_unkeyed_index,
    service_port::{self, PortClass},
};

use crate::{
    lease::{check_lease, lease_check_due},
    maps::{
        FragmentKey, NTM_ACTIVE_CACHE, NTM_ACTIVE_FLOWS, NTM_EPHEMERAL_START, NTM_FRAGMENTS,
        NTM_KNOWN_PORTS, NTM_LEARN_MACS, NTM_OUTSIDE, NTM_OUTSIDE_GENERATION, NTM_OUTSIDE_SLOTS,
        NTM_OUTSIDE_UNKEYED, setting,
    },
    observe::{agent_wants, learn_mac, observe_tc, observe_xdp, wanted_by_agent},
    parse::{self, Fragment, Frame, ParseError, Parsed},
};

// bpf_map_update_elem flags and the errno values it returns.
const BPF_NOEXIST: u64 = 1;
const EEXIST: i32 = 17;
const E2BIG: i32 = 7;

/// Bytes pulled into the linear area when headers lie beyond it.
const PULL_LEN: u32 = 256;

#[inline(always)]
pub fn count_tc<const ETHERNET: bool>(ctx: &TcContext, hook: Hook, filtered: bool) {
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
    key.hook = hook as u8;
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
                key.hook = hook as u8;
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
    if ETHERNET && took_slot && hook == Hook::Ingress && setting(&NTM_LEARN_MACS) != 0 {
        learn_mac(ctx.data(), ctx.data_end(), key);
    }
    if agent_wants(wanted) {
        observe_tc(ctx, wanted, hook, ifindex, skb_len, ETHERNET);
    }
}

#[inline(always)]
pub fn count_xdp(ctx: &XdpContext, filtered: bool) {
    // SAFETY: the context pointer is the kernel's xdp_md for this frame.
    let ifindex = unsafe { (*ctx.ctx).ingress_ifindex };
    let mut key_space = MaybeUninit::<FlowKey>::uninit();
    zero_key(key_space.as_mut_ptr());
    // SAFETY: every byte was just written, and all-zero is a valid FlowKey.
    let key = unsafe { key_space.assume_init_mut() };
    key.ifindex = ifindex;
    key.hook = Hook::Ingress as u8;
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
