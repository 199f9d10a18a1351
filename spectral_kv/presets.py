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
* ``compact``: the same with 3-bit keys and 3-bit values, and a hot tier of 256 exact tokens
  (the cold-storage ratio does not depend on it). Tuned on the TUNING split (hot tier, sinks,
  widths); on validation 4.74x cold at +0.048 ± 0.054 ΔPPL, top-1 0.964, 12/15 needles (exact
  13/15; the README's text, `results/validation/cpu/`): between `balanced` and `max-compression`.
* ``spectral-5x`` / ``spectral-8x`` (candidates, chosen on the TUNING split only by attention
  fidelity of captured K/V, `results/TUNING_NOTES.md`; not yet validated, not the default):
  keys in the per-row learned basis (``spectral_quant``) with widths per segment; values
  Hadamard 2-bit (5x) or learned-basis with the tail dropped (8x). They need the tier
  manager's per-row shared-basis plumbing (`Compressor.fit`) to run in a cache.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PRESETS", "preset_fields", "design_call_fields"]

PRESETS: dict[str, dict[str, Any]] = {
    "original": dict(compressor="exact_svd", k_rank_keys=16, k_rank_values=32, coeff_bits=8, sink_tokens=0,
                     value_compressor=None, value_bits="same"),
    "fast": dict(compressor="exact_svd", k_rank_keys=16, k_rank_values=32, coeff_bits=8, sink_tokens=4,
                 value_compressor=None, value_bits="same"),
    "balanced": dict(compressor="hadamard", coeff_bits=4, value_bits=3, quant_group=128, sink_tokens=4,
                     value_compressor=None),
    "max-compression": dict(compressor="hadamard", coeff_bits=3, value_bits=2, quant_group=128, sink_tokens=4,
                            value_compressor=None),
    "compact": dict(compressor="hadamard", coeff_bits=3, value_bits=3, quant_group=128, sink_tokens=4,
                    value_compressor=None, hot_buffer_size=256),
    "spectral-5x": dict(compressor="spectral_quant", key_segments=((0.25, 4), (0.75, 3)), value_compressor="hadamard",
                        value_bits=2, quant_group=128, sink_tokens=4),
    "spectral-8x": dict(compressor="spectral_quant", key_segments=((0.5, 3), (0.5, 0)), value_compressor=None,
                        value_segments=((0.5, 2), (0.5, 0)), quant_group=128, sink_tokens=4),
}


def preset_fields(name: str) -> dict[str, Any]:
    """The `SpectralConfig` fields a preset sets (a copy)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return dict(PRESETS[name])


def design_call_fields(named: dict[str, Any], more: dict[str, Any], base_given: bool) -> dict[str, Any]:
    """Config changes of the original design's call ``patch_unsloth_attention(model, block_size=...,
    k_rank_keys=16, k_rank_values=32, ...)``.

    Parameters
    ----------
    named : dict
        The design's named arguments the caller passed (``None`` / absent = not passed).
    more : dict
        The other `SpectralConfig` fields passed.
    base_given : bool
        A ``preset`` or ``config`` was passed (then it decides the compressor).

    Returns
    -------
    dict
        ``named`` (without ``None``) and ``more``; with explicit ranks but no compressor, preset
        or config, ``compressor="spectral_quant"``: the ranks then cap the components of the
        learned basis (the default ``hadamard`` keeps every component and would refuse them).
    """
    changes = {k: v for k, v in named.items() if v is not None}
    ranks = any(changes.get(k) is not None for k in ("k_rank_keys", "k_rank_values"))
    if ranks and not base_given and "compressor" not in more and "value_compressor" not in more:
        changes["compressor"] = "spectral_quant"
    return {**changes, **more}
