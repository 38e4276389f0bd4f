//! IPFIX messages (RFC 7011): ntm's templates and its flow records.
//!
//! Written by hand: no maintained crate writes IPFIX at this cost.
//! Checked: netflow_parser 1.0 (a parser whose serializer goes through its
//! own object model, a vector of field values per record, allocating per
//! field: more than the drain costs per flow at a million flows per
//! interval; the unit tests below read ntm's messages back with it),
//! rustflow_core (the core of an application, the same per-field values),
//! ipfix 0.1 (a parser, unmaintained since 2017). ntm's templates are
//! fixed, so a record is a few big-endian writes into one buffer.

use ntm_common::{Counters, FlowKey, Hook, family, ipproto, key_flags};

/// The IPFIX version number.
const VERSION: u16 = 10;
/// Set ids of template and options template sets.
const TEMPLATE_SET: u16 = 2;
const OPTIONS_TEMPLATE_SET: u16 = 3;
/// ntm's templates.
pub const IPV4_TEMPLATE: u16 = 256;
pub const IPV6_TEMPLATE: u16 = 257;
/// Frames that are not IP (ARP, LLDP, ...), by EtherType.
pub const NON_IP_TEMPLATE: u16 = 258;
/// The options template of the sampling: every packet (1 of 1), which
/// collectors such as Akvorado require.
pub const SAMPLING_TEMPLATE: u16 = 259;
/// Frames counted outside the flow table (it was full, or the frame could
/// not be parsed): no addresses; `applicationName` says what they are.
pub const OUTSIDE_TEMPLATE: u16 = 260;

/// A field of variable length (RFC 7011, section 7).
const VARIABLE: u16 = 0xFFFF;

/// A field of a template: an information element and its length.
type Field = (u16, u16);

/// Information elements (IANA's IPFIX registry), with their lengths here.
mod ie {
    pub const OCTET_DELTA_COUNT: (u16, u16) = (1, 8);
    pub const PACKET_DELTA_COUNT: (u16, u16) = (2, 8);
    pub const PROTOCOL_IDENTIFIER: (u16, u16) = (4, 1);
    pub const SOURCE_TRANSPORT_PORT: (u16, u16) = (7, 2);
    pub const SOURCE_IPV4_ADDRESS: (u16, u16) = (8, 4);
    pub const INGRESS_INTERFACE: (u16, u16) = (10, 4);
    pub const DESTINATION_TRANSPORT_PORT: (u16, u16) = (11, 2);
    pub const DESTINATION_IPV4_ADDRESS: (u16, u16) = (12, 4);
    pub const EGRESS_INTERFACE: (u16, u16) = (14, 4);
    pub const SOURCE_IPV6_ADDRESS: (u16, u16) = (27, 16);
    pub const DESTINATION_IPV6_ADDRESS: (u16, u16) = (28, 16);
    pub const ICMP_TYPE_CODE_IPV4: (u16, u16) = (32, 2);
    pub const SAMPLING_INTERVAL: (u16, u16) = (34, 4);
    pub const VLAN_ID: (u16, u16) = (58, 2);
    pub const IP_VERSION: (u16, u16) = (60, 1);
    pub const FLOW_DIRECTION: (u16, u16) = (61, 1);
    pub const INTERFACE_NAME: (u16, u16) = (82, super::VARIABLE);
    pub const APPLICATION_NAME: (u16, u16) = (96, super::VARIABLE);
    pub const ICMP_TYPE_CODE_IPV6: (u16, u16) = (139, 2);
    pub const OBSERVATION_DOMAIN_ID: (u16, u16) = (149, 4);
    pub const FLOW_START_MILLISECONDS: (u16, u16) = (152, 8);
    pub const FLOW_END_MILLISECONDS: (u16, u16) = (153, 8);
    pub const ETHERNET_TYPE: (u16, u16) = (256, 2);
    pub const SAMPLING_PACKET_INTERVAL: (u16, u16) = (305, 4);
    pub const SAMPLING_PACKET_SPACE: (u16, u16) = (306, 4);
}

