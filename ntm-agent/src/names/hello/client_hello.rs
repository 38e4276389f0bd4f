//! The server name in a client's ClientHello: its SNI (RFC 6066), and
//! whether the hello is an ECH outer one (RFC 9849, the
//! `encrypted_client_hello` extension: its SNI is then the provider's
//! public name, not the site's).
//!
//! Over TCP the hello comes in TLS records ([`hello_in_records`]); in QUIC
//! it is the CRYPTO stream itself. The record headers and the handshake
//! message are decoded by tls-parser (rusticata). The extensions are then
//! walked one by one, with nom as tls-parser does, and only the SNI's is
//! decoded (by tls-parser): its decoder of the whole list fails on one
//! extension whose content it does not expect, and clients add new ones
//! often (ALPS, post-quantum key shares, GREASE), which must not lose the
//! name.
//!
//! Everything here is hostile input: nothing panics, nothing grows past
//! [`MAX_HELLO_LEN`], and a name is kept only if it is a host name.

use nom::{multi::length_data, number::complete::be_u16};
use thiserror::Error;
use tls_parser::{
    SNIType, TlsExtension, TlsMessage, TlsMessageHandshake, TlsRecordType,
    parse_tls_extension_sni_content, parse_tls_message_handshake, parse_tls_record_header,
};

use crate::model::series::usable_name;

/// The longest ClientHello kept (its handshake message, header included):
/// real ones are 200 bytes to about 2 KB (a post-quantum key share), a few
/// KB with a large padding or many tickets.
pub const MAX_HELLO_LEN: usize = 16 * 1024;
/// The stream bytes that hold a ClientHello of [`MAX_HELLO_LEN`] at most:
/// a few record headers more (a record holds at most 16 KiB).
pub const MAX_HELLO_STREAM: usize = MAX_HELLO_LEN + 4 * RECORD_HEADER_LEN;

const RECORD_HEADER_LEN: usize = 5;
const HANDSHAKE_HEADER_LEN: usize = 4;
const CLIENT_HELLO: u8 = 1;
const SNI_EXTENSION: u16 = 0;
/// `encrypted_client_hello` (RFC 9849).
const ECH_EXTENSION: u16 = 0xfe0d;
/// TLSPlaintext.length at most (RFC 8446 5.1).
const MAX_RECORD_LEN: u16 = 1 << 14;

/// Which name a ClientHello gives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HelloNameKind {
    /// The SNI: the server the client wants.
    Sni,
    /// The SNI of an ECH outer hello: the provider's public name (the site
    /// is in the encrypted inner hello).
    EchOuter,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HelloName {
    /// Lower case, without a trailing dot.
    pub name: String,
    pub kind: HelloNameKind,
}

/// Why a ClientHello gives no name. Built for every hostile handshake:
/// no allocation, each message names its cause.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum HelloError {
    #[error("TLS record malformed")]
    BadRecord,
    #[error("TLS handshake message is not a ClientHello (type {0})")]
    NotClientHello(u8),
    #[error("ClientHello longer than {MAX_HELLO_LEN} bytes")]
    TooLong,
    #[error("ClientHello malformed")]
    Malformed,
    #[error("ClientHello server name is not a host name")]
    BadName,
}

/// What the first bytes a client sent on a TCP connection hold so far.
#[derive(Debug, PartialEq, Eq)]
pub enum HelloInRecords {
    /// Not TLS: nothing to wait for.
    NotTls,
    /// The start of a ClientHello: more bytes are needed.
    Partial,
    /// The whole ClientHello handshake message.
    Whole(Vec<u8>),
}

/// Whether `first` can begin a TLS handshake record (the kernel's test,
/// repeated here for what it hands over).
pub fn starts_handshake_record(first: &[u8]) -> bool {
    matches!(first, [0x16, 0x03, ..] | [0x16])
}

/// The ClientHello in `stream`, a connection's first bytes from its client
/// (those that have all arrived, from the first on).
pub fn hello_in_records(stream: &[u8]) -> Result<HelloInRecords, HelloError> {
    if !starts_handshake_record(stream) && !stream.is_empty() {
        return Ok(HelloInRecords::NotTls);
    }
    let mut message: Vec<u8> = Vec::new();
    let mut rest = stream;
    loop {
        if rest.len() < RECORD_HEADER_LEN {
            return Ok(HelloInRecords::Partial);
        }
        let Ok((fragment, header)) = parse_tls_record_header(rest) else {
            return Err(HelloError::BadRecord);
        };
        if header.record_type != TlsRecordType::Handshake {
            // The first record is a handshake one (tested above); a hello
            // interleaved with another record type is not one.
            return Err(HelloError::BadRecord);
        }
        if header.version.0 >> 8 != 3 || header.len == 0 || header.len > MAX_RECORD_LEN {
            return Err(HelloError::BadRecord);
        }
        let len = header.len as usize;
        let whole_record = fragment.len() >= len;
        let have = &fragment[..len.min(fragment.len())];
        if message.len() + have.len() > MAX_HELLO_STREAM {
            return Err(HelloError::TooLong);
        }
        message.extend_from_slice(have);
        if message.len() >= HANDSHAKE_HEADER_LEN {
            if message[0] != CLIENT_HELLO {
                return Err(HelloError::NotClientHello(message[0]));
            }
            let body = u32::from_be_bytes([0, message[1], message[2], message[3]]) as usize;
            let total = HANDSHAKE_HEADER_LEN + body;
            if total > MAX_HELLO_LEN {
                return Err(HelloError::TooLong);
            }
            if message.len() >= total {
                message.truncate(total);
                return Ok(HelloInRecords::Whole(message));
            }
        } else if let Some(&kind) = message.first()
            && kind != CLIENT_HELLO
        {
            return Err(HelloError::NotClientHello(kind));
        }
        if !whole_record {
            return Ok(HelloInRecords::Partial);
        }
        rest = &fragment[len..];
    }
}

