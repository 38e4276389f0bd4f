//! The JSON API (`/api/v1/...`) the page uses, stable for scripts: what
//! [`LiveTraffic`] and [`Health`] hold, as JSON documents. Names come from
//! the network; serde_json escapes them, and the endpoint serves them as
//! `application/json` with `nosniff`, so that no browser reads them as
//! markup.
//!
//! Every document has `started` (when the agent started, Unix seconds:
//! totals count from then) and `rate_window_seconds` (rates are bytes per
//! second averaged over that window).

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex, RwLock},
    time::{Instant, SystemTime},
};

use ntm_common::Hook;
use serde::Serialize;

use crate::{
    health::{attached::Health, status::DrainStatus},
    model::{
        net::LocalNets,
        subjects::{GROUPS, Side, Subject, Way},
        sync,
    },
    outputs::{
        history::{HistoryReader, Tier, periods::Period},
        live::{LiveTraffic, Row},
        live_health::{LiveHealth, REASONS, Summary},
    },
};

/// Rows a listing returns unless `limit` says otherwise.
pub const DEFAULT_LIMIT: usize = 100;
/// Rows a listing returns at most (the largest table's bound).
pub const MAX_LIMIT: usize = crate::outputs::live::MAX_SERVERS + 1;

/// What a listing was asked for that it cannot answer: a 400 or 404 with
/// a JSON `{"error": ...}` body.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    #[error("limit must be a whole number from 1 to {MAX_LIMIT}, not {0:?}")]
    BadLimit(String),
    #[error("no device is named {0:?} (GET /api/v1/devices lists them)")]
    NoSuchDevice(String),
    #[error("unknown parameter {0:?}")]
    UnknownParameter(String),
    #[error("{0}")]
    BadHistoryQuery(String),
    #[error("the history cannot be read now: {0}")]
    HistoryUnavailable(String),
}

impl ApiError {
    pub fn status(&self) -> u16 {
        match self {
            ApiError::NoSuchDevice(_) => 404,
            ApiError::HistoryUnavailable(_) => 503,
            _ => 400,
        }
    }

    pub fn body(&self) -> String {
        json(&ErrorBody {
            error: self.to_string(),
        })
    }
}

#[derive(Serialize)]
struct ErrorBody {
    error: String,
}

/// What the API reads: the live view, the history, the interfaces' attach
/// state and the pipeline's state.
#[derive(Clone)]
pub struct Api {
    pub live: Arc<RwLock<LiveTraffic>>,
    pub history: HistoryReader,
    pub health: Health,
    pub status: Arc<Mutex<DrainStatus>>,
    /// The local networks: which hosts are devices.
    pub local: LocalNets,
    /// TCP connection health per device and server.
    pub connections: Arc<RwLock<LiveHealth>>,
}

/// A device's or server's TCP connections over the window.
#[derive(Serialize)]
struct ConnectionsDoc {
    name: String,
    /// Handshakes whose time (this side's: the client's for a device, the
    /// server's for a server) was measured.
    handshakes: u64,
    median_seconds: Option<f64>,
    p90_seconds: Option<f64>,
    /// Connections that failed, by reason.
    failed: BTreeMap<&'static str, u64>,
}

#[derive(Serialize)]
struct Connections {
    window_seconds: u64,
    devices: Vec<ConnectionsDoc>,
    servers: Vec<ConnectionsDoc>,
}

fn connections_doc((name, s): (Arc<str>, Summary)) -> ConnectionsDoc {
    ConnectionsDoc {
        name: name.to_string(),
        handshakes: s.measured,
        median_seconds: s.median,
        p90_seconds: s.p90,
        failed: REASONS.iter().copied().zip(s.failed).collect(),
    }
}

/// Bytes and packets one way since the agent started, and the rate now.
#[derive(Serialize)]
struct WayDoc {
    bytes: u64,
    packets: u64,
    /// Bytes per second over the last `rate_window_seconds`.
    rate: f64,
}

#[derive(Serialize)]
struct TrafficDoc {
    name: String,
    download: WayDoc,
    upload: WayDoc,
}

