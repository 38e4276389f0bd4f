//! Attaching the programs: TC at an interface's ingress and/or egress, or
//! XDP at its ingress. An [`Attachment`] owns its links: dropping it
//! detaches ntm from that interface.
//!
//! On kernels with TCX (6.6+) the attachment is a link. Unpinned, it goes
//! away with the process, even after `kill -9`; pinned in bpffs (see
//! [`super::pins`]) it keeps counting while no agent runs, and the next agent
//! takes it over: the link's program is replaced in one step, so no frame
//! is counted twice or missed. XDP links are the same. On older kernels
//! (clsact + netlink filters, which outlive the process anyway) ntm's filter
//! sits at a fixed priority and handle, and a starting agent replaces the
//! program in it the same way; other ntm filters are stale and removed.

use std::path::PathBuf;

use aya::{
    programs::{
        LinkOrder, SchedClassifier, TcAttachType, XdpMode,
        links::{FdLink, PinnedLink},
        tc,
        tc::{NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
        xdp::XdpLink,
    },
    util::KernelVersion,
};
use ntm_common::programs::{self, HookPoint, LinkType};

use super::{
    AttachMode,
    load::{Datapath, is_permission_error},
    pins::NetnsPins,
};
use crate::sys::netdev;

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error(
        "interface {iface:?} does not exist (interfaces here: {available}); pass one with -i/--interface"
    )]
    UnknownInterface { iface: String, available: String },
    #[error(
        "ntm is already attached to {iface} {hook} (program id {program_id}); another ntm is running there: stop it first, it would count every packet twice"
    )]
    AlreadyAttached {
        iface: String,
        hook: &'static str,
        program_id: u32,
    },
    #[error(
        "not allowed to attach to {iface}: ntm needs CAP_NET_ADMIN (and CAP_BPF); run it as root or grant those capabilities"
    )]
    NotPermitted { iface: String },
    #[error(
        "--attach-mode tcx needs Linux 6.6 or newer (this kernel has no TCX hooks); use --attach-mode clsact or auto"
    )]
    TcxUnavailable,
    #[error("attaching to {iface} {hook} failed: {source}")]
    Failed {
        iface: String,
        hook: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Which of an interface's TC hooks ntm uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum HookSet {
    /// A plain interface: traffic in and out.
    Both,
    /// Ingress only: a bridge port (frames entering the bridge from it),
    /// or loopback (every frame comes back in).
    Ingress,
    /// A bridge: frames the host sends into the bridge.
    Egress,
}

impl HookSet {
    fn points(self) -> &'static [HookPoint] {
        match self {
            HookSet::Both => &[HookPoint::TcIngress, HookPoint::TcEgress],
            HookSet::Ingress => &[HookPoint::TcIngress],
            HookSet::Egress => &[HookPoint::TcEgress],
        }
    }
}

/// How an interface is hooked: the `mode` label of
/// `ntm_interface_attached`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LinkMode {
    /// TCX links (Linux 6.6+), owned by the process.
    Tcx,
    /// clsact qdisc with netlink filters (older kernels).
    Clsact,
    /// XDP in the driver.
    XdpNative,
    /// XDP on the generic (skb) path.
    XdpGeneric,
}

impl LinkMode {
    pub fn as_str(self) -> &'static str {
        match self {
            LinkMode::Tcx => "tcx",
            LinkMode::Clsact => "clsact",
            LinkMode::XdpNative => "xdp-native",
            LinkMode::XdpGeneric => "xdp-generic",
        }
    }
}

/// The links of one attachment: TC links on some hooks, or one XDP link.
pub enum Links {
    Tc {
        tcx: bool,
        links: Vec<SchedClassifierLink>,
    },
    Xdp {
        native: bool,
        link: XdpLink,
    },
}

/// Where ntm's clsact filter sits on a hook: first (priority 1), at a
/// handle of its own, so that the next agent finds it and replaces its
/// program in place.
pub const CLSACT_PRIORITY: u16 = 1;
pub const CLSACT_HANDLE: u32 = 0x6e74_6d01;

