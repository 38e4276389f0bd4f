//! Lossless drain of the kernel's flow tables.
//!
//! The program counts into whichever table the one-slot ARRAY_OF_MAPS points
//! at. To drain, we point the slot at the other (empty) table. Updating a
//! map-in-map slot makes the kernel wait for every program that may still hold
//! the old table (an RCU grace period), so when `set` returns, the old table
//! is idle: we read and delete every entry, and the table is empty for its
//! next turn. Nothing is read while it can still change, so nothing is lost
//! and nothing is counted twice, whatever the interval.
//!
//! In front of each table sits a per-CPU flow cache (see
//! `ntm_common::CacheSlot`), double-buffered the same way and swapped first:
//! once both swaps have returned, neither the old cache nor the old table can
//! change, and a flow's counts are in one of them or in both (summed here).
//!
//! Reading uses the batch map commands (Linux 5.6+): thousands of entries per
//! system call, where one lookup and one delete per entry would take seconds
//! for a million flows.

use std::{
    collections::HashMap,
    io,
    mem::size_of,
    os::fd::AsFd as _,
    time::{Duration, Instant},
};

use aya::{
    Ebpf,
    maps::{ArrayOfMaps, Map, MapData, MapError, PerCpuArray},
};
use ntm_common::{CacheSlot, Counters, FLOW_CACHE_SLOTS, FlowKey, OutsideReason, names};

use super::sys::{SyscallError, bpf};

/// What one drain found: the counts added since the previous drain.
#[derive(Clone, Debug, Default)]
pub struct Drained {
    pub flows: Vec<(FlowKey, Counters)>,
    /// Per [`OutsideReason`], indexed by its value.
    pub outside: [Counters; OutsideReason::COUNT as usize],
    /// How long the swap took (mostly the kernel's wait for running programs).
    pub swap_time: Duration,
    /// How long reading and clearing the idle table took.
    pub read_time: Duration,
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
    cache_slot: ArrayOfMaps<MapData, MapData>,
    caches: [MapData; 2],
    /// Index into `tables` of the one the slot points at.
    active: usize,
    outside: PerCpuArray<MapData, Counters>,
    /// The kernel's outside counters only grow; this is what we saw last.
    outside_seen: [Counters; OutsideReason::COUNT as usize],
    batch: Batch,
    cache_buffer: CacheBuffer,
}

impl FlowTables {
    /// Takes the maps out of a loaded object and points the slot at table 0.
    pub(crate) fn take_from(ebpf: &mut Ebpf) -> Result<Self, DrainError> {
        let mut take = |name: &'static str| {
            ebpf.take_map(name).ok_or(MapError::InvalidName {
                name: name.to_string(),
            })
        };
        let slot: ArrayOfMaps<MapData, MapData> = take(names::ACTIVE_SLOT)?.try_into()?;
        let table = |map: Map| match map {
            Map::PerCpuHashMap(data) => Ok(data),
            _ => Err(MapError::InvalidName {
                name: "a flow table that is not a per-CPU hash map".to_string(),
            }),
        };
        let table_a = table(take(names::FLOW_TABLES[0])?)?;
        let table_b = table(take(names::FLOW_TABLES[1])?)?;
        let cache_slot: ArrayOfMaps<MapData, MapData> =
            take(names::ACTIVE_CACHE_SLOT)?.try_into()?;
        let cache = |map: Map| match map {
            Map::PerCpuArray(data) => Ok(data),
            _ => Err(MapError::InvalidName {
                name: "a flow cache that is not a per-CPU array".to_string(),
            }),
        };
        let cache_a = cache(take(names::FLOW_CACHES[0])?)?;
        let cache_b = cache(take(names::FLOW_CACHES[1])?)?;
        let outside: PerCpuArray<MapData, Counters> = take(names::OUTSIDE_COUNTERS)?.try_into()?;
        let possible_cpus = aya::util::nr_cpus().map_err(|(_, e)| DrainError::Cpus(e))?;
        let mut tables = Self {
            slot,
            tables: [table_a, table_b],
            cache_slot,
            caches: [cache_a, cache_b],
            active: 0,
            outside,
            outside_seen: Default::default(),
            batch: Batch::new(possible_cpus),
            cache_buffer: CacheBuffer::new(possible_cpus),
        };
        tables.slot.set(0, &tables.tables[0], 0)?;
        tables.cache_slot.set(0, &tables.caches[0], 0)?;
        Ok(tables)
    }

    /// Swaps tables and returns everything counted since the last drain.
    pub fn drain(&mut self) -> Result<Drained, DrainError> {
        let idle = self.active;
        let next = 1 - idle;
        let started = Instant::now();
        // The cache first: a program still holding the old cache may move a
        // flow from it into the table the slot names, which must then still
        // be the old one or already the new one, never one we have read.
        self.cache_slot.set(0, &self.caches[next], 0)?;
        self.slot.set(0, &self.tables[next], 0)?;
        self.active = next;
        let swapped = Instant::now();

        let table = self
            .batch
            .read_and_clear(&self.tables[idle])
            .map_err(DrainError::Batch)?;
        let cached = self
            .cache_buffer
            .read_and_clear(&self.caches[idle])
            .map_err(DrainError::Batch)?;
        let flows = merge(table, cached);
        let outside = self.outside_deltas()?;
        Ok(Drained {
            flows,
            outside,
            swap_time: swapped - started,
            read_time: swapped.elapsed(),
        })
    }

    /// The kernel's running total for `reason` (all CPUs), without
    /// draining anything: what a drain would report is unaffected.
    pub fn outside_total(&self, reason: OutsideReason) -> Result<Counters, DrainError> {
        let mut total = Counters::default();
        for per_cpu in self
            .outside
            .get(&(reason as u32), 0)
            .map_err(DrainError::Map)?
            .iter()
        {
            total.add(per_cpu);
        }
        Ok(total)
    }

    fn outside_deltas(&mut self) -> Result<[Counters; OutsideReason::COUNT as usize], MapError> {
        let mut deltas = [Counters::default(); OutsideReason::COUNT as usize];
        for reason in OutsideReason::ALL {
            let index = reason as usize;
            let mut total = Counters::default();
            for per_cpu in self.outside.get(&(index as u32), 0)?.iter() {
                total.add(per_cpu);
            }
            let seen = self.outside_seen[index];
            deltas[index] = Counters {
                bytes: total.bytes.wrapping_sub(seen.bytes),
                packets: total.packets.wrapping_sub(seen.packets),
            };
            self.outside_seen[index] = total;
        }
        Ok(deltas)
    }
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
/// A per-CPU value slot is the value size rounded up to 8 bytes.
const PER_CPU_SLOT: usize = size_of::<Counters>().next_multiple_of(8);

