//! A client's QUIC Initial packets (RFC 9000 17.2.2) opened as any
//! observer can: their keys come from a public salt and the client's
//! Destination Connection ID (RFC 9001 5.2, QUIC v2: RFC 9369 3.3). What
//! they carry is the CRYPTO stream's pieces, which hold the ClientHello.
//!
//! Key derivation, header protection and the AEAD are rustls's
//! (`rustls::quic::Keys::initial`, on ring). The long header and the
//! frames are read here: the crates that parse them (quinn-proto, quiche)
//! are whole QUIC stacks that expose neither apart from a connection.
//!
//! Hostile input throughout: every length is checked against what is
//! there, nothing panics, a packet yields at most [`MAX_CRYPTO_FRAMES`]
//! pieces, all within the ClientHello bound.

use rustls::{
    Side,
    quic::{Keys, Version},
};
use thiserror::Error;

use super::client_hello::MAX_HELLO_LEN;

/// QUIC version 1 (RFC 9000) and 2 (RFC 9369) on the wire.
pub const VERSION_1: u32 = 0x0000_0001;
pub const VERSION_2: u32 = 0x6b33_43cf;
/// Connection IDs are at most 20 bytes in both versions.
const MAX_CID_LEN: usize = 20;
/// The header protection sample: 16 bytes, 4 past the packet number's
/// start (RFC 9001 5.4.2).
const SAMPLE_LEN: usize = 16;
const SAMPLE_OFFSET: usize = 4;
/// CRYPTO frames taken from one packet at most (real clients send one to
/// a few; Chrome splits its hello into several).
pub const MAX_CRYPTO_FRAMES: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuicVersion {
    V1,
    V2,
}

/// What one Initial packet of a client carried.
#[derive(Debug, PartialEq, Eq)]
pub struct Initial {
    pub version: QuicVersion,
    /// The Destination Connection ID, which keys the connection's Initials
    /// (a client keeps it until the server answers).
    pub dcid: Vec<u8>,
    /// CRYPTO stream pieces: (offset, bytes).
    pub crypto: Vec<(u64, Vec<u8>)>,
}

/// Why a datagram gives no Initial. Built for every hostile datagram: no
/// allocation, each message names its cause.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum QuicError {
    #[error("not a QUIC Initial packet")]
    NotInitial,
    #[error("QUIC version {0:#x} unknown")]
    UnknownVersion(u32),
    #[error("QUIC packet shorter than its header says")]
    Truncated,
    #[error("QUIC connection ID longer than 20 bytes")]
    BadConnectionId,
    #[error("QUIC Initial does not decrypt with its connection's Initial keys")]
    Undecryptable,
    #[error("QUIC Initial frame malformed or not allowed in an Initial (type {0:#x})")]
    BadFrame(u64),
    #[error("QUIC CRYPTO data past the {MAX_HELLO_LEN} bytes kept")]
    TooLong,
}

/// The first packet of `datagram`, if it is a client's Initial (packets
/// coalesced after it, 0-RTT or Handshake, are not read).
pub fn client_initial(datagram: &[u8]) -> Result<Initial, QuicError> {
    let mut r = Reader::new(datagram);
    let first = r.u8()?;
    if first & 0x80 == 0 {
        return Err(QuicError::NotInitial);
    }
    let version = match r.u32()? {
        VERSION_1 => QuicVersion::V1,
        VERSION_2 => QuicVersion::V2,
        0 => return Err(QuicError::NotInitial),
        other => return Err(QuicError::UnknownVersion(other)),
    };
    let packet_type = (first >> 4) & 0b11;
    let initial_type = match version {
        QuicVersion::V1 => 0b00,
        QuicVersion::V2 => 0b01,
    };
    if packet_type != initial_type {
        return Err(QuicError::NotInitial);
    }
    let dcid_len = r.u8()? as usize;
    if dcid_len > MAX_CID_LEN {
        return Err(QuicError::BadConnectionId);
    }
    let dcid = r.take(dcid_len)?.to_vec();
    let scid_len = r.u8()? as usize;
    if scid_len > MAX_CID_LEN {
        return Err(QuicError::BadConnectionId);
    }
    r.take(scid_len)?;
    let token_len = r.varint()?;
    r.take(usize::try_from(token_len).map_err(|_| QuicError::Truncated)?)?;
    let length = usize::try_from(r.varint()?).map_err(|_| QuicError::Truncated)?;
    let pn_offset = r.position;
    let end = pn_offset.checked_add(length).ok_or(QuicError::Truncated)?;
    if end > datagram.len() || length < SAMPLE_OFFSET + SAMPLE_LEN {
        return Err(QuicError::Truncated);
    }
    let mut packet = datagram[..end].to_vec();
    let keys = initial_keys(version, &dcid, Side::Server);
    let mut sample = [0u8; SAMPLE_LEN];
    sample.copy_from_slice(&packet[pn_offset + SAMPLE_OFFSET..][..SAMPLE_LEN]);
    {
        let (head, rest) = packet.split_at_mut(pn_offset);
        keys.remote
            .header
            .decrypt_in_place(&sample, &mut head[0], &mut rest[..4])
            .map_err(|_| QuicError::Undecryptable)?;
    }
    let pn_len = (packet[0] & 0b11) as usize + 1;
    let packet_number = packet[pn_offset..pn_offset + pn_len]
        .iter()
        .fold(0u64, |n, &b| (n << 8) | b as u64);
    let (header, payload) = packet.split_at_mut(pn_offset + pn_len);
    let plain = keys
        .remote
        .packet
        .decrypt_in_place(packet_number, header, payload)
        .map_err(|_| QuicError::Undecryptable)?;
    Ok(Initial {
        version,
        dcid,
        crypto: crypto_frames(plain)?,
    })
}

