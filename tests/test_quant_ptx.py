"""The fused kernel's inline-PTX unpacking (`quant_decode._chunk_asm`), checked without a GPU.

CI has no GPU and Triton's interpreter cannot run inline PTX, so this file executes the
generated strings with a small emulator of the few PTX integer instructions they use (mov, shr,
shl, and, or, prmt) and compares every (width, chunk, base plane) against the storage layout's
own unpacking (`codes.CodeLayout`). What the emulator cannot show (Triton's packing of 4 bytes
per register, the GPU's handling of fp16 subnormals in the dots) is checked on the GPU by the
kernel bench's correctness pass against `quant_decode_reference`.
"""

import re

import pytest
import torch

from spectral_kv.codes import CodeLayout, planes, plane_rows
from spectral_kv.kernels.quant_unpack import chunk_asm as _chunk_asm

M32 = 0xFFFFFFFF


def _prmt(a: int, b: int, sel: int) -> int:
    # default mode: result byte i = byte (sel nibble i & 7) of {b, a}; nibble bit 3 = replicate that byte's sign
    src = [(a >> (8 * k)) & 0xFF for k in range(4)] + [(b >> (8 * k)) & 0xFF for k in range(4)]
    out = 0
    for i in range(4):
        nib = (sel >> (4 * i)) & 0xF
        byte = src[nib & 7]
        if nib & 8:
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * i)
    return out


def run_ptx(code: str, inputs: list[int]) -> tuple[int, int]:
    """Execute one of `_chunk_asm`'s strings on 32-bit ``inputs`` ($2, $3, ...); returns ($0, $1)."""
    body = code.strip()
    assert body.startswith("{") and body.endswith("}"), code
    regs = {f"${2 + i}": v for i, v in enumerate(inputs)}

    def val(tok: str) -> int:
        tok = tok.strip()
        if tok in regs:
            return regs[tok]
        if re.fullmatch(r"0x[0-9a-fA-F]+|\d+", tok):
            return int(tok, 0)
        raise AssertionError(f"unknown operand {tok!r} in {code!r}")

    for stmt in body[1:-1].split(";"):
        stmt = stmt.strip()
        if not stmt or stmt.startswith(".reg"):
            continue
        op, args = stmt.split(None, 1)
        dst, *src = [x.strip() for x in args.split(",")]
        x = [val(s) for s in src]
        if op == "mov.b32":
            r = x[0]
        elif op == "shr.b32":
            r = x[0] >> x[1]
        elif op == "shl.b32":
            r = (x[0] << x[1]) & M32
        elif op == "and.b32":
            r = x[0] & x[1]
        elif op == "or.b32":
            r = x[0] | x[1]
        elif op == "prmt.b32":
            r = _prmt(x[0], x[1], x[2])
        else:
            raise AssertionError(f"the emulator does not know {op!r}: keep the PTX to mov/shr/shl/and/or/prmt")
        regs[dst] = r & M32
    return regs["$0"], regs["$1"]


def _fp16(bits16: int) -> float:
    """A positive fp16 bit pattern (< 0x8000) as its value."""
    return torch.tensor([bits16], dtype=torch.int16).view(torch.float16).item()


@pytest.mark.parametrize("subnormal", [False, True])
@pytest.mark.parametrize("bits", range(1, 9))
def test_chunk_ptx_matches_the_storage_layout(bits, subnormal):
    torch.manual_seed(bits)
    T, C = 64, 8
    codes = torch.randint(0, 2**bits, (T, C), dtype=torch.uint8)
    lay = CodeLayout.uniform(T, C, bits)
    buf = lay.pack(codes)
    plane_bytes, at = [], 0
    for p in planes(bits):
        n = plane_rows(T, p) * C
        plane_bytes.append(buf[at : at + n].reshape(plane_rows(T, p), C))
        at += n
    # the kernel's base plane is the smallest of BOTH roles' layouts: any plane <= this one's smallest
    for p_base in [p for p in (1, 2, 4, 8) if p <= planes(bits)[-1]]:
        r_base = plane_rows(T, p_base)
        for i in range(8 // p_base):
            code = _chunk_asm(bits, i, p_base, subnormal)
            for r in range(r_base):
                for w in range(C // 4):
                    # plane p's tile for chunk i is tile i % m (m = p / p_base): rows r_base * (i % m) + r
                    ins = []
                    for p, pb in zip(planes(bits), plane_bytes):
                        row = pb[r_base * (i % (p // p_base)) + r, 4 * w : 4 * w + 4].tolist()
                        ins.append(sum(b << (8 * k) for k, b in enumerate(row)))
                    o0, o1 = run_ptx(code, ins)
                    got = [o0 & 0xFFFF, o0 >> 16, o1 & 0xFFFF, o1 >> 16]
                    want = codes[r_base * i + r, 4 * w : 4 * w + 4].tolist()
                    exp = 0x0000 if subnormal else 0x6400
                    assert got == [exp | c for c in want], (bits, p_base, i, r, w, code)
    # the bit patterns are the values the kernel's UNIT / MAGIC assume
    assert _fp16(0x6400 | 5) == 1024.0 + 5 and _fp16(0x0000 | 5) == 5 * 2.0**-24


def test_emulator_prmt_and_refusals():
    assert _prmt(0x44332211, 0x88776655, 0x3210) == 0x44332211
    assert _prmt(0x44332211, 0x88776655, 0x7654) == 0x88776655
    assert _prmt(0x000000F0, 0, 0x4448) == 0x000000FF  # sign replicate; bytes 1-3 from b
    with pytest.raises(AssertionError, match="does not know"):
        run_ptx("{ cvt.rn.f16.u32 $0, $2; }", [1])
