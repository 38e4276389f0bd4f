//! TCP segments this host's kernel retransmitted, by connection: the
//! kernel's `ntm_tcp_retransmit` program on the `tcp:tcp_retransmit_skb`
//! tracepoint counts them in two tables that take turns, as the flow tables
//! do (see `drain.rs`): a swap returns once no program holds the earlier
//! table, which is then read and emptied, so nothing is lost or counted
//! twice.
//!
//! The tracepoint fires in the context of the socket that sends, so it
//! covers connections that end on this host (its containers and pods
//! included), never traffic it forwards. Before attaching, the agent checks
//! the running kernel's format of the tracepoint against the offsets the
//! program reads, and finds whether it has the `err` field (Linux 6.17+,
//! where retransmits that failed fire it too; those are not counted).

use std::{fs, io, path::Path};

use aya::{
    Ebpf, EbpfLoader,
    maps::{ArrayOfMaps, Map, MapData, MapError, PerCpuArray, PerCpuHashMap},
    programs::{ProgramError, TracePoint},
};
use ntm_common::{RetransmitKey, names, retransmit_format, retransmit_lost};

/// Where tracefs may be mounted.
const TRACEFS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];
const CATEGORY: &str = "tcp";
const EVENT: &str = "tcp_retransmit_skb";

#[derive(Debug, thiserror::Error)]
pub enum RetransmitError {
    #[error(
        "the tcp:tcp_retransmit_skb tracepoint's format could not be read ({0}): is tracefs mounted (mount -t tracefs nodev /sys/kernel/tracing)? (--no-tcp-health turns this off)"
    )]
    Format(#[source] io::Error),
    #[error(
        "tracefs (/sys/kernel/tracing) is readable by root only: run ntm as root, or give it CAP_DAC_READ_SEARCH too (--no-tcp-health turns this off)"
    )]
    TracefsDenied,
    #[error(
        "the tcp:tcp_retransmit_skb tracepoint has field {field} at offset {found:?}, where this build reads it at {expected}"
    )]
    Layout {
        field: &'static str,
        expected: usize,
        found: Option<usize>,
    },
    #[error("attaching to the tcp:tcp_retransmit_skb tracepoint failed: {0}")]
    Attach(#[source] ProgramError),
    #[error(transparent)]
    Map(#[from] MapError),
}

/// The running kernel's layout of the tracepoint, as the program needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Format {
    /// Offset of `err`, 0 if the kernel has no such field.
    pub err_at: u32,
    /// Where a `struct sk_buff` holds its TCP segment count, from the
    /// kernel's BTF; 0 if unknown (see [`segments_offset`]).
    pub segs_at: u32,
}

impl Format {
    /// Reads and checks the running kernel's format. Where tracefs is not
    /// mounted (a mount namespace of its own, as `ip netns exec` and
    /// containers make), it is mounted at its usual place first: the
    /// mount stays in that namespace.
    pub fn of_running_kernel() -> Result<Self, RetransmitError> {
        let mut format = match Self::read() {
            Err(RetransmitError::Format(e)) if e.kind() == io::ErrorKind::NotFound => {
                if let Err(mount) = mount_tracefs() {
                    log::debug!("mounting tracefs at {}: {mount}", TRACEFS[0]);
                    return Err(RetransmitError::Format(e));
                }
                Self::read()
            }
            other => other,
        }?;
        format.segs_at = match btf_rs::Btf::from_file(VMLINUX_BTF) {
            Ok(btf) => segments_offset(&btf).unwrap_or_else(|| {
                log::info!(
                    "the kernel's BTF has no TCP segment count in sk_buff: each retransmitted buffer counts as one segment"
                );
                0
            }),
            Err(e) => {
                log::info!(
                    "reading the kernel's BTF ({VMLINUX_BTF}): {e}; each retransmitted buffer counts as one segment"
                );
                0
            }
        };
        Ok(format)
    }

