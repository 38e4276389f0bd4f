//! What the agent process shows its users besides traffic: how each
//! interface is hooked (`ntm_interface_attached{iface,mode}`), user errors
//! as one clear line whatever RUST_BACKTRACE says, and an HTTP endpoint
//! that no client can use to flood the log or to hold connections open.

use std::{
    io::{Read, Write},
    net::TcpStream,
    time::{Duration, Instant},
};

use crate::kit::{
    Agent, Link, Netns,
    scrape::{Guard, TempDir, http_get, plain_value, wait_healthy},
};

/// The agent in `ns` on 127.0.0.1:`port`, its log written to `log`.
fn spawn_logged(ns: &Netns, port: u16, args: &[&str], log: &std::path::Path) -> Guard {
    Agent::in_ns(ns).port(port).args(args).log_to(log).spawn()
}

/// The `ntm_interface_attached` lines of a scrape, sorted.
fn attached_lines(ns: &Netns, port: u16) -> Vec<String> {
    let (_, body) = http_get(ns, port, "/metrics").expect("scrape");
    let mut lines: Vec<String> = body
        .lines()
        .filter(|l| l.starts_with("ntm_interface_attached{"))
        .map(str::to_string)
        .collect();
    lines.sort();
    lines
}

pub fn interface_attached_says_how_each_interface_is_hooked() {
    let link = Link::new("mode");
    let dir = TempDir::new("mode");
    let log = dir.0.join("agent.log");
    let cases: [(&[&str], &[&str]); 4] = [
        (
            &["-i", "ntm0"],
            &[r#"ntm_interface_attached{iface="ntm0",mode="tcx"} 1"#],
        ),
        (
            &["-i", "ntm0", "--attach-mode", "clsact"],
            &[r#"ntm_interface_attached{iface="ntm0",mode="clsact"} 1"#],
        ),
        // veth has native XDP; loopback only the generic kind.
        (
            &["-i", "ntm0,lo", "--mode", "xdp"],
            &[
                r#"ntm_interface_attached{iface="lo",mode="xdp-generic"} 1"#,
                r#"ntm_interface_attached{iface="ntm0",mode="xdp-native"} 1"#,
            ],
        ),
        // An interface waited for shows 0, with the mode it will get.
        (
            &["-i", "ntm0,wg9", "--wait-for-interfaces"],
            &[
                r#"ntm_interface_attached{iface="ntm0",mode="tcx"} 1"#,
                r#"ntm_interface_attached{iface="wg9",mode="tcx"} 0"#,
            ],
        ),
    ];
    for (n, (args, expected)) in cases.into_iter().enumerate() {
        let port = 9320 + n as u16;
        let agent = spawn_logged(&link.a, port, args, &log);
        let deadline = Instant::now() + Duration::from_secs(30);
        let lines = loop {
            let lines = http_get(&link.a, port, "/healthz")
                .map(|_| attached_lines(&link.a, port))
                .unwrap_or_default();
            if lines == expected || Instant::now() > deadline {
                break lines;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        assert_eq!(lines, expected, "{args:?}");
        drop(agent);
    }
}

pub fn user_errors_are_one_line_without_a_backtrace() {
    let ns = Netns::new("errs");
    let taken = ns.run(|| std::net::TcpListener::bind(("127.0.0.1", 9330)).unwrap());
    let cases: [(&[&str], &str); 5] = [
        (&["-i", "no-such-if0"], "does not exist"),
        (&["-i", "lo", "--service", "http=80"], "PORT[/PROTO]=NAME"),
        (
            &["-i", "lo", "-b", "127.0.0.1", "-p", "9330"],
            "already in use",
        ),
        (
            &["-i", "lo", "--services-file", "/nonexistent/services"],
            "/nonexistent/services",
        ),
        (&["-i", "lo", "tcp prot 80"], "bad filter expression"),
    ];
    for (args, says) in cases {
        let out = Agent::in_ns(&ns)
            .args(args)
            .env("RUST_BACKTRACE", "1")
            .output();
        let err = String::from_utf8_lossy(&out.stderr);
        // Log lines (timestamped, bracketed) may come first. A value that
        // does not parse is clap's usage error (exit 2: the message, then
        // a pointer to --help); anything else one line of ntm's (exit 1).
        let message: Vec<&str> = err
            .lines()
            .filter(|l| !l.starts_with('[') && !l.trim().is_empty())
            .collect();
        match out.status.code() {
            Some(1) => {
                assert_eq!(message.len(), 1, "{args:?}: one line:\n{err}");
                assert!(message[0].starts_with("ntm-agent: "), "{err}");
            }
            Some(2) => {
                assert_eq!(message.len(), 2, "{args:?}:\n{err}");
                assert!(message[0].starts_with("error: invalid value"), "{err}");
                assert!(message[1].contains("--help"), "{err}");
            }
            other => panic!("{args:?}: exit {other:?}:\n{err}"),
        }
        assert!(message[0].contains(says), "{args:?}: {err}");
        for noise in ["backtrace", "Stack", "panicked", "Caused by", "Error: "] {
            assert!(!err.contains(noise), "{args:?}: {noise:?} in {err}");
        }
    }
    drop(taken);
    // The default /etc/services may be absent; one named explicitly may not.
    let dir = TempDir::new("svc");
    let services = dir.0.join("services");
    std::fs::write(&services, b"# caf\xe9\nhttp 80/tcp\n").unwrap();
    let log = dir.0.join("agent.log");
    let _agent = spawn_logged(
        &ns,
        9331,
        &["-i", "lo", "--services-file", services.to_str().unwrap()],
        &log,
    );
    wait_healthy(&ns, 9331);
}

/// Writes `request` on a new connection to `port`, then closes it.
fn send_and_close(ns: &Netns, port: u16, request: &[u8]) {
    ns.run(|| {
        let mut conn = TcpStream::connect(("127.0.0.1", port)).unwrap();
        conn.write_all(request).unwrap();
    });
}

pub fn no_client_can_flood_the_log_or_hold_a_connection() {
    let ns = Netns::new("http");
    let dir = TempDir::new("http");
    let log = dir.0.join("agent.log");
    let port = 9340;
    // --no-pin: `ip netns exec` hides /sys/fs/bpf, which the agent would
    // warn about; the log must hold nothing at all at warning level.
    let _agent = spawn_logged(&ns, port, &["-i", "lo", "--no-pin"], &log);
    wait_healthy(&ns, port);

    // Connections dropped before, and in the middle of, a request.
    const DROPPED: u64 = 40;
    for _ in 0..DROPPED {
        send_and_close(&ns, port, b"");
        send_and_close(&ns, port, b"GET /metr");
    }
    // A client that starts its headers and never finishes them is cut off.
    let (held, answer) = ns.run(|| {
        let mut conn = TcpStream::connect(("127.0.0.1", port)).unwrap();
        conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            .unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let started = Instant::now();
        let mut answer = Vec::new();
        let _ = conn.read_to_end(&mut answer);
        (started.elapsed(), answer)
    });
    assert!(
        held < Duration::from_secs(15),
        "a client that never finishes its headers was held {held:?}"
    );
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "{answer}"
    );

    let (status, body) = http_get(&ns, port, "/metrics").expect("scrape");
    assert_eq!(status, 200);
    let errors = plain_value(&body, "ntm_http_connection_errors_total");
    // Each cut-short request and the timed-out one; a connection closed
    // before sending anything is no error.
    assert_eq!(errors, DROPPED + 1, "{body}");
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        !logged.contains("ERROR") && !logged.contains("WARN"),
        "the log:\n{logged}"
    );
}
