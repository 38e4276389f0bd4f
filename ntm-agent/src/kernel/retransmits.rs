//! TCP segments this host's kernel retransmitted, by connection: the
//! kernel's `ntm_tcp_retransmit` program on the `tcp_retransmit_skb` raw
//! tracepoint counts them in two tables that take turns, as the flow tables
//! do (see `drain.rs`): a swap returns once no program holds the earlier
//! table, which is then read and emptied, so nothing is lost or counted
//! twice.
//!
//! The tracepoint fires in the context of the socket that sends, so it
//! covers connections that end on this host (its containers and pods
//! included), never traffic it forwards. A raw tracepoint, because the
//! kernel skips a classic tracepoint's program while a map syscall (such as
//! this agent's own drain) runs on the same CPU, which lost a retransmit in
//! one run in a few dozen. Its arguments are the socket and the buffer:
//! before loading, the agent finds in the running kernel's BTF where a
//! socket keeps its addresses and ports, where a buffer keeps its segment
//! count, and whether the tracepoint passes the send's error (Linux 6.17+,
//! where retransmits that failed fire it too; those are not counted).

use super::load::share_map;
use aya::{
    Ebpf, EbpfLoader,
    maps::{ArrayOfMaps, Map, MapData, MapError, PerCpuArray, PerCpuHashMap},
    programs::{ProgramError, RawTracePoint},
};
use ntm_common::{RetransmitKey, RetransmitLayout, family, names, retransmit_lost};

/// The raw tracepoint the program attaches to.
const TRACEPOINT: &str = "tcp_retransmit_skb";

