//! The test kit, shared by the integration tests and the benches: the root
//! gate, network namespaces and veth links that clean up after themselves,
//! running code inside a namespace, raw frames, the agent process, scrapes.
//!
//! Traffic rules: packets only ever flow between namespaces these helpers
//! create, on 198.18.0.0/15 and 2001:2::/48, in bounded loops.
#![allow(dead_code)]

pub mod agent;
pub mod browser;
pub mod containerd;
pub mod delay;
pub mod dhcp;
pub mod dns;
pub mod frames;
pub mod hello;
pub mod scrape;
pub mod tls;

// (Unused in the benches that start no agent.)
#[allow(unused_imports)]
pub use agent::Agent;

use std::{
    fs::File,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

/// What a test needs from the machine.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Needs {
    /// Root: loading programs, namespaces, attaching.
    Root,
    /// Nothing special.
    Nothing,
}

/// The one gate for "needs root": whether such tests can run here. Without
/// root they are reported as ignored, with a message, unless
/// NTM_REQUIRE_BPF=1 (CI), which makes that an error.
pub fn root_tests_enabled() -> Result<bool, String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return Ok(true);
    }
    if std::env::var("NTM_REQUIRE_BPF").is_ok_and(|v| v == "1") {
        return Err("NTM_REQUIRE_BPF=1 but the kernel tests need root (CAP_BPF, CAP_NET_ADMIN) to load programs and create namespaces".to_string());
    }
    eprintln!(
        "kernel tests IGNORED: they need root (run as root, or via `cargo xtask test` as root)"
    );
    Ok(false)
}

/// Runs a command and panics with its output if it fails.
pub fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// A network namespace, deleted (with its interfaces) on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Self {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let name = format!("ntmt-{tag}-{}-{id}", std::process::id());
        sh(&["ip", "netns", "add", &name]);
        let ns = Self { name };
        // Keep IPv6 quiet so that the only frames on a test link are the
        // test's own: no router solicitations, no duplicate address detection,
        // MLD reports sent at once rather than over seconds.
        ns.exec(&[
            "sysctl",
            "-q",
            "-w",
            "net.ipv6.conf.default.router_solicitations=0",
            "net.ipv6.conf.default.dad_transmits=0",
            "net.ipv6.conf.default.accept_dad=0",
            "net.ipv6.conf.default.accept_ra=0",
            "net.ipv6.conf.default.mldv1_unsolicited_report_interval=1",
            "net.ipv6.conf.default.mldv2_unsolicited_report_interval=1",
            "net.ipv6.conf.all.router_solicitations=0",
        ]);
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// Quietens IPv6 on `ifname`, an interface made outside this
    /// namespace (with the host's defaults), before it comes up: no router
    /// solicitations, no duplicate address detection, multicast reports
    /// at once.
    pub fn quiet_ipv6(&self, ifname: &str) {
        self.exec(&[
            "sysctl",
            "-q",
            "-w",
            &format!("net.ipv6.conf.{ifname}.router_solicitations=0"),
            &format!("net.ipv6.conf.{ifname}.dad_transmits=0"),
            &format!("net.ipv6.conf.{ifname}.accept_dad=0"),
            &format!("net.ipv6.conf.{ifname}.accept_ra=0"),
            &format!("net.ipv6.conf.{ifname}.mldv1_unsolicited_report_interval=1"),
            &format!("net.ipv6.conf.{ifname}.mldv2_unsolicited_report_interval=1"),
        ]);
    }

    /// Where agents in this namespace keep their state (removed with it).
    pub fn state_dir(&self) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("ntm-state-{}", self.name))
    }

    pub fn exec(&self, args: &[&str]) -> String {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(args);
        sh(&full)
    }

    /// A permanent neighbour entry: `ip` is at `mac` on `ifname`, so no
    /// ARP or neighbour discovery crosses the link.
    pub fn permanent_neighbour(&self, ifname: &str, ip: &str, mac: &str) {
        self.exec(&[
            "ip",
            "neigh",
            "replace",
            ip,
            "lladdr",
            mac,
            "dev",
            ifname,
            "nud",
            "permanent",
        ]);
    }

    /// Waits (at most until `deadline`) until `ifname` is up: the kernel
    /// reports carrier changes up to a second late (linkwatch).
    pub fn wait_up(&self, ifname: &str, deadline: Instant) {
        while self
            .exec(&["cat", &format!("/sys/class/net/{ifname}/operstate")])
            .trim()
            != "up"
        {
            assert!(Instant::now() < deadline, "{ifname} did not come up");
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Where `ip netns` keeps this namespace (what `run_in_netns` and
    /// `nsenter --net=` take).
    pub fn path(&self) -> PathBuf {
        Path::new("/var/run/netns").join(&self.name)
    }

    /// Runs `f` on a thread that has entered this namespace.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        run_in_netns(&self.path(), f)
    }

    /// Moves the calling thread into this namespace (for good).
    pub fn enter_current_thread(&self) {
        enter_netns(&self.path());
    }
}

/// Keeps the calling thread on the CPU it runs on until dropped (then on
/// the CPUs it had): for a test that runs programs with
/// BPF_PROG_TEST_RUN and reads per-CPU state back, such as the flow cache.
pub struct OnOneCpu {
    before: libc::cpu_set_t,
}

impl OnOneCpu {
    pub fn new() -> Self {
        // SAFETY: an all-zero cpu_set_t is an empty set; sched_getaffinity
        // and sched_setaffinity read and write only the set they are given,
        // which outlives the calls; pid 0 is the calling thread.
        unsafe {
            let mut before: libc::cpu_set_t = std::mem::zeroed();
            let size = std::mem::size_of::<libc::cpu_set_t>();
            assert_eq!(libc::sched_getaffinity(0, size, &mut before), 0);
            let cpu = libc::sched_getcpu();
            assert!(
                cpu >= 0,
                "sched_getcpu: {}",
                std::io::Error::last_os_error()
            );
            let mut one: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu as usize, &mut one);
            assert_eq!(
                libc::sched_setaffinity(0, size, &one),
                0,
                "sched_setaffinity: {}",
                std::io::Error::last_os_error()
            );
            Self { before }
        }
    }
}