/// Totals per period (`day`, `week`, `month`: the billing period), each
/// way, from the history.
type PeriodDoc = BTreeMap<&'static str, BTreeMap<&'static str, Counted>>;

#[derive(Serialize)]
struct DeviceDoc {
    #[serde(flatten)]
    traffic: TrafficDoc,
    /// Today, this week and this billing period (absent when the history
    /// cannot be read).
    #[serde(skip_serializing_if = "Option::is_none")]
    periods: Option<PeriodDoc>,
    addresses: Vec<String>,
    mac: Option<String>,
    /// The rung of the naming ladder the name came from.
    name_source: Option<&'static str>,
    /// True for the row of the traffic to no one host (multicast and
    /// broadcast): its servers are the groups, its services what they
    /// carry.
    groups: bool,
}

#[derive(Serialize)]
struct InterfaceDoc {
    name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    periods: Option<PeriodDoc>,
    /// Whether ntm counts on it now (None: traffic counted on it earlier,
    /// or on a port of it, but it is not one of the requested interfaces).
    attached: Option<bool>,
    /// What its ingress hook saw (what it received).
    ingress: WayDoc,
    /// What its egress hook saw (what it sent).
    egress: WayDoc,
}

#[derive(Serialize)]
struct Listing<T> {
    started: u64,
    rate_window_seconds: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    device: Option<String>,
    #[serde(flatten)]
    rows: T,
}

#[derive(Serialize)]
struct Devices {
    devices: Vec<DeviceDoc>,
}
#[derive(Serialize)]
struct Servers {
    servers: Vec<TrafficDoc>,
}
#[derive(Serialize)]
struct Services {
    services: Vec<TrafficDoc>,
}
#[derive(Serialize)]
struct Interfaces {
    interfaces: Vec<InterfaceDoc>,
}

#[derive(Serialize)]
struct StatusDoc {
    started: u64,
    /// The agent's clock (Unix seconds), for a client whose own clock is
    /// off: the page asks for history ranges by it.
    now: u64,
    rate_window_seconds: f64,
    /// How often the rates and totals change (a drain, at least 1 s): how
    /// often a page or script may usefully ask again.
    refresh_seconds: f64,
    /// All traffic counted (`name` is `all`): download is what came into
    /// the local networks, upload everything else, as for the services.
    traffic: TrafficDoc,
    /// Every requested interface attached (what `/healthz` says).
    healthy: bool,
    interfaces: Vec<AttachedDoc>,
    series: usize,
    max_series: usize,
    series_folded: u64,
    /// Frames the flow table had no room for (in the `other` series).
    overflow: Counted,
    flow_table_capacity: u32,
    waiting_flows: usize,
    drains: u64,
    last_drain: Option<u64>,
    /// Whether the history is kept on disk (false: in memory, see the log).
    history_persistent: bool,
    /// Buckets of counts waiting for the history's next commit.
    history_uncommitted: usize,
    /// Whether the local networks are learnt from the host's addresses
    /// (false: given with `--local-net`).
    local_networks_learnt: bool,
    /// The local networks in use: which hosts are devices, and the
    /// `direction` label.
    local_networks: Vec<LocalNetDoc>,
}

/// One local network and where it came from.
#[derive(Serialize)]
struct LocalNetDoc {
    network: String,
    /// `given` (`--local-net`), `interface` (an address on `interface`),
    /// or `private` (a private range, local unless `--local-net` is given).
    origin: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    interface: Option<String>,
}

#[derive(Clone, Serialize)]
struct Counted {
    bytes: u64,
    packets: u64,
}

/// One step of a history: download and upload (ingress and egress for an
/// interface), from its start for `step` seconds.
#[derive(Serialize)]
struct Point {
    start: i64,
    #[serde(flatten)]
    ways: BTreeMap<&'static str, Counted>,
}

#[derive(Serialize)]
struct HistoryDoc {
    kind: &'static str,
    name: String,
    from: i64,
    to: i64,
    step: i64,
    /// Whether the history is kept on disk (false: this run only).
    persistent: bool,
    points: Vec<Point>,
}

