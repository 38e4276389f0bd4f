//! `cargo xtask bench` (many flows): 64-byte frames per second through a
//! veth pair, sent with AF_PACKET from 1k, 64k and 1M distinct flows (each
//! frame's flow at random, see [`measure`]), with
//! nothing attached, an empty TC program, the minimal per-flow counter
//! (`ntm_bench_min_counter`: parse, PERCPU_HASH as big as ntm's table) and
//! ntm, measured in alternation in one run. With 1M flows both tables are
//! full after the first 65,536: the table-full path of every frame. ntm's
//! tables are drained every second, as the agent drains them. The
//! programs are measured after a first window of the same frames (see
//! [`measure_programs`]). Prints figures; asserts nothing.

#[path = "../tests/integration/kit/mod.rs"]
mod kit;

use std::{
    collections::HashSet,
    time::{Duration, Instant},
};

use aya::programs::{SchedClassifier, TcAttachType};
use kit::{Link, RawSender};

const WINDOW: Duration = Duration::from_millis(1500);
const MAX_FRAMES: u64 = 5_000_000;
const ROUNDS: usize = 3;
/// The agent's default `--drain-interval`.
const DRAIN_INTERVAL: Duration = Duration::from_secs(1);
const FLOWS: [u32; 3] = [1_000, 64_000, 1_000_000];

static BASELINE: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ntm-bench-baseline"));

/// A 64-byte Ethernet/IPv4/UDP frame to `mac`, the addresses set per flow.
fn template(mac: [u8; 6]) -> [u8; 64] {
    let mut frame = [0u8; 64];
    frame[..6].copy_from_slice(&mac);
    frame[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x42]);
    frame[12..14].copy_from_slice(&[0x08, 0x00]);
    // IPv4, 20-byte header, total length 50 (64 - 14), TTL 64, UDP.
    frame[14] = 0x45;
    frame[16..18].copy_from_slice(&50u16.to_be_bytes());
    frame[22] = 64;
    frame[23] = 17;
    // UDP 40000 -> 443 (a known service port: ntm keys the flow by it;
    // not a DNS or DHCP port, whose frames ntm would also hand over).
    frame[34..36].copy_from_slice(&40000u16.to_be_bytes());
    frame[36..38].copy_from_slice(&443u16.to_be_bytes());
    frame[38..40].copy_from_slice(&30u16.to_be_bytes());
    frame
}

/// Frames per second that arrived at a's interface while b sent frames of
/// `flows` distinct flows (198.18.0.0/16 to 198.19.0.0/16), each frame's
/// flow drawn at random, as fast as it could.
///
/// At random, not each flow in turn: a table inserts a flow where its free
/// list puts it, in the order flows first arrive. Sent in a fixed turn,
/// every later pass reads the counter's table in the order it lies in
/// memory, and the CPU's prefetchers hide most of its misses; ntm's tables,
/// which swap every second and were first filled through the flow cache,
/// lie in another order. That measured the layout, not the programs (at
/// 64k flows in turn the counter took three fifths of its time at random,
/// ntm five sixths: docs/performance.md). Traffic from many flows does not
/// come in a fixed turn.
fn measure(link: &Link, mac: [u8; 6], flows: u32) -> f64 {
    let before = link.a_stats().0.0;
    let started = Instant::now();
    link.b.run(|| {
        let sender = RawSender::new(&link.b_if);
        let mut frame = template(mac);
        let mut sent = 0u64;
        // xorshift64, from the same seed every window.
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        while started.elapsed() < WINDOW && sent < MAX_FRAMES {
            for _ in 0..256 {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let flow = (state % flows as u64) as u32;
                frame[26..30].copy_from_slice(&[198, 18, (flow >> 8) as u8, flow as u8]);
                frame[30..34].copy_from_slice(&[198, 19, (flow >> 24) as u8, (flow >> 16) as u8]);
                sender.send(&frame);
            }
            sent += 256;
        }
    });
    let elapsed = started.elapsed();
    std::thread::sleep(Duration::from_millis(100));
    (link.a_stats().0.0 - before) as f64 / elapsed.as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

#[derive(Clone, Copy)]
enum Config {
    Nothing,
    Empty,
    MinCounter,
    Ntm,
}

impl Config {
    const ALL: [Config; 4] = [
        Config::Nothing,
        Config::Empty,
        Config::MinCounter,
        Config::Ntm,
    ];
}

/// The programs loaded now whose names start with `prefix` (the kernel
/// keeps 15 bytes of a name), by id.
fn programs_named(prefix: &str) -> HashSet<u32> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|info| {
            info.name_as_str()
                .is_some_and(|name| name.starts_with(prefix))
        })
        .map(|info| info.id())
        .collect()
}

/// The run time and run count the kernel kept (BPF_ENABLE_STATS) for the
/// programs `ids`: a program's own time per frame, its tail calls
/// included, which the frame rate (the sender, the veth and the scheduler
/// too) blurs.
fn program_stats(ids: &HashSet<u32>) -> (u64, u64) {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|info| ids.contains(&info.id()))
        .fold((0, 0), |(time, count), info| {
            (
                time + info.run_time().as_nanos() as u64,
                count + info.run_count(),
            )
        })
}

/// [`measure`], and the mean ns per frame of the programs `ids` (the ones
/// the configuration attached) while it ran, after a first window of the
/// same frames: the counter's table holds the flows by then, and ntm has
/// drained and judged its flow cache (which it turns off while nearly
/// every frame misses it, as with 64k flows taken in turn).
fn measure_programs(
    link: &Link,
    mac: [u8; 6],
    flows: u32,
    ids: &HashSet<u32>,
) -> (f64, Option<f64>) {
    measure(link, mac, flows);
    let (time, count) = program_stats(ids);
    let fps = measure(link, mac, flows);
    let (time_after, count_after) = program_stats(ids);
    let runs = count_after.saturating_sub(count);
    let ns = (runs > 0).then(|| time_after.saturating_sub(time) as f64 / runs as f64);
    (fps, ns)
}

