"""Memory tables measured by filling real caches (bytes from the tensors held, not formulas)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import SpectralConfig
from .tiers import TierManager

__all__ = ["ModelShape", "SHAPES", "measure_memory", "cold_bytes_per_token", "format_table"]


@dataclass(frozen=True)
class ModelShape:
    """The KV-cache shape of a model: layers, KV heads, head_dim."""

    name: str
    layers: int
    kv_heads: int
    head_dim: int


SHAPES = {
    "smollm2": ModelShape("SmolLM2-135M", 30, 3, 64),
    "mistral-7b": ModelShape("Mistral-7B", 32, 8, 128),
}


def measure_memory(
    shape: ModelShape,
    contexts=(512, 1024, 2048, 4096, 8192, 16384),
    config: SpectralConfig | None = None,
    dtype: torch.dtype = torch.float16,
    seed: int = 0,
) -> list[dict]:
    """Fill one real layer cache per context with random ``dtype`` K/V and measure it.

    Every layer of a model has the same shape and tier schedule, so one layer's measured
    bytes times ``shape.layers`` is the model's total (asserted equal to the byte count of
    every tensor the layer holds); with ``layer_overrides``, one layer per distinct layout
    times the layers using it. Random data makes the ranks full, which does not change
    the bytes (the storage is fixed-size per block).

    Returns
    -------
    list of dict with ``context``, ``dense_mb`` (what an fp16 DynamicCache holds),
    ``spectral_mb`` and ``ratio``.
    """
    config = config or SpectralConfig(verbose=False)
    named = config.overridden_layers()
    if named and named[-1] >= shape.layers:
        raise ValueError(f"layer_overrides names layer {named[-1]}, {shape.name} has {shape.layers} layers")
    layouts: dict[SpectralConfig, int] = {}
    for i in range(shape.layers):
        c = config.layer_config(i)
        layouts[c] = layouts.get(c, 0) + 1
    g = torch.Generator().manual_seed(seed)
    rows = []
    for ctx in contexts:
        dense = spectral = 0
        for layout, n_layers in layouts.items():
            # fill in prompt-sized chunks, as a prefill would
            tiers = _filled(layout, shape.kv_heads, shape.head_dim, ctx, dtype, g, chunk=2048)
            rep = tiers.memory_report()
            held = sum(t.numel() * t.element_size() for t in tiers.held_tensors())
            assert rep["total_bytes"] == held, (rep, held)
            dense += rep["dense_bytes"] * n_layers
            spectral += rep["total_bytes"] * n_layers
        rows.append(
            {"context": ctx, "dense_mb": dense / 2**20, "spectral_mb": spectral / 2**20, "ratio": dense / spectral}
        )
    return rows


def _filled(config: SpectralConfig, kv_heads: int, head_dim: int, tokens: int, dtype, g, chunk: int) -> TierManager:
    """A `TierManager` of ``config`` holding ``tokens`` random tokens ``[1, kv_heads, t, head_dim]``
    in ``dtype``, appended ``chunk`` at a time (keys then values of each chunk from ``g``)."""
    tiers = TierManager(config)
    for start in range(0, tokens, chunk):
        t = min(chunk, tokens - start)
        k = torch.randn(1, kv_heads, t, head_dim, generator=g).to(dtype)
        v = torch.randn(1, kv_heads, t, head_dim, generator=g).to(dtype)
        tiers.append(k, v)
    return tiers


def cold_bytes_per_token(config: SpectralConfig, kv_heads: int, head_dim: int, tokens: int) -> float:
    """Cold bytes per cold token of one layer (keys + values, every KV head) when a layer holds
    ``tokens`` tokens, measured from a filled `TierManager` (random fp16 K/V of shape
    ``[1, kv_heads, tokens, head_dim]``; the storage is fixed-size per block, so the data do not
    change it, and per-row shared state is amortized over the blocks as in a real segment)."""
    tiers = _filled(config.replace(verbose=False), kv_heads, head_dim, tokens, torch.float16,
                    torch.Generator().manual_seed(0), chunk=max(tokens, 1))
    rep = tiers.memory_report()
    cold_fp16 = rep["dense_bytes"] - rep["sinks"] - rep["warm"] - rep["hot"]  # exact dtype is fp16 here
    if cold_fp16 <= 0:
        raise ValueError(f"{tokens} tokens fill no cold block (block_size {config.block_size}, "
                         f"{config.sink_tokens} sinks, hot {config.hot_buffer_size})")
    return (rep["cold_keys"] + rep["cold_values"]) / (cold_fp16 // (2 * 2 * kv_heads * head_dim))


def format_table(shape: ModelShape, rows: list[dict]) -> str:
    """The original design's memory table as text."""
    lines = [
        f"{shape.name} ({shape.layers} layers x {shape.kv_heads} KV heads x head_dim {shape.head_dim}, fp16)",
        f"{'context':>8} {'standard MB':>12} {'spectral MB':>12} {'ratio':>7}",
    ]
    for r in rows:
        lines.append(f"{r['context']:>8} {r['dense_mb']:>12.2f} {r['spectral_mb']:>12.2f} {r['ratio']:>6.2f}x")
    return "\n".join(lines)
