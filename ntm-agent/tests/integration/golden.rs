//! One golden exposition, compared whole (as node_exporter's
//! `collector/fixtures/e2e-output.txt`): the real agent on a veth in test
//! namespaces, fixed flags, a fixed traffic mix with exact counts, then
//! `/metrics` compared line by line with `golden/exposition.txt`, so that
//! drift in a metric's name, labels, HELP or TYPE text, or in what a packet
//! is counted as, shows as a diff.
//!
//! **Updating**: after an intended change, run
//! `NTM_UPDATE_GOLDEN=1 NTM_REQUIRE_BPF=1 cargo test -p ntm-agent --test integration -- golden::`
//! which rewrites the file instead of comparing; review its diff before
//! committing it.
//!
//! **What is normalised** (and only that): the sample values listed in
//! [`VARIABLE_VALUES`], each with why it cannot be fixed, become `<v>`
//! (their names and label sets stay exact); the version label of
//! `<prefix>_build_info` becomes `<version>` once it is checked to be this
//! crate's version; the sample lines of the traffic families
//! (`ntm_bytes_total`, `ntm_packets_total`) are sorted, since the agent
//! keeps them in a hash map and writes them in its order (every other
//! family comes from the `prometheus` crate, sorted by label values).
//! Everything else, traffic counts above all, is exact: the link names are
//! fixed (`ntm0`, `ntm1`), as are the MACs, addresses, names (a hosts file),
//! services (a services file of the test's own) and every flag.
//!
//! **When it scrapes**: after a first self-check (so the coverage ratio's
//! minute starts before the traffic), once the traffic counters and the
//! filtered ones add up to the interface's own statistics, the interface's
//! day total holds all of it (the history committed), and two scrapes in a
//! row read the same. A run that crosses local midnight (new day, week or
//! billing period totals) is done once more.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::Path,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use crate::kit::{
    A4, A6, Agent, B4, B6, Link,
    scrape::{Guard, TempDir, metrics, sample_sum, wait_for, wait_healthy},
};

const PORT: u16 = 9800;

/// The golden file, relative to the crate.
const GOLDEN: &str = "tests/integration/golden/exposition.txt";

/// Samples whose value cannot be fixed: (sample name, or name and labels
/// as written, why). Their value is written as `<v>`; their name and labels
/// are compared as they are.
const VARIABLE_VALUES: &[(&str, &str)] = &[
    (
        "ntm_drain_duration_seconds_bucket",
        "how long each drain took",
    ),
    ("ntm_drain_duration_seconds_sum", "how long the drains took"),
    (
        "ntm_drain_duration_seconds_count",
        "drains so far: one per --drain-interval since the start",
    ),
    (
        r#"ntm_history_commits_total{result="ok"}"#,
        "commits so far: one per --history-commit-interval since the start",
    ),
    (
        "ntm_history_database_bytes",
        "SQLite's file size: its pages and when the write-ahead log was checkpointed",
    ),
    ("process_cpu_seconds_total", "CPU time"),
    ("process_max_fds", "the machine's limit"),
    (
        "process_open_fds",
        "sockets and files open now (HTTP connections, the DNS resolver)",
    ),
    ("process_resident_memory_bytes", "memory"),
    ("process_virtual_memory_bytes", "memory"),
    ("process_start_time_seconds", "the time the agent started"),
    (
        "process_threads",
        "the runtime's worker and blocking threads come and go",
    ),
];

/// The families the agent writes in hash-map order: their samples are
/// sorted.
const UNORDERED_FAMILIES: &[&str] = &["ntm_bytes_total", "ntm_packets_total"];

/// Names of the test's hosts (a hosts file, the top of the naming ladder,
/// so no name depends on a DNS server); IPv6 addresses have names of their
/// own so that their series stay apart from IPv4's.
const HOSTS: &str = "\
198.18.0.1 gateway
198.18.0.2 laptop
198.18.0.9 printer
2001:2::1 gateway6
2001:2::2 laptop6
";

/// Services of the test's own (the machine's /etc/services may differ or be
/// absent): 5302 is left unnamed on purpose.
const SERVICES: &str = "\
golden-udp 5300/udp
golden-tcp 5301/tcp
";

/// An extra address of b, without a static neighbour entry in a: reaching
/// it takes one ARP request and one reply.
const B4_ARP: &str = "198.18.0.9";

