//! Real packets between two network namespaces over a veth pair, counted by
//! the real agent attached to one end, compared per flow and in total with
//! what was sent and with the interface's own counters. Exact equality.

use std::{
    io::{Read, Write},
    net::{Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    process::Command,
    sync::atomic::{AtomicBool, AtomicUsize, Ordering},
    thread,
    time::{Duration, Instant},
};

use crate::kit::{A4, A6, Agent, B4, B6, Link};
use aya::programs::{SchedClassifier, TcAttachType};
use ntm_agent::kernel::{Kernel, drain::Drained};
use ntm_common::{Counters, FlowKey, Hook, ipproto};

const ETH_HEADER: u64 = 14;

fn start_agent(link: &Link, extra: &[&str]) -> Kernel {
    let mut args = vec!["ntm-agent", "-i", link.a_if.as_str()];
    args.extend_from_slice(extra);
    crate::kit::start_kernel(&args[1..])
}

fn ip_bytes(ip: &str) -> [u8; 16] {
    let mut out = [0u8; 16];
    match ip.parse::<std::net::IpAddr>().unwrap() {
        std::net::IpAddr::V4(v4) => out[..4].copy_from_slice(&v4.octets()),
        std::net::IpAddr::V6(v6) => out = v6.octets(),
    }
    out
}

/// Sum of the drained flows matching `pred`.
fn sum(d: &Drained, pred: impl Fn(&FlowKey) -> bool) -> Counters {
    let mut total = Counters::default();
    for (_, c) in d.flows.iter().filter(|(k, _)| pred(k)) {
        total.add(c);
    }
    total
}

fn flow(d: &Drained, src: &str, dst: &str, proto: u8, port: u16, dir: Hook) -> Counters {
    let (src, dst) = (ip_bytes(src), ip_bytes(dst));
    sum(d, |k| {
        k.src == src && k.dst == dst && k.proto == proto && k.port == port && k.hook == dir as u8
    })
}

/// Runs `traffic`, waits until the link is quiet, drains, and checks that the
/// drained counts equal the interface's own counters for that window, per
/// hook: every frame that crossed, counted once.
fn phase(link: &Link, agent: &mut Kernel, traffic: impl FnOnce()) -> Drained {
    let before = link.a_stats();
    traffic();
    link.wait_quiet();
    let drained = agent.drain().unwrap();
    let after = link.a_stats();
    for (dir, (p0, b0), (p1, b1)) in [
        (Hook::Ingress, before.0, after.0),
        (Hook::Egress, before.1, after.1),
    ] {
        let counted = sum(&drained, |k| k.hook == dir as u8);
        let frames = p1 - p0;
        let expected = Counters {
            bytes: (b1 - b0) - ETH_HEADER * frames,
            packets: frames,
        };
        assert_eq!(
            counted, expected,
            "{dir:?}: counted vs the interface's counters"
        );
    }
    assert!(drained.outside.is_empty(), "{:?}", drained.outside);
    drained
}

fn udp_burst(
    link: &Link,
    dst: &str,
    port: u16,
    sizes: impl Iterator<Item = usize> + Send,
) -> (u64, u64) {
    link.b.run(|| {
        let bind: SocketAddr = if dst.contains(':') {
            "[::]:0".parse().unwrap()
        } else {
            "0.0.0.0:0".parse().unwrap()
        };
        let header = if dst.contains(':') { 48 } else { 28 };
        let socket = UdpSocket::bind(bind).unwrap();
        let target: SocketAddr = if dst.contains(':') {
            SocketAddr::new(dst.parse::<Ipv6Addr>().unwrap().into(), port)
        } else {
            format!("{dst}:{port}").parse().unwrap()
        };
        let (mut packets, mut bytes) = (0, 0);
        for size in sizes {
            socket.send_to(&vec![0x5A; size], target).unwrap();
            packets += 1;
            bytes += (header + size) as u64;
        }
        (packets, bytes)
    })
}

/// A UDP socket in `a` that swallows datagrams, so none is answered with
/// ICMP port-unreachable.
fn udp_sink(link: &Link, addr: &str, port: u16) -> UdpSocket {
    link.a.run(|| {
        let addr: SocketAddr = if addr.contains(':') {
            SocketAddr::new(addr.parse::<Ipv6Addr>().unwrap().into(), port)
        } else {
            format!("{addr}:{port}").parse().unwrap()
        };
        UdpSocket::bind(addr).unwrap()
    })
}

pub fn udp_icmp_tcp_over_ipv4_and_ipv6_counted_exactly() {
    let link = Link::new("exact");
    link.set_offloads(false);
    link.wait_quiet();
    link.a.run(|| {
        let mut agent = start_agent(&link, &[]);
        let _sink4 = udp_sink(&link, A4, 5300);
        let _sink6 = udp_sink(&link, A6, 5300);

        // UDP, 300 datagrams of 1..=300 payload bytes, per family.
        for (src, dst) in [(B4, A4), (B6, A6)] {
            let mut sent = (0, 0);
            let d = phase(&link, &mut agent, || {
                sent = udp_burst(&link, dst, 5300, 1..=300);
            });
            let counted = flow(&d, src, dst, ipproto::UDP, 5300, Hook::Ingress);
            assert_eq!(
                counted,
                Counters {
                    bytes: sent.1,
                    packets: sent.0
                },
                "UDP {src} -> {dst}"
            );
        }

        // ICMP echo: 20 requests in, 20 replies out, 100 bytes of payload.
        for (src, dst, proto, request, reply, header) in [
            (B4, A4, ipproto::ICMP, 8, 0, 28u64),
            (B6, A6, ipproto::ICMPV6, 128, 129, 48u64),
        ] {
            let d = phase(&link, &mut agent, || {
                link.b
                    .exec(&["ping", "-q", "-c", "20", "-i", "0.01", "-s", "100", dst]);
            });
            let expected = Counters {
                bytes: 20 * (header + 100),
                packets: 20,
            };
            assert_eq!(flow(&d, src, dst, proto, request, Hook::Ingress), expected);
            assert_eq!(flow(&d, dst, src, proto, reply, Hook::Egress), expected);
        }

        // TCP: 100 kB from b to a's port 5301. With only this connection on
        // the link, each hook is exactly one flow, so the interface's
        // counters are the per-flow oracle.
        for (src, dst) in [(B4, A4), (B6, A6)] {
            let d = phase(&link, &mut agent, || {
                tcp_transfer(&link, dst, 5301, 100_000, false);
            });
            let inbound = flow(&d, src, dst, ipproto::TCP, 5301, Hook::Ingress);
            let outbound = flow(&d, dst, src, ipproto::TCP, 5301, Hook::Egress);
            let tcp_flows = d
                .flows
                .iter()
                .filter(|(k, _)| k.proto == ipproto::TCP)
                .count();
            assert_eq!(tcp_flows, 2, "one flow per hook: {:?}", d.flows);
            assert!(inbound.bytes > 100_000 && outbound.packets > 0);
        }
        let _ = agent.shutdown().unwrap();
    });
}

/// What the client socket of a TCP transfer says it sent: segments (each
/// wire segment once, whatever the offloads) and payload bytes.
#[derive(Clone, Copy, Debug)]
struct TcpSent {
    segments: u64,
    payload: u64,
}

/// Reads `tcpi_segs_out` and `tcpi_bytes_sent` from TCP_INFO (offsets from
/// uapi/linux/tcp.h; libc's struct stops before them).
fn tcp_sent(conn: &TcpStream) -> TcpSent {
    let mut info = [0u8; 256];
    let mut len = info.len() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `info`.
    let rc = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(conn),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr() as *mut libc::c_void,
            &mut len,
        )
    };
    assert!(rc == 0 && len >= 208, "TCP_INFO: rc {rc}, {len} bytes");
    let u32_at = |o: usize| u32::from_ne_bytes(info[o..o + 4].try_into().unwrap()) as u64;
    let u64_at = |o: usize| u64::from_ne_bytes(info[o..o + 8].try_into().unwrap());
    TcpSent {
        segments: u32_at(136),
        payload: u64_at(200),
    }
}

