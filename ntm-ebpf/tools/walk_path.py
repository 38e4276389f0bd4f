#!/usr/bin/env python3
"""The steady state's instructions, counted: walks one program of ntm's eBPF
object over each frame kind of the datapath bench's main table, as the
kernel's interpreter would, twice (the second time the flow is in its cache
slot), and prints the instructions and the stack loads and stores on the
path taken. The bench's timings move by a few nanoseconds from run to run
on a shared machine; this count does not, so a change to the kernel
program's steady state can be judged before it is timed
(docs/performance.md quotes it).

Written here, in Python, because nothing at hand does it: the kernel's own
test run times a program but does not count what it executes, this
machine's guests have no hardware counters, and an eBPF interpreter crate
(rbpf) would still need ntm's maps, globals and relocations stubbed as
below. It understands the instructions the object's TC programs use and
stops on any other; maps and helpers are stubs that answer as an agent
with its default settings would (443 a known port, names and handshakes
followed, the flow cache on).

usage: python3 ntm-ebpf/tools/walk_path.py [OBJECT [PROGRAM]]
  OBJECT  default: target/ebpf/x86_64/bpfel-unknown-none/release/ntm
          (built by any cargo build of ntm-agent)
  PROGRAM default: ntm_tc_ingress_eth
  -v      print the path of the second walk of each frame
  -s      and where its instructions come from: by source file (ntm-ebpf's
          and ntm-common's), and the lines that take the most (from the
          object's line info; code inlined from core or aya counts for the
          ntm line before it)
"""
import re, subprocess, sys

args = [a for a in sys.argv[1:] if a not in ('-v', '-s')]
VERBOSE = '-v' in sys.argv
SOURCES = '-s' in sys.argv
obj = args[0] if args else 'target/ebpf/x86_64/bpfel-unknown-none/release/ntm'
prog = args[1] if len(args) > 1 else 'ntm_tc_ingress_eth'
text = subprocess.run(['llvm-objdump', '-d', '-r', '--no-show-raw-insn', '--section=classifier', obj],
                      capture_output=True, text=True).stdout.splitlines()
insns = {}
start = None
infn = False
last = None
for line in text:
    m = re.match(r'^([0-9a-f]+) <(\S+)>:', line)
    if m:
        infn = (m.group(2) == prog)
        if infn:
            start = int(m.group(1), 16) // 8
        continue
    if not infn:
        continue
    m = re.match(r'^\s+(\d+):\t(.*)$', line)
    if m:
        idx = int(m.group(1)); insns[idx] = [m.group(2).strip(), None]; last = idx
        continue
    m = re.search(r'R_BPF_\S+\s+(\S+)', line)
    if m and last is not None:
        insns[last][1] = m.group(1)

# each instruction's source line (-s): the last ntm-ebpf or ntm-common line
# at or before it, as llvm-objdump's line info gives them
source = {}
if SOURCES:
    lines = subprocess.run(['llvm-objdump', '-d', '-l', '--no-show-raw-insn', '--section=classifier', obj],
                           capture_output=True, text=True).stdout.splitlines()
    infn = False
    here = '?'
    for line in lines:
        m = re.match(r'^([0-9a-f]+) <(\S+)>:', line)
        if m:
            infn = (m.group(2) == prog)
            continue
        if not infn:
            continue
        m = re.match(r'^; (\S+):(\d+)$', line)
        if m and '/ntm-ebpf/src/' in m.group(1):
            here = m.group(1).split('/ntm-ebpf/src/')[1] + ':' + m.group(2)
            continue
        if m and '/ntm-common/src/' in m.group(1):
            here = 'ntm-common/' + m.group(1).split('/ntm-common/src/')[1] + ':' + m.group(2)
            continue
        m = re.match(r'^\s+(\d+):\t', line)
        if m:
            source[int(m.group(1))] = here


