//! The first bytes of one stream put together from pieces that arrive in
//! any order: a TCP connection's first bytes from its client (a
//! ClientHello, pieces at sequence offsets), a QUIC connection's CRYPTO
//! stream (pieces at frame offsets), a DNS response over TCP. Bounded: at
//! most `limit` bytes from offset 0, and at most `max_pieces` pieces that
//! arrive out of order or again. A piece in order (one that carries the
//! bytes from offset 0 on) is bounded by `limit` alone: the bytes before
//! the contiguous end are never looked at again, so adding it costs the
//! bytes it adds, and a stream cut into the smallest segments in order
//! costs no more than one whole.
//!
//! Written here: the TCP reassembly crates are whole stacks or capture
//! pipelines (smoltcp's `Assembler` tracks holes for its own ring buffer,
//! pcap-side reassemblers own the connection table); what is needed is a
//! few KB from offset 0 with a hard bound, where the first copy of a byte
//! wins (a hostile retransmission cannot rewrite what was read).

use thiserror::Error;

#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum ReassemblyError {
    #[error("a piece ends past the {limit} bytes kept")]
    TooLong { limit: usize },
    #[error("more than {max} pieces out of order or repeated")]
    TooManyPieces { max: u32 },
}

/// One stream's first bytes.
#[derive(Debug)]
pub struct Reassembly {
    bytes: Vec<u8>,
    /// One bit per byte of `bytes`: set once the byte arrived.
    have: Vec<u64>,
    /// Bytes from offset 0 that have all arrived.
    contiguous: usize,
    limit: usize,
    pieces: u32,
    max_pieces: u32,
}

impl Reassembly {
    /// A stream of which at most `limit` bytes are kept, with at most
    /// `max_pieces` pieces out of order or repeated.
    pub fn new(limit: usize, max_pieces: u32) -> Self {
        Self {
            bytes: Vec::new(),
            have: Vec::new(),
            contiguous: 0,
            limit,
            pieces: 0,
            max_pieces,
        }
    }

    /// Puts `data` at `offset`. Bytes already there stay as they were.
    pub fn insert(&mut self, offset: u64, data: &[u8]) -> Result<(), ReassemblyError> {
        let end = offset.saturating_add(data.len() as u64);
        if end > self.limit as u64 {
            return Err(ReassemblyError::TooLong { limit: self.limit });
        }
        // Both fit in usize: at most `limit`.
        let (offset, end) = (offset as usize, end as usize);
        let in_order = offset <= self.contiguous && end > self.contiguous;
        if !in_order {
            if self.pieces >= self.max_pieces {
                return Err(ReassemblyError::TooManyPieces {
                    max: self.max_pieces,
                });
            }
            self.pieces += 1;
        }
        if end > self.bytes.len() {
            self.bytes.resize(end, 0);
            self.have.resize(end.div_ceil(64), 0);
        }
        // Every byte before `contiguous` has arrived: the piece's bytes
        // from there on are the ones that may be new.
        let from = offset.max(self.contiguous).min(end);
        for (i, &byte) in (from..end).zip(&data[from - offset..]) {
            let (word, bit) = (i / 64, 1u64 << (i % 64));
            if self.have[word] & bit == 0 {
                self.have[word] |= bit;
                self.bytes[i] = byte;
            }
        }
        while self.contiguous < self.bytes.len()
            && self.have[self.contiguous / 64] & (1 << (self.contiguous % 64)) != 0
        {
            self.contiguous += 1;
        }
        Ok(())
    }

    /// The bytes from offset 0 on that have all arrived.
    pub fn contiguous(&self) -> &[u8] {
        &self.bytes[..self.contiguous]
    }

    /// Bytes held, for the bound on all streams together.
    pub fn held(&self) -> usize {
        self.bytes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn pieces_in_any_order_make_the_stream() {
        let mut r = Reassembly::new(100, 64);
        r.insert(6, b"world").unwrap();
        assert_eq!(r.contiguous(), b"");
        r.insert(0, b"hello ").unwrap();
        assert_eq!(r.contiguous(), b"hello world");
    }

    #[test]
    fn the_first_copy_of_a_byte_wins() {
        let mut r = Reassembly::new(100, 64);
        r.insert(0, b"abc").unwrap();
        r.insert(1, b"XYZW").unwrap();
        assert_eq!(r.contiguous(), b"abcZW");
    }

    #[test]
    fn bounds_hold() {
        let mut r = Reassembly::new(10, 64);
        assert_eq!(
            r.insert(8, b"abc"),
            Err(ReassemblyError::TooLong { limit: 10 })
        );
        assert_eq!(
            r.insert(u64::MAX, b"a"),
            Err(ReassemblyError::TooLong { limit: 10 })
        );
        // The first carries the stream on; the 63 repeats count, and a
        // piece out of order makes 64.
        for _ in 0..64 {
            r.insert(0, b"a").unwrap();
        }
        r.insert(5, b"c").unwrap();
        assert_eq!(
            r.insert(7, b"d"),
            Err(ReassemblyError::TooManyPieces { max: 64 })
        );
        // In order, a piece is bounded by the bytes kept alone.
        r.insert(1, b"b").unwrap();
        assert_eq!(r.contiguous(), b"ab");
        assert!(r.held() <= 10);
    }

    #[test]
    fn pieces_in_order_are_bounded_by_the_bytes_alone() {
        let data: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        let mut r = Reassembly::new(1000, 4);
        for (i, byte) in data.iter().enumerate() {
            r.insert(i as u64, &[*byte]).unwrap();
        }
        assert_eq!(r.contiguous(), &data[..]);
        // Overlapping the contiguous end counts as in order too.
        let mut r = Reassembly::new(1000, 4);
        for i in 0..999 {
            r.insert(i as u64, &data[i..i + 2]).unwrap();
        }
        assert_eq!(r.contiguous(), &data[..]);
    }

    proptest! {
        /// Cut into pieces, shuffled, with overlapping copies: the same
        /// stream.
        #[test]
        fn any_cut_and_order(
            data in proptest::collection::vec(any::<u8>(), 1..600),
            cuts in proptest::collection::vec(any::<u16>(), 0..20),
            order in any::<u64>(),
        ) {
            let mut bounds: Vec<usize> = cuts.iter().map(|c| *c as usize % data.len()).collect();
            bounds.push(0);
            bounds.push(data.len());
            bounds.sort_unstable();
            bounds.dedup();
            let mut pieces: Vec<(usize, usize)> = bounds.windows(2).map(|w| (w[0], w[1])).collect();
            // A deterministic shuffle from `order`.
            let n = pieces.len();
            for i in 0..n {
                let j = (order.rotate_left(i as u32) as usize).wrapping_add(i) % n;
                pieces.swap(i, j);
            }
            let mut r = Reassembly::new(600, 64);
            for (start, end) in &pieces {
                r.insert(*start as u64, &data[*start..*end]).unwrap();
            }
            // A repeat of the first piece changes nothing.
            let (start, end) = pieces[0];
            r.insert(start as u64, &data[start..end]).unwrap();
            prop_assert_eq!(r.contiguous(), &data[..]);
        }
    }
}
