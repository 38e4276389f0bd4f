//! The eBPF object is linked by bpf-linker, which cargo does not know about:
//! rebuild when it changes (it is installed or updated by `cargo xtask`).
fn main() {
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
