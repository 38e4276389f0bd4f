//! Attaching the programs: TC at an interface's ingress and/or egress, or
//! XDP at its ingress.
//!
//! On kernels with TCX (6.6+) the attachment is a link owned by this process:
//! it goes away with the process, even after `kill -9`, so a restart never
//! stacks a second copy. On older kernels (clsact + netlink filters, which
//! outlive the process) stale ntm filters are removed before attaching.

use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _},
};

use aya::{
    programs::{
        LinkOrder, SchedClassifier, TcAttachType, XdpMode, tc,
        tc::{NlOptions, SchedClassifierLinkId, TcAttachOptions},
        xdp::XdpLinkId,
    },
    util::KernelVersion,
};
use ntm_common::names;

use crate::{
    config::AttachMode,
    datapath::{Datapath, is_permission_error},
};

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
    #[error("attaching to {iface} {direction} failed: {detail}")]
    Failed {
        iface: String,
        direction: &'static str,
        detail: String,
    },
}

/// How frames start on an interface, which decides the program to attach.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkKind {
    /// Ethernet (and loopback, which carries a zeroed Ethernet header).
    Ethernet,
    /// Frames start with the IP header: TUN, PPP, WireGuard, IP tunnels.
    L3,
}

/// ARPHRD_* values from if_arp.h that carry an Ethernet header at TC.
const ARPHRD_ETHER: u32 = 1;
const ARPHRD_LOOPBACK: u32 = 772;

/// Which of an interface's hooks ntm uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Hooks {
    /// A plain interface: traffic in and out.
    Both,
    /// A bridge port: frames entering the bridge from this port.
    Ingress,
    /// A bridge: frames the host sends into the bridge.
    Egress,
}

impl Hooks {
    fn directions(self) -> &'static [TcAttachType] {
        match self {
            Hooks::Both => &[TcAttachType::Ingress, TcAttachType::Egress],
            Hooks::Ingress => &[TcAttachType::Ingress],
            Hooks::Egress => &[TcAttachType::Egress],
        }
    }
}

/// One interface ntm is attached to; detach with [`detach`].
pub struct Attachment {
    pub iface: String,
    pub ifindex: u32,
    pub kind: LinkKind,
    pub hooks: Hooks,
    /// Whether the kernel's TCX hooks were used (else clsact + netlink).
    pub tcx: bool,
    links: Vec<(&'static str, SchedClassifierLinkId)>,
    /// XDP mode: the link and whether it is "native" or "generic".
    pub xdp: Option<(XdpLinkId, &'static str)>,
}

/// Names of the interfaces in this thread's network namespace. (Not read
/// from /sys/class/net: sysfs shows the namespace it was mounted in, which
/// is not this thread's after setns.)
fn available_interfaces() -> String {
    let mut names = Vec::new();
    // SAFETY: if_nameindex returns a list terminated by a zero entry, which
    // we free with if_freenameindex.
    unsafe {
        let list = libc::if_nameindex();
        if !list.is_null() {
            let mut entry = list;
            while (*entry).if_index != 0 && !(*entry).if_name.is_null() {
                names.push(
                    std::ffi::CStr::from_ptr((*entry).if_name)
                        .to_string_lossy()
                        .into_owned(),
                );
                entry = entry.add(1);
            }
            libc::if_freenameindex(list);
        }
    }
    names.sort();
    if names.is_empty() {
        "none found".to_string()
    } else {
        names.join(", ")
    }
}

/// The interface's hardware type (ARPHRD_*), from SIOCGIFHWADDR.
fn hardware_type(iface: &str) -> io::Result<u32> {
    let name = std::ffi::CString::new(iface)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    if name.as_bytes().len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "name too long"));
    }
    // SAFETY: a plain datagram socket used only for the ioctl below; the
    // ifreq is zeroed and holds a NUL-terminated name shorter than IFNAMSIZ.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let socket = std::os::fd::OwnedFd::from_raw_fd(fd);
        let mut request: libc::ifreq = std::mem::zeroed();
        for (dst, src) in request.ifr_name.iter_mut().zip(name.as_bytes()) {
            *dst = *src as libc::c_char;
        }
        if libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFHWADDR as _, &mut request) < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(request.ifr_ifru.ifru_hwaddr.sa_family as u32)
    }
}

