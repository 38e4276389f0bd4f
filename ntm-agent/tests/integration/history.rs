//! The history database with real agents: totals survive a SIGTERM and a
//! `kill -9` (once committed) exactly; the tiers agree; a damaged, newer
//! or read-only database keeps the agent counting.

use std::{net::UdpSocket, path::Path, time::Duration};

use serde_json::Value;

use crate::kit::{
    A4, Agent, B4, Link,
    scrape::{Guard, TempDir, http_get, plain_value, sample_sum, wait_for, wait_healthy},
};

const PORT: u16 = 9450;

fn start(link: &Link, state: &Path) -> Guard {
    Agent::in_ns(&link.a)
        .iface(&link.a_if)
        .port(PORT)
        .args(["--local-net", "198.18.0.2/32", "--drain-interval", "200ms"])
        .args(["--no-pin", "--history-commit-interval", "1s"])
        .arg("--state-dir")
        .arg(state)
        .spawn()
}

/// `count` datagrams of 100 bytes from the device (198.18.0.2) to the
/// agent's host: its upload, in L3 bytes.
fn upload(link: &Link, count: u64) -> (u64, u64) {
    let sink = link.a.run(|| UdpSocket::bind((A4, 5300)).unwrap());
    link.b.run(|| {
        let socket = UdpSocket::bind((B4, 0)).unwrap();
        for _ in 0..count {
            socket.send_to(&[4; 100], (A4, 5300)).unwrap();
        }
    });
    link.wait_quiet();
    drop(sink);
    (128 * count, count)
}

fn get_json(link: &Link, path: &str) -> Value {
    let (status, body) = http_get(&link.a, PORT, path).unwrap_or_else(|| panic!("GET {path}"));
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap()
}

/// The device's upload in the history of the last two hours, summed over
/// steps of `step` seconds.
fn history_upload(link: &Link, step: u64) -> (u64, u64) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let from = now - now % 3600 - 3600;
    let doc = get_json(
        link,
        &format!(
            "/api/v1/history?kind=devices&name=198.18.0.2&from={from}&to={}&step={step}",
            now + 60
        ),
    );
    doc["points"]
        .as_array()
        .unwrap()
        .iter()
        .fold((0, 0), |acc, p| {
            (
                acc.0 + p["upload"]["bytes"].as_u64().unwrap(),
                acc.1 + p["upload"]["packets"].as_u64().unwrap(),
            )
        })
}

/// What the live view says the device uploaded since this agent started.
fn live_upload(link: &Link) -> Option<(u64, u64)> {
    let doc = get_json(link, "/api/v1/devices");
    let device = doc["devices"]
        .as_array()?
        .iter()
        .find(|d| d["name"] == "198.18.0.2")?
        .clone();
    Some((
        device["upload"]["bytes"].as_u64()?,
        device["upload"]["packets"].as_u64()?,
    ))
}

