//! `--user`: after attaching, the agent runs as an ordinary user with only
//! CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON, in every thread, and can still
//! count, follow a new interface and swap its filter on SIGHUP.

use std::{net::UdpSocket, time::Duration};

use crate::kit::{
    A4, Agent, B4, Link,
    scrape::{TempDir, http_get, plain_value, sample_sum, wait_for, wait_healthy},
};
use ntm_agent::kernel::{attach, privileges};

/// (uid line, CapPrm, CapEff) of every thread of `pid`.
fn threads(pid: u32) -> Vec<(String, u64, u64)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let status = std::fs::read_to_string(task.unwrap().path().join("status")).unwrap();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .unwrap()
                .trim()
                .to_string()
        };
        let mask = |name: &str| u64::from_str_radix(&field(name), 16).unwrap();
        out.push((field("Uid:"), mask("CapPrm:"), mask("CapEff:")));
    }
    out
}

pub fn after_attaching_it_runs_as_nobody_with_three_capabilities_and_still_works() {
    let link = Link::new("priv");
    let dir = TempDir::new("priv");
    let file = dir.0.join("filter");
    std::fs::write(&file, "udp port 5001\n").unwrap();
    let port = 9491;
    let agent = Agent::in_ns(&link.a)
        .iface("ntm*")
        .port_any_address(port)
        .args(["--drain-interval", "100ms"])
        .args(["--wait-for-interfaces", "--user", "nobody", "-F"])
        .arg(&file)
        .spawn();
    wait_healthy(&link.a, port);
    let pid = agent.0.id();
    // `ip netns exec` execs the agent: the child is the agent itself.
    let all = threads(pid);
    assert!(all.len() > 1, "{all:?}");
    for (uid, permitted, effective) in &all {
        assert_eq!(uid.split_whitespace().collect::<Vec<_>>(), ["65534"; 4]);
        assert_eq!(*permitted, privileges::kept_mask(), "{all:?}");
        assert_eq!(*effective & !privileges::kept_mask(), 0, "{all:?}");
    }

    // Still counts, exactly.
    let sink = link.a.run(|| UdpSocket::bind((A4, 5001)).unwrap());
    link.b.run(|| {
        let s = UdpSocket::bind((B4, 0)).unwrap();
        for _ in 0..20 {
            s.send_to(&[0; 100], (A4, 5001)).unwrap();
        }
    });
    link.wait_quiet();
    wait_for("the counts", Duration::from_secs(20), || {
        let text = http_get(&link.a, port, "/metrics")?.1;
        (sample_sum(&text, "ntm_bytes_total", &[r#"service="5001""#]) == 20 * 128).then_some(())
    });
    drop(sink);

    // Follows an interface that appears after the switch.
    link.a.exec(&[
        "ip", "link", "add", "ntm7", "type", "veth", "peer", "name", "ntm8",
    ]);
    link.a.exec(&["ip", "link", "set", "ntm7", "up"]);
    wait_for("ntm7 attached", Duration::from_secs(20), || {
        let (ingress, egress) = link.a.run(|| attach::attached_ntm_programs("ntm7").ok())?;
        (!ingress.is_empty() && !egress.is_empty()).then_some(())
    });

    // Loads a new filter on SIGHUP.
    std::fs::write(&file, "udp port 5002\n").unwrap();
    // SAFETY: signalling our own child.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGHUP) }, 0);
    wait_for("the reload", Duration::from_secs(20), || {
        let text = http_get(&link.a, port, "/metrics")?.1;
        (text.contains(r#"ntm_filter_reloads_total{result="ok"} 1"#)
            && text.contains(r#"ntm_filter_active{filter="udp port 5002"} 1"#))
        .then_some(())
    });
    let text = http_get(&link.a, port, "/metrics").unwrap().1;
    assert_eq!(
        plain_value(&text, "ntm_filter_reloads_total{result=\"error\"}"),
        0
    );
}

pub fn an_unknown_user_fails_before_anything_is_attached() {
    let link = Link::new("privx");
    let out = Agent::in_ns(&link.a)
        .iface(&link.a_if)
        .port_any_address(9492)
        .args(["--user", "no-such-user-here"])
        .output();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no-such-user-here") && err.contains("no such user"),
        "{err}"
    );
    let attached = link
        .a
        .run(|| attach::attached_ntm_programs(&link.a_if).unwrap());
    assert_eq!(attached, (vec![], vec![]));
}
