"""Compression of blocks into shared-basis quantized codes, as one fused op (rotate, group
min/max, quantize, pack into the token-axis bit planes of `spectral_kv.codes`).

The grouped layouts (``hadamard``, ``kivi*``) store a block ``x [T, D]`` as ``c = x @ Rᵀ``
(``R`` orthonormal, identity for KIVI) quantized asymmetrically with min/max statistics:

* keys: per channel over ``key_group`` consecutive tokens (``scale``/``zero`` ``[T/key_group, kept]``);
* values: per token over each segment of the layout (``[T, n_segments]``), float16 or, with
  ``value_stats="byte"``, a uint8 scale code and an int8 zero point (`quant.quantize_groups`).

Public entry points
-------------------
quant_compress(...)            Triton: a key-statistics kernel (keys only) + a quantize-and-pack
                               kernel; needs triton. No host sync, fixed shapes: capturable.
quant_compress_reference(...)  Pure torch, the math of ``GroupQuantCompressor.compress``; always available.
torch.ops.spectral_kv.quant_compress  The kernel as a ``torch.library.triton_op``.

Where the two can differ: without a rotation nothing (same fp32 ops, same rounding: codes,
scales and zeros are bit-identical; the byte form's scale code is integer ops on float32 bits). With one, the kernel's ``x @ Rᵀ`` is a tf32x3 dot on the
GPU (~fp32 accuracy; fp32 under the interpreter) in another summation order than torch's matmul,
so a coefficient can differ by a few ulps; a
group's min/max then moves by as much (its fp16 scale/zero by at most one fp16 ulp, and only
when the fp32 value sits at an fp16 rounding boundary) and a code whose ``(c - zero) / scale``
lies within that of a half-integer flips by one.

Cost (head_dim 128, block 512): the pack kernel reads each block once (bf16: 128 KiB) and writes
its codes and statistics; the rotation is 512 * 128 * 128 multiply-adds per block and role on the
tensor cores (keys twice: the statistics kernel recomputes it rather than storing fp32 coefficients).
"""

from __future__ import annotations

import functools

import torch

from ..quant import STATS_DTYPES, STATS_FORMS, quantize_groups
from .launch import pow2 as _pow2, is_fake as _is_fake

from ..codes import CodeLayout, planes, plane_rows

try:  # triton is optional: the reference must work without it.
    import triton

    from .quant_compress_triton import qc_key_stats_kernel, qc_pack_kernel

    _TRITON_IMPORT_ERROR: Exception | None = None
except Exception as exc:  # pragma: no cover - depends on the environment
    triton = None
    _TRITON_IMPORT_ERROR = exc

__all__ = ["quant_compress", "quant_compress_reference", "group_layout", "HAS_TRITON"]

HAS_TRITON = triton is not None
_ROLES = ("keys", "values")


@functools.lru_cache(maxsize=256)
def group_layout(role: str, tokens: int, head_dim: int, bits: int, group: int) -> CodeLayout:
    """The grouped compressors' `CodeLayout`: keys one segment of ``head_dim`` channels, values
    segments of ``min(group, head_dim)`` channels (their quant groups), all ``bits`` wide.
    Cached (the layout is immutable): every decode step of every layer asks for it."""
    if role == "keys":
        return CodeLayout(tokens, ((head_dim, bits),))
    return CodeLayout.uniform(tokens, head_dim, bits, min(group, head_dim))


def _pairs(flat) -> tuple[tuple[int, int], ...]:
    flat = [int(v) for v in flat]
    if not flat or len(flat) % 2:
        raise ValueError(f"a layout is a non-empty flat list of (channels, bits) pairs, got {flat}")
    return tuple(zip(flat[0::2], flat[1::2]))


