"""Bit allocation: a width 0..8 per segment of basis components under a bit budget (KVTC-style DP).

A role's block is stored as codes in an orthonormal basis, components ordered by decreasing
energy, cut into *units* of channels (16 by default: the fused kernel's matrix tiles). Given a
table ``dist[u][b]`` of the squared error unit ``u`` costs at ``b`` bits (``b = 0``: the unit is
dropped and costs its whole energy), :func:`allocate` picks the widths that minimize the summed
error subject to

* a budget of code bits per token (``budget * channels``, ``budget`` in bits per coefficient
  averaged over all channels), plus ``segment_overhead`` bits per token for every kept segment
  (values store one fp16 scale and zero per token per segment: 32 bits);
* widths non-increasing along the components (the kept components are a prefix, so
  `spectral_kv.codes.CodeLayout`'s "0-bit segments are trailing" rule holds).

Because the basis is orthonormal and every unit is quantized on its own, the error of a block
is the sum of its units' errors: with a table *measured* on the data (`measure_distortion` in
`spectral_kv.compressors.spectral_quant`) the allocation's predicted error is the error, and the
optimum can only fall as the budget grows (the feasible set grows). Exact dynamic programming
over (unit, width of the previous unit, bits spent): units <= 16, widths <= 9, so it is instant.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

__all__ = ["allocate", "merge_segments", "segment_cost"]


def segment_cost(segments: Sequence[tuple[int, int]], segment_overhead: int = 0) -> int:
    """Bits per token of ``segments`` ``((channels, bits), ...)``: codes plus the per-segment overhead."""
    return sum(c * b + (segment_overhead if b else 0) for c, b in segments)


def merge_segments(segments: Sequence[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """Join adjacent segments of one width (fewer segments: fewer value scales)."""
    out: list[list[int]] = []
    for c, b in segments:
        if out and out[-1][1] == b:
            out[-1][0] += c
        else:
            out.append([c, b])
    return tuple((c, b) for c, b in out)


def allocate(
    dist: Sequence[Sequence[float]],
    channels: Sequence[int],
    budget: float,
    max_bits: int = 8,
    segment_overhead: int = 0,
    merge: bool = False,
) -> tuple[tuple[int, int], ...]:
    """Widths of least total ``dist`` within ``budget``.

    Parameters
    ----------
    dist : [U][max_bits + 1] floats
        ``dist[u][b]``: squared error of unit ``u`` at ``b`` bits (``b = 0``: dropped).
    channels : [U] ints
        Channels per unit, in component order.
    budget : float
        Bits per coefficient averaged over ``sum(channels)`` (overhead included).
    max_bits : int
        Largest width (<= 8).
    segment_overhead : int
        Bits per token a kept segment costs beyond its codes. With ``merge`` a run of units of
        one width is one segment (pays once); otherwise every kept unit pays.
    merge : bool
        Return adjacent equal widths as one segment.

    Returns
    -------
    segments : ((channels, bits), ...)
        One entry per unit (``merge=False``) or per run of equal widths (``merge=True``).

    Raises
    ------
    ValueError
        Bad table shape, a negative budget or widths outside 0..8.
    """
    n = len(channels)
    if n == 0 or len(dist) != n:
        raise ValueError(f"dist has {len(dist)} rows for {n} units; need one row per unit (and at least one)")
    if isinstance(max_bits, bool) or not isinstance(max_bits, int) or not 0 <= max_bits <= 8:
        raise ValueError(f"max_bits must be an int in 0..8, got {max_bits!r}")
    if any(len(row) < max_bits + 1 for row in dist):
        raise ValueError(f"every dist row needs {max_bits + 1} entries (widths 0..{max_bits})")
    if not math.isfinite(budget) or budget < 0:
        raise ValueError(f"budget must be a non-negative number of bits per coefficient, got {budget!r}")
    total = int(math.floor(budget * sum(channels) + 1e-9))  # bits per token

    @functools.lru_cache(maxsize=None)
    def best(u: int, prev: int, left: int) -> tuple[float, tuple[int, ...]]:
        if u == n:
            return 0.0, ()
        top = min(prev, max_bits)
        choice = (math.inf, ())
        for b in range(top + 1):
            pays = segment_overhead if b and (not merge or b != prev) else 0
            cost = channels[u] * b + pays
            if cost > left:
                continue
            err, rest = best(u + 1, b, left - cost)
            err += float(dist[u][b])
            if err < choice[0] or (err == choice[0] and sum(rest) + b < sum(choice[1])):
                choice = (err, (b, *rest))
        return choice

    # prev = 9 at the start: any first width is allowed (and with merge, the first kept unit pays).
    err, widths = best(0, 9, total)
    if not math.isfinite(err):  # only if even all-zero widths failed: impossible (cost 0)
        raise ValueError(f"no allocation fits a budget of {budget} bits")
    segments = tuple(zip(channels, widths))
    return merge_segments(segments) if merge else segments