    fn read() -> Result<Self, RetransmitError> {
        let mut last = io::Error::from(io::ErrorKind::NotFound);
        for root in TRACEFS {
            let path = Path::new(root)
                .join("events")
                .join(CATEGORY)
                .join(EVENT)
                .join("format");
            match fs::read_to_string(&path) {
                Ok(text) => return Self::parse(&text),
                Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                    return Err(RetransmitError::TracefsDenied);
                }
                Err(e) => last = e,
            }
        }
        Err(RetransmitError::Format(last))
    }

    /// Checks a format file's text: every field the program reads must be
    /// where it reads it.
    pub fn parse(text: &str) -> Result<Self, RetransmitError> {
        use retransmit_format as at;
        for (field, expected) in [
            ("skbaddr", at::SKBADDR),
            ("sport", at::SPORT),
            ("dport", at::DPORT),
            ("family", at::FAMILY),
            ("saddr", at::SADDR),
            ("daddr", at::DADDR),
            ("saddr_v6", at::SADDR_V6),
            ("daddr_v6", at::DADDR_V6),
        ] {
            let found = field_offset(text, field);
            if found != Some(expected) {
                return Err(RetransmitError::Layout {
                    field,
                    expected,
                    found,
                });
            }
        }
        let err_at = field_offset(text, "err").unwrap_or(0) as u32;
        Ok(Self { err_at, segs_at: 0 })
    }

    /// Writes what the program needs to know into the object before load.
    pub fn set_in(self, loader: &mut EbpfLoader<'_>) {
        // Stored in the loader until load; a static keeps it alive.
        let err_at: &'static u32 = Box::leak(Box::new(self.err_at));
        loader.override_global(names::RETRANSMIT_ERR_AT, err_at, true);
        let segs_at: &'static u32 = Box::leak(Box::new(self.segs_at));
        loader.override_global(names::RETRANSMIT_SEGS_AT, segs_at, true);
    }
}

/// The running kernel's BTF.
const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Where `TCP_SKB_CB(skb)->tcp_gso_segs` is in a `struct sk_buff`: its
/// control buffer `cb` holds a `struct tcp_skb_cb`, whose segment count a
/// retransmitted buffer carries (the kernel adds it to TcpRetransSegs).
/// From BTF, as aya has no CO-RE for Rust programs; None where a name is
/// missing or the field is not a 2-byte integer.
pub fn segments_offset(btf: &btf_rs::Btf) -> Option<u32> {
    let cb = member_bits(btf, "sk_buff", "cb")?;
    let segs = member_bits(btf, "tcp_skb_cb", "tcp_gso_segs")?;
    if cb % 8 != 0 || segs % 8 != 0 {
        return None;
    }
    Some((cb + segs) / 8)
}

/// The bit offset of `member` in struct `name`, looked for through its
/// anonymous structs and unions.
fn member_bits(btf: &btf_rs::Btf, name: &str, member: &str) -> Option<u32> {
    use btf_rs::Type;
    let types = btf.resolve_types_by_name(name).ok()?;
    let outer = types.iter().find_map(|t| match t {
        Type::Struct(s) => Some(s),
        _ => None,
    })?;
    fn find(btf: &btf_rs::Btf, s: &btf_rs::Struct, member: &str, base: u32) -> Option<u32> {
        for m in &s.members {
            let name = btf.resolve_name(m).unwrap_or_default();
            if name == member {
                return match btf.resolve_chained_type(m).ok()? {
                    btf_rs::Type::Int(int) if int.size() == 2 => Some(base + m.bit_offset()),
                    btf_rs::Type::Typedef(_) | btf_rs::Type::Array(_) => {
                        Some(base + m.bit_offset())
                    }
                    _ => None,
                };
            }
            if name.is_empty()
                && let Ok(btf_rs::Type::Struct(inner) | btf_rs::Type::Union(inner)) =
                    btf.resolve_chained_type(m)
                && let Some(found) = find(btf, &inner, member, base + m.bit_offset())
            {
                return Some(found);
            }
        }
        None
    }
    find(btf, outer, member, 0)
}

