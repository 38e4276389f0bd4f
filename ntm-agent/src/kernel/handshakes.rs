//! TCP handshakes the kernel followed on the hooks (`handshakes.rs` in
//! ntm-ebpf): each drain the agent reads the table, takes the handshakes
//! that ended (a connection up, refused, reset) and the SYNs left
//! unanswered, and deletes them, so each is counted once. The kernel only
//! writes entries; deleting them is the agent's, as is the policy of when
//! a SYN counts as unanswered.
//!
//! A handshake answered by a SYN-ACK holds a slot of the kernel's gate
//! open (see `ntm_common::handshake::gate_index`) until its client's ACK;
//! one whose ACK never comes the agent gives up on, and closes its slot
//! through the gate's shared memory.

use super::load::share_map;
use std::{collections::HashMap as StdHashMap, time::Duration};

use aya::{
    Ebpf,
    maps::{HashMap, MapData, MapError, PerCpuArray},
};
use ntm_common::{
    handshake::{GATE_SLOTS, Handshake, HandshakeKey, lost, state},
    names,
};

use crate::sys::bpf::SharedU64Array;

/// A SYN with no SYN-ACK this long after the first is a connection the
/// server left unanswered. Linux retries a SYN after 1, 3 and 7 s; clients
/// commonly give up connecting after 10 s or more.
pub const UNANSWERED_AFTER: Duration = Duration::from_secs(10);

/// A SYN-ACK whose client's ACK was not seen this long after it: the
/// handshake is dropped unmeasured (the ACK took another path, or came
/// after the gate closed).
const ACK_TIMEOUT: Duration = Duration::from_secs(10);

/// How a handshake ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The connection is up. Each half of the handshake's time, where it
    /// was measured: the server's (SYN to SYN-ACK) unless the SYN was
    /// retried, the client's (SYN-ACK to its ACK) unless the SYN-ACK was.
    Established {
        server: Option<Duration>,
        client: Option<Duration>,
    },
    /// Failed: a RST answered the SYN.
    Refused,
    /// Failed: no SYN-ACK within [`UNANSWERED_AFTER`].
    Unanswered,
    /// Failed: a RST during the handshake, or on a connection that was up.
    Reset,
    /// Failed: an ICMP or ICMPv6 destination unreachable answered the SYN.
    Unreachable,
}

impl Outcome {
    /// The `reason` label of a failure.
    pub fn failure(self) -> Option<&'static str> {
        match self {
            Self::Established { .. } => None,
            Self::Refused => Some("refused"),
            Self::Unanswered => Some("unanswered"),
            Self::Reset => Some("reset"),
            Self::Unreachable => Some("unreachable"),
        }
    }
}

/// What one drain found.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HandshakeCounts {
    pub ended: Vec<(HandshakeKey, Outcome)>,
    /// SYNs sent again, by handshake: counted when the agent lets go of
    /// the handshake (it ended, or its client stopped retrying).
    pub syn_retries: Vec<(HandshakeKey, u64)>,
    /// Handshakes (and resets) the full table had no room for.
    pub no_room: u64,
    /// SYN-ACKs whose SYN was not seen.
    pub synack_unmatched: u64,
    /// SYNs that found their ports' entry still holding an ended handshake.
    pub busy: u64,
    /// Handshakes dropped unmeasured: answered, the client's ACK not seen.
    pub ack_unseen: u64,
}

impl HandshakeCounts {
    /// The SYNs `entry`'s client sent again, if any.
    fn retried(&mut self, key: &HandshakeKey, entry: &Handshake) {
        if entry.syns > 1 {
            self.syn_retries.push((*key, entry.syns as u64 - 1));
        }
    }
}

/// The kernel's handshake table and what the agent keeps of it.
pub struct Handshakes {
    table: HashMap<MapData, HandshakeKey, Handshake>,
    /// The gate, mapped: its slots count the handshakes waiting for their
    /// client's ACK.
    gate: SharedU64Array,
    /// Keeps the gate's map (and so its memory) while it is mapped.
    _gate_map: MapData,
    lost: PerCpuArray<MapData, u64>,
    lost_seen: [u64; lost::SLOTS as usize],
    /// SYNs counted unanswered and still in the table (the client may
    /// retry into the same entry): by handshake, its first SYN's time.
    reported: StdHashMap<HandshakeKey, u64>,
}

