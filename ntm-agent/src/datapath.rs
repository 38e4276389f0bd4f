//! Loading the kernel programs: the embedded eBPF object, its settings, its
//! maps, and clear errors when the kernel or the privileges say no.

use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _, OwnedFd},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, Map, MapData, MapError},
    programs::{ProgramError, SchedClassifier, Xdp},
    util::KernelVersion,
};
use ntm_common::{names, tail};

use crate::{
    drain::FlowTables,
    filter::{self, Filter, FilterError, Hook, LinkType, load},
    services::ServiceRegistry,
};

/// The kernel programs, built by build.rs from the ntm-ebpf crate.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ntm"));

/// Oldest kernel ntm is written for: BTF-defined map-in-map, `gso_segs` in
/// `__sk_buff` and bounded loops in the verifier are all older than this.
pub const MIN_KERNEL: (u8, u8) = (5, 10);

/// Lines of the verifier's log shown when it rejects a program.
const VERIFIER_LOG_TAIL: usize = 40;

#[derive(Clone, Debug)]
pub struct DatapathOptions {
    /// Capacity of each of the two flow tables.
    pub flow_table_entries: u32,
    /// First port of the client ephemeral range (service-port rule).
    pub ephemeral_start: u16,
    /// XDP mode: drop frames after counting them (mirror ports).
    pub xdp_drop: bool,
}

impl Default for DatapathOptions {
    fn default() -> Self {
        Self {
            flow_table_entries: ntm_common::DEFAULT_FLOW_TABLE_ENTRIES,
            ephemeral_start: ntm_common::service_port::DEFAULT_EPHEMERAL_START,
            xdp_drop: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error(
        "kernel {found} is too old: ntm needs Linux {}.{} or newer (with BTF and BPF map-in-map support)",
        MIN_KERNEL.0, MIN_KERNEL.1
    )]
    KernelTooOld { found: String },
    #[error(
        "not allowed to load eBPF programs ({what}): run ntm as root, or grant it CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON (e.g. setcap cap_bpf,cap_net_admin,cap_perfmon+ep on the binary, or the capabilities in a container's securityContext)"
    )]
    NotPermitted { what: String },
    #[error(
        "the kernel could not create ntm's maps ({what}); is the kernel built with BTF and CONFIG_BPF_SYSCALL? detail: {detail}"
    )]
    Maps { what: String, detail: String },
    #[error(
        "the kernel's verifier rejected program {program} ({io_error}); this is a bug in ntm, please report it with this log tail:\n{log_tail}"
    )]
    VerifierRejected {
        program: String,
        io_error: io::Error,
        log_tail: String,
    },
    #[error("loading program {program} failed: {source}")]
    Program {
        program: String,
        #[source]
        source: ProgramError,
    },
    #[error(
        "the eBPF object is missing {0}; the build is broken (rebuild with `cargo xtask build`)"
    )]
    Missing(&'static str),
    #[error("setting up map {map} failed: {source}")]
    MapSetup {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("setting up the tail call to {program} failed: {source}")]
    TailSetup {
        program: &'static str,
        #[source]
        source: io::Error,
    },
}

/// The loaded kernel side: programs ready to attach, flow tables ready to
/// drain.
pub struct Datapath {
    ebpf: Ebpf,
    /// The program arrays and the verdict map, held for the agent's life:
    /// the kernel empties a program array when its last user handle closes.
    tc_tails: MapData,
    xdp_tails: MapData,
    verdict: MapData,
    /// The filter in the hooks now, if any.
    filter: Option<Filter>,
}

/// One hook's filter slot and the counting half its filter hands over to.
struct FilterSlot {
    hook: Hook,
    link: LinkType,
    slot: u32,
    count_slot: u32,
}

const FILTER_SLOTS: [FilterSlot; 5] = [
    FilterSlot {
        hook: Hook::TcEthernet,
        link: LinkType::Ethernet,
        slot: tail::FILTER_INGRESS_ETH,
        count_slot: tail::COUNT_INGRESS_ETH,
    },
    FilterSlot {
        hook: Hook::TcEthernet,
        link: LinkType::Ethernet,
        slot: tail::FILTER_EGRESS_ETH,
        count_slot: tail::COUNT_EGRESS_ETH,
    },
    FilterSlot {
        hook: Hook::TcL3,
        link: LinkType::RawIp,
        slot: tail::FILTER_INGRESS_L3,
        count_slot: tail::COUNT_INGRESS_L3,
    },
    FilterSlot {
        hook: Hook::TcL3,
        link: LinkType::RawIp,
        slot: tail::FILTER_EGRESS_L3,
        count_slot: tail::COUNT_EGRESS_L3,
    },
    FilterSlot {
        hook: Hook::Xdp,
        link: LinkType::Ethernet,
        slot: tail::FILTER_XDP,
        count_slot: tail::COUNT_XDP,
    },
];