/// Runs one measurement with `config` attached at a's TC ingress: frames
/// per second, and the program's ns per frame.
fn run(link: &Link, mac: [u8; 6], flows: u32, config: Config) -> (f64, Option<f64>) {
    link.a.run(|| match config {
        Config::Nothing => (measure(link, mac, flows), None),
        Config::Empty | Config::MinCounter => {
            let name = if matches!(config, Config::Empty) {
                "ntm_bench_empty"
            } else {
                "ntm_bench_min_counter"
            };
            // The kernel keeps 15 bytes of a program's name; other agents'
            // programs of that name are not this run's.
            let before = programs_named(&name[..15]);
            // A fresh object: the counter's table starts empty.
            let mut object = aya::Ebpf::load(BASELINE).expect("baseline object");
            let program: &mut SchedClassifier =
                object.program_mut(name).unwrap().try_into().unwrap();
            program.load().unwrap();
            program.attach(&link.a_if, TcAttachType::Ingress).unwrap();
            let ours = &programs_named(&name[..15]) - &before;
            measure_programs(link, mac, flows, &ours)
        }
        Config::Ntm => {
            let before = programs_named("ntm_tc_ingress_");
            let mut agent = kit::start_kernel(&["-i", link.a_if.as_str()]);
            let ours = &programs_named("ntm_tc_ingress_") - &before;
            // Drained every interval as the agent drains it: the swaps,
            // what the tables keep from turn to turn, and the flow cache's
            // judgement are part of what a frame costs.
            let done = std::sync::atomic::AtomicBool::new(false);
            let measured = std::thread::scope(|scope| {
                let drains = scope.spawn(|| {
                    let mut drains = 0;
                    while !done.load(std::sync::atomic::Ordering::Relaxed) {
                        std::thread::sleep(DRAIN_INTERVAL);
                        agent.drain().expect("drain");
                        drains += 1;
                    }
                    drains
                });
                let measured = measure_programs(link, mac, flows, &ours);
                done.store(true, std::sync::atomic::Ordering::Relaxed);
                assert!(drains.join().expect("drains") > 0);
                measured
            });
            let _ = agent.shutdown();
            measured
        }
    })
}

fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("the many-flows benchmark creates namespaces and loads eBPF: run it as root");
        std::process::exit(1);
    }
    let link = Link::new("bnfl");
    let mac_text = link
        .a
        .exec(&["cat", &format!("/sys/class/net/{}/address", link.a_if)]);
    let mut mac = [0u8; 6];
    for (byte, hex) in mac.iter_mut().zip(mac_text.trim().split(':')) {
        *byte = u8::from_str_radix(hex, 16).unwrap();
    }
    // Kept while the run lasts: the kernel times every program run.
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("BPF_ENABLE_STATS");
    println!();
    println!(
        "many flows: 64-byte frames per second through a veth (AF_PACKET sender), median of {ROUNDS}, alternating"
    );
    println!(
        "{:<10} {:>12} {:>12} {:>12} {:>12}   {:>9} {:>9} {:>11}",
        "flows", "nothing", "empty TC", "min counter", "ntm", "min cost", "ntm cost", "ntm vs min"
    );
    let mut program_rows = Vec::new();
    for flows in FLOWS {
        let mut rates = vec![Vec::new(); Config::ALL.len()];
        let mut times = vec![Vec::new(); Config::ALL.len()];
        for _ in 0..ROUNDS {
            for (i, config) in Config::ALL.iter().enumerate() {
                let (fps, ns) = run(&link, mac, flows, *config);
                rates[i].push(fps);
                times[i].extend(ns);
            }
        }
        let m: Vec<f64> = rates.into_iter().map(median).collect();
        // Cost: the share of the frame rate lost against nothing attached.
        let cost = |fps: f64| 100.0 * (1.0 - fps / m[0]);
        println!(
            "{:<10} {:>12.0} {:>12.0} {:>12.0} {:>12.0}   {:>8.1}% {:>8.1}% {:>10.2}x",
            flows,
            m[0],
            m[1],
            m[2],
            m[3],
            cost(m[2]),
            cost(m[3]),
            m[2] / m[3]
        );
        let ns: Vec<f64> = times[1..].iter().cloned().map(median).collect();
        program_rows.push((flows, ns));
    }
    println!("(ntm vs min: the minimal counter's frame rate over ntm's; 1.00x: same cost)");
    println!();
    println!(
        "the programs' own time in the same runs: ns per frame as the kernel timed them (BPF_ENABLE_STATS, tail calls included), median of {ROUNDS}"
    );
    println!(
        "{:<10} {:>9} {:>9} {:>9}   {:>8} {:>8} {:>11}",
        "flows", "empty TC", "min", "ntm", "min net", "ntm net", "ntm/min net"
    );
    for (flows, ns) in program_rows {
        let (empty, min, ntm) = (ns[0], ns[1], ns[2]);
        println!(
            "{:<10} {:>9.1} {:>9.1} {:>9.1}   {:>8.1} {:>8.1} {:>10.2}x",
            flows,
            empty,
            min,
            ntm,
            min - empty,
            ntm - empty,
            (ntm - empty) / (min - empty)
        );
    }
    println!(
        "(net: minus the empty program's time; the timing itself adds the same to every program)"
    );
}
