//! Host names for the `src`/`dst` labels, from the naming ladder (see
//! [`ladder`]: its sources, in order), and labels that never change during
//! a series' life.
//!
//! No source makes the drain loop wait: slow ones (reverse DNS, container
//! engines) work on threads or tasks of their own and the ladder reads
//! their tables. A flow whose host has no answer yet waits (a bounded time,
//! `--name-wait`) before it is first exported, so that a name arriving a
//! moment later does not split its counter into an address series and a
//! name series. Once an address's label is decided it is kept while it is
//! in use ("sticky").

pub mod containers;
pub mod dns_tcp;
pub mod files;
pub mod hello;
pub mod kubernetes;
pub mod ladder;
pub mod observed;
pub mod reassembly;
pub mod resolver;
pub mod source;
pub mod this_host;
pub mod wire;

use std::{
    collections::HashMap,
    net::IpAddr,
    num::NonZeroUsize,
    sync::Arc,
    time::{Duration, Instant},
};

use lru::LruCache;

use ntm_common::FlowKey;
use prometheus::{IntCounterVec, IntGaugeVec};

use self::{
    resolver::Upstream,
    source::{Lookup, NameSource, Query, Source, TableSizes},
    wire::Fact,
};
use crate::{
    health::self_metrics::KubernetesMetrics,
    model::net::{LocalNet, LocalNets, Mac, Place},
};

#[derive(Clone, Debug)]
pub struct NameOptions {
    /// Where reverse lookups go; None: addresses only (`--numeric`).
    pub upstream: Option<Upstream>,
    pub timeout: Duration,
    pub workers: usize,
    /// Lookups waiting for a worker; beyond it new ones are dropped (and the
    /// address shown).
    pub queue: usize,
    /// Keep remote hosts' full names instead of their registrable domain.
    pub fqdn: bool,
    /// How long a new flow waits for its hosts' names before it is exported
    /// with addresses.
    pub wait: Duration,
    /// `/etc/hosts`-style files, the top rung (`--hosts-file`).
    pub hosts_files: Vec<std::path::PathBuf>,
    /// `/etc/ethers`-style files: names by MAC (`--ethers-file`).
    pub ethers_files: Vec<std::path::PathBuf>,
    /// DHCP lease files in dnsmasq's format (`--leases`).
    pub lease_files: Vec<std::path::PathBuf>,
    /// Shortest time an observed DNS answer names its addresses.
    pub answer_min_ttl: Duration,
    /// Whether the kernel hands over TLS ClientHellos and QUIC Initials
    /// (not `--no-observe-tls`): then a new flow waits a moment for its
    /// server's name from its client's handshake.
    pub handshake_names: bool,
    /// The container engines' API sockets (the default ones if empty);
    /// None: containers are not asked.
    pub container_sockets: Option<Vec<std::path::PathBuf>>,
    /// The Kubernetes rung (the node's container runtime); None: off.
    pub kubernetes: Option<kubernetes::KubernetesOptions>,
    /// This host's addresses, named by its host name (the agent keeps
    /// them up to date); None: off.
    pub own_addresses: Option<this_host::OwnAddresses>,
}

/// What the name sources count and export.
#[derive(Clone)]
pub struct NameMetrics {
    /// Reverse DNS lookups by result.
    pub lookups: IntCounterVec,
    /// Addresses labelled now, by source (`<prefix>_names{source}`).
    pub by_source: IntGaugeVec,
    pub kubernetes: KubernetesMetrics,
}

#[cfg(test)]
impl NameOptions {
    /// No name sources at all, a 2 s wait: what unit tests start from.
    pub(crate) fn addresses_only() -> Self {
        Self {
            upstream: None,
            timeout: Duration::from_secs(1),
            workers: 1,
            queue: 16,
            fqdn: false,
            wait: Duration::from_secs(2),
            hosts_files: Vec::new(),
            ethers_files: Vec::new(),
            lease_files: Vec::new(),
            answer_min_ttl: Duration::from_secs(60),
            handshake_names: false,
            container_sockets: None,
            kubernetes: None,
            own_addresses: None,
        }
    }
}

