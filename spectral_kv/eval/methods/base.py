"""`CacheMethod`: what every cache method the harness compares provides, and spec parsing."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["CacheMethod", "parse_spec", "positions", "model_kv_shape"]


def model_kv_shape(model) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of a decoder-only transformers model."""
    c = model.config.get_text_config(decoder=True)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return c.num_hidden_layers, c.num_key_value_heads, head_dim


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``"name:a=1,b=2"`` -> ``("name", {"a": "1", "b": "2"})``."""
    name, _, rest = spec.partition(":")
    opts: dict[str, str] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"bad option {item!r} in method spec {spec!r} (want key=value)")
        opts[key.strip()] = value.strip()
    return name.strip(), opts


def positions(cache, true_pos: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cache_position, position_ids)`` for feeding ``n`` tokens at sequence position ``true_pos``.

    transformers builds the causal mask (and kvpress its prefill check) from ``cache_position``
    against the cache's length; RoPE uses ``position_ids``.  For caches that keep every token
    both equal ``true_pos + arange(n)``; after eviction the cache is shorter, and a chunk with
    ``cache_position`` = true positions would see its own future.
    """
    held = int(cache.get_seq_length())
    return torch.arange(held, held + n), torch.arange(true_pos, true_pos + n)[None]


@dataclass
class CacheMethod:
    """One cache method: how to build its cache and what it holds. The base class is
    transformers' ``DynamicCache`` (the ``exact`` method); each family overrides what differs.

    Attributes
    ----------
    spec : str
        The spec string it was built from (its label in results).
    family : str
    settings : dict
        Resolved settings (recorded in the results JSON; keys starting with ``_`` are objects
        used at run time and left out).
    evicts : bool
        Drops tokens (kvpress). The cache then holds fewer entries than the sequence has
        positions, so forwards pass ``cache_position`` = the cache's own length (what
        transformers builds the causal mask from) and ``position_ids`` = the true positions
        (RoPE); see :func:`positions`.
    """

    spec: str
    family: str = "exact"
    settings: dict[str, Any] = field(default_factory=dict)
    evicts: bool = False

    # ------------------------------------------------------------------ lifecycle
    def setup(self, model) -> None:
        """Patch ``model`` if the method needs it."""

    def teardown(self, model) -> None:
        """Undo :meth:`setup`."""

    def new_cache(self, model):
        """A fresh, empty cache for one sequence."""
        from transformers import DynamicCache

        return DynamicCache(config=model.config)

    def prefill_context(self, model):
        """Context manager active during the prefill (a kvpress press, else nothing)."""
        return contextlib.nullcontext()

    @property
    def can_seed(self) -> bool:
        """Its prefill attends exactly, so its cache can be built from the exact prefill's K/V
        (:meth:`seed_cache`): true for every method except eviction, whose press reads the
        prefill's hidden states."""
        return not self.evicts

    def seed_cache(self, model, kv: list[tuple[torch.Tensor, torch.Tensor]]):
        """A fresh cache of this method holding ``kv`` (per layer ``[B, H, T, D]`` keys, values),
        equal to prefilling the same tokens through the method."""
        if not self.can_seed:
            raise ValueError(f"method {self.spec!r} evicts at prefill; its cache cannot be seeded from K/V")
        cache = self.new_cache(model)
        for i, (k, v) in enumerate(kv):
            cache.update(k, v, i)
        return cache

    # ------------------------------------------------------------------ inspection
    def dense_kv(self, cache, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Keys and values attention would read for this layer, ``[B, H, T, D]`` each;
        ``None`` for eviction methods (positions are gone; fidelity is not defined the same way)."""
        if self.evicts:
            return None
        layer = cache.layers[layer_idx]
        return layer.keys, layer.values

    def describe(self) -> dict[str, Any]:
        """JSON-able description."""
        return {
            "spec": self.spec,
            "family": self.family,
            "settings": {k: v for k, v in self.settings.items() if not k.startswith("_")},
            "evicts": self.evicts,
        }
