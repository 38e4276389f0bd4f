//! Flow export into a real collector: Debian's nfdump (nfcapd on loopback
//! in the agent's namespace, `nfdump -R` reading its files back). UDP, TCP
//! and ICMP over IPv4 and IPv6 cross the test link; the collector's
//! packets and bytes per flow equal what `/metrics` counted, and the UDP
//! ones what was sent.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{TcpListener, TcpStream, UdpSocket},
    process::{Child, Command, Stdio},
    thread,
    time::Duration,
};

use crate::kit::{
    A4, A6, Agent, B4, B6, Link,
    scrape::{TempDir, metrics, wait_for, wait_healthy},
};

const PORT: u16 = 9470;
const COLLECTOR_PORT: u16 = 9995;

/// Stops a child with SIGTERM and waits for it (the agent sends what is
/// pending; nfcapd writes its file).
fn terminate(mut child: Child) {
    // SAFETY: kill(2) on our own child's pid, which has not been reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
}

/// Kills a child left running by a failing test.
struct Running(Option<Child>);

impl Running {
    fn stop(mut self) {
        if let Some(child) = self.0.take() {
            terminate(child);
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Packets and bytes per (source, destination, protocol).
type Flows = BTreeMap<(String, String, String), (u64, u64)>;

/// What `/metrics` counted, per flow, from the traffic series.
fn from_metrics(text: &str) -> Flows {
    let mut flows = Flows::new();
    for line in text.lines() {
        let (family, index) = if line.starts_with("ntm_packets_total{") {
            ("packets", 0)
        } else if line.starts_with("ntm_bytes_total{") {
            ("bytes", 1)
        } else {
            continue;
        };
        let _ = family;
        let label = |name: &str| {
            let start = line.find(&format!("{name}=\""))? + name.len() + 2;
            let end = line[start..].find('"')? + start;
            Some(line[start..end].to_string())
        };
        let (Some(src), Some(dst), Some(proto)) = (label("src"), label("dst"), label("proto"))
        else {
            continue;
        };
        let value: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        let entry = flows.entry((src, dst, proto)).or_default();
        if index == 0 {
            entry.0 += value;
        } else {
            entry.1 += value;
        }
    }
    flows
}

/// What the collector stored, per flow: `nfdump -R DIR` in CSV-like lines.
fn from_collector(dir: &std::path::Path) -> Flows {
    let out = Command::new("nfdump")
        .arg("-R")
        .arg(dir)
        .args(["-q", "-N", "-o", "fmt:%sa,%da,%pr,%pkt,%byt"])
        .output()
        .expect("nfdump (cargo xtask test installs it)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "nfdump: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut flows = Flows::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        let [src, dst, proto, packets, bytes] = fields[..] else {
            panic!("nfdump line {line:?}");
        };
        let proto = match proto {
            // -N: numbers.
            "6" => "tcp",
            "17" => "udp",
            "1" => "icmp",
            "58" => "icmp6",
            other => panic!("protocol {other:?} in {line:?}"),
        };
        let entry = flows
            .entry((src.to_string(), dst.to_string(), proto.to_string()))
            .or_default();
        entry.0 += packets.parse::<u64>().unwrap();
        entry.1 += bytes.parse::<u64>().unwrap();
    }
    flows
}

/// UDP, TCP and ICMP over IPv4 and IPv6, each flow's packets and bytes at
/// nfcapd exactly as `/metrics` counted them, and the UDP datagrams' as
/// sent; the service port on the server's side.
pub fn every_flow_reaches_nfdump_exactly() {
    let link = Link::new("ipfix");
    let dir = TempDir::new("ipfix");
    let flows_dir = dir.0.join("flows");
    std::fs::create_dir_all(&flows_dir).unwrap();
    let nfcapd = Running(Some(
        Command::new("ip")
            .args(["netns", "exec", &link.a.name, "nfcapd"])
            .args(["-b", "127.0.0.1", "-p", &COLLECTOR_PORT.to_string()])
            .arg("-w")
            .arg(&flows_dir)
            .args(["-t", "60"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nfcapd (cargo xtask test installs nfdump)"),
    ));
    let agent = Running(Some(
        Agent::in_ns(&link.a)
            .iface(&link.a_if)
            .port(PORT)
            .args(["--ipfix-collector", &format!("127.0.0.1:{COLLECTOR_PORT}")])
            .args(["--ipfix-interval", "1s", "--drain-interval", "200ms"])
            .log_to(&dir.0.join("agent.log"))
            .spawn_child(),
    ));
    wait_healthy(&link.a, PORT);

    // UDP both families, to sinks on a.
    let _sinks = link.a.run(|| {
        [
            UdpSocket::bind((A4, 5300)).unwrap(),
            UdpSocket::bind((A6, 5300)).unwrap(),
        ]
    });
    link.b.run(|| {
        for (from, to, count) in [(B4, A4, 20), (B6, A6, 30)] {
            let socket = UdpSocket::bind((from, 0)).unwrap();
            for _ in 0..count {
                socket.send_to(&[5; 100], (to, 5300)).unwrap();
            }
        }
    });
    // TCP both families: a connection each way's data.
    for (server, client) in [(A4, B4), (A6, B6)] {
        let listener = link.a.run(|| TcpListener::bind((server, 8080)).unwrap());
        let accepted = thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut got = Vec::new();
            stream.read_to_end(&mut got).unwrap();
            stream.write_all(&got[..1000]).unwrap();
        });
        link.b.run(|| {
            let mut stream = TcpStream::connect((server, 8080)).unwrap();
            let _ = client;
            stream.write_all(&[7; 20_000]).unwrap();
            stream.shutdown(std::net::Shutdown::Write).unwrap();
            let mut back = Vec::new();
            stream.read_to_end(&mut back).unwrap();
            assert_eq!(back.len(), 1000);
        });
        accepted.join().unwrap();
    }
    // ICMP echo both families.
    for to in [A4, A6] {
        link.b.exec(&["ping", "-q", "-c", "3", "-i", "0.2", to]);
    }

    // /metrics settles (two scrapes a second apart agree).
    let counted = wait_for("/metrics to settle", Duration::from_secs(15), || {
        let before = from_metrics(&metrics(&link.a, PORT)?);
        thread::sleep(Duration::from_secs(1));
        let after = from_metrics(&metrics(&link.a, PORT)?);
        (before == after && !after.is_empty()).then_some(after)
    });
    // SIGTERM: the agent sends what it holds; then nfcapd writes its file.
    agent.stop();
    thread::sleep(Duration::from_millis(300));
    nfcapd.stop();
    let collected = from_collector(&flows_dir);

    let udp = |src: &str, dst: &str| (src.to_string(), dst.to_string(), "udp".to_string());
    assert_eq!(
        counted.get(&udp(B4, A4)),
        Some(&(20, 20 * 128)),
        "{counted:?}"
    );
    assert_eq!(
        counted.get(&udp(B6, A6)),
        Some(&(30, 30 * 148)),
        "{counted:?}"
    );
    for proto in ["tcp", "icmp", "icmp6"] {
        assert!(
            counted.keys().any(|(_, _, p)| p == proto),
            "no {proto} flow counted: {counted:?}"
        );
    }
    assert_eq!(
        collected,
        counted,
        "the collector's flows (left) against /metrics (right)\n{}",
        std::fs::read_to_string(dir.0.join("agent.log")).unwrap_or_default()
    );

    // The service port on its real side: the server's frames from 8080.
    let ports = Command::new("nfdump")
        .arg("-R")
        .arg(&flows_dir)
        .args(["-q", "-N", "-o", "fmt:%sa,%sp,%da,%dp,%pr", "proto tcp"])
        .output()
        .unwrap();
    let ports = String::from_utf8_lossy(&ports.stdout);
    for line in ports.lines() {
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        let [src, sport, _, dport, _] = fields[..] else {
            panic!("{line:?}");
        };
        let expected = if src == A4 || src == A6 {
            ("8080", "0")
        } else {
            ("0", "8080")
        };
        assert_eq!((sport, dport), expected, "{line}");
    }
}
