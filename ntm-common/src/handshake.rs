//! TCP handshakes as the frames on a hook show them: what the kernel keeps
//! of each handshake in flight (or just ended) and the agent reads, to
//! measure the two halves of its latency at the observation point and to
//! count connections that fail.
//!
//! The kernel writes an entry at a client's SYN and moves it on at the
//! server's SYN-ACK and the client's ACK (or a RST); it never deletes one.
//! The agent reads the table each drain, takes the entries that have ended
//! (and the SYNs left unanswered too long) and deletes them, so every
//! handshake is counted once, with no ring buffer to lose it.

/// Which handshake: the client (the side that sent the SYN) and the server.
/// Addresses as in [`crate::FlowKey`] (IPv4 in the first four bytes);
/// ports in host order.
///
/// Keyed by the host, not by the interface a frame was seen on: a
/// forwarded SYN may be seen coming in on one interface and its SYN-ACK on
/// another (XDP, ingress only), and on a bridge a frame is seen on a port
/// one way and on the bridge the other. A frame seen twice on its way
/// through (in on one hooked interface, out of another) is one sighting:
/// see [`SIGHTING_NS`].
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HandshakeKey {
    pub client: [u8; 16],
    pub server: [u8; 16],
    pub client_port: u16,
    pub server_port: u16,
    /// One of [`crate::family`].
    pub family: u8,
    pub _pad: [u8; 11],
}

/// A SYN (or SYN-ACK) with the sequence number of the last one this soon
/// after it is the same segment seen again on its way through the host,
/// not a retry: TCP retries a SYN after a second at the soonest (RFC 6298's
/// initial RTO; Linux's is 1 s), and forwarding takes microseconds.
pub const SIGHTING_NS: u64 = 200_000_000;

const _: () = assert!(core::mem::size_of::<HandshakeKey>() == 48);

/// What the frames showed of one handshake. Times are CLOCK_MONOTONIC ns
/// (`bpf_ktime_get_ns`).
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Handshake {
    /// The first SYN.
    pub first_syn_ns: u64,
    /// The last SYN (a retry moves it).
    pub syn_ns: u64,
    /// The first SYN-ACK answering the SYN.
    pub synack_ns: u64,
    /// When it ended ([`state`] past [`state::AWAIT_ACK`]); 0 before.
    pub done_ns: u64,
    /// The client's initial sequence number (the SYN's).
    pub client_isn: u32,
    /// The server's (the SYN-ACK's).
    pub server_isn: u32,
    /// The gate slot the SYN-ACK opened (see [`gate_index`]), for whoever
    /// ends the wait for the client's ACK to close it again.
    pub gate: u32,
    /// SYNs seen with the client's ISN: more than one are retries, and the
    /// server's time is then not measured (which SYN was answered is not
    /// known).
    pub syns: u16,
    /// SYN-ACKs seen: more than one, the client's time is not measured.
    pub synacks: u16,
    /// One of [`state`].
    pub state: u8,
    /// 1: a RST came after the client's ACK, before the agent took the
    /// entry (a connection reset at once); the agent counts both.
    pub reset: u8,
    pub _pad: [u8; 6],
}

const _: () = assert!(core::mem::size_of::<Handshake>() == 56);

/// Where a handshake stands ([`Handshake::state`]).
pub mod state {
    /// The client's SYN seen, no answer yet.
    pub const SYN_SEEN: u8 = 1;
    /// The server's SYN-ACK seen, the client's ACK not yet.
    pub const AWAIT_ACK: u8 = 2;
    // Ended: the agent takes these.
    /// The client's ACK of the SYN-ACK seen: the connection is up.
    pub const ESTABLISHED: u8 = 3;
    /// A RST answered the SYN: no one listens on the port.
    pub const REFUSED: u8 = 4;
    /// A RST after the SYN-ACK, before the client's ACK.
    pub const RESET_IN_HANDSHAKE: u8 = 5;
    /// A RST on a connection with no handshake in flight: one that was up
    /// (or whose handshake was not seen). The entry is keyed by the
    /// service-port rule's client and server, and written once per
    /// connection until the agent takes it.
    pub const RESET: u8 = 6;
    /// An ICMP or ICMPv6 destination unreachable quoting the SYN.
    pub const UNREACHABLE: u8 = 7;

