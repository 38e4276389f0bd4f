//! Running totals built from drained deltas: what the exporter will read.

use std::{
    collections::HashMap,
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ntm_common::{Counters, Direction, FlowKey, OutsideReason, family};

use crate::drain::Drained;

#[derive(Clone, Debug, Default)]
pub struct FlowTotals {
    pub flows: HashMap<FlowKey, Counters>,
    pub outside: [Counters; OutsideReason::COUNT as usize],
}

impl FlowTotals {
    pub fn apply(&mut self, drained: &Drained) {
        for (key, delta) in &drained.flows {
            self.flows.entry(*key).or_default().add(delta);
        }
        for (total, delta) in self.outside.iter_mut().zip(drained.outside.iter()) {
            total.add(delta);
        }
    }

    /// Everything counted: all flows plus everything outside the table.
    pub fn grand_total(&self) -> Counters {
        let mut total = Counters::default();
        for c in self.flows.values().chain(self.outside.iter()) {
            total.add(c);
        }
        total
    }

    /// A plain-text table of the biggest flows, for logs and the exit summary.
    pub fn report(&self, top: usize, ifname: impl Fn(u32) -> String) -> String {
        let mut rows: Vec<(&FlowKey, &Counters)> = self.flows.iter().collect();
        rows.sort_by(|a, b| b.1.bytes.cmp(&a.1.bytes).then(a.0.cmp(b.0)));
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<10} {:<7} {:<40} {:<40} {:>6} {:>6} {:>5} {:>14} {:>10}",
            "iface", "dir", "src", "dst", "proto", "port", "vlan", "bytes", "packets"
        );
        for (key, c) in rows.iter().take(top) {
            let _ = writeln!(
                out,
                "{:<10} {:<7} {:<40} {:<40} {:>6} {:>6} {:>5} {:>14} {:>10}",
                ifname(key.ifindex),
                direction_name(key.direction),
                address(key, true).map_or("-".into(), |a| a.to_string()),
                address(key, false).map_or("-".into(), |a| a.to_string()),
                if key.family == family::NON_IP {
                    format!("0x{:04x}", key.port)
                } else {
                    key.proto.to_string()
                },
                if key.family == family::NON_IP {
                    "-".to_string()
                } else {
                    key.port.to_string()
                },
                key.vlan_id,
                c.bytes,
                c.packets
            );
        }
        if rows.len() > top {
            let _ = writeln!(out, "... {} more flows", rows.len() - top);
        }
        for reason in OutsideReason::ALL {
            let c = self.outside[reason as usize];
            if c.packets != 0 {
                let _ = writeln!(
                    out,
                    "outside the flow table, {}: {} bytes, {} packets",
                    reason.as_str(),
                    c.bytes,
                    c.packets
                );
            }
        }
        out
    }
}

pub fn direction_name(direction: u8) -> &'static str {
    match Direction::from_u8(direction) {
        Some(Direction::Ingress) => "ingress",
        Some(Direction::Egress) => "egress",
        None => "?",
    }
}

/// The source (`src == true`) or destination address of an IP flow key.
pub fn address(key: &FlowKey, src: bool) -> Option<IpAddr> {
    let bytes = if src { key.src } else { key.dst };
    match key.family {
        family::IPV4 => Some(IpAddr::V4(Ipv4Addr::new(
            bytes[0], bytes[1], bytes[2], bytes[3],
        ))),
        family::IPV6 => Some(IpAddr::V6(Ipv6Addr::from(bytes))),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(port: u16) -> FlowKey {
        let mut k = FlowKey {
            family: family::IPV4,
            proto: 17,
            port,
            ..Default::default()
        };
        k.src[..4].copy_from_slice(&[198, 18, 0, 1]);
        k.dst[..4].copy_from_slice(&[198, 18, 0, 2]);
        k
    }

    #[test]
    fn totals_add_deltas_and_outside() {
        let mut totals = FlowTotals::default();
        let mut d = Drained::default();
        d.flows.push((
            key(53),
            Counters {
                bytes: 100,
                packets: 2,
            },
        ));
        d.outside[OutsideReason::TableFull as usize] = Counters {
            bytes: 7,
            packets: 1,
        };
        totals.apply(&d);
        totals.apply(&d);
        assert_eq!(
            totals.flows[&key(53)],
            Counters {
                bytes: 200,
                packets: 4
            }
        );
        assert_eq!(
            totals.grand_total(),
            Counters {
                bytes: 214,
                packets: 6
            }
        );
        let report = totals.report(10, |i| format!("if{i}"));
        assert!(report.contains("198.18.0.1"), "{report}");
        assert!(
            report.contains("table_full: 14 bytes, 2 packets"),
            "{report}"
        );
    }

    #[test]
    fn addresses_by_family() {
        let k = key(1);
        assert_eq!(address(&k, true), Some("198.18.0.1".parse().unwrap()));
        let mut k6 = FlowKey {
            family: family::IPV6,
            ..Default::default()
        };
        k6.dst = "2001:2::1".parse::<Ipv6Addr>().unwrap().octets();
        assert_eq!(address(&k6, false), Some("2001:2::1".parse().unwrap()));
        let arp = FlowKey::default();
        assert_eq!(address(&arp, true), None);
    }
}
