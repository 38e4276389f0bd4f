//! The agent's lifecycle: load, decide where to attach, attach, follow
//! interfaces that come and go, drain on a timer, and detach and drain one
//! last time on shutdown, so that nothing counted is lost.

use std::collections::{BTreeMap, HashMap};

use ntm_common::Counters;

use crate::{
    attach::{self, AttachError, Attachment, Hooks, LinkKind},
    config::{AttachMode, Config, ConfigError, CountMode, FilterSource, XdpAction},
    datapath::{Datapath, DatapathError, DatapathOptions},
    drain::{Drained, FlowTables},
    filter::{self, Filter, FilterError, LinkType},
    flows::FlowTotals,
    netlink::{self, LinkInfo},
    services::{ServiceRegistry, ServicesError},
};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Services(#[from] ServicesError),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    Attach(#[from] AttachError),
    #[error("draining the flow tables failed: {0}")]
    Drain(#[from] crate::drain::DrainError),
    #[error("listing this machine's network interfaces failed: {0}")]
    Links(std::io::Error),
    #[error(transparent)]
    Filter(#[from] FilterError),
}

/// Reads and compiles the configured filter (None: count every frame). A
/// filter file that holds only comments means no filter.
pub fn load_filter(source: &FilterSource) -> Result<Option<Filter>, FilterError> {
    let expression = match source {
        FilterSource::None => return Ok(None),
        FilterSource::Expression(expression) => expression.clone(),
        FilterSource::File(path) => filter::read_filter_file(path)?,
    };
    if expression.is_empty() {
        return Ok(None);
    }
    Filter::compile(&expression).map(Some)
}

fn link_type(kind: LinkKind) -> LinkType {
    match kind {
        LinkKind::Ethernet => LinkType::Ethernet,
        LinkKind::L3 => LinkType::RawIp,
    }
}

/// Where to attach: one interface, which of its hooks, and the `iface` label
/// its traffic gets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Planned {
    pub iface: String,
    pub ifindex: u32,
    pub hooks: Hooks,
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
            .filter(|l| netlink::name_matches(request, &l.name))
            .collect();
        if matched.is_empty() && !netlink::is_pattern(request) {
            missing.push(request.clone());
        }
        for link in matched {
            if link.kind == "bridge" {
                planned.insert(
                    link.index,
                    Planned {
                        iface: link.name.clone(),
                        ifindex: link.index,
                        hooks: Hooks::Egress,
                        label: link.name.clone(),
                    },
                );
                for port in links.iter().filter(|p| p.master == Some(link.index)) {
                    planned.insert(
                        port.index,
                        Planned {
                            iface: port.name.clone(),
                            ifindex: port.index,
                            hooks: Hooks::Ingress,
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
                    .is_some_and(|m| requested.iter().any(|r| netlink::name_matches(r, &m.name)));
                if bridged && bridge_requested {
                    // Its bridge is monitored: the port's traffic is counted
                    // there, once. Hooking it as well would count it twice.
                    continue;
                }
                planned.entry(link.index).or_insert(Planned {
                    iface: link.name.clone(),
                    ifindex: link.index,
                    hooks: Hooks::Both,
                    label: link.name.clone(),
                });
            }
        }
    }
    (planned.into_values().collect(), missing)
}

pub struct Agent {
    datapath: Datapath,
    tables: FlowTables,
    requested: Vec<String>,
    mode: AttachMode,
    count_mode: CountMode,
    /// Attached interfaces by ifindex, with the label of their traffic.
    attachments: BTreeMap<u32, (Attachment, String)>,
    /// Every ifindex's label ever used: counts drained after an interface
    /// went away still get its name.
    labels: HashMap<u32, String>,
    /// Planned hooks that could not be attached, by interface, with why.
    failures: BTreeMap<String, String>,
    pub totals: FlowTotals,
    pub services: ServiceRegistry,
}

impl Agent {
    /// Loads the programs and attaches them where `config` asks. A literal
    /// interface name that does not exist is an error unless
    /// --wait-for-interfaces; on any error nothing stays attached.
    pub fn start(config: &Config) -> Result<Self, AgentError> {
        let requested = config.resolved_interfaces()?;
        // A bad filter fails here, before the kernel is touched.
        let filter = load_filter(&config.filter_source()?)?;
        let mut services = ServiceRegistry::from_file(&config.services_file)?;
        for spec in &config.services {
            services.add_spec(spec)?;
        }
        let links = netlink::links().map_err(AgentError::Links)?;
        let (_, missing) = plan(&requested, &links);
        if let Some(name) = missing.first()
            && !config.wait_for_interfaces
        {
            // Reuse the attach error: it lists the interfaces there are.
            attach::inspect(name)?;
        }
        let options = DatapathOptions {
            flow_table_entries: config.flow_table_size,
            ephemeral_start: config.ephemeral_start,
            xdp_drop: config.xdp_action == XdpAction::Drop,
        };
        let (mut datapath, tables) = Datapath::load(&options, &services)?;
        datapath.set_filter(filter)?;
        let mut agent = Self {
            datapath,
            tables,
            requested,
            mode: config.attach_mode,
            count_mode: config.mode,
            attachments: BTreeMap::new(),
            labels: HashMap::new(),
            failures: BTreeMap::new(),
            totals: FlowTotals::default(),
            services,
        };
        if let Err(e) = agent.reconcile_with(&links, true) {
            agent.detach_all();
            return Err(e);
        }
        Ok(agent)
    }

    /// Re-reads the interfaces and attaches to new ones (or new bridge
    /// ports), detaches from those no longer planned. Counts already taken
    /// stay. Returns whether anything changed.
    pub fn reconcile(&mut self) -> Result<bool, AgentError> {
        let links = netlink::links().map_err(AgentError::Links)?;
        self.reconcile_with(&links, false)
    }

    fn reconcile_with(&mut self, links: &[LinkInfo], strict: bool) -> Result<bool, AgentError> {
        let (mut planned, _) = plan(&self.requested, links);
        if self.count_mode == CountMode::Xdp {
            // XDP sees what arrives; a bridge device's egress has no XDP hook.
            planned.retain(|p| p.hooks != Hooks::Egress);
            for p in &mut planned {
                p.hooks = Hooks::Ingress;
            }
        }
        let mut changed = false;
        let present: HashMap<u32, &LinkInfo> = links.iter().map(|l| (l.index, l)).collect();
        // Gone, or planned differently: let go.
        let stale: Vec<u32> = self
            .attachments
            .iter()
            .filter(|(index, (a, label))| {
                !planned
                    .iter()
                    .any(|p| p.ifindex == **index && p.hooks == a.hooks && &p.label == label)
            })
            .map(|(index, _)| *index)
            .collect();
        for index in stale {
            if let Some((mut attachment, _)) = self.attachments.remove(&index) {
                if present.contains_key(&index) {
                    attach::detach(&mut self.datapath, &mut attachment);
                }
                log::info!("no longer attached to {}", attachment.iface);
                changed = true;
            }
        }
        self.failures.clear();
        for p in planned {
            if self.attachments.contains_key(&p.ifindex) {
                continue;
            }
            // Counting frames the filter cannot judge would count what it
            // excludes: such an interface is not attached.
            if let Ok((_, kind)) = attach::inspect(&p.iface)
                && let Err(e) = self.datapath.filter_allows(link_type(kind))
            {
                if strict {
                    return Err(e.into());
                }
                log::warn!("not attaching to {}: {e}", p.iface);
                self.failures.insert(p.iface.clone(), e.to_string());
                continue;
            }
            let attached = match self.count_mode {
                CountMode::Tc => attach::attach(&mut self.datapath, &p.iface, p.hooks, self.mode),
                CountMode::Xdp => attach::attach_xdp(&mut self.datapath, &p.iface),
            };
            match attached {
                Ok(attachment) => {
                    self.labels.insert(p.ifindex, p.label.clone());
                    self.attachments.insert(p.ifindex, (attachment, p.label));
                    changed = true;
                }
                Err(e) if strict => return Err(e.into()),
                Err(e) => {
                    log::warn!("could not attach to {}: {e}", p.iface);
                    self.failures.insert(p.iface.clone(), e.to_string());
                }
            }
        }
        Ok(changed)
    }

    /// Puts a new filter in place (SIGHUP). It must compile and load for
    /// every interface attached now; otherwise nothing changes and the error
    /// says why. Counting goes on throughout: each hook switches filters
    /// between two frames.
    pub fn replace_filter(&mut self, filter: Option<Filter>) -> Result<(), AgentError> {
        if let Some(filter) = &filter {
            for (attachment, _) in self.attachments.values() {
                filter.program(link_type(attachment.kind))?;
            }
        }
        self.datapath.set_filter(filter)?;
        Ok(())
    }

    /// The filter expression in effect, if any.
    pub fn filter_expression(&self) -> Option<&str> {
        self.datapath.filter().map(|f| f.expression.as_str())
    }

    /// Drains the kernel's tables into the running totals.
    pub fn drain(&mut self) -> Result<Drained, AgentError> {
        let drained = self.tables.drain()?;
        self.totals.apply(&drained);
        Ok(drained)
    }

    pub fn attachments(&self) -> impl Iterator<Item = &Attachment> {
        self.attachments.values().map(|(a, _)| a)
    }

    /// Per requested name or pattern: whether everything it asks for is
    /// attached. A pattern that matches nothing (yet) is not a failure; a
    /// missing interface name is.
    pub fn health(&self) -> Vec<(String, bool)> {
        let links = netlink::links().unwrap_or_default();
        let (planned, missing) = plan(&self.requested, &links);
        self.requested
            .iter()
            .map(|r| {
                let ok = !missing.contains(r)
                    && planned
                        .iter()
                        .filter(|p| netlink::name_matches(r, &p.label))
                        .all(|p| self.attachments.contains_key(&p.ifindex));
                (r.clone(), ok)
            })
            .collect()
    }

    /// Detaches everywhere, then drains twice: once for the tables that
    /// were active, once for the others, so every packet counted before the
    /// detach reaches the totals.
    pub fn shutdown(mut self) -> Result<FlowTotals, AgentError> {
        self.detach_all();
        self.drain()?;
        self.drain()?;
        Ok(self.totals)
    }

    fn detach_all(&mut self) {
        for (attachment, _) in self.attachments.values_mut() {
            attach::detach(&mut self.datapath, attachment);
        }
        self.attachments.clear();
    }

    /// The `iface` label of traffic counted on each interface index (a
    /// bridge port's traffic is labelled with its bridge).
    pub fn interface_names(&self) -> HashMap<u32, String> {
        self.labels.clone()
    }

    pub fn grand_total(&self) -> Counters {
        self.totals.grand_total()
    }
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
        let got: Vec<(&str, Hooks, &str)> = bridge
            .iter()
            .map(|p| (p.iface.as_str(), p.hooks, p.label.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("eth0", Hooks::Ingress, "br0"),
                ("eth1", Hooks::Ingress, "br0"),
                ("br0", Hooks::Egress, "br0"),
            ]
        );
    }

    #[test]
    fn a_port_of_a_monitored_bridge_is_not_hooked_twice() {
        let (both, _) = plan(&req(&["br0", "eth0", "wan"]), &links());
        let eth0: Vec<&Planned> = both.iter().filter(|p| p.iface == "eth0").collect();
        assert_eq!(eth0.len(), 1);
        assert_eq!(eth0[0].hooks, Hooks::Ingress);
        assert!(
            both.iter()
                .any(|p| p.iface == "wan" && p.hooks == Hooks::Both)
        );
        // A port on its own, without its bridge: both hooks.
        let (alone, _) = plan(&req(&["eth1"]), &links());
        assert_eq!(alone[0].hooks, Hooks::Both);
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
