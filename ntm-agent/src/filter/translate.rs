//! Classic BPF (what libpcap compiles a tcpdump expression to) translated
//! into an eBPF program for one of ntm's hooks.
//!
//! Why translate rather than interpret in the kernel: the translated filter
//! is JIT-compiled like any program, so a short filter costs a handful of
//! native instructions per frame; an interpreter would pay a dispatch per
//! classic instruction (see `cargo xtask bench`).
//!
//! The program sees the frame as tcpdump would on that interface:
//! - Ethernet hooks in TC: the kernel has usually moved the outer VLAN tag
//!   into skb metadata. tcpdump shows it back in place, so here every load
//!   reads a *virtual* frame with the tag re-inserted at offset 12 (TPID,
//!   then TCI), and the length includes its 4 bytes.
//! - Loads beyond the linear data (but inside the packet) use
//!   `bpf_skb_load_bytes`, so every offset libpcap can ask for is reachable.
//! - A load outside the frame rejects, as in libpcap; so do a division by
//!   zero and a jump outside the program. Shifts by 32 or more give 0.
//! - Loops (libpcap emits them for `protochain`) are unrolled: the code
//!   inside a loop is emitted once per backward jump taken, up to libpcap's
//!   own bound, so the program has forward jumps only.
//!
//! The verdict goes into the per-CPU verdict map and the program tail-calls
//! the hook's counting half (see `ntm_common::tail`).

use ntm_common::programs::{self, LinkType};

use super::pcap::ClassicInsn;
pub use crate::sys::bpf::Insn;

/// How the filter sees the frame, which follows from its hook (see the
/// module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum View {
    /// TC on an Ethernet interface (VLAN tag possibly in skb metadata).
    TcEthernet,
    /// TC on an L3 interface: the frame starts with the IP header.
    TcL3,
    /// XDP: the whole frame is in [data, data_end), tags included.
    Xdp,
}

impl View {
    fn of(hook: &programs::HookPrograms) -> Self {
        match (hook.is_xdp(), hook.link) {
            (true, _) => View::Xdp,
            (false, LinkType::Ethernet) => View::TcEthernet,
            (false, LinkType::RawIp) => View::TcL3,
        }
    }
}

/// Most classic instructions ntm takes: the kernel's own limit for a
/// classic socket filter (BPF_MAXINSNS), i.e. the longest filter tcpdump
/// itself could hand to the kernel.
pub const MAX_CLASSIC_INSNS: usize = 4096;

/// Most eBPF instructions a translated filter may have: conditional jumps
/// carry a 16-bit offset.
const MAX_EBPF_INSNS: usize = 32_767;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TranslateError {
    #[error(
        "it compiles to {0} classic BPF instructions; ntm runs at most {MAX_CLASSIC_INSNS} in the kernel (the kernel's own limit for tcpdump's filters): shorten the filter"
    )]
    TooLong(usize),
    #[error(
        "its translation for the kernel is {0} eBPF instructions, more than the {MAX_EBPF_INSNS} ntm can address: shorten the filter"
    )]
    TranslationTooLong(usize),
    #[error("classic BPF instruction {0} jumps to itself: an endless loop")]
    BackwardJump(usize),
    #[error("classic BPF instruction {index} (opcode {code:#06x}) is not one ntm can translate")]
    UnknownOpcode { index: usize, code: u16 },
    #[error("classic BPF instruction {0} jumps past the end of the program")]
    JumpOutOfRange(usize),
    #[error("the classic BPF program is empty")]
    Empty,
}

/// The maps the generated program refers to, by file descriptor.
#[derive(Clone, Copy, Debug)]
pub struct MapFds {
    /// PROG_ARRAY holding the hook's counting half.
    pub tails: i32,
    /// Per-CPU array with the verdict.
    pub verdict: i32,
}

// eBPF opcode parts (uapi/linux/bpf.h, bpf_common.h).
mod op {
    pub const LD: u8 = 0x00;
    pub const LDX: u8 = 0x01;
    pub const ST: u8 = 0x02;
    pub const STX: u8 = 0x03;
    pub const ALU: u8 = 0x04;
    pub const JMP: u8 = 0x05;
    pub const JMP32: u8 = 0x06;
    pub const ALU64: u8 = 0x07;

    pub const W: u8 = 0x00;
    pub const H: u8 = 0x08;
    pub const B: u8 = 0x10;
    pub const DW: u8 = 0x18;
    pub const IMM: u8 = 0x00;
    pub const MEM: u8 = 0x60;

    pub const K: u8 = 0x00;
    pub const X: u8 = 0x08;

    pub const ADD: u8 = 0x00;
    pub const SUB: u8 = 0x10;
    pub const MUL: u8 = 0x20;
    pub const DIV: u8 = 0x30;
    pub const OR: u8 = 0x40;
    pub const AND: u8 = 0x50;
    pub const LSH: u8 = 0x60;
    pub const RSH: u8 = 0x70;
    pub const MOD: u8 = 0x90;
    pub const XOR: u8 = 0xa0;
    pub const MOV: u8 = 0xb0;
    pub const END: u8 = 0xd0;
    /// With END: convert to big endian (a byte swap on this little-endian
    /// target).
    pub const TO_BE: u8 = 0x08;