/// Sends `bytes` over TCP to `dst:port` (listener in `a`, client in `b`), or
/// from a to b when `from_a`. Returns when both sides have closed, with what
/// the client's socket says it sent.
fn tcp_transfer(link: &Link, dst: &str, port: u16, bytes: usize, from_a: bool) -> TcpSent {
    let (server_ns, client_ns) = if from_a {
        (&link.b, &link.a)
    } else {
        (&link.a, &link.b)
    };
    let addr: SocketAddr = if dst.contains(':') {
        SocketAddr::new(dst.parse::<Ipv6Addr>().unwrap().into(), port)
    } else {
        format!("{dst}:{port}").parse().unwrap()
    };
    let listener = server_ns.run(|| TcpListener::bind(addr).unwrap());
    thread::scope(|s| {
        let server = s.spawn(|| {
            let (mut conn, _) = listener.accept().unwrap();
            let mut received = Vec::new();
            conn.read_to_end(&mut received).unwrap();
            received.len()
        });
        let sent = client_ns.run(|| {
            let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
            conn.write_all(&vec![0x42; bytes]).unwrap();
            conn.shutdown(std::net::Shutdown::Write).unwrap();
            let mut rest = Vec::new();
            conn.read_to_end(&mut rest).unwrap();
            // The peer's FIN is in; give our ACK of it a moment to leave.
            thread::sleep(Duration::from_millis(50));
            tcp_sent(&conn)
        });
        assert_eq!(server.join().unwrap(), bytes);
        sent
    })
}

