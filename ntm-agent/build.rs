//! Builds the kernel programs (ntm-ebpf) for the bpf target and leaves the
//! objects in OUT_DIR, where `src/kernel/load.rs` (and the benches) embed
//! them.
//!
//! The eBPF build is built once per target architecture and shared by
//! every build of the agent: it goes to target/ebpf/<arch>, outside this
//! build's OUT_DIR, so that the test build, clippy, the release build and
//! the musl image (all x86_64) find it up to date (cargo's own fingerprints
//! there; about a second), and only an arm64 build compiles it again.
//! aya-build's `build_ebpf`, which this follows otherwise (same command, same
//! flags), builds into OUT_DIR: every profile and target of the agent then
//! compiled core and the programs again, about 45 s each, four times in a
//! CI run. The architecture matters: aya-ebpf picks its kernel bindings and
//! the pt_regs accessors of kprobes and uprobes by `bpf_target_arch`, so an
//! arm64 agent must not embed the x86_64 build.
//!
//! Needs nightly's rust-src and bpf-linker; `cargo xtask` installs both (see
//! README). Set AYA_BUILD_SKIP=1 to skip.
//!
//! Also chooses how libpcap is linked: the machine's shared library
//! (libpcap-dev) by default, or a static libpcap.a from NTM_LIBPCAP_DIR,
//! which `cargo xtask image` (musl) and `cargo xtask dist --arch arm64` build
//! for their target and set.
use std::{
    env,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

/// The binaries of ntm-ebpf that are embedded: the agent's programs (`ntm`)
/// and the benches' minimal counter (`ntm-bench-baseline`).
const PROGRAMS: [&str; 2] = ["ntm", "ntm-bench-baseline"];

fn main() -> anyhow::Result<()> {
    link_libpcap()?;
    build_ebpf()
}

fn build_ebpf() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    if matches!(env::var("AYA_BUILD_SKIP").as_deref(), Ok("1" | "true")) {
        println!("cargo:warning=AYA_BUILD_SKIP is set: the eBPF programs are not built");
        return Ok(());
    }
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let ebpf = manifest.join("../ntm-ebpf");
    // What the programs are built from, and bpf-linker, which links them:
    // cargo reruns this script when one changes, and the nested build then
    // rebuilds what changed. (Not a build dependency on ntm-ebpf, as in
    // aya's template: that compiled ntm-ebpf's library, aya-ebpf and
    // aya-build for the host, in the test, clippy and release builds each,
    // only to get this rerun.)
    for path in [
        "../ntm-ebpf",
        "../ntm-common",
        "../Cargo.toml",
        "../Cargo.lock",
    ] {
        println!("cargo:rerun-if-changed={}", manifest.join(path).display());
    }
    if let Some(linker) = env::var_os("PATH").and_then(|path| {
        env::split_paths(&path)
            .map(|dir| dir.join("bpf-linker"))
            .find(|linker| linker.is_file())
    }) {
        println!("cargo:rerun-if-changed={}", linker.display());
    }

    let target = match env::var("CARGO_CFG_TARGET_ENDIAN")?.as_str() {
        "little" => "bpfel-unknown-none",
        "big" => "bpfeb-unknown-none",
        other => bail!("no bpf target for endianness {other}"),
    };
    let arch = env::var("CARGO_CFG_TARGET_ARCH")?;
    // The workspace's target folder, whatever this build's is, so that all
    // builds for one architecture share it.
    let target_dir = manifest.join("../target/ebpf").join(&arch);
    let rustflags = [
        format!("--cfg=bpf_target_arch=\"{arch}\""),
        "-Cdebuginfo=2".to_string(),
        // BTF maps need the object's BTF (see the toolchain notes).
        "-Clink-arg=--btf".to_string(),
    ]
    .join("\x1f");

    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo", "build", "--quiet", "--release"])
        .args(["--package", "ntm-ebpf", "--bins", "--target", target])
        .args(["-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(&target_dir)
        .current_dir(&ebpf)
        .env("CARGO_ENCODED_RUSTFLAGS", rustflags)
        // Set by the outer cargo for the stable toolchain (and by clippy to
        // its driver): the nested build must use nightly's rustc.
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| {
        format!("could not start {cmd:?} (rustup and nightly: cargo xtask setup)")
    })?;
    // With --quiet, stderr has only the compiler's diagnostics: shown as
    // warnings of this build (and in full if it fails).
    if let Some(stderr) = child.stderr.take() {
        for line in BufReader::new(stderr).lines() {
            println!("cargo:warning={}", line?);
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("building the eBPF programs failed ({status}): {cmd:?}");
    }
    let built = target_dir.join(target).join("release");
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    for program in PROGRAMS {
        copy(&built.join(program), &out_dir.join(program))?;
    }
    Ok(())
}

fn copy(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::copy(from, to)
        .map(drop)
        .with_context(|| format!("could not copy {} to {}", from.display(), to.display()))
}

fn link_libpcap() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=NTM_LIBPCAP_DIR");
    let target =
        std::env::var("TARGET").map_err(|e| anyhow::anyhow!("TARGET is not set by cargo ({e})"))?;
    match std::env::var("NTM_LIBPCAP_DIR") {
        Ok(dir) if !dir.is_empty() => {
            let lib = std::path::Path::new(&dir).join("libpcap.a");
            if !lib.is_file() {
                anyhow::bail!(
                    "NTM_LIBPCAP_DIR={dir}, but {} does not exist",
                    lib.display()
                );
            }
            println!("cargo:rerun-if-changed={}", lib.display());
            println!("cargo:rustc-link-search=native={dir}");
            println!("cargo:rustc-link-lib=static=pcap");
        }
        _ if target.contains("musl") => anyhow::bail!(
            "{target} needs a static libpcap built for musl, which the machine's libpcap-dev is not: build with `cargo xtask image` (it builds one and sets NTM_LIBPCAP_DIR), or set NTM_LIBPCAP_DIR to a folder holding a musl libpcap.a"
        ),
        // The machine's libpcap (libpcap-dev), linked dynamically through
        // #[link(name = "pcap")] in src/filter/pcap.rs.
        _ => {}
    }
    Ok(())
}