/// Buffers reused from drain to drain.
struct Batch {
    keys: Vec<FlowKey>,
    values: Vec<u8>,
    possible_cpus: usize,
}

impl Batch {
    fn new(possible_cpus: usize) -> Self {
        let mut batch = Self {
            keys: Vec::new(),
            values: Vec::new(),
            possible_cpus,
        };
        batch.resize(BATCH_ENTRIES);
        batch
    }

    fn resize(&mut self, entries: usize) {
        self.keys.resize(entries, FlowKey::default());
        self.values
            .resize(entries * self.possible_cpus * PER_CPU_SLOT, 0);
    }

    /// Reads every entry of an idle table, summing per-CPU values, and
    /// deletes it, a batch at a time.
    fn read_and_clear(
        &mut self,
        table: &MapData,
    ) -> Result<Vec<(FlowKey, Counters)>, SyscallError> {
        let mut flows = Vec::new();
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
                true,
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
            }
            if done {
                return Ok(flows);
            }
            cursor = Some(next);
        }
    }
}

/// Reads an idle per-CPU flow cache whole, then zeroes it.
struct CacheBuffer {
    indices: Vec<u32>,
    values: Vec<u8>,
    possible_cpus: usize,
}

const CACHE_SLOT_SIZE: usize = size_of::<CacheSlot>();

impl CacheBuffer {
    fn new(possible_cpus: usize) -> Self {
        Self {
            indices: (0..FLOW_CACHE_SLOTS).collect(),
            values: vec![0; FLOW_CACHE_SLOTS as usize * possible_cpus * CACHE_SLOT_SIZE],
            possible_cpus,
        }
    }

    fn buffers(&mut self) -> bpf::BatchBuffers<'_, u32> {
        bpf::BatchBuffers {
            keys: &mut self.indices,
            values: &mut self.values,
            value_size: self.possible_cpus * CACHE_SLOT_SIZE,
        }
    }

    fn read_and_clear(
        &mut self,
        cache: &MapData,
    ) -> Result<Vec<(FlowKey, Counters)>, SyscallError> {
        let fd = cache.fd().as_fd();
        let mut next: u32 = 0;
        let filled = match bpf::lookup_batch(fd, false, None, &mut next, &mut self.buffers())? {
            // Done: the whole array fitted in this one batch, as it should.
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
        for chunk in self.values.chunks_exact(CACHE_SLOT_SIZE) {
            // SAFETY: the chunk is CACHE_SLOT_SIZE bytes, the size of a
            // CacheSlot, which is plain old data (any bytes are a valid one);
            // read_unaligned needs no alignment.
            let slot: CacheSlot = unsafe { std::ptr::read_unaligned(chunk.as_ptr().cast()) };
            if slot.counters.packets != 0 {
                flows.push((slot.key, slot.counters));
            }
        }
        if flows.is_empty() {
            return Ok(flows);
        }
        // Zero every slot on every CPU for the cache's next turn.
        self.values.fill(0);
        self.indices = (0..FLOW_CACHE_SLOTS).collect();
        bpf::update_batch(fd, &mut self.buffers(), FLOW_CACHE_SLOTS)?;
        Ok(flows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(port: u16) -> FlowKey {
        FlowKey {
            port,
            ..Default::default()
        }
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
