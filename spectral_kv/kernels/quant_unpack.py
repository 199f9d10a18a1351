"""How the fused decode kernel turns stored codes into fp16 dot operands on CUDA (its ``FORM``).

`spectral_kv.codes` defines where a code's bits are stored; `kernels.quant_decode_triton` loads
a chunk's plane bytes as uint8 tiles, and on CUDA hands every 4 bytes (4 channels, one 32-bit
register) to one inline-PTX op built here: per plane one shift and one mask on the 4 codes at
once, an OR across planes, then two ``prmt`` that place each code byte under an fp16 exponent
byte. Triton's interpreter cannot run PTX: ``tests/test_quant_ptx.py`` executes these strings
with an emulator against the storage layout, and the kernel bench checks the GPU against the
reference.
"""

from __future__ import annotations

import functools

from ..codes import CodeLayout, planes

__all__ = ["FORMS", "chunk_asm", "asm_of", "form_constants"]

# How codes become the dots' fp16 operands on CUDA (the kernel's FORM): "magic" 1024 + code,
# "subnormal" code * 2**-24; "auto" is the default form: subnormal, measured on the H200 faster
# (no offset to fold back: 290 vs 297 us at 8 x 32K) and closer to the reference (rel. error 3.1e-4
# vs 7.9e-4: the 1024 offset cancels in fp32) -- tensor cores take fp16 subnormals as they are.
FORMS = {"magic": 1, "subnormal": 2, "auto": 2}


def form_constants(form: int, key_bcast: bool) -> dict:
    """The kernel's MAGIC (what a code's fp16 carries on top of its value), INV (1 / the value of one
    code step) and SINV (the same for the score accumulators; the per-token key path dequantizes)."""
    inv = 2.0**24 if form == 2 else 1.0
    return dict(MAGIC=1024.0 if form == 1 else 0.0, INV=inv, SINV=inv if key_bcast else 1.0)


def chunk_asm(bits: int, chunk: int, p_base: int, subnormal: bool) -> str:
    """Inline PTX for chunk ``chunk`` of a ``bits``-bit segment: inputs ``$2..`` are its planes'
    tiles, 4 bytes (4 channels) per register; outputs ``$0, $1`` the fp16 pairs of channels
    (0, 1) and (2, 3): ``1024 + code`` (each code byte under the exponent byte 0x64) or, with
    ``subnormal``, ``code * 2**-24`` (under a zero byte). Per plane one shift and one mask on the 4
    codes at once (a plane's bits never cross a byte), then two ``prmt``."""
    ops, bit = [], 0
    for j, p in enumerate(planes(bits)):
        reg, src = ("a" if j == 0 else "t"), f"${2 + j}"
        d = p * (chunk // (p // p_base)) - bit  # where the chunk's bits sit - where they go
        ops.append(f"shr.b32 {reg}, {src}, {d};" if d > 0 else f"shl.b32 {reg}, {src}, {-d};" if d < 0
                   else f"mov.b32 {reg}, {src};")
        if p < 8:
            ops.append(f"and.b32 {reg}, {reg}, {(((1 << p) - 1) << bit) * 0x01010101:#010x};")
        if j:
            ops.append("or.b32 a, a, t;")
        bit += p
    hi = "0" if subnormal else "0x64646464"
    ops += [f"prmt.b32 $0, a, {hi}, 0x4140;", f"prmt.b32 $1, a, {hi}, 0x4342;"]
    return "{ .reg .b32 a, t; " + " ".join(ops) + " }"


@functools.lru_cache(maxsize=256)
def asm_of(layout: CodeLayout, p_base: int, subnormal: bool) -> tuple:
    """Every chunk's PTX string of a (frozen) layout, ``[segment * chunks + chunk]``."""
    return tuple(chunk_asm(bits, i, p_base, subnormal) for _, bits in layout.kept_segments for i in range(8 // p_base))