/// One interface ntm is attached to. Dropping it detaches, unless its
/// links are pinned (see [`Attachment::release`]).
pub struct Attachment {
    pub iface: String,
    pub ifindex: u32,
    pub link_type: LinkType,
    pub hooks: HookSet,
    pub links: Links,
    /// Where its links are pinned in bpffs (TCX and XDP with pins).
    pub pinned: Vec<PathBuf>,
    /// Whether it was taken over from an earlier agent.
    pub adopted: bool,
}

impl Attachment {
    /// Detaches for good: unpins its links, then drops them.
    pub fn release(self) {
        for path in &self.pinned {
            if let Err(e) = std::fs::remove_file(path) {
                log::warn!("could not unpin {}: {e}", path.display());
            }
        }
    }

    /// Leaves the interface counting after the agent is gone: pinned links
    /// stay (closing our handle does not detach them) and clsact filters
    /// stay in place. Unpinned TCX and XDP links cannot stay: they detach.
    pub fn leave_counting(self) {
        if let Links::Tc { tcx: false, links } = self.links {
            for link in links {
                // A clsact "link" is the filter's address (interface,
                // priority, handle), no kernel object: forgetting it, rather
                // than letting its drop delete the filter, leaks nothing.
                std::mem::forget(link);
            }
        }
    }

    pub fn mode(&self) -> LinkMode {
        match self.links {
            Links::Tc { tcx: true, .. } => LinkMode::Tcx,
            Links::Tc { tcx: false, .. } => LinkMode::Clsact,
            Links::Xdp { native: true, .. } => LinkMode::XdpNative,
            Links::Xdp { native: false, .. } => LinkMode::XdpGeneric,
        }
    }
}

/// The interface's index and link type, or a clear error when it is
/// missing.
pub fn inspect(iface: &str) -> Result<(u32, LinkType), AttachError> {
    let unknown = || AttachError::UnknownInterface {
        iface: iface.to_string(),
        available: available_interfaces(),
    };
    let ifindex = netdev::index_of(iface).ok_or_else(unknown)?;
    let link_type = match netdev::hardware_type(iface) {
        Ok(netdev::ARPHRD_ETHER) | Ok(netdev::ARPHRD_LOOPBACK) => LinkType::Ethernet,
        Ok(_) => LinkType::RawIp,
        Err(_) => return Err(unknown()),
    };
    Ok((ifindex, link_type))
}

fn available_interfaces() -> String {
    let names = netdev::names();
    if names.is_empty() {
        "none found".to_string()
    } else {
        names.join(", ")
    }
}

pub fn tcx_available() -> bool {
    KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0))
}

/// What a TC attachment with `mode` uses on this kernel: TCX or clsact.
pub fn tc_mode(mode: AttachMode) -> Result<LinkMode, AttachError> {
    Ok(match mode {
        AttachMode::Auto if tcx_available() => LinkMode::Tcx,
        AttachMode::Auto => LinkMode::Clsact,
        AttachMode::Tcx if tcx_available() => LinkMode::Tcx,
        AttachMode::Tcx => return Err(AttachError::TcxUnavailable),
        AttachMode::Clsact => LinkMode::Clsact,
    })
}

fn tc_attach_type(point: HookPoint) -> TcAttachType {
    match point {
        HookPoint::TcEgress => TcAttachType::Egress,
        HookPoint::TcIngress | HookPoint::XdpIngress => TcAttachType::Ingress,
    }
}

