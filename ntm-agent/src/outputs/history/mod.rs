//! History that survives restarts: the totals of each device, server,
//! service and interface, per minute, hour and day, in an SQLite database
//! in `--state-dir` (see [`store`]; why SQLite: ARCHITECTURE.md).
//!
//! The pipeline hands each drain's counts per subject to [`History::add`]
//! (a map insert under a lock: the drain never waits for the disk); a
//! thread of its own commits them every `--history-commit-interval`, in one
//! transaction, and prunes old buckets. A `kill -9` loses at most what was
//! not committed yet; SIGTERM commits everything first.
//!
//! A database that cannot be used (corrupt, read-only, of a newer ntm,
//! another agent's) is logged once and replaced by one in memory: the
//! history of this run, with counting and `/metrics` untouched. A corrupt
//! file is moved aside (never deleted) and a new one started; a commit
//! that fails (disk full) keeps its counts for the next try.

pub mod periods;
pub mod sink;
pub mod store;

use std::{
    collections::HashMap,
    fs::File,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, mpsc},
    thread::JoinHandle,
    time::{Duration, SystemTime},
};

use ntm_common::{Counters, Hook};

use self::{
    periods::{Period, period_start},
    store::{Store, StoreError},
};
use crate::{
    health::self_metrics::{CommitResult, HistoryMetrics},
    model::{
        subjects::{Side, Subject, Way},
        sync::lock,
    },
};

/// A bucket's width.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Tier {
    Minute = 0,
    Hour = 1,
    Day = 2,
}

impl Tier {
    pub fn seconds(self) -> i64 {
        match self {
            Tier::Minute => 60,
            Tier::Hour => 3600,
            Tier::Day => 86_400,
        }
    }
}

/// Bytes and packets in, and out (see [`crate::model::subjects::Way`]).
pub type Totals = [Counters; 2];

/// Adds `more` to `total`, each way.
pub fn add_totals(total: &mut Totals, more: &Totals) {
    total[0].add(&more[0]);
    total[1].add(&more[1]);
}

/// Counts not in the database yet, by minute (Unix seconds), kind and
/// subject.
pub type Batch = HashMap<(i64, Subject, String), Totals>;

/// Counts waiting for a commit, at most: past it (a disk that stays full
/// for hours), the oldest minutes are dropped and counted as lost.
const MAX_PENDING: usize = 1_000_000;

/// How long each tier is kept, and how large the file may grow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Retention {
    pub minutes: Duration,
    pub hours: Duration,
    pub days: Duration,
    pub max_bytes: u64,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            minutes: Duration::from_secs(48 * 3600),
            hours: Duration::from_secs(90 * 86_400),
            days: Duration::from_secs(5 * 366 * 86_400),
            max_bytes: 256 << 20,
        }
    }
}

#[derive(Clone, Debug)]
pub struct HistoryOptions {
    /// Where the database lives (None: in memory only, `--no-history`).
    pub state_dir: Option<PathBuf>,
    pub retention: Retention,
    pub commit_interval: Duration,
    /// The day of the month billing periods start on (1 to 28).
    pub period_start_day: u8,
    /// `--quota`: data caps per interface and period.
    pub quotas: Vec<Quota>,
    /// Devices in `<prefix>_period_bytes`, at most (the series budget).
    pub max_period_devices: usize,
}

/// A data cap: `--quota eth0=1T/month`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Quota {
    pub iface: String,
    pub bytes: u64,
    pub period: Period,
}

impl std::str::FromStr for Quota {
    type Err = String;

