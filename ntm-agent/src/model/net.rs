//! Addresses and networks: CIDR networks, the local networks that decide a
//! flow's direction, and MAC addresses.

use std::{fmt, net::IpAddr, str::FromStr};

use ntm_common::FlowKey;

/// An IP network in CIDR notation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
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

/// Networks counted as local by default: private (RFC 1918), shared/CGNAT,
/// link-local, loopback, IPv6 unique-local, link-local and loopback, and
/// multicast/broadcast, which do not leave the local network.
pub const DEFAULT_LOCAL_NETS: &str = "10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,100.64.0.0/10,169.254.0.0/16,127.0.0.0/8,224.0.0.0/4,255.255.255.255/32,fc00::/7,fe80::/10,::1/128,ff00::/8";

/// Which addresses are local, for the `direction` label.
#[derive(Clone, Debug)]
pub struct LocalNets(pub Vec<Cidr>);

impl LocalNets {
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        self.0.iter().any(|net| net.contains(ip))
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
