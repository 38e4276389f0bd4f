//! Deployment artefacts, tested like code: the systemd unit is valid, and
//! its capabilities are exactly enough for an unprivileged ntm to count.

use std::process::Stdio;

use crate::kit::{
    Agent, Link,
    scrape::{Guard, TempDir, udp_counted_exactly, wait_healthy},
};

const UNIT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/systemd/ntm.service");

fn unit_value(key: &str) -> String {
    let text = std::fs::read_to_string(UNIT).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("{key}= in {UNIT}"))
        .to_string()
}

pub fn systemd_unit_verifies() {
    if !std::path::Path::new("/usr/bin/systemd-analyze").exists() {
        assert!(
            std::env::var("NTM_REQUIRE_BPF").is_err(),
            "systemd-analyze is missing (Debian package systemd)"
        );
        eprintln!("SKIPPED: no systemd-analyze here");
        return;
    }
    // The units as installed, pointing at the binary just built: the agent
    // and the two that detach it when it stops for good.
    let dir = TempDir::new("unit");
    let mut units = Vec::new();
    for name in ["ntm.service", "ntm-pins.service", "ntm-detach.service"] {
        let source = std::path::Path::new(UNIT).with_file_name(name);
        let text = std::fs::read_to_string(&source)
            .unwrap()
            .replace("/usr/local/bin/ntm-agent", env!("CARGO_BIN_EXE_ntm-agent"));
        let unit = dir.0.join(name);
        std::fs::write(&unit, text).unwrap();
        units.push(unit.to_string_lossy().into_owned());
    }
    // With the web config's drop-in, as installed.
    let drop_in = dir.0.join("ntm.service.d");
    std::fs::create_dir_all(&drop_in).unwrap();
    std::fs::copy(
        std::path::Path::new(UNIT).with_file_name("ntm-web-config.conf"),
        drop_in.join("web-config.conf"),
    )
    .unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .args(&units)
        .output()
        .unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && report.trim().is_empty(), "{report}");
    assert_eq!(
        unit_value("AmbientCapabilities"),
        unit_value("CapabilityBoundingSet")
    );
}

pub fn an_unprivileged_agent_with_the_units_capabilities_counts() {
    // CAP_BPF CAP_NET_ADMIN CAP_PERFMON -> +bpf,+net_admin,+perfmon
    let caps: Vec<String> = unit_value("AmbientCapabilities")
        .split_whitespace()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_ascii_lowercase()))
        .collect();
    let caps = format!("-all,{}", caps.join(","));
    let link = Link::new("caps");
    let _agent = Guard(
        std::process::Command::new("ip")
            .args(["netns", "exec", &link.a.name, "setpriv"])
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(format!("--inh-caps={caps}"))
            .arg(format!("--ambient-caps={caps}"))
            .arg(format!("--bounding-set={caps}"))
            .arg(env!("CARGO_BIN_EXE_ntm-agent"))
            .args([
                "--numeric",
                "-i",
                &link.a_if,
                "-b",
                "127.0.0.1",
                "-p",
                "9950",
            ])
            .args(["--drain-interval", "100ms"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_healthy(&link.a, 9950);
    udp_counted_exactly(&link, 5320, 10, 72, 9950);
}

const RULES_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/prometheus");

/// The alert rules: `promtool check rules` is clean, `promtool test rules`
/// (each alert fires on input that calls for it, not before its `for`)
/// passes, and every ntm metric they name is one a real agent exports.
pub fn alert_rules_pass_promtool_and_name_real_metrics() {
    for args in [
        vec!["check", "rules", "ntm-rules.yml"],
        vec!["test", "rules", "ntm-rules.test.yml"],
    ] {
        let out = std::process::Command::new("promtool")
            .args(&args)
            .current_dir(RULES_DIR)
            .output()
            .expect("promtool (cargo xtask test installs prometheus)");
        assert!(
            out.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let rules = std::fs::read_to_string(format!("{RULES_DIR}/ntm-rules.yml")).unwrap();
    let named: std::collections::BTreeSet<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("expr:"))
        .flat_map(|expr| expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')))
        .filter(|word| word.starts_with("ntm_"))
        .collect();
    assert!(named.len() >= 4, "{named:?}");
    let link = Link::new("rules");
    let _agent = Agent::in_ns(&link.a).iface(&link.a_if).port(9470).spawn();
    wait_healthy(&link.a, 9470);
    let (_, text) = crate::kit::scrape::http_get(&link.a, 9470, "/metrics").unwrap();
    for metric in named {
        assert!(
            text.lines()
                .any(|l| l.starts_with(&format!("# TYPE {metric} "))),
            "the rules name {metric}, which ntm does not export:\n{text}"
        );
    }
}
