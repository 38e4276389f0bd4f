//! The process's own limits and identity: RLIMIT_MEMLOCK, the user
//! database, and switching uid/gid while keeping chosen capabilities.

use std::ffi::CString;

use super::SyscallError;

/// Lifts RLIMIT_MEMLOCK (kernels before 5.11 charge BPF maps to it).
pub fn raise_memlock_limit() -> Result<(), SyscallError> {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads a valid, fully initialised struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        return Err(SyscallError::last("setrlimit(RLIMIT_MEMLOCK)"));
    }
    Ok(())
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// (uid, primary gid) of the user called `name`, from the user database.
pub fn user_by_name(name: &str) -> Option<(u32, u32)> {
    let name = CString::new(name).ok()?;
    // SAFETY: an all-zero passwd is a valid value of this C struct.
    let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buffer = vec![0 as libc::c_char; 16 * 1024];
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: getpwnam_r writes into `entry` and `buffer`, both owned here
    // and of the sizes given; `found` ends up pointing at `entry` or null.
    let rc = unsafe {
        libc::getpwnam_r(
            name.as_ptr(),
            &mut entry,
            buffer.as_mut_ptr(),
            buffer.len(),
            &mut found,
        )
    };
    (rc == 0 && !found.is_null()).then_some((entry.pw_uid, entry.pw_gid))
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Becomes `uid`/`gid` (no supplementary groups) and keeps exactly the
/// capabilities in `kept` (a 64-bit mask, bit N = capability N), effective
/// and permitted, nothing inheritable. Applies to the calling thread; call
/// it before any other thread starts so that all inherit it.
pub fn switch_user_keeping(uid: u32, gid: u32, kept: u64) -> Result<(), SyscallError> {
    fn check(rc: libc::c_long, call: &'static str) -> Result<(), SyscallError> {
        if rc != 0 {
            return Err(SyscallError::last(call));
        }
        Ok(())
    }
    // SAFETY: prctl with PR_SET_KEEPCAPS takes plain integers.
    check(
        unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) }.into(),
        "prctl(PR_SET_KEEPCAPS)",
    )?;
    // SAFETY: a zero-length group list; the pointer is not read.
    check(
        unsafe { libc::setgroups(0, std::ptr::null()) }.into(),
        "setgroups",
    )?;
    // SAFETY: plain integer arguments.
    check(
        unsafe { libc::setresgid(gid, gid, gid) }.into(),
        "setresgid",
    )?;
    // SAFETY: plain integer arguments.
    check(
        unsafe { libc::setresuid(uid, uid, uid) }.into(),
        "setresuid",
    )?;
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let words = [kept as u32, (kept >> 32) as u32];
    let data = [
        CapData {
            effective: words[0],
            permitted: words[0],
            inheritable: 0,
        },
        CapData {
            effective: words[1],
            permitted: words[1],
            inheritable: 0,
        },
    ];
    // SAFETY: capset reads a version-3 header and the two data structs that
    // version 3 takes, both alive for the call.
    check(
        unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) },
        "capset",
    )?;
    // SAFETY: as above.
    check(
        unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0) }.into(),
        "prctl(PR_SET_KEEPCAPS)",
    )
}
