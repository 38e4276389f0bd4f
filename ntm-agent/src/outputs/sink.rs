//! What every output receives: one interface for all of them, so that an
//! output is one more [`Sink`] in the list `agent::pipeline` wires, and
//! knows nothing of the others.
//!
//! A drain reaches each sink twice: first as the kernel's raw flow deltas
//! ([`Sink::raw`], for outputs that need no names, such as flow export),
//! then as labelled deltas ([`Sink::labelled`]: the flows whose hosts'
//! names are decided, with their labels, and the traffic the flow table had
//! no room for). A sink does its work off the drain path where it is slow
//! (the history commits on a thread of its own).

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use ntm_common::{Counters, FlowKey, Hook};

use crate::{kernel::drain::Drained, model::net::Mac};

/// One flow's delta with its labels.
///
/// The labels are shared strings: a host's label is the one the names
/// hold (and the traffic series and `host_info` keep), an interface's and a
/// service's one per drain, so that a drain of 100k flows copies no label
/// text (owned strings here cost an agent 10 to 17 MiB at 100k series).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabelledFlow {
    pub key: FlowKey,
    /// Its interface's label (see `kernel::iface_label`).
    pub iface: Arc<str>,
    /// Its hosts' labels; empty when host labels are off (then a host is
    /// its address).
    pub src: Arc<str>,
    pub dst: Arc<str>,
    pub service: Arc<str>,
    pub delta: Counters,
}

/// Traffic that found no room in the kernel's flow table: only its
/// interface and the hook that saw it are known.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Overflow {
    pub iface: String,
    pub hook: Hook,
    pub delta: Counters,
}

/// A count of one TCP connection's in a drain interval (the segments it
/// retransmitted, the SYNs it sent again), its client and server named as
/// in the traffic series.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabelledConnectionCount {
    pub client: Arc<str>,
    pub server: Arc<str>,
    pub service: Arc<str>,
    pub count: u64,
}

/// A TCP handshake that ended in a drain interval (or a SYN left
/// unanswered), its client and server named as in the traffic series.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabelledHandshake {
    pub client: Arc<str>,
    pub server: Arc<str>,
    pub service: Arc<str>,
    pub outcome: crate::kernel::handshakes::Outcome,
}

/// One drain's labelled deltas.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabelledDrain {
    pub flows: Vec<LabelledFlow>,
    pub overflow: Vec<Overflow>,
    /// Segments retransmitted, by connection.
    pub retransmits: Vec<LabelledConnectionCount>,
    pub handshakes: Vec<LabelledHandshake>,
    /// SYNs sent again, by connection.
    pub syn_retries: Vec<LabelledConnectionCount>,
}

/// A host in labels now, as the names know it.
#[derive(Clone, Debug)]
pub struct Host {
    pub ip: IpAddr,
    /// The label its series show (the names' own string, shared).
    pub label: Arc<str>,
    /// The rung of the naming ladder the label came from.
    pub source: &'static str,
    pub mac: Option<Mac>,
}

/// An output.
pub trait Sink: Send {
    /// A drain's flow deltas as the kernel counted them, before any name,
    /// with the interfaces' labels by index.
    fn raw(&mut self, _drained: &Drained, _ifaces: &HashMap<u32, String>, _now: Instant) {}

    /// A drain's labelled deltas.
    fn labelled(&mut self, _drain: &LabelledDrain, _now: Instant) {}

    /// Whether the sink wants the hosts in labels again: they changed
    /// (`version` is new), or the sink's own use of them did.
    fn wants_hosts(&self, _version: u64) -> bool {
        false
    }

    /// The hosts in labels now, at `version` (asked for by
    /// [`Sink::wants_hosts`]).
    fn describe_hosts(&mut self, _version: u64, _hosts: &[Host]) {}

    /// Drops what saw no traffic for `ttl`.
    fn expire(&mut self, _now: Instant, _ttl: Duration) {}

    /// After the last drain: write out what is pending.
    fn finish(&mut self) {}
}