impl Handshakes {
    /// Opens the maps of a loaded object whose programs follow handshakes.
    pub fn share_from(ebpf: &Ebpf) -> Result<Self, HandshakeSetupError> {
        let missing = |name: &str| MapError::InvalidName {
            name: name.to_string(),
        };
        let table = share_map(ebpf, names::HANDSHAKES)?.try_into()?;
        let gate_map = match share_map(ebpf, names::HANDSHAKE_GATE)? {
            aya::maps::Map::Array(data) => data,
            _ => return Err(missing(names::HANDSHAKE_GATE).into()),
        };
        let gate = {
            use std::os::fd::AsFd as _;
            SharedU64Array::map(gate_map.fd().as_fd(), GATE_SLOTS as usize)?
        };
        let lost = share_map(ebpf, names::HANDSHAKES_LOST)?.try_into()?;
        Ok(Self {
            table,
            gate,
            _gate_map: gate_map,
            lost,
            lost_seen: [0; lost::SLOTS as usize],
            reported: StdHashMap::new(),
        })
    }

    /// Takes what ended since the last drain, as of `now_ns`
    /// (CLOCK_MONOTONIC, the kernel's clock).
    pub fn drain(&mut self, now_ns: u64) -> Result<HandshakeCounts, MapError> {
        let mut counts = HandshakeCounts::default();
        // Keys first: deleting while walking the hash would restart the walk.
        let entries: Vec<(HandshakeKey, Handshake)> = self
            .table
            .iter()
            .filter_map(|entry| match entry {
                Ok(kv) => Some(Ok(kv)),
                Err(MapError::KeyNotFound) => None,
                Err(e) => Some(Err(e)),
            })
            .collect::<Result<_, _>>()?;
        for (key, entry) in entries {
            match judge(&entry, now_ns) {
                Verdict::Keep => {}
                Verdict::Take(outcome) => {
                    if self.delete(&key)? {
                        counts.retried(&key, &entry);
                        counts.ended.push((key, outcome));
                        // Up, then reset before this drain.
                        if entry.reset != 0 && outcome != Outcome::Reset {
                            counts.ended.push((key, Outcome::Reset));
                        }
                    }
                }
                Verdict::Unanswered { forget } => {
                    if self.reported.get(&key) != Some(&entry.first_syn_ns) {
                        self.reported.insert(key, entry.first_syn_ns);
                        counts.ended.push((key, Outcome::Unanswered));
                    }
                    if forget && self.delete(&key)? {
                        counts.retried(&key, &entry);
                    }
                }
                Verdict::AckUnseen => {
                    if self.delete(&key)? {
                        counts.retried(&key, &entry);
                        counts.ack_unseen += 1;
                        if entry.state == state::AWAIT_ACK {
                            self.close_gate(entry.gate);
                        }
                    }
                }
            }
        }
        let lost = self.lost_now()?;
        let delta = |slot: u32| lost[slot as usize].wrapping_sub(self.lost_seen[slot as usize]);
        counts.no_room = delta(lost::NO_ROOM);
        counts.synack_unmatched = delta(lost::SYNACK_UNMATCHED);
        counts.busy = delta(lost::BUSY);
        self.lost_seen = lost;
        Ok(counts)
    }

