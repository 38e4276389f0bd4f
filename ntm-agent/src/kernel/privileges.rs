//! Giving up root once the programs are loaded and attached (`--user`).
//!
//! ntm still needs CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON afterwards: to
//! attach to interfaces that appear later and to load a new filter on
//! SIGHUP. It keeps exactly those three and becomes an ordinary user for
//! everything else. This runs before ntm starts any other thread, so every
//! thread inherits the reduced set.

use caps::{CapSet, Capability, CapsHashSet, errors::CapsError};

use crate::sys::{SyscallError, process};

/// What ntm keeps once it has attached.
const KEPT: [Capability; 3] = [
    Capability::CAP_BPF,
    Capability::CAP_NET_ADMIN,
    Capability::CAP_PERFMON,
];

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
    #[error("narrowing the capabilities to CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON failed: {0}")]
    Capabilities(#[source] CapsError),
}

/// Whether this process may load eBPF programs at all: CAP_BPF (or, on
/// kernels before 5.8, CAP_SYS_ADMIN) in its effective set. Unknown
/// counts as yes: the kernel's own answer then tells.
pub fn may_load_programs() -> bool {
    [Capability::CAP_BPF, Capability::CAP_SYS_ADMIN]
        .into_iter()
        .any(|cap| caps::has_cap(None, CapSet::Effective, cap).unwrap_or(true))
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
/// (effective and permitted; nothing inheritable), and `groups` as its
/// supplementary groups (the groups of the sockets it must still open).
/// Call it before any other thread starts.
pub fn drop_to(user: User, groups: &[u32]) -> Result<(), PrivilegeError> {
    if !process::is_root() {
        return Err(PrivilegeError::NotRoot);
    }
    let caps = PrivilegeError::Capabilities;
    // Keep the permitted set across the change of uid...
    caps::securebits::set_keepcaps(true).map_err(caps)?;
    process::switch_ids(user.uid, user.gid, groups).map_err(|source| PrivilegeError::Switch {
        uid: user.uid,
        gid: user.gid,
        source,
    })?;
    // ...then narrow it to the three, effective first (the effective set
    // must stay within the permitted one), and none to hand on.
    let kept: CapsHashSet = KEPT.into_iter().collect();
    caps::set(None, CapSet::Effective, &kept).map_err(caps)?;
    caps::set(None, CapSet::Permitted, &kept).map_err(caps)?;
    caps::clear(None, CapSet::Inheritable).map_err(caps)?;
    caps::clear(None, CapSet::Ambient).map_err(caps)?;
    caps::securebits::set_keepcaps(false).map_err(caps)
}

/// The capability mask ntm keeps, as /proc/PID/status prints it (CapEff).
pub fn kept_mask() -> u64 {
    KEPT.iter().fold(0, |mask, cap| mask | cap.bitmask())
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
