//! One IPFIX collector: a thread of its own behind a bounded queue, so that
//! the drain never waits for it. The thread keeps one long-lived socket
//! (UDP: one socket connected to the collector, so that its source port
//! stays, which nfcapd tells exporters apart by, and an ICMP port
//! unreachable comes back as an error; TCP: one connection, made again
//! after it breaks), sends the templates (over UDP at start, every
//! `--ipfix-template-interval`, every [`TEMPLATE_EVERY_MESSAGES`] messages
//! and after a failure; over TCP once per connection), and counts every
//! record by what became of it.

use std::{
    fmt,
    io::{self, Write as _},
    net::{TcpStream, ToSocketAddrs, UdpSocket},
    str::FromStr,
    sync::{
        Arc,
        mpsc::{self, RecvTimeoutError, SyncSender, TrySendError},
    },
    thread,
    time::{Duration, Instant},
};

use prometheus::IntCounterVec;

use super::{Batch, encode::Encoder};

/// Templates again after this many messages over UDP (a collector that
/// started late gets them soon, whatever the timer).
pub const TEMPLATE_EVERY_MESSAGES: u32 = 100;
/// Export batches waiting for a collector at most; beyond it, a new batch
/// is dropped and counted.
const QUEUE: usize = 2;
/// How long a TCP connection may take, and a write may block.
const TCP_TIMEOUT: Duration = Duration::from_secs(2);

/// How ntm reaches a collector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// A collector as `--ipfix-collector` gives it: `HOST:PORT` (UDP),
/// `udp://HOST:PORT` or `tcp://HOST:PORT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CollectorSpec {
    pub address: String,
    pub transport: Transport,
}

impl FromStr for CollectorSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (transport, address) = match s.split_once("://") {
            Some(("udp", rest)) => (Transport::Udp, rest),
            Some(("tcp", rest)) => (Transport::Tcp, rest),
            Some((other, _)) => {
                return Err(format!(
                    "{s:?}: {other:?} is no transport ntm exports over: udp:// or tcp://"
                ));
            }
            None => (Transport::Udp, s),
        };
        let port_ok = address.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0)
        });
        if !port_ok {
            return Err(format!(
                "{s:?} is not a collector like 192.0.2.10:4739, [2001:db8::10]:4739 or tcp://collector:4739"
            ));
        }
        Ok(Self {
            address: address.to_string(),
            transport,
        })
    }
}

impl fmt::Display for CollectorSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.transport {
            Transport::Udp => write!(f, "{}", self.address),
            Transport::Tcp => write!(f, "tcp://{}", self.address),
        }
    }
}

/// What became of a record: the `result` of `<prefix>_ipfix_records_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IpfixResult {
    Sent,
    /// The queue to the collector was full.
    Dropped,
    /// The socket refused it.
    Failed,
}

impl IpfixResult {
    pub const ALL: [IpfixResult; 3] =
        [IpfixResult::Sent, IpfixResult::Dropped, IpfixResult::Failed];

    pub fn as_str(self) -> &'static str {
        match self {
            IpfixResult::Sent => "sent",
            IpfixResult::Dropped => "dropped",
            IpfixResult::Failed => "failed",
        }
    }
}

/// The records of one collector, by result.
#[derive(Clone)]
struct Counts {
    collector: String,
    metric: IntCounterVec,
}

impl Counts {
    fn add(&self, result: IpfixResult, records: u64) {
        self.metric
            .with_label_values(&[self.collector.as_str(), result.as_str()])
            .inc_by(records);
    }
}

enum Command {
    Export(Arc<Batch>),
    Stop,
}

/// The agent's end of one collector's thread.
pub struct Collector {
    queue: SyncSender<Command>,
    thread: Option<thread::JoinHandle<()>>,
    counts: Counts,
}

/// How a collector's thread works: its observation domain, the largest
/// message and the template timer.
#[derive(Clone, Copy, Debug)]
pub struct ExportSettings {
    pub domain: u32,
    pub max_message: usize,
    pub template_interval: Duration,
}

