//! The network namespace the calling thread is in: its identity (where its
//! pinned state lives), whether a path is on a bpffs, and the lock that lets
//! one agent run per namespace.
//!
//! The lock is an abstract unix socket: abstract socket names belong to a
//! network namespace, and the kernel frees one when the process holding it
//! ends, however it ends (a `kill -9` included), so a dead agent never
//! leaves a stale lock behind.

use std::{
    io,
    os::{
        fd::AsRawFd as _,
        linux::net::SocketAddrExt as _,
        unix::net::{SocketAddr, UnixListener, UnixStream},
    },
    path::Path,
};

use super::SyscallError;

/// `BPF_FS_MAGIC` of uapi/linux/magic.h: the f_type of a bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The abstract socket name every agent of a namespace binds.
const LOCK_NAME: &[u8] = b"ntm-agent";

/// Whether `path` is on a bpffs (where BPF objects can be pinned).
pub fn is_bpffs(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt as _;
    let Ok(path) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: an all-zero statfs is a valid value of this C struct.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated and `stat` is owned and writable.
    let rc = unsafe { libc::statfs(path.as_ptr(), &mut stat) };
    rc == 0 && stat.f_type as i64 == BPF_FS_MAGIC
}

/// The network namespace's cookie (Linux 5.14+): unlike its inode number,
/// never given to another namespace. None where the kernel has none.
pub fn netns_cookie() -> Option<u64> {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")
        .or_else(|_| std::net::UdpSocket::bind("[::1]:0"))
        .ok()?;
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`, owned
    // here, on a socket that stays open for the call.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            &mut cookie as *mut u64 as *mut libc::c_void,
            &mut len,
        )
    };
    (rc == 0).then_some(cookie)
}

/// Held by the agent of this network namespace for its whole life.
#[derive(Debug)]
pub struct AgentLock {
    _socket: UnixListener,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds it; its pid if the kernel said.
    #[error("held by process {}", pid.map_or("(unknown)".to_string(), |p| p.to_string()))]
    Held { pid: Option<u32> },
    #[error(transparent)]
    Syscall(#[from] SyscallError),
}

impl AgentLock {
    /// Takes this namespace's lock, or says who holds it.
    pub fn take() -> Result<Self, LockError> {
        let address = SocketAddr::from_abstract_name(LOCK_NAME).map_err(|source| SyscallError {
            call: "abstract socket name",
            source,
        })?;
        match UnixListener::bind_addr(&address) {
            Ok(socket) => Ok(Self { _socket: socket }),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => Err(LockError::Held {
                pid: UnixStream::connect_addr(&address)
                    .ok()
                    .and_then(|stream| peer_pid(&stream)),
            }),
            Err(source) => Err(SyscallError {
                call: "bind(abstract unix socket)",
                source,
            }
            .into()),
        }
    }
}

/// The pid of the process at the other end of a connected unix socket.
fn peer_pid(stream: &UnixStream) -> Option<u32> {
    // SAFETY: an all-zero ucred is a valid value of this C struct.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, owned
    // here, on a socket that stays open for the call.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            &mut cred as *mut libc::ucred as *mut libc::c_void,
            &mut len,
        )
    };
    (rc == 0 && cred.pid > 0).then_some(cred.pid as u32)
}
