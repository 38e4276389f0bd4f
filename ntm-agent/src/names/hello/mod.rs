//! Server names from the handshakes clients send in the clear, for clients
//! that never send DNS in the clear (DoH, DoT, Private Relay): the SNI of a
//! TLS ClientHello over TCP, and of the ClientHello in a QUIC connection's
//! Initial packets.
//!
//! - [`client_hello`]: the ClientHello in TLS records, and its name;
//! - [`quic`]: a client's Initial packet opened, its CRYPTO pieces;
//! - [`HelloStreams`] (here): the handshakes in progress, one stream per
//!   TCP connection or QUIC connection ID, bounded in entries, bytes and
//!   time.
//!
//! A ClientHello often spans segments (a post-quantum key share makes it
//! about 1.8 KB; Chrome shuffles its extensions, so the SNI is often in the
//! second) and Chrome splits and reorders its QUIC CRYPTO frames across
//! Initials: a name is read only from the whole hello.

pub mod client_hello;
pub mod quic;

use std::{
    net::SocketAddr,
    num::NonZeroUsize,
    time::{Duration, Instant},
};

use lru::LruCache;
use thiserror::Error;

use self::{
    client_hello::{
        HelloError, HelloInRecords, HelloName, MAX_HELLO_LEN, MAX_HELLO_STREAM, hello_in_records,
        hello_name, starts_handshake_record,
    },
    quic::{Initial, QuicError},
};
use super::reassembly::{Reassembly, ReassemblyError};

/// Handshakes followed at once at most (each holds at most a ClientHello's
/// bytes): a flood of half hellos takes the oldest one's place, never more
/// room.
pub const MAX_STREAMS: NonZeroUsize = NonZeroUsize::new(4096).expect("not zero");
/// Bytes all handshakes in progress hold at most together.
pub const MAX_STREAM_BYTES: usize = 4 * 1024 * 1024;
/// Pieces of one hello at most that arrive out of order or again (those in
/// order are bounded by its bytes alone): over a path with a small MTU a
/// 2 KB hello takes some 25 segments; Chrome's QUIC cuts its hello into a
/// dozen, in any order.
const MAX_PIECES: u32 = 64;
/// How long a handshake may take to arrive whole (a client sends its hello
/// at once; only loss and retransmission stretch it).
pub const STREAM_TIMEOUT: Duration = Duration::from_secs(10);

/// Which handshake a name came from: `ntm_names{source}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HelloSource {
    TlsSni,
    QuicSni,
    /// An ECH outer hello's SNI (TLS or QUIC): the provider, not the site.
    TlsEchOuter,
}

/// A server's name, from the hello its client sent to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerName {
    pub client: SocketAddr,
    pub server: SocketAddr,
    pub name: String,
    pub source: HelloSource,
}

