//! The one table of ntm's kernel programs: for every hook, the program
//! attached there, the counting half its filter tail-calls, the program
//! array and slots they use, and the link type of the frames they see.
//!
//! The loader (which programs to load and which slots to fill), the
//! attacher (which program goes on which hook), the clean-up of stale
//! clsact filters (which names are ntm's) and the filter installer (which
//! slot a hook's filter goes into) all read this table, so that adding a
//! hook is one new row here and one new function in `ntm-ebpf`.

use crate::{Hook, names, tail};

/// How frames start on an interface: it decides which program counts them
/// and which link type a tcpdump filter is compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LinkType {
    /// Frames start with an Ethernet header (and loopback, which carries a
    /// zeroed one).
    Ethernet,
    /// Frames start with the IPv4 or IPv6 header: TUN, PPP, WireGuard, IP
    /// tunnels.
    RawIp,
}

impl LinkType {
    pub const ALL: [LinkType; 2] = [LinkType::Ethernet, LinkType::RawIp];

    pub fn name(self) -> &'static str {
        match self {
            LinkType::Ethernet => "Ethernet",
            LinkType::RawIp => "raw IP",
        }
    }
}

/// Where on an interface a program runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HookPoint {
    TcIngress,
    TcEgress,
    /// XDP sees received frames only, before the stack.
    XdpIngress,
}

impl HookPoint {
    pub fn is_xdp(self) -> bool {
        matches!(self, HookPoint::XdpIngress)
    }

    pub fn hook(self) -> Hook {
        match self {
            HookPoint::TcIngress | HookPoint::XdpIngress => Hook::Ingress,
            HookPoint::TcEgress => Hook::Egress,
        }
    }

    /// For logs and errors.
    pub fn name(self) -> &'static str {
        match self {
            HookPoint::TcIngress => "ingress",
            HookPoint::TcEgress => "egress",
            HookPoint::XdpIngress => "xdp",
        }
    }
}

/// One hook's programs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HookPrograms {
    pub point: HookPoint,
    pub link: LinkType,
    /// The program attached to interfaces: it tail-calls the hook's filter
    /// slot and, with the slot empty, counts the frame itself.
    pub entry: &'static str,
    /// The counting half a filter program tail-calls with its verdict.
    /// Never attached.
    pub count: &'static str,
    /// The hand-over of frames the agent wants for names, which the
    /// counting half tail-calls once it has counted such a frame (see
    /// `ntm-ebpf/src/observe.rs`): a program of its own, so that its work
    /// is out of the path every frame takes. Never attached.
    pub observe: &'static str,
    /// The program array (one per program type) holding the hook's filter,
    /// counting half and hand-over.
    pub tails: &'static str,
    pub filter_slot: u32,
    pub count_slot: u32,
    pub observe_slot: u32,
}

impl HookPrograms {
    pub fn is_xdp(&self) -> bool {
        self.point.is_xdp()
    }

    /// The hook's programs ntm loads, in the order it loads them.
    pub fn loaded(&self) -> [&'static str; 3] {
        [self.entry, self.count, self.observe]
    }
}