/// Points a history answer has at most.
pub const MAX_POINTS: i64 = 10_000;

fn kind_of(name: &str) -> Option<(Subject, &'static str)> {
    Some(match name {
        "devices" => (Subject::Device, "devices"),
        "servers" => (Subject::Server, "servers"),
        "services" => (Subject::Service, "services"),
        "interfaces" => (Subject::Interface, "interfaces"),
        _ => return None,
    })
}

/// The names of a subject's two counters in JSON, in `[Counters; 2]`
/// order: an interface's hooks, or the download and upload of the others.
fn way_names(kind: Subject) -> [&'static str; 2] {
    let sides = if kind == Subject::Interface {
        [Side::Hook(Hook::Ingress), Side::Hook(Hook::Egress)]
    } else {
        [Side::Way(Way::Download), Side::Way(Way::Upload)]
    };
    debug_assert!(sides.iter().enumerate().all(|(i, s)| s.index() == i));
    sides.map(Side::as_str)
}

#[derive(Serialize)]
struct AttachedDoc {
    name: String,
    attached: bool,
}

fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn way(row: &Row, i: usize) -> WayDoc {
    WayDoc {
        bytes: row.total[i].bytes,
        packets: row.total[i].packets,
        rate: row.rate[i],
    }
}

fn traffic(row: &Row) -> TrafficDoc {
    TrafficDoc {
        name: row.name.clone(),
        download: way(row, 0),
        upload: way(row, 1),
    }
}

fn json(value: &impl Serialize) -> String {
    // Serialising these types cannot fail: no maps with non-string keys,
    // no custom serialisers.
    serde_json::to_string(value).unwrap_or_else(|_| String::from("{}"))
}

/// The query of a listing: `limit` and, where it applies, `device`.
struct ListQuery {
    limit: usize,
    device: Option<String>,
}

impl ListQuery {
    fn parse(query: &HashMap<String, String>, takes_device: bool) -> Result<Self, ApiError> {
        let mut parsed = ListQuery {
            limit: DEFAULT_LIMIT,
            device: None,
        };
        for (name, value) in query {
            match name.as_str() {
                "limit" => {
                    parsed.limit = value
                        .parse()
                        .ok()
                        .filter(|n| (1..=MAX_LIMIT).contains(n))
                        .ok_or_else(|| ApiError::BadLimit(value.clone()))?
                }
                "device" if takes_device => parsed.device = Some(value.clone()),
                _ => return Err(ApiError::UnknownParameter(name.clone())),
            }
        }
        Ok(parsed)
    }
}

impl From<&ntm_common::Counters> for Counted {
    fn from(c: &ntm_common::Counters) -> Self {
        Self {
            bytes: c.bytes,
            packets: c.packets,
        }
    }
}

/// Both ways of `totals`, by their names for `kind`.
fn ways(
    kind: Subject,
    totals: &crate::outputs::history::Totals,
) -> BTreeMap<&'static str, Counted> {
    let [first, second] = way_names(kind);
    BTreeMap::from([(first, (&totals[0]).into()), (second, (&totals[1]).into())])
}

/// The period totals of the subjects of `kind` an answer shows, as JSON
/// (None: the history cannot be read now; the rest of the answer stands).
/// Asked for with the live view's lock released: a commit holds the
/// history's lock, and the drain must not wait for it.
fn periods_of(
    history: &HistoryReader,
    kind: Subject,
    names: &[&str],
) -> Option<HashMap<String, PeriodDoc>> {
    let now = unix_seconds(SystemTime::now()) as i64;
    let mut docs: HashMap<String, PeriodDoc> = HashMap::new();
    for period in Period::ALL {
        let totals = history
            .period_totals_of(kind, period, now, names)
            .map_err(|e| log::debug!("API: period totals: {e}"))
            .ok()?;
        for (name, t) in totals {
            docs.entry(name.to_string())
                .or_default()
                .insert(period.as_str(), ways(kind, &t));
        }
    }
    Some(docs)
}

