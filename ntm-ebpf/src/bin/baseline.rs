//! Programs that are not ntm, for measuring and testing it:
//! - `ntm_bench_empty` does nothing: the baseline `cargo xtask bench`
//!   measures ntm's per-packet cost against, on the same frames, in one run;
//! - `ntm_bench_empty_xdp` passes everything, the XDP baseline;
//! - `neighbour_drop_5801` plays another tool's TC program on the same
//!   interface (a CNI's, say): it drops UDP to port 5801 (IPv4, no options).
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC, xdp_action},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};

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
