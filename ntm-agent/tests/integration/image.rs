//! The container image (deploy/image/Dockerfile, built by `cargo xtask
//! image`), run with podman the way a DaemonSet runs it: in a network
//! namespace of the host's choosing, with only BPF, NET_ADMIN and PERFMON;
//! it attaches to a veth and counts test traffic exactly.
//!
//! This is the host's (amd64) image. The arm64 image (localhost/ntm:dev-arm64,
//! `cargo xtask image --arch arm64`, also built by CI's `cargo xtask dist
//! --arch arm64`) cannot run here; xtask checks instead that its binary runs
//! under qemu-user.

use std::process::Stdio;

use crate::kit::{
    BpfFs, Link,
    scrape::{Guard, udp_counted_exactly, wait_healthy},
};

pub fn the_image_runs_with_least_privilege_and_counts() {
    let Some(image) = crate::kit::test_image() else {
        return;
    };
    let link = Link::new("img");
    // A bpffs at /sys/fs/bpf, as a DaemonSet mounts the host's: here one of
    // the test's own, which goes (with what the agent pinned in it) when
    // the test ends. Without one the agent pins nothing (it says so), and
    // the pinning path of the image went untested.
    let bpffs = BpfFs::new("img");
    let name = format!("ntm-test-{}", std::process::id());
    let _container = Guard(
        podman()
            .args(["run", "--rm", "--name", &name])
            .arg(format!("--network=ns:/var/run/netns/{}", link.a.name))
            .arg(format!("--volume={}:/sys/fs/bpf", bpffs.dir.display()))
            // Podman's default seccomp profile (4.3) allows bpf() only with
            // CAP_SYS_ADMIN; Kubernetes runs pods unconfined unless told.
            .args(["--security-opt", "seccomp=unconfined"])
            // As the chart runs it: uid 0 with these capabilities, and ntm
            // becomes 65534 with only BPF, NET_ADMIN and PERFMON once
            // attached.
            .args([
                "--cap-drop",
                "all",
                "--cap-add",
                "BPF,NET_ADMIN,PERFMON,CHOWN,SETUID,SETGID",
            ])
            .args(["--env", "NTM_USER=65534"])
            .arg(&image)
            .args([
                "--numeric",
                "-i",
                &link.a_if,
                "-b",
                "127.0.0.1",
                "-p",
                "9960",
            ])
            .args(["--drain-interval", "100ms"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_healthy(&link.a, 9960);
    udp_counted_exactly(&link, 5330, 12, 50, 9960);
    // The agent in the container now runs as 65534.
    let pid = podman()
        .args(["inspect", "--format", "{{.State.Pid}}", &name])
        .output()
        .unwrap();
    let pid = String::from_utf8_lossy(&pid.stdout).trim().to_string();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert_eq!(
        uid.split_whitespace().skip(1).collect::<Vec<_>>(),
        ["65534"; 4],
        "{status}"
    );
    // Stop it cleanly (SIGTERM: detach and drain).
    let _ = podman().args(["stop", "-t", "10", &name]).output();
    // What it pinned for the next agent (the links of the veth's hooks)
    // is in the bpffs it was given.
    let links: Vec<_> = std::fs::read_dir(bpffs.dir.join("ntm"))
        .into_iter()
        .flatten()
        .flatten()
        .flat_map(|netns| {
            std::fs::read_dir(netns.path().join("links"))
                .into_iter()
                .flatten()
                .flatten()
        })
        .map(|link| link.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(links.len(), 2, "pinned links: {links:?}");
}

/// Podman as `cargo xtask image` runs it here: vfs storage, runc, cgroupfs.
fn podman() -> std::process::Command {
    let mut cmd = std::process::Command::new("podman");
    cmd.args([
        "--storage-driver",
        "vfs",
        "--runtime",
        "runc",
        "--cgroup-manager",
        "cgroupfs",
    ]);
    cmd
}
