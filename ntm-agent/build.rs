//! Builds the kernel programs (ntm-ebpf) for the bpf target and leaves the
//! object in OUT_DIR, where `src/datapath.rs` embeds it.
//!
//! Needs nightly's rust-src and bpf-linker; `cargo xtask` installs both (see
//! README). Set AYA_BUILD_SKIP=1 to skip (clippy of the agent alone).
fn main() -> anyhow::Result<()> {
    let package = aya_build::Package {
        name: "ntm-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../ntm-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::default())
}