/// Attaches ntm to `iface`'s `hooks`, first in line so that it counts what
/// arrives before any other program can drop or change it. With `pins`, a
/// link an earlier agent pinned there is taken over (its program replaced
/// by this agent's) and a new link is pinned; in clsact mode ntm's filter
/// at [`CLSACT_PRIORITY`] and [`CLSACT_HANDLE`] is taken over likewise.
pub fn attach_tc(
    datapath: &mut Datapath,
    iface: &str,
    hooks: HookSet,
    mode: AttachMode,
    pins: Option<&NetnsPins>,
) -> Result<Attachment, AttachError> {
    let (ifindex, link_type) = inspect(iface)?;
    let tcx = tc_mode(mode)? == LinkMode::Tcx;
    if !tcx
        && let Err(e) = tc::qdisc_add_clsact(iface)
        && !matches!(&e, tc::TcError::NetlinkError(n) if n.raw_os_error() == Some(libc::EEXIST))
    {
        return Err(failed(iface, "clsact", e));
    }
    let mut links = Vec::new();
    let mut pinned = Vec::new();
    let mut adopted = false;
    for &point in hooks.points() {
        let hook = programs::hook(point, link_type)
            .ok_or_else(|| failed(iface, point.name(), "no program for this link type"))?;
        let attach_type = tc_attach_type(point);
        let pin_path = pins.map(|p| p.link_path(ifindex, point));
        let program: &mut SchedClassifier = datapath
            .tc_program(hook.entry)
            .map_err(|e| failed(iface, point.name(), e))?;
        // On an error, `links` is dropped: nothing stays half-attached.
        let (link, took_over) = if tcx {
            attach_tcx_hook(program, iface, attach_type, pin_path.as_ref())?
        } else {
            attach_clsact_hook(program, iface, attach_type)?
        };
        adopted |= took_over;
        let link = match (tcx, pin_path) {
            (true, Some(path)) if !took_over => {
                let link = pin_link(link, &path).map_err(|e| failed(iface, point.name(), e))?;
                pinned.push(path);
                link
            }
            (true, Some(path)) => {
                pinned.push(path);
                link
            }
            _ => link,
        };
        links.push(link);
    }
    log::info!(
        "{} {iface} (ifindex {ifindex}, {} frames, {hooks:?}) via {}{}",
        if adopted {
            "took over counting on"
        } else {
            "attached to"
        },
        link_type.name(),
        if tcx { "TCX" } else { "clsact" },
        if pinned.is_empty() { "" } else { ", pinned" }
    );
    Ok(Attachment {
        iface: iface.to_string(),
        ifindex,
        link_type,
        hooks,
        links: Links::Tc { tcx, links },
        pinned,
        adopted,
    })
}

/// One TCX hook: the pinned link there taken over, or a new link. Returns
/// the link and whether it was taken over.
fn attach_tcx_hook(
    program: &mut SchedClassifier,
    iface: &str,
    attach_type: TcAttachType,
    pin_path: Option<&PathBuf>,
) -> Result<(SchedClassifierLink, bool), AttachError> {
    let name = attach_type_name(attach_type);
    if let Some(path) = pin_path
        && path.exists()
    {
        let taken = PinnedLink::from_pin(path)
            .map_err(|e| failed(iface, name, e))
            .and_then(|pinned| {
                SchedClassifierLink::try_from(FdLink::from(pinned))
                    .map_err(|e| failed(iface, name, e))
            })
            .and_then(|link| {
                program
                    .attach_to_link(link)
                    .and_then(|id| program.take_link(id))
                    .map_err(|e| failed(iface, name, e))
            });
        match taken {
            Ok(link) => return Ok((link, true)),
            // A link that is no longer what it was (its interface went
            // and came back): let it go and attach anew.
            Err(e) => {
                log::warn!("not taking over {}: {e}", path.display());
                let _ = std::fs::remove_file(path);
            }
        }
    }
    // A live ntm holds a TCX link: refuse rather than count twice.
    refuse_if_ntm_attached(iface, attach_type)?;
    remove_stale_clsact_filters(iface, attach_type);
    let options = TcAttachOptions::TcxOrder(LinkOrder::first());
    Ok((attach_new(program, iface, attach_type, options)?, false))
}

/// A new TC attachment of `program`, owned by the caller.
fn attach_new(
    program: &mut SchedClassifier,
    iface: &str,
    attach_type: TcAttachType,
    options: TcAttachOptions,
) -> Result<SchedClassifierLink, AttachError> {
    let attached = program
        .attach_with_options(iface, attach_type, options)
        .and_then(|id| program.take_link(id));
    match attached {
        Ok(link) => Ok(link),
        Err(e) if is_permission_error(&e) => Err(AttachError::NotPermitted {
            iface: iface.to_string(),
        }),
        Err(e) => Err(failed(iface, attach_type_name(attach_type), e)),
    }
}

