//! `cargo xtask bench`: the kernel program's cost per packet, measured with
//! BPF_PROG_TEST_RUN next to an empty TC program on the same frames, in the
//! same run, so that the ratio is meaningful on a noisy shared machine.
//! Prints figures; asserts nothing.

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
const REPEAT: u32 = 2_000_000;
/// Measurements per program and frame; the median is reported.
const ROUNDS: usize = 15;

fn ns_per_packet(program: &SchedClassifier, frame: &[u8]) -> f64 {
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.repeat = REPEAT;
    let result = program.test_run(opts).expect("BPF_PROG_TEST_RUN");
    // The kernel reports the mean duration of one run.
    result.duration.as_nanos() as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("the datapath benchmark loads eBPF programs: run it as root");
        std::process::exit(1);
    }
    let config = Config::try_parse_from(["ntm-agent", "--service", "443=https"]).expect("flags");
    let services = config.services().expect("services");
    let (mut datapath, _tables) = Datapath::load(
        &config.kernel().expect("kernel options").datapath,
        &services.known_port_bitmap(),
        None,
    )
    .expect("load ntm");
    let mut baseline = Ebpf::load(BASELINE_OBJECT).expect("load baseline");
    let empty: &mut SchedClassifier = baseline
        .program_mut("ntm_bench_empty")
        .unwrap()
        .try_into()
        .unwrap();
    empty.load().expect("load empty program");

    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "IPv4/TCP (74 B)",
            eth(
                ETH_IPV4,
                &[],
                &ipv4(6, &[], 0, &tcp(51_000, 443, &[1; 20], &[])),
            ),
        ),
        (
            "IPv6/UDP (1262 B)",
            eth(ETH_IPV6, &[], &ipv6(17, &udp(40_000, 443, &[0; 1200]))),
        ),
        (
            "VLAN IPv4/UDP (82 B)",
            eth(
                ETH_IPV4,
                &[(TPID_8021Q, 100)],
                &ipv4(17, &[], 0, &udp(40_000, 53, &[0; 32])),
            ),
        ),
    ];

    println!(
        "ntm datapath: ns per packet (median of {ROUNDS} x BPF_PROG_TEST_RUN repeat {REPEAT})"
    );
    println!(
        "{:<22} {:>10} {:>12} {:>8}",
        "frame", "ntm", "empty TC", "ratio"
    );
    let ntm = datapath.tc_program(TC_INGRESS_ETH).unwrap();
    for (name, frame) in &cases {
        let (mut ours, mut base) = (Vec::new(), Vec::new());
        // Warm up: the first run inserts the flow; steady state updates it.
        ns_per_packet(ntm, frame);
        for _ in 0..ROUNDS {
            ours.push(ns_per_packet(ntm, frame));
            base.push(ns_per_packet(empty, frame));
        }
        let (ours, base) = (median(ours), median(base));
        println!(
            "{:<22} {:>10.1} {:>12.1} {:>7.2}x",
            name,
            ours,
            base,
            ours / base
        );
    }
    fragments(&mut datapath, empty);
    filters(&mut datapath, &cases);
    observation(&services, &cases);
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
    let whole_ns = median((0..ROUNDS).map(|_| ns_per_packet(ntm, &whole)).collect());
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
        let (ours, base) = (median(ours), median(base));
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
        let (a, b) = (median(a), median(b));
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
    let mut records = Vec::new();
    // The ring holds about 1,000 records; read it empty between rounds.
    const HANDED_REPEAT: u32 = 500;
    let (mut to_ring, mut flood, mut unobserved) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(&dns);
        opts.repeat = HANDED_REPEAT;
        let program = handed.tc_program(TC_INGRESS_ETH).unwrap();
        to_ring.push(
            program
                .test_run(opts)
                .expect("test run")
                .duration
                .as_nanos() as f64,
        );
        while observer.read_now(&mut records) > 0 {
            records.clear();
        }
        flood.push(ns_per_packet(on.tc_program(TC_INGRESS_ETH).unwrap(), &dns));
        unobserved.push(ns_per_packet(off.tc_program(TC_INGRESS_ETH).unwrap(), &dns));
    }
    let (to_ring, flood, unobserved) = (median(to_ring), median(flood), median(unobserved));
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
        let none = median(none);
        print!("{:<22} {:>10.1}", name, none);
        for samples in with {
            let ns = median(samples);
            print!(" {:>14.1} ({:>5.2}x)", ns, ns / none);
        }
        println!();
    }
    datapath.set_filter(None).expect("no filter");
}
