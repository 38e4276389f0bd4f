//! `cargo xtask bench` (restarts): the real agent killed with -9 while UDP
//! flows at 20,000 datagrams a second through a veth, and started again:
//! the time from start to counting for a first start and for a takeover of
//! pinned state, and the packets lost across the restart (must be 0).
//! Prints figures; asserts nothing.

#[path = "../tests/integration/kit/mod.rs"]
mod kit;

use std::{
    net::UdpSocket,
    process::Child,
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use kit::{
    A4, Agent, BpfFs, Link,
    scrape::{http_get, sample_sum},
};

const ROUNDS: usize = 3;
const RATE: u64 = 20_000;
const PAYLOAD: usize = 18;
const PORT: u16 = 7300;

/// Starts an agent and returns it with the time until it answered
/// /healthz (every interface attached, counting).
fn start(link: &Link, bpffs: &BpfFs, port: u16, extra: &[&str]) -> (Child, Duration) {
    let started = Instant::now();
    let child = Agent::in_ns(&link.a)
        .iface(&link.a_if)
        .port_any_address(port)
        .args(["--pin-dir", &bpffs.pin_dir()])
        .args(extra)
        .spawn_child();
    while http_get(&link.a, port, "/healthz").is_none_or(|(status, _)| status != 200) {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "agent did not start"
        );
        thread::sleep(Duration::from_millis(2));
    }
    (child, started.elapsed())
}

fn counted(link: &Link, port: u16) -> u64 {
    http_get(&link.a, port, "/metrics").map_or(0, |(_, text)| {
        sample_sum(
            &text,
            "ntm_packets_total",
            &[&format!("service=\"{PORT}\"")],
        )
    })
}

fn steady_udp(link: &Link, stop: &AtomicBool) {
    link.b.enter_current_thread();
    let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
    let started = Instant::now();
    let mut sent = 0u64;
    while !stop.load(Ordering::Relaxed) && sent < 20 * RATE {
        let due = started.elapsed().as_micros() as u64 * RATE / 1_000_000;
        while sent < due {
            let _ = socket.send_to(&[0u8; PAYLOAD], (A4, PORT));
            sent += 1;
        }
        thread::sleep(Duration::from_micros(500));
    }
}

fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("the restart benchmark creates namespaces and loads eBPF: run it as root");
        std::process::exit(1);
    }
    let link = Link::new("bnrs");
    let _sink = link.a.run(|| UdpSocket::bind((A4, PORT)).unwrap());
    println!();
    println!(
        "restarts: kill -9 at {RATE} datagrams/s, a new agent started at once (median of {ROUNDS})"
    );
    let (mut fresh, mut takeover, mut lost) = (Vec::new(), Vec::new(), Vec::new());
    let mut arrived_total = 0;
    for round in 0..ROUNDS {
        let bpffs = BpfFs::new("bench");
        link.wait_quiet();
        let before = link.a_stats().0.0;
        let port = 9700 + 2 * round as u16;
        let (mut first, first_time) = start(&link, &bpffs, port, &["--drain-interval", "1h"]);
        fresh.push(first_time);
        let stop = AtomicBool::new(false);
        let mut second = thread::scope(|s| {
            s.spawn(|| steady_udp(&link, &stop));
            thread::sleep(Duration::from_secs(1));
            first.kill().unwrap();
            first.wait().unwrap();
            let (second, second_time) = start(&link, &bpffs, port + 1, &[]);
            takeover.push(second_time);
            thread::sleep(Duration::from_secs(1));
            stop.store(true, Ordering::Relaxed);
            second
        });
        link.wait_quiet();
        let arrived = link.a_stats().0.0 - before;
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut seen = counted(&link, port + 1);
        while seen < arrived && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(200));
            seen = counted(&link, port + 1);
        }
        lost.push(arrived as i64 - seen as i64);
        arrived_total += arrived;
        second.kill().unwrap();
        second.wait().unwrap();
    }
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    println!("{:<58} {:>10}", "what", "figure");
    println!(
        "{:<58} {:>8.0} ms",
        "start to serving, first start (load + attach)",
        median(&mut fresh).as_secs_f64() * 1e3
    );
    println!(
        "{:<58} {:>8.0} ms",
        "start to serving, taking over (frames counted throughout)",
        median(&mut takeover).as_secs_f64() * 1e3
    );
    println!(
        "{:<58} {:>10}",
        format!("packets lost across kill -9 + restart, of {arrived_total}"),
        lost.iter().sum::<i64>()
    );
}
