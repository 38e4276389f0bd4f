//! Loading the kernel programs: the embedded eBPF object, its settings, its
//! maps, and clear errors when the kernel or the privileges say no.

use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, OwnedFd},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, Map, MapData, MapError},
    programs::{ProgramError, SchedClassifier, Xdp},
    util::KernelVersion,
};
use ntm_common::{
    names,
    programs::{self, HookPrograms, LinkType},
};

use super::{
    drain::{DrainError, FlowTables},
    handshakes::Handshakes,
    observe::{LearntMacs, Observer, ObserverError},
    retransmits::{Layout, Retransmits},
};
use crate::{
    filter::{self, Filter, FilterError},
    sys::{SyscallError, bpf, process},
};

/// The kernel programs, built by build.rs from the ntm-ebpf crate.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ntm"));

/// Oldest kernel ntm runs on: the XDP programs hand DNS and DHCP frames
/// over with `bpf_xdp_load_bytes` (5.18). Older kernels are refused at
/// start in TC mode too (the XDP programs are loaded only when used), so
/// that a kernel ntm starts on runs all of it. BTF-defined map-in-map,
/// `gso_segs` in `__sk_buff`, bounded loops, batch map operations and the
/// ring buffer are all older.
pub const MIN_KERNEL: (u8, u8) = (5, 18);

/// Lines of the verifier's log shown when it rejects a program.
const VERIFIER_LOG_TAIL: usize = 40;
/// Bytes of verifier log asked for when a filter program is rejected.
const VERIFIER_LOG_SIZE: usize = 1 << 20;

#[derive(Clone, Debug)]
pub struct DatapathOptions {
    /// Capacity of each of the two flow tables.
    pub flow_table_entries: u32,
    /// First port of the client ephemeral range (service-port rule).
    pub ephemeral_start: u16,
    /// XDP mode: drop frames after counting them (mirror ports).
    pub xdp_drop: bool,
    /// Frames of each kind (DNS, DHCP, TLS, QUIC) handed to the agent per
    /// second per CPU at most; 0: none (no name needs them).
    pub observe_rate: u32,
    /// Which `observe::Kind`s are handed over (a bit per kind).
    pub observe_kinds: u32,
    /// Fill the table of source MACs by address (devices named by MAC).
    pub learn_macs: bool,
    /// Whose MACs are learnt: the local networks (see [`mac_nets`]).
    pub mac_nets: ntm_common::observe::MacNets,
    /// Count the TCP segments this host retransmits, by connection (the
    /// `tcp:tcp_retransmit_skb` tracepoint; see `retransmits.rs`). Where
    /// the tracepoint cannot be used, the log says why and the rest runs.
    pub count_retransmits: bool,
    /// Follow TCP handshakes on the hooks, for their latency and failed
    /// connections (see `handshakes.rs`).
    pub track_handshakes: bool,
    /// TC programs of the object loaded besides those of
    /// [`programs::HOOKS`]: the bench's (`ntm_bench_upto_*`, which stop
    /// after one part of the full path, and `ntm_bench_full_path`); none
    /// in the agent. Loaded
    /// with the object; they tail-call the slots of the hooks'
    /// programs, filled when those are first used.
    pub also_load: &'static [&'static str],
}

/// The kernel's form of the networks whose sources' MACs are learnt; more
/// than fit: every source.
pub fn mac_nets(nets: &[crate::model::net::Cidr]) -> ntm_common::observe::MacNets {
    use ntm_common::observe::{MAC_NETS, MacNets};
    use std::net::IpAddr;
    let mut out = MacNets {
        all: 0,
        ..MacNets::ALL
    };
    for net in nets {
        let (addr, prefix) = (&net.addr(), &net.prefix());
        match addr {
            IpAddr::V4(v4) => {
                if out.v4_count as usize == MAC_NETS {
                    return MacNets::ALL;
                }
                let mask = u32::MAX.checked_shl(32 - *prefix as u32).unwrap_or(0);
                // Network byte order, as the frame holds the address.
                let net = (u32::from(*v4) & mask).to_be();
                out.v4[out.v4_count as usize] = [net, mask.to_be()];
                out.v4_count += 1;
            }
            IpAddr::V6(v6) => {
                if out.v6_count as usize == MAC_NETS {
                    return MacNets::ALL;
                }
                let mask = u128::MAX.checked_shl(128 - *prefix as u32).unwrap_or(0);
                let net = u128::from(*v6) & mask;
                let words = |v: u128| {
                    let b = v.to_be_bytes();
                    [0, 4, 8, 12].map(|i| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]))
                };
                let (n, m) = (words(net), words(mask));
                out.v6[out.v6_count as usize] = [n[0], n[1], n[2], n[3], m[0], m[1], m[2], m[3]];
                out.v6_count += 1;
            }
        }
    }
    out
}

