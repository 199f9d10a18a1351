"""Grouped asymmetric quantization of blocks in a fixed orthonormal basis.

``x ~= C @ R`` with ``R`` a fixed ``D x D`` orthonormal matrix (identity for KIVI, a
Hadamard matrix for ``hadamard``) and ``C = x @ Rᵀ`` quantized asymmetrically (min/max,
float16 scale and zero point) in groups:

* keys: one scale and zero per channel over ``group`` consecutive tokens (keys have
  outlier *channels*, KIVI's observation);
* values: one scale and zero per token over ``group`` consecutive channels; with
  ``value_stats="byte"`` a uint8 scale code and an int8 zero point instead (2 bytes, not 4:
  `spectral_kv.quant.quantize_groups`).

Codes of any width 1..8 are bit-packed on the token axis in the bit planes of
`spectral_kv.codes` (3-bit codes cost 3 bits; the layout the fused decode kernel reads), one
uint8 buffer per block described by :meth:`GroupQuantCompressor.code_layout`. On CUDA the
compression runs as one fused op (`spectral_kv.kernels.quant_compress`), elsewhere as its torch twin. A rotation spreads
outlier channels over all channels before quantizing (QuaRot, SpinQuant): on the embedded
SmolLM2, 3-bit values after a Hadamard rotation lose less than 4-bit values without one.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from ..codes import CodeLayout, check_tokens
from ..config import SpectralConfig
from ..kernels.quant_compress import HAS_TRITON as QC_TRITON
from ..kernels.quant_compress import group_layout, quant_compress, quant_compress_reference
from ..quant import group_stats
from .base import Compressor, FactoredCompressor, check_value_stats, register_compressor

__all__ = ["GroupQuantCompressor", "HadamardCompressor", "rotation_matrix", "hadamard_matrix"]


def hadamard_matrix(d: int) -> torch.Tensor:
    """Orthonormal Sylvester-Hadamard matrix ``[d, d]`` float32 (``d`` a power of two)."""
    if d < 1 or d & (d - 1):
        raise ValueError(f"a Hadamard matrix needs a power-of-two size, got {d}")
    h = torch.ones(1, 1)
    while h.shape[0] < d:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h / math.sqrt(d)


def rotation_matrix(d: int, seed: int) -> torch.Tensor:
    """Hadamard for power-of-two ``d``, else a seeded random orthogonal matrix (QR)."""
    if d & (d - 1) == 0:
        return hadamard_matrix(d)
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


class GroupQuantCompressor(Compressor):
    """Rotate by ``R`` (subclass: :meth:`rotation`), quantize in groups, bit-pack.

    Stored parts: ``codes`` uint8 ``[N, nbytes]`` in the `code_layout` of the block (keys: one
    segment of ``D`` channels; values: segments of ``g = min(group, D)`` channels, the value
    quant groups); keys: ``scale`` / ``zero`` float16 ``[N, T/g, D]`` (per channel over
    ``g = min(group, T)`` tokens); values: ``[N, T, D/g]`` (per token per segment), float16,
    or with ``value_stats="byte"`` ``scale`` uint8 (scale code) and ``zero`` int8 (zero point).
    With unquantized bits (``None``) the rotated coefficients are stored as float32 ``coeffs``.
    """

    fixed_bits: ClassVar[int | None] = None  # KIVI: the width is part of the name
    config_fields: ClassVar[tuple] = ("bits", "quant_group", "value_stats")

    def __init__(self, config: SpectralConfig, role: str, rank: int) -> None:
        super().__init__(config, role, rank)
        self.group = config.quant_group
        # the storage form of this role's statistics (keys: always float16)
        self.stats = config.value_stats if role == "values" else "fp16"
        self._rot: dict[tuple, torch.Tensor] = {}

    @classmethod
    def effective_bits(cls, config: SpectralConfig, role: str) -> int | None:
        return cls.fixed_bits if cls.fixed_bits is not None else config.bits(role)

    @classmethod
    def check_config(cls, config: SpectralConfig, role: str) -> None:
        super().check_config(config, role)
        bits = cls.effective_bits(config, role)
        if bits is not None:  # codes are packed on the token axis: a block must fill whole bytes
            check_tokens(config.block_size, bits, "block_size")
        check_value_stats(config, role, bits)

    @classmethod
    def describe(cls, config: SpectralConfig, role: str) -> str:
        label = super().describe(config, role)
        return label + " byte stats" if role == "values" and config.value_stats != "fp16" else label

    @classmethod
    def check_head_dim(cls, config: SpectralConfig, role: str, head_dim: int) -> None:
        group = cls._group(config)
        if role == "values" and cls.effective_bits(config, role) is not None and head_dim % min(group, head_dim):
            raise ValueError(f"{cls.__name__} values: head_dim {head_dim} is not a multiple of quant_group={group}")

    @classmethod
    def _group(cls, config: SpectralConfig) -> int:
        return config.quant_group

    def code_layout(self, head_dim: int, tokens: int | None = None) -> CodeLayout:
        """Where a block's codes live in ``parts["codes"]`` (``tokens`` default: ``block_size``)."""
        if self.bits is None:
            raise ValueError(f"{type(self).__name__} {self.role}: unquantized coefficients have no code layout")
        t = self.config.block_size if tokens is None else tokens
        return group_layout(self.role, t, head_dim, self.bits, self.group)

    # ------------------------------------------------------------------ rotation
    def rotation(self, d: int) -> torch.Tensor | None:
        """``R`` ``[d, d]`` float32, or ``None`` for the identity."""
        return None

    def _rotation(self, d: int, device: torch.device) -> torch.Tensor | None:
        key = (d, str(device))
        if key not in self._rot:
            r = self.rotation(d)
            self._rot[key] = None if r is None else r.to(device)
        return self._rot[key]

    # ------------------------------------------------------------------ codec
    def compress(self, x: torch.Tensor, shared: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """``x`` [N, T, D] -> parts; on CUDA (triton importable) through the fused
        `kernels.quant_compress` op, elsewhere its torch twin (the same math; bit-identical
        codes without a rotation, see that module for where a rotation's rounding differs)."""
        n, t, d = x.shape
        r = self._rotation(d, x.device)
        if self.bits is None:
            x = x.float()
            return {"coeffs": x if r is None else x @ r.T}
        if self.role == "keys":
            g = min(self.group, t)
            if t % g:
                raise ValueError(f"{type(self).__name__} keys: a block of {t} tokens is not a multiple of quant_group={g}")
        else:
            g = min(self.group, d)
            if d % g:
                raise ValueError(f"{type(self).__name__} values: head_dim {d} is not a multiple of quant_group={g}")
        layout = [v for seg in self.code_layout(d, t).segments for v in seg]
        fn = quant_compress if x.is_cuda and QC_TRITON else quant_compress_reference
        codes, scale, zero = fn(x, r, layout, self.role, g, self.stats)
        return {"codes": codes, "scale": scale, "zero": zero}

    def coefficients(self, parts: dict[str, torch.Tensor], shared: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Dequantized rotated coefficients, float32 ``[..., T, D]``."""
        if self.bits is None:
            return parts["coeffs"].float()
        scale, zero = group_stats(parts["scale"], parts["zero"])  # float16, or the byte form
        t, d = self._block_shape(parts)
        codes = self.code_layout(d, t).unpack(parts["codes"]).float()  # [..., T, D]
        lead = codes.shape[:-2]
        if self.role == "keys":
            g = t // scale.shape[-2]
            x = codes.reshape(*lead, t // g, g, d) * scale.unsqueeze(-2) + zero.unsqueeze(-2)
        else:
            g = d // scale.shape[-1]
            x = codes.reshape(*lead, t, d // g, g) * scale.unsqueeze(-1) + zero.unsqueeze(-1)
        return x.reshape(*lead, t, d)

    def _block_shape(self, parts: dict[str, torch.Tensor]) -> tuple[int, int]:
        """``(T, D)`` of quantized parts: keys' scales give ``D``, values' give ``T``, and the
        code bytes (``T * D * bits / 8``) the other."""
        nbytes, scale = parts["codes"].shape[-1], parts["scale"]
        if self.role == "keys":
            d = scale.shape[-1]
            return nbytes * 8 // (d * self.bits), d
        t = scale.shape[-2]
        return t, nbytes * 8 // (t * self.bits)

    def rotation_on(self, d: int, device: torch.device) -> torch.Tensor | None:
        """``R`` ``[d, d]`` float32 on ``device`` (cached), or ``None`` for the identity."""
        return self._rotation(d, device)

    def decompress(self, parts: dict[str, torch.Tensor], dtype: torch.dtype,
                   shared: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        c = self.coefficients(parts)
        r = self._rotation(c.shape[-1], c.device)
        return (c if r is None else c @ r).to(dtype)

    # ------------------------------------------------------------------ factored view
    # Every block is ``coefficients @ R`` with one R for the layer (identity for KIVI): the
    # subclasses that are also `FactoredCompressor`s attend in that basis.
    def basis(self, parts: dict[str, torch.Tensor], shared: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        r = self.shared_basis(parts)
        # the block's leading dims: codes are [..., nbytes], unquantized coeffs [..., T, D]
        lead = parts["codes"].shape[:-1] if "codes" in parts else parts["coeffs"].shape[:-2]
        return r.expand(*lead, *r.shape)

    def shared_basis(self, parts: dict[str, torch.Tensor], shared: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The rotation ``R`` ``[D, D]`` float32 on the parts' device (identity without one): every block's basis."""
        d, dev = self._head_dim(parts), self._ref(parts).device
        r = self._rotation(d, dev)
        if r is None:
            key = (d, str(dev), "identity")
            if key not in self._rot:
                self._rot[key] = torch.eye(d, device=dev)
            r = self._rot[key]
        return r

    @staticmethod
    def _ref(parts: dict[str, torch.Tensor]) -> torch.Tensor:
        return parts["codes"] if "codes" in parts else parts["coeffs"]

    def _head_dim(self, parts: dict[str, torch.Tensor]) -> int:
        if self.bits is None:
            return parts["coeffs"].shape[-1]
        return self._block_shape(parts)[1]


@register_compressor("hadamard")
class HadamardCompressor(GroupQuantCompressor, FactoredCompressor):
    """Hadamard-rotated grouped quantization (full rank, no stored basis).

    A factored compressor with a fixed basis ``R`` shared by every block (nothing stored
    per block), so the ``spectral`` strategy attends in the rotated space. ``head_dim``
    that is not a power of two gets a seeded random orthogonal rotation instead.
    """

    supported_bits: ClassVar[tuple] = (2, 3, 4, 8, None)
    config_fields: ClassVar[tuple] = ("bits", "quant_group", "seed", "value_stats")  # seed: rotation of non-power-of-two dims

    def rotation(self, d: int) -> torch.Tensor:
        return rotation_matrix(d, self.config.seed)

