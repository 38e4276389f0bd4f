//! Giving up root once the programs are loaded and attached (`--user`).
//!
//! ntm still needs CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON afterwards: to
//! attach to interfaces that appear later and to load a new filter on
//! SIGHUP. It keeps exactly those three and becomes an ordinary user for
//! everything else. This runs before ntm starts any other thread, so every
//! thread inherits the reduced set.

use std::{ffi::CString, io};

/// Capability numbers (linux/capability.h).
const CAP_NET_ADMIN: u32 = 12;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;
const KEPT: [u32; 3] = [CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON];

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error("--user {0:?}: no such user on this machine; give a user name or a numeric uid[:gid]")]
    UnknownUser(String),
    #[error(
        "--user needs ntm to start as root (it switches to that user after attaching); start it as root, or leave --user out"
    )]
    NotRoot,
    #[error(
        "switching to uid {uid} gid {gid} failed at {step}: {source}; ntm needs CAP_SETUID and CAP_SETGID to switch (in a container, add them with the others)"
    )]
    Switch {
        uid: u32,
        gid: u32,
        step: &'static str,
        #[source]
        source: io::Error,
    },
}

/// Whom to become.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
}

/// `name`, `uid` or `uid:gid`. A name is looked up in the user database; a
/// bare uid takes the same number as its group.
pub fn resolve_user(spec: &str) -> Result<User, PrivilegeError> {
    let unknown = || PrivilegeError::UnknownUser(spec.to_string());
    if let Some((uid, gid)) = spec.split_once(':') {
        return match (uid.parse(), gid.parse()) {
            (Ok(uid), Ok(gid)) => Ok(User { uid, gid }),
            _ => Err(unknown()),
        };
    }
    if let Ok(uid) = spec.parse() {
        return Ok(User { uid, gid: uid });
    }
    let name = CString::new(spec).map_err(|_| unknown())?;
    let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buffer = vec![0 as libc::c_char; 16 * 1024];
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: getpwnam_r writes into `entry` and `buffer`, both owned here
    // and large enough as declared; `found` points at `entry` or is null.
    let rc = unsafe {
        libc::getpwnam_r(
            name.as_ptr(),
            &mut entry,
            buffer.as_mut_ptr(),
            buffer.len(),
            &mut found,
        )
    };
    if rc != 0 || found.is_null() {
        return Err(unknown());
    }
    Ok(User {
        uid: entry.pw_uid,
        gid: entry.pw_gid,
    })
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

/// The kept capabilities as the two 32-bit words capset takes.
fn kept_words() -> [u32; 2] {
    let mut words = [0u32; 2];
    for cap in KEPT {
        words[(cap / 32) as usize] |= 1 << (cap % 32);
    }
    words
}

/// Becomes `user`, keeping only CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON
/// (effective and permitted; nothing inheritable). Call it before any other
/// thread starts.
pub fn drop_to(user: User) -> Result<(), PrivilegeError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(PrivilegeError::NotRoot);
    }
    let fail = |step: &'static str| PrivilegeError::Switch {
        uid: user.uid,
        gid: user.gid,
        step,
        source: io::Error::last_os_error(),
    };
    // SAFETY: plain system calls with valid arguments; each result is
    // checked.
    unsafe {
        // Keep the permitted set across the change of uid...
        if libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) != 0 {
            return Err(fail("prctl(PR_SET_KEEPCAPS)"));
        }
        if libc::setgroups(0, std::ptr::null()) != 0 {
            return Err(fail("setgroups"));
        }
        if libc::setresgid(user.gid, user.gid, user.gid) != 0 {
            return Err(fail("setresgid"));
        }
        if libc::setresuid(user.uid, user.uid, user.uid) != 0 {
            return Err(fail("setresuid"));
        }
        // ...then narrow it to the three capabilities, and make them
        // effective again (a uid change clears the effective set).
        let words = kept_words();
        let mut header = CapHeader {
            version: LINUX_CAPABILITY_VERSION_3,
            pid: 0,
        };
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
        if libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) != 0 {
            return Err(fail("capset"));
        }
        if libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0) != 0 {
            return Err(fail("prctl(PR_SET_KEEPCAPS)"));
        }
    }
    Ok(())
}

/// The capability mask ntm keeps, as /proc/PID/status prints it (CapEff).
pub fn kept_mask() -> u64 {
    let words = kept_words();
    (words[1] as u64) << 32 | words[0] as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_are_names_uids_or_uid_gid_pairs() {
        assert_eq!(
            resolve_user("65534").unwrap(),
            User {
                uid: 65534,
                gid: 65534
            }
        );
        assert_eq!(
            resolve_user("1000:100").unwrap(),
            User {
                uid: 1000,
                gid: 100
            }
        );
        assert_eq!(resolve_user("root").unwrap(), User { uid: 0, gid: 0 });
        let err = resolve_user("no-such-user-here").unwrap_err().to_string();
        assert!(err.contains("no such user"), "{err}");
        assert!(resolve_user("1:x").is_err());
    }

    #[test]
    fn the_kept_set_is_exactly_bpf_net_admin_and_perfmon() {
        assert_eq!(kept_mask(), (1 << 39) | (1 << 38) | (1 << 12));
    }
}
