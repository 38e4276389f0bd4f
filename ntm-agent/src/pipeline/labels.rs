//! From a flow key to Prometheus label values: protocol and service names,
//! direction from the local networks, host labels.

use std::sync::Arc;

use ntm_common::{FlowKey, family, ipproto, key_flags, service_port::PortClass};

use crate::model::{
    net::{Direction, LocalNets},
    series::Label,
};

use super::services::ServiceRegistry;

/// Lower-case protocol name, as the tool ntm replaces printed them; the
/// number for protocols without a well-known name; the EtherType's name (or
/// hex value) for non-IP frames.
pub fn proto_name(key: &FlowKey) -> String {
    if key.family == family::NON_IP {
        return match key.port {
            0x0806 => "arp".into(),
            0x8035 => "rarp".into(),
            0x88CC => "lldp".into(),
            0x888E => "eapol".into(),
            0x8863 => "pppoe-discovery".into(),
            0x8864 => "pppoe".into(),
            0x88F7 => "ptp".into(),
            0x8847 | 0x8848 => "mpls".into(),
            0x22F0 => "avtp".into(),
            other => format!("ethertype-0x{other:04x}"),
        };
    }
    match key.proto {
        ipproto::ICMP => "icmp".into(),
        2 => "igmp".into(),
        4 => "ipip".into(),
        ipproto::TCP => "tcp".into(),
        ipproto::UDP => "udp".into(),
        41 => "ipv6".into(),
        47 => "gre".into(),
        ipproto::ESP => "esp".into(),
        ipproto::AH => "ah".into(),
        ipproto::ICMPV6 => "icmp6".into(),
        89 => "ospf".into(),
        103 => "pim".into(),
        112 => "vrrp".into(),
        ipproto::SCTP => "sctp".into(),
        ipproto::UDPLITE => "udplite".into(),
        other => other.to_string(),
    }
}

fn icmp_type_name(icmp_type: u16) -> Option<&'static str> {
    Some(match icmp_type {
        0 => "echo-reply",
        3 => "destination-unreachable",
        4 => "source-quench",
        5 => "redirect",
        8 => "echo-request",
        9 => "router-advertisement",
        10 => "router-solicitation",
        11 => "time-exceeded",
        12 => "parameter-problem",
        13 => "timestamp-request",
        14 => "timestamp-reply",
        _ => return None,
    })
}

fn icmpv6_type_name(icmp_type: u16) -> Option<&'static str> {
    Some(match icmp_type {
        1 => "destination-unreachable",
        2 => "packet-too-big",
        3 => "time-exceeded",
        4 => "parameter-problem",
        128 => "echo-request",
        129 => "echo-reply",
        130 => "mld-query",
        131 => "mld-report",
        132 => "mld-done",
        133 => "router-solicitation",
        134 => "router-advertisement",
        135 => "neighbor-solicitation",
        136 => "neighbor-advertisement",
        137 => "redirect",
        143 => "mldv2-report",
        _ => return None,
    })
}

/// The service label: the service name of the port the kernel chose (every
/// /etc/services name, per protocol, plus `--service` additions; UDP 443 is
/// https, for QUIC, unless the file or the user says otherwise); the ICMP
/// message type's name; the port number when it has no name; "" when the
/// flow has no port.
pub fn service_name(key: &FlowKey, services: &ServiceRegistry) -> String {
    // Non-IP frames, later fragments and cut-short headers have no port.
    if key.family == family::NON_IP || key.flags & key_flags::L4_MISSING != 0 {
        return String::new();
    }
    match key.proto {
        ipproto::ICMP => icmp_type_name(key.port)
            .map(str::to_string)
            .unwrap_or_else(|| key.port.to_string()),
        ipproto::ICMPV6 => icmpv6_type_name(key.port)
            .map(str::to_string)
            .unwrap_or_else(|| key.port.to_string()),
        proto => {
            let Some(class) = PortClass::of_ipproto(proto) else {
                return String::new();
            };
            if key.port == 0 {
                return String::new();
            }
            if let Some(name) = services.name(class, key.port) {
                return name.to_string();
            }
            if class == PortClass::Udp && key.port == 443 {
                return "https".to_string();
            }
            key.port.to_string()
        }
    }
}

/// A flow's labels decided before [`Labeller::values`]: its hosts' (by
/// the names), its interface's and its service's (once per drain).
#[derive(Clone, Copy)]
pub struct SharedLabels<'a> {
    pub iface: &'a Arc<str>,
    pub src: &'a Arc<str>,
    pub dst: &'a Arc<str>,
    pub service: &'a Arc<str>,
}

/// Everything labelling needs, fixed at start.
#[derive(Clone, Debug)]
pub struct Labeller {
    pub services: ServiceRegistry,
    pub local: LocalNets,
    pub enabled: Vec<Label>,
}

impl Labeller {
    /// Label values of `key`, for the enabled labels, in their order. The
    /// caller has decided the host labels (see `names`), the interface's
    /// and the service's; those are shared, not copied.
    pub fn values(&self, key: &FlowKey, shared: SharedLabels<'_>) -> Vec<Arc<str>> {
        self.enabled
            .iter()
            .map(|label| match label {
                Label::Src => Arc::clone(shared.src),
                Label::Dst => Arc::clone(shared.dst),
                Label::Service => Arc::clone(shared.service),
                Label::Proto => proto_name(key).into(),
                Label::Direction => self
                    .local
                    .direction(key)
                    .map_or("", Direction::as_str)
                    .into(),
                Label::Iface => Arc::clone(shared.iface),
                Label::Vlan => {
                    if key.vlan_id == 0 {
                        "".into()
                    } else {
                        key.vlan_id.to_string().into()
                    }
                }
            })
            .collect()
    }

