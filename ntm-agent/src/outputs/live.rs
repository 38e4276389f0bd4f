//! What the page and the JSON API show now: traffic per device (a local
//! host, by its name on the naming ladder), per server (a remote host, by
//! its label), per service and per interface, with each one's totals since
//! the agent started and its rate over the last few seconds; and per device
//! its servers and services.
//!
//! Fed by `Pipeline::process` with the same labelled deltas as the traffic
//! series (so what the page shows adds up to what `/metrics` shows), read
//! by the HTTP thread. Every table is bounded: past its size, new entries
//! are counted under [`OTHER`], so that bytes still add up, and entries
//! idle for the series TTL are forgotten.

use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
    sync::{Arc, RwLock},
    time::{Duration, Instant, SystemTime},
};

use ntm_common::{Counters, FlowKey, Hook};

use super::sink::{Host, LabelledDrain, Sink};
use crate::model::{
    OTHER,
    net::{LocalNets, Mac, Place},
    subjects::{GROUPS, Shares, Side, Subject},
    sync,
};

/// Devices kept at most (a home has tens, a large site's gateway thousands).
pub const MAX_DEVICES: usize = 4096;
/// Servers kept at most, over all devices.
pub const MAX_SERVERS: usize = 16_384;
/// Services kept at most.
pub const MAX_SERVICES: usize = 1024;
/// Interfaces kept at most.
pub const MAX_INTERFACES: usize = 1024;
/// Servers, and services, kept per device: its top talkers; the rest of its
/// traffic is its `other`.
pub const MAX_PER_DEVICE: usize = 32;
/// Addresses shown per device.
const MAX_ADDRESSES_SHOWN: usize = 16;

/// Rates are averaged over this many complete buckets.
pub const RATE_BUCKETS: u64 = 10;

/// Bytes per bucket of time, for a rate over the last [`RATE_BUCKETS`]
/// complete buckets: a rate that neither jumps with each drain nor lags
/// for long.
#[derive(Clone, Debug, Default)]
struct RateBuckets {
    /// The bucket the last bytes went into.
    last: u64,
    bytes: [[u64; 2]; RATE_BUCKETS as usize + 1],
}

impl RateBuckets {
    const SLOTS: u64 = RATE_BUCKETS + 1;

    fn add(&mut self, bucket: u64, side: Side, bytes: u64) {
        if bucket > self.last {
            // Empty the slots of the buckets nothing went into since.
            for skipped in (self.last + 1)..=bucket.min(self.last + Self::SLOTS) {
                self.bytes[(skipped % Self::SLOTS) as usize] = [0; 2];
            }
            self.last = bucket;
        }
        // A bucket earlier than the last (the clock does not go back, but
        // be safe) goes into the last.
        let slot = &mut self.bytes[(self.last % Self::SLOTS) as usize][side.index()];
        *slot = slot.saturating_add(bytes);
    }

    /// Bytes of the complete buckets before `now_bucket` that are still in
    /// the window.
    fn sum(&self, now_bucket: u64) -> [u64; 2] {
        let first = now_bucket.saturating_sub(RATE_BUCKETS);
        let mut sum = [0u64; 2];
        for bucket in first..now_bucket {
            // Slots older than the window's last bucket minus its length
            // were overwritten (or are stale).
            if bucket > self.last || bucket + Self::SLOTS <= self.last {
                continue;
            }
            let slot = self.bytes[(bucket % Self::SLOTS) as usize];
            sum[0] += slot[0];
            sum[1] += slot[1];
        }
        sum
    }
}

/// One entry's traffic: totals each way since the agent started, its rate
/// window and when it last saw traffic.
#[derive(Clone, Debug)]
pub struct Traffic {
    pub total: [Counters; 2],
    rate: RateBuckets,
    last_active: Instant,
}

impl Traffic {
    fn new(now: Instant) -> Self {
        Self {
            total: [Counters::default(); 2],
            rate: RateBuckets::default(),
            last_active: now,
        }
    }

    fn add(&mut self, side: Side, delta: &Counters, bucket: u64, now: Instant) {
        self.total[side.index()].add(delta);
        self.rate.add(bucket, side, delta.bytes);
        self.last_active = now;
    }

    pub fn bytes(&self) -> u64 {
        self.total[0].bytes.saturating_add(self.total[1].bytes)
    }
}

/// A bounded table of entries by name; past `max`, new names go to
/// [`OTHER`].
#[derive(Clone, Debug)]
struct Table<T> {
    entries: HashMap<String, T>,
    max: usize,
}