    pub const JA: u8 = 0x00;
    pub const JEQ: u8 = 0x10;
    pub const JGT: u8 = 0x20;
    pub const JGE: u8 = 0x30;
    pub const JSET: u8 = 0x40;
    pub const JNE: u8 = 0x50;
    pub const JLE: u8 = 0xb0;
    pub const CALL: u8 = 0x80;
    pub const EXIT: u8 = 0x90;

    /// src_reg of a 64-bit immediate load holding a map fd.
    pub const PSEUDO_MAP_FD: u8 = 1;
}

// Registers. R6-R9 survive helper calls.
const R0: u8 = 0;
const R1: u8 = 1;
const R2: u8 = 2;
const R3: u8 = 3;
const R4: u8 = 4;
const R10: u8 = 10;
/// The context (skb or xdp_md).
const CTX: u8 = 6;
/// Classic A.
const A: u8 = 7;
/// Classic X.
const X: u8 = 8;
/// 1 when the outer VLAN tag is in skb metadata (TC Ethernet only).
const VLAN: u8 = 9;

// Stack slots (offsets from R10).
/// Classic scratch memory M[0..16], 4 bytes each.
fn mem_slot(k: u32) -> i16 {
    -4 * (k as i16 + 1)
}
const LOAD_BUFFER: i16 = -72;
const TAG_SLOT: i16 = -76;
const VERDICT_KEY: i16 = -80;

// Context field offsets.
mod skb {
    pub const LEN: i16 = 0;
    pub const VLAN_PRESENT: i16 = 20;
    pub const VLAN_TCI: i16 = 24;
    pub const VLAN_PROTO: i16 = 28;
    pub const DATA: i16 = 76;
    pub const DATA_END: i16 = 80;
}
mod xdp_md {
    pub const DATA: i16 = 0;
    pub const DATA_END: i16 = 4;
}

// Helpers.
const MAP_LOOKUP_ELEM: i32 = 1;
const TAIL_CALL: i32 = 12;
const SKB_LOAD_BYTES: i32 = 26;

/// Largest offset the verifier lets a program add to a packet pointer.
const MAX_PACKET_OFF: u32 = 0xffff;

/// Ethernet: where the re-inserted VLAN tag sits in the virtual frame.
const TAG_START: u32 = 12;
const TAG_END: u32 = 16;

const TC_ACT_UNSPEC: i32 = -1;
const XDP_PASS: i32 = 2;

// Classic BPF opcode parts.
mod classic {
    pub fn class(code: u16) -> u16 {
        code & 0x07
    }
    pub fn size(code: u16) -> u16 {
        code & 0x18
    }
    pub fn mode(code: u16) -> u16 {
        code & 0xe0
    }
    pub fn op(code: u16) -> u16 {
        code & 0xf0
    }
    pub fn src(code: u16) -> u16 {
        code & 0x08
    }
    pub const LD: u16 = 0x00;
    pub const LDX: u16 = 0x01;
    pub const ST: u16 = 0x02;
    pub const STX: u16 = 0x03;
    pub const ALU: u16 = 0x04;
    pub const JMP: u16 = 0x05;
    pub const RET: u16 = 0x06;
    pub const MISC: u16 = 0x07;
    pub const W: u16 = 0x00;
    pub const H: u16 = 0x08;
    pub const B: u16 = 0x10;
    pub const IMM: u16 = 0x00;
    pub const ABS: u16 = 0x20;
    pub const IND: u16 = 0x40;
    pub const MEM: u16 = 0x60;
    pub const LEN: u16 = 0x80;
    pub const MSH: u16 = 0xa0;
    pub const K: u16 = 0x00;
    pub const RVAL_A: u16 = 0x10;
    pub const TAX: u16 = 0x00;
    pub const TXA: u16 = 0x80;
    pub const MEMWORDS: u32 = 16;
}

type JumpLabel = usize;

/// Where a classic load reads from.
#[derive(Clone, Copy)]
enum Offset {
    Const(u32),
    /// X + k.
    Indexed(u32),
}

struct Emitter {
    hook: View,
    insns: Vec<Insn>,
    /// Position of each label once bound.
    labels: Vec<Option<usize>>,
    /// Jumps to patch: (instruction index, label).
    fixups: Vec<(usize, JumpLabel)>,
}

impl Emitter {
    fn label(&mut self) -> JumpLabel {
        self.labels.push(None);
        self.labels.len() - 1
    }

    fn bind(&mut self, label: JumpLabel) {
        self.labels[label] = Some(self.insns.len());
    }

    fn raw(&mut self, code: u8, dst: u8, src: u8, off: i16, imm: i32) {
        self.insns.push(Insn {
            code,
            regs: dst | (src << 4),
            off,
            imm,
        });
    }

