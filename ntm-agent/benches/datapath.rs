//! `cargo xtask bench`: the kernel program's cost per packet, measured with
//! BPF_PROG_TEST_RUN next to an empty TC program and a minimal per-flow
//! counter on the same frames, in the same run, so that the ratios are
//! meaningful on a noisy shared machine; then what each part of ntm's path
//! costs (the bench's programs in ntm's object that stop after each part),
//! fragments, filters and the names' kernel side. Every program runs in
//! turn, round after round; a figure is the mean of the middle half of its
//! rounds (as robust as the median, and not rounded to the whole
//! nanoseconds the kernel reports). Prints figures; asserts nothing.

#[path = "../tests/integration/kit/frames.rs"]
#[allow(dead_code)]
mod frames;

use aya::{
    Ebpf,
    programs::{SchedClassifier, TestRun, TestRunOptions},
};
use clap::Parser as _;
use frames::*;
use ntm_agent::{config::Config, filter::Filter, kernel::load::Datapath};
use ntm_common::programs::LinkType;

static BASELINE_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ntm-bench-baseline"));

/// Runs per measurement inside the kernel (its loop, not ours).
const REPEAT: u32 = 1_000_000;
/// Measurements per program and frame, interleaved: the steady state's
/// table and its parts (nets of a few ns, so more of them; a multiple of
/// [`LOADS`], which take turns), the rest.
const STEADY_ROUNDS: usize = 24;
const ROUNDS: usize = 15;

/// The bench's programs in ntm's object, which take the full path without
/// the steady state (`steady.rs`), each stopping after one part of it (see
/// `count::stage` in ntm-ebpf), in path order, and the part each adds; the
/// last is the whole full path.
const STAGE_PROGRAMS: [&str; 5] = [
    "ntm_bench_upto_entry",
    "ntm_bench_upto_parse",
    "ntm_bench_upto_fragments",
    "ntm_bench_upto_count",
    "ntm_bench_full_path",
];
const STAGE_PARTS: [&str; 5] = ["main.rs", "parse.rs", "fragments", "count.rs", "observe.rs"];

fn ns_per_packet(program: &SchedClassifier, frame: &[u8]) -> f64 {
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.repeat = REPEAT;
    let result = program.test_run(opts).expect("BPF_PROG_TEST_RUN");
    // The kernel reports the mean duration of one run.
    result.duration.as_nanos() as f64
}

/// The mean of the middle half of the measurements: the kernel reports
/// whole nanoseconds per run, and a median of those moves in steps of 1 ns
/// (a twentieth of ntm's net cost).
fn typical(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let quarter = v.len() / 4;
    let middle = &v[quarter..v.len() - quarter];
    middle.iter().sum::<f64>() / middle.len() as f64
}

/// A frame kind of the main table; `min` says whether the minimal counter
/// counts it (it does not follow VLAN tags).
struct Case {
    name: &'static str,
    frame: Vec<u8>,
    min: bool,
}

fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("the datapath benchmark loads eBPF programs: run it as root");
        std::process::exit(1);
    }
    let config = Config::try_parse_from(["ntm-agent", "--service", "443=https"]).expect("flags");
    let services = config.services().expect("services");
    let mut options = config.kernel().expect("kernel options").datapath;
    options.also_load = &STAGE_PROGRAMS;
    // LOADS loads of ntm and of the baselines, taken in turn round by
    // round: where the kernel puts one load's code and maps moves its time
    // per frame by more than the ratio's margin (see LOADS).
    let mut datapaths: Vec<Datapath> = (0..LOADS)
        .map(|_| {
            Datapath::load(&options, &services.known_port_bitmap(), None)
                .expect("load ntm")
                .0
        })
        .collect();
    let baselines: Vec<Ebpf> = (0..LOADS)
        .map(|_| {
            let mut baseline = Ebpf::load(BASELINE_OBJECT).expect("load baseline");
            for name in ["ntm_bench_empty", "ntm_bench_min_counter_ip"] {
                let program: &mut SchedClassifier =
                    baseline.program_mut(name).unwrap().try_into().unwrap();
                program
                    .load()
                    .unwrap_or_else(|e| panic!("load {name}: {e}"));
            }
            baseline
        })
        .collect();
    let program = |load: usize, name| -> &SchedClassifier {
        baselines[load].program(name).unwrap().try_into().unwrap()
    };
    let empty = |load| program(load, "ntm_bench_empty");
    let min = |load| program(load, "ntm_bench_min_counter_ip");

    let case = |name, frame: Vec<u8>, min| Case { name, frame, min };
    let cases = vec![
        case(
            "IPv4/TCP (64 B)",
            eth(
                ETH_IPV4,
                &[],
                &ipv4(6, &[], 0, &tcp(51_000, 443, &[], &[0; 10])),
            ),
            true,
        ),
        case(
            "IPv4/UDP (64 B)",
            eth(
                ETH_IPV4,
                &[],
                &ipv4(17, &[], 0, &udp(40_000, 443, &[0; 22])),
            ),
            true,
        ),
        case(
            "IPv6/TCP (74 B)",
            eth(ETH_IPV6, &[], &ipv6(6, &tcp(51_000, 443, &[], &[]))),
            true,
        ),
        case(
            "IPv4/TCP (74 B)",
            eth(
                ETH_IPV4,
                &[],
                &ipv4(6, &[], 0, &tcp(51_000, 443, &[1; 20], &[])),
            ),
            true,
        ),
        case(
            "IPv6/UDP (1262 B)",
            eth(ETH_IPV6, &[], &ipv6(17, &udp(40_000, 443, &[0; 1200]))),
            true,
        ),
        case(
            "VLAN IPv4/UDP (82 B)",
            eth(
                ETH_IPV4,
                &[(TPID_8021Q, 100)],
                &ipv4(17, &[], 0, &udp(40_000, 53, &[0; 32])),
            ),
            false,
        ),
    ];

    // One section alone, while working on it (main: the two tables above
    // the fragments).
    if std::env::var("NTM_BENCH_SECTION").as_deref() == Ok("tcp_health") {
        tcp_health(&services);
        return;
    }

    // Every program on every frame, interleaved round by round: the empty
    // program, the minimal counter, ntm, then the full path stopped after
    // each part
    // (samples[frame][program][round]).
    let ntm_name = TC_INGRESS_ETH;
    let mut samples = vec![vec![Vec::new(); 3 + STAGE_PROGRAMS.len()]; cases.len()];
    for case in &cases {
        // Warm up: the first runs insert the flow; steady state updates it.
        for (load, datapath) in datapaths.iter_mut().enumerate() {
            ns_per_packet(min(load), &case.frame);
            ns_per_packet(datapath.tc_program(ntm_name).unwrap(), &case.frame);
        }
    }
    for round in 0..STEADY_ROUNDS {
        let load = round % LOADS;
        let datapath = &mut datapaths[load];
        for (c, case) in cases.iter().enumerate() {
            let f = &case.frame;
            samples[c][0].push(ns_per_packet(empty(load), f));
            samples[c][1].push(ns_per_packet(min(load), f));
            samples[c][2].push(ns_per_packet(datapath.tc_program(ntm_name).unwrap(), f));
            for (s, name) in STAGE_PROGRAMS.iter().enumerate() {
                samples[c][3 + s].push(ns_per_packet(datapath.tc_program(name).unwrap(), f));
            }
        }
    }
    // A figure: the program's typical time; a net figure: the typical
    // difference between two programs measured side by side in each round
    // (paired, so that a slow spell of the machine cancels out).
    let at = |c: usize, p: usize| typical(samples[c][p].clone());
    let net = |c: usize, p: usize, base: usize| {
        let pairs = samples[c][p].iter().zip(&samples[c][base]);
        typical(pairs.map(|(a, b)| a - b).collect())
    };
    const EMPTY: usize = 0;
    const MIN: usize = 1;
    const NTM: usize = 2;
    const STAGE: usize = 3;

    println!(
        "ntm datapath: ns per packet in the steady state (the flow already in the per-CPU cache), {STEADY_ROUNDS} interleaved rounds of BPF_PROG_TEST_RUN x {REPEAT}, taken in turn by {LOADS} loads of each program, middle-half mean"
    );
    println!(
        "net: minus the empty TC program, round by round; min: a minimal counter (Ethernet, IPv4 or IPv6, TCP/UDP ports, one PERCPU_HASH lookup and update: ntm_bench_min_counter_ip)"
    );
    println!(
        "{:<22} {:>8} {:>8} {:>8} {:>9} {:>9} {:>10} {:>9}",
        "frame", "empty", "ntm", "min", "ntm net", "min net", "ntm/min", "ntm/empty"
    );
    for (c, case) in cases.iter().enumerate() {
        let (base, ntm, ntm_net) = (at(c, EMPTY), at(c, NTM), net(c, NTM, EMPTY));
        if case.min {
            let (min, min_net) = (at(c, MIN), net(c, MIN, EMPTY));
            println!(
                "{:<22} {:>8.1} {:>8.1} {:>8.1} {:>9.1} {:>9.1} {:>9.2}x {:>8.2}x",
                case.name,
                base,
                ntm,
                min,
                ntm_net,
                min_net,
                ntm_net / min_net,
                ntm / base
            );
        } else {
            println!(
                "{:<22} {:>8.1} {:>8.1} {:>8} {:>9.1} {:>9} {:>10} {:>8.2}x",
                case.name,
                base,
                ntm,
                "-",
                ntm_net,
                "-",
                "(no VLAN)",
                ntm / base
            );
        }
    }

    println!();
    println!(
        "the full path, what each part costs a frame: ns per packet, each part net of the ones before it, round by round (ntm without the steady state, stopped after each part, then whole), next to ntm's steady state"
    );
    print!("{:<22}", "frame");
    for part in STAGE_PARTS {
        print!(" {part:>10}");
    }
    println!(" {:>11} {:>11}", "= full net", "steady net");
    for (c, case) in cases.iter().enumerate() {
        print!("{:<22}", case.name);
        let mut before = EMPTY;
        for s in 0..STAGE_PROGRAMS.len() {
            print!(" {:>10.1}", net(c, STAGE + s, before));
            before = STAGE + s;
        }
        println!(
            " {:>11.1} {:>11.1}",
            net(c, before, EMPTY),
            net(c, NTM, EMPTY)
        );
    }
    println!(
        "(the full path is what a frame takes when its connection is not in its cache slot, or when the steady state leaves it to the full path: a SYN or RST, a TCP segment that may carry a ClientHello, a long-header QUIC datagram, a connection on ports wanted for names, any frame but IPv4/IPv6 with TCP/UDP and no options; main.rs: the orphan check and the filter's test, a tail call only while a filter is on; parse.rs: the skb's fields and the frame to a key; fragments: a fragment to its datagram's flow; count.rs: the per-CPU cache (the flow table behind it) and the lease check; observe.rs: MAC learning, the handshake's and the hand-over's tests. A program stopped early keeps its result with a few stores, which its part pays. Each part's figure is a typical difference, so the parts need not add up exactly. steady net: ntm as attached, its frame's connection in its slot, as in the table above)"
    );

    if std::env::var("NTM_BENCH_SECTION").as_deref() == Ok("main") {
        return;
    }
    let legacy: Vec<(&str, Vec<u8>)> = cases[3..]
        .iter()
        .map(|c| (c.name, c.frame.clone()))
        .collect();
    fragments(&mut datapaths[0], empty(0));
    filters(&mut datapaths[0], &legacy);
    observation(&services, &legacy);
    handshake_names(&services);
    tcp_health(&services);
}

