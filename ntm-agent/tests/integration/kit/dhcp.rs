//! A real DHCP client for the name tests: busybox's udhcpc, which sends a
//! host name and puts the address it is given on its interface.

use std::path::Path;

use super::Link;

/// Runs udhcpc once on b's end of `link` (its script in `dir`), sending
/// `hostname`; returns what it printed. The leased address ends up on
/// b's interface.
pub fn udhcpc(link: &Link, dir: &Path, hostname: &str) -> String {
    let script = dir.join("udhcpc.script");
    std::fs::write(
        &script,
        "#!/bin/sh\n[ \"$1\" = bound ] && ip addr add \"$ip/${mask:-24}\" dev \"$interface\"\nexit 0\n",
    )
    .unwrap();
    super::sh(&["chmod", "+x", script.to_str().unwrap()]);
    link.b.exec(&[
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
        &link.b_if,
        "-x",
        &format!("hostname:{hostname}"),
        "-s",
        script.to_str().unwrap(),
    ])
}