struct Sticky {
    /// Shared with `hosts` and with every flow, series and `host_info` row
    /// that shows it: one copy of each label.
    label: Arc<str>,
    last_used: Instant,
    /// Whether the address was local when its label was decided (a local
    /// host's name is kept whole and may come from its MAC; a remote one's
    /// is cut to its domain).
    local: bool,
}

/// Decides and remembers the host label of each address, as seen from
/// each peer (two clients may know one server by two names).
pub struct HostLabels {
    /// Whether src or dst are labels at all (else nothing is resolved).
    wanted: bool,
    /// The name sources, highest rung first (see [`ladder::ladder`]).
    ladder: Vec<Box<dyn NameSource>>,
    local: LocalNets,
    /// The local networks when sticky labels were last checked against
    /// them.
    local_seen: Arc<Vec<LocalNet>>,
    fqdn: bool,
    /// The Kubernetes cluster's DNS domain, with the Kubernetes rung on:
    /// its Service names label ClusterIPs as SERVICE.NAMESPACE.
    cluster_domain: Option<String>,
    wait: Duration,
    /// Decided labels by (address, peer), least recently used first out
    /// when full.
    sticky: LruCache<(IpAddr, IpAddr), Sticky>,
    /// Which MAC address uses which IP address (the neighbour table).
    neighbours: HashMap<IpAddr, Mac>,
    /// Asks the kernel's table of source MACs by address (learnt from
    /// frames) about one address.
    mac_lookup: Option<MacLookup>,
    /// What it said, until the neighbour table is read again, with how
    /// many addresses each MAC has (a router's has many).
    learnt_macs: HashMap<IpAddr, Mac>,
    addresses_per_mac: HashMap<Mac, usize>,
    /// The hosts (address and label) that sticky labels hold now, with
    /// how many (address, peer) entries hold each.
    hosts: HashMap<(IpAddr, Arc<str>), (Source, usize)>,
    /// The label of a flow without hosts (labels off, non-IP frames).
    empty: Arc<str>,
    /// Bumped whenever `hosts` gains or loses one.
    hosts_changed: u64,
    /// Addresses labelled now, by source (`<prefix>_names{source}`).
    by_source: Option<IntGaugeVec>,
}

/// Addresses whose label is remembered at most. Past it the least recently
/// used is forgotten (should it come back while its series lives, its label
/// is decided again, the same way unless a name source changed).
pub const MAX_STICKY: NonZeroUsize = NonZeroUsize::new(262_144).expect("not zero");

/// Asks for the MAC frames from an address came from.
pub type MacLookup = Box<dyn FnMut(IpAddr) -> Option<Mac> + Send>;

/// Neighbour entries kept at most (a /16 of devices).
pub const MAX_NEIGHBOURS: usize = 65_536;

/// Addresses one device plausibly uses (an IPv4 lease, link-local, SLAAC
/// and a week of daily privacy addresses); a MAC seen sending from more is
/// a router's, forwarding for the addresses behind it, and names none.
pub const MAX_ADDRESSES_PER_DEVICE: usize = 64;

impl HostLabels {
    /// Builds the ladder of name sources (reading the name files, starting
    /// the resolver), when names are wanted.
    pub fn start(
        wanted: bool,
        local: LocalNets,
        options: &NameOptions,
        metrics: NameMetrics,
    ) -> Self {
        let by_source = metrics.by_source.clone();
        let ladder = if wanted {
            ladder::ladder(options, metrics)
        } else {
            Vec::new()
        };
        let mut labels = Self::new(wanted, ladder, local, options);
        for source in Source::ALL {
            by_source.with_label_values(&[source.as_str()]).set(0);
        }
        labels.by_source = Some(by_source);
        labels
    }

