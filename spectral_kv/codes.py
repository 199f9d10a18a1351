"""Token-axis bit planes: how unsigned codes of any width 1..8 are stored in a cold block.

The shared-basis layouts (``hadamard``, ``kivi*``, the learned ``spectral_quant``) store a
block as codes ``[T, C]`` (``T`` tokens, ``C`` channels of one *segment*, all of one width
``b``). The fused decode kernel (`spectral_kv.kernels.quant_decode`) reads them; this module
is the single definition of the layout and its pure-torch reference.

Layout (chosen so a kernel reads every byte once and gets tiles of consecutive tokens, the
``N``/``K`` axis of its matrix products, whatever the width):

* ``b`` is split into power-of-two *planes*, largest first: 8 -> (8,), 7 -> (4, 2, 1),
  6 -> (4, 2), 5 -> (4, 1), 4 -> (4,), 3 -> (2, 1), 2 -> (2,), 1 -> (1,). Plane ``p`` holds
  bits ``[off, off + p)`` of each code, ``off`` the sum of the planes before it.
* Plane ``p`` is uint8 ``[R_p, C]`` with ``R_p = T * p / 8`` rows (so ``T * p`` must be a
  multiple of 8). Token ``t`` lives in row ``t % R_p`` at bit shift ``p * (t // R_p)``:
  a row holds ``8 / p`` tokens ``R_p`` apart.

A kernel walks rows ``r0 .. r0+15`` of the smallest plane (``R_min`` rows); for every other
plane ``p`` the same tokens sit in rows ``r0 + R_min * k`` (``k < p / p_min``), so each byte is
loaded once and every sub-index ``i < 8 / p_min`` gives 16 consecutive tokens
``r0 + R_min * i + (0..15)`` at a constant shift.

`STORAGE_FORMAT` numbers the stored form of cold blocks; saved caches carry it and a cache of
another number is refused (1: codes packed per token, ``quant.pack_bits``; 2: this layout).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["STORAGE_FORMAT", "CodeLayout", "planes", "plane_rows", "pack_planes", "unpack_planes", "check_tokens"]

STORAGE_FORMAT = 2

_PLANES = {b: tuple(p for p in (8, 4, 2, 1) if b & p) for b in range(1, 9)}


def planes(bits: int) -> tuple[int, ...]:
    """Plane widths of a ``bits``-bit code, largest first (their sum is ``bits``)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"code width must be an int in 1..8, got {bits!r}")
    return _PLANES[bits]


def plane_rows(tokens: int, p: int) -> int:
    """Rows of a ``p``-bit plane for ``tokens`` tokens."""
    return tokens * p // 8


def check_tokens(tokens: int, bits: int, name: str = "block_size") -> None:
    """Raise ``ValueError`` naming ``name`` if ``tokens`` codes of ``bits`` bits do not fill
    whole bytes in every plane (``tokens * p_min`` must be a multiple of 8)."""
    p_min = planes(bits)[-1]
    if tokens * p_min % 8:
        raise ValueError(
            f"{name}={tokens}: {bits}-bit codes are packed {8 // p_min} tokens per byte, so {name} "
            f"must be a multiple of {8 // p_min}"
        )