def print_sources(path):
    by_file, by_line = {}, {}
    for pc in path:
        where = source.get(pc, '?')
        by_file[where.split(':')[0]] = by_file.get(where.split(':')[0], 0) + 1
        by_line[where] = by_line.get(where, 0) + 1
    print('  by file: ' + ', '.join(f'{f} {n}' for f, n in sorted(by_file.items(), key=lambda x: -x[1])))
    print('  most:    ' + ', '.join(f'{w} {n}' for w, n in sorted(by_line.items(), key=lambda x: -x[1])[:8]))


# frames (as the bench builds them)
def csum_free_ipv4(proto, l4):
    tot = 20 + len(l4)
    h = bytes([0x45, 0]) + tot.to_bytes(2, 'big') + bytes([0, 1, 0x40, 0, 64, proto, 0, 0]) + bytes([192, 0, 2, 1]) + bytes([198, 51, 100, 7])
    return h + l4
def ipv6(nh, l4):
    return bytes([0x60, 0, 0, 0]) + len(l4).to_bytes(2, 'big') + bytes([nh, 64]) + bytes([0x20, 1, 0xd, 0xb8] + [0]*11 + [1]) + bytes([0x20, 1, 0xd, 0xb8] + [0]*11 + [7]) + l4
def tcp(sp, dp, opts, payload):
    doff = (20 + len(opts)) // 4
    return sp.to_bytes(2, 'big') + dp.to_bytes(2, 'big') + bytes([0, 0, 0, 1, 0, 0, 0, 0]) + bytes([doff << 4, 0x18, 0xff, 0xff, 0, 0, 0, 0]) + opts + payload
def udp(sp, dp, payload):
    return sp.to_bytes(2, 'big') + dp.to_bytes(2, 'big') + (8 + len(payload)).to_bytes(2, 'big') + b'\0\0' + payload
def eth(et, l3):
    return bytes([2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2]) + et.to_bytes(2, 'big') + l3
FRAMES = {
    'tcp4': eth(0x0800, csum_free_ipv4(6, tcp(51000, 443, b'', b'\0' * 10))),
    'udp4': eth(0x0800, csum_free_ipv4(17, udp(40000, 443, b'\0' * 22))),
    'tcp6': eth(0x86dd, ipv6(6, tcp(51000, 443, b'', b''))),
    'tcp4o': eth(0x0800, csum_free_ipv4(6, tcp(51000, 443, b'\1' * 20, b''))),
    'udp6': eth(0x86dd, ipv6(17, udp(40000, 443, b'\0' * 1200))),
}
MASK = (1 << 64) - 1
mem = {}
def wr(addr, n, v):
    for i in range(n):
        mem[addr + i] = (v >> (8 * i)) & 0xff
def rd(addr, n):
    v = 0
    for i in range(n):
        v |= mem.get(addr + i, 0) << (8 * i)
    return v

CTX, PKT, STACK_TOP = 0x100000, 0x200000, 0x3f0000
flows = {}
syms = {}
def sym_addr(name):
    if name not in syms:
        syms[name] = 0x1000000 * (len(syms) + 1)
    return syms[name]


def reset(frame):
    """Memory as an agent with its default settings leaves it, `frame` in
    the skb, the flow tables empty."""
    mem.clear()
    flows.clear()
    wr(sym_addr('NTM_EPHEMERAL_START'), 2, 32768)
    wr(sym_addr('NTM_PORT_WORD_MASK'), 4, 2047)
    known = sym_addr('NTM_KNOWN_PORTS')
    for port_class in (0, 1):  # TCP, UDP
        word = port_class * 2048 + 443 // 32
        wr(known + 4 * word, 4, 1 << (443 % 32))
    wr(sym_addr('NTM_OBSERVE_KINDS'), 4, 0b1111)
    wr(sym_addr('NTM_OBSERVE_RATE'), 4, 2000)
    wr(sym_addr('NTM_TRACK_HANDSHAKES'), 4, 1)
    wr(sym_addr('NTM_LEARN_MACS'), 4, 1)
    for i, b in enumerate(frame):
        mem[PKT + i] = b
    # __sk_buff: len, vlan_present, vlan_tci, ifindex, data, data_end,
    # gso_segs.
    wr(CTX + 0, 4, len(frame)); wr(CTX + 20, 4, 0); wr(CTX + 24, 4, 0)
    wr(CTX + 40, 4, 5); wr(CTX + 76, 4, PKT); wr(CTX + 80, 4, PKT + len(frame))
    wr(CTX + 164, 4, 0)