    /// Whether the agent takes an entry in `state` as it is.
    pub const fn ended(state: u8) -> bool {
        state >= ESTABLISHED
    }
}

/// Handshakes the table holds: those in flight and those ended since the
/// last drain.
pub const HANDSHAKE_ENTRIES: u32 = 32_768;

/// Slots of the gate in front of the table for bare ACKs, which may be a
/// client's ACK of a SYN-ACK (see [`gate_index`]). Each holds how many
/// handshakes of its slot wait for that ACK: a SYN-ACK adds one, the ACK,
/// a RST, or the agent giving up on the wait takes it away.
pub const GATE_SLOTS: u32 = 32_768;

/// `BPF_F_MMAPABLE`: the gate is shared memory, which the agent maps to
/// close the slots of handshakes it gives up on (an atomic subtraction,
/// as the programs make).
pub const GATE_MAP_FLAGS: usize = 1 << 10;

/// The gate slot of a connection, from its flow key's words: the same for
/// both directions and every hook and interface (the addresses' XOR and
/// the service port only), so that a SYN-ACK opens the slot its client's
/// ACK will test. Connections of one client and server on one service
/// share it: their data frames then look in the table and find nothing
/// while one of them is in its handshake.
#[inline(always)]
pub fn gate_index(words: &[u64; crate::KEY_WORDS]) -> u32 {
    // The service port's bits of the fifth word (see FlowKey's layout).
    let port = if cfg!(target_endian = "little") {
        words[4] >> 48
    } else {
        words[4] & 0xffff
    };
    // Folded to 32 bits first: an IPv4 address sits in the low half, and
    // a multiplication's high bits would see only part of it.
    let all = words[0] ^ words[1] ^ words[2] ^ words[3];
    let folded = (all ^ (all >> 32) ^ port) as u32;
    folded.wrapping_mul(0x9E37_79B1) >> (32 - GATE_SLOTS.trailing_zeros())
}

/// Slots of [`crate::names::HANDSHAKES_LOST`]: handshakes not followed.
pub mod lost {
    /// A SYN, or a RST of a connection that was up, found the table full.
    pub const NO_ROOM: u32 = 0;
    /// A SYN-ACK whose SYN was not seen (ntm started in between, or the
    /// SYN took another path).
    pub const SYNACK_UNMATCHED: u32 = 1;
    /// A SYN found its connection's entry still holding an ended handshake
    /// the agent had not taken yet (the same ports again within a drain).
    pub const BUSY: u32 = 2;
    pub const SLOTS: u32 = 3;
}

/// What the parse hands the handshake room for an ICMP or ICMPv6
/// destination unreachable, in place of TCP flags: FIN alone, which no
/// frame the room follows carries (it takes SYN, RST and bare ACKs).
pub const ICMP_UNREACHABLE: u8 = tcp_flags::FIN;

/// TCP header flags (byte 13).
pub mod tcp_flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const ACK: u8 = 0x10;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::KeyBuilder;

    #[test]
    fn both_directions_and_hooks_share_a_gate_slot() {
        let forward = KeyBuilder::v4(0x0A00_0001, 0x0A00_0002).port(443).build();
        let mut back = KeyBuilder::v4(0x0A00_0002, 0x0A00_0001).port(443).build();
        back.hook = 1;
        back.ifindex = 7;
        assert_eq!(gate_index(&forward.words()), gate_index(&back.words()));
        let other = KeyBuilder::v4(0x0A00_0001, 0x0A00_0002).port(80).build();
        assert_ne!(gate_index(&forward.words()), gate_index(&other.words()));
        assert!(gate_index(&forward.words()) < GATE_SLOTS);
    }

    #[test]
    fn gate_slots_spread_over_many_clients() {
        let mut used = [false; GATE_SLOTS as usize];
        for client in 0..10_000u32 {
            let key = KeyBuilder::v4(0x0A00_0000 + client, 0xC612_0001)
                .port(443)
                .build();
            used[gate_index(&key.words()) as usize] = true;
        }
        // 10,000 keys into 32,768 slots: about 8,650 distinct if uniform.
        let distinct = used.iter().filter(|u| **u).count();
        assert!(distinct > 8_300, "{distinct}");
    }
}
