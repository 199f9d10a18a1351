"""Named configurations, each a measured point on the quality-per-byte frontier.

Every preset's numbers (cold-storage ratio, perplexity delta, top-1 agreement, needle
recall on the embedded SmolLM2) are in ``results/`` with the command that produced them;
the README's quality table is generated from those files.

* ``original``: the original design's defaults (rank 16/32 SVD, int8 coefficients, no
  attention sinks), kept to reproduce its numbers.
* ``fast``: the same SVD layout with 4 exact sink tokens; the layout the fused Triton
  decode kernel reads (the GPU speed path), at a large quality cost.
* ``balanced`` (the library default): Hadamard-rotated grouped quantization, keys 4-bit
  per channel over 128 tokens, values 3-bit per token over (up to) 128 channels.
* ``max-compression``: the same with 3-bit keys and 2-bit values.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PRESETS", "preset_fields"]

PRESETS: dict[str, dict[str, Any]] = {
    "original": dict(compressor="exact_svd", k_rank_keys=16, k_rank_values=32, coeff_bits=8, sink_tokens=0,
                     value_compressor=None, value_bits="same"),
    "fast": dict(compressor="exact_svd", k_rank_keys=16, k_rank_values=32, coeff_bits=8, sink_tokens=4,
                 value_compressor=None, value_bits="same"),
    "balanced": dict(compressor="hadamard", coeff_bits=4, value_bits=3, quant_group=128, sink_tokens=4,
                     value_compressor=None),
    "max-compression": dict(compressor="hadamard", coeff_bits=3, value_bits=2, quant_group=128, sink_tokens=4,
                            value_compressor=None),
}


def preset_fields(name: str) -> dict[str, Any]:
    """The `SpectralConfig` fields a preset sets (a copy)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return dict(PRESETS[name])
