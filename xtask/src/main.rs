//! `cargo xtask <command>`: developer commands for ntm. Each one first makes
//! sure the eBPF toolchain is in place (see toolchain.rs), so that they work
//! on a fresh machine.

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
    /// Install or check the eBPF toolchain (nightly rust-src, LLVM 22, bpf-linker).
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
    /// Print performance figures: kernel program ns/packet vs an empty
    /// program, scrape time and memory by series, drain time by table size,
    /// and veth throughput with and without ntm (TC and XDP).
    Bench,
    /// Clippy with warnings denied, for the host crates and the eBPF crate.
    Clippy,
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
            run(cargo()
                .args(["test", "--workspace", "--exclude", "ntm-ebpf"])
                .args(args))
        }
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
