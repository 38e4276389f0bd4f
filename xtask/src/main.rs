//! `cargo xtask <command>`: developer commands for ntm. Each one first makes
//! sure the eBPF toolchain and libpcap are in place (see toolchain.rs), so
//! that they work on a fresh machine.

mod libpcap;
mod toolchain;

use std::process::Command;

use anyhow::Result;
use clap::{Parser, Subcommand};

use toolchain::{apt_install, ensure_ebpf_toolchain, run};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Developer commands for ntm")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install or check the build toolchain (nightly rust-src, LLVM 22,
    /// bpf-linker, libpcap-dev).
    Setup,
    /// Build ntm-agent (release) with its kernel programs.
    Build,
    /// Build and run ntm-agent; arguments after `--` go to it
    /// (e.g. `cargo xtask run -- --iface br0`). Needs root.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run every test: host unit tests and kernel tests (root: real eBPF
    /// programs, network namespaces). NTM_REQUIRE_BPF=1 makes a missing
    /// privilege a failure instead of a skip.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build a release binary for a target architecture (amd64 or arm64,
    /// cross-compiled for Raspberry Pi-class gateways) and smoke-test it
    /// (under qemu-user for arm64). Prints the binary's path.
    Dist {
        #[arg(long, value_enum, default_value_t = Arch::Amd64)]
        arch: Arch,
    },
    /// Build the container image (static musl binary, FROM scratch) with
    /// podman, offline; prints its name.
    Image,
    /// Print performance figures: kernel program ns/packet vs an empty
    /// program, scrape time and memory by series, drain time by table size,
    /// and veth throughput with and without ntm (TC and XDP).
    Bench,
    /// Clippy with warnings denied, for the host crates and the eBPF crate.
    Clippy,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Arch {
    Amd64,
    Arm64,
}

/// Builds (and for arm64 cross-builds) the agent and checks the binary runs.
fn dist(arch: Arch) -> Result<()> {
    ensure_ebpf_toolchain()?;
    let (triple, path) = match arch {
        Arch::Amd64 => {
            run(cargo().args(["build", "--release", "-p", "ntm-agent"]))?;
            (None, workspace_root().join("target/release/ntm-agent"))
        }
        Arch::Arm64 => {
            let triple = "aarch64-unknown-linux-gnu";
            apt_install(&[
                "gcc-aarch64-linux-gnu",
                "libc6-dev-arm64-cross",
                "qemu-user",
            ])?;
            let installed = toolchain::output_of(Command::new("rustup").args([
                "target",
                "list",
                "--installed",
            ]));
            if !installed.lines().any(|l| l.trim() == triple) {
                eprintln!("xtask: adding the Rust standard library for {triple} (rustup)");
                run(Command::new("rustup").args(["target", "add", triple]))?;
            }
            // The machine's libpcap is for the host: link a static one built
            // for arm64 (ntm-agent/build.rs reads NTM_LIBPCAP_DIR).
            let pcap = libpcap::static_libpcap(&workspace_root().join("target"), triple)?;
            run(cargo()
                .args(["build", "--release", "-p", "ntm-agent", "--target", triple])
                .env(
                    "CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER",
                    "aarch64-linux-gnu-gcc",
                )
                .env("NTM_LIBPCAP_DIR", pcap))?;
            (
                Some(triple),
                workspace_root().join(format!("target/{triple}/release/ntm-agent")),
            )
        }
    };
    // Smoke test: the binary starts, parses its flags and answers.
    let mut check = match triple {
        None => Command::new(&path),
        Some(_) => {
            let mut qemu = Command::new("qemu-aarch64");
            qemu.args(["-L", "/usr/aarch64-linux-gnu"]).arg(&path);
            qemu
        }
    };
    let out = check.arg("--version").output()?;
    let version = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || !version.starts_with("ntm-agent ") {
        anyhow::bail!("{} does not run: {version}", path.display());
    }
    println!("{} ({})", path.display(), version.trim());
    Ok(())
}

/// Name of the image `cargo xtask image` builds.
const IMAGE: &str = "localhost/ntm:dev";
const MUSL: &str = "x86_64-unknown-linux-musl";

