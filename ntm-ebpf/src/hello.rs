//! ClientHellos that span segments. The first segment of a hello is picked
//! out by its first bytes (`parse::handshake_candidate`); the rest have no
//! mark of their own. When a first segment is handed over and its record
//! says more bytes follow, its connection goes into one of this CPU's
//! [`SLOTS`] slots, and the connection's next segments within the hello's
//! bytes are handed over too (at most [`FOLLOW_SEGMENTS`] of them). A
//! slot's connection is found by its addresses (the flow key's words),
//! its ports and its sequence numbers.
//!
//! Per CPU: a connection's segments arrive on one CPU where receive-side
//! scaling hashes by its ports (NICs, XDP), and a local socket sends a
//! hello in one aggregate, which needs no following. Cost: a TCP segment
//! with data that is no hello's first tests this CPU's `active` word; only
//! while a hello is followed does it compare itself with the slots. A slot
//! whose hello never completes (its last segments lost, a hostile half
//! hello) is let go after [`STALE_AFTER`] other segments on its CPU, and
//! a new hello takes the oldest slot: a flood of half hellos holds four
//! slots per CPU and nothing more.

use aya_ebpf::btf_maps::PerCpuArray;
use aya_ebpf::macros::btf_map;
use ntm_common::{KEY_WORDS, family, ipproto};

use crate::parse::Parsed;

/// Hellos followed at once per CPU.
const SLOTS: usize = 4;
/// Segments of one hello handed over after its first at most (a 16 KiB
/// hello over a path with a 536-byte MSS).
const FOLLOW_SEGMENTS: u16 = 32;
/// Other TCP segments with data on its CPU after which a slot is let go.
const STALE_AFTER: u16 = 4096;
/// A hello's bytes followed at most (what the agent reads at most, with
/// its record headers).
const MAX_HELLO: u32 = 16 * 1024 + 64;

#[repr(C)]
struct Slot {
    /// The flow key's address words: the client's and the server's.
    addrs: [u64; 4],
    /// Both ports as the TCP header has them (one word, compared whole).
    ports: u32,
    /// Sequence number of the hello's first byte.
    start: u32,
    /// The hello's bytes, its record headers included.
    len: u32,
    /// Its bytes not yet handed over (segments may come in any order).
    remaining: u32,
    /// Segments still to hand over.
    left: u16,
    /// Other segments until the slot is let go.
    age: u16,
}

#[repr(C)]
pub struct Following {
    /// A bit per slot in use.
    active: u32,
    /// The slot the next hello takes.
    next: u32,
    slots: [Slot; SLOTS],
}

#[btf_map]
static NTM_HELLO_FOLLOW: PerCpuArray<Following, 1> = PerCpuArray::new();

/// The family and protocol in a flow key's sixth word.
#[inline(always)]
fn family_and_proto(words: &[u64; KEY_WORDS]) -> (u8, u8) {
    if cfg!(target_endian = "little") {
        (words[5] as u8, (words[5] >> 8) as u8)
    } else {
        ((words[5] >> 56) as u8, (words[5] >> 48) as u8)
    }
}

/// The TCP data of a common frame in `[data, end)`: its ports (one word,
/// as the header has them), its sequence number and its length. None for
/// any other frame (only common frames are followed: IPv4 without options,
/// IPv6 without extension headers).
#[inline(always)]
fn tcp_data(
    data: usize,
    end: usize,
    parsed: &Parsed,
    words: &[u64; KEY_WORDS],
) -> Option<(u32, u32, u32)> {
    let (fam, proto) = family_and_proto(words);
    if proto != ipproto::TCP || parsed.l3_len <= parsed.header_len {
        return None;
    }
    let ip_len = match fam {
        family::IPV4 => 20,
        family::IPV6 => 40,
        _ => return None,
    };
    let l4 = data + (parsed.l3_offset & 0xff) + ip_len;
    if l4 + 8 > end {
        return None;
    }
    // SAFETY: the 8 bytes at `l4` (ports and sequence number) were just
    // checked to be in the frame.
    let (ports, seq) = unsafe {
        (
            core::ptr::read_unaligned(l4 as *const u32),
            u32::from_be(core::ptr::read_unaligned((l4 + 4) as *const u32)),
        )
    };
    Some((ports, seq, parsed.l3_len - parsed.header_len))
}

/// After a hello's first segment was handed over: follows its connection
/// if the hello goes on past this segment. `head`: the record header and
/// the handshake header, the segment's first 9 bytes (None if they could
/// not be read).
#[inline(always)]
pub fn follow(
    data: usize,
    end: usize,
    parsed: &Parsed,
    words: &[u64; KEY_WORDS],
    head: Option<[u8; 9]>,
) {
    let (Some((ports, seq, here)), Some(head)) = (tcp_data(data, end, parsed, words), head) else {
        return;
    };
    let record = u16::from_be_bytes([head[3], head[4]]) as u32;
    let message = u32::from_be_bytes([0, head[6], head[7], head[8]]);
    // A hello in one record, or (rarely) in several, each with a header.
    let len = if message + 4 <= record {
        5 + record
    } else {
        5 + message + 4 + 5 * ((message + 4) / record.max(1))
    };
    let len = if len > MAX_HELLO { MAX_HELLO } else { len };
    if here >= len {
        return;
    }
    let Some(following) = NTM_HELLO_FOLLOW.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's value of a per-CPU array, from a successful
    // lookup; TC and XDP run with bottom halves off, so nothing else on
    // this CPU writes it meanwhile.
    unsafe {
        let i = ((*following).next as usize) % SLOTS;
        (*following).next = (i as u32 + 1) % SLOTS as u32;
        let slot = &mut (*following).slots[i];
        slot.addrs = [words[0], words[1], words[2], words[3]];
        slot.ports = ports;
        slot.start = seq;
        slot.len = len;
        slot.remaining = len - here;
        slot.left = FOLLOW_SEGMENTS;
        slot.age = STALE_AFTER;
        (*following).active |= 1 << i;
    }
}

/// Whether a TCP segment with data that is no hello's first continues a
/// hello this CPU follows: then it is to be handed over too.
#[inline(always)]
pub fn continues(data: usize, end: usize, parsed: &Parsed, words: &[u64; KEY_WORDS]) -> bool {
    let Some(following) = NTM_HELLO_FOLLOW.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: as in `follow`.
    unsafe {
        if (*following).active == 0 {
            return false;
        }
        let Some((ports, seq, len)) = tcp_data(data, end, parsed, words) else {
            return false;
        };
        let mut handed = false;
        for i in 0..SLOTS {
            if (*following).active & (1 << i) == 0 {
                continue;
            }
            let slot = &mut (*following).slots[i];
            let ours = slot.ports == ports
                && slot.addrs[0] == words[0]
                && slot.addrs[1] == words[1]
                && slot.addrs[2] == words[2]
                && slot.addrs[3] == words[3];
            let offset = seq.wrapping_sub(slot.start);
            if ours && offset < slot.len {
                handed = true;
                slot.left -= 1;
                let taken = if len < slot.remaining {
                    len
                } else {
                    slot.remaining
                };
                slot.remaining -= taken;
                if slot.remaining == 0 || slot.left == 0 {
                    (*following).active &= !(1 << i);
                }
            } else {
                slot.age -= 1;
                if slot.age == 0 {
                    (*following).active &= !(1 << i);
                }
            }
        }
        handed
    }
}