    /// `IFACE=SIZE[/day|week|month]`; sizes in bytes with k, M, G or T
    /// (powers of 1000, as data plans count) or Ki, Mi, Gi, Ti (of 1024).
    fn from_str(text: &str) -> Result<Self, String> {
        let usage = || format!("{text:?} is not a quota like eth0=1T/month or wwan0=500M/day");
        let (iface, rest) = text.split_once('=').ok_or_else(usage)?;
        let (size, period) = rest.split_once('/').unwrap_or((rest, "month"));
        let period = match period {
            "day" => Period::Day,
            "week" => Period::Week,
            "month" => Period::Month,
            _ => return Err(usage()),
        };
        let digits = size
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(size.len());
        let (number, unit) = size.split_at(digits);
        let number: u64 = number.parse().map_err(|_| usage())?;
        let unit: u64 = match unit.trim_end_matches('B') {
            "" => 1,
            "k" | "K" => 1_000,
            "M" => 1_000_000,
            "G" => 1_000_000_000,
            "T" => 1_000_000_000_000,
            "Ki" => 1 << 10,
            "Mi" => 1 << 20,
            "Gi" => 1 << 30,
            "Ti" => 1 << 40,
            _ => return Err(usage()),
        };
        let bytes = number
            .checked_mul(unit)
            .filter(|b| *b > 0)
            .ok_or_else(usage)?;
        if iface.is_empty() {
            return Err(usage());
        }
        Ok(Self {
            iface: iface.to_string(),
            bytes,
            period,
        })
    }
}

/// The file, and the lock that makes it this agent's.
const DATABASE: &str = "history.db";
const LOCK: &str = "history.lock";

/// The database handle the writer and the API share, with what is not
/// committed yet.
pub struct History {
    reader: HistoryReader,
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    /// Where the database is (None: in memory).
    pub path: Option<PathBuf>,
    /// Held while the agent runs (the file lock goes with it).
    _lock: Option<File>,
}

/// What can be read while the agent runs: the database and the counts
/// waiting for the next commit.
#[derive(Clone)]
pub struct HistoryReader {
    store: Arc<Mutex<Store>>,
    pending: Arc<Mutex<Batch>>,
    /// Locked after `store`, before `pending`.
    committed: Arc<Mutex<HashMap<(Subject, Period), CommittedPeriod>>>,
    persistent: bool,
    period_start_day: u8,
}

/// Moves a damaged database (and its WAL) aside, so that nothing is
/// deleted and a new one can start.
fn move_aside(path: &Path) -> std::io::Result<PathBuf> {
    let stamp = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let aside = path.with_extension(format!("db.corrupt-{stamp}"));
    std::fs::rename(path, &aside)?;
    for suffix in ["-wal", "-shm"] {
        let mut side = path.as_os_str().to_owned();
        side.push(suffix);
        let _ = std::fs::remove_file(PathBuf::from(side));
    }
    Ok(aside)
}

/// Why the history in `--state-dir` cannot be used (this run's history
/// is then kept in memory). Each message names its cause, which is also
/// its source.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(
        "cannot create {}: {source}; create it, or give another --state-dir",
        dir.display()
    )]
    CreateDir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "cannot write in {}: {source}; make it writable by the agent's user, or give another --state-dir",
        dir.display()
    )]
    NotWritable {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "another ntm agent writes the history in {}; give each agent its own --state-dir",
        dir.display()
    )]
    Locked { dir: PathBuf },
    #[error("cannot lock {}: {source}", path.display())]
    Lock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The damage is `damage`; what failed is the move.
    #[error("{damage}; it cannot be moved aside: {source}; move it away to start a new history")]
    CannotMoveAside {
        damage: Box<StoreError>,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{} was damaged and moved to {}, but a new history cannot start: {source}",
        path.display(),
        aside.display()
    )]
    AfterMovingAside {
        path: PathBuf,
        aside: PathBuf,
        #[source]
        source: Box<StoreError>,
    },
    /// Newer, read-only, or another SQLite error: left as it is.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Opens the database in `dir`, or says why not.
