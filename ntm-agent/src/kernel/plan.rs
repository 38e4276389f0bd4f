//! Where to attach: which interfaces the requested names and patterns
//! mean, and which of their hooks count each frame exactly once.

use std::collections::{BTreeMap, HashMap};

use super::{
    attach::HookSet,
    links::{self, LinkInfo},
};

/// Where to attach: one interface, which of its hooks, and the `iface` label
/// its traffic gets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Planned {
    pub iface: String,
    pub ifindex: u32,
    pub hooks: HookSet,
    pub label: String,
}

/// Decides the hooks for the requested names and patterns.
///
/// A bridge is counted where every frame crosses it exactly once: at the
/// ingress of each of its ports (frames entering from the ports, including
/// those bridged port to port, which never pass the bridge device's own
/// hooks) and at the bridge device's egress (frames the host sends into it).
/// Frames leaving the bridge were counted where they entered.
///
/// Returns the plan and the literal names that match no interface.
pub fn plan(requested: &[String], links: &[LinkInfo]) -> (Vec<Planned>, Vec<String>) {
    let mut planned: BTreeMap<u32, Planned> = BTreeMap::new();
    let mut missing = Vec::new();
    let by_index: HashMap<u32, &LinkInfo> = links.iter().map(|l| (l.index, l)).collect();
    for request in requested {
        let matched: Vec<&LinkInfo> = links
            .iter()
            .filter(|l| links::name_matches(request, &l.name))
            .collect();
        if matched.is_empty() && !links::is_pattern(request) {
            missing.push(request.clone());
        }
        for link in matched {
            if link.kind == "bridge" {
                planned.insert(
                    link.index,
                    Planned {
                        iface: link.name.clone(),
                        ifindex: link.index,
                        hooks: HookSet::Egress,
                        label: link.name.clone(),
                    },
                );
                for port in links.iter().filter(|p| p.master == Some(link.index)) {
                    planned.insert(
                        port.index,
                        Planned {
                            iface: port.name.clone(),
                            ifindex: port.index,
                            hooks: HookSet::Ingress,
                            label: link.name.clone(),
                        },
                    );
                }
            } else {
                let bridged = link
                    .master
                    .and_then(|m| by_index.get(&m))
                    .is_some_and(|m| m.kind == "bridge");
                let bridge_requested = link
                    .master
                    .and_then(|m| by_index.get(&m))
                    .is_some_and(|m| requested.iter().any(|r| links::name_matches(r, &m.name)));
                if bridged && bridge_requested {
                    // Its bridge is monitored: the port's traffic is counted
                    // there, once. Hooking it as well would count it twice.
                    continue;
                }
                // Loopback sees each packet twice, leaving and coming back
                // in: counted once, at ingress.
                let hooks = if link.loopback {
                    HookSet::Ingress
                } else {
                    HookSet::Both
                };
                planned.entry(link.index).or_insert(Planned {
                    iface: link.name.clone(),
                    ifindex: link.index,
                    hooks,
                    label: link.name.clone(),
                });
            }
        }
    }
    (planned.into_values().collect(), missing)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(index: u32, name: &str, kind: &str, master: Option<u32>) -> LinkInfo {
        LinkInfo {
            index,
            name: name.into(),
            kind: kind.into(),
            master,
            loopback: name == "lo",
        }
    }

    fn links() -> Vec<LinkInfo> {
        vec![
            link(1, "lo", "", None),
            link(2, "eth0", "", Some(5)),
            link(3, "eth1", "", Some(5)),
            link(4, "wan", "", None),
            link(5, "br0", "bridge", None),
            link(6, "veth1a", "veth", None),
            link(7, "veth2b", "veth", None),
        ]
    }

    fn req(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_bridge_is_hooked_at_its_ports_ingress_and_its_own_egress() {
        let (bridge, missing) = plan(&req(&["br0"]), &links());
        assert!(missing.is_empty());
        let got: Vec<(&str, HookSet, &str)> = bridge
            .iter()
            .map(|p| (p.iface.as_str(), p.hooks, p.label.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("eth0", HookSet::Ingress, "br0"),
                ("eth1", HookSet::Ingress, "br0"),
                ("br0", HookSet::Egress, "br0"),
            ]
        );
    }

    #[test]
    fn a_port_of_a_monitored_bridge_is_not_hooked_twice() {
        let (both, _) = plan(&req(&["br0", "eth0", "wan"]), &links());
        let eth0: Vec<&Planned> = both.iter().filter(|p| p.iface == "eth0").collect();
        assert_eq!(eth0.len(), 1);
        assert_eq!(eth0[0].hooks, HookSet::Ingress);
        assert!(
            both.iter()
                .any(|p| p.iface == "wan" && p.hooks == HookSet::Both)
        );
        // A port on its own, without its bridge: both hooks.
        let (alone, _) = plan(&req(&["eth1"]), &links());
        assert_eq!(alone[0].hooks, HookSet::Both);
        let (lo, _) = plan(&["lo".into()], &[link(1, "lo", "", None)]);
        assert_eq!(lo[0].hooks, HookSet::Ingress, "loopback: each packet once");
    }

    #[test]
    fn patterns_and_missing_names() {
        let (matched, missing) = plan(&req(&["veth*", "wg0", "ppp*"]), &links());
        let names: Vec<&str> = matched.iter().map(|p| p.iface.as_str()).collect();
        assert_eq!(names, vec!["veth1a", "veth2b"]);
        assert_eq!(
            missing,
            vec!["wg0"],
            "a pattern matching nothing is not missing"
        );
    }
}
