//! TCP handshakes seen on the hooks, for their latency at the observation
//! point and the connections that fail (see `ntm_common::handshake`).
//!
//! An ordinary frame pays a test of its TCP flags (read by the common parse
//! with the ports) and, for a segment with ACK set, one gate slot: the
//! table is looked in only for a SYN, a RST, or an ACK whose connection's
//! gate slot a SYN-ACK opened in the last drain epochs. Frames of other
//! shapes (IPv4 options, IPv6 extension headers, a VLAN tag in the frame)
//! are not followed, nor are frames the filter rejected.
//!
//! The kernel only writes entries; the agent takes the ended ones each
//! drain and deletes them, and the SYNs left unanswered.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use ntm_common::{
    KEY_WORDS, family,
    handshake::{
        GATE_EPOCHS, Handshake, HandshakeKey, gate_index, lost, state,
        tcp_flags::{ACK, RST, SYN},
    },
    key_flags,
};

use crate::maps::{
    NTM_HANDSHAKE_EPOCH, NTM_HANDSHAKE_GATE, NTM_HANDSHAKES, NTM_HANDSHAKES_LOST,
    NTM_TRACK_HANDSHAKES, setting,
};

// bpf_map_update_elem's flag, and the errno for a key already there.
const BPF_NOEXIST: u64 = 1;
const EEXIST: i32 = 17;

/// Follows a common frame's part in a handshake, if it has one: `flags`
/// are its TCP flags (0: not a TCP frame of the common shape), `words` its
/// flow key, `l3` where its IP header starts in `[data, end)`, `ifindex`
/// the interface it keys the handshake by (0: the host).
#[inline(always)]
pub fn track(
    data: usize,
    end: usize,
    l3: usize,
    flags: u8,
    words: &[u64; KEY_WORDS],
    ifindex: u32,
) {
    if setting(&NTM_TRACK_HANDSHAKES) == 0 || flags == 0 {
        return;
    }
    // A BPF call takes five arguments at most: the small ones go in one.
    let at = Where::pack(l3, flags, ifindex);
    if flags & (SYN | RST) != 0 {
        control(data, end, at, words);
    } else if flags & ACK != 0 && gate_open(words) {
        client_ack(data, end, at, words);
    }
}

/// A frame's IP header offset, TCP flags and the interface the handshake
/// is keyed by, in one register for a BPF call.
#[derive(Clone, Copy)]
struct Where(u64);

impl Where {
    #[inline(always)]
    fn pack(l3: usize, flags: u8, ifindex: u32) -> Self {
        Self((l3 as u64 & 0xff) | (flags as u64) << 8 | (ifindex as u64) << 32)
    }
    #[inline(always)]
    fn l3(self) -> usize {
        (self.0 & 0xff) as usize
    }
    #[inline(always)]
    fn flags(self) -> u8 {
        (self.0 >> 8) as u8
    }
    #[inline(always)]
    fn ifindex(self) -> u32 {
        (self.0 >> 32) as u32
    }
}

/// Whether a SYN-ACK of this connection's gate slot was seen in the last
/// [`GATE_EPOCHS`] drain epochs.
#[inline(always)]
fn gate_open(words: &[u64; KEY_WORDS]) -> bool {
    let (Some(opened), Some(epoch)) = (
        NTM_HANDSHAKE_GATE.get(gate_index(words)),
        NTM_HANDSHAKE_EPOCH.get(0),
    ) else {
        return false;
    };
    *opened != 0 && epoch.wrapping_sub(*opened) <= GATE_EPOCHS
}

/// What the handshake needs of a segment: ports, sequence and
/// acknowledgement numbers (host order).
struct Segment {
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
}

/// Reads the segment's TCP header, checked against `end` again (the
/// caller's checks do not cross into this function for the verifier).
#[inline(always)]
fn segment(data: usize, end: usize, l3: usize, words: &[u64; KEY_WORDS]) -> Option<Segment> {
    let ip_len = if family_of(words) == family::IPV4 {
        20
    } else {
        40
    };
    // The common parse's offsets: at most an Ethernet header, then the IP
    // header without options; the bound makes it plain to the verifier.
    if l3 > 14 {
        return None;
    }
    let tcp = data + l3 + ip_len;
    if tcp + 20 > end {
        return None;
    }
    // SAFETY: the 20-byte TCP header was just checked to lie inside the
    // frame.
    unsafe {
        Some(Segment {
            sport: u16::from_be(*(tcp as *const u16)),
            dport: u16::from_be(*((tcp + 2) as *const u16)),
            seq: u32::from_be(*((tcp + 4) as *const u32)),
            ack: u32::from_be(*((tcp + 8) as *const u32)),
        })
    }
}

