//! Flow export into real collectors: Debian's nfdump (nfcapd on loopback
//! in the agent's namespace, `nfdump -R` reading its files back) and
//! pmacct (nfacctd, its print plugin writing JSON). UDP, TCP and ICMP over
//! IPv4 and IPv6 cross the test link; the collectors' packets and bytes
//! per flow equal what `/metrics` counted, and the UDP ones what was sent;
//! a flow above 2^32 bytes in one interval; collectors that come late or
//! are killed and come back.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{TcpListener, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use crate::kit::{
    A4, A6, Agent, B4, B6, Link,
    scrape::{TempDir, metrics, sample_sum, wait_for, wait_healthy},
};

const PORT: u16 = 9470;
const COLLECTOR_PORT: u16 = 9995;
/// pmacct's nfacctd, next to nfcapd.
const PMACCT_PORT: u16 = 9985;

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
    /// SIGKILL, and reaped.
    fn kill(mut self) {
        if let Some(mut child) = self.0.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

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

/// `nfdump -R DIR -q -N` with `fmt:FIELDS` (comma-separated `%` fields)
/// and an optional filter: each record's fields, trimmed.
fn nfdump(dir: &Path, fields: &str, filter: Option<&str>) -> Vec<Vec<String>> {
    let out = Command::new("nfdump")
        .arg("-R")
        .arg(dir)
        .args(["-q", "-N", "-o", &format!("fmt:{fields}")])
        .args(filter)
        .output()
        .expect("nfdump (cargo xtask test installs it)");
    assert!(
        out.status.success(),
        "nfdump: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let columns = fields.split(',').count();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|line| {
            let record: Vec<String> = line.split(',').map(|f| f.trim().to_string()).collect();
            assert_eq!(record.len(), columns, "nfdump line {line:?} for {fields:?}");
            record
        })
        .collect()
}

/// A protocol number as `/metrics` names it.
fn protocol_name(number: &str) -> &'static str {
    match number {
        "6" => "tcp",
        "17" => "udp",
        "1" => "icmp",
        "58" => "icmp6",
        other => panic!("protocol {other:?}"),
    }
}

/// What nfcapd stored, per flow (`nfdump -R DIR`).
fn from_collector(dir: &Path) -> Flows {
    let mut flows = Flows::new();
    for record in nfdump(dir, "%sa,%da,%pr,%pkt,%byt", None) {
        let [src, dst, proto, packets, bytes] = &record[..] else {
            unreachable!()
        };
        let entry = flows
            .entry((src.clone(), dst.clone(), protocol_name(proto).to_string()))
            .or_default();
        entry.0 += packets.parse::<u64>().unwrap();
        entry.1 += bytes.parse::<u64>().unwrap();
    }
    flows
}