fn open_in(dir: &Path) -> Result<(Store, File, PathBuf), OpenError> {
    std::fs::create_dir_all(dir).map_err(|source| OpenError::CreateDir {
        dir: dir.to_owned(),
        source,
    })?;
    let lock_path = dir.join(LOCK);
    let lock = File::create(&lock_path).map_err(|source| OpenError::NotWritable {
        dir: dir.to_owned(),
        source,
    })?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            return Err(OpenError::Locked {
                dir: dir.to_owned(),
            });
        }
        Err(std::fs::TryLockError::Error(source)) => {
            return Err(OpenError::Lock {
                path: lock_path,
                source,
            });
        }
    }
    let path = dir.join(DATABASE);
    match Store::open(&path) {
        Ok(store) => Ok((store, lock, path)),
        Err(damage) if damage.is_damaged() => {
            let aside = match move_aside(&path) {
                Ok(aside) => aside,
                Err(source) => {
                    return Err(OpenError::CannotMoveAside {
                        damage: Box::new(damage),
                        source,
                    });
                }
            };
            log::warn!(
                "history: {} was damaged; moved it to {} and started a new history",
                path.display(),
                aside.display()
            );
            match Store::open(&path) {
                Ok(store) => Ok((store, lock, path)),
                Err(source) => Err(OpenError::AfterMovingAside {
                    path,
                    aside,
                    source: Box::new(source),
                }),
            }
        }
        Err(e) => Err(e.into()),
    }
}

impl History {
    /// Opens the history (or one in memory, saying why) and starts its
    /// writer. `day_start` gives the local midnight a minute is in.
    pub fn start(
        options: &HistoryOptions,
        metrics: HistoryMetrics,
        day_start: fn(i64) -> i64,
    ) -> Result<Self, StoreError> {
        let opened = match &options.state_dir {
            Some(dir) => match open_in(dir) {
                Ok(opened) => Some(opened),
                Err(why) => {
                    log::error!(
                        "history: {why}; keeping this run's history in memory only (counting and /metrics are not affected)"
                    );
                    None
                }
            },
            None => None,
        };
        let (store, lock, path) = match opened {
            Some((store, lock, path)) => (store, Some(lock), Some(path)),
            None => (Store::in_memory()?, None, None),
        };
        metrics.persistent.set(i64::from(path.is_some()));
        let store = Arc::new(Mutex::new(store));
        let pending = Arc::new(Mutex::new(Batch::new()));
        let (stop, stopped) = mpsc::channel();
        let reader = HistoryReader {
            store: Arc::clone(&store),
            pending: Arc::clone(&pending),
            committed: Arc::default(),
            persistent: path.is_some(),
            period_start_day: options.period_start_day,
        };
        let writer = Writer {
            reader: reader.clone(),
            retention: options.retention.clone(),
            metrics,
            day_start,
            quotas: options.quotas.clone(),
            max_period_devices: options.max_period_devices,
        };
        // The writer publishes only after its first commit interval: without
        // this, a restarted agent's /metrics would lack the period totals
        // and quotas the database already holds for up to that long.
        writer.publish_periods();
        let interval = options.commit_interval;
        let thread = std::thread::Builder::new()
            .name("ntm-history".into())
            .spawn(move || writer.run(interval, stopped))
            .map_err(|e| log::error!("history: cannot start its writer: {e}"))
            .ok();
        Ok(Self {
            reader,
            stop: Some(stop),
            thread,
            path,
            _lock: lock,
        })
    }

    /// Counts of the minute starting at `minute` (Unix seconds), for the
    /// next commit.
    pub fn add(&self, minute: i64, counts: impl IntoIterator<Item = ((Subject, String), Totals)>) {
        let mut pending = lock(&self.reader.pending);
        for ((kind, name), totals) in counts {
            let entry = pending.entry((minute, kind, name)).or_default();
            add_totals(entry, &totals);
        }
    }

    pub fn reader(&self) -> HistoryReader {
        self.reader.clone()
    }

    /// Commits what is pending and stops the writer (as dropping does, on
    /// every way out of the agent).
    pub fn stop(self) {}
}

