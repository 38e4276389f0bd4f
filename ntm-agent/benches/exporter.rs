//! `cargo xtask bench` (exporter part): scrape time and agent memory at
//! 1k/10k/100k series (each scrape next to ntm's series encoder alone),
//! ntm's encoders (traffic series, host_info) next to the prometheus
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
    sync::Arc,
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
    model::net::format_mac,
    outputs::{
        host_info::{HostInfo, HostRows},
        series::TrafficSeries,
        sink::Host,
    },
};
use ntm_common::{Counters, test_util::KeyBuilder};

const SERIES_ENV: &str = "NTM_BENCH_SERIES";

/// A figure of this process from /proc/self/status, in MiB (`VmRSS`: held
/// now; `VmHWM`: the most it held).
fn status_mib(field: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// The label values of the `i`th of the bench's flows, as the pipeline
/// labels them (`--numeric`, `--local-net 10.0.0.0/8`): one local host each,
/// one server, in the default label order.
const LABELS: [&str; 6] = ["src", "dst", "service", "proto", "direction", "iface"];
fn values(i: u32) -> [String; 6] {
    [
        std::net::Ipv4Addr::from(0x0a00_0000 | i).to_string(),
        "93.184.216.34".to_string(),
        "https".to_string(),
        "tcp".to_string(),
        "outbound".to_string(),
        "eth0".to_string(),
    ]
}

/// The traffic series of [`values`] in ntm's own store.
fn traffic_series(n: u32) -> TrafficSeries {
    let now = Instant::now();
    let mut series = TrafficSeries::new("ntm", LABELS.to_vec());
    for i in 0..n {
        let v: Vec<Arc<str>> = values(i).into_iter().map(Arc::from).collect();
        series.add(&v, 1500, 1, now);
    }
    series
}

/// Runs in the child: an agent's pipeline with `n` series (and as many
/// hosts), its RSS, then its whole `/metrics` scraped 5 times, each time
/// next to the same traffic series encoded alone (the baseline: ntm's
/// series encoder, without the other families).
fn scrape_child(n: usize) {
    // As `agent::run` does first.
    ntm_agent::sys::process::return_large_allocations();
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
    // An agent lets a drain go once it has gone through the pipeline.
    drop(drained);
    let exposition = pipeline.exposition();
    let mut size = 0;
    let mut scrapes = Vec::new();
    let mut cpu = Vec::new();
    for _ in 0..5 {
        let (started, cpu_started) = (Instant::now(), thread_cpu());
        size = exposition.encode().unwrap().len();
        scrapes.push(started.elapsed());
        cpu.push(thread_cpu() - cpu_started);
    }
    // The agent's memory, before the baseline's own series are built.
    let (rss, peak) = (status_mib("VmRSS:"), status_mib("VmHWM:"));
    let alone = traffic_series(n as u32);
    let mut encoder = Vec::new();
    for _ in 0..5 {
        let (started, cpu_started) = (Instant::now(), thread_cpu());
        size = size.max(exposition.encode().unwrap().len());
        scrapes.push(started.elapsed());
        cpu.push(thread_cpu() - cpu_started);
        let started = Instant::now();
        let mut out = String::new();
        alone.encode(&mut out);
        std::hint::black_box(out);
        encoder.push(started.elapsed());
    }
    println!(
        "{n} {} {} {rss:.1} {peak:.1} {size} {}",
        median(scrapes).as_secs_f64(),
        median(encoder).as_secs_f64(),
        median(cpu).as_secs_f64(),
    );
}

/// This thread's CPU time: unlike the wall time, hardly moved by other
/// work on the machine.
fn thread_cpu() -> Duration {
    // SAFETY: an all-zero timespec is valid; clock_gettime writes only it.
    let mut now: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: a valid clock id and a pointer to a live timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
}

fn scrape_figures() {
    println!(
        "\nscrape: /metrics of an agent with N series and N hosts (host_info), median of 10 (wall, and the CPU time of the thread that wrote it), next to the same traffic series encoded alone (median of 5, in between); agent RSS after the scrapes and its peak; one process per size"
    );
    println!(
        "{:>8} {:>10} {:>10} {:>14} {:>7} {:>9} {:>9} {:>12}",
        "series", "scrape", "CPU", "encoder alone", "ratio", "RSS MiB", "peak MiB", "body bytes"
    );
    for n in [1_000usize, 10_000, 100_000] {
        let out = Command::new(std::env::current_exe().unwrap())
            .env(SERIES_ENV, n.to_string())
            .output()
            .expect("child");
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text.lines().last().unwrap_or("");
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() == 7 {
            let scrape: f64 = f[1].parse().unwrap_or(0.0);
            let alone: f64 = f[2].parse().unwrap_or(0.0);
            let cpu: f64 = f[6].parse().unwrap_or(0.0);
            println!(
                "{:>8} {:>8.1}ms {:>8.1}ms {:>12.1}ms {:>6.2}x {:>9} {:>9} {:>12}",
                f[0],
                scrape * 1e3,
                cpu * 1e3,
                alone * 1e3,
                scrape / alone,
                f[3],
                f[4],
                f[5]
            );
        } else {
            println!("{n:>8} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
}

/// Median of 5 runs of `encode`.
fn time(encode: &dyn Fn() -> usize) -> Duration {
    let mut times = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        std::hint::black_box(encode());
        times.push(started.elapsed());
    }
    median(times)
}

/// The two families with a series per flow or per host, written by ntm's
/// own encoders and by the `prometheus` crate's (a `*Vec` metric, gathered
/// and written by its `TextEncoder`), same series, same run: the reason
/// `outputs/series.rs` and `outputs/host_info.rs` exist, measured.
fn encoder_figures() {
    println!(
        "\nencoder: /metrics text of N traffic series (both counters) and of N hosts' host_info, ntm's encoders vs the prometheus crate's, median of 5"
    );
    println!(
        "{:>8} {:>14} {:>12} {:>8} {:>14} {:>12} {:>8}",
        "series", "traffic ntm", "prometheus", "ratio", "host_info ntm", "prometheus", "ratio"
    );
    for n in [1_000u32, 10_000, 100_000] {
        let ours = traffic_series(n);
        let registry = prometheus::Registry::new();
        let counter = |name: &str| {
            let c = prometheus::IntCounterVec::new(prometheus::Opts::new(name, "help"), &LABELS)
                .expect("counter");
            registry.register(Box::new(c.clone())).expect("register");
            c
        };
        let (bytes, packets) = (counter("ntm_bytes_total"), counter("ntm_packets_total"));
        for i in 0..n {
            let v = values(i);
            let labels: Vec<&str> = v.iter().map(String::as_str).collect();
            bytes.with_label_values(&labels).inc_by(1500);
            packets.with_label_values(&labels).inc_by(1);
        }
        let traffic = time(&|| {
            let mut out = String::new();
            ours.encode(&mut out);
            out.len()
        });
        let traffic_theirs = time(&|| {
            let mut out = String::new();
            prometheus::TextEncoder::new()
                .encode_utf8(&registry.gather(), &mut out)
                .expect("encode");
            out.len()
        });
        drop((ours, registry, bytes, packets));

        // The bench's hosts: n local ones, with a MAC, and the server.
        let hosts: Vec<Host> = (0..n)
            .map(|i| Host {
                ip: std::net::Ipv4Addr::from(0x0a00_0000 | i).into(),
                label: Arc::from(values(i)[0].as_str()),
                source: "address",
                mac: Some([2, 0, 0, 0, (i >> 8) as u8, i as u8]),
            })
            .chain(std::iter::once(Host {
                ip: [93, 184, 216, 34].into(),
                label: Arc::from("93.184.216.34"),
                source: "address",
                mac: None,
            }))
            .collect();
        let mut info = HostInfo::new("ntm");
        info.set(HostRows::new(&hosts, usize::MAX));
        let registry = prometheus::Registry::new();
        let gauge = prometheus::IntGaugeVec::new(
            prometheus::Opts::new("ntm_host_info", "help"),
            &["address", "name", "mac", "source"],
        )
        .expect("gauge");
        registry
            .register(Box::new(gauge.clone()))
            .expect("register");
        for host in &hosts {
            let mac = host.mac.map(format_mac).unwrap_or_default();
            gauge
                .with_label_values(&[&host.ip.to_string(), &*host.label, &mac, host.source])
                .set(1);
        }
        let host_info = time(&|| {
            let mut out = String::new();
            info.encode(&mut out);
            out.len()
        });
        let host_info_theirs = time(&|| {
            let mut out = String::new();
            prometheus::TextEncoder::new()
                .encode_utf8(&registry.gather(), &mut out)
                .expect("encode");
            out.len()
        });
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        println!(
            "{:>8} {:>12.2}ms {:>10.2}ms {:>7.2}x {:>12.2}ms {:>10.2}ms {:>7.2}x",
            n,
            ms(traffic),
            ms(traffic_theirs),
            traffic_theirs.as_secs_f64() / traffic.as_secs_f64(),
            ms(host_info),
            ms(host_info_theirs),
            host_info_theirs.as_secs_f64() / host_info.as_secs_f64(),
        );
    }
}

fn drain_figures() {
    println!(
        "\ndrain: swap + read + clear of a table holding N flows (filled by the program); emptied (every entry deleted as read) / kept (the flows zeroed for the table's next turn, up to {} flows)",
        ntm_agent::kernel::drain::KEEP_AT_MOST
    );
    println!(
        "{:>9} {:>8} {:>10} {:>10} {:>10}",
        "entries", "table", "swap", "read", "total"
    );
    for (n, keep) in [10_000u32, 100_000, 1_000_000]
        .into_iter()
        .flat_map(|n| [(n, false), (n, true)])
    {
        let options = DatapathOptions {
            flow_table_entries: n,
            ..Default::default()
        };
        let (mut datapath, mut tables) = Datapath::load(&options, &[], None).expect("load");
        tables.set_keep_flows(keep);
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
            "{:>9} {:>8} {:>8.1}ms {:>8.1}ms {:>8.1}ms",
            n,
            if keep { "kept" } else { "emptied" },
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
