//! Checks, and installs where it can, what building ntm-agent needs on a
//! fresh Debian machine: nightly Rust with rust-src, LLVM 22's development
//! files, and bpf-linker built against them for the eBPF side; libpcap's
//! development files for the agent's packet filters. Says what it does, and
//! what to do where it cannot.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

/// bpf-linker must link with the same LLVM major version as nightly rustc.
const LLVM_MAJOR: &str = "22";
const BPF_LINKER_VERSION: &str = "0.13.0";

fn llvm_prefix() -> PathBuf {
    PathBuf::from(format!("/usr/lib/llvm-{LLVM_MAJOR}"))
}

fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.stderr(Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A command's standard output ("" if it fails).
pub fn output_of(cmd: &mut Command) -> String {
    output(cmd).unwrap_or_default()
}

pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("could not start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

pub fn is_root() -> bool {
    output(Command::new("id").arg("-u")).is_some_and(|uid| uid.trim() == "0")
}

/// Installs Debian packages that are missing. Needs root (no sudo here).
pub fn apt_install(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            !output(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                .is_some_and(|s| s.contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing Debian packages {}: install them as root (apt-get install -y {}) and run this again",
            missing.join(" "),
            missing.join(" ")
        );
    }
    eprintln!(
        "xtask: installing Debian packages: {} (apt-get)",
        missing.join(" ")
    );
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn ensure_nightly_rust_src() -> Result<()> {
    let has_nightly = succeeds(Command::new("rustc").args(["+nightly", "--version"]));
    if !has_nightly {
        eprintln!("xtask: installing the nightly Rust toolchain (rustup) for the eBPF build");
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    let components = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .unwrap_or_default();
    if !components.lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("xtask: adding rust-src to nightly (the eBPF build compiles core itself)");
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    let verbose = output(Command::new("rustc").args(["+nightly", "--version", "--verbose"]))
        .unwrap_or_default();
    if let Some(llvm) = verbose
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        && !llvm.starts_with(&format!("{LLVM_MAJOR}."))
    {
        eprintln!(
            "xtask: warning: nightly rustc uses LLVM {llvm}, bpf-linker uses LLVM {LLVM_MAJOR}; if linking the eBPF object fails, pin a nightly with LLVM {LLVM_MAJOR}"
        );
    }
    Ok(())
}

fn cargo_bin_dir() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
        .join("bin")
}

fn bpf_linker_ok() -> bool {
    let linker = cargo_bin_dir().join("bpf-linker");
    output(Command::new(&linker).arg("--version")).is_some_and(|v| v.contains(BPF_LINKER_VERSION))
}

fn ensure_bpf_linker() -> Result<()> {
    if bpf_linker_ok() {
        return Ok(());
    }
    apt_install(&[
        &format!("llvm-{LLVM_MAJOR}-dev"),
        &format!("libpolly-{LLVM_MAJOR}-dev"),
    ])?;
    eprintln!(
        "xtask: building bpf-linker {BPF_LINKER_VERSION} against LLVM {LLVM_MAJOR} (about a minute, once)"
    );
    let prefix = llvm_prefix();
    let path = format!(
        "{}:{}",
        prefix.join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    run(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--no-default-features",
            "--features",
            &format!("llvm-{LLVM_MAJOR}"),
        ])
        .env("PATH", path)
        .env("LLVM_PREFIX", &prefix))
    .context("building bpf-linker failed; see the output above")?;
    if !bpf_linker_ok() {
        bail!(
            "bpf-linker was built but {} does not run; check LLVM {LLVM_MAJOR} is installed",
            cargo_bin_dir().join("bpf-linker").display()
        );
    }
    Ok(())
}

/// Everything building ntm-agent needs: the eBPF toolchain, and libpcap
/// (the agent links it to compile filter expressions). Cheap when all is in
/// place.
pub fn ensure_ebpf_toolchain() -> Result<()> {
    ensure_nightly_rust_src()?;
    ensure_bpf_linker()?;
    apt_install(&["libpcap-dev"]).context("ntm-agent links libpcap (libpcap-dev)")
}

/// A Python virtual environment at `dir` with `packages` (pinned) installed;
/// returns its interpreter. Cheap when it is already there.
pub fn ensure_python_env(dir: &std::path::Path, packages: &[&str]) -> Result<PathBuf> {
    let python = dir.join("bin/python");
    let stamp = dir.join("ntm-packages.txt");
    let wanted = packages.join("\n");
    if python.exists() && std::fs::read_to_string(&stamp).is_ok_and(|s| s == wanted) {
        return Ok(python);
    }
    eprintln!(
        "xtask: preparing a Python environment for the chart test in {} ({})",
        dir.display(),
        packages.join(" ")
    );
    run(Command::new("python3").args(["-m", "venv"]).arg(dir))
        .context("python3 -m venv failed; install python3 and python3-venv")?;
    run(Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args(packages))?;
    std::fs::write(&stamp, wanted)?;
    Ok(python)
}