impl<T> Table<T> {
    fn new(max: usize) -> Self {
        Self {
            entries: HashMap::new(),
            max,
        }
    }

    /// The name `name`'s counts go under: its own, or [`OTHER`] once the
    /// table is full.
    fn slot<'n>(&self, name: &'n str) -> &'n str {
        if self.entries.len() >= self.max && !self.entries.contains_key(name) {
            OTHER
        } else {
            name
        }
    }

    fn entry(&mut self, name: &str, new: impl FnOnce() -> T) -> &mut T {
        let name = self.slot(name);
        // One lookup for the common case, a known name.
        if self.entries.contains_key(name) {
            return self.entries.get_mut(name).expect("just found");
        }
        self.entries.entry(name.to_string()).or_insert_with(new)
    }
}

/// When counts arrive: the rate bucket and the time.
#[derive(Clone, Copy)]
struct Moment {
    bucket: u64,
    now: Instant,
}

/// Adds `delta` to `name`'s entry of a table (or its `other`).
fn add_to(table: &mut Table<Traffic>, name: &str, side: Side, delta: &Counters, at: Moment) {
    table
        .entry(name, || Traffic::new(at.now))
        .add(side, delta, at.bucket, at.now);
}

/// A local host: its traffic, and its own servers and services.
#[derive(Clone, Debug)]
pub struct Device {
    pub traffic: Traffic,
    servers: Table<Traffic>,
    services: Table<Traffic>,
    /// Its addresses, and the MAC and name source where the names know
    /// them (see [`LiveTraffic::describe_hosts`]).
    pub addresses: BTreeSet<IpAddr>,
    pub mac: Option<Mac>,
    pub source: Option<&'static str>,
}

impl Device {
    fn new(now: Instant) -> Self {
        Self {
            traffic: Traffic::new(now),
            servers: Table::new(MAX_PER_DEVICE),
            services: Table::new(MAX_PER_DEVICE),
            addresses: BTreeSet::new(),
            mac: None,
            source: None,
        }
    }
}

/// One row of a listing: a name, totals each way and rates each way (bytes
/// per second over the last [`RATE_BUCKETS`] buckets).
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub name: String,
    pub total: [Counters; 2],
    pub rate: [f64; 2],
}

/// The live view (see the module's documentation).
pub struct LiveTraffic {
    local: LocalNets,
    epoch: Instant,
    started: SystemTime,
    bucket: Duration,
    devices: Table<Device>,
    servers: Table<Traffic>,
    services: Table<Traffic>,
    interfaces: Table<Traffic>,
    /// All traffic, by the same way as the services (the page's
    /// throughput: every table's listing is cut at its limit).
    all: Traffic,
}

impl LiveTraffic {
    /// `bucket`: the rate window's bucket, at least a drain interval (a
    /// bucket with no drain in it would read as a dip).
    pub fn new(local: LocalNets, bucket: Duration, now: Instant) -> Self {
        Self {
            local,
            epoch: now,
            started: SystemTime::now(),
            bucket: bucket.max(Duration::from_millis(100)),
            devices: Table::new(MAX_DEVICES),
            servers: Table::new(MAX_SERVERS),
            services: Table::new(MAX_SERVICES),
            interfaces: Table::new(MAX_INTERFACES),
            all: Traffic::new(now),
        }
    }

    fn bucket_of(&self, now: Instant) -> u64 {
        (now.saturating_duration_since(self.epoch).as_nanos() / self.bucket.as_nanos()) as u64
    }

