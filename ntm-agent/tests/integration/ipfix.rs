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
    let collector = nfcapd(&link.a, COLLECTOR_PORT, &flows_dir);
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
    collector.stop();
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

/// nfcapd on loopback in `ns`, writing into `dir`.
fn nfcapd(ns: &crate::kit::Netns, port: u16, dir: &std::path::Path) -> Running {
    std::fs::create_dir_all(dir).unwrap();
    Running(Some(
        Command::new("ip")
            .args(["netns", "exec", &ns.name, "nfcapd"])
            .args(["-b", "127.0.0.1", "-p", &port.to_string()])
            .arg("-w")
            .arg(dir)
            .args(["-t", "60"])
            // A receive buffer for a burst of thousands of records, as a
            // collector's should be (the default 208 KiB drops them).
            .args(["-B", "4194304"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nfcapd (cargo xtask test installs nfdump)"),
    ))
}

/// `count` datagrams of 100 bytes from b to a's `port`; the IP bytes.
fn udp_to_a(link: &Link, port: u16, count: u64) -> u64 {
    let _sink = link.a.run(|| UdpSocket::bind((A4, port)).unwrap());
    link.b.run(|| {
        let socket = UdpSocket::bind((B4, 0)).unwrap();
        for _ in 0..count {
            socket.send_to(&[5; 100], (A4, port)).unwrap();
        }
    });
    thread::sleep(Duration::from_millis(100));
    count * 128
}

/// The sum of a family's samples in `text` whose labels hold `part`.
fn sum_of(text: &str, family: &str, part: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{family}{{")) && l.contains(part))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum()
}

/// No collector listening: records are counted as failed, the outage
/// logged once, the drain never held up. The collector comes: it gets the
/// templates again and every record after its return.
pub fn a_collector_that_comes_late_gets_everything_after() {
    let link = Link::new("ipfixr");
    let dir = TempDir::new("ipfixr");
    let collector_port = COLLECTOR_PORT + 1;
    let log_path = dir.0.join("agent.log");
    let agent = Running(Some(
        Agent::in_ns(&link.a)
            .iface(&link.a_if)
            .port(PORT + 1)
            .args(["--ipfix-collector", &format!("127.0.0.1:{collector_port}")])
            .args([
                "--ipfix-interval",
                "500ms",
                "--ipfix-template-interval",
                "1s",
            ])
            .args(["--drain-interval", "100ms"])
            .log_to(&log_path)
            .spawn_child(),
    ));
    wait_healthy(&link.a, PORT + 1);
    // Nobody listens: after the first refused message, records fail.
    wait_for("records counted as failed", Duration::from_secs(10), || {
        udp_to_a(&link, 5301, 5);
        thread::sleep(Duration::from_millis(600));
        let text = metrics(&link.a, PORT + 1)?;
        (sum_of(&text, "ntm_ipfix_records_total", r#"result="failed""#) > 0).then_some(())
    });

    // The collector comes: once ntm says so, every record reaches it.
    let flows_dir = dir.0.join("flows");
    let collector = nfcapd(&link.a, collector_port, &flows_dir);
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    wait_for(
        "the collector taking records again",
        Duration::from_secs(10),
        || {
            udp_to_a(&link, 5302, 1);
            thread::sleep(Duration::from_millis(300));
            log().contains("takes records again").then_some(())
        },
    );
    let mut sent = BTreeMap::new();
    for port in 5310..5315 {
        sent.insert(port, udp_to_a(&link, port, 10));
    }
    thread::sleep(Duration::from_millis(1000));
    agent.stop();
    thread::sleep(Duration::from_millis(300));
    collector.stop();

    let out = Command::new("nfdump")
        .arg("-R")
        .arg(&flows_dir)
        .args(["-q", "-N", "-o", "fmt:%da,%dp,%byt"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let mut got = BTreeMap::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        let [dst, dport, bytes] = fields[..] else {
            panic!("{line:?}");
        };
        if let Ok(port) = dport.parse::<u16>()
            && dst == A4
            && (5310..5315).contains(&port)
        {
            *got.entry(port).or_insert(0) += bytes.parse::<u64>().unwrap();
        }
    }
    assert_eq!(got, sent, "records after the collector's return\n{text}");
    let log = log();
    assert_eq!(
        log.matches("ipfix: collector").count(),
        2,
        "the outage is logged once when it starts and once when it ends:\n{log}"
    );
}

/// A flow table too small for the traffic: what ntm counted outside it
/// reaches the collector too, in records of their own, so that the
/// collector's total equals ntm's.
pub fn counts_outside_the_flow_table_reach_the_collector() {
    let link = Link::new("ipfixo");
    let dir = TempDir::new("ipfixo");
    let flows_dir = dir.0.join("flows");
    let collector = nfcapd(&link.a, COLLECTOR_PORT + 2, &flows_dir);
    let agent = Running(Some(
        Agent::in_ns(&link.a)
            .iface(&link.a_if)
            .port(PORT + 2)
            .args([
                "--ipfix-collector",
                &format!("127.0.0.1:{}", COLLECTOR_PORT + 2),
            ])
            .args(["--ipfix-interval", "1s", "--drain-interval", "200ms"])
            .args(["--flow-table-size", "4"])
            .spawn_child(),
    ));
    wait_healthy(&link.a, PORT + 2);
    // 3000 service ports: far more flows than the cache and table hold.
    link.b.run(|| {
        let socket = UdpSocket::bind((B4, 0)).unwrap();
        for port in 1000..4000u16 {
            socket.send_to(&[0x22; 48], (A4, port)).unwrap();
        }
    });
    link.wait_quiet();
    let text = wait_for("/metrics to settle", Duration::from_secs(15), || {
        let before = metrics(&link.a, PORT + 2)?;
        thread::sleep(Duration::from_secs(1));
        let after = metrics(&link.a, PORT + 2)?;
        (sum_of(&before, "ntm_bytes_total", "") == sum_of(&after, "ntm_bytes_total", ""))
            .then_some(after)
    });
    let counted = sum_of(&text, "ntm_bytes_total", "");
    let outside = sum_of(
        &text,
        "ntm_outside_flow_table_bytes_total",
        r#"reason="table_full""#,
    );
    assert!(outside > 0, "the table overflowed:\n{text}");
    agent.stop();
    thread::sleep(Duration::from_millis(300));
    collector.stop();
    let out = Command::new("nfdump")
        .arg("-R")
        .arg(&flows_dir)
        .args(["-q", "-N", "-o", "fmt:%pr,%byt"])
        .output()
        .unwrap();
    let records = String::from_utf8_lossy(&out.stdout);
    let (mut total, mut no_protocol) = (0u64, 0u64);
    for line in records.lines() {
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        let [proto, bytes] = fields[..] else {
            panic!("{line:?}");
        };
        let bytes: u64 = bytes.parse().unwrap();
        total += bytes;
        if proto == "0" {
            no_protocol += bytes;
        }
    }
    assert_eq!(no_protocol, outside, "the table-full records\n{records}");
    assert_eq!(
        total, counted,
        "the collector's total against /metrics\n{records}"
    );
}
