//! `cargo xtask bench`: the agent's side of names from the wire: CPU per
//! 1,000 DNS responses parsed and learnt (through `Pipeline::observe`, the
//! path the agent runs), per 1,000 ClientHellos and QUIC Initials, and the
//! memory of the name tables when full.
//! Prints figures; asserts nothing.

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use clap::Parser as _;
use ntm_agent::{
    agent::pipeline::Pipeline,
    config::Config,
    kernel::observe::ObservedFrame,
    names::{
        observed::{MAX_ANSWERS, MAX_CLIENTS, MAX_LEASES, ObservedNames},
        wire::{Client, Fact},
    },
};
use ntm_common::{Hook, observe::Kind};

/// An Ethernet/IPv4/UDP frame from port 53 to `client` holding a response
/// for `www<n>.example.test`: a CNAME and four A records.
fn response(n: u32, client: [u8; 4]) -> Vec<u8> {
    let qname = format!("www{n}");
    let mut dns = vec![0, 1, 0x81, 0x80, 0, 1, 0, 5, 0, 0, 0, 0];
    dns.push(qname.len() as u8);
    dns.extend_from_slice(qname.as_bytes());
    dns.extend_from_slice(b"\x07example\x04test\x00\x00\x01\x00\x01");
    let example_at = 12 + 1 + qname.len();
    dns.extend_from_slice(&[0xc0, 12, 0, 5, 0, 1, 0, 0, 0, 60, 0, 6]);
    let cdn_at = dns.len();
    dns.extend_from_slice(b"\x03cdn\xc0");
    dns.push(example_at as u8);
    for i in 1..=4u8 {
        dns.extend_from_slice(&[0xc0, cdn_at as u8, 0, 1, 0, 1, 0, 0, 0, 20, 0, 4]);
        dns.extend_from_slice(&[198, 18, (n >> 8) as u8, n as u8 ^ i]);
    }
    let udp_len = 8 + dns.len();
    let mut frame = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00];
    frame.extend_from_slice(&[0x45, 0]);
    frame.extend_from_slice(&((20 + udp_len) as u16).to_be_bytes());
    frame.extend_from_slice(&[0, 0, 0, 0, 64, 17, 0, 0, 198, 18, 0, 1]);
    frame.extend_from_slice(&client);
    frame.extend_from_slice(&53u16.to_be_bytes());
    frame.extend_from_slice(&40_000u16.to_be_bytes());
    frame.extend_from_slice(&(udp_len as u16).to_be_bytes());
    frame.extend_from_slice(&[0, 0]);
    frame.extend_from_slice(&dns);
    frame
}

