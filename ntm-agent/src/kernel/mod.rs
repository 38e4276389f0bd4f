//! The kernel side: load the programs, decide where to attach, attach,
//! follow interfaces that come and go, drain the flow tables, and detach
//! and drain one last time on shutdown, so that nothing counted is lost.
//!
//! Rooms, in the order a frame's counts travel (the tcpdump filters it
//! installs come from [`crate::filter`], the system calls it makes from
//! [`crate::sys`]):
//! - [`load`]: the embedded eBPF object, its maps and programs
//!   (`ntm_common::programs` is the table of them);
//! - [`links`] and [`plan`]: the interfaces there are, and which hooks of
//!   which ones count each frame once;
//! - [`attach`]: TC or XDP attachments that detach when dropped;
//! - [`drain`]: the lossless swap-and-read of the flow tables;
//! - [`pins`]: what is kept in bpffs so that counting goes on while no
//!   agent runs, and taken over by the next;
//! - [`observe`]: the ring buffer of DNS and DHCP frames for names;
//! - [`privileges`]: giving up root once attached.

pub mod attach;
pub mod drain;
pub mod flow_cache;
pub mod handshakes;
pub mod links;
pub mod load;
pub mod local_nets;
pub mod observe;
pub mod pins;
pub mod plan;
pub mod privileges;
pub mod retransmits;

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
};

use crate::{
    filter::{self, Filter, FilterError},
    sys::netns::{AgentLock, LockError},
};

use self::{
    attach::{AttachError, Attachment, HookSet, LinkMode},
    drain::{DrainError, Drained, FlowTables},
    links::{LinkInfo, LinksError},
    load::{Datapath, DatapathError, DatapathOptions},
    pins::{NetnsPins, PinError},
    plan::plan,
};
use ntm_common::{Counters, Hook, LAYOUT_VERSION};

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
    #[error(transparent)]
    Pins(#[from] PinError),
    #[error(
        "another ntm agent is already running in this network namespace (process {}): stop it first; two would count every packet twice",
        pid.map_or("unknown".to_string(), |p| p.to_string())
    )]
    AnotherAgent { pid: Option<u32> },
    #[error("cannot take this network namespace's agent lock: {0}")]
    Lock(#[source] LockError),
    #[error("renewing the lease of the kernel programs failed: {0}")]
    Lease(#[source] aya::maps::MapError),
}

/// This namespace's agent lock, or who holds it.
fn take_lock() -> Result<AgentLock, KernelError> {
    AgentLock::take().map_err(|e| match e {
        LockError::Held { pid } => KernelError::AnotherAgent { pid },
        e => KernelError::Lock(e),
    })
}

/// Where the tcpdump filter comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FilterSource {
    /// None: every frame is counted.
    None,
    /// The positional words or NTM_FILTERS, fixed for the process's life.
    Expression(String),
    /// A file, read at start and again on SIGHUP.
    File(std::path::PathBuf),
}

/// Where packets are counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum CountMode {
    /// TC ingress and egress: everything in and out of the host.
    Tc,
    /// XDP ingress only: mirror/SPAN ports, before the stack.
    Xdp,
}

/// How TC programs are attached (`--attach-mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AttachMode {
    Auto,
    Tcx,
    Clsact,
}

/// The `iface` label of traffic counted on interface `ifindex`: the
/// interface's (or its bridge's) label, `other` where the kernel could not
/// keep the interface, the index for an interface ntm never attached to.
pub fn iface_label(iface_labels: &std::collections::HashMap<u32, String>, ifindex: u32) -> String {
    if ifindex == drain::Outside::UNKNOWN_IFINDEX {
        return crate::model::OTHER.to_string();
    }
    iface_labels
        .get(&ifindex)
        .cloned()
        .unwrap_or_else(|| ifindex.to_string())
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
    /// Where to keep the links and tables in bpffs across restarts (None:
    /// counting stops with the agent).
    pub pin_dir: Option<PathBuf>,
    /// How long the programs go on counting with no agent (None: until
    /// `ntm-agent detach`).
    pub orphan_timeout: Option<std::time::Duration>,
    /// A stop is for good: detach and remove the pinned state, as
    /// `ntm-agent detach` would (the chart sets it before uninstalling).
    pub detach_on_stop: bool,
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
    pub hooks: &'static [Hook],
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
    /// This namespace's pinned state, if kept, and this agent's maps in it.
    pins: Option<NetnsPins>,
    maps_dir: Option<PathBuf>,
    /// What earlier agents' tables held, until the agent takes it.
    adopted: Option<Drained>,
    /// The TCP retransmissions of this host's connections, if counted.
    retransmits: Option<retransmits::Retransmits>,
    /// The TCP handshakes seen on the hooks, if followed.
    handshakes: Option<handshakes::Handshakes>,
    /// One agent per network namespace, for as long as this one lives.
    _lock: AgentLock,
}

