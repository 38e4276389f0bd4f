//! rtnetlink sockets: open (optionally joined to multicast groups), send a
//! request, receive messages. What the messages mean is `links.rs`'s
//! business.

use std::{
    mem::size_of,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

use super::SyscallError;

/// A NETLINK_ROUTE socket, joined to the multicast `groups` (0: none).
pub fn route_socket(groups: u32) -> Result<OwnedFd, SyscallError> {
    // SAFETY: socket() with constant arguments has no preconditions.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(SyscallError::last("socket(AF_NETLINK)"));
    }
    // SAFETY: socket() just returned this descriptor; nothing else owns it.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: an all-zero sockaddr_nl is a valid value of this C struct.
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as u16;
    addr.nl_groups = groups;
    // SAFETY: bind reads size_of::<sockaddr_nl>() bytes from `addr`.
    let rc = unsafe {
        libc::bind(
            socket.as_raw_fd(),
            &addr as *const libc::sockaddr_nl as *const libc::sockaddr,
            size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if rc < 0 {
        return Err(SyscallError::last("bind(AF_NETLINK)"));
    }
    Ok(socket)
}

/// Sends one request (to the kernel, the socket's default peer).
pub fn send(socket: &OwnedFd, request: &[u8]) -> Result<(), SyscallError> {
    // SAFETY: send reads request.len() bytes from a buffer we borrow.
    let sent = unsafe {
        libc::send(
            socket.as_raw_fd(),
            request.as_ptr() as *const libc::c_void,
            request.len(),
            0,
        )
    };
    if sent < 0 {
        return Err(SyscallError::last("send(AF_NETLINK)"));
    }
    Ok(())
}

/// Receives one datagram (blocking) into `buf`; returns its length.
pub fn recv(socket: &OwnedFd, buf: &mut [u8]) -> Result<usize, SyscallError> {
    // SAFETY: recv writes at most buf.len() bytes into a buffer we borrow.
    let n = unsafe {
        libc::recv(
            socket.as_raw_fd(),
            buf.as_mut_ptr() as *mut libc::c_void,
            buf.len(),
            0,
        )
    };
    if n < 0 {
        return Err(SyscallError::last("recv(AF_NETLINK)"));
    }
    Ok(n as usize)
}
