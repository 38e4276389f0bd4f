//! Builds the kernel programs (ntm-ebpf) for the bpf target and leaves the
//! object in OUT_DIR, where `src/kernel/load.rs` embeds it.
//!
//! Needs nightly's rust-src and bpf-linker; `cargo xtask` installs both (see
//! README). Set AYA_BUILD_SKIP=1 to skip (clippy of the agent alone).
//!
//! Also chooses how libpcap is linked: the machine's shared library
//! (libpcap-dev) by default, or a static libpcap.a from NTM_LIBPCAP_DIR,
//! which `cargo xtask image` (musl) and `cargo xtask dist --arch arm64` build
//! for their target and set.
fn main() -> anyhow::Result<()> {
    link_libpcap()?;
    let package = aya_build::Package {
        name: "ntm-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../ntm-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::default())
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