#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum StreamError {
    #[error(transparent)]
    Hello(#[from] HelloError),
    #[error(transparent)]
    Quic(#[from] QuicError),
    #[error("handshake pieces: {0}")]
    Pieces(#[from] ReassemblyError),
    #[error("a segment before its handshake's first one")]
    BeforeStart,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum StreamKey {
    /// A TCP connection: client and server.
    Tcp(SocketAddr, SocketAddr),
    /// A QUIC connection's Initials: client, server and the client's
    /// Destination Connection ID.
    Quic(SocketAddr, SocketAddr, Vec<u8>),
}

struct Stream {
    /// TCP: the sequence number of the hello's first byte.
    start: u32,
    bytes: Reassembly,
    since: Instant,
    /// A name was read, or the stream proved not to be a hello: later
    /// pieces are ignored until the entry goes.
    finished: bool,
}

/// The handshakes in progress.
pub struct HelloStreams {
    streams: LruCache<StreamKey, Stream>,
    /// Bytes held by `streams`.
    held: usize,
}

impl Default for HelloStreams {
    fn default() -> Self {
        Self::new()
    }
}

impl HelloStreams {
    pub fn new() -> Self {
        Self {
            streams: LruCache::new(MAX_STREAMS),
            held: 0,
        }
    }

    /// Handshakes followed now.
    pub fn len(&self) -> usize {
        self.streams.len()
    }

    pub fn is_empty(&self) -> bool {
        self.streams.is_empty()
    }

    /// Bytes held now.
    pub fn held(&self) -> usize {
        self.held
    }

    /// A TCP segment the client sent: `seq` its sequence number, `payload`
    /// its data. The name once its connection's hello is whole.
    pub fn tcp_segment(
        &mut self,
        client: SocketAddr,
        server: SocketAddr,
        seq: u32,
        payload: &[u8],
        now: Instant,
    ) -> Result<Option<ServerName>, StreamError> {
        if payload.is_empty() {
            return Ok(None);
        }
        self.expire(now);
        let key = StreamKey::Tcp(client, server);
        if !self.streams.contains(&key) {
            if !starts_handshake_record(payload) {
                return Ok(None);
            }
            self.open(key.clone(), seq, MAX_HELLO_STREAM, now);
        }
        // Most recently used: the bound on bytes lets older streams go first.
        let Some(stream) = self.streams.get_mut(&key) else {
            return Ok(None);
        };
        if stream.finished {
            return Ok(None);
        }
        // Sequence numbers wrap: the offset is the distance from the start.
        let offset = seq.wrapping_sub(stream.start);
        if offset > u32::MAX / 2 {
            return Err(StreamError::BeforeStart);
        }
        let result = self.add(&key, offset as u64, payload).and_then(|()| {
            let Some(stream) = self.streams.peek(&key) else {
                return Ok(None);
            };
            match hello_in_records(stream.bytes.contiguous())? {
                HelloInRecords::Partial => Ok(None),
                HelloInRecords::NotTls => Err(HelloError::BadRecord.into()),
                HelloInRecords::Whole(message) => Ok(hello_name(&message)?),
            }
        });
        self.settle(&key, client, server, result, HelloSource::TlsSni)
    }

    /// A UDP datagram the client sent: the name once its connection's
    /// hello is whole in its Initials' CRYPTO frames.
    pub fn quic_datagram(
        &mut self,
        client: SocketAddr,
        server: SocketAddr,
        datagram: &[u8],
        now: Instant,
    ) -> Result<Option<ServerName>, StreamError> {
        let Initial { dcid, crypto, .. } = quic::client_initial(datagram)?;
        self.expire(now);
        let key = StreamKey::Quic(client, server, dcid);
        if !self.streams.contains(&key) {
            self.open(key.clone(), 0, MAX_HELLO_LEN, now);
        }
        // Most recently used: the bound on bytes lets older streams go first.
        if self.streams.get(&key).is_none_or(|s| s.finished) {
            return Ok(None);
        }
        let mut result = Ok(());
        for (offset, data) in &crypto {
            result = result.and_then(|()| self.add(&key, *offset, data));
        }
        let result = result.and_then(|()| {
            let Some(stream) = self.streams.peek(&key) else {
                return Ok(None);
            };
            let bytes = stream.bytes.contiguous();
            if bytes.len() < 4 {
                return Ok(None);
            }
            let total = 4 + u32::from_be_bytes([0, bytes[1], bytes[2], bytes[3]]) as usize;
            if total > MAX_HELLO_LEN {
                return Err(HelloError::TooLong.into());
            }
            if bytes.len() < total {
                return Ok(None);
            }
            Ok(hello_name(&bytes[..total])?)
        });
        self.settle(&key, client, server, result, HelloSource::QuicSni)
    }

    fn open(&mut self, key: StreamKey, start: u32, limit: usize, now: Instant) {
        let stream = Stream {
            start,
            bytes: Reassembly::new(limit, MAX_PIECES),
            since: now,
            finished: false,
        };
        if let Some((_, evicted)) = self.streams.push(key, stream) {
            self.held -= evicted.bytes.held();
        }
    }

    /// Adds a piece to a stream, within the bound on all streams' bytes
    /// (the oldest streams go first to make room).
    fn add(&mut self, key: &StreamKey, offset: u64, data: &[u8]) -> Result<(), StreamError> {
        let before = self.streams.peek(key).map_or(0, |s| s.bytes.held());
        let result = match self.streams.peek_mut(key) {
            Some(stream) => stream.bytes.insert(offset, data),
            None => return Ok(()),
        };
        let after = self.streams.peek(key).map_or(0, |s| s.bytes.held());
        self.held += after - before;
        while self.held > MAX_STREAM_BYTES {
            let Some((_, oldest)) = self.streams.pop_lru() else {
                break;
            };
            self.held -= oldest.bytes.held();
        }
        Ok(result?)
    }

    /// After a piece: a name or an error finishes the stream (its bytes
    /// are let go, the entry stays to ignore the rest of its pieces).
    fn settle(
        &mut self,
        key: &StreamKey,
        client: SocketAddr,
        server: SocketAddr,
        result: Result<Option<HelloName>, StreamError>,
        source: HelloSource,
    ) -> Result<Option<ServerName>, StreamError> {
        let done = !matches!(result, Ok(None));
        if done && let Some(stream) = self.streams.peek_mut(key) {
            self.held -= stream.bytes.held();
            stream.bytes = Reassembly::new(0, 0);
            stream.finished = true;
        }
        Ok(result?.map(|hello| ServerName {
            client,
            server,
            source: match hello.kind {
                client_hello::HelloNameKind::EchOuter => HelloSource::TlsEchOuter,
                client_hello::HelloNameKind::Sni => source,
            },
            name: hello.name,
        }))
    }

    /// Forgets the handshakes that did not arrive whole in time, from the
    /// least recently used on.
    fn expire(&mut self, now: Instant) {
        while let Some((_, oldest)) = self.streams.peek_lru() {
            if now.duration_since(oldest.since) < STREAM_TIMEOUT {
                break;
            }
            if let Some((_, gone)) = self.streams.pop_lru() {
                self.held -= gone.bytes.held();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{
        client_hello::testing::{hello_with, in_records, sni},
        quic::{
            QuicVersion,
            testing::{crypto_frame, protect},
        },
        *,
    };

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_hello_over_segments_in_any_order_names_its_server() {
        let (c, s) = (addr("192.0.2.1:40000"), addr("198.51.100.7:443"));
        let message = hello_with(&[(21, vec![0; 900]), sni(b"late.example")]);
        let stream = in_records(&message, 16384);
        let segments: Vec<&[u8]> = stream.chunks(300).collect();
        let start = u32::MAX - 500; // wraps within the hello
        let now = Instant::now();
        let mut streams = HelloStreams::new();
        // The first segment first (it opens the stream), the rest reversed.
        let mut found = streams.tcp_segment(c, s, start, segments[0], now).unwrap();
        for (i, segment) in segments.iter().enumerate().skip(1).rev() {
            assert_eq!(found, None);
            let seq = start.wrapping_add(300 * i as u32);
            found = streams.tcp_segment(c, s, seq, segment, now).unwrap();
        }
        assert_eq!(
            found,
            Some(ServerName {
                client: c,
                server: s,
                name: "late.example".into(),
                source: HelloSource::TlsSni
            })
        );
        assert_eq!(streams.held(), 0);
        // The rest of the connection is ignored.
        assert_eq!(
            streams.tcp_segment(
                c,
                s,
                start.wrapping_add(stream.len() as u32),
                b"\x17\x03\x03",
                now
            ),
            Ok(None)
        );
    }

    #[test]
    fn quic_crypto_split_and_reordered_across_initials_names_its_server() {
        let (c, s) = (addr("[2001:db8::1]:50000"), addr("[2001:db8::2]:443"));
        let message = hello_with(&[(21, vec![0; 1500]), sni(b"quic.example")]);
        let dcid = [7u8; 8];
        let pieces: Vec<(u64, &[u8])> = message
            .chunks(500)
            .enumerate()
            .map(|(i, chunk)| (500 * i as u64, chunk))
            .collect();
        let now = Instant::now();
        let mut streams = HelloStreams::new();
        let mut found = None;
        for version in [QuicVersion::V2] {
            for (pn, (offset, chunk)) in pieces.iter().rev().enumerate() {
                assert_eq!(found, None);
                let datagram = protect(version, &dcid, pn as u8, &crypto_frame(*offset, chunk));
                found = streams.quic_datagram(c, s, &datagram, now).unwrap();
            }
        }
        let found = found.unwrap();
        assert_eq!(
            (found.name.as_str(), found.source),
            ("quic.example", HelloSource::QuicSni)
        );
    }

    #[test]
    fn half_hellos_are_bounded_and_expire() {
        let s = addr("198.51.100.7:443");
        let now = Instant::now();
        let mut streams = HelloStreams::new();
        // The start of a record that says 16 KB follow, never completed.
        let mut first = vec![0x16, 3, 1, 0x40, 0x00, 1, 0, 0x3f, 0xfb];
        first.extend([0u8; 1000]);
        for i in 0..10_000u32 {
            let c = SocketAddr::from(([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 40000));
            assert_eq!(streams.tcp_segment(c, s, 1, &first, now), Ok(None));
            // A piece far ahead, which makes the stream hold 16 KB.
            let _ = streams.tcp_segment(c, s, 16_000, &[0; 300], now);
        }
        assert!(streams.len() <= MAX_STREAMS.get());
        assert!(streams.held() <= MAX_STREAM_BYTES, "{}", streams.held());
        let later = now + STREAM_TIMEOUT;
        let c = addr("192.0.2.9:1");
        let _ = streams.tcp_segment(c, s, 1, b"GET /", later);
        assert_eq!(streams.len(), 0);
        assert_eq!(streams.held(), 0);
    }
}
