//! The state ntm keeps in bpffs, so that counting goes on while no agent
//! runs (a restart, an upgrade, a crash) and the next agent takes it over
//! without losing or doubling a frame.
//!
//! ```text
//! <pin-dir>/net-<inode>[-<cookie>]/     one per network namespace
//!     links/<ifindex>-<hook>            TCX and XDP links (hook: ingress,
//!                                       egress, xdp-native, xdp-generic)
//!     maps-v<layout>-<pid>-<nanos>/     one agent's tables (ntm_common::names::PINNED)
//! ```
//!
//! A starting agent pins its fresh maps in a new maps directory, takes each
//! pinned link over (the link's program is replaced by its own in one step,
//! so from then on frames count into its maps), lets go of links it no
//! longer wants, and then drains every other maps directory: once no program
//! counts into them, two drains read everything counted since the earlier
//! agent's last drain. Maps of another layout (the version in the name) are
//! drained where their formats are the ones this build reads, and removed.
//! A crash at any step leaves links and maps directories that the next
//! start handles the same way.
//!
//! Directories are named by the namespace's inode, which the kernel may
//! give to a new namespace once the old one is gone, and by its cookie
//! (Linux 5.14+), which it never gives twice: a directory with this inode
//! and another cookie belongs to a namespace that is gone, and is removed.

use std::{
    fs, io,
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use ntm_common::{LAYOUT_VERSION, programs::HookPoint};

use super::drain::{DrainError, Drained, FlowTables};
use crate::sys::netns;

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the tables pinned in {}: {source}", path.display())]
    Unreadable {
        path: PathBuf,
        #[source]
        source: DrainError,
    },
}

fn io_error<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> PinError + 'a {
    move |source| PinError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// This network namespace's directory of pinned state.
#[derive(Clone, Debug)]
pub struct NetnsPins {
    root: PathBuf,
    dir: PathBuf,
}

/// A maps directory an earlier agent left.
#[derive(Clone, Debug)]
pub struct EarlierMaps {
    pub path: PathBuf,
    /// Its layout version, if its name says one.
    pub layout: Option<u32>,
}

impl NetnsPins {
    /// The calling thread's namespace's directory under `root`, made if
    /// need be. None if `root` is not on a bpffs (nothing can be pinned
    /// there).
    pub fn open(root: &Path) -> Result<Option<Self>, PinError> {
        let Some(dir) = Self::locate(root)? else {
            return Ok(None);
        };
        fs::create_dir_all(dir.dir.join("links"))
            .map_err(io_error("cannot make the directory", &dir.dir))?;
        dir.remove_gone_namespaces();
        Ok(Some(dir))
    }

    /// The calling thread's namespace's directory under `root`, if `root`
    /// is on a bpffs, without making anything.
    pub fn locate(root: &Path) -> Result<Option<Self>, PinError> {
        // The first part of `root` that exists must be a bpffs.
        let mut existing = root;
        while !existing.exists() {
            match existing.parent() {
                Some(parent) => existing = parent,
                None => return Ok(None),
            }
        }
        if !netns::is_bpffs(existing) {
            return Ok(None);
        }
        let inode = namespace_inode().map_err(io_error(
            "cannot read the network namespace",
            Path::new("/proc/thread-self/ns/net"),
        ))?;
        let name = match netns::netns_cookie() {
            Some(cookie) => format!("net-{inode}-{cookie}"),
            None => format!("net-{inode}"),
        };
        Ok(Some(Self {
            root: root.to_path_buf(),
            dir: root.join(name),
        }))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where a TC link of `ifindex` at `point` is pinned.
    pub fn link_path(&self, ifindex: u32, point: HookPoint) -> PathBuf {
        self.dir
            .join("links")
            .join(format!("{ifindex}-{}", point.name()))
    }

    /// Where an XDP link of `ifindex` is pinned: the name keeps its mode.
    pub fn xdp_link_path(&self, ifindex: u32, native: bool) -> PathBuf {
        let mode = if native { "xdp-native" } else { "xdp-generic" };
        self.dir.join("links").join(format!("{ifindex}-{mode}"))
    }

    /// Every pinned link, by path.
    pub fn links(&self) -> Vec<PathBuf> {
        let Ok(entries) = fs::read_dir(self.dir.join("links")) else {
            return Vec::new();
        };
        let mut links: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        links.sort();
        links
    }

    /// A new, empty maps directory for this agent.
    pub fn new_maps_dir(&self) -> Result<PathBuf, PinError> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let path = self.dir.join(format!(
            "maps-v{LAYOUT_VERSION}-{}-{nanos}",
            std::process::id()
        ));
        fs::create_dir(&path).map_err(io_error("cannot make the directory", &path))?;
        Ok(path)
    }

