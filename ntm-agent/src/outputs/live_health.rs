//! What the page and the JSON API show of TCP connection health: per
//! device (a client: the client's side of its handshakes, its link, and its
//! connections that failed) and per server (the server's side, and the
//! connections to it that failed), over the last [`WINDOW_MINUTES`]
//! minutes: the handshakes measured, their median and 90th percentile, and
//! the failures by reason.
//!
//! Fed with the same labelled handshakes as `<prefix>_tcp_handshake_seconds`
//! (`tcp_health.rs`), so the two agree. Times are kept in logarithmic bins
//! (each [`BIN_GROWTH`] times the one before: a quantile is exact to within
//! half a bin, about 10%), per minute, so that a window costs a fixed
//! amount of memory however many handshakes it holds. Both tables are
//! bounded: past their size, new names are counted under `other`; names
//! idle for the series TTL are forgotten.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use super::sink::{LabelledDrain, Sink};
use crate::{
    kernel::handshakes::Outcome,
    model::{OTHER, sync},
};

/// The window quantiles and failures are over.
pub const WINDOW_MINUTES: usize = 5;
/// Devices kept at most.
pub const MAX_DEVICES: usize = 1024;
/// Servers kept at most.
pub const MAX_SERVERS: usize = 2048;

/// The first bin's upper bound: 100 µs (a LAN answers in about that).
const FIRST_BIN_SECONDS: f64 = 100e-6;
/// Each bin's bound over the one before.
const BIN_GROWTH: f64 = 1.2;
/// 100 µs × 1.2^80 ≈ 220 s: past any handshake; the last bin takes the rest.
const BINS: usize = 80;

/// The failure reasons, in the order [`Minute::failed`] keeps them.
pub const REASONS: [&str; 4] = ["refused", "unanswered", "reset", "unreachable"];

/// The bin of a time.
fn bin_of(t: Duration) -> usize {
    let s = t.as_secs_f64();
    if s <= FIRST_BIN_SECONDS {
        return 0;
    }
    let k = ((s / FIRST_BIN_SECONDS).ln() / BIN_GROWTH.ln()).ceil();
    (k as usize).min(BINS - 1)
}

/// A time standing for bin `k`: the geometric middle of its bounds.
fn middle_of(k: usize) -> f64 {
    let upper = FIRST_BIN_SECONDS * BIN_GROWTH.powi(k as i32);
    if k == 0 {
        upper
    } else {
        upper / BIN_GROWTH.sqrt()
    }
}

/// One minute of one device's or server's handshakes.
#[derive(Clone, Debug, Default)]
struct Minute {
    /// Which minute since the view's start.
    number: u64,
    /// Handshake times by bin; allocated with the first one.
    bins: Option<Box<[u32; BINS]>>,
    failed: [u64; 4],
}

/// The last [`WINDOW_MINUTES`] minutes of one device or server, a ring.
#[derive(Clone, Debug)]
struct Window {
    minutes: [Minute; WINDOW_MINUTES],
    last_seen: Instant,
}

impl Window {
    fn new(now: Instant) -> Self {
        Self {
            minutes: Default::default(),
            last_seen: now,
        }
    }

    /// This minute's slot, emptied if it held an older minute.
    fn minute(&mut self, number: u64, now: Instant) -> &mut Minute {
        self.last_seen = now;
        let slot = &mut self.minutes[(number % WINDOW_MINUTES as u64) as usize];
        if slot.number != number {
            *slot = Minute {
                number,
                ..Minute::default()
            };
        }
        slot
    }

    /// The window's summary as of minute `now_number`.
    fn summary(&self, now_number: u64) -> Summary {
        let mut bins = [0u64; BINS];
        let mut failed = [0u64; 4];
        for m in &self.minutes {
            if m.number + (WINDOW_MINUTES as u64) <= now_number || m.number > now_number {
                continue;
            }
            if let Some(b) = &m.bins {
                for (total, n) in bins.iter_mut().zip(b.iter()) {
                    *total += *n as u64;
                }
            }
            for (total, n) in failed.iter_mut().zip(m.failed) {
                *total += n;
            }
        }
        let measured: u64 = bins.iter().sum();
        let quantile = |q: f64| -> Option<f64> {
            if measured == 0 {
                return None;
            }
            // The smallest time with at least q of the handshakes at or
            // below it.
            let rank = ((q * measured as f64).ceil() as u64).max(1);
            let mut seen = 0;
            bins.iter().enumerate().find_map(|(k, n)| {
                seen += n;
                (seen >= rank).then(|| middle_of(k))
            })
        };
        Summary {
            measured,
            median: quantile(0.5),
            p90: quantile(0.9),
            failed,
        }
    }
}

