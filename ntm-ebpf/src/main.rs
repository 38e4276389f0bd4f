//! ntm's kernel side: parse every frame on the hook, count it once.
//!
//! Policy (which ports are services, how big the tables are, when to drain)
//! lives in the agent; this program only parses and adds.
//!
//! This file holds the programs, as aya's project template keeps its
//! entry points in `main.rs`: for each row of `ntm_common::programs::HOOKS`
//! the program attached to the hook (`entry`), the counting half its
//! filter tail-calls (`count`) and the hand-over the counting half
//! tail-calls for a frame the agent wants for names (`observe`), by the
//! names the agent loads them by. The work is in the modules:
//! - `maps`: every map and load-time setting, by the names the agent uses;
//! - `parse`: a frame to a flow key;
//! - `steady`: the steady state, a frame of a connection already in its
//!   cache slot, counted without deciding anything of it again;
//! - `count`: the flow key through the per-CPU cache into the flow table,
//!   or into the outside counts;
//! - `observe`: the hand-over programs, which look into the frames the
//!   parse marked for names (DNS, DHCP, a ClientHello, a QUIC Initial) once
//!   they are counted and copy them to the ring buffer; and source MACs;
//! - `hello`: the ClientHellos whose later segments are handed over too;
//! - `handshakes`: TCP handshakes (SYN, SYN-ACK, the client's ACK, RST)
//!   into the table the agent reads for latency and failed connections;
//! - `lease`: the orphan lease, which stops counting once no agent renews it;
//! - `retransmits`: TCP retransmissions of this host's connections, from
//!   the `tcp_retransmit_skb` raw tracepoint (`ntm_tcp_retransmit` below).
#![no_std]
#![no_main]
// The BPF atomic add (see `handshakes::gate_add`).
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod count;
mod handshakes;
mod hello;
mod lease;
mod maps;
mod observe;
mod parse;
mod retransmits;
mod steady;

use aya_ebpf::{
    bindings::{TC_ACT_UNSPEC, xdp_action},
    macros::{classifier, raw_tracepoint, xdp},
    programs::{RawTracePointContext, TcContext, XdpContext},
};
use ntm_common::{Hook, tail};

use count::{count_tc, count_xdp, stage};
use lease::orphaned;
use maps::{
    NTM_FILTER_ON, NTM_FILTER_VERDICT, NTM_TC_TAILS, NTM_XDP_ACTION, NTM_XDP_TAILS, setting,
};

// The attached programs: run the hook's filter if there is one (a tail call
// that does not return), else count the frame here.
//
// Each `#[inline(always)]` is on the function the aya macro wraps: without
// it LLVM may leave the body a function of its own (it did for two of
// them once the counting path changed), which every frame then enters by
// a BPF-to-BPF call (measured: about 1.5 ns a frame).

#[classifier]
#[inline(always)]
pub fn ntm_tc_ingress_eth(ctx: TcContext) -> i32 {
    filter_then_count::<true, { stage::ALL }>(&ctx, Hook::Ingress, tail::FILTER_INGRESS_ETH)
}

#[classifier]
#[inline(always)]
pub fn ntm_tc_egress_eth(ctx: TcContext) -> i32 {
    filter_then_count::<true, { stage::ALL }>(&ctx, Hook::Egress, tail::FILTER_EGRESS_ETH)
}

#[classifier]
#[inline(always)]
pub fn ntm_tc_ingress_l3(ctx: TcContext) -> i32 {
    filter_then_count::<false, { stage::ALL }>(&ctx, Hook::Ingress, tail::FILTER_INGRESS_L3)
}

#[classifier]
#[inline(always)]
pub fn ntm_tc_egress_l3(ctx: TcContext) -> i32 {
    filter_then_count::<false, { stage::ALL }>(&ctx, Hook::Egress, tail::FILTER_EGRESS_L3)
}

// The counting halves, entered from a filter program with its verdict.

#[classifier]
#[inline(always)]
pub fn ntm_count_in_eth(ctx: TcContext) -> i32 {
    count_tc::<true, { stage::ALL }>(&ctx, Hook::Ingress, filtered_out());
    TC_ACT_UNSPEC
}

#[classifier]
#[inline(always)]
pub fn ntm_count_out_eth(ctx: TcContext) -> i32 {
    count_tc::<true, { stage::ALL }>(&ctx, Hook::Egress, filtered_out());
    TC_ACT_UNSPEC
}

#[classifier]
#[inline(always)]
pub fn ntm_count_in_l3(ctx: TcContext) -> i32 {
    count_tc::<false, { stage::ALL }>(&ctx, Hook::Ingress, filtered_out());
    TC_ACT_UNSPEC
}

#[classifier]
#[inline(always)]
pub fn ntm_count_out_l3(ctx: TcContext) -> i32 {
    count_tc::<false, { stage::ALL }>(&ctx, Hook::Egress, filtered_out());
    TC_ACT_UNSPEC
}

// The hand-over programs, entered from the counting half (or an entry
// program without a filter) once it has counted a frame the parse marked
// for names.

#[classifier]
#[inline(always)]
pub fn ntm_observe_in_eth(ctx: TcContext) -> i32 {
    observe::hand_over_tc::<true>(&ctx, Hook::Ingress);
    TC_ACT_UNSPEC
}

#[classifier]
#[inline(always)]
pub fn ntm_observe_out_eth(ctx: TcContext) -> i32 {
    observe::hand_over_tc::<true>(&ctx, Hook::Egress);
    TC_ACT_UNSPEC
}

