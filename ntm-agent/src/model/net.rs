//! Addresses and networks: CIDR networks, the local networks that decide a
//! flow's direction and which hosts are devices, and MAC addresses.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr},
    str::FromStr,
    sync::Arc,
};

use arc_swap::ArcSwap;
use ntm_common::FlowKey;

/// An IP network in CIDR notation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// The network `addr` is in, with a prefix of `prefix` bits (at most
    /// the address's length): `198.18.60.7/24` is `198.18.60.0/24`.
    pub fn network(addr: IpAddr, prefix: u8) -> Self {
        let (addr, prefix) = match addr {
            IpAddr::V4(v4) => {
                let prefix = prefix.min(32);
                let mask = u32::MAX.checked_shl(32 - prefix as u32).unwrap_or(0);
                (IpAddr::V4((u32::from(v4) & mask).into()), prefix)
            }
            IpAddr::V6(v6) => {
                let prefix = prefix.min(128);
                let mask = u128::MAX.checked_shl(128 - prefix as u32).unwrap_or(0);
                (IpAddr::V6((u128::from(v6) & mask).into()), prefix)
            }
        };
        Self { addr, prefix }
    }

    /// An IPv4 network's directed broadcast address (its last), for
    /// networks of more than two addresses.
    pub fn broadcast(&self) -> Option<Ipv4Addr> {
        match self.addr {
            IpAddr::V4(v4) if self.prefix <= 30 => {
                let host_bits = u32::MAX.checked_shr(self.prefix as u32).unwrap_or(0);
                Some((u32::from(v4) | host_bits).into())
            }
            _ => None,
        }
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - self.prefix as u32).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - self.prefix as u32).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("{s:?} is not a network like 192.168.1.0/24 or fd00::/8");
        let (addr, prefix) = match s.trim().split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s.trim(), None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.parse::<u8>().map_err(|_| bad())?,
            None => max,
        };
        if prefix > max {
            return Err(bad());
        }
        Ok(Self { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Ranges that are never the internet's, local whatever the host's
/// addresses (unless `--local-net` says otherwise): private IPv4 (RFC
/// 1918), IPv6 unique-local (RFC 4193), link-local and loopback. A home's
/// second router, a VPN or the pods of a Kubernetes cluster's other nodes
/// are there, and are nobody's servers.
pub const PRIVATE_NETS: [&str; 8] = [
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "169.254.0.0/16",
    "127.0.0.0/8",
    "fc00::/7",
    "fe80::/10",
    "::1/128",
];

/// Where a local network came from (the status API and the page say it).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Origin {
    /// `--local-net` (or `NTM_LOCAL_NETS`).
    Given,
    /// An address on this interface: a monitored one, or the LAN side (a
    /// bridge or one of its ports).
    Interface(String),
    /// One of [`PRIVATE_NETS`].
    Private,
}

impl Origin {
    /// The API's word: `given`, `interface` or `private`.
    pub fn kind(&self) -> &'static str {
        match self {
            Origin::Given => "given",
            Origin::Interface(_) => "interface",
            Origin::Private => "private",
        }
    }

    /// The interface the network's address is on, for `Interface`.
    pub fn interface(&self) -> Option<&str> {
        match self {
            Origin::Interface(name) => Some(name),
            _ => None,
        }
    }
}

/// One local network and where it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalNet {
    pub net: Cidr,
    pub origin: Origin,
}

/// Where an address stands, seen from the local networks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Place {
    /// A host in the local networks: a device.
    Local,
    /// Any other host: a server, when it talks with a device.
    Remote,
    /// No one host: a multicast group, a broadcast address (the limited
    /// one, or a local IPv4 network's), or the unspecified address a host
    /// sends from before it has one. Never a device nor a server.
    Group,
}

/// Which addresses are local: they decide the `direction` label, and which
/// hosts are devices (local) and servers (remote).
///
/// One list, shared by every stage that asks (names, labels, the live view,
/// the history) and replaced in one step when the host's addresses change
/// ([`LocalNets::set`]): a flow is never judged by two lists at once.
#[derive(Clone, Debug)]
pub struct LocalNets {
    nets: Arc<ArcSwap<Vec<LocalNet>>>,
    learnt: bool,
}

impl LocalNets {
    /// Exactly these networks (`--local-net`); they never change.
    pub fn given(nets: Vec<Cidr>) -> Self {
        let nets = nets
            .into_iter()
            .map(|net| LocalNet {
                net,
                origin: Origin::Given,
            })
            .collect();
        Self {
            nets: Arc::new(ArcSwap::from_pointee(nets)),
            learnt: false,
        }
    }

    /// Learnt from the host: the private ranges until the host's addresses
    /// are read ([`LocalNets::set`]).
    pub fn learnt() -> Self {
        Self {
            nets: Arc::new(ArcSwap::from_pointee(Self::private())),
            learnt: true,
        }
    }

    /// [`PRIVATE_NETS`], as local networks.
    pub fn private() -> Vec<LocalNet> {
        PRIVATE_NETS
            .iter()
            .map(|net| LocalNet {
                net: net.parse().expect("a valid network"),
                origin: Origin::Private,
            })
            .collect()
    }

    /// Whether the networks follow the host's addresses (no `--local-net`).
    pub fn is_learnt(&self) -> bool {
        self.learnt
    }

