//! Lossless drain of the kernel's flow tables.
//!
//! The program counts into whichever table the one-slot ARRAY_OF_MAPS points
//! at. To drain, we point the slot at the other (empty) table. Updating a
//! map-in-map slot makes the kernel wait for every program that may still hold
//! the old table (an RCU grace period), so when `set` returns, the old table
//! is idle: we read every entry and zero it, so the table holds no counts
//! for its next turn. Nothing is read while it can still change, so nothing
//! is lost and nothing is counted twice, whatever the interval.
//!
//! A flow that sent in the turn keeps its (zeroed) entry: while it goes on
//! sending, the programs find it by a lookup, where an emptied table would
//! make them insert every flow again each turn (an insert costs a frame
//! several lookups). An entry that stayed zero for a whole turn is deleted.
//! After a turn in which the table was full (frames went outside it), every
//! entry is deleted instead, so that a changing set of flows gets the whole
//! table and ended flows never hold it for long. Zeroing costs the drain
//! less than the inserts it saves cost the kernel (up to 1.6 µs a flow,
//! against 2-3 µs, on a 2-core VM), and off the frames' path; so that a
//! drain stays short, a table is emptied as before while the drain before
//! found more than [`KEEP_AT_MOST`] flows.
//!
//! In front of the tables sits a per-CPU flow cache (see
//! `ntm_common::CacheSlot`) of two halves, double-buffered the same way:
//! the agent names the other half (`names::CACHE_HALF`) before it swaps the
//! tables, so once the swap has returned, neither the old half nor the old
//! table can change, and a flow's counts are in one of them or in both
//! (summed here).
//!
//! Frames counted outside the flow table (filtered, table full, malformed)
//! are keyed by interface, hook, reason and a generation bit. The agent
//! flips the generation before the swaps, so once they return no program
//! can still be counting into the old generation: its entries are read and
//! deleted, and nothing accumulates in the kernel from drain to drain.
//!
//! Once the table's swap has returned, the agent bumps the table epoch
//! (`names::TABLE_EPOCH`): a CPU that finds a table full notes the epoch it
//! read before the table, and skips inserts only while that epoch lasts,
//! so a fresh table is never taken for the full one before it.
//!
//! While the cache does not pay (most frames miss it, see `flow_cache.rs`),
//! the agent names no half (`ntm_common::CACHE_OFF`) and the programs count
//! into the table directly; the idle half is then empty when it is read.
//!
//! Reading uses the batch map commands (Linux 5.6+): thousands of entries per
//! system call, where one lookup and one delete per entry would take seconds
//! for a million flows.

use super::load::share_map;
use std::{
    collections::{BTreeMap, HashMap},
    io,
    mem::size_of,
    os::fd::AsFd as _,
    time::{Duration, Instant},
};

use aya::{
    Ebpf,
    maps::{Array, ArrayOfMaps, Map, MapData, MapError, PerCpuArray, PerCpuHashMap, PerCpuValues},
};
use ntm_common::{
    CACHE_OFF, CacheSlot, Counters, FLOW_CACHE_SLOTS, FlowKey, Hook, OUTSIDE_SLOTS_PER_GENERATION,
    OutsideKey, OutsideReason, OutsideSlot, names, outside_slot_of, outside_unkeyed_index,
};

use super::flow_cache::{CacheJudge, CacheUse};
use crate::sys::{SyscallError, bpf};

/// What one drain found: the counts added since the previous drain.
#[derive(Clone, Debug, Default)]
pub struct Drained {
    pub flows: Vec<(FlowKey, Counters)>,
    /// Entries the drained table held: its flows that sent, and those it
    /// kept from its turn before that did not (deleted now).
    pub table_entries: usize,
    /// Frames counted outside the flow table.
    pub outside: OutsideCounts,
    /// The kernel's statistics of every interface, read right after the
    /// tables were read (`Kernel::drain`; empty if they could not be read).
    pub link_stats: HashMap<u32, super::links::LinkStats>,
    /// How long the swap took (mostly the kernel's wait for running programs).
    pub swap_time: Duration,
    /// How long reading and clearing the idle table took.
    pub read_time: Duration,
    /// What the flow cache did in the drained interval (default, off, for
    /// tables an earlier agent pinned).
    pub flow_cache: CacheUse,
    /// The TCP segments this host retransmitted in the interval, by
    /// connection (set by `Kernel::drain` where they are counted).
    pub retransmits: super::retransmits::RetransmitCounts,
    /// The TCP handshakes that ended in the interval (and SYNs left
    /// unanswered), as the hooks saw them.
    pub handshakes: super::handshakes::HandshakeCounts,
}

impl Drained {
    /// Adds the counts of another drain (a flow in both appears twice;
    /// the export stages sum by key).
    pub fn merge(&mut self, other: Drained) {
        self.flows.extend(other.flows);
        self.table_entries += other.table_entries;
        self.outside.merge(&other.outside);
    }