/// The name in a whole ClientHello handshake message (type, 24-bit
/// length, body); None if it has no SNI.
pub fn hello_name(message: &[u8]) -> Result<Option<HelloName>, HelloError> {
    if message.len() > MAX_HELLO_LEN {
        return Err(HelloError::TooLong);
    }
    let hello = match parse_tls_message_handshake(message) {
        Ok((_, TlsMessage::Handshake(TlsMessageHandshake::ClientHello(hello)))) => hello,
        Ok(_) => return Err(HelloError::NotClientHello(message[0])),
        Err(_) => return Err(HelloError::Malformed),
    };
    let mut extensions = hello.ext.unwrap_or_default();
    let (mut sni, mut ech) = (None, false);
    while !extensions.is_empty() {
        let parsed: nom::IResult<&[u8], (u16, &[u8])> = (|i| {
            let (i, kind) = be_u16(i)?;
            let (i, data) = length_data(be_u16)(i)?;
            Ok((i, (kind, data)))
        })(extensions);
        let Ok((rest, (kind, data))) = parsed else {
            return Err(HelloError::Malformed);
        };
        extensions = rest;
        match kind {
            // The first one counts (a hello has each extension once).
            SNI_EXTENSION if sni.is_none() => sni = Some(data),
            ECH_EXTENSION => ech = true,
            _ => {}
        }
    }
    let Some(sni) = sni else {
        return Ok(None);
    };
    let Ok((_, TlsExtension::SNI(names))) = parse_tls_extension_sni_content(sni) else {
        return Err(HelloError::Malformed);
    };
    let Some((_, name)) = names.iter().find(|(kind, _)| *kind == SNIType::HostName) else {
        return Ok(None);
    };
    let name = host_name(name).ok_or(HelloError::BadName)?;
    let kind = if ech {
        HelloNameKind::EchOuter
    } else {
        HelloNameKind::Sni
    };
    Ok(Some(HelloName { name, kind }))
}

/// `raw` as a host name (RFC 6066 3: ASCII, no trailing dot, not an
/// address literal; underscores allowed as resolvers do): lower case.
fn host_name(raw: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(raw).ok()?;
    let text = text.strip_suffix('.').unwrap_or(text);
    let labels_ok = text.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    });
    if !labels_ok || !usable_name(text) || text.parse::<std::net::IpAddr>().is_ok() {
        return None;
    }
    Some(text.to_ascii_lowercase())
}

/// ClientHellos as clients write them, for tests and benches.
pub mod testing {
    use super::{CLIENT_HELLO, SNI_EXTENSION};

    /// A ClientHello handshake message with these extensions (type, data).
    pub fn hello_with(extensions: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut body = vec![0x03, 0x03];
        body.extend([7u8; 32]); // random
        body.push(0); // session id
        body.extend([0, 2, 0x13, 0x01]); // one cipher suite
        body.extend([1, 0]); // null compression
        let mut ext = Vec::new();
        for (kind, data) in extensions {
            ext.extend(kind.to_be_bytes());
            ext.extend((data.len() as u16).to_be_bytes());
            ext.extend(data);
        }
        body.extend((ext.len() as u16).to_be_bytes());
        body.extend(ext);
        let mut message = vec![CLIENT_HELLO];
        message.extend(&(body.len() as u32).to_be_bytes()[1..]);
        message.extend(body);
        message
    }

    pub fn sni(name: &[u8]) -> (u16, Vec<u8>) {
        let mut list = vec![0u8];
        list.extend((name.len() as u16).to_be_bytes());
        list.extend(name);
        let mut data = (list.len() as u16).to_be_bytes().to_vec();
        data.extend(list);
        (SNI_EXTENSION, data)
    }

    /// `message` in records of at most `record` bytes.
    pub fn in_records(message: &[u8], record: usize) -> Vec<u8> {
        let mut stream = Vec::new();
        for chunk in message.chunks(record) {
            stream.extend([0x16, 0x03, 0x01]);
            stream.extend((chunk.len() as u16).to_be_bytes());
            stream.extend(chunk);
        }
        stream
    }
}

#[cfg(test)]
mod tests {
    use super::{
        testing::{hello_with, in_records, sni},
        *,
    };
    use proptest::prelude::*;

