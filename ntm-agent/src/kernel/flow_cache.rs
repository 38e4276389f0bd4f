//! Whether the kernel's per-CPU flow cache pays for itself, judged after
//! each drain.
//!
//! A frame whose flow holds its cache slot costs one slot access; any other
//! frame costs that access and a flow-table operation (the slot's flow
//! moves to the table). Without the cache every frame costs one table
//! operation. So the cache pays while a fair share of frames hit it, and
//! costs more than it saves when nearly every frame is a flow's first in
//! its slot: a flood of new flows, a scan, or more flows at once than a
//! CPU's slots, taken in turn (`cargo xtask bench`'s 64k-flow case). The
//! slot access is then a miss in the CPU's caches that buys nothing.
//!
//! The kernel counts the frames that missed their slot
//! (`names::CACHE_MISSES`); the drain compares them with the packets it
//! read. While hits stay under [`MIN_HIT_SHARE`] of a busy interval's
//! packets, the agent leaves the cache slot empty and the programs count
//! into the table directly. It tries the cache again after a number of
//! intervals that doubles with each try that failed (from
//! [`FIRST_PAUSE`] up to [`LONGEST_PAUSE`]), and at once when an interval
//! had so few flows that the cache would hold them all (not when the table
//! was full: it then holds fewer flows than there were). Counts are exact
//! either way: the drain reads the cache and the table whichever was used.
//!
//! A full table is judged like any other. With the cache on, a slot's
//! flow then stays in its slot rather than move to a table with no room
//! (ntm-ebpf's `count.rs`), so the flows the slots hold keep their
//! addresses; but a flood of new flows that fills the table misses the
//! slots as it would with room, and each of its frames would pay the slot
//! for nothing (with a million flows at random, 0.97x the minimal
//! counter's time with the cache judged, 1.18x with it kept on: `cargo
//! xtask bench`). The flows that carry the traffic do not need the slots
//! to keep their addresses: a table found full is emptied at the next
//! drain but one (`drain.rs`), and a flow that sends often is among the
//! first to take an entry again.

use ntm_common::FLOW_CACHE_SLOTS;

/// The share of packets that must hit the cache for it to stay on: a hit
/// saves a table operation (a few cache-line misses at many flows), a miss
/// adds a slot access (about one), so below a quarter the cache costs more
/// than it saves.
pub const MIN_HIT_SHARE: f64 = 0.25;

/// Below this many packets in an interval the cache's cost does not matter
/// and it stays as it is: a quiet interval says nothing about the next.
pub const BUSY_PACKETS: u64 = 10_000;

/// Intervals the cache stays off after the first interval that found it
/// not paying.
pub const FIRST_PAUSE: u32 = 4;

/// The longest pause between two tries.
pub const LONGEST_PAUSE: u32 = 64;

/// What the cache did in one drained interval.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheUse {
    /// Whether the programs counted through the cache in that interval.
    pub on: bool,
    /// Frames that missed their slot (0 with the cache off).
    pub misses: u64,
}

/// The judgement, from interval to interval.
#[derive(Clone, Debug)]
pub struct CacheJudge {
    on: bool,
    /// Intervals left before the next try, while off.
    pause_left: u32,
    /// How long the next pause lasts.
    next_pause: u32,
}

impl Default for CacheJudge {
    fn default() -> Self {
        Self {
            on: true,
            pause_left: 0,
            next_pause: FIRST_PAUSE,
        }
    }
}

impl CacheJudge {
    /// Whether the cache is to be used in the next interval, after one in
    /// which the cache did `used` while the programs counted `packets`
    /// packets of `flows` flows, and, if `table_full`, frames of more flows
    /// outside the table, which had no room for them.
    pub fn next(&mut self, used: CacheUse, packets: u64, flows: usize, table_full: bool) -> bool {
        // A full table holds fewer flows than there were: it says nothing
        // of whether the cache would hold them all.
        if !self.on && !table_full && flows as u64 <= u64::from(FLOW_CACHE_SLOTS) / 4 {
            // The cache would hold every flow.
            self.on = true;
            self.next_pause = FIRST_PAUSE;
            return true;
        }
        if packets < BUSY_PACKETS {
            return self.on;
        }
        if self.on && used.on {
            let hits = packets.saturating_sub(used.misses);
            if (hits as f64) < MIN_HIT_SHARE * packets as f64 {
                self.on = false;
                self.pause_left = self.next_pause;
                self.next_pause = (self.next_pause * 2).min(LONGEST_PAUSE);
            } else {
                self.next_pause = FIRST_PAUSE;
            }
        } else if !self.on {
            self.pause_left = self.pause_left.saturating_sub(1);
            self.on = self.pause_left == 0;
        }
        self.on
    }

