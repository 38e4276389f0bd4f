//! Subjects: what the live view shows and the history keeps traffic of
//! (devices, servers, services, interfaces), and how one labelled flow
//! delta is shared out among them. The live view and the history both
//! take their shares from [`Shares`], so that they add up alike.

use std::{borrow::Cow, net::IpAddr};

use ntm_common::{FlowKey, Hook};

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

/// Where one labelled flow delta counts.
#[derive(Debug, PartialEq, Eq)]
pub struct Shares<'l> {
    /// The traffic's way as a whole, and its service's and server's: into
    /// the local networks is a download, anything else an upload. Frames
    /// that are not IP count as downloads.
    pub way: Way,
    /// Its interface, by the hook that saw it.
    pub interface: (&'l str, Hook),
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
        let interface = (iface, Hook::from_u8(key.hook).unwrap_or(Hook::Ingress));
        let (Some(src_ip), Some(dst_ip)) = (key.src_addr(), key.dst_addr()) else {
            // Not IP (ARP, say): a service of the interface, no hosts.
            return Self {
                way: Way::Download,
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
            way: if dst_local {
                Way::Download
            } else {
                Way::Upload
            },
            interface,
            service,
            server,
            devices: [
                src_local.then_some((src_name, Way::Upload)),
                dst_local.then_some((dst_name, Way::Download)),
            ],
        }
    }

    /// Each subject's name and side: the interface, the service, the
    /// server, the devices.
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ntm_common::test_util::KeyBuilder;

    fn local() -> LocalNets {
        LocalNets(vec!["198.18.0.0/24".parse().unwrap()])
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
                (Subject::Service, "arp".into(), Side::Way(Way::Download)),
            ]
        );
    }
}
