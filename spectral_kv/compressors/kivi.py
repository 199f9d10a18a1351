"""KIVI-style reference quantizer (Liu et al. 2024, "KIVI: a tuning-free asymmetric 2bit
quantization for KV cache") as a `Compressor`, so it runs on the same tiers as the
spectral blocks (sinks, warm staging and the hot window stay exact).

Keys are quantized per channel (each channel's values over a group of 32 tokens share
a scale and zero point), values per token (each token's channels in groups of 32 share
them), asymmetric min/max, codes packed into token-axis bit planes, scale and zero point in float16
(values: one byte each with ``value_stats="byte"``, as ``hadamard``).
Its blocks are codes in the identity basis, so it is factored (full rank, nothing stored
per block beyond the codes): the ``spectral`` strategy and the fused quantized kernel read it
like ``hadamard``. Registered names: ``kivi4`` and ``kivi2``.
"""

from __future__ import annotations

from .base import FactoredCompressor, register_compressor
from .grouped import GroupQuantCompressor

__all__ = ["GROUP", "KiviCompressor", "Kivi4", "Kivi2"]

GROUP = 32


class KiviCompressor(GroupQuantCompressor, FactoredCompressor):
    """KIVI quantization of ``[N, T, D]`` blocks (identity rotation, groups of 32); the
    bit width is the subclass's (``fixed_bits``), the config's bits and rank are ignored.

    Stored parts for keys: ``codes`` uint8 ``[N, T*D*bits/8]`` (the token-axis bit planes of
    `GroupQuantCompressor.code_layout`), ``scale`` / ``zero`` float16 ``[N, T/32, D]``; for
    values: ``codes`` as keys (in segments of 32 channels), ``scale`` / ``zero`` float16
    ``[N, T, D/32]``.
    """

    config_fields = ("value_stats",)  # width in the name, groups of 32: only the values' statistics' form applies

    def __init__(self, config, role, rank):
        super().__init__(config, role, rank)
        self.group = GROUP

    @classmethod
    def _group(cls, config) -> int:
        return GROUP


@register_compressor("kivi4")
class Kivi4(KiviCompressor):
    """4-bit KIVI (keys per channel, values per token, groups of 32)."""

    fixed_bits = 4


@register_compressor("kivi2")
class Kivi2(KiviCompressor):
    """2-bit KIVI (keys per channel, values per token, groups of 32)."""

    fixed_bits = 2