impl Drop for History {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One kind's committed totals in one period, as the store had them after
/// its `writes`-th write. Every open page asks for them at every refresh
/// (a second) and the store adds them up from thousands of rows (26 ms
/// for 1,000 devices at a day's end, `cargo xtask bench`): they are
/// counted again only when the store or the period's start changed.
struct CommittedPeriod {
    writes: u64,
    since: i64,
    totals: Arc<HashMap<String, Totals>>,
}

/// A period's totals: the store's (shared, see [`CommittedPeriod`]) and
/// the pending counts asked for.
type PeriodParts = (Arc<HashMap<String, Totals>>, Vec<(String, Totals)>);

/// Each subject's totals of `kind` in the store from `since` on: today
/// from the hours since local midnight (and the minutes before the first
/// whole hour, in a zone half an hour off), weeks and billing periods from
/// the days.
fn committed_totals(
    store: &Store,
    kind: Subject,
    period: Period,
    since: i64,
) -> Result<HashMap<String, Totals>, StoreError> {
    Ok(match period {
        Period::Day => {
            let first_hour = since + (3600 - since.rem_euclid(3600)) % 3600;
            let mut totals = store.totals_between(kind, Tier::Minute, (since, first_hour))?;
            for (name, t) in store.totals_since(kind, Tier::Hour, first_hour)? {
                add_totals(totals.entry(name).or_default(), &t);
            }
            totals
        }
        Period::Week | Period::Month => store.totals_since(kind, Tier::Day, since)?,
    })
}

impl HistoryReader {
    /// Whether the history is on disk (false: in memory, this run only).
    pub fn persistent(&self) -> bool {
        self.persistent
    }

    /// Each subject's totals of `kind` in the `period` that `now` (Unix
    /// seconds) is in, committed and waiting alike: today from the hours
    /// since local midnight (and the minutes before the first whole hour,
    /// in a zone half an hour off), weeks and billing periods from the
    /// days.
    pub fn period_totals(
        &self,
        kind: Subject,
        period: Period,
        now: i64,
    ) -> Result<HashMap<String, Totals>, StoreError> {
        let (committed, pending) = self.period_parts(kind, period, now, |_| true)?;
        let mut totals = (*committed).clone();
        for (name, counts) in pending {
            add_totals(totals.entry(name).or_default(), &counts);
        }
        Ok(totals)
    }

    /// The same for the subjects named only (zero for one without
    /// traffic in the period): what an API answer of `limit` rows needs,
    /// at the cost of a lookup per name, not a copy of every subject's.
    pub fn period_totals_of<'a>(
        &self,
        kind: Subject,
        period: Period,
        now: i64,
        names: &[&'a str],
    ) -> Result<HashMap<&'a str, Totals>, StoreError> {
        let mut totals: HashMap<&'a str, Totals> = names
            .iter()
            .map(|name| (*name, Totals::default()))
            .collect();
        let (committed, pending) =
            self.period_parts(kind, period, now, |name| totals.contains_key(name))?;
        for (name, t) in totals.iter_mut() {
            if let Some(counts) = committed.get(*name) {
                add_totals(t, counts);
            }
        }
        for (name, counts) in pending {
            if let Some(t) = totals.get_mut(name.as_str()) {
                add_totals(t, &counts);
            }
        }
        Ok(totals)
    }

    /// A period's totals in two parts, seen at one instant (a commit moves
    /// counts from the pending batch to the store under the store's lock,
    /// which is held here throughout): the store's, counted once per write
    /// of the store and shared, and the pending counts of the subjects
    /// `wanted` says.
    fn period_parts(
        &self,
        kind: Subject,
        period: Period,
        now: i64,
        wanted: impl Fn(&str) -> bool,
    ) -> Result<PeriodParts, StoreError> {
        let tz = jiff::tz::TimeZone::system();
        let since = period_start(period, now, &tz, self.period_start_day);
        let store = lock(&self.store);
        let committed = {
            let mut cache = lock(&self.committed);
            match cache.get(&(kind, period)) {
                Some(c) if c.writes == store.writes() && c.since == since => Arc::clone(&c.totals),
                _ => {
                    let totals = Arc::new(committed_totals(&store, kind, period, since)?);
                    cache.insert(
                        (kind, period),
                        CommittedPeriod {
                            writes: store.writes(),
                            since,
                            totals: Arc::clone(&totals),
                        },
                    );
                    totals
                }
            }
        };
        let pending = lock(&self.pending)
            .iter()
            .filter(|((minute, k, name), _)| *k == kind && *minute >= since && wanted(name))
            .map(|((_, _, name), counts)| (name.clone(), *counts))
            .collect();
        Ok((committed, pending))
    }

    /// Buckets (minute and subject) waiting for a commit now.
    pub fn uncommitted(&self) -> usize {
        lock(&self.pending).len()
    }