/// What `ntm-agent detach` removed.
#[derive(Clone, Debug, Default)]
pub struct Detached {
    /// Pinned TCX and XDP links unpinned (so detached).
    pub links: usize,
    /// clsact filters removed.
    pub filters: usize,
    /// What the pinned tables held that no agent had exported.
    pub unexported: Counters,
}

/// Stops counting for good in the calling thread's network namespace:
/// unpins every link (which detaches it), removes ntm's clsact filters and
/// the pinned tables. Refused while an agent runs here.
pub fn detach(pin_root: &Path) -> Result<Detached, KernelError> {
    let _lock = take_lock()?;
    let mut detached = Detached::default();
    let pins = NetnsPins::locate(pin_root)?.filter(|p| p.dir().exists());
    if let Some(pins) = &pins {
        for link in pins.links() {
            pins::remove_tree(&link)?;
            detached.links += 1;
        }
    }
    detached.filters = attach::remove_clsact_filters_except(&[]);
    if let Some(pins) = &pins {
        // Nothing counts into them now: what they hold was never exported.
        for earlier in pins.earlier_maps(None) {
            match pins::drain_earlier(&earlier) {
                Ok(drained) => detached.unexported.add(&drained.total()),
                Err(e) => log::warn!("{e}"),
            }
        }
        pins.remove()?;
    }
    Ok(detached)
}

impl Kernel {
    /// Loads the programs (the known service ports written into the kernel
    /// from `known_ports`) and attaches them where `options` asks. A literal
    /// interface name that does not exist is an error unless
    /// `wait_for_interfaces`; on any error nothing stays attached.
    pub fn start(options: &KernelOptions, known_ports: &[u32]) -> Result<Self, KernelError> {
        // A bad filter fails here, before the kernel is touched.
        let filter = load_filter(&options.filter)?;
        let lock = take_lock()?;
        let links = links::links()?;
        let (_, missing) = plan(&options.interfaces, &links);
        if let Some(name) = missing.first()
            && !options.wait_for_interfaces
        {
            // Reuse the attach error: it lists the interfaces there are.
            attach::inspect(name)?;
        }
        let pins = match &options.pin_dir {
            Some(root) => open_pins(root),
            None => None,
        };
        // On any error below: no empty folders left in the bpffs.
        let unopen = |pins: &Option<NetnsPins>| {
            if let Some(pins) = pins {
                pins.remove_if_empty();
            }
        };
        let maps_dir = match pins.as_ref().map(NetnsPins::new_maps_dir).transpose() {
            Ok(dir) => dir,
            // Started without privileges where an earlier agent (root) left
            // its state: what is missing is the privileges, not the folder.
            Err(PinError::Io { source, path, .. })
                if source.kind() == std::io::ErrorKind::PermissionDenied
                    && !privileges::may_load_programs() =>
            {
                unopen(&pins);
                return Err(DatapathError::NotPermitted {
                    what: format!("writing its pinned state in {}", path.display()),
                }
                .into());
            }
            Err(e) => {
                unopen(&pins);
                return Err(e.into());
            }
        };
        let loaded = Datapath::load(&options.datapath, known_ports, maps_dir.as_deref())
            .map_err(KernelError::from)
            .and_then(|(mut datapath, tables)| {
                datapath.set_filter(filter)?;
                datapath
                    .renew_lease(options.orphan_timeout)
                    .map_err(KernelError::Lease)?;
                Ok((datapath, tables))
            });
        let (mut datapath, tables) = match loaded {
            Ok(loaded) => loaded,
            Err(e) => {
                if let Some(dir) = &maps_dir {
                    let _ = pins::remove_tree(dir);
                }
                unopen(&pins);
                return Err(e);
            }
        };
        let retransmits = datapath.take_retransmits();
        let handshakes = datapath.take_handshakes();
        let mut kernel = Self {
            datapath,
            tables,
            retransmits,
            handshakes,
            options: options.clone(),
            attachments: BTreeMap::new(),
            labels: HashMap::new(),
            stats_at_attach: HashMap::new(),
            failures: BTreeMap::new(),
            pins,
            maps_dir,
            adopted: None,
            _lock: lock,
        };
        if let Err(e) = kernel.reconcile_with(&links, true) {
            // Nothing stays attached, pinned or not.
            kernel.release_all();
            unopen(&kernel.pins);
            return Err(e);
        }
        kernel.take_over_the_rest();
        Ok(kernel)
    }