/// The counting halves and their slots.
const COUNT_PROGRAMS: [(&str, bool, u32); 5] = [
    (
        names::PROG_COUNT_INGRESS_ETH,
        false,
        tail::COUNT_INGRESS_ETH,
    ),
    (names::PROG_COUNT_EGRESS_ETH, false, tail::COUNT_EGRESS_ETH),
    (names::PROG_COUNT_INGRESS_L3, false, tail::COUNT_INGRESS_L3),
    (names::PROG_COUNT_EGRESS_L3, false, tail::COUNT_EGRESS_L3),
    (names::PROG_COUNT_XDP, true, tail::COUNT_XDP),
];

impl Datapath {
    /// Loads and verifies every program, writes the known-port bitmap, and
    /// returns the datapath with the flow tables taken out for draining.
    pub fn load(
        options: &DatapathOptions,
        services: &ServiceRegistry,
    ) -> Result<(Self, FlowTables), DatapathError> {
        check_kernel()?;
        raise_memlock_limit();
        let mut loader = EbpfLoader::new();
        for table in names::FLOW_TABLES {
            loader.map_max_entries(table, options.flow_table_entries);
        }
        loader.override_global(names::EPHEMERAL_START, &options.ephemeral_start, true);
        // XDP_DROP is 1, XDP_PASS 2 (uapi/linux/bpf.h).
        let xdp_action: u32 = if options.xdp_drop { 1 } else { 2 };
        loader.override_global(names::XDP_ACTION, &xdp_action, true);
        let mut ebpf = loader.load(EBPF_OBJECT).map_err(classify_load_error)?;

        for name in [
            names::PROG_TC_INGRESS_ETH,
            names::PROG_TC_EGRESS_ETH,
            names::PROG_TC_INGRESS_L3,
            names::PROG_TC_EGRESS_L3,
            names::PROG_COUNT_INGRESS_ETH,
            names::PROG_COUNT_EGRESS_ETH,
            names::PROG_COUNT_INGRESS_L3,
            names::PROG_COUNT_EGRESS_L3,
        ] {
            let program: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or(DatapathError::Missing("a TC program"))?
                .try_into()
                .map_err(|source| DatapathError::Program {
                    program: name.to_string(),
                    source,
                })?;
            program
                .load()
                .map_err(|e| classify_program_error(name, e))?;
        }

        for name in [names::PROG_XDP, names::PROG_COUNT_XDP] {
            let program: &mut Xdp = ebpf
                .program_mut(name)
                .ok_or(DatapathError::Missing("an XDP program"))?
                .try_into()
                .map_err(|source| DatapathError::Program {
                    program: name.to_string(),
                    source,
                })?;
            program
                .load()
                .map_err(|e| classify_program_error(name, e))?;
        }

        let tc_tails = take_map_data(&mut ebpf, names::TC_TAILS)?;
        let xdp_tails = take_map_data(&mut ebpf, names::XDP_TAILS)?;
        let verdict = take_map_data(&mut ebpf, names::FILTER_VERDICT)?;
        for (name, is_xdp, slot) in COUNT_PROGRAMS {
            let program_fd = ebpf
                .program(name)
                .ok_or(DatapathError::Missing("a counting program"))?
                .fd()
                .map_err(|source| DatapathError::Program {
                    program: name.to_string(),
                    source,
                })?
                .as_fd()
                .as_raw_fd();
            let tails = if is_xdp { &xdp_tails } else { &tc_tails };
            load::set_slot(raw_fd(tails), slot, program_fd).map_err(|source| {
                DatapathError::TailSetup {
                    program: name,
                    source,
                }
            })?;
        }

        let mut known: Array<MapData, u32> = ebpf
            .take_map(names::KNOWN_PORTS)
            .ok_or(DatapathError::Missing(names::KNOWN_PORTS))?
            .try_into()
            .map_err(|source| DatapathError::MapSetup {
                map: names::KNOWN_PORTS,
                source,
            })?;
        for (index, word) in services.known_port_bitmap().into_iter().enumerate() {
            if word != 0 {
                known
                    .set(index as u32, word, 0)
                    .map_err(|source| DatapathError::MapSetup {
                        map: names::KNOWN_PORTS,
                        source,
                    })?;
            }
        }
        // The program keeps its own reference to the map; ours can go.
        drop(known);

        let tables =
            FlowTables::take_from(&mut ebpf).map_err(|source| DatapathError::MapSetup {
                map: names::ACTIVE_SLOT,
                source,
            })?;
        Ok((
            Self {
                ebpf,
                tc_tails,
                xdp_tails,
                verdict,
                filter: None,
            },
            tables,
        ))
    }