    /// One subject's totals from `from` to `to` in steps of `step` seconds,
    /// from the finest tier that still holds `from` and divides `step`.
    pub fn series(
        &self,
        kind: Subject,
        name: &str,
        tier: Tier,
        range: (i64, i64),
        step: i64,
    ) -> Result<Vec<(i64, Totals)>, StoreError> {
        // The store's lock held while the pending counts are read: a commit
        // in between would otherwise hide them (see `Writer::commit`).
        let store = lock(&self.store);
        let mut series: std::collections::BTreeMap<i64, Totals> = store
            .series(kind, name, tier, range, step)?
            .into_iter()
            .collect();
        let (from, to) = range;
        for ((minute, k, n), counts) in lock(&self.pending).iter() {
            if *k == kind && n == name && (from..to).contains(minute) {
                let start = minute - (minute - from).rem_euclid(step.max(1));
                let entry = series.entry(start).or_default();
                add_totals(entry, counts);
            }
        }
        Ok(series.into_iter().collect())
    }
}

/// Creates `dir` and gives it, with what is in it, to `uid`:`gid`, so
/// that the history can be written after the agent gives up root.
pub fn hand_state_dir_to(dir: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::os::unix::fs::chown(dir, Some(uid), Some(gid))?;
    for entry in std::fs::read_dir(dir)? {
        std::os::unix::fs::chown(entry?.path(), Some(uid), Some(gid))?;
    }
    Ok(())
}

/// The start (Unix seconds) of the local day that `t` is in, in the
/// machine's time zone (`TZ`, else /etc/localtime; UTC where neither says).
pub fn local_day_start(t: i64) -> i64 {
    jiff::Timestamp::from_second(t)
        .ok()
        .and_then(|ts| {
            ts.to_zoned_datetime(jiff::tz::TimeZone::system())
                .start_of_day()
                .ok()
        })
        .map_or(t - t.rem_euclid(86_400), |day| day.timestamp().as_second())
}

/// The minute (Unix seconds) `now` is in.
pub fn minute_of(now: SystemTime) -> i64 {
    let t = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    t - t.rem_euclid(60)
}

/// How often old buckets are pruned and the size cap is checked.
const PRUNE_EVERY: Duration = Duration::from_secs(600);

/// The thread that commits.
struct Writer {
    reader: HistoryReader,
    quotas: Vec<Quota>,
    max_period_devices: usize,
    retention: Retention,
    metrics: HistoryMetrics,
    day_start: fn(i64) -> i64,
}

impl Writer {
    fn run(self, interval: Duration, stopped: mpsc::Receiver<()>) {
        let mut last_prune: Option<std::time::Instant> = None;
        let mut failing = false;
        loop {
            let stop = !matches!(
                stopped.recv_timeout(interval),
                Err(mpsc::RecvTimeoutError::Timeout)
            );
            failing = self.commit(failing);
            self.publish_periods();
            if !stop && last_prune.is_none_or(|at| at.elapsed() >= PRUNE_EVERY) {
                self.prune();
                last_prune = Some(std::time::Instant::now());
            }
            if stop {
                return;
            }
        }
    }

    /// Commits the pending counts; on an error keeps them for the next
    /// try. Returns whether it failed (logged once per run of failures).
    fn commit(&self, failing: bool) -> bool {
        // The store's lock is held from before the batch leaves the pending
        // counts until it is in the store: a reader (which takes the same
        // lock first) sees it in one place or the other, never in neither.
        // The drain only ever waits for the pending lock, never for this.
        let mut store = lock(&self.reader.store);
        let batch = std::mem::take(&mut *lock(&self.reader.pending));
        if batch.is_empty() {
            return failing;
        }
        let result = store.add(&batch, self.day_start);
        match result {
            Ok(()) => {
                self.metrics
                    .commits
                    .with_label_values(&[CommitResult::Ok.as_str()])
                    .inc();
                if failing {
                    log::info!("history: commits succeed again");
                }
                if let Ok(size) = store.size() {
                    self.metrics.database_bytes.set(size as i64);
                }
                false
            }
            Err(e) => {
                self.metrics
                    .commits
                    .with_label_values(&[CommitResult::Error.as_str()])
                    .inc();
                if !failing {
                    log::error!(
                        "history: cannot commit ({e}); keeping the counts in memory and trying again (counting and /metrics are not affected)"
                    );
                }
                let mut pending = lock(&self.reader.pending);
                for (key, counts) in batch {
                    let entry = pending.entry(key).or_default();
                    add_totals(entry, &counts);
                }
                if pending.len() > MAX_PENDING {
                    let mut minutes: Vec<i64> = pending.keys().map(|k| k.0).collect();
                    minutes.sort_unstable();
                    let cut = minutes[pending.len() - MAX_PENDING];
                    let before = pending.len();
                    pending.retain(|k, _| k.0 > cut);
                    self.metrics.lost.add((before - pending.len()) as i64);
                }
                true
            }
        }
    }

