"""Measured bytes of a KV cache: walk the tensors every layer really holds.

Two counts are reported for every cache:

* ``held_bytes``: ``numel * element_size`` of every distinct tensor held (what this run
  holds; the CPU runs keep activations in float32);
* ``fp16_bytes``: the same tensors with every float32 tensor counted at 2 bytes/element,
  i.e. what the cache would hold if the model ran in float16 (integer codes unchanged).

The fp16 dense reference is ``2 (K and V) * kv_heads * head_dim * 2 bytes`` per token per layer.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

__all__ = ["walk_tensors", "count_bytes", "cache_tensors", "cache_bytes", "dense_fp16_bytes"]


def walk_tensors(obj: Any, _depth: int = 0) -> Iterable[torch.Tensor]:
    """Yield the plain tensors inside ``obj``.

    Recurses into tuples, lists, dicts and tensor subclasses that implement
    ``__tensor_flatten__`` (optimum-quanto's packed ``QTensor``s); other objects are skipped.
    """
    if _depth > 8 or obj is None:
        return
    if isinstance(obj, torch.Tensor):
        flatten = getattr(type(obj), "__tensor_flatten__", None)
        if flatten is not None and type(obj) is not torch.Tensor and not isinstance(obj, torch.nn.Parameter):
            names, _ = obj.__tensor_flatten__()
            for name in names:
                yield from walk_tensors(getattr(obj, name), _depth + 1)
        else:
            yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from walk_tensors(item, _depth + 1)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from walk_tensors(item, _depth + 1)


def count_bytes(tensors: Iterable[torch.Tensor]) -> dict[str, int]:
    """``held_bytes`` and ``fp16_bytes`` of distinct tensors (deduplicated by storage and offset)."""
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    held = fp16 = 0
    for t in tensors:
        if t.numel() == 0:
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        n = t.numel() * t.element_size()
        held += n
        fp16 += t.numel() * 2 if t.dtype == torch.float32 else n
    return {"held_bytes": held, "fp16_bytes": fp16}


def cache_tensors(layer: Any) -> list[torch.Tensor]:
    """Every tensor one cache layer holds.

    Uses ``tiers.held_tensors()`` for spectral layers, else the layer's own attributes
    (``keys``, ``values`` and a quantized layer's ``_quantized_keys`` / ``_quantized_values``).
    """
    tiers = getattr(layer, "tiers", None)
    if tiers is not None and hasattr(tiers, "held_tensors"):
        return list(tiers.held_tensors()) if tiers.initialized else []
    out: list[torch.Tensor] = []
    for name, value in vars(layer).items():
        if name in {"dtype", "device"}:
            continue
        out.extend(walk_tensors(value))
    return out


def dense_fp16_bytes(tokens: int, kv_heads: int, head_dim: int) -> int:
    """Bytes of an fp16 DynamicCache layer for ``tokens`` tokens (keys and values)."""
    return 2 * kv_heads * head_dim * 2 * tokens


def cache_bytes(cache: Any, tokens: int, kv_heads: int, head_dim: int) -> dict[str, Any]:
    """Measure a whole cache.

    Parameters
    ----------
    cache : transformers ``Cache``
    tokens : int
        Tokens of the sequence the cache has seen (the dense reference holds all of them).
    kv_heads, head_dim : int

    Returns
    -------
    dict
        ``held_bytes``, ``fp16_bytes`` (totals), ``per_layer_fp16_bytes`` (list),
        ``bytes_per_token_layer`` (fp16-equivalent), ``dense_fp16_bytes`` (total) and
        ``ratio_vs_fp16`` (dense fp16 / fp16-equivalent held).
    """
    per_layer = [count_bytes(cache_tensors(layer)) for layer in cache.layers]
    held = sum(p["held_bytes"] for p in per_layer)
    fp16 = sum(p["fp16_bytes"] for p in per_layer)
    n_layers = len(per_layer)
    dense = dense_fp16_bytes(tokens, kv_heads, head_dim) * n_layers
    return {
        "tokens": tokens,
        "held_bytes": held,
        "fp16_bytes": fp16,
        "per_layer_fp16_bytes": [p["fp16_bytes"] for p in per_layer],
        "bytes_per_token_layer": fp16 / max(tokens * n_layers, 1),
        "dense_fp16_bytes": dense,
        "dense_fp16_bytes_per_token_layer": dense / max(tokens * n_layers, 1),
        "ratio_vs_fp16": dense / fp16 if fp16 else float("nan"),
    }