fn commits(link: &Link) -> u64 {
    let metrics = http_get(&link.a, PORT, "/metrics").unwrap().1;
    sample_sum(&metrics, "ntm_history_commits_total", &[r#"result="ok""#])
}

fn add(a: (u64, u64), b: (u64, u64)) -> (u64, u64) {
    (a.0 + b.0, a.1 + b.1)
}

pub fn totals_survive_a_restart_and_a_kill_9() {
    let link = Link::new("hist");
    let state = TempDir::new("hist");

    // First run, stopped with SIGTERM: everything is committed at the stop.
    let mut agent = start(&link, &state.0);
    wait_healthy(&link.a, PORT);
    let first = upload(&link, 300);
    wait_for("the first upload, live", Duration::from_secs(20), || {
        live_upload(&link).filter(|u| *u == first)
    });
    assert_eq!(
        history_upload(&link, 60),
        first,
        "pending counts are in the answer"
    );
    crate::kit::sh(&["kill", "-TERM", &agent.0.id().to_string()]);
    agent.0.wait().unwrap();
    assert!(state.0.join("history.db").exists());

    // Second run: the history has the first run's totals, exactly.
    let mut agent = start(&link, &state.0);
    wait_healthy(&link.a, PORT);
    assert_eq!(history_upload(&link, 60), first);
    let second = upload(&link, 200);
    wait_for("the second upload, live", Duration::from_secs(20), || {
        live_upload(&link).filter(|u| *u == second)
    });
    // Nothing waits for a commit: the counts are in the file.
    wait_for("the commit", Duration::from_secs(10), || {
        (get_json(&link, "/api/v1/status")["history_uncommitted"] == 0).then_some(())
    });
    assert!(commits(&link) >= 1);
    agent.0.kill().unwrap();
    agent.0.wait().unwrap();

    // Third run, after a kill -9: what was committed is there, exactly, in
    // every tier (sums of minutes equal the hours they are in).
    let _agent = start(&link, &state.0);
    wait_healthy(&link.a, PORT);
    let both = add(first, second);
    assert_eq!(history_upload(&link, 60), both);
    assert_eq!(history_upload(&link, 3600), both);
    let status = get_json(&link, "/api/v1/history?kind=devices&name=198.18.0.2");
    assert_eq!(status["persistent"], true);
    let metrics = http_get(&link.a, PORT, "/metrics").unwrap().1;
    assert_eq!(plain_value(&metrics, "ntm_history_persistent"), 1);
}

/// Each broken state directory: the agent counts exactly all the same,
/// says so on /metrics, and deletes nothing.
pub fn a_damaged_newer_or_read_only_database_keeps_counting() {
    let link = Link::new("histbad");
    let dir = TempDir::new("histbad");

    // Damaged: moved aside (its bytes kept), a new history started.
    let damaged = dir.0.join("damaged");
    std::fs::create_dir_all(&damaged).unwrap();
    let garbage = vec![0x5a; 16_384];
    std::fs::write(damaged.join("history.db"), &garbage).unwrap();
    check_counting(&link, &damaged, 1);
    let aside: Vec<_> = std::fs::read_dir(&damaged)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("history.db.corrupt-")
        })
        .collect();
    assert_eq!(aside.len(), 1, "moved aside once");
    assert_eq!(std::fs::read(aside[0].path()).unwrap(), garbage);

    // Written by a newer ntm: left alone, this run's history in memory.
    let newer = dir.0.join("newer");
    std::fs::create_dir_all(&newer).unwrap();
    {
        let db = rusqlite::Connection::open(newer.join("history.db")).unwrap();
        db.pragma_update(None, "user_version", 99).unwrap();
        db.execute_batch("CREATE TABLE future (x)").unwrap();
    }
    let before = std::fs::read(newer.join("history.db")).unwrap();
    check_counting(&link, &newer, 0);
    assert_eq!(std::fs::read(newer.join("history.db")).unwrap(), before);

    // A read-only file system (root ignores file modes, a mount does not).
    let read_only = dir.0.join("read-only");
    std::fs::create_dir_all(&read_only).unwrap();
    crate::kit::sh(&[
        "mount",
        "-t",
        "tmpfs",
        "-o",
        "ro,size=1m",
        "ntm-test",
        &read_only.to_string_lossy(),
    ]);
    check_counting(&link, &read_only, 0);
    crate::kit::sh(&["umount", &read_only.to_string_lossy()]);
}