    /// Frames and bytes in it, flows and outside counts together.
    pub fn total(&self) -> Counters {
        let mut total = Counters::default();
        for (_, counts) in &self.flows {
            total.add(counts);
        }
        for (_, counts) in self.outside.iter() {
            total.add(counts);
        }
        total
    }
}

/// Where and why frames were counted outside the flow table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Outside {
    /// The interface, or [`Outside::UNKNOWN_IFINDEX`] for frames whose key
    /// found no room in the kernel's outside table.
    pub ifindex: u32,
    pub hook: Hook,
    pub reason: OutsideReason,
}

impl Outside {
    /// No interface has index 0.
    pub const UNKNOWN_IFINDEX: u32 = 0;
}

/// Counts outside the flow table, by [`Outside`]; only those with traffic.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OutsideCounts(BTreeMap<Outside, Counters>);

impl OutsideCounts {
    pub fn add(&mut self, at: Outside, counts: &Counters) {
        if counts.packets != 0 || counts.bytes != 0 {
            self.0.entry(at).or_default().add(counts);
        }
    }

    /// Adds everything in `other` (a second drain, say).
    pub fn merge(&mut self, other: &OutsideCounts) {
        for (at, counts) in other.iter() {
            self.add(*at, counts);
        }
    }

    /// All interfaces and hooks of one reason.
    pub fn total(&self, reason: OutsideReason) -> Counters {
        let mut total = Counters::default();
        for (_, counts) in self.0.iter().filter(|(at, _)| at.reason == reason) {
            total.add(counts);
        }
        total
    }

