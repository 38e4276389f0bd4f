//! libpcap, linked as a library and used for one thing: compiling tcpdump
//! filter expressions into classic BPF, so that their syntax and meaning are
//! libpcap's own. (Tests also use its userspace interpreter as the oracle.)
//!
//! Why these few lines of FFI and not the `pcap` crate (2.5, checked): its
//! `BpfProgram` keeps the instructions' fields private (they can only be
//! printed, or the slice cast on an undocumented layout), and ntm needs
//! them to translate the program; its `compile` passes netmask 0 where
//! tcpdump passes PCAP_NETMASK_UNKNOWN, which changes what some
//! expressions mean. Everything else it would bring (capture, devices) ntm
//! does not use. The static builds link libpcap.a as before (build.rs).

use std::ffi::{CStr, CString, c_char, c_int, c_uint};

use ntm_common::programs::LinkType;

/// One classic BPF instruction (`struct bpf_insn`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClassicInsn {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

/// The DLT_* link-layer type libpcap compiles a filter for.
fn dlt(link: LinkType) -> c_int {
    match link {
        // DLT_EN10MB.
        LinkType::Ethernet => 1,
        // DLT_RAW is 12 everywhere but OpenBSD (pcap/dlt.h).
        LinkType::RawIp => 12,
    }
}

#[repr(C)]
struct BpfProgram {
    bf_len: c_uint,
    bf_insns: *mut ClassicInsn,
}

#[repr(C)]
struct PacketHeader {
    ts: libc::timeval,
    caplen: u32,
    len: u32,
}

#[repr(C)]
struct Pcap {
    _opaque: [u8; 0],
}

#[link(name = "pcap")]
unsafe extern "C" {
    fn pcap_open_dead(linktype: c_int, snaplen: c_int) -> *mut Pcap;
    fn pcap_compile(
        p: *mut Pcap,
        fp: *mut BpfProgram,
        expression: *const c_char,
        optimize: c_int,
        netmask: u32,
    ) -> c_int;
    fn pcap_geterr(p: *mut Pcap) -> *mut c_char;
    fn pcap_freecode(fp: *mut BpfProgram);
    fn pcap_close(p: *mut Pcap);
    fn pcap_offline_filter(fp: *const BpfProgram, h: *const PacketHeader, pkt: *const u8) -> c_int;
    fn pcap_lib_version() -> *const c_char;
}

/// tcpdump's default snapshot length (what a match returns; any non-zero
/// return means "match").
const SNAPLEN: c_int = 262_144;
/// PCAP_NETMASK_UNKNOWN: as tcpdump does for an interface without IPv4.
const NETMASK_UNKNOWN: u32 = 0xffff_ffff;

/// The version libpcap reports, e.g. "libpcap version 1.10.3 (...)".
pub fn version() -> String {
    // SAFETY: returns a static NUL-terminated string.
    unsafe { CStr::from_ptr(pcap_lib_version()) }
        .to_string_lossy()
        .into_owned()
}

/// Compiles `expression` for `link` with the optimiser on, as tcpdump does.
/// The error is libpcap's own message.
pub fn compile(expression: &str, link: LinkType) -> Result<Vec<ClassicInsn>, String> {
    let text = CString::new(expression)
        .map_err(|_| "the expression contains a NUL character".to_string())?;
    // SAFETY: a dead handle needs no privileges and no device; it is closed
    // on every path below. The compiled program is copied out, then freed.
    unsafe {
        let handle = pcap_open_dead(dlt(link), SNAPLEN);
        if handle.is_null() {
            return Err("libpcap could not open a handle (out of memory?)".to_string());
        }
        let mut program = BpfProgram {
            bf_len: 0,
            bf_insns: std::ptr::null_mut(),
        };
        let result = if pcap_compile(handle, &mut program, text.as_ptr(), 1, NETMASK_UNKNOWN) != 0 {
            Err(CStr::from_ptr(pcap_geterr(handle))
                .to_string_lossy()
                .into_owned())
        } else if program.bf_insns.is_null() {
            Err("libpcap returned an empty program".to_string())
        } else {
            let insns =
                std::slice::from_raw_parts(program.bf_insns, program.bf_len as usize).to_vec();
            pcap_freecode(&mut program);
            Ok(insns)
        };
        pcap_close(handle);
        result
    }
}

/// libpcap's own verdict for `frame` (captured whole): whether `program`
/// matches it. This is tcpdump's userspace interpreter; ntm uses it only as
/// the reference the kernel side is tested against.
pub fn offline_matches(program: &[ClassicInsn], frame: &[u8]) -> bool {
    let bpf = BpfProgram {
        bf_len: program.len() as c_uint,
        bf_insns: program.as_ptr() as *mut ClassicInsn,
    };
    let header = PacketHeader {
        ts: libc::timeval {
            tv_sec: 0,
            tv_usec: 0,
        },
        caplen: frame.len() as u32,
        len: frame.len() as u32,
    };
    // SAFETY: pcap_offline_filter only reads the program and `caplen` bytes
    // of the frame, both valid for the call.
    unsafe { pcap_offline_filter(&bpf, &header, frame.as_ptr()) != 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compiles_with_libpcap_and_reports_its_errors() {
        let ip = compile("ip", LinkType::Ethernet).unwrap();
        // ldh [12]; jeq #0x800; ret #snaplen; ret #0
        assert_eq!(ip.len(), 4, "{ip:?}");
        assert_eq!(ip[0].k, 12);
        let raw = compile("ip", LinkType::RawIp).unwrap();
        assert_ne!(raw, ip);
        let err = compile("tcp port eighty-ish", LinkType::Ethernet).unwrap_err();
        assert!(!err.is_empty());
        let err = compile("ether host 00:11:22:33:44:55", LinkType::RawIp).unwrap_err();
        assert!(!err.is_empty());
        assert!(version().contains("libpcap"));
    }

    #[test]
    fn the_oracle_answers() {
        let ip = compile("ip", LinkType::Ethernet).unwrap();
        let mut frame = [0u8; 60];
        frame[12] = 0x08;
        assert!(offline_matches(&ip, &frame));
        frame[12] = 0x86;
        frame[13] = 0xdd;
        assert!(!offline_matches(&ip, &frame));
    }
}
