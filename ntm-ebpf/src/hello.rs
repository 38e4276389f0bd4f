//! ClientHellos that span segments. A hello's first segment is picked out
//! by its first bytes (`parse::handshake_candidate`); the segments that
//! continue it have no mark of their own. When a first segment is handed
//! over and its record says more bytes follow, its connection is followed:
//! its next segments within the hello's bytes are handed over too, at most
//! [`FOLLOW_SEGMENTS`] of them, for at most [`FOLLOW_NS`].
//!
//! A followed hello is kept in one of [`BUCKETS`] slots, chosen by its
//! connection's ports, and the bucket's byte in `NTM_HELLO_BUCKETS` says
//! the bucket is in use. An ordinary TCP segment with data (in the parse,
//! after its first bytes were found to begin no hello) tests a gate word,
//! open while any hello is followed and for at most a second after, and
//! only while it is open its bucket's byte, nearly always 0. A segment whose bucket is in use goes to the
//! hand-over program (`observe.rs`), which compares it with the slot's
//! connection (addresses, ports) and the hello's sequence numbers.
//!
//! Shared by all CPUs, not per CPU: whichever CPU a continuing segment
//! arrives on finds its hello, and a slot whose hello never completes (its
//! last segments lost, a hostile half hello) is let go by the first segment
//! of its bucket that comes after its time, on any CPU, so that a bucket
//! in use costs only the segments that map to it, and only for a while.
//! The slots are written without locks (the BPF target here has no
//! compare-and-swap): two hellos of one bucket at once keep the newer, and
//! a race of two CPUs on one slot can at worst hand over a segment too many
//! or too few for one hello, within the bounds above. Counting never reads
//! these slots.

use aya_ebpf::helpers::generated::bpf_ktime_get_ns;
use ntm_common::{KEY_WORDS, observe::Kind};

use crate::{maps::NTM_HELLO_FOLLOWED, observe::agent_wants};

/// Slots for hellos followed at once (a power of two: the bucket is the
/// low bits of the ports).
pub const BUCKETS: u32 = 1024;

/// Whether a bucket has a hello followed: the byte an ordinary TCP segment
/// with data tests. A global, read with one load (a map's lookup would be
/// several instructions more for every such segment); written only here.
#[unsafe(no_mangle)]
static mut NTM_HELLO_BUCKETS: [u8; BUCKETS as usize] = [0; BUCKETS as usize];

/// Whether any hello may be followed: set by [`follow`], cleared by
/// [`close_gate_if_due`] once the last one's time is up. While it is 0 (on
/// most machines, nearly always), an ordinary TCP segment with data tests
/// this one word and not its bucket.
#[unsafe(no_mangle)]
static mut NTM_HELLO_GATE: u32 = 0;

/// When the hello followed last is given up (bpf_ktime_get_ns).
#[unsafe(no_mangle)]
static mut NTM_HELLO_GATE_UNTIL: u64 = 0;
/// Segments of one hello handed over after its first at most (a 16 KiB
/// hello over a path with a 536-byte MSS).
const FOLLOW_SEGMENTS: u32 = 32;
/// How long a hello is followed at most: its segments leave the client
/// back to back, within its first congestion window; one lost and sent
/// again after a timeout is given up.
const FOLLOW_NS: u64 = 1_000_000_000;
/// A hello's bytes followed at most (what the agent reads at most, with
/// its record headers).
const MAX_HELLO: u32 = 16 * 1024 + 64;

/// A followed hello.
#[repr(C)]
pub struct Followed {
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
    /// Followed until then (bpf_ktime_get_ns).
    until_ns: u64,
    /// Segments still to hand over.
    left: u32,
    _pad: u32,
}

/// What following needs of a TCP segment with data, read from its
/// headers.
pub struct Segment {
    /// Both ports as the TCP header has them.
    pub ports: u32,
    /// Its sequence number.
    pub seq: u32,
    /// Its data bytes.
    pub len: u32,
}

impl Segment {
    /// From the first 8 bytes of its TCP header (ports, sequence number)
    /// and its data's length.
    #[inline(always)]
    pub fn from_header(first: &[u8; 8], len: u32) -> Self {
        Segment {
            ports: u32::from_ne_bytes([first[0], first[1], first[2], first[3]]),
            seq: u32::from_be_bytes([first[4], first[5], first[6], first[7]]),
            len,
        }
    }

    #[inline(always)]
    fn bucket(&self) -> usize {
        let [s0, s1, d0, d1] = self.ports.to_ne_bytes();
        bucket(u16::from_be_bytes([s0, s1]), u16::from_be_bytes([d0, d1]))
    }
}

/// The slot of a connection between these ports (host order): the client's
/// port tells a client's connections apart, and the server's is the same
/// for many. A collision costs only time (see the top of this file).
#[inline(always)]
fn bucket(sport: u16, dport: u16) -> usize {
    ((sport ^ dport) as usize) & (BUCKETS as usize - 1)
}

