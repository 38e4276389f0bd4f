//! The agent's end of what the kernel observes for names: the ring buffer
//! of DNS and DHCP frames (`ntm_common::observe`), read as records arrive,
//! not per drain, so that an answer is known before the traffic it names
//! is; and the LRU table of which MAC sent from which address.

use super::load::share_map;
use std::{
    io,
    os::fd::{AsRawFd as _, RawFd},
};

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::{
    Ebpf,
    maps::{HashMap, MapData, MapError, PerCpuArray, RingBuf},
};
use ntm_common::{
    Hook, family, names,
    observe::{DROP_SLOTS, DropReason, Header, Kind, MacKey, MacValue, link},
};
use tokio::io::{Interest, unix::AsyncFd};

/// Most records read in one go, so that a flood cannot hold up the loop
/// (the rest are read on the next turn).
const BATCH: usize = 4096;

/// One frame as the kernel copied it.
#[derive(Clone, Copy, Debug)]
pub struct ObservedFrame<'a> {
    pub ifindex: u32,
    pub hook: Hook,
    pub kind: Kind,
    /// The bytes start with an Ethernet header (else with the IP header).
    pub ethernet: bool,
    /// The frame's length on the wire; more than `bytes.len()` when the
    /// copy was cut short.
    pub frame_len: u32,
    pub bytes: &'a [u8],
}

impl<'a> ObservedFrame<'a> {
    /// Reads a record; None for one that is not laid out as the kernel
    /// writes them (a bug, never input from the network).
    pub fn from_record(record: &'a [u8]) -> Option<Self> {
        let header = Header::read(record)?;
        let bytes = record.get(16..16 + header.captured as usize)?;
        Some(Self {
            ifindex: header.ifindex,
            hook: Hook::from_u8(header.hook)?,
            kind: Kind::from_u8(header.kind)?,
            ethernet: header.link == link::ETHERNET,
            frame_len: header.frame_len,
            bytes,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ObserverError {
    #[error("opening map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("watching the ring buffer: {0}")]
    Poll(#[source] io::Error),
}

/// Frames chosen for names but not handed over, by kind and reason, since
/// the programs were loaded.
pub type Drops = [[u64; DropReason::COUNT as usize]; Kind::COUNT as usize];

pub struct Observer {
    /// The ring's descriptor registered with tokio's reactor, on the first
    /// read (inside the runtime). Declared before `ring`, so that it is
    /// deregistered before the descriptor closes.
    poll: Option<AsyncFd<RawFd>>,
    ring: RingBuf<MapData>,
    drops: PerCpuArray<MapData, u64>,
}

impl Observer {
    pub(crate) fn share_from(ebpf: &Ebpf) -> Result<Self, ObserverError> {
        let take = |map: &'static str| {
            share_map(ebpf, map).map_err(|source| ObserverError::Map { map, source })
        };
        let ring =
            RingBuf::try_from(take(names::OBSERVED)?).map_err(|source| ObserverError::Map {
                map: names::OBSERVED,
                source,
            })?;
        let drops = PerCpuArray::try_from(take(names::OBSERVE_DROPS)?).map_err(|source| {
            ObserverError::Map {
                map: names::OBSERVE_DROPS,
                source,
            }
        })?;
        Ok(Self {
            poll: None,
            ring,
            drops,
        })
    }

    /// Waits until records are there, then copies them (up to a batch)
    /// into `records`; returns how many.
    pub async fn read(&mut self, records: &mut Vec<Vec<u8>>) -> Result<usize, ObserverError> {
        if self.poll.is_none() {
            let fd = self.ring.as_raw_fd();
            // SAFETY: `fd` is the ring buffer map's, owned by `self.ring`,
            // which outlives `self.poll` (field order) and never changes it.
            let registered = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) };
            self.poll = Some(registered.map_err(|e| ObserverError::Poll(e.into()))?);
        }
        let Some(poll) = self.poll.as_ref() else {
            return Ok(0);
        };
        let mut guard = poll.readable().await.map_err(ObserverError::Poll)?;
        let read = take(&mut self.ring, records);
        if read < BATCH {
            guard.clear_ready();
        }
        Ok(read)
    }

    /// Copies the records there are now (up to a batch), without waiting:
    /// before a drain, so that answers come before the flows they name.
    pub fn read_now(&mut self, records: &mut Vec<Vec<u8>>) -> usize {
        take(&mut self.ring, records)
    }

    /// What the kernel could not hand over, summed over the CPUs.
    pub fn drops(&self) -> Drops {
        let mut drops: Drops = Default::default();
        for slot in 0..DROP_SLOTS {
            let Ok(per_cpu) = self.drops.get(&slot, 0) else {
                continue;
            };
            let total: u64 = per_cpu.iter().sum();
            let kind = (slot / DropReason::COUNT) as usize;
            let reason = (slot % DropReason::COUNT) as usize;
            drops[kind][reason] = total;
        }
        drops
    }
}

fn take(ring: &mut RingBuf<MapData>, records: &mut Vec<Vec<u8>>) -> usize {
    let mut read = 0;
    while read < BATCH {
        let Some(item) = ring.next() else {
            break;
        };
        records.push(item.to_vec());
        read += 1;
    }
    read
}

/// The kernel's LRU table of source MACs by source address
/// (`ntm_common::names::MACS`), filled when a flow takes a cache slot.
pub struct LearntMacs {
    map: HashMap<MapData, MacKey, MacValue>,
}

impl LearntMacs {
    pub(crate) fn share_from(ebpf: &Ebpf) -> Result<Self, ObserverError> {
        let map = share_map(ebpf, names::MACS).map_err(|source| ObserverError::Map {
            map: names::MACS,
            source,
        })?;
        let map = HashMap::try_from(map).map_err(|source| ObserverError::Map {
            map: names::MACS,
            source,
        })?;
        Ok(Self { map })
    }

    /// The MAC frames from `ip` came from last, if the table has it.
    pub fn lookup(&self, ip: IpAddr) -> Option<[u8; 6]> {
        let mut key = MacKey::default();
        match ip {
            IpAddr::V4(v4) => {
                key.addr[..4].copy_from_slice(&v4.octets());
                key.family = family::IPV4;
            }
            IpAddr::V6(v6) => {
                key.addr = v6.octets();
                key.family = family::IPV6;
            }
        }
        self.map.get(&key, 0).ok().map(|value| value.mac)
    }

    /// Every (address, MAC) in the table now (at most
    /// `observe::MAC_ENTRIES`).
    pub fn read(&self) -> Vec<(IpAddr, [u8; 6])> {
        self.map
            .iter()
            .filter_map(Result::ok)
            .filter_map(|(key, value)| {
                let ip = match key.family {
                    family::IPV4 => {
                        let a = key.addr;
                        IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3]))
                    }
                    family::IPV6 => IpAddr::V6(Ipv6Addr::from(key.addr)),
                    _ => return None,
                };
                Some((ip, value.mac))
            })
            .collect()
    }
}