    fn mov64_reg(&mut self, dst: u8, src: u8) {
        self.raw(op::ALU64 | op::MOV | op::X, dst, src, 0, 0);
    }
    /// dst = imm as an unsigned 32-bit value (upper half zeroed).
    fn mov32_imm(&mut self, dst: u8, imm: u32) {
        self.raw(op::ALU | op::MOV | op::K, dst, 0, 0, imm as i32);
    }
    fn mov32_reg(&mut self, dst: u8, src: u8) {
        self.raw(op::ALU | op::MOV | op::X, dst, src, 0, 0);
    }
    fn alu64_imm(&mut self, operation: u8, dst: u8, imm: i32) {
        self.raw(op::ALU64 | operation | op::K, dst, 0, 0, imm);
    }
    fn alu64_reg(&mut self, operation: u8, dst: u8, src: u8) {
        self.raw(op::ALU64 | operation | op::X, dst, src, 0, 0);
    }
    fn alu32_imm(&mut self, operation: u8, dst: u8, imm: u32) {
        self.raw(op::ALU | operation | op::K, dst, 0, 0, imm as i32);
    }
    fn alu32_reg(&mut self, operation: u8, dst: u8, src: u8) {
        self.raw(op::ALU | operation | op::X, dst, src, 0, 0);
    }
    fn load(&mut self, size: u8, dst: u8, src: u8, off: i16) {
        self.raw(op::LDX | op::MEM | size, dst, src, off, 0);
    }
    fn store_reg(&mut self, size: u8, dst: u8, off: i16, src: u8) {
        self.raw(op::STX | op::MEM | size, dst, src, off, 0);
    }
    fn store_imm(&mut self, size: u8, dst: u8, off: i16, imm: i32) {
        self.raw(op::ST | op::MEM | size, dst, 0, off, imm);
    }
    /// Byte-swaps the low `bits` of `dst` (network to host order).
    fn swap_to_host_order(&mut self, dst: u8, bits: i32) {
        if bits > 8 {
            self.raw(op::ALU | op::END | op::TO_BE, dst, 0, 0, bits);
        }
    }
    fn ja(&mut self, target: JumpLabel) {
        self.fixups.push((self.insns.len(), target));
        self.raw(op::JMP | op::JA, 0, 0, 0, 0);
    }
    fn jmp64_imm(&mut self, operation: u8, dst: u8, imm: i32, target: JumpLabel) {
        self.fixups.push((self.insns.len(), target));
        self.raw(op::JMP | operation | op::K, dst, 0, 0, imm);
    }
    fn jmp64_reg(&mut self, operation: u8, dst: u8, src: u8, target: JumpLabel) {
        self.fixups.push((self.insns.len(), target));
        self.raw(op::JMP | operation | op::X, dst, src, 0, 0);
    }
    /// Unsigned 32-bit compare of `dst` with `imm`, as classic BPF does.
    fn jmp32_imm(&mut self, operation: u8, dst: u8, imm: u32, target: JumpLabel) {
        self.fixups.push((self.insns.len(), target));
        self.raw(op::JMP32 | operation | op::K, dst, 0, 0, imm as i32);
    }
    fn jmp32_reg(&mut self, operation: u8, dst: u8, src: u8, target: JumpLabel) {
        self.fixups.push((self.insns.len(), target));
        self.raw(op::JMP32 | operation | op::X, dst, src, 0, 0);
    }
    fn call(&mut self, helper: i32) {
        self.raw(op::JMP | op::CALL, 0, 0, 0, helper);
    }
    fn exit(&mut self) {
        self.raw(op::JMP | op::EXIT, 0, 0, 0, 0);
    }
    fn load_map_fd(&mut self, dst: u8, fd: i32) {
        self.raw(op::LD | op::DW | op::IMM, dst, op::PSEUDO_MAP_FD, 0, fd);
        self.raw(0, 0, 0, 0, 0);
    }

    fn ctx_offsets(&self) -> (i16, i16) {
        match self.hook {
            View::Xdp => (xdp_md::DATA, xdp_md::DATA_END),
            View::TcEthernet | View::TcL3 => (skb::DATA, skb::DATA_END),
        }
    }

    /// `dst` = `size` bytes (1, 2 or 4) big-endian at the *physical* offset
    /// in R1 (a 64-bit value), or a jump to `reject` if they are not in the
    /// packet. Clobbers R0-R5.
    fn physical_load_at_r1(&mut self, size: u32, dst: u8, reject: JumpLabel) {
        let slow = self.label();
        let done = self.label();
        // The verifier only trusts a bounds check on a packet pointer whose
        // largest possible offset, access included, stays within 64 KiB.
        self.jmp64_imm(op::JGT, R1, (MAX_PACKET_OFF - size) as i32, slow);
        self.linear_load(size, None, dst, slow);
        self.ja(done);
        self.bind(slow);
        self.slow_load(size, dst, reject);
        self.bind(done);
    }

    /// As [`Self::physical_load_at_r1`] for an offset known now.
    fn physical_load_const(&mut self, size: u32, offset: u64, dst: u8, reject: JumpLabel) {
        if offset > i32::MAX as u64 {
            self.ja(reject);
            return;
        }
        if offset + size as u64 > MAX_PACKET_OFF as u64 {
            self.mov32_imm(R1, offset as u32);
            self.slow_load(size, dst, reject);
            return;
        }
        let slow = self.label();
        let done = self.label();
        self.linear_load(size, Some(offset as i32), dst, slow);
        self.ja(done);
        self.bind(slow);
        self.mov32_imm(R1, offset as u32);
        self.slow_load(size, dst, reject);
        self.bind(done);
    }

    /// `dst` = `size` bytes big-endian read directly from the packet at
    /// `offset` (or at R1 when None, already bounded), or a jump to `slow`
    /// when they lie beyond the linear data.
    fn linear_load(&mut self, size: u32, offset: Option<i32>, dst: u8, slow: JumpLabel) {
        let (data, data_end) = self.ctx_offsets();
        self.load(op::W, R2, CTX, data);
        self.load(op::W, R3, CTX, data_end);
        match offset {
            Some(offset) => self.alu64_imm(op::ADD, R2, offset),
            None => self.alu64_reg(op::ADD, R2, R1),
        }
        self.mov64_reg(R4, R2);
        self.alu64_imm(op::ADD, R4, size as i32);
        self.jmp64_reg(op::JGT, R4, R3, slow);
        self.load(width_of(size), dst, R2, 0);
        self.swap_to_host_order(dst, 8 * size as i32);
    }

