//! Raw system calls, in one room (as aya keeps its own in `aya/src/sys`):
//! every `unsafe` call into the kernel that ntm makes itself, rather than
//! through aya, is here, behind safe functions that take and return
//! `BorrowedFd`/`OwnedFd` and fail with a [`SyscallError`] that names the
//! call and keeps the errno.
//!
//! - [`bpf`]: batch map reads and writes, loading in-memory programs,
//!   program-array slots;
//! - [`netdev`]: interface names, indexes and hardware types;
//! - [`netns`]: the network namespace's identity, bpffs detection, and the
//!   one-agent-per-namespace lock;
//! - [`process`]: resource limits, user and capability switches.

pub mod bpf;
pub mod netdev;
pub mod netns;
pub mod process;

use std::io;

/// A system call that failed: which one, and the kernel's errno.
#[derive(Debug, thiserror::Error)]
#[error("{call} failed: {source}")]
pub struct SyscallError {
    pub call: &'static str,
    #[source]
    pub source: io::Error,
}

impl SyscallError {
    /// The error of the call that just failed (errno).
    pub(crate) fn last(call: &'static str) -> Self {
        Self {
            call,
            source: io::Error::last_os_error(),
        }
    }

    pub fn errno(&self) -> Option<i32> {
        self.source.raw_os_error()
    }

    /// EPERM or EACCES: missing privileges.
    pub fn is_permission(&self) -> bool {
        matches!(self.errno(), Some(libc::EPERM) | Some(libc::EACCES))
    }
}
