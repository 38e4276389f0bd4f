//! What the agent learns names from, besides the counts: DNS and DHCP
//! frames handed to it through the ring buffer (within a rate per CPU), and
//! the source MAC of each local address, learnt when a flow takes a cache
//! slot.

use aya_ebpf::{
    cty::c_void,
    helpers::generated::{bpf_ktime_get_ns, bpf_skb_load_bytes, bpf_xdp_load_bytes},
    programs::{TcContext, XdpContext},
};
use ntm_common::{
    FlowKey, Hook, ipproto,
    observe::{self, CAPTURE_BYTES, DropReason, MacKey, MacValue, Record},
};

use crate::{
    maps::{
        NTM_MAC_NETS, NTM_MACS, NTM_OBSERVE_DROPS, NTM_OBSERVE_KINDS, NTM_OBSERVE_RATE,
        NTM_OBSERVE_WINDOW, NTM_OBSERVED, setting,
    },
    parse::{NOT_OBSERVED, Parsed},
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

/// The `observe::Kind` of a frame the agent wants for names (as the parse
/// found it by its ports), or NOT_OBSERVED: a TCP segment without payload
/// says nothing. Asked only of a frame the parse found one for.
#[inline(always)]
pub fn wanted_by_agent(parsed: &Parsed, key: &FlowKey) -> u8 {
    if key.proto == ipproto::TCP && parsed.l3_len != 0 && parsed.l3_len <= parsed.header_len {
        NOT_OBSERVED
    } else {
        parsed.observe
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
pub fn observe_tc(
    ctx: &TcContext,
    kind: u8,
    hook: Hook,
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
        hook,
        link,
    };
    hand_over(&frame, |to, len| {
        // SAFETY: `to` is `len` (1 to CAPTURE_BYTES) writable bytes of a
        // reserved record; bpf_skb_load_bytes reads the skb (linear or
        // not) within its length and fails otherwise.
        unsafe { bpf_skb_load_bytes(ctx.skb.skb as *const c_void, 0, to, len) == 0 }
    });
}

/// XDP's [`observe_tc`]: the frame is all in [data, data_end).
#[inline(always)]
pub fn observe_xdp(ctx: &XdpContext, kind: u8, ifindex: u32, frame_len: u32) {
    let frame = FrameInfo {
        kind,
        ifindex,
        frame_len,
        hook: Hook::Ingress,
        link: observe::link::ETHERNET,
    };
    hand_over(&frame, |to, len| {
        // SAFETY: as in observe_tc; bpf_xdp_load_bytes checks the frame's
        // bounds.
        unsafe { bpf_xdp_load_bytes(ctx.ctx as *mut _, 0, to, len) == 0 }
    });
}

/// What a record's header says of the frame it holds.
struct FrameInfo {
    kind: u8,
    ifindex: u32,
    frame_len: u32,
    hook: Hook,
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