    /// The bytes are not in the linear data: in TC ask the kernel to copy
    /// them (it checks them against the packet length); in XDP there is
    /// nothing beyond data_end. Offset in R1.
    fn slow_load(&mut self, size: u32, dst: u8, reject: JumpLabel) {
        match self.hook {
            View::Xdp => self.ja(reject),
            View::TcEthernet | View::TcL3 => {
                // bpf_skb_load_bytes takes the offset as a u32 and refuses
                // anything above INT_MAX.
                self.jmp64_imm(op::JGT, R1, i32::MAX, reject);
                self.mov64_reg(R2, R1);
                self.mov64_reg(R1, CTX);
                self.mov64_reg(R3, R10);
                self.alu64_imm(op::ADD, R3, LOAD_BUFFER as i32);
                self.mov32_imm(R4, size);
                self.call(SKB_LOAD_BYTES);
                self.jmp64_imm(op::JNE, R0, 0, reject);
                self.load(width_of(size), dst, R10, LOAD_BUFFER);
                self.swap_to_host_order(dst, 8 * size as i32);
            }
        }
    }

    /// `dst` = `size` bytes big-endian at virtual offset `offset` of a frame
    /// whose VLAN tag sits in metadata (TC Ethernet with VLAN set).
    fn tagged_load_const(&mut self, size: u32, offset: u64, dst: u8, reject: JumpLabel) {
        let end = offset + size as u64;
        if end <= TAG_START as u64 {
            self.physical_load_const(size, offset, dst, reject);
        } else if offset >= TAG_END as u64 {
            self.physical_load_const(size, offset - 4, dst, reject);
        } else {
            // Touches the tag: assemble byte by byte in `dst` (R7 or R8,
            // which survive the helper calls of a slow load).
            self.mov32_imm(dst, 0);
            for u in offset..end {
                if u < TAG_START as u64 {
                    self.physical_load_const(1, u, R0, reject);
                } else if u < TAG_END as u64 {
                    self.load(op::W, R0, R10, TAG_SLOT);
                    let shift = 8 * (3 - (u as u32 - TAG_START));
                    if shift > 0 {
                        self.alu32_imm(op::RSH, R0, shift);
                    }
                    self.alu32_imm(op::AND, R0, 0xff);
                } else {
                    self.physical_load_const(1, u - 4, R0, reject);
                }
                self.alu32_imm(op::LSH, dst, 8);
                self.alu32_reg(op::OR, dst, R0);
            }
        }
    }

    /// A classic load of `size` bytes into `dst`.
    fn classic_load(&mut self, size: u32, offset: Offset, dst: u8, reject: JumpLabel) {
        match offset {
            Offset::Const(k) => {
                let k = k as u64;
                if self.hook == View::TcEthernet && k + size as u64 > TAG_START as u64 {
                    let untagged = self.label();
                    let done = self.label();
                    self.jmp64_imm(op::JEQ, VLAN, 0, untagged);
                    self.tagged_load_const(size, k, dst, reject);
                    self.ja(done);
                    self.bind(untagged);
                    self.physical_load_const(size, k, dst, reject);
                    self.bind(done);
                } else {
                    self.physical_load_const(size, k, dst, reject);
                }
            }
            Offset::Indexed(k) => {
                // R1 = X + k, in 64 bits: no wrap-around, as libpcap checks.
                self.mov32_reg(R1, X);
                self.mov32_imm(R2, k);
                self.alu64_reg(op::ADD, R1, R2);
                if self.hook != View::TcEthernet {
                    self.physical_load_at_r1(size, dst, reject);
                    return;
                }
                let physical = self.label();
                let done = self.label();
                self.jmp64_imm(op::JEQ, VLAN, 0, physical);
                let shifted = self.label();
                self.jmp64_imm(op::JGE, R1, TAG_END as i32, shifted);
                // Entirely before the tag: the same offset.
                self.jmp64_imm(op::JLE, R1, (TAG_START - size) as i32, physical);
                // Touches the tag: one of a few offsets, each assembled.
                let first = (TAG_START + 1).saturating_sub(size);
                let cases: Vec<(u32, JumpLabel)> =
                    (first..TAG_END).map(|v| (v, self.label())).collect();
                for &(v, label) in &cases {
                    self.jmp64_imm(op::JEQ, R1, v as i32, label);
                }
                self.ja(reject);
                for (v, label) in cases {
                    self.bind(label);
                    self.tagged_load_const(size, v as u64, dst, reject);
                    self.ja(done);
                }
                self.bind(shifted);
                self.alu64_imm(op::SUB, R1, 4);
                self.bind(physical);
                self.physical_load_at_r1(size, dst, reject);
                self.bind(done);
            }
        }
    }

    /// `dst` = the frame length as tcpdump sees it.
    fn frame_length(&mut self, dst: u8) {
        match self.hook {
            View::Xdp => {
                self.load(op::W, dst, CTX, xdp_md::DATA_END);
                self.load(op::W, R1, CTX, xdp_md::DATA);
                self.alu32_reg(op::SUB, dst, R1);
            }
            View::TcL3 => self.load(op::W, dst, CTX, skb::LEN),
            View::TcEthernet => {
                self.load(op::W, dst, CTX, skb::LEN);
                self.mov64_reg(R1, VLAN);
                self.alu64_imm(op::LSH, R1, 2);
                self.alu32_reg(op::ADD, dst, R1);
            }
        }
    }
}