/// Frames the ring buffer takes between reads in [`handed_over`]: it holds
/// about 1,000 records.
const HANDED_REPEAT: u32 = 500;

/// `frame` through `datapath`'s ingress program [`HANDED_REPEAT`] times,
/// each handed over to the ring buffer (its rate high enough), then the
/// ring read empty: ns per frame, and the records read.
fn handed_over(
    datapath: &mut Datapath,
    observer: &mut ntm_agent::kernel::observe::Observer,
    frame: &[u8],
) -> (f64, usize) {
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.repeat = HANDED_REPEAT;
    let program = datapath.tc_program(TC_INGRESS_ETH).unwrap();
    let ns = program
        .test_run(opts)
        .expect("test run")
        .duration
        .as_nanos() as f64;
    let (mut records, mut got) = (Vec::new(), 0);
    while observer.read_now(&mut records) > 0 {
        got += records.len();
        records.clear();
    }
    (ns, got)
}

/// Ordinary frames, for a feature on vs off: TCP data over IPv4 and IPv6,
/// small UDP, then a full-size TCP segment and a large UDP datagram.
fn ordinary_frames() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        (
            "IPv4/TCP data (64 B)",
            eth(
                ETH_IPV4,
                &[],
                &ipv4(6, &[], 0, &tcp(51_000, 443, &[], &[0; 10])),
            ),
        ),
        (
            "IPv6/TCP data (84 B)",
            eth(ETH_IPV6, &[], &ipv6(6, &tcp(51_000, 443, &[], &[0; 10]))),
        ),
        (
            "IPv4/UDP (64 B)",
            eth(
                ETH_IPV4,
                &[],
                &ipv4(17, &[], 0, &udp(40_000, 443, &[0; 22])),
            ),
        ),
        (
            "IPv4/TCP data (1514 B)",
            eth(
                ETH_IPV4,
                &[],
                &ipv4(6, &[], 0, &tcp(51_000, 443, &[], &[0x17; 1460])),
            ),
        ),
        (
            "IPv6/UDP (1262 B)",
            eth(ETH_IPV6, &[], &ipv6(17, &udp(40_000, 443, &[0x40; 1200]))),
        ),
    ]
}

