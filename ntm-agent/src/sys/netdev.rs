//! Network interfaces by name: their index, their hardware type, and the
//! names there are. All of these answer for the calling thread's network
//! namespace (sysfs would answer for the one it was mounted in).

use std::{
    ffi::{CStr, CString},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

use super::SyscallError;

/// ARPHRD_* hardware types (linux/if_arp.h) that carry an Ethernet header
/// at TC.
pub const ARPHRD_ETHER: u16 = 1;
pub const ARPHRD_LOOPBACK: u16 = 772;

/// A name the kernel could hold: NUL-free and shorter than IFNAMSIZ.
fn c_name(iface: &str) -> Option<CString> {
    let name = CString::new(iface).ok()?;
    (name.as_bytes().len() < libc::IFNAMSIZ).then_some(name)
}

/// The interface's index, or None when there is no such interface.
pub fn index_of(iface: &str) -> Option<u32> {
    let name = c_name(iface)?;
    // SAFETY: `name` is a valid NUL-terminated string for the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

/// The interface's hardware type (ARPHRD_*), from SIOCGIFHWADDR.
pub fn hardware_type(iface: &str) -> Result<u16, SyscallError> {
    let name = c_name(iface).ok_or_else(|| SyscallError {
        call: "ioctl(SIOCGIFHWADDR)",
        source: std::io::Error::from_raw_os_error(libc::ENODEV),
    })?;
    // SAFETY: a plain datagram socket, used only for the ioctl below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(SyscallError::last("socket(AF_INET)"));
    }
    // SAFETY: socket() just returned this descriptor; nothing else owns it.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: an all-zero ifreq is a valid value of this C struct.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in request.ifr_name.iter_mut().zip(name.as_bytes()) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFHWADDR reads the NUL-terminated name (shorter than
    // IFNAMSIZ, the rest zero) and writes ifr_hwaddr, inside `request`.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFHWADDR as _, &mut request) } < 0 {
        return Err(SyscallError::last("ioctl(SIOCGIFHWADDR)"));
    }
    // SAFETY: the ioctl succeeded, so the union holds ifru_hwaddr.
    Ok(unsafe { request.ifr_ifru.ifru_hwaddr.sa_family })
}

/// Names of the interfaces there are, sorted.
pub fn names() -> Vec<String> {
    let mut names = Vec::new();
    // SAFETY: if_nameindex has no preconditions; it returns null or a list
    // ended by a zero entry.
    let list = unsafe { libc::if_nameindex() };
    if list.is_null() {
        return names;
    }
    let mut entry = list;
    // SAFETY: every entry up to the terminating zero one is valid, and its
    // name a NUL-terminated string; the list is freed once, after the walk.
    unsafe {
        while (*entry).if_index != 0 && !(*entry).if_name.is_null() {
            names.push(
                CStr::from_ptr((*entry).if_name)
                    .to_string_lossy()
                    .into_owned(),
            );
            entry = entry.add(1);
        }
        libc::if_freenameindex(list);
    }
    names.sort();
    names
}
