//! TCP segments this host's kernel retransmits, by connection: the program
//! on the `tcp_retransmit_skb` raw tracepoint, which fires in the sending
//! socket's context (this host and its containers and pods: one kernel).
//! Forwarded traffic has no socket here and never fires it.
//!
//! A raw tracepoint, not the classic one: the kernel skips a classic
//! tracepoint's (or a kprobe's) program whenever any such program, or a map
//! syscall (`bpf_disable_instrumentation`), is already running on the CPU;
//! a retransmit timer or ACK that interrupts the agent's own drain would go
//! uncounted. A raw tracepoint's program is only skipped if it interrupts
//! itself, which its one short path never does.
//!
//! The raw tracepoint passes the socket and the buffer; the connection is
//! read from `struct sock` at the offsets the agent took from the running
//! kernel's BTF (`ntm_common::RetransmitLayout`): no CO-RE is needed.

use aya_ebpf::{helpers::bpf_probe_read_kernel, programs::RawTracePointContext};
use ntm_common::{RetransmitKey, family, retransmit_lost};

use crate::maps::{NTM_ACTIVE_RETRANSMITS, NTM_RETRANSMIT_LAYOUT, NTM_RETRANSMITS_LOST, setting};

// bpf_map_update_elem's flag and the errno it returns for a key that is
// there already.
const BPF_NOEXIST: u64 = 1;
const EEXIST: i32 = 17;

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

/// The tracepoint's arguments: `(const struct sock *sk, const struct
/// sk_buff *skb)`, and `int err` from Linux 6.17.
const ARG_SOCK: usize = 0;
const ARG_SKB: usize = 1;
const ARG_ERR: usize = 2;

#[inline(always)]
pub fn count(ctx: &RawTracePointContext) {
    let at = &NTM_RETRANSMIT_LAYOUT;
    let skb: u64 = ctx.arg(ARG_SKB);
    // The verifier drops this read where `has_err` is 0: a kernel without
    // the argument refuses a program that reads it.
    if setting(&at.has_err) != 0 && ctx.arg::<u64>(ARG_ERR) as i32 != 0 {
        lost(retransmit_lost::FAILED, segments(skb));
        return;
    }
    let sock: u64 = ctx.arg(ARG_SOCK);
    let mut key = RetransmitKey::default();
    match read::<u16>(sock, setting(&at.family)) {
        Some(AF_INET) => {
            let (Some(local), Some(remote)) = (
                read::<[u8; 4]>(sock, setting(&at.local_v4)),
                read::<[u8; 4]>(sock, setting(&at.remote_v4)),
            ) else {
                return;
            };
            key.family = family::IPV4;
            key.local[..4].copy_from_slice(&local);
            key.remote[..4].copy_from_slice(&remote);
        }
        Some(AF_INET6) => {
            let (Some(local), Some(remote)) = (
                read::<[u8; 16]>(sock, setting(&at.local_v6)),
                read::<[u8; 16]>(sock, setting(&at.remote_v6)),
            ) else {
                return;
            };
            key.family = family::IPV6;
            key.local = local;
            key.remote = remote;
        }
        _ => return,
    }
    let (Some(local_port), Some(remote_port)) = (
        read::<u16>(sock, setting(&at.local_port)),
        read::<u16>(sock, setting(&at.remote_port)),
    ) else {
        return;
    };
    key.local_port = local_port;
    key.remote_port = u16::from_be(remote_port);
    add(&key, segments(skb));
}

/// The segments the retransmitted buffer carried (a buffer of a
/// segmentation-offload connection may hold several, which the kernel's
/// TcpRetransSegs counts each): its `TCP_SKB_CB(skb)->tcp_gso_segs`, where
/// the agent found it in the kernel's BTF; else one.
#[inline(always)]
fn segments(skb: u64) -> u64 {
    match setting(&NTM_RETRANSMIT_LAYOUT.segments) {
        0 => 1,
        at => match read::<u16>(skb, at) {
            Some(n) if n > 0 => n as u64,
            _ => 1,
        },
    }
}

/// The `T` at byte `offset` of the kernel object at `base`.
#[inline(always)]
fn read<T>(base: u64, offset: u32) -> Option<T> {
    // SAFETY: bpf_probe_read_kernel copies from kernel memory and returns
    // an error rather than fault; `base` is the socket or buffer the
    // tracepoint passed, and `offset` that of a field of type T the agent
    // took from this kernel's BTF.
    unsafe { bpf_probe_read_kernel((base + offset as u64) as *const T) }.ok()
}

/// `segments` retransmitted by `key`'s connection into the active table,
/// or into the lost counts when it has no room.
#[inline(always)]
fn add(key: &RetransmitKey, segments: u64) {
    let Some(table) = NTM_ACTIVE_RETRANSMITS.get(0) else {
        return;
    };
    if let Some(count) = table.get_ptr_mut(key) {
        // SAFETY: this CPU's value of a per-CPU map, from a successful
        // lookup; the program does not nest on a CPU (a raw tracepoint's
        // program is skipped where it would interrupt itself).
        unsafe { *count += segments };
        return;
    }
    match table.insert(key, segments, BPF_NOEXIST) {
        Ok(()) => {}
        Err(e) if e == -EEXIST => match table.get_ptr_mut(key) {
            // SAFETY: as above.
            Some(count) => unsafe { *count += segments },
            None => lost(retransmit_lost::NO_ROOM, segments),
        },
        Err(_) => lost(retransmit_lost::NO_ROOM, segments),
    }
}

/// `n` segments not counted by connection, in `slot`.
#[inline(always)]
fn lost(slot: u32, n: u64) {
    if let Some(count) = NTM_RETRANSMITS_LOST.get_ptr_mut(slot) {
        // SAFETY: this CPU's slot of a per-CPU array, from a successful
        // lookup.
        unsafe { *count += n };
    }
}
