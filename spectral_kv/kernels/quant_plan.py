"""The quantized decode kernels' launch plan, shared by the `tl` op (`quant_decode`) and the Gluon
path (`quant_decode_gluon*`), which import it from here so neither imports the other's module:
the constexpr segment description, the rows per unit and the units per program (split-K size)."""

from __future__ import annotations

import functools

from ..codes import CodeLayout, planes
from .launch import pow2 as _pow2

__all__ = ["choose_block_rows", "choose_tiles_per_split"]


@functools.lru_cache(maxsize=256)
def _segments(layout: CodeLayout, p_base: int) -> tuple:
    """The constexpr description of `quant_decode_triton` (its module docstring); offsets in bytes.
    Cached per (frozen) layout: every layer asks for the same one at every decode step."""
    out, c0, tile = [], 0, 0
    for col, ((channels, bits), offs) in enumerate(zip(layout.kept_segments, layout.offsets)):
        pl, bit = [], 0
        for p, off in zip(planes(bits), offs):
            pl += [p, off, bit, tile]
            bit, tile = bit + p, tile + p // p_base
        pl += [0] * (12 - len(pl))
        # channels padded to 16: the K (keys) / N (values) of a dot
        out.append((channels, _pow2(channels, 16), c0, col, len(planes(bits)), *pl))
        c0 += channels
    return tuple(out)


def _words_per_row(layouts, p_base: int) -> int:
    """int32 words a unit holds per row of the smallest plane, all planes of both roles."""
    return sum(c // 4 * b // p_base for lay in layouts for c, b in lay.kept_segments)


def choose_block_rows(words_per_row: int, r_base: int, num_warps: int, budget: int = 64) -> int:
    """Rows of the smallest plane per unit: the most (fewest softmax steps, most bytes in flight)
    whose code words fit ``budget`` registers a thread (16..64; 16 when the plane has fewer rows)."""
    br = 16
    while br < 64 and br < r_base and 2 * br * words_per_row <= budget * 32 * num_warps:
        br *= 2
    return br


def choose_tiles_per_split(bh: int, units: int, sms: int, per_sm: int = 2, fixed: float = 2.0, max_tps: int = 64) -> int:
    """Units (row tiles of a block) per program, a power of two: the fewest waves times the
    longest program. A program costs ``tps + fixed`` units of time (``fixed``: its start, the
    first loads' latency and its partials, worth ~2 units), ``per_sm`` programs run at once on an
    SM (4 warps at ~255 registers a thread: 2), and ``bh * ceil(units / tps)`` programs run in
    ``ceil(programs / (per_sm * sms))`` waves. Ties go to the longer program (fewer partials to
    combine). Fitted on the H200 sweep (`benchmarks/results/quant_decode_sweep_H200.txt`): at
    1 x 32K this picks 4 (47 us; 1 unit per program, the previous rule, took 68 us), at 8 x 32K 32
    (270 us vs 279 for 8), at 1 x 4K 1."""
    best, best_cost, tps = 1, float("inf"), 1
    while tps <= min(max(units, 1), max_tps):
        cost = -(-(bh * -(-units // tps)) // (per_sm * sms)) * (tps + fixed)
        if cost <= best_cost:
            best, best_cost = tps, cost
        tps *= 2
    return best
