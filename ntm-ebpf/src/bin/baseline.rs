//! Programs that are not ntm, for measuring and testing it:
//! - `ntm_bench_empty` does nothing: the baseline `cargo xtask bench`
//!   measures ntm's per-packet cost against, on the same frames, in one run;
//! - `ntm_bench_empty_xdp` passes everything, the XDP baseline;
//! - `neighbour_drop_5801` plays another tool's TC program on the same
//!   interface (a CNI's, say): it drops UDP to port 5801 (IPv4, no options);
//! - `ntm_bench_min_counter` is the least a per-flow counter can do: parse
//!   Ethernet and IPv4 (no options, no VLAN, no IPv6), count bytes and
//!   packets per (addresses, protocol, destination port) in a per-CPU hash
//!   as big as ntm's flow table. The many-flows bench measures ntm against
//!   it, to tell ntm's own cost from that of random access to a big table.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC, xdp_action},
    btf_maps::PerCpuHashMap,
    macros::{btf_map, classifier, xdp},
    programs::{TcContext, XdpContext},
};

#[repr(C)]
struct MinKey {
    src: u32,
    dst: u32,
    port: u16,
    proto: u8,
    _pad: u8,
}

#[repr(C)]
struct MinCounters {
    bytes: u64,
    packets: u64,
}

/// As many entries as ntm's flow table has by default.
#[btf_map]
static MIN_FLOWS: PerCpuHashMap<MinKey, MinCounters, 65536> = PerCpuHashMap::new();

#[classifier]
pub fn ntm_bench_min_counter(ctx: TcContext) -> i32 {
    // Ethernet (14) + IPv4 without options (20): protocol at 23, addresses
    // at 26 and 30, the destination port at 36.
    let (Ok(ethertype), Ok(proto), Ok(src), Ok(dst)) = (
        ctx.load::<[u8; 2]>(12),
        ctx.load::<u8>(23),
        ctx.load::<u32>(26),
        ctx.load::<u32>(30),
    ) else {
        return TC_ACT_UNSPEC;
    };
    if ethertype != [0x08, 0x00] {
        return TC_ACT_UNSPEC;
    }
    let port = if proto == 6 || proto == 17 {
        ctx.load::<u16>(36).unwrap_or(0)
    } else {
        0
    };
    let key = MinKey {
        src,
        dst,
        port,
        proto,
        _pad: 0,
    };
    let bytes = ctx.len() as u64;
    if let Some(counters) = MIN_FLOWS.get_ptr_mut(&key) {
        // SAFETY: this CPU's value of a per-CPU map, from a successful
        // lookup; TC runs with bottom halves off.
        unsafe {
            (*counters).bytes += bytes;
            (*counters).packets += 1;
        }
    } else {
        // A full table refuses the key: the frame is not counted.
        let _ = MIN_FLOWS.insert(key, MinCounters { bytes, packets: 1 }, 1);
    }
    TC_ACT_UNSPEC
}

#[classifier]
pub fn ntm_bench_empty(_ctx: TcContext) -> i32 {
    TC_ACT_UNSPEC
}

/// An XDP program that passes everything: on a veth, any XDP program changes
/// the receive path, so ntm's XDP cost is measured against this.
#[xdp]
pub fn ntm_bench_empty_xdp(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[classifier]
pub fn neighbour_drop_5801(ctx: TcContext) -> i32 {
    // Ethernet (14) + IPv4 without options (20): protocol at 23, UDP
    // destination port at 36.
    let (Ok(ethertype), Ok(proto), Ok(port)) = (
        ctx.load::<[u8; 2]>(12),
        ctx.load::<u8>(23),
        ctx.load::<[u8; 2]>(36),
    ) else {
        return TC_ACT_UNSPEC;
    };
    if ethertype == [0x08, 0x00] && proto == 17 && u16::from_be_bytes(port) == 5801 {
        TC_ACT_SHOT
    } else {
        TC_ACT_UNSPEC
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: unreachable: these programs have no way to panic, and the
    // verifier rejects any path that could reach here.
    unsafe { core::hint::unreachable_unchecked() }
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