    /// One flow's delta with its labels: `src` and `dst` are its host
    /// labels (empty when host labels are off: then the addresses name
    /// the hosts), `service` its service label.
    pub fn add_flow<'l>(
        &mut self,
        key: &FlowKey,
        iface: &'l str,
        hosts: (&'l str, &'l str),
        service: &'l str,
        delta: &Counters,
        now: Instant,
    ) {
        let at = Moment {
            bucket: self.bucket_of(now),
            now,
        };
        let shares = Shares::of_flow(&self.local, key, iface, hosts, service);
        let (iface, hook) = shares.interface;
        self.add_interface(iface, hook, delta, at);
        let Self {
            devices,
            servers,
            services,
            all,
            ..
        } = self;
        let way = Side::Way(shares.way);
        all.add(way, delta, at.bucket, now);
        add_to(services, shares.service, way, delta, at);
        if let Some(server) = &shares.server {
            add_to(servers, server, way, delta, at);
        }
        for (device, device_way) in shares.devices.iter().flatten() {
            let device_way = Side::Way(*device_way);
            let device = devices.entry(device, || Device::new(now));
            device.traffic.add(device_way, delta, at.bucket, now);
            add_to(&mut device.services, shares.service, device_way, delta, at);
            if let Some(server) = &shares.server {
                add_to(&mut device.servers, server, device_way, delta, at);
            }
        }
        // The groups' row: its "servers" are the groups, its services what
        // they carry, each by its own label.
        if let Some(group) = &shares.group {
            let group_way = Side::Way(group.way);
            let row = devices.entry(GROUPS, || Device::new(now));
            row.traffic.add(group_way, delta, at.bucket, now);
            add_to(&mut row.services, group.service, group_way, delta, at);
            add_to(&mut row.servers, &group.address, group_way, delta, at);
        }
    }

    /// Frames that found no room in the flow table: their interface's
    /// traffic, with no hosts or service.
    pub fn add_overflow(&mut self, iface: &str, hook: Hook, delta: &Counters, now: Instant) {
        let at = Moment {
            bucket: self.bucket_of(now),
            now,
        };
        self.add_interface(iface, hook, delta, at);
    }

    fn add_interface(&mut self, iface: &str, hook: Hook, delta: &Counters, at: Moment) {
        add_to(&mut self.interfaces, iface, Side::Hook(hook), delta, at);
    }

    /// The addresses, MAC and name source of the devices, from the hosts
    /// the names know (address, label, source, MAC); remote hosts are
    /// skipped.
    pub fn describe_hosts<'a>(
        &mut self,
        hosts: impl Iterator<Item = (IpAddr, &'a str, &'static str, Option<Mac>)>,
    ) {
        for device in self.devices.entries.values_mut() {
            device.addresses.clear();
        }
        for (ip, label, source, mac) in hosts {
            if self.local.place(ip) != Place::Local {
                continue;
            }
            if let Some(device) = self.devices.entries.get_mut(label) {
                if device.addresses.len() < MAX_ADDRESSES_SHOWN {
                    device.addresses.insert(ip);
                }
                device.mac = mac.or(device.mac);
                device.source = Some(source);
            }
        }
        // A device named by its address is at that address.
        for (name, device) in self.devices.entries.iter_mut() {
            if device.addresses.is_empty()
                && let Ok(ip) = name.parse::<IpAddr>()
            {
                device.addresses.insert(ip);
                device.source.get_or_insert("address");
            }
        }
    }

    pub fn device_count(&self) -> usize {
        self.devices.entries.len()
    }

    /// Forgets entries idle for longer than `ttl`.
    pub fn expire(&mut self, now: Instant, ttl: Duration) {
        let live = |t: &Traffic| now.saturating_duration_since(t.last_active) <= ttl;
        self.devices.entries.retain(|_, d| live(&d.traffic));
        for device in self.devices.entries.values_mut() {
            device.servers.entries.retain(|_, t| live(t));
            device.services.entries.retain(|_, t| live(t));
        }
        self.servers.entries.retain(|_, t| live(t));
        self.services.entries.retain(|_, t| live(t));
        self.interfaces.entries.retain(|_, t| live(t));
    }

    fn row(&self, name: &str, traffic: &Traffic, now_bucket: u64) -> Row {
        let sum = traffic.rate.sum(now_bucket);
        let seconds = self.bucket.as_secs_f64() * RATE_BUCKETS as f64;
        Row {
            name: name.to_string(),
            total: traffic.total,
            rate: [sum[0] as f64 / seconds, sum[1] as f64 / seconds],
        }
    }

    fn sorted(mut rows: Vec<Row>, limit: usize) -> Vec<Row> {
        rows.sort_by(busiest_first);
        rows.truncate(limit);
        rows
    }

    /// The devices, busiest first, with their addresses, MAC and name
    /// source.
    pub fn devices(&self, now: Instant, limit: usize) -> Vec<(Row, &Device)> {
        let now_bucket = self.bucket_of(now);
        let mut rows: Vec<(Row, &Device)> = self
            .devices
            .entries
            .iter()
            .map(|(name, d)| (self.row(name, &d.traffic, now_bucket), d))
            .collect();
        rows.sort_by(|a, b| busiest_first(&a.0, &b.0));
        rows.truncate(limit);
        rows
    }

    /// Servers, services or interfaces, busiest first; servers and
    /// services of one device when `device` is given (None if there is no
    /// such device).
    pub fn top(
        &self,
        kind: Subject,
        device: Option<&str>,
        now: Instant,
        limit: usize,
    ) -> Option<Vec<Row>> {
        let now_bucket = self.bucket_of(now);
        let table = match (kind, device) {
            (Subject::Device, _) => {
                let rows = self
                    .devices(now, limit)
                    .into_iter()
                    .map(|(row, _)| row)
                    .collect();
                return Some(rows);
            }
            (Subject::Server, None) => &self.servers,
            (Subject::Service, None) => &self.services,
            (Subject::Interface, _) => &self.interfaces,
            (Subject::Server, Some(d)) => &self.devices.entries.get(d)?.servers,
            (Subject::Service, Some(d)) => &self.devices.entries.get(d)?.services,
        };
        let rows = table
            .entries
            .iter()
            .map(|(name, t)| self.row(name, t, now_bucket))
            .collect();
        Some(Self::sorted(rows, limit))
    }

    /// All traffic counted, each way as the services count it.
    pub fn all(&self, now: Instant) -> Row {
        self.row("all", &self.all, self.bucket_of(now))
    }

    /// When the agent started (totals count from then).
    pub fn started(&self) -> SystemTime {
        self.started
    }

    /// How often the rates change: one bucket.
    pub fn bucket(&self) -> Duration {
        self.bucket
    }

    /// The length of the window rates are averaged over.
    pub fn rate_window(&self) -> Duration {
        self.bucket * RATE_BUCKETS as u32
    }
}