    pub fn iter(&self) -> impl Iterator<Item = (&Outside, &Counters)> {
        self.0.iter()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DrainError {
    #[error(transparent)]
    Map(#[from] MapError),
    #[error("reading the idle flow table failed: {0}")]
    Batch(#[source] SyscallError),
    #[error("cannot tell how many CPUs this machine may have: {0}")]
    Cpus(#[source] io::Error),
}

pub struct FlowTables {
    slot: ArrayOfMaps<MapData, MapData>,
    tables: [MapData; 2],
    caches: FlowCaches,
    /// The half the programs count into (`names::CACHE_HALF`); None for
    /// tables an earlier agent pinned, which no program counts into.
    cache_half: Option<Array<MapData, u32>>,
    /// Index into `tables` of the one the slot points at.
    active: usize,
    outside_slots: MapData,
    outside_slots_buffer: OutsideSlotsBuffer,
    outside: PerCpuHashMap<MapData, OutsideKey, Counters>,
    outside_unkeyed: PerCpuArray<MapData, Counters>,
    outside_generation: Array<MapData, u32>,
    /// The generation the kernel counts outside frames into now.
    generation: u32,
    /// How many swaps have returned (`names::TABLE_EPOCH`), where the
    /// programs tell a full table's epoch from the next; None for tables
    /// an earlier agent pinned, which no program counts into any more.
    table_epoch: Option<(Array<MapData, u32>, u32)>,
    /// Whether the flow cache pays (see `flow_cache.rs`); None for tables
    /// an earlier agent pinned, where the cache is always swapped in.
    cache_switch: Option<CacheSwitch>,
    possible_cpus: usize,
    batch: ReadBatch,
    cache_buffer: CacheBuffer,
    /// Whether a drained table keeps the entries of flows that sent (see
    /// the module's docs): for the tables this agent's programs count
    /// into, not for an earlier agent's, which are read to be dropped.
    keep_flows: bool,
    /// Flows the table drained last held that sent.
    flows_last_turn: usize,
}

impl FlowTables {
    /// Opens the maps of a loaded object (see `load::share_map`) and points
    /// the slot at table 0.
    pub(crate) fn share_from(ebpf: &Ebpf) -> Result<Self, DrainError> {
        let mut tables = Self::from_maps(|name| share_map(ebpf, name))?;
        tables.slot.set(0, &tables.tables[0], 0)?;
        let mut half: Array<MapData, u32> = share_map(ebpf, names::CACHE_HALF)?.try_into()?;
        half.set(0, 0, 0)?;
        tables.cache_half = Some(half);
        tables.outside_generation.set(0, tables.generation, 0)?;
        let mut epoch: Array<MapData, u32> = share_map(ebpf, names::TABLE_EPOCH)?.try_into()?;
        epoch.set(0, 0, 0)?;
        tables.table_epoch = Some((epoch, 0));
        tables.keep_flows = true;
        let misses: PerCpuArray<MapData, u64> = share_map(ebpf, names::CACHE_MISSES)?.try_into()?;
        tables.cache_switch = Some(CacheSwitch {
            misses,
            misses_seen: 0,
            judge: CacheJudge::default(),
            on: true,
            announced_off: false,
        });
        Ok(tables)
    }

    /// The tables an earlier agent pinned in `dir`, to be drained once no
    /// program counts into them any more (each [`FlowTables::drain`] reads
    /// one table and one generation; two read everything). Refused unless
    /// every map has the key and value sizes this build reads.
    pub(crate) fn from_pinned(dir: &std::path::Path) -> Result<Self, DrainError> {
        Self::from_maps(|name| {
            let data = MapData::from_pin(dir.join(name))?;
            let info = data.info()?;
            if let Some((key, value)) = expected_sizes(name)
                && (info.key_size() as usize, info.value_size() as usize) != (key, value)
            {
                return Err(MapError::InvalidName {
                    name: format!(
                        "{name} with {}-byte keys and {}-byte values (this build reads {key} and {value})",
                        info.key_size(),
                        info.value_size()
                    ),
                });
            }
            Map::from_map_data(data)
        })
    }

    fn from_maps(
        mut take: impl FnMut(&'static str) -> Result<Map, MapError>,
    ) -> Result<Self, DrainError> {
        let slot: ArrayOfMaps<MapData, MapData> = take(names::ACTIVE_SLOT)?.try_into()?;
        let table = |map: Map| match map {
            Map::PerCpuHashMap(data) => Ok(data),
            _ => Err(MapError::InvalidName {
                name: "a flow table that is not a per-CPU hash map".to_string(),
            }),
        };
        let table_a = table(take(names::FLOW_TABLES[0])?)?;
        let table_b = table(take(names::FLOW_TABLES[1])?)?;
        let caches = FlowCaches::take(&mut take)?;
        let outside_slots = match take(names::OUTSIDE_SLOTS)? {
            Map::PerCpuArray(data) => data,
            _ => {
                return Err(MapError::InvalidName {
                    name: "outside slots that are not a per-CPU array".to_string(),
                }
                .into());
            }
        };
        let outside = take(names::OUTSIDE_COUNTERS)?.try_into()?;
        let outside_unkeyed = take(names::OUTSIDE_UNKEYED)?.try_into()?;
        let outside_generation = take(names::OUTSIDE_GENERATION)?.try_into()?;
        let possible_cpus = aya::util::nr_cpus().map_err(|(_, e)| DrainError::Cpus(e))?;
        let cache_buffer = CacheBuffer::new(possible_cpus, caches.slot_size());
        Ok(Self {
            slot,
            tables: [table_a, table_b],
            caches,
            cache_half: None,
            active: 0,
            outside_slots,
            outside_slots_buffer: OutsideSlotsBuffer::new(possible_cpus),
            outside,
            outside_unkeyed,
            outside_generation,
            generation: 0,
            table_epoch: None,
            cache_switch: None,
            possible_cpus,
            batch: ReadBatch::new(possible_cpus),
            cache_buffer,
            keep_flows: false,
            flows_last_turn: 0,
        })
    }

    /// Swaps tables and returns everything counted since the last drain.
    pub fn drain(&mut self) -> Result<Drained, DrainError> {
        let idle = self.active;
        let next = 1 - idle;
        let started = Instant::now();
        // Outside counts go to the other generation from now on; the swaps
        // below wait for every program that may still use the old one.
        let idle_generation = self.generation;
        self.generation ^= 1;
        self.outside_generation.set(0, self.generation, 0)?;
        // The cache's half before the table: a program still using the old
        // half may move a flow from it into the table the slot names, which
        // must then still be the old one or already the new one, never one
        // we have read. The table's swap waits for those programs too.
        let cache_was_on = self.cache_switch.as_ref().is_none_or(|s| s.on);
        self.name_cache_half(next, cache_was_on)?;
        self.slot.set(0, &self.tables[next], 0)?;
        self.active = next;
        // No program holds the old table now: a table the programs find
        // full from here on is the new one (see `names::TABLE_FULL`).
        if let Some((map, epoch)) = &mut self.table_epoch {
            // Never u32::MAX, whose mark (epoch + 1) a fresh slot holds.
            *epoch = (*epoch + 1) % u32::MAX;
            map.set(0, *epoch, 0)?;
        }
        let swapped = Instant::now();

        let mut outside = self.read_and_clear_outside(idle_generation)?;
        self.outside_slots_buffer
            .read_and_clear(&self.outside_slots, idle_generation, &mut outside)
            .map_err(DrainError::Batch)?;
        let table_full = outside.total(OutsideReason::TableFull).packets != 0;
        let keep = if self.keep_flows && !table_full && self.flows_last_turn <= KEEP_AT_MOST {
            Keep::FlowsThatSent
        } else {
            Keep::Nothing
        };
        let (table, table_entries) = self
            .batch
            .read_and_clear(&self.tables[idle], keep)
            .map_err(DrainError::Batch)?;
        self.flows_last_turn = table.len();
        let cached = self
            .cache_buffer
            .read_and_clear(&self.caches, idle)
            .map_err(DrainError::Batch)?;
        let flows = merge(table, cached);
        let mut flow_cache = CacheUse::default();
        if let Some(switch) = &mut self.cache_switch {
            // The frames that went outside from the counting path: a
            // frame that missed its slot and found no room in the table.
            let no_room = [
                OutsideReason::TableFull,
                OutsideReason::InsertFailed,
                OutsideReason::NoActiveTable,
            ]
            .map(|reason| outside.total(reason).packets)
            .iter()
            .sum();
            flow_cache = switch.interval_ended(cache_was_on, &flows, no_room)?;
            let on = switch.judge.on();
            if on != cache_was_on {
                // At once, for the interval under way: the half named, or
                // named before, is the one the next drain reads.
                self.name_cache_half(next, on)?;
                if let Some(switch) = &mut self.cache_switch {
                    switch.on = on;
                }
            }
        }
        Ok(Drained {
            flows,
            table_entries,
            outside,
            swap_time: swapped - started,
            read_time: swapped.elapsed(),
            link_stats: HashMap::new(),
            flow_cache,
            retransmits: Default::default(),
            handshakes: Default::default(),
        })
    }

    /// Whether drained tables keep the entries of flows that sent (on for
    /// the tables this agent's programs count into; the bench compares).
    pub fn set_keep_flows(&mut self, keep: bool) {
        self.keep_flows = keep;
    }

    /// Names half `index` of the cache for the programs to count into, or
    /// none (`on` false: they then count into the table directly). A
    /// program that read the half named before may still use it until the
    /// next table swap returns.
    fn name_cache_half(&mut self, index: usize, on: bool) -> Result<(), DrainError> {
        if let Some(half) = &mut self.cache_half {
            let value = if on { index as u32 } else { CACHE_OFF };
            half.set(0, value, 0)?;
        }
        Ok(())
    }

    /// What the kernel counted outside the flow table for `reason` and a
    /// drain has not taken yet, without draining: the active generation
    /// (a drain leaves the other one empty).
    pub fn outside_undrained(&mut self, reason: OutsideReason) -> Result<Counters, DrainError> {
        let generation = self.generation;
        let mut counts = OutsideCounts::default();
        self.outside_slots_buffer
            .read(&self.outside_slots, generation, &mut counts)
            .map_err(DrainError::Batch)?;
        let mut total = counts.total(reason);
        for key in self.outside.keys() {
            let key = key?;
            if key.reason != reason as u8 || key.generation as u32 != generation {
                continue;
            }
            match self.outside.get(&key, 0) {
                Ok(values) => values.iter().for_each(|c| total.add(c)),
                Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(e.into()),
            }
        }
        for hook in Hook::ALL {
            let slot = outside_unkeyed_index(generation, hook as u8, reason);
            self.outside_unkeyed
                .get(&slot, 0)?
                .iter()
                .for_each(|c| total.add(c));
        }
        Ok(total)
    }

    /// Reads and deletes the outside counts of a generation no program
    /// writes any more.
    fn read_and_clear_outside(&mut self, generation: u32) -> Result<OutsideCounts, MapError> {
        let mut counts = OutsideCounts::default();
        // Keys first, then values: deleting while walking the hash would
        // restart the walk.
        let keys = self
            .outside
            .keys()
            .filter(|k| {
                k.as_ref()
                    .map_or(true, |k| k.generation as u32 == generation)
            })
            .collect::<Result<Vec<OutsideKey>, MapError>>()?;
        for key in keys {
            let values = match self.outside.get(&key, 0) {
                Ok(values) => values,
                Err(MapError::KeyNotFound) => continue,
                Err(e) => return Err(e),
            };
            self.outside.remove(&key)?;
            let (Some(hook), Some(reason)) =
                (Hook::from_u8(key.hook), OutsideReason::from_u8(key.reason))
            else {
                continue;
            };
            let mut total = Counters::default();
            values.iter().for_each(|c| total.add(c));
            let at = Outside {
                ifindex: key.ifindex,
                hook,
                reason,
            };
            counts.add(at, &total);
        }
        for hook in Hook::ALL {
            for reason in OutsideReason::ALL {
                let slot = outside_unkeyed_index(generation, hook as u8, reason);
                let mut total = Counters::default();
                self.outside_unkeyed
                    .get(&slot, 0)?
                    .iter()
                    .for_each(|c| total.add(c));
                if total == Counters::default() {
                    continue;
                }
                let zeros = PerCpuValues::try_from(vec![Counters::default(); self.possible_cpus])?;
                self.outside_unkeyed.set(slot, zeros, 0)?;
                let at = Outside {
                    ifindex: Outside::UNKNOWN_IFINDEX,
                    hook,
                    reason,
                };
                counts.add(at, &total);
            }
        }
        Ok(counts)
    }
}

/// The running agent's side of the flow cache's switch: the kernel's miss
/// counts and the judgement.
struct CacheSwitch {
    misses: PerCpuArray<MapData, u64>,
    /// The misses summed over CPUs at the previous drain (the kernel's
    /// counts only grow).
    misses_seen: u64,
    judge: CacheJudge,
    /// Whether the slot holds a cache now.
    on: bool,
    /// Whether the log said the cache went off, and not yet that it pays
    /// again.
    announced_off: bool,
}

impl CacheSwitch {
    /// Notes the interval just drained, in which the cache was `was_on`,
    /// the programs counted `flows` and `no_room` packets more outside the
    /// table for want of room, and judges the next: what the cache did.
    fn interval_ended(
        &mut self,
        was_on: bool,
        flows: &[(FlowKey, Counters)],
        no_room: u64,
    ) -> Result<CacheUse, MapError> {
        let misses_now: u64 = self.misses.get(&0, 0)?.iter().sum();
        // Misses counted after the swap are this interval's too, by a few.
        let used = CacheUse {
            on: was_on,
            misses: misses_now.wrapping_sub(self.misses_seen),
        };
        self.misses_seen = misses_now;
        // Every packet that took the cache's path: a miss that found the
        // table full is one of them.
        let packets: u64 = flows.iter().map(|(_, c)| c.packets).sum::<u64>() + no_room;
        let on = self.judge.next(used, packets, flows.len(), no_room != 0);
        // Logged once per flood (its start and its end), not per try.
        let missed = || 100.0 * used.misses as f64 / packets.max(1) as f64;
        if was_on && !on && !self.announced_off {
            log::info!(
                "the flow cache does not pay: {:.0}% of {packets} packets missed it; counting into the flow table directly until it does",
                missed()
            );
            self.announced_off = true;
        } else if was_on && on && self.announced_off {
            log::info!(
                "the flow cache pays again ({:.0}% of {packets} packets missed it): counting through it",
                missed()
            );
            self.announced_off = false;
        }
        Ok(used)
    }
}

/// The key and value sizes this build reads in each pinned map it drains
/// (None: a map whose sizes the kernel checks itself, like a map-in-map).
fn expected_sizes(name: &str) -> Option<(usize, usize)> {
    let four = size_of::<u32>();
    Some(match name {
        n if names::FLOW_TABLES.contains(&n) => (size_of::<FlowKey>(), size_of::<Counters>()),
        names::FLOW_CACHE => (four, size_of::<CacheSlot>()),
        names::layout_2::FLOW_CACHE => (four, size_of::<layout_2::CacheSlot>()),
        n if names::layout_1::FLOW_CACHES.contains(&n) => (four, size_of::<layout_2::CacheSlot>()),
        names::OUTSIDE_SLOTS => (four, size_of::<OutsideSlot>()),
        names::OUTSIDE_COUNTERS => (size_of::<OutsideKey>(), size_of::<Counters>()),
        names::OUTSIDE_UNKEYED => (four, size_of::<Counters>()),
        names::OUTSIDE_GENERATION => (four, four),
        _ => return None,
    })
}

/// The table's flows plus the cache's: a flow in both is summed. The cache is
/// small (a few thousand slots per CPU) and the table may hold millions, so
/// only the cache is indexed.
fn merge(
    mut table: Vec<(FlowKey, Counters)>,
    cached: Vec<(FlowKey, Counters)>,
) -> Vec<(FlowKey, Counters)> {
    if cached.is_empty() {
        return table;
    }
    let mut from_cache: HashMap<FlowKey, Counters> = HashMap::with_capacity(cached.len());
    for (key, counters) in cached {
        from_cache.entry(key).or_default().add(&counters);
    }
    for (key, counters) in table.iter_mut() {
        if let Some(extra) = from_cache.remove(key) {
            counters.add(&extra);
        }
    }
    table.extend(from_cache);
    table
}

/// Entries asked for per system call.
const BATCH_ENTRIES: usize = 4096;
/// The most flows a drain keeps entries for: zeroing them takes the drain
/// about 0.2 s here (see the module's docs).
pub const KEEP_AT_MOST: usize = 131_072;
/// A per-CPU value slot is the value size rounded up to 8 bytes.
const PER_CPU_SLOT: usize = size_of::<Counters>().next_multiple_of(8);

/// What a drained table keeps for its next turn (see the module's docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Keep {
    /// The entries of flows that sent, zeroed.
    FlowsThatSent,
    /// No entry.
    Nothing,
}

/// Buffers reused from drain to drain.
struct ReadBatch {
    keys: Vec<FlowKey>,
    values: Vec<u8>,
    possible_cpus: usize,
    /// The keys of the flows that sent, to zero; then those of the entries
    /// that stayed zero, to delete.
    sent: Vec<FlowKey>,
    unused: Vec<FlowKey>,
    /// [`BATCH_ENTRIES`] zero values, the per-CPU counts a kept entry is
    /// given.
    zeros: Vec<u8>,
}

impl ReadBatch {
    fn new(possible_cpus: usize) -> Self {
        let mut batch = Self {
            keys: Vec::new(),
            values: Vec::new(),
            possible_cpus,
            sent: Vec::new(),
            unused: Vec::new(),
            zeros: vec![0; BATCH_ENTRIES * possible_cpus * PER_CPU_SLOT],
        };
        batch.resize(BATCH_ENTRIES);
        batch
    }

    fn resize(&mut self, entries: usize) {
        self.keys.resize(entries, FlowKey::default());
        self.values
            .resize(entries * self.possible_cpus * PER_CPU_SLOT, 0);
    }

    /// Reads every entry of an idle table, summing per-CPU values, a batch
    /// at a time, and leaves the table without counts: every entry deleted
    /// as it is read ([`Keep::Nothing`]), or, once all are read, the entries
    /// of flows that sent zeroed and the others deleted. Returns the flows
    /// that sent and how many entries the table held.
    fn read_and_clear(
        &mut self,
        table: &MapData,
        keep: Keep,
    ) -> Result<(Vec<(FlowKey, Counters)>, usize), SyscallError> {
        let delete_as_read = keep == Keep::Nothing;
        self.sent.clear();
        self.unused.clear();
        let mut flows = Vec::new();
        let mut entries = 0;
        // The kernel's cursor into the hash table: a bucket index.
        let mut cursor: Option<u32> = None;
        let mut next: u32 = 0;
        loop {
            let mut buffers = bpf::BatchBuffers {
                keys: &mut self.keys,
                values: &mut self.values,
                value_size: self.possible_cpus * PER_CPU_SLOT,
            };
            let read = bpf::lookup_batch(
                table.fd().as_fd(),
                delete_as_read,
                cursor.as_ref(),
                &mut next,
                &mut buffers,
            );
            let (filled, done) = match read {
                Ok(bpf::BatchRead::More { filled }) => (filled, false),
                Ok(bpf::BatchRead::Done { filled }) => (filled, true),
                // One hash bucket holds more entries than a batch: grow.
                Err(e) if e.errno() == Some(libc::ENOSPC) => {
                    self.resize(self.keys.len() * 2);
                    continue;
                }
                Err(e) => return Err(e),
            };
            entries += filled;
            for (i, key) in self.keys[..filled].iter().enumerate() {
                let mut total = Counters::default();
                for cpu in 0..self.possible_cpus {
                    let at = (i * self.possible_cpus + cpu) * PER_CPU_SLOT;
                    let slot = &self.values[at..at + PER_CPU_SLOT];
                    total.add(&Counters {
                        bytes: u64::from_ne_bytes(slot[0..8].try_into().unwrap_or_default()),
                        packets: u64::from_ne_bytes(slot[8..16].try_into().unwrap_or_default()),
                    });
                }
                if total.packets != 0 {
                    flows.push((*key, total));
                }
                if !delete_as_read {
                    if total.packets != 0 {
                        self.sent.push(*key);
                    } else {
                        self.unused.push(*key);
                    }
                }
            }
            if done {
                break;
            }
            cursor = Some(next);
        }
        // The table is idle: nothing changes it between the read and these.
        let fd = table.fd().as_fd();
        for keys in self.sent.chunks_mut(BATCH_ENTRIES) {
            let count = keys.len() as u32;
            let mut zeros = bpf::BatchBuffers {
                keys,
                values: &mut self.zeros,
                value_size: self.possible_cpus * PER_CPU_SLOT,
            };
            bpf::update_batch(fd, &mut zeros, count)?;
        }
        for keys in self.unused.chunks(BATCH_ENTRIES) {
            bpf::delete_batch(fd, keys)?;
        }
        Ok((flows, entries))
    }
}

/// The flow cache's two halves, as the drain reads them.
enum FlowCaches {
    /// One per-CPU array of [`CacheSlot`]s, half `i` from slot
    /// `i * FLOW_CACHE_SLOTS` on (`names::FLOW_CACHE`).
    Slots(MapData),
    /// As `Slots`, of layout 2's slots (`names::layout_2`), which an
    /// earlier agent may have pinned.
    Halves(MapData),
    /// Two per-CPU arrays of layout 2's slots, one per half: layout 1's
    /// (`names::layout_1`).
    Pair([MapData; 2]),
}

/// The cache slots of layouts 1 and 2, keyed by the flow key alone.
mod layout_2 {
    use ntm_common::{Counters, FlowKey};

    #[repr(C)]
    #[derive(Clone, Copy)]
    pub struct CacheSlot {
        pub key: FlowKey,
        pub counters: Counters,
    }
}

impl FlowCaches {
    /// The cache by this layout's name, else by layout 2's, else by layout
    /// 1's.
    fn take(
        take: &mut impl FnMut(&'static str) -> Result<Map, MapError>,
    ) -> Result<Self, MapError> {
        let cache = |map: Map, slots: u32| match map {
            Map::PerCpuArray(data) if data.info()?.max_entries() == slots => Ok(data),
            _ => Err(MapError::InvalidName {
                name: format!("a flow cache that is not a per-CPU array of {slots} slots"),
            }),
        };
        let error = match take(names::FLOW_CACHE) {
            Ok(map) => return Ok(Self::Slots(cache(map, 2 * FLOW_CACHE_SLOTS)?)),
            Err(error) => error,
        };
        if let Ok(map) = take(names::layout_2::FLOW_CACHE) {
            return Ok(Self::Halves(cache(map, 2 * FLOW_CACHE_SLOTS)?));
        }
        let [a, b] = names::layout_1::FLOW_CACHES;
        let Ok(first) = take(a) else {
            return Err(error);
        };
        Ok(Self::Pair([
            cache(first, FLOW_CACHE_SLOTS)?,
            cache(take(b)?, FLOW_CACHE_SLOTS)?,
        ]))
    }

    /// The map that holds half `index` (0 or 1), and the half's first slot.
    fn half(&self, index: usize) -> (&MapData, u32) {
        match self {
            Self::Slots(cache) | Self::Halves(cache) => (cache, index as u32 * FLOW_CACHE_SLOTS),
            Self::Pair(caches) => (&caches[index], 0),
        }
    }

    /// The bytes of one slot.
    fn slot_size(&self) -> usize {
        match self {
            Self::Slots(_) => size_of::<CacheSlot>(),
            Self::Halves(_) | Self::Pair(_) => size_of::<layout_2::CacheSlot>(),
        }
    }

    /// The flow and counts of a slot's bytes (`slot_size` of them); the
    /// counts are zero in an empty slot.
    fn slot(&self, bytes: &[u8]) -> (FlowKey, Counters) {
        match self {
            Self::Slots(_) => {
                // SAFETY: `bytes` is as long as a CacheSlot, which is plain
                // old data (any bytes are a valid one); read_unaligned
                // needs no alignment.
                let slot: CacheSlot = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
                (slot.flow_key(), slot.counters)
            }
            Self::Halves(_) | Self::Pair(_) => {
                // SAFETY: as above, of layout 2's slot.
                let slot: layout_2::CacheSlot =
                    unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
                (slot.key, slot.counters)
            }
        }
    }
}

/// Reads an idle half of the per-CPU flow cache whole, then zeroes it.
struct CacheBuffer {
    indices: Vec<u32>,
    values: Vec<u8>,
    possible_cpus: usize,
    slot_size: usize,
}

impl CacheBuffer {
    fn new(possible_cpus: usize, slot_size: usize) -> Self {
        Self {
            indices: (0..FLOW_CACHE_SLOTS).collect(),
            values: vec![0; FLOW_CACHE_SLOTS as usize * possible_cpus * slot_size],
            possible_cpus,
            slot_size,
        }
    }

    fn buffers(&mut self) -> bpf::BatchBuffers<'_, u32> {
        bpf::BatchBuffers {
            keys: &mut self.indices,
            values: &mut self.values,
            value_size: self.possible_cpus * self.slot_size,
        }
    }

    /// Reads half `index` of the cache, and zeroes it if any slot was used.
    fn read_and_clear(
        &mut self,
        caches: &FlowCaches,
        index: usize,
    ) -> Result<Vec<(FlowKey, Counters)>, SyscallError> {
        let (cache, first) = caches.half(index);
        let fd = cache.fd().as_fd();
        // An array's batch goes on from the index after its cursor.
        let before = first.checked_sub(1);
        let mut next: u32 = 0;
        let filled =
            match bpf::lookup_batch(fd, false, before.as_ref(), &mut next, &mut self.buffers())? {
                // Done: the whole half fitted in this one batch, as it should.
                bpf::BatchRead::Done { filled } | bpf::BatchRead::More { filled } => filled,
            };
        if filled != FLOW_CACHE_SLOTS as usize {
            return Err(SyscallError {
                call: "bpf(BPF_MAP_LOOKUP_BATCH) of a flow cache",
                source: std::io::Error::other(format!(
                    "read {filled} of {FLOW_CACHE_SLOTS} flow cache slots"
                )),
            });
        }
        let mut flows = Vec::new();
        for chunk in self.values.chunks_exact(self.slot_size) {
            let (key, counters) = caches.slot(chunk);
            if counters.packets != 0 {
                flows.push((key, counters));
            }
        }
        if flows.is_empty() {
            return Ok(flows);
        }
        // Zero every slot of the half on every CPU for its next turn.
        self.values.fill(0);
        self.indices = (first..first + FLOW_CACHE_SLOTS).collect();
        bpf::update_batch(fd, &mut self.buffers(), FLOW_CACHE_SLOTS)?;
        Ok(flows)
    }
}

/// Reads one generation of the per-CPU outside slots (a batch), then zeroes
/// the slots it found used (another batch).
struct OutsideSlotsBuffer {
    indices: Vec<u32>,
    values: Vec<u8>,
    used: Vec<u32>,
    zeros: Vec<u8>,
    possible_cpus: usize,
}

const OUTSIDE_SLOT_SIZE: usize = size_of::<OutsideSlot>();

impl OutsideSlotsBuffer {
    fn new(possible_cpus: usize) -> Self {
        let slots = OUTSIDE_SLOTS_PER_GENERATION as usize;
        Self {
            indices: vec![0; slots],
            values: vec![0; slots * possible_cpus * OUTSIDE_SLOT_SIZE],
            used: Vec::with_capacity(slots),
            zeros: Vec::new(),
            possible_cpus,
        }
    }

    /// Adds generation `generation`'s counts to `counts` and notes the
    /// slots that held any.
    fn read(
        &mut self,
        slots: &MapData,
        generation: u32,
        counts: &mut OutsideCounts,
    ) -> Result<(), SyscallError> {
        let first = generation * OUTSIDE_SLOTS_PER_GENERATION;
        // An array's batch cursor is the index before the first one read.
        let cursor = first.checked_sub(1);
        let mut next = 0;
        let mut buffers = bpf::BatchBuffers {
            keys: &mut self.indices,
            values: &mut self.values,
            value_size: self.possible_cpus * OUTSIDE_SLOT_SIZE,
        };
        let filled = match bpf::lookup_batch(
            slots.fd().as_fd(),
            false,
            cursor.as_ref(),
            &mut next,
            &mut buffers,
        )? {
            bpf::BatchRead::Done { filled } | bpf::BatchRead::More { filled } => filled,
        };
        if filled != OUTSIDE_SLOTS_PER_GENERATION as usize {
            return Err(SyscallError {
                call: "bpf(BPF_MAP_LOOKUP_BATCH) of the outside slots",
                source: std::io::Error::other(format!(
                    "read {filled} of {OUTSIDE_SLOTS_PER_GENERATION} slots"
                )),
            });
        }
        self.used.clear();
        for (i, index) in self.indices.iter().enumerate() {
            let (_, hook, reason) = outside_slot_of(*index);
            let Some(hook) = Hook::from_u8(hook) else {
                continue;
            };
            let mut used = false;
            for cpu in 0..self.possible_cpus {
                let at = (i * self.possible_cpus + cpu) * OUTSIDE_SLOT_SIZE;
                let bytes = &self.values[at..at + OUTSIDE_SLOT_SIZE];
                // SAFETY: `bytes` is OUTSIDE_SLOT_SIZE long, the size of an
                // OutsideSlot, which is plain old data (any bytes are a valid
                // one); read_unaligned needs no alignment.
                let slot: OutsideSlot = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
                if slot == OutsideSlot::default() {
                    continue;
                }
                used = true;
                let at = Outside {
                    ifindex: slot.ifindex,
                    hook,
                    reason,
                };
                counts.add(at, &slot.counters);
            }
            if used {
                self.used.push(*index);
            }
        }
        Ok(())
    }

    /// [`Self::read`], then zeroes the used slots on every CPU (slot and
    /// interface) for the generation's next turn.
    fn read_and_clear(
        &mut self,
        slots: &MapData,
        generation: u32,
        counts: &mut OutsideCounts,
    ) -> Result<(), SyscallError> {
        self.read(slots, generation, counts)?;
        if self.used.is_empty() {
            return Ok(());
        }
        let value_size = self.possible_cpus * OUTSIDE_SLOT_SIZE;
        self.zeros.clear();
        self.zeros.resize(self.used.len() * value_size, 0);
        let count = self.used.len() as u32;
        let mut buffers = bpf::BatchBuffers {
            keys: &mut self.used,
            values: &mut self.zeros,
            value_size,
        };
        bpf::update_batch(slots.fd().as_fd(), &mut buffers, count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ntm_common::test_util::KeyBuilder;

    fn key(port: u16) -> FlowKey {
        KeyBuilder::new().port(port).build()
    }

    fn c(bytes: u64, packets: u64) -> Counters {
        Counters { bytes, packets }
    }

    #[test]
    fn merge_sums_flows_found_in_both_and_keeps_the_rest() {
        let table = vec![(key(1), c(10, 1)), (key(2), c(20, 2))];
        // Two CPUs' caches can both hold flow 2.
        let cached = vec![(key(2), c(5, 1)), (key(3), c(7, 1)), (key(2), c(1, 1))];
        let mut merged = merge(table, cached);
        merged.sort_by_key(|(k, _)| k.port);
        assert_eq!(
            merged,
            vec![(key(1), c(10, 1)), (key(2), c(26, 4)), (key(3), c(7, 1))]
        );
        assert_eq!(
            merge(vec![(key(1), c(1, 1))], vec![]),
            vec![(key(1), c(1, 1))]
        );
    }
}