    #[test]
    fn the_sni_names_the_server() {
        let message = hello_with(&[
            (0x0a0a, vec![]),
            (10, vec![0, 2, 0, 29]),
            sni(b"WWW.Example.COM."),
        ]);
        assert_eq!(
            hello_name(&message),
            Ok(Some(HelloName {
                name: "www.example.com".into(),
                kind: HelloNameKind::Sni
            }))
        );
    }

    #[test]
    fn an_ech_outer_hello_names_the_provider_as_such() {
        let message = hello_with(&[sni(b"cloudflare-ech.com"), (ECH_EXTENSION, vec![0, 1, 2])]);
        assert_eq!(
            hello_name(&message).unwrap().unwrap().kind,
            HelloNameKind::EchOuter
        );
    }

    #[test]
    fn an_extension_the_parser_does_not_expect_loses_nothing() {
        // A key_share whose content is cut short, an unknown extension.
        let message = hello_with(&[(51, vec![0, 9, 0]), (17513, vec![1; 40]), sni(b"a.example")]);
        assert_eq!(hello_name(&message).unwrap().unwrap().name, "a.example");
    }

    #[test]
    fn no_sni_no_name_and_bad_names_are_refused() {
        assert_eq!(hello_name(&hello_with(&[])), Ok(None));
        for bad in [
            &b"10.0.0.1"[..],
            b"a..b",
            b"with space.example",
            b"\xff\xfe",
            b"x\n.example",
            b"",
        ] {
            assert_eq!(
                hello_name(&hello_with(&[sni(bad)])),
                Err(HelloError::BadName),
                "{bad:?}"
            );
        }
        let long = vec![b'a'; 64];
        assert_eq!(
            hello_name(&hello_with(&[sni(&long)])),
            Err(HelloError::BadName)
        );
    }

    #[test]
    fn records_give_the_hello_once_whole() {
        let message = hello_with(&[sni(b"split.example"), (21, vec![0; 600])]);
        for record in [16, 100, 4000] {
            let stream = in_records(&message, record);
            for cut in [0, 1, 4, 5, 6, 9, stream.len() / 2, stream.len() - 1] {
                assert_eq!(
                    hello_in_records(&stream[..cut]),
                    Ok(HelloInRecords::Partial),
                    "record {record} cut {cut}"
                );
            }
            assert_eq!(
                hello_in_records(&stream),
                Ok(HelloInRecords::Whole(message.clone()))
            );
        }
        // Data after the hello (0-RTT, a second record) is not part of it.
        let mut more = in_records(&message, 4000);
        more.extend([0x17, 3, 3, 0, 1, 0]);
        assert_eq!(hello_in_records(&more), Ok(HelloInRecords::Whole(message)));
    }

    #[test]
    fn what_is_not_a_hello_says_so() {
        assert_eq!(
            hello_in_records(b"GET / HTTP/1.1\r\n"),
            Ok(HelloInRecords::NotTls)
        );
        assert_eq!(
            hello_in_records(&[0x16, 3, 3, 0, 4, 2, 0, 0, 0]),
            Err(HelloError::NotClientHello(2))
        );
        assert_eq!(
            hello_in_records(&[0x16, 3, 3, 0x40, 0x01]),
            Err(HelloError::BadRecord)
        );
        assert_eq!(
            hello_in_records(&[0x16, 3, 3, 0, 4, 1, 0x01, 0, 0]),
            Err(HelloError::TooLong)
        );
        let message = hello_with(&[sni(b"x.example")]);
        let mut stream = in_records(&message[..10], 100);
        stream.extend([0x17, 3, 3, 0, 1, 0]);
        assert_eq!(hello_in_records(&stream), Err(HelloError::BadRecord));
    }

    fn mutated(mut bytes: Vec<u8>, edits: &[(u16, u8)]) -> Vec<u8> {
        for (at, value) in edits {
            if !bytes.is_empty() {
                let i = *at as usize % bytes.len();
                bytes[i] = *value;
            }
        }
        bytes
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..3000)) {
            let _ = hello_in_records(&bytes);
            let _ = hello_name(&bytes);
            let mut with_header = vec![0x16, 3, 1];
            with_header.extend(bytes);
            let _ = hello_in_records(&with_header);
        }

        #[test]
        fn mutated_hellos_never_panic_and_names_stay_host_names(
            edits in proptest::collection::vec((any::<u16>(), any::<u8>()), 1..8),
            cut in any::<u16>(),
        ) {
            let message = hello_with(&[(0x1a1a, vec![]), sni(b"mutated.example"), (51, vec![0; 40])]);
            let message = mutated(message, &edits);
            if let Ok(Some(name)) = hello_name(&message) {
                prop_assert!(host_name(name.name.as_bytes()).is_some());
            }
            let stream = mutated(in_records(&message, 64), &edits);
            let cut = cut as usize % (stream.len() + 1);
            if let Ok(HelloInRecords::Whole(m)) = hello_in_records(&stream[..cut]) {
                prop_assert!(m.len() <= MAX_HELLO_LEN);
                let _ = hello_name(&m);
            }
        }
    }
}
