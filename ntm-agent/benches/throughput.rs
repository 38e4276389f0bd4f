//! `cargo xtask bench` (end-to-end part): packets per second through a veth
//! pair between two namespaces, without ntm, with ntm's TC programs and
//! with its XDP program, measured in alternation in one run. Prints figures;
//! asserts nothing.

#[path = "../tests/integration/kit/mod.rs"]
mod kit;

use std::{
    net::UdpSocket,
    time::{Duration, Instant},
};

use kit::{A4, Link};

/// How long each measurement sends.
const WINDOW: Duration = Duration::from_millis(1500);
/// Upper bound on datagrams per measurement.
const MAX_DATAGRAMS: u64 = 5_000_000;
const ROUNDS: usize = 5;

static BASELINE: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ntm-bench-baseline"));

/// Frames per second that arrived at a's interface while b sent 18-byte
/// datagrams (64-byte frames) as fast as it could.
fn measure(link: &Link) -> f64 {
    let before = link.a_stats().0.0;
    let started = Instant::now();
    link.b.run(|| {
        let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
        let payload = [0u8; 18];
        let mut sent = 0u64;
        while started.elapsed() < WINDOW && sent < MAX_DATAGRAMS {
            for _ in 0..256 {
                let _ = socket.send_to(&payload, (A4, 6000));
            }
            sent += 256;
        }
    });
    let elapsed = started.elapsed();
    std::thread::sleep(Duration::from_millis(100));
    let arrived = link.a_stats().0.0 - before;
    arrived as f64 / elapsed.as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("the throughput benchmark creates namespaces and loads eBPF: run it as root");
        std::process::exit(1);
    }
    let link = Link::new("bench");
    // A socket that takes the datagrams (its queue may overflow; the frames
    // have crossed the interface by then, which is what is measured).
    let _sink = link.a.run(|| UdpSocket::bind((A4, 6000)).unwrap());
    // None: nothing attached; Some(["empty-xdp"]): the empty XDP program;
    // Some(args): ntm with those arguments.
    let configs: [(&str, Option<&[&str]>); 4] = [
        ("without ntm", None),
        ("ntm, TC", Some(&[])),
        ("empty XDP", Some(&["empty-xdp"])),
        ("ntm, XDP", Some(&["--mode", "xdp"])),
    ];
    let mut results: Vec<Vec<f64>> = vec![Vec::new(); configs.len()];
    for _ in 0..ROUNDS {
        for (i, (_, extra)) in configs.iter().enumerate() {
            let pps = link.a.run(|| match extra {
                None => measure(&link),
                Some(["empty-xdp"]) => {
                    let mut baseline = aya::Ebpf::load(BASELINE).expect("baseline object");
                    let empty: &mut aya::programs::Xdp = baseline
                        .program_mut("ntm_bench_empty_xdp")
                        .unwrap()
                        .try_into()
                        .unwrap();
                    empty.load().unwrap();
                    empty
                        .attach(&link.a_if, aya::programs::XdpMode::Driver)
                        .unwrap();
                    measure(&link)
                }
                Some(extra) => {
                    let mut flags = vec!["-i", link.a_if.as_str()];
                    flags.extend_from_slice(extra);
                    let agent = kit::start_kernel(&flags);
                    let pps = measure(&link);
                    let _ = agent.shutdown();
                    pps
                }
            });
            results[i].push(pps);
        }
    }
    println!(
        "\nthroughput: 64-byte frames per second through a veth pair (median of {ROUNDS}, alternating)"
    );
    let medians: Vec<f64> = results.into_iter().map(median).collect();
    for ((name, _), pps) in configs.iter().zip(&medians) {
        println!(
            "{name:<14} {pps:>12.0} fps {:>8.1}% of without ntm",
            100.0 * pps / medians[0]
        );
    }
    println!(
        "ntm TC vs without: {:.1}%; ntm XDP vs empty XDP: {:.1}%",
        100.0 * medians[1] / medians[0],
        100.0 * medians[3] / medians[2]
    );
}