fn observed(bytes: &[u8]) -> ObservedFrame<'_> {
    ObservedFrame {
        ifindex: 2,
        hook: Hook::Egress,
        kind: Kind::Dns,
        ethernet: true,
        frame_len: bytes.len() as u32,
        bytes,
    }
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn cpu_time() -> Duration {
    // SAFETY: getrusage fills the struct it is given.
    let usage = unsafe {
        let mut usage = std::mem::zeroed::<libc::rusage>();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

fn main() {
    // --no-history: a bench's made-up traffic stays out of this machine's
    // history (/var/lib/ntm).
    let config = Config::try_parse_from(["ntm-agent", "--numeric", "--no-history"]).expect("flags");
    let services = config.services().expect("services");
    let mut pipeline = Pipeline::new(config.pipeline(), services).expect("pipeline");
    const RESPONSES: u32 = 100_000;
    let frames: Vec<Vec<u8>> = (0..RESPONSES)
        .map(|n| response(n, [198, 18, 0, 2 + (n % 200) as u8]))
        .collect();
    println!("names from the wire (agent side)");
    let now = Instant::now();
    let (cpu0, wall0) = (cpu_time(), Instant::now());
    for frame in &frames {
        pipeline.observe(&observed(frame), now);
    }
    let (cpu, wall) = (cpu_time() - cpu0, wall0.elapsed());
    let parsed = pipeline
        .metrics()
        .observed_messages
        .with_label_values(&["dns", "parsed"])
        .get();
    println!(
        "  DNS responses (CNAME + 4 A, {} B frames): {:.2} ms CPU per 1,000 parsed and learnt ({:.2} ms wall); {parsed} of {RESPONSES} parsed",
        frames[0].len(),
        cpu.as_secs_f64() * 1e3 * 1000.0 / RESPONSES as f64,
        wall.as_secs_f64() * 1e3 * 1000.0 / RESPONSES as f64,
    );

    // The tables full, with names of typical length.
    let before = rss_bytes();
    let mut tables = ObservedNames::new(Duration::from_secs(60));
    let address = |i: u32| IpAddr::from((0xc612_0000u32 | i).to_be_bytes());
    for i in 0..MAX_ANSWERS.get() as u32 {
        tables.learn(
            Fact::Answer {
                client: address(i % 256),
                address: address(i),
                name: format!("edge-{i}.video.example.net"),
                ttl: 300,
            },
            now,
        );
    }
    for i in 0..MAX_CLIENTS.get().max(MAX_LEASES.get()) as u32 {
        let mac = [2, 0, 0, (i >> 16) as u8, (i >> 8) as u8, i as u8];
        tables.learn(
            Fact::ClientName {
                client: Client::Mac(mac),
                name: format!("phone-of-user-{i}"),
            },
            now,
        );
        tables.learn(
            Fact::Lease {
                client: Client::Mac(mac),
                address: address(i),
            },
            now,
        );
    }
    let sizes = tables.sizes();
    let after = rss_bytes();
    println!(
        "  name tables full ({} answers, {} DHCP clients, {} leases): {:.1} MiB",
        sizes.answers,
        sizes.clients,
        sizes.leases,
        after.saturating_sub(before) as f64 / (1 << 20) as f64
    );
    handshakes();
}

/// An Ethernet frame from 198.18.0.2:`sport` to 198.18.9.9:`dport`, TCP
/// (sequence number `seq`) or UDP, holding `payload`.
fn frame_to_server(tcp: Option<u32>, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let builder = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4([198, 18, 0, 2], [198, 18, 9, 9], 64);
    let mut frame = Vec::new();
    match tcp {
        Some(seq) => builder
            .tcp(sport, dport, seq, 65_535)
            .write(&mut frame, payload),
        None => builder.udp(sport, dport).write(&mut frame, payload),
    }
    .expect("a frame");
    frame
}

/// CPU per 1,000 handshakes read through `Pipeline::observe`: ClientHellos
/// of 1.8 KB (a post-quantum key share) in two segments, and QUIC v1
/// Initials, each of its own connection.
fn handshakes() {
    use ntm_agent::names::hello::{
        client_hello::testing::{hello_with, in_records, sni},
        quic::{
            QuicVersion,
            testing::{crypto_frame, protect},
        },
    };
    const HELLOS: u16 = 20_000;
    let config = Config::try_parse_from(["ntm-agent", "--numeric", "--no-history"]).expect("flags");
    let services = config.services().expect("services");
    let mut pipeline = Pipeline::new(config.pipeline(), services).expect("pipeline");
    let hello = in_records(
        &hello_with(&[
            sni(b"www.example.test"),
            (51, vec![7; 1_220]),
            (21, vec![0; 400]),
        ]),
        16_384,
    );
    let tls: Vec<Vec<u8>> = (0..HELLOS)
        .flat_map(|i| {
            let (first, rest) = hello.split_at(1_448);
            [
                frame_to_server(Some(1), 10_000 + i, 443, first),
                frame_to_server(Some(1 + first.len() as u32), 10_000 + i, 443, rest),
            ]
        })
        .collect();
    let message = &hello_with(&[sni(b"www.example.test"), (51, vec![7; 36])])[..];
    let quic: Vec<Vec<u8>> = (0..HELLOS)
        .map(|i| {
            let dcid = [i.to_be_bytes(), [1, 2], [3, 4], [5, 6]].concat();
            let initial = protect(QuicVersion::V1, &dcid, 0, &crypto_frame(0, message));
            frame_to_server(None, 10_000 + i, 443, &initial)
        })
        .collect();
    for (name, kind, frames) in [
        ("ClientHellos (1.8 KB, 2 segments each)", Kind::Tls, &tls),
        ("QUIC v1 Initials (1,200 B)", Kind::Quic, &quic),
    ] {
        let now = Instant::now();
        let before = pipeline
            .metrics()
            .observed_messages
            .with_label_values(&[if kind == Kind::Tls { "tls" } else { "quic" }, "parsed"])
            .get();
        let (cpu0, wall0) = (cpu_time(), Instant::now());
        for frame in frames {
            let observed = ObservedFrame {
                kind,
                ..observed(frame)
            };
            pipeline.observe(&observed, now);
        }
        let (cpu, wall) = (cpu_time() - cpu0, wall0.elapsed());
        let parsed = pipeline
            .metrics()
            .observed_messages
            .with_label_values(&[if kind == Kind::Tls { "tls" } else { "quic" }, "parsed"])
            .get()
            - before;
        println!(
            "  {name}: {:.2} ms CPU per 1,000 read and learnt ({:.2} ms wall); {parsed} frames of {} parsed",
            cpu.as_secs_f64() * 1e3 * 1000.0 / HELLOS as f64,
            wall.as_secs_f64() * 1e3 * 1000.0 / HELLOS as f64,
            frames.len(),
        );
    }
}
