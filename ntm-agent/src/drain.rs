//! Lossless drain of the kernel's flow tables.
//!
//! The program counts into whichever table the one-slot ARRAY_OF_MAPS points
//! at. To drain, we point the slot at the other (empty) table. Updating a
//! map-in-map slot makes the kernel wait for every program that may still hold
//! the old table (an RCU grace period), so when `set` returns, the old table
//! is idle: we read every entry and delete it, and the table is empty for its
//! next turn. Nothing is read while it can still change, so nothing is lost
//! and nothing is counted twice, whatever the interval.

use std::time::{Duration, Instant};

use aya::{
    Ebpf,
    maps::{ArrayOfMaps, MapData, MapError, PerCpuArray, PerCpuHashMap},
};
use ntm_common::{Counters, FlowKey, OutsideReason, names};

type FlowTable = PerCpuHashMap<MapData, FlowKey, Counters>;

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

pub struct FlowTables {
    slot: ArrayOfMaps<MapData, FlowTable>,
    tables: [FlowTable; 2],
    /// Index into `tables` of the one the slot points at.
    active: usize,
    outside: PerCpuArray<MapData, Counters>,
    /// The kernel's outside counters only grow; this is what we saw last.
    outside_seen: [Counters; OutsideReason::COUNT as usize],
}

impl FlowTables {
    /// Takes the maps out of a loaded object and points the slot at table 0.
    pub(crate) fn take_from(ebpf: &mut Ebpf) -> Result<Self, MapError> {
        let mut take = |name: &'static str| {
            ebpf.take_map(name).ok_or(MapError::InvalidName {
                name: name.to_string(),
            })
        };
        let slot: ArrayOfMaps<MapData, FlowTable> = take(names::ACTIVE_SLOT)?.try_into()?;
        let table_a: FlowTable = take(names::FLOW_TABLES[0])?.try_into()?;
        let table_b: FlowTable = take(names::FLOW_TABLES[1])?.try_into()?;
        let outside: PerCpuArray<MapData, Counters> = take(names::OUTSIDE_COUNTERS)?.try_into()?;
        let mut tables = Self {
            slot,
            tables: [table_a, table_b],
            active: 0,
            outside,
            outside_seen: Default::default(),
        };
        tables.slot.set(0, &tables.tables[0], 0)?;
        Ok(tables)
    }

    /// Swaps tables and returns everything counted since the last drain.
    pub fn drain(&mut self) -> Result<Drained, MapError> {
        let idle = self.active;
        let next = 1 - idle;
        let started = Instant::now();
        self.slot.set(0, &self.tables[next], 0)?;
        self.active = next;
        let swapped = Instant::now();

        let flows = read_and_clear(&mut self.tables[idle])?;
        let outside = self.outside_deltas()?;
        Ok(Drained {
            flows,
            outside,
            swap_time: swapped - started,
            read_time: swapped.elapsed(),
        })
    }

    /// Entries in the table being counted into right now (a self-metric; it
    /// walks the keys, so call it no more often than a drain).
    pub fn active_entries(&self) -> usize {
        self.tables[self.active].keys().count()
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

/// Reads every entry of an idle table, summing the per-CPU values, and
/// deletes it. Keys are collected first: deleting while walking a BPF hash
/// map can restart the walk and visit entries twice.
fn read_and_clear(table: &mut FlowTable) -> Result<Vec<(FlowKey, Counters)>, MapError> {
    let keys = table.keys().collect::<Result<Vec<FlowKey>, MapError>>()?;
    let mut flows = Vec::with_capacity(keys.len());
    for key in keys {
        let mut total = Counters::default();
        for per_cpu in table.get(&key, 0)?.iter() {
            total.add(per_cpu);
        }
        table.remove(&key)?;
        if total.packets != 0 {
            flows.push((key, total));
        }
    }
    Ok(flows)
}
