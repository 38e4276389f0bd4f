//! A userspace delay line: this kernel has no netem (`tc qdisc add ...
//! netem` fails), so a namespace of its own bridges two veths with a
//! thread per direction: each reads the frames arriving on one end with an
//! AF_PACKET socket, holds each for the delay, and sends it out of the
//! other end, in order; it can drop frames, for loss. The two hosts on
//! either side see an ordinary link with that one-way delay.
//!
//! Written here because no crate does this; testing.md has the recipe
//! (ping RTT 70.5 ms through lines of 20 and 50 ms).

use std::{
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use super::{Netns, sh};

/// Which frames a direction drops: called with each frame and its number
/// in that direction (from 0); true drops it.
pub type DropRule = Box<dyn FnMut(&[u8], u64) -> bool + Send>;

/// A delay line between two hosts: `left_if` in `left` and `right_if` in
/// `right`, each the end of a veth whose other end is in the line's own
/// namespace. Stops (and removes its namespace) when dropped.
pub struct DelayLine {
    _ns: Netns,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    dropped: Arc<AtomicU64>,
}

impl DelayLine {
    /// A line whose frames take `delay` each way, dropping none.
    pub fn new(tag: &str, left: (&Netns, &str), right: (&Netns, &str), delay: Duration) -> Self {
        Self::with_drops(tag, left, right, delay, [None, None])
    }

    /// A line whose frames take `delay` each way; `drops[0]` decides for
    /// the frames from left to right, `drops[1]` for the others.
    pub fn with_drops(
        tag: &str,
        left: (&Netns, &str),
        right: (&Netns, &str),
        delay: Duration,
        drops: [Option<DropRule>; 2],
    ) -> Self {
        let ns = Netns::new(tag);
        let ends = ["dl0", "dl1"];
        for ((host, host_if), end) in [left, right].into_iter().zip(ends) {
            sh(&[
                "ip", "link", "add", host_if, "netns", &host.name, "type", "veth", "peer", "name",
                end, "netns", &ns.name,
            ]);
            host.quiet_ipv6(host_if);
            // Frames cross the line as they were written: a checksum left
            // to the offload would arrive unfinished, and an aggregate
            // larger than the MTU could not be sent on.
            host.exec(&[
                "ethtool", "-K", host_if, "tx", "off", "tso", "off", "gso", "off",
            ]);
            host.exec(&["ip", "link", "set", host_if, "up"]);
            // The line's own ends send nothing of their own.
            ns.exec(&[
                "sysctl",
                "-q",
                "-w",
                &format!("net.ipv6.conf.{end}.disable_ipv6=1"),
            ]);
            ns.exec(&["ip", "link", "set", end, "promisc", "on", "up"]);
        }
        let sockets: Vec<OwnedFd> = ns.run(|| ends.iter().map(|end| packet_socket(end)).collect());
        let stop = Arc::new(AtomicBool::new(false));
        let dropped = Arc::new(AtomicU64::new(0));
        let mut threads = Vec::new();
        let [to_right, to_left] = drops;
        let sockets: Vec<Arc<OwnedFd>> = sockets.into_iter().map(Arc::new).collect();
        for (from, to, rule) in [(0, 1, to_right), (1, 0, to_left)] {
            let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
            let reader = sockets[from].clone();
            let reader_stop = stop.clone();
            let reader_dropped = dropped.clone();
            threads.push(thread::spawn(move || {
                read_frames(&reader, &reader_stop, rule, &reader_dropped, tx)
            }));
            let writer = sockets[to].clone();
            threads.push(thread::spawn(move || {
                // Until the reader ends (and drops its sender).
                while let Ok((arrived, frame)) = rx.recv() {
                    if let Some(wait) = (arrived + delay).checked_duration_since(Instant::now()) {
                        thread::sleep(wait);
                    }
                    // SAFETY: a bound packet socket and a live buffer.
                    unsafe {
                        libc::send(
                            writer.as_raw_fd(),
                            frame.as_ptr() as *const libc::c_void,
                            frame.len(),
                            0,
                        )
                    };
                }
            }));
        }
        Self {
            _ns: ns,
            stop,
            threads,
            dropped,
        }
    }

    /// Frames the drop rules dropped so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl Drop for DelayLine {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// An AF_PACKET socket bound to `ifname` (in the calling thread's
/// namespace) for every protocol, with a receive timeout so that its
/// reader sees the stop flag.
fn packet_socket(ifname: &str) -> OwnedFd {
    let all = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: a raw packet socket; its fd is owned at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            all as i32,
        )
    };
    assert!(
        fd >= 0,
        "AF_PACKET socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: `fd` is a fresh socket nobody else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let name = std::ffi::CString::new(ifname).unwrap();
    // SAFETY: an all-zero sockaddr_ll is valid, its fields are set below;
    // the name is NUL-terminated; bind and setsockopt read only what they
    // are given, which outlives the calls.
    unsafe {
        let mut addr: libc::sockaddr_ll = std::mem::zeroed();
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = all;
        addr.sll_ifindex = libc::if_nametoindex(name.as_ptr()) as i32;
        assert!(addr.sll_ifindex > 0, "no interface {ifname}");
        let bound = libc::bind(
            socket.as_raw_fd(),
            &addr as *const libc::sockaddr_ll as *const libc::sockaddr,
            size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        );
        assert_eq!(bound, 0, "bind: {}", std::io::Error::last_os_error());
        let timeout = libc::timeval {
            tv_sec: 0,
            tv_usec: 50_000,
        };
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &timeout as *const libc::timeval as *const libc::c_void,
            size_of::<libc::timeval>() as libc::socklen_t,
        );
    }
    socket
}

/// Reads the frames arriving on `socket` (not the ones the line sends out
/// of it) until `stop`, handing each on with the time it arrived unless
/// `rule` drops it.
fn read_frames(
    socket: &OwnedFd,
    stop: &AtomicBool,
    mut rule: Option<DropRule>,
    dropped: &AtomicU64,
    tx: mpsc::Sender<(Instant, Vec<u8>)>,
) {
    let mut buffer = vec![0u8; 65_536];
    let mut number = 0u64;
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: all-zero is a valid sockaddr_ll; recvfrom writes at most
        // the lengths it is given into the buffer and the address.
        let (len, addr) = unsafe {
            let mut addr: libc::sockaddr_ll = std::mem::zeroed();
            let mut addr_len = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            let len = libc::recvfrom(
                socket.as_raw_fd(),
                buffer.as_mut_ptr() as *mut libc::c_void,
                buffer.len(),
                0,
                &mut addr as *mut libc::sockaddr_ll as *mut libc::sockaddr,
                &mut addr_len,
            );
            (len, addr)
        };
        if len <= 0 {
            continue;
        }
        // What this line sent out of the interface comes back to its
        // socket as outgoing: not a frame to carry.
        if addr.sll_pkttype == libc::PACKET_OUTGOING {
            continue;
        }
        let frame = &buffer[..len as usize];
        let this = number;
        number += 1;
        if let Some(rule) = rule.as_mut()
            && rule(frame, this)
        {
            dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        if tx.send((Instant::now(), frame.to_vec())).is_err() {
            return;
        }
    }
}
