"""Cold-block split-K partials of `quant_decode` in Gluon, codes loaded straight into mma.sync's
operand registers (issue 13). The op's cold kernel on CUDA where `quant_decode_gluon_path.gluon_serves`
says so (``quant_decode(backend="auto")``; the finish kernel adds the exact tail and the rotation);
`benchmarks/gluon_decode.py` compiles it offline (sm_90 SASS) and checks / times it on a GPU
(`benchmarks/NOTES_kernels.md`).

The `tl` kernel sends every chunk's fp16 codes registers -> shared -> ``ldmatrix`` (~50 barriers
per 256-token unit). Here one warp is one program (it keeps its own running max / sum /
accumulator: no cross-warp traffic in the loop) and no code passes through shared memory:

* keys: ``s = (q * s_k) @ codesᵀ``; each thread loads the bytes of its B fragment
  (``DotOperandLayout(1, mma, k_width=8)``: 8 consecutive channels of one token) and turns 4 at a
  time into fp16 subnormals with the `tl` kernel's PTX (`quant_unpack.asm_of`). Key scale folded
  into the query per key group (HMUL2), the zero into a bias computed on the tensor cores.
* values: ``accᵀ [Dv, heads] = Vᵀ pᵀ``, the query heads as the N (8 when G <= 8) of m16n8k16,
  the value channels as M: half the HMMA and accumulator registers of ``p @ V`` with M = 16
  padded heads, and ``pᵀ`` is the score accumulator itself (a transpose in registers). K is tokens,
  so a register needs 2 TOKENS of one channel while storage has channels contiguous: each thread
  loads 16-byte rows (4 words of 4 channels) of its token pairs (2t, 2t+1), shifts / masks 4 codes
  at once per plane, and ONE ``prmt`` per channel pairs the two tokens (selector bit 3 copies a
  code byte's sign, 0 for codes < 128: the zero high byte of the subnormal): `pair_asm`. Row
  ``m`` of ``accᵀ`` is channel ``(m % 8) * Dv / 8 + m // 8`` (`value_column_channel`, undone at
  the store), so a thread's channels are contiguous.

Scope (`check_layouts`): one segment per role of width 2, 3, 4 or 8, fp16 subnormal codes, G <= 16
query heads per KV head, key_group a multiple of 16 dividing the block, head_dim 64 / 128; value
statistics float16 or the byte form (``value_stats="byte"``, constexpr ``VBYTE``: the uint8 scale code
decoded by an integer shift, the int8 zero point into the zero sum as ``-zp * (p * scale)``; a NaN
scale code (255) makes its split's partial NaN, what a NaN scale does in the `tl` kernel and the twin).
This module is longer than ~350 lines: the twin, the PTX and the kernel are one contract.
"""

from __future__ import annotations

import functools

import torch

from ..codes import CodeLayout, planes, plane_rows
from ..quant import BYTE_SCALE_NAN, BYTE_SCALE_OFFSET, STATS_DTYPES, STATS_FORMS, group_stats
from .launch import num_sms
from .quant_plan import _segments, choose_tiles_per_split  # the `tl` kernel's segment description and split sizes
from .quant_unpack import asm_of

try:  # Gluon ships with triton >= 3.6 (the H200 image); the module imports without it.
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import mma_v2

    GLUON_IMPORT_ERROR: Exception | None = None
except Exception as exc:  # pragma: no cover - depends on the environment
    gluon = gl = mma_v2 = None
    GLUON_IMPORT_ERROR = exc

__all__ = ["HAS_GLUON", "GLUON_IMPORT_ERROR", "ROWS", "check_layouts", "pair_asm", "unit_plan", "cold_partials",
           "cold_partials_reference", "combine_partials", "value_column_channel", "kernel_constants", "ZP_ASM"]

HAS_GLUON = gluon is not None
_FP16, _BYTE = STATS_DTYPES["fp16"], STATS_DTYPES["byte"]  # statistics (scale, zero) dtypes
ROWS = 16  # rows of the smallest plane per unit: one mma k-tile of tokens per chunk
_WIDTHS = (2, 3, 4, 8)


