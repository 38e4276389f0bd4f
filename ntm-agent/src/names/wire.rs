//! What the DNS and DHCP frames the kernel hands over say about names.
//!
//! Everything here comes from the network and is hostile: the frame is
//! sliced by etherparse, DNS messages are decoded by hickory-proto and DHCP
//! messages by dhcproto, and what they say is bounded (a message yields at
//! most [`MAX_FACTS`] facts, a name at most `model::series::MAX_NAME_LEN` bytes)
//! before anything is kept. A parser that rejects a message says why, once
//! per message; nothing here panics (the property tests feed it garbage).

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Instant,
};

use dhcproto::{Decodable as _, Decoder, v4, v6};
use etherparse::{NetSlice, SlicedPacket, TransportSlice};
use hickory_proto::{
    op::{Message, MessageType, OpCode, ResponseCode},
    rr::{Name, RData},
    serialize::binary::{BinDecodable as _, BinDecoder},
};
use ntm_common::observe::Kind;

use super::{
    dns_tcp::{DnsTcpError, DnsTcpStreams},
    hello::{HelloSource, HelloStreams, StreamError},
    source::Source,
};
use crate::kernel::observe::ObservedFrame;
use crate::model::net::Mac;
use crate::model::series::usable_name;

/// Facts kept from one message at most (a response may carry thousands
/// of records; the first ones are what the client uses).
pub const MAX_FACTS: usize = 64;
/// CNAMEs followed from the name asked at most.
const MAX_CNAME_HOPS: usize = 8;
/// DUIDs are at most 130 bytes (RFC 8415 11.1).
const MAX_DUID: usize = 130;

/// How a DHCP client is known: by its MAC, or (DHCPv6 with a DUID that
/// holds no MAC) by its DUID.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Client {
    Mac(Mac),
    Duid(Box<[u8]>),
}

/// One thing a message says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fact {
    /// `client` asked for `name` and was told `address`, for `ttl` seconds.
    Answer {
        client: IpAddr,
        address: IpAddr,
        name: String,
        ttl: u32,
    },
    /// A DHCP client said its host name.
    ClientName { client: Client, name: String },
    /// A DHCP server gave `address` to `client`.
    Lease { client: Client, address: IpAddr },
    /// `client` sent `name` in the clear in its handshake with `server`
    /// (the SNI of a TLS ClientHello or of a QUIC Initial's), `source`
    /// saying which.
    Server {
        client: IpAddr,
        server: IpAddr,
        name: String,
        source: Source,
    },
}