/// Traffic the filter leaves out (`ntm_filtered_*`).
const FILTER: &str = "not udp port 7777";

/// The agent in `link.a` with fixed flags: every one that could change the
/// exposition is set here (names from a hosts file, the services file, the
/// labels, the local networks, the attach mode, a filter, a quota, a fresh
/// state directory).
fn start_agent(link: &Link, dir: &Path) -> Guard {
    let hosts = dir.join("hosts");
    let services = dir.join("services");
    std::fs::write(&hosts, HOSTS).unwrap();
    std::fs::write(&services, SERVICES).unwrap();
    let state = dir.join("state");
    std::fs::create_dir_all(&state).unwrap();
    Agent::in_ns(&link.a)
        .names(true)
        .iface(&link.a_if)
        .port(PORT)
        .arg("--hosts-file")
        .arg(&hosts)
        .arg("--services-file")
        .arg(&services)
        // Every address that crosses the link is in the hosts file; a
        // lookup would go to the namespace's own loopback, where
        // nothing answers, and never leave it.
        .args(["--dns-server", "127.0.0.1:5399", "--no-containers"])
        .args(["--name-wait", "200ms", "--drain-interval", "100ms"])
        .args(["--labels", "src,dst,service,proto,direction,iface"])
        .args(["--local-net", "198.18.0.1/32,2001:2::1/128"])
        .args(["--attach-mode", "tcx", "--no-pin"])
        // Retransmissions are counted host-wide (every namespace's
        // connections): other tests' would show.
        .arg("--no-tcp-health")
        .args(["--history-commit-interval", "1s"])
        .arg(format!("--quota={}=1M/day", link.a_if))
        .arg("--state-dir")
        .arg(&state)
        .arg(FILTER)
        .spawn()
}

/// `sizes` datagrams from `from` (in `link.b`, or `link.a` when `from_a`)
/// to `to`, a socket bound there that swallows them (so none is answered
/// with a port unreachable). Returns (packets, L3 bytes).
fn udp(link: &Link, from_a: bool, from: &str, to: (&str, u16), sizes: &[usize]) -> (u64, u64) {
    let (sender, receiver) = if from_a {
        (&link.a, &link.b)
    } else {
        (&link.b, &link.a)
    };
    let to: SocketAddr = SocketAddr::new(to.0.parse().unwrap(), to.1);
    let header = if to.is_ipv6() { 48 } else { 28 };
    let _sink = receiver.run(|| UdpSocket::bind(to).unwrap());
    let sent = sender.run(|| {
        let socket = UdpSocket::bind((from, 0)).unwrap();
        for &size in sizes {
            socket.send_to(&vec![0x47; size], to).unwrap();
        }
        (
            sizes.len() as u64,
            sizes.iter().map(|s| (header + s) as u64).sum(),
        )
    });
    link.wait_quiet();
    sent
}

/// One TCP connection from b to a's port 5301, in steps with the link quiet
/// after each so that every segment is on its own and the count is fixed:
/// handshake (SYN, SYN-ACK, ACK), 100 bytes and their ACK, b's FIN and its
/// ACK, a's FIN and its ACK: 5 segments in, 4 out.
fn tcp_connection(link: &Link) {
    let addr: SocketAddr = SocketAddr::new(A4.parse().unwrap(), 5301);
    let listener = link.a.run(|| TcpListener::bind(addr).unwrap());
    let mut client = link
        .b
        .run(|| TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap());
    let (mut server, _) = listener.accept().unwrap();
    link.wait_quiet();
    client.write_all(&[0x54; 100]).unwrap();
    let mut got = [0; 100];
    server.read_exact(&mut got).unwrap();
    link.wait_quiet();
    client.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(server.read(&mut got).unwrap(), 0, "b's FIN");
    link.wait_quiet();
    drop(server);
    assert_eq!(client.read(&mut got).unwrap(), 0, "a's FIN");
    link.wait_quiet();
}

