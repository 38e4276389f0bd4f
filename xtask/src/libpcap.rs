//! A static libpcap.a for the targets whose binary cannot use the machine's
//! shared libpcap: the static musl binary of the image and the arm64
//! cross-build. Built from Debian's source package (fetched with apt, so the
//! archive signatures are checked), without optional dependencies (no
//! D-Bus, RDMA, USB, Bluetooth, netmap, libnl, DPDK), and kept in
//! target/libpcap/<triple>/ so that later runs only link it.
//!
//! No package mirror is named here: the deb-src entries apt needs are derived
//! at run time from the machine's own Debian sources.

use std::{
    collections::BTreeSet,
    fs::File,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::{
    steps::step,
    toolchain::{apt_exclusive, apt_install, apt_sources_changed, is_root, run, with_apt_lists},
};

/// The Debian archive entries of a standard Debian install (deb822).
const DEBIAN_SOURCES: &str = "/etc/apt/sources.list.d/debian.sources";
/// The deb-src entries xtask writes when the machine has none.
const NTM_SOURCES: &str = "/etc/apt/sources.list.d/ntm-debian-src.sources";

/// How to configure libpcap for one Rust target.
struct Cross {
    /// autoconf's --host.
    host: &'static str,
    cc: &'static str,
    /// Debian packages providing the compiler and C library.
    packages: &'static [&'static str],
}

fn cross(triple: &str) -> Result<Cross> {
    Ok(match triple {
        "x86_64-unknown-linux-musl" => Cross {
            host: "x86_64-linux-musl",
            cc: "musl-gcc",
            packages: &["musl-tools", "linux-libc-dev"],
        },
        "aarch64-unknown-linux-gnu" => Cross {
            host: "aarch64-linux-gnu",
            cc: "aarch64-linux-gnu-gcc",
            packages: &["gcc-aarch64-linux-gnu", "libc6-dev-arm64-cross"],
        },
        _ => bail!("no recipe for a static libpcap for {triple}"),
    })
}

/// The Debian packages building libpcap for `triple` takes: the build tools
/// and the target's compiler and C library.
pub fn packages(triple: &str) -> Result<Vec<&'static str>> {
    let mut packages = vec!["flex", "bison", "make"];
    packages.extend(cross(triple)?.packages);
    Ok(packages)
}

/// Whether `static_libpcap` has to build libpcap for `triple`.
pub fn missing(target: &Path, triple: &str) -> bool {
    !target
        .join("libpcap")
        .join(triple)
        .join("libpcap.a")
        .is_file()
}

/// libpcap's source, downloaded into `target` unless it is there: what
/// building it needs from the network besides `packages`, so that it can
/// be fetched ahead, in the background of a build.
pub fn fetch_source(target: &Path) -> Result<PathBuf> {
    source_tarball(&target.join("libpcap/src"))
}

/// The folder holding libpcap.a for `triple` (for NTM_LIBPCAP_DIR), built
/// under `target` (the workspace's target folder) unless already there.
pub fn static_libpcap(target: &Path, triple: &str) -> Result<PathBuf> {
    let out = target.join("libpcap").join(triple);
    if !missing(target, triple) {
        return Ok(out);
    }
    let tarball = fetch_source(target)?;
    apt_install(&packages(triple)?)?;
    step(
        &format!("static libpcap for {triple} (configure, make)"),
        || build(&tarball, &out, triple),
    )?;
    Ok(out)
}