/// Why a handed-over frame says nothing. Built on every malformed frame
/// (hostile input, perhaps a flood): each variant keeps the parser's own
/// error, or a number, and allocates nothing itself. Each message names
/// its cause, which is also its source.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("the frame is cut short or not UDP/TCP over IP: {0}")]
    Frame(#[source] etherparse::err::packet::SliceError),
    #[error("the frame is not IP (no IPv4 or IPv6 header)")]
    NotIp,
    #[error("the frame is neither UDP nor TCP over IP")]
    NotUdpOrTcp,
    #[error("the copy of a {0}-byte frame is cut short")]
    Truncated(u32),
    #[error("not a DNS message: {0}")]
    Dns(#[source] hickory_proto::serialize::binary::DecodeError),
    #[error(transparent)]
    DnsTcp(#[from] DnsTcpError),
    #[error(transparent)]
    Handshake(#[from] StreamError),
    #[error("not a DHCPv4 message: {0}")]
    Dhcp4(#[source] dhcproto::error::DecodeError),
    #[error("not a DHCPv6 message: {0}")]
    Dhcp6(#[source] dhcproto::error::DecodeError),
    #[error("a DHCPv6 client DUID of {0} bytes (1 to {MAX_DUID} are valid)")]
    DuidLength(usize),
}

/// Reads the frames the kernel hands over. Holds what spans frames: DNS
/// responses over TCP in more than one segment, ClientHellos in more than
/// one segment or QUIC Initial.
#[derive(Default)]
pub struct WireReader {
    dns_tcp: DnsTcpStreams,
    hellos: HelloStreams,
}

impl WireReader {
    /// The facts of one handed-over frame (an empty list: a well-formed
    /// message that names nothing, e.g. an NXDOMAIN, or the first part of
    /// a DNS response over TCP).
    pub fn facts(
        &mut self,
        frame: &ObservedFrame<'_>,
        now: Instant,
    ) -> Result<Vec<Fact>, WireError> {
        let cut_short = (frame.bytes.len() as u32) < frame.frame_len;
        let sliced = if frame.ethernet {
            SlicedPacket::from_ethernet(frame.bytes)
        } else {
            SlicedPacket::from_ip(frame.bytes)
        };
        let packet = match sliced {
            Ok(packet) => packet,
            Err(_) if cut_short => return Err(WireError::Truncated(frame.frame_len)),
            Err(e) => return Err(WireError::Frame(e)),
        };
        // A response goes to the client that asked.
        let (src, dst) = match &packet.net {
            Some(NetSlice::Ipv4(ip)) => (
                IpAddr::V4(ip.header().source_addr()),
                IpAddr::V4(ip.header().destination_addr()),
            ),
            Some(NetSlice::Ipv6(ip)) => (
                IpAddr::V6(ip.header().source_addr()),
                IpAddr::V6(ip.header().destination_addr()),
            ),
            _ => return Err(WireError::NotIp),
        };
        match (&packet.transport, frame.kind) {
            (Some(TransportSlice::Udp(udp)), Kind::Dns) => dns(udp.payload(), dst),
            (Some(TransportSlice::Tcp(tcp)), Kind::Dns) => {
                let server = SocketAddr::new(src, tcp.source_port());
                let client = SocketAddr::new(dst, tcp.destination_port());
                let responses = self.dns_tcp.segment(
                    server,
                    client,
                    tcp.sequence_number(),
                    tcp.payload(),
                    now,
                )?;
                let mut facts = Vec::new();
                for response in responses {
                    facts.extend(dns(&response, dst)?);
                    if facts.len() >= MAX_FACTS {
                        facts.truncate(MAX_FACTS);
                        break;
                    }
                }
                Ok(facts)
            }
            (Some(TransportSlice::Udp(udp)), Kind::Dhcp) => match udp.destination_port() {
                67 | 68 => dhcp4(udp.payload()),
                _ => dhcp6(udp.payload()),
            },
            (Some(TransportSlice::Tcp(tcp)), Kind::Tls) => {
                let client = SocketAddr::new(src, tcp.source_port());
                let server = SocketAddr::new(dst, tcp.destination_port());
                let named = self.hellos.tcp_segment(
                    client,
                    server,
                    tcp.sequence_number(),
                    tcp.payload(),
                    now,
                )?;
                Ok(named.into_iter().map(server_fact).collect())
            }
            (Some(TransportSlice::Udp(udp)), Kind::Quic) => {
                let client = SocketAddr::new(src, udp.source_port());
                let server = SocketAddr::new(dst, udp.destination_port());
                let named = self
                    .hellos
                    .quic_datagram(client, server, udp.payload(), now)?;
                Ok(named.into_iter().map(server_fact).collect())
            }
            _ => Err(WireError::NotUdpOrTcp),
        }
    }
}

/// What a handshake's name says: its server's name, as its client knows it.
fn server_fact(named: super::hello::ServerName) -> Fact {
    Fact::Server {
        client: named.client.ip(),
        server: named.server.ip(),
        name: named.name,
        source: match named.source {
            HelloSource::TlsSni => Source::TlsSni,
            HelloSource::QuicSni => Source::QuicSni,
            HelloSource::TlsEchOuter => Source::TlsEchOuter,
        },
    }
}

/// A DNS response: each address it gives for the name the client asked
/// (through CNAMEs), as an [`Fact::Answer`].
pub fn dns(payload: &[u8], client: IpAddr) -> Result<Vec<Fact>, WireError> {
    let message = Message::from_vec(payload).map_err(WireError::Dns)?;
    let meta = &message.metadata;
    if meta.message_type != MessageType::Response
        || meta.op_code != OpCode::Query
        || meta.response_code != ResponseCode::NoError
    {
        return Ok(Vec::new());
    }
    // One question is what every resolver asks; a response with another
    // count is odd enough not to trust.
    let [query] = message.queries.as_slice() else {
        return Ok(Vec::new());
    };
    let asked = query.name.to_lowercase();
    let Some(name) = display_name(&asked) else {
        return Ok(Vec::new());
    };
    // The chain from the name asked: the name, the CNAME it points at, and
    // so on, in the order the server gave them.
    let mut chain: Vec<Name> = vec![asked];
    for _ in 0..MAX_CNAME_HOPS {
        let last = chain.last().cloned().unwrap_or_default();
        let next = message.answers.iter().find_map(|r| match &r.data {
            RData::CNAME(target) if r.name.to_lowercase() == last => Some(target.0.to_lowercase()),
            _ => None,
        });
        match next {
            Some(target) if !chain.contains(&target) => chain.push(target),
            _ => break,
        }
    }
    let mut facts = Vec::new();
    for record in &message.answers {
        let address = match &record.data {
            RData::A(a) => IpAddr::V4(a.0),
            RData::AAAA(aaaa) => IpAddr::V6(aaaa.0),
            _ => continue,
        };
        if !chain.contains(&record.name.to_lowercase()) {
            continue;
        }
        facts.push(Fact::Answer {
            client,
            address,
            name: name.clone(),
            ttl: record.ttl,
        });
        if facts.len() == MAX_FACTS {
            break;
        }
    }
    Ok(facts)
}

/// A name as labels show it: without the root's dot, and only if it is one
/// a label may carry (`model::series::usable_name`).
fn display_name(name: &Name) -> Option<String> {
    let text = name.to_utf8();
    let text = text.strip_suffix('.').unwrap_or(&text);
    usable_name(text).then(|| text.to_string())
}

/// A host name a DHCP client sent, as labels show it.
fn host_name(text: &str) -> Option<String> {
    let text = text.trim_end_matches('\0').trim();
    let text = text.strip_suffix('.').unwrap_or(text);
    usable_name(text).then(|| text.to_string())
}

/// DHCPv4: the name a client sends (option 81 FQDN, else option 12) in
/// DISCOVER, REQUEST and INFORM; the address a server gives in ACK.
pub fn dhcp4(payload: &[u8]) -> Result<Vec<Fact>, WireError> {
    let message = v4::Message::decode(&mut Decoder::new(payload)).map_err(WireError::Dhcp4)?;
    // hlen first: dhcproto 0.15's chaddr() slices by it and panics past
    // 16 (found by the property test below).
    if message.htype() != v4::HType::Eth || message.hlen() != 6 {
        return Ok(Vec::new());
    }
    let chaddr = message.chaddr();
    let mac: Mac = [
        chaddr[0], chaddr[1], chaddr[2], chaddr[3], chaddr[4], chaddr[5],
    ];
    let client = Client::Mac(mac);
    let opts = message.opts();
    let fqdn = match opts.get(v4::OptionCode::ClientFQDN) {
        Some(v4::DhcpOption::ClientFQDN(fqdn)) => display_name(fqdn.domain()),
        _ => None,
    };
    let name = fqdn.or_else(|| match opts.get(v4::OptionCode::Hostname) {
        Some(v4::DhcpOption::Hostname(name)) => host_name(name),
        _ => None,
    });
    let mut facts = Vec::new();
    if let Some(name) = name {
        facts.push(Fact::ClientName {
            client: client.clone(),
            name,
        });
    }
    if opts.msg_type() == Some(v4::MessageType::Ack) {
        let given = match message.yiaddr() {
            Ipv4Addr::UNSPECIFIED => message.ciaddr(),
            given => given,
        };
        if !given.is_unspecified() {
            facts.push(Fact::Lease {
                client,
                address: IpAddr::V4(given),
            });
        }
    }
    Ok(facts)
}

/// DHCPv6: the name a client sends (Client FQDN, option 39) and the
/// addresses a server gives in a REPLY (IA_NA), tied by the client's DUID.
pub fn dhcp6(payload: &[u8]) -> Result<Vec<Fact>, WireError> {
    let message = v6::Message::decode(&mut Decoder::new(payload)).map_err(WireError::Dhcp6)?;
    let opts = message.opts();
    let Some(v6::DhcpOption::ClientId(duid)) = opts.get(v6::OptionCode::ClientId) else {
        return Ok(Vec::new());
    };
    if duid.is_empty() || duid.len() > MAX_DUID {
        return Err(WireError::DuidLength(duid.len()));
    }
    let client = client_of_duid(duid);
    let mut facts = Vec::new();
    for opt in opts.iter() {
        match opt {
            v6::DhcpOption::Unknown(unknown) if unknown.code() == v6::OptionCode::ClientFqdn => {
                // Flags, then the name in DNS wire format (RFC 4704).
                let data = unknown.data();
                let name = data
                    .get(1..)
                    .and_then(|wire| Name::read(&mut BinDecoder::new(wire)).ok())
                    .and_then(|name| display_name(&name));
                if let Some(name) = name {
                    facts.push(Fact::ClientName {
                        client: client.clone(),
                        name,
                    });
                }
            }
            v6::DhcpOption::IANA(ia) if message.msg_type() == v6::MessageType::Reply => {
                for inner in ia.opts.iter() {
                    if let v6::DhcpOption::IAAddr(addr) = inner
                        && addr.valid_life != 0
                    {
                        facts.push(Fact::Lease {
                            client: client.clone(),
                            address: IpAddr::V6(addr.addr),
                        });
                    }
                }
            }
            _ => {}
        }
        if facts.len() >= MAX_FACTS {
            facts.truncate(MAX_FACTS);
            break;
        }
    }
    Ok(facts)
}

/// A DUID that holds the client's Ethernet MAC (DUID-LLT, DUID-LL) names
/// the same device as its DHCPv4 messages and its frames do.
fn client_of_duid(duid: &[u8]) -> Client {
    let mac_at = match duid {
        // DUID-LLT: type 1, hardware type 1 (Ethernet), 4 bytes of time.
        [0, 1, 0, 1, ..] if duid.len() == 14 => Some(8),
        // DUID-LL: type 3, hardware type 1.
        [0, 3, 0, 1, ..] if duid.len() == 10 => Some(4),
        _ => None,
    };
    match mac_at {
        Some(at) => {
            let mut mac = [0u8; 6];
            mac.copy_from_slice(&duid[at..at + 6]);
            Client::Mac(mac)
        }
        None => Client::Duid(duid.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::{
        op::Query,
        rr::{Record, RecordType, rdata},
        serialize::binary::BinEncodable as _,
    };
    use proptest::prelude::*;

    const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2));

    fn response(asked: &str, answers: Vec<Record>) -> Vec<u8> {
        let mut m = Message::response(7, OpCode::Query);
        m.add_query(Query::query(
            Name::from_ascii(asked).unwrap(),
            RecordType::A,
        ));
        for a in answers {
            m.add_answer(a);
        }
        m.to_bytes().unwrap()
    }

    fn a(name: &str, ttl: u32, ip: [u8; 4]) -> Record {
        Record::from_rdata(
            Name::from_ascii(name).unwrap(),
            ttl,
            RData::A(rdata::A(ip.into())),
        )
    }

    fn cname(name: &str, target: &str) -> Record {
        Record::from_rdata(
            Name::from_ascii(name).unwrap(),
            300,
            RData::CNAME(rdata::CNAME(Name::from_ascii(target).unwrap())),
        )
    }

    #[test]
    fn a_cname_chain_names_the_address_by_the_name_asked() {
        let bytes = response(
            "www.Example.test.",
            vec![
                cname("www.example.test.", "edge.cdn.test."),
                cname("edge.cdn.test.", "e1.cdn.test."),
                a("e1.cdn.test.", 20, [198, 18, 1, 1]),
                // Not on the chain: a spoofed extra.
                a("other.test.", 20, [198, 18, 1, 9]),
            ],
        );
        assert_eq!(
            dns(&bytes, CLIENT).unwrap(),
            vec![Fact::Answer {
                client: CLIENT,
                address: "198.18.1.1".parse().unwrap(),
                name: "www.example.test".into(),
                ttl: 20,
            }]
        );
    }

    #[test]
    fn a_cname_loop_ends() {
        let bytes = response(
            "a.test.",
            vec![
                cname("a.test.", "b.test."),
                cname("b.test.", "a.test."),
                a("b.test.", 5, [198, 18, 1, 2]),
            ],
        );
        assert_eq!(dns(&bytes, CLIENT).unwrap().len(), 1);
    }

    #[test]
    fn errors_and_queries_name_nothing() {
        let mut m = Message::response(1, OpCode::Query);
        m.metadata.response_code = ResponseCode::NXDomain;
        m.add_query(Query::query(
            Name::from_ascii("x.test.").unwrap(),
            RecordType::A,
        ));
        m.add_answer(a("x.test.", 5, [198, 18, 1, 3]));
        assert_eq!(dns(&m.to_bytes().unwrap(), CLIENT).unwrap(), vec![]);
        let mut q = Message::query();
        q.add_query(Query::query(
            Name::from_ascii("x.test.").unwrap(),
            RecordType::A,
        ));
        assert_eq!(dns(&q.to_bytes().unwrap(), CLIENT).unwrap(), vec![]);
    }

    #[test]
    fn a_huge_answer_keeps_the_first_facts() {
        let answers = (0..1000u32)
            .map(|i| a("many.test.", 5, [198, 18, (i >> 8) as u8, i as u8]))
            .collect();
        let bytes = response("many.test.", answers);
        assert_eq!(dns(&bytes, CLIENT).unwrap().len(), MAX_FACTS);
    }

    #[test]
    fn a_compression_pointer_loop_is_malformed() {
        // Header with one question whose name is a pointer to itself.
        let mut bytes = vec![0, 1, 0x81, 0x80, 0, 1, 0, 0, 0, 0, 0, 0];
        bytes.extend([0xc0, 12, 0, 1, 0, 1]);
        assert!(matches!(dns(&bytes, CLIENT), Err(WireError::Dns(_))));
    }

    /// A TCP segment from the DNS server to the client, as the kernel
    /// hands it over.
    fn tcp_frame(seq: u32, payload: &[u8]) -> Vec<u8> {
        let IpAddr::V4(client) = CLIENT else {
            unreachable!()
        };
        let mut frame = Vec::new();
        etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv4([198, 18, 1, 53], client.octets(), 64)
            .tcp(53, 40_000, seq, 65_535)
            .write(&mut frame, payload)
            .unwrap();
        frame
    }

    fn facts_of(reader: &mut WireReader, frame: &[u8]) -> Result<Vec<Fact>, WireError> {
        let observed = ObservedFrame {
            ifindex: 1,
            hook: ntm_common::Hook::Ingress,
            kind: Kind::Dns,
            ethernet: true,
            frame_len: frame.len() as u32,
            bytes: frame,
        };
        reader.facts(&observed, Instant::now())
    }

    #[test]
    fn tcp_responses_follow_their_length_across_segments() {
        let mut reader = WireReader::default();
        let one = response("t.test.", vec![a("t.test.", 5, [198, 18, 1, 4])]);
        let mut segment = Vec::new();
        for _ in 0..2 {
            segment.extend((one.len() as u16).to_be_bytes());
            segment.extend(&one);
        }
        assert_eq!(
            facts_of(&mut reader, &tcp_frame(1, &segment))
                .unwrap()
                .len(),
            2
        );
        // A long answer (100 records) in three segments, the last one first
        // after the one that begins it.
        let answers = (0..100u8)
            .map(|i| a("long.test.", 60, [198, 18, 2, i]))
            .collect();
        let long = response("long.test.", answers);
        let mut stream = (long.len() as u16).to_be_bytes().to_vec();
        stream.extend(&long);
        assert!(stream.len() > 1000, "{}", stream.len());
        let third = stream.len() / 3;
        let pieces = [(0, &stream[..third]), (2 * third, &stream[2 * third..])];
        let start = 1_000_000u32;
        for (at, piece) in pieces {
            let frame = tcp_frame(start + at as u32, piece);
            assert_eq!(facts_of(&mut reader, &frame).unwrap(), vec![]);
        }
        let frame = tcp_frame(start + third as u32, &stream[third..2 * third]);
        let facts = facts_of(&mut reader, &frame).unwrap();
        assert_eq!(facts.len(), MAX_FACTS);
        assert!(matches!(&facts[0], Fact::Answer { name, .. } if name == "long.test"));
        // A response cut off and never completed names nothing.
        let frame = tcp_frame(9, &segment[..10]);
        assert_eq!(facts_of(&mut reader, &frame).unwrap(), vec![]);
    }

    #[test]
    fn duids_with_a_mac_name_the_device_by_it() {
        let llt = [0, 1, 0, 1, 1, 2, 3, 4, 2, 0, 0, 0, 0, 7];
        assert_eq!(client_of_duid(&llt), Client::Mac([2, 0, 0, 0, 0, 7]));
        let ll = [0, 3, 0, 1, 2, 0, 0, 0, 0, 8];
        assert_eq!(client_of_duid(&ll), Client::Mac([2, 0, 0, 0, 0, 8]));
        let uuid = [0, 4, 1, 2, 3];
        assert_eq!(client_of_duid(&uuid), Client::Duid(uuid.into()));
    }

    fn dhcp4_request(name: &str) -> Vec<u8> {
        use dhcproto::Encodable as _;
        let mut m = v4::Message::default();
        m.set_chaddr(&[2, 0, 0, 0, 0, 7]);
        m.opts_mut()
            .insert(v4::DhcpOption::MessageType(v4::MessageType::Request));
        m.opts_mut()
            .insert(v4::DhcpOption::Hostname(name.to_string()));
        m.to_vec().unwrap()
    }

    fn dhcp6_request(fqdn: &str) -> Vec<u8> {
        use dhcproto::Encodable as _;
        let mut m = v6::Message::new(v6::MessageType::Request);
        m.opts_mut()
            .insert(v6::DhcpOption::ClientId(vec![0, 3, 0, 1, 2, 0, 0, 0, 0, 8]));
        let mut wire = vec![1];
        wire.extend(Name::from_ascii(fqdn).unwrap().to_bytes().unwrap());
        m.opts_mut()
            .insert(v6::DhcpOption::Unknown(v6::UnknownOption::new(
                v6::OptionCode::ClientFqdn,
                wire,
            )));
        m.to_vec().unwrap()
    }

    #[test]
    fn dhcp_clients_name_themselves_by_mac_or_duid() {
        assert_eq!(
            dhcp4(&dhcp4_request("phone")).unwrap(),
            vec![Fact::ClientName {
                client: Client::Mac([2, 0, 0, 0, 0, 7]),
                name: "phone".into()
            }]
        );
        assert_eq!(
            dhcp6(&dhcp6_request("phone.test.")).unwrap(),
            vec![Fact::ClientName {
                client: Client::Mac([2, 0, 0, 0, 0, 8]),
                name: "phone.test".into()
            }]
        );
    }

    #[test]
    fn a_dhcpv6_reply_ties_its_addresses_to_the_client() {
        use dhcproto::Encodable as _;
        let mut reply = v6::Message::new(v6::MessageType::Reply);
        reply.opts_mut().insert(v6::DhcpOption::ClientId(vec![
            0, 4, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9,
        ]));
        let mut ia = v6::IANA {
            id: 1,
            t1: 0,
            t2: 0,
            opts: v6::DhcpOptions::new(),
        };
        for (addr, valid) in [("2001:2::100", 3600), ("2001:2::101", 0)] {
            ia.opts.insert(v6::DhcpOption::IAAddr(v6::IAAddr {
                addr: addr.parse().unwrap(),
                preferred_life: valid,
                valid_life: valid,
                opts: v6::DhcpOptions::new(),
            }));
        }
        reply.opts_mut().insert(v6::DhcpOption::IANA(ia));
        let facts = dhcp6(&reply.to_vec().unwrap()).unwrap();
        let duid: Box<[u8]> = vec![0, 4, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9].into();
        assert_eq!(
            facts,
            vec![Fact::Lease {
                client: Client::Duid(duid),
                address: "2001:2::100".parse().unwrap(),
            }],
            "a lease with no valid lifetime left is over"
        );
    }

    #[test]
    fn a_dhcpv4_ack_gives_the_address() {
        use dhcproto::Encodable as _;
        let mut ack = v4::Message::default();
        ack.set_opcode(v4::Opcode::BootReply)
            .set_chaddr(&[2, 0, 0, 0, 0, 7])
            .set_yiaddr(Ipv4Addr::new(198, 18, 0, 120));
        ack.opts_mut()
            .insert(v4::DhcpOption::MessageType(v4::MessageType::Ack));
        assert_eq!(
            dhcp4(&ack.to_vec().unwrap()).unwrap(),
            vec![Fact::Lease {
                client: Client::Mac([2, 0, 0, 0, 0, 7]),
                address: "198.18.0.120".parse().unwrap(),
            }]
        );
    }

    #[test]
    fn host_names_are_trimmed_and_checked() {
        assert_eq!(host_name("phone\0"), Some("phone".into()));
        assert_eq!(host_name("a b"), None);
        assert_eq!(host_name(""), None);
        assert_eq!(
            host_name("<img src=x onerror=alert(1)>"),
            None,
            "a space makes it unusable as a label"
        );
        assert_eq!(
            host_name("<script>"),
            Some("<script>".into()),
            "escaped downstream"
        );
    }

    /// Refusals say what failed once, keep the parser's error as their
    /// source, and stay small (a flood of garbage builds one per frame).
    #[test]
    fn refusals_keep_their_cause() {
        use std::error::Error as _;
        assert!(std::mem::size_of::<WireError>() <= 64);
        let refusals = [
            dns(&[0, 1, 2], CLIENT).unwrap_err(),
            dhcp4(&[1, 2, 3]).unwrap_err(),
            dhcp6(&[]).unwrap_err(),
        ];
        for e in refusals {
            let cause = e.source().expect("a source").to_string();
            assert_eq!(e.to_string().matches(&cause).count(), 1, "{e}");
        }
        assert!(matches!(dhcp4(&[1, 2, 3]), Err(WireError::Dhcp4(_))));
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 20000, ..ProptestConfig::default() })]

        /// Any bytes: an error or facts, within the bound; never a panic.
        #[test]
        fn any_bytes_are_parsed_or_refused(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let results = [dns(&bytes, CLIENT), dhcp4(&bytes), dhcp6(&bytes)];
            for facts in results.into_iter().flatten() {
                prop_assert!(facts.len() <= MAX_FACTS);
            }
        }

        /// Real DHCPv4 and DHCPv6 messages with bytes flipped and cut: the same.
        #[test]
        fn mutated_dhcp_messages_are_parsed_or_refused(
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
            cut in any::<usize>(),
        ) {
            for mut bytes in [dhcp4_request("phone"), dhcp6_request("phone.test.")] {
                for (at, value) in &flips {
                    let len = bytes.len();
                    bytes[at % len] = *value;
                }
                bytes.truncate(cut % (bytes.len() + 1));
                for facts in [dhcp4(&bytes), dhcp6(&bytes)].into_iter().flatten() {
                    prop_assert!(facts.len() <= MAX_FACTS);
                }
            }
        }

        /// A real response with bytes flipped: the same.
        #[test]
        fn mutated_responses_are_parsed_or_refused(
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
            cut in any::<usize>(),
        ) {
            let mut bytes = response("m.test.", vec![
                cname("m.test.", "n.test."),
                a("n.test.", 5, [198, 18, 1, 5]),
            ]);
            for (at, value) in flips {
                let len = bytes.len();
                bytes[at % len] = value;
            }
            bytes.truncate(cut % (bytes.len() + 1));
            if let Ok(facts) = dns(&bytes, CLIENT) {
                prop_assert!(facts.len() <= MAX_FACTS);
            }
        }
    }
}