/// Whether a hello may be followed on a connection between these ports
/// (host order): the test of an ordinary TCP segment with data, a load of
/// the gate and, while it is open, of the settings and its bucket's byte.
/// The gate first: it is closed nearly always, and the settings' loads and
/// compares before it were on every such segment's path (the verifier
/// removes code behind a read-only setting only where no other path
/// reaches it, which here the gate's own exit does). The gate opens only
/// where the agent wants TLS (`follow`), so testing the settings after it
/// changes no answer; they stay so that, with TLS off, the verifier drops
/// the bucket's test.
#[inline(always)]
pub fn is_followed(sport: u16, dport: u16) -> bool {
    // SAFETY: aligned loads of globals other CPUs write with single stores
    // (a word, a byte), so each load sees the old or the new value; the
    // bucket's index is masked to the array's length.
    unsafe {
        core::ptr::read_volatile(&raw const NTM_HELLO_GATE) != 0
            && agent_wants(Kind::Tls as u8)
            && core::ptr::read_volatile(
                (&raw const NTM_HELLO_BUCKETS as *const u8).add(bucket(sport, dport)),
            ) != 0
    }
}

/// Closes the gate once the hello followed last is given up: called with
/// the clock's `now` where the programs read it anyway, about once per
/// 4,096 frames of a flow (`lease::check_lease`). A hello followed while
/// this runs, on another CPU, writes its time before it opens the gate; the
/// time is read again after the gate is closed, so the gate ends open.
#[inline(always)]
pub fn close_gate_if_due(now: u64) {
    if !agent_wants(Kind::Tls as u8) {
        return;
    }
    // SAFETY: as in `is_followed`; aligned single stores.
    unsafe {
        if core::ptr::read_volatile(&raw const NTM_HELLO_GATE) == 0
            || now <= core::ptr::read_volatile(&raw const NTM_HELLO_GATE_UNTIL)
        {
            return;
        }
        core::ptr::write_volatile(&raw mut NTM_HELLO_GATE, 0);
        if now <= core::ptr::read_volatile(&raw const NTM_HELLO_GATE_UNTIL) {
            core::ptr::write_volatile(&raw mut NTM_HELLO_GATE, 1);
        }
    }
}

#[inline(always)]
fn set_bucket(bucket: usize, used: u8) {
    // SAFETY: as in `is_followed`; a single-byte store.
    unsafe {
        core::ptr::write_volatile(
            (&raw mut NTM_HELLO_BUCKETS as *mut u8).add(bucket & (BUCKETS as usize - 1)),
            used,
        )
    };
}

/// After a hello's first segment was handed over: follows its connection
/// if the hello goes on past this segment. `head`: the segment's first 9
/// data bytes, the record header and the handshake header.
#[inline(always)]
pub fn follow(words: &[u64; KEY_WORDS], segment: &Segment, head: &[u8; 9]) {
    let record = u16::from_be_bytes([head[3], head[4]]) as u32;
    let message = u32::from_be_bytes([0, head[6], head[7], head[8]]);
    // A hello in one record, or (rarely) in several, each with a header.
    let len = if message + 4 <= record {
        5 + record
    } else {
        5 + message + 4 + 5 * ((message + 4) / record.max(1))
    };
    let len = if len > MAX_HELLO { MAX_HELLO } else { len };
    if segment.len >= len {
        return;
    }
    let bucket = segment.bucket();
    let Some(slot) = NTM_HELLO_FOLLOWED.get_ptr_mut(bucket as u32) else {
        return;
    };
    // SAFETY: no arguments, no memory touched.
    let until_ns = unsafe { bpf_ktime_get_ns() } + FOLLOW_NS;
    // SAFETY: a value of an array map from a successful lookup; a hello of
    // the same bucket on another CPU may write it at once (see the top of
    // this file), which leaves plain integers in it either way.
    unsafe {
        (*slot).addrs = [words[0], words[1], words[2], words[3]];
        (*slot).ports = segment.ports;
        (*slot).start = segment.seq;
        (*slot).len = len;
        (*slot).remaining = len - segment.len;
        (*slot).until_ns = until_ns;
        (*slot).left = FOLLOW_SEGMENTS;
    }
    set_bucket(bucket, 1);
    // The time first, then the gate (see `close_gate_if_due`).
    // SAFETY: aligned single stores to globals (see `is_followed`).
    unsafe {
        core::ptr::write_volatile(&raw mut NTM_HELLO_GATE_UNTIL, until_ns);
        core::ptr::write_volatile(&raw mut NTM_HELLO_GATE, 1);
    }
}

/// Whether a TCP segment with data whose bucket is in use continues the
/// hello followed there: then it is to be handed over. Lets the slot go
/// once its hello is all handed over, or its time is up.
#[inline(always)]
pub fn continues(words: &[u64; KEY_WORDS], segment: &Segment) -> bool {
    let bucket = segment.bucket();
    let Some(slot) = NTM_HELLO_FOLLOWED.get_ptr_mut(bucket as u32) else {
        return false;
    };
    // SAFETY: as in `follow`.
    unsafe {
        // SAFETY: no arguments, no memory touched.
        if bpf_ktime_get_ns() > (*slot).until_ns {
            set_bucket(bucket, 0);
            return false;
        }
        let ours = (*slot).ports == segment.ports
            && (*slot).addrs[0] == words[0]
            && (*slot).addrs[1] == words[1]
            && (*slot).addrs[2] == words[2]
            && (*slot).addrs[3] == words[3];
        if !ours || segment.seq.wrapping_sub((*slot).start) >= (*slot).len {
            return false;
        }
        let remaining = (*slot).remaining;
        let taken = if segment.len < remaining {
            segment.len
        } else {
            remaining
        };
        (*slot).remaining = remaining - taken;
        let left = (*slot).left.saturating_sub(1);
        (*slot).left = left;
        if remaining == taken || left == 0 {
            set_bucket(bucket, 0);
        }
    }
    true
}
