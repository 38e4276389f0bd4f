//! The process's own limits and identity: RLIMIT_MEMLOCK, where large
//! allocations come from, the user database, and switching uid/gid.
//! (Capabilities are the `caps` crate's job, in `kernel/privileges.rs`.)

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

/// Blocks of 128 KiB and more straight from the kernel and back to it
/// when freed, whatever was freed before (glibc's malloc; musl's, in the
/// amd64 image, does so already).
///
/// glibc raises that threshold each time the process frees such a block,
/// up to 32 MiB, and serves smaller ones from its heap from then on; the
/// heap goes back to the kernel only from its top. A drain of 100k flows
/// frees tables of megabytes (waiting flows, the labelled drain, the hosts
/// put in order), and an agent with 100k series kept about 20 MiB of them
/// (glibc's `mallinfo2`: 26 MiB free inside its heap; `cargo xtask bench`
/// with this call and without it: 88 and 110 MiB resident).
pub fn return_large_allocations() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets a parameter of malloc (under malloc's own
    // lock), and 128 KiB is glibc's default value of this one; a value it
    // refused would leave the default, which is safe too.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
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

/// Becomes `uid`/`gid`, with `groups` as its only supplementary groups,
/// for the calling thread (call it before any other thread starts, so that
/// all inherit it). Capabilities follow the kernel's rules: with
/// PR_SET_KEEPCAPS set, the permitted set survives and the effective set is
/// cleared.
pub fn switch_ids(uid: u32, gid: u32, groups: &[u32]) -> Result<(), SyscallError> {
    // SAFETY: `groups` is a valid slice of gid_t (u32) of the length given;
    // the kernel only reads it.
    if unsafe { libc::setgroups(groups.len(), groups.as_ptr()) } != 0 {
        return Err(SyscallError::last("setgroups"));
    }
    // SAFETY: plain integer arguments.
    if unsafe { libc::setresgid(gid, gid, gid) } != 0 {
        return Err(SyscallError::last("setresgid"));
    }
    // SAFETY: plain integer arguments.
    if unsafe { libc::setresuid(uid, uid, uid) } != 0 {
        return Err(SyscallError::last("setresuid"));
    }
    Ok(())
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of the kernel's
/// bpf_ktime_get_ns (std's Instant hides its value).
pub fn monotonic_ns() -> u64 {
    // SAFETY: an all-zero timespec is a valid value of this C struct.
    let mut now: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: clock_gettime writes into `now`, owned here; CLOCK_MONOTONIC
    // always exists, so it cannot fail.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}
