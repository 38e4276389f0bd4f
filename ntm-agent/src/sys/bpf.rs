//! bpf(2) for what aya 0.14 does not offer: batch map reads and writes
//! (the drain), loading programs built in memory (the tcpdump filters) and
//! filling program-array slots with them. Every such call goes through
//! [`bpf`]; the attr structs are the `union bpf_attr` prefixes of
//! uapi/linux/bpf.h for each command.

use std::{
    mem::size_of,
    os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
};

use super::SyscallError;

/// The bpf(2) commands ntm issues itself.
#[derive(Clone, Copy, Debug)]
#[repr(i64)]
enum BpfCommand {
    MapUpdateElem = 2,
    MapDeleteElem = 3,
    ProgLoad = 5,
    MapLookupBatch = 24,
    MapLookupAndDeleteBatch = 25,
    MapUpdateBatch = 26,
    MapDeleteBatch = 27,
}

impl BpfCommand {
    fn call(self) -> &'static str {
        match self {
            BpfCommand::MapUpdateElem => "bpf(BPF_MAP_UPDATE_ELEM)",
            BpfCommand::MapDeleteElem => "bpf(BPF_MAP_DELETE_ELEM)",
            BpfCommand::ProgLoad => "bpf(BPF_PROG_LOAD)",
            BpfCommand::MapLookupBatch => "bpf(BPF_MAP_LOOKUP_BATCH)",
            BpfCommand::MapLookupAndDeleteBatch => "bpf(BPF_MAP_LOOKUP_AND_DELETE_BATCH)",
            BpfCommand::MapUpdateBatch => "bpf(BPF_MAP_UPDATE_BATCH)",
            BpfCommand::MapDeleteBatch => "bpf(BPF_MAP_DELETE_BATCH)",
        }
    }
}

/// The one bpf(2) wrapper: the kernel's return value, or the errno.
///
/// # Safety
/// `attr` must be the attr prefix of `command`, fully initialised, and every
/// pointer in it must point at memory valid (for reading, and for writing
/// where the kernel writes) and large enough for what it describes, for the
/// duration of the call.
unsafe fn bpf<T>(command: BpfCommand, attr: &mut T) -> Result<i64, SyscallError> {
    // SAFETY: the caller guarantees `attr` as described above; its size is
    // passed, so the kernel reads no further (it zero-extends the rest).
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command as i64,
            attr as *mut T as *mut libc::c_void,
            size_of::<T>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(SyscallError::last(command.call()))
    } else {
        Ok(ret)
    }
}

/// `union bpf_attr` for the BPF_MAP_*_ELEM commands.
#[repr(C)]
#[derive(Default)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// Puts the program `program` into slot `index` of the program array
/// `array`; the slot changes atomically for frames in flight.
pub fn set_program_slot(
    array: BorrowedFd<'_>,
    index: u32,
    program: BorrowedFd<'_>,
) -> Result<(), SyscallError> {
    let value = program.as_raw_fd() as u32;
    let mut attr = MapElemAttr {
        map_fd: array.as_raw_fd() as u32,
        key: &index as *const u32 as u64,
        value: &value as *const u32 as u64,
        ..Default::default()
    };
    // SAFETY: key and value point at u32s on this stack frame, as a program
    // array's key and value are.
    unsafe { bpf(BpfCommand::MapUpdateElem, &mut attr) }.map(|_| ())
}

/// Empties slot `index` of the program array `array` (already empty: fine).
pub fn clear_program_slot(array: BorrowedFd<'_>, index: u32) -> Result<(), SyscallError> {
    clear_map_slot(array, index)
}

/// Empties slot `index` of the array of programs or maps `array` (already
/// empty: fine). For an array of maps the kernel returns once no program
/// can still hold the map the slot named. (The flow cache no longer sits
/// behind such a slot; the program arrays use this.)
fn clear_map_slot(array: BorrowedFd<'_>, index: u32) -> Result<(), SyscallError> {
    let mut attr = MapElemAttr {
        map_fd: array.as_raw_fd() as u32,
        key: &index as *const u32 as u64,
        ..Default::default()
    };
    // SAFETY: key points at a u32 on this stack frame.
    match unsafe { bpf(BpfCommand::MapDeleteElem, &mut attr) } {
        Ok(_) => Ok(()),
        Err(e) if e.errno() == Some(libc::ENOENT) => Ok(()),
        Err(e) => Err(e),
    }
}

