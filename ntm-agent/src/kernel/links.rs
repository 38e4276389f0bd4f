//! The links of this network namespace, from rtnetlink: name, index, kind
//! (bridge, veth, ...) and bridge master; and a socket that wakes up when
//! links appear, change or go away. Messages are built and parsed by
//! netlink-packet-route; the socket is netlink-sys's.
//!
//! Netlink rather than /sys/class/net: sysfs shows the namespace it was
//! mounted in, netlink the one of the thread that asks.

use std::{collections::HashMap, io, net::IpAddr};

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::{
    RouteNetlinkMessage,
    address::{AddressAttribute, AddressMessage, AddressScope},
    link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo as NlLinkInfo, LinkMessage},
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

use crate::model::net::Mac;

/// Reading the links failed.
#[derive(Debug, thiserror::Error)]
pub enum LinksError {
    #[error("rtnetlink socket: {0}")]
    Socket(#[source] io::Error),
    #[error("the kernel refused the link dump: {0}")]
    Refused(#[source] io::Error),
    #[error("malformed netlink message from the kernel: {0}")]
    Malformed(String),
}

/// One network interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    pub index: u32,
    pub name: String,
    /// IFLA_INFO_KIND ("bridge", "veth", "wireguard", ...), "" when none.
    pub kind: String,
    /// Index of the bridge (or bond) this link is a port of.
    pub master: Option<u32>,
    /// A loopback device: every frame leaves it and comes back in.
    pub loopback: bool,
}

/// The link of one RTM_NEWLINK message (None without a name).
fn link_info(message: &LinkMessage) -> Option<LinkInfo> {
    let mut link = LinkInfo {
        index: message.header.index,
        name: String::new(),
        kind: String::new(),
        master: None,
        loopback: message.header.flags.contains(LinkFlags::Loopback),
    };
    for attribute in &message.attributes {
        match attribute {
            LinkAttribute::IfName(name) => link.name = name.clone(),
            LinkAttribute::Controller(master) if *master != 0 => link.master = Some(*master),
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    if let NlLinkInfo::Kind(kind) = info {
                        link.kind = match kind {
                            InfoKind::Other(other) => other.clone(),
                            known => known.to_string(),
                        };
                    }
                }
            }
            _ => {}
        }
    }
    (!link.name.is_empty()).then_some(link)
}

/// Parses one datagram of a dump, handing each message to `each`; true
/// once the dump is done.
fn parse_dump(
    mut datagram: &[u8],
    each: &mut impl FnMut(RouteNetlinkMessage),
) -> Result<bool, LinksError> {
    while !datagram.is_empty() {
        let message = NetlinkMessage::<RouteNetlinkMessage>::deserialize(datagram)
            .map_err(|e| LinksError::Malformed(e.to_string()))?;
        let length = message.header.length as usize;
        match message.payload {
            NetlinkPayload::Done(_) => return Ok(true),
            NetlinkPayload::Error(e) => return Err(LinksError::Refused(e.to_io())),
            NetlinkPayload::InnerMessage(message) => each(message),
            _ => {}
        }
        if length == 0 || length > datagram.len() {
            return Err(LinksError::Malformed(format!(
                "message length {length} in a datagram of {}",
                datagram.len()
            )));
        }
        datagram = &datagram[length.next_multiple_of(4).min(datagram.len())..];
    }
    Ok(false)
}

/// Sends one dump request and hands every answer to `each`.
fn dump(
    request: RouteNetlinkMessage,
    mut each: impl FnMut(RouteNetlinkMessage),
) -> Result<(), LinksError> {
    let mut socket = Socket::new(NETLINK_ROUTE).map_err(LinksError::Socket)?;
    socket.bind_auto().map_err(LinksError::Socket)?;
    socket
        .connect(&SocketAddr::new(0, 0))
        .map_err(LinksError::Socket)?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    header.sequence_number = 1;
    let mut request = NetlinkMessage::new(header, NetlinkPayload::from(request));
    request.finalize();
    let mut buffer = vec![0u8; request.buffer_len()];
    request.serialize(&mut buffer);
    socket.send(&buffer, 0).map_err(LinksError::Socket)?;
    loop {
        // recv_from_full sizes its buffer to the datagram: nothing is cut.
        let (datagram, _) = socket.recv_from_full().map_err(LinksError::Socket)?;
        if parse_dump(&datagram, &mut each)? {
            return Ok(());
        }
    }
}