/// Loads of each variant a comparison takes turns with: where the kernel
/// puts a program's code and maps moves its time per frame by up to 10 ns
/// on some machines (seen here: one load of the same object 8 ns slower
/// than another, on every frame), more than the differences measured.
const LOADS: usize = 3;

/// [`LOADS`] loads of ntm from these flags.
fn loads(
    flags: &[&str],
    services: &ntm_agent::pipeline::services::ServiceRegistry,
) -> Vec<Datapath> {
    (0..LOADS).map(|_| load(flags, services)).collect()
}

/// `frame` through the ingress program of `on` and of `off`, paired like
/// the main table: each round's difference, so that a slow spell of the
/// machine cancels out; round by round through each variant's loads.
/// Prints on, off, their typical difference and ratio.
fn side_by_side(on: &mut [Datapath], off: &mut [Datapath], name: &str, frame: &[u8]) {
    let (mut a, mut b, mut d) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..STEADY_ROUNDS {
        let on = &mut on[round % on.len()];
        let off = &mut off[round % off.len()];
        let x = ns_per_packet(on.tc_program(TC_INGRESS_ETH).unwrap(), frame);
        let y = ns_per_packet(off.tc_program(TC_INGRESS_ETH).unwrap(), frame);
        a.push(x);
        b.push(y);
        d.push(x - y);
    }
    let (a, b, d) = (typical(a), typical(b), typical(d));
    println!(
        "{:<36} {:>8.1} {:>8.1} {:>9.1} {:>7.2}x",
        name,
        a,
        b,
        d,
        a / b
    );
}

