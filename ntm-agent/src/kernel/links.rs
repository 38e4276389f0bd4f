//! The links of this network namespace, from rtnetlink: name, index, kind
//! (bridge, veth, ...) and bridge master; and a socket that wakes up when
//! links appear, change or go away.
//!
//! Netlink rather than /sys/class/net: sysfs shows the namespace it was
//! mounted in, netlink the one of the thread that asks.

use std::{io, os::fd::OwnedFd};

use super::sys::{SyscallError, netlink};

/// Reading the links failed.
#[derive(Debug, thiserror::Error)]
pub enum LinksError {
    #[error(transparent)]
    Syscall(#[from] SyscallError),
    #[error("the kernel refused the link dump: {0}")]
    Refused(#[source] io::Error),
    #[error("malformed netlink message from the kernel")]
    Malformed,
}

/// One network interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    pub index: u32,
    pub name: String,
    /// IFLA_INFO_KIND ("bridge", "veth", "wireguard", ...), "" when none.
    pub kind: String,
    /// Index of the bridge (or bond) this link is a port of.
    pub master: Option<u32>,
}

const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_DUMP: u16 = 0x300;
const IFLA_IFNAME: u16 = 3;
const IFLA_MASTER: u16 = 10;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;
const RTMGRP_LINK: u32 = 1;
/// struct nlmsghdr, struct ifinfomsg.
const NLMSG_HDR: usize = 16;
const IFINFOMSG: usize = 16;

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Route attributes in `b`: (type, payload) pairs.
fn attributes(mut b: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while b.len() >= 4 {
        let (Some(len), Some(kind)) = (u16_at(b, 0), u16_at(b, 2)) else {
            break;
        };
        let len = len as usize;
        if len < 4 || len > b.len() {
            break;
        }
        out.push((kind & 0x3fff, &b[4..len]));
        let next = len.next_multiple_of(4).min(b.len());
        b = &b[next..];
    }
    out
}

/// Parses one RTM_NEWLINK message body (after the nlmsghdr).
fn parse_link(body: &[u8]) -> Option<LinkInfo> {
    let index = u32_at(body, 4)?;
    let mut link = LinkInfo {
        index,
        name: String::new(),
        kind: String::new(),
        master: None,
    };
    for (kind, payload) in attributes(body.get(IFINFOMSG..)?) {
        match kind {
            IFLA_IFNAME => {
                let name = payload.split(|b| *b == 0).next().unwrap_or_default();
                link.name = String::from_utf8_lossy(name).into_owned();
            }
            IFLA_MASTER => link.master = u32_at(payload, 0).filter(|m| *m != 0),
            IFLA_LINKINFO => {
                for (info, value) in attributes(payload) {
                    if info == IFLA_INFO_KIND {
                        let kind = value.split(|b| *b == 0).next().unwrap_or_default();
                        link.kind = String::from_utf8_lossy(kind).into_owned();
                    }
                }
            }
            _ => {}
        }
    }
    (!link.name.is_empty()).then_some(link)
}

/// Every link of the calling thread's network namespace.
pub fn links() -> Result<Vec<LinkInfo>, LinksError> {
    let socket = netlink::route_socket(0)?;
    let mut request = [0u8; NLMSG_HDR + IFINFOMSG];
    request[0..4].copy_from_slice(&((NLMSG_HDR + IFINFOMSG) as u32).to_ne_bytes());
    request[4..6].copy_from_slice(&RTM_GETLINK.to_ne_bytes());
    request[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    request[8..12].copy_from_slice(&1u32.to_ne_bytes());
    request[NLMSG_HDR] = libc::AF_UNSPEC as u8;
    netlink::send(&socket, &request)?;
    let mut links = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = netlink::recv(&socket, &mut buf)?;
        let mut msg = &buf[..n];
        while msg.len() >= NLMSG_HDR {
            let len = u32_at(msg, 0).unwrap_or(0) as usize;
            let kind = u16_at(msg, 4).unwrap_or(0);
            if len < NLMSG_HDR || len > msg.len() {
                return Err(LinksError::Malformed);
            }
            match kind {
                NLMSG_DONE => return Ok(links),
                NLMSG_ERROR => {
                    let errno = u32_at(msg, NLMSG_HDR).map(|e| -(e as i32)).unwrap_or(0);
                    return Err(LinksError::Refused(io::Error::from_raw_os_error(errno)));
                }
                RTM_NEWLINK => links.extend(parse_link(&msg[NLMSG_HDR..len])),
                _ => {}
            }
            msg = &msg[len.next_multiple_of(4).min(msg.len())..];
        }
    }
}

/// A socket subscribed to link changes; `wait` blocks until one happens.
pub struct LinkEvents {
    socket: OwnedFd,
    buf: Vec<u8>,
}

impl LinkEvents {
    pub fn subscribe() -> Result<Self, SyscallError> {
        Ok(Self {
            socket: netlink::route_socket(RTMGRP_LINK)?,
            buf: vec![0u8; 64 * 1024],
        })
    }

    /// Blocks until a link appears, changes or disappears.
    pub fn wait(&mut self) -> Result<(), SyscallError> {
        netlink::recv(&self.socket, &mut self.buf).map(|_| ())
    }
}

/// Shell-style match of an interface name: `*` any run, `?` one character.
pub fn name_matches(pattern: &str, name: &str) -> bool {
    fn go(p: &[u8], n: &[u8]) -> bool {
        match (p.first(), n.first()) {
            (None, None) => true,
            (Some(b'*'), _) => go(&p[1..], n) || (!n.is_empty() && go(p, &n[1..])),
            (Some(b'?'), Some(_)) => go(&p[1..], &n[1..]),
            (Some(a), Some(b)) if a == b => go(&p[1..], &n[1..]),
            _ => false,
        }
    }
    go(pattern.as_bytes(), name.as_bytes())
}

pub fn is_pattern(name: &str) -> bool {
    name.contains(['*', '?'])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_patterns() {
        assert!(name_matches("veth*", "veth12ab"));
        assert!(name_matches("veth*", "veth"));
        assert!(!name_matches("veth*", "eth0"));
        assert!(name_matches("eth?", "eth1"));
        assert!(!name_matches("eth?", "eth10"));
        assert!(name_matches("*", "anything"));
        assert!(name_matches("wg0", "wg0"));
        assert!(!name_matches("wg0", "wg01"));
        assert!(is_pattern("veth*") && !is_pattern("br0"));
    }

    #[test]
    fn this_namespace_has_loopback() {
        let links = links().unwrap();
        let lo = links.iter().find(|l| l.name == "lo").expect("lo");
        assert_eq!(lo.index, 1);
        assert_eq!(lo.master, None);
    }

    #[test]
    fn attribute_parsing_survives_garbage() {
        for len in 0..40 {
            let junk: Vec<u8> = (0..len).map(|i| (i * 37) as u8).collect();
            let _ = parse_link(&junk);
            let _ = attributes(&junk);
        }
    }
}