fn width_of(size: u32) -> u8 {
    match size {
        1 => op::B,
        2 => op::H,
        _ => op::W,
    }
}

/// The scratch slots the program reads or writes.
fn scratch_used(program: &[ClassicInsn]) -> Vec<u32> {
    let mut used: Vec<u32> = program
        .iter()
        .filter(|i| {
            let c = classic::class(i.code);
            ((c == classic::LD || c == classic::LDX) && classic::mode(i.code) == classic::MEM)
                || c == classic::ST
                || c == classic::STX
        })
        .map(|i| i.k)
        .filter(|k| *k < classic::MEMWORDS)
        .collect();
    used.sort_unstable();
    used.dedup();
    used
}

/// How often a filter may jump backwards per frame: libpcap's own bound
/// (MAX_BACKWARD_JUMPS) for the loops it emits for `protochain`.
pub const MAX_BACKWARD_JUMPS: usize = 64;

/// Where control goes after each classic instruction.
struct Flow {
    /// Targets (index, is a backward jump); empty for a return.
    jumps: Vec<(usize, bool)>,
}

/// The successors of every instruction, checked: jumps stay inside the
/// program and a jump to itself (an endless loop) is refused.
fn control_flow(program: &[ClassicInsn]) -> Result<Vec<Flow>, TranslateError> {
    let len = program.len() as i64;
    let mut flow = Vec::with_capacity(program.len());
    for (index, insn) in program.iter().enumerate() {
        let next = index as i64 + 1;
        let inside = |to: i64| -> Result<usize, TranslateError> {
            if (0..len).contains(&to) {
                Ok(to as usize)
            } else {
                Err(TranslateError::JumpOutOfRange(index))
            }
        };
        let jumps = match classic::class(insn.code) {
            classic::RET => vec![],
            classic::JMP if classic::op(insn.code) == 0x00 => {
                // JA: libpcap encodes a backward jump as a negative k.
                let distance = insn.k as i32 as i64;
                if distance == -1 {
                    return Err(TranslateError::BackwardJump(index));
                }
                vec![(inside(next + distance)?, distance < 0)]
            }
            classic::JMP => vec![
                (inside(next + insn.jt as i64)?, false),
                (inside(next + insn.jf as i64)?, false),
            ],
            // Falling off the end rejects, as in libpcap.
            _ if next == len => vec![],
            _ => vec![(next as usize, false)],
        };
        flow.push(Flow { jumps });
    }
    Ok(flow)
}

/// The blocks to emit: each classic instruction once, except those inside a
/// loop, which are emitted once per backward jump taken so far (0 to
/// [`MAX_BACKWARD_JUMPS`]) so that the eBPF program has no loop and every
/// jump goes forward. A block is (instruction, level); instructions from
/// which no backward jump can be reached share one copy at the last level.
struct Blocks {
    order: Vec<(usize, usize)>,
    position: std::collections::HashMap<(usize, usize), usize>,
    in_loop: Vec<bool>,
}

impl Blocks {
    const AFTER_LOOPS: usize = MAX_BACKWARD_JUMPS + 1;

    fn plan(flow: &[Flow]) -> Self {
        // Jumps other than backward ones go forward, so one pass from the end
        // finds what can still reach a backward jump.
        let mut in_loop = vec![false; flow.len()];
        for index in (0..flow.len()).rev() {
            in_loop[index] = flow[index]
                .jumps
                .iter()
                .any(|&(to, backward)| backward || in_loop[to]);
        }
        let mut blocks = Self {
            order: Vec::new(),
            position: Default::default(),
            in_loop,
        };
        let start = blocks.block_of(0, 0, false);
        let mut seen = std::collections::HashSet::new();
        let mut stack: Vec<(usize, usize)> = start.into_iter().collect();
        while let Some(block) = stack.pop() {
            if !seen.insert(block) {
                continue;
            }
            for &(to, backward) in &flow[block.0].jumps {
                if let Some(next) = blocks.block_of(to, block.1, backward) {
                    stack.push(next);
                }
            }
        }
        let mut order: Vec<(usize, usize)> = seen.into_iter().collect();
        order.sort_by_key(|&(index, level)| (level, index));
        blocks.position = order.iter().enumerate().map(|(p, b)| (*b, p)).collect();
        blocks.order = order;
        blocks
    }

    /// The block a jump from `level` to instruction `to` lands in; None when
    /// it would be one backward jump too many (the frame is rejected).
    fn block_of(&self, to: usize, level: usize, backward: bool) -> Option<(usize, usize)> {
        if !self.in_loop[to] {
            return Some((to, Self::AFTER_LOOPS));
        }
        let level = if backward { level + 1 } else { level };
        (level <= MAX_BACKWARD_JUMPS).then_some((to, level))
    }
}