/// One device's or server's handshakes over the window.
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    /// Handshakes whose time (this side's) was measured.
    pub measured: u64,
    /// Their median and 90th percentile, in seconds.
    pub median: Option<f64>,
    pub p90: Option<f64>,
    /// Connections that failed, by [`REASONS`].
    pub failed: [u64; 4],
}

impl Summary {
    pub fn failures(&self) -> u64 {
        self.failed.iter().sum()
    }
}

/// A bounded table of windows by name.
struct Windows {
    entries: HashMap<Arc<str>, Window>,
    max: usize,
}

impl Windows {
    fn new(max: usize) -> Self {
        Self {
            entries: HashMap::new(),
            max,
        }
    }

    fn entry(&mut self, name: &Arc<str>, now: Instant) -> &mut Window {
        let name = if self.entries.len() >= self.max && !self.entries.contains_key(name) {
            Arc::from(OTHER)
        } else {
            Arc::clone(name)
        };
        self.entries.entry(name).or_insert_with(|| Window::new(now))
    }
}

/// The live view of connection health (see the module's documentation).
pub struct LiveHealth {
    epoch: Instant,
    devices: Windows,
    servers: Windows,
}

impl LiveHealth {
    pub fn new(now: Instant) -> Self {
        Self {
            epoch: now,
            devices: Windows::new(MAX_DEVICES),
            servers: Windows::new(MAX_SERVERS),
        }
    }

    fn minute_of(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_secs() / 60
    }

    /// One handshake that ended (or a SYN left unanswered), its client and
    /// server named.
    pub fn add(&mut self, client: &Arc<str>, server: &Arc<str>, outcome: Outcome, now: Instant) {
        let number = self.minute_of(now);
        let (client_time, server_time, reason) = match outcome {
            Outcome::Established { server, client } => (client, server, None),
            failed => (None, None, failed.failure()),
        };
        for (table, name, time) in [
            (&mut self.devices, client, client_time),
            (&mut self.servers, server, server_time),
        ] {
            if name.is_empty() {
                continue;
            }
            let minute = table.entry(name, now).minute(number, now);
            if let Some(t) = time {
                minute.bins.get_or_insert_with(|| Box::new([0; BINS]))[bin_of(t)] += 1;
            }
            if let Some(i) = reason.and_then(|r| REASONS.iter().position(|x| *x == r)) {
                minute.failed[i] += 1;
            }
        }
    }

    /// Devices (`servers` false) or servers, those with the most failures
    /// first, then the most handshakes; at most `limit`.
    pub fn rows(&self, servers: bool, now: Instant, limit: usize) -> Vec<(Arc<str>, Summary)> {
        let number = self.minute_of(now);
        let table = if servers {
            &self.servers
        } else {
            &self.devices
        };
        let mut rows: Vec<(Arc<str>, Summary)> = table
            .entries
            .iter()
            .map(|(name, w)| (Arc::clone(name), w.summary(number)))
            .filter(|(_, s)| s.measured + s.failures() > 0)
            .collect();
        rows.sort_by(|a, b| {
            (b.1.failures(), b.1.measured, &a.0).cmp(&(a.1.failures(), a.1.measured, &b.0))
        });
        rows.truncate(limit);
        rows
    }

    /// Forgets the names idle for `ttl`.
    pub fn expire(&mut self, now: Instant, ttl: Duration) {
        for table in [&mut self.devices, &mut self.servers] {
            table
                .entries
                .retain(|_, w| now.saturating_duration_since(w.last_seen) < ttl);
        }
    }

    /// The window the rows are over.
    pub fn window(&self) -> Duration {
        Duration::from_secs(60 * WINDOW_MINUTES as u64)
    }
}

/// The live view of connection health as an output.
pub struct LiveHealthSink {
    health: Arc<RwLock<LiveHealth>>,
}

impl LiveHealthSink {
    pub fn new(health: Arc<RwLock<LiveHealth>>) -> Self {
        Self { health }
    }
}

