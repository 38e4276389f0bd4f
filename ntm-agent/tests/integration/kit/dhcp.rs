//! Real DHCP and DNS parts for the name tests: dnsmasq on a's end of a
//! test link, and busybox's udhcpc on b's, which sends a host name and
//! puts the address it is given on its interface.

use std::{
    path::Path,
    process::{Command, Stdio},
};

use super::{Link, Netns, scrape::Guard};

/// dnsmasq on a's end of `link` only (never another interface, no
/// upstream, no hosts file), its pid file in `dir`, with `extra` options:
/// a DHCP range, `--port=53` and names for DNS, or `--port=0` for none.
pub fn dnsmasq(link: &Link, dir: &Path, extra: &[&str]) -> Guard {
    dnsmasq_on(&link.a, &link.a_if, dir, extra)
}

/// dnsmasq on `ifname` of `ns` only, as [`dnsmasq`] says.
pub fn dnsmasq_on(ns: &Netns, ifname: &str, dir: &Path, extra: &[&str]) -> Guard {
    Guard(
        Command::new("ip")
            .args(["netns", "exec", &ns.name, "dnsmasq", "--keep-in-foreground"])
            .args(["--conf-file=/dev/null", "--no-resolv", "--no-hosts"])
            .args([
                "--interface",
                ifname,
                "--bind-interfaces",
                "--except-interface=lo",
            ])
            .args(["--user=root", "--log-facility=-"])
            .arg(format!("--pid-file={}", dir.join("dnsmasq.pid").display()))
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("dnsmasq (cargo xtask test installs dnsmasq-base)"),
    )
}

/// Runs udhcpc once on b's end of `link` (its script in `dir`), sending
/// `hostname`; returns what it printed. The leased address ends up on
/// b's interface.
pub fn udhcpc(link: &Link, dir: &Path, hostname: &str) -> String {
    udhcpc_on(&link.b, &link.b_if, dir, hostname)
}

/// Runs udhcpc once on `ifname` of `ns`, as [`udhcpc`] says.
pub fn udhcpc_on(ns: &Netns, ifname: &str, dir: &Path, hostname: &str) -> String {
    let script = dir.join("udhcpc.script");
    std::fs::write(
        &script,
        "#!/bin/sh\n[ \"$1\" = bound ] && ip addr add \"$ip/${mask:-24}\" dev \"$interface\"\nexit 0\n",
    )
    .unwrap();
    super::sh(&["chmod", "+x", script.to_str().unwrap()]);
    ns.exec(&[
        "busybox",
        "udhcpc",
        "-f",
        "-q",
        "-n",
        "-t",
        "10",
        "-T",
        "1",
        "-i",
        ifname,
        "-x",
        &format!("hostname:{hostname}"),
        "-s",
        script.to_str().unwrap(),
    ])
}
