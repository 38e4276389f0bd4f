//! Checks, and installs where it can, what building ntm-agent needs on a
//! fresh Debian machine: nightly Rust with rust-src, LLVM 22's development
//! files, and bpf-linker built against them for the eBPF side; libpcap's
//! development files for the agent's packet filters; protoc for the CRI's
//! gRPC types; clippy, which the test build lints with. Says what it does,
//! and what to do where it cannot.

use std::{
    fs::File,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::steps::{background, step};

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

/// The lock `apt-get update` takes: it does not wait for it, whatever
/// `DPkg::Lock::Timeout` says (apt 2.6 fails at once).
const APT_UPDATE_LOCKS: [&str; 1] = ["/var/lib/apt/lists/lock"];

/// The locks `apt-get install` takes, in the order it takes them.
const APT_INSTALL_LOCKS: [&str; 3] = [
    "/var/lib/dpkg/lock-frontend",
    "/var/lib/dpkg/lock",
    "/var/cache/apt/archives/lock",
];

/// How long to wait for apt's locks: on a fresh cloud machine
/// unattended-upgrades holds them for minutes after boot, and failing at
/// once would leave the setup half done.
const APT_LOCK_TIMEOUT: Duration = Duration::from_secs(600);

/// A process that holds a lock.
#[derive(Debug, PartialEq, Eq)]
pub struct LockHolder {
    /// None for an open file description lock, which has no owner pid.
    pub pid: Option<u32>,
    /// Its command name, as /proc has it.
    pub command: Option<String>,
}

impl std::fmt::Display for LockHolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.command, self.pid) {
            (Some(command), Some(pid)) => write!(f, "{command} (pid {pid})"),
            (None, Some(pid)) => write!(f, "pid {pid}"),
            _ => f.write_str("another process"),
        }
    }
}

/// Who holds an fcntl lock on `path` that would keep this process from
/// taking a write lock on it (as apt and dpkg do), if anyone does; None
/// also when the file cannot be opened (then apt says why itself).
pub fn fcntl_lock_holder(path: &Path) -> Option<LockHolder> {
    let file = File::open(path).ok()?;
    // SAFETY: `flock` is a plain C struct; all zeroes is a valid value.
    let mut probe: libc::flock = unsafe { std::mem::zeroed() };
    probe.l_type = libc::F_WRLCK as _;
    probe.l_whence = libc::SEEK_SET as _;
    // l_start 0 and l_len 0: the whole file.
    // SAFETY: F_GETLK reads and writes only `probe`, which outlives the
    // call, on a descriptor that stays open until `file` is dropped.
    let result = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETLK, &mut probe) };
    if result != 0 || probe.l_type == libc::F_UNLCK as _ {
        return None;
    }
    let pid = u32::try_from(probe.l_pid).ok().filter(|pid| *pid > 0);
    let command = pid.and_then(|pid| {
        std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .ok()
            .map(|name| name.trim().to_string())
    });
    Some(LockHolder { pid, command })
}

/// Waits, for [`APT_LOCK_TIMEOUT`] at most, until no other process holds
/// any of `locks`, saying who holds one: apt itself waits silently, or
/// not at all. Past the timeout apt runs anyway and says what it cannot
/// lock.
fn wait_for_apt_locks(locks: &[&str]) {
    let deadline = Instant::now() + APT_LOCK_TIMEOUT;
    let mut said: Option<String> = None;
    loop {
        let held = locks
            .iter()
            .find_map(|path| Some((*path, fcntl_lock_holder(Path::new(path))?)));
        let Some((path, holder)) = held else {
            if said.is_some() {
                eprintln!("xtask: apt's locks are free, going on");
            }
            return;
        };
        if Instant::now() >= deadline {
            return;
        }
        let waiting = format!(
            "xtask: waiting (up to {} min) for the apt/dpkg lock {path}, held by {holder}",
            APT_LOCK_TIMEOUT.as_secs() / 60
        );
        if said.as_ref() != Some(&waiting) {
            eprintln!("{waiting}");
            said = Some(waiting);
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Whether this process ran `apt-get update` since apt's sources last
/// changed. Once is enough: each run costs seconds on a fresh machine, and
/// a task installs in several calls (toolchain, test packages, image,
/// cross compilers). The mutex also keeps this process's apt runs (from a
/// background step and the task) one at a time.
static APT_LISTS_FRESH: Mutex<bool> = Mutex::new(false);

/// Says that apt's sources changed (deb-src entries added): the next apt
/// run updates its lists again.
pub fn apt_sources_changed() {
    *APT_LISTS_FRESH
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner()) = false;
}

/// Runs `f` with apt to itself among xtask's processes and threads: CI
/// runs the lints and the arm64 build beside the tests (see `.ci/run`),
/// each an xtask that may install packages or add apt's deb-src entries,
/// and two `apt-get update`s or two edits of the sources at once would
/// fail or collide. (apt's own locks, waited for above, keep other
/// programs out; they do not make a check-then-change of ours atomic.)
pub fn apt_exclusive<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    static IN_PROCESS: Mutex<()> = Mutex::new(());
    let _thread = IN_PROCESS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let path = std::env::temp_dir().join("ntm-xtask-apt.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("could not open {}", path.display()))?;
    // SAFETY: flock on a descriptor this function owns; it is released
    // when `file` closes at the end of this function.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
        bail!(
            "could not lock {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    f()
}

/// Runs `f` (apt-get commands) once apt's lists are up to date: runs
/// `apt-get update` first unless this process did since the sources last
/// changed. Callers hold [`apt_exclusive`].
pub fn with_apt_lists<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    let mut fresh = APT_LISTS_FRESH
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if !*fresh {
        wait_for_apt_locks(&APT_UPDATE_LOCKS);
        run(Command::new("apt-get").args(["-o", &apt_lock_timeout(), "update", "-qq"]))?;
        *fresh = true;
    }
    f()
}

/// Also passed to apt: another process may take a lock between the wait
/// here and apt's own try.
fn apt_lock_timeout() -> String {
    format!("DPkg::Lock::Timeout={}", APT_LOCK_TIMEOUT.as_secs())
}

fn is_installed(package: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]))
        .is_some_and(|s| s.contains("install ok installed"))
}

