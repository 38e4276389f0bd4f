//! `cargo xtask bench` (page and history part): the JSON API's response
//! time with 1k and 10k series next to /metrics' for the same agent; the
//! history database's bytes per day for 100 and 1,000 devices; the history
//! writer's time per commit and per drain; a drain through the pipeline
//! with the live view and the history, next to the series alone.
//! Prints figures; asserts nothing.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use clap::Parser as _;
use ntm_agent::{
    agent::pipeline::Pipeline,
    config::Config,
    health::{attached::Health, self_metrics::SelfMetrics},
    kernel::drain::Drained,
    model::{
        net::{Cidr, LocalNets},
        subjects::Subject,
    },
    outputs::{
        history::{
            Batch, History, HistoryOptions, Tier, periods::Period, sink::HistorySink, store::Store,
        },
        live::{LiveSink, LiveTraffic},
        sink::{LabelledDrain, LabelledFlow, Sink},
    },
};
use ntm_common::{Counters, test_util::KeyBuilder};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn time(runs: usize, mut f: impl FnMut() -> usize) -> Duration {
    let mut times = Vec::new();
    for _ in 0..runs {
        let started = Instant::now();
        std::hint::black_box(f());
        times.push(started.elapsed());
    }
    median(times)
}

/// `n` flows: devices 10.0.x.y, each to one of 64 servers, https.
fn drained(n: u32) -> Drained {
    let flows = (0..n)
        .map(|i| {
            (
                KeyBuilder::v4(0x0a00_0000 | i, [93, 184, 216, (i % 64) as u8])
                    .tcp(443)
                    .ifindex(1)
                    .build(),
                Counters {
                    bytes: 1500,
                    packets: 1,
                },
            )
        })
        .collect();
    Drained {
        flows,
        ..Default::default()
    }
}

fn pipeline(n: u32) -> Pipeline {
    let max_series = (n + 1).to_string();
    let config = Config::try_parse_from([
        "ntm-agent",
        "--numeric",
        "--no-history",
        "--local-net",
        "10.0.0.0/8",
        "--max-series",
        &max_series,
    ])
    .expect("flags");
    let services = config.services().expect("services");
    Pipeline::new(config.pipeline(), services).expect("pipeline")
}

fn api_figures() {
    println!(
        "\npage API: response time (median of 20) with N series (N devices, 64 servers), next to /metrics of the same agent"
    );
    println!(
        "{:>8} {:>12} {:>12} {:>12} {:>12} {:>12} {:>12} {:>16} {:>16}",
        "series",
        "/metrics",
        "devices",
        "servers",
        "services",
        "interfaces",
        "status",
        "page refresh",
        "refresh/metrics"
    );
    let interfaces = HashMap::from([(1, "eth0".to_string())]);
    for n in [1_000u32, 10_000] {
        let mut pipeline = pipeline(n);
        pipeline.process(&drained(n), &interfaces, Instant::now());
        let exposition = pipeline.exposition();
        let api = pipeline.api(Health::default());
        let none = HashMap::new();
        let metrics = time(20, || exposition.encode().unwrap().len());
        let devices = time(20, || api.devices(&none).unwrap().len());
        let servers = time(20, || api.top(Subject::Server, &none).unwrap().len());
        let services = time(20, || api.top(Subject::Service, &none).unwrap().len());
        let ifaces = time(20, || api.interfaces(&none).unwrap().len());
        let status = time(20, || api.status().len());
        // What the page asks for at each refresh (page.js `refresh`).
        let limit = |n: &str| HashMap::from([("limit".to_string(), n.to_string())]);
        let (hundred, ten) = (limit("100"), limit("10"));
        let refresh = time(20, || {
            api.status().len()
                + api.devices(&hundred).unwrap().len()
                + api.top(Subject::Server, &ten).unwrap().len()
                + api.top(Subject::Service, &ten).unwrap().len()
                + api.interfaces(&none).unwrap().len()
        });
        let ms = |d: Duration| format!("{:.2}ms", d.as_secs_f64() * 1e3);
        println!(
            "{:>8} {:>12} {:>12} {:>12} {:>12} {:>12} {:>12} {:>16} {:>15.2}x",
            n,
            ms(metrics),
            ms(devices),
            ms(servers),
            ms(services),
            ms(ifaces),
            ms(status),
            ms(refresh),
            refresh.as_secs_f64() / metrics.as_secs_f64()
        );
    }
}

fn drain_figures() {
    println!(
        "\ndrain: one drain of N flows through the whole pipeline, and the share of it the live view and the history hand-off take (median of 10)"
    );
    println!(
        "{:>8} {:>14} {:>16} {:>8}",
        "flows", "pipeline", "live + history", "share"
    );
    let interfaces = HashMap::from([(1, "eth0".to_string())]);
    for n in [1_000u32, 10_000] {
        let batch = drained(n);
        let mut pipeline = pipeline(n);
        pipeline.process(&batch, &interfaces, Instant::now());
        let whole = time(10, || {
            pipeline.process(&batch, &interfaces, Instant::now());
            0
        });
        // The same flows, labelled, into a live view and a history of
        // their own.
        let local = LocalNets::given(vec!["10.0.0.0/8".parse::<Cidr>().unwrap()]);
        let live = LiveTraffic::new(local.clone(), Duration::from_secs(1), Instant::now());
        let mut live = LiveSink::new(Arc::new(RwLock::new(live)));
        let (history, _metrics) = history(None);
        let mut history = HistorySink::new(history, local);
        let labelled = LabelledDrain {
            flows: batch
                .flows
                .iter()
                .map(|(key, delta)| LabelledFlow {
                    key: *key,
                    iface: "eth0".into(),
                    src: key.src_addr().unwrap().to_string().into(),
                    dst: key.dst_addr().unwrap().to_string().into(),
                    service: "https".into(),
                    delta: *delta,
                })
                .collect(),
            overflow: Vec::new(),
            retransmits: Vec::new(),
            handshakes: Vec::new(),
            syn_retries: Vec::new(),
        };
        let share = time(10, || {
            let now = Instant::now();
            live.labelled(&labelled, now);
            history.labelled(&labelled, now);
            0
        });
        println!(
            "{:>8} {:>12.2}ms {:>14.2}ms {:>7.0}%",
            n,
            whole.as_secs_f64() * 1e3,
            share.as_secs_f64() * 1e3,
            100.0 * share.as_secs_f64() / whole.as_secs_f64()
        );
        history.finish();
    }
}