/// The key's family byte (see `parse::protocol_word`).
#[inline(always)]
fn family_of(words: &[u64; KEY_WORDS]) -> u8 {
    if cfg!(target_endian = "little") {
        words[5] as u8
    } else {
        (words[5] >> 56) as u8
    }
}

/// The key's flags byte.
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
fn key_of(words: &[u64; KEY_WORDS], s: &Segment, from_client: bool, ifindex: u32) -> HandshakeKey {
    let mut key = HandshakeKey {
        family: family_of(words),
        ifindex,
        ..HandshakeKey::default()
    };
    let (client, server) = if from_client { (0, 2) } else { (2, 0) };
    let (client_port, server_port) = if from_client {
        (s.sport, s.dport)
    } else {
        (s.dport, s.sport)
    };
    // SAFETY: the key's addresses are 16 bytes each, 8-byte aligned.
    unsafe {
        let c = key.client.as_mut_ptr() as *mut u64;
        *c = words[client];
        *c.add(1) = words[client + 1];
        let v = key.server.as_mut_ptr() as *mut u64;
        *v = words[server];
        *v.add(1) = words[server + 1];
    }
    key.client_port = client_port;
    key.server_port = server_port;
    key
}

/// A SYN, SYN-ACK or RST.
#[inline(never)]
fn control(data: usize, end: usize, at: Where, words: &[u64; KEY_WORDS]) {
    let (flags, ifindex) = (at.flags(), at.ifindex());
    let Some(s) = segment(data, end, at.l3(), words) else {
        return;
    };
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if flags & RST != 0 {
        reset(words, &s, ifindex, now);
    } else if flags & ACK == 0 {
        syn(&key_of(words, &s, true, ifindex), s.seq, now);
    } else {
        syn_ack(&key_of(words, &s, false, ifindex), &s, words, now);
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
            entry.syns = entry.syns.saturating_add(1);
            entry.syn_ns = now;
        } else {
            // The client's ports used again for a new connection.
            *entry = fresh;
        }
        return;
    }
    insert(key, &fresh);
}

#[inline(always)]
fn syn_ack(key: &HandshakeKey, s: &Segment, words: &[u64; KEY_WORDS], now: u64) {
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
        entry.state = state::AWAIT_ACK;
    } else if entry.state == state::AWAIT_ACK && s.seq == entry.server_isn {
        entry.synacks = entry.synacks.saturating_add(1);
    } else {
        count_lost(lost::SYNACK_UNMATCHED);
        return;
    }
    if let (Some(slot), Some(epoch)) = (
        NTM_HANDSHAKE_GATE.get_ptr_mut(gate_index(words)),
        NTM_HANDSHAKE_EPOCH.get(0),
    ) {
        // SAFETY: a slot of an array, from a successful lookup.
        unsafe { *slot = *epoch };
    }
}

/// A segment with ACK and without SYN or RST whose gate slot is open: the
/// client's ACK of the SYN-ACK, or (most often, on a busy host) another
/// segment of that client and server.
#[inline(never)]
fn client_ack(data: usize, end: usize, at: Where, words: &[u64; KEY_WORDS]) {
    let Some(s) = segment(data, end, at.l3(), words) else {
        return;
    };
    let key = key_of(words, &s, true, at.ifindex());
    let Some(entry) = NTM_HANDSHAKES.get_ptr_mut(key) else {
        return;
    };
    // SAFETY: as in `syn`.
    let entry = unsafe { &mut *entry };
    if entry.state == state::AWAIT_ACK && s.ack == entry.server_isn.wrapping_add(1) {
        // SAFETY: a helper without arguments.
        entry.done_ns = unsafe { bpf_ktime_get_ns() };
        entry.state = state::ESTABLISHED;
    }
}

/// A RST: refusing a SYN, ending a handshake, or resetting a connection.
#[inline(always)]
fn reset(words: &[u64; KEY_WORDS], s: &Segment, ifindex: u32, now: u64) {
    // Sent by the server (the SYN's answer), then by the client.
    for from_client in [false, true] {
        let key = key_of(words, s, from_client, ifindex);
        if let Some(entry) = NTM_HANDSHAKES.get_ptr_mut(key) {
            // SAFETY: as in `syn`.
            let entry = unsafe { &mut *entry };
            let ended = match entry.state {
                state::SYN_SEEN if !from_client => state::REFUSED,
                state::SYN_SEEN | state::AWAIT_ACK => state::RESET_IN_HANDSHAKE,
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
    let from_client = key_flags_of(words) & key_flags::SERVICE_PORT_IS_SRC == 0;
    let ended = Handshake {
        done_ns: now,
        state: state::RESET,
        ..Handshake::default()
    };
    insert(&key_of(words, s, from_client, ifindex), &ended);
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