/// The fields every flow record starts with (counts and times), then
/// those of its template, then the interface: in template order.
const COMMON: [(u16, u16); 4] = [
    ie::OCTET_DELTA_COUNT,
    ie::PACKET_DELTA_COUNT,
    ie::FLOW_START_MILLISECONDS,
    ie::FLOW_END_MILLISECONDS,
];
const IPV4: [(u16, u16); 7] = [
    ie::SOURCE_IPV4_ADDRESS,
    ie::DESTINATION_IPV4_ADDRESS,
    ie::SOURCE_TRANSPORT_PORT,
    ie::DESTINATION_TRANSPORT_PORT,
    ie::ICMP_TYPE_CODE_IPV4,
    ie::PROTOCOL_IDENTIFIER,
    ie::IP_VERSION,
];
const IPV6: [(u16, u16); 7] = [
    ie::SOURCE_IPV6_ADDRESS,
    ie::DESTINATION_IPV6_ADDRESS,
    ie::SOURCE_TRANSPORT_PORT,
    ie::DESTINATION_TRANSPORT_PORT,
    ie::ICMP_TYPE_CODE_IPV6,
    ie::PROTOCOL_IDENTIFIER,
    ie::IP_VERSION,
];
const NON_IP: [(u16, u16); 1] = [ie::ETHERNET_TYPE];
const OUTSIDE: [(u16, u16); 0] = [];
/// After the interface fields of the outside records.
const WHAT: [(u16, u16); 1] = [ie::APPLICATION_NAME];
const INTERFACE: [(u16, u16); 5] = [
    ie::FLOW_DIRECTION,
    ie::INGRESS_INTERFACE,
    ie::EGRESS_INTERFACE,
    ie::VLAN_ID,
    ie::INTERFACE_NAME,
];

/// Longest interface name written (Linux's IFNAMSIZ less its NUL).
const MAX_NAME: usize = 15;

/// One flow's counts over an export interval.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlowRecord {
    pub key: FlowKey,
    pub counts: Counters,
    /// Unix milliseconds of its first and last counts in the interval.
    pub start_ms: u64,
    pub end_ms: u64,
}

/// Frames counted outside the flow table on one interface and hook, for
/// one reason, over an export interval.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutsideRecord {
    pub ifindex: u32,
    pub hook: Hook,
    /// `ntm:` and the reason (`ntm:table_full`, `ntm:malformed_ipv4`, as
    /// `<prefix>_outside_flow_table_bytes_total{reason}` says).
    pub what: String,
    pub counts: Counters,
    pub start_ms: u64,
    pub end_ms: u64,
}

/// Which template a flow's record is in.
fn template_of(key: &FlowKey) -> u16 {
    match key.family {
        family::IPV4 => IPV4_TEMPLATE,
        family::IPV6 => IPV6_TEMPLATE,
        _ => NON_IP_TEMPLATE,
    }
}

/// The exporter's side of one collector: its observation domain, the
/// data records sent so far (the header's sequence number) and the
/// message size limit.
#[derive(Debug)]
pub struct Encoder {
    domain: u32,
    /// Data records sent before the next message (RFC 7011, section 3.1:
    /// template records do not count).
    sequence: u32,
    max_message: usize,
}

impl Encoder {
    /// `max_message`: the largest message in bytes (the path MTU less the
    /// IP and UDP headers; at least enough for the templates).
    pub fn new(domain: u32, max_message: usize) -> Self {
        Self {
            domain,
            sequence: 0,
            max_message: max_message.max(512),
        }
    }

    /// One message with every template and the options template, and the
    /// sampling's options record.
    pub fn templates(&mut self, export_time: u32) -> Vec<u8> {
        let mut message = Message::start(self.domain, self.sequence, export_time);
        message.open_set(TEMPLATE_SET);
        let templates: [(u16, &[Field], &[Field]); 4] = [
            (IPV4_TEMPLATE, &IPV4, &[]),
            (IPV6_TEMPLATE, &IPV6, &[]),
            (NON_IP_TEMPLATE, &NON_IP, &[]),
            (OUTSIDE_TEMPLATE, &OUTSIDE, &WHAT),
        ];
        for (id, own, after) in templates {
            let fields: Vec<(u16, u16)> = COMMON
                .iter()
                .chain(own)
                .chain(INTERFACE.iter())
                .chain(after)
                .copied()
                .collect();
            message.u16(id);
            message.u16(fields.len() as u16);
            for (element, length) in fields {
                message.u16(element);
                message.u16(length);
            }
        }
        message.close_set();
        message.open_set(OPTIONS_TEMPLATE_SET);
        let scope = [ie::OBSERVATION_DOMAIN_ID];
        let options = [
            ie::SAMPLING_INTERVAL,
            ie::SAMPLING_PACKET_INTERVAL,
            ie::SAMPLING_PACKET_SPACE,
        ];
        message.u16(SAMPLING_TEMPLATE);
        message.u16((scope.len() + options.len()) as u16);
        message.u16(scope.len() as u16);
        for (element, length) in scope.iter().chain(&options) {
            message.u16(*element);
            message.u16(*length);
        }
        message.close_set();
        // Every packet is counted: 1 of 1, none skipped.
        message.open_set(SAMPLING_TEMPLATE);
        message.u32(self.domain);
        message.u32(1);
        message.u32(1);
        message.u32(0);
        message.close_set();
        self.sequence = self.sequence.wrapping_add(1);
        message.finish()
    }