/// Mounts tracefs at its usual place, which is there (and empty) where it
/// is not mounted.
fn mount_tracefs() -> io::Result<()> {
    let target = std::ffi::CString::new(TRACEFS[0]).map_err(io::Error::other)?;
    // SAFETY: every argument is a NUL-terminated string that outlives the
    // call; no data argument.
    let rc = unsafe {
        libc::mount(
            c"nodev".as_ptr(),
            target.as_ptr(),
            c"tracefs".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The offset of `field` in a tracepoint format: its line reads
/// `field:TYPE NAME[N];\toffset:O;\tsize:S;\tsigned:X;`.
fn field_offset(text: &str, field: &str) -> Option<usize> {
    text.lines().find_map(|line| {
        let declaration = line.trim().strip_prefix("field:")?;
        let (declaration, rest) = declaration.split_once(';')?;
        let name = declaration.rsplit(' ').next()?;
        let name = name.split('[').next()?;
        if name != field {
            return None;
        }
        rest.trim()
            .strip_prefix("offset:")?
            .split(';')
            .next()?
            .parse()
            .ok()
    })
}

/// A table's data (the tables are per-CPU hashes, checked when taken).
fn map_data(map: &Map) -> &MapData {
    match map {
        Map::PerCpuHashMap(data) => data,
        _ => unreachable!("a retransmit table is a per-CPU hash"),
    }
}

/// What one drain found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RetransmitCounts {
    /// Segments retransmitted, by connection.
    pub connections: Vec<(RetransmitKey, u64)>,
    /// Retransmits of connections the table had no room for.
    pub no_room: u64,
    /// Retransmits the kernel tried and failed (not counted above).
    pub failed: u64,
}

/// The attached program's tables.
pub struct Retransmits {
    slot: ArrayOfMaps<MapData, MapData>,
    /// Each a `Map::PerCpuHashMap`.
    tables: [Map; 2],
    active: usize,
    lost: PerCpuArray<MapData, u64>,
    /// The lost counts summed over CPUs at the previous drain (they only
    /// grow).
    lost_seen: [u64; 2],
}

impl Retransmits {
    /// Loads the program of a loaded object (its format set with
    /// [`Format::set_in`]), takes its maps and attaches it.
    pub fn attach(ebpf: &mut Ebpf) -> Result<Self, RetransmitError> {
        let missing = |name: &str| MapError::InvalidName {
            name: name.to_string(),
        };
        let mut slot: ArrayOfMaps<MapData, MapData> = ebpf
            .take_map(names::ACTIVE_RETRANSMITS)
            .ok_or_else(|| missing(names::ACTIVE_RETRANSMITS))?
            .try_into()?;
        let mut table = |name: &'static str| -> Result<Map, MapError> {
            match ebpf.take_map(name).ok_or_else(|| missing(name))? {
                map @ Map::PerCpuHashMap(_) => Ok(map),
                _ => Err(missing(name)),
            }
        };
        let tables = [
            table(names::RETRANSMIT_TABLES[0])?,
            table(names::RETRANSMIT_TABLES[1])?,
        ];
        slot.set(0, map_data(&tables[0]), 0)?;
        let lost: PerCpuArray<MapData, u64> = ebpf
            .take_map(names::RETRANSMITS_LOST)
            .ok_or_else(|| missing(names::RETRANSMITS_LOST))?
            .try_into()?;
        let program: &mut TracePoint = ebpf
            .program_mut(names::RETRANSMIT_PROGRAM)
            .ok_or(RetransmitError::Attach(ProgramError::NotLoaded))?
            .try_into()
            .map_err(RetransmitError::Attach)?;
        program.load().map_err(RetransmitError::Attach)?;
        program
            .attach(CATEGORY, EVENT)
            .map_err(RetransmitError::Attach)?;
        Ok(Self {
            slot,
            tables,
            active: 0,
            lost,
            lost_seen: [0; 2],
        })
    }

    /// Swaps the tables and returns what was counted since the last drain.
    pub fn drain(&mut self) -> Result<RetransmitCounts, MapError> {
        let idle = self.active;
        let next = 1 - idle;
        // Returns once no program can still hold the idle table.
        self.slot.set(0, map_data(&self.tables[next]), 0)?;
        self.active = next;
        let mut table: PerCpuHashMap<&mut MapData, RetransmitKey, u64> =
            PerCpuHashMap::try_from(&mut self.tables[idle])?;
        let keys: Vec<RetransmitKey> = table.keys().collect::<Result<_, _>>()?;
        let mut counts = RetransmitCounts::default();
        for key in keys {
            let per_cpu = match table.get(&key, 0) {
                Ok(values) => values,
                Err(MapError::KeyNotFound) => continue,
                Err(e) => return Err(e),
            };
            let segments: u64 = per_cpu.iter().sum();
            table.remove(&key)?;
            if segments != 0 {
                counts.connections.push((key, segments));
            }
        }
        let lost = self.lost_now()?;
        counts.no_room = lost[0].wrapping_sub(self.lost_seen[0]);
        counts.failed = lost[1].wrapping_sub(self.lost_seen[1]);
        self.lost_seen = lost;
        Ok(counts)
    }

    fn lost_now(&self) -> Result<[u64; 2], MapError> {
        let mut sums = [0u64; 2];
        for (slot, sum) in [retransmit_lost::NO_ROOM, retransmit_lost::FAILED]
            .into_iter()
            .zip(sums.iter_mut())
        {
            *sum = self.lost.get(&slot, 0)?.iter().sum();
        }
        Ok(sums)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This machine's format (Linux 6.18), as tracefs shows it.
    const FORMAT_6_18: &str = "name: tcp_retransmit_skb
ID: 2281
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:const void * skbaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:const void * skaddr;\toffset:16;\tsize:8;\tsigned:0;
\tfield:int state;\toffset:24;\tsize:4;\tsigned:1;
\tfield:__u16 sport;\toffset:28;\tsize:2;\tsigned:0;
\tfield:__u16 dport;\toffset:30;\tsize:2;\tsigned:0;
\tfield:__u16 family;\toffset:32;\tsize:2;\tsigned:0;
\tfield:__u8 saddr[4];\toffset:34;\tsize:4;\tsigned:0;
\tfield:__u8 daddr[4];\toffset:38;\tsize:4;\tsigned:0;
\tfield:__u8 saddr_v6[16];\toffset:42;\tsize:16;\tsigned:0;
\tfield:__u8 daddr_v6[16];\toffset:58;\tsize:16;\tsigned:0;
\tfield:int err;\toffset:76;\tsize:4;\tsigned:1;
";

    #[test]
    fn the_format_of_6_18_has_err_at_76() {
        assert_eq!(
            Format::parse(FORMAT_6_18).unwrap(),
            Format {
                err_at: 76,
                segs_at: 0
            }
        );
    }

    #[test]
    fn this_kernel_s_btf_has_the_segment_count_after_cb() {
        // 6.18 on x86_64: cb at byte 40 of sk_buff, tcp_gso_segs at byte 8
        // of tcp_skb_cb (as bpftool btf dump shows).
        let Ok(btf) = btf_rs::Btf::from_file(VMLINUX_BTF) else {
            eprintln!("SKIPPED: no {VMLINUX_BTF}");
            return;
        };
        assert_eq!(segments_offset(&btf), Some(48));
    }

    #[test]
    fn a_format_before_6_17_has_no_err() {
        let old: String = FORMAT_6_18
            .lines()
            .filter(|l| !l.contains(" err;"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(Format::parse(&old).unwrap().err_at, 0);
    }

    #[test]
    fn a_field_elsewhere_is_refused() {
        let moved = FORMAT_6_18.replace("dport;\toffset:30", "dport;\toffset:32");
        let err = Format::parse(&moved).unwrap_err();
        assert!(
            matches!(
                err,
                RetransmitError::Layout {
                    field: "dport",
                    expected: 30,
                    found: Some(32)
                }
            ),
            "{err}"
        );
        let gone = FORMAT_6_18.replace("family", "fam");
        assert!(matches!(
            Format::parse(&gone).unwrap_err(),
            RetransmitError::Layout {
                field: "family",
                found: None,
                ..
            }
        ));
    }

    #[test]
    fn the_running_kernel_s_format_is_read_where_tracefs_is() {
        // Where tracefs is not mounted (a container), the error says so.
        match Format::of_running_kernel() {
            Ok(format) => assert!(format.err_at == 0 || format.err_at == 76, "{format:?}"),
            Err(e) => assert!(e.to_string().contains("tracefs"), "{e}"),
        }
    }
}
