"""The `Compressor` plug point: turns a block of keys or values into a few small tensors."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from ..config import DTYPES, SpectralConfig
from ..quant import dequantize, quantize
from ..registry import Registry

__all__ = ["Compressor", "LowRankCompressor", "COMPRESSORS", "register_compressor"]

COMPRESSORS: Registry["Compressor"] = Registry("compressor")


def register_compressor(name: str):
    """Class decorator: make a `Compressor` selectable as ``SpectralConfig(compressor=name)``."""
    return COMPRESSORS.register(name)


class Compressor(ABC):
    """Compresses blocks of one role (``"keys"`` or ``"values"``) of one layer.

    Subclasses implement :meth:`compress` and :meth:`decompress`. Every tensor that
    ``compress`` returns must have the block batch ``N`` as its leading dim: the cold tier
    stores them in pools of shape ``[batch, kv_heads, n_blocks, *rest]`` and accounts their
    bytes exactly.

    Parameters
    ----------
    config : SpectralConfig
    role : {"keys", "values"}
    rank : int
        The rank (or any size knob) for this role, from the config.
    """

    name: ClassVar[str]
    low_rank: ClassVar[bool] = False

    def __init__(self, config: SpectralConfig, role: str, rank: int) -> None:
        self.config = config
        self.role = role
        self.rank = rank

    @abstractmethod
    def compress(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Compress ``x``: float32 ``[N, T, D]`` -> named tensors with leading dim ``N``."""

    @abstractmethod
    def decompress(self, parts: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """Rebuild ``[..., T, D]`` in ``dtype`` from tensors with any leading dims."""


class LowRankCompressor(Compressor):
    """A block as ``coeffs @ basis``: coefficients quantized per component, basis in ``basis_dtype``.

    Stored parts: ``coeffs`` (int8 ``[N, T, r]``, or uint8 ``[N, T, r/2]`` for 4 bits, or
    unquantized float32 when ``coeff_bits`` is None), ``scales`` float32 ``[N, r]`` (absent
    when unquantized) and ``basis`` ``[N, r, D]`` with orthonormal rows, so the singular
    values live in the coefficients and one scale per component fits them.
    Subclasses implement :meth:`factorize`.
    """

    low_rank: ClassVar[bool] = True

    @abstractmethod
    def factorize(self, x: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` float32 ``[N, T, D]`` -> (``coeffs`` ``[N, T, r] = U S``, ``basis`` ``[N, r, D] = Vᵀ``)."""

    def compress(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        coeffs, basis = self.factorize(x, self.rank)
        basis = basis.to(DTYPES[self.config.basis_dtype])
        if self.config.coeff_bits is None:
            return {"coeffs": coeffs.float(), "basis": basis}
        codes, scales = quantize(coeffs, self.config.coeff_bits)
        return {"coeffs": codes, "scales": scales, "basis": basis}

    def coefficients(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """Dequantized coefficients, float32 ``[..., T, r]``."""
        if self.config.coeff_bits is None:
            return parts["coeffs"].float()
        return dequantize(parts["coeffs"], parts["scales"], self.config.coeff_bits)

    def decompress(self, parts: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        return (self.coefficients(parts) @ parts["basis"].float()).to(dtype)
