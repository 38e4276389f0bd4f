//! Subjects: what the live view shows and the history keeps traffic of
//! (devices, servers, services, interfaces), and how one labelled flow
//! delta is shared out among them. The live view and the history both
//! take their shares from [`Shares`], so that they add up alike.

use std::{borrow::Cow, net::IpAddr};

use ntm_common::{Direction, FlowKey};

use super::net::LocalNets;

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

/// Which way traffic went, seen from a subject: for a device, `In` is its
/// download and `Out` its upload; for a server or a service, `In` is what
/// came into the local networks (download) and `Out` what left them; for an
/// interface, `In` is what its ingress hook saw and `Out` its egress hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Way {
    In = 0,
    Out = 1,
}

impl Way {
    /// An interface's way: the hook that saw the traffic.
    pub fn of_hook(direction: u8) -> Way {
        if direction == Direction::Egress as u8 {
            Way::Out
        } else {
            Way::In
        }
    }
}

/// Where one labelled flow delta counts.
#[derive(Debug, PartialEq, Eq)]
pub struct Shares<'l> {
    /// The traffic's way as a whole, and its service's and server's: into
    /// the local networks is `In` (a download), anything else `Out`.
    /// Frames that are not IP count as `In`.
    pub way: Way,
    /// Its interface, by the hook that saw it.
    pub interface: (&'l str, Way),
    pub service: &'l str,
    /// The remote side, when exactly one side is local.
    pub server: Option<Cow<'l, str>>,
    /// Its local sides (source, then destination), each its own way: the
    /// source's upload, the destination's download.
    pub devices: [Option<(Cow<'l, str>, Way)>; 2],
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
        let interface = (iface, Way::of_hook(key.direction));
        let (Some(src_ip), Some(dst_ip)) = (key.src_addr(), key.dst_addr()) else {
            // Not IP (ARP, say): a service of the interface, no hosts.
            return Self {
                way: Way::In,
                interface,
                service,
                server: None,
                devices: [None, None],
            };
        };
        let src_local = local.contains(src_ip);
        let dst_local = local.contains(dst_ip);
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
        let server = match (src_local, dst_local) {
            (false, true) => Some(src_name.clone()),
            (true, false) => Some(dst_name.clone()),
            _ => None,
        };
        Self {
            way: if dst_local { Way::In } else { Way::Out },
            interface,
            service,
            server,
            devices: [
                src_local.then_some((src_name, Way::Out)),
                dst_local.then_some((dst_name, Way::In)),
            ],
        }
    }

    /// Each subject's name and way: the interface, the service, the
    /// server, the devices.
    pub fn each(&self, mut share: impl FnMut(Subject, &str, Way)) {
        share(Subject::Interface, self.interface.0, self.interface.1);
        share(Subject::Service, self.service, self.way);
        if let Some(server) = &self.server {
            share(Subject::Server, server, self.way);
        }
        for (device, way) in self.devices.iter().flatten() {
            share(Subject::Device, device, *way);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ntm_common::family;

    fn local() -> LocalNets {
        LocalNets(vec!["198.18.0.0/24".parse().unwrap()])
    }

    fn key(src: [u8; 4], dst: [u8; 4], direction: Direction) -> FlowKey {
        let mut key = FlowKey {
            family: family::IPV4,
            direction: direction as u8,
            ..Default::default()
        };
        key.src[..4].copy_from_slice(&src);
        key.dst[..4].copy_from_slice(&dst);
        key
    }

    fn all(shares: &Shares) -> Vec<(Subject, String, Way)> {
        let mut all = Vec::new();
        shares.each(|subject, name, way| all.push((subject, name.to_string(), way)));
        all
    }

    #[test]
    fn a_download_is_the_devices_in_and_the_servers_in() {
        let k = key([198, 19, 0, 9], [198, 18, 0, 2], Direction::Ingress);
        let shares = Shares::of_flow(&local(), &k, "eth0", ("cdn.test", "laptop"), "https");
        assert_eq!(
            all(&shares),
            [
                (Subject::Interface, "eth0".into(), Way::In),
                (Subject::Service, "https".into(), Way::In),
                (Subject::Server, "cdn.test".into(), Way::In),
                (Subject::Device, "laptop".into(), Way::In),
            ]
        );
    }

    #[test]
    fn between_two_local_hosts_both_are_devices_and_none_a_server() {
        let k = key([198, 18, 0, 2], [198, 18, 0, 3], Direction::Egress);
        let shares = Shares::of_flow(&local(), &k, "br0", ("", ""), "ssh");
        assert_eq!(
            all(&shares),
            [
                (Subject::Interface, "br0".into(), Way::Out),
                (Subject::Service, "ssh".into(), Way::In),
                (Subject::Device, "198.18.0.2".into(), Way::Out),
                (Subject::Device, "198.18.0.3".into(), Way::In),
            ]
        );
    }

    #[test]
    fn frames_that_are_not_ip_have_no_hosts() {
        let k = FlowKey {
            family: family::NON_IP,
            direction: Direction::Egress as u8,
            ..Default::default()
        };
        let shares = Shares::of_flow(&local(), &k, "eth0", ("", ""), "arp");
        assert_eq!(
            all(&shares),
            [
                (Subject::Interface, "eth0".into(), Way::Out),
                (Subject::Service, "arp".into(), Way::In),
            ]
        );
    }
}