/// Datagrams larger than the link's MTU, fragmented by the sender (IPv4
/// and IPv6): every fragment lands in its datagram's series (the later ones
/// take the first one's service port), bytes exact.
pub fn fragmented_datagrams_stay_in_one_series() {
    let link = Link::new("frag");
    link.set_offloads(false);
    link.wait_quiet();
    link.a.run(|| {
        let mut agent = start_agent(&link, &[]);
        let _sink4 = udp_sink(&link, A4, 7010);
        let _sink6 = udp_sink(&link, A6, 7010);
        for (src, dst, header) in [(B4, A4, 20u64), (B6, A6, 48u64)] {
            // 10 datagrams of 4,000 bytes over a 1,500-byte MTU: 3 fragments
            // each, the UDP header in the first only.
            let d = phase(&link, &mut agent, || {
                udp_burst(&link, dst, 7010, std::iter::repeat_n(4000, 10));
            });
            let ingress: Vec<_> = d
                .flows
                .iter()
                .filter(|(k, _)| k.hook == Hook::Ingress as u8)
                .collect();
            assert_eq!(ingress.len(), 1, "{src} -> {dst}: one series: {ingress:?}");
            let (key, counted) = ingress[0];
            assert_eq!(key.port, 7010, "{key:?}");
            assert_eq!(key.flags, 0, "no fragment without its port: {key:?}");
            // Each fragment repeats the IP header (and IPv6 its fragment
            // header); the UDP header is in the first one.
            assert_eq!(
                *counted,
                Counters {
                    bytes: 10 * (4000 + 8 + 3 * header),
                    packets: 30
                },
                "{src} -> {dst}"
            );
        }
        let _ = agent.shutdown().unwrap();
    });
}

pub fn draining_every_few_milliseconds_loses_nothing() {
    let link = Link::new("drain");
    link.a.run(|| {
        let mut agent = start_agent(&link, &[]);
        let _sink = udp_sink(&link, A4, 5400);
        let before = link.a_stats();
        // The burst lasts until at least MIN_DRAINS drains have happened
        // during it (bounded: at most 3M datagrams or 20 s), so the test
        // does not depend on how fast this machine sends (one sent 300k
        // datagrams in the time of 29 drains, each of which waits for the
        // kernel's RCU grace period on the map-in-map swap).
        const MIN_DRAINS: usize = 30;
        let done = AtomicBool::new(false);
        let drains_done = AtomicUsize::new(0);
        let mut drains = Vec::new();
        let started = Instant::now();
        let sent = thread::scope(|s| {
            let sender = s.spawn(|| {
                let sizes = (0..3_000_000usize).map(|i| 64 + i % 900).take_while(|_| {
                    drains_done.load(Ordering::Relaxed) < MIN_DRAINS
                        && started.elapsed() < Duration::from_secs(20)
                });
                let sent = udp_burst(&link, A4, 5400, sizes);
                done.store(true, Ordering::Release);
                sent
            });
            while !done.load(Ordering::Acquire) {
                drains.push(agent.drain().unwrap());
                drains_done.fetch_add(1, Ordering::Relaxed);
                thread::sleep(Duration::from_millis(2));
            }
            sender.join().unwrap()
        });
        link.wait_quiet();
        drains.push(agent.drain().unwrap());
        let after = link.a_stats();
        // The sender stops once MIN_DRAINS drains are done, so there are at
        // least that many (one more if the loop drained once more before
        // it saw the sender finish).
        assert!(
            drains.len() >= MIN_DRAINS,
            "only {} drains during the burst",
            drains.len()
        );
        assert!(sent.0 > 1_000, "only {} datagrams sent", sent.0);

        let mut counted = Counters::default();
        for d in &drains {
            counted.add(&flow(d, B4, A4, ipproto::UDP, 5400, Hook::Ingress));
        }
        assert_eq!(
            counted,
            Counters {
                bytes: sent.1,
                packets: sent.0
            },
            "over {} drains",
            drains.len()
        );
        // And everything that arrived (the datagrams plus whatever else the
        // kernel sent meanwhile) equals the interface's own counters.
        let mut ingress = Counters::default();
        for d in &drains {
            ingress.add(&sum(d, |k| k.hook == Hook::Ingress as u8));
        }
        let frames = after.0.0 - before.0.0;
        let l3_bytes = after.0.1 - before.0.1 - ETH_HEADER * frames;
        assert_eq!(
            ingress,
            Counters {
                bytes: l3_bytes,
                packets: frames
            }
        );
        let _ = agent.shutdown().unwrap();
    });
}