    fn new(
        wanted: bool,
        ladder: Vec<Box<dyn NameSource>>,
        local: LocalNets,
        options: &NameOptions,
    ) -> Self {
        Self {
            wanted,
            ladder,
            local_seen: local.list(),
            local,
            fqdn: options.fqdn,
            cluster_domain: options
                .kubernetes
                .as_ref()
                .map(|k| k.cluster_domain.clone()),
            wait: options.wait,
            sticky: LruCache::new(MAX_STICKY),
            neighbours: HashMap::new(),
            mac_lookup: None,
            learnt_macs: HashMap::new(),
            addresses_per_mac: HashMap::new(),
            hosts: HashMap::new(),
            empty: Arc::from(""),
            hosts_changed: 0,
            by_source: None,
        }
    }

    /// Whether a name could come from a MAC address: then the caller keeps
    /// [`HostLabels::set_neighbours`] fresh.
    pub fn wants_neighbours(&self) -> bool {
        self.wanted && self.ladder.iter().any(|source| source.names_macs())
    }

    /// Keeps what a DNS or DHCP message on the wire said.
    pub fn learn(&mut self, fact: &Fact, now: Instant) {
        for source in &mut self.ladder {
            source.learn(fact, now);
        }
    }

    /// Entries of the sources' tables (names learnt from the wire,
    /// containers).
    pub fn table_sizes(&self) -> TableSizes {
        let mut sizes = TableSizes::default();
        for source in &self.ladder {
            source.table_sizes(&mut sizes);
        }
        sizes
    }

    /// The neighbour table now (IP to MAC), at most [`MAX_NEIGHBOURS`].
    pub fn set_neighbours(&mut self, entries: impl IntoIterator<Item = (IpAddr, Mac)>) {
        self.neighbours = entries.into_iter().take(MAX_NEIGHBOURS).collect();
        // Frames' MACs are asked again from now on (a device may have
        // moved); the counts per MAC start over with them.
        self.learnt_macs.clear();
        self.addresses_per_mac.clear();
    }

    /// Where MACs learnt from frames come from (the agent: the kernel's
    /// table, one lookup per address).
    pub fn look_up_macs_with(&mut self, lookup: MacLookup) {
        self.mac_lookup = Some(lookup);
    }

    /// The MAC an address is at: the neighbour table's; else, for a local
    /// address (in `--local-net`), the one its frames came from, unless
    /// that MAC sends from more than [`MAX_ADDRESSES_PER_DEVICE`]
    /// addresses (a router's); else the one its DHCP lease was given to.
    /// Remote addresses never take a frame's MAC: theirs is the router's.
    fn mac_of(&mut self, ip: IpAddr) -> Option<Mac> {
        // A group address is no device's (the neighbour table maps them to
        // multicast MACs).
        if ip.is_multicast() || ip.is_unspecified() {
            return None;
        }
        if let Some(mac) = self.neighbours.get(&ip) {
            return Some(*mac);
        }
        if self.local.place(ip) == Place::Local {
            let learnt = match self.learnt_macs.get(&ip) {
                Some(mac) => Some(*mac),
                None => self.look_up_mac(ip),
            };
            if let Some(mac) = learnt
                && self.addresses_per_mac.get(&mac).copied().unwrap_or(0)
                    <= MAX_ADDRESSES_PER_DEVICE
            {
                return Some(mac);
            }
        }
        self.leased_mac(ip)
    }

    fn leased_mac(&self, ip: IpAddr) -> Option<Mac> {
        self.ladder.iter().find_map(|source| source.leased_mac(ip))
    }

    fn look_up_mac(&mut self, ip: IpAddr) -> Option<Mac> {
        let mac = (self.mac_lookup.as_mut()?)(ip)?;
        if self.learnt_macs.len() < MAX_NEIGHBOURS {
            self.learnt_macs.insert(ip, mac);
            *self.addresses_per_mac.entry(mac).or_default() += 1;
        }
        Some(mac)
    }