CACHE, FLOWS, VALUES = 0x50000000, 0x51000000, 0x52000000


def lookup(m, key):
    if m == sym_addr('NTM_ACTIVE_FLOWS'):
        return FLOWS
    if m == sym_addr('NTM_FLOW_SLOTS'):
        idx = rd(key, 4)
        return CACHE + idx * 72 if idx < 2 * 4096 else 0
    if m == FLOWS:
        k = bytes(rd(key + i, 1) for i in range(48))
        return flows.get(k, 0)
    # any other array: its value at slot key (4-byte index)
    idx = rd(key, 4)
    addr = VALUES + (m >> 12) + idx * 64
    return addr
def update(m, key, val):
    if m == FLOWS:
        k = bytes(rd(key + i, 1) for i in range(48))
        a = 0x70000000 + 64 * len(flows)
        flows[k] = a
        wr(a, 8, rd(val, 8)); wr(a + 8, 8, rd(val + 8, 8))
    return 0

def s64(v):
    v &= MASK
    return v - (1 << 64) if v >> 63 else v

def run(verbose):
    regs = [0] * 11
    regs[1] = CTX
    regs[10] = STACK_TOP
    pc = start
    count = spills = calls = 0
    callstack = []
    path = []
    while True:
        if pc not in insns:
            raise SystemExit(f'pc {pc} outside {prog}')
        ins, reloc = insns[pc]
        count += 1
        path.append(pc)
        if verbose:
            print(pc, ins, reloc or '')
        nxt = pc + 1
        m = re.match(r'^r(\d+) = (-?\d+) ll$', ins)
        if m:
            regs[int(m.group(1))] = sym_addr(reloc) if reloc else int(m.group(2)) & MASK
            pc += 2; continue
        m = re.match(r'^if ([rw])(\d+) (\S+) (r\d+|-?\d+) goto ([+-]\d+)', ins)
        if m:
            w = m.group(1) == 'w'
            a = regs[int(m.group(2))]
            b = regs[int(m.group(4)[1:])] if m.group(4).startswith('r') else int(m.group(4)) & MASK
            if w:
                a &= 0xffffffff; b &= 0xffffffff
            op = m.group(3)
            sa, sb = s64(a), s64(b)
            c = {'==': a == b, '!=': a != b, '>': a > b, '>=': a >= b, '<': a < b, '<=': a <= b,
                 's>': sa > sb, 's>=': sa >= sb, 's<': sa < sb, 's<=': sa <= sb, '&': (a & b) != 0}[op]
            pc = pc + 1 + int(m.group(5)) if c else nxt
            continue
        m = re.match(r'^goto ([+-]\d+)', ins)
        if m:
            pc = pc + 1 + int(m.group(1)); continue
        if ins == 'exit':
            if callstack:
                saved, pc = callstack.pop()
                regs[6:11] = saved
                continue
            return count, spills, calls, path
        m = re.match(r'^call (-?\d+)$', ins)
        if m:
            n = int(m.group(1))
            calls += 1
            if reloc == '.text' or (n < 0 or n > 300) and reloc != 'memset':
                raise SystemExit(f'bpf-to-bpf call at {pc}: not on the hit path')
            if n == 1:
                regs[0] = lookup(regs[1], regs[2])
            elif n == 2:
                regs[0] = update(regs[1], regs[2], regs[3])
            elif n == 12:
                regs[0] = 0
            else:
                regs[0] = 0
            for r in range(1, 6):
                regs[r] = 0xdead
            pc = nxt; continue
        m = re.match(r'^r(\d+) = \*\(u(\d+) \*\)\(r(\d+) ([+-]) (\d+)\)$', ins)
        if m:
            base = regs[int(m.group(3))]
            off = int(m.group(5)) * (1 if m.group(4) == '+' else -1)
            regs[int(m.group(1))] = rd(base + off, int(m.group(2)) // 8)
            if m.group(3) == '10':
                spills += 1
            pc = nxt; continue
        m = re.match(r'^\*\(u(\d+) \*\)\(r(\d+) ([+-]) (\d+)\) = (r\d+|-?\d+)$', ins)
        if m:
            base = regs[int(m.group(2))]
            off = int(m.group(4)) * (1 if m.group(3) == '+' else -1)
            v = regs[int(m.group(5)[1:])] if m.group(5).startswith('r') else int(m.group(5)) & MASK
            wr(base + off, int(m.group(1)) // 8, v)
            if m.group(2) == '10':
                spills += 1
            pc = nxt; continue
        m = re.match(r'^lock \*\(u(\d+) \*\)\(r(\d+) ([+-]) (\d+)\) \+= r(\d+)$', ins)
        if m:
            base = regs[int(m.group(2))]; off = int(m.group(4)) * (1 if m.group(3) == '+' else -1)
            n = int(m.group(1)) // 8
            wr(base + off, n, rd(base + off, n) + regs[int(m.group(5))])
            pc = nxt; continue
        m = re.match(r'^r(\d+) = (be|le)(\d+) r\d+$', ins)
        if m:
            d = int(m.group(1)); n = int(m.group(3)) // 8
            v = regs[d] & ((1 << (8 * n)) - 1)
            if m.group(2) == 'be':
                v = int.from_bytes(v.to_bytes(n, 'little'), 'big')
            regs[d] = v; pc = nxt; continue
        m = re.match(r'^([rw])(\d+) (=|\+=|-=|\*=|/=|%=|&=|\|=|\^=|<<=|>>=|s>>=) (-?[rw]?\d+)$', ins)
        if m:
            w = m.group(1) == 'w'
            d = int(m.group(2)); op = m.group(3); src = m.group(4)
            b = regs[int(src[1:])] if src[0] in 'rw' else int(src) & MASK
            a = regs[d]
            if w:
                a &= 0xffffffff; b &= 0xffffffff
            bits = 32 if w else 64
            msk = (1 << bits) - 1
            if op == '=': v = b
            elif op == '+=': v = a + b
            elif op == '-=': v = a - b
            elif op == '*=': v = a * b
            elif op == '/=': v = a // b if b else 0
            elif op == '%=': v = a % b if b else a
            elif op == '&=': v = a & b
            elif op == '|=': v = a | b
            elif op == '^=': v = a ^ b
            elif op == '<<=': v = a << (b % bits)
            elif op == '>>=': v = (a & msk) >> (b % bits)
            elif op == 's>>=':
                sa = a & msk
                if sa >> (bits - 1): sa -= 1 << bits
                v = sa >> (b % bits)
            regs[d] = v & msk
            pc = nxt; continue
        m = re.match(r'^r(\d+) = -r\d+$', ins)
        if m:
            regs[int(m.group(1))] = (-regs[int(m.group(1))]) & MASK; pc = nxt; continue
        raise SystemExit(f'unknown instruction at {pc}: {ins}')


for kind in FRAMES:
    frame = FRAMES[kind]
    reset(frame)
    for walk in range(2):
        count, spills, calls, path = run(VERBOSE and walk == 1)
    print(f'{prog} {kind:<6} {count} instructions, {spills} stack loads/stores, {calls} helper calls')
    if SOURCES:
        print_sources(path)