/// The fixed traffic mix; returns the bytes of the IPv4 datagrams to 5300
/// (checked against the counters before the comparison).
fn traffic_mix(link: &Link) -> (u64, u64) {
    // IPv4 UDP to a named service: 10 datagrams of 10..=100 bytes.
    let sizes: Vec<usize> = (1..=10).map(|i| 10 * i).collect();
    let udp4 = udp(link, false, B4, (A4, 5300), &sizes);
    // IPv6 UDP to the same service: 7 datagrams of 64 bytes.
    udp(link, false, B6, (A6, 5300), &[64; 7]);
    // IPv4 UDP out of a, to an unnamed port of b: 5 datagrams of 50 bytes.
    udp(link, true, A4, (B4, 5302), &[50; 5]);
    // IPv4 UDP the filter leaves out: 3 datagrams of 20 bytes.
    udp(link, false, B4, (A4, 7777), &[20; 3]);
    // TCP: one short connection.
    tcp_connection(link);
    // ICMP echo: 4 pings over IPv4, 3 over IPv6, from b.
    link.b
        .exec(&["ping", "-q", "-c", "4", "-i", "0.01", "-s", "56", A4]);
    link.b
        .exec(&["ping", "-q", "-c", "3", "-i", "0.01", "-s", "56", A6]);
    // ARP: a pings an address of b it has no neighbour entry for.
    link.a.exec(&["ping", "-q", "-c", "1", B4_ARP]);
    link.wait_quiet();
    udp4
}