    /// After attaching at start: lets go of what earlier agents left and
    /// this one does not use (pinned links, clsact filters of interfaces no
    /// longer asked for), then drains their tables, which no program counts
    /// into any more.
    fn take_over_the_rest(&mut self) {
        let ours: Vec<&Path> = self
            .attachments
            .values()
            .flat_map(|(a, _)| a.pinned.iter().map(PathBuf::as_path))
            .collect();
        if let Some(pins) = &self.pins {
            for link in pins.links() {
                if !ours.contains(&link.as_path()) {
                    log::info!("letting go of {}: not asked for now", link.display());
                    if let Err(e) = pins::remove_tree(&link) {
                        log::warn!("{e}");
                    }
                }
            }
        }
        let attached: Vec<u32> = self.attachments.keys().copied().collect();
        attach::remove_clsact_filters_except(&attached);
        let Some(pins) = &self.pins else {
            return;
        };
        let mut adopted = Drained::default();
        for earlier in pins.earlier_maps(self.maps_dir.as_deref()) {
            if let Some(ago) = pins::lease_ran_out(&earlier) {
                log::warn!(
                    "the earlier agent's programs stopped counting {}s ago: no agent renewed their lease within --orphan-timeout, so frames since then were not counted",
                    ago.as_secs()
                );
            }
            match pins::drain_earlier(&earlier) {
                Ok(drained) => {
                    let total = drained.total();
                    match earlier.layout {
                        Some(LAYOUT_VERSION) => log::info!(
                            "took over the pinned state in {}: {} packets ({} bytes) counted since the last agent's last drain",
                            pins.dir().display(),
                            total.packets,
                            total.bytes
                        ),
                        layout => log::warn!(
                            "pinned state of another layout ({}; this build's is v{LAYOUT_VERSION}) held {} packets ({} bytes): drained and replaced",
                            layout.map_or("unknown".to_string(), |l| format!("v{l}")),
                            total.packets,
                            total.bytes
                        ),
                    }
                    adopted.merge(drained);
                }
                Err(e) => log::warn!(
                    "{e}; the pinned state of layout {} is replaced and what it held is lost",
                    earlier
                        .layout
                        .map_or("unknown".to_string(), |l| format!("v{l}"))
                ),
            }
            if let Err(e) = pins::remove_tree(&earlier.path) {
                log::warn!("{e}");
            }
        }
        if adopted.total() != Counters::default() {
            self.adopted = Some(adopted);
        }
    }

    /// Renews the lease of the kernel programs (see `--orphan-timeout`).
    pub fn renew_lease(&mut self) -> Result<(), KernelError> {
        self.datapath
            .renew_lease(self.options.orphan_timeout)
            .map_err(KernelError::Lease)
    }

    /// What earlier agents' pinned tables held when this one started, once.
    /// Not part of any drain: the self-check compares from the start of
    /// this agent.
    pub fn take_adopted(&mut self) -> Option<Drained> {
        self.adopted.take()
    }

    /// Whether the programs go on counting after this agent stops (their
    /// links and tables are pinned).
    pub fn keeps_counting(&self) -> bool {
        self.pins.is_some() && !self.options.detach_on_stop
    }

    /// Gives the pinned state to the user the agent becomes (`--user`).
    pub fn hand_pins_to(&self, uid: u32, gid: u32) -> Result<(), KernelError> {
        match &self.pins {
            Some(pins) => Ok(pins.hand_to(uid, gid)?),
            None => Ok(()),
        }
    }