/// Every hook ntm has. The function names in `ntm-ebpf` are these names.
pub const HOOKS: [HookPrograms; 5] = [
    HookPrograms {
        point: HookPoint::TcIngress,
        link: LinkType::Ethernet,
        entry: "ntm_tc_ingress_eth",
        count: "ntm_count_in_eth",
        observe: "ntm_observe_in_eth",
        tails: names::TC_TAILS,
        filter_slot: tail::FILTER_INGRESS_ETH,
        count_slot: tail::COUNT_INGRESS_ETH,
        observe_slot: tail::OBSERVE_INGRESS_ETH,
    },
    HookPrograms {
        point: HookPoint::TcEgress,
        link: LinkType::Ethernet,
        entry: "ntm_tc_egress_eth",
        count: "ntm_count_out_eth",
        observe: "ntm_observe_out_eth",
        tails: names::TC_TAILS,
        filter_slot: tail::FILTER_EGRESS_ETH,
        count_slot: tail::COUNT_EGRESS_ETH,
        observe_slot: tail::OBSERVE_EGRESS_ETH,
    },
    HookPrograms {
        point: HookPoint::TcIngress,
        link: LinkType::RawIp,
        entry: "ntm_tc_ingress_l3",
        count: "ntm_count_in_l3",
        observe: "ntm_observe_in_l3",
        tails: names::TC_TAILS,
        filter_slot: tail::FILTER_INGRESS_L3,
        count_slot: tail::COUNT_INGRESS_L3,
        observe_slot: tail::OBSERVE_INGRESS_L3,
    },
    HookPrograms {
        point: HookPoint::TcEgress,
        link: LinkType::RawIp,
        entry: "ntm_tc_egress_l3",
        count: "ntm_count_out_l3",
        observe: "ntm_observe_out_l3",
        tails: names::TC_TAILS,
        filter_slot: tail::FILTER_EGRESS_L3,
        count_slot: tail::COUNT_EGRESS_L3,
        observe_slot: tail::OBSERVE_EGRESS_L3,
    },
    HookPrograms {
        point: HookPoint::XdpIngress,
        link: LinkType::Ethernet,
        entry: "ntm_xdp",
        count: "ntm_count_xdp",
        observe: "ntm_observe_xdp",
        tails: names::XDP_TAILS,
        filter_slot: tail::FILTER_XDP,
        count_slot: tail::COUNT_XDP,
        observe_slot: tail::OBSERVE_XDP,
    },
];

/// The hook for frames of `link` at `point`, if ntm has one (XDP counts
/// Ethernet frames only).
pub fn hook(point: HookPoint, link: LinkType) -> Option<&'static HookPrograms> {
    HOOKS.iter().find(|h| h.point == point && h.link == link)
}

/// Longest program name the kernel keeps (BPF_OBJ_NAME_LEN less the NUL).
pub const KERNEL_NAME_LEN: usize = 15;

/// A program's name as the kernel reports it: cut to [`KERNEL_NAME_LEN`].
pub fn kernel_name(name: &str) -> &str {
    match name.char_indices().nth(KERNEL_NAME_LEN) {
        Some((cut, _)) => &name[..cut],
        None => name,
    }
}

/// Whether a program the kernel reports as `reported` (a TC filter's or a
/// TCX link's name) is one of ntm's attached programs.
pub fn is_ntm_entry(reported: &str) -> bool {
    HOOKS.iter().any(|h| kernel_name(h.entry) == reported)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_slot_is_used_once_per_program_array() {
        for (i, a) in HOOKS.iter().enumerate() {
            let limit = if a.is_xdp() {
                tail::XDP_SLOTS
            } else {
                tail::TC_SLOTS
            };
            let slots = [a.filter_slot, a.count_slot, a.observe_slot];
            assert!(slots.iter().all(|&s| s < limit), "{a:?}");
            assert!(slots[0] != slots[1] && slots[1] != slots[2] && slots[0] != slots[2]);
            assert_eq!(a.is_xdp(), a.tails == names::XDP_TAILS);
            for b in &HOOKS[i + 1..] {
                assert!(a.point != b.point || a.link != b.link, "{a:?} twice");
                if a.tails == b.tails {
                    for slot in [b.filter_slot, b.count_slot, b.observe_slot] {
                        assert!(!slots.contains(&slot), "{b:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn kernel_names_are_recognised() {
        assert_eq!(kernel_name("ntm_tc_ingress_eth"), "ntm_tc_ingress_");
        assert_eq!(kernel_name("ntm_xdp"), "ntm_xdp");
        assert!(is_ntm_entry("ntm_tc_ingress_"));
        assert!(is_ntm_entry("ntm_tc_egress_e"));
        assert!(is_ntm_entry("ntm_xdp"));
        assert!(!is_ntm_entry("ntm_count_in_et"));
        assert!(!is_ntm_entry("ntm_observe_in_"));
        assert!(!is_ntm_entry("cilium_tc"));
    }

    #[test]
    fn every_hook_is_found_by_point_and_link() {
        for h in &HOOKS {
            assert_eq!(hook(h.point, h.link), Some(h));
        }
        assert_eq!(hook(HookPoint::XdpIngress, LinkType::RawIp), None);
    }
}