    /// The MAC an address is known at, without asking the kernel.
    fn known_mac(&self, ip: IpAddr) -> Option<Mac> {
        if ip.is_multicast() {
            return None;
        }
        self.neighbours
            .get(&ip)
            .or_else(|| self.learnt_macs.get(&ip))
            .copied()
            .or_else(|| self.leased_mac(ip))
    }

    /// Re-reads the name files that changed (cheap when none did), and
    /// forgets the labels of addresses a source renamed, or that became
    /// local or remote since (the local networks changed).
    pub fn refresh(&mut self) {
        let mut renamed = std::collections::HashSet::new();
        for source in &mut self.ladder {
            source.refresh();
            renamed.extend(source.renamed());
        }
        let nets = self.local.list();
        if !Arc::ptr_eq(&nets, &self.local_seen) {
            self.local_seen = nets;
            renamed.extend(
                self.sticky
                    .iter()
                    .filter(|((ip, _), sticky)| {
                        sticky.local != (self.local.place(*ip) == Place::Local)
                    })
                    .map(|((ip, _), _)| *ip),
            );
        }
        if !renamed.is_empty() {
            self.forget(&renamed);
        }
    }

    /// Drops the sticky labels of `addresses`: their next flows are
    /// labelled afresh, into series of their own (the old series keep what
    /// they counted, and expire when idle).
    fn forget(&mut self, addresses: &std::collections::HashSet<IpAddr>) {
        let keys: Vec<(IpAddr, IpAddr)> = self
            .sticky
            .iter()
            .map(|(key, _)| *key)
            .filter(|(ip, _)| addresses.contains(ip))
            .collect();
        for key in keys {
            if let Some(sticky) = self.sticky.pop(&key) {
                self.release(key.0, sticky);
            }
        }
    }

    /// How long a new flow waits for its names at most.
    pub fn wait(&self) -> Duration {
        self.wait
    }

    /// (src, dst) labels of a flow first seen at `first_seen`, or None while
    /// a name is still awaited. Empty when neither label is wanted, and for
    /// non-IP frames, which have no hosts.
    pub fn flow_labels(
        &mut self,
        key: &FlowKey,
        first_seen: Instant,
        now: Instant,
    ) -> Option<(Arc<str>, Arc<str>)> {
        if !self.wanted {
            return Some((Arc::clone(&self.empty), Arc::clone(&self.empty)));
        }
        match (key.src_addr(), key.dst_addr()) {
            (Some(src), Some(dst)) => {
                // The server of a TCP or UDP flow: the side of its service
                // port.
                let ported =
                    key.proto == ntm_common::ipproto::TCP || key.proto == ntm_common::ipproto::UDP;
                let src_serves = key.flags & ntm_common::key_flags::SERVICE_PORT_IS_SRC != 0;
                let src_label = self.label_of(src, dst, ported && src_serves, first_seen, now);
                let dst_label = self.label_of(dst, src, ported && !src_serves, first_seen, now);
                Some((src_label?, dst_label?))
            }
            _ => Some((Arc::clone(&self.empty), Arc::clone(&self.empty))),
        }
    }

    /// The label of `ip` in a flow with `peer` first seen at `first_seen`,
    /// or None if the flow should wait for a name a little longer.
    pub fn label(
        &mut self,
        ip: IpAddr,
        peer: IpAddr,
        first_seen: Instant,
        now: Instant,
    ) -> Option<Arc<str>> {
        self.label_of(ip, peer, false, first_seen, now)
    }

