//! Loading a generated filter program and putting it in (or taking it out
//! of) a program-array slot, with the bpf(2) system call directly: aya loads
//! programs from ELF objects, these are built in memory.

use std::{
    io,
    os::fd::{FromRawFd as _, OwnedFd},
};

use super::translate::Insn;

const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_PROG_LOAD: libc::c_long = 5;

/// Program types (uapi/linux/bpf.h).
pub const PROG_TYPE_SCHED_CLS: u32 = 3;
pub const PROG_TYPE_XDP: u32 = 6;
/// BPF_XDP: what aya declares for XDP programs; a tail call needs the same.
pub const ATTACH_TYPE_XDP: u32 = 37;

/// Bytes of verifier log kept when a program is rejected.
const LOG_SIZE: usize = 1 << 20;

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
    /// Later fields of union bpf_attr, left zero.
    _rest: [u64; 12],
}

#[repr(C)]
#[derive(Default)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<i64> {
    // SAFETY: attr is a fully initialised bpf_attr prefix of the size given.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Why the kernel refused a program: the errno and the verifier's log.
#[derive(Debug)]
pub struct LoadFailure {
    pub error: io::Error,
    pub log: String,
}

/// Loads `insns` as a program of `prog_type`; on failure loads it again with
/// the verifier log on, to say why.
pub fn load_program(
    prog_type: u32,
    expected_attach_type: u32,
    name: &str,
    insns: &[Insn],
) -> Result<OwnedFd, LoadFailure> {
    let license = c"GPL";
    let mut prog_name = [0u8; 16];
    for (dst, src) in prog_name.iter_mut().zip(name.bytes().take(15)) {
        *dst = src;
    }
    let mut attr = ProgLoadAttr {
        prog_type,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        prog_name,
        expected_attach_type,
        ..Default::default()
    };
    match bpf(BPF_PROG_LOAD, &mut attr) {
        // SAFETY: the kernel returned a new file descriptor we now own.
        Ok(fd) => return Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) }),
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            return Err(LoadFailure {
                error: e,
                log: String::new(),
            });
        }
        Err(_) => {}
    }
    let mut log = vec![0u8; LOG_SIZE];
    attr.log_level = 1;
    attr.log_size = LOG_SIZE as u32;
    attr.log_buf = log.as_mut_ptr() as u64;
    match bpf(BPF_PROG_LOAD, &mut attr) {
        // Accepted the second time (a transient failure): keep it.
        // SAFETY: as above.
        Ok(fd) => Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) }),
        Err(error) => {
            let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
            Err(LoadFailure {
                error,
                log: String::from_utf8_lossy(&log[..end]).into_owned(),
            })
        }
    }
}

/// Puts program `program_fd` into slot `index` of the program array
/// `map_fd`; the slot changes atomically for frames in flight.
pub fn set_slot(map_fd: i32, index: u32, program_fd: i32) -> io::Result<()> {
    let key = index;
    let value = program_fd as u32;
    let mut attr = MapElemAttr {
        map_fd: map_fd as u32,
        key: &key as *const u32 as u64,
        value: &value as *const u32 as u64,
        ..Default::default()
    };
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(|_| ())
}

/// Empties slot `index` of the program array `map_fd` (no error if empty).
pub fn clear_slot(map_fd: i32, index: u32) -> io::Result<()> {
    let key = index;
    let mut attr = MapElemAttr {
        map_fd: map_fd as u32,
        key: &key as *const u32 as u64,
        ..Default::default()
    };
    match bpf(BPF_MAP_DELETE_ELEM, &mut attr) {
        Ok(_) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(e) => Err(e),
    }
}