pub fn offloads_do_not_change_the_numbers() {
    let link = Link::new("gso");
    let payload = 300_000;
    for offloads in [false, true] {
        link.set_offloads(offloads);
        link.wait_quiet();
        let (d, sent, before, after) = link.a.run(|| {
            let mut agent = start_agent(&link, &[]);
            let before = link.a_stats();
            let sent = tcp_transfer(&link, B4, 5500, payload, true);
            link.wait_quiet();
            let d = agent.drain().unwrap();
            let after = link.a_stats();
            let _ = agent.shutdown().unwrap();
            (d, sent, before, after)
        });
        // The wire truth from the sender's socket: every segment carries
        // 20 bytes of IPv4 and 32 of TCP header (timestamps), the SYN 8 more
        // (MSS, SACK-permitted, window scale).
        let wire = Counters {
            bytes: 52 * sent.segments + 8 + sent.payload,
            packets: sent.segments,
        };
        assert_eq!(sent.payload, payload as u64, "no retransmissions on a veth");
        let counted = flow(&d, A4, B4, ipproto::TCP, 5500, Hook::Egress);
        assert_eq!(counted, wire, "data hook, offloads {offloads}");
        let frames = after.1.0 - before.1.0;
        if offloads {
            // Make sure the aggregates really happened, or this proves nothing.
            assert!(
                frames < sent.segments,
                "{frames} frames for {} segments",
                sent.segments
            );
        } else {
            // Without offloads every frame is one segment: the interface's
            // own counters agree too.
            let l3 = after.1.1 - before.1.1 - ETH_HEADER * frames;
            assert_eq!(
                counted,
                Counters {
                    bytes: l3,
                    packets: frames
                }
            );
        }
    }
}

/// The agent binary inside namespace `a`.
fn spawn_agent_binary(link: &Link) -> std::process::Child {
    Agent::in_ns(&link.a)
        .iface(&link.a_if)
        .piped()
        .spawn_child()
}