/// The packages of `packages` that are not installed.
fn not_installed<'a>(packages: &[&'a str]) -> Vec<&'a str> {
    packages
        .iter()
        .copied()
        .filter(|p| !is_installed(p))
        .collect()
}

/// Installs Debian packages that are missing, in one apt-get run. Needs
/// root (no sudo here).
pub fn apt_install(packages: &[&str]) -> Result<()> {
    let missing = not_installed(packages);
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
    let what = if missing.len() <= 3 {
        missing.join(" ")
    } else {
        format!("{} packages", missing.len())
    };
    step(&format!("apt-get install {what}"), || {
        eprintln!(
            "xtask: installing Debian packages: {} (apt-get)",
            missing.join(" ")
        );
        apt_exclusive(|| {
            with_apt_lists(|| {
                // Another apt run (this process's or another xtask's) may have
                // installed some.
                let missing = not_installed(&missing);
                if missing.is_empty() {
                    return Ok(());
                }
                wait_for_apt_locks(&APT_INSTALL_LOCKS);
                run(Command::new("apt-get")
                    .args(["-o", &apt_lock_timeout()])
                    .args(["install", "-y", "-qq", "--no-install-recommends"])
                    .args(&missing)
                    .env("DEBIAN_FRONTEND", "noninteractive"))
            })
        })
    })
}

/// Whether rustup lacks the nightly toolchain or its rust-src.
fn nightly_missing() -> bool {
    if !succeeds(Command::new("rustc").args(["+nightly", "--version"])) {
        return true;
    }
    let components = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .unwrap_or_default();
    !components.lines().any(|l| l.starts_with("rust-src"))
}