/// Every link of the calling thread's network namespace.
pub fn links() -> Result<Vec<LinkInfo>, LinksError> {
    let mut links = Vec::new();
    dump(
        RouteNetlinkMessage::GetLink(LinkMessage::default()),
        |message| {
            if let RouteNetlinkMessage::NewLink(link) = message {
                links.extend(link_info(&link));
            }
        },
    )?;
    Ok(links)
}

/// What the kernel's own statistics of an interface (IFLA_STATS64) counted
/// since it was created: frames and bytes including the link-layer header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkStats {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
}

/// The kernel's statistics of every link of the calling thread's network
/// namespace, by index.
pub fn link_stats() -> Result<HashMap<u32, LinkStats>, LinksError> {
    let mut stats = HashMap::new();
    dump(
        RouteNetlinkMessage::GetLink(LinkMessage::default()),
        |message| {
            if let RouteNetlinkMessage::NewLink(link) = message {
                for attribute in &link.attributes {
                    if let LinkAttribute::Stats64(s) = attribute {
                        stats.insert(
                            link.header.index,
                            LinkStats {
                                rx_packets: s.rx_packets,
                                rx_bytes: s.rx_bytes,
                                tx_packets: s.tx_packets,
                                tx_bytes: s.tx_bytes,
                            },
                        );
                    }
                }
            }
        },
    )?;
    Ok(stats)
}

/// The neighbour table (ARP and NDP) of the calling thread's network
/// namespace: which MAC address uses which IP address, as this host last
/// saw it. Entries without a link-layer address (incomplete, failed) are
/// left out.
pub fn neighbours() -> Result<Vec<(IpAddr, Mac)>, LinksError> {
    let mut found = Vec::new();
    dump(
        RouteNetlinkMessage::GetNeighbour(NeighbourMessage::default()),
        |message| {
            if let RouteNetlinkMessage::NewNeighbour(neighbour) = message {
                found.extend(neighbour_entry(&neighbour));
            }
        },
    )?;
    Ok(found)
}

/// One address of an interface of this host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostAddress {
    pub ifindex: u32,
    pub address: IpAddr,
    pub prefix_len: u8,
    /// Reachable by other hosts (global scope: not loopback's, not
    /// link-local).
    pub global: bool,
}

/// Every address of this network namespace's interfaces.
pub fn addresses() -> Result<Vec<HostAddress>, LinksError> {
    let mut found = Vec::new();
    dump(
        RouteNetlinkMessage::GetAddress(AddressMessage::default()),
        |message| {
            if let RouteNetlinkMessage::NewAddress(address) = message {
                found.extend(host_address(&address));
            }
        },
    )?;
    Ok(found)
}

/// The addresses of this network namespace's interfaces that other hosts
/// can reach: global scope (not loopback's, not link-local).
pub fn global_addresses() -> Result<Vec<HostAddress>, LinksError> {
    Ok(addresses()?.into_iter().filter(|a| a.global).collect())
}

fn host_address(address: &AddressMessage) -> Option<HostAddress> {
    // IFA_LOCAL is the interface's own address on a point-to-point link
    // (IFA_ADDRESS is the peer's there); elsewhere the two are the same,
    // or only IFA_ADDRESS is sent (IPv6).
    let mut own = None;
    for attribute in &address.attributes {
        match attribute {
            AddressAttribute::Local(ip) => own = Some(*ip),
            AddressAttribute::Address(ip) if own.is_none() => own = Some(*ip),
            _ => {}
        }
    }
    Some(HostAddress {
        ifindex: address.header.index,
        address: own?,
        prefix_len: address.header.prefix_len,
        global: address.header.scope == AddressScope::Universe,
    })
}

fn neighbour_entry(message: &NeighbourMessage) -> Option<(IpAddr, Mac)> {
    let mut address = None;
    let mut mac = None;
    for attribute in &message.attributes {
        match attribute {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => {
                address = Some(IpAddr::V4(*v4))
            }
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => {
                address = Some(IpAddr::V6(*v6))
            }
            NeighbourAttribute::LinkLayerAddress(bytes) => {
                mac = Mac::try_from(bytes.as_slice()).ok()
            }
            _ => {}
        }
    }
    // All-zero: a neighbour entry on a link without MAC addresses.
    Some((address?, mac.filter(|m| *m != [0; 6])?))
}

/// A socket subscribed to changes of links and of their IPv4 and IPv6
/// addresses; `wait` blocks until one happens.
pub struct LinkEvents {
    socket: Socket,
}