/// Names from handshakes in the kernel: ordinary frames with TLS and QUIC
/// observation on (the default) and off (--no-observe-tls), side by side,
/// paired round by round; then a ClientHello's and a QUIC Initial's frame
/// as the kernel hands them over (the ring buffer read between rounds).
fn handshake_names(services: &ntm_agent::pipeline::services::ServiceRegistry) {
    let mut on = loads(&[], services);
    let mut off = loads(&["--no-observe-tls"], services);
    println!();
    println!(
        "names from handshakes in the kernel (TLS ClientHellos, QUIC Initials): ns per packet, on (default) vs off (--no-observe-tls), same frames, same run; on-off: the typical difference round by round"
    );
    println!(
        "{:<36} {:>8} {:>8} {:>9} {:>8}",
        "frame", "on", "off", "on-off", "ratio"
    );
    // A ClientHello (SNI www.example.test, a 200-byte key share) in one
    // record, to a port that is no TLS port.
    let hello = {
        use ntm_agent::names::hello::client_hello::testing::{hello_with, in_records, sni};
        in_records(
            &hello_with(&[sni(b"www.example.test"), (51, vec![7; 202])]),
            16_384,
        )
    };
    // A QUIC v1 Initial's first bytes, padded to 1,200 (the kernel looks
    // at the first five only).
    let mut initial = vec![0xc3, 0, 0, 0, 1, 8];
    initial.resize(1200, 0);
    for (name, frame) in &ordinary_frames() {
        side_by_side(&mut on, &mut off, name, frame);
    }
    followed_bucket(&mut on, &mut off, &hello);
    let hello_frame = eth(
        ETH_IPV4,
        &[],
        &ipv4(6, &[], 0, &tcp(51_000, 8_443, &[], &hello)),
    );
    let initial_frame = eth(
        ETH_IPV4,
        &[],
        &ipv4(17, &[], 0, &udp(50_000, 4_433, &initial)),
    );
    let mut handed = load(&["--observe-rate", "1000000"], services);
    let mut observer = handed.take_observer().expect("observation on");
    for (name, frame) in [
        (
            format!("ClientHello ({} B)", hello_frame.len()),
            &hello_frame,
        ),
        (
            format!("QUIC Initial ({} B)", initial_frame.len()),
            &initial_frame,
        ),
    ] {
        let (mut to_ring, mut unobserved) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            let (ns, got) = handed_over(&mut handed, &mut observer, frame);
            to_ring.push(ns);
            assert_eq!(
                got, HANDED_REPEAT as usize,
                "{name}: every frame handed over"
            );
            unobserved.push(ns_per_packet(
                off[0].tc_program(TC_INGRESS_ETH).unwrap(),
                frame,
            ));
        }
        let (to_ring, unobserved) = (typical(to_ring), typical(unobserved));
        println!(
            "{:<36} {:>8.1} {:>8.1} {:>9.1} {:>7.2}x  (copied into the ring buffer)",
            name,
            to_ring,
            unobserved,
            to_ring - unobserved,
            to_ring / unobserved
        );
    }
}

/// What a TCP data segment pays when a ClientHello is followed in its
/// bucket (`ntm-ebpf/src/hello.rs`: by its ports): the IPv4/TCP data frame
/// of [`ordinary_frames`] while a hello on its ports, from another
/// sequence number, is followed; it goes to the hand-over program, which
/// compares it with the hello and hands nothing over. The hello's first
/// segment (`hello` with its record claiming 16 KB) is sent again each
/// round: a hello is followed for a second at most.
fn followed_bucket(on: &mut [Datapath], off: &mut [Datapath], hello: &[u8]) {
    let mut first = hello.to_vec();
    first[3..5].copy_from_slice(&16_000u16.to_be_bytes());
    first[6..9].copy_from_slice(&15_996u32.to_be_bytes()[1..]);
    let mut segment = tcp(51_000, 443, &[], &first);
    segment[4..8].copy_from_slice(&100_000u32.to_be_bytes());
    let arm = eth(ETH_IPV4, &[], &ipv4(6, &[], 0, &segment));
    let (name, data) = &ordinary_frames()[0];
    let (mut a, mut b, mut d) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..STEADY_ROUNDS {
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(&arm);
        let program = on[round % on.len()].tc_program(TC_INGRESS_ETH).unwrap();
        program.test_run(opts).expect("test run");
        let x = ns_per_packet(program, data);
        let off = &mut off[round % off.len()];
        let y = ns_per_packet(off.tc_program(TC_INGRESS_ETH).unwrap(), data);
        a.push(x);
        b.push(y);
        d.push(x - y);
    }
    let (a, b, d) = (typical(a), typical(b), typical(d));
    println!(
        "{:<36} {:>8.1} {:>8.1} {:>9.1} {:>7.2}x  (a hello followed in its bucket)",
        name.replace(" (64 B)", ", bucket in use"),
        a,
        b,
        d,
        a / b
    );
}