fn install_nightly_rust_src() -> Result<()> {
    if !succeeds(Command::new("rustc").args(["+nightly", "--version"])) {
        eprintln!("xtask: installing the nightly Rust toolchain (rustup) for the eBPF build");
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    eprintln!("xtask: adding rust-src to nightly (the eBPF build compiles core itself)");
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

fn warn_on_llvm_mismatch() {
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

/// Builds bpf-linker against LLVM's development files (installed by then).
fn build_bpf_linker() -> Result<()> {
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
        .env("LLVM_PREFIX", &prefix)
        // bpf-linker's release profile has full debug info, which nothing
        // here reads: without it the build takes a third less (measured:
        // 57 s and 107 s of CPU, against 86 s and 162 s, on 2 cores), the
        // first step of a fresh CI run, which nothing else runs beside.
        .env("CARGO_PROFILE_RELEASE_DEBUG", "false"))
    .context("building bpf-linker failed; see the output above")?;
    if !bpf_linker_ok() {
        bail!(
            "bpf-linker was built but {} does not run; check LLVM {LLVM_MAJOR} is installed",
            cargo_bin_dir().join("bpf-linker").display()
        );
    }
    Ok(())
}

/// Everything building ntm-agent needs: the eBPF toolchain, libpcap (the
/// agent links it to compile filter expressions) and protoc. Every task
/// that builds (setup, build, run, test, bench, clippy, dist for either
/// architecture, image) comes through here. Cheap when all is in place.
///
/// On a fresh machine: rustup's nightly downloads run in the background of
/// apt's installs and bpf-linker's build, and the Debian packages come in
/// one apt run.
///
/// protoc: k8s-cri (the container runtime's CRI, which the agent reads
/// pods from) generates its gRPC types from the CRI's .proto files in its
/// build script, with prost-build, which runs protoc and bundles none.
/// Build scripts run on the build machine, so the host's protoc serves the
/// arm64 and musl builds too. PROTOC is not set: prost-build runs `protoc`
/// from PATH when it is unset, and Debian's protobuf-compiler puts it in
/// /usr/bin, so a plain `cargo build` finds the same protoc as xtask's
/// builds (PROTOC would only be needed for a protoc off PATH).
pub fn ensure_ebpf_toolchain() -> Result<()> {
    let nightly = nightly_missing().then(|| {
        background(
            "nightly Rust with rust-src (rustup)",
            install_nightly_rust_src,
        )
    });
    let build_linker = !bpf_linker_ok();
    let llvm = [
        format!("llvm-{LLVM_MAJOR}-dev"),
        format!("libpolly-{LLVM_MAJOR}-dev"),
    ];
    let mut packages = vec!["libpcap-dev", "protobuf-compiler"];
    if build_linker {
        packages.extend(llvm.iter().map(String::as_str));
    }
    apt_install(&packages).context(
        "ntm-agent links libpcap (libpcap-dev) and builds the CRI's gRPC types with protoc (protobuf-compiler); bpf-linker is built against LLVM's development files",
    )?;
    if build_linker {
        step("bpf-linker build (cargo install)", build_bpf_linker)?;
    }
    if let Some(nightly) = nightly {
        nightly.join()?;
    }
    warn_on_llvm_mismatch();
    Ok(())
}

/// The stable toolchain's clippy-driver (rustup's clippy component, added
/// if missing), which `cargo xtask test` compiles the workspace's crates
/// with so that the test build is also the lint.
pub fn clippy_driver(workspace: &Path) -> Result<PathBuf> {
    let which = || {
        output(
            Command::new("rustup")
                .args(["which", "clippy-driver"])
                .current_dir(workspace),
        )
        .map(|path| PathBuf::from(path.trim()))
    };
    if let Some(driver) = which() {
        return Ok(driver);
    }
    eprintln!("xtask: adding clippy to the Rust toolchain (rustup): the test build lints with it");
    run(Command::new("rustup")
        .args(["component", "add", "clippy"])
        .current_dir(workspace))?;
    which().context("rustup added clippy, but `rustup which clippy-driver` still finds none")
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
    step("Python environment (venv, pip install)", || {
        eprintln!(
            "xtask: preparing a Python environment for the tests in {} ({})",
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
        std::fs::write(&stamp, &wanted)?;
        Ok(())
    })?;
    Ok(python)
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead as _, BufReader};

    use super::*;

    /// A lock taken with fcntl by another process (as apt takes its own)
    /// is found, with that process's pid; none on a free or absent file.
    #[test]
    fn finds_the_process_holding_an_fcntl_lock() {
        let dir = std::env::temp_dir().join(format!("xtask-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("lock-frontend");
        std::fs::write(&path, "").unwrap();
        assert_eq!(fcntl_lock_holder(&path), None, "free");
        assert_eq!(fcntl_lock_holder(&dir.join("absent")), None, "absent");

        // Python's lockf is fcntl(F_SETLKW); the holder sleeps at most 30 s.
        let holder = Command::new("python3")
            .args([
                "-c",
                "import fcntl, sys, time\n\
                 f = open(sys.argv[1], 'r+')\n\
                 fcntl.lockf(f, fcntl.LOCK_EX)\n\
                 print('locked', flush=True)\n\
                 time.sleep(30)",
            ])
            .arg(&path)
            .stdout(Stdio::piped())
            .spawn();
        let Ok(mut holder) = holder else {
            eprintln!("skipped: python3 is needed to hold a lock from another process");
            return;
        };
        let mut line = String::new();
        if let Some(out) = holder.stdout.take() {
            BufReader::new(out).read_line(&mut line).unwrap();
        }
        let found = fcntl_lock_holder(&path);
        let _ = holder.kill();
        let _ = holder.wait();
        assert_eq!(line.trim(), "locked");
        let found = found.expect("the lock is found");
        assert_eq!(found.pid, Some(holder.id()));
        assert!(found.command.is_some(), "{found:?}");
        assert_eq!(fcntl_lock_holder(&path), None, "released with its holder");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
