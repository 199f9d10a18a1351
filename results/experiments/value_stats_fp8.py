"""What-if (issue 14): cheaper per-token value statistics. Today a value segment stores an fp16
scale and an fp16 zero per token: 4 B of the 51.2 B a token may cost at 5x (SmolLM2, head_dim 64).
This run re-quantizes the values with an fp8 e4m3 scale (the smallest e4m3 >= the fp16 one, so the
range still fits) and an integer zero point (``x ~= (code - zp) * scale``, ``zp`` in 0..2**b-1): 2 B
(fp8 scale + uint8 zero point; stored here still as fp16, the values are what the 2-byte form holds).
Perplexity only; nothing in the library changes (the patch lives in this process).

    PYTHONPATH=. python results/experiments/value_stats_fp8.py --split tuning --segments 2 [--methods ...]

Any `spectral-kv eval` arguments pass through (add `--tag`, `--out`). Bytes per token of K3/V3 at
head_dim 64: codes 24 + 24, key stats (fp16 scale and zero per channel over ``group`` tokens)
2 B at group 128 / 1 B at 256, value stats 4 B (fp16) / 2 B (this form): 54 B = 4.74x, 53 B = 4.83x
(group 256), 51 B = 5.02x (group 256 + this form).
"""
import sys

import torch

import spectral_kv.compressors.grouped as grouped
from spectral_kv.codes import CodeLayout
from spectral_kv.eval.run import main as eval_main
from spectral_kv.kernels.quant_compress import quant_compress_reference

_E4M3 = None


def _e4m3_up(s: torch.Tensor) -> torch.Tensor:
    """The smallest float8 e4m3 value >= ``s`` (s > 0, float32)."""
    global _E4M3
    if _E4M3 is None:
        v = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
        _E4M3 = torch.unique(v[torch.isfinite(v) & (v > 0)])
    i = torch.searchsorted(_E4M3, s.contiguous()).clamp_max(_E4M3.numel() - 1)
    return _E4M3[i]


def values_fp8_zero_point(x, rotation, layout, role, key_group):
    if role != "values":
        return quant_compress_reference(x, rotation, layout, role, key_group)
    lay = CodeLayout(x.shape[1], tuple(zip(layout[0::2], layout[1::2])))
    c = (x.float() if rotation is None else x.float() @ rotation.T)[..., : lay.kept]
    codes, scales, zeros = [], [], []
    for seg, (_, b) in zip(c.split([ch for ch, _ in lay.kept_segments], -1), lay.kept_segments):
        top = (1 << b) - 1
        lo, hi = seg.amin(-1, keepdim=True), seg.amax(-1, keepdim=True)
        s = _e4m3_up(((hi - lo) / top).clamp_min(2.0**-9))
        zp = torch.round(-lo / s).clamp(0, top)
        codes.append(torch.clamp(torch.round(seg / s) + zp, 0, top).to(torch.uint8))
        scales.append(s)
        zeros.append(-zp * s)
    return lay.pack(torch.cat(codes, -1)), torch.cat(scales, -1).half(), torch.cat(zeros, -1).half()


if __name__ == "__main__":
    grouped.quant_compress_reference = values_fp8_zero_point  # the torch path the CPU runs
    sys.exit(eval_main(sys.argv[1:]))