fn wait_for_attached(link: &Link, want: usize) -> (Vec<u32>, Vec<u32>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = link
            .a
            .run(|| ntm_agent::kernel::attach::attached_ntm_programs(&link.a_if).unwrap());
        if (now.0.len(), now.1.len()) == (want, want) || Instant::now() > deadline {
            return now;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

pub fn restart_after_kill_never_stacks_a_second_copy() {
    let link = Link::new("restart");
    let mut first = spawn_agent_binary(&link);
    let attached = wait_for_attached(&link, 1);
    assert_eq!((attached.0.len(), attached.1.len()), (1, 1), "first start");

    // A second copy while the first runs (on another metrics port, or it
    // would stop at the taken port) refuses to double count.
    let second = Agent::in_ns(&link.a)
        .iface(&link.a_if)
        .port_any_address(8001)
        .output();
    assert!(!second.status.success());
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(
        stderr.contains("another ntm agent is already running in this network namespace"),
        "{stderr}"
    );
    assert_eq!(
        wait_for_attached(&link, 1),
        attached,
        "the first copy is untouched"
    );

    // kill -9: no chance to detach; TCX links die with the process.
    first.kill().unwrap();
    first.wait().unwrap();
    let gone = wait_for_attached(&link, 0);
    assert_eq!(
        (gone.0.len(), gone.1.len()),
        (0, 0),
        "nothing left after kill -9"
    );

    let mut again = spawn_agent_binary(&link);
    let attached = wait_for_attached(&link, 1);
    assert_eq!(
        (attached.0.len(), attached.1.len()),
        (1, 1),
        "exactly one copy after restart"
    );

    // SIGTERM: a clean exit that says so, nothing left attached.
    // SAFETY: sending a signal to our own child.
    unsafe { libc::kill(again.id() as i32, libc::SIGTERM) };
    let status = again.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let mut log = String::new();
    again
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    assert!(log.contains("detaching and draining"), "{log}");
    let gone = wait_for_attached(&link, 0);
    assert_eq!((gone.0.len(), gone.1.len()), (0, 0));
}

pub fn clear_errors_for_bad_input() {
    let agent = env!("CARGO_BIN_EXE_ntm-agent");
    let run = |cmd: &mut Command| {
        let out = cmd.output().unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };

    let err = run(Command::new(agent).args(["-i", "no-such-if0"]));
    assert!(
        err.contains("no-such-if0") && err.contains("does not exist"),
        "{err}"
    );
    assert!(err.contains("lo"), "lists the interfaces there are: {err}");
    assert!(!err.contains("panicked"), "{err}");

    let err = run(Command::new(agent).args(["-i", "lo", "--service", "http=80"]));
    assert!(err.contains("PORT[/PROTO]=NAME"), "{err}");

    let err = run(Command::new(agent).args(["-i", "lo", "--drain-interval", "soon"]));
    assert!(err.contains("duration"), "{err}");

    // Without privileges (nobody, no capabilities): says which are missing.
    let unprivileged = [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
        agent,
        "-i",
        "lo",
    ];
    let err = run(Command::new(unprivileged[0]).args(&unprivileged[1..]));
    assert!(
        err.contains("CAP_BPF") && err.contains("not allowed"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");

    // Where it may make its folders in the bpffs (one open to all), an
    // agent that cannot start leaves none of them behind.
    let open = crate::kit::BpfFs::new("open");
    crate::kit::sh(&["chmod", "0777", open.dir.to_str().unwrap()]);
    let err = run(Command::new(unprivileged[0])
        .args(&unprivileged[1..])
        .args(["--pin-dir", &open.pin_dir()]));
    assert!(err.contains("not allowed"), "{err}");
    let pin_dir = std::path::Path::new(&open.pin_dir()).to_path_buf();
    let left = if pin_dir.exists() {
        walkdir(&pin_dir)
    } else {
        Vec::new()
    };
    assert!(!pin_dir.exists(), "left in the bpffs: {pin_dir:?} {left:?}");

    // The same where a root agent left its pinned state, which the
    // unprivileged one cannot write to: still the privileges are named.
    let ns = crate::kit::Netns::new("unprivileged");
    let bpffs = crate::kit::BpfFs::new("unprivileged");
    let mut earlier = Agent::in_ns(&ns)
        .iface("lo")
        .port(9443)
        .args(["--pin-dir", &bpffs.pin_dir()])
        .spawn_child();
    crate::kit::scrape::wait_healthy(&ns, 9443);
    // SAFETY: kill(2) on the test's own child; no memory is involved.
    assert_eq!(unsafe { libc::kill(earlier.id() as i32, libc::SIGTERM) }, 0);
    assert!(earlier.wait().unwrap().success());
    let err = run(Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .args(unprivileged)
        .args(["--pin-dir", &bpffs.pin_dir()]));
    assert!(
        err.contains("CAP_BPF") && err.contains("not allowed") && err.contains("pinned state"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

/// Every path under `dir`.
fn walkdir(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(walkdir(&path));
        }
        found.push(path);
    }
    found
}

/// ntm filters tc lists on `a`'s interface, per hook (clsact mode).
fn clsact_filters(link: &Link) -> (usize, usize) {
    let count = |dir: &str| {
        link.a
            .exec(&["tc", "filter", "show", "dev", &link.a_if, dir])
            .lines()
            .filter(|l| l.contains("ntm_tc_"))
            .count()
    };
    (count("ingress"), count("egress"))
}

fn wait_for_clsact_filters(link: &Link, want: (usize, usize)) -> (usize, usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = clsact_filters(link);
        if now == want || Instant::now() > deadline {
            return now;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

pub fn clsact_mode_counts_exactly_and_replaces_stale_filters() {
    let link = Link::new("clsact");
    // Exact counting through clsact filters, as on kernels before 6.6.
    link.a.run(|| {
        let mut agent = start_agent(&link, &["--attach-mode", "clsact"]);
        assert!(
            agent
                .attachments()
                .all(|a| a.mode() == ntm_agent::kernel::attach::LinkMode::Clsact)
        );
        let _sink = udp_sink(&link, A4, 5600);
        let mut sent = (0, 0);
        let d = phase(&link, &mut agent, || {
            sent = udp_burst(&link, A4, 5600, 1..=200);
        });
        let counted = flow(&d, B4, A4, ipproto::UDP, 5600, Hook::Ingress);
        assert_eq!(
            counted,
            Counters {
                bytes: sent.1,
                packets: sent.0
            }
        );
        let _ = agent.shutdown().unwrap();
    });
    assert_eq!(
        clsact_filters(&link),
        (0, 0),
        "a clean stop removes its filters"
    );

    let spawn = || {
        Agent::in_ns(&link.a)
            .iface(&link.a_if)
            .args(["--attach-mode", "clsact"])
            .spawn_child()
    };
    let mut first = spawn();
    assert_eq!(wait_for_clsact_filters(&link, (1, 1)), (1, 1));
    first.kill().unwrap();
    first.wait().unwrap();
    // This is the hazard: the killed process's filters keep running.
    assert_eq!(clsact_filters(&link), (1, 1), "filters outlive kill -9");

    let mut again = spawn();
    thread::sleep(Duration::from_millis(500));
    assert_eq!(
        wait_for_clsact_filters(&link, (1, 1)),
        (1, 1),
        "stale ones replaced, not stacked"
    );
    // SAFETY: signalling our own child.
    unsafe { libc::kill(again.id() as i32, libc::SIGTERM) };
    assert!(again.wait().unwrap().success());
    assert_eq!(wait_for_clsact_filters(&link, (0, 0)), (0, 0));
}

/// Two interfaces and a 4-entry flow table, through the real agent and its
/// endpoint: what found no room is in the main counters of its own
/// interface (every other label "other") and in the table_full counters of
/// its interface and hook, so each interface's total equals what its own
/// counters say crossed it.
pub fn a_full_flow_table_adds_up_per_interface() {
    use crate::kit::{
        if_stats,
        scrape::{http_get, sample_sum, wait_for, wait_healthy},
    };
    let link = Link::new("ovf");
    let (a2, _) = link.add_veth(1);
    let port = 9493;
    let _agent = Agent::in_ns(&link.a)
        .iface(&link.a_if)
        .iface(&a2)
        .port(port)
        .args(["--flow-table-size", "4", "--drain-interval", "200ms"])
        .spawn();
    wait_healthy(&link.a, port);
    link.wait_quiet();
    let ifaces = [link.a_if.clone(), a2.clone()];
    let before = ifaces.each_ref().map(|i| if_stats(&link.a, i));
    // 5000 service ports on each interface, 2 datagrams each: far more flows
    // than the flow cache and the table hold, in (and ICMP errors out).
    link.b.run(|| {
        let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
        for dst in [A4, "198.18.1.1"] {
            for port in 1000..6000u16 {
                for _ in 0..2 {
                    socket.send_to(&[0x22; 48], (dst, port)).unwrap();
                }
            }
        }
    });
    link.wait_quiet();
    let after = ifaces.each_ref().map(|i| if_stats(&link.a, i));
    // Per interface and hook: (frames, L3 bytes) that crossed it.
    let crossed = |i: usize, dir: Hook| {
        let pick = |s: ((u64, u64), (u64, u64))| match dir {
            Hook::Ingress => s.0,
            Hook::Egress => s.1,
        };
        let (frames, bytes) = (
            pick(after[i]).0 - pick(before[i]).0,
            pick(after[i]).1 - pick(before[i]).1,
        );
        (frames, bytes - ETH_HEADER * frames)
    };
    let want_total: u64 = (0..2)
        .map(|i| crossed(i, Hook::Ingress).0 + crossed(i, Hook::Egress).0)
        .sum();
    let text = wait_for(
        "every frame in the counters",
        Duration::from_secs(20),
        || {
            let (_, text) = http_get(&link.a, port, "/metrics")?;
            (sample_sum(&text, "ntm_packets_total", &[]) >= want_total).then_some(text)
        },
    );
    for (i, iface) in ifaces.iter().enumerate() {
        let label = format!("iface=\"{iface}\"");
        let (in_frames, in_bytes) = crossed(i, Hook::Ingress);
        let (out_frames, out_bytes) = crossed(i, Hook::Egress);
        assert!(in_frames >= 10_000, "{iface}: {in_frames} frames in");
        assert_eq!(
            (
                sample_sum(&text, "ntm_packets_total", &[&label]),
                sample_sum(&text, "ntm_bytes_total", &[&label]),
            ),
            (in_frames + out_frames, in_bytes + out_bytes),
            "{iface}: the interface's total, overflow included"
        );
        let full_in = [r#"reason="table_full""#, &label, r#"hook="ingress""#];
        let overflow_in = sample_sum(&text, "ntm_outside_flow_table_packets_total", &full_in);
        assert!(
            overflow_in > 0 && overflow_in <= in_frames,
            "{iface}: {overflow_in} of {in_frames} frames in overflowed"
        );
        // The overflow series of the main counters is the outside counters'
        // table_full, insert_failed and no_active_table of the interface.
        let overflow_series = [&label, r#"src="other""#, r#"proto="other""#];
        let room: u64 = ["table_full", "insert_failed", "no_active_table"]
            .iter()
            .map(|r| {
                let reason = format!("reason=\"{r}\"");
                sample_sum(
                    &text,
                    "ntm_outside_flow_table_packets_total",
                    &[&reason, &label],
                )
            })
            .sum();
        assert_eq!(
            sample_sum(&text, "ntm_packets_total", &overflow_series),
            room,
            "{iface}"
        );
    }
    assert!(
        !text
            .lines()
            .any(|l| !l.starts_with('#') && l.contains(r#"iface="other""#)),
        "no count lost its interface: {text}"
    );
}

/// The self-check, through the real agent: with offloads off, what ntm
/// counted at each hook equals what the interface's own counters say
/// crossed it (UDP both ways, with ICMP errors, and TCP), and the coverage
/// figure is 1.
pub fn coverage_equals_the_interface_counters() {
    use crate::kit::scrape::{http_get, sample_sum, wait_for, wait_healthy};
    let link = Link::new("cov");
    link.set_offloads(false);
    link.wait_quiet();
    let port = 9494;
    let _agent = Agent::in_ns(&link.a)
        .iface(&link.a_if)
        .port(port)
        .args(["--drain-interval", "200ms"])
        .spawn();
    wait_healthy(&link.a, port);
    // A first check before any traffic, so that the minute's window starts
    // where nothing is in flight.
    wait_for("the first self-check", Duration::from_secs(10), || {
        let (_, text) = http_get(&link.a, port, "/metrics")?;
        text.contains("ntm_interface_coverage_ratio{").then_some(())
    });
    let before = link.a_stats();
    // UDP to a closed port (ICMP errors come back out), IPv4 and IPv6, and
    // a TCP transfer each way.
    udp_burst(&link, A4, 7001, (0..300).map(|i| 20 + i * 3));
    udp_burst(&link, A6, 7002, (0..200).map(|i| 1 + i * 5));
    tcp_transfer(&link, A4, 7003, 300_000, false);
    tcp_transfer(&link, B6, 7004, 200_000, true);
    link.wait_quiet();
    let after = link.a_stats();
    let crossed = [
        ("ingress", after.0.0 - before.0.0, after.0.1 - before.0.1),
        ("egress", after.1.0 - before.1.0, after.1.1 - before.1.1),
    ];
    let dir = |d: &str| format!("hook=\"{d}\"");
    let text = wait_for(
        "ntm's count to reach the kernel's",
        Duration::from_secs(20),
        || {
            let (_, text) = http_get(&link.a, port, "/metrics")?;
            crossed
                .iter()
                .all(|(d, frames, _)| {
                    sample_sum(&text, "ntm_interface_counted_packets_total", &[&dir(d)]) == *frames
                })
                .then_some(text)
        },
    );
    for (d, frames, bytes) in crossed {
        let labels = [r#"iface="ntm0""#, &dir(d)];
        assert!(frames > 100, "{d}: {frames} frames");
        assert_eq!(
            sample_sum(&text, "ntm_interface_kernel_packets_total", &labels),
            frames,
            "{d}: the kernel's frames since ntm attached"
        );
        assert_eq!(
            sample_sum(&text, "ntm_interface_kernel_bytes_total", &labels),
            bytes,
            "{d}: the kernel's bytes"
        );
        assert_eq!(
            sample_sum(&text, "ntm_interface_counted_packets_total", &labels),
            frames,
            "{d}: ntm's frames"
        );
        assert_eq!(
            sample_sum(&text, "ntm_packets_total", &[r#"iface="ntm0""#]),
            crossed[0].1 + crossed[1].1,
            "the traffic counters hold them all"
        );
        let ratio = format!("ntm_interface_coverage_ratio{{hook=\"{d}\",iface=\"ntm0\"}} 1\n");
        assert!(text.contains(&ratio), "{ratio} in {text}");
    }
}

pub fn a_full_flow_table_still_adds_up() {
    let link = Link::new("full");
    link.a.run(|| {
        let mut agent = start_agent(&link, &["--flow-table-size", "4"]);
        let before = link.a_stats();
        // 6000 service ports, 2 datagrams each: 6000 flows in (and ICMP
        // port-unreachable flows out), more than the flow cache (4096 slots
        // per CPU) and the 4-entry table hold together.
        link.b.run(|| {
            let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
            for port in 1000..7000u16 {
                for _ in 0..2 {
                    socket.send_to(&[0x11; 64], (A4, port)).unwrap();
                }
            }
        });
        link.wait_quiet();
        let d = agent.drain().unwrap();
        let after = link.a_stats();
        let frames = (after.0.0 - before.0.0) + (after.1.0 - before.1.0);
        let bytes = (after.0.1 - before.0.1) + (after.1.1 - before.1.1) - ETH_HEADER * frames;

        let cache_slots = ntm_common::FLOW_CACHE_SLOTS as usize * aya::util::nr_cpus().unwrap();
        assert!(
            d.flows.len() <= cache_slots + 4,
            "{} flows from a cache of {cache_slots} and a 4-entry table",
            d.flows.len()
        );
        let full = d.outside.total(ntm_common::OutsideReason::TableFull);
        assert!(full.packets > 0, "the overflow bucket is used");
        let mut total = sum(&d, |_| true);
        for (_, c) in d.outside.iter() {
            total.add(c);
        }
        assert_eq!(
            total,
            Counters {
                bytes,
                packets: frames
            },
            "flows + overflow = all traffic"
        );
        let _ = agent.shutdown().unwrap();
    });
}

/// Datagrams waiting on `sink`, read without blocking.
fn drain_socket(sink: &UdpSocket) -> usize {
    sink.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 2048];
    let mut n = 0;
    while sink.recv(&mut buf).is_ok() {
        n += 1;
    }
    n
}

pub fn xdp_mode_counts_then_passes_or_drops() {
    let link = Link::new("xdp");
    for (action, delivered) in [("pass", true), ("drop", false)] {
        link.a.run(|| {
            let mut agent = start_agent(&link, &["--mode", "xdp", "--xdp-action", action]);
            let how: Vec<&str> = agent.attachments().map(|a| a.mode().as_str()).collect();
            assert_eq!(how, vec!["xdp-native"], "veth supports native XDP");
            let sink = udp_sink(&link, A4, 5700);
            let sent = udp_burst(&link, A4, 5700, (0..100).map(|i| 10 + i));
            link.wait_quiet();
            let d = agent.drain().unwrap();
            let counted = flow(&d, B4, A4, ipproto::UDP, 5700, Hook::Ingress);
            assert_eq!(
                counted,
                Counters {
                    bytes: sent.1,
                    packets: sent.0
                },
                "{action}"
            );
            let received = drain_socket(&sink);
            assert_eq!(received, if delivered { 100 } else { 0 }, "{action}");
            let _ = agent.shutdown().unwrap();
        });
    }
}

pub fn other_tc_programs_keep_running_and_their_verdicts_stand() {
    static OTHERS: &[u8] =
        aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ntm-bench-baseline"));
    let link = Link::new("neigh");
    link.a.run(|| {
        // Someone else's TC program, attached first: drops UDP to port 5801.
        let mut others = aya::Ebpf::load(OTHERS).unwrap();
        let neighbour: &mut SchedClassifier = others
            .program_mut("neighbour_drop_5801")
            .unwrap()
            .try_into()
            .unwrap();
        neighbour.load().unwrap();
        neighbour.attach(&link.a_if, TcAttachType::Ingress).unwrap();
        let on_ingress = || -> Vec<String> {
            let (_, programs) =
                SchedClassifier::query_tcx(&link.a_if, TcAttachType::Ingress).unwrap();
            programs
                .iter()
                .map(|p| p.name_as_str().unwrap_or("?").to_string())
                .collect()
        };

        let mut agent = start_agent(&link, &[]);
        let order = on_ingress();
        assert_eq!(order.len(), 2, "{order:?}");
        assert!(order[0].starts_with("ntm_tc_"), "ntm runs first: {order:?}");
        let kept = udp_sink(&link, A4, 5800);
        let dropped = udp_sink(&link, A4, 5801);
        let to_kept = udp_burst(&link, A4, 5800, (0..40).map(|_| 100));
        let to_dropped = udp_burst(&link, A4, 5801, (0..60).map(|_| 100));
        link.wait_quiet();
        let d = agent.drain().unwrap();
        // ntm counts everything that reached the interface...
        let count = |port| flow(&d, B4, A4, ipproto::UDP, port, Hook::Ingress);
        assert_eq!(
            count(5800),
            Counters {
                bytes: to_kept.1,
                packets: to_kept.0
            }
        );
        assert_eq!(
            count(5801),
            Counters {
                bytes: to_dropped.1,
                packets: to_dropped.0
            }
        );
        // ...and the other program still decides: its drops stand.
        assert_eq!(drain_socket(&kept), 40);
        assert_eq!(drain_socket(&dropped), 0);
        let _ = agent.shutdown().unwrap();
        // ntm never removes what it did not attach.
        assert_eq!(on_ingress(), vec!["neighbour_drop_".to_string()]);
        drop(others);
    });
}

/// Loopback hands every packet to its egress hook and then to its ingress
/// hook: `-i lo` counts each one once, over IPv4 and IPv6, exactly.
pub fn loopback_counts_each_packet_once() {
    let ns = crate::kit::Netns::new("lo");
    ns.run(|| {
        let mut kernel = crate::kit::start_kernel(&["-i", "lo", "--numeric"]);
        kernel.drain().unwrap();
        let (mut sent, mut sinks) = (Vec::new(), Vec::new());
        for (address, header) in [("127.0.0.1", 28u64), ("::1", 48)] {
            let sink = UdpSocket::bind((address, 5300)).unwrap();
            let socket = UdpSocket::bind((address, 0)).unwrap();
            for i in 0..50usize {
                socket.send_to(&vec![1; 100 + i], (address, 5300)).unwrap();
            }
            let bytes: u64 = (0..50u64).map(|i| header + 100 + i).sum();
            sent.push((address, bytes));
            sinks.push(sink);
        }
        // Every datagram is in the sinks: each crossed both hooks by now.
        let mut buf = [0u8; 256];
        for sink in &sinks {
            sink.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            for _ in 0..50 {
                sink.recv(&mut buf).unwrap();
            }
        }
        let drained = kernel.drain().unwrap();
        for (address, bytes) in sent {
            let counted = flow(
                &drained,
                address,
                address,
                ipproto::UDP,
                5300,
                Hook::Ingress,
            );
            assert_eq!(counted, Counters { bytes, packets: 50 }, "{address}");
            let egress = flow(&drained, address, address, ipproto::UDP, 5300, Hook::Egress);
            assert_eq!(egress, Counters::default(), "{address}: not at egress too");
        }
    });
}
