//! Counting through restarts, as a user restarts: real agents killed with
//! -9 and stopped with SIGTERM while UDP flows at 20,000 datagrams a second
//! through a veth, on TCX, on clsact and with XDP. The links and tables are pinned in
//! bpffs, so frames are counted while no agent runs and the next agent
//! drains them: counted equals sent, exactly, packets and bytes. Then
//! `ntm-agent detach` leaves no program, link, filter or pin (bpftool).
//!
//! The first two agents drain once an hour: what an agent drained but no
//! scrape read dies with its process (that is the exporter's memory, not
//! the kernel's), so the counts sit in the kernel until an agent that is
//! scraped takes them, and every frame is in exactly one scrape.

use std::{
    collections::BTreeSet,
    net::UdpSocket,
    path::{Path, PathBuf},
    process::{Child, Command},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use crate::kit::{
    A4, Agent, BpfFs, Link,
    scrape::{TempDir, http_get, sample_sum, wait_for},
};

/// Datagrams a second, as in the report this answers; bounded in count.
const RATE: u64 = 20_000;
const MAX_DATAGRAMS: u64 = 400_000;
const PAYLOAD: usize = 64;
/// IPv4 and UDP headers: ntm counts IP bytes.
const HEADERS: usize = 28;
const PORT: u16 = 7070;
const LONG_DRAIN: [&str; 2] = ["--drain-interval", "1h"];

struct Running {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Running {
    /// Starts an agent on `link.a` and waits until it is attached.
    fn start(link: &Link, bpffs: &BpfFs, logs: &Path, port: u16, extra: &[&str]) -> Self {
        let log = logs.join(format!("agent-{port}.log"));
        let child = Agent::in_ns(&link.a)
            .iface(&link.a_if)
            .port_any_address(port)
            .args(["--pin-dir", &bpffs.pin_dir()])
            .args(extra)
            .log_to(&log)
            .spawn_child();
        let mut agent = Self { child, port, log };
        wait_for("the agent attached", Duration::from_secs(30), || {
            if let Ok(Some(status)) = agent.child.try_wait() {
                panic!("agent exited ({status}): {}", agent.log_text());
            }
            http_get(&link.a, port, "/healthz").filter(|(status, _)| *status == 200)
        });
        // And until its first drain (at start) is done: frames it drains
        // later than the test's last scrape of it would die with it.
        wait_for("the agent's first drain", Duration::from_secs(30), || {
            let (_, text) = http_get(&link.a, port, "/metrics")?;
            text.lines()
                .find_map(|l| l.strip_prefix("ntm_drain_duration_seconds_count "))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .filter(|drains| *drains >= 1)
        });
        agent
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// (packets, bytes) of the test's flow in this agent's counters.
    fn counted(&self, link: &Link) -> (u64, u64) {
        let (_, text) = http_get(&link.a, self.port, "/metrics").expect("metrics");
        let service = format!("service=\"{PORT}\"");
        (
            sample_sum(&text, "ntm_packets_total", &[&service]),
            sample_sum(&text, "ntm_bytes_total", &[&service]),
        )
    }

    /// The agent's other packet series, for a failure message.
    fn other_series(&self, link: &Link) -> String {
        let (_, text) = http_get(&link.a, self.port, "/metrics").unwrap_or_default();
        let service = format!("service=\"{PORT}\"");
        text.lines()
            .filter(|l| l.starts_with("ntm_packets_total{") && !l.contains(&service))
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    fn terminate(mut self) {
        // SAFETY: signalling our own child, which has not been reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().unwrap();
        assert!(status.success(), "SIGTERM: {status}: {}", self.log_text());
    }
}

impl Drop for Running {
    /// A test that fails midway leaves no agent running behind it.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Sends datagrams from `link.b` to `link.a` at [`RATE`] until `stop`
/// (or [`MAX_DATAGRAMS`]); returns (packets, bytes) sent.
fn steady_udp(link: &Link, stop: &AtomicBool) -> (u64, u64) {
    link.b.enter_current_thread();
    let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
    let payload = [0x5A; PAYLOAD];
    let started = Instant::now();
    let mut sent = 0u64;
    while !stop.load(Ordering::Relaxed) && sent < MAX_DATAGRAMS {
        let due = started.elapsed().as_micros() as u64 * RATE / 1_000_000;
        while sent < due && sent < MAX_DATAGRAMS {
            socket.send_to(&payload, (A4, PORT)).unwrap();
            sent += 1;
        }
        thread::sleep(Duration::from_micros(500));
    }
    (sent, sent * (PAYLOAD + HEADERS) as u64)
}

/// The program and link ids that use this agent's pinned flow-table slot
/// (the map-in-map every counting program reads), as bpftool sees them.
fn ours_in_the_kernel(maps_dir: &Path) -> (u64, BTreeSet<u64>, BTreeSet<u64>) {
    let table = maps_dir.join(ntm_common::names::ACTIVE_SLOT);
    let map: serde_json::Value = serde_json::from_str(&crate::kit::sh(&[
        "bpftool",
        "-j",
        "map",
        "show",
        "pinned",
        table.to_str().unwrap(),
    ]))
    .unwrap();
    let map_id = map["id"].as_u64().expect("map id");
    let (programs, links) = users_of(map_id);
    (map_id, programs, links)
}

/// Programs that use map `map_id`, and the links of those programs.
fn users_of(map_id: u64) -> (BTreeSet<u64>, BTreeSet<u64>) {
    let programs: serde_json::Value =
        serde_json::from_str(&crate::kit::sh(&["bpftool", "-j", "prog", "show"])).unwrap();
    let programs: BTreeSet<u64> = programs
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| {
            p["map_ids"]
                .as_array()
                .is_some_and(|ids| ids.iter().any(|id| id.as_u64() == Some(map_id)))
        })
        .filter_map(|p| p["id"].as_u64())
        .collect();
    let links: serde_json::Value =
        serde_json::from_str(&crate::kit::sh(&["bpftool", "-j", "link", "show"])).unwrap();
    let links = links
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["prog_id"].as_u64().is_some_and(|p| programs.contains(&p)))
        .filter_map(|l| l["id"].as_u64())
        .collect();
    (programs, links)
}

fn map_exists(map_id: u64) -> bool {
    Command::new("bpftool")
        .args(["map", "show", "id", &map_id.to_string()])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The maps directories in the namespace's pinned state.
fn maps_dirs(bpffs: &BpfFs) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for netns in std::fs::read_dir(bpffs.pin_dir())
        .into_iter()
        .flatten()
        .flatten()
    {
        for entry in std::fs::read_dir(netns.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            if entry.file_name().to_string_lossy().starts_with("maps-") {
                found.push(entry.path());
            }
        }
    }
    found
}

fn ntm_filters(link: &Link) -> usize {
    ["ingress", "egress"]
        .iter()
        .map(|d| {
            link.a
                .exec(&["tc", "filter", "show", "dev", &link.a_if, d])
                .lines()
                .filter(|l| l.contains("ntm_tc_"))
                .count()
        })
        .sum()
}

/// Run once per attach mode (`CASES` in `main.rs`: tcx, clsact, xdp).
pub fn counted_equals_sent_across_kill_and_sigterm_then_detach_leaves_nothing(mode: &str) {
    if mode == "tcx" && !ntm_agent::kernel::attach::tcx_available() {
        eprintln!("SKIPPED: this kernel has no TCX (Linux 6.6+)");
        return;
    }
    let bpffs = BpfFs::new(mode);
    let logs = TempDir::new(&format!("restart-{mode}"));
    let link = Link::new(&format!("rs{}", &mode[..2]));
    let _sink = link.a.run(|| UdpSocket::bind((A4, PORT)).unwrap());
    let with = |extra: &[&'static str]| {
        let mut args = if mode == "xdp" {
            vec!["--mode", "xdp"]
        } else {
            vec!["--attach-mode", mode]
        };
        args.extend_from_slice(extra);
        args
    };

    link.wait_quiet();
    let before = link.a_stats();
    let first = Running::start(&link, &bpffs, &logs.0, 9621, &with(&LONG_DRAIN));
    let stop = AtomicBool::new(false);
    let (arrived, by_second, by_third, third) = thread::scope(|s| {
        let sender = s.spawn(|| steady_udp(&link, &stop));
        thread::sleep(Duration::from_secs(1));
        // kill -9: nothing detaches, nothing drains.
        first.kill();
        thread::sleep(Duration::from_secs(1));
        let second = Running::start(&link, &bpffs, &logs.0, 9622, &with(&LONG_DRAIN));
        let log = second.log_text();
        assert!(log.contains("took over the pinned state"), "{log}");
        thread::sleep(Duration::from_secs(1));
        // What the second agent took over: it drains no more until it
        // stops, and a SIGTERM with pinned state drains nothing.
        let by_second = second.counted(&link);
        second.terminate();
        thread::sleep(Duration::from_millis(500));
        let third = Running::start(&link, &bpffs, &logs.0, 9623, &with(&[]));
        thread::sleep(Duration::from_millis(500));
        stop.store(true, Ordering::Relaxed);
        let sent = sender.join().unwrap();
        // What reached the hook: under load the veth may drop a datagram
        // before it (its peer's backlog is full), so the oracle is the
        // interface's own frame counter (the link carries nothing else),
        // times the datagrams' one IP size (its byte counter counts the
        // Ethernet header or not depending on the path, XDP or not).
        link.wait_quiet();
        let after = link.a_stats();
        let frames = after.0.0 - before.0.0;
        let arrived = (frames, frames * (PAYLOAD + HEADERS) as u64);
        assert!(
            arrived.0 <= sent.0 && arrived.0 + 1000 > sent.0,
            "{arrived:?} of {sent:?}"
        );
        let rest = (arrived.0 - by_second.0, arrived.1 - by_second.1);
        let by_third = wait_for_or(Duration::from_secs(20), || {
            let now = third.counted(&link);
            (now == rest).then_some(now)
        })
        .unwrap_or_else(|| {
            eprintln!(
                "the third agent's other series:\n{}",
                third.other_series(&link)
            );
            third.counted(&link)
        });
        (arrived, by_second, by_third, third)
    });
    assert!(
        arrived.0 > 3 * RATE,
        "traffic flowed through the restarts: {arrived:?}"
    );
    assert!(by_second.0 > 0, "the second agent took over counts");
    assert_eq!(
        (by_second.0 + by_third.0, by_second.1 + by_third.1),
        arrived,
        "counted across kill -9 and SIGTERM (second {by_second:?} + third {by_third:?}) equals what arrived ({arrived:?})"
    );

    // Stopping for good: the removal path leaves nothing behind.
    let maps = maps_dirs(&bpffs);
    assert_eq!(maps.len(), 1, "one agent's tables: {maps:?}");
    let (map_id, programs, links) = ours_in_the_kernel(&maps[0]);
    assert!(
        programs.len() >= 2,
        "ntm's programs use the tables: {programs:?}"
    );
    match mode {
        "tcx" => assert_eq!(links.len(), 2, "two TCX links: {links:?}"),
        "xdp" => assert_eq!(links.len(), 1, "one XDP link: {links:?}"),
        _ => assert_eq!(ntm_filters(&link), 2, "two clsact filters"),
    }
    let refused = Agent::in_ns(&link.a)
        .names(true)
        .args(["detach", "--pin-dir", &bpffs.pin_dir()])
        .output();
    assert!(!refused.status.success(), "detach while an agent runs");
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(why.contains("already running"), "{why}");
    third.terminate();
    // (With names on: no --numeric in front of the subcommand.)
    let detached = Agent::in_ns(&link.a)
        .names(true)
        .args(["detach", "--pin-dir", &bpffs.pin_dir()])
        .output();
    assert!(detached.status.success(), "{detached:?}");
    let said = String::from_utf8_lossy(&detached.stdout);
    assert!(
        said.contains(match mode {
            "tcx" => "detached 2 pinned link(s) and 0 clsact filter(s)",
            "xdp" => "detached 1 pinned link(s) and 0 clsact filter(s)",
            _ => "detached 0 pinned link(s) and 2 clsact filter(s)",
        }),
        "{said}"
    );
    assert_eq!(ntm_filters(&link), 0, "no clsact filter left");
    if mode == "tcx" {
        let attached = link
            .a
            .run(|| ntm_agent::kernel::attach::attached_ntm_programs(&link.a_if).unwrap());
        assert_eq!(attached, (vec![], vec![]), "no TCX program left");
    }
    assert!(
        !Path::new(&bpffs.pin_dir()).exists(),
        "no pin left in {}",
        bpffs.pin_dir()
    );
    // The kernel frees programs and maps once their last user is gone.
    wait_for(
        "the programs and the table freed",
        Duration::from_secs(20),
        || {
            let (programs, links) = users_of(map_id);
            (programs.is_empty() && links.is_empty() && !map_exists(map_id)).then_some(())
        },
    );
}

fn wait_for_or<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(200));
    }
}