/// One eBPF instruction, as the kernel takes it (`struct bpf_insn`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Insn {
    pub code: u8,
    /// dst register in the low nibble, src in the high nibble.
    pub regs: u8,
    pub off: i16,
    pub imm: i32,
}

const _: () = assert!(size_of::<Insn>() == 8);

/// `union bpf_attr` for BPF_PROG_LOAD, up to `expected_attach_type`.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// Program types and attach types (uapi/linux/bpf.h) of the programs ntm
/// builds in memory.
pub const PROG_TYPE_SCHED_CLS: u32 = 3;
pub const PROG_TYPE_XDP: u32 = 6;
/// BPF_XDP: what aya declares for XDP programs; a tail call from one needs
/// the same.
pub const ATTACH_TYPE_XDP: u32 = 37;

/// What a program to load is.
pub struct ProgramSpec<'a> {
    pub prog_type: u32,
    pub expected_attach_type: u32,
    /// Cut to 15 bytes, as the kernel keeps it.
    pub name: &'a str,
    pub insns: &'a [Insn],
}

/// Loads a GPL program; with `log`, the verifier writes its log there.
pub fn load_program(
    spec: &ProgramSpec<'_>,
    log: Option<&mut [u8]>,
) -> Result<OwnedFd, SyscallError> {
    let license = c"GPL";
    let mut prog_name = [0u8; 16];
    for (dst, src) in prog_name.iter_mut().zip(spec.name.bytes().take(15)) {
        *dst = src;
    }
    let mut attr = ProgLoadAttr {
        prog_type: spec.prog_type,
        insn_cnt: spec.insns.len() as u32,
        insns: spec.insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        prog_name,
        expected_attach_type: spec.expected_attach_type,
        ..Default::default()
    };
    if let Some(log) = log {
        attr.log_level = 1;
        attr.log_size = log.len().min(u32::MAX as usize) as u32;
        attr.log_buf = log.as_mut_ptr() as u64;
    }
    // SAFETY: insns, license and log_buf point at live buffers of the sizes
    // given (insn_cnt instructions, a NUL-terminated string, log_size bytes).
    let fd = unsafe { bpf(BpfCommand::ProgLoad, &mut attr) }?;
    // SAFETY: on success BPF_PROG_LOAD returns a new file descriptor, which
    // nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `union bpf_attr` for the BPF_MAP_*_BATCH commands.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Buffers for one batch call: `keys` holds `count` keys of the map's key
/// size, `values` `count` values of its value size (per-CPU maps: one slot
/// of 8-byte-rounded size per possible CPU).
pub struct BatchBuffers<'a, K> {
    pub keys: &'a mut [K],
    pub values: &'a mut [u8],
    pub value_size: usize,
}

impl<K> BatchBuffers<'_, K> {
    /// Entries both buffers have room for.
    fn capacity(&self) -> u32 {
        let by_values = self.values.len().checked_div(self.value_size).unwrap_or(0);
        self.keys.len().min(by_values).min(u32::MAX as usize) as u32
    }
}

/// How a batch read ended.
pub enum BatchRead {
    /// `filled` entries were read; more may follow from the cursor.
    More { filled: usize },
    /// `filled` entries were read and the map has no more (ENOENT).
    Done { filled: usize },
}