    /// The records of `flows`, then those of the counts outside the flow
    /// table, as messages of at most the size limit, each with the data
    /// set of one template, with how many records each holds; `names`
    /// gives an interface's name by index.
    pub fn records<'n>(
        &mut self,
        flows: &[FlowRecord],
        outside: &[OutsideRecord],
        export_time: u32,
        names: impl Fn(u32) -> Option<&'n str>,
        out: &mut Vec<(Vec<u8>, u32)>,
    ) {
        let name_of = |ifindex: u32| {
            let name = names(ifindex).unwrap_or("");
            &name.as_bytes()[..name.len().min(MAX_NAME)]
        };
        for template in [IPV4_TEMPLATE, IPV6_TEMPLATE, NON_IP_TEMPLATE] {
            let mut set = SetWriter::new(self, template, export_time, out);
            for flow in flows.iter().filter(|f| template_of(&f.key) == template) {
                let name = name_of(flow.key.ifindex);
                set.push(record_len(template, name.len()), |m| m.record(flow, name));
            }
            set.finish();
        }
        let mut set = SetWriter::new(self, OUTSIDE_TEMPLATE, export_time, out);
        for record in outside {
            let name = name_of(record.ifindex);
            let what = record.what.as_bytes();
            let len = fixed_len(&COMMON) + fixed_len(&INTERFACE) + 1 + name.len() + 1 + what.len();
            set.push(len, |m| m.outside(record, name));
        }
        set.finish();
    }
}

/// Writes the records of one template into messages within the size
/// limit, counting them into the sequence number as each message is done.
struct SetWriter<'a> {
    encoder: &'a mut Encoder,
    template: u16,
    export_time: u32,
    message: Option<Message>,
    in_message: u32,
    out: &'a mut Vec<(Vec<u8>, u32)>,
}

impl<'a> SetWriter<'a> {
    fn new(
        encoder: &'a mut Encoder,
        template: u16,
        export_time: u32,
        out: &'a mut Vec<(Vec<u8>, u32)>,
    ) -> Self {
        Self {
            encoder,
            template,
            export_time,
            message: None,
            in_message: 0,
            out,
        }
    }

    /// Adds a record of `len` bytes, written by `write`.
    fn push(&mut self, len: usize, write: impl FnOnce(&mut Message)) {
        let max = self.encoder.max_message;
        if let Some(full) = self.message.take_if(|m| m.buf.len() + len > max) {
            self.out.push((full.finish_set(), self.in_message));
            self.encoder.sequence = self.encoder.sequence.wrapping_add(self.in_message);
            self.in_message = 0;
        }
        let (domain, sequence, template) =
            (self.encoder.domain, self.encoder.sequence, self.template);
        let export_time = self.export_time;
        let message = self.message.get_or_insert_with(|| {
            let mut m = Message::start(domain, sequence, export_time);
            m.open_set(template);
            m
        });
        write(message);
        self.in_message += 1;
    }

    fn finish(mut self) {
        if let Some(last) = self.message.take() {
            self.out.push((last.finish_set(), self.in_message));
            self.encoder.sequence = self.encoder.sequence.wrapping_add(self.in_message);
        }
    }
}

/// The bytes of the fixed-length fields of `fields`.
fn fixed_len(fields: &[(u16, u16)]) -> usize {
    fields
        .iter()
        .filter(|(_, l)| *l != VARIABLE)
        .map(|(_, l)| *l as usize)
        .sum()
}

/// The encoded length of one record of `template` with an interface name
/// of `name_len` bytes.
fn record_len(template: u16, name_len: usize) -> usize {
    let own = match template {
        IPV4_TEMPLATE => fixed_len(&IPV4),
        IPV6_TEMPLATE => fixed_len(&IPV6),
        _ => fixed_len(&NON_IP),
    };
    fixed_len(&COMMON) + own + fixed_len(&INTERFACE) + 1 + name_len
}

