"""Fused decode attention over shared-basis quantized cold blocks (one layer, q_len = 1).

This module is longer than ~350 lines: the reference twin, the launch plan, the input checks and the op wrapper
are one contract; the Triton kernels themselves are in quant_decode_triton.py.

The layouts ``hadamard``, ``kivi*`` and the learned ``spectral_quant`` store every block of a
layer and KV head as codes in ONE orthonormal basis ``R`` (Hadamard, identity, learned), in
segments of channels of one width each (`spectral_kv.codes.CodeLayout`, token-axis bit
planes), with keys dequantized per channel over ``key_group`` tokens
(``k = code * s[t // key_group, c] + z[t // key_group, c]``) and values per token per segment
(``v = code * s[t, seg(c)] + z[t, seg(c)]``). The op takes the model-dtype query and both
bases and returns the attention output in the model's basis and dtype: the rotations are inside
the kernel (issue 13), so a decode step is the partial kernel and the combine kernel, nothing else.

Public entry points
-------------------
quant_decode(...)            On CUDA the Gluon path where it serves (`quant_decode_gluon_path`: query rotation,
                             Gluon cold partials, a `tl` finish kernel), else the Triton split-K kernel + a
                             small combine kernel (below); needs triton.
quant_decode_reference(...)  Pure-torch fp32 twin that defines the math; always available.
torch.ops.spectral_kv.quant_decode  The kernel as a ``torch.library.custom_op`` (opaque to Inductor).

Kernel plan (issue 13; `benchmarks/quant_decode_compile.py` prints ptxas's registers and
spills for sm_90 without a GPU). One program per (batch row, KV head, run of *units*) plus one
per (row, head) for the exact tail. A unit is rows r0..r0+BR-1 of the smallest plane
(``P_BASE`` bits) of one block: ``8 / P_BASE`` chunks of BR consecutive tokens. Runs are sized
by a wave model (`choose_tiles_per_split`; a block may span programs, so batch 1 fills the SMs
too). Per unit: every plane's row tiles are loaded once, up front, as uint8 ``[BR, C]`` tiles
(one memory latency per unit; Triton's pipeliner prefetches the next units into shared memory,
``num_stages`` 3); each chunk's codes become fp16 with one inline-PTX op per 4 channels (shift
and mask per plane, two ``prmt``: `_chunk_asm`; the code as an fp16 subnormal ``code * 2**-24``,
scaled back once per accumulator). Keys: the key scale is folded into the query once per key group
(``(q * s_k) . code + q . z_k``), values: the per-token scale into p and the zero into one row
sum. The G query heads of the KV head are the M dimension (padded to 16) of every dot, so each
byte is read once for all of them. One online-softmax step (fp32, exp2) per unit.
Rotations: a cold program rotates the query of each key segment once, before its units
(``q @ R_k[c0:c0+C]ᵀ``), and after them maps its value accumulators back once
(``Σ_seg acc_seg @ R_v[c0:c0+C]``; linear, so it commutes with the combine's rescale-and-sum);
both dots in fp32 at ~fp32 accuracy (``tf32x3``). Every split's partial is then D wide, the
exact tail's in the last slot, and the combine writes the normalized output in q's dtype. The
identity basis (KIVI) is a constexpr: no dot, channels map to columns, columns past the kept
ones get no cold contribution.

Measured (H200, `benchmarks/results/quant_decode_H200.txt`): this `tl` kernel runs at ~1.0x SDPA (flash) at
8-16 x 32K, ~23% of the read bandwidth: with 255 registers only 2 programs share an SM and each chunk's fp16
codes reach the tensor cores through a shared-memory round trip (~50 barriers a unit), so the warps wait on
latency. On CUDA the op therefore runs the Gluon path (`quant_decode_gluon_path`: codes loaded straight into
the mma operand registers, no shared memory) where it serves and `auto_picks_gluon` says so: at head_dim
128 always (2.1-2.3x SDPA at 16 x 32K and 4 x 128K, 3.8x at 64 x 32K, and faster than this kernel at every
measured size since its finish kernel merges the splits in one pass: 1 x 4K 22.6 vs 29.9 us), at head_dim
64 from 32 (row, KV head) pairs; byte value statistics too (its VBYTE variant). This kernel stays the path
below that, for multi-width layouts, G > 8 and fp32 models, and the CPU twin under the interpreter.
`benchmarks/NOTES_kernels.md` has the numbers and what would move it.

Bytes per token (head_dim 128, per KV head, block 512, quant_group 128; dense bf16 K+V 512):
``balanced`` (K4/V3): keys 64 + 4 (fp16 scale+zero per channel per 128 tokens), values 48 + 4
(one segment) = 120 B, 4.27x fewer than dense; ``max-compression`` (K3/V2): 48+4 + 32+4 = 88 B,
5.82x. Roofline on an H200 (4.8 TB/s peak, ~4.2-4.5 measured): the attention step is
memory-bound while the unpack costs ~4 integer/fp32 ops per code (~1.5 codes per byte at
K4/V3: ~6 ops per byte); at 4.5 TB/s that is ~27 Tops/s of 67 (FP32 non-tensor) on 132 SMs,
so the ALU has about 2.5x headroom: fewer ops per code matter, extra passes over the bytes
do not fit.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from ..codes import CodeLayout, planes, plane_rows
from ..quant import STATS_DTYPES, group_stats
from .quant_unpack import FORMS as _FORMS, asm_of as _asm_of, form_constants as _form_constants
from . import quant_decode_gluon_path as _gluon
from .quant_plan import _segments, _words_per_row, choose_block_rows, choose_tiles_per_split
from .launch import nonempty as _nonempty, num_sms as _num_sms, pow2 as _pow2, strides as _strides

try:  # triton is optional: the reference must work without it.
    import triton

    from .quant_decode_triton import qd_combine_kernel, qd_partial_kernel

    _TRITON_IMPORT_ERROR: Exception | None = None
except Exception as exc:  # pragma: no cover - depends on the environment
    triton = None
    _TRITON_IMPORT_ERROR = exc

__all__ = ["quant_decode", "quant_decode_reference", "HAS_TRITON", "layout_pairs", "choose_tiles_per_split",
           "choose_block_rows", "gluon_serves", "BACKENDS"]

BACKENDS = ("auto", "gluon", "triton")
gluon_serves = _gluon.gluon_serves

HAS_TRITON = triton is not None
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # of q and the exact tail, and of the bases
_LOG2E = 1.4426950408889634
_VSTATS = tuple(STATS_DTYPES.values())  # value scale/zero: fp16 or the byte form


def layout_pairs(flat) -> tuple[tuple[int, int], ...]:
    """Flattened ``[channels, bits, channels, bits, ...]`` -> ``((channels, bits), ...)``."""
    flat = [int(x) for x in flat]
    if not flat or len(flat) % 2:
        raise ValueError(f"a layout is a non-empty flat list of (channels, bits) pairs, got {flat}")
    return tuple(zip(flat[0::2], flat[1::2]))


def _layouts(k_codes, v_scale, key_layout, value_layout, key_group):
    # The block size is a compile-time constant of the kernel: under dynamic-shape tracing
    # (torch.compile(dynamic=True), AOT) it arrives as a SymInt and int() specializes on it
    # (one guard; a layer's block size never changes).
    t = int(v_scale.shape[3])
    if isinstance(key_group, bool) or int(key_group) <= 0 or t % int(key_group):
        raise ValueError(f"key_group={key_group!r} must be a positive divisor of the block's {t} tokens")
    return _layout_pair(t, tuple(int(x) for x in key_layout), tuple(int(x) for x in value_layout))


@functools.lru_cache(maxsize=256)
def _layout_pair(t: int, key_layout: tuple, value_layout: tuple) -> tuple[CodeLayout, CodeLayout]:
    # Built once per (block size, layouts): every layer of a model asks for the same pair at
    # every decode step (host time, not GPU time, in eager decoding).
    return CodeLayout(t, layout_pairs(key_layout)), CodeLayout(t, layout_pairs(value_layout))


# --------------------------------------------------------------------------- reference
def quant_decode_reference(q, rk, rv, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, n_cold,
                           exact_k, exact_v, n_exact, scaling, key_layout, value_layout, key_group):
    """Decode attention over quantized shared-basis blocks plus an exact tail, in fp32 torch.

    Parameters
    ----------
    q : [B, Hq, D] fp16/bf16/fp32, the query in the model's basis (Hq = H * G; head h*G+g reads h).
    rk, rv : fp16/bf16/fp32 [B, H, R, D] (R >= the role's kept components; broadcast dims may
        have stride 0), the basis rows ``R`` of keys / values (coefficients = ``x @ Rᵀ``, the
        first kept ones stored; read as fp32), or None for the identity (KIVI).
    k_codes : uint8 [B, H, NB, nbytes_k]; k_scale, k_zero : float16 [B, H, NB, T/key_group, Dk].
    v_codes : uint8 [B, H, NB, nbytes_v]; v_scale, v_zero : float16 [B, H, NB, T, n_value_segments]
        (or byte value statistics: uint8 scale code / int8 zero point, `spectral_kv.quant.group_stats`).
    n_cold, n_exact : int32 [B]: valid blocks / exact tokens per row (the rest may be garbage).
    exact_k, exact_v : [B, H, Te, D] in q's dtype, right-padded.
    scaling : softmax scale of ``q . k``.
    key_layout, value_layout : flat (channels, bits) pairs of each role's `CodeLayout`.
    key_group : tokens per key statistic.

    Returns
    -------
    [B, Hq, D] in q's dtype: softmax over the cold tokens (scores ``(q @ R_k[:Dk]ᵀ) . k``) and the
    exact tail jointly, ``p_cold @ v_coeffs @ R_v[:Dv] + p_exact @ exact_v``; rows with no valid
    token are zeros.
    """
    kl, vl = _layouts(k_codes, v_scale, key_layout, value_layout, key_group)
    B, Hq, D = q.shape
    H, Te = exact_k.shape[1], exact_k.shape[2]
    G, NB, dev = Hq // H, k_codes.shape[2], q.device
    qf = q.float().view(B, H, G, D)
    qk = qf[..., : kl.kept] if rk is None else qf @ rk[..., : kl.kept, :].float().transpose(-1, -2)  # [B, H, G, Dk]
    blk_ok = torch.arange(NB, device=dev)[None, :] < n_cold.to(dev).long()[:, None]  # [B, NB]
    ok = blk_ok[:, None, :, None, None]
    kg = int(key_group)
    # Blocks past n_cold may hold NaN: select, never multiply, so 0 * NaN cannot leak.
    k = kl.unpack(k_codes).float() * k_scale.float().repeat_interleave(kg, 3) + k_zero.float().repeat_interleave(kg, 3)
    k = torch.where(ok, k, 0.0)  # [B, H, NB, T, Dk]
    seg = torch.repeat_interleave(torch.arange(len(vl.kept_segments), device=dev),
                                  torch.tensor([c for c, _ in vl.kept_segments], device=dev))
    vs, vz = group_stats(v_scale, v_zero)  # float16, or byte value statistics (uint8 scale code, int8 zero point)
    v = vl.unpack(v_codes).float() * vs[..., seg] + vz[..., seg]
    v = torch.where(ok, v, 0.0)  # [B, H, NB, T, Dv]
    s_cold = torch.einsum("bhgc,bhntc->bhgnt", qk, k) * scaling
    s_cold = s_cold.masked_fill(~blk_ok[:, None, None, :, None], float("-inf")).flatten(-2)
    tok_ok = (torch.arange(Te, device=dev)[None, :] < n_exact.to(dev).long()[:, None])[:, None, :, None]
    ek, ev = torch.where(tok_ok, exact_k.float(), 0.0), torch.where(tok_ok, exact_v.float(), 0.0)
    s_ex = torch.einsum("bhgd,bhtd->bhgt", qf, ek) * scaling
    s_ex = s_ex.masked_fill(~tok_ok[:, :, None, :, 0], float("-inf"))
    s = torch.cat((s_cold, s_ex), dim=-1)
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    l = p.sum(dim=-1, keepdim=True)
    inv = torch.where(l > 0, 1.0 / l.clamp_min(1e-30), torch.zeros_like(l))
    p_cold = p[..., : NB * kl.tokens].unflatten(-1, (NB, kl.tokens))
    out_cold = torch.einsum("bhgnt,bhntc->bhgc", p_cold, v) * inv  # [B, H, G, Dv], value basis
    out_exact = torch.einsum("bhgt,bhtd->bhgd", p[..., NB * kl.tokens :], ev) * inv
    cold = torch.nn.functional.pad(out_cold, (0, D - vl.kept)) if rv is None else out_cold @ rv[..., : vl.kept, :].float()
    return (cold + out_exact).reshape(B, Hq, D).to(q.dtype)


# --------------------------------------------------------------------------- launch


def _interpreted() -> bool:
    return type(qd_partial_kernel).__name__ == "InterpretedFunction"


def _kernel_constants(kl: CodeLayout, vl: CodeLayout, g: int, d: int, te: int, key_group: int, block_rows: int = 0,
                     num_warps: int = 0, num_stages: int = 0, operands: str = "fp16", unpack: str = "auto",
                     interpreted: bool = False, rot_k: bool = True, rot_v: bool = True) -> tuple[dict, dict]:
    """The partial kernel's constexprs and launch options (``num_warps``, ``num_stages``) for one
    layout pair, ``g`` query heads per KV head, head_dim ``d``, ``te`` exact tokens and whether each
    role has a basis (``rot_k``/``rot_v``; False: identity) (knobs as in `quant_decode`, 0 =
    heuristic): what `_impl` launches and `benchmarks/quant_decode_compile.py` compiles offline for sm_90."""
    p_base = min(planes(b)[-1] for _, b in kl.kept_segments + vl.kept_segments)
    r_base = plane_rows(kl.tokens, p_base)
    nw = num_warps if num_warps > 0 else 4
    br = block_rows if block_rows > 0 else choose_block_rows(_words_per_row((kl, vl), p_base), r_base, nw)
    kg = int(key_group)
    key_bcast = kg % br == 0 and r_base % br == 0
    # The PTX unpacking on CUDA with fp16 operands; the interpreter runs an explicit form's bit
    # patterns with Triton ops (EMU), and Triton's integer ops for "auto".
    form = 0 if operands != "fp16" or unpack == "triton" or (interpreted and unpack == "auto") else _FORMS[unpack]
    const = dict(
        KG=kg, R_BASE=r_base, P_BASE=p_base, BR=br, NR=-(-r_base // br),
        KSEGS=_segments(kl, p_base), VSEGS=_segments(vl, p_base),
        KASM=_asm_of(kl, p_base, form == 2) if form else (), VASM=_asm_of(vl, p_base, form == 2) if form else (),
        FORM=form, EMU=interpreted, **_form_constants(form, key_bcast),
        KEY_BCAST=key_bcast, KSTEP=kg // r_base if kg % r_base == 0 else 1, F16=operands == "fp16",
        G_PAD=_pow2(g, 16), D_PAD=_pow2(d, 16), BLOCK_E=64 if te >= 64 else _pow2(max(te, 1), 16),
        # the rotations' dots take DC columns of D at a time: a [C_PAD, DC] fp32 basis tile is
        # 32 registers a thread at C = 128, where the whole [C_PAD, D_PAD] one would be 128
        ROT_K=bool(rot_k), ROT_V=bool(rot_v), DV=vl.kept, DC=min(32, _pow2(d, 16)),
    )
    # Several segments: 2 stages (H200, `quant_decode_sweep_multi_H200.txt`, at 8 x 32K and 32 rows 1.22-1.27x
    # faster than 3; with the rows rule above instead of 16 rows, 1.45-1.9x the previous defaults). One segment:
    # 3 stages, 4% faster than 2 (`quant_decode_sweep_forms_H200.txt`).
    multi = len(kl.kept_segments) > 1 or len(vl.kept_segments) > 1
    return const, dict(num_warps=nw, num_stages=num_stages if num_stages > 0 else (2 if multi else 3))


# Where ``backend="auto"`` takes the Gluon path (where it serves). The path is three launches (query
# kernel, Gluon partials, finish kernel: ~14 us fixed at batch 1) that read the codes ~2.5x faster
# than the `tl` kernel's two. H200: at head_dim 128 it wins from the smallest measured call (Mistral
# layer, 8 KV heads, `benchmarks/results/quant_decode_H200.txt`: 1 x 4K 22.6 vs 29.9 us, 1 x 32K 46.9
# vs 61.4); at head_dim 64 (SmolLM2 shape, 3 KV heads, `e2e_decode_H200_smollm2_gluon_all.txt`) the
# `tl` kernel was faster end to end at 1 and 8 rows (3.21 vs 3.49 and 3.56 vs 3.78 ms a step,
# `e2e_decode_H200_smollm2.txt` vs the Gluon path everywhere), so
# there the Gluon path starts at GLUON_MIN_ROW_HEADS (row, KV head) pairs, the crossover of the
# previous finish kernel at head_dim 128 (not measured at head_dim 64).
GLUON_MIN_ROW_HEADS = 32


def auto_picks_gluon(head_dim: int, batch: int, kv_heads: int) -> bool:
    """Whether ``backend="auto"`` takes the Gluon path (where it serves) for ``batch`` rows of
    ``kv_heads`` KV heads of ``head_dim`` (the comment above)."""
    return head_dim >= 128 or batch * kv_heads >= GLUON_MIN_ROW_HEADS


def _impl(q, rk, rv, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, n_cold, exact_k, exact_v, n_exact,
          scaling, key_layout, value_layout, key_group, tiles_per_split, block_rows, num_warps, num_stages, operands,
          max_registers=0, unpack="auto", cold_blocks=0, backend="auto"):
    kl, vl = _layouts(k_codes, v_scale, key_layout, value_layout, key_group)
    # the Gluon path's checks only where it would be taken (they run once per layer and step)
    if backend == "gluon" or (backend == "auto" and auto_picks_gluon(q.shape[2], q.shape[0], exact_k.shape[1])):
        ok, why = _gluon.gluon_serves(q, k_codes, k_scale, v_codes, v_scale, kl, vl, key_group, operands, unpack,
                                      block_rows, num_warps, num_stages, _interpreted())
        if ok:
            return _gluon.gluon_decode(q, rk, rv, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, n_cold, exact_k,
                                       exact_v, n_exact, scaling, kl, vl, key_group, tiles_per_split, max_registers,
                                       cold_blocks)
        if backend == "gluon":  # forced: never a silent fallback
            raise (RuntimeError if not _gluon.QG.HAS_GLUON else ValueError)(f"quant_decode: backend='gluon' cannot serve "
                                                                           f"this call: {why}")
    B, Hq, D = q.shape
    H, Te = exact_k.shape[1], exact_k.shape[2]
    G, NB, dev = Hq // H, k_codes.shape[2], q.device
    const, opts = _kernel_constants(kl, vl, G, D, Te, key_group, block_rows, num_warps, num_stages, operands, unpack,
                                   _interpreted(), rk is not None, rv is not None)
    nr, G_PAD, D_PAD = const["NR"], const["G_PAD"], const["D_PAD"]
    # planned for the blocks in use (a static pool's spare slots are covered by splits that exit at once)
    in_use = min(cold_blocks, NB) if cold_blocks > 0 else NB
    tps = tiles_per_split if tiles_per_split > 0 else choose_tiles_per_split(B * H, in_use * nr, _num_sms(dev))
    S_COLD = -(-(NB * nr) // tps) if NB > 0 else 0
    S_TOT = S_COLD + 1  # the last split: the exact tail
    m_ws = torch.empty((B * H * S_TOT, G_PAD), dtype=torch.float32, device=dev)
    l_ws = torch.empty_like(m_ws)
    # every split's partial output in the model's basis, the exact tail's in the last slot
    acc_ws = torch.empty((B * H * S_TOT, G_PAD, D_PAD), dtype=torch.float32, device=dev)
    out = torch.empty((B, Hq, D), dtype=q.dtype, device=dev)
    # identity (None): the kernel never reads the pointer (ROT_K/ROT_V false), q stands in
    qd_partial_kernel[(B * H, S_TOT)](
        q, q if rk is None else rk, q if rv is None else rv, _nonempty(k_codes), _nonempty(k_scale), _nonempty(k_zero),
        _nonempty(v_codes), _nonempty(v_scale), _nonempty(v_zero), n_cold,
        _nonempty(exact_k), _nonempty(exact_v), n_exact,
        m_ws, l_ws, acc_ws,
        float(scaling) * _LOG2E,
        H, G, D, tps, S_COLD, S_TOT,
        *q.stride(), *(rk.stride() if rk is not None else (0,) * 4), *(rv.stride() if rv is not None else (0,) * 4),
        *_strides(k_codes, 4)[:3], *_strides(k_scale, 5), *_strides(v_codes, 4)[:3], *_strides(v_scale, 5),
        *_strides(exact_k, 4), *_strides(exact_v, 4),
        **const, **opts, VBYTE=v_scale.dtype == torch.uint8,
        **({"maxnreg": max_registers} if max_registers > 0 and not _interpreted() else {}),
    )
    ch = min(32, D_PAD)  # output columns per combine program (D_PAD: a power of two >= 16)
    qd_combine_kernel[(B * H, D_PAD // ch)](
        m_ws, l_ws, acc_ws, out, H, G, D, S_TOT, *out.stride(),
        S_PAD=_pow2(S_TOT, 2), G_PAD=G_PAD, D_PAD=D_PAD, CH=ch, SB=16, num_warps=4,
    )
    return out


def _check_inputs(q, rk, rv, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, n_cold, exact_k, exact_v, n_exact,
                  key_layout, value_layout, key_group):
    kl, vl = _layouts(k_codes, v_scale, key_layout, value_layout, key_group)
    if q.dim() != 3:
        raise ValueError(f"quant_decode: q shaped {tuple(q.shape)} is not [B, Hq, D]")
    B, Hq, D = q.shape
    H, Dk = exact_k.shape[1], kl.kept
    NB, T = k_codes.shape[2], kl.tokens
    # (condition, message): a message is formatted only when its check fails; this runs once per
    # layer per decode step, and formatting every message cost ~30 µs of host time a call.
    checks = [
        (q.dtype in _DTYPES, lambda: f"q dtype {q.dtype} is not fp16/bf16/fp32"),
        (exact_k.dtype == exact_v.dtype == q.dtype, lambda: f"exact_k/exact_v dtype {exact_k.dtype}/{exact_v.dtype} != q's {q.dtype}"),
        (k_codes.dtype == v_codes.dtype == torch.uint8, lambda: f"codes must be uint8, got {k_codes.dtype}/{v_codes.dtype}"),
        (k_scale.dtype == k_zero.dtype == torch.float16 and (v_scale.dtype, v_zero.dtype) in _VSTATS,
         lambda: f"scales/zeros must be float16 (values: or uint8/int8), got {k_scale.dtype}/{k_zero.dtype}, "
         f"{v_scale.dtype}/{v_zero.dtype}"),
        (n_cold.dtype == n_exact.dtype == torch.int32, lambda: f"n_cold/n_exact must be int32, got {n_cold.dtype}/{n_exact.dtype}"),
        (H > 0 and Hq % H == 0 and Hq // H <= 16, lambda: f"Hq={Hq} must be a multiple of H={H} with at most 16 heads per group"),
        (exact_k.shape[3] == D, lambda: f"exact_k has head_dim {exact_k.shape[3]}, q has {D}"),
        (k_scale.shape[-1] == Dk, lambda: f"k_scale has {k_scale.shape[-1]} channels, key_layout keeps {Dk}"),
        (k_codes.shape == (B, H, NB, kl.nbytes), lambda: f"k_codes shaped {tuple(k_codes.shape)}, expected {(B, H, NB, kl.nbytes)}"),
        (v_codes.shape == (B, H, NB, vl.nbytes), lambda: f"v_codes shaped {tuple(v_codes.shape)}, expected {(B, H, NB, vl.nbytes)}"),
        (k_scale.shape == k_zero.shape == (B, H, NB, T // int(key_group), Dk) and k_scale.stride() == k_zero.stride(),
         lambda: f"k_scale/k_zero shaped {tuple(k_scale.shape)}/{tuple(k_zero.shape)} (equal strides), expected {(B, H, NB, T // int(key_group), Dk)}"),
        (v_scale.shape == v_zero.shape == (B, H, NB, T, len(vl.kept_segments)) and v_scale.stride() == v_zero.stride(),
         lambda: f"v_scale/v_zero shaped {tuple(v_scale.shape)}/{tuple(v_zero.shape)} (equal strides), expected {(B, H, NB, T, len(vl.kept_segments))}"),
        (exact_v.shape == exact_k.shape and exact_k.shape[0] == B, lambda: "exact_k/exact_v must both be [B, H, Te, D]"),
        (n_cold.shape == n_exact.shape == (B,), lambda: f"n_cold/n_exact must be [B={B}]"),
    ]
    for role, codes, lay, rot in (("key", k_codes, kl, rk), ("value", v_codes, vl, rv)):
        name, rname = ("k_codes", "rk") if role == "key" else ("v_codes", "rv")
        checks += [
            (rot is None or (rot.dtype in _DTYPES and rot.dim() == 4 and rot.shape[:2] == (B, H)
                             and rot.shape[3] == D and rot.shape[2] >= lay.kept),
             lambda rname=rname, rot=rot, lay=lay: f"{rname} must be fp16/bf16/fp32 [B={B}, H={H}, R >= {lay.kept}, D={D}] "
             f"(the {role} basis rows; None: identity), got {rot.dtype} {tuple(rot.shape)}"),
            (lay.kept <= D, lambda role=role, lay=lay: f"the {role} layout keeps {lay.kept} > head_dim {D} components"),
            (all(c % 4 == 0 for c, _ in lay.kept_segments),
             lambda role=role, lay=lay: f"{role} segments {lay.kept_segments}: the kernel unpacks 4 channels per 32-bit "
             "register, so every kept segment's channels must be a multiple of 4"),
            # 4 codes a register: a contiguous last dim, 4-byte aligned blocks and start
            (codes.numel() == 0 or (codes.stride(-1) == 1 and all(s % 4 == 0 for s in codes.stride()[:-1])
                                    and codes.storage_offset() % 4 == 0),
             lambda name=name, codes=codes: f"{name} (strides {tuple(codes.stride())}, storage offset "
             f"{codes.storage_offset()}) must have a "
             "contiguous last dim and 4-byte aligned rows"),
        ]
    for ok, msg in checks:
        if not ok:
            raise ValueError(f"quant_decode: {msg()}")


if HAS_TRITON:
    from torch.library import custom_op

    # A custom_op (opaque to Inductor), not a triton_op: under torch.compile Inductor would analyze a
    # triton_op's kernel for the tensors it writes, cannot read its impure inline PTX (impure on
    # purpose, quant_decode_triton's docstring), then treats every input as written and fails on
    # the stride-0 expanded bases (H200, StaticDecoder(compile=True): "more than one element of the
    # written-to tensor refers to a single memory location"). Opaque, it is one extern call.
    @custom_op("spectral_kv::quant_decode", mutates_args=())
    def _quant_decode_op(
        q: torch.Tensor, rk: Optional[torch.Tensor], rv: Optional[torch.Tensor],
        k_codes: torch.Tensor, k_scale: torch.Tensor, k_zero: torch.Tensor,
        v_codes: torch.Tensor, v_scale: torch.Tensor, v_zero: torch.Tensor,
        n_cold: torch.Tensor, exact_k: torch.Tensor, exact_v: torch.Tensor, n_exact: torch.Tensor,
        scaling: float, key_layout: list[int], value_layout: list[int], key_group: int,
        tiles_per_split: int = 0, block_rows: int = 0, num_warps: int = 0, num_stages: int = 0,
        operands: str = "fp16", max_registers: int = 0, unpack: str = "auto", cold_blocks: int = 0,
        backend: str = "auto",
    ) -> torch.Tensor:
        return _impl(q, rk, rv, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, n_cold, exact_k, exact_v, n_exact,
                     scaling, key_layout, value_layout, key_group, tiles_per_split, block_rows, num_warps, num_stages,
                     operands, max_registers, unpack, cold_blocks, backend)

    @_quant_decode_op.register_fake
    def _quant_decode_fake(q, rk, rv, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, n_cold, exact_k, exact_v,
                           n_exact, scaling, key_layout, value_layout, key_group, tiles_per_split=0, block_rows=0,
                           num_warps=0, num_stages=0, operands="fp16", max_registers=0, unpack="auto", cold_blocks=0,
                           backend="auto"):
        return q.new_empty(q.shape)


def quant_decode(q, rk, rv, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, n_cold, exact_k, exact_v, n_exact,
                 scaling, key_layout, value_layout, key_group, *, tiles_per_split: int = 0, block_rows: int = 0,
                 num_warps: int = 0, num_stages: int = 0, operands: str = "fp16", max_registers: int = 0,
                 unpack: str = "auto", cold_blocks: int = 0, backend: str = "auto"):
    """Fused decode on the GPU; same contract as :func:`quant_decode_reference` (shapes there).

    ``backend``: ``"auto"`` (default) runs the Gluon path (`quant_decode_gluon_path`) where
    `auto_picks_gluon` (head_dim 128, or from `GLUON_MIN_ROW_HEADS` (row, KV head) pairs) and
    `gluon_serves` say it can (CUDA, gluon importable, one segment per role of width 2/3/4/8
    keeping 64 or 128 channels, G <= 8, fp16 operands, ``unpack="auto"``, none of the `tl` kernel's
    knobs ``block_rows`` / ``num_warps`` / ``num_stages`` set), else the `tl` kernel: choosing it
    there is by design, not a fallback from an error. ``"gluon"`` forces the Gluon path and raises
    (``ValueError``; ``RuntimeError`` without gluon) naming why it cannot serve; ``"triton"`` forces
    the `tl` kernel. ``tiles_per_split`` and ``max_registers`` apply to whichever cold kernel runs
    (the Gluon kernel's units are 16 rows of the smallest plane of a block).

    Tuning knobs, 0 = heuristic: ``block_rows`` (rows of the smallest plane per unit, a power of
    two >= 16; a unit is ``block_rows * 8 / p_min`` tokens of one block), ``tiles_per_split``
    (units per program), ``num_warps``, ``num_stages``. ``operands``: the dtype of the dots'
    inputs, ``"fp16"`` (codes exact, the query times the key scale and p times the value scale
    rounded to fp16: ~5e-4 relative per term) or ``"fp32"`` (tf32 on the GPU, exact fp32 under the
    interpreter). ``max_registers``: ptxas's register cap per thread (``maxnreg``; 0 = none): fewer
    registers, more resident programs per SM, some spills. ``unpack``: ``"auto"`` turns codes into
    fp16 with inline PTX on CUDA (fp16 operands), ``"triton"`` with Triton integer ops (what the
    interpreter always runs; a GPU check of the PTX against it). ``cold_blocks``: how many blocks
    the widest row holds now (0: all ``NB``), so static pools with spare slots plan their splits
    for the blocks in use; every slot is still covered, results do not depend on it. Expect ~1e-3 relative difference from
    the reference on the GPU.
    Raises ``ValueError`` naming a bad argument; ``RuntimeError`` without triton.
    """
    if not HAS_TRITON:
        raise RuntimeError(f"spectral_kv.kernels.quant_decode needs triton; import failed with {_TRITON_IMPORT_ERROR!r}. "
                           "Use quant_decode_reference for a pure-torch path.")
    _check_inputs(q, rk, rv, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, n_cold, exact_k, exact_v, n_exact,
                  key_layout, value_layout, key_group)
    if block_rows and (block_rows < 16 or block_rows & (block_rows - 1)):
        raise ValueError(f"block_rows={block_rows} must be a power of two >= 16")
    if operands not in ("fp16", "fp32"):
        raise ValueError(f"operands={operands!r} must be 'fp16' or 'fp32'")
    if isinstance(cold_blocks, bool) or not isinstance(cold_blocks, int) or cold_blocks < 0:
        raise ValueError(f"cold_blocks={cold_blocks!r} must be an int >= 0 (0: plan for every block of the pools)")
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} must be one of " + ", ".join(map(repr, BACKENDS)))
    if unpack not in ("auto", "triton", *_FORMS):
        raise ValueError(f"unpack={unpack!r} must be one of 'auto', 'triton', " + ", ".join(map(repr, _FORMS)))
    if isinstance(max_registers, bool) or not isinstance(max_registers, int) or not (max_registers == 0 or 24 <= max_registers <= 255):
        raise ValueError(f"max_registers={max_registers!r} must be 0 (no cap) or an int in [24, 255]")
    args = (q, rk, rv, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, n_cold, exact_k, exact_v, n_exact, float(scaling),
            [int(x) for x in key_layout], [int(x) for x in value_layout], int(key_group),
            tiles_per_split, block_rows, num_warps, num_stages, operands, max_registers, unpack, int(cold_blocks), backend)
    if q.is_cuda and q.get_device() != torch.cuda.current_device():
        with torch.cuda.device(q.device):  # Triton launches on the current device
            return torch.ops.spectral_kv.quant_decode(*args)
    return torch.ops.spectral_kv.quant_decode(*args)
