"""Tensor parallelism (transformers' ``tp_plan="auto"``, launched with ``torchrun``).

transformers shards the attention projections by heads, so on each rank the attention module
produces ``num_key_value_heads / tp`` KV heads and ``num_attention_heads / tp`` query heads, and
the cache layer receives only those. A `SpectralCache` on that rank therefore compresses and
attends over its local KV heads with no change to the math: every KV head is compressed on its
own, and attention is per head. What this module adds is what a split must satisfy and where
each rank's saved file goes:

* every rank must hold whole KV heads and whole GQA groups (a query head and the KV head it
  reads on the same rank): ``num_key_value_heads`` and ``num_attention_heads`` both divisible
  by the tensor-parallel size. Anything else is refused by name before the first forward
  (transformers itself would fail inside a reshape, or attend across the wrong heads);
* `SpectralCache.save(path)` on a sharded cache writes ``<stem>.rank<r>-of-<w><suffix>`` with
  the rank and world size in its header, and `SpectralCache.load(path, model)` reads the
  calling rank's file and checks both.

Memory reports are per rank (the bytes this rank holds); they sum to the whole.
"""

from __future__ import annotations

import os

from .model_config import kv_heads, text_config

__all__ = ["tp_size", "check_split", "rank_and_world", "rank_path", "local_split"]


def tp_size(model) -> int:
    """The tensor-parallel degree transformers loaded ``model`` with (1: not sharded)."""
    return int(getattr(model, "tp_size", None) or getattr(model, "_tp_size", None) or 1)


def check_split(model_config, tp: int, where: str) -> None:
    """Raise ``ValueError`` naming the head count when ``tp`` ranks cannot each hold whole KV
    heads and whole GQA groups."""
    if tp <= 1:
        return
    text = text_config(model_config)
    kv, heads = kv_heads(text), text.num_attention_heads
    for name, n in (("num_key_value_heads", kv), ("num_attention_heads", heads)):
        if n % tp:
            raise ValueError(
                f"{where}: tensor parallelism over {tp} ranks splits {name}={n} unevenly; spectral_kv needs whole "
                f"KV heads and whole GQA groups ({heads // kv} query heads per KV head) on every rank: use a "
                f"tensor-parallel size that divides both num_key_value_heads={kv} and num_attention_heads={heads}"
            )


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size (``(0, 1)`` without torch.distributed)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def local_split(local_kv_heads: int, model_kv_heads: int, where: str) -> tuple[int, int] | None:
    """``(rank, world)`` when a layer holding ``local_kv_heads`` of the model's ``model_kv_heads``
    is one rank's shard, None when it holds them all; ``ValueError`` for any other split."""
    if local_kv_heads == model_kv_heads:
        return None
    rank, world = rank_and_world()
    if world <= 1 or local_kv_heads * world != model_kv_heads:
        raise ValueError(
            f"{where}: the layer holds {local_kv_heads} of the model's num_key_value_heads={model_kv_heads} KV "
            f"heads, which is not one of {world} equal tensor-parallel shards"
        )
    return rank, world


def rank_path(path: str | os.PathLike, rank: int, world: int) -> str:
    """``cache.safetensors`` -> ``cache.rank0-of-2.safetensors``."""
    stem, suffix = os.path.splitext(str(path))
    return f"{stem}.rank{rank}-of-{world}{suffix}"