/// An upgrade from a build of another layout (simulated by renaming the
/// pinned tables' directory to another version): the new agent drains what
/// it can read, says how many packets it held, and replaces it. A tiny
/// flow table fills while no agent runs: the frames that found no room are
/// counted in the table-full bucket and reported by the next agent. The
/// oracle is the interface's own counters (the datagrams and the ICMP
/// errors they draw).
pub fn another_layout_is_drained_and_replaced_and_a_full_table_counts_while_no_agent_runs() {
    let bpffs = BpfFs::new("layout");
    let logs = TempDir::new("restart-layout");
    let link = Link::new("rslay");
    let tiny = ["--flow-table-size", "8"];
    let first = Running::start(
        &link,
        &bpffs,
        &logs.0,
        9631,
        &[&tiny[..], &LONG_DRAIN].concat(),
    );
    first.kill();
    link.wait_quiet();
    let before = link.a_stats();
    // No agent: 4,000 flows, far more than the flow cache and the table
    // of 8 hold.
    link.b.run(|| {
        let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
        for port in 1000..5000u16 {
            for _ in 0..2 {
                socket.send_to(&[0xA5; PAYLOAD], (A4, port)).unwrap();
            }
        }
    });
    link.wait_quiet();
    let after = link.a_stats();
    let frames = (after.0.0 - before.0.0) + (after.1.0 - before.1.0);
    let bytes = (after.0.1 - before.0.1) + (after.1.1 - before.1.1) - 14 * frames;
    assert!(frames >= 8000, "{frames}");

    let maps = maps_dirs(&bpffs);
    assert_eq!(maps.len(), 1, "{maps:?}");
    let name = maps[0].file_name().unwrap().to_string_lossy().into_owned();
    let older = maps[0].with_file_name(name.replacen(
        &format!("maps-v{}-", ntm_common::LAYOUT_VERSION),
        "maps-v0-",
        1,
    ));
    std::fs::rename(&maps[0], &older).unwrap();

    let second = Running::start(&link, &bpffs, &logs.0, 9632, &tiny);
    let log = second.log_text();
    assert!(
        log.contains(&format!(
            "pinned state of another layout (v0; this build's is v{}) held {frames} packets ({bytes} bytes): drained and replaced",
            ntm_common::LAYOUT_VERSION,
        )),
        "{log}"
    );
    assert!(!older.exists(), "the other layout's tables are gone");
    let iface = "iface=\"ntm0\"";
    let text = wait_for("the counts", Duration::from_secs(20), || {
        http_get(&link.a, 9632, "/metrics")
            .map(|(_, text)| text)
            .filter(|text| sample_sum(text, "ntm_packets_total", &[iface]) >= frames)
    });
    assert_eq!(
        (
            sample_sum(&text, "ntm_packets_total", &[iface]),
            sample_sum(&text, "ntm_bytes_total", &[iface]),
        ),
        (frames, bytes),
        "every frame that crossed while no agent ran, in the interface's counters"
    );
    let full = sample_sum(
        &text,
        "ntm_outside_flow_table_packets_total",
        &[iface, "reason=\"table_full\""],
    );
    // The flow cache in front of the table holds thousands of flows per
    // CPU; those it had to let go found the table full.
    assert!(
        full > 0,
        "flows found the table of 8 full: {full} of {frames}"
    );
    second.terminate();
}

