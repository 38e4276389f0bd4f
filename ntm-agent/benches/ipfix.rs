//! `cargo xtask bench` (flow export part): the agent's CPU per flow to
//! export every flow as IPFIX (add up an interval, encode, send over UDP
//! to a socket on loopback), side by side with the drain of the same
//! number of flows from a kernel table (swap, read, clear), at 100k and 1M
//! flows per interval. Prints figures; asserts nothing.

#[path = "../tests/integration/kit/frames.rs"]
#[allow(dead_code)]
mod frames;

use std::{
    collections::HashMap,
    net::UdpSocket,
    time::{Duration, Instant},
};

use aya::programs::{TestRun, TestRunOptions};
use frames::*;
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
}
