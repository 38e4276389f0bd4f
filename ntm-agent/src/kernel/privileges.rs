//! Giving up root once the programs are loaded and attached (`--user`).
//!
//! ntm still needs CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON afterwards: to
//! attach to interfaces that appear later and to load a new filter on
//! SIGHUP. It keeps exactly those three and becomes an ordinary user for
//! everything else. This runs before ntm starts any other thread, so every
//! thread inherits the reduced set.

use super::sys::{SyscallError, process};

/// Capability numbers (linux/capability.h).
const CAP_NET_ADMIN: u32 = 12;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;
const KEPT: [u32; 3] = [CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON];

#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error("--user {0:?}: no such user on this machine; give a user name or a numeric uid[:gid]")]
    UnknownUser(String),
    #[error(
        "--user needs ntm to start as root (it switches to that user after attaching); start it as root, or leave --user out"
    )]
    NotRoot,
    #[error(
        "switching to uid {uid} gid {gid} failed ({source}); ntm needs CAP_SETUID and CAP_SETGID to switch (in a container, add them with the others)"
    )]
    Switch {
        uid: u32,
        gid: u32,
        #[source]
        source: SyscallError,
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
    let (uid, gid) = process::user_by_name(spec).ok_or_else(unknown)?;
    Ok(User { uid, gid })
}

/// Becomes `user`, keeping only CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON
/// (effective and permitted; nothing inheritable). Call it before any other
/// thread starts.
pub fn drop_to(user: User) -> Result<(), PrivilegeError> {
    if !process::is_root() {
        return Err(PrivilegeError::NotRoot);
    }
    process::switch_user_keeping(user.uid, user.gid, kept_mask()).map_err(|source| {
        PrivilegeError::Switch {
            uid: user.uid,
            gid: user.gid,
            source,
        }
    })
}

/// The capability mask ntm keeps, as /proc/PID/status prints it (CapEff).
pub fn kept_mask() -> u64 {
    KEPT.iter().fold(0, |mask, cap| mask | 1 << cap)
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