    /// Puts `filter` in every hook's filter slot (or, with `None`, empties
    /// them so that every frame is counted). All programs are built and
    /// loaded first, so a filter the kernel refuses changes nothing; then
    /// each slot is swapped, atomically for the frames going through it. A
    /// link type the filter does not compile for gets an empty slot: the
    /// agent does not attach to such interfaces (see
    /// [`Datapath::filter_allows`]).
    pub fn set_filter(&mut self, filter: Option<Filter>) -> Result<(), FilterError> {
        // One program per slot (None: the slot is emptied), all loaded
        // before any slot changes.
        let mut programs = Vec::with_capacity(FILTER_SLOTS.len());
        for slot in &FILTER_SLOTS {
            let classic = filter.as_ref().and_then(|f| f.program(slot.link).ok());
            let program = match (classic, &filter) {
                (Some(classic), Some(filter)) => {
                    Some(self.load_filter_program(filter, classic, slot)?)
                }
                _ => None,
            };
            programs.push(program);
        }
        for (slot, program) in FILTER_SLOTS.iter().zip(&programs) {
            let tails = self.tails_fd(slot.hook);
            match program {
                Some(program) => load::set_slot(tails, slot.slot, program.as_raw_fd()),
                None => load::clear_slot(tails, slot.slot),
            }
            .map_err(FilterError::Install)?;
        }
        // The program arrays hold the programs now; our handles can go.
        drop(programs);
        self.filter = filter;
        Ok(())
    }

    /// Translates `classic` for `slot`'s hook and loads it.
    fn load_filter_program(
        &self,
        filter: &Filter,
        classic: &[filter::ClassicInsn],
        slot: &FilterSlot,
    ) -> Result<OwnedFd, FilterError> {
        let fds = filter::translate::MapFds {
            tails: self.tails_fd(slot.hook),
            verdict: raw_fd(&self.verdict),
        };
        let insns = filter::translate::translate(classic, slot.hook, slot.count_slot, fds)
            .map_err(|source| FilterError::Translate {
                expression: filter.expression.clone(),
                source,
            })?;
        let (prog_type, attach_type) = match slot.hook {
            Hook::Xdp => (load::PROG_TYPE_XDP, load::ATTACH_TYPE_XDP),
            Hook::TcEthernet | Hook::TcL3 => (load::PROG_TYPE_SCHED_CLS, 0),
        };
        load::load_program(prog_type, attach_type, "ntm_filter", &insns).map_err(|failure| {
            if failure.error.raw_os_error() == Some(libc::EPERM) && failure.log.trim().is_empty() {
                FilterError::NotPermitted
            } else {
                FilterError::Rejected {
                    expression: filter.expression.clone(),
                    hook: slot.hook,
                    error: failure.error,
                    log_tail: log_tail(&failure.log, VERIFIER_LOG_TAIL),
                }
            }
        })
    }

    /// The program array a hook's filter and counting half live in.
    fn tails_fd(&self, hook: Hook) -> i32 {
        match hook {
            Hook::Xdp => raw_fd(&self.xdp_tails),
            Hook::TcEthernet | Hook::TcL3 => raw_fd(&self.tc_tails),
        }
    }

    /// The filter in place, if any.
    pub fn filter(&self) -> Option<&Filter> {
        self.filter.as_ref()
    }

    /// Whether frames of `link` can be counted as the filter asks: with no
    /// filter always; with one, only if it compiled for that link type.
    pub fn filter_allows(&self, link: LinkType) -> Result<(), FilterError> {
        match &self.filter {
            None => Ok(()),
            Some(filter) => filter.program(link).map(|_| ()),
        }
    }

    /// The loaded XDP program.
    pub fn xdp_program(&mut self) -> Option<&mut Xdp> {
        self.ebpf
            .program_mut(names::PROG_XDP)
            .and_then(|p| <&mut Xdp>::try_from(p).ok())
    }

