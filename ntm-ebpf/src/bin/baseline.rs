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
//!   It reads the frame with `bpf_skb_load_bytes` (a helper call a load);
//!   it stays as it is so that the many-flows figures compare across
//!   commits;
//! - `ntm_bench_min_counter_ip` is the same least counter for every frame
//!   kind, written as a minimal C counter is (direct packet access, one
//!   bounds check per header): Ethernet, IPv4 (any header length) or IPv6
//!   (no extension headers), TCP or UDP ports, bytes and packets per
//!   (addresses, ports, protocol) in a per-CPU hash as big as ntm's flow
//!   table: one lookup, then two adds or one insert. The datapath bench
//!   measures ntm's steady state against it, frame kind by frame kind.
#![no_std]
#![no_main]

use core::mem::MaybeUninit;

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

/// A flow of any IP family: IPv4 addresses in the first 4 bytes of each
/// address, the rest zero (as ntm's key holds them). No implicit padding;
/// 8-byte aligned, so that it is zeroed with five stores (see
/// [`zeroed_key`]).
#[repr(C, align(8))]
struct MinIpKey {
    src: [u32; 4],
    dst: [u32; 4],
    sport: u16,
    dport: u16,
    proto: u8,
    _pad: [u8; 3],
}

const _: () = assert!(core::mem::size_of::<MinIpKey>() == 40);

/// As many entries as ntm's flow table has by default.
#[btf_map]
static MIN_IP_FLOWS: PerCpuHashMap<MinIpKey, MinCounters, 65536> = PerCpuHashMap::new();

/// The key zeroed as a C counter's `struct key k = {};` is, by clang: a
/// store per word. Written as a zeroed struct, Rust's LLVM made it a call
/// to a `memset` subprogram that stores a byte at a time (40 rounds of a
/// loop, `call -1` in the object), which made this counter some 40%
/// slower than the C counter it stands for.
#[inline(always)]
fn zeroed_key(space: &mut MaybeUninit<MinIpKey>) -> &mut MinIpKey {
    const WORDS: usize = core::mem::size_of::<MinIpKey>() / 8;
    let words = space.as_mut_ptr() as *mut u64;
    // SAFETY: the key is 8-byte aligned and WORDS words long; volatile so
    // that the stores stay stores (not a memset call).
    unsafe {
        words.write_volatile(0);
        words.add(1).write_volatile(0);
        words.add(2).write_volatile(0);
        words.add(3).write_volatile(0);
        words.add(4).write_volatile(0);
    }
    const _: () = assert!(WORDS == 5);
    // SAFETY: every byte was just written, and zero is a valid MinIpKey.
    unsafe { space.assume_init_mut() }
}

#[classifier]
pub fn ntm_bench_min_counter_ip(ctx: TcContext) -> i32 {
    let (data, end) = (ctx.data(), ctx.data_end());
    let mut space = MaybeUninit::uninit();
    let key = zeroed_key(&mut space);
    if data + 14 > end {
        return TC_ACT_UNSPEC;
    }
    // SAFETY: bytes 12 and 13 lie in [data, end), checked just above;
    // every read below is checked likewise first (the verifier sees it).
    let ethertype = unsafe { *((data + 12) as *const [u8; 2]) };
    let ip = data + 14;
    let l4 = match ethertype {
        [0x08, 0x00] => {
            if ip + 20 > end {
                return TC_ACT_UNSPEC;
            }
            let p = ip as *const u32;
            // SAFETY: see above.
            let (vihl, proto, src, dst) = unsafe {
                (
                    *(ip as *const u8),
                    *((ip + 9) as *const u8),
                    *p.add(3),
                    *p.add(4),
                )
            };
            key.proto = proto;
            key.src[0] = src;
            key.dst[0] = dst;
            ip + ((vihl & 0x0f) as usize) * 4
        }
        [0x86, 0xdd] => {
            if ip + 40 > end {
                return TC_ACT_UNSPEC;
            }
            let p = ip as *const u32;
            // SAFETY: see above.
            unsafe {
                key.proto = *((ip + 6) as *const u8);
                for i in 0..4 {
                    key.src[i] = *p.add(2 + i);
                    key.dst[i] = *p.add(6 + i);
                }
            }
            ip + 40
        }
        _ => return TC_ACT_UNSPEC,
    };
    if (key.proto == 6 || key.proto == 17) && l4 + 4 <= end {
        // SAFETY: see above.
        unsafe {
            key.sport = *(l4 as *const u16);
            key.dport = *((l4 + 2) as *const u16);
        }
    }
    let bytes = ctx.len() as u64;
    if let Some(counters) = MIN_IP_FLOWS.get_ptr_mut(&*key) {
        // SAFETY: this CPU's value of a per-CPU map, from a successful
        // lookup; TC runs with bottom halves off.
        unsafe {
            (*counters).bytes += bytes;
            (*counters).packets += 1;
        }
    } else {
        // A full table refuses the key: the frame is not counted.
        let _ = MIN_IP_FLOWS.insert(&*key, MinCounters { bytes, packets: 1 }, 1);
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