/// A subject's periods, zero where it had no traffic.
fn periods_for(
    docs: &Option<HashMap<String, PeriodDoc>>,
    name: &str,
    kind: Subject,
) -> Option<PeriodDoc> {
    let docs = docs.as_ref()?;
    let mut doc = docs.get(name).cloned().unwrap_or_default();
    for period in Period::ALL {
        doc.entry(period.as_str())
            .or_insert_with(|| ways(kind, &Default::default()));
    }
    Some(doc)
}

impl Api {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, LiveTraffic> {
        sync::read(&self.live)
    }

    fn listing<T: Serialize>(live: &LiveTraffic, device: Option<String>, rows: T) -> String {
        json(&Listing {
            started: unix_seconds(live.started()),
            rate_window_seconds: live.rate_window().as_secs_f64(),
            device,
            rows,
        })
    }

    /// `GET /api/v1/devices[?limit=N]`: local hosts, busiest first.
    pub fn devices(&self, query: &HashMap<String, String>) -> Result<String, ApiError> {
        let query = ListQuery::parse(query, false)?;
        let mut devices: Vec<DeviceDoc> = self
            .read()
            .devices(Instant::now(), query.limit)
            .into_iter()
            .map(|(row, device)| DeviceDoc {
                periods: None,
                traffic: traffic(&row),
                addresses: device.addresses.iter().map(|ip| ip.to_string()).collect(),
                mac: device.mac.map(|mac| {
                    mac.iter()
                        .map(|b| format!("{b:02x}"))
                        .collect::<Vec<_>>()
                        .join(":")
                }),
                name_source: device.source,
                groups: row.name == GROUPS,
            })
            .collect();
        let names: Vec<&str> = devices.iter().map(|d| d.traffic.name.as_str()).collect();
        let periods = periods_of(&self.history, Subject::Device, &names);
        for device in &mut devices {
            device.periods = periods_for(&periods, &device.traffic.name, Subject::Device);
        }
        Ok(Self::listing(&self.read(), None, Devices { devices }))
    }

    /// `GET /api/v1/connections[?limit=N]`: TCP connection health over the
    /// last minutes, per device (its handshakes' client side) and per
    /// server (their server side), those with failures first.
    pub fn connections(&self, query: &HashMap<String, String>) -> Result<String, ApiError> {
        let query = ListQuery::parse(query, false)?;
        let health = sync::read(&self.connections);
        let now = Instant::now();
        Ok(json(&Connections {
            window_seconds: health.window().as_secs(),
            devices: health
                .rows(false, now, query.limit)
                .into_iter()
                .map(connections_doc)
                .collect(),
            servers: health
                .rows(true, now, query.limit)
                .into_iter()
                .map(connections_doc)
                .collect(),
        }))
    }

    /// `GET /api/v1/servers[?device=NAME][&limit=N]` and the same for
    /// `services`: remote hosts or services, overall or of one device.
    pub fn top(&self, kind: Subject, query: &HashMap<String, String>) -> Result<String, ApiError> {
        let query = ListQuery::parse(query, true)?;
        let live = self.read();
        let rows = live
            .top(kind, query.device.as_deref(), Instant::now(), query.limit)
            .ok_or_else(|| ApiError::NoSuchDevice(query.device.clone().unwrap_or_default()))?;
        let rows: Vec<TrafficDoc> = rows.iter().map(traffic).collect();
        Ok(match kind {
            Subject::Server => Self::listing(&live, query.device, Servers { servers: rows }),
            _ => Self::listing(&live, query.device, Services { services: rows }),
        })
    }