/// One clsact hook: ntm's filter there gets this agent's program in place
/// (netlink replaces a filter's program atomically), or, if there is none,
/// stale ntm filters are removed and the filter is added.
fn attach_clsact_hook(
    program: &mut SchedClassifier,
    iface: &str,
    attach_type: TcAttachType,
) -> Result<(SchedClassifierLink, bool), AttachError> {
    let ours = TcHandle::from(CLSACT_HANDLE);
    if let Ok(existing) =
        SchedClassifierLink::attached(iface, attach_type, CLSACT_PRIORITY, ours, None)
        && let Ok(link) = program
            .attach_to_link(existing)
            .and_then(|id| program.take_link(id))
    {
        return Ok((link, true));
    }
    remove_stale_clsact_filters(iface, attach_type);
    let options = TcAttachOptions::Netlink(NlOptions {
        // Ahead of filters added with the default priority.
        priority: CLSACT_PRIORITY,
        handle: ours,
        ..Default::default()
    });
    Ok((attach_new(program, iface, attach_type, options)?, false))
}

/// Pins a TCX link at `path`, and gives it back.
fn pin_link(
    link: SchedClassifierLink,
    path: &PathBuf,
) -> Result<SchedClassifierLink, Box<dyn std::error::Error + Send + Sync>> {
    let pinned = FdLink::try_from(link)?.pin(path)?;
    Ok(SchedClassifierLink::try_from(FdLink::from(pinned))?)
}

fn attach_type_name(attach_type: TcAttachType) -> &'static str {
    if attach_type == TcAttachType::Egress {
        "egress"
    } else {
        "ingress"
    }
}