impl Sink for LiveHealthSink {
    fn labelled(&mut self, drain: &LabelledDrain, now: Instant) {
        if drain.handshakes.is_empty() {
            return;
        }
        let mut health = sync::write(&self.health);
        for h in &drain.handshakes {
            health.add(&h.client, &h.server, h.outcome, now);
        }
    }

    fn expire(&mut self, now: Instant, ttl: Duration) {
        sync::write(&self.health).expire(now, ttl);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up(server_ms: u64, client_ms: u64) -> Outcome {
        Outcome::Established {
            server: Some(Duration::from_millis(server_ms)),
            client: Some(Duration::from_millis(client_ms)),
        }
    }

    #[test]
    fn bins_hold_a_time_within_a_tenth() {
        for ms in [0.05, 0.3, 1.0, 7.0, 40.0, 100.0, 999.0, 10_000.0] {
            let t = Duration::from_secs_f64(ms / 1e3);
            let shown = middle_of(bin_of(t)) * 1e3;
            if ms > 0.1 {
                assert!((shown / ms - 1.0).abs() < 0.1, "{ms} ms shown as {shown}");
            }
        }
        assert_eq!(bin_of(Duration::from_secs(10_000)), BINS - 1);
    }

    #[test]
    fn median_and_p90_per_device_and_server_with_failures() {
        let t0 = Instant::now();
        let mut h = LiveHealth::new(t0);
        let (laptop, tv): (Arc<str>, Arc<str>) = (Arc::from("laptop"), Arc::from("tv"));
        let cdn: Arc<str> = Arc::from("cdn.example");
        // The laptop's link: 9 handshakes at 10 ms, one at 100 ms.
        for i in 0..10 {
            let client = if i == 9 { 100 } else { 10 };
            h.add(&laptop, &cdn, up(50, client), t0);
        }
        h.add(&tv, &cdn, Outcome::Refused, t0);
        h.add(&tv, &cdn, Outcome::Unanswered, t0);
        let devices = h.rows(false, t0, 10);
        assert_eq!(devices[0].0.as_ref(), "tv", "failures first");
        assert_eq!(devices[0].1.failed, [1, 1, 0, 0]);
        assert_eq!(devices[0].1.median, None);
        let laptop_row = &devices[1].1;
        assert_eq!(laptop_row.measured, 10);
        let near = |x: Option<f64>, ms: f64| (x.unwrap() * 1e3 / ms - 1.0).abs() < 0.1;
        assert!(near(laptop_row.median, 10.0), "{laptop_row:?}");
        assert!(near(laptop_row.p90, 10.0), "{laptop_row:?}");
        let servers = h.rows(true, t0, 10);
        assert_eq!(servers.len(), 1);
        assert_eq!(servers[0].1.measured, 10);
        assert!(near(servers[0].1.median, 50.0), "{:?}", servers[0]);
        assert_eq!(servers[0].1.failed, [1, 1, 0, 0]);
    }

    #[test]
    fn the_window_slides_and_names_expire_and_tables_are_bounded() {
        let t0 = Instant::now();
        let mut h = LiveHealth::new(t0);
        let dev: Arc<str> = Arc::from("d");
        let srv: Arc<str> = Arc::from("s");
        h.add(&dev, &srv, up(10, 10), t0);
        h.add(&dev, &srv, up(10, 10), t0 + Duration::from_secs(61));
        assert_eq!(
            h.rows(false, t0 + Duration::from_secs(62), 5)[0].1.measured,
            2
        );
        // Six minutes on, the first minute has left the window.
        let later = t0 + Duration::from_secs(5 * 60 + 1);
        assert_eq!(h.rows(false, later, 5)[0].1.measured, 1);
        assert!(h.rows(false, t0 + Duration::from_secs(3600), 5).is_empty());
        h.expire(t0 + Duration::from_secs(3600), Duration::from_secs(600));
        assert!(h.devices.entries.is_empty());

        for i in 0..MAX_SERVERS + 10 {
            h.add(&dev, &Arc::from(format!("s{i}")), Outcome::Reset, t0);
        }
        assert_eq!(h.servers.entries.len(), MAX_SERVERS + 1);
        let other = h.servers.entries.get(OTHER).unwrap().summary(0);
        assert_eq!(other.failed, [0, 0, 10, 0]);
    }
}
