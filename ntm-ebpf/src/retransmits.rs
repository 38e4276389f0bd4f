//! TCP segments this host's kernel retransmits, by connection: the program
//! on the `tcp:tcp_retransmit_skb` tracepoint, which fires in the sending
//! socket's context (this host and its containers and pods: one kernel).
//! Forwarded traffic has no socket here and never fires it.
//!
//! The fields are read at the offsets of the tracepoint's format
//! (`ntm_common::retransmit_format`), which the agent checks against the
//! running kernel's before it attaches the program; no CO-RE is needed.

use aya_ebpf::{helpers::bpf_probe_read_kernel, programs::TracePointContext};
use ntm_common::{RetransmitKey, family, retransmit_format as at, retransmit_lost};

use crate::maps::{
    NTM_ACTIVE_RETRANSMITS, NTM_RETRANSMIT_ERR_AT, NTM_RETRANSMIT_SEGS_AT, NTM_RETRANSMITS_LOST,
    setting,
};

// bpf_map_update_elem's flag and the errno it returns for a key that is
// there already.
const BPF_NOEXIST: u64 = 1;
const EEXIST: i32 = 17;

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

#[inline(always)]
pub fn count(ctx: &TracePointContext) {
    let err_at = setting(&NTM_RETRANSMIT_ERR_AT);
    if err_at != 0 && field::<i32>(ctx, err_at as usize).unwrap_or(0) != 0 {
        lost(retransmit_lost::FAILED, segments(ctx));
        return;
    }
    let mut key = RetransmitKey::default();
    match field::<u16>(ctx, at::FAMILY) {
        Some(AF_INET) => {
            let (Some(local), Some(remote)) = (
                field::<[u8; 4]>(ctx, at::SADDR),
                field::<[u8; 4]>(ctx, at::DADDR),
            ) else {
                return;
            };
            key.family = family::IPV4;
            key.local[..4].copy_from_slice(&local);
            key.remote[..4].copy_from_slice(&remote);
        }
        Some(AF_INET6) => {
            let (Some(local), Some(remote)) = (
                field::<[u8; 16]>(ctx, at::SADDR_V6),
                field::<[u8; 16]>(ctx, at::DADDR_V6),
            ) else {
                return;
            };
            key.family = family::IPV6;
            key.local = local;
            key.remote = remote;
        }
        _ => return,
    }
    let (Some(local_port), Some(remote_port)) =
        (field::<u16>(ctx, at::SPORT), field::<u16>(ctx, at::DPORT))
    else {
        return;
    };
    key.local_port = local_port;
    key.remote_port = remote_port;
    add(&key, segments(ctx));
}

/// The segments the retransmitted buffer carried (a buffer of a
/// segmentation-offload connection may hold several, which the kernel's
/// TcpRetransSegs counts each): its `TCP_SKB_CB(skb)->tcp_gso_segs`, where
/// the agent found it in the kernel's BTF; else one.
#[inline(always)]
fn segments(ctx: &TracePointContext) -> u64 {
    let segs_at = setting(&NTM_RETRANSMIT_SEGS_AT);
    if segs_at == 0 {
        return 1;
    }
    let Some(skb) = field::<u64>(ctx, at::SKBADDR) else {
        return 1;
    };
    // SAFETY: bpf_probe_read_kernel copies from kernel memory and returns
    // an error rather than fault; `skb` is the buffer the tracepoint
    // describes, and the offset the agent took from this kernel's BTF.
    let segs = unsafe { bpf_probe_read_kernel((skb + segs_at as u64) as *const u16) };
    match segs {
        Ok(n) if n > 0 => n as u64,
        _ => 1,
    }
}

/// The field at `offset` of the tracepoint's record.
#[inline(always)]
fn field<T>(ctx: &TracePointContext, offset: usize) -> Option<T> {
    // SAFETY: `offset` is one of the tracepoint's format, which the agent
    // checked against the running kernel's (the `err` offset it took from
    // it), for a field of type T; bpf_probe_read returns an error rather
    // than fault on a bad read.
    unsafe { ctx.read_at::<T>(offset) }.ok()
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
        // lookup; tracepoint programs do not nest on a CPU.
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