impl Default for DatapathOptions {
    fn default() -> Self {
        Self {
            flow_table_entries: ntm_common::DEFAULT_FLOW_TABLE_ENTRIES,
            ephemeral_start: ntm_common::service_port::DEFAULT_EPHEMERAL_START,
            xdp_drop: false,
            observe_rate: 0,
            observe_kinds: 0,
            learn_macs: false,
            mac_nets: ntm_common::observe::MacNets::ALL,
            count_retransmits: false,
            track_handshakes: false,
            also_load: &[],
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
        "the kernel could not load ntm's maps and programs ({source}); is the kernel built with BTF and CONFIG_BPF_SYSCALL?"
    )]
    Object {
        #[source]
        source: aya::EbpfError,
    },
    #[error(
        "the kernel's verifier rejected program {program} ({io_error}); this is a bug in ntm, please report it with this log tail:\n{log_tail}"
    )]
    VerifierRejected {
        program: String,
        #[source]
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
    #[error("ntm has no kernel program {0} of that type")]
    NoProgram(String),
    #[error(transparent)]
    Filter(#[from] FilterError),
    #[error("setting up the flow tables failed: {0}")]
    FlowTables(#[from] DrainError),
    #[error("setting up map {map} failed: {source}")]
    MapSetup {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("setting up the TCP handshake tables failed: {0}")]
    Handshakes(#[from] super::handshakes::HandshakeSetupError),
    #[error("setting up the DNS and DHCP ring buffer failed: {0}")]
    Observer(#[from] ObserverError),
    #[error("setting up the tail call to {program} failed: {source}")]
    TailSetup {
        program: &'static str,
        #[source]
        source: SyscallError,
    },
}

/// The loaded kernel side: programs ready to attach, flow tables ready to
/// drain.
pub struct Datapath {
    /// The object: its programs, and a handle on every map its programs'
    /// instructions name (see [`share_map`]).
    ebpf: Ebpf,
    /// Whether frames are handed over for names (the hooks' hand-over
    /// programs are loaded with them).
    observing: bool,
    /// Which rows of [`programs::HOOKS`] have their programs loaded and
    /// their slots filled: a hook's are loaded when it is first used.
    hooks_loaded: [bool; programs::HOOKS.len()],
    /// The program arrays and the verdict map, held for the agent's life:
    /// the kernel empties a program array when its last user handle closes.
    tc_tails: MapData,
    xdp_tails: MapData,
    verdict: MapData,
    /// The filter in the hooks now, if any.
    filter: Option<Filter>,
    /// Whether the entry programs tail-call the filter slots
    /// (`names::FILTER_ON`).
    filter_on: Array<MapData, u32>,
    /// The ring buffer of DNS and DHCP frames, until the agent takes it.
    observer: Option<Observer>,
    /// The table of source MACs, until the agent takes it.
    macs: Option<LearntMacs>,
    /// Whose MACs are learnt (held when MACs are learnt): the local
    /// networks, which change with the host's addresses.
    mac_nets: Option<Array<MapData, ntm_common::observe::MacNets>>,
    /// Until when this agent vouches for the tables (the orphan timeout).
    lease: Array<MapData, u64>,
    /// The retransmit counts, until the agent takes them (None if not
    /// counted).
    retransmits: Option<Retransmits>,
    /// The handshake table, until the agent takes it (None if handshakes
    /// are not followed).
    handshakes: Option<Handshakes>,
}

impl Datapath {
    /// Loads the object and its maps, writes the settings and the
    /// known-port bitmap, and returns the datapath with the flow tables
    /// out for draining. The hooks' programs are loaded and verified when
    /// first used ([`Datapath::tc_program`], [`Datapath::xdp_program`]).
    /// With `pin_maps_in`, the maps the next agent reads
    /// (`names::PINNED`) are pinned in that (new, empty) directory.
    pub fn load(
        options: &DatapathOptions,
        known_ports: &[u32],
        pin_maps_in: Option<&std::path::Path>,
    ) -> Result<(Self, FlowTables), DatapathError> {
        check_kernel()?;
        // Ignored where memcg accounting is used (5.11+), which is fine.
        if let Err(e) = process::raise_memlock_limit() {
            log::debug!("{e}");
        }
        let mut loader = EbpfLoader::new();
        if let Some(dir) = pin_maps_in {
            for name in names::PINNED {
                loader.map_pin_path(name, dir.join(name));
            }
        }
        for table in names::FLOW_TABLES {
            loader.map_max_entries(table, options.flow_table_entries);
        }
        let retransmit_layout = if options.count_retransmits {
            match Layout::of_running_kernel() {
                Ok(layout) => Some(layout),
                Err(e) => {
                    log::warn!("retransmissions are not counted: {e}");
                    None
                }
            }
        } else {
            None
        };
        match retransmit_layout {
            Some(layout) => layout.set_in(&mut loader),
            // Unused: as small as a hash can be.
            None => {
                for table in names::RETRANSMIT_TABLES {
                    loader.map_max_entries(table, 1);
                }
            }
        }
        let track_handshakes = options.track_handshakes as u32;
        loader.override_global(names::TRACK_HANDSHAKES, &track_handshakes, true);
        if !options.track_handshakes {
            // Unused: as small as they can be.
            loader.map_max_entries(names::HANDSHAKES, 1);
        }
        loader.override_global(names::EPHEMERAL_START, &options.ephemeral_start, true);
        // XDP_DROP is 1, XDP_PASS 2 (uapi/linux/bpf.h).
        let xdp_action: u32 = if options.xdp_drop { 1 } else { 2 };
        loader.override_global(names::XDP_ACTION, &xdp_action, true);
        let observe_rate = if options.observe_kinds == 0 {
            0
        } else {
            options.observe_rate
        };
        loader.override_global(names::OBSERVE_RATE, &observe_rate, true);
        loader.override_global(names::OBSERVE_KINDS, &options.observe_kinds, true);
        let learn_macs = options.learn_macs as u32;
        loader.override_global(names::LEARN_MACS, &learn_macs, true);
        // A read-only global, not a map: the kernel reads it with one load.
        let known_ports = known_port_words(known_ports);
        loader.override_global(names::KNOWN_PORTS, &known_ports, true);
        let mut ebpf = loader.load(EBPF_OBJECT).map_err(classify_load_error)?;

        // The hooks' programs are loaded when a hook is first used (see
        // `Datapath::load_hook_of`): the verifier takes about half a second for
        // each, and most hosts use a few of them (a TC agent on Ethernet
        // interfaces needs neither the raw-IP programs nor XDP's).
        for name in options.also_load {
            let program = ebpf.program_mut(name).ok_or(DatapathError::Missing(name))?;
            <&mut SchedClassifier>::try_from(program)
                .and_then(|p| p.load())
                .map_err(|e| classify_program_error(name, e))?;
        }

        let tc_tails = shared_map_data(&ebpf, names::TC_TAILS)?;
        let xdp_tails = shared_map_data(&ebpf, names::XDP_TAILS)?;
        let verdict = shared_map_data(&ebpf, names::FILTER_VERDICT)?;
        let lease: Array<MapData, u64> = shared_array(&ebpf, names::LEASE)?;
        let filter_on: Array<MapData, u32> = shared_array(&ebpf, names::FILTER_ON)?;
        let tables = FlowTables::share_from(&ebpf)?;
        let observer = if observe_rate == 0 {
            None
        } else {
            Some(Observer::share_from(&ebpf)?)
        };
        let mac_nets = if options.learn_macs {
            let mut nets: Array<MapData, ntm_common::observe::MacNets> =
                shared_array(&ebpf, names::MAC_NETS)?;
            nets.set(0, options.mac_nets, 0)
                .map_err(|source| DatapathError::MapSetup {
                    map: names::MAC_NETS,
                    source,
                })?;
            Some(nets)
        } else {
            None
        };
        let macs = if options.learn_macs {
            Some(LearntMacs::share_from(&ebpf)?)
        } else {
            None
        };
        let retransmits = match retransmit_layout {
            Some(_) => match Retransmits::attach(&mut ebpf) {
                Ok(retransmits) => Some(retransmits),
                Err(e) => {
                    log::warn!("retransmissions are not counted: {e}");
                    None
                }
            },
            None => None,
        };
        let handshakes = if options.track_handshakes {
            Some(Handshakes::share_from(&ebpf)?)
        } else {
            None
        };
        Ok((
            Self {
                ebpf,
                observing: observe_rate != 0,
                hooks_loaded: [false; programs::HOOKS.len()],
                tc_tails,
                xdp_tails,
                verdict,
                filter: None,
                filter_on,
                observer,
                macs,
                mac_nets,
                lease,
                retransmits,
                handshakes,
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
        // One program per loaded hook (None: the slot is emptied), all
        // loaded before any slot changes. A hook loaded later gets its
        // filter program then, before it is attached.
        let mut loaded = Vec::with_capacity(programs::HOOKS.len());
        for (hook, _) in programs::HOOKS
            .iter()
            .zip(self.hooks_loaded)
            .filter(|(_, l)| *l)
        {
            let program = match &filter {
                Some(filter) => self.filter_program(filter, hook)?,
                None => None,
            };
            loaded.push((hook, program));
        }
        // The programs skip the slots while no filter is on: told so
        // before the slots are emptied, and told of a filter once it is in
        // them (a frame in between is counted as without a filter).
        if filter.is_none() {
            self.filter_on.set(0, 0, 0).map_err(FilterError::Switch)?;
        }
        for (hook, program) in &loaded {
            self.fill_filter_slot(hook, program.as_ref())?;
        }
        if filter.is_some() {
            self.filter_on.set(0, 1, 0).map_err(FilterError::Switch)?;
        }
        // The program arrays hold the programs now; our handles can go.
        drop(loaded);
        self.filter = filter;
        Ok(())
    }

    /// `filter`'s program for `hook`, loaded; None where the filter does
    /// not compile for the hook's link type (the agent does not attach to
    /// such interfaces, see [`Datapath::filter_allows`]).
    fn filter_program(
        &self,
        filter: &Filter,
        hook: &HookPrograms,
    ) -> Result<Option<OwnedFd>, FilterError> {
        match filter.program(hook.link) {
            Ok(classic) => self.load_filter_program(filter, classic, hook).map(Some),
            Err(_) => Ok(None),
        }
    }

    /// Puts `program` in `hook`'s filter slot, or empties it (every frame
    /// counted).
    fn fill_filter_slot(
        &self,
        hook: &HookPrograms,
        program: Option<&OwnedFd>,
    ) -> Result<(), FilterError> {
        let tails = self.tails(hook);
        match program {
            Some(program) => bpf::set_program_slot(tails, hook.filter_slot, program.as_fd()),
            None => bpf::clear_program_slot(tails, hook.filter_slot),
        }
        .map_err(FilterError::Install)
    }

    /// Loads the programs of the hook `name` belongs to (a row of
    /// [`programs::HOOKS`]), once: its entry, its counting half and, when
    /// observing, its hand-over, each in its tail-call slot, and the filter
    /// in place in its filter slot; all before the entry can be attached.
    /// Names of no hook (the bench's) were loaded with the object.
    fn load_hook_of(&mut self, name: &str) -> Result<(), DatapathError> {
        let Some(index) = programs::HOOKS
            .iter()
            .position(|h| h.loaded().contains(&name))
        else {
            return Ok(());
        };
        if self.hooks_loaded[index] {
            return Ok(());
        }
        let hook = &programs::HOOKS[index];
        let observe = self.observing.then_some((hook.observe, hook.observe_slot));
        let mut loaded = Vec::new();
        for name in [hook.entry, hook.count]
            .into_iter()
            .chain(observe.map(|(n, _)| n))
        {
            let program = self
                .ebpf
                .program_mut(name)
                .ok_or(DatapathError::Missing(name))?;
            let load = if hook.is_xdp() {
                <&mut Xdp>::try_from(program).and_then(|p| p.load())
            } else {
                <&mut SchedClassifier>::try_from(program).and_then(|p| p.load())
            };
            match load {
                // Loaded by an earlier call that failed further on.
                Ok(()) | Err(ProgramError::AlreadyLoaded) => {}
                Err(e) => return Err(classify_program_error(name, e)),
            }
            loaded.push(name);
        }
        let tails = self.tails(hook);
        for (name, slot) in [(hook.count, hook.count_slot)].into_iter().chain(observe) {
            let program = self
                .ebpf
                .program(name)
                .ok_or(DatapathError::Missing(name))?
                .fd()
                .map_err(|source| DatapathError::Program {
                    program: name.to_string(),
                    source,
                })?;
            bpf::set_program_slot(tails, slot, program.as_fd()).map_err(|source| {
                DatapathError::TailSetup {
                    program: name,
                    source,
                }
            })?;
        }
        if let Some(filter) = &self.filter {
            let program = self.filter_program(filter, hook)?;
            self.fill_filter_slot(hook, program.as_ref())?;
        }
        log::debug!("loaded {}", loaded.join(", "));
        self.hooks_loaded[index] = true;
        Ok(())
    }

    /// Renews the lease: if no agent renews it within `timeout`, the
    /// programs stop counting (None: they never do).
    pub fn renew_lease(&mut self, timeout: Option<std::time::Duration>) -> Result<(), MapError> {
        let until = match timeout {
            Some(timeout) => process::monotonic_ns().saturating_add(timeout.as_nanos() as u64),
            None => 0,
        };
        self.lease.set(0, until, 0)
    }

    /// Translates `classic` for `hook` and loads it.
    fn load_filter_program(
        &self,
        filter: &Filter,
        classic: &[filter::ClassicInsn],
        hook: &HookPrograms,
    ) -> Result<OwnedFd, FilterError> {
        let fds = filter::translate::MapFds {
            tails: self.tails(hook).as_raw_fd(),
            verdict: self.verdict.fd().as_fd().as_raw_fd(),
        };
        let insns = filter::translate::translate(classic, hook, fds).map_err(|source| {
            FilterError::Translate {
                expression: filter.expression.clone(),
                source,
            }
        })?;
        let spec = bpf::ProgramSpec {
            prog_type: if hook.is_xdp() {
                bpf::PROG_TYPE_XDP
            } else {
                bpf::PROG_TYPE_SCHED_CLS
            },
            expected_attach_type: if hook.is_xdp() {
                bpf::ATTACH_TYPE_XDP
            } else {
                0
            },
            name: "ntm_filter",
            insns: &insns,
        };
        let error = match bpf::load_program(&spec, None) {
            Ok(fd) => return Ok(fd),
            Err(e) if e.errno() == Some(libc::EPERM) => return Err(FilterError::NotPermitted),
            Err(e) => e,
        };
        // Once more with the verifier's log, to say why.
        let mut log = vec![0u8; VERIFIER_LOG_SIZE];
        match bpf::load_program(&spec, Some(&mut log)) {
            // Accepted the second time (a transient failure): keep it.
            Ok(fd) => Ok(fd),
            Err(_) => {
                let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
                Err(FilterError::Rejected {
                    expression: filter.expression.clone(),
                    hook: format!("{} {}", hook.link.name(), hook.point.name()),
                    source: error,
                    log_tail: log_tail(&String::from_utf8_lossy(&log[..end]), VERIFIER_LOG_TAIL),
                })
            }
        }
    }

    /// The program array a hook's filter and counting half live in.
    fn tails(&self, hook: &HookPrograms) -> BorrowedFd<'_> {
        if hook.is_xdp() {
            self.xdp_tails.fd().as_fd()
        } else {
            self.tc_tails.fd().as_fd()
        }
    }

    /// The filter in place, if any.
    /// The ring buffer of DNS and DHCP frames, once (None if observation
    /// is off).
    pub fn take_observer(&mut self) -> Option<Observer> {
        self.observer.take()
    }

    /// The table of source MACs by address, once (None if not learnt).
    pub fn take_macs(&mut self) -> Option<LearntMacs> {
        self.macs.take()
    }

    /// The handshake table, once (None if handshakes are not followed).
    pub fn take_handshakes(&mut self) -> Option<Handshakes> {
        self.handshakes.take()
    }

    /// The retransmit counts, once (None if not counted).
    pub fn take_retransmits(&mut self) -> Option<Retransmits> {
        self.retransmits.take()
    }

    /// Learns the MACs of sources in `nets` from now on (nothing when MACs
    /// are not learnt). The kernel reads the one entry as a whole, so a
    /// frame sees the old networks or the new.
    pub fn set_mac_nets(&mut self, nets: &[crate::model::net::Cidr]) -> Result<(), DatapathError> {
        let Some(map) = self.mac_nets.as_mut() else {
            return Ok(());
        };
        map.set(0, mac_nets(nets), 0)
            .map_err(|source| DatapathError::MapSetup {
                map: names::MAC_NETS,
                source,
            })
    }

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

    /// The XDP program `name` (see `ntm_common::programs`), its hook's
    /// programs loaded first if they are not yet.
    pub fn xdp_program(&mut self, name: &str) -> Result<&mut Xdp, DatapathError> {
        self.load_hook_of(name)?;
        self.ebpf
            .program_mut(name)
            .and_then(|p| <&mut Xdp>::try_from(p).ok())
            .ok_or_else(|| DatapathError::NoProgram(name.to_string()))
    }

    /// The TC program `name` (see `ntm_common::programs`), its hook's
    /// programs loaded first if they are not yet.
    pub fn tc_program(&mut self, name: &str) -> Result<&mut SchedClassifier, DatapathError> {
        self.load_hook_of(name)?;
        self.ebpf
            .program_mut(name)
            .and_then(|p| <&mut SchedClassifier>::try_from(p).ok())
            .ok_or_else(|| DatapathError::NoProgram(name.to_string()))
    }
}

/// The known-port bitmap as the kernel's global holds it: `words`, then
/// zeros up to `KNOWN_PORT_WORDS` (no port known); words beyond are no
/// port's.
fn known_port_words(words: &[u32]) -> [u32; ntm_common::KNOWN_PORT_WORDS as usize] {
    let mut all = [0; ntm_common::KNOWN_PORT_WORDS as usize];
    for (to, from) in all.iter_mut().zip(words) {
        *to = *from;
    }
    all
}

/// An array map of the object, for the datapath (see [`share_map`]).
fn shared_array<V: aya::Pod>(
    ebpf: &Ebpf,
    name: &'static str,
) -> Result<Array<MapData, V>, DatapathError> {
    share_map(ebpf, name)
        .and_then(Array::try_from)
        .map_err(|source| DatapathError::MapSetup { map: name, source })
}

/// A map of the object as plain map data (for its fd).
fn shared_map_data(ebpf: &Ebpf, name: &'static str) -> Result<MapData, DatapathError> {
    match share_map(ebpf, name).map_err(|source| DatapathError::MapSetup { map: name, source })? {
        Map::ProgramArray(data) | Map::PerCpuArray(data) => Ok(data),
        _ => Err(DatapathError::Missing(name)),
    }
}

/// Map `name` of the loaded object, for a part of the agent to own: a
/// handle of its own (a duplicate of the object's descriptor), while the
/// object keeps its handle open for as long as the [`Datapath`] lives.
///
/// Why not take the object's handle: aya writes each map's descriptor
/// number into the programs' instructions when the object is loaded, and
/// the hooks' programs go to the kernel later, when first used. Had the
/// handle been taken and dropped by its new owner (the flow tables when a
/// test or bench lets them go, say), a later program would name a closed
/// descriptor, or one reused for another map.
pub(crate) fn share_map(ebpf: &Ebpf, name: &str) -> Result<Map, MapError> {
    let map = ebpf.map(name).ok_or_else(|| MapError::InvalidName {
        name: name.to_string(),
    })?;
    let fd = map_data(map)
        .fd()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|io_error| aya::sys::SyscallError {
            call: "dup",
            io_error,
        })?;
    Map::from_map_data(MapData::from_fd(fd)?)
}

/// The data behind any kind of map.
fn map_data(map: &Map) -> &MapData {
    match map {
        Map::Array(data)
        | Map::ArrayOfMaps(data)
        | Map::BloomFilter(data)
        | Map::CgroupArray(data)
        | Map::CgroupStorage(data)
        | Map::CgrpStorage(data)
        | Map::CpuMap(data)
        | Map::DevMap(data)
        | Map::DevMapHash(data)
        | Map::HashMap(data)
        | Map::HashOfMaps(data)
        | Map::InodeStorage(data)
        | Map::LpmTrie(data)
        | Map::LruHashMap(data)
        | Map::PerCpuArray(data)
        | Map::PerCpuCgroupStorage(data)
        | Map::PerCpuHashMap(data)
        | Map::PerCpuLruHashMap(data)
        | Map::PerfEventArray(data)
        | Map::ProgramArray(data)
        | Map::Queue(data)
        | Map::ReusePortSockArray(data)
        | Map::RingBuf(data)
        | Map::SockHash(data)
        | Map::SockMap(data)
        | Map::SkStorage(data)
        | Map::Stack(data)
        | Map::StackTraceMap(data)
        | Map::Unsupported(data)
        | Map::XskMap(data) => data,
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
    DatapathError::Object { source: e }
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

    /// The benches' baseline object (`ntm-ebpf/src/bin/baseline.rs`).
    static BASELINE_OBJECT: &[u8] =
        aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ntm-bench-baseline"));

    /// The minimal counter the datapath bench measures ntm against makes
    /// no call of its own: zeroing its key, Rust's LLVM once called a
    /// `memset` subprogram that stored a byte at a time, and the counter
    /// took twice the time of the C counter it stands for, which made every
    /// ratio of the bench look twice as good as it was.
    #[test]
    fn the_minimal_counters_make_no_call_of_their_own() {
        const BPF_JMP_CALL: u8 = 0x05 | 0x80;
        const BPF_PSEUDO_CALL: u8 = 1;
        let object = aya_obj::Object::parse(BASELINE_OBJECT).expect("the baseline object");
        for name in ["ntm_bench_min_counter", "ntm_bench_min_counter_ip"] {
            let program = &object.programs[name];
            let function = &object.functions[&program.function_key()];
            let calls = function
                .instructions
                .iter()
                .filter(|i| i.code == BPF_JMP_CALL && i.src_reg() == BPF_PSEUDO_CALL)
                .count();
            assert_eq!(calls, 0, "{name} calls a function of its own");
        }
    }

    #[test]
    fn old_kernels_are_refused_with_the_version_needed() {
        let err = kernel_supported(KernelVersion::new(4, 19, 0)).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("too old") && text.contains("5.18"), "{text}");
        assert!(kernel_supported(KernelVersion::new(5, 17, 15)).is_err());
        assert!(kernel_supported(KernelVersion::new(5, 18, 0)).is_ok());
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
    fn mac_nets_match_what_they_were_given() {
        let nets = mac_nets(&[
            "192.168.0.0/16".parse().unwrap(),
            "10.1.2.3/8".parse().unwrap(),
            "fe80::/10".parse().unwrap(),
        ]);
        let v4 = |a: [u8; 4]| [u32::from_ne_bytes(a), 0, 0, 0];
        let v6 = |ip: &str| {
            let b = ip.parse::<std::net::Ipv6Addr>().unwrap().octets();
            [0, 4, 8, 12].map(|i| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]))
        };
        let (four, six) = (ntm_common::family::IPV4, ntm_common::family::IPV6);
        assert!(nets.contains(four, &v4([192, 168, 7, 9])));
        assert!(nets.contains(four, &v4([10, 200, 0, 1])));
        assert!(!nets.contains(four, &v4([192, 169, 0, 1])));
        assert!(!nets.contains(four, &v4([93, 184, 0, 1])));
        assert!(nets.contains(six, &v6("fe80::1")));
        assert!(nets.contains(six, &v6("febf::1")));
        assert!(!nets.contains(six, &v6("2001:db8::1")));
        assert!(!nets.contains(ntm_common::family::NON_IP, &[0; 4]));
        let many: Vec<_> = (0..17u8)
            .map(|i| crate::model::net::Cidr::network([10, i, 0, 0].into(), 16))
            .collect();
        assert!(
            mac_nets(&many).contains(four, &v4([93, 184, 0, 1])),
            "too many: all"
        );
    }

    #[test]
    fn permission_errors_are_found_in_the_chain() {
        let eperm = io::Error::from_raw_os_error(libc::EPERM);
        assert!(is_permission_error(&eperm));
        let other = io::Error::from_raw_os_error(libc::ENOENT);
        assert!(!is_permission_error(&other));
    }
}
