//! Attaching the programs: TC at an interface's ingress and/or egress, or
//! XDP at its ingress. An [`Attachment`] owns its links: dropping it
//! detaches ntm from that interface.
//!
//! On kernels with TCX (6.6+) the attachment is a link owned by this process:
//! it goes away with the process, even after `kill -9`, so a restart never
//! stacks a second copy. On older kernels (clsact + netlink filters, which
//! outlive the process) stale ntm filters are removed before attaching.

use aya::{
    programs::{
        LinkOrder, SchedClassifier, TcAttachType, XdpMode, tc,
        tc::{NlOptions, SchedClassifierLink, TcAttachOptions},
        xdp::XdpLink,
    },
    util::KernelVersion,
};
use ntm_common::programs::{self, HookPoint, LinkType};

use super::{
    load::{Datapath, is_permission_error},
    sys::netdev,
};
use crate::config::AttachMode;

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error(
        "interface {iface:?} does not exist (interfaces here: {available}); pass one with -i/--interface"
    )]
    UnknownInterface { iface: String, available: String },
    #[error(
        "ntm is already attached to {iface} {direction} (program id {program_id}); another ntm is running there: stop it first, it would count every packet twice"
    )]
    AlreadyAttached {
        iface: String,
        direction: &'static str,
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
    #[error("attaching to {iface} {direction} failed: {source}")]
    Failed {
        iface: String,
        direction: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Which of an interface's TC hooks ntm uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Hooks {
    /// A plain interface: traffic in and out.
    Both,
    /// Ingress only: a bridge port (frames entering the bridge from it),
    /// or loopback (every frame comes back in).
    Ingress,
    /// A bridge: frames the host sends into the bridge.
    Egress,
}

impl Hooks {
    fn points(self) -> &'static [HookPoint] {
        match self {
            Hooks::Both => &[HookPoint::TcIngress, HookPoint::TcEgress],
            Hooks::Ingress => &[HookPoint::TcIngress],
            Hooks::Egress => &[HookPoint::TcEgress],
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

/// One interface ntm is attached to. Dropping it detaches.
pub struct Attachment {
    pub iface: String,
    pub ifindex: u32,
    pub link_type: LinkType,
    pub hooks: Hooks,
    pub links: Links,
}

impl Attachment {
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
/// arrives before any other program can drop or change it.
pub fn attach_tc(
    datapath: &mut Datapath,
    iface: &str,
    hooks: Hooks,
    mode: AttachMode,
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
    for &point in hooks.points() {
        let hook = programs::hook(point, link_type)
            .ok_or_else(|| failed(iface, point.name(), "no program for this link type"))?;
        let direction = tc_attach_type(point);
        // A live ntm holds a TCX link: refuse rather than count twice.
        if tcx_available() {
            refuse_if_ntm_attached(iface, direction)?;
        }
        remove_stale_clsact_filters(iface, direction);
        let program: &mut SchedClassifier = datapath
            .tc_program(hook.entry)
            .ok_or_else(|| failed(iface, point.name(), "program missing"))?;
        let options = if tcx {
            TcAttachOptions::TcxOrder(LinkOrder::first())
        } else {
            // Priority 1: ahead of filters added with the default priority.
            TcAttachOptions::Netlink(NlOptions {
                priority: 1,
                ..Default::default()
            })
        };
        // On an error, `links` is dropped: nothing stays half-attached.
        let attached = program
            .attach_with_options(iface, direction, options)
            .and_then(|id| program.take_link(id));
        match attached {
            Ok(link) => links.push(link),
            Err(e) if is_permission_error(&e) => {
                return Err(AttachError::NotPermitted {
                    iface: iface.to_string(),
                });
            }
            Err(e) => return Err(failed(iface, point.name(), e)),
        }
    }
    log::info!(
        "attached to {iface} (ifindex {ifindex}, {} frames, {hooks:?}) via {}",
        link_type.name(),
        if tcx { "TCX" } else { "clsact" }
    );
    Ok(Attachment {
        iface: iface.to_string(),
        ifindex,
        link_type,
        hooks,
        links: Links::Tc { tcx, links },
    })
}

/// Attaches the XDP program to `iface`: natively where the driver supports
/// it, else in generic (skb) mode, and says which.
pub fn attach_xdp(datapath: &mut Datapath, iface: &str) -> Result<Attachment, AttachError> {
    let (ifindex, link_type) = inspect(iface)?;
    let hook = programs::hook(HookPoint::XdpIngress, link_type)
        .ok_or_else(|| failed(iface, "xdp", "XDP mode needs an Ethernet interface"))?;
    let program = datapath
        .xdp_program(hook.entry)
        .ok_or_else(|| failed(iface, "xdp", "program missing"))?;
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
    let link = program.take_link(id).map_err(|e| failed(iface, "xdp", e))?;
    let attachment = Attachment {
        iface: iface.to_string(),
        ifindex,
        link_type,
        hooks: Hooks::Ingress,
        links: Links::Xdp { native, link },
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
fn remove_stale_clsact_filters(iface: &str, direction: TcAttachType) {
    for hook in programs::HOOKS.iter().filter(|h| !h.is_xdp()) {
        // "Not found" (or no clsact qdisc at all) is the usual answer.
        if tc::qdisc_detach_program(iface, direction, hook.entry).is_ok() {
            log::warn!(
                "removed a stale ntm filter ({}) from {iface} {direction:?}: an earlier ntm did not detach",
                hook.entry
            );
        }
    }
}

fn refuse_if_ntm_attached(iface: &str, direction: TcAttachType) -> Result<(), AttachError> {
    let Ok((_, attached)) = SchedClassifier::query_tcx(iface, direction) else {
        return Ok(());
    };
    for info in attached {
        if info.name_as_str().is_some_and(programs::is_ntm_entry) {
            return Err(AttachError::AlreadyAttached {
                iface: iface.to_string(),
                direction: if direction == TcAttachType::Egress {
                    "egress"
                } else {
                    "ingress"
                },
                program_id: info.id(),
            });
        }
    }
    Ok(())
}

/// The ntm programs attached to `iface` (program ids), (ingress, egress),
/// as the kernel reports them. For tests and diagnostics; TCX kernels only.
pub fn attached_ntm_programs(iface: &str) -> Result<(Vec<u32>, Vec<u32>), AttachError> {
    let query = |direction, name| {
        SchedClassifier::query_tcx(iface, direction)
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
    direction: &'static str,
    source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
) -> AttachError {
    AttachError::Failed {
        iface: iface.to_string(),
        direction,
        source: source.into(),
    }
}