/// The exposition with the rules of this file's doc applied.
fn normalise(text: &str) -> String {
    let version = format!(r#"version="{}""#, env!("CARGO_PKG_VERSION"));
    let mut out: Vec<String> = Vec::new();
    let mut family = String::new();
    let mut run: Vec<String> = Vec::new();
    let flush = |run: &mut Vec<String>, out: &mut Vec<String>, family: &str| {
        if UNORDERED_FAMILIES.contains(&family) {
            run.sort();
        }
        out.append(run);
    };
    for line in text.lines() {
        if let Some(comment) = line.strip_prefix("# ") {
            flush(&mut run, &mut out, &family);
            if let Some(name) = comment.split(' ').nth(1) {
                family = name.to_string();
            }
            out.push(line.to_string());
            continue;
        }
        let name = line.split(['{', ' ']).next().unwrap_or_default();
        let mut line = line.to_string();
        let (series, _) = line.rsplit_once(' ').expect("a sample has a value");
        if VARIABLE_VALUES
            .iter()
            .any(|(n, _)| *n == name || *n == series)
        {
            line = format!("{series} <v>");
        }
        if name.ends_with("_build_info") {
            assert!(line.contains(&version), "{line}: not {version}");
            line = line.replace(&version, r#"version="<version>""#);
        }
        run.push(line);
    }
    flush(&mut run, &mut out, &family);
    out.iter().map(|l| format!("{l}\n")).collect()
}

/// `promtool check metrics` on `text`: its report (empty when clean).
fn promtool(text: &str) -> String {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (cargo xtask test installs Debian's prometheus)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        report.trim().to_string()
    } else {
        format!("failed: {report}")
    }
}

/// A unified diff of `want` and `got` (3 lines of context), at most
/// `limit` lines of it.
fn diff(want: &str, got: &str, limit: usize) -> String {
    let (a, b): (Vec<&str>, Vec<&str>) = (want.lines().collect(), got.lines().collect());
    // Longest common subsequence, from the end.
    let mut lcs = vec![vec![0u32; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    // The edit script: (' ' | '-' | '+', line, the golden file's line
    // number there), removals before additions as diff writes them.
    let mut script = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            script.push((' ', a[i], i + 1));
            (i, j) = (i + 1, j + 1);
        } else if i < a.len() && (j == b.len() || lcs[i + 1][j] >= lcs[i][j + 1]) {
            script.push(('-', a[i], i + 1));
            i += 1;
        } else {
            script.push(('+', b[j], i + 1));
            j += 1;
        }
    }
    // Only the changes and 3 lines around each.
    let near = |k: usize| {
        script[k.saturating_sub(3)..(k + 4).min(script.len())]
            .iter()
            .any(|(op, _, _)| *op != ' ')
    };
    let mut out = Vec::new();
    let mut in_hunk = false;
    for (k, (op, line, at)) in script.iter().enumerate() {
        if near(k) {
            if !in_hunk {
                out.push(format!("@@ {GOLDEN}, line {at} @@"));
            }
            in_hunk = true;
            out.push(format!("{op}{line}"));
        } else {
            in_hunk = false;
        }
    }
    let total = out.len();
    if total > limit {
        out.truncate(limit);
        out.push(format!("... {} more lines of diff", total - limit));
    }
    out.join("\n")
}

/// The local date, as the agent's day periods see it.
fn local_day() -> String {
    crate::kit::sh(&["date", "+%F"])
}

/// One run: a fresh link and agent, the traffic mix, and the exposition
/// once every count is in and two scrapes a commit interval apart agree.
fn scrape_after_traffic() -> String {
    let link = Link::new("golden");
    link.set_offloads(false);
    link.b.exec(&[
        "ip",
        "addr",
        "add",
        &format!("{B4_ARP}/24"),
        "dev",
        &link.b_if,
    ]);
    link.wait_quiet();
    let dir = TempDir::new("golden");
    let before = link.a_stats();
    let _agent = start_agent(&link, &dir.0);
    wait_healthy(&link.a, PORT);
    // A first self-check before any traffic (as traffic.rs waits for), so
    // that the coverage ratio's minute starts where nothing is in flight.
    wait_for("the first self-check", Duration::from_secs(10), || {
        metrics(&link.a, PORT)?
            .contains("ntm_interface_coverage_ratio{")
            .then_some(())
    });

    let udp4 = traffic_mix(&link);
    let after = link.a_stats();
    // The oracle: every frame that crossed a's interface, in L3 bytes.
    let frames = (after.0.0 - before.0.0) + (after.1.0 - before.1.0);
    let l3_bytes = (after.0.1 - before.0.1) + (after.1.1 - before.1.1) - 14 * frames;

    // Drained (counted and filtered add up to the interface's counters),
    // committed (the day's total on the interface is everything), and
    // settled (the normalised exposition no longer changes).
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = String::new();
    loop {
        let text = metrics(&link.a, PORT).unwrap_or_default();
        let total = |family: &str| {
            sample_sum(&text, &format!("ntm_{family}_total"), &[])
                + sample_sum(&text, &format!("ntm_filtered_{family}_total"), &[])
        };
        let day = sample_sum(
            &text,
            "ntm_period_bytes",
            &[r#"period="day""#, r#"device="""#],
        );
        let counted = (total("packets"), total("bytes"));
        let in_day = sample_sum(&text, "ntm_bytes_total", &[]);
        if counted == (frames, l3_bytes) && day == in_day {
            let normalised = normalise(&text);
            if normalised == last {
                let udp = sample_sum(
                    &text,
                    "ntm_bytes_total",
                    &[r#"service="golden-udp""#, r#"src="laptop""#],
                );
                assert_eq!(udp, udp4.1, "IPv4 datagrams to 5300\n{text}");
                let report = promtool(&text);
                assert!(report.is_empty(), "promtool on /metrics: {report}");
                return text;
            }
            last = normalised;
        }
        assert!(
            Instant::now() < deadline,
            "want {frames} frames and {l3_bytes} bytes (counted and filtered), got {counted:?}; the interface's day total {day}, the series {in_day}:\n{text}"
        );
        thread::sleep(Duration::from_millis(1500));
    }
}

/// The exposition after a fixed traffic mix equals the golden file, but for
/// the values this file's doc lists; with NTM_UPDATE_GOLDEN=1 it rewrites
/// the file instead.
pub fn the_exposition_equals_the_golden_file() {
    // A run that crosses local midnight sees a new day's totals: once more.
    let mut text = String::new();
    for _ in 0..2 {
        let day = local_day();
        text = scrape_after_traffic();
        if local_day() == day {
            break;
        }
    }
    let got = normalise(&text);
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(GOLDEN);
    // The golden file is an exposition too, once its placeholders are
    // numbers and its version a version.
    let as_exposition = got
        .replace(" <v>\n", " 0\n")
        .replace(r#"version="<version>""#, r#"version="0.0.0""#);
    let report = promtool(&as_exposition);
    assert!(report.is_empty(), "promtool on the golden body: {report}");
    if std::env::var("NTM_UPDATE_GOLDEN").is_ok_and(|v| v == "1") {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &got).unwrap();
        eprintln!("NTM_UPDATE_GOLDEN=1: wrote {}", path.display());
        return;
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (NTM_UPDATE_GOLDEN=1 writes it)", path.display()));
    if want != got {
        let actual = std::env::temp_dir().join(format!("ntm-golden-{}.txt", std::process::id()));
        std::fs::write(&actual, &got).unwrap();
        panic!(
            "/metrics differs from {GOLDEN} (- golden, + now; all of it in {}); if the change is meant, rerun with NTM_UPDATE_GOLDEN=1 and review the file's diff:\n{}",
            actual.display(),
            diff(&want, &got, 80)
        );
    }
}