    /// `GET /api/v1/interfaces`: every interface traffic was counted on,
    /// and every requested one, with its attach state.
    pub fn interfaces(&self, query: &HashMap<String, String>) -> Result<String, ApiError> {
        let query = ListQuery::parse(query, false)?;
        let attached: HashMap<String, bool> = self.health.states().into_iter().collect();
        let rows = self
            .read()
            .top(Subject::Interface, None, Instant::now(), query.limit)
            .unwrap_or_default();
        let mut interfaces: Vec<InterfaceDoc> = rows
            .iter()
            .map(|row| InterfaceDoc {
                periods: None,
                name: row.name.clone(),
                attached: attached.get(&row.name).copied(),
                ingress: way(row, Hook::Ingress as usize),
                egress: way(row, Hook::Egress as usize),
            })
            .collect();
        // Requested interfaces with no traffic yet are shown too.
        for (name, state) in &attached {
            if interfaces.len() < query.limit && !interfaces.iter().any(|i| &i.name == name) {
                let zero = || WayDoc {
                    bytes: 0,
                    packets: 0,
                    rate: 0.0,
                };
                interfaces.push(InterfaceDoc {
                    periods: None,
                    name: name.clone(),
                    attached: Some(*state),
                    ingress: zero(),
                    egress: zero(),
                });
            }
        }
        let names: Vec<&str> = interfaces.iter().map(|i| i.name.as_str()).collect();
        let periods = periods_of(&self.history, Subject::Interface, &names);
        for iface in &mut interfaces {
            iface.periods = periods_for(&periods, &iface.name, Subject::Interface);
        }
        Ok(Self::listing(&self.read(), None, Interfaces { interfaces }))
    }

    /// `GET /api/v1/history?kind=K&name=N[&from=T][&to=T][&step=S]`: one
    /// subject's totals per step (seconds, a multiple of 60) from `from` to
    /// `to` (Unix seconds; default the last 24 hours).
    pub fn history(&self, query: &HashMap<String, String>) -> Result<String, ApiError> {
        let bad = |m: String| ApiError::BadHistoryQuery(m);
        let mut kind = None;
        let mut name = None;
        let now = unix_seconds(SystemTime::now()) as i64;
        let (mut from, mut to, mut step) = (None, None, None);
        for (key, value) in query {
            let number = || {
                value
                    .parse::<i64>()
                    .map_err(|_| bad(format!("{key} must be a whole number, not {value:?}")))
            };
            match key.as_str() {
                "kind" => {
                    kind = Some(kind_of(value).ok_or_else(|| {
                        bad(format!(
                            "kind must be devices, servers, services or interfaces, not {value:?}"
                        ))
                    })?)
                }
                "name" => name = Some(value.clone()),
                "from" => from = Some(number()?),
                "to" => to = Some(number()?),
                "step" => step = Some(number()?),
                _ => return Err(ApiError::UnknownParameter(key.clone())),
            }
        }
        let (kind, kind_name) = kind.ok_or_else(|| bad("kind is missing".into()))?;
        let name = name.ok_or_else(|| bad("name is missing".into()))?;
        let to = to.unwrap_or(now);
        let from = from.unwrap_or(to.saturating_sub(86_400));
        if from >= to {
            return Err(bad(format!("from ({from}) must be before to ({to})")));
        }
        let step = step.unwrap_or(match to.saturating_sub(from) {
            span if span <= 2 * 86_400 => 60,
            span if span <= 90 * 86_400 => 3600,
            _ => 86_400,
        });
        if step < 60 || step % 60 != 0 {
            return Err(bad(format!(
                "step must be a multiple of 60 seconds, not {step}"
            )));
        }
        if to.saturating_sub(from) / step > MAX_POINTS {
            return Err(bad(format!(
                "that is more than {MAX_POINTS} steps: choose a larger step or a shorter range"
            )));
        }
        // The coarsest tier that divides the step (it is kept the longest);
        // a bucket counts in the step its start falls in.
        let tier = [Tier::Day, Tier::Hour, Tier::Minute]
            .into_iter()
            .find(|tier| step % tier.seconds() == 0)
            .unwrap_or(Tier::Minute);
        let series = self
            .history
            .series(kind, &name, tier, (from, to), step)
            .map_err(|e| ApiError::HistoryUnavailable(e.to_string()))?;
        let points = series
            .into_iter()
            .map(|(start, totals)| Point {
                start,
                ways: ways(kind, &totals),
            })
            .collect();
        Ok(json(&HistoryDoc {
            kind: kind_name,
            name,
            from,
            to,
            step,
            persistent: self.history.persistent(),
            points,
        }))
    }