    /// Detaches everywhere for good and forgets this agent's tables.
    fn release_all(&mut self) {
        for (_, (attachment, _)) in std::mem::take(&mut self.attachments) {
            attachment.release();
        }
        if let Some(dir) = &self.maps_dir {
            let _ = pins::remove_tree(dir);
        }
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
            planned.retain(|p| p.hooks != HookSet::Egress);
            for p in &mut planned {
                p.hooks = HookSet::Ingress;
            }
        }
        let mut changed = false;
        // Gone, or planned differently: let go for good.
        let unplanned: Vec<u32> = self
            .attachments
            .iter()
            .filter(|(index, (a, label))| {
                !planned
                    .iter()
                    .any(|p| p.ifindex == **index && p.hooks == a.hooks && &p.label == label)
            })
            .map(|(index, _)| *index)
            .collect();
        for index in unplanned {
            if let Some((attachment, _)) = self.attachments.remove(&index) {
                log::info!("no longer attached to {}", attachment.iface);
                attachment.release();
                changed = true;
            }
        }
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
                    self.pins.as_ref(),
                ),
                CountMode::Xdp => {
                    attach::attach_xdp(&mut self.datapath, &p.iface, self.pins.as_ref())
                }
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
                hooks: match attachment.hooks {
                    HookSet::Both => &[Hook::Ingress, Hook::Egress],
                    HookSet::Ingress => &[Hook::Ingress],
                    HookSet::Egress => &[Hook::Egress],
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
        if let Some(retransmits) = &mut self.retransmits {
            match retransmits.drain() {
                Ok(counts) => drained.retransmits = counts,
                Err(e) => {
                    log::warn!("retransmissions are no longer counted: reading them failed: {e}");
                    self.retransmits = None;
                }
            }
        }
        if let Some(handshakes) = &mut self.handshakes {
            match handshakes.drain(crate::sys::process::monotonic_ns()) {
                Ok(counts) => drained.handshakes = counts,
                Err(e) => {
                    log::warn!("TCP handshakes are no longer followed: reading them failed: {e}");
                    self.handshakes = None;
                }
            }
        }
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

    /// Stops this agent. With pinned state, the programs go on counting
    /// into the pinned tables for the next agent, and nothing is drained
    /// (the next agent drains it). Without (or with `detach_on_stop`, which
    /// also removes the pinned state), detaches everywhere, then
    /// drains twice: once for the tables that were active, once for the
    /// others, so every packet counted before the detach is in what this
    /// returns.
    pub fn shutdown(mut self) -> Result<Drained, KernelError> {
        if self.keeps_counting() {
            for (_, (attachment, _)) in std::mem::take(&mut self.attachments) {
                attachment.leave_counting();
            }
            return Ok(self.adopted.take().unwrap_or_default());
        }
        // Detach everywhere (unpinning first, so that nothing stays).
        for (_, (attachment, _)) in std::mem::take(&mut self.attachments) {
            attachment.release();
        }
        let mut last = self.drain()?;
        let more = self.drain()?;
        last.merge(more);
        if let Some(pins) = &self.pins {
            pins.remove()?;
        }
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

    /// Learns the MACs of sources in these networks from now on.
    pub fn set_mac_nets(&mut self, nets: &[crate::model::net::Cidr]) -> Result<(), KernelError> {
        Ok(self.datapath.set_mac_nets(nets)?)
    }
}

/// This namespace's pinned state under `root`, or None (with a warning
/// saying what it costs) where nothing can be pinned.
fn open_pins(root: &Path) -> Option<NetnsPins> {
    match NetnsPins::open(root) {
        Ok(Some(pins)) => Some(pins),
        Ok(None) => {
            log::warn!(
                "no bpffs at {}: counting stops while ntm is not running (mount one with `mount -t bpf bpf /sys/fs/bpf`, as systemd does at boot, or in Kubernetes mount the host's /sys/fs/bpf; --no-pin says this is meant)",
                root.display()
            );
            None
        }
        Err(e) => {
            log::warn!("{e}: counting stops while ntm is not running");
            None
        }
    }
}
