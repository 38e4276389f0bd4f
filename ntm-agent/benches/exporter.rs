//! `cargo xtask bench` (exporter part): scrape time and agent memory at
//! 1k/10k/100k series, ntm's series encoder next to the prometheus
//! crate's, and drain time for 10k/100k/1M flow-table entries.
//! Prints figures; asserts nothing.
//!
//! Each scrape measurement runs in a child process of its own so that its
//! resident memory is that of an agent with that many series, not the sum of
//! all sizes.

#[path = "../tests/integration/kit/frames.rs"]
#[allow(dead_code)]
mod frames;

use std::{
    process::Command,
    time::{Duration, Instant},
};

use aya::programs::{TestRun, TestRunOptions};
use clap::Parser as _;
use frames::*;
use ntm_agent::{
    agent::pipeline::Pipeline,
    config::Config,
    kernel::{
        drain::Drained,
        load::{Datapath, DatapathOptions},
    },
    outputs::series::TrafficSeries,
};
use ntm_common::{Counters, test_util::KeyBuilder};

const SERIES_ENV: &str = "NTM_BENCH_SERIES";

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Runs in the child: an agent's metrics with `n` series, scraped 5 times.
fn scrape_child(n: usize) {
    let max_series = (n + 1).to_string();
    // --no-history: a bench's made-up traffic stays out of this machine's
    // history (/var/lib/ntm).
    let config = Config::try_parse_from([
        "ntm-agent",
        "--no-history",
        "--numeric",
        "--local-net",
        "10.0.0.0/8",
        "--max-series",
        &max_series,
    ])
    .expect("flags");
    let services = config.services().expect("services");
    // The loaded kernel side, as in a running agent.
    let (_datapath, _tables) = Datapath::load(
        &config.kernel().expect("kernel options").datapath,
        &services.known_port_bitmap(),
        None,
    )
    .expect("load (run as root)");
    let mut pipeline = Pipeline::new(config.pipeline(), services).expect("pipeline");
    let flows = (0..n as u32)
        .map(|i| {
            (
                KeyBuilder::v4(0x0a00_0000 | i, [93, 184, 216, 34])
                    .tcp(443)
                    .ifindex(1)
                    .build(),
                Counters {
                    bytes: 1500,
                    packets: 1,
                },
            )
        })
        .collect();
    let drained = Drained {
        flows,
        ..Default::default()
    };
    let interfaces = std::collections::HashMap::from([(1, "eth0".to_string())]);
    pipeline.process(&drained, &interfaces, Instant::now());
    let exposition = pipeline.exposition();
    let mut times = Vec::new();
    let mut size = 0;
    for _ in 0..5 {
        let started = Instant::now();
        size = exposition.encode().unwrap().len();
        times.push(started.elapsed());
    }
    println!(
        "{n} {} {:.1} {}",
        median(times).as_secs_f64(),
        rss_mib(),
        size
    );
}

