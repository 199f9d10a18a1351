"""Decode attention through the fused quantized kernel, independent of the strategy API.

`quant_fused_decode` checks its inputs and runs `spectral_kv.kernels.quant_decode` over the
codes and the exact tail; the kernel applies both bases itself (the query into the key basis,
the value accumulators back), so a step is the op's two launches and nothing else. A layout it
cannot serve raises ``ValueError`` naming what; it never falls back (the caller decides, and counts).
"""

from __future__ import annotations

import functools

import torch

from ..kernels.quant_decode import quant_decode

__all__ = ["quant_fused_decode", "serves_quant_fused", "MAX_HEAD_DIM"]

MAX_HEAD_DIM = 256  # the exact tail's [16, D] query and accumulator tiles live in registers
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def serves_quant_fused(key_compressor, value_compressor) -> bool:
    """True when both compressors store quantized codes in a `CodeLayout` with a shared basis
    (``code_layout`` and ``rotation_on``; ``hadamard``, ``kivi*`` with bits set); either form
    of value statistics (float16, or ``value_stats="byte"``)."""
    return all(
        callable(getattr(c, "code_layout", None)) and callable(getattr(c, "rotation_on", None)) and c.bits is not None
        for c in (key_compressor, value_compressor)
    )


@functools.lru_cache(maxsize=256)
def _flat(layout) -> tuple[int, ...]:
    # ``(channels, bits, channels, bits, ...)`` of a (frozen, hashable) `CodeLayout`: what the
    # kernel op takes; built once per layout rather than per layer and step.
    return tuple(x for seg in layout.segments for x in seg)


def _basis(comp, shared, b, h, d, device, name):
    """The basis rows as the kernel takes them: ``[B, H, Dk, D]`` (fp16/bf16/fp32, read as fp32),
    expanded (stride 0) from shared ``[Dk, D]`` or per head ``[H, Dk, D]``; or None (identity)."""
    r = comp.rotation_on(d, device) if shared is None else shared
    if r is None:
        return None
    if r.dim() not in (2, 3, 4) or r.shape[-1] != d or (r.dim() >= 3 and r.shape[-3] != h) or (r.dim() == 4 and r.shape[0] != b):
        raise ValueError(f"quant_fused_decode: {name} shaped {tuple(r.shape)} is not [Dk, D={d}], [H={h}, Dk, D] "
                         f"or [B={b}, H, Dk, D]")
    # a view, no copy and no launch: the kernel reads the basis in its dtype (a learned one is fp16)
    return r.expand(b, h, *r.shape[-2:])


def quant_fused_decode(q, key_compressor, value_compressor, cold_k, cold_v, n_cold, exact_k, exact_v, n_exact,
                       scaling, shared_k=None, shared_v=None, cold_blocks=0):
    """One decode step of attention over quantized cold blocks and the exact tail.

    Parameters
    ----------
    q : [B, Hq, 1, D] fp16/bf16/fp32 (Hq = H * G).
    key_compressor, value_compressor : compressors with ``code_layout`` (see `serves_quant_fused`).
    cold_k, cold_v : dict of parts [B, H, NB, ...]: ``codes`` uint8 [B, H, NB, nbytes], keys'
        ``scale``/``zero`` fp16 [B, H, NB, T/key_group, D], values' [B, H, NB, T, n_segments]
        (fp16, or uint8 scale code / int8 zero point with ``value_stats="byte"``).
    n_cold, n_exact : int [B] valid blocks / exact tokens per row (device tensors).
    exact_k, exact_v : [B, H, Te, D] in q's dtype, right-padded.
    scaling : softmax scale.
    shared_k, shared_v : optional basis rows [Dk, D] (or [H, Dk, D], [B, H, Dk, D]) fp16/bf16/fp32
        overriding the compressors' rotations (a learned per-head basis); None: the
        compressor's own (identity for KIVI).
    cold_blocks : int, blocks the widest row holds now (0: all of the pools'); the kernel's
        launch plan only (`AttendView.cold_in_use`).

    Returns
    -------
    [B, Hq, 1, D] in q's dtype. The kernel's dot operands follow q's precision: fp16 for
    fp16/bf16 models (codes exact, scaled query and weights rounded to fp16), fp32 (tf32 on the
    GPU) for fp32 ones; the two rotations are fp32 at ~fp32 accuracy either way.
    """
    if q.dim() != 4 or q.shape[2] != 1:
        raise ValueError(f"quant_fused_decode serves one query token (Tq=1), got q shaped {tuple(q.shape)}")
    b, hq, _, d = q.shape
    if q.dtype not in _DTYPES or exact_k.dtype != q.dtype or exact_v.dtype != q.dtype:
        raise ValueError(f"quant_fused_decode: dtype {q.dtype} (exact {exact_k.dtype}/{exact_v.dtype}) is not one of "
                         "float16/bfloat16/float32 for q and the exact tail alike")
    if not 16 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"quant_fused_decode: head_dim={d} is outside 16..{MAX_HEAD_DIM}")
    if not serves_quant_fused(key_compressor, value_compressor):
        raise ValueError(f"quant_fused_decode cannot serve the layout {type(key_compressor).__name__} (bits "
                         f"{key_compressor.bits}) / {type(value_compressor).__name__} (bits {value_compressor.bits}): "
                         "it reads quantized codes in a CodeLayout")
    h = exact_k.shape[1]
    for role, parts in (("cold_k", cold_k), ("cold_v", cold_v)):
        if set(parts) != {"codes", "scale", "zero"}:
            raise ValueError(f"quant_fused_decode: {role} has parts {sorted(parts)}, expected codes/scale/zero")
    t = cold_v["scale"].shape[3]
    kl, vl = key_compressor.code_layout(d, t), value_compressor.code_layout(d, t)
    key_group = t // cold_k["scale"].shape[3]
    out = quant_decode(
        q.reshape(b, hq, d), _basis(key_compressor, shared_k, b, h, d, q.device, "shared_k"),
        _basis(value_compressor, shared_v, b, h, d, q.device, "shared_v"),
        cold_k["codes"], cold_k["scale"], cold_k["zero"], cold_v["codes"], cold_v["scale"],
        cold_v["zero"], n_cold.to(device=q.device, dtype=torch.int32), exact_k, exact_v,
        n_exact.to(device=q.device, dtype=torch.int32), scaling, _flat(kl), _flat(vl), key_group,
        operands="fp32" if q.dtype == torch.float32 else "fp16", cold_blocks=cold_blocks,
    )
    return out.reshape(b, hq, 1, d)