impl Collector {
    pub fn start(spec: CollectorSpec, settings: ExportSettings, metric: IntCounterVec) -> Self {
        let counts = Counts {
            collector: spec.to_string(),
            metric,
        };
        for result in IpfixResult::ALL {
            counts.add(result, 0);
        }
        let (queue, commands) = mpsc::sync_channel(QUEUE);
        let mut link = Link {
            spec,
            settings,
            encoder: Encoder::new(settings.domain, settings.max_message),
            conn: None,
            templates_at: None,
            messages: 0,
            down: false,
            counts: counts.clone(),
        };
        let thread = thread::Builder::new()
            .name("ntm-ipfix".into())
            .spawn(move || {
                loop {
                    match commands.recv_timeout(settings.template_interval) {
                        Ok(Command::Export(batch)) => link.export(&batch),
                        Ok(Command::Stop) | Err(RecvTimeoutError::Disconnected) => return,
                        // Templates on time even with no flows.
                        Err(RecvTimeoutError::Timeout) => link.keep_alive(),
                    }
                }
            })
            .map_err(|e| log::warn!("ipfix: no thread for {}: {e}", counts.collector))
            .ok();
        Self {
            queue,
            thread,
            counts,
        }
    }

    /// Queues a batch; a full queue drops it, counted.
    pub fn send(&self, batch: Arc<Batch>) {
        let records = (batch.records.len() + batch.outside.len()) as u64;
        if self.thread.is_none() {
            self.counts.add(IpfixResult::Dropped, records);
            return;
        }
        match self.queue.try_send(Command::Export(batch)) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.counts.add(IpfixResult::Dropped, records);
            }
        }
    }

    /// Sends what is queued, then stops (at shutdown).
    pub fn stop(mut self) {
        if let Some(thread) = self.thread.take() {
            // Behind every queued batch; blocks while the queue is full.
            let _ = self.queue.send(Command::Stop);
            let _ = thread.join();
        }
    }
}

enum Conn {
    Udp(UdpSocket),
    Tcp(TcpStream),
}

/// The collector thread's state.
struct Link {
    spec: CollectorSpec,
    settings: ExportSettings,
    encoder: Encoder,
    conn: Option<Conn>,
    /// When templates were last sent on this connection (None: they are
    /// due).
    templates_at: Option<Instant>,
    /// Messages since the templates.
    messages: u32,
    /// In an outage (logged once, when it starts and when it ends).
    down: bool,
    counts: Counts,
}

impl Link {
    fn connect(&mut self) -> io::Result<&mut Conn> {
        if self.conn.is_none() {
            let addr = self
                .spec
                .address
                .to_socket_addrs()?
                .next()
                .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address"))?;
            let conn = match self.spec.transport {
                Transport::Udp => {
                    let any: std::net::SocketAddr = if addr.is_ipv4() {
                        ([0, 0, 0, 0], 0).into()
                    } else {
                        ([0u16; 8], 0).into()
                    };
                    let socket = UdpSocket::bind(any)?;
                    socket.connect(addr)?;
                    Conn::Udp(socket)
                }
                Transport::Tcp => {
                    let stream = TcpStream::connect_timeout(&addr, TCP_TIMEOUT)?;
                    stream.set_write_timeout(Some(TCP_TIMEOUT))?;
                    Conn::Tcp(stream)
                }
            };
            self.conn = Some(conn);
            self.templates_at = None;
        }
        Ok(self.conn.as_mut().expect("just connected"))
    }

    fn write(&mut self, message: &[u8]) -> io::Result<()> {
        match self.connect()? {
            Conn::Udp(socket) => socket.send(message).map(|_| ()),
            Conn::Tcp(stream) => stream.write_all(message),
        }
    }

    /// Sends the templates if they are due.
    fn templates(&mut self, export_time: u32) -> io::Result<()> {
        let due = match (self.templates_at, self.spec.transport) {
            (None, _) => true,
            // Over TCP the collector keeps them for the connection.
            (Some(_), Transport::Tcp) => false,
            (Some(at), Transport::Udp) => {
                at.elapsed() >= self.settings.template_interval
                    || self.messages >= TEMPLATE_EVERY_MESSAGES
            }
        };
        if due {
            let message = self.encoder.templates(export_time);
            self.write(&message)?;
            self.templates_at = Some(Instant::now());
            self.messages = 0;
        }
        Ok(())
    }

