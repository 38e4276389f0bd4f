//! TCP handshakes seen on the hooks, for their latency where ntm sees them
//! and the connections that fail (see `ntm_common::handshake`): a SYN, the
//! SYN-ACK answering it, the client's ACK of that, a RST, an ICMP
//! destination unreachable quoting the SYN. Keyed by host, so that a
//! handshake seen on several hooks (a router's two interfaces, a bridge's
//! port and the bridge) is one; a segment seen twice on its way through
//! counts once.
//!
//! A data segment pays one test (the parse leaves its flags 0, see
//! `parse::handshake_part`); a bare ACK tests its connection's gate slot:
//! the table is looked in only for a SYN, a RST, an ICMP destination
//! unreachable, or a bare ACK whose gate slot counts a handshake waiting
//! for its client's ACK. TCP segments of other shapes (IPv4 options, IPv6
//! extension headers, a VLAN tag in the frame) are not followed, nor are
//! frames the filter rejected.
//!
//! The kernel only writes entries; the agent takes the ended ones each
//! drain and deletes them, and the SYNs left unanswered.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use ntm_common::{
    KEY_WORDS, family,
    handshake::{
        Handshake, HandshakeKey, ICMP_UNREACHABLE, SIGHTING_NS, gate_index, lost, state,
        tcp_flags::{ACK, RST, SYN},
    },
    key_flags,
};

use crate::maps::{
    NTM_HANDSHAKE_GATE, NTM_HANDSHAKES, NTM_HANDSHAKES_LOST, NTM_TRACK_HANDSHAKES, setting,
};

// bpf_map_update_elem's flag, and the errno for a key already there.
const BPF_NOEXIST: u64 = 1;
const EEXIST: i32 = 17;

/// What a frame asks of the handshake table, worked out from its parse
/// before it is counted and done after ([`track`]): where its headers are,
/// its flags, the side its service port is on and its connection's gate
/// slot, in one register; 0 for nothing, which nearly every frame asks.
///
/// Split in two so that only this register lives across the count: with
/// the whole of `track` before the count, as it was, the calls on its rare
/// paths made the compiler keep more of the key and the parse's results on
/// the stack on every frame's path, calls or not (docs/performance.md: 4
/// to 18 fewer instructions on the steady state's paths, up to 3 ns).
#[derive(Clone, Copy)]
pub struct Pending(u64);

impl Pending {
    pub const NONE: Self = Self(0);
}

/// Whether a TCP connection's next frames are to take the full path, which
/// follows handshakes (`ntm_common::slot_id::watch::HANDSHAKE`): after a
/// client's SYN (`pending` is one), and while a handshake of its gate slot
/// waits for its client's ACK, which the steady state would not look at.
/// `words`: the frame's flow key.
#[inline(always)]
pub fn awaited(pending: Pending, words: &[u64; KEY_WORDS]) -> bool {
    if setting(&NTM_TRACK_HANDSHAKES) == 0
        || crate::parse::proto_of(words) != ntm_common::ipproto::TCP
    {
        return false;
    }
    let syn = pending.0 != 0 && Where(pending.0 & 0xffff_ffff).flags() & (SYN | ACK) == SYN;
    syn || gate_open(gate_index(words))
}

/// The handshake part of a frame, if it has one. `flags`: its TCP flags
/// where it may have one (a SYN, a RST or a bare ACK of a common frame),
/// `ICMP_UNREACHABLE` for a destination unreachable, 0 for any other frame
/// (`parse::handshake_part`), data segments among them, which pay that one
/// test. `words`: its flow key, in registers (the gate's slot and the
/// service port's side are taken from them). `l3`: where its IP header
/// starts; `header_len`: its headers' length.
#[inline(always)]
pub fn pending(flags: u8, words: &[u64; KEY_WORDS], l3: usize, header_len: u32) -> Pending {
    if setting(&NTM_TRACK_HANDSHAKES) == 0 || flags == 0 {
        return Pending::NONE;
    }
    let at = if flags & (SYN | RST) != 0 {
        let service_is_src = key_flags_of(words) & key_flags::SERVICE_PORT_IS_SRC != 0;
        Where::pack(l3, flags, service_is_src)
    } else if flags == ICMP_UNREACHABLE {
        // The quoted packet follows the ICMP header, the last 8 bytes of
        // the headers parsed.
        Where::pack(l3 + header_len as usize, flags, false)
    } else {
        // A bare ACK (see `parse::handshake_part`).
        Where::pack(l3, flags, false)
    };
    // Never 0: `flags` is not.
    Pending(at.0 | (gate_index(words) as u64) << 32)
}

