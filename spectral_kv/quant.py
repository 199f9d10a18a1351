"""Symmetric per-component quantization of low-rank coefficients (int8, packed int4)."""

from __future__ import annotations

import torch

__all__ = ["quantize", "dequantize", "qmax"]


def qmax(bits: int) -> int:
    """Largest magnitude code of a symmetric ``bits``-bit quantizer (127 or 7)."""
    return 2 ** (bits - 1) - 1


def quantize(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize coefficients with one scale per component (last dim).

    Parameters
    ----------
    x : Tensor [..., T, r] float32
        Coefficients of ``T`` tokens on ``r`` components.
    bits : {8, 4}

    Returns
    -------
    codes : Tensor int8 [..., T, r] (bits=8) or uint8 [..., T, r // 2] (bits=4, two per byte,
        even component in the low nibble)
    scales : Tensor float32 [..., r]
        ``x ~= codes * scales``; the error per element is at most ``scales / 2``.
    """
    if bits not in (8, 4):
        raise ValueError(f"bits must be 8 or 4, got {bits!r}")
    m = qmax(bits)
    # A zero column gets scale 1 (any scale reproduces zeros); tiny() would overflow 1/scale.
    amax = x.abs().amax(dim=-2)
    scales = torch.where(amax > 0, amax / m, torch.ones_like(amax))
    codes = torch.round(x / scales.unsqueeze(-2)).clamp_(-m, m).to(torch.int8)
    if bits == 4:
        if codes.shape[-1] % 2:
            raise ValueError(f"int4 packing needs an even number of components, got {codes.shape[-1]}")
        nib = (codes & 0xF).to(torch.uint8)
        codes = nib[..., 0::2] | (nib[..., 1::2] << 4)
    return codes, scales.float()


def dequantize(codes: torch.Tensor, scales: torch.Tensor, bits: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize`: ``[..., T, r]`` in ``dtype``."""
    if bits == 8:
        q = codes
    elif bits == 4:
        lo = (codes & 0xF).to(torch.int8)
        hi = (codes >> 4).to(torch.int8)
        # Sign-extend the nibbles: codes 8..15 stand for -8..-1.
        lo = torch.where(lo > 7, lo - 16, lo)
        hi = torch.where(hi > 7, hi - 16, hi)
        q = torch.stack((lo, hi), dim=-1).flatten(-2)
    else:
        raise ValueError(f"bits must be 8 or 4, got {bits!r}")
    return (q.to(torch.float32) * scales.unsqueeze(-2)).to(dtype)