def _check(x, rotation, layout, role, key_group, value_stats="fp16") -> CodeLayout:
    if value_stats not in STATS_FORMS:
        raise ValueError(f"quant_compress: value_stats must be one of {STATS_FORMS}, got {value_stats!r}")
    if role == "keys" and value_stats != "fp16":
        raise ValueError(f"quant_compress: value_stats={value_stats!r} applies to values; keys keep float16 statistics")
    if x.dim() != 3:
        raise ValueError(f"quant_compress: x must be [N, T, D], got shape {tuple(x.shape)}")
    n, t, d = x.shape
    if role not in _ROLES:
        raise ValueError(f"quant_compress: role must be one of {_ROLES}, got {role!r}")
    if not x.is_floating_point():
        raise ValueError(f"quant_compress: x must be floating point, got {x.dtype}")
    lay = CodeLayout(t, _pairs(layout))
    if lay.channels != d:
        raise ValueError(f"quant_compress: layout covers {lay.channels} channels, x has head_dim {d}")
    if role == "keys" and (isinstance(key_group, bool) or int(key_group) <= 0 or t % int(key_group)):
        raise ValueError(f"quant_compress: key_group={key_group!r} must be a positive divisor of the block's {t} tokens")
    if rotation is not None and (rotation.shape != (d, d) or rotation.dtype != torch.float32
                                 or rotation.device != x.device):
        raise ValueError(f"quant_compress: rotation must be float32 [{d}, {d}] on {x.device}, got "
                         f"{rotation.dtype} {tuple(rotation.shape)} on {rotation.device}")
    return lay