/// Follows a frame's part in a handshake, as [`pending`] found it, once
/// the frame is counted. `frame`: the frame's `[data, end)`, asked for only
/// off the ordinary path, where what the table needs is read from the frame
/// again.
#[inline(always)]
pub fn track(pending: Pending, frame: impl FnOnce() -> (usize, usize)) {
    if pending.0 == 0 {
        return;
    }
    let at = Where(pending.0 & 0xffff_ffff);
    let gate = (pending.0 >> 32) as u32;
    let flags = at.flags();
    if flags & (SYN | RST) != 0 {
        let (data, end) = frame();
        control(data, end, at, gate);
    } else if flags == ICMP_UNREACHABLE {
        let (data, end) = frame();
        unreachable(data, end, at);
    } else if gate_open(gate) {
        let (data, end) = frame();
        client_ack(data, end, at);
    }
}

/// A frame's header offset (up to 64 KiB), TCP flags and the side its
/// service port is on, in one register: a BPF call takes five arguments
/// at most.
#[derive(Clone, Copy)]
struct Where(u64);

impl Where {
    #[inline(always)]
    fn pack(offset: usize, flags: u8, service_is_src: bool) -> Self {
        Self((offset as u64 & 0xffff) | (flags as u64) << 16 | (service_is_src as u64) << 24)
    }
    #[inline(always)]
    fn l3(self) -> usize {
        (self.0 & 0xffff) as usize
    }
    #[inline(always)]
    fn flags(self) -> u8 {
        (self.0 >> 16) as u8
    }
    #[inline(always)]
    fn service_is_src(self) -> bool {
        (self.0 >> 24) & 1 != 0
    }
}

/// Whether a handshake of this gate slot waits for its client's ACK.
#[inline(always)]
fn gate_open(gate: u32) -> bool {
    match NTM_HANDSHAKE_GATE.get(gate) {
        Some(waiting) => *waiting != 0,
        None => false,
    }
}

/// Adds `n` (one, or minus one as its two's complement) to a gate slot:
/// atomic, as other CPUs and the agent change it too.
#[inline(always)]
fn gate_add(slot: u32, n: u64) {
    if let Some(waiting) = NTM_HANDSHAKE_GATE.get_ptr_mut(slot) {
        // SAFETY: a value of an array map from a successful lookup, 8-byte
        // aligned, changed by atomic operations only. The intrinsic is the
        // BPF atomic add (`lock *(u64 *) += n`): the BPF target has no
        // `Atomic*::fetch_add` (no compare-and-swap), and the old value is
        // not used, which the instruction would need BPF_FETCH for.
        unsafe {
            core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
                waiting, n,
            );
        }
    }
}

/// The wait of `entry` for its client's ACK ends (the ACK, a RST, a new
/// handshake on its ports).
#[inline(always)]
fn close_gate(entry: &Handshake) {
    gate_add(entry.gate, u64::MAX);
}

/// What the handshake needs of a segment, read from the frame: addresses
/// as in a flow key's words, ports, sequence and acknowledgement numbers
/// (host order).
struct Segment {
    family: u8,
    src: [u64; 2],
    dst: [u64; 2],
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
}

/// Reads the IP header at `ip` and the first `tcp_bytes` of the TCP header
/// after it (8: ports and sequence number, all an ICMP error is sure to
/// quote; 20: the whole header), checked against `end` (the parse's checks
/// do not cross into a BPF function for the verifier). None if they are
/// not all there, or the packet is not TCP.
#[inline(always)]
fn read_segment(ip: usize, end: usize, tcp_bytes: usize) -> Option<Segment> {
    if ip + 20 > end {
        return None;
    }
    // SAFETY: every read below is inside the bytes checked before it; an
    // address is read with 4- or 8-byte loads, as the parse reads it.
    unsafe {
        let (family, src, dst, ip_len, proto) = if *(ip as *const u8) >> 4 == 4 {
            let word = |at: usize| {
                let address = *((ip + at) as *const u32) as u64;
                if cfg!(target_endian = "little") {
                    address
                } else {
                    address << 32
                }
            };
            let ihl = ((*(ip as *const u8) & 0x0f) as usize) * 4;
            let proto = *((ip + 9) as *const u8);
            (family::IPV4, [word(12), 0], [word(16), 0], ihl, proto)
        } else {
            if ip + 40 > end {
                return None;
            }
            let words = (ip + 8) as *const u64;
            let next = *((ip + 6) as *const u8);
            (
                family::IPV6,
                [*words, *words.add(1)],
                [*words.add(2), *words.add(3)],
                40,
                next,
            )
        };
        let tcp = ip + ip_len;
        if proto != ntm_common::ipproto::TCP || ip_len < 20 || tcp + tcp_bytes > end {
            return None;
        }
        // The acknowledgement number is past an ICMP error's 8 bytes.
        let ack = if tcp_bytes >= 12 {
            u32::from_be(*((tcp + 8) as *const u32))
        } else {
            0
        };
        Some(Segment {
            family,
            src,
            dst,
            sport: u16::from_be(*(tcp as *const u16)),
            dport: u16::from_be(*((tcp + 2) as *const u16)),
            seq: u32::from_be(*((tcp + 4) as *const u32)),
            ack,
        })
    }
}