impl LinkEvents {
    pub fn subscribe() -> Result<Self, LinksError> {
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(LinksError::Socket)?;
        socket
            .bind(&SocketAddr::new(
                0,
                (libc::RTMGRP_LINK | libc::RTMGRP_IPV4_IFADDR | libc::RTMGRP_IPV6_IFADDR) as u32,
            ))
            .map_err(LinksError::Socket)?;
        Ok(Self { socket })
    }

    /// Blocks until a link or an address appears, changes or disappears.
    /// (What changed is not parsed: the caller re-reads the links and
    /// addresses.) ENOBUFS, events lost
    /// because too many came at once, is a wake-up too.
    pub fn wait(&mut self) -> Result<(), LinksError> {
        match self.socket.recv_from_full() {
            Ok(_) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => Ok(()),
            Err(e) => Err(LinksError::Socket(e)),
        }
    }
}

/// Shell-style match of an interface name: `*` any run, `?` one character.
pub fn name_matches(pattern: &str, name: &str) -> bool {
    fn go(p: &[u8], n: &[u8]) -> bool {
        match (p.first(), n.first()) {
            (None, None) => true,
            (Some(b'*'), _) => go(&p[1..], n) || (!n.is_empty() && go(p, &n[1..])),
            (Some(b'?'), Some(_)) => go(&p[1..], &n[1..]),
            (Some(a), Some(b)) if a == b => go(&p[1..], &n[1..]),
            _ => false,
        }
    }
    go(pattern.as_bytes(), name.as_bytes())
}

pub fn is_pattern(name: &str) -> bool {
    name.contains(['*', '?'])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_patterns() {
        assert!(name_matches("veth*", "veth12ab"));
        assert!(name_matches("veth*", "veth"));
        assert!(!name_matches("veth*", "eth0"));
        assert!(name_matches("eth?", "eth1"));
        assert!(!name_matches("eth?", "eth10"));
        assert!(name_matches("*", "anything"));
        assert!(name_matches("wg0", "wg0"));
        assert!(!name_matches("wg0", "wg01"));
        assert!(is_pattern("veth*") && !is_pattern("br0"));
    }

    #[test]
    fn neighbour_messages_become_address_and_mac() {
        let mut message = NeighbourMessage::default();
        message.attributes = vec![
            NeighbourAttribute::Destination(NeighbourAddress::Inet6("2001:2::2".parse().unwrap())),
            NeighbourAttribute::LinkLayerAddress(vec![2, 0, 0, 0, 0, 2]),
        ];
        assert_eq!(
            neighbour_entry(&message),
            Some(("2001:2::2".parse().unwrap(), [2, 0, 0, 0, 0, 2]))
        );
        message.attributes.pop();
        assert_eq!(neighbour_entry(&message), None, "no MAC yet");
        assert!(neighbours().is_ok());
    }

    #[test]
    fn this_namespace_has_loopback() {
        let links = links().unwrap();
        let lo = links.iter().find(|l| l.name == "lo").expect("lo");
        assert_eq!(lo.index, 1);
        assert_eq!(lo.master, None);
    }

    #[test]
    fn link_messages_become_link_infos() {
        let mut message = LinkMessage::default();
        message.header.index = 7;
        message.attributes = vec![
            LinkAttribute::IfName("br0".into()),
            LinkAttribute::LinkInfo(vec![NlLinkInfo::Kind(InfoKind::Bridge)]),
        ];
        assert_eq!(
            link_info(&message),
            Some(LinkInfo {
                index: 7,
                name: "br0".into(),
                kind: "bridge".into(),
                master: None,
                loopback: false,
            })
        );
        message.header.flags = LinkFlags::Loopback | LinkFlags::Up;
        assert_eq!(link_info(&message).map(|l| l.loopback), Some(true));
        message.header.flags = LinkFlags::empty();
        message.attributes = vec![
            LinkAttribute::IfName("p1".into()),
            LinkAttribute::Controller(7),
        ];
        assert_eq!(link_info(&message).map(|l| l.master), Some(Some(7)));
        message.attributes.clear();
        assert_eq!(link_info(&message), None, "a link without a name");
    }

    #[test]
    fn garbage_from_the_socket_is_an_error_not_a_panic() {
        for len in 0..64 {
            let junk: Vec<u8> = (0..len).map(|i| (i * 37) as u8).collect();
            let _ = parse_dump(&junk, &mut |_| {});
        }
    }
}