/// The running kernel's BTF.
const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, thiserror::Error)]
pub enum RetransmitError {
    #[error(
        "the kernel's BTF ({VMLINUX_BTF}) could not be read ({0}); counting retransmissions needs it to find a connection in a socket (kernels built with CONFIG_DEBUG_INFO_BTF have it; --no-tcp-health turns this off)"
    )]
    Btf(String),
    #[error(
        "the kernel's BTF has no {0}: this kernel's sockets are not laid out as ntm reads them (--no-tcp-health turns this off)"
    )]
    Layout(&'static str),
    #[error("attaching to the tcp_retransmit_skb raw tracepoint failed: {0}")]
    Attach(#[source] ProgramError),
    #[error(transparent)]
    Map(#[from] MapError),
}

/// What the program needs to know of the running kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout(pub RetransmitLayout);

impl Layout {
    /// Reads the running kernel's BTF.
    pub fn of_running_kernel() -> Result<Self, RetransmitError> {
        let btf =
            btf_rs::Btf::from_file(VMLINUX_BTF).map_err(|e| RetransmitError::Btf(e.to_string()))?;
        let layout = Self::of(&btf)?;
        if layout.0.segments == 0 {
            log::info!(
                "the kernel's BTF has no TCP segment count in sk_buff: each retransmitted buffer counts as one segment"
            );
        }
        Ok(layout)
    }

    /// Finds in `btf` each field the program reads, with the size it reads.
    pub fn of(btf: &btf_rs::Btf) -> Result<Self, RetransmitError> {
        let common = member(btf, "sock", "__sk_common", None)
            .ok_or(RetransmitError::Layout("sock.__sk_common"))?;
        let field = |name: &'static str, size: usize| -> Result<u32, RetransmitError> {
            member(btf, "sock_common", name, Some(size))
                .map(|at| common + at)
                .ok_or(RetransmitError::Layout(name))
        };
        Ok(Self(RetransmitLayout {
            family: field("skc_family", 2)?,
            local_port: field("skc_num", 2)?,
            remote_port: field("skc_dport", 2)?,
            local_v4: field("skc_rcv_saddr", 4)?,
            remote_v4: field("skc_daddr", 4)?,
            local_v6: field("skc_v6_rcv_saddr", 16)?,
            remote_v6: field("skc_v6_daddr", 16)?,
            segments: segments_offset(btf).unwrap_or(0),
            has_err: match tracepoint_arguments(btf) {
                Some(2) => 0,
                Some(3) => 1,
                _ => {
                    return Err(RetransmitError::Layout(
                        "tcp_retransmit_skb(sk, skb[, err])",
                    ));
                }
            },
        }))
    }

    /// Writes what the program needs to know into the object before load.
    pub fn set_in(self, loader: &mut EbpfLoader<'_>) {
        // Stored in the loader until load; a static keeps it alive.
        let layout: &'static RetransmitLayout = Box::leak(Box::new(self.0));
        loader.override_global(names::RETRANSMIT_LAYOUT, layout, true);
    }
}

/// Where `TCP_SKB_CB(skb)->tcp_gso_segs` is in a `struct sk_buff`: its
/// control buffer `cb` holds a `struct tcp_skb_cb`, whose segment count a
/// retransmitted buffer carries (the kernel adds it to TcpRetransSegs).
/// None where a name is missing or the field is not 2 bytes.
pub fn segments_offset(btf: &btf_rs::Btf) -> Option<u32> {
    let cb = member(btf, "sk_buff", "cb", None)?;
    let segs = member(btf, "tcp_skb_cb", "tcp_gso_segs", Some(2))?;
    Some(cb + segs)
}

/// How many arguments the `tcp_retransmit_skb` tracepoint passes: the
/// parameters of its `btf_trace_` prototype, less the leading `void *`.
fn tracepoint_arguments(btf: &btf_rs::Btf) -> Option<usize> {
    use btf_rs::Type;
    let types = btf
        .resolve_types_by_name(&format!("btf_trace_{TRACEPOINT}"))
        .ok()?;
    let mut t = types.into_iter().find(|t| matches!(t, Type::Typedef(_)))?;
    loop {
        t = match t {
            Type::Typedef(ref inner) => btf.resolve_chained_type(inner).ok()?,
            Type::Ptr(ref inner) => btf.resolve_chained_type(inner).ok()?,
            Type::FuncProto(proto) => return proto.parameters.len().checked_sub(1),
            _ => return None,
        };
    }
}

/// The byte offset of `member` in struct `name`, looked for through its
/// anonymous structs and unions; with `size`, only if the member is that
/// many bytes (through typedefs and qualifiers) and starts on a byte.
fn member(btf: &btf_rs::Btf, name: &str, member: &str, size: Option<usize>) -> Option<u32> {
    use btf_rs::Type;
    let types = btf.resolve_types_by_name(name).ok()?;
    let outer = types.iter().find_map(|t| match t {
        Type::Struct(s) => Some(s),
        _ => None,
    })?;
    fn find(btf: &btf_rs::Btf, s: &btf_rs::Struct, member: &str, base: u32) -> Option<(u32, Type)> {
        for m in &s.members {
            let name = btf.resolve_name(m).unwrap_or_default();
            let t = btf.resolve_chained_type(m).ok()?;
            if name == member {
                return Some((base + m.bit_offset(), t));
            }
            if name.is_empty()
                && let Type::Struct(inner) | Type::Union(inner) = &t
                && let Some(found) = find(btf, inner, member, base + m.bit_offset())
            {
                return Some(found);
            }
        }
        None
    }
    let (bits, t) = find(btf, outer, member, 0)?;
    if bits % 8 != 0 {
        return None;
    }
    if let Some(size) = size
        && size_of(btf, t) != Some(size)
    {
        return None;
    }
    Some(bits / 8)
}

/// The size of a BTF type in bytes, through typedefs and qualifiers.
fn size_of(btf: &btf_rs::Btf, t: btf_rs::Type) -> Option<usize> {
    use btf_rs::Type;
    match t {
        Type::Int(int) => Some(int.size()),
        Type::Struct(s) | Type::Union(s) => Some(s.size()),
        Type::Enum(e) => Some(e.size()),
        Type::Array(ref a) => Some(a.len() * size_of(btf, btf.resolve_chained_type(a).ok()?)?),
        Type::Typedef(ref inner) => size_of(btf, btf.resolve_chained_type(inner).ok()?),
        Type::Const(ref inner) => size_of(btf, btf.resolve_chained_type(inner).ok()?),
        Type::Volatile(ref inner) => size_of(btf, btf.resolve_chained_type(inner).ok()?),
        _ => None,
    }
}

/// A table's data (the tables are per-CPU hashes, checked when taken).
fn map_data(map: &Map) -> &MapData {
    match map {
        Map::PerCpuHashMap(data) => data,
        _ => unreachable!("a retransmit table is a per-CPU hash"),
    }
}

/// A connection as its frames carry it: a dual-stack (IPv6) socket's
/// connection to an IPv4 address (`::ffff:a.b.c.d` on both sides) sends
/// IPv4, so it is keyed as the IPv4 connection its traffic is counted as.
fn as_on_the_wire(key: RetransmitKey) -> RetransmitKey {
    let v4 = |a: &[u8; 16]| std::net::Ipv6Addr::from(*a).to_ipv4_mapped();
    match (key.family, v4(&key.local), v4(&key.remote)) {
        (family::IPV6, Some(local), Some(remote)) => {
            let mut key = RetransmitKey {
                family: family::IPV4,
                local: [0; 16],
                remote: [0; 16],
                ..key
            };
            key.local[..4].copy_from_slice(&local.octets());
            key.remote[..4].copy_from_slice(&remote.octets());
            key
        }
        _ => key,
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
    /// Loads the program of a loaded object (its layout set with
    /// [`Layout::set_in`]), takes its maps and attaches it.
    pub fn attach(ebpf: &mut Ebpf) -> Result<Self, RetransmitError> {
        let missing = |name: &str| MapError::InvalidName {
            name: name.to_string(),
        };
        let mut slot: ArrayOfMaps<MapData, MapData> =
            share_map(ebpf, names::ACTIVE_RETRANSMITS)?.try_into()?;
        let table = |name: &'static str| -> Result<Map, MapError> {
            match share_map(ebpf, name)? {
                map @ Map::PerCpuHashMap(_) => Ok(map),
                _ => Err(missing(name)),
            }
        };
        let tables = [
            table(names::RETRANSMIT_TABLES[0])?,
            table(names::RETRANSMIT_TABLES[1])?,
        ];
        slot.set(0, map_data(&tables[0]), 0)?;
        let lost: PerCpuArray<MapData, u64> =
            share_map(ebpf, names::RETRANSMITS_LOST)?.try_into()?;
        let program: &mut RawTracePoint = ebpf
            .program_mut(names::RETRANSMIT_PROGRAM)
            .ok_or(RetransmitError::Attach(ProgramError::NotLoaded))?
            .try_into()
            .map_err(RetransmitError::Attach)?;
        program.load().map_err(RetransmitError::Attach)?;
        program
            .attach(TRACEPOINT)
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
                counts.connections.push((as_on_the_wire(key), segments));
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

    /// The running kernel's BTF, where there is one.
    fn this_kernel() -> Option<btf_rs::Btf> {
        match btf_rs::Btf::from_file(VMLINUX_BTF) {
            Ok(btf) => Some(btf),
            Err(_) => {
                eprintln!("SKIPPED: no {VMLINUX_BTF}");
                None
            }
        }
    }

    #[test]
    fn this_kernel_s_sockets_are_found_in_its_btf() {
        let Some(btf) = this_kernel() else { return };
        let layout = Layout::of(&btf).unwrap().0;
        // 6.18 on x86_64, as `bpftool btf dump file /sys/kernel/btf/vmlinux`
        // shows struct sock_common (at the start of struct sock) and the
        // tracepoint's prototype (the send's error from 6.17).
        assert_eq!(
            layout,
            RetransmitLayout {
                family: 16,
                local_port: 14,
                remote_port: 12,
                local_v4: 4,
                remote_v4: 0,
                local_v6: 72,
                remote_v6: 56,
                segments: 48,
                has_err: 1,
            }
        );
    }

    #[test]
    fn this_kernel_s_btf_has_the_segment_count_after_cb() {
        // cb at byte 40 of sk_buff, tcp_gso_segs at byte 8 of tcp_skb_cb.
        let Some(btf) = this_kernel() else { return };
        assert_eq!(segments_offset(&btf), Some(48));
    }

    #[test]
    fn a_dual_stack_socket_s_ipv4_connection_is_keyed_as_ipv4() {
        let v6 = |a: &str| a.parse::<std::net::Ipv6Addr>().unwrap().octets();
        let mapped = RetransmitKey {
            local: v6("::ffff:198.18.0.1"),
            remote: v6("::ffff:198.18.0.2"),
            local_port: 40000,
            remote_port: 443,
            family: family::IPV6,
            _pad: [0; 3],
        };
        let mut v4 = RetransmitKey {
            family: family::IPV4,
            ..mapped
        };
        v4.local = [0; 16];
        v4.remote = [0; 16];
        v4.local[..4].copy_from_slice(&[198, 18, 0, 1]);
        v4.remote[..4].copy_from_slice(&[198, 18, 0, 2]);
        assert_eq!(as_on_the_wire(mapped), v4);
        let native = RetransmitKey {
            local: v6("2001:db8::1"),
            remote: v6("2001:db8::2"),
            ..mapped
        };
        assert_eq!(as_on_the_wire(native), native);
        assert_eq!(as_on_the_wire(v4), v4);
    }

    #[test]
    fn a_field_of_another_size_is_not_taken() {
        let Some(btf) = this_kernel() else { return };
        // skc_family is 2 bytes, skc_v6_daddr 16.
        assert_eq!(member(&btf, "sock_common", "skc_family", Some(4)), None);
        assert_eq!(member(&btf, "sock_common", "skc_v6_daddr", Some(4)), None);
        assert_eq!(member(&btf, "sock_common", "no_such_field", None), None);
        assert_eq!(member(&btf, "no_such_struct", "skc_family", None), None);
    }
}