/// Podman options that work in this kind of sandbox: vfs storage (no
/// overlay on overlay), cgroupfs, runc.
pub fn podman() -> Command {
    let mut cmd = Command::new("podman");
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

/// Builds the static binary and the image from deploy/image/Dockerfile.
fn image() -> Result<String> {
    ensure_ebpf_toolchain()?;
    apt_install(&["podman", "runc"])?;
    // Podman refuses to start containers here unless ulimits are left alone.
    let conf = std::path::Path::new("/etc/containers/containers.conf");
    let current = std::fs::read_to_string(conf).unwrap_or_default();
    if !current.contains("default_ulimits") {
        std::fs::create_dir_all("/etc/containers")?;
        std::fs::write(
            conf,
            format!("{current}\n[containers]\ndefault_ulimits = []\n"),
        )?;
    }
    let installed =
        toolchain::output_of(Command::new("rustup").args(["target", "list", "--installed"]));
    if !installed.lines().any(|l| l.trim() == MUSL) {
        eprintln!("xtask: adding the Rust standard library for {MUSL} (rustup)");
        run(Command::new("rustup").args(["target", "add", MUSL]))?;
    }
    // A static binary needs libpcap built for musl (see libpcap.rs).
    let pcap = libpcap::static_libpcap(&workspace_root().join("target"), MUSL)?;
    run(cargo()
        .args(["build", "--release", "-p", "ntm-agent", "--target", MUSL])
        .env("NTM_LIBPCAP_DIR", pcap))?;
    let context = workspace_root().join("target/image");
    std::fs::create_dir_all(&context)?;
    std::fs::copy(
        workspace_root().join(format!("target/{MUSL}/release/ntm-agent")),
        context.join("ntm-agent"),
    )?;
    std::fs::copy("/etc/services", context.join("services"))?;
    run(podman()
        .args(["build", "-q", "-t", IMAGE, "-f"])
        .arg(workspace_root().join("deploy/image/Dockerfile"))
        .arg(&context))?;
    Ok(IMAGE.to_string())
}

/// Debian packages the kernel tests drive: namespaces and veths (iproute2),
/// ICMP echo (iputils-ping), offload switches (ethtool), sysctl (procps),
/// a real Prometheus and promtool for the scrape tests (prometheus),
/// systemd-analyze for the unit file (systemd).
const TEST_PACKAGES: &[&str] = &[
    "iproute2",
    "iputils-ping",
    "ethtool",
    "procps",
    "prometheus",
    "systemd",
    "netbase",
];

/// PyPI packages the chart test uses, pinned: Helm 4 embedded (lint and
/// render offline) and the Kubernetes API schemas.
const PYTHON_TEST_PACKAGES: &[&str] = &[
    "helm-python-sdk==0.2.2",
    "kubernetes-validate==1.37.0",
    "PyYAML==6.0.4",
];

/// The workspace root, so that commands work from any folder inside it.
fn workspace_root() -> &'static std::path::Path {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(std::path::Path::new("."))
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string()));
    cmd.current_dir(workspace_root());
    cmd
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Task::Setup => ensure_ebpf_toolchain(),
        Task::Build => {
            ensure_ebpf_toolchain()?;
            run(cargo().args(["build", "--release", "-p", "ntm-agent"]))
        }
        Task::Run { args } => {
            ensure_ebpf_toolchain()?;
            run(cargo().args(["build", "--release", "-p", "ntm-agent"]))?;
            if !toolchain::is_root() {
                eprintln!(
                    "xtask: ntm-agent needs root (or CAP_BPF + CAP_NET_ADMIN + CAP_PERFMON); it will say so if it cannot load"
                );
            }
            run(Command::new(workspace_root().join("target/release/ntm-agent")).args(args))
        }
        Task::Test { args } => {
            ensure_ebpf_toolchain()?;
            if toolchain::is_root() {
                apt_install(TEST_PACKAGES)?;
            }
            // The image test runs the image built here (as root, with podman).
            let image = if toolchain::is_root() {
                Some(image()?)
            } else {
                None
            };
            let python = toolchain::ensure_python_env(
                &workspace_root().join("target/pyenv"),
                PYTHON_TEST_PACKAGES,
            )?;
            let mut test = cargo();
            if let Some(image) = image {
                test.env("NTM_IMAGE", image);
            }
            run(test
                .env("NTM_PYTHON", python)
                .args(["test", "--workspace", "--exclude", "ntm-ebpf"])
                .args(args))
        }
        Task::Dist { arch } => dist(arch),
        Task::Image => image().map(|name| println!("{name}")),
        Task::Bench => {
            ensure_ebpf_toolchain()?;
            run(cargo().args([
                "bench",
                "-p",
                "ntm-agent",
                "--bench",
                "datapath",
                "--bench",
                "exporter",
                "--bench",
                "throughput",
            ]))
        }
        Task::Clippy => {
            ensure_ebpf_toolchain()?;
            run(cargo().args([
                "clippy",
                "--workspace",
                "--exclude",
                "ntm-ebpf",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]))?;
            run(Command::new("cargo")
                .current_dir(workspace_root().join("ntm-ebpf"))
                .args([
                    "+nightly",
                    "clippy",
                    "-p",
                    "ntm-ebpf",
                    "--target",
                    "bpfel-unknown-none",
                    "-Z",
                    "build-std=core",
                    "--",
                    "-D",
                    "warnings",
                ]))
        }
    }
}