/// The interface's index and link kind, or a clear error when it is missing.
pub fn inspect(iface: &str) -> Result<(u32, LinkKind), AttachError> {
    let unknown = || AttachError::UnknownInterface {
        iface: iface.to_string(),
        available: available_interfaces(),
    };
    let name = std::ffi::CString::new(iface).map_err(|_| unknown())?;
    // SAFETY: a valid NUL-terminated string.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        return Err(unknown());
    }
    let kind = match hardware_type(iface) {
        Ok(ARPHRD_ETHER) | Ok(ARPHRD_LOOPBACK) => LinkKind::Ethernet,
        Ok(_) => LinkKind::L3,
        Err(_) => return Err(unknown()),
    };
    Ok((ifindex, kind))
}

fn tcx_available() -> bool {
    KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0))
}

fn direction_name(direction: TcAttachType) -> &'static str {
    match direction {
        TcAttachType::Ingress => "ingress",
        TcAttachType::Egress => "egress",
        TcAttachType::Custom(_) => "custom",
    }
}

fn program_for(kind: LinkKind, direction: TcAttachType) -> &'static str {
    match (kind, direction) {
        (LinkKind::Ethernet, TcAttachType::Egress) => names::PROG_TC_EGRESS_ETH,
        (LinkKind::Ethernet, _) => names::PROG_TC_INGRESS_ETH,
        (LinkKind::L3, TcAttachType::Egress) => names::PROG_TC_EGRESS_L3,
        (LinkKind::L3, _) => names::PROG_TC_INGRESS_L3,
    }
}

/// True for the names ntm's programs have in the kernel (truncated to 15
/// characters by BPF_OBJ_NAME_LEN).
fn is_ntm_program(name: &str) -> bool {
    name.starts_with("ntm_tc_")
}

/// Attaches ntm to `iface`'s `hooks`, first in line so that it counts what
/// arrives before any other program can drop or change it.
pub fn attach(
    datapath: &mut Datapath,
    iface: &str,
    hooks: Hooks,
    mode: AttachMode,
) -> Result<Attachment, AttachError> {
    let (ifindex, kind) = inspect(iface)?;
    let tcx = match mode {
        AttachMode::Auto => tcx_available(),
        AttachMode::Tcx if tcx_available() => true,
        AttachMode::Tcx => return Err(AttachError::TcxUnavailable),
        AttachMode::Clsact => false,
    };
    let mut attachment = Attachment {
        iface: iface.to_string(),
        ifindex,
        kind,
        hooks,
        tcx,
        links: Vec::new(),
        xdp: None,
    };
    if !tcx
        && let Err(e) = tc::qdisc_add_clsact(iface)
        && !matches!(&e, tc::TcError::NetlinkError(n) if n.raw_os_error() == Some(libc::EEXIST))
    {
        return Err(failed(iface, "clsact", &e));
    }
    for &direction in hooks.directions() {
        let program_name = program_for(kind, direction);
        // A live ntm holds a TCX link: refuse rather than count twice.
        if tcx_available() {
            refuse_if_ntm_attached(iface, direction)?;
        }
        remove_stale_clsact_filters(iface, direction);
        let program: &mut SchedClassifier = datapath
            .tc_program(program_name)
            .ok_or_else(|| failed(iface, direction_name(direction), &"program missing"))?;
        let options = if tcx {
            TcAttachOptions::TcxOrder(LinkOrder::first())
        } else {
            // Priority 1: ahead of filters added with the default priority.
            TcAttachOptions::Netlink(NlOptions {
                priority: 1,
                ..Default::default()
            })
        };
        match program.attach_with_options(iface, direction, options) {
            Ok(link) => attachment.links.push((program_name, link)),
            Err(e) => {
                // Leave nothing half-attached behind.
                detach(datapath, &mut attachment);
                if is_permission_error(&e) {
                    return Err(AttachError::NotPermitted {
                        iface: iface.to_string(),
                    });
                }
                return Err(failed(iface, direction_name(direction), &e));
            }
        }
    }
    log::info!(
        "attached to {iface} (ifindex {ifindex}, {kind:?} frames, {hooks:?}) via {}",
        if tcx { "TCX" } else { "clsact" }
    );
    Ok(attachment)
}