/// Busiest first: by rate now, then by total, then by name (a stable order
/// for equal rows).
fn busiest_first(a: &Row, b: &Row) -> std::cmp::Ordering {
    let rate = |r: &Row| r.rate[0] + r.rate[1];
    let total = |r: &Row| r.total[0].bytes.saturating_add(r.total[1].bytes);
    rate(b)
        .total_cmp(&rate(a))
        .then(total(b).cmp(&total(a)))
        .then(a.name.cmp(&b.name))
}

/// The live view as an output: it takes a drain's labelled deltas under
/// one write lock (the API waits at most for a drain), and names its
/// devices' addresses, MACs and sources from the hosts in labels.
pub struct LiveSink {
    live: Arc<RwLock<LiveTraffic>>,
    /// The hosts' version and the number of devices when the devices were
    /// last described (a new device needs describing too).
    described: Option<(u64, usize)>,
}

impl LiveSink {
    pub fn new(live: Arc<RwLock<LiveTraffic>>) -> Self {
        Self {
            live,
            described: None,
        }
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, LiveTraffic> {
        sync::write(&self.live)
    }
}

impl Sink for LiveSink {
    fn labelled(&mut self, drain: &LabelledDrain, now: Instant) {
        let mut live = self.write();
        for flow in &drain.flows {
            live.add_flow(
                &flow.key,
                &flow.iface,
                (&flow.src, &flow.dst),
                &flow.service,
                &flow.delta,
                now,
            );
        }
        for overflow in &drain.overflow {
            live.add_overflow(&overflow.iface, overflow.hook, &overflow.delta, now);
        }
    }

    fn wants_hosts(&self, version: u64) -> bool {
        let devices = sync::read(&self.live).device_count();
        self.described != Some((version, devices))
    }

    fn describe_hosts(&mut self, version: u64, hosts: &[Host]) {
        let devices = {
            let mut live = self.write();
            live.describe_hosts(
                hosts
                    .iter()
                    .map(|host| (host.ip, &*host.label, host.source, host.mac)),
            );
            live.device_count()
        };
        self.described = Some((version, devices));
    }