/// A message being written.
struct Message {
    buf: Vec<u8>,
    /// Where the open set starts.
    set: Option<usize>,
}

impl Message {
    fn start(domain: u32, sequence: u32, export_time: u32) -> Self {
        let mut m = Self {
            buf: Vec::with_capacity(1500),
            set: None,
        };
        m.u16(VERSION);
        m.u16(0); // The length, once known.
        m.u32(export_time);
        m.u32(sequence);
        m.u32(domain);
        m
    }

    fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.buf.extend_from_slice(&v.to_be_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_be_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_be_bytes());
    }

    fn open_set(&mut self, id: u16) {
        self.set = Some(self.buf.len());
        self.u16(id);
        self.u16(0);
    }

    fn close_set(&mut self) {
        if let Some(start) = self.set.take() {
            let len = (self.buf.len() - start) as u16;
            self.buf[start + 2..start + 4].copy_from_slice(&len.to_be_bytes());
        }
    }

    fn finish_set(mut self) -> Vec<u8> {
        self.close_set();
        self.finish()
    }

    fn finish(mut self) -> Vec<u8> {
        let len = self.buf.len() as u16;
        self.buf[2..4].copy_from_slice(&len.to_be_bytes());
        self.buf
    }

    fn record(&mut self, flow: &FlowRecord, name: &[u8]) {
        let key = &flow.key;
        self.u64(flow.counts.bytes);
        self.u64(flow.counts.packets);
        self.u64(flow.start_ms);
        self.u64(flow.end_ms);
        match key.family {
            family::IPV4 | family::IPV6 => {
                let (src_port, dst_port, icmp) = ports(key);
                if key.family == family::IPV4 {
                    self.buf.extend_from_slice(&key.src[..4]);
                    self.buf.extend_from_slice(&key.dst[..4]);
                } else {
                    self.buf.extend_from_slice(&key.src);
                    self.buf.extend_from_slice(&key.dst);
                }
                self.u16(src_port);
                self.u16(dst_port);
                self.u16(icmp);
                self.u8(key.proto);
                self.u8(if key.family == family::IPV4 { 4 } else { 6 });
            }
            _ => self.u16(key.port),
        }
        let hook = Hook::from_u8(key.hook).unwrap_or(Hook::Ingress);
        self.interface(key.ifindex, hook, key.vlan_id, name);
    }

    fn outside(&mut self, record: &OutsideRecord, name: &[u8]) {
        self.u64(record.counts.bytes);
        self.u64(record.counts.packets);
        self.u64(record.start_ms);
        self.u64(record.end_ms);
        self.interface(record.ifindex, record.hook, 0, name);
        self.u8(record.what.len() as u8);
        self.buf.extend_from_slice(record.what.as_bytes());
    }

    /// The interface fields: the hook as `flowDirection`, the index on its
    /// side, the VLAN, the name.
    fn interface(&mut self, ifindex: u32, hook: Hook, vlan: u16, name: &[u8]) {
        let (ingress, egress) = match hook {
            Hook::Ingress => (ifindex, 0),
            Hook::Egress => (0, ifindex),
        };
        self.u8(hook as u8);
        self.u32(ingress);
        self.u32(egress);
        self.u16(vlan);
        self.u8(name.len() as u8);
        self.buf.extend_from_slice(name);
    }
}

