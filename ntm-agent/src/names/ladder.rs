//! The naming ladder: the sources of host names, asked in order, highest
//! rung first, until one names the address. Each source is one file of
//! this room implementing [`NameSource`]; [`ladder`] is the ordered list,
//! the one place their order is decided:
//!
//! 1. files (`files.rs`): hosts and ethers files, then DHCP lease files;
//! 2. containers on this host (`containers.rs`);
//! 3. the wire (`observed.rs`): the host name a device's DHCP client sent,
//!    then the name a peer asked DNS for;
//! 4. reverse DNS (`resolver.rs`), which a new flow waits for (bounded);
//!
//! and where none names it, the address itself.
//!
//! A new source is a new file with its `impl NameSource`, a line in
//! [`ladder`] and its options in [`NameOptions`].

use std::{net::IpAddr, time::Instant};

use prometheus::IntCounterVec;

use super::{
    NameOptions,
    containers::ContainerNames,
    files::{NameFiles, Source},
    observed::{ObservedNames, TableSizes},
    resolver::ReverseDns,
    wire::Fact,
};
use crate::model::net::Mac;

/// What a source is asked: the name of `ip`, as seen by `peer` (two
/// clients may know one server by two names).
#[derive(Clone, Copy, Debug)]
pub struct Query {
    pub ip: IpAddr,
    pub peer: IpAddr,
    /// The MAC `ip` is at, when known (names by MAC follow a device across
    /// its addresses).
    pub mac: Option<Mac>,
    /// When the flow asking was first seen: a source that waits for an
    /// answer waits at most `--name-wait` from then.
    pub first_seen: Instant,
    pub now: Instant,
}

/// A source's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// The name, and where it came from (the `source` label).
    Name(String, Source),
    /// No name yet, but one is on its way: the flow waits (the lower rungs
    /// are not asked, so that a name arriving a moment later does not split
    /// the flow's series).
    Wait,
    /// Nothing here: ask the next rung.
    Next,
}

/// One rung of the ladder. Everything it holds is bounded; whatever comes
/// from the network has been parsed and checked before it gets here.
pub trait NameSource: Send {
    /// The name of `query.ip`, if this source has one.
    fn name(&mut self, query: &Query) -> Lookup;

    /// Once per drain: read again what changed (files).
    fn refresh(&mut self) {}

    /// What a DNS or DHCP message on the wire said.
    fn learn(&mut self, _fact: &Fact, _now: Instant) {}

    /// Forget what is out of date (answers past their TTL).
    fn expire(&mut self, _now: Instant) {}

    /// The MAC the device at `ip` was given its lease for, if this source
    /// knows leases.
    fn leased_mac(&self, _ip: IpAddr) -> Option<Mac> {
        None
    }

    /// Whether this source names devices by MAC now: then the neighbour
    /// table is worth reading for new addresses.
    fn names_macs(&self) -> bool {
        false
    }

    /// Adds the entries of this source's tables to `sizes`
    /// (`<prefix>_observed_names{table}`).
    fn table_sizes(&self, _sizes: &mut TableSizes) {}
}

/// The ladder, highest rung first, of the sources `options` asks for.
/// `lookups` counts reverse DNS lookups by result. Containers are asked
/// only inside a tokio runtime (their engines are polled on a task of it).
pub fn ladder(options: &NameOptions, lookups: IntCounterVec) -> Vec<Box<dyn NameSource>> {
    let mut ladder: Vec<Box<dyn NameSource>> = vec![Box::new(NameFiles::open(
        &options.hosts_files,
        &options.ethers_files,
        &options.lease_files,
    ))];
    if let Some(sockets) = &options.container_sockets {
        ladder.push(Box::new(ContainerNames::spawn(sockets.clone())));
    }
    ladder.push(Box::new(ObservedNames::new(options.answer_min_ttl)));
    if let Some(reverse_dns) = ReverseDns::start(options, lookups) {
        ladder.push(Box::new(reverse_dns));
    }
    ladder
}
