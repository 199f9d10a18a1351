"""KIVI-style reference quantizer (Liu et al. 2024, "KIVI: a tuning-free asymmetric 2bit
quantization for KV cache") as a `Compressor`, so it runs on the same tiers as the
spectral blocks (sinks, warm staging and the hot window stay exact).

Keys are quantized per channel (each channel's values over a group of 32 tokens share
a scale and zero point), values per token (each token's channels in groups of 32 share
them), asymmetric min/max, codes packed into bytes, scale and zero point in float16.
It is not low-rank, so it needs ``use_spectral_attention=False`` (the "reconstruct"
attention).  Registered names: ``kivi4`` and ``kivi2``; the config's rank is ignored.
"""

from __future__ import annotations

import torch

from .base import Compressor, register_compressor

__all__ = ["GROUP", "pack_codes", "unpack_codes", "quantize_groups", "KiviCompressor", "Kivi4", "Kivi2"]

GROUP = 32


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned ``bits``-bit codes (uint8 ``[..., D]``) into uint8 ``[..., D * bits / 8]``.

    Code ``j`` of a byte sits at bit offset ``j * bits`` (lowest first).
    """
    per = 8 // bits
    if codes.shape[-1] % per:
        raise ValueError(f"last dim {codes.shape[-1]} is not a multiple of {per} for {bits}-bit packing")
    c = codes.to(torch.uint8).reshape(*codes.shape[:-1], -1, per)
    out = torch.zeros(c.shape[:-1], dtype=torch.uint8, device=codes.device)
    for j in range(per):
        out |= c[..., j] << (j * bits)
    return out


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 ``[..., P]`` -> uint8 ``[..., P * 8 / bits]``."""
    per = 8 // bits
    mask = (1 << bits) - 1
    parts = [(packed >> (j * bits)) & mask for j in range(per)]
    return torch.stack(parts, dim=-1).flatten(-2)


def quantize_groups(x: torch.Tensor, bits: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min/max quantization with statistics reduced over ``dim``.

    Parameters
    ----------
    x : Tensor float32 ``[..., G, ...]``
        ``dim`` is the axis of one group (its elements share scale and zero point).
    bits : {2, 4, 8}

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


class KiviCompressor(Compressor):
    """KIVI quantization of ``[N, T, D]`` blocks; ``bits`` set by the subclass.

    Stored parts for keys: ``codes`` uint8 ``[N, T, D*bits/8]``, ``scale`` / ``zero`` float16
    ``[N, T/32, D]``; for values: ``codes`` as keys, ``scale`` / ``zero`` float16
    ``[N, T, D/32]``.  Groups are ``min(32, T)`` tokens (keys) or ``min(32, D)`` channels
    (values); the dims must be multiples of the group.
    """

    bits: int = 4

    def compress(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        n, t, d = x.shape
        x = x.float()
        if self.role == "keys":
            g = min(GROUP, t)
            if t % g:
                raise ValueError(f"KIVI keys: block of {t} tokens is not a multiple of the group {g}")
            codes, scale, zero = quantize_groups(x.reshape(n, t // g, g, d), self.bits, dim=2)
            scale, zero = scale.squeeze(2), zero.squeeze(2)  # [N, T/g, D]
        else:
            g = min(GROUP, d)
            if d % g:
                raise ValueError(f"KIVI values: head_dim {d} is not a multiple of the group {g}")
            codes, scale, zero = quantize_groups(x.reshape(n, t, d // g, g), self.bits, dim=3)
            scale, zero = scale.squeeze(3), zero.squeeze(3)  # [N, T, D/g]
        return {"codes": pack_codes(codes.reshape(n, t, d), self.bits), "scale": scale, "zero": zero}

    def decompress(self, parts: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        codes = unpack_codes(parts["codes"], self.bits).float()  # [..., T, D]
        scale, zero = parts["scale"].float(), parts["zero"].float()
        *lead, t, d = codes.shape
        if self.role == "keys":
            g = t // scale.shape[-2]
            x = codes.reshape(*lead, t // g, g, d) * scale.unsqueeze(-2) + zero.unsqueeze(-2)
        else:
            g = d // scale.shape[-1]
            x = codes.reshape(*lead, t, d // g, g) * scale.unsqueeze(-1) + zero.unsqueeze(-1)
        return x.reshape(*lead, t, d).to(dtype)


@register_compressor("kivi4")
class Kivi4(KiviCompressor):
    """4-bit KIVI (keys per channel, values per token, groups of 32)."""

    bits = 4


@register_compressor("kivi2")
class Kivi2(KiviCompressor):
    """2-bit KIVI (keys per channel, values per token, groups of 32)."""

    bits = 2
