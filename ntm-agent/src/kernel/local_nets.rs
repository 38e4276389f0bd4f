//! The local networks a host's own addresses say it is on: the networks of
//! the addresses on the monitored interfaces and on the host's LAN side
//! (every bridge and the bridges' ports), IPv4 and IPv6, global prefixes
//! included. A home's IPv6 prefix is delegated by the ISP and changes at
//! will, and a LAN may be on any IPv4 network: only the host knows which
//! are its own. The agent reads them again on every address or link event
//! (`links::LinkEvents`).

use std::collections::HashSet;

use super::links::{HostAddress, LinkInfo};
use crate::model::net::{Cidr, LocalNet, Origin};

/// The networks of the addresses on `monitored` interfaces (by index), on
/// bridges and on bridge ports, each once (the first interface found gives
/// its origin), in the order of `addresses`. Loopback's are left to the
/// private ranges; an address with a prefix of 0 (a network of everything)
/// is no network of the LAN's.
pub fn learn(
    links: &[LinkInfo],
    addresses: &[HostAddress],
    monitored: &HashSet<u32>,
) -> Vec<LocalNet> {
    let bridges: HashSet<u32> = links
        .iter()
        .filter(|l| l.kind == "bridge")
        .map(|l| l.index)
        .collect();
    let lan_side = |link: &LinkInfo| {
        monitored.contains(&link.index)
            || bridges.contains(&link.index)
            || link.master.is_some_and(|m| bridges.contains(&m))
    };
    let mut nets: Vec<LocalNet> = Vec::new();
    for address in addresses {
        let Some(link) = links.iter().find(|l| l.index == address.ifindex) else {
            continue;
        };
        if link.loopback || !lan_side(link) || address.prefix_len == 0 {
            continue;
        }
        let net = Cidr::network(address.address, address.prefix_len);
        if !nets.iter().any(|n| n.net == net) {
            nets.push(LocalNet {
                net,
                origin: Origin::Interface(link.name.clone()),
            });
        }
    }
    nets
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    fn link(index: u32, name: &str, kind: &str, master: Option<u32>) -> LinkInfo {
        LinkInfo {
            index,
            name: name.into(),
            kind: kind.into(),
            master,
            loopback: index == 1,
        }
    }

    fn address(ifindex: u32, ip: &str, prefix_len: u8) -> HostAddress {
        let address: IpAddr = ip.parse().unwrap();
        HostAddress {
            ifindex,
            address,
            prefix_len,
            global: !ip.starts_with("fe80"),
        }
    }

    fn learnt(nets: &[LocalNet]) -> Vec<(String, Option<&str>)> {
        nets.iter()
            .map(|n| (n.net.to_string(), n.origin.interface()))
            .collect()
    }

    #[test]
    fn a_routers_lan_side_is_local_and_its_wan_side_only_when_monitored() {
        let links = [
            link(1, "lo", "", None),
            link(2, "wan", "", None),
            link(3, "br-lan", "bridge", None),
            link(4, "lan1", "veth", Some(3)),
            link(5, "wg0", "wireguard", None),
        ];
        let addresses = [
            address(1, "127.0.0.1", 8),
            address(2, "203.0.113.7", 24),
            address(2, "2001:db8:ffff::7", 64),
            address(3, "198.18.60.1", 24),
            address(3, "2001:2:0:60::1", 64),
            address(3, "fe80::1", 64),
            address(3, "198.18.60.2", 24),
            address(4, "fe80::2", 64),
            address(5, "10.9.0.1", 24),
            address(3, "0.0.0.0", 0),
        ];
        // Monitoring the LAN bridge: its networks, not the WAN's nor the
        // VPN's.
        let nets = learn(&links, &addresses, &HashSet::from([3]));
        assert_eq!(
            learnt(&nets),
            [
                ("198.18.60.0/24".to_string(), Some("br-lan")),
                ("2001:2:0:60::/64".to_string(), Some("br-lan")),
                ("fe80::/64".to_string(), Some("br-lan")),
            ]
        );
        // Monitoring the WAN: its networks too, and still the LAN side's.
        let nets = learn(&links, &addresses, &HashSet::from([2]));
        assert_eq!(
            learnt(&nets),
            [
                ("203.0.113.0/24".to_string(), Some("wan")),
                ("2001:db8:ffff::/64".to_string(), Some("wan")),
                ("198.18.60.0/24".to_string(), Some("br-lan")),
                ("2001:2:0:60::/64".to_string(), Some("br-lan")),
                ("fe80::/64".to_string(), Some("br-lan")),
            ]
        );
    }
}