impl Drop for OnOneCpu {
    fn drop(&mut self) {
        // SAFETY: as in `new`.
        unsafe {
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &self.before);
        }
    }
}

/// The host name an agent names its own host's addresses by (test
/// namespaces share the machine's).
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_string()
}

/// Runs `f` on a thread that has entered the network namespace at `path`
/// (a namespace file: `/var/run/netns/NAME`, `/proc/PID/ns/net`), such as
/// a pod's.
pub fn run_in_netns<T: Send>(path: &Path, f: impl FnOnce() -> T + Send) -> T {
    thread::scope(|s| {
        s.spawn(|| {
            enter_netns(path);
            f()
        })
        .join()
        .expect("thread in namespace panicked")
    })
}

/// Moves the calling thread into the network namespace at `path` (for
/// good).
pub fn enter_netns(path: &Path) {
    let file = File::open(path).unwrap_or_else(|e| panic!("open netns {}: {e}", path.display()));
    // SAFETY: setns on a valid namespace fd; affects only this thread.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(
        rc,
        0,
        "setns {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(self.state_dir());
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Two namespaces joined by a veth pair, addressed on the benchmarking
/// ranges: `a` is 198.18.0.1 / 2001:2::1, `b` is 198.18.0.2 / 2001:2::2.
/// Neighbours are static, so no ARP or neighbour discovery crosses the link.
pub struct Link {
    pub a: Netns,
    pub b: Netns,
    pub a_if: String,
    pub b_if: String,
}

pub const A4: &str = "198.18.0.1";
pub const B4: &str = "198.18.0.2";
pub const A6: &str = "2001:2::1";
pub const B6: &str = "2001:2::2";

impl Link {
    pub fn new(tag: &str) -> Self {
        let a = Netns::new(&format!("{tag}a"));
        let b = Netns::new(&format!("{tag}b"));
        let a_if = "ntm0".to_string();
        let b_if = "ntm1".to_string();
        sh(&[
            "ip",
            "link",
            "add",
            &a_if,
            "netns",
            &a.name,
            "address",
            "02:00:00:00:00:01",
            "type",
            "veth",
            "peer",
            "name",
            &b_if,
            "netns",
            &b.name,
            "address",
            "02:00:00:00:00:02",
        ]);
        for (ns, ifname, v4, v6, peer_mac, peer4, peer6) in [
            (&a, &a_if, A4, A6, "02:00:00:00:00:02", B4, B6),
            (&b, &b_if, B4, B6, "02:00:00:00:00:01", A4, A6),
        ] {
            // The veth was created outside the namespace, with the host's
            // defaults: quieten IPv6 on it before it comes up.
            ns.quiet_ipv6(ifname);
            ns.exec(&["ip", "addr", "add", &format!("{v4}/24"), "dev", ifname]);
            ns.exec(&[
                "ip",
                "addr",
                "add",
                &format!("{v6}/64"),
                "dev",
                ifname,
                "nodad",
            ]);
            ns.exec(&["ip", "link", "set", ifname, "up"]);
            for peer in [peer4, peer6] {
                ns.permanent_neighbour(ifname, peer, peer_mac);
            }
        }
        let link = Self { a, b, a_if, b_if };
        // The kernel reports carrier changes up to a second late (linkwatch),
        // and IPv6 sends its multicast reports only then: wait for both ends
        // to be up, then for the reports to pass.
        let deadline = Instant::now() + Duration::from_secs(10);
        link.a.wait_up(&link.a_if, deadline);
        link.b.wait_up(&link.b_if, deadline);
        link.wait_quiet();
        link
    }

    /// Sets segmentation/receive offloads on both ends.
    pub fn set_offloads(&self, on: bool) {
        let state = if on { "on" } else { "off" };
        for (ns, ifname) in [(&self.a, &self.a_if), (&self.b, &self.b_if)] {
            ns.exec(&[
                "ethtool", "-K", ifname, "tso", state, "gso", state, "gro", state,
            ]);
        }
    }

    /// Frames and bytes that crossed `a`'s interface: (rx, tx) as
    /// (packets, bytes including the Ethernet header).
    pub fn a_stats(&self) -> ((u64, u64), (u64, u64)) {
        if_stats(&self.a, &self.a_if)
    }

    /// A second veth pair between `a` and `b`, number `n` (1-9): `ntm{2n}`
    /// in a with 198.18.`n`.1/24, `ntm{2n+1}` in b with 198.18.`n`.2/24,
    /// static neighbours, up and quiet. Returns the two names.
    pub fn add_veth(&self, n: u8) -> (String, String) {
        assert!((1..=9).contains(&n), "pair {n}");
        let (a_if, b_if) = (format!("ntm{}", 2 * n), format!("ntm{}", 2 * n + 1));
        let (a_mac, b_mac) = (
            format!("02:00:00:00:0{n}:01"),
            format!("02:00:00:00:0{n}:02"),
        );
        let (a4, b4) = (format!("198.18.{n}.1"), format!("198.18.{n}.2"));
        sh(&[
            "ip",
            "link",
            "add",
            &a_if,
            "netns",
            &self.a.name,
            "address",
            &a_mac,
            "type",
            "veth",
            "peer",
            "name",
            &b_if,
            "netns",
            &self.b.name,
            "address",
            &b_mac,
        ]);
        for (ns, ifname, v4, peer4, peer_mac) in [
            (&self.a, &a_if, &a4, &b4, &b_mac),
            (&self.b, &b_if, &b4, &a4, &a_mac),
        ] {
            // No IPv6 on it: the pair carries only the test's IPv4.
            ns.exec(&[
                "sysctl",
                "-q",
                "-w",
                &format!("net.ipv6.conf.{ifname}.disable_ipv6=1"),
            ]);
            ns.exec(&["ip", "addr", "add", &format!("{v4}/24"), "dev", ifname]);
            ns.exec(&["ip", "link", "set", ifname, "up"]);
            ns.permanent_neighbour(ifname, peer4, peer_mac);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        self.a.wait_up(&a_if, deadline);
        self.b.wait_up(&b_if, deadline);
        (a_if, b_if)
    }

    /// Waits until nothing has crossed the link for a while (the kernel's own
    /// IPv6 multicast reports after link-up), at most a few seconds.
    pub fn wait_quiet(&self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut last = self.a_stats();
        let mut quiet_since = Instant::now();
        while Instant::now() < deadline {
            thread::sleep(Duration::from_millis(100));
            let now = self.a_stats();
            if now != last {
                last = now;
                quiet_since = Instant::now();
            } else if quiet_since.elapsed() >= Duration::from_millis(400) {
                return;
            }
        }
    }
}

/// Frames and bytes that crossed `ifname` in `ns`: (rx, tx) as (packets,
/// bytes including the Ethernet header).
pub fn if_stats(ns: &Netns, ifname: &str) -> ((u64, u64), (u64, u64)) {
    let read = |what: &str| -> u64 {
        ns.exec(&["cat", &format!("/sys/class/net/{ifname}/statistics/{what}")])
            .trim()
            .parse()
            .unwrap()
    };
    (
        (read("rx_packets"), read("rx_bytes")),
        (read("tx_packets"), read("tx_bytes")),
    )
}

/// An AF_PACKET socket sending raw Ethernet frames out of one interface
/// (of the namespace the calling thread is in).
pub struct RawSender {
    socket: OwnedFd,
    addr: libc::sockaddr_ll,
}

impl RawSender {
    pub fn new(iface: &str) -> Self {
        // SAFETY: a raw packet socket; its fd is owned at once.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        assert!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: `fd` is a fresh socket nobody else owns.
        let socket = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: an all-zero sockaddr_ll is valid; the fields are set below.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        let name = std::ffi::CString::new(iface).unwrap();
        // SAFETY: a NUL-terminated name.
        addr.sll_ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) } as i32;
        addr.sll_halen = 6;
        Self { socket, addr }
    }

    /// Sends one frame: whether all of it went.
    pub fn send(&self, frame: &[u8]) -> bool {
        // SAFETY: the frame and the address outlive the call.
        let sent = unsafe {
            libc::sendto(
                self.socket.as_raw_fd(),
                frame.as_ptr() as *const libc::c_void,
                frame.len(),
                0,
                &self.addr as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        sent == frame.len() as isize
    }
}

/// Sends raw Ethernet frames out of `iface` with an AF_PACKET socket.
pub fn send_raw(iface: &str, frames: &[Vec<u8>]) {
    let sender = RawSender::new(iface);
    for frame in frames {
        assert!(sender.send(frame), "{}", std::io::Error::last_os_error());
    }
}

/// The kernel side started from these flags, as the agent starts it, with
/// nothing pinned (a test's kernel must not outlive it).
pub fn start_kernel(flags: &[&str]) -> ntm_agent::kernel::Kernel {
    use clap::Parser as _;
    let args = ["ntm-agent", "--no-pin"]
        .into_iter()
        .chain(flags.iter().copied());
    start_kernel_with(&ntm_agent::config::Config::try_parse_from(args).expect("flags parse"))
}

/// The kernel side started from `config`, as the agent starts it.
pub fn start_kernel_with(config: &ntm_agent::config::Config) -> ntm_agent::kernel::Kernel {
    let options = config.kernel().expect("kernel options");
    let services = config.services().expect("services");
    ntm_agent::kernel::Kernel::start(&options, &services.known_port_bitmap())
        .expect("kernel starts")
}

/// The image `cargo xtask test` built (`NTM_IMAGE`), or None (and a
/// skip message) when the tests run without it; with NTM_REQUIRE_BPF=1
/// a missing image fails instead.
pub fn test_image() -> Option<String> {
    match std::env::var("NTM_IMAGE") {
        Ok(image) => Some(image),
        Err(_) => {
            assert!(
                std::env::var("NTM_REQUIRE_BPF").is_err(),
                "NTM_IMAGE is not set: run the tests with `cargo xtask test`, which builds the image"
            );
            eprintln!("SKIPPED: no image (cargo xtask test builds it)");
            None
        }
    }
}

/// A bpffs of the test's own, mounted on a fresh directory: agents run
/// under `ip netns exec`, which mounts a sysfs of the namespace over /sys
/// and so hides /sys/fs/bpf. Unmounting it on drop drops every pin left in
/// it, so a failed test leaves nothing attached or loaded.
pub struct BpfFs {
    pub dir: std::path::PathBuf,
}

impl BpfFs {
    pub fn new(tag: &str) -> Self {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("ntm-bpffs-{tag}-{}-{id}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        sh(&["mount", "-t", "bpf", "bpf", dir.to_str().unwrap()]);
        Self { dir }
    }

    /// The `--pin-dir` the agents of a test share.
    pub fn pin_dir(&self) -> String {
        self.dir.join("ntm").to_string_lossy().into_owned()
    }
}

impl Drop for BpfFs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .args(["-l", self.dir.to_str().unwrap_or_default()])
            .status();
        let _ = std::fs::remove_dir(&self.dir);
    }
}