    /// One handshake of gate slot `slot` no longer waits (never below 0:
    /// should the kernel have closed it in the same instant, a slot left
    /// open costs its bare ACKs a lookup, nothing more).
    fn close_gate(&self, slot: u32) {
        use std::sync::atomic::Ordering::Relaxed;
        if let Some(waiting) = self.gate.get(slot as usize) {
            let _ = waiting.fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1));
        }
    }

    /// How many handshakes wait for their client's ACK, by the gate.
    pub fn waiting(&self) -> u64 {
        (0..GATE_SLOTS as usize)
            .filter_map(|i| self.gate.get(i))
            .map(|n| n.load(std::sync::atomic::Ordering::Relaxed))
            .sum()
    }

    /// The kernel's memory for the table (preallocated: the same at its
    /// bound as empty), as the kernel accounts it (`memlock` in the map's
    /// fdinfo).
    pub fn table_bytes(&self) -> Option<u64> {
        use aya::maps::IterableMap as _;
        use std::os::fd::{AsFd as _, AsRawFd as _};
        let fd = self.table.map().fd().as_fd().as_raw_fd();
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
        info.lines()
            .find_map(|l| l.strip_prefix("memlock:"))
            .and_then(|v| v.trim().parse().ok())
    }

    /// Deletes an entry; false if the kernel's program or a race removed it
    /// first (it is then not counted here).
    fn delete(&mut self, key: &HandshakeKey) -> Result<bool, MapError> {
        self.reported.remove(key);
        match self.table.remove(key) {
            Ok(()) => Ok(true),
            Err(MapError::KeyNotFound) => Ok(false),
            Err(MapError::SyscallError(e)) if e.io_error.kind() == std::io::ErrorKind::NotFound => {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    fn lost_now(&self) -> Result<[u64; lost::SLOTS as usize], MapError> {
        let mut sums = [0u64; lost::SLOTS as usize];
        for (slot, sum) in sums.iter_mut().enumerate() {
            *sum = self.lost.get(&(slot as u32), 0)?.iter().sum();
        }
        Ok(sums)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HandshakeSetupError {
    #[error(transparent)]
    Map(#[from] MapError),
    #[error("mapping the handshake gate: {0}")]
    Gate(#[from] crate::sys::SyscallError),
}

/// What the drain does with an entry.
#[derive(Debug, PartialEq)]
enum Verdict {
    /// In flight.
    Keep,
    /// Ended: count it and delete it.
    Take(Outcome),
    /// A SYN unanswered past [`UNANSWERED_AFTER`]: counted once; deleted
    /// (`forget`) once its client has stopped retrying.
    Unanswered { forget: bool },
    /// Answered, the client's ACK never seen: deleted.
    AckUnseen,
}

fn judge(entry: &Handshake, now_ns: u64) -> Verdict {
    let since = |t: u64| Duration::from_nanos(now_ns.saturating_sub(t));
    let between = |from: u64, to: u64| Duration::from_nanos(to.saturating_sub(from));
    match entry.state {
        state::SYN_SEEN => {
            if since(entry.first_syn_ns) < UNANSWERED_AFTER {
                return Verdict::Keep;
            }
            // Linux waits (time since the first SYN) + 1 s before its next
            // retry: quiet for longer than that (and 2 s more), the client
            // has given up.
            let retry_within = between(entry.first_syn_ns, entry.syn_ns) + Duration::from_secs(3);
            Verdict::Unanswered {
                forget: since(entry.syn_ns) > retry_within,
            }
        }
        state::AWAIT_ACK => {
            if since(entry.synack_ns) < ACK_TIMEOUT {
                Verdict::Keep
            } else {
                Verdict::AckUnseen
            }
        }
        state::ESTABLISHED => Verdict::Take(Outcome::Established {
            server: (entry.syns == 1).then(|| between(entry.syn_ns, entry.synack_ns)),
            client: (entry.synacks == 1).then(|| between(entry.synack_ns, entry.done_ns)),
        }),
        state::REFUSED => Verdict::Take(Outcome::Refused),
        state::RESET_IN_HANDSHAKE | state::RESET => Verdict::Take(Outcome::Reset),
        state::UNREACHABLE => Verdict::Take(Outcome::Unreachable),
        // Not one the kernel writes: drop it rather than keep it forever.
        _ => Verdict::AckUnseen,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;
    const MS: u64 = 1_000_000;

    fn entry(state: u8) -> Handshake {
        Handshake {
            first_syn_ns: 100 * S,
            syn_ns: 100 * S,
            synack_ns: 100 * S + 50 * MS,
            done_ns: 100 * S + 70 * MS,
            syns: 1,
            synacks: 1,
            state,
            ..Default::default()
        }
    }

    #[test]
    fn an_established_handshake_is_split_at_the_syn_ack() {
        assert_eq!(
            judge(&entry(state::ESTABLISHED), 101 * S),
            Verdict::Take(Outcome::Established {
                server: Some(Duration::from_millis(50)),
                client: Some(Duration::from_millis(20)),
            })
        );
    }

    #[test]
    fn retries_are_counted_not_measured() {
        let mut e = entry(state::ESTABLISHED);
        e.syns = 2;
        e.synacks = 3;
        assert_eq!(
            judge(&e, 101 * S),
            Verdict::Take(Outcome::Established {
                server: None,
                client: None
            })
        );
    }

    #[test]
    fn a_syn_is_unanswered_after_ten_seconds_and_forgotten_once_quiet() {
        let mut e = entry(state::SYN_SEEN);
        assert_eq!(judge(&e, 109 * S), Verdict::Keep);
        // Retries at 101, 103 and 107 s: the next is due at 115 s.
        e.syn_ns = 107 * S;
        assert_eq!(judge(&e, 111 * S), Verdict::Unanswered { forget: false });
        assert_eq!(judge(&e, 118 * S), Verdict::Unanswered { forget: true });
    }

    #[test]
    fn failures_are_taken() {
        assert_eq!(
            judge(&entry(state::REFUSED), 100 * S),
            Verdict::Take(Outcome::Refused)
        );
        assert_eq!(
            judge(&entry(state::RESET), 100 * S),
            Verdict::Take(Outcome::Reset)
        );
        assert_eq!(
            judge(&entry(state::RESET_IN_HANDSHAKE), 100 * S),
            Verdict::Take(Outcome::Reset)
        );
        assert_eq!(
            judge(&entry(state::UNREACHABLE), 100 * S),
            Verdict::Take(Outcome::Unreachable)
        );
        assert_eq!(judge(&entry(state::AWAIT_ACK), 105 * S), Verdict::Keep);
        assert_eq!(judge(&entry(state::AWAIT_ACK), 111 * S), Verdict::AckUnseen);
    }
}
