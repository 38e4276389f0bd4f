//! The kernel side: load the programs, decide where to attach, attach,
//! follow interfaces that come and go, drain the flow tables, and detach
//! and drain one last time on shutdown, so that nothing counted is lost.
//!
//! Rooms, in the order a frame's counts travel:
//! - [`filter`]: tcpdump expressions compiled by libpcap and translated to
//!   eBPF, run before counting;
//! - [`load`]: the embedded eBPF object, its maps and programs
//!   (`ntm_common::programs` is the table of them);
//! - [`links`] and [`plan`]: the interfaces there are, and which hooks of
//!   which ones count each frame once;
//! - [`attach`]: TC or XDP attachments that detach when dropped;
//! - [`drain`]: the lossless swap-and-read of the flow tables;
//! - [`observe`]: the ring buffer of DNS and DHCP frames for names;
//! - [`privileges`]: giving up root once attached;
//! - [`sys`]: the raw system calls all of these make.

pub mod attach;
pub mod drain;
pub mod filter;
pub mod links;
pub mod load;
pub mod observe;
pub mod plan;
pub mod privileges;
pub mod sys;

use std::collections::{BTreeMap, HashMap};

use self::{
    attach::{AttachError, Attachment, Hooks, LinkMode},
    drain::{DrainError, Drained, FlowTables},
    filter::{Filter, FilterError},
    links::{LinkInfo, LinksError},
    load::{Datapath, DatapathError, DatapathOptions},
    plan::plan,
};
use crate::config::{AttachMode, CountMode, FilterSource};
use ntm_common::Direction;

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    Attach(#[from] AttachError),
    #[error("draining the flow tables failed: {0}")]
    Drain(#[from] DrainError),
    #[error("listing this machine's network interfaces failed: {0}")]
    Links(#[from] LinksError),
    #[error(transparent)]
    Filter(#[from] FilterError),
}

/// What the kernel side needs, built from the configuration in one place
/// (`Config::kernel`).
#[derive(Clone, Debug)]
pub struct KernelOptions {
    /// Interface names and patterns, as given.
    pub interfaces: Vec<String>,
    /// Named interfaces that do not exist yet are waited for, not an error.
    pub wait_for_interfaces: bool,
    pub filter: FilterSource,
    pub count_mode: CountMode,
    pub attach_mode: AttachMode,
    pub datapath: DatapathOptions,
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

/// One `ntm_interface_attached` series: traffic labelled `iface`, hooked
/// with `mode`, fully attached or not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterfaceState {
    pub iface: String,
    pub mode: LinkMode,
    pub attached: bool,
}

/// One attached interface, as the self-check sees it.
#[derive(Clone, Debug)]
pub struct Hooked {
    pub ifindex: u32,
    /// The `iface` label of its traffic.
    pub label: String,
    /// The hooks ntm counts at.
    pub directions: &'static [Direction],
    /// The kernel's statistics when it was attached.
    pub since: links::LinkStats,
}

pub struct Kernel {
    /// Attached interfaces by ifindex, with the label of their traffic.
    /// First, so that they are dropped (detached) before the programs.
    attachments: BTreeMap<u32, (Attachment, String)>,
    datapath: Datapath,
    tables: FlowTables,
    options: KernelOptions,
    /// Every ifindex's label ever used: counts drained after an interface
    /// went away still get its name.
    labels: HashMap<u32, String>,
    /// The kernel's statistics of each attached interface when it was
    /// attached: what the self-check compares from.
    stats_at_attach: HashMap<u32, links::LinkStats>,
    /// Planned interfaces that could not be attached, by name: their
    /// traffic label and why.
    failures: BTreeMap<String, (String, String)>,
}

impl Kernel {
    /// Loads the programs (the known service ports written into the kernel
    /// from `known_ports`) and attaches them where `options` asks. A literal
    /// interface name that does not exist is an error unless
    /// `wait_for_interfaces`; on any error nothing stays attached.
    pub fn start(options: &KernelOptions, known_ports: &[u32]) -> Result<Self, KernelError> {
        // A bad filter fails here, before the kernel is touched.
        let filter = load_filter(&options.filter)?;
        let links = links::links()?;
        let (_, missing) = plan(&options.interfaces, &links);
        if let Some(name) = missing.first()
            && !options.wait_for_interfaces
        {
            // Reuse the attach error: it lists the interfaces there are.
            attach::inspect(name)?;
        }
        let (mut datapath, tables) = Datapath::load(&options.datapath, known_ports)?;
        datapath.set_filter(filter)?;
        let mut kernel = Self {
            datapath,
            tables,
            options: options.clone(),
            attachments: BTreeMap::new(),
            labels: HashMap::new(),
            stats_at_attach: HashMap::new(),
            failures: BTreeMap::new(),
        };
        // On an error `kernel` is dropped, and its attachments with it.
        kernel.reconcile_with(&links, true)?;
        Ok(kernel)
    }

    /// Re-reads the interfaces and attaches to new ones (or new bridge
    /// ports), detaches from those no longer planned. Counts already taken
    /// stay. Returns whether anything changed.
    pub fn reconcile(&mut self) -> Result<bool, KernelError> {
        let links = links::links()?;
        self.reconcile_with(&links, false)
    }

    fn reconcile_with(&mut self, links: &[LinkInfo], strict: bool) -> Result<bool, KernelError> {
        let (mut planned, _) = plan(&self.options.interfaces, links);
        if self.options.count_mode == CountMode::Xdp {
            // XDP sees what arrives; a bridge device's egress has no XDP hook.
            planned.retain(|p| p.hooks != Hooks::Egress);
            for p in &mut planned {
                p.hooks = Hooks::Ingress;
            }
        }
        let mut changed = false;
        // Gone, or planned differently: let go (dropping detaches).
        let before = self.attachments.len();
        self.attachments.retain(|index, (a, label)| {
            let keep = planned
                .iter()
                .any(|p| p.ifindex == *index && p.hooks == a.hooks && &p.label == label);
            if !keep {
                log::info!("no longer attached to {}", a.iface);
            }
            keep
        });
        changed |= self.attachments.len() != before;
        let attachments = &self.attachments;
        self.stats_at_attach
            .retain(|index, _| attachments.contains_key(index));
        self.failures.clear();
        let mut attached_now = Vec::new();
        for p in planned {
            if self.attachments.contains_key(&p.ifindex) {
                continue;
            }
            // Counting frames the filter cannot judge would count what it
            // excludes: such an interface is not attached.
            if let Ok((_, link_type)) = attach::inspect(&p.iface)
                && let Err(e) = self.datapath.filter_allows(link_type)
            {
                if strict {
                    return Err(e.into());
                }
                log::warn!("not attaching to {}: {e}", p.iface);
                self.failures
                    .insert(p.iface.clone(), (p.label.clone(), e.to_string()));
                continue;
            }
            let attached = match self.options.count_mode {
                CountMode::Tc => attach::attach_tc(
                    &mut self.datapath,
                    &p.iface,
                    p.hooks,
                    self.options.attach_mode,
                ),
                CountMode::Xdp => attach::attach_xdp(&mut self.datapath, &p.iface),
            };
            match attached {
                Ok(attachment) => {
                    self.labels.insert(p.ifindex, p.label.clone());
                    attached_now.push(p.ifindex);
                    self.attachments.insert(p.ifindex, (attachment, p.label));
                    changed = true;
                }
                Err(e) if strict => return Err(e.into()),
                Err(e) => {
                    log::warn!("could not attach to {}: {e}", p.iface);
                    self.failures
                        .insert(p.iface.clone(), (p.label.clone(), e.to_string()));
                }
            }
        }
        if !attached_now.is_empty() {
            // Where the kernel's counters stood when counting began; an
            // interface without statistics is compared from zero.
            let stats = links::link_stats().unwrap_or_else(|e| {
                log::warn!("cannot read the interfaces' statistics for the self-check: {e}");
                HashMap::new()
            });
            for index in attached_now {
                let at = stats.get(&index).copied().unwrap_or_default();
                self.stats_at_attach.insert(index, at);
            }
        }
        Ok(changed)
    }

    /// Each attached interface's hooks, label and the kernel's statistics
    /// when it was attached, for the self-check.
    pub fn hooked(&self) -> Vec<Hooked> {
        self.attachments
            .iter()
            .map(|(index, (attachment, label))| Hooked {
                ifindex: *index,
                label: label.clone(),
                directions: match attachment.hooks {
                    Hooks::Both => &[Direction::Ingress, Direction::Egress],
                    Hooks::Ingress => &[Direction::Ingress],
                    Hooks::Egress => &[Direction::Egress],
                },
                since: self.stats_at_attach.get(index).copied().unwrap_or_default(),
            })
            .collect()
    }

    /// Puts a new filter in place (SIGHUP). It must compile and load for
    /// every interface attached now; otherwise nothing changes and the error
    /// says why. Counting goes on throughout: each hook switches filters
    /// between two frames.
    pub fn replace_filter(&mut self, filter: Option<Filter>) -> Result<(), KernelError> {
        if let Some(filter) = &filter {
            for (attachment, _) in self.attachments.values() {
                filter.program(attachment.link_type)?;
            }
        }
        self.datapath.set_filter(filter)?;
        Ok(())
    }

    /// The filter expression in effect, if any.
    pub fn filter_expression(&self) -> Option<&str> {
        self.datapath.filter().map(|f| f.expression.as_str())
    }

    /// Everything counted since the last drain.
    /// With the kernel's interface statistics read right after, for the
    /// self-check (so that few frames cross between the two).
    pub fn drain(&mut self) -> Result<Drained, KernelError> {
        let mut drained = self.tables.drain()?;
        match links::link_stats() {
            Ok(stats) => drained.link_stats = stats,
            Err(e) => log::debug!("interface statistics for the self-check: {e}"),
        }
        Ok(drained)
    }

    pub fn attachments(&self) -> impl Iterator<Item = &Attachment> {
        self.attachments.values().map(|(a, _)| a)
    }

    /// Per requested name or pattern: whether everything it asks for is
    /// attached. A pattern that matches nothing (yet) is not a failure; a
    /// missing interface name is.
    pub fn health(&self) -> Vec<(String, bool)> {
        let links = links::links().unwrap_or_default();
        let (planned, missing) = plan(&self.options.interfaces, &links);
        self.options
            .interfaces
            .iter()
            .map(|r| {
                let ok = !missing.contains(r)
                    && planned
                        .iter()
                        .filter(|p| links::name_matches(r, &p.label))
                        .all(|p| self.attachments.contains_key(&p.ifindex));
                (r.clone(), ok)
            })
            .collect()
    }

    /// How each traffic label's interfaces are hooked: one entry per label
    /// and mode, attached only if all of them are. Interfaces not attached
    /// (missing, or refused) show the mode ntm tries first.
    pub fn interface_states(&self) -> Vec<InterfaceState> {
        let planned_mode = match self.options.count_mode {
            CountMode::Xdp => LinkMode::XdpNative,
            CountMode::Tc => attach::tc_mode(self.options.attach_mode).unwrap_or(LinkMode::Clsact),
        };
        let mut states: BTreeMap<(String, LinkMode), bool> = BTreeMap::new();
        for (attachment, label) in self.attachments.values() {
            states
                .entry((label.clone(), attachment.mode()))
                .or_insert(true);
        }
        let links = links::links().unwrap_or_default();
        let (_, missing) = plan(&self.options.interfaces, &links);
        let unattached = self
            .failures
            .values()
            .map(|(label, _)| label.clone())
            .chain(missing);
        for label in unattached {
            let mode = states
                .keys()
                .find(|(l, _)| *l == label)
                .map_or(planned_mode, |(_, m)| *m);
            states.insert((label, mode), false);
        }
        states
            .into_iter()
            .map(|((iface, mode), attached)| InterfaceState {
                iface,
                mode,
                attached,
            })
            .collect()
    }

    /// Detaches everywhere, then drains twice: once for the tables that
    /// were active, once for the others, so every packet counted before the
    /// detach is in what this returns.
    pub fn shutdown(mut self) -> Result<Drained, KernelError> {
        self.attachments.clear();
        let mut last = self.drain()?;
        let more = self.drain()?;
        last.flows.extend(more.flows);
        last.outside.merge(&more.outside);
        Ok(last)
    }

    /// The `iface` label of traffic counted on each interface index (a
    /// bridge port's traffic is labelled with its bridge).
    /// The ring buffer of DNS and DHCP frames, once (None if observation
    /// is off).
    pub fn take_observer(&mut self) -> Option<observe::Observer> {
        self.datapath.take_observer()
    }

    /// The table of source MACs by address, once (None if not learnt).
    pub fn take_macs(&mut self) -> Option<observe::LearntMacs> {
        self.datapath.take_macs()
    }

    pub fn interface_labels(&self) -> &HashMap<u32, String> {
        &self.labels
    }
}