def pack_planes(codes: torch.Tensor, bits: int) -> list[torch.Tensor]:
    """Pack unsigned codes ``[..., T, C]`` (values < 2**bits) into the planes of `planes(bits)`.

    Returns a list of uint8 tensors ``[..., T * p / 8, C]``, one per plane, in `planes` order.
    """
    check_tokens(codes.shape[-2], bits, "tokens")
    t = codes.shape[-2]
    c = codes.to(torch.int32)
    out, off = [], 0
    for p in planes(bits):
        rows = plane_rows(t, p)
        part = (c >> off) & ((1 << p) - 1)  # [..., T, C]
        # [..., 8/p, R_p, C]: sub-index i = t // R_p holds tokens i*R_p .. (i+1)*R_p - 1.
        part = part.reshape(*c.shape[:-2], 8 // p, rows, c.shape[-1])
        shifts = (p * torch.arange(8 // p, device=codes.device, dtype=torch.int32)).reshape(8 // p, 1, 1)
        out.append((part << shifts).sum(dim=-3).to(torch.uint8))
        off += p
    return out


def unpack_planes(packed: list[torch.Tensor], bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_planes`: the planes -> uint8 codes ``[..., T, C]``."""
    widths = planes(bits)
    if len(packed) != len(widths):
        raise ValueError(f"{bits}-bit codes have {len(widths)} planes {widths}, got {len(packed)} tensors")
    code, off = None, 0
    for p, plane in zip(widths, packed):
        x = plane.to(torch.int32)
        shifts = (p * torch.arange(8 // p, device=plane.device, dtype=torch.int32)).reshape(8 // p, 1, 1)
        part = (x.unsqueeze(-3) >> shifts) & ((1 << p) - 1)  # [..., 8/p, R_p, C]
        part = part.reshape(*x.shape[:-2], part.shape[-3] * part.shape[-2], x.shape[-1]) << off
        code = part if code is None else code | part
        off += p
    return code.to(torch.uint8)


@dataclass(frozen=True)
class CodeLayout:
    """Where the codes of one block of one role live: segments of channels, each of one width.

    ``segments`` is ``((channels, bits), ...)`` in channel (basis-component) order; ``bits`` 0
    drops a segment (nothing stored, its coefficients are zero) and may only end the list, so
    the kept components are a prefix of ``kept`` channels. Every kept segment's planes are
    flattened row-major into one uint8 buffer per block, segment after segment, planes in
    `planes` order: `offsets` gives each ``(segment, plane)``'s byte offset, `nbytes` the size.
    The layout is static per layer and role, so a kernel takes it as compile-time constants.
    Its derived sizes are computed once, at construction (a frozen layout never changes; the
    decode glue reads them at every step of every layer). Plain attributes, not
    ``functools.cached_property``: that one takes an RLock on Python 3.11, which
    ``torch.compile(fullgraph=True)`` cannot trace.
    """

    tokens: int
    segments: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        if isinstance(self.tokens, bool) or not isinstance(self.tokens, int) or self.tokens <= 0:
            raise ValueError(f"tokens must be a positive int, got {self.tokens!r}")
        if not self.segments:
            raise ValueError("a code layout needs at least one segment")
        dropped = False
        for channels, bits in self.segments:
            if isinstance(channels, bool) or not isinstance(channels, int) or channels <= 0:
                raise ValueError(f"segment channels must be positive ints, got {channels!r}")
            if bits == 0:
                dropped = True
                continue
            if dropped:
                raise ValueError(f"segments {self.segments}: dropped (0-bit) segments may only come last")
            check_tokens(self.tokens, bits, "block_size")
        kept_segments = tuple(s for s in self.segments if s[1])
        out, at = [], 0
        for channels, bits in kept_segments:
            seg = []
            for p in planes(bits):
                seg.append(at)
                at += plane_rows(self.tokens, p) * channels
            out.append(tuple(seg))
        derived = dict(channels=sum(c for c, _ in self.segments), kept=sum(c for c, b in self.segments if b),
                       kept_segments=kept_segments, offsets=tuple(out),
                       nbytes=sum(self.tokens * bits * channels // 8 for channels, bits in kept_segments))
        for name, value in derived.items():
            object.__setattr__(self, "_" + name, value)  # frozen: not fields, so eq/hash stay the fields'

    @classmethod
    def uniform(cls, tokens: int, channels: int, bits: int, group: int | None = None) -> "CodeLayout":
        """``channels`` channels of one width, in segments of ``group`` channels (default: one)."""
        group = channels if group is None else group
        if channels % group:
            raise ValueError(f"{channels} channels do not split into segments of {group}")
        return cls(tokens, ((group, bits),) * (channels // group))

    @property
    def channels(self) -> int:
        return self._channels

    @property
    def kept(self) -> int:
        """Channels with at least one bit (a prefix)."""
        return self._kept

    @property
    def kept_segments(self) -> tuple[tuple[int, int], ...]:
        return self._kept_segments

    @property
    def offsets(self) -> tuple[tuple[int, ...], ...]:
        """Byte offset of every plane of every kept segment (``offsets[s][j]``: plane ``j``)."""
        return self._offsets

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``[..., T, kept]`` (uint8, each below its segment's ``2**bits``) -> uint8 ``[..., nbytes]``."""
        if codes.shape[-2:] != (self.tokens, self.kept):
            raise ValueError(f"codes shaped {tuple(codes.shape)} do not match a layout of [{self.tokens}, {self.kept}]")
        lead, out, c0 = codes.shape[:-2], [], 0
        for channels, bits in self.kept_segments:
            for plane in pack_planes(codes[..., c0 : c0 + channels], bits):
                out.append(plane.reshape(*lead, plane.shape[-2] * plane.shape[-1]))  # -1 fails on empty pools
            c0 += channels
        return torch.cat(out, dim=-1)

    def unpack(self, buf: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`pack`: uint8 ``[..., nbytes]`` -> codes ``[..., T, kept]``."""
        if buf.shape[-1] != self.nbytes:
            raise ValueError(f"a buffer of {buf.shape[-1]} bytes does not match a layout of {self.nbytes}")
        # One flat row axis first: splitting the last dim of a sliced view of [..., nbytes] makes
        # torch.compile(dynamic=True) guard on the leading sizes (a recompile per new cold block).
        lead, segs = buf.shape[:-1], []
        flat = buf.reshape(-1, self.nbytes)
        for (channels, bits), offs in zip(self.kept_segments, self.offsets):
            seg_planes = [
                flat[:, o : o + plane_rows(self.tokens, p) * channels].unflatten(1, (plane_rows(self.tokens, p), channels))
                for o, p in zip(offs, planes(bits))
            ]
            segs.append(unpack_planes(seg_planes, bits))
        return torch.cat(segs, dim=-1).reshape(*lead, self.tokens, self.kept)
