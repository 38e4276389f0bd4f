//! `cargo xtask <command>`: developer commands for ntm. Each one first makes
//! sure the eBPF toolchain and libpcap are in place (see toolchain.rs), so
//! that they work on a fresh machine.

mod libpcap;
mod steps;
mod toolchain;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

use steps::{background, step};
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
    /// bpf-linker, libpcap-dev, protobuf-compiler).
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
    /// (under qemu-user for arm64). Prints the binary's path. The arm64
    /// binary is static (glibc linked in); as root, the arm64 image is built
    /// from it and checked too (see `image`).
    Dist {
        #[arg(long, value_enum, default_value_t = Arch::Amd64)]
        arch: Arch,
    },
    /// Build the container image (FROM scratch, static binary: musl for
    /// amd64, glibc for arm64) with podman, offline; prints its name
    /// (localhost/ntm:dev, or localhost/ntm:dev-arm64). The arm64 image's
    /// binary is checked under qemu-user.
    Image {
        #[arg(long, value_enum, default_value_t = Arch::Amd64)]
        arch: Arch,
    },
    /// Print performance figures: kernel program ns/packet vs an empty
    /// program, scrape time and memory by series, drain time by table size,
    /// and veth throughput with and without ntm (TC and XDP).
    Bench,
    /// Clippy with warnings denied, for the host crates and the eBPF crate.
    /// (`cargo xtask test` lints the host crates too, as it builds them.)
    Clippy {
        /// The eBPF crate only: what CI runs beside `cargo xtask test`.
        #[arg(long)]
        ebpf_only: bool,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Arch {
    Amd64,
    Arm64,
}

/// Builds (and for arm64 cross-builds) the agent and checks the binary runs.
/// For arm64 the binary is the static one the arm64 image holds (glibc
/// linked in): one release build serves both, and it runs on any arm64
/// Linux, with or without the image. As root, also builds the arm64 image
/// from that same binary and checks the binary in it runs (see `image`), so
/// that CI's `dist --arch arm64` covers both.
fn dist(arch: Arch) -> Result<()> {
    ensure_ebpf_toolchain()?;
    let (binary, mut check) = match arch {
        Arch::Amd64 => {
            release_build()?;
            let binary = cargo_target_dir().join("release/ntm-agent");
            (binary.clone(), Command::new(binary))
        }
        Arch::Arm64 => {
            let binary = static_arm64_binary()?;
            let mut qemu = Command::new("qemu-aarch64");
            qemu.args(["-L", "/usr/aarch64-linux-gnu"]).arg(&binary);
            (binary, qemu)
        }
    };
    // Smoke test: the binary starts, parses its flags and answers.
    let version = step("smoke test (--version)", || {
        answers_version(&mut check, &binary)
    })?;
    println!("{} ({version})", binary.display());
    if let Arch::Arm64 = arch {
        // Building images needs root here (podman's configuration, vfs
        // storage), as for the amd64 image `cargo xtask test` builds.
        if toolchain::is_root() {
            println!("{}", image_of(Arch::Arm64, &binary)?);
        } else {
            eprintln!(
                "xtask: not building the arm64 image (podman needs root here); `cargo xtask image --arch arm64` as root builds it"
            );
        }
    }
    Ok(())
}

/// The agent's release build for this machine (target/release/ntm-agent).
fn release_build() -> Result<()> {
    step("release build", || {
        run(cargo().args(["build", "--release", "-p", "ntm-agent"]))
    })
}

/// Runs `cmd` (`binary`, possibly under qemu) with `--version` and returns
/// what it printed, or fails unless it printed "ntm-agent <version>".
fn answers_version(cmd: &mut Command, binary: &Path) -> Result<String> {
    let out = cmd
        .arg("--version")
        .output()
        .with_context(|| format!("could not start {cmd:?}"))?;
    let version = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || !version.starts_with("ntm-agent ") {
        bail!(
            "{} does not run ({}): {version}{}",
            binary.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(version.trim().to_string())
}

/// Names of the images `cargo xtask image` builds.
const IMAGE: &str = "localhost/ntm:dev";
const IMAGE_ARM64: &str = "localhost/ntm:dev-arm64";
const MUSL: &str = "x86_64-unknown-linux-musl";
const ARM64: &str = "aarch64-unknown-linux-gnu";
const ARM64_LINKER_VAR: &str = "CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER";
const ARM64_LINKER: &str = "aarch64-linux-gnu-gcc";

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

/// Adds the Rust standard library for `triple` unless rustup has it.
fn ensure_rust_target(triple: &str) -> Result<()> {
    let installed =
        toolchain::output_of(Command::new("rustup").args(["target", "list", "--installed"]));
    if !installed.lines().any(|l| l.trim() == triple) {
        step(&format!("rustup target add {triple}"), || {
            run(Command::new("rustup").args(["target", "add", triple]))
        })?;
    }
    Ok(())
}

/// Debian packages the images take: podman and its runtime.
const IMAGE_PACKAGES: &[&str] = &["podman", "runc"];

/// The static x86_64 binary of the amd64 image (musl, with a musl libpcap).
fn static_amd64_binary() -> Result<PathBuf> {
    ensure_rust_target(MUSL)?;
    // A static binary needs libpcap built for musl (see libpcap.rs).
    let pcap = libpcap::static_libpcap(&workspace_root().join("target"), MUSL)?;
    step(&format!("release build for {MUSL} (image)"), || {
        run(cargo()
            .args(["build", "--release", "-p", "ntm-agent", "--target", MUSL])
            .env("NTM_LIBPCAP_DIR", pcap))
    })?;
    Ok(cargo_target_dir().join(format!("{MUSL}/release/ntm-agent")))
}

/// The static aarch64 binary of `dist --arch arm64` and of the arm64 image:
/// glibc linked in (+crt-static), with a static arm64 libpcap. The flag is
/// for the aarch64 target only: the build scripts, proc macros and the
/// nested eBPF build (bpfel-unknown-none, its own CARGO_ENCODED_RUSTFLAGS)
/// do not see it. Built in the workspace's target folder, so that it shares
/// those host-side builds with the musl image's release build (cargo keeps
/// them apart from the targets' own); CI builds it in a folder of its own
/// instead (CARGO_TARGET_DIR, see `.ci/run`), beside the tests, where the
/// musl build's lock on the host side would hold it back. A plain `cargo build --target
/// aarch64-unknown-linux-gnu`, without the flag, would build the arm64 side
/// again, but takes a static arm64 libpcap anyway, which only xtask builds.
fn static_arm64_binary() -> Result<PathBuf> {
    let target = workspace_root().join("target");
    // What the build itself takes: gcc and glibc for aarch64
    // (libc6-dev-arm64-cross also has the libc.a of the static build), and
    // what libpcap's build takes. qemu-user (the smoke tests), `file` (the
    // static check) and podman come in the background of the build.
    let mut packages = vec!["gcc-aarch64-linux-gnu", "libc6-dev-arm64-cross"];
    if libpcap::missing(&target, ARM64) {
        libpcap::fetch_source(&target)?;
        packages.extend(libpcap::packages(ARM64)?);
    }
    apt_install(&packages)?;
    ensure_rust_target(ARM64)?;
    let mut later = vec!["qemu-user", "file"];
    if toolchain::is_root() {
        later.extend(IMAGE_PACKAGES);
    }
    let checks = background(
        &format!("packages for the checks ({})", later.join(" ")),
        move || apt_install(&later),
    );
    let pcap = libpcap::static_libpcap(&target, ARM64)?;
    step(&format!("release build for {ARM64} (dist, image)"), || {
        run(cargo()
            .args(["build", "--release", "-p", "ntm-agent", "--target", ARM64])
            // Either would take precedence over the target's flags below.
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .env(
                "CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUSTFLAGS",
                "-C target-feature=+crt-static",
            )
            .env(ARM64_LINKER_VAR, ARM64_LINKER)
            .env("NTM_LIBPCAP_DIR", pcap))
    })?;
    checks.join()?;
    let path = cargo_target_dir().join(format!("{ARM64}/release/ntm-agent"));
    static_aarch64(&path)?;
    Ok(path)
}

/// Fails unless `path` is a static aarch64 executable (per `file`): FROM
/// scratch has no loader and no shared libraries.
fn static_aarch64(path: &Path) -> Result<()> {
    apt_install(&["file"])?;
    let kind = toolchain::output_of(Command::new("file").arg("-b").arg(path));
    let is_static = kind.contains("statically linked") || kind.contains("static-pie linked");
    if !kind.contains("ARM aarch64") || !is_static || kind.contains("interpreter") {
        bail!(
            "{} is not a static aarch64 executable: {}",
            path.display(),
            kind.trim()
        );
    }
    Ok(())
}

/// Builds the image for `arch`: its static binary, then the image (see
/// `image_of`); returns its name.
fn image(arch: Arch) -> Result<String> {
    ensure_ebpf_toolchain()?;
    let binary = match arch {
        Arch::Amd64 => static_amd64_binary()?,
        Arch::Arm64 => static_arm64_binary()?,
    };
    image_of(arch, &binary)
}

/// Builds the image for `arch` from deploy/image/Dockerfile (FROM scratch:
/// the static `binary` and /etc/services, no emulation needed) and checks
/// it; returns its name. The arm64 image's binary is taken out of the image
/// and run under qemu-user (no binfmt_misc needed).
fn image_of(arch: Arch, binary: &Path) -> Result<String> {
    apt_install(IMAGE_PACKAGES)?;
    // Podman refuses to start containers here unless ulimits are left alone.
    let conf = Path::new("/etc/containers/containers.conf");
    let current = std::fs::read_to_string(conf).unwrap_or_default();
    if !current.contains("default_ulimits") {
        std::fs::create_dir_all("/etc/containers")?;
        std::fs::write(
            conf,
            format!("{current}\n[containers]\ndefault_ulimits = []\n"),
        )?;
    }
    let (name, context, podman_arch) = match arch {
        Arch::Amd64 => (IMAGE, "target/image", "amd64"),
        Arch::Arm64 => (IMAGE_ARM64, "target/image-arm64", "arm64"),
    };
    let context = workspace_root().join(context);
    std::fs::create_dir_all(&context)?;
    std::fs::copy(binary, context.join("ntm-agent"))?;
    std::fs::copy("/etc/services", context.join("services"))?;
    step(&format!("image {name} (podman build, checks)"), || {
        // `-q` prints the image ID: to stderr, so that stdout is only the
        // name.
        run(podman()
            .args(["build", "-q", "--arch", podman_arch, "-t", name, "-f"])
            .arg(workspace_root().join("deploy/image/Dockerfile"))
            .arg(&context)
            .stdout(std::io::stderr()))?;
        let built = toolchain::output_of(podman().args([
            "image",
            "inspect",
            "--format",
            "{{.Architecture}}",
            name,
        ]));
        if built.trim() != podman_arch {
            bail!("{name} was built for {:?}, not {podman_arch}", built.trim());
        }
        if let Arch::Arm64 = arch {
            let version = image_binary_runs_arm64(name, &context)?;
            eprintln!("xtask: {name}: its ntm-agent runs under qemu-aarch64 ({version})");
        }
        Ok(())
    })?;
    Ok(name.to_string())
}

/// Copies ntm-agent out of the arm64 image `name` (a created, never started
/// container), checks it is static and runs it with `qemu-aarch64 BINARY
/// --version` (qemu-user called directly: no binfmt_misc needed).
fn image_binary_runs_arm64(name: &str, scratch: &Path) -> Result<String> {
    let container = format!("ntm-extract-{}", std::process::id());
    let binary = scratch.join("from-image/ntm-agent");
    std::fs::create_dir_all(binary.parent().unwrap_or(scratch))?;
    if binary.exists() {
        std::fs::remove_file(&binary)?;
    }
    run(podman()
        .args([
            "create", "-q", "--arch", "arm64", "--name", &container, name,
        ])
        .stdout(std::process::Stdio::null()))?;
    let copied = run(podman()
        .arg("cp")
        .arg(format!("{container}:/usr/local/bin/ntm-agent"))
        .arg(&binary));
    let removed = run(podman()
        .args(["rm", &container])
        .stdout(std::process::Stdio::null()));
    copied?;
    removed?;
    static_aarch64(&binary)?;
    answers_version(Command::new("qemu-aarch64").arg(&binary), &binary)
}

/// Debian packages the kernel tests drive: namespaces and veths (iproute2),
/// ICMP echo (iputils-ping), offload switches (ethtool), sysctl (procps),
/// a real Prometheus and promtool for the scrape tests (prometheus),
/// systemd-analyze for the unit file (systemd), a DHCP server and client
/// for device names (dnsmasq-base, busybox's udhcpc), bpftool to check
/// that `ntm-agent detach` leaves no program, link or pin, a headless
/// Chromium with its WebDriver for the page (chromium, chromium-driver),
/// and a Kubernetes node without an apiserver for the pod names:
/// containerd (its CRI plugin, and `ctr` to import the test's pause image),
/// runc, the CNI plugins (bridge, host-local), and gcc with glibc's static
/// libraries (libc6-dev) to build that pause program with `gcc -static`.
const TEST_PACKAGES: &[&str] = &[
    "bpftool",
    "dnsmasq-base",
    "busybox",
    "bind9-dnsutils",
    "iproute2",
    "iputils-ping",
    "ethtool",
    "procps",
    "prometheus",
    "systemd",
    "netbase",
    "chromium",
    "chromium-driver",
    "containerd",
    "runc",
    "containernetworking-plugins",
    "gcc",
    "libc6-dev",
    "nfdump",
    "pmacct",
    // Real TLS clients for the names from handshakes.
    "openssl",
    "curl",
];

/// PyPI packages the tests use, pinned: for the chart test Helm 4
/// embedded (lint and render offline) and the Kubernetes API schemas; for
/// the names from handshakes a real QUIC client (aioquic).
const PYTHON_TEST_PACKAGES: &[&str] = &[
    "aioquic==1.2.0",
    "helm-python-sdk==0.2.2",
    "kubernetes-validate==1.37.0",
    "PyYAML==6.0.4",
];

/// Mounts a bpffs at /sys/fs/bpf if none is there (systemd does it at
/// boot; a container or a minimal machine may not have one), so that ntm
/// keeps counting across its restarts. Says so, and goes on if it cannot.
fn mount_bpffs() {
    let mounted = std::fs::read_to_string("/proc/self/mounts").is_ok_and(|m| {
        m.lines()
            .any(|l| l.split(' ').nth(1) == Some("/sys/fs/bpf"))
    });
    if mounted || !Path::new("/sys/fs/bpf").is_dir() {
        return;
    }
    eprintln!(
        "xtask: mounting a bpffs at /sys/fs/bpf (mount -t bpf bpf /sys/fs/bpf), where ntm keeps counting across restarts"
    );
    let ok = Command::new("mount")
        .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("xtask: could not mount it; ntm will count only while it runs");
    }
}

/// The workspace root, so that commands work from any folder inside it.
fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new("."))
}