fn scrape_figures() {
    println!("\nscrape: /metrics encoding time (median of 5) and agent RSS, one process per size");
    println!(
        "{:>8} {:>12} {:>10} {:>12}",
        "series", "scrape", "RSS MiB", "body bytes"
    );
    for n in [1_000usize, 10_000, 100_000] {
        let out = Command::new(std::env::current_exe().unwrap())
            .env(SERIES_ENV, n.to_string())
            .output()
            .expect("child");
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text.lines().last().unwrap_or("");
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() == 4 {
            let secs: f64 = f[1].parse().unwrap_or(0.0);
            println!("{:>8} {:>10.3} s {:>10} {:>12}", f[0], secs, f[2], f[3]);
        } else {
            println!("{n:>8} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
}

/// The traffic series encoded by ntm's own encoder and by the `prometheus`
/// crate's (IntCounterVec + TextEncoder), same series, same run: the reason
/// `outputs/series.rs` exists, measured.
fn encoder_figures() {
    println!(
        "\nencoder: /metrics text of N traffic series (both counters), ntm's encoder vs the prometheus crate's, median of 5"
    );
    println!(
        "{:>8} {:>12} {:>12} {:>8}",
        "series", "ntm", "prometheus", "ratio"
    );
    let names = ["src", "dst", "service", "proto", "direction", "iface"];
    for n in [1_000u32, 10_000, 100_000] {
        let values: Vec<Vec<String>> = (0..n)
            .map(|i| {
                vec![
                    std::net::Ipv4Addr::from(0x0a00_0000 | i).to_string(),
                    "93.184.216.34".to_string(),
                    "https".to_string(),
                    "tcp".to_string(),
                    "outbound".to_string(),
                    "eth0".to_string(),
                ]
            })
            .collect();
        let now = Instant::now();
        let mut ours = TrafficSeries::new("ntm", names.to_vec());
        for v in &values {
            ours.add(v, 1500, 1, now);
        }
        let registry = prometheus::Registry::new();
        let counter = |name: &str| {
            let c = prometheus::IntCounterVec::new(prometheus::Opts::new(name, "help"), &names)
                .expect("counter");
            registry.register(Box::new(c.clone())).expect("register");
            c
        };
        let (bytes, packets) = (counter("ntm_bytes_total"), counter("ntm_packets_total"));
        for v in &values {
            let labels: Vec<&str> = v.iter().map(String::as_str).collect();
            bytes.with_label_values(&labels).inc_by(1500);
            packets.with_label_values(&labels).inc_by(1);
        }
        let time = |encode: &dyn Fn() -> usize| {
            let mut times = Vec::new();
            for _ in 0..5 {
                let started = Instant::now();
                std::hint::black_box(encode());
                times.push(started.elapsed());
            }
            median(times)
        };
        let ntm = time(&|| {
            let mut out = String::new();
            ours.encode(&mut out);
            out.len()
        });
        let theirs = time(&|| {
            let mut out = String::new();
            prometheus::TextEncoder::new()
                .encode_utf8(&registry.gather(), &mut out)
                .expect("encode");
            out.len()
        });
        println!(
            "{:>8} {:>10.2}ms {:>10.2}ms {:>7.2}x",
            n,
            ntm.as_secs_f64() * 1e3,
            theirs.as_secs_f64() * 1e3,
            theirs.as_secs_f64() / ntm.as_secs_f64()
        );
    }
}

fn drain_figures() {
    println!("\ndrain: swap + read + clear of a table holding N flows (filled by the program)");
    println!(
        "{:>9} {:>10} {:>10} {:>10}",
        "entries", "swap", "read", "total"
    );
    for n in [10_000u32, 100_000, 1_000_000] {
        let options = DatapathOptions {
            flow_table_entries: n,
            ..Default::default()
        };
        let (mut datapath, mut tables) = Datapath::load(&options, &[], None).expect("load");
        let program = datapath.tc_program(TC_INGRESS_ETH).unwrap();
        let mut frame = eth(ETH_IPV4, &[], &ipv4(17, &[], 0, &udp(40_000, 53, &[0; 16])));
        // Source address at byte 14 + 12 of the frame: one flow per address.
        for i in 0..n {
            frame[26..30].copy_from_slice(&(0x0a00_0000 | i).to_be_bytes());
            let mut opts = TestRunOptions::new();
            opts.data_in = Some(&frame);
            program.test_run(opts).expect("test_run");
        }
        let drained = tables.drain().expect("drain");
        assert_eq!(drained.flows.len() as u32, n, "every flow drained");
        println!(
            "{:>9} {:>8.1}ms {:>8.1}ms {:>8.1}ms",
            n,
            drained.swap_time.as_secs_f64() * 1e3,
            drained.read_time.as_secs_f64() * 1e3,
            (drained.swap_time + drained.read_time).as_secs_f64() * 1e3
        );
    }
}

fn main() {
    if let Ok(n) = std::env::var(SERIES_ENV) {
        scrape_child(n.parse().expect("series count"));
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("the exporter benchmark loads eBPF programs: run it as root");
        std::process::exit(1);
    }
    scrape_figures();
    encoder_figures();
    drain_figures();
}
