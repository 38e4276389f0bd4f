//! DNS over TCP (RFC 7766): responses with a two-byte length in front,
//! several on one connection, and one response over several segments when
//! it is long (DNSSEC, many records). The kernel hands over every segment
//! from port 53 with data; this puts a response begun in one segment
//! together with its rest.
//!
//! A connection is followed only while a response on it is incomplete:
//! from the segment that begins one (at a message boundary: the first
//! segment of a response stream, or the one after a whole response) to
//! the segment that ends it. Bounded: [`MAX_CONNECTIONS`] at once, each at
//! most one response's bytes, [`MAX_BYTES`] together, [`TIMEOUT`] each. A
//! segment that arrives before the one that began its response (reordered
//! before the kernel saw it) cannot be placed, and the response is lost.

use std::{
    net::SocketAddr,
    num::NonZeroUsize,
    time::{Duration, Instant},
};

use lru::LruCache;
use thiserror::Error;

use super::reassembly::{Reassembly, ReassemblyError};

/// Connections with a response in progress at most.
pub const MAX_CONNECTIONS: NonZeroUsize = NonZeroUsize::new(1024).expect("not zero");
/// Bytes held for all of them at most (the oldest go first).
pub const MAX_BYTES: usize = 4 * 1024 * 1024;
/// How long a response may take to arrive whole.
pub const TIMEOUT: Duration = Duration::from_secs(10);
/// A DNS message is at most 65,535 bytes, after its two-byte length.
const MAX_RESPONSE: usize = 2 + u16::MAX as usize;
/// Segments of one response at most that arrive out of order or again
/// (those in order are bounded by the response's bytes alone).
const MAX_PIECES: u32 = 256;
/// Whole responses taken from one segment at most (pipelined answers).
const MAX_RESPONSES: usize = 16;

#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum DnsTcpError {
    #[error("DNS over TCP: a segment before the one that began its response")]
    BeforeStart,
    #[error("DNS over TCP: {0}")]
    Pieces(#[from] ReassemblyError),
}

struct Response {
    /// Sequence number of the first byte followed.
    start: u32,
    bytes: Reassembly,
    /// Bytes of whole responses already taken.
    taken: usize,
    since: Instant,
}

/// The connections whose response is in progress, by (server, client).
pub struct DnsTcpStreams {
    connections: LruCache<(SocketAddr, SocketAddr), Response>,
    held: usize,
}

impl Default for DnsTcpStreams {
    fn default() -> Self {
        Self {
            connections: LruCache::new(MAX_CONNECTIONS),
            held: 0,
        }
    }
}

impl DnsTcpStreams {
    /// A segment from `server` to `client`: the whole responses (without
    /// their length) it completes.
    pub fn segment(
        &mut self,
        server: SocketAddr,
        client: SocketAddr,
        seq: u32,
        payload: &[u8],
        now: Instant,
    ) -> Result<Vec<Vec<u8>>, DnsTcpError> {
        self.expire(now);
        let key = (server, client);
        if payload.is_empty() {
            return Ok(Vec::new());
        }
        if !self.connections.contains(&key) {
            let response = Response {
                start: seq,
                bytes: Reassembly::new(MAX_RESPONSE * 2, MAX_PIECES),
                taken: 0,
                since: now,
            };
            if let Some((_, gone)) = self.connections.push(key, response) {
                self.held -= gone.bytes.held();
            }
        }
        let Some(response) = self.connections.get_mut(&key) else {
            return Ok(Vec::new());
        };
        let offset = seq.wrapping_sub(response.start);
        if offset > u32::MAX / 2 {
            return Err(DnsTcpError::BeforeStart);
        }
        let before = response.bytes.held();
        let inserted = response.bytes.insert(offset.into(), payload);
        self.held += response.bytes.held() - before;
        if let Err(e) = inserted {
            self.close(&key);
            return Err(e.into());
        }
        let response = self.connections.peek_mut(&key).expect("just added to");
        let mut whole = Vec::new();
        let bytes = response.bytes.contiguous();
        while whole.len() < MAX_RESPONSES {
            let rest = &bytes[response.taken..];
            let Some(len) = rest
                .get(..2)
                .map(|l| u16::from_be_bytes([l[0], l[1]]) as usize)
            else {
                break;
            };
            let Some(message) = rest.get(2..2 + len) else {
                break;
            };
            whole.push(message.to_vec());
            response.taken += 2 + len;
        }
        // Nothing begun and left incomplete: the next segment begins a
        // response of its own.
        if response.taken == response.bytes.contiguous().len() || whole.len() == MAX_RESPONSES {
            self.close(&key);
        }
        while self.held > MAX_BYTES {
            let Some((_, oldest)) = self.connections.pop_lru() else {
                break;
            };
            self.held -= oldest.bytes.held();
        }
        Ok(whole)
    }

    /// Connections followed now, and the bytes they hold.
    pub fn len(&self) -> usize {
        self.connections.len()
    }

    pub fn is_empty(&self) -> bool {
        self.connections.is_empty()
    }

    pub fn held(&self) -> usize {
        self.held
    }

    fn close(&mut self, key: &(SocketAddr, SocketAddr)) {
        if let Some(gone) = self.connections.pop(key) {
            self.held -= gone.bytes.held();
        }
    }