    fn export(&mut self, batch: &Batch) {
        let mut messages = Vec::new();
        self.encoder.records(
            &batch.records,
            &batch.outside,
            batch.export_time,
            |index| batch.names.get(&index).map(String::as_str),
            &mut messages,
        );
        let mut sent = 0u64;
        let mut result = self.templates(batch.export_time);
        for (i, (message, records)) in messages.iter().enumerate() {
            if result.is_err() {
                let left: u64 = messages[i..].iter().map(|(_, n)| *n as u64).sum();
                self.counts.add(IpfixResult::Failed, left);
                break;
            }
            result = self.write(message);
            if result.is_ok() {
                sent += *records as u64;
                self.messages += 1;
                // Over UDP, templates again every so many messages.
                if let Err(e) = self.templates(batch.export_time) {
                    result = Err(e);
                }
            } else {
                self.counts.add(IpfixResult::Failed, *records as u64);
            }
        }
        self.counts.add(IpfixResult::Sent, sent);
        self.outcome(result);
    }

    /// Templates on the timer while no flow comes (UDP).
    fn keep_alive(&mut self) {
        if self.spec.transport == Transport::Udp && self.templates_at.is_some() {
            let result = self.templates(unix_seconds());
            self.outcome(result);
        }
    }

    /// Logs an outage once when it starts and once when it ends; after a
    /// failure the connection is made again and the templates resent.
    fn outcome(&mut self, result: io::Result<()>) {
        match result {
            Ok(()) if self.down => {
                self.down = false;
                log::info!("ipfix: collector {} takes records again", self.spec);
            }
            Ok(()) => {}
            Err(e) => {
                if !self.down {
                    self.down = true;
                    log::warn!(
                        "ipfix: collector {}: {e}; its records are counted as failed (ntm_ipfix_records_total) until it takes them again",
                        self.spec
                    );
                }
                if self.spec.transport == Transport::Tcp {
                    self.conn = None;
                }
                self.templates_at = None;
            }
        }
    }
}

/// Now, in Unix seconds (an IPFIX header's export time).
pub fn unix_seconds() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as u32)
}