/// Translates `program` for `hook`: the result ends by tail-calling the
/// hook's counting half in `maps.tails`.
pub fn translate(
    program: &[ClassicInsn],
    hook: &programs::HookPrograms,
    maps: MapFds,
) -> Result<Vec<Insn>, TranslateError> {
    let count_slot = hook.count_slot;
    let hook = View::of(hook);
    if program.is_empty() {
        return Err(TranslateError::Empty);
    }
    if program.len() > MAX_CLASSIC_INSNS {
        return Err(TranslateError::TooLong(program.len()));
    }
    let mut e = Emitter {
        hook,
        insns: Vec::with_capacity(program.len() * 8),
        labels: Vec::new(),
        fixups: Vec::new(),
    };
    let accept = e.label();
    let reject = e.label();
    let verdict = e.label();

    // Prologue: context, A = X = 0, scratch zeroed, VLAN tag prepared.
    e.mov64_reg(CTX, R1);
    e.mov32_imm(A, 0);
    e.mov32_imm(X, 0);
    for k in scratch_used(program) {
        e.store_imm(op::W, R10, mem_slot(k), 0);
    }
    if hook == View::TcEthernet {
        let untagged = e.label();
        e.load(op::W, VLAN, CTX, skb::VLAN_PRESENT);
        e.jmp64_imm(op::JEQ, VLAN, 0, untagged);
        e.mov32_imm(VLAN, 1);
        // The tag as it would sit in the frame: TPID (kept in network
        // order by the kernel), then TCI.
        e.load(op::W, R1, CTX, skb::VLAN_PROTO);
        e.swap_to_host_order(R1, 16);
        e.alu32_imm(op::LSH, R1, 16);
        e.load(op::W, R2, CTX, skb::VLAN_TCI);
        e.alu32_imm(op::AND, R2, 0xffff);
        e.alu32_reg(op::OR, R1, R2);
        e.store_reg(op::W, R10, TAG_SLOT, R1);
        e.bind(untagged);
    }

    let flow = control_flow(program)?;
    let blocks = Blocks::plan(&flow);
    let labels: Vec<JumpLabel> = blocks.order.iter().map(|_| e.label()).collect();
    // Where a jump from `level` to classic instruction `to` lands.
    let land = |to: usize, level: usize, backward: bool| -> JumpLabel {
        match blocks.block_of(to, level, backward) {
            Some(block) => labels[blocks.position[&block]],
            None => reject,
        }
    };

    for (position, &(index, level)) in blocks.order.iter().enumerate() {
        e.bind(labels[position]);
        let insn = &program[index];
        let code = insn.code;
        let k = insn.k;
        let unknown = TranslateError::UnknownOpcode { index, code };
        match classic::class(code) {
            classic::LD | classic::LDX => {
                let dst = if classic::class(code) == classic::LD {
                    A
                } else {
                    X
                };
                let size = match classic::size(code) {
                    classic::W => 4,
                    classic::H => 2,
                    classic::B => 1,
                    _ => return Err(unknown),
                };
                match (classic::class(code), classic::mode(code)) {
                    (_, classic::IMM) => e.mov32_imm(dst, k),
                    (_, classic::LEN) => e.frame_length(dst),
                    (_, classic::MEM) => {
                        if k >= classic::MEMWORDS {
                            return Err(unknown);
                        }
                        e.load(op::W, dst, R10, mem_slot(k));
                    }
                    (classic::LD, classic::ABS) => {
                        e.classic_load(size, Offset::Const(k), A, reject)
                    }
                    (classic::LD, classic::IND) => {
                        e.classic_load(size, Offset::Indexed(k), A, reject)
                    }
                    (classic::LDX, classic::MSH) => {
                        e.classic_load(1, Offset::Const(k), X, reject);
                        e.alu32_imm(op::AND, X, 0x0f);
                        e.alu32_imm(op::LSH, X, 2);
                    }
                    _ => return Err(unknown),
                }
            }
            classic::ST | classic::STX => {
                if k >= classic::MEMWORDS {
                    return Err(unknown);
                }
                let src = if classic::class(code) == classic::ST {
                    A
                } else {
                    X
                };
                e.store_reg(op::W, R10, mem_slot(k), src);
            }
            classic::ALU => {
                let operation = match classic::op(code) {
                    0x00 => op::ADD,
                    0x10 => op::SUB,
                    0x20 => op::MUL,
                    0x30 => op::DIV,
                    0x40 => op::OR,
                    0x50 => op::AND,
                    0x60 => op::LSH,
                    0x70 => op::RSH,
                    0x80 => {
                        // NEG: A = 0 - A.
                        e.mov32_imm(R1, 0);
                        e.alu32_reg(op::SUB, R1, A);
                        e.mov32_reg(A, R1);
                        continue;
                    }
                    0x90 => op::MOD,
                    0xa0 => op::XOR,
                    _ => return Err(unknown),
                };
                let shift = operation == op::LSH || operation == op::RSH;
                let divide = operation == op::DIV || operation == op::MOD;
                if classic::src(code) == classic::K {
                    if divide && k == 0 {
                        e.ja(reject);
                    } else if shift && k >= 32 {
                        e.mov32_imm(A, 0);
                    } else {
                        e.alu32_imm(operation, A, k);
                    }
                } else if divide {
                    e.jmp32_imm(op::JEQ, X, 0, reject);
                    e.alu32_reg(operation, A, X);
                } else if shift {
                    let in_range = e.label();
                    let done = e.label();
                    e.jmp32_imm(op::JGT, X, 31, in_range);
                    e.alu32_reg(operation, A, X);
                    e.ja(done);
                    e.bind(in_range);
                    e.mov32_imm(A, 0);
                    e.bind(done);
                } else {
                    e.alu32_reg(operation, A, X);
                }
            }
            classic::JMP => {
                let operation = match classic::op(code) {
                    0x00 => {
                        let (to, backward) = flow[index].jumps[0];
                        e.ja(land(to, level, backward));
                        continue;
                    }
                    0x10 => op::JEQ,
                    0x20 => op::JGT,
                    0x30 => op::JGE,
                    0x40 => op::JSET,
                    _ => return Err(unknown),
                };
                let on_true = land(flow[index].jumps[0].0, level, false);
                let on_false = land(flow[index].jumps[1].0, level, false);
                if classic::src(code) == classic::K {
                    e.jmp32_imm(operation, A, k, on_true);
                } else {
                    e.jmp32_reg(operation, A, X, on_true);
                }
                if position + 1 >= labels.len() || labels[position + 1] != on_false {
                    e.ja(on_false);
                }
                continue;
            }
            classic::RET => {
                match code & 0x18 {
                    classic::K => e.ja(if k != 0 { accept } else { reject }),
                    classic::RVAL_A => {
                        e.jmp32_imm(op::JNE, A, 0, accept);
                        e.ja(reject);
                    }
                    _ => return Err(unknown),
                }
                continue;
            }
            classic::MISC => match code & 0xf8 {
                classic::TAX => e.mov32_reg(X, A),
                classic::TXA => e.mov32_reg(A, X),
                _ => return Err(unknown),
            },
            _ => return Err(unknown),
        }
        // On to the next instruction, unless it is emitted next anyway;
        // past the last one the frame is rejected, as in libpcap.
        let next = match flow[index].jumps.first() {
            Some(&(to, backward)) => land(to, level, backward),
            None => reject,
        };
        if position + 1 >= labels.len() || labels[position + 1] != next {
            e.ja(next);
        }
    }

    e.bind(accept);
    e.mov32_imm(A, ntm_common::tail::VERDICT_MATCH);
    e.ja(verdict);
    e.bind(reject);
    e.mov32_imm(A, ntm_common::tail::VERDICT_FILTERED);
    e.bind(verdict);
    let tail = e.label();
    e.store_imm(op::W, R10, VERDICT_KEY, 0);
    e.mov64_reg(R2, R10);
    e.alu64_imm(op::ADD, R2, VERDICT_KEY as i32);
    e.load_map_fd(R1, maps.verdict);
    e.call(MAP_LOOKUP_ELEM);
    e.jmp64_imm(op::JEQ, R0, 0, tail);
    e.store_reg(op::W, R0, 0, A);
    e.bind(tail);
    e.mov64_reg(R1, CTX);
    e.load_map_fd(R2, maps.tails);
    e.mov32_imm(R3, count_slot);
    e.call(TAIL_CALL);
    // Only reached if the counting half is missing: let the frame go on.
    let fallback = match hook {
        View::Xdp => XDP_PASS,
        View::TcEthernet | View::TcL3 => TC_ACT_UNSPEC,
    };
    e.raw(op::ALU64 | op::MOV | op::K, R0, 0, 0, fallback);
    e.exit();

    if e.insns.len() > MAX_EBPF_INSNS {
        return Err(TranslateError::TranslationTooLong(e.insns.len()));
    }
    for (at_insn, label) in std::mem::take(&mut e.fixups) {
        let Some(position) = e.labels[label] else {
            unreachable!("label {label} never bound");
        };
        e.insns[at_insn].off = (position as i64 - at_insn as i64 - 1) as i16;
    }
    Ok(without_unreachable(e.insns))
}