    /// A loaded TC program by name (see `ntm_common::names`).
    pub fn tc_program(&mut self, name: &str) -> Option<&mut SchedClassifier> {
        self.ebpf
            .program_mut(name)
            .and_then(|p| <&mut SchedClassifier>::try_from(p).ok())
    }
}

fn raw_fd(map: &MapData) -> i32 {
    map.fd().as_fd().as_raw_fd()
}

/// Takes a map out of the object as plain map data (for its fd).
fn take_map_data(ebpf: &mut Ebpf, name: &'static str) -> Result<MapData, DatapathError> {
    match ebpf.take_map(name).ok_or(DatapathError::Missing(name))? {
        Map::ProgramArray(data) | Map::PerCpuArray(data) => Ok(data),
        _ => Err(DatapathError::Missing(name)),
    }
}

fn check_kernel() -> Result<(), DatapathError> {
    // An unreadable version is no reason to refuse: the load itself will say.
    match KernelVersion::current() {
        Ok(version) => kernel_supported(version),
        Err(_) => Ok(()),
    }
}

fn kernel_supported(version: KernelVersion) -> Result<(), DatapathError> {
    if version < KernelVersion::new(MIN_KERNEL.0, MIN_KERNEL.1, 0) {
        return Err(DatapathError::KernelTooOld {
            found: format!("{version:?}"),
        });
    }
    Ok(())
}

/// The last `lines` lines of a verifier log: where it gave up.
fn log_tail(log: &str, lines: usize) -> String {
    let all: Vec<&str> = log.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; lift it so big flow
/// tables load there too. Harmless (and ignored) where memcg accounting is used.
fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit with a valid, fully initialised struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        log::debug!(
            "could not raise RLIMIT_MEMLOCK: {}",
            io::Error::last_os_error()
        );
    }
}

/// Whether an error (or any error it wraps) is the kernel's EPERM/EACCES.
pub(crate) fn is_permission_error(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(e);
    while let Some(err) = current {
        if let Some(io) = err.downcast_ref::<io::Error>()
            && matches!(io.raw_os_error(), Some(libc::EPERM) | Some(libc::EACCES))
        {
            return true;
        }
        current = err.source();
    }
    false
}

fn classify_load_error(e: aya::EbpfError) -> DatapathError {
    if is_permission_error(&e) {
        return DatapathError::NotPermitted {
            what: "creating BPF maps".to_string(),
        };
    }
    match e {
        aya::EbpfError::MapError(ref map_error) => DatapathError::Maps {
            what: "map creation".to_string(),
            detail: map_error.to_string(),
        },
        other => DatapathError::Maps {
            what: "object load".to_string(),
            detail: format!("{other:#}"),
        },
    }
}

fn classify_program_error(name: &str, e: ProgramError) -> DatapathError {
    match e {
        // The verifier answers EACCES for programs it rejects, so only a
        // plain EPERM with nothing logged means missing privileges.
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            let log = verifier_log.to_string();
            if io_error.raw_os_error() == Some(libc::EPERM) && log.trim().is_empty() {
                return DatapathError::NotPermitted {
                    what: format!("loading program {name}"),
                };
            }
            DatapathError::VerifierRejected {
                program: name.to_string(),
                io_error,
                log_tail: log_tail(&log, VERIFIER_LOG_TAIL),
            }
        }
        e if is_permission_error(&e) => DatapathError::NotPermitted {
            what: format!("loading program {name}"),
        },
        source => DatapathError::Program {
            program: name.to_string(),
            source,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_kernels_are_refused_with_the_version_needed() {
        let err = kernel_supported(KernelVersion::new(4, 19, 0)).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("too old") && text.contains("5.10"), "{text}");
        assert!(kernel_supported(KernelVersion::new(5, 10, 0)).is_ok());
        assert!(kernel_supported(KernelVersion::new(6, 18, 44)).is_ok());
    }

    #[test]
    fn verifier_log_tail_keeps_the_last_lines() {
        let log = (1..=100)
            .map(|i| format!("line {i}"))
            .collect::<Vec<_>>()
            .join("\n");
        let tail = log_tail(&log, 3);
        assert_eq!(tail, "line 98\nline 99\nline 100");
        assert_eq!(log_tail("only", 40), "only");
    }

    #[test]
    fn permission_errors_are_found_in_the_chain() {
        let eperm = io::Error::from_raw_os_error(libc::EPERM);
        assert!(is_permission_error(&eperm));
        let other = io::Error::from_raw_os_error(libc::ENOENT);
        assert!(!is_permission_error(&other));
    }
}