/// Attaches the XDP program to `iface`: natively where the driver supports
/// it, else in generic (skb) mode, and says which.
pub fn attach_xdp(datapath: &mut Datapath, iface: &str) -> Result<Attachment, AttachError> {
    let (ifindex, kind) = inspect(iface)?;
    if kind != LinkKind::Ethernet {
        return Err(failed(
            iface,
            "xdp",
            &"XDP mode needs an Ethernet interface",
        ));
    }
    let program = datapath
        .xdp_program()
        .ok_or_else(|| failed(iface, "xdp", &"program missing"))?;
    let (link, how) = match program.attach(iface, XdpMode::Driver) {
        Ok(link) => (link, "native"),
        Err(native) => {
            log::info!("{iface}: native XDP not available ({native}); using generic XDP");
            match program.attach(iface, XdpMode::Skb) {
                Ok(link) => (link, "generic"),
                Err(e) if is_permission_error(&e) => {
                    return Err(AttachError::NotPermitted {
                        iface: iface.to_string(),
                    });
                }
                Err(e) => return Err(failed(iface, "xdp", &e)),
            }
        }
    };
    log::info!("attached to {iface} (ifindex {ifindex}) with {how} XDP");
    Ok(Attachment {
        iface: iface.to_string(),
        ifindex,
        kind,
        hooks: Hooks::Ingress,
        tcx: false,
        links: Vec::new(),
        xdp: Some((link, how)),
    })
}

/// Detaches what [`attach`] or [`attach_xdp`] attached; safe to call twice.
pub fn detach(datapath: &mut Datapath, attachment: &mut Attachment) {
    if let Some((link, _)) = attachment.xdp.take()
        && let Some(program) = datapath.xdp_program()
        && let Err(e) = program.detach(link)
    {
        log::warn!("detaching XDP from {}: {e}", attachment.iface);
    }
    for (program_name, link) in attachment.links.drain(..) {
        if let Some(program) = datapath.tc_program(program_name)
            && let Err(e) = program.detach(link)
        {
            log::warn!("detaching {program_name} from {}: {e}", attachment.iface);
        }
    }
}

/// clsact filters outlive the process that added them: an ntm killed with
/// -9 leaves its filters counting. Remove those (only filters carrying an ntm
/// program's name), whatever the mode, so nothing is counted twice. In
/// clsact mode this also replaces a running ntm's filters: the new process
/// takes over.
fn remove_stale_clsact_filters(iface: &str, direction: TcAttachType) {
    for name in [
        names::PROG_TC_INGRESS_ETH,
        names::PROG_TC_EGRESS_ETH,
        names::PROG_TC_INGRESS_L3,
        names::PROG_TC_EGRESS_L3,
    ] {
        // "Not found" (or no clsact qdisc at all) is the usual answer.
        if tc::qdisc_detach_program(iface, direction, name).is_ok() {
            log::warn!(
                "removed a stale ntm filter ({name}) from {iface} {}: an earlier ntm did not detach",
                direction_name(direction)
            );
        }
    }
}

fn refuse_if_ntm_attached(iface: &str, direction: TcAttachType) -> Result<(), AttachError> {
    let Ok((_, programs)) = SchedClassifier::query_tcx(iface, direction) else {
        return Ok(());
    };
    for info in programs {
        if info.name_as_str().is_some_and(is_ntm_program) {
            return Err(AttachError::AlreadyAttached {
                iface: iface.to_string(),
                direction: direction_name(direction),
                program_id: info.id(),
            });
        }
    }
    Ok(())
}

/// The ntm programs attached to `iface` (program ids), per direction, as the
/// kernel reports them. For tests and diagnostics; TCX kernels only.
pub fn attached_ntm_programs(iface: &str) -> Result<(Vec<u32>, Vec<u32>), AttachError> {
    let query = |direction| {
        SchedClassifier::query_tcx(iface, direction)
            .map(|(_, programs)| {
                programs
                    .iter()
                    .filter(|p| p.name_as_str().is_some_and(is_ntm_program))
                    .map(|p| p.id())
                    .collect::<Vec<u32>>()
            })
            .map_err(|e| failed(iface, direction_name(direction), &e))
    };
    Ok((query(TcAttachType::Ingress)?, query(TcAttachType::Egress)?))
}

fn failed(iface: &str, direction: &'static str, e: &dyn std::fmt::Display) -> AttachError {
    AttachError::Failed {
        iface: iface.to_string(),
        direction,
        detail: e.to_string(),
    }
}