/// TCP handshakes in the kernel: ordinary frames with them followed (the
/// default) and not (--no-tcp-health), side by side; a data segment whose
/// connection's gate a SYN-ACK opened (its table looked in), a SYN; then
/// the agent's time to take 10,000 ended handshakes, and the table's memory.
fn tcp_health(services: &ntm_agent::pipeline::services::ServiceRegistry) {
    // --numeric on both: names' kernel work is not part of this.
    let mut on = [load(&["--numeric"], services)];
    let mut off = [load(&["--numeric", "--no-tcp-health"], services)];
    let mut handshakes = on[0].take_handshakes().expect("handshakes followed");
    println!();
    println!(
        "TCP handshakes in the kernel: ns per packet, followed (default) vs not (--no-tcp-health), same frames, same run; on-off: the typical difference round by round"
    );
    println!(
        "{:<36} {:>8} {:>8} {:>9} {:>8}",
        "frame", "on", "off", "on-off", "ratio"
    );
    for (name, frame) in &ordinary_frames()[..3] {
        side_by_side(&mut on, &mut off, name, frame);
    }
    // A handshake of the IPv4/TCP frame's client and server in flight: the
    // SYN (seq 1) and the server's SYN-ACK (seq 100, ack 2) open the gate
    // slot its data segments test (the bench never drains, so it stays
    // open); the data segment's ack (0) is not the SYN-ACK's, so the entry
    // stays as it is however often it runs.
    let segment = |from_client: bool, flags: u8, seq: u32, ack: u32, payload: usize| {
        let (sport, dport) = if from_client {
            (51_000, 443)
        } else {
            (443, 51_000)
        };
        let payload = vec![0; payload];
        let mut f = eth(
            ETH_IPV4,
            &[],
            &ipv4(6, &[], 0, &tcp(sport, dport, &[], &payload)),
        );
        if !from_client {
            let (src, dst) = (f[26..30].to_vec(), f[30..34].to_vec());
            f[26..30].copy_from_slice(&dst);
            f[30..34].copy_from_slice(&src);
        }
        let tcp = 14 + 20;
        f[tcp + 4..tcp + 8].copy_from_slice(&seq.to_be_bytes());
        f[tcp + 8..tcp + 12].copy_from_slice(&ack.to_be_bytes());
        f[tcp + 13] = flags;
        f
    };
    let run_once = |datapath: &mut Datapath, frame: &[u8]| {
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        datapath
            .tc_program(TC_INGRESS_ETH)
            .unwrap()
            .test_run(opts)
            .expect("test run");
    };
    // A bare ACK (no payload): the frames that test the gate.
    let bare_ack = segment(true, 0x10, 2, 0, 0);
    side_by_side(&mut on, &mut off, "IPv4/TCP bare ACK (54 B)", &bare_ack);
    run_once(&mut on[0], &segment(true, 0x02, 1, 0, 0));
    run_once(&mut on[0], &segment(false, 0x12, 100, 2, 0));
    side_by_side(
        &mut on,
        &mut off,
        "IPv4/TCP (64 B), handshake in flight",
        &segment(true, 0x18, 2, 0, 10),
    );
    side_by_side(
        &mut on,
        &mut off,
        "bare ACK, handshake in flight",
        &bare_ack,
    );
    side_by_side(
        &mut on,
        &mut off,
        "IPv4/TCP SYN (54 B), a retry",
        &segment(true, 0x02, 1, 0, 0),
    );
    println!(
        "(a data segment never tests the gate; a bare ACK tests its connection's gate slot, and looks in the table while a handshake of its client and server is in flight; a SYN: its entry looked up and its retry counted)"
    );

    // 10,000 handshakes, each SYN, SYN-ACK and ACK, by client port; then
    // the agent takes them.
    const HANDSHAKES: u32 = 10_000;
    handshakes
        .drain(ntm_agent::sys::process::monotonic_ns())
        .expect("drain");
    for i in 0..HANDSHAKES {
        let port = (20_000 + i as u16).to_be_bytes();
        for (from_client, flags, seq, ack) in [
            (true, 0x02, 1, 0),
            (false, 0x12, 100, 2),
            (true, 0x10, 2, 101),
        ] {
            let mut f = segment(from_client, flags, seq, ack, 0);
            let at = if from_client { 34 } else { 36 };
            f[at..at + 2].copy_from_slice(&port);
            run_once(&mut on[0], &f);
        }
    }
    let cpu = std::time::Instant::now();
    let taken = handshakes
        .drain(ntm_agent::sys::process::monotonic_ns())
        .expect("drain");
    let took = cpu.elapsed();
    println!(
        "the agent takes {} ended handshakes (of {HANDSHAKES}) in {:.1} ms ({:.2} us each); the handshake table ({} entries, preallocated) takes {:.1} MiB of kernel memory",
        taken.ended.len(),
        took.as_secs_f64() * 1e3,
        took.as_secs_f64() * 1e6 / HANDSHAKES as f64,
        ntm_common::handshake::HANDSHAKE_ENTRIES,
        handshakes.table_bytes().unwrap_or(0) as f64 / (1 << 20) as f64
    );
}

