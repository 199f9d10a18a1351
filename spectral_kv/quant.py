"""Symmetric per-component quantization of low-rank coefficients (int8, packed int4)."""

from __future__ import annotations

import torch

__all__ = ["quantize", "dequantize", "qmax", "pack_bits", "unpack_bits", "quantize_groups"]


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


# ---------------------------------------------------------------------------- grouped codes
def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned ``bits``-bit codes (``[..., n]``, values < 2**bits) into uint8 ``[..., n*bits/8]``.

    Works for any ``bits`` in 1..8 (3-bit codes included): the codes are laid out as a
    little-endian bit stream, code ``j`` occupying bits ``j*bits .. j*bits+bits-1``.
    ``n * bits`` must be a multiple of 8.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits!r}")
    n = codes.shape[-1]
    if (n * bits) % 8:
        raise ValueError(f"{n} codes of {bits} bits do not fill whole bytes")
    if bits == 8:
        return codes.to(torch.uint8)
    lead = codes.shape[:-1]
    if n % 8 == 0:
        # 8 codes fill exactly `bits` bytes: build that word in an int64, then cut it into bytes.
        c = codes.to(torch.int64).reshape(*lead, n // 8, 8)
        word = (c << (bits * torch.arange(8, device=codes.device))).sum(-1, keepdim=True)
        out = (word >> (8 * torch.arange(bits, device=codes.device))) & 0xFF
        return out.to(torch.uint8).reshape(*lead, n * bits // 8)
    shifts = torch.arange(bits, device=codes.device, dtype=torch.uint8)
    stream = ((codes.to(torch.uint8).unsqueeze(-1) >> shifts) & 1).flatten(-2)  # [..., n*bits]
    stream = stream.reshape(*lead, n * bits // 8, 8)
    weights = (1 << torch.arange(8, device=codes.device, dtype=torch.int32))
    return (stream.to(torch.int32) * weights).sum(-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: uint8 ``[..., p]`` -> uint8 codes ``[..., p*8/bits]``."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits!r}")
    if bits == 8:
        return packed.to(torch.uint8)
    lead, p = packed.shape[:-1], packed.shape[-1]
    if p % bits == 0:
        # Every `bits` bytes hold 8 codes: one int64 word per 8 codes (the decode hot path of
        # the default layout; the bit stream below is 8x the bytes in int32).
        b = packed.to(torch.int64).reshape(*lead, p // bits, bits)
        word = (b << (8 * torch.arange(bits, device=packed.device))).sum(-1, keepdim=True)
        codes = (word >> (bits * torch.arange(8, device=packed.device))) & ((1 << bits) - 1)
        return codes.to(torch.uint8).reshape(*lead, p * 8 // bits)
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    stream = ((packed.unsqueeze(-1) >> shifts) & 1).flatten(-2)  # [..., p*8]
    stream = stream.reshape(*lead, -1, bits).to(torch.int32)
    weights = (1 << torch.arange(bits, device=packed.device, dtype=torch.int32))
    return (stream * weights).sum(-1).to(torch.uint8)


def quantize_groups(x: torch.Tensor, bits: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min/max quantization with statistics reduced over ``dim``.

    Parameters
    ----------
    x : Tensor float32 ``[..., G, ...]``
        ``dim`` is the axis of one group (its elements share scale and zero point).
    bits : int in 1..8

    Returns
    -------
    codes : uint8, same shape as ``x``, in ``[0, 2**bits - 1]``
    scale, zero : float16, ``x``'s shape with ``dim`` kept as size 1
        ``x ~= codes * scale + zero``; the error is at most ``scale / 2`` (plus float16
        rounding of the statistics).
    """
    levels = (1 << bits) - 1
    lo = x.amin(dim=dim, keepdim=True)
    hi = x.amax(dim=dim, keepdim=True)
    zero = lo.to(torch.float16)
    scale = ((hi - zero.float()) / levels).to(torch.float16)
    # A constant group gets scale 1 so the division stays finite (codes are then 0).
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round((x - zero.float()) / scale.float()).clamp_(0, levels).to(torch.uint8)
    return codes, scale, zero