/// Records of a batch, for the tests.
#[cfg(test)]
pub fn batch(records: Vec<super::encode::FlowRecord>) -> Arc<Batch> {
    Arc::new(Batch {
        records,
        outside: Vec::new(),
        names: Arc::default(),
        export_time: unix_seconds(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A collector with the default settings (domain 1, 1400-byte
    /// messages, templates every 30 s).
    fn start_with_defaults(spec: CollectorSpec, metric: &IntCounterVec) -> Collector {
        Collector::start(
            spec,
            ExportSettings {
                domain: 1,
                max_message: 1400,
                template_interval: Duration::from_secs(30),
            },
            metric.clone(),
        )
    }

    #[test]
    fn collectors_parse_and_bad_ones_say_why() {
        let udp: CollectorSpec = "127.0.0.1:4739".parse().unwrap();
        assert_eq!(udp.transport, Transport::Udp);
        let tcp: CollectorSpec = "tcp://[2001:2::10]:4739".parse().unwrap();
        assert_eq!(
            (tcp.transport, tcp.address.as_str()),
            (Transport::Tcp, "[2001:2::10]:4739")
        );
        assert_eq!(tcp.to_string(), "tcp://[2001:2::10]:4739");
        for bad in ["127.0.0.1", "sctp://h:1", ":4739", "h:0", "h:http"] {
            let e = bad.parse::<CollectorSpec>().unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
    }

    /// One IPFIX message from a TCP stream (the header's length says
    /// where it ends).
    fn read_message(stream: &mut TcpStream) -> Vec<u8> {
        use std::io::Read as _;
        let mut message = vec![0u8; 16];
        stream.read_exact(&mut message).unwrap();
        assert_eq!(&message[..2], &[0, 10], "an IPFIX header");
        let length = u16::from_be_bytes([message[2], message[3]]) as usize;
        message.resize(length, 0);
        stream.read_exact(&mut message[16..]).unwrap();
        message
    }

    /// Data records in `message`, as netflow_parser reads them (no data
    /// set it has no template for).
    fn data_records(parser: &mut netflow_parser::NetflowParser, message: &[u8]) -> usize {
        use netflow_parser::{NetflowPacket, variable_versions::ipfix::FlowSetBody};
        let mut records = 0;
        for packet in parser.parse_bytes(message).packets {
            let NetflowPacket::IPFix(ipfix) = packet else {
                panic!("not IPFIX: {packet:?}");
            };
            for set in ipfix.flowsets {
                match set.body {
                    FlowSetBody::Data(data) => records += data.fields.len(),
                    FlowSetBody::NoTemplate(info) => panic!("no template: {info:?}"),
                    _ => {}
                }
            }
        }
        records
    }

    /// Over TCP to a real listener: the templates open each connection and
    /// every record follows in the stream; a connection the collector
    /// closed is made again, the templates first, and every record is
    /// counted once by what became of it.
    #[test]
    fn tcp_opens_each_connection_with_the_templates_and_connects_again() {
        let metric = IntCounterVec::new(
            prometheus::Opts::new("records", "h"),
            &["collector", "result"],
        )
        .unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let spec: CollectorSpec = format!("tcp://{}", listener.local_addr().unwrap())
            .parse()
            .unwrap();
        let label = spec.to_string();
        let collector = start_with_defaults(spec, &metric);
        let key = ntm_common::FlowKey::v4_udp([198, 18, 0, 1], [198, 18, 0, 2], 53);
        let record = super::super::encode::FlowRecord {
            key,
            counts: ntm_common::Counters {
                bytes: 1 << 33,
                packets: 1,
            },
            start_ms: 0,
            end_ms: 0,
        };
        // The interface named (netflow_parser reads no record whose
        // interfaceName is empty).
        let names = Arc::new(std::collections::HashMap::from([(
            key.ifindex,
            "ntm0".to_string(),
        )]));
        let mut produced = 0u64;
        let mut send = |n: usize| {
            collector.send(Arc::new(Batch {
                records: vec![record.clone(); n],
                outside: Vec::new(),
                names: Arc::clone(&names),
                export_time: unix_seconds(),
            }));
            produced += n as u64;
        };
        // The first connection: templates, then 100 records (several
        // messages).
        send(100);
        let (mut first, _) = listener.accept().unwrap();
        first
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut parser = netflow_parser::NetflowParser::default();
        let templates = read_message(&mut first);
        assert_eq!(&templates[16..18], &[0, 2], "a template set first");
        assert_eq!(data_records(&mut parser, &templates), 0);
        let mut got = 0;
        while got < 100 {
            got += data_records(&mut parser, &read_message(&mut first));
        }
        assert_eq!(got, 100);
        // The collector closes it: batches go on until ntm connects again.
        drop(first);
        listener.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut second = loop {
            send(10);
            thread::sleep(Duration::from_millis(50));
            if let Ok((stream, _)) = listener.accept() {
                break stream;
            }
            assert!(Instant::now() < deadline, "no second connection");
        };
        second.set_nonblocking(false).unwrap();
        second
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        // A fresh parser, as a collector's for a new connection.
        let mut parser = netflow_parser::NetflowParser::default();
        let templates = read_message(&mut second);
        assert_eq!(&templates[16..18], &[0, 2], "a template set first");
        assert_eq!(data_records(&mut parser, &templates), 0);
        assert!(data_records(&mut parser, &read_message(&mut second)) > 0);
        collector.stop();
        let count = |result: IpfixResult| {
            metric
                .with_label_values(&[label.as_str(), result.as_str()])
                .get()
        };
        assert_eq!(
            count(IpfixResult::Sent) + count(IpfixResult::Dropped) + count(IpfixResult::Failed),
            produced,
            "every record is counted once"
        );
    }

    #[test]
    fn no_collector_listening_counts_failures_and_never_blocks() {
        let metric = IntCounterVec::new(
            prometheus::Opts::new("records", "h"),
            &["collector", "result"],
        )
        .unwrap();
        // A port nothing listens on (bound, then closed).
        let port = UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let spec: CollectorSpec = format!("127.0.0.1:{port}").parse().unwrap();
        let label = spec.to_string();
        let collector = start_with_defaults(spec, &metric);
        let key = ntm_common::FlowKey::v4_udp([198, 18, 0, 1], [198, 18, 0, 2], 53);
        let record = super::super::encode::FlowRecord {
            key,
            counts: ntm_common::Counters {
                bytes: 1,
                packets: 1,
            },
            start_ms: 0,
            end_ms: 0,
        };
        let started = Instant::now();
        for _ in 0..50 {
            collector.send(batch(vec![record.clone(); 10]));
        }
        assert!(
            started.elapsed() < Duration::from_millis(200),
            "sending blocked"
        );
        collector.stop();
        let count = |result: IpfixResult| {
            metric
                .with_label_values(&[label.as_str(), result.as_str()])
                .get()
        };
        assert_eq!(
            count(IpfixResult::Sent) + count(IpfixResult::Dropped) + count(IpfixResult::Failed),
            500,
            "every record is counted once"
        );
        assert!(
            count(IpfixResult::Failed) > 0,
            "refused: ICMP port unreachable"
        );
    }
}