    /// `<prefix>_period_bytes` and the quotas, from the history as it is
    /// now (at start, after each commit, and at least every commit
    /// interval, so that a new day starts at zero even when nothing is
    /// sent).
    fn publish_periods(&self) {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let gauge = &self.metrics.period_bytes;
        // (period, device, way, interface, hook, bytes): a device's row has
        // no interface nor hook, an interface's no device nor way.
        let mut values: Vec<(Period, String, &'static str, String, &'static str, u64)> = Vec::new();
        let mut interface_totals: HashMap<(Period, String), u64> = HashMap::new();
        for period in Period::ALL {
            let devices = match self.reader.period_totals(Subject::Device, period, now) {
                Ok(d) => d,
                Err(e) => {
                    log::debug!("history: period totals: {e}");
                    return;
                }
            };
            // The busiest devices, as many as the series budget allows.
            let mut devices: Vec<(String, Totals)> = devices.into_iter().collect();
            devices.sort_by_key(|(name, t)| {
                (std::cmp::Reverse(t[0].bytes + t[1].bytes), name.clone())
            });
            devices.truncate(self.max_period_devices);
            for (name, t) in devices {
                for way in [Way::Download, Way::Upload] {
                    let bytes = t[Side::Way(way).index()].bytes;
                    values.push((period, name.clone(), way.as_str(), String::new(), "", bytes));
                }
            }
            let Ok(interfaces) = self.reader.period_totals(Subject::Interface, period, now) else {
                return;
            };
            for (name, t) in interfaces {
                for hook in Hook::ALL {
                    let bytes = t[Side::Hook(hook).index()].bytes;
                    values.push((
                        period,
                        String::new(),
                        "",
                        name.clone(),
                        hook.as_str(),
                        bytes,
                    ));
                }
                interface_totals.insert((period, name), t[0].bytes + t[1].bytes);
            }
        }
        gauge.reset();
        for (period, device, way, iface, hook, bytes) in values {
            gauge
                .with_label_values(&[period.as_str(), &device, way, &iface, hook])
                .set(bytes as i64);
        }
        for quota in &self.quotas {
            let used = interface_totals
                .get(&(quota.period, quota.iface.clone()))
                .copied()
                .unwrap_or(0);
            let labels = [quota.iface.as_str(), quota.period.as_str()];
            self.metrics
                .quota_bytes
                .with_label_values(&labels)
                .set(quota.bytes as i64);
            self.metrics
                .quota_used
                .with_label_values(&labels)
                .set(used as f64 / quota.bytes as f64);
        }
    }