#[classifier]
#[inline(always)]
pub fn ntm_observe_in_l3(ctx: TcContext) -> i32 {
    observe::hand_over_tc::<false>(&ctx, Hook::Ingress);
    TC_ACT_UNSPEC
}

#[classifier]
#[inline(always)]
pub fn ntm_observe_out_l3(ctx: TcContext) -> i32 {
    observe::hand_over_tc::<false>(&ctx, Hook::Egress);
    TC_ACT_UNSPEC
}

// The bench's programs: TC Ethernet ingress on the full path, without the
// steady state, stopped after each part (see `count::stage`), for `cargo
// xtask bench` to tell what each part costs.
// In the object next to the real ones, sharing their maps; the agent never
// loads them.

#[classifier]
#[inline(always)]
pub fn ntm_bench_upto_entry(ctx: TcContext) -> i32 {
    filter_then_count::<true, { stage::ENTRY }>(&ctx, Hook::Ingress, tail::FILTER_INGRESS_ETH)
}

#[classifier]
#[inline(always)]
pub fn ntm_bench_upto_parse(ctx: TcContext) -> i32 {
    filter_then_count::<true, { stage::PARSE }>(&ctx, Hook::Ingress, tail::FILTER_INGRESS_ETH)
}

#[classifier]
#[inline(always)]
pub fn ntm_bench_upto_fragments(ctx: TcContext) -> i32 {
    filter_then_count::<true, { stage::FRAGMENTS }>(&ctx, Hook::Ingress, tail::FILTER_INGRESS_ETH)
}

#[classifier]
#[inline(always)]
pub fn ntm_bench_upto_count(ctx: TcContext) -> i32 {
    filter_then_count::<true, { stage::COUNT }>(&ctx, Hook::Ingress, tail::FILTER_INGRESS_ETH)
}

#[classifier]
#[inline(always)]
pub fn ntm_bench_full_path(ctx: TcContext) -> i32 {
    filter_then_count::<true, { stage::FULL }>(&ctx, Hook::Ingress, tail::FILTER_INGRESS_ETH)
}

// The tests' programs: the steady state alone (`steady.rs`), returning 1
// if it counted the frame and 0 if it left it to the full path (counting
// nothing), so that the integration tests can tell which frames it takes.
// The agent never loads them.

#[classifier]
#[inline(always)]
pub fn ntm_test_steady_eth(ctx: TcContext) -> i32 {
    steady::count_tc::<true>(&ctx, Hook::Ingress) as i32
}

#[classifier]
#[inline(always)]
pub fn ntm_test_steady_l3(ctx: TcContext) -> i32 {
    steady::count_tc::<false>(&ctx, Hook::Ingress) as i32
}

#[inline(always)]
fn filter_then_count<const ETHERNET: bool, const UPTO: u8>(
    ctx: &TcContext,
    hook: Hook,
    filter_slot: u32,
) -> i32 {
    if orphaned() {
        return TC_ACT_UNSPEC;
    }
    if filter_on() {
        // SAFETY: a tail call either does not return or, with the slot
        // empty, returns with nothing changed.
        unsafe { NTM_TC_TAILS.tail_call(ctx, filter_slot) };
    }
    if UPTO != stage::ENTRY {
        count_tc::<ETHERNET, UPTO>(ctx, hook, false);
    }
    TC_ACT_UNSPEC
}

/// Whether a filter is in the filter slots (see `maps::NTM_FILTER_ON`).
#[inline(always)]
fn filter_on() -> bool {
    // SAFETY: an aligned load of a word the agent writes with one store.
    unsafe { core::ptr::read_volatile(&raw const NTM_FILTER_ON) != 0 }
}

/// Whether the filter program that tail-called us rejected the frame.
#[inline(always)]
fn filtered_out() -> bool {
    match NTM_FILTER_VERDICT.get(0) {
        Some(verdict) => *verdict == tail::VERDICT_FILTERED,
        None => false,
    }
}

/// XDP: what a mirror or SPAN port receives, counted before the stack sees
/// it; the agent chooses whether the copy then goes on (pass) or not (drop).
#[xdp]
#[inline(always)]
pub fn ntm_xdp(ctx: XdpContext) -> u32 {
    if orphaned() {
        return xdp_action::XDP_PASS;
    }
    if filter_on() {
        // SAFETY: a tail call either does not return or, with the slot
        // empty, returns with nothing changed.
        unsafe { NTM_XDP_TAILS.tail_call(&ctx, tail::FILTER_XDP) };
    }
    count_xdp(&ctx, false);
    setting(&NTM_XDP_ACTION)
}

/// XDP's counting half, entered from a filter program.
#[xdp]
#[inline(always)]
pub fn ntm_count_xdp(ctx: XdpContext) -> u32 {
    count_xdp(&ctx, filtered_out());
    setting(&NTM_XDP_ACTION)
}

/// XDP's hand-over.
#[xdp]
#[inline(always)]
pub fn ntm_observe_xdp(ctx: XdpContext) -> u32 {
    observe::hand_over_xdp(&ctx);
    setting(&NTM_XDP_ACTION)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier rejects any path that could reach here (it has
    // no way to panic), so this never runs.
    unsafe { core::hint::unreachable_unchecked() }
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

/// TCP segments retransmitted by this host's sockets (see `retransmits`).
#[raw_tracepoint(tracepoint = "tcp_retransmit_skb")]
#[inline(always)]
pub fn ntm_tcp_retransmit(ctx: RawTracePointContext) -> i32 {
    retransmits::count(&ctx);
    0
}
