//! This host's own addresses, named by its host name: a router's LAN and
//! link-local addresses are one device, the router. The agent reads the
//! addresses (`kernel::links::addresses`) at start and on every address
//! event, and keeps those in the local networks in [`OwnAddresses`] (one
//! outside them, which `--local-net` left out, is named as any remote
//! host); this rung reads them once per drain.

use std::{collections::BTreeSet, net::IpAddr, sync::Arc};

use arc_swap::ArcSwap;

use super::source::{Lookup, NameSource, Query, Source};
use crate::model::series::usable_name;

/// This host's addresses now, shared by the agent (which writes them) and
/// the rung (which reads them).
#[derive(Clone, Debug, Default)]
pub struct OwnAddresses(Arc<ArcSwap<BTreeSet<IpAddr>>>);

impl OwnAddresses {
    pub fn set(&self, addresses: BTreeSet<IpAddr>) {
        if **self.0.load() != addresses {
            self.0.store(Arc::new(addresses));
        }
    }

    fn get(&self) -> Arc<BTreeSet<IpAddr>> {
        self.0.load_full()
    }
}

/// The host's name (the kernel's, as `hostname` prints it), if it can
/// stand as a label.
pub fn host_name() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| usable_name(h))
}

pub struct ThisHostNames {
    name: String,
    shared: OwnAddresses,
    /// The addresses as of the last refresh.
    addresses: Arc<BTreeSet<IpAddr>>,
    /// Addresses gained or lost since the ladder last asked.
    renamed: Vec<IpAddr>,
}

impl ThisHostNames {
    /// None when the host has no usable name.
    pub fn new(name: Option<String>, shared: OwnAddresses) -> Option<Self> {
        let addresses = shared.get();
        Some(Self {
            name: name?,
            shared,
            addresses,
            renamed: Vec::new(),
        })
    }
}

impl NameSource for ThisHostNames {
    fn name(&mut self, query: &Query) -> Lookup {
        if self.addresses.contains(&query.ip) {
            Lookup::Name(self.name.clone(), Source::ThisHost)
        } else {
            Lookup::Next
        }
    }

    fn refresh(&mut self) {
        let now = self.shared.get();
        if !Arc::ptr_eq(&now, &self.addresses) {
            self.renamed
                .extend(now.symmetric_difference(&self.addresses).copied());
            self.addresses = now;
        }
    }

    fn renamed(&mut self) -> Vec<IpAddr> {
        std::mem::take(&mut self.renamed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn ask(rung: &mut ThisHostNames, ip: &str) -> Lookup {
        let now = Instant::now();
        rung.name(&Query {
            ip: ip.parse().unwrap(),
            peer: "198.18.60.10".parse().unwrap(),
            mac: None,
            server: false,
            first_seen: now,
            now,
        })
    }

    #[test]
    fn the_hosts_addresses_are_its_name_and_follow_it() {
        let shared = OwnAddresses::default();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        shared.set(BTreeSet::from([ip("198.18.60.1"), ip("fe80::1")]));
        let mut rung = ThisHostNames::new(Some("router".into()), shared.clone()).unwrap();
        let router = Lookup::Name("router".into(), Source::ThisHost);
        assert_eq!(ask(&mut rung, "198.18.60.1"), router);
        assert_eq!(ask(&mut rung, "fe80::1"), router);
        assert_eq!(ask(&mut rung, "198.18.60.10"), Lookup::Next);
        // A new prefix: the new address is the host's, the old one no
        // longer, and both are decided again.
        shared.set(BTreeSet::from([ip("198.18.60.1"), ip("2001:2:0:61::1")]));
        rung.refresh();
        assert_eq!(ask(&mut rung, "2001:2:0:61::1"), router);
        assert_eq!(ask(&mut rung, "fe80::1"), Lookup::Next);
        let mut renamed = rung.renamed();
        renamed.sort();
        assert_eq!(renamed, [ip("2001:2:0:61::1"), ip("fe80::1")]);
        assert!(rung.renamed().is_empty());
        assert!(ThisHostNames::new(None, shared).is_none());
    }
}