def check_layouts(kl: CodeLayout, vl: CodeLayout, g: int, key_group: int) -> None:
    """Raise ``ValueError`` naming what this kernel does not cover (see the module docstring)."""
    for role, lay in (("key", kl), ("value", vl)):
        if len(lay.kept_segments) != 1 or lay.kept_segments[0][1] not in _WIDTHS:
            raise ValueError(f"{role} layout {lay.segments}: the Gluon kernel takes one segment of width {_WIDTHS}")
        if lay.kept not in (64, 128):
            raise ValueError(f"{role} layout keeps {lay.kept} channels; the Gluon kernel takes 64 or 128")
    if not 1 <= g <= 16:
        raise ValueError(f"G={g} query heads per KV head; the Gluon kernel takes 1..16")
    r_base = unit_plan(kl, vl)[1]
    if key_group % ROWS or kl.tokens % key_group or r_base % ROWS:
        raise ValueError(f"key_group={key_group} with {kl.tokens}-token blocks: needs key_group % {ROWS} == 0, "
                         f"a divisor of the block, and {r_base} base-plane rows a multiple of {ROWS}")


def unit_plan(kl: CodeLayout, vl: CodeLayout) -> tuple[int, int, int]:
    """(P_BASE, R_BASE, NR): the smallest plane width of both roles, its rows, units per block."""
    p_base = min(planes(b)[-1] for _, b in kl.kept_segments + vl.kept_segments)
    r_base = plane_rows(kl.tokens, p_base)
    return p_base, r_base, max(r_base // ROWS, 1)


def value_column_channel(dv: int) -> torch.Tensor:
    """int64 [dv]: the value channel of each column of the kernel's value dot."""
    n = torch.arange(dv)
    return (n % 8) * (dv // 8) + n // 8


def pair_asm(bits: int, chunk: int, p_base: int) -> str:
    """PTX for chunk ``chunk`` of a ``bits``-bit value segment. Inputs ``$4, $5`` are plane 0's words
    (4 channels each) of tokens A and B, ``$6, $7`` plane 1's; outputs ``$0 .. $3`` the fp16x2 pairs
    ``(A_c, B_c)`` of channel c = 0..3, the code as an fp16 subnormal ``code * 2**-24``."""
    ops = []
    for t, reg in enumerate(("a", "b")):
        bit = 0
        for j, p in enumerate(planes(bits)):
            src, dst = f"${4 + 2 * j + t}", (reg if j == 0 else "t")
            d = p * (chunk // (p // p_base)) - bit
            ops.append(f"shr.b32 {dst}, {src}, {d};" if d > 0 else f"shl.b32 {dst}, {src}, {-d};" if d < 0
                       else f"mov.b32 {dst}, {src};")
            if p < 8:
                ops.append(f"and.b32 {dst}, {dst}, {(((1 << p) - 1) << bit) * 0x01010101:#010x};")
            if j:
                ops.append(f"or.b32 {reg}, {reg}, t;")
            bit += p
    for c in range(4):
        if bits < 8:  # bytes 1 / 3: the sign of code byte A_c / B_c, i.e. 0 (codes < 128)
            ops.append(f"prmt.b32 ${c}, a, b, {c | (8 | c) << 4 | (4 + c) << 8 | (12 + c) << 12:#06x};")
        else:  # 8-bit codes may have the top bit set: zero bytes from the constant 0 first
            ops.append(f"prmt.b32 t, a, 0, {(c | 4 << 4 | 4 << 8 | 4 << 12):#06x};")
            ops.append(f"prmt.b32 u, b, 0, {(c | 4 << 4 | 4 << 8 | 4 << 12):#06x};")
            ops.append(f"prmt.b32 ${c}, t, u, 0x5410;")
    return "{ .reg .b32 a, b, t, u; " + " ".join(ops) + " }"


# --------------------------------------------------------------------------- torch twin
def _unit_tokens(u: int, nr: int, r_base: int, p_base: int) -> tuple[int, torch.Tensor]:
    """Unit ``u``: (its block, its tokens [8 / p_base * ROWS] in the kernel's order)."""
    n, r0 = u // nr, (u % nr) * ROWS
    i = torch.arange(8 // p_base)[:, None]
    return n, (r_base * i + r0 + torch.arange(ROWS)[None, :]).flatten()


def cold_partials_reference(qk, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, n_cold, scaling,
                            kl: CodeLayout, vl: CodeLayout, key_group: int, tps: int):
    """What the Gluon kernel computes, in fp32 torch: the split-K partials of the cold blocks.

    Parameters as `quant_decode_reference` (qk float32 [B, Hq, Dk]; codes uint8 [B, H, NB, nbytes];
    k_scale / k_zero fp16 [B, H, NB, T / key_group, Dk]; v_scale / v_zero [B, H, NB, T, 1] fp16, or
    byte value statistics: uint8 scale code / int8 zero point, `spectral_kv.quant.group_stats`;
    n_cold int32 [B]), ``tps`` units (`unit_plan`) per split. Returns m, l float32 [B, H, S, G]
    (running max of ``scaling * log2(e) * q.k`` and the sum of ``exp2(s - m)``; -inf / 0 for an
    empty split) and acc float32 [B, H, S, G, Dv] (``sum exp2(s - m) * v``), ``S = ceil(NB * NR / tps)``.
    """
    p_base, r_base, nr = unit_plan(kl, vl)
    B, Hq, dk = qk.shape
    H, NB = k_codes.shape[1], k_codes.shape[2]
    G, S = Hq // H, -(-(NB * nr) // tps)
    kg = int(key_group)
    k = kl.unpack(k_codes).float() * k_scale.float().repeat_interleave(kg, 3) + k_zero.float().repeat_interleave(kg, 3)
    vs, vz = group_stats(v_scale, v_zero)  # float32 of either form (byte: the NaN code decodes to NaN)
    v = vl.unpack(v_codes).float() * vs + vz  # [B, H, NB, T, Dv]
    s_all = torch.einsum("bhgc,bhntc->bhgnt", qk.float().view(B, H, G, dk), k) * (scaling * 1.4426950408889634)
    m = torch.full((B, H, S, G), float("-inf"))
    l = torch.zeros((B, H, S, G))
    acc = torch.zeros((B, H, S, G, vl.kept))
    for b in range(B):
        units = int(n_cold[b]) * nr
        for sp in range(S):
            us = range(sp * tps, min(sp * tps + tps, units))
            if not us:
                continue
            s = torch.cat([s_all[b, :, :, _unit_tokens(u, nr, r_base, p_base)[0], _unit_tokens(u, nr, r_base, p_base)[1]]
                           for u in us], dim=-1)  # [H, G, tokens]
            vv = torch.cat([v[b, :, n, t] for n, t in (_unit_tokens(u, nr, r_base, p_base) for u in us)], dim=1)
            m[b, :, sp] = s.amax(-1)
            p = torch.exp2(s - m[b, :, sp, :, None])
            l[b, :, sp] = p.sum(-1)
            acc[b, :, sp] = torch.einsum("hgt,htc->hgc", p, vv)
    return m, l, acc


def combine_partials(m, l, acc):
    """Split-K partials (m, l [B, H, S, G], acc [B, H, S, G, Dv]) -> out_cold float32 [B, H * G, Dv]
    (no exact tail: `quant_decode_reference` with ``n_exact = 0``; rows with no token: zeros)."""
    mg = m.amax(2, keepdim=True)
    mg = torch.where(torch.isfinite(mg), mg, torch.zeros_like(mg))
    w = torch.exp2(m - mg)
    den = (w * l).sum(2)
    out = (w[..., None] * acc).sum(2) / torch.where(den > 0, den, torch.ones_like(den))[..., None]
    return out.flatten(1, 2)


# --------------------------------------------------------------------------- the Gluon kernel
# Byte value statistics: 4 int8 zero points (one register, ``$4``) -> fp32 ``$0 .. $3``. ptxas fuses each
# bfe + cvt into one I2F.S8 with a byte select (R.B1 ..); the compiler's own int8 -> fp32 isolates the
# high byte of each token pair first (3 instructions for it, 40 a unit more at K4/V3).
ZP_ASM = "{ .reg .b32 t; " + " ".join(f"bfe.s32 t, $4, {8 * k}, 8; cvt.rn.f32.s32 ${k}, t;" for k in range(4)) + " }"
if HAS_GLUON:
    # the byte form's scale code (quant.byte_scale), as constexprs: a jit function reads no other global
    _BYTE_OFFSET = gl.constexpr(BYTE_SCALE_OFFSET)
    _BYTE_NAN = gl.constexpr(BYTE_SCALE_NAN)
    _ZP_ASM = gl.constexpr(ZP_ASM)

    @gluon.jit
    def _key_codes(tiles, I: gl.constexpr, KSEG: gl.constexpr, P_BASE: gl.constexpr, CODE: gl.constexpr):
        # chunk I of plane j sits in its tile I % (p_j / P_BASE) (codes.py); one PTX op per 4 channels
        NP: gl.constexpr = KSEG[4]
        t0 = tiles[KSEG[8] + I % (KSEG[5] // P_BASE)]
        if NP == 1:
            f = gl.inline_asm_elementwise(CODE, "=r,=r,r", [t0], dtype=gl.float16, is_pure=True, pack=4)
        else:
            t1 = tiles[KSEG[12] + I % (KSEG[9] // P_BASE)]
            f = gl.inline_asm_elementwise(CODE, "=r,=r,r,r", [t0, t1], dtype=gl.float16, is_pure=True, pack=4)
        return f

    @gluon.jit
    def _value_codes(ta, tb, I: gl.constexpr, VSEG: gl.constexpr, P_BASE: gl.constexpr, CODE: gl.constexpr,
                     DV: gl.constexpr, VA: gl.constexpr):
        """Chunk I's value codes transposed, [DV rows, 16 tokens], in the A layout of ``accᵀ = Vᵀ pᵀ``
        (rows permuted: `value_column_channel`), from the words of tokens 2k (``ta``) and 2k+1 (``tb``)."""
        NP: gl.constexpr = VSEG[4]
        # (A, B) words side by side ([..., 2], registers): pack=2 hands the op both tokens and takes
        # back each channel's (A, B) codes as one fp16x2 register, the operand's own
        j0: gl.constexpr = VSEG[8] + I % (VSEG[5] // P_BASE)
        if NP == 1:
            o = gl.inline_asm_elementwise(CODE, "=r,=r,=r,=r,r,r", [gl.join(ta[j0], tb[j0])],
                                          dtype=(gl.float16,) * 4, is_pure=True, pack=2)
        else:
            j1: gl.constexpr = VSEG[12] + I % (VSEG[9] // P_BASE)
            o = gl.inline_asm_elementwise(CODE, "=r,=r,=r,=r,r,r,r,r", [gl.join(ta[j0], tb[j0]), gl.join(ta[j1], tb[j1])],
                                          dtype=(gl.float16,) * 4, is_pure=True, pack=2)
        # o[c][k, g, w, e]: token 2k + e, channel 4 w + c of thread g's words w -> dims (k, g, w, e, c0, c1)
        z = gl.join(gl.join(o[0], o[1]), gl.join(o[2], o[3]))
        z = gl.permute(z, [2, 5, 4, 1, 0, 3])  # (w, c1, c0, g, k, e): row g + 8 (4 w + c), token 2k + e
        return gl.convert_layout(gl.reshape(z, [DV, 16]), VA, assert_trivial=True)

    @gluon.jit
    def _heads(x, NQ: gl.constexpr, MMA: gl.constexpr):
        # a per-head vector [16] of the score layout -> [NQ] along accᵀ's columns (a few shuffles)
        if NQ == 8:
            x = gl.split(gl.permute(gl.reshape(x, [2, 8]), [1, 0]))[0]
        return gl.convert_layout(x, gl.SliceLayout(0, MMA))

    # units per split and splits change with the context: not specialized on (a recompile each time
    # one becomes 1 or a multiple of 16)
    @gluon.jit(do_not_specialize=["TPS", "S_COLD"])
    def qd_cold_gluon_kernel(
        qk_ptr, kc_ptr, ks_ptr, kz_ptr, vw_ptr, vs_ptr, vz_ptr, ncold_ptr, m_ptr, l_ptr, acc_ptr,
        qk_scale, H, TPS, S_COLD,
        sqk_b, sqk_h, skc_b, skc_h, skc_n, sks_b, sks_h, sks_n, sks_g, svw_b, svw_h, svw_n, svs_b, svs_h, svs_n,
        G: gl.constexpr, C: gl.constexpr, DV: gl.constexpr, KG: gl.constexpr, KSTEP: gl.constexpr, R_BASE: gl.constexpr,
        P_BASE: gl.constexpr, NR: gl.constexpr, KSEG: gl.constexpr, VSEG: gl.constexpr, KASM: gl.constexpr,
        VASM: gl.constexpr, INV: gl.constexpr, LV: gl.constexpr, KW: gl.constexpr, VBYTE: gl.constexpr,
    ):
        """Program (row * H + head, split): units [split * TPS, ...) of the row's cold blocks. Reads qk
        [B, H*G, >= C] (any float dtype: with an identity key basis q itself), codes uint8 (keys) / int32 words (values) [B, H, NB, ...], scales fp16; writes
        m, l fp32 [B*H*S_COLD, G] and acc fp32 [B*H*S_COLD, G, DV] (`cold_partials`): each (row, head)'s
        splits contiguous, as the finish kernel reads them."""
        MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1], instr_shape=[16, 8])
        QA: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=KW)
        KB: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=KW)
        VA: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
        PB: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)
        NQ: gl.constexpr = 8 if G <= 8 else 16  # the N of accᵀ = Vᵀ pᵀ: the query heads
        NCH: gl.constexpr = 8 // P_BASE
        DW: gl.constexpr = DV // 32  # value words (4 channels) per thread per token
        pid_bh = gl.program_id(0)
        split = gl.program_id(1)
        b = (pid_bh // H).to(gl.int64)
        h = (pid_bh % H).to(gl.int64)
        # the query [16, C] (rows >= G: zeros), scaling * log2(e) folded in
        g_a = gl.arange(0, 16, layout=gl.SliceLayout(1, QA))
        c_a = gl.arange(0, C, layout=gl.SliceLayout(0, QA))
        # fp16 once: the key scale is then one fp16 multiply per pair of channels (HMUL2)
        q16 = (gl.load(qk_ptr + b * sqk_b + (h * G + g_a)[:, None] * sqk_h + c_a[None, :],
                       mask=(g_a < G)[:, None], other=0.0).to(gl.float32) * qk_scale).to(gl.float16)
        c_k = gl.arange(0, C, layout=gl.SliceLayout(1, KB))
        n_k = gl.arange(0, 16, layout=gl.SliceLayout(0, KB))
        n_m = gl.arange(0, 16, layout=gl.SliceLayout(0, MMA))
        kp = gl.arange(0, 8, layout=gl.SliceLayout(1, gl.SliceLayout(2, LV)))[:, None, None]
        gv = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(2, LV)))[None, :, None]
        wv = gl.arange(0, DW, layout=gl.SliceLayout(0, gl.SliceLayout(1, LV)))[None, None, :]
        vw_cols = gv * DW + wv
        m_i = gl.full([16], float("-inf"), gl.float32, layout=gl.SliceLayout(1, MMA))
        # G <= 8: rows 8..15 of the score dots are padding; zeros selected there (a per-register
        # condition, folded at compile time) free their registers. (The same select on the scaled
        # query costs more register moves for the zero halves of its operand quads than it saves.)
        LIVE: gl.constexpr = 8 if G <= 8 else 16
        live_m = (gl.arange(0, 16, layout=gl.SliceLayout(1, MMA)) < LIVE)[:, None]
        l_i = gl.zeros([16], gl.float32, layout=gl.SliceLayout(1, MMA))
        z_i = gl.zeros([16], gl.float32, layout=gl.SliceLayout(1, MMA))  # sum_t p_t * z_t (the value zero)
        if VBYTE:
            e_max = gl.zeros([16], gl.int32, layout=gl.SliceLayout(0, MMA))  # the largest scale code read
        acc = gl.zeros([DV, NQ], gl.float32, layout=MMA)  # transposed: [value columns, query heads]
        n_c = gl.load(ncold_ptr + b).to(gl.int64)
        u_lo = split.to(gl.int64) * TPS
        u_hi = gl.minimum(u_lo + TPS, n_c * NR)
        for u in range(u_lo, u_hi):
            n64 = u // NR
            r0 = (u - n64 * NR) * 16
            kc_base = kc_ptr + b * skc_b + h * skc_h + n64 * skc_n
            vw_base = vw_ptr + b * svw_b + h * svw_h + n64 * svw_n
            ks_base = ks_ptr + b * sks_b + h * sks_h + n64 * sks_n
            kz_base = kz_ptr + b * sks_b + h * sks_h + n64 * sks_n
            vs_base = vs_ptr + b * svs_b + h * svs_h + n64 * svs_n
            vz_base = vz_ptr + b * svs_b + h * svs_h + n64 * svs_n
            # every byte of the unit loaded once, up front: plane j's tile k = rows r0 + R_BASE * k + 0..15
            kt = ()
            for j in gl.static_range(gl.constexpr(KSEG[4])):
                for k in gl.static_range(gl.constexpr(KSEG[5 + 4 * j] // P_BASE)):
                    kt = kt + (gl.load(kc_base + KSEG[6 + 4 * j] + (r0 + R_BASE * k + n_k)[None, :] * C + c_k[:, None]),)
            ss = ()
            for i in gl.static_range(NCH):
                if i % KSTEP == 0:  # a new key group: its scale folded into the query, its zero into a bias
                    grp = (R_BASE * i + r0) // KG
                    qs = q16 * gl.load(ks_base + grp * sks_g + c_a)[None, :]
                    # q . z_k on the tensor cores: an n8 dot with z_k broadcast over its 8 columns,
                    # then both halves of the [16, 16] score tile take the same columns (registers only)
                    kz = gl.load(kz_base + grp * sks_g + c_k)[:, None].broadcast_to([C, 8])
                    b8 = mma_v2(q16, kz, gl.zeros([16, 8], gl.float32, layout=MMA)) * (1.0 / INV)
                    s0 = gl.convert_layout(gl.reshape(gl.permute(gl.join(b8, b8), [0, 2, 1]), [16, 16]), MMA,
                                           assert_trivial=True)
                ss = ss + (gl.where(live_m, mma_v2(qs, _key_codes(kt, i, KSEG, P_BASE, gl.constexpr(KASM[i])), s0), 0.0),)
            # value words after the key dots: their registers are not live during the key phase
            ta = ()
            tb = ()
            for j in gl.static_range(gl.constexpr(VSEG[4])):
                for k in gl.static_range(gl.constexpr(VSEG[5 + 4 * j] // P_BASE)):
                    w0 = vw_base + VSEG[6 + 4 * j] // 4 + (r0 + R_BASE * k + 2 * kp) * (DV // 4) + vw_cols
                    ta = ta + (gl.load(w0),)
                    tb = tb + (gl.load(w0 + DV // 4),)
            # one online-softmax step per unit (scores in code steps: * INV)
            mx = ss[0]
            for i in gl.static_range(1, NCH):
                mx = gl.maximum(mx, ss[i])
            m_new = gl.maximum(m_i, gl.max(mx, axis=1) * INV)
            alpha = gl.exp2(m_i - m_new)
            l_t = gl.zeros([16, 16], gl.float32, layout=MMA)
            z_t = gl.zeros([16, 16], gl.float32, layout=MMA)
            acc = acc * _heads(alpha, NQ, MMA)[None, :]
            m_i = m_new
            for i in gl.static_range(NCH):
                p = gl.exp2(ss[i] * INV - m_new[:, None])
                l_t += p
                tok = R_BASE * i + r0 + n_m
                if VBYTE:  # quant.group_stats: scale = the float32 of bits (e + offset) << 20, zero = -zp * scale
                    e = gl.load(vs_base + tok).to(gl.int32)
                    # the NaN code (255) is not selected per token (ISETP + FSEL: 2 instructions a token);
                    # its split's partial is made NaN after the loop, as a NaN scale would make it
                    e_max = gl.maximum(e_max, e)
                    vs = ((e + _BYTE_OFFSET) << 20).to(gl.float32, bitcast=True)
                    pv = p * vs[None, :]
                    zp = gl.inline_asm_elementwise(_ZP_ASM, "=r,=r,=r,=r,r", [gl.load(vz_base + tok)], dtype=gl.float32,
                                                   is_pure=True, pack=4)
                    # p * zero = -(p * scale) * zp: the scaled p is there already (one FFMA a token); the sign
                    # once after the loop (here it costs an integer XOR a token)
                    z_t += pv * zp[None, :]
                else:
                    vs = gl.load(vs_base + tok).to(gl.float32)
                    vz = gl.load(vz_base + tok).to(gl.float32)
                    z_t += p * vz[None, :]
                    pv = p * vs[None, :]
                # pᵀ [16 tokens, NQ heads]: the score accumulator holds (head g, tokens 2t, 2t+1) in the
                # lanes the B operand wants them: a transpose in registers, no data movement
                pt = gl.permute(pv.to(gl.float16), [1, 0])
                if NQ == 8:
                    pt = gl.split(gl.permute(gl.reshape(pt, [16, 2, 8]), [0, 2, 1]))[0]
                acc = mma_v2(_value_codes(ta, tb, i, VSEG, P_BASE, gl.constexpr(VASM[i]), DV, VA),
                             gl.convert_layout(pt, PB, assert_trivial=True), acc)
            l_i = l_i * alpha + gl.sum(l_t, axis=1)
            z_i = z_i * alpha + gl.sum(z_t, axis=1)
        if VBYTE:  # zero = -zp * scale; a NaN scale code read anywhere in the split: the whole partial NaN
            # (a NaN scale reaches every channel and head of it through p * scale; m and l stay finite)
            z_i = gl.where(gl.max(e_max, axis=0) == _BYTE_NAN, float("nan"), -z_i)
        g_m = gl.arange(0, 16, layout=gl.SliceLayout(1, MMA))
        ws = pid_bh.to(gl.int64) * S_COLD + split
        gl.store(m_ptr + ws * G + g_m, m_i, mask=g_m < G)
        gl.store(l_ptr + ws * G + g_m, l_i, mask=g_m < G)
        row = gl.arange(0, DV, layout=gl.SliceLayout(1, MMA))
        ch = (row % 8) * (DV // 8) + row // 8  # value_column_channel
        g_v = gl.arange(0, NQ, layout=gl.SliceLayout(0, MMA))
        out = acc * INV + _heads(z_i, NQ, MMA)[None, :]
        gl.store(acc_ptr + (ws * G + g_v[None, :]) * DV + ch[:, None], out, mask=(g_v < G)[None, :])


def kernel_constants(kl: CodeLayout, vl: CodeLayout, key_group: int, key_width: int = 8,
                     value_stats: str = "fp16") -> dict:
    """The Gluon kernel's constexprs for one layout pair (needs gluon: the load layout is one).
    ``key_width``: the key dot's k_width, consecutive channels per thread (8: 8-byte key loads; 4:
    the probe's, 4-byte loads, 2290 -> 2389 instructions per unit). ``value_stats``: the value
    statistics' form (`spectral_kv.quant.STATS_FORMS`: "fp16", or "byte", ``VBYTE``). A fresh dict
    of cached values: the op asks for the same pair once per layer per decode step (PTX strings, a
    linear layout)."""
    if value_stats not in STATS_FORMS:
        raise ValueError(f"value_stats must be one of {STATS_FORMS}, got {value_stats!r}")
    return dict(_kernel_constants(kl, vl, int(key_group), int(key_width)), VBYTE=value_stats == "byte")


@functools.lru_cache(maxsize=64)
def _kernel_constants(kl: CodeLayout, vl: CodeLayout, key_group: int, key_width: int) -> dict:
    p_base, r_base, nr = unit_plan(kl, vl)
    dv, kg = vl.kept, int(key_group)
    # value words [8 pairs, 8 lane groups, DV / 32 words]: the pair index k = tig + 4 * (register bit),
    # thread g's DV / 32 words contiguous (one 16-byte load at DV = 128)
    regs = [[0, 0, 1 << i] for i in range((dv // 32).bit_length() - 1)] + [[4, 0, 0]]
    lv = gl.DistributedLinearLayout(reg_bases=regs, lane_bases=[[1, 0, 0], [2, 0, 0], [0, 1, 0], [0, 2, 0], [0, 4, 0]],
                                    warp_bases=[], block_bases=[], shape=[8, 8, dv // 32])
    vbits = vl.kept_segments[0][1]
    return dict(C=kl.kept, DV=dv, KG=kg, KSTEP=kg // r_base if kg % r_base == 0 else 1, R_BASE=r_base, P_BASE=p_base,
                NR=nr, KSEG=_segments(kl, p_base)[0], VSEG=_segments(vl, p_base)[0], KASM=asm_of(kl, p_base, True),
                VASM=tuple(pair_asm(vbits, i, p_base) for i in range(8 // p_base)), INV=2.0**24, LV=lv, KW=key_width)


def cold_partials(qk, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, n_cold, scaling, kl: CodeLayout,
                  vl: CodeLayout, key_group: int, tps: int = 0, max_registers: int = 0, key_width: int = 8):
    """The Gluon kernel on CUDA: same contract and returns as `cold_partials_reference` (``tps`` 0:
    `quant_decode.choose_tiles_per_split` with 8 one-warp programs per SM; ``max_registers``: ptxas's
    cap, 0 none: 248 registers are 8 warps per SM, 224 9, 200 10). Returns (m, l, acc, tps), each
    contiguous. ``qk`` may be any float dtype (the kernel computes in fp32 and rounds to fp16 once).
    Raises ``RuntimeError`` without gluon, ``ValueError`` for a layout or input it does not take."""
    stats = ((k_scale.dtype, k_zero.dtype), (v_scale.dtype, v_zero.dtype))
    if stats[0] != _FP16 or stats[1] not in (_FP16, _BYTE):
        raise ValueError(f"cold_partials: key scale/zero must be float16/float16 and value scale/zero float16/float16 "
                         f"or uint8/int8 (value_stats='byte'), got {k_scale.dtype}/{k_zero.dtype} and "
                         f"{v_scale.dtype}/{v_zero.dtype}")
    if not HAS_GLUON:
        raise RuntimeError(f"the Gluon kernel needs triton >= 3.6 (triton.experimental.gluon); import failed with "
                           f"{GLUON_IMPORT_ERROR!r}. Gluon has no interpreter: on CPU use cold_partials_reference.")
    check_layouts(kl, vl, qk.shape[1] // k_codes.shape[1], key_group)
    B, Hq, dk = qk.shape
    H, NB = k_codes.shape[1], k_codes.shape[2]
    G = Hq // H
    for name, t in (("qk", qk), ("k_codes", k_codes), ("k_scale", k_scale), ("v_codes", v_codes), ("v_scale", v_scale)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} (strides {tuple(t.stride())}) must have a contiguous last dim")
    if v_scale.stride(3) != 1 or k_zero.stride() != k_scale.stride() or v_zero.stride() != v_scale.stride():
        raise ValueError("v_scale's tokens must be contiguous and zeros must have their scales' strides")
    if v_codes.stride(2) % 4 or v_codes.storage_offset() % 4 or vl.nbytes % 4:
        raise ValueError(f"v_codes (strides {tuple(v_codes.stride())}) must be 4-byte aligned per block")
    const = kernel_constants(kl, vl, key_group, key_width, "byte" if stats[1] == _BYTE else "fp16")
    nr = const["NR"]
    tps = tps if tps > 0 else choose_tiles_per_split(B * H, NB * nr, num_sms(qk.device), per_sm=8)
    S = -(-(NB * nr) // tps)
    m = torch.empty((B, H, S, G), dtype=torch.float32, device=qk.device)
    l = torch.empty_like(m)
    acc = torch.empty((B, H, S, G, vl.kept), dtype=torch.float32, device=qk.device)
    vw = v_codes.view(torch.int32)
    qd_cold_gluon_kernel[(B * H, S)](
        qk, k_codes, k_scale, k_zero, vw, v_scale, v_zero, n_cold, m, l, acc,
        float(scaling) * 1.4426950408889634, H, tps, S,
        qk.stride(0), qk.stride(1), *k_codes.stride()[:3], *k_scale.stride()[:4], *vw.stride()[:3], *v_scale.stride()[:3],
        G=G, **const, num_warps=1, **({"maxnreg": max_registers} if max_registers else {}))
    return m, l, acc, tps
