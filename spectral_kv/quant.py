"""Symmetric per-component quantization of low-rank coefficients (int8, packed int4), and the
grouped asymmetric quantizer with its two storage forms of statistics (float16, or one byte each)."""

from __future__ import annotations

import torch

__all__ = ["quantize", "dequantize", "qmax", "pack_bits", "unpack_bits", "quantize_groups", "group_stats",
           "STATS_FORMS", "STATS_DTYPES", "BYTE_SCALE_OFFSET", "BYTE_SCALE_NAN", "ZP_MIN", "ZP_MAX", "byte_scale_code", "byte_scale"]

STATS_FORMS = ("fp16", "byte")  # how a group's scale and zero are stored (`quantize_groups`)
# each form's (scale, zero) dtypes: float16 both, or the byte form's uint8 scale code and int8 zero point
STATS_DTYPES = {"fp16": (torch.float16, torch.float16), "byte": (torch.uint8, torch.int8)}
# The byte form's scale code ``e`` (uint8) is an unsigned float with 5 exponent and 3 mantissa
# bits: the float32 whose bits are ``(e + BYTE_SCALE_OFFSET) << 20``, i.e. 2**-16 (e = 0) up to
# 1.75 * 2**15 (e = 254); e = 255 means NaN. Integer-exact both ways (no log/exp2 whose rounding
# differs between torch, the CPU interpreter and the GPU), and a scale code that is a float
# makes ``(code - zp) * scale`` exact in float32.
BYTE_SCALE_OFFSET = (127 - 16) << 3  # exponent field 111 (2**-16), mantissa 0
BYTE_SCALE_NAN = 255
ZP_MIN, ZP_MAX = -128, 127  # the int8 zero point


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


def byte_scale_code(need: torch.Tensor) -> torch.Tensor:
    """The smallest byte-form scale code whose scale is ``>= need`` (float32 ``>= 0``), uint8.

    ``need`` below 2**-16 (zero included) gets code 0; above the largest scale (57344), inf or
    NaN gets `BYTE_SCALE_NAN`. Integer ops on the float32 bits: bit ``20..30`` hold the exponent
    and the top 3 mantissa bits, rounded up when any lower bit is set."""
    bits = need.float().contiguous().view(torch.int32)
    c = (bits >> 20) + ((bits & 0xFFFFF) != 0).to(torch.int32) - BYTE_SCALE_OFFSET
    c = torch.where(need > 0, c, torch.zeros_like(c)).clamp_min(0)  # also maps -0.0 and tiny to 0
    return torch.where((c >= BYTE_SCALE_NAN) | ~(need <= 3.0e38), BYTE_SCALE_NAN, c).to(torch.uint8)


def byte_scale(code: torch.Tensor) -> torch.Tensor:
    """Decode scale codes (uint8) to float32 (`BYTE_SCALE_NAN` -> NaN)."""
    s = ((code.to(torch.int32) + BYTE_SCALE_OFFSET) << 20).view(torch.float32)
    return torch.where(code == BYTE_SCALE_NAN, torch.full_like(s, float("nan")), s)


def group_stats(scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored statistics of either form -> float32 ``(scale, zero)`` with ``x ~= code * scale + zero``.

    float16 ``scale``/``zero``: as stored. Byte form (uint8 scale code, int8 zero point ``zp``):
    ``(byte_scale(scale), -zp * scale)``, exact in float32 (a 4-significant-bit scale times an
    integer below 2**9), so ``code * scale + zero == (code - zp) * scale`` bit for bit."""
    if scale.dtype == torch.uint8 and zero.dtype == torch.int8:
        s = byte_scale(scale)
        return s, -zero.float() * s
    if scale.dtype == torch.float16 and zero.dtype == torch.float16:
        return scale.float(), zero.float()
    raise ValueError(f"group statistics must be float16/float16 or uint8/int8 (byte form), got {scale.dtype}/{zero.dtype}")


def quantize_groups(x: torch.Tensor, bits: int, dim: int, stats: str = "fp16") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min/max quantization with statistics reduced over ``dim``.

    Parameters
    ----------
    x : Tensor float32 ``[..., G, ...]``
        ``dim`` is the axis of one group (its elements share scale and zero point).
    bits : int in 1..8
    stats : ``"fp16"`` or ``"byte"`` (`STATS_FORMS`)
        ``"fp16"``: float16 ``scale`` and ``zero`` (the group's minimum), ``x ~= code * scale + zero``.
        ``"byte"``: a uint8 scale code (`byte_scale_code`, the needed scale rounded UP, so the
        range still fits) and an int8 zero point ``zp``, ``x ~= (code - zp) * scale``: 2 bytes
        instead of 4. The scale is widened until ``zp`` fits ``-128..127``: it is at least
        ``(hi - lo) / levels``, ``hi / (levels + 128)`` and ``-lo / 127``, so a group whose
        range lies far from 0 (``|lo|`` more than ~``128 / levels`` widths away) keeps the
        half-step error bound but with a coarser step; nothing is clipped. A group with a
        non-finite element, or whose scale would exceed 57344, stores the NaN scale code and
        decodes to NaN (the float16 form decodes such a group to NaN/inf too).

    Returns
    -------
    codes : uint8, same shape as ``x``, in ``[0, 2**bits - 1]``
    scale, zero : ``x``'s shape with ``dim`` kept as size 1; float16 / float16, or uint8 / int8
        (byte form; `group_stats` decodes either). The error is at most ``scale / 2`` (plus
        float16 rounding of the statistics in the fp16 form).
    """
    levels = (1 << bits) - 1
    lo = x.amin(dim=dim, keepdim=True)
    hi = x.amax(dim=dim, keepdim=True)
    if stats == "byte":
        bad = (~torch.isfinite(x)).any(dim=dim, keepdim=True)
        # Tensor denominators: a Python-scalar divisor may run as a reciprocal multiply (CUDA),
        # one ulp off the IEEE division the compress kernel does (and `need` is rounded up next).
        den = lambda v: torch.full_like(lo, v)  # noqa: E731
        need = torch.maximum(torch.maximum((hi - lo) / den(levels), hi / den(levels - ZP_MIN)), -lo / den(ZP_MAX))
        code = byte_scale_code(torch.where(bad, torch.full_like(need, float("nan")), need))
        s = byte_scale(code)
        ok = code != BYTE_SCALE_NAN
        s1 = torch.where(ok, s, torch.ones_like(s))  # keeps the NaN group's codes defined (0)
        zp = torch.where(ok, torch.round(-lo / s1), torch.zeros_like(s1)).clamp_(ZP_MIN, ZP_MAX)
        q = torch.round(x / s1) + zp
        codes = torch.where(ok, q, torch.zeros_like(q)).clamp_(0, levels).to(torch.uint8)
        return codes, code, zp.to(torch.int8)
    if stats != "fp16":
        raise ValueError(f"stats must be one of {STATS_FORMS}, got {stats!r}")
    zero = lo.to(torch.float16)
    scale = ((hi - zero.float()) / levels).to(torch.float16)
    # A constant group gets scale 1 so the division stays finite (codes are then 0).
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round((x - zero.float()) / scale.float()).clamp_(0, levels).to(torch.uint8)
    return codes, scale, zero