    /// [`Self::label`] of `ip`, the server of its flow if `server` (see
    /// [`Query::server`]).
    fn label_of(
        &mut self,
        ip: IpAddr,
        peer: IpAddr,
        server: bool,
        first_seen: Instant,
        now: Instant,
    ) -> Option<Arc<str>> {
        if let Some(s) = self.sticky.get_mut(&(ip, peer)) {
            s.last_used = now;
            return Some(Arc::clone(&s.label));
        }
        let (label, source) = self.decide(ip, peer, server, first_seen, now)?;
        let label = self.hold(ip, label, source);
        let sticky = Sticky {
            label: Arc::clone(&label),
            last_used: now,
            local: self.local.place(ip) == Place::Local,
        };
        if let Some(((evicted_ip, _), evicted)) = self.sticky.push((ip, peer), sticky) {
            self.release(evicted_ip, evicted);
        }
        Some(label)
    }

    /// Holds the host (`ip`, `label`) once more; returns its label as held
    /// (the copy every peer that knows `ip` by that label shares).
    fn hold(&mut self, ip: IpAddr, label: String, source: Source) -> Arc<str> {
        use std::collections::hash_map::Entry;
        let (label, first) = match self.hosts.entry((ip, Arc::from(label))) {
            Entry::Occupied(mut held) => {
                held.get_mut().1 += 1;
                (Arc::clone(&held.key().1), false)
            }
            Entry::Vacant(new) => {
                let label = Arc::clone(&new.key().1);
                new.insert((source, 1));
                (label, true)
            }
        };
        if first {
            self.hosts_changed += 1;
            self.count(source, 1);
        }
        label
    }

    fn release(&mut self, ip: IpAddr, sticky: Sticky) {
        let key = (ip, sticky.label);
        if let Some(held) = self.hosts.get_mut(&key) {
            held.1 -= 1;
            if held.1 == 0 {
                // Counted under the source it was first held with (two
                // peers may have reached one label by two rungs).
                let source = held.0;
                self.hosts.remove(&key);
                self.hosts_changed += 1;
                self.count(source, -1);
            }
        }
    }

    /// The hosts in labels now: address, label, where the label came
    /// from, and the MAC the address is at if known.
    pub fn hosts(&self) -> impl Iterator<Item = (IpAddr, &Arc<str>, Source, Option<Mac>)> {
        self.hosts
            .iter()
            .map(|((ip, label), (source, _))| (*ip, label, *source, self.known_mac(*ip)))
    }

    /// Changes whenever a host enters or leaves the labels.
    pub fn hosts_version(&self) -> u64 {
        self.hosts_changed
    }

    /// Climbs the ladder, highest rung first, to the first source that
    /// names `ip` (the address itself where none does); None: wait for a
    /// name on its way.
    fn decide(
        &mut self,
        ip: IpAddr,
        peer: IpAddr,
        server: bool,
        first_seen: Instant,
        now: Instant,
    ) -> Option<(String, Source)> {
        let query = Query {
            ip,
            peer,
            mac: self.mac_of(ip),
            server,
            first_seen,
            now,
        };
        for source in &mut self.ladder {
            match source.name(&query) {
                Lookup::Name(name, source) if source.names_a_server() => {
                    return Some((self.name_label(ip, name), source));
                }
                // A name the user or the device gave is the device's own:
                // whole.
                Lookup::Name(name, source) => return Some((name, source)),
                Lookup::Wait => return None,
                Lookup::Next => {}
            }
        }
        Some((ip.to_string(), Source::Address))
    }

    fn count(&self, source: Source, delta: i64) {
        if let Some(gauge) = &self.by_source {
            gauge.with_label_values(&[source.as_str()]).add(delta);
        }
    }

    /// Local hosts keep their whole name (it is the device's identity);
    /// remote hosts collapse to their registrable domain unless --fqdn.
    /// A Kubernetes Service's name is SERVICE.NAMESPACE, wherever it is.
    fn name_label(&self, ip: IpAddr, name: String) -> String {
        if let Some(service) = self
            .cluster_domain
            .as_deref()
            .and_then(|domain| kubernetes::service_label(&name, domain))
        {
            return service;
        }
        if self.fqdn || self.local.contains(ip) {
            return name;
        }
        match psl::domain_str(&name) {
            Some(domain) => domain.to_string(),
            None => name,
        }
    }