    /// The maps directories there are, but `except`, oldest first.
    pub fn earlier_maps(&self, except: Option<&Path>) -> Vec<EarlierMaps> {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut found: Vec<EarlierMaps> = entries
            .flatten()
            .filter_map(|entry| {
                let name = entry.file_name().into_string().ok()?;
                let rest = name.strip_prefix("maps-")?;
                let path = entry.path();
                (Some(path.as_path()) != except).then(|| EarlierMaps {
                    layout: rest
                        .strip_prefix('v')
                        .and_then(|r| r.split('-').next())
                        .and_then(|v| v.parse().ok()),
                    path,
                })
            })
            .collect();
        // Names hold the pid then the time: sort by the time.
        found.sort_by_key(|m| {
            m.path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.rsplit('-').next())
                .and_then(|t| t.parse::<u128>().ok())
                .unwrap_or(0)
        });
        found
    }

    /// Removes what [`NetnsPins::open`] made, if it holds nothing: for an
    /// agent that could not start, which leaves no empty folders behind.
    /// An earlier agent's links or tables stay, and so the folders.
    pub fn remove_if_empty(&self) {
        // `remove_dir` removes empty folders only.
        let _ = fs::remove_dir(self.dir.join("links"));
        let _ = fs::remove_dir(&self.dir);
        let _ = fs::remove_dir(&self.root);
    }

    /// Removes the whole namespace directory (and `root`, if that leaves it
    /// empty). Unpinning a link detaches it.
    pub fn remove(&self) -> Result<(), PinError> {
        remove_tree(&self.dir)?;
        // Only if empty: another namespace's state may live there.
        let _ = fs::remove_dir(&self.root);
        Ok(())
    }

    /// Gives the namespace's pinned state to `uid`/`gid`: an agent that
    /// gives up root (`--user`) must still pin the links of interfaces that
    /// come later, and the next agent as that user must open the pins.
    pub fn hand_to(&self, uid: u32, gid: u32) -> Result<(), PinError> {
        chown_tree(&self.dir, uid, gid)
    }

    /// Directories of a namespace that had this one's inode and is gone.
    fn remove_gone_namespaces(&self) {
        let Some(own) = self.dir.file_name().and_then(|n| n.to_str()) else {
            return;
        };
        let inode_part = own.split('-').take(2).collect::<Vec<_>>().join("-");
        let Ok(entries) = fs::read_dir(&self.root) else {
            return;
        };
        for entry in entries.flatten() {
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            let same_inode = name == inode_part || name.starts_with(&format!("{inode_part}-"));
            if same_inode && name != own {
                log::info!(
                    "removing {}: pinned by ntm in a network namespace that is gone",
                    entry.path().display()
                );
                if let Err(e) = remove_tree(&entry.path()) {
                    log::warn!("{e}");
                }
            }
        }
    }
}

/// Reads everything in an earlier agent's tables, once no program counts
/// into them (they were taken over or let go).
pub fn drain_earlier(maps: &EarlierMaps) -> Result<Drained, PinError> {
    let unreadable = |source| PinError::Unreadable {
        path: maps.path.clone(),
        source,
    };
    let mut tables = FlowTables::from_pinned(&maps.path).map_err(unreadable)?;
    let mut drained = tables.drain().map_err(unreadable)?;
    drained.merge(tables.drain().map_err(unreadable)?);
    Ok(drained)
}