/// Where cargo builds: CARGO_TARGET_DIR if set (CI builds the lints and
/// the arm64 binary in folders of their own, beside the tests: see
/// `.ci/run`), else the workspace's target folder. What xtask keeps there
/// itself (libpcap, the images' contexts, the Python environment) stays in
/// the workspace's target folder, shared.
fn cargo_target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        // Relative to the workspace root, where `cargo()` runs cargo.
        Some(dir) => workspace_root().join(dir),
        None => workspace_root().join("target"),
    }
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string()));
    cmd.current_dir(workspace_root());
    cmd
}

/// A failure is one message (with its causes), never a backtrace. Each
/// task ends with how long its steps took (see steps.rs), but for `run`,
/// whose output is the agent's.
fn main() -> std::process::ExitCode {
    let start = Instant::now();
    let command = Cli::parse().command;
    let summary = !matches!(command, Task::Run { .. });
    let result = task(command);
    if summary {
        steps::summary(start);
    }
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// `cargo xtask test`: the test build first, while what only the tests take
/// (their Debian packages, the image's packages and Rust target, libpcap's
/// source, the chart test's Python environment) installs in the
/// background; then, as root, the image the image test runs; then the
/// tests. The test build is `cargo test --no-run` with the same arguments
/// as the run, which then finds it up to date, and every target (the
/// benches too); it is also the lint of the host crates (clippy, warnings
/// denied), so a lint fails the tests.
fn test(args: Vec<String>) -> Result<()> {
    ensure_ebpf_toolchain()?;
    let root = toolchain::is_root();
    let target = workspace_root().join("target");
    let prerequisites = {
        let target = target.clone();
        background("test prerequisites (packages, Python)", move || {
            if root {
                let mut packages = [TEST_PACKAGES, IMAGE_PACKAGES].concat();
                if libpcap::missing(&target, MUSL) {
                    libpcap::fetch_source(&target)?;
                    packages.extend(libpcap::packages(MUSL)?);
                }
                apt_install(&packages)?;
                ensure_rust_target(MUSL)?;
            }
            toolchain::ensure_python_env(&target.join("pyenv"), PYTHON_TEST_PACKAGES)
        })
    };
    // The workspace's crates are compiled by clippy-driver, which lints
    // them as it compiles them, warnings denied: the test build is also
    // the lint of the host crates (`cargo clippy -- -D warnings` is this
    // driver on a check build, whose check of every dependency alone cost
    // CI 6 CPU-minutes). Dependencies are compiled by rustc as before. The
    // run sets the same, so that it finds the build up to date.
    let driver = toolchain::clippy_driver(workspace_root())?;
    let cargo_test = || {
        let mut cmd = cargo();
        cmd.args(["test", "--workspace", "--exclude", "ntm-ebpf"])
            .env("RUSTC_WORKSPACE_WRAPPER", &driver)
            // How `cargo clippy -- -D warnings` hands the driver its
            // arguments.
            .env(
                "CLIPPY_ARGS",
                "-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__",
            );
        cmd
    };
    // Every target, the benches too, so that all of them are linted.
    step("test build and lint (cargo test --no-run, clippy)", || {
        run(cargo_test().args(["--no-run", "--all-targets"]).args(&args))
    })?;
    let python = prerequisites.join()?;
    // The image test runs the image built here (as root, with podman).
    let image = if root {
        Some(image(Arch::Amd64)?)
    } else {
        None
    };
    step("tests", || {
        let mut test = cargo_test();
        if let Some(image) = image {
            test.env("NTM_IMAGE", image);
        }
        run(test.env("NTM_PYTHON", python).args(&args))
    })
}

/// Clippy on the host crates, every target, warnings denied.
fn host_clippy() -> Result<()> {
    step("clippy: host crates", || {
        run(cargo().args([
            "clippy",
            "--workspace",
            "--exclude",
            "ntm-ebpf",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))
    })
}

fn task(command: Task) -> Result<()> {
    match command {
        Task::Setup => ensure_ebpf_toolchain(),
        Task::Build => {
            ensure_ebpf_toolchain()?;
            release_build()
        }
        Task::Run { args } => {
            ensure_ebpf_toolchain()?;
            release_build()?;
            if !toolchain::is_root() {
                eprintln!(
                    "xtask: ntm-agent needs root (or CAP_BPF + CAP_NET_ADMIN + CAP_PERFMON); it will say so if it cannot load"
                );
            } else {
                mount_bpffs();
            }
            run(Command::new(cargo_target_dir().join("release/ntm-agent")).args(args))
        }
        Task::Test { args } => test(args),
        Task::Dist { arch } => dist(arch),
        Task::Image { arch } => image(arch).map(|name| println!("{name}")),
        Task::Bench => {
            ensure_ebpf_toolchain()?;
            step("benches", || {
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
                    "--bench",
                    "names",
                    "--bench",
                    "restart",
                    "--bench",
                    "flows",
                    "--bench",
                    "history",
                    "--bench",
                    "kubernetes",
                    "--bench",
                    "ipfix",
                ]))
            })
        }
        Task::Clippy { ebpf_only } => {
            ensure_ebpf_toolchain()?;
            if !ebpf_only {
                host_clippy()?;
            }
            step("clippy: eBPF crate (nightly)", || {
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
            })
        }
    }
}