    /// Whether the cache is on now.
    pub fn on(&self) -> bool {
        self.on
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BUSY: u64 = 100_000;
    const MANY: usize = 64_000;

    fn missing(share: f64) -> CacheUse {
        CacheUse {
            on: true,
            misses: (share * BUSY as f64) as u64,
        }
    }

    const OFF: CacheUse = CacheUse {
        on: false,
        misses: 0,
    };

    #[test]
    fn a_cache_that_most_frames_hit_stays_on() {
        let mut judge = CacheJudge::default();
        for _ in 0..100 {
            assert!(judge.next(missing(0.5), BUSY, MANY, false));
        }
    }

    #[test]
    fn a_cache_nearly_every_frame_misses_goes_off_and_is_tried_again_ever_later() {
        let mut judge = CacheJudge::default();
        assert!(!judge.next(missing(1.0), BUSY, MANY, false));
        // Off for FIRST_PAUSE intervals, then one try.
        let mut pauses = Vec::new();
        for _ in 0..6 {
            let mut off = 0;
            while !judge.next(OFF, BUSY, MANY, false) {
                off += 1;
            }
            pauses.push(off + 1);
            // The try finds the cache still not paying.
            assert!(!judge.next(missing(0.9), BUSY, MANY, false));
        }
        assert_eq!(pauses, [4, 8, 16, 32, 64, 64]);
    }

    #[test]
    fn a_try_that_pays_keeps_the_cache_and_resets_the_pause() {
        let mut judge = CacheJudge::default();
        assert!(!judge.next(missing(1.0), BUSY, MANY, false));
        while !judge.next(OFF, BUSY, MANY, false) {}
        assert!(judge.next(missing(0.1), BUSY, MANY, false));
        assert!(!judge.next(missing(1.0), BUSY, MANY, false));
        let mut off = 1;
        while !judge.next(OFF, BUSY, MANY, false) {
            off += 1;
        }
        assert_eq!(off, FIRST_PAUSE);
    }

    #[test]
    fn few_flows_bring_the_cache_back_at_once() {
        let mut judge = CacheJudge::default();
        assert!(!judge.next(missing(1.0), BUSY, MANY, false));
        assert!(judge.next(OFF, BUSY, 100, false));
    }

    #[test]
    fn a_full_table_is_judged_like_any_other() {
        let mut judge = CacheJudge::default();
        assert!(!judge.next(missing(1.0), BUSY, MANY, true));
        // The table (8 entries, say) holds few of the flows: the cache
        // stays off.
        assert!(!judge.next(OFF, BUSY, 8, true));
        let mut judge = CacheJudge::default();
        assert!(judge.next(missing(0.5), BUSY, MANY, true));
    }

    #[test]
    fn a_quiet_interval_changes_nothing() {
        let mut judge = CacheJudge::default();
        assert!(judge.next(missing(1.0), BUSY_PACKETS - 1, 5_000, false));
        assert!(!judge.next(missing(1.0), BUSY, MANY, false));
        for _ in 0..2 * LONGEST_PAUSE {
            assert!(!judge.next(OFF, BUSY_PACKETS - 1, 5_000, false));
        }
        assert!(!judge.on());
    }

    #[test]
    fn the_line_is_a_quarter_of_the_packets_hitting() {
        let mut judge = CacheJudge::default();
        assert!(judge.next(missing(0.75), BUSY, MANY, false));
        assert!(!judge.next(missing(0.76), BUSY, MANY, false));
    }
}
