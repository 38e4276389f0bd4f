//! Server names from real clients' handshakes, read as the agent reads
//! them: `openssl s_client` and `curl` send their ClientHellos to a local
//! listener, aioquic (from PyPI, in the environment `cargo xtask test`
//! prepares) writes its QUIC Initials; what they sent is cut into segments
//! (or taken datagram by datagram) and handed to `HelloStreams` in another
//! order. No DNS anywhere: a name can only come from the hello.

use std::{net::SocketAddr, process::Command, time::Instant};

use ntm_agent::names::hello::{HelloSource, HelloStreams};

use crate::kit::hello::{
    aioquic_initials, client_hello_of, large_openssl_client_hello, openssl_client_hello, quiet,
};

/// Hands `sent` over in segments of `mss` bytes from sequence number
/// `start`: the first one first (it opens the stream), the others last to
/// second. The name the hello gave.
fn name_from_segments(sent: &[u8], mss: usize, start: u32) -> Option<(String, HelloSource)> {
    let client: SocketAddr = "192.0.2.10:40000".parse().unwrap();
    let server: SocketAddr = "198.51.100.20:8443".parse().unwrap();
    let now = Instant::now();
    let mut streams = HelloStreams::new();
    let segments: Vec<&[u8]> = sent.chunks(mss).collect();
    let mut order = vec![0];
    order.extend((1..segments.len()).rev());
    let mut named = None;
    for i in order {
        let seq = start.wrapping_add((i * mss) as u32);
        let found = streams
            .tcp_segment(client, server, seq, segments[i], now)
            .unwrap_or_else(|e| panic!("segment {i} of {}: {e}", segments.len()));
        if let Some(found) = found {
            assert!(named.is_none(), "named twice");
            named = Some((found.name, found.source));
        }
    }
    named
}

pub fn real_tls_clients_name_their_server_from_any_segments() {
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("openssl s_client", openssl_client_hello("tls.example")),
        (
            "openssl s_client with a large key share and ALPN list",
            large_openssl_client_hello("tls.example"),
        ),
        (
            "curl --resolve",
            client_hello_of("curl", |port| {
                quiet(Command::new("curl").args([
                    "-sk",
                    "-m",
                    "10",
                    "--resolve",
                    &format!("tls.example:{port}:127.0.0.1"),
                    &format!("https://tls.example:{port}/"),
                ]))
            }),
        ),
    ];
    for (client, sent) in &cases {
        if client.contains("large") {
            assert!(sent.len() > 1460, "{client}: {} bytes", sent.len());
        }
        // Whole, at a full-size MSS, and at the MSS of a route with `mtu
        // lock 120` (80 bytes), where the SNI is never in the first
        // segment; sequence numbers that wrap within the hello.
        for (mss, start) in [(sent.len(), 1), (1448, 7), (80, u32::MAX - 100)] {
            assert_eq!(
                name_from_segments(sent, mss, start),
                Some(("tls.example".to_string(), HelloSource::TlsSni)),
                "{client}, {} bytes in segments of {mss}",
                sent.len()
            );
        }
    }
}

pub fn real_quic_initials_name_their_server_split_and_reordered() {
    let client: SocketAddr = "[2001:db8::10]:50000".parse().unwrap();
    let server: SocketAddr = "[2001:db8::20]:443".parse().unwrap();
    for version in [1, 2] {
        for alpns in [0, 60] {
            let initials = aioquic_initials("quic.example", version, alpns);
            if alpns > 0 {
                assert!(initials.len() >= 2, "the hello spans Initials");
            }
            // In the order sent, and last to first.
            for reversed in [false, true] {
                let mut order: Vec<&Vec<u8>> = initials.iter().collect();
                if reversed {
                    order.reverse();
                }
                let mut streams = HelloStreams::new();
                let mut named = Vec::new();
                for datagram in order {
                    let found = streams
                        .quic_datagram(client, server, datagram, Instant::now())
                        .unwrap_or_else(|e| panic!("QUIC v{version}: {e}"));
                    named.extend(found.map(|f| (f.name, f.source)));
                }
                assert_eq!(
                    named,
                    [("quic.example".to_string(), HelloSource::QuicSni)],
                    "QUIC v{version}, {} Initials, reversed: {reversed}",
                    initials.len()
                );
            }
        }
    }
}
