"""Teacher-forced perplexity through a (compressed) cache.

The context is prefilled into the method's cache, then the continuation is fed in chunks
of ``chunk`` tokens *through the same cache* (so the cache keeps compressing during
decode), with explicit positions (:func:`spectral_kv.eval.methods.positions`, which also makes
chunks correct after eviction).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .bytes import cache_bytes
from .methods import CacheMethod, model_kv_shape, positions

__all__ = ["SegmentRun", "run_segment"]


@dataclass
class SegmentRun:
    """Outputs of one method on one segment.

    Attributes
    ----------
    logits : Tensor[Tn, V] float32
        Row ``t`` predicts continuation token ``t`` (row 0 comes from the prefill).
    bytes_after_prefill, bytes_end : dict
        :func:`spectral_kv.eval.bytes.cache_bytes` after the prefill and at the end.
    seconds : float
    extra : dict
        Method-specific measurements (e.g. the spectral ``memory_report`` totals).
    """

    logits: torch.Tensor
    bytes_after_prefill: dict
    bytes_end: dict
    seconds: float
    extra: dict = field(default_factory=dict)


def _spectral_report(cache) -> dict[str, Any]:
    rep = getattr(cache, "memory_report", None)
    if rep is None:
        return {}
    r = rep()
    return {k: v for k, v in r.items() if k != "per_layer"}


@torch.inference_mode()
def run_segment(
    model,
    method: CacheMethod,
    context: torch.Tensor,
    continuation: torch.Tensor,
    chunk: int,
    on_prefill: Callable[[Any], None] | None = None,
    seed: tuple[list, torch.Tensor] | None = None,
) -> SegmentRun:
    """Prefill ``context`` then teacher-force ``continuation`` through ``method``'s cache.

    Parameters
    ----------
    model : causal LM (``method.setup`` already applied)
    method : CacheMethod
    context : Tensor[Tc] int64
    continuation : Tensor[Tn] int64
    chunk : int
        Tokens per decode forward (1 = token by token).
    on_prefill : callable, optional
        Called with the cache right after the prefill (fidelity probe).
    seed : (kv, first_logits), optional
        The exact prefill of ``context``: per layer ``(k, v)`` ``[1, H, Tc, D]`` and its logits row
        ``[1, V]`` float32. The cache is then built from it (:meth:`CacheMethod.seed_cache`) instead
        of prefilling again; only for methods whose prefill attends exactly (``method.can_seed``),
        for which the two are the same up to float noise (`spectral_kv.eval.niah.greedy_answer`'s convention).

    Returns
    -------
    SegmentRun
    """
    _, kv_heads, head_dim = model_kv_shape(model)
    dev = model.device  # ids and positions go where the model is (the harness runs on CUDA too)
    context, continuation = context.to(dev), continuation.to(dev)
    t0 = time.perf_counter()
    tc, tn = context.numel(), continuation.numel()
    if seed is not None:
        if not method.can_seed:
            raise ValueError(f"method {method.spec!r} evicts at prefill: its segment cannot start from a seed")
        cache = method.seed_cache(model, seed[0])
        rows = [seed[1].float().cpu()]
    else:
        cache = method.new_cache(model)
        with method.prefill_context(model):
            out = model(context[None], past_key_values=cache, use_cache=True, logits_to_keep=1)
        rows = [out.logits[0, -1:].float().cpu()]
    if on_prefill is not None:
        on_prefill(cache)
    b_prefill = cache_bytes(cache, tc, kv_heads, head_dim)
    step = max(1, chunk)
    feed = continuation[:-1]
    pos = tc
    for i in range(0, feed.numel(), step):
        piece = feed[i : i + step]
        cp, pid = positions(cache, pos, piece.numel())
        out = model(piece[None], past_key_values=cache, use_cache=True, cache_position=cp.to(dev), position_ids=pid.to(dev))
        rows.append(out.logits[0].float().cpu())
        pos += piece.numel()
    logits = torch.cat(rows, 0)
    assert logits.shape[0] == tn, (logits.shape, tn)
    b_end = cache_bytes(cache, tc + tn - 1, kv_heads, head_dim)
    extra = {"spectral_memory_report": _spectral_report(cache)} if hasattr(cache, "memory_report") else {}
    return SegmentRun(logits, b_prefill, b_end, time.perf_counter() - t0, extra)