/// UDP, TCP and ICMP over IPv4 and IPv6, exported by one agent to two
/// collectors at once: each flow's packets and bytes at nfcapd and at
/// pmacct's nfacctd exactly as `/metrics` counted them, and the UDP
/// datagrams' as sent; the service port on the server's side at both.
pub fn every_flow_reaches_nfdump_and_pmacct_exactly() {
    let link = Link::new("ipfix");
    let dir = TempDir::new("ipfix");
    let flows_dir = dir.0.join("flows");
    let collector = nfcapd(&link.a, COLLECTOR_PORT, &flows_dir);
    let pmacct = Nfacctd::start(&link.a, PMACCT_PORT, &dir.0.join("pmacct"));
    let agent = Running(Some(
        Agent::in_ns(&link.a)
            .iface(&link.a_if)
            .port(PORT)
            .args(["--ipfix-collector", &format!("127.0.0.1:{COLLECTOR_PORT}")])
            .args(["--ipfix-collector", &format!("127.0.0.1:{PMACCT_PORT}")])
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
    for server in [A4, A6] {
        let listener = link.a.run(|| TcpListener::bind((server, 8080)).unwrap());
        let accepted = thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut got = Vec::new();
            stream.read_to_end(&mut got).unwrap();
            stream.write_all(&got[..1000]).unwrap();
        });
        link.b.run(|| {
            let mut stream = TcpStream::connect((server, 8080)).unwrap();
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

    let counted = settled_flows(&link, PORT);
    // SIGTERM: the agent sends what it holds; then the collectors write.
    agent.stop();
    thread::sleep(Duration::from_millis(300));
    collector.stop();
    let pmacct = pmacct.stop();
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
    let log = || std::fs::read_to_string(dir.0.join("agent.log")).unwrap_or_default();
    // Both compared before either fails: a failure names every collector
    // that disagrees.
    let disagree: Vec<String> = [("nfdump", collected), ("pmacct", flows_of(&pmacct))]
        .into_iter()
        .filter(|(_, flows)| *flows != counted)
        .map(|(name, flows)| format!("{name}: {flows:?}"))
        .collect();
    assert!(
        disagree.is_empty(),
        "collectors against /metrics {counted:?}:\n{}\n{}",
        disagree.join("\n"),
        log()
    );

    // The service port on its real side: the server's frames from 8080.
    let expected = |src: &str| {
        if src == A4 || src == A6 {
            (8080, 0)
        } else {
            (0, 8080)
        }
    };
    let tcp = nfdump(&flows_dir, "%sa,%sp,%dp", Some("proto tcp"));
    assert!(!tcp.is_empty());
    for record in tcp {
        let ports = (record[1].parse().unwrap(), record[2].parse().unwrap());
        assert_eq!(ports, expected(&record[0]), "nfdump: {record:?}");
    }
    let tcp: Vec<_> = pmacct.iter().filter(|r| r.proto == "6").collect();
    assert!(!tcp.is_empty());
    for record in tcp {
        assert_eq!(
            (record.src_port, record.dst_port),
            expected(&record.src),
            "pmacct: {record:?}"
        );
    }
}

/// `/metrics` once it settles (two scrapes a second apart agree), per flow.
fn settled_flows(link: &Link, port: u16) -> Flows {
    wait_for("/metrics to settle", Duration::from_secs(15), || {
        let before = from_metrics(&metrics(&link.a, port)?);
        thread::sleep(Duration::from_secs(1));
        let after = from_metrics(&metrics(&link.a, port)?);
        (before == after && !after.is_empty()).then_some(after)
    })
}

/// One aggregate of pmacct's print plugin (a JSON line).
#[derive(Debug)]
struct PmacctRecord {
    src: String,
    dst: String,
    src_port: u16,
    dst_port: u16,
    /// The protocol number (`print_num_protos`).
    proto: String,
    packets: u64,
    bytes: u64,
}

/// Packets and bytes per (source, destination, protocol) of pmacct's
/// aggregates (over their ports).
fn flows_of(records: &[PmacctRecord]) -> Flows {
    let mut flows = Flows::new();
    for r in records {
        let entry = flows
            .entry((r.src.clone(), r.dst.clone(), protocol_name(&r.proto).into()))
            .or_default();
        entry.0 += r.packets;
        entry.1 += r.bytes;
    }
    flows
}

/// pmacct's nfacctd on loopback in a namespace, its print plugin
/// aggregating by addresses, ports and protocol into a JSON file.
struct Nfacctd {
    process: Running,
    dir: PathBuf,
}

impl Nfacctd {
    /// Starts it with its configuration, log and output in `dir`; returns
    /// once it listens and its plugin runs.
    fn start(ns: &crate::kit::Netns, port: u16, dir: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let config = dir.join("nfacctd.conf");
        std::fs::write(
            &config,
            format!(
                "daemonize: false\n\
                 nfacctd_ip: 127.0.0.1\n\
                 nfacctd_port: {port}\n\
                 nfacctd_pipe_size: 4194304\n\
                 logfile: {log}\n\
                 plugins: print\n\
                 print_output: json\n\
                 print_output_file: {out}\n\
                 print_output_file_append: true\n\
                 print_refresh_time: 60\n\
                 print_num_protos: true\n\
                 aggregate: src_host, dst_host, src_port, dst_port, proto\n",
                log = dir.join("nfacctd.log").display(),
                out = dir.join("flows.json").display(),
            ),
        )
        .unwrap();
        let process = Running(Some(
            Command::new("ip")
                .args(["netns", "exec", &ns.name, "nfacctd", "-f"])
                .arg(&config)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("nfacctd (cargo xtask test installs pmacct)"),
        ));
        let log = dir.join("nfacctd.log");
        wait_for("nfacctd to listen", Duration::from_secs(10), || {
            let log = std::fs::read_to_string(&log).ok()?;
            (log.contains("waiting for NetFlow/IPFIX data")
                && log.contains("JSON: setting object handlers"))
            .then_some(())
        });
        Self {
            process,
            dir: dir.to_path_buf(),
        }
    }

    /// SIGINT (the print plugin writes its cache, then nfacctd exits):
    /// every aggregate it wrote.
    fn stop(mut self) -> Vec<PmacctRecord> {
        let mut child = self.process.0.take().unwrap();
        // SAFETY: kill(2) on our own child's pid, which has not been reaped.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let _ = child.wait();
        let text = std::fs::read_to_string(self.dir.join("flows.json")).unwrap_or_default();
        let log = std::fs::read_to_string(self.dir.join("nfacctd.log")).unwrap_or_default();
        text.lines()
            .map(|line| {
                let json: serde_json::Value = serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("pmacct line {line:?}: {e}\n{log}"));
                let text = |key: &str| match &json[key] {
                    serde_json::Value::String(s) => s.clone(),
                    serde_json::Value::Number(n) => n.to_string(),
                    other => panic!("{key} is {other:?} in {line}"),
                };
                let number = |key: &str| {
                    json[key]
                        .as_u64()
                        .unwrap_or_else(|| panic!("{key} in {line}"))
                };
                PmacctRecord {
                    src: text("ip_src"),
                    dst: text("ip_dst"),
                    src_port: number("port_src") as u16,
                    dst_port: number("port_dst") as u16,
                    proto: text("ip_proto"),
                    packets: number("packets"),
                    bytes: number("bytes"),
                }
            })
            .collect()
    }
}

/// nfcapd on loopback in `ns`, writing into `dir`.
fn nfcapd(ns: &crate::kit::Netns, port: u16, dir: &Path) -> Running {
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

/// The bytes nfcapd stored for UDP from b to a, per destination port.
fn bytes_by_port(dir: &Path) -> BTreeMap<u16, u64> {
    let mut got = BTreeMap::new();
    for record in nfdump(dir, "%sa,%da,%dp,%byt", Some("proto udp")) {
        if record[0] == B4 && record[1] == A4 {
            *got.entry(record[2].parse().unwrap()).or_insert(0) +=
                record[3].parse::<u64>().unwrap();
        }
    }
    got
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

    let got: BTreeMap<u16, u64> = bytes_by_port(&flows_dir)
        .into_iter()
        .filter(|(port, _)| (5310..5315).contains(port))
        .collect();
    assert_eq!(got, sent, "records after the collector's return");
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
    // More service ports than the flow cache has slots on every CPU
    // (the cache's hash spreads neighbouring ports over slots of their
    // own: fewer flows may never reach the table), and 1000 more.
    let slots = ntm_common::FLOW_CACHE_SLOTS as usize * aya::util::nr_cpus().unwrap();
    let ports = 1000..(2000 + slots).min(32_000) as u16;
    link.b.run(|| {
        let socket = UdpSocket::bind((B4, 0)).unwrap();
        for port in ports {
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
    let records = nfdump(&flows_dir, "%pr,%byt", None);
    let (mut total, mut no_protocol) = (0u64, 0u64);
    for record in &records {
        let bytes: u64 = record[1].parse().unwrap();
        total += bytes;
        if record[0] == "0" {
            no_protocol += bytes;
        }
    }
    assert_eq!(no_protocol, outside, "the table-full records\n{records:?}");
    assert_eq!(
        total, counted,
        "the collector's total against /metrics\n{records:?}"
    );
}

/// One TCP connection carries more than 4 GiB from b to a within one
/// `--ipfix-interval`: nfcapd gets it in one record (64-bit counts), its
/// bytes equal to `/metrics`' and above 2^32.
pub fn a_flow_above_4_gib_in_one_interval_is_exact() {
    const PAYLOAD: u64 = 4_500_000_000;
    const CHUNK: usize = 4 << 20;
    let link = Link::new("ipfixg");
    let dir = TempDir::new("ipfixg");
    let flows_dir = dir.0.join("flows");
    let collector = nfcapd(&link.a, COLLECTOR_PORT + 3, &flows_dir);
    let agent = Running(Some(
        Agent::in_ns(&link.a)
            .iface(&link.a_if)
            .port(PORT + 3)
            .args([
                "--ipfix-collector",
                &format!("127.0.0.1:{}", COLLECTOR_PORT + 3),
            ])
            // Longer than the test: the interval ends at SIGTERM.
            .args(["--ipfix-interval", "600s"])
            .log_to(&dir.0.join("agent.log"))
            .spawn_child(),
    ));
    wait_healthy(&link.a, PORT + 3);

    let listener = link.a.run(|| TcpListener::bind((A4, 8080)).unwrap());
    let receiver = thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut buffer = vec![0u8; CHUNK];
        let mut got = 0u64;
        loop {
            match stream.read(&mut buffer).unwrap() {
                0 => return got,
                n => got += n as u64,
            }
        }
    });
    let started = Instant::now();
    link.b.run(|| {
        let mut stream = TcpStream::connect((A4, 8080)).unwrap();
        let chunk = vec![0x42u8; CHUNK];
        let mut left = PAYLOAD;
        while left > 0 {
            let n = left.min(CHUNK as u64) as usize;
            stream.write_all(&chunk[..n]).unwrap();
            left -= n as u64;
        }
    });
    assert_eq!(receiver.join().unwrap(), PAYLOAD);
    eprintln!(
        "{PAYLOAD} bytes over TCP in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let counted = settled_flows(&link, PORT + 3);
    agent.stop();
    thread::sleep(Duration::from_millis(300));
    collector.stop();
    let flow = (B4.to_string(), A4.to_string(), "tcp".to_string());
    let (_, bytes) = counted[&flow];
    // PAYLOAD is above 2^32 (checked at compile time).
    const _: () = assert!(PAYLOAD > 1 << 32);
    assert!(bytes > PAYLOAD, "/metrics: {bytes} bytes from b to a");
    assert_eq!(
        from_collector(&flows_dir),
        counted,
        "nfdump against /metrics"
    );
    let records = nfdump(&flows_dir, "%sa,%da,%pr,%pkt,%byt", Some("proto tcp"));
    let ours: Vec<_> = records.iter().filter(|r| r[0] == B4).collect();
    assert_eq!(ours.len(), 1, "one record for the interval: {records:?}");
    assert_eq!(ours[0][4].parse::<u64>().unwrap(), bytes, "{records:?}");
    eprintln!(
        "nfdump: one record of {} packets, {bytes} bytes (2^32 = {})",
        ours[0][3],
        1u64 << 32
    );
}

/// One agent exports to two nfcapd: one runs throughout (what ntm
/// produced), the other is killed (SIGKILL) while UDP keeps coming in
/// batches, each to a port of its own, then started again on its port and
/// folder. Every batch reaches the first exactly; every batch after the
/// second's return reaches it exactly; what it lost while away is
/// printed, and `ntm_ipfix_records_total` accounts for every record
/// produced (sent + failed + dropped).
pub fn a_collector_killed_and_started_again_gets_every_record_after() {
    let link = Link::new("ipfixk");
    let dir = TempDir::new("ipfixk");
    let (steady_port, victim_port) = (COLLECTOR_PORT + 4, COLLECTOR_PORT + 5);
    let (steady_dir, victim_dir) = (dir.0.join("steady"), dir.0.join("victim"));
    let steady = nfcapd(&link.a, steady_port, &steady_dir);
    let victim = nfcapd(&link.a, victim_port, &victim_dir);
    let log_path = dir.0.join("agent.log");
    let agent = Running(Some(
        Agent::in_ns(&link.a)
            .iface(&link.a_if)
            .port(PORT + 4)
            .args(["--ipfix-collector", &format!("127.0.0.1:{steady_port}")])
            .args(["--ipfix-collector", &format!("127.0.0.1:{victim_port}")])
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
    wait_healthy(&link.a, PORT + 4);
    let records = |collector: u16, result: &str| {
        let text = metrics(&link.a, PORT + 4).expect("/metrics");
        sample_sum(
            &text,
            "ntm_ipfix_records_total",
            &[
                &format!(r#"collector="127.0.0.1:{collector}""#),
                &format!(r#"result="{result}""#),
            ],
        )
    };
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();

    // A batch: 10 datagrams to a port of its own (a record of its own).
    let mut sent = BTreeMap::new();
    let mut next_port = 6000u16;
    let mut batch = || {
        let port = next_port;
        next_port += 1;
        sent.insert(port, udp_to_a(&link, port, 10));
        thread::sleep(Duration::from_millis(100));
        port
    };
    for _ in 0..5 {
        batch();
    }
    thread::sleep(Duration::from_secs(1));
    // SIGKILL: nfcapd writes nothing more, not even what it holds.
    victim.kill();
    let killed_at = batch();
    wait_for(
        "the records counted as failed",
        Duration::from_secs(10),
        || {
            batch();
            thread::sleep(Duration::from_millis(400));
            (records(victim_port, "failed") > 0).then_some(())
        },
    );
    for _ in 0..5 {
        batch();
    }
    // Started again on its port and folder.
    let victim = nfcapd(&link.a, victim_port, &victim_dir);
    wait_for(
        "the collector taking records again",
        Duration::from_secs(10),
        || {
            batch();
            thread::sleep(Duration::from_millis(300));
            log().contains("takes records again").then_some(())
        },
    );
    let back_from = batch();
    for _ in 0..9 {
        batch();
    }
    // Every interval exported (the counts settle), so that SIGTERM adds
    // nothing: (sent, failed, dropped) per collector.
    let counts = || {
        [steady_port, victim_port]
            .map(|collector| ["sent", "failed", "dropped"].map(|result| records(collector, result)))
    };
    let [steady_counts, victim_counts] =
        wait_for("the records to settle", Duration::from_secs(15), || {
            let before = counts();
            thread::sleep(Duration::from_secs(1));
            (before == counts()).then_some(before)
        });
    agent.stop();
    thread::sleep(Duration::from_millis(300));
    steady.stop();
    victim.stop();

    // The steady collector: every batch, every record ntm produced.
    assert_eq!(bytes_by_port(&steady_dir), sent, "the steady collector");
    let produced = nfdump(&steady_dir, "%da", None).len() as u64;
    assert_eq!(
        steady_counts,
        [produced, 0, 0],
        "the steady collector's (sent, failed, dropped) against the records it stored"
    );
    // The other: every batch after its return, exactly; every record
    // produced counted once, by what became of it.
    let got = bytes_by_port(&victim_dir);
    let after: BTreeMap<u16, u64> = sent.range(back_from..).map(|(p, b)| (*p, *b)).collect();
    assert_eq!(
        got.range(back_from..)
            .map(|(p, b)| (*p, *b))
            .collect::<BTreeMap<_, _>>(),
        after,
        "the batches after the collector's return\n{}",
        log()
    );
    let [victim_sent, failed, dropped] = victim_counts;
    assert_eq!(
        victim_sent + failed + dropped,
        produced,
        "the killed collector's records: sent {victim_sent} + failed {failed} + dropped {dropped}"
    );
    let stored = nfdump(&victim_dir, "%da", None).len() as u64;
    assert!(stored <= victim_sent, "{stored} stored, {victim_sent} sent");
    let lost: Vec<u16> = sent
        .iter()
        .filter(|(port, bytes)| got.get(port) != Some(bytes))
        .map(|(port, _)| *port)
        .collect();
    eprintln!(
        "killed collector: {produced} records produced, {stored} stored; lost {}: {failed} failed, {dropped} dropped, {} sent but not stored (sent while it was away, or unwritten when killed); batches lost: {lost:?} of {}..{} (killed before {killed_at}, back from {back_from})",
        produced - stored,
        victim_sent - stored,
        sent.keys().next().unwrap(),
        sent.keys().last().unwrap(),
    );
    assert_eq!(
        log().matches("ipfix: collector").count(),
        2,
        "the outage is logged once when it starts and once when it ends:\n{}",
        log()
    );
}