    /// Forgets labels not used for `ttl` (their series have expired too),
    /// and answers whose TTL is over.
    pub fn expire(&mut self, now: Instant, ttl: Duration) {
        for source in &mut self.ladder {
            source.expire(now);
        }
        // Least recently used first: the expired ones are at that end.
        while let Some((_, s)) = self.sticky.peek_lru() {
            if now.duration_since(s.last_used) <= ttl {
                break;
            }
            if let Some(((ip, _), s)) = self.sticky.pop_lru() {
                self.release(ip, s);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> NameOptions {
        NameOptions::addresses_only()
    }

    fn local() -> LocalNets {
        LocalNets::given(vec!["192.168.0.0/16".parse().unwrap()])
    }

    #[test]
    fn registrable_domains_for_remote_hosts_whole_names_for_local_ones() {
        let h = HostLabels::new(true, Vec::new(), local(), &options());
        let remote: IpAddr = "93.184.216.34".parse().unwrap();
        let lan: IpAddr = "192.168.1.5".parse().unwrap();
        assert_eq!(h.name_label(remote, "news.bbc.co.uk".into()), "bbc.co.uk");
        assert_eq!(h.name_label(remote, "a.b.1e100.net".into()), "1e100.net");
        assert_eq!(
            h.name_label(lan, "laptop.home.arpa".into()),
            "laptop.home.arpa"
        );
        let fqdn = HostLabels::new(
            true,
            Vec::new(),
            local(),
            &NameOptions {
                fqdn: true,
                ..options()
            },
        );
        assert_eq!(
            fqdn.name_label(remote, "news.bbc.co.uk".into()),
            "news.bbc.co.uk"
        );
    }

    #[test]
    fn kubernetes_service_names_are_service_dot_namespace_local_or_remote() {
        let on = NameOptions {
            kubernetes: Some(kubernetes::KubernetesOptions {
                sockets: Vec::new(),
                names: kubernetes::PodNames::Workload,
                node: "node-a".into(),
                cluster_domain: "cluster.local".into(),
            }),
            ..options()
        };
        let h = HostLabels::new(true, Vec::new(), local(), &on);
        let cluster_ip: IpAddr = "93.184.216.34".parse().unwrap();
        let lan: IpAddr = "192.168.1.5".parse().unwrap();
        for ip in [cluster_ip, lan] {
            assert_eq!(
                h.name_label(ip, "web.shop.svc.cluster.local".into()),
                "web.shop"
            );
        }
        assert_eq!(
            h.name_label(cluster_ip, "news.bbc.co.uk".into()),
            "bbc.co.uk"
        );
        // Without the Kubernetes rung, such a name is like any other.
        let off = HostLabels::new(true, Vec::new(), local(), &options());
        assert_eq!(
            off.name_label(lan, "web.shop.svc.cluster.local".into()),
            "web.shop.svc.cluster.local"
        );
    }

    /// Names any address whose MAC is known "phone".
    struct ByMac;

    impl NameSource for ByMac {
        fn name(&mut self, query: &source::Query) -> source::Lookup {
            match query.mac {
                Some(_) => source::Lookup::Name("phone".into(), Source::Dhcp),
                None => source::Lookup::Next,
            }
        }
    }

    #[test]
    fn labels_are_decided_again_when_an_address_becomes_local() {
        let local = LocalNets::learnt();
        let mut h = HostLabels::new(true, vec![Box::new(ByMac)], local.clone(), &options());
        h.look_up_macs_with(Box::new(|_| Some([2, 0, 0, 0, 0, 7])));
        let now = Instant::now();
        let ip: IpAddr = "2001:2:0:61::5".parse().unwrap();
        let peer: IpAddr = "2001:2:0:ff::2".parse().unwrap();
        // Outside the local networks: a remote host never takes a frame's
        // MAC, and the label sticks.
        assert_eq!(h.label(ip, peer, now, now), Some("2001:2:0:61::5".into()));
        h.refresh();
        assert_eq!(h.label(ip, peer, now, now), Some("2001:2:0:61::5".into()));
        // The host's new prefix: the address is a device's now.
        assert!(local.set(vec![crate::model::net::LocalNet {
            net: "2001:2:0:61::/64".parse().unwrap(),
            origin: crate::model::net::Origin::Interface("br-lan".into()),
        }]));
        h.refresh();
        assert_eq!(h.label(ip, peer, now, now), Some("phone".into()));
    }

    #[test]
    fn without_a_resolver_labels_are_addresses_at_once() {
        let mut h = HostLabels::new(true, Vec::new(), local(), &options());
        let now = Instant::now();
        let ip: IpAddr = "2001:2::1".parse().unwrap();
        let peer: IpAddr = "2001:2::2".parse().unwrap();
        assert_eq!(h.label(ip, peer, now, now), Some("2001:2::1".into()));
    }

    #[test]
    fn expiry_goes_least_recently_used_first_and_the_counts_follow() {
        let gauge = IntGaugeVec::new(prometheus::Opts::new("names", "h"), &["source"]).unwrap();
        let mut h = HostLabels::new(true, Vec::new(), local(), &options());
        h.by_source = Some(gauge.clone());
        let t0 = Instant::now();
        let ip = |last: u8| IpAddr::from([198, 18, 0, last]);
        let peer = ip(100);
        for last in 1..=3 {
            h.label(ip(last), peer, t0, t0 + Duration::from_secs(last.into()));
        }
        // Used again: now the most recent.
        h.label(ip(1), peer, t0, t0 + Duration::from_secs(10));
        let addresses = || gauge.with_label_values(&["address"]).get();
        assert_eq!(addresses(), 3);
        h.expire(t0 + Duration::from_secs(14), Duration::from_secs(10));
        assert_eq!(h.sticky.len(), 1, "2 and 3 idle for over 10 s");
        assert!(h.sticky.contains(&(ip(1), peer)));
        assert_eq!(addresses(), 1);
    }

    #[test]
    fn frames_macs_name_local_addresses_only_and_never_a_routers() {
        let mut h = HostLabels::new(true, Vec::new(), local(), &options());
        let device = [2, 0, 0, 0, 0, 7];
        let router = [2, 0, 0, 0, 0, 1];
        h.look_up_macs_with(Box::new(move |ip: IpAddr| match ip {
            IpAddr::V4(v4) if v4.octets()[2] == 1 => Some(device),
            _ => Some(router),
        }));
        assert_eq!(h.mac_of("192.168.1.7".parse().unwrap()), Some(device));
        assert_eq!(
            h.mac_of("93.184.0.1".parse().unwrap()),
            None,
            "a remote address's frames come from the router"
        );
        // A local MAC that sends from many addresses is a router's too.
        for i in 0..=MAX_ADDRESSES_PER_DEVICE as u8 {
            h.mac_of(IpAddr::from([192, 168, 2, i]));
        }
        assert_eq!(h.mac_of("192.168.2.200".parse().unwrap()), None);
        assert_eq!(h.mac_of("192.168.1.8".parse().unwrap()), Some(device));
        // The neighbour table wins.
        h.set_neighbours([("192.168.1.7".parse().unwrap(), router)]);
        assert_eq!(h.mac_of("192.168.1.7".parse().unwrap()), Some(router));
    }

    #[test]
    fn sticky_labels_expire_when_unused() {
        let mut h = HostLabels::new(true, Vec::new(), local(), &options());
        let t0 = Instant::now();
        let ip: IpAddr = "198.18.0.9".parse().unwrap();
        h.label(ip, ip, t0, t0);
        h.expire(t0 + Duration::from_secs(5), Duration::from_secs(10));
        assert_eq!(h.sticky.len(), 1);
        h.expire(t0 + Duration::from_secs(11), Duration::from_secs(10));
        assert!(h.sticky.is_empty());
    }
}