/// A common frame's segment, its IP header at `l3`.
#[inline(always)]
fn segment(data: usize, end: usize, l3: usize) -> Option<Segment> {
    // The common parse's offsets: at most an Ethernet header, then the IP
    // header; the bound makes it plain to the verifier.
    if l3 > 14 {
        return None;
    }
    read_segment(data + l3, end, 20)
}

/// The key's flags byte (see `parse::protocol_word`).
#[inline(always)]
fn key_flags_of(words: &[u64; KEY_WORDS]) -> u8 {
    if cfg!(target_endian = "little") {
        (words[5] >> 24) as u8
    } else {
        (words[5] >> 32) as u8
    }
}

/// The handshake of a segment the client sent (`from_client`) or the
/// server did.
#[inline(always)]
fn key_of(s: &Segment, from_client: bool) -> HandshakeKey {
    let mut key = HandshakeKey {
        family: s.family,
        ..HandshakeKey::default()
    };
    let (client, server, client_port, server_port) = if from_client {
        (&s.src, &s.dst, s.sport, s.dport)
    } else {
        (&s.dst, &s.src, s.dport, s.sport)
    };
    // SAFETY: the key's addresses are 16 bytes each, 8-byte aligned.
    unsafe {
        let c = key.client.as_mut_ptr() as *mut u64;
        *c = client[0];
        *c.add(1) = client[1];
        let v = key.server.as_mut_ptr() as *mut u64;
        *v = server[0];
        *v.add(1) = server[1];
    }
    key.client_port = client_port;
    key.server_port = server_port;
    key
}

/// A SYN, SYN-ACK or RST; `gate` its connection's gate slot.
#[inline(never)]
fn control(data: usize, end: usize, at: Where, gate: u32) {
    let Some(s) = segment(data, end, at.l3()) else {
        return;
    };
    let flags = at.flags();
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if flags & RST != 0 {
        reset(&s, at, now);
    } else if flags & ACK == 0 {
        syn(&key_of(&s, true), s.seq, now);
    } else {
        syn_ack(&key_of(&s, false), &s, gate, now);
    }
}

#[inline(always)]
fn syn(key: &HandshakeKey, isn: u32, now: u64) {
    let fresh = Handshake {
        first_syn_ns: now,
        syn_ns: now,
        client_isn: isn,
        syns: 1,
        state: state::SYN_SEEN,
        ..Handshake::default()
    };
    if let Some(entry) = NTM_HANDSHAKES.get_ptr_mut(key) {
        // SAFETY: a value of the shared table from a successful lookup;
        // another CPU may write it at once, and the worst of such a race is
        // one retry counted or not (documented in metrics.md).
        let entry = unsafe { &mut *entry };
        if state::ended(entry.state) {
            count_lost(lost::BUSY);
        } else if entry.client_isn == isn {
            // The same SYN seen again on its way through: not a retry.
            if now.wrapping_sub(entry.syn_ns) >= SIGHTING_NS {
                entry.syns = entry.syns.saturating_add(1);
                entry.syn_ns = now;
            }
        } else {
            // The client's ports used again for a new connection.
            if entry.state == state::AWAIT_ACK {
                close_gate(entry);
            }
            *entry = fresh;
        }
        return;
    }
    insert(key, &fresh);
}

/// Whether a SYN-ACK is the one `entry` was answered with, seen again
/// after the handshake moved on.
#[inline(always)]
fn ended_or_answered(entry: &Handshake, s: &Segment) -> bool {
    entry.state != state::SYN_SEEN && s.seq == entry.server_isn
}