/// The source and destination ports and the ICMP type and code of an IP
/// flow's record. ntm keys a flow by its service port, on the side the
/// kernel saw it (`key_flags::SERVICE_PORT_IS_SRC`); the other port is 0.
/// An ICMP flow is keyed by its type (the code is 0).
fn ports(key: &FlowKey) -> (u16, u16, u16) {
    if key.flags & key_flags::L4_MISSING != 0 {
        return (0, 0, 0);
    }
    match key.proto {
        ipproto::ICMP | ipproto::ICMPV6 => (0, 0, key.port << 8),
        _ if key.flags & key_flags::SERVICE_PORT_IS_SRC != 0 => (key.port, 0, 0),
        _ => (0, key.port, 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netflow_parser::{NetflowPacket, NetflowParser, variable_versions::ipfix::FlowSetBody};
    use ntm_common::test_util::KeyBuilder;

    fn flow(key: FlowKey, bytes: u64) -> FlowRecord {
        FlowRecord {
            key,
            counts: Counters { bytes, packets: 3 },
            start_ms: 1_700_000_000_000,
            end_ms: 1_700_000_010_000,
        }
    }

    /// The fields of each data record netflow_parser reads back, by IE
    /// name, as text.
    fn read_back(parser: &mut NetflowParser, message: &[u8]) -> Vec<String> {
        let mut records = Vec::new();
        for packet in parser.parse_bytes(message).packets {
            let NetflowPacket::IPFix(ipfix) = packet else {
                panic!("not IPFIX: {packet:?}");
            };
            for set in ipfix.flowsets {
                match set.body {
                    FlowSetBody::Data(data) => {
                        records.extend(data.fields.iter().map(|r| format!("{r:?}")))
                    }
                    FlowSetBody::NoTemplate(info) => panic!("no template: {info:?}"),
                    _ => {}
                }
            }
        }
        records
    }

    #[test]
    fn messages_read_back_with_a_parser_and_stay_within_the_size_limit() {
        let mut encoder = Encoder::new(7, 1400);
        let mut parser = NetflowParser::default();
        let templates = encoder.templates(1_700_000_010);
        assert!(templates.len() <= 1400);
        assert_eq!(&templates[..2], &[0, 10]);
        read_back(&mut parser, &templates);

        let server_side = KeyBuilder::v4([198, 18, 0, 1], [198, 18, 0, 2])
            .proto(ipproto::TCP)
            .port(443)
            .build();
        let mut from_server = server_side;
        from_server.flags |= key_flags::SERVICE_PORT_IS_SRC;
        let v6 = FlowKey::v6_udp(
            [0x2001, 2, 0, 0, 0, 0, 0, 1],
            [0x2001, 2, 0, 0, 0, 0, 0, 2],
            53,
        );
        let mut flows = vec![
            flow(server_side, 1 << 33),
            flow(from_server, 99),
            flow(v6, 500),
        ];
        // Enough records for several messages.
        for i in 0..200u32 {
            let key = KeyBuilder::v4([198, 18, 1, (i % 250) as u8], [198, 18, 2, 1])
                .proto(ipproto::UDP)
                .port(1000 + i as u16)
                .build();
            flows.push(flow(key, i as u64));
        }
        let mut out = Vec::new();
        let outside = [OutsideRecord {
            ifindex: 2,
            hook: Hook::Egress,
            what: "ntm:table_full".into(),
            counts: Counters {
                bytes: 1000,
                packets: 10,
            },
            start_ms: 1,
            end_ms: 2,
        }];
        encoder.records(&flows, &outside, 1_700_000_010, |_| Some("eth0"), &mut out);
        assert!(out.len() > 2, "{} messages", out.len());
        let mut records = Vec::new();
        let mut sequence = 1; // The options record of the templates.
        for (message, count) in &out {
            assert!(message.len() <= 1400, "{}", message.len());
            let length = u16::from_be_bytes([message[2], message[3]]) as usize;
            assert_eq!(length, message.len());
            let seq = u32::from_be_bytes(message[8..12].try_into().unwrap());
            assert_eq!(seq, sequence, "the sequence counts data records only");
            let read = read_back(&mut parser, message);
            assert_eq!(read.len() as u32, *count);
            sequence += read.len() as u32;
            records.extend(read);
        }
        assert_eq!(records.len(), flows.len() + outside.len());
        assert!(
            records.last().unwrap().contains("ntm:table_full"),
            "{records:?}"
        );
        let first = &records[0];
        assert!(first.contains("8589934592"), "a count above 2^32: {first}");
        assert!(first.contains("443"), "{first}");
        assert!(records.iter().any(|r| r.contains("eth0")));
    }

    #[test]
    fn the_service_port_is_on_its_real_side_and_icmp_has_its_type() {
        let mut key = KeyBuilder::v4([198, 18, 0, 1], [198, 18, 0, 2])
            .proto(ipproto::TCP)
            .port(443)
            .build();
        assert_eq!(ports(&key), (0, 443, 0));
        key.flags |= key_flags::SERVICE_PORT_IS_SRC;
        assert_eq!(ports(&key), (443, 0, 0));
        let echo = KeyBuilder::v4([198, 18, 0, 1], [198, 18, 0, 2])
            .proto(ipproto::ICMP)
            .port(8)
            .build();
        assert_eq!(ports(&echo), (0, 0, 8 << 8));
    }
}