    /// Whether the host labels are needed at all.
    pub fn wants_hosts(&self) -> bool {
        self.enabled.contains(&Label::Src) || self.enabled.contains(&Label::Dst)
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.enabled.iter().map(|l| l.name()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::net::Cidr;
    use ntm_common::test_util::KeyBuilder;

    /// The private ranges, as before any address is learnt.
    fn local() -> LocalNets {
        LocalNets::learnt()
    }

    fn v4(src: [u8; 4], dst: [u8; 4], proto: u8, port: u16) -> FlowKey {
        KeyBuilder::v4(src, dst).proto(proto).port(port).build()
    }

    #[test]
    fn cidrs_parse_and_match() {
        let net: Cidr = "192.168.1.0/24".parse().unwrap();
        assert!(net.contains("192.168.1.77".parse().unwrap()));
        assert!(!net.contains("192.168.2.1".parse().unwrap()));
        assert!(!net.contains("fd00::1".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("8.8.8.8".parse().unwrap()));
        let host: Cidr = "2001:db8::1".parse().unwrap();
        assert!(host.contains("2001:db8::1".parse().unwrap()));
        assert!(!host.contains("2001:db8::2".parse().unwrap()));
        for bad in ["192.168.1.0/33", "fd00::/129", "nonsense", "10.0.0.0/x"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn directions_from_local_networks() {
        let l = local();
        let lan = [192, 168, 1, 10];
        let wan = [93, 184, 216, 34];
        assert_eq!(l.direction(&v4(wan, lan, 6, 443)), Some(Direction::Inbound));
        assert_eq!(
            l.direction(&v4(lan, wan, 6, 443)),
            Some(Direction::Outbound)
        );
        assert_eq!(
            l.direction(&v4(lan, [10, 0, 0, 1], 6, 22)),
            Some(Direction::Internal)
        );
        assert_eq!(
            l.direction(&v4(wan, [1, 1, 1, 1], 17, 53)),
            Some(Direction::External)
        );
        assert_eq!(
            l.direction(&v4(lan, [224, 0, 0, 251], 17, 5353)),
            Some(Direction::Internal)
        );
        let arp = KeyBuilder::non_ip(0x0806).build();
        assert_eq!(l.direction(&arp), None);
    }

    #[test]
    fn services_icmp_quic_and_numbers() {
        let mut s = ServiceRegistry::parse("https 443/tcp\nhttp-alt 8080/tcp\ndomain 53/udp\n");
        s.add_spec("8123/tcp=home-assistant").unwrap();
        let lan = [192, 168, 1, 10];
        let wan = [93, 184, 216, 34];
        assert_eq!(service_name(&v4(lan, wan, 6, 443), &s), "https");
        assert_eq!(service_name(&v4(lan, wan, 17, 443), &s), "https", "QUIC");
        assert_eq!(service_name(&v4(lan, wan, 6, 8080), &s), "http-alt");
        assert_eq!(service_name(&v4(lan, wan, 6, 8123), &s), "home-assistant");
        assert_eq!(service_name(&v4(lan, wan, 6, 9999), &s), "9999");
        assert_eq!(service_name(&v4(lan, wan, 6, 0), &s), "");
        assert_eq!(service_name(&v4(lan, wan, 1, 8), &s), "echo-request");
        assert_eq!(service_name(&v4(lan, wan, 1, 42), &s), "42");
        assert_eq!(service_name(&v4(lan, wan, 1, 0), &s), "echo-reply");
        let later_fragment = KeyBuilder::v4(lan, wan).icmp(0).l4_missing().build();
        assert_eq!(service_name(&later_fragment, &s), "", "not an echo reply");
        assert_eq!(
            service_name(&v4(lan, wan, 47, 0), &s),
            "",
            "GRE has no ports"
        );
        // (IPv4 addresses in an IPv6 key: the addresses play no part.)
        let icmp6 = KeyBuilder::v4(lan, wan)
            .icmpv6(135)
            .family(family::IPV6)
            .build();
        assert_eq!(service_name(&icmp6, &s), "neighbor-solicitation");
    }

    #[test]
    fn protocol_names() {
        let k = |proto| v4([1, 1, 1, 1], [2, 2, 2, 2], proto, 0);
        assert_eq!(proto_name(&k(6)), "tcp");
        assert_eq!(proto_name(&k(58)), "icmp6");
        assert_eq!(proto_name(&k(47)), "gre");
        assert_eq!(proto_name(&k(253)), "253");
        let arp = KeyBuilder::non_ip(0x0806).build();
        assert_eq!(proto_name(&arp), "arp");
        let odd = KeyBuilder::non_ip(0x1234).build();
        assert_eq!(proto_name(&odd), "ethertype-0x1234");
    }

    #[test]
    fn labels_parse_by_name() {
        assert_eq!("src".parse::<Label>(), Ok(Label::Src));
        let err = "colour".parse::<Label>().unwrap_err();
        assert!(err.contains("src, dst"), "{err}");
    }
}