/// Fragments: a first one notes its datagram's port (an LRU update), a
/// later one looks it up; next to an empty program and to a whole datagram.
fn fragments(datapath: &mut Datapath, empty: &SchedClassifier) {
    let whole = eth(ETH_IPV4, &[], &ipv4(17, &[], 0, &udp(40_000, 53, &[0; 32])));
    let first = eth(
        ETH_IPV4,
        &[],
        &ipv4(17, &[], 0x2000, &udp(40_000, 53, &[0; 32])),
    );
    let later = eth(ETH_IPV4, &[], &ipv4(17, &[], 5, &[0xAA; 40]));
    let mut stray = later.clone();
    // Another identification (bytes 4-5 of the IPv4 header).
    stray[18..20].copy_from_slice(&[0x56, 0x78]);
    let ntm = datapath.tc_program(TC_INGRESS_ETH).unwrap();
    println!();
    println!("fragments: ns per packet, vs the empty program and vs a whole datagram (same run)");
    println!(
        "{:<34} {:>8} {:>10} {:>8} {:>8}",
        "frame", "ntm", "empty TC", "ratio", "vs whole"
    );
    ns_per_packet(ntm, &first);
    let whole_ns = typical((0..ROUNDS).map(|_| ns_per_packet(ntm, &whole)).collect());
    for (name, frame) in [
        ("first fragment (notes its port)", &first),
        ("later fragment (takes the port)", &later),
        ("later fragment, first not seen", &stray),
    ] {
        let (mut ours, mut base) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            ours.push(ns_per_packet(ntm, frame));
            base.push(ns_per_packet(empty, frame));
        }
        let (ours, base) = (typical(ours), typical(base));
        println!(
            "{:<34} {:>8.1} {:>10.1} {:>7.2}x {:>7.2}x",
            name,
            ours,
            base,
            ours / base,
            ours / whole_ns
        );
    }
}

/// Loads ntm from these flags.
fn load(flags: &[&str], services: &ntm_agent::pipeline::services::ServiceRegistry) -> Datapath {
    let args = std::iter::once("ntm-agent").chain(flags.iter().copied());
    let config = Config::try_parse_from(args).expect("flags");
    let (datapath, _tables) = Datapath::load(
        &config.kernel().expect("kernel options").datapath,
        &services.known_port_bitmap(),
        None,
    )
    .expect("load ntm");
    datapath
}