    fn expire(&mut self, now: Instant, ttl: Duration) {
        self.write().expire(now, ttl);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::net::Cidr;
    use ntm_common::test_util::KeyBuilder;

    fn key(src: [u8; 4], dst: [u8; 4], hook: Hook) -> FlowKey {
        KeyBuilder::v4(src, dst)
            .tcp(443)
            .ifindex(2)
            .hook(hook)
            .build()
    }

    fn live(now: Instant) -> LiveTraffic {
        LiveTraffic::new(
            LocalNets::given(vec!["192.168.0.0/16".parse::<Cidr>().unwrap()]),
            Duration::from_secs(1),
            now,
        )
    }

    fn c(bytes: u64, packets: u64) -> Counters {
        Counters { bytes, packets }
    }

    #[test]
    fn a_download_and_an_upload_land_on_both_sides() {
        let t0 = Instant::now();
        let mut live = live(t0);
        let down = key([93, 184, 216, 34], [192, 168, 1, 20], Hook::Ingress);
        let up = key([192, 168, 1, 20], [93, 184, 216, 34], Hook::Egress);
        live.add_flow(&down, "eth0", ("", "laptop"), "https", &c(1500, 1), t0);
        live.add_flow(&up, "eth0", ("laptop", ""), "https", &c(60, 1), t0);
        let devices = live.devices(t0, 10);
        assert_eq!(devices.len(), 1);
        assert_eq!(devices[0].0.name, "laptop");
        assert_eq!(devices[0].0.total, [c(1500, 1), c(60, 1)]);
        let servers = live.top(Subject::Server, None, t0, 10).unwrap();
        assert_eq!(servers[0].name, "93.184.216.34");
        assert_eq!(servers[0].total, [c(1500, 1), c(60, 1)]);
        let mine = live.top(Subject::Server, Some("laptop"), t0, 10).unwrap();
        assert_eq!(mine, servers);
        let ifaces = live.top(Subject::Interface, None, t0, 10).unwrap();
        assert_eq!(ifaces[0].total, [c(1500, 1), c(60, 1)]);
        assert_eq!(live.all(t0).total, [c(1500, 1), c(60, 1)]);
        assert!(live.top(Subject::Service, Some("nobody"), t0, 10).is_none());
    }

    #[test]
    fn between_two_devices_is_one_upload_and_one_download() {
        let t0 = Instant::now();
        let mut live = live(t0);
        let k = key([192, 168, 1, 2], [192, 168, 1, 3], Hook::Ingress);
        live.add_flow(&k, "br0", ("a", "b"), "https", &c(100, 2), t0);
        let devices = live.devices(t0, 10);
        let get = |n: &str| devices.iter().find(|d| d.0.name == n).unwrap().0.total;
        assert_eq!(get("a"), [c(0, 0), c(100, 2)]);
        assert_eq!(get("b"), [c(100, 2), c(0, 0)]);
        assert!(live.top(Subject::Server, None, t0, 10).unwrap().is_empty());
    }

    #[test]
    fn past_the_bound_new_names_add_up_in_other() {
        let t0 = Instant::now();
        let mut live = live(t0);
        for i in 0..(MAX_PER_DEVICE as u8 + 5) {
            let k = key([10, 0, 0, i], [192, 168, 1, 20], Hook::Ingress);
            live.add_flow(&k, "eth0", ("", "laptop"), "https", &c(10, 1), t0);
        }
        let mine = live.top(Subject::Server, Some("laptop"), t0, 100).unwrap();
        assert_eq!(mine.len(), MAX_PER_DEVICE + 1);
        let other = mine.iter().find(|r| r.name == OTHER).unwrap();
        assert_eq!(other.total[0], c(50, 5));
        let sum: u64 = mine.iter().map(|r| r.total[0].bytes).sum();
        assert_eq!(sum, 10 * (MAX_PER_DEVICE as u64 + 5));
    }

    #[test]
    fn the_rate_is_the_last_complete_buckets_and_falls_to_zero() {
        let t0 = Instant::now();
        let mut live = live(t0);
        let k = key([93, 184, 216, 34], [192, 168, 1, 20], Hook::Ingress);
        // 1000 bytes in each of 20 seconds.
        for s in 0..20 {
            live.add_flow(
                &k,
                "eth0",
                ("", ""),
                "https",
                &c(1000, 1),
                t0 + Duration::from_secs(s),
            );
        }
        let at = |s: u64| live.devices(t0 + Duration::from_millis(s), 1)[0].0.rate[0];
        assert_eq!(at(19_500), 1000.0);
        // Two buckets after the last, one of ten is empty.
        assert_eq!(at(21_000), 900.0);
        assert_eq!(at(60_000), 0.0);
    }

    #[test]
    fn idle_entries_are_forgotten() {
        let t0 = Instant::now();
        let mut live = live(t0);
        let k = key([93, 184, 216, 34], [192, 168, 1, 20], Hook::Ingress);
        live.add_flow(&k, "eth0", ("", ""), "https", &c(1, 1), t0);
        live.expire(t0 + Duration::from_secs(30), Duration::from_secs(60));
        assert_eq!(live.devices(t0, 10).len(), 1);
        live.expire(t0 + Duration::from_secs(61), Duration::from_secs(60));
        assert!(live.devices(t0, 10).is_empty());
        assert!(
            live.top(Subject::Interface, None, t0, 10)
                .unwrap()
                .is_empty()
        );
    }
}
