"""Triton kernels of `spectral_kv.kernels.quant_compress` (key statistics + quantize-and-pack).

Kept apart from the op so each file reads in one sitting; the math, the layout constants and
the launch live in ``quant_compress.py``. Importing this module needs triton.

Constexpr segment descriptions (built by ``quant_compress._segments``), one flat int tuple per
kept segment: ``(C, C_PAD, c0, LEVELS, NP, p_0, off_0, bit_0, p_1, off_1, bit_1, p_2, off_2,
bit_2)``: ``C`` channels from channel ``c0``, padded to ``C_PAD``; codes in ``0..LEVELS``;
``NP`` planes, plane ``j`` of ``p_j`` bits at byte ``off_j`` of the block's buffer holding bits
``bit_j .. bit_j + p_j`` of each code (unused planes: 0).

Rounding is the torch path's, op for op: ``min``/``max`` are exact, the float16 casts round to
nearest even, divisions are ``div_rn`` (IEEE, as torch's ``/``), and ``round`` is half-to-even
by the magic number ``1.5 * 2**23`` (exact for ``|v| < 2**22``; codes are clamped to
``0..LEVELS`` anyway); the byte value statistics (``BYTE``) round the scale up on its float32
bits with integer ops, as ``quant.byte_scale_code``. The one difference is the rotation's dot product (tf32x3 on the GPU, in
another summation order than the matmul of the torch path), see ``quant_compress.py``.
`benchmarks/quant_compress_compile.py` prints registers and spills for sm_90 without a GPU (8 warps,
the default: 218-255 registers, no spills).
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["qc_key_stats_kernel", "qc_pack_kernel"]


@triton.jit
def _rotated(x_ptr, r_ptr, tok, t_ok, sx_t, sx_d, D, c0, offs_c, c_ok, HAS_R: tl.constexpr, D_PAD: tl.constexpr):
    """Coefficients ``[M, C_PAD]`` float32 of tokens ``tok`` on channels ``c0 + offs_c``: ``x @ R[c0:c0+C]ᵀ``."""
    if HAS_R:
        offs_d = tl.arange(0, D_PAD)
        d_ok = offs_d < D
        x = tl.load(x_ptr + tok[:, None].to(tl.int64) * sx_t + offs_d[None, :] * sx_d,
                    mask=t_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        # rt[k, j] = R[c0 + j, k]. tf32x3 (three tf32 tensor-core products, ~fp32 accuracy): plain
        # tf32 would round R and x to 10 bits; an fp32 FMA dot ("ieee") spilled ~9 KB (ptxas sm_90).
        rt = tl.load(r_ptr + (c0 + offs_c)[None, :] * D + offs_d[:, None], mask=d_ok[:, None] & c_ok[None, :], other=0.0)
        return tl.dot(x, rt, input_precision="tf32x3")
    return tl.load(x_ptr + tok[:, None].to(tl.int64) * sx_t + (c0 + offs_c)[None, :] * sx_d,
                   mask=t_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)


@triton.jit
def _stats(lo, hi, LEVELS: tl.constexpr):
    # quant.quantize_groups: zero = fp16(lo), scale = fp16((hi - zero) / levels), 1 if not > 0
    z16 = lo.to(tl.float16)
    s16 = tl.math.div_rn(hi - z16.to(tl.float32), tl.zeros_like(hi) + LEVELS).to(tl.float16)
    s16 = tl.where(s16 > 0, s16, tl.full(s16.shape, 1.0, tl.float16))
    return s16, z16


@triton.jit
def _byte_stats(lo, hi, bad, LEVELS: tl.constexpr):
    # quant.quantize_groups(stats="byte"), op for op: the needed scale (widened so the int8 zero
    # point fits), rounded up to the uint8 scale code on its float32 bits, then the zero point.
    need = tl.maximum(tl.maximum(tl.math.div_rn(hi - lo, tl.zeros_like(hi) + LEVELS),
                                 tl.math.div_rn(hi, tl.zeros_like(hi) + (LEVELS + 128))),
                      tl.math.div_rn(-lo, tl.zeros_like(lo) + 127.0))
    bits = need.to(tl.int32, bitcast=True)
    e = (bits >> 20) + ((bits & 0xFFFFF) != 0).to(tl.int32) - 888  # quant.BYTE_SCALE_OFFSET
    e = tl.maximum(tl.where(need > 0, e, 0), 0)
    e = tl.where((e >= 255) | bad | ~(need <= 3.0e38), 255, e)  # 255: NaN (quant.BYTE_SCALE_NAN)
    ok = e != 255
    s = tl.where(ok, ((e + 888) << 20).to(tl.float32, bitcast=True), 1.0)
    zp = tl.where(ok, (tl.math.div_rn(-lo, s) + 12582912.0) - 12582912.0, 0.0)
    return e, tl.minimum(tl.maximum(zp, -128.0), 127.0), s, ok


@triton.jit
def qc_key_stats_kernel(
    x_ptr, r_ptr, sc_ptr, zr_ptr,
    sx_n, sx_t, sx_d, ss_n, ss_g, ss_d,
    D,
    KG: tl.constexpr, BT: tl.constexpr, SEGS: tl.constexpr, HAS_R: tl.constexpr, D_PAD: tl.constexpr,
):
    # One program per (block, key group): per-channel min/max over KG tokens, in chunks of BT.
    n = tl.program_id(0).to(tl.int64)
    grp = tl.program_id(1)
    x_base = x_ptr + n * sx_n
    for si in tl.static_range(len(SEGS)):
        offs_c = tl.arange(0, tl.constexpr(SEGS[si][1]))
        c_ok = offs_c < SEGS[si][0]
        lo = tl.full([tl.constexpr(SEGS[si][1])], float("inf"), tl.float32)
        hi = tl.full([tl.constexpr(SEGS[si][1])], float("-inf"), tl.float32)
        for t0 in range(0, KG, BT):
            offs_t = t0 + tl.arange(0, BT)
            t_ok = offs_t < KG
            c = _rotated(x_base, r_ptr, grp * KG + offs_t, t_ok, sx_t, sx_d, D, SEGS[si][2], offs_c, c_ok, HAS_R, D_PAD)
            ok = t_ok[:, None] & c_ok[None, :]
            lo = tl.minimum(lo, tl.min(tl.where(ok, c, float("inf")), axis=0))
            hi = tl.maximum(hi, tl.max(tl.where(ok, c, float("-inf")), axis=0))
        s16, z16 = _stats(lo, hi, tl.constexpr(SEGS[si][3]))
        st = n * ss_n + grp * ss_g + (SEGS[si][2] + offs_c) * ss_d
        tl.store(sc_ptr + st, s16, mask=c_ok)
        tl.store(zr_ptr + st, z16, mask=c_ok)


@triton.jit
def _pack_plane(code, out_ptr, r0, offs_c, R_MIN: tl.constexpr, P_MIN: tl.constexpr, BR: tl.constexpr,
                C_PAD: tl.constexpr, C: tl.constexpr, P: tl.constexpr, OFF: tl.constexpr, BIT: tl.constexpr):
    """Write plane ``P`` (bits ``BIT..BIT+P``, at byte ``OFF``) of codes ``[NSUB * BR, C_PAD]``."""
    MP: tl.constexpr = P // P_MIN  # plane P's rows for these tokens: R_MIN * k + rows, k < MP
    piece = (code >> BIT) & ((tl.constexpr(1) << P) - 1)  # constexpr first: the interpreter's has no __rlshift__
    # [M] = (sub-index i, row) and i = jj * MP + k: token i sits in row R_MIN * k at shift P * jj
    piece = tl.reshape(piece, [tl.constexpr(8) // P, MP, BR, C_PAD])
    jj = tl.arange(0, tl.constexpr(8) // P)[:, None, None, None]
    byte = tl.sum(piece << (P * jj), axis=0)  # disjoint bits: the sum is the OR
    kk = tl.arange(0, MP)[:, None, None]
    r3 = (r0 + tl.arange(0, BR))[None, :, None]
    c3 = offs_c[None, None, :]
    tl.store(out_ptr + OFF + (R_MIN * kk + r3) * C + c3, byte.to(tl.uint8), mask=(r3 < R_MIN) & (c3 < C))


@triton.jit
def qc_pack_kernel(
    x_ptr, r_ptr, sc_ptr, zr_ptr, codes_ptr,
    sx_n, sx_t, sx_d, ss_n, ss_a, ss_b, sco_n,
    D,
    KG: tl.constexpr, R_MIN: tl.constexpr, P_MIN: tl.constexpr, BR: tl.constexpr, NSUB: tl.constexpr,
    SEGS: tl.constexpr, HAS_R: tl.constexpr, KEYS: tl.constexpr, BYTE: tl.constexpr, D_PAD: tl.constexpr,
):
    # One program per (block, tile of BR rows of the smallest plane): its NSUB * BR tokens
    # (sub-index i: tokens R_MIN * i + rows, codes.py) are every token those rows hold in every
    # plane, so each output byte is built here from registers and written once.
    n = tl.program_id(0).to(tl.int64)
    r0 = tl.program_id(1) * BR
    offs_m = tl.arange(0, NSUB * BR)
    rr = r0 + offs_m % BR
    row_ok = rr < R_MIN
    tok = R_MIN * (offs_m // BR) + rr  # [M] in (sub-index, row) order
    x_base = x_ptr + n * sx_n
    for si in tl.static_range(len(SEGS)):
        # constexpr names cannot be rebound per segment / plane: the tuple is read in place
        offs_c = tl.arange(0, tl.constexpr(SEGS[si][1]))
        c_ok = offs_c < SEGS[si][0]
        c = _rotated(x_base, r_ptr, tok, row_ok, sx_t, sx_d, D, SEGS[si][2], offs_c, c_ok, HAS_R, D_PAD)
        if KEYS:  # per channel over key groups: written by qc_key_stats_kernel
            st = n * ss_n + (tok // KG)[:, None].to(tl.int64) * ss_a + (SEGS[si][2] + offs_c)[None, :] * ss_b
            msk = row_ok[:, None] & c_ok[None, :]
            scale = tl.load(sc_ptr + st, mask=msk, other=1.0).to(tl.float32)
            zero = tl.load(zr_ptr + st, mask=msk, other=0.0).to(tl.float32)
        else:  # per token over the segment: every token of the block is in exactly one tile
            lo = tl.min(tl.where(c_ok[None, :], c, float("inf")), axis=1)
            hi = tl.max(tl.where(c_ok[None, :], c, float("-inf")), axis=1)
            st = n * ss_n + tok.to(tl.int64) * ss_a + si * ss_b
            if BYTE:
                # a flag, not min/max: the GPU's min/max drop NaN operands
                bad = tl.max(tl.where(c_ok[None, :] & ~((c == c) & (tl.abs(c) < float("inf"))), 1, 0), axis=1) > 0
                e, zp, s, ok = _byte_stats(lo, hi, bad, tl.constexpr(SEGS[si][3]))
                tl.store(sc_ptr + st, e.to(tl.uint8), mask=row_ok)
                tl.store(zr_ptr + st, zp.to(tl.int8), mask=row_ok)
                scale = s[:, None]
                zero = tl.zeros_like(scale)
            else:
                s16, z16 = _stats(lo, hi, tl.constexpr(SEGS[si][3]))
                tl.store(sc_ptr + st, s16, mask=row_ok)
                tl.store(zr_ptr + st, z16, mask=row_ok)
                scale = s16.to(tl.float32)[:, None]
                zero = z16.to(tl.float32)[:, None]
        v = tl.math.div_rn(c - zero, scale)
        if BYTE and not KEYS:  # x ~= (code - zp) * scale; a NaN group's codes are 0
            v = tl.where(ok[:, None], (v + 12582912.0) - 12582912.0 + zp[:, None], 0.0)
        else:
            v = (v + 12582912.0) - 12582912.0
        code = tl.minimum(tl.maximum(v, 0.0), SEGS[si][3]).to(tl.int32)
        for j in tl.static_range(tl.constexpr(SEGS[si][4])):
            _pack_plane(code, codes_ptr + n * sco_n, r0, offs_c, R_MIN, P_MIN, BR, tl.constexpr(SEGS[si][1]),
                        tl.constexpr(SEGS[si][0]), tl.constexpr(SEGS[si][5 + 3 * j]), tl.constexpr(SEGS[si][6 + 3 * j]),
                        tl.constexpr(SEGS[si][7 + 3 * j]))