/// The orphan timeout: killed and not restarted within `--orphan-timeout`,
/// the agent's programs stop counting (within 4096 frames of a flow) and
/// let frames through; the next agent says so, and counts everything again.
pub fn past_the_orphan_timeout_the_programs_stop_counting() {
    const SENT: usize = 20_000;
    let bpffs = BpfFs::new("orphan");
    let logs = TempDir::new("restart-orphan");
    let link = Link::new("rsorph");
    let _sink = link.a.run(|| UdpSocket::bind((A4, PORT)).unwrap());
    let timeout = ["--orphan-timeout", "2s"];
    let first = Running::start(
        &link,
        &bpffs,
        &logs.0,
        9641,
        &[&timeout[..], &LONG_DRAIN].concat(),
    );
    first.kill();
    thread::sleep(Duration::from_secs(3));
    let send = |count: usize| {
        link.b.run(|| {
            let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
            for _ in 0..count {
                socket.send_to(&[0x11; PAYLOAD], (A4, PORT)).unwrap();
            }
        })
    };
    send(SENT);
    let second = Running::start(&link, &bpffs, &logs.0, 9642, &timeout);
    let log = second.log_text();
    assert!(
        log.contains("stopped counting") && log.contains("--orphan-timeout"),
        "{log}"
    );
    let (orphaned, _) = second.counted(&link);
    let cpus = std::thread::available_parallelism().map_or(64, |n| n.get()) as u64;
    assert!(
        orphaned < SENT as u64 && orphaned <= 2 * 4096 * cpus,
        "at most a lease check's worth per CPU was counted after the timeout: {orphaned} of {SENT}"
    );
    // The new agent's programs count again, exactly.
    send(1000);
    let want = (
        orphaned + 1000,
        (orphaned + 1000) * (PAYLOAD + HEADERS) as u64,
    );
    let counted = wait_for_or(Duration::from_secs(20), || {
        let now = second.counted(&link);
        (now == want).then_some(now)
    })
    .unwrap_or_else(|| second.counted(&link));
    assert_eq!(counted, want, "counting again after the takeover");
    second.terminate();
}