fn build(tarball: &Path, out: &Path, triple: &str) -> Result<()> {
    let cross = cross(triple)?;
    eprintln!(
        "xtask: building a static libpcap for {triple} from {} (about a minute, once)",
        tarball.display()
    );
    let build = out.join("build");
    if build.exists() {
        std::fs::remove_dir_all(&build)
            .with_context(|| format!("could not remove {}", build.display()))?;
    }
    let src = build.join("src");
    std::fs::create_dir_all(&src)?;
    run(Command::new("tar")
        .arg("xf")
        .arg(tarball)
        .arg("-C")
        .arg(&src)
        .arg("--strip-components=1"))?;

    let mut cflags = "-O2 -fPIC".to_string();
    if triple.contains("musl") {
        // musl-gcc sees only musl's headers; libpcap also needs the kernel's
        // uapi headers, which Debian keeps with glibc's. -idirafter keeps
        // musl's own headers first.
        let kinc = build.join("kinc");
        std::fs::create_dir_all(&kinc)?;
        for (name, dir) in [
            ("linux", "/usr/include/linux"),
            ("asm-generic", "/usr/include/asm-generic"),
            ("asm", "/usr/include/x86_64-linux-gnu/asm"),
        ] {
            if !Path::new(dir).is_dir() {
                bail!("{dir} is missing: install linux-libc-dev");
            }
            std::os::unix::fs::symlink(dir, kinc.join(name))?;
        }
        cflags.push_str(&format!(" -idirafter {}", kinc.display()));
    }

    logged(
        Command::new("./configure")
            .current_dir(&src)
            .arg(format!("--host={}", cross.host))
            .arg(format!("CC={}", cross.cc))
            .arg(format!("CFLAGS={cflags}"))
            .args([
                "--disable-shared",
                "--disable-usb",
                "--disable-netmap",
                "--disable-bluetooth",
                "--disable-dbus",
                "--disable-rdma",
                "--without-libnl",
                "--without-dpdk",
            ]),
        &build.join("configure.log"),
    )?;
    let jobs = std::thread::available_parallelism().map_or(1, |n| n.get());
    logged(
        Command::new("make")
            .current_dir(&src)
            .arg(format!("-j{jobs}"))
            .arg("libpcap.a"),
        &build.join("make.log"),
    )?;
    // Copy then rename, so that an interrupted run leaves no half library.
    let partial = out.join("libpcap.a.partial");
    std::fs::copy(src.join("libpcap.a"), &partial)?;
    std::fs::rename(&partial, out.join("libpcap.a"))?;
    std::fs::remove_dir_all(&build)?;
    Ok(())
}

/// Runs `cmd` with its output in `log`; on failure, says where to look.
fn logged(cmd: &mut Command, log: &Path) -> Result<()> {
    let file = File::create(log)?;
    cmd.stdout(file.try_clone()?).stderr(file);
    run(cmd).with_context(|| format!("building libpcap failed; see {}", log.display()))
}

/// libpcap's upstream tarball (libpcap_<version>.orig.tar.*) in `dir`,
/// downloaded with `apt-get source` unless already there.
fn source_tarball(dir: &Path) -> Result<PathBuf> {
    if let Some(found) = find_orig(dir) {
        return Ok(found);
    }
    if !is_root() {
        bail!(
            "the static libpcap is built from Debian's source package, and fetching it needs root (it adds deb-src entries to apt and runs apt-get update); run this as root once, or put libpcap_<version>.orig.tar.gz in {}",
            dir.display()
        );
    }
    apt_exclusive(|| {
        // Another xtask may have fetched it meanwhile.
        if let Some(found) = find_orig(dir) {
            return Ok(found);
        }
        if ensure_deb_src()? {
            apt_sources_changed();
        }
        eprintln!("xtask: downloading libpcap's Debian source package (apt-get source)");
        std::fs::create_dir_all(dir)?;
        // apt's lists must have the deb-src entries: updated (once) after
        // they were added.
        with_apt_lists(|| {
            run(Command::new("apt-get").current_dir(dir).args([
                "source",
                "--download-only",
                "-qq",
                "libpcap",
            ]))
        })
        .context("apt-get source libpcap failed; check the deb-src entries apt uses")?;
        find_orig(dir).with_context(|| {
            format!(
                "apt-get source left no libpcap_*.orig.tar.* in {}",
                dir.display()
            )
        })
    })
}

fn find_orig(dir: &Path) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.starts_with("libpcap_") && n.contains(".orig.tar.") && !n.ends_with(".asc")
            })
        })
        .collect();
    found.sort();
    found.pop()
}

/// One deb822 stanza: its lines, and its fields (continuation lines folded).
struct Stanza {
    lines: Vec<String>,
    types: Vec<String>,
    uris: Vec<String>,
    enabled: bool,
}

fn stanzas(text: &str) -> Vec<Stanza> {
    let mut out = Vec::new();
    let mut lines: Vec<String> = Vec::new();
    for line in text.lines().chain(std::iter::once("")) {
        if !line.trim().is_empty() {
            lines.push(line.to_string());
            continue;
        }
        if lines.is_empty() {
            continue;
        }
        let mut stanza = Stanza {
            lines: std::mem::take(&mut lines),
            types: Vec::new(),
            uris: Vec::new(),
            enabled: true,
        };
        // Field values, continuation lines appended to the field before.
        let mut fields: Vec<(String, String)> = Vec::new();
        for l in &stanza.lines {
            if l.starts_with('#') {
                continue;
            }
            if l.starts_with([' ', '\t']) {
                if let Some((_, v)) = fields.last_mut() {
                    v.push(' ');
                    v.push_str(l.trim());
                }
            } else if let Some((k, v)) = l.split_once(':') {
                fields.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
            }
        }
        for (k, v) in fields {
            let words = v.split_whitespace().map(str::to_string);
            match k.as_str() {
                "types" => stanza.types.extend(words),
                "uris" => stanza.uris.extend(words.map(|u| normalize(&u))),
                "enabled" => stanza.enabled = v.eq_ignore_ascii_case("yes"),
                _ => {}
            }
        }
        if !stanza.types.is_empty() {
            out.push(stanza);
        }
    }
    out
}