    /// `GET /api/v1/status`: ntm's health.
    pub fn status(&self) -> String {
        let live = self.read();
        let (healthy, _) = self.health.report();
        let status = sync::lock(&self.status).clone();
        json(&StatusDoc {
            started: unix_seconds(live.started()),
            now: unix_seconds(SystemTime::now()),
            rate_window_seconds: live.rate_window().as_secs_f64(),
            refresh_seconds: live.bucket().as_secs_f64(),
            traffic: traffic(&live.all(Instant::now())),
            healthy,
            interfaces: self
                .health
                .states()
                .into_iter()
                .map(|(name, attached)| AttachedDoc { name, attached })
                .collect(),
            series: status.series,
            max_series: status.max_series,
            series_folded: status.series_folded,
            overflow: (&status.overflow).into(),
            flow_table_capacity: status.flow_table_capacity,
            waiting_flows: status.waiting_flows,
            drains: status.drains,
            last_drain: status.last_drain.map(unix_seconds),
            history_persistent: self.history.persistent(),
            history_uncommitted: self.history.uncommitted(),
            local_networks_learnt: self.local.is_learnt(),
            local_networks: self
                .local
                .list()
                .iter()
                .map(|n| LocalNetDoc {
                    network: n.net.to_string(),
                    origin: n.origin.kind(),
                    interface: n.origin.interface().map(str::to_string),
                })
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::net::Cidr;
    use ntm_common::{Counters, Hook, test_util::KeyBuilder};
    use std::time::Duration;

    fn api() -> Api {
        let now = Instant::now();
        let local = LocalNets::given(vec!["192.168.0.0/16".parse::<Cidr>().unwrap()]);
        let mut live = LiveTraffic::new(local.clone(), Duration::from_secs(1), now);
        let key = KeyBuilder::v4([93, 184, 216, 34], [192, 168, 1, 20])
            .tcp(443)
            .ifindex(2)
            .hook(Hook::Ingress)
            .build();
        let hostile = "<img src=x onerror=alert(1)>\"\\";
        live.add_flow(
            &key,
            "eth0",
            ("example.com", hostile),
            "https",
            &Counters {
                bytes: 1500,
                packets: 1,
            },
            now,
        );
        let health = Health::default();
        health.set("eth0", true);
        let metrics = crate::health::self_metrics::SelfMetrics::new("ntm", 1024).unwrap();
        let history = crate::outputs::history::History::start(
            &crate::outputs::history::HistoryOptions {
                state_dir: None,
                retention: Default::default(),
                commit_interval: Duration::from_secs(60),
                period_start_day: 1,
                quotas: Vec::new(),
                max_period_devices: 100,
            },
            metrics.history.clone(),
            crate::outputs::history::local_day_start,
        )
        .unwrap();
        let mut connections = LiveHealth::new(now);
        let (device, server): (Arc<str>, Arc<str>) = (Arc::from(hostile), Arc::from("example.com"));
        connections.add(
            &device,
            &server,
            crate::kernel::handshakes::Outcome::Established {
                server: Some(Duration::from_millis(50)),
                client: Some(Duration::from_millis(20)),
            },
            now,
        );
        connections.add(
            &device,
            &server,
            crate::kernel::handshakes::Outcome::Refused,
            now,
        );
        Api {
            live: Arc::new(RwLock::new(live)),
            history: history.reader(),
            health,
            status: Arc::default(),
            local,
            connections: Arc::new(RwLock::new(connections)),
        }
    }

    fn query(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn names_from_the_network_come_back_as_the_same_json_strings() {
        let body = api().devices(&query(&[])).unwrap();
        let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            doc["devices"][0]["name"],
            "<img src=x onerror=alert(1)>\"\\"
        );
        assert_eq!(doc["devices"][0]["download"]["bytes"], 1500);
        assert_eq!(doc["devices"][0]["upload"]["packets"], 0);
    }

    #[test]
    fn connections_per_device_and_server_with_names_as_json_strings() {
        let body = api().connections(&query(&[])).unwrap();
        let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(doc["window_seconds"], 300);
        let device = &doc["devices"][0];
        assert_eq!(device["name"], "<img src=x onerror=alert(1)>\"\\");
        assert_eq!(device["handshakes"], 1);
        let median = device["median_seconds"].as_f64().unwrap();
        assert!((median / 0.020 - 1.0).abs() < 0.1, "{median}");
        assert_eq!(device["failed"]["refused"], 1);
        assert_eq!(device["failed"]["reset"], 0);
        let server = &doc["servers"][0];
        assert_eq!(server["name"], "example.com");
        let p90 = server["p90_seconds"].as_f64().unwrap();
        assert!((p90 / 0.050 - 1.0).abs() < 0.1, "{p90}");
        assert!(api().connections(&query(&[("device", "x")])).is_err());
    }

    #[test]
    fn a_device_s_servers_and_bad_queries() {
        let api = api();
        let hostile = "<img src=x onerror=alert(1)>\"\\";
        let body = api
            .top(Subject::Server, &query(&[("device", hostile)]))
            .unwrap();
        let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(doc["servers"][0]["name"], "example.com");
        assert_eq!(doc["device"], hostile);
        assert_eq!(
            api.top(Subject::Server, &query(&[("device", "x")])),
            Err(ApiError::NoSuchDevice("x".into()))
        );
        // Extremes are errors, not overflows.
        for (from, to, step) in [
            (i64::MIN.to_string(), i64::MAX.to_string(), "60"),
            ("0".into(), "60".into(), "-60"),
        ] {
            let q = query(&[
                ("kind", "devices"),
                ("name", "x"),
                ("from", &from),
                ("to", &to),
                ("step", step),
            ]);
            assert!(api.history(&q).is_err());
        }
        let bad = api.devices(&query(&[("limit", "0")])).unwrap_err();
        assert_eq!(bad.status(), 400);
        assert!(serde_json::from_str::<serde_json::Value>(&bad.body()).is_ok());
        assert!(api.devices(&query(&[("device", "x")])).is_err());
    }

    proptest::proptest! {
        /// ListQuery parameters come from any HTTP client: whatever they are,
        /// every listing answers JSON (a document or an error), never panics.
        #[test]
        fn any_query_gets_json(
            pairs in proptest::collection::vec(
                (
                    proptest::sample::select(vec!["limit", "device", "kind", "name", "from", "to", "step", "x"]),
                    ".{0,24}",
                ),
                0..5,
            )
        ) {
            let api = api();
            let q: HashMap<String, String> =
                pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
            for answer in [
                api.devices(&q),
                api.top(Subject::Server, &q),
                api.top(Subject::Service, &q),
                api.interfaces(&q),
                api.history(&q),
                api.connections(&q),
            ] {
                let body = answer.unwrap_or_else(|e| e.body());
                proptest::prop_assert!(serde_json::from_str::<serde_json::Value>(&body).is_ok());
            }
        }
    }

    #[test]
    fn interfaces_and_status() {
        let api = api();
        let doc: serde_json::Value =
            serde_json::from_str(&api.interfaces(&query(&[])).unwrap()).unwrap();
        assert_eq!(doc["interfaces"][0]["name"], "eth0");
        assert_eq!(doc["interfaces"][0]["attached"], true);
        assert_eq!(doc["interfaces"][0]["ingress"]["bytes"], 1500);
        let status: serde_json::Value = serde_json::from_str(&api.status()).unwrap();
        assert_eq!(status["healthy"], true);
        assert_eq!(status["interfaces"][0]["name"], "eth0");
        // All traffic: the one flow came in from a remote host.
        assert_eq!(status["traffic"]["download"]["bytes"], 1500);
        assert_eq!(status["traffic"]["upload"]["bytes"], 0);
        assert_eq!(status["refresh_seconds"], 1.0);
        let now = unix_seconds(SystemTime::now());
        let agent_now = status["now"].as_u64().unwrap();
        assert!((now - 5..=now).contains(&agent_now), "{agent_now} vs {now}");
        assert_eq!(status["local_networks_learnt"], false);
        assert_eq!(
            status["local_networks"],
            serde_json::json!([{"network": "192.168.0.0/16", "origin": "given"}])
        );
    }
}