# --------------------------------------------------------------------------- reference
def quant_compress_reference(x, rotation, layout, role, key_group, value_stats="fp16"):
    """Rotate, quantize in groups and pack blocks, in torch.

    Parameters
    ----------
    x : [N, T, D] float (any float dtype; computed in float32).
    rotation : float32 [D, D] ``R`` on x's device (coefficients ``x @ Rᵀ``), or None (identity).
    layout : flat ``(channels, bits)`` pairs of the role's `CodeLayout` (``T`` from x; dropped
        segments are not stored).
    role : ``"keys"`` (per-channel statistics over ``key_group`` tokens) or ``"values"`` (per
        token per segment; ``key_group`` unused).
    value_stats : ``"fp16"`` or ``"byte"`` (values only): the storage form of the values'
        statistics (`spectral_kv.quant.quantize_groups`).

    Returns
    -------
    codes : uint8 [N, nbytes]; scale, zero : float16 keys [N, T/key_group, kept],
        values [N, T, n_kept_segments]; ``c ~= code * scale + zero``. Byte value statistics:
        scale uint8 (scale code), zero int8 (zero point ``zp``), ``c ~= (code - zp) * scale``
        (`spectral_kv.quant.group_stats` turns either form into float32 scale and zero).
    """
    lay = _check(x, rotation, layout, role, key_group, value_stats)
    n, t, d = x.shape
    x = x.float()
    c = (x if rotation is None else x @ rotation.T)[..., : lay.kept]
    segs = c.split([ch for ch, _ in lay.kept_segments], -1)
    if role == "keys":  # per channel over key groups of g tokens
        g = int(key_group)
        parts = [quantize_groups(seg.reshape(n, t // g, g, seg.shape[-1]), b, dim=2)
                 for seg, (_, b) in zip(segs, lay.kept_segments)]
        codes = torch.cat([p[0] for p in parts], -1).reshape(n, t, lay.kept)
        scale, zero = (torch.cat([p[i].squeeze(2) for p in parts], -1) for i in (1, 2))
    else:  # per token over each segment
        parts = [quantize_groups(seg, b, dim=2, stats=value_stats) for seg, (_, b) in zip(segs, lay.kept_segments)]
        codes = torch.cat([p[0] for p in parts], -1)
        scale, zero = (torch.cat([p[i] for p in parts], -1) for i in (1, 2))
    return lay.pack(codes), scale, zero


# --------------------------------------------------------------------------- launch


def _segments(lay: CodeLayout) -> tuple:
    """The constexpr description of `quant_compress_triton` (its module docstring)."""
    out, c0 = [], 0
    for (channels, bits), offs in zip(lay.kept_segments, lay.offsets):
        pl, bit = [], 0
        for p, off in zip(planes(bits), offs):
            pl += [p, off, bit]
            bit += p
        pl += [0] * (9 - len(pl))
        out.append((channels, _pow2(channels, 16), c0, (1 << bits) - 1, len(planes(bits)), *pl))
        c0 += channels
    return tuple(out)


def _interpreted() -> bool:
    return type(qc_pack_kernel).__name__ == "InterpretedFunction"


def _impl(x, rotation, layout, role, key_group, value_stats, block_rows, num_warps, launch):
    lay = _check(x, rotation, layout, role, key_group, value_stats)
    byte = value_stats == "byte"
    n, t, d = x.shape
    keys = role == "keys"
    kg = int(key_group) if keys else 1
    p_min = min(planes(b)[-1] for _, b in lay.kept_segments)
    r_min, nsub = plane_rows(t, p_min), 8 // p_min
    codes = torch.empty((n, lay.nbytes), dtype=torch.uint8, device=x.device)
    shape = (n, t // kg, lay.kept) if keys else (n, t, len(lay.kept_segments))
    scale_dtype, zero_dtype = STATS_DTYPES[value_stats]
    scale = torch.empty(shape, dtype=scale_dtype, device=x.device)
    zero = torch.empty(shape, dtype=zero_dtype, device=x.device)
    if n == 0 or (_interpreted() and _is_fake(x)):
        # Empty pools launch nothing; under TRITON_INTERPRET=1 wrap_triton hands back the bare
        # interpreter, which would read fake storage: shapes are all a fake kernel produces.
        return codes, scale, zero
    # Rows of the smallest plane per program: NSUB * BR tokens is the M of the rotation's dot
    # (>= 16) and ~64 keeps its [M, C] fp32 tiles in registers.
    br = block_rows if block_rows > 0 else min(_pow2(r_min, 1), max(64 // nsub, 1))
    br = max(br, 16 // nsub)
    segs, d_pad = _segments(lay), _pow2(d, 16)
    r = rotation.contiguous() if rotation is not None else x  # never read without HAS_R
    nw = num_warps if num_warps > 0 else 8
    if keys:
        launch(qc_key_stats_kernel)[(n, t // kg)](
            x, r, scale, zero, *x.stride(), *scale.stride(), d,
            KG=kg, BT=min(64, _pow2(kg, 16)), SEGS=segs, HAS_R=rotation is not None, D_PAD=d_pad, num_warps=nw,
        )
    launch(qc_pack_kernel)[(n, triton.cdiv(r_min, br))](
        x, r, scale, zero, codes, *x.stride(), *scale.stride(), codes.stride(0), d,
        KG=kg, R_MIN=r_min, P_MIN=p_min, BR=br, NSUB=nsub, SEGS=segs, HAS_R=rotation is not None, KEYS=keys,
        BYTE=byte, D_PAD=d_pad, num_warps=nw,
    )
    return codes, scale, zero


if HAS_TRITON:
    from typing import Optional

    from torch.library import triton_op, wrap_triton

    @triton_op("spectral_kv::quant_compress", mutates_args=())
    def _quant_compress_op(
        x: torch.Tensor, rotation: Optional[torch.Tensor], layout: list[int], role: str, key_group: int,
        value_stats: str = "fp16", block_rows: int = 0, num_warps: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _impl(x, rotation, layout, role, key_group, value_stats, block_rows, num_warps, wrap_triton)


def quant_compress(x, rotation, layout, role, key_group, value_stats: str = "fp16", *, block_rows: int = 0,
                   num_warps: int = 0):
    """Triton fused compression; same contract as :func:`quant_compress_reference` (shapes there).

    ``block_rows`` (rows of the smallest plane per program, a power of two; 0 = heuristic) and
    ``num_warps`` (0 = 8) are tuning knobs. Raises ``ValueError`` naming a bad argument,
    ``RuntimeError`` without triton.
    """
    if not HAS_TRITON:
        raise RuntimeError(f"spectral_kv.kernels.quant_compress needs triton; import failed with {_TRITON_IMPORT_ERROR!r}. "
                           "Use quant_compress_reference for a pure-torch path.")
    _check(x, rotation, layout, role, key_group, value_stats)
    if block_rows and (block_rows < 1 or block_rows & (block_rows - 1)):
        raise ValueError(f"quant_compress: block_rows={block_rows} must be a power of two")
    args = (x, rotation, [int(v) for v in layout], role, int(key_group), value_stats, int(block_rows), int(num_warps))
    if x.is_cuda and x.get_device() != torch.cuda.current_device():
        with torch.cuda.device(x.device):  # Triton launches on the current device
            return torch.ops.spectral_kv.quant_compress(*args)
    return torch.ops.spectral_kv.quant_compress(*args)