fn normalize(uri: &str) -> String {
    uri.trim_end_matches('/').to_string()
}

/// URIs apt already has deb-src entries for, in any file but ours.
fn deb_src_uris() -> BTreeSet<String> {
    let mut uris = BTreeSet::new();
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        files.extend(dir.filter_map(|e| e.ok().map(|e| e.path())));
    }
    for file in files {
        if file == Path::new(NTM_SOURCES) {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        match file.extension().and_then(|e| e.to_str()) {
            Some("sources") => {
                for s in stanzas(&text) {
                    if s.enabled && s.types.iter().any(|t| t == "deb-src") {
                        uris.extend(s.uris);
                    }
                }
            }
            // One-line format: deb-src [options] URI suite components
            _ if file.extension().is_none_or(|e| e == "list") => {
                for line in text.lines() {
                    let mut words = line.split_whitespace();
                    if words.next() != Some("deb-src") {
                        continue;
                    }
                    let mut rest = words.skip_while(|w| !w.contains("://"));
                    if let Some(uri) = rest.next() {
                        uris.insert(normalize(uri.trim_start_matches('[')));
                    }
                }
            }
            _ => {}
        }
    }
    uris
}

/// Makes sure apt has deb-src entries for the Debian archive: the `deb`
/// stanzas of debian.sources, written again as `deb-src` to NTM_SOURCES,
/// where the machine does not have them already. Returns whether it changed
/// apt's sources.
fn ensure_deb_src() -> Result<bool> {
    let text = std::fs::read_to_string(DEBIAN_SOURCES).with_context(|| {
        format!(
            "could not read {DEBIAN_SOURCES}, from which xtask derives the deb-src entries for libpcap's source; add deb-src entries for the Debian archive to apt yourself and run this again"
        )
    })?;
    let have = deb_src_uris();
    let mut wanted = String::new();
    for s in stanzas(&text) {
        if !s.enabled || !s.types.iter().any(|t| t == "deb") {
            continue;
        }
        if !s.uris.is_empty() && s.uris.iter().all(|u| have.contains(u)) {
            continue;
        }
        if !wanted.is_empty() {
            wanted.push('\n');
        }
        for line in &s.lines {
            if line.to_ascii_lowercase().starts_with("types:") {
                wanted.push_str("Types: deb-src\n");
            } else {
                wanted.push_str(line);
                wanted.push('\n');
            }
        }
    }
    let ours = Path::new(NTM_SOURCES);
    if wanted.is_empty() {
        if have.is_empty() {
            bail!(
                "{DEBIAN_SOURCES} has no deb entries to derive deb-src entries from; add deb-src entries for the Debian archive to apt yourself and run this again"
            );
        }
        // Covered elsewhere; an old copy of ours would only duplicate it
        // (its removal leaves apt's lists as good as they were).
        if ours.exists() {
            std::fs::remove_file(ours)?;
        }
        return Ok(false);
    }
    let content = format!(
        "# Written by `cargo xtask` (ntm) from {DEBIAN_SOURCES}: the same archives,\n# for source packages (libpcap for static builds).\n{wanted}"
    );
    if std::fs::read_to_string(ours).ok().as_deref() != Some(content.as_str()) {
        eprintln!(
            "xtask: adding deb-src entries for the Debian archive to apt ({NTM_SOURCES}, derived from {DEBIAN_SOURCES})"
        );
        std::fs::write(ours, content).with_context(|| format!("could not write {NTM_SOURCES}"))?;
        return Ok(true);
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_deb822() {
        let text = "Types: deb\n# comment\nURIs: http://a.example/debian/\nSuites: x y\n\nTypes: deb deb-src\nURIs: http://b.example/d\n http://c.example/d\nEnabled: no\n";
        let s = stanzas(text);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].types, ["deb"]);
        assert_eq!(s[0].uris, ["http://a.example/debian"]);
        assert!(s[0].enabled);
        assert_eq!(s[1].types, ["deb", "deb-src"]);
        assert_eq!(s[1].uris, ["http://b.example/d", "http://c.example/d"]);
        assert!(!s[1].enabled);
    }
}