/// How long ago an earlier agent's lease ran out, if it did (its
/// programs stopped counting then, see `--orphan-timeout`).
pub fn lease_ran_out(maps: &EarlierMaps) -> Option<std::time::Duration> {
    let data = aya::maps::MapData::from_pin(maps.path.join(ntm_common::names::LEASE)).ok()?;
    let lease: aya::maps::Array<aya::maps::MapData, u64> =
        aya::maps::Map::from_map_data(data).ok()?.try_into().ok()?;
    let until = lease.get(&0, 0).ok()?;
    let now = crate::sys::process::monotonic_ns();
    (until != 0 && now > until).then(|| std::time::Duration::from_nanos(now - until))
}

/// Removes a pin, or a directory in bpffs and everything in it.
pub fn remove_tree(path: &Path) -> Result<(), PinError> {
    let removed = match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) => Err(e),
    };
    match removed {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(PinError::Io {
            what: "cannot remove",
            path: path.to_path_buf(),
            source: e,
        }),
    }
}

fn chown_tree(path: &Path, uid: u32, gid: u32) -> Result<(), PinError> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))
        .map_err(io_error("cannot hand over", path))?;
    if fs::symlink_metadata(path).is_ok_and(|m| m.is_dir()) {
        let entries = fs::read_dir(path).map_err(io_error("cannot list", path))?;
        for entry in entries.flatten() {
            chown_tree(&entry.path(), uid, gid)?;
        }
    }
    Ok(())
}

/// The inode of the calling thread's network namespace.
fn namespace_inode() -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt as _;
    // thread-self: a thread may have entered another namespace than the
    // process's first thread.
    fs::metadata("/proc/thread-self/ns/net").map(|m| m.ino())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn earlier_maps_are_found_with_their_layout_oldest_first() {
        let root = std::env::temp_dir().join(format!("ntm-pins-test-{}", std::process::id()));
        let pins = NetnsPins {
            root: root.clone(),
            dir: root.join("net-1-2"),
        };
        for name in [
            "maps-v1-20-300",
            "maps-v7-10-100",
            "maps-vx-5-200",
            "links",
            "other",
        ] {
            fs::create_dir_all(pins.dir.join(name)).unwrap();
        }
        let mine = pins.dir.join("maps-v1-20-300");
        let found = pins.earlier_maps(Some(&mine));
        let seen: Vec<(String, Option<u32>)> = found
            .iter()
            .map(|m| {
                (
                    m.path.file_name().unwrap().to_string_lossy().into_owned(),
                    m.layout,
                )
            })
            .collect();
        assert_eq!(
            seen,
            vec![
                ("maps-v7-10-100".to_string(), Some(7)),
                ("maps-vx-5-200".to_string(), None),
            ]
        );
        assert_eq!(pins.earlier_maps(None).len(), 3);
        assert_eq!(
            pins.link_path(4, HookPoint::TcEgress),
            pins.dir.join("links/4-egress")
        );
        assert_eq!(
            pins.xdp_link_path(4, false),
            pins.dir.join("links/4-xdp-generic")
        );
        pins.remove().unwrap();
        assert!(!root.exists(), "an empty root goes too");
    }

    #[test]
    fn directories_of_gone_namespaces_with_this_inode_are_removed() {
        let root = std::env::temp_dir().join(format!("ntm-pins-gone-{}", std::process::id()));
        for name in ["net-5-100", "net-5-200", "net-5", "net-55-100", "net-6-1"] {
            fs::create_dir_all(root.join(name)).unwrap();
        }
        let pins = NetnsPins {
            root: root.clone(),
            dir: root.join("net-5-200"),
        };
        pins.remove_gone_namespaces();
        let mut left: Vec<String> = fs::read_dir(&root)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, vec!["net-5-200", "net-55-100", "net-6-1"]);
        fs::remove_dir_all(&root).unwrap();
    }
}