/// The kernel refuses programs with instructions no path reaches. Classic
/// programs can have them (code after a jump, a verdict never given), and
/// the translation adds some (the accept or reject tail a filter never
/// uses); they are removed here and the jumps renumbered.
fn without_unreachable(insns: Vec<Insn>) -> Vec<Insn> {
    let is_wide = |i: &Insn| i.code == (op::LD | op::DW | op::IMM);
    let successors = |at: usize, i: &Insn| -> Vec<usize> {
        let class = i.code & 0x07;
        let operation = i.code & 0xf0;
        let target = (at as i64 + 1 + i.off as i64) as usize;
        if is_wide(i) {
            vec![at + 2]
        } else if class == op::JMP || class == op::JMP32 {
            match operation {
                op::EXIT => vec![],
                op::CALL => vec![at + 1],
                op::JA => vec![target],
                _ => vec![at + 1, target],
            }
        } else {
            vec![at + 1]
        }
    };
    let mut reachable = vec![false; insns.len()];
    let mut stack = vec![0usize];
    while let Some(at) = stack.pop() {
        if at >= insns.len() || reachable[at] {
            continue;
        }
        reachable[at] = true;
        if is_wide(&insns[at]) && at + 1 < insns.len() {
            reachable[at + 1] = true;
        }
        stack.extend(successors(at, &insns[at]));
    }
    let mut new_index = vec![0usize; insns.len() + 1];
    let mut next = 0;
    for (at, keep) in reachable.iter().enumerate() {
        new_index[at] = next;
        if *keep {
            next += 1;
        }
    }
    new_index[insns.len()] = next;
    let mut out = Vec::with_capacity(next);
    for (at, insn) in insns.iter().enumerate() {
        if !reachable[at] {
            continue;
        }
        let mut insn = *insn;
        let class = insn.code & 0x07;
        let operation = insn.code & 0xf0;
        let jumps = (class == op::JMP || class == op::JMP32)
            && operation != op::CALL
            && operation != op::EXIT
            && !is_wide(&insn);
        if jumps {
            let target = (at as i64 + 1 + insn.off as i64) as usize;
            insn.off = (new_index[target] as i64 - new_index[at] as i64 - 1) as i16;
        }
        out.push(insn);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const FDS: MapFds = MapFds {
        tails: 3,
        verdict: 4,
    };

    /// The table's hook with this view.
    fn hook(view: View) -> &'static programs::HookPrograms {
        programs::HOOKS
            .iter()
            .find(|h| View::of(h) == view)
            .expect("every view has a hook")
    }

    fn insn(code: u16, jt: u8, jf: u8, k: u32) -> ClassicInsn {
        ClassicInsn { code, jt, jf, k }
    }

    const RET_K: u16 = 0x06;
    const LDH_ABS: u16 = 0x28;
    const JEQ_K: u16 = 0x15;
    const JA: u16 = 0x05;

    #[test]
    fn a_filter_longer_than_the_kernel_takes_is_refused_with_the_limit() {
        let program = vec![insn(RET_K, 0, 0, 0); MAX_CLASSIC_INSNS + 1];
        let err = translate(&program, hook(View::TcEthernet), FDS).unwrap_err();
        assert_eq!(err, TranslateError::TooLong(MAX_CLASSIC_INSNS + 1));
        let text = err.to_string();
        assert!(text.contains("4097") && text.contains("4096"), "{text}");
        let program = vec![insn(RET_K, 0, 0, 0); MAX_CLASSIC_INSNS];
        assert!(translate(&program, hook(View::TcEthernet), FDS).is_ok());
    }

    #[test]
    fn loops_bad_jumps_and_unknown_opcodes_are_refused() {
        let endless = [insn(JA, 0, 0, u32::MAX), insn(RET_K, 0, 0, 1)];
        assert_eq!(
            translate(&endless, hook(View::Xdp), FDS),
            Err(TranslateError::BackwardJump(0))
        );
        let before_start = [insn(JA, 0, 0, u32::MAX - 1), insn(RET_K, 0, 0, 1)];
        assert_eq!(
            translate(&before_start, hook(View::Xdp), FDS),
            Err(TranslateError::JumpOutOfRange(0))
        );
        let past_end = [insn(JEQ_K, 5, 0, 1), insn(RET_K, 0, 0, 1)];
        assert_eq!(
            translate(&past_end, hook(View::Xdp), FDS),
            Err(TranslateError::JumpOutOfRange(0))
        );
        let unknown = [insn(0xff, 0, 0, 0)];
        assert!(matches!(
            translate(&unknown, hook(View::Xdp), FDS),
            Err(TranslateError::UnknownOpcode { index: 0, .. })
        ));
        assert_eq!(
            translate(&[], hook(View::Xdp), FDS),
            Err(TranslateError::Empty)
        );
    }

    #[test]
    fn a_loop_is_unrolled_into_forward_jumps_up_to_libpcaps_bound() {
        // 0: ld #0; 1: add #1; 2: jeq #1000 -> 4 else 3; 3: ja -> 1; 4: ret #1
        let program = [
            insn(0x00, 0, 0, 0),
            insn(0x04, 0, 0, 1),
            insn(JEQ_K, 1, 0, 1000),
            insn(JA, 0, 0, (-3i32) as u32),
            insn(RET_K, 0, 0, 1),
        ];
        let insns = translate(&program, hook(View::TcL3), FDS).unwrap();
        for (at, i) in insns.iter().enumerate() {
            let class = i.code & 0x07;
            if class == op::JMP || class == op::JMP32 {
                assert!(i.off >= 0, "backward jump at {at}");
            }
        }
        // The loop body (instructions 1-3) is there once per level.
        let adds = insns
            .iter()
            .filter(|i| i.code == op::ALU | op::ADD | op::K && i.regs & 0x0f == A)
            .count();
        assert_eq!(adds, MAX_BACKWARD_JUMPS + 1);
    }

    #[test]
    fn no_instruction_is_left_unreachable_and_every_jump_lands_inside() {
        // "ip": ldh [12]; jeq #0x800 jt 0 jf 1; ret #1; ret #0. Plus code
        // after an unconditional jump that nothing reaches.
        let program = [
            insn(LDH_ABS, 0, 0, 12),
            insn(JEQ_K, 0, 2, 0x800),
            insn(JA, 0, 0, 1),
            insn(RET_K, 0, 0, 7),
            insn(RET_K, 0, 0, 1),
            insn(RET_K, 0, 0, 0),
        ];
        for hook in [View::TcEthernet, View::TcL3, View::Xdp] {
            let insns = translate(&program, self::hook(hook), FDS).unwrap();
            let kept = without_unreachable(insns.clone());
            assert_eq!(kept, insns, "{hook:?}: translate already removed dead code");
            for (at, i) in insns.iter().enumerate() {
                let class = i.code & 0x07;
                let operation = i.code & 0xf0;
                if (class == op::JMP || class == op::JMP32)
                    && operation != op::CALL
                    && operation != op::EXIT
                {
                    let target = at as i64 + 1 + i.off as i64;
                    assert!((0..insns.len() as i64).contains(&target), "{hook:?} @{at}");
                }
            }
            assert_eq!(insns.last().unwrap().code, op::JMP | op::EXIT);
        }
    }
}