/// Starts an agent on `state`, checks that it counts the device's upload
/// exactly and that `ntm_history_persistent` is `persistent`, stops it.
fn check_counting(link: &Link, state: &Path, persistent: u64) {
    let mut agent = start(link, state);
    wait_healthy(&link.a, PORT);
    let sent = upload(link, 50);
    wait_for("the upload, live", Duration::from_secs(20), || {
        live_upload(link).filter(|u| *u == sent)
    });
    let metrics = http_get(&link.a, PORT, "/metrics").unwrap().1;
    assert_eq!(
        sample_sum(
            &metrics,
            "ntm_bytes_total",
            &[r#"src="198.18.0.2""#, r#"proto="udp""#]
        ),
        sent.0
    );
    assert_eq!(
        plain_value(&metrics, "ntm_history_persistent"),
        persistent,
        "{}",
        state.display()
    );
    // This run's history answers either way.
    assert_eq!(history_upload(link, 60), sent);
    crate::kit::sh(&["kill", "-TERM", &agent.0.id().to_string()]);
    agent.0.wait().unwrap();
}

/// Today's, this week's and this billing period's totals per device and
/// interface, on /metrics and in the API, and an interface's quota: all
/// equal what was sent (everything here was sent today).
pub fn period_totals_and_a_quota_equal_what_was_sent() {
    let link = Link::new("period");
    let state = TempDir::new("period");
    let _agent = Agent::in_ns(&link.a)
        .iface(&link.a_if)
        .port(PORT)
        .args(["--local-net", "198.18.0.2/32", "--drain-interval", "200ms"])
        .args(["--no-pin", "--history-commit-interval", "1s"])
        .args(["--period-start-day", "28"])
        .arg(format!("--quota={}=100k/month", link.a_if))
        .arg("--state-dir")
        .arg(&state.0)
        .spawn();
    wait_healthy(&link.a, PORT);
    let sent = upload(&link, 150);
    let metrics = wait_for("the period totals", Duration::from_secs(20), || {
        let text = http_get(&link.a, PORT, "/metrics")?.1;
        ["day", "week", "month"]
            .iter()
            .all(|p| device_upload(&text, p) == sent.0)
            .then_some(text)
    });
    // The interface's periods hold everything counted on it; the quota's
    // share is that over 100,000 bytes.
    let on_iface = sample_sum(
        &metrics,
        "ntm_bytes_total",
        &[&format!(r#"iface="{}""#, link.a_if)],
    );
    let iface_period = sample_sum(
        &metrics,
        "ntm_period_bytes",
        &[r#"period="month""#, &format!(r#"iface="{}""#, link.a_if)],
    );
    assert_eq!(iface_period, on_iface, "{metrics}");
    let ratio = metrics
        .lines()
        .find(|l| l.starts_with("ntm_quota_used_ratio{") && l.contains(&link.a_if))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .expect("the quota's share");
    assert!(
        (ratio - on_iface as f64 / 100_000.0).abs() < 1e-9,
        "{ratio} {on_iface}"
    );
    assert!(metrics.contains(&format!(
        r#"ntm_quota_bytes{{iface="{}",period="month"}} 100000"#,
        link.a_if
    )));
    // The API says the same.
    let doc = get_json(&link, "/api/v1/devices");
    let device = doc["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "198.18.0.2")
        .unwrap();
    for period in ["day", "week", "month"] {
        assert_eq!(
            device["periods"][period]["upload"]["bytes"].as_u64(),
            Some(sent.0),
            "{device}"
        );
    }
}

/// The upload of the test's device (198.18.0.2) in `period`, as
/// `ntm_period_bytes` says in `text`.
fn device_upload(text: &str, period: &str) -> u64 {
    sample_sum(
        text,
        "ntm_period_bytes",
        &[
            &format!(r#"period="{period}""#),
            r#"device="198.18.0.2""#,
            r#"way="upload""#,
        ],
    )
}

/// After a SIGTERM and a start on the same state directory, the very first
/// scrape has the period totals and the quota that the database holds,
/// exactly: they do not wait for the new agent's first commit.
pub fn period_totals_and_a_quota_from_the_first_scrape_after_a_restart() {
    let link = Link::new("perst");
    let state = TempDir::new("perst");
    let quota = format!("--quota={}=100k/month", link.a_if);
    let start_with = |commit_interval: &str| {
        Agent::in_ns(&link.a)
            .iface(&link.a_if)
            .port(PORT)
            .args(["--local-net", "198.18.0.2/32", "--drain-interval", "200ms"])
            .args(["--no-pin", "--history-commit-interval", commit_interval])
            .arg(&quota)
            .arg("--state-dir")
            .arg(&state.0)
            .spawn()
    };
    let iface_label = format!(r#"iface="{}""#, link.a_if);
    let iface_month = |text: &str| {
        sample_sum(
            text,
            "ntm_period_bytes",
            &[r#"period="month""#, &iface_label],
        )
    };

    // First run: the traffic, on /metrics and in the database (SIGTERM
    // commits what is pending).
    let mut agent = start_with("1s");
    wait_healthy(&link.a, PORT);
    let sent = upload(&link, 150);
    let before = wait_for("the period totals", Duration::from_secs(20), || {
        let text = http_get(&link.a, PORT, "/metrics")?.1;
        let on_iface = sample_sum(&text, "ntm_bytes_total", &[&iface_label]);
        (["day", "week", "month"]
            .iter()
            .all(|p| device_upload(&text, p) == sent.0)
            && iface_month(&text) == on_iface)
            .then_some(text)
    });
    // Everything on the link is the test's upload: the quota's share is
    // that, exactly.
    let on_iface = iface_month(&before);
    assert_eq!(on_iface, sent.0, "{before}");
    crate::kit::sh(&["kill", "-TERM", &agent.0.id().to_string()]);
    agent.0.wait().unwrap();

    // Second run, whose own first commit (and publication) is a minute
    // away: the first answer to /metrics already has the totals.
    let _agent = start_with("60s");
    let first = wait_for("the first scrape", Duration::from_secs(60), || {
        http_get(&link.a, PORT, "/metrics").filter(|(status, _)| *status == 200)
    })
    .1;
    for period in ["day", "week", "month"] {
        assert_eq!(device_upload(&first, period), sent.0, "{period}: {first}");
    }
    assert_eq!(iface_month(&first), on_iface, "{first}");
    assert!(
        first.contains(&format!(
            r#"ntm_quota_bytes{{iface="{}",period="month"}} 100000"#,
            link.a_if
        )),
        "{first}"
    );
    let ratio = first
        .lines()
        .find(|l| l.starts_with("ntm_quota_used_ratio{") && l.contains(&iface_label))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no quota share in the first scrape:\n{first}"));
    assert_eq!(ratio, on_iface as f64 / 100_000.0, "{first}");
}
