//! Subjects: what the live view shows and the history keeps traffic of
//! (devices, servers, services, interfaces), and how one labelled flow
//! delta is shared out among them. The live view and the history both
//! take their shares from [`Shares`], so that they add up alike.

use std::{borrow::Cow, net::IpAddr};

use ntm_common::{FlowKey, Hook, ipproto};

use super::net::{LocalNets, Place};

/// What traffic is kept of, in the live view and the history.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Subject {
    /// A local host (in `--local-net`), by its label.
    Device,
    /// A remote host that a local one talked to, by its label.
    Server,
    /// A service label.
    Service,
    /// An interface label.
    Interface,
}

impl Subject {
    /// Every subject, in the order of its `as usize`.
    pub const ALL: [Subject; 4] = [
        Subject::Device,
        Subject::Server,
        Subject::Service,
        Subject::Interface,
    ];
}

/// A device's, server's or service's download or upload: for a device,
/// what it received and what it sent; for a server or a service, what came
/// into the local networks from it and what left them. (An interface's
/// traffic is by the hook that saw it, [`Hook`]; a flow's `direction` label
/// is [`super::net::Direction`].)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Way {
    Download = 0,
    Upload = 1,
}

impl Way {
    /// The label value (`way` of `ntm_period_bytes`) and the API's word.
    pub fn as_str(self) -> &'static str {
        match self {
            Way::Download => "download",
            Way::Upload => "upload",
        }
    }
}

/// Which of a subject's two counters a share goes to: a way for devices,
/// servers and services, the hook for interfaces. Counters are kept as
/// `[Counters; 2]` indexed by [`Side::index`]: download and ingress are 0,
/// upload and egress 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Way(Way),
    Hook(Hook),
}

impl Side {
    pub fn index(self) -> usize {
        match self {
            Side::Way(way) => way as usize,
            Side::Hook(hook) => hook as usize,
        }
    }

    /// The label value and the API's word: `download`/`upload` or
    /// `ingress`/`egress`.
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Way(way) => way.as_str(),
            Side::Hook(hook) => hook.as_str(),
        }
    }
}

/// The row of the traffic to no one host (multicast groups, broadcast, and
/// from the unspecified address), among the devices: never a host's label
/// (a label has no spaces).
pub const GROUPS: &str = "multicast and broadcast";

/// The row, among the services, of what a network carries by itself
/// (neighbour discovery, MLD and IGMP, ARP, DHCP, mDNS, SSDP, LLMNR, and
/// anything to a group): it would crowd out the services people use.
/// `/metrics` keeps each service's own label.
pub const HOUSEKEEPING: &str = "network housekeeping";