/// `--detach-on-stop` (what the chart sets before uninstalling): SIGTERM
/// stops for good, as `ntm-agent detach` would.
pub fn detach_on_stop_leaves_nothing_after_sigterm() {
    let bpffs = BpfFs::new("stop");
    let logs = TempDir::new("restart-stop");
    let link = Link::new("rsstop");
    let first = Running::start(&link, &bpffs, &logs.0, 9651, &[]);
    let maps = maps_dirs(&bpffs);
    let (map_id, _, _) = ours_in_the_kernel(&maps[0]);
    first.terminate();
    // A restart takes it over, then a stop for good.
    let second = Running::start(&link, &bpffs, &logs.0, 9652, &["--detach-on-stop"]);
    assert!(
        second.log_text().contains("took over"),
        "{}",
        second.log_text()
    );
    let maps = maps_dirs(&bpffs);
    let (second_map, _, _) = ours_in_the_kernel(&maps[0]);
    second.terminate();
    assert!(!Path::new(&bpffs.pin_dir()).exists(), "no pin left");
    let attached = link
        .a
        .run(|| ntm_agent::kernel::attach::attached_ntm_programs(&link.a_if).unwrap());
    assert_eq!(attached, (vec![], vec![]), "nothing attached");
    wait_for("the tables freed", Duration::from_secs(20), || {
        (!map_exists(map_id) && !map_exists(second_map)).then_some(())
    });
}