/// The keys of a connection's Initials, as `side` derives them (a server's
/// `remote` ones open what the client sent).
fn initial_keys(version: QuicVersion, dcid: &[u8], side: Side) -> Keys {
    let suite = rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256
        .tls13()
        .expect("a TLS 1.3 suite");
    let quic = suite.quic.expect("AES-128-GCM has QUIC keys");
    let version = match version {
        QuicVersion::V1 => Version::V1,
        QuicVersion::V2 => Version::V2,
    };
    Keys::initial(version, suite, quic, dcid, side)
}

/// The CRYPTO frames of a decrypted Initial payload. Frames allowed in an
/// Initial (RFC 9000 12.4): PADDING, PING, ACK, CRYPTO, CONNECTION_CLOSE.
fn crypto_frames(plain: &[u8]) -> Result<Vec<(u64, Vec<u8>)>, QuicError> {
    let mut r = Reader::new(plain);
    let mut crypto = Vec::new();
    while !r.is_empty() {
        let kind = r.varint()?;
        match kind {
            0x00 | 0x01 => {}
            0x02 | 0x03 => {
                r.varint()?; // largest acknowledged
                r.varint()?; // delay
                let ranges = r.varint()?;
                r.varint()?; // first range
                for _ in 0..ranges {
                    r.varint()?; // gap
                    r.varint()?; // range
                }
                if kind == 0x03 {
                    for _ in 0..3 {
                        r.varint()?; // ECN counts
                    }
                }
            }
            0x06 => {
                let offset = r.varint()?;
                let len = usize::try_from(r.varint()?).map_err(|_| QuicError::Truncated)?;
                let data = r.take(len)?;
                if offset.saturating_add(len as u64) > MAX_HELLO_LEN as u64 {
                    return Err(QuicError::TooLong);
                }
                if crypto.len() == MAX_CRYPTO_FRAMES {
                    return Err(QuicError::BadFrame(kind));
                }
                crypto.push((offset, data.to_vec()));
            }
            0x1c => {
                r.varint()?; // error code
                r.varint()?; // frame type
                let reason = usize::try_from(r.varint()?).map_err(|_| QuicError::Truncated)?;
                r.take(reason)?;
            }
            other => return Err(QuicError::BadFrame(other)),
        }
    }
    Ok(crypto)
}

/// Reads a packet front to back; every read checks what is left.
struct Reader<'a> {
    bytes: &'a [u8],
    position: usize,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, position: 0 }
    }

    fn is_empty(&self) -> bool {
        self.position >= self.bytes.len()
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], QuicError> {
        let end = self.position.checked_add(n).ok_or(QuicError::Truncated)?;
        let taken = self
            .bytes
            .get(self.position..end)
            .ok_or(QuicError::Truncated)?;
        self.position = end;
        Ok(taken)
    }

    fn u8(&mut self) -> Result<u8, QuicError> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, QuicError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A variable-length integer (RFC 9000 16).
    fn varint(&mut self) -> Result<u64, QuicError> {
        let first = self.u8()?;
        let len = 1usize << (first >> 6);
        let mut value = (first & 0x3f) as u64;
        for &b in self.take(len - 1)? {
            value = (value << 8) | b as u64;
        }
        Ok(value)
    }
}

/// A client's side of an Initial, for tests and benches: what a QUIC
/// client sends, protected with the same public keys.
pub mod testing {
    use rustls::Side;

    use super::{QuicVersion, VERSION_1, VERSION_2};