/// A history that commits only when dropped (within a bench), in
/// `state_dir` or in memory, with the self-metrics it reports to.
fn history(state_dir: Option<std::path::PathBuf>) -> (History, SelfMetrics) {
    let metrics = SelfMetrics::new("bench", 1024).unwrap();
    let history = History::start(
        &HistoryOptions {
            state_dir,
            retention: Default::default(),
            commit_interval: Duration::from_secs(3600),
            period_start_day: 1,
            quotas: Vec::new(),
            max_period_devices: 100,
        },
        metrics.history.clone(),
        utc_day,
    )
    .unwrap();
    (history, metrics)
}

/// Local midnight is UTC midnight here: the figures do not depend on it.
fn utc_day(t: i64) -> i64 {
    t - t.rem_euclid(86_400)
}

fn database_figures() {
    println!(
        "\nhistory: a day of minutes (one commit a minute, as a drain every second with the default 10s commit would batch six), each device talking to one of its 10% servers, 5 services, 1 interface"
    );
    println!(
        "{:>8} {:>14} {:>16} {:>16} {:>26} {:>28}",
        "devices",
        "bytes/day",
        "commit (median)",
        "per drain (1s)",
        "minutes, hours, days rows",
        "periods: first answer, next"
    );
    for devices in [100u32, 1_000] {
        let dir = std::env::temp_dir().join(format!(
            "ntm-bench-history-{}-{devices}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("history.db");
        let mut store = Store::open(&path).expect("open");
        let day0 = 1_764_633_600; // a midnight
        let mut commits = Vec::new();
        for minute in 0..1440i64 {
            let t = day0 + 60 * minute;
            let mut batch = Batch::new();
            let c = |b: u64| {
                [
                    Counters {
                        bytes: b,
                        packets: b / 1000 + 1,
                    },
                    Counters {
                        bytes: b / 10,
                        packets: b / 1000 + 1,
                    },
                ]
            };
            for d in 0..devices {
                batch.insert(
                    (t, Subject::Device, format!("device-{d}.home.arpa")),
                    c(150_000),
                );
            }
            for s in 0..(devices / 10).max(1) {
                batch.insert(
                    (t, Subject::Server, format!("server-{s}.example.com")),
                    c(1_500_000),
                );
            }
            for service in ["https", "http", "dns", "quic", "ssh"] {
                batch.insert((t, Subject::Service, service.to_string()), c(3_000_000));
            }
            batch.insert((t, Subject::Interface, "eth0".to_string()), c(15_000_000));
            let started = Instant::now();
            store.add(&batch, utc_day).expect("commit");
            commits.push(started.elapsed());
        }
        store
            .prune(
                [(Tier::Minute, 0), (Tier::Hour, 0), (Tier::Day, 0)],
                u64::MAX,
            )
            .unwrap();
        drop(store);
        // Fold the WAL into the file: its size is then the history's.
        {
            let db = rusqlite::Connection::open(&path).unwrap();
            db.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")
                .unwrap();
        }
        let bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        // What an /api/v1/devices answer (100 devices) asks of the history
        // at the day's end: the period totals of its devices. The first
        // after a write adds up the store's rows; the next ones use what
        // that one kept.
        let (history, _metrics) = history(Some(dir.clone()));
        let reader = history.reader();
        let names: Vec<String> = (0..devices.min(100))
            .map(|d| format!("device-{d}.home.arpa"))
            .collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let answer = || {
            Period::ALL
                .iter()
                .map(|period| {
                    reader
                        .period_totals_of(Subject::Device, *period, day0 + 86_340, &names)
                        .unwrap()
                        .len()
                })
                .sum::<usize>()
        };
        let started = Instant::now();
        answer();
        let first = started.elapsed();
        let kept = time(20, answer);
        drop(history);
        let subjects = devices + (devices / 10).max(1) + 6;
        let commit = median(commits);
        println!(
            "{:>8} {:>12.1}MB {:>14.2}ms {:>14.3}ms {:>26} {:>18.2}ms, {:.3}ms",
            devices,
            bytes as f64 / 1e6,
            commit.as_secs_f64() * 1e3,
            commit.as_secs_f64() * 1e3 / 60.0,
            format!("{}, {}, {}", 1440 * subjects, 24 * subjects, subjects),
            first.as_secs_f64() * 1e3,
            kept.as_secs_f64() * 1e3
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

fn main() {
    api_figures();
    drain_figures();
    database_figures();
}