/// BPF_MAP_LOOKUP_AND_DELETE_BATCH (`delete`) or BPF_MAP_LOOKUP_BATCH:
/// reads up to the buffers' capacity from `cursor` (None: the start) and
/// sets `next` to where the next call goes on.
///
/// `K` must be the map's key type, plain old data the kernel may write.
pub fn lookup_batch<K: aya::Pod>(
    map: BorrowedFd<'_>,
    delete: bool,
    cursor: Option<&u32>,
    next: &mut u32,
    buffers: &mut BatchBuffers<'_, K>,
) -> Result<BatchRead, SyscallError> {
    let mut attr = BatchAttr {
        in_batch: cursor.map_or(0, |c| c as *const u32 as u64),
        out_batch: next as *mut u32 as u64,
        keys: buffers.keys.as_mut_ptr() as u64,
        values: buffers.values.as_mut_ptr() as u64,
        count: buffers.capacity(),
        map_fd: map.as_raw_fd() as u32,
        ..Default::default()
    };
    let command = if delete {
        BpfCommand::MapLookupAndDeleteBatch
    } else {
        BpfCommand::MapLookupBatch
    };
    // SAFETY: keys and values have room for `count` entries (capacity()),
    // the cursors are u32s that live for the call (ntm's batched maps are
    // hash maps and arrays, whose cursor is a u32 bucket or index), and K is
    // Pod, so whatever the kernel writes into the keys is a valid K.
    match unsafe { bpf(command, &mut attr) } {
        Ok(_) => Ok(BatchRead::More {
            filled: attr.count as usize,
        }),
        Err(e) if e.errno() == Some(libc::ENOENT) => Ok(BatchRead::Done {
            filled: attr.count as usize,
        }),
        Err(e) => Err(e),
    }
}

/// BPF_MAP_UPDATE_BATCH: writes the first `count` entries of `buffers`.
pub fn update_batch<K: aya::Pod>(
    map: BorrowedFd<'_>,
    buffers: &mut BatchBuffers<'_, K>,
    count: u32,
) -> Result<(), SyscallError> {
    let mut attr = BatchAttr {
        keys: buffers.keys.as_mut_ptr() as u64,
        values: buffers.values.as_mut_ptr() as u64,
        count: count.min(buffers.capacity()),
        map_fd: map.as_raw_fd() as u32,
        ..Default::default()
    };
    // SAFETY: keys and values hold at least `count` entries (capped at the
    // buffers' capacity above) and the kernel only reads them.
    unsafe { bpf(BpfCommand::MapUpdateBatch, &mut attr) }.map(|_| ())
}

/// BPF_MAP_DELETE_BATCH: deletes the entries of `keys` (a key that is not
/// there: ENOENT, after the ones before it were deleted).
pub fn delete_batch<K: aya::Pod>(map: BorrowedFd<'_>, keys: &[K]) -> Result<(), SyscallError> {
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        count: keys.len().min(u32::MAX as usize) as u32,
        map_fd: map.as_raw_fd() as u32,
        ..Default::default()
    };
    // SAFETY: `keys` holds `count` keys of the map's key type, which the
    // kernel only reads.
    unsafe { bpf(BpfCommand::MapDeleteBatch, &mut attr) }.map(|_| ())
}

/// An array map of u64 created with `BPF_F_MMAPABLE`, mapped into this
/// process: its values are shared memory, which the programs and the agent
/// change with atomic operations (the agent without a system call each).
/// Unmapped when dropped.
pub struct SharedU64Array {
    base: std::ptr::NonNull<std::sync::atomic::AtomicU64>,
    len: usize,
    bytes: usize,
}

// SAFETY: the mapping is plain shared memory, accessed only through
// atomics; the pointer is not tied to the thread that made it.
unsafe impl Send for SharedU64Array {}
// SAFETY: as above: every access is atomic.
unsafe impl Sync for SharedU64Array {}

impl SharedU64Array {
    /// Maps the `len` values of the mmapable u64 array `map`.
    pub fn map(map: BorrowedFd<'_>, len: usize) -> Result<Self, SyscallError> {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as usize;
        let bytes = (len * size_of::<u64>()).div_ceil(page) * page;
        // SAFETY: a new shared mapping of the map's fd (the kernel checks
        // that the map is mmapable and at least this long); nothing else
        // is mapped at the address the kernel picks.
        let at = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.as_raw_fd(),
                0,
            )
        };
        if at == libc::MAP_FAILED {
            return Err(SyscallError::last("mmap"));
        }
        let base = std::ptr::NonNull::new(at.cast()).ok_or_else(|| SyscallError::last("mmap"))?;
        Ok(Self { base, len, bytes })
    }

    /// Value `index` (None past the end).
    pub fn get(&self, index: usize) -> Option<&std::sync::atomic::AtomicU64> {
        // SAFETY: inside the mapping, which lives as long as `self`; the
        // page-aligned mapping aligns every u64.
        (index < self.len).then(|| unsafe { self.base.add(index).as_ref() })
    }
}

impl Drop for SharedU64Array {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, of that length, not used after.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.bytes) };
    }
}
