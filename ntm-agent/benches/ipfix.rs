//! `cargo xtask bench` (flow export part): the agent's CPU per flow to
//! export every flow as IPFIX (add up an interval, encode, send over UDP
//! to a socket on loopback), side by side with the drain of the same
//! number of flows from a kernel table (swap, read, clear), at 100k and 1M
//! flows per interval; and the softflowd case: 1,000,000 64-byte UDP
//! frames over 60,000 flows, as fast as an AF_PACKET sender goes, through
//! a veth into an agent exporting to nfcapd, and what reaches nfcapd.
//! Prints figures; asserts nothing.

#[path = "../tests/integration/kit/mod.rs"]
mod kit;

use std::{
    collections::HashMap,
    net::UdpSocket,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use aya::programs::{TestRun, TestRunOptions};
use kit::{
    Agent, Link, RawSender,
    frames::*,
    scrape::{Guard, TempDir, metrics, sample_sum, wait_for, wait_healthy},
};
use ntm_agent::{
    kernel::{
        drain::Drained,
        load::{Datapath, DatapathOptions},
    },
    outputs::{
        ipfix::{
            IpfixOptions, IpfixSink,
            collector::{CollectorSpec, ExportSettings},
        },
        sink::Sink,
    },
};
use prometheus::IntCounterVec;

/// This process's CPU time (user and system, every thread).
fn cpu_time() -> Duration {
    // SAFETY: getrusage writes into the zeroed struct we hand it.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// A kernel table holding `n` flows (filled by the program), drained:
/// the drain's wall and CPU time, and what it read.
fn drain(n: u32) -> (Duration, Duration, Drained) {
    let options = DatapathOptions {
        flow_table_entries: n,
        ..Default::default()
    };
    let (mut datapath, mut tables) = Datapath::load(&options, &[], None).expect("load");
    let program = datapath.tc_program(TC_INGRESS_ETH).unwrap();
    let mut frame = eth(ETH_IPV4, &[], &ipv4(17, &[], 0, &udp(40_000, 53, &[0; 16])));
    for i in 0..n {
        // Source and destination addresses (bytes 26 and 30) in
        // 198.18.0.0/15: one flow per pair.
        frame[26..30].copy_from_slice(&(0xc612_0000 | (i & 0xffff)).to_be_bytes());
        frame[30..34].copy_from_slice(&(0xc613_0000 | (i >> 16)).to_be_bytes());
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(&frame);
        program.test_run(opts).expect("test_run");
    }
    let (wall, cpu) = (Instant::now(), cpu_time());
    let drained = tables.drain().expect("drain");
    let spent = (wall.elapsed(), cpu_time() - cpu);
    assert_eq!(drained.flows.len() as u32, n, "every flow drained");
    (spent.0, spent.1, drained)
}

/// Every flow of `drained` exported to a UDP socket on loopback that
/// reads nothing (the kernel drops what overflows its buffer: no
/// collector's CPU is counted): the wall and CPU time from the drain's
/// hand-over to the last message sent, and the messages sent.
fn export(drained: &Drained) -> (Duration, Duration, u64) {
    let sink_socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let address = sink_socket.local_addr().unwrap().to_string();
    let records = IntCounterVec::new(
        prometheus::Opts::new("records", "h"),
        &["collector", "result"],
    )
    .unwrap();
    let options = IpfixOptions {
        collectors: vec![address.parse::<CollectorSpec>().unwrap()],
        interval: Duration::from_secs(3600),
        settings: ExportSettings {
            domain: 1,
            max_message: 1400,
            template_interval: Duration::from_secs(30),
        },
    };
    let mut sink = IpfixSink::start(&options, records.clone(), Instant::now());
    let names = HashMap::from([(1, "eth0".to_string())]);
    let (wall, cpu) = (Instant::now(), cpu_time());
    sink.raw(drained, &names, Instant::now());
    // Export the interval, wait for the collector's thread to send it.
    sink.finish();
    let spent = (wall.elapsed(), cpu_time() - cpu);
    let sent = records.with_label_values(&[&address, "sent"]).get();
    let failed = records.with_label_values(&[&address, "failed"]).get();
    let dropped = records.with_label_values(&[&address, "dropped"]).get();
    assert_eq!(
        (failed, dropped),
        (0, 0),
        "records failed and dropped ({} flows drained)",
        drained.flows.len()
    );
    drop(sink_socket);
    (spent.0, spent.1, sent)
}

/// The softflowd case: `FRAMES` 64-byte UDP frames over `FLOWS` flows from
/// b, as fast as an AF_PACKET socket sends them, into an agent on a that
/// exports to nfcapd on a's loopback: frames sent, arrived at a's
/// interface, counted in `/metrics`, and stored by nfcapd.
fn softflowd_case() {
    const FRAMES: u64 = 1_000_000;
    const FLOWS: u64 = 60_000;
    const ENDPOINT: u16 = 9479;
    const COLLECTOR: u16 = 9998;
    let link = Link::new("bipfix");
    let dir = TempDir::new("bipfix");
    let flows_dir = dir.0.join("flows");
    std::fs::create_dir_all(&flows_dir).unwrap();
    let mut collector = Guard(
        Command::new("ip")
            .args(["netns", "exec", &link.a.name, "nfcapd"])
            .args(["-b", "127.0.0.1", "-p", &COLLECTOR.to_string()])
            .arg("-w")
            .arg(&flows_dir)
            .args(["-t", "60", "-B", "4194304"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nfcapd (Debian's nfdump)"),
    );
    let mut agent = Guard(
        Agent::in_ns(&link.a)
            .iface(&link.a_if)
            .port(ENDPOINT)
            .args(["--ipfix-collector", &format!("127.0.0.1:{COLLECTOR}")])
            // Intervals end while the frames come: the timer's exports, as
            // in steady operation, not only SIGTERM's.
            .args(["--ipfix-interval", "1s"])
            .spawn_child(),
    );
    wait_healthy(&link.a, ENDPOINT);

    // 64 bytes: Ethernet to a's address, IPv4 (50 bytes), UDP to 443.
    let mut frame = eth(
        ETH_IPV4,
        &[],
        &ipv4(17, &[], 0, &udp(40_000, 443, &[0; 22])),
    );
    frame[..12].copy_from_slice(&[2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2]);
    assert_eq!(frame.len(), 64);
    let arrived_before = link.a_stats().0.0;
    let started = Instant::now();
    let sent = link.b.run(|| {
        let sender = RawSender::new(&link.b_if);
        let mut sent = 0u64;
        for i in 0..FRAMES {
            if started.elapsed() > Duration::from_secs(30) {
                break;
            }
            // Each flow in turn, far from the last: 198.18.x.y to 198.19.0.z.
            let flow = (i * 7_919) % FLOWS;
            frame[26..30].copy_from_slice(&[198, 18, (flow >> 8) as u8, flow as u8]);
            frame[30..34].copy_from_slice(&[198, 19, 0, (flow % 7) as u8]);
            if sender.send(&frame) {
                sent += 1;
            }
        }
        sent
    });
    let elapsed = started.elapsed();
    let counted = wait_for("/metrics to settle", Duration::from_secs(30), || {
        let packets = |text: &str| sample_sum(text, "ntm_packets_total", &[r#"proto="udp""#]);
        let before = packets(&metrics(&link.a, ENDPOINT)?);
        std::thread::sleep(Duration::from_secs(1));
        let text = metrics(&link.a, ENDPOINT)?;
        (before == packets(&text)).then_some(text)
    });
    let arrived = link.a_stats().0.0 - arrived_before;
    let packets = sample_sum(&counted, "ntm_packets_total", &[r#"proto="udp""#]);
    let series = counted
        .lines()
        .filter(|l| l.starts_with("ntm_packets_total{") && l.contains(r#"proto="udp""#))
        .count();
    // SIGTERM: the agent exports the interval; then nfcapd writes its file.
    let stop = |guard: &mut Guard| {
        // SAFETY: kill(2) on our own child's pid, not yet reaped.
        unsafe { libc::kill(guard.0.id() as i32, libc::SIGTERM) };
        let _ = guard.0.wait();
    };
    let exported = Instant::now();
    stop(&mut agent);
    let export_time = exported.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    stop(&mut collector);
    let out = Command::new("nfdump")
        .arg("-R")
        .arg(&flows_dir)
        .args(["-q", "-N", "-o", "fmt:%pkt"])
        .output()
        .expect("nfdump");
    let stored: Vec<u64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    let at_collector: u64 = stored.iter().sum();
    let records = |result: &str| {
        sample_sum(
            &counted,
            "ntm_ipfix_records_total",
            &[&format!(r#"result="{result}""#)],
        )
    };
    println!();
    println!(
        "the softflowd case: {FRAMES} 64-byte UDP frames over {FLOWS} flows (AF_PACKET, as fast as it sends), exported to nfcapd"
    );
    println!(
        "  sent {sent} frames in {:.2} s ({:.0} frames/s); arrived at a's veth {arrived}",
        elapsed.as_secs_f64(),
        sent as f64 / elapsed.as_secs_f64()
    );
    println!("  /metrics: {packets} packets in {series} series (--max-series folds the rest)");
    println!(
        "  nfcapd: {at_collector} packets in {} records (agent's SIGTERM export: {:.0} ms; before it, records sent {}, failed {}, dropped {})",
        stored.len(),
        export_time.as_secs_f64() * 1e3,
        records("sent"),
        records("failed"),
        records("dropped"),
    );
    println!(
        "  sent = at the collector: {} (arrived = /metrics = at the collector: {})",
        if sent == at_collector { "yes" } else { "NO" },
        if arrived == packets && packets == at_collector {
            "yes"
        } else {
            "NO"
        }
    );
}

fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("the flow export benchmark loads eBPF programs: run it as root");
        std::process::exit(1);
    }
    println!(
        "\nflow export (IPFIX over UDP to loopback) next to the drain of as many flows, CPU per flow"
    );
    println!(
        "{:>9} {:>12} {:>12} {:>12} {:>12} {:>8}",
        "flows", "drain cpu", "export cpu", "drain/flow", "export/flow", "ratio"
    );
    for n in [100_000u32, 1_000_000] {
        let (_, drain_cpu, drained) = drain(n);
        let (_, export_cpu, sent) = export(&drained);
        assert_eq!(sent, n as u64, "every record sent");
        let per = |d: Duration| d.as_secs_f64() * 1e9 / n as f64;
        println!(
            "{:>9} {:>10.1}ms {:>10.1}ms {:>10.0}ns {:>10.0}ns {:>7.2}x",
            n,
            drain_cpu.as_secs_f64() * 1e3,
            export_cpu.as_secs_f64() * 1e3,
            per(drain_cpu),
            per(export_cpu),
            export_cpu.as_secs_f64() / drain_cpu.as_secs_f64()
        );
    }
    softflowd_case();
}