    fn prune(&self) {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let r = &self.retention;
        let keep_after = [
            (Tier::Minute, now - r.minutes.as_secs() as i64),
            (Tier::Hour, now - r.hours.as_secs() as i64),
            (Tier::Day, now - r.days.as_secs() as i64),
        ];
        let result = lock(&self.reader.store).prune(keep_after, r.max_bytes);
        match result {
            Ok(deleted) if deleted > 0 => log::debug!("history: pruned {deleted} old buckets"),
            Ok(_) => {}
            Err(e) => log::warn!("history: pruning: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::self_metrics::SelfMetrics;

    fn counts(inward: u64) -> Totals {
        [
            Counters {
                bytes: inward,
                packets: 1,
            },
            Counters::default(),
        ]
    }

    fn committed(history: &History) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while history.reader().uncommitted() > 0 {
            assert!(std::time::Instant::now() < deadline, "no commit");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Period totals count what is committed and what waits alike, and a
    /// commit (which makes the kept committed totals stale) is seen at
    /// once, neither lost nor counted twice.
    #[test]
    fn period_totals_follow_every_commit() {
        let metrics = SelfMetrics::new("test", 1024).unwrap();
        let history = History::start(
            &HistoryOptions {
                state_dir: None,
                retention: Retention::default(),
                commit_interval: Duration::from_millis(20),
                period_start_day: 1,
                quotas: Vec::new(),
                max_period_devices: 100,
            },
            metrics.history.clone(),
            local_day_start,
        )
        .unwrap();
        let reader = history.reader();
        let now = minute_of(SystemTime::now());
        let laptop = |period| {
            let of = reader
                .period_totals_of(Subject::Device, period, now, &["laptop", "phone"])
                .unwrap();
            let all = reader.period_totals(Subject::Device, period, now).unwrap();
            assert_eq!(of["phone"], Totals::default(), "no traffic: zero");
            assert_eq!(Some(&of["laptop"]), all.get("laptop"));
            of["laptop"][0].bytes
        };
        let mut sent = 0;
        for round in 1..=5u64 {
            history.add(
                now,
                [((Subject::Device, "laptop".to_string()), counts(round))],
            );
            sent += round;
            // Waiting or committed: as many as were added, in every period.
            for period in Period::ALL {
                assert_eq!(laptop(period), sent, "round {round}, {period:?}");
            }
            committed(&history);
            for period in Period::ALL {
                assert_eq!(laptop(period), sent, "round {round}, {period:?}, committed");
            }
        }
        // Another kind's subject of the same name is not counted.
        history.add(
            now,
            [((Subject::Server, "laptop".to_string()), counts(1000))],
        );
        assert_eq!(laptop(Period::Day), sent);
    }

    /// Each way the state directory can fail says what failed and why,
    /// once, keeps the cause as its source, and moves aside only a damaged
    /// file.
    #[test]
    fn open_in_says_why_and_moves_aside_only_a_damaged_file() {
        use std::error::Error as _;
        let root = std::env::temp_dir().join(format!("ntm-open-in-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();

        // A state directory under a file cannot be created.
        std::fs::write(root.join("file"), b"").unwrap();
        let e = open_in(&root.join("file/state")).err().unwrap();
        assert!(matches!(e, OpenError::CreateDir { .. }), "{e:?}");
        let cause = e.source().unwrap().to_string();
        assert_eq!(e.to_string().matches(&cause).count(), 1, "{e}");

        // Another agent's: refused, nothing touched.
        let shared = root.join("shared");
        let (_store, _lock, _) = open_in(&shared).unwrap();
        let e = open_in(&shared).err().unwrap();
        assert!(matches!(e, OpenError::Locked { .. }), "{e:?}");
        assert!(e.to_string().contains("--state-dir"), "{e}");

        // Damaged: moved aside, a new one started.
        let damaged = root.join("damaged");
        std::fs::create_dir_all(&damaged).unwrap();
        std::fs::write(damaged.join(DATABASE), vec![0x5a; 8192]).unwrap();
        open_in(&damaged).unwrap();
        let aside = std::fs::read_dir(&damaged)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with("history.db.corrupt-")
            })
            .count();
        assert_eq!(aside, 1);

        // Newer: left as it is, the store's error as it says it.
        let newer = root.join("newer");
        std::fs::create_dir_all(&newer).unwrap();
        rusqlite::Connection::open(newer.join(DATABASE))
            .unwrap()
            .pragma_update(None, "user_version", 99)
            .unwrap();
        let before = std::fs::read(newer.join(DATABASE)).unwrap();
        let e = open_in(&newer).err().unwrap();
        assert!(
            matches!(e, OpenError::Store(StoreError::Newer { found: 99, .. })),
            "{e:?}"
        );
        assert!(
            e.to_string()
                .starts_with(&newer.join(DATABASE).display().to_string())
        );
        assert_eq!(std::fs::read(newer.join(DATABASE)).unwrap(), before);
        let _ = std::fs::remove_dir_all(&root);
    }
}