    fn expire(&mut self, now: Instant) {
        while let Some((_, oldest)) = self.connections.peek_lru() {
            if now.duration_since(oldest.since) < TIMEOUT {
                break;
            }
            if let Some((_, gone)) = self.connections.pop_lru() {
                self.held -= gone.bytes.held();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ends() -> (SocketAddr, SocketAddr) {
        (
            "198.18.0.1:53".parse().unwrap(),
            "198.18.0.2:40000".parse().unwrap(),
        )
    }

    fn framed(message: &[u8]) -> Vec<u8> {
        let mut out = (message.len() as u16).to_be_bytes().to_vec();
        out.extend(message);
        out
    }

    #[test]
    fn a_response_over_segments_is_whole_once_its_last_arrives() {
        let (server, client) = ends();
        let now = Instant::now();
        let message: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
        let stream = framed(&message);
        let mut streams = DnsTcpStreams::default();
        let start = u32::MAX - 1000;
        let segments: Vec<&[u8]> = stream.chunks(1448).collect();
        // The first, then the last, then the middle one.
        for i in [0, 2] {
            let seq = start.wrapping_add(1448 * i as u32);
            assert_eq!(
                streams.segment(server, client, seq, segments[i], now),
                Ok(vec![])
            );
        }
        assert_eq!(streams.len(), 1);
        let seq = start.wrapping_add(1448);
        assert_eq!(
            streams.segment(server, client, seq, segments[1], now),
            Ok(vec![message])
        );
        assert_eq!((streams.len(), streams.held()), (0, 0));
    }

    #[test]
    fn whole_responses_in_one_segment_leave_nothing_behind() {
        let (server, client) = ends();
        let now = Instant::now();
        let mut segment = framed(b"one");
        segment.extend(framed(b"two"));
        let mut streams = DnsTcpStreams::default();
        assert_eq!(
            streams.segment(server, client, 5, &segment, now),
            Ok(vec![b"one".to_vec(), b"two".to_vec()])
        );
        assert!(streams.is_empty());
        // A whole one and the start of the next: the next is followed.
        let mut segment = framed(b"three");
        let next = framed(b"four");
        segment.extend(&next[..3]);
        let seq = 5 + 10;
        assert_eq!(
            streams.segment(server, client, seq, &segment, now),
            Ok(vec![b"three".to_vec()])
        );
        let seq = seq + segment.len() as u32;
        assert_eq!(
            streams.segment(server, client, seq, &next[3..], now),
            Ok(vec![b"four".to_vec()])
        );
    }

    #[test]
    fn bounded_in_connections_bytes_and_time() {
        let server: SocketAddr = "198.18.0.1:53".parse().unwrap();
        let now = Instant::now();
        let mut streams = DnsTcpStreams::default();
        // Responses that say 65,535 bytes follow, never completed.
        for i in 0..5000u32 {
            let client = SocketAddr::from(([10, 0, (i >> 8) as u8, i as u8], 40000));
            let mut segment = vec![0xff, 0xff];
            segment.extend([0u8; 1400]);
            streams.segment(server, client, 1, &segment, now).unwrap();
            let _ = streams.segment(server, client, 60_000, &[0; 1000], now);
        }
        assert!(streams.len() <= MAX_CONNECTIONS.get());
        assert!(streams.held() <= MAX_BYTES);
        let (_, client) = ends();
        streams
            .segment(server, client, 1, &framed(b"x"), now + TIMEOUT)
            .unwrap();
        assert_eq!((streams.len(), streams.held()), (0, 0));
        // A segment before the start of its response.
        streams
            .segment(server, client, 100, &[0, 9, 1], now)
            .unwrap();
        assert_eq!(
            streams.segment(server, client, 90, &[1; 10], now),
            Err(DnsTcpError::BeforeStart)
        );
    }

    proptest! {
        /// Responses cut anywhere: each comes out whole, once, in order.
        #[test]
        fn any_cut(
            sizes in proptest::collection::vec(0usize..3000, 1..5),
            cuts in proptest::collection::vec(1usize..2000, 1..10),
        ) {
            let (server, client) = ends();
            let now = Instant::now();
            let messages: Vec<Vec<u8>> = sizes
                .iter()
                .enumerate()
                .map(|(n, &size)| vec![n as u8; size])
                .collect();
            let stream: Vec<u8> = messages.iter().flat_map(|m| framed(m)).collect();
            let mut streams = DnsTcpStreams::default();
            let (mut at, mut got, mut cut) = (0usize, Vec::new(), 0);
            while at < stream.len() {
                let len = cuts[cut % cuts.len()].min(stream.len() - at);
                cut += 1;
                let whole = streams
                    .segment(server, client, 7 + at as u32, &stream[at..at + len], now)
                    .unwrap();
                got.extend(whole);
                at += len;
            }
            prop_assert_eq!(got, messages);
            prop_assert!(streams.is_empty());
        }

        #[test]
        fn arbitrary_segments_never_panic(
            segments in proptest::collection::vec(
                (any::<u16>(), proptest::collection::vec(any::<u8>(), 0..200)), 1..20),
        ) {
            let (server, client) = ends();
            let mut streams = DnsTcpStreams::default();
            for (seq, bytes) in segments {
                let _ = streams.segment(server, client, seq as u32, &bytes, Instant::now());
            }
            prop_assert!(streams.held() <= MAX_BYTES);
        }
    }
}