    /// Replaces the networks (with [`PRIVATE_NETS`] after those learnt);
    /// true if they changed. Given networks never change.
    pub fn set(&self, learnt: Vec<LocalNet>) -> bool {
        if !self.learnt {
            return false;
        }
        let mut nets = learnt;
        for private in Self::private() {
            if !nets.iter().any(|n| n.net == private.net) {
                nets.push(private);
            }
        }
        if **self.nets.load() == nets {
            return false;
        }
        self.nets.store(Arc::new(nets));
        true
    }

    /// The networks now.
    pub fn list(&self) -> Arc<Vec<LocalNet>> {
        self.nets.load_full()
    }

    /// Whether `ip` is local, or a group of the local networks: what the
    /// `direction` label and a flow's way go by (traffic to a group stays
    /// on the local networks).
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.place(ip) != Place::Remote
    }

    /// Where `ip` stands: a device's, a server's, or no one host's.
    pub fn place(&self, ip: IpAddr) -> Place {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        if ip.is_multicast() || ip.is_unspecified() || ip == IpAddr::V4(Ipv4Addr::BROADCAST) {
            return Place::Group;
        }
        let nets = self.nets.load();
        let mut local = false;
        for LocalNet { net, .. } in nets.iter() {
            if net.contains(ip) {
                if net.broadcast().map(IpAddr::V4) == Some(ip) {
                    return Place::Group;
                }
                local = true;
            }
        }
        if local { Place::Local } else { Place::Remote }
    }

    /// Where the flow of `key` goes, seen from the local networks; `None`
    /// for frames that are not IP.
    pub fn direction(&self, key: &FlowKey) -> Option<Direction> {
        let (src, dst) = (key.src_addr()?, key.dst_addr()?);
        Some(Direction::of(self.contains(src), self.contains(dst)))
    }
}

/// Where a flow goes, seen from the local networks: the `direction` label of
/// the traffic series (the seed's word and values). Not to be confused with
/// the hook that saw a frame ([`ntm_common::Hook`], the `hook` label of ntm's
/// own metrics) or a subject's download and upload
/// ([`super::subjects::Way`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Remote to local.
    Inbound,
    /// Local to remote.
    Outbound,
    /// Local to local.
    Internal,
    /// Remote to remote (forwarded, or neither side configured as local).
    External,
}

impl Direction {
    pub fn of(src_local: bool, dst_local: bool) -> Self {
        match (src_local, dst_local) {
            (false, true) => Direction::Inbound,
            (true, false) => Direction::Outbound,
            (true, true) => Direction::Internal,
            (false, false) => Direction::External,
        }
    }

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
            Direction::Internal => "internal",
            Direction::External => "external",
        }
    }
}

/// A MAC address.
pub type Mac = [u8; 6];

/// `02:00:5e:10:00:01` (or with `-`), the form hosts files and leases use.
pub fn parse_mac(text: &str) -> Option<Mac> {
    let mut mac = [0u8; 6];
    let mut parts = text.split([':', '-']);
    for byte in &mut mac {
        let part = parts.next()?;
        if part.is_empty() || part.len() > 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// `02:00:5e:10:00:01`, as `ip neigh` and ethers files write a MAC.
pub fn format_mac(mac: Mac) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn groups_are_no_ones_and_a_networks_last_address_is_its_broadcast() {
        let local = LocalNets::given(vec!["198.18.60.0/24".parse().unwrap()]);
        for group in [
            "224.0.0.251",
            "255.255.255.255",
            "198.18.60.255",
            "0.0.0.0",
            "::",
            "ff02::1:ff00:1",
        ] {
            assert_eq!(local.place(ip(group)), Place::Group, "{group}");
            assert!(
                local.contains(ip(group)),
                "{group} counts with the local side"
            );
        }
        assert_eq!(local.place(ip("198.18.60.254")), Place::Local);
        assert_eq!(local.place(ip("::ffff:198.18.60.7")), Place::Local);
        assert_eq!(local.place(ip("198.18.61.255")), Place::Remote);
        assert_eq!(
            local.place(ip("10.0.0.1")),
            Place::Remote,
            "given: exactly those"
        );
        // A /31 or /32 has no broadcast address.
        assert_eq!(Cidr::network(ip("198.18.0.1"), 31).broadcast(), None);
        assert_eq!(
            Cidr::network(ip("198.18.0.7"), 24).to_string(),
            "198.18.0.0/24"
        );
    }

    #[test]
    fn learnt_networks_change_and_given_ones_never() {
        let given = LocalNets::given(vec!["198.18.60.0/24".parse().unwrap()]);
        let lan = LocalNet {
            net: "2001:2:0:60::/64".parse().unwrap(),
            origin: Origin::Interface("br-lan".into()),
        };
        assert!(!given.set(vec![lan.clone()]));
        assert_eq!(given.place(ip("2001:2:0:60::7")), Place::Remote);

        let learnt = LocalNets::learnt();
        let shared = learnt.clone();
        assert_eq!(learnt.place(ip("192.168.1.7")), Place::Local, "private");
        assert_eq!(learnt.place(ip("2001:2:0:60::7")), Place::Remote);
        assert!(learnt.set(vec![lan.clone()]));
        assert!(!learnt.set(vec![lan.clone()]), "unchanged");
        // Every clone sees the new list; the private ranges stay.
        assert_eq!(shared.place(ip("2001:2:0:60::7")), Place::Local);
        assert_eq!(shared.place(ip("192.168.1.7")), Place::Local);
        assert_eq!(shared.list()[0], lan);
        assert!(learnt.set(Vec::new()));
        assert_eq!(shared.place(ip("2001:2:0:60::7")), Place::Remote);
    }
}