/// DNS and DHCP observation: ordinary frames with it on (the default) and
/// off, side by side; DNS responses handed over (the ring buffer read
/// between rounds), and a flood of them past the rate (dropped and
/// counted).
fn observation(
    services: &ntm_agent::pipeline::services::ServiceRegistry,
    cases: &[(&str, Vec<u8>)],
) {
    let mut on = load(&[], services);
    // --numeric: neither observation nor MAC learning is loaded.
    let mut off = load(&["--numeric"], services);
    println!();
    println!(
        "names in the kernel (DNS/DHCP observation, MAC learning): ns per packet, on (default) vs off (--numeric), same frames, same run"
    );
    println!("{:<22} {:>10} {:>10} {:>8}", "frame", "on", "off", "ratio");
    for (name, frame) in cases {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            a.push(ns_per_packet(on.tc_program(TC_INGRESS_ETH).unwrap(), frame));
            b.push(ns_per_packet(
                off.tc_program(TC_INGRESS_ETH).unwrap(),
                frame,
            ));
        }
        let (a, b) = (typical(a), typical(b));
        println!("{:<22} {:>10.1} {:>10.1} {:>7.2}x", name, a, b, a / b);
    }

    // A DNS response: a CNAME (at offset 46) and four A records.
    let mut answer = vec![0, 1, 0x81, 0x80, 0, 1, 0, 5, 0, 0, 0, 0];
    answer.extend_from_slice(b"\x03www\x07example\x04test\x00\x00\x01\x00\x01");
    answer.extend_from_slice(&[0xc0, 12, 0, 5, 0, 1, 0, 0, 0, 60, 0, 6]);
    answer.extend_from_slice(b"\x03cdn\xc0\x10");
    for i in 1..=4u8 {
        answer.extend_from_slice(&[0xc0, 46, 0, 1, 0, 1, 0, 0, 0, 20, 0, 4, 198, 18, 1, i]);
    }
    let dns = eth(ETH_IPV4, &[], &ipv4(17, &[], 0, &udp(53, 40_000, &answer)));
    let mut handed = load(&["--observe-rate", "1000000"], services);
    let mut observer = handed.take_observer().expect("observation on");
    let (mut to_ring, mut flood, mut unobserved) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        to_ring.push(handed_over(&mut handed, &mut observer, &dns).0);
        flood.push(ns_per_packet(on.tc_program(TC_INGRESS_ETH).unwrap(), &dns));
        unobserved.push(ns_per_packet(off.tc_program(TC_INGRESS_ETH).unwrap(), &dns));
    }
    let (to_ring, flood, unobserved) = (typical(to_ring), typical(flood), typical(unobserved));
    println!(
        "{:<22} {:>10.1} {:>10.1} {:>7.2}x  (copied into the ring buffer)",
        format!("DNS response ({} B)", dns.len()),
        to_ring,
        unobserved,
        to_ring / unobserved
    );
    println!(
        "{:<22} {:>10.1} {:>10.1} {:>7.2}x  (a flood past --observe-rate: dropped, counted)",
        "DNS response flood",
        flood,
        unobserved,
        flood / unobserved
    );
}

/// The README's filter (which these test-range frames do not match, so they
/// go to the filtered counter), the same filter on the frames' own subnet
/// (they match and are counted as usual), and a long filter, each next to
/// no filter, alternating in the same run.
fn filters(datapath: &mut Datapath, cases: &[(&str, Vec<u8>)]) {
    let long = "(tcp and (port 22 or port 80 or port 443 or portrange 8000-8100)) \
                or (udp and (port 53 or port 123 or port 443)) or icmp or icmp6";
    let filters = [
        (
            "README filter",
            "src net 192.168.0.0/24 or dst net 192.168.0.0/24",
        ),
        (
            "same, matching",
            "src net 198.18.1.0/24 or dst net 198.18.1.0/24",
        ),
        ("long filter", long),
    ];
    let compiled: Vec<(&str, Filter, usize)> = filters
        .iter()
        .map(|(name, expression)| {
            let filter = Filter::compile(expression).expect("filter compiles");
            let length = filter
                .program(LinkType::Ethernet)
                .map(|p| p.len())
                .unwrap_or(0);
            (*name, filter, length)
        })
        .collect();
    println!();
    println!(
        "with a tcpdump filter: ns per packet, and ratio to no filter (same frames, same run)"
    );
    for (name, filter, length) in &compiled {
        println!(
            "  {name}: {:?} ({length} classic instructions)",
            filter.expression
        );
    }
    print!("{:<22} {:>10}", "frame", "no filter");
    for (name, _, _) in &compiled {
        print!(" {:>24}", name);
    }
    println!();
    for (name, frame) in cases {
        let mut none = Vec::new();
        let mut with: Vec<Vec<f64>> = vec![Vec::new(); compiled.len()];
        for _ in 0..ROUNDS {
            datapath.set_filter(None).expect("no filter");
            let ntm = datapath.tc_program(TC_INGRESS_ETH).unwrap();
            ns_per_packet(ntm, frame);
            none.push(ns_per_packet(ntm, frame));
            for (i, (_, filter, _)) in compiled.iter().enumerate() {
                datapath
                    .set_filter(Some(filter.clone()))
                    .expect("filter loads");
                let ntm = datapath.tc_program(TC_INGRESS_ETH).unwrap();
                ns_per_packet(ntm, frame);
                with[i].push(ns_per_packet(ntm, frame));
            }
        }
        let none = typical(none);
        print!("{:<22} {:>10.1}", name, none);
        for samples in with {
            let ns = typical(samples);
            print!(" {:>14.1} ({:>5.2}x)", ns, ns / none);
        }
        println!();
    }
    datapath.set_filter(None).expect("no filter");
}