/// Where one labelled flow delta counts.
#[derive(Debug, PartialEq, Eq)]
pub struct Shares<'l> {
    /// The traffic's way as a whole, and its service's and server's: into
    /// the local networks (or to a group on them) is a download, anything
    /// else an upload. Frames that are not IP count as downloads.
    pub way: Way,
    /// Its interface, by the hook that saw it.
    pub interface: (&'l str, Hook),
    /// Its service as the services are listed: its label, or
    /// [`HOUSEKEEPING`].
    pub service: &'l str,
    /// The remote side, when one side is a device and the other a remote
    /// host.
    pub server: Option<Cow<'l, str>>,
    /// Its devices (source, then destination), each its own way: the
    /// source's upload, the destination's download.
    pub devices: [Option<(Cow<'l, str>, Way)>; 2],
    /// When one side is no one host: its share of the [`GROUPS`] row.
    pub group: Option<GroupShare<'l>>,
}

/// Traffic to a group (or from the unspecified address), for the
/// [`GROUPS`] row: what came from outside the local networks is its
/// download, what was sent on them its upload.
#[derive(Debug, PartialEq, Eq)]
pub struct GroupShare<'l> {
    /// The group's (or broadcast or unspecified address's) label.
    pub address: Cow<'l, str>,
    pub way: Way,
    /// The service's own label (the row shows what it carries).
    pub service: &'l str,
}

impl<'l> Shares<'l> {
    /// The shares of a flow with key `key`, counted on interface `iface`,
    /// whose host labels are `src` and `dst` (empty when host labels are
    /// off: then a host is its address) and service label `service`.
    pub fn of_flow(
        local: &LocalNets,
        key: &FlowKey,
        iface: &'l str,
        (src, dst): (&'l str, &'l str),
        service: &'l str,
    ) -> Self {
        let interface = (iface, Hook::from_u8(key.hook).unwrap_or(Hook::Ingress));
        let (Some(src_ip), Some(dst_ip)) = (key.src_addr(), key.dst_addr()) else {
            // Not IP (ARP, say): a service of the interface, no hosts.
            let housekeeping = matches!(key.port, ETHERTYPE_ARP | ETHERTYPE_LLDP);
            return Self {
                way: Way::Download,
                interface,
                service: if housekeeping { HOUSEKEEPING } else { service },
                server: None,
                devices: [None, None],
                group: None,
            };
        };
        let (src_place, dst_place) = (local.place(src_ip), local.place(dst_ip));
        // A host is its label, or its address when host labels are off
        // (only then is a name made).
        let name = |label: &'l str, ip: IpAddr| -> Cow<'l, str> {
            if label.is_empty() {
                Cow::Owned(ip.to_string())
            } else {
                Cow::Borrowed(label)
            }
        };
        let (src_name, dst_name) = (name(src, src_ip), name(dst, dst_ip));
        let server = match (src_place, dst_place) {
            (Place::Remote, Place::Local) => Some(src_name.clone()),
            (Place::Local, Place::Remote) => Some(dst_name.clone()),
            _ => None,
        };
        let group = match (src_place, dst_place) {
            (_, Place::Group) => Some((dst_name.clone(), src_place)),
            (Place::Group, _) => Some((src_name.clone(), dst_place)),
            _ => None,
        }
        .map(|(address, other)| GroupShare {
            address,
            way: if other == Place::Remote {
                Way::Download
            } else {
                Way::Upload
            },
            service,
        });
        let housekeeping = group.is_some() || is_housekeeping(key);
        Self {
            way: if dst_place == Place::Remote {
                Way::Upload
            } else {
                Way::Download
            },
            interface,
            service: if housekeeping { HOUSEKEEPING } else { service },
            server,
            devices: [
                (src_place == Place::Local).then_some((src_name, Way::Upload)),
                (dst_place == Place::Local).then_some((dst_name, Way::Download)),
            ],
            group,
        }
    }

    /// Each subject's name and side: the interface, the service, the
    /// server, the devices (the [`GROUPS`] row last).
    pub fn each(&self, mut share: impl FnMut(Subject, &str, Side)) {
        share(
            Subject::Interface,
            self.interface.0,
            Side::Hook(self.interface.1),
        );
        share(Subject::Service, self.service, Side::Way(self.way));
        if let Some(server) = &self.server {
            share(Subject::Server, server, Side::Way(self.way));
        }
        for (device, way) in self.devices.iter().flatten() {
            share(Subject::Device, device, Side::Way(*way));
        }
        if let Some(group) = &self.group {
            share(Subject::Device, GROUPS, Side::Way(group.way));
        }
    }
}

const ETHERTYPE_ARP: u16 = 0x0806;
const ETHERTYPE_LLDP: u16 = 0x88CC;

/// Whether a unicast IP flow is one a network carries by itself: ICMPv6
/// neighbour and router discovery and MLD, ICMP router discovery, IGMP,
/// and DHCP, DHCPv6, mDNS, SSDP and LLMNR by their ports (their answers
/// are unicast).
fn is_housekeeping(key: &FlowKey) -> bool {
    const IGMP: u8 = 2;
    match key.proto {
        ipproto::ICMPV6 => matches!(key.port, 130..=137 | 143),
        ipproto::ICMP => matches!(key.port, 9 | 10),
        IGMP => true,
        ipproto::UDP => matches!(key.port, 67 | 68 | 546 | 547 | 1900 | 5353 | 5355),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ntm_common::test_util::KeyBuilder;

    fn local() -> LocalNets {
        LocalNets::given(vec!["198.18.0.0/24".parse().unwrap()])
    }

    fn key(src: [u8; 4], dst: [u8; 4], hook: Hook) -> FlowKey {
        KeyBuilder::v4(src, dst).hook(hook).build()
    }

    fn all(shares: &Shares) -> Vec<(Subject, String, Side)> {
        let mut all = Vec::new();
        shares.each(|subject, name, side| all.push((subject, name.to_string(), side)));
        all
    }

    #[test]
    fn a_download_is_the_devices_and_the_servers_download() {
        let k = key([198, 19, 0, 9], [198, 18, 0, 2], Hook::Ingress);
        let shares = Shares::of_flow(&local(), &k, "eth0", ("cdn.test", "laptop"), "https");
        assert_eq!(
            all(&shares),
            [
                (Subject::Interface, "eth0".into(), Side::Hook(Hook::Ingress)),
                (Subject::Service, "https".into(), Side::Way(Way::Download)),
                (Subject::Server, "cdn.test".into(), Side::Way(Way::Download)),
                (Subject::Device, "laptop".into(), Side::Way(Way::Download)),
            ]
        );
    }

    #[test]
    fn between_two_local_hosts_both_are_devices_and_none_a_server() {
        let k = key([198, 18, 0, 2], [198, 18, 0, 3], Hook::Egress);
        let shares = Shares::of_flow(&local(), &k, "br0", ("", ""), "ssh");
        assert_eq!(
            all(&shares),
            [
                (Subject::Interface, "br0".into(), Side::Hook(Hook::Egress)),
                (Subject::Service, "ssh".into(), Side::Way(Way::Download)),
                (Subject::Device, "198.18.0.2".into(), Side::Way(Way::Upload)),
                (
                    Subject::Device,
                    "198.18.0.3".into(),
                    Side::Way(Way::Download)
                ),
            ]
        );
    }

    #[test]
    fn frames_that_are_not_ip_have_no_hosts() {
        let k = KeyBuilder::non_ip(0x0806).hook(Hook::Egress).build();
        let shares = Shares::of_flow(&local(), &k, "eth0", ("", ""), "arp");
        assert_eq!(
            all(&shares),
            [
                (Subject::Interface, "eth0".into(), Side::Hook(Hook::Egress)),
                (
                    Subject::Service,
                    HOUSEKEEPING.into(),
                    Side::Way(Way::Download)
                ),
            ]
        );
    }

    #[test]
    fn groups_are_no_hosts_and_housekeeping_is_one_service() {
        // A device's mDNS: its upload, the groups row's upload, and the
        // housekeeping row; no server, no device of the group.
        let mdns = KeyBuilder::v4([198, 18, 0, 2], [224, 0, 0, 251])
            .proto(ipproto::UDP)
            .port(5353)
            .build();
        let shares = Shares::of_flow(&local(), &mdns, "br0", ("laptop", "mdns.mcast.net"), "mdns");
        assert_eq!(
            all(&shares),
            [
                (Subject::Interface, "br0".into(), Side::Hook(Hook::Ingress)),
                (
                    Subject::Service,
                    HOUSEKEEPING.into(),
                    Side::Way(Way::Download)
                ),
                (Subject::Device, "laptop".into(), Side::Way(Way::Upload)),
                (Subject::Device, GROUPS.into(), Side::Way(Way::Upload)),
            ]
        );
        let group = shares.group.unwrap();
        assert_eq!(
            (group.address.as_ref(), group.service),
            ("mdns.mcast.net", "mdns")
        );
        // A DHCP discover, from no address to the broadcast: neither is a
        // device; the network's own broadcast address is a group too.
        for dst in [[255, 255, 255, 255], [198, 18, 0, 255]] {
            let discover = KeyBuilder::v4([0, 0, 0, 0], dst)
                .proto(ipproto::UDP)
                .port(67)
                .build();
            let shares = Shares::of_flow(&local(), &discover, "br0", ("", ""), "bootps");
            assert_eq!(
                all(&shares),
                [
                    (Subject::Interface, "br0".into(), Side::Hook(Hook::Ingress)),
                    (
                        Subject::Service,
                        HOUSEKEEPING.into(),
                        Side::Way(Way::Download)
                    ),
                    (Subject::Device, GROUPS.into(), Side::Way(Way::Upload)),
                ],
                "{dst:?}"
            );
        }
        // Multicast from outside (IPTV): the row's download.
        let iptv = KeyBuilder::v4([203, 0, 113, 9], [239, 1, 1, 1])
            .proto(ipproto::UDP)
            .port(5000)
            .build();
        let shares = Shares::of_flow(&local(), &iptv, "wan", ("", ""), "5000");
        assert_eq!(shares.group.unwrap().way, Way::Download);
        assert_eq!(shares.server, None);
        // Unicast housekeeping between two devices: both devices, one
        // housekeeping service.
        let na = KeyBuilder::v4([198, 18, 0, 2], [198, 18, 0, 1])
            .proto(ipproto::UDP)
            .port(68)
            .build();
        let shares = Shares::of_flow(&local(), &na, "br0", ("", ""), "bootpc");
        assert_eq!(shares.service, HOUSEKEEPING);
        assert_eq!(shares.devices.iter().flatten().count(), 2);
        assert!(shares.group.is_none());
    }
}