/// Attaches the XDP program to `iface`: natively where the driver supports
/// it, else in generic (skb) mode, and says which. With `pins`, an XDP link
/// an earlier agent pinned there is taken over, and a new one pinned.
pub fn attach_xdp(
    datapath: &mut Datapath,
    iface: &str,
    pins: Option<&NetnsPins>,
) -> Result<Attachment, AttachError> {
    let (ifindex, link_type) = inspect(iface)?;
    let hook = programs::hook(HookPoint::XdpIngress, link_type)
        .ok_or_else(|| failed(iface, "xdp", "XDP mode needs an Ethernet interface"))?;
    let program = datapath
        .xdp_program(hook.entry)
        .map_err(|e| failed(iface, "xdp", e))?;
    // The pin's name says the mode the earlier agent got.
    let pin_path = |native: bool| pins.map(|p| p.xdp_link_path(ifindex, native));
    let earlier = [true, false]
        .into_iter()
        .find_map(|native| pin_path(native).filter(|p| p.exists()).map(|p| (p, native)));
    if let Some((path, native)) = earlier {
        let taken = PinnedLink::from_pin(&path)
            .map_err(|e| failed(iface, "xdp", e))
            .and_then(|pinned| {
                XdpLink::try_from(FdLink::from(pinned)).map_err(|e| failed(iface, "xdp", e))
            })
            .and_then(|link| {
                program
                    .attach_to_link(link)
                    .and_then(|id| program.take_link(id))
                    .map_err(|e| failed(iface, "xdp", e))
            });
        match taken {
            Ok(link) => {
                log::info!("took over counting on {iface} (ifindex {ifindex}) with XDP, pinned");
                return Ok(Attachment {
                    iface: iface.to_string(),
                    ifindex,
                    link_type,
                    hooks: HookSet::Ingress,
                    links: Links::Xdp { native, link },
                    pinned: vec![path],
                    adopted: true,
                });
            }
            Err(e) => {
                log::warn!("not taking over {}: {e}", path.display());
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    let (id, native) = match program.attach(iface, XdpMode::Driver) {
        Ok(id) => (id, true),
        Err(native) => {
            log::info!("{iface}: native XDP not available ({native}); using generic XDP");
            match program.attach(iface, XdpMode::Skb) {
                Ok(id) => (id, false),
                Err(e) if is_permission_error(&e) => {
                    return Err(AttachError::NotPermitted {
                        iface: iface.to_string(),
                    });
                }
                Err(e) => return Err(failed(iface, "xdp", e)),
            }
        }
    };
    let mut link = program.take_link(id).map_err(|e| failed(iface, "xdp", e))?;
    let mut pinned = Vec::new();
    if let Some(path) = pin_path(native) {
        // Links made through netlink (kernels before 5.9) cannot be pinned;
        // they outlive the process anyway.
        match FdLink::try_from(link) {
            Ok(fd_link) => {
                let fd_link =
                    FdLink::from(fd_link.pin(&path).map_err(|e| failed(iface, "xdp", e))?);
                link = XdpLink::try_from(fd_link).map_err(|e| failed(iface, "xdp", e))?;
                pinned.push(path);
            }
            Err(_) => {
                return Err(failed(
                    iface,
                    "xdp",
                    "this kernel attaches XDP without links (before 5.9), which cannot be pinned; run with --no-pin",
                ));
            }
        }
    }
    let attachment = Attachment {
        iface: iface.to_string(),
        ifindex,
        link_type,
        hooks: HookSet::Ingress,
        links: Links::Xdp { native, link },
        pinned,
        adopted: false,
    };
    log::info!(
        "attached to {iface} (ifindex {ifindex}) with {}",
        attachment.mode().as_str()
    );
    Ok(attachment)
}

/// clsact filters outlive the process that added them: an ntm killed with
/// -9 leaves its filters counting. Remove those (only filters carrying an ntm
/// program's name), whatever the mode, so nothing is counted twice. In
/// clsact mode this also replaces a running ntm's filters: the new process
/// takes over.
fn remove_stale_clsact_filters(iface: &str, attach_type: TcAttachType) -> usize {
    let mut removed = 0;
    for hook in programs::HOOKS.iter().filter(|h| !h.is_xdp()) {
        // "Not found" (or no clsact qdisc at all) is the usual answer.
        if tc::qdisc_detach_program(iface, attach_type, hook.entry).is_ok() {
            log::info!(
                "removed an ntm filter ({}) that an earlier agent left on {iface} {attach_type:?}",
                hook.entry
            );
            removed += 1;
        }
    }
    removed
}

/// Removes ntm's clsact filters from every interface of this namespace but
/// `keep` (those this agent attached to): an earlier agent's filters on
/// interfaces no longer asked for would otherwise go on counting into
/// tables nobody reads.
pub fn remove_clsact_filters_except(keep: &[u32]) -> usize {
    let mut removed = 0;
    for iface in netdev::names() {
        if netdev::index_of(&iface).is_some_and(|index| keep.contains(&index)) {
            continue;
        }
        for attach_type in [TcAttachType::Ingress, TcAttachType::Egress] {
            removed += remove_stale_clsact_filters(&iface, attach_type);
        }
    }
    removed
}

fn refuse_if_ntm_attached(iface: &str, attach_type: TcAttachType) -> Result<(), AttachError> {
    if !tcx_available() {
        return Ok(());
    }
    let Ok((_, attached)) = SchedClassifier::query_tcx(iface, attach_type) else {
        return Ok(());
    };
    for info in attached {
        if info.name_as_str().is_some_and(programs::is_ntm_entry) {
            return Err(AttachError::AlreadyAttached {
                iface: iface.to_string(),
                hook: attach_type_name(attach_type),
                program_id: info.id(),
            });
        }
    }
    Ok(())
}

/// The ntm programs attached to `iface` (program ids), (ingress, egress),
/// as the kernel reports them. For tests and diagnostics; TCX kernels only.
pub fn attached_ntm_programs(iface: &str) -> Result<(Vec<u32>, Vec<u32>), AttachError> {
    let query = |attach_type, name| {
        SchedClassifier::query_tcx(iface, attach_type)
            .map(|(_, attached)| {
                attached
                    .iter()
                    .filter(|p| p.name_as_str().is_some_and(programs::is_ntm_entry))
                    .map(|p| p.id())
                    .collect::<Vec<u32>>()
            })
            .map_err(|e| failed(iface, name, e))
    };
    Ok((
        query(TcAttachType::Ingress, "ingress")?,
        query(TcAttachType::Egress, "egress")?,
    ))
}

fn failed(
    iface: &str,
    hook: &'static str,
    source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
) -> AttachError {
    AttachError::Failed {
        iface: iface.to_string(),
        hook,
        source: source.into(),
    }
}
