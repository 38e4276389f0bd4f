//! What a name source is: the trait every rung of the naming ladder
//! implements ([`NameSource`]), what it is asked ([`Query`]) and answers
//! ([`Lookup`]) and where a label came from ([`Source`]). The ladder
//! itself, the ordered list of sources, is in `ladder.rs`.

use std::{net::IpAddr, time::Instant};

use super::wire::Fact;
use crate::model::net::Mac;

/// Where a host's label came from: the `source` of `ntm_names`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Source {
    /// A hosts file (`--hosts-file`).
    Static,
    /// A container on this host (Docker or Podman).
    Container,
    /// A pod on this Kubernetes node, or the node itself, from the
    /// container runtime's CRI.
    Kubernetes,
    /// This host's own address, named by its host name.
    ThisHost,
    /// DHCP: the name the device sent, from a lease file (`--leases`) or
    /// its messages on the wire.
    Dhcp,
    /// A DNS answer on the wire: the name the peer asked for.
    DnsAnswer,
    /// The server name (SNI) in a TLS ClientHello the peer sent.
    TlsSni,
    /// The server name in the ClientHello of a QUIC Initial the peer sent.
    QuicSni,
    /// The server name of an ECH outer ClientHello (TLS or QUIC): the
    /// provider's public name, the site's being encrypted.
    TlsEchOuter,
    /// Reverse DNS.
    ReverseDns,
    /// No name: the address itself.
    Address,
}

impl Source {
    pub const ALL: [Source; 11] = [
        Source::Static,
        Source::Container,
        Source::Kubernetes,
        Source::ThisHost,
        Source::Dhcp,
        Source::DnsAnswer,
        Source::TlsSni,
        Source::QuicSni,
        Source::TlsEchOuter,
        Source::ReverseDns,
        Source::Address,
    ];

    /// Whether the name is one a client asked for (a server's): then a
    /// remote host is labelled by its registrable domain (unless
    /// `--fqdn`), not by each of its many host names. Names a user or a
    /// device gave are kept whole.
    pub fn names_a_server(self) -> bool {
        matches!(
            self,
            Source::DnsAnswer
                | Source::TlsSni
                | Source::QuicSni
                | Source::TlsEchOuter
                | Source::ReverseDns
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Source::Static => "static",
            Source::Container => "container",
            Source::Kubernetes => "kubernetes",
            Source::ThisHost => "this_host",
            Source::Dhcp => "dhcp",
            Source::DnsAnswer => "dns_answer",
            Source::TlsSni => "tls_sni",
            Source::QuicSni => "quic_sni",
            Source::TlsEchOuter => "tls_ech_outer",
            Source::ReverseDns => "reverse_dns",
            Source::Address => "address",
        }
    }
}

/// What a source is asked: the name of `ip`, as seen by `peer` (two
/// clients may know one server by two names).
#[derive(Clone, Copy, Debug)]
pub struct Query {
    pub ip: IpAddr,
    pub peer: IpAddr,
    /// The MAC `ip` is at, when known (names by MAC follow a device across
    /// its addresses).
    pub mac: Option<Mac>,
    /// Whether `ip` is the server of a TCP or UDP flow: its client's
    /// handshake (a ClientHello, a round trip after the flow's first
    /// frame; a QUIC Initial) may name it, so the flow waits for it a
    /// moment.
    pub server: bool,
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

    /// What a DNS or DHCP message, or a handshake, on the wire said.
    fn learn(&mut self, _fact: &Fact, _now: Instant) {}

    /// Forget what is out of date (answers past their TTL).
    fn expire(&mut self, _now: Instant) {}

    /// Addresses whose name this source gave, withdrew or changed since it
    /// was last asked (a pod gone, a new pod on a reused address): their
    /// labels, sticky for a series' life otherwise, are decided again.
    fn renamed(&mut self) -> Vec<IpAddr> {
        Vec::new()
    }

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

/// Entries of each table, for `<prefix>_observed_names{table}`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableSizes {
    pub answers: usize,
    pub clients: usize,
    pub leases: usize,
    /// Containers known by address (`containers.rs`).
    pub containers: usize,
    /// Pod sandboxes on this node (`kubernetes/`).
    pub pods: usize,
}