    /// A client Initial as a client protects it: `frames` (plain), padded
    /// to 1200 bytes as clients pad them.
    pub fn protect(version: QuicVersion, dcid: &[u8], pn: u8, frames: &[u8]) -> Vec<u8> {
        let keys = super::initial_keys(version, dcid, Side::Client);
        let (first, wire_version) = match version {
            QuicVersion::V1 => (0xc0u8, VERSION_1),
            QuicVersion::V2 => (0xd0u8, VERSION_2),
        };
        let mut payload = frames.to_vec();
        let header_len = 1 + 4 + 1 + dcid.len() + 1 + 1 + 2 + 1;
        let tag = 16;
        while header_len + payload.len() + tag < 1200 {
            payload.push(0);
        }
        let length = 1 + payload.len() + tag;
        let mut packet = vec![first];
        packet.extend(wire_version.to_be_bytes());
        packet.push(dcid.len() as u8);
        packet.extend(dcid);
        packet.push(0); // no source connection ID
        packet.push(0); // no token
        packet.extend((0x4000u16 | length as u16).to_be_bytes());
        let pn_offset = packet.len();
        packet.push(pn);
        let tag = keys
            .local
            .packet
            .encrypt_in_place(pn as u64, &packet.clone(), &mut payload)
            .unwrap();
        packet.extend(&payload);
        packet.extend(tag.as_ref());
        let mut sample = [0u8; 16];
        sample.copy_from_slice(&packet[pn_offset + 4..][..16]);
        let (head, rest) = packet.split_at_mut(pn_offset);
        keys.local
            .header
            .encrypt_in_place(&sample, &mut head[0], &mut rest[..1])
            .unwrap();
        packet
    }

    pub fn crypto_frame(offset: u64, data: &[u8]) -> Vec<u8> {
        let mut f = vec![0x06];
        f.extend((0x8000_0000u32 | offset as u32).to_be_bytes());
        f.extend((0x4000u16 | data.len() as u16).to_be_bytes());
        f.extend(data);
        f
    }
}

#[cfg(test)]
mod tests {
    use super::{
        testing::{crypto_frame, protect},
        *,
    };
    use proptest::prelude::*;

    #[test]
    fn both_versions_open_and_give_their_crypto_frames() {
        for version in [QuicVersion::V1, QuicVersion::V2] {
            let dcid = [0x83, 0x94, 0xc8, 0xf0, 0x3e, 0x51, 0x57, 0x08];
            let mut frames = vec![0x01]; // PING
            frames.extend([0x02, 0, 0, 0, 0]); // ACK
            frames.extend(crypto_frame(100, b"second"));
            frames.extend(crypto_frame(0, b"first"));
            let datagram = protect(version, &dcid, 1, &frames);
            let initial = client_initial(&datagram).unwrap();
            assert_eq!(initial.version, version);
            assert_eq!(initial.dcid, dcid);
            assert_eq!(
                initial.crypto,
                vec![(100, b"second".to_vec()), (0, b"first".to_vec())]
            );
        }
    }

    #[test]
    fn what_is_not_an_initial_says_so() {
        assert_eq!(client_initial(&[0x40, 1, 2, 3]), Err(QuicError::NotInitial));
        assert_eq!(
            client_initial(&[0xc0, 0, 0, 0, 0, 0]),
            Err(QuicError::NotInitial)
        );
        assert_eq!(
            client_initial(&[0xc0, 0xff, 0, 0, 0x1d, 0]),
            Err(QuicError::UnknownVersion(0xff00001d))
        );
        // A v1 Handshake packet (type 2).
        assert_eq!(
            client_initial(&[0xe0, 0, 0, 0, 1, 0]),
            Err(QuicError::NotInitial)
        );
        let mut datagram = protect(QuicVersion::V1, &[1; 8], 0, &crypto_frame(0, b"x"));
        assert_eq!(client_initial(&datagram[..100]), Err(QuicError::Truncated));
        let last = datagram.len() - 1;
        datagram[last] ^= 1;
        assert_eq!(client_initial(&datagram), Err(QuicError::Undecryptable));
        // A STREAM frame has no place in an Initial.
        let datagram = protect(QuicVersion::V1, &[1; 8], 0, &[0x08, 0, 1, 0x41]);
        assert_eq!(client_initial(&datagram), Err(QuicError::BadFrame(0x08)));
        // CRYPTO data past the bound.
        let datagram = protect(QuicVersion::V1, &[1; 8], 0, &crypto_frame(16_380, b"12345"));
        assert_eq!(client_initial(&datagram), Err(QuicError::TooLong));
    }

    proptest! {
        #[test]
        fn arbitrary_datagrams_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1400)) {
            let _ = client_initial(&bytes);
            let mut initial = vec![0xc0, 0, 0, 0, 1];
            initial.extend(&bytes);
            let _ = client_initial(&initial);
        }

        #[test]
        fn mutated_initials_never_panic(
            edits in proptest::collection::vec((any::<u16>(), any::<u8>()), 1..6),
        ) {
            let mut datagram = protect(QuicVersion::V1, &[9; 8], 0, &crypto_frame(0, b"hello"));
            for (at, value) in edits {
                let i = at as usize % datagram.len();
                datagram[i] = value;
            }
            if let Ok(initial) = client_initial(&datagram) {
                prop_assert!(initial.crypto.len() <= MAX_CRYPTO_FRAMES);
            }
        }

        /// Decrypted payloads that are arbitrary frames: read safely.
        #[test]
        fn arbitrary_frames_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1200)) {
            let _ = crypto_frames(&bytes);
        }
    }
}