#[inline(always)]
fn syn_ack(key: &HandshakeKey, s: &Segment, gate: u32, now: u64) {
    let Some(entry) = NTM_HANDSHAKES.get_ptr_mut(key) else {
        count_lost(lost::SYNACK_UNMATCHED);
        return;
    };
    // SAFETY: as in `syn`.
    let entry = unsafe { &mut *entry };
    if entry.state == state::SYN_SEEN && s.ack == entry.client_isn.wrapping_add(1) {
        entry.server_isn = s.seq;
        entry.synack_ns = now;
        entry.synacks = 1;
        entry.gate = gate;
        entry.state = state::AWAIT_ACK;
        gate_add(gate, 1);
    } else if entry.state == state::AWAIT_ACK && s.seq == entry.server_isn {
        // The same SYN-ACK seen again on its way through is not a retry.
        if now.wrapping_sub(entry.synack_ns) >= SIGHTING_NS {
            entry.synacks = entry.synacks.saturating_add(1);
        }
    } else if ended_or_answered(entry, s) {
        // Seen again after the client's ACK (or a RST) moved it on.
    } else {
        count_lost(lost::SYNACK_UNMATCHED);
    }
}

/// A segment with ACK and without SYN or RST whose gate slot is open: the
/// client's ACK of the SYN-ACK, or (most often, on a busy host) another
/// segment of that client and server.
#[inline(never)]
fn client_ack(data: usize, end: usize, at: Where) {
    let Some(s) = segment(data, end, at.l3()) else {
        return;
    };
    let key = key_of(&s, true);
    let Some(entry) = NTM_HANDSHAKES.get_ptr_mut(key) else {
        return;
    };
    // SAFETY: as in `syn`.
    let entry = unsafe { &mut *entry };
    if entry.state == state::AWAIT_ACK && s.ack == entry.server_isn.wrapping_add(1) {
        // SAFETY: a helper without arguments.
        entry.done_ns = unsafe { bpf_ktime_get_ns() };
        entry.state = state::ESTABLISHED;
        close_gate(entry);
    }
}

/// An ICMP or ICMPv6 destination unreachable: the SYN it quotes (its
/// addresses, ports and sequence number, at `at.l3()` in the frame) ends
/// as unreachable if it is the one a handshake waits with.
#[inline(never)]
fn unreachable(data: usize, end: usize, at: Where) {
    let offset = at.l3();
    // The full parse stops at MAX_L4_OFFSET; the bound makes it plain to
    // the verifier.
    if offset > crate::parse::MAX_L4_OFFSET + 8 {
        return;
    }
    let Some(quoted) = read_segment(data + offset, end, 8) else {
        return;
    };
    // The quoted packet is the client's SYN.
    let key = key_of(&quoted, true);
    let Some(entry) = NTM_HANDSHAKES.get_ptr_mut(key) else {
        return;
    };
    // SAFETY: as in `syn`.
    let entry = unsafe { &mut *entry };
    if entry.state == state::SYN_SEEN && entry.client_isn == quoted.seq {
        // SAFETY: a helper without arguments.
        entry.done_ns = unsafe { bpf_ktime_get_ns() };
        entry.state = state::UNREACHABLE;
    }
}

/// A RST: refusing a SYN, ending a handshake, or resetting a connection.
#[inline(always)]
fn reset(s: &Segment, at: Where, now: u64) {
    // Sent by the server (the SYN's answer), then by the client.
    for from_client in [false, true] {
        let key = key_of(s, from_client);
        if let Some(entry) = NTM_HANDSHAKES.get_ptr_mut(key) {
            // SAFETY: as in `syn`.
            let entry = unsafe { &mut *entry };
            let ended = match entry.state {
                state::SYN_SEEN if !from_client => state::REFUSED,
                state::SYN_SEEN => state::RESET_IN_HANDSHAKE,
                state::AWAIT_ACK => {
                    close_gate(entry);
                    state::RESET_IN_HANDSHAKE
                }
                state::ESTABLISHED => {
                    entry.reset = 1;
                    return;
                }
                // Ended and counted already: once per connection.
                _ => return,
            };
            entry.done_ns = now;
            entry.state = ended;
            return;
        }
    }
    // No handshake in flight: a connection that was up, its client and
    // server by the service-port rule, as its traffic is counted.
    let from_client = !at.service_is_src();
    let ended = Handshake {
        done_ns: now,
        state: state::RESET,
        ..Handshake::default()
    };
    insert(&key_of(s, from_client), &ended);
}

/// A new entry; a full table is counted. Another CPU's entry for the same
/// key, written since the lookup, is kept.
#[inline(always)]
fn insert(key: &HandshakeKey, value: &Handshake) {
    match NTM_HANDSHAKES.insert(key, value, BPF_NOEXIST) {
        Ok(()) => {}
        Err(e) if e == -EEXIST => {}
        Err(_) => count_lost(lost::NO_ROOM),
    }
}

#[inline(always)]
fn count_lost(slot: u32) {
    if let Some(count) = NTM_HANDSHAKES_LOST.get_ptr_mut(slot) {
        // SAFETY: this CPU's slot of a per-CPU array, from a successful
        // lookup.
        unsafe { *count += 1 };
    }
}
