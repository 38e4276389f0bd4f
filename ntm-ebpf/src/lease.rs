//! The orphan lease: the agent renews `NTM_LEASE` while it runs; once the
//! lease has run out with no agent to renew it, the programs stop counting
//! for good and let every frame through. Its own module so that the stop
//! global is written here only.

use aya_ebpf::helpers::generated::bpf_ktime_get_ns;

use crate::{hello, maps::NTM_LEASE};

/// Set once the lease ran out with no agent to renew it (the orphan
/// timeout): from then on the programs let every frame through uncounted,
/// at the cost of this one load. Read per frame, so a global (a direct
/// load), written only by [`check_lease`].
#[unsafe(no_mangle)]
static mut NTM_ORPHANED: u32 = 0;

/// How often the lease is looked at: whenever a counter crosses a multiple
/// of 2^LEASE_CHECK_SHIFT packets (a cache slot, a table entry, an outside
/// slot), so that the clock is read about once per 4096 frames of a flow.
const LEASE_CHECK_SHIFT: u32 = 12;

#[inline(always)]
pub fn orphaned() -> bool {
    // SAFETY: a plain aligned load of a global only check_lease writes
    // (a racing write is a u32 store: the load sees 0 or 1).
    unsafe { core::ptr::read_volatile(&raw const NTM_ORPHANED) != 0 }
}

/// Whether adding `added` packets to `before` crosses a lease check point.
#[inline(always)]
pub fn lease_check_due(before: u64, added: u64) -> bool {
    (before + added) >> LEASE_CHECK_SHIFT != before >> LEASE_CHECK_SHIFT
}

/// Whether a counter that one packet took to `packets` just crossed a
/// lease check point ([`lease_check_due`] of one packet, in one test).
#[inline(always)]
pub fn lease_check_due_at(packets: u64) -> bool {
    packets & ((1 << LEASE_CHECK_SHIFT) - 1) == 0
}

/// Stops counting for good if the lease ran out. A call of its own, taken
/// about once per 4096 frames, so the clock read is off the hot path.
///
/// The followed hellos' gate is closed here too once their time is up
/// (`hello::close_gate_if_due`): this is where the programs read the clock.
#[inline(never)]
pub fn check_lease() {
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    hello::close_gate_if_due(now);
    let until = match NTM_LEASE.get(0) {
        Some(until) => *until,
        None => return,
    };
    if until != 0 && now > until {
        // SAFETY: an aligned store to a global; see `orphaned`.
        unsafe { core::ptr::write_volatile(&raw mut NTM_ORPHANED, 1) };
    }
}
